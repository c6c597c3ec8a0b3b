//! Performance counters: per VM and for the whole GPU.
//!
//! The seed asks the hypervisor to collect context switches, utilization and the
//! efficiency metric `E = ΣCompleted_operations / (ΣAllocated_quanta ·
//! Max_ops_per_quant)`; DESIGN adds quanta allocated and used, bytes copied and the
//! reasons commands were refused. The counters here are plain integers that the
//! mediator bumps as events happen; ratios are computed on demand as exact
//! [`Ratio`]s (no floating point in the kernel).
//!
//! Two outputs exist, both without serde:
//! - [`GlobalCounters::write_json`] renders everything as one compact JSON object into
//!   any [`core::fmt::Write`], which the hypervisor prints on the serial line at the
//!   end of a run (plots are made from it);
//! - `to_bytes` / `from_bytes` on [`VmCounters`] and [`GlobalCounters`] give a
//!   versioned little-endian encoding for snapshots. Each encoding states how many
//!   fields it carries, so a reader accepts encodings with fewer fields (the missing
//!   ones are zero) or more fields (the unknown ones are skipped); fields are only
//!   ever appended, and [`RejectReason`] indices never change.

use alloc::vec::Vec;
use core::fmt;

use crate::command::DecodeError;
use crate::memory::MemError;
use crate::sched::VmId;

pub use crate::ratio::Ratio;

/// Why the mediator refused a command (or a doorbell). Each reason has a fixed
/// [`index`](Self::index) into counter arrays and snapshots; new reasons are only
/// ever appended.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The command bytes did not decode (short, bad flags, too many entries).
    Decode = 0,
    /// A well-formed command of a type this device does not offer (3D, blob, unknown).
    Unsupported = 1,
    /// The virtqueue itself was malformed (bad index, descriptor chain loop or too
    /// long, bad indirect table, missing response buffer).
    Ring = 2,
    /// A guest address or length outside the VM's RAM, or overflowing: `V(i)` false.
    OutOfRange = 3,
    /// A guest address inside RAM that the VM does not own: `M(i)` false.
    NotOwned = 4,
    /// A resource id that is unknown to the VM, already used, or not in a state the
    /// command needs (e.g. no backing attached).
    BadResource = 5,
    /// A scanout id the VM was not given.
    BadScanout = 6,
    /// A parameter out of bounds: unknown format, zero or oversized dimensions,
    /// a rectangle or offset outside the resource or its backing.
    BadParameter = 7,
    /// A per-VM limit was hit: resource count, VRAM or backing quota.
    Quota = 8,
    /// A fence id the guest did not get from the mediator (forged completion).
    FenceForged = 9,
    /// A fence id that was already used (replay or non-monotonic id).
    FenceReplay = 10,
    /// A side-effecting command the VM is not permitted to issue.
    Permission = 11,
    /// The VM's staging queue was full; the doorbell was ignored (back-pressure).
    Backpressure = 12,
    /// The command was discarded because the VM's GPU channel was being reset.
    ChannelReset = 13,
    /// What the command needs does not fit in the VM's hypervisor memory budget.
    HvMemory = 14,
}

impl RejectReason {
    /// Number of reasons (length of per-reason counter arrays).
    pub const COUNT: usize = 15;

    /// Every reason, in index order.
    pub const ALL: [RejectReason; Self::COUNT] = [
        Self::Decode,
        Self::Unsupported,
        Self::Ring,
        Self::OutOfRange,
        Self::NotOwned,
        Self::BadResource,
        Self::BadScanout,
        Self::BadParameter,
        Self::Quota,
        Self::FenceForged,
        Self::FenceReplay,
        Self::Permission,
        Self::Backpressure,
        Self::ChannelReset,
        Self::HvMemory,
    ];

    /// The fixed index of this reason (`0..COUNT`).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The reason at `index`, if any.
    pub fn from_index(index: usize) -> Option<Self> {
        Self::ALL.get(index).copied()
    }

    /// A short snake_case name, used as the JSON key.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Decode => "decode",
            Self::Unsupported => "unsupported",
            Self::Ring => "ring",
            Self::OutOfRange => "out_of_range",
            Self::NotOwned => "not_owned",
            Self::BadResource => "bad_resource",
            Self::BadScanout => "bad_scanout",
            Self::BadParameter => "bad_parameter",
            Self::Quota => "quota",
            Self::FenceForged => "fence_forged",
            Self::FenceReplay => "fence_replay",
            Self::Permission => "permission",
            Self::Backpressure => "backpressure",
            Self::ChannelReset => "channel_reset",
            Self::HvMemory => "hv_memory",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<MemError> for RejectReason {
    fn from(e: MemError) -> Self {
        match e {
            MemError::Overflow | MemError::OutOfRange => Self::OutOfRange,
            MemError::NotOwned => Self::NotOwned,
        }
    }
}

impl From<DecodeError> for RejectReason {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::UnsupportedType(_) => Self::Unsupported,
            DecodeError::OutOfMemory => Self::HvMemory,
            _ => Self::Decode,
        }
    }
}

/// Why counter bytes did not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CountersError {
    /// The bytes end before the fields they announce.
    Truncated,
    /// An encoding version this code does not read.
    UnsupportedVersion(u8),
    /// Bytes are left over after the encoding.
    TrailingBytes,
    /// A VM appears twice, or the VM list is not in ascending id order.
    VmOrder(VmId),
}

impl fmt::Display for CountersError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("counter bytes truncated"),
            Self::UnsupportedVersion(v) => write!(f, "unsupported counter encoding version {v}"),
            Self::TrailingBytes => f.write_str("trailing bytes after counters"),
            Self::VmOrder(vm) => write!(f, "VM {vm} duplicated or out of order"),
        }
    }
}

/// Version of the byte encodings written by `to_bytes`.
pub const ENCODING_VERSION: u8 = 1;

/// Counters of one VM. All fields count up from zero and saturate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmCounters {
    /// Context switches onto the GPU for this VM.
    pub context_switches: u64,
    /// Time slices allocated to the VM (run or held idle for it).
    pub quanta_allocated: u64,
    /// Time slices in which the VM actually used the GPU.
    pub quanta_used: u64,
    /// GPU time allocated to the VM, in nanoseconds (the sum of its quanta).
    pub allocated_ns: u64,
    /// GPU time the VM used, in nanoseconds (the `u_i` numerator).
    pub used_ns: u64,
    /// Commands accepted and copied into the physical GPU ring.
    pub commands_submitted: u64,
    /// Operations (commands) the GPU completed for the VM.
    pub ops_completed: u64,
    /// Bytes copied on the VM's behalf (command staging and pixel transfers).
    pub bytes_copied: u64,
    /// Resets of the VM's GPU channel (isolation after a hang or fault).
    pub resets: u64,
    /// Doorbells (notifications) the VM rang.
    pub doorbells: u64,
    /// VM exits the hypervisor attributed to the VM's GPU traffic.
    pub vm_exits: u64,
    /// Virtual interrupts injected into the VM.
    pub interrupts_injected: u64,
    /// Hypervisor memory charged to the VM now, in bytes (a gauge; see
    /// [`crate::budget`]).
    pub hv_memory_used: u64,
    /// The most hypervisor memory charged to the VM at once, in bytes.
    pub hv_memory_peak: u64,
    /// The VM's hypervisor memory budget, in bytes.
    pub hv_memory_budget: u64,
    /// Commands refused, by [`RejectReason::index`].
    pub rejected: [u64; RejectReason::COUNT],
}

/// Number of scalar (non-array) fields of [`VmCounters`], in encoding order.
const VM_SCALARS: usize = 15;

/// JSON names of the scalar fields, in encoding order.
const VM_SCALAR_NAMES: [&str; VM_SCALARS] = [
    "context_switches",
    "quanta_allocated",
    "quanta_used",
    "allocated_ns",
    "used_ns",
    "commands_submitted",
    "ops_completed",
    "bytes_copied",
    "resets",
    "doorbells",
    "vm_exits",
    "interrupts_injected",
    "hv_memory_used",
    "hv_memory_peak",
    "hv_memory_budget",
];

/// Bytes of the header of an encoded [`VmCounters`].
const VM_HEADER: usize = 4;

impl VmCounters {
    /// Counts one refused command.
    pub fn reject(&mut self, reason: RejectReason) {
        let c = &mut self.rejected[reason.index()];
        *c = c.saturating_add(1);
    }

    /// Commands refused for `reason`.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()]
    }

    /// Commands refused for any reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// Records one time slice: `quantum_ns` allocated, `used_ns` of it used, `ops`
    /// operations completed in it, and whether starting it switched GPU contexts.
    pub fn record_slice(&mut self, quantum_ns: u64, used_ns: u64, ops: u64, switched: bool) {
        self.quanta_allocated = self.quanta_allocated.saturating_add(1);
        self.allocated_ns = self.allocated_ns.saturating_add(quantum_ns);
        if used_ns > 0 {
            self.quanta_used = self.quanta_used.saturating_add(1);
        }
        self.used_ns = self.used_ns.saturating_add(used_ns);
        self.ops_completed = self.ops_completed.saturating_add(ops);
        if switched {
            self.context_switches = self.context_switches.saturating_add(1);
        }
    }

    /// The VM's utilization `u_i = used_ns / elapsed_ns` over a window of
    /// `elapsed_ns`.
    pub fn utilization(&self, elapsed_ns: u64) -> Ratio {
        Ratio::new(self.used_ns, elapsed_ns)
    }

    /// The efficiency `E = ops_completed / (quanta_allocated · max_ops_per_quantum)`,
    /// where `max_ops_per_quantum` is what the GPU could complete in one quantum.
    pub fn efficiency(&self, max_ops_per_quantum: u64) -> Ratio {
        Ratio::new(
            self.ops_completed,
            self.quanta_allocated.saturating_mul(max_ops_per_quantum),
        )
    }

    /// Adds `other` into `self`, field by field (saturating).
    pub fn merge(&mut self, other: &VmCounters) {
        let mut mine = self.scalars();
        for (m, o) in mine.iter_mut().zip(other.scalars()) {
            *m = m.saturating_add(o);
        }
        self.set_scalars(&mine);
        for (m, o) in self.rejected.iter_mut().zip(other.rejected) {
            *m = m.saturating_add(o);
        }
    }

    fn scalars(&self) -> [u64; VM_SCALARS] {
        [
            self.context_switches,
            self.quanta_allocated,
            self.quanta_used,
            self.allocated_ns,
            self.used_ns,
            self.commands_submitted,
            self.ops_completed,
            self.bytes_copied,
            self.resets,
            self.doorbells,
            self.vm_exits,
            self.interrupts_injected,
            self.hv_memory_used,
            self.hv_memory_peak,
            self.hv_memory_budget,
        ]
    }

    fn set_scalars(&mut self, s: &[u64; VM_SCALARS]) {
        [
            self.context_switches,
            self.quanta_allocated,
            self.quanta_used,
            self.allocated_ns,
            self.used_ns,
            self.commands_submitted,
            self.ops_completed,
            self.bytes_copied,
            self.resets,
            self.doorbells,
            self.vm_exits,
            self.interrupts_injected,
            self.hv_memory_used,
            self.hv_memory_peak,
            self.hv_memory_budget,
        ] = *s;
    }

    /// Renders the counters as a compact JSON object: every scalar field under its
    /// name, `rejected` as an object keyed by [`RejectReason::as_str`] (all reasons,
    /// so the schema is fixed), `rejected_total`, and `util_ppm` / `efficiency_ppm`
    /// (see [`utilization`](Self::utilization) and [`efficiency`](Self::efficiency)).
    pub fn write_json<W: fmt::Write + ?Sized>(
        &self,
        out: &mut W,
        elapsed_ns: u64,
        max_ops_per_quantum: u64,
    ) -> fmt::Result {
        out.write_char('{')?;
        self.write_json_fields(out, elapsed_ns, max_ops_per_quantum)?;
        out.write_char('}')
    }

    fn write_json_fields<W: fmt::Write + ?Sized>(
        &self,
        out: &mut W,
        elapsed_ns: u64,
        max_ops_per_quantum: u64,
    ) -> fmt::Result {
        for (i, (name, v)) in VM_SCALAR_NAMES.iter().zip(self.scalars()).enumerate() {
            if i > 0 {
                out.write_char(',')?;
            }
            write!(out, "\"{name}\":{v}")?;
        }
        out.write_str(",\"rejected\":{")?;
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            if i > 0 {
                out.write_char(',')?;
            }
            write!(out, "\"{}\":{}", r.as_str(), self.rejected(*r))?;
        }
        write!(
            out,
            "}},\"rejected_total\":{},\"util_ppm\":{},\"efficiency_ppm\":{}",
            self.rejected_total(),
            self.utilization(elapsed_ns).ppm(),
            self.efficiency(max_ops_per_quantum).ppm()
        )
    }

    /// Appends the versioned encoding to `out`: version, scalar count, reason count,
    /// a zero byte, then each scalar and each reason counter as a little-endian u64.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[
            ENCODING_VERSION,
            VM_SCALARS as u8,
            RejectReason::COUNT as u8,
            0,
        ]);
        for v in self.scalars().iter().chain(self.rejected.iter()) {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// The versioned encoding (see [`encode_into`](Self::encode_into)).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(VM_HEADER + 8 * (VM_SCALARS + RejectReason::COUNT));
        self.encode_into(&mut out);
        out
    }

    /// Decodes exactly one encoding, as written by [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CountersError> {
        let mut r = Reader::new(bytes);
        let c = Self::decode_from(&mut r)?;
        r.finish()?;
        Ok(c)
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, CountersError> {
        let [version, n_scalars, n_reasons, _] = r.array::<4>()?;
        if version != ENCODING_VERSION {
            return Err(CountersError::UnsupportedVersion(version));
        }
        let mut scalars = [0u64; VM_SCALARS];
        for i in 0..usize::from(n_scalars) {
            let v = r.u64()?;
            if let Some(s) = scalars.get_mut(i) {
                *s = v;
            }
        }
        let mut c = VmCounters::default();
        c.set_scalars(&scalars);
        for i in 0..usize::from(n_reasons) {
            let v = r.u64()?;
            if let Some(s) = c.rejected.get_mut(i) {
                *s = v;
            }
        }
        Ok(c)
    }
}

/// Counters of the whole GPU: every live VM's [`VmCounters`], the sum of the
/// counters of VMs that were removed (so totals survive VM teardown), and events
/// that belong to no VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GlobalCounters {
    /// Live VMs in ascending id order.
    vms: Vec<(VmId, VmCounters)>,
    /// Sum over removed VMs.
    retired: VmCounters,
    /// Interrupts (MSI-X) taken from the physical GPU.
    pub device_interrupts: u64,
    /// Device interrupts that matched no VM (no pending completion).
    pub spurious_interrupts: u64,
    /// Resets of the whole physical GPU.
    pub device_resets: u64,
}

/// Number of global-only fields, in encoding order.
const GLOBAL_SCALARS: usize = 3;

/// JSON names of the global-only fields, in encoding order.
const GLOBAL_SCALAR_NAMES: [&str; GLOBAL_SCALARS] =
    ["device_interrupts", "spurious_interrupts", "device_resets"];

impl GlobalCounters {
    /// No VMs, all zero.
    pub fn new() -> Self {
        Self::default()
    }

    fn position(&self, vm: VmId) -> Result<usize, usize> {
        self.vms.binary_search_by_key(&vm, |(id, _)| *id)
    }

    /// The counters of a live VM.
    pub fn vm(&self, vm: VmId) -> Option<&VmCounters> {
        self.position(vm).ok().map(|i| &self.vms[i].1)
    }

    /// The counters of `vm`, created (zero) if the VM has none yet.
    pub fn vm_mut(&mut self, vm: VmId) -> &mut VmCounters {
        let i = match self.position(vm) {
            Ok(i) => i,
            Err(i) => {
                self.vms.insert(i, (vm, VmCounters::default()));
                i
            }
        };
        &mut self.vms[i].1
    }

    /// Removes a VM, folding its counters into the totals; returns them.
    pub fn remove_vm(&mut self, vm: VmId) -> Option<VmCounters> {
        let i = self.position(vm).ok()?;
        let (_, c) = self.vms.remove(i);
        self.retired.merge(&c);
        Some(c)
    }

    /// Live VMs and their counters, in ascending id order.
    pub fn vms(&self) -> impl Iterator<Item = (VmId, &VmCounters)> + '_ {
        self.vms.iter().map(|(id, c)| (*id, c))
    }

    /// The sum over every VM, live or removed.
    pub fn totals(&self) -> VmCounters {
        let mut t = self.retired;
        for (_, c) in &self.vms {
            t.merge(c);
        }
        t
    }

    /// `U_gpu = Σ u_i` over a window of `elapsed_ns`, as the ratio of GPU time used
    /// by all VMs to elapsed time. It is at most 1 when the used times come from
    /// non-overlapping slices inside the window.
    pub fn gpu_utilization(&self, elapsed_ns: u64) -> Ratio {
        self.totals().utilization(elapsed_ns)
    }

    /// The efficiency `E` over all VMs (see [`VmCounters::efficiency`]).
    pub fn efficiency(&self, max_ops_per_quantum: u64) -> Ratio {
        self.totals().efficiency(max_ops_per_quantum)
    }

    fn scalars(&self) -> [u64; GLOBAL_SCALARS] {
        [
            self.device_interrupts,
            self.spurious_interrupts,
            self.device_resets,
        ]
    }

    /// Renders everything as one compact JSON object:
    /// `{"elapsed_ns":..,"max_ops_per_quantum":..,"gpu_util_ppm":..,
    /// "efficiency_ppm":..,"device_interrupts":..,"spurious_interrupts":..,
    /// "device_resets":..,"total":{..},"vms":[{"vm":id,..},..]}`, where `total` and
    /// each VM object have the fields of [`VmCounters::write_json`]. Utilizations are
    /// over `elapsed_ns`; efficiencies use `max_ops_per_quantum`.
    pub fn write_json<W: fmt::Write + ?Sized>(
        &self,
        out: &mut W,
        elapsed_ns: u64,
        max_ops_per_quantum: u64,
    ) -> fmt::Result {
        let totals = self.totals();
        write!(
            out,
            "{{\"elapsed_ns\":{elapsed_ns},\"max_ops_per_quantum\":{max_ops_per_quantum},\
             \"gpu_util_ppm\":{},\"efficiency_ppm\":{}",
            totals.utilization(elapsed_ns).ppm(),
            totals.efficiency(max_ops_per_quantum).ppm()
        )?;
        for (name, v) in GLOBAL_SCALAR_NAMES.iter().zip(self.scalars()) {
            write!(out, ",\"{name}\":{v}")?;
        }
        out.write_str(",\"total\":")?;
        totals.write_json(out, elapsed_ns, max_ops_per_quantum)?;
        out.write_str(",\"vms\":[")?;
        for (i, (id, c)) in self.vms().enumerate() {
            if i > 0 {
                out.write_char(',')?;
            }
            write!(out, "{{\"vm\":{id},")?;
            c.write_json_fields(out, elapsed_ns, max_ops_per_quantum)?;
            out.write_char('}')?;
        }
        out.write_str("]}")
    }

    /// The versioned encoding: version, global field count, two zero bytes, the
    /// global fields (u64 each), the removed VMs' sum as a [`VmCounters`] encoding,
    /// the live VM count (u32), then per VM its id (u16) and its counters'
    /// encoding. All little endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&[ENCODING_VERSION, GLOBAL_SCALARS as u8, 0, 0]);
        for v in self.scalars() {
            out.extend_from_slice(&v.to_le_bytes());
        }
        self.retired.encode_into(&mut out);
        // Live VMs are distinct u16 ids, so the count fits in u32.
        out.extend_from_slice(&(self.vms.len() as u32).to_le_bytes());
        for (id, c) in &self.vms {
            out.extend_from_slice(&id.to_le_bytes());
            c.encode_into(&mut out);
        }
        out
    }

    /// Decodes exactly one encoding written by [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CountersError> {
        let mut r = Reader::new(bytes);
        let [version, n_scalars, _, _] = r.array::<4>()?;
        if version != ENCODING_VERSION {
            return Err(CountersError::UnsupportedVersion(version));
        }
        let mut scalars = [0u64; GLOBAL_SCALARS];
        for i in 0..usize::from(n_scalars) {
            let v = r.u64()?;
            if let Some(s) = scalars.get_mut(i) {
                *s = v;
            }
        }
        let retired = VmCounters::decode_from(&mut r)?;
        let count = r.u32()?;
        // Each VM takes at least its id and a counters header: refuse counts the
        // remaining bytes cannot hold before allocating for them.
        if (count as usize).saturating_mul(2 + VM_HEADER) > r.remaining() {
            return Err(CountersError::Truncated);
        }
        let mut vms: Vec<(VmId, VmCounters)> = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let id = u16::from_le_bytes(r.array::<2>()?);
            if vms.last().is_some_and(|(prev, _)| *prev >= id) {
                return Err(CountersError::VmOrder(id));
            }
            vms.push((id, VmCounters::decode_from(&mut r)?));
        }
        r.finish()?;
        let [device_interrupts, spurious_interrupts, device_resets] = scalars;
        Ok(Self {
            vms,
            retired,
            device_interrupts,
            spurious_interrupts,
            device_resets,
        })
    }
}

/// A cursor over encoded bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CountersError> {
        let end = self.pos.checked_add(N).ok_or(CountersError::Truncated)?;
        let a = self
            .bytes
            .get(self.pos..end)
            .and_then(|s| s.try_into().ok())
            .ok_or(CountersError::Truncated)?;
        self.pos = end;
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, CountersError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, CountersError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn finish(&self) -> Result<(), CountersError> {
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err(CountersError::TrailingBytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec;
    use proptest::prelude::*;

    fn sample() -> VmCounters {
        let mut c = VmCounters::default();
        c.record_slice(2_000_000, 1_500_000, 30, true);
        c.record_slice(2_000_000, 0, 0, false);
        c.commands_submitted = 31;
        c.bytes_copied = 4096;
        c.doorbells = 5;
        c.vm_exits = 7;
        c.interrupts_injected = 3;
        c.resets = 1;
        c.reject(RejectReason::Decode);
        c.reject(RejectReason::FenceReplay);
        c.reject(RejectReason::FenceReplay);
        c
    }

    #[test]
    fn reasons_have_fixed_distinct_indices_and_names() {
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(RejectReason::from_index(i), Some(*r));
            for other in &RejectReason::ALL[i + 1..] {
                assert_ne!(r.as_str(), other.as_str());
            }
        }
        assert_eq!(RejectReason::from_index(RejectReason::COUNT), None);
        assert_eq!(RejectReason::Backpressure.index(), 12);
        assert_eq!(
            RejectReason::from(MemError::Overflow),
            RejectReason::OutOfRange
        );
        assert_eq!(
            RejectReason::from(MemError::NotOwned),
            RejectReason::NotOwned
        );
        assert_eq!(
            RejectReason::from(DecodeError::UnsupportedType(0x200)),
            RejectReason::Unsupported
        );
        assert_eq!(
            RejectReason::from(DecodeError::ShortHeader),
            RejectReason::Decode
        );
    }

    #[test]
    fn slices_rejections_and_ratios() {
        let c = sample();
        assert_eq!(c.quanta_allocated, 2);
        assert_eq!(c.quanta_used, 1);
        assert_eq!(c.allocated_ns, 4_000_000);
        assert_eq!(c.used_ns, 1_500_000);
        assert_eq!(c.context_switches, 1);
        assert_eq!(c.rejected(RejectReason::FenceReplay), 2);
        assert_eq!(c.rejected_total(), 3);
        // E = 30 / (2 quanta * 100 ops per quantum) = 0.15.
        assert_eq!(c.efficiency(100), Ratio::new(30, 200));
        assert_eq!(c.efficiency(100).ppm(), 150_000);
        assert_eq!(c.utilization(3_000_000).ppm(), 500_000);
        assert_eq!(Ratio::new(5, 0).ppm(), 0);
        assert_eq!(Ratio::new(1, 4).as_f64(), 0.25);
        assert_eq!(Ratio::new(u64::MAX, 1).ppm(), u64::MAX);
    }

    #[test]
    fn totals_survive_vm_removal() {
        let mut g = GlobalCounters::new();
        *g.vm_mut(3) = sample();
        g.vm_mut(1).record_slice(1_000_000, 1_000_000, 10, true);
        assert_eq!(g.vms().map(|(id, _)| id).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(g.totals().ops_completed, 40);
        assert_eq!(g.remove_vm(3), Some(sample()));
        assert_eq!(g.remove_vm(3), None);
        assert!(g.vm(3).is_none());
        assert_eq!(g.totals().ops_completed, 40);
        assert_eq!(g.totals().quanta_allocated, 3);
        // U_gpu = (1.5 ms + 1 ms) / 5 ms.
        assert_eq!(g.gpu_utilization(5_000_000).ppm(), 500_000);
        assert_eq!(g.efficiency(10), Ratio::new(40, 30));
    }

    #[test]
    fn json_is_compact_and_complete() {
        let mut g = GlobalCounters::new();
        *g.vm_mut(2) = sample();
        g.device_interrupts = 9;
        let mut s = String::new();
        g.write_json(&mut s, 3_000_000, 100).unwrap();
        assert!(!s.contains(' ') && !s.contains('\n'));
        assert!(s.starts_with("{\"elapsed_ns\":3000000,\"max_ops_per_quantum\":100,"));
        assert!(s.contains("\"gpu_util_ppm\":500000,\"efficiency_ppm\":150000"));
        assert!(s.contains("\"device_interrupts\":9,"));
        assert!(s.contains("\"vms\":[{\"vm\":2,\"context_switches\":1,"));
        assert!(s.contains("\"fence_replay\":2,"));
        assert!(s.contains("\"channel_reset\":0,\"hv_memory\":0},\"rejected_total\":3,"));
        assert!(s.contains("\"hv_memory_used\":0,\"hv_memory_peak\":0,\"hv_memory_budget\":0,"));
        assert!(s.ends_with("\"efficiency_ppm\":150000}]}"));
        // Braces and brackets balance (no strings contain them).
        let depth = s.chars().fold(0i32, |d, ch| match ch {
            '{' | '[' => d + 1,
            '}' | ']' => d - 1,
            _ => d,
        });
        assert_eq!(depth, 0);
        let mut one = String::new();
        sample().write_json(&mut one, 0, 0).unwrap();
        assert!(one.starts_with("{\"context_switches\":1,"));
        assert!(one.ends_with("\"util_ppm\":0,\"efficiency_ppm\":0}"));
    }

    #[test]
    fn bytes_round_trip_and_reject_damage() {
        let c = sample();
        let b = c.to_bytes();
        assert_eq!(b.len(), 4 + 8 * (VM_SCALARS + RejectReason::COUNT));
        assert_eq!(VmCounters::from_bytes(&b), Ok(c));
        assert_eq!(
            VmCounters::from_bytes(&b[..b.len() - 1]),
            Err(CountersError::Truncated)
        );
        let mut long = b.clone();
        long.push(0);
        assert_eq!(
            VmCounters::from_bytes(&long),
            Err(CountersError::TrailingBytes)
        );
        let mut v2 = b.clone();
        v2[0] = 2;
        assert_eq!(
            VmCounters::from_bytes(&v2),
            Err(CountersError::UnsupportedVersion(2))
        );

        let mut g = GlobalCounters::new();
        *g.vm_mut(7) = c;
        g.vm_mut(1).doorbells = 4;
        g.vm_mut(9).doorbells = 1;
        g.remove_vm(9);
        g.device_resets = 2;
        let gb = g.to_bytes();
        assert_eq!(GlobalCounters::from_bytes(&gb), Ok(g.clone()));
        assert_eq!(
            GlobalCounters::from_bytes(&gb[..gb.len() - 3]),
            Err(CountersError::Truncated)
        );
        // A huge VM count is refused before anything is allocated for it.
        let count_at = 4 + 8 * GLOBAL_SCALARS + b.len();
        let mut huge = gb.clone();
        huge[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            GlobalCounters::from_bytes(&huge),
            Err(CountersError::Truncated)
        );
        // VMs must be in ascending order.
        let mut swapped = GlobalCounters::new();
        swapped.vm_mut(1);
        swapped.vm_mut(2);
        let mut sb = swapped.to_bytes();
        let first_id = count_at + 4;
        let second_id = first_id + 2 + b.len();
        sb[first_id] = 2;
        sb[second_id] = 1;
        assert_eq!(
            GlobalCounters::from_bytes(&sb),
            Err(CountersError::VmOrder(1))
        );
    }

    #[test]
    fn older_and_newer_encodings_are_read() {
        let c = sample();
        // An older writer with 2 scalars and 1 reason: the rest read as zero.
        let mut old = vec![ENCODING_VERSION, 2, 1, 0];
        for v in [c.context_switches, c.quanta_allocated, 99] {
            old.extend_from_slice(&v.to_le_bytes());
        }
        let d = VmCounters::from_bytes(&old).unwrap();
        assert_eq!(d.context_switches, 1);
        assert_eq!(d.quanta_allocated, 2);
        assert_eq!(d.rejected(RejectReason::Decode), 99);
        assert_eq!(d.used_ns, 0);
        // A newer writer with one more scalar and one more reason: extras skipped.
        let mut new = vec![
            ENCODING_VERSION,
            VM_SCALARS as u8 + 1,
            RejectReason::COUNT as u8 + 1,
            0,
        ];
        for v in c.scalars().iter().chain([77].iter()) {
            new.extend_from_slice(&v.to_le_bytes());
        }
        for v in c.rejected.iter().chain([88].iter()) {
            new.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(VmCounters::from_bytes(&new), Ok(c));
    }

    fn arb_vm() -> impl Strategy<Value = VmCounters> {
        (
            proptest::array::uniform15(any::<u64>()),
            proptest::array::uniform15(any::<u64>()),
        )
            .prop_map(|(s, rejected)| {
                let mut c = VmCounters {
                    rejected,
                    ..VmCounters::default()
                };
                c.set_scalars(&s);
                c
            })
    }

    proptest! {
        #[test]
        fn global_round_trips(
            vms in proptest::collection::btree_map(any::<u16>(), arb_vm(), 0..6),
            retired in arb_vm(),
            g3 in proptest::array::uniform3(any::<u64>()),
        ) {
            let g = GlobalCounters {
                vms: vms.into_iter().collect(),
                retired,
                device_interrupts: g3[0],
                spurious_interrupts: g3[1],
                device_resets: g3[2],
            };
            prop_assert_eq!(GlobalCounters::from_bytes(&g.to_bytes()), Ok(g.clone()));
            let mut s = String::new();
            prop_assert!(g.write_json(&mut s, 1, 1).is_ok());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = GlobalCounters::from_bytes(&bytes);
            let _ = VmCounters::from_bytes(&bytes);
        }
    }
}
