//! Local APIC: xAPIC (MMIO) or x2APIC (MSRs) where the CPU offers it, the timer
//! calibrated against the PIT, inter-processor interrupts, and TSC-based delays.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use x86_64::instructions::port::Port;

use crate::arch::cpu::{self, cpuid, rdmsr, wrmsr};
use crate::mm::phys_to_ptr;

const IA32_APIC_BASE: u32 = 0x1b;
const REG_ID: u32 = 0x20;
const REG_EOI: u32 = 0xb0;
const REG_SVR: u32 = 0xf0;
const REG_ICR_LO: u32 = 0x300;
const REG_ICR_HI: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INIT: u32 = 0x380;
const REG_TIMER_CUR: u32 = 0x390;
const REG_TIMER_DIV: u32 = 0x3e0;

/// Spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

static X2APIC: AtomicBool = AtomicBool::new(false);
static BASE: AtomicU64 = AtomicU64::new(0xfee0_0000);
static TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);
static TSC_PER_MS: AtomicU64 = AtomicU64::new(0);

/// Whether the APICs run in x2APIC mode.
pub fn x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

/// LAPIC timer ticks per millisecond (divide by 1).
pub fn ticks_per_ms() -> u64 {
    TICKS_PER_MS.load(Ordering::Relaxed)
}

/// TSC ticks per millisecond (0 before calibration).
pub fn tsc_per_ms() -> u64 {
    TSC_PER_MS.load(Ordering::Relaxed)
}

fn read(reg: u32) -> u32 {
    if x2apic() {
        // SAFETY: x2APIC mode is on, so the MSR range 0x800.. exists.
        unsafe { rdmsr(0x800 + (reg >> 4)) as u32 }
    } else {
        // SAFETY: the xAPIC page is identity mapped (below 4 GiB).
        unsafe {
            core::ptr::read_volatile(phys_to_ptr::<u32>(
                BASE.load(Ordering::Relaxed) + u64::from(reg),
            ))
        }
    }
}

fn write(reg: u32, v: u32) {
    if x2apic() {
        // SAFETY: as in `read`.
        unsafe { wrmsr(0x800 + (reg >> 4), u64::from(v)) }
    } else {
        // SAFETY: as in `read`.
        unsafe {
            core::ptr::write_volatile(
                phys_to_ptr::<u32>(BASE.load(Ordering::Relaxed) + u64::from(reg)),
                v,
            )
        }
    }
}

/// This CPU's APIC id.
pub fn id() -> u32 {
    if x2apic() {
        read(REG_ID)
    } else {
        read(REG_ID) >> 24
    }
}

/// Enables this CPU's local APIC (x2APIC mode if the BSP chose it).
pub fn enable_this_cpu() {
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU; we only set enable bits, in
    // the order the SDM allows (disabled -> xAPIC -> x2APIC, Vol. 3A 10.12.5).
    unsafe {
        let v = rdmsr(IA32_APIC_BASE) | (1 << 11);
        wrmsr(IA32_APIC_BASE, v);
        if x2apic() {
            wrmsr(IA32_APIC_BASE, v | (1 << 10));
        }
    }
    write(REG_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    write(REG_LVT_TIMER, 1 << 16);
}

/// Signals end of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}

/// Busy-waits using PIT channel 2 for `ms` milliseconds (at most 50).
fn pit_wait_ms(ms: u32) {
    let count = (1_193_182 * ms / 1000) as u16;
    // SAFETY: PIT channel 2 and port 0x61's gate bit are ours during boot.
    unsafe {
        let mut p61 = Port::<u8>::new(0x61);
        let v = p61.read();
        p61.write((v & !0x02) | 0x01);
        Port::<u8>::new(0x43).write(0xb0);
        Port::<u8>::new(0x42).write(count as u8);
        Port::<u8>::new(0x42).write((count >> 8) as u8);
        let v = p61.read();
        p61.write(v & !0x01);
        p61.write(v | 0x01);
        for _ in 0..100_000_000u64 {
            if p61.read() & 0x20 != 0 {
                break;
            }
        }
    }
}

/// Enables the bootstrap CPU's APIC and calibrates the APIC timer and the TSC.
pub fn init_bsp() {
    if cpuid(1, 0).ecx & (1 << 21) != 0 {
        X2APIC.store(true, Ordering::Relaxed);
    }
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU.
    let base = unsafe { rdmsr(IA32_APIC_BASE) } & 0x000f_ffff_ffff_f000;
    BASE.store(base, Ordering::Relaxed);
    enable_this_cpu();
    write(REG_TIMER_DIV, 0b1011);
    write(REG_LVT_TIMER, 1 << 16);
    write(REG_TIMER_INIT, u32::MAX);
    let t0 = cpu::rdtsc();
    pit_wait_ms(10);
    let left = read(REG_TIMER_CUR);
    let t1 = cpu::rdtsc();
    write(REG_TIMER_INIT, 0);
    TICKS_PER_MS.store(u64::from(u32::MAX - left) / 10, Ordering::Relaxed);
    TSC_PER_MS.store((t1 - t0) / 10, Ordering::Relaxed);
}

/// Busy-waits about `us` microseconds (TSC based, after calibration).
pub fn delay_us(us: u64) {
    let per_ms = TSC_PER_MS.load(Ordering::Relaxed).max(1000);
    let end = cpu::rdtsc() + per_ms * us / 1000;
    while cpu::rdtsc() < end {
        core::hint::spin_loop();
    }
}

/// Microseconds since boot, from the TSC (0 before calibration).
pub fn now_us() -> u64 {
    let per_ms = TSC_PER_MS.load(Ordering::Relaxed);
    (cpu::rdtsc() * 1000).checked_div(per_ms).unwrap_or(0)
}

/// Sends an IPI: `low` is the ICR low word (delivery mode, vector, level).
pub fn send_ipi(dest: u32, low: u32) {
    if x2apic() {
        // SAFETY: x2APIC mode: the ICR is one 64-bit MSR.
        unsafe { wrmsr(0x830, (u64::from(dest) << 32) | u64::from(low)) };
    } else {
        write(REG_ICR_HI, dest << 24);
        write(REG_ICR_LO, low);
        for _ in 0..1_000_000 {
            if read(REG_ICR_LO) & (1 << 12) == 0 {
                break;
            }
        }
    }
}

/// Vector of the hypervisor's preemption timer.
pub const TIMER_VECTOR: u8 = 0xf0;

/// Per CPU: when its APIC timer fires (`now_us` time), 0 when it is not armed.
static ARMED_UNTIL: [AtomicU64; cpu::MAX_CPUS] = [const { AtomicU64::new(0) }; cpu::MAX_CPUS];
/// Per CPU: whether the timer's divider and vector are set (they never change).
static TIMER_SET_UP: [AtomicBool; cpu::MAX_CPUS] =
    [const { AtomicBool::new(false) }; cpu::MAX_CPUS];

/// Arms this CPU's APIC timer to fire once in about `us` microseconds.
pub fn arm_oneshot_us(us: u64) {
    let i = cpu::current_index();
    let ticks = (ticks_per_ms() * us / 1000).clamp(1, u64::from(u32::MAX)) as u32;
    if !TIMER_SET_UP[i].swap(true, Ordering::Relaxed) {
        write(REG_TIMER_DIV, 0b1011);
        write(REG_LVT_TIMER, u32::from(TIMER_VECTOR));
    }
    write(REG_TIMER_INIT, ticks);
    ARMED_UNTIL[i].store(now_us() + us, Ordering::Relaxed);
}

/// Makes this CPU's APIC timer fire within about `us` microseconds (a vCPU's time
/// slice): an armed timer that fires no later is kept, since each register write is
/// an emulator exit of its own and a guest's exits come far faster than its slices
/// end. A timer that fires earlier than needed only makes the vCPU exit early; the
/// run loop enters it again. A timer that fired is known by its interrupt
/// ([`timer_fired`]), not by the clock: it may fire a little before the time it was
/// armed for, and a vCPU entered without a timer would never be preempted.
pub fn arm_within_us(us: u64) {
    let i = cpu::current_index();
    let armed = ARMED_UNTIL[i].load(Ordering::Relaxed);
    let now = now_us();
    if armed > now && armed <= now + us {
        return;
    }
    arm_oneshot_us(us);
}

/// This CPU's APIC timer fired (from its interrupt handler): the next
/// [`arm_within_us`] arms it again.
pub fn timer_fired() {
    ARMED_UNTIL[cpu::current_index()].store(0, Ordering::Relaxed);
}

/// Stops this CPU's APIC timer.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn disarm() {
    let i = cpu::current_index();
    write(REG_TIMER_INIT, 0);
    write(REG_LVT_TIMER, 1 << 16);
    TIMER_SET_UP[i].store(false, Ordering::Relaxed);
    ARMED_UNTIL[i].store(0, Ordering::Relaxed);
}
