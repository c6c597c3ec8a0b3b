//! Snapshot and restore of one VM's GPU context, for live migration and
//! checkpointing.
//!
//! The format is a small versioned byte encoding, written and parsed by hand (no
//! serde in the kernel):
//!
//! ```text
//! magic "GPVS" | version u16 | reserved u16 (0) | body length u32 | body
//! body = field*, each: tag u16 | length u32 | bytes
//! ```
//!
//! all little endian. Version 1 has one field per tag in [`Tag`], each exactly once
//! and in tag order. A snapshot holds only guest-visible state (guest resource ids,
//! guest-physical backing, queue layouts and indices, fences, vectors, counters):
//! host ids and host addresses mean nothing on another host, so restore allocates
//! and translates them afresh.
//!
//! A snapshot is untrusted bytes like any guest input (it may come over the
//! network): restore parses everything into a plan first and checks every field —
//! lengths, counts, ids, formats, sizes, quota, rectangles, the backing through the
//! destination VM's memory (`P = V(i) AND M(i)`), the queue layouts — before it
//! changes anything, so a refused snapshot leaves the VM as it was.
//!
//! Only a quiescent context is snapshotted (nothing staged, on the GPU or
//! unanswered: the hypervisor stops serving the VM's doorbells and drains it
//! first, the seed's "blocking new command input"), so no command is lost. After a
//! restore the device contents are rebuilt by staged host commands (create, attach,
//! a full transfer from the backing, scanout and flush), since the physical
//! resources themselves do not travel. The cursor image is not rebuilt: the
//! guest's next `UPDATE_CURSOR` shows it again.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::abi::limits;
use crate::command::Command;
use crate::counters::{CountersError, VmCounters};
use crate::memory::{Gpa, GuestMemory, MemError};
use crate::ring::{DeviceQueue, QueueLayout, RingError};
use crate::sched::VmId;
use crate::wire::{format, MemEntry, Rect};

use super::validate::{
    backing_charge, command_charge, encoding_buffer, transfer_end, translate_backing,
    BACKING_SLACK, MIN_SCANOUT_EDGE,
};
use super::vm::{resource_bytes, Effect, HostRun, Resource, ScanoutState, Tracked, VmGpu};
use super::{BandCopy, Channel, EventKind, IommuOp, Mediator, QueueId, VmState};
use crate::budget::cost;

/// First bytes of every snapshot.
pub const SNAPSHOT_MAGIC: [u8; 4] = *b"GPVS";
/// Format version this code writes and reads.
pub const SNAPSHOT_VERSION: u16 = 1;

/// Bytes before the body: magic, version, reserved, body length.
const HEADER_LEN: usize = 12;

/// Field tags of version 1, in the order they appear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
enum Tag {
    /// Virtual display: scanout count and each scanout's size (must match).
    Display = 1,
    /// Context state (`VmState`) and whether the cursor was shown.
    State = 2,
    /// Both queues' layouts and indices.
    Queues = 3,
    /// MSI-X vectors: config, control, cursor.
    Vectors = 4,
    /// Fence state.
    Fences = 5,
    /// Resources and their guest-physical backing.
    Resources = 6,
    /// What each scanout shows.
    Scanouts = 7,
    /// The VM's counters (their own versioned encoding).
    Counters = 8,
}

const TAGS: [Tag; 8] = [
    Tag::Display,
    Tag::State,
    Tag::Queues,
    Tag::Vectors,
    Tag::Fences,
    Tag::Resources,
    Tag::Scanouts,
    Tag::Counters,
];

/// Why a snapshot could not be taken or restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotError {
    /// No VM by that id.
    UnknownVm(VmId),
    /// The VM has work staged, on the GPU or unanswered; drain it first.
    Busy,
    /// The VM's state does not allow it (a context that needs a reset is not
    /// snapshotted; restore needs a fresh context).
    WrongState(VmState),
    /// The target VM already holds resources or host ids.
    NotFresh,
    /// Not a snapshot.
    BadMagic,
    /// A version this code does not read.
    UnsupportedVersion(u16),
    /// The bytes end early, or a length disagrees with its contents.
    Truncated,
    /// Bytes left after the last field or inside one.
    TrailingBytes,
    /// A field is missing, repeated or out of order (expected tag, found tag).
    BadField {
        /// Tag expected.
        expected: u16,
        /// Tag found (0 when the body ended).
        found: u16,
    },
    /// The snapshot's virtual display differs from the target VM's.
    DisplayMismatch,
    /// A state, flag or count with a value no context can have.
    BadValue,
    /// A queue layout the device cannot use, or rings outside the VM's RAM.
    BadQueue(RingError),
    /// A resource id, format or size that is invalid, or a repeated id.
    BadResource(u32),
    /// Backing the destination VM does not own, or too long for its resource.
    BadBacking {
        /// Guest resource id.
        resource: u32,
        /// Why (`None`: a length problem).
        error: Option<MemError>,
    },
    /// The resources exceed the VM's quota or the free VRAM.
    Quota,
    /// A scanout showing an unknown resource or a rectangle outside it.
    BadScanout(u32),
    /// Fence ids that cannot be (signalled above submitted).
    BadFence,
    /// The counters did not decode.
    Counters(CountersError),
    /// The restored context would not fit in the VM's hypervisor memory budget.
    OverBudget,
}

/// Little-endian writer.
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn rect(&mut self, r: &Rect) {
        for v in [r.x, r.y, r.width, r.height] {
            self.u32(v);
        }
    }
    /// Writes field `tag` with the bytes `f` produces.
    fn field(&mut self, tag: Tag, f: impl FnOnce(&mut Writer)) {
        let mut inner = Writer(Vec::new());
        f(&mut inner);
        self.u16(tag as u16);
        // Fields are bounded by the limits on what they hold, far below 4 GiB.
        self.u32(inner.0.len() as u32);
        self.0.extend_from_slice(&inner.0);
    }
}

/// Bounds-checked little-endian reader.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if self.b.len() < n {
            return Err(SnapshotError::Truncated);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.array::<1>()?[0])
    }
    fn bool(&mut self) -> Result<bool, SnapshotError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(SnapshotError::BadValue),
        }
    }
    fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn rect(&mut self) -> Result<Rect, SnapshotError> {
        Ok(Rect {
            x: self.u32()?,
            y: self.u32()?,
            width: self.u32()?,
            height: self.u32()?,
        })
    }
    /// A count of items at least `item_size` bytes each, checked against the bytes
    /// left so that no allocation is sized by an unchecked number.
    fn count(&mut self, item_size: usize, max: usize) -> Result<usize, SnapshotError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(SnapshotError::BadValue);
        }
        if n.saturating_mul(item_size) > self.b.len() {
            return Err(SnapshotError::Truncated);
        }
        Ok(n)
    }
    /// The next field, which must be `tag`.
    fn field(&mut self, tag: Tag) -> Result<Reader<'a>, SnapshotError> {
        let bad = |found| SnapshotError::BadField {
            expected: tag as u16,
            found,
        };
        if self.b.is_empty() {
            return Err(bad(0));
        }
        let found = self.u16()?;
        if found != tag as u16 {
            return Err(bad(found));
        }
        let len = self.u32()? as usize;
        Ok(Reader { b: self.take(len)? })
    }
    fn finish(&self) -> Result<(), SnapshotError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::TrailingBytes)
        }
    }
}

/// One queue as snapshotted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct QueueState {
    layout: QueueLayout,
    last_avail_idx: u16,
    used_idx: u16,
}

/// A parsed and checked snapshot, ready to commit.
struct Plan {
    state: VmState,
    cursor_shown: bool,
    queues: Option<[QueueState; 2]>,
    vectors: [u16; 3],
    last_submitted: u64,
    last_signalled: u64,
    resources: BTreeMap<u32, Resource>,
    vram: u64,
    scanouts: Vec<ScanoutState>,
    counters: VmCounters,
}

fn state_code(s: VmState) -> u8 {
    match s {
        VmState::Active => 0,
        VmState::NeedsReset => 1,
        VmState::Reset => 2,
    }
}

fn write_snapshot(v: &VmGpu, counters: &VmCounters) -> Vec<u8> {
    let mut body = Writer(Vec::new());
    body.field(Tag::Display, |w| {
        w.u8(v.config.scanouts.len() as u8);
        for s in &v.config.scanouts {
            w.u32(s.width);
            w.u32(s.height);
        }
    });
    body.field(Tag::State, |w| {
        w.u8(state_code(v.state));
        w.u8(u8::from(v.cursor_shown));
    });
    body.field(Tag::Queues, |w| match (&v.queues[0], &v.queues[1]) {
        (Some(c), Some(k)) => {
            w.u8(1);
            for q in [c, k] {
                let l = q.layout();
                w.u16(l.size);
                w.u64(l.desc.get());
                w.u64(l.avail.get());
                w.u64(l.used.get());
                w.u8(u8::from(l.event_idx));
                w.u8(u8::from(l.indirect));
                w.u16(q.last_avail_idx());
                w.u16(q.used_idx());
            }
        }
        _ => w.u8(0),
    });
    body.field(Tag::Vectors, |w| v.vectors.iter().for_each(|&x| w.u16(x)));
    body.field(Tag::Fences, |w| {
        w.u64(v.fences.last_submitted);
        w.u64(v.fences.last_signalled);
    });
    body.field(Tag::Resources, |w| {
        w.u32(v.resources.len() as u32);
        for (&id, r) in &v.resources {
            w.u32(id);
            w.u32(r.format);
            w.u32(r.width);
            w.u32(r.height);
            match &r.backing {
                Some(b) => {
                    w.u8(1);
                    w.u32(b.guest.len() as u32);
                    for e in &b.guest {
                        w.u64(e.addr);
                        w.u32(e.length);
                    }
                }
                None => w.u8(0),
            }
        }
    });
    body.field(Tag::Scanouts, |w| {
        w.u8(v.scanouts.len() as u8);
        for s in &v.scanouts {
            w.u32(s.resource);
            w.rect(&s.rect);
        }
    });
    body.field(Tag::Counters, |w| counters.encode_into(&mut w.0));

    let mut out = Writer(Vec::with_capacity(HEADER_LEN + body.0.len()));
    out.0.extend_from_slice(&SNAPSHOT_MAGIC);
    out.u16(SNAPSHOT_VERSION);
    out.u16(0);
    out.u32(body.0.len() as u32);
    out.0.extend_from_slice(&body.0);
    out.0
}

/// Checks that `[gpa, gpa+len)` is the VM's own RAM (page by page if it is not
/// host-contiguous as a whole).
fn check_owned(mem: &dyn GuestMemory, gpa: Gpa, len: u64) -> Result<(), MemError> {
    if mem.translate(gpa, len).is_ok() {
        return Ok(());
    }
    gpa.checked_add(len).ok_or(MemError::Overflow)?;
    // Page by page: `done` bytes checked so far, each step up to the next page
    // boundary (or the end).
    let mut done = 0;
    while done < len {
        let cur = gpa.offset(done);
        let n = (4096 - cur.get() % 4096).min(len - done);
        mem.translate(cur, n)?;
        done += n;
    }
    Ok(())
}

fn read_queue(r: &mut Reader<'_>, mem: &dyn GuestMemory) -> Result<QueueState, SnapshotError> {
    // Trust boundary: the ring addresses in a snapshot are guest-physical, and
    // checked (validated, then owned by the VM) before they are used.
    let layout = QueueLayout {
        size: r.u16()?,
        desc: Gpa::new(r.u64()?),
        avail: Gpa::new(r.u64()?),
        used: Gpa::new(r.u64()?),
        event_idx: r.bool()?,
        indirect: r.bool()?,
    };
    let last_avail_idx = r.u16()?;
    let used_idx = r.u16()?;
    layout.validate().map_err(SnapshotError::BadQueue)?;
    let n = u64::from(layout.size);
    let areas = [
        (layout.desc, 16 * n),
        (layout.avail, 6 + 2 * n),
        (layout.used, 6 + 8 * n),
    ];
    for (gpa, len) in areas {
        check_owned(mem, gpa, len).map_err(|e| SnapshotError::BadQueue(RingError::Memory(e)))?;
    }
    Ok(QueueState {
        layout,
        last_avail_idx,
        used_idx,
    })
}

/// Parses and checks `bytes` for `v` (whose memory is `mem`); changes nothing.
fn parse(
    bytes: &[u8],
    v: &VmGpu,
    mem: &dyn GuestMemory,
    vram_free: u64,
) -> Result<Plan, SnapshotError> {
    let mut r = Reader { b: bytes };
    if r.array::<4>().map_err(|_| SnapshotError::BadMagic)? != SNAPSHOT_MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let version = r.u16()?;
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::UnsupportedVersion(version));
    }
    if r.u16()? != 0 {
        return Err(SnapshotError::BadValue);
    }
    let len = r.u32()? as usize;
    let mut body = Reader { b: r.take(len)? };
    r.finish()?;

    let mut f = body.field(TAGS[0])?;
    let n = usize::from(f.u8()?);
    if n != v.config.scanouts.len() {
        return Err(SnapshotError::DisplayMismatch);
    }
    for s in &v.config.scanouts {
        if (f.u32()?, f.u32()?) != (s.width, s.height) {
            return Err(SnapshotError::DisplayMismatch);
        }
    }
    f.finish()?;

    let mut f = body.field(TAGS[1])?;
    let state = match f.u8()? {
        0 => VmState::Active,
        2 => VmState::Reset,
        _ => return Err(SnapshotError::BadValue),
    };
    let cursor_shown = f.bool()?;
    f.finish()?;

    let mut f = body.field(TAGS[2])?;
    let queues = match f.u8()? {
        0 => None,
        1 => Some([read_queue(&mut f, mem)?, read_queue(&mut f, mem)?]),
        _ => return Err(SnapshotError::BadValue),
    };
    f.finish()?;
    // A live context has queues; a context waiting for its driver has none.
    if queues.is_some() != (state == VmState::Active) {
        return Err(SnapshotError::BadValue);
    }

    let mut f = body.field(TAGS[3])?;
    let vectors = [f.u16()?, f.u16()?, f.u16()?];
    f.finish()?;

    let mut f = body.field(TAGS[4])?;
    let last_submitted = f.u64()?;
    let last_signalled = f.u64()?;
    f.finish()?;
    // Quiescent: every accepted fence was answered (even a refused command
    // signals its accepted fence), so the last signalled is the last submitted.
    if last_signalled != last_submitted {
        return Err(SnapshotError::BadFence);
    }

    let mut f = body.field(TAGS[5])?;
    let count = f.count(17, limits::MAX_RESOURCES_PER_VM)?;
    let mut resources = BTreeMap::new();
    let mut vram = 0u64;
    for _ in 0..count {
        let id = f.u32()?;
        let fmt = f.u32()?;
        let width = f.u32()?;
        let height = f.u32()?;
        let dim_ok = |d: u32| (1..=limits::MAX_RESOURCE_DIM).contains(&d);
        if id == 0 || !format::is_known(fmt) || !dim_ok(width) || !dim_ok(height) {
            return Err(SnapshotError::BadResource(id));
        }
        if resources.contains_key(&id) {
            return Err(SnapshotError::BadResource(id));
        }
        let backing = if f.bool()? {
            let n = f.count(12, limits::MAX_BACKING_ENTRIES as usize)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                entries.push(MemEntry {
                    addr: f.u64()?,
                    length: f.u32()?,
                    padding: 0,
                });
            }
            let limit = resource_bytes(width, height).div_ceil(BACKING_SLACK) * BACKING_SLACK;
            let mut b = translate_backing(mem, &entries, limit).map_err(|rej| {
                SnapshotError::BadBacking {
                    resource: id,
                    error: rej.fault.map(|(_, _, e)| e),
                }
            })?;
            b.charge = backing_charge(b.guest.len(), &b.host);
            Some(b)
        } else {
            None
        };
        vram += resource_bytes(width, height);
        resources.insert(
            id,
            Resource {
                // Allocated when the plan is committed.
                host_id: 0,
                format: fmt,
                width,
                height,
                backing,
            },
        );
    }
    f.finish()?;
    if vram > v.quota || vram > vram_free {
        return Err(SnapshotError::Quota);
    }

    let mut f = body.field(TAGS[6])?;
    if usize::from(f.u8()?) != v.config.scanouts.len() {
        return Err(SnapshotError::DisplayMismatch);
    }
    let mut scanouts = Vec::with_capacity(v.config.scanouts.len());
    for i in 0..v.config.scanouts.len() as u32 {
        let resource = f.u32()?;
        let rect = f.rect()?;
        if resource == 0 {
            if rect != Rect::default() {
                return Err(SnapshotError::BadScanout(i));
            }
        } else {
            let r = resources
                .get(&resource)
                .ok_or(SnapshotError::BadScanout(i))?;
            if !rect.fits_in(r.width, r.height)
                || rect.width < MIN_SCANOUT_EDGE
                || rect.height < MIN_SCANOUT_EDGE
            {
                return Err(SnapshotError::BadScanout(i));
            }
        }
        scanouts.push(ScanoutState { resource, rect });
    }
    f.finish()?;

    let f = body.field(TAGS[7])?;
    let counters = VmCounters::from_bytes(f.b).map_err(SnapshotError::Counters)?;
    body.finish()?;

    Ok(Plan {
        state,
        cursor_shown,
        queues,
        vectors,
        last_submitted,
        last_signalled,
        resources,
        vram,
        scanouts,
        counters,
    })
}

/// A device queue at `s.layout` with the snapshotted indices.
fn resume_queue(s: &QueueState) -> Result<DeviceQueue, RingError> {
    DeviceQueue::resume(s.layout, s.last_avail_idx, s.used_idx)
}

impl Mediator {
    /// Encodes `vm`'s GPU context (display shape, state, queue layouts and indices,
    /// vectors, fences, resources with their guest backing, scanouts, counters) in
    /// the versioned snapshot format. The VM must be quiescent
    /// ([`VmGpu::is_quiescent`]) and not waiting for a reset.
    pub fn snapshot(&mut self, vm: VmId) -> Result<Vec<u8>, SnapshotError> {
        let v = self.vms.get(&vm).ok_or(SnapshotError::UnknownVm(vm))?;
        if v.state == VmState::NeedsReset || v.needs_reset {
            return Err(SnapshotError::WrongState(v.state));
        }
        if !v.is_quiescent() {
            return Err(SnapshotError::Busy);
        }
        let counters = self.sh.counters.vm(vm).copied().unwrap_or_default();
        let bytes = write_snapshot(v, &counters);
        self.sh.event(
            vm,
            Channel::Operational,
            EventKind::SnapshotTaken { bytes: bytes.len() },
        );
        Ok(bytes)
    }

    /// Restores a context from `bytes` (untrusted) into `vm`, which must be fresh:
    /// in [`VmState::Reset`], holding nothing, with the same virtual display as the
    /// snapshot. `mem` is the VM's memory here, through which the backing and the
    /// rings are checked and translated. Everything is checked before anything
    /// changes; on success the VM behaves as the snapshotted one did, and host
    /// commands that rebuild its resources and scanouts on this GPU are staged.
    pub fn restore(
        &mut self,
        vm: VmId,
        bytes: &[u8],
        mem: &dyn GuestMemory,
    ) -> Result<(), SnapshotError> {
        let v = self.vms.get_mut(&vm).ok_or(SnapshotError::UnknownVm(vm))?;
        if v.state != VmState::Reset {
            return Err(SnapshotError::WrongState(v.state));
        }
        if !v.held.is_empty() || !v.staged.is_empty() || v.in_flight.is_some() {
            return Err(SnapshotError::NotFresh);
        }
        let free = self.sh.vram_total.saturating_sub(self.sh.vram_used);
        let plan = parse(bytes, v, mem, free)?;
        let queues = match &plan.queues {
            Some([c, k]) => Some([
                resume_queue(c).map_err(SnapshotError::BadQueue)?,
                resume_queue(k).map_err(SnapshotError::BadQueue)?,
            ]),
            None => None,
        };
        // Host ids are the only thing that can still run out.
        let mut ids = Vec::with_capacity(plan.resources.len());
        for _ in 0..plan.resources.len() {
            match self.sh.alloc_host_id() {
                Some(id) => ids.push(id),
                None => {
                    ids.into_iter().for_each(|id| self.sh.free_host_id(id));
                    return Err(SnapshotError::Quota);
                }
            }
        }

        // The host commands that rebuild the device, and everything charged for
        // the restored context, before anything changes.
        let mut rebuild: Vec<(Command, Effect, Vec<BandCopy>)> = Vec::new();
        for ((&id, r), &host_id) in plan.resources.iter().zip(&ids) {
            rebuild.push((
                Command::ResourceCreate2d {
                    resource_id: host_id,
                    format: r.format,
                    width: r.width,
                    height: r.height,
                },
                Effect::Created {
                    guest: id,
                    host: host_id,
                },
                Vec::new(),
            ));
            let Some(b) = &r.backing else { continue };
            rebuild.push((
                Command::ResourceAttachBacking {
                    resource_id: host_id,
                    entries: b.host.iter().map(HostRun::entry).collect(),
                },
                Effect::Attached {
                    guest: id,
                    host: host_id,
                },
                Vec::new(),
            ));
            let full = Rect {
                x: 0,
                y: 0,
                width: r.width,
                height: r.height,
            };
            if transfer_end(r.width, &full, 0).is_some_and(|end| end <= b.len) {
                let transfer = Command::TransferToHost2d {
                    rect: full,
                    offset: 0,
                    resource_id: host_id,
                };
                rebuild.push((transfer, Effect::None, Vec::new()));
            }
        }
        let host_of = |guest: u32| {
            plan.resources
                .keys()
                .position(|&k| k == guest)
                .map(|i| ids[i])
        };
        for (i, s) in plan.scanouts.iter().enumerate() {
            let (Some(r), Some(host_id)) = (plan.resources.get(&s.resource), host_of(s.resource))
            else {
                continue;
            };
            if let Some((band, w, h)) = super::validate::band_of(v, i as u32) {
                // A band of a shared head: the pixels go into the band, the head
                // keeps showing the composite.
                let Some(b) = r.backing.as_ref() else {
                    continue;
                };
                let whole = s.rect;
                let (transfer, copies) = super::validate::band_transfer(&band, w, h, &whole, 0, b)
                    .map_err(|_| SnapshotError::OverBudget)?;
                rebuild.push((transfer, Effect::None, copies));
                let flush = Command::ResourceFlush {
                    rect: crate::wire::Rect {
                        y: whole.y + band.index * h,
                        ..whole
                    },
                    resource_id: band.host_resource,
                };
                rebuild.push((flush, Effect::None, Vec::new()));
                continue;
            }
            let physical = v.config.scanouts[i].physical;
            let set = Command::SetScanout {
                rect: s.rect,
                scanout_id: physical,
                resource_id: host_id,
            };
            rebuild.push((set, Effect::None, Vec::new()));
            let flush = Command::ResourceFlush {
                rect: s.rect,
                resource_id: host_id,
            };
            rebuild.push((flush, Effect::None, Vec::new()));
        }
        let in_hv_memory = self.sh.vram_in_hv_memory;
        let pixels = |r: &Resource| {
            if in_hv_memory {
                r.bytes()
            } else {
                0
            }
        };
        let records: u64 = plan
            .resources
            .values()
            .map(|r| cost::RESOURCE + pixels(r) + r.backing.as_ref().map_or(0, |b| b.charge))
            .sum();
        let commands: u64 = rebuild
            .iter()
            .map(|(c, _, copies)| command_charge(c, copies.len()))
            .sum();
        let reserve = plan.queues.as_ref().map_or([0, 0], |[c, k]| {
            [cost::queue(c.layout.size), cost::queue(k.layout.size)]
        });
        let mut bufs = Vec::with_capacity(rebuild.len());
        for (c, _, _) in &rebuild {
            let n = match c {
                Command::ResourceAttachBacking { entries, .. } => entries.len(),
                _ => 0,
            };
            bufs.push(encoding_buffer(n).map_err(|_| SnapshotError::OverBudget)?);
        }
        if self
            .sh
            .charge(v, records + commands + reserve[0] + reserve[1])
            .is_err()
        {
            ids.into_iter().for_each(|id| self.sh.free_host_id(id));
            return Err(SnapshotError::OverBudget);
        }

        // Commit.
        let count = plan.resources.len();
        v.state = plan.state;
        v.cursor_shown = plan.cursor_shown;
        v.queues = match queues {
            Some([c, k]) => [Some(c), Some(k)],
            None => [None, None],
        };
        v.queue_charge = reserve;
        v.vectors = plan.vectors;
        v.fences.last_submitted = plan.last_submitted;
        v.fences.last_signalled = plan.last_signalled;
        v.vram_used = plan.vram;
        self.sh.vram_used += plan.vram;
        *self.sh.counters.vm_mut(vm) = plan.counters;
        self.sh.note_memory(v);
        for ((id, mut r), host_id) in plan.resources.into_iter().zip(ids) {
            r.host_id = host_id;
            v.held.insert(host_id, cost::RESOURCE + pixels(&r));
            if let Some(b) = &r.backing {
                self.sh
                    .iommu
                    .extend(b.mappings().map(|(hpa, len)| IommuOp::Map { vm, hpa, len }));
            }
            v.resources.insert(id, r);
        }
        v.scanouts.copy_from_slice(&plan.scanouts);
        for ((cmd, effect, copies), buf) in rebuild.into_iter().zip(bufs) {
            let tracked = Tracked {
                reply: None,
                effect,
                charge: command_charge(&cmd, copies.len()),
            };
            self.sh
                .stage_encoded(v, QueueId::Control, cmd, tracked, copies, buf);
        }
        self.sh.event(
            vm,
            Channel::Operational,
            EventKind::Restored { resources: count },
        );
        Ok(())
    }
}
