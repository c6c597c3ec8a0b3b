//! CPU identity and the privileged instructions the kernel uses, wrapped in one place.

use core::sync::atomic::{AtomicUsize, Ordering};

use x86_64::registers::model_specific::Msr;

/// Most CPUs the hypervisor brings up.
pub const MAX_CPUS: usize = 16;
const IA32_GS_BASE: u32 = 0xc000_0101;

/// CPUs that have logged in (the bootstrap CPU included).
pub static ONLINE: AtomicUsize = AtomicUsize::new(0);

/// Records `index` as this CPU's index (kept in IA32_GS_BASE, which the kernel does not
/// otherwise use).
pub fn set_index(index: usize) {
    // SAFETY: GS_BASE is architectural on x86_64; the kernel never uses GS for data.
    unsafe { Msr::new(IA32_GS_BASE).write(index as u64) };
}

/// This CPU's index (0 is the bootstrap CPU).
pub fn current_index() -> usize {
    // SAFETY: reading GS_BASE has no side effects.
    let v = unsafe { Msr::new(IA32_GS_BASE).read() } as usize;
    if v < MAX_CPUS {
        v
    } else {
        0
    }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged and side-effect free.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// `CPUID` leaf/subleaf.
pub fn cpuid(leaf: u32, sub: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid_count(leaf, sub)
}

/// Halts forever with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Reads CR2 (the faulting address of the last page fault).
pub fn cr2() -> u64 {
    x86_64::registers::control::Cr2::read_raw()
}

/// Reads a model-specific register.
///
/// # Safety
/// `msr` must exist on this CPU (check CPUID first), or the read faults.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    // SAFETY: per the contract.
    unsafe { Msr::new(msr).read() }
}

/// Writes a model-specific register.
///
/// # Safety
/// `msr` must exist and `value` must be valid for it; the write may change how the CPU
/// behaves.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: per the contract.
    unsafe { Msr::new(msr).write(value) }
}

/// Increments [`ONLINE`], returning the new count.
pub fn log_in() -> usize {
    ONLINE.fetch_add(1, Ordering::SeqCst) + 1
}
