//! The kernel heap: a linked-list allocator over frames from the frame allocator.

use core::sync::atomic::{AtomicUsize, Ordering};

use linked_list_allocator::LockedHeap;

use super::{frames, phys_to_ptr};

/// The hypervisor's own part of the heap; the VMs' memory budgets come on top
/// ([`init`]).
pub const HEAP_BYTES: usize = 16 << 20;

/// Heap size, once initialised.
static SIZE: AtomicUsize = AtomicUsize::new(0);

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

/// Gives the heap its memory: [`HEAP_BYTES`] for the hypervisor and `reserved`
/// more (the VMs' hypervisor memory budgets, so that each VM can have all of its
/// budget at once). False, with no heap, when the frames are not there.
pub fn init(reserved: usize) -> bool {
    let Some(bytes) = HEAP_BYTES.checked_add(reserved) else {
        return false;
    };
    let Some(pa) = frames::alloc_contiguous(bytes / 4096, 4096, u64::MAX) else {
        return false;
    };
    // SAFETY: the frames are ours, identity mapped, and never returned.
    unsafe { HEAP.inner.lock().init(phys_to_ptr(pa), bytes) };
    SIZE.store(bytes, Ordering::Relaxed);
    true
}

/// Heap size in bytes.
pub fn size() -> usize {
    SIZE.load(Ordering::Relaxed)
}
