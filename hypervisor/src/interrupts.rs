//! Host interrupts. The top half (the IDT handler) only acknowledges the interrupt
//! and marks work pending; the bottom half runs in the vCPU loop.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::apic;
use crate::arch::cpu::{current_index, MAX_CPUS};

/// Timer interrupts seen per CPU.
pub static TIMER_TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Called from the interrupt stub with the vector.
pub fn top_half(vector: u8) {
    if vector == apic::TIMER_VECTOR {
        TIMER_TICKS[current_index()].fetch_add(1, Ordering::Relaxed);
    }
    if vector != apic::SPURIOUS_VECTOR {
        apic::eoi();
    }
}

/// Opens a one-instruction interrupt window so interrupts that arrived while a guest
/// ran (and caused its exit) reach their top halves.
pub fn service_pending() {
    // SAFETY: `sti; nop; cli` only lets pending interrupts be delivered to our IDT.
    unsafe { core::arch::asm!("sti", "nop", "cli", options(nomem, nostack)) };
}
