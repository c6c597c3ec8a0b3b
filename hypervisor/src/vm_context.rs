//! Which VM the current CPU is working for, so every log line can name it.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::arch::cpu::{current_index, MAX_CPUS};

const NONE: u32 = u32::MAX;
static CURRENT: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(NONE) }; MAX_CPUS];
static NAMES: spin::RwLock<alloc::vec::Vec<&'static str>> =
    spin::RwLock::new(alloc::vec::Vec::new());

/// Registers a VM name; returns its index for [`set`].
pub fn register(name: &'static str) -> u32 {
    let mut n = NAMES.write();
    n.push(name);
    (n.len() - 1) as u32
}

/// Sets (or clears, with `None`) the VM this CPU works for.
pub fn set(vm: Option<u32>) {
    CURRENT[current_index()].store(vm.unwrap_or(NONE), Ordering::Relaxed);
}

/// The name of the VM this CPU works for, if any.
pub fn current() -> Option<&'static str> {
    let v = CURRENT[current_index()].load(Ordering::Relaxed);
    if v == NONE {
        return None;
    }
    NAMES.try_read().and_then(|n| n.get(v as usize).copied())
}
