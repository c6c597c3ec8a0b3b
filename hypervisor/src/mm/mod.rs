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

/// Copies `out.len()` bytes from host-physical `hpa`, memory another CPU (a running
/// guest) or a device may write at the same time: an aligned 2-, 4- or 8-byte field is read
/// with one access, so a ring index is never seen half old, half new.
///
/// # Safety
/// `[hpa, hpa + out.len())` must be RAM identity mapped for the hypervisor.
pub unsafe fn read_shared(hpa: u64, out: &mut [u8]) {
    let p = phys_to_ptr::<u8>(hpa);
    // SAFETY: the caller vouches for the range; each wide access is aligned.
    unsafe {
        match out.len() {
            2 if hpa.is_multiple_of(2) => {
                out.copy_from_slice(&p.cast::<u16>().read_volatile().to_le_bytes())
            }
            4 if hpa.is_multiple_of(4) => {
                out.copy_from_slice(&p.cast::<u32>().read_volatile().to_le_bytes())
            }
            8 if hpa.is_multiple_of(8) => {
                out.copy_from_slice(&p.cast::<u64>().read_volatile().to_le_bytes())
            }
            n => core::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), n),
        }
    }
}

/// Copies `data` to host-physical `hpa` (shared with a running guest, as in
/// [`read_shared`]): an aligned 2-, 4- or 8-byte field is written with one access.
///
/// # Safety
/// As for [`read_shared`].
pub unsafe fn write_shared(hpa: u64, data: &[u8]) {
    let p = phys_to_ptr::<u8>(hpa);
    // SAFETY: as in `read_shared`.
    unsafe {
        match *data {
            [a, b] if hpa.is_multiple_of(2) => {
                p.cast::<u16>().write_volatile(u16::from_le_bytes([a, b]))
            }
            [a, b, c, d] if hpa.is_multiple_of(4) => p
                .cast::<u32>()
                .write_volatile(u32::from_le_bytes([a, b, c, d])),
            [a, b, c, d, e, f, g, h] if hpa.is_multiple_of(8) => p
                .cast::<u64>()
                .write_volatile(u64::from_le_bytes([a, b, c, d, e, f, g, h])),
            _ => core::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()),
        }
    }
}
