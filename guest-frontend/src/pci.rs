//! PCI discovery through the guest's ECAM window (memory-mapped configuration space,
//! PCIe enhanced configuration access): scanning bus 0, walking a function's
//! capability list, reading (and sizing) its BARs, and its MSI-X capability.
//!
//! The hypervisor emulates the window at [`ECAM_BASE`] (bus 0 only holds devices):
//! every access is one trapped `mov` ([`crate::mmio`]).

use alloc::vec::Vec;

use crate::mmio;

/// Guest-physical base of the ECAM window every guest sees (the hypervisor's
/// `GUEST_ECAM_BASE`).
pub const ECAM_BASE: u64 = 0xb000_0000;

/// Configuration-space offsets of the type-0 header.
pub mod reg {
    /// Vendor id (u16).
    pub const VENDOR: u16 = 0x00;
    /// Device id (u16).
    pub const DEVICE: u16 = 0x02;
    /// Command register (u16).
    pub const COMMAND: u16 = 0x04;
    /// Status register (u16).
    pub const STATUS: u16 = 0x06;
    /// Revision id (u8).
    pub const REVISION: u16 = 0x08;
    /// Programming interface, subclass, class (u8 each, from 0x09).
    pub const CLASS: u16 = 0x09;
    /// Header type (u8; bit 7: multi-function).
    pub const HEADER_TYPE: u16 = 0x0e;
    /// BAR0 (u32; BARn at `BAR0 + 4 * n`).
    pub const BAR0: u16 = 0x10;
    /// Subsystem vendor id (u16).
    pub const SUBSYSTEM_VENDOR: u16 = 0x2c;
    /// Subsystem id (u16).
    pub const SUBSYSTEM: u16 = 0x2e;
    /// Capabilities pointer (u8).
    pub const CAP_PTR: u16 = 0x34;
}

/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the capability list is valid.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// Capability ids: MSI-X ([`CAP_MSIX`]) and vendor specific ([`CAP_VENDOR`],
/// virtio uses these); the `virtio-pci` crate's.
pub use virtio_pci::pci::{CAP_MSIX, CAP_VENDOR};

/// Bus, device and function of a PCI function: the `virtio-pci` crate's.
pub use virtio_pci::Bdf;

/// Configuration-space access to a function through the ECAM window.
pub trait ConfigSpace {
    /// The ECAM address of configuration register `off` of this function.
    fn ecam(&self, off: u16) -> u64;
    /// Reads the configuration byte at `off`.
    fn read8(&self, off: u16) -> u8;
    /// Reads the configuration word at `off` (2-byte aligned).
    fn read16(&self, off: u16) -> u16;
    /// Reads the configuration dword at `off` (4-byte aligned).
    fn read32(&self, off: u16) -> u32;
    /// Writes the configuration word at `off` (2-byte aligned).
    fn write16(&self, off: u16, v: u16);
    /// Writes the configuration dword at `off` (4-byte aligned).
    fn write32(&self, off: u16, v: u32);
}

impl ConfigSpace for Bdf {
    fn ecam(&self, off: u16) -> u64 {
        ECAM_BASE
            + (u64::from(self.bus) << 20)
            + (u64::from(self.dev & 31) << 15)
            + (u64::from(self.func & 7) << 12)
            + u64::from(off & 0xfff)
    }

    fn read8(&self, off: u16) -> u8 {
        // SAFETY: the ECAM window is emulated configuration space: reads have no side
        // effects on guest memory.
        unsafe { mmio::read8(self.ecam(off)) }
    }

    fn read16(&self, off: u16) -> u16 {
        // SAFETY: as in `read8`.
        unsafe { mmio::read16(self.ecam(off & !1)) }
    }

    fn read32(&self, off: u16) -> u32 {
        // SAFETY: as in `read8`.
        unsafe { mmio::read32(self.ecam(off & !3)) }
    }

    fn write16(&self, off: u16, v: u16) {
        // SAFETY: configuration space is the emulated device's, not guest memory.
        unsafe { mmio::write16(self.ecam(off & !1), v) }
    }

    fn write32(&self, off: u16, v: u32) {
        // SAFETY: as in `write16`.
        unsafe { mmio::write32(self.ecam(off & !3), v) }
    }
}

/// One function found on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// Where it is.
    pub bdf: Bdf,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class, subclass, programming interface.
    pub class: (u8, u8, u8),
    /// Revision id.
    pub revision: u8,
    /// Header type (without the multi-function bit).
    pub header_type: u8,
}

impl Function {
    fn probe(bdf: Bdf) -> Option<Function> {
        let id = bdf.read32(reg::VENDOR);
        let vendor = id as u16;
        if vendor == 0xffff || vendor == 0 {
            return None;
        }
        let class = bdf.read32(reg::REVISION);
        Some(Function {
            bdf,
            vendor,
            device: (id >> 16) as u16,
            class: ((class >> 24) as u8, (class >> 16) as u8, (class >> 8) as u8),
            revision: class as u8,
            header_type: bdf.read8(reg::HEADER_TYPE) & 0x7f,
        })
    }
}

/// Every function on `bus` (function 0 of each device, and functions 1..8 of
/// multi-function devices).
pub fn scan_bus(bus: u8) -> Vec<Function> {
    let mut found = Vec::new();
    for dev in 0..32 {
        let f0 = Bdf { bus, dev, func: 0 };
        let Some(f) = Function::probe(f0) else {
            continue;
        };
        found.push(f);
        if f0.read8(reg::HEADER_TYPE) & 0x80 != 0 {
            for func in 1..8 {
                if let Some(f) = Function::probe(Bdf { bus, dev, func }) {
                    found.push(f);
                }
            }
        }
    }
    found
}

/// The first function on bus 0 with this vendor and device id.
pub fn find(vendor: u16, device: u16) -> Option<Function> {
    scan_bus(0)
        .into_iter()
        .find(|f| f.vendor == vendor && f.device == device)
}

/// One entry of a capability list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Its offset in configuration space.
    pub offset: u16,
    /// Capability id.
    pub id: u8,
}

/// Walks the capability list of `bdf` (empty when the status register says there is
/// none). A list that loops or points below the header ends the walk after at most
/// 48 entries (the most that fit in 256 bytes), so a broken device cannot hang it.
pub fn capabilities(bdf: Bdf) -> Vec<Capability> {
    let mut caps = Vec::new();
    if bdf.read16(reg::STATUS) & STATUS_CAP_LIST == 0 {
        return caps;
    }
    let mut off = u16::from(bdf.read8(reg::CAP_PTR) & 0xfc);
    while off >= 0x40 && caps.len() < 48 {
        if caps.iter().any(|c: &Capability| c.offset == off) {
            break;
        }
        let id = bdf.read8(off);
        caps.push(Capability { offset: off, id });
        off = u16::from(bdf.read8(off + 1) & 0xfc);
    }
    caps
}

/// What a base address register decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bar {
    /// Not implemented.
    None,
    /// I/O ports.
    Io {
        /// First port.
        port: u32,
        /// Ports.
        size: u32,
    },
    /// Memory (32 or 64-bit).
    Memory {
        /// Guest-physical base.
        addr: u64,
        /// Bytes.
        size: u64,
        /// A 64-bit BAR (it also takes the next BAR slot).
        is_64: bool,
        /// Prefetchable.
        prefetchable: bool,
    },
}

/// Reads BAR `index` (0..6) of `bdf` and sizes it as an OS's PCI layer does: with
/// memory and I/O decoding off, write all ones, read the size mask back, restore.
/// For a 64-bit BAR the next slot is the upper half; `index` must then not be 5.
pub fn read_bar(bdf: Bdf, index: u8) -> Bar {
    if index > 5 {
        return Bar::None;
    }
    let off = reg::BAR0 + 4 * u16::from(index);
    let command = bdf.read16(reg::COMMAND);
    bdf.write16(reg::COMMAND, command & !(COMMAND_MEMORY | 1));
    let lo = bdf.read32(off);
    bdf.write32(off, u32::MAX);
    let lo_mask = bdf.read32(off);
    bdf.write32(off, lo);
    let bar = if lo & 1 != 0 {
        let mask = lo_mask & !3;
        if mask == 0 {
            Bar::None
        } else {
            Bar::Io {
                port: lo & !3,
                size: (!mask).wrapping_add(1) & 0xffff,
            }
        }
    } else {
        let is_64 = (lo >> 1) & 3 == 2 && index < 5;
        let (hi, hi_mask) = if is_64 {
            let hi = bdf.read32(off + 4);
            bdf.write32(off + 4, u32::MAX);
            let m = bdf.read32(off + 4);
            bdf.write32(off + 4, hi);
            (hi, m)
        } else {
            (0, u32::MAX)
        };
        let mask = (u64::from(hi_mask) << 32) | u64::from(lo_mask & !0xf);
        if lo_mask & !0xf == 0 && (!is_64 || hi_mask == 0) {
            Bar::None
        } else {
            Bar::Memory {
                addr: (u64::from(hi) << 32) | u64::from(lo & !0xf),
                size: (!mask).wrapping_add(1),
                is_64,
                prefetchable: lo & 8 != 0,
            }
        }
    };
    bdf.write16(reg::COMMAND, command);
    bar
}

/// All six BARs of a type-0 function (the upper half of a 64-bit BAR is
/// [`Bar::None`]).
pub fn read_bars(bdf: Bdf) -> [Bar; 6] {
    let mut bars = [Bar::None; 6];
    let mut i = 0u8;
    while i < 6 {
        let b = read_bar(bdf, i);
        bars[usize::from(i)] = b;
        i += if matches!(b, Bar::Memory { is_64: true, .. }) {
            2
        } else {
            1
        };
    }
    bars
}

/// Enables memory decoding and bus mastering (DMA) and disables INTx (the device
/// interrupts through MSI-X).
pub fn enable_device(bdf: Bdf) {
    let c = bdf.read16(reg::COMMAND);
    bdf.write16(
        reg::COMMAND,
        c | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE,
    );
}

/// The MSI-X capability of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msix {
    /// The function.
    pub bdf: Bdf,
    /// Offset of the capability in configuration space.
    pub cap: u16,
    /// Table entries.
    pub table_size: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u32,
    /// BAR holding the pending-bit array.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR.
    pub pba_offset: u32,
}

/// Message control: MSI-X enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message control: all vectors masked.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Bytes of one MSI-X table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;

impl Msix {
    /// Reads the MSI-X capability of `bdf`, if it has one.
    pub fn find(bdf: Bdf) -> Option<Msix> {
        let cap = capabilities(bdf).into_iter().find(|c| c.id == CAP_MSIX)?;
        let o = cap.offset;
        let control = bdf.read16(o + 2);
        let table = bdf.read32(o + 4);
        let pba = bdf.read32(o + 8);
        Some(Msix {
            bdf,
            cap: o,
            table_size: (control & 0x7ff) + 1,
            table_bar: (table & 7) as u8,
            table_offset: table & !7,
            pba_bar: (pba & 7) as u8,
            pba_offset: pba & !7,
        })
    }

    /// The message control register.
    pub fn control(&self) -> u16 {
        self.bdf.read16(self.cap + 2)
    }

    /// Writes the enable and function-mask bits of message control.
    pub fn set_control(&self, enable: bool, mask_all: bool) {
        let mut c = self.control() & !(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        if enable {
            c |= MSIX_ENABLE;
        }
        if mask_all {
            c |= MSIX_FUNCTION_MASK;
        }
        self.bdf.write16(self.cap + 2, c);
    }

    /// Programs table entry `entry` (the table is at `table_base`, the address the
    /// table BAR decodes plus [`table_offset`](Self::table_offset)): a fixed,
    /// edge-triggered `vector` to the local APIC with id 0 (address `0xFEE00000`),
    /// unmasked unless `masked`.
    pub fn program(&self, table_base: u64, entry: u16, vector: u8, masked: bool) {
        let e = table_base + u64::from(entry) * MSIX_ENTRY_SIZE;
        // SAFETY: `e` is an entry of the device's MSI-X table (BAR memory trapped by the
        // hypervisor), not guest RAM. The entry is masked while it changes.
        unsafe {
            mmio::write32(e + 12, 1);
            mmio::write32(e, 0xfee0_0000);
            mmio::write32(e + 4, 0);
            mmio::write32(e + 8, u32::from(vector));
            mmio::write32(e + 12, u32::from(masked));
        }
    }

    /// Reads table entry `entry` back: (address, data, vector control).
    pub fn read_entry(&self, table_base: u64, entry: u16) -> (u64, u32, u32) {
        let e = table_base + u64::from(entry) * MSIX_ENTRY_SIZE;
        // SAFETY: as in `program`; reads have no side effects.
        unsafe {
            let lo = mmio::read32(e);
            let hi = mmio::read32(e + 4);
            (
                (u64::from(hi) << 32) | u64::from(lo),
                mmio::read32(e + 8),
                mmio::read32(e + 12),
            )
        }
    }
}
