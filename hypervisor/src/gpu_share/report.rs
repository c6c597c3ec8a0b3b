//! What the GPU side measured, for the log, the harness and the benchmarks: per-VM
//! figures, the counters as JSON, utilization samples, the lock's longest hold.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use gpu_pv::sched::VmId;

use super::{
    lock, now_ns, try_lock, Figures, GPUPV, LONGEST_HOLD, LONGEST_HOLD_LINE, LONGEST_KICK,
    MAX_BATCH,
};

/// The figures measured for `vm`.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn figures(vm: VmId) -> Option<Figures> {
    GPUPV.lock().as_ref().and_then(|s| s.disp.figures(vm))
}

/// Starts a new measurement of every VM's longest slice (after a warm-up).
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn reset_longest_slices() {
    if let Some(s) = GPUPV.lock().as_mut() {
        s.disp.reset_longest_slices();
    }
}

/// The longest hold of the GPU-PV lock so far (µs), the source line that took it, and
/// the longest GPU notify made under it (µs); `reset` starts a new measurement.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn longest_lock_hold(reset: bool) -> (u64, u32, u64) {
    let per_us = (crate::apic::tsc_per_ms() / 1000).max(1);
    let r = (
        LONGEST_HOLD.load(Ordering::Relaxed) / per_us,
        LONGEST_HOLD_LINE.load(Ordering::Relaxed) as u32,
        LONGEST_KICK.load(Ordering::Relaxed) / per_us,
    );
    if reset {
        LONGEST_HOLD.store(0, Ordering::Relaxed);
        LONGEST_KICK.store(0, Ordering::Relaxed);
    }
    r
}

/// Writes the counters of every VM and the GPU as JSON to the serial console (built
/// under the GPU-PV lock, printed after it).
pub fn dump_counters() {
    let mut out = alloc::string::String::new();
    let mut memory = Vec::new();
    {
        let g = lock();
        let Some(s) = g.as_ref() else { return };
        let elapsed = now_ns();
        let m = s.disp.mediator();
        let _ = m.counters().write_json(&mut out, elapsed, MAX_BATCH as u64);
        for id in m.vm_ids() {
            if let Some(v) = m.vm(id).map(|v| *v.memory()) {
                memory.push((id, v));
            }
        }
    }
    crate::println!("gpu-pv counters: {out}");
    for (id, m) in memory {
        crate::println!(
            "gpu-pv: vm {id}: hv memory {} KiB in use (peak {} KiB) of {} KiB",
            m.used() / 1024,
            m.peak() / 1024,
            m.limit() / 1024
        );
    }
}

/// Prints one `gpu-pv sample:` line: per-VM GPU utilization since the previous
/// sample, completed operations and bytes copied (for the harness's plot).
pub fn sample() {
    let Some(mut g) = try_lock() else {
        return;
    };
    let Some(s) = g.as_mut() else { return };
    let now = now_ns();
    let window = now.saturating_sub(s.last_sample.0).max(1);
    let mut line = alloc::format!("{{\"t_ms\":{},\"vms\":[", now / 1_000_000);
    let mut first = true;
    let mut used_now = BTreeMap::new();
    for (id, c) in s.disp.mediator().counters().vms() {
        let before = s.last_sample.1.get(&id).copied().unwrap_or(0);
        let util_ppm = c.used_ns.saturating_sub(before).saturating_mul(1_000_000) / window;
        used_now.insert(id, c.used_ns);
        let name = s.names.get(&id).map_or("?", |n| n.as_str());
        if !first {
            line.push(',');
        }
        first = false;
        line.push_str(&alloc::format!(
            "{{\"vm\":{id},\"name\":\"{name}\",\"util_ppm\":{},\"completed\":{},\"bytes\":{}}}",
            util_ppm.min(1_000_000),
            c.ops_completed,
            c.bytes_copied
        ));
    }
    line.push_str("]}");
    s.last_sample = (now, used_now);
    drop(g);
    crate::println!("gpu-pv sample: {line}");
}

/// Frames the GPU's IOMMU page tables use now (they grow with zero-copy mappings and
/// are kept, empty, until the GPU is detached).
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn iommu_table_frames() -> usize {
    let g = lock();
    g.as_ref()
        .and_then(|s| s.domain)
        .and_then(crate::iommu::table_frames)
        .unwrap_or(0)
}
