//! A malicious GPU guest: rings its doorbells thousands of times with nothing
//! queued (control queue, cursor queue, and queue indices the device does not
//! have), then checks the device still works by drawing. One line per step:
//! `gpu-doorbell-storm <name>: ...`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use guest_frontend::boot_info::BootInfo;
use guest_frontend::virtio_gpu::app::App;
use guest_frontend::virtio_gpu::{status, CONTROL_QUEUE, CURSOR_QUEUE, TICK_HZ};
use guest_frontend::{cpu, exit, hypercall, mmio, println, timer};

guest_frontend::entry!(main);

/// Doorbells per round.
const CONTROL_NOTIFIES: u32 = 1500;
const CURSOR_NOTIFIES: u32 = 500;
const BOGUS_NOTIFIES: u32 = 200;

fn main(info: &BootInfo) -> ! {
    let mut app = match App::start("gpu-doorbell-storm", info, false) {
        Ok(a) => a,
        Err(e) => {
            println!("gpu-doorbell-storm {}: error: {e}", info.name());
            hypercall::shutdown(exit::FAILED)
        }
    };
    let tag = app.tag.clone();
    if let Err(e) = app.setup(false).and_then(|()| app.frame()) {
        app.fail(&e);
    }
    if let Err(e) = app.gpu.wait_idle() {
        app.fail(&e);
    }
    println!("{tag}: step 1: one good frame, nothing in flight");

    // Each doorbell is one trapped MMIO write; its cost (TSC cycles around it) is
    // kept to show how long the hypervisor holds the vCPU per doorbell.
    let n = CONTROL_NOTIFIES + CURSOR_NOTIFIES;
    let mut cycles: Vec<u64> = Vec::with_capacity(n as usize);
    let t0 = timer::ticks();
    let c0 = cpu::rdtsc();
    for i in 0..n {
        let q = if i < CONTROL_NOTIFIES {
            CONTROL_QUEUE
        } else {
            CURSOR_QUEUE
        };
        let a = cpu::rdtsc();
        app.gpu.notify(q);
        cycles.push(cpu::rdtsc().wrapping_sub(a));
    }
    let total = cpu::rdtsc().wrapping_sub(c0);
    let ticks = timer::ticks() - t0;
    let ms = ticks * 1000 / u64::from(TICK_HZ);
    println!(
        "{tag}: step 2: {n} doorbells with nothing queued ({CONTROL_NOTIFIES} control, {CURSOR_NOTIFIES} cursor) in about {ms} ms"
    );
    cycles.sort_unstable();
    if ticks >= 2 {
        // TSC cycles per microsecond, from the APIC tick over the whole storm.
        let per_us = (total / (ms * 1000).max(1)).max(1);
        let at = |p: usize| cycles[(cycles.len() - 1) * p / 100] / per_us;
        println!(
            "{tag}: per doorbell: min {} us, median {} us, p99 {} us, max {} us ({per_us} TSC cycles/us)",
            cycles[0] / per_us,
            at(50),
            at(99),
            cycles[cycles.len() - 1] / per_us
        );
    }

    // Queue indices 2..=7: the device has two queues.
    let t = &app.gpu.pci;
    for i in 0..BOGUS_NOTIFIES {
        let q = 2 + (i % 6) as u16;
        let addr = t.notify_addr(q);
        if addr + 2 <= t.notify + u64::from(t.notify_len) {
            // SAFETY: inside the device's notify region (checked), not guest RAM.
            unsafe { mmio::write16(addr, q) };
        }
    }
    println!("{tag}: step 3: {BOGUS_NOTIFIES} doorbells on queues 2..7 that do not exist");

    let st = app.gpu.status();
    println!(
        "{tag}: step 4: status {st:#x}{}",
        if st & status::DEVICE_NEEDS_RESET != 0 {
            " (DEVICE_NEEDS_RESET)"
        } else {
            ", device still live"
        }
    );
    for _ in 0..3 {
        if let Err(e) = app.frame() {
            app.fail(&e);
        }
    }
    println!("{tag}: step 5: survived, drawing correctly");
    app.run_forever()
}
