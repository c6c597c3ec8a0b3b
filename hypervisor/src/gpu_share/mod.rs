//! GPU sharing in the kernel: the `gpu-pv` dispatcher gets guest memory, time,
//! interrupts and the physical GPU from here; everything else is its own.
//!
//! The scheduling, batching, completion routing, watchdog resets, page grants and
//! zero-copy buffers are `gpu_pv::dispatch::Dispatcher`'s, the same code the host
//! tests and the simulation run. Here (`mod.rs`) is the dispatcher behind one lock,
//! its start-up, the bottom half [`service`] (run between vCPU slices on every CPU:
//! pending doorbells, polls of running VMs, completions, the watchdog, the next
//! batch), the virtual interrupts posted to the VMs' ports, the log lines, and
//! `iommu_apply`, which writes the grants' changes into the GPU's IOMMU domain before
//! the lock is released (so an unmapped page is unreachable before anything else can
//! happen). In the submodules:
//!
//! - `port`: [`GpuPort`], a VM's handle (doorbells, slices, interrupts, device
//!   events; dropping it takes the VM off the GPU).
//! - `physical`: the physical GPU as the dispatcher sees it (the backend's ring, the
//!   copies into a shared head's composite, the notifications, rung only after the
//!   lock is released) and the composites' set-up.
//! - `report`: figures, counters and samples.
//!
//! What a VM makes the hypervisor keep is charged to its memory budget (see
//! `gpu_pv::budget`): the mediator's records, the zero-copy buffer and page-grant
//! records, and with the simulated GPU its resources' pixels, which live in frames
//! of their own rather than on the shared heap. Every budget is reserved at boot
//! (`main.rs`), so a VM at its limit gets errors and nobody else is short.
//!
//! Lock order: a VM's lock, then this module's. [`service`] takes only this one.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use gpu_pv::budget::DEFAULT_BUDGET;
use gpu_pv::dispatch::{DispatchConfig, DispatchEvent, Dispatcher};
use gpu_pv::mediator::{
    Channel, EventKind, Mediator, MediatorConfig, QueueId, ScanoutConfig, VmGpuConfig,
};
use gpu_pv::memory::{check_range, Gpa, GuestMemory, Hpa, MemError};
use gpu_pv::sched::{Mode, SchedConfig, Scheduler, VmId, VmParams};
use spin::Mutex;

use crate::event_log::{self, Source};
use crate::gpu::GpuBackend;
use crate::iommu::DomainId;
use crate::pci::Bdf;

pub use gpu_pv::dispatch::Figures;

// Lines logged while the GPU-PV lock is held are deferred (crate::event_log): printed
// after the lock is released ([`Held`]'s drop), charged to the VM that caused them.
macro_rules! warn {
    (vm = $vm:expr; $($t:tt)*) => {
        crate::event_log::defer(crate::event_log::Source::Vm($vm), log::Level::Warn, format_args!($($t)*))
    };
    ($($t:tt)*) => {
        crate::event_log::defer(crate::gpu_share::current_source(), log::Level::Warn, format_args!($($t)*))
    };
}
macro_rules! info {
    (vm = $vm:expr; $($t:tt)*) => {
        crate::event_log::defer(crate::event_log::Source::Vm($vm), log::Level::Info, format_args!($($t)*))
    };
    ($($t:tt)*) => {
        crate::event_log::defer(crate::gpu_share::current_source(), log::Level::Info, format_args!($($t)*))
    };
}

/// The VM this CPU works for now (its exit handler), else the host.
fn current_source() -> Source {
    crate::vm_context::current().map_or(Source::Host, Source::Vm)
}

mod physical;
mod port;
mod report;

use physical::{make_composite, PhysicalGpu};
use port::Link;
pub use port::{GpuPort, PendingGpuInterrupts};
pub use report::{dump_counters, sample};
#[cfg(feature = "selftest")]
pub use report::{figures, iommu_table_frames, longest_lock_hold, reset_longest_slices};

/// Commands handed to the physical ring per batch.
pub const MAX_BATCH: usize = 32;

/// A VM's RAM as the mediator sees it: guest-physical `[0, size)` at host `base`,
/// all owned by the VM.
#[derive(Clone, Copy, Debug)]
pub struct VmMemory {
    /// Host-physical base.
    pub base: Hpa,
    /// Bytes.
    pub size: u64,
}

impl GuestMemory for VmMemory {
    fn translate(&self, gpa: Gpa, len: u64) -> Result<Hpa, MemError> {
        check_range(gpa, len, Gpa::new(0), self.size)?;
        // The one GPA -> HPA translation of a VM's RAM: guest-physical `[0, size)`
        // is host-physical `[base, base + size)`.
        Ok(self.base.offset(gpa.get()))
    }
    fn read(&self, gpa: Gpa, out: &mut [u8]) -> Result<(), MemError> {
        let hpa = self.translate(gpa, out.len() as u64)?;
        // SAFETY: inside the VM's RAM, which the hypervisor owns (identity mapped) for
        // as long as the VM is registered here.
        unsafe { crate::mm::read_shared(hpa.get(), out) };
        Ok(())
    }
    fn write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), MemError> {
        let hpa = self.translate(gpa, data.len() as u64)?;
        // SAFETY: as in `read`.
        unsafe { crate::mm::write_shared(hpa.get(), data) };
        Ok(())
    }
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
        let mut cfg = VmGpuConfig::new(alloc::vec![ScanoutConfig {
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

/// Whether `[hpa, hpa+len)` is reachable by the GPU now (for tests).
pub fn gpu_can_reach(hpa: Hpa) -> Option<bool> {
    let g = lock();
    let d = g.as_ref()?.domain?;
    // The GPU's IOVA of a granted page is its host-physical address.
    Some(crate::iommu::translate(d, hpa.get()).is_some())
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

/// After guest work: interrupts to the mailboxes, events to the log.
fn after_guest_work(s: &mut GpuPv) {
    collect_interrupts(s);
    drain_events(s);
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
