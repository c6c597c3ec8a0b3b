//! An MMIO load whose instruction straddles two pages that the guest's own page tables
//! map to non-adjacent physical pages: the hypervisor must fetch the second part
//! through those tables to decode it (`mov ecx, [rdx + 0x30]`, split after its first
//! byte, reading the virtual LAPIC's version register). Then the string forms Linux's
//! `memcpy_fromio`, `memcpy_toio` and `memset_io` compile to, against the LAPIC: `rep
//! movsd` from its registers into RAM (forwards and, with DF set, backwards), `rep
//! movsd` from RAM into its TPR, `rep stosd` and `stosd` into the TPR; each compared
//! with plain loads, with RSI, RDI and RCX as the CPU leaves them.
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
    if let Err(why) = string_forms() {
        println!("mmio-cross: FAIL: {why}");
        hypercall::shutdown(exit::FAILED)
    }
    println!("mmio-cross: rep movs and stos from and to the LAPIC: ok");
    hypercall::shutdown(exit::OK)
}

/// `rep movsd` of `n` dwords from `src` to `dst` (DF set when `down`); returns RSI,
/// RDI and RCX after it.
fn movsd(src: u64, dst: u64, n: u64, down: bool) -> (u64, u64, u64) {
    let (rsi, rdi, rcx): (u64, u64, u64);
    // SAFETY: `src` and `dst` are the LAPIC page or this function's caller's buffer,
    // `n` dwords long in the direction given; DF is cleared again right after.
    unsafe {
        if down {
            asm!("std", "rep movsd", "cld",
                 inout("rsi") src => rsi, inout("rdi") dst => rdi, inout("rcx") n => rcx);
        } else {
            asm!("rep movsd",
                 inout("rsi") src => rsi, inout("rdi") dst => rdi, inout("rcx") n => rcx);
        }
    }
    (rsi, rdi, rcx)
}

fn string_forms() -> Result<(), &'static str> {
    let base = guest::LAPIC_BASE;
    // Plain loads of the ID register and the three reserved dwords after it.
    // SAFETY: the LAPIC page is mapped (identity) and reads have no side effects.
    let regs =
        [0x20u64, 0x24, 0x28, 0x2c].map(|o| unsafe { ((base + o) as *const u32).read_volatile() });
    // memcpy_fromio: four dwords from the ID register on.
    let mut buf = [0u32; 4];
    let dst = buf.as_mut_ptr() as u64;
    let after = movsd(base + 0x20, dst, 4, false);
    // SAFETY: reads our own buffer back after the asm wrote it.
    let got = unsafe { core::ptr::read_volatile(&buf) };
    if got != regs {
        return Err("rep movsd from the LAPIC read other values than plain loads");
    }
    if after != (base + 0x30, dst + 16, 0) {
        return Err("rep movsd from the LAPIC left RSI/RDI/RCX wrong");
    }
    // The same backwards (DF set): from 0x2c down into the buffer's end.
    let mut back = [0u32; 4];
    let end = back.as_mut_ptr() as u64 + 12;
    let after = movsd(base + 0x2c, end, 4, true);
    // SAFETY: as above.
    let got = unsafe { core::ptr::read_volatile(&back) };
    if got != regs || after != (base + 0x1c, end - 16, 0) {
        return Err("rep movsd with DF set went the wrong way");
    }
    // memcpy_toio: one dword from RAM into the TPR.
    let tpr = [0x30u32];
    let after = movsd(tpr.as_ptr() as u64, base + u64::from(lapic::TPR), 1, false);
    if lapic::read(lapic::TPR) & 0xff != 0x30 || after.2 != 0 {
        return Err("rep movsd into the TPR did not land");
    }
    // memset_io: rep stosd, then a lone stosd.
    let (rdi, rcx): (u64, u64);
    // SAFETY: writes the TPR (one dword) through the LAPIC page.
    unsafe {
        asm!("rep stosd", inout("rdi") base + u64::from(lapic::TPR) => rdi,
             inout("rcx") 1u64 => rcx, in("eax") 0x20u32);
    }
    if lapic::read(lapic::TPR) & 0xff != 0x20 || (rdi, rcx) != (base + 0x84, 0) {
        return Err("rep stosd into the TPR did not land");
    }
    // SAFETY: as above.
    unsafe { asm!("stosd", inout("rdi") base + u64::from(lapic::TPR) => _, in("eax") 0u32) };
    if lapic::read(lapic::TPR) != 0 {
        return Err("stosd into the TPR did not land");
    }
    Ok(())
}
