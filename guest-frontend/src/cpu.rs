//! Small CPU helpers: the time-stamp counter, the interrupt flag, halting, CPUID.

use core::arch::asm;

/// Reads the time-stamp counter (after earlier instructions have completed).
#[inline]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: LFENCE and RDTSC only read the counter (CR4.TSD is clear in the guest
    // ABI's ring 0 anyway).
    unsafe {
        asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The four registers CPUID returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidResult {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// Executes CPUID for `leaf`/`subleaf` (a VM exit under the hypervisor).
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: CPUID has no memory effects. RBX is reserved by LLVM, so it is saved in
    // a scratch register around the instruction.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        )
    };
    CpuidResult { eax, ebx, ecx, edx }
}

/// Disables maskable interrupts.
#[inline]
pub fn cli() {
    // SAFETY: only clears RFLAGS.IF of this vCPU.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Enables maskable interrupts (handlers must be installed: [`crate::entry!`] does).
#[inline]
pub fn sti() {
    // SAFETY: only sets RFLAGS.IF; every vector the runtime enables has a handler, and
    // any other one lands in an exception handler that stops the VM cleanly.
    unsafe { asm!("sti", options(nomem, nostack)) };
}

/// Whether maskable interrupts are enabled (RFLAGS.IF).
pub fn interrupts_enabled() -> bool {
    let rflags: u64;
    // SAFETY: reads RFLAGS through the stack (push/pop balanced).
    unsafe { asm!("pushfq", "pop {}", out(reg) rflags, options(nomem, preserves_flags)) };
    rflags & (1 << 9) != 0
}

/// Enables interrupts and halts until the next one, atomically: an interrupt that
/// becomes pending between the check that led here and the HLT still wakes it (STI's
/// one-instruction shadow covers the HLT). Returns with interrupts enabled, after the
/// interrupt's handler ran.
#[inline]
pub fn enable_interrupts_and_halt() {
    // SAFETY: as for `sti`; HLT only waits. Memory is clobbered so the compiler
    // re-reads anything the interrupt handler changed.
    unsafe { asm!("sti", "hlt", options(nostack)) };
}

/// Stops this vCPU for good (`cli; hlt`: the hypervisor stops a VM that halts with
/// interrupts off).
pub fn halt() -> ! {
    loop {
        // SAFETY: `cli; hlt` only stops this vCPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Reads extended control register `index` (XGETBV; needs CR4.OSXSAVE).
pub fn xgetbv(index: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV only reads the register; callers enable CR4.OSXSAVE first.
    unsafe {
        asm!("xgetbv", in("ecx") index, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes extended control register `index` (XSETBV, which the hypervisor checks):
/// `Err(vector)` if it faulted (#GP for a value the CPU or hypervisor refuses).
pub fn xsetbv(index: u32, value: u64) -> Result<(), u8> {
    let slot = crate::idt::expect_fault_slot();
    // SAFETY: the resume slot is armed with the address right after XSETBV, so the
    // exception handler skips a faulting XSETBV; it changes only this vCPU's XCR0.
    unsafe {
        asm!(
            "lea {tmp}, [rip + 3f]",
            "mov [{slot}], {tmp}",
            "xsetbv",
            "3:",
            tmp = out(reg) _,
            slot = in(reg) slot,
            in("ecx") index,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack),
        )
    };
    match crate::idt::expected_fault_taken() {
        Some(v) => Err(v),
        None => Ok(()),
    }
}
