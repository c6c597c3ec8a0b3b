//! An MMIO load whose instruction straddles two pages that the guest's own page tables
//! map to non-adjacent physical pages: the hypervisor must fetch the second part
//! through those tables to decode it (`mov ecx, [rdx + 0x30]`, split after its first
//! byte, reading the virtual LAPIC's version register).
//!
//! Prints `mmio-cross: ... ok` and shuts down with 0; a wrong register, value or
//! instruction length fails the run (or faults).
#![no_std]
#![no_main]

use core::arch::asm;

use guest_frontend::abi::guest;
use guest_frontend::boot_info::BootInfo;
use guest_frontend::{dma, exit, hypercall, lapic, println};

guest_frontend::entry!(main);

/// Where the test maps its two code pages: the 4 GiB the boot tables leave unmapped.
const CODE_VA: u64 = 4 << 30;

fn main(_: &BootInfo) -> ! {
    let (Some(pd), Some(pt), Some(p1), Some(_gap), Some(p2)) = (
        dma::alloc_pages(1),
        dma::alloc_pages(1),
        dma::alloc_pages(1),
        dma::alloc_pages(1),
        dma::alloc_pages(1),
    ) else {
        println!("mmio-cross: out of memory");
        hypercall::shutdown(exit::FAILED)
    };
    // Page-table entries and pointers take the raw addresses (identity mapped).
    let (pd, pt, p1, p2) = (pd.get(), pt.get(), p1.get(), p2.get());
    // SAFETY: the pages are ours (identity-mapped below 4 GiB); PDPT entry 4 is unused
    // by the boot tables, so the new mapping touches nothing else.
    unsafe {
        ((guest::PDPT + 4 * 8) as *mut u64).write_volatile(pd | 0x3);
        (pd as *mut u64).write_volatile(pt | 0x3);
        (pt as *mut u64).write_volatile(p1 | 0x3);
        ((pt + 8) as *mut u64).write_volatile(p2 | 0x3);
        // mov ecx, [rdx + 0x30]; ret   (8b 4a 30 c3), split after the opcode byte.
        ((p1 + 4095) as *mut u8).write_volatile(0x8b);
        for (i, b) in [0x4au8, 0x30, 0xc3].iter().enumerate() {
            ((p2 + i as u64) as *mut u8).write_volatile(*b);
        }
    }
    let version: u32;
    // SAFETY: calls the three-instruction routine just written; it reads the LAPIC
    // version register (an MMIO exit) into ECX and returns.
    unsafe {
        asm!(
            "call {f}",
            f = in(reg) CODE_VA + 4095,
            inout("rdx") guest::LAPIC_BASE => _,
            out("ecx") version,
            clobber_abi("C"),
        )
    };
    let want = lapic::read(lapic::VERSION);
    if version != want {
        println!(
            "mmio-cross: FAIL: the split load read {version:#x}, the LAPIC version is {want:#x}"
        );
        hypercall::shutdown(exit::FAILED)
    }
    println!(
        "mmio-cross: an MMIO load split across two pages read the LAPIC version {version:#x}: ok"
    );
    hypercall::shutdown(exit::OK)
}
