//! Misbehaving guest: disables interrupts and spins forever (never halts, never
//! exits: only the hypervisor's own preemption takes the CPU back).
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::{cpu, println};

guest_frontend::entry!(main);

fn main(_: &BootInfo) -> ! {
    println!("bad: about to disable interrupts and spin forever");
    cpu::cli();
    loop {
        core::hint::spin_loop();
    }
}
