//! Behaviours selected by `test=...` on the command line, for the emulator scenarios:
//! each checks something a user of the hypervisor would check, prints what it saw and
//! ends the run passing or failing.

use log::{error, info};

use crate::{exit, mm, vmm};
use crate::vm::VmState;

/// `test=vm-cycles`: creates, runs and destroys the first configured VM 100 times;
/// the frame count must come back to where it started.
pub fn vm_cycles() -> ! {
    let before = mm::frames::stats().allocated;
    for i in 0..100 {
        if let Err(e) = vmm::create(0) {
            error!("cycle {i}: create failed: {e:?}");
            exit::fail("create");
        }
        vmm::run(Some(2_000));
        if vmm::state(0).is_some_and(|s| s == VmState::Running) {
            error!("cycle {i}: the VM did not finish in 2 s");
            exit::fail("vm did not finish");
        }
        vmm::destroy(0);
    }
    let after = mm::frames::stats().allocated;
    info!("vm cycles: 100 create/run/destroy cycles, frames allocated before {before}, after {after}");
    if before == after {
        info!("vm cycles: no frame leaked");
        exit::pass()
    }
    exit::fail("frames leaked")
}

/// `test=cpu-share run_ms=N`: runs every VM (CPU hogs) for N ms; each VM's share of
/// CPU time must be within 5 percentage points of its weight's share.
pub fn cpu_share(run_ms: u64) -> ! {
    vmm::create_all();
    vmm::run(Some(run_ms));
    vmm::report();
    let mut ok = true;
    for (name, got, want) in vmm::shares() {
        let diff = got.abs_diff(want);
        info!("cpu share {name}: {}.{}% of VM time for a weight share of {}.{}%", got / 10, got % 10, want / 10, want % 10);
        ok &= diff <= 50;
    }
    if ok {
        info!("cpu shares follow the weights");
        exit::pass()
    }
    exit::fail("cpu shares off")
}

/// `test=lifecycle`: pause, resume, restart and destroy, with frame accounting.
pub fn lifecycle() -> ! {
    let before = mm::frames::stats().allocated;
    vmm::create_all();
    vmm::run(Some(1_000));
    vmm::pause(0);
    let cpu_paused = vmm::with_vm(0, |vm| vm.stats.cpu_us).unwrap_or(0);
    vmm::run(Some(1_000));
    let cpu_after = vmm::with_vm(0, |vm| vm.stats.cpu_us).unwrap_or(0);
    if cpu_after != cpu_paused {
        error!("a paused VM ran ({cpu_paused} us -> {cpu_after} us)");
        exit::fail("paused vm ran");
    }
    info!("lifecycle: paused VM did not run");
    vmm::resume(0);
    vmm::run(Some(500));
    if let Err(e) = vmm::restart(0) {
        error!("restart failed: {e:?}");
        exit::fail("restart");
    }
    info!("lifecycle: VM restarted");
    vmm::run(Some(1_000));
    vmm::report();
    for i in 0..vmm::slot_count() {
        vmm::destroy(i);
    }
    let after = mm::frames::stats().allocated;
    info!("lifecycle: frames allocated before {before}, after destroying all {after}");
    if before != after {
        exit::fail("frames leaked");
    }
    exit::pass()
}

/// `test=bench-vm run_ms=N`: runs the configured VMs (a hypercall ping-pong and a
/// heartbeat) and prints the virtualization figures as `bench:` lines: VM-exit round
/// trips per second and hypercall cost (from the ping-pong VM), exits per heartbeat
/// line, and boot-to-first-guest time next to the firmware's own start-up time.
pub fn bench_vm(bi: &boot_info::BootInfo, run_ms: u64) -> ! {
    vmm::create_all();
    vmm::run(Some(run_ms));
    vmm::report();
    let backend = crate::virt::detect().map_or("none", |b| match b {
        crate::virt::Backend::Svm => "SVM",
        crate::virt::Backend::Vmx => "VMX",
    });
    for i in 0..vmm::slot_count() {
        vmm::with_vm(i, |vm| {
            let st = vm.stats;
            if st.hypercalls >= 1000 && st.cpu_us > 0 {
                info!(
                    "bench: {backend} vm-exit round trips per second: {} ({} exits in {} us of guest CPU time)",
                    st.exits * 1_000_000 / st.cpu_us,
                    st.exits,
                    st.cpu_us
                );
                info!("bench: {backend} hypercall round trip: {} ns", st.cpu_us * 1000 / st.hypercalls.max(1));
            } else if vm.lines_printed > 1 {
                info!(
                    "bench: {backend} exits per heartbeat line: {} ({} exits, {} lines)",
                    st.exits / vm.lines_printed,
                    st.exits,
                    vm.lines_printed
                );
            }
        });
    }
    let per_ms = crate::apic::tsc_per_ms().max(1);
    let first = crate::vm::FIRST_GUEST_LINE_TSC.load(core::sync::atomic::Ordering::Relaxed);
    let firmware = bi.loader_entry_tsc;
    if first > firmware && firmware > 0 {
        let fw_ms = firmware / per_ms;
        let hv_ms = (first - firmware) / per_ms;
        info!(
            "bench: {backend} boot to first guest line: {hv_ms} ms after the loader started; firmware to loader: {fw_ms} ms; ratio {}.{:02}",
            hv_ms / fw_ms.max(1),
            hv_ms * 100 / fw_ms.max(1) % 100
        );
    }
    exit::pass()
}
