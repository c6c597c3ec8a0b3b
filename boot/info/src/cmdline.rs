//! The hypervisor's command line (`\hv\cmdline.txt`): the keys it knows, checked by
//! the loader before anything boots and by xtask on the host (`check-config
//! --cmdline`, every scenario), so a typo stops the run instead of being ignored.

use core::fmt;

/// What a key takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takes {
    /// Nothing: the key alone (`harness`).
    Nothing,
    /// A whole number (`run_ms=2000`).
    Number,
    /// One of these words.
    OneOf(&'static [&'static str]),
    /// Any text without spaces.
    Text,
    /// A number, or nothing (`hold` or `hold=5`).
    OptionalNumber,
}

/// Every key: its name, what it takes, and what it does.
pub const KEYS: &[(&str, Takes, &str)] = &[
    (
        "harness",
        Takes::Nothing,
        "end an emulator run through its debug-exit ports",
    ),
    ("run_ms", Takes::Number, "stop the VMs after N ms"),
    (
        "exit_sample_ms",
        Takes::Number,
        "every N ms a vm-exits sample line (exits by reason per VM; default off)",
    ),
    (
        "gpu",
        Takes::OneOf(&["sim"]),
        "gpu=sim: the CPU-rendered simulated GPU",
    ),
    (
        "iommu",
        Takes::OneOf(&["off"]),
        "iommu=off: leave DMA translation off",
    ),
    (
        "sample_ms",
        Takes::Number,
        "interval of the gpu-pv sample lines",
    ),
    (
        "linux_stuck_s",
        Takes::Number,
        "a Linux VM's vCPU may run this long with interrupts off (s, default 600)",
    ),
    (
        "allow_stop",
        Takes::Text,
        "VMs (a,b) whose failure the run's verdict allows",
    ),
    (
        "test",
        Takes::Text,
        "a self-test mode (builds with the selftest feature)",
    ),
    (
        "hang_vm",
        Takes::Number,
        "test-only: withhold VM N's completions (test-inject)",
    ),
    (
        "bypass_vm",
        Takes::Number,
        "test-only: the VM test=iommu-bypass targets",
    ),
    ("frames", Takes::Number, "test=gpu-native: frames to draw"),
    (
        "native_ms",
        Takes::Number,
        "test=bench-gpu: native baseline time",
    ),
    (
        "warmup_ms",
        Takes::Number,
        "benchmarks: warm-up before measuring",
    ),
    (
        "workload",
        Takes::OneOf(&["serial", "stream"]),
        "test=bench-gpu: the guest workload",
    ),
    (
        "restart_ms",
        Takes::Number,
        "test=gpu-restart: run this long before VM 0 is re-created",
    ),
    (
        "after_ms",
        Takes::Number,
        "test=gpu-restart: run this long after it",
    ),
    (
        "hold",
        Takes::OptionalNumber,
        "test=gpu-native: keep the pattern on screen (s)",
    ),
];

/// Why a command line was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// A key nobody reads.
    Unknown(&'a str),
    /// A known key with a value it does not take.
    BadValue(&'a str),
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdlineError::Unknown(t) => write!(f, "unknown key {t:?}"),
            CmdlineError::BadValue(t) => write!(f, "bad value in {t:?}"),
        }
    }
}

/// Checks every token of `line` against [`KEYS`].
pub fn check(line: &str) -> Result<(), CmdlineError<'_>> {
    for token in line.split_ascii_whitespace() {
        let (key, value) = match token.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (token, None),
        };
        let Some(&(_, takes, _)) = KEYS.iter().find(|(k, _, _)| *k == key) else {
            return Err(CmdlineError::Unknown(token));
        };
        let number = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
        let ok = match (takes, value) {
            (Takes::Nothing, None) => true,
            (Takes::Number, Some(v)) => number(v),
            (Takes::OneOf(words), Some(v)) => words.contains(&v),
            (Takes::Text, Some(v)) => !v.is_empty(),
            (Takes::OptionalNumber, None) => true,
            (Takes::OptionalNumber, Some(v)) => number(v),
            _ => false,
        };
        if !ok {
            return Err(CmdlineError::BadValue(token));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_keys_pass_and_typos_are_named() {
        assert_eq!(check(""), Ok(()));
        assert_eq!(
            check("harness run_ms=2000 gpu=sim iommu=off allow_stop=a,b hold"),
            Ok(())
        );
        assert_eq!(check("test=gpu-share hold=5 workload=serial"), Ok(()));
        assert_eq!(
            check("run_ms=2000 runms=3"),
            Err(CmdlineError::Unknown("runms=3"))
        );
        assert_eq!(check("harnes"), Err(CmdlineError::Unknown("harnes")));
        assert_eq!(check("run_ms=2s"), Err(CmdlineError::BadValue("run_ms=2s")));
        assert_eq!(check("run_ms"), Err(CmdlineError::BadValue("run_ms")));
        assert_eq!(check("gpu=real"), Err(CmdlineError::BadValue("gpu=real")));
        assert_eq!(check("harness=1"), Err(CmdlineError::BadValue("harness=1")));
        assert_eq!(check("test="), Err(CmdlineError::BadValue("test=")));
    }
}
