//! Per-VM accounting of hypervisor memory.
//!
//! Whatever a guest makes the hypervisor keep (resource and backing records, host
//! runs and their IOMMU page records, staged commands, chains waiting for their
//! answer, registered buffers, a simulated GPU's pixels) is charged to that VM's
//! [`Budget`] when it is created and released when it goes. A charge that does not
//! fit is refused before anything changes, so one VM cannot take the memory every
//! other VM and the hypervisor itself live on: it gets `ERR_OUT_OF_MEMORY` instead.
//!
//! The sizes charged ([`cost`]) are conservative upper bounds of what each record
//! takes on the heap (allocator rounding and tree nodes included), not exact
//! figures: the budget is only worth something if the memory behind it is real, so
//! the hypervisor reserves every VM's budget at boot.

use core::fmt;

/// Budget a VM gets when its configuration names none: 8 MiB.
pub const DEFAULT_BUDGET: u64 = 8 << 20;

/// Conservative sizes, in bytes, of what the mediator and the kernel keep per
/// guest-made object.
pub mod cost {
    use crate::abi::limits;

    /// One entry of a list of guest or host ranges (`MemEntry`, ring `Segment`,
    /// IOMMU mapping `(hpa, len)`).
    pub const ENTRY: u64 = 16;
    /// One host run of a backing: the run, later the mapping to remove, its IOMMU
    /// change waiting to be applied, and the device's own copy (the simulated GPU
    /// keeps one).
    pub const RUN: u64 = 96;
    /// One page granted to the GPU: the kernel's per-page grant count (a tree
    /// entry) and its share of the IOMMU page tables.
    pub const PAGE: u64 = 48;
    /// One band copy of a staged command.
    pub const COPY: u64 = 32;
    /// A staged host command with its fixed-size encoding, its completion
    /// bookkeeping and its route while on the GPU.
    pub const COMMAND: u64 = 512;
    /// A resource's record (the VM's table, the host ids it holds), with its
    /// `RESOURCE_UNREF` paid in advance so that freeing never needs memory.
    pub const RESOURCE: u64 = 256 + COMMAND;
    /// A backing's fixed part, with its `RESOURCE_DETACH_BACKING` paid in advance.
    pub const BACKING: u64 = 128 + COMMAND;
    /// One chain taken from a queue and not yet returned: the record, the largest
    /// response kept for it (an EDID), its fence, and room for every writable
    /// buffer a chain may have. Reserved for every queue entry when the queue
    /// starts, since a taken chain must be answered whatever the budget says.
    pub const REPLY: u64 = 256 + 1056 + ENTRY * limits::MAX_CHAIN_DESCRIPTORS as u64;
    /// A registered zero-copy buffer's record in the kernel.
    pub const BUFFER: u64 = 128;
    /// Page size of the grants.
    pub const PAGE_SIZE: u64 = 4096;

    /// What a queue of `size` entries reserves: a [`REPLY`] per entry and the
    /// device side's bitmaps.
    pub const fn queue(size: u16) -> u64 {
        REPLY * size as u64 + 64
    }

    /// Pages `[addr, addr + len)` touches.
    pub const fn pages(addr: u64, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        let first = addr / PAGE_SIZE;
        let last = addr.saturating_add(len - 1) / PAGE_SIZE;
        last - first + 1
    }
}

/// A charge that does not fit in what is left of the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverBudget {
    /// Bytes asked for.
    pub asked: u64,
    /// Bytes that were left.
    pub available: u64,
}

impl fmt::Display for OverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes of hypervisor memory asked, {} left in the VM's budget",
            self.asked, self.available
        )
    }
}

/// One VM's hypervisor memory: its limit, what is charged now, and the most ever
/// charged at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    limit: u64,
    used: u64,
    peak: u64,
}

impl Budget {
    /// A budget of `limit` bytes with nothing charged.
    pub const fn new(limit: u64) -> Self {
        Self {
            limit,
            used: 0,
            peak: 0,
        }
    }

    /// Charges `bytes`, or refuses (changing nothing) if they do not fit.
    pub fn charge(&mut self, bytes: u64) -> Result<(), OverBudget> {
        let available = self.available();
        if bytes > available {
            return Err(OverBudget {
                asked: bytes,
                available,
            });
        }
        self.used += bytes;
        self.peak = self.peak.max(self.used);
        Ok(())
    }

    /// Gives back `bytes` charged before. Giving back more than is charged is an
    /// accounting bug: tests catch it, the kernel stops at zero.
    pub fn release(&mut self, bytes: u64) {
        debug_assert!(
            bytes <= self.used,
            "released {bytes} bytes, {} charged",
            self.used
        );
        self.used = self.used.saturating_sub(bytes);
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The most bytes charged at once so far.
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// Bytes that can still be charged.
    pub fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_fit_or_change_nothing() {
        let mut b = Budget::new(100);
        b.charge(60).unwrap();
        assert_eq!(
            b.charge(41),
            Err(OverBudget {
                asked: 41,
                available: 40
            })
        );
        assert_eq!(b.used(), 60);
        b.charge(40).unwrap();
        assert_eq!(b.available(), 0);
        b.release(100);
        assert_eq!((b.used(), b.peak(), b.limit()), (0, 100, 100));
        assert_eq!(b.charge(u64::MAX).unwrap_err().available, 100);
    }

    #[test]
    fn pages_count_every_page_touched() {
        assert_eq!(cost::pages(0, 0), 0);
        assert_eq!(cost::pages(0, 1), 1);
        assert_eq!(cost::pages(4095, 2), 2);
        assert_eq!(cost::pages(4096, 4096), 1);
        assert_eq!(cost::pages(u64::MAX - 1, 2), 1);
    }
}
