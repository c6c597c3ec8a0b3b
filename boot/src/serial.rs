//! COM1 output for the loader, usable before and after ExitBootServices, and the
//! test harness's exit ports (QEMU isa-debug-exit at 0xf4, Bochs's 0x8900 and magic break).

use x86_64::instructions::port::Port;

const COM1: u16 = 0x3f8;

/// Programs COM1 for 115200 8N1, FIFOs on, interrupts off.
pub fn init() {
    // SAFETY: COM1's registers; the loader is the only user of the port.
    unsafe {
        Port::<u8>::new(COM1 + 1).write(0x00);
        Port::<u8>::new(COM1 + 3).write(0x80);
        Port::<u8>::new(COM1).write(0x01);
        Port::<u8>::new(COM1 + 1).write(0x00);
        Port::<u8>::new(COM1 + 3).write(0x03);
        Port::<u8>::new(COM1 + 2).write(0xc7);
        Port::<u8>::new(COM1 + 4).write(0x03);
    }
}

fn put(b: u8) {
    // SAFETY: reading LSR and writing THR of COM1 has no other effect.
    unsafe {
        let mut lsr = Port::<u8>::new(COM1 + 5);
        for _ in 0..100_000 {
            if lsr.read() & 0x20 != 0 {
                break;
            }
        }
        Port::<u8>::new(COM1).write(b);
    }
}

/// Writes `s` and a CRLF.
pub fn write_line(s: &str) {
    for b in s.bytes() {
        if b == b'\n' {
            put(b'\r');
        }
        put(b);
    }
    put(b'\r');
    put(b'\n');
}

/// Ends an emulator run: QEMU exits with 33 (pass) or 35 (fail); Bochs exits with 0
/// through a magic break (pass) or 1 through its shutdown port (fail).
pub fn harness_exit(pass: bool) -> ! {
    // SAFETY: drains COM1 (LSR bit 6) then writes the emulators' debug-exit ports,
    // which have no effect on machines without them.
    unsafe {
        let mut lsr = Port::<u8>::new(COM1 + 5);
        for _ in 0..1_000_000 {
            if lsr.read() & 0x40 != 0 {
                break;
            }
        }
        Port::<u32>::new(0xf4).write(if pass { 0x10 } else { 0x11 });
        if pass {
            core::arch::asm!("xchg bx, bx");
        } else {
            let mut p = Port::<u8>::new(0x8900);
            for b in b"Shutdown" {
                p.write(*b);
            }
        }
    }
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
