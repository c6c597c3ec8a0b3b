//! The `gpu-pv` mediator running in the kernel: it gets guest memory, time and
//! interrupts from here, and its validated batches go to the physical GPU on the
//! GPU time-slice schedule.
//!
//! - Doorbells (notify writes) and polls during a VM's slice hand the VM's virtqueues
//!   to the mediator ([`doorbell`], [`poll`]).
//! - [`service`] is the bottom half, run between vCPU slices on every CPU: it harvests
//!   physical completions, hands them to the mediator (which writes responses and
//!   signals shadow fences), queues the resulting virtual interrupts in per-VM
//!   mailboxes (the VM injects them on its next entry, coalesced), applies IOMMU
//!   changes, logs the Operational/Debug events, runs the watchdog, and lets the
//!   scheduler pick whose batch goes to the GPU next.
//! - A batch is never larger than the physical ring's free slots; a command the
//!   ring refuses all the same goes back to the mediator with the rest of its batch
//!   and is sent again later. It is never answered as failed: the device did not
//!   run it, and an `UNREF` taken as done would free a host id the device still
//!   uses, for another VM's `CREATE` to get.
//!
//! - What a VM makes the hypervisor keep is charged to its memory budget (see
//!   `gpu_pv::budget`): the mediator's records, this module's zero-copy buffer and
//!   page-grant records, and with the simulated GPU its resources' pixels, which
//!   live in frames of their own rather than on the shared heap. Every budget is
//!   reserved at boot (`main.rs`), so a VM at its limit gets errors and nobody else
//!   is short.
//!
//! Lock order: a VM's lock, then this module's. [`service`] takes only this one.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use gpu_pv::budget::{cost, DEFAULT_BUDGET};
use gpu_pv::command;
use gpu_pv::mediator::{
    Batch, Channel, Completion, EventKind, IommuOp, Mediator, MediatorConfig, QueueId,
    ScanoutConfig, VmConfig,
};
use gpu_pv::memory::{check_range, GuestMemory, MemError};
use gpu_pv::ring::QueueLayout;
use gpu_pv::sched::{Mode, SchedConfig, Scheduler, Slice, VmId, VmParams};
use gpu_pv::sim_gpu::{CostModel, PixelBuf, SimGpu, SimGpuConfig};
use spin::Mutex;

use crate::event_log::{self, Source};
use crate::gpu::{GpuBackend, GpuError};
use crate::iommu::DomainId;
use crate::mm::phys_to_ptr;
use crate::pci::Bdf;

/// Most VMs with a paravirtual GPU.
pub const MAX_GPU_VMS: usize = 64;
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

/// A CPU-rendered GPU (the `gpu-pv` simulated GPU over host memory): the backend for
/// machines without a supported GPU, e.g. Bochs.
pub struct SimBackend {
    gpu: SimGpu,
    done: Vec<(u64, u32)>,
    host: HostMemory,
    sizes: Vec<(u32, u32)>,
}

/// All RAM below `top`, for the simulated GPU's DMA.
#[derive(Clone, Copy)]
struct HostMemory {
    top: u64,
}

impl GuestMemory for HostMemory {
    fn translate(&self, gpa: u64, len: u64) -> Result<u64, MemError> {
        check_range(gpa, len, 0x10_0000, self.top - 0x10_0000)?;
        Ok(gpa)
    }
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), MemError> {
        self.translate(gpa, out.len() as u64)?;
        // SAFETY: RAM below the top of memory, identity mapped; the mediator only
        // hands the GPU addresses of pages it validated as the VM's own.
        unsafe { crate::mm::read_shared(gpa, out) };
        Ok(())
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.translate(gpa, data.len() as u64)?;
        // SAFETY: as in `read`.
        unsafe { crate::mm::write_shared(gpa, data) };
        Ok(())
    }
}

/// A simulated-GPU resource's pixels in frames of their own, not on the shared
/// heap (the mediator charges them to the VM that made the resource).
#[derive(Debug)]
struct FramePixels {
    /// Owns the frames (freed and scrubbed on drop).
    _region: crate::gpu::DmaRegion,
    /// Where the frames are mapped (identity), as an address.
    at: usize,
    /// Pixels.
    len: usize,
}

impl PixelBuf for FramePixels {
    fn pixels(&self) -> &[u32] {
        // SAFETY: the region holds at least `len * 4` bytes at `at`, page aligned,
        // ours alone until it is dropped with `self`; shared access follows `&self`.
        unsafe { core::slice::from_raw_parts(self.at as *const u32, self.len) }
    }
    fn pixels_mut(&mut self) -> &mut [u32] {
        // SAFETY: as in `pixels`; `&mut self` makes the access exclusive.
        unsafe { core::slice::from_raw_parts_mut(self.at as *mut u32, self.len) }
    }
}

/// The simulated GPU's pixel allocator: zeroed contiguous frames, `None` when
/// there are none.
fn frame_pixels(n: usize) -> Option<Box<dyn PixelBuf>> {
    let bytes = u64::try_from(n).ok()?.checked_mul(4)?;
    let mut region = crate::gpu::DmaRegion::alloc(bytes)?;
    let at = region.as_mut_slice().as_mut_ptr() as usize;
    Some(Box::new(FramePixels {
        _region: region,
        at,
        len: n,
    }))
}

impl SimBackend {
    /// A simulated GPU with `scanouts` displays and `vram` bytes, DMA below `top`.
    /// Its pixels live in frames; it keeps no copy of what the scanouts show.
    pub fn new(scanouts: Vec<(u32, u32)>, vram: u64, top: u64) -> Option<Self> {
        let sizes = scanouts.clone();
        let mut gpu = SimGpu::new(SimGpuConfig {
            scanouts,
            vram_bytes: vram,
            cost: CostModel::FREE,
        })
        .ok()?;
        gpu.set_pixel_alloc(frame_pixels);
        gpu.set_scanout_images(false);
        Some(Self {
            gpu,
            done: Vec::new(),
            host: HostMemory { top },
            sizes,
        })
    }
}

impl GpuBackend for SimBackend {
    fn name(&self) -> &str {
        "simulated GPU (CPU rendered)"
    }
    fn scanouts(&self) -> &[(u32, u32)] {
        &self.sizes
    }
    fn free_slots(&self, _queue: QueueId) -> usize {
        MAX_BATCH
    }
    fn submit(&mut self, _queue: QueueId, cmd: &[u8], token: u64) -> Result<(), GpuError> {
        let status = match command::decode(cmd) {
            Ok(req) => self.gpu.execute(&req, &self.host).response.type_(),
            Err(e) => e.response_type(),
        };
        self.done.push((token, status));
        Ok(())
    }
    fn kick(&mut self) {}
    fn poll(&mut self, out: &mut Vec<(u64, u32)>) -> usize {
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

struct InFlight {
    vm: VmId,
    outstanding: usize,
    completions: Vec<Completion>,
    /// The batch's tokens on the physical GPU.
    tokens: Vec<u64>,
    /// Commands in the batch and when it went to the GPU.
    commands: usize,
    submitted_ns: u64,
}

/// How long past its slice a batch may stay out before it is parked and the GPU
/// goes on with the other VMs (the watchdog, much longer, decides on a reset).
const OVERDUE_NS: u64 = 100_000_000;

/// First guess of the GPU time of one command, before any was measured.
const FIRST_COST_NS: u64 = 100_000;

struct GpuPv {
    mediator: Mediator,
    sched: Scheduler,
    backend: Box<dyn GpuBackend>,
    /// The GPU's IOMMU domain, when the IOMMU translates its DMA.
    domain: Option<DomainId>,
    /// Guest pages mapped for the GPU, with how many grants use each.
    mapped: BTreeMap<u64, u32>,
    /// Pages whose mapping changes, in order, not yet applied ([`iommu_apply`]).
    iommu_changes: Vec<(u64, bool)>,
    /// Device notifications for what was submitted, made once the lock is released.
    doorbells: crate::gpu::Doorbells,
    memory: BTreeMap<VmId, VmMemory>,
    slice: Option<Slice>,
    slice_ops: u64,
    in_flight: Option<InFlight>,
    scanouts: Vec<(u32, u32)>,
    /// Token -> host fence of commands on the GPU.
    tokens: BTreeMap<u64, u64>,
    next_token: u64,
    /// VM names, for samples.
    names: BTreeMap<VmId, alloc::string::String>,
    /// Time and per-VM GPU time used at the previous sample.
    last_sample: (u64, BTreeMap<VmId, u64>),
    /// Per-VM measured figures for the benchmarks.
    figures: BTreeMap<VmId, Figures>,
    /// Per VM: when commands not yet submitted were first taken from its ring (by a
    /// doorbell or a poll).
    taken_at: BTreeMap<VmId, u64>,
    /// Buffers VMs registered for zero-copy exchange: (vm, handle) -> (hpa, len,
    /// memory charged to the VM for its records).
    buffers: BTreeMap<(VmId, u64), (u64, u64, u64)>,
    /// Each VM's hypervisor memory budget in bytes, by VM id (reserved at boot).
    budgets: Vec<u64>,
    next_handle: u64,
    /// Whether "every VM has reached the GPU" was announced.
    all_reached: bool,
    /// Per VM: measured GPU time per command (moving average), to size a batch to
    /// the time left in its slice.
    cost_per_cmd_ns: BTreeMap<VmId, u64>,
    /// GPU time the open slice's batches took so far.
    slice_busy_ns: u64,
    /// VMs per physical head (more than one: heads are shared in bands).
    per_head: u32,
    /// Overdue batches taken off the schedule, still waited for.
    parked: Vec<InFlight>,
    /// The shared heads' composite resources: host id -> their memory.
    composites: BTreeMap<u32, crate::gpu::DmaRegion>,
}

/// Completions every VM must have before the glue announces that all of them reach
/// the GPU (a causal trigger for tests that look at every VM's display).
pub const REACHED_COMPLETIONS: u64 = 20;

/// What the glue measured for one VM.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    /// Host commands submitted to the physical GPU.
    pub commands: u64,
    /// Commands completed by the physical GPU.
    pub completed: u64,
    /// Batches submitted.
    pub batches: u64,
    /// Virtual interrupts raised (after coalescing).
    pub interrupts: u64,
    /// Sum over batches of the wait from the first take of commands off the guest's
    /// ring (doorbell or poll) since the previous batch to this batch's physical
    /// submission, in microseconds; commands a batch leaves staged keep that start
    /// time for the next one. Not from the guest's publication, which the hypervisor
    /// does not see.
    pub take_to_submit_us: u64,
    /// Batches in [`Figures::take_to_submit_us`].
    pub take_to_submit_samples: u64,
    /// GPU time of its batches (submission to last completion), in microseconds.
    pub gpu_busy_us: u64,
    /// Longest GPU time one of its slices took, in microseconds.
    pub max_slice_us: u64,
    /// Slices closed, and those whose GPU time exceeded their quantum (a command
    /// already on the GPU runs to its end).
    pub slices: u64,
    /// See [`Figures::slices`].
    pub overruns: u64,
}

/// The figures measured for `vm`.
pub fn figures(vm: VmId) -> Option<Figures> {
    GPUPV
        .lock()
        .as_ref()
        .and_then(|s| s.figures.get(&vm).copied())
}

/// Starts a new measurement of every VM's longest slice (after a warm-up).
pub fn reset_longest_slices() {
    if let Some(s) = GPUPV.lock().as_mut() {
        for f in s.figures.values_mut() {
            f.max_slice_us = 0;
        }
    }
}

static GPUPV: Mutex<Option<GpuPv>> = Mutex::new(None);

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
            bells = core::mem::take(&mut s.doorbells);
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
/// Per-VM mailbox of virtual interrupts to raise: bit i = MSI-X entry i.
static MAILBOX: [AtomicU64; MAX_GPU_VMS] = [const { AtomicU64::new(0) }; MAX_GPU_VMS];

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
    *lock() = Some(GpuPv {
        mediator: Mediator::new(config),
        sched,
        backend,
        domain,
        mapped: BTreeMap::new(),
        iommu_changes: Vec::new(),
        doorbells: crate::gpu::Doorbells::default(),
        memory: BTreeMap::new(),
        slice: None,
        slice_ops: 0,
        in_flight: None,
        scanouts,
        tokens: BTreeMap::new(),
        next_token: 1,
        names: BTreeMap::new(),
        last_sample: (now_ns(), BTreeMap::new()),
        figures: BTreeMap::new(),
        taken_at: BTreeMap::new(),
        buffers: BTreeMap::new(),
        budgets,
        next_handle: 1,
        all_reached: false,
        cost_per_cmd_ns: BTreeMap::new(),
        slice_busy_ns: 0,
        per_head,
        composites,
        parked: Vec::new(),
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
) -> Result<(u32, crate::gpu::DmaRegion), &'static str> {
    use gpu_pv::command::{Command, Request};
    use gpu_pv::wire::{format, CtrlHdr, MemEntry, Rect};

    let id = gpu_pv::mediator::RESERVED_HOST_IDS + head;
    let height = h * bands;
    let bytes = u64::from(w) * u64::from(height) * 4;
    let region = crate::gpu::DmaRegion::alloc(bytes).ok_or("no memory for the composite")?;
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
fn band_copies(s: &mut GpuPv, cmd: &gpu_pv::mediator::HostCommand) {
    let id = match cmd.request.cmd {
        gpu_pv::command::Command::TransferToHost2d { resource_id, .. } => resource_id,
        _ => return,
    };
    let Some(region) = s.composites.get_mut(&id) else {
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

/// Gives VM `vm` a paravirtual GPU on physical scanout `vm` (if there is one).
/// Returns the number of scanouts it sees.
pub fn add_vm(
    vm: VmId,
    name: &str,
    mem: VmMemory,
    weight: u32,
    alpha_tenths: u32,
    quota_mib: u32,
) -> Option<u32> {
    let mut g = lock();
    let s = g.as_mut()?;
    s.names.insert(vm, alloc::string::String::from(name));
    let per_head = s.per_head;
    let head = u32::from(vm) / per_head;
    let (w, h) = *s.scanouts.get(head as usize)?;
    let composite = gpu_pv::mediator::RESERVED_HOST_IDS + head;
    if per_head > 1 && !s.composites.contains_key(&composite) {
        return None;
    }
    if s.mediator.vm(vm).is_none() {
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
        if let Err(e) = s.mediator.add_vm(vm, cfg) {
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
        if let Err(e) = s.sched.add_vm(vm, p) {
            warn!("gpu-pv: vm {vm}: not scheduled: {e:?}");
        }
    }
    s.memory.insert(vm, mem);
    MAILBOX[vm as usize % MAX_GPU_VMS].store(0, Ordering::Relaxed);
    drain_events(s);
    Some(1)
}

/// Most bytes one registered buffer may span.
pub const MAX_BUFFER_BYTES: u64 = 64 << 20;
/// Most buffers one VM may hold registered.
pub const MAX_BUFFERS_PER_VM: usize = 64;

/// Zero-copy buffer exchange (hypercall GPU_REGISTER_BUFFER): the VM names a
/// page-aligned range of its RAM; after the validity and ownership checks it is
/// registered in the GPU's IOMMU domain until unregistered or the VM goes. Returns
/// the handle, or `None` when a check fails.
pub fn register_buffer(vm: VmId, gpa: u64, len: u64) -> Option<u64> {
    let mut g = lock();
    let s = g.as_mut()?;
    let mem = *s.memory.get(&vm)?;
    if len == 0 || len > MAX_BUFFER_BYTES || !gpa.is_multiple_of(4096) || !len.is_multiple_of(4096)
    {
        return None;
    }
    let hpa = mem.translate(gpa, len).ok()?;
    if s.buffers.keys().filter(|(v, _)| *v == vm).count() >= MAX_BUFFERS_PER_VM {
        return None;
    }
    // The buffer's record and a grant record per page come out of its budget.
    let charge = cost::BUFFER + cost::PAGE * cost::pages(hpa, len);
    if let Err(e) = s.mediator.charge(vm, charge) {
        warn!(vm = vm;
            "gpu-pv/Debug: vm {vm}: GPU_REGISTER_BUFFER of {len:#x} bytes refused: over its hypervisor memory budget ({e:?})"
        );
        drain_events(s);
        return None;
    }
    let handle = s.next_handle;
    s.next_handle += 1;
    s.buffers.insert((vm, handle), (hpa, len, charge));
    iommu_map(s, hpa, len);
    iommu_apply(s);
    info!("gpu-pv/Operational: vm {vm}: buffer {handle} registered for zero-copy: guest {gpa:#x}+{len:#x}");
    Some(handle)
}

/// Unregisters buffer `handle` of `vm` (hypercall GPU_UNREGISTER_BUFFER).
pub fn unregister_buffer(vm: VmId, handle: u64) -> bool {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return false };
    let Some((hpa, len, charge)) = s.buffers.remove(&(vm, handle)) else {
        return false;
    };
    iommu_unmap(s, hpa, len);
    s.mediator.release(vm, charge);
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
/// mappings removed) and its memory is no longer reachable.
pub fn remove_vm(vm: VmId) {
    IN_SLICE[vm as usize % MAX_GPU_VMS].store(false, Ordering::Release);
    RUNNING_ON[vm as usize % MAX_GPU_VMS].store(0, Ordering::Release);
    let mut g = lock();
    let Some(s) = g.as_mut() else { return };
    let handles: Vec<(VmId, u64)> = s
        .buffers
        .keys()
        .filter(|(v, _)| *v == vm)
        .copied()
        .collect();
    for key in handles {
        if let Some((hpa, len, charge)) = s.buffers.remove(&key) {
            iommu_unmap(s, hpa, len);
            s.mediator.release(vm, charge);
        }
    }
    if s.memory.remove(&vm).is_some() {
        if let Ok(r) = s.mediator.reset_vm(vm) {
            info!(
                "gpu-pv: vm {vm} gone: {} commands dropped, {} resources released",
                r.dropped, r.released
            );
            unmap_all(s, &r.unmapped);
        }
        // The reset staged the cleanup (scanouts blanked, host resources unref'd):
        // the VM stays on the GPU schedule until that ran, or its last frame stays on
        // the head and its resources on the device.
        let staged = s.mediator.vm(vm).is_some_and(|v| v.staged_len() > 0);
        let _ = s.sched.set_runnable(vm, staged, now_ns());
    }
    drain_events(s);
}

/// Removes `ranges` from the GPU's IOMMU domain (the zero-copy buffers of a VM that
/// was reset or detached its backing). Without an IOMMU the mediator's own checks
/// are the only guard.
fn unmap_all(s: &mut GpuPv, ranges: &[(u64, u64)]) {
    for &r in ranges {
        iommu_unmap(s, r.0, r.1);
    }
}

/// The page frames `[hpa, hpa+len)` touches, rounded out to whole pages.
fn page_span(hpa: u64, len: u64) -> (u64, u64) {
    (
        hpa & !0xfff,
        hpa.saturating_add(len).saturating_add(0xfff) & !0xfff,
    )
}

/// Grants the GPU `[hpa, hpa+len)`. Grants overlap (two resources may share pages,
/// a buffer may be registered twice), so each page is counted; a page whose count
/// leaves zero is noted, and [`iommu_apply`] maps the noted pages in one update.
fn iommu_map(s: &mut GpuPv, hpa: u64, len: u64) {
    if s.domain.is_none() {
        return;
    }
    let (start, end) = page_span(hpa, len);
    let mut page = start;
    while page < end {
        let n = s.mapped.entry(page).or_insert(0);
        *n += 1;
        if *n == 1 {
            note_iommu_change(s, page, true);
        }
        page += 4096;
    }
}

/// Takes back a grant made by [`iommu_map`]: pages whose count drops to zero are
/// noted for unmapping by [`iommu_apply`]; pages another grant still uses stay.
fn iommu_unmap(s: &mut GpuPv, hpa: u64, len: u64) {
    if s.domain.is_none() {
        return;
    }
    let (start, end) = page_span(hpa, len);
    let mut page = start;
    while page < end {
        if let Some(n) = s.mapped.get_mut(&page) {
            *n -= 1;
            if *n == 0 {
                s.mapped.remove(&page);
                note_iommu_change(s, page, false);
            }
        }
        page += 4096;
    }
}

/// Notes that `page` must become mapped (or unmapped). If the list cannot grow, the
/// changes so far are applied first, so nothing is ever lost.
fn note_iommu_change(s: &mut GpuPv, page: u64, mapped: bool) {
    if s.iommu_changes.try_reserve(1).is_err() {
        iommu_apply(s);
    }
    if s.iommu_changes.try_reserve(1).is_ok() {
        s.iommu_changes.push((page, mapped));
    } else if let Some(d) = s.domain {
        // No memory even for one entry: apply this change on its own.
        let one = [(page, 4096u64)];
        let none: [(u64, u64); 0] = [];
        let r = if mapped {
            crate::iommu::update(d, &one, &none)
        } else {
            crate::iommu::update(d, &none, &one)
        };
        if let Err(e) = r {
            warn!("gpu-pv/Debug: IOMMU update of page {page:#x} failed: {e:?}");
        }
    }
}

/// Applies the noted page changes to the GPU's IOMMU domain in one update: per page
/// only the net change (mapped then unmapped within one command is nothing), in runs
/// of adjacent pages, with one IOTLB invalidation for the lot. Called before the GPU
/// lock is released by every path that changes grants, so an unmapped page is
/// unreachable before anything else can happen.
fn iommu_apply(s: &mut GpuPv) {
    if s.iommu_changes.is_empty() {
        return;
    }
    let Some(d) = s.domain else {
        s.iommu_changes.clear();
        return;
    };
    let mut changes = core::mem::take(&mut s.iommu_changes);
    // Stable: each page's changes stay in order; the first tells the state before.
    changes.sort_by_key(|&(page, _)| page);
    let mut maps: Vec<(u64, u64)> = Vec::new();
    let mut unmaps: Vec<(u64, u64)> = Vec::new();
    let mut i = 0;
    while i < changes.len() {
        let page = changes[i].0;
        let before = !changes[i].1;
        let mut j = i;
        while j + 1 < changes.len() && changes[j + 1].0 == page {
            j += 1;
        }
        let after = changes[j].1;
        if before != after {
            let runs = if after { &mut maps } else { &mut unmaps };
            match runs.last_mut() {
                Some((start, len)) if *start + *len == page => *len += 4096,
                _ => {
                    if runs.try_reserve(1).is_ok() {
                        runs.push((page, 4096));
                    }
                }
            }
        }
        i = j + 1;
    }
    changes.clear();
    s.iommu_changes = changes;
    if let Err(e) = crate::iommu::update(d, &maps, &unmaps) {
        warn!(
            "gpu-pv/Debug: IOMMU update ({} map runs, {} unmap runs) failed: {e:?}",
            maps.len(),
            unmaps.len()
        );
    }
}

/// The driver wrote DRIVER_OK.
pub fn start(vm: VmId, control: QueueLayout, cursor: QueueLayout) -> bool {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return false };
    let r = s.mediator.start_queues(vm, control, cursor);
    if let Err(e) = &r {
        warn!("gpu-pv: vm {vm}: cannot start its queues: {e:?}");
    }
    drain_events(s);
    r.is_ok()
}

/// The driver reset the device.
pub fn driver_reset(vm: VmId) {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return };
    if let Ok(r) = s.mediator.driver_reset(vm) {
        unmap_all(s, &r.unmapped);
    }
    // Its cleanup is staged: schedule it now, not at the driver's next kick.
    after_guest_work(s, vm);
}

/// The driver set a queue's (or the config) MSI-X entry.
pub fn set_vector(vm: VmId, queue: Option<QueueId>, entry: u16) {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return };
    let _ = match queue {
        Some(q) => s.mediator.set_vector(vm, q, entry),
        None => s.mediator.set_config_vector(vm, entry),
    };
}

/// Doorbells rung while the mediator was busy, per VM (bit = queue index), served by
/// the next [`service`] on any CPU.
static PENDING_DOORBELLS: [AtomicU64; MAX_GPU_VMS] = [const { AtomicU64::new(0) }; MAX_GPU_VMS];

/// A doorbell: the VM notified `queue`. Never waits for the mediator: when another
/// CPU holds it, the doorbell is marked pending and served by that CPU's bottom half.
pub fn doorbell(vm: VmId, queue: QueueId) {
    let Some(mut g) = try_lock() else {
        PENDING_DOORBELLS[vm as usize % MAX_GPU_VMS].fetch_or(1 << queue.index(), Ordering::AcqRel);
        return;
    };
    let Some(s) = g.as_mut() else { return };
    let Some(mut mem) = s.memory.get(&vm).copied() else {
        return;
    };
    let _ = s.mediator.process_doorbell(vm, queue, &mut mem);
    after_guest_work(s, vm);
    // An idle GPU takes the work at once rather than at the next slice boundary.
    schedule(s, now_ns());
}

/// VMs whose vCPU is running now: their queues are polled (by the bottom half on
/// idle CPUs, and at their own exits), and the guest is asked not to kick.
static IN_SLICE: [core::sync::atomic::AtomicBool; MAX_GPU_VMS] =
    [const { core::sync::atomic::AtomicBool::new(false) }; MAX_GPU_VMS];

/// Per VM: 1 + the CPU running its vCPU 0 (which takes the GPU's virtual
/// interrupts), 0 when it does not run. A CPU that posts an interrupt for it sends
/// that CPU a wake IPI, so the guest exits and takes it at once.
static RUNNING_ON: [core::sync::atomic::AtomicUsize; MAX_GPU_VMS] =
    [const { core::sync::atomic::AtomicUsize::new(0) }; MAX_GPU_VMS];

/// `vm`'s vCPU starts a slice on this CPU (`takes_interrupts`: it is vCPU 0): its
/// queues are served now and polled until [`slice_end`], with the guest's kicks
/// suppressed.
pub fn slice_begin(vm: VmId, takes_interrupts: bool) {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return };
    let Some(mut mem) = s.memory.get(&vm).copied() else {
        return;
    };
    IN_SLICE[vm as usize % MAX_GPU_VMS].store(true, Ordering::Release);
    if takes_interrupts {
        RUNNING_ON[vm as usize % MAX_GPU_VMS]
            .store(crate::arch::cpu::current_index() + 1, Ordering::Release);
    }
    let _ = s.mediator.set_polled(vm, true, &mut mem);
    if s.mediator
        .vm(vm)
        .is_some_and(|v| v.state() == gpu_pv::mediator::VmState::Active)
    {
        let _ = s.mediator.poll(vm, &mut mem);
    }
    after_guest_work(s, vm);
    schedule(s, now_ns());
}

/// `vm`'s vCPU stopped running: what it queued is served, and the guest is asked
/// to kick again (nobody polls a VM that does not run).
pub fn slice_end(vm: VmId) {
    IN_SLICE[vm as usize % MAX_GPU_VMS].store(false, Ordering::Release);
    RUNNING_ON[vm as usize % MAX_GPU_VMS].store(0, Ordering::Release);
    let mut g = lock();
    let Some(s) = g.as_mut() else { return };
    let Some(mut mem) = s.memory.get(&vm).copied() else {
        return;
    };
    let _ = s.mediator.set_polled(vm, false, &mut mem);
    after_guest_work(s, vm);
    schedule(s, now_ns());
}

fn after_guest_work(s: &mut GpuPv, vm: VmId) {
    let staged = s.mediator.vm(vm).is_some_and(|v| v.staged_len() > 0);
    if staged {
        s.taken_at.entry(vm).or_insert_with(crate::apic::now_us);
        let _ = s.sched.set_runnable(vm, true, now_ns());
    }
    collect_interrupts(s);
    drain_events(s);
}

/// Whether the VM's device shows DEVICE_NEEDS_RESET.
pub fn needs_reset(vm: VmId) -> bool {
    GPUPV
        .lock()
        .as_ref()
        .and_then(|s| s.mediator.device_status(vm))
        .is_some_and(|b| b & virtio_pci::status::DEVICE_NEEDS_RESET != 0)
}

/// Takes the VM's pending virtual interrupts as a bitmask of MSI-X entries: all
/// completions since the last call coalesce into one interrupt per entry.
pub fn take_interrupts(vm: VmId) -> u64 {
    MAILBOX[vm as usize % MAX_GPU_VMS].swap(0, Ordering::AcqRel)
}

/// Whether `vm` has GPU commands taken from its rings and not yet answered (so a
/// completion, and its interrupt, are coming).
pub fn has_work(vm: VmId) -> bool {
    GPUPV
        .lock()
        .as_ref()
        .and_then(|s| s.mediator.vm(vm))
        .is_some_and(|v| v.unanswered() > 0)
}

/// Whether the VM has virtual interrupts waiting.
pub fn has_interrupts(vm: VmId) -> bool {
    MAILBOX[vm as usize % MAX_GPU_VMS].load(Ordering::Relaxed) != 0
}

fn collect_interrupts(s: &mut GpuPv) {
    for (vm, entry) in s.mediator.take_interrupts() {
        s.figures.entry(vm).or_default().interrupts += 1;
        if entry < 64 {
            let slot = vm as usize % MAX_GPU_VMS;
            let before = MAILBOX[slot].fetch_or(1u64 << entry, Ordering::AcqRel);
            let on = RUNNING_ON[slot].load(Ordering::Acquire);
            if before == 0 && on != 0 {
                crate::vmm::wake_cpu(on - 1);
            }
        }
    }
}

fn drain_events(s: &mut GpuPv) {
    for e in s.mediator.take_events() {
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
    for op in s.mediator.take_iommu_ops() {
        match op {
            IommuOp::Map { hpa, len, .. } => iommu_map(s, hpa, len),
            IommuOp::Unmap { hpa, len, .. } => iommu_unmap(s, hpa, len),
        }
    }
    iommu_apply(s);
}

/// The bottom half: completions, interrupts, events, the watchdog and the GPU
/// schedule. Cheap when there is nothing to do; never waits for the lock. Returns
/// whether it moved any work (commands taken from a guest, completions, a batch
/// submitted), so an idle CPU can keep polling while work flows.
pub fn service() -> bool {
    let Some(mut g) = try_lock() else {
        return false;
    };
    let Some(s) = g.as_mut() else { return false };
    let staged_before: usize = s
        .mediator
        .vm_ids()
        .filter_map(|vm| s.mediator.vm(vm).map(|v| v.staged_len()))
        .sum();
    let batches_before = s.next_token;
    for (vm, pending) in PENDING_DOORBELLS.iter().enumerate() {
        let bits = pending.swap(0, Ordering::AcqRel);
        if bits == 0 {
            continue;
        }
        let vm = vm as VmId;
        let Some(mut mem) = s.memory.get(&vm).copied() else {
            continue;
        };
        for q in QueueId::ALL {
            if bits & (1 << q.index()) != 0 {
                let _ = s.mediator.process_doorbell(vm, q, &mut mem);
            }
        }
        after_guest_work(s, vm);
    }
    // Polling: the queues of every VM that is running now.
    for (vm, on) in IN_SLICE.iter().enumerate() {
        if !on.load(Ordering::Acquire) {
            continue;
        }
        let vm = vm as VmId;
        let Some(mut mem) = s.memory.get(&vm).copied() else {
            continue;
        };
        if s.mediator
            .vm(vm)
            .is_some_and(|v| v.state() == gpu_pv::mediator::VmState::Active && v.polled())
        {
            let _ = s.mediator.poll(vm, &mut mem);
            after_guest_work(s, vm);
        }
    }
    let now = now_ns();
    let irqs = crate::interrupts::take_pending(crate::interrupts::GPU_VECTOR);
    let mut done = Vec::new();
    if s.backend.poll(&mut done) == 0 && irqs != 0 {
        s.backend.check_device();
    }
    let harvested = !done.is_empty();
    for (token, status) in done {
        let Some(fence) = s.tokens.remove(&token) else {
            continue;
        };
        let f = match s.in_flight.as_mut() {
            Some(f) if f.tokens.contains(&token) => Some(f),
            _ => s.parked.iter_mut().find(|f| f.tokens.contains(&token)),
        };
        if let Some(f) = f {
            let completed = s.figures.get(&f.vm).map_or(0, |g| g.completed);
            if crate::inject::withhold_completion(f.vm, completed) {
                continue;
            }
            f.completions.push(Completion {
                host_fence: fence,
                status,
            });
            f.outstanding = f.outstanding.saturating_sub(1);
        }
    }
    // Completions go to the guest as they come, not once the whole batch is done:
    // a streaming guest refills its queue while the rest of the batch runs.
    if let Some(f) = s.in_flight.as_mut() {
        if !f.completions.is_empty() {
            let vm = f.vm;
            let completions = core::mem::take(&mut f.completions);
            s.slice_ops += completions.len() as u64;
            s.figures.entry(vm).or_default().completed += completions.len() as u64;
            let mut mem = s.memory.get(&vm).copied().unwrap_or(NO_MEMORY);
            let _ = s.mediator.complete_batch(vm, &completions, &mut mem);
        }
    }
    // Overdue batches that came back after all: their VM's guest gets its answers.
    for f in s.parked.iter_mut() {
        if !f.completions.is_empty() {
            let completions = core::mem::take(&mut f.completions);
            s.figures.entry(f.vm).or_default().completed += completions.len() as u64;
            let mut mem = s.memory.get(&f.vm).copied().unwrap_or(NO_MEMORY);
            let _ = s.mediator.complete_batch(f.vm, &completions, &mut mem);
        }
    }
    s.parked.retain(|f| f.outstanding > 0);
    if s.in_flight.as_ref().is_some_and(|f| f.outstanding == 0) {
        if let Some(f) = s.in_flight.take() {
            let busy = now_ns().saturating_sub(f.submitted_ns);
            s.slice_busy_ns += busy;
            s.figures.entry(f.vm).or_default().gpu_busy_us += busy / 1000;
            if f.commands > 0 {
                let sample = busy / f.commands as u64;
                let avg = s.cost_per_cmd_ns.entry(f.vm).or_insert(sample);
                *avg = (*avg * 3 + sample) / 4;
            }
        }
    }
    let hung = s.mediator.tick(now);
    // The timeout events first, then the resets they cause.
    drain_events(s);
    for vm in hung {
        // Its batch will never complete: the GPU's slot is free for the others, and
        // a late completion finds no token.
        if s.in_flight.as_ref().is_some_and(|f| f.vm == vm) {
            if let Some(f) = s.in_flight.take() {
                for t in &f.tokens {
                    s.tokens.remove(t);
                }
                s.slice_busy_ns += now.saturating_sub(f.submitted_ns);
            }
        }
        let (gone, kept): (Vec<InFlight>, Vec<InFlight>) = core::mem::take(&mut s.parked)
            .into_iter()
            .partition(|f| f.vm == vm);
        s.parked = kept;
        for f in gone {
            for t in &f.tokens {
                s.tokens.remove(t);
            }
        }
        if let Ok(r) = s.mediator.reset_vm(vm) {
            warn!(
                "gpu-pv/Debug: vm {vm}: channel hung, reset: {} commands dropped",
                r.dropped
            );
            unmap_all(s, &r.unmapped);
        }
        let staged = s.mediator.vm(vm).is_some_and(|v| v.staged_len() > 0);
        let _ = s.sched.set_runnable(vm, staged, now_ns());
        crate::inject::channel_reset(vm);
    }
    collect_interrupts(s);
    drain_events(s);
    if !s.all_reached
        && !s.memory.is_empty()
        && s.memory.keys().all(|vm| {
            s.figures
                .get(vm)
                .is_some_and(|f| f.completed >= REACHED_COMPLETIONS)
        })
    {
        s.all_reached = true;
        info!(
            "gpu-pv: all {} VMs reach the GPU ({REACHED_COMPLETIONS} or more commands completed each)",
            s.memory.len()
        );
    }
    schedule(s, now);
    let staged_after: usize = s
        .mediator
        .vm_ids()
        .filter_map(|vm| s.mediator.vm(vm).map(|v| v.staged_len()))
        .sum();
    harvested || s.next_token != batches_before || staged_after != staged_before
}

/// The memory of a VM that is gone (nothing is reachable): the completions of its
/// last commands still reach the mediator, since a reset VM's host ids go back
/// only with them; its context is reset, so no guest is answered.
const NO_MEMORY: VmMemory = VmMemory { base: 0, size: 0 };

fn schedule(s: &mut GpuPv, now: u64) {
    // A batch still out long after its slice ended (a hang, or a GPU that stalls on
    // this VM's work) does not hold the GPU schedule: it is parked (tracked until it
    // completes or the watchdog resets its VM) and the other VMs go on.
    if let Some(f) = s.in_flight.as_ref() {
        let quantum = s.slice.map_or(0, |sl| sl.quantum_ns);
        if now.saturating_sub(f.submitted_ns) <= quantum + OVERDUE_NS {
            return;
        }
        if let Some(f) = s.in_flight.take() {
            warn!(
                "gpu-pv/Debug: vm {}: batch overdue ({} us on the GPU, {} commands outstanding): parked, the GPU goes on with the others",
                f.vm,
                now.saturating_sub(f.submitted_ns) / 1000,
                f.outstanding
            );
            s.slice_busy_ns += now.saturating_sub(f.submitted_ns);
            s.parked.push(f);
        }
    }
    // Close the slice when its time is up, its VM has nothing left, or not even one
    // more command fits in the time left (by the VM's measured cost per command).
    let cost = |s: &GpuPv, vm: VmId| {
        s.cost_per_cmd_ns
            .get(&vm)
            .copied()
            .unwrap_or(FIRST_COST_NS)
            .max(1)
    };
    if let Some(sl) = s
        .slice
        .filter(|sl| sl.kind == gpu_pv::sched::SliceKind::Reserved)
    {
        // Fixed modes: the slot of a VM without work stays idle until it ends (nobody
        // else gets it); should the VM get work meanwhile, `pick` turns it into a run
        // slice for the rest of the slot.
        if now < sl.end_ns() {
            s.slice = s.sched.pick(now);
        } else {
            let _ = s.sched.account(sl.vm, 0, 0, now);
            let c = s.mediator.counters_mut().vm_mut(sl.vm);
            c.record_slice(sl.quantum_ns, 0, 0, false);
            s.slice = None;
        }
    }
    if let Some(sl) = s
        .slice
        .filter(|sl| sl.kind == gpu_pv::sched::SliceKind::Run)
    {
        // A VM whose batch is parked cannot send another until it comes back.
        let parked = s.parked.iter().any(|f| f.vm == sl.vm);
        let more = !parked && s.mediator.vm(sl.vm).is_some_and(|v| v.staged_len() > 0);
        let left = sl.end_ns().saturating_sub(now);
        if left == 0 || !more || left < cost(s, sl.vm) {
            let fig = s.figures.entry(sl.vm).or_default();
            fig.max_slice_us = fig.max_slice_us.max(s.slice_busy_ns / 1000);
            fig.slices += 1;
            if s.slice_busy_ns > sl.quantum_ns {
                fig.overruns += 1;
            }
            s.slice_busy_ns = 0;
            let used = now.saturating_sub(sl.start_ns);
            let _ = s.sched.account(sl.vm, used, s.slice_ops, now);
            let _ = s.sched.set_runnable(sl.vm, more, now);
            if !more && !s.memory.contains_key(&sl.vm) && !parked {
                info!(
                    "gpu-pv: vm {}: its cleanup after the reset ran on the GPU",
                    sl.vm
                );
            }
            let c = s.mediator.counters_mut().vm_mut(sl.vm);
            c.record_slice(sl.quantum_ns, used, s.slice_ops, true);
            s.slice = None;
            s.slice_ops = 0;
        }
    }
    if s.slice.is_none() {
        s.slice = s.sched.pick(now);
    }
    let Some(sl) = s.slice else { return };
    // A batch sized to the time left in the slice (at least one command), and to
    // the room the physical ring has now.
    let fit = (sl.end_ns().saturating_sub(now) / cost(s, sl.vm)).clamp(1, MAX_BATCH as u64);
    let room = ring_room(s, sl.vm, fit as usize);
    if room == 0 {
        return;
    }
    let Some(batch) = s.mediator.take_batch(sl.vm, room) else {
        return;
    };
    submit(s, batch);
}

/// How many of `vm`'s staged commands, in order and at most `max`, the physical
/// ring can take now (each queue has its own free slots).
fn ring_room(s: &GpuPv, vm: VmId, max: usize) -> usize {
    let mut free = QueueId::ALL.map(|q| s.backend.free_slots(q));
    let Some(v) = s.mediator.vm(vm) else { return 0 };
    v.staged()
        .take(max)
        .take_while(|c| match free[c.queue.index()].checked_sub(1) {
            Some(n) => {
                free[c.queue.index()] = n;
                true
            }
            None => false,
        })
        .count()
}

fn submit(s: &mut GpuPv, batch: Batch) {
    let now_us = crate::apic::now_us();
    let vm = batch.vm;
    let mut f = InFlight {
        vm,
        outstanding: 0,
        completions: Vec::new(),
        tokens: Vec::new(),
        commands: 0,
        submitted_ns: now_ns(),
    };
    let mut commands = batch.commands.into_iter();
    while let Some(c) = commands.next() {
        let token = s.next_token;
        s.next_token += 1;
        let mut bytes = alloc::borrow::Cow::Borrowed(c.bytes.as_slice());
        if let gpu_pv::command::Command::ResourceAttachBacking {
            resource_id,
            entries,
        } = &c.request.cmd
        {
            if crate::inject::take_bad_dma(vm) {
                if let Some(bad) = crate::mm::frames::alloc() {
                    crate::inject::note_bad_dma(bad);
                    let mut req = c.request.clone();
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
                    bytes = alloc::borrow::Cow::Owned(out);
                }
            }
        }
        if !c.copies.is_empty() {
            band_copies(s, &c);
        }
        let r = s.backend.submit(c.queue, &bytes, token);
        drop(bytes);
        if let Err(e) = r {
            // Refused (the ring is full, or busy with a large command): the device
            // never saw this command nor the rest of the batch. They go back to the
            // mediator, in order, to be taken again; nothing of them is completed,
            // signalled or freed meanwhile.
            let mut back = alloc::vec![c];
            back.extend(commands);
            warn!(
                "gpu-pv/Debug: vm {vm}: physical submit refused ({e:?}): {} commands requeued",
                back.len()
            );
            let _ = s.mediator.requeue(vm, back);
            break;
        }
        s.tokens.insert(token, c.host_fence);
        f.tokens.push(token);
        f.outstanding += 1;
        f.commands += 1;
    }
    if f.commands == 0 {
        return;
    }
    let fig = s.figures.entry(vm).or_default();
    fig.batches += 1;
    fig.commands += f.commands as u64;
    if let Some(t) = s.taken_at.remove(&vm) {
        fig.take_to_submit_us += now_us.saturating_sub(t);
        fig.take_to_submit_samples += 1;
        // Commands left staged were taken no later than the next take: keep the start.
        if s.mediator.vm(vm).is_some_and(|v| v.staged_len() > 0) {
            s.taken_at.insert(vm, t);
        }
    }
    let bells = s.backend.publish();
    s.doorbells.merge(bells);
    s.in_flight = Some(f);
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
        let _ = s
            .mediator
            .counters()
            .write_json(&mut out, elapsed, MAX_BATCH as u64);
        for id in s.mediator.vm_ids() {
            if let Some(m) = s.mediator.vm(id).map(|v| *v.memory()) {
                memory.push((id, m));
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
    for (id, c) in s.mediator.counters().vms() {
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
pub fn reset_queue(vm: VmId, queue: QueueId) {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return };
    match s.mediator.reset_queue(vm, queue) {
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
pub fn restart_queue(vm: VmId, queue: QueueId, layout: QueueLayout) -> bool {
    let mut g = lock();
    let Some(s) = g.as_mut() else { return false };
    let r = s.mediator.restart_queue(vm, queue, layout);
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
