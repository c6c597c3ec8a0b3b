//! Zero-copy buffer exchange: registers a page-aligned buffer of its RAM in the GPU's
//! IOMMU domain with GPU_REGISTER_BUFFER, checks that a buffer outside its RAM and an
//! unaligned one are refused, registers an overlapping one-page buffer and
//! unregisters it (the first buffer still holds that page), unregisters the first (and
//! checks that a second unregister fails), then shuts down with code 0.
#![no_std]
#![no_main]

use guest_frontend::abi::hypercall::{GPU_REGISTER_BUFFER, GPU_UNREGISTER_BUFFER, OK};
use guest_frontend::boot_info::BootInfo;
use guest_frontend::{exit, hypercall, println};

guest_frontend::entry!(main);

#[repr(C, align(4096))]
struct Buffer([u8; 4 * 4096]);
static mut BUFFER: Buffer = Buffer([0; 4 * 4096]);

fn main(bi: &BootInfo) -> ! {
    let gpa = &raw const BUFFER as u64;
    let (r, handle) = hypercall::call(GPU_REGISTER_BUFFER, gpa, 4 * 4096, 0, 0);
    if r != OK {
        println!("zerocopy: register failed: {r:#x}");
        hypercall::shutdown(exit::FAILED);
    }
    println!("zerocopy: buffer at {gpa:#x} registered as handle {handle}");
    let outside = bi.memory_bytes;
    let (bad, _) = hypercall::call(GPU_REGISTER_BUFFER, outside, 4096, 0, 0);
    let (unaligned, _) = hypercall::call(GPU_REGISTER_BUFFER, gpa + 8, 4096, 0, 0);
    let (r2, inner) = hypercall::call(GPU_REGISTER_BUFFER, gpa + 4096, 4096, 0, 0);
    let (un2, _) = hypercall::call(GPU_UNREGISTER_BUFFER, inner, 0, 0, 0);
    println!(
        "zerocopy: overlapping buffer {inner} registered: {}, unregistered: {}",
        r2 == OK,
        un2 == OK
    );
    let (un, _) = hypercall::call(GPU_UNREGISTER_BUFFER, handle, 0, 0, 0);
    let (again, _) = hypercall::call(GPU_UNREGISTER_BUFFER, handle, 0, 0, 0);
    println!(
        "zerocopy: outside RAM refused: {}, unaligned refused: {}, unregistered: {}, second unregister refused: {}",
        bad != OK,
        unaligned != OK,
        un == OK,
        again != OK
    );
    let ok = bad != OK && unaligned != OK && r2 == OK && un2 == OK && un == OK && again != OK;
    hypercall::shutdown(if ok { exit::OK } else { exit::FAILED })
}
