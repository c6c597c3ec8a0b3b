//! The GPU time-slice scheduler: which VM's commands go to the physical GPU next,
//! and for how long.
//!
//! GPU-PV shares one GPU by time-division multiplexing: GPU time is cut into
//! quanta of 1 to 10 ms that are handed to the VMs in turn. This module is only the
//! policy. It owns no clock and no queue: the caller passes the time in
//! nanoseconds, says which VMs have work ([`Scheduler::set_runnable`]), asks what to
//! run ([`Scheduler::pick`]) and reports what a slice used
//! ([`Scheduler::account`]).
//!
//! ```
//! use gpu_pv::sched::{Mode, SchedConfig, Scheduler, SliceKind, VmParams};
//!
//! let mut s = Scheduler::new(SchedConfig {
//!     mode: Mode::BestEffort,
//!     base_quantum_ns: 2_000_000,
//!     adaptive: false,
//! })?;
//! s.add_vm(1, VmParams { weight: 1, alpha_tenths: 0 })?;
//! s.add_vm(2, VmParams { weight: 1, alpha_tenths: 10 })?; // α = 1: 2x share, 4 ms slices
//! s.set_runnable(1, true, 0)?;
//! s.set_runnable(2, true, 0)?;
//! let mut now = 0;
//! while let Some(slice) = s.pick(now) {
//!     assert_eq!(slice.kind, SliceKind::Run);
//!     // ... submit the VM's commands until its queue empties or the slice ends ...
//!     let used = slice.quantum_ns;
//!     now = slice.start_ns + used;
//!     s.account(slice.vm, used, 10, now)?;
//!     if now >= 60_000_000 {
//!         break;
//!     }
//! }
//! assert_eq!(s.stats(2).unwrap().used_ns, 2 * s.stats(1).unwrap().used_ns);
//! # Ok::<(), gpu_pv::sched::SchedError>(())
//! ```
//!
//! # Shares
//!
//! Shares are kept by stride scheduling (start-time fair queueing): every VM has a
//! virtual *pass*; the eligible VM with the smallest pass gets the next slice, and
//! the time a slice is charged advances its pass by `charge / share`. Over time
//! each VM therefore receives GPU time in proportion to its share, however long
//! its individual slices are. A VM's share is `weight · (1 + α)`, so the seed's
//! priority boost `TS_high = TS_base · (1 + α)` gives a boosted VM both a longer
//! slice and a proportionally larger part of the GPU, exactly as in round-robin
//! with per-VM slice lengths. α is kept exactly, in tenths (`alpha_tenths`, 0..=20
//! for α in 0..=2).
//!
//! # Modes
//!
//! - [`Mode::BestEffort`]: only VMs with work are eligible; an idle VM's time goes
//!   to the others (work conserving). A slice is charged the time used, so a VM
//!   that finishes early is not billed for the rest of its quantum.
//! - [`Mode::FixedShare`]: every VM is eligible and its share is fixed by its
//!   weight and α. When the VM whose turn it is has no work, its slot is held idle
//!   ([`SliceKind::Reserved`]) and nobody else gets it. Slices are charged whole.
//! - [`Mode::EqualShare`]: as `FixedShare`, but weights and α are ignored: every VM
//!   has the same share and the base quantum.
//!
//! # Adaptive quantum
//!
//! With [`SchedConfig::adaptive`], a VM whose slice ended before its quantum
//! (interactive: it ran out of work) has its quantum moved halfway towards what it
//! used; a VM that used its whole quantum (saturating) gets 25% more. Quanta stay
//! within [`MIN_QUANTUM_NS`]..=[`MAX_QUANTUM_NS`]. Since shares are charged by
//! time, not by slice, the adaptive quantum changes latency and switch overhead,
//! never a VM's share.
//!
//! # Latency bound
//!
//! [`Scheduler::max_wait_ns`] is a proven upper bound on how much GPU time other
//! VMs' slices take between a VM becoming runnable (or finishing a slice while
//! still runnable) and the start of its next slice; [`Scheduler::latency_bound_ns`]
//! adds the execution time, giving the seed's `L_max = L_exec + wait`. See
//! [`Scheduler::max_wait_ns`] for the formula and why it can exceed the seed's
//! `TS_max`.

use alloc::vec::Vec;
use core::fmt;

use crate::ratio::Ratio;

/// A VM's id, as the scheduler, counters and mediator know it.
pub type VmId = u16;

/// Shortest quantum (1 ms).
pub const MIN_QUANTUM_NS: u64 = 1_000_000;
/// Longest quantum (10 ms).
pub const MAX_QUANTUM_NS: u64 = 10_000_000;
/// Largest priority coefficient α, in tenths (α = 2).
pub const MAX_ALPHA_TENTHS: u8 = 20;
/// Largest VM weight.
pub const MAX_WEIGHT: u32 = 1000;
/// Most VMs one scheduler serves.
pub const MAX_VMS: usize = 256;
/// Least time a best-effort slice is charged, used or not: starting any slice
/// costs the GPU a context switch, and a VM reporting no progress must still move
/// back in the queue rather than be picked forever.
pub const MIN_CHARGE_NS: u64 = 10_000;

/// Pass units per nanosecond of charge at share 1. Shares are at most
/// `MAX_WEIGHT · 30`, far below this, so the rounding of a pass step is below one
/// nanosecond of service.
const PASS_SCALE: u128 = 1 << 32;

/// The scheduling mode (what happens to the time of a VM that has no work).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Only VMs with work run; idle VMs' time goes to the others.
    #[default]
    BestEffort,
    /// Every VM has the same share; an idle VM's slot is held idle.
    EqualShare,
    /// Shares follow weights and α; an idle VM's slot is held idle.
    FixedShare,
}

/// Why a configuration or call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedError {
    /// The base quantum is outside `MIN_QUANTUM_NS..=MAX_QUANTUM_NS`.
    QuantumOutOfRange {
        /// The quantum given.
        quantum_ns: u64,
    },
    /// The weight is outside `1..=MAX_WEIGHT`.
    WeightOutOfRange {
        /// The weight given.
        weight: u32,
    },
    /// α is above `MAX_ALPHA_TENTHS`.
    AlphaOutOfRange {
        /// α given, in tenths.
        alpha_tenths: u8,
    },
    /// The VM is already scheduled.
    DuplicateVm(VmId),
    /// The VM is not scheduled.
    UnknownVm(VmId),
    /// Already `MAX_VMS` VMs.
    TooManyVms,
    /// `account` was called with no slice open.
    NoOpenSlice,
    /// `account` was called for a VM other than the open slice's.
    NotOpenSlice {
        /// The VM of the open slice.
        open: VmId,
        /// The VM given.
        got: VmId,
    },
}

impl fmt::Display for SchedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::QuantumOutOfRange { quantum_ns } => write!(
                f,
                "quantum {quantum_ns} ns outside {MIN_QUANTUM_NS}..={MAX_QUANTUM_NS} ns"
            ),
            Self::WeightOutOfRange { weight } => {
                write!(f, "weight {weight} outside 1..={MAX_WEIGHT}")
            }
            Self::AlphaOutOfRange { alpha_tenths } => write!(
                f,
                "alpha {alpha_tenths}/10 outside 0..={MAX_ALPHA_TENTHS}/10"
            ),
            Self::DuplicateVm(vm) => write!(f, "VM {vm} already scheduled"),
            Self::UnknownVm(vm) => write!(f, "VM {vm} not scheduled"),
            Self::TooManyVms => write!(f, "more than {MAX_VMS} VMs"),
            Self::NoOpenSlice => f.write_str("no slice is open"),
            Self::NotOpenSlice { open, got } => {
                write!(f, "open slice belongs to VM {open}, not VM {got}")
            }
        }
    }
}

/// Scheduler configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedConfig {
    /// What happens to the time of VMs without work.
    pub mode: Mode,
    /// The base quantum `TS_base`, in `MIN_QUANTUM_NS..=MAX_QUANTUM_NS`.
    pub base_quantum_ns: u64,
    /// Adapt each VM's quantum to how it uses it (see the module docs).
    pub adaptive: bool,
}

impl Default for SchedConfig {
    /// Best effort with 2 ms quanta (the seed: quanta above 2 ms hurt interactive
    /// use), not adaptive.
    fn default() -> Self {
        Self {
            mode: Mode::BestEffort,
            base_quantum_ns: 2_000_000,
            adaptive: false,
        }
    }
}

impl SchedConfig {
    /// Checks the base quantum is within `MIN_QUANTUM_NS..=MAX_QUANTUM_NS`.
    pub fn validate(&self) -> Result<(), SchedError> {
        if !(MIN_QUANTUM_NS..=MAX_QUANTUM_NS).contains(&self.base_quantum_ns) {
            return Err(SchedError::QuantumOutOfRange {
                quantum_ns: self.base_quantum_ns,
            });
        }
        Ok(())
    }
}

/// A VM's scheduling parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmParams {
    /// Relative share, `1..=MAX_WEIGHT` (ignored in [`Mode::EqualShare`]).
    pub weight: u32,
    /// Priority coefficient α in tenths, `0..=MAX_ALPHA_TENTHS` (ignored in
    /// [`Mode::EqualShare`]).
    pub alpha_tenths: u8,
}

impl Default for VmParams {
    /// Weight 1, no boost.
    fn default() -> Self {
        Self {
            weight: 1,
            alpha_tenths: 0,
        }
    }
}

impl VmParams {
    /// Checks weight and α ranges.
    pub fn validate(&self) -> Result<(), SchedError> {
        if !(1..=MAX_WEIGHT).contains(&self.weight) {
            return Err(SchedError::WeightOutOfRange {
                weight: self.weight,
            });
        }
        if self.alpha_tenths > MAX_ALPHA_TENTHS {
            return Err(SchedError::AlphaOutOfRange {
                alpha_tenths: self.alpha_tenths,
            });
        }
        Ok(())
    }
}

/// The seed's boosted quantum `TS_high = TS_base · (1 + α)`, with α in tenths,
/// exact (rounded down to the nanosecond) and not clamped. A VM's slice is this,
/// capped at [`MAX_QUANTUM_NS`]; its share grows by `1 + α` even when the slice is
/// capped.
pub fn boosted_quantum_ns(base_ns: u64, alpha_tenths: u8) -> u64 {
    let v = u128::from(base_ns) * (10 + u128::from(alpha_tenths)) / 10;
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// What a slice is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SliceKind {
    /// The VM has work: send its commands to the GPU until the slice ends.
    Run,
    /// Fixed modes only: the slot of a VM without work. The GPU stays idle until
    /// [`Slice::end_ns`]; if the VM gets work meanwhile, the next
    /// [`Scheduler::pick`] turns the slice into [`SliceKind::Run`] for the rest of
    /// the slot.
    Reserved,
}

/// One time slice handed out by [`Scheduler::pick`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Slice {
    /// Whose slice it is.
    pub vm: VmId,
    /// Run or held idle.
    pub kind: SliceKind,
    /// When the slice began.
    pub start_ns: u64,
    /// Its length: the VM's quantum when it was picked.
    pub quantum_ns: u64,
}

impl Slice {
    /// When the slice's quantum runs out.
    pub fn end_ns(&self) -> u64 {
        self.start_ns.saturating_add(self.quantum_ns)
    }
}

/// What the scheduler has recorded for one VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmSchedStats {
    /// Slices given (run or reserved).
    pub quanta_allocated: u64,
    /// Slices in which the VM used the GPU.
    pub quanta_used: u64,
    /// Slices held idle for the VM (fixed modes).
    pub quanta_reserved: u64,
    /// Sum of the quanta of all slices given.
    pub allocated_ns: u64,
    /// GPU time used.
    pub used_ns: u64,
    /// Part of `allocated_ns` held idle for the VM.
    pub reserved_ns: u64,
    /// Time charged against the VM's share.
    pub charged_ns: u64,
    /// Context switches to the VM: run slices that followed another VM's run slice.
    pub switches: u64,
    /// Operations completed, as reported to [`Scheduler::account`].
    pub ops_completed: u64,
    /// The VM's current quantum.
    pub quantum_ns: u64,
    /// Longest wait seen from becoming runnable (or ending a slice while still
    /// runnable) to the start of a run slice.
    pub max_wait_ns: u64,
}

#[derive(Clone, Debug)]
struct VmState {
    id: VmId,
    params: VmParams,
    /// Effective share.
    share: u64,
    /// Quantum from the base and α, capped (what adaptation starts from).
    nominal_ns: u64,
    /// Current quantum.
    quantum_ns: u64,
    pass: u128,
    runnable: bool,
    /// When the VM started waiting for a slice, while it waits.
    waiting_since: Option<u64>,
    /// Pick sequence number of its last slice (0: never), for fair tie-breaks.
    last_pick: u64,
    /// Used time inside the current utilization window.
    window_used_ns: u64,
    stats: VmSchedStats,
}

/// The time-slice scheduler (see the module docs).
///
/// Protocol: [`pick`](Self::pick) opens a slice and every slice is closed by one
/// [`account`](Self::account). While a slice is open, `pick` returns it again. Time
/// never goes backwards: a `now_ns` earlier than one already seen is taken as the
/// latest time seen.
#[derive(Clone, Debug)]
pub struct Scheduler {
    cfg: SchedConfig,
    vms: Vec<VmState>,
    /// Pass of the last slice picked; no eligible VM has a smaller pass.
    vtime: u128,
    open: Option<Slice>,
    /// VM whose context the GPU holds (last run slice).
    last_run: Option<VmId>,
    picks: u64,
    now_ns: u64,
    window_start_ns: Option<u64>,
}

/// Pass advance for `charge_ns` at `share`, rounded up so a VM never gets more
/// than its share through rounding.
fn pass_step(charge_ns: u64, share: u64) -> u128 {
    (u128::from(charge_ns) * PASS_SCALE).div_ceil(u128::from(share.max(1)))
}

/// The adaptive quantum after a slice of `quantum_ns` that used `used_ns`.
fn adapt(quantum_ns: u64, used_ns: u64) -> u64 {
    let q = if used_ns >= quantum_ns {
        quantum_ns.saturating_add(quantum_ns / 4)
    } else {
        (quantum_ns + used_ns) / 2
    };
    q.clamp(MIN_QUANTUM_NS, MAX_QUANTUM_NS)
}

impl Scheduler {
    /// A scheduler with no VMs.
    pub fn new(cfg: SchedConfig) -> Result<Self, SchedError> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            vms: Vec::new(),
            vtime: 0,
            open: None,
            last_run: None,
            picks: 0,
            now_ns: 0,
            window_start_ns: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SchedConfig {
        &self.cfg
    }

    fn index(&self, vm: VmId) -> Option<usize> {
        self.vms.iter().position(|v| v.id == vm)
    }

    fn observe(&mut self, now_ns: u64) -> u64 {
        let now = now_ns.max(self.now_ns);
        self.now_ns = now;
        self.window_start_ns.get_or_insert(now);
        now
    }

    fn share_of(&self, p: &VmParams) -> u64 {
        match self.cfg.mode {
            Mode::EqualShare => 10,
            Mode::BestEffort | Mode::FixedShare => {
                u64::from(p.weight) * (10 + u64::from(p.alpha_tenths))
            }
        }
    }

    fn nominal_of(&self, p: &VmParams) -> u64 {
        match self.cfg.mode {
            Mode::EqualShare => self.cfg.base_quantum_ns,
            Mode::BestEffort | Mode::FixedShare => {
                boosted_quantum_ns(self.cfg.base_quantum_ns, p.alpha_tenths).min(MAX_QUANTUM_NS)
            }
        }
    }

    /// The longest quantum the VM can be given under the current configuration.
    fn quantum_ceiling(&self, v: &VmState) -> u64 {
        if self.cfg.adaptive {
            MAX_QUANTUM_NS
        } else {
            v.nominal_ns
        }
    }

    /// Adds a VM, without work, at the current virtual time (no credit, no debt).
    pub fn add_vm(&mut self, vm: VmId, params: VmParams) -> Result<(), SchedError> {
        params.validate()?;
        if self.index(vm).is_some() {
            return Err(SchedError::DuplicateVm(vm));
        }
        if self.vms.len() >= MAX_VMS {
            return Err(SchedError::TooManyVms);
        }
        let nominal_ns = self.nominal_of(&params);
        self.vms.push(VmState {
            id: vm,
            params,
            share: self.share_of(&params),
            nominal_ns,
            quantum_ns: nominal_ns,
            pass: self.vtime,
            runnable: false,
            waiting_since: None,
            last_pick: 0,
            window_used_ns: 0,
            stats: VmSchedStats {
                quantum_ns: nominal_ns,
                ..VmSchedStats::default()
            },
        });
        Ok(())
    }

    /// Removes a VM, dropping its open slice if it has one; returns its statistics.
    pub fn remove_vm(&mut self, vm: VmId) -> Option<VmSchedStats> {
        let i = self.index(vm)?;
        if self.open.is_some_and(|s| s.vm == vm) {
            self.open = None;
        }
        if self.last_run == Some(vm) {
            self.last_run = None;
        }
        Some(self.vms.remove(i).stats)
    }

    /// Changes a VM's weight and α. Its quantum restarts from the new nominal one,
    /// and any lead it had over the others is cut to one new quantum, so the
    /// latency bounds for the new parameters hold at once.
    pub fn set_params(&mut self, vm: VmId, params: VmParams) -> Result<(), SchedError> {
        params.validate()?;
        let i = self.index(vm).ok_or(SchedError::UnknownVm(vm))?;
        let share = self.share_of(&params);
        let nominal_ns = self.nominal_of(&params);
        let vtime = self.vtime;
        let v = &mut self.vms[i];
        v.params = params;
        v.share = share;
        v.nominal_ns = nominal_ns;
        v.quantum_ns = nominal_ns;
        v.stats.quantum_ns = nominal_ns;
        let ceiling = self.quantum_ceiling(&self.vms[i]);
        let v = &mut self.vms[i];
        v.pass = v.pass.min(vtime + pass_step(ceiling, share));
        Ok(())
    }

    /// A VM's parameters.
    pub fn params(&self, vm: VmId) -> Option<VmParams> {
        self.index(vm).map(|i| self.vms[i].params)
    }

    /// Says whether a VM has work. Call [`pick`](Self::pick) afterwards: a VM
    /// whose reserved slot is in progress can then use the rest of it.
    ///
    /// In best-effort mode a VM that gets work starts no earlier than the current
    /// virtual time: time it spent idle is not saved up as credit.
    pub fn set_runnable(
        &mut self,
        vm: VmId,
        has_work: bool,
        now_ns: u64,
    ) -> Result<(), SchedError> {
        let now = self.observe(now_ns);
        let i = self.index(vm).ok_or(SchedError::UnknownVm(vm))?;
        let best_effort = self.cfg.mode == Mode::BestEffort;
        let vtime = self.vtime;
        let v = &mut self.vms[i];
        if has_work && !v.runnable {
            if best_effort {
                v.pass = v.pass.max(vtime);
            }
            v.waiting_since = Some(now);
        } else if !has_work {
            v.waiting_since = None;
        }
        v.runnable = has_work;
        Ok(())
    }

    /// Whether a VM has work (`None` for an unknown VM).
    pub fn is_runnable(&self, vm: VmId) -> Option<bool> {
        self.index(vm).map(|i| self.vms[i].runnable)
    }

    /// Records the start of a run slice for VM `i` at `now`.
    fn start_run(&mut self, i: usize, now: u64) {
        let v = &mut self.vms[i];
        if let Some(since) = v.waiting_since.take() {
            v.stats.max_wait_ns = v.stats.max_wait_ns.max(now - since);
        }
        if self.last_run != Some(v.id) {
            v.stats.switches += 1;
            self.last_run = Some(v.id);
        }
    }

    /// The next slice, or `None` when no VM has work (the GPU idles until one
    /// does).
    ///
    /// While a slice is open it is returned again; an open reserved slice whose VM
    /// now has work becomes a run slice (same start and end). Otherwise the
    /// eligible VM with the smallest pass is chosen (ties: the one picked least
    /// recently, then the lowest id): in best-effort mode among VMs with work, in
    /// the fixed modes among all VMs, a VM without work getting a
    /// [`SliceKind::Reserved`] slice.
    pub fn pick(&mut self, now_ns: u64) -> Option<Slice> {
        let now = self.observe(now_ns);
        if let Some(mut open) = self.open {
            if open.kind == SliceKind::Reserved && now < open.end_ns() {
                if let Some(i) = self.index(open.vm).filter(|&i| self.vms[i].runnable) {
                    open.kind = SliceKind::Run;
                    self.open = Some(open);
                    self.start_run(i, now);
                }
            }
            return Some(open);
        }
        if !self.vms.iter().any(|v| v.runnable) {
            return None;
        }
        let all = self.cfg.mode != Mode::BestEffort;
        let i = (0..self.vms.len())
            .filter(|&i| all || self.vms[i].runnable)
            .min_by_key(|&i| {
                let v = &self.vms[i];
                (v.pass, v.last_pick, v.id)
            })?;
        self.picks += 1;
        self.vtime = self.vtime.max(self.vms[i].pass);
        let v = &mut self.vms[i];
        v.last_pick = self.picks;
        v.stats.quanta_allocated += 1;
        v.stats.allocated_ns = v.stats.allocated_ns.saturating_add(v.quantum_ns);
        let slice = Slice {
            vm: v.id,
            kind: if v.runnable {
                SliceKind::Run
            } else {
                SliceKind::Reserved
            },
            start_ns: now,
            quantum_ns: v.quantum_ns,
        };
        if slice.kind == SliceKind::Run {
            self.start_run(i, now);
        }
        self.open = Some(slice);
        Some(slice)
    }

    /// The open slice, if any.
    pub fn open_slice(&self) -> Option<Slice> {
        self.open
    }

    /// Closes the open slice of `vm` at `now_ns`: it used `used_ns` of GPU time and
    /// completed `ops_completed` operations. Returns the time charged against the
    /// VM's share.
    ///
    /// `used_ns` is capped at the time since the slice began, not at the quantum:
    /// a slice that overran (its last batch was slower than it fit) is charged
    /// the overrun, so the VM's share of GPU time stays with its weight. A
    /// run slice is charged what it used (at least [`MIN_CHARGE_NS`]) in
    /// best-effort mode and its whole quantum (or what it used, if it overran) in the
    /// fixed modes; a reserved slice is charged its quantum and its `used_ns` and
    /// `ops_completed` are ignored.
    /// A VM still runnable after its slice starts waiting for the next one at
    /// `now_ns`.
    pub fn account(
        &mut self,
        vm: VmId,
        used_ns: u64,
        ops_completed: u64,
        now_ns: u64,
    ) -> Result<u64, SchedError> {
        let open = self.open.ok_or(SchedError::NoOpenSlice)?;
        if open.vm != vm {
            return Err(SchedError::NotOpenSlice {
                open: open.vm,
                got: vm,
            });
        }
        // `remove_vm` drops the open slice, so the VM exists.
        let i = self.index(vm).ok_or(SchedError::UnknownVm(vm))?;
        let now = self.observe(now_ns);
        let window_start = self.window_start_ns.unwrap_or(now);
        let best_effort = self.cfg.mode == Mode::BestEffort;
        let adaptive = self.cfg.adaptive;
        self.open = None;
        let v = &mut self.vms[i];
        let q = open.quantum_ns;
        let charge = match open.kind {
            SliceKind::Reserved => {
                v.stats.quanta_reserved += 1;
                v.stats.reserved_ns = v.stats.reserved_ns.saturating_add(q);
                q
            }
            SliceKind::Run => {
                // An overrun (a batch slower than its slice) is charged too, so the
                // shares of GPU time stay with the weights.
                let used = used_ns.min(now - open.start_ns);
                if used > 0 {
                    v.stats.quanta_used += 1;
                }
                v.stats.used_ns = v.stats.used_ns.saturating_add(used);
                v.stats.ops_completed = v.stats.ops_completed.saturating_add(ops_completed);
                // Only the part of the slice inside the window counts there, so the
                // window's utilizations sum to at most 1.
                v.window_used_ns += used.min(now - open.start_ns.max(window_start));
                if adaptive {
                    v.quantum_ns = adapt(q, used);
                    v.stats.quantum_ns = v.quantum_ns;
                }
                if v.runnable {
                    v.waiting_since = Some(now);
                }
                if best_effort {
                    used.max(MIN_CHARGE_NS)
                } else {
                    // The whole slot, and an overrun past it too: a VM whose batches
                    // overrun must not get more than its fixed share.
                    q.max(used)
                }
            }
        };
        v.stats.charged_ns = v.stats.charged_ns.saturating_add(charge);
        v.pass = v.pass.saturating_add(pass_step(charge, v.share));
        Ok(charge)
    }

    /// A VM's statistics.
    pub fn stats(&self, vm: VmId) -> Option<VmSchedStats> {
        self.index(vm).map(|i| self.vms[i].stats)
    }

    /// The scheduled VMs, in the order they were added.
    pub fn vm_ids(&self) -> impl Iterator<Item = VmId> + '_ {
        self.vms.iter().map(|v| v.id)
    }

    /// How many VMs are scheduled.
    pub fn vm_count(&self) -> usize {
        self.vms.len()
    }

    /// Starts a new utilization window at `now_ns`.
    pub fn begin_window(&mut self, now_ns: u64) {
        let now = now_ns.max(self.now_ns);
        self.now_ns = now;
        self.window_start_ns = Some(now);
        for v in &mut self.vms {
            v.window_used_ns = 0;
        }
    }

    fn window_elapsed(&self, now_ns: u64) -> u64 {
        let now = now_ns.max(self.now_ns);
        now - self.window_start_ns.unwrap_or(now)
    }

    /// `u_i`: the VM's used GPU time in the current window over the window's
    /// length at `now_ns`. The window starts at the first time the scheduler saw,
    /// or at the last [`begin_window`](Self::begin_window); open slices count once
    /// accounted.
    pub fn utilization(&self, vm: VmId, now_ns: u64) -> Option<Ratio> {
        let i = self.index(vm)?;
        Some(Ratio::new(
            self.vms[i].window_used_ns,
            self.window_elapsed(now_ns),
        ))
    }

    /// `U_gpu = Σ u_i` over the current window; at most 1, since slices do not
    /// overlap.
    pub fn gpu_utilization(&self, now_ns: u64) -> Ratio {
        let used = self
            .vms
            .iter()
            .fold(0u64, |a, v| a.saturating_add(v.window_used_ns));
        Ratio::new(used, self.window_elapsed(now_ns))
    }

    /// The VMs taking turns: those with work in best-effort mode, all in the fixed
    /// modes.
    fn rotation(&self) -> impl Iterator<Item = &VmState> + '_ {
        let all = self.cfg.mode != Mode::BestEffort;
        self.vms.iter().filter(move |v| all || v.runnable)
    }

    /// The seed's switch period `SP` for one round in which every VM in the
    /// rotation (with work in best-effort mode, all in the fixed modes) runs one
    /// slice of its current quantum, each preceded by a context switch of
    /// `switch_cost_ns`: `SP = Σ_k (TS_k + switch_cost)`.
    pub fn switch_period_ns(&self, switch_cost_ns: u64) -> u64 {
        self.rotation().fold(0u64, |a, v| {
            a.saturating_add(v.quantum_ns)
                .saturating_add(switch_cost_ns)
        })
    }

    /// The seed's `Throughput = Σ_k TS_k / SP` for the same round as
    /// [`switch_period_ns`](Self::switch_period_ns): the fraction of the period
    /// the GPU spends in slices rather than switching.
    pub fn throughput(&self, switch_cost_ns: u64) -> Ratio {
        let slices = self
            .rotation()
            .fold(0u64, |a, v| a.saturating_add(v.quantum_ns));
        Ratio::new(slices, self.switch_period_ns(switch_cost_ns))
    }

    /// Upper bound on the GPU time other VMs' slices take while `vm` waits for a
    /// slice: from the moment it becomes runnable, or ends a slice while still
    /// runnable, to the start of its next slice. `None` for an unknown VM.
    ///
    /// With `Q_k` the longest quantum VM `k` can have ([`MAX_QUANTUM_NS`] when
    /// adaptive, else its nominal quantum) and `s_k` its share:
    ///
    /// `W_i = Σ_{j ≠ i} (Q_j + ⌊Q_i · s_j / s_i⌋ + 1)`
    ///
    /// over all VMs now scheduled. A slice's length here is what it is charged (so
    /// a reserved slot counts in full). The first term is the seed's `TS_max`: each
    /// other VM may be mid-slice or may overshoot by one slice. The second is
    /// service the others may be owed because `vm` ran up to one quantum ahead of
    /// them just before it went idle; a VM cannot shed that debt by going idle,
    /// or it could take more than its share. The `+1` covers rounding. For two
    /// equal VMs this is `2·TS + 1`; for an interactive VM whose quantum adapted
    /// down, the second term shrinks with it.
    ///
    /// Proof sketch: every eligible VM's pass is at least the virtual time, and a
    /// waiting VM's pass exceeds it by at most `Q_i / s_i`; another VM `j` is only
    /// picked while its pass is at most `vm`'s, and each picked slice advances its
    /// pass by at least `charge / s_j`.
    pub fn max_wait_ns(&self, vm: VmId) -> Option<u64> {
        let i = self.index(vm)?;
        let me = &self.vms[i];
        let qi = u128::from(self.quantum_ceiling(me));
        let wait = self.vms.iter().filter(|v| v.id != vm).fold(0u64, |acc, v| {
            let owed = qi * u128::from(v.share) / u128::from(me.share.max(1));
            let owed = u64::try_from(owed).unwrap_or(u64::MAX);
            acc.saturating_add(self.quantum_ceiling(v))
                .saturating_add(owed)
                .saturating_add(1)
        });
        Some(wait)
    }

    /// `L_max = L_exec + W_i`: the worst-case time from `vm` getting work to that
    /// work completing, when it needs `l_exec_ns` of GPU time that fits in one of
    /// its slices, not counting context-switch overhead. See
    /// [`max_wait_ns`](Self::max_wait_ns).
    pub fn latency_bound_ns(&self, vm: VmId, l_exec_ns: u64) -> Option<u64> {
        self.max_wait_ns(vm).map(|w| w.saturating_add(l_exec_ns))
    }
}

/// The widest share error a share check accepts, per million: past it a bound says
/// nothing (the host simulation's tests assert theirs stays below).
pub const MAX_SHARE_ERROR_PPM: u64 = 50_000;

/// The stride-scheduling bound on how far a VM's measured share of the GPU time may
/// stray from its weight share over a window: `(Q_i + sum(Q) * w_i + 2 max(Q)) / T`,
/// per million, with `Q` the longest slice of each VM (the same unit as `window`),
/// `w_i` the VM's weight share (per million) and `T` the window. Not capped.
pub fn share_error_bound_ppm(
    q_vm: u64,
    q_sum: u64,
    q_max: u64,
    weight_share_ppm: u64,
    window: u64,
) -> u64 {
    let num = u128::from(q_vm) * 1_000_000
        + u128::from(q_sum) * u128::from(weight_share_ppm)
        + 2 * u128::from(q_max) * 1_000_000;
    u64::try_from(num / u128::from(window.max(1))).unwrap_or(u64::MAX)
}

/// Whether a measured share (per million) is within [`share_error_bound_ppm`] of the
/// weight share, with the bound capped at [`MAX_SHARE_ERROR_PPM`] so that slices
/// that overrun cannot widen their own tolerance. Returns (bound used, within).
pub fn share_within_bound(
    share_ppm: u64,
    weight_share_ppm: u64,
    q_vm: u64,
    q_sum: u64,
    q_max: u64,
    window: u64,
) -> (u64, bool) {
    let bound = share_error_bound_ppm(q_vm, q_sum, q_max, weight_share_ppm, window)
        .min(MAX_SHARE_ERROR_PPM);
    (bound, share_ppm.abs_diff(weight_share_ppm) <= bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;

    fn cfg(mode: Mode, base_ms: u64) -> SchedConfig {
        SchedConfig {
            mode,
            base_quantum_ns: base_ms * MS,
            adaptive: false,
        }
    }

    fn p(weight: u32, alpha_tenths: u8) -> VmParams {
        VmParams {
            weight,
            alpha_tenths,
        }
    }

    /// Runs `n` slices in which every run slice uses its whole quantum; returns
    /// the slices.
    fn run_full(s: &mut Scheduler, now: &mut u64, n: usize) -> Vec<Slice> {
        let mut out = Vec::new();
        for _ in 0..n {
            let Some(sl) = s.pick(*now) else { break };
            *now = sl.end_ns();
            let used = if sl.kind == SliceKind::Run {
                sl.quantum_ns
            } else {
                0
            };
            s.account(sl.vm, used, 1, *now).unwrap();
            out.push(sl);
        }
        out
    }

    #[test]
    fn config_and_params_are_validated() {
        for q in [0, MIN_QUANTUM_NS - 1, MAX_QUANTUM_NS + 1, u64::MAX] {
            let c = SchedConfig {
                base_quantum_ns: q,
                ..SchedConfig::default()
            };
            assert_eq!(
                c.validate(),
                Err(SchedError::QuantumOutOfRange { quantum_ns: q })
            );
            assert!(Scheduler::new(c).is_err());
        }
        for q in [MIN_QUANTUM_NS, MAX_QUANTUM_NS] {
            assert!(Scheduler::new(SchedConfig {
                base_quantum_ns: q,
                ..SchedConfig::default()
            })
            .is_ok());
        }
        let mut s = Scheduler::new(SchedConfig::default()).unwrap();
        assert_eq!(
            s.add_vm(1, p(0, 0)),
            Err(SchedError::WeightOutOfRange { weight: 0 })
        );
        assert_eq!(
            s.add_vm(1, p(MAX_WEIGHT + 1, 0)),
            Err(SchedError::WeightOutOfRange {
                weight: MAX_WEIGHT + 1
            })
        );
        assert_eq!(
            s.add_vm(1, p(1, 21)),
            Err(SchedError::AlphaOutOfRange { alpha_tenths: 21 })
        );
        s.add_vm(1, p(MAX_WEIGHT, MAX_ALPHA_TENTHS)).unwrap();
        assert_eq!(s.add_vm(1, p(1, 0)), Err(SchedError::DuplicateVm(1)));
        assert_eq!(s.set_runnable(9, true, 0), Err(SchedError::UnknownVm(9)));
        assert_eq!(s.set_params(9, p(1, 0)), Err(SchedError::UnknownVm(9)));
        for id in 2..=MAX_VMS as u16 {
            s.add_vm(id, p(1, 0)).unwrap();
        }
        assert_eq!(s.add_vm(999, p(1, 0)), Err(SchedError::TooManyVms));
    }

    #[test]
    fn boost_formula_is_exact_and_capped_for_slices_only() {
        assert_eq!(boosted_quantum_ns(2 * MS, 0), 2 * MS);
        assert_eq!(boosted_quantum_ns(2 * MS, 5), 3 * MS);
        assert_eq!(boosted_quantum_ns(2 * MS, 20), 6 * MS);
        assert_eq!(boosted_quantum_ns(3 * MS, 1), 3_300_000);
        assert_eq!(boosted_quantum_ns(5 * MS, 20), 15 * MS);
        // The slice is capped at 10 ms, the share (1 + 2 = 3x) is not.
        let mut s = Scheduler::new(cfg(Mode::BestEffort, 5)).unwrap();
        s.add_vm(1, p(1, 20)).unwrap();
        s.add_vm(2, p(1, 0)).unwrap();
        assert_eq!(s.stats(1).unwrap().quantum_ns, MAX_QUANTUM_NS);
        s.set_runnable(1, true, 0).unwrap();
        s.set_runnable(2, true, 0).unwrap();
        let mut now = 0;
        run_full(&mut s, &mut now, 400);
        let (a, b) = (s.stats(1).unwrap().used_ns, s.stats(2).unwrap().used_ns);
        let share = a as f64 / (a + b) as f64;
        assert!((share - 0.75).abs() < 0.01, "share {share}");
    }

    #[test]
    fn boost_doubles_share_and_quantum() {
        let mut s = Scheduler::new(cfg(Mode::BestEffort, 2)).unwrap();
        s.add_vm(1, p(1, 10)).unwrap();
        s.add_vm(2, p(1, 0)).unwrap();
        s.set_runnable(1, true, 0).unwrap();
        s.set_runnable(2, true, 0).unwrap();
        let mut now = 0;
        let slices = run_full(&mut s, &mut now, 300);
        assert!(slices
            .iter()
            .filter(|x| x.vm == 1)
            .all(|x| x.quantum_ns == 4 * MS));
        assert!(slices
            .iter()
            .filter(|x| x.vm == 2)
            .all(|x| x.quantum_ns == 2 * MS));
        let (a, b) = (s.stats(1).unwrap().used_ns, s.stats(2).unwrap().used_ns);
        assert!((a as f64 / (a + b) as f64 - 2.0 / 3.0).abs() < 0.01);
        // Round robin with a doubled slice: one slice each, alternating.
        assert!(slices.windows(2).all(|w| w[0].vm != w[1].vm));
    }

    #[test]
    fn best_effort_gives_idle_time_away_and_weights_shares() {
        let mut s = Scheduler::new(cfg(Mode::BestEffort, 2)).unwrap();
        s.add_vm(1, p(3, 0)).unwrap();
        s.add_vm(2, p(1, 0)).unwrap();
        assert_eq!(s.pick(0), None);
        s.set_runnable(1, true, 0).unwrap();
        let mut now = 0;
        let slices = run_full(&mut s, &mut now, 20);
        assert!(slices.iter().all(|x| x.vm == 1 && x.kind == SliceKind::Run));
        assert_eq!(s.stats(1).unwrap().switches, 1);
        assert_eq!(s.gpu_utilization(now), Ratio::new(now, now));
        // VM 2 gets work: it is not owed the time it was idle, and 3:1 follows.
        s.set_runnable(2, true, now).unwrap();
        s.begin_window(now);
        let start = now;
        let slices = run_full(&mut s, &mut now, 400);
        assert!(slices.iter().all(|x| x.kind == SliceKind::Run));
        let u1 = s.utilization(1, now).unwrap().as_f64();
        let u2 = s.utilization(2, now).unwrap().as_f64();
        assert!((u1 - 0.75).abs() < 0.01 && (u2 - 0.25).abs() < 0.01);
        assert_eq!(s.gpu_utilization(now), Ratio::new(now - start, now - start));
    }

    #[test]
    fn best_effort_charges_only_used_time() {
        let mut s = Scheduler::new(cfg(Mode::BestEffort, 4)).unwrap();
        s.add_vm(1, p(1, 0)).unwrap();
        s.add_vm(2, p(1, 0)).unwrap();
        s.set_runnable(1, true, 0).unwrap();
        s.set_runnable(2, true, 0).unwrap();
        let mut now = 0;
        for _ in 0..200 {
            let sl = s.pick(now).unwrap();
            // VM 1 is interactive (1 ms bursts), VM 2 saturates.
            let used = if sl.vm == 1 { MS } else { sl.quantum_ns };
            now += used;
            let charged = s.account(sl.vm, used, 1, now).unwrap();
            assert_eq!(charged, used);
        }
        let (a, b) = (s.stats(1).unwrap(), s.stats(2).unwrap());
        // Equal GPU time: VM 1 gets four slices for each of VM 2's.
        assert!(a.used_ns.abs_diff(b.used_ns) <= 4 * MS);
        assert!(a.quanta_allocated > 3 * b.quanta_allocated);
        // An empty slice is still charged, so a VM that makes no progress moves back.
        let sl = s.pick(now).unwrap();
        assert_eq!(s.account(sl.vm, 0, 0, now).unwrap(), MIN_CHARGE_NS);
    }

    #[test]
    fn equal_share_ignores_weights_and_holds_idle_slots() {
        let mut s = Scheduler::new(cfg(Mode::EqualShare, 2)).unwrap();
        s.add_vm(1, p(5, 20)).unwrap();
        s.add_vm(2, p(1, 0)).unwrap();
        s.set_runnable(1, true, 0).unwrap();
        let mut now = 0;
        let slices = run_full(&mut s, &mut now, 100);
        assert!(slices.iter().all(|x| x.quantum_ns == 2 * MS));
        let run = slices.iter().filter(|x| x.kind == SliceKind::Run).count();
        let reserved: Vec<_> = slices
            .iter()
            .filter(|x| x.kind == SliceKind::Reserved)
            .collect();
        assert_eq!(run, 50);
        assert_eq!(reserved.len(), 50);
        assert!(reserved.iter().all(|x| x.vm == 2));
        let st = s.stats(2).unwrap();
        assert_eq!(st.quanta_reserved, 50);
        assert_eq!(st.reserved_ns, 100 * MS);
        assert_eq!(st.used_ns, 0);
        // The GPU was busy half the time.
        assert_eq!(s.gpu_utilization(now).ppm(), 500_000);
        // Nothing runnable at all: idle, no reservations.
        s.set_runnable(1, false, now).unwrap();
        assert_eq!(s.pick(now), None);
    }

    #[test]
    fn fixed_share_follows_weights_and_charges_whole_slots() {
        let mut s = Scheduler::new(cfg(Mode::FixedShare, 2)).unwrap();
        s.add_vm(1, p(3, 0)).unwrap();
        s.add_vm(2, p(1, 0)).unwrap();
        s.set_runnable(1, true, 0).unwrap();
        let mut now = 0;
        for _ in 0..400 {
            let sl = s.pick(now).unwrap();
            // VM 1 finishes early, but is charged the whole slot.
            let (used, end) = match sl.kind {
                SliceKind::Run => (MS / 2, sl.start_ns + MS / 2),
                SliceKind::Reserved => (0, sl.end_ns()),
            };
            now = end;
            assert_eq!(s.account(sl.vm, used, 1, now).unwrap(), sl.quantum_ns);
        }
        let (a, b) = (s.stats(1).unwrap(), s.stats(2).unwrap());
        assert_eq!(a.quanta_allocated, 300);
        assert_eq!(b.quanta_allocated, 100);
        assert_eq!(b.quanta_reserved, 100);
    }

    #[test]
    fn the_share_bound_is_capped_so_overrunning_slices_cannot_widen_it() {
        // 4 VMs, 2 ms slices, a 6 s window: a bound of about 0.1 %.
        let (b, ok) = share_within_bound(66_000, 66_666, 2_000, 8_000, 2_000, 6_000_000);
        assert!(ok && b < 2_000, "{b}");
        // Slices of 300 ms: uncapped the bound would be 16 %, wide enough for a
        // starved VM (share 0 against 6.7 %) to pass; capped it fails.
        assert!(share_error_bound_ppm(300_000, 1_200_000, 300_000, 66_666, 6_000_000) > 150_000);
        let (b, ok) = share_within_bound(0, 66_666, 300_000, 1_200_000, 300_000, 6_000_000);
        assert_eq!(b, MAX_SHARE_ERROR_PPM);
        assert!(!ok);
        // No window (nothing measured) does not divide by zero.
        let _ = share_error_bound_ppm(1, 1, 1, 1, 0);
    }

    #[test]
    fn fixed_share_charges_an_overrun_so_shares_hold() {
        // Two saturating VMs of equal weight; VM 1's batches always overrun its 2 ms
        // slot to 6 ms. Charged only the slot, it would get 3/4 of the GPU time.
        let mut s = Scheduler::new(cfg(Mode::FixedShare, 2)).unwrap();
        s.add_vm(1, p(1, 0)).unwrap();
        s.add_vm(2, p(1, 0)).unwrap();
        s.set_runnable(1, true, 0).unwrap();
        s.set_runnable(2, true, 0).unwrap();
        let (mut now, mut time) = (0, [0u64; 2]);
        for _ in 0..400 {
            let sl = s.pick(now).unwrap();
            let used = if sl.vm == 1 {
                3 * sl.quantum_ns
            } else {
                sl.quantum_ns
            };
            now = sl.start_ns + used;
            time[usize::from(sl.vm - 1)] += used;
            assert_eq!(s.account(sl.vm, used, 1, now).unwrap(), used);
        }
        let share1 = time[0] * 1000 / (time[0] + time[1]);
        assert!((490..=510).contains(&share1), "VM 1 got {share1} per mille");
    }

    #[test]
    fn reserved_slot_turns_into_run_when_its_vm_gets_work() {
        let mut s = Scheduler::new(cfg(Mode::FixedShare, 4)).unwrap();
        s.add_vm(1, p(1, 0)).unwrap();
        s.add_vm(2, p(1, 0)).unwrap();
        s.set_runnable(2, true, 0).unwrap();
        // VM 1 was added first and wins the tie: its slot is held idle.
        let sl = s.pick(0).unwrap();
        assert_eq!((sl.vm, sl.kind), (1, SliceKind::Reserved));
        assert_eq!(s.pick(MS), Some(sl));
        s.set_runnable(1, true, MS).unwrap();
        let run = s.pick(MS).unwrap();
        assert_eq!(
            run,
            Slice {
                kind: SliceKind::Run,
                ..sl
            }
        );
        // Used time is capped at the time since the slot began.
        s.account(1, 10 * MS, 1, 3 * MS).unwrap();
        let st = s.stats(1).unwrap();
        assert_eq!(st.used_ns, 3 * MS);
        assert_eq!(st.quanta_reserved, 0);
        assert_eq!(st.switches, 1);
        assert_eq!(st.max_wait_ns, 0);
        // A reserved slot whose VM gets work only after it ended stays reserved.
        s.set_runnable(1, false, 3 * MS).unwrap();
        let sl = s.pick(3 * MS).unwrap();
        assert_eq!(sl.vm, 2);
        s.account(2, 4 * MS, 1, 7 * MS).unwrap();
        let sl = s.pick(7 * MS).unwrap();
        assert_eq!((sl.vm, sl.kind), (1, SliceKind::Reserved));
        s.set_runnable(1, true, 12 * MS).unwrap();
        assert_eq!(s.pick(12 * MS).unwrap().kind, SliceKind::Reserved);
        s.account(1, 0, 0, 12 * MS).unwrap();
        assert_eq!(s.stats(1).unwrap().quanta_reserved, 1);
    }

    #[test]
    fn slice_protocol_errors_and_open_slice() {
        let mut s = Scheduler::new(SchedConfig::default()).unwrap();
        s.add_vm(1, p(1, 0)).unwrap();
        s.add_vm(2, p(1, 0)).unwrap();
        assert_eq!(s.account(1, 0, 0, 0), Err(SchedError::NoOpenSlice));
        s.set_runnable(1, true, 0).unwrap();
        let sl = s.pick(0).unwrap();
        assert_eq!(s.open_slice(), Some(sl));
        s.set_runnable(2, true, 10).unwrap();
        assert_eq!(s.pick(100), Some(sl), "the open slice is returned again");
        assert_eq!(
            s.account(2, 0, 0, 100),
            Err(SchedError::NotOpenSlice { open: 1, got: 2 })
        );
        // Removing the VM drops its slice.
        assert!(s.remove_vm(1).is_some());
        assert_eq!(s.open_slice(), None);
        assert_eq!(s.remove_vm(1), None);
        assert_eq!(s.pick(200).unwrap().vm, 2);
        assert_eq!(s.vm_ids().collect::<Vec<_>>(), vec![2]);
        assert_eq!(s.vm_count(), 1);
    }

    #[test]
    fn time_going_backwards_is_clamped() {
        let mut s = Scheduler::new(SchedConfig::default()).unwrap();
        s.add_vm(1, p(1, 0)).unwrap();
        s.set_runnable(1, true, 5 * MS).unwrap();
        let sl = s.pick(MS).unwrap();
        assert_eq!(sl.start_ns, 5 * MS);
        s.account(1, 2 * MS, 1, 0).unwrap();
        assert_eq!(s.stats(1).unwrap().used_ns, 0);
        assert_eq!(s.gpu_utilization(0), Ratio::new(0, 0));
    }

    #[test]
    fn adaptive_quantum_shrinks_for_interactive_and_grows_for_saturating() {
        let mut s = Scheduler::new(SchedConfig {
            adaptive: true,
            base_quantum_ns: 4 * MS,
            ..SchedConfig::default()
        })
        .unwrap();
        s.add_vm(1, p(1, 0)).unwrap();
        s.add_vm(2, p(1, 0)).unwrap();
        s.set_runnable(1, true, 0).unwrap();
        s.set_runnable(2, true, 0).unwrap();
        let mut now = 0;
        let mut quanta = vec![];
        for _ in 0..300 {
            let sl = s.pick(now).unwrap();
            quanta.push(sl.quantum_ns);
            assert!((MIN_QUANTUM_NS..=MAX_QUANTUM_NS).contains(&sl.quantum_ns));
            let used = if sl.vm == 1 { 200_000 } else { sl.quantum_ns };
            now += used;
            s.account(sl.vm, used, 1, now).unwrap();
        }
        assert_eq!(s.stats(1).unwrap().quantum_ns, MIN_QUANTUM_NS);
        assert_eq!(s.stats(2).unwrap().quantum_ns, MAX_QUANTUM_NS);
        // 4 ms -> (4 + 0.2) / 2 = 2.1 ms for the interactive VM.
        assert_eq!(quanta[2], 2_100_000);
        // The interactive VM's own debt term in its wait bound is one 10 ms quantum
        // at most; with adaptation off it would be its nominal 4 ms.
        assert_eq!(s.max_wait_ns(1), Some(10 * MS + 10 * MS + 1));
        // Changing parameters restarts from the nominal quantum.
        s.set_params(2, p(2, 5)).unwrap();
        assert_eq!(s.stats(2).unwrap().quantum_ns, 6 * MS);
        assert_eq!(s.params(2), Some(p(2, 5)));
    }

    #[test]
    fn latency_bound_and_throughput_formulas() {
        let mut s = Scheduler::new(cfg(Mode::BestEffort, 2)).unwrap();
        s.add_vm(1, p(1, 0)).unwrap();
        s.add_vm(2, p(1, 0)).unwrap();
        // Two equal VMs: the other's slice plus one owed slice.
        assert_eq!(s.max_wait_ns(1), Some(4 * MS + 1));
        assert_eq!(s.latency_bound_ns(1, 300_000), Some(4 * MS + 1 + 300_000));
        assert_eq!(s.max_wait_ns(7), None);
        s.add_vm(3, p(2, 10)).unwrap();
        // VM 3: quantum 4 ms, share 40; VMs 1 and 2: quantum 2 ms, share 10.
        // W_1 = (2 + 2) + (4 + 2 * 40 / 10) ms + 2.
        assert_eq!(s.max_wait_ns(1), Some(16 * MS + 2));
        // W_3 = 2 * (2 + 4 * 10 / 40) ms + 2.
        assert_eq!(s.max_wait_ns(3), Some(6 * MS + 2));
        // Throughput = Σ TS / SP over VMs with work.
        assert_eq!(s.switch_period_ns(0), 0);
        s.set_runnable(1, true, 0).unwrap();
        s.set_runnable(3, true, 0).unwrap();
        assert_eq!(s.switch_period_ns(500_000), 7 * MS);
        assert_eq!(s.throughput(500_000), Ratio::new(6 * MS, 7 * MS));
        let fixed = {
            let mut f = Scheduler::new(cfg(Mode::EqualShare, 2)).unwrap();
            f.add_vm(1, p(1, 0)).unwrap();
            f.add_vm(2, p(1, 0)).unwrap();
            f
        };
        assert_eq!(fixed.switch_period_ns(0), 4 * MS);
    }

    #[test]
    fn wait_bound_is_reached_by_a_vm_that_ran_ahead() {
        // Two equal VMs: the seed's TS_max alone is not a bound. VM 1 runs a whole
        // slice and goes idle; VM 2 is then owed a slice, which it takes in two
        // runs while VM 1, runnable again, waits almost 2 slices.
        let q = 2 * MS;
        let mut s = Scheduler::new(cfg(Mode::BestEffort, 2)).unwrap();
        s.add_vm(1, p(1, 0)).unwrap();
        s.add_vm(2, p(1, 0)).unwrap();
        s.set_runnable(1, true, 0).unwrap();
        s.set_runnable(2, true, 0).unwrap();
        assert_eq!(s.pick(0).unwrap().vm, 1);
        s.account(1, q, 1, q).unwrap();
        s.set_runnable(1, false, q).unwrap();
        assert_eq!(s.pick(q).unwrap().vm, 2);
        s.set_runnable(1, true, q).unwrap();
        s.account(2, q - 1000, 1, 2 * q - 1000).unwrap();
        assert_eq!(s.pick(2 * q - 1000).unwrap().vm, 2);
        s.account(2, q, 1, 3 * q - 1000).unwrap();
        assert_eq!(s.pick(3 * q - 1000).unwrap().vm, 1);
        let waited = s.stats(1).unwrap().max_wait_ns;
        assert_eq!(waited, 2 * q - 1000);
        assert!(waited > q && waited <= s.max_wait_ns(1).unwrap());
    }

    /// One step of a random workload for the property tests.
    #[derive(Clone, Debug)]
    enum Step {
        /// Toggle a VM's work (index into the VM list).
        Toggle(usize),
        /// Run a slice using this fraction (in 1/8) of its quantum, then wait `gap` ns.
        Slice { eighths: u8, gap: u32 },
    }

    fn arb_step(n: usize) -> impl Strategy<Value = Step> {
        prop_oneof![
            1 => (0..n).prop_map(Step::Toggle),
            4 => (0u8..=8, 0u32..50_000).prop_map(|(eighths, gap)| Step::Slice { eighths, gap }),
        ]
    }

    fn arb_mode() -> impl Strategy<Value = Mode> {
        prop_oneof![
            Just(Mode::BestEffort),
            Just(Mode::EqualShare),
            Just(Mode::FixedShare)
        ]
    }

    fn arb_params() -> impl Strategy<Value = VmParams> {
        (1u32..=8, 0u8..=MAX_ALPHA_TENTHS).prop_map(|(w, a)| p(w, a))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// With every VM always busy and using whole quanta, each VM's charged time
        /// S_i tracks its share: |S_i·S − T·s_i| <= (Q_i + 2)·S + (ΣQ + 2n)·s_i, so
        /// its fraction of the GPU is within (Q_i + ΣQ·s_i/S + ε) / T of s_i/S
        /// after T ns (about 1% after 600 slices of 4 VMs here).
        #[test]
        fn shares_converge_to_weights(
            mode in arb_mode(),
            base_ms in 1u64..=10,
            adaptive in any::<bool>(),
            params in proptest::collection::vec(arb_params(), 2..5),
        ) {
            let mut s = Scheduler::new(SchedConfig { mode, base_quantum_ns: base_ms * MS, adaptive }).unwrap();
            for (i, p) in params.iter().enumerate() {
                s.add_vm(i as VmId, *p).unwrap();
                s.set_runnable(i as VmId, true, 0).unwrap();
            }
            let mut now = 0;
            let slices = run_full(&mut s, &mut now, 600);
            prop_assert_eq!(slices.len(), 600);
            let shares: Vec<u64> = s.vms.iter().map(|v| v.share).collect();
            let total_share: u64 = shares.iter().sum();
            let charged: Vec<u64> = s.vms.iter().map(|v| v.stats.charged_ns).collect();
            let total: u64 = charged.iter().sum();
            let ceilings: Vec<u64> = s.vms.iter().map(|v| s.quantum_ceiling(v)).collect();
            let sum_q: u64 = ceilings.iter().sum();
            let n = params.len() as u128;
            for i in 0..params.len() {
                let lhs = (u128::from(charged[i]) * u128::from(total_share))
                    .abs_diff(u128::from(total) * u128::from(shares[i]));
                let bound = u128::from(ceilings[i] + 2) * u128::from(total_share)
                    + (u128::from(sum_q) + 2 * n) * u128::from(shares[i]);
                prop_assert!(lhs <= bound, "vm {} off by {} > {}", i, lhs, bound);
                let frac = charged[i] as f64 / total as f64;
                let want = shares[i] as f64 / total_share as f64;
                let tol = (ceilings[i] as f64 + sum_q as f64 * want + 2.0 * n as f64) / total as f64;
                prop_assert!((frac - want).abs() <= tol + 1e-9);
            }
        }

        /// Under a random workload (VMs gaining and losing work, slices using any
        /// part of their quantum): no runnable VM waits longer than `max_wait_ns`
        /// (counted in charged time of other VMs' slices), quanta stay in
        /// 1..=10 ms, used time never exceeds a quantum, and U_gpu <= 1.
        #[test]
        fn no_starvation_and_invariants(
            mode in arb_mode(),
            base_ms in 1u64..=10,
            adaptive in any::<bool>(),
            params in proptest::collection::vec(arb_params(), 1..5),
            steps in proptest::collection::vec(arb_step(4), 1..400),
        ) {
            let mut s = Scheduler::new(SchedConfig { mode, base_quantum_ns: base_ms * MS, adaptive }).unwrap();
            let n = params.len();
            for (i, p) in params.iter().enumerate() {
                s.add_vm(i as VmId, *p).unwrap();
            }
            let bounds: Vec<u64> = (0..n).map(|i| s.max_wait_ns(i as VmId).unwrap()).collect();
            // Charged time of other VMs' slices while VM i waits.
            let mut waited: Vec<Option<u64>> = vec![None; n];
            let mut runnable = vec![false; n];
            let mut now = 0u64;
            for step in steps {
                match step {
                    Step::Toggle(i) => {
                        let i = i % n;
                        runnable[i] = !runnable[i];
                        s.set_runnable(i as VmId, runnable[i], now).unwrap();
                        waited[i] = if runnable[i] { Some(0) } else { None };
                    }
                    Step::Slice { eighths, gap } => {
                        let Some(sl) = s.pick(now) else {
                            prop_assert!(runnable.iter().all(|r| !r));
                            now += u64::from(gap);
                            continue;
                        };
                        prop_assert!(runnable.iter().any(|r| *r));
                        prop_assert!((MIN_QUANTUM_NS..=MAX_QUANTUM_NS).contains(&sl.quantum_ns));
                        let i = usize::from(sl.vm);
                        if sl.kind == SliceKind::Run {
                            prop_assert!(runnable[i]);
                            let w = waited[i].take().unwrap_or(0);
                            prop_assert!(w <= bounds[i], "vm {} waited {} > {}", i, w, bounds[i]);
                        } else {
                            prop_assert!(mode != Mode::BestEffort && !runnable[i]);
                        }
                        let used = sl.quantum_ns / 8 * u64::from(eighths);
                        now = sl.start_ns + if sl.kind == SliceKind::Run { used } else { sl.quantum_ns };
                        let charge = s.account(sl.vm, used, 1, now).unwrap();
                        prop_assert!(charge <= sl.quantum_ns);
                        for (j, w) in waited.iter_mut().enumerate() {
                            if j != i {
                                if let Some(w) = w {
                                    *w += charge;
                                }
                            }
                        }
                        if sl.kind == SliceKind::Run && runnable[i] {
                            waited[i] = Some(0);
                        }
                        now += u64::from(gap);
                    }
                }
                let u = s.gpu_utilization(now);
                prop_assert!(u.num <= u.den || u.den == 0);
            }
            let used: u64 = (0..n).map(|i| s.stats(i as VmId).unwrap().used_ns).sum();
            prop_assert!(used <= now);
            for i in 0..n {
                let st = s.stats(i as VmId).unwrap();
                prop_assert!(st.used_ns <= st.allocated_ns);
                prop_assert!(st.quanta_used + st.quanta_reserved <= st.quanta_allocated);
            }
        }
    }
}
