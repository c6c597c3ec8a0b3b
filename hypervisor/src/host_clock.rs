//! The wall-clock time, from the machine's own CMOS real-time clock, read once at
//! boot and then carried forward with the local APIC clock. A VM's virtual RTC
//! (`vdev::rtc`) starts from it, so a guest's date is the host's.

use core::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use vdev::rtc::DateTime;
use x86_64::instructions::port::Port;

/// Seconds since 1970 when the clock was read, and the host microseconds then.
static BOOT_UNIX: AtomicI64 = AtomicI64::new(0);
static BOOT_US: AtomicU64 = AtomicU64::new(0);

fn cmos(reg: u8) -> u8 {
    let mut index = Port::<u8>::new(0x70);
    let mut data = Port::<u8>::new(0x71);
    // SAFETY: the CMOS index and data ports; the hypervisor owns them (guests'
    // accesses to them exit), and only this module touches them, at boot on one CPU.
    // Bit 7 of the index (NMI disable) stays clear.
    unsafe {
        index.write(reg & 0x7f);
        data.read()
    }
}

fn from_bcd(v: u8, binary: bool) -> u8 {
    if binary {
        v
    } else {
        (v >> 4) * 10 + (v & 0xf)
    }
}

/// One reading of the date and time (registers as the RTC holds them).
fn read_once() -> [u8; 7] {
    [0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32].map(cmos)
}

/// Reads the host's RTC (assumed UTC, as QEMU's and Bochs's are by default) and
/// remembers it; returns the seconds since 1970 (0 if the clock does not answer).
pub fn init() -> i64 {
    // Twice the same outside an update, as the RTC's own guidance asks; bounded, so an
    // absent or broken clock costs at most a few milliseconds.
    let mut time = None;
    for _ in 0..1000 {
        if cmos(0x0a) & 0x80 != 0 {
            continue;
        }
        let a = read_once();
        if cmos(0x0a) & 0x80 == 0 && read_once() == a {
            time = Some(a);
            break;
        }
    }
    let b = cmos(0x0b);
    let unix = time.map_or(0, |[s, m, h, d, mo, y, c]| {
        let binary = b & 0x04 != 0;
        let mut hour = from_bcd(h & 0x7f, binary);
        if b & 0x02 == 0 {
            // 12-hour mode: bit 7 is PM.
            hour = hour % 12 + if h & 0x80 != 0 { 12 } else { 0 };
        }
        let century = match from_bcd(c, binary) {
            19..=99 => u32::from(from_bcd(c, binary)),
            _ => 20,
        };
        DateTime {
            year: century * 100 + u32::from(from_bcd(y, binary)),
            month: from_bcd(mo, binary).clamp(1, 12),
            day: from_bcd(d, binary).clamp(1, 31),
            hour: hour.min(23),
            minute: from_bcd(m, binary).min(59),
            second: from_bcd(s, binary).min(59),
            weekday: 0,
        }
        .to_unix()
    });
    BOOT_UNIX.store(unix, Ordering::Relaxed);
    BOOT_US.store(crate::apic::now_us(), Ordering::Relaxed);
    unix
}

/// Seconds since 1970 now (host microseconds `now_us`).
pub fn unix_at(now_us: u64) -> i64 {
    let elapsed = now_us.saturating_sub(BOOT_US.load(Ordering::Relaxed)) / 1_000_000;
    BOOT_UNIX.load(Ordering::Relaxed) + elapsed as i64
}
