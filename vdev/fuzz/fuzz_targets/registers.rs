//! The virtual virtio-gpu's register files driven in any order: PCI config space
//! reads and writes (BARs moved anywhere, MSI-X control), virtio common config,
//! ISR, device config and notify in BAR4, the MSI-X table and PBA in BAR1, accesses
//! at arbitrary addresses, interrupts raised and released vectors taken. Each op is
//! an opcode byte and its operands from the input; three ops are well-formed driver
//! steps (feature negotiation up to DRIVER_OK, programming an MSI-X entry, BAR
//! sizing) so the fuzzer gets past them and deeper. Nothing may panic, a read never
//! returns more bytes than asked, `claims` matches the BARs as config space shows
//! them (without wrapping at 2^64), and what the device asks of the kernel stays in
//! range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdev::vgpu::{
    offered_features, Action, VirtioGpuDevice, BAR1_SIZE, BAR4_SIZE, DEVICE, MSIX_VECTORS,
};

/// The input as a stream of operands (zeros once it runs out).
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    /// An access size: mostly 1, 2, 4 or 8, sometimes any byte.
    fn size(&mut self) -> u8 {
        let b = self.u8();
        if b & 0x80 == 0 {
            [1, 2, 4, 8][usize::from(b & 3)]
        } else {
            b & 0x7f
        }
    }
}

/// Where BAR4 and BAR1 are, as the guest sees them in config space.
fn bars(d: &VirtioGpuDevice) -> (u64, u64) {
    let bar4 = d.config_read(DEVICE, 0, 0x20, 8) & !0xf;
    let bar1 = d.config_read(DEVICE, 0, 0x14, 4) & !0xf;
    (bar4, bar1)
}

/// An address in one of the device's regions (chosen by the selector byte), or
/// anywhere.
fn address(d: &VirtioGpuDevice, b: &mut Bytes) -> u64 {
    let (bar4, bar1) = bars(d);
    let sel = b.u8();
    let off = u64::from(b.u16());
    match sel % 8 {
        0 => bar4.wrapping_add(off & 0x3f),           // common config
        1 => bar4.wrapping_add(0x1000 + (off & 0xf)), // ISR
        2 => bar4.wrapping_add(0x2000 + (off & 0xf)), // device config
        3 => bar4.wrapping_add(0x3000 + (off & 0xf)), // notify
        4 => bar1.wrapping_add(off & 0x3f),           // MSI-X table
        5 => bar1.wrapping_add(0x800 + (off & 0xf)),  // PBA
        6 => bar4
            .wrapping_add(off % BAR4_SIZE)
            .wrapping_sub(u64::from(sel >> 3)),
        _ => b.u64(),
    }
}

fn fits(v: u64, size: u8) -> bool {
    size >= 8 || v >> (8 * u32::from(size)) == 0
}

fn check_action(d: &VirtioGpuDevice, a: Action) {
    match a {
        Action::Vector(_, entry) => {
            assert!(
                usize::from(entry) < MSIX_VECTORS || entry == 0xffff,
                "{a:?}"
            )
        }
        Action::Start(control, cursor) => {
            assert!(d.live());
            assert!(control.size.is_power_of_two() && cursor.size.is_power_of_two());
        }
        Action::Notify(_) => assert!(d.live()),
        Action::Reset => assert!(!d.live()),
        Action::QueueRestart(_, layout) => assert!(layout.size.is_power_of_two()),
        Action::None | Action::QueueReset(_) => {}
    }
}

/// A driver's bring-up, with fuzzed features and queue layouts: ACKNOWLEDGE |
/// DRIVER, features, FEATURES_OK, both queues, DRIVER_OK.
fn bring_up(d: &mut VirtioGpuDevice, b: &mut Bytes) {
    let (bar4, _) = bars(d);
    let write = |d: &mut VirtioGpuDevice, off: u64, size: u8, v: u64| {
        let a = d.mmio_write(bar4.wrapping_add(off), size, v);
        check_action(d, a);
    };
    let features = (b.u64() & offered_features()) | 1 << 32; // VERSION_1
    write(d, 0x14, 1, 3);
    for half in 0..2 {
        write(d, 0x08, 4, half);
        write(d, 0x0c, 4, (features >> (32 * half)) & 0xffff_ffff);
    }
    write(d, 0x14, 1, 0xb);
    for q in 0..2 {
        write(d, 0x16, 2, q);
        write(d, 0x18, 2, u64::from(b.u8()));
        write(d, 0x1a, 2, u64::from(b.u8() % 4));
        for off in [0x20, 0x28, 0x30] {
            write(d, off, 8, b.u64());
        }
        write(d, 0x1c, 2, 1);
    }
    write(d, 0x14, 1, 0xf);
}

/// The driver programs an MSI-X entry (0-3; 3 is past the table) with a message for
/// the local APIC (vector and mask from the input) and sets the message control
/// register.
fn program_msix(d: &mut VirtioGpuDevice, b: &mut Bytes) {
    let (_, bar1) = bars(d);
    let entry = u64::from(b.u8() % 4) * 16;
    let addr = 0xfee0_0000 | u64::from(b.u16()) << 4;
    let (vector, masked, control) = (b.u8(), b.u8() & 1, b.u8());
    d.mmio_write(bar1.wrapping_add(entry), 4, addr);
    d.mmio_write(bar1.wrapping_add(entry + 8), 4, u64::from(vector));
    d.mmio_write(bar1.wrapping_add(entry + 12), 4, u64::from(masked));
    d.config_write(DEVICE, 0, 0x42, 2, u32::from(control & 0xc0) << 8);
}

/// BAR sizing as an enumerator does it: all ones to a BAR (both halves of the
/// 64-bit BAR4), then, if the input says so, the old value back.
fn size_bar(d: &mut VirtioGpuDevice, b: &mut Bytes) {
    let offs: &[u16] = if b.u8() & 1 == 0 {
        &[0x14]
    } else {
        &[0x20, 0x24]
    };
    let old: Vec<u32> = offs
        .iter()
        .map(|&o| d.config_read(DEVICE, 0, o, 4) as u32)
        .collect();
    for &o in offs {
        d.config_write(DEVICE, 0, o, 4, u32::MAX);
    }
    if b.u8() & 1 == 0 {
        for (&o, &v) in offs.iter().zip(&old) {
            d.config_write(DEVICE, 0, o, 4, v);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let mut d = VirtioGpuDevice::new(u32::from(b.u8() % 17));
    let mut ops = 0;
    while !b.0.is_empty() && ops < 512 {
        ops += 1;
        match b.u8() % 11 {
            0 => {
                let (dev, func, off, size) = (b.u8() % 4, b.u8() % 9, b.u16() % 0x1000, b.size());
                let v = d.config_read(dev, func, off, size);
                assert!(fits(v, size), "config read {off:#x}/{size}: {v:#x}");
            }
            1 => {
                // Mostly the device itself and the registers that matter.
                let dev = if b.u8() & 7 == 0 { b.u8() } else { DEVICE };
                let off = match b.u8() % 4 {
                    0 => 0x10 + u16::from(b.u8() % 6) * 4, // a BAR
                    1 => 0x42,                             // MSI-X control
                    2 => 0x04,                             // command
                    _ => b.u16() % 0x1000,
                };
                // All ones is what a driver sizing a BAR writes.
                let size = b.size();
                let v = match b.u8() % 4 {
                    0 => u32::MAX,
                    1 => 0,
                    _ => b.u32(),
                };
                d.config_write(dev, 0, off, size, v);
            }
            2 | 3 => {
                let (gpa, size) = (address(&d, &mut b), b.size());
                let v = d.mmio_read(gpa, size);
                assert!(fits(v, size), "read {gpa:#x}/{size}: {v:#x}");
            }
            4 | 5 => {
                let (gpa, size, v) = (address(&d, &mut b), b.size(), b.u64());
                let a = d.mmio_write(gpa, size, v);
                check_action(&d, a);
            }
            6 => {
                let entry = if b.u8() & 1 == 0 {
                    u16::from(b.u8() % 4)
                } else {
                    b.u16()
                };
                if let Some(message) = d.raise(entry, b.u8() & 1 != 0) {
                    assert!(message.vector >= 16);
                }
            }
            7 => bring_up(&mut d, &mut b),
            8 => program_msix(&mut d, &mut b),
            9 => size_bar(&mut d, &mut b),
            _ => {
                let released = d.take_released();
                assert!(released.len() <= MSIX_VECTORS);
                assert!(released.iter().all(|m| m.vector >= 16));
                assert!(!d.has_released());
            }
        }
        // `claims` against the BARs, with the range ends computed without wrapping.
        let (bar4, bar1) = bars(&d);
        let gpa = address(&d, &mut b);
        let inside = |base: u64, size: u64| {
            (u128::from(base)..u128::from(base) + u128::from(size)).contains(&u128::from(gpa))
        };
        assert_eq!(
            d.claims(gpa),
            inside(bar4, BAR4_SIZE) || inside(bar1, BAR1_SIZE),
            "gpa {gpa:#x}, BAR4 {bar4:#x}, BAR1 {bar1:#x}"
        );
    }
});
