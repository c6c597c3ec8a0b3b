//! What the `mediator` and `snapshot` targets share: a small guest that drives
//! the mediator through real virtqueues, and a well-behaved "victim" VM whose
//! state must never change while the fuzzer drives the other one.
#![allow(dead_code)]

use gpu_pv::command::{self, Command, Request};
use gpu_pv::mediator::{
    Completion, HostCommand, IommuOp, Mediator, MediatorConfig, QueueId, ScanoutConfig,
    VmGpuConfig, VmState,
};
use gpu_pv::memory::{Gpa, GuestMemory, Hpa, VecMemory};
use gpu_pv::ring::driver::DriverQueue;
use gpu_pv::ring::QueueLayout;
use gpu_pv::wire::{self, format, CtrlHdr, MemEntry, Rect};

/// Guest RAM of both VMs (at GPA 0).
pub const RAM: usize = 0x1_0000;
/// The fuzzed VM and the victim.
pub const EVIL: u16 = 1;
pub const VICTIM: u16 = 2;
/// Command slots: request at +0, response at +RESP, indirect table at TABLES.
pub const SLOTS: Gpa = Gpa::new(0x1000);
/// Bytes of a slot, and the offset of the response in one.
pub const SLOT: u64 = 0x200;
pub const RESP: u64 = 0x180;
pub const RESP_LEN: u32 = 0x80;
pub const TABLES: Gpa = Gpa::new(0x400);
/// Where backing may live.
pub const BACKING: Gpa = Gpa::new(0x4000);

pub fn host_base(vm: u16) -> Hpa {
    Hpa::new(u64::from(vm) << 32)
}

/// Whether `[hpa, hpa+len)` lies in `vm`'s RAM as the host sees it.
pub fn in_ram_of(vm: u16, hpa: Hpa, len: u64) -> bool {
    let base = host_base(vm);
    hpa >= base
        && hpa
            .checked_add(len)
            .is_some_and(|e| e <= base.offset(RAM as u64))
}

pub fn control_layout(event_idx: bool, indirect: bool) -> QueueLayout {
    QueueLayout {
        size: 16,
        desc: Gpa::new(0x0),
        avail: Gpa::new(0x100),
        used: Gpa::new(0x200),
        event_idx,
        indirect,
    }
}

pub fn cursor_layout(event_idx: bool, indirect: bool) -> QueueLayout {
    QueueLayout {
        size: 4,
        desc: Gpa::new(0x300),
        avail: Gpa::new(0x340),
        used: Gpa::new(0x360),
        event_idx,
        indirect,
    }
}

/// A guest: its RAM and the driver side of its queues.
pub struct Guest {
    pub vm: u16,
    pub mem: VecMemory,
    pub ctrl: DriverQueue,
    pub cursor: DriverQueue,
    pub event_idx: bool,
    pub indirect: bool,
    pub next_slot: u64,
}

impl Guest {
    pub fn new(vm: u16, event_idx: bool, indirect: bool) -> Self {
        let mut mem = VecMemory::new(Gpa::new(0), host_base(vm), RAM);
        let ctrl = DriverQueue::new(&mut mem, control_layout(event_idx, indirect)).unwrap();
        let cursor = DriverQueue::new(&mut mem, cursor_layout(event_idx, indirect)).unwrap();
        Self {
            vm,
            mem,
            ctrl,
            cursor,
            event_idx,
            indirect,
            next_slot: 0,
        }
    }

    /// Zeroes the rings and starts the driver side over (after a device reset).
    pub fn reinit(&mut self) {
        self.ctrl =
            DriverQueue::new(&mut self.mem, control_layout(self.event_idx, self.indirect)).unwrap();
        self.cursor =
            DriverQueue::new(&mut self.mem, cursor_layout(self.event_idx, self.indirect)).unwrap();
    }

    /// Starts the device: queues and vectors.
    pub fn start(&self, med: &mut Mediator) {
        med.start_queues(
            self.vm,
            control_layout(self.event_idx, self.indirect),
            cursor_layout(self.event_idx, self.indirect),
        )
        .unwrap();
        med.set_config_vector(self.vm, 0).unwrap();
        med.set_vector(self.vm, QueueId::Control, 1).unwrap();
        med.set_vector(self.vm, QueueId::Cursor, 2).unwrap();
    }

    fn slot(&mut self) -> Gpa {
        let k = self.next_slot % 12;
        self.next_slot += 1;
        SLOTS.offset(SLOT * k)
    }

    /// Adds a chain holding `bytes` (split after 32 bytes when `split`), with a
    /// response buffer on the control queue. Returns false when the queue is full.
    pub fn add(&mut self, q: QueueId, bytes: &[u8], split: bool) -> bool {
        let at = self.slot();
        let k = (at.get() - SLOTS.get()) / SLOT;
        let bytes = &bytes[..bytes.len().min(RESP as usize)];
        self.mem.write(at, bytes).unwrap();
        let readable: Vec<(Gpa, u32)> = if split && bytes.len() > 32 {
            vec![(at, 32), (at.offset(32), bytes.len() as u32 - 32)]
        } else {
            vec![(at, bytes.len() as u32)]
        };
        let table = self.indirect.then_some(TABLES.offset(0x40 * k));
        let r = match q {
            QueueId::Control => self.ctrl.add(
                &mut self.mem,
                &readable,
                &[(at.offset(RESP), RESP_LEN)],
                table,
            ),
            QueueId::Cursor => self.cursor.add(&mut self.mem, &readable, &[], None),
        };
        r.is_ok()
    }

    pub fn kick(&mut self) {
        let _ = self.ctrl.kick(&mut self.mem);
        let _ = self.cursor.kick(&mut self.mem);
    }
}

pub fn encode(cmd: Command, flags: u32, fence: u64) -> Vec<u8> {
    let mut out = Vec::new();
    command::encode(
        &Request {
            hdr: CtrlHdr {
                type_: cmd.type_(),
                flags,
                fence_id: fence,
                ..CtrlHdr::default()
            },
            cmd,
        },
        &mut out,
    );
    out
}

pub fn rect(w: u32, h: u32) -> Rect {
    Rect {
        x: 0,
        y: 0,
        width: w,
        height: h,
    }
}

/// A mediator with two VMs: EVIL on physical scanout 0 and VICTIM on 1.
pub fn mediator() -> Mediator {
    let mut med = Mediator::new(MediatorConfig::new(64 << 20, 2));
    for (vm, physical) in [(EVIL, 0), (VICTIM, 1)] {
        med.add_vm(
            vm,
            VmGpuConfig::new(vec![ScanoutConfig {
                physical,
                width: 64,
                height: 64,
            }]),
        )
        .unwrap();
    }
    med
}

/// Runs every staged batch of `vm` to completion with OK statuses.
pub fn run_all(med: &mut Mediator, g: &mut Guest) -> Vec<HostCommand> {
    let mut ran = Vec::new();
    while let Some(b) = med.take_batch(g.vm, 64) {
        let done: Vec<Completion> = b
            .commands
            .iter()
            .map(|c| Completion {
                host_fence: c.host_fence,
                status: wire::RESP_OK_NODATA,
            })
            .collect();
        med.complete_batch(g.vm, &done, &mut g.mem).unwrap();
        ran.extend(b.commands);
    }
    ran
}

/// Sends well-formed commands on the control queue, runs them, and checks every
/// response is OK.
pub fn exchange(med: &mut Mediator, g: &mut Guest, cmds: &[Command]) {
    for c in cmds {
        let split = matches!(c, Command::ResourceAttachBacking { .. });
        assert!(g.add(QueueId::Control, &encode(c.clone(), 0, 0), split));
    }
    g.kick();
    let r = med
        .process_doorbell(g.vm, QueueId::Control, &mut g.mem)
        .unwrap();
    assert_eq!(r.staged + r.emulated, cmds.len(), "{r:?}");
    run_all(med, g);
    let mut n = 0;
    while let Ok(Some((head, written))) = g.ctrl.take_used(&g.mem) {
        let _ = head;
        assert!(written >= 24);
        n += 1;
    }
    assert_eq!(n, cmds.len());
}

/// The victim: a 32x32 framebuffer backed at BACKING, shown on its scanout.
pub fn victim(med: &mut Mediator) -> Guest {
    let mut g = Guest::new(VICTIM, true, true);
    g.start(med);
    exchange(
        med,
        &mut g,
        &[
            Command::ResourceCreate2d {
                resource_id: 2,
                format: format::B8G8R8X8_UNORM,
                width: 32,
                height: 32,
            },
            Command::ResourceAttachBacking {
                resource_id: 2,
                entries: vec![MemEntry {
                    addr: BACKING.get(),
                    length: 32 * 32 * 4,
                    padding: 0,
                }],
            },
            Command::SetScanout {
                rect: rect(32, 32),
                scanout_id: 0,
                resource_id: 2,
            },
            Command::TransferToHost2d {
                rect: rect(32, 32),
                offset: 0,
                resource_id: 2,
            },
            Command::ResourceFlush {
                rect: rect(32, 32),
                resource_id: 2,
            },
        ],
    );
    g
}

/// What must not change about the victim while the other VM is driven.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VictimState {
    pub state: VmState,
    pub resources: usize,
    pub host: Vec<u32>,
    pub vram: u64,
    pub fences: (u64, u64),
    pub staged: usize,
    pub in_flight: bool,
    pub unanswered: usize,
}

/// FNV-1a over `b`, 8 bytes at a time (a fingerprint, not a defence).
pub fn fingerprint(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for c in b.chunks(8) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        h ^= u64::from_le_bytes(w);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The victim's context. (Its RAM is compared separately, once: a call for
/// another VM is never handed the victim's memory, so only its own calls can
/// write it.)
pub fn victim_state(med: &Mediator, _g: &Guest) -> VictimState {
    let v = med.vm(VICTIM).unwrap();
    VictimState {
        state: v.state(),
        resources: v.resource_count(),
        host: v.host_resources().collect(),
        vram: v.vram_used(),
        fences: (v.last_fence_submitted(), v.last_fence_signalled()),
        staged: v.staged_len(),
        in_flight: v.has_batch_in_flight(),
        unanswered: v.unanswered(),
    }
}

/// Checks a host command of `vm`: its fence is the host fence, its bytes are
/// its request, it names only `vm`'s physical scanout and host resources that
/// are not the victim's, and its backing lies in `vm`'s RAM.
pub fn check_host_command(c: &HostCommand, vm: u16, physical: u32, victim_host: &[u32]) {
    assert_eq!(c.request.hdr.flags, wire::FLAG_FENCE);
    assert_eq!(c.request.hdr.fence_id, c.host_fence);
    assert_eq!(c.request.hdr.ctx_id, 0);
    assert_eq!(command::decode(&c.bytes).as_ref(), Ok(&c.request));
    let res = |id: u32| {
        assert!(
            id == 0 || !victim_host.contains(&id),
            "victim resource {id}"
        )
    };
    match &c.request.cmd {
        Command::ResourceCreate2d { resource_id, .. }
        | Command::ResourceUnref { resource_id }
        | Command::ResourceFlush { resource_id, .. }
        | Command::TransferToHost2d { resource_id, .. }
        | Command::ResourceDetachBacking { resource_id } => res(*resource_id),
        Command::SetScanout {
            scanout_id,
            resource_id,
            ..
        } => {
            assert_eq!(*scanout_id, physical);
            res(*resource_id);
        }
        Command::ResourceAttachBacking {
            resource_id,
            entries,
        } => {
            res(*resource_id);
            for e in entries {
                assert!(
                    // A host command's entries hold host-physical addresses.
                    in_ram_of(vm, Hpa::new(e.addr), u64::from(e.length)),
                    "backing {e:?} outside VM {vm}"
                );
            }
        }
        Command::UpdateCursor {
            pos, resource_id, ..
        } => {
            assert_eq!(pos.scanout_id, physical);
            res(*resource_id);
        }
        Command::MoveCursor { pos } => assert_eq!(pos.scanout_id, physical),
        Command::GetDisplayInfo | Command::GetEdid { .. } => {
            panic!("emulated command sent to the GPU: {c:?}")
        }
    }
}

/// Checks IOMMU ops all belong to `vm` and lie in its RAM.
pub fn check_iommu(ops: &[IommuOp], vm: u16) {
    for op in ops {
        let (o, hpa, len) = match *op {
            IommuOp::Map { vm, hpa, len } | IommuOp::Unmap { vm, hpa, len } => (vm, hpa, len),
        };
        assert_eq!(o, vm, "{op:?}");
        assert!(in_ram_of(vm, hpa, len), "{op:?}");
    }
}

/// A byte source that yields zeros once the input is exhausted.
pub struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.at >= self.data.len()
    }
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
    pub fn rest(&self) -> &'a [u8] {
        &self.data[self.at.min(self.data.len())..]
    }
}

pub fn guest_mem_read(mem: &VecMemory, gpa: Gpa, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    mem.read(gpa, &mut b).unwrap();
    b
}
