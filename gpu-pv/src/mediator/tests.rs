//! Unit tests of the mediator: each per-VM and cross-VM rule on its own, driven
//! through real virtqueues in guest memory (see [`super::harness`]).

use alloc::vec;
use alloc::vec::Vec;

use super::harness::*;
use super::*;
use crate::command::{edid_for, Command, Response};
use crate::memory::VecMemory;
use crate::ring::driver::DriverQueue;
use crate::wire::{format, CursorPos, MemEntry};

fn create(id: u32, width: u32, height: u32) -> Command {
    Command::ResourceCreate2d {
        resource_id: id,
        format: format::B8G8R8X8_UNORM,
        width,
        height,
    }
}

fn attach(id: u32, gpa: Gpa, len: u64, pieces: u64) -> Command {
    Command::ResourceAttachBacking {
        resource_id: id,
        entries: entries(gpa, len, pieces),
    }
}

fn flush(id: u32, width: u32, height: u32) -> Command {
    Command::ResourceFlush {
        rect: rect(width, height),
        resource_id: id,
    }
}

fn err(code: u32) -> Response {
    Response::Err(code)
}

/// Creates resource `id` (w x h) with backing at `gpa` for guest `i`.
fn make_resource(w: &mut World, i: usize, id: u32, width: u32, height: u32, gpa: Gpa) {
    let len = u64::from(width) * u64::from(height) * 4;
    assert_eq!(
        w.call(i, &req(create(id, width, height)), &mut NullGpu),
        Response::OkNoData
    );
    assert_eq!(
        w.call(i, &req(attach(id, gpa, len, 2)), &mut NullGpu),
        Response::OkNoData
    );
}

/// The host commands of VM `vm` the GPU has run so far.
fn host_cmds(w: &World, vm: VmId) -> Vec<&HostCommand> {
    w.log
        .iter()
        .filter(|(v, _)| *v == vm)
        .flat_map(|(_, c)| c.iter())
        .collect()
}

fn last_host_cmd(w: &World, vm: VmId) -> Command {
    host_cmds(w, vm)
        .last()
        .expect("a host command")
        .request
        .cmd
        .clone()
}

fn rejected(w: &World, vm: VmId, reason: RejectReason) -> u64 {
    w.med.counters().vm(vm).unwrap().rejected(reason)
}

fn scanout(physical: u32) -> ScanoutConfig {
    ScanoutConfig {
        physical,
        width: 640,
        height: 480,
    }
}

#[test]
fn vms_get_their_own_scanouts_and_a_quarter_of_vram_by_default() {
    let mut m = Mediator::new(MediatorConfig::new(VRAM, 3));
    m.add_vm(1, VmGpuConfig::new(vec![scanout(0)])).unwrap();
    assert_eq!(m.vm(1).unwrap().vram_quota(), VRAM / 4);
    assert_eq!(m.vm(1).unwrap().state(), VmState::Reset);
    assert_eq!(
        m.add_vm(1, VmGpuConfig::new(vec![scanout(1)])),
        Err(MediatorError::VmExists(1))
    );
    assert_eq!(
        m.add_vm(2, VmGpuConfig::new(vec![scanout(0)])),
        Err(MediatorError::ScanoutUnavailable(0))
    );
    assert_eq!(
        m.add_vm(2, VmGpuConfig::new(vec![scanout(3)])),
        Err(MediatorError::ScanoutUnavailable(3))
    );
    assert_eq!(
        m.add_vm(2, VmGpuConfig::new(vec![scanout(1), scanout(1)])),
        Err(MediatorError::ScanoutUnavailable(1))
    );
    assert_eq!(
        m.add_vm(2, VmGpuConfig::new(vec![])),
        Err(MediatorError::BadScanoutCount(0))
    );
    let mut cfg = VmGpuConfig::new(vec![scanout(1), scanout(2)]);
    cfg.vram_quota = Some(1 << 20);
    m.add_vm(2, cfg).unwrap();
    assert_eq!(m.vm(2).unwrap().vram_quota(), 1 << 20);

    let bad = QueueLayout {
        size: 3,
        ..control_layout(true)
    };
    assert_eq!(
        m.start_queues(1, bad, cursor_layout(true)),
        Err(MediatorError::BadQueue(RingError::BadQueueSize))
    );
    assert_eq!(
        m.start_queues(9, control_layout(true), cursor_layout(true)),
        Err(MediatorError::UnknownVm(9))
    );
    m.start_queues(1, control_layout(true), cursor_layout(true))
        .unwrap();
    assert_eq!(
        m.start_queues(1, control_layout(true), cursor_layout(true)),
        Err(MediatorError::WrongState(VmState::Active))
    );
    let ev = m.take_events();
    assert!(ev.iter().all(|e| e.channel == Channel::Operational));
    assert!(ev.contains(&Event {
        vm: 2,
        channel: Channel::Operational,
        kind: EventKind::Attached {
            scanouts: 2,
            vram_quota: 1 << 20
        }
    }));
}

#[test]
fn display_info_and_edid_describe_only_the_vms_own_display() {
    let mut w = World::with_displays(&[(800, 600), (1024, 768)], true);
    assert_eq!(
        w.call(0, &req(Command::GetDisplayInfo), &mut NullGpu),
        Response::DisplayInfo(vec![(rect(800, 600), true)])
    );
    assert_eq!(
        w.call(1, &req(Command::GetDisplayInfo), &mut NullGpu),
        Response::DisplayInfo(vec![(rect(1024, 768), true)])
    );
    assert_eq!(
        w.call(1, &req(Command::GetEdid { scanout: 0 }), &mut NullGpu),
        Response::Edid(edid_for(1024, 768).to_vec())
    );
    // VM 2 has one scanout; "scanout 1" is not its to ask about.
    assert_eq!(
        w.call(1, &req(Command::GetEdid { scanout: 1 }), &mut NullGpu),
        err(wire::RESP_ERR_INVALID_SCANOUT_ID)
    );
    assert_eq!(rejected(&w, 2, RejectReason::BadScanout), 1);
    // Emulated: nothing reached the GPU.
    assert!(w.log.is_empty());
}

#[test]
fn emulated_answers_come_back_at_once() {
    let mut w = World::new(1, true);
    w.guests[0].arm(QueueId::Control);
    let head = w.send(0, QueueId::Control, &req(Command::GetDisplayInfo));
    let used = w.guests[0].take_used(QueueId::Control);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].head, head);
    assert_eq!(used[0].written, wire::size::RESP_DISPLAY_INFO as u32);
    assert_eq!(w.med.take_interrupts(), vec![(1, VECTORS[1])]);
    assert_eq!(w.med.vm(1).unwrap().staged_len(), 0);
}

#[test]
fn responses_to_gpu_commands_wait_for_the_gpu() {
    let mut w = World::new(1, true);
    let head = w.send(0, QueueId::Control, &req(create(2, 64, 64)));
    assert!(w.guests[0].take_used(QueueId::Control).is_empty());
    assert_eq!(w.med.vm(1).unwrap().staged_len(), 1);
    w.run_all(0, &mut NullGpu);
    let used = w.guests[0].take_used(QueueId::Control);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].head, head);
    assert_eq!(used[0].resp.as_ref().unwrap().1, Response::OkNoData);
}

#[test]
fn resource_ids_are_renamed_into_one_host_namespace() {
    let mut w = World::new(2, true);
    assert_eq!(
        w.call(0, &req(create(2, 64, 64)), &mut NullGpu),
        Response::OkNoData
    );
    assert_eq!(
        w.call(1, &req(create(2, 32, 32)), &mut NullGpu),
        Response::OkNoData
    );
    let h1 = w.med.vm(1).unwrap().host_resource(2).unwrap();
    let h2 = w.med.vm(2).unwrap().host_resource(2).unwrap();
    assert_ne!(h1, h2);
    assert_eq!(
        last_host_cmd(&w, 1),
        Command::ResourceCreate2d {
            resource_id: h1,
            format: format::B8G8R8X8_UNORM,
            width: 64,
            height: 64
        }
    );
    // The host header carries nothing of the guest's: type, FLAG_FENCE, host fence.
    let hc = host_cmds(&w, 2)[0];
    assert_eq!(hc.request.hdr.flags, wire::FLAG_FENCE);
    assert_eq!(hc.request.hdr.fence_id, hc.host_fence);
    assert_eq!(hc.request.hdr.ctx_id, 0);
    let mut bytes = Vec::new();
    command::encode(&hc.request, &mut bytes);
    assert_eq!(bytes, hc.bytes);

    // VM 1 has resource 3, VM 2 does not: VM 2 cannot name it, nor VM 1's host id.
    assert_eq!(
        w.call(0, &req(create(3, 8, 8)), &mut NullGpu),
        Response::OkNoData
    );
    let h3 = w.med.vm(1).unwrap().host_resource(3).unwrap();
    for id in [3, h1, h3, 0, u32::MAX] {
        if id == 2 {
            continue;
        }
        assert_eq!(
            w.call(1, &req(flush(id, 1, 1)), &mut NullGpu),
            err(wire::RESP_ERR_INVALID_RESOURCE_ID),
            "resource {id}"
        );
    }
    assert_eq!(
        w.call(1, &req(create(2, 8, 8)), &mut NullGpu),
        err(wire::RESP_ERR_INVALID_RESOURCE_ID)
    );
    assert_eq!(
        w.call(1, &req(create(0, 8, 8)), &mut NullGpu),
        err(wire::RESP_ERR_INVALID_RESOURCE_ID)
    );
    assert!(rejected(&w, 2, RejectReason::BadResource) >= 4);
    assert_eq!(rejected(&w, 1, RejectReason::BadResource), 0);
}

#[test]
fn create_checks_format_and_size() {
    let mut w = World::new(1, true);
    let bad = [
        Command::ResourceCreate2d {
            resource_id: 2,
            format: 99,
            width: 8,
            height: 8,
        },
        create(2, 0, 8),
        create(2, 8, limits::MAX_RESOURCE_DIM + 1),
    ];
    for c in bad {
        assert_eq!(
            w.call(0, &req(c), &mut NullGpu),
            err(wire::RESP_ERR_INVALID_PARAMETER)
        );
    }
    assert_eq!(rejected(&w, 1, RejectReason::BadParameter), 3);
    assert_eq!(w.med.vm(1).unwrap().resource_count(), 0);
}

#[test]
fn backing_is_translated_merged_and_mapped_until_detached() {
    let mut w = World::new(2, true);
    w.call(1, &req(create(2, 64, 64)), &mut NullGpu);
    // 16 KiB in four 4 KiB entries, guest-contiguous and so host-contiguous.
    assert_eq!(
        w.call(1, &req(attach(2, FB, 16384, 4)), &mut NullGpu),
        Response::OkNoData
    );
    let host = w.med.vm(2).unwrap().host_resource(2).unwrap();
    let hpa = host_addr(1, FB);
    assert_eq!(
        last_host_cmd(&w, 2),
        Command::ResourceAttachBacking {
            resource_id: host,
            entries: vec![MemEntry {
                addr: hpa.get(),
                length: 16384,
                padding: 0
            }]
        }
    );
    assert_eq!(w.iommu.maps, vec![(2, hpa, 16384)]);
    // Attaching twice is refused (and maps nothing more).
    assert_eq!(
        w.call(1, &req(attach(2, FB, 16384, 1)), &mut NullGpu),
        err(wire::RESP_ERR_UNSPEC)
    );
    assert_eq!(w.iommu.maps.len(), 1);

    // The unmap is reported only once the detach has completed on the GPU.
    w.send(
        1,
        QueueId::Control,
        &req(Command::ResourceDetachBacking { resource_id: 2 }),
    );
    assert_eq!(w.iommu.maps.len(), 1);
    w.run_all(1, &mut NullGpu);
    assert!(w.iommu.maps.is_empty());
    assert_eq!(
        w.call(
            1,
            &req(Command::ResourceDetachBacking { resource_id: 2 }),
            &mut NullGpu
        ),
        err(wire::RESP_ERR_UNSPEC)
    );
}

#[test]
fn backing_outside_the_vms_ram_is_refused_and_logged() {
    let mut w = World::new(1, true);
    w.call(0, &req(create(2, 64, 64)), &mut NullGpu);
    let outside = [
        vec![MemEntry {
            addr: RAM as u64 - 4096,
            length: 8192,
            padding: 0,
        }],
        vec![MemEntry {
            addr: u64::MAX - 100,
            length: 4096,
            padding: 0,
        }],
        // Another VM's host address is just an address outside this VM's RAM.
        vec![MemEntry {
            addr: host_addr(1, FB).get(),
            length: 4096,
            padding: 0,
        }],
    ];
    for e in outside {
        let c = Command::ResourceAttachBacking {
            resource_id: 2,
            entries: e,
        };
        assert_eq!(w.call(0, &req(c), &mut NullGpu), err(wire::RESP_ERR_UNSPEC));
    }
    assert_eq!(rejected(&w, 1, RejectReason::OutOfRange), 3);
    let ev = w.med.take_events();
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e.kind, EventKind::DmaFault { .. }) && e.channel == Channel::Debug)
            .count(),
        3
    );
    assert!(w.iommu.maps.is_empty());
    // Zero-length entries and backing far larger than the resource are refused too.
    for e in [entries(FB, 0, 1), entries(FB, 8 << 20, 1)] {
        let e = if e.is_empty() {
            vec![MemEntry::default()]
        } else {
            e
        };
        let c = Command::ResourceAttachBacking {
            resource_id: 2,
            entries: e,
        };
        assert_eq!(
            w.call(0, &req(c), &mut NullGpu),
            err(wire::RESP_ERR_INVALID_PARAMETER)
        );
    }
}

/// Guest memory with a range that is RAM but not the VM's (M(i) false), and that
/// is host-contiguous only page by page.
struct Holey<'a> {
    inner: &'a mut VecMemory,
    hole: (Gpa, Gpa),
}

impl GuestMemory for Holey<'_> {
    fn translate(&self, gpa: Gpa, len: u64) -> Result<Hpa, MemError> {
        let end = gpa.checked_add(len).ok_or(MemError::Overflow)?;
        if gpa < self.hole.1 && end > self.hole.0 {
            return Err(MemError::NotOwned);
        }
        // Pages are host-contiguous one at a time only.
        if gpa.get() / 4096 != (end.get().max(1) - 1) / 4096 {
            return Err(MemError::OutOfRange);
        }
        self.inner.translate(gpa, len)
    }
    fn read(&self, gpa: Gpa, out: &mut [u8]) -> Result<(), MemError> {
        self.inner.read(gpa, out)
    }
    fn write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), MemError> {
        self.inner.write(gpa, data)
    }
}

#[test]
fn backing_is_checked_page_by_page_and_ownership_is_enforced() {
    let mut w = World::new(1, true);
    w.call(0, &req(create(2, 64, 64)), &mut NullGpu);
    w.call(0, &req(create(3, 64, 64)), &mut NullGpu);
    let hole = (FB.offset(0x4000), FB.offset(0x5000));
    // Resource 2: 16 KiB ending where the hole starts: fine, page by page.
    // Resource 3: 8 KiB that overlaps the hole: refused as not owned.
    for (id, gpa, len, expect) in [
        (2, FB, 0x4000, Response::OkNoData),
        (3, FB.offset(0x3000), 0x2000, err(wire::RESP_ERR_UNSPEC)),
    ] {
        let g = &mut w.guests[0];
        g.add(QueueId::Control, &req(attach(id, gpa, len, 1)));
        g.kick(QueueId::Control);
        let mut m = Holey {
            inner: &mut g.mem,
            hole,
        };
        w.med.process_doorbell(1, QueueId::Control, &mut m).unwrap();
        w.run_all(0, &mut NullGpu);
        let used = w.guests[0].take_used(QueueId::Control);
        assert_eq!(used[0].resp.as_ref().unwrap().1, expect);
    }
    assert_eq!(rejected(&w, 1, RejectReason::NotOwned), 1);
    let Command::ResourceAttachBacking { entries, .. } = &host_cmds(&w, 1)[2].request.cmd else {
        panic!("attach expected");
    };
    // Four translated pages, merged back into one host run.
    assert_eq!(
        entries,
        &vec![MemEntry {
            addr: host_addr(0, FB).get(),
            length: 0x4000,
            padding: 0
        }]
    );
    assert!(w.med.take_events().iter().any(|e| e.kind
        == EventKind::DmaFault {
            gpa: FB.offset(0x4000),
            len: 0x1000,
            error: MemError::NotOwned
        }));
}

#[test]
fn transfers_and_rects_stay_inside_the_resource_and_its_backing() {
    let mut w = World::new(1, true);
    w.call(0, &req(create(2, 64, 64)), &mut NullGpu);
    let transfer = |r: Rect, offset: u64| {
        req(Command::TransferToHost2d {
            rect: r,
            offset,
            resource_id: 2,
        })
    };
    // No backing yet.
    assert_eq!(
        w.call(0, &transfer(rect(64, 64), 0), &mut NullGpu),
        err(wire::RESP_ERR_UNSPEC)
    );
    // Backing of 8 KiB: 32 rows of 256 bytes.
    w.call(0, &req(attach(2, FB, 8192, 1)), &mut NullGpu);
    assert_eq!(
        w.call(0, &transfer(rect(64, 32), 0), &mut NullGpu),
        Response::OkNoData
    );
    let row = Rect {
        x: 8,
        y: 31,
        width: 8,
        height: 1,
    };
    assert_eq!(
        w.call(0, &transfer(row, 31 * 256 + 32), &mut NullGpu),
        Response::OkNoData
    );
    for (r, off) in [
        (rect(64, 33), 0),
        (rect(65, 1), 0),
        (row, 31 * 256 + 232),
        (rect(1, 1), u64::MAX - 2),
        (
            Rect {
                x: u32::MAX,
                y: 0,
                width: 2,
                height: 1,
            },
            0,
        ),
    ] {
        assert_eq!(
            w.call(0, &transfer(r, off), &mut NullGpu),
            err(wire::RESP_ERR_INVALID_PARAMETER),
            "{r:?} at {off}"
        );
    }
    let f = Command::ResourceFlush {
        rect: Rect {
            x: 60,
            y: 0,
            width: 5,
            height: 1,
        },
        resource_id: 2,
    };
    assert_eq!(
        w.call(0, &req(f), &mut NullGpu),
        err(wire::RESP_ERR_INVALID_PARAMETER)
    );
    assert_eq!(rejected(&w, 1, RejectReason::BadParameter), 6);
}

#[test]
fn vram_quota_is_per_vm_and_given_back_on_unref() {
    let mut m = Mediator::new(MediatorConfig::new(VRAM, 2));
    let mut cfg = VmGpuConfig::new(vec![scanout(0)]);
    cfg.vram_quota = Some(1 << 20);
    m.add_vm(1, cfg).unwrap();
    let mut w = World::new(0, true);
    w.med = m;
    w.guests.push(Guest::new(1, host_base(0), true));
    w.start(0, true);

    assert_eq!(
        w.call(0, &req(create(2, 512, 512)), &mut NullGpu),
        Response::OkNoData
    );
    assert_eq!(w.med.vm(1).unwrap().vram_used(), 1 << 20);
    assert_eq!(
        w.call(0, &req(create(3, 1, 1)), &mut NullGpu),
        err(wire::RESP_ERR_OUT_OF_MEMORY)
    );
    assert_eq!(rejected(&w, 1, RejectReason::Quota), 1);
    assert_eq!(
        w.call(
            0,
            &req(Command::ResourceUnref { resource_id: 2 }),
            &mut NullGpu
        ),
        Response::OkNoData
    );
    assert_eq!(w.med.vram_used(), 0);
    assert_eq!(
        w.call(0, &req(create(3, 1, 1)), &mut NullGpu),
        Response::OkNoData
    );
    // The guest id is free again too.
    assert_eq!(
        w.call(0, &req(create(2, 1, 1)), &mut NullGpu),
        Response::OkNoData
    );
}

#[test]
fn vram_of_the_whole_gpu_is_shared_out() {
    // Four VMs with the default quota (a quarter each) fill the GPU exactly.
    let mut w = World::new(4, true);
    for i in 0..4 {
        // 2048 x 2048 x 4 = 16 MiB = VRAM / 4.
        assert_eq!(
            w.call(i, &req(create(2, 2048, 2048)), &mut NullGpu),
            Response::OkNoData
        );
    }
    assert_eq!(w.med.vram_used(), VRAM);
    assert_eq!(
        w.call(0, &req(create(3, 1, 1)), &mut NullGpu),
        err(wire::RESP_ERR_OUT_OF_MEMORY)
    );
}

#[test]
fn scanouts_and_cursors_reach_only_the_vms_own_scanouts() {
    let mut w = World::new(2, true);
    make_resource(&mut w, 1, 2, 64, 64, FB);
    let host = w.med.vm(2).unwrap().host_resource(2).unwrap();
    let set = |scanout_id, resource_id| {
        req(Command::SetScanout {
            rect: rect(64, 64),
            scanout_id,
            resource_id,
        })
    };
    assert_eq!(w.call(1, &set(0, 2), &mut NullGpu), Response::OkNoData);
    assert_eq!(
        last_host_cmd(&w, 2),
        Command::SetScanout {
            rect: rect(64, 64),
            scanout_id: 1,
            resource_id: host
        }
    );
    for s in [1, 2, u32::MAX] {
        assert_eq!(
            w.call(1, &set(s, 2), &mut NullGpu),
            err(wire::RESP_ERR_INVALID_SCANOUT_ID)
        );
    }
    // A rectangle outside the resource.
    let big = req(Command::SetScanout {
        rect: rect(65, 64),
        scanout_id: 0,
        resource_id: 2,
    });
    assert_eq!(
        w.call(1, &big, &mut NullGpu),
        err(wire::RESP_ERR_INVALID_PARAMETER)
    );
    // Disabling: resource 0.
    assert_eq!(w.call(1, &set(0, 0), &mut NullGpu), Response::OkNoData);
    assert_eq!(
        last_host_cmd(&w, 2),
        Command::SetScanout {
            rect: Rect::default(),
            scanout_id: 1,
            resource_id: 0
        }
    );

    // Cursor commands: direct descriptors, no response, renamed scanout.
    let pos = |scanout_id| CursorPos {
        scanout_id,
        x: 10,
        y: 20,
        padding: 0,
    };
    let update = |scanout_id, resource_id| {
        req(Command::UpdateCursor {
            pos: pos(scanout_id),
            resource_id,
            hot_x: 1,
            hot_y: 2,
        })
    };
    w.send(1, QueueId::Cursor, &update(0, 2));
    w.send(1, QueueId::Cursor, &update(1, 2));
    w.send(1, QueueId::Cursor, &update(0, 7));
    w.send(
        1,
        QueueId::Cursor,
        &req(Command::MoveCursor { pos: pos(0) }),
    );
    w.run_all(1, &mut NullGpu);
    let used = w.guests[1].take_used(QueueId::Cursor);
    assert_eq!(used.len(), 4);
    assert!(used.iter().all(|u| u.written == 0));
    let cursor_cmds: Vec<Command> = host_cmds(&w, 2)
        .into_iter()
        .filter(|c| c.queue == QueueId::Cursor)
        .map(|c| c.request.cmd.clone())
        .collect();
    assert_eq!(
        cursor_cmds,
        vec![
            Command::UpdateCursor {
                pos: pos(1),
                resource_id: host,
                hot_x: 1,
                hot_y: 2
            },
            Command::MoveCursor { pos: pos(1) },
        ]
    );
    assert_eq!(rejected(&w, 2, RejectReason::BadScanout), 4);
    assert_eq!(rejected(&w, 2, RejectReason::BadResource), 1);
}

#[test]
fn unsupported_malformed_and_misplaced_commands_are_refused() {
    let mut w = World::new(1, true);
    let answer = |w: &mut World, q: QueueId, parts: &[&[u8]]| {
        w.guests[0].add_raw(q, parts, 24);
        w.doorbell(0, q);
        w.run_all(0, &mut NullGpu);
        w.guests[0].take_used(q).remove(0)
    };
    let hdr = |t: u32, flags: u32| {
        let mut b = vec![0u8; 24];
        CtrlHdr {
            type_: t,
            flags,
            ..CtrlHdr::default()
        }
        .write(&mut b)
        .unwrap();
        b
    };
    // 3D commands are not offered.
    let mut capset = hdr(wire::CMD_GET_CAPSET_INFO, 0);
    capset.extend_from_slice(&[0; 8]);
    let r = answer(&mut w, QueueId::Control, &[&capset]);
    assert_eq!(r.resp.unwrap().1, err(wire::RESP_ERR_UNSPEC));
    assert_eq!(rejected(&w, 1, RejectReason::Unsupported), 1);
    // Short command, short header, bad flags.
    let r = answer(
        &mut w,
        QueueId::Control,
        &[&hdr(wire::CMD_RESOURCE_CREATE_2D, 0)],
    );
    assert_eq!(r.resp.unwrap().1, err(wire::RESP_ERR_UNSPEC));
    let r = answer(&mut w, QueueId::Control, &[&[1, 2, 3]]);
    assert_eq!(r.resp.unwrap().1, err(wire::RESP_ERR_UNSPEC));
    let r = answer(
        &mut w,
        QueueId::Control,
        &[&hdr(wire::CMD_GET_DISPLAY_INFO, 2)],
    );
    assert_eq!(r.resp.unwrap().1, err(wire::RESP_ERR_INVALID_PARAMETER));
    assert_eq!(rejected(&w, 1, RejectReason::Decode), 3);
    // Cursor commands on the control queue, control commands on the cursor queue.
    let mut mv = Vec::new();
    command::encode(
        &req(Command::MoveCursor {
            pos: CursorPos::default(),
        }),
        &mut mv,
    );
    let r = answer(&mut w, QueueId::Control, &[&mv]);
    assert_eq!(r.resp.unwrap().1, err(wire::RESP_ERR_UNSPEC));
    let r = answer(
        &mut w,
        QueueId::Cursor,
        &[&hdr(wire::CMD_GET_DISPLAY_INFO, 0)],
    );
    assert_eq!(r.written, 0);
    assert_eq!(rejected(&w, 1, RejectReason::Permission), 2);
    assert!(w.log.is_empty());
    let ev = w.med.take_events();
    assert!(ev.iter().any(|e| e.kind
        == EventKind::Rejected {
            queue: QueueId::Control,
            cmd_type: wire::CMD_GET_CAPSET_INFO,
            reason: RejectReason::Unsupported,
            response: wire::RESP_ERR_UNSPEC
        }));
}

#[test]
fn fences_are_shadowed_and_signalled_only_on_completion() {
    let mut w = World::new(2, true);
    // Another VM's traffic moves the host fence counter away from guest numbers.
    w.call(1, &req(create(2, 8, 8)), &mut NullGpu);
    w.call(0, &req(create(2, 8, 8)), &mut NullGpu);
    let head = w.send(0, QueueId::Control, &fenced(flush(2, 8, 8), 1));
    assert!(w.guests[0].take_used(QueueId::Control).is_empty());
    assert_eq!(w.med.vm(1).unwrap().last_fence_submitted(), 1);
    assert_eq!(w.med.vm(1).unwrap().last_fence_signalled(), 0);
    w.run_all(0, &mut NullGpu);
    let hc = host_cmds(&w, 1).last().copied().unwrap().clone();
    assert_ne!(hc.request.hdr.fence_id, 1);
    assert_eq!(
        w.med.route(hc.host_fence),
        None,
        "completed fences are unrouted"
    );
    let used = w.guests[0].take_used(QueueId::Control);
    assert_eq!(used[0].head, head);
    let (h, r) = used[0].resp.clone().unwrap();
    assert_eq!(r, Response::OkNoData);
    assert_eq!((h.flags, h.fence_id), (wire::FLAG_FENCE, 1));
    assert_eq!(w.med.vm(1).unwrap().last_fence_signalled(), 1);
}

#[test]
fn forged_and_replayed_fences_are_refused() {
    let mut w = World::new(1, true);
    w.call(0, &req(create(2, 8, 8)), &mut NullGpu);
    let fence_of = |w: &mut World, f: u64| {
        let head = w.send(0, QueueId::Control, &fenced(flush(2, 8, 8), f));
        w.run_all(0, &mut NullGpu);
        let used = w.guests[0].take_used(QueueId::Control);
        assert_eq!(used[0].head, head);
        used[0].resp.clone().unwrap()
    };
    let (h, r) = fence_of(&mut w, 5);
    assert_eq!((r, h.fence_id), (Response::OkNoData, 5));
    for (f, reason) in [
        (5, RejectReason::FenceReplay),
        (3, RejectReason::FenceForged),
        (0, RejectReason::FenceForged),
    ] {
        let (h, r) = fence_of(&mut w, f);
        assert_eq!(r, err(wire::RESP_ERR_INVALID_PARAMETER));
        // A refused fence is not echoed: it signals nothing.
        assert_eq!((h.flags, h.fence_id), (0, 0));
        assert_eq!(rejected(&w, 1, reason), 1 + u64::from(f == 0));
    }
    // An accepted fence on a command that is then refused still signals, in order.
    let (h, r) = fence_of(&mut w, 9);
    assert_eq!((r, h.fence_id), (Response::OkNoData, 9));
    let (h, r) = {
        let head = w.send(0, QueueId::Control, &fenced(flush(77, 8, 8), 10));
        let used = w.guests[0].take_used(QueueId::Control);
        assert_eq!(used[0].head, head);
        used[0].resp.clone().unwrap()
    };
    assert_eq!(
        (r, h.flags, h.fence_id),
        (
            err(wire::RESP_ERR_INVALID_RESOURCE_ID),
            wire::FLAG_FENCE,
            10
        )
    );
    assert_eq!(w.med.vm(1).unwrap().last_fence_signalled(), 10);
    // Fences on the cursor queue could never be signalled: refused.
    w.send(
        0,
        QueueId::Cursor,
        &fenced(
            Command::MoveCursor {
                pos: CursorPos::default(),
            },
            11,
        ),
    );
    assert_eq!(rejected(&w, 1, RejectReason::Permission), 1);
}

#[test]
fn fences_complete_in_submission_order_whatever_order_the_gpu_reports() {
    let mut w = World::new(1, true);
    w.call(0, &req(create(2, 8, 8)), &mut NullGpu);
    let mut heads = Vec::new();
    for f in 1..=3 {
        heads.push(w.send(0, QueueId::Control, &fenced(flush(2, 8, 8), f)));
    }
    // Emulated, but behind fenced work: it waits its turn.
    heads.push(w.send(0, QueueId::Control, &fenced(Command::GetDisplayInfo, 4)));
    heads.push(w.send(0, QueueId::Control, &fenced(flush(2, 8, 8), 5)));
    assert!(w.guests[0].take_used(QueueId::Control).is_empty());

    let batch = w.med.take_batch(1, 16).unwrap();
    assert_eq!(batch.commands.len(), 4);
    let fences: Vec<u64> = batch.commands.iter().map(|c| c.host_fence).collect();
    let done = |f: u64| Completion {
        host_fence: f,
        status: wire::RESP_OK_NODATA,
    };
    // The last command completes first: nothing may be returned yet.
    let r = w
        .med
        .complete_batch(1, &[done(fences[3])], &mut w.guests[0].mem)
        .unwrap();
    assert_eq!((r.completed, r.returned, r.batch_done), (1, 0, false));
    assert!(w.guests[0].take_used(QueueId::Control).is_empty());
    // Then the second: still waiting for the first.
    w.med
        .complete_batch(1, &[done(fences[1])], &mut w.guests[0].mem)
        .unwrap();
    assert!(w.guests[0].take_used(QueueId::Control).is_empty());
    // The first and third: everything comes back, in order.
    let r = w
        .med
        .complete_batch(1, &[done(fences[2]), done(fences[0])], &mut w.guests[0].mem)
        .unwrap();
    assert_eq!((r.returned, r.batch_done), (5, true));
    let used = w.guests[0].take_used(QueueId::Control);
    let got: Vec<(u16, u64)> = used
        .iter()
        .map(|u| (u.head, u.resp.as_ref().unwrap().0.fence_id))
        .collect();
    let want: Vec<(u16, u64)> = heads.iter().copied().zip(1..=5).collect();
    assert_eq!(got, want);
}

#[test]
fn one_batch_per_vm_is_in_flight_while_the_next_fills() {
    let mut w = World::new(2, true);
    for id in 2..5 {
        w.send(0, QueueId::Control, &req(create(id, 8, 8)));
    }
    w.send(1, QueueId::Control, &req(create(2, 8, 8)));
    let b1 = w.med.take_batch(1, 2).unwrap();
    assert_eq!(b1.commands.len(), 2);
    assert_eq!(w.med.take_batch(1, 2), None);
    // Another VM's batch is independent.
    let b2 = w.med.take_batch(2, 8).unwrap();
    assert_eq!(
        w.med.route(b2.commands[0].host_fence),
        Some((2, w.med.vm(2).unwrap().context_id()))
    );
    // More work fills the staging side meanwhile.
    w.send(0, QueueId::Control, &req(create(5, 8, 8)));
    assert_eq!(w.med.vm(1).unwrap().staged_len(), 2);
    let done: Vec<Completion> = b1
        .commands
        .iter()
        .map(|c| Completion {
            host_fence: c.host_fence,
            status: wire::RESP_OK_NODATA,
        })
        .collect();
    let r = w
        .med
        .complete_batch(1, &done, &mut w.guests[0].mem)
        .unwrap();
    assert!(r.batch_done);
    assert_eq!(w.med.take_batch(1, 8).unwrap().commands.len(), 2);
    assert_eq!(w.med.take_batch(1, 0), None);
}

#[test]
fn the_completions_of_a_batch_raise_one_interrupt_as_event_idx_allows() {
    let mut w = World::new(1, true);
    w.guests[0].arm(QueueId::Control);
    for id in 2..6 {
        w.send(0, QueueId::Control, &req(create(id, 8, 8)));
    }
    assert!(w.med.take_interrupts().is_empty());
    w.run_batch(0, 16, &mut NullGpu).unwrap();
    assert_eq!(w.med.take_interrupts(), vec![(1, VECTORS[1])]);
    assert_eq!(w.guests[0].take_used(QueueId::Control).len(), 4);

    // The guest asks to be told only after 10 more: no interrupt for 2.
    let g = &mut w.guests[0];
    let at = g.ctrl.last_used_idx().wrapping_add(10);
    g.ctrl.set_used_event(&mut g.mem, at).unwrap();
    for id in 6..8 {
        w.send(0, QueueId::Control, &req(create(id, 8, 8)));
    }
    w.run_batch(0, 16, &mut NullGpu).unwrap();
    assert!(w.med.take_interrupts().is_empty());
    assert_eq!(w.guests[0].take_used(QueueId::Control).len(), 2);

    // A queue with no vector raises nothing.
    w.med.set_vector(1, QueueId::Control, NO_VECTOR).unwrap();
    w.guests[0].arm(QueueId::Control);
    w.call(0, &req(create(9, 8, 8)), &mut NullGpu);
    assert!(w.med.take_interrupts().is_empty());
    assert_eq!(w.med.counters().vm(1).unwrap().interrupts_injected, 1);
}

#[test]
fn interrupts_follow_the_flags_without_event_idx() {
    let mut w = World::new(1, false);
    w.call(0, &req(create(2, 8, 8)), &mut NullGpu);
    assert_eq!(w.med.take_interrupts(), vec![(1, VECTORS[1])]);
    let g = &mut w.guests[0];
    g.ctrl.set_no_interrupt(&mut g.mem, true).unwrap();
    w.call(0, &req(create(3, 8, 8)), &mut NullGpu);
    assert!(w.med.take_interrupts().is_empty());
}

#[test]
fn stale_completions_are_ignored() {
    let mut w = World::new(2, true);
    w.send(0, QueueId::Control, &req(create(2, 8, 8)));
    let b = w.med.take_batch(1, 8).unwrap();
    let f = b.commands[0].host_fence;
    // Delivered to the wrong VM, or twice, or made up: ignored and logged.
    let c = Completion {
        host_fence: f,
        status: wire::RESP_OK_NODATA,
    };
    let r = w.med.complete_batch(2, &[c], &mut w.guests[1].mem).unwrap();
    assert_eq!((r.completed, r.stale), (0, 1));
    let r = w
        .med
        .complete_batch(1, &[c, c], &mut w.guests[0].mem)
        .unwrap();
    assert_eq!((r.completed, r.stale, r.returned), (1, 1, 1));
    assert_eq!(w.med.counters().spurious_interrupts, 2);
    assert!(w
        .med
        .take_events()
        .iter()
        .any(|e| e.vm == 2 && e.kind == EventKind::StaleCompletion { host_fence: f }));
}

#[test]
fn a_host_failure_undoes_the_create() {
    struct NoMemory;
    impl Gpu for NoMemory {
        fn execute(&mut self, c: &HostCommand, _: &mut HostView<'_>) -> u32 {
            match c.request.cmd {
                Command::ResourceCreate2d { .. } => wire::RESP_ERR_OUT_OF_MEMORY,
                _ => wire::RESP_OK_NODATA,
            }
        }
    }
    let mut w = World::new(1, true);
    w.send(0, QueueId::Control, &req(create(2, 64, 64)));
    w.send(0, QueueId::Control, &req(attach(2, FB, 16384, 1)));
    w.run_all(0, &mut NoMemory);
    let used = w.guests[0].take_used(QueueId::Control);
    assert_eq!(
        used[0].resp.as_ref().unwrap().1,
        err(wire::RESP_ERR_OUT_OF_MEMORY)
    );
    let v = w.med.vm(1).unwrap();
    assert_eq!(
        (
            v.resource_count(),
            v.vram_used(),
            v.host_resources().count()
        ),
        (0, 0, 0)
    );
    assert!(w.iommu.maps.is_empty());
    assert!(w.med.take_events().iter().any(|e| matches!(
        e.kind,
        EventKind::HostError {
            status: wire::RESP_ERR_OUT_OF_MEMORY,
            ..
        }
    )));
}

#[test]
fn the_watchdog_marks_only_the_hung_vm() {
    let mut w = World::new(2, true);
    w.med.tick(1_000);
    w.send(0, QueueId::Control, &req(create(2, 8, 8)));
    w.send(1, QueueId::Control, &req(create(2, 8, 8)));
    let _hung_batch = w.med.take_batch(1, 8).unwrap();
    w.run_all(1, &mut NullGpu);
    assert!(w.med.tick(1_000 + DEFAULT_WATCHDOG_NS).is_empty());
    assert_eq!(w.med.tick(1_001 + DEFAULT_WATCHDOG_NS), vec![1]);
    assert_eq!(w.med.vm(1).unwrap().state(), VmState::NeedsReset);
    assert_eq!(w.med.device_status(1), Some(DEVICE_NEEDS_RESET));
    assert_eq!(w.med.device_status(2), Some(0));
    assert!(w.med.take_interrupts().contains(&(1, VECTORS[0])));
    assert!(w.med.take_events().iter().any(|e| e.vm == 1
        && e.channel == Channel::Debug
        && matches!(e.kind, EventKind::CommandTimeout { .. })));
    assert_eq!(
        w.med
            .process_doorbell(1, QueueId::Control, &mut w.guests[0].mem),
        Err(MediatorError::WrongState(VmState::NeedsReset))
    );
    // Marked once only.
    assert!(w.med.tick(10 * DEFAULT_WATCHDOG_NS).is_empty());
    assert_eq!(
        w.call(1, &req(create(3, 8, 8)), &mut NullGpu),
        Response::OkNoData
    );
}

#[test]
fn a_create_still_staged_at_a_reset_is_not_unrefd_and_its_id_is_free() {
    // Found by the simulation: a VM reset while its CREATE waited for its slice
    // got a cleanup UNREF of a resource the device never had (and an error).
    let mut w = World::new(1, true);
    w.send(0, QueueId::Control, &req(create(5, 8, 8)));
    let host = w.med.vm(1).unwrap().host_resource(5).unwrap();
    w.med.reset_vm(1).unwrap();
    w.run_all(0, &mut NullGpu);
    let ran: Vec<Command> = w
        .log
        .iter()
        .flat_map(|(_, b)| b.iter().map(|c| c.request.cmd.clone()))
        .collect();
    assert!(
        !ran.contains(&Command::ResourceUnref { resource_id: host }),
        "{ran:?}"
    );
    assert_eq!(w.med.vm(1).unwrap().host_resources().count(), 0);
}

#[test]
fn reset_gives_everything_back_and_leaves_neighbours_alone() {
    let mut w = World::new(2, true);
    for i in 0..2 {
        make_resource(&mut w, i, 2, 64, 64, FB);
        let set = req(Command::SetScanout {
            rect: rect(64, 64),
            scanout_id: 0,
            resource_id: 2,
        });
        assert_eq!(w.call(i, &set, &mut NullGpu), Response::OkNoData);
    }
    make_resource(&mut w, 0, 3, 32, 32, FB.offset(0x10_0000));
    // VM 1 also has work staged, work in flight, and an unanswered chain.
    w.send(0, QueueId::Control, &req(create(4, 8, 8)));
    let in_flight = w.med.take_batch(1, 1).unwrap();
    w.send(
        0,
        QueueId::Control,
        &req(Command::ResourceUnref { resource_id: 3 }),
    );
    w.send(0, QueueId::Control, &req(Command::GetDisplayInfo));
    // VM 2 has work staged too.
    w.send(1, QueueId::Control, &req(flush(2, 64, 64)));
    let vm2_before = (
        w.med.vm(2).unwrap().host_resource(2),
        w.med.vm(2).unwrap().vram_used(),
        w.med.vm(2).unwrap().staged_len(),
        w.iommu.of(2),
    );
    let held: Vec<u32> = w.med.vm(1).unwrap().host_resources().collect();
    assert_eq!(held.len(), 3);
    w.med.take_interrupts();

    let report = w.med.reset_vm(1).unwrap();
    w.iommu.apply_reset(1, &report);
    assert_eq!(report.dropped, 3);
    assert_eq!(report.released, 3);
    assert_eq!(report.unmapped.len(), 2);
    assert_eq!(w.iommu.of(1), 0);
    let v1 = w.med.vm(1).unwrap();
    assert_eq!(
        (
            v1.state(),
            v1.resource_count(),
            v1.vram_used(),
            v1.unanswered()
        ),
        (VmState::Reset, 0, 0, 0)
    );
    assert_eq!(w.med.device_status(1), Some(DEVICE_NEEDS_RESET));
    assert_eq!(w.med.take_interrupts(), vec![(1, VECTORS[0])]);
    assert_eq!(w.med.route(in_flight.commands[0].host_fence), None);
    assert_eq!(w.med.vram_used(), vm2_before.1);
    assert_eq!(w.med.counters().vm(1).unwrap().resets, 1);

    // Its cleanup: blank its scanout, free each host id.
    w.run_all(0, &mut NullGpu);
    let cleanup: Vec<Command> = w
        .log
        .last()
        .unwrap()
        .1
        .iter()
        .map(|c| c.request.cmd.clone())
        .collect();
    let mut want = vec![Command::SetScanout {
        rect: Rect::default(),
        scanout_id: 0,
        resource_id: 0,
    }];
    want.extend(
        held.iter()
            .map(|&h| Command::ResourceUnref { resource_id: h }),
    );
    assert_eq!(cleanup, want);
    assert_eq!(w.med.vm(1).unwrap().host_resources().count(), 0);
    // The late completion of the dropped batch is ignored.
    let late = Completion {
        host_fence: in_flight.commands[0].host_fence,
        status: wire::RESP_OK_NODATA,
    };
    assert_eq!(
        w.med
            .complete_batch(1, &[late], &mut w.guests[0].mem)
            .unwrap()
            .stale,
        1
    );

    // VM 2 is exactly as it was, and its staged work goes through.
    let vm2_after = (
        w.med.vm(2).unwrap().host_resource(2),
        w.med.vm(2).unwrap().vram_used(),
        w.med.vm(2).unwrap().staged_len(),
        w.iommu.of(2),
    );
    assert_eq!(vm2_before, vm2_after);
    w.run_all(1, &mut NullGpu);
    assert_eq!(
        w.guests[1]
            .take_used(QueueId::Control)
            .last()
            .unwrap()
            .resp
            .as_ref()
            .unwrap()
            .1,
        Response::OkNoData
    );

    // VM 1 starts over: device reset, queues, the same ids and fences again.
    assert_eq!(
        w.med
            .process_doorbell(1, QueueId::Control, &mut w.guests[0].mem),
        Err(MediatorError::WrongState(VmState::Reset))
    );
    w.med.driver_reset(1).unwrap();
    assert_eq!(w.med.device_status(1), Some(0));
    w.guests[0].reinit_queues(true);
    w.start(0, true);
    assert_eq!(
        w.call(0, &req(create(2, 8, 8)), &mut NullGpu),
        Response::OkNoData
    );
    // Freed host ids are reused once the device dropped them.
    assert!(held.contains(&w.med.vm(1).unwrap().host_resource(2).unwrap()));
    assert_eq!(
        w.call(0, &fenced(flush(2, 8, 8), 1), &mut NullGpu),
        Response::OkNoData
    );
}

#[test]
fn host_ids_are_not_reused_before_the_device_dropped_them() {
    let mut w = World::new(2, true);
    w.call(0, &req(create(2, 8, 8)), &mut NullGpu);
    let h = w.med.vm(1).unwrap().host_resource(2).unwrap();
    // VM 1's unref is staged, not yet run: VM 2 must not get id `h`.
    w.send(
        0,
        QueueId::Control,
        &req(Command::ResourceUnref { resource_id: 2 }),
    );
    w.call(1, &req(create(2, 8, 8)), &mut NullGpu);
    assert_ne!(w.med.vm(2).unwrap().host_resource(2), Some(h));
    w.run_all(0, &mut NullGpu);
    w.call(1, &req(create(3, 8, 8)), &mut NullGpu);
    assert_eq!(w.med.vm(2).unwrap().host_resource(3), Some(h));
}

#[test]
fn unapplied_iommu_maps_cancel_out_in_a_reset() {
    let mut w = World::new(1, true);
    w.call(0, &req(create(2, 64, 64)), &mut NullGpu);
    // The attach is validated (map reported) but the hypervisor has not drained
    // the ops when the VM is reset: nothing to unmap, and the map is withdrawn.
    w.guests[0].add(QueueId::Control, &req(attach(2, FB, 16384, 1)));
    w.guests[0].kick(QueueId::Control);
    w.med
        .process_doorbell(1, QueueId::Control, &mut w.guests[0].mem)
        .unwrap();
    let report = w.med.reset_vm(1).unwrap();
    assert!(report.unmapped.is_empty());
    assert!(w.med.take_iommu_ops().is_empty());
}

#[test]
fn a_malformed_ring_needs_a_reset_and_spares_the_neighbours() {
    let mut w = World::new(2, true);
    // avail.idx jumps by more than the queue size.
    let g = &mut w.guests[0];
    g.mem
        .write(control_layout(true).avail.offset(2), &500u16.to_le_bytes())
        .unwrap();
    let r = w
        .med
        .process_doorbell(1, QueueId::Control, &mut w.guests[0].mem)
        .unwrap();
    assert_eq!(r, DoorbellReport::default());
    assert_eq!(w.med.vm(1).unwrap().state(), VmState::NeedsReset);
    assert_eq!(w.med.device_status(1), Some(DEVICE_NEEDS_RESET));
    assert_eq!(w.med.take_interrupts(), vec![(1, VECTORS[0])]);
    assert!(w.med.take_events().iter().any(|e| e.kind
        == EventKind::RingFault {
            queue: QueueId::Control,
            error: RingError::AvailIdxJump
        }));
    assert_eq!(rejected(&w, 1, RejectReason::Ring), 1);
    assert_eq!(
        w.call(1, &req(create(2, 8, 8)), &mut NullGpu),
        Response::OkNoData
    );
}

#[test]
fn backpressure_leaves_chains_in_the_ring() {
    let mut m = Mediator::new(MediatorConfig::new(VRAM, 1));
    m.add_vm(1, VmGpuConfig::new(vec![scanout(0)])).unwrap();
    let mut mem = VecMemory::new(Gpa::new(0), host_base(0), RAM);
    let big = QueueLayout {
        size: 512,
        desc: Gpa::new(0x4_0000),
        avail: Gpa::new(0x4_4000),
        used: Gpa::new(0x4_5000),
        event_idx: true,
        indirect: true,
    };
    let mut dq = DriverQueue::new(&mut mem, big).unwrap();
    m.start_queues(1, big, cursor_layout(true)).unwrap();
    let mut cmds = vec![req(create(2, 8, 8))];
    cmds.extend((0..299).map(|_| req(flush(2, 8, 8))));
    for (i, r) in cmds.iter().enumerate() {
        let mut b = Vec::new();
        command::encode(r, &mut b);
        let at = Gpa::new(0x10_0000 + 64 * i as u64);
        mem.write(at, &b).unwrap();
        let resp = Gpa::new(0x20_0000 + 32 * i as u64);
        let table = Gpa::new(0x30_0000 + 32 * i as u64);
        dq.add(
            &mut mem,
            &[(at, b.len() as u32)],
            &[(resp, 24)],
            Some(table),
        )
        .unwrap();
    }
    dq.kick(&mut mem).unwrap();
    let r = m.process_doorbell(1, QueueId::Control, &mut mem).unwrap();
    assert_eq!((r.staged, r.deferred), (limits::MAX_QUEUED_PER_VM, true));
    assert_eq!(
        m.counters()
            .vm(1)
            .unwrap()
            .rejected(RejectReason::Backpressure),
        1
    );
    let b = m.take_batch(1, 1000).unwrap();
    let done: Vec<Completion> = b
        .commands
        .iter()
        .map(|c| Completion {
            host_fence: c.host_fence,
            status: wire::RESP_OK_NODATA,
        })
        .collect();
    m.complete_batch(1, &done, &mut mem).unwrap();
    let r = m.process_doorbell(1, QueueId::Control, &mut mem).unwrap();
    assert_eq!(
        (r.staged, r.deferred),
        (300 - limits::MAX_QUEUED_PER_VM, false)
    );
}

#[test]
fn events_are_bounded() {
    let mut m = Mediator::new(MediatorConfig {
        max_events: 2,
        ..MediatorConfig::new(VRAM, 4)
    });
    for vm in 1..=4 {
        m.add_vm(vm, VmGpuConfig::new(vec![scanout(u32::from(vm) - 1)]))
            .unwrap();
    }
    let ev = m.take_events();
    assert_eq!(ev.iter().map(|e| e.vm).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(m.events_lost(), 2);
}

#[test]
fn poll_serves_both_queues() {
    let mut w = World::new(1, true);
    w.guests[0].add(QueueId::Control, &req(create(2, 64, 64)));
    w.guests[0].add(
        QueueId::Cursor,
        &req(Command::MoveCursor {
            pos: CursorPos::default(),
        }),
    );
    // No kick: the hypervisor polls during the VM's slice.
    w.guests[0].kick(QueueId::Control);
    w.guests[0].kick(QueueId::Cursor);
    let r = w.med.poll(1, &mut w.guests[0].mem).unwrap();
    assert_eq!((r.staged, r.rejected), (2, 0));
    w.run_all(0, &mut NullGpu);
    assert_eq!(w.guests[0].take_used(QueueId::Control).len(), 1);
    assert_eq!(w.guests[0].take_used(QueueId::Cursor).len(), 1);
}

/// A VM with a resource, quiesced, and its snapshot.
fn snapshotted() -> (World, Vec<u8>) {
    let mut w = World::new(1, true);
    make_resource(&mut w, 0, 2, 64, 64, FB);
    let set = req(Command::SetScanout {
        rect: rect(64, 64),
        scanout_id: 0,
        resource_id: 2,
    });
    assert_eq!(w.call(0, &set, &mut NullGpu), Response::OkNoData);
    let bytes = w.med.snapshot(1).unwrap();
    (w, bytes)
}

/// A fresh mediator with VM 1 (one `width` x 480 scanout, quota `quota`).
fn fresh(width: u32, quota: Option<u64>) -> Mediator {
    let mut m = Mediator::new(MediatorConfig::new(VRAM, 1));
    let mut cfg = VmGpuConfig::new(vec![ScanoutConfig {
        physical: 0,
        width,
        height: 480,
    }]);
    cfg.vram_quota = quota;
    m.add_vm(1, cfg).unwrap();
    m
}

#[test]
fn snapshots_need_a_quiescent_live_context() {
    let (mut w, _) = snapshotted();
    w.send(0, QueueId::Control, &req(flush(2, 64, 64)));
    assert_eq!(w.med.snapshot(1), Err(SnapshotError::Busy));
    w.run_all(0, &mut NullGpu);
    assert!(w.med.snapshot(1).is_ok());
    w.med.reset_vm(1).unwrap();
    assert_eq!(
        w.med.snapshot(1),
        Err(SnapshotError::WrongState(VmState::Reset))
    );
    assert_eq!(w.med.snapshot(9), Err(SnapshotError::UnknownVm(9)));
}

#[test]
fn restore_checks_everything_and_changes_nothing_when_it_refuses() {
    let (w, bytes) = snapshotted();
    let mem = &w.guests[0].mem;
    let refused = |m: &mut Mediator, b: &[u8], mem: &VecMemory| {
        let r = m.restore(1, b, mem);
        let v = m.vm(1).unwrap();
        assert_eq!(
            (v.state(), v.resource_count(), v.staged_len()),
            (VmState::Reset, 0, 0)
        );
        assert_eq!(m.vram_used(), 0);
        assert!(m.take_iommu_ops().is_empty());
        r.unwrap_err()
    };
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert_eq!(
        refused(&mut fresh(640, None), &bad, mem),
        SnapshotError::BadMagic
    );
    let mut bad = bytes.clone();
    bad[4] = 2;
    assert_eq!(
        refused(&mut fresh(640, None), &bad, mem),
        SnapshotError::UnsupportedVersion(2)
    );
    for n in 0..bytes.len() {
        refused(&mut fresh(640, None), &bytes[..n], mem);
    }
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(
        refused(&mut fresh(640, None), &long, mem),
        SnapshotError::TrailingBytes
    );
    // Another display shape, a smaller quota.
    assert_eq!(
        refused(&mut fresh(800, None), &bytes, mem),
        SnapshotError::DisplayMismatch
    );
    assert_eq!(
        refused(&mut fresh(640, Some(4096)), &bytes, mem),
        SnapshotError::Quota
    );
    // Memory at the destination that does not hold the backing.
    let small = VecMemory::new(Gpa::new(0), host_base(3), FB.get() as usize);
    assert!(matches!(
        refused(&mut fresh(640, None), &bytes, &small),
        SnapshotError::BadBacking {
            resource: 2,
            error: Some(MemError::OutOfRange)
        }
    ));
    // A live VM is not a restore target.
    let mut live = World::new(1, true);
    assert_eq!(
        live.med.restore(1, &bytes, mem),
        Err(SnapshotError::WrongState(VmState::Active))
    );
    // The good bytes restore, and the rebuild is staged.
    let mut m = fresh(640, None);
    m.restore(1, &bytes, mem).unwrap();
    let v = m.vm(1).unwrap();
    assert_eq!(
        (v.state(), v.resource_count(), v.vram_used()),
        (VmState::Active, 1, 64 * 64 * 4)
    );
    let rebuild: Vec<u32> = m
        .take_batch(1, 16)
        .unwrap()
        .commands
        .iter()
        .map(|c| c.request.cmd.type_())
        .collect();
    assert_eq!(
        rebuild,
        vec![
            wire::CMD_RESOURCE_CREATE_2D,
            wire::CMD_RESOURCE_ATTACH_BACKING,
            wire::CMD_TRANSFER_TO_HOST_2D,
            wire::CMD_SET_SCANOUT,
            wire::CMD_RESOURCE_FLUSH
        ]
    );
    assert_eq!(
        m.restore(1, &bytes, mem),
        Err(SnapshotError::WrongState(VmState::Active))
    );
}

/// The control queue somewhere else, smaller: where a driver re-enables it after a
/// queue reset.
fn moved_control_layout() -> QueueLayout {
    QueueLayout {
        size: 32,
        desc: Gpa::new(0x3000),
        avail: Gpa::new(0x3400),
        used: Gpa::new(0x3600),
        event_idx: true,
        indirect: true,
    }
}

fn completions_of(batch: &Batch) -> Vec<Completion> {
    batch
        .commands
        .iter()
        .map(|c| Completion {
            host_fence: c.host_fence,
            status: wire::RESP_OK_NODATA,
        })
        .collect()
}

#[test]
fn a_queue_reset_drops_its_chains_and_nothing_reaches_the_guest() {
    let mut w = World::new(2, true);
    make_resource(&mut w, 0, 2, 64, 64, FB);
    make_resource(&mut w, 1, 2, 64, 64, FB);
    w.med.take_events();
    // One fenced flush on the GPU, one staged behind it, one emulated answer queued
    // behind both, and a cursor command staged on the other queue.
    w.send(0, QueueId::Control, &fenced(flush(2, 64, 64), 1));
    let on_gpu = w.med.take_batch(1, 16).expect("a batch");
    w.send(0, QueueId::Control, &fenced(flush(2, 64, 64), 2));
    w.send(0, QueueId::Control, &req(Command::GetDisplayInfo));
    w.send(
        0,
        QueueId::Cursor,
        &req(Command::MoveCursor {
            pos: CursorPos::default(),
        }),
    );
    // The neighbour has work of its own.
    w.send(1, QueueId::Control, &fenced(flush(2, 64, 64), 7));
    assert_eq!(w.med.vm(1).unwrap().unanswered(), 4);

    assert_eq!(w.med.reset_queue(1, QueueId::Control), Ok(3));
    assert!(w.med.vm(1).unwrap().queue(QueueId::Control).is_none());
    assert!(w.med.vm(1).unwrap().queue(QueueId::Cursor).is_some());
    assert_eq!(w.med.vm(1).unwrap().state(), VmState::Active);
    assert_eq!(
        w.med.vm(1).unwrap().unanswered(),
        1,
        "the cursor chain stays"
    );
    assert!(w.med.take_events().iter().any(|e| e.vm == 1
        && e.channel == Channel::Debug
        && e.kind
            == EventKind::QueueReset {
                queue: QueueId::Control,
                dropped: 3
            }));

    // The batch on the GPU completes: its effects apply, but no response and no
    // used entry reach the guest's memory, and it is not a stale completion.
    let ram_before = w.guests[0].mem.bytes.clone();
    let r = w
        .med
        .complete_batch(1, &completions_of(&on_gpu), &mut w.guests[0].mem)
        .unwrap();
    assert_eq!((r.completed, r.stale, r.returned), (1, 0, 0));
    assert!(r.batch_done);
    // The staged flush still runs (as the mediator's own), then the cursor command.
    w.run_all(0, &mut NullGpu);
    // Neither the control rings (used ring included) nor the response buffers (in
    // the scratch area) changed.
    let ram = &w.guests[0].mem.bytes;
    assert!(ram[..0x2000] == ram_before[..0x2000]);
    assert!(ram[0x1_0000..0x10_0000] == ram_before[0x1_0000..0x10_0000]);
    assert!(w.guests[0].take_used(QueueId::Control).is_empty());
    assert_eq!(w.guests[0].take_used(QueueId::Cursor).len(), 1);
    assert_eq!(w.med.vm(1).unwrap().unanswered(), 0);
    assert_eq!(w.med.vm(1).unwrap().last_fence_signalled(), 0);

    // A doorbell on the reset queue takes nothing from the old ring.
    w.send(0, QueueId::Control, &req(flush(2, 64, 64)));
    assert_eq!(w.med.vm(1).unwrap().staged_len(), 0);
    assert_eq!(w.med.vm(1).unwrap().unanswered(), 0);

    // The neighbour was never touched.
    w.run_all(1, &mut NullGpu);
    let used = w.guests[1].take_used(QueueId::Control);
    assert_eq!(used.len(), 1);
    let (h, resp) = used[0].resp.clone().unwrap();
    assert_eq!((resp, h.fence_id), (Response::OkNoData, 7));
}

#[test]
fn a_reset_queue_restarts_from_index_zero_at_its_new_place() {
    let mut w = World::new(1, true);
    make_resource(&mut w, 0, 2, 64, 64, FB);
    w.send(0, QueueId::Control, &fenced(flush(2, 64, 64), 5));
    assert_eq!(w.med.reset_queue(1, QueueId::Control), Ok(1));
    w.run_all(0, &mut NullGpu);
    w.med.take_events();

    let layout = moved_control_layout();
    w.guests[0].ctrl = DriverQueue::new(&mut w.guests[0].mem, layout).unwrap();
    assert_eq!(w.med.restart_queue(1, QueueId::Control, layout), Ok(()));
    let q = w.med.vm(1).unwrap().queue(QueueId::Control).unwrap();
    assert_eq!((q.last_avail_idx(), q.used_idx()), (0, 0));
    assert_eq!(*q.layout(), layout);
    assert!(w.med.take_events().iter().any(|e| e.kind
        == EventKind::QueueRestarted {
            queue: QueueId::Control,
            size: 32
        }));

    // The context survived: the resource is still there, and fences go on above
    // the last one accepted (the dropped fence 5 is not waited for).
    assert_eq!(w.med.vm(1).unwrap().resource_count(), 1);
    assert_eq!(
        w.call(0, &fenced(flush(2, 64, 64), 6), &mut NullGpu),
        Response::OkNoData
    );
    assert_eq!(w.med.vm(1).unwrap().last_fence_signalled(), 6);
    for _ in 0..40 {
        // More chains than the new ring has entries: the indices wrap in the new size.
        assert_eq!(
            w.call(0, &req(flush(2, 64, 64)), &mut NullGpu),
            Response::OkNoData
        );
    }
    let q = w.med.vm(1).unwrap().queue(QueueId::Control).unwrap();
    assert_eq!(q.used_idx(), 41);
}

#[test]
fn queue_reset_and_restart_refuse_what_they_cannot_do() {
    let mut w = World::new(1, true);
    let layout = moved_control_layout();
    assert_eq!(
        w.med.restart_queue(1, QueueId::Cursor, cursor_layout(true)),
        Err(MediatorError::QueueNotReset(QueueId::Cursor))
    );
    assert_eq!(
        w.med.reset_queue(9, QueueId::Control),
        Err(MediatorError::UnknownVm(9))
    );
    assert_eq!(w.med.reset_queue(1, QueueId::Control), Ok(0));
    // Not quiescent while a queue is held in reset: no snapshot of half a device.
    assert_eq!(w.med.snapshot(1), Err(SnapshotError::Busy));
    let bad = QueueLayout { size: 24, ..layout };
    assert!(matches!(
        w.med.restart_queue(1, QueueId::Control, bad),
        Err(MediatorError::BadQueue(_))
    ));
    let misaligned = QueueLayout {
        desc: Gpa::new(0x3008),
        ..layout
    };
    assert!(matches!(
        w.med.restart_queue(1, QueueId::Control, misaligned),
        Err(MediatorError::BadQueue(_))
    ));
    assert!(w.med.vm(1).unwrap().queue(QueueId::Control).is_none());
    assert_eq!(w.med.restart_queue(1, QueueId::Control, layout), Ok(()));
    assert_eq!(
        w.med.restart_queue(1, QueueId::Control, layout),
        Err(MediatorError::QueueNotReset(QueueId::Control))
    );
    // A context that is not live has no queue to reset or restart.
    w.med.driver_reset(1).unwrap();
    assert_eq!(
        w.med.reset_queue(1, QueueId::Control),
        Err(MediatorError::WrongState(VmState::Reset))
    );
    assert_eq!(
        w.med.restart_queue(1, QueueId::Control, layout),
        Err(MediatorError::WrongState(VmState::Reset))
    );
}

#[test]
fn work_of_a_reset_queue_still_gives_back_what_it_held() {
    let mut w = World::new(1, true);
    make_resource(&mut w, 0, 2, 64, 64, FB);
    assert!(w.iommu.of(1) > 0);
    let vram = w.med.vm(1).unwrap().vram_used();
    assert!(vram > 0);
    // An UNREF (frees a host id, unmaps the backing at completion) taken from the
    // ring, then the queue is reset before it reached the GPU.
    w.send(
        0,
        QueueId::Control,
        &req(Command::ResourceUnref { resource_id: 2 }),
    );
    assert_eq!(w.med.reset_queue(1, QueueId::Control), Ok(1));
    w.run_all(0, &mut NullGpu);
    assert_eq!(w.iommu.of(1), 0, "the backing was unmapped");
    assert_eq!(w.med.vm(1).unwrap().host_resources().count(), 0);
    assert_eq!(w.med.vm(1).unwrap().vram_used(), 0);
    assert!(w.faults.is_empty());
    assert!(w.guests[0].take_used(QueueId::Control).is_empty());
}

/// A reset while the previous reset's UNREFs are on the GPU does not unref those
/// host resources a second time (the device would answer INVALID_RESOURCE_ID).
#[test]
fn a_second_reset_does_not_unref_what_is_being_unrefd() {
    use crate::wire::format;
    let mut w = World::new(1, true);
    let vm = w.vm(0);
    let create = req(Command::ResourceCreate2d {
        resource_id: 1,
        format: format::B8G8R8X8_UNORM,
        width: 8,
        height: 8,
    });
    w.send(0, QueueId::Control, &create);
    let b = w.med.take_batch(vm, 16).unwrap();
    let done: Vec<Completion> = b
        .commands
        .iter()
        .map(|c| Completion {
            host_fence: c.host_fence,
            status: crate::wire::RESP_OK_NODATA,
        })
        .collect();
    w.med
        .complete_batch(vm, &done, &mut w.guests[0].mem)
        .unwrap();
    let held: Vec<u32> = w.med.vm(vm).unwrap().host_resources().collect();
    assert_eq!(held.len(), 1);
    // The first reset's UNREF goes to the GPU and is still there ...
    w.med.reset_vm(vm).unwrap();
    let first = w.med.take_batch(vm, 16).unwrap();
    let unrefs = |b: &Batch| {
        b.commands
            .iter()
            .filter(|c| matches!(c.request.cmd, Command::ResourceUnref { .. }))
            .count()
    };
    assert_eq!(unrefs(&first), 1);
    // ... when the driver resets the device again.
    w.med.driver_reset(vm).unwrap();
    assert_eq!(w.med.vm(vm).unwrap().host_resources().count(), 0);
    if let Some(second) = w.med.take_batch(vm, 16) {
        assert_eq!(unrefs(&second), 0, "unref'd twice: {second:?}");
    }
}

/// The physical ring refuses a VM's UNREF (full): the host id stays the VM's until
/// the device ran that UNREF, so no other VM's CREATE is given the id of a
/// resource still live on the device (its later commands would act on it).
#[test]
fn a_refused_unref_keeps_its_host_id_until_the_device_ran_it() {
    let mut w = World::new(2, true);
    let mut gpu = sim_gpu(2);
    assert_eq!(
        w.call(0, &req(create(2, 8, 8)), &mut gpu),
        Response::OkNoData
    );
    let h = w.med.vm(1).unwrap().host_resource(2).unwrap();
    let unref = req(Command::ResourceUnref { resource_id: 2 });
    let head = w.send(0, QueueId::Control, &unref);
    let batch = w.med.take_batch(1, 16).unwrap();
    w.refused(0, batch.commands);
    assert!(gpu.resource(h).is_some());

    // VM 2 creates a resource, backs it and shows it, all staged at once.
    w.send(1, QueueId::Control, &req(create(5, 8, 8)));
    w.send(1, QueueId::Control, &req(attach(5, FB, 256, 1)));
    let show = req(Command::SetScanout {
        rect: rect(8, 8),
        scanout_id: 0,
        resource_id: 5,
    });
    w.send(1, QueueId::Control, &show);
    assert_ne!(
        w.med.vm(2).unwrap().host_resource(5),
        Some(h),
        "VM 2 was given host id {h}: VM 1's resource, still live on the device"
    );
    w.run_all(1, &mut gpu);
    assert_eq!(gpu.resource(h).unwrap().backing_bytes, None);
    assert_ne!(gpu.scanout(1).unwrap().resource_id, h);
    assert!(w.faults.is_empty());

    // The refused UNREF is taken again, runs, and only then frees the id.
    assert!(w.guests[0].take_used(QueueId::Control).is_empty());
    w.run_all(0, &mut gpu);
    assert!(gpu.resource(h).is_none());
    let used = w.guests[0].take_used(QueueId::Control);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].head, head);
    assert_eq!(used[0].resp.as_ref().unwrap().1, Response::OkNoData);
    assert_eq!(
        w.call(1, &req(create(6, 8, 8)), &mut gpu),
        Response::OkNoData
    );
    assert_eq!(w.med.vm(2).unwrap().host_resource(6), Some(h));
}

/// A VM reset while its UNREF is on the GPU (not yet run): the host id is not
/// another VM's before that UNREF's completion arrives.
#[test]
fn an_unref_on_the_gpu_at_a_reset_frees_its_host_id_when_it_completes() {
    let mut w = World::new(2, true);
    let mut gpu = sim_gpu(2);
    w.call(0, &req(create(2, 8, 8)), &mut gpu);
    let h = w.med.vm(1).unwrap().host_resource(2).unwrap();
    w.send(
        0,
        QueueId::Control,
        &req(Command::ResourceUnref { resource_id: 2 }),
    );
    let unref = w.med.take_batch(1, 16).unwrap();
    let report = w.med.reset_vm(1).unwrap();
    w.iommu.apply_reset(1, &report);
    assert_eq!(w.med.vm(1).unwrap().host_resources().count(), 0);
    w.send(1, QueueId::Control, &req(create(2, 8, 8)));
    assert_ne!(
        w.med.vm(2).unwrap().host_resource(2),
        Some(h),
        "VM 2 was given host id {h} while VM 1's UNREF of it has not run"
    );
    w.run_all(1, &mut gpu);
    // The device runs the UNREF and reports it: the id is free now.
    let done: Vec<Completion> = unref
        .commands
        .iter()
        .map(|c| Completion {
            host_fence: c.host_fence,
            status: gpu.execute(&c.request, &w.guests[0].mem).response.type_(),
        })
        .collect();
    assert_eq!(done[0].status, wire::RESP_OK_NODATA);
    w.med
        .complete_batch(1, &done, &mut w.guests[0].mem)
        .unwrap();
    w.call(1, &req(create(3, 8, 8)), &mut gpu);
    assert_eq!(w.med.vm(2).unwrap().host_resource(3), Some(h));
}
