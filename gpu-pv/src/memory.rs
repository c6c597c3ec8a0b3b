//! Guest memory, reached only through checked ranges.
//!
//! The mediator never holds a raw pointer into a guest: it asks a [`GuestMemory`]
//! to translate and copy ranges, and every range is checked for validity (inside the
//! guest's RAM, no overflow) and ownership (the pages belong to this VM) — the seed's
//! `P = V(i) AND M(i)`. The hypervisor implements the trait over each VM's RAM, one
//! contiguous host-physical range that its nested page tables map; tests use
//! [`VecMemory`].

use alloc::vec;
use alloc::vec::Vec;

/// A guest-physical address.
pub type Gpa = u64;
/// A host-physical address.
pub type Hpa = u64;

/// Why a guest memory access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemError {
    /// `addr + len` overflows.
    Overflow,
    /// The range is not (entirely) inside the guest's RAM: V(i) is false.
    OutOfRange,
    /// The range is RAM, but not owned by this VM (e.g. MMIO or a shared page): M(i) is false.
    NotOwned,
}

/// A VM's memory as the mediator sees it.
pub trait GuestMemory {
    /// Translates a guest-physical range that lies inside one host-contiguous run
    /// to its host-physical start, after the validity and ownership checks.
    fn translate(&self, gpa: Gpa, len: u64) -> Result<Hpa, MemError>;
    /// Copies `out.len()` bytes starting at `gpa` out of the guest.
    fn read(&self, gpa: Gpa, out: &mut [u8]) -> Result<(), MemError>;
    /// Copies `data` into the guest at `gpa`.
    fn write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), MemError>;
}

/// Checks that `[gpa, gpa+len)` neither overflows nor leaves `[base, base+size)`.
pub fn check_range(gpa: Gpa, len: u64, base: Gpa, size: u64) -> Result<(), MemError> {
    let end = gpa.checked_add(len).ok_or(MemError::Overflow)?;
    let limit = base.checked_add(size).ok_or(MemError::Overflow)?;
    if gpa < base || end > limit {
        return Err(MemError::OutOfRange);
    }
    Ok(())
}

/// Guest RAM backed by a `Vec`, for tests, fuzzing and the simulation: guest-physical
/// `[base, base+len)` maps to host-physical `host_base + (gpa - base)`.
#[derive(Clone, Debug)]
pub struct VecMemory {
    /// First guest-physical address.
    pub base: Gpa,
    /// Host-physical address of `base` (used only for translation results).
    pub host_base: Hpa,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl VecMemory {
    /// Zeroed RAM of `len` bytes at guest-physical `base`.
    pub fn new(base: Gpa, host_base: Hpa, len: usize) -> Self {
        Self {
            base,
            host_base,
            bytes: vec![0; len],
        }
    }

    fn offset(&self, gpa: Gpa, len: u64) -> Result<usize, MemError> {
        check_range(gpa, len, self.base, self.bytes.len() as u64)?;
        Ok((gpa - self.base) as usize)
    }
}

impl GuestMemory for VecMemory {
    fn translate(&self, gpa: Gpa, len: u64) -> Result<Hpa, MemError> {
        let off = self.offset(gpa, len)?;
        Ok(self.host_base + off as u64)
    }
    fn read(&self, gpa: Gpa, out: &mut [u8]) -> Result<(), MemError> {
        let off = self.offset(gpa, out.len() as u64)?;
        out.copy_from_slice(&self.bytes[off..off + out.len()]);
        Ok(())
    }
    fn write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), MemError> {
        let off = self.offset(gpa, data.len() as u64)?;
        self.bytes[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_for_overflow_and_bounds() {
        let mut m = VecMemory::new(0x1000, 0x8000_0000, 0x2000);
        assert_eq!(m.translate(0x1000, 0x2000), Ok(0x8000_0000));
        assert_eq!(m.translate(0x0fff, 1), Err(MemError::OutOfRange));
        assert_eq!(m.translate(0x2fff, 2), Err(MemError::OutOfRange));
        assert_eq!(m.translate(u64::MAX, 2), Err(MemError::Overflow));
        m.write(0x1ffe, &[1, 2, 3, 4]).unwrap();
        let mut b = [0; 4];
        m.read(0x1ffe, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(m.write(0x2ffe, &[0; 3]), Err(MemError::OutOfRange));
    }
}
