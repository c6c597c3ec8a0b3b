//! Hypercall round trips: 1000 VERSION hypercalls, each checked for an answer, timed
//! with the TSC; then SHUTDOWN with code 0 (1 if a call failed).
//!
//! The average is wall-clock TSC cycles, so it includes any time the VM spent
//! descheduled; the fastest single round trip shows the exit cost alone.
#![no_std]
#![no_main]

use guest_frontend::abi::hypercall::{ERR_INVALID, ERR_UNKNOWN};
use guest_frontend::boot_info::BootInfo;
use guest_frontend::{cpu, exit, hypercall, println};

guest_frontend::entry!(main);

const ROUNDS: u64 = 1000;

fn main(_: &BootInfo) -> ! {
    let (first, _) = hypercall::version();
    let mut fastest = u64::MAX;
    let t0 = cpu::rdtsc();
    for i in 0..ROUNDS {
        let before = cpu::rdtsc();
        let (v, _) = hypercall::version();
        fastest = fastest.min(cpu::rdtsc().wrapping_sub(before));
        if v == ERR_UNKNOWN || v == ERR_INVALID || v != first {
            println!("pingpong: hypercall {i} returned {v:#x} (first returned {first:#x})");
            hypercall::shutdown(exit::FAILED);
        }
    }
    let cycles = cpu::rdtsc().wrapping_sub(t0) / ROUNDS;
    println!("pingpong: {ROUNDS} hypercalls ok, {cycles} cycles each (fastest {fastest})");
    hypercall::shutdown(exit::OK)
}
