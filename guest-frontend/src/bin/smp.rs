//! Two vCPUs: the bootstrap vCPU starts vCPU 1 with the VCPU_START hypercall; vCPU 1
//! counts on a shared atomic; the bootstrap vCPU waits for it, reports and shuts down.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use guest_frontend::abi::hypercall::{OK, VCPU_START};
use guest_frontend::boot_info::BootInfo;
use guest_frontend::{exit, hypercall, println};

guest_frontend::entry!(main);

const COUNT: u64 = 100_000;
static COUNTED: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicU64 = AtomicU64::new(0);
static mut AP_STACK: [u8; 16384] = [0; 16384];

extern "sysv64" fn ap_main(arg: u64) -> ! {
    for _ in 0..COUNT {
        COUNTED.fetch_add(1, Ordering::Relaxed);
    }
    DONE.store(arg, Ordering::Release);
    loop {
        hypercall::yield_now();
    }
}

fn main(bi: &BootInfo) -> ! {
    if bi.vcpus < 2 {
        println!("smp: needs 2 vcpus, has {}", bi.vcpus);
        hypercall::shutdown(exit::FAILED);
    }
    let top = (&raw const AP_STACK as u64) + 16384 - 8;
    let (r, _) = hypercall::call(VCPU_START, 1, ap_main as *const () as u64, top, 0x5eed);
    if r != OK {
        println!("smp: VCPU_START failed: {r:#x}");
        hypercall::shutdown(exit::FAILED);
    }
    let (again, _) = hypercall::call(VCPU_START, 1, ap_main as *const () as u64, top, 0x5eed);
    while DONE.load(Ordering::Acquire) == 0 {
        hypercall::yield_now();
    }
    println!(
        "smp: vcpu1 ran with arg {:#x} and counted {}; a second start was refused: {}",
        DONE.load(Ordering::Relaxed),
        COUNTED.load(Ordering::Relaxed),
        again != OK
    );
    hypercall::shutdown(exit::OK)
}
