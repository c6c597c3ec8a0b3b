//! Proves timer interrupt injection, EOI and HLT wake-up: the virtual local APIC timer
//! at 100 Hz, HLT with interrupts on until 50 ticks, then SHUTDOWN with code 0.
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::{cpu, exit, hypercall, lapic, println, timer};

guest_frontend::entry!(main);

const HZ: u32 = 100;
const TICKS: u64 = 50;

fn main(info: &BootInfo) -> ! {
    println!(
        "timer: {} lapic id {:#x} version {:#x}, periodic at {HZ} Hz",
        info.name(),
        lapic::read(lapic::ID),
        lapic::read(lapic::VERSION)
    );
    let t0 = cpu::rdtsc();
    timer::start(HZ);
    let mut seen = 0;
    let mut wakeups = 0u64;
    while seen < TICKS {
        seen = timer::wait_for_tick_after(seen);
        wakeups += 1;
    }
    cpu::cli();
    timer::stop();
    let cycles = cpu::rdtsc().wrapping_sub(t0);
    println!("timer: {TICKS} ticks ok ({wakeups} wake-ups, {cycles} TSC cycles)");
    hypercall::shutdown(exit::OK)
}
