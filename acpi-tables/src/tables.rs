//! The four tables the kernel reads, each from a [`Table`] whose length and checksum
//! are already checked. Every entry is checked against the minimum length of its
//! kind and the end of what holds it before any of its fields is read.

use alloc::vec::Vec;

use crate::{Bytes, DeviceScope, Dmar, Drhd, Ecam, Error, Rmrr, Table};

/// What one table gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Contents {
    /// `APIC`.
    Madt(Madt),
    /// `MCFG`: every allocation as (PCI segment, window).
    Mcfg(Vec<(u16, Ecam)>),
    /// `DMAR`.
    Dmar(Dmar),
    /// `HPET`: its MMIO base.
    Hpet(u64),
    /// Any other table (only its length and checksum were checked).
    Other,
}

/// Parses `t` by its signature.
pub fn contents(t: &Table) -> Result<Contents, Error> {
    Ok(match &t.signature() {
        b"APIC" => Contents::Madt(madt(t)?),
        b"MCFG" => Contents::Mcfg(mcfg(t)?),
        b"DMAR" => Contents::Dmar(dmar(t)?),
        b"HPET" => Contents::Hpet(hpet(t)?),
        _ => Contents::Other,
    })
}

/// A list of type-length entries: `wide` for 2-byte type and length fields (DMAR's
/// remapping structures), 1-byte otherwise (MADT entries, device scopes).
struct Entries<'a> {
    table: &'a [u8],
    at: usize,
    end: usize,
    wide: bool,
    min: fn(u16) -> usize,
}

impl<'a> Entries<'a> {
    /// The entries of `table[start..end]`, each at least `min(kind)` bytes long.
    fn new(table: &'a [u8], start: usize, end: usize, wide: bool, min: fn(u16) -> usize) -> Self {
        Entries {
            table,
            at: start,
            end,
            wide,
            min,
        }
    }
}

/// One entry: (offset in the table, kind, its bytes).
type Entry<'a> = (usize, u16, &'a [u8]);

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, Error>;

    /// The next entry, or `None` at the end; after an error, `None`.
    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.end {
            return None;
        }
        let o = self.at;
        let Some(area) = self.table.get(..self.end) else {
            self.at = self.end;
            return Some(Err(Error::PastEnd {
                offset: o,
                len: 0,
                end: self.end,
            }));
        };
        let b = Bytes(area);
        let header = if self.wide { 4 } else { 2 };
        let kl = if self.wide {
            b.u16(o).zip(b.u16(o + 2))
        } else {
            b.u8(o).map(u16::from).zip(b.u8(o + 1).map(u16::from))
        };
        let Some((kind, len)) = kl else {
            // Fewer bytes left than an entry header.
            self.at = self.end;
            return Some(Err(Error::PastEnd {
                offset: o,
                len: header,
                end: self.end,
            }));
        };
        let len = usize::from(len);
        let min = (self.min)(kind).max(header);
        if len < min {
            self.at = self.end;
            return Some(Err(Error::Short {
                offset: o,
                len,
                min,
            }));
        }
        let Some(entry) = area.get(o..o + len) else {
            self.at = self.end;
            return Some(Err(Error::PastEnd {
                offset: o,
                len,
                end: self.end,
            }));
        };
        self.at = o + len;
        Some(Ok((o, kind, entry)))
    }
}

/// A field of an entry whose length was checked against its kind's minimum: always
/// there, but read without a panic path all the same.
fn field<T>(v: Option<T>, offset: usize) -> Result<T, Error> {
    v.ok_or(Error::Invalid {
        offset,
        why: "has a field past its end",
    })
}

/// What the MADT says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Madt {
    /// Local APIC MMIO base (the 64-bit override entry's, if any).
    pub lapic_base: u64,
    /// Local APIC ids of enabled CPUs, in the table's order (an x2APIC entry for an id
    /// already listed is not listed again).
    pub cpus: Vec<u32>,
    /// I/O APICs: (id, MMIO base, first GSI).
    pub ioapics: Vec<(u8, u64, u32)>,
}

/// MADT entry minimum lengths: local APIC 8, I/O APIC 12, local APIC address
/// override 12, local x2APIC 16; any other kind its 2-byte header.
fn madt_min(kind: u16) -> usize {
    match kind {
        0 => 8,
        1 | 5 => 12,
        9 => 16,
        _ => 2,
    }
}

/// Parses a MADT (`APIC`): local APIC base (offset 36), flags, entries from 44.
pub fn madt(t: &Table) -> Result<Madt, Error> {
    t.need(44)?;
    let mut m = Madt {
        lapic_base: u64::from(t.at().u32(36).unwrap_or(0xfee0_0000)),
        ..Madt::default()
    };
    for e in Entries::new(t.bytes(), 44, t.len(), false, madt_min) {
        let (o, kind, e) = e?;
        let e = Bytes(e);
        match kind {
            0 if field(e.u32(4), o)? & 1 != 0 => m.cpus.push(u32::from(field(e.u8(3), o)?)),
            1 => m.ioapics.push((
                field(e.u8(2), o)?,
                u64::from(field(e.u32(4), o)?),
                field(e.u32(8), o)?,
            )),
            5 => m.lapic_base = field(e.u64(4), o)?,
            9 => {
                let id = field(e.u32(4), o)?;
                if field(e.u32(8), o)? & 1 != 0 && !m.cpus.contains(&id) {
                    m.cpus.push(id);
                }
            }
            _ => {}
        }
    }
    Ok(m)
}

/// Parses an MCFG: 8 reserved bytes after the header, then allocations of 16 bytes
/// (base, segment, first bus, last bus), which must fill the table exactly.
pub fn mcfg(t: &Table) -> Result<Vec<(u16, Ecam)>, Error> {
    t.need(44)?;
    let mut v = Vec::new();
    let mut o = 44;
    while o < t.len() {
        if o + 16 > t.len() {
            return Err(Error::PastEnd {
                offset: o,
                len: 16,
                end: t.len(),
            });
        }
        let b = t.at();
        let e = Ecam {
            base: field(b.u64(o), o)?,
            bus_start: field(b.u8(o + 10), o)?,
            bus_end: field(b.u8(o + 11), o)?,
        };
        if e.bus_end < e.bus_start {
            return Err(Error::Invalid {
                offset: o,
                why: "ends below its first bus",
            });
        }
        v.push((field(b.u16(o + 8), o)?, e));
        o += 16;
    }
    Ok(v)
}

/// Parses an HPET table (56 bytes): the base address is the Generic Address
/// Structure at offset 40, which must be in system memory space (0).
pub fn hpet(t: &Table) -> Result<u64, Error> {
    t.need(56)?;
    if t.at().u8(40) != Some(0) {
        return Err(Error::Invalid {
            offset: 40,
            why: "is not in system memory space",
        });
    }
    field(t.at().u64(44), 44)
}

/// DMAR remapping structure minimum lengths: DRHD 16, RMRR 24, any other its
/// 4-byte header.
fn dmar_min(kind: u16) -> usize {
    match kind {
        0 => 16,
        1 => 24,
        _ => 4,
    }
}

/// Device scopes are at least 6 bytes (type, length, 2 reserved, enumeration id,
/// start bus), then (device, function) path pairs.
fn scope_min(_: u16) -> usize {
    6
}

/// The device scopes in `table[start..end]` (the rest of one remapping structure).
fn scopes(table: &[u8], start: usize, end: usize) -> Result<Vec<DeviceScope>, Error> {
    let mut v = Vec::new();
    for s in Entries::new(table, start, end, false, scope_min) {
        let (o, kind, s) = s?;
        let s = Bytes(s);
        let path = s.0.len() >= 8;
        v.push(DeviceScope {
            kind: kind as u8,
            enum_id: field(s.u8(4), o)?,
            bus: field(s.u8(5), o)?,
            dev: if path { field(s.u8(6), o)? } else { 0 },
            func: if path { field(s.u8(7), o)? } else { 0 },
        });
    }
    Ok(v)
}

/// Parses a DMAR: host address width (offset 36), flags, 10 reserved bytes, then
/// remapping structures from 48 with device scopes inside DRHDs and RMRRs.
pub fn dmar(t: &Table) -> Result<Dmar, Error> {
    t.need(48)?;
    let mut d = Dmar {
        host_address_width: field(t.at().u8(36), 36)?.saturating_add(1),
        ..Dmar::default()
    };
    for s in Entries::new(t.bytes(), 48, t.len(), true, dmar_min) {
        let (o, kind, s) = s?;
        let end = o + s.len();
        let b = Bytes(s);
        match kind {
            0 => d.units.push(Drhd {
                include_all: field(b.u8(4), o)? & 1 != 0,
                segment: field(b.u16(6), o)?,
                base: field(b.u64(8), o)?,
                scopes: scopes(t.bytes(), o + 16, end)?,
            }),
            1 => d.rmrrs.push(Rmrr {
                base: field(b.u64(8), o)?,
                limit: field(b.u64(16), o)?,
                scopes: scopes(t.bytes(), o + 24, end)?,
            }),
            _ => {}
        }
    }
    Ok(d)
}
