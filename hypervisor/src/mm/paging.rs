//! The hypervisor's own page tables.
//!
//! - Identity map of physical memory from 0 to `max(4 GiB, top of RAM)`, 2 MiB pages,
//!   read/write, never executable (the first 2 MiB in 4 KiB pages so the AP start-up
//!   page alone can be executable).
//! - MMIO the kernel needs beyond that (e.g. 64-bit BARs) through [`map_mmio`], uncached.
//! - The hypervisor image at its link address with 4 KiB pages: text R-X, rodata R--,
//!   data/bss RW- (W^X).
//!
//! The PML4 sits below 4 GiB so application processors can load it from 32-bit code.

use boot_info::{BootInfo, RegionKind};
use spin::Mutex;
use x86_64::registers::control::{Cr0, Cr0Flags, Cr3, Cr3Flags};
use x86_64::registers::model_specific::{Efer, EferFlags};
use x86_64::structures::paging::PhysFrame;
use x86_64::PhysAddr;

use super::{frames, phys_to_ptr, PAGE_SIZE};

const P: u64 = 1;
const W: u64 = 1 << 1;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const NX: u64 = 1 << 63;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Page permissions.
#[derive(Clone, Copy, Debug)]
pub enum Perm {
    /// Read + execute.
    Text,
    /// Read only.
    ReadOnly,
    /// Read + write, no execute.
    Data,
    /// Read + write + execute (only the AP start-up page).
    Trampoline,
    /// Read + write, uncached, no execute.
    Mmio,
}

impl Perm {
    fn bits(self) -> u64 {
        match self {
            Perm::Text => P,
            Perm::ReadOnly => P | NX,
            Perm::Data => P | W | NX,
            Perm::Trampoline => P | W,
            Perm::Mmio => P | W | PCD | PWT | NX,
        }
    }
}

struct Tables {
    pml4: u64,
    identity_top: u64,
}

static TABLES: Mutex<Option<Tables>> = Mutex::new(None);

fn new_table() -> u64 {
    frames::alloc_contiguous(1, PAGE_SIZE, 1 << 32).expect("out of frames for page tables")
}

/// Returns the table the entry `idx` of table `t` points to, creating it if needed
/// (splitting a 2 MiB page if one is there).
fn walk(t: u64, idx: u64) -> u64 {
    let e = phys_to_ptr::<u64>(t + idx * 8);
    // SAFETY: `t` is one of our identity-mapped table frames and `idx < 512`.
    unsafe {
        let v = *e;
        if v & P == 0 {
            let n = new_table();
            *e = n | P | W;
            n
        } else if v & HUGE != 0 {
            let n = new_table();
            let base = v & ADDR & !0x1f_ffff;
            let flags = v & !(ADDR | HUGE);
            for i in 0..512u64 {
                *phys_to_ptr::<u64>(n + i * 8) = (base + i * PAGE_SIZE) | flags;
            }
            *e = n | P | W;
            n
        } else {
            v & ADDR
        }
    }
}

fn map_4k(pml4: u64, va: u64, pa: u64, perm: Perm) {
    let pdpt = walk(pml4, (va >> 39) & 511);
    let pd = walk(pdpt, (va >> 30) & 511);
    let pt = walk(pd, (va >> 21) & 511);
    // SAFETY: `pt` is one of our table frames; index < 512.
    unsafe { *phys_to_ptr::<u64>(pt + ((va >> 12) & 511) * 8) = pa | perm.bits() };
}

fn map_2m(pml4: u64, va: u64, pa: u64, perm: Perm) {
    let pdpt = walk(pml4, (va >> 39) & 511);
    let pd = walk(pdpt, (va >> 30) & 511);
    // SAFETY: `pd` is one of our table frames; index < 512.
    unsafe { *phys_to_ptr::<u64>(pd + ((va >> 21) & 511) * 8) = pa | perm.bits() | HUGE };
}

unsafe extern "C" {
    static __image_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
    static __image_end: u8;
}

/// Builds the tables described above and switches to them.
pub fn init(bi: &BootInfo) {
    let top_ram = bi
        .memory()
        .iter()
        .filter(|r| r.kind != RegionKind::Reserved)
        .map(|r| r.end())
        .max()
        .unwrap_or(0);
    let identity_top = top_ram.max(1 << 32).div_ceil(2 << 20) * (2 << 20);
    let pml4 = new_table();
    let mut a = 2 << 20;
    while a < identity_top {
        map_2m(pml4, a, a, Perm::Data);
        a += 2 << 20;
    }
    // The first 2 MiB page by page: frame 0 unmapped (null dereferences fault).
    for a in (PAGE_SIZE..(2 << 20)).step_by(PAGE_SIZE as usize) {
        let perm = if a == bi.ap_trampoline {
            Perm::Trampoline
        } else {
            Perm::Data
        };
        map_4k(pml4, a, a, perm);
    }
    let start = &raw const __image_start as u64;
    let text_end = &raw const __text_end as u64;
    let ro_end = &raw const __rodata_end as u64;
    let end = (&raw const __image_end as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let mut va = start;
    while va < end {
        let perm = if va < text_end {
            Perm::Text
        } else if va < ro_end {
            Perm::ReadOnly
        } else {
            Perm::Data
        };
        map_4k(pml4, va, bi.hv_phys_base + (va - bi.hv_virt_base), perm);
        va += PAGE_SIZE;
    }
    // SAFETY: NXE must be on before NX bits are used; WP makes read-only pages binding
    // for the kernel too. The new tables map all code and data the kernel uses at the
    // same addresses as the hand-over tables did.
    unsafe {
        Efer::update(|f| f.insert(EferFlags::NO_EXECUTE_ENABLE));
        Cr0::update(|f| f.insert(Cr0Flags::WRITE_PROTECT));
        Cr3::write(
            PhysFrame::containing_address(PhysAddr::new(pml4)),
            Cr3Flags::empty(),
        );
    }
    *TABLES.lock() = Some(Tables { pml4, identity_top });
}

/// Physical address of the kernel PML4 (for application processors).
pub fn kernel_pml4() -> u64 {
    TABLES.lock().as_ref().map(|t| t.pml4).unwrap_or(0)
}

/// Maps `[pa, pa+len)` uncached at its identity if it lies beyond the identity map
/// (below it, firmware MTRRs already make MMIO holes uncached).
pub fn map_mmio(pa: u64, len: u64) {
    let g = TABLES.lock();
    let Some(t) = g.as_ref() else { return };
    let mut a = pa & !(PAGE_SIZE - 1);
    let end = pa.saturating_add(len);
    while a < end {
        if a >= t.identity_top {
            if a.is_multiple_of(2 << 20) && end - a >= (2 << 20) {
                map_2m(t.pml4, a, a, Perm::Mmio);
                a += 2 << 20;
                continue;
            }
            map_4k(t.pml4, a, a, Perm::Mmio);
        }
        a += PAGE_SIZE;
    }
    x86_64::instructions::tlb::flush_all();
}

/// Writes `value` to the identity-mapped address `pa` with an uncached, volatile store
/// (for the AP start-up page and similar).
pub fn write_phys<T: Copy>(pa: u64, value: T) {
    // SAFETY: callers pass addresses of memory the kernel owns; identity mapped.
    unsafe { core::ptr::write_volatile(phys_to_ptr::<T>(pa), value) };
}
