//! ACPI tables: RSDP -> XSDT (or RSDT) -> MADT (CPUs, IOAPICs), MCFG (ECAM), DMAR
//! (VT-d units, reserved regions, device scopes) and HPET.
//!
//! The parsing is the `acpi-tables` crate's (pure logic, host-tested and fuzzed: see
//! its module doc for every check and why the `acpi` crate is not used); here is only
//! how the kernel reads physical memory for it, and the logging. A table that fails
//! a check (checksum, length, an entry's bounds) is skipped with a warning. A missing
//! table is reported, not fatal: Bochs's platform has neither MCFG nor DMAR.

use acpi_tables::PhysMemory;
pub use acpi_tables::{DeviceScope, Platform};
use log::warn;

use crate::mm::{paging, phys_to_ptr, PAGE_SIZE};

/// Physical memory as the kernel maps it: the identity map, and [`paging::map_mmio`]
/// for what lies beyond it (firmware may keep tables above the top of RAM).
struct Firmware {
    /// First physical address past what can be mapped at its identity: the CPU's
    /// physical address width, capped to the canonical lower half.
    limit: u64,
}

impl Firmware {
    fn new() -> Firmware {
        let bits = if core::arch::x86_64::__cpuid(0x8000_0000).eax >= 0x8000_0008 {
            core::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff
        } else {
            36
        };
        Firmware {
            limit: 1u64 << bits.clamp(32, 47),
        }
    }
}

impl PhysMemory for Firmware {
    fn read(&self, pa: u64, len: usize) -> Option<&[u8]> {
        let end = pa.checked_add(u64::try_from(len).ok()?)?;
        // Frame 0 is unmapped on purpose (null dereferences fault).
        if pa < PAGE_SIZE || end > self.limit {
            return None;
        }
        paging::map_mmio(pa, end - pa);
        // SAFETY: `[pa, end)` is identity mapped: below the top of the identity map
        // (4 GiB or the top of RAM) it always is, and `map_mmio` has just mapped
        // whatever lay beyond it; `end` is below the CPU's physical address width and
        // the canonical lower half, so the mapping is real and the pointer canonical,
        // and frame 0 is excluded. Firmware tables are read-only while the kernel
        // boots (nothing else writes them), and the slice lives only as long as
        // `acpi_tables::parse` runs: what it returns is copied out.
        Some(unsafe { core::slice::from_raw_parts(phys_to_ptr::<u8>(pa), len) })
    }
}

/// Reads the tables from the RSDP at `rsdp` (0: none).
pub fn init(rsdp: u64) -> Option<Platform> {
    if rsdp == 0 {
        log::info!("acpi: the firmware gave no RSDP (e.g. OVMF under Bochs)");
        return None;
    }
    let parsed = acpi_tables::parse(&Firmware::new(), rsdp);
    for w in &parsed.warnings {
        warn!("acpi: {w}");
    }
    parsed.platform
}
