//! Misbehaving guest: `out 0x80, al` in a tight loop forever (a VM exit storm).
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::println;

guest_frontend::entry!(main);

fn main(_: &BootInfo) -> ! {
    println!("bad: about to storm port 0x80 with out instructions forever");
    loop {
        // SAFETY: port 0x80 (POST codes) output has no memory effects; in a VM every
        // one exits to the hypervisor, which is the point.
        unsafe {
            core::arch::asm!("out 0x80, al", in("al") 0u8, options(nomem, nostack, preserves_flags))
        };
    }
}
