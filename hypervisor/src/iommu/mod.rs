//! Intel VT-d DMA remapping: the hypervisor owns DMA isolation of the devices it
//! assigns (the GPU first).
//!
//! Intel Virtualization Technology for Directed I/O Architecture Specification,
//! rev 3.x/4.x; section numbers as in rev 3.x:
//! - 3.4.2 legacy-mode translation: root table (9.1) indexed by bus, context tables
//!   (9.3) indexed by device/function, second-level page tables (3.7, 9.8);
//! - 6.1 caching mode, 6.5.1 register-based invalidation (context cache through CCMD,
//!   IOTLB through the registers at ECAP.IRO), 6.6 set root table pointer, 6.8 write
//!   buffer flushing;
//! - 7.3 primary fault logging through the fault recording registers, 7.4 fault event
//!   interrupts; fault reason encodings in the "Non-Recoverable Fault Reason
//!   Encodings" table (appendix A in rev 3.x);
//! - 8.4 RMRR: regions firmware keeps using DMA for, identity mapped for the devices
//!   in their scope;
//! - 10.4 registers (see `regs`).
//!
//! Model:
//! - every remapping unit of the DMAR table gets a root table; translation is
//!   enabled at boot (GCMD.TE), so a device with no context entry faults on every
//!   DMA (reason 1 or 2);
//! - [`attach`] gives a device a fresh domain (own domain id, own second-level page
//!   table, RMRRs of the device identity mapped) and a context entry; [`detach`]
//!   removes both; [`map`]/[`unmap`]/[`translate`] edit and read a domain's tables;
//! - devices named in an RMRR scope get a holding domain with only their RMRRs
//!   mapped at boot, so firmware-owned DMA (USB legacy, iGPU stolen memory) keeps
//!   working until the hypervisor attaches the device itself;
//! - one page-table depth for all units: the smallest SAGAW depth that covers
//!   min(MGAW, 48) bits on every unit (3 levels / 39 bits or 4 levels / 48 bits);
//! - faults: the fault event interrupt (MSI to the bootstrap CPU, vector
//!   [`IOMMU_FAULT_VECTOR`]) only marks work pending; [`poll_faults`] (bottom half)
//!   reads, clears and returns the fault records; [`service`] logs them.
//!
//! Convention for drivers: a device's IOVA space is free-form, but mapping
//! `iova == hpa` keeps drivers identical on hosts without an IOMMU (Bochs, or no
//! DMAR), where [`attach`] returns [`Error::NoIommu`] and the device sees host
//! physical addresses.

mod regs;
#[cfg(feature = "selftest")]
pub mod selftest;
mod table;

use alloc::vec::Vec;
use core::fmt;

use gpu_pv::memory::Hpa;
use log::{error, info, warn};
use spin::Mutex;

use crate::acpi::{DeviceScope, Platform};
use crate::interrupts::IOMMU_FAULT_VECTOR;
use crate::mm::{frames, paging, phys_to_ptr, PAGE_SIZE};
use crate::pci::{self, Bdf};
use crate::{apic, println};

use regs::{Cap, Ecap, Regs};
use table::{flush_line, Table, TableError};

/// A DMA remapping domain (one address space; its id is the hardware domain id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainId(pub u16);

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "domain {}", self.0)
    }
}

/// Why an IOMMU operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// No usable remapping hardware (no DMAR table, `iommu=off`, or init failed).
    NoIommu,
    /// No remapping unit covers this device.
    NotCovered(Bdf),
    /// The device has a domain already.
    AlreadyAttached(Bdf, DomainId),
    /// The device has no domain.
    NotAttached(Bdf),
    /// No such domain.
    NoDomain(DomainId),
    /// Every domain id is in use.
    NoDomainId,
    /// Unaligned, empty, wrapping, or beyond the address widths (IOVA: the domain's
    /// AGAW and the units' MGAW; HPA: the DMAR host address width).
    BadRange,
    /// Part of the IOVA range is mapped already.
    AlreadyMapped,
    /// Out of frames for tables.
    NoMemory,
    /// The hardware did not complete a command in time.
    Timeout(&'static str),
}

impl From<TableError> for Error {
    fn from(e: TableError) -> Error {
        match e {
            TableError::AlreadyMapped => Error::AlreadyMapped,
            TableError::NoMemory => Error::NoMemory,
        }
    }
}

/// Kind of the faulted request (FRCD T1/T2 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// DMA read.
    Read,
    /// DMA write.
    Write,
    /// Page request (PRS).
    PageRequest,
    /// Atomic operation.
    Atomic,
}

impl Access {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::PageRequest => "page request",
            Access::Atomic => "atomic",
        }
    }
}

/// One recorded DMA remapping fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Register base of the unit that recorded it.
    pub unit: u64,
    /// Requester (source id).
    pub source: Bdf,
    /// Page address of the faulted request (fault info, bits 63:12).
    pub addr: u64,
    /// Fault reason code.
    pub reason: u8,
    /// What the request was.
    pub access: Access,
}

impl Fault {
    /// What the reason code means (non-recoverable fault reason encodings).
    pub fn reason_str(&self) -> &'static str {
        match self.reason {
            0x1 => "root entry not present",
            0x2 => "context entry not present",
            0x3 => "invalid context entry",
            0x4 => "address beyond the guest address width",
            0x5 => "write not permitted (or not mapped)",
            0x6 => "read not permitted (or not mapped)",
            0x7 => "page-table entry address invalid",
            0x8 => "root table address invalid",
            0x9 => "context table pointer invalid",
            0xa => "reserved bits in root entry",
            0xb => "reserved bits in context entry",
            0xc => "reserved bits in page-table entry",
            0xd => "translation type blocked by the context entry",
            0x20..=0x26 => "interrupt remapping fault",
            _ => "other",
        }
    }
}

impl fmt::Display for Fault {
    /// `DMA fault from 00:01.0 at 0x40001000 (reason 0x6, read): <meaning>`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DMA fault from {} at {:#x} (reason {:#x}, {}): {}",
            self.source,
            self.addr,
            self.reason,
            self.access.as_str(),
            self.reason_str()
        )
    }
}

/// Counters since boot.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Fault records read.
    pub faults: u64,
    /// Times the hardware reported it dropped faults (PFO).
    pub overflows: u64,
    /// IOTLB invalidations issued.
    pub iotlb_invalidations: u64,
    /// Context-cache invalidations issued.
    pub context_invalidations: u64,
}

/// One remapping hardware unit.
struct Unit {
    regs: Regs,
    ver: u32,
    cap: Cap,
    ecap: Ecap,
    segment: u16,
    include_all: bool,
    scopes: Vec<DeviceScope>,
    /// Root table (256 root entries of 16 bytes).
    root: u64,
    /// Per bus: context table and how many of its entries are present.
    ctx: Vec<(u64, u16)>,
}

struct DomainState {
    id: u16,
    table: Table,
    /// (unit index, device).
    devices: Vec<(usize, Bdf)>,
    /// A holding domain for an RMRR device the hypervisor has not attached.
    reserved: bool,
}

struct Rmrr {
    base: u64,
    end: u64,
    devices: Vec<Bdf>,
}

struct Iommu {
    units: Vec<Unit>,
    levels: u32,
    agaw: u32,
    /// IOVAs must be below this.
    iova_limit: u64,
    /// HPAs (and table frames) must be below this.
    hpa_limit: u64,
    large_pages: bool,
    flush: bool,
    max_did: u32,
    domains: Vec<DomainState>,
    rmrrs: Vec<Rmrr>,
    translating: bool,
    stats: Stats,
}

static IOMMU: Mutex<Option<Iommu>> = Mutex::new(None);

/// How long to wait for a register command (10.4.4-10.4.8 complete in microseconds).
const TIMEOUT_US: u64 = 200_000;

fn wait(what: &'static str, mut done: impl FnMut() -> bool) -> Result<(), Error> {
    let start = apic::now_us();
    let mut spins = 0u64;
    while !done() {
        spins += 1;
        let now = apic::now_us();
        // Before calibration now_us() is 0: bound by iterations too.
        if (now != 0 && now.saturating_sub(start) > TIMEOUT_US) || spins > 50_000_000 {
            error!("iommu: {what} did not complete");
            return Err(Error::Timeout(what));
        }
        core::hint::spin_loop();
    }
    Ok(())
}

fn sid(b: Bdf) -> u16 {
    (u16::from(b.bus) << 8) | (u16::from(b.dev & 31) << 3) | u16::from(b.func & 7)
}

fn bdf_of(sid: u16) -> Bdf {
    Bdf {
        bus: (sid >> 8) as u8,
        dev: ((sid >> 3) & 31) as u8,
        func: (sid & 7) as u8,
    }
}

fn devfn(b: Bdf) -> u64 {
    u64::from(b.dev & 31) << 3 | u64::from(b.func & 7)
}

impl Unit {
    /// Sets or clears one GCMD bit and waits for its status (10.4.4).
    fn gcmd(&self, bit: u32, on: bool) -> Result<(), Error> {
        let sts = self.regs.r32(regs::GSTS) & regs::G_PERSISTENT;
        let cmd = if on { sts | bit } else { sts & !bit };
        self.regs.w32(regs::GCMD, cmd);
        wait("GCMD", || (self.regs.r32(regs::GSTS) & bit != 0) == on)
    }

    /// Write-buffer flush where the hardware requires it (6.8).
    fn flush_write_buffer(&self) -> Result<(), Error> {
        if !self.cap.rwbf() {
            return Ok(());
        }
        let sts = self.regs.r32(regs::GSTS) & regs::G_PERSISTENT;
        self.regs.w32(regs::GCMD, sts | regs::G_WBF);
        wait("write buffer flush", || {
            self.regs.r32(regs::GSTS) & regs::G_WBF == 0
        })
    }

    /// Context-cache invalidation through CCMD (6.5.1.1, 10.4.7).
    fn invalidate_context(&self, granularity: u64, did: u16, source: u16) -> Result<(), Error> {
        let v = regs::CCMD_ICC | granularity | (u64::from(source) << 16) | u64::from(did);
        self.regs.w64(regs::CCMD, v);
        wait("context-cache invalidation", || {
            self.regs.r64(regs::CCMD) & regs::CCMD_ICC == 0
        })?;
        if (self.regs.r64(regs::CCMD) >> 59) & 3 == 0 {
            warn!("iommu: context-cache invalidation {v:#x} refused (CAIG 0)");
        }
        Ok(())
    }

    /// IOTLB invalidation through the registers at ECAP.IRO (6.5.1.2, 10.4.8).
    /// `page`: (address, mask) for page-selective invalidation of 2^mask pages.
    fn invalidate_iotlb(
        &self,
        granularity: u64,
        did: u16,
        page: Option<(u64, u32)>,
    ) -> Result<(), Error> {
        let iro = self.ecap.iro();
        if let Some((addr, am)) = page {
            self.regs.w64(iro, addr | u64::from(am));
        }
        let mut v = regs::IOTLB_IVT | granularity | (u64::from(did) << 32);
        if self.cap.drd() {
            v |= regs::IOTLB_DR;
        }
        if self.cap.dwd() {
            v |= regs::IOTLB_DW;
        }
        self.regs.w64(iro + 8, v);
        wait("IOTLB invalidation", || {
            self.regs.r64(iro + 8) & regs::IOTLB_IVT == 0
        })?;
        if (self.regs.r64(iro + 8) >> 57) & 3 == 0 {
            // Not performed at the requested (or any) granularity: fall back to global.
            if granularity != regs::IOTLB_GLOBAL {
                return self.invalidate_iotlb(regs::IOTLB_GLOBAL, 0, None);
            }
            warn!("iommu: global IOTLB invalidation refused (IAIG 0)");
        }
        Ok(())
    }

    /// Invalidates the IOTLB entries of `did` for `[iova, iova+len)`: one
    /// page-selective invalidation of the smallest aligned power-of-two block that
    /// covers the range when supported and small enough, else domain-selective.
    fn invalidate_range(&self, did: u16, iova: u64, len: u64) -> Result<(), Error> {
        if self.cap.psi() && len > 0 {
            let first = iova >> 12;
            let last = (iova + len - 1) >> 12;
            let mut am = 0u32;
            while am < 64 && (first >> am) != (last >> am) {
                am += 1;
            }
            if am <= self.cap.mamv() {
                let addr = (first >> am) << (am + 12);
                return self.invalidate_iotlb(regs::IOTLB_PAGE, did, Some((addr, am)));
            }
        }
        self.invalidate_iotlb(regs::IOTLB_DOMAIN, did, None)
    }

    /// Whether this unit translates for `b` (its own scopes; INCLUDE_PCI_ALL is
    /// decided by the caller after every explicit unit).
    fn covers(&self, b: Bdf) -> bool {
        self.scopes.iter().any(|s| {
            let at = Bdf {
                bus: s.bus,
                dev: s.dev,
                func: s.func,
            };
            match s.kind {
                1 => at == b,
                2 => {
                    if at == b {
                        return true;
                    }
                    // A bridge: everything behind it (secondary..=subordinate bus).
                    let r = pci::read32(at, 0x18);
                    let (sec, sub) = ((r >> 8) as u8, (r >> 16) as u8);
                    sec != 0 && (sec..=sub).contains(&b.bus)
                }
                _ => false,
            }
        })
    }

    /// Reads, clears and returns this unit's fault records (7.3.1, 10.4.9, 10.4.14),
    /// starting at FSTS.FRI like the hardware fills them.
    fn faults(&self, out: &mut Vec<Fault>, stats: &mut Stats) {
        let fro = self.cap.fro();
        let nfr = self.cap.nfr();
        for _pass in 0..4 {
            let fsts = self.regs.r32(regs::FSTS);
            if fsts & (regs::FSTS_PPF | regs::FSTS_PFO) == 0 {
                return;
            }
            let mut i = (fsts >> 8) & 0xff;
            if i >= nfr {
                i = 0;
            }
            for _ in 0..nfr {
                let rec = fro + u64::from(i) * 16;
                let hi = self.regs.r32(rec + 12);
                if hi & regs::FRCD_F == 0 {
                    break;
                }
                let reason = (hi & 0xff) as u8;
                let t1 = hi & (1 << 30) != 0;
                let mid = self.regs.r32(rec + 8);
                let t2 = mid & (1 << 28) != 0;
                let lo = self.regs.r64(rec);
                out.push(Fault {
                    unit: self.regs.base(),
                    source: bdf_of(mid as u16),
                    addr: lo & !0xfff,
                    reason,
                    access: match (t2, t1) {
                        (false, false) => Access::Write,
                        (false, true) => Access::Read,
                        (true, false) => Access::PageRequest,
                        (true, true) => Access::Atomic,
                    },
                });
                stats.faults += 1;
                // F is RW1C; the rest of the dword is read-only.
                self.regs.w32(rec + 12, regs::FRCD_F);
                i = (i + 1) % nfr;
            }
            if fsts & regs::FSTS_PFO != 0 {
                stats.overflows += 1;
                warn!(
                    "iommu: unit {:#x}: fault records overflowed, some faults were not recorded",
                    self.regs.base()
                );
            }
            self.regs.w32(regs::FSTS, regs::FSTS_PFO);
        }
    }

    /// The context table for `bus`, created (and linked in the root table) if needed.
    fn context_table(&mut self, bus: u8, below: u64, flush: bool) -> Result<u64, Error> {
        let slot = &mut self.ctx[bus as usize];
        if slot.0 == 0 {
            let pa = frames::alloc_contiguous(1, PAGE_SIZE, below).ok_or(Error::NoMemory)?;
            if flush {
                for line in (0..PAGE_SIZE).step_by(64) {
                    flush_line(pa + line, true);
                }
            }
            slot.0 = pa;
            let re = self.root + u64::from(bus) * 16;
            // SAFETY: the root table is our identity-mapped frame; entry `bus` < 256.
            // Root entry (9.1): P bit 0, context table pointer 63:12; upper half 0.
            unsafe {
                core::ptr::write_volatile(phys_to_ptr::<u64>(re + 8), 0);
                core::ptr::write_volatile(phys_to_ptr::<u64>(re), pa | 1);
            }
            flush_line(re, flush);
        }
        Ok(slot.0)
    }
}

/// Finds the unit for `b`: an explicit scope first, then an INCLUDE_PCI_ALL unit of
/// segment 0 (8.3: a device belongs to exactly one unit).
fn unit_for(s: &Iommu, b: Bdf) -> Option<usize> {
    s.units
        .iter()
        .position(|u| !u.include_all && u.segment == 0 && u.covers(b))
        .or_else(|| s.units.iter().position(|u| u.include_all && u.segment == 0))
}

/// Chooses the second-level depth all units support (levels, AGAW bits).
fn choose_depth(units: &[(Cap, Ecap)]) -> Option<(u32, u32)> {
    let want = units.iter().map(|(c, _)| c.mgaw()).min()?.min(48);
    let all = |bit: u32| units.iter().all(|(c, _)| c.sagaw() & (1 << bit) != 0);
    // SAGAW bit 1: 39-bit/3-level, bit 2: 48-bit/4-level.
    let options = [(3u32, 39u32, 1u32), (4, 48, 2)];
    options
        .iter()
        .find(|&&(_, bits, b)| bits >= want && all(b))
        .or_else(|| options.iter().rev().find(|&&(_, _, b)| all(b)))
        .map(|&(l, bits, _)| (l, bits))
}

/// Brings up every DMAR unit: root table, invalidations, fault event interrupt to this
/// CPU, RMRR holding domains, then translation on (unless `enable` is false: tables
/// ready, translation left off). Prints one summary line per unit. Returns whether
/// translation is on.
pub fn init(platform: Option<&Platform>, enable: bool) -> bool {
    let Some(dmar) = platform.and_then(|p| p.dmar.as_ref()) else {
        return false;
    };
    let haw = u32::from(dmar.host_address_width).clamp(32, 52);
    let hpa_limit = 1u64 << haw;
    let mut units = Vec::new();
    for d in &dmar.units {
        if d.base == 0 || !d.base.is_multiple_of(PAGE_SIZE) || d.segment != 0 {
            warn!(
                "iommu: DRHD at {:#x} segment {} ignored (unaligned, zero or not segment 0)",
                d.base, d.segment
            );
            continue;
        }
        paging::map_mmio(d.base, PAGE_SIZE);
        let r = Regs::new(d.base);
        let ver = r.r32(regs::VER);
        let cap = Cap(r.r64(regs::CAP));
        let ecap = Ecap(r.r64(regs::ECAP));
        if ver == u32::MAX || cap.0 == u64::MAX || cap.0 == 0 {
            warn!("iommu: DRHD at {:#x} does not respond; ignored", d.base);
            continue;
        }
        // The register set may extend past the first page (FRO/IRO).
        let top = (cap.fro() + 16 * u64::from(cap.nfr())).max(ecap.iro() + 16);
        paging::map_mmio(d.base, top);
        units.push(Unit {
            regs: r,
            ver,
            cap,
            ecap,
            segment: d.segment,
            include_all: d.include_all,
            scopes: d.scopes.clone(),
            root: 0,
            ctx: alloc::vec![(0, 0); 256],
        });
    }
    let caps: Vec<(Cap, Ecap)> = units.iter().map(|u| (u.cap, u.ecap)).collect();
    let Some((levels, agaw)) = choose_depth(&caps) else {
        error!(
            "iommu: the units share no 3- or 4-level second-level table depth: DMA not isolated"
        );
        return false;
    };
    let mgaw = units.iter().map(|u| u.cap.mgaw()).min().unwrap_or(agaw);
    let mut s = Iommu {
        levels,
        agaw,
        iova_limit: 1u64 << agaw.min(mgaw),
        hpa_limit,
        large_pages: units.iter().all(|u| u.cap.sllps() & 1 != 0),
        flush: units.iter().any(|u| !u.ecap.coherent()),
        max_did: units
            .iter()
            .map(|u| u.cap.domains())
            .min()
            .unwrap_or(16)
            .min(1 << 16)
            - 1,
        units,
        domains: Vec::new(),
        rmrrs: dmar
            .rmrrs
            .iter()
            .filter(|r| r.limit >= r.base)
            .map(|r| Rmrr {
                base: r.base & !(PAGE_SIZE - 1),
                end: (r.limit.saturating_add(1)).div_ceil(PAGE_SIZE) * PAGE_SIZE,
                devices: r
                    .scopes
                    .iter()
                    .filter(|d| d.kind == 1)
                    .map(|d| Bdf {
                        bus: d.bus,
                        dev: d.dev,
                        func: d.func,
                    })
                    .collect(),
            })
            .collect(),
        translating: false,
        stats: Stats::default(),
    };
    let apic_id = apic::id();
    if apic_id > 0xff {
        warn!(
            "iommu: fault interrupts go to APIC id {apic_id}, beyond xAPIC destinations: using 0"
        );
    }
    let dest = if apic_id > 0xff { 0 } else { apic_id };
    let mut ok = true;
    for i in 0..s.units.len() {
        if let Err(e) = bring_up(&mut s, i, dest) {
            error!(
                "iommu: unit {:#x}: bring-up failed: {e:?}",
                s.units[i].regs.base()
            );
            ok = false;
        }
    }
    // Holding domains for RMRR devices (8.4), before translation starts.
    let held: Vec<Bdf> = s
        .rmrrs
        .iter()
        .flat_map(|r| r.devices.iter().copied())
        .collect();
    for b in held {
        if s.domains
            .iter()
            .any(|d| d.devices.iter().any(|&(_, x)| x == b))
        {
            continue;
        }
        match attach_locked(&mut s, b, true) {
            Ok(d) => info!("iommu: {b}: RMRR holding {d} (identity-mapped reserved regions only)"),
            Err(e) => warn!("iommu: {b}: RMRR holding domain failed: {e:?}"),
        }
    }
    if ok && enable {
        for u in &s.units {
            if let Err(e) = enable_translation(u) {
                error!(
                    "iommu: unit {:#x}: enabling translation failed: {e:?}",
                    u.regs.base()
                );
                ok = false;
            }
        }
        s.translating = ok;
    }
    for u in &s.units {
        println!(
            "iommu: VT-d {}.{} at {:#x}, {}-bit ({}-level) second-level tables, {} fault records, translation {}",
            (u.ver >> 4) & 0xf,
            u.ver & 0xf,
            u.regs.base(),
            s.agaw,
            s.levels,
            u.cap.nfr(),
            if u.regs.r32(regs::GSTS) & regs::G_TE != 0 {
                "on"
            } else if enable {
                "OFF (bring-up failed)"
            } else {
                "off (iommu=off)"
            }
        );
    }
    let on = s.translating;
    *IOMMU.lock() = Some(s);
    on
}

/// Root table, global invalidations and the fault event interrupt of unit `i`.
fn bring_up(s: &mut Iommu, i: usize, dest: u32) -> Result<(), Error> {
    let (hpa_limit, flush) = (s.hpa_limit, s.flush);
    let u = &mut s.units[i];
    let gsts = u.regs.r32(regs::GSTS);
    info!(
        "iommu: unit {:#x}: ver {:#x} cap {:#x} ecap {:#x} gsts {:#x}: {} domain ids, SAGAW {:#x}, MGAW {}, PSI {} (MAMV {}), 2M pages {}, caching mode {}, RWBF {}, coherent walks {}, QI {}, {} fault records at +{:#x}, IOTLB regs at +{:#x}",
        u.regs.base(),
        u.ver,
        u.cap.0,
        u.ecap.0,
        gsts,
        u.cap.domains(),
        u.cap.sagaw(),
        u.cap.mgaw(),
        u.cap.psi(),
        u.cap.mamv(),
        u.cap.sllps() & 1 != 0,
        u.cap.caching_mode(),
        u.cap.rwbf(),
        u.ecap.coherent(),
        u.ecap.qi(),
        u.cap.nfr(),
        u.cap.fro(),
        u.ecap.iro()
    );
    if gsts & regs::G_TE != 0 {
        warn!(
            "iommu: unit {:#x}: translation already on at hand-off: replacing its tables in place",
            u.regs.base()
        );
    }
    if gsts & regs::G_IRE != 0 {
        warn!(
            "iommu: unit {:#x}: interrupt remapping left on by firmware",
            u.regs.base()
        );
    }
    // Register-based invalidation only works with queued invalidation off (6.5.2).
    if gsts & regs::G_QIE != 0 {
        let _ = wait("invalidation queue drain", || {
            u.regs.r64(regs::IQH) == u.regs.r64(regs::IQT)
        });
        u.gcmd(regs::G_QIE, false)?;
    }
    // Root table (3.4.2, 9.1), legacy mode (RTADDR.TTM = 00), set through SRTP (6.6).
    u.root = frames::alloc_contiguous(1, PAGE_SIZE, hpa_limit).ok_or(Error::NoMemory)?;
    if flush {
        for line in (0..PAGE_SIZE).step_by(64) {
            flush_line(u.root + line, true);
        }
    }
    u.regs.w64(regs::RTADDR, u.root);
    let sts = u.regs.r32(regs::GSTS) & regs::G_PERSISTENT;
    u.regs.w32(regs::GCMD, sts | regs::G_SRTP);
    wait("set root table pointer", || {
        u.regs.r32(regs::GSTS) & regs::G_SRTP != 0
    })?;
    // Without ESRTPS the hardware keeps stale entries across SRTP: flush globally.
    u.flush_write_buffer()?;
    u.invalidate_context(regs::CCMD_GLOBAL, 0, 0)?;
    u.invalidate_iotlb(regs::IOTLB_GLOBAL, 0, None)?;
    // Faults left from before: report and clear them.
    let mut stale = Vec::new();
    u.faults(&mut stale, &mut s.stats);
    for f in &stale {
        warn!("iommu: (from before hand-off) {f}");
    }
    // Fault event interrupt (7.4, 10.4.10-13): fixed, edge, physical destination.
    u.regs.w32(regs::FEDATA, u32::from(IOMMU_FAULT_VECTOR));
    u.regs.w32(regs::FEADDR, 0xfee0_0000 | (dest << 12));
    u.regs.w32(regs::FEUADDR, 0);
    u.regs.w32(regs::FECTL, 0);
    Ok(())
}

/// GCMD.TE, then protected memory regions off (10.4.16: the PMRs only matter while
/// translation is off, and they would block DMA the page tables allow).
fn enable_translation(u: &Unit) -> Result<(), Error> {
    u.flush_write_buffer()?;
    u.gcmd(regs::G_TE, true)?;
    if u.cap.pmr() && u.regs.r32(regs::PMEN) & 1 != 0 {
        u.regs.w32(regs::PMEN, 0);
        wait("protected memory disable", || {
            u.regs.r32(regs::PMEN) & 1 == 0
        })?;
        info!(
            "iommu: unit {:#x}: protected memory regions disabled",
            u.regs.base()
        );
    }
    Ok(())
}

fn attach_locked(s: &mut Iommu, b: Bdf, reserved: bool) -> Result<DomainId, Error> {
    let ui = unit_for(s, b).ok_or(Error::NotCovered(b))?;
    if let Some(d) = s
        .domains
        .iter()
        .find(|d| d.devices.iter().any(|&(_, x)| x == b))
    {
        if d.reserved && !reserved {
            detach_locked(s, b)?;
        } else {
            return Err(Error::AlreadyAttached(b, DomainId(d.id)));
        }
    }
    let id = (1..=s.max_did)
        .map(|i| i as u16)
        .find(|&i| !s.domains.iter().any(|d| d.id == i))
        .ok_or(Error::NoDomainId)?;
    let mut table = Table::new(s.levels, s.hpa_limit, s.flush)?;
    for r in s.rmrrs.iter().filter(|r| r.devices.contains(&b)) {
        if r.end > s.iova_limit || r.end > s.hpa_limit {
            warn!(
                "iommu: {b}: RMRR {:#x}..{:#x} beyond the address width; not mapped",
                r.base, r.end
            );
            continue;
        }
        if let Err(e) = table.map(r.base, r.base, r.end - r.base, true, s.large_pages) {
            warn!(
                "iommu: {b}: RMRR {:#x}..{:#x} not mapped: {e:?}",
                r.base, r.end
            );
        } else {
            info!(
                "iommu: {b}: RMRR {:#x}..{:#x} identity mapped",
                r.base, r.end
            );
        }
    }
    let (flush, levels) = (s.flush, s.levels);
    let u = &mut s.units[ui];
    let ct = match u.context_table(b.bus, s.hpa_limit, flush) {
        Ok(ct) => ct,
        Err(e) => {
            table.destroy();
            return Err(e);
        }
    };
    // Context entry (9.3): lo = SLPTPTR | TT 00 (untranslated requests, second level)
    // | P; hi = AW (1: 39-bit/3-level, 2: 48-bit/4-level) | DID << 8. Upper half first,
    // P last.
    let ce = ct + devfn(b) * 16;
    let aw = u64::from(levels - 2);
    // SAFETY: `ct` is this unit's identity-mapped context table frame; devfn < 256.
    unsafe {
        core::ptr::write_volatile(phys_to_ptr::<u64>(ce + 8), aw | (u64::from(id) << 8));
        core::ptr::write_volatile(phys_to_ptr::<u64>(ce), table.root | 1);
    }
    flush_line(ce, flush);
    u.ctx[b.bus as usize].1 += 1;
    // Not-present -> present: only caching-mode hardware may have cached the entry
    // (with domain id 0, 6.1); invalidating always is cheap and covers both.
    let cm = u.cap.caching_mode();
    let r = u
        .flush_write_buffer()
        .and_then(|()| u.invalidate_context(regs::CCMD_DEVICE, if cm { 0 } else { id }, sid(b)))
        .and_then(|()| u.invalidate_iotlb(regs::IOTLB_DOMAIN, id, None));
    s.stats.context_invalidations += 1;
    s.stats.iotlb_invalidations += 1;
    s.domains.push(DomainState {
        id,
        table,
        devices: alloc::vec![(ui, b)],
        reserved,
    });
    r.map(|()| DomainId(id))
}

fn detach_locked(s: &mut Iommu, b: Bdf) -> Result<(), Error> {
    let di = s
        .domains
        .iter()
        .position(|d| d.devices.iter().any(|&(_, x)| x == b))
        .ok_or(Error::NotAttached(b))?;
    let flush = s.flush;
    let d = &mut s.domains[di];
    let pos = d.devices.iter().position(|&(_, x)| x == b).unwrap_or(0);
    let (ui, _) = d.devices.remove(pos);
    let id = d.id;
    let u = &mut s.units[ui];
    let (ct, count) = u.ctx[b.bus as usize];
    let mut r = Ok(());
    if ct != 0 {
        let ce = ct + devfn(b) * 16;
        // SAFETY: as in `attach_locked`: P cleared first, then the upper half.
        unsafe {
            core::ptr::write_volatile(phys_to_ptr::<u64>(ce), 0);
            core::ptr::write_volatile(phys_to_ptr::<u64>(ce + 8), 0);
        }
        flush_line(ce, flush);
        // Present -> not present: context cache (device), then the domain's IOTLB
        // entries (6.5.3: guidance to software for invalidations).
        r = u
            .flush_write_buffer()
            .and_then(|()| u.invalidate_context(regs::CCMD_DEVICE, id, sid(b)))
            .and_then(|()| u.invalidate_iotlb(regs::IOTLB_DOMAIN, id, None));
        s.stats.context_invalidations += 1;
        s.stats.iotlb_invalidations += 1;
        let count = count.saturating_sub(1);
        u.ctx[b.bus as usize].1 = count;
        if count == 0 && r.is_ok() {
            // Last device on this bus: unlink and free the context table.
            let re = u.root + u64::from(b.bus) * 16;
            // SAFETY: root entry `bus` of our identity-mapped root table.
            unsafe { core::ptr::write_volatile(phys_to_ptr::<u64>(re), 0) };
            flush_line(re, flush);
            r = u
                .flush_write_buffer()
                .and_then(|()| u.invalidate_context(regs::CCMD_GLOBAL, 0, 0));
            s.stats.context_invalidations += 1;
            if r.is_ok() {
                frames::free(ct, 1);
                u.ctx[b.bus as usize].0 = 0;
            } else {
                // SAFETY: as above: relink rather than free a table the hardware may
                // still cache.
                unsafe { core::ptr::write_volatile(phys_to_ptr::<u64>(re), ct | 1) };
            }
        }
    }
    if s.domains[di].devices.is_empty() {
        if r.is_ok() {
            let mut d = s.domains.remove(di);
            d.table.destroy();
        } else {
            // The hardware may still walk these tables: leak them rather than reuse.
            error!("iommu: {b}: invalidation failed; domain {id} tables kept");
            let d = s.domains.remove(di);
            core::mem::forget(d);
        }
    }
    r
}

/// Gives device `b` a fresh domain with its RMRRs identity mapped and nothing else,
/// and points its context entry at it. Until [`map`] adds pages, every DMA the
/// device makes faults.
pub fn attach(b: Bdf) -> Result<DomainId, Error> {
    let mut g = IOMMU.lock();
    let s = g.as_mut().ok_or(Error::NoIommu)?;
    let d = attach_locked(s, b, false)?;
    info!("iommu: {b} attached to {d}");
    Ok(d)
}

/// Removes device `b`'s context entry (its DMA faults from now on) and destroys its
/// domain when no other device uses it (its page-table frames are freed).
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn detach(b: Bdf) -> Result<(), Error> {
    let mut g = IOMMU.lock();
    let s = g.as_mut().ok_or(Error::NoIommu)?;
    detach_locked(s, b)?;
    info!("iommu: {b} detached");
    Ok(())
}

fn check_range(s: &Iommu, iova: u64, len: u64) -> Result<(), Error> {
    let end = iova.checked_add(len).ok_or(Error::BadRange)?;
    if len == 0
        || !iova.is_multiple_of(PAGE_SIZE)
        || !len.is_multiple_of(PAGE_SIZE)
        || end > s.iova_limit
    {
        return Err(Error::BadRange);
    }
    Ok(())
}

/// Maps `[iova, iova+len)` of `domain` to host `[hpa, hpa+len)`, readable, and
/// writable if `write`. All three 4 KiB aligned; the IOVA range must be unmapped.
/// Uses 2 MiB pages where both addresses are 2 MiB aligned and the hardware has them.
pub fn map(domain: DomainId, iova: u64, hpa: u64, len: u64, write: bool) -> Result<(), Error> {
    let mut g = IOMMU.lock();
    let s = g.as_mut().ok_or(Error::NoIommu)?;
    check_range(s, iova, len)?;
    let hend = hpa.checked_add(len).ok_or(Error::BadRange)?;
    if !hpa.is_multiple_of(PAGE_SIZE) || hend > s.hpa_limit {
        return Err(Error::BadRange);
    }
    let large = s.large_pages;
    let d = s
        .domains
        .iter_mut()
        .find(|d| d.id == domain.0)
        .ok_or(Error::NoDomain(domain))?;
    d.table.map(iova, hpa, len, write, large)?;
    // Not-present -> present needs no invalidation unless caching mode (6.1); write
    // buffers still need flushing (6.8).
    let mut r = Ok(());
    for &(ui, _) in &d.devices {
        let u = &s.units[ui];
        r = r.and(u.flush_write_buffer());
        if u.cap.caching_mode() {
            r = r.and(u.invalidate_range(d.id, iova, len));
            s.stats.iotlb_invalidations += 1;
        }
    }
    r
}

/// Unmaps `[iova, iova+len)` of `domain` (unmapped pages inside are skipped) and
/// invalidates the IOTLB of every unit the domain is attached through: when this
/// returns, the device can no longer reach the pages.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn unmap(domain: DomainId, iova: u64, len: u64) -> Result<(), Error> {
    let mut g = IOMMU.lock();
    let s = g.as_mut().ok_or(Error::NoIommu)?;
    check_range(s, iova, len)?;
    let d = s
        .domains
        .iter_mut()
        .find(|d| d.id == domain.0)
        .ok_or(Error::NoDomain(domain))?;
    let changed = d.table.unmap(iova, len)?;
    let mut r = Ok(());
    if changed {
        for &(ui, _) in &d.devices {
            let u = &s.units[ui];
            r = r
                .and(u.flush_write_buffer())
                .and(u.invalidate_range(d.id, iova, len));
            s.stats.iotlb_invalidations += 1;
        }
    }
    r
}

/// Applies many changes to `domain` at once, unmaps first: identity mappings
/// `maps` (`(host-physical address, len)`, each at the IOVA equal to its address,
/// readable and writable) and removals `unmaps`. One write-buffer flush and at
/// most one IOTLB invalidation per unit (covering the
/// span of what changed) however many ranges there are: a guest command that
/// scatters its backing over thousands of pages costs one invalidation wait, not
/// thousands. When this returns, unmapped pages are unreachable.
pub fn update(domain: DomainId, maps: &[(Hpa, u64)], unmaps: &[(Hpa, u64)]) -> Result<(), Error> {
    if maps.is_empty() && unmaps.is_empty() {
        return Ok(());
    }
    let mut g = IOMMU.lock();
    let s = g.as_mut().ok_or(Error::NoIommu)?;
    for &(a, len) in maps.iter().chain(unmaps) {
        let a = a.get();
        check_range(s, a, len)?;
        if a.saturating_add(len) > s.hpa_limit {
            return Err(Error::BadRange);
        }
    }
    let large = s.large_pages;
    let d = s
        .domains
        .iter_mut()
        .find(|d| d.id == domain.0)
        .ok_or(Error::NoDomain(domain))?;
    let mut span: Option<(u64, u64)> = None;
    let mut widen = |a: u64, len: u64| {
        let (lo, hi) = span.unwrap_or((a, a + len));
        span = Some((lo.min(a), hi.max(a + len)));
    };
    let mut result = Ok(());
    for &(a, len) in unmaps {
        let a = a.get();
        match d.table.unmap(a, len) {
            Ok(true) => widen(a, len),
            Ok(false) => {}
            Err(e) => result = Err(e.into()),
        }
    }
    let mut mapped = false;
    for &(a, len) in maps {
        let a = a.get();
        match d.table.map(a, a, len, true, large) {
            Ok(()) => mapped = true,
            Err(e) => result = Err(e.into()),
        }
    }
    for &(ui, _) in &d.devices {
        let u = &s.units[ui];
        result = result.and(u.flush_write_buffer());
        // Not-present -> present needs no invalidation unless caching mode (6.1).
        let maps_need_it = mapped && u.cap.caching_mode();
        let range = match (span, maps_need_it) {
            (Some(r), _) => Some(r),
            (None, true) => Some((0, s.iova_limit)),
            (None, false) => None,
        };
        if let Some((lo, hi)) = range {
            let (lo, hi) = if maps_need_it {
                (0, s.iova_limit)
            } else {
                (lo, hi)
            };
            result = result.and(u.invalidate_range(d.id, lo, hi - lo));
            s.stats.iotlb_invalidations += 1;
        }
    }
    result
}

/// What `iova` translates to in `domain` (host address), if mapped.
pub fn translate(domain: DomainId, iova: u64) -> Option<u64> {
    let g = IOMMU.lock();
    let s = g.as_ref()?;
    if iova >= s.iova_limit {
        return None;
    }
    let d = s.domains.iter().find(|d| d.id == domain.0)?;
    d.table.translate(iova).map(|(hpa, _)| hpa)
}

/// Like [`translate`], with whether the mapping is writable.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn translate_perm(domain: DomainId, iova: u64) -> Option<(u64, bool)> {
    let g = IOMMU.lock();
    let s = g.as_ref()?;
    if iova >= s.iova_limit {
        return None;
    }
    let d = s.domains.iter().find(|d| d.id == domain.0)?;
    d.table.translate(iova)
}

/// Page-table frames `domain` uses now.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn table_frames(domain: DomainId) -> Option<usize> {
    let g = IOMMU.lock();
    let s = g.as_ref()?;
    s.domains
        .iter()
        .find(|d| d.id == domain.0)
        .map(|d| d.table.frames)
}

/// Bottom half: reads and clears the fault records of every unit and returns them,
/// oldest first per unit. Cheap when none is pending (one FSTS read per unit).
pub fn poll_faults() -> Vec<Fault> {
    let mut out = Vec::new();
    let mut g = IOMMU.lock();
    if let Some(s) = g.as_mut() {
        let Iommu { units, stats, .. } = s;
        for u in units.iter() {
            u.faults(&mut out, stats);
        }
    }
    out
}

/// The monitor loop's bottom half: when the fault event interrupt fired, polls the
/// fault records and logs each one. Returns them.
pub fn service() -> Vec<Fault> {
    if crate::interrupts::take_pending(IOMMU_FAULT_VECTOR) == 0 {
        return Vec::new();
    }
    let faults = poll_faults();
    for f in &faults {
        warn!("iommu: {f}");
    }
    faults
}

/// Whether DMA translation is on.
pub fn translating() -> bool {
    IOMMU.lock().as_ref().is_some_and(|s| s.translating)
}

/// Counters since boot.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn stats() -> Stats {
    IOMMU.lock().as_ref().map(|s| s.stats).unwrap_or_default()
}

/// (levels, AGAW bits, IOVA limit, 2 MiB pages) of the domains' tables.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn geometry() -> Option<(u32, u32, u64, bool)> {
    IOMMU
        .lock()
        .as_ref()
        .map(|s| (s.levels, s.agaw, s.iova_limit, s.large_pages))
}
