//! The smallest guest: says hello on its serial port and halts with interrupts off
//! (the hypervisor then stops the VM as halted forever).
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::{halt, serial};

guest_frontend::entry!(main);

fn main(_: &BootInfo) -> ! {
    serial::write("hello from a GPU-PV guest\n");
    halt()
}
