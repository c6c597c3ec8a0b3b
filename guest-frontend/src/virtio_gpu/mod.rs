//! A `no_std` virtio-gpu frontend driver over the modern virtio-pci transport, shaped
//! after Linux's `virtio_gpu` DRM driver (see `LINUX-VIRTIO-GPU.md`):
//!
//! - discovery: 1af4:1050 on bus 0 through ECAM ([`crate::pci`]), the virtio vendor
//!   capabilities for the common, notify, ISR and device regions ([`transport`]);
//! - initialisation with the device status sequence 0, 1, 3, 11, 15: reset,
//!   ACKNOWLEDGE, DRIVER, feature negotiation (VERSION_1, EDID, RING_INDIRECT_DESC,
//!   RING_EVENT_IDX and the GPU-PV revision bits when offered), FEATURES_OK (checked
//!   that it stuck), MSI-X (three table entries to the local APIC: configuration
//!   changes on [`CONFIG_VECTOR`], the control queue on [`CONTROL_VECTOR`], the cursor
//!   queue on [`CURSOR_VECTOR`]), both queues (control 0 with 64 entries, cursor 1
//!   with 16, rings in this guest's RAM, driven by `gpu_pv::ring::driver::DriverQueue`),
//!   then DRIVER_OK;
//! - every control command goes through an INDIRECT descriptor (one readable and one
//!   writable buffer; `RESOURCE_ATTACH_BACKING` two readable: header, then entries),
//!   cursor commands through one direct readable descriptor; one notify per batch,
//!   skipped when the device's event index says it does not want one;
//! - completions are waited for by interrupt: the driver publishes its used-event
//!   index and halts with interrupts on until the queue's vector handler ran (a
//!   20 Hz local APIC tick bounds each wait, see [`Stats::found_without_interrupt`]);
//!   every response type is checked, and fenced commands must come back with their
//!   fence id.
//!
//! [`display`] builds on this: framebuffers, the cursor, presenting frames.

pub mod app;
pub mod display;
pub mod transport;

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use gpu_pv::command::{self, Command, DecodeError, Request, Response};
use gpu_pv::memory::{Gpa, GuestMemory};
use gpu_pv::ring::driver::DriverQueue;
use gpu_pv::ring::{QueueLayout, RingError};
use gpu_pv::wire::{self, feature, CtrlHdr, CursorPos, MemEntry, Rect};

use crate::abi;
use crate::dma::{self, GuestRam};
use crate::idt::{self, DEVICE_VECTOR_BASE};
use crate::pci::{self, Function};
use crate::{cpu, println, timer};

pub use transport::{TransportError, VirtioPci};

/// PCI vendor id of virtio devices.
pub use virtio_pci::VENDOR_ID;
/// PCI device id of a modern virtio-gpu (0x1040 + device type 16).
pub const DEVICE_ID: u16 = 0x1050;

/// Device status bits (virtio 1.2, 2.1): the `virtio-pci` crate's.
pub use virtio_pci::status;

/// Queue index of the control queue.
pub const CONTROL_QUEUE: u16 = 0;
/// Queue index of the cursor queue.
pub const CURSOR_QUEUE: u16 = 1;

/// Guest vector of configuration-change interrupts (MSI-X entry 0).
pub const CONFIG_VECTOR: u8 = DEVICE_VECTOR_BASE;
/// Guest vector of control-queue interrupts (MSI-X entry 1).
pub const CONTROL_VECTOR: u8 = DEVICE_VECTOR_BASE + 1;
/// Guest vector of cursor-queue interrupts (MSI-X entry 2).
pub const CURSOR_VECTOR: u8 = DEVICE_VECTOR_BASE + 2;
const CONFIG_ENTRY: u16 = 0;
const CONTROL_ENTRY: u16 = 1;
const CURSOR_ENTRY: u16 = 2;

/// The feature bits this driver accepts when the device offers them.
pub const WANTED_FEATURES: u64 = feature::bit(feature::VERSION_1)
    | feature::bit(feature::GPU_EDID)
    | feature::bit(feature::RING_INDIRECT_DESC)
    | feature::bit(feature::RING_EVENT_IDX)
    | feature::bit(abi::feature::GPUPV_V1)
    | feature::bit(abi::feature::GPUPV_V2);

/// Rate of the local APIC tick that bounds waits.
pub const TICK_HZ: u32 = 20;
/// How long one wait for the device may take before it is reported as a timeout.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;

/// Device configuration (`struct virtio_gpu_config`) offsets.
pub mod config {
    /// u32 events_read.
    pub const EVENTS_READ: u64 = 0;
    /// u32 events_clear.
    pub const EVENTS_CLEAR: u64 = 4;
    /// u32 num_scanouts.
    pub const NUM_SCANOUTS: u64 = 8;
    /// u32 num_capsets.
    pub const NUM_CAPSETS: u64 = 12;
    /// `VIRTIO_GPU_EVENT_DISPLAY`.
    pub const EVENT_DISPLAY: u32 = 1;
}

/// Queue sizes this driver asks for (Linux's).
const QUEUE_WANTED: [u16; 2] = [64, 16];
/// Bytes of one control command slot: indirect table, response, request.
const SLOT_BYTES: u64 = 4096;
const SLOT_TABLE: u64 = 0;
const SLOT_RESPONSE: u64 = 64;
const SLOT_REQUEST: u64 = 1152;
/// Largest request a control slot holds (ATTACH_BACKING with 182 entries).
pub const MAX_REQUEST: usize = (SLOT_BYTES - SLOT_REQUEST) as usize;
const MAX_RESPONSE: u32 = (SLOT_REQUEST - SLOT_RESPONSE) as u32;
/// Bytes of one cursor command slot.
const CURSOR_SLOT_BYTES: u64 = 64;
const NO_SLOT: u16 = u16::MAX;

/// A human name for a response type (`OK_NODATA`, `ERR_INVALID_RESOURCE_ID`, ...).
pub fn response_name(t: u32) -> &'static str {
    match t {
        wire::RESP_OK_NODATA => "OK_NODATA",
        wire::RESP_OK_DISPLAY_INFO => "OK_DISPLAY_INFO",
        wire::RESP_OK_EDID => "OK_EDID",
        wire::RESP_ERR_UNSPEC => "ERR_UNSPEC",
        wire::RESP_ERR_OUT_OF_MEMORY => "ERR_OUT_OF_MEMORY",
        wire::RESP_ERR_INVALID_SCANOUT_ID => "ERR_INVALID_SCANOUT_ID",
        wire::RESP_ERR_INVALID_RESOURCE_ID => "ERR_INVALID_RESOURCE_ID",
        wire::RESP_ERR_INVALID_CONTEXT_ID => "ERR_INVALID_CONTEXT_ID",
        wire::RESP_ERR_INVALID_PARAMETER => "ERR_INVALID_PARAMETER",
        _ => "unknown",
    }
}

/// A human name for a command type.
pub fn command_name(t: u32) -> &'static str {
    match t {
        wire::CMD_GET_DISPLAY_INFO => "GET_DISPLAY_INFO",
        wire::CMD_RESOURCE_CREATE_2D => "RESOURCE_CREATE_2D",
        wire::CMD_RESOURCE_UNREF => "RESOURCE_UNREF",
        wire::CMD_SET_SCANOUT => "SET_SCANOUT",
        wire::CMD_RESOURCE_FLUSH => "RESOURCE_FLUSH",
        wire::CMD_TRANSFER_TO_HOST_2D => "TRANSFER_TO_HOST_2D",
        wire::CMD_RESOURCE_ATTACH_BACKING => "RESOURCE_ATTACH_BACKING",
        wire::CMD_RESOURCE_DETACH_BACKING => "RESOURCE_DETACH_BACKING",
        wire::CMD_GET_EDID => "GET_EDID",
        wire::CMD_UPDATE_CURSOR => "UPDATE_CURSOR",
        wire::CMD_MOVE_CURSOR => "MOVE_CURSOR",
        _ => "unknown",
    }
}

/// The response size the device writes for a command type.
pub fn response_size(cmd_type: u32) -> u32 {
    (match cmd_type {
        wire::CMD_GET_DISPLAY_INFO => wire::size::RESP_DISPLAY_INFO,
        wire::CMD_GET_EDID => wire::size::RESP_EDID,
        _ => wire::size::RESP_NODATA,
    }) as u32
}

/// What went wrong talking to the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// No 1af4:1050 function on bus 0.
    NoDevice,
    /// The transport's capabilities are missing or broken.
    Transport(TransportError),
    /// The device kept a non-zero status after the reset write (the status read).
    ResetStuck(u8),
    /// The device does not offer VERSION_1 (a legacy device; offered features).
    NotModern(u64),
    /// FEATURES_OK did not stick (offered, accepted, status read back).
    FeaturesRejected {
        /// Offered by the device.
        offered: u64,
        /// Accepted by the driver.
        accepted: u64,
        /// Status read back.
        status: u8,
    },
    /// The MSI-X table has fewer than the three entries the driver needs.
    TooFewVectors(u16),
    /// The device refused an MSI-X entry for the config vector (`None`) or a queue
    /// (it read back `read`).
    VectorRefused {
        /// The queue, or `None` for the config vector.
        queue: Option<u16>,
        /// The entry written.
        wrote: u16,
        /// What reads back.
        read: u16,
    },
    /// The device has fewer queues than a virtio-gpu needs.
    TooFewQueues(u16),
    /// A queue is already enabled before the driver set it up.
    QueueAlreadyEnabled(u16),
    /// The device did not keep the queue size the driver wrote.
    QueueSizeRefused {
        /// Queue index.
        queue: u16,
        /// Size written.
        wrote: u16,
        /// Size read back.
        read: u16,
    },
    /// A queue address did not read back as written.
    QueueAddressRefused(u16),
    /// The notification address of a queue lies outside the notify region.
    BadNotifyOffset(u16),
    /// Guest RAM ran out for rings, buffers or a framebuffer.
    OutOfMemory,
    /// A ring operation failed (the device returned something not in flight, the
    /// queue is full...).
    Ring(RingError),
    /// The request does not fit a command slot.
    RequestTooLarge(usize),
    /// The device shows DEVICE_NEEDS_RESET (the status read; whether a config
    /// interrupt announced it).
    NeedsReset {
        /// The status read.
        status: u8,
        /// Config interrupts taken so far.
        config_irqs: u64,
    },
    /// The device refused DRIVER_OK or failed (status read back).
    NotLive(u8),
    /// A wait ran out of time.
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// Milliseconds waited.
        ms: u64,
        /// Device status when it gave up.
        status: u8,
        /// Control-queue interrupts so far.
        control_irqs: u64,
        /// Chains in flight on the control queue.
        in_flight: u16,
    },
    /// The response does not decode.
    BadResponse(DecodeError),
    /// The device wrote fewer bytes than a response header.
    ShortResponse(u32),
    /// A response of an unexpected type.
    Unexpected {
        /// Command type.
        cmd: u32,
        /// Response type expected.
        expected: u32,
        /// Response type received.
        got: u32,
    },
    /// A fenced command came back without its fence (flags, fence id received).
    FenceMismatch {
        /// Fence id sent.
        expected: u64,
        /// Flags received.
        flags: u32,
        /// Fence id received.
        got: u64,
    },
    /// A ticket that is not (or no longer) in flight.
    StaleTicket,
    /// The display has no enabled scanout 0.
    NoScanout,
}

impl From<RingError> for Error {
    fn from(e: RingError) -> Self {
        Error::Ring(e)
    }
}

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Self {
        Error::Transport(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoDevice => write!(f, "no virtio-gpu (1af4:1050) on bus 0"),
            Error::Transport(e) => write!(f, "transport: {e}"),
            Error::ResetStuck(s) => write!(f, "device status stays {s:#x} after reset"),
            Error::NotModern(o) => write!(f, "device offers no VERSION_1 (features {o:#x})"),
            Error::FeaturesRejected {
                offered,
                accepted,
                status,
            } => write!(
                f,
                "FEATURES_OK did not stick (offered {offered:#x}, accepted {accepted:#x}, status {status:#x})"
            ),
            Error::TooFewVectors(n) => write!(f, "MSI-X table has {n} entries, 3 needed"),
            Error::VectorRefused { queue, wrote, read } => match queue {
                Some(q) => write!(f, "queue {q}: MSI-X entry {wrote} refused (reads {read:#x})"),
                None => write!(f, "config MSI-X entry {wrote} refused (reads {read:#x})"),
            },
            Error::TooFewQueues(n) => write!(f, "device has {n} queues, 2 needed"),
            Error::QueueAlreadyEnabled(q) => write!(f, "queue {q} enabled before setup"),
            Error::QueueSizeRefused { queue, wrote, read } => {
                write!(f, "queue {queue}: size {wrote} written, {read} reads back")
            }
            Error::QueueAddressRefused(q) => write!(f, "queue {q}: ring address not kept"),
            Error::BadNotifyOffset(q) => write!(f, "queue {q}: notify offset outside the notify region"),
            Error::OutOfMemory => write!(f, "out of guest RAM"),
            Error::Ring(e) => write!(f, "ring: {e:?}"),
            Error::RequestTooLarge(n) => write!(f, "request of {n} bytes too large"),
            Error::NeedsReset {
                status,
                config_irqs,
            } => write!(
                f,
                "device needs reset (status {status:#x}, {config_irqs} config interrupts)"
            ),
            Error::NotLive(s) => write!(f, "device not live after DRIVER_OK (status {s:#x})"),
            Error::Timeout {
                what,
                ms,
                status,
                control_irqs,
                in_flight,
            } => write!(
                f,
                "timeout after {ms} ms waiting for {what} (status {status:#x}, {control_irqs} control interrupts, {in_flight} in flight)"
            ),
            Error::BadResponse(e) => write!(f, "response does not decode: {e:?}"),
            Error::ShortResponse(n) => write!(f, "response of {n} bytes"),
            Error::Unexpected { cmd, expected, got } => write!(
                f,
                "{} answered {} ({got:#x}), expected {}",
                command_name(*cmd),
                response_name(*got),
                response_name(*expected)
            ),
            Error::FenceMismatch {
                expected,
                flags,
                got,
            } => write!(
                f,
                "fence {expected} answered with flags {flags:#x} fence {got}"
            ),
            Error::StaleTicket => write!(f, "stale ticket"),
            Error::NoScanout => write!(f, "scanout 0 is not enabled"),
        }
    }
}

/// Counters of what the driver did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Control commands queued.
    pub commands: u64,
    /// Cursor commands queued.
    pub cursor_commands: u64,
    /// Kicks that notified the device.
    pub notifies: u64,
    /// Kicks the device's event index said were not needed.
    pub notifies_suppressed: u64,
    /// HLTs while waiting.
    pub halts: u64,
    /// Completions found after a wake-up that no queue interrupt explained (the
    /// tick woke the guest): should stay 0 when interrupts work.
    pub found_without_interrupt: u64,
    /// Device (re)initialisations.
    pub inits: u64,
}

/// A control command in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    slot: u16,
    seq: u32,
}

/// A completed control command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    /// The command type sent.
    pub cmd_type: u32,
    /// The response header.
    pub hdr: CtrlHdr,
    /// The decoded response.
    pub resp: Response,
    /// Bytes the device wrote.
    pub len: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    busy: bool,
    done: bool,
    seq: u32,
    cmd_type: u32,
    fence: Option<u64>,
    resp_len: u32,
    used_len: u32,
}

struct Queue {
    index: u16,
    max_size: u16,
    ring: Gpa,
    slot_base: Gpa,
    slot_bytes: u64,
    msix_entry: u16,
    vector: u8,
    dq: Option<DriverQueue>,
    notify_addr: u64,
    slots: Vec<Slot>,
    by_head: Vec<u16>,
}

impl Queue {
    fn new(
        index: u16,
        max_size: u16,
        slot_bytes: u64,
        msix_entry: u16,
        vector: u8,
    ) -> Result<Queue, Error> {
        // Descriptor table, available ring, used ring: one page each.
        let ring = dma::alloc_pages(3).ok_or(Error::OutOfMemory)?;
        let slot_pages = (u64::from(max_size) * slot_bytes).div_ceil(dma::PAGE_SIZE);
        let slot_base = dma::alloc_pages(slot_pages).ok_or(Error::OutOfMemory)?;
        Ok(Queue {
            index,
            max_size,
            ring,
            slot_base,
            slot_bytes,
            msix_entry,
            vector,
            dq: None,
            notify_addr: 0,
            slots: vec![Slot::default(); usize::from(max_size)],
            by_head: vec![NO_SLOT; usize::from(max_size)],
        })
    }

    fn slot_addr(&self, slot: u16) -> Gpa {
        self.slot_base.offset(u64::from(slot) * self.slot_bytes)
    }

    fn free_slot(&self) -> Option<u16> {
        let n = self.dq.as_ref().map_or(0, |q| q.layout().size);
        self.slots[..usize::from(n)]
            .iter()
            .position(|s| !s.busy)
            .map(|i| i as u16)
    }

    fn in_flight(&self) -> u16 {
        self.dq.as_ref().map_or(0, |q| q.in_flight())
    }
}

/// The virtio-gpu driver.
pub struct VirtioGpu {
    /// The transport.
    pub pci: VirtioPci,
    /// The PCI function.
    pub function: Function,
    mem: GuestRam,
    offered: u64,
    accepted: u64,
    revision: Option<u32>,
    num_scanouts: u32,
    queues: [Queue; 2],
    next_fence: u64,
    seq: u32,
    config_irqs_seen: u64,
    timeout_ms: u64,
    /// What the driver did.
    pub stats: Stats,
    /// Print each initialisation step.
    pub verbose: bool,
}

impl VirtioGpu {
    /// Finds the device, locates its regions, enables it on the bus, allocates its
    /// rings and buffers, starts the local APIC tick that bounds waits, and
    /// initialises it ([`init`](Self::init)). With `verbose`, prints what it found
    /// and each step.
    pub fn probe(verbose: bool) -> Result<VirtioGpu, Error> {
        let function = pci::find(VENDOR_ID, DEVICE_ID).ok_or(Error::NoDevice)?;
        let t = VirtioPci::probe(function.bdf)?;
        if verbose {
            let (c, s, p) = function.class;
            println!(
                "virtio-gpu: {:04x}:{:04x} at {} class {c:02x}.{s:02x}.{p:02x} rev {}",
                function.vendor, function.device, function.bdf, function.revision
            );
            for (i, b) in t.bars.iter().enumerate() {
                if let pci::Bar::Memory {
                    addr,
                    size,
                    is_64,
                    prefetchable,
                } = b
                {
                    println!(
                        "virtio-gpu: BAR{i} mem{} {addr:#x} size {size:#x}{}",
                        if *is_64 { 64 } else { 32 },
                        if *prefetchable { " prefetchable" } else { "" }
                    );
                }
            }
            for c in t.caps.iter().flatten() {
                println!(
                    "virtio-gpu: cap@{:#x} type {} BAR{}+{:#x} len {:#x}{}",
                    c.cap_offset,
                    c.cfg_type,
                    c.bar,
                    c.offset,
                    c.length,
                    if c.cfg_type == transport::cap::NOTIFY {
                        alloc::format!(" multiplier {}", c.notify_multiplier)
                    } else {
                        alloc::string::String::new()
                    }
                );
            }
            println!(
                "virtio-gpu: MSI-X cap@{:#x} {} entries, table BAR{}+{:#x}, PBA BAR{}+{:#x}",
                t.msix.cap,
                t.msix.table_size,
                t.msix.table_bar,
                t.msix.table_offset,
                t.msix.pba_bar,
                t.msix.pba_offset
            );
        }
        pci::enable_device(function.bdf);
        let queues = [
            Queue::new(
                CONTROL_QUEUE,
                QUEUE_WANTED[0],
                SLOT_BYTES,
                CONTROL_ENTRY,
                CONTROL_VECTOR,
            )?,
            Queue::new(
                CURSOR_QUEUE,
                QUEUE_WANTED[1],
                CURSOR_SLOT_BYTES,
                CURSOR_ENTRY,
                CURSOR_VECTOR,
            )?,
        ];
        // The tick that bounds every wait (and wakes a HLT whose interrupt never comes).
        if timer::ticks() == 0 {
            timer::start(TICK_HZ);
        } else {
            cpu::sti();
        }
        let mut gpu = VirtioGpu {
            pci: t,
            function,
            mem: GuestRam::this_guest(),
            offered: 0,
            accepted: 0,
            revision: None,
            num_scanouts: 0,
            queues,
            next_fence: 0,
            seq: 0,
            config_irqs_seen: idt::device_interrupts(CONFIG_VECTOR),
            timeout_ms: DEFAULT_TIMEOUT_MS,
            stats: Stats::default(),
            verbose,
        };
        gpu.init()?;
        Ok(gpu)
    }

    /// (Re)initialises the device: reset, ACKNOWLEDGE, DRIVER, features,
    /// FEATURES_OK, MSI-X, both queues, DRIVER_OK. Everything in flight is
    /// forgotten (the device dropped it with the reset).
    pub fn init(&mut self) -> Result<(), Error> {
        let t = self.pci;
        self.stats.inits += 1;
        t.set_status(0);
        let mut st = t.status();
        for _ in 0..1000 {
            if st == 0 {
                break;
            }
            st = t.status();
        }
        if st != 0 {
            return Err(Error::ResetStuck(st));
        }
        for q in &mut self.queues {
            q.dq = None;
            q.slots.iter_mut().for_each(|s| *s = Slot::default());
            q.by_head.iter_mut().for_each(|h| *h = NO_SLOT);
        }
        t.set_status(status::ACKNOWLEDGE);
        t.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = t.device_features();
        if offered & feature::bit(feature::VERSION_1) == 0 {
            t.set_status(status::FAILED);
            return Err(Error::NotModern(offered));
        }
        let accepted = offered & WANTED_FEATURES;
        t.set_driver_features(accepted);
        t.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        let st = t.status();
        if st & status::FEATURES_OK == 0 {
            t.set_status(st | status::FAILED);
            return Err(Error::FeaturesRejected {
                offered,
                accepted,
                status: st,
            });
        }
        self.offered = offered;
        self.accepted = accepted;
        self.revision = abi::negotiate_revision(offered, accepted);
        if self.verbose {
            println!(
                "virtio-gpu: features offered {offered:#x}, accepted {accepted:#x} (driver features read back {:#x}), GPU-PV protocol {}",
                t.driver_features(),
                self.revision_name()
            );
        }
        self.setup_msix()?;
        let nq = t.read16(transport::common::NUM_QUEUES);
        if nq < 2 {
            t.set_status(status::FAILED);
            return Err(Error::TooFewQueues(nq));
        }
        for i in 0..2 {
            self.setup_queue(i)?;
        }
        self.num_scanouts = t.device_read32(config::NUM_SCANOUTS);
        t.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        let st = t.status();
        if st & status::DRIVER_OK == 0 || st & (status::DEVICE_NEEDS_RESET | status::FAILED) != 0 {
            return Err(Error::NotLive(st));
        }
        self.config_irqs_seen = idt::device_interrupts(CONFIG_VECTOR);
        if self.verbose {
            println!(
                "virtio-gpu: DRIVER_OK (status {st:#x}), {} scanout(s), {} capsets, control queue {} entries, cursor queue {} entries",
                self.num_scanouts,
                t.device_read32(config::NUM_CAPSETS),
                self.queue_size(CONTROL_QUEUE),
                self.queue_size(CURSOR_QUEUE)
            );
        }
        Ok(())
    }

    fn setup_msix(&mut self) -> Result<(), Error> {
        let t = self.pci;
        let m = t.msix;
        if m.table_size < 3 {
            t.set_status(status::FAILED);
            return Err(Error::TooFewVectors(m.table_size));
        }
        let before = m.control();
        if self.stats.inits > 1 && before & pci::MSIX_ENABLE == 0 {
            println!(
                "virtio-gpu: note: the device status reset also cleared MSI-X enable in PCI config space (message control {before:#x}); re-enabling"
            );
        }
        // As Linux does: enable with the function masked, program, unmask.
        m.set_control(true, true);
        for (entry, vector) in [
            (CONFIG_ENTRY, CONFIG_VECTOR),
            (CONTROL_ENTRY, CONTROL_VECTOR),
            (CURSOR_ENTRY, CURSOR_VECTOR),
        ] {
            m.program(t.msix_table, entry, vector, false);
            let (addr, data, ctl) = m.read_entry(t.msix_table, entry);
            if addr != 0xfee0_0000 || data != u32::from(vector) || ctl & 1 != 0 {
                println!(
                    "virtio-gpu: warning: MSI-X entry {entry} reads back address {addr:#x} data {data:#x} control {ctl:#x}"
                );
            }
        }
        m.set_control(true, false);
        t.write16(transport::common::CONFIG_MSIX_VECTOR, CONFIG_ENTRY);
        let read = t.read16(transport::common::CONFIG_MSIX_VECTOR);
        if read != CONFIG_ENTRY {
            t.set_status(status::FAILED);
            return Err(Error::VectorRefused {
                queue: None,
                wrote: CONFIG_ENTRY,
                read,
            });
        }
        if self.verbose {
            println!(
                "virtio-gpu: MSI-X on (message control {:#x}): config -> vector {CONFIG_VECTOR:#x}, control queue -> {CONTROL_VECTOR:#x}, cursor queue -> {CURSOR_VECTOR:#x}",
                m.control()
            );
        }
        Ok(())
    }

    fn setup_queue(&mut self, i: usize) -> Result<(), Error> {
        use transport::common as c;
        let t = self.pci;
        let event_idx = self.has(feature::RING_EVENT_IDX);
        let indirect = self.has(feature::RING_INDIRECT_DESC);
        let q = &mut self.queues[i];
        t.select_queue(q.index);
        let offered = t.read16(c::QUEUE_SIZE);
        if t.read16(c::QUEUE_ENABLE) != 0 {
            t.set_status(status::FAILED);
            return Err(Error::QueueAlreadyEnabled(q.index));
        }
        let size = if offered == 0 {
            // virtio 1.2, 4.1.4.3.2: on reset queue_size holds the device's maximum;
            // 0 means the queue is unavailable (Linux gives up with -ENOENT). The
            // GPU-PV ABI says what this device supports, so say so and go on.
            let abi_size = [
                abi::limits::CONTROL_QUEUE_SIZE,
                abi::limits::CURSOR_QUEUE_SIZE,
            ][i];
            println!(
                "virtio-gpu: DEVICE BUG: queue {} reads queue_size 0 after reset (\"unavailable\" in virtio 1.2 4.1.4.3.2); using the GPU-PV ABI size {abi_size}",
                q.index
            );
            abi_size.min(q.max_size)
        } else {
            let s = offered.min(q.max_size);
            // The largest power of two not above it.
            1 << (15 - s.leading_zeros().min(15))
        };
        t.write16(c::QUEUE_SIZE, size);
        let read = t.read16(c::QUEUE_SIZE);
        if read != size {
            t.set_status(status::FAILED);
            return Err(Error::QueueSizeRefused {
                queue: q.index,
                wrote: size,
                read,
            });
        }
        t.write16(c::QUEUE_MSIX_VECTOR, q.msix_entry);
        let read = t.read16(c::QUEUE_MSIX_VECTOR);
        if read != q.msix_entry {
            t.set_status(status::FAILED);
            return Err(Error::VectorRefused {
                queue: Some(q.index),
                wrote: q.msix_entry,
                read,
            });
        }
        let layout = QueueLayout {
            size,
            desc: q.ring,
            avail: q.ring.offset(dma::PAGE_SIZE),
            used: q.ring.offset(2 * dma::PAGE_SIZE),
            event_idx,
            indirect,
        };
        q.dq = Some(DriverQueue::new(&mut self.mem, layout)?);
        t.write64_split(c::QUEUE_DESC, layout.desc.get());
        t.write64_split(c::QUEUE_DRIVER, layout.avail.get());
        t.write64_split(c::QUEUE_DEVICE, layout.used.get());
        if t.read64_split(c::QUEUE_DESC) != layout.desc.get()
            || t.read64_split(c::QUEUE_DRIVER) != layout.avail.get()
            || t.read64_split(c::QUEUE_DEVICE) != layout.used.get()
        {
            t.set_status(status::FAILED);
            return Err(Error::QueueAddressRefused(q.index));
        }
        let off = t.read16(c::QUEUE_NOTIFY_OFF);
        let within = u64::from(off) * u64::from(t.notify_multiplier) + 2;
        if within > u64::from(t.notify_len) {
            t.set_status(status::FAILED);
            return Err(Error::BadNotifyOffset(q.index));
        }
        q.notify_addr = t.notify_addr(off);
        t.write16(c::QUEUE_ENABLE, 1);
        if self.verbose {
            println!(
                "virtio-gpu: queue {}: {} entries (device offered {offered}), desc {:#x} avail {:#x} used {:#x}, notify {:#x}, MSI-X entry {} (vector {:#x})",
                q.index, size, layout.desc, layout.avail, layout.used, q.notify_addr, q.msix_entry, q.vector
            );
        }
        Ok(())
    }

    /// Whether feature bit `bit` was negotiated.
    pub fn has(&self, bit: u32) -> bool {
        self.accepted & feature::bit(bit) != 0
    }

    /// Features the device offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Features negotiated.
    pub fn features(&self) -> u64 {
        self.accepted
    }

    /// The negotiated GPU-PV protocol revision (`None`: plain virtio-gpu).
    pub fn revision(&self) -> Option<u32> {
        self.revision
    }

    /// The revision for printing: `2`, `1` or `none`.
    pub fn revision_name(&self) -> alloc::string::String {
        match self.revision {
            Some(r) => alloc::format!("{r}"),
            None => alloc::string::String::from("none"),
        }
    }

    /// Scanouts the device reports in its configuration.
    pub fn num_scanouts(&self) -> u32 {
        self.num_scanouts
    }

    /// Entries of queue `q` (0 before setup).
    pub fn queue_size(&self, q: u16) -> u16 {
        self.queues
            .get(usize::from(q))
            .and_then(|q| q.dq.as_ref())
            .map_or(0, |d| d.layout().size)
    }

    /// The ring layout of queue `q`, once set up.
    pub fn queue_layout(&self, q: u16) -> Option<QueueLayout> {
        self.queues
            .get(usize::from(q))
            .and_then(|q| q.dq.as_ref())
            .map(|d| *d.layout())
    }

    /// The next available index of queue `q` (chains added so far).
    pub fn avail_idx(&self, q: u16) -> u16 {
        self.queues
            .get(usize::from(q))
            .and_then(|q| q.dq.as_ref())
            .map_or(0, |d| d.avail_idx())
    }

    /// This guest's RAM, as the rings see it.
    pub fn ram(&mut self) -> &mut GuestRam {
        &mut self.mem
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.pci.status()
    }

    /// Sets how long a wait may take.
    pub fn set_timeout_ms(&mut self, ms: u64) {
        self.timeout_ms = ms.max(1);
    }

    /// Interrupts taken on each of the three vectors: (config, control, cursor).
    pub fn interrupts(&self) -> (u64, u64, u64) {
        (
            idt::device_interrupts(CONFIG_VECTOR),
            idt::device_interrupts(CONTROL_VECTOR),
            idt::device_interrupts(CURSOR_VECTOR),
        )
    }

    /// A new fence id, above every one used before.
    pub fn next_fence(&mut self) -> u64 {
        self.next_fence += 1;
        self.next_fence
    }

    /// Writes the queue index to queue `q`'s notification address, whatever the
    /// ring holds.
    pub fn notify(&mut self, q: u16) {
        if let Some(queue) = self.queues.get(usize::from(q)) {
            if queue.notify_addr != 0 {
                self.pci.notify_queue(queue.notify_addr, q);
            }
        }
    }

    /// Publishes what was added to queue `q` and notifies the device if its event
    /// index asks for it. Returns whether it notified.
    pub fn kick(&mut self, q: u16) -> Result<bool, Error> {
        let Some(dq) = self.queues[usize::from(q)].dq.as_mut() else {
            return Ok(false);
        };
        let need = dq.kick(&mut self.mem)?;
        if need {
            self.stats.notifies += 1;
            self.notify(q);
        } else {
            self.stats.notifies_suppressed += 1;
        }
        Ok(need)
    }

    /// Queues control command `req` (not yet visible to the device: see
    /// [`kick`](Self::kick)).
    pub fn submit(&mut self, req: &Request) -> Result<Ticket, Error> {
        let mut bytes = Vec::new();
        command::encode(req, &mut bytes);
        let split = matches!(req.cmd, Command::ResourceAttachBacking { .. })
            .then_some(wire::size::RESOURCE_ATTACH_BACKING);
        let fence = (req.hdr.flags & wire::FLAG_FENCE != 0).then_some(req.hdr.fence_id);
        self.submit_raw(
            &bytes,
            split,
            response_size(req.cmd.type_()),
            req.cmd.type_(),
            fence,
        )
    }

    /// Queues raw request bytes as one control command: one readable buffer, or two
    /// split at `split` (header, then the rest), and a writable buffer of
    /// `resp_len` bytes, in an indirect table when negotiated. `fence` is the fence
    /// id to expect back.
    pub fn submit_raw(
        &mut self,
        bytes: &[u8],
        split: Option<usize>,
        resp_len: u32,
        cmd_type: u32,
        fence: Option<u64>,
    ) -> Result<Ticket, Error> {
        if bytes.len() > MAX_REQUEST || bytes.is_empty() {
            return Err(Error::RequestTooLarge(bytes.len()));
        }
        let resp_len = resp_len.clamp(wire::size::RESP_NODATA as u32, MAX_RESPONSE);
        self.reap(CONTROL_QUEUE)?;
        if self.queues[0].free_slot().is_none() {
            self.wait_until("a free control slot", |g| g.queues[0].free_slot().is_some())?;
        }
        let q = &mut self.queues[0];
        let slot = q.free_slot().ok_or(Error::Ring(RingError::QueueFull))?;
        let base = q.slot_addr(slot);
        let req = base.offset(SLOT_REQUEST);
        let resp = base.offset(SLOT_RESPONSE);
        self.mem.write(req, bytes).map_err(RingError::from)?;
        self.mem
            .write(resp, &[0u8; wire::size::RESP_NODATA])
            .map_err(RingError::from)?;
        let len = bytes.len() as u32;
        let readable: Vec<(Gpa, u32)> = match split {
            Some(s) if s > 0 && s < bytes.len() => {
                vec![(req, s as u32), (req.offset(s as u64), len - s as u32)]
            }
            _ => vec![(req, len)],
        };
        let dq = q.dq.as_mut().ok_or(Error::NotLive(0))?;
        let table = dq.layout().indirect.then_some(base.offset(SLOT_TABLE));
        let head = dq.add(&mut self.mem, &readable, &[(resp, resp_len)], table)?;
        self.seq = self.seq.wrapping_add(1);
        q.by_head[usize::from(head)] = slot;
        q.slots[usize::from(slot)] = Slot {
            busy: true,
            done: false,
            seq: self.seq,
            cmd_type,
            fence,
            resp_len,
            used_len: 0,
        };
        self.stats.commands += 1;
        Ok(Ticket {
            slot,
            seq: self.seq,
        })
    }

    /// Takes every used entry of queue `q`; returns how many.
    fn reap(&mut self, qi: u16) -> Result<usize, Error> {
        let q = &mut self.queues[usize::from(qi)];
        let Some(dq) = q.dq.as_mut() else {
            return Ok(0);
        };
        let mut n = 0;
        while let Some((head, len)) = dq.take_used(&self.mem)? {
            n += 1;
            let slot = core::mem::replace(&mut q.by_head[usize::from(head)], NO_SLOT);
            if let Some(s) = q.slots.get_mut(usize::from(slot)) {
                s.done = true;
                s.used_len = len;
                if qi == CURSOR_QUEUE {
                    // Cursor commands have no response: the buffer is free again.
                    s.busy = false;
                }
            }
        }
        Ok(n)
    }

    fn reap_all(&mut self) -> Result<usize, Error> {
        Ok(self.reap(CONTROL_QUEUE)? + self.reap(CURSOR_QUEUE)?)
    }

    /// Takes the used entries of both queues without waiting (for a guest that polls
    /// its completions instead of sleeping on interrupts); returns how many. The
    /// used-event index is left alone, so a polling guest gets no interrupts.
    pub fn poll(&mut self) -> Result<usize, Error> {
        self.reap_all()
    }

    /// Whether the device announced a configuration change (config interrupt) since
    /// the last look; if so reads the status and the display events (acknowledging
    /// them) and fails with [`Error::NeedsReset`] when the device wants a reset.
    pub fn check_config(&mut self) -> Result<bool, Error> {
        let now = idt::device_interrupts(CONFIG_VECTOR);
        if now == self.config_irqs_seen {
            return Ok(false);
        }
        self.config_irqs_seen = now;
        let st = self.pci.status();
        let events = self.pci.device_read32(config::EVENTS_READ);
        if events != 0 {
            self.pci.device_write32(config::EVENTS_CLEAR, events);
        }
        if self.verbose {
            println!("virtio-gpu: config interrupt #{now}: status {st:#x}, events {events:#x}");
        }
        if st & status::DEVICE_NEEDS_RESET != 0 {
            return Err(Error::NeedsReset {
                status: st,
                config_irqs: now,
            });
        }
        Ok(true)
    }

    /// Halts (interrupts on) until `cond` holds, reaping both queues whenever the
    /// guest wakes. Before each HLT the driver publishes its used-event index on both
    /// queues, so the device interrupts at the next completion. Fails on a
    /// configuration change that asks for a reset, and after the timeout.
    pub fn wait_until(
        &mut self,
        what: &'static str,
        mut cond: impl FnMut(&Self) -> bool,
    ) -> Result<(), Error> {
        let start = timer::ticks();
        let limit = self.timeout_ms * u64::from(TICK_HZ) / 1000 + 1;
        let mut irqs_before_halt: Option<(u64, u64)> = None;
        loop {
            cpu::cli();
            let r = self.wait_step(what, &mut cond, start, limit, &mut irqs_before_halt);
            match r {
                Ok(true) => {
                    cpu::sti();
                    return Ok(());
                }
                Ok(false) => {
                    self.stats.halts += 1;
                    let (_, c, k) = self.interrupts();
                    irqs_before_halt = Some((c, k));
                    cpu::enable_interrupts_and_halt();
                }
                Err(e) => {
                    cpu::sti();
                    return Err(e);
                }
            }
        }
    }

    /// One check of [`wait_until`](Self::wait_until), with interrupts off: `true`
    /// when done, `false` to halt.
    fn wait_step(
        &mut self,
        what: &'static str,
        cond: &mut impl FnMut(&Self) -> bool,
        start: u64,
        limit: u64,
        irqs_before_halt: &mut Option<(u64, u64)>,
    ) -> Result<bool, Error> {
        let found = self.reap_all()?;
        if let Some((c, k)) = irqs_before_halt.take() {
            let (_, c2, k2) = self.interrupts();
            if found > 0 && c2 == c && k2 == k {
                self.stats.found_without_interrupt += found as u64;
            }
        }
        if cond(self) {
            return Ok(true);
        }
        self.check_config()?;
        // Ask for an interrupt at the next used entry, then look once more: the
        // device may have returned a chain before it saw the new event index.
        for q in &self.queues {
            if let Some(dq) = q.dq.as_ref() {
                dq.set_used_event(&mut self.mem, dq.last_used_idx())?;
            }
        }
        if self.reap_all()? > 0 && cond(self) {
            return Ok(true);
        }
        if timer::ticks().wrapping_sub(start) >= limit {
            let st = self.pci.status();
            if st & status::DEVICE_NEEDS_RESET != 0 {
                return Err(Error::NeedsReset {
                    status: st,
                    config_irqs: idt::device_interrupts(CONFIG_VECTOR),
                });
            }
            return Err(Error::Timeout {
                what,
                ms: self.timeout_ms,
                status: st,
                control_irqs: idt::device_interrupts(CONTROL_VECTOR),
                in_flight: self.queues[0].in_flight(),
            });
        }
        Ok(false)
    }

    /// Whether ticket `t` has its response.
    pub fn is_done(&self, t: Ticket) -> bool {
        self.queues[0]
            .slots
            .get(usize::from(t.slot))
            .is_some_and(|s| s.busy && s.seq == t.seq && s.done)
    }

    /// Waits for ticket `t`'s response and returns it (any type), freeing its slot.
    pub fn wait(&mut self, t: Ticket) -> Result<Completed, Error> {
        let valid = self.queues[0]
            .slots
            .get(usize::from(t.slot))
            .is_some_and(|s| s.busy && s.seq == t.seq);
        if !valid {
            return Err(Error::StaleTicket);
        }
        self.wait_until("a control response", |g| g.is_done(t))?;
        let q = &mut self.queues[0];
        let s = core::mem::take(&mut q.slots[usize::from(t.slot)]);
        let n = s.used_len.min(s.resp_len) as usize;
        if n < wire::size::RESP_NODATA {
            return Err(Error::ShortResponse(s.used_len));
        }
        let mut buf = vec![0u8; n];
        self.mem
            .read(q.slot_addr(t.slot).offset(SLOT_RESPONSE), &mut buf)
            .map_err(RingError::from)?;
        let (hdr, resp) = Response::decode(&buf).map_err(Error::BadResponse)?;
        Ok(Completed {
            cmd_type: s.cmd_type,
            hdr,
            resp,
            len: s.used_len,
        })
    }

    /// Waits for ticket `t` and checks its response: type `expected`, and for a
    /// fenced command `FLAG_FENCE` with the same fence id.
    pub fn expect(&mut self, t: Ticket, expected: u32) -> Result<Completed, Error> {
        let fence = self.queues[0]
            .slots
            .get(usize::from(t.slot))
            .and_then(|s| s.fence);
        let c = self.wait(t)?;
        if c.hdr.type_ != expected {
            return Err(Error::Unexpected {
                cmd: c.cmd_type,
                expected,
                got: c.hdr.type_,
            });
        }
        if let Some(f) = fence {
            if c.hdr.flags & wire::FLAG_FENCE == 0 || c.hdr.fence_id != f {
                return Err(Error::FenceMismatch {
                    expected: f,
                    flags: c.hdr.flags,
                    got: c.hdr.fence_id,
                });
            }
        }
        Ok(c)
    }

    /// Sends one command, notifies, and waits for its response (any type).
    pub fn call(&mut self, req: &Request) -> Result<Completed, Error> {
        let t = self.submit(req)?;
        self.kick(CONTROL_QUEUE)?;
        self.wait(t)
    }

    /// Sends one command, notifies, and checks its response type.
    pub fn call_expect(&mut self, req: &Request, expected: u32) -> Result<Completed, Error> {
        let t = self.submit(req)?;
        self.kick(CONTROL_QUEUE)?;
        self.expect(t, expected)
    }

    /// `GET_DISPLAY_INFO`: each scanout's rectangle and whether it is enabled.
    pub fn display_info(&mut self) -> Result<Vec<(Rect, bool)>, Error> {
        let c = self.call_expect(&plain(Command::GetDisplayInfo), wire::RESP_OK_DISPLAY_INFO)?;
        match c.resp {
            Response::DisplayInfo(modes) => Ok(modes),
            _ => Err(Error::Unexpected {
                cmd: wire::CMD_GET_DISPLAY_INFO,
                expected: wire::RESP_OK_DISPLAY_INFO,
                got: c.hdr.type_,
            }),
        }
    }

    /// `GET_EDID` of `scanout`: the EDID bytes.
    pub fn edid(&mut self, scanout: u32) -> Result<Vec<u8>, Error> {
        let c = self.call_expect(&plain(Command::GetEdid { scanout }), wire::RESP_OK_EDID)?;
        match c.resp {
            Response::Edid(e) => Ok(e),
            _ => Err(Error::Unexpected {
                cmd: wire::CMD_GET_EDID,
                expected: wire::RESP_OK_EDID,
                got: c.hdr.type_,
            }),
        }
    }

    /// Queues a cursor command (one direct readable descriptor, no response) and
    /// kicks the cursor queue. Waits for a free cursor buffer if all are in flight.
    pub fn cursor(&mut self, cmd: Command) -> Result<(), Error> {
        let mut bytes = Vec::new();
        command::encode(&plain(cmd), &mut bytes);
        self.reap(CURSOR_QUEUE)?;
        if self.queues[1].free_slot().is_none() {
            self.wait_until("a free cursor slot", |g| g.queues[1].free_slot().is_some())?;
        }
        let q = &mut self.queues[1];
        let slot = q.free_slot().ok_or(Error::Ring(RingError::QueueFull))?;
        let addr = q.slot_addr(slot);
        self.mem.write(addr, &bytes).map_err(RingError::from)?;
        let dq = q.dq.as_mut().ok_or(Error::NotLive(0))?;
        let head = dq.add(&mut self.mem, &[(addr, bytes.len() as u32)], &[], None)?;
        q.by_head[usize::from(head)] = slot;
        q.slots[usize::from(slot)] = Slot {
            busy: true,
            ..Slot::default()
        };
        self.stats.cursor_commands += 1;
        self.kick(CURSOR_QUEUE)?;
        Ok(())
    }

    /// Waits until every command on both queues came back.
    pub fn wait_idle(&mut self) -> Result<(), Error> {
        self.wait_until("both queues to drain", |g| {
            g.queues.iter().all(|q| q.in_flight() == 0)
        })
    }
}

/// A request with a plain header (no fence).
pub fn plain(cmd: Command) -> Request {
    Request {
        hdr: CtrlHdr {
            type_: cmd.type_(),
            ..CtrlHdr::default()
        },
        cmd,
    }
}

/// A request with `FLAG_FENCE` and fence id `fence`.
pub fn fenced(cmd: Command, fence: u64) -> Request {
    Request {
        hdr: CtrlHdr {
            type_: cmd.type_(),
            flags: wire::FLAG_FENCE,
            fence_id: fence,
            ..CtrlHdr::default()
        },
        cmd,
    }
}

/// The full rectangle of a `width` x `height` resource.
pub fn full_rect(width: u32, height: u32) -> Rect {
    Rect {
        x: 0,
        y: 0,
        width,
        height,
    }
}

/// Backing entries for `bytes` of contiguous guest RAM at `addr`, each at most
/// `max_entry` bytes.
pub fn backing_entries(addr: Gpa, bytes: u64, max_entry: u64) -> Vec<MemEntry> {
    let mut out = Vec::new();
    let mut at = addr;
    let end = addr.offset(bytes);
    while at < end {
        let len = (end.get() - at.get())
            .min(max_entry.max(1))
            .min(u64::from(u32::MAX));
        out.push(MemEntry {
            addr: at.get(),
            length: len as u32,
            padding: 0,
        });
        at = at.offset(len);
    }
    out
}

/// What an EDID block says: its preferred mode, monitor name, and whether its
/// checksum holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdidSummary {
    /// Preferred mode width.
    pub width: u32,
    /// Preferred mode height.
    pub height: u32,
    /// Monitor name descriptor, if any.
    pub name: alloc::string::String,
    /// The base block's checksum is right.
    pub checksum_ok: bool,
}

/// Parses the base block of an EDID.
pub fn parse_edid(e: &[u8]) -> Option<EdidSummary> {
    if e.len() < 128 || e[0..8] != [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0] {
        return None;
    }
    let d = &e[54..72];
    let width = u32::from(d[2]) | (u32::from(d[4] >> 4) << 8);
    let height = u32::from(d[5]) | (u32::from(d[7] >> 4) << 8);
    let mut name = alloc::string::String::new();
    for i in 0..4 {
        let b = &e[54 + 18 * i..72 + 18 * i];
        if b[0] == 0 && b[1] == 0 && b[3] == 0xfc {
            for &c in &b[5..18] {
                if c == b'\n' {
                    break;
                }
                name.push(c as char);
            }
        }
    }
    let checksum_ok = e[..128].iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0;
    Some(EdidSummary {
        width,
        height,
        name: alloc::string::String::from(name.trim_end()),
        checksum_ok,
    })
}

/// Moves the cursor on scanout 0.
pub fn cursor_pos(x: u32, y: u32) -> CursorPos {
    CursorPos {
        scanout_id: 0,
        x,
        y,
        padding: 0,
    }
}
