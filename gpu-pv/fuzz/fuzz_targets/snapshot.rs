//! Arbitrary bytes as a snapshot to restore (`Mediator::restore`), either as they
//! come or as a valid snapshot of a VM the fuzzer drove, then corrupted by the
//! input's (offset, xor) patches.
//!
//! Invariants: nothing panics; a refused snapshot leaves the VM as it was (fresh,
//! holding nothing, no IOMMU op, no VRAM); an accepted one stages only host
//! commands that name its own scanout, host resources that are not the victim's,
//! and backing in its own RAM, its VRAM stays within its quota, and once those
//! commands have run the VM can be snapshotted again and that snapshot restores;
//! the victim VM is untouched throughout.
#![no_main]

mod common;

use common::*;
use gpu_pv::mediator::{Mediator, QueueId, VmState};
use gpu_pv::memory::{Gpa, VecMemory};
use libfuzzer_sys::fuzz_target;

/// Drives VM 1 of a fresh mediator with well-formed-looking commands from the
/// input, runs them, and snapshots it; falls back to the victim's snapshot.
fn structured(b: &mut Bytes<'_>) -> (Vec<u8>, VecMemory) {
    let mut src = mediator();
    let mut v = victim(&mut src);
    let mut g = Guest::new(EVIL, true, true);
    g.start(&mut src);
    let n = b.u8() % 12;
    for _ in 0..n {
        let t = b.u8() % 6;
        let id = u32::from(b.u8() % 4) + 2;
        let cmd = match t {
            0 => gpu_pv::command::Command::ResourceCreate2d {
                resource_id: id,
                format: [1, 2, 3, 4, 67, 68, 121, 134][usize::from(b.u8() % 8)],
                width: u32::from(b.u8() % 64) + 1,
                height: u32::from(b.u8() % 64) + 1,
            },
            1 => gpu_pv::command::Command::ResourceAttachBacking {
                resource_id: id,
                entries: (0..b.u8() % 3 + 1)
                    .map(|k| gpu_pv::wire::MemEntry {
                        addr: BACKING
                            .offset(0x2000 * u64::from(k) + u64::from(b.u8()) * 64)
                            .get(),
                        length: u32::from(b.u16() % 0x2000) + 1,
                        padding: 0,
                    })
                    .collect(),
            },
            2 => gpu_pv::command::Command::SetScanout {
                rect: rect(u32::from(b.u8() % 64) + 1, u32::from(b.u8() % 64) + 1),
                scanout_id: 0,
                resource_id: id,
            },
            3 => gpu_pv::command::Command::ResourceUnref { resource_id: id },
            4 => gpu_pv::command::Command::ResourceDetachBacking { resource_id: id },
            _ => gpu_pv::command::Command::TransferToHost2d {
                rect: rect(u32::from(b.u8() % 16) + 1, 1),
                offset: 0,
                resource_id: id,
            },
        };
        let fence = b.u8();
        let (flags, fence) = if fence & 1 != 0 {
            (gpu_pv::wire::FLAG_FENCE, u64::from(fence))
        } else {
            (0, 0)
        };
        let split = matches!(cmd, gpu_pv::command::Command::ResourceAttachBacking { .. });
        g.add(QueueId::Control, &encode(cmd, flags, fence), split);
    }
    g.kick();
    let _ = src.process_doorbell(EVIL, QueueId::Control, &mut g.mem);
    run_all(&mut src, &mut g);
    while let Ok(Some(_)) = g.ctrl.take_used(&g.mem) {}
    match src.snapshot(EVIL) {
        Ok(s) => (s, g.mem),
        Err(_) => {
            let s = src.snapshot(VICTIM).expect("the victim is quiescent");
            v.mem.host_base = host_base(EVIL);
            (s, v.mem)
        }
    }
}

/// Runs the VM's staged commands, checking each one.
fn drain(med: &mut Mediator, mem: &mut VecMemory, victim_host: &[u32]) {
    while let Some(batch) = med.take_batch(EVIL, 64) {
        for c in &batch.commands {
            check_host_command(c, EVIL, 0, victim_host);
        }
        let done: Vec<_> = batch
            .commands
            .iter()
            .map(|c| gpu_pv::mediator::Completion {
                host_fence: c.host_fence,
                status: gpu_pv::wire::RESP_OK_NODATA,
            })
            .collect();
        med.complete_batch(EVIL, &done, mem).unwrap();
    }
    check_iommu(&med.take_iommu_ops(), EVIL);
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let mode = b.u8();
    let (bytes, mut mem) = if mode & 1 == 0 {
        (
            b.rest().to_vec(),
            VecMemory::new(Gpa::new(0), host_base(EVIL), RAM),
        )
    } else {
        let (mut s, mem) = structured(&mut b);
        // Corrupt it: (offset, xor) pairs, and maybe a cut.
        while !b.is_empty() {
            let off = usize::from(b.u16());
            let x = b.u8();
            if x == 0 {
                s.truncate(off % (s.len() + 1));
                break;
            }
            if !s.is_empty() {
                let i = off % s.len();
                s[i] ^= x;
            }
        }
        (s, mem)
    };

    let mut med = mediator();
    let victim = victim(&mut med);
    med.take_events();
    med.take_interrupts();
    med.take_iommu_ops();
    let expect = victim_state(&med, &victim);
    let victim_ram = fingerprint(&victim.mem.bytes);
    let victim_host: Vec<u32> = expect.host.clone();
    let vram_before = med.vram_used();

    match med.restore(EVIL, &bytes, &mem) {
        Err(_) => {
            let v = med.vm(EVIL).unwrap();
            assert_eq!(v.state(), VmState::Reset);
            assert_eq!(v.resource_count(), 0);
            assert_eq!(v.host_resources().count(), 0);
            assert_eq!(v.vram_used(), 0);
            assert_eq!(v.memory().used(), 0);
            assert_eq!(v.staged_len(), 0);
            assert!(v.queue(QueueId::Control).is_none());
            assert_eq!(med.vram_used(), vram_before);
            assert!(med.take_iommu_ops().is_empty());
        }
        Ok(()) => {
            let v = med.vm(EVIL).unwrap();
            assert!(v.vram_used() <= v.vram_quota());
            assert_eq!(med.vram_used(), vram_before + v.vram_used());
            check_iommu(&med.take_iommu_ops(), EVIL);
            drain(&mut med, &mut mem, &victim_host);
            for (vm, _) in med.take_interrupts() {
                assert_eq!(vm, EVIL);
            }
            // The restored context is quiescent once its rebuild ran, and its own
            // snapshot restores into another fresh VM.
            let again = med.snapshot(EVIL).expect("a restored context snapshots");
            let mut other = mediator();
            other
                .restore(EVIL, &again, &mem)
                .expect("a snapshot of a restored context restores");
            drain(&mut other, &mut mem, &[]);
            assert_eq!(
                other.vm(EVIL).unwrap().resource_count(),
                med.vm(EVIL).unwrap().resource_count()
            );
        }
    }
    med.take_events();
    assert_eq!(victim_state(&med, &victim), expect);
    assert_eq!(fingerprint(&victim.mem.bytes), victim_ram);
});
