//! Nested paging: the guest-physical -> host-physical tables of one VM, in AMD NPT
//! format (ordinary x86-64 entries, U/S set at every level as TCG requires) or Intel
//! EPT format (R/W/X bits, write-back memory type). 2 MiB pages where the range
//! allows, 4 KiB elsewhere. The tables' frames are returned when the VM goes.

use alloc::vec::Vec;

use crate::mm::{frames, phys_to_ptr, PAGE_SIZE};

const TWO_MIB: u64 = 2 << 20;
const ADDR: u64 = 0x000f_ffff_ffff_f000;
/// Non-leaf entries allow everything (the leaf decides): NPT present + write + user,
/// EPT read + write + execute — the same three low bits.
const TABLE_BITS: u64 = 0b111;

/// Entry format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// AMD nested page tables.
    Npt,
    /// Intel extended page tables.
    Ept,
}

/// Permissions of a guest-physical mapping.
#[derive(Clone, Copy, Debug)]
pub struct Perm {
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
}

/// One VM's nested page tables.
pub struct NestedTables {
    format: Format,
    root: u64,
    tables: Vec<u64>,
}

impl NestedTables {
    /// Empty tables (one root frame).
    pub fn new(format: Format) -> Option<Self> {
        let root = frames::alloc()?;
        let mut tables = Vec::new();
        tables.push(root);
        Some(Self {
            format,
            root,
            tables,
        })
    }

    /// What the hardware takes: nCR3 for NPT, the EPT pointer for EPT.
    pub fn root_pointer(&self) -> u64 {
        match self.format {
            Format::Npt => self.root,
            // Write-back (6), 4-level walk (3 << 3).
            Format::Ept => self.root | (3 << 3) | 6,
        }
    }

    /// Frames used by the tables themselves.
    pub fn table_frames(&self) -> usize {
        self.tables.len()
    }

    fn leaf_bits(&self, p: Perm, huge: bool) -> u64 {
        match self.format {
            Format::Npt => {
                let mut b = 0b101 | if p.write { 0b010 } else { 0 };
                if !p.exec {
                    b |= 1 << 63;
                }
                if huge {
                    b |= 1 << 7;
                }
                b
            }
            Format::Ept => {
                let mut b = 0b001 | (6 << 3);
                if p.write {
                    b |= 0b010;
                }
                if p.exec {
                    b |= 0b100;
                }
                if huge {
                    b |= 1 << 7;
                }
                b
            }
        }
    }

    fn next(&mut self, table: u64, idx: u64) -> Option<u64> {
        let e = phys_to_ptr::<u64>(table + idx * 8);
        // SAFETY: `table` is one of this VM's table frames; idx < 512.
        let v = unsafe { e.read_volatile() };
        if v & 0b111 != 0 {
            return Some(v & ADDR);
        }
        let n = frames::alloc()?;
        self.tables.push(n);
        // SAFETY: as above.
        unsafe { e.write_volatile(n | TABLE_BITS) };
        Some(n)
    }

    /// Maps `[gpa, gpa+len)` to `[hpa, hpa+len)`; all page aligned. Returns `None` when
    /// out of frames for tables.
    pub fn map(&mut self, gpa: u64, hpa: u64, len: u64, p: Perm) -> Option<()> {
        let mut off = 0;
        while off < len {
            let (g, h) = (gpa + off, hpa + off);
            let pdpt = self.next(self.root, (g >> 39) & 511)?;
            let pd = self.next(pdpt, (g >> 30) & 511)?;
            if g % TWO_MIB == 0 && h % TWO_MIB == 0 && len - off >= TWO_MIB {
                let bits = self.leaf_bits(p, true);
                // SAFETY: `pd` is one of our frames; index < 512.
                unsafe { phys_to_ptr::<u64>(pd + ((g >> 21) & 511) * 8).write_volatile(h | bits) };
                off += TWO_MIB;
                continue;
            }
            let pt = self.next(pd, (g >> 21) & 511)?;
            let bits = self.leaf_bits(p, false);
            // SAFETY: as above.
            unsafe { phys_to_ptr::<u64>(pt + ((g >> 12) & 511) * 8).write_volatile(h | bits) };
            off += PAGE_SIZE;
        }
        Some(())
    }
}

impl Drop for NestedTables {
    fn drop(&mut self) {
        for &f in &self.tables {
            frames::free(f, 1);
        }
    }
}
