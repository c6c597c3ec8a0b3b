//! The MMIO exit path: 15 arbitrary instruction bytes and arbitrary register values
//! are decoded; a read is completed with an arbitrary device value. Nothing may
//! panic, decoding leaves the registers alone, a store's value has no more bytes
//! than its size, and completing a read changes the destination register only, as
//! the CPU would: the loaded bytes widened as the instruction says (`movzx`/`movsx`),
//! then 32-bit destinations zero-extend, 8- and 16-bit ones merge. A string
//! instruction, run against a bus that takes everything, moves only RSI, RDI and
//! RCX, by one element size per element, and never more elements than allowed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdev::mmio::{self, Access, Extend, Register, StringBus, StringKind, StringProgress};
use vdev::GuestRegs;

/// Instruction bytes, 15 registers, the value the device returns.
const INPUT: usize = 15 + 15 * 8 + 8;

fn to_regs(v: &[u64; 15]) -> GuestRegs {
    GuestRegs {
        rax: v[0],
        rbx: v[1],
        rcx: v[2],
        rdx: v[3],
        rsi: v[4],
        rdi: v[5],
        rbp: v[6],
        r8: v[7],
        r9: v[8],
        r10: v[9],
        r11: v[10],
        r12: v[11],
        r13: v[12],
        r14: v[13],
        r15: v[14],
    }
}

fn to_array(r: &GuestRegs) -> [u64; 15] {
    [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13,
        r.r14, r.r15,
    ]
}

/// The slot of `full` (a 64-bit register) in [`to_array`]'s order.
fn index_of(full: Register) -> Option<usize> {
    [
        Register::RAX,
        Register::RBX,
        Register::RCX,
        Register::RDX,
        Register::RSI,
        Register::RDI,
        Register::RBP,
        Register::R8,
        Register::R9,
        Register::R10,
        Register::R11,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ]
    .iter()
    .position(|&r| r == full)
}

fn mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

/// Takes every access; counts them and checks each one's size and value.
struct Bus {
    accesses: u64,
}

impl StringBus for Bus {
    fn read(&mut self, _va: u64, size: u8) -> Option<u64> {
        assert!(matches!(size, 1 | 2 | 4 | 8));
        self.accesses += 1;
        Some(u64::MAX & mask(size))
    }
    fn write(&mut self, _va: u64, size: u8, value: u64) -> bool {
        assert!(matches!(size, 1 | 2 | 4 | 8));
        assert_eq!(value & mask(size), value);
        self.accesses += 1;
        true
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = [0u8; INPUT];
    let n = data.len().min(INPUT);
    input[..n].copy_from_slice(&data[..n]);
    let (bytes, rest) = input.split_at(15);
    let mut values = [0u64; 15];
    for (v, chunk) in values.iter_mut().zip(rest.chunks_exact(8)) {
        *v = u64::from_le_bytes(chunk.try_into().unwrap());
    }
    let device_value = u64::from_le_bytes(rest[15 * 8..].try_into().unwrap());

    // Fewer bytes than 15 too: the fetch may stop at a page end.
    let fetched = &bytes[..usize::from(data.first().copied().unwrap_or(15) % 16)];
    for bytes in [bytes, fetched] {
        let mut regs = to_regs(&values);
        let decoded = mmio::decode(bytes, &mut regs);
        assert_eq!(to_array(&regs), values, "decode changed the registers");
        let Ok((access, len)) = decoded else {
            continue;
        };
        assert!((1..=bytes.len()).contains(&len), "length {len}");
        match access {
            Access::String(op) => {
                assert!(matches!(op.size, 1 | 2 | 4 | 8), "{access:?}");
                let df = device_value & 1 == 1;
                let max = device_value >> 60;
                let mut bus = Bus { accesses: 0 };
                let progress = op.run(&mut regs, df, &mut bus, max);
                assert_ne!(progress, StringProgress::Fault);
                let after = to_array(&regs);
                let per = if op.kind == StringKind::Movs { 2 } else { 1 };
                let elements = bus.accesses / per;
                assert!(elements <= max && (op.rep || elements <= 1));
                let step = u64::from(op.size).wrapping_mul(elements);
                let moved = |v: u64| if df { v.wrapping_sub(step) } else { v.wrapping_add(step) };
                for (i, (&a, &b)) in after.iter().zip(values.iter()).enumerate() {
                    let expect = match i {
                        2 if op.rep => b.wrapping_sub(elements),
                        4 if op.kind == StringKind::Movs => moved(b),
                        5 => moved(b),
                        _ => b,
                    };
                    assert_eq!(a, expect, "register {i} after {op:?}");
                }
            }
            Access::Write { value, size } => {
                assert!(matches!(size, 1 | 2 | 4 | 8), "{access:?}");
                assert_eq!(value & mask(size), value, "{access:?}");
            }
            Access::Read(load) => {
                let (reg, size) = (load.reg, load.size);
                assert!(matches!(size, 1 | 2 | 4 | 8), "{access:?}");
                match load.extend {
                    Extend::None => assert_eq!(usize::from(size), reg.size(), "{access:?}"),
                    // movsxd r32, m32 moves 4 bytes as they are.
                    _ => assert!(usize::from(size) <= reg.size(), "{access:?}"),
                }
                let slot = index_of(reg.full_register()).expect("a GuestRegs register");
                load.complete(&mut regs, device_value);
                let after = to_array(&regs);
                for (i, (&a, &b)) in after.iter().zip(values.iter()).enumerate() {
                    if i != slot {
                        assert_eq!(a, b, "{reg:?} changed register {i}");
                    }
                }
                let high8 = matches!(
                    reg,
                    Register::AH | Register::BH | Register::CH | Register::DH
                );
                // The loaded bytes, widened to the destination's width.
                let loaded = device_value & mask(size);
                let negative = loaded >> (u32::from(size) * 8 - 1) & 1 == 1;
                let widened = match load.extend {
                    Extend::Sign if negative => loaded | !mask(size),
                    _ => loaded,
                } & mask(reg.size() as u8);
                let (shift, keep) = match reg.size() {
                    1 if high8 => (8, !0xff00),
                    4 => (0, 0),
                    8 => (0, 0),
                    s => (0, !mask(s as u8)),
                };
                let expect = (values[slot] & keep) | (widened << shift);
                assert_eq!(after[slot], expect, "{reg:?} <- {device_value:#x}");
            }
        }
    }
});
