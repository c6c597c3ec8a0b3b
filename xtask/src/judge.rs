//! Judging a run: the emulator's exit and the serial log.

use crate::process::Outcome;
use crate::scenario::{Emulator, ExpectExit, GpuShares};

/// QEMU's exit status for the pass write (see [`crate::qemu::PASS_STATUS`]).
pub const QEMU_PASS: i32 = crate::qemu::PASS_STATUS;
/// QEMU's exit status for the fail write.
pub const QEMU_FAIL: i32 = crate::qemu::FAIL_STATUS;
/// Bochs's exit status after `xchg bx,bx` (magic break, then the rc file's `quit`).
pub const BOCHS_PASS: i32 = 0;
/// Bochs's exit status after "Shutdown" to port 0x8900 (also panics and power-off).
pub const BOCHS_FAIL: i32 = 1;

/// Explains an emulator's exit status.
pub fn describe_exit(emu: Emulator, outcome: &Outcome) -> String {
    match (emu, outcome) {
        (_, Outcome::TimedOut) => "timed out (killed)".into(),
        (_, Outcome::Interrupted) => "interrupted".into(),
        (_, Outcome::MarkerSeen) => "marker seen (killed)".into(),
        (_, Outcome::Signaled(s)) => format!("killed by signal {s}"),
        (Emulator::Qemu, Outcome::Exited(QEMU_PASS)) => {
            "status 33 = pass (0x10 to port 0xf4)".into()
        }
        (Emulator::Qemu, Outcome::Exited(QEMU_FAIL)) => {
            "status 35 = fail (0x11 to port 0xf4)".into()
        }
        (Emulator::Qemu, Outcome::Exited(0)) => {
            "status 0 = QEMU stopped by itself (reset/triple fault with -no-reboot, or power-off)"
                .into()
        }
        (Emulator::Qemu, Outcome::Exited(1)) => "status 1 = QEMU error (see the log)".into(),
        (Emulator::Qemu, Outcome::Exited(c)) if c & 1 == 1 && *c > 1 => {
            format!("status {c} = 0x{:x} written to port 0xf4", c >> 1)
        }
        (Emulator::Bochs, Outcome::Exited(BOCHS_PASS)) => "status 0 = pass (magic break)".into(),
        (Emulator::Bochs, Outcome::Exited(BOCHS_FAIL)) => {
            "status 1 = fail (Shutdown to port 0x8900, power-off or panic)".into()
        }
        (_, Outcome::Exited(c)) => format!("status {c}"),
    }
}

/// `None` when the exit matches `expected`, else why not.
pub fn check_exit(emu: Emulator, expected: ExpectExit, outcome: &Outcome) -> Option<String> {
    let want = match (emu, expected) {
        (Emulator::Qemu, ExpectExit::Pass) => QEMU_PASS,
        (Emulator::Qemu, ExpectExit::Fail) => QEMU_FAIL,
        (Emulator::Bochs, ExpectExit::Pass) => BOCHS_PASS,
        (Emulator::Bochs, ExpectExit::Fail) => BOCHS_FAIL,
    };
    match outcome {
        Outcome::Exited(c) if *c == want => None,
        o => Some(format!(
            "exit: expected {expected} (status {want}), got {}",
            describe_exit(emu, o)
        )),
    }
}

/// Checks the serial log: every `expect` string in order (each found after the end of
/// the previous one), every `unordered` string anywhere, and no `forbid` string anywhere.
/// Returns the problems found.
pub fn check_log(
    log: &str,
    expect: &[String],
    unordered: &[String],
    forbid: &[String],
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut pos = 0;
    let mut prev: Option<&str> = None;
    for e in expect {
        match log[pos..].find(e.as_str()) {
            Some(i) => {
                pos += i + e.len();
                prev = Some(e);
            }
            None => {
                let msg = match (log.contains(e.as_str()), prev) {
                    (true, Some(p)) => {
                        format!("expected {e:?} after {p:?}, but it appears only before")
                    }
                    (_, Some(p)) => format!("expected {e:?} (after {p:?}): not in the log"),
                    (_, None) => format!("expected {e:?}: not in the log"),
                };
                problems.push(msg);
                break;
            }
        }
    }
    for u in unordered {
        if !log.contains(u.as_str()) {
            problems.push(format!("expected {u:?} (in any order): not in the log"));
        }
    }
    for f in forbid {
        if let Some(i) = log.find(f.as_str()) {
            let line = log[..i].matches('\n').count() + 1;
            problems.push(format!("forbidden {f:?} found (line {line})"));
        }
    }
    problems
}

/// Removes terminal escape sequences and carriage returns (OVMF's console output) so a
/// log can be shown on a terminal.
pub fn sanitize(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ params final-byte(0x40..=0x7e); other escapes: drop ESC + 1 char.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c if c.is_control() && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// The last `n` lines of a (sanitized) log.
pub fn tail(log: &str, n: usize) -> Vec<String> {
    let clean = sanitize(log);
    let lines: Vec<&str> = clean.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exit_codes() {
        use Outcome::*;
        assert_eq!(
            check_exit(Emulator::Qemu, ExpectExit::Pass, &Exited(33)),
            None
        );
        assert_eq!(
            check_exit(Emulator::Qemu, ExpectExit::Fail, &Exited(35)),
            None
        );
        assert!(check_exit(Emulator::Qemu, ExpectExit::Pass, &Exited(35)).is_some());
        assert!(check_exit(Emulator::Qemu, ExpectExit::Pass, &Exited(0)).is_some());
        assert!(check_exit(Emulator::Qemu, ExpectExit::Fail, &TimedOut).is_some());
        assert_eq!(
            check_exit(Emulator::Bochs, ExpectExit::Pass, &Exited(0)),
            None
        );
        assert_eq!(
            check_exit(Emulator::Bochs, ExpectExit::Fail, &Exited(1)),
            None
        );
        assert!(check_exit(Emulator::Bochs, ExpectExit::Pass, &Exited(1)).is_some());
        assert!(check_exit(Emulator::Bochs, ExpectExit::Pass, &Signaled(9)).is_some());
        assert!(describe_exit(Emulator::Qemu, &Exited(7)).contains("0x3"));
    }

    #[test]
    fn in_order() {
        let log = "a\r\nboot: config ok\r\nhv: boot summary\r\nHV-EXIT: PASS\r\n";
        assert!(check_log(log, &v(&["boot: config ok", "HV-EXIT: PASS"]), &[], &[]).is_empty());
        let p = check_log(log, &v(&["HV-EXIT: PASS", "boot: config ok"]), &[], &[]);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("only before"), "{p:?}");
        let p = check_log(log, &v(&["boot: config ok", "nope"]), &[], &[]);
        assert!(p[0].contains("not in the log"));
        // The same string twice needs two occurrences.
        assert!(!check_log("x y", &v(&["x", "x"]), &[], &[]).is_empty());
        assert!(check_log("x y x", &v(&["x", "x"]), &[], &[]).is_empty());
    }

    #[test]
    fn unordered() {
        let log = "b\na\n";
        assert!(check_log(log, &[], &v(&["a", "b"]), &[]).is_empty());
        let p = check_log(log, &v(&["b"]), &v(&["a", "c"]), &[]);
        assert_eq!(
            p,
            vec!["expected \"c\" (in any order): not in the log".to_string()]
        );
    }

    #[test]
    fn forbidden() {
        let p = check_log("ok\npanic here\n", &[], &[], &v(&["panic", "absent"]));
        assert_eq!(p, vec!["forbidden \"panic\" found (line 2)".to_string()]);
    }

    #[test]
    fn sanitizing() {
        let raw = "\x1b[2J\x1b[01;01H\x1b[=3hBdsDxe: loading\r\nline two\r\n";
        assert_eq!(sanitize(raw), "BdsDxe: loading\nline two\n");
        assert_eq!(tail("1\n2\n3\n", 2), v(&["2", "3"]));
    }
}

/// Checks `[gpu_shares]`: each listed VM's share of their GPU time (from the log's
/// last `gpu-pv counters:` line) against its weight's share of their weights (from
/// `config`); one problem per VM off by more than the tolerance.
pub fn check_gpu_shares(shares: &GpuShares, config: &str, log: &str) -> Vec<String> {
    let Ok(cfg) = boot_info::config::parse(config) else {
        return vec!["gpu_shares: the VM config does not parse".into()];
    };
    let Some((_, counters)) = crate::counters::parse_log(log).counters else {
        return vec!["gpu_shares: no `gpu-pv counters:` line in the log".into()];
    };
    let used = |vm: usize| {
        counters["vms"]
            .as_array()?
            .iter()
            .find(|v| v["vm"].as_u64() == Some(vm as u64))?["used_ns"]
            .as_u64()
    };
    let mut rows = Vec::new();
    for &vm in &shares.vms {
        let (Some(c), Some(u)) = (cfg.vm.get(vm), used(vm)) else {
            return vec![format!(
                "gpu_shares: no VM {vm} in the config or the counters"
            )];
        };
        rows.push((vm, f64::from(c.gpu_weight.max(1)), u as f64));
    }
    let total_w: f64 = rows.iter().map(|r| r.1).sum();
    let total_u: f64 = rows.iter().map(|r| r.2).sum();
    if total_u <= 0.0 {
        return vec!["gpu_shares: the listed VMs used no GPU time".into()];
    }
    rows.iter()
        .filter_map(|&(vm, w, u)| {
            let (want, got) = (w / total_w, u / total_u);
            let err = (got / want - 1.0).abs();
            (err > shares.tolerance).then(|| {
                format!(
                    "gpu_shares: VM {vm} had {:.1} % of the listed VMs' GPU time, its weight \
                     asks {:.1} % (off by {:.0} %, allowed {:.0} %)",
                    got * 100.0,
                    want * 100.0,
                    err * 100.0,
                    shares.tolerance * 100.0
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod share_tests {
    use super::*;

    const CONFIG: &str = "[[vm]]\nname=\"a\"\nmemory_mib=16\nimage=\"g.elf\"\n\
        [[vm]]\nname=\"b\"\nmemory_mib=16\nimage=\"g.elf\"\n\
        [[vm]]\nname=\"c\"\nmemory_mib=16\nimage=\"g.elf\"\ngpu_weight=2\n";

    fn log(used: [u64; 3]) -> String {
        let vms: Vec<String> = used
            .iter()
            .enumerate()
            .map(|(i, u)| format!("{{\"vm\":{i},\"used_ns\":{u}}}"))
            .collect();
        format!("x\ngpu-pv counters: {{\"vms\":[{}]}}\n", vms.join(","))
    }

    #[test]
    fn shares_are_checked_against_the_weights() {
        let s = |vms: &[usize]| GpuShares {
            vms: vms.to_vec(),
            tolerance: 0.15,
        };
        // 1:1:2 weights, 100:110:190 used: within 15 %.
        assert!(check_gpu_shares(&s(&[0, 1, 2]), CONFIG, &log([100, 110, 190])).is_empty());
        // Equal use against 1:1:2 weights: VM 0 and 1 get 33 % where 25 % is asked.
        let p = check_gpu_shares(&s(&[0, 1, 2]), CONFIG, &log([100, 100, 100]));
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with("gpu_shares: VM 0 had 33.3 %"), "{p:?}");
        // A subset: VMs 0 and 1 alone, equal weights.
        assert!(check_gpu_shares(&s(&[0, 1]), CONFIG, &log([100, 112, 0])).is_empty());
        assert_eq!(
            check_gpu_shares(&s(&[0, 1]), CONFIG, &log([100, 150, 0])).len(),
            2
        );
        // No counters, an unknown VM.
        assert_eq!(check_gpu_shares(&s(&[0]), CONFIG, "nothing").len(), 1);
        assert!(check_gpu_shares(&s(&[5]), CONFIG, &log([1, 1, 1]))[0].contains("no VM 5"));
    }
}
