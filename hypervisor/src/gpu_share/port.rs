//! A VM's port to the shared GPU: what its exit handlers and the vCPU scheduler
//! use (doorbells, slices, interrupts, device events), and what the GPU side shares
//! with it without the lock.

use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use gpu_pv::dispatch::BufferError;
use gpu_pv::mediator::QueueId;
use gpu_pv::memory::Gpa;
use gpu_pv::ring::QueueLayout;
use gpu_pv::sched::VmId;

use super::{after_guest_work, drain_events, iommu_apply, lock, now_ns, try_lock, GPUPV};

/// What a VM's [`GpuPort`] shares with the GPU side, without the GPU-PV lock.
#[derive(Debug, Default)]
pub(super) struct Link {
    /// Virtual interrupts to raise: bit i = MSI-X entry i (coalesced).
    pub(super) mailbox: AtomicU64,
    /// Doorbells rung while the lock was busy (bit = queue index), served by the
    /// next [`service`] on any CPU.
    pub(super) pending_doorbells: AtomicU64,
    /// Its vCPU runs now: its queues are polled (by the bottom half on idle CPUs,
    /// and at its own exits), and the guest is asked not to kick.
    pub(super) in_slice: AtomicBool,
    /// 1 + the CPU running its vCPU 0 (which takes the GPU's virtual interrupts), 0
    /// when it does not run. A CPU that posts an interrupt for it sends that CPU a
    /// wake IPI, so the guest exits and takes it at once.
    pub(super) running_on: AtomicUsize,
}

/// A VM's port to the shared GPU, from [`add_vm`]: its device's events, doorbells,
/// slices and interrupts go through it. Dropping it takes the VM off the GPU: its
/// channel is reset (work dropped, resources freed, mappings removed) and its
/// memory is no longer reachable; it stays on the GPU schedule until its cleanup
/// (scanouts blanked, host resources unref'd) ran.
#[derive(Debug)]
pub struct GpuPort {
    pub(super) vm: VmId,
    pub(super) link: Arc<Link>,
}

/// Whether a VM has GPU interrupts waiting: what the vCPU scheduler reads to wake a
/// halted vCPU, without the VM's lock.
#[derive(Clone, Debug)]
pub struct PendingGpuInterrupts(Arc<Link>);

impl PendingGpuInterrupts {
    /// Whether any are waiting.
    pub fn any(&self) -> bool {
        self.0.mailbox.load(Ordering::Relaxed) != 0
    }
}

impl GpuPort {
    /// Scanouts the VM sees.
    pub fn scanouts(&self) -> u32 {
        1
    }
    /// The VM notified `queue`.
    pub fn doorbell(&self, queue: QueueId) {
        doorbell(self.vm, &self.link, queue);
    }
    /// Its vCPU starts a slice on this CPU (`takes_interrupts`: it is vCPU 0): its
    /// queues are served now and polled until [`slice_end`](Self::slice_end), with
    /// the guest's kicks suppressed.
    pub fn slice_begin(&self, takes_interrupts: bool) {
        slice_begin(self.vm, &self.link, takes_interrupts);
    }
    /// Its vCPU stopped running: what it queued is served, and the guest is asked
    /// to kick again (nobody polls a VM that does not run).
    pub fn slice_end(&self) {
        slice_end(self.vm, &self.link);
    }
    /// Takes the pending virtual interrupts as a bitmask of MSI-X entries: all
    /// completions since the last call coalesce into one interrupt per entry.
    pub fn take_interrupts(&self) -> u64 {
        self.link.mailbox.swap(0, Ordering::AcqRel)
    }
    /// Whether virtual interrupts are waiting.
    pub fn has_interrupts(&self) -> bool {
        self.link.mailbox.load(Ordering::Relaxed) != 0
    }
    /// The same, for the vCPU scheduler.
    pub fn pending_interrupts(&self) -> PendingGpuInterrupts {
        PendingGpuInterrupts(self.link.clone())
    }
    /// Whether commands were taken from its rings and not answered yet (so a
    /// completion, and its interrupt, are coming).
    pub fn has_work(&self) -> bool {
        has_work(self.vm)
    }
    /// Whether its device shows DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        needs_reset(self.vm)
    }
    /// The driver wrote DRIVER_OK with these queues.
    pub fn start(&self, control: QueueLayout, cursor: QueueLayout) -> bool {
        start(self.vm, control, cursor)
    }
    /// The driver reset the device.
    pub fn driver_reset(&self) {
        driver_reset(self.vm);
    }
    /// The driver set a queue's (or the config) MSI-X entry.
    pub fn set_vector(&self, queue: Option<QueueId>, entry: u16) {
        set_vector(self.vm, queue, entry);
    }
    /// The driver reset one queue (`VIRTIO_F_RING_RESET`).
    pub fn reset_queue(&self, queue: QueueId) {
        reset_queue(self.vm, queue);
    }
    /// The driver re-enabled a reset queue at `layout`.
    pub fn restart_queue(&self, queue: QueueId, layout: QueueLayout) -> bool {
        restart_queue(self.vm, queue, layout)
    }
    /// Zero-copy buffer exchange (hypercall GPU_REGISTER_BUFFER).
    pub fn register_buffer(&self, gpa: Gpa, len: u64) -> Option<u64> {
        register_buffer(self.vm, gpa, len)
    }
    /// Hypercall GPU_UNREGISTER_BUFFER.
    pub fn unregister_buffer(&self, handle: u64) -> bool {
        unregister_buffer(self.vm, handle)
    }
}

impl Drop for GpuPort {
    fn drop(&mut self) {
        self.link.in_slice.store(false, Ordering::Release);
        self.link.running_on.store(0, Ordering::Release);
        remove_vm(self.vm);
    }
}

/// Zero-copy buffer exchange (hypercall GPU_REGISTER_BUFFER): the VM names a
/// page-aligned range of its RAM; after the validity and ownership checks it is
/// registered in the GPU's IOMMU domain until unregistered or the VM goes. Returns
/// the handle, or `None` when a check fails.
fn register_buffer(vm: VmId, gpa: Gpa, len: u64) -> Option<u64> {
    let mut g = lock();
    let s = g.as_mut()?;
    let mem = *s.memory.get(&vm)?;
    match s.disp.register_buffer(vm, &mem, gpa, len) {
        Ok(handle) => {
            iommu_apply(s);
            info!("gpu-pv/Operational: vm {vm}: buffer {handle} registered for zero-copy: guest {gpa:#x}+{len:#x}");
            Some(handle)
        }
        Err(BufferError::Mediator(e)) => {
            warn!(vm = vm;
                "gpu-pv/Debug: vm {vm}: GPU_REGISTER_BUFFER of {len:#x} bytes refused: over its hypervisor memory budget ({e:?})"
            );
            drain_events(s);
            None
        }
        Err(_) => None,
    }
}

/// Unregisters buffer `handle` of `vm` (hypercall GPU_UNREGISTER_BUFFER).
fn unregister_buffer(vm: VmId, handle: u64) -> bool {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return false };
    let Some(hpa) = s.disp.unregister_buffer(vm, handle) else {
        return false;
    };
    iommu_apply(s);
    // The GPU's IOVA of a granted page is its host-physical address.
    let reach = s
        .domain
        .map(|d| crate::iommu::translate(d, hpa.get()).is_some());
    info!(
        "gpu-pv/Operational: vm {vm}: buffer {handle} unregistered; GPU still reaches its first page (another grant holds it): {reach:?}"
    );
    true
}

/// The VM is being destroyed: its channel is reset (work dropped, resources freed,
/// mappings removed) and its memory is no longer reachable. It stays on the GPU
/// schedule until its cleanup (scanouts blanked, host resources unref'd) ran, or its
/// last frame stays on the head and its resources on the device.
fn remove_vm(vm: VmId) {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return };
    s.links.remove(&vm);
    if s.memory.remove(&vm).is_some() {
        if let Ok(r) = s.disp.remove_vm(vm, now_ns()) {
            info!(
                "gpu-pv: vm {vm} gone: {} commands dropped, {} resources released",
                r.dropped, r.released
            );
        }
    }
    drain_events(s);
}

/// The driver wrote DRIVER_OK.
fn start(vm: VmId, control: QueueLayout, cursor: QueueLayout) -> bool {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return false };
    let r = s.disp.mediator_mut().start_queues(vm, control, cursor);
    if let Err(e) = &r {
        warn!("gpu-pv: vm {vm}: cannot start its queues: {e:?}");
    }
    drain_events(s);
    r.is_ok()
}

/// The driver reset the device: its cleanup is scheduled now, not at the driver's
/// next kick.
fn driver_reset(vm: VmId) {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return };
    let _ = s.disp.driver_reset(vm, now_ns());
    after_guest_work(s);
}

/// The driver set a queue's (or the config) MSI-X entry.
fn set_vector(vm: VmId, queue: Option<QueueId>, entry: u16) {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return };
    let m = s.disp.mediator_mut();
    let _ = match queue {
        Some(q) => m.set_vector(vm, q, entry),
        None => m.set_config_vector(vm, entry),
    };
}

/// A doorbell: the VM notified `queue`. Never waits for the mediator: when another
/// CPU holds it, the doorbell is marked pending and served by that CPU's bottom half.
fn doorbell(vm: VmId, link: &Link, queue: QueueId) {
    let Some(mut g) = try_lock() else {
        link.pending_doorbells
            .fetch_or(1 << queue.index(), Ordering::AcqRel);
        return;
    };
    let Some(s) = g.as_mut() else { return };
    let Some(mut mem) = s.memory.get(&vm).copied() else {
        return;
    };
    let now = now_ns();
    s.disp.doorbell(vm, queue, &mut mem, now);
    after_guest_work(s);
    // An idle GPU takes the work at once rather than at the next slice boundary.
    s.disp.schedule(now);
}

/// `vm`'s vCPU starts a slice on this CPU (`takes_interrupts`: it is vCPU 0): its
/// queues are served now and polled until [`slice_end`], with the guest's kicks
/// suppressed.
fn slice_begin(vm: VmId, link: &Link, takes_interrupts: bool) {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return };
    let Some(mut mem) = s.memory.get(&vm).copied() else {
        return;
    };
    link.in_slice.store(true, Ordering::Release);
    if takes_interrupts {
        link.running_on
            .store(crate::arch::cpu::current_index() + 1, Ordering::Release);
    }
    let now = now_ns();
    let _ = s.disp.mediator_mut().set_polled(vm, true, &mut mem);
    s.disp.poll(vm, &mut mem, now);
    after_guest_work(s);
    s.disp.schedule(now);
}

/// `vm`'s vCPU stopped running: what it queued is served, and the guest is asked
/// to kick again (nobody polls a VM that does not run).
fn slice_end(vm: VmId, link: &Link) {
    link.in_slice.store(false, Ordering::Release);
    link.running_on.store(0, Ordering::Release);
    let mut g = lock();
    let Some(s) = g.as_mut() else { return };
    let Some(mut mem) = s.memory.get(&vm).copied() else {
        return;
    };
    let now = now_ns();
    let _ = s.disp.mediator_mut().set_polled(vm, false, &mut mem);
    s.disp.guest_work(vm, now);
    after_guest_work(s);
    s.disp.schedule(now);
}

/// Whether the VM's device shows DEVICE_NEEDS_RESET.
fn needs_reset(vm: VmId) -> bool {
    GPUPV
        .lock()
        .as_ref()
        .and_then(|s| s.disp.mediator().device_status(vm))
        .is_some_and(|b| b & virtio_pci::status::DEVICE_NEEDS_RESET != 0)
}

/// Whether `vm` has GPU commands taken from its rings and not yet answered (so a
/// completion, and its interrupt, are coming).
fn has_work(vm: VmId) -> bool {
    GPUPV
        .lock()
        .as_ref()
        .and_then(|s| s.disp.mediator().vm(vm))
        .is_some_and(|v| v.unanswered() > 0)
}

/// The driver reset queue `queue` of `vm` alone (`VIRTIO_F_RING_RESET`): the
/// mediator drops the chains it took from that queue and had not answered (no
/// response, no used entry; commands already validated still run as the mediator's
/// own and their completions are applied without reaching the guest). Logged with
/// the number of chains dropped; a refusal (context not live) is logged too.
fn reset_queue(vm: VmId, queue: QueueId) {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return };
    match s.disp.mediator_mut().reset_queue(vm, queue) {
        Ok(dropped) => info!(
            "gpu-pv: vm {vm}: {queue:?} queue reset by the driver (RING_RESET): {dropped} chains dropped unanswered"
        ),
        Err(e) => warn!("gpu-pv: vm {vm}: {queue:?} queue reset refused: {e:?}"),
    }
    drain_events(s);
}

/// The driver re-enabled `queue` of `vm` after a queue reset, at `layout`: the
/// mediator serves it again from index 0. Returns false (logged) when the mediator
/// refuses (bad layout, queue not reset, context not live): the device then needs a
/// reset.
fn restart_queue(vm: VmId, queue: QueueId, layout: QueueLayout) -> bool {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return false };
    let r = s.disp.mediator_mut().restart_queue(vm, queue, layout);
    match &r {
        Ok(()) => info!(
            "gpu-pv: vm {vm}: {queue:?} queue re-enabled after its reset: {} entries, desc {:#x} avail {:#x} used {:#x}",
            layout.size, layout.desc, layout.avail, layout.used
        ),
        Err(e) => warn!("gpu-pv: vm {vm}: cannot restart its {queue:?} queue: {e:?}"),
    }
    drain_events(s);
    r.is_ok()
}
