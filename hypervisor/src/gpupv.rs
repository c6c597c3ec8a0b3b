//! The `gpu-pv` dispatcher running in the kernel: this module gives it guest memory,
//! time, interrupts and the physical GPU, and keeps only what needs the hardware.
//!
//! The scheduling, batching, completion routing, watchdog resets, page grants and
//! zero-copy buffers are `gpu_pv::dispatch::Dispatcher`'s, the same code the host
//! tests and the simulation run. Here:
//!
//! - [`PhysicalGpu`] is the physical GPU as the dispatcher sees it: the backend's ring,
//!   the copies into a shared head's composite, and the notifications, rung only
//!   after the lock is released.
//! - Doorbells (notify writes) and polls during a VM's slice hand the VM's virtqueues
//!   to the dispatcher ([`doorbell`], [`slice_begin`]). [`service`] is the bottom
//!   half, run between vCPU slices on every CPU: completions, the watchdog, the next
//!   batch; the resulting virtual interrupts go to per-VM mailboxes (the VM injects
//!   them on its next entry, coalesced).
//! - The grants' changes go into the GPU's IOMMU domain before the lock is released
//!   ([`iommu_apply`]), so an unmapped page is unreachable before anything else can
//!   happen.
//! - What a VM makes the hypervisor keep is charged to its memory budget (see
//!   `gpu_pv::budget`): the mediator's records, the zero-copy buffer and page-grant
//!   records, and with the simulated GPU its resources' pixels, which live in frames
//!   of their own rather than on the shared heap. Every budget is reserved at boot
//!   (`main.rs`), so a VM at its limit gets errors and nobody else is short.
//!
//! Lock order: a VM's lock, then this module's. [`service`] takes only this one.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use gpu_pv::budget::DEFAULT_BUDGET;
use gpu_pv::command;
use gpu_pv::dispatch::{BufferError, DispatchConfig, DispatchEvent, Dispatcher, Gpu};
use gpu_pv::mediator::{
    Channel, EventKind, HostCommand, Mediator, MediatorConfig, QueueId, ScanoutConfig, VmConfig,
};
use gpu_pv::memory::{check_range, GuestMemory, MemError};
use gpu_pv::ring::QueueLayout;
use gpu_pv::sched::{Mode, SchedConfig, Scheduler, VmId, VmParams};
use spin::Mutex;

use crate::event_log::{self, Source};
use crate::gpu::{DmaRegion, GpuBackend, GpuError};
use crate::iommu::DomainId;
use crate::mm::phys_to_ptr;
use crate::pci::Bdf;

pub use gpu_pv::dispatch::Figures;

// Lines logged while the GPU-PV lock is held are deferred (crate::event_log): printed
// after the lock is released ([`Held`]'s drop), charged to the VM that caused them.
macro_rules! warn {
    (vm = $vm:expr; $($t:tt)*) => {
        event_log::defer(Source::Vm($vm), log::Level::Warn, format_args!($($t)*))
    };
    ($($t:tt)*) => {
        event_log::defer(current_source(), log::Level::Warn, format_args!($($t)*))
    };
}
macro_rules! info {
    (vm = $vm:expr; $($t:tt)*) => {
        event_log::defer(Source::Vm($vm), log::Level::Info, format_args!($($t)*))
    };
    ($($t:tt)*) => {
        event_log::defer(current_source(), log::Level::Info, format_args!($($t)*))
    };
}

/// The VM this CPU works for now (its exit handler), else the host.
fn current_source() -> Source {
    crate::vm_context::current().map_or(Source::Host, Source::Vm)
}

/// Commands handed to the physical ring per batch.
pub const MAX_BATCH: usize = 32;

/// A VM's RAM as the mediator sees it: guest-physical `[0, size)` at host `base`,
/// all owned by the VM.
#[derive(Clone, Copy, Debug)]
pub struct VmMemory {
    /// Host-physical base.
    pub base: u64,
    /// Bytes.
    pub size: u64,
}

impl GuestMemory for VmMemory {
    fn translate(&self, gpa: u64, len: u64) -> Result<u64, MemError> {
        check_range(gpa, len, 0, self.size)?;
        Ok(self.base + gpa)
    }
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), MemError> {
        let hpa = self.translate(gpa, out.len() as u64)?;
        // SAFETY: inside the VM's RAM, which the hypervisor owns (identity mapped) for
        // as long as the VM is registered here.
        unsafe { crate::mm::read_shared(hpa, out) };
        Ok(())
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let hpa = self.translate(gpa, data.len() as u64)?;
        // SAFETY: as in `read`.
        unsafe { crate::mm::write_shared(hpa, data) };
        Ok(())
    }
}

/// The physical GPU as the dispatcher sees it.
pub struct PhysicalGpu {
    backend: Box<dyn GpuBackend>,
    /// The shared heads' composite resources: host id -> their memory.
    composites: BTreeMap<u32, DmaRegion>,
    /// Device notifications for what was submitted, made once the lock is released.
    doorbells: crate::gpu::Doorbells,
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

/// How long past its slice a batch may stay out before it is parked and the GPU
/// goes on with the other VMs (the watchdog, much longer, decides on a reset).
const OVERDUE_NS: u64 = 100_000_000;

/// First guess of the GPU time of one command, before any was measured.
const FIRST_COST_NS: u64 = 100_000;

struct GpuPv {
    disp: Dispatcher<PhysicalGpu>,
    /// The GPU's IOMMU domain, when the IOMMU translates its DMA.
    domain: Option<DomainId>,
    /// The memory of each VM with a paravirtual GPU.
    memory: BTreeMap<VmId, VmMemory>,
    /// What each VM's [`GpuPort`] shares with this side.
    links: BTreeMap<VmId, Arc<Link>>,
    scanouts: Vec<(u32, u32)>,
    /// VM names, for samples.
    names: BTreeMap<VmId, alloc::string::String>,
    /// Time and per-VM GPU time used at the previous sample.
    last_sample: (u64, BTreeMap<VmId, u64>),
    /// Each VM's hypervisor memory budget in bytes, by VM id (reserved at boot).
    budgets: Vec<u64>,
    /// Whether "every VM has reached the GPU" was announced.
    all_reached: bool,
    /// VMs per physical head (more than one: heads are shared in bands).
    per_head: u32,
}

/// Completions every VM must have before the glue announces that all of them reach
/// the GPU (a causal trigger for tests that look at every VM's display).
pub const REACHED_COMPLETIONS: u64 = 20;

/// What a VM's [`GpuPort`] shares with the GPU side, without the GPU-PV lock.
#[derive(Debug, Default)]
struct Link {
    /// Virtual interrupts to raise: bit i = MSI-X entry i (coalesced).
    mailbox: AtomicU64,
    /// Doorbells rung while the lock was busy (bit = queue index), served by the
    /// next [`service`] on any CPU.
    pending_doorbells: AtomicU64,
    /// Its vCPU runs now: its queues are polled (by the bottom half on idle CPUs,
    /// and at its own exits), and the guest is asked not to kick.
    in_slice: AtomicBool,
    /// 1 + the CPU running its vCPU 0 (which takes the GPU's virtual interrupts), 0
    /// when it does not run. A CPU that posts an interrupt for it sends that CPU a
    /// wake IPI, so the guest exits and takes it at once.
    running_on: AtomicUsize,
}

/// A VM's port to the shared GPU, from [`add_vm`]: its device's events, doorbells,
/// slices and interrupts go through it. Dropping it takes the VM off the GPU: its
/// channel is reset (work dropped, resources freed, mappings removed) and its
/// memory is no longer reachable; it stays on the GPU schedule until its cleanup
/// (scanouts blanked, host resources unref'd) ran.
#[derive(Debug)]
pub struct GpuPort {
    vm: VmId,
    link: Arc<Link>,
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
    pub fn register_buffer(&self, gpa: u64, len: u64) -> Option<u64> {
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

/// The figures measured for `vm`.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn figures(vm: VmId) -> Option<Figures> {
    GPUPV.lock().as_ref().and_then(|s| s.disp.figures(vm))
}

/// Starts a new measurement of every VM's longest slice (after a warm-up).
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn reset_longest_slices() {
    if let Some(s) = GPUPV.lock().as_mut() {
        s.disp.reset_longest_slices();
    }
}

static GPUPV: Mutex<Option<GpuPv>> = Mutex::new(None);

/// Longest time the GPU-PV lock was held (TSC cycles) and the line that took it.
static LONGEST_HOLD: AtomicU64 = AtomicU64::new(0);
static LONGEST_HOLD_LINE: AtomicU64 = AtomicU64::new(0);
/// Longest notify of the physical GPU (TSC cycles), made after the lock is released:
/// under QEMU it takes the emulator's global lock, which the GPU's own command
/// processing holds.
static LONGEST_KICK: AtomicU64 = AtomicU64::new(0);

/// The GPU-PV lock, held: measures how long, and prints the deferred log lines once
/// it is released.
struct Held {
    guard: Option<spin::MutexGuard<'static, Option<GpuPv>>>,
    since: u64,
    line: u32,
}

impl core::ops::Deref for Held {
    type Target = Option<GpuPv>;
    fn deref(&self) -> &Option<GpuPv> {
        self.guard.as_deref().unwrap_or(&None)
    }
}

impl core::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Option<GpuPv> {
        match self.guard.as_deref_mut() {
            Some(g) => g,
            // The guard lives until drop; never reached.
            None => unreachable!("GPU-PV lock used after release"),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Whatever path changed grants, the IOMMU matches them before anyone else
        // gets the lock.
        let mut bells = crate::gpu::Doorbells::default();
        if let Some(s) = self.guard.as_deref_mut().and_then(Option::as_mut) {
            iommu_apply(s);
            bells = core::mem::take(&mut s.disp.gpu_mut().doorbells);
        }
        drop(self.guard.take());
        let released = crate::arch::cpu::rdtsc();
        let held = released.wrapping_sub(self.since);
        if LONGEST_HOLD.fetch_max(held, Ordering::Relaxed) < held {
            LONGEST_HOLD_LINE.store(u64::from(self.line), Ordering::Relaxed);
        }
        // The GPU is told about new commands only now, outside the lock.
        bells.ring();
        LONGEST_KICK.fetch_max(
            crate::arch::cpu::rdtsc().wrapping_sub(released),
            Ordering::Relaxed,
        );
        event_log::flush();
    }
}

#[track_caller]
fn lock() -> Held {
    let guard = GPUPV.lock();
    Held {
        guard: Some(guard),
        since: crate::arch::cpu::rdtsc(),
        line: core::panic::Location::caller().line(),
    }
}

#[track_caller]
fn try_lock() -> Option<Held> {
    let guard = GPUPV.try_lock()?;
    Some(Held {
        guard: Some(guard),
        since: crate::arch::cpu::rdtsc(),
        line: core::panic::Location::caller().line(),
    })
}

/// The longest hold of the GPU-PV lock so far (µs), the source line that took it, and
/// the longest GPU notify made under it (µs); `reset` starts a new measurement.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn longest_lock_hold(reset: bool) -> (u64, u32, u64) {
    let per_us = (crate::apic::tsc_per_ms() / 1000).max(1);
    let r = (
        LONGEST_HOLD.load(Ordering::Relaxed) / per_us,
        LONGEST_HOLD_LINE.load(Ordering::Relaxed) as u32,
        LONGEST_KICK.load(Ordering::Relaxed) / per_us,
    );
    if reset {
        LONGEST_HOLD.store(0, Ordering::Relaxed);
        LONGEST_KICK.store(0, Ordering::Relaxed);
    }
    r
}
fn now_ns() -> u64 {
    crate::apic::now_us() * 1000
}

/// Display size a VM gets on a physical head that reports no display of its own.
pub const DEFAULT_DISPLAY: (u32, u32) = (640, 480);

/// Starts the mediator over `backend` with the GPU quantum and mode from the config.
/// `gpu` is the physical GPU's PCI function: with an IOMMU, it gets a domain of its
/// own in which only the backend's own memory and the guest pages the mediator
/// granted are mapped. `budgets` holds each VM's hypervisor memory budget in bytes
/// (by VM id); `vram_in_hv_memory` says the backend keeps its resources' pixels in
/// hypervisor memory (the simulated GPU), which the VMs' budgets then pay for.
pub fn init(
    mut backend: Box<dyn GpuBackend>,
    gpu: Option<Bdf>,
    quantum_us: u32,
    mode: u32,
    vram_total: u64,
    budgets: Vec<u64>,
    vram_in_hv_memory: bool,
) {
    let vms = budgets.len();
    let scanouts: Vec<(u32, u32)> = backend
        .scanouts()
        .iter()
        .map(|&(w, h)| {
            if w == 0 || h == 0 {
                DEFAULT_DISPLAY
            } else {
                (w.min(DEFAULT_DISPLAY.0), h.min(DEFAULT_DISPLAY.1))
            }
        })
        .collect();
    let domain = match gpu {
        Some(bdf) if crate::iommu::translating() => {
            match crate::iommu::attach(bdf) {
                Ok(d) => {
                    for (addr, len) in backend.dma_regions() {
                        if let Err(e) = crate::iommu::map(d, addr, addr, len, true) {
                            log::warn!("gpu-pv: cannot map the GPU driver's memory {addr:#x}+{len:#x}: {e:?}");
                        }
                    }
                    log::info!("gpu-pv: GPU {bdf} isolated in IOMMU domain {}: only granted pages are reachable", d.0);
                    Some(d)
                }
                Err(e) => {
                    log::warn!("gpu-pv: GPU {bdf} not attached to the IOMMU ({e:?}): its DMA is not isolated");
                    None
                }
            }
        }
        _ => None,
    };
    // More VMs than heads: heads are shared, `per_head` VMs stacked in bands of a
    // composite resource each (see `gpu_pv::mediator::Band`).
    let heads = scanouts.len();
    let per_head = if heads > 0 && vms > heads {
        vms.div_ceil(heads) as u32
    } else {
        1
    };
    let mut composites = BTreeMap::new();
    if per_head > 1 {
        let used = vms.div_ceil(per_head as usize);
        for (head, &size) in scanouts.iter().enumerate().take(used) {
            match make_composite(backend.as_mut(), domain, head as u32, size, per_head) {
                Ok((id, region)) => {
                    composites.insert(id, region);
                }
                Err(why) => log::warn!("gpu-pv: head {head}: no shared display: {why}"),
            }
        }
        log::info!(
            "gpu-pv: {vms} VMs on {heads} heads: {per_head} VMs per head, each in a band of the head's composite ({} heads set up)",
            composites.len()
        );
    }
    let cfg = SchedConfig {
        mode: match boot_info::config::SchedMode::from_code(mode) {
            Some(boot_info::config::SchedMode::EqualShare) => Mode::EqualShare,
            Some(boot_info::config::SchedMode::FixedShare) => Mode::FixedShare,
            Some(boot_info::config::SchedMode::BestEffort) | None => Mode::BestEffort,
        },
        base_quantum_ns: u64::from(quantum_us.clamp(1000, 10_000)) * 1000,
        adaptive: false,
    };
    let sched = match Scheduler::new(cfg) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("gpu-pv: scheduler config refused ({e:?}); GPU sharing disabled");
            return;
        }
    };
    log::info!(
        "gpu-pv: mediator on {} with {} scanouts, quantum {} us, {:?}",
        backend.name(),
        scanouts.len(),
        cfg.base_quantum_ns / 1000,
        cfg.mode
    );
    let config = MediatorConfig {
        vram_in_hv_memory,
        ..MediatorConfig::new(vram_total, scanouts.len() as u32)
    };
    let port = PhysicalGpu {
        backend,
        composites,
        doorbells: crate::gpu::Doorbells::default(),
    };
    let dispatch = DispatchConfig {
        max_batch: MAX_BATCH,
        overdue_ns: OVERDUE_NS,
        first_cost_ns: FIRST_COST_NS,
    };
    *lock() = Some(GpuPv {
        disp: Dispatcher::new(Mediator::new(config), sched, port, dispatch),
        domain,
        memory: BTreeMap::new(),
        links: BTreeMap::new(),
        scanouts,
        names: BTreeMap::new(),
        last_sample: (now_ns(), BTreeMap::new()),
        budgets,
        all_reached: false,
        per_head,
    });
}

/// Sets up head `head` (display `w` x `h`) to show `bands` VMs stacked: a composite
/// resource `w` x `bands * h` in hypervisor memory (reachable by the GPU), attached
/// and set on the head, shown black. Returns its host id and memory.
fn make_composite(
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
                    phys_to_ptr::<u8>(src),
                    phys_to_ptr::<u8>(dst),
                    c.len as usize,
                )
            },
            // SAFETY: inside the composite, as above.
            None => unsafe { core::ptr::write_bytes(phys_to_ptr::<u8>(dst), 0, c.len as usize) },
        }
    }
}

/// Gives VM `vm` a paravirtual GPU on physical scanout `vm` (if there is one):
/// returns its port, through which everything else goes.
pub fn add_vm(
    vm: VmId,
    name: &str,
    mem: VmMemory,
    weight: u32,
    alpha_tenths: u32,
    quota_mib: u32,
) -> Option<GpuPort> {
    let mut g = lock();
    let s = g.as_mut()?;
    s.names.insert(vm, alloc::string::String::from(name));
    let per_head = s.per_head;
    let head = u32::from(vm) / per_head;
    let (w, h) = *s.scanouts.get(head as usize)?;
    let composite = gpu_pv::mediator::RESERVED_HOST_IDS + head;
    if per_head > 1 && !s.disp.gpu().composites.contains_key(&composite) {
        return None;
    }
    if s.disp.mediator().vm(vm).is_none() {
        let mut cfg = VmConfig::new(alloc::vec![ScanoutConfig {
            physical: head,
            width: w,
            height: h
        }]);
        if per_head > 1 {
            cfg.bands = alloc::vec![gpu_pv::mediator::Band {
                scanout: 0,
                index: u32::from(vm) % per_head,
                count: per_head,
                host_resource: composite,
            }];
        }
        cfg.vram_quota = (quota_mib != 0).then_some(u64::from(quota_mib) << 20);
        cfg.hv_memory = s
            .budgets
            .get(usize::from(vm))
            .copied()
            .unwrap_or(DEFAULT_BUDGET);
        if let Err(e) = s.disp.mediator_mut().add_vm(vm, cfg) {
            warn!("gpu-pv: vm {vm}: no GPU: {e:?}");
            return None;
        }
        let p = VmParams {
            weight: if cfg!(feature = "test-broken-gpu-weights") {
                1
            } else {
                weight.clamp(1, 1000)
            },
            alpha_tenths: alpha_tenths.min(20) as u8,
        };
        if let Err(e) = s.disp.sched_mut().add_vm(vm, p) {
            warn!("gpu-pv: vm {vm}: not scheduled: {e:?}");
        }
    }
    let link = Arc::new(Link::default());
    s.memory.insert(vm, mem);
    s.links.insert(vm, link.clone());
    drain_events(s);
    Some(GpuPort { vm, link })
}

/// Zero-copy buffer exchange (hypercall GPU_REGISTER_BUFFER): the VM names a
/// page-aligned range of its RAM; after the validity and ownership checks it is
/// registered in the GPU's IOMMU domain until unregistered or the VM goes. Returns
/// the handle, or `None` when a check fails.
fn register_buffer(vm: VmId, gpa: u64, len: u64) -> Option<u64> {
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
    let reach = s.domain.map(|d| crate::iommu::translate(d, hpa).is_some());
    info!(
        "gpu-pv/Operational: vm {vm}: buffer {handle} unregistered; GPU still reaches its first page (another grant holds it): {reach:?}"
    );
    true
}

/// Whether `[hpa, hpa+len)` is reachable by the GPU now (for tests).
pub fn gpu_can_reach(hpa: u64) -> Option<bool> {
    let g = lock();
    let d = g.as_ref()?.domain?;
    Some(crate::iommu::translate(d, hpa).is_some())
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

/// Applies the grants' changes to the GPU's IOMMU domain in one update (runs of
/// adjacent pages, one IOTLB invalidation for the lot). Called before the GPU lock
/// is released by every path that changes grants. Without an IOMMU the mediator's
/// own checks are the only guard.
fn iommu_apply(s: &mut GpuPv) {
    let changes = s.disp.grants_mut().take_changes();
    let Some(d) = s.domain else { return };
    if changes.is_empty() {
        return;
    }
    if let Err(e) = crate::iommu::update(d, &changes.map, &changes.unmap) {
        warn!(
            "gpu-pv/Debug: IOMMU update ({} map runs, {} unmap runs) failed: {e:?}",
            changes.map.len(),
            changes.unmap.len()
        );
    }
}

/// The driver wrote DRIVER_OK.
fn start(vm: VmId, control: QueueLayout, cursor: QueueLayout) -> bool {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return false };
    let r = s.disp.start_queues(vm, control, cursor);
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

/// After guest work: interrupts to the mailboxes, events to the log.
fn after_guest_work(s: &mut GpuPv) {
    collect_interrupts(s);
    drain_events(s);
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

fn collect_interrupts(s: &mut GpuPv) {
    for (vm, entry) in s.disp.take_interrupts() {
        let Some(link) = s.links.get(&vm) else {
            continue;
        };
        if entry < 64 {
            let before = link.mailbox.fetch_or(1u64 << entry, Ordering::AcqRel);
            let on = link.running_on.load(Ordering::Acquire);
            if before == 0 && on != 0 {
                crate::interrupts::wake_cpu(on - 1);
            }
        }
    }
}

/// Logs the mediator's and the dispatcher's events (deferred until the lock is
/// released) and brings the IOMMU in line with the grants.
fn drain_events(s: &mut GpuPv) {
    for e in s.disp.mediator_mut().take_events() {
        let ch = match e.channel {
            Channel::Operational => "Operational",
            Channel::Debug => "Debug",
        };
        match &e.kind {
            EventKind::Rejected {
                reason,
                cmd_type,
                response,
                ..
            } => warn!(vm = e.vm;
                "gpu-pv/{ch}: vm {}: command {cmd_type:#x} rejected: {} (answered {response:#x})",
                e.vm,
                reason.as_str()
            ),
            EventKind::DmaFault { gpa, len, error } => {
                warn!(vm = e.vm;
                    "gpu-pv/{ch}: vm {}: DMA fault: {len} bytes at guest {gpa:#x}: {error:?}",
                    e.vm
                )
            }
            EventKind::RingFault { .. }
            | EventKind::OverBudget { .. }
            | EventKind::CommandTimeout { .. }
            | EventKind::HostError { .. }
            | EventKind::StaleCompletion { .. } => {
                warn!(vm = e.vm; "gpu-pv/{ch}: vm {}: {:?}", e.vm, e.kind)
            }
            k => info!(vm = e.vm; "gpu-pv/{ch}: vm {}: {:?}", e.vm, k),
        }
    }
    for e in s.disp.take_events() {
        match e {
            DispatchEvent::SliceClosed { .. } => {}
            DispatchEvent::Parked {
                vm,
                on_gpu_ns,
                outstanding,
            } => warn!(vm = vm;
                "gpu-pv/Debug: vm {vm}: batch overdue ({} us on the GPU, {outstanding} commands outstanding): parked, the GPU goes on with the others",
                on_gpu_ns / 1000
            ),
            DispatchEvent::Refused {
                vm,
                requeued,
                error,
            } => warn!(vm = vm;
                "gpu-pv/Debug: vm {vm}: physical submit refused ({error:?}): {requeued} commands requeued"
            ),
            DispatchEvent::HungReset { vm, dropped } => warn!(vm = vm;
                "gpu-pv/Debug: vm {vm}: channel hung, reset: {dropped} commands dropped"
            ),
            DispatchEvent::CleanupRan { vm } => {
                info!(vm = vm; "gpu-pv: vm {vm}: its cleanup after the reset ran on the GPU")
            }
        }
    }
    s.disp.sync_grants();
    iommu_apply(s);
}

/// Commands staged in the mediator, over all VMs.
fn staged(s: &GpuPv) -> usize {
    let m = s.disp.mediator();
    m.vm_ids()
        .filter_map(|vm| m.vm(vm).map(|v| v.staged_len()))
        .sum()
}

/// The bottom half: pending doorbells, polls of running VMs, then the dispatcher's
/// completions, watchdog and schedule. Cheap when there is nothing to do; never
/// waits for the lock. Returns whether it moved any work (commands taken from a
/// guest, completions, a batch submitted), so an idle CPU can keep polling while
/// work flows.
pub fn service() -> bool {
    let Some(mut g) = try_lock() else {
        return false;
    };
    let Some(s) = g.as_mut() else { return false };
    let staged_before = staged(s);
    let now = now_ns();
    let GpuPv {
        disp,
        links,
        memory,
        ..
    } = s;
    for (&vm, link) in links.iter() {
        let Some(mut mem) = memory.get(&vm).copied() else {
            continue;
        };
        // Doorbells rung while another CPU held the lock.
        let bits = link.pending_doorbells.swap(0, Ordering::AcqRel);
        for q in QueueId::ALL {
            if bits & (1 << q.index()) != 0 {
                disp.doorbell(vm, q, &mut mem, now);
            }
        }
        // Polling: the queues of every VM that is running now.
        if link.in_slice.load(Ordering::Acquire)
            && disp.mediator().vm(vm).is_some_and(|v| v.polled())
        {
            disp.poll(vm, &mut mem, now);
        }
    }
    let done = s.disp.service(&mut s.memory, now);
    for &vm in &done.hung {
        crate::inject::channel_reset(vm);
    }
    collect_interrupts(s);
    drain_events(s);
    if !s.all_reached
        && !s.memory.is_empty()
        && s.memory.keys().all(|&vm| {
            s.disp
                .figures(vm)
                .is_some_and(|f| f.completed >= REACHED_COMPLETIONS)
        })
    {
        s.all_reached = true;
        info!(
            "gpu-pv: all {} VMs reach the GPU ({REACHED_COMPLETIONS} or more commands completed each)",
            s.memory.len()
        );
    }
    done.harvested || done.submitted || staged(s) != staged_before
}

/// Writes the counters of every VM and the GPU as JSON to the serial console (built
/// under the GPU-PV lock, printed after it).
pub fn dump_counters() {
    let mut out = alloc::string::String::new();
    let mut memory = Vec::new();
    {
        let g = lock();
        let Some(s) = g.as_ref() else { return };
        let elapsed = now_ns();
        let m = s.disp.mediator();
        let _ = m.counters().write_json(&mut out, elapsed, MAX_BATCH as u64);
        for id in m.vm_ids() {
            if let Some(v) = m.vm(id).map(|v| *v.memory()) {
                memory.push((id, v));
            }
        }
    }
    crate::println!("gpu-pv counters: {out}");
    for (id, m) in memory {
        crate::println!(
            "gpu-pv: vm {id}: hv memory {} KiB in use (peak {} KiB) of {} KiB",
            m.used() / 1024,
            m.peak() / 1024,
            m.limit() / 1024
        );
    }
}

/// Prints one `gpu-pv sample:` line: per-VM GPU utilization since the previous
/// sample, completed operations and bytes copied (for the harness's plot).
pub fn sample() {
    let Some(mut g) = try_lock() else {
        return;
    };
    let Some(s) = g.as_mut() else { return };
    let now = now_ns();
    let window = now.saturating_sub(s.last_sample.0).max(1);
    let mut line = alloc::format!("{{\"t_ms\":{},\"vms\":[", now / 1_000_000);
    let mut first = true;
    let mut used_now = BTreeMap::new();
    for (id, c) in s.disp.mediator().counters().vms() {
        let before = s.last_sample.1.get(&id).copied().unwrap_or(0);
        let util_ppm = c.used_ns.saturating_sub(before).saturating_mul(1_000_000) / window;
        used_now.insert(id, c.used_ns);
        let name = s.names.get(&id).map_or("?", |n| n.as_str());
        if !first {
            line.push(',');
        }
        first = false;
        line.push_str(&alloc::format!(
            "{{\"vm\":{id},\"name\":\"{name}\",\"util_ppm\":{},\"completed\":{},\"bytes\":{}}}",
            util_ppm.min(1_000_000),
            c.ops_completed,
            c.bytes_copied
        ));
    }
    line.push_str("]}");
    s.last_sample = (now, used_now);
    drop(g);
    crate::println!("gpu-pv sample: {line}");
}

/// Frames the GPU's IOMMU page tables use now (they grow with zero-copy mappings and
/// are kept, empty, until the GPU is detached).
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn iommu_table_frames() -> usize {
    let g = lock();
    g.as_ref()
        .and_then(|s| s.domain)
        .and_then(crate::iommu::table_frames)
        .unwrap_or(0)
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
