//! One VM's GPU context: what the mediator remembers about a guest between two of
//! its doorbells.
//!
//! Everything a guest can name lives here, keyed by the guest's own ids, so the only
//! way from a guest id to a host object is a lookup in this VM's tables: a VM cannot
//! name what is not in them. The host side (ids, fences, VRAM, IOMMU mappings) is
//! global and lives in the mediator; this module records which host objects the VM
//! holds, so that a reset can give every one of them back.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;

use crate::budget::Budget;
use crate::command::Response;
use crate::memory::Hpa;
use crate::ring::{DeviceQueue, Segment};
use crate::sched::VmId;
use crate::wire::{CtrlHdr, MemEntry, Rect};

use super::{HostCommand, QueueId, VmGpuConfig, VmState, NO_VECTOR};

/// A 2D resource as the guest created it, with its host twin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Resource {
    /// Host resource id (global namespace).
    pub host_id: u32,
    /// Pixel format (`wire::format`).
    pub format: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Attached backing, if any.
    pub backing: Option<Backing>,
}

impl Resource {
    /// VRAM the resource occupies (4 bytes per pixel for every 2D format).
    pub fn bytes(&self) -> u64 {
        resource_bytes(self.width, self.height)
    }
}

/// Bytes of a `width` x `height` resource at 4 bytes per pixel.
pub(super) fn resource_bytes(width: u32, height: u32) -> u64 {
    u64::from(width) * u64::from(height) * 4
}

/// One host-contiguous run of a backing: what the IOMMU maps, and (as a
/// [`MemEntry`] of the host command, [`HostRun::entry`]) what the device is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct HostRun {
    /// Host-physical start, from [`crate::memory::GuestMemory::translate`].
    pub hpa: Hpa,
    /// Length in bytes.
    pub len: u32,
}

impl HostRun {
    /// The run as an entry of a host command (the wire format's raw address).
    pub fn entry(&self) -> MemEntry {
        MemEntry {
            addr: self.hpa.get(),
            length: self.len,
            padding: 0,
        }
    }
}

/// A resource's backing pages, as the guest named them and as the device sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Backing {
    /// The entries as the guest sent them (guest-physical, raw as on the wire),
    /// kept for snapshots.
    pub guest: Vec<MemEntry>,
    /// The same pages translated and merged into host-contiguous runs: what the
    /// device is given and what the IOMMU maps.
    pub host: Vec<HostRun>,
    /// Total length in bytes.
    pub len: u64,
    /// Hypervisor memory charged to the VM for it (see [`crate::budget::cost`]).
    pub charge: u64,
}

impl Backing {
    /// The IOMMU mappings this backing needs, as `(hpa, len)`.
    pub fn mappings(&self) -> impl Iterator<Item = (Hpa, u64)> + '_ {
        self.host.iter().map(|r| (r.hpa, u64::from(r.len)))
    }
}

/// What a virtual scanout currently shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ScanoutState {
    /// Guest resource id on the scanout, 0 when disabled.
    pub resource: u32,
    /// Source rectangle in that resource.
    pub rect: Rect,
}

/// The shadow-fence state of one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct FenceState {
    /// Highest guest fence id accepted so far (0: none yet).
    pub last_submitted: u64,
    /// Guest fence id signalled most recently (0: none yet).
    pub last_signalled: u64,
    /// Accepted guest fences not yet signalled, oldest first, with the host fence
    /// each one shadows (`None` when the mediator answers it without the GPU).
    pub outstanding: VecDeque<(u64, Option<u64>)>,
}

/// Why a guest fence id was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FenceFault {
    /// Not above the last fence submitted, and not one the VM used.
    Forged,
    /// A fence the VM already used (the last one, or one still outstanding).
    Replayed,
}

impl FenceState {
    /// Checks a guest fence id: it must be above every fence the VM submitted before.
    pub fn check(&self, fence: u64) -> Result<(), FenceFault> {
        if fence > self.last_submitted {
            return Ok(());
        }
        let used = fence != 0
            && (fence == self.last_submitted
                || fence == self.last_signalled
                || self.outstanding.iter().any(|&(g, _)| g == fence));
        Err(if used {
            FenceFault::Replayed
        } else {
            FenceFault::Forged
        })
    }
}

/// How a chain the guest is waiting on will be answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ReplyState {
    /// The answer is known (emulated, or refused).
    Ready(Response),
    /// Sent to the GPU as host fence `0`; answered when that completes.
    Waiting(u64),
}

/// A popped chain not yet returned to the guest. Each queue returns its chains in
/// the order they were taken, so fences signal in submission order and an early
/// answer never overtakes a command still on the GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PendingReply {
    /// Head descriptor to return.
    pub head: u16,
    /// Where the response goes (checked to be guest RAM when popped).
    pub writable: Vec<Segment>,
    /// Header the response answers (fence echoed only if the fence was accepted).
    pub hdr: CtrlHdr,
    /// The answer, or the host fence it waits for.
    pub state: ReplyState,
}

/// What to do when a host command completes, beyond answering the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Effect {
    /// Nothing more.
    None,
    /// `RESOURCE_CREATE_2D`: on failure the guest's entry goes away again.
    Created {
        /// Guest resource id.
        guest: u32,
        /// Host resource id.
        host: u32,
    },
    /// `RESOURCE_ATTACH_BACKING`: on failure the backing goes away again.
    Attached {
        /// Guest resource id.
        guest: u32,
        /// Host resource id.
        host: u32,
    },
    /// The backing is off the device: unmap it.
    Detached {
        /// IOMMU mappings to remove.
        unmap: Vec<(Hpa, u64)>,
    },
    /// `RESOURCE_UNREF` (guest's, or the mediator's own after a reset): the host id
    /// is free once the device has dropped it, and its backing can be unmapped.
    Released {
        /// Host resource id.
        host: u32,
        /// IOMMU mappings to remove.
        unmap: Vec<(Hpa, u64)>,
    },
}

impl Effect {
    /// IOMMU mappings this effect still owns (removed at completion).
    pub fn unmaps(&self) -> &[(Hpa, u64)] {
        match self {
            Effect::Detached { unmap } | Effect::Released { unmap, .. } => unmap,
            _ => &[],
        }
    }
}

/// A host command waiting for, or on, the GPU, with its completion bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Tracked {
    /// Queue whose guest chain waits for it, if any (none for the mediator's own
    /// commands, and none for cursor commands).
    pub reply: Option<QueueId>,
    /// What the completion does besides answering.
    pub effect: Effect,
    /// Hypervisor memory charged to the VM until the command completes (or is
    /// dropped): the command itself, and what its effect still holds.
    pub charge: u64,
}

/// The batch a VM has on the physical ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct InFlight {
    /// Batch id (global, for logs).
    pub id: u64,
    /// Host fences not completed yet.
    pub remaining: BTreeSet<u64>,
    /// When it was handed out (mediator clock).
    pub submitted_ns: u64,
}

/// One VM's paravirtual GPU context: its queues and vectors, scanouts, resources
/// with their backing, fences, and its staged and in-flight work (its counters are
/// in [`super::Mediator::counters`]). Read it through [`super::Mediator::vm`]; only
/// the mediator changes it.
#[derive(Clone, Debug)]
pub struct VmGpu {
    pub(super) id: VmId,
    pub(super) config: VmGpuConfig,
    pub(super) quota: u64,
    pub(super) state: VmState,
    pub(super) needs_reset: bool,
    /// Identifies this incarnation of the context; new after every reset.
    pub(super) context: u32,
    pub(super) queues: [Option<DeviceQueue>; 2],
    /// MSI-X vectors: config, control queue, cursor queue.
    pub(super) vectors: [u16; 3],
    pub(super) resources: BTreeMap<u32, Resource>,
    /// Host ids the VM holds on the device (live resources and those whose
    /// `RESOURCE_UNREF` has not completed yet), each with the hypervisor memory
    /// charged for it until the device lets it go.
    pub(super) held: BTreeMap<u32, u64>,
    pub(super) scanouts: Vec<ScanoutState>,
    pub(super) vram_used: u64,
    pub(super) fences: FenceState,
    pub(super) replies: [VecDeque<PendingReply>; 2],
    pub(super) staged: VecDeque<HostCommand>,
    pub(super) tracked: BTreeMap<u64, Tracked>,
    pub(super) in_flight: Option<InFlight>,
    /// Whether the guest has shown a cursor image (a reset then hides it).
    pub(super) cursor_shown: bool,
    /// Whether the hypervisor polls the queues now (the guest was asked not to kick).
    pub(super) polled: bool,
    /// Hypervisor memory charged to the VM, and its limit.
    pub(super) memory: Budget,
    /// What each live queue reserved of it (see [`crate::budget::cost::queue`]).
    pub(super) queue_charge: [u64; 2],
    /// What the hypervisor charged through [`super::Mediator::charge`].
    pub(super) external: u64,
}

impl VmGpu {
    pub(super) fn new(id: VmId, config: VmGpuConfig, quota: u64, context: u32) -> Self {
        let scanouts = alloc::vec![ScanoutState::default(); config.scanouts.len()];
        let memory = Budget::new(config.hv_memory);
        Self {
            id,
            config,
            quota,
            state: VmState::Reset,
            needs_reset: false,
            context,
            queues: [None, None],
            vectors: [NO_VECTOR; 3],
            resources: BTreeMap::new(),
            held: BTreeMap::new(),
            scanouts,
            vram_used: 0,
            fences: FenceState::default(),
            replies: [VecDeque::new(), VecDeque::new()],
            staged: VecDeque::new(),
            tracked: BTreeMap::new(),
            in_flight: None,
            cursor_shown: false,
            polled: false,
            memory,
            queue_charge: [0, 0],
            external: 0,
        }
    }

    /// The VM's id.
    pub fn id(&self) -> VmId {
        self.id
    }

    /// The configuration the VM was added with.
    pub fn config(&self) -> &VmGpuConfig {
        &self.config
    }

    /// Its lifecycle state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Its current context id (changes at every reset).
    pub fn context_id(&self) -> u32 {
        self.context
    }

    /// VRAM the VM may hold at once, in bytes.
    pub fn vram_quota(&self) -> u64 {
        self.quota
    }

    /// VRAM its resources hold now, in bytes.
    pub fn vram_used(&self) -> u64 {
        self.vram_used
    }

    /// Resources the guest can name now.
    pub fn resource_count(&self) -> usize {
        self.resources.len()
    }

    /// Host resource ids the VM holds on the device (including ones being freed).
    pub fn host_resources(&self) -> impl Iterator<Item = u32> + '_ {
        self.held.keys().copied()
    }

    /// Hypervisor memory charged to the VM now, its limit and its peak.
    pub fn memory(&self) -> &Budget {
        &self.memory
    }

    /// The host id behind guest resource `guest`, if the guest has one by that id.
    pub fn host_resource(&self, guest: u32) -> Option<u32> {
        self.resources.get(&guest).map(|r| r.host_id)
    }

    /// Highest guest fence id accepted so far.
    pub fn last_fence_submitted(&self) -> u64 {
        self.fences.last_submitted
    }

    /// Guest fence id signalled most recently.
    pub fn last_fence_signalled(&self) -> u64 {
        self.fences.last_signalled
    }

    /// Host commands validated and waiting for [`super::Mediator::take_batch`].
    pub fn staged_len(&self) -> usize {
        self.staged.len()
    }

    /// The staged host commands, in the order [`super::Mediator::take_batch`]
    /// hands them out (read-only: lets a GPU scheduler size a batch to the time
    /// left in a slice before taking it).
    pub fn staged(&self) -> impl Iterator<Item = &HostCommand> + '_ {
        self.staged.iter()
    }

    /// Whether a batch of this VM is on the physical ring.
    pub fn has_batch_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Whether the hypervisor polls the VM's queues now (see
    /// [`super::Mediator::set_polled`]).
    pub fn polled(&self) -> bool {
        self.polled
    }

    /// Chains taken from the guest and not yet returned to it.
    pub fn unanswered(&self) -> usize {
        self.replies.iter().map(VecDeque::len).sum()
    }

    /// The device queue `q`, once the driver has set it up.
    pub fn queue(&self, q: QueueId) -> Option<&DeviceQueue> {
        self.queues[q.index()].as_ref()
    }

    /// Commands the VM has in the mediator (staged or on the GPU): what
    /// back-pressure counts.
    pub(super) fn backlog(&self) -> usize {
        self.staged.len() + self.in_flight.as_ref().map_or(0, |b| b.remaining.len())
    }

    /// Nothing staged, in flight or unanswered, and no queue held in a queue reset:
    /// the state a snapshot needs.
    pub fn is_quiescent(&self) -> bool {
        let queues_whole = self.state != VmState::Active || self.queues.iter().all(Option::is_some);
        self.staged.is_empty() && self.in_flight.is_none() && self.unanswered() == 0 && queues_whole
    }
}
