//! Second-level (legacy mode) page tables of one domain (VT-d spec 3.7 "Second-Level
//! Translation", 9.8 "Second-Level Paging Entries").
//!
//! 3 levels (39-bit AGAW) or 4 levels (48-bit AGAW), 512 entries of 8 bytes per 4 KiB
//! table frame. Entry bits used: R (0), W (1), PS (7, a 2 MiB leaf at level 2),
//! ADDR (51:12). Non-leaf entries grant R|W; the leaf decides (effective permission is
//! the AND over all levels). Everything else (X, EMT, IPAT, SNP, TM) stays 0: QEMU
//! treats SNP as reserved in legacy mode.
//!
//! Table frames are not freed on unmap (an identity-style IOVA space needs at most one
//! leaf table per 2 MiB); [`Table::destroy`] frees them all.

use crate::mm::{frames, phys_to_ptr, PAGE_SIZE};

/// Read permission.
pub const R: u64 = 1 << 0;
/// Write permission.
pub const W: u64 = 1 << 1;
/// Page size: this level-2 entry maps a 2 MiB page.
pub const PS: u64 = 1 << 7;
/// Address bits of an entry.
pub const ADDR: u64 = 0x000f_ffff_ffff_f000;

const LARGE: u64 = 2 << 20;

/// Why a table operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// Part of the range is mapped already.
    AlreadyMapped,
    /// No frame for a table.
    NoMemory,
}

/// A domain's table tree.
#[derive(Debug)]
pub struct Table {
    /// Physical address of the top-level table (the context entry's SLPTPTR).
    pub root: u64,
    /// 3 or 4.
    pub levels: u32,
    /// Table frames in use (root included).
    pub frames: usize,
    /// Allocate table frames below this address (the host address width).
    below: u64,
    /// Flush written entries out of the CPU caches (ECAP.C clear).
    flush: bool,
}

fn shift(level: u32) -> u32 {
    12 + 9 * (level - 1)
}

fn index(iova: u64, level: u32) -> u64 {
    (iova >> shift(level)) & 511
}

/// Writes back the cache line holding `pa` when the hardware does not snoop page walks.
pub fn flush_line(pa: u64, flush: bool) {
    if flush {
        // SAFETY: `pa` is an identity-mapped table frame we own; clflush has no other
        // effect than writing the line back.
        unsafe {
            core::arch::asm!("clflush [{}]", in(reg) phys_to_ptr::<u8>(pa), options(nostack, preserves_flags))
        };
    }
}

fn read(table: u64, idx: u64) -> u64 {
    // SAFETY: `table` is a table frame of this tree (identity mapped) and idx < 512.
    unsafe { core::ptr::read_volatile(phys_to_ptr::<u64>(table + idx * 8)) }
}

impl Table {
    /// A tree with an empty top-level table.
    pub fn new(levels: u32, below: u64, flush: bool) -> Result<Table, TableError> {
        let mut t = Table {
            root: 0,
            levels,
            frames: 0,
            below,
            flush,
        };
        t.root = t.alloc()?;
        Ok(t)
    }

    fn alloc(&mut self) -> Result<u64, TableError> {
        let pa = frames::alloc_contiguous(1, PAGE_SIZE, self.below).ok_or(TableError::NoMemory)?;
        self.frames += 1;
        // A zeroed frame: every entry not present. Make that visible to a non-snooping
        // walker before it can be linked in.
        if self.flush {
            for line in (0..PAGE_SIZE).step_by(64) {
                flush_line(pa + line, true);
            }
        }
        Ok(pa)
    }

    fn write(&self, table: u64, idx: u64, v: u64) {
        // SAFETY: as in `read`; a single aligned 64-bit store, so the hardware sees the
        // old or the new entry, never a mix.
        unsafe { core::ptr::write_volatile(phys_to_ptr::<u64>(table + idx * 8), v) };
        flush_line(table + idx * 8, self.flush);
    }

    /// The table at `level - 1` under entry `idx` of `table` (at `level`), creating it
    /// when `create`. `Ok(None)`: not present (and not created) or a large leaf.
    fn child(&mut self, table: u64, idx: u64, create: bool) -> Result<Option<u64>, TableError> {
        let e = read(table, idx);
        if e & (R | W) == 0 {
            if !create {
                return Ok(None);
            }
            let n = self.alloc()?;
            self.write(table, idx, n | R | W);
            return Ok(Some(n));
        }
        if e & PS != 0 {
            return Ok(None);
        }
        Ok(Some(e & ADDR))
    }

    /// The leaf entry covering `iova`: (table, index, level), or None if a level on the
    /// way is not present.
    fn leaf(&self, iova: u64) -> Option<(u64, u64, u32)> {
        let mut t = self.root;
        let mut level = self.levels;
        loop {
            let idx = index(iova, level);
            let e = read(t, idx);
            if e & (R | W) == 0 {
                return None;
            }
            if level == 1 || (level == 2 && e & PS != 0) {
                return Some((t, idx, level));
            }
            t = e & ADDR;
            level -= 1;
        }
    }

    /// The host address and writability `iova` translates to.
    pub fn translate(&self, iova: u64) -> Option<(u64, bool)> {
        let (t, idx, level) = self.leaf(iova)?;
        let e = read(t, idx);
        let mask = (1u64 << shift(level)) - 1;
        Some(((e & ADDR & !mask) | (iova & mask), e & W != 0))
    }

    /// Whether any 4 KiB page of `[iova, iova+len)` is mapped.
    pub fn any_mapped(&self, iova: u64, len: u64) -> bool {
        let mut a = iova;
        let end = iova + len;
        while a < end {
            match self.leaf(a) {
                Some(_) => return true,
                None => a += PAGE_SIZE,
            }
        }
        false
    }

    /// Maps `[iova, iova+len)` to `[hpa, hpa+len)` (all 4 KiB aligned, range free),
    /// with 2 MiB leaves where both are aligned and `large` allows. On failure the
    /// part already mapped is unmapped again.
    pub fn map(
        &mut self,
        iova: u64,
        hpa: u64,
        len: u64,
        write: bool,
        large: bool,
    ) -> Result<(), TableError> {
        if self.any_mapped(iova, len) {
            return Err(TableError::AlreadyMapped);
        }
        let perm = R | if write { W } else { 0 };
        let mut off = 0;
        while off < len {
            let (va, pa) = (iova + off, hpa + off);
            let r = if large
                && va.is_multiple_of(LARGE)
                && pa.is_multiple_of(LARGE)
                && len - off >= LARGE
            {
                self.set(va, pa | perm | PS, 2).map(|()| LARGE)
            } else {
                self.set(va, pa | perm, 1).map(|()| PAGE_SIZE)
            };
            match r {
                Ok(step) => off += step,
                Err(e) => {
                    let _ = self.unmap(iova, off);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Writes entry `v` at `level` (1 or 2) for `iova`, creating tables on the way.
    fn set(&mut self, iova: u64, v: u64, level: u32) -> Result<(), TableError> {
        let mut t = self.root;
        let mut l = self.levels;
        while l > level {
            t = self
                .child(t, index(iova, l), true)?
                .ok_or(TableError::AlreadyMapped)?;
            l -= 1;
        }
        let idx = index(iova, level);
        if read(t, idx) & (R | W) != 0 {
            // A level-2 entry that points to a (possibly empty) leaf table: leave it
            // and map 4 KiB pages under it instead.
            if level == 2 && read(t, idx) & PS == 0 {
                let base = v & ADDR;
                let perm = v & (R | W);
                for i in 0..512 {
                    self.set(iova + i * PAGE_SIZE, (base + i * PAGE_SIZE) | perm, 1)?;
                }
                return Ok(());
            }
            return Err(TableError::AlreadyMapped);
        }
        self.write(t, idx, v);
        Ok(())
    }

    /// Unmaps every page of `[iova, iova+len)` (4 KiB aligned); 2 MiB leaves cut by
    /// the range are split first. Returns whether anything was unmapped. The caller
    /// invalidates the IOTLB.
    pub fn unmap(&mut self, iova: u64, len: u64) -> Result<bool, TableError> {
        let end = iova + len;
        let mut a = iova;
        let mut changed = false;
        while a < end {
            let mut t = self.root;
            let mut l = self.levels;
            let step = loop {
                let idx = index(a, l);
                let e = read(t, idx);
                let span = 1u64 << shift(l);
                let next = (a & !(span - 1)) + span;
                if e & (R | W) == 0 {
                    break next - a;
                }
                if l == 1 {
                    self.write(t, idx, 0);
                    changed = true;
                    break PAGE_SIZE;
                }
                if l == 2 && e & PS != 0 {
                    if a.is_multiple_of(LARGE) && end - a >= LARGE {
                        self.write(t, idx, 0);
                        changed = true;
                        break LARGE;
                    }
                    // Split: a leaf table with the same 512 translations replaces the
                    // 2 MiB entry atomically, then the walk continues into it.
                    let n = self.alloc()?;
                    let base = e & ADDR;
                    let perm = e & (R | W);
                    for i in 0..512u64 {
                        // SAFETY: `n` is a fresh table frame of this tree; i < 512.
                        unsafe {
                            core::ptr::write_volatile(
                                phys_to_ptr::<u64>(n + i * 8),
                                (base + i * PAGE_SIZE) | perm,
                            )
                        };
                    }
                    if self.flush {
                        for line in (0..PAGE_SIZE).step_by(64) {
                            flush_line(n + line, true);
                        }
                    }
                    self.write(t, idx, n | R | W);
                    t = n;
                    l = 1;
                    continue;
                }
                t = e & ADDR;
                l -= 1;
            };
            a = a.saturating_add(step.min(end - a).max(PAGE_SIZE));
        }
        Ok(changed)
    }

    /// Frees every table frame (the hardware must no longer reference the tree).
    pub fn destroy(&mut self) {
        fn free_level(t: u64, level: u32, count: &mut usize) {
            if level > 1 {
                for i in 0..512 {
                    let e = read(t, i);
                    if e & (R | W) != 0 && e & PS == 0 {
                        free_level(e & ADDR, level - 1, count);
                    }
                }
            }
            frames::free(t, 1);
            *count += 1;
        }
        if self.root != 0 {
            let mut n = 0;
            free_level(self.root, self.levels, &mut n);
            self.frames = self.frames.saturating_sub(n);
            self.root = 0;
        }
    }
}
