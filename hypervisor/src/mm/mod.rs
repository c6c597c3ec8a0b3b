//! Memory: physical frames, the hypervisor's page tables and its heap.

pub mod frames;
pub mod heap;
pub mod paging;

/// Bytes per small page.
pub const PAGE_SIZE: u64 = 4096;

/// The hypervisor maps physical memory at its identity (virtual == physical in the
/// lower half), so a physical address is also a pointer.
pub fn phys_to_ptr<T>(pa: u64) -> *mut T {
    pa as *mut T
}
