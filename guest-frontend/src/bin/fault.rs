//! Exercises the runtime's own failure paths; what it does depends on the VM's name
//! (the first of these found in it): `ud` executes `ud2` (#UD), `pf` reads above the
//! 4 GiB the guest page tables map (#PF), `gp` raises a vector without an IDT gate
//! (`int 0x80`: #GP naming vector 128), `panic` panics. Each should end in a printed
//! report and SHUTDOWN with 0x100 + vector (0xdead for the panic).
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::{exit, hypercall, println};

guest_frontend::entry!(main);

fn main(info: &BootInfo) -> ! {
    let name = info.name();
    if name.contains("ud") {
        println!("fault: about to execute ud2");
        // SAFETY: deliberately raises #UD, which the runtime's handler reports.
        unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    } else if name.contains("pf") {
        println!("fault: about to read 0x100000000 (not mapped by the guest page tables)");
        // SAFETY: deliberately raises #PF (the guest ABI maps only 0..4 GiB), which the
        // runtime's handler reports.
        let v = unsafe { (0x1_0000_0000 as *const u64).read_volatile() };
        println!("fault: read {v:#x}");
    } else if name.contains("gp") {
        println!("fault: about to raise vector 0x80, which has no IDT gate");
        // SAFETY: deliberately raises #GP (not-present gate), which the runtime's
        // handler reports.
        unsafe { core::arch::asm!("int 0x80", options(nomem, nostack)) };
    } else if name.contains("panic") {
        println!("fault: about to panic");
        panic!("on purpose in VM {}", name);
    } else {
        println!("fault: VM name {name:?} names no fault (ud, pf, gp, panic)");
    }
    println!("fault: still running");
    hypercall::shutdown(exit::FAILED)
}
