//! The physical frame allocator: a bitmap over all RAM below the top usable address,
//! filled from the UEFI memory map. It keeps counts, so leaks show up as a frame
//! count that does not return to where it started.

use core::sync::atomic::{AtomicUsize, Ordering};

use boot_info::{BootInfo, RegionKind};
use spin::Mutex;

use super::{phys_to_ptr, PAGE_SIZE};

struct Bitmap {
    /// One bit per frame: 1 = free.
    bits: &'static mut [u64],
    frames: usize,
    next: usize,
}

static FRAMES: Mutex<Option<Bitmap>> = Mutex::new(None);
static FREE: AtomicUsize = AtomicUsize::new(0);
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

/// Frame counts.
#[derive(Clone, Copy, Debug)]
pub struct FrameStats {
    /// Frames free now.
    pub free: usize,
    /// Frames handed out since boot and not returned.
    pub allocated: usize,
}

/// Current counts.
pub fn stats() -> FrameStats {
    FrameStats {
        free: FREE.load(Ordering::Relaxed),
        allocated: ALLOCATED.load(Ordering::Relaxed),
    }
}

/// Builds the bitmap from the memory map. The bitmap itself is carved from the first
/// usable region big enough (and accounted as used).
pub fn init(bi: &BootInfo) {
    let top = bi
        .memory()
        .iter()
        .filter(|r| r.kind == RegionKind::Usable)
        .map(|r| r.end())
        .max()
        .unwrap_or(0);
    let frames = (top / PAGE_SIZE) as usize;
    let words = frames.div_ceil(64);
    let bytes = (words * 8) as u64;
    let bitmap_pages = bytes.div_ceil(PAGE_SIZE);
    let home = bi
        .memory()
        .iter()
        .find(|r| r.kind == RegionKind::Usable && r.pages >= bitmap_pages && r.start >= 0x10_0000)
        .map(|r| r.start)
        .expect("no usable region can hold the frame bitmap");
    // SAFETY: `home` is usable RAM nobody else owns yet, identity mapped, and big enough.
    let bits: &'static mut [u64] =
        unsafe { core::slice::from_raw_parts_mut(phys_to_ptr::<u64>(home), words) };
    bits.fill(0);
    let mut free = 0usize;
    for r in bi.memory().iter().filter(|r| r.kind == RegionKind::Usable) {
        for f in (r.start / PAGE_SIZE)..(r.end() / PAGE_SIZE) {
            // Frame 0 and the real-mode area stay reserved (BIOS data, trampolines).
            if f < 0x100 || (f >= home / PAGE_SIZE && f < home / PAGE_SIZE + bitmap_pages) {
                continue;
            }
            bits[f as usize / 64] |= 1 << (f % 64);
            free += 1;
        }
    }
    FREE.store(free, Ordering::Relaxed);
    *FRAMES.lock() = Some(Bitmap {
        bits,
        frames,
        next: 0,
    });
}

/// Allocates `count` physically contiguous, zeroed frames aligned to `align` bytes
/// (a power of two >= 4096), all below `below`. Returns the physical address.
pub fn alloc_contiguous(count: usize, align: u64, below: u64) -> Option<u64> {
    let mut g = FRAMES.lock();
    let bm = g.as_mut()?;
    let step = (align / PAGE_SIZE).max(1) as usize;
    let limit = bm.frames.min((below / PAGE_SIZE) as usize);
    let is_free = |bits: &[u64], f: usize| bits[f / 64] & (1 << (f % 64)) != 0;
    let try_from = |start: usize, bm: &mut Bitmap| -> Option<usize> {
        let mut f = start.div_ceil(step) * step;
        while f + count <= limit {
            match (f..f + count).find(|&i| !is_free(bm.bits, i)) {
                None => return Some(f),
                Some(used) => f = (used + 1).div_ceil(step) * step,
            }
        }
        None
    };
    let first = if count == 1 && step == 1 { bm.next } else { 0 };
    let f = try_from(first, bm).or_else(|| try_from(0, bm))?;
    for i in f..f + count {
        bm.bits[i / 64] &= !(1 << (i % 64));
    }
    if count == 1 {
        bm.next = f + 1;
    }
    drop(g);
    FREE.fetch_sub(count, Ordering::Relaxed);
    ALLOCATED.fetch_add(count, Ordering::Relaxed);
    let pa = f as u64 * PAGE_SIZE;
    // SAFETY: the frames were free, so nobody else references them; identity mapped.
    unsafe { core::ptr::write_bytes(phys_to_ptr::<u8>(pa), 0, count * PAGE_SIZE as usize) };
    Some(pa)
}

/// Allocates one zeroed frame.
pub fn alloc() -> Option<u64> {
    alloc_contiguous(1, PAGE_SIZE, u64::MAX)
}

/// Returns `count` frames starting at `pa` (which `alloc*` handed out). The frames are
/// scrubbed so nothing leaks to their next owner.
pub fn free(pa: u64, count: usize) {
    // SAFETY: the caller owned these frames and gives them up.
    unsafe { core::ptr::write_bytes(phys_to_ptr::<u8>(pa), 0, count * PAGE_SIZE as usize) };
    let mut g = FRAMES.lock();
    let Some(bm) = g.as_mut() else { return };
    let f0 = (pa / PAGE_SIZE) as usize;
    for f in f0..f0 + count {
        if f < bm.frames && bm.bits[f / 64] & (1 << (f % 64)) == 0 {
            bm.bits[f / 64] |= 1 << (f % 64);
            FREE.fetch_add(1, Ordering::Relaxed);
            ALLOCATED.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
