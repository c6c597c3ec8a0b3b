//! The virtio 1.x PCI transport (virtio 1.2, section 4.1), defined once for the
//! three sides that speak it here: the hypervisor's physical virtio-gpu driver, the
//! virtual virtio-gpu function every guest sees (`vdev`), and the guest's driver.
//!
//! What is here: the layout of the common configuration structure
//! ([`common`], `struct virtio_pci_common_cfg`), the device status bits
//! ([`status`], 2.1), the virtio vendor capability (`struct virtio_pci_cap`: its
//! types and layout in [`cap`], parsed into [`VirtioCap`]), the MSI-X "no vector"
//! value ([`MSI_NO_VECTOR`]), the device-independent feature bits ([`feature`],
//! chapter 6) and the PCI bits the transport rests on ([`Bdf`], capability ids in
//! [`pci`]). Device types' own definitions (virtio-gpu's configuration and
//! commands) live with the device (`gpu_pv::wire`).
//!
//! Pure definitions: no I/O. Offsets are `u64` (they are added to MMIO addresses);
//! capability offsets are `u16` (configuration-space offsets).
#![no_std]
#![forbid(unsafe_code)]

use core::fmt;

/// PCI vendor id of every virtio device.
pub const VENDOR_ID: u16 = 0x1af4;

/// `VIRTIO_MSI_NO_VECTOR`: written to (and read back from) `config_msix_vector` or
/// `queue_msix_vector` for "no MSI-X entry" (4.1.4.3).
pub const MSI_NO_VECTOR: u16 = 0xffff;

/// Device status bits (`device_status`, virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = 4;
    /// The driver acknowledged the features it understands; negotiation is done.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it needs a reset to recover from.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Byte offsets of the common configuration structure's fields
/// (`struct virtio_pci_common_cfg`, virtio 1.2, 4.1.4.3; all little endian). The
/// width of each field is in its doc and in [`FIELDS`](common::FIELDS).
pub mod common {
    /// le32 `device_feature_select`.
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// le32 `device_feature` (read-only for the driver).
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// le32 `driver_feature_select`.
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// le32 `driver_feature`.
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// le16 `config_msix_vector` (`msix_config`).
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// le16 `num_queues` (read-only for the driver).
    pub const NUM_QUEUES: u64 = 0x12;
    /// u8 `device_status` (bits in [`crate::status`]).
    pub const DEVICE_STATUS: u64 = 0x14;
    /// u8 `config_generation` (read-only for the driver).
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// le16 `queue_select`.
    pub const QUEUE_SELECT: u64 = 0x16;
    /// le16 `queue_size`.
    pub const QUEUE_SIZE: u64 = 0x18;
    /// le16 `queue_msix_vector`.
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// le16 `queue_enable`.
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// le16 `queue_notify_off` (read-only for the driver).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// le64 `queue_desc` (descriptor table).
    pub const QUEUE_DESC: u64 = 0x20;
    /// le64 `queue_driver` (available ring).
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// le64 `queue_device` (used ring).
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// le16 `queue_notif_config_data` (`VIRTIO_F_NOTIF_CONFIG_DATA`).
    pub const QUEUE_NOTIFY_DATA: u64 = 0x38;
    /// le16 `queue_reset` (`VIRTIO_F_RING_RESET`).
    pub const QUEUE_RESET: u64 = 0x3a;

    /// Bytes of the structure up to and including `queue_device`: what every
    /// virtio 1.x device has and a driver that uses neither notification config
    /// data nor queue reset needs.
    pub const LEN: u64 = 0x38;
    /// Bytes of the structure with `queue_notif_config_data` and `queue_reset`.
    pub const LEN_WITH_RESET: u64 = 0x3c;

    /// Every field as (name, offset, width in bytes), in structure order.
    pub const FIELDS: [(&str, u64, u8); 18] = [
        ("device_feature_select", DEVICE_FEATURE_SELECT, 4),
        ("device_feature", DEVICE_FEATURE, 4),
        ("driver_feature_select", DRIVER_FEATURE_SELECT, 4),
        ("driver_feature", DRIVER_FEATURE, 4),
        ("config_msix_vector", CONFIG_MSIX_VECTOR, 2),
        ("num_queues", NUM_QUEUES, 2),
        ("device_status", DEVICE_STATUS, 1),
        ("config_generation", CONFIG_GENERATION, 1),
        ("queue_select", QUEUE_SELECT, 2),
        ("queue_size", QUEUE_SIZE, 2),
        ("queue_msix_vector", QUEUE_MSIX_VECTOR, 2),
        ("queue_enable", QUEUE_ENABLE, 2),
        ("queue_notify_off", QUEUE_NOTIFY_OFF, 2),
        ("queue_desc", QUEUE_DESC, 8),
        ("queue_driver", QUEUE_DRIVER, 8),
        ("queue_device", QUEUE_DEVICE, 8),
        ("queue_notif_config_data", QUEUE_NOTIFY_DATA, 2),
        ("queue_reset", QUEUE_RESET, 2),
    ];
}

/// The virtio vendor capability (`struct virtio_pci_cap`, virtio 1.2, 4.1.4): its
/// `cfg_type` values and the byte offsets of its fields from the capability's start.
pub mod cap {
    /// `VIRTIO_PCI_CAP_COMMON_CFG`: the common configuration.
    pub const COMMON: u8 = 1;
    /// `VIRTIO_PCI_CAP_NOTIFY_CFG`: the notification area.
    pub const NOTIFY: u8 = 2;
    /// `VIRTIO_PCI_CAP_ISR_CFG`: the ISR status byte.
    pub const ISR: u8 = 3;
    /// `VIRTIO_PCI_CAP_DEVICE_CFG`: the device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// `VIRTIO_PCI_CAP_PCI_CFG`: the alternative access window through
    /// configuration space.
    pub const PCI_CFG: u8 = 5;
    /// `VIRTIO_PCI_CAP_SHARED_MEMORY_CFG`: a shared memory region.
    pub const SHARED_MEMORY: u8 = 8;
    /// `VIRTIO_PCI_CAP_VENDOR_CFG`: vendor-specific data.
    pub const VENDOR: u8 = 9;

    /// u8 `cap_vndr`: the PCI capability id ([`crate::pci::CAP_VENDOR`]).
    pub const CAP_VNDR: u16 = 0;
    /// u8 `cap_next`: the next capability's offset.
    pub const CAP_NEXT: u16 = 1;
    /// u8 `cap_len`: the capability's length in bytes.
    pub const CAP_LEN: u16 = 2;
    /// u8 `cfg_type`.
    pub const CFG_TYPE: u16 = 3;
    /// u8 `bar`: the BAR index the region is in.
    pub const BAR: u16 = 4;
    /// u8 `id`: tells apart several capabilities of one type.
    pub const ID: u16 = 5;
    /// le32 `offset`: the region's offset in the BAR.
    pub const OFFSET: u16 = 8;
    /// le32 `length`: the region's length.
    pub const LENGTH: u16 = 12;
    /// le32 `notify_off_multiplier` (`struct virtio_pci_notify_cap`, notify only).
    pub const NOTIFY_OFF_MULTIPLIER: u16 = 16;

    /// Bytes of `struct virtio_pci_cap`.
    pub const LEN: u8 = 16;
    /// Bytes of `struct virtio_pci_notify_cap`.
    pub const NOTIFY_LEN: u8 = 20;
}

/// Device-independent feature bit numbers (virtio 1.2, chapter 6); a device's own
/// bits are 0..=23 and live with the device.
pub mod feature {
    /// `VIRTIO_F_INDIRECT_DESC` (`VIRTIO_F_RING_INDIRECT_DESC`).
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// `VIRTIO_F_EVENT_IDX` (`VIRTIO_F_RING_EVENT_IDX`).
    pub const RING_EVENT_IDX: u32 = 29;
    /// `VIRTIO_F_VERSION_1`: a virtio 1.x (non-legacy) device.
    pub const VERSION_1: u32 = 32;
    /// `VIRTIO_F_ACCESS_PLATFORM`: the device's DMA goes through the platform's
    /// translation (an IOMMU).
    pub const ACCESS_PLATFORM: u32 = 33;
    /// `VIRTIO_F_RING_PACKED`.
    pub const RING_PACKED: u32 = 34;
    /// `VIRTIO_F_IN_ORDER`.
    pub const IN_ORDER: u32 = 35;
    /// `VIRTIO_F_ORDER_PLATFORM`.
    pub const ORDER_PLATFORM: u32 = 36;
    /// `VIRTIO_F_SR_IOV`.
    pub const SR_IOV: u32 = 37;
    /// `VIRTIO_F_NOTIFICATION_DATA`.
    pub const NOTIFICATION_DATA: u32 = 38;
    /// `VIRTIO_F_NOTIF_CONFIG_DATA`.
    pub const NOTIF_CONFIG_DATA: u32 = 39;
    /// `VIRTIO_F_RING_RESET`: one queue can be reset on its own (2.6.1).
    pub const RING_RESET: u32 = 40;

    /// The bit for feature number `n` in a 64-bit feature word.
    pub const fn bit(n: u32) -> u64 {
        1u64 << n
    }
}

/// The PCI definitions the transport rests on.
pub mod pci {
    /// Capability id of a vendor-specific capability (virtio's capabilities).
    pub const CAP_VENDOR: u8 = 0x09;
    /// Capability id of MSI-X.
    pub const CAP_MSIX: u8 = 0x11;
}

/// Bus, device and function of a PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf {
    /// Bus.
    pub bus: u8,
    /// Device (0..32).
    pub dev: u8,
    /// Function (0..8).
    pub func: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// One virtio vendor capability (`struct virtio_pci_cap`, and for the notify
/// capability `struct virtio_pci_notify_cap`) as read from configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCap {
    /// Offset of the capability in configuration space.
    pub cap_offset: u16,
    /// `cfg_type` (one of [`cap`]'s types).
    pub cfg_type: u8,
    /// BAR index.
    pub bar: u8,
    /// Offset of the region in the BAR.
    pub offset: u32,
    /// Length of the region.
    pub length: u32,
    /// `notify_off_multiplier`: for a notify capability at least
    /// [`cap::NOTIFY_LEN`] long, else 0.
    pub notify_multiplier: u32,
}

impl VirtioCap {
    /// Parses the virtio capability at configuration offset `at` (a vendor-specific
    /// capability of a virtio function) through `read32`, which reads the
    /// configuration dword at a 4-byte-aligned offset.
    pub fn read(at: u16, mut read32: impl FnMut(u16) -> u32) -> VirtioCap {
        let head = read32(at).to_le_bytes();
        let cap_len = head[usize::from(cap::CAP_LEN)];
        let cfg_type = head[usize::from(cap::CFG_TYPE)];
        let bar = read32(at + cap::BAR).to_le_bytes()[0];
        VirtioCap {
            cap_offset: at,
            cfg_type,
            bar,
            offset: read32(at + cap::OFFSET),
            length: read32(at + cap::LENGTH),
            notify_multiplier: if cfg_type == cap::NOTIFY && cap_len >= cap::NOTIFY_LEN {
                read32(at + cap::NOTIFY_OFF_MULTIPLIER)
            } else {
                0
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The common configuration layout of virtio 1.2, 4.1.4.3: each field starts
    /// where the previous one ends, naturally aligned, nothing in between.
    #[test]
    fn common_config_layout_is_the_specs() {
        let mut next = 0;
        for (name, off, width) in common::FIELDS {
            assert_eq!(off, next, "{name} starts where the previous field ends");
            assert_eq!(off % u64::from(width), 0, "{name} is naturally aligned");
            next = off + u64::from(width);
        }
        assert_eq!(next, common::LEN_WITH_RESET);
        assert_eq!(common::QUEUE_DEVICE + 8, common::LEN);
        // The offsets the specification's structure gives, one by one.
        let spec: [u64; 18] = [
            0x00, 0x04, 0x08, 0x0c, 0x10, 0x12, 0x14, 0x15, 0x16, 0x18, 0x1a, 0x1c, 0x1e, 0x20,
            0x28, 0x30, 0x38, 0x3a,
        ];
        for ((name, off, _), want) in common::FIELDS.iter().zip(spec) {
            assert_eq!(*off, want, "{name}");
        }
        assert_eq!(common::DEVICE_STATUS, 0x14);
        assert_eq!(common::QUEUE_RESET, 0x3a);
    }

    #[test]
    fn status_bits_are_the_specs() {
        assert_eq!(status::ACKNOWLEDGE, 1);
        assert_eq!(status::DRIVER, 2);
        assert_eq!(status::DRIVER_OK, 4);
        assert_eq!(status::FEATURES_OK, 8);
        assert_eq!(status::DEVICE_NEEDS_RESET, 64);
        assert_eq!(status::FAILED, 128);
    }

    #[test]
    fn capability_types_and_layout_are_the_specs() {
        assert_eq!(
            [
                cap::COMMON,
                cap::NOTIFY,
                cap::ISR,
                cap::DEVICE,
                cap::PCI_CFG
            ],
            [1, 2, 3, 4, 5]
        );
        assert_eq!((cap::SHARED_MEMORY, cap::VENDOR), (8, 9));
        assert_eq!(
            [
                cap::CAP_VNDR,
                cap::CAP_NEXT,
                cap::CAP_LEN,
                cap::CFG_TYPE,
                cap::BAR,
                cap::ID
            ],
            [0, 1, 2, 3, 4, 5]
        );
        assert_eq!(
            (cap::OFFSET, cap::LENGTH, cap::NOTIFY_OFF_MULTIPLIER),
            (8, 12, 16)
        );
        assert_eq!((cap::LEN, cap::NOTIFY_LEN), (16, 20));
        assert_eq!((pci::CAP_VENDOR, pci::CAP_MSIX), (0x09, 0x11));
        assert_eq!(MSI_NO_VECTOR, 0xffff);
    }

    #[test]
    fn transport_feature_bits_are_the_specs() {
        use feature::*;
        assert_eq!((RING_INDIRECT_DESC, RING_EVENT_IDX), (28, 29));
        assert_eq!(
            (VERSION_1, ACCESS_PLATFORM, RING_PACKED, IN_ORDER),
            (32, 33, 34, 35)
        );
        assert_eq!((ORDER_PLATFORM, SR_IOV, NOTIFICATION_DATA), (36, 37, 38));
        assert_eq!((NOTIF_CONFIG_DATA, RING_RESET), (39, 40));
        assert_eq!(bit(VERSION_1), 0x1_0000_0000);
    }

    /// A configuration space holding `bytes` at offset 0x50.
    fn space(bytes: &[u8]) -> impl FnMut(u16) -> u32 + '_ {
        move |off| {
            let i = usize::from(off) - 0x50;
            let mut w = [0u8; 4];
            for (k, b) in w.iter_mut().enumerate() {
                *b = bytes.get(i + k).copied().unwrap_or(0xff);
            }
            u32::from_le_bytes(w)
        }
    }

    #[test]
    fn parses_a_notify_capability() {
        let mut c = [0u8; 20];
        c[..6].copy_from_slice(&[0x09, 0x60, 20, cap::NOTIFY, 4, 0]);
        c[8..12].copy_from_slice(&0x3000u32.to_le_bytes());
        c[12..16].copy_from_slice(&0x1000u32.to_le_bytes());
        c[16..20].copy_from_slice(&4u32.to_le_bytes());
        let vc = VirtioCap::read(0x50, space(&c));
        assert_eq!(
            vc,
            VirtioCap {
                cap_offset: 0x50,
                cfg_type: cap::NOTIFY,
                bar: 4,
                offset: 0x3000,
                length: 0x1000,
                notify_multiplier: 4,
            }
        );
    }

    #[test]
    fn a_short_or_other_capability_has_no_multiplier() {
        let mut c = [0u8; 16];
        c[..6].copy_from_slice(&[0x09, 0, 16, cap::NOTIFY, 2, 0]);
        assert_eq!(VirtioCap::read(0x50, space(&c)).notify_multiplier, 0);
        c[3] = cap::COMMON;
        let vc = VirtioCap::read(0x50, space(&c));
        assert_eq!(
            (vc.cfg_type, vc.bar, vc.notify_multiplier),
            (cap::COMMON, 2, 0)
        );
    }

    #[test]
    fn bdf_prints_as_bus_dev_func() {
        extern crate std;
        use std::string::ToString;
        let b = Bdf {
            bus: 0,
            dev: 0x1f,
            func: 3,
        };
        assert_eq!(b.to_string(), "00:1f.3");
    }
}
