//! The GPU dispatcher: which VM's validated commands go to the GPU, when, and how
//! many at a time; and what comes back. The one loop the kernel runs over the
//! physical GPU and the host simulation runs over the simulated one, so what the
//! tests prove is what runs.
//!
//! It owns the [`Mediator`] (guest rings in, host commands out), the [`Scheduler`]
//! (whose time slice it is), the [`Grants`] (what the GPU may reach) and a [`Gpu`]
//! (the device's ring). It is driven from outside with the time: guest work
//! ([`doorbell`](Dispatcher::doorbell), [`poll`](Dispatcher::poll)), and the
//! bottom half ([`service`](Dispatcher::service)) that harvests completions, runs
//! the watchdog and lets the scheduler pick the next batch.
//!
//! - One batch of one VM is on the GPU at a time; the next is taken when it has
//!   completed. A batch is sized to the time left in the slice, by the GPU's cost
//!   bound per command when it has one (the simulated GPU) and otherwise by the
//!   VM's measured GPU time per command, and to the room on the ring.
//! - A command the ring refuses goes back to the mediator with the rest of its
//!   batch, to be sent again later. It is never answered as failed: the device did
//!   not run it, and an `UNREF` taken as done would free a host id the device still
//!   uses, for another VM's `CREATE` to get.
//! - A batch still out long after its slice ended is parked: tracked until it
//!   completes or the watchdog resets its VM, while the GPU goes on with the others.
//! - Slices are closed when their time is up, their VM has nothing left, or not even
//!   one more command fits; the scheduler is charged the wall time the slice held
//!   the GPU. A reserved slot (fixed-share and equal-share modes) stays idle until
//!   it ends or its VM gets work.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use crate::command::Command;
use crate::grants::Grants;
use crate::mediator::{
    Batch, Completion, HostCommand, IommuOp, Mediator, MediatorError, QueueId, ResetReport,
};
use crate::memory::{Gpa, GuestMemory, Hpa, MemError};
use crate::sched::{Scheduler, Slice, SliceKind, VmId};

/// The device's side: a ring that takes host commands and gives back completions.
pub trait Gpu {
    /// Why the ring refused a command.
    type Error: Copy + core::fmt::Debug;
    /// Free slots on `queue`'s ring now.
    fn free_slots(&self, queue: QueueId) -> usize;
    /// Puts `cmd` (of `vm`) on its queue's ring; `token` comes back with its
    /// completion. Not visible to the device before [`publish`](Self::publish).
    fn submit(&mut self, vm: VmId, cmd: &HostCommand, token: u64) -> Result<(), Self::Error>;
    /// Makes what was submitted visible to the device.
    fn publish(&mut self) {}
    /// Appends `(token, response type)` of the commands completed since the last call.
    fn poll(&mut self, out: &mut Vec<(u64, u32)>);
    /// An upper bound of the GPU time `cmd` takes, for a GPU with a cost model;
    /// `None` sizes batches by measured time instead.
    fn cost_bound_ns(&self, _cmd: &Command) -> Option<u64> {
        None
    }
    /// GPU time a switch to another VM's work costs (in a batch's size budget).
    fn switch_ns(&self) -> u64 {
        0
    }
    /// Fault injection for tests: whether the completion of `vm`'s next command
    /// (after `completed` of its commands) is lost.
    fn withhold_completion(&mut self, _vm: VmId, _completed: u64) -> bool {
        false
    }
}

/// Each VM's memory, for the mediator's reads and its writes of responses.
pub trait Memories {
    /// `vm`'s memory, `None` for a VM that is gone.
    fn memory(&mut self, vm: VmId) -> Option<&mut dyn GuestMemory>;
}

impl<M: GuestMemory> Memories for BTreeMap<VmId, M> {
    fn memory(&mut self, vm: VmId) -> Option<&mut dyn GuestMemory> {
        self.get_mut(&vm).map(|m| m as &mut dyn GuestMemory)
    }
}

/// The memory of a VM that is gone: nothing is reachable. The completions of its
/// last commands still reach the mediator (a reset VM's host ids go back only with
/// them); its context is reset, so no guest is answered.
struct NoMemory;

impl GuestMemory for NoMemory {
    fn translate(&self, _: Gpa, _: u64) -> Result<Hpa, MemError> {
        Err(MemError::OutOfRange)
    }
    fn read(&self, _: Gpa, _: &mut [u8]) -> Result<(), MemError> {
        Err(MemError::OutOfRange)
    }
    fn write(&mut self, _: Gpa, _: &[u8]) -> Result<(), MemError> {
        Err(MemError::OutOfRange)
    }
}

/// Limits of the dispatcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DispatchConfig {
    /// Most commands in one batch.
    pub max_batch: usize,
    /// How long past its slice a batch may stay out before it is parked.
    pub overdue_ns: u64,
    /// First guess of one command's GPU time, before any was measured.
    pub first_cost_ns: u64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            overdue_ns: 100_000_000,
            first_cost_ns: 100_000,
        }
    }
}

/// What the dispatcher measured for one VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    /// Host commands submitted to the GPU.
    pub commands: u64,
    /// Commands completed by the GPU.
    pub completed: u64,
    /// Batches submitted.
    pub batches: u64,
    /// Virtual interrupts raised (after coalescing).
    pub interrupts: u64,
    /// Sum over batches of the wait from the first take of commands off the guest's
    /// ring (doorbell or poll) since the previous batch to this batch's submission,
    /// in microseconds; commands a batch leaves staged keep that start time for the
    /// next one. Not from the guest's publication, which the hypervisor does not see.
    pub take_to_submit_us: u64,
    /// Batches in [`Figures::take_to_submit_us`].
    pub take_to_submit_samples: u64,
    /// GPU time of its batches (submission to last completion), in microseconds.
    pub gpu_busy_us: u64,
    /// Longest GPU time one of its slices took, in microseconds.
    pub max_slice_us: u64,
    /// Slices closed, and those whose GPU time exceeded their quantum (a command
    /// already on the GPU runs to its end).
    pub slices: u64,
    /// See [`Figures::slices`].
    pub overruns: u64,
}

/// What happened, for the log and the measurements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DispatchEvent<E> {
    /// A slice ended.
    SliceClosed {
        /// Whose.
        vm: VmId,
        /// The slice.
        slice: Slice,
        /// Wall time it held the GPU (charged), 0 for a reserved slot.
        used_ns: u64,
        /// GPU time of its batches.
        busy_ns: u64,
        /// Commands completed in it.
        ops: u64,
        /// Whether the GPU switched to this VM in it.
        switched: bool,
    },
    /// A batch out long after its slice ended was parked.
    Parked {
        /// Whose.
        vm: VmId,
        /// Time on the GPU so far.
        on_gpu_ns: u64,
        /// Commands not completed.
        outstanding: usize,
    },
    /// The ring refused a command: it and the rest of its batch went back.
    Refused {
        /// Whose.
        vm: VmId,
        /// Commands given back to the mediator.
        requeued: usize,
        /// The ring's reason.
        error: E,
    },
    /// The watchdog found the VM's channel hung: it was reset.
    HungReset {
        /// Whose.
        vm: VmId,
        /// Guest commands dropped.
        dropped: usize,
    },
    /// A removed VM's cleanup (blanking, host resources released) ran on the GPU.
    CleanupRan {
        /// Whose.
        vm: VmId,
    },
}

/// Why a zero-copy buffer was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferError {
    /// Empty, unaligned, or larger than [`MAX_BUFFER_BYTES`].
    BadRange,
    /// Not the VM's RAM.
    NotOwned(MemError),
    /// The VM holds [`MAX_BUFFERS_PER_VM`] already.
    TooMany,
    /// Over the VM's hypervisor memory budget (or no such VM).
    Mediator(MediatorError),
}

/// Most bytes one registered buffer may span.
pub const MAX_BUFFER_BYTES: u64 = 64 << 20;
/// Most buffers one VM may hold registered.
pub const MAX_BUFFERS_PER_VM: usize = 64;

/// A registered zero-copy buffer.
#[derive(Clone, Copy, Debug)]
struct Buffer {
    hpa: Hpa,
    len: u64,
    /// Hypervisor memory charged to the VM for its records.
    charge: u64,
}

/// A batch on the GPU.
#[derive(Debug)]
struct Flight {
    vm: VmId,
    /// `(token, host fence)` of its commands on the GPU.
    tokens: Vec<(u64, u64)>,
    outstanding: usize,
    /// Commands submitted.
    commands: usize,
    completions: Vec<Completion>,
    submitted_ns: u64,
}

/// The open slice and what it did so far.
#[derive(Clone, Copy, Debug)]
struct OpenSlice {
    slice: Slice,
    busy_ns: u64,
    ops: u64,
    batches: u64,
    switched: bool,
}

/// What one [`Dispatcher::service`] did.
#[derive(Clone, Debug, Default)]
pub struct Serviced {
    /// Completions came back.
    pub harvested: bool,
    /// A batch went to the GPU.
    pub submitted: bool,
    /// VMs the watchdog found hung (their channel was reset).
    pub hung: Vec<VmId>,
}

/// The dispatcher over GPU `G`.
pub struct Dispatcher<G: Gpu> {
    mediator: Mediator,
    sched: Scheduler,
    gpu: G,
    grants: Grants,
    cfg: DispatchConfig,
    slice: Option<OpenSlice>,
    in_flight: Option<Flight>,
    parked: Vec<Flight>,
    next_token: u64,
    /// The VM whose work the GPU ran last.
    gpu_ctx: Option<VmId>,
    /// Per VM: measured GPU time per command (moving average).
    cost_per_cmd_ns: BTreeMap<VmId, u64>,
    figures: BTreeMap<VmId, Figures>,
    /// Per VM: when commands not yet submitted were first taken from its ring.
    taken_at: BTreeMap<VmId, u64>,
    buffers: BTreeMap<(VmId, u64), Buffer>,
    next_handle: u64,
    /// VMs removed whose cleanup has not run yet.
    removed: BTreeSet<VmId>,
    events: Vec<DispatchEvent<G::Error>>,
}

impl<G: Gpu> Dispatcher<G> {
    /// A dispatcher of `mediator`'s commands onto `gpu`, scheduled by `sched`.
    pub fn new(mediator: Mediator, sched: Scheduler, gpu: G, cfg: DispatchConfig) -> Self {
        Self {
            mediator,
            sched,
            gpu,
            grants: Grants::new(),
            cfg,
            slice: None,
            in_flight: None,
            parked: Vec::new(),
            next_token: 1,
            gpu_ctx: None,
            cost_per_cmd_ns: BTreeMap::new(),
            figures: BTreeMap::new(),
            taken_at: BTreeMap::new(),
            buffers: BTreeMap::new(),
            next_handle: 1,
            removed: BTreeSet::new(),
            events: Vec::new(),
        }
    }

    /// The mediator.
    pub fn mediator(&self) -> &Mediator {
        &self.mediator
    }
    /// The mediator, for the calls that need no scheduling (queue set-up, vectors,
    /// counters); follow a call that may grant or revoke with
    /// [`sync_grants`](Self::sync_grants).
    pub fn mediator_mut(&mut self) -> &mut Mediator {
        &mut self.mediator
    }
    /// The scheduler.
    pub fn sched(&self) -> &Scheduler {
        &self.sched
    }
    /// The scheduler, e.g. to add a VM or begin a measurement window.
    pub fn sched_mut(&mut self) -> &mut Scheduler {
        &mut self.sched
    }
    /// The GPU.
    pub fn gpu(&self) -> &G {
        &self.gpu
    }
    /// The GPU.
    pub fn gpu_mut(&mut self) -> &mut G {
        &mut self.gpu
    }
    /// What the GPU may reach.
    pub fn grants(&self) -> &Grants {
        &self.grants
    }
    /// What the GPU may reach, to take the changes for the IOMMU.
    pub fn grants_mut(&mut self) -> &mut Grants {
        &mut self.grants
    }
    /// The open slice.
    pub fn open_slice(&self) -> Option<Slice> {
        self.slice.map(|o| o.slice)
    }
    /// `vm`'s figures.
    pub fn figures(&self, vm: VmId) -> Option<Figures> {
        self.figures.get(&vm).copied()
    }
    /// Every VM's figures.
    pub fn all_figures(&self) -> impl Iterator<Item = (VmId, &Figures)> {
        self.figures.iter().map(|(v, f)| (*v, f))
    }
    /// Starts a new measurement of every VM's longest slice.
    pub fn reset_longest_slices(&mut self) {
        for f in self.figures.values_mut() {
            f.max_slice_us = 0;
        }
    }
    /// Whether a batch is on the GPU (in flight or parked).
    pub fn busy(&self) -> bool {
        self.in_flight.is_some() || !self.parked.is_empty()
    }
    /// When the dispatcher must run again with nothing else happening: the end of
    /// a reserved slot, or when the batch on the GPU becomes overdue.
    pub fn next_deadline(&self) -> Option<u64> {
        let overdue = self
            .in_flight
            .as_ref()
            .map(|f| f.submitted_ns + self.quantum() + self.cfg.overdue_ns + 1);
        let slot = self
            .slice
            .filter(|o| o.slice.kind == SliceKind::Reserved)
            .map(|o| o.slice.end_ns());
        overdue.into_iter().chain(slot).min()
    }
    /// The events since the last call.
    pub fn take_events(&mut self) -> Vec<DispatchEvent<G::Error>> {
        core::mem::take(&mut self.events)
    }
    /// The virtual interrupts to raise, `(vm, MSI-X entry)`, counted in the figures.
    pub fn take_interrupts(&mut self) -> Vec<(VmId, u16)> {
        let irqs = self.mediator.take_interrupts();
        for &(vm, _) in &irqs {
            self.figure(vm).interrupts += 1;
        }
        irqs
    }

    fn figure(&mut self, vm: VmId) -> &mut Figures {
        self.figures.entry(vm).or_default()
    }

    fn quantum(&self) -> u64 {
        self.slice.map_or(0, |o| o.slice.quantum_ns)
    }

    /// Applies the mediator's grant changes to the grant model.
    pub fn sync_grants(&mut self) {
        for op in self.mediator.take_iommu_ops() {
            match op {
                IommuOp::Map { vm, hpa, len } => self.grants.grant(vm, hpa, len),
                IommuOp::Unmap { vm, hpa, len } => self.grants.revoke(vm, hpa, len),
            }
        }
    }

    fn revoke_all(&mut self, vm: VmId, r: &ResetReport) {
        for &(hpa, len) in &r.unmapped {
            self.grants.revoke(vm, hpa, len);
        }
    }

    /// After the mediator took guest work of `vm` at `now`: what it staged makes the
    /// VM runnable.
    pub fn guest_work(&mut self, vm: VmId, now: u64) {
        if self.mediator.vm(vm).is_some_and(|v| v.staged_len() > 0) {
            self.taken_at.entry(vm).or_insert(now);
            let _ = self.sched.set_runnable(vm, true, now);
        }
        self.sync_grants();
    }

    /// `vm` notified `queue`: its new chains are validated and staged.
    pub fn doorbell(&mut self, vm: VmId, queue: QueueId, mem: &mut dyn GuestMemory, now: u64) {
        let _ = self.mediator.process_doorbell(vm, queue, mem);
        self.guest_work(vm, now);
    }

    /// `vm`'s queues are polled (it runs, or has room again).
    pub fn poll(&mut self, vm: VmId, mem: &mut dyn GuestMemory, now: u64) {
        if self
            .mediator
            .vm(vm)
            .is_some_and(|v| v.state() == crate::mediator::VmState::Active)
        {
            let _ = self.mediator.poll(vm, mem);
        }
        self.guest_work(vm, now);
    }

    /// The driver of `vm` reset its device: its cleanup is scheduled now.
    pub fn driver_reset(&mut self, vm: VmId, now: u64) -> Result<ResetReport, MediatorError> {
        let r = self.mediator.driver_reset(vm)?;
        self.revoke_all(vm, &r);
        self.guest_work(vm, now);
        Ok(r)
    }

    /// `vm` is gone (or its channel is torn down): its buffers are unregistered,
    /// its channel reset, and it stays on the schedule until its cleanup ran.
    pub fn remove_vm(&mut self, vm: VmId, now: u64) -> Result<ResetReport, MediatorError> {
        let handles: Vec<(VmId, u64)> = self
            .buffers
            .keys()
            .filter(|(v, _)| *v == vm)
            .copied()
            .collect();
        for key in handles {
            if let Some(b) = self.buffers.remove(&key) {
                self.grants.revoke(vm, b.hpa, b.len);
                self.mediator.release(vm, b.charge);
            }
        }
        let r = self.mediator.reset_vm(vm)?;
        self.revoke_all(vm, &r);
        self.removed.insert(vm);
        self.after_reset(vm, now);
        Ok(r)
    }

    /// A reset VM's cleanup is staged: it stays on the schedule until that ran.
    fn after_reset(&mut self, vm: VmId, now: u64) {
        let staged = self.mediator.vm(vm).is_some_and(|v| v.staged_len() > 0);
        let _ = self.sched.set_runnable(vm, staged, now);
        self.sync_grants();
    }

    /// Zero-copy buffer exchange: `vm` names a page-aligned range of its RAM; after
    /// the validity and ownership checks it is granted to the GPU until
    /// unregistered or the VM goes. Returns its handle.
    pub fn register_buffer(
        &mut self,
        vm: VmId,
        mem: &dyn GuestMemory,
        gpa: Gpa,
        len: u64,
    ) -> Result<u64, BufferError> {
        if len == 0
            || len > MAX_BUFFER_BYTES
            || !gpa.get().is_multiple_of(4096)
            || !len.is_multiple_of(4096)
        {
            return Err(BufferError::BadRange);
        }
        let hpa = mem.translate(gpa, len).map_err(BufferError::NotOwned)?;
        if self.buffers.keys().filter(|(v, _)| *v == vm).count() >= MAX_BUFFERS_PER_VM {
            return Err(BufferError::TooMany);
        }
        // The buffer's record and a grant record per page come out of its budget.
        let charge = crate::budget::cost::BUFFER
            + crate::budget::cost::PAGE * crate::budget::cost::pages(hpa.get(), len);
        self.mediator
            .charge(vm, charge)
            .map_err(BufferError::Mediator)?;
        let handle = self.next_handle;
        self.next_handle += 1;
        self.buffers
            .insert((vm, handle), Buffer { hpa, len, charge });
        self.grants.grant(vm, hpa, len);
        Ok(handle)
    }

    /// Unregisters buffer `handle` of `vm`; returns its host address, `None` when
    /// `vm` has no such buffer.
    pub fn unregister_buffer(&mut self, vm: VmId, handle: u64) -> Option<Hpa> {
        let b = self.buffers.remove(&(vm, handle))?;
        self.grants.revoke(vm, b.hpa, b.len);
        self.mediator.release(vm, b.charge);
        Some(b.hpa)
    }

    /// The bottom half at `now`: completions go back to the guests (as they come,
    /// not once the whole batch is done: a streaming guest refills its queue while
    /// the rest runs), the watchdog runs, and the next batch goes to the GPU.
    pub fn service(&mut self, mems: &mut dyn Memories, now: u64) -> Serviced {
        let mut out = Serviced::default();
        let mut done = Vec::new();
        self.gpu.poll(&mut done);
        out.harvested = !done.is_empty();
        for (token, status) in done {
            let flight = match self.in_flight.as_mut() {
                Some(f) if f.tokens.iter().any(|t| t.0 == token) => Some(f),
                _ => self
                    .parked
                    .iter_mut()
                    .find(|f| f.tokens.iter().any(|t| t.0 == token)),
            };
            let Some(f) = flight else { continue };
            let Some(i) = f.tokens.iter().position(|t| t.0 == token) else {
                continue;
            };
            let vm = f.vm;
            let completed = self.figures.get(&vm).map_or(0, |g| g.completed);
            if self.gpu.withhold_completion(vm, completed) {
                continue;
            }
            let (_, host_fence) = f.tokens.swap_remove(i);
            f.completions.push(Completion { host_fence, status });
            f.outstanding = f.outstanding.saturating_sub(1);
        }
        if let Some(f) = self.in_flight.as_mut() {
            if !f.completions.is_empty() {
                let vm = f.vm;
                let completions = core::mem::take(&mut f.completions);
                if let Some(o) = self.slice.as_mut() {
                    o.ops += completions.len() as u64;
                }
                self.complete(vm, &completions, mems);
            }
        }
        // Overdue batches that came back after all: their VM's guest gets its answers.
        let mut parked = core::mem::take(&mut self.parked);
        for f in parked.iter_mut() {
            if !f.completions.is_empty() {
                let completions = core::mem::take(&mut f.completions);
                self.complete(f.vm, &completions, mems);
            }
        }
        parked.retain(|f| f.outstanding > 0);
        parked.append(&mut self.parked);
        self.parked = parked;
        if self.in_flight.as_ref().is_some_and(|f| f.outstanding == 0) {
            if let Some(f) = self.in_flight.take() {
                self.landed(&f, now);
            }
        }
        out.hung = self.mediator.tick(now);
        for &vm in &out.hung {
            // Its batch will never complete: the GPU is free for the others, and a
            // late completion finds no token.
            // Its time on the GPU counts for the slice, not as a measured cost per
            // command (the watchdog's wait would make its next batches one command).
            if self.in_flight.as_ref().is_some_and(|f| f.vm == vm) {
                if let Some(f) = self.in_flight.take() {
                    if let Some(o) = self.slice.as_mut() {
                        o.busy_ns += now.saturating_sub(f.submitted_ns);
                    }
                }
            }
            self.parked.retain(|f| f.vm != vm);
            if let Ok(r) = self.mediator.reset_vm(vm) {
                self.revoke_all(vm, &r);
                self.events.push(DispatchEvent::HungReset {
                    vm,
                    dropped: r.dropped,
                });
            }
            self.after_reset(vm, now);
        }
        self.sync_grants();
        let before = self.next_token;
        self.schedule(now);
        out.submitted = self.next_token != before;
        out
    }

    fn complete(&mut self, vm: VmId, completions: &[Completion], mems: &mut dyn Memories) {
        self.figure(vm).completed += completions.len() as u64;
        let _ = match mems.memory(vm) {
            Some(mem) => self.mediator.complete_batch(vm, completions, mem),
            None => self.mediator.complete_batch(vm, completions, &mut NoMemory),
        };
    }

    /// The batch `f` is off the GPU at `now`: its time is measured.
    fn landed(&mut self, f: &Flight, now: u64) {
        let busy = now.saturating_sub(f.submitted_ns);
        if let Some(o) = self.slice.as_mut() {
            o.busy_ns += busy;
        }
        self.figure(f.vm).gpu_busy_us += busy / 1000;
        if f.commands > 0 {
            let sample = busy / f.commands as u64;
            let avg = self.cost_per_cmd_ns.entry(f.vm).or_insert(sample);
            *avg = (*avg * 3 + sample) / 4;
        }
    }

    /// Lets the scheduler choose and sends the next batch, if the GPU is free.
    pub fn schedule(&mut self, now: u64) {
        // Each round closes a slice or returns; the bound guards against a
        // scheduler that keeps handing out slices nobody can use.
        for _ in 0..(2 * self.sched.vm_count() + 4) {
            if !self.schedule_once(now) {
                return;
            }
        }
    }

    /// One step of [`schedule`](Self::schedule); true when a slice was closed and
    /// the next one should be tried.
    fn schedule_once(&mut self, now: u64) -> bool {
        if let Some(f) = self.in_flight.as_ref() {
            if now.saturating_sub(f.submitted_ns) <= self.quantum() + self.cfg.overdue_ns {
                return false;
            }
            if let Some(f) = self.in_flight.take() {
                self.events.push(DispatchEvent::Parked {
                    vm: f.vm,
                    on_gpu_ns: now.saturating_sub(f.submitted_ns),
                    outstanding: f.outstanding,
                });
                if let Some(o) = self.slice.as_mut() {
                    o.busy_ns += now.saturating_sub(f.submitted_ns);
                }
                self.parked.push(f);
            }
        }
        // Whose slice: the open one (a reserved slot turns into a run slice when its
        // VM got work), else a new one.
        let sl = match self.sched.pick(now) {
            Some(sl) => sl,
            None => return false,
        };
        match &mut self.slice {
            Some(o) if o.slice.start_ns == sl.start_ns && o.slice.vm == sl.vm => o.slice = sl,
            _ => {
                self.slice = Some(OpenSlice {
                    slice: sl,
                    busy_ns: 0,
                    ops: 0,
                    batches: 0,
                    switched: false,
                })
            }
        }
        if sl.kind == SliceKind::Reserved {
            // Nobody else gets the slot of a VM without work until it ends.
            if now >= sl.end_ns() {
                self.close_slice(now);
                return true;
            }
            return false;
        }
        let vm = sl.vm;
        // A VM whose batch is parked cannot send another until it comes back.
        let parked = self.parked.iter().any(|f| f.vm == vm);
        let more = !parked && self.mediator.vm(vm).is_some_and(|v| v.staged_len() > 0);
        let left = sl.end_ns().saturating_sub(now);
        let fresh = self.slice.is_some_and(|o| o.batches == 0);
        let fit = if more && left > 0 {
            self.fit(vm, left, fresh)
        } else {
            0
        };
        if fit == 0 {
            self.close_slice(now);
            return true;
        }
        let room = self.ring_room(vm, fit);
        if room == 0 {
            // The ring is full: wait for it to drain.
            return false;
        }
        match self.mediator.take_batch(vm, room) {
            Some(batch) => {
                self.submit(batch, now);
                false
            }
            None => {
                self.close_slice(now);
                true
            }
        }
    }

    /// How many of `vm`'s staged commands fit in `left` ns of GPU time (at least
    /// one in a fresh slice).
    fn fit(&self, vm: VmId, left: u64, fresh: bool) -> usize {
        let Some(v) = self.mediator.vm(vm) else {
            return 0;
        };
        let measured = self
            .cost_per_cmd_ns
            .get(&vm)
            .copied()
            .unwrap_or(self.cfg.first_cost_ns)
            .max(1);
        let mut total = if self.gpu_ctx == Some(vm) {
            0
        } else {
            self.gpu.switch_ns()
        };
        let mut k = 0;
        for c in v.staged().take(self.cfg.max_batch) {
            let cost = self.gpu.cost_bound_ns(&c.request.cmd).unwrap_or(measured);
            total = total.saturating_add(cost);
            if total > left {
                break;
            }
            k += 1;
        }
        if k == 0 && fresh && v.staged_len() > 0 {
            1
        } else {
            k
        }
    }

    /// How many of `vm`'s staged commands, in order and at most `max`, the ring can
    /// take now (each queue has its own free slots).
    fn ring_room(&self, vm: VmId, max: usize) -> usize {
        let mut free = QueueId::ALL.map(|q| self.gpu.free_slots(q));
        let Some(v) = self.mediator.vm(vm) else {
            return 0;
        };
        v.staged()
            .take(max)
            .take_while(|c| match free[c.queue.index()].checked_sub(1) {
                Some(n) => {
                    free[c.queue.index()] = n;
                    true
                }
                None => false,
            })
            .count()
    }

    fn close_slice(&mut self, now: u64) {
        let Some(o) = self.slice.take() else { return };
        let vm = o.slice.vm;
        let (used, ops, switched) = match o.slice.kind {
            SliceKind::Reserved => (0, 0, false),
            SliceKind::Run => (now.saturating_sub(o.slice.start_ns), o.ops, o.switched),
        };
        // The slice is the scheduler's open one: this cannot fail.
        let _ = self.sched.account(vm, used, ops, now);
        self.mediator.counters_mut().vm_mut(vm).record_slice(
            o.slice.quantum_ns,
            used,
            ops,
            switched,
        );
        if o.slice.kind == SliceKind::Run {
            let parked = self.parked.iter().any(|f| f.vm == vm);
            let more = !parked && self.mediator.vm(vm).is_some_and(|v| v.staged_len() > 0);
            let _ = self.sched.set_runnable(vm, more, now);
            let quantum = o.slice.quantum_ns;
            let f = self.figure(vm);
            f.max_slice_us = f.max_slice_us.max(o.busy_ns / 1000);
            f.slices += 1;
            if o.busy_ns > quantum {
                f.overruns += 1;
            }
            if !more && !parked && self.removed.remove(&vm) {
                self.events.push(DispatchEvent::CleanupRan { vm });
            }
        }
        self.events.push(DispatchEvent::SliceClosed {
            vm,
            slice: o.slice,
            used_ns: used,
            busy_ns: o.busy_ns,
            ops,
            switched,
        });
    }

    fn submit(&mut self, batch: Batch, now: u64) {
        let vm = batch.vm;
        let mut f = Flight {
            vm,
            tokens: Vec::with_capacity(batch.commands.len()),
            outstanding: 0,
            commands: 0,
            completions: Vec::new(),
            submitted_ns: now,
        };
        if self.gpu_ctx != Some(vm) {
            self.gpu_ctx = Some(vm);
            if let Some(o) = self.slice.as_mut() {
                o.switched = true;
            }
        }
        let mut commands = batch.commands.into_iter();
        while let Some(c) = commands.next() {
            let token = self.next_token;
            self.next_token += 1;
            if let Err(error) = self.gpu.submit(vm, &c, token) {
                // The device never saw this command nor the rest of the batch: back
                // to the mediator, in order, to be taken again; nothing of them is
                // completed, signalled or freed meanwhile.
                let mut back = alloc::vec![c];
                back.extend(commands);
                let requeued = back.len();
                let _ = self.mediator.requeue(vm, back);
                self.events.push(DispatchEvent::Refused {
                    vm,
                    requeued,
                    error,
                });
                break;
            }
            f.tokens.push((token, c.host_fence));
            f.outstanding += 1;
            f.commands += 1;
        }
        if f.outstanding == 0 {
            return;
        }
        let n = f.outstanding as u64;
        let staged_left = self.mediator.vm(vm).is_some_and(|v| v.staged_len() > 0);
        let taken = self.taken_at.remove(&vm);
        let fig = self.figure(vm);
        fig.batches += 1;
        fig.commands += n;
        if let Some(t) = taken {
            fig.take_to_submit_us += now.saturating_sub(t) / 1000;
            fig.take_to_submit_samples += 1;
            // Commands left staged were taken no later than the next take.
            if staged_left {
                self.taken_at.insert(vm, t);
            }
        }
        if let Some(o) = self.slice.as_mut() {
            o.batches += 1;
        }
        self.gpu.publish();
        self.in_flight = Some(f);
    }
}

#[cfg(test)]
mod tests;
