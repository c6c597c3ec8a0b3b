//! Two VMs share the mediator. The fuzzer drives VM 1 (the "evil" one) from a
//! script of operations: adding chains with arbitrary command bytes, rewriting
//! any byte of its RAM (rings included) between calls, ringing doorbells, taking
//! batches, completing them partly, out of order, with wrong statuses or with
//! fences that are not its own (the victim's included), advancing the clock past
//! the watchdog, resetting. VM 2 (the victim) does ordinary work in between.
//!
//! Invariants, after every operation: nothing panics; the victim's context
//! (resources, host ids, VRAM, fences, queues) and its RAM change only through its
//! own operations, which all succeed; every host command of VM 1 names only its
//! own scanout, host resources that are not the victim's, and backing in its own
//! RAM; every IOMMU op of an operation belongs to the VM it was for; interrupts of
//! VM 1's operations are VM 1's; VRAM accounting adds up.
#![no_main]

mod common;

use common::*;
use gpu_pv::command::Command;
use gpu_pv::mediator::{Batch, Completion, Mediator, QueueId, VmState};
use gpu_pv::wire::{self, MemEntry};
use libfuzzer_sys::fuzz_target;

/// Command types a guest may send (plus some it may not).
const TYPES: [u32; 14] = [
    0x0100, 0x0101, 0x0102, 0x0103, 0x0104, 0x0105, 0x0106, 0x0107, 0x0108, 0x010a, 0x0300, 0x0301,
    0x0200, 0x0207,
];

const STATUSES: [u32; 6] = [
    wire::RESP_OK_NODATA,
    wire::RESP_OK_NODATA,
    wire::RESP_OK_NODATA,
    wire::RESP_ERR_UNSPEC,
    wire::RESP_ERR_OUT_OF_MEMORY,
    wire::RESP_OK_DISPLAY_INFO,
];

struct World {
    med: Mediator,
    evil: Guest,
    victim: Guest,
    /// Batches of VM 1 on the "GPU", not completed yet.
    held: Vec<Batch>,
    victim_held: Option<Batch>,
    now: u64,
    expect: VictimState,
    victim_host: Vec<u32>,
    /// What the run reached (printed with `GPUPV_FUZZ_STATS` set, to see how
    /// deep a corpus gets).
    stats: [u32; 6],
}

const STAT_NAMES: [&str; 6] = [
    "host commands taken",
    "IOMMU maps",
    "completions applied",
    "stale completions",
    "ring faults",
    "resets",
];

impl World {
    /// Checks that an operation of VM 1 left the victim alone.
    fn check_evil_op(&mut self) {
        let ops = self.med.take_iommu_ops();
        check_iommu(&ops, EVIL);
        self.stats[1] += ops
            .iter()
            .filter(|o| matches!(o, gpu_pv::mediator::IommuOp::Map { .. }))
            .count() as u32;
        if self.med.vm(EVIL).map(|v| v.state()) == Some(VmState::NeedsReset) {
            self.stats[4] += 1;
        }
        for (vm, _) in self.med.take_interrupts() {
            assert_eq!(vm, EVIL, "VM 1's operation interrupted the victim");
        }
        self.med.take_events();
        assert_eq!(victim_state(&self.med, &self.victim), self.expect);
        if let Some(b) = &self.victim_held {
            for c in &b.commands {
                let ctx = self.med.vm(VICTIM).unwrap().context_id();
                assert_eq!(self.med.route(c.host_fence), Some((VICTIM, ctx)));
            }
        }
        self.check_vram();
    }

    fn check_vram(&self) {
        let e = self.med.vm(EVIL).unwrap();
        let v = self.med.vm(VICTIM).unwrap();
        assert!(e.vram_used() <= e.vram_quota());
        assert_eq!(self.med.vram_used(), e.vram_used() + v.vram_used());
    }

    fn took(&mut self, b: Batch) {
        assert_eq!(b.vm, EVIL);
        assert!(!b.commands.is_empty());
        for c in &b.commands {
            check_host_command(c, EVIL, 0, &self.victim_host);
        }
        self.stats[0] += b.commands.len() as u32;
        self.held.push(b);
    }

    /// The victim sends a transfer and a flush and takes the batch.
    fn victim_submit(&mut self) {
        if self.victim_held.is_some() {
            return;
        }
        for cmd in [
            Command::TransferToHost2d {
                rect: rect(32, 32),
                offset: 0,
                resource_id: 2,
            },
            Command::ResourceFlush {
                rect: rect(32, 32),
                resource_id: 2,
            },
        ] {
            assert!(self.victim.add(QueueId::Control, &encode(cmd, 0, 0), false));
        }
        self.victim.kick();
        let r = self
            .med
            .process_doorbell(VICTIM, QueueId::Control, &mut self.victim.mem)
            .unwrap();
        assert_eq!(r.staged, 2, "{r:?}");
        let b = self.med.take_batch(VICTIM, 64).expect("the victim's batch");
        for c in &b.commands {
            check_host_command(c, VICTIM, 1, &[]);
        }
        self.victim_held = Some(b);
        self.sync_victim();
    }

    fn victim_complete(&mut self) {
        let Some(b) = self.victim_held.take() else {
            return;
        };
        let done: Vec<Completion> = b
            .commands
            .iter()
            .map(|c| Completion {
                host_fence: c.host_fence,
                status: wire::RESP_OK_NODATA,
            })
            .collect();
        let r = self
            .med
            .complete_batch(VICTIM, &done, &mut self.victim.mem)
            .unwrap();
        assert_eq!((r.completed, r.stale, r.returned), (2, 0, 2), "{r:?}");
        assert!(r.batch_done);
        let mut n = 0;
        while let Ok(Some((_, written))) = self.victim.ctrl.take_used(&self.victim.mem) {
            assert_eq!(written, 24);
            n += 1;
        }
        assert_eq!(n, 2);
        // Both answers are OK_NODATA.
        for k in 0..2u64 {
            let at = SLOTS.offset(SLOT * ((self.victim.next_slot - 2 + k) % 12) + RESP);
            let b = guest_mem_read(&self.victim.mem, at, 4);
            assert_eq!(u32::from_le_bytes([b[0], b[1], b[2], b[3]]), 0x1100);
        }
        self.victim
            .ctrl
            .set_used_event(&mut self.victim.mem, self.victim.ctrl.last_used_idx())
            .unwrap();
        self.sync_victim();
    }

    fn sync_victim(&mut self) {
        check_iommu(&self.med.take_iommu_ops(), VICTIM);
        for (vm, _) in self.med.take_interrupts() {
            assert_eq!(vm, VICTIM);
        }
        self.med.take_events();
        self.expect = victim_state(&self.med, &self.victim);
    }
}

/// A command's bytes: usually a plausible command (small ids, known formats,
/// rectangles and backing near the VM's own), sometimes raw fields.
fn command_bytes(b: &mut Bytes<'_>) -> (Vec<u8>, bool) {
    let sel = b.u8();
    if sel & 0x80 == 0 {
        // Zero bytes give valid values: the shortest inputs already reach the
        // validator's success paths.
        let id = [2, 3, 4, 0, 1, 5][usize::from(b.u8() % 6)];
        let small = |b: &mut Bytes<'_>| u32::from(b.u8() % 80);
        let r = |b: &mut Bytes<'_>| gpu_pv::wire::Rect {
            x: small(b) % 40,
            y: small(b) % 40,
            width: small(b),
            height: small(b),
        };
        let cmd = match sel % 12 {
            0 | 11 => Command::ResourceCreate2d {
                resource_id: id,
                format: [2, 1, 3, 4, 67, 68, 121, 134, 0, 99][usize::from(b.u8() % 10)],
                width: small(b) + 1,
                height: small(b) + 1,
            },
            2 | 3 => Command::ResourceAttachBacking {
                resource_id: id,
                entries: (0..b.u8() % 4 + 1)
                    .map(|_| {
                        let wild = b.u8();
                        MemEntry {
                            addr: if wild & 0xc0 == 0xc0 {
                                u64::from(b.u32()) << (wild & 31)
                            } else {
                                BACKING.offset(u64::from(b.u16() % 0xc000)).get()
                            },
                            length: if wild & 0x20 != 0 {
                                b.u32()
                            } else {
                                u32::from(b.u16() % 0x6000) + 1
                            },
                            padding: 0,
                        }
                    })
                    .collect(),
            },
            4 => Command::SetScanout {
                rect: r(b),
                scanout_id: u32::from(b.u8() % 3),
                resource_id: id,
            },
            5 => Command::TransferToHost2d {
                rect: r(b),
                offset: u64::from(b.u16()),
                resource_id: id,
            },
            6 => Command::ResourceFlush {
                rect: r(b),
                resource_id: id,
            },
            7 => Command::ResourceUnref { resource_id: id },
            8 => Command::ResourceDetachBacking { resource_id: id },
            9 => Command::UpdateCursor {
                pos: gpu_pv::wire::CursorPos {
                    scanout_id: u32::from(b.u8() % 3),
                    x: small(b),
                    y: small(b),
                    padding: 0,
                },
                resource_id: id,
                hot_x: 0,
                hot_y: 0,
            },
            10 => Command::MoveCursor {
                pos: gpu_pv::wire::CursorPos {
                    scanout_id: u32::from(b.u8() % 3),
                    x: small(b),
                    y: small(b),
                    padding: 0,
                },
            },
            _ => {
                if b.u8() & 1 == 0 {
                    Command::GetDisplayInfo
                } else {
                    Command::GetEdid {
                        scanout: u32::from(b.u8() % 3),
                    }
                }
            }
        };
        let f = b.u8();
        let (flags, fence) = match f & 3 {
            1 => (wire::FLAG_FENCE, u64::from(f >> 2)),
            2 => (u32::from(f >> 2), u64::from(f)),
            _ => (0, 0),
        };
        let split = matches!(cmd, Command::ResourceAttachBacking { .. });
        return (encode(cmd, flags, fence), split);
    }
    let t = TYPES[usize::from(b.u8()) % TYPES.len()];
    let ctl = b.u8();
    let flags = u32::from(ctl & 3);
    let fence = u64::from(b.u8() % 8);
    let mut bytes = vec![0u8; 24];
    bytes[0..4].copy_from_slice(&t.to_le_bytes());
    bytes[4..8].copy_from_slice(&flags.to_le_bytes());
    bytes[8..16].copy_from_slice(&fence.to_le_bytes());
    for _ in 0..8 {
        let v = b.u8();
        let w = if v & 0x80 != 0 {
            b.u32()
        } else {
            u32::from(v % 72)
        };
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    let cut = usize::from(ctl >> 4);
    if ctl & 8 != 0 {
        bytes.truncate(bytes.len().saturating_sub(cut * 4));
    }
    (bytes, ctl & 4 != 0)
}

/// The GPU runs what VM 1 has staged; `fail` picks which completions fail.
fn run_evil(w: &mut World, fail: u8) {
    while let Some(batch) = w.med.take_batch(EVIL, 64) {
        let ids: Vec<u64> = batch.commands.iter().map(|c| c.host_fence).collect();
        w.took(batch);
        let done: Vec<Completion> = ids
            .iter()
            .enumerate()
            .map(|(k, &f)| Completion {
                host_fence: f,
                status: if fail & 0x80 != 0 && fail & (1 << (k % 7)) != 0 {
                    STATUSES[k % STATUSES.len()]
                } else {
                    wire::RESP_OK_NODATA
                },
            })
            .collect();
        let r = w.med.complete_batch(EVIL, &done, &mut w.evil.mem).unwrap();
        w.stats[2] += r.completed as u32;
        w.held.clear();
        if !r.batch_done {
            break;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let ctl = b.u8();
    let mut med = mediator();
    let victim = victim(&mut med);
    let victim_host: Vec<u32> = med.vm(VICTIM).unwrap().host_resources().collect();
    let mut evil = Guest::new(EVIL, ctl & 1 != 0, ctl & 2 != 0);
    evil.start(&mut med);
    if ctl & 4 == 0 {
        // Usually VM 1 starts as a driver leaves it after probing: a backed
        // framebuffer (resource 2) on its scanout, so short inputs already reach
        // transfers, flushes, detach, unref and their completions.
        exchange(
            &mut med,
            &mut evil,
            &[
                Command::ResourceCreate2d {
                    resource_id: 2,
                    format: gpu_pv::wire::format::B8G8R8X8_UNORM,
                    width: 64,
                    height: 64,
                },
                Command::ResourceAttachBacking {
                    resource_id: 2,
                    entries: vec![
                        MemEntry {
                            addr: BACKING.offset(0x4000).get(),
                            length: 0x2000,
                            padding: 0,
                        },
                        MemEntry {
                            addr: BACKING.get(),
                            length: 0x2000,
                            padding: 0,
                        },
                    ],
                },
                Command::SetScanout {
                    rect: rect(64, 64),
                    scanout_id: 0,
                    resource_id: 2,
                },
            ],
        );
        let at = evil.ctrl.last_used_idx();
        evil.ctrl.set_used_event(&mut evil.mem, at).unwrap();
    }
    med.take_events();
    med.take_interrupts();
    med.take_iommu_ops();
    let expect = victim_state(&med, &victim);
    let mut victim_ram = fingerprint(&victim.mem.bytes);
    let mut w = World {
        med,
        evil,
        victim,
        held: Vec::new(),
        victim_held: None,
        now: 0,
        expect,
        victim_host,
        stats: [0; 6],
    };
    let mut ops = 0;
    while !b.is_empty() && ops < 256 {
        ops += 1;
        let op = b.u8();
        match op % 16 {
            0..=2 => {
                let (bytes, split) = command_bytes(&mut b);
                w.evil.add(QueueId::Control, &bytes, split);
                // Then, as a guest does, publish and ring; and maybe let the GPU run.
                if op & 0x10 == 0 {
                    w.evil.kick();
                    let _ = w
                        .med
                        .process_doorbell(EVIL, QueueId::Control, &mut w.evil.mem);
                    if op & 0x20 == 0 {
                        run_evil(&mut w, 0);
                    }
                }
            }
            3 => {
                let (bytes, _) = command_bytes(&mut b);
                w.evil.add(QueueId::Cursor, &bytes, false);
            }
            4 => {
                let fail = b.u8();
                run_evil(&mut w, fail);
            }
            5 | 6 => {
                let q = if op % 16 == 5 {
                    QueueId::Control
                } else {
                    QueueId::Cursor
                };
                // Usually the guest publishes first; sometimes it rings without.
                if op & 0x80 == 0 {
                    w.evil.kick();
                }
                let _ = w.med.process_doorbell(EVIL, q, &mut w.evil.mem);
            }
            7 => {
                let max = usize::from(b.u8() % 8) + 1;
                if let Some(batch) = w.med.take_batch(EVIL, max) {
                    w.took(batch);
                }
            }
            8 => {
                // Completions in an order and with statuses of the fuzzer's choosing,
                // some of them fences that are not in VM 1's batch.
                let n = usize::from(b.u8() % 6);
                let mut done = Vec::new();
                for _ in 0..n {
                    let pick = b.u8();
                    let status = STATUSES[usize::from(pick >> 5) % STATUSES.len()];
                    let fence = match pick & 3 {
                        0 | 1 => {
                            let all: Vec<u64> = w
                                .held
                                .iter()
                                .flat_map(|x| x.commands.iter().map(|c| c.host_fence))
                                .collect();
                            if all.is_empty() {
                                continue;
                            }
                            all[usize::from(b.u8()) % all.len()]
                        }
                        2 => match &w.victim_held {
                            Some(v) => {
                                v.commands[usize::from(b.u8()) % v.commands.len()].host_fence
                            }
                            None => u64::from(b.u8()),
                        },
                        _ => u64::from(b.u16()),
                    };
                    done.push(Completion {
                        host_fence: fence,
                        status,
                    });
                }
                let r = w.med.complete_batch(EVIL, &done, &mut w.evil.mem).unwrap();
                assert_eq!(r.completed + r.stale, done.len());
                w.stats[2] += r.completed as u32;
                w.stats[3] += r.stale as u32;
                if r.batch_done || w.med.vm(EVIL).is_some_and(|v| !v.has_batch_in_flight()) {
                    w.held.clear();
                }
            }
            9 => {
                // The guest rewrites its RAM between two calls (rings included).
                let n = usize::from(b.u8() % 4) + 1;
                for _ in 0..n {
                    // Mostly the rings and the descriptor tables.
                    let off = usize::from(b.u16());
                    let off = if off & 0x8000 == 0 {
                        off % 0x800
                    } else {
                        off % RAM
                    };
                    let x = b.u8().max(1);
                    w.evil.mem.bytes[off] ^= x;
                }
            }
            10 => {
                // Time passes; if the victim has a batch out, it completes first.
                w.victim_complete();
                victim_ram = fingerprint(&w.victim.mem.bytes);
                w.now = w.now.saturating_add(u64::from(b.u8()) * 100_000_000);
                let hung = w.med.tick(w.now);
                assert!(!hung.contains(&VICTIM));
            }
            11 => {
                let r = if b.u8() & 1 == 0 {
                    w.med.reset_vm(EVIL)
                } else {
                    w.med.driver_reset(EVIL)
                }
                .unwrap();
                for &(hpa, len) in &r.unmapped {
                    assert!(in_ram_of(EVIL, hpa, len));
                }
                w.stats[5] += 1;
                if b.u8() & 3 != 0 {
                    w.evil.reinit();
                    w.evil.start(&mut w.med);
                }
            }
            12 => {
                // The guest reclaims what was returned.
                while let Ok(Some(_)) = w.evil.ctrl.take_used(&w.evil.mem) {}
                while let Ok(Some(_)) = w.evil.cursor.take_used(&w.evil.mem) {}
                let at = w.evil.ctrl.last_used_idx();
                let _ = w.evil.ctrl.set_used_event(&mut w.evil.mem, at);
                if w.med.vm(EVIL).map(|v| v.state()) == Some(VmState::Reset) {
                    w.evil.reinit();
                    w.evil.start(&mut w.med);
                }
            }
            13 => {
                let _ = w.med.poll(EVIL, &mut w.evil.mem);
            }
            14 => {
                w.victim_submit();
                victim_ram = fingerprint(&w.victim.mem.bytes);
                continue;
            }
            _ => {
                w.victim_complete();
                victim_ram = fingerprint(&w.victim.mem.bytes);
                continue;
            }
        }
        w.check_evil_op();
    }
    // VM 1's calls never wrote the victim's RAM.
    assert_eq!(fingerprint(&w.victim.mem.bytes), victim_ram);
    // Whatever VM 1 did, the victim still works end to end.
    w.victim_complete();
    w.victim_submit();
    w.victim_complete();
    // And a reset of VM 1 gives everything back.
    let r = w.med.reset_vm(EVIL).unwrap();
    for &(hpa, len) in &r.unmapped {
        assert!(in_ram_of(EVIL, hpa, len));
    }
    w.check_evil_op();
    assert_eq!(w.med.vm(EVIL).unwrap().vram_used(), 0);
    assert_eq!(w.med.vm(EVIL).unwrap().resource_count(), 0);
    if std::env::var_os("GPUPV_FUZZ_STATS").is_some() {
        let s: Vec<String> = STAT_NAMES
            .iter()
            .zip(w.stats)
            .map(|(n, v)| format!("{n} {v}"))
            .collect();
        eprintln!("stats: {}", s.join(", "));
    }
});
