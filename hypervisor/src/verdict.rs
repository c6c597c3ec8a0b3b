//! The run's verdict: how the hypervisor's run ends (not a VM exit). Under the test
//! harness (`harness` on the command line) the hypervisor leaves through the
//! emulators' debug-exit ports; otherwise it halts.

use core::sync::atomic::{AtomicBool, Ordering};

use x86_64::instructions::port::Port;

static HARNESS: AtomicBool = AtomicBool::new(false);

/// Enables exiting through the emulator ports.
pub fn set_harness(on: bool) {
    HARNESS.store(on, Ordering::Relaxed);
}

/// Ends the run successfully.
pub fn pass() -> ! {
    crate::serial::write_fmt_unlocked(format_args!("HV-EXIT: PASS\r\n"));
    leave(true)
}

/// Ends the run as a failure, naming why.
pub fn fail(why: &str) -> ! {
    crate::serial::write_fmt_unlocked(format_args!("HV-EXIT: FAIL ({why})\r\n"));
    leave(false)
}

fn leave(pass: bool) -> ! {
    crate::serial::drain();
    if HARNESS.load(Ordering::Relaxed) {
        // SAFETY: QEMU's isa-debug-exit (0xf4) exits with 33/35; Bochs exits on a magic
        // break (pass) or "Shutdown" written to 0x8900 (fail). Elsewhere these ports are
        // unused; the harness flag says we run under one of the two.
        unsafe {
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
    }
    crate::arch::cpu::halt_forever()
}
