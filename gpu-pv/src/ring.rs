//! Split virtqueues (virtio 1.2, section 2.7): the device side the mediator uses to
//! read a guest's rings, and a driver side ([`driver`]) for the guest frontend, the
//! tests and the simulation.
//!
//! The rings live in guest memory that the guest may rewrite while the device reads
//! it, so the device side is written as a parser of hostile input:
//!
//! - every access goes through [`GuestMemory`] (checked copies, never a pointer);
//! - every index, flag and length the guest wrote is checked before it is used, and a
//!   malformed ring ends in a typed [`RingError`], never a panic;
//! - each descriptor of a chain is read at most once (a bitmap of visited slots), so
//!   a guest rewriting the table during the walk can neither loop the walk nor make
//!   it see one descriptor two ways, and the work of one [`DeviceQueue::pop`] is
//!   bounded by [`limits::MAX_CHAIN_DESCRIPTORS`] buffers plus one indirect table of
//!   at most [`limits::MAX_INDIRECT_DESCRIPTORS`] entries;
//! - every buffer of a returned [`Chain`] has been checked to lie in the guest's own
//!   RAM, so later stages only copy. A buffer is translated whole first; only one
//!   that is not host-contiguous costs a translation per 4 KiB page;
//! - a head taken and not yet returned cannot be taken again
//!   ([`RingError::HeadInFlight`]), so a guest never has more chains outstanding
//!   than its queue has entries, whatever it writes into its available ring;
//! - what a chain's size decides is allocated fallibly ([`RingError::OutOfMemory`]).
//!
//! Memory ordering follows the virtio rules with `core::sync::atomic::fence`: an
//! acquire fence between reading `avail.idx` and the ring entries (and `used.idx` and
//! the used entries on the driver side), a release fence before publishing an index,
//! and a full fence between publishing an index and reading the other side's
//! notification suppression fields.

use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

use crate::abi::limits;
use crate::memory::{Gpa, GuestMemory, MemError};
use crate::wire::virtq::{
    DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE, MAX_QUEUE_SIZE, USED_ELEM_SIZE,
};

/// `VIRTQ_AVAIL_F_NO_INTERRUPT`: the driver asks for no used-buffer notifications
/// (ignored by the device when event idx is negotiated).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VIRTQ_USED_F_NO_NOTIFY`: the device asks for no available-buffer notifications
/// (ignored by the driver when event idx is negotiated).
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Granule in which [`DeviceQueue::pop`] re-checks a buffer that does not translate
/// as one range (guest RAM may be host-contiguous only page by page).
const PAGE_SIZE: u64 = 4096;

/// Where a split virtqueue lives in guest memory and which ring features were
/// negotiated for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    /// Queue size (entries), a power of two in `1..=32768`.
    pub size: u16,
    /// Guest-physical address of the descriptor table (16-byte aligned).
    pub desc: Gpa,
    /// Guest-physical address of the available ring (2-byte aligned).
    pub avail: Gpa,
    /// Guest-physical address of the used ring (4-byte aligned).
    pub used: Gpa,
    /// `VIRTIO_F_RING_EVENT_IDX` negotiated.
    pub event_idx: bool,
    /// `VIRTIO_F_RING_INDIRECT_DESC` negotiated.
    pub indirect: bool,
}

impl QueueLayout {
    /// Checks the size and the ring addresses: size a power of two in
    /// `1..=32768`, rings aligned as virtio 1.x requires, and no ring wrapping
    /// around the end of the address space.
    pub fn validate(&self) -> Result<(), RingError> {
        if self.size == 0 || self.size > MAX_QUEUE_SIZE || !self.size.is_power_of_two() {
            return Err(RingError::BadQueueSize);
        }
        if !self.desc.get().is_multiple_of(16)
            || !self.avail.get().is_multiple_of(2)
            || !self.used.get().is_multiple_of(4)
        {
            return Err(RingError::Misaligned);
        }
        let n = u64::from(self.size);
        // Areas as in virtio 1.2, 2.7: descriptor table, then flags + idx + ring +
        // used_event (avail) and flags + idx + ring + avail_event (used).
        let areas = [
            (self.desc, DESC_SIZE * n),
            (self.avail, 6 + 2 * n),
            (self.used, 6 + USED_ELEM_SIZE * n),
        ];
        for (start, len) in areas {
            start.checked_add(len).ok_or(RingError::LayoutOverflow)?;
        }
        Ok(())
    }

    // The ring addresses below lie inside the areas `validate` checked not to
    // wrap around the address space (every queue is validated when it is made).
    fn desc_addr(&self, index: u16) -> Gpa {
        self.desc.offset(DESC_SIZE * u64::from(index))
    }
    fn avail_flags_addr(&self) -> Gpa {
        self.avail
    }
    fn avail_idx_addr(&self) -> Gpa {
        self.avail.offset(2)
    }
    fn avail_ring_addr(&self, slot: u16) -> Gpa {
        self.avail.offset(4 + 2 * u64::from(slot % self.size))
    }
    fn used_event_addr(&self) -> Gpa {
        self.avail.offset(4 + 2 * u64::from(self.size))
    }
    fn used_flags_addr(&self) -> Gpa {
        self.used
    }
    fn used_idx_addr(&self) -> Gpa {
        self.used.offset(2)
    }
    fn used_ring_addr(&self, slot: u16) -> Gpa {
        self.used
            .offset(4 + USED_ELEM_SIZE * u64::from(slot % self.size))
    }
    fn avail_event_addr(&self) -> Gpa {
        self.used.offset(4 + USED_ELEM_SIZE * u64::from(self.size))
    }
}

/// One guest buffer of a chain, already checked to lie in guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical start.
    pub gpa: Gpa,
    /// Length in bytes.
    pub len: u32,
}

/// A descriptor chain taken from the available ring: the device-readable buffers
/// (the request) followed by the device-writable ones (room for the response).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// Head descriptor index, to hand back with [`DeviceQueue::push_used`].
    pub head: u16,
    /// Device-readable buffers, in chain order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in chain order.
    pub writable: Vec<Segment>,
}

impl Chain {
    /// Total bytes of the readable buffers (fits: chains are limited to `u32::MAX`
    /// bytes in total).
    pub fn readable_len(&self) -> u32 {
        total_len(&self.readable)
    }
    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u32 {
        total_len(&self.writable)
    }
}

fn total_len(segs: &[Segment]) -> u32 {
    segs.iter().fold(0u32, |acc, s| acc.saturating_add(s.len))
}

/// Why a ring operation failed. Every malformed ring a guest can build ends in one
/// of these; none is a panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// Queue size zero, above 32768 or not a power of two.
    BadQueueSize,
    /// A ring address is not aligned as virtio requires (16, 2, 4 bytes).
    Misaligned,
    /// A ring extends past the end of the address space.
    LayoutOverflow,
    /// A guest memory access was refused.
    Memory(MemError),
    /// `avail.idx` moved more than the queue size ahead of the last entry taken.
    AvailIdxJump,
    /// A head index (in the available ring, or handed back) is not below the size.
    HeadOutOfRange,
    /// A `next` index is not below the queue (or indirect table) size.
    NextOutOfRange,
    /// The chain describes more than [`limits::MAX_CHAIN_DESCRIPTORS`] buffers, or
    /// a driver-side chain needs more descriptors than the queue has.
    ChainTooLong,
    /// The chain visits a descriptor twice.
    Loop,
    /// An indirect table contains an indirect descriptor.
    NestedIndirect,
    /// An indirect descriptor without `VIRTIO_F_RING_INDIRECT_DESC`.
    IndirectNotNegotiated,
    /// A descriptor sets both `INDIRECT` and `NEXT` (virtio 1.2, 2.7.5.3.1).
    IndirectWithNext,
    /// An indirect table length that is zero or not a multiple of 16.
    BadIndirectSize,
    /// An indirect table of more than [`limits::MAX_INDIRECT_DESCRIPTORS`] entries.
    IndirectTooLarge,
    /// A buffer wraps around the address space, or the chain's buffers add up to
    /// more than `u32::MAX` bytes.
    LengthOverflow,
    /// A device-readable buffer follows a device-writable one.
    ReadableAfterWritable,
    /// [`gather`] was asked to copy more bytes than its limit.
    TooLarge,
    /// Driver side: a chain with no buffer at all.
    EmptyChain,
    /// Driver side: not enough free descriptors for the chain.
    QueueFull,
    /// Driver side: `used.idx` moved further than the number of chains in flight.
    UsedIdxJump,
    /// Driver side: the device returned a head that is not in flight.
    UsedIdNotInFlight,
    /// The available ring names a head the device took and has not returned yet:
    /// the driver published a chain it does not own any more.
    HeadInFlight,
    /// The hypervisor had no memory for a chain's buffers or bytes.
    OutOfMemory,
}

impl From<MemError> for RingError {
    fn from(e: MemError) -> Self {
        RingError::Memory(e)
    }
}

/// `vring_need_event`: whether moving an index from `old` to `new` passed the
/// other side's `event` index, i.e. whether a notification is due.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

fn read_u16(mem: &dyn GuestMemory, gpa: Gpa) -> Result<u16, RingError> {
    let mut b = [0u8; 2];
    mem.read(gpa, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

fn write_u16(mem: &mut dyn GuestMemory, gpa: Gpa, v: u16) -> Result<(), RingError> {
    mem.write(gpa, &v.to_le_bytes())?;
    Ok(())
}

/// `struct virtq_desc`, as it is in guest memory: `addr` is the raw number the
/// driver wrote, untrusted until [`ChainBuilder::push`] turned it into a checked
/// [`Segment`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    const SIZE: usize = DESC_SIZE as usize;

    fn parse(b: &[u8; Self::SIZE]) -> Self {
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = *b;
        Desc {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }

    fn bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    fn read(mem: &dyn GuestMemory, gpa: Gpa) -> Result<Self, RingError> {
        let mut b = [0u8; Self::SIZE];
        mem.read(gpa, &mut b)?;
        Ok(Self::parse(&b))
    }
}

/// Sets bit `i`; returns whether it was already set. `i` is below the bitmap's
/// capacity by construction (callers check indices against the size first).
fn test_and_set(bits: &mut [u64], i: usize) -> bool {
    match bits.get_mut(i / 64) {
        Some(word) => {
            let mask = 1u64 << (i % 64);
            let was = *word & mask != 0;
            *word |= mask;
            was
        }
        // Unreachable by construction; treating it as a revisit keeps the walk
        // bounded even if that ever changed.
        None => true,
    }
}

/// Whether bit `i` is set (false beyond the bitmap).
fn bit(bits: &[u64], i: usize) -> bool {
    bits.get(i / 64)
        .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
}

/// Clears bit `i` (nothing beyond the bitmap).
fn clear(bits: &mut [u64], i: usize) {
    if let Some(w) = bits.get_mut(i / 64) {
        *w &= !(1u64 << (i % 64));
    }
}

/// Checks that `[gpa, gpa+len)` is guest RAM owned by this VM. The range is first
/// translated whole (one call in the common case); if that is refused it may still
/// be valid RAM that is host-contiguous only per page, so it is re-checked page by
/// page, which fails at the first page that really is not the guest's.
fn check_segment(mem: &dyn GuestMemory, gpa: Gpa, len: u32) -> Result<(), RingError> {
    let len = u64::from(len);
    let end = gpa.checked_add(len).ok_or(RingError::LengthOverflow)?;
    let err = match mem.translate(gpa, len) {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    if len == 0 || gpa.get() / PAGE_SIZE == (end.get() - 1) / PAGE_SIZE {
        return Err(err.into());
    }
    // Page by page: `done` bytes checked so far, each step up to the next page
    // boundary (or the end).
    let mut done = 0;
    while done < len {
        let cur = gpa.offset(done);
        let n = (PAGE_SIZE - cur.get() % PAGE_SIZE).min(len - done);
        mem.translate(cur, n)?;
        done += n;
    }
    Ok(())
}

/// Accumulates a chain's buffers and enforces the per-chain rules.
struct ChainBuilder {
    chain: Chain,
    total: u64,
}

impl ChainBuilder {
    fn push(&mut self, mem: &dyn GuestMemory, d: &Desc) -> Result<(), RingError> {
        if self.chain.readable.len() + self.chain.writable.len() >= limits::MAX_CHAIN_DESCRIPTORS {
            return Err(RingError::ChainTooLong);
        }
        let writable = d.flags & DESC_F_WRITE != 0;
        if !writable && !self.chain.writable.is_empty() {
            return Err(RingError::ReadableAfterWritable);
        }
        self.total += u64::from(d.len);
        if self.total > u64::from(u32::MAX) {
            return Err(RingError::LengthOverflow);
        }
        // Trust boundary: the address the guest wrote becomes a guest-physical
        // address, checked to be the guest's own RAM before it goes anywhere.
        let gpa = Gpa::new(d.addr);
        check_segment(mem, gpa, d.len)?;
        let seg = Segment { gpa, len: d.len };
        let list = if writable {
            &mut self.chain.writable
        } else {
            &mut self.chain.readable
        };
        list.try_reserve(1).map_err(|_| RingError::OutOfMemory)?;
        list.push(seg);
        Ok(())
    }
}

/// The device side of one split virtqueue: takes chains the guest made available
/// and returns them through the used ring.
#[derive(Clone, Debug)]
pub struct DeviceQueue {
    layout: QueueLayout,
    last_avail_idx: u16,
    used_idx: u16,
    /// Descriptor slots visited by the chain walk in progress.
    visited: Vec<u64>,
    /// Heads taken and not returned yet.
    taken: Vec<u64>,
}

impl DeviceQueue {
    /// A queue at `layout`, with both indices at zero (as after a device or ring
    /// reset). Fails if the layout is invalid (see [`QueueLayout::validate`]).
    pub fn new(layout: QueueLayout) -> Result<Self, RingError> {
        layout.validate()?;
        let words = usize::from(layout.size).div_ceil(64);
        Ok(Self {
            layout,
            last_avail_idx: 0,
            used_idx: 0,
            visited: vec![0; words],
            taken: vec![0; words],
        })
    }

    /// A queue at `layout` that resumes at the given indices with nothing taken
    /// (a restored snapshot of a quiescent device).
    pub fn resume(
        layout: QueueLayout,
        last_avail_idx: u16,
        used_idx: u16,
    ) -> Result<Self, RingError> {
        let mut q = Self::new(layout)?;
        q.last_avail_idx = last_avail_idx;
        q.used_idx = used_idx;
        Ok(q)
    }

    /// Chains taken and not returned yet.
    pub fn outstanding(&self) -> usize {
        self.taken.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The layout the queue was created with.
    pub fn layout(&self) -> &QueueLayout {
        &self.layout
    }

    /// Index of the next available-ring entry to take.
    pub fn last_avail_idx(&self) -> u16 {
        self.last_avail_idx
    }

    /// The used index as last published to the guest.
    pub fn used_idx(&self) -> u16 {
        self.used_idx
    }

    /// Ring reset (`VIRTIO_F_RING_RESET`, or device reset): both indices back to 0.
    /// The guest memory is the driver's to reinitialise.
    pub fn reset(&mut self) {
        self.last_avail_idx = 0;
        self.used_idx = 0;
        self.taken.fill(0);
    }

    /// Chains the guest has made available and the device has not taken yet:
    /// `avail.idx - last_avail_idx`, which must not exceed the queue size.
    pub fn pending(&self, mem: &dyn GuestMemory) -> Result<u16, RingError> {
        let avail_idx = read_u16(mem, self.layout.avail_idx_addr())?;
        let n = avail_idx.wrapping_sub(self.last_avail_idx);
        if n > self.layout.size {
            return Err(RingError::AvailIdxJump);
        }
        Ok(n)
    }

    /// Takes the next available chain, or `None` when the ring is empty.
    ///
    /// Direct descriptors may be followed by one indirect descriptor (virtio 1.2,
    /// 2.7.5.3.2); Linux sends every control command as a single indirect one.
    /// The chain's buffers have been checked to lie in guest RAM.
    ///
    /// On error nothing is consumed: the ring is malformed and stays so until the
    /// driver resets it, so the caller should stop serving the queue (and set
    /// `DEVICE_NEEDS_RESET`). A head still taken (not returned with
    /// [`push_used`](Self::push_used)) is such an error.
    pub fn pop(&mut self, mem: &dyn GuestMemory) -> Result<Option<Chain>, RingError> {
        if self.pending(mem)? == 0 {
            return Ok(None);
        }
        // Ring entries are read only after the index that published them.
        fence(Ordering::Acquire);
        let head = read_u16(mem, self.layout.avail_ring_addr(self.last_avail_idx))?;
        if head < self.layout.size && bit(&self.taken, usize::from(head)) {
            return Err(RingError::HeadInFlight);
        }
        let chain = self.walk(mem, head)?;
        test_and_set(&mut self.taken, usize::from(head));
        self.last_avail_idx = self.last_avail_idx.wrapping_add(1);
        Ok(Some(chain))
    }

    fn walk(&mut self, mem: &dyn GuestMemory, head: u16) -> Result<Chain, RingError> {
        let size = self.layout.size;
        if head >= size {
            return Err(RingError::HeadOutOfRange);
        }
        self.visited.fill(0);
        let mut b = ChainBuilder {
            chain: Chain {
                head,
                ..Chain::default()
            },
            total: 0,
        };
        let mut idx = head;
        loop {
            if test_and_set(&mut self.visited, usize::from(idx)) {
                return Err(RingError::Loop);
            }
            let d = Desc::read(mem, self.layout.desc_addr(idx))?;
            if d.flags & DESC_F_INDIRECT != 0 {
                if !self.layout.indirect {
                    return Err(RingError::IndirectNotNegotiated);
                }
                if d.flags & DESC_F_NEXT != 0 {
                    return Err(RingError::IndirectWithNext);
                }
                walk_indirect(mem, &d, &mut b)?;
                break;
            }
            b.push(mem, &d)?;
            if d.flags & DESC_F_NEXT == 0 {
                break;
            }
            if d.next >= size {
                return Err(RingError::NextOutOfRange);
            }
            idx = d.next;
        }
        Ok(b.chain)
    }

    /// Returns chain `head` to the guest with `written` bytes of response, and
    /// publishes the new used index.
    pub fn push_used(
        &mut self,
        mem: &mut dyn GuestMemory,
        head: u16,
        written: u32,
    ) -> Result<(), RingError> {
        if head >= self.layout.size {
            return Err(RingError::HeadOutOfRange);
        }
        let mut elem = [0u8; USED_ELEM_SIZE as usize];
        elem[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..8].copy_from_slice(&written.to_le_bytes());
        mem.write(self.layout.used_ring_addr(self.used_idx), &elem)?;
        // The element must be visible before the index that publishes it.
        fence(Ordering::Release);
        let new = self.used_idx.wrapping_add(1);
        write_u16(mem, self.layout.used_idx_addr(), new)?;
        self.used_idx = new;
        clear(&mut self.taken, usize::from(head));
        Ok(())
    }

    /// Whether the guest wants an interrupt for the used entries published since
    /// the used index was `old_used`: with event idx, whether they passed the
    /// driver's `used_event` (`vring_need_event`); otherwise whether the driver left
    /// `VRING_AVAIL_F_NO_INTERRUPT` clear. False when nothing was published.
    pub fn should_notify(&self, mem: &dyn GuestMemory, old_used: u16) -> Result<bool, RingError> {
        if old_used == self.used_idx {
            return Ok(false);
        }
        // The used index write must be ordered before reading the driver's
        // suppression fields, or an interrupt can be lost.
        fence(Ordering::SeqCst);
        if self.layout.event_idx {
            let event = read_u16(mem, self.layout.used_event_addr())?;
            Ok(need_event(event, self.used_idx, old_used))
        } else {
            let flags = read_u16(mem, self.layout.avail_flags_addr())?;
            Ok(flags & AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// With event idx, writes `avail_event = last_avail_idx` into the used ring: the
    /// driver then kicks only once it makes a chain available beyond what the device
    /// has taken. Without event idx this does nothing. Callers check
    /// [`pending`](Self::pending) once more afterwards, since the driver may have
    /// added a chain just before seeing the new value.
    pub fn set_avail_event(&self, mem: &mut dyn GuestMemory) -> Result<(), RingError> {
        if !self.layout.event_idx {
            return Ok(());
        }
        write_u16(mem, self.layout.avail_event_addr(), self.last_avail_idx)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Asks the driver for no kicks while the device polls this queue: with event
    /// idx, `avail_event` is put one behind what the device has taken, so no index
    /// the driver moves to from here on passes it (until 2^16 chains later);
    /// otherwise `VIRTQ_USED_F_NO_NOTIFY` is set. Undone by
    /// [`resume_notifications`](Self::resume_notifications).
    pub fn suppress_notifications(&self, mem: &mut dyn GuestMemory) -> Result<(), RingError> {
        if self.layout.event_idx {
            write_u16(
                mem,
                self.layout.avail_event_addr(),
                self.last_avail_idx.wrapping_sub(1),
            )?;
        } else {
            write_u16(mem, self.layout.used_flags_addr(), USED_F_NO_NOTIFY)?;
        }
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Asks for a kick at the next chain again (event idx: `avail_event` = what
    /// the device has taken; otherwise `VIRTQ_USED_F_NO_NOTIFY` cleared). Callers
    /// check [`pending`](Self::pending) afterwards, as for
    /// [`set_avail_event`](Self::set_avail_event).
    pub fn resume_notifications(&self, mem: &mut dyn GuestMemory) -> Result<(), RingError> {
        if self.layout.event_idx {
            return self.set_avail_event(mem);
        }
        write_u16(mem, self.layout.used_flags_addr(), 0)?;
        fence(Ordering::SeqCst);
        Ok(())
    }
}

/// Follows an indirect table (virtio 1.2, 2.7.5.3): read once, whole, then walked
/// from entry 0 with each entry visited at most once.
fn walk_indirect(mem: &dyn GuestMemory, d: &Desc, b: &mut ChainBuilder) -> Result<(), RingError> {
    if d.len == 0 || !u64::from(d.len).is_multiple_of(DESC_SIZE) {
        return Err(RingError::BadIndirectSize);
    }
    let n = (u64::from(d.len) / DESC_SIZE) as usize;
    if n > limits::MAX_INDIRECT_DESCRIPTORS {
        return Err(RingError::IndirectTooLarge);
    }
    let mut table = Vec::new();
    table
        .try_reserve_exact(n * Desc::SIZE)
        .map_err(|_| RingError::OutOfMemory)?;
    table.resize(n * Desc::SIZE, 0);
    // The table address is the guest's too; the read is checked against its RAM.
    mem.read(Gpa::new(d.addr), &mut table)?;
    let entry = |i: usize| {
        let raw = table.get(i * Desc::SIZE..(i + 1) * Desc::SIZE)?;
        <&[u8; Desc::SIZE]>::try_from(raw).ok().map(Desc::parse)
    };
    let mut visited = [0u64; limits::MAX_INDIRECT_DESCRIPTORS.div_ceil(64)];
    let mut i = 0usize;
    loop {
        if test_and_set(&mut visited, i) {
            return Err(RingError::Loop);
        }
        let e = entry(i).ok_or(RingError::NextOutOfRange)?;
        if e.flags & DESC_F_INDIRECT != 0 {
            return Err(RingError::NestedIndirect);
        }
        b.push(mem, &e)?;
        if e.flags & DESC_F_NEXT == 0 {
            return Ok(());
        }
        i = usize::from(e.next);
        if i >= n {
            return Err(RingError::NextOutOfRange);
        }
    }
}

/// Copies the bytes of `segs` (a chain's readable buffers), in order, to the end
/// of `out`; returns how many were appended. Refuses with [`RingError::TooLarge`],
/// appending nothing, when they add up to more than `max` bytes; on a memory error
/// `out` is left as it was.
pub fn gather(
    mem: &dyn GuestMemory,
    segs: &[Segment],
    out: &mut Vec<u8>,
    max: usize,
) -> Result<usize, RingError> {
    let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    if total > max as u64 {
        return Err(RingError::TooLarge);
    }
    let start = out.len();
    // `total <= max`, so it fits in usize.
    out.try_reserve(total as usize)
        .map_err(|_| RingError::OutOfMemory)?;
    out.resize(start + total as usize, 0);
    let mut at = start;
    for s in segs {
        let len = s.len as usize;
        let dst = &mut out[at..at + len];
        if let Err(e) = mem.read(s.gpa, dst) {
            out.truncate(start);
            return Err(e.into());
        }
        at += len;
    }
    Ok(at - start)
}

/// Writes `data` across `segs` (a chain's writable buffers), in order; returns the
/// bytes written, which is less than `data.len()` when the buffers are smaller
/// (the rest is dropped: the guest gave no room for it).
pub fn scatter(mem: &mut dyn GuestMemory, segs: &[Segment], data: &[u8]) -> Result<u32, RingError> {
    let mut rest = data;
    let mut written: u64 = 0;
    for s in segs {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(s.len as usize);
        let (now, later) = rest.split_at(n);
        mem.write(s.gpa, now)?;
        written += n as u64;
        rest = later;
    }
    u32::try_from(written).map_err(|_| RingError::LengthOverflow)
}

/// The driver side of a split virtqueue, as a guest driver runs it: lays out the
/// rings, adds chains (direct or through one indirect table), publishes them, and
/// reclaims them from the used ring.
///
/// Used by the guest frontend, by tests of the device side and by the simulation,
/// so it follows virtio 1.2, 2.7 as a real driver would (Linux's `virtio_ring` is
/// the model: free descriptors linked through `next`, event-idx suppression). The
/// device is not trusted either: a used entry naming a head that is not in flight,
/// or a used index that runs ahead, is an error.
pub mod driver {
    use alloc::vec;
    use alloc::vec::Vec;
    use core::sync::atomic::{fence, Ordering};

    use super::{need_event, read_u16, write_u16, Desc, QueueLayout, RingError};
    use super::{AVAIL_F_NO_INTERRUPT, USED_F_NO_NOTIFY};
    use crate::abi::limits;
    use crate::memory::{Gpa, GuestMemory};
    use crate::wire::virtq::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE};

    /// The driver's view of one split virtqueue.
    #[derive(Clone, Debug)]
    pub struct DriverQueue {
        layout: QueueLayout,
        /// Shadow of each descriptor's `next`: links the free list and the chains
        /// in flight, so reclaiming never trusts what is in guest memory.
        next: Vec<u16>,
        /// Per head: descriptors of its chain in flight, 0 when not in flight.
        chain_len: Vec<u16>,
        free_head: u16,
        num_free: u16,
        in_flight: u16,
        /// Next available index to use (published by [`kick`](Self::kick)).
        avail_idx: u16,
        /// Available index as last published.
        published: u16,
        last_used: u16,
    }

    impl DriverQueue {
        /// Sets up a queue at `layout` in `mem`: zeroes the descriptor table and
        /// both rings and puts every descriptor on the free list.
        pub fn new(mem: &mut dyn GuestMemory, layout: QueueLayout) -> Result<Self, RingError> {
            layout.validate()?;
            let n = u64::from(layout.size);
            zero(mem, layout.desc, DESC_SIZE * n)?;
            zero(mem, layout.avail, 6 + 2 * n)?;
            zero(mem, layout.used, 6 + 8 * n)?;
            let size = usize::from(layout.size);
            Ok(Self {
                layout,
                // The last entry's link is never followed while it is the last free one.
                next: (1..=size).map(|i| (i % size) as u16).collect(),
                chain_len: vec![0; size],
                free_head: 0,
                num_free: layout.size,
                in_flight: 0,
                avail_idx: 0,
                published: 0,
                last_used: 0,
            })
        }

        /// The layout the queue was created with.
        pub fn layout(&self) -> &QueueLayout {
            &self.layout
        }

        /// Free descriptors.
        pub fn num_free(&self) -> u16 {
            self.num_free
        }

        /// Chains added and not yet returned by the device.
        pub fn in_flight(&self) -> u16 {
            self.in_flight
        }

        /// Next available index (chains added so far, modulo 2^16).
        pub fn avail_idx(&self) -> u16 {
            self.avail_idx
        }

        /// Used entries consumed so far (modulo 2^16).
        pub fn last_used_idx(&self) -> u16 {
            self.last_used
        }

        /// Adds a chain of device-readable then device-writable buffers
        /// (`(address, length)` each) and returns its head. With
        /// `indirect_table_at`, the buffers go into an indirect table written at that
        /// address (16 bytes per buffer; the caller owns that memory until the
        /// chain is returned) and the chain takes one ring descriptor, as Linux does
        /// for every control command. The chain is not visible to the device until
        /// [`kick`](Self::kick). On error the queue is unchanged.
        pub fn add(
            &mut self,
            mem: &mut dyn GuestMemory,
            readable: &[(Gpa, u32)],
            writable: &[(Gpa, u32)],
            indirect_table_at: Option<Gpa>,
        ) -> Result<u16, RingError> {
            let n = readable.len() + writable.len();
            if n == 0 {
                return Err(RingError::EmptyChain);
            }
            let total: u64 = readable
                .iter()
                .chain(writable)
                .map(|&(_, len)| u64::from(len))
                .sum();
            if total > u64::from(u32::MAX) {
                return Err(RingError::LengthOverflow);
            }
            let bufs = readable
                .iter()
                .map(|&b| (b, 0))
                .chain(writable.iter().map(|&b| (b, DESC_F_WRITE)));
            let head = self.free_head;
            let used_descs = match indirect_table_at {
                Some(table) => {
                    if !self.layout.indirect {
                        return Err(RingError::IndirectNotNegotiated);
                    }
                    if n > limits::MAX_INDIRECT_DESCRIPTORS {
                        return Err(RingError::IndirectTooLarge);
                    }
                    if self.num_free == 0 {
                        return Err(RingError::QueueFull);
                    }
                    let mut bytes = Vec::with_capacity(n * Desc::SIZE);
                    for (i, ((addr, len), write)) in bufs.enumerate() {
                        let last = i + 1 == n;
                        let d = Desc {
                            addr: addr.get(),
                            len,
                            flags: write | if last { 0 } else { DESC_F_NEXT },
                            next: if last { 0 } else { (i + 1) as u16 },
                        };
                        bytes.extend_from_slice(&d.bytes());
                    }
                    mem.write(table, &bytes)?;
                    let d = Desc {
                        addr: table.get(),
                        len: (n * Desc::SIZE) as u32,
                        flags: DESC_F_INDIRECT,
                        next: self.next[usize::from(head)],
                    };
                    mem.write(self.layout.desc_addr(head), &d.bytes())?;
                    1
                }
                None => {
                    if n > usize::from(self.layout.size) {
                        return Err(RingError::ChainTooLong);
                    }
                    if n > usize::from(self.num_free) {
                        return Err(RingError::QueueFull);
                    }
                    let mut idx = head;
                    for (i, ((addr, len), write)) in bufs.enumerate() {
                        let next = self.next[usize::from(idx)];
                        let d = Desc {
                            addr: addr.get(),
                            len,
                            flags: write | if i + 1 == n { 0 } else { DESC_F_NEXT },
                            next,
                        };
                        mem.write(self.layout.desc_addr(idx), &d.bytes())?;
                        idx = next;
                    }
                    n as u16
                }
            };
            mem.write(
                self.layout.avail_ring_addr(self.avail_idx),
                &head.to_le_bytes(),
            )?;
            // Commit: take the descriptors off the free list.
            let mut tail = head;
            for _ in 1..used_descs {
                tail = self.next[usize::from(tail)];
            }
            self.free_head = self.next[usize::from(tail)];
            self.num_free -= used_descs;
            self.chain_len[usize::from(head)] = used_descs;
            self.in_flight += 1;
            self.avail_idx = self.avail_idx.wrapping_add(1);
            Ok(head)
        }

        /// Publishes the chains added since the last kick (`avail.idx`) and returns
        /// whether the device wants a notification for them: with event idx, whether
        /// the new index passed the device's `avail_event`; otherwise whether the
        /// device left `VIRTQ_USED_F_NO_NOTIFY` clear. False when nothing was added.
        pub fn kick(&mut self, mem: &mut dyn GuestMemory) -> Result<bool, RingError> {
            let old = self.published;
            let new = self.avail_idx;
            if old == new {
                return Ok(false);
            }
            // Ring entries and descriptors before the index that publishes them.
            fence(Ordering::Release);
            write_u16(mem, self.layout.avail_idx_addr(), new)?;
            self.published = new;
            // The index write before reading the device's suppression fields.
            fence(Ordering::SeqCst);
            if self.layout.event_idx {
                let event = read_u16(mem, self.layout.avail_event_addr())?;
                Ok(need_event(event, new, old))
            } else {
                let flags = read_u16(mem, self.layout.used_flags_addr())?;
                Ok(flags & USED_F_NO_NOTIFY == 0)
            }
        }

        /// Takes the next used entry: `(head, bytes the device wrote)`, or `None`
        /// when the device has returned nothing new. The chain's descriptors go
        /// back on the free list (and an indirect table back to the caller).
        pub fn take_used(
            &mut self,
            mem: &dyn GuestMemory,
        ) -> Result<Option<(u16, u32)>, RingError> {
            let used_idx = read_u16(mem, self.layout.used_idx_addr())?;
            let ready = used_idx.wrapping_sub(self.last_used);
            if ready == 0 {
                return Ok(None);
            }
            if ready > self.in_flight {
                return Err(RingError::UsedIdxJump);
            }
            // Entries are read only after the index that published them.
            fence(Ordering::Acquire);
            let mut elem = [0u8; 8];
            mem.read(self.layout.used_ring_addr(self.last_used), &mut elem)?;
            let [i0, i1, i2, i3, l0, l1, l2, l3] = elem;
            let id = u32::from_le_bytes([i0, i1, i2, i3]);
            let len = u32::from_le_bytes([l0, l1, l2, l3]);
            let head = u16::try_from(id)
                .ok()
                .filter(|&h| h < self.layout.size)
                .ok_or(RingError::HeadOutOfRange)?;
            let count = self.chain_len[usize::from(head)];
            if count == 0 {
                return Err(RingError::UsedIdNotInFlight);
            }
            let mut tail = head;
            for _ in 1..count {
                tail = self.next[usize::from(tail)];
            }
            self.next[usize::from(tail)] = self.free_head;
            self.free_head = head;
            self.num_free += count;
            self.chain_len[usize::from(head)] = 0;
            self.in_flight -= 1;
            self.last_used = self.last_used.wrapping_add(1);
            Ok(Some((head, len)))
        }

        /// With event idx, writes `used_event`: the device interrupts once its used
        /// index moves past `event` (pass [`last_used_idx`](Self::last_used_idx) to be
        /// told about the next entry). Without event idx this does nothing.
        pub fn set_used_event(
            &self,
            mem: &mut dyn GuestMemory,
            event: u16,
        ) -> Result<(), RingError> {
            if !self.layout.event_idx {
                return Ok(());
            }
            write_u16(mem, self.layout.used_event_addr(), event)?;
            fence(Ordering::SeqCst);
            Ok(())
        }

        /// Sets or clears `VIRTQ_AVAIL_F_NO_INTERRUPT` (meaningful without event
        /// idx; the device ignores it otherwise).
        pub fn set_no_interrupt(
            &self,
            mem: &mut dyn GuestMemory,
            on: bool,
        ) -> Result<(), RingError> {
            let flags = if on { AVAIL_F_NO_INTERRUPT } else { 0 };
            write_u16(mem, self.layout.avail_flags_addr(), flags)
        }
    }

    fn zero(mem: &mut dyn GuestMemory, mut at: Gpa, len: u64) -> Result<(), RingError> {
        const CHUNK: [u8; 256] = [0; 256];
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK.len() as u64);
            mem.write(at, &CHUNK[..n as usize])?;
            at = at.offset(n);
            left -= n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::driver::DriverQueue;
    use super::*;
    use crate::memory::{Hpa, VecMemory};
    use proptest::prelude::*;

    const RAM: usize = 0x10000;
    const DESC: Gpa = Gpa::new(0x1000);
    const AVAIL: Gpa = Gpa::new(0x2000);
    const USED: Gpa = Gpa::new(0x3000);
    const TABLE: Gpa = Gpa::new(0x4000);
    const BUF: Gpa = Gpa::new(0x8000);

    fn layout(size: u16, event_idx: bool, indirect: bool) -> QueueLayout {
        QueueLayout {
            size,
            desc: DESC,
            avail: AVAIL,
            used: USED,
            event_idx,
            indirect,
        }
    }

    /// A driver and a device on the same fresh queue.
    fn pair(size: u16, event_idx: bool, indirect: bool) -> (VecMemory, DriverQueue, DeviceQueue) {
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0x1_0000_0000), RAM);
        let l = layout(size, event_idx, indirect);
        let drv = DriverQueue::new(&mut mem, l).unwrap();
        let dev = DeviceQueue::new(l).unwrap();
        (mem, drv, dev)
    }

    fn put_desc(mem: &mut VecMemory, at: Gpa, addr: Gpa, len: u32, flags: u16, next: u16) {
        let d = Desc {
            addr: addr.get(),
            len,
            flags,
            next,
        };
        mem.write(at, &d.bytes()).unwrap();
    }

    /// Writes descriptor `i` of the queue table.
    fn desc(mem: &mut VecMemory, i: u16, addr: Gpa, len: u32, flags: u16, next: u16) {
        put_desc(mem, DESC.offset(16 * u64::from(i)), addr, len, flags, next);
    }

    /// Makes `heads` available by hand (what a hostile driver would do).
    fn publish(mem: &mut VecMemory, size: u16, start: u16, heads: &[u16]) {
        let mut idx = start;
        for &h in heads {
            let slot = u64::from(idx % size);
            mem.write(AVAIL.offset(4 + 2 * slot), &h.to_le_bytes())
                .unwrap();
            idx = idx.wrapping_add(1);
        }
        mem.write(AVAIL.offset(2), &idx.to_le_bytes()).unwrap();
    }

    /// Pops one chain from a hand-built ring with head 0.
    fn pop_head0(mem: &mut VecMemory, l: QueueLayout) -> Result<Option<Chain>, RingError> {
        publish(mem, l.size, 0, &[0]);
        let mut dev = DeviceQueue::new(l).unwrap();
        dev.pop(mem)
    }

    fn seg(gpa: Gpa, len: u32) -> Segment {
        Segment { gpa, len }
    }

    #[test]
    fn layout_is_validated() {
        for size in [0u16, 3, 100, 65535] {
            assert_eq!(
                DeviceQueue::new(layout(size, false, false)).err(),
                Some(RingError::BadQueueSize)
            );
        }
        for size in [1u16, 2, 64, 32768] {
            assert!(DeviceQueue::new(layout(size, false, false)).is_ok());
        }
        let misaligned = [
            QueueLayout {
                desc: DESC.offset(8),
                ..layout(4, false, false)
            },
            QueueLayout {
                avail: AVAIL.offset(1),
                ..layout(4, false, false)
            },
            QueueLayout {
                used: USED.offset(2),
                ..layout(4, false, false)
            },
        ];
        for l in misaligned {
            assert_eq!(DeviceQueue::new(l).err(), Some(RingError::Misaligned));
        }
        let top = Gpa::new(u64::MAX - 15);
        let overflowing = [
            QueueLayout {
                desc: top,
                ..layout(4, false, false)
            },
            QueueLayout {
                avail: Gpa::new(u64::MAX - 7),
                ..layout(4, false, false)
            },
            QueueLayout {
                used: Gpa::new(u64::MAX - 11),
                ..layout(4, false, false)
            },
        ];
        for l in overflowing {
            assert_eq!(DeviceQueue::new(l).err(), Some(RingError::LayoutOverflow));
        }
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        assert_eq!(
            DriverQueue::new(&mut mem, layout(6, false, false)).err(),
            Some(RingError::BadQueueSize)
        );
        let outside = QueueLayout {
            used: Gpa::new(RAM as u64),
            ..layout(4, false, false)
        };
        assert_eq!(
            DriverQueue::new(&mut mem, outside).err(),
            Some(RingError::Memory(MemError::OutOfRange))
        );
    }

    #[test]
    fn linux_control_command_is_one_indirect_descriptor_1r_1w() {
        let (mut mem, mut drv, mut dev) = pair(64, true, true);
        let req: Vec<u8> = (0..48u8).collect();
        mem.write(BUF, &req).unwrap();
        let head = drv
            .add(
                &mut mem,
                &[(BUF, 48)],
                &[(BUF.offset(0x100), 24)],
                Some(TABLE),
            )
            .unwrap();
        assert_eq!(
            drv.num_free(),
            63,
            "one ring descriptor for the whole command"
        );
        assert_eq!(dev.pending(&mem), Ok(0), "not visible before the kick");
        assert_eq!(drv.kick(&mut mem), Ok(true));
        assert_eq!(dev.pending(&mem), Ok(1));

        let chain = dev.pop(&mem).unwrap().unwrap();
        assert_eq!(chain.head, head);
        assert_eq!(chain.readable, [seg(BUF, 48)]);
        assert_eq!(chain.writable, [seg(BUF.offset(0x100), 24)]);
        assert_eq!((chain.readable_len(), chain.writable_len()), (48, 24));
        let mut staging = Vec::new();
        assert_eq!(gather(&mem, &chain.readable, &mut staging, 4096), Ok(48));
        assert_eq!(staging, req);

        let resp = [0xabu8; 24];
        assert_eq!(scatter(&mut mem, &chain.writable, &resp), Ok(24));
        let old = dev.used_idx();
        dev.push_used(&mut mem, chain.head, 24).unwrap();
        assert_eq!(dev.should_notify(&mem, old), Ok(true));
        assert_eq!(dev.pop(&mem), Ok(None));

        assert_eq!(drv.take_used(&mem), Ok(Some((head, 24))));
        assert_eq!(drv.take_used(&mem), Ok(None));
        assert_eq!(drv.num_free(), 64);
        let mut back = [0u8; 24];
        mem.read(BUF.offset(0x100), &mut back).unwrap();
        assert_eq!(back, resp);
    }

    #[test]
    fn linux_attach_backing_is_indirect_2r_1w_and_gathers_in_order() {
        let (mut mem, mut drv, mut dev) = pair(64, true, true);
        mem.write(BUF, &[1u8; 32]).unwrap();
        mem.write(BUF.offset(0x1000), &[2u8; 16 * 3]).unwrap();
        let head = drv
            .add(
                &mut mem,
                &[(BUF, 32), (BUF.offset(0x1000), 48)],
                &[(BUF.offset(0x2000), 24)],
                Some(TABLE),
            )
            .unwrap();
        drv.kick(&mut mem).unwrap();
        let chain = dev.pop(&mem).unwrap().unwrap();
        assert_eq!(chain.head, head);
        assert_eq!(chain.readable, [seg(BUF, 32), seg(BUF.offset(0x1000), 48)]);
        assert_eq!(chain.writable, [seg(BUF.offset(0x2000), 24)]);
        let mut staging = vec![9u8];
        assert_eq!(gather(&mem, &chain.readable, &mut staging, 80), Ok(80));
        assert_eq!(staging.len(), 81, "gather appends");
        assert!(staging[1..33].iter().all(|&b| b == 1));
        assert!(staging[33..].iter().all(|&b| b == 2));
    }

    #[test]
    fn linux_cursor_command_is_one_direct_readable_descriptor() {
        let (mut mem, mut drv, mut dev) = pair(16, true, true);
        let head = drv.add(&mut mem, &[(BUF, 56)], &[], None).unwrap();
        assert_eq!(drv.num_free(), 15);
        drv.kick(&mut mem).unwrap();
        let chain = dev.pop(&mem).unwrap().unwrap();
        assert_eq!(chain.head, head);
        assert_eq!(chain.readable, [seg(BUF, 56)]);
        assert!(chain.writable.is_empty());
        assert_eq!(scatter(&mut mem, &chain.writable, &[1, 2, 3]), Ok(0));
        dev.push_used(&mut mem, head, 0).unwrap();
        assert_eq!(drv.take_used(&mem), Ok(Some((head, 0))));
        assert_eq!(drv.num_free(), 16);
    }

    #[test]
    fn direct_chains_link_descriptors_and_are_freed() {
        let (mut mem, mut drv, mut dev) = pair(8, false, false);
        let a = drv
            .add(
                &mut mem,
                &[(BUF, 4), (BUF.offset(4), 4)],
                &[(BUF.offset(8), 8)],
                None,
            )
            .unwrap();
        let b = drv
            .add(&mut mem, &[(BUF.offset(16), 1)], &[], None)
            .unwrap();
        assert_eq!(drv.num_free(), 4);
        assert_eq!(drv.in_flight(), 2);
        assert_eq!(drv.kick(&mut mem), Ok(true));
        let ca = dev.pop(&mem).unwrap().unwrap();
        let cb = dev.pop(&mem).unwrap().unwrap();
        assert_eq!((ca.head, cb.head), (a, b));
        assert_eq!(ca.readable, [seg(BUF, 4), seg(BUF.offset(4), 4)]);
        assert_eq!(ca.writable, [seg(BUF.offset(8), 8)]);
        assert_eq!(cb.readable, [seg(BUF.offset(16), 1)]);
        // Out-of-order completion.
        dev.push_used(&mut mem, b, 0).unwrap();
        dev.push_used(&mut mem, a, 8).unwrap();
        assert_eq!(drv.take_used(&mem), Ok(Some((b, 0))));
        assert_eq!(drv.take_used(&mem), Ok(Some((a, 8))));
        assert_eq!(drv.num_free(), 8);
        // The whole queue can be used again as one chain.
        let all: Vec<(Gpa, u32)> = (0..8).map(|i| (BUF.offset(i), 1)).collect();
        let h = drv.add(&mut mem, &all, &[], None).unwrap();
        drv.kick(&mut mem).unwrap();
        let c = dev.pop(&mem).unwrap().unwrap();
        assert_eq!((c.head, c.readable.len()), (h, 8));
    }

    #[test]
    fn direct_descriptors_followed_by_an_indirect_one_are_accepted() {
        // virtio 1.2, 2.7.5.3.2: the device must handle this shape.
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        desc(&mut mem, 0, BUF, 8, DESC_F_NEXT, 1);
        // The WRITE flag of the descriptor pointing at the table is ignored.
        desc(&mut mem, 1, TABLE, 32, DESC_F_INDIRECT | DESC_F_WRITE, 0);
        put_desc(&mut mem, TABLE, BUF.offset(8), 8, DESC_F_NEXT, 1);
        put_desc(
            &mut mem,
            TABLE.offset(16),
            BUF.offset(16),
            8,
            DESC_F_WRITE,
            0,
        );
        let c = pop_head0(&mut mem, layout(4, false, true))
            .unwrap()
            .unwrap();
        assert_eq!(c.readable, [seg(BUF, 8), seg(BUF.offset(8), 8)]);
        assert_eq!(c.writable, [seg(BUF.offset(16), 8)]);
    }

    #[test]
    fn event_idx_notifications_follow_used_event_and_avail_event() {
        let (mut mem, mut drv, mut dev) = pair(8, true, false);
        // Driver: interrupt me only once the used index passes 2 (3 entries).
        drv.set_used_event(&mut mem, 2).unwrap();
        for i in 0..3 {
            drv.add(&mut mem, &[(BUF.offset(i), 1)], &[], None).unwrap();
        }
        drv.kick(&mut mem).unwrap();
        let mut notified = Vec::new();
        while let Some(c) = dev.pop(&mem).unwrap() {
            let old = dev.used_idx();
            dev.push_used(&mut mem, c.head, 0).unwrap();
            notified.push(dev.should_notify(&mem, old).unwrap());
        }
        assert_eq!(notified, [false, false, true]);
        while drv.take_used(&mem).unwrap().is_some() {}
        // A batch that jumps over used_event notifies once.
        drv.set_used_event(&mut mem, 4).unwrap();
        for i in 0..3 {
            drv.add(&mut mem, &[(BUF.offset(i), 1)], &[], None).unwrap();
        }
        drv.kick(&mut mem).unwrap();
        let old = dev.used_idx();
        while let Some(c) = dev.pop(&mem).unwrap() {
            dev.push_used(&mut mem, c.head, 0).unwrap();
        }
        assert_eq!(dev.should_notify(&mem, old), Ok(true));
        assert_eq!(dev.should_notify(&mem, dev.used_idx()), Ok(false));
        while drv.take_used(&mem).unwrap().is_some() {}
        // The no-interrupt flag is ignored with event idx.
        drv.set_no_interrupt(&mut mem, true).unwrap();
        drv.set_used_event(&mut mem, dev.used_idx()).unwrap();
        drv.add(&mut mem, &[(BUF, 1)], &[], None).unwrap();
        drv.kick(&mut mem).unwrap();
        let c = dev.pop(&mem).unwrap().unwrap();
        let old = dev.used_idx();
        dev.push_used(&mut mem, c.head, 0).unwrap();
        assert_eq!(dev.should_notify(&mem, old), Ok(true));

        // Device side: avail_event = last_avail_idx means "kick me for the next".
        dev.set_avail_event(&mut mem).unwrap();
        drv.add(&mut mem, &[(BUF, 1)], &[], None).unwrap();
        drv.add(&mut mem, &[(BUF, 1)], &[], None).unwrap();
        assert_eq!(drv.kick(&mut mem), Ok(true));
        // Not taken yet and avail_event unchanged: more chains need no kick.
        drv.add(&mut mem, &[(BUF, 1)], &[], None).unwrap();
        assert_eq!(drv.kick(&mut mem), Ok(false));
        assert_eq!(drv.kick(&mut mem), Ok(false), "nothing new");
        assert_eq!(dev.pending(&mem), Ok(3));
    }

    #[test]
    fn without_event_idx_the_flags_suppress_notifications() {
        let (mut mem, mut drv, mut dev) = pair(4, false, false);
        drv.set_no_interrupt(&mut mem, true).unwrap();
        // set_avail_event does nothing without event idx.
        dev.set_avail_event(&mut mem).unwrap();
        assert!(mem.bytes[USED.offset(4 + 8 * 4).get() as usize..][..2] == [0, 0]);
        drv.add(&mut mem, &[(BUF, 1)], &[], None).unwrap();
        assert_eq!(drv.kick(&mut mem), Ok(true));
        let c = dev.pop(&mem).unwrap().unwrap();
        dev.push_used(&mut mem, c.head, 0).unwrap();
        assert_eq!(dev.should_notify(&mem, 0), Ok(false));
        drv.set_no_interrupt(&mut mem, false).unwrap();
        assert_eq!(dev.should_notify(&mem, 0), Ok(true));
        // The device's NO_NOTIFY flag suppresses kicks.
        mem.write(USED, &USED_F_NO_NOTIFY.to_le_bytes()).unwrap();
        drv.add(&mut mem, &[(BUF, 1)], &[], None).unwrap();
        assert_eq!(drv.kick(&mut mem), Ok(false));
        // set_used_event does nothing without event idx.
        drv.set_used_event(&mut mem, 0x1234).unwrap();
        assert!(mem.bytes[AVAIL.offset(4 + 2 * 4).get() as usize..][..2] == [0, 0]);
    }

    #[test]
    fn need_event_matches_the_linux_definition() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 10, 0));
        assert!(!need_event(10, 10, 0));
        assert!(need_event(0xffff, 0, 0xfffe), "across the wrap");
        assert!(need_event(0xfffe, 2, 0xfff0));
        assert!(!need_event(3, 2, 0xfff0));
    }

    #[test]
    fn indices_wrap_around_16_bits() {
        let (mut mem, mut drv, mut dev) = pair(8, true, true);
        let mut batches = 0u32;
        // Runs the free-running indices past 65535 twice, in batches of 1..=4.
        let mut served = 0u32;
        while served < 140_000 {
            let n = batches % 4 + 1;
            let mut heads = Vec::new();
            for i in 0..n {
                let table = if i % 2 == 0 {
                    Some(TABLE.offset(0x100 * u64::from(i)))
                } else {
                    None
                };
                heads.push(
                    drv.add(&mut mem, &[(BUF, 4)], &[(BUF.offset(8), 4)], table)
                        .unwrap(),
                );
            }
            drv.kick(&mut mem).unwrap();
            assert_eq!(dev.pending(&mem), Ok(n as u16));
            let mut popped = Vec::new();
            while let Some(c) = dev.pop(&mem).unwrap() {
                popped.push(c.head);
                dev.push_used(&mut mem, c.head, 4).unwrap();
            }
            assert_eq!(popped, heads);
            for h in heads {
                assert_eq!(drv.take_used(&mem), Ok(Some((h, 4))));
            }
            served += n;
            batches += 1;
        }
        assert_eq!(dev.last_avail_idx(), (served % 65536) as u16);
        assert_eq!(dev.used_idx(), (served % 65536) as u16);
        assert_eq!(drv.avail_idx(), dev.last_avail_idx());
        assert_eq!(drv.last_used_idx(), dev.used_idx());
        assert_eq!(drv.num_free(), 8);
    }

    #[test]
    fn pending_handles_wrap_and_rejects_jumps() {
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        let l = layout(8, false, false);
        let mut dev = DeviceQueue::new(l).unwrap();
        desc(&mut mem, 0, BUF, 1, 0, 0);
        // Bring last_avail_idx to 65534 by serving chains.
        publish(&mut mem, 8, 0, &[0; 0]);
        let mut idx = 0u16;
        while idx != 65534 {
            let n = (65534u16 - idx).min(8);
            publish(&mut mem, 8, idx, &vec![0; usize::from(n)]);
            for _ in 0..n {
                dev.pop(&mem).unwrap().unwrap();
                dev.push_used(&mut mem, 0, 0).unwrap();
            }
            idx = idx.wrapping_add(n);
        }
        assert_eq!(dev.last_avail_idx(), 65534);
        publish(&mut mem, 8, 65534, &[0; 4]); // avail.idx = 2 after the wrap
        assert_eq!(dev.pending(&mem), Ok(4));
        mem.write(AVAIL.offset(2), &7u16.to_le_bytes()).unwrap(); // 9 ahead of 65534
        assert_eq!(dev.pending(&mem), Err(RingError::AvailIdxJump));
        assert_eq!(dev.pop(&mem), Err(RingError::AvailIdxJump));
        mem.write(AVAIL.offset(2), &65533u16.to_le_bytes()).unwrap(); // behind
        assert_eq!(dev.pending(&mem), Err(RingError::AvailIdxJump));
    }

    #[test]
    fn reset_returns_indices_to_zero() {
        let (mut mem, mut drv, mut dev) = pair(4, false, false);
        drv.add(&mut mem, &[(BUF, 1)], &[], None).unwrap();
        drv.kick(&mut mem).unwrap();
        let c = dev.pop(&mem).unwrap().unwrap();
        dev.push_used(&mut mem, c.head, 0).unwrap();
        dev.reset();
        assert_eq!((dev.last_avail_idx(), dev.used_idx()), (0, 0));
        let mut drv = DriverQueue::new(&mut mem, *dev.layout()).unwrap();
        drv.add(&mut mem, &[(BUF, 2)], &[], None).unwrap();
        drv.kick(&mut mem).unwrap();
        assert_eq!(dev.pop(&mem).unwrap().unwrap().readable, [seg(BUF, 2)]);
    }

    #[test]
    fn bad_heads_and_nexts_are_typed_errors() {
        let l = layout(4, false, true);
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        publish(&mut mem, 4, 0, &[4]);
        let mut dev = DeviceQueue::new(l).unwrap();
        assert_eq!(dev.pop(&mem), Err(RingError::HeadOutOfRange));
        assert_eq!(dev.last_avail_idx(), 0, "nothing consumed on error");
        assert_eq!(dev.pop(&mem), Err(RingError::HeadOutOfRange));
        assert_eq!(
            dev.push_used(&mut mem, 4, 0),
            Err(RingError::HeadOutOfRange)
        );

        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        desc(&mut mem, 0, BUF, 1, DESC_F_NEXT, 4);
        assert_eq!(pop_head0(&mut mem, l), Err(RingError::NextOutOfRange));

        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        desc(&mut mem, 0, TABLE, 32, DESC_F_INDIRECT, 0);
        put_desc(&mut mem, TABLE, BUF, 1, DESC_F_NEXT, 2);
        assert_eq!(pop_head0(&mut mem, l), Err(RingError::NextOutOfRange));
    }

    #[test]
    fn loops_are_detected_direct_and_indirect() {
        let l = layout(8, false, true);
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        desc(&mut mem, 0, BUF, 1, DESC_F_NEXT, 0);
        assert_eq!(pop_head0(&mut mem, l), Err(RingError::Loop), "self loop");

        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        desc(&mut mem, 0, BUF, 1, DESC_F_NEXT, 1);
        desc(&mut mem, 1, BUF, 1, DESC_F_NEXT, 2);
        desc(&mut mem, 2, BUF, 1, DESC_F_NEXT, 1);
        assert_eq!(pop_head0(&mut mem, l), Err(RingError::Loop));

        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        desc(&mut mem, 0, TABLE, 48, DESC_F_INDIRECT, 0);
        put_desc(&mut mem, TABLE, BUF, 1, DESC_F_NEXT, 2);
        put_desc(&mut mem, TABLE.offset(32), BUF, 1, DESC_F_NEXT, 0);
        assert_eq!(pop_head0(&mut mem, l), Err(RingError::Loop));
    }

    #[test]
    fn chains_longer_than_the_limit_are_refused() {
        // A loop-free chain of MAX_CHAIN_DESCRIPTORS + 1 buffers in a big queue.
        let n = limits::MAX_CHAIN_DESCRIPTORS + 1;
        let (mut mem, mut drv, mut dev) = pair(512, false, true);
        let bufs: Vec<(Gpa, u32)> = (0..n as u64).map(|i| (BUF.offset(i), 1)).collect();
        drv.add(&mut mem, &bufs, &[], None).unwrap();
        drv.kick(&mut mem).unwrap();
        assert_eq!(dev.pop(&mem), Err(RingError::ChainTooLong));

        // Exactly the limit is fine.
        let (mut mem, mut drv, mut dev) = pair(512, false, true);
        drv.add(&mut mem, &bufs[1..], &[], None).unwrap();
        drv.kick(&mut mem).unwrap();
        assert_eq!(dev.pop(&mem).unwrap().unwrap().readable.len(), n - 1);

        // A direct buffer plus a full indirect table is one too many.
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        desc(&mut mem, 0, BUF, 1, DESC_F_NEXT, 1);
        let table_len = limits::MAX_INDIRECT_DESCRIPTORS as u32 * 16;
        desc(&mut mem, 1, TABLE, table_len, DESC_F_INDIRECT, 0);
        for i in 0..limits::MAX_INDIRECT_DESCRIPTORS as u16 {
            put_desc(
                &mut mem,
                TABLE.offset(16 * u64::from(i)),
                BUF,
                1,
                DESC_F_NEXT,
                i + 1,
            );
        }
        put_desc(
            &mut mem,
            TABLE.offset(u64::from(table_len) - 16),
            BUF,
            1,
            0,
            0,
        );
        let l = layout(4, false, true);
        assert_eq!(pop_head0(&mut mem, l), Err(RingError::ChainTooLong));
        // Without the direct one, the full table is accepted.
        desc(&mut mem, 0, TABLE, table_len, DESC_F_INDIRECT, 0);
        let c = pop_head0(&mut mem, l).unwrap().unwrap();
        assert_eq!(c.readable.len(), limits::MAX_INDIRECT_DESCRIPTORS);
    }

    #[test]
    fn indirect_misuse_is_refused() {
        let l = layout(4, false, true);
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        desc(&mut mem, 0, TABLE, 16, DESC_F_INDIRECT, 0);
        put_desc(&mut mem, TABLE, BUF, 16, DESC_F_INDIRECT, 0);
        assert_eq!(pop_head0(&mut mem, l), Err(RingError::NestedIndirect));

        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        desc(&mut mem, 0, TABLE, 16, DESC_F_INDIRECT, 0);
        put_desc(&mut mem, TABLE, BUF, 1, 0, 0);
        assert_eq!(
            pop_head0(&mut mem, layout(4, false, false)),
            Err(RingError::IndirectNotNegotiated)
        );
        assert!(pop_head0(&mut mem, l).unwrap().is_some());

        desc(&mut mem, 0, TABLE, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1);
        assert_eq!(pop_head0(&mut mem, l), Err(RingError::IndirectWithNext));

        for len in [0u32, 8, 17, 24] {
            desc(&mut mem, 0, TABLE, len, DESC_F_INDIRECT, 0);
            assert_eq!(pop_head0(&mut mem, l), Err(RingError::BadIndirectSize));
        }
        let too_big = (limits::MAX_INDIRECT_DESCRIPTORS as u32 + 1) * 16;
        desc(&mut mem, 0, TABLE, too_big, DESC_F_INDIRECT, 0);
        assert_eq!(pop_head0(&mut mem, l), Err(RingError::IndirectTooLarge));
        desc(
            &mut mem,
            0,
            Gpa::new(RAM as u64 - 16),
            32,
            DESC_F_INDIRECT,
            0,
        );
        assert_eq!(
            pop_head0(&mut mem, l),
            Err(RingError::Memory(MemError::OutOfRange)),
            "table outside guest RAM"
        );
    }

    #[test]
    fn readable_after_writable_is_refused() {
        let l = layout(4, false, true);
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        desc(&mut mem, 0, BUF, 1, DESC_F_WRITE | DESC_F_NEXT, 1);
        desc(&mut mem, 1, BUF, 1, 0, 0);
        assert_eq!(
            pop_head0(&mut mem, l),
            Err(RingError::ReadableAfterWritable)
        );

        // Also across the switch from direct to indirect descriptors.
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        desc(&mut mem, 0, BUF, 1, DESC_F_WRITE | DESC_F_NEXT, 1);
        desc(&mut mem, 1, TABLE, 16, DESC_F_INDIRECT, 0);
        put_desc(&mut mem, TABLE, BUF, 1, 0, 0);
        assert_eq!(
            pop_head0(&mut mem, l),
            Err(RingError::ReadableAfterWritable)
        );
    }

    /// RAM the size of the address space below 2^40, all of it translating, backed
    /// by a small buffer for the bytes actually touched: for length limits that
    /// need huge but valid buffers.
    struct HugeMem(VecMemory);

    impl GuestMemory for HugeMem {
        fn translate(&self, gpa: Gpa, len: u64) -> Result<Hpa, MemError> {
            crate::memory::check_range(gpa, len, Gpa::new(0), 1 << 40)?;
            Ok(Hpa::new(gpa.get()))
        }
        fn read(&self, gpa: Gpa, out: &mut [u8]) -> Result<(), MemError> {
            self.0.read(gpa, out)
        }
        fn write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), MemError> {
            self.0.write(gpa, data)
        }
    }

    #[test]
    fn lengths_that_overflow_are_refused() {
        let l = layout(4, false, true);
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        desc(&mut mem, 0, Gpa::new(u64::MAX - 4), 8, 0, 0);
        assert_eq!(pop_head0(&mut mem, l), Err(RingError::LengthOverflow));

        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        desc(&mut mem, 0, Gpa::new(1 << 32), u32::MAX, DESC_F_NEXT, 1);
        desc(&mut mem, 1, Gpa::new(0), 1, 0, 0);
        publish(&mut mem, 4, 0, &[0]);
        let mut huge = HugeMem(mem);
        let mut dev = DeviceQueue::new(l).unwrap();
        assert_eq!(dev.pop(&huge), Err(RingError::LengthOverflow));
        // u32::MAX bytes in total is the most a chain may describe.
        desc(
            &mut huge.0,
            0,
            Gpa::new(1 << 32),
            u32::MAX - 1,
            DESC_F_NEXT,
            1,
        );
        let c = dev.pop(&huge).unwrap().unwrap();
        assert_eq!(c.readable_len(), u32::MAX);
        // gather refuses before allocating anything.
        let mut out = Vec::new();
        assert_eq!(
            gather(&huge, &c.readable, &mut out, limits::MAX_COMMAND_BYTES),
            Err(RingError::TooLarge)
        );
        assert!(out.is_empty());

        let (mut mem, mut drv, _) = pair(4, false, true);
        assert_eq!(
            drv.add(
                &mut mem,
                &[(Gpa::new(0), u32::MAX), (Gpa::new(0), 1)],
                &[],
                None
            ),
            Err(RingError::LengthOverflow)
        );
    }

    #[test]
    fn rings_and_buffers_outside_guest_ram_are_refused() {
        let out = RingError::Memory(MemError::OutOfRange);
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        let far = QueueLayout {
            desc: Gpa::new(0x10_0000),
            ..layout(4, false, false)
        };
        assert_eq!(pop_head0(&mut mem, far), Err(out), "descriptor table");
        let far = QueueLayout {
            avail: Gpa::new(0x10_0000),
            ..layout(4, false, false)
        };
        assert_eq!(
            DeviceQueue::new(far).unwrap().pop(&mem),
            Err(out),
            "avail ring"
        );
        let far = QueueLayout {
            used: Gpa::new(0x10_0000),
            ..layout(4, false, false)
        };
        let mut dev = DeviceQueue::new(far).unwrap();
        assert_eq!(dev.push_used(&mut mem, 0, 0), Err(out), "used ring");
        assert_eq!(dev.used_idx(), 0);

        let l = layout(4, false, false);
        desc(&mut mem, 0, Gpa::new(RAM as u64 - 4), 8, 0, 0);
        assert_eq!(
            pop_head0(&mut mem, l),
            Err(out),
            "buffer straddling the end"
        );
        desc(&mut mem, 0, Gpa::new(RAM as u64), 0, 0, 0);
        assert!(pop_head0(&mut mem, l).is_ok(), "empty buffer at the end");
        desc(&mut mem, 0, Gpa::new(RAM as u64 + 1), 0, 0, 0);
        assert_eq!(
            pop_head0(&mut mem, l),
            Err(out),
            "empty buffer past the end"
        );
    }

    /// Guest RAM that is host-contiguous only within each 4 KiB page, and whose
    /// page 5 belongs to someone else.
    struct PagedMem(VecMemory);

    impl GuestMemory for PagedMem {
        fn translate(&self, gpa: Gpa, len: u64) -> Result<Hpa, MemError> {
            let end = gpa.checked_add(len).ok_or(MemError::Overflow)?;
            if len > 0 && gpa.get() / 4096 != (end.get() - 1) / 4096 {
                return Err(MemError::OutOfRange);
            }
            if gpa.get() / 4096 == 5 {
                return Err(MemError::NotOwned);
            }
            self.0.translate(gpa, len)
        }
        fn read(&self, gpa: Gpa, out: &mut [u8]) -> Result<(), MemError> {
            self.0.read(gpa, out)
        }
        fn write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), MemError> {
            self.0.write(gpa, data)
        }
    }

    #[test]
    fn buffers_spanning_pages_are_checked_page_by_page() {
        let l = layout(4, false, false);
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        desc(&mut mem, 0, Gpa::new(0x6800), 0x2000, 0, 0);
        publish(&mut mem, 4, 0, &[0]);
        let mut paged = PagedMem(mem);
        let mut dev = DeviceQueue::new(l).unwrap();
        assert_eq!(dev.pop(&paged).unwrap().unwrap().readable_len(), 0x2000);
        dev.push_used(&mut paged, 0, 0).unwrap();
        desc(&mut paged.0, 0, Gpa::new(0x4800), 0x1000, 0, 0);
        publish(&mut paged.0, 4, 1, &[0]);
        assert_eq!(dev.pop(&paged), Err(RingError::Memory(MemError::NotOwned)));
    }

    #[test]
    fn gather_and_scatter_respect_limits_and_lengths() {
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(0), RAM);
        mem.write(BUF, b"hello world").unwrap();
        let segs = [seg(BUF, 5), seg(BUF.offset(5), 0), seg(BUF.offset(5), 6)];
        let mut out = b">".to_vec();
        assert_eq!(gather(&mem, &segs, &mut out, 10), Err(RingError::TooLarge));
        assert_eq!(out, b">");
        assert_eq!(gather(&mem, &segs, &mut out, 11), Ok(11));
        assert_eq!(out, b">hello world");
        let bad = [seg(BUF, 4), seg(Gpa::new(RAM as u64), 4)];
        assert_eq!(
            gather(&mem, &bad, &mut out, 100),
            Err(RingError::Memory(MemError::OutOfRange))
        );
        assert_eq!(out, b">hello world", "unchanged on error");

        let w = [seg(BUF.offset(0x100), 3), seg(BUF.offset(0x200), 3)];
        assert_eq!(scatter(&mut mem, &w, b"abcd"), Ok(4));
        assert_eq!(&mem.bytes[BUF.get() as usize + 0x100..][..3], b"abc");
        assert_eq!(&mem.bytes[BUF.get() as usize + 0x200..][..2], b"d\0");
        assert_eq!(scatter(&mut mem, &w, b"0123456789"), Ok(6), "truncated");
        let bad = [seg(Gpa::new(RAM as u64 - 1), 8)];
        assert_eq!(
            scatter(&mut mem, &bad, b"xy"),
            Err(RingError::Memory(MemError::OutOfRange))
        );
    }

    #[test]
    fn driver_refuses_bad_requests_and_a_misbehaving_device() {
        let (mut mem, mut drv, mut dev) = pair(4, false, false);
        assert_eq!(
            drv.add(&mut mem, &[], &[], None),
            Err(RingError::EmptyChain)
        );
        assert_eq!(
            drv.add(&mut mem, &[(BUF, 1)], &[], Some(TABLE)),
            Err(RingError::IndirectNotNegotiated)
        );
        let five: Vec<(Gpa, u32)> = (0..5).map(|i| (BUF.offset(i), 1)).collect();
        assert_eq!(
            drv.add(&mut mem, &five, &[], None),
            Err(RingError::ChainTooLong)
        );
        drv.add(&mut mem, &five[..3], &[], None).unwrap();
        assert_eq!(
            drv.add(&mut mem, &five[..2], &[], None),
            Err(RingError::QueueFull)
        );
        assert_eq!(drv.num_free(), 1, "failed adds change nothing");
        let h = drv.add(&mut mem, &five[..1], &[], None).unwrap();
        assert_eq!(
            drv.add(&mut mem, &five[..1], &[], None),
            Err(RingError::QueueFull)
        );
        drv.kick(&mut mem).unwrap();

        // The device names a head that is not in flight, or is out of range.
        let used_elem = USED.offset(4);
        mem.write(used_elem, &[1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        mem.write(USED.offset(2), &1u16.to_le_bytes()).unwrap();
        assert_eq!(drv.take_used(&mem), Err(RingError::UsedIdNotInFlight));
        mem.write(used_elem, &[4, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(drv.take_used(&mem), Err(RingError::HeadOutOfRange));
        mem.write(used_elem, &[0, 0, 1, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(drv.take_used(&mem), Err(RingError::HeadOutOfRange));
        mem.write(USED.offset(2), &3u16.to_le_bytes()).unwrap();
        assert_eq!(drv.take_used(&mem), Err(RingError::UsedIdxJump));
        mem.write(USED.offset(2), &0u16.to_le_bytes()).unwrap();
        assert_eq!(drv.in_flight(), 2);

        // A well-behaved device then works as usual.
        let a = dev.pop(&mem).unwrap().unwrap();
        let b = dev.pop(&mem).unwrap().unwrap();
        assert_eq!(b.head, h);
        dev.push_used(&mut mem, a.head, 0).unwrap();
        dev.push_used(&mut mem, b.head, 0).unwrap();
        assert_eq!(drv.take_used(&mem), Ok(Some((a.head, 0))));
        assert_eq!(drv.take_used(&mem), Ok(Some((h, 0))));
        assert_eq!(drv.num_free(), 4);

        let (mut mem, mut drv, _) = pair(4, false, true);
        let many: Vec<(Gpa, u32)> = (0..=limits::MAX_INDIRECT_DESCRIPTORS as u64)
            .map(|i| (BUF.offset(i), 1))
            .collect();
        assert_eq!(
            drv.add(&mut mem, &many, &[], Some(TABLE)),
            Err(RingError::IndirectTooLarge)
        );
        for _ in 0..4 {
            drv.add(&mut mem, &many[..2], &[], Some(TABLE)).unwrap();
        }
        assert_eq!(
            drv.add(&mut mem, &many[..2], &[], Some(TABLE)),
            Err(RingError::QueueFull)
        );
    }

    /// Makes raw descriptor bytes plausible: address near guest RAM (sometimes
    /// straddling its ends), short length, `next` around the table size. Flags
    /// stay arbitrary. Without this, random addresses almost never hit RAM.
    fn tame(table: &mut [u8], entries: u16) {
        for d in table.chunks_exact_mut(16) {
            if d[15] & 0x80 != 0 {
                continue; // leave this one entirely arbitrary
            }
            let addr = 0x0800 + u64::from_le_bytes(d[0..8].try_into().unwrap()) % 0x3900;
            let raw_flags = u16::from_le_bytes([d[12], d[13]]);
            // Mostly NEXT/WRITE; INDIRECT one time in eight, with a table length
            // that is usually a whole number of descriptors.
            let indirect = raw_flags & 0x1c == 0x1c;
            let flags = (raw_flags & 3) | if indirect { DESC_F_INDIRECT } else { 0 };
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            let len = match (indirect, len % 4) {
                (true, 0) => len % 0x1200,
                (true, _) => (len % 24) * 16,
                (false, _) => len % 0x900,
            };
            // Most tables start inside the tamed table area at 0x3000.
            let addr = if indirect && len % 3 != 0 {
                0x3000 + 16 * (addr % 32)
            } else {
                addr
            };
            let next = u16::from_le_bytes([d[14], d[15]]) % (entries + 1);
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
        }
    }

    /// A guest RAM image with a queue whose descriptor table, available ring and
    /// indirect-table area hold arbitrary (or, with `tamed`, plausible) bytes, and
    /// how far behind `avail.idx` the device starts.
    fn hostile_ring() -> impl Strategy<Value = (QueueLayout, VecMemory, u16)> {
        (
            0u32..=6,
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 64 * 16),
            proptest::collection::vec(any::<u8>(), 2 * 64 + 6),
            proptest::collection::vec(any::<u8>(), 512),
            any::<u16>(),
            0u8..4,
        )
            .prop_map(
                |(shift, event_idx, indirect, mut d, mut a, mut t, behind, wild)| {
                    // One case in four keeps the bytes entirely arbitrary.
                    let tamed = wild != 0;
                    let size = 1u16 << shift;
                    let n = usize::from(size);
                    if tamed {
                        tame(&mut d, size);
                        tame(&mut t, 32);
                        for head in a[4..4 + 2 * n].chunks_exact_mut(2) {
                            let h = u16::from_le_bytes([head[0], head[1]]) % (size + 1);
                            head.copy_from_slice(&h.to_le_bytes());
                        }
                    }
                    // Guest RAM is [0x1000, 0x4000): tables and buffers may leave it.
                    let mut mem = VecMemory::new(Gpa::new(0x1000), Hpa::new(0), 0x3000);
                    let l = QueueLayout {
                        size,
                        desc: Gpa::new(0x1000),
                        avail: Gpa::new(0x1800),
                        used: Gpa::new(0x1a00),
                        event_idx,
                        indirect,
                    };
                    mem.write(Gpa::new(0x1000), &d[..n * 16]).unwrap();
                    mem.write(Gpa::new(0x1800), &a[..n * 2 + 6]).unwrap();
                    mem.write(Gpa::new(0x3000), &t).unwrap();
                    let behind = if tamed { behind % (size + 2) } else { behind };
                    (l, mem, behind)
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_rings_never_panic_and_chains_stay_in_ram((l, mut mem, behind) in hostile_ring()) {
            let mut dev = DeviceQueue::new(l).unwrap();
            // The device stands `behind` entries behind the guest's avail.idx.
            let avail_idx = read_u16(&mem, l.avail.offset(2)).unwrap();
            dev.last_avail_idx = avail_idx.wrapping_sub(behind);
            let (lo, hi) = (mem.base, mem.base.offset(mem.bytes.len() as u64));
            for _ in 0..=l.size {
                match dev.pop(&mem) {
                    Ok(Some(c)) => {
                        prop_assert!(c.head < l.size);
                        let n = c.readable.len() + c.writable.len();
                        prop_assert!((1..=limits::MAX_CHAIN_DESCRIPTORS).contains(&n));
                        for s in c.readable.iter().chain(&c.writable) {
                            prop_assert!(s.gpa >= lo && s.gpa.offset(u64::from(s.len)) <= hi);
                        }
                        let mut out = Vec::new();
                        let got = gather(&mem, &c.readable, &mut out, limits::MAX_COMMAND_BYTES);
                        prop_assert_eq!(got, Ok(c.readable_len() as usize));
                        let written = scatter(&mut mem, &c.writable, &[0x5a; 64]).unwrap();
                        let old = dev.used_idx();
                        dev.push_used(&mut mem, c.head, written).unwrap();
                        dev.should_notify(&mem, old).unwrap();
                        dev.set_avail_event(&mut mem).unwrap();
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let before = dev.last_avail_idx();
                        prop_assert_eq!(dev.pop(&mem), Err(e), "errors are stable");
                        prop_assert_eq!(dev.last_avail_idx(), before);
                        break;
                    }
                }
            }
        }

        #[test]
        fn driver_and_device_agree_on_random_chains(
            chains in proptest::collection::vec(
                (1usize..4, 0usize..3, any::<bool>()), 1..40),
        ) {
            let (mut mem, mut drv, mut dev) = pair(8, true, true);
            for (i, &(r, w, ind)) in chains.iter().enumerate() {
                let base = BUF.offset(0x100 * (i as u64 % 16));
                let rd: Vec<(Gpa, u32)> = (0..r as u64).map(|k| (base.offset(k), 1)).collect();
                let wr: Vec<(Gpa, u32)> = (0..w as u64).map(|k| (base.offset(0x80 + k), 1)).collect();
                let table = ind.then_some(TABLE);
                let head = drv.add(&mut mem, &rd, &wr, table).unwrap();
                drv.kick(&mut mem).unwrap();
                let c = dev.pop(&mem).unwrap().unwrap();
                prop_assert_eq!(c.head, head);
                let segs = |v: &[(Gpa, u32)]| v.iter().map(|&(g, l)| seg(g, l)).collect::<Vec<_>>();
                prop_assert_eq!(&c.readable, &segs(&rd));
                prop_assert_eq!(&c.writable, &segs(&wr));
                dev.push_used(&mut mem, c.head, w as u32).unwrap();
                prop_assert_eq!(drv.take_used(&mem), Ok(Some((head, w as u32))));
                prop_assert_eq!(drv.num_free(), 8);
            }
        }
    }
}
