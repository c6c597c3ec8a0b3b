//! Misbehaving guest: loads an IDT with limit 0 and executes `int3`, so #BP, #GP and
//! #DF all fail to deliver: a triple fault (shutdown) the hypervisor must contain.
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::{exit, hypercall, println};

guest_frontend::entry!(main);

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

fn main(_: &BootInfo) -> ! {
    println!("bad: about to triple fault (empty IDT, then int3)");
    let empty = Pointer { limit: 0, base: 0 };
    // SAFETY: deliberately breaks this VM: with an empty IDT the int3 cannot be
    // delivered and the vCPU shuts down. Nothing else is touched.
    unsafe {
        core::arch::asm!("cli", "lidt [{}]", "int3", in(reg) &raw const empty, options(readonly, nostack))
    };
    println!("bad: still running after the triple fault");
    hypercall::shutdown(exit::FAILED)
}
