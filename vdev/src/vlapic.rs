//! A virtual local APIC (xAPIC register layout at `abi::guest::LAPIC_BASE`): ID,
//! version, TPR/PPR, EOI, LDR/DFR, SVR, ESR, the LVTs, the timer (one-shot,
//! periodic and TSC-deadline) with its divider and counts, the ICR (IPIs, handed to
//! the caller as [`Effect::Ipi`]), and the IRR/ISR bookkeeping that decides which
//! vector to inject next. These are the registers an unmodified Linux programs.
//! Time is the host's, in microseconds; the timer counts at
//! `abi::guest::APIC_TIMER_HZ` / divider. A TSC deadline arrives already converted
//! to microseconds by the caller, who knows the TSC's frequency.

use gpu_pv::abi::guest::APIC_TIMER_HZ;

const REG_ID: u32 = 0x20;
const REG_VERSION: u32 = 0x30;
const REG_TPR: u32 = 0x80;
const REG_PPR: u32 = 0xa0;
const REG_EOI: u32 = 0xb0;
const REG_LDR: u32 = 0xd0;
const REG_DFR: u32 = 0xe0;
const REG_SVR: u32 = 0xf0;
const REG_ISR0: u32 = 0x100;
const REG_IRR0: u32 = 0x200;
const REG_ESR: u32 = 0x280;
const REG_LVT_CMCI: u32 = 0x2f0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_THERMAL: u32 = 0x330;
const REG_LVT_PERF: u32 = 0x340;
const REG_LVT_LINT0: u32 = 0x350;
const REG_LVT_LINT1: u32 = 0x360;
const REG_LVT_ERROR: u32 = 0x370;
const REG_TIMER_INIT: u32 = 0x380;
const REG_TIMER_CUR: u32 = 0x390;
const REG_TIMER_DIV: u32 = 0x3e0;

const LVT_MASKED: u32 = 1 << 16;
/// Timer mode, bits 18:17: one-shot 00, periodic 01, TSC-deadline 10.
const LVT_TIMER_MODE: u32 = 3 << 17;
const LVT_PERIODIC: u32 = 1 << 17;
const LVT_TSC_DEADLINE: u32 = 2 << 17;
/// LVT bits that hold state: vector, delivery mode, polarity, trigger, mask.
const LVT_BITS: u32 = 0xff | (7 << 8) | (1 << 13) | (1 << 15) | LVT_MASKED;
/// The LVTs besides the timer, in register order from `REG_LVT_CMCI` (0) to
/// `REG_LVT_ERROR`; slot 1 (the timer) is kept in `lvt_timer`.
const OTHER_LVTS: [u32; 6] = [
    REG_LVT_CMCI,
    REG_LVT_THERMAL,
    REG_LVT_PERF,
    REG_LVT_LINT0,
    REG_LVT_LINT1,
    REG_LVT_ERROR,
];

/// What a register write asks of the rest of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// The guest ended the interrupt `vector` (an I/O APIC may wait for it).
    Eoi(u8),
    /// The guest sent an inter-processor interrupt.
    Ipi(Ipi),
}

/// An IPI as the ICR describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipi {
    /// Vector (fixed delivery) or start page (startup).
    pub vector: u8,
    /// Delivery mode, ICR bits 10:8: 0 fixed, 1 lowest priority, 2 SMI, 4 NMI,
    /// 5 INIT, 6 startup.
    pub mode: u8,
    /// Who receives it.
    pub dest: IpiDest,
}

/// The receivers of an IPI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpiDest {
    /// The APIC with this id (physical mode).
    Physical(u8),
    /// The APICs whose logical id matches this mask (flat logical mode).
    Logical(u8),
    /// The sender itself.
    ToSelf,
    /// Everyone, the sender included.
    All,
    /// Everyone but the sender.
    Others,
}

/// One vCPU's virtual local APIC.
#[derive(Clone, Debug)]
pub struct VLapic {
    id: u32,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    icr_high: u32,
    icr_low: u32,
    lvt_timer: u32,
    other_lvts: [u32; 6],
    /// The TSC deadline as the guest wrote it (0: none armed), and when it is due.
    tsc_deadline: u64,
    tsc_deadline_us: Option<u64>,
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
            ldr: 0,
            dfr: u32::MAX,
            svr: 0xff,
            icr_high: 0,
            icr_low: 0,
            lvt_timer: LVT_MASKED,
            other_lvts: [LVT_MASKED; 6],
            tsc_deadline: 0,
            tsc_deadline_us: None,
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
        if self.deadline_mode() {
            return 0;
        }
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

    fn deadline_mode(&self) -> bool {
        self.lvt_timer & LVT_TIMER_MODE == LVT_TSC_DEADLINE
    }

    /// A one-line account of what it holds, for the end-of-run report: the highest
    /// requested and in-service vectors, TPR, timer mode, mask and deadline.
    pub fn summary(&self) -> alloc::string::String {
        let mode = match self.lvt_timer & LVT_TIMER_MODE {
            LVT_TSC_DEADLINE => "tsc-deadline",
            LVT_PERIODIC => "periodic",
            _ => "one-shot",
        };
        alloc::format!(
            "apic {} irr {:?} isr {:?} tpr {:#x} svr {:#x} timer {} vector {:#x}{} deadline {:?} fired {}",
            self.id,
            highest(&self.irr),
            highest(&self.isr),
            self.tpr,
            self.svr,
            mode,
            self.lvt_timer & 0xff,
            if self.lvt_timer & LVT_MASKED != 0 { " masked" } else { "" },
            self.deadline_us(),
            self.timer_fires
        )
    }

    /// This APIC's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Whether this APIC is among the receivers of a flat-model logical
    /// destination `mask` (the cluster model is not offered: DFR reads back as
    /// written but matching is flat).
    pub fn matches_logical(&self, mask: u8) -> bool {
        (self.ldr >> 24) as u8 & mask != 0
    }

    /// The processor priority: the higher of TPR and the in-service class.
    fn ppr(&self) -> u32 {
        let isr = highest(&self.isr).map_or(0, |v| u32::from(v) & 0xf0);
        if (self.tpr & 0xf0) >= isr {
            self.tpr
        } else {
            isr
        }
    }

    /// The raw IA32_TSC_DEADLINE value (0 once it fired, or outside deadline mode).
    pub fn tsc_deadline(&self) -> u64 {
        if self.deadline_mode() {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// A write of IA32_TSC_DEADLINE: `tsc` as written, due at `due_us`. Ignored
    /// outside TSC-deadline mode, as on hardware; 0 disarms.
    pub fn set_tsc_deadline(&mut self, tsc: u64, due_us: u64) {
        if !self.deadline_mode() {
            return;
        }
        self.tsc_deadline = tsc;
        self.tsc_deadline_us = (tsc != 0).then_some(due_us);
    }

    /// Register read at page offset `off`.
    pub fn read(&self, off: u32, now_us: u64) -> u32 {
        match off {
            REG_ID => self.id << 24,
            REG_VERSION => 0x0005_0014,
            REG_TPR => self.tpr,
            REG_PPR => self.ppr(),
            REG_LDR => self.ldr,
            REG_DFR => self.dfr,
            REG_SVR => self.svr,
            REG_ICR_LOW => self.icr_low,
            REG_ICR_HIGH => self.icr_high,
            REG_LVT_TIMER => self.lvt_timer,
            o if OTHER_LVTS.contains(&o) => {
                self.other_lvts[OTHER_LVTS.iter().position(|&r| r == o).unwrap_or(0)]
            }
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

    /// Register write at page offset `off`; says what else must happen.
    pub fn write(&mut self, off: u32, v: u32, now_us: u64) -> Option<Effect> {
        match off {
            REG_TPR => self.tpr = v & 0xff,
            REG_EOI => {
                let vec = highest(&self.isr)?;
                set(&mut self.isr, vec, false);
                return Some(Effect::Eoi(vec));
            }
            REG_LDR => self.ldr = v & 0xff00_0000,
            REG_DFR => self.dfr = v | 0x0fff_ffff,
            REG_SVR => self.svr = v & 0x1ff,
            // Writing the ESR latches errors into it; none are ever recorded.
            REG_ESR => {}
            REG_ICR_HIGH => self.icr_high = v & 0xff00_0000,
            REG_ICR_LOW => {
                // Delivery status (bit 12) always reads idle: delivery is immediate.
                self.icr_low = v & !(1 << 12);
                // An INIT level de-assert (INIT, level-triggered, level 0) only
                // synchronizes arbitration IDs on old APICs; later ones ignore it.
                let init_deassert = (v >> 8) & 7 == 5 && v & (1 << 15) != 0 && v & (1 << 14) == 0;
                if init_deassert {
                    return None;
                }
                return Some(Effect::Ipi(self.ipi()));
            }
            REG_LVT_TIMER => {
                let old_mode = self.lvt_timer & LVT_TIMER_MODE;
                self.lvt_timer = v & (LVT_BITS | LVT_TIMER_MODE);
                if self.lvt_timer & LVT_TIMER_MODE != old_mode {
                    // A mode change stops whatever timer ran (SDM 10.5.4.1).
                    self.started_us = None;
                    self.initial = 0;
                    self.tsc_deadline = 0;
                    self.tsc_deadline_us = None;
                }
            }
            o if OTHER_LVTS.contains(&o) => {
                let i = OTHER_LVTS.iter().position(|&r| r == o).unwrap_or(0);
                self.other_lvts[i] = v & LVT_BITS;
            }
            REG_TIMER_DIV => self.divide_reg = v & 0xb,
            // In TSC-deadline mode the initial count is ignored.
            REG_TIMER_INIT if !self.deadline_mode() => {
                self.initial = v;
                self.started_us = if v == 0 { None } else { Some(now_us) };
            }
            _ => {}
        }
        None
    }

    /// The IPI the ICR now describes.
    fn ipi(&self) -> Ipi {
        let low = self.icr_low;
        let target = (self.icr_high >> 24) as u8;
        let dest = match (low >> 18) & 3 {
            1 => IpiDest::ToSelf,
            2 => IpiDest::All,
            3 => IpiDest::Others,
            _ if low & (1 << 11) != 0 => IpiDest::Logical(target),
            _ => IpiDest::Physical(target),
        };
        Ipi {
            vector: low as u8,
            mode: ((low >> 8) & 7) as u8,
            dest,
        }
    }

    /// When the timer next fires (us), if it runs.
    pub fn deadline_us(&self) -> Option<u64> {
        if self.deadline_mode() {
            return self.tsc_deadline_us;
        }
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
        if self.deadline_mode() {
            self.tsc_deadline = 0;
            self.tsc_deadline_us = None;
            return;
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

    /// Linux's clockevent with TSC-deadline: the LVT in deadline mode, then a
    /// deadline per event; the initial count is ignored and the deadline fires once.
    #[test]
    fn tsc_deadline_mode_fires_once_at_the_deadline() {
        let mut l = VLapic::new(0);
        l.write(REG_SVR, 0x1ff, 0);
        l.set_tsc_deadline(5_000, 50);
        assert_eq!(l.deadline_us(), None, "ignored outside deadline mode");
        l.write(REG_LVT_TIMER, 0xec | LVT_TSC_DEADLINE, 0);
        l.write(REG_TIMER_INIT, 1_000, 0);
        assert_eq!(l.deadline_us(), None, "initial count ignored");
        l.set_tsc_deadline(5_000, 50);
        assert_eq!(l.tsc_deadline(), 5_000);
        assert_eq!(l.deadline_us(), Some(50));
        l.tick(49);
        assert_eq!(l.pending(), None);
        l.tick(50);
        assert_eq!(l.pending(), Some(0xec));
        assert_eq!(l.tsc_deadline(), 0, "reads 0 once fired");
        assert_eq!(l.deadline_us(), None);
        l.set_tsc_deadline(9_000, 90);
        l.set_tsc_deadline(0, 0);
        assert_eq!(l.deadline_us(), None, "0 disarms");
        // Leaving deadline mode disarms too.
        l.set_tsc_deadline(9_000, 90);
        l.write(REG_LVT_TIMER, 0xec, 0);
        assert_eq!(l.deadline_us(), None);
    }

    #[test]
    fn icr_writes_are_ipis_and_eoi_names_the_vector() {
        let mut l = VLapic::new(0);
        l.write(REG_ICR_HIGH, 3 << 24, 0);
        // Fixed, physical, to APIC 3.
        assert_eq!(
            l.write(REG_ICR_LOW, 0x4041, 0),
            Some(Effect::Ipi(Ipi {
                vector: 0x41,
                mode: 0,
                dest: IpiDest::Physical(3)
            }))
        );
        assert_eq!(l.read(REG_ICR_LOW, 0) & (1 << 12), 0, "never busy");
        // Self shorthand; INIT to all others; logical.
        let ipi = |l: &mut VLapic, low| match l.write(REG_ICR_LOW, low, 0) {
            Some(Effect::Ipi(i)) => i,
            e => panic!("{e:?}"),
        };
        assert_eq!(ipi(&mut l, (1 << 18) | 0xf6).dest, IpiDest::ToSelf);
        let init = ipi(&mut l, (3 << 18) | (5 << 8));
        assert_eq!((init.mode, init.dest), (5, IpiDest::Others));
        assert_eq!(ipi(&mut l, (1 << 11) | 0x30).dest, IpiDest::Logical(3));
        // Linux's AP start: INIT assert (level, asserted), INIT de-assert (level, not
        // asserted: nothing), STARTUP with the trampoline's page.
        let assert = ipi(&mut l, (1 << 15) | (1 << 14) | (5 << 8));
        assert_eq!((assert.mode, assert.dest), (5, IpiDest::Physical(3)));
        assert_eq!(l.write(REG_ICR_LOW, (1 << 15) | (5 << 8), 0), None);
        let startup = ipi(&mut l, (6 << 8) | 0x9a);
        assert_eq!((startup.mode, startup.vector), (6, 0x9a));
        // EOI names the vector that was in service, then nothing.
        l.raise(0x51);
        l.acknowledge(0x51);
        assert_eq!(l.write(REG_EOI, 0, 0), Some(Effect::Eoi(0x51)));
        assert_eq!(l.write(REG_EOI, 0, 0), None);
    }

    #[test]
    fn the_registers_linux_programs_read_back() {
        let mut l = VLapic::new(1);
        assert_eq!(l.read(REG_DFR, 0), u32::MAX, "flat model after reset");
        l.write(REG_LDR, 0x0200_00ff, 0);
        assert_eq!(l.read(REG_LDR, 0), 0x0200_0000);
        assert!(l.matches_logical(0x02) && !l.matches_logical(0x01));
        for (reg, v) in [
            (REG_LVT_LINT0, 0x700),
            (REG_LVT_LINT1, 0x400),
            (REG_LVT_ERROR, 0xfe),
        ] {
            assert_eq!(l.read(reg, 0), LVT_MASKED, "{reg:#x} masked after reset");
            l.write(reg, v, 0);
            assert_eq!(l.read(reg, 0), v, "{reg:#x}");
        }
        l.write(REG_ESR, 0, 0);
        assert_eq!(l.read(REG_ESR, 0), 0);
        // PPR: the in-service class beats a lower TPR.
        l.write(REG_TPR, 0x20, 0);
        l.raise(0x61);
        l.acknowledge(0x61);
        assert_eq!(l.read(REG_PPR, 0), 0x60);
        l.write(REG_TPR, 0x70, 0);
        assert_eq!(l.read(REG_PPR, 0), 0x70);
    }
}
