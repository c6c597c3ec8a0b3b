//! The modern virtio-pci transport (virtio 1.2, section 4.1): the vendor
//! capabilities that locate the common, notify, ISR and device-specific regions,
//! and accessors for the common configuration registers.
//!
//! Registers are accessed with their own width, one `mov` each ([`crate::mmio`]);
//! 64-bit queue addresses are written as two 32-bit halves, low first, as Linux's
//! `vp_iowrite64_twopart` does (virtio 1.2, 4.1.3.1: the driver may use 32-bit
//! accesses for 64-bit fields).
//!
//! With `VIRTIO_F_RING_RESET` negotiated, one queue can be reset and re-enabled on
//! its own while the device stays live (virtio 1.2, 2.6.1), as Linux's
//! `vp_modern_set_queue_reset` / `vp_modern_set_queue_enable` do:
//! [`VirtioPci::reset_queue`], then [`VirtioPci::program_queue`] and
//! [`VirtioPci::enable_queue`].

use core::fmt;

use gpu_pv::ring::QueueLayout;

use crate::mmio;
use crate::pci::{self, Bar, Bdf, Capability, ConfigSpace, Msix};

/// The virtio capability types (`cfg_type`) and layout: the `virtio-pci` crate's.
pub use virtio_pci::cap;

/// Offsets in the common configuration structure (`struct virtio_pci_common_cfg`):
/// the `virtio-pci` crate's.
pub use virtio_pci::common;

/// Reads of `queue_reset` a queue reset may take before it counts as stuck.
pub const QUEUE_RESET_POLLS: u32 = 100_000;

/// Why a queue reset or re-enable did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueResetError {
    /// After the reset write, `queue_reset` still read 1 or `queue_enable` still
    /// read non-zero after [`QUEUE_RESET_POLLS`] reads (the values last read).
    Stuck {
        /// The queue.
        queue: u16,
        /// `queue_reset` last read.
        queue_reset: u16,
        /// `queue_enable` last read.
        queue_enable: u16,
    },
    /// A queue register did not read back what was written (the register offset).
    Refused {
        /// The queue.
        queue: u16,
        /// Offset in the common configuration of the register that refused.
        register: u64,
    },
    /// `queue_enable` did not read 1 after the re-enable.
    NotEnabled(u16),
}

impl fmt::Display for QueueResetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            QueueResetError::Stuck {
                queue,
                queue_reset,
                queue_enable,
            } => write!(
                f,
                "queue {queue} reset did not complete (queue_reset {queue_reset}, queue_enable {queue_enable})"
            ),
            QueueResetError::Refused { queue, register } => {
                write!(f, "queue {queue}: register {register:#x} refused the value written")
            }
            QueueResetError::NotEnabled(q) => write!(f, "queue {q} did not come back enabled"),
        }
    }
}

/// One virtio vendor capability as read from configuration space: the
/// `virtio-pci` crate's.
pub use virtio_pci::VirtioCap;

/// Why the transport could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportError {
    /// A required capability is missing (its `cfg_type`).
    MissingCapability(u8),
    /// A capability names a BAR that is not memory (BAR index).
    BadBar(u8),
    /// A capability's region does not fit in its BAR (`cfg_type`).
    RegionOutsideBar(u8),
    /// No MSI-X capability.
    NoMsix,
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::MissingCapability(t) => {
                write!(f, "virtio capability of type {t} missing")
            }
            TransportError::BadBar(b) => write!(f, "BAR{b} is not a memory BAR"),
            TransportError::RegionOutsideBar(t) => {
                write!(f, "virtio region of type {t} lies outside its BAR")
            }
            TransportError::NoMsix => write!(f, "no MSI-X capability"),
        }
    }
}

/// A modern virtio-pci function with its regions located.
#[derive(Clone, Copy, Debug)]
pub struct VirtioPci {
    /// The PCI function.
    pub bdf: Bdf,
    /// Its BARs (sized).
    pub bars: [Bar; 6],
    /// Guest-physical address of the common configuration.
    pub common: u64,
    /// Guest-physical address of the notification area.
    pub notify: u64,
    /// `notify_off_multiplier`.
    pub notify_multiplier: u32,
    /// Length of the notification area.
    pub notify_len: u32,
    /// Guest-physical address of the ISR status byte.
    pub isr: u64,
    /// Guest-physical address of the device-specific configuration.
    pub device: u64,
    /// Length of the device-specific configuration.
    pub device_len: u32,
    /// The MSI-X capability.
    pub msix: Msix,
    /// Guest-physical address of the MSI-X table.
    pub msix_table: u64,
    /// The virtio capabilities found, in list order.
    pub caps: [Option<VirtioCap>; 8],
}

/// Reads the virtio vendor capability at `cap`.
fn read_cap(bdf: Bdf, cap: &Capability) -> VirtioCap {
    VirtioCap::read(cap.offset, |o| bdf.read32(o))
}

impl VirtioPci {
    /// Locates the regions of the modern virtio function `bdf` from its vendor
    /// capabilities (the first of each type whose BAR is a memory BAR, as the
    /// specification asks drivers to pick), sizes its BARs and finds MSI-X.
    pub fn probe(bdf: Bdf) -> Result<VirtioPci, TransportError> {
        let bars = pci::read_bars(bdf);
        let mut caps = [None; 8];
        let mut n = 0;
        let mut pick: [Option<VirtioCap>; 6] = [None; 6];
        for c in pci::capabilities(bdf)
            .iter()
            .filter(|c| c.id == pci::CAP_VENDOR)
        {
            let vc = read_cap(bdf, c);
            if n < caps.len() {
                caps[n] = Some(vc);
                n += 1;
            }
            let usable = matches!(bars.get(usize::from(vc.bar)), Some(Bar::Memory { .. }));
            if let Some(slot) = pick.get_mut(usize::from(vc.cfg_type)) {
                if slot.is_none() && usable {
                    *slot = Some(vc);
                }
            }
        }
        let region = |t: u8| -> Result<(u64, VirtioCap), TransportError> {
            let c = pick[usize::from(t)].ok_or(TransportError::MissingCapability(t))?;
            let Some(Bar::Memory { addr, size, .. }) = bars.get(usize::from(c.bar)).copied() else {
                return Err(TransportError::BadBar(c.bar));
            };
            if u64::from(c.offset) + u64::from(c.length) > size {
                return Err(TransportError::RegionOutsideBar(t));
            }
            Ok((addr + u64::from(c.offset), c))
        };
        let (common, _) = region(cap::COMMON)?;
        let (notify, ncap) = region(cap::NOTIFY)?;
        let (isr, _) = region(cap::ISR)?;
        let (device, dcap) = region(cap::DEVICE)?;
        let msix = Msix::find(bdf).ok_or(TransportError::NoMsix)?;
        let msix_table = match bars.get(usize::from(msix.table_bar)).copied() {
            Some(Bar::Memory { addr, .. }) => addr + u64::from(msix.table_offset),
            _ => return Err(TransportError::BadBar(msix.table_bar)),
        };
        Ok(VirtioPci {
            bdf,
            bars,
            common,
            notify,
            notify_multiplier: ncap.notify_multiplier,
            notify_len: ncap.length,
            isr,
            device,
            device_len: dcap.length,
            msix,
            msix_table,
            caps,
        })
    }

    /// Reads a byte of the common configuration.
    pub fn read8(&self, off: u64) -> u8 {
        // SAFETY: the common configuration is device MMIO inside the BAR the probe
        // located and sized; reads have no effect on guest memory.
        unsafe { mmio::read8(self.common + off) }
    }
    /// Reads a `u16` of the common configuration.
    pub fn read16(&self, off: u64) -> u16 {
        // SAFETY: as in `read8`.
        unsafe { mmio::read16(self.common + off) }
    }
    /// Reads a `u32` of the common configuration.
    pub fn read32(&self, off: u64) -> u32 {
        // SAFETY: as in `read8`.
        unsafe { mmio::read32(self.common + off) }
    }
    /// Writes a byte of the common configuration.
    pub fn write8(&self, off: u64, v: u8) {
        // SAFETY: device MMIO, not guest memory.
        unsafe { mmio::write8(self.common + off, v) }
    }
    /// Writes a `u16` of the common configuration.
    pub fn write16(&self, off: u64, v: u16) {
        // SAFETY: as in `write8`.
        unsafe { mmio::write16(self.common + off, v) }
    }
    /// Writes a `u32` of the common configuration.
    pub fn write32(&self, off: u64, v: u32) {
        // SAFETY: as in `write8`.
        unsafe { mmio::write32(self.common + off, v) }
    }
    /// Writes a 64-bit field as two 32-bit halves, low half first.
    pub fn write64_split(&self, off: u64, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }
    /// Reads a 64-bit field as two 32-bit halves.
    pub fn read64_split(&self, off: u64) -> u64 {
        u64::from(self.read32(off)) | (u64::from(self.read32(off + 4)) << 32)
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.read8(common::DEVICE_STATUS)
    }
    /// Writes the device status byte.
    pub fn set_status(&self, v: u8) {
        self.write8(common::DEVICE_STATUS, v)
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        self.write32(common::DEVICE_FEATURE_SELECT, 0);
        let lo = self.read32(common::DEVICE_FEATURE);
        self.write32(common::DEVICE_FEATURE_SELECT, 1);
        let hi = self.read32(common::DEVICE_FEATURE);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Writes the 64 feature bits the driver accepts.
    pub fn set_driver_features(&self, f: u64) {
        self.write32(common::DRIVER_FEATURE_SELECT, 0);
        self.write32(common::DRIVER_FEATURE, f as u32);
        self.write32(common::DRIVER_FEATURE_SELECT, 1);
        self.write32(common::DRIVER_FEATURE, (f >> 32) as u32);
    }

    /// Reads back the driver features the device recorded.
    pub fn driver_features(&self) -> u64 {
        self.write32(common::DRIVER_FEATURE_SELECT, 0);
        let lo = self.read32(common::DRIVER_FEATURE);
        self.write32(common::DRIVER_FEATURE_SELECT, 1);
        let hi = self.read32(common::DRIVER_FEATURE);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Selects queue `q` for the `QUEUE_*` registers.
    pub fn select_queue(&self, q: u16) {
        self.write16(common::QUEUE_SELECT, q)
    }

    /// The notification address of a queue whose `queue_notify_off` is `off`.
    pub fn notify_addr(&self, off: u16) -> u64 {
        self.notify + u64::from(off) * u64::from(self.notify_multiplier)
    }

    /// Notifies the device of new buffers in queue `q` (the queue index, as a 16-bit
    /// write to its notification address, without `VIRTIO_F_NOTIFICATION_DATA`).
    pub fn notify_queue(&self, addr: u64, q: u16) {
        // SAFETY: `addr` is in the notification area of the device's BAR.
        unsafe { mmio::write16(addr, q) }
    }

    /// Reads the `u32` at `off` of the device-specific configuration.
    pub fn device_read32(&self, off: u64) -> u32 {
        // SAFETY: device MMIO inside the device configuration region.
        unsafe { mmio::read32(self.device + off) }
    }

    /// Writes the `u32` at `off` of the device-specific configuration.
    pub fn device_write32(&self, off: u64, v: u32) {
        // SAFETY: as in `device_read32`.
        unsafe { mmio::write32(self.device + off, v) }
    }

    /// Reads (and so clears) the ISR status byte.
    pub fn read_isr(&self) -> u8 {
        // SAFETY: device MMIO; the read only clears the device's ISR.
        unsafe { mmio::read8(self.isr) }
    }

    /// Resets queue `q` alone (`VIRTIO_F_RING_RESET`, virtio 1.2, 2.6.1): selects it,
    /// writes 1 to `queue_reset` and waits until the device reports the reset done
    /// (`queue_reset` and `queue_enable` both read 0). The driver then owns every
    /// buffer it had given the queue; the device will not use them, nor write a used
    /// entry for them.
    pub fn reset_queue(&self, q: u16) -> Result<(), QueueResetError> {
        self.select_queue(q);
        self.write16(common::QUEUE_RESET, 1);
        let (mut reset, mut enable) = (1, 1);
        for _ in 0..QUEUE_RESET_POLLS {
            reset = self.read16(common::QUEUE_RESET);
            enable = self.read16(common::QUEUE_ENABLE);
            if reset == 0 && enable == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(QueueResetError::Stuck {
            queue: q,
            queue_reset: reset,
            queue_enable: enable,
        })
    }

    /// Programs queue `q` (not enabled: before DRIVER_OK, or after
    /// [`reset_queue`](Self::reset_queue)) with `layout`'s size and ring addresses
    /// and MSI-X entry `msix_entry`, checking that each reads back. Returns the
    /// queue's notification address.
    pub fn program_queue(
        &self,
        q: u16,
        layout: &QueueLayout,
        msix_entry: u16,
    ) -> Result<u64, QueueResetError> {
        let refused = |register| QueueResetError::Refused { queue: q, register };
        self.select_queue(q);
        self.write16(common::QUEUE_SIZE, layout.size);
        if self.read16(common::QUEUE_SIZE) != layout.size {
            return Err(refused(common::QUEUE_SIZE));
        }
        self.write16(common::QUEUE_MSIX_VECTOR, msix_entry);
        if self.read16(common::QUEUE_MSIX_VECTOR) != msix_entry {
            return Err(refused(common::QUEUE_MSIX_VECTOR));
        }
        for (reg, v) in [
            (common::QUEUE_DESC, layout.desc),
            (common::QUEUE_DRIVER, layout.avail),
            (common::QUEUE_DEVICE, layout.used),
        ] {
            self.write64_split(reg, v.get());
            if self.read64_split(reg) != v.get() {
                return Err(refused(reg));
            }
        }
        let off = self.read16(common::QUEUE_NOTIFY_OFF);
        if u64::from(off) * u64::from(self.notify_multiplier) + 2 > u64::from(self.notify_len) {
            return Err(refused(common::QUEUE_NOTIFY_OFF));
        }
        Ok(self.notify_addr(off))
    }

    /// Enables queue `q` (writes 1 to `queue_enable`) and checks it reads back 1.
    pub fn enable_queue(&self, q: u16) -> Result<(), QueueResetError> {
        self.select_queue(q);
        self.write16(common::QUEUE_ENABLE, 1);
        if self.read16(common::QUEUE_ENABLE) != 1 {
            return Err(QueueResetError::NotEnabled(q));
        }
        Ok(())
    }

    /// `queue_enable` and `queue_reset` of queue `q`, as read now.
    pub fn queue_state(&self, q: u16) -> (u16, u16) {
        self.select_queue(q);
        (
            self.read16(common::QUEUE_ENABLE),
            self.read16(common::QUEUE_RESET),
        )
    }

    /// Guest-physical address of the MSI-X Pending Bit Array, if its BAR is memory.
    pub fn msix_pba(&self) -> Option<u64> {
        match self.bars.get(usize::from(self.msix.pba_bar)).copied() {
            Some(Bar::Memory { addr, .. }) => Some(addr + u64::from(self.msix.pba_offset)),
            _ => None,
        }
    }

    /// The first 64 pending bits of the MSI-X PBA (bit `i`: table entry `i` has a
    /// message held back by its mask); 0 without a PBA.
    pub fn read_pba(&self) -> u64 {
        match self.msix_pba() {
            // SAFETY: the PBA is device MMIO in a BAR the probe sized; reading it has
            // no side effect.
            Some(pba) => unsafe {
                u64::from(mmio::read32(pba)) | (u64::from(mmio::read32(pba + 4)) << 32)
            },
            None => 0,
        }
    }
}
