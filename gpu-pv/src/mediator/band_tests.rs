//! Shared heads: two VMs shown in the two bands of one physical head. Each VM's
//! frames become transfers and flushes of the hypervisor's composite restricted to
//! its own band, with copies only from its own pages into its own band.

use alloc::vec;
use alloc::vec::Vec;

use super::harness::*;
use super::*;
use crate::command::Command;
use crate::wire::format;

const W: u32 = 64;
const H: u32 = 32;
const COMPOSITE: u32 = RESERVED_HOST_IDS + 5;

/// Two VMs (ids 1 and 2) on physical head 5, bands 0 and 1.
fn world() -> (Mediator, Vec<Guest>) {
    let mut med = Mediator::new(MediatorConfig::new(64 << 20, 16));
    let mut guests = Vec::new();
    for i in 0..2u32 {
        let vm = i as VmId + 1;
        let mut cfg = VmGpuConfig::new(vec![ScanoutConfig {
            physical: 5,
            width: W,
            height: H,
        }]);
        cfg.bands = vec![Band {
            scanout: 0,
            index: i,
            count: 2,
            host_resource: COMPOSITE,
        }];
        med.add_vm(vm, cfg).unwrap();
        med.start_queues(vm, control_layout(true), cursor_layout(true))
            .unwrap();
        guests.push(Guest::new(vm, host_base(i as usize), true));
    }
    (med, guests)
}

/// Guest `i` sends `cmds` and the mediator serves them; returns what it staged.
fn send(med: &mut Mediator, g: &mut Guest, cmds: &[Command]) -> Vec<HostCommand> {
    for c in cmds {
        g.add(QueueId::Control, &req(c.clone()));
    }
    g.kick(QueueId::Control);
    med.process_doorbell(g.vm, QueueId::Control, &mut g.mem)
        .unwrap();
    let mut out = Vec::new();
    while let Some(b) = med.take_batch(g.vm, 64) {
        let done: Vec<Completion> = b
            .commands
            .iter()
            .map(|c| Completion {
                host_fence: c.host_fence,
                status: crate::wire::RESP_OK_NODATA,
            })
            .collect();
        med.complete_batch(g.vm, &done, &mut g.mem).unwrap();
        out.extend(b.commands);
    }
    out
}

fn framebuffer(resource_id: u32, width: u32, height: u32) -> Vec<Command> {
    let len = u64::from(width) * u64::from(height) * 4;
    vec![
        Command::ResourceCreate2d {
            resource_id,
            format: format::B8G8R8X8_UNORM,
            width,
            height,
        },
        Command::ResourceAttachBacking {
            resource_id,
            entries: entries(FB, len, 3),
        },
    ]
}

fn whole(width: u32, height: u32) -> Rect {
    rect(width, height)
}

#[test]
fn frames_of_two_vms_land_in_their_own_bands() {
    let (mut med, mut guests) = world();
    let stride = u64::from(W) * 4;
    let band_bytes = stride * u64::from(H);
    for (i, g) in guests.iter_mut().enumerate() {
        let staged = send(&mut med, g, &framebuffer(1, W, H));
        assert_eq!(staged.len(), 2, "create and attach go to the GPU");
        // SET_SCANOUT is answered by the mediator: the head shows the composite.
        let staged = send(
            &mut med,
            g,
            &[Command::SetScanout {
                rect: whole(W, H),
                scanout_id: 0,
                resource_id: 1,
            }],
        );
        assert!(staged.is_empty(), "no host SET_SCANOUT for a band");
        let staged = send(
            &mut med,
            g,
            &[
                Command::TransferToHost2d {
                    rect: whole(W, H),
                    offset: 0,
                    resource_id: 1,
                },
                Command::ResourceFlush {
                    rect: whole(W, H),
                    resource_id: 1,
                },
            ],
        );
        assert_eq!(staged.len(), 2);
        let top = i as u32 * H;
        match &staged[0].request.cmd {
            Command::TransferToHost2d {
                rect,
                offset,
                resource_id,
            } => {
                assert_eq!(*resource_id, COMPOSITE);
                assert_eq!((rect.y, rect.height, rect.width), (top, H, W));
                assert_eq!(*offset, u64::from(top) * stride);
            }
            c => panic!("expected a transfer, got {c:?}"),
        }
        // The copies fill exactly this VM's band, from this VM's own pages.
        let copies = &staged[0].copies;
        let total: u64 = copies.iter().map(|c| c.len).sum();
        assert_eq!(total, band_bytes);
        let fb = host_addr(i, FB);
        for c in copies {
            assert!(c.dst >= i as u64 * band_bytes && c.dst + c.len <= (i as u64 + 1) * band_bytes);
            let src = c.src.expect("pixels, not zeros");
            assert!(src >= fb && src.offset(c.len) <= fb.offset(band_bytes + 0x10_0000));
        }
        match staged[1].request.cmd {
            Command::ResourceFlush { rect, resource_id } => {
                assert_eq!(resource_id, COMPOSITE);
                assert_eq!((rect.y, rect.height), (top, H));
            }
            ref c => panic!("expected a flush, got {c:?}"),
        }
    }
}

#[test]
fn a_partial_rectangle_is_copied_row_by_row_inside_the_band() {
    let (mut med, mut guests) = world();
    let g = &mut guests[1];
    send(&mut med, g, &framebuffer(7, W, H));
    send(
        &mut med,
        g,
        &[Command::SetScanout {
            rect: whole(W, H),
            scanout_id: 0,
            resource_id: 7,
        }],
    );
    let r = Rect {
        x: 8,
        y: 4,
        width: 16,
        height: 10,
    };
    let stride = u64::from(W) * 4;
    let offset = 4 * stride + 8 * 4;
    let staged = send(
        &mut med,
        g,
        &[Command::TransferToHost2d {
            rect: r,
            offset,
            resource_id: 7,
        }],
    );
    assert_eq!(staged.len(), 1);
    let band = stride * u64::from(H);
    let copies = &staged[0].copies;
    assert!(copies.len() >= 10, "one copy (or more) per row");
    for c in copies {
        assert!(
            c.dst >= band && c.dst + c.len <= 2 * band,
            "inside band 1: {c:?}"
        );
    }
    let rows: u64 = copies.iter().map(|c| c.len).sum();
    assert_eq!(rows, 10 * 16 * 4);
}

#[test]
fn a_band_takes_only_a_whole_resource_of_the_display_size() {
    let (mut med, mut guests) = world();
    let g = &mut guests[0];
    send(&mut med, g, &framebuffer(2, W, H + 1));
    send(&mut med, g, &framebuffer(3, W, H));
    for (resource_id, rect) in [
        (2, whole(W, H)),
        (
            3,
            Rect {
                x: 0,
                y: 0,
                width: W / 2,
                height: H,
            },
        ),
    ] {
        g.add(
            QueueId::Control,
            &req(Command::SetScanout {
                rect,
                scanout_id: 0,
                resource_id,
            }),
        );
        g.kick(QueueId::Control);
        let r = med
            .process_doorbell(g.vm, QueueId::Control, &mut g.mem)
            .unwrap();
        assert_eq!(r.rejected, 1, "resource {resource_id} rect {rect:?}");
    }
}

#[test]
fn a_reset_blanks_only_the_band() {
    let (mut med, mut guests) = world();
    let g = &mut guests[1];
    send(&mut med, g, &framebuffer(1, W, H));
    send(
        &mut med,
        g,
        &[Command::SetScanout {
            rect: whole(W, H),
            scanout_id: 0,
            resource_id: 1,
        }],
    );
    med.reset_vm(g.vm).unwrap();
    let b = med.take_batch(g.vm, 64).unwrap();
    let band = u64::from(W) * 4 * u64::from(H);
    let blank = &b.commands[0];
    assert!(matches!(
        blank.request.cmd,
        Command::TransferToHost2d {
            resource_id: COMPOSITE,
            ..
        }
    ));
    assert_eq!(
        blank.copies,
        vec![BandCopy {
            src: None,
            dst: band,
            len: band
        }]
    );
    assert!(matches!(
        b.commands[1].request.cmd,
        Command::ResourceFlush { resource_id: COMPOSITE, rect } if rect.y == H
    ));
    // Never a SET_SCANOUT of the shared head.
    assert!(!b
        .commands
        .iter()
        .any(|c| matches!(c.request.cmd, Command::SetScanout { .. })));
}

#[test]
fn a_shared_head_takes_only_bands_of_its_composite() {
    let (mut med, _) = world();
    let cfg = |band: Option<Band>| {
        let mut c = VmGpuConfig::new(vec![ScanoutConfig {
            physical: 5,
            width: W,
            height: H,
        }]);
        c.bands = band.into_iter().collect();
        c
    };
    let band = |index, count, host_resource| Band {
        scanout: 0,
        index,
        count,
        host_resource,
    };
    for (vm, c) in [
        (3, cfg(None)),                            // the whole head
        (4, cfg(Some(band(1, 2, COMPOSITE)))),     // band 1 is taken
        (5, cfg(Some(band(2, 2, COMPOSITE)))),     // no band 2 of 2
        (6, cfg(Some(band(0, 3, COMPOSITE + 1)))), // another composite
        (7, cfg(Some(band(0, 2, 17)))),            // not a reserved id
    ] {
        assert!(
            matches!(med.add_vm(vm, c), Err(MediatorError::ScanoutUnavailable(_))),
            "vm {vm}"
        );
    }
}

#[test]
fn a_vm_in_a_band_moves_no_cursor_on_the_shared_head() {
    let (mut med, mut guests) = world();
    let g = &mut guests[0];
    send(&mut med, g, &framebuffer(1, W, H));
    let pos = crate::wire::CursorPos {
        scanout_id: 0,
        x: 10,
        y: 10,
        padding: 0,
    };
    for cmd in [
        Command::UpdateCursor {
            pos,
            resource_id: 1,
            hot_x: 0,
            hot_y: 0,
        },
        Command::MoveCursor { pos },
    ] {
        g.add(QueueId::Cursor, &req(cmd));
    }
    g.kick(QueueId::Cursor);
    let r = med
        .process_doorbell(g.vm, QueueId::Cursor, &mut g.mem)
        .unwrap();
    assert_eq!((r.emulated, r.staged, r.rejected), (2, 0, 0));
    assert!(
        med.take_batch(g.vm, 64).is_none(),
        "nothing reaches the GPU"
    );
    assert_eq!(
        g.take_used(QueueId::Cursor).len(),
        2,
        "both chains come back"
    );
}

/// The copies of `[off, off + len)` by a plain walk from the first run: what
/// `validate::backing_runs` must produce, whatever cursor it resumes from.
fn reference_runs(b: &vm::Backing, off: u64, len: u64, dst: u64) -> Vec<BandCopy> {
    let mut out = Vec::new();
    let (mut at, mut off, mut left, mut dst) = (0u64, off, len, dst);
    for e in &b.host {
        let elen = u64::from(e.len);
        if left > 0 && off < at + elen {
            let n = (elen - (off - at)).min(left);
            out.push(BandCopy {
                src: Some(e.hpa.offset(off - at)),
                dst,
                len: n,
            });
            off += n;
            dst += n;
            left -= n;
        }
        at += elen;
    }
    out
}

proptest::proptest! {
    /// Row after row (rising offsets, as a transfer's rows come), the cursor walk gives
    /// exactly the copies of a walk from the first run: scattered backings of many
    /// small runs cost one pass over the runs, not one per row.
    #[test]
    fn a_transfer_walks_the_backing_once_and_copies_the_same_bytes(
        lens in proptest::collection::vec(1u32..5000, 1..200),
        start in 0u64..4096,
        row in 1u64..3000,
        gap in 0u64..3000,
        rows in 1u64..64,
    ) {
        let mut hpa = Hpa::new(0x10_0000);
        let host: Vec<vm::HostRun> = lens
            .iter()
            .map(|&l| {
                let r = vm::HostRun { hpa, len: l };
                hpa = hpa.offset(u64::from(l) + 0x1000);
                r
            })
            .collect();
        let len = lens.iter().map(|&l| u64::from(l)).sum();
        let b = vm::Backing { guest: Vec::new(), host, len, charge: 0 };
        let mut cursor = validate::RunCursor::default();
        for i in 0..rows {
            let off = start + i * (row + gap);
            let mut got = Vec::new();
            validate::backing_runs(&b, &mut cursor, off, row, i * 1000, &mut got);
            proptest::prop_assert_eq!(got, reference_runs(&b, off, row, i * 1000));
        }
    }
}
