//! Which VM the current CPU is working for, so every log line can name it. Names
//! live in fixed slots (one per VM id), so creating and destroying VMs allocates
//! nothing here.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::arch::cpu::{current_index, MAX_CPUS};

/// Most VM ids the log can name: as many as the configuration allows (VM ids are
/// config slots, below `boot_info::MAX_VMS`).
pub const MAX_SLOTS: usize = boot_info::MAX_VMS;
const NONE: u32 = u32::MAX;
static CURRENT: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(NONE) }; MAX_CPUS];
static NAMES: spin::RwLock<[[u8; 32]; MAX_SLOTS]> = spin::RwLock::new([[0; 32]; MAX_SLOTS]);

/// Names slot `id` (VM ids index the slots); an id past the slots gets no name.
pub fn register(id: u16, name: &str) -> u32 {
    let slot = usize::from(id);
    if let Some(n) = NAMES.write().get_mut(slot) {
        *n = boot_info::to_fixed(name);
    }
    slot as u32
}

/// Sets (or clears, with `None`) the VM this CPU works for.
pub fn set(slot: Option<u32>) {
    CURRENT[current_index()].store(slot.unwrap_or(NONE), Ordering::Relaxed);
}

/// Calls `f` with the name of the VM this CPU works for, if any.
pub fn with_current<R>(f: impl FnOnce(Option<&str>) -> R) -> R {
    let v = CURRENT[current_index()].load(Ordering::Relaxed);
    if v == NONE {
        return f(None);
    }
    match NAMES.try_read() {
        Some(n) => f(n.get(v as usize).map(|b| boot_info::fixed_str(b))),
        None => f(None),
    }
}

/// The VM id this CPU works for, if any (the slot, which is the id for ids below
/// [`MAX_SLOTS`]).
pub fn current() -> Option<u16> {
    let v = CURRENT[current_index()].load(Ordering::Relaxed);
    (v != NONE).then_some(v as u16)
}
