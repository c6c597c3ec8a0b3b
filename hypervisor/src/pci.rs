//! PCI enumeration: vendor/device/class, BARs with their sizes, MSI-X and virtio
//! vendor capabilities. Configuration space through ECAM when MCFG gives one, else
//! through ports 0xCF8/0xCFC (Bochs's i440FX has no ECAM).

use alloc::vec::Vec;
use core::fmt;

use log::info;
use virtio_pci::pci as pci_id;
use x86_64::instructions::port::Port;

use crate::acpi::Platform;
use crate::mm::{paging, phys_to_ptr};

/// Bus/device/function and the virtio vendor capability: the `virtio-pci` crate's.
pub use virtio_pci::{Bdf, VirtioCap};

/// How configuration space is reached.
#[derive(Clone, Copy, Debug)]
pub enum ConfigAccess {
    /// Memory-mapped (PCIe ECAM) at this base for bus 0.
    Ecam(u64),
    /// Legacy mechanism #1 through ports 0xCF8/0xCFC.
    Ports,
}

static ACCESS: spin::Mutex<ConfigAccess> = spin::Mutex::new(ConfigAccess::Ports);

/// Reads a 32-bit configuration register.
pub fn read32(b: Bdf, off: u16) -> u32 {
    let off = off & 0xffc;
    match *ACCESS.lock() {
        ConfigAccess::Ecam(base) => {
            let pa = base
                + (u64::from(b.bus) << 20)
                + (u64::from(b.dev) << 15)
                + (u64::from(b.func) << 12)
                + u64::from(off);
            // SAFETY: ECAM is MMIO the identity map covers; aligned 32-bit access.
            unsafe { core::ptr::read_volatile(phys_to_ptr::<u32>(pa)) }
        }
        ConfigAccess::Ports => {
            let addr = 0x8000_0000
                | (u32::from(b.bus) << 16)
                | (u32::from(b.dev) << 11)
                | (u32::from(b.func) << 8)
                | u32::from(off & 0xfc);
            // SAFETY: mechanism #1; the lock serialises the address/data pair.
            unsafe {
                Port::<u32>::new(0xcf8).write(addr);
                Port::<u32>::new(0xcfc).read()
            }
        }
    }
}

/// Writes a 32-bit configuration register.
pub fn write32(b: Bdf, off: u16, v: u32) {
    let off = off & 0xffc;
    match *ACCESS.lock() {
        ConfigAccess::Ecam(base) => {
            let pa = base
                + (u64::from(b.bus) << 20)
                + (u64::from(b.dev) << 15)
                + (u64::from(b.func) << 12)
                + u64::from(off);
            // SAFETY: as in `read32`.
            unsafe { core::ptr::write_volatile(phys_to_ptr::<u32>(pa), v) }
        }
        ConfigAccess::Ports => {
            let addr = 0x8000_0000
                | (u32::from(b.bus) << 16)
                | (u32::from(b.dev) << 11)
                | (u32::from(b.func) << 8)
                | u32::from(off & 0xfc);
            // SAFETY: as in `read32`.
            unsafe {
                Port::<u32>::new(0xcf8).write(addr);
                Port::<u32>::new(0xcfc).write(v);
            }
        }
    }
}

/// A base address register.
#[derive(Clone, Copy, Debug)]
pub struct Bar {
    /// Index 0..6.
    pub index: u8,
    /// Address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// I/O space (else memory).
    pub io: bool,
    /// 64-bit memory BAR.
    pub wide: bool,
    /// Prefetchable.
    pub prefetch: bool,
}

/// MSI-X capability.
#[derive(Clone, Copy, Debug)]
pub struct MsiX {
    /// Offset of the capability in config space.
    pub cap: u16,
    /// Vectors.
    pub vectors: u16,
    /// BAR index and offset of the table.
    pub table: (u8, u32),
    /// BAR index and offset of the pending-bit array.
    pub pba: (u8, u32),
}

/// One PCI function.
#[derive(Clone, Debug)]
pub struct Device {
    /// Address.
    pub bdf: Bdf,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class, subclass, prog-if.
    pub class: (u8, u8, u8),
    /// Implemented BARs.
    pub bars: Vec<Bar>,
    /// MSI-X, if present.
    pub msix: Option<MsiX>,
    /// Virtio capabilities.
    pub virtio: Vec<VirtioCap>,
}

impl Device {
    /// Its address as text.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:04x}:{:04x} class {:02x}.{:02x}.{:02x}",
            self.bdf, self.vendor, self.device, self.class.0, self.class.1, self.class.2
        )?;
        for b in &self.bars {
            let kind = if b.io {
                "io"
            } else if b.wide {
                "mem64"
            } else {
                "mem32"
            };
            let pf = if b.prefetch { " pf" } else { "" };
            write!(
                f,
                " BAR{} {kind}{pf} {:#x} ({} KiB)",
                b.index,
                b.addr,
                b.size.div_ceil(1024)
            )?;
        }
        if let Some(m) = &self.msix {
            write!(
                f,
                " msix: {} vectors, table BAR{}+{:#x}, pba BAR{}+{:#x}",
                m.vectors, m.table.0, m.table.1, m.pba.0, m.pba.1
            )?;
        }
        for v in &self.virtio {
            let name = match v.cfg_type {
                1 => "common",
                2 => "notify",
                3 => "isr",
                4 => "device",
                5 => "pci-cfg",
                _ => "other",
            };
            write!(f, " virtio-{name}@BAR{}+{:#x}", v.bar, v.offset)?;
        }
        Ok(())
    }
}

fn probe_bars(b: Bdf, header_type: u8) -> Vec<Bar> {
    let count = if header_type & 0x7f == 0 { 6 } else { 2 };
    let cmd = read32(b, 0x04);
    // Decoding off while sizing, so the all-ones probe never claims an address.
    write32(b, 0x04, cmd & !0x3);
    let mut bars = Vec::new();
    let mut i = 0u8;
    while i < count {
        let off = 0x10 + u16::from(i) * 4;
        let orig = read32(b, off);
        write32(b, off, 0xffff_ffff);
        let probe = read32(b, off);
        write32(b, off, orig);
        if probe == 0 || probe == 0xffff_ffff && orig == 0xffff_ffff {
            i += 1;
            continue;
        }
        if orig & 1 != 0 {
            let size = u64::from(!(probe & !0x3)).wrapping_add(1) & 0xffff;
            if size != 0 {
                bars.push(Bar {
                    index: i,
                    addr: u64::from(orig & !0x3),
                    size,
                    io: true,
                    wide: false,
                    prefetch: false,
                });
            }
            i += 1;
            continue;
        }
        let wide = (orig >> 1) & 3 == 2;
        let prefetch = orig & 8 != 0;
        let (addr, size) = if wide && i + 1 < count {
            let hi_off = off + 4;
            let orig_hi = read32(b, hi_off);
            write32(b, hi_off, 0xffff_ffff);
            let probe_hi = read32(b, hi_off);
            write32(b, hi_off, orig_hi);
            let mask = (u64::from(probe_hi) << 32) | u64::from(probe & !0xf);
            (
                (u64::from(orig_hi) << 32) | u64::from(orig & !0xf),
                (!mask).wrapping_add(1),
            )
        } else {
            (
                u64::from(orig & !0xf),
                u64::from(!(probe & !0xf)).wrapping_add(1),
            )
        };
        if size != 0 {
            bars.push(Bar {
                index: i,
                addr,
                size,
                io: false,
                wide,
                prefetch,
            });
        }
        i += if wide { 2 } else { 1 };
    }
    write32(b, 0x04, cmd);
    bars
}

fn probe_caps(b: Bdf, d: &mut Device) {
    if read32(b, 0x04) >> 16 & 0x10 == 0 {
        return;
    }
    let mut ptr = (read32(b, 0x34) & 0xfc) as u16;
    let mut guard = 0;
    while ptr >= 0x40 && guard < 48 {
        guard += 1;
        let h = read32(b, ptr);
        match h as u8 {
            pci_id::CAP_MSIX => {
                let table = read32(b, ptr + 4);
                let pba = read32(b, ptr + 8);
                d.msix = Some(MsiX {
                    cap: ptr,
                    vectors: ((h >> 16) & 0x7ff) as u16 + 1,
                    table: ((table & 7) as u8, table & !7),
                    pba: ((pba & 7) as u8, pba & !7),
                });
            }
            pci_id::CAP_VENDOR if d.vendor == virtio_pci::VENDOR_ID => {
                d.virtio.push(VirtioCap::read(ptr, |o| read32(b, o)));
            }
            _ => {}
        }
        ptr = ((h >> 8) & 0xfc) as u16;
    }
}

/// Enumerates every function on every bus the platform exposes.
pub fn scan(platform: Option<&Platform>) -> Vec<Device> {
    let (access, buses) = match platform.and_then(|p| p.ecam) {
        Some(e) => (ConfigAccess::Ecam(e.base), e.bus_start..=e.bus_end),
        None => (ConfigAccess::Ports, 0..=255u8),
    };
    *ACCESS.lock() = access;
    info!("pci: configuration access {access:x?}");
    let mut out = Vec::new();
    for bus in buses {
        for dev in 0..32u8 {
            for func in 0..8u8 {
                let b = Bdf { bus, dev, func };
                let id = read32(b, 0);
                if id & 0xffff == 0xffff {
                    if func == 0 {
                        break;
                    }
                    continue;
                }
                let class = read32(b, 0x08);
                let header = (read32(b, 0x0c) >> 16) as u8;
                let mut d = Device {
                    bdf: b,
                    vendor: id as u16,
                    device: (id >> 16) as u16,
                    class: ((class >> 24) as u8, (class >> 16) as u8, (class >> 8) as u8),
                    bars: probe_bars(b, header),
                    msix: None,
                    virtio: Vec::new(),
                };
                probe_caps(b, &mut d);
                for bar in d.bars.iter().filter(|b| !b.io && b.addr != 0) {
                    paging::map_mmio(bar.addr, bar.size);
                }
                out.push(d);
                if func == 0 && header & 0x80 == 0 {
                    break;
                }
            }
        }
    }
    out
}
