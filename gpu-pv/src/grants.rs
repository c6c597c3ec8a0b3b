//! What the GPU may reach: the one model of IOMMU grants, used by the kernel (which
//! writes the changes into the GPU's VT-d domain) and by the host simulation (which
//! checks every simulated DMA against it).
//!
//! Grants overlap: two resources may share pages, a zero-copy buffer may be
//! registered twice, and a guest page may hold one VM's backing and then another
//! grant of the same VM. So each page counts its grants; it becomes reachable with
//! its first grant and unreachable with the revocation of its last. Changes are
//! collected per page and handed out as net runs of adjacent pages
//! ([`Grants::take_changes`]): a page granted and revoked again before the changes
//! are applied needs no IOMMU update at all, and one update (one IOTLB invalidation)
//! covers a whole command's worth of changes.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use crate::memory::Hpa;
use crate::sched::VmId;

/// Page size of a grant.
pub const PAGE: u64 = 4096;

/// One page's grants.
#[derive(Clone, Copy, Debug, Default)]
struct Page {
    /// Grants that hold it.
    count: u32,
    /// Whether the IOMMU maps it (as of the last [`Grants::take_changes`]).
    applied: bool,
}

/// The changes to apply to the IOMMU: runs `(start, bytes)` of adjacent pages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Runs to map.
    pub map: Vec<(Hpa, u64)>,
    /// Runs to unmap.
    pub unmap: Vec<(Hpa, u64)>,
}

impl Changes {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty() && self.unmap.is_empty()
    }
}

/// Host pages granted to the GPU, counted per page and per VM.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    pages: BTreeMap<Hpa, Page>,
    /// Pages whose state may differ from what the IOMMU has.
    dirty: BTreeSet<Hpa>,
    /// Page grants each VM holds.
    per_vm: BTreeMap<VmId, u64>,
}

/// The page frames `[hpa, hpa+len)` touches, as page addresses.
fn pages(hpa: Hpa, len: u64) -> impl Iterator<Item = Hpa> {
    let start = hpa.get() & !(PAGE - 1);
    let end = hpa.get().saturating_add(len).saturating_add(PAGE - 1) & !(PAGE - 1);
    (start..end).step_by(PAGE as usize).map(Hpa::new)
}

impl Grants {
    /// No grants.
    pub fn new() -> Self {
        Self::default()
    }

    /// Grants the GPU `[hpa, hpa+len)` for `vm` (whole pages).
    pub fn grant(&mut self, vm: VmId, hpa: Hpa, len: u64) {
        let mut n = 0;
        for page in pages(hpa, len) {
            let p = self.pages.entry(page).or_default();
            p.count = p.count.saturating_add(1);
            if p.count == 1 {
                self.dirty.insert(page);
            }
            n += 1;
        }
        *self.per_vm.entry(vm).or_default() += n;
    }

    /// Takes back a grant made by [`grant`](Self::grant): pages no other grant
    /// holds become unreachable with the next [`take_changes`](Self::take_changes).
    /// A revocation of pages never granted changes nothing.
    pub fn revoke(&mut self, vm: VmId, hpa: Hpa, len: u64) {
        let mut n = 0;
        for page in pages(hpa, len) {
            let Some(p) = self.pages.get_mut(&page).filter(|p| p.count > 0) else {
                continue;
            };
            p.count -= 1;
            n += 1;
            if p.count == 0 {
                self.dirty.insert(page);
            }
        }
        if let Some(held) = self.per_vm.get_mut(&vm) {
            *held = held.saturating_sub(n);
        }
    }

    /// Whether every page of `[hpa, hpa+len)` is granted now.
    pub fn covers(&self, hpa: Hpa, len: u64) -> bool {
        pages(hpa, len.max(1)).all(|page| self.pages.get(&page).is_some_and(|p| p.count > 0))
    }

    /// Page grants `vm` holds.
    pub fn of_vm(&self, vm: VmId) -> u64 {
        self.per_vm.get(&vm).copied().unwrap_or(0)
    }

    /// Pages granted now.
    pub fn granted_pages(&self) -> usize {
        self.pages.values().filter(|p| p.count > 0).count()
    }

    /// The net changes since the last call, in runs of adjacent pages, in address
    /// order; from now on they count as applied.
    pub fn take_changes(&mut self) -> Changes {
        let mut out = Changes::default();
        for page in core::mem::take(&mut self.dirty) {
            let Some(p) = self.pages.get_mut(&page) else {
                continue;
            };
            let wanted = p.count > 0;
            if wanted != p.applied {
                p.applied = wanted;
                let runs = if wanted { &mut out.map } else { &mut out.unmap };
                match runs.last_mut() {
                    Some((start, len)) if start.offset(*len) == page => *len += PAGE,
                    _ => runs.push((page, PAGE)),
                }
            }
            if !wanted {
                self.pages.remove(&page);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet as Set;

    #[test]
    fn a_page_stays_mapped_while_any_grant_holds_it() {
        let mut g = Grants::new();
        g.grant(1, Hpa::new(0x1000), 0x2000);
        g.grant(2, Hpa::new(0x2000), 0x1000);
        assert_eq!(g.take_changes().map, [(Hpa::new(0x1000), 0x2000)]);
        g.revoke(1, Hpa::new(0x1000), 0x2000);
        let c = g.take_changes();
        assert_eq!(
            c.unmap,
            [(Hpa::new(0x1000), 0x1000)],
            "0x2000 is still VM 2's"
        );
        assert!(g.covers(Hpa::new(0x2000), 0x1000));
        assert!(!g.covers(Hpa::new(0x1000), 0x1000));
        assert_eq!((g.of_vm(1), g.of_vm(2)), (0, 1));
    }

    #[test]
    fn granted_and_revoked_before_applying_is_no_change() {
        let mut g = Grants::new();
        g.grant(1, Hpa::new(0x5000), 10);
        g.revoke(1, Hpa::new(0x5000), 10);
        assert!(g.take_changes().is_empty());
        assert_eq!(g.granted_pages(), 0);
    }

    #[test]
    fn unaligned_ranges_round_out_to_whole_pages() {
        let mut g = Grants::new();
        g.grant(1, Hpa::new(0x1ff8), 16);
        assert_eq!(g.take_changes().map, [(Hpa::new(0x1000), 0x2000)]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Grant(VmId, u64, u64),
        Revoke(usize),
        Apply,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u16..4, 0u64..64, 1u64..5 * PAGE).prop_map(|(vm, page, len)| Op::Grant(
                vm,
                page * PAGE + page % 3 * 8,
                len
            )),
            (0usize..64).prop_map(Op::Revoke),
            Just(Op::Apply),
        ]
    }

    proptest! {
        /// Applying the changes to an IOMMU model always yields exactly the pages
        /// some live grant covers: nothing revoked stays reachable, nothing granted
        /// is missing.
        #[test]
        fn the_applied_pages_are_exactly_the_granted_ones(ops in prop::collection::vec(op(), 1..80)) {
            let mut g = Grants::new();
            let mut live: Vec<(VmId, u64, u64)> = Vec::new();
            let mut iommu: Set<u64> = Set::new();
            for op in ops.into_iter().chain([Op::Apply]) {
                match op {
                    Op::Grant(vm, hpa, len) => {
                        g.grant(vm, Hpa::new(hpa), len);
                        live.push((vm, hpa, len));
                    }
                    Op::Revoke(i) if !live.is_empty() => {
                        let (vm, hpa, len) = live.remove(i % live.len());
                        g.revoke(vm, Hpa::new(hpa), len);
                    }
                    Op::Revoke(_) => {}
                    Op::Apply => {
                        let c = g.take_changes();
                        for (start, len) in c.map {
                            let start = start.get();
                            for p in (start..start + len).step_by(PAGE as usize) {
                                prop_assert!(iommu.insert(p), "page {p:#x} mapped twice");
                            }
                        }
                        for (start, len) in c.unmap {
                            let start = start.get();
                            for p in (start..start + len).step_by(PAGE as usize) {
                                prop_assert!(iommu.remove(&p), "page {p:#x} unmapped twice");
                            }
                        }
                        let want: Set<u64> =
                            live.iter().flat_map(|&(_, h, l)| pages(Hpa::new(h), l)).map(Hpa::get).collect();
                        prop_assert_eq!(&iommu, &want);
                    }
                }
            }
            for vm in 1..4 {
                let held: u64 = live
                    .iter()
                    .filter(|l| l.0 == vm)
                    .map(|&(_, h, l)| pages(Hpa::new(h), l).count() as u64)
                    .sum();
                prop_assert_eq!(g.of_vm(vm), held);
            }
        }
    }
}
