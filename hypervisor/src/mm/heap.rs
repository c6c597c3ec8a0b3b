//! The kernel heap: a linked-list allocator over frames from the frame allocator.

use core::sync::atomic::{AtomicUsize, Ordering};

use linked_list_allocator::LockedHeap;

use super::{frames, phys_to_ptr};

/// Heap size.
pub const HEAP_BYTES: usize = 16 << 20;

struct CountingHeap {
    inner: LockedHeap,
    in_use: AtomicUsize,
}

#[global_allocator]
static HEAP: CountingHeap = CountingHeap {
    inner: LockedHeap::empty(),
    in_use: AtomicUsize::new(0),
};

// SAFETY: forwards to `LockedHeap`, which is a correct allocator; only counts bytes.
unsafe impl core::alloc::GlobalAlloc for CountingHeap {
    unsafe fn alloc(&self, l: core::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { self.inner.alloc(l) };
        if !p.is_null() {
            self.in_use.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: core::alloc::Layout) {
        self.in_use.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.dealloc(p, l) }
    }
}

/// Bytes currently allocated on the heap.
pub fn in_use() -> usize {
    HEAP.in_use.load(Ordering::Relaxed)
}

/// Gives the heap its memory.
pub fn init() {
    let pages = HEAP_BYTES / 4096;
    let pa = frames::alloc_contiguous(pages, 4096, u64::MAX).expect("no memory for the heap");
    // SAFETY: the frames are ours, identity mapped, and never returned.
    unsafe { HEAP.inner.lock().init(phys_to_ptr(pa), HEAP_BYTES) };
}
