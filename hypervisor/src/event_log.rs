//! Log lines produced while holding a lock other CPUs need (the GPU-PV lock above
//! all): kept in a small per-VM buffer and printed later, by whoever holds no lock.
//!
//! A line on the 115200-baud serial port takes about 8 ms; printed under the GPU-PV
//! lock, one guest's stream of refused commands would stall every CPU. Here a line
//! costs a short format into a bounded buffer. Each VM (and the host) has its own
//! buffer and rate limit, so a noisy guest loses only its own lines; what was dropped
//! is counted and reported when the buffer is printed.

use alloc::string::String;
use core::fmt::Write;

use log::Level;

/// VMs with their own buffer: as many as the configuration allows (VM ids are config
/// slots); index `MAX_VMS` is the host's.
const MAX_VMS: usize = boot_info::MAX_VMS;
/// Lines kept per buffer until the next [`flush`].
const LINES: usize = 16;
/// Longest line kept (longer ones are cut).
const LINE_BYTES: usize = 240;
/// Lines a buffer accepts per second; the rest are counted as dropped.
const PER_SECOND: u32 = 20;

struct Line {
    level: Level,
    text: String,
}

#[derive(Default)]
struct Buffer {
    lines: alloc::collections::VecDeque<Line>,
    /// Start of the current one-second window (µs) and lines accepted in it.
    window_us: u64,
    in_window: u32,
    dropped: u64,
}

static BUFFERS: spin::Mutex<[Option<Buffer>; MAX_VMS + 1]> =
    spin::Mutex::new([const { None }; MAX_VMS + 1]);
/// Whether any buffer may hold something (so [`flush`] is cheap when idle).
static PENDING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Whom a line is charged to.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// A VM (its own buffer and rate).
    Vm(u16),
    /// The hypervisor itself.
    Host,
}

/// Buffers a line for [`flush`]; never prints, never blocks on I/O.
pub fn defer(source: Source, level: Level, args: core::fmt::Arguments<'_>) {
    if !log::log_enabled!(level) {
        return;
    }
    let i = match source {
        Source::Vm(vm) if usize::from(vm) < MAX_VMS => usize::from(vm),
        _ => MAX_VMS,
    };
    let now = crate::apic::now_us();
    let mut g = BUFFERS.lock();
    let b = g[i].get_or_insert_with(Buffer::default);
    if now.saturating_sub(b.window_us) >= 1_000_000 {
        b.window_us = now;
        b.in_window = 0;
    }
    PENDING.store(true, core::sync::atomic::Ordering::Release);
    if b.in_window >= PER_SECOND || b.lines.len() >= LINES {
        b.dropped += 1;
        return;
    }
    let mut text = String::new();
    if text.try_reserve_exact(LINE_BYTES).is_err() || b.lines.try_reserve(1).is_err() {
        b.dropped += 1;
        return;
    }
    let mut w = Bounded(&mut text);
    let _ = w.write_fmt(args);
    b.in_window += 1;
    b.lines.push_back(Line { level, text });
}

/// Cuts what is written at [`LINE_BYTES`] (on a character boundary).
struct Bounded<'a>(&'a mut String);

impl Write for Bounded<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = LINE_BYTES.saturating_sub(self.0.len());
        let mut end = s.len().min(room);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.0.push_str(&s[..end]);
        Ok(())
    }
}

/// Prints every buffered line. Call only while holding no lock another CPU needs;
/// the buffers' own lock is held just to take the lines out.
pub fn flush() {
    if !PENDING.swap(false, core::sync::atomic::Ordering::AcqRel) {
        return;
    }
    for i in 0..=MAX_VMS {
        let (lines, dropped) = {
            let mut g = BUFFERS.lock();
            match g[i].as_mut() {
                Some(b) if !b.lines.is_empty() || b.dropped > 0 => (
                    core::mem::take(&mut b.lines),
                    core::mem::take(&mut b.dropped),
                ),
                _ => continue,
            }
        };
        for l in lines {
            log::log!(l.level, "{}", l.text);
        }
        if dropped > 0 {
            if i < MAX_VMS {
                log::warn!("gpu-pv: vm {i}: {dropped} log lines dropped (rate limit)");
            } else {
                log::warn!("gpu-pv: {dropped} log lines dropped (rate limit)");
            }
        }
    }
}
