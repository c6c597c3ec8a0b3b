//! The firmware's ACPI tables as pure logic: RSDP -> XSDT (or RSDT) -> MADT (CPUs,
//! I/O APICs), MCFG (ECAM), DMAR (VT-d units, reserved regions, device scopes) and
//! HPET.
//!
//! Why a crate of its own: firmware tables are untrusted input. The kernel acts on
//! what they say (which CPUs to start, where the IOMMU's registers and the PCI
//! configuration space are), and a buggy or hostile firmware, or a tampered image,
//! can say anything. So the tables are parsed here without `unsafe`, from byte
//! slices a [`PhysMemory`] hands out, and tested on the host: unit tests with
//! hand-built tables (`src/tests.rs`) and fuzz targets over fuzz-provided memory
//! images (`fuzz/`). The kernel's only part is its [`PhysMemory`]: its map of
//! physical memory, one `unsafe` block in `hypervisor/src/acpi.rs`.
//!
//! Nothing is used before it is checked:
//! - the RSDP's signature and checksum (its first 20 bytes) and, from revision 2, its
//!   extended checksum (all 36 bytes); a revision 0 RSDP is read as its 20 bytes only;
//! - every table's length (at least its 36-byte header, at most [`MAX_TABLE_LEN`],
//!   all of it in readable memory) and its checksum over that length;
//! - the root table's signature (`XSDT` or `RSDT`, as the RSDP chose) and that its
//!   pointers fill it exactly;
//! - each table's fixed part, and every entry's and sub-structure's length against
//!   the minimum of its kind (so a length of 0 cannot loop forever and no field is
//!   read from the entry after it) and against the end of what holds it.
//!
//! A table that fails any check is skipped whole: it gives nothing, not even the
//! entries before the damage, and [`parse`] reports it as a [`Warning`] (the kernel
//! logs each). Without a valid RSDP and root table there is no [`Platform`].
//!
//! Why not the `acpi` crate (crates.io, `default-features = false`) for the standard
//! tables: it reaches tables through its `AcpiHandler`, an `unsafe` mapping callback
//! that hands out raw pointers its parsers then dereference, so it cannot run over a
//! fuzz-provided byte image without `unsafe` code here, and the parsing that must be
//! right would sit outside these tests and fuzz targets. It has no DMAR parser either,
//! so a hand-written one stays in any case; next to it, what is left (four MADT entry
//! kinds, MCFG's allocations, HPET's base) is a few dozen lines over checked slices.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

mod tables;
#[cfg(test)]
mod tests;

pub use tables::{contents, dmar, hpet, madt, mcfg, Contents, Madt};

/// Largest table accepted, in bytes (a real MADT, MCFG, DMAR or HPET is a few KiB;
/// an XSDT of this size would list 131072 tables).
pub const MAX_TABLE_LEN: usize = 1 << 20;
/// Bytes of the standard table header.
pub const HEADER_LEN: usize = 36;
/// Bytes of a revision 0 RSDP (the part the first checksum covers).
pub const RSDP_V1_LEN: usize = 20;
/// Bytes of a revision 2 (and later) RSDP (the extended checksum covers them).
pub const RSDP_V2_LEN: usize = 36;

/// Reads firmware memory by physical address.
pub trait PhysMemory {
    /// The `len` bytes at physical address `pa`, or `None` when not all of them are
    /// readable (an implementation must check `pa + len` for overflow).
    fn read(&self, pa: u64, len: usize) -> Option<&[u8]>;
}

/// A memory image: `bytes` at physical address `base`, nothing else readable.
#[derive(Clone, Copy, Debug)]
pub struct MemoryImage<'a> {
    /// Physical address of `bytes[0]`.
    pub base: u64,
    /// The contents.
    pub bytes: &'a [u8],
}

impl PhysMemory for MemoryImage<'_> {
    fn read(&self, pa: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(pa.checked_sub(self.base)?).ok()?;
        self.bytes.get(start..start.checked_add(len)?)
    }
}

/// What the firmware's tables say about the platform.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Platform {
    /// OEM id of the RSDP.
    pub oem: String,
    /// Signatures of every table in the XSDT that passed its checks, separated by
    /// spaces (see [`printable`]).
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ecam {
    /// MMIO base of bus 0.
    pub base: u64,
    /// First bus.
    pub bus_start: u8,
    /// Last bus (at least `bus_start`).
    pub bus_end: u8,
}

/// The DMAR table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dmar {
    /// DMA address width the platform supports, in bits.
    pub host_address_width: u8,
    /// Remapping hardware units.
    pub units: Vec<Drhd>,
    /// Reserved memory regions that must stay identity mapped for their devices.
    pub rmrrs: Vec<Rmrr>,
}

/// A DMA remapping hardware unit definition.
#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Why the RSDP or a table was not trusted. Offsets are from the table's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Not all of its bytes are in readable memory (or the slice is too short).
    Unreadable,
    /// The RSDP's `"RSD PTR "`, or the root table's `XSDT`/`RSDT`, is missing.
    Signature,
    /// The bytes the checksum covers do not add up to 0 (modulo 256).
    Checksum,
    /// The RSDP's extended checksum (revision >= 2) does not add up to 0.
    ExtendedChecksum,
    /// The header's length is outside `36..=MAX_TABLE_LEN`.
    Length(u32),
    /// Shorter than the fixed part of its kind of table.
    Truncated {
        /// Bytes the fixed part needs.
        needed: usize,
        /// Bytes the table has.
        len: usize,
    },
    /// An entry (or sub-structure) shorter than the minimum of its kind.
    Short {
        /// Where it starts.
        offset: usize,
        /// The length it claims.
        len: usize,
        /// The least its kind needs.
        min: usize,
    },
    /// An entry (or sub-structure) running past the end of what holds it.
    PastEnd {
        /// Where it starts.
        offset: usize,
        /// The length it claims (or, for a header cut off, needs).
        len: usize,
        /// Where what holds it ends.
        end: usize,
    },
    /// A field with a value the kernel cannot use.
    Invalid {
        /// Where the entry or field starts.
        offset: usize,
        /// What is wrong.
        why: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unreadable => write!(f, "not in readable memory"),
            Error::Signature => write!(f, "signature missing"),
            Error::Checksum => write!(f, "bad checksum"),
            Error::ExtendedChecksum => write!(f, "bad extended checksum"),
            Error::Length(l) => write!(f, "length {l} outside {HEADER_LEN}..={MAX_TABLE_LEN}"),
            Error::Truncated { needed, len } => {
                write!(f, "{len} bytes, shorter than its fixed part of {needed}")
            }
            Error::Short { offset, len, min } => write!(
                f,
                "entry at offset {offset:#x}: length {len} below its kind's {min}"
            ),
            Error::PastEnd { offset, len, end } => write!(
                f,
                "entry at offset {offset:#x}: length {len} runs past the end at {end:#x}"
            ),
            Error::Invalid { offset, why } => write!(f, "entry at offset {offset:#x} {why}"),
        }
    }
}

/// The RSDP or a table that was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Warning {
    /// Its physical address.
    pub pa: u64,
    /// `*b"RSDP"` for the RSDP; a table's signature as read (`????` if unreadable).
    pub signature: [u8; 4],
    /// Why.
    pub error: Error,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sig = printable(&self.signature);
        write!(f, "{sig} at {:#x}: {}; ignored", self.pa, self.error)
    }
}

/// A signature as text: `????` unless all four bytes are printable ASCII without
/// spaces (so firmware cannot put control bytes into the log, nor split the
/// space-separated [`Platform::tables`] list).
pub fn printable(signature: &[u8; 4]) -> &str {
    match core::str::from_utf8(signature) {
        Ok(s) if s.bytes().all(|b| b.is_ascii_graphic()) => s,
        _ => "????",
    }
}

/// What [`parse`] found: the platform (`None` without a valid RSDP and root table)
/// and every RSDP or table it skipped, in the order met.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The platform.
    pub platform: Option<Platform>,
    /// What was skipped and why.
    pub warnings: Vec<Warning>,
}

/// Whether `bytes` add up to 0 modulo 256 (the ACPI checksum rule).
pub fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0
}

/// Little-endian fields of a byte slice; `None` past its end.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bytes<'a>(pub(crate) &'a [u8]);

impl Bytes<'_> {
    fn array<const N: usize>(self, o: usize) -> Option<[u8; N]> {
        self.0.get(o..o.checked_add(N)?)?.try_into().ok()
    }
    pub(crate) fn u8(self, o: usize) -> Option<u8> {
        self.0.get(o).copied()
    }
    pub(crate) fn u16(self, o: usize) -> Option<u16> {
        self.array(o).map(u16::from_le_bytes)
    }
    pub(crate) fn u32(self, o: usize) -> Option<u32> {
        self.array(o).map(u32::from_le_bytes)
    }
    pub(crate) fn u64(self, o: usize) -> Option<u64> {
        self.array(o).map(u64::from_le_bytes)
    }
}

/// One table whose length and checksum have been checked: exactly its bytes.
#[derive(Clone, Copy, Debug)]
pub struct Table<'a>(&'a [u8]);

impl<'a> Table<'a> {
    /// Checks the table at the start of `bytes` (which may go on past it): its length
    /// field (`36..=MAX_TABLE_LEN`, within `bytes`) and its checksum over that length.
    pub fn new(bytes: &'a [u8]) -> Result<Table<'a>, Error> {
        let len = Bytes(bytes).u32(4).ok_or(Error::Unreadable)?;
        let n = checked_len(len)?;
        let bytes = bytes.get(..n).ok_or(Error::Unreadable)?;
        if !checksum_ok(bytes) {
            return Err(Error::Checksum);
        }
        Ok(Table(bytes))
    }

    /// Reads and checks the table at physical address `pa`: its header first, then
    /// the length the header gives.
    pub fn read(mem: &'a impl PhysMemory, pa: u64) -> Result<Table<'a>, Error> {
        let header = mem.read(pa, HEADER_LEN).ok_or(Error::Unreadable)?;
        let len = Bytes(header).u32(4).ok_or(Error::Unreadable)?;
        let n = checked_len(len)?;
        Table::new(mem.read(pa, n).ok_or(Error::Unreadable)?)
    }

    /// Its signature.
    pub fn signature(&self) -> [u8; 4] {
        let mut s = [0; 4];
        s.copy_from_slice(&self.0[..4]);
        s
    }

    /// Its bytes, header included (as many as its length says).
    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }

    /// Its length in bytes (at least [`HEADER_LEN`]).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never: a table holds at least its header.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Fails unless the table holds at least `needed` bytes (its fixed part).
    pub(crate) fn need(&self, needed: usize) -> Result<(), Error> {
        if self.len() < needed {
            return Err(Error::Truncated {
                needed,
                len: self.len(),
            });
        }
        Ok(())
    }

    pub(crate) fn at(&self) -> Bytes<'a> {
        Bytes(self.0)
    }
}

fn checked_len(len: u32) -> Result<usize, Error> {
    match usize::try_from(len) {
        Ok(n) if (HEADER_LEN..=MAX_TABLE_LEN).contains(&n) => Ok(n),
        _ => Err(Error::Length(len)),
    }
}

/// The RSDP's findings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rsdp {
    /// OEM id (trailing spaces trimmed).
    pub oem: String,
    /// Physical address of the root table.
    pub root: u64,
    /// The root is an XSDT (64-bit pointers) rather than an RSDT (32-bit).
    pub xsdt: bool,
}

/// Reads and checks the RSDP at `pa`: signature, checksum of the first 20 bytes and,
/// for revision 2 and later, the extended checksum of all 36. The root is the XSDT
/// from revision 2 when its address is not 0, the RSDT otherwise.
pub fn rsdp(mem: &impl PhysMemory, pa: u64) -> Result<Rsdp, Error> {
    let r = mem.read(pa, RSDP_V1_LEN).ok_or(Error::Unreadable)?;
    if &r[..8] != b"RSD PTR " {
        return Err(Error::Signature);
    }
    if !checksum_ok(r) {
        return Err(Error::Checksum);
    }
    let oem = String::from(core::str::from_utf8(&r[9..15]).unwrap_or("?").trim_end());
    let rsdt = u64::from(Bytes(r).u32(16).ok_or(Error::Unreadable)?);
    if r[15] >= 2 {
        let r = mem.read(pa, RSDP_V2_LEN).ok_or(Error::Unreadable)?;
        if !checksum_ok(r) {
            return Err(Error::ExtendedChecksum);
        }
        let xsdt = Bytes(r).u64(24).ok_or(Error::Unreadable)?;
        if xsdt != 0 {
            return Ok(Rsdp {
                oem,
                root: xsdt,
                xsdt: true,
            });
        }
    }
    Ok(Rsdp {
        oem,
        root: rsdt,
        xsdt: false,
    })
}

/// The table pointers of a checked root table (XSDT: 8 bytes each, RSDT: 4), which
/// must carry the expected signature and be filled exactly by its pointers.
pub fn root_entries(t: &Table, xsdt: bool) -> Result<Vec<u64>, Error> {
    let (sig, size) = if xsdt { (b"XSDT", 8) } else { (b"RSDT", 4) };
    if &t.signature() != sig {
        return Err(Error::Signature);
    }
    let body = &t.bytes()[HEADER_LEN..];
    if !body.len().is_multiple_of(size) {
        let offset = HEADER_LEN + body.len() / size * size;
        return Err(Error::PastEnd {
            offset,
            len: size,
            end: t.len(),
        });
    }
    Ok(body
        .chunks_exact(size)
        .map(|c| {
            let b = Bytes(c);
            if xsdt {
                b.u64(0).unwrap_or(0)
            } else {
                u64::from(b.u32(0).unwrap_or(0))
            }
        })
        .collect())
}

/// The signature at `pa`, `????` when unreadable (for warnings).
fn signature_at(mem: &impl PhysMemory, pa: u64) -> [u8; 4] {
    mem.read(pa, 4)
        .and_then(|b| b.try_into().ok())
        .unwrap_or(*b"????")
}

/// Walks RSDP -> root table -> every table it lists, checking each, and gathers what
/// the MADT, MCFG, DMAR and HPET say. Null pointers in the root table are skipped
/// quietly; everything else that fails a check is skipped with a [`Warning`].
///
/// When tables repeat, MADTs add up (the last one's local APIC base wins), the first
/// segment-0 MCFG allocation wins, and the last DMAR and HPET win.
pub fn parse(mem: &impl PhysMemory, rsdp_pa: u64) -> Parsed {
    let mut out = Parsed::default();
    let r = match rsdp(mem, rsdp_pa) {
        Ok(r) => r,
        Err(error) => {
            out.warnings.push(Warning {
                pa: rsdp_pa,
                signature: *b"RSDP",
                error,
            });
            return out;
        }
    };
    let entries = Table::read(mem, r.root).and_then(|t| root_entries(&t, r.xsdt));
    let entries = match entries {
        Ok(e) => e,
        Err(error) => {
            out.warnings.push(Warning {
                pa: r.root,
                signature: signature_at(mem, r.root),
                error,
            });
            return out;
        }
    };
    let mut p = Platform {
        oem: r.oem,
        ..Platform::default()
    };
    for pa in entries {
        if pa == 0 {
            continue;
        }
        let found = Table::read(mem, pa).and_then(|t| Ok((t.signature(), contents(&t)?)));
        let (sig, c) = match found {
            Ok(f) => f,
            Err(error) => {
                out.warnings.push(Warning {
                    pa,
                    signature: signature_at(mem, pa),
                    error,
                });
                continue;
            }
        };
        if !p.tables.is_empty() {
            p.tables.push(' ');
        }
        p.tables.push_str(printable(&sig));
        match c {
            Contents::Madt(m) => {
                p.lapic_base = m.lapic_base;
                for id in m.cpus {
                    p.cpus.push(id);
                }
                p.ioapics.extend(m.ioapics);
            }
            Contents::Mcfg(allocations) => {
                if p.ecam.is_none() {
                    p.ecam = allocations
                        .into_iter()
                        .find(|(segment, _)| *segment == 0)
                        .map(|(_, e)| e);
                }
            }
            Contents::Dmar(d) => p.dmar = Some(d),
            Contents::Hpet(base) => p.hpet = Some(base),
            Contents::Other => {}
        }
    }
    out.platform = Some(p);
    out
}
