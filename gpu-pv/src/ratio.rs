//! Exact ratios of counters, shared by the counters and the scheduler's figures.

/// An exact ratio `num / den` of two counters; a zero denominator reads as zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ratio {
    /// Numerator.
    pub num: u64,
    /// Denominator.
    pub den: u64,
}

impl Ratio {
    /// `num / den`.
    pub const fn new(num: u64, den: u64) -> Self {
        Self { num, den }
    }

    /// The ratio in parts per million, rounded down (0 when `den` is 0).
    pub fn ppm(&self) -> u64 {
        if self.den == 0 {
            return 0;
        }
        let v = u128::from(self.num) * 1_000_000 / u128::from(self.den);
        u64::try_from(v).unwrap_or(u64::MAX)
    }

    /// The ratio as a float, for reports and tests only (0.0 when `den` is 0).
    pub fn as_f64(&self) -> f64 {
        if self.den == 0 {
            0.0
        } else {
            self.num as f64 / self.den as f64
        }
    }
}
