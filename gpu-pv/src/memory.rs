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
use core::fmt;

/// Defines a physical-address newtype. There is deliberately no `From<u64>`, no
/// `Deref` and no arithmetic operator: an address is made from a raw `u64` only with
/// `new`, read back only with `get`, so every place a raw number becomes an address
/// (or an address of one kind becomes one of the other) is visible in the source.
macro_rules! address {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// The address `raw`.
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The address as a raw number.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// The address `by` bytes further on, `None` past the end of the
            /// address space.
            pub const fn checked_add(self, by: u64) -> Option<Self> {
                match self.0.checked_add(by) {
                    Some(a) => Some(Self(a)),
                    None => None,
                }
            }

            /// The address `by` bytes further on, for offsets already known to stay
            /// inside the address space (a checked range, a validated ring). Same
            /// overflow behaviour as `u64 + u64`; use
            /// [`checked_add`](Self::checked_add) for anything not checked yet.
            pub const fn offset(self, by: u64) -> Self {
                Self(self.0 + by)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address! {
    /// A guest-physical address: what a guest writes into its rings, descriptors,
    /// backing entries and hypercall registers. Only a [`GuestMemory`] turns one into
    /// an [`Hpa`].
    Gpa
}

address! {
    /// A host-physical address: what the GPU and the IOMMU are given, after
    /// [`GuestMemory::translate`] checked that the guest owns the page.
    Hpa
}

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
        Ok((gpa.get() - self.base.get()) as usize)
    }
}

impl GuestMemory for VecMemory {
    fn translate(&self, gpa: Gpa, len: u64) -> Result<Hpa, MemError> {
        let off = self.offset(gpa, len)?;
        Ok(self.host_base.offset(off as u64))
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
        let mut m = VecMemory::new(Gpa::new(0x1000), Hpa::new(0x8000_0000), 0x2000);
        assert_eq!(
            m.translate(Gpa::new(0x1000), 0x2000),
            Ok(Hpa::new(0x8000_0000))
        );
        assert_eq!(m.translate(Gpa::new(0x0fff), 1), Err(MemError::OutOfRange));
        assert_eq!(m.translate(Gpa::new(0x2fff), 2), Err(MemError::OutOfRange));
        assert_eq!(m.translate(Gpa::new(u64::MAX), 2), Err(MemError::Overflow));
        m.write(Gpa::new(0x1ffe), &[1, 2, 3, 4]).unwrap();
        let mut b = [0; 4];
        m.read(Gpa::new(0x1ffe), &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(
            m.write(Gpa::new(0x2ffe), &[0; 3]),
            Err(MemError::OutOfRange)
        );
    }

    #[test]
    fn guest_and_host_addresses_are_distinct_types() {
        // A guest address becomes a host one only through a translation.
        let m = VecMemory::new(Gpa::new(0x1000), Hpa::new(0x8000_0000), 0x2000);
        let hpa: Hpa = m.translate(Gpa::new(0x1234), 0x10).unwrap();
        assert_eq!(hpa, Hpa::new(0x8000_0234));
        assert_eq!(hpa.get(), 0x8000_0234);
        // Offsets stay in the same kind of address; overflow is caught.
        assert_eq!(Gpa::new(0x1000).checked_add(0x10), Some(Gpa::new(0x1010)));
        assert_eq!(Gpa::new(u64::MAX).checked_add(1), None);
        assert_eq!(Hpa::new(u64::MAX - 1).checked_add(2), None);
        assert_eq!(Hpa::new(0x8000_0000).offset(0x234), hpa);
        // Logs print addresses in hex.
        assert_eq!(alloc::format!("{hpa}"), "0x80000234");
        assert_eq!(alloc::format!("{:#x}", Gpa::new(0x1000)), "0x1000");
        assert_eq!(alloc::format!("{:08x}", Gpa::new(0x1000)), "00001000");
    }
}
