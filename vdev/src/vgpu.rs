//! The paravirtual GPU each VM sees: a virtio-gpu PCI function (1af4:1050) at
//! 00:01.0 of the VM's PCI configuration space, with the modern virtio-pci
//! capabilities in BAR4 (common 0x0, ISR 0x1000, device 0x2000, notify 0x3000) and a
//! 3-entry MSI-X table in BAR1, all trapped through nested paging. Notify writes are
//! doorbells into the `gpu-pv` mediator (the kernel's `gpu_share/`); MSI-X entries turn the
//! mediator's interrupts into the VM's own vectors.
//!
//! It offers what an unmodified Linux virtio_gpu driver negotiates: VERSION_1, EDID,
//! RING_INDIRECT_DESC, RING_EVENT_IDX and the GPU-PV protocol revision bits, and
//! RING_RESET (virtio 1.2, 2.6.1): once DRIVER_OK is set, writing 1 to `queue_reset`
//! resets the selected queue alone. The reset is done by the time the write
//! completes (the mediator drops the queue's unanswered chains: no response and no
//! used entry reach the guest for them), so `queue_reset` reads 0 again at once and
//! `queue_enable` reads 0 until the driver, after setting the queue's size and
//! addresses anew, writes 1 to `queue_enable`: the queue then restarts from index 0
//! at its new layout. A `queue_reset` write before DRIVER_OK, without RING_RESET
//! negotiated or naming no queue is ignored and logged.
//!
//! MSI-X follows the PCI rules ([`gpu_pv::msix`]): a message for a masked entry (or
//! a masked function) sets the entry's bit in the Pending Bit Array (BAR1 + 0x800)
//! and is sent when the driver unmasks it; the VM collects such released vectors
//! with [`VirtioGpuDevice::take_released`] and injects them like any other.

use gpu_pv::abi;
use gpu_pv::mediator::QueueId;
use gpu_pv::memory::Gpa;
use gpu_pv::msix::{MsixTable, Signal};
use gpu_pv::ring::QueueLayout;
use gpu_pv::wire::feature;
use log::{info, warn};
use virtio_pci::{cap, common, pci, status, MSI_NO_VECTOR, VENDOR_ID};

use crate::ioapic::{Delivery, DeliveryMode, Destination};

/// Guest-physical base of BAR4 (virtio structures).
pub const BAR4_BASE: u64 = 0xc000_0000;
/// BAR4 size.
pub const BAR4_SIZE: u64 = 0x4000;
/// Guest-physical base of BAR1 (MSI-X table and PBA).
pub const BAR1_BASE: u64 = 0xc001_0000;
/// BAR1 size.
pub const BAR1_SIZE: u64 = 0x1000;
/// Device number on bus 0.
pub const DEVICE: u8 = 1;
/// MSI-X vectors (config, control queue, cursor queue).
pub const MSIX_VECTORS: usize = 3;
/// Offset of the Pending Bit Array in BAR1.
const PBA_OFFSET: u64 = 0x800;
const NOTIFY_MULTIPLIER: u32 = 4;
/// The high halves of the 64-bit queue addresses (a driver may access them as two
/// 32-bit halves, virtio 1.2, 4.1.3.1).
const QUEUE_DESC_HI: u64 = common::QUEUE_DESC + 4;
const QUEUE_DRIVER_HI: u64 = common::QUEUE_DRIVER + 4;
const QUEUE_DEVICE_HI: u64 = common::QUEUE_DEVICE + 4;
const QUEUE_SIZES: [u16; 2] = [
    abi::limits::CONTROL_QUEUE_SIZE,
    abi::limits::CURSOR_QUEUE_SIZE,
];

/// Features the device offers.
pub fn offered_features() -> u64 {
    feature::bit(feature::VERSION_1)
        | feature::bit(feature::GPU_EDID)
        | feature::bit(feature::RING_INDIRECT_DESC)
        | feature::bit(feature::RING_EVENT_IDX)
        | feature::bit(feature::RING_RESET)
        | feature::bit(abi::feature::GPUPV_V1)
        | feature::bit(abi::feature::GPUPV_V2)
}

#[derive(Clone, Copy, Debug, Default)]
struct VirtQueue {
    size: u16,
    msix: u16,
    enabled: bool,
    /// Reset by the driver (`queue_reset`) and not re-enabled since.
    reset: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// What the VM must do after an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing more.
    None,
    /// A doorbell on this queue.
    Notify(QueueId),
    /// The driver wrote DRIVER_OK: start the context with these queues.
    Start(QueueLayout, QueueLayout),
    /// The driver reset the device (status 0).
    Reset,
    /// The driver changed a queue's MSI-X vector (or the config vector: `None`).
    Vector(Option<QueueId>, u16),
    /// The driver reset this queue alone (`queue_reset`, RING_RESET).
    QueueReset(QueueId),
    /// The driver re-enabled a reset queue at this layout.
    QueueRestart(QueueId, QueueLayout),
}

/// One VM's virtual virtio-gpu.
pub struct VirtioGpuDevice {
    config: [u8; 256],
    bar_mask: [u32; 6],
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_msix: u16,
    queue_select: u16,
    queues: [VirtQueue; 2],
    msix: MsixTable<MSIX_VECTORS>,
    /// MSI-X entries whose pending message an unmask released, not yet injected.
    released: u64,
    isr: u8,
    events_read: u32,
    num_scanouts: u32,
    /// Negotiated GPU-PV protocol revision, once FEATURES_OK is accepted.
    pub revision: Option<u32>,
    /// The mediator reset the channel: the status shows DEVICE_NEEDS_RESET until the
    /// driver resets the device.
    pub needs_reset: bool,
}

/// `gpa`'s offset in the range of `size` bytes at `base`, if it is inside. No
/// `base + size`: a BAR may end exactly at 2^64.
fn offset_in(base: u64, size: u64, gpa: u64) -> Option<u64> {
    gpa.checked_sub(base).filter(|&off| off < size)
}

/// The low `size` bytes of `v` (8 or more: all of it).
fn cut(v: u64, size: u8) -> u64 {
    match size {
        0..=7 => v & ((1u64 << (8 * u32::from(size))) - 1),
        _ => v,
    }
}

fn put16(c: &mut [u8], o: usize, v: u16) {
    c[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(c: &mut [u8], o: usize, v: u32) {
    c[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

impl VirtioGpuDevice {
    /// A device showing `num_scanouts` displays.
    pub fn new(num_scanouts: u32) -> Self {
        let mut c = [0u8; 256];
        put16(&mut c, 0x00, VENDOR_ID);
        put16(&mut c, 0x02, 0x1050);
        put16(&mut c, 0x06, 0x0010); // status: capability list
        c[0x08] = 1; // revision
        c[0x09] = 0x00;
        c[0x0a] = 0x80; // display controller: other
        c[0x0b] = 0x03;
        put32(&mut c, 0x14, BAR1_BASE as u32); // BAR1: 32-bit memory
        put32(&mut c, 0x20, (BAR4_BASE as u32) | 0x4 | 0x8); // BAR4: 64-bit prefetchable
        put32(&mut c, 0x24, (BAR4_BASE >> 32) as u32);
        put16(&mut c, 0x2c, VENDOR_ID);
        put16(&mut c, 0x2e, 0x1100);
        c[0x34] = 0x40;
        // Interrupt pin 0: no INTx, MSI-X only (a pin sends Linux looking for a
        // routing the platform does not have: "can't find IRQ for PCI INT A").
        c[0x3d] = 0;
        // MSI-X capability.
        c[0x40] = pci::CAP_MSIX;
        c[0x41] = 0x50;
        put16(&mut c, 0x42, (MSIX_VECTORS - 1) as u16);
        put32(&mut c, 0x44, 1); // table at BAR1 + 0
        put32(&mut c, 0x48, 0x800 | 1); // PBA at BAR1 + 0x800
                                        // virtio vendor capabilities: (offset, next, length, type, bar offset, length).
        let caps: [(usize, u8, u8, u8, u32, u32); 4] = [
            (0x50, 0x60, cap::LEN, cap::COMMON, 0x0000, 0x1000),
            (0x60, 0x74, cap::NOTIFY_LEN, cap::NOTIFY, 0x3000, 0x1000),
            (0x74, 0x84, cap::LEN, cap::ISR, 0x1000, 0x1000),
            (0x84, 0x00, cap::LEN, cap::DEVICE, 0x2000, 0x1000),
        ];
        for (o, next, len, ty, off, size) in caps {
            c[o] = pci::CAP_VENDOR;
            c[o + 1] = next;
            c[o + 2] = len;
            c[o + 3] = ty;
            c[o + 4] = 4; // BAR4
            put32(&mut c, o + 8, off);
            put32(&mut c, o + 12, size);
            if ty == cap::NOTIFY {
                put32(&mut c, o + 16, NOTIFY_MULTIPLIER);
            }
        }
        let mut bar_mask = [0u32; 6];
        bar_mask[1] = !(BAR1_SIZE as u32 - 1);
        bar_mask[4] = !(BAR4_SIZE as u32 - 1);
        bar_mask[5] = u32::MAX;
        Self {
            config: c,
            bar_mask,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_msix: MSI_NO_VECTOR,
            queue_select: 0,
            // queue_size reads the largest size the device supports until the
            // driver writes a smaller one (virtio 1.2, 4.1.4.3).
            queues: [
                VirtQueue {
                    size: QUEUE_SIZES[0],
                    msix: MSI_NO_VECTOR,
                    ..VirtQueue::default()
                },
                VirtQueue {
                    size: QUEUE_SIZES[1],
                    msix: MSI_NO_VECTOR,
                    ..VirtQueue::default()
                },
            ],
            msix: MsixTable::new(),
            released: 0,
            isr: 0,
            events_read: 0,
            num_scanouts,
            revision: None,
            needs_reset: false,
        }
    }

    fn cfg32(&self, o: usize) -> u32 {
        u32::from_le_bytes([
            self.config[o],
            self.config[o + 1],
            self.config[o + 2],
            self.config[o + 3],
        ])
    }

    /// Where BAR4 and BAR1 are now (the guest may move them).
    fn bars(&self) -> (u64, u64) {
        let bar4 = (u64::from(self.cfg32(0x20)) & !0xf) | (u64::from(self.cfg32(0x24)) << 32);
        let bar1 = u64::from(self.cfg32(0x14)) & !0xf;
        (bar4, bar1)
    }

    /// Whether `gpa` is one of this device's MMIO ranges.
    pub fn claims(&self, gpa: u64) -> bool {
        let (b4, b1) = self.bars();
        offset_in(b4, BAR4_SIZE, gpa).is_some() || offset_in(b1, BAR1_SIZE, gpa).is_some()
    }

    /// Configuration-space read of `size` bytes (at most 8: an 8-byte `mov` on the
    /// ECAM window reads two dwords) at `off` for function 00:`dev`.`func`. Bytes
    /// past the 256 of config space, or of an absent function, read 0xff.
    pub fn config_read(&self, dev: u8, func: u8, off: u16, size: u8) -> u64 {
        let size = usize::from(size.min(8));
        if dev != DEVICE || func != 0 {
            return cut(u64::MAX, size as u8);
        }
        let o = usize::from(off);
        (0..size).fold(0u64, |v, i| {
            let byte = self.config.get(o + i).copied().unwrap_or(0xff);
            v | u64::from(byte) << (8 * i)
        })
    }

    /// Configuration-space write (command register, BARs, MSI-X enable).
    pub fn config_write(&mut self, dev: u8, func: u8, off: u16, size: u8, v: u32) {
        if dev != DEVICE || func != 0 {
            return;
        }
        match (off, size) {
            (0x04, 2 | 4) => put16(&mut self.config, 0x04, (v as u16) & 0x0406),
            (0x10..=0x27, 4) if off.is_multiple_of(4) => {
                let i = ((off - 0x10) / 4) as usize;
                let mask = self.bar_mask[i];
                let flags = self.cfg32(off as usize) & !mask & 0xf;
                let new = if mask == 0 { 0 } else { (v & mask) | flags };
                put32(&mut self.config, off as usize, new);
            }
            (0x42, 2) | (0x40, 4) => {
                let ctrl = if off == 0x40 {
                    (v >> 16) as u16
                } else {
                    v as u16
                };
                let keep = (MSIX_VECTORS - 1) as u16;
                put16(&mut self.config, 0x42, (ctrl & 0xc000) | keep);
                // Enabling MSI-X or clearing the function mask may release pending
                // messages.
                self.released |= self
                    .msix
                    .set_control(ctrl & 0x8000 != 0, ctrl & 0x4000 != 0);
            }
            _ => {}
        }
    }

    /// Reads `size` bytes at `gpa` (inside [`claims`](Self::claims); elsewhere all
    /// ones, as from no device). The value has no more than `size` bytes.
    pub fn mmio_read(&mut self, gpa: u64, size: u8) -> u64 {
        cut(self.bar_read(gpa, size), size)
    }

    fn bar_read(&mut self, gpa: u64, size: u8) -> u64 {
        let (b4, b1) = self.bars();
        if let Some(off) = offset_in(b1, BAR1_SIZE, gpa) {
            return self.msix_read(off, size);
        }
        let Some(off) = offset_in(b4, BAR4_SIZE, gpa) else {
            return u64::MAX;
        };
        match off {
            0x0000..=0x0fff => self.common_read(off, size),
            0x1000..=0x1fff => {
                let v = self.isr;
                self.isr = 0;
                u64::from(v)
            }
            0x2000..=0x2fff => {
                let regs = [self.events_read, 0, self.num_scanouts, 0];
                let i = ((off - 0x2000) / 4) as usize;
                regs.get(i).map_or(0, |&r| u64::from(r))
            }
            _ => 0,
        }
    }

    /// Writes `size` bytes at `gpa`; returns what the VM must do next (nothing
    /// outside [`claims`](Self::claims)).
    pub fn mmio_write(&mut self, gpa: u64, size: u8, v: u64) -> Action {
        let (b4, b1) = self.bars();
        if let Some(off) = offset_in(b1, BAR1_SIZE, gpa) {
            self.msix_write(off, size, v);
            return Action::None;
        }
        let Some(off) = offset_in(b4, BAR4_SIZE, gpa) else {
            return Action::None;
        };
        match off {
            0x0000..=0x0fff => self.common_write(off, size, v),
            0x2000..=0x2fff => {
                if off == 0x2004 {
                    self.events_read &= !(v as u32);
                }
                Action::None
            }
            0x3000..=0x3fff => {
                let q = ((off - 0x3000) / u64::from(NOTIFY_MULTIPLIER)) as u16;
                match QueueId::from_index(q) {
                    // A queue being reset is not served until it is enabled again.
                    Some(q)
                        if self.live()
                            && self.queues.get(q.index()).is_some_and(|vq| !vq.reset) =>
                    {
                        Action::Notify(q)
                    }
                    _ => Action::None,
                }
            }
            _ => Action::None,
        }
    }

    fn common_read(&self, off: u64, size: u8) -> u64 {
        let q = self.queues.get(self.queue_select as usize);
        let v: u64 = match off {
            common::DEVICE_FEATURE_SELECT => u64::from(self.device_feature_select),
            common::DEVICE_FEATURE => match self.device_feature_select {
                0 => offered_features() & 0xffff_ffff,
                1 => offered_features() >> 32,
                _ => 0,
            },
            common::DRIVER_FEATURE_SELECT => u64::from(self.driver_feature_select),
            common::DRIVER_FEATURE => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            common::CONFIG_MSIX_VECTOR => u64::from(self.config_msix),
            common::NUM_QUEUES => 2,
            common::DEVICE_STATUS => u64::from(
                self.status
                    | if self.needs_reset {
                        status::DEVICE_NEEDS_RESET
                    } else {
                        0
                    },
            ),
            common::CONFIG_GENERATION => 0,
            common::QUEUE_SELECT => u64::from(self.queue_select),
            common::QUEUE_SIZE => q.map_or(0, |q| u64::from(q.size)),
            common::QUEUE_MSIX_VECTOR => q.map_or(MSI_NO_VECTOR.into(), |q| u64::from(q.msix)),
            common::QUEUE_ENABLE => q.map_or(0, |q| u64::from(q.enabled)),
            common::QUEUE_NOTIFY_OFF => u64::from(self.queue_select),
            common::QUEUE_DESC => q.map_or(0, |q| q.desc),
            QUEUE_DESC_HI => q.map_or(0, |q| q.desc >> 32),
            common::QUEUE_DRIVER => q.map_or(0, |q| q.driver),
            QUEUE_DRIVER_HI => q.map_or(0, |q| q.driver >> 32),
            common::QUEUE_DEVICE => q.map_or(0, |q| q.device),
            QUEUE_DEVICE_HI => q.map_or(0, |q| q.device >> 32),
            // queue_reset: a reset completes within the write that asks for it.
            common::QUEUE_RESET => 0,
            _ => 0,
        };
        match size {
            1 => v & 0xff,
            2 => v & 0xffff,
            4 => v & 0xffff_ffff,
            _ => v,
        }
    }

    fn common_write(&mut self, off: u64, size: u8, v: u64) -> Action {
        let sel = self.queue_select as usize;
        match off {
            common::DEVICE_FEATURE_SELECT => self.device_feature_select = v as u32,
            common::DRIVER_FEATURE_SELECT => self.driver_feature_select = v as u32,
            // Feature bits are fixed once FEATURES_OK is set.
            common::DRIVER_FEATURE if self.status & status::FEATURES_OK == 0 => {
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return Action::None,
                };
                self.driver_features = (self.driver_features & !(0xffff_ffffu64 << shift))
                    | ((v & 0xffff_ffff) << shift);
            }
            common::CONFIG_MSIX_VECTOR => {
                self.config_msix = if (v as usize) < MSIX_VECTORS {
                    v as u16
                } else {
                    MSI_NO_VECTOR
                };
                return Action::Vector(None, self.config_msix);
            }
            common::DEVICE_STATUS => return self.write_status(v as u8),
            common::QUEUE_SELECT => self.queue_select = v as u16,
            common::QUEUE_SIZE => {
                if let Some(q) = self.queues.get_mut(sel) {
                    // A power of two no larger than what the device offers.
                    let s = v as u16;
                    if s.is_power_of_two() && s <= QUEUE_SIZES[sel] {
                        q.size = s;
                    }
                }
            }
            common::QUEUE_MSIX_VECTOR => {
                if let (Some(q), Some(id)) =
                    (self.queues.get_mut(sel), QueueId::from_index(sel as u16))
                {
                    // An entry past the table reads back as NO_VECTOR (virtio 1.2, 4.1.4.3).
                    q.msix = if (v as usize) < MSIX_VECTORS {
                        v as u16
                    } else {
                        MSI_NO_VECTOR
                    };
                    return Action::Vector(Some(id), q.msix);
                }
            }
            common::QUEUE_ENABLE => return self.write_queue_enable(v & 1 != 0),
            common::QUEUE_RESET => return self.write_queue_reset(v),
            common::QUEUE_DESC
            | QUEUE_DESC_HI
            | common::QUEUE_DRIVER
            | QUEUE_DRIVER_HI
            | common::QUEUE_DEVICE
            | QUEUE_DEVICE_HI => {
                if let Some(q) = self.queues.get_mut(sel) {
                    let (field, high) = match off {
                        common::QUEUE_DESC => (&mut q.desc, false),
                        QUEUE_DESC_HI => (&mut q.desc, true),
                        common::QUEUE_DRIVER => (&mut q.driver, false),
                        QUEUE_DRIVER_HI => (&mut q.driver, true),
                        common::QUEUE_DEVICE => (&mut q.device, false),
                        _ => (&mut q.device, true),
                    };
                    if size == 8 {
                        *field = v;
                    } else if high {
                        *field = (*field & 0xffff_ffff) | ((v & 0xffff_ffff) << 32);
                    } else {
                        *field = (*field & !0xffff_ffff) | (v & 0xffff_ffff);
                    }
                }
            }
            _ => {}
        }
        Action::None
    }

    fn negotiated(&self, bit: u32) -> bool {
        self.status & status::FEATURES_OK != 0 && self.driver_features & feature::bit(bit) != 0
    }

    fn layout(&self, q: &VirtQueue) -> QueueLayout {
        // Trust boundary: the ring addresses the driver wrote into the queue
        // registers are guest-physical; the mediator checks them before any use.
        QueueLayout {
            size: q.size,
            desc: Gpa::new(q.desc),
            avail: Gpa::new(q.driver),
            used: Gpa::new(q.device),
            event_idx: self.driver_features & feature::bit(feature::RING_EVENT_IDX) != 0,
            indirect: self.driver_features & feature::bit(feature::RING_INDIRECT_DESC) != 0,
        }
    }

    /// `queue_enable`: before DRIVER_OK it records the driver's choice; after it, only
    /// a queue reset by `queue_reset` may be enabled (again), which restarts it.
    fn write_queue_enable(&mut self, on: bool) -> Action {
        let sel = self.queue_select;
        let live = self.live();
        let Some(q) = self.queues.get_mut(sel as usize) else {
            warn!("virtio-gpu: queue_enable of queue {sel}, which does not exist: ignored");
            return Action::None;
        };
        if !live {
            q.enabled = on;
            return Action::None;
        }
        if !on || !q.reset {
            warn!(
                "virtio-gpu: queue_enable={} on live queue {sel} (not reset): ignored",
                u8::from(on)
            );
            return Action::None;
        }
        q.enabled = true;
        q.reset = false;
        let q = *q;
        match QueueId::from_index(sel) {
            Some(id) => Action::QueueRestart(id, self.layout(&q)),
            None => Action::None,
        }
    }

    /// `queue_reset` (RING_RESET): 1 resets the selected queue, once the device is
    /// live and the feature negotiated.
    fn write_queue_reset(&mut self, v: u64) -> Action {
        let sel = self.queue_select;
        if v & 1 == 0 {
            return Action::None;
        }
        if !self.live() {
            warn!("virtio-gpu: queue_reset of queue {sel} before DRIVER_OK: ignored");
            return Action::None;
        }
        if !self.negotiated(feature::RING_RESET) {
            warn!("virtio-gpu: queue_reset of queue {sel} without RING_RESET negotiated: ignored");
            return Action::None;
        }
        let (Some(q), Some(id)) = (self.queues.get_mut(sel as usize), QueueId::from_index(sel))
        else {
            warn!("virtio-gpu: queue_reset of queue {sel}, which does not exist: ignored");
            return Action::None;
        };
        q.enabled = false;
        q.reset = true;
        Action::QueueReset(id)
    }

    fn write_status(&mut self, v: u8) -> Action {
        if v == 0 {
            // A virtio reset resets the virtio state only: PCI config space, the
            // BARs and the MSI-X table stay as the driver programmed them (a Linux
            // driver does not re-enable MSI-X after a reset).
            let fresh = Self::new(self.num_scanouts);
            self.device_feature_select = 0;
            self.driver_feature_select = 0;
            self.driver_features = 0;
            self.status = 0;
            self.config_msix = fresh.config_msix;
            self.queue_select = 0;
            self.queues = fresh.queues;
            self.isr = 0;
            self.events_read = 0;
            self.revision = None;
            self.needs_reset = false;
            return Action::Reset;
        }
        let newly = v & !self.status;
        if newly & status::FEATURES_OK != 0 {
            let ok = self.driver_features & !offered_features() == 0
                && self.driver_features & feature::bit(feature::VERSION_1) != 0;
            if !ok {
                warn!("virtio-gpu: driver accepted features {:#x} outside the offer (or without VERSION_1)", self.driver_features);
                self.status = v & !status::FEATURES_OK;
                return Action::None;
            }
            self.revision = abi::negotiate_revision(offered_features(), self.driver_features);
        }
        self.status = v
            & (status::ACKNOWLEDGE
                | status::DRIVER
                | status::FEATURES_OK
                | status::DRIVER_OK
                | status::FAILED);
        if newly & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 {
            info!(
                "virtio-gpu: driver ok, features {:#x}, GPU-PV protocol {}",
                self.driver_features,
                match self.revision {
                    Some(r) => alloc::format!("v{r}"),
                    None => alloc::string::String::from("none (plain virtio-gpu)"),
                }
            );
            return Action::Start(self.layout(&self.queues[0]), self.layout(&self.queues[1]));
        }
        Action::None
    }

    fn msix_read(&self, off: u64, size: u8) -> u64 {
        if off >= PBA_OFFSET {
            return self.msix.read_pba(off - PBA_OFFSET, size);
        }
        self.msix.read(off, size)
    }

    fn msix_write(&mut self, off: u64, size: u8, v: u64) {
        if off >= PBA_OFFSET {
            warn!(
                "virtio-gpu: write of {v:#x} to the read-only MSI-X PBA at +{:#x}: ignored",
                off - PBA_OFFSET
            );
            return;
        }
        self.released |= self.msix.write(off, size, v);
    }

    /// The interrupt MSI-X entry `entry`'s message stands for, if it is one this VM's
    /// local APICs take: address 0xFEEx_xxxx (destination id in bits 19:12, logical
    /// destination mode in bit 2), fixed or lowest-priority delivery (data bits 10:8),
    /// vector (data bits 7:0) 16 or above. Anything else is dropped without a log line
    /// (it would be one per completion).
    fn message_of(&self, entry: usize) -> Option<Delivery> {
        let (addr, data) = self.msix.message(entry)?;
        let vector = (data & 0xff) as u8;
        let dest_id = (addr >> 12) as u8;
        let dest = if addr & (1 << 2) != 0 {
            Destination::Logical(dest_id)
        } else {
            Destination::Physical(dest_id)
        };
        let mode = match (data >> 8) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            _ => return None,
        };
        (addr >> 20 == 0xfee && vector >= 16).then_some(Delivery {
            vector,
            dest,
            mode,
            level: false,
        })
    }

    /// Raises MSI-X entry `entry` (a queue's or the config vector): returns the
    /// interrupt to deliver (vector and destination local APICs), or `None` if the
    /// message is held pending (entry or function masked: it is sent by the unmask,
    /// see [`take_released`](Self::take_released)), MSI-X is off, or the entry is not
    /// programmed with a usable message.
    pub fn raise(&mut self, entry: u16, config_change: bool) -> Option<Delivery> {
        self.isr |= if config_change { 2 } else { 1 };
        if config_change {
            self.events_read |= 1;
        }
        match self.msix.signal(entry as usize) {
            Signal::Send(..) => self.message_of(entry as usize),
            Signal::Pending | Signal::Dropped => None,
        }
    }

    /// Whether an unmask released pending messages not yet taken.
    pub fn has_released(&self) -> bool {
        self.released != 0
    }

    /// Takes the interrupts of the pending messages that an unmask (of an entry, of
    /// the function, or MSI-X enable) released since the last call, to deliver.
    pub fn take_released(&mut self) -> alloc::vec::Vec<Delivery> {
        let bits = core::mem::take(&mut self.released);
        (0..MSIX_VECTORS)
            .filter(|i| bits & (1 << i) != 0)
            .filter_map(|i| self.message_of(i))
            .collect()
    }

    /// Whether the device is live (DRIVER_OK set).
    pub fn live(&self) -> bool {
        self.status & status::DRIVER_OK != 0
    }

    /// The config vector entry.
    pub fn config_vector(&self) -> u16 {
        self.config_msix
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device the driver brought to DRIVER_OK with `features`, MSI-X enabled and
    /// entry `i` sending vector 0x40 + i.
    fn live(features: u64) -> VirtioGpuDevice {
        let mut d = VirtioGpuDevice::new(1);
        d.config_write(DEVICE, 0, 0x42, 2, 0x8000);
        for i in 0..MSIX_VECTORS as u64 {
            d.mmio_write(BAR1_BASE + i * 16, 4, 0xfee0_0000);
            d.mmio_write(BAR1_BASE + i * 16 + 8, 4, 0x40 + i);
            d.mmio_write(BAR1_BASE + i * 16 + 12, 4, 0);
        }
        let common = BAR4_BASE;
        d.mmio_write(
            common + 0x14,
            1,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
        );
        d.mmio_write(common + 0x08, 4, 0);
        d.mmio_write(common + 0x0c, 4, features & 0xffff_ffff);
        d.mmio_write(common + 0x08, 4, 1);
        d.mmio_write(common + 0x0c, 4, features >> 32);
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        d.mmio_write(common + 0x14, 1, u64::from(ok));
        for q in 0..2u64 {
            d.mmio_write(common + 0x16, 2, q);
            d.mmio_write(common + 0x1a, 2, q + 1);
            d.mmio_write(common + 0x20, 8, 0x10_0000 + q * 0x1_0000);
            d.mmio_write(common + 0x28, 8, 0x10_4000 + q * 0x1_0000);
            d.mmio_write(common + 0x30, 8, 0x10_8000 + q * 0x1_0000);
            d.mmio_write(common + 0x1c, 2, 1);
        }
        let action = d.mmio_write(common + 0x14, 1, u64::from(ok | status::DRIVER_OK));
        assert!(matches!(action, Action::Start(..)), "{action:?}");
        d
    }

    fn all_features() -> u64 {
        offered_features()
    }

    #[test]
    fn identity_and_capabilities() {
        let d = VirtioGpuDevice::new(2);
        assert_eq!(d.config_read(DEVICE, 0, 0, 4), 0x1050_1af4);
        assert_eq!(d.config_read(DEVICE, 1, 0, 4), 0xffff_ffff, "function 1");
        assert_eq!(d.config_read(DEVICE + 1, 0, 0, 2), 0xffff, "no device");
        assert_eq!(d.config_read(DEVICE, 0, 0x34, 1), 0x40);
        assert_eq!(
            d.config_read(DEVICE, 0, 0xff, 4),
            0xffff_ff00,
            "past the end reads ones"
        );
        assert!(d.claims(BAR4_BASE) && d.claims(BAR4_BASE + BAR4_SIZE - 1));
        assert!(!d.claims(BAR4_BASE + BAR4_SIZE) && !d.claims(BAR4_BASE - 1));
        assert!(d.claims(BAR1_BASE + 0x800));
    }

    /// An 8-byte config read (a 64-bit `mov` into ECAM) used to shift a u32 by 32.
    #[test]
    fn eight_byte_config_read_returns_two_dwords() {
        let d = VirtioGpuDevice::new(1);
        let bar4 = d.config_read(DEVICE, 0, 0x20, 8);
        assert_eq!(bar4, BAR4_BASE | 0xc);
        let ids = d.config_read(DEVICE, 0, 0, 8);
        assert_eq!(ids, 0x0010_0000_1050_1af4);
        // Across the end of the 256 bytes: the missing bytes read 0xff.
        let tail = d.config_read(DEVICE, 0, 0xfc, 8);
        assert_eq!(tail >> 32, 0xffff_ffff);
        assert_eq!(d.config_read(DEVICE, 1, 0, 8), u64::MAX);
    }

    /// BAR4 sized with all ones sits at 0xffff_ffff_ffff_c000: its end is 2^64, which
    /// used to overflow (or wrap to an empty range).
    #[test]
    fn bar4_at_the_top_of_the_address_space() {
        let mut d = VirtioGpuDevice::new(1);
        d.config_write(DEVICE, 0, 0x20, 4, u32::MAX);
        d.config_write(DEVICE, 0, 0x24, 4, u32::MAX);
        assert_eq!(
            d.config_read(DEVICE, 0, 0x20, 4),
            0xffff_c00c,
            "size and flags"
        );
        let base = 0xffff_ffff_ffff_c000u64;
        assert!(d.claims(base));
        assert!(d.claims(u64::MAX));
        assert!(!d.claims(base - 1));
        assert!(!d.claims(0), "no wrap to address 0");
        assert_eq!(d.mmio_read(base + 0x12, 2), 2, "num_queues");
        assert_eq!(d.mmio_read(u64::MAX, 1), 0);
    }

    /// Accesses outside both BARs (the kernel checks `claims` first, but a stale
    /// check after a BAR moved must not underflow) read all ones and do nothing.
    #[test]
    fn unclaimed_access_is_defined() {
        let mut d = live(all_features());
        assert_eq!(d.mmio_read(0, 4), 0xffff_ffff);
        assert_eq!(d.mmio_read(BAR4_BASE - 8, 8), u64::MAX);
        assert_eq!(d.mmio_write(0, 4, 0), Action::None);
        assert_eq!(d.mmio_write(BAR4_BASE - 1, 1, 0), Action::None);
    }

    /// Reads return no more bytes than asked for, whichever register.
    #[test]
    fn reads_are_cut_to_their_size() {
        let mut d = live(all_features());
        d.mmio_write(BAR1_BASE, 8, 0x1234_5678_fee0_0000);
        assert_eq!(d.mmio_read(BAR1_BASE, 8), 0x1234_5678_fee0_0000);
        assert_eq!(d.mmio_read(BAR1_BASE, 1), 0x00);
        assert_eq!(d.mmio_read(BAR1_BASE + 2, 2), 0, "not a field: 0");
        assert_eq!(d.mmio_read(BAR1_BASE, 2), 0);
        assert_eq!(
            d.mmio_read(BAR4_BASE + 0x20, 4),
            0x11_0000,
            "queue 1's desc"
        );
    }

    #[test]
    fn notify_and_queue_reset() {
        let mut d = live(all_features());
        assert!(d.live());
        assert_eq!(d.revision, Some(2));
        assert_eq!(
            d.mmio_write(BAR4_BASE + 0x3000, 2, 0),
            Action::Notify(QueueId::Control)
        );
        assert_eq!(
            d.mmio_write(BAR4_BASE + 0x3004, 2, 1),
            Action::Notify(QueueId::Cursor)
        );
        assert_eq!(d.mmio_write(BAR4_BASE + 0x3008, 2, 2), Action::None);
        d.mmio_write(BAR4_BASE + 0x16, 2, 1);
        assert_eq!(
            d.mmio_write(BAR4_BASE + 0x3a, 2, 1),
            Action::QueueReset(QueueId::Cursor)
        );
        assert_eq!(d.mmio_read(BAR4_BASE + 0x1c, 2), 0);
        assert_eq!(d.mmio_write(BAR4_BASE + 0x3004, 2, 1), Action::None);
        assert!(matches!(
            d.mmio_write(BAR4_BASE + 0x1c, 2, 1),
            Action::QueueRestart(QueueId::Cursor, _)
        ));
        assert_eq!(d.mmio_write(BAR4_BASE + 0x14, 1, 0), Action::Reset);
        assert!(!d.live());
    }

    /// The fixed, physical-destination interrupt of `vector` for APIC `id`.
    fn to_apic(id: u8, vector: u8) -> Delivery {
        Delivery {
            vector,
            dest: Destination::Physical(id),
            mode: DeliveryMode::Fixed,
            level: false,
        }
    }

    #[test]
    fn a_message_goes_where_its_address_says() {
        let mut d = live(all_features());
        // Entry 1 to APIC 1 (physical), entry 2 to logical mask 0x02, lowest priority.
        d.mmio_write(BAR1_BASE + 16, 4, 0xfee0_1000);
        d.mmio_write(BAR1_BASE + 32, 4, 0xfee0_2004);
        d.mmio_write(BAR1_BASE + 32 + 8, 4, 0x142);
        assert_eq!(d.raise(1, false), Some(to_apic(1, 0x41)));
        assert_eq!(
            d.raise(2, false),
            Some(Delivery {
                vector: 0x42,
                dest: Destination::Logical(2),
                mode: DeliveryMode::LowestPriority,
                level: false,
            })
        );
        // NMI, SMI and INIT messages are not delivered.
        for mode in [2u64, 4, 5, 7] {
            d.mmio_write(BAR1_BASE + 32 + 8, 4, (mode << 8) | 0x42);
            assert_eq!(d.raise(2, false), None, "mode {mode}");
        }
        // Not the local APICs' window.
        d.mmio_write(BAR1_BASE + 16, 4, 0xfed0_0000);
        assert_eq!(d.raise(1, false), None);
    }

    #[test]
    fn masked_entry_is_held_and_released_by_unmask() {
        let mut d = live(all_features());
        assert_eq!(d.raise(1, false), Some(to_apic(0, 0x41)));
        d.mmio_write(BAR1_BASE + 16 + 12, 4, 1);
        assert_eq!(d.raise(1, false), None);
        assert_eq!(d.mmio_read(BAR1_BASE + PBA_OFFSET, 8), 0b10);
        d.mmio_write(BAR1_BASE + 16 + 12, 4, 0);
        assert!(d.has_released());
        assert_eq!(d.take_released(), alloc::vec![to_apic(0, 0x41)]);
        assert_eq!(d.raise(0xffff, true), None, "NO_VECTOR");
        assert_eq!(d.raise(7, false), None, "no such entry");
    }
}
