//! A periodic tick on the virtual local APIC timer, counted by the interrupt handler
//! at [`crate::idt::TIMER_VECTOR`].

use core::sync::atomic::{AtomicU64, Ordering};

use crate::{cpu, idt, lapic};

static TICKS: AtomicU64 = AtomicU64::new(0);

/// Enables the APIC and starts its timer at `hz` ticks per second, then enables
/// interrupts.
pub fn start(hz: u32) {
    lapic::enable(idt::SPURIOUS_VECTOR);
    lapic::start_periodic_timer(idt::TIMER_VECTOR, hz);
    cpu::sti();
}

/// Stops the timer (interrupts stay as they are).
pub fn stop() {
    lapic::stop_timer();
}

/// Ticks counted so far.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// Halts (interrupts on) until the tick count differs from `seen`; returns the new
/// count. Never spins: between checks the vCPU sits in HLT, and the check and the HLT
/// are atomic with respect to the interrupt (`cli` ... `sti; hlt`).
pub fn wait_for_tick_after(seen: u64) -> u64 {
    loop {
        cpu::cli();
        let now = ticks();
        if now != seen {
            cpu::sti();
            return now;
        }
        cpu::enable_interrupts_and_halt();
    }
}

/// Called by the timer interrupt stub: counts the tick and sends EOI.
pub(crate) fn on_tick() {
    TICKS.fetch_add(1, Ordering::Relaxed);
    lapic::eoi();
}
