//! ACPI tables: RSDP -> XSDT (or RSDT) -> MADT (CPUs, IOAPICs), MCFG (ECAM), DMAR
//! (VT-d units, reserved regions, device scopes) and HPET.
//!
//! Parsed by hand from bounds-checked byte slices (the `acpi` crate does not parse
//! DMAR, and these few tables are short). A missing table is reported, not fatal:
//! Bochs's platform has neither MCFG nor DMAR.

use alloc::string::String;
use alloc::vec::Vec;

use log::warn;

use crate::mm::phys_to_ptr;

/// What the firmware's tables say about the platform.
#[derive(Debug, Default)]
pub struct Platform {
    /// OEM id of the RSDP.
    pub oem: String,
    /// Signatures of every table in the XSDT.
    pub tables: String,
    /// Local APIC ids of enabled CPUs, bootstrap CPU first as listed by firmware.
    pub cpus: Vec<u32>,
    /// Local APIC MMIO base.
    pub lapic_base: u64,
    /// I/O APICs: (id, MMIO base, first GSI).
    pub ioapics: Vec<(u8, u64, u32)>,
    /// PCI Express enhanced configuration access (segment 0).
    pub ecam: Option<Ecam>,
    /// VT-d description.
    pub dmar: Option<Dmar>,
    /// HPET MMIO base.
    pub hpet: Option<u64>,
}

/// One MCFG allocation.
#[derive(Clone, Copy, Debug)]
pub struct Ecam {
    /// MMIO base of bus 0.
    pub base: u64,
    /// First bus.
    pub bus_start: u8,
    /// Last bus.
    pub bus_end: u8,
}

/// The DMAR table.
#[derive(Debug, Default)]
pub struct Dmar {
    /// DMA address width the platform supports, in bits.
    pub host_address_width: u8,
    /// Remapping hardware units.
    pub units: Vec<Drhd>,
    /// Reserved memory regions that must stay identity mapped for their devices.
    pub rmrrs: Vec<Rmrr>,
}

/// A DMA remapping hardware unit definition.
#[derive(Debug)]
pub struct Drhd {
    /// Register base.
    pub base: u64,
    /// PCI segment.
    pub segment: u16,
    /// Covers every device not listed under another unit.
    pub include_all: bool,
    /// Devices it covers.
    pub scopes: Vec<DeviceScope>,
}

/// A reserved memory region report.
#[derive(Debug)]
pub struct Rmrr {
    /// First byte.
    pub base: u64,
    /// Last byte.
    pub limit: u64,
    /// Devices using it.
    pub scopes: Vec<DeviceScope>,
}

/// A device scope entry: type (1 PCI endpoint, 2 bridge, 3 IOAPIC, 4 HPET), and the
/// bus/device/function it resolves to (first path element from the start bus).
#[derive(Clone, Copy, Debug)]
pub struct DeviceScope {
    /// Scope type.
    pub kind: u8,
    /// Enumeration id (IOAPIC/HPET id).
    pub enum_id: u8,
    /// Bus.
    pub bus: u8,
    /// Device.
    pub dev: u8,
    /// Function.
    pub func: u8,
}

/// A checked view of one table.
struct Table(&'static [u8]);

impl Table {
    /// Maps the table at `pa` after checking its length and checksum.
    fn at(pa: u64) -> Option<Table> {
        if pa == 0 {
            return None;
        }
        // SAFETY: ACPI tables are in RAM the identity map covers; we read the header's
        // length first and cap it.
        let len = unsafe { core::ptr::read_unaligned(phys_to_ptr::<u32>(pa + 4)) } as usize;
        if !(36..=(1 << 20)).contains(&len) {
            return None;
        }
        // SAFETY: as above, for `len` bytes.
        let bytes = unsafe { core::slice::from_raw_parts(phys_to_ptr::<u8>(pa), len) };
        if bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)) != 0 {
            warn!("acpi: table at {pa:#x} has a bad checksum; ignored");
            return None;
        }
        Some(Table(bytes))
    }
    fn sig(&self) -> &str {
        core::str::from_utf8(&self.0[..4]).unwrap_or("????")
    }
    fn u8(&self, o: usize) -> Option<u8> {
        self.0.get(o).copied()
    }
    fn u16(&self, o: usize) -> Option<u16> {
        Some(u16::from_le_bytes(self.0.get(o..o + 2)?.try_into().ok()?))
    }
    fn u32(&self, o: usize) -> Option<u32> {
        Some(u32::from_le_bytes(self.0.get(o..o + 4)?.try_into().ok()?))
    }
    fn u64(&self, o: usize) -> Option<u64> {
        Some(u64::from_le_bytes(self.0.get(o..o + 8)?.try_into().ok()?))
    }
}

/// Reads the tables from the RSDP at `rsdp` (0: none).
pub fn init(rsdp: u64) -> Option<Platform> {
    if rsdp == 0 {
        log::info!("acpi: the firmware gave no RSDP (e.g. OVMF under Bochs)");
        return None;
    }
    // SAFETY: the RSDP is 36 bytes of firmware memory, identity mapped.
    let r = unsafe { core::slice::from_raw_parts(phys_to_ptr::<u8>(rsdp), 36) };
    if &r[..8] != b"RSD PTR " {
        warn!("acpi: RSDP signature missing at {rsdp:#x}");
        return None;
    }
    let mut p = Platform {
        oem: String::from(core::str::from_utf8(&r[9..15]).unwrap_or("?").trim_end()),
        ..Platform::default()
    };
    let (root, entry) = if r[15] >= 2 {
        (u64::from_le_bytes(r[24..32].try_into().ok()?), 8)
    } else {
        (u64::from(u32::from_le_bytes(r[16..20].try_into().ok()?)), 4)
    };
    let root = Table::at(root)?;
    let mut off = 36;
    while off + entry <= root.0.len() {
        let pa = if entry == 8 {
            root.u64(off)?
        } else {
            u64::from(root.u32(off)?)
        };
        off += entry;
        let Some(t) = Table::at(pa) else { continue };
        if !p.tables.is_empty() {
            p.tables.push(' ');
        }
        p.tables.push_str(t.sig());
        match t.sig() {
            "APIC" => parse_madt(&t, &mut p),
            "MCFG" => {
                // Entries of 16 bytes after 8 reserved bytes; segment 0 is what we use.
                let mut o = 44;
                while o + 16 <= t.0.len() {
                    if t.u16(o + 8) == Some(0) && p.ecam.is_none() {
                        p.ecam = Some(Ecam {
                            base: t.u64(o)?,
                            bus_start: t.u8(o + 10)?,
                            bus_end: t.u8(o + 11)?,
                        });
                    }
                    o += 16;
                }
            }
            "DMAR" => p.dmar = parse_dmar(&t),
            "HPET" => p.hpet = t.u64(44),
            _ => {}
        }
    }
    Some(p)
}

fn parse_madt(t: &Table, p: &mut Platform) {
    p.lapic_base = u64::from(t.u32(36).unwrap_or(0xfee0_0000));
    let mut o = 44;
    while let (Some(kind), Some(len)) = (t.u8(o), t.u8(o + 1)) {
        let len = len as usize;
        if len < 2 || o + len > t.0.len() {
            break;
        }
        match kind {
            0 => {
                let flags = t.u32(o + 4).unwrap_or(0);
                if flags & 1 != 0 {
                    p.cpus.push(u32::from(t.u8(o + 3).unwrap_or(0)));
                }
            }
            1 => p.ioapics.push((
                t.u8(o + 2).unwrap_or(0),
                u64::from(t.u32(o + 4).unwrap_or(0)),
                t.u32(o + 8).unwrap_or(0),
            )),
            5 => p.lapic_base = t.u64(o + 4).unwrap_or(p.lapic_base),
            9 => {
                let flags = t.u32(o + 8).unwrap_or(0);
                let id = t.u32(o + 4).unwrap_or(0);
                if flags & 1 != 0 && !p.cpus.contains(&id) {
                    p.cpus.push(id);
                }
            }
            _ => {}
        }
        o += len;
    }
}

fn parse_scopes(t: &Table, mut o: usize, end: usize) -> Vec<DeviceScope> {
    let mut v = Vec::new();
    while o + 6 <= end {
        let (Some(kind), Some(len)) = (t.u8(o), t.u8(o + 1)) else {
            break;
        };
        let len = len as usize;
        if len < 6 || o + len > end {
            break;
        }
        v.push(DeviceScope {
            kind,
            enum_id: t.u8(o + 4).unwrap_or(0),
            bus: t.u8(o + 5).unwrap_or(0),
            dev: if len >= 8 {
                t.u8(o + 6).unwrap_or(0)
            } else {
                0
            },
            func: if len >= 8 {
                t.u8(o + 7).unwrap_or(0)
            } else {
                0
            },
        });
        o += len;
    }
    v
}

fn parse_dmar(t: &Table) -> Option<Dmar> {
    let mut d = Dmar {
        host_address_width: t.u8(36)?.saturating_add(1),
        ..Dmar::default()
    };
    let mut o = 48;
    while let (Some(kind), Some(len)) = (t.u16(o), t.u16(o + 2)) {
        let len = len as usize;
        if len < 4 || o + len > t.0.len() {
            break;
        }
        match kind {
            0 => d.units.push(Drhd {
                include_all: t.u8(o + 4)? & 1 != 0,
                segment: t.u16(o + 6)?,
                base: t.u64(o + 8)?,
                scopes: parse_scopes(t, o + 16, o + len),
            }),
            1 => d.rmrrs.push(Rmrr {
                base: t.u64(o + 8)?,
                limit: t.u64(o + 16)?,
                scopes: parse_scopes(t, o + 24, o + len),
            }),
            _ => {}
        }
        o += len;
    }
    Some(d)
}
