//! Guest RAM shared with devices: page allocations from the RAM past the guest image,
//! and [`GuestRam`], the [`GuestMemory`] view of this guest's own RAM that the
//! virtqueue driver side (`gpu_pv::ring::driver`) works through.
//!
//! The guest ABI identity maps the first 4 GiB, so a buffer's address is its
//! guest-physical address: what goes into descriptors and backing entries.

use core::sync::atomic::{AtomicU64, Ordering};

use gpu_pv::memory::{check_range, Gpa, GuestMemory, Hpa, MemError};

use crate::abi::guest;
use crate::boot_info::BootInfo;

/// Bytes of a page.
pub const PAGE_SIZE: u64 = 4096;

unsafe extern "C" {
    /// First byte after the image (`guest.ld`), page aligned.
    static __guest_image_end: u8;
}

/// Next free address (0: not set up yet).
static NEXT: AtomicU64 = AtomicU64::new(0);

/// This guest's RAM size in bytes, from the boot-info page (0 if it is unreadable).
pub fn ram_bytes() -> u64 {
    BootInfo::read(guest::BOOT_INFO).map_or(0, |i| i.memory_bytes)
}

/// Allocates `pages` zeroed, page-aligned pages of RAM that nothing else uses
/// (never freed: drivers allocate once and reuse). `None` when RAM runs out.
pub fn alloc_pages(pages: u64) -> Option<Gpa> {
    let limit = ram_bytes();
    let bytes = pages.checked_mul(PAGE_SIZE)?;
    let start = (&raw const __guest_image_end) as u64;
    let mut cur = NEXT.load(Ordering::Relaxed);
    loop {
        let base = if cur == 0 { start } else { cur };
        let end = base.checked_add(bytes)?;
        if end > limit {
            return None;
        }
        match NEXT.compare_exchange(cur, end, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                // SAFETY: [base, end) is RAM of this guest past the image and the stack
                // (which grows down from the image base), handed out only once.
                unsafe { core::ptr::write_bytes(base as *mut u8, 0, bytes as usize) };
                // Identity mapped: the address is the guest-physical one.
                return Some(Gpa::new(base));
            }
            Err(now) => cur = now,
        }
    }
}

/// RAM still free for [`alloc_pages`], in bytes.
pub fn free_bytes() -> u64 {
    let cur = match NEXT.load(Ordering::Relaxed) {
        0 => (&raw const __guest_image_end) as u64,
        n => n,
    };
    ram_bytes().saturating_sub(cur)
}

/// This guest's RAM (guest-physical `0..size`) as a [`GuestMemory`]. Accesses of 2,
/// 4 and 8 naturally aligned bytes are single volatile loads and stores, so ring
/// indices are never torn while the device reads them; other copies go byte by
/// byte, volatile, so nothing is cached across the device's updates.
#[derive(Clone, Copy, Debug)]
pub struct GuestRam {
    size: u64,
}

impl GuestRam {
    /// RAM of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self { size }
    }

    /// This guest's RAM as the boot-info page describes it.
    pub fn this_guest() -> Self {
        Self::new(ram_bytes())
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl GuestMemory for GuestRam {
    /// Only a range check: a guest cannot know where the host put its RAM, so the
    /// "host" address it reports is the guest-physical one (the driver side of a
    /// ring never translates anyway).
    fn translate(&self, gpa: Gpa, len: u64) -> Result<Hpa, MemError> {
        check_range(gpa, len, Gpa::new(0), self.size)?;
        Ok(Hpa::new(gpa.get()))
    }

    fn read(&self, gpa: Gpa, out: &mut [u8]) -> Result<(), MemError> {
        check_range(gpa, out.len() as u64, Gpa::new(0), self.size)?;
        // Identity mapped: the guest-physical address is the pointer.
        let gpa = gpa.get();
        let p = gpa as *const u8;
        // SAFETY: inside this guest's identity-mapped RAM (checked above); volatile
        // accesses of the matching width, aligned when the width is above one.
        unsafe {
            match out.len() {
                2 if gpa.is_multiple_of(2) => {
                    out.copy_from_slice(&p.cast::<u16>().read_volatile().to_le_bytes())
                }
                4 if gpa.is_multiple_of(4) => {
                    out.copy_from_slice(&p.cast::<u32>().read_volatile().to_le_bytes())
                }
                8 if gpa.is_multiple_of(8) => {
                    out.copy_from_slice(&p.cast::<u64>().read_volatile().to_le_bytes())
                }
                _ => {
                    for (i, b) in out.iter_mut().enumerate() {
                        *b = p.add(i).read_volatile();
                    }
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), MemError> {
        check_range(gpa, data.len() as u64, Gpa::new(0), self.size)?;
        // Identity mapped: the guest-physical address is the pointer.
        let gpa = gpa.get();
        let p = gpa as *mut u8;
        // SAFETY: as in `read`. The caller (the ring driver) only writes the rings,
        // indirect tables and buffers it owns.
        unsafe {
            match *data {
                [a, b] if gpa.is_multiple_of(2) => {
                    p.cast::<u16>().write_volatile(u16::from_le_bytes([a, b]))
                }
                [a, b, c, d] if gpa.is_multiple_of(4) => p
                    .cast::<u32>()
                    .write_volatile(u32::from_le_bytes([a, b, c, d])),
                [a, b, c, d, e, f, g, h] if gpa.is_multiple_of(8) => p
                    .cast::<u64>()
                    .write_volatile(u64::from_le_bytes([a, b, c, d, e, f, g, h])),
                _ => {
                    for (i, &b) in data.iter().enumerate() {
                        p.add(i).write_volatile(b);
                    }
                }
            }
        }
        Ok(())
    }
}
