//! Property tests of the cross-VM invariants, over random command streams of two
//! VMs (hostile ids, scanouts, fences and addresses included), random batch
//! completion orders, resets and restarts:
//!
//! - no VM can name another VM's resources, scanouts, fences or pages: every host
//!   command of a VM's batch names only host ids that VM holds (and the VMs' holds
//!   are disjoint), only its own physical scanout, and only host pages of its own
//!   RAM; the GPU touches nothing the mediator did not map;
//! - each VM's fences are signalled in increasing order;
//! - a reset VM leaves no trace: nothing of it stays on the GPU, in VRAM or in
//!   the IOMMU, and its neighbour ends up exactly as if the reset VM had never run;
//! - behind a physical ring that refuses commands and reports completions late and
//!   out of order, no VM ever holds a host id that is live on the device as another
//!   VM's resource, and no VM's command reaches another VM's resource.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec;
use alloc::vec::Vec;
use std::cell::RefCell;

use proptest::prelude::*;

use super::harness::*;
use super::*;
use crate::command::{Command, Request};
use crate::sim_gpu::SimGpu;
use crate::wire::{format, CursorPos, MemEntry};

/// Where an attach points.
#[derive(Clone, Copy, Debug)]
enum Addr {
    /// Page `n` of the VM's framebuffer area.
    Own(u64),
    /// Straddling the end of the VM's RAM.
    PastRam,
    /// The other VM's framebuffer, by host address.
    Neighbour,
    /// Wrapping the address space.
    Wrap,
}

#[derive(Clone, Debug)]
enum Cmd {
    Create {
        id: u32,
        w: u32,
        h: u32,
    },
    Unref(u32),
    Attach {
        id: u32,
        addr: Addr,
        pages: u64,
    },
    Detach(u32),
    SetScanout {
        scanout: u32,
        id: u32,
        w: u32,
        h: u32,
    },
    Flush {
        id: u32,
        w: u32,
        h: u32,
    },
    Transfer {
        id: u32,
        w: u32,
        h: u32,
        offset: u64,
    },
    DisplayInfo,
    Edid(u32),
    Cursor {
        scanout: u32,
        id: u32,
    },
    Move(u32),
}

#[derive(Clone, Debug)]
enum Op {
    /// VM index, command, fence id (0: unfenced).
    Send(usize, Cmd, u64),
    /// Run one batch of the VM, completions in reverse order or not.
    Run(usize, bool),
    /// The hypervisor resets the VM's channel.
    Reset(usize),
    /// The VM's driver resets the device and starts again (if it was reset).
    Restart(usize),
}

fn cmd() -> impl Strategy<Value = Cmd> {
    let id = 0u32..5;
    let dim = 1u32..48;
    let addr = prop_oneof![
        6 => (0u64..24).prop_map(Addr::Own),
        1 => Just(Addr::PastRam),
        1 => Just(Addr::Neighbour),
        1 => Just(Addr::Wrap),
    ];
    prop_oneof![
        3 => (id.clone(), dim.clone(), dim.clone()).prop_map(|(id, w, h)| Cmd::Create { id, w, h }),
        1 => id.clone().prop_map(Cmd::Unref),
        3 => (id.clone(), addr, 1u64..4).prop_map(|(id, addr, pages)| Cmd::Attach { id, addr, pages }),
        1 => id.clone().prop_map(Cmd::Detach),
        2 => (0u32..3, id.clone(), 0u32..40, 0u32..40)
            .prop_map(|(scanout, id, w, h)| Cmd::SetScanout { scanout, id, w, h }),
        2 => (id.clone(), dim.clone(), dim.clone()).prop_map(|(id, w, h)| Cmd::Flush { id, w, h }),
        3 => (id.clone(), dim.clone(), dim, 0u64..8192)
            .prop_map(|(id, w, h, offset)| Cmd::Transfer { id, w, h, offset }),
        1 => Just(Cmd::DisplayInfo),
        1 => (0u32..3).prop_map(Cmd::Edid),
        1 => (0u32..3, id).prop_map(|(scanout, id)| Cmd::Cursor { scanout, id }),
        1 => (0u32..3).prop_map(Cmd::Move),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0usize..2, cmd(), prop_oneof![3 => Just(0u64), 1 => 0u64..12])
            .prop_map(|(v, c, f)| Op::Send(v, c, f)),
        5 => (0usize..2, any::<bool>()).prop_map(|(v, r)| Op::Run(v, r)),
        1 => (0usize..2).prop_map(Op::Reset),
        2 => (0usize..2).prop_map(Op::Restart),
    ]
}

fn request(v: usize, c: &Cmd, fence: u64) -> (QueueId, Request) {
    let r = |w, h| rect(w, h);
    let cmd = match *c {
        Cmd::Create { id, w, h } => Command::ResourceCreate2d {
            resource_id: id,
            format: format::B8G8R8X8_UNORM,
            width: w,
            height: h,
        },
        Cmd::Unref(id) => Command::ResourceUnref { resource_id: id },
        Cmd::Attach { id, addr, pages } => {
            let gpa = match addr {
                Addr::Own(n) => FB.offset(n * 4096).get(),
                Addr::PastRam => RAM as u64 - 4096,
                // The neighbour's host address, as a number the guest writes.
                Addr::Neighbour => host_addr(1 - v, FB).get(),
                Addr::Wrap => u64::MAX - 4095,
            };
            Command::ResourceAttachBacking {
                resource_id: id,
                entries: vec![MemEntry {
                    addr: gpa,
                    length: (pages * 4096) as u32,
                    padding: 0,
                }],
            }
        }
        Cmd::Detach(id) => Command::ResourceDetachBacking { resource_id: id },
        Cmd::SetScanout { scanout, id, w, h } => Command::SetScanout {
            rect: r(w, h),
            scanout_id: scanout,
            resource_id: id,
        },
        Cmd::Flush { id, w, h } => Command::ResourceFlush {
            rect: r(w, h),
            resource_id: id,
        },
        Cmd::Transfer { id, w, h, offset } => Command::TransferToHost2d {
            rect: r(w, h),
            offset,
            resource_id: id,
        },
        Cmd::DisplayInfo => Command::GetDisplayInfo,
        Cmd::Edid(scanout) => Command::GetEdid { scanout },
        Cmd::Cursor { scanout, id } => Command::UpdateCursor {
            pos: CursorPos {
                scanout_id: scanout,
                x: 1,
                y: 2,
                padding: 0,
            },
            resource_id: id,
            hot_x: 0,
            hot_y: 0,
        },
        Cmd::Move(scanout) => Command::MoveCursor {
            pos: CursorPos {
                scanout_id: scanout,
                x: 3,
                y: 4,
                padding: 0,
            },
        },
    };
    let q = match cmd {
        Command::UpdateCursor { .. } | Command::MoveCursor { .. } => QueueId::Cursor,
        _ => QueueId::Control,
    };
    let r = if fence == 0 {
        req(cmd)
    } else {
        fenced(cmd, fence)
    };
    (q, r)
}

/// Two VMs on a simulated GPU, with the checks of every step.
struct Sim {
    w: World,
    gpu: SimGpu,
    /// Per VM index: the last fence id signalled to the guest.
    last_fence: [u64; 2],
    /// Per VM index: whether its guest has seen the device reset.
    reset_seen: [bool; 2],
}

impl Sim {
    fn new() -> Self {
        Sim {
            w: World::new(2, true),
            gpu: sim_gpu(2),
            last_fence: [0; 2],
            reset_seen: [false; 2],
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Send(v, c, f) => {
                let vm = self.w.vm(*v);
                if self.w.med.vm(vm).unwrap().state() != VmState::Active {
                    return Ok(());
                }
                let (q, r) = request(*v, c, *f);
                let free = match q {
                    QueueId::Control => self.w.guests[*v].ctrl.num_free(),
                    QueueId::Cursor => self.w.guests[*v].cursor.num_free(),
                };
                if free == 0 {
                    self.run(*v, false)?;
                    return Ok(());
                }
                self.w.send(*v, q, &r);
                self.collect(*v)?;
            }
            Op::Run(v, reverse) => self.run(*v, *reverse)?,
            Op::Reset(v) => {
                let vm = self.w.vm(*v);
                let report = self.w.med.reset_vm(vm).unwrap();
                self.w.iommu.apply_reset(vm, &report);
                self.reset_seen[*v] = true;
            }
            Op::Restart(v) => {
                let vm = self.w.vm(*v);
                if self.w.med.vm(vm).unwrap().state() == VmState::Reset {
                    self.w.med.driver_reset(vm).unwrap();
                    self.w.guests[*v].reinit_queues(true);
                    self.w.start(*v, true);
                    self.last_fence[*v] = 0;
                }
            }
        }
        self.check_holds()
    }

    /// Takes one batch of VM index `v`, checks each command names only what the
    /// VM owns, runs it on the GPU and completes it.
    fn run(&mut self, v: usize, reverse: bool) -> Result<(), TestCaseError> {
        let vm = self.w.vm(v);
        self.w.sync_iommu();
        let held: BTreeSet<u32> = self.w.med.vm(vm).unwrap().host_resources().collect();
        let Some(batch) = self.w.med.take_batch(vm, 8) else {
            return Ok(());
        };
        let own = host_base(v)..host_base(v).offset(RAM as u64);
        let mut completions = Vec::new();
        let view = HostView {
            guests: &mut self.w.guests,
            iommu: &self.w.iommu,
            faults: RefCell::new(Vec::new()),
        };
        for c in &batch.commands {
            let ids: Vec<u32> = match &c.request.cmd {
                Command::ResourceCreate2d { resource_id, .. }
                | Command::ResourceUnref { resource_id }
                | Command::ResourceFlush { resource_id, .. }
                | Command::TransferToHost2d { resource_id, .. }
                | Command::ResourceAttachBacking { resource_id, .. }
                | Command::ResourceDetachBacking { resource_id }
                | Command::SetScanout { resource_id, .. }
                | Command::UpdateCursor { resource_id, .. } => vec![*resource_id],
                _ => vec![],
            };
            for id in ids.into_iter().filter(|&id| id != 0) {
                prop_assert!(
                    held.contains(&id),
                    "VM {} named host id {} it does not hold",
                    vm,
                    id
                );
            }
            let scanout = match &c.request.cmd {
                Command::SetScanout { scanout_id, .. } => Some(*scanout_id),
                Command::UpdateCursor { pos, .. } | Command::MoveCursor { pos } => {
                    Some(pos.scanout_id)
                }
                _ => None,
            };
            if let Some(s) = scanout {
                prop_assert_eq!(s, v as u32, "VM {} reached physical scanout {}", vm, s);
            }
            if let Command::ResourceAttachBacking { entries, .. } = &c.request.cmd {
                for e in entries {
                    // A host command's entries hold host-physical addresses.
                    let start = Hpa::new(e.addr);
                    let end = start.offset(u64::from(e.length));
                    prop_assert!(
                        own.contains(&start) && end <= own.end,
                        "VM {} backing {:?}",
                        vm,
                        e
                    );
                }
            }
            let status = self.gpu.execute(&c.request, &view).response.type_();
            completions.push(Completion {
                host_fence: c.host_fence,
                status,
            });
        }
        let faults = view.faults.into_inner();
        prop_assert!(
            faults.is_empty(),
            "GPU reached unmapped memory: {:?}",
            faults
        );
        if reverse {
            completions.reverse();
        }
        self.w
            .med
            .complete_batch(vm, &completions, &mut self.w.guests[v].mem)
            .unwrap();
        self.w.sync_iommu();
        self.collect(v)
    }

    /// Takes the guest's returned chains, checking fence order.
    fn collect(&mut self, v: usize) -> Result<(), TestCaseError> {
        if self.w.med.vm(self.w.vm(v)).unwrap().state() == VmState::Reset {
            return Ok(());
        }
        for u in self.w.guests[v].take_used(QueueId::Control) {
            if let Some((h, _)) = u.resp {
                if h.flags & wire::FLAG_FENCE != 0 {
                    prop_assert!(
                        h.fence_id > self.last_fence[v],
                        "fence {} after {}",
                        h.fence_id,
                        self.last_fence[v]
                    );
                    self.last_fence[v] = h.fence_id;
                }
            }
        }
        self.w.guests[v].take_used(QueueId::Cursor);
        Ok(())
    }

    /// The VMs' host ids are disjoint, and every mapping of a VM is in its RAM.
    fn check_holds(&self) -> Result<(), TestCaseError> {
        let a: BTreeSet<u32> = self.w.med.vm(1).unwrap().host_resources().collect();
        let b: BTreeSet<u32> = self.w.med.vm(2).unwrap().host_resources().collect();
        prop_assert!(a.is_disjoint(&b), "host ids shared: {:?} {:?}", a, b);
        for &(vm, hpa, len) in &self.w.iommu.maps {
            let base = host_base(usize::from(vm) - 1);
            prop_assert!(hpa >= base && hpa.offset(len) <= base.offset(RAM as u64));
        }
        Ok(())
    }

    /// Runs VM index `v` until it has nothing staged or on the GPU.
    fn drain(&mut self, v: usize) -> Result<(), TestCaseError> {
        while self.w.med.vm(self.w.vm(v)).unwrap().staged_len() > 0 {
            self.run(v, false)?;
        }
        self.collect(v)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn no_vm_can_name_another_vms_resources_scanouts_fences_or_pages(
        ops in proptest::collection::vec(op(), 1..80)
    ) {
        let mut s = Sim::new();
        for o in &ops {
            s.apply(o)?;
        }
        for v in 0..2 {
            s.drain(v)?;
        }
        // Every refusal was answered, and VRAM adds up.
        let total: u64 = (1..=2).map(|vm| s.w.med.vm(vm).unwrap().vram_used()).sum();
        prop_assert_eq!(s.w.med.vram_used(), total);
        for vm in 1..=2 {
            let v = s.w.med.vm(vm).unwrap();
            prop_assert!(v.vram_used() <= v.vram_quota());
        }
    }

    #[test]
    fn a_reset_vm_leaves_no_trace(ops in proptest::collection::vec(op(), 1..60)) {
        // World A: both VMs run; then VM 1 is reset. World B: only VM 2's ops.
        let mut a = Sim::new();
        let mut b = Sim::new();
        for o in &ops {
            a.apply(o)?;
            let theirs = match o {
                Op::Send(v, ..) | Op::Run(v, _) | Op::Reset(v) | Op::Restart(v) => *v,
            };
            if theirs == 1 {
                b.apply(o)?;
            }
        }
        let report = a.w.med.reset_vm(1).unwrap();
        a.w.iommu.apply_reset(1, &report);
        for s in [&mut a, &mut b] {
            for v in 0..2 {
                s.drain(v)?;
            }
            // VM 2 ends live, so that it can be snapshotted in both worlds.
            s.apply(&Op::Restart(1))?;
            s.drain(1)?;
        }

        // Nothing of VM 1 is left: no host id, no VRAM, no mapping, nothing on
        // the GPU, its scanout blank.
        let v1 = a.w.med.vm(1).unwrap();
        prop_assert_eq!(v1.host_resources().count(), 0);
        prop_assert_eq!((v1.vram_used(), v1.resource_count(), v1.unanswered()), (0, 0, 0));
        prop_assert_eq!(a.w.iommu.of(1), 0);
        let v2_held: BTreeSet<u32> = a.w.med.vm(2).unwrap().host_resources().collect();
        prop_assert!(a.gpu.resource_ids().all(|id| v2_held.contains(&id)));
        prop_assert!(!a.gpu.scanout(0).unwrap().enabled());
        prop_assert_eq!(a.w.med.vram_used(), a.w.med.vm(2).unwrap().vram_used());
        for (vm, cmds) in &a.w.log {
            if *vm == 1 {
                for c in cmds {
                    prop_assert_eq!(a.w.med.route(c.host_fence), None);
                }
            }
        }

        // VM 2 is exactly as if VM 1 had never run: same context, same memory,
        // same screen.
        prop_assert_eq!(a.w.med.snapshot(2).unwrap(), b.w.med.snapshot(2).unwrap());
        prop_assert!(a.w.guests[1].mem.bytes == b.w.guests[1].mem.bytes);
        prop_assert_eq!(a.gpu.scanout(1).unwrap().checksum(), b.gpu.scanout(1).unwrap().checksum());
    }

    #[test]
    fn restore_never_panics_on_corrupted_snapshots(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut s = Sim::new();
        for o in [
            Op::Send(0, Cmd::Create { id: 2, w: 32, h: 32 }, 0),
            Op::Send(0, Cmd::Attach { id: 2, addr: Addr::Own(0), pages: 1 }, 0),
            Op::Send(0, Cmd::SetScanout { scanout: 0, id: 2, w: 32, h: 32 }, 3),
        ] {
            s.apply(&o)?;
        }
        s.drain(0)?;
        let mut bytes = s.w.med.snapshot(1).unwrap();
        for (i, x) in &flips {
            let i = i.index(bytes.len());
            bytes[i] ^= x;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        let mut m = Mediator::new(MediatorConfig::new(VRAM, 1));
        let cfg = VmGpuConfig::new(vec![ScanoutConfig { physical: 0, width: 640, height: 480 }]);
        m.add_vm(1, cfg).unwrap();
        let mem = s.w.guests[0].mem.clone();
        match m.restore(1, &bytes, &mem) {
            Ok(()) => {
                let v = m.vm(1).unwrap();
                prop_assert!(v.vram_used() <= v.vram_quota());
                prop_assert!(v.resource_count() <= limits::MAX_RESOURCES_PER_VM);
                for op in m.take_iommu_ops() {
                    let IommuOp::Map { hpa, len, .. } = op else {
                        return Err(TestCaseError::fail("unmap after restore"));
                    };
                    let base = host_base(0);
                    prop_assert!(hpa >= base && hpa.offset(len) <= base.offset(RAM as u64));
                }
            }
            Err(_) => {
                // Refused: the VM is exactly as fresh as before.
                let v = m.vm(1).unwrap();
                prop_assert_eq!(v.state(), VmState::Reset);
                prop_assert_eq!((v.resource_count(), v.staged_len(), v.vram_used()), (0, 0, 0));
                prop_assert!(m.take_iommu_ops().is_empty());
            }
        }
    }
}

/// What happens on the physical ring the VMs share.
#[derive(Clone, Debug)]
enum RingOp {
    /// VM index, command, fence id (0: unfenced).
    Send(usize, Cmd, u64),
    /// The hypervisor takes a batch of the VM (at most `max`, and no more than
    /// the ring has room for); the ring refuses the command at `refuse` and the
    /// rest of the batch, if the batch is that long.
    Submit(usize, usize, Option<usize>),
    /// The device runs up to `n` accepted commands, in ring order.
    Execute(usize),
    /// One completion, of those the device has run, is reported.
    Complete(prop::sample::Index),
    /// The hypervisor resets the VM's channel.
    Reset(usize),
    /// The VM's driver resets the device and starts again (if it was reset).
    Restart(usize),
}

fn ring_op() -> impl Strategy<Value = RingOp> {
    prop_oneof![
        8 => (0usize..2, cmd(), prop_oneof![3 => Just(0u64), 1 => 0u64..12])
            .prop_map(|(v, c, f)| RingOp::Send(v, c, f)),
        4 => (0usize..2, 0u32..5).prop_map(|(v, id)| RingOp::Send(v, Cmd::Unref(id), 0)),
        6 => (0usize..2, 1usize..8, prop::option::of(0usize..6))
            .prop_map(|(v, max, refuse)| RingOp::Submit(v, max, refuse)),
        3 => (1usize..4).prop_map(RingOp::Execute),
        4 => any::<prop::sample::Index>().prop_map(RingOp::Complete),
        2 => (0usize..2).prop_map(RingOp::Reset),
        2 => (0usize..2).prop_map(RingOp::Restart),
    ]
}

/// Slots of the model ring: each accepted command holds one until its completion
/// is reported.
const RING_SLOTS: usize = 6;

/// Two VMs on a simulated GPU behind a small physical ring that refuses, with the
/// device's own view of who created each live resource.
struct RingSim {
    w: World,
    gpu: SimGpu,
    /// Accepted, not yet run by the device, in ring order, with the VM's context
    /// then.
    queued: VecDeque<(VmId, u32, HostCommand)>,
    /// Run by the device, completion not yet reported.
    done: Vec<(VmId, Completion)>,
    /// Host id -> the VM whose `CREATE` made the live resource on the device.
    owner: BTreeMap<u32, VmId>,
}

impl RingSim {
    fn new() -> Self {
        RingSim {
            w: World::new(2, true),
            gpu: sim_gpu(2),
            queued: VecDeque::new(),
            done: Vec::new(),
            owner: BTreeMap::new(),
        }
    }

    fn apply(&mut self, op: &RingOp) -> Result<(), TestCaseError> {
        match op {
            RingOp::Send(v, c, f) => {
                let vm = self.w.vm(*v);
                let (q, r) = request(*v, c, *f);
                let free = match q {
                    QueueId::Control => self.w.guests[*v].ctrl.num_free(),
                    QueueId::Cursor => self.w.guests[*v].cursor.num_free(),
                };
                if self.w.med.vm(vm).unwrap().state() == VmState::Active && free > 0 {
                    self.w.send(*v, q, &r);
                }
            }
            RingOp::Submit(v, max, refuse) => self.submit(*v, *max, *refuse)?,
            RingOp::Execute(n) => {
                for _ in 0..*n {
                    self.execute()?;
                }
            }
            RingOp::Complete(i) => {
                if !self.done.is_empty() {
                    let (vm, c) = self.done.remove(i.index(self.done.len()));
                    let g = usize::from(vm) - 1;
                    self.w
                        .med
                        .complete_batch(vm, &[c], &mut self.w.guests[g].mem)
                        .unwrap();
                    self.w.sync_iommu();
                }
            }
            RingOp::Reset(v) => {
                let vm = self.w.vm(*v);
                let report = self.w.med.reset_vm(vm).unwrap();
                self.w.iommu.apply_reset(vm, &report);
            }
            RingOp::Restart(v) => {
                let vm = self.w.vm(*v);
                if self.w.med.vm(vm).unwrap().state() == VmState::Reset {
                    self.w.med.driver_reset(vm).unwrap();
                    self.w.guests[*v].reinit_queues(true);
                    self.w.start(*v, true);
                }
            }
        }
        for g in &mut self.w.guests {
            g.take_used(QueueId::Control);
            g.take_used(QueueId::Cursor);
        }
        self.check()
    }

    /// Takes a batch of VM index `v` no larger than the ring's room, and submits
    /// it; the ring refuses from index `refuse` on.
    fn submit(&mut self, v: usize, max: usize, refuse: Option<usize>) -> Result<(), TestCaseError> {
        let vm = self.w.vm(v);
        let room = RING_SLOTS - self.queued.len() - self.done.len();
        self.w.sync_iommu();
        let Some(batch) = self.w.med.take_batch(vm, max.min(room)) else {
            return Ok(());
        };
        prop_assert!(batch.commands.len() <= room);
        let context = self.w.med.vm(vm).unwrap().context_id();
        let mut commands = batch.commands;
        let refused = commands.split_off(refuse.unwrap_or(usize::MAX).min(commands.len()));
        self.queued
            .extend(commands.into_iter().map(|c| (vm, context, c)));
        if !refused.is_empty() {
            self.w.refused(v, refused);
        }
        Ok(())
    }

    /// The device runs the next accepted command; it must name only resources
    /// its VM created.
    fn execute(&mut self) -> Result<(), TestCaseError> {
        let Some((vm, context, c)) = self.queued.pop_front() else {
            return Ok(());
        };
        let named = match c.request.cmd {
            Command::ResourceUnref { resource_id }
            | Command::ResourceFlush { resource_id, .. }
            | Command::TransferToHost2d { resource_id, .. }
            | Command::ResourceAttachBacking { resource_id, .. }
            | Command::ResourceDetachBacking { resource_id }
            | Command::SetScanout { resource_id, .. }
            | Command::UpdateCursor { resource_id, .. } => resource_id,
            _ => 0,
        };
        if let Some(&o) = self.owner.get(&named) {
            prop_assert_eq!(
                o,
                vm,
                "VM {} acted on VM {}'s host resource {}",
                vm,
                o,
                named
            );
        }
        let view = HostView {
            guests: &mut self.w.guests,
            iommu: &self.w.iommu,
            faults: RefCell::new(Vec::new()),
        };
        let status = self.gpu.execute(&c.request, &view).response.type_();
        let faults = view.faults.into_inner();
        // A reset takes the VM's pages from the GPU at once, even from its
        // commands still on the ring.
        let reset = self.w.med.vm(vm).unwrap().context_id() != context;
        prop_assert!(
            faults.is_empty() || reset,
            "GPU reached unmapped memory: {:?}",
            faults
        );
        if status == wire::RESP_OK_NODATA {
            match c.request.cmd {
                Command::ResourceCreate2d { resource_id, .. } => {
                    self.owner.insert(resource_id, vm);
                }
                Command::ResourceUnref { resource_id } => {
                    self.owner.remove(&resource_id);
                }
                _ => {}
            }
        }
        self.done.push((
            vm,
            Completion {
                host_fence: c.host_fence,
                status,
            },
        ));
        Ok(())
    }

    /// No VM holds a host id that is live on the device as another VM's resource,
    /// and no two VMs hold the same host id.
    fn check(&self) -> Result<(), TestCaseError> {
        let mut seen = BTreeMap::new();
        for g in &self.w.guests {
            for h in self.w.med.vm(g.vm).unwrap().host_resources() {
                if let Some(&o) = self.owner.get(&h) {
                    prop_assert_eq!(
                        o,
                        g.vm,
                        "VM {} holds host id {}, live on the device as VM {}'s",
                        g.vm,
                        h,
                        o
                    );
                }
                if let Some(other) = seen.insert(h, g.vm) {
                    prop_assert!(false, "VMs {} and {} both hold host id {}", other, g.vm, h);
                }
            }
        }
        Ok(())
    }

    /// Runs everything to the end: no refusals, every completion reported.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..10_000 {
            while !self.queued.is_empty() {
                self.execute()?;
            }
            for (vm, c) in core::mem::take(&mut self.done) {
                let g = usize::from(vm) - 1;
                self.w
                    .med
                    .complete_batch(vm, &[c], &mut self.w.guests[g].mem)
                    .unwrap();
            }
            self.check()?;
            let staged = (0..2).any(|v| self.w.med.vm(self.w.vm(v)).unwrap().staged_len() > 0);
            if !staged {
                return Ok(());
            }
            for v in 0..2 {
                self.submit(v, RING_SLOTS, None)?;
            }
        }
        Err(TestCaseError::fail("the ring never drained"))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_two_vms_hold_the_same_live_host_id_under_refusals_and_completions(
        ops in proptest::collection::vec(ring_op(), 1..120)
    ) {
        let mut s = RingSim::new();
        for o in &ops {
            s.apply(o)?;
        }
        s.drain()?;
        // Nothing leaked either: every live resource is held by the VM that made it.
        for (&h, &vm) in &s.owner {
            prop_assert!(
                s.w.med.vm(vm).unwrap().host_resources().any(|x| x == h),
                "host resource {} of VM {} is live on the device but held by nobody",
                h,
                vm
            );
        }
        prop_assert_eq!(s.owner.len(), s.gpu.resource_count());
    }
}
