//! A well-behaved periodic guest: the virtual local APIC timer at 100 Hz, HLT with
//! interrupts on between ticks, `heartbeat <n> from <vm name>` every 10 ticks, forever.
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::{println, timer};

guest_frontend::entry!(main);

const HZ: u32 = 100;
const EVERY: u64 = 10;

fn main(info: &BootInfo) -> ! {
    println!(
        "heartbeat: {} (vm id {}, {} MiB, {} vcpus) timer at {HZ} Hz",
        info.name(),
        info.vm_id,
        info.memory_mib(),
        info.vcpus
    );
    timer::start(HZ);
    let mut seen = 0;
    let mut printed = 0;
    loop {
        seen = timer::wait_for_tick_after(seen);
        let n = seen / EVERY;
        if n > printed {
            printed = n;
            println!("heartbeat {n} from {}", info.name());
        }
    }
}
