//! The mediator: turns each guest's paravirtual GPU traffic into checked host
//! commands for the one physical GPU, and the GPU's completions back into guest
//! responses and virtual interrupts.
//!
//! # Why it is shaped like this
//!
//! Every byte a guest hands over is hostile and may change while it is read, so a
//! command is gathered exactly once into mediator-owned staging memory, decoded and
//! validated there, and what goes to the GPU is a fresh encoding of the validated
//! command with every guest-chosen name replaced by a host one:
//!
//! - resource ids live in a per-VM table that maps them to host ids from one global
//!   allocator, so a VM can only reach resources it created (unknown ids are
//!   `ERR_INVALID_RESOURCE_ID`);
//! - scanout ids index the VM's own assigned physical scanouts (others are
//!   `ERR_INVALID_SCANOUT_ID`);
//! - backing pages are translated GPA -> HPA through [`GuestMemory::translate`],
//!   which enforces `P = V(i) AND M(i)` (valid address and owned by the VM), page by
//!   page if need be; the host runs are reported as IOMMU mappings to add
//!   ([`Mediator::take_iommu_ops`]) and later to remove;
//! - fence ids become host fence ids from a global monotonic counter (shadow
//!   fences), and the guest's fence is signalled only when its command completed on
//!   the GPU (`T_wait = max(T_real, T_sched)`);
//! - the host header carries no guest field at all: type, `FLAG_FENCE` and the host
//!   fence, nothing else.
//!
//! Commands with a global side effect are never forwarded as the guest wrote them:
//! `GET_DISPLAY_INFO` and `GET_EDID` are emulated from the VM's own virtual display,
//! `SET_SCANOUT` and the cursor commands only reach the VM's own scanouts, and
//! anything else is refused with an error response.
//!
//! Each queue returns its chains in the order it took them, answered or not, so a
//! VM's fences complete in submission order whatever order host completions arrive
//! in, and an early answer never overtakes a command still on the GPU.
//!
//! Toward the physical ring each VM is double-buffered: validated commands collect in
//! its staging queue while at most one batch of it is on the GPU
//! ([`Mediator::take_batch`] / [`Mediator::complete_batch`]). The completions of one
//! call coalesce into at most one virtual interrupt per vector, and only when the
//! guest's event index asks for one.
//!
//! A host id goes back to the allocator, a guest fence is signalled and an IOMMU
//! mapping is removed only when the device's completion says the command is done:
//! a host id freed while the device still holds its resource would be handed to
//! another VM, whose commands would then act on the first VM's resource. So
//! commands the physical ring refused (full) are not completed: they go back to
//! the front of the staging queue ([`Mediator::requeue`]) and are taken again; and
//! an `UNREF` still on the GPU when its VM is reset frees its host id only when its
//! completion arrives. (A reset does take all its VM's pages from the GPU at once:
//! the device loses access, nothing is handed to anyone.)
//!
//! A VM that breaks its ring, or whose batch outlives its watchdog, is marked
//! `DEVICE_NEEDS_RESET`; [`Mediator::reset_vm`] then drops its work, hands back every
//! host resource, VRAM byte and IOMMU mapping it held, and touches nothing of any
//! other VM. A bad command never panics: it gets an error response, a counter
//! ([`RejectReason`]) and an [`Event`] on the debug channel.
//!
//! The mediator owns no guest memory: each call that reads or writes a guest gets
//! that guest's [`GuestMemory`], so a call for one VM cannot touch another.

mod snapshot;
mod validate;
mod vm;

#[cfg(test)]
mod band_tests;
#[cfg(test)]
mod e2e;
#[cfg(test)]
pub(crate) mod harness;
#[cfg(test)]
mod memory_tests;
#[cfg(test)]
mod polling_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;

use crate::abi::limits;
use crate::budget::{cost, OverBudget, DEFAULT_BUDGET};
use crate::command::{self, Command, Request, Response};
use crate::counters::{GlobalCounters, RejectReason, VmCounters};
use crate::memory::{Gpa, GuestMemory, Hpa, MemError};
use crate::ring::{self, DeviceQueue, QueueLayout, RingError};
use crate::sched::VmId;
use crate::wire::{self, CtrlHdr, Rect, Wire};

pub use snapshot::{SnapshotError, SNAPSHOT_MAGIC, SNAPSHOT_VERSION};
pub use vm::VmGpu;

use validate::{Outcome, Rejection};
use vm::{Effect, InFlight, PendingReply, ReplyState, Tracked};

/// virtio device status bit `DEVICE_NEEDS_RESET`: the device hit an error it
/// cannot recover from without the driver resetting it.
pub use virtio_pci::status::DEVICE_NEEDS_RESET;

/// MSI-X "no vector" (`VIRTIO_MSI_NO_VECTOR`): no interrupt is delivered.
pub const NO_VECTOR: u16 = virtio_pci::MSI_NO_VECTOR;

/// Default watchdog: a batch not completed within 2 s marks its VM hung (the
/// timeout Windows' TDR uses for a GPU).
pub const DEFAULT_WATCHDOG_NS: u64 = 2_000_000_000;

/// Events kept before the oldest are dropped (see [`Mediator::events_lost`]).
pub const DEFAULT_MAX_EVENTS: usize = 1024;

/// The two virtqueues of a virtio-gpu device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QueueId {
    /// Queue 0: control commands, each answered with a response.
    Control,
    /// Queue 1: cursor commands, not answered.
    Cursor,
}

impl QueueId {
    /// Both queues, in virtio order.
    pub const ALL: [QueueId; 2] = [QueueId::Control, QueueId::Cursor];

    /// The virtio queue index (0 or 1).
    pub const fn index(self) -> usize {
        match self {
            QueueId::Control => 0,
            QueueId::Cursor => 1,
        }
    }

    /// The queue with virtio index `index`, if it exists.
    pub fn from_index(index: u16) -> Option<Self> {
        match index {
            0 => Some(QueueId::Control),
            1 => Some(QueueId::Cursor),
            _ => None,
        }
    }
}

/// One physical scanout given to a VM, and the size of the virtual display the VM
/// sees on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanoutConfig {
    /// Physical scanout index on the GPU.
    pub physical: u32,
    /// Width the VM's display reports, in pixels.
    pub width: u32,
    /// Height the VM's display reports, in pixels.
    pub height: u32,
}

/// A VM display's place on a physical head that several VMs share (more VMs than
/// heads): band `index` of `count` equal bands stacked top to bottom on the head,
/// which shows the hypervisor's composite resource `host_resource` (the display's
/// width, `count` times its height, backed by hypervisor memory, set up by the
/// hypervisor). A guest's frame reaches its band as a transfer of the composite
/// restricted to the band, after the hypervisor copied the guest's pixels into the
/// band ([`HostCommand::copies`]); its flush becomes a flush of the band. A VM can
/// never name the composite, and its copies and rectangles never leave its band.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Band {
    /// The VM's virtual scanout shown in the band.
    pub scanout: u32,
    /// Position from the top, `0..count`.
    pub index: u32,
    /// Bands on the head.
    pub count: u32,
    /// The composite's host resource id (at or above [`RESERVED_HOST_IDS`]).
    pub host_resource: u32,
}

/// Host resource ids from here up are never given to a VM's resource: the
/// hypervisor's own (the composites of shared heads) use them.
pub const RESERVED_HOST_IDS: u32 = 0xffff_0000;

/// One copy the hypervisor makes before it submits a command: `len` bytes from
/// host-physical `src` (pages of the VM's own backing, already checked), or zeros
/// when `src` is `None`, to byte `dst` of the composite resource's backing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BandCopy {
    /// Source, host-physical; `None` writes zeros.
    pub src: Option<Hpa>,
    /// Offset in the composite's backing.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// How a VM's paravirtual GPU is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmGpuConfig {
    /// Its scanouts: virtual scanout `i` is `scanouts[i]`.
    pub scanouts: Vec<ScanoutConfig>,
    /// Scanouts shown in a band of a shared physical head instead of a head of
    /// their own (their `physical` is that head).
    pub bands: Vec<Band>,
    /// VRAM it may hold, in bytes; `None` is one quarter of the GPU's VRAM (the
    /// seed's host policy).
    pub vram_quota: Option<u64>,
    /// How long a batch may stay on the GPU before the VM is declared hung.
    pub watchdog_ns: u64,
    /// Hypervisor memory the VM may make the mediator and the hypervisor keep, in
    /// bytes (see [`crate::budget`]).
    pub hv_memory: u64,
}

impl VmGpuConfig {
    /// A VM with these scanouts, the default quota, watchdog and memory budget.
    pub fn new(scanouts: Vec<ScanoutConfig>) -> Self {
        Self {
            scanouts,
            bands: Vec::new(),
            vram_quota: None,
            watchdog_ns: DEFAULT_WATCHDOG_NS,
            hv_memory: DEFAULT_BUDGET,
        }
    }
}

/// The physical GPU as the mediator needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MediatorConfig {
    /// Total VRAM, in bytes.
    pub vram_total: u64,
    /// Physical scanouts the GPU has.
    pub physical_scanouts: u32,
    /// Events kept undrained before the oldest are dropped.
    pub max_events: usize,
    /// The GPU keeps its resources' pixels in hypervisor memory (the simulated
    /// GPU): each resource's pixels are charged to its VM's memory budget too.
    pub vram_in_hv_memory: bool,
}

impl MediatorConfig {
    /// A GPU with `vram_total` bytes of VRAM of its own and `physical_scanouts`
    /// scanouts.
    pub fn new(vram_total: u64, physical_scanouts: u32) -> Self {
        Self {
            vram_total,
            physical_scanouts,
            max_events: DEFAULT_MAX_EVENTS,
            vram_in_hv_memory: false,
        }
    }
}

/// Lifecycle of a VM's GPU context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Queues set up; doorbells are served.
    Active,
    /// The ring broke or the GPU channel hung: doorbells are refused until the VM
    /// is reset; completions still arrive.
    NeedsReset,
    /// No context: the driver must set up its queues ([`Mediator::start_queues`]).
    /// A new VM starts here.
    Reset,
}

/// Which log an [`Event`] belongs in (the seed's two GPU-PV event channels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// Attachments, starts, snapshots: what an operator wants to see.
    Operational,
    /// Refused commands, faults, timeouts, channel resets: what a developer wants.
    Debug,
}

/// Something log-worthy the mediator saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The VM concerned.
    pub vm: VmId,
    /// The log it belongs in.
    pub channel: Channel,
    /// What happened.
    pub kind: EventKind,
}

/// What an [`Event`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The VM was given a paravirtual GPU.
    Attached {
        /// Scanouts assigned.
        scanouts: usize,
        /// Its VRAM quota in bytes.
        vram_quota: u64,
    },
    /// The driver set up its queues (device live).
    Started {
        /// Context id of the new context.
        context: u32,
    },
    /// A command was refused.
    Rejected {
        /// Queue it came on.
        queue: QueueId,
        /// Its command type (0 when it had no readable header).
        cmd_type: u32,
        /// Why.
        reason: RejectReason,
        /// The response type the guest got (0 on the cursor queue: no response).
        response: u32,
    },
    /// A guest address failed translation (the seed's "DMA error").
    DmaFault {
        /// Guest-physical address.
        gpa: Gpa,
        /// Length asked for.
        len: u64,
        /// Why it was refused.
        error: MemError,
    },
    /// The VM's virtqueue is malformed; the device needs a reset.
    RingFault {
        /// Queue.
        queue: QueueId,
        /// What was wrong.
        error: RingError,
    },
    /// A batch stayed on the GPU past the VM's watchdog.
    CommandTimeout {
        /// Batch id.
        batch: u64,
        /// How long it had been on the GPU.
        waited_ns: u64,
    },
    /// The driver reset one virtqueue (`VIRTIO_F_RING_RESET`): its chains were
    /// dropped unanswered (see [`Mediator::reset_queue`]).
    QueueReset {
        /// The queue.
        queue: QueueId,
        /// Guest chains taken from it and dropped unanswered.
        dropped: usize,
    },
    /// The driver re-enabled a reset virtqueue, possibly at a new place and size.
    QueueRestarted {
        /// The queue.
        queue: QueueId,
        /// Its new size.
        size: u16,
    },
    /// The VM's GPU channel was reset.
    ChannelReset {
        /// Guest commands dropped unanswered.
        dropped: usize,
        /// Host resources given back.
        released: usize,
        /// Whether the guest was told (`DEVICE_NEEDS_RESET`), or the driver asked.
        forced: bool,
    },
    /// A completion named a host fence not in the VM's batch (late, after a reset,
    /// or wrong): ignored.
    StaleCompletion {
        /// Host fence id.
        host_fence: u64,
    },
    /// The GPU refused a command the mediator had validated.
    HostError {
        /// Host fence id.
        host_fence: u64,
        /// Response type the GPU returned.
        status: u32,
    },
    /// A snapshot of the VM's GPU context was taken.
    SnapshotTaken {
        /// Its size in bytes.
        bytes: usize,
    },
    /// The VM's GPU context was restored from a snapshot.
    Restored {
        /// Resources recreated.
        resources: usize,
    },
    /// Something the VM asked for did not fit in its hypervisor memory budget
    /// (and was refused): a queue set-up, or a charge of the hypervisor's own.
    OverBudget {
        /// Bytes asked for.
        asked: u64,
        /// Bytes left in the budget.
        available: u64,
    },
}

/// One validated host command, ready for the physical ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCommand {
    /// Host fence id: the command is sent with `FLAG_FENCE` and this id, and its
    /// completion is reported with it.
    pub host_fence: u64,
    /// Physical queue it goes on.
    pub queue: QueueId,
    /// The command with host ids, host scanouts and host addresses.
    pub request: Request,
    /// `request` in wire form: the bytes to copy into the physical ring.
    pub bytes: Vec<u8>,
    /// Copies into a shared head's composite the hypervisor makes first (see
    /// [`Band`]); empty for every other command.
    pub copies: Vec<BandCopy>,
}

/// Host commands of one VM handed to the physical ring together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Batch id (global, increasing).
    pub id: u64,
    /// The VM whose commands these are.
    pub vm: VmId,
    /// The commands, in submission order.
    pub commands: Vec<HostCommand>,
}

/// The GPU's answer to one host command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Host fence id of the command.
    pub host_fence: u64,
    /// Response type the GPU returned (`wire::RESP_*`).
    pub status: u32,
}

/// A change the hypervisor must make to the GPU's IOMMU domain (zero-copy buffer
/// exchange: the GPU reads guest pages in place).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuOp {
    /// Let the GPU reach `[hpa, hpa+len)` of `vm`'s memory. Apply before
    /// submitting any batch taken after this op was reported.
    Map {
        /// Owner.
        vm: VmId,
        /// Host-physical start.
        hpa: Hpa,
        /// Length in bytes.
        len: u64,
    },
    /// Take `[hpa, hpa+len)` away from the GPU.
    Unmap {
        /// Owner.
        vm: VmId,
        /// Host-physical start.
        hpa: Hpa,
        /// Length in bytes.
        len: u64,
    },
}

impl IommuOp {
    /// The VM the mapping belongs to.
    pub fn vm(&self) -> VmId {
        match *self {
            IommuOp::Map { vm, .. } | IommuOp::Unmap { vm, .. } => vm,
        }
    }
}

/// What one doorbell (or poll) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DoorbellReport {
    /// Commands validated and staged for the GPU.
    pub staged: usize,
    /// Commands answered by the mediator itself (emulated).
    pub emulated: usize,
    /// Commands refused.
    pub rejected: usize,
    /// Chains were left in the ring because the VM's backlog is full.
    pub deferred: bool,
}

/// What one [`Mediator::complete_batch`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionReport {
    /// Completions applied.
    pub completed: usize,
    /// Completions ignored (not in the VM's batch).
    pub stale: usize,
    /// Guest chains returned.
    pub returned: usize,
    /// The VM's batch is finished (the next one may be taken).
    pub batch_done: bool,
}

/// What a reset gave back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResetReport {
    /// Guest commands dropped unanswered (staged, in flight, or waiting their turn).
    pub dropped: usize,
    /// Host resources being released (by the cleanup commands now staged).
    pub released: usize,
    /// IOMMU mappings the hypervisor must remove now, as `(hpa, len)`: exactly
    /// those reported by [`IommuOp::Map`] for this VM and not unmapped since.
    pub unmapped: Vec<(Hpa, u64)>,
}

/// Why a mediator call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediatorError {
    /// No VM by that id.
    UnknownVm(VmId),
    /// A VM by that id exists already.
    VmExists(VmId),
    /// The scanout does not exist or belongs to another VM.
    ScanoutUnavailable(u32),
    /// No scanout, or more than virtio-gpu can describe (16).
    BadScanoutCount(usize),
    /// The VM is not in a state that allows the call.
    WrongState(VmState),
    /// A queue layout the device cannot use.
    BadQueue(RingError),
    /// The queue is live: only a queue reset by [`Mediator::reset_queue`] can be
    /// restarted.
    QueueNotReset(QueueId),
    /// The VM's hypervisor memory budget cannot hold what the call needs.
    OverBudget(OverBudget),
}

/// The GPU-PV mediator: every VM's GPU context and the host-side state they share.
#[derive(Clone, Debug)]
pub struct Mediator {
    config: MediatorConfig,
    vms: BTreeMap<VmId, VmGpu>,
    sh: Shared,
}

/// Host-side state shared by all VMs (kept apart from `vms` so a VM's context and
/// the shared state can be borrowed together).
#[derive(Clone, Debug)]
struct Shared {
    vram_total: u64,
    vram_used: u64,
    next_host_id: u32,
    free_host_ids: Vec<u32>,
    next_host_fence: u64,
    next_batch: u64,
    next_context: u32,
    /// Host fence -> (VM, context) of every command on the GPU.
    routes: BTreeMap<u64, (VmId, u32)>,
    /// Host fence -> host id of each `UNREF` that was on the GPU when its VM was
    /// reset (with the memory still charged to the VM for it): the id is free once
    /// that completion arrives, not before.
    releasing: BTreeMap<u64, (u32, u64)>,
    /// Resource pixels live in hypervisor memory (see [`MediatorConfig`]).
    vram_in_hv_memory: bool,
    events: VecDeque<Event>,
    max_events: usize,
    events_lost: u64,
    interrupts: Vec<(VmId, u16)>,
    iommu: Vec<IommuOp>,
    /// Where each command is gathered, once, before it is looked at.
    staging: Vec<u8>,
    now_ns: u64,
    counters: GlobalCounters,
}

impl Shared {
    fn event(&mut self, vm: VmId, channel: Channel, kind: EventKind) {
        if self.max_events == 0 {
            self.events_lost = self.events_lost.saturating_add(1);
            return;
        }
        if self.events.len() >= self.max_events {
            self.events.pop_front();
            self.events_lost = self.events_lost.saturating_add(1);
        }
        self.events.push_back(Event { vm, channel, kind });
    }

    fn counters(&mut self, vm: VmId) -> &mut VmCounters {
        self.counters.vm_mut(vm)
    }

    /// Queues virtual interrupt `vector` for `vm`, unless it is already pending (a
    /// pending interrupt covers every completion before it is injected).
    fn interrupt(&mut self, vm: VmId, vector: u16) {
        if vector == NO_VECTOR || self.interrupts.contains(&(vm, vector)) {
            return;
        }
        self.interrupts.push((vm, vector));
        let c = self.counters(vm);
        c.interrupts_injected = c.interrupts_injected.saturating_add(1);
    }

    fn alloc_host_id(&mut self) -> Option<u32> {
        if let Some(id) = self.free_host_ids.pop() {
            return Some(id);
        }
        let id = self.next_host_id;
        // Host id 0 means "no resource" on the wire; u32::MAX is never handed out.
        self.next_host_id = id.checked_add(1).filter(|&n| n < RESERVED_HOST_IDS)?;
        Some(id)
    }

    fn free_host_id(&mut self, id: u32) {
        self.free_host_ids.push(id);
    }

    fn alloc_fence(&mut self) -> u64 {
        let f = self.next_host_fence;
        self.next_host_fence += 1;
        f
    }

    fn alloc_context(&mut self) -> u32 {
        let c = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(1);
        c
    }

    fn unmap(&mut self, vm: VmId, maps: &[(Hpa, u64)]) {
        self.iommu.extend(
            maps.iter()
                .map(|&(hpa, len)| IommuOp::Unmap { vm, hpa, len }),
        );
    }

    /// Gives the VM's VRAM charge back to the global pool.
    fn refund(&mut self, bytes: u64) {
        self.vram_used = self.vram_used.saturating_sub(bytes);
    }

    /// Charges `bytes` of hypervisor memory to `v`, or refuses and changes nothing.
    fn charge(&mut self, v: &mut VmGpu, bytes: u64) -> Result<(), OverBudget> {
        let r = v.memory.charge(bytes);
        self.note_memory(v);
        r
    }

    /// Gives back `bytes` charged to `v`.
    fn release(&mut self, v: &mut VmGpu, bytes: u64) {
        if bytes > 0 {
            v.memory.release(bytes);
            self.note_memory(v);
        }
    }

    /// Charges `bytes` outside a command (a queue's reservation, the hypervisor's
    /// own records): a refusal is counted and reported.
    fn charge_reported(&mut self, v: &mut VmGpu, bytes: u64) -> Result<(), MediatorError> {
        self.charge(v, bytes).map_err(|e| {
            self.counters(v.id).reject(RejectReason::HvMemory);
            self.event(
                v.id,
                Channel::Debug,
                EventKind::OverBudget {
                    asked: e.asked,
                    available: e.available,
                },
            );
            MediatorError::OverBudget(e)
        })
    }

    /// Mirrors `v`'s memory budget in its counters.
    fn note_memory(&mut self, v: &VmGpu) {
        let m = v.memory;
        let c = self.counters(v.id);
        c.hv_memory_used = m.used();
        c.hv_memory_peak = m.peak();
        c.hv_memory_budget = m.limit();
    }

    /// Stages `cmd` for `v` as a host command with a fresh host fence, and tracks
    /// what its completion must do.
    fn stage(&mut self, v: &mut VmGpu, queue: QueueId, cmd: Command, tracked: Tracked) -> u64 {
        self.stage_encoded(v, queue, cmd, tracked, Vec::new(), Vec::new())
    }

    /// [`stage`](Self::stage), with the copies the hypervisor makes before it.
    fn stage_with_copies(
        &mut self,
        v: &mut VmGpu,
        queue: QueueId,
        cmd: Command,
        tracked: Tracked,
        copies: Vec<BandCopy>,
    ) -> u64 {
        self.stage_encoded(v, queue, cmd, tracked, copies, Vec::new())
    }

    /// [`stage_with_copies`](Self::stage_with_copies), encoding into `buf` (room
    /// reserved beforehand for a large command; empty for a small one).
    fn stage_encoded(
        &mut self,
        v: &mut VmGpu,
        queue: QueueId,
        cmd: Command,
        tracked: Tracked,
        copies: Vec<BandCopy>,
        buf: Vec<u8>,
    ) -> u64 {
        let host_fence = self.alloc_fence();
        let request = Request {
            hdr: CtrlHdr {
                type_: cmd.type_(),
                flags: wire::FLAG_FENCE,
                fence_id: host_fence,
                ..CtrlHdr::default()
            },
            cmd,
        };
        let mut bytes = buf;
        command::encode(&request, &mut bytes);
        v.staged.push_back(HostCommand {
            host_fence,
            queue,
            request,
            bytes,
            copies,
        });
        v.tracked.insert(host_fence, tracked);
        host_fence
    }
}

/// The answer a host status turns into for the guest.
fn response_for_status(status: u32) -> Response {
    match status {
        wire::RESP_OK_NODATA => Response::OkNoData,
        0x1200..=0x12ff => Response::Err(status),
        // A success type a 2D command cannot have: the device misbehaved.
        _ => Response::Err(wire::RESP_ERR_UNSPEC),
    }
}

impl Mediator {
    /// A mediator for a GPU described by `config`, with no VM yet.
    pub fn new(config: MediatorConfig) -> Self {
        Self {
            config,
            vms: BTreeMap::new(),
            sh: Shared {
                vram_total: config.vram_total,
                vram_used: 0,
                next_host_id: 1,
                free_host_ids: Vec::new(),
                next_host_fence: 1,
                next_batch: 1,
                next_context: 1,
                routes: BTreeMap::new(),
                releasing: BTreeMap::new(),
                vram_in_hv_memory: config.vram_in_hv_memory,
                events: VecDeque::new(),
                max_events: config.max_events,
                events_lost: 0,
                interrupts: Vec::new(),
                iommu: Vec::new(),
                staging: Vec::new(),
                now_ns: 0,
                counters: GlobalCounters::new(),
            },
        }
    }

    /// The GPU description the mediator was made with.
    pub fn config(&self) -> &MediatorConfig {
        &self.config
    }

    /// Gives VM `vm` a paravirtual GPU with the scanouts and quota of `config`. The
    /// VM starts in [`VmState::Reset`]: its driver sets the queues up next.
    ///
    /// Each physical scanout belongs to at most one VM; a quota of `None` is one
    /// quarter of the GPU's VRAM.
    pub fn add_vm(&mut self, vm: VmId, config: VmGpuConfig) -> Result<(), MediatorError> {
        if self.vms.contains_key(&vm) {
            return Err(MediatorError::VmExists(vm));
        }
        let n = config.scanouts.len();
        if n == 0 || n > wire::MAX_SCANOUTS {
            return Err(MediatorError::BadScanoutCount(n));
        }
        // A band must name one of the VM's scanouts, once, and a composite id.
        for (k, b) in config.bands.iter().enumerate() {
            let twice = config.bands[..k].iter().any(|o| o.scanout == b.scanout);
            if b.scanout as usize >= n
                || b.index >= b.count
                || b.host_resource < RESERVED_HOST_IDS
                || twice
            {
                return Err(MediatorError::ScanoutUnavailable(b.scanout));
            }
        }
        // Every scanout and band already given out: (physical, band, width, height).
        let band_of =
            |c: &VmGpuConfig, i: usize| c.bands.iter().find(|b| b.scanout as usize == i).copied();
        let mut given: Vec<(u32, Option<Band>, u32, u32)> = Vec::new();
        for v in self.vms.values() {
            for (i, o) in v.config.scanouts.iter().enumerate() {
                given.push((o.physical, band_of(&v.config, i), o.width, o.height));
            }
        }
        for (i, s) in config.scanouts.iter().enumerate() {
            let mine = band_of(&config, i);
            // A head is a VM's own, or shared only by bands of one composite (same
            // size and band count, each band once).
            let clash = given.iter().any(|&(p, other, w, h)| {
                p == s.physical
                    && !matches!((mine, other), (Some(a), Some(b))
                        if a.host_resource == b.host_resource
                            && a.count == b.count
                            && a.index != b.index
                            && (w, h) == (s.width, s.height))
            });
            if s.physical >= self.config.physical_scanouts || clash {
                return Err(MediatorError::ScanoutUnavailable(s.physical));
            }
            given.push((s.physical, mine, s.width, s.height));
        }
        let quota = config.vram_quota.unwrap_or(self.config.vram_total / 4);
        let context = self.sh.alloc_context();
        let v = VmGpu::new(vm, config, quota, context);
        self.sh.note_memory(&v);
        self.vms.insert(vm, v);
        self.sh.event(
            vm,
            Channel::Operational,
            EventKind::Attached {
                scanouts: n,
                vram_quota: quota,
            },
        );
        Ok(())
    }

    /// The GPU context of `vm`.
    pub fn vm(&self, vm: VmId) -> Option<&VmGpu> {
        self.vms.get(&vm)
    }

    /// Ids of every VM, ascending.
    pub fn vm_ids(&self) -> impl Iterator<Item = VmId> + '_ {
        self.vms.keys().copied()
    }

    fn vm_mut(&mut self, vm: VmId) -> Result<&mut VmGpu, MediatorError> {
        self.vms.get_mut(&vm).ok_or(MediatorError::UnknownVm(vm))
    }

    /// The driver set up both queues and wrote `DRIVER_OK`: the context goes live
    /// with both queue indices at zero. Allowed only in [`VmState::Reset`] (a new
    /// or reset VM), so a running context is never silently replaced.
    pub fn start_queues(
        &mut self,
        vm: VmId,
        control: QueueLayout,
        cursor: QueueLayout,
    ) -> Result<(), MediatorError> {
        let v = self.vms.get_mut(&vm).ok_or(MediatorError::UnknownVm(vm))?;
        if v.state != VmState::Reset {
            return Err(MediatorError::WrongState(v.state));
        }
        let c = DeviceQueue::new(control).map_err(MediatorError::BadQueue)?;
        let k = DeviceQueue::new(cursor).map_err(MediatorError::BadQueue)?;
        // Every chain a queue can hold is answered whatever the budget says later:
        // its room is reserved now.
        let reserve = [cost::queue(control.size), cost::queue(cursor.size)];
        self.sh.charge_reported(v, reserve[0] + reserve[1])?;
        v.queue_charge = reserve;
        v.queues = [Some(c), Some(k)];
        v.state = VmState::Active;
        // Setting queues up follows a device reset by the driver.
        v.needs_reset = false;
        let context = v.context;
        self.sh
            .event(vm, Channel::Operational, EventKind::Started { context });
        Ok(())
    }

    /// The driver reset one virtqueue of `vm` (`VIRTIO_F_RING_RESET`, virtio 1.2
    /// 2.6.1): the queue stops being served until [`restart_queue`](Self::restart_queue),
    /// and every chain the mediator took from it and had not returned is dropped: no
    /// response is written into the guest and no used entry is published for it, and
    /// the guest fences those chains carried are no longer waited for. Returns the
    /// number of chains dropped.
    ///
    /// Host commands already validated for those chains (staged, or on the GPU) are
    /// still carried out as the mediator's own, with their bookkeeping (VRAM, host
    /// ids, IOMMU mappings) applied at completion: the driver cannot tell them from
    /// commands the device executed just before the reset, and dropping them would
    /// leave the mediator's view of the device state (a resource created, a backing
    /// detached) out of step with the GPU's. The other queue, and every other VM,
    /// are untouched. Allowed only on a live context ([`VmState::Active`]); a queue
    /// already reset is left as it is.
    pub fn reset_queue(&mut self, vm: VmId, queue: QueueId) -> Result<usize, MediatorError> {
        let v = self.vms.get_mut(&vm).ok_or(MediatorError::UnknownVm(vm))?;
        if v.state != VmState::Active {
            return Err(MediatorError::WrongState(v.state));
        }
        let dropped = core::mem::take(&mut v.replies[queue.index()]);
        for r in &dropped {
            if let ReplyState::Waiting(host_fence) = r.state {
                if let Some(t) = v.tracked.get_mut(&host_fence) {
                    t.reply = None;
                }
            }
            if r.hdr.flags & wire::FLAG_FENCE != 0 {
                let fence = r.hdr.fence_id;
                v.fences.outstanding.retain(|&(g, _)| g != fence);
            }
        }
        v.queues[queue.index()] = None;
        let reserved = core::mem::take(&mut v.queue_charge[queue.index()]);
        self.sh.release(v, reserved);
        self.sh.event(
            vm,
            Channel::Debug,
            EventKind::QueueReset {
                queue,
                dropped: dropped.len(),
            },
        );
        Ok(dropped.len())
    }

    /// The driver re-enabled `queue` of `vm` after a [`reset_queue`](Self::reset_queue):
    /// it is served again at `layout` (which may differ from the old one), with both
    /// ring indices at zero. Fails, changing nothing, on a context that is not live,
    /// a queue that was not reset, or a layout the device cannot use.
    pub fn restart_queue(
        &mut self,
        vm: VmId,
        queue: QueueId,
        layout: QueueLayout,
    ) -> Result<(), MediatorError> {
        let v = self.vms.get_mut(&vm).ok_or(MediatorError::UnknownVm(vm))?;
        if v.state != VmState::Active {
            return Err(MediatorError::WrongState(v.state));
        }
        if v.queues[queue.index()].is_some() {
            return Err(MediatorError::QueueNotReset(queue));
        }
        let q = DeviceQueue::new(layout).map_err(MediatorError::BadQueue)?;
        let reserve = cost::queue(layout.size);
        self.sh.charge_reported(v, reserve)?;
        v.queue_charge[queue.index()] = reserve;
        v.queues[queue.index()] = Some(q);
        self.sh.event(
            vm,
            Channel::Debug,
            EventKind::QueueRestarted {
                queue,
                size: layout.size,
            },
        );
        Ok(())
    }

    /// Sets the MSI-X vector of `queue` (from the VM's virtual MSI-X table;
    /// [`NO_VECTOR`] silences the queue).
    pub fn set_vector(
        &mut self,
        vm: VmId,
        queue: QueueId,
        vector: u16,
    ) -> Result<(), MediatorError> {
        self.vm_mut(vm)?.vectors[1 + queue.index()] = vector;
        Ok(())
    }

    /// Sets the MSI-X vector of configuration changes (used to announce
    /// `DEVICE_NEEDS_RESET`).
    pub fn set_config_vector(&mut self, vm: VmId, vector: u16) -> Result<(), MediatorError> {
        self.vm_mut(vm)?.vectors[0] = vector;
        Ok(())
    }

    /// The device status bits the mediator contributes for `vm`:
    /// [`DEVICE_NEEDS_RESET`] when the VM must reset its device, else 0.
    pub fn device_status(&self, vm: VmId) -> Option<u8> {
        self.vms
            .get(&vm)
            .map(|v| if v.needs_reset { DEVICE_NEEDS_RESET } else { 0 })
    }

    /// Serves a doorbell of `vm` on `queue`: takes every chain the guest made
    /// available (up to the back-pressure limit), validates and stages or answers
    /// each one, and returns the chains that can be returned. `mem` is that VM's
    /// memory.
    ///
    /// A malformed ring marks the VM [`VmState::NeedsReset`] (announced through the
    /// config vector) and is reported in the events; it is not an error of the call.
    pub fn process_doorbell(
        &mut self,
        vm: VmId,
        queue: QueueId,
        mem: &mut dyn GuestMemory,
    ) -> Result<DoorbellReport, MediatorError> {
        let v = self.vms.get_mut(&vm).ok_or(MediatorError::UnknownVm(vm))?;
        if v.state != VmState::Active {
            return Err(MediatorError::WrongState(v.state));
        }
        let c = self.sh.counters(vm);
        c.doorbells = c.doorbells.saturating_add(1);
        let mut report = DoorbellReport::default();
        if let Err(error) = self.sh.drain_queue(v, queue, mem, &mut report) {
            self.sh.ring_fault(v, queue, error);
            return Ok(report);
        }
        if let Err(error) = self.sh.retire(v, queue, mem) {
            self.sh.ring_fault(v, queue, error);
        }
        Ok(report)
    }

    /// Serves both queues of `vm`, as during its time slice when the hypervisor
    /// polls instead of trapping doorbells.
    pub fn poll(
        &mut self,
        vm: VmId,
        mem: &mut dyn GuestMemory,
    ) -> Result<DoorbellReport, MediatorError> {
        let mut total = DoorbellReport::default();
        for q in QueueId::ALL {
            if self.vms.get(&vm).map(|v| v.state) != Some(VmState::Active) {
                break;
            }
            let r = self.process_doorbell(vm, q, mem)?;
            total.staged += r.staged;
            total.emulated += r.emulated;
            total.rejected += r.rejected;
            total.deferred |= r.deferred;
        }
        Ok(total)
    }

    /// Turns polling of `vm`'s queues on or off. While on (the VM's vCPU runs and
    /// the hypervisor calls [`poll`](Self::poll) often), the guest is asked not to
    /// kick (event idx `avail_event` held behind, or `VIRTQ_USED_F_NO_NOTIFY`), so a
    /// steady stream of commands causes no VM exits. Turning it off asks for a kick
    /// at the next chain again and then serves what is already there.
    pub fn set_polled(
        &mut self,
        vm: VmId,
        on: bool,
        mem: &mut dyn GuestMemory,
    ) -> Result<DoorbellReport, MediatorError> {
        let v = self.vms.get_mut(&vm).ok_or(MediatorError::UnknownVm(vm))?;
        if v.polled == on {
            return Ok(DoorbellReport::default());
        }
        v.polled = on;
        if v.state != VmState::Active {
            return Ok(DoorbellReport::default());
        }
        for q in QueueId::ALL {
            let Some(dq) = v.queues[q.index()].as_ref() else {
                continue;
            };
            let r = if on {
                dq.suppress_notifications(mem)
            } else {
                dq.resume_notifications(mem)
            };
            if let Err(error) = r {
                self.sh.ring_fault(v, q, error);
                return Ok(DoorbellReport::default());
            }
        }
        if on {
            Ok(DoorbellReport::default())
        } else {
            self.poll(vm, mem)
        }
    }

    /// Hands out up to `max` staged host commands of `vm` as one batch for the
    /// physical ring, or `None` when the VM has nothing staged or its previous
    /// batch is still on the GPU (double buffering: one batch filling, one in
    /// flight). The batch is stamped with the clock of the last [`tick`](Self::tick).
    pub fn take_batch(&mut self, vm: VmId, max: usize) -> Option<Batch> {
        let v = self.vms.get_mut(&vm)?;
        if v.in_flight.is_some() || v.staged.is_empty() || max == 0 {
            return None;
        }
        let n = max.min(v.staged.len());
        let commands: Vec<HostCommand> = v.staged.drain(..n).collect();
        let id = self.sh.next_batch;
        self.sh.next_batch += 1;
        let mut remaining = BTreeSet::new();
        let mut bytes = 0u64;
        for c in &commands {
            remaining.insert(c.host_fence);
            self.sh.routes.insert(c.host_fence, (vm, v.context));
            bytes += c.bytes.len() as u64;
        }
        v.in_flight = Some(InFlight {
            id,
            remaining,
            submitted_ns: self.sh.now_ns,
        });
        let c = self.sh.counters(vm);
        c.commands_submitted = c.commands_submitted.saturating_add(n as u64);
        c.bytes_copied = c.bytes_copied.saturating_add(bytes);
        Some(Batch { id, vm, commands })
    }

    /// The physical ring refused `commands`, the tail of `vm`'s batch on the GPU, in
    /// batch order (it was full): they leave the batch and go back to the front of
    /// the VM's staging queue, to be taken again by the next
    /// [`take_batch`](Self::take_batch) once the rest of the batch completed.
    /// Nothing of them is applied: no answer, no fence signalled, and no host id,
    /// VRAM or IOMMU mapping given back, since the device never saw them. Commands
    /// no longer in the batch (a reset dropped it) are dropped, except a reset's
    /// `UNREF`, which the VM owes the device still. Returns how many were requeued.
    pub fn requeue(
        &mut self,
        vm: VmId,
        commands: Vec<HostCommand>,
    ) -> Result<usize, MediatorError> {
        let v = self.vms.get_mut(&vm).ok_or(MediatorError::UnknownVm(vm))?;
        let (mut n, mut bytes) = (0u64, 0u64);
        for c in commands.into_iter().rev() {
            let ours = v
                .in_flight
                .as_mut()
                .is_some_and(|b| b.remaining.remove(&c.host_fence));
            let owed = self.sh.releasing.remove(&c.host_fence);
            if let Some((host, record)) = owed {
                v.held.insert(host, record);
                let effect = Effect::Released {
                    host,
                    unmap: Vec::new(),
                };
                v.tracked.insert(c.host_fence, Tracked::internal(effect));
            }
            if ours || owed.is_some() {
                self.sh.routes.remove(&c.host_fence);
                n += 1;
                bytes += c.bytes.len() as u64;
                v.staged.push_front(c);
            }
        }
        if v.in_flight.as_ref().is_some_and(|b| b.remaining.is_empty()) {
            v.in_flight = None;
        }
        let c = self.sh.counters(vm);
        c.commands_submitted = c.commands_submitted.saturating_sub(n);
        c.bytes_copied = c.bytes_copied.saturating_sub(bytes);
        Ok(n as usize)
    }

    /// Which VM, and which of its contexts, host fence `host_fence` belongs to:
    /// how the interrupt handler routes a physical completion. `None` for a fence
    /// not on the GPU (already completed, or dropped by a reset).
    pub fn route(&self, host_fence: u64) -> Option<(VmId, u32)> {
        self.sh.routes.get(&host_fence).copied()
    }

    /// Applies the GPU's completions of commands of `vm`'s batch (all of them or
    /// some; in any order), signals the guest fences that are now due in
    /// submission order, writes the responses into `mem` (that VM's memory),
    /// returns the chains and raises at most one virtual interrupt per vector.
    ///
    /// A completion that is not in the VM's batch is ignored and reported as a
    /// [`EventKind::StaleCompletion`]; if it is an `UNREF` that was on the GPU when
    /// the VM was reset, its host id is free from now on. So the hypervisor reports
    /// every completion of a VM, reset or gone, to the mediator.
    pub fn complete_batch(
        &mut self,
        vm: VmId,
        completions: &[Completion],
        mem: &mut dyn GuestMemory,
    ) -> Result<CompletionReport, MediatorError> {
        let v = self.vms.get_mut(&vm).ok_or(MediatorError::UnknownVm(vm))?;
        let mut report = CompletionReport::default();
        for c in completions {
            let ours = v
                .in_flight
                .as_mut()
                .is_some_and(|b| b.remaining.remove(&c.host_fence));
            if !ours {
                // The UNREF of a reset VM's resource has run: its id is free now,
                // and what it held is given back.
                if let Some((host, record)) = self.sh.releasing.remove(&c.host_fence) {
                    self.sh.free_host_id(host);
                    self.sh.release(v, record);
                }
                report.stale += 1;
                self.sh.counters.spurious_interrupts =
                    self.sh.counters.spurious_interrupts.saturating_add(1);
                self.sh.event(
                    vm,
                    Channel::Debug,
                    EventKind::StaleCompletion {
                        host_fence: c.host_fence,
                    },
                );
                continue;
            }
            report.completed += 1;
            self.sh.routes.remove(&c.host_fence);
            self.sh.complete_one(v, *c);
        }
        if v.in_flight.as_ref().is_some_and(|b| b.remaining.is_empty()) {
            v.in_flight = None;
            report.batch_done = true;
        }
        let c = self.sh.counters(vm);
        c.ops_completed = c.ops_completed.saturating_add(report.completed as u64);
        if v.state != VmState::Reset {
            for q in QueueId::ALL {
                let before = v.unanswered();
                let r = self.sh.retire(v, q, mem);
                report.returned += before - v.unanswered();
                if let Err(error) = r {
                    self.sh.ring_fault(v, q, error);
                    break;
                }
            }
        }
        Ok(report)
    }

    /// Advances the mediator's clock to `now_ns` and runs the watchdog: a VM whose
    /// batch has been on the GPU longer than its watchdog is marked hung
    /// ([`VmState::NeedsReset`], `DEVICE_NEEDS_RESET`, a config interrupt, a
    /// [`EventKind::CommandTimeout`]). Returns the VMs marked hung by this call; the
    /// hypervisor resets their channel and then calls [`reset_vm`](Self::reset_vm).
    pub fn tick(&mut self, now_ns: u64) -> Vec<VmId> {
        self.sh.now_ns = self.sh.now_ns.max(now_ns);
        let now = self.sh.now_ns;
        let mut hung = Vec::new();
        for (&id, v) in self.vms.iter_mut() {
            let Some(b) = &v.in_flight else { continue };
            let waited = now.saturating_sub(b.submitted_ns);
            if v.state != VmState::Active || waited <= v.config.watchdog_ns {
                continue;
            }
            let batch = b.id;
            v.state = VmState::NeedsReset;
            v.needs_reset = true;
            self.sh.interrupt(id, v.vectors[0]);
            self.sh.event(
                id,
                Channel::Debug,
                EventKind::CommandTimeout {
                    batch,
                    waited_ns: waited,
                },
            );
            hung.push(id);
        }
        hung
    }

    /// Resets `vm`'s GPU channel after a fault (hang, broken ring, or the
    /// hypervisor's decision): drops its staged, in-flight and unanswered work,
    /// gives back its VRAM, unmaps its IOMMU mappings (returned in the report, for
    /// the hypervisor to remove now) and stages the host commands that blank its
    /// scanouts and free its host resources (taken with [`take_batch`](Self::take_batch)
    /// like any other; the host ids are reused only once those completed, and those
    /// of `UNREF`s of the dropped batch once their late completions arrive). The guest
    /// sees `DEVICE_NEEDS_RESET` and a config interrupt, and starts over with
    /// [`start_queues`](Self::start_queues). No other VM is touched.
    pub fn reset_vm(&mut self, vm: VmId) -> Result<ResetReport, MediatorError> {
        let v = self.vms.get_mut(&vm).ok_or(MediatorError::UnknownVm(vm))?;
        let report = self.sh.reset_context(v, true);
        Ok(report)
    }

    /// The driver reset the device (wrote 0 to the device status): the same cleanup
    /// as [`reset_vm`](Self::reset_vm), and `DEVICE_NEEDS_RESET` is cleared.
    pub fn driver_reset(&mut self, vm: VmId) -> Result<ResetReport, MediatorError> {
        let v = self.vms.get_mut(&vm).ok_or(MediatorError::UnknownVm(vm))?;
        let report = self.sh.reset_context(v, false);
        Ok(report)
    }

    /// Drains the events recorded since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.sh.events.drain(..).collect()
    }

    /// Events dropped because nobody drained them in time.
    pub fn events_lost(&self) -> u64 {
        self.sh.events_lost
    }

    /// Drains the virtual interrupts to inject, as `(vm, vector)`, each at most
    /// once.
    pub fn take_interrupts(&mut self) -> Vec<(VmId, u16)> {
        core::mem::take(&mut self.sh.interrupts)
    }

    /// Drains the IOMMU changes to make, in order. Maps must be applied before
    /// any batch taken after them is submitted.
    pub fn take_iommu_ops(&mut self) -> Vec<IommuOp> {
        core::mem::take(&mut self.sh.iommu)
    }

    /// VRAM held by all VMs, in bytes.
    pub fn vram_used(&self) -> u64 {
        self.sh.vram_used
    }

    /// The counters of every VM and of the GPU.
    pub fn counters(&self) -> &GlobalCounters {
        &self.sh.counters
    }

    /// The counters, for the scheduler and interrupt handler to add what they
    /// measure (slices, context switches, device interrupts).
    pub fn counters_mut(&mut self) -> &mut GlobalCounters {
        &mut self.sh.counters
    }

    /// Charges `bytes` the hypervisor keeps for `vm` (its zero-copy buffer
    /// records, say) to the VM's memory budget. Over budget nothing is charged, the
    /// refusal is counted and reported on the debug channel, and the hypervisor
    /// refuses what the VM asked for.
    pub fn charge(&mut self, vm: VmId, bytes: u64) -> Result<(), MediatorError> {
        let v = self.vms.get_mut(&vm).ok_or(MediatorError::UnknownVm(vm))?;
        self.sh.charge_reported(v, bytes)?;
        v.external += bytes;
        Ok(())
    }

    /// Gives back `bytes` charged with [`charge`](Self::charge).
    pub fn release(&mut self, vm: VmId, bytes: u64) {
        if let Some(v) = self.vms.get_mut(&vm) {
            let bytes = bytes.min(v.external);
            v.external -= bytes;
            self.sh.release(v, bytes);
        }
    }
}

impl Shared {
    /// Takes and handles chains until the queue is empty or the backlog is full.
    fn drain_queue(
        &mut self,
        v: &mut VmGpu,
        queue: QueueId,
        mem: &mut dyn GuestMemory,
        report: &mut DoorbellReport,
    ) -> Result<(), RingError> {
        loop {
            let full = v.backlog() >= limits::MAX_QUEUED_PER_VM;
            let Some(q) = v.queues[queue.index()].as_mut() else {
                return Ok(());
            };
            if full {
                // Chains stay in the ring until the GPU has caught up.
                if q.pending(mem)? > 0 {
                    report.deferred = true;
                    self.counters(v.id).reject(RejectReason::Backpressure);
                }
                return Ok(());
            }
            match q.pop(mem)? {
                Some(chain) => self.handle_chain(v, queue, chain, mem, report),
                None if v.polled => return Ok(()),
                None => {
                    // Ask for a kick at the next chain, then look once more: the
                    // driver may have added one before it saw the new event index.
                    q.set_avail_event(mem)?;
                    if q.pending(mem)? == 0 {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Copies, checks and stages (or answers) one chain.
    fn handle_chain(
        &mut self,
        v: &mut VmGpu,
        queue: QueueId,
        chain: ring::Chain,
        mem: &dyn GuestMemory,
        report: &mut DoorbellReport,
    ) {
        let mut reply = PendingReply {
            head: chain.head,
            writable: chain.writable,
            hdr: CtrlHdr::default(),
            state: ReplyState::Ready(Response::OkNoData),
        };
        let outcome = self.check_chain(v, queue, &chain.readable, mem, &mut reply.hdr);
        match outcome {
            Ok(Outcome::Emulated(resp)) => {
                report.emulated += 1;
                reply.state = ReplyState::Ready(resp);
            }
            Ok(Outcome::Host {
                cmd,
                effect,
                copies,
                charge,
                buf,
            }) => {
                report.staged += 1;
                if matches!(cmd, Command::UpdateCursor { resource_id, .. } if resource_id != 0) {
                    v.cursor_shown = true;
                }
                let tracked = Tracked {
                    reply: Some(queue),
                    effect,
                    charge,
                };
                let host_fence = self.stage_encoded(v, queue, cmd, tracked, copies, buf);
                if reply.hdr.flags & wire::FLAG_FENCE != 0 {
                    if let Some(last) = v.fences.outstanding.back_mut() {
                        last.1 = Some(host_fence);
                    }
                }
                reply.state = ReplyState::Waiting(host_fence);
            }
            Err(rej) => {
                report.rejected += 1;
                let response = if queue == QueueId::Control {
                    rej.response
                } else {
                    0
                };
                self.counters(v.id).reject(rej.reason);
                if let Some((gpa, len, error)) = rej.fault {
                    self.event(
                        v.id,
                        Channel::Debug,
                        EventKind::DmaFault { gpa, len, error },
                    );
                }
                self.event(
                    v.id,
                    Channel::Debug,
                    EventKind::Rejected {
                        queue,
                        cmd_type: reply.hdr.type_,
                        reason: rej.reason,
                        response,
                    },
                );
                reply.state = ReplyState::Ready(Response::Err(rej.response));
            }
        }
        v.replies[queue.index()].push_back(reply);
    }

    /// Gathers the chain's request into staging, decodes it, checks its queue and
    /// fence, and validates it. `hdr` receives the header the answer echoes (with
    /// `FLAG_FENCE` only if the fence was accepted).
    fn check_chain(
        &mut self,
        v: &mut VmGpu,
        queue: QueueId,
        readable: &[ring::Segment],
        mem: &dyn GuestMemory,
        hdr: &mut CtrlHdr,
    ) -> Result<Outcome, Rejection> {
        self.staging.clear();
        let gathered = ring::gather(mem, readable, &mut self.staging, limits::MAX_COMMAND_BYTES);
        let bytes = match gathered {
            Ok(n) => n,
            Err(RingError::Memory(e)) => return Err(Rejection::unspec(e.into())),
            Err(_) => return Err(Rejection::unspec(RejectReason::Decode)),
        };
        let c = self.counters(v.id);
        c.bytes_copied = c.bytes_copied.saturating_add(bytes as u64);
        // Only the type is echoed until the request decodes and its fence is checked.
        hdr.type_ = CtrlHdr::read(&self.staging).map_or(0, |h| h.type_);
        let req = command::decode(&self.staging).map_err(|e| Rejection {
            reason: e.into(),
            response: e.response_type(),
            fault: None,
        })?;
        let is_cursor_cmd = matches!(
            req.cmd,
            Command::UpdateCursor { .. } | Command::MoveCursor { .. }
        );
        if is_cursor_cmd != (queue == QueueId::Cursor) {
            return Err(Rejection::unspec(RejectReason::Permission));
        }
        *hdr = CtrlHdr {
            flags: 0,
            fence_id: 0,
            ..req.hdr
        };
        if req.hdr.flags & wire::FLAG_FENCE != 0 {
            if queue == QueueId::Cursor {
                // The cursor queue has no responses, so nothing could signal it.
                return Err(Rejection::param(RejectReason::Permission));
            }
            v.fences.check(req.hdr.fence_id).map_err(|f| {
                Rejection::param(match f {
                    vm::FenceFault::Forged => RejectReason::FenceForged,
                    vm::FenceFault::Replayed => RejectReason::FenceReplay,
                })
            })?;
            // Accepted: from here on the answer (even an error) signals the fence.
            v.fences.last_submitted = req.hdr.fence_id;
            v.fences.outstanding.push_back((req.hdr.fence_id, None));
            hdr.flags = wire::FLAG_FENCE;
            hdr.fence_id = req.hdr.fence_id;
        }
        validate::validate(self, v, &req.cmd, mem)
    }

    /// Returns, in order, every chain of `queue` whose answer is known.
    fn retire(
        &mut self,
        v: &mut VmGpu,
        queue: QueueId,
        mem: &mut dyn GuestMemory,
    ) -> Result<(), RingError> {
        let Some(q) = v.queues[queue.index()].as_mut() else {
            return Ok(());
        };
        let old_used = q.used_idx();
        let replies = &mut v.replies[queue.index()];
        let mut out = Vec::new();
        while let Some(PendingReply {
            state: ReplyState::Ready(_),
            ..
        }) = replies.front()
        {
            let Some(r) = replies.pop_front() else { break };
            let ReplyState::Ready(resp) = r.state else {
                break;
            };
            let mut written = 0;
            if !r.writable.is_empty() {
                out.clear();
                resp.encode(&r.hdr, &mut out);
                match ring::scatter(mem, &r.writable, &out) {
                    Ok(n) => written = n,
                    Err(RingError::Memory(error)) => self.event(
                        v.id,
                        Channel::Debug,
                        EventKind::DmaFault {
                            gpa: r.writable.first().map_or(Gpa::new(0), |s| s.gpa),
                            len: out.len() as u64,
                            error,
                        },
                    ),
                    Err(_) => {}
                }
            }
            if r.hdr.flags & wire::FLAG_FENCE != 0 {
                v.fences.last_signalled = r.hdr.fence_id;
                if v.fences.outstanding.front().map(|f| f.0) == Some(r.hdr.fence_id) {
                    v.fences.outstanding.pop_front();
                }
            }
            q.push_used(mem, r.head, written)?;
        }
        if q.should_notify(mem, old_used)? {
            self.interrupt(v.id, v.vectors[1 + queue.index()]);
        }
        Ok(())
    }

    /// Applies one completion of `v`'s batch.
    fn complete_one(&mut self, v: &mut VmGpu, c: Completion) {
        let Some(t) = v.tracked.remove(&c.host_fence) else {
            return;
        };
        let ok = c.status == wire::RESP_OK_NODATA;
        if !ok {
            self.event(
                v.id,
                Channel::Debug,
                EventKind::HostError {
                    host_fence: c.host_fence,
                    status: c.status,
                },
            );
        }
        // Memory given back once the effect is applied.
        let mut freed = t.charge;
        match t.effect {
            Effect::None => {}
            Effect::Created { guest, host } => {
                if !ok && v.resources.get(&guest).is_some_and(|r| r.host_id == host) {
                    if let Some(r) = v.resources.remove(&guest) {
                        v.vram_used = v.vram_used.saturating_sub(r.bytes());
                        self.refund(r.bytes());
                        if let Some(b) = r.backing {
                            let maps: Vec<_> = b.mappings().collect();
                            self.unmap(v.id, &maps);
                            freed += b.charge;
                        }
                        for s in v.scanouts.iter_mut().filter(|s| s.resource == guest) {
                            *s = vm::ScanoutState::default();
                        }
                    }
                    freed += v.held.remove(&host).unwrap_or(0);
                    self.free_host_id(host);
                }
            }
            Effect::Attached { guest, host } => {
                if let Some(r) = v.resources.get_mut(&guest).filter(|r| r.host_id == host) {
                    if !ok {
                        if let Some(b) = r.backing.take() {
                            let maps: Vec<_> = b.mappings().collect();
                            self.unmap(v.id, &maps);
                            freed += b.charge;
                        }
                    }
                }
            }
            Effect::Detached { unmap } => self.unmap(v.id, &unmap),
            Effect::Released { host, unmap } => {
                self.unmap(v.id, &unmap);
                if let Some(record) = v.held.remove(&host) {
                    freed += record;
                    self.free_host_id(host);
                }
            }
        }
        self.release(v, freed);
        if let Some(q) = t.reply {
            let waiting = v.replies[q.index()]
                .iter_mut()
                .find(|r| r.state == ReplyState::Waiting(c.host_fence));
            if let Some(r) = waiting {
                r.state = ReplyState::Ready(response_for_status(c.status));
            }
        }
    }

    /// The VM's ring is malformed: stop serving it until the driver resets.
    fn ring_fault(&mut self, v: &mut VmGpu, queue: QueueId, error: RingError) {
        self.counters(v.id).reject(RejectReason::Ring);
        self.event(v.id, Channel::Debug, EventKind::RingFault { queue, error });
        if let RingError::Memory(e) = error {
            self.counters(v.id).reject(e.into());
        }
        if v.state == VmState::Active {
            v.state = VmState::NeedsReset;
        }
        if !v.needs_reset {
            v.needs_reset = true;
            self.interrupt(v.id, v.vectors[0]);
        }
    }

    /// Drops `v`'s context and stages the cleanup of what it held on the device.
    fn reset_context(&mut self, v: &mut VmGpu, forced: bool) -> ResetReport {
        let vm = v.id;
        let dropped = v.unanswered();
        if let Some(b) = v.in_flight.take() {
            for f in &b.remaining {
                self.routes.remove(f);
                // An UNREF already on the GPU frees its resource there: the host id
                // is not unref'd a second time below, and is free for reuse once
                // that UNREF's completion arrives (see `complete_batch`).
                if let Some(Tracked {
                    effect: Effect::Released { host, .. },
                    ..
                }) = v.tracked.get(f)
                {
                    let host = *host;
                    if let Some(record) = v.held.remove(&host) {
                        self.releasing.insert(*f, (host, record));
                    }
                }
            }
        }
        // Everything the IOMMU may hold for the VM: backings still attached, and
        // backings detached by commands that never completed.
        let mut unmapped: Vec<(Hpa, u64)> = v
            .resources
            .values()
            .filter_map(|r| r.backing.as_ref())
            .flat_map(|b| b.mappings())
            .collect();
        for t in v.tracked.values() {
            unmapped.extend_from_slice(t.effect.unmaps());
        }
        // Ops not drained yet cancel out: an unapplied map needs no unmap, and an
        // unapplied unmap is done now.
        let mut kept = Vec::with_capacity(self.iommu.len());
        for op in self.iommu.drain(..) {
            match op {
                IommuOp::Map { vm: o, hpa, len } if o == vm => {
                    if let Some(i) = unmapped.iter().position(|&m| m == (hpa, len)) {
                        unmapped.swap_remove(i);
                    }
                }
                IommuOp::Unmap { vm: o, hpa, len } if o == vm => unmapped.push((hpa, len)),
                other => kept.push(other),
            }
        }
        self.iommu = kept;
        self.interrupts.retain(|&(o, _)| o != vm);
        self.refund(v.vram_used);
        v.vram_used = 0;
        // Backings, staged and tracked commands and the queues' reservations go
        // now; resource records stay charged until the device let them go.
        let freed = v
            .resources
            .values()
            .filter_map(|r| r.backing.as_ref())
            .map(|b| b.charge)
            .chain(v.tracked.values().map(|t| t.charge))
            .chain(v.queue_charge)
            .sum();
        v.queue_charge = [0, 0];
        self.release(v, freed);
        // A resource whose CREATE is still staged never reached the device: its
        // host id is free now, and there is nothing to UNREF.
        let mut never_created = 0;
        for c in &v.staged {
            if let Some(Tracked {
                effect: Effect::Created { host, .. },
                ..
            }) = v.tracked.get(&c.host_fence)
            {
                if let Some(record) = v.held.remove(host) {
                    never_created += record;
                    self.free_host_id(*host);
                }
            }
        }
        self.release(v, never_created);
        v.resources.clear();
        v.staged.clear();
        v.tracked.clear();
        v.replies.iter_mut().for_each(VecDeque::clear);
        v.fences = vm::FenceState::default();
        v.queues = [None, None];
        v.state = VmState::Reset;
        v.needs_reset = forced;
        // Blank what the VM showed (scanouts, cursor), then free every host id it
        // holds; the ids are reused only once these complete.
        let shown: Vec<(usize, u32)> = v
            .scanouts
            .iter()
            .zip(&v.config.scanouts)
            .enumerate()
            .filter(|(_, (s, _))| s.resource != 0)
            .map(|(i, (_, c))| (i, c.physical))
            .collect();
        for &(i, p) in &shown {
            // A band of a shared head is blanked (zeros), not the whole head.
            if let Some((band, w, h)) = validate::band_of(v, i as u32) {
                let (transfer, flush, copies) = validate::blank_band(&band, w, h);
                self.stage_with_copies(
                    v,
                    QueueId::Control,
                    transfer,
                    Tracked::internal(Effect::None),
                    copies,
                );
                self.stage(v, QueueId::Control, flush, Tracked::internal(Effect::None));
                continue;
            }
            let cmd = Command::SetScanout {
                rect: Rect::default(),
                scanout_id: p,
                resource_id: 0,
            };
            self.stage(v, QueueId::Control, cmd, Tracked::internal(Effect::None));
        }
        if v.cursor_shown {
            let physical: Vec<u32> = v.config.scanouts.iter().map(|s| s.physical).collect();
            for p in physical {
                let cmd = Command::UpdateCursor {
                    pos: wire::CursorPos {
                        scanout_id: p,
                        ..Default::default()
                    },
                    resource_id: 0,
                    hot_x: 0,
                    hot_y: 0,
                };
                self.stage(v, QueueId::Cursor, cmd, Tracked::internal(Effect::None));
            }
        }
        v.cursor_shown = false;
        v.scanouts
            .iter_mut()
            .for_each(|s| *s = vm::ScanoutState::default());
        let held: Vec<u32> = v.held.keys().copied().collect();
        for &host in &held {
            let cmd = Command::ResourceUnref { resource_id: host };
            let effect = Effect::Released {
                host,
                unmap: Vec::new(),
            };
            self.stage(v, QueueId::Control, cmd, Tracked::internal(effect));
        }
        let report = ResetReport {
            dropped,
            released: held.len(),
            unmapped,
        };
        // A driver resetting a device that holds nothing (as every driver does
        // at probe) is routine, not worth a new context, a count or a log line.
        let routine = !forced && dropped == 0 && held.is_empty() && report.unmapped.is_empty();
        if routine {
            return report;
        }
        v.context = self.alloc_context();
        if forced {
            let c = self.counters(vm);
            c.resets = c.resets.saturating_add(1);
            self.interrupt(vm, v.vectors[0]);
        }
        self.event(
            vm,
            Channel::Debug,
            EventKind::ChannelReset {
                dropped,
                released: held.len(),
                forced,
            },
        );
        report
    }
}

impl Tracked {
    /// A command of the mediator's own: no guest chain waits for it, and it is
    /// paid for by what it cleans up (or bounded by the configuration).
    fn internal(effect: Effect) -> Self {
        Tracked {
            reply: None,
            effect,
            charge: 0,
        }
    }
}
