//! Test harness: guests that drive the mediator through real split virtqueues in
//! their own memory, the way Linux's virtio-gpu driver does, and a host that runs
//! the staged batches on a GPU model and feeds the completions back.
//!
//! The host's view of memory goes through an IOMMU model built only from what the
//! mediator reported ([`IommuOp`]s and reset reports), so a GPU access to a page the
//! mediator did not map fails the test.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use std::cell::RefCell;

use crate::command::{self, Command, Request, Response};
use crate::memory::{Gpa, GuestMemory, Hpa, MemError, VecMemory};
use crate::ring::driver::DriverQueue;
use crate::ring::QueueLayout;
use crate::sched::VmId;
use crate::sim_gpu::{CostModel, SimGpu, SimGpuConfig};
use crate::wire::{self, CtrlHdr, MemEntry, Rect};

use super::{
    Completion, CompletionReport, HostCommand, IommuOp, Mediator, MediatorConfig, QueueId,
    ResetReport, ScanoutConfig, VmGpuConfig,
};

/// Guest RAM per VM.
pub const RAM: usize = 8 << 20;
/// Where command buffers, indirect tables and response buffers are carved from.
const SCRATCH: Gpa = Gpa::new(0x1_0000);
const SCRATCH_END: Gpa = Gpa::new(0x10_0000);
/// Where tests put framebuffers and other backing.
pub const FB: Gpa = Gpa::new(0x10_0000);
/// Host-physical base of VM `i`'s RAM (distinct, far apart).
pub fn host_base(i: usize) -> Hpa {
    Hpa::new((i as u64 + 1) << 32)
}
/// Where guest-physical `gpa` of VM `i`'s RAM (which starts at GPA 0) lies on the
/// host: the translation the tests expect, written out.
pub fn host_addr(i: usize, gpa: Gpa) -> Hpa {
    host_base(i).offset(gpa.get())
}
/// MSI-X vectors the harness programs: config, control, cursor.
pub const VECTORS: [u16; 3] = [0, 1, 2];

/// The control queue layout of every harness guest (64 entries, as Linux).
pub fn control_layout(event_idx: bool) -> QueueLayout {
    QueueLayout {
        size: 64,
        desc: Gpa::new(0x1000),
        avail: Gpa::new(0x1400),
        used: Gpa::new(0x1600),
        event_idx,
        indirect: true,
    }
}

/// The cursor queue layout (16 entries).
pub fn cursor_layout(event_idx: bool) -> QueueLayout {
    QueueLayout {
        size: 16,
        desc: Gpa::new(0x2000),
        avail: Gpa::new(0x2100),
        used: Gpa::new(0x2200),
        event_idx,
        indirect: true,
    }
}

/// A guest: its RAM and the driver side of its two queues.
#[derive(Clone, Debug)]
pub struct Guest {
    /// VM id.
    pub vm: VmId,
    /// Its RAM.
    pub mem: VecMemory,
    /// Control queue, driver side.
    pub ctrl: DriverQueue,
    /// Cursor queue, driver side.
    pub cursor: DriverQueue,
    next: Gpa,
    /// Response buffer of each chain in flight, by (queue, head).
    waiting: BTreeMap<(usize, u16), (Gpa, u32)>,
}

/// A returned chain: head, bytes written, and the response decoded (control).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Returned {
    /// Head.
    pub head: u16,
    /// Bytes the device wrote.
    pub written: u32,
    /// The response, when one was written.
    pub resp: Option<(CtrlHdr, Response)>,
}

impl Guest {
    /// A guest with zeroed RAM at GPA 0 and fresh queues.
    pub fn new(vm: VmId, host: Hpa, event_idx: bool) -> Self {
        let mut mem = VecMemory::new(Gpa::new(0), host, RAM);
        let ctrl = DriverQueue::new(&mut mem, control_layout(event_idx)).unwrap();
        let cursor = DriverQueue::new(&mut mem, cursor_layout(event_idx)).unwrap();
        Self {
            vm,
            mem,
            ctrl,
            cursor,
            next: SCRATCH,
            waiting: BTreeMap::new(),
        }
    }

    /// Re-initialises both queues (after a device reset).
    pub fn reinit_queues(&mut self, event_idx: bool) {
        self.ctrl = DriverQueue::new(&mut self.mem, control_layout(event_idx)).unwrap();
        self.cursor = DriverQueue::new(&mut self.mem, cursor_layout(event_idx)).unwrap();
        self.waiting.clear();
    }

    fn alloc(&mut self, len: u64) -> Gpa {
        let len = len.div_ceil(64) * 64;
        if self.next.offset(len) > SCRATCH_END {
            self.next = SCRATCH;
        }
        let at = self.next;
        self.next = at.offset(len);
        at
    }

    /// The guest's memory and the driver side of queue `q`, borrowed together.
    fn split(&mut self, q: QueueId) -> (&mut VecMemory, &mut DriverQueue) {
        match q {
            QueueId::Control => (&mut self.mem, &mut self.ctrl),
            QueueId::Cursor => (&mut self.mem, &mut self.cursor),
        }
    }

    /// Adds a chain whose readable buffers hold `parts` and, on the control queue,
    /// with a writable buffer of `resp_len` bytes, all through one indirect
    /// descriptor as Linux does; on the cursor queue one direct readable buffer.
    pub fn add_raw(&mut self, q: QueueId, parts: &[&[u8]], resp_len: u32) -> u16 {
        let mut readable = Vec::new();
        for p in parts {
            let at = self.alloc(p.len() as u64);
            self.mem.write(at, p).unwrap();
            readable.push((at, p.len() as u32));
        }
        let (writable, table) = match q {
            QueueId::Control => {
                let resp = self.alloc(u64::from(resp_len));
                self.mem
                    .write(resp, &vec![0xee; resp_len as usize])
                    .unwrap();
                let table = self.alloc(16 * (readable.len() as u64 + 1));
                (vec![(resp, resp_len)], Some(table))
            }
            QueueId::Cursor => (Vec::new(), None),
        };
        let (mem, dq) = self.split(q);
        let head = dq.add(mem, &readable, &writable, table).unwrap();
        if let Some(&(resp, len)) = writable.first() {
            self.waiting.insert((q.index(), head), (resp, len));
        }
        head
    }

    /// Adds `req` in the shape Linux uses: one readable buffer, except
    /// `ATTACH_BACKING` (header, then the entry array), plus a response buffer
    /// sized for the command (1056 for EDID, 408 for display info, else 24).
    pub fn add(&mut self, q: QueueId, req: &Request) -> u16 {
        let mut bytes = Vec::new();
        command::encode(req, &mut bytes);
        let resp_len = match req.cmd {
            Command::GetEdid { .. } => wire::size::RESP_EDID,
            Command::GetDisplayInfo => wire::size::RESP_DISPLAY_INFO,
            _ => wire::size::RESP_NODATA,
        } as u32;
        if let Command::ResourceAttachBacking { .. } = req.cmd {
            let (hdr, entries) = bytes.split_at(wire::size::RESOURCE_ATTACH_BACKING);
            self.add_raw(q, &[hdr, entries], resp_len)
        } else {
            self.add_raw(q, &[&bytes], resp_len)
        }
    }

    /// Publishes what was added; returns whether the device asked for a kick.
    pub fn kick(&mut self, q: QueueId) -> bool {
        let (mem, dq) = self.split(q);
        dq.kick(mem).unwrap()
    }

    /// Takes every returned chain of `q`, decoding responses.
    pub fn take_used(&mut self, q: QueueId) -> Vec<Returned> {
        let mut out = Vec::new();
        loop {
            let (mem, dq) = self.split(q);
            let Some((head, written)) = dq.take_used(mem).unwrap() else {
                break;
            };
            let resp = self
                .waiting
                .remove(&(q.index(), head))
                .and_then(|(gpa, len)| {
                    let mut b = vec![0u8; len.min(written) as usize];
                    self.mem.read(gpa, &mut b).unwrap();
                    Response::decode(&b).ok()
                });
            out.push(Returned {
                head,
                written,
                resp,
            });
        }
        out
    }

    /// Asks for an interrupt at the next used entry (event idx).
    pub fn arm(&mut self, q: QueueId) {
        let (mem, dq) = self.split(q);
        let at = dq.last_used_idx();
        dq.set_used_event(mem, at).unwrap();
    }
}

/// A request with a plain header.
pub fn req(cmd: Command) -> Request {
    Request {
        hdr: CtrlHdr {
            type_: cmd.type_(),
            ..CtrlHdr::default()
        },
        cmd,
    }
}

/// A fenced request.
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

/// A full-size rectangle.
pub fn rect(width: u32, height: u32) -> Rect {
    Rect {
        x: 0,
        y: 0,
        width,
        height,
    }
}

/// Backing of `len` bytes at `gpa`, split in `pieces` entries (Linux sends one
/// entry per contiguous run).
pub fn entries(gpa: Gpa, len: u64, pieces: u64) -> Vec<MemEntry> {
    let step = len.div_ceil(pieces).div_ceil(4096) * 4096;
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let n = step.min(len - at);
        out.push(MemEntry {
            addr: gpa.offset(at).get(),
            length: n as u32,
            padding: 0,
        });
        at += n;
    }
    out
}

/// The IOMMU as the mediator's reports built it: mapped host ranges per VM.
#[derive(Clone, Debug, Default)]
pub struct Iommu {
    /// `(vm, hpa, len)` of every live mapping (a multiset).
    pub maps: Vec<(VmId, Hpa, u64)>,
}

impl Iommu {
    /// Applies reported ops; an unmap of something not mapped fails the test.
    pub fn apply(&mut self, ops: &[IommuOp]) {
        for op in ops {
            match *op {
                IommuOp::Map { vm, hpa, len } => self.maps.push((vm, hpa, len)),
                IommuOp::Unmap { vm, hpa, len } => self.remove(vm, hpa, len),
            }
        }
    }
    /// Applies a reset report.
    pub fn apply_reset(&mut self, vm: VmId, r: &ResetReport) {
        for &(hpa, len) in &r.unmapped {
            self.remove(vm, hpa, len);
        }
    }
    fn remove(&mut self, vm: VmId, hpa: Hpa, len: u64) {
        let i = self
            .maps
            .iter()
            .position(|&m| m == (vm, hpa, len))
            .unwrap_or_else(|| panic!("unmap of {hpa:#x}+{len:#x} for VM {vm}: not mapped"));
        self.maps.swap_remove(i);
    }
    /// Whether `[hpa, hpa+len)` lies in one mapping.
    pub fn covers(&self, hpa: Hpa, len: u64) -> bool {
        self.maps
            .iter()
            .any(|&(_, a, l)| hpa >= a && hpa.offset(len) <= a.offset(l))
    }
    /// Mappings of `vm`.
    pub fn of(&self, vm: VmId) -> usize {
        self.maps.iter().filter(|m| m.0 == vm).count()
    }
}

/// Host memory as the GPU reaches it: every guest's RAM at its host address,
/// through the IOMMU model. Accesses outside a mapping are recorded as faults.
///
/// As the GPU's [`GuestMemory`] it is addressed by the GPU's DMA addresses, which
/// are host-physical (the model IOMMU maps 1:1): each access converts its address
/// explicitly, and `translate` is the identity.
pub struct HostView<'a> {
    /// The guests.
    pub guests: &'a mut [Guest],
    /// The IOMMU.
    pub iommu: &'a Iommu,
    /// Accesses refused by the IOMMU.
    pub faults: RefCell<Vec<(Hpa, u64)>>,
}

impl HostView<'_> {
    fn find(&self, hpa: Hpa, len: u64) -> Result<(usize, Gpa), MemError> {
        if !self.iommu.covers(hpa, len) {
            self.faults.borrow_mut().push((hpa, len));
            return Err(MemError::NotOwned);
        }
        self.guests
            .iter()
            .position(|g| {
                hpa >= g.mem.host_base && hpa.offset(len) <= g.mem.host_base.offset(RAM as u64)
            })
            .map(|i| {
                let m = &self.guests[i].mem;
                (i, m.base.offset(hpa.get() - m.host_base.get()))
            })
            .ok_or(MemError::OutOfRange)
    }
}

/// A GPU DMA address as the host-physical address it is (see [`HostView`]).
fn dma_to_hpa(addr: Gpa) -> Hpa {
    Hpa::new(addr.get())
}

impl GuestMemory for HostView<'_> {
    fn translate(&self, addr: Gpa, len: u64) -> Result<Hpa, MemError> {
        let hpa = dma_to_hpa(addr);
        self.find(hpa, len).map(|_| hpa)
    }
    fn read(&self, addr: Gpa, out: &mut [u8]) -> Result<(), MemError> {
        let (i, gpa) = self.find(dma_to_hpa(addr), out.len() as u64)?;
        self.guests[i].mem.read(gpa, out)
    }
    fn write(&mut self, addr: Gpa, data: &[u8]) -> Result<(), MemError> {
        let (i, gpa) = self.find(dma_to_hpa(addr), data.len() as u64)?;
        self.guests[i].mem.write(gpa, data)
    }
}

/// A GPU model the harness runs batches on.
pub trait Gpu {
    /// Executes one host command; returns the response type.
    fn execute(&mut self, cmd: &HostCommand, mem: &mut HostView<'_>) -> u32;
}

/// A GPU that accepts everything and does nothing (the world's batch log records
/// what it was given).
#[derive(Clone, Copy, Debug, Default)]
pub struct NullGpu;

impl Gpu for NullGpu {
    fn execute(&mut self, _cmd: &HostCommand, _mem: &mut HostView<'_>) -> u32 {
        wire::RESP_OK_NODATA
    }
}

impl Gpu for SimGpu {
    fn execute(&mut self, cmd: &HostCommand, mem: &mut HostView<'_>) -> u32 {
        SimGpu::execute(self, &cmd.request, mem).response.type_()
    }
}

/// A simulated GPU with `n` 640x480 scanouts and the harness's VRAM.
pub fn sim_gpu(n: usize) -> SimGpu {
    SimGpu::new(SimGpuConfig {
        scanouts: vec![(640, 480); n],
        vram_bytes: VRAM,
        cost: CostModel::FREE,
    })
    .unwrap()
}

/// Guests, mediator and IOMMU together.
pub struct World {
    /// The mediator.
    pub med: Mediator,
    /// The guests; guest `i` is VM `i + 1` with physical scanout `i`.
    pub guests: Vec<Guest>,
    /// The IOMMU model.
    pub iommu: Iommu,
    /// GPU accesses the IOMMU refused.
    pub faults: Vec<(Hpa, u64)>,
    /// Every batch the host ran: VM and commands.
    pub log: Vec<(VmId, Vec<HostCommand>)>,
}

/// Total VRAM of harness GPUs (64 MiB: a 16 MiB default quota per VM).
pub const VRAM: u64 = 64 << 20;

impl World {
    /// `n` VMs with one 640x480 scanout each (VM `i + 1` on physical scanout
    /// `i`), queues started, vectors programmed.
    pub fn new(n: usize, event_idx: bool) -> Self {
        Self::with_displays(&vec![(640, 480); n], event_idx)
    }

    /// One VM per display size, as [`new`](Self::new).
    pub fn with_displays(sizes: &[(u32, u32)], event_idx: bool) -> Self {
        let mut med = Mediator::new(MediatorConfig::new(VRAM, 4));
        let mut guests = Vec::new();
        for (i, &(width, height)) in sizes.iter().enumerate() {
            let vm = i as VmId + 1;
            let cfg = VmGpuConfig::new(vec![ScanoutConfig {
                physical: i as u32,
                width,
                height,
            }]);
            med.add_vm(vm, cfg).unwrap();
            guests.push(Guest::new(vm, host_base(i), event_idx));
        }
        let mut w = World {
            med,
            guests,
            iommu: Iommu::default(),
            faults: Vec::new(),
            log: Vec::new(),
        };
        for i in 0..sizes.len() {
            w.start(i, event_idx);
        }
        w.med.take_events();
        w.med.take_interrupts();
        w
    }

    /// Starts VM `i`'s queues and programs its vectors.
    pub fn start(&mut self, i: usize, event_idx: bool) {
        let vm = self.guests[i].vm;
        self.med
            .start_queues(vm, control_layout(event_idx), cursor_layout(event_idx))
            .unwrap();
        self.med.set_config_vector(vm, VECTORS[0]).unwrap();
        self.med
            .set_vector(vm, QueueId::Control, VECTORS[1])
            .unwrap();
        self.med
            .set_vector(vm, QueueId::Cursor, VECTORS[2])
            .unwrap();
    }

    /// VM id of guest `i`.
    pub fn vm(&self, i: usize) -> VmId {
        self.guests[i].vm
    }

    /// Guest `i` adds `r` to `q`, kicks, and the mediator serves the doorbell.
    pub fn send(&mut self, i: usize, q: QueueId, r: &Request) -> u16 {
        let head = self.guests[i].add(q, r);
        self.doorbell(i, q);
        head
    }

    /// Kicks `q` of guest `i` and serves the doorbell (whatever the event index
    /// says: the hypervisor also polls during the VM's slice).
    pub fn doorbell(&mut self, i: usize, q: QueueId) {
        self.guests[i].kick(q);
        let vm = self.guests[i].vm;
        self.med
            .process_doorbell(vm, q, &mut self.guests[i].mem)
            .unwrap();
        self.sync_iommu();
    }

    /// Applies the IOMMU ops the mediator reported.
    pub fn sync_iommu(&mut self) {
        let ops = self.med.take_iommu_ops();
        self.iommu.apply(&ops);
    }

    /// Runs one batch of VM `i` (at most `max` commands) on `gpu` and feeds the
    /// completions back. Returns the report, or `None` when nothing was taken.
    pub fn run_batch(
        &mut self,
        i: usize,
        max: usize,
        gpu: &mut dyn Gpu,
    ) -> Option<CompletionReport> {
        let vm = self.guests[i].vm;
        self.sync_iommu();
        let batch = self.med.take_batch(vm, max)?;
        let mut completions = Vec::new();
        {
            let mut view = HostView {
                guests: &mut self.guests,
                iommu: &self.iommu,
                faults: RefCell::new(Vec::new()),
            };
            for c in &batch.commands {
                let status = gpu.execute(c, &mut view);
                completions.push(Completion {
                    host_fence: c.host_fence,
                    status,
                });
            }
            self.faults.extend(view.faults.into_inner());
        }
        self.log.push((vm, batch.commands));
        let r = self
            .med
            .complete_batch(vm, &completions, &mut self.guests[i].mem)
            .unwrap();
        self.sync_iommu();
        Some(r)
    }

    /// The physical ring refused `commands`, the tail of VM `i`'s batch (in
    /// order): what the hypervisor's glue (`hypervisor/src/gpu_share/`) does then.
    pub fn refused(&mut self, i: usize, commands: Vec<HostCommand>) {
        let vm = self.guests[i].vm;
        self.med.requeue(vm, commands).unwrap();
    }

    /// Runs VM `i`'s batches until it has nothing staged.
    pub fn run_all(&mut self, i: usize, gpu: &mut dyn Gpu) {
        while self.run_batch(i, 16, gpu).is_some() {}
    }

    /// Sends `r` on the control queue of guest `i`, runs the GPU and returns the
    /// response.
    pub fn call(&mut self, i: usize, r: &Request, gpu: &mut dyn Gpu) -> Response {
        let head = self.send(i, QueueId::Control, r);
        self.run_all(i, gpu);
        let used = self.guests[i].take_used(QueueId::Control);
        let ret = used
            .into_iter()
            .find(|u| u.head == head)
            .expect("the chain came back");
        ret.resp.expect("a response").1
    }
}
