//! VT-d remapping hardware registers: offsets, field decoders and MMIO access.
//!
//! References are to the Intel Virtualization Technology for Directed I/O
//! Architecture Specification, rev 3.x/4.x, chapter 10 ("Register Descriptions"),
//! section numbers as in rev 3.x:
//! 10.4.1 VER, 10.4.2 CAP, 10.4.3 ECAP, 10.4.4 GCMD, 10.4.5 GSTS, 10.4.6 RTADDR,
//! 10.4.7 CCMD, 10.4.8 IOTLB registers (IVA, IOTLB), 10.4.9 FSTS, 10.4.10 FECTL,
//! 10.4.11 FEDATA, 10.4.12 FEADDR, 10.4.13 FEUADDR, 10.4.14 FRCD, 10.4.16 PMEN,
//! 10.4.22-24 IQH/IQT/IQA.

// The full register map, not only what the driver uses today.
#![allow(dead_code)]

use crate::mm::phys_to_ptr;

/// Version (32-bit): bits 7:4 major, 3:0 minor.
pub const VER: u64 = 0x00;
/// Capability (64-bit).
pub const CAP: u64 = 0x08;
/// Extended capability (64-bit).
pub const ECAP: u64 = 0x10;
/// Global command (32-bit, write only).
pub const GCMD: u64 = 0x18;
/// Global status (32-bit).
pub const GSTS: u64 = 0x1c;
/// Root table address (64-bit).
pub const RTADDR: u64 = 0x20;
/// Context command (64-bit).
pub const CCMD: u64 = 0x28;
/// Fault status (32-bit).
pub const FSTS: u64 = 0x34;
/// Fault event control (32-bit).
pub const FECTL: u64 = 0x38;
/// Fault event data (32-bit).
pub const FEDATA: u64 = 0x3c;
/// Fault event address (32-bit).
pub const FEADDR: u64 = 0x40;
/// Fault event upper address (32-bit).
pub const FEUADDR: u64 = 0x44;
/// Protected memory enable (32-bit).
pub const PMEN: u64 = 0x64;
/// Invalidation queue head (64-bit).
pub const IQH: u64 = 0x80;
/// Invalidation queue tail (64-bit).
pub const IQT: u64 = 0x88;

// GCMD / GSTS bits (10.4.4, 10.4.5). Status bit n reports command bit n.
/// Translation enable.
pub const G_TE: u32 = 1 << 31;
/// Set root table pointer (one-shot) / root table pointer status.
pub const G_SRTP: u32 = 1 << 30;
/// Write buffer flush (one-shot) / write buffer flush status.
pub const G_WBF: u32 = 1 << 27;
/// Queued invalidation enable.
pub const G_QIE: u32 = 1 << 26;
/// Interrupt remapping enable.
pub const G_IRE: u32 = 1 << 25;
/// GSTS bits that are not one-shot commands: what to keep when building a GCMD value
/// from GSTS (10.4.4: "read GSTS, mask 0x96FF_FFFF, set/clear one bit, write GCMD").
pub const G_PERSISTENT: u32 = 0x96ff_ffff;

// CCMD (10.4.7).
/// Invalidate context cache (set to start, cleared by hardware when done).
pub const CCMD_ICC: u64 = 1 << 63;
/// Global invalidation request.
pub const CCMD_GLOBAL: u64 = 1 << 61;
/// Domain-selective invalidation request.
pub const CCMD_DOMAIN: u64 = 2 << 61;
/// Device-selective invalidation request.
pub const CCMD_DEVICE: u64 = 3 << 61;

// IOTLB invalidate register at ECAP.IRO*16 + 8 (10.4.8.1); IVA at +0 (10.4.8.2).
/// Invalidate IOTLB (set to start, cleared by hardware when done).
pub const IOTLB_IVT: u64 = 1 << 63;
/// Global invalidation request.
pub const IOTLB_GLOBAL: u64 = 1 << 60;
/// Domain-selective invalidation request.
pub const IOTLB_DOMAIN: u64 = 2 << 60;
/// Page-selective-within-domain invalidation request.
pub const IOTLB_PAGE: u64 = 3 << 60;
/// Drain reads before completing (CAP.DRD).
pub const IOTLB_DR: u64 = 1 << 49;
/// Drain writes before completing (CAP.DWD).
pub const IOTLB_DW: u64 = 1 << 48;

// FSTS (10.4.9).
/// Primary fault overflow (RW1C).
pub const FSTS_PFO: u32 = 1 << 0;
/// Primary pending fault (RO: some fault record has F set).
pub const FSTS_PPF: u32 = 1 << 1;
/// Invalidation queue error (RW1C).
pub const FSTS_IQE: u32 = 1 << 4;

/// FECTL interrupt mask.
pub const FECTL_IM: u32 = 1 << 31;

/// The fault recording register's F bit within its top dword (bit 127 overall).
pub const FRCD_F: u32 = 1 << 31;

/// Decoded capability register (10.4.2).
#[derive(Clone, Copy, Debug)]
pub struct Cap(pub u64);

impl Cap {
    fn bits(self, lo: u32, n: u32) -> u64 {
        (self.0 >> lo) & ((1 << n) - 1)
    }
    /// Number of domain ids: 2^(4 + 2*ND).
    pub fn domains(self) -> u32 {
        1 << (4 + 2 * self.bits(0, 3).min(6))
    }
    /// Required write-buffer flushing.
    pub fn rwbf(self) -> bool {
        self.bits(4, 1) != 0
    }
    /// Protected low/high memory regions supported.
    pub fn pmr(self) -> bool {
        self.bits(5, 2) != 0
    }
    /// Caching mode: not-present entries may be cached.
    pub fn caching_mode(self) -> bool {
        self.bits(7, 1) != 0
    }
    /// Supported adjusted guest address widths (bit 1: 39-bit 3-level, bit 2: 48-bit
    /// 4-level, bit 3: 57-bit 5-level).
    pub fn sagaw(self) -> u32 {
        self.bits(8, 5) as u32
    }
    /// Maximum guest address width in bits.
    pub fn mgaw(self) -> u32 {
        self.bits(16, 6) as u32 + 1
    }
    /// Offset of the first fault recording register.
    pub fn fro(self) -> u64 {
        self.bits(24, 10) * 16
    }
    /// Second-level large page sizes (bit 0: 2 MiB, bit 1: 1 GiB).
    pub fn sllps(self) -> u32 {
        self.bits(34, 4) as u32
    }
    /// Page-selective IOTLB invalidation supported.
    pub fn psi(self) -> bool {
        self.bits(39, 1) != 0
    }
    /// Number of fault recording registers.
    pub fn nfr(self) -> u32 {
        self.bits(40, 8) as u32 + 1
    }
    /// Maximum address mask value for page-selective invalidation.
    pub fn mamv(self) -> u32 {
        self.bits(48, 6) as u32
    }
    /// Write draining supported.
    pub fn dwd(self) -> bool {
        self.bits(54, 1) != 0
    }
    /// Read draining supported.
    pub fn drd(self) -> bool {
        self.bits(55, 1) != 0
    }
}

/// Decoded extended capability register (10.4.3).
#[derive(Clone, Copy, Debug)]
pub struct Ecap(pub u64);

impl Ecap {
    /// Page walks snoop the CPU caches (else table updates need clflush).
    pub fn coherent(self) -> bool {
        self.0 & 1 != 0
    }
    /// Queued invalidation supported.
    pub fn qi(self) -> bool {
        self.0 & 2 != 0
    }
    /// Offset of the IOTLB registers (IVA at +0, IOTLB at +8).
    pub fn iro(self) -> u64 {
        ((self.0 >> 8) & 0x3ff) * 16
    }
    /// Pass-through translation type supported.
    pub fn pt(self) -> bool {
        self.0 & (1 << 6) != 0
    }
}

/// One remapping unit's register block.
#[derive(Clone, Copy, Debug)]
pub struct Regs {
    base: u64,
}

impl Regs {
    /// The register block at `base` (page aligned, mapped uncached by the caller).
    pub fn new(base: u64) -> Regs {
        Regs { base }
    }
    /// Its physical base.
    pub fn base(&self) -> u64 {
        self.base
    }
    /// Reads a 32-bit register.
    pub fn r32(&self, off: u64) -> u32 {
        // SAFETY: `base` is a DRHD register block from the DMAR table, mapped (identity,
        // uncached) before any access; `off` is one of the architectural offsets or a
        // CAP/ECAP-derived offset inside the mapped block; aligned 32-bit access.
        unsafe { core::ptr::read_volatile(phys_to_ptr::<u32>(self.base + off)) }
    }
    /// Writes a 32-bit register.
    pub fn w32(&self, off: u64, v: u32) {
        // SAFETY: as in `r32`.
        unsafe { core::ptr::write_volatile(phys_to_ptr::<u32>(self.base + off), v) }
    }
    /// Reads a 64-bit register.
    pub fn r64(&self, off: u64) -> u64 {
        // SAFETY: as in `r32`; 64-bit registers allow aligned 64-bit accesses (10.2).
        unsafe { core::ptr::read_volatile(phys_to_ptr::<u64>(self.base + off)) }
    }
    /// Writes a 64-bit register.
    pub fn w64(&self, off: u64, v: u64) {
        // SAFETY: as in `r64`.
        unsafe { core::ptr::write_volatile(phys_to_ptr::<u64>(self.base + off), v) }
    }
}
