//! The VM monitor: VM lifecycle (create, run, pause, resume, stop, destroy, restart)
//! and vCPU scheduling. Every physical CPU takes from one run queue the runnable vCPU
//! whose VM has the least weighted CPU time (stride scheduling) and runs it for one
//! slice, preempted by the local APIC timer, so more vCPUs than CPUs share the
//! machine by weight. The vCPUs of one VM run on several CPUs at once: a CPU holds
//! the VM's lock only to handle its vCPU's exit and prepare the next entry
//! ([`run_vcpu_slice`]).
//!
//! A CPU with nothing to run is the GPU path's poller: it runs the `gpu_share` bottom
//! half (which polls the rings of running VMs), keeps polling for 50 us after work
//! moved, then sleeps in `hlt` until a 100 us timer, a GPU interrupt or a wake IPI.
//! The GPU's interrupt CPU leaves guests to idle CPUs, and a vCPU nobody waits for
//! runs 20 ms slices, so a lone streaming guest takes almost no exits.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use boot_info::BootInfo;
use log::{error, info, warn};
use spin::Mutex;

use crate::arch::cpu;
use crate::virt::{self, Backend};
use crate::vm::{CreateError, LinuxSpec, StopReason, Vm, VmSpec, VmState};

/// vCPU time slice in microseconds.
pub const BASE_SLICE_US: u64 = 2_000;
/// Slice of a vCPU nobody else waits for, when another CPU serves the GPU
/// meanwhile: fewer exits for a lone busy guest; stops and deadlines are still
/// noticed this often.
pub const LONE_SLICE_US: u64 = 20_000;
/// How long an idle CPU sleeps between looks at the run queue and the GPU; a GPU
/// interrupt or a wake IPI ends the sleep early.
const IDLE_POLL_US: u64 = 100;
/// How long an idle CPU keeps polling (without sleeping) after the GPU path last
/// moved work: the guest or the GPU usually answers within that time (halt polling).
const IDLE_SPIN_US: u64 = 50;
/// The CPU that takes the physical GPU's interrupts (the BSP): it leaves vCPUs to
/// idle CPUs, so a running guest is not interrupted by the GPU.
const GPU_IRQ_CPU: usize = 0;

/// A configured VM: what it is made from, and the running instance if any.
struct Slot {
    spec: VmSpec,
    image: &'static [u8],
    vm: Option<Vm>,
}

struct Monitor {
    backend: Backend,
    slots: Vec<Mutex<Slot>>,
    /// Runnable vCPUs (slot, vcpu).
    queue: Mutex<VecDeque<(usize, usize)>>,
    /// Each slot's CPU time divided by its weight (us * 1000 / weight): the ready
    /// vCPU with the least runs next, so CPU time follows the weights (stride
    /// scheduling). Readable without the slot's lock.
    vruntime: Vec<AtomicU64>,
    /// When each slot's vCPUs have work again (0: now, `u64::MAX`: not started):
    /// halted vCPUs are skipped. Written by the VM (under its lock), read here
    /// without it.
    wake_at: Vec<Box<[AtomicU64]>>,
    /// When each slot's vCPU was last put back on the run queue.
    queued_at: Vec<AtomicU64>,
    /// Each slot's VM's waiting GPU interrupts (its GPU port's), readable without
    /// the slot's lock: a halted vCPU with one is ready.
    gpu_interrupts: Vec<spin::RwLock<Option<crate::gpu_share::PendingGpuInterrupts>>>,
}

impl Monitor {
    /// Whether VM `slot`'s vCPU `vcpu` can run now: not halted, its timer is due, an
    /// interrupt waits for it, or (vCPU 0) a GPU interrupt or console input waits.
    fn ready(&self, slot: usize, vcpu: usize, now: u64) -> bool {
        self.wake_at[slot]
            .get(vcpu)
            .is_some_and(|w| w.load(Ordering::Relaxed) <= now)
            || (vcpu == 0
                && (crate::console::waiting_for(slot)
                    || self.gpu_interrupts[slot]
                        .try_read()
                        .is_some_and(|p| p.as_ref().is_some_and(|p| p.any()))))
    }
}

static MONITOR: spin::Once<Monitor> = spin::Once::new();
static STARTED: AtomicBool = AtomicBool::new(false);
/// Counts the calls of [`run`].
static RUN_GENERATION: AtomicU64 = AtomicU64::new(0);
static STOP_ALL: AtomicBool = AtomicBool::new(false);
static RUNNING_CPUS: AtomicUsize = AtomicUsize::new(0);
static DEADLINE_US: AtomicU64 = AtomicU64::new(u64::MAX);
/// CPUs with virtualization turned on.
static ENABLED_CPUS: AtomicUsize = AtomicUsize::new(0);
/// Idle sleeps per physical CPU.
static IDLE_SLEEPS: [AtomicU64; cpu::MAX_CPUS] = [const { AtomicU64::new(0) }; cpu::MAX_CPUS];
/// vCPU slices run per physical CPU.
static SLICES: [AtomicU64; cpu::MAX_CPUS] = [const { AtomicU64::new(0) }; cpu::MAX_CPUS];
/// Interval of the `gpu-pv sample:` lines, in microseconds (`sample_ms=N` on the
/// command line; 250 ms by default). A line costs about 0.1 s of a CPU under
/// Bochs, so slow emulators' scenarios ask for fewer.
static SAMPLE_US: AtomicU64 = AtomicU64::new(250_000);

/// Sets the interval of the `gpu-pv sample:` lines.
pub fn set_sample_interval_ms(ms: u64) {
    SAMPLE_US.store(ms.max(10) * 1000, Ordering::Relaxed);
}
/// When the next `gpu-pv sample:` line is due (any CPU prints it).
static NEXT_SAMPLE_US: AtomicU64 = AtomicU64::new(0);
/// CPUs (bit = index) sleeping in the idle loop.
static IDLE_CPUS: AtomicU64 = AtomicU64::new(0);
/// Sleeps until an interrupt or about `us` microseconds.
fn idle_sleep(us: u64) {
    crate::apic::arm_oneshot_us(us);
    x86_64::instructions::interrupts::enable_and_hlt();
    x86_64::instructions::interrupts::disable();
}

/// Detects the virtualization backend and turns it on on this CPU.
pub fn enable_this_cpu() -> Option<Backend> {
    let b = virt::detect()?;
    match virt::enable_this_cpu(b) {
        Ok(()) => {
            ENABLED_CPUS.fetch_add(1, Ordering::SeqCst);
            Some(b)
        }
        Err(e) => {
            error!("virtualization: {e}");
            None
        }
    }
}

/// The bytes of module `i` (`None` for [`boot_info::NO_MODULE`]).
fn module(bi: &BootInfo, i: u32) -> Option<&'static [u8]> {
    let m = bi.modules().get(i as usize)?;
    // SAFETY: the loader placed the module's bytes at `phys` (identity mapped, in a
    // Module region the frame allocator never hands out); they live forever.
    Some(unsafe { core::slice::from_raw_parts(m.phys as *const u8, m.len as usize) })
}

/// Records the configured VMs (nothing is created yet).
pub fn configure(bi: &BootInfo, backend: Backend) {
    let mut slots = Vec::new();
    for e in bi.vms() {
        let Some(m) = bi.modules().get(e.image_module as usize) else {
            continue;
        };
        // SAFETY: the loader placed the module's bytes at `phys` (identity mapped, in a
        // Module region the frame allocator never hands out); they live forever.
        let image: &'static [u8] =
            unsafe { core::slice::from_raw_parts(m.phys as *const u8, m.len as usize) };
        let spec = VmSpec {
            name: String::from(e.name()),
            memory_mib: e.memory_mib,
            vcpus: e.vcpus,
            weight: e.gpu_weight,
            gpu_alpha_tenths: e.gpu_alpha_tenths,
            vram_quota_mib: e.vram_quota_mib,
            linux: (e.kind == boot_info::GUEST_LINUX).then(|| LinuxSpec {
                initrd: module(bi, e.initrd_module),
                cmdline: module(bi, e.cmdline_module).unwrap_or(&[]),
            }),
        };
        slots.push(Mutex::new(Slot {
            spec,
            image,
            vm: None,
        }));
    }
    let vruntime = slots.iter().map(|_| AtomicU64::new(0)).collect();
    let wake_at = slots
        .iter()
        .map(|s| {
            let n = s.lock().spec.vcpus.max(1);
            (0..n).map(|_| AtomicU64::new(u64::MAX)).collect()
        })
        .collect();
    let queued_at = slots.iter().map(|_| AtomicU64::new(0)).collect();
    let gpu_interrupts = slots.iter().map(|_| spin::RwLock::new(None)).collect();
    MONITOR.call_once(|| Monitor {
        backend,
        slots,
        queue: Mutex::new(VecDeque::new()),
        vruntime,
        wake_at,
        queued_at,
        gpu_interrupts,
    });
    // The other CPUs turn virtualization on as soon as the monitor exists; wait for
    // them so their per-CPU state is in place before any VM (and any frame count).
    let deadline = crate::apic::now_us() + 1_000_000;
    while ENABLED_CPUS.load(Ordering::SeqCst) < cpu::ONLINE.load(Ordering::SeqCst)
        && crate::apic::now_us() < deadline
    {
        core::hint::spin_loop();
    }
}

/// Number of configured VMs.
pub fn slot_count() -> usize {
    MONITOR.get().map_or(0, |m| m.slots.len())
}

/// Creates VM `slot` (if not already there) and queues its vCPUs.
pub fn create(slot: usize) -> Result<(), CreateError> {
    let m = MONITOR
        .get()
        .ok_or(CreateError::BadConfig("monitor not configured"))?;
    let s = m
        .slots
        .get(slot)
        .ok_or(CreateError::BadConfig("no such VM"))?;
    let mut g = s.lock();
    if g.vm.is_some() {
        return Ok(());
    }
    let vm = Vm::create(m.backend, slot as u16, &g.spec, g.image, &m.wake_at[slot])?;
    info!(
        "vm {} created: {} MiB at {:#x}, {} vcpu(s), weight {}, {} frames",
        vm.name,
        g.spec.memory_mib,
        vm.mem_base,
        vm.vcpus.len(),
        vm.weight,
        vm.frames_held()
    );
    let n = vm.vcpus.len();
    if g.spec.linux.is_some() {
        // A Linux guest's shell is on its ttyS0: the console's keyboard goes there.
        crate::console::focus_if_none(slot);
    }
    *m.gpu_interrupts[slot].write() = vm.pending_gpu_interrupts();
    g.vm = Some(vm);
    drop(g);
    // A new VM starts level with the others, neither owed nor owing CPU time.
    let start = m
        .vruntime
        .iter()
        .map(|v| v.load(Ordering::Relaxed))
        .filter(|&v| v > 0)
        .min()
        .unwrap_or(0);
    m.vruntime[slot].store(start, Ordering::Relaxed);
    let mut q = m.queue.lock();
    for v in 0..n {
        if !q.contains(&(slot, v)) {
            q.push_back((slot, v));
        }
    }
    Ok(())
}

/// Creates every configured VM; returns how many were created.
pub fn create_all() -> usize {
    (0..slot_count())
        .filter(|&i| match create(i) {
            Ok(()) => true,
            Err(e) => {
                error!("vm #{i}: not created: {e}");
                false
            }
        })
        .count()
}

/// Applies `f` to VM `slot` if it exists.
pub fn with_vm<R>(slot: usize, f: impl FnOnce(&mut Vm) -> R) -> Option<R> {
    let m = MONITOR.get()?;
    let mut g = m.slots.get(slot)?.lock();
    g.vm.as_mut().map(f)
}

/// Whether another vCPU is waiting for a CPU and could run now. A halted vCPU
/// spins for its GPU completion (halt polling) only while this is false: polling
/// must never keep a CPU from a vCPU that has work (with several VMs drawing, it
/// left a neighbour with about 1 % of its frame rate; `bench-hostile`).
pub fn others_ready() -> bool {
    let Some(m) = MONITOR.get() else { return false };
    let Some(q) = m.queue.try_lock() else {
        return true;
    };
    let now = crate::apic::now_us();
    q.iter().any(|&(slot, vcpu)| m.ready(slot, vcpu, now))
}

/// Pauses VM `slot` (it keeps its memory and state).
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn pause(slot: usize) {
    with_vm(slot, |vm| {
        if vm.state == VmState::Running {
            vm.state = VmState::Paused;
            vm.kick_running();
            info!("vm {} paused", vm.name);
        }
    });
}

/// Resumes a paused VM.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn resume(slot: usize) {
    let n = with_vm(slot, |vm| {
        if vm.state == VmState::Paused {
            vm.state = VmState::Running;
            info!("vm {} resumed", vm.name);
            vm.vcpus.len()
        } else {
            0
        }
    });
    if let (Some(n), Some(m)) = (n, MONITOR.get()) {
        let mut q = m.queue.lock();
        for v in 0..n {
            if !q.contains(&(slot, v)) {
                q.push_back((slot, v));
            }
        }
    }
}

/// Destroys VM `slot`: its frames go back to the allocator (scrubbed).
pub fn destroy(slot: usize) {
    let Some(m) = MONITOR.get() else { return };
    let Some(s) = m.slots.get(slot) else { return };
    // Its vCPUs in guest mode on other CPUs are made to exit and leave first: their
    // memory must not go while a guest runs in it.
    let vm = loop {
        let mut g = s.lock();
        match g.vm.as_mut() {
            Some(vm) if vm.kick_running() => {
                if vm.state == VmState::Running || vm.state == VmState::Paused {
                    vm.state = VmState::Stopped(StopReason::Destroyed);
                }
                drop(g);
                core::hint::spin_loop();
            }
            _ => break g.vm.take(),
        }
    };
    *m.gpu_interrupts[slot].write() = None;
    // A gone VM's CPU time no longer counts: a VM created later starts level with the
    // live ones, not with this stale figure (which would let it take the CPUs from
    // the others until it caught up).
    m.vruntime[slot].store(0, Ordering::Relaxed);
    if let Some(mut vm) = vm {
        if vm.state == VmState::Running || vm.state == VmState::Paused {
            vm.state = VmState::Stopped(StopReason::Destroyed);
        }
        info!(
            "vm {} destroyed ({} frames returned)",
            vm.name,
            vm.frames_held()
        );
    }
}

/// Destroys and re-creates VM `slot` from its configuration.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn restart(slot: usize) -> Result<(), CreateError> {
    destroy(slot);
    create(slot)
}

/// Runs vCPUs on every CPU until no VM is running, or until `run_ms` (if given) has
/// passed, after which every VM is stopped.
pub fn run(run_ms: Option<u64>) {
    if let Some(ms) = run_ms {
        DEADLINE_US.store(crate::apic::now_us() + ms * 1000, Ordering::SeqCst);
    }
    NEXT_SAMPLE_US.store(
        crate::apic::now_us() + SAMPLE_US.load(Ordering::Relaxed),
        Ordering::SeqCst,
    );
    STOP_ALL.store(false, Ordering::SeqCst);
    RUN_GENERATION.fetch_add(1, Ordering::SeqCst);
    STARTED.store(true, Ordering::SeqCst);
    run_loop(true);
    while RUNNING_CPUS.load(Ordering::SeqCst) != 0 {
        core::hint::spin_loop();
    }
    STARTED.store(false, Ordering::SeqCst);
}

/// Application processors: wait for work, then run vCPUs; forever.
pub fn ap_loop() -> ! {
    let m = loop {
        if let Some(m) = MONITOR.get() {
            break m;
        }
        core::hint::spin_loop();
    };
    if let Err(e) = virt::enable_this_cpu(m.backend) {
        warn!("virtualization could not be enabled on this CPU ({e}); it stays idle");
        cpu::halt_forever();
    }
    ENABLED_CPUS.fetch_add(1, Ordering::SeqCst);
    // Each `run` has its own generation, so a CPU that slept through the end of one
    // run and the start of the next still joins the next.
    let mut joined = 0;
    loop {
        let generation = RUN_GENERATION.load(Ordering::SeqCst);
        if !STARTED.load(Ordering::SeqCst) || generation == joined {
            idle_sleep(1_000);
            continue;
        }
        joined = generation;
        run_loop(false);
    }
}

fn any_running(m: &Monitor) -> bool {
    // A slot locked by another CPU is handling a vCPU's exit: never wait for it here.
    m.slots.iter().any(|s| {
        s.try_lock()
            .is_none_or(|g| g.vm.as_ref().is_some_and(|vm| vm.state == VmState::Running))
    })
}

fn run_loop(bsp: bool) {
    let Some(m) = MONITOR.get() else { return };
    RUNNING_CPUS.fetch_add(1, Ordering::SeqCst);
    let me = cpu::current_index();
    let my_bit = 1u64 << me;
    crate::interrupts::register_wake_target(me);
    let several_cpus = cpu::ONLINE.load(Ordering::SeqCst) > 1;
    let mut last_work = 0u64;
    loop {
        let now = crate::apic::now_us();
        if now >= DEADLINE_US.load(Ordering::SeqCst) {
            STOP_ALL.store(true, Ordering::SeqCst);
        }
        let due = NEXT_SAMPLE_US.load(Ordering::Relaxed);
        if now >= due
            && NEXT_SAMPLE_US
                .compare_exchange(
                    due,
                    due + SAMPLE_US.load(Ordering::Relaxed),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            crate::gpu_share::sample();
        }
        crate::exit_sample::poll(now);
        if STOP_ALL.load(Ordering::SeqCst) {
            break;
        }
        if crate::gpu_share::service() {
            last_work = crate::apic::now_us();
        }
        if bsp {
            crate::inject::check_faults(&crate::iommu::service());
            crate::console::poll();
        }
        let now = crate::apic::now_us();
        // The GPU's interrupt CPU takes a vCPU only once the other CPUs have left
        // it waiting for half a slice, so a lone guest is not interrupted by the GPU.
        let gpu_cpu = me == GPU_IRQ_CPU && several_cpus;
        let mut left_waiting = false;
        let next = {
            let mut q = m.queue.lock();
            // The ready vCPU with the least weighted CPU time; halted ones wait for
            // their timer or a virtual GPU interrupt.
            let best = q
                .iter()
                .enumerate()
                .filter(|(_, &(slot, vcpu))| m.ready(slot, vcpu, now))
                .filter(|(_, (slot, _))| {
                    let waited = now.saturating_sub(m.queued_at[*slot].load(Ordering::Relaxed));
                    let ok = !gpu_cpu || waited >= BASE_SLICE_US / 2;
                    left_waiting |= !ok;
                    ok
                })
                .min_by_key(|(_, (slot, _))| m.vruntime[*slot].load(Ordering::Relaxed))
                .map(|(i, _)| i);
            best.and_then(|i| q.remove(i).map(|e| (e, q.is_empty())))
        };
        if next.is_none() && left_waiting {
            let idle = IDLE_CPUS.load(Ordering::Acquire) & !my_bit;
            if idle != 0 {
                crate::interrupts::wake_cpu(idle.trailing_zeros() as usize);
            }
        }
        let Some(((slot, vcpu), alone)) = next else {
            if m.queue.lock().is_empty() && !any_running(m) {
                break;
            }
            if now.saturating_sub(last_work) < IDLE_SPIN_US {
                // Work just moved: the guest is likely to answer within microseconds.
                core::hint::spin_loop();
                continue;
            }
            IDLE_CPUS.fetch_or(my_bit, Ordering::AcqRel);
            IDLE_SLEEPS[me].fetch_add(1, Ordering::Relaxed);
            idle_sleep(IDLE_POLL_US);
            IDLE_CPUS.fetch_and(!my_bit, Ordering::AcqRel);
            continue;
        };
        let slice_us = if alone && several_cpus {
            LONE_SLICE_US
        } else {
            BASE_SLICE_US
        };
        // A vCPU waking from a long halt is not owed the time it slept.
        let floor = m
            .queue
            .lock()
            .iter()
            .map(|(s, _)| m.vruntime[*s].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        m.vruntime[slot].fetch_max(
            floor.saturating_sub(BASE_SLICE_US * 1000),
            Ordering::Relaxed,
        );
        let again = run_vcpu_slice(m, slot, vcpu, slice_us);
        if again {
            m.queued_at[slot].store(crate::apic::now_us(), Ordering::Relaxed);
            m.queue.lock().push_back((slot, vcpu));
        }
    }
    RUNNING_CPUS.fetch_sub(1, Ordering::SeqCst);
}

/// Runs vCPU `vcpu` of VM `slot` for one slice; returns whether it goes back on the
/// run queue. The VM is locked only between the vCPU's exits and entries, so its other
/// vCPUs run on the other CPUs meanwhile.
fn run_vcpu_slice(m: &Monitor, slot: usize, vcpu: usize, slice_us: u64) -> bool {
    let mut g = m.slots[slot].lock();
    let Some(mut slice) =
        g.vm.as_mut()
            .filter(|vm| vm.state == VmState::Running)
            .and_then(|vm| vm.begin_slice(vcpu, slice_us))
    else {
        return g.vm.as_ref().is_some_and(|vm| vm.state == VmState::Running);
    };
    SLICES[cpu::current_index()].fetch_add(1, Ordering::Relaxed);
    loop {
        let Some(mut v) = g.vm.as_mut().and_then(|vm| vm.enter(&mut slice)) else {
            break;
        };
        drop(g);
        let exit = v.run();
        g = m.slots[slot].lock();
        // `destroy` waits for vCPUs in guest mode, so the VM is still there.
        let Some(vm) = g.vm.as_mut() else {
            return false;
        };
        if !vm.exited(&mut slice, v, exit, others_ready) {
            break;
        }
    }
    let Some(vm) = g.vm.as_mut() else {
        return false;
    };
    let used = vm.end_slice(slice);
    crate::exit_sample::record(slot, &vm.stats.exits_by_reason);
    let weight = if cfg!(feature = "test-broken-cpu-weights") {
        1
    } else {
        u64::from(vm.weight.max(1))
    };
    m.vruntime[slot].fetch_add(used * 1000 / weight, Ordering::Relaxed);
    vm.state == VmState::Running
}

/// One line per VM: state, exits, CPU time and its share against its weight; and
/// how the vCPU slices spread over the physical CPUs.
pub fn report() {
    let Some(m) = MONITOR.get() else { return };
    let per_cpu: alloc::vec::Vec<u64> = SLICES.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let used = per_cpu.iter().filter(|&&n| n > 0).count();
    let online = cpu::ONLINE.load(Ordering::SeqCst).min(cpu::MAX_CPUS);
    let idle: Vec<u64> = IDLE_SLEEPS[..online]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    info!(
        "vCPUs ran on {used} CPU(s): slices per CPU {:?}, idle sleeps per CPU {idle:?}",
        &per_cpu[..online]
    );
    if let Some(p) = virt::cpu_state::policy() {
        info!(
            "guest CPU state: XCR0 offered {:#x}, switched {:#x} ({} bytes per vCPU, {}); \
             {} guest XCR0 changes found at exits, not through an XSETBV exit",
            p.guest_allowed,
            p.switched,
            p.area_size,
            if p.xsave { "XSAVE" } else { "FXSAVE" },
            virt::cpu_state::NATIVE_XSETBV.load(Ordering::Relaxed)
        );
    }
    let mut total_us = 0u64;
    let mut total_w = 0u64;
    for s in &m.slots {
        if let Some(vm) = s.lock().vm.as_ref() {
            total_us += vm.stats.cpu_us;
            total_w += u64::from(vm.weight);
        }
    }
    for s in &m.slots {
        let g = s.lock();
        let Some(vm) = g.vm.as_ref() else { continue };
        info!(
            "vm {}: {:?}, {} exits ({} hypercalls, {} port I/O, {} halts resumed by polling), {} runs, cpu {} us = {}.{}% (weight {} = {}.{}%), {} lines printed, last {:?}",
            vm.name,
            vm.state,
            vm.stats.exits,
            vm.stats.hypercalls,
            vm.stats.io_exits,
            vm.stats.halt_polls_won,
            vm.stats.runs,
            vm.stats.cpu_us,
            vm.stats.cpu_us * 100 / total_us.max(1),
            vm.stats.cpu_us * 1000 / total_us.max(1) % 10,
            vm.weight,
            u64::from(vm.weight) * 100 / total_w.max(1),
            u64::from(vm.weight) * 1000 / total_w.max(1) % 10,
            vm.lines_printed,
            vm.last_line
        );
        info!("vm {} interrupts: {}", vm.name, vm.interrupt_report());
        info!("vm {} exits {}", vm.name, vm.exit_report());
    }
}

/// CPU time shares (VM name, share of all VM time in per mille, weight share in per
/// mille) of the VMs that exist.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn shares() -> Vec<(String, u64, u64)> {
    let Some(m) = MONITOR.get() else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    let (mut total_us, mut total_w) = (0u64, 0u64);
    for s in &m.slots {
        if let Some(vm) = s.lock().vm.as_ref() {
            total_us += vm.stats.cpu_us;
            total_w += u64::from(vm.weight);
            rows.push((vm.name.clone(), vm.stats.cpu_us, u64::from(vm.weight)));
        }
    }
    rows.into_iter()
        .map(|(n, us, w)| (n, us * 1000 / total_us.max(1), w * 1000 / total_w.max(1)))
        .collect()
}

/// The state of VM `slot`, if it exists.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn state(slot: usize) -> Option<VmState> {
    with_vm(slot, |vm| vm.state.clone())
}
