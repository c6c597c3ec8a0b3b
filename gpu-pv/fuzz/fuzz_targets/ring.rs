//! Arbitrary bytes become guest RAM and a queue layout (raw, or a Linux-shaped
//! ring that the bytes then corrupt). The device side pops until
//! the ring is empty or malformed, gathering, answering and returning every chain;
//! then a driver-side queue reads a used ring the fuzzer wrote. Nothing may panic,
//! every popped buffer must lie in guest RAM, and the driver's bookkeeping must
//! stay within the queue.
#![no_main]

use gpu_pv::abi::limits;
use gpu_pv::command::{self, Response};
use gpu_pv::memory::{Gpa, GuestMemory, Hpa, VecMemory};
use gpu_pv::ring::{self, driver::DriverQueue, DeviceQueue, QueueLayout};
use libfuzzer_sys::fuzz_target;

/// Guest-physical address of the first RAM byte.
const BASE: Gpa = Gpa::new(0x10_0000);

/// Header bytes that choose the layout; the rest of the input is guest RAM.
const HDR: usize = 12;

fuzz_target!(|data: &[u8]| {
    if data.len() < HDR {
        return;
    }
    let (h, rest) = data.split_at(HDR);
    let Some((mut mem, layout)) = (if h[1] & 0x20 != 0 {
        linux_shaped(h, rest)
    } else {
        raw(h, rest)
    }) else {
        return;
    };
    let Ok(mut q) = DeviceQueue::new(layout) else {
        return;
    };
    device_side(&mut mem, &mut q);
    driver_side(&mut mem, layout, &h[8..12]);
});

/// The input past the header is guest RAM, rings included, as it comes.
fn raw(h: &[u8], ram: &[u8]) -> Option<(VecMemory, QueueLayout)> {
    let ctl = h[1];
    // Mostly small queues whose rings fit in the input; now and then any size.
    let size = if ctl & 0x40 != 0 {
        1u16 << (h[0] % 16)
    } else {
        1u16 << (h[0] % 7)
    };
    // Ring addresses inside the input or just past it.
    let span = ram.len() as u64 + 64;
    let at = |i: usize| BASE.get() + u64::from(u16::from_le_bytes([h[i], h[i + 1]])) % span;
    let (mut desc, mut avail, mut used) = (at(2), at(4), at(6));
    // Usually aligned as virtio requires; now and then not.
    if ctl & 0x80 == 0 {
        desc &= !15;
        avail &= !1;
        used &= !3;
    }
    // The ring addresses are what the guest (the fuzzer) wrote.
    let layout = QueueLayout {
        size,
        desc: Gpa::new(desc),
        avail: Gpa::new(avail),
        used: Gpa::new(used),
        event_idx: ctl & 1 != 0,
        indirect: ctl & 2 != 0,
    };
    let mem = VecMemory {
        base: BASE,
        host_base: Hpa::new(0x8000_0000),
        bytes: ram.to_vec(),
    };
    Some((mem, layout))
}

/// Command types a Linux guest sends, for the structured mode.
const TYPES: [u32; 11] = [
    0x0100, 0x0101, 0x0102, 0x0103, 0x0104, 0x0105, 0x0106, 0x0107, 0x010a, 0x0300, 0x0301,
];

/// A ring as Linux builds it (control commands in indirect 1R+1W, attach backing
/// 2R+1W, cursor commands one direct descriptor), with command bytes from the
/// input, then corrupted by the input's remaining bytes: (offset, xor) patches.
/// Reaches the paths behind a well-formed ring far sooner than raw bytes do.
fn linux_shaped(h: &[u8], rest: &[u8]) -> Option<(VecMemory, QueueLayout)> {
    const RAM: usize = 0x4000;
    let layout = QueueLayout {
        size: 1u16 << (h[0] % 7).max(2),
        desc: BASE,
        avail: BASE.offset(0x400),
        used: BASE.offset(0x600),
        event_idx: h[1] & 1 != 0,
        indirect: h[1] & 2 != 0,
    };
    let mut mem = VecMemory::new(BASE, Hpa::new(0x8000_0000), RAM);
    let mut drv = DriverQueue::new(&mut mem, layout).ok()?;
    let mut input = rest.iter().copied();
    let mut next = || input.next().unwrap_or(0);
    let commands = usize::from(next() % 8) + 1;
    for i in 0..commands as u64 {
        let slot = BASE.offset(0x1000 + 0x200 * i);
        let table = BASE.offset(0x800 + 0x40 * i);
        let type_ = TYPES[usize::from(next()) % TYPES.len()];
        let mut cmd = vec![0u8; 24 + 32];
        cmd[0..4].copy_from_slice(&type_.to_le_bytes());
        cmd[4] = next() & 1; // FLAG_FENCE or not
        for b in cmd[8..].iter_mut() {
            *b = next();
        }
        let resp = (slot.offset(0x180), 0x80);
        let added = match type_ {
            0x0300 | 0x0301 => {
                mem.write(slot, &cmd).ok()?;
                drv.add(&mut mem, &[(slot, 56)], &[], None)
            }
            0x0106 => {
                // Header, then the entries in a second buffer.
                let nr = u32::from(next() % 4);
                cmd[28..32].copy_from_slice(&nr.to_le_bytes());
                mem.write(slot, &cmd[..32]).ok()?;
                mem.write(slot.offset(0x40), &cmd[..]).ok()?;
                let readable = [(slot, 32), (slot.offset(0x40), 16 * nr)];
                let table = layout.indirect.then_some(table);
                drv.add(&mut mem, &readable, &[resp], table)
            }
            _ => {
                mem.write(slot, &cmd).ok()?;
                let table = layout.indirect.then_some(table);
                drv.add(&mut mem, &[(slot, 56)], &[resp], table)
            }
        };
        if added.is_err() {
            break;
        }
    }
    drv.kick(&mut mem).ok()?;
    loop {
        let (lo, hi, x) = (next(), next(), next());
        if x == 0 {
            break;
        }
        let off = usize::from(u16::from_le_bytes([lo, hi])) % RAM;
        mem.bytes[off] ^= x;
    }
    Some((mem, layout))
}

fn device_side(mem: &mut VecMemory, q: &mut DeviceQueue) {
    let (lo, hi) = (mem.base, mem.base.offset(mem.bytes.len() as u64));
    let size = q.layout().size;
    // Answers can rewrite the ring, so bound the rounds, not just the pending count.
    for _ in 0..=2 * u32::from(size) + 1 {
        let chain = match q.pop(mem) {
            Ok(Some(c)) => c,
            Ok(None) | Err(_) => break,
        };
        assert!(chain.head < size);
        let n = chain.readable.len() + chain.writable.len();
        assert!((1..=limits::MAX_CHAIN_DESCRIPTORS).contains(&n));
        for s in chain.readable.iter().chain(&chain.writable) {
            assert!(
                s.gpa >= lo && s.gpa.offset(u64::from(s.len)) <= hi,
                "{s:?} outside RAM"
            );
        }
        let mut staging = Vec::new();
        let answer = match ring::gather(
            mem,
            &chain.readable,
            &mut staging,
            limits::MAX_COMMAND_BYTES,
        ) {
            Ok(len) => {
                assert_eq!(len, staging.len());
                assert_eq!(len, chain.readable_len() as usize);
                match command::decode(&staging) {
                    Ok(req) => {
                        let mut out = Vec::new();
                        Response::OkNoData.encode(&req.hdr, &mut out);
                        out
                    }
                    Err(e) => {
                        let mut out = Vec::new();
                        Response::Err(e.response_type()).encode(&Default::default(), &mut out);
                        out
                    }
                }
            }
            Err(ring::RingError::TooLarge) => {
                assert!(chain.readable_len() as usize > limits::MAX_COMMAND_BYTES);
                Vec::new()
            }
            Err(e) => panic!("gather of a popped chain failed: {e:?}"),
        };
        let written = ring::scatter(mem, &chain.writable, &answer).expect("writable chain");
        assert!(written as usize <= answer.len() && written <= chain.writable_len());
        // The rings themselves may lie partly outside RAM: a typed error, then stop.
        let old = q.used_idx();
        let returned = q
            .push_used(mem, chain.head, written)
            .and_then(|()| q.should_notify(mem, old))
            .and_then(|_| q.set_avail_event(mem));
        match returned {
            Ok(()) => {}
            Err(ring::RingError::Memory(_)) => break,
            Err(e) => panic!("returning a popped chain failed: {e:?}"),
        }
    }
}

/// A driver whose device is the fuzzer: lay out the queue, add a few chains, then
/// let the input's bytes stand for the used ring.
fn driver_side(mem: &mut VecMemory, layout: QueueLayout, h: &[u8]) {
    // Keep what the device side left in RAM as the used ring's future contents.
    let used_len = 6 + 8 * usize::from(layout.size);
    let mut used_bytes = vec![0u8; used_len];
    if mem.read(layout.used, &mut used_bytes).is_err() {
        return;
    }
    let Ok(mut drv) = DriverQueue::new(mem, layout) else {
        return;
    };
    let chains = usize::from(h[0] % 8);
    for i in 0..chains {
        let r = [(BASE, u32::from(h[1])); 2];
        let w = [(BASE.offset(64), u32::from(h[2]))];
        let nr = 1 + (i % 2);
        let table = (h[3] & (1 << i) != 0).then_some(BASE.offset(128));
        let _ = drv.add(mem, &r[..nr], &w, table);
    }
    let _ = drv.kick(mem);
    // The "device" answers with whatever the input held.
    if mem.write(layout.used, &used_bytes).is_err() {
        return;
    }
    for _ in 0..=u32::from(layout.size) {
        match drv.take_used(mem) {
            Ok(Some((head, _))) => assert!(head < layout.size),
            Ok(None) | Err(_) => break,
        }
        assert!(drv.num_free() <= layout.size);
        assert!(drv.in_flight() <= layout.size);
    }
}
