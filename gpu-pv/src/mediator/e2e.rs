//! End-to-end tests: several VMs, each with its own memory at its own host base,
//! drive the mediator through real virtqueues in the shapes Linux uses; the staged
//! host commands run on the simulated GPU through an IOMMU built only from what the
//! mediator reported; pixels, responses and isolation are checked on both sides.

use alloc::vec;
use alloc::vec::Vec;
use std::cell::RefCell;

use super::harness::*;
use super::*;
use crate::command::{edid_for, Command, Response};
use crate::sim_gpu::SimGpu;
use crate::wire::{format, CursorPos, MemEntry};

/// Framebuffer size used by the tests (small, but wider than a page per row).
const W: u32 = 160;
const H: u32 = 96;

/// The backing of a framebuffer, as Linux lays it out when pages are scattered:
/// three runs at distinct guest addresses.
fn scattered_backing(len: u64) -> Vec<MemEntry> {
    let third = (len / 3).div_ceil(4096) * 4096;
    let mut out = Vec::new();
    let mut at = 0;
    for gpa in [FB.offset(0x8_0000), FB, FB.offset(0x40_0000)] {
        let n = third.min(len - at);
        out.push(MemEntry {
            addr: gpa.get(),
            length: n as u32,
            padding: 0,
        });
        at += n;
        if at == len {
            break;
        }
    }
    out
}

/// Writes `pixel(x, y)` for every pixel of a `width` x `height` image into
/// the backing described by `entries` (4 bytes per pixel, rows back to back).
fn paint(
    g: &mut Guest,
    entries: &[MemEntry],
    width: u32,
    height: u32,
    pixel: impl Fn(u32, u32) -> u32,
) {
    let mut bytes = Vec::with_capacity((width * height * 4) as usize);
    for y in 0..height {
        for x in 0..width {
            bytes.extend_from_slice(&pixel(x, y).to_le_bytes());
        }
    }
    let mut off = 0usize;
    for e in entries {
        let n = (e.length as usize).min(bytes.len() - off);
        g.mem.write(Gpa::new(e.addr), &bytes[off..off + n]).unwrap();
        off += n;
    }
}

fn pattern(vm: VmId, frame: u32) -> impl Fn(u32, u32) -> u32 {
    move |x, y| (u32::from(vm) << 28) | (frame << 24) | (y << 12) | x
}

/// What the probe and first frame of a Linux guest send, in order.
fn linux_bring_up(backing: &[MemEntry]) -> Vec<Request> {
    vec![
        req(Command::GetEdid { scanout: 0 }),
        req(Command::GetDisplayInfo),
        req(Command::ResourceCreate2d {
            resource_id: 2,
            format: format::B8G8R8X8_UNORM,
            width: W,
            height: H,
        }),
        req(Command::ResourceAttachBacking {
            resource_id: 2,
            entries: backing.to_vec(),
        }),
        req(Command::SetScanout {
            rect: rect(W, H),
            scanout_id: 0,
            resource_id: 2,
        }),
        req(Command::TransferToHost2d {
            rect: rect(W, H),
            offset: 0,
            resource_id: 2,
        }),
        req(Command::ResourceFlush {
            rect: rect(W, H),
            resource_id: 2,
        }),
    ]
}

/// Guest `i` sends `reqs` on the control queue (one kick for all), the GPU runs
/// them, and the responses come back in order.
fn exchange(w: &mut World, i: usize, reqs: &[Request], gpu: &mut SimGpu) -> Vec<Response> {
    let heads: Vec<u16> = reqs
        .iter()
        .map(|r| w.guests[i].add(QueueId::Control, r))
        .collect();
    w.doorbell(i, QueueId::Control);
    w.run_all(i, gpu);
    let used = w.guests[i].take_used(QueueId::Control);
    assert_eq!(used.iter().map(|u| u.head).collect::<Vec<_>>(), heads);
    used.into_iter().map(|u| u.resp.unwrap().1).collect()
}

/// Brings guest `i` up with a painted framebuffer on its scanout.
fn bring_up(w: &mut World, i: usize, gpu: &mut SimGpu, frame: u32) -> Vec<MemEntry> {
    let backing = scattered_backing(u64::from(W * H * 4));
    let vm = w.vm(i);
    paint(&mut w.guests[i], &backing, W, H, pattern(vm, frame));
    let resps = exchange(w, i, &linux_bring_up(&backing), gpu);
    assert_eq!(resps[0], Response::Edid(edid_for(640, 480).to_vec()));
    assert_eq!(
        resps[1],
        Response::DisplayInfo(vec![(rect(640, 480), true)])
    );
    assert!(
        resps[2..].iter().all(|r| *r == Response::OkNoData),
        "{resps:?}"
    );
    backing
}

/// Whether physical scanout `s` shows exactly `pixel`.
fn shows(gpu: &SimGpu, s: u32, pixel: impl Fn(u32, u32) -> u32) -> bool {
    let v = gpu.scanout(s).unwrap();
    v.width == W
        && v.height == H
        && (0..H).all(|y| (0..W).all(|x| v.pixel(x, y) == Some(pixel(x, y))))
}

#[test]
fn three_vms_share_one_gpu_each_on_its_own_scanout() {
    let mut w = World::new(3, true);
    let mut gpu = sim_gpu(3);
    let mut backings = Vec::new();
    for i in 0..3 {
        backings.push(bring_up(&mut w, i, &mut gpu, 0));
    }
    for i in 0..3 {
        assert!(shows(&gpu, i as u32, pattern(w.vm(i), 0)), "scanout {i}");
    }
    // A framebuffer-console style partial update: an 8x16 glyph at (16, 8),
    // transferred with offset = y * stride + x * 4, then flushed.
    let glyph = Rect {
        x: 16,
        y: 8,
        width: 8,
        height: 16,
    };
    let vm = w.vm(1);
    let updated = move |x: u32, y: u32| {
        let inside = (16..24).contains(&x) && (8..24).contains(&y);
        pattern(vm, if inside { 1 } else { 0 })(x, y)
    };
    paint(&mut w.guests[1], &backings[1], W, H, updated);
    let resps = exchange(
        &mut w,
        1,
        &[
            req(Command::TransferToHost2d {
                rect: glyph,
                offset: u64::from(8 * W * 4 + 16 * 4),
                resource_id: 2,
            }),
            req(Command::ResourceFlush {
                rect: glyph,
                resource_id: 2,
            }),
        ],
        &mut gpu,
    );
    assert_eq!(resps, vec![Response::OkNoData; 2]);
    assert!(shows(&gpu, 1, updated));
    assert!(shows(&gpu, 0, pattern(w.vm(0), 0)));
    assert!(shows(&gpu, 2, pattern(w.vm(2), 0)));
    // The GPU only ever reached memory the mediator had mapped, and was never
    // handed a command it refused.
    assert!(w.faults.is_empty(), "{:?}", w.faults);
    assert_eq!(gpu.errors(), 0);
    // One mapping per scattered run, per VM.
    for i in 0..3 {
        assert_eq!(w.iommu.of(w.vm(i)), 3);
    }
}

#[test]
fn a_fenced_cursor_upload_then_the_cursor_queue() {
    let mut w = World::new(2, true);
    let mut gpu = sim_gpu(2);
    bring_up(&mut w, 1, &mut gpu, 0);
    // As Linux does for the cursor: create 64x64, attach, fenced TRANSFER, wait
    // for the fence, then UPDATE_CURSOR on the cursor queue.
    let cursor_backing = entries(FB.offset(0x60_0000), 64 * 64 * 4, 1);
    paint(&mut w.guests[1], &cursor_backing, 64, 64, |x, y| {
        0xff00_0000 | (y << 8) | x
    });
    let setup = [
        req(Command::ResourceCreate2d {
            resource_id: 3,
            format: format::B8G8R8A8_UNORM,
            width: 64,
            height: 64,
        }),
        req(Command::ResourceAttachBacking {
            resource_id: 3,
            entries: cursor_backing,
        }),
    ];
    assert_eq!(
        exchange(&mut w, 1, &setup, &mut gpu),
        vec![Response::OkNoData; 2]
    );
    let head = w.send(
        1,
        QueueId::Control,
        &fenced(
            Command::TransferToHost2d {
                rect: rect(64, 64),
                offset: 0,
                resource_id: 3,
            },
            1,
        ),
    );
    assert!(
        w.guests[1].take_used(QueueId::Control).is_empty(),
        "fence not signalled yet"
    );
    w.med.take_interrupts();
    w.guests[1].arm(QueueId::Control);
    w.run_all(1, &mut gpu);
    let used = w.guests[1].take_used(QueueId::Control);
    let (h, r) = used[0].resp.clone().unwrap();
    assert_eq!((used[0].head, r, h.fence_id), (head, Response::OkNoData, 1));
    assert_eq!(w.med.take_interrupts(), vec![(2, VECTORS[1])]);

    let pos = CursorPos {
        scanout_id: 0,
        x: 100,
        y: 50,
        padding: 0,
    };
    w.send(
        1,
        QueueId::Cursor,
        &req(Command::UpdateCursor {
            pos,
            resource_id: 3,
            hot_x: 4,
            hot_y: 4,
        }),
    );
    w.send(
        1,
        QueueId::Cursor,
        &req(Command::MoveCursor {
            pos: CursorPos { x: 101, ..pos },
        }),
    );
    w.run_all(1, &mut gpu);
    let c = gpu.cursor();
    assert_eq!(
        c.resource_id,
        w.med.vm(2).unwrap().host_resource(3).unwrap()
    );
    assert_eq!((c.pos.scanout_id, c.pos.x, c.pos.y), (1, 101, 50));
    assert_eq!(c.image[64 + 3], 0xff00_0000 | (1 << 8) | 3);
    assert_eq!(w.guests[1].take_used(QueueId::Cursor).len(), 2);
    assert_eq!(gpu.errors(), 0);
}

#[test]
fn isolation_attacks_are_refused_before_the_gpu_and_change_nothing() {
    let mut w = World::new(2, true);
    let mut gpu = sim_gpu(2);
    bring_up(&mut w, 0, &mut gpu, 0);
    // VM 2 has its own resource 5 only.
    let mine = [req(Command::ResourceCreate2d {
        resource_id: 5,
        format: format::B8G8R8X8_UNORM,
        width: W,
        height: H,
    })];
    assert_eq!(
        exchange(&mut w, 1, &mine, &mut gpu),
        vec![Response::OkNoData]
    );
    let before = gpu.scanout(0).unwrap().checksum();
    let host1 = w.med.vm(1).unwrap().host_resource(2).unwrap();
    let full = rect(W, H);
    let attacks = [
        // VM 1's guest id and host id.
        (
            req(Command::ResourceFlush {
                rect: full,
                resource_id: 2,
            }),
            wire::RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            req(Command::ResourceFlush {
                rect: full,
                resource_id: host1,
            }),
            wire::RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            req(Command::SetScanout {
                rect: full,
                scanout_id: 0,
                resource_id: 2,
            }),
            wire::RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            req(Command::ResourceUnref { resource_id: host1 }),
            wire::RESP_ERR_INVALID_RESOURCE_ID,
        ),
        // VM 1's scanout (VM 2 has only its scanout 0, physical 1).
        (
            req(Command::SetScanout {
                rect: full,
                scanout_id: 1,
                resource_id: 5,
            }),
            wire::RESP_ERR_INVALID_SCANOUT_ID,
        ),
        // VM 1's pages, by VM 1's guest address range seen as host memory, and
        // beyond VM 2's RAM.
        (
            req(Command::ResourceAttachBacking {
                resource_id: 5,
                entries: vec![MemEntry {
                    addr: host_addr(0, FB).get(),
                    length: 4096,
                    padding: 0,
                }],
            }),
            wire::RESP_ERR_UNSPEC,
        ),
        (
            req(Command::ResourceAttachBacking {
                resource_id: 5,
                entries: vec![MemEntry {
                    addr: RAM as u64,
                    length: 4096,
                    padding: 0,
                }],
            }),
            wire::RESP_ERR_UNSPEC,
        ),
        // A transfer from backing it never attached.
        (
            req(Command::TransferToHost2d {
                rect: full,
                offset: 0,
                resource_id: 5,
            }),
            wire::RESP_ERR_UNSPEC,
        ),
    ];
    for (r, code) in &attacks {
        assert_eq!(
            exchange(&mut w, 1, core::slice::from_ref(r), &mut gpu),
            vec![Response::Err(*code)],
            "{r:?}"
        );
    }
    // Forged and replayed fences.
    let fenced_flush = |f| {
        fenced(
            Command::ResourceFlush {
                rect: full,
                resource_id: 5,
            },
            f,
        )
    };
    assert_eq!(
        exchange(&mut w, 1, &[fenced_flush(7)], &mut gpu),
        vec![Response::OkNoData]
    );
    for f in [7, 6] {
        assert_eq!(
            exchange(&mut w, 1, &[fenced_flush(f)], &mut gpu),
            vec![Response::Err(wire::RESP_ERR_INVALID_PARAMETER)]
        );
    }
    let c = w.med.counters().vm(2).unwrap();
    assert_eq!(c.rejected(RejectReason::FenceReplay), 1);
    assert_eq!(c.rejected(RejectReason::FenceForged), 1);
    assert_eq!(c.rejected(RejectReason::OutOfRange), 2);
    // Nothing reached the GPU that it refused, VM 1's screen and resource are as
    // they were, and no page of VM 1 was ever mapped for VM 2.
    assert_eq!(gpu.errors(), 0);
    assert_eq!(gpu.scanout(0).unwrap().checksum(), before);
    assert!(gpu.resource(host1).is_some());
    assert!(w
        .iommu
        .maps
        .iter()
        .all(|&(vm, hpa, _)| vm != 2 || hpa >= host_base(1)));
    assert!(w.faults.is_empty());
}

#[test]
fn a_hung_vm_is_reset_and_restarted_while_its_neighbour_keeps_drawing() {
    let mut w = World::new(2, true);
    let mut gpu = sim_gpu(2);
    w.med.tick(0);
    bring_up(&mut w, 0, &mut gpu, 0);
    let b2 = bring_up(&mut w, 1, &mut gpu, 0);
    let vm1_hosts: Vec<u32> = w.med.vm(1).unwrap().host_resources().collect();

    // VM 1's next frame goes to the GPU and never completes.
    let frame = [
        req(Command::TransferToHost2d {
            rect: rect(W, H),
            offset: 0,
            resource_id: 2,
        }),
        req(Command::ResourceFlush {
            rect: rect(W, H),
            resource_id: 2,
        }),
    ];
    for r in &frame {
        w.guests[0].add(QueueId::Control, r);
    }
    w.doorbell(0, QueueId::Control);
    let lost = w.med.take_batch(1, 16).unwrap();
    // VM 2 keeps drawing meanwhile.
    paint(&mut w.guests[1], &b2, W, H, pattern(2, 1));
    assert_eq!(
        exchange(&mut w, 1, &frame, &mut gpu),
        vec![Response::OkNoData; 2]
    );
    assert_eq!(w.med.tick(DEFAULT_WATCHDOG_NS + 1), vec![1]);
    assert_eq!(w.med.device_status(1), Some(DEVICE_NEEDS_RESET));

    // The hypervisor resets VM 1's channel; the cleanup runs on the GPU.
    let report = w.med.reset_vm(1).unwrap();
    w.iommu.apply_reset(1, &report);
    assert_eq!(report.dropped, 2);
    w.run_all(0, &mut gpu);
    assert!(gpu.resource_ids().all(|id| !vm1_hosts.contains(&id)));
    assert!(!gpu.scanout(0).unwrap().enabled());
    assert_eq!(w.iommu.of(1), 0);
    assert_eq!(w.med.vm(1).unwrap().host_resources().count(), 0);
    assert_eq!(w.med.vram_used(), u64::from(W * H * 4));
    // The lost batch completing late changes nothing.
    let late: Vec<Completion> = lost
        .commands
        .iter()
        .map(|c| Completion {
            host_fence: c.host_fence,
            status: wire::RESP_OK_NODATA,
        })
        .collect();
    let r = w
        .med
        .complete_batch(1, &late, &mut w.guests[0].mem)
        .unwrap();
    assert_eq!((r.completed, r.stale, r.returned), (0, 2, 0));

    // VM 2 was untouched: its screen shows its latest frame, it keeps working.
    assert!(shows(&gpu, 1, pattern(2, 1)));
    paint(&mut w.guests[1], &b2, W, H, pattern(2, 2));
    assert_eq!(
        exchange(&mut w, 1, &frame, &mut gpu),
        vec![Response::OkNoData; 2]
    );
    assert!(shows(&gpu, 1, pattern(2, 2)));

    // VM 1's driver resets the device and starts over from scratch.
    w.med.driver_reset(1).unwrap();
    w.guests[0].reinit_queues(true);
    w.start(0, true);
    assert_eq!(w.med.device_status(1), Some(0));
    bring_up(&mut w, 0, &mut gpu, 3);
    assert!(shows(&gpu, 0, pattern(1, 3)));
    assert!(w.faults.is_empty());
    let ev = w.med.take_events();
    assert!(ev
        .iter()
        .any(|e| e.vm == 1 && matches!(e.kind, EventKind::CommandTimeout { .. })));
    assert!(ev
        .iter()
        .any(|e| e.vm == 1 && matches!(e.kind, EventKind::ChannelReset { forced: true, .. })));
    assert!(ev
        .iter()
        .filter(|e| e.vm == 2)
        .all(|e| e.channel == Channel::Operational));
}

#[test]
fn a_snapshot_restored_elsewhere_behaves_identically() {
    let mut a = World::new(1, true);
    let mut gpu_a = sim_gpu(1);
    let backing = bring_up(&mut a, 0, &mut gpu_a, 0);
    let fenced_frame = |f| {
        vec![
            fenced(
                Command::TransferToHost2d {
                    rect: rect(W, H),
                    offset: 0,
                    resource_id: 2,
                },
                f,
            ),
            req(Command::ResourceFlush {
                rect: rect(W, H),
                resource_id: 2,
            }),
        ]
    };
    assert_eq!(
        exchange(&mut a, 0, &fenced_frame(1), &mut gpu_a),
        vec![Response::OkNoData; 2]
    );
    a.med.take_interrupts();
    let bytes = a.med.snapshot(1).unwrap();

    // Elsewhere: a fresh mediator and GPU, the guest's memory and driver state
    // as migrated, the VM at another host address.
    let mut b = World::new(0, true);
    let mut gpu_b = sim_gpu(1);
    b.med
        .add_vm(
            1,
            VmGpuConfig::new(vec![ScanoutConfig {
                physical: 0,
                width: 640,
                height: 480,
            }]),
        )
        .unwrap();
    let mut g = a.guests[0].clone();
    g.mem.host_base = host_base(7);
    b.guests.push(g);
    b.med.restore(1, &bytes, &b.guests[0].mem).unwrap();
    b.sync_iommu();
    b.run_all(0, &mut gpu_b);
    assert!(shows(&gpu_b, 0, pattern(1, 0)));
    assert!(b.guests[0].take_used(QueueId::Control).is_empty());
    assert!(b.faults.is_empty());

    // The same further traffic on both, including refusals and a fence replay.
    let vm_a = a.med.vm(1).unwrap();
    let vm_b = b.med.vm(1).unwrap();
    assert_eq!(
        (vm_a.last_fence_submitted(), vm_a.resource_count()),
        (vm_b.last_fence_submitted(), vm_b.resource_count())
    );
    let further = |w: &mut World, gpu: &mut SimGpu| {
        paint(&mut w.guests[0], &backing, W, H, pattern(1, 5));
        let mut reqs = fenced_frame(2);
        reqs.push(fenced(Command::GetDisplayInfo, 2));
        reqs.push(req(Command::ResourceFlush {
            rect: rect(W, H),
            resource_id: 9,
        }));
        reqs.extend(fenced_frame(3));
        exchange(w, 0, &reqs, gpu)
    };
    let resps = further(&mut a, &mut gpu_a);
    assert_eq!(further(&mut b, &mut gpu_b), resps);
    assert_eq!(resps[3], Response::Err(wire::RESP_ERR_INVALID_RESOURCE_ID));
    assert!(shows(&gpu_a, 0, pattern(1, 5)));
    assert!(shows(&gpu_b, 0, pattern(1, 5)));
    assert_eq!(
        a.guests[0].mem.bytes, b.guests[0].mem.bytes,
        "guest memory differs"
    );
    assert_eq!(a.med.take_interrupts(), b.med.take_interrupts());
    let (va, vb) = (a.med.vm(1).unwrap(), b.med.vm(1).unwrap());
    assert_eq!(va.last_fence_signalled(), 3);
    assert_eq!(
        (
            va.last_fence_signalled(),
            va.resource_count(),
            va.vram_used(),
            va.unanswered()
        ),
        (
            vb.last_fence_signalled(),
            vb.resource_count(),
            vb.vram_used(),
            vb.unanswered()
        )
    );
    assert_eq!(
        a.med.counters().vm(1).unwrap().rejected_total(),
        b.med.counters().vm(1).unwrap().rejected_total()
    );
    // Snapshots of both are identical but for the counters of work the
    // restore itself did (its rebuild commands).
    let (sa, sb) = (a.med.snapshot(1).unwrap(), b.med.snapshot(1).unwrap());
    let counters_at = sa.len() - VmCounters::default().to_bytes().len();
    assert_eq!(sa[..counters_at], sb[..counters_at]);
}

#[test]
fn a_batch_lost_in_a_reset_but_run_late_by_the_gpu_leaves_no_trace() {
    let mut w = World::new(2, true);
    let mut gpu = sim_gpu(2);
    bring_up(&mut w, 1, &mut gpu, 0);
    // VM 1 creates and attaches; the batch is on the GPU when VM 1 is reset.
    let backing = scattered_backing(u64::from(W * H * 4));
    for r in &linux_bring_up(&backing)[2..5] {
        w.guests[0].add(QueueId::Control, r);
    }
    w.doorbell(0, QueueId::Control);
    let lost = w.med.take_batch(1, 16).unwrap();
    let report = w.med.reset_vm(1).unwrap();
    // The maps were applied (the batch was submitted), so the reset unmaps them.
    assert_eq!(report.unmapped.len(), 3);
    // The GPU still runs the lost batch (in ring order, before the cleanup) ...
    {
        let view = HostView {
            guests: &mut w.guests,
            iommu: &w.iommu,
            faults: RefCell::new(Vec::new()),
        };
        for c in &lost.commands {
            assert_eq!(gpu.execute(&c.request, &view).response, Response::OkNoData);
        }
    }
    assert!(gpu.scanout(0).unwrap().enabled());
    w.iommu.apply_reset(1, &report);
    // ... and the cleanup then removes everything it made.
    w.run_all(0, &mut gpu);
    let vm2: Vec<u32> = w.med.vm(2).unwrap().host_resources().collect();
    assert!(gpu.resource_ids().all(|id| vm2.contains(&id)));
    assert!(!gpu.scanout(0).unwrap().enabled());
    assert!(shows(&gpu, 1, pattern(2, 0)));
    assert_eq!(w.iommu.of(1), 0);
    assert_eq!(w.med.vm(1).unwrap().host_resources().count(), 0);
}
