//! A deterministic many-VM simulation of the shared GPU: the proof that the
//! mediator and the scheduler together keep their promises.
//!
//! Every VM is a guest with its own RAM ([`VecMemory`], at its own host-physical
//! base) and the driver side of its two virtqueues ([`DriverQueue`]), shaped as
//! Linux's `virtio_gpu` driver shapes them (indirect control commands with one
//! response buffer, `ATTACH_BACKING` as header plus entry array, direct cursor
//! commands, event idx). Guests ring doorbells into the kernel's GPU dispatcher
//! ([`Dispatcher`]): the real [`Mediator`] validates their commands and the real
//! [`Scheduler`] decides whose batch the simulated GPU ([`SimGpu`]) runs next, in
//! time slices; simulated time advances by the GPU's cost of each command (its
//! [`CostModel`]) plus a context switch whenever the GPU changes VM. The GPU reaches
//! guest memory only through the dispatcher's [`Grants`] (built from the mediator's
//! IOMMU reports), so an access the mediator did not grant is counted as a fault.
//!
//! Guests come in four [`Load`]s: idle, interactive (a `TRANSFER`+`FLUSH` pair now
//! and then, small rectangles, fenced 64x64 cursor uploads followed by
//! `UPDATE_CURSOR`/`MOVE_CURSOR`), saturating (page flips back to back: full-frame
//! `TRANSFER`, `SET_SCANOUT`, `FLUSH`) and malicious (forged fences, other VMs'
//! resource ids, backing outside its RAM, foreign scanouts, garbage, quota
//! exhaustion, ring corruption followed by a device reset, doorbell storms).
//!
//! The simulation is a discrete-event loop with no clock of its own: everything is
//! driven by a seed through a small built-in PRNG ([`Rng`]) and ordered maps, so a
//! run is a pure function of its [`Scenario`]. [`run`] returns a [`Report`] with the
//! figures (per-VM GPU share against weight share, Jain's fairness index,
//! p50/p99 latency against the scheduler's `L_max`, `U_gpu`, efficiency `E`, the
//! fence wait decomposition `T_wait = max(T_real, T_sched)`, isolation counts);
//! [`noisy_neighbour`] compares an interactive VM's latency alone and next to other
//! loads. `examples/simulate.rs` prints them; the tests below assert the bounds.
//!
//! # How the GPU is shared
//!
//! By the kernel's own dispatcher ([`Dispatcher`], see [`crate::dispatch`]), driven
//! as the kernel drives it, with the time as an argument: it owns the mediator, the
//! scheduler and the grants, and the simulation keeps no dispatch state of its own.
//! A guest's doorbell goes to [`Dispatcher::doorbell`] followed by
//! [`Dispatcher::schedule`], a device reset by the driver to
//! [`Dispatcher::driver_reset`], and at every event time the bottom half
//! [`Dispatcher::service`] takes the completions the device reported, runs the
//! watchdog (a VM found hung has its channel reset there, and its guest starts over)
//! and lets the scheduler pick the next batch.
//!
//! So the rules are the dispatcher's: one batch of one VM is on the GPU at a time;
//! it is sized so that the cost bounds ([`cost_bound_ns`]) of its commands, plus a
//! context switch when the GPU changes VM, fit the time left in the slice (a fresh
//! slice takes at least one command: one larger than a whole quantum runs alone, and
//! is counted here as an overrun), and to the room left on the ring ([`RING_SLOTS`]).
//! A slice closes when its time is up, its VM has nothing staged, or not even one
//! more command fits; the scheduler is charged the wall time the slice held the GPU.
//! A reserved slot (fixed-share and equal-share modes) of a VM without work stays
//! idle until it ends.
//!
//! The simulated device runs what is on its ring one command at a time, in order:
//! a command starts when the previous one finished (after a context switch of
//! [`Scenario::switch_ns`] when the previous one was another VM's), takes the time
//! [`SimGpu`] says, and its completion is reported at its finish time
//! ([`Dispatcher::service`] hands it to the mediator at once), where the guest sees
//! its response through the used ring and a virtual interrupt. What the GPU reads
//! of guest memory is checked against the dispatcher's [`Grants`]; a read outside
//! them is counted as a fault.
//!
//! As on the real device, the commands already on the ring when their VM is reset
//! still run: they were asked for before the reset (and are checked against what the
//! guest asked then), their completions reach the mediator as stale, and an `UNREF`
//! among them frees its host id only then.
//!
//! Mediator CPU time is not simulated time here: the benchmark
//! (`benches/mediator.rs`) measures it.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;
use core::fmt;

use crate::command::{self, Command, Request, Response};
use crate::counters::{Ratio, VmCounters};
use crate::dispatch::{DispatchConfig, DispatchEvent, Dispatcher, Gpu, Memories};
use crate::grants::{Grants, PAGE};
use crate::mediator::{
    HostCommand, Mediator, MediatorConfig, MediatorError, QueueId, ScanoutConfig, VmGpuConfig,
    VmState, DEVICE_NEEDS_RESET,
};
use crate::memory::{Gpa, GuestMemory, Hpa, MemError, VecMemory};
use crate::ring::driver::DriverQueue;
use crate::ring::QueueLayout;
use crate::sched::{Mode, SchedConfig, SchedError, Scheduler, VmId, VmParams, MIN_QUANTUM_NS};
use crate::sim_gpu::{CostModel, SimConfigError, SimGpu, SimGpuConfig, CURSOR_SIZE};
use crate::wire::{self, format, CtrlHdr, CursorPos, MemEntry, Rect};

/// A small deterministic PRNG (SplitMix64): enough for workload choices, no
/// dependencies, and the same sequence on every host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0), by multiply-shift.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi` (`lo` when `hi < lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo).saturating_add(1))
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What a simulated guest does with its GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// Brings its display up, then only asks for the display info now and then
    /// (answered by the mediator, no GPU time).
    Idle,
    /// A framebuffer console and a mouse: every `mean_period_ns` on average (
    /// uniformly in half to one and a half times that) a `TRANSFER`+`FLUSH` pair of
    /// an 8x16 glyph or a full-width 2-line strip, or a fenced 64x64 cursor upload
    /// followed, once its fence is signalled, by `UPDATE_CURSOR`, or a
    /// `MOVE_CURSOR`. Latency-sensitive.
    Interactive {
        /// Mean time between bursts.
        mean_period_ns: u64,
    },
    /// Page flipping as fast as the GPU allows: each frame is a full-frame
    /// `TRANSFER` to the back buffer, `SET_SCANOUT` to it and a `FLUSH`, with up to
    /// `frames_in_flight` frames submitted and not yet answered.
    Saturating {
        /// Frames queued ahead (2 is double buffering with no wait for vsync).
        frames_in_flight: u32,
    },
    /// Attacks every `mean_period_ns` on average: 1 to 3 refused commands, a
    /// doorbell storm, or (now and then) a corrupted ring, after which it resets
    /// its device and starts over.
    Malicious {
        /// Mean time between attacks.
        mean_period_ns: u64,
    },
}

impl Load {
    /// A short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Load::Idle => "idle",
            Load::Interactive { .. } => "interactive",
            Load::Saturating { .. } => "saturating",
            Load::Malicious { .. } => "malicious",
        }
    }

    /// The default interactive load: a burst every 8 ms on average.
    pub const INTERACTIVE: Load = Load::Interactive {
        mean_period_ns: 8_000_000,
    };
    /// The default saturating load: double-buffered page flips.
    pub const SATURATING: Load = Load::Saturating {
        frames_in_flight: 2,
    };
    /// The default malicious load: an attack every 500 us on average.
    pub const MALICIOUS: Load = Load::Malicious {
        mean_period_ns: 500_000,
    };
}

/// One simulated VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// What it does.
    pub load: Load,
    /// Its scheduler weight.
    pub weight: u32,
    /// Its priority coefficient α, in tenths.
    pub alpha_tenths: u8,
}

impl VmSpec {
    /// A VM with `load` and `weight`, no boost.
    pub const fn new(load: Load, weight: u32) -> Self {
        Self {
            load,
            weight,
            alpha_tenths: 0,
        }
    }
}

/// Slots of each queue's ring on the simulated GPU (the control queue the kernel's
/// virtio-gpu driver sets up has as many): the dispatcher never sends more than
/// the room left on it, and the ring refuses a command when it is full.
pub const RING_SLOTS: usize = 64;

/// Largest framebuffer a simulated guest can have (its RAM layout reserves this
/// much per buffer).
pub const MAX_FRAMEBUFFER_BYTES: u64 = 4 << 20;

/// A simulation: the VMs, the GPU, the scheduler, and how long to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// Name for the report.
    pub name: String,
    /// Seed of every random choice.
    pub seed: u64,
    /// Simulated time to run.
    pub duration_ns: u64,
    /// Start of the measurement window: shares, utilization, efficiency and
    /// latencies count from here (bring-up is over by then) to the end.
    pub warmup_ns: u64,
    /// The scheduler's configuration.
    pub sched: SchedConfig,
    /// The simulated GPU's command costs.
    pub cost: CostModel,
    /// Each VM's display (and framebuffer) size; at most
    /// [`MAX_FRAMEBUFFER_BYTES`] per framebuffer, at least 64x64.
    pub display: (u32, u32),
    /// GPU time of a context switch between VMs (charged to the slice that
    /// switches in: saving and restoring up to 1 MB of context, the seed says).
    pub switch_ns: u64,
    /// Most commands in one batch.
    pub max_batch: usize,
    /// The VMs: VM `i + 1` is `vms[i]`, on physical scanout `i`.
    pub vms: Vec<VmSpec>,
}

impl Scenario {
    /// `vms` with the defaults: seed 1, 1 s simulated after a 20 ms warm-up,
    /// best-effort 2 ms quanta, the default cost model, 1280x800 displays (what
    /// Linux brings up), 50 us context switches (1 MiB at about 20 GB/s), batches
    /// of at most 16 commands.
    pub fn new(name: &str, vms: Vec<VmSpec>) -> Self {
        Self {
            name: String::from(name),
            seed: 1,
            duration_ns: 1_000_000_000,
            warmup_ns: 20_000_000,
            sched: SchedConfig::default(),
            cost: CostModel::default(),
            display: (1280, 800),
            switch_ns: 50_000,
            max_batch: 16,
            vms,
        }
    }

    /// Four saturating VMs with weights 1, 2, 4 and 8.
    pub fn weighted_saturating() -> Self {
        let vms = [1, 2, 4, 8]
            .iter()
            .map(|&w| VmSpec::new(Load::SATURATING, w))
            .collect();
        Self::new("4 saturating, weights 1:2:4:8", vms)
    }

    /// An interactive, a saturating, a malicious and an idle VM, weight 1 each.
    pub fn mix() -> Self {
        let vms = vec![
            VmSpec::new(Load::INTERACTIVE, 1),
            VmSpec::new(Load::SATURATING, 1),
            VmSpec::new(Load::MALICIOUS, 1),
            VmSpec::new(Load::Idle, 1),
        ];
        Self::new("mix: interactive + saturating + malicious + idle", vms)
    }

    /// Frames `k` times smaller in each dimension with per-byte costs `k²` times
    /// higher: each frame costs the GPU the same time, while the host copies `k²`
    /// times fewer pixels (for tests in debug builds). Cursor images stay 64x64,
    /// so cursor uploads cost `k²` times more.
    pub fn small_frames(mut self, k: u32) -> Self {
        let k = k.max(1);
        self.display = ((self.display.0 / k).max(64), (self.display.1 / k).max(64));
        let k2 = u64::from(k) * u64::from(k);
        self.cost.transfer_ps_per_byte = self.cost.transfer_ps_per_byte.saturating_mul(k2);
        self.cost.flush_ps_per_byte = self.cost.flush_ps_per_byte.saturating_mul(k2);
        self
    }

    fn framebuffer_bytes(&self) -> u64 {
        u64::from(self.display.0) * u64::from(self.display.1) * 4
    }

    fn share(&self, i: usize) -> u64 {
        let v = &self.vms[i];
        match self.sched.mode {
            Mode::EqualShare => 10,
            _ => u64::from(v.weight) * (10 + u64::from(v.alpha_tenths)),
        }
    }
}

/// Why a simulation could not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimError {
    /// The scenario is inconsistent (no VM, display too small or too large, ...).
    Scenario(&'static str),
    /// The mediator refused the set-up.
    Mediator(MediatorError),
    /// The scheduler refused its configuration or a VM's parameters.
    Sched(SchedError),
    /// The simulated GPU refused its configuration.
    Gpu(SimConfigError),
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimError::Scenario(s) => write!(f, "bad scenario: {s}"),
            SimError::Mediator(e) => write!(f, "mediator: {e:?}"),
            SimError::Sched(e) => write!(f, "scheduler: {e}"),
            SimError::Gpu(e) => write!(f, "simulated GPU: {e}"),
        }
    }
}

/// An upper bound on the GPU time [`SimGpu`] takes for `cmd` under `cost`, for a
/// resource shown on at most one scanout (each VM has one): the success cost with
/// the largest rectangle the command can touch, or the error cost if that is more.
pub fn cost_bound_ns(cost: &CostModel, cmd: &Command) -> u64 {
    let bytes = |r: &Rect| u64::from(r.width) * u64::from(r.height) * 4;
    let per_byte =
        |b: u64, ps: u64| u64::try_from(u128::from(b) * u128::from(ps) / 1000).unwrap_or(u64::MAX);
    let ok = match cmd {
        Command::GetDisplayInfo => cost.display_info_ns,
        Command::GetEdid { .. } => cost.edid_ns,
        Command::ResourceCreate2d { .. } => cost.create_ns,
        Command::ResourceUnref { .. } => cost.unref_ns,
        Command::ResourceAttachBacking { entries, .. } => cost.attach_ns.saturating_add(
            cost.attach_per_entry_ns
                .saturating_mul(entries.len() as u64),
        ),
        Command::ResourceDetachBacking { .. } => cost.detach_ns,
        Command::SetScanout { .. } => cost.set_scanout_ns,
        Command::TransferToHost2d { rect, .. } => cost
            .transfer_ns
            .saturating_add(per_byte(bytes(rect), cost.transfer_ps_per_byte)),
        Command::ResourceFlush { rect, .. } => cost
            .flush_ns
            .saturating_add(per_byte(bytes(rect), cost.flush_ps_per_byte)),
        Command::UpdateCursor { .. } | Command::MoveCursor { .. } => cost.cursor_ns,
    };
    ok.max(cost.error_ns)
}

// ---------------------------------------------------------------------------
// Guest memory layout (the same for every simulated guest).

/// Guest RAM of each simulated VM.
pub const RAM_BYTES: usize = 16 << 20;
const CTRL_SLOTS: Gpa = Gpa::new(0x1_0000);
/// Bytes of a control slot.
const CTRL_SLOT: u64 = 0x1000;
/// Offset of the response buffer and of the indirect table in a control slot.
const RESP_AT: u64 = 0x800;
const TABLE_AT: u64 = 0xf00;
const CURSOR_SLOTS: Gpa = Gpa::new(0x5_0000);
/// Bytes of a cursor slot.
const CURSOR_SLOT: u64 = 0x100;
/// The two framebuffers, each in a region large enough for 85 page-rounded runs
/// of a [`MAX_FRAMEBUFFER_BYTES`] buffer.
const FB: [Gpa; 2] = [Gpa::new(0x10_0000), Gpa::new(0x58_0000)];
const CURSOR_IMAGE: Gpa = Gpa::new(0xa0_0000);
/// A 68 KiB region a malicious guest points an oversized chain at.
const BIG: Gpa = Gpa::new(0xa1_0000);
const BIG_LEN: u32 = 0x1_1000;

/// How long a guest takes to reset its device after `DEVICE_NEEDS_RESET`.
const RESET_DELAY_NS: u64 = 1_000_000;
/// How often an idle guest asks for the display info.
const IDLE_PERIOD_NS: u64 = 500_000_000;
/// Guest resource ids (Linux starts at 2).
const FB_IDS: [u32; 2] = [2, 3];
const CURSOR_ID: u32 = 4;
const EVIL_ID: u32 = 7;

fn host_base(i: usize) -> Hpa {
    Hpa::new((i as u64 + 1) << 32)
}

fn control_layout() -> QueueLayout {
    QueueLayout {
        size: 64,
        desc: Gpa::new(0x1000),
        avail: Gpa::new(0x1400),
        used: Gpa::new(0x1600),
        event_idx: true,
        indirect: true,
    }
}

fn cursor_layout() -> QueueLayout {
    QueueLayout {
        size: 16,
        desc: Gpa::new(0x2000),
        avail: Gpa::new(0x2100),
        used: Gpa::new(0x2200),
        event_idx: true,
        indirect: true,
    }
}

fn slot_addr(q: QueueId, slot: u16) -> Gpa {
    match q {
        QueueId::Control => CTRL_SLOTS.offset(CTRL_SLOT * u64::from(slot)),
        QueueId::Cursor => CURSOR_SLOTS.offset(CURSOR_SLOT * u64::from(slot)),
    }
}

fn response_len(type_: u32) -> u32 {
    (match type_ {
        wire::CMD_GET_EDID => wire::size::RESP_EDID,
        wire::CMD_GET_DISPLAY_INFO => wire::size::RESP_DISPLAY_INFO,
        _ => wire::size::RESP_NODATA,
    }) as u32
}

fn encode(cmd: Command, flags: u32, fence_id: u64) -> Vec<u8> {
    let req = Request {
        hdr: CtrlHdr {
            type_: cmd.type_(),
            flags,
            fence_id,
            ..CtrlHdr::default()
        },
        cmd,
    };
    let mut out = Vec::new();
    command::encode(&req, &mut out);
    out
}

fn full(w: u32, h: u32) -> Rect {
    Rect {
        x: 0,
        y: 0,
        width: w,
        height: h,
    }
}

// ---------------------------------------------------------------------------
// The simulated device: its rings, and the GPU's view of host memory.

/// Why the simulated ring refused a command: its queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RingFull;

/// A command on the ring the device has not started yet.
struct OnRing {
    token: u64,
    vm: VmId,
    cmd: HostCommand,
}

/// The command the device is running.
struct Running {
    token: u64,
    vm: VmId,
    queue: QueueId,
    /// When the device took it (its context switch, if any, starts here).
    start: u64,
    /// When the command itself started (after the switch).
    exec_start: u64,
    finish: u64,
    status: u32,
    /// The guest chain it was matched to.
    matched: Option<(usize, u16)>,
}

/// The simulated GPU's rings, as the dispatcher sees them ([`Gpu`]): they only
/// hold what was submitted and what completed; the event loop runs the commands
/// (with [`SimGpu`]) one at a time, in order, as the device does.
struct SimRing {
    cost: CostModel,
    switch_ns: u64,
    queued: VecDeque<OnRing>,
    running: Option<Running>,
    /// The VM whose command the device ran last: its context is loaded.
    ctx: Option<VmId>,
    /// `(token, response type)` of the commands finished and not yet polled.
    done: Vec<(u64, u32)>,
}

impl SimRing {
    fn new(cost: CostModel, switch_ns: u64) -> Self {
        Self {
            cost,
            switch_ns,
            queued: VecDeque::new(),
            running: None,
            ctx: None,
            done: Vec::new(),
        }
    }

    /// Slots of queue `q` taken (a command holds its slot until it finished).
    fn used(&self, q: QueueId) -> usize {
        self.queued.iter().filter(|c| c.cmd.queue == q).count()
            + usize::from(self.running.as_ref().is_some_and(|r| r.queue == q))
    }
}

impl Gpu for SimRing {
    type Error = RingFull;

    fn free_slots(&self, queue: QueueId) -> usize {
        RING_SLOTS.saturating_sub(self.used(queue))
    }

    fn submit(&mut self, vm: VmId, cmd: &HostCommand, token: u64) -> Result<(), RingFull> {
        if self.used(cmd.queue) >= RING_SLOTS {
            return Err(RingFull);
        }
        self.queued.push_back(OnRing {
            token,
            vm,
            cmd: cmd.clone(),
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<(u64, u32)>) {
        out.append(&mut self.done);
    }

    fn cost_bound_ns(&self, cmd: &Command) -> Option<u64> {
        Some(cost_bound_ns(&self.cost, cmd))
    }

    fn switch_ns(&self) -> u64 {
        self.switch_ns
    }
}

/// Every guest's RAM, for the dispatcher: the mediator reads the rings and writes
/// the responses there.
struct GuestMems<'a>(&'a mut [Guest]);

impl Memories for GuestMems<'_> {
    fn memory(&mut self, vm: VmId) -> Option<&mut dyn GuestMemory> {
        let i = usize::from(vm).checked_sub(1)?;
        self.0
            .get_mut(i)
            .map(|g| &mut g.mem as &mut dyn GuestMemory)
    }
}

/// Host memory as the GPU reaches it: every guest's RAM at its host base, through
/// the grants (what the IOMMU lets the GPU reach). The 2D GPU only reads.
///
/// As the simulated GPU's [`GuestMemory`] it is addressed by the GPU's DMA
/// addresses, which are host-physical (the grants play an identity-mapping IOMMU):
/// `translate` is the identity, and each access converts its address explicitly.
struct HostMem<'a> {
    guests: &'a [Guest],
    grants: &'a Grants,
    faults: Cell<u64>,
}

impl HostMem<'_> {
    /// The guest whose RAM holds `[hpa, hpa+len)`, and the guest-physical address
    /// of `hpa` there (the reverse of that guest's translation).
    fn find(&self, hpa: Hpa, len: u64) -> Result<(usize, Gpa), MemError> {
        if hpa.checked_add(len).is_none() || !self.grants.covers(hpa, len) {
            self.faults.set(self.faults.get() + 1);
            return Err(MemError::NotOwned);
        }
        let end = hpa.checked_add(len).ok_or(MemError::Overflow)?;
        self.guests
            .iter()
            .position(|g| hpa >= g.mem.host_base && end <= g.mem.host_base.offset(RAM_BYTES as u64))
            .map(|i| {
                let m = &self.guests[i].mem;
                (i, m.base.offset(hpa.get() - m.host_base.get()))
            })
            .ok_or(MemError::OutOfRange)
    }
}

/// A GPU DMA address as the host-physical address it is (see [`HostMem`]).
fn dma_to_hpa(addr: Gpa) -> Hpa {
    Hpa::new(addr.get())
}

impl GuestMemory for HostMem<'_> {
    fn translate(&self, addr: Gpa, len: u64) -> Result<Hpa, MemError> {
        let hpa = dma_to_hpa(addr);
        self.find(hpa, len).map(|_| hpa)
    }
    fn read(&self, addr: Gpa, out: &mut [u8]) -> Result<(), MemError> {
        let (i, gpa) = self.find(dma_to_hpa(addr), out.len() as u64)?;
        self.guests[i].mem.read(gpa, out)
    }
    fn write(&mut self, _addr: Gpa, _data: &[u8]) -> Result<(), MemError> {
        self.faults.set(self.faults.get() + 1);
        Err(MemError::NotOwned)
    }
}

// ---------------------------------------------------------------------------
// Guests.

/// What a guest command is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Bring-up (not measured).
    Setup,
    /// The load itself (measured after the warm-up).
    Work,
    /// A malicious command that must be refused.
    Attack,
}

/// What a guest remembers about a chain it submitted.
#[derive(Clone, Debug)]
struct Pending {
    slot: u16,
    t0: u64,
    kind: Kind,
    fence: Option<u64>,
    /// When the GPU started and finished it (host-bound commands only).
    t_start: Option<u64>,
    t_done: Option<u64>,
    frame_end: bool,
    cursor_upload: bool,
}

/// How a command is submitted.
#[derive(Clone, Copy, Debug)]
struct Sub {
    kind: Kind,
    type_: u32,
    fence: Option<u64>,
    /// Expected to reach the GPU (not emulated, not refused).
    host_bound: bool,
    frame_end: bool,
    cursor_upload: bool,
}

impl Sub {
    fn new(kind: Kind, cmd: &Command) -> Self {
        let emulated = matches!(cmd, Command::GetDisplayInfo | Command::GetEdid { .. });
        Self {
            kind,
            type_: cmd.type_(),
            fence: None,
            host_bound: kind != Kind::Attack && !emulated,
            frame_end: false,
            cursor_upload: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct GuestStats {
    /// Doorbell-to-response latency of each measured command.
    lat: Vec<u64>,
    completed: u64,
    errors: u64,
    attacks: u64,
    attacks_accepted: u64,
    ring_attacks: u64,
    storms: u64,
    storm_doorbells: u64,
    doorbells: u64,
    resets: u64,
    dropped: u64,
    /// Fenced commands: (T_real, T_sched, T_wait, doorbell to GPU start).
    fences: Vec<(u64, u64, u64, u64)>,
    fence_echo_errors: u64,
    /// Largest GPU work (cost bound) the VM had outstanding right after one of its
    /// doorbells in the window.
    max_outstanding_ns: u64,
    driver_errors: u64,
}

struct Guest {
    vm: VmId,
    spec: VmSpec,
    mem: VecMemory,
    ctrl: DriverQueue,
    cursor: DriverQueue,
    free: [Vec<u16>; 2],
    pending: BTreeMap<(usize, u16), Pending>,
    /// Host-bound chains in submission order, per queue: how the GPU's commands
    /// are matched back to the guest's.
    expect: [VecDeque<((usize, u16), u32)>; 2],
    /// Commands of this VM that were on the GPU's ring at its last reset: they
    /// still run, and are matched against `asked_before_reset`, what the guest had
    /// asked for until then.
    on_ring_at_reset: usize,
    asked_before_reset: [VecDeque<((usize, u16), u32)>; 2],
    rng: Rng,
    next_wake: u64,
    reset_at: Option<u64>,
    fence: u64,
    frames_out: u32,
    front: usize,
    cursor_shown: bool,
    cursor_busy: bool,
    /// Bring-up done (the first wake-up brings the display up).
    up: bool,
    /// When the previous chain of each queue was returned.
    last_seen: [u64; 2],
    stats: GuestStats,
}

impl Guest {
    fn new(i: usize, spec: VmSpec, seed: u64) -> Self {
        let mut mem = VecMemory::new(Gpa::new(0), host_base(i), RAM_BYTES);
        // The layouts are constants that fit the RAM.
        let ctrl = DriverQueue::new(&mut mem, control_layout()).expect("control layout");
        let cursor = DriverQueue::new(&mut mem, cursor_layout()).expect("cursor layout");
        let vm = i as VmId + 1;
        Self {
            vm,
            spec,
            mem,
            ctrl,
            cursor,
            free: Self::slots(),
            pending: BTreeMap::new(),
            expect: [VecDeque::new(), VecDeque::new()],
            on_ring_at_reset: 0,
            asked_before_reset: [VecDeque::new(), VecDeque::new()],
            rng: Rng::new(seed ^ u64::from(vm).wrapping_mul(0xa076_1d64_78bd_642f)),
            next_wake: u64::MAX,
            reset_at: None,
            fence: 0,
            frames_out: 0,
            front: 0,
            cursor_shown: false,
            cursor_busy: false,
            up: false,
            last_seen: [0; 2],
            stats: GuestStats::default(),
        }
    }

    fn slots() -> [Vec<u16>; 2] {
        [(0..64).rev().collect(), (0..16).rev().collect()]
    }

    fn next_event(&self) -> u64 {
        self.next_wake.min(self.reset_at.unwrap_or(u64::MAX))
    }

    fn queue(&mut self, q: QueueId) -> (&mut VecMemory, &mut DriverQueue) {
        match q {
            QueueId::Control => (&mut self.mem, &mut self.ctrl),
            QueueId::Cursor => (&mut self.mem, &mut self.cursor),
        }
    }

    fn malicious(&self) -> bool {
        matches!(self.spec.load, Load::Malicious { .. })
    }

    /// Backing of framebuffer `b` as Linux sends it: 1 to 85 entries of whole
    /// pages, the runs scattered over the buffer's region.
    fn fb_entries(&mut self, b: usize, len: u64) -> Vec<MemEntry> {
        let n = self.rng.range(1, 85);
        let chunk = len.div_ceil(n).div_ceil(PAGE) * PAGE;
        let pieces = len.div_ceil(chunk);
        let mut perm: Vec<u64> = (0..pieces).collect();
        for k in (1..perm.len()).rev() {
            let j = self.rng.below(k as u64 + 1) as usize;
            perm.swap(k, j);
        }
        (0..pieces)
            .map(|k| MemEntry {
                addr: FB[b].offset(perm[k as usize] * chunk).get(),
                length: chunk.min(len - k * chunk) as u32,
                padding: 0,
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The report.

/// The figures of one VM.
#[derive(Clone, Debug, PartialEq)]
pub struct VmReport {
    /// VM id.
    pub vm: VmId,
    /// Its load.
    pub load: Load,
    /// Scheduler weight.
    pub weight: u32,
    /// α in tenths.
    pub alpha_tenths: u8,
    /// Its share `s_i / Σ s` of all VMs' shares (`weight · (1 + α)`).
    pub weight_share: f64,
    /// Its part of the GPU time used in the window (context switches included).
    pub gpu_share: f64,
    /// `u_i`: its GPU time over the window's length.
    pub utilization: f64,
    /// Commands answered in the window (responses and returned cursor chains).
    pub completed: u64,
    /// Error responses to its own (non-attack) commands.
    pub errors: u64,
    /// Host commands the GPU ran for it in the window.
    pub gpu_commands: u64,
    /// Median doorbell-to-response latency in the window.
    pub p50_ns: u64,
    /// 99th percentile latency.
    pub p99_ns: u64,
    /// Largest latency.
    pub max_ns: u64,
    /// `L_exec`: a context switch plus the most GPU work (cost bound) it had
    /// outstanding right after a doorbell in the window.
    pub l_exec_ns: u64,
    /// `L_max = L_exec + W_i` ([`Scheduler::latency_bound_ns`]) when `L_exec` fits
    /// in one of its slices; `None` otherwise (the bound does not apply).
    pub l_max_ns: Option<u64>,
    /// Longest wait for a slice the scheduler saw.
    pub max_wait_ns: u64,
    /// The scheduler's bound on that wait ([`Scheduler::max_wait_ns`]).
    pub wait_bound_ns: u64,
    /// Its counters over the window's slices (quanta, switches, ops).
    pub window: VmCounters,
    /// `E_i = ops / Σ max_ops_per_quantum` over the quanta it was allocated in the
    /// window, each quantum able to hold `quantum / mean command time` commands.
    pub efficiency: f64,
    /// Attack commands sent (malicious VMs).
    pub attacks: u64,
    /// Attack commands that were answered with success (must be 0).
    pub attacks_accepted: u64,
    /// Ring corruptions sent.
    pub ring_attacks: u64,
    /// Doorbell storms and their doorbells.
    pub storms: (u64, u64),
    /// Device resets the guest went through.
    pub resets: u64,
    /// Commands the mediator refused, all reasons (whole run).
    pub rejected: u64,
    /// Doorbells the mediator served (whole run).
    pub doorbells: u64,
    /// Virtual interrupts injected (whole run).
    pub interrupts: u64,
    /// Page grants (what the IOMMU lets the GPU reach) it holds at the end; a
    /// page granted twice counts twice.
    pub mapped_pages: usize,
}

impl VmReport {
    /// Whether p99 is within `L_max` (`None` when the bound does not apply or
    /// no command was measured).
    pub fn within_bound(&self) -> Option<bool> {
        if self.completed == 0 {
            return None;
        }
        self.l_max_ns.map(|l| self.p99_ns <= l)
    }
}

/// Fenced commands: the guest's wait for each fence, decomposed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FenceReport {
    /// Fenced commands measured.
    pub count: u64,
    /// `T_real`: doorbell to the GPU finishing the command (its host fence), p50
    /// and p99.
    pub t_real_ns: (u64, u64),
    /// `T_sched`: doorbell to the mediator being allowed to signal it (every
    /// earlier chain of its queue answered: fences signal in submission order),
    /// p50 and p99.
    pub t_sched_ns: (u64, u64),
    /// `T_wait`: doorbell to the guest seeing the fence, p50 and p99.
    pub t_wait_ns: (u64, u64),
    /// Part of `T_real` before the GPU started the command (waiting for the VM's
    /// slice and for its earlier commands), p50 and p99.
    pub t_queue_ns: (u64, u64),
    /// Fences for which `T_wait != max(T_real, T_sched)` (must be 0: never
    /// signalled before the GPU finished, never held longer than ordering needs).
    pub violations: u64,
    /// Responses whose header did not echo the guest's fence.
    pub echo_errors: u64,
}

/// Everything one run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The scenario's name.
    pub name: String,
    /// Its seed.
    pub seed: u64,
    /// The scheduler's configuration.
    pub sched: SchedConfig,
    /// Context switch cost.
    pub switch_ns: u64,
    /// Length of the measurement window.
    pub window_ns: u64,
    /// Per VM, in id order.
    pub vms: Vec<VmReport>,
    /// Jain's index over the VMs backlogged throughout (saturating ones) of
    /// `gpu share / weight share` (both among those VMs); `None` with none.
    pub jain: Option<f64>,
    /// `U_gpu = Σ u_i` measured on the GPU.
    pub u_gpu: f64,
    /// `U_gpu` as the scheduler accounts it (slices closed in the window).
    pub u_gpu_sched: Ratio,
    /// `E = Σ ops / (Σ quanta · max_ops_per_quantum)` over the window, where a
    /// quantum of length `q` can hold `q / mean command time` commands (the
    /// mean over every command the GPU ran in the window).
    pub efficiency: f64,
    /// What one base quantum could complete (the base quantum over the mean
    /// command time).
    pub max_ops_per_quantum: u64,
    /// Mean GPU time of a command in the window (context switches excluded).
    pub mean_command_ns: u64,
    /// GPU time spent switching contexts in the window.
    pub switch_time_ns: u64,
    /// Fenced commands.
    pub fences: FenceReport,
    /// Commands the GPU ran (whole run).
    pub gpu_commands: u64,
    /// Of those, refused by the GPU: the mediator handed it something invalid
    /// (must be 0).
    pub gpu_errors: u64,
    /// GPU accesses outside the grants, which the IOMMU refuses (must be 0).
    pub iommu_faults: u64,
    /// Inconsistent IOMMU reports: resets after which the VM still held grants,
    /// i.e. what a reset took back is not what the mediator had granted (must
    /// be 0).
    pub iommu_errors: u64,
    /// Host commands that matched no guest command and are not the mediator's
    /// own clean-up (must be 0: nothing a guest did not ask for runs).
    pub unexpected_host_commands: u64,
    /// Commands whose GPU time exceeded their cost bound, or that ran past the
    /// end of their slice (must be 0 with the default costs).
    pub overruns: u64,
    /// Completions the mediator took as stale (commands of a VM that was reset
    /// while they were on the GPU's ring).
    pub stale_completions: u64,
    /// VMs the watchdog declared hung.
    pub hangs: u64,
    /// Resource ids the well-behaved VMs held on the host, at the end of the
    /// warm-up and at the end (the same unless something touched them).
    pub good_resources: (Vec<u32>, Vec<u32>),
}

impl Report {
    /// The report of VM `vm`.
    pub fn vm(&self, vm: VmId) -> Option<&VmReport> {
        self.vms.iter().find(|v| v.vm == vm)
    }

    /// The first VM with load `name` ([`Load::name`]).
    pub fn first(&self, name: &str) -> Option<&VmReport> {
        self.vms.iter().find(|v| v.load.name() == name)
    }
}

fn percentile(sorted: &[u64], p: u64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    // Nearest rank.
    let rank = (sorted.len() as u64 * p).div_ceil(100).max(1);
    sorted[(rank - 1) as usize]
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// Jain's fairness index `(Σx)² / (n · Σx²)`: 1 when all `x` are equal, `1/n`
/// when one takes everything.
pub fn jain_index(x: &[f64]) -> Option<f64> {
    if x.is_empty() {
        return None;
    }
    let s: f64 = x.iter().sum();
    let s2: f64 = x.iter().map(|v| v * v).sum();
    if s2 == 0.0 {
        return None;
    }
    Some(s * s / (x.len() as f64 * s2))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.sched.mode {
            Mode::BestEffort => "best-effort",
            Mode::EqualShare => "equal-share",
            Mode::FixedShare => "fixed-share",
        };
        writeln!(
            f,
            "== {} (seed {}, window {:.0} ms, TS {:.1} ms {}{}, switch {:.0} us) ==",
            self.name,
            self.seed,
            self.window_ns as f64 / 1e6,
            self.sched.base_quantum_ns as f64 / 1e6,
            mode,
            if self.sched.adaptive { " adaptive" } else { "" },
            us(self.switch_ns)
        )?;
        writeln!(
            f,
            "{:>3} {:<11} {:>3} {:>7} {:>7} {:>6} {:>7} {:>4} {:>9} {:>9} {:>9} {:>6} {:>6} {:>5} {:>5}",
            "VM", "load", "w", "w-share", "GPU", "u_i", "done", "err", "p50 us", "p99 us",
            "L_max us", "p99<=L", "quanta", "sw", "E_i"
        )?;
        for v in &self.vms {
            let lmax = v
                .l_max_ns
                .map_or_else(|| String::from("n/a"), |l| alloc::format!("{:.0}", us(l)));
            let ok = match v.within_bound() {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            };
            writeln!(
                f,
                "{:>3} {:<11} {:>3} {:>7.4} {:>7.4} {:>6.4} {:>7} {:>4} {:>9.1} {:>9.1} {:>9} {:>6} {:>6} {:>5} {:>5.3}",
                v.vm,
                v.load.name(),
                v.weight,
                v.weight_share,
                v.gpu_share,
                v.utilization,
                v.completed,
                v.errors,
                us(v.p50_ns),
                us(v.p99_ns),
                lmax,
                ok,
                v.window.quanta_allocated,
                v.window.context_switches,
                v.efficiency
            )?;
        }
        match self.jain {
            Some(j) => {
                let n = self
                    .vms
                    .iter()
                    .filter(|v| matches!(v.load, Load::Saturating { .. }))
                    .count();
                writeln!(
                    f,
                    "Jain's index (share/weight over {n} backlogged VMs): {j:.5}"
                )?;
            }
            None => writeln!(f, "Jain's index: no backlogged VM")?,
        }
        writeln!(
            f,
            "U_gpu = sum(u_i) = {:.4} (scheduler's accounting {:.4}) <= 1; context switches {:.2}% of the window",
            self.u_gpu,
            self.u_gpu_sched.as_f64(),
            100.0 * self.switch_time_ns as f64 / self.window_ns.max(1) as f64
        )?;
        writeln!(
            f,
            "E = sum(ops) / (sum(quanta) * max_ops_per_quantum) = {:.4} (mean command {:.1} us: {} per base quantum)",
            self.efficiency,
            us(self.mean_command_ns),
            self.max_ops_per_quantum
        )?;
        let fr = &self.fences;
        if fr.count > 0 {
            writeln!(
                f,
                "fenced commands {}: T_real p50/p99 {:.1}/{:.1} us (of which before the GPU started it {:.1}/{:.1} us), T_sched {:.1}/{:.1} us, T_wait {:.1}/{:.1} us; T_wait = max(T_real, T_sched) for all: {}",
                fr.count,
                us(fr.t_real_ns.0),
                us(fr.t_real_ns.1),
                us(fr.t_queue_ns.0),
                us(fr.t_queue_ns.1),
                us(fr.t_sched_ns.0),
                us(fr.t_sched_ns.1),
                us(fr.t_wait_ns.0),
                us(fr.t_wait_ns.1),
                if fr.violations == 0 && fr.echo_errors == 0 {
                    String::from("yes")
                } else {
                    alloc::format!("NO ({} violations, {} bad echoes)", fr.violations, fr.echo_errors)
                }
            )?;
        }
        for v in self
            .vms
            .iter()
            .filter(|v| matches!(v.load, Load::Malicious { .. }))
        {
            writeln!(
                f,
                "VM {} (malicious): {} attack commands, {} accepted; {} ring corruptions -> {} resets; {} doorbell storms ({} doorbells); mediator refusals {}",
                v.vm,
                v.attacks,
                v.attacks_accepted,
                v.ring_attacks,
                v.resets,
                v.storms.0,
                v.storms.1,
                v.rejected
            )?;
        }
        writeln!(
            f,
            "GPU: {} commands, {} refused by the GPU; IOMMU faults {}, IOMMU report errors {}; unexpected host commands {}; overruns {}; stale completions {}; hangs {}",
            self.gpu_commands,
            self.gpu_errors,
            self.iommu_faults,
            self.iommu_errors,
            self.unexpected_host_commands,
            self.overruns,
            self.stale_completions,
            self.hangs
        )
    }
}

// ---------------------------------------------------------------------------
// The simulation.

#[derive(Default)]
struct Metrics {
    busy: Vec<u64>,
    gpu_cmds: Vec<u64>,
    window: Vec<VmCounters>,
    cmd_busy: u64,
    cmd_count: u64,
    switch_time: u64,
    overruns: u64,
    unexpected: u64,
    faults: u64,
    /// Resets after which the VM still held grants.
    grants_kept: u64,
    hangs: u64,
}

struct Sim<'a> {
    sc: &'a Scenario,
    /// The kernel's dispatcher over the simulated GPU's rings.
    disp: Dispatcher<SimRing>,
    /// The simulated GPU, running what is on the rings.
    gpu: SimGpu,
    guests: Vec<Guest>,
    now: u64,
    in_window: bool,
    good_resources_at_warmup: Vec<u32>,
    m: Metrics,
}

/// Runs `sc` to its end and returns what it measured.
pub fn run(sc: &Scenario) -> Result<Report, SimError> {
    let mut sim = Sim::new(sc)?;
    sim.run();
    Ok(sim.report())
}

fn overlap(a: u64, b: u64, lo: u64, hi: u64) -> u64 {
    b.min(hi).saturating_sub(a.max(lo))
}

impl<'a> Sim<'a> {
    fn new(sc: &'a Scenario) -> Result<Self, SimError> {
        let n = sc.vms.len();
        if n == 0 || n > wire::MAX_SCANOUTS {
            return Err(SimError::Scenario("1 to 16 VMs"));
        }
        if sc.display.0 < 64 || sc.display.1 < 64 {
            return Err(SimError::Scenario("displays are at least 64x64"));
        }
        if sc.framebuffer_bytes() > MAX_FRAMEBUFFER_BYTES {
            return Err(SimError::Scenario("framebuffer larger than 4 MiB"));
        }
        if sc.max_batch == 0 || sc.warmup_ns >= sc.duration_ns {
            return Err(SimError::Scenario(
                "batches of at least 1, warm-up shorter than the run",
            ));
        }
        let vram = 256 << 20;
        let mut med = Mediator::new(MediatorConfig::new(vram, n as u32));
        let mut sched = Scheduler::new(sc.sched).map_err(SimError::Sched)?;
        let gpu = SimGpu::new(SimGpuConfig {
            scanouts: vec![sc.display; n],
            vram_bytes: vram,
            cost: sc.cost,
        })
        .map_err(SimError::Gpu)?;
        let mut guests = Vec::with_capacity(n);
        for (i, spec) in sc.vms.iter().enumerate() {
            let g = Guest::new(i, *spec, sc.seed);
            let vm = g.vm;
            med.add_vm(
                vm,
                VmGpuConfig::new(vec![ScanoutConfig {
                    physical: i as u32,
                    width: sc.display.0,
                    height: sc.display.1,
                }]),
            )
            .map_err(SimError::Mediator)?;
            Self::start_device(&mut med, vm)?;
            sched
                .add_vm(
                    vm,
                    VmParams {
                        weight: spec.weight,
                        alpha_tenths: spec.alpha_tenths,
                    },
                )
                .map_err(SimError::Sched)?;
            guests.push(g);
        }
        med.take_events();
        let cfg = DispatchConfig {
            max_batch: sc.max_batch,
            ..DispatchConfig::default()
        };
        let ring = SimRing::new(sc.cost, sc.switch_ns);
        let mut sim = Self {
            sc,
            disp: Dispatcher::new(med, sched, ring, cfg),
            gpu,
            guests,
            now: 0,
            in_window: false,
            good_resources_at_warmup: Vec::new(),
            m: Metrics {
                busy: vec![0; n],
                gpu_cmds: vec![0; n],
                window: vec![VmCounters::default(); n],
                ..Metrics::default()
            },
        };
        for i in 0..n {
            // Guests come up within the first 100 us, in a seeded order.
            let at = sim.guests[i].rng.below(100_000);
            sim.guests[i].next_wake = at;
        }
        Ok(sim)
    }

    fn start_device(med: &mut Mediator, vm: VmId) -> Result<(), SimError> {
        med.start_queues(vm, control_layout(), cursor_layout())
            .map_err(SimError::Mediator)?;
        med.set_config_vector(vm, 0).map_err(SimError::Mediator)?;
        med.set_vector(vm, QueueId::Control, 1)
            .map_err(SimError::Mediator)?;
        med.set_vector(vm, QueueId::Cursor, 2)
            .map_err(SimError::Mediator)
    }

    fn idx(vm: VmId) -> usize {
        usize::from(vm) - 1
    }

    // -- the event loop ----------------------------------------------------

    fn run(&mut self) {
        let end = self.sc.duration_ns;
        loop {
            let t_gpu = self.disp.gpu().running.as_ref().map(|r| r.finish);
            let t_guest = self.guests.iter().map(Guest::next_event).min();
            // The end of a reserved slot, or a batch becoming overdue.
            let t_disp = self.disp.next_deadline();
            let t = [t_gpu, t_guest, t_disp]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(u64::MAX)
                .max(self.now);
            if t > end {
                break;
            }
            self.now = t;
            if !self.in_window && t >= self.sc.warmup_ns {
                self.open_window();
            }
            let finished = if t_gpu == Some(t) {
                self.finish_command()
            } else {
                None
            };
            // The bottom half: completions back to the guests, the watchdog, and
            // the next batch.
            self.service();
            if let Some(vm) = finished {
                self.poll(Self::idx(vm));
            } else if t_guest == Some(t) {
                if let Some(i) = self.guests.iter().position(|g| g.next_event() == t) {
                    self.guest_event(i);
                }
            }
            self.deliver_interrupts();
            self.start_command();
            self.take_events();
        }
        self.now = end;
        if !self.in_window {
            self.open_window();
        }
        if let Some(r) = &self.disp.gpu().running {
            let i = Self::idx(r.vm);
            let b = overlap(r.start, r.finish, self.sc.warmup_ns, end);
            self.m.busy[i] += b;
        }
        self.take_events();
    }

    fn open_window(&mut self) {
        self.in_window = true;
        self.disp.sched_mut().begin_window(self.sc.warmup_ns);
        self.good_resources_at_warmup = self.good_resources();
    }

    fn good_resources(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .guests
            .iter()
            .filter(|g| !g.malicious())
            .filter_map(|g| self.disp.mediator().vm(g.vm))
            .flat_map(|v| v.host_resources())
            .collect();
        ids.sort_unstable();
        ids
    }

    // -- the GPU side ------------------------------------------------------

    /// GPU work (cost bounds) `vm` has in the mediator and on the GPU.
    fn outstanding_ns(&self, vm: VmId) -> u64 {
        let cost = &self.sc.cost;
        let staged: u64 = self.disp.mediator().vm(vm).map_or(0, |v| {
            v.staged()
                .map(|c| cost_bound_ns(cost, &c.request.cmd))
                .sum()
        });
        let ring = self.disp.gpu();
        let queued: u64 = ring
            .queued
            .iter()
            .filter(|c| c.vm == vm)
            .map(|c| cost_bound_ns(cost, &c.cmd.request.cmd))
            .sum();
        let running = ring
            .running
            .as_ref()
            .filter(|r| r.vm == vm)
            .map_or(0, |r| r.finish.saturating_sub(self.now));
        staged + queued + running
    }

    /// The bottom half at `now`. A VM the watchdog found hung had its channel
    /// reset by the dispatcher: its guest starts over.
    fn service(&mut self) {
        let s = self
            .disp
            .service(&mut GuestMems(&mut self.guests), self.now);
        for vm in s.hung {
            self.m.hangs += 1;
            self.check_grants_gone(vm);
            let i = Self::idx(vm);
            self.note_reset(i);
            self.reinit(i);
        }
    }

    /// The dispatcher's events: the slices closed in the window are measured.
    fn take_events(&mut self) {
        for e in self.disp.take_events() {
            if let DispatchEvent::SliceClosed {
                vm,
                slice,
                used_ns,
                ops,
                switched,
                ..
            } = e
            {
                if slice.start_ns < self.sc.warmup_ns {
                    continue;
                }
                if let Some(w) = self.m.window.get_mut(Self::idx(vm)) {
                    w.record_slice(slice.quantum_ns, used_ns, ops, switched);
                }
            }
        }
    }

    /// The device takes the next command off its ring when it is idle.
    fn start_command(&mut self) {
        let ring = self.disp.gpu_mut();
        if ring.running.is_some() {
            return;
        }
        let Some(c) = ring.queued.pop_front() else {
            return;
        };
        let switch = if ring.ctx == Some(c.vm) {
            0
        } else {
            self.sc.switch_ns
        };
        ring.ctx = Some(c.vm);
        let bound = cost_bound_ns(&self.sc.cost, &c.cmd.request.cmd);
        let view = HostMem {
            guests: &self.guests,
            grants: self.disp.grants(),
            faults: Cell::new(0),
        };
        let done = self.gpu.execute(&c.cmd.request, &view);
        self.m.faults += view.faults.get();
        let exec_start = self.now + switch;
        let finish = exec_start + done.cost_ns;
        let past_slice = self.disp.open_slice().is_some_and(|s| finish > s.end_ns());
        if done.cost_ns > bound || past_slice {
            self.m.overruns += 1;
        }
        let matched = self.match_command(c.vm, &c.cmd);
        self.disp.gpu_mut().running = Some(Running {
            token: c.token,
            vm: c.vm,
            queue: c.cmd.queue,
            start: self.now,
            exec_start,
            finish,
            status: done.response.type_(),
            matched,
        });
    }

    /// Matches a command the GPU runs to the guest chain it came from; one that
    /// matches none and is not the mediator's own clean-up is counted.
    fn match_command(&mut self, vm: VmId, cmd: &HostCommand) -> Option<(usize, u16)> {
        let g = &mut self.guests[Self::idx(vm)];
        let q = cmd.queue.index();
        let type_ = cmd.request.cmd.type_();
        let (matched, asked) = if g.on_ring_at_reset > 0 {
            // On the ring when the guest reset its device: asked for before that.
            g.on_ring_at_reset -= 1;
            let asked = match g.asked_before_reset[q].front() {
                Some(&(_, t)) if t == type_ => {
                    g.asked_before_reset[q].pop_front();
                    true
                }
                _ => false,
            };
            if g.on_ring_at_reset == 0 {
                g.asked_before_reset = [VecDeque::new(), VecDeque::new()];
            }
            (None, asked)
        } else {
            match g.expect[q].front() {
                Some(&(key, t)) if t == type_ => {
                    g.expect[q].pop_front();
                    (Some(key), true)
                }
                _ => (None, false),
            }
        };
        if !asked {
            // Only the mediator's own clean-up after a reset may run unasked.
            let cleanup = g.malicious()
                && matches!(
                    cmd.request.cmd,
                    Command::ResourceUnref { .. }
                        | Command::SetScanout { resource_id: 0, .. }
                        | Command::UpdateCursor { resource_id: 0, .. }
                );
            if !cleanup {
                self.m.unexpected += 1;
            }
        }
        matched
    }

    /// The running command finishes now: its completion is reported. Returns
    /// its VM.
    fn finish_command(&mut self) -> Option<VmId> {
        let r = self.disp.gpu_mut().running.take()?;
        let i = Self::idx(r.vm);
        let (lo, hi) = (self.sc.warmup_ns, self.sc.duration_ns);
        self.m.busy[i] += overlap(r.start, r.finish, lo, hi);
        if r.exec_start >= lo {
            self.m.cmd_busy += r.finish - r.exec_start;
            self.m.cmd_count += 1;
            self.m.gpu_cmds[i] += 1;
            self.m.switch_time += r.exec_start - r.start;
        }
        if let Some(key) = r.matched {
            if let Some(p) = self.guests[i].pending.get_mut(&key) {
                p.t_start = Some(r.exec_start);
                p.t_done = Some(r.finish);
            }
        }
        self.disp.gpu_mut().done.push((r.token, r.status));
        Some(r.vm)
    }

    /// The hypervisor polls a VM's queues when it has room again: chains the
    /// guest published that the mediator left in the ring (back-pressure).
    fn poll(&mut self, i: usize) {
        let vm = self.guests[i].vm;
        let Some(v) = self.disp.mediator().vm(vm) else {
            return;
        };
        if v.state() != VmState::Active {
            return;
        }
        let g = &self.guests[i];
        let behind = QueueId::ALL.into_iter().any(|q| {
            let taken = v.queue(q).map(|d| d.last_avail_idx());
            let published = match q {
                QueueId::Control => g.ctrl.avail_idx(),
                QueueId::Cursor => g.cursor.avail_idx(),
            };
            taken.is_some_and(|t| t != published)
        });
        if behind {
            self.disp.poll(vm, &mut self.guests[i].mem, self.now);
            self.note_outstanding(i);
            self.disp.schedule(self.now);
        }
    }

    // -- the guest side ----------------------------------------------------

    fn doorbell(&mut self, i: usize, q: QueueId) {
        let vm = self.guests[i].vm;
        self.guests[i].stats.doorbells += 1;
        // A VM waiting for its reset is refused: nothing to do.
        self.disp.doorbell(vm, q, &mut self.guests[i].mem, self.now);
        self.note_outstanding(i);
        self.disp.schedule(self.now);
    }

    /// In the window: the GPU work guest `i` has outstanding right after it was
    /// served, for `L_exec`.
    fn note_outstanding(&mut self, i: usize) {
        if self.in_window {
            let out = self.outstanding_ns(self.guests[i].vm);
            let s = &mut self.guests[i].stats;
            s.max_outstanding_ns = s.max_outstanding_ns.max(out);
        }
    }

    fn kick(&mut self, i: usize, q: QueueId) {
        let (mem, dq) = self.guests[i].queue(q);
        match dq.kick(mem) {
            Ok(true) => self.doorbell(i, q),
            Ok(false) => {}
            Err(_) => self.guests[i].stats.driver_errors += 1,
        }
    }

    /// Adds a chain: `parts` as readable buffers in the slot (or `raw` as the one
    /// readable buffer), and on the control queue a response buffer, through an
    /// indirect table as Linux does. False when the queue is full.
    fn submit(
        &mut self,
        i: usize,
        q: QueueId,
        parts: &[&[u8]],
        raw: Option<(Gpa, u32)>,
        sub: Sub,
    ) -> bool {
        let now = self.now;
        let g = &mut self.guests[i];
        let Some(slot) = g.free[q.index()].pop() else {
            return false;
        };
        let base = slot_addr(q, slot);
        let mut readable = Vec::new();
        let mut at = base;
        for p in parts {
            if g.mem.write(at, p).is_err() {
                g.stats.driver_errors += 1;
            }
            readable.push((at, p.len() as u32));
            at = at.offset((p.len() as u64).div_ceil(16) * 16);
        }
        if let Some(r) = raw {
            readable.push(r);
        }
        let (writable, table) = match q {
            QueueId::Control => (
                vec![(base.offset(RESP_AT), response_len(sub.type_))],
                Some(base.offset(TABLE_AT)),
            ),
            QueueId::Cursor => (Vec::new(), None),
        };
        let (mem, dq) = g.queue(q);
        match dq.add(mem, &readable, &writable, table) {
            Ok(head) => {
                let key = (q.index(), head);
                g.pending.insert(
                    key,
                    Pending {
                        slot,
                        t0: now,
                        kind: sub.kind,
                        fence: sub.fence,
                        t_start: None,
                        t_done: None,
                        frame_end: sub.frame_end,
                        cursor_upload: sub.cursor_upload,
                    },
                );
                if sub.host_bound {
                    g.expect[q.index()].push_back((key, sub.type_));
                }
                if sub.kind == Kind::Attack {
                    g.stats.attacks += 1;
                }
                true
            }
            Err(_) => {
                g.free[q.index()].push(slot);
                false
            }
        }
    }

    /// Submits a well-formed command in Linux's shape.
    fn send(&mut self, i: usize, q: QueueId, kind: Kind, cmd: Command) -> bool {
        self.send_with(i, q, Sub::new(kind, &cmd), cmd, 0, 0)
    }

    fn send_with(
        &mut self,
        i: usize,
        q: QueueId,
        sub: Sub,
        cmd: Command,
        flags: u32,
        fence: u64,
    ) -> bool {
        let bytes = encode(cmd, flags, fence);
        if sub.type_ == wire::CMD_RESOURCE_ATTACH_BACKING && bytes.len() > 32 {
            let (hdr, entries) = bytes.split_at(wire::size::RESOURCE_ATTACH_BACKING);
            self.submit(i, q, &[hdr, entries], None, sub)
        } else {
            self.submit(i, q, &[&bytes], None, sub)
        }
    }

    fn guest_event(&mut self, i: usize) {
        let now = self.now;
        if self.guests[i].reset_at.is_some_and(|t| t <= now) {
            self.guests[i].reset_at = None;
            self.guest_reset(i);
            return;
        }
        let load = self.guests[i].spec.load;
        if !self.guests[i].up {
            self.guests[i].up = true;
            self.bring_up(i);
        } else {
            match load {
                Load::Idle => {
                    self.send(i, QueueId::Control, Kind::Work, Command::GetDisplayInfo);
                    self.kick(i, QueueId::Control);
                }
                Load::Interactive { .. } => self.interactive(i),
                Load::Saturating { .. } => {}
                Load::Malicious { .. } => self.malicious(i),
            }
        }
        let g = &mut self.guests[i];
        g.next_wake = match load {
            Load::Idle => now + IDLE_PERIOD_NS,
            Load::Interactive { mean_period_ns } | Load::Malicious { mean_period_ns } => {
                now + g
                    .rng
                    .range(mean_period_ns / 2, mean_period_ns * 3 / 2)
                    .max(1)
            }
            Load::Saturating { .. } => u64::MAX,
        };
    }

    fn bring_up(&mut self, i: usize) {
        let (w, h) = self.sc.display;
        let len = self.sc.framebuffer_bytes();
        let c = QueueId::Control;
        if self.guests[i].malicious() {
            self.send(i, c, Kind::Setup, evil_resource());
            self.kick(i, c);
            return;
        }
        let load = self.guests[i].spec.load;
        let buffers = if matches!(load, Load::Saturating { .. }) {
            2
        } else {
            1
        };
        self.send(i, c, Kind::Setup, Command::GetEdid { scanout: 0 });
        self.send(i, c, Kind::Setup, Command::GetDisplayInfo);
        for (b, &id) in FB_IDS.iter().enumerate().take(buffers) {
            self.send(
                i,
                c,
                Kind::Setup,
                Command::ResourceCreate2d {
                    resource_id: id,
                    format: format::B8G8R8X8_UNORM,
                    width: w,
                    height: h,
                },
            );
            let entries = self.guests[i].fb_entries(b, len);
            self.send(
                i,
                c,
                Kind::Setup,
                Command::ResourceAttachBacking {
                    resource_id: id,
                    entries,
                },
            );
        }
        for cmd in [
            Command::SetScanout {
                rect: full(w, h),
                scanout_id: 0,
                resource_id: FB_IDS[0],
            },
            Command::TransferToHost2d {
                rect: full(w, h),
                offset: 0,
                resource_id: FB_IDS[0],
            },
            Command::ResourceFlush {
                rect: full(w, h),
                resource_id: FB_IDS[0],
            },
        ] {
            self.send(i, c, Kind::Setup, cmd);
        }
        if matches!(load, Load::Interactive { .. }) {
            self.send(
                i,
                c,
                Kind::Setup,
                Command::ResourceCreate2d {
                    resource_id: CURSOR_ID,
                    format: format::B8G8R8A8_UNORM,
                    width: CURSOR_SIZE,
                    height: CURSOR_SIZE,
                },
            );
            self.send(
                i,
                c,
                Kind::Setup,
                Command::ResourceAttachBacking {
                    resource_id: CURSOR_ID,
                    entries: vec![MemEntry {
                        addr: CURSOR_IMAGE.get(),
                        length: CURSOR_SIZE * CURSOR_SIZE * 4,
                        padding: 0,
                    }],
                },
            );
        }
        self.kick(i, c);
        if let Load::Saturating { frames_in_flight } = load {
            for _ in 0..frames_in_flight {
                self.frame(i);
            }
        }
    }

    /// One page flip: full-frame transfer to the back buffer, show it, flush it.
    fn frame(&mut self, i: usize) {
        let (w, h) = self.sc.display;
        let back = 1 - self.guests[i].front;
        let id = FB_IDS[back];
        let c = QueueId::Control;
        let ok = self.send(
            i,
            c,
            Kind::Work,
            Command::TransferToHost2d {
                rect: full(w, h),
                offset: 0,
                resource_id: id,
            },
        ) && self.send(
            i,
            c,
            Kind::Work,
            Command::SetScanout {
                rect: full(w, h),
                scanout_id: 0,
                resource_id: id,
            },
        ) && {
            let cmd = Command::ResourceFlush {
                rect: full(w, h),
                resource_id: id,
            };
            let sub = Sub {
                frame_end: true,
                ..Sub::new(Kind::Work, &cmd)
            };
            self.send_with(i, c, sub, cmd, 0, 0)
        };
        if ok {
            self.guests[i].frames_out += 1;
            self.guests[i].front = back;
        } else {
            self.guests[i].stats.driver_errors += 1;
        }
        self.kick(i, c);
    }

    fn cursor_pos(&mut self, i: usize) -> CursorPos {
        let (w, h) = self.sc.display;
        let g = &mut self.guests[i];
        CursorPos {
            scanout_id: 0,
            x: g.rng.below(u64::from(w)) as u32,
            y: g.rng.below(u64::from(h)) as u32,
            padding: 0,
        }
    }

    fn interactive(&mut self, i: usize) {
        let (w, h) = self.sc.display;
        let stride = u64::from(w) * 4;
        let c = QueueId::Control;
        let roll = self.guests[i].rng.below(100);
        let (shown, busy) = (self.guests[i].cursor_shown, self.guests[i].cursor_busy);
        if roll >= 90 && shown {
            let pos = self.cursor_pos(i);
            self.send(i, QueueId::Cursor, Kind::Work, Command::MoveCursor { pos });
            self.kick(i, QueueId::Cursor);
            return;
        }
        if (80..90).contains(&roll) && !busy {
            // A fenced cursor upload; UPDATE_CURSOR follows once the fence is
            // signalled (what Linux does).
            let g = &mut self.guests[i];
            g.fence += 1;
            let fence = g.fence;
            let cmd = Command::TransferToHost2d {
                rect: full(CURSOR_SIZE, CURSOR_SIZE),
                offset: 0,
                resource_id: CURSOR_ID,
            };
            let sub = Sub {
                fence: Some(fence),
                cursor_upload: true,
                ..Sub::new(Kind::Work, &cmd)
            };
            if self.send_with(i, c, sub, cmd, wire::FLAG_FENCE, fence) {
                self.guests[i].cursor_busy = true;
            }
            self.kick(i, c);
            return;
        }
        let g = &mut self.guests[i];
        let rect = if roll < 55 {
            // An 8x16 glyph (cursor blink, a typed character).
            Rect {
                x: g.rng.below(u64::from(w / 8)) as u32 * 8,
                y: g.rng.below(u64::from(h / 16)) as u32 * 16,
                width: 8,
                height: 16,
            }
        } else {
            // A full-width strip of 2 lines.
            Rect {
                x: 0,
                y: g.rng.below(u64::from(h / 2)) as u32 * 2,
                width: w,
                height: 2,
            }
        };
        let offset = u64::from(rect.y) * stride + u64::from(rect.x) * 4;
        self.send(
            i,
            c,
            Kind::Work,
            Command::TransferToHost2d {
                rect,
                offset,
                resource_id: FB_IDS[0],
            },
        );
        self.send(
            i,
            c,
            Kind::Work,
            Command::ResourceFlush {
                rect,
                resource_id: FB_IDS[0],
            },
        );
        self.kick(i, c);
    }

    /// Takes every returned chain of queue `q` of guest `i`.
    fn take_used(&mut self, i: usize, q: QueueId) {
        let now = self.now;
        let warm = self.sc.warmup_ns;
        let mut frames_done = 0;
        let mut cursor_ready = false;
        loop {
            let g = &mut self.guests[i];
            let (mem, dq) = g.queue(q);
            let (head, written) = match dq.take_used(mem) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(_) => {
                    g.stats.driver_errors += 1;
                    break;
                }
            };
            let Some(p) = g.pending.remove(&(q.index(), head)) else {
                g.stats.driver_errors += 1;
                continue;
            };
            g.free[q.index()].push(p.slot);
            let resp = if q == QueueId::Control && written >= 24 {
                let mut b = vec![0u8; written.min(response_len_max()) as usize];
                g.mem
                    .read(slot_addr(q, p.slot).offset(RESP_AT), &mut b)
                    .ok()
                    .and_then(|()| Response::decode(&b).ok())
            } else {
                None
            };
            let ok = match q {
                QueueId::Control => resp
                    .as_ref()
                    .is_some_and(|(_, r)| !matches!(r, Response::Err(_))),
                // No response on the cursor queue: returned is all a guest sees.
                QueueId::Cursor => true,
            };
            let t_sched = g.last_seen[q.index()].saturating_sub(p.t0);
            g.last_seen[q.index()] = now;
            match p.kind {
                Kind::Attack => {
                    if ok && q == QueueId::Control {
                        g.stats.attacks_accepted += 1;
                    }
                }
                Kind::Setup | Kind::Work => {
                    if !ok {
                        g.stats.errors += 1;
                    }
                    if p.kind == Kind::Work && p.t0 >= warm {
                        g.stats.lat.push(now - p.t0);
                        g.stats.completed += 1;
                        if let (Some(f), Some(start), Some(done)) = (p.fence, p.t_start, p.t_done) {
                            let echoed = resp.as_ref().is_some_and(|(h, _)| {
                                h.flags & wire::FLAG_FENCE != 0 && h.fence_id == f
                            });
                            if !echoed {
                                g.stats.fence_echo_errors += 1;
                            }
                            g.stats
                                .fences
                                .push((done - p.t0, t_sched, now - p.t0, start - p.t0));
                        }
                    }
                }
            }
            if p.frame_end {
                frames_done += 1;
            }
            if p.cursor_upload {
                cursor_ready = true;
            }
        }
        // Ask for an interrupt at the next used entry (virtqueue_enable_cb).
        let (mem, dq) = self.guests[i].queue(q);
        let at = dq.last_used_idx();
        if dq.set_used_event(mem, at).is_err() {
            self.guests[i].stats.driver_errors += 1;
        }
        if cursor_ready {
            self.guests[i].cursor_busy = false;
            self.guests[i].cursor_shown = true;
            let pos = self.cursor_pos(i);
            self.send(
                i,
                QueueId::Cursor,
                Kind::Work,
                Command::UpdateCursor {
                    pos,
                    resource_id: CURSOR_ID,
                    hot_x: 0,
                    hot_y: 0,
                },
            );
            self.kick(i, QueueId::Cursor);
        }
        if frames_done > 0 {
            let g = &mut self.guests[i];
            g.frames_out = g.frames_out.saturating_sub(frames_done);
            if let Load::Saturating { frames_in_flight } = g.spec.load {
                while self.guests[i].frames_out < frames_in_flight {
                    let before = self.guests[i].frames_out;
                    self.frame(i);
                    if self.guests[i].frames_out == before {
                        break;
                    }
                }
            }
        }
    }

    fn deliver_interrupts(&mut self) {
        // Each round answers what the previous one submitted; guests submit only
        // in reaction to completions, so this settles quickly.
        for _ in 0..64 {
            let irqs = self.disp.take_interrupts();
            if irqs.is_empty() {
                return;
            }
            for (vm, vector) in irqs {
                let i = Self::idx(vm);
                match vector {
                    0 => {
                        let broken =
                            self.disp.mediator().device_status(vm) == Some(DEVICE_NEEDS_RESET);
                        let g = &mut self.guests[i];
                        if broken && g.reset_at.is_none() {
                            g.reset_at = Some(self.now + RESET_DELAY_NS);
                        }
                    }
                    1 => self.take_used(i, QueueId::Control),
                    _ => self.take_used(i, QueueId::Cursor),
                }
            }
        }
    }

    /// The guest resets its device (status 0), sets its queues up again and
    /// starts over.
    fn guest_reset(&mut self, i: usize) {
        let vm = self.guests[i].vm;
        self.note_reset(i);
        // The dispatcher revokes the VM's grants and stages its cleanup.
        let _ = self.disp.driver_reset(vm, self.now);
        self.check_grants_gone(vm);
        self.reinit(i);
        self.disp.schedule(self.now);
    }

    /// Right after `vm`'s reset: the GPU can reach nothing of it any more (no
    /// simulated guest registers zero-copy buffers, which outlive a reset).
    fn check_grants_gone(&mut self, vm: VmId) {
        if self.disp.grants().of_vm(vm) > 0 {
            self.m.grants_kept += 1;
        }
    }

    /// Guest `i`'s device is being reset: its commands already on the GPU's ring
    /// still run, as the device does not take back what it was given. They were
    /// asked for before the reset: what the guest had asked for is kept to match
    /// them, and the chain the running one belonged to is gone.
    fn note_reset(&mut self, i: usize) {
        let vm = self.guests[i].vm;
        let ring = self.disp.gpu_mut();
        let on_ring = ring.queued.iter().filter(|c| c.vm == vm).count();
        if let Some(r) = ring.running.as_mut().filter(|r| r.vm == vm) {
            r.matched = None;
        }
        let g = &mut self.guests[i];
        g.on_ring_at_reset = on_ring;
        if on_ring == 0 {
            g.asked_before_reset = [VecDeque::new(), VecDeque::new()];
        } else {
            // Commands from before an earlier reset run first.
            for (before, now) in g.asked_before_reset.iter_mut().zip(&mut g.expect) {
                before.append(now);
            }
        }
    }

    /// The guest resets its device state (after its own reset, or the
    /// hypervisor's after a hang) and starts over.
    fn reinit(&mut self, i: usize) {
        let vm = self.guests[i].vm;
        let g = &mut self.guests[i];
        g.stats.resets += 1;
        g.stats.dropped += g.pending.len() as u64;
        g.pending.clear();
        g.expect = [VecDeque::new(), VecDeque::new()];
        g.free = Guest::slots();
        g.frames_out = 0;
        g.cursor_busy = false;
        g.cursor_shown = false;
        g.last_seen = [self.now; 2];
        let ctrl = DriverQueue::new(&mut g.mem, control_layout());
        let cursor = DriverQueue::new(&mut g.mem, cursor_layout());
        match (ctrl, cursor) {
            (Ok(c), Ok(k)) => {
                g.ctrl = c;
                g.cursor = k;
            }
            _ => g.stats.driver_errors += 1,
        }
        if Self::start_device(self.disp.mediator_mut(), vm).is_err() {
            self.guests[i].stats.driver_errors += 1;
        }
        if self.guests[i].malicious() {
            self.send(i, QueueId::Control, Kind::Setup, evil_resource());
            self.kick(i, QueueId::Control);
        } else {
            // A well-behaved guest starts over from the probe.
            self.guests[i].up = false;
            self.guests[i].next_wake = self.now;
        }
    }

    // -- the malicious guest -------------------------------------------------

    fn malicious(&mut self, i: usize) {
        if self.guests[i].reset_at.is_some() {
            // Broken device: all it can do is ring.
            self.storm(i);
            return;
        }
        let roll = self.guests[i].rng.below(100);
        if roll < 3 {
            self.corrupt_ring(i);
        } else if roll < 13 {
            self.storm(i);
        } else {
            let n = self.guests[i].rng.range(1, 3);
            for _ in 0..n {
                self.attack(i);
            }
            self.kick(i, QueueId::Control);
            self.kick(i, QueueId::Cursor);
        }
    }

    fn storm(&mut self, i: usize) {
        let vm = self.guests[i].vm;
        let n = self.guests[i].rng.range(50, 300);
        for k in 0..n {
            let q = if k % 4 == 3 {
                QueueId::Cursor
            } else {
                QueueId::Control
            };
            self.disp.doorbell(vm, q, &mut self.guests[i].mem, self.now);
        }
        self.disp.schedule(self.now);
        let s = &mut self.guests[i].stats;
        s.storms += 1;
        s.storm_doorbells += n;
    }

    fn corrupt_ring(&mut self, i: usize) {
        let g = &mut self.guests[i];
        let (q, layout, idx) = if g.rng.chance(75) {
            (QueueId::Control, control_layout(), g.ctrl.avail_idx())
        } else {
            (QueueId::Cursor, cursor_layout(), g.cursor.avail_idx())
        };
        let size = u64::from(layout.size);
        let slot = slot_addr(q, 0);
        let desc = |mem: &mut VecMemory, d: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&next.to_le_bytes());
            let _ = mem.write(layout.desc.offset(16 * d), &b);
        };
        let d = size - 1;
        let head: u16 = match g.rng.below(5) {
            // A descriptor that chains to itself.
            0 => {
                desc(
                    &mut g.mem,
                    d,
                    slot.get(),
                    56,
                    wire::virtq::DESC_F_NEXT,
                    d as u16,
                );
                d as u16
            }
            // An indirect table whose length is not whole descriptors.
            1 => {
                desc(
                    &mut g.mem,
                    d,
                    slot.get(),
                    24,
                    wire::virtq::DESC_F_INDIRECT,
                    0,
                );
                d as u16
            }
            // A buffer past the end of its RAM.
            2 => {
                desc(&mut g.mem, d, RAM_BYTES as u64 + 0x1000, 64, 0, 0);
                d as u16
            }
            // A head that is not a descriptor.
            3 => 999,
            // avail.idx far ahead of anything made available.
            _ => {
                let _ = g
                    .mem
                    .write(layout.avail.offset(2), &idx.wrapping_add(200).to_le_bytes());
                g.stats.ring_attacks += 1;
                let vm = g.vm;
                self.disp.doorbell(vm, q, &mut self.guests[i].mem, self.now);
                self.disp.schedule(self.now);
                return;
            }
        };
        let slot_at = layout.avail.offset(4 + 2 * (u64::from(idx) % size));
        let _ = g.mem.write(slot_at, &head.to_le_bytes());
        let _ = g
            .mem
            .write(layout.avail.offset(2), &idx.wrapping_add(1).to_le_bytes());
        g.stats.ring_attacks += 1;
        let vm = g.vm;
        self.disp.doorbell(vm, q, &mut self.guests[i].mem, self.now);
        self.disp.schedule(self.now);
    }

    /// One command the mediator must refuse.
    fn attack(&mut self, i: usize) {
        let c = QueueId::Control;
        let k = QueueId::Cursor;
        let g = &mut self.guests[i];
        let kind = g.rng.below(9);
        let variant = g.rng.below(4);
        // A resource id that is not the guest's own.
        let foreign = match g.rng.below(3) {
            0 => FB_IDS[0],
            1 => CURSOR_ID,
            _ => {
                let id = g.rng.range(1, 64) as u32;
                if id == EVIL_ID {
                    EVIL_ID + 1
                } else {
                    id
                }
            }
        };
        let scanout = g.rng.range(1, 16) as u32;
        let r = full(64, 64);
        let sub = |cmd: &Command| Sub::new(Kind::Attack, cmd);
        let plain = |s: &mut Self, q: QueueId, cmd: Command, flags: u32, fence: u64| {
            let sb = sub(&cmd);
            s.send_with(i, q, sb, cmd, flags, fence);
        };
        match kind {
            // Forged fences: id 0 (never above the last one), or a huge id on a
            // command that is refused anyway.
            0 => {
                let cmd = Command::TransferToHost2d {
                    rect: r,
                    offset: 0,
                    resource_id: if variant == 0 { foreign } else { EVIL_ID },
                };
                let fence = if variant == 0 { u64::MAX } else { 0 };
                plain(self, c, cmd, wire::FLAG_FENCE, fence);
            }
            // Other VMs' resource ids (guest ids they use, guessed host ids).
            1 => {
                let cmd = match variant {
                    0 => Command::TransferToHost2d {
                        rect: r,
                        offset: 0,
                        resource_id: foreign,
                    },
                    1 => Command::ResourceFlush {
                        rect: r,
                        resource_id: foreign,
                    },
                    2 => Command::SetScanout {
                        rect: r,
                        scanout_id: 0,
                        resource_id: foreign,
                    },
                    _ => Command::ResourceUnref {
                        resource_id: foreign,
                    },
                };
                plain(self, c, cmd, 0, 0);
            }
            // Backing outside its RAM: past its end, at another VM's host
            // address, or wrapping around; after some valid entries.
            2 => {
                let good = self.guests[i].rng.below(84);
                let bad = match variant {
                    0 => RAM_BYTES as u64 + 0x1000 * self.guests[i].rng.below(16),
                    // A guest can write any number, a host address too.
                    1 => host_base(self.guests[i].rng.below(4) as usize).get(),
                    2 => u64::MAX - 0xfff,
                    _ => RAM_BYTES as u64 - 0x800,
                };
                let mut entries: Vec<MemEntry> = (0..good)
                    .map(|p| MemEntry {
                        addr: FB[0].offset(p * PAGE).get(),
                        length: PAGE as u32,
                        padding: 0,
                    })
                    .collect();
                entries.push(MemEntry {
                    addr: bad,
                    length: PAGE as u32,
                    padding: 0,
                });
                let cmd = Command::ResourceAttachBacking {
                    resource_id: EVIL_ID,
                    entries,
                };
                plain(self, c, cmd, 0, 0);
            }
            // Scanouts it was not given.
            3 => {
                let cmd = if variant < 2 {
                    Command::SetScanout {
                        rect: r,
                        scanout_id: scanout,
                        resource_id: EVIL_ID,
                    }
                } else {
                    Command::GetEdid { scanout }
                };
                plain(self, c, cmd, 0, 0);
            }
            // The cursor queue: foreign scanout or resource, a fence, a control
            // command.
            4 => {
                let pos = CursorPos {
                    scanout_id: scanout,
                    x: 1,
                    y: 1,
                    padding: 0,
                };
                let own = CursorPos {
                    scanout_id: 0,
                    ..pos
                };
                match variant {
                    0 => plain(self, k, Command::MoveCursor { pos }, 0, 0),
                    1 => plain(
                        self,
                        k,
                        Command::UpdateCursor {
                            pos: own,
                            resource_id: foreign,
                            hot_x: 0,
                            hot_y: 0,
                        },
                        0,
                        0,
                    ),
                    2 => plain(
                        self,
                        k,
                        Command::MoveCursor { pos: own },
                        wire::FLAG_FENCE,
                        9,
                    ),
                    _ => plain(
                        self,
                        k,
                        Command::ResourceFlush {
                            rect: r,
                            resource_id: EVIL_ID,
                        },
                        0,
                        0,
                    ),
                }
            }
            // Garbage: a 3D command, a ring index flag, a short command, too many
            // backing entries, an oversized chain.
            5 => {
                let t = match variant {
                    0 => 0x0201,
                    _ => wire::CMD_TRANSFER_TO_HOST_2D,
                };
                let s = Sub {
                    kind: Kind::Attack,
                    type_: t,
                    fence: None,
                    host_bound: false,
                    frame_end: false,
                    cursor_upload: false,
                };
                let mut b = encode(
                    Command::TransferToHost2d {
                        rect: r,
                        offset: 0,
                        resource_id: EVIL_ID,
                    },
                    0,
                    0,
                );
                match variant {
                    0 => {
                        b[0..4].copy_from_slice(&0x0201u32.to_le_bytes());
                        self.submit(i, c, &[&b], None, s);
                    }
                    1 => {
                        b[4..8].copy_from_slice(&wire::FLAG_INFO_RING_IDX.to_le_bytes());
                        self.submit(i, c, &[&b], None, s);
                    }
                    2 => {
                        self.submit(i, c, &[&b[..40]], None, s);
                    }
                    _ => {
                        if self.guests[i].rng.chance(50) {
                            let mut a = encode(
                                Command::ResourceAttachBacking {
                                    resource_id: EVIL_ID,
                                    entries: Vec::new(),
                                },
                                0,
                                0,
                            );
                            a[28..32].copy_from_slice(&5000u32.to_le_bytes());
                            let s = Sub {
                                type_: wire::CMD_RESOURCE_ATTACH_BACKING,
                                ..s
                            };
                            self.submit(i, c, &[&a], None, s);
                        } else {
                            self.submit(i, c, &[&b], Some((BIG, BIG_LEN)), s);
                        }
                    }
                }
            }
            // Quota: a 1 GiB resource, id 0, its own id again, an unknown format.
            6 => {
                let (id, fmt, dim) = match variant {
                    0 => (EVIL_ID + 1, format::B8G8R8X8_UNORM, 16384),
                    1 => (0, format::B8G8R8X8_UNORM, 64),
                    2 => (EVIL_ID, format::B8G8R8X8_UNORM, 64),
                    _ => (EVIL_ID + 2, 99, 64),
                };
                let cmd = Command::ResourceCreate2d {
                    resource_id: id,
                    format: fmt,
                    width: dim,
                    height: dim,
                };
                plain(self, c, cmd, 0, 0);
            }
            // Its own resource, wrongly: no backing to transfer from, a rectangle
            // outside it, detaching backing it does not have.
            7 => {
                let cmd = match variant {
                    0 | 1 => Command::TransferToHost2d {
                        rect: r,
                        offset: 0,
                        resource_id: EVIL_ID,
                    },
                    2 => Command::ResourceFlush {
                        rect: Rect {
                            x: 60,
                            y: 0,
                            width: 8,
                            height: 8,
                        },
                        resource_id: EVIL_ID,
                    },
                    _ => Command::ResourceDetachBacking {
                        resource_id: EVIL_ID,
                    },
                };
                plain(self, c, cmd, 0, 0);
            }
            // A scanout shown with a rectangle outside the resource, or too small.
            _ => {
                let rect = if variant < 2 {
                    full(65, 64)
                } else {
                    full(8, 8)
                };
                let cmd = Command::SetScanout {
                    rect,
                    scanout_id: 0,
                    resource_id: EVIL_ID,
                };
                plain(self, c, cmd, 0, 0);
            }
        }
    }

    // -- the report ------------------------------------------------------------

    fn report(&mut self) -> Report {
        let sc = self.sc;
        let window = sc.duration_ns - sc.warmup_ns;
        let n = self.guests.len();
        let total_busy: u64 = self.m.busy.iter().sum();
        let total_share: u64 = (0..n).map(|i| sc.share(i)).sum();
        let mean_cmd = self.m.cmd_busy.checked_div(self.m.cmd_count).unwrap_or(0);
        let max_ops = (sc.sched.base_quantum_ns / mean_cmd.max(1)).max(1);
        let counters = self.disp.mediator().counters().clone();
        let sched = self.disp.sched();
        let mut vms = Vec::with_capacity(n);
        let mut fences: Vec<(u64, u64, u64, u64)> = Vec::new();
        let mut echo_errors = 0;
        for (i, g) in self.guests.iter_mut().enumerate() {
            let vm = g.vm;
            let mut lat = core::mem::take(&mut g.stats.lat);
            lat.sort_unstable();
            fences.extend_from_slice(&g.stats.fences);
            echo_errors += g.stats.fence_echo_errors;
            let l_exec = sc.switch_ns + g.stats.max_outstanding_ns;
            let slice_len = if sc.sched.adaptive {
                MIN_QUANTUM_NS
            } else {
                sched.stats(vm).map_or(0, |s| s.quantum_ns)
            };
            let l_max = (l_exec <= slice_len)
                .then(|| sched.latency_bound_ns(vm, l_exec))
                .flatten();
            let st = sched.stats(vm).unwrap_or_default();
            let c = counters.vm(vm).copied().unwrap_or_default();
            let wc = self.m.window[i];
            vms.push(VmReport {
                vm,
                load: g.spec.load,
                weight: g.spec.weight,
                alpha_tenths: g.spec.alpha_tenths,
                weight_share: sc.share(i) as f64 / total_share.max(1) as f64,
                gpu_share: self.m.busy[i] as f64 / total_busy.max(1) as f64,
                utilization: self.m.busy[i] as f64 / window as f64,
                completed: g.stats.completed,
                errors: g.stats.errors,
                gpu_commands: self.m.gpu_cmds[i],
                p50_ns: percentile(&lat, 50),
                p99_ns: percentile(&lat, 99),
                max_ns: lat.last().copied().unwrap_or(0),
                l_exec_ns: l_exec,
                l_max_ns: l_max,
                max_wait_ns: st.max_wait_ns,
                wait_bound_ns: sched.max_wait_ns(vm).unwrap_or(0),
                window: wc,
                efficiency: efficiency(&wc, mean_cmd),
                attacks: g.stats.attacks,
                attacks_accepted: g.stats.attacks_accepted,
                ring_attacks: g.stats.ring_attacks,
                storms: (g.stats.storms, g.stats.storm_doorbells),
                resets: g.stats.resets,
                rejected: c.rejected_total(),
                doorbells: c.doorbells,
                interrupts: c.interrupts_injected,
                mapped_pages: usize::try_from(self.disp.grants().of_vm(vm)).unwrap_or(usize::MAX),
            });
        }
        // Fairness among the VMs that always had work.
        let sat: Vec<usize> = (0..n)
            .filter(|&i| matches!(sc.vms[i].load, Load::Saturating { .. }))
            .collect();
        let sat_busy: u64 = sat.iter().map(|&i| self.m.busy[i]).sum();
        let sat_share: u64 = sat.iter().map(|&i| sc.share(i)).sum();
        let x: Vec<f64> = sat
            .iter()
            .map(|&i| {
                let got = self.m.busy[i] as f64 / sat_busy.max(1) as f64;
                let want = sc.share(i) as f64 / sat_share.max(1) as f64;
                got / want
            })
            .collect();
        let mut all = VmCounters::default();
        for c in &self.m.window {
            all.merge(c);
        }
        let pick = |v: &mut Vec<u64>| {
            v.sort_unstable();
            (percentile(v, 50), percentile(v, 99))
        };
        let mut real: Vec<u64> = fences.iter().map(|f| f.0).collect();
        let mut sched: Vec<u64> = fences.iter().map(|f| f.1).collect();
        let mut wait: Vec<u64> = fences.iter().map(|f| f.2).collect();
        let mut queued: Vec<u64> = fences.iter().map(|f| f.3).collect();
        let violations = fences.iter().filter(|f| f.2 != f.0.max(f.1)).count() as u64;
        Report {
            name: sc.name.clone(),
            seed: sc.seed,
            sched: sc.sched,
            switch_ns: sc.switch_ns,
            window_ns: window,
            vms,
            jain: jain_index(&x),
            u_gpu: total_busy as f64 / window as f64,
            u_gpu_sched: self.disp.sched().gpu_utilization(sc.duration_ns),
            efficiency: efficiency(&all, mean_cmd),
            max_ops_per_quantum: max_ops,
            mean_command_ns: mean_cmd,
            switch_time_ns: self.m.switch_time,
            fences: FenceReport {
                count: fences.len() as u64,
                t_real_ns: pick(&mut real),
                t_sched_ns: pick(&mut sched),
                t_wait_ns: pick(&mut wait),
                t_queue_ns: pick(&mut queued),
                violations,
                echo_errors,
            },
            gpu_commands: self.gpu.commands_executed(),
            gpu_errors: self.gpu.errors(),
            iommu_faults: self.m.faults,
            iommu_errors: self.m.grants_kept,
            unexpected_host_commands: self.m.unexpected,
            overruns: self.m.overruns,
            stale_completions: counters.spurious_interrupts,
            hangs: self.m.hangs,
            good_resources: (
                core::mem::take(&mut self.good_resources_at_warmup),
                self.good_resources(),
            ),
        }
    }
}

/// `E = ops / Σ_quanta (q / mean)`, i.e. `ops · mean / allocated time`; with equal
/// quanta this is [`VmCounters::efficiency`] with `q / mean` ops per quantum.
fn efficiency(c: &VmCounters, mean_cmd_ns: u64) -> f64 {
    if c.allocated_ns == 0 {
        return 0.0;
    }
    c.ops_completed as f64 * mean_cmd_ns as f64 / c.allocated_ns as f64
}

fn response_len_max() -> u32 {
    wire::size::RESP_EDID as u32
}

fn evil_resource() -> Command {
    Command::ResourceCreate2d {
        resource_id: EVIL_ID,
        format: format::B8G8R8A8_UNORM,
        width: 64,
        height: 64,
    }
}

// ---------------------------------------------------------------------------
// The noisy-neighbour figure.

/// An interactive VM's latency alone and next to other loads.
#[derive(Clone, Debug, PartialEq)]
pub struct NoisyNeighbour {
    /// (neighbours, the interactive VM's report in that run), the first alone.
    pub runs: Vec<(String, VmReport)>,
}

impl NoisyNeighbour {
    /// The interactive VM's report alone.
    pub fn alone(&self) -> &VmReport {
        &self.runs[0].1
    }
}

/// Runs `base`'s settings (seed, duration, costs, scheduler) with an interactive
/// VM (weight 1) alone, next to a saturating VM, next to a malicious and an idle
/// VM, and next to all three; the interactive guest makes the same choices in
/// every run.
pub fn noisy_neighbour(base: &Scenario) -> Result<NoisyNeighbour, SimError> {
    let i = VmSpec::new(Load::INTERACTIVE, 1);
    let s = VmSpec::new(Load::SATURATING, 1);
    let m = VmSpec::new(Load::MALICIOUS, 1);
    let d = VmSpec::new(Load::Idle, 1);
    let sets: [(&str, Vec<VmSpec>); 4] = [
        ("alone", vec![i]),
        ("+ saturating", vec![i, s]),
        ("+ malicious + idle", vec![i, m, d]),
        ("+ saturating + malicious + idle", vec![i, s, m, d]),
    ];
    let mut runs = Vec::new();
    for (name, vms) in sets {
        let sc = Scenario {
            name: String::from(name),
            vms,
            ..base.clone()
        };
        let r = run(&sc)?;
        runs.push((String::from(name), r.vms[0].clone()));
    }
    Ok(NoisyNeighbour { runs })
}

impl fmt::Display for NoisyNeighbour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let alone = self.alone().p99_ns.max(1) as f64;
        writeln!(
            f,
            "{:<32} {:>9} {:>9} {:>9} {:>10} {:>7}",
            "interactive VM", "p50 us", "p99 us", "max us", "L_max us", "p99 x"
        )?;
        for (name, v) in &self.runs {
            let lmax = v
                .l_max_ns
                .map_or_else(|| String::from("n/a"), |l| alloc::format!("{:.0}", us(l)));
            writeln!(
                f,
                "{:<32} {:>9.1} {:>9.1} {:>9.1} {:>10} {:>7.1}",
                name,
                us(v.p50_ns),
                us(v.p99_ns),
                us(v.max_ns),
                lmax,
                v.p99_ns as f64 / alone
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
