//! A CPU hog: spins forever with interrupts on and never halts or yields, so only
//! the hypervisor's preemption takes the CPU back. A 10 Hz timer lets it print
//! `hog <vm name> alive <n>` every 10 ticks.
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::{println, timer};

guest_frontend::entry!(main);

const HZ: u32 = 10;
const EVERY: u64 = 10;

fn main(info: &BootInfo) -> ! {
    println!(
        "hog: {} about to spin forever with interrupts on (timer at {HZ} Hz)",
        info.name()
    );
    timer::start(HZ);
    let mut printed = 0;
    let mut spins = 0u64;
    loop {
        let n = timer::ticks() / EVERY;
        if n > printed {
            printed = n;
            println!("hog {} alive {n}", info.name());
        }
        // Busy work the compiler cannot drop.
        spins = core::hint::black_box(spins.wrapping_add(1));
    }
}
