//! The smallest guest: says hello on its serial port and halts.
#![no_std]
#![no_main]

use guest_frontend::{halt, serial};

/// Guest entry (the guest ABI starts it in 64-bit mode with a stack).
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.entry")]
pub extern "sysv64" fn _start() -> ! {
    guest_frontend::heap::init();
    serial::write("hello from a GPU-PV guest\n");
    halt()
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    serial::write("guest panic\n");
    halt()
}
