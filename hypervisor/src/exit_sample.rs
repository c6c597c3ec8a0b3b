//! `exit_sample_ms=N` on the command line: every N ms a line
//! `vm-exits sample: {"t_ms":T,"vms":[{"vm":0,"exits":{"io":N,...}},...]}` with each
//! VM's exits by reason so far (cumulative, [`VmExit::REASONS`]), from which the
//! harness computes exit rates over a boot or a drawing window (`cargo xtask bench`).
//! Off by default. The counts are copied into atomics after each vCPU slice (the
//! VM's lock is held then anyway), so the line is made and printed holding no lock;
//! a VM's counts are as of the end of its last slice (at most a slice old), and a
//! VM re-created in the same slot starts again from 0.

use core::fmt::Write;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::virt::VmExit;

const REASONS: usize = VmExit::REASONS.len();
const SLOTS: usize = boot_info::MAX_VMS;

/// The interval in microseconds; 0: off.
static INTERVAL_US: AtomicU64 = AtomicU64::new(0);
/// When the next line is due.
static NEXT_US: AtomicU64 = AtomicU64::new(0);
/// Per VM slot: its exits by reason at the end of its last slice.
static COUNTS: [[AtomicU64; REASONS]; SLOTS] =
    [const { [const { AtomicU64::new(0) }; REASONS] }; SLOTS];
/// Slots (bit = slot) that have run a slice.
static SEEN: AtomicU32 = AtomicU32::new(0);

/// Turns the lines on, one every `ms` milliseconds (at least 10).
pub fn set_interval_ms(ms: u64) {
    INTERVAL_US.store(ms.max(10) * 1000, Ordering::Relaxed);
}

/// Records VM `slot`'s exit counters after a slice (atomics only).
pub fn record(slot: usize, exits: &[u64; REASONS]) {
    if INTERVAL_US.load(Ordering::Relaxed) == 0 || slot >= SLOTS {
        return;
    }
    for (c, &n) in COUNTS[slot].iter().zip(exits) {
        c.store(n, Ordering::Relaxed);
    }
    SEEN.fetch_or(1 << slot, Ordering::Relaxed);
}

/// Prints the line if it is due (one CPU wins each interval).
pub fn poll(now_us: u64) {
    let interval = INTERVAL_US.load(Ordering::Relaxed);
    if interval == 0 {
        return;
    }
    let due = NEXT_US.load(Ordering::Relaxed);
    if now_us < due
        || NEXT_US
            .compare_exchange(due, now_us + interval, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    let seen = SEEN.load(Ordering::Relaxed);
    let mut line = alloc::format!("{{\"t_ms\":{},\"vms\":[", now_us / 1000);
    let mut first = true;
    for (slot, counts) in COUNTS.iter().enumerate() {
        if seen & (1 << slot) == 0 {
            continue;
        }
        if !first {
            line.push(',');
        }
        first = false;
        let _ = write!(line, "{{\"vm\":{slot},\"exits\":{{");
        for (i, (name, c)) in VmExit::REASONS.iter().zip(counts).enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(line, "{sep}\"{name}\":{}", c.load(Ordering::Relaxed));
        }
        line.push_str("}}");
    }
    line.push_str("]}");
    crate::println!("vm-exits sample: {line}");
}
