//! A virtual local APIC (xAPIC register layout at `abi::guest::LAPIC_BASE`): ID,
//! version, TPR, EOI, SVR, the LVT timer (one-shot and periodic) with its divider and
//! counts, and the IRR/ISR bookkeeping that decides which vector to inject next.
//! Time is the host's, in microseconds; the timer counts at
//! `abi::guest::APIC_TIMER_HZ` / divider.

use gpu_pv::abi::guest::APIC_TIMER_HZ;

const REG_ID: u32 = 0x20;
const REG_VERSION: u32 = 0x30;
const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xb0;
const REG_SVR: u32 = 0xf0;
const REG_ISR0: u32 = 0x100;
const REG_IRR0: u32 = 0x200;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INIT: u32 = 0x380;
const REG_TIMER_CUR: u32 = 0x390;
const REG_TIMER_DIV: u32 = 0x3e0;

const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;

/// One vCPU's virtual local APIC.
#[derive(Clone, Debug)]
pub struct VLapic {
    id: u32,
    tpr: u32,
    svr: u32,
    lvt_timer: u32,
    initial: u32,
    divide_reg: u32,
    /// When the current count started (us), if the timer runs.
    started_us: Option<u64>,
    irr: [u64; 4],
    isr: [u64; 4],
    /// Timer interrupts raised.
    pub timer_fires: u64,
}

fn test(bits: &[u64; 4], v: u8) -> bool {
    bits[v as usize / 64] & (1 << (v % 64)) != 0
}
fn set(bits: &mut [u64; 4], v: u8, on: bool) {
    if on {
        bits[v as usize / 64] |= 1 << (v % 64);
    } else {
        bits[v as usize / 64] &= !(1 << (v % 64));
    }
}
fn highest(bits: &[u64; 4]) -> Option<u8> {
    (0..4)
        .rev()
        .find(|&i| bits[i] != 0)
        .map(|i| (i * 64 + 63 - bits[i].leading_zeros() as usize) as u8)
}

impl VLapic {
    /// A reset APIC with id `id` (software-disabled, timer masked).
    pub fn new(id: u32) -> Self {
        Self {
            id,
            tpr: 0,
            svr: 0xff,
            lvt_timer: LVT_MASKED,
            initial: 0,
            divide_reg: 0,
            started_us: None,
            irr: [0; 4],
            isr: [0; 4],
            timer_fires: 0,
        }
    }

    fn divider(&self) -> u64 {
        let v = ((self.divide_reg & 8) >> 1) | (self.divide_reg & 3);
        if v == 7 {
            1
        } else {
            2 << v
        }
    }

    /// Microseconds one timer period lasts (0 when stopped). At most
    /// 2^32 * 128 * 10^6 / APIC_TIMER_HZ: no overflow.
    fn period_us(&self) -> u64 {
        u64::from(self.initial) * self.divider() * 1_000_000 / APIC_TIMER_HZ
    }

    /// The current count at `now_us`: what is left of the period, scaled to the
    /// initial count; 0 when stopped or once a one-shot period is over.
    fn current_count(&self, now_us: u64) -> u32 {
        let Some(t0) = self.started_us else {
            return 0;
        };
        let period = self.period_us().max(1);
        let elapsed = now_us.saturating_sub(t0);
        let elapsed = if self.lvt_timer & LVT_PERIODIC != 0 {
            elapsed % period
        } else if elapsed < period {
            elapsed
        } else {
            return 0;
        };
        let left = period - elapsed;
        // left * initial needs up to 2^65 for the longest timers; the quotient is at
        // most the initial count.
        (u128::from(left) * u128::from(self.initial) / u128::from(period)) as u32
    }

    fn enabled(&self) -> bool {
        self.svr & 0x100 != 0
    }

    /// Register read at page offset `off`.
    pub fn read(&self, off: u32, now_us: u64) -> u32 {
        match off {
            REG_ID => self.id << 24,
            REG_VERSION => 0x0005_0014,
            REG_TPR => self.tpr,
            REG_SVR => self.svr,
            REG_LVT_TIMER => self.lvt_timer,
            REG_TIMER_INIT => self.initial,
            REG_TIMER_DIV => self.divide_reg,
            REG_TIMER_CUR => self.current_count(now_us),
            o if (REG_ISR0..REG_ISR0 + 0x80).contains(&o) && o % 16 == 0 => {
                let i = ((o - REG_ISR0) / 16) as usize;
                (self.isr[i / 2] >> ((i % 2) * 32)) as u32
            }
            o if (REG_IRR0..REG_IRR0 + 0x80).contains(&o) && o % 16 == 0 => {
                let i = ((o - REG_IRR0) / 16) as usize;
                (self.irr[i / 2] >> ((i % 2) * 32)) as u32
            }
            _ => 0,
        }
    }

    /// Register write at page offset `off`.
    pub fn write(&mut self, off: u32, v: u32, now_us: u64) {
        match off {
            REG_TPR => self.tpr = v & 0xff,
            REG_EOI => {
                if let Some(vec) = highest(&self.isr) {
                    set(&mut self.isr, vec, false);
                }
            }
            REG_SVR => self.svr = v & 0x1ff,
            REG_LVT_TIMER => self.lvt_timer = v & (0xff | LVT_MASKED | LVT_PERIODIC),
            REG_TIMER_DIV => self.divide_reg = v & 0xb,
            REG_TIMER_INIT => {
                self.initial = v;
                self.started_us = if v == 0 { None } else { Some(now_us) };
            }
            _ => {}
        }
    }

    /// When the timer next fires (us), if it runs.
    pub fn deadline_us(&self) -> Option<u64> {
        let t0 = self.started_us?;
        Some(t0.saturating_add(self.period_us().max(1)))
    }

    /// Advances time: raises the timer vector if its deadline passed.
    pub fn tick(&mut self, now_us: u64) {
        let Some(deadline) = self.deadline_us() else {
            return;
        };
        if now_us < deadline {
            return;
        }
        let vector = (self.lvt_timer & 0xff) as u8;
        if self.enabled() && self.lvt_timer & LVT_MASKED == 0 && vector >= 16 {
            set(&mut self.irr, vector, true);
            self.timer_fires += 1;
        }
        self.started_us = if self.lvt_timer & LVT_PERIODIC != 0 {
            // Missed periods are dropped, not queued: one interrupt per catch-up.
            let p = self.period_us().max(1);
            Some(deadline + (now_us - deadline) / p * p)
        } else {
            None
        };
    }

    /// The vector to deliver now, if one is pending above the in-service priority.
    pub fn pending(&self) -> Option<u8> {
        let v = highest(&self.irr)?;
        let prio = |x: u8| x >> 4;
        match highest(&self.isr) {
            Some(s) if prio(s) >= prio(v) => None,
            _ if prio(v) <= (self.tpr >> 4) as u8 => None,
            _ => Some(v),
        }
    }

    /// Raises `vector` (an MSI from a virtual device).
    pub fn raise(&mut self, vector: u8) {
        if vector >= 16 {
            set(&mut self.irr, vector, true);
        }
    }

    /// Marks `vector` as delivered (IRR -> ISR).
    pub fn acknowledge(&mut self, vector: u8) {
        if test(&self.irr, vector) {
            set(&mut self.irr, vector, false);
            set(&mut self.isr, vector, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An enabled APIC with the timer at `vector`, periodic or one-shot.
    fn armed(periodic: bool, divide_reg: u32, initial: u32, now_us: u64) -> VLapic {
        let mut l = VLapic::new(0);
        l.write(REG_SVR, 0x1ff, now_us);
        let mode = if periodic { LVT_PERIODIC } else { 0 };
        l.write(REG_LVT_TIMER, 0x40 | mode, now_us);
        l.write(REG_TIMER_DIV, divide_reg, now_us);
        l.write(REG_TIMER_INIT, initial, now_us);
        l
    }

    #[test]
    fn periodic_timer_fires_and_counts_down() {
        // Divider 1 (0xb): 100 counts per microsecond, 10_000 counts = 100 us.
        let mut l = armed(true, 0xb, 10_000, 1_000);
        assert_eq!(l.read(REG_TIMER_CUR, 1_000), 10_000);
        assert_eq!(l.read(REG_TIMER_CUR, 1_050), 5_000);
        assert_eq!(l.deadline_us(), Some(1_100));
        l.tick(1_099);
        assert_eq!(l.pending(), None);
        l.tick(1_100);
        assert_eq!(l.pending(), Some(0x40));
        assert_eq!(l.timer_fires, 1);
        assert_eq!(l.deadline_us(), Some(1_200));
        l.acknowledge(0x40);
        assert_eq!(l.pending(), None);
        assert_eq!(l.read(REG_ISR0 + 0x20, 0), 1, "vector 0x40 in service");
        l.write(REG_EOI, 0, 0);
        assert_eq!(l.read(REG_ISR0 + 0x20, 0), 0);
    }

    /// The longest timer a guest can program (initial count u32::MAX, divider 128:
    /// about 1.5 hours) used to overflow `left * initial` in u64.
    #[test]
    fn current_count_of_the_longest_timer_does_not_overflow() {
        // Divide register 0b1010: divide by 128.
        let l = armed(true, 0xa, u32::MAX, 0);
        assert_eq!(l.divider(), 128);
        assert_eq!(l.read(REG_TIMER_CUR, 0), u32::MAX);
        let half = l.period_us() / 2;
        let cur = l.read(REG_TIMER_CUR, half);
        assert!(cur.abs_diff(u32::MAX / 2) <= 128, "{cur}");
        assert!(l.read(REG_TIMER_CUR, l.period_us() - 1) < 200);
    }

    /// A one-shot timer past its deadline reads 0 (it does not start over), even
    /// before `tick` saw the deadline.
    #[test]
    fn expired_one_shot_reads_zero() {
        let mut l = armed(false, 0xb, 10_000, 0);
        assert_eq!(l.read(REG_TIMER_CUR, 99), 100);
        assert_eq!(l.read(REG_TIMER_CUR, 100), 0);
        assert_eq!(l.read(REG_TIMER_CUR, 150), 0);
        l.tick(150);
        assert_eq!(l.pending(), Some(0x40));
        assert_eq!(l.deadline_us(), None);
        assert_eq!(l.read(REG_TIMER_CUR, 150), 0);
    }

    /// A timer started near the end of time has a defined deadline (no overflow).
    #[test]
    fn deadline_near_the_end_of_time_saturates() {
        let mut l = armed(true, 0xa, u32::MAX, u64::MAX - 10);
        assert_eq!(l.deadline_us(), Some(u64::MAX));
        l.tick(u64::MAX);
        assert_eq!(l.pending(), Some(0x40));
        let _ = l.read(REG_TIMER_CUR, u64::MAX);
    }

    #[test]
    fn masked_or_low_vectors_do_not_fire() {
        let mut l = armed(false, 0xb, 100, 0);
        l.write(REG_LVT_TIMER, 0x40 | LVT_MASKED, 0);
        l.tick(10);
        assert_eq!(l.pending(), None);
        l.raise(5);
        assert_eq!(l.pending(), None, "vectors below 16 are not raised");
    }

    #[test]
    fn priority_and_tpr_gate_delivery() {
        let mut l = VLapic::new(3);
        assert_eq!(l.read(REG_ID, 0), 3 << 24);
        l.raise(0x51);
        l.acknowledge(0x51);
        l.raise(0x52);
        assert_eq!(
            l.pending(),
            None,
            "same priority class as the one in service"
        );
        l.raise(0x61);
        assert_eq!(l.pending(), Some(0x61));
        l.write(REG_TPR, 0x70, 0);
        assert_eq!(l.pending(), None, "TPR masks class 6");
        assert_eq!(l.read(REG_IRR0 + 0x30, 0), 1 << 1, "0x61 in IRR word 3");
    }
}
