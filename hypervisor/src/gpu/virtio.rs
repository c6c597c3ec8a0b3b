//! virtio-gpu over the modern virtio-pci transport (virtio 1.2, sections 4.1 and
//! 5.7): QEMU's `virtio-gpu-pci` (1af4:1050, modern only).
//!
//! Bring-up follows the spec's driver sequence: reset, `ACKNOWLEDGE`, `DRIVER`,
//! feature negotiation, `FEATURES_OK` (checked), MSI-X, the control queue (0) and
//! the cursor queue (1) as split virtqueues in hypervisor memory, `DRIVER_OK`, then
//! `GET_DISPLAY_INFO`. The transport is found through the virtio vendor capabilities
//! (common, notify, device configuration), never at fixed offsets.
//!
//! Features accepted, each only when offered: `VERSION_1` (required: no legacy),
//! `ACCESS_PLATFORM` (DMA goes through the platform IOMMU; see [`super`] on device
//! addresses), `GPU_EDID` (`GET_EDID` passes through), `RING_INDIRECT_DESC` (every
//! control command takes one ring slot, as Linux does) and `RING_EVENT_IDX`
//! (interrupt coalescing, below). Nothing else: no 3D, no blobs, no ring reset.
//!
//! The rings are driven by `gpu_pv::ring::driver::DriverQueue` (the same driver code
//! the guest frontend and the tests use) over a [`DmaRegion`] addressed by device
//! address. Each queue's region holds its rings and then one 4 KiB slot per command
//! in flight: indirect table, response buffer, request buffer. A request longer than
//! the slot's request buffer (a large `ATTACH_BACKING`) goes through the queue's one
//! large-request buffer. All of it is allocated at bring-up, so
//! [`GpuBackend::dma_regions`] is fixed for the device's lifetime.
//!
//! Interrupts: all MSI-X entries (config, control, cursor) carry [`GPU_VECTOR`] to
//! this CPU. With event idx the driver asks for an interrupt only when everything
//! kicked so far has completed (`used_event` = last used index plus commands in
//! flight, minus one), so a batch costs one interrupt; after harvesting, the driver
//! re-arms and re-checks the used ring, so a completion that raced the re-arm is
//! never lost. [`HostVirtioGpu::set_coalescing`] switches to an interrupt per
//! completion (for pipelined submitters that want early completions).
//!
//! Everything the device writes (used ring entries, response lengths, response
//! types) is checked; a device that breaks its ring is stopped (reset) and every
//! outstanding command is answered with `RESP_ERR_UNSPEC`.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use gpu_pv::command::{self, Command, Request, Response};
use gpu_pv::mediator::QueueId;
use gpu_pv::memory::Gpa;
use gpu_pv::ring::driver::DriverQueue;
use gpu_pv::ring::{QueueLayout, RingError};
use gpu_pv::wire::{self, feature, CtrlHdr, Wire};
use log::{info, warn};
use virtio_pci::{cap, common, status};

use super::{ring_addr, DmaRegion, GpuBackend, GpuError};
use crate::apic;
use crate::interrupts::GPU_VECTOR;
use crate::mm::{phys_to_ptr, PAGE_SIZE};
use crate::pci::{self, Bdf, Device, MsiX};

/// PCI vendor id of virtio devices.
pub const VENDOR: u16 = virtio_pci::VENDOR_ID;
/// PCI device id of a modern virtio-gpu (0x1040 + device type 16).
pub const DEVICE: u16 = 0x1050;

/// Entries of the control queue (or fewer, if the device offers fewer).
const CONTROL_QUEUE_SIZE: u16 = 64;
/// Entries of the cursor queue (or fewer).
const CURSOR_QUEUE_SIZE: u16 = 16;

/// One slot per command in flight: indirect table, response, request.
const SLOT_SIZE: u64 = PAGE_SIZE;
const TABLE_OFF: u64 = 0;
const RESP_OFF: u64 = 64;
/// Room for the largest response (`OK_EDID`, 1056 bytes).
const RESP_MAX: u32 = 1088;
const REQ_OFF: u64 = 1152;
/// Requests up to this size are copied into the slot.
const REQ_MAX: u64 = SLOT_SIZE - REQ_OFF;
/// The largest request: `ATTACH_BACKING` with `MAX_BACKING_ENTRIES` entries.
const BIG_MAX: u64 = wire::size::RESOURCE_ATTACH_BACKING as u64
    + gpu_pv::abi::limits::MAX_BACKING_ENTRIES as u64 * 16;

const _: () = assert!(RESP_OFF + RESP_MAX as u64 <= REQ_OFF);
const _: () = assert!(RESP_MAX as usize >= wire::size::RESP_EDID);

/// `struct virtio_gpu_config` offsets.
mod gpu_config {
    pub const EVENTS_READ: u64 = 0;
    pub const EVENTS_CLEAR: u64 = 4;
    pub const NUM_SCANOUTS: u64 = 8;
    pub const LEN: u64 = 16;
    /// `VIRTIO_GPU_EVENT_DISPLAY`.
    pub const EVENT_DISPLAY: u32 = 1;
}

/// The features this driver implements.
const SUPPORTED: u64 = feature::bit(feature::VERSION_1)
    | feature::bit(feature::ACCESS_PLATFORM)
    | feature::bit(feature::GPU_EDID)
    | feature::bit(feature::RING_INDIRECT_DESC)
    | feature::bit(feature::RING_EVENT_IDX);

/// A window of a memory BAR, accessed with volatile, naturally aligned loads and
/// stores; out-of-window accesses read all-ones and write nothing.
#[derive(Clone, Copy, Debug)]
struct Mmio {
    base: u64,
    len: u64,
}

impl Mmio {
    fn fits<T>(&self, off: u64) -> bool {
        let size = core::mem::size_of::<T>() as u64;
        off.checked_add(size).is_some_and(|end| end <= self.len)
            && (self.base + off).is_multiple_of(size)
    }

    fn read<T: Copy>(&self, off: u64) -> Option<T> {
        if !self.fits::<T>(off) {
            return None;
        }
        // SAFETY: inside a memory BAR of the device (`bar_window` checked the window
        // against the BAR's size, `fits` the access against the window), which
        // `pci::scan` mapped (uncached above the identity map; below it the firmware's
        // MTRRs make the MMIO hole uncached); naturally aligned.
        Some(unsafe { core::ptr::read_volatile(phys_to_ptr::<T>(self.base + off)) })
    }

    fn write<T: Copy>(&self, off: u64, v: T) {
        if self.fits::<T>(off) {
            // SAFETY: as in `read`.
            unsafe { core::ptr::write_volatile(phys_to_ptr::<T>(self.base + off), v) }
        }
    }

    fn r8(&self, off: u64) -> u8 {
        self.read(off).unwrap_or(u8::MAX)
    }
    fn r16(&self, off: u64) -> u16 {
        self.read(off).unwrap_or(u16::MAX)
    }
    fn r32(&self, off: u64) -> u32 {
        self.read(off).unwrap_or(u32::MAX)
    }
    fn w8(&self, off: u64, v: u8) {
        self.write(off, v)
    }
    fn w16(&self, off: u64, v: u16) {
        self.write(off, v)
    }
    fn w32(&self, off: u64, v: u32) {
        self.write(off, v)
    }
    /// A 64-bit register as two 32-bit writes, low half first (virtio allows it).
    fn w64(&self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }
}

/// `[offset, offset+len)` of memory BAR `bar`, if the BAR exists and holds it.
fn bar_window(dev: &Device, bar: u8, offset: u64, len: u64) -> Option<Mmio> {
    let b = dev
        .bars
        .iter()
        .find(|b| b.index == bar && !b.io && b.addr != 0)?;
    if offset.checked_add(len)? > b.size {
        return None;
    }
    Some(Mmio {
        base: b.addr.checked_add(offset)?,
        len,
    })
}

/// The first usable virtio capability of `cfg_type` at least `min_len` long, and
/// its notify offset multiplier.
fn virtio_cap(
    dev: &Device,
    cfg_type: u8,
    min_len: u64,
    what: &'static str,
) -> Result<(Mmio, u32), GpuError> {
    dev.virtio
        .iter()
        .filter(|c| c.cfg_type == cfg_type && u64::from(c.length) >= min_len)
        .find_map(|c| {
            bar_window(dev, c.bar, c.offset.into(), c.length.into())
                .map(|m| (m, c.notify_multiplier))
        })
        .ok_or(GpuError::Missing(what))
}

/// Resets the device and waits (up to about 100 ms) until it reads back 0.
fn reset(common: &Mmio) -> Result<(), GpuError> {
    common.w8(common::DEVICE_STATUS, 0);
    for _ in 0..10_000 {
        if common.r8(common::DEVICE_STATUS) == 0 {
            return Ok(());
        }
        apic::delay_us(10);
    }
    Err(GpuError::Timeout)
}

/// A command on the device.
#[derive(Debug)]
struct Pending {
    token: u64,
    slot: u16,
    /// It uses the queue's large-request buffer.
    big: bool,
    /// The driver's own command: its response is kept, not reported.
    internal: bool,
}

/// One split virtqueue and the buffers of its commands.
struct Queue {
    id: QueueId,
    index: u16,
    /// Rings, then `slots` slots.
    mem: DmaRegion,
    dq: DriverQueue,
    /// Offset of slot 0 in `mem`.
    slots_off: u64,
    free: Vec<u16>,
    /// By head descriptor.
    pending: Vec<Option<Pending>>,
    /// Where to write the queue index to notify.
    notify: Mmio,
    /// Control commands go through an indirect table.
    indirect: bool,
    /// Control commands get a response buffer; cursor commands have no response.
    responds: bool,
    /// Ring descriptors one command takes.
    descs_per_cmd: u16,
    /// For requests longer than a slot's request buffer (control queue only).
    big: Option<DmaRegion>,
    big_busy: bool,
    in_flight: usize,
    /// Submitted since the last kick.
    staged: usize,
}

impl Queue {
    fn new(
        common: &Mmio,
        notify: &Mmio,
        multiplier: u32,
        id: QueueId,
        want: u16,
        features: u64,
        msix_entry: u16,
    ) -> Result<Self, GpuError> {
        let index = id.index() as u16;
        common.w16(common::QUEUE_SELECT, index);
        let max = common.r16(common::QUEUE_SIZE);
        if max == 0 || max == u16::MAX {
            return Err(GpuError::NoQueue(index));
        }
        // The largest power of two within both limits (split rings need one).
        let limit = max.min(want);
        let size = 1u16 << (15 - limit.leading_zeros());
        let control = id == QueueId::Control;
        let indirect = control && features & feature::bit(feature::RING_INDIRECT_DESC) != 0;
        let event_idx = features & feature::bit(feature::RING_EVENT_IDX) != 0;
        let descs_per_cmd: u16 = if control && !indirect { 2 } else { 1 };
        let n = u64::from(size);
        let avail_off = 16 * n;
        let used_off = (avail_off + 6 + 2 * n).next_multiple_of(4);
        let slots_off = (used_off + 6 + 8 * n).next_multiple_of(PAGE_SIZE);
        let slots = size / descs_per_cmd;
        if slots == 0 {
            return Err(GpuError::NoQueue(index));
        }
        let mut mem =
            DmaRegion::alloc(slots_off + u64::from(slots) * SLOT_SIZE).ok_or(GpuError::NoMemory)?;
        let base = mem.device_addr();
        let layout = QueueLayout {
            size,
            desc: ring_addr(base),
            avail: ring_addr(base + avail_off),
            used: ring_addr(base + used_off),
            event_idx,
            indirect,
        };
        let dq = DriverQueue::new(&mut mem, layout).map_err(GpuError::Ring)?;
        let big = if control {
            Some(DmaRegion::alloc(BIG_MAX).ok_or(GpuError::NoMemory)?)
        } else {
            None
        };

        common.w16(common::QUEUE_SIZE, size);
        common.w16(common::QUEUE_MSIX_VECTOR, msix_entry);
        if common.r16(common::QUEUE_MSIX_VECTOR) != msix_entry {
            return Err(GpuError::MsixRefused);
        }
        common.w64(common::QUEUE_DESC, layout.desc.get());
        common.w64(common::QUEUE_DRIVER, layout.avail.get());
        common.w64(common::QUEUE_DEVICE, layout.used.get());
        let off = u64::from(common.r16(common::QUEUE_NOTIFY_OFF)) * u64::from(multiplier);
        if !notify.fits::<u16>(off) {
            return Err(GpuError::Missing(
                "notify register inside the notify capability",
            ));
        }
        let notify = Mmio {
            base: notify.base + off,
            len: 2,
        };
        common.w16(common::QUEUE_ENABLE, 1);
        Ok(Self {
            id,
            index,
            mem,
            dq,
            slots_off,
            free: (0..slots).rev().collect(),
            pending: (0..size).map(|_| None).collect(),
            notify,
            indirect,
            responds: control,
            descs_per_cmd,
            big,
            big_busy: false,
            in_flight: 0,
            staged: 0,
        })
    }

    fn slot_addr(&self, slot: u16) -> u64 {
        self.mem.device_addr() + self.slots_off + u64::from(slot) * SLOT_SIZE
    }

    fn free_slots(&self) -> usize {
        self.free
            .len()
            .min(usize::from(self.dq.num_free() / self.descs_per_cmd))
    }

    fn submit(&mut self, cmd: &[u8], token: u64, internal: bool) -> Result<(), GpuError> {
        if cmd.len() < CtrlHdr::SIZE {
            return Err(GpuError::BadCommand);
        }
        let len = cmd.len() as u64;
        let big = len > REQ_MAX;
        if (big && !self.responds) || len > BIG_MAX {
            return Err(GpuError::TooLarge);
        }
        if self.free_slots() == 0 || (big && self.big_busy) {
            return Err(GpuError::QueueFull);
        }
        let Some(&slot) = self.free.last() else {
            return Err(GpuError::QueueFull);
        };
        let at = self.slot_addr(slot);
        let req = if big {
            let b = self.big.as_mut().ok_or(GpuError::TooLarge)?;
            b.write_at(0, cmd).map_err(|_| GpuError::TooLarge)?;
            b.device_addr()
        } else {
            let off = at - self.mem.device_addr() + REQ_OFF;
            self.mem
                .write_at(off, cmd)
                .map_err(|_| GpuError::TooLarge)?;
            at + REQ_OFF
        };
        // `len` <= BIG_MAX, far below u32::MAX.
        let readable = [(ring_addr(req), len as u32)];
        let response = [(ring_addr(at + RESP_OFF), RESP_MAX)];
        let writable: &[(Gpa, u32)] = if self.responds { &response } else { &[] };
        let table = self.indirect.then_some(ring_addr(at + TABLE_OFF));
        let head = self
            .dq
            .add(&mut self.mem, &readable, writable, table)
            .map_err(|e| match e {
                RingError::QueueFull => GpuError::QueueFull,
                e => GpuError::Ring(e),
            })?;
        let Some(entry) = self.pending.get_mut(usize::from(head)) else {
            return Err(GpuError::Ring(RingError::HeadOutOfRange));
        };
        *entry = Some(Pending {
            token,
            slot,
            big,
            internal,
        });
        self.free.pop();
        self.big_busy |= big;
        self.in_flight += 1;
        self.staged += 1;
        Ok(())
    }

    /// Sets `used_event` for the commands published so far: with `coalesce`, the
    /// device interrupts once all of them have completed; otherwise at the next
    /// completion. Without event idx it does nothing (an interrupt per completion).
    fn rearm(&mut self, coalesce: bool) -> Result<(), RingError> {
        let published = self.in_flight.saturating_sub(self.staged);
        let last = self.dq.last_used_idx();
        let event = if coalesce && published > 0 {
            last.wrapping_add((published - 1) as u16)
        } else {
            last
        };
        self.dq.set_used_event(&mut self.mem, event)
    }

    /// Whether the device has returned entries not yet taken.
    fn more_used(&self) -> Result<bool, RingError> {
        let mut b = [0u8; 2];
        self.mem.read_at(
            self.dq.layout().used.get() + 2 - self.mem.device_addr(),
            &mut b,
        )?;
        Ok(u16::from_le_bytes(b) != self.dq.last_used_idx())
    }

    /// Publishes the staged commands; returns whether the device wants a notify.
    fn publish(&mut self, coalesce: bool) -> Result<bool, RingError> {
        if self.staged == 0 {
            return Ok(false);
        }
        self.staged = 0;
        // The interrupt target covers the new commands before the device sees them.
        self.rearm(coalesce)?;
        self.dq.kick(&mut self.mem)
    }

    /// Takes every returned command: `sink(pending, response type, response
    /// bytes)`, then re-arms and re-checks so nothing that raced the re-arm is lost.
    fn harvest(
        &mut self,
        coalesce: bool,
        sink: &mut dyn FnMut(&Pending, u32, &[u8]),
    ) -> Result<usize, RingError> {
        let mut n = 0;
        let mut resp = [0u8; RESP_MAX as usize];
        loop {
            while let Some((head, written)) = self.dq.take_used(&self.mem)? {
                let Some(p) = self
                    .pending
                    .get_mut(usize::from(head))
                    .and_then(Option::take)
                else {
                    return Err(RingError::UsedIdNotInFlight);
                };
                self.free.push(p.slot);
                self.big_busy &= !p.big;
                self.in_flight = self.in_flight.saturating_sub(1);
                n += 1;
                if !self.responds {
                    sink(&p, wire::RESP_OK_NODATA, &[]);
                    continue;
                }
                // The device's length is a claim: never read past our buffer.
                let got = (written.min(RESP_MAX)) as usize;
                let off = self.slot_addr(p.slot) - self.mem.device_addr() + RESP_OFF;
                self.mem.read_at(off, &mut resp[..got])?;
                let type_ = match wire::le32(&resp[..got], 0) {
                    Some(t @ 0x1100..=0x12ff) => t,
                    // Shorter than a header, or not a response type.
                    _ => wire::RESP_ERR_UNSPEC,
                };
                sink(&p, type_, &resp[..got]);
            }
            self.rearm(coalesce)?;
            if !self.more_used()? {
                return Ok(n);
            }
        }
    }

    /// Hands back every outstanding command (the device was stopped).
    fn abort(&mut self, sink: &mut dyn FnMut(&Pending)) {
        for p in self.pending.iter_mut().filter_map(Option::take) {
            sink(&p);
            self.free.push(p.slot);
        }
        self.big_busy = false;
        self.in_flight = 0;
        self.staged = 0;
    }
}

/// A virtio-gpu, brought up and ready for commands.
pub struct HostVirtioGpu {
    name: String,
    bdf: Bdf,
    common: Mmio,
    device: Mmio,
    #[cfg_attr(not(feature = "selftest"), allow(dead_code))]
    features: u64,
    queues: [Queue; 2],
    scanouts: Vec<(u32, u32)>,
    /// Coalesce interrupts to one per kicked set of commands (event idx only).
    coalesce: bool,
    failed: Option<GpuError>,
    /// Completions of commands stopped by a failure, for the next `poll`.
    aborted: Vec<(u64, u32)>,
    /// The response to the driver's own command.
    internal: Option<Vec<u8>>,
}

impl HostVirtioGpu {
    /// Whether this driver drives `dev`.
    pub fn matches(dev: &Device) -> bool {
        dev.vendor == VENDOR && dev.device == DEVICE
    }

    /// Brings `dev` up (see the module docs) with its interrupts on
    /// [`GPU_VECTOR`] to this CPU, and reads its displays. Logs
    /// `gpu: virtio-gpu ready: ...` on success.
    pub fn new(dev: &Device) -> Result<Self, GpuError> {
        if !Self::matches(dev) {
            return Err(GpuError::NotSupported);
        }
        let (common, _) = virtio_cap(dev, cap::COMMON, common::LEN, "virtio common capability")?;
        let (device, _) = virtio_cap(
            dev,
            cap::DEVICE,
            gpu_config::LEN,
            "virtio device capability",
        )?;
        let (notify, multiplier) = virtio_cap(dev, cap::NOTIFY, 2, "virtio notify capability")?;
        let msix = dev.msix.ok_or(GpuError::Missing("MSI-X"))?;
        if msix.vectors == 0 {
            return Err(GpuError::Missing("MSI-X vectors"));
        }
        let table = bar_window(
            dev,
            msix.table.0,
            msix.table.1.into(),
            16 * u64::from(msix.vectors),
        )
        .ok_or(GpuError::Missing("MSI-X table in a memory BAR"))?;
        let apic_id = apic::id();
        if apic_id > 0xff {
            return Err(GpuError::ApicIdTooLarge(apic_id));
        }

        // Memory decoding and bus mastering on, INTx off (the status half is
        // written as zeros, which leaves its write-one-to-clear bits alone).
        let cmd = pci::read32(dev.bdf, 0x04) & 0xffff;
        pci::write32(dev.bdf, 0x04, cmd | 0x2 | 0x4 | 0x400);

        reset(&common)?;
        common.w8(common::DEVICE_STATUS, status::ACKNOWLEDGE);
        common.w8(common::DEVICE_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let features = match negotiate(&common) {
            Ok(f) => f,
            Err(e) => {
                common.w8(common::DEVICE_STATUS, status::FAILED);
                return Err(e);
            }
        };
        if common.r16(common::NUM_QUEUES) < 2 {
            common.w8(common::DEVICE_STATUS, status::FAILED);
            return Err(GpuError::NoQueue(1));
        }

        let entries = match enable_msix(dev.bdf, &msix, &table, apic_id) {
            Ok(n) => n,
            Err(e) => {
                common.w8(common::DEVICE_STATUS, status::FAILED);
                return Err(e);
            }
        };
        let entry = |i: u16| i.min(entries - 1);
        let control = Queue::new(
            &common,
            &notify,
            multiplier,
            QueueId::Control,
            CONTROL_QUEUE_SIZE,
            features,
            entry(1),
        );
        let control = match control {
            Ok(q) => q,
            Err(e) => {
                common.w8(common::DEVICE_STATUS, status::FAILED);
                let _ = reset(&common);
                return Err(e);
            }
        };
        let cursor = Queue::new(
            &common,
            &notify,
            multiplier,
            QueueId::Cursor,
            CURSOR_QUEUE_SIZE,
            features,
            entry(2),
        );
        let cursor = match cursor {
            Ok(q) => q,
            Err(e) => {
                common.w8(common::DEVICE_STATUS, status::FAILED);
                // Stop the device before `control`'s memory is freed.
                let _ = reset(&common);
                return Err(e);
            }
        };
        // From here on, dropping `gpu` on an error resets the device first.
        let mut gpu = Self {
            name: format!("virtio-gpu {}", dev.bdf),
            bdf: dev.bdf,
            common,
            device,
            features,
            queues: [control, cursor],
            scanouts: Vec::new(),
            coalesce: true,
            failed: None,
            aborted: Vec::new(),
            internal: None,
        };
        common.w16(common::CONFIG_MSIX_VECTOR, entry(0));
        if common.r16(common::CONFIG_MSIX_VECTOR) != entry(0) {
            return Err(GpuError::MsixRefused);
        }
        common.w8(
            common::DEVICE_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        let events = device.r32(gpu_config::EVENTS_READ);
        if events != 0 {
            device.w32(gpu_config::EVENTS_CLEAR, events);
        }
        gpu.read_displays()?;
        info!(
            "gpu: virtio-gpu ready: {} scanouts, features {:#x}, MSI-X vector {:#x}",
            gpu.scanouts.len(),
            features,
            GPU_VECTOR
        );
        info!(
            "gpu: {}: control queue {} entries ({}), cursor queue {} entries, {} MSI-X entries to APIC id {apic_id}; displays {}",
            gpu.name,
            gpu.queues[0].dq.layout().size,
            if gpu.queues[0].indirect { "indirect" } else { "direct" },
            gpu.queues[1].dq.layout().size,
            entries,
            gpu.displays_text()
        );
        Ok(gpu)
    }

    /// The negotiated feature bits.
    #[cfg_attr(not(feature = "selftest"), allow(dead_code))]
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether interrupts are coalesced to one per kicked set of commands (the
    /// default; only with event idx) or raised per completion.
    #[cfg_attr(not(feature = "selftest"), allow(dead_code))]
    pub fn set_coalescing(&mut self, on: bool) {
        self.coalesce = on;
    }

    fn displays_text(&self) -> String {
        let mut s = String::new();
        for (i, &(w, h)) in self.scanouts.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            if w == 0 || h == 0 {
                s += &format!("{sep}{i}: no display");
            } else {
                s += &format!("{sep}{i}: {w}x{h}");
            }
        }
        s
    }

    /// `GET_DISPLAY_INFO` (polled), for `num_scanouts` scanouts.
    fn read_displays(&mut self) -> Result<(), GpuError> {
        let n = self.device.r32(gpu_config::NUM_SCANOUTS);
        if n == 0 || n == u32::MAX {
            return Err(GpuError::Missing("scanouts"));
        }
        let n = (n as usize).min(wire::MAX_SCANOUTS);
        let mut cmd = Vec::new();
        command::encode(
            &Request {
                hdr: CtrlHdr::default(),
                cmd: Command::GetDisplayInfo,
            },
            &mut cmd,
        );
        let resp = self.call_polled(&cmd)?;
        let modes = match Response::decode(&resp) {
            Ok((_, Response::DisplayInfo(modes))) => modes,
            Ok((_, other)) => return Err(GpuError::BadResponse(other.type_())),
            Err(_) => {
                return Err(GpuError::BadResponse(
                    wire::le32(&resp, 0).unwrap_or(wire::RESP_ERR_UNSPEC),
                ))
            }
        };
        self.scanouts = (0..n)
            .map(|i| match modes.get(i) {
                Some(&(r, true)) => (r.width, r.height),
                _ => (0, 0),
            })
            .collect();
        Ok(())
    }

    /// Runs one control command of the driver's own, waiting by polling (up to
    /// about a second), when nothing else is in flight. Returns the response bytes.
    fn call_polled(&mut self, cmd: &[u8]) -> Result<Vec<u8>, GpuError> {
        if self.in_flight() != 0 {
            return Err(GpuError::QueueFull);
        }
        self.internal = None;
        self.queues[0].submit(cmd, 0, true)?;
        self.kick();
        let mut sink = Vec::new();
        for _ in 0..100_000 {
            self.poll(&mut sink);
            if let Some(r) = self.internal.take() {
                return Ok(r);
            }
            if let Some(e) = self.failed {
                return Err(e);
            }
            apic::delay_us(10);
        }
        Err(GpuError::Timeout)
    }

    /// Stops the device (reset) and hands every outstanding command back with an
    /// error on the next `poll`.
    fn fail(&mut self, why: GpuError) {
        if self.failed.is_none() {
            warn!("gpu: {}: {why}: device stopped", self.name);
            self.failed = Some(why);
            self.common.w8(common::DEVICE_STATUS, status::FAILED);
            let _ = reset(&self.common);
        }
        let aborted = &mut self.aborted;
        for q in &mut self.queues {
            q.abort(&mut |p| {
                if !p.internal {
                    aborted.push((p.token, wire::RESP_ERR_UNSPEC));
                }
            });
        }
    }
}

/// Reads the offered features, accepts the supported subset and checks
/// `FEATURES_OK`.
fn negotiate(common: &Mmio) -> Result<u64, GpuError> {
    let mut offered = 0u64;
    for half in 0..2u32 {
        common.w32(common::DEVICE_FEATURE_SELECT, half);
        offered |= u64::from(common.r32(common::DEVICE_FEATURE)) << (32 * half);
    }
    if offered & feature::bit(feature::VERSION_1) == 0 {
        return Err(GpuError::Legacy);
    }
    let accepted = offered & SUPPORTED;
    for half in 0..2u32 {
        common.w32(common::DRIVER_FEATURE_SELECT, half);
        common.w32(common::DRIVER_FEATURE, (accepted >> (32 * half)) as u32);
    }
    common.w8(
        common::DEVICE_STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    if common.r8(common::DEVICE_STATUS) & status::FEATURES_OK == 0 {
        return Err(GpuError::FeaturesRejected);
    }
    Ok(accepted)
}

/// Points the first (up to) three MSI-X entries at [`GPU_VECTOR`] on APIC
/// `apic_id` (fixed delivery, edge), unmasked, and enables MSI-X with INTx off.
/// Returns the number of entries programmed.
fn enable_msix(bdf: Bdf, msix: &MsiX, table: &Mmio, apic_id: u32) -> Result<u16, GpuError> {
    let entries = msix.vectors.min(3);
    let addr = 0xfee0_0000 | (apic_id << 12);
    for i in 0..u64::from(entries) {
        let e = 16 * i;
        table.w32(e + 12, 1); // masked while it is written
        table.w32(e, addr);
        table.w32(e + 4, 0);
        table.w32(e + 8, u32::from(GPU_VECTOR));
        table.w32(e + 12, 0);
    }
    let d = pci::read32(bdf, msix.cap);
    let control = ((d >> 16) | 0x8000) & !0x4000; // enable, function mask off
    pci::write32(bdf, msix.cap, (d & 0xffff) | (control << 16));
    if pci::read32(bdf, msix.cap) >> 31 == 0 {
        return Err(GpuError::Missing("MSI-X enable"));
    }
    Ok(entries)
}

impl Drop for HostVirtioGpu {
    fn drop(&mut self) {
        // Stop all DMA before the rings and buffers go back to the frame allocator:
        // reset the device, then take away its bus mastering.
        let _ = reset(&self.common);
        let cmd = pci::read32(self.bdf, 0x04) & 0xffff;
        pci::write32(self.bdf, 0x04, cmd & !0x4);
    }
}

impl GpuBackend for HostVirtioGpu {
    fn name(&self) -> &str {
        &self.name
    }

    fn scanouts(&self) -> &[(u32, u32)] {
        &self.scanouts
    }

    fn free_slots(&self, queue: QueueId) -> usize {
        if self.failed.is_some() {
            return 0;
        }
        self.queues[queue.index()].free_slots()
    }

    fn submit(&mut self, queue: QueueId, cmd: &[u8], token: u64) -> Result<(), GpuError> {
        if self.failed.is_some() {
            return Err(GpuError::DeviceFailed);
        }
        match self.queues[queue.index()].submit(cmd, token, false) {
            Err(GpuError::Ring(e)) => {
                self.fail(GpuError::Ring(e));
                Err(GpuError::DeviceFailed)
            }
            r => r,
        }
    }

    fn kick(&mut self) {
        self.publish().ring();
    }

    fn publish(&mut self) -> super::Doorbells {
        let mut bells = super::Doorbells::default();
        if self.failed.is_some() {
            return bells;
        }
        for i in 0..self.queues.len() {
            let q = &mut self.queues[i];
            match q.publish(self.coalesce) {
                Ok(true) if q.notify.fits::<u16>(0) => bells.add(q.notify.base, q.index),
                Ok(_) => {}
                Err(e) => {
                    self.fail(GpuError::Ring(e));
                    return super::Doorbells::default();
                }
            }
        }
        bells
    }

    fn poll(&mut self, out: &mut Vec<(u64, u32)>) -> usize {
        let before = out.len();
        out.append(&mut self.aborted);
        if self.failed.is_some() {
            return out.len() - before;
        }
        for i in 0..self.queues.len() {
            let internal = &mut self.internal;
            let r = self.queues[i].harvest(self.coalesce, &mut |p, type_, bytes| {
                if p.internal {
                    *internal = Some(bytes.to_vec());
                } else {
                    out.push((p.token, type_));
                }
            });
            if let Err(e) = r {
                let id = self.queues[i].id;
                self.fail(GpuError::Ring(e));
                warn!("gpu: {}: {id:?} queue broken", self.name);
                out.append(&mut self.aborted);
                break;
            }
        }
        out.len() - before
    }

    fn in_flight(&self) -> usize {
        self.queues.iter().map(|q| q.in_flight).sum()
    }

    fn check_device(&mut self) -> bool {
        if self.failed.is_some() {
            return false;
        }
        let st = self.common.r8(common::DEVICE_STATUS);
        if st & status::DEVICE_NEEDS_RESET != 0 || st == u8::MAX {
            self.fail(GpuError::DeviceFailed);
            return false;
        }
        let events = self.device.r32(gpu_config::EVENTS_READ);
        if events == 0 || events == u32::MAX {
            return false;
        }
        self.device.w32(gpu_config::EVENTS_CLEAR, events);
        events & gpu_config::EVENT_DISPLAY != 0
    }

    fn failed(&self) -> Option<GpuError> {
        self.failed
    }

    fn dma_regions(&self) -> Vec<(u64, u64)> {
        let mut v = vec![];
        for q in &self.queues {
            v.push((q.mem.device_addr(), q.mem.len()));
            if let Some(b) = &q.big {
                v.push((b.device_addr(), b.len()));
            }
        }
        v
    }
}
