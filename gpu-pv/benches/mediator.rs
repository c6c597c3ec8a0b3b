//! What the mediator costs on the CPU.
//!
//! 1. `doorbell/*`: the cost of one command from doorbell to staged host command
//!    (pop the chain, gather it into staging, decode, check the fence, validate
//!    and rename, encode the host command, stage it) on the command shapes of a
//!    real Linux guest (measured from its virtio_gpu driver): control commands through
//!    one indirect descriptor (1 readable + 1 writable buffer, `ATTACH_BACKING`
//!    2 readable + 1 writable), cursor commands as one direct descriptor.
//!    Throughput is in commands; one iteration is one doorbell per queue for a
//!    whole round of commands. The guest's side (adding the chains) and the
//!    completion side run outside the timed part; `roundtrip/*` times both
//!    sides (doorbell, take_batch, complete_batch with the responses written and
//!    the chains returned).
//! 2. `stages/*`: the parts of that path that have a public entry point (ring
//!    pop, gather, decode, encode), to see what dominates.
//! 3. `gather/*`: bytes copied by the gather path (guest chain to staging) next
//!    to a plain `copy_from_slice` of the same bytes; after the group the ratio
//!    is measured again, interleaved, in the same run, and printed.
//!
//! Run: `cargo bench -p gpu-pv --bench mediator -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};

use gpu_pv::command::{self, Command, Request};
use gpu_pv::mediator::{
    Channel, Completion, Mediator, MediatorConfig, QueueId, ScanoutConfig, VmGpuConfig,
};
use gpu_pv::memory::{Gpa, GuestMemory, Hpa, VecMemory};
use gpu_pv::ring::driver::DriverQueue;
use gpu_pv::ring::{self, DeviceQueue, QueueLayout, Segment};
use gpu_pv::wire::{self, format, CtrlHdr, CursorPos, MemEntry, Rect};

const RAM: usize = 16 << 20;
const VM: u16 = 1;
const SLOTS: Gpa = Gpa::new(0x1_0000);
/// Bytes of a slot.
const SLOT: u64 = 0x1000;
/// Offsets in a slot.
const RESP_AT: u64 = 0x800;
const TABLE_AT: u64 = 0xf00;
const FB: [Gpa; 2] = [Gpa::new(0x10_0000), Gpa::new(0x58_0000)];
const CURSOR_IMAGE: Gpa = Gpa::new(0xa0_0000);
const SPARE: Gpa = Gpa::new(0xb0_0000);
const W: u32 = 1280;
const H: u32 = 800;

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

fn rect(x: u32, y: u32, width: u32, height: u32) -> Rect {
    Rect {
        x,
        y,
        width,
        height,
    }
}

fn req(cmd: Command, fence: Option<u64>) -> Request {
    Request {
        hdr: CtrlHdr {
            type_: cmd.type_(),
            flags: if fence.is_some() { wire::FLAG_FENCE } else { 0 },
            fence_id: fence.unwrap_or(0),
            ..CtrlHdr::default()
        },
        cmd,
    }
}

/// `n` entries of page-rounded runs covering `len` bytes at `base`, scattered
/// (every other run first), as Linux sends a fragmented framebuffer.
fn entries(base: Gpa, len: u64, n: u64) -> Vec<MemEntry> {
    let chunk = len.div_ceil(n).div_ceil(4096) * 4096;
    let pieces = len.div_ceil(chunk);
    let order: Vec<u64> = (0..pieces)
        .filter(|k| k % 2 == 0)
        .chain((0..pieces).filter(|k| k % 2 == 1))
        .collect();
    (0..pieces)
        .map(|k| MemEntry {
            addr: base.offset(order[k as usize] * chunk).get(),
            length: chunk.min(len - k * chunk) as u32,
            padding: 0,
        })
        .collect()
}

fn enc(r: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    command::encode(r, &mut out);
    out
}

/// One command of a round: its queue, its wire bytes and whether it is fenced
/// (its fence id is renewed every round).
#[derive(Clone)]
struct Cmd {
    queue: QueueId,
    req: Request,
}

impl Cmd {
    fn ctrl(cmd: Command) -> Self {
        Self {
            queue: QueueId::Control,
            req: req(cmd, None),
        }
    }
    fn fenced(cmd: Command) -> Self {
        Self {
            queue: QueueId::Control,
            req: req(cmd, Some(0)),
        }
    }
    fn cursor(cmd: Command) -> Self {
        Self {
            queue: QueueId::Cursor,
            req: req(cmd, None),
        }
    }
}

fn transfer(id: u32, r: Rect) -> Command {
    Command::TransferToHost2d {
        rect: r,
        offset: u64::from(r.y) * u64::from(W) * 4 + u64::from(r.x) * 4,
        resource_id: id,
    }
}

fn flush(id: u32, r: Rect) -> Command {
    Command::ResourceFlush {
        rect: r,
        resource_id: id,
    }
}

/// Framebuffer console: TRANSFER+FLUSH pairs of glyphs and 2-line strips.
fn console(pairs: u32) -> Vec<Cmd> {
    (0..pairs)
        .flat_map(|k| {
            let r = if k % 2 == 0 {
                rect(8 * (k % 160), 16 * (k % 50), 8, 16)
            } else {
                rect(0, 2 * (k % 400), W, 2)
            };
            [Cmd::ctrl(transfer(2, r)), Cmd::ctrl(flush(2, r))]
        })
        .collect()
}

/// KMS page flips: full-frame TRANSFER, SET_SCANOUT, FLUSH, alternating buffers.
fn flips(n: u32) -> Vec<Cmd> {
    (0..n)
        .flat_map(|k| {
            let id = 2 + k % 2;
            let r = rect(0, 0, W, H);
            [
                Cmd::ctrl(transfer(id, r)),
                Cmd::ctrl(Command::SetScanout {
                    rect: r,
                    scanout_id: 0,
                    resource_id: id,
                }),
                Cmd::ctrl(flush(id, r)),
            ]
        })
        .collect()
}

/// Cursor updates: fenced 64x64 TRANSFER (control), then UPDATE_CURSOR and
/// MOVE_CURSOR (cursor queue).
fn cursor(n: u32) -> Vec<Cmd> {
    (0..n)
        .flat_map(|k| {
            let pos = CursorPos {
                scanout_id: 0,
                x: 10 * k,
                y: 5 * k,
                padding: 0,
            };
            [
                Cmd::fenced(Command::TransferToHost2d {
                    rect: rect(0, 0, 64, 64),
                    offset: 0,
                    resource_id: 4,
                }),
                Cmd::cursor(Command::UpdateCursor {
                    pos,
                    resource_id: 4,
                    hot_x: 0,
                    hot_y: 0,
                }),
                Cmd::cursor(Command::MoveCursor { pos }),
            ]
        })
        .collect()
}

/// A resource's life: CREATE, ATTACH_BACKING with 85 entries, UNREF.
fn attach85(n: u32) -> Vec<Cmd> {
    (0..n)
        .flat_map(|k| {
            let id = 10 + k;
            [
                Cmd::ctrl(Command::ResourceCreate2d {
                    resource_id: id,
                    format: format::B8G8R8X8_UNORM,
                    width: W,
                    height: H,
                }),
                Cmd::ctrl(Command::ResourceAttachBacking {
                    resource_id: id,
                    entries: entries(SPARE, u64::from(W * H * 4), 85),
                }),
                Cmd::ctrl(Command::ResourceUnref { resource_id: id }),
            ]
        })
        .collect()
}

/// The mix of a Linux guest: console pairs, page flips, fenced cursor uploads
/// with cursor moves, and one resource life with an 85-entry backing (far more
/// ATTACH_BACKING than the traced 5 in 14,545 commands: the heaviest command is
/// in every round).
fn linux_mix() -> Vec<Cmd> {
    let mut v = console(8);
    v.extend(flips(10));
    v.extend(cursor(2));
    v.extend(attach85(1));
    v
}

/// A guest and the mediator, with the guest's display up (two framebuffers and
/// a cursor resource, backed).
struct World {
    med: Mediator,
    mem: VecMemory,
    ctrl: DriverQueue,
    cursor: DriverQueue,
    fence: u64,
    /// Readable parts of each command of the round, written in guest memory.
    round: Vec<(QueueId, Vec<(Gpa, u32)>)>,
    fenced: Vec<Gpa>,
    completions: Vec<Completion>,
}

impl World {
    fn new() -> Self {
        let mut med = Mediator::new(MediatorConfig::new(1 << 30, 1));
        med.add_vm(
            VM,
            VmGpuConfig::new(vec![ScanoutConfig {
                physical: 0,
                width: W,
                height: H,
            }]),
        )
        .unwrap();
        let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(1 << 32), RAM);
        let ctrl = DriverQueue::new(&mut mem, control_layout()).unwrap();
        let cursor = DriverQueue::new(&mut mem, cursor_layout()).unwrap();
        med.start_queues(VM, control_layout(), cursor_layout())
            .unwrap();
        med.set_vector(VM, QueueId::Control, 1).unwrap();
        med.set_vector(VM, QueueId::Cursor, 2).unwrap();
        let mut w = Self {
            med,
            mem,
            ctrl,
            cursor,
            fence: 0,
            round: Vec::new(),
            fenced: Vec::new(),
            completions: Vec::new(),
        };
        let len = u64::from(W * H * 4);
        let mut up = Vec::new();
        for (b, id) in [2u32, 3].into_iter().enumerate() {
            up.push(Cmd::ctrl(Command::ResourceCreate2d {
                resource_id: id,
                format: format::B8G8R8X8_UNORM,
                width: W,
                height: H,
            }));
            up.push(Cmd::ctrl(Command::ResourceAttachBacking {
                resource_id: id,
                entries: entries(FB[b], len, 85),
            }));
        }
        up.push(Cmd::ctrl(Command::ResourceCreate2d {
            resource_id: 4,
            format: format::B8G8R8A8_UNORM,
            width: 64,
            height: 64,
        }));
        up.push(Cmd::ctrl(Command::ResourceAttachBacking {
            resource_id: 4,
            entries: entries(CURSOR_IMAGE, 64 * 64 * 4, 1),
        }));
        up.push(Cmd::ctrl(Command::SetScanout {
            rect: rect(0, 0, W, H),
            scanout_id: 0,
            resource_id: 2,
        }));
        w.load(&up);
        w.add_round();
        w.doorbells();
        w.complete();
        w
    }

    /// Writes the commands of a round into guest memory, once.
    fn load(&mut self, cmds: &[Cmd]) {
        self.round.clear();
        self.fenced.clear();
        let (mut c, mut k) = (0u64, 0u64);
        for cmd in cmds {
            let mut bytes = Vec::new();
            command::encode(&cmd.req, &mut bytes);
            let base = match cmd.queue {
                QueueId::Control => {
                    c += 1;
                    SLOTS.offset(SLOT * (c - 1))
                }
                QueueId::Cursor => {
                    k += 1;
                    SLOTS.offset(SLOT * (64 + k - 1))
                }
            };
            let parts: Vec<(Gpa, u32)> = if cmd.req.cmd.type_() == wire::CMD_RESOURCE_ATTACH_BACKING
            {
                let (h, e) = bytes.split_at(wire::size::RESOURCE_ATTACH_BACKING);
                self.mem.write(base, h).unwrap();
                self.mem.write(base.offset(0x40), e).unwrap();
                vec![(base, h.len() as u32), (base.offset(0x40), e.len() as u32)]
            } else {
                self.mem.write(base, &bytes).unwrap();
                vec![(base, bytes.len() as u32)]
            };
            if cmd.req.hdr.flags & wire::FLAG_FENCE != 0 {
                self.fenced.push(base);
            }
            self.round.push((cmd.queue, parts));
        }
        assert!(c <= 64 && k <= 16, "a round must fit the queues");
    }

    /// The guest adds the round's chains and publishes them (not timed).
    fn add_round(&mut self) {
        for &at in &self.fenced {
            self.fence += 1;
            self.mem
                .write(at.offset(8), &self.fence.to_le_bytes())
                .unwrap();
        }
        for (q, parts) in &self.round {
            let base = parts[0].0;
            match q {
                QueueId::Control => {
                    let resp = [(base.offset(RESP_AT), 24)];
                    self.ctrl
                        .add(&mut self.mem, parts, &resp, Some(base.offset(TABLE_AT)))
                        .unwrap();
                }
                QueueId::Cursor => {
                    self.cursor.add(&mut self.mem, parts, &[], None).unwrap();
                }
            }
        }
        self.ctrl.kick(&mut self.mem).unwrap();
        self.cursor.kick(&mut self.mem).unwrap();
    }

    /// The timed part: one doorbell per queue. Not inlined, so that a profiler
    /// (`GPUPV_BENCH_ONLY=per-command` under callgrind) can attribute its cost.
    #[inline(never)]
    fn doorbells(&mut self) -> usize {
        let mut staged = 0;
        for q in QueueId::ALL {
            let r = self.med.process_doorbell(VM, q, &mut self.mem).unwrap();
            staged += r.staged;
        }
        staged
    }

    /// The GPU runs the batch, the responses are written back and the guest
    /// takes its chains back.
    fn complete(&mut self) {
        while let Some(b) = self.med.take_batch(VM, usize::MAX) {
            self.completions.clear();
            self.completions
                .extend(b.commands.iter().map(|c| Completion {
                    host_fence: c.host_fence,
                    status: wire::RESP_OK_NODATA,
                }));
            let done = std::mem::take(&mut self.completions);
            self.med.complete_batch(VM, &done, &mut self.mem).unwrap();
            self.completions = done;
        }
        while self.ctrl.take_used(&self.mem).unwrap().is_some() {}
        while self.cursor.take_used(&self.mem).unwrap().is_some() {}
        self.ctrl
            .set_used_event(&mut self.mem, self.ctrl.last_used_idx())
            .unwrap();
        self.cursor
            .set_used_event(&mut self.mem, self.cursor.last_used_idx())
            .unwrap();
        self.med.take_iommu_ops();
        self.med.take_interrupts();
        let ev = self.med.take_events();
        assert!(
            ev.iter().all(|e| e.channel == Channel::Operational),
            "the bench's commands must all be valid: {ev:?}"
        );
    }
}

fn doorbell_benches(c: &mut Criterion) {
    let shapes: [(&str, Vec<Cmd>); 5] = [
        ("linux_mix", linux_mix()),
        ("console_pairs", console(32)),
        ("page_flips", flips(21)),
        ("cursor", cursor(8)),
        ("attach85_life", attach85(21)),
    ];
    let mut g = c.benchmark_group("doorbell");
    for (name, cmds) in &shapes {
        let mut w = World::new();
        w.load(cmds);
        let n = cmds.len();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    w.add_round();
                    let start = Instant::now();
                    let staged = w.doorbells();
                    t += start.elapsed();
                    debug_assert_eq!(staged, n);
                    black_box(staged);
                    w.complete();
                }
                t
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("roundtrip");
    let cmds = linux_mix();
    let mut w = World::new();
    w.load(&cmds);
    g.throughput(Throughput::Elements(cmds.len() as u64));
    g.bench_function("linux_mix", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                w.add_round();
                let start = Instant::now();
                black_box(w.doorbells());
                w.complete();
                t += start.elapsed();
            }
            t
        })
    });
    g.finish();
}

fn stage_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("stages");
    // Ring pop of 64 indirect control chains (1R + 1W each).
    let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(1 << 32), RAM);
    let mut drv = DriverQueue::new(&mut mem, control_layout()).unwrap();
    let flip = enc(&req(transfer(2, rect(0, 0, W, H)), None));
    for k in 0..64u64 {
        let base = SLOTS.offset(SLOT * k);
        mem.write(base, &flip).unwrap();
        drv.add(
            &mut mem,
            &[(base, flip.len() as u32)],
            &[(base.offset(RESP_AT), 24)],
            Some(base.offset(TABLE_AT)),
        )
        .unwrap();
    }
    drv.kick(&mut mem).unwrap();
    let mut dev = DeviceQueue::new(control_layout()).unwrap();
    g.throughput(Throughput::Elements(64));
    g.bench_function("pop_indirect_x64", |b| {
        b.iter(|| {
            dev.reset();
            for _ in 0..64 {
                black_box(dev.pop(&mem).unwrap());
            }
        })
    });
    g.throughput(Throughput::Elements(1));
    let seg = [Segment {
        gpa: SLOTS,
        len: flip.len() as u32,
    }];
    let mut staging = Vec::new();
    g.bench_function("gather_56B", |b| {
        b.iter(|| {
            staging.clear();
            black_box(ring::gather(&mem, black_box(&seg), &mut staging, 1 << 17).unwrap())
        })
    });
    g.bench_function("decode_transfer", |b| {
        b.iter(|| black_box(command::decode(black_box(&flip)).unwrap()))
    });
    let host = req(transfer(7, rect(0, 0, W, H)), Some(99));
    g.bench_function("encode_transfer_new_vec", |b| {
        b.iter(|| {
            let mut out = Vec::new();
            command::encode(black_box(&host), &mut out);
            black_box(out)
        })
    });
    g.bench_function("encode_transfer_reused_vec", |b| {
        let mut out = Vec::with_capacity(64);
        b.iter(|| {
            out.clear();
            command::encode(black_box(&host), &mut out);
            black_box(out.len())
        })
    });
    let attach = enc(&req(
        Command::ResourceAttachBacking {
            resource_id: 2,
            entries: entries(FB[0], u64::from(W * H * 4), 85),
        },
        None,
    ));
    g.bench_function("decode_attach85", |b| {
        b.iter(|| black_box(command::decode(black_box(&attach)).unwrap()))
    });
    g.bench_function("alloc_free_64B", |b| {
        b.iter(|| black_box(Vec::<u8>::with_capacity(black_box(64))))
    });
    g.finish();
}

/// A guest chain of `total` bytes in segments of `seg` bytes, scattered over a
/// 4 MiB region (so the source is not one run), and the same bytes as plain
/// slices of a host buffer laid out the same way.
fn bulk(total: usize, seg: usize) -> (VecMemory, Vec<Segment>) {
    let mut mem = VecMemory::new(Gpa::new(0), Hpa::new(1 << 32), 8 << 20);
    let n = total / seg;
    let segs: Vec<Segment> = (0..n)
        .map(|k| Segment {
            gpa: Gpa::new(0x10_0000).offset(((k * 7) % n.max(1)) as u64 * (seg as u64 + 64)),
            len: seg as u32,
        })
        .collect();
    for (k, s) in segs.iter().enumerate() {
        let fill = vec![k as u8; seg];
        mem.write(s.gpa, &fill).unwrap();
    }
    (mem, segs)
}

/// A plain copy of the same bytes: `copy_from_slice` from the guest's backing
/// `Vec` into a host buffer, segment by segment.
fn memcpy(mem: &VecMemory, segs: &[Segment], out: &mut [u8]) -> usize {
    let mut at = 0;
    for s in segs {
        // The guest's RAM starts at GPA 0 of `mem.bytes`.
        let src = s.gpa.get() as usize;
        let len = s.len as usize;
        out[at..at + len].copy_from_slice(&mem.bytes[src..src + len]);
        at += len;
    }
    at
}

/// The proposed gather: into a staging buffer that keeps its length (and so its
/// initialised bytes) between commands, so nothing is zeroed before the copy.
fn gather_no_zero(mem: &VecMemory, segs: &[Segment], staging: &mut Vec<u8>) -> usize {
    let total: usize = segs.iter().map(|s| s.len as usize).sum();
    if staging.len() < total {
        staging.resize(total, 0);
    }
    let mut at = 0;
    for s in segs {
        let len = s.len as usize;
        mem.read(s.gpa, &mut staging[at..at + len]).unwrap();
        at += len;
    }
    at
}

const BULK: [(&str, usize, usize); 4] = [
    ("56B_1seg", 56, 56),
    ("1392B_attach85", 1392, 1392),
    ("64KiB_1seg", 64 << 10, 64 << 10),
    ("64KiB_16x4KiB", 64 << 10, 4 << 10),
];

fn gather_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("gather");
    for (name, total, seg) in BULK {
        let (mem, segs) = bulk(total, seg);
        let mut staging = Vec::new();
        let mut out = vec![0u8; total];
        g.throughput(Throughput::Bytes(total as u64));
        g.bench_function(format!("ring_gather/{name}"), |b| {
            b.iter(|| {
                staging.clear();
                black_box(ring::gather(&mem, black_box(&segs), &mut staging, 1 << 20).unwrap())
            })
        });
        g.bench_function(format!("gather_no_zero/{name}"), |b| {
            b.iter(|| black_box(gather_no_zero(&mem, black_box(&segs), &mut staging)))
        });
        g.bench_function(format!("memcpy/{name}"), |b| {
            b.iter(|| black_box(memcpy(&mem, black_box(&segs), &mut out)))
        });
    }
    g.finish();
}

/// Best time of `f` over `reps` batches of `inner` calls, in ns per call.
fn best_ns(reps: usize, inner: usize, mut f: impl FnMut() -> usize) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        for _ in 0..inner {
            black_box(f());
        }
        best = best.min(t.elapsed().as_nanos() as f64 / inner as f64);
    }
    best
}

/// Per-command cost of each command shape from doorbell to staged, as the best
/// and the median of many rounds: the best is what the code costs when the
/// machine leaves it alone (a shared machine's neighbours only add time).
fn print_per_command() {
    println!("\nper command, doorbell to staged (best and median of 400 rounds; goal <= 50 ns):");
    println!(
        "{:<16} {:>9} {:>10} {:>12}",
        "shape", "commands", "best ns", "median ns"
    );
    let shapes: [(&str, Vec<Cmd>); 5] = [
        ("linux_mix", linux_mix()),
        ("console_pairs", console(32)),
        ("page_flips", flips(21)),
        ("cursor", cursor(8)),
        ("attach85_life", attach85(21)),
    ];
    let only = std::env::var("GPUPV_BENCH_SHAPE").ok();
    for (name, cmds) in &shapes {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        let mut w = World::new();
        w.load(cmds);
        let mut t: Vec<f64> = (0..400)
            .map(|_| {
                w.add_round();
                let start = Instant::now();
                black_box(w.doorbells());
                let el = start.elapsed().as_nanos() as f64;
                w.complete();
                el / cmds.len() as f64
            })
            .collect();
        t.sort_by(f64::total_cmp);
        println!(
            "{:<16} {:>9} {:>10.0} {:>12.0}",
            name,
            cmds.len(),
            t[0],
            t[t.len() / 2]
        );
    }
}

/// The gather/memcpy ratio measured interleaved in this run (best of many
/// batches each, alternating, so both see the same machine state).
fn print_ratios() {
    println!("\ngather vs memcpy, interleaved in this run (throughput ratio, goal >= 0.9):");
    println!(
        "{:<16} {:>10} {:>10} {:>12} {:>8} {:>15}",
        "bytes", "memcpy ns", "gather ns", "no-zero ns", "ratio", "no-zero ratio"
    );
    for (name, total, seg) in BULK {
        let (mem, segs) = bulk(total, seg);
        let mut staging = Vec::new();
        let mut out = vec![0u8; total];
        let inner = (1 << 22) / total.max(64);
        let (mut m, mut gth, mut nz) = (f64::MAX, f64::MAX, f64::MAX);
        for _ in 0..20 {
            m = m.min(best_ns(5, inner, || memcpy(&mem, &segs, &mut out)));
            gth = gth.min(best_ns(5, inner, || {
                staging.clear();
                ring::gather(&mem, &segs, &mut staging, 1 << 20).unwrap()
            }));
            nz = nz.min(best_ns(5, inner, || {
                gather_no_zero(&mem, &segs, &mut staging)
            }));
        }
        println!(
            "{:<16} {:>10.1} {:>10.1} {:>12.1} {:>7.2}x {:>14.2}x",
            name,
            m,
            gth,
            nz,
            m / gth,
            m / nz
        );
    }
}

criterion_group!(benches, doorbell_benches, stage_benches, gather_benches);

fn main() {
    // `GPUPV_BENCH_ONLY=per-command` runs only the per-command table (for
    // `valgrind --tool=callgrind`, whose instruction counts do not depend on
    // what else the machine runs).
    if std::env::var("GPUPV_BENCH_ONLY").as_deref() == Ok("per-command") {
        print_per_command();
        return;
    }
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
    // Skip the ratio table when criterion was asked to only list or test.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--list" || a == "--test") {
        print_per_command();
        print_ratios();
    }
}
