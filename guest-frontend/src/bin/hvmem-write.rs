//! Misbehaving guest: writes to guest-physical 0xFED9_0000, where the host's IOMMU
//! registers live on the test machine: a device this guest does not own.
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::{exit, hypercall, println};

guest_frontend::entry!(main);

const TARGET: u64 = 0xfed9_0000;

fn main(_: &BootInfo) -> ! {
    println!("bad: about to write to {TARGET:#x} (the host IOMMU's registers)");
    // SAFETY: deliberately touches an address this guest does not own; the guest page
    // tables map it, so the write traps to the hypervisor.
    unsafe { (TARGET as *mut u32).write_volatile(0xffff_ffff) };
    println!("bad: still running after writing the host IOMMU's registers");
    hypercall::shutdown(exit::FAILED)
}
