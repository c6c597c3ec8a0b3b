//! The page tables the loader leaves behind and the jump into the hypervisor.
//!
//! Identity map of all physical memory below `max(4 GiB, top of RAM)` with 2 MiB
//! pages (so the hypervisor reaches RAM, ACPI tables and low MMIO before it builds its
//! own tables), plus the hypervisor image at its link address with 4 KiB pages.

use alloc::string::String;
use uefi::boot::MemoryType;

use crate::{alloc_pages, LoadedImage};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 2;
const HUGE: u64 = 1 << 7;

fn table(ty: MemoryType) -> Result<*mut u64, String> {
    Ok(alloc_pages(ty, 4096, "page tables")?.cast::<u64>())
}

/// Returns the entry at `idx` of `t`, allocating the next-level table if empty.
///
/// # Safety
/// `t` must point to a live, identity-mapped page table.
unsafe fn next(t: *mut u64, idx: usize, ty: MemoryType) -> Result<*mut u64, String> {
    // SAFETY: `idx < 512` by construction of the callers; `t` is valid per the contract.
    let e = unsafe { t.add(idx) };
    // SAFETY: as above.
    unsafe {
        if *e & PRESENT == 0 {
            let n = table(ty)?;
            *e = n as u64 | PRESENT | WRITABLE;
        }
        Ok((*e & 0x000f_ffff_ffff_f000) as *mut u64)
    }
}

/// Builds the hand-over tables; returns the physical address of the PML4.
pub fn build_page_tables(
    max_phys: u64,
    image: &LoadedImage,
    ty: MemoryType,
) -> Result<u64, String> {
    let pml4 = table(ty)?;
    let top = max_phys.max(4 << 30).div_ceil(1 << 30) << 30;
    let mut addr = 0u64;
    while addr < top {
        // SAFETY: tables come from `table`, identity mapped by UEFI.
        unsafe {
            let pdpt = next(pml4, ((addr >> 39) & 511) as usize, ty)?;
            let pd = next(pdpt, ((addr >> 30) & 511) as usize, ty)?;
            *pd.add(((addr >> 21) & 511) as usize) = addr | PRESENT | WRITABLE | HUGE;
        }
        addr += 2 << 20;
    }
    let mut off = 0u64;
    while off < image.size {
        let va = image.virt + off;
        // SAFETY: as above; indices are masked to 0..512.
        unsafe {
            let pdpt = next(pml4, ((va >> 39) & 511) as usize, ty)?;
            let pd = next(pdpt, ((va >> 30) & 511) as usize, ty)?;
            let pt = next(pd, ((va >> 21) & 511) as usize, ty)?;
            *pt.add(((va >> 12) & 511) as usize) = (image.phys + off) | PRESENT | WRITABLE;
        }
        off += 4096;
    }
    Ok(pml4 as u64)
}

/// Switches to the hand-over tables and stack and enters the hypervisor with the
/// BootInfo's physical address in RDI (System V).
///
/// # Safety
/// `pml4` must map this code, `stack_top` and `boot_info` at their identity, and
/// `entry` at its link address; boot services must have been exited.
pub unsafe fn jump(pml4: u64, stack_top: u64, entry: u64, boot_info: u64) -> ! {
    // SAFETY: per the contract; nothing after the jump returns here.
    unsafe {
        core::arch::asm!(
            "cli",
            "mov cr3, {pml4}",
            "mov rsp, {stack}",
            "xor rbp, rbp",
            "jmp {entry}",
            pml4 = in(reg) pml4,
            stack = in(reg) stack_top,
            entry = in(reg) entry,
            in("rdi") boot_info,
            options(noreturn)
        )
    }
}
