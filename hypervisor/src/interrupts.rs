//! Host interrupts. The top half (the IDT handler) only acknowledges the interrupt
//! and marks work pending; the bottom half runs in the vCPU loop.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::apic;
use crate::arch::cpu::{current_index, MAX_CPUS};

/// Timer interrupts seen per CPU.
pub static TIMER_TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// First of the 16 vectors (0xE0..=0xEF) for device interrupts (MSI/MSI-X).
pub const DEVICE_VECTOR_BASE: u8 = 0xe0;
/// Device vector of the physical GPU's MSI-X messages.
pub const GPU_VECTOR: u8 = 0xe0;
/// Device vector of the IOMMU's fault event.
pub const IOMMU_FAULT_VECTOR: u8 = 0xe8;
/// Vector of the IPI that wakes an idle CPU or makes a running guest exit (so it
/// sees work posted for it): nothing to do in the top half beyond the count.
pub const WAKE_VECTOR: u8 = 0xef;

/// Device interrupts seen per vector (0xE0..=0xEF); bottom halves compare and consume.
pub static DEVICE_PENDING: [AtomicU64; 16] = [const { AtomicU64::new(0) }; 16];

/// Called from the interrupt stub with the vector: acknowledges and marks work
/// pending, nothing more (the bottom half runs in the monitor loop).
pub fn top_half(vector: u8) {
    if vector == apic::TIMER_VECTOR {
        TIMER_TICKS[current_index()].fetch_add(1, Ordering::Relaxed);
        apic::timer_fired();
    } else if (DEVICE_VECTOR_BASE..DEVICE_VECTOR_BASE + 16).contains(&vector) {
        DEVICE_PENDING[(vector - DEVICE_VECTOR_BASE) as usize].fetch_add(1, Ordering::Release);
    }
    if vector != apic::SPURIOUS_VECTOR {
        apic::eoi();
    }
}

/// Takes the count of pending interrupts of device vector `vector` (0 if none).
pub fn take_pending(vector: u8) -> u64 {
    DEVICE_PENDING
        .get(vector.wrapping_sub(DEVICE_VECTOR_BASE) as usize)
        .map_or(0, |c| c.swap(0, Ordering::Acquire))
}

/// Opens a one-instruction interrupt window so interrupts that arrived while a guest
/// ran (and caused its exit) reach their top halves.
pub fn service_pending() {
    // SAFETY: `sti; nop; cli` only lets pending interrupts be delivered to our IDT.
    unsafe { core::arch::asm!("sti", "nop", "cli", options(nomem, nostack)) };
}

/// Local APIC id of each CPU that can be woken (for wake IPIs).
static APIC_IDS: [core::sync::atomic::AtomicU32; MAX_CPUS] =
    [const { core::sync::atomic::AtomicU32::new(0) }; MAX_CPUS];

/// CPU `index` (this one) can be woken by [`wake_cpu`] from now on.
pub fn register_wake_target(index: usize) {
    if let Some(slot) = APIC_IDS.get(index) {
        slot.store(apic::id(), Ordering::Relaxed);
    }
}

/// Wakes CPU `index` (sleeping idle, or running a guest, which then exits) with
/// an IPI on [`WAKE_VECTOR`].
pub fn wake_cpu(index: usize) {
    if index == current_index() || index >= MAX_CPUS {
        return;
    }
    let id = APIC_IDS[index].load(Ordering::Relaxed);
    // Fixed delivery, physical destination, edge.
    apic::send_ipi(id, u32::from(WAKE_VECTOR));
}
