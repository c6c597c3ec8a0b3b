//! The VM monitor: creates the configured VMs and schedules their vCPUs on every
//! physical CPU from one run queue, each for a time slice proportional to its VM's
//! weight, preempted by the local APIC timer.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use boot_info::BootInfo;
use log::{error, info, warn};
use spin::Mutex;

use crate::arch::cpu;
use crate::virt::{self, Backend};
use crate::vm::{Vm, VmSpec, VmState};

/// Base vCPU time slice in microseconds (times the VM's weight).
pub const BASE_SLICE_US: u64 = 2_000;

struct Monitor {
    backend: Backend,
    vms: Vec<Arc<Mutex<Vm>>>,
    queue: Mutex<VecDeque<(usize, usize)>>,
}

static MONITOR: spin::Once<Monitor> = spin::Once::new();
static STARTED: AtomicBool = AtomicBool::new(false);
static RUNNING_CPUS: AtomicUsize = AtomicUsize::new(0);

/// Detects the virtualization backend and turns it on on this CPU.
pub fn enable_this_cpu() -> Option<Backend> {
    let b = virt::detect()?;
    match virt::enable_this_cpu(b) {
        Ok(()) => Some(b),
        Err(e) => {
            error!("virtualization: {e}");
            None
        }
    }
}

/// Creates every VM the configuration asks for. Returns how many were created.
pub fn create_vms(bi: &BootInfo, backend: Backend) -> usize {
    let mut vms = Vec::new();
    let mut queue = VecDeque::new();
    for (i, e) in bi.vms().iter().enumerate() {
        let Some(m) = bi.modules().get(e.image_module as usize) else { continue };
        // SAFETY: the loader placed the module's bytes at `phys` (identity mapped, kept
        // as a Module region that nothing else allocates).
        let image = unsafe { core::slice::from_raw_parts(m.phys as *const u8, m.len as usize) };
        let spec = VmSpec {
            name: String::from(e.name()),
            memory_mib: e.memory_mib,
            vcpus: e.vcpus,
            weight: e.gpu_weight,
        };
        match Vm::create(backend, i as u16, &spec, image) {
            Ok(vm) => {
                info!(
                    "vm {} created: {} MiB at {:#x}, {} vcpu(s), weight {}",
                    vm.name, e.memory_mib, vm.mem_base, e.vcpus, vm.weight
                );
                for v in 0..vm.vcpus.len().min(1) {
                    queue.push_back((vms.len(), v));
                }
                vms.push(Arc::new(Mutex::new(vm)));
            }
            Err(err) => error!("vm {}: not created: {err:?}", e.name()),
        }
    }
    let n = vms.len();
    MONITOR.call_once(|| Monitor { backend, vms, queue: Mutex::new(queue) });
    n
}

/// Lets the application processors join and runs vCPUs on this CPU until every VM
/// has stopped.
pub fn run_all() {
    STARTED.store(true, Ordering::SeqCst);
    run_loop();
    // Wait for the other CPUs to leave their current slice.
    while RUNNING_CPUS.load(Ordering::SeqCst) != 0 {
        core::hint::spin_loop();
    }
}

/// Application processors: wait for the monitor, then run vCPUs.
pub fn ap_loop() -> ! {
    while !STARTED.load(Ordering::SeqCst) {
        core::hint::spin_loop();
    }
    if let Some(m) = MONITOR.get() {
        if virt::enable_this_cpu(m.backend).is_ok() {
            run_loop();
        } else {
            warn!("virtualization could not be enabled on this CPU; it stays idle");
        }
    }
    cpu::halt_forever()
}

fn run_loop() {
    let Some(m) = MONITOR.get() else { return };
    RUNNING_CPUS.fetch_add(1, Ordering::SeqCst);
    loop {
        let next = m.queue.lock().pop_front();
        let Some((vmi, vcpu)) = next else {
            if m.vms.iter().all(|v| !matches!(v.lock().state, VmState::Running)) {
                break;
            }
            core::hint::spin_loop();
            continue;
        };
        let vm = &m.vms[vmi];
        let mut g = vm.lock();
        let slice = BASE_SLICE_US * u64::from(g.weight);
        g.run_slice(vcpu, slice);
        let again = g.state == VmState::Running;
        drop(g);
        if again {
            m.queue.lock().push_back((vmi, vcpu));
        }
    }
    RUNNING_CPUS.fetch_sub(1, Ordering::SeqCst);
}

/// One line per VM: state, exits, CPU time.
pub fn report() {
    let Some(m) = MONITOR.get() else { return };
    let total: u64 = m.vms.iter().map(|v| v.lock().stats.cpu_us).sum::<u64>().max(1);
    for v in &m.vms {
        let g = v.lock();
        info!(
            "vm {}: {:?}, {} exits ({} hypercalls, {} port I/O), {} runs, cpu {} us ({}% of VM time), weight {}",
            g.name,
            g.state,
            g.stats.exits,
            g.stats.hypercalls,
            g.stats.io_exits,
            g.stats.runs,
            g.stats.cpu_us,
            g.stats.cpu_us * 100 / total,
            g.weight
        );
    }
}
