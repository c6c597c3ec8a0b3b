//! The virtual local APIC at [`LAPIC_BASE`] (xAPIC register layout), emulated by the
//! hypervisor.
//!
//! Every access is one plain 32-bit `mov` with the address in RDI and the value in
//! EAX — `mov dword ptr [rdi], eax` (`89 07`) and `mov eax, dword ptr [rdi]`
//! (`8b 07`) — so the hypervisor's MMIO decoder sees the simplest encodings (no
//! prefix, no SIB, no displacement).

use core::arch::asm;

use crate::abi::guest::{APIC_TIMER_HZ, LAPIC_BASE};

/// Local APIC ID register.
pub const ID: u32 = 0x20;
/// Version register.
pub const VERSION: u32 = 0x30;
/// Task priority register.
pub const TPR: u32 = 0x80;
/// End-of-interrupt register.
pub const EOI: u32 = 0xb0;
/// Spurious-interrupt vector register (bit 8: APIC software enable).
pub const SVR: u32 = 0xf0;
/// LVT timer register (vector in bits 0-7, mask bit 16, periodic bit 17).
pub const LVT_TIMER: u32 = 0x320;
/// Timer initial count.
pub const TIMER_INITIAL_COUNT: u32 = 0x380;
/// Timer current count.
pub const TIMER_CURRENT_COUNT: u32 = 0x390;
/// Timer divide configuration.
pub const TIMER_DIVIDE: u32 = 0x3e0;

/// SVR: APIC software enable.
pub const SVR_ENABLE: u32 = 1 << 8;
/// LVT: masked.
pub const LVT_MASKED: u32 = 1 << 16;
/// LVT timer: periodic mode.
pub const LVT_TIMER_PERIODIC: u32 = 1 << 17;

fn addr(reg: u32) -> u64 {
    assert!(
        reg < 0x1000 && reg & 0xf == 0,
        "bad local APIC register {reg:#x}"
    );
    LAPIC_BASE + u64::from(reg)
}

/// Reads register `reg` (an offset from the base, 16-byte aligned, below 4 KiB).
pub fn read(reg: u32) -> u32 {
    let a = addr(reg);
    let v: u32;
    // SAFETY: the guest ABI identity maps LAPIC_BASE; the access traps to the
    // hypervisor's APIC emulation and touches no guest memory.
    unsafe {
        asm!("mov eax, dword ptr [rdi]", in("rdi") a, out("eax") v, options(nostack, preserves_flags))
    };
    v
}

/// Writes `value` to register `reg` (an offset from the base, 16-byte aligned, below
/// 4 KiB).
pub fn write(reg: u32, value: u32) {
    let a = addr(reg);
    // SAFETY: as in `read`.
    unsafe {
        asm!("mov dword ptr [rdi], eax", in("rdi") a, in("eax") value, options(nostack, preserves_flags))
    };
}

/// Signals the end of the interrupt being handled.
pub fn eoi() {
    write(EOI, 0);
}

/// Software-enables the APIC with `spurious_vector` and accepts every priority.
pub fn enable(spurious_vector: u8) {
    write(TPR, 0);
    write(SVR, SVR_ENABLE | u32::from(spurious_vector));
}

/// The divide-configuration encodings for dividers 1, 2, 4, ..., 128 (SDM 11.5.4).
const DIVIDERS: [(u64, u32); 8] = [
    (1, 0b1011),
    (2, 0b0000),
    (4, 0b0001),
    (8, 0b0010),
    (16, 0b0011),
    (32, 0b1000),
    (64, 0b1001),
    (128, 0b1010),
];

/// The (divide configuration, initial count) for a periodic timer at `hz`: the
/// smallest divider whose count fits in 32 bits. `hz` 0 is treated as 1.
pub fn timer_setting(hz: u32) -> (u32, u32) {
    let hz = u64::from(hz.max(1));
    for &(div, enc) in &DIVIDERS {
        let count = (APIC_TIMER_HZ / div / hz).max(1);
        if let Ok(c) = u32::try_from(count) {
            return (enc, c);
        }
    }
    (0b1010, u32::MAX)
}

/// Starts the periodic timer at `hz` interrupts per second on `vector`.
pub fn start_periodic_timer(vector: u8, hz: u32) {
    let (div, count) = timer_setting(hz);
    write(TIMER_DIVIDE, div);
    write(LVT_TIMER, LVT_TIMER_PERIODIC | u32::from(vector));
    // Writing the initial count starts the timer.
    write(TIMER_INITIAL_COUNT, count);
}

/// Stops the timer (masks it and clears the count).
pub fn stop_timer() {
    write(LVT_TIMER, LVT_MASKED);
    write(TIMER_INITIAL_COUNT, 0);
}
