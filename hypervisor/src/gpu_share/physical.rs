//! The physical GPU as the dispatcher sees it ([`Gpu`]): the backend's ring, the
//! copies into a shared head's composite, the notifications (rung by the lock's
//! release), and the test-only injections; and the set-up of the shared heads'
//! composites.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use gpu_pv::command;
use gpu_pv::dispatch::Gpu;
use gpu_pv::mediator::{HostCommand, QueueId};
use gpu_pv::sched::VmId;

use crate::gpu::{DmaRegion, GpuBackend, GpuError};
use crate::iommu::DomainId;
use crate::mm::phys_to_ptr;

use super::REACHED_COMPLETIONS;

/// The physical GPU as the dispatcher sees it.
pub struct PhysicalGpu {
    pub(super) backend: Box<dyn GpuBackend>,
    /// The shared heads' composite resources: host id -> their memory.
    pub(super) composites: BTreeMap<u32, DmaRegion>,
    /// Device notifications for what was submitted, made once the lock is released.
    pub(super) doorbells: crate::gpu::Doorbells,
}

impl Gpu for PhysicalGpu {
    type Error = GpuError;

    fn free_slots(&self, queue: QueueId) -> usize {
        self.backend.free_slots(queue)
    }

    fn submit(&mut self, vm: VmId, cmd: &HostCommand, token: u64) -> Result<(), GpuError> {
        let mut bytes = alloc::borrow::Cow::Borrowed(cmd.bytes.as_slice());
        if let Some(doctored) = inject_bad_dma(vm, cmd) {
            bytes = alloc::borrow::Cow::Owned(doctored);
        }
        if !cmd.copies.is_empty() {
            band_copies(&mut self.composites, cmd);
        }
        self.backend.submit(cmd.queue, &bytes, token)
    }

    fn publish(&mut self) {
        let bells = self.backend.publish();
        self.doorbells.merge(bells);
    }

    fn poll(&mut self, out: &mut Vec<(u64, u32)>) {
        let irqs = crate::interrupts::take_pending(crate::interrupts::GPU_VECTOR);
        if self.backend.poll(out) == 0 && irqs != 0 {
            self.backend.check_device();
        }
    }

    fn withhold_completion(&mut self, vm: VmId, completed: u64) -> bool {
        crate::inject::withhold_completion(vm, completed >= REACHED_COMPLETIONS)
    }
}

/// Fault injection (test builds): an `ATTACH_BACKING` of `vm` carries an address
/// the mediator never granted, so a scenario sees the IOMMU stop it.
fn inject_bad_dma(vm: VmId, cmd: &HostCommand) -> Option<Vec<u8>> {
    let gpu_pv::command::Command::ResourceAttachBacking {
        resource_id,
        entries,
    } = &cmd.request.cmd
    else {
        return None;
    };
    if !crate::inject::take_bad_dma(vm) {
        return None;
    }
    let bad = crate::mm::frames::alloc()?;
    crate::inject::note_bad_dma(bad);
    let mut req = cmd.request.clone();
    let mut e = entries.clone();
    e[0].addr = bad;
    req.cmd = gpu_pv::command::Command::ResourceAttachBacking {
        resource_id: *resource_id,
        entries: e,
    };
    let mut out = Vec::new();
    command::encode(&req, &mut out);
    warn!(
        "gpu-pv: TEST ONLY: letting ungranted address {bad:#x} through to the GPU (vm {vm} resource {resource_id})"
    );
    Some(out)
}

/// Sets up head `head` (display `w` x `h`) to show `bands` VMs stacked: a composite
/// resource `w` x `bands * h` in hypervisor memory (reachable by the GPU), attached
/// and set on the head, shown black. Returns its host id and memory.
pub(super) fn make_composite(
    gpu: &mut dyn GpuBackend,
    domain: Option<DomainId>,
    head: u32,
    (w, h): (u32, u32),
    bands: u32,
) -> Result<(u32, DmaRegion), &'static str> {
    use gpu_pv::command::{Command, Request};
    use gpu_pv::wire::{format, CtrlHdr, MemEntry, Rect};

    let id = gpu_pv::mediator::RESERVED_HOST_IDS + head;
    let height = h * bands;
    let bytes = u64::from(w) * u64::from(height) * 4;
    let region = DmaRegion::alloc(bytes).ok_or("no memory for the composite")?;
    if let Some(d) = domain {
        crate::iommu::map(
            d,
            region.device_addr(),
            region.device_addr(),
            region.len(),
            false,
        )
        .map_err(|_| "cannot map the composite for the GPU")?;
    }
    let rect = Rect {
        x: 0,
        y: 0,
        width: w,
        height,
    };
    let cmds = [
        Command::ResourceCreate2d {
            resource_id: id,
            format: format::B8G8R8X8_UNORM,
            width: w,
            height,
        },
        Command::ResourceAttachBacking {
            resource_id: id,
            entries: alloc::vec![MemEntry {
                addr: region.device_addr(),
                length: u32::try_from(bytes).map_err(|_| "composite too large")?,
                padding: 0,
            }],
        },
        Command::SetScanout {
            rect,
            scanout_id: head,
            resource_id: id,
        },
        Command::TransferToHost2d {
            rect,
            offset: 0,
            resource_id: id,
        },
        Command::ResourceFlush {
            rect,
            resource_id: id,
        },
    ];
    for (i, cmd) in cmds.into_iter().enumerate() {
        let mut b = Vec::new();
        command::encode(
            &Request {
                hdr: CtrlHdr::default(),
                cmd,
            },
            &mut b,
        );
        let token = u64::MAX - 16 - i as u64;
        gpu.submit(QueueId::Control, &b, token)
            .map_err(|_| "submit refused")?;
        gpu.kick();
        let deadline = crate::apic::now_us() + 2_000_000;
        let mut done = Vec::new();
        while done.is_empty() {
            gpu.poll(&mut done);
            if crate::apic::now_us() > deadline {
                return Err("the GPU did not answer");
            }
        }
        if done[0] != (token, gpu_pv::wire::RESP_OK_NODATA) {
            return Err("the GPU refused a set-up command");
        }
    }
    Ok((id, region))
}

/// Makes the copies a command into a shared head's composite needs (the guest's
/// pixels into its band; checked by the mediator, bounded here again).
fn band_copies(composites: &mut BTreeMap<u32, DmaRegion>, cmd: &HostCommand) {
    let id = match cmd.request.cmd {
        gpu_pv::command::Command::TransferToHost2d { resource_id, .. } => resource_id,
        _ => return,
    };
    let Some(region) = composites.get_mut(&id) else {
        return;
    };
    let base = region.device_addr();
    let len = region.len();
    for c in &cmd.copies {
        if c.dst.checked_add(c.len).is_none_or(|end| end > len) {
            warn!("gpu-pv: a band copy outside composite {id:#x}: dropped");
            continue;
        }
        let dst = base + c.dst;
        match c.src {
            // SAFETY: `src` is the VM's own backing (pages the mediator checked
            // are in its RAM); `dst` lies inside the composite (checked above); both
            // are identity mapped and do not overlap (hypervisor vs guest memory).
            Some(src) => unsafe {
                core::ptr::copy_nonoverlapping(
                    phys_to_ptr::<u8>(src.get()),
                    phys_to_ptr::<u8>(dst),
                    c.len as usize,
                )
            },
            // SAFETY: inside the composite, as above.
            None => unsafe { core::ptr::write_bytes(phys_to_ptr::<u8>(dst), 0, c.len as usize) },
        }
    }
}
