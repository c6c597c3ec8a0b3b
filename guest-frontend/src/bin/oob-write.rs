//! Misbehaving guest: writes to guest-physical 0x8000_0000, beyond its RAM (the guest
//! page tables map it, so the write reaches nested paging).
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::{exit, hypercall, println};

guest_frontend::entry!(main);

const TARGET: u64 = 0x8000_0000;

fn main(info: &BootInfo) -> ! {
    println!(
        "bad: about to write outside guest RAM at {TARGET:#x} (RAM is {} MiB)",
        info.memory_mib()
    );
    // SAFETY: deliberately out of bounds: the guest page tables identity map 0..4 GiB
    // and this guest's RAM ends below TARGET, so the write traps to the hypervisor.
    unsafe { (TARGET as *mut u64).write_volatile(0x0bad_0bad_0bad_0bad) };
    println!("bad: still running after the write outside RAM");
    hypercall::shutdown(exit::FAILED)
}
