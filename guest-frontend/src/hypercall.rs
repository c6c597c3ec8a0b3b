//! Hypercalls (numbers in [`crate::abi::hypercall`]): RAX = number, RDI, RSI, RDX, RCX
//! = arguments, RAX = result. The instruction is VMMCALL on AMD/Hygon CPUs and VMCALL
//! elsewhere; the vendor is read with CPUID leaf 0 once, on the first call.

use core::arch::asm;
use core::sync::atomic::{AtomicU8, Ordering};

use crate::abi::hypercall as nr;

const UNKNOWN: u8 = 0;
const VMMCALL: u8 = 1;
const VMCALL: u8 = 2;

static INSN: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Which hypercall instruction this CPU uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instruction {
    /// AMD SVM's VMMCALL (`0f 01 d9`).
    Vmmcall,
    /// Intel VMX's VMCALL (`0f 01 c1`).
    Vmcall,
}

/// The hypercall instruction for this CPU (detected once with CPUID leaf 0).
pub fn instruction() -> Instruction {
    let mut insn = INSN.load(Ordering::Relaxed);
    if insn == UNKNOWN {
        let r = crate::cpu::cpuid(0, 0);
        let mut vendor = [0u8; 12];
        vendor[0..4].copy_from_slice(&r.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&r.edx.to_le_bytes());
        vendor[8..12].copy_from_slice(&r.ecx.to_le_bytes());
        insn = match &vendor {
            b"AuthenticAMD" | b"HygonGenuine" => VMMCALL,
            _ => VMCALL,
        };
        INSN.store(insn, Ordering::Relaxed);
    }
    if insn == VMMCALL {
        Instruction::Vmmcall
    } else {
        Instruction::Vmcall
    }
}

/// Makes hypercall `number` with four arguments; returns (RAX, RDI) after the call.
pub fn call(number: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> (u64, u64) {
    let (rax, rdi): (u64, u64);
    match instruction() {
        // SAFETY: VMMCALL exits to the hypervisor, which follows the ABI: it may change
        // RAX and RDI (results) and read or write guest memory named by the arguments
        // (hence no `nomem`); RSI, RDX and RCX are treated as clobbered too.
        Instruction::Vmmcall => unsafe {
            asm!(
                "vmmcall",
                inlateout("rax") number => rax,
                inlateout("rdi") a0 => rdi,
                inlateout("rsi") a1 => _,
                inlateout("rdx") a2 => _,
                inlateout("rcx") a3 => _,
                options(nostack),
            )
        },
        // SAFETY: as above, for VMCALL.
        Instruction::Vmcall => unsafe {
            asm!(
                "vmcall",
                inlateout("rax") number => rax,
                inlateout("rdi") a0 => rdi,
                inlateout("rsi") a1 => _,
                inlateout("rdx") a2 => _,
                inlateout("rcx") a3 => _,
                options(nostack),
            )
        },
    }
    (rax, rdi)
}

/// VERSION: the hypervisor ABI version and its feature mask.
pub fn version() -> (u64, u64) {
    call(nr::VERSION, 0, 0, 0, 0)
}

/// CONSOLE_WRITE: writes `bytes` to the console in one exit; returns the status.
pub fn console_write(bytes: &[u8]) -> u64 {
    // The guest ABI identity maps RAM, so the slice's address is its guest-physical one.
    call(
        nr::CONSOLE_WRITE,
        bytes.as_ptr() as u64,
        bytes.len() as u64,
        0,
        0,
    )
    .0
}

/// YIELD: gives up the rest of this vCPU's time slice.
pub fn yield_now() {
    call(nr::YIELD, 0, 0, 0, 0);
}

/// SHUTDOWN: stops the VM with exit `code`. Never returns: if the hypervisor resumes
/// the guest anyway, it halts with interrupts off.
pub fn shutdown(code: u64) -> ! {
    call(nr::SHUTDOWN, code, 0, 0, 0);
    crate::cpu::halt()
}
