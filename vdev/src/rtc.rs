//! The CMOS real-time clock every PC has (a Motorola MC146818 behind ports 0x70 and
//! 0x71), as much of it as an operating system reads: the date and time, the
//! status registers and the battery-backed RAM. Without it Linux waits for an
//! update-in-progress bit that never clears (an absent port reads 0xFF), twice, which
//! cost about 7 s of a 12 s boot; it also keeps its clock at 1970.
//!
//! The clock runs from a start time the kernel gives (the host's own RTC read at
//! boot, in seconds since 1970) and the host's microsecond clock. Updates are
//! instantaneous, so update-in-progress always reads 0. A guest may set the clock (the
//! time registers, with or without SET in register B); it then runs from what it
//! wrote. BCD or binary and 12- or 24-hour formats follow register B as the guest
//! sets it. Alarms, the periodic and update interrupts (IRQ 8) and daylight saving are
//! not offered: their enable bits are kept, but no interrupt is ever raised and
//! register C reads 0.

/// The index port (bit 7: NMI disable, ignored).
pub const INDEX_PORT: u16 = 0x70;
/// The data port.
pub const DATA_PORT: u16 = 0x71;

const REG_SECONDS: usize = 0x00;
const REG_MINUTES: usize = 0x02;
const REG_HOURS: usize = 0x04;
const REG_WEEKDAY: usize = 0x06;
const REG_DAY: usize = 0x07;
const REG_MONTH: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
/// The century, where the IBM PC/AT put it (ACPI's FADT may name another).
const REG_CENTURY: usize = 0x32;

/// Register A: 32.768 kHz time base, 1024 Hz periodic rate (the reset value).
const A_DEFAULT: u8 = 0x26;
/// Register B bits.
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
/// Register D: the RAM and time are valid (the battery is fine).
const D_VRT: u8 = 0x80;

/// A guest's real-time clock.
#[derive(Clone, Debug)]
pub struct Rtc {
    index: u8,
    /// Seconds since 1970 at `base_us` of the host clock.
    base_secs: i64,
    base_us: u64,
    /// Registers A and B and the battery-backed RAM (the time registers are derived).
    ram: [u8; 128],
}

impl Rtc {
    /// A clock showing `unix_secs` (seconds since 1970-01-01 00:00:00 UTC) at host
    /// time `now_us`, in BCD and 24-hour format.
    pub fn new(unix_secs: i64, now_us: u64) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A] = A_DEFAULT;
        ram[REG_B] = B_24H;
        ram[REG_D] = D_VRT;
        Self {
            index: 0,
            base_secs: unix_secs,
            base_us: now_us,
            ram,
        }
    }

    /// Whether `port` is the RTC's.
    pub fn claims(port: u16) -> bool {
        port == INDEX_PORT || port == DATA_PORT
    }

    /// Seconds since 1970 the clock shows at host time `now_us`.
    pub fn unix_time(&self, now_us: u64) -> i64 {
        let elapsed = now_us.saturating_sub(self.base_us) / 1_000_000;
        self.base_secs
            .saturating_add(i64::try_from(elapsed).unwrap_or(i64::MAX))
    }

    /// A byte read of `port`.
    pub fn read(&mut self, port: u16, now_us: u64) -> u8 {
        if port != DATA_PORT {
            // The index register is write-only; reads float.
            return 0xff;
        }
        let reg = usize::from(self.index);
        let t = DateTime::from_unix(self.unix_time(now_us));
        let b = self.ram[REG_B];
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_WEEKDAY => self.encode(t.weekday),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode((t.year % 100) as u8),
            REG_CENTURY => self.encode((t.year / 100) as u8),
            REG_A => self.ram[REG_A] & 0x7f,
            REG_B => b,
            // No interrupt flags, ever; reading clears them anyway.
            REG_C => 0,
            REG_D => D_VRT,
            r => self.ram[r & 0x7f],
        }
    }

    /// A byte write of `port`.
    pub fn write(&mut self, port: u16, value: u8, now_us: u64) {
        if port == INDEX_PORT {
            self.index = value & 0x7f;
            return;
        }
        if port != DATA_PORT {
            return;
        }
        let reg = usize::from(self.index);
        let time_field = matches!(
            reg,
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY | REG_MONTH | REG_YEAR | REG_CENTURY
        );
        if time_field {
            let mut t = DateTime::from_unix(self.unix_time(now_us));
            let v = self.decode(value);
            match reg {
                REG_SECONDS => t.second = v.min(59),
                REG_MINUTES => t.minute = v.min(59),
                REG_HOURS => t.hour = self.decode_hour(value),
                REG_DAY => t.day = v.clamp(1, 31),
                REG_MONTH => t.month = v.clamp(1, 12),
                REG_YEAR => t.year = t.year / 100 * 100 + u32::from(v.min(99)),
                _ => t.year = u32::from(v.min(99)) * 100 + t.year % 100,
            }
            self.base_secs = t.to_unix();
            self.base_us = now_us;
            return;
        }
        match reg {
            // Update-in-progress is read-only.
            REG_A => self.ram[REG_A] = value & 0x7f,
            REG_B => self.ram[REG_B] = value,
            REG_C | REG_D | REG_WEEKDAY => {}
            r => self.ram[r & 0x7f] = value,
        }
    }

    fn binary(&self) -> bool {
        self.ram[REG_B] & B_BINARY != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            (v >> 4).min(9) * 10 + (v & 0xf).min(9)
        }
    }

    /// Hours in the guest's format: 12-hour mode has 1-12 with bit 7 for PM.
    fn encode_hour(&self, h: u8) -> u8 {
        if self.ram[REG_B] & B_24H != 0 {
            return self.encode(h);
        }
        let pm = if h >= 12 { 0x80 } else { 0 };
        let h12 = match h % 12 {
            0 => 12,
            x => x,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.ram[REG_B] & B_24H != 0 {
            return self.decode(v).min(23);
        }
        let h12 = self.decode(v & 0x7f).clamp(1, 12) % 12;
        if v & 0x80 != 0 {
            h12 + 12
        } else {
            h12
        }
    }
}

/// A calendar date and time (UTC), as the clock's registers hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    /// Year, e.g. 2026.
    pub year: u32,
    /// 1-12.
    pub month: u8,
    /// 1-31.
    pub day: u8,
    /// 0-23.
    pub hour: u8,
    /// 0-59.
    pub minute: u8,
    /// 0-59.
    pub second: u8,
    /// 1 (Sunday) - 7, as the MC146818 counts.
    pub weekday: u8,
}

impl DateTime {
    /// The date of `secs` seconds since 1970 (clamped to years 1970-9999).
    pub fn from_unix(secs: i64) -> Self {
        let secs = secs.clamp(0, 253_402_300_799);
        let days = secs / 86_400;
        let rem = secs % 86_400;
        // Days to a civil date (proleptic Gregorian), counting from 0000-03-01.
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem % 3600 / 60) as u8,
            second: (rem % 60) as u8,
            // 1970-01-01 was a Thursday (5).
            weekday: ((days + 4) % 7 + 1) as u8,
        }
    }

    /// Seconds since 1970 (a day past the month's end rolls into the next month).
    pub fn to_unix(self) -> i64 {
        let (m, d) = (i64::from(self.month), i64::from(self.day));
        let y = i64::from(self.year) - i64::from(m <= 2);
        let era = y / 400;
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        days * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

impl core::fmt::Display for DateTime {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-07 23:44:08 UTC, a Monday.
    const T: i64 = 1_796_687_048;

    fn reg(r: &mut Rtc, i: u8, now: u64) -> u8 {
        r.write(INDEX_PORT, i, now);
        r.read(DATA_PORT, now)
    }

    fn set(r: &mut Rtc, i: u8, v: u8, now: u64) {
        r.write(INDEX_PORT, i, now);
        r.write(DATA_PORT, v, now);
    }

    #[test]
    fn dates_convert_both_ways() {
        let t = DateTime::from_unix(T);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2026, 12, 7, 23, 44, 8, 2)
        );
        assert_eq!(t.to_unix(), T);
        assert_eq!(alloc::format!("{t}"), "2026-12-07 23:44:08 UTC");
        assert_eq!(DateTime::from_unix(0).weekday, 5, "a Thursday");
        let leap = DateTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
        for s in (0..4_000_000_000i64).step_by(9_876_543) {
            assert_eq!(DateTime::from_unix(s).to_unix(), s);
        }
    }

    #[test]
    fn linux_reads_the_time_in_bcd_with_update_never_in_progress() {
        let mut r = Rtc::new(T, 5_000_000);
        assert_eq!(reg(&mut r, 0x0a, 5_000_000) & 0x80, 0, "UIP clear");
        assert_eq!(reg(&mut r, 0x0d, 5_000_000), 0x80, "valid RAM and time");
        assert_eq!(reg(&mut r, 0x0b, 5_000_000), 0x02, "BCD, 24-hour");
        // 3 s later.
        let now = 8_000_000;
        let got: [u8; 8] =
            [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|i| reg(&mut r, i, now));
        assert_eq!(got, [0x11, 0x44, 0x23, 0x02, 0x07, 0x12, 0x26, 0x20]);
        // NMI-disable bit in the index is ignored; the index port reads as floating.
        assert_eq!(reg(&mut r, 0x80, now), 0x11);
        assert_eq!(r.read(INDEX_PORT, now), 0xff);
    }

    #[test]
    fn binary_and_12_hour_formats_follow_register_b() {
        let mut r = Rtc::new(T, 0);
        set(&mut r, 0x0b, 0x04, 0); // binary, 12-hour
        assert_eq!(reg(&mut r, 0x00, 0), 8);
        assert_eq!(reg(&mut r, 0x04, 0), 0x80 | 11, "11 PM");
        set(&mut r, 0x0b, 0x00, 0); // BCD, 12-hour
        assert_eq!(reg(&mut r, 0x04, 0), 0x80 | 0x11);
    }

    #[test]
    fn a_guest_sets_the_clock_and_it_runs_from_there() {
        let mut r = Rtc::new(T, 0);
        set(&mut r, 0x0b, 0x82, 0); // SET, BCD, 24h
        set(&mut r, 0x09, 0x30, 0); // 2030
        set(&mut r, 0x08, 0x01, 0); // January
        set(&mut r, 0x07, 0x15, 0); // the 15th
        set(&mut r, 0x04, 0x08, 0);
        set(&mut r, 0x02, 0x30, 0);
        set(&mut r, 0x00, 0x00, 0);
        set(&mut r, 0x0b, 0x02, 0);
        let at = DateTime {
            year: 2030,
            month: 1,
            day: 15,
            hour: 8,
            minute: 30,
            second: 0,
            weekday: 0,
        }
        .to_unix();
        assert_eq!(r.unix_time(61_000_000), at + 61);
        assert_eq!(reg(&mut r, 0x02, 61_000_000), 0x31);
    }

    #[test]
    fn ram_keeps_what_is_written_and_status_bits_are_read_only() {
        let mut r = Rtc::new(T, 0);
        // The shutdown status byte Linux writes before starting a CPU.
        set(&mut r, 0x0f, 0x0a, 0);
        assert_eq!(reg(&mut r, 0x0f, 0), 0x0a);
        set(&mut r, 0x0a, 0xff, 0);
        assert_eq!(reg(&mut r, 0x0a, 0) & 0x80, 0);
        set(&mut r, 0x0c, 0xff, 0);
        set(&mut r, 0x0d, 0x00, 0);
        assert_eq!((reg(&mut r, 0x0c, 0), reg(&mut r, 0x0d, 0)), (0, 0x80));
    }

    #[test]
    fn any_access_sequence_keeps_the_clock_sane() {
        let mut r = Rtc::new(T, 0);
        let mut x = 0x1234_5678_9abc_def0u64;
        for step in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let now = step * 1000;
            let port = if x & 1 == 0 { INDEX_PORT } else { DATA_PORT };
            if x & 2 == 0 {
                r.write(port, (x >> 8) as u8, now);
            } else {
                let _ = r.read(port, now);
            }
            let t = DateTime::from_unix(r.unix_time(now));
            assert!((1970..=9999).contains(&t.year));
            assert!((1..=12).contains(&t.month) && (1..=31).contains(&t.day));
        }
    }
}
