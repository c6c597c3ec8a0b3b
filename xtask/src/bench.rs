//! `cargo xtask bench`: the benchmark scenarios of `tests/bench/` (the scenario format)
//! with their `bench:` lines and run times as a table, then gpu-pv's criterion bench.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use crate::scenario::{self, Emulator};
use crate::{artifacts, cargo, judge, linuxbench, process, run_checked, suite, tools};
use crate::{BuildMode, Context};
use crate::{Paths, Result};

/// The benchmark scenario directory: `$XTASK_BENCH_SCENARIOS` or `tests/bench`.
pub fn bench_dir(paths: &Paths) -> PathBuf {
    match std::env::var_os("XTASK_BENCH_SCENARIOS") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => paths.root.join("tests").join("bench"),
    }
}

/// One row of the results table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Scenario name (or `criterion`).
    pub scenario: String,
    /// `qemu`, `bochs` or `-`.
    pub emulator: String,
    /// Who printed the line: `hv`, a VM name (from a `[name] ` prefix) or `-`.
    pub source: String,
    /// What was measured.
    pub metric: String,
    /// The value (may be empty).
    pub value: String,
}

/// The `bench:` lines of a serial log as (source, metric, value). A line counts when
/// it starts with `bench:` after any `[...] ` prefixes: a guest's console line
/// (`[vm0] bench: ...`, source `vm0`) or a hypervisor log line (`[ INFO cpu0] bench:
/// ...`, source `hv`). The rest is split at its first `:` or `=` into metric and value.
pub fn bench_lines(log: &str) -> Vec<(String, String, String)> {
    let clean = judge::sanitize(log);
    let mut out = Vec::new();
    for line in clean.lines() {
        let mut rest = line.trim();
        let mut source = "hv".to_string();
        while let Some((tag, after)) = rest.strip_prefix('[').and_then(|r| r.split_once(']')) {
            if !tag.trim().contains(char::is_whitespace) && !tag.trim().is_empty() {
                source = tag.trim().to_string();
            }
            rest = after.trim_start();
        }
        let Some(body) = rest.strip_prefix("bench:") else {
            continue;
        };
        let body = body.trim();
        let (metric, value) = match body.find([':', '=']) {
            Some(i) => (body[..i].trim(), body[i + 1..].trim()),
            None => (body, ""),
        };
        out.push((source, metric.to_string(), value.to_string()));
    }
    out
}

/// Renders rows as an aligned text table with a header.
pub fn table(rows: &[Row]) -> String {
    let header = ["scenario", "emu", "source", "metric", "value"];
    let cells: Vec<[&str; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.as_str(),
                r.emulator.as_str(),
                r.source.as_str(),
                r.metric.as_str(),
                r.value.as_str(),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let fmt_row = |c: [&str; 5]| {
        let mut line = String::new();
        for (i, (s, w)) in c.iter().zip(width).enumerate() {
            if i + 1 == c.len() {
                line.push_str(s);
            } else {
                line.push_str(&format!("{s:<w$}  "));
            }
        }
        line.trim_end().to_string() + "\n"
    };
    let mut out = fmt_row(header);
    out.push_str(&fmt_row(width.map(|w| {
        &"------------------------------------------------"[..w.min(48)]
    })));
    for c in cells {
        out.push_str(&fmt_row(c));
    }
    out
}

/// `cargo xtask bench [FILTER] [--no-criterion] [--no-scenarios]` (`mode`: how the
/// artifacts are obtained, from `opts.build`).
pub fn cmd_bench(
    paths: &Paths,
    mode: &BuildMode,
    opts: &crate::cli::BenchOpts,
) -> Result<ExitCode> {
    let (criterion, scenarios, filter) = (opts.criterion, opts.scenarios, &opts.filter);
    process::install_interrupt_handler();
    let dir = bench_dir(paths);
    let all = if scenarios && dir.is_dir() {
        scenario::load_dir(&dir)?
    } else {
        Vec::new()
    };
    let selected: Vec<_> = all
        .iter()
        .filter(|s| filter.as_deref().is_none_or(|f| s.name.contains(f)))
        .collect();
    if let (Some(f), true) = (&filter, selected.is_empty()) {
        return Err(format!(
            "bench: no scenario in {} matches {f:?}",
            dir.display()
        ));
    }
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    if selected.is_empty() {
        if scenarios {
            println!("bench: no benchmark scenarios in {}", paths.show(&dir));
        }
    } else {
        let emus: Vec<Emulator> = [Emulator::Qemu, Emulator::Bochs]
            .into_iter()
            .filter(|e| selected.iter().any(|s| s.emulators.contains(e)))
            .collect();
        for e in &emus {
            tools::ensure(match e {
                Emulator::Qemu => tools::QEMU_TOOLS,
                Emulator::Bochs => tools::BOCHS_TOOLS,
            })?;
        }
        let mut art = artifacts::obtain(paths, mode)?;
        art.prepare_features(paths, selected.iter().copied())?;
        fs::create_dir_all(paths.logs_dir()).ctx(|| "cannot create the log directory".into())?;
        println!(
            "bench: {} scenario(s) from {}",
            selected.len(),
            paths.show(&dir)
        );
        for s in &selected {
            if let Some(n) = &s.native {
                match compare_native(paths, &art, s, n, &mut rows, &mut failed)? {
                    true => continue,
                    false => return Err("bench: interrupted".into()),
                }
            }
            for &emu in &s.emulators {
                let Some(r) = suite::run_and_print(paths, &art, emu, s) else {
                    return Err("bench: interrupted".into());
                };
                let verdict = if r.passed { "PASS" } else { "FAIL" };
                if !r.passed {
                    failed.push(format!("{} [{emu}]", s.name));
                }
                rows.push(Row {
                    scenario: s.name.clone(),
                    emulator: emu.to_string(),
                    source: "-".into(),
                    metric: "run time".into(),
                    value: format!("{:.1} s ({verdict})", r.secs),
                });
                let log = r
                    .serial_log
                    .map(|p| fs::read(p).unwrap_or_default())
                    .unwrap_or_default();
                for (source, metric, value) in bench_lines(&String::from_utf8_lossy(&log)) {
                    rows.push(Row {
                        scenario: s.name.clone(),
                        emulator: emu.to_string(),
                        source,
                        metric,
                        value,
                    });
                }
            }
        }
    }
    if criterion {
        match criterion_bench(&paths.root) {
            None => println!("bench: gpu-pv has no `mediator` bench; skipping criterion"),
            Some((ok, secs)) => {
                if !ok {
                    failed.push("criterion".into());
                }
                rows.push(Row {
                    scenario: "criterion".into(),
                    emulator: "-".into(),
                    source: "-".into(),
                    metric: "cargo bench -p gpu-pv --bench mediator".into(),
                    value: format!(
                        "{} in {secs:.1} s (results above and in target/criterion/)",
                        if ok { "ok" } else { "FAILED" }
                    ),
                });
            }
        }
    }
    if !rows.is_empty() {
        let text = table(&rows);
        let out = paths.logs_dir().join("bench.txt");
        let _ = fs::create_dir_all(paths.logs_dir());
        let saved = fs::write(&out, &text).is_ok();
        println!(
            "\nbench results{}:",
            if saved {
                format!(" (also in {})", paths.show(&out))
            } else {
                String::new()
            }
        );
        print!("{text}");
    }
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        println!("bench: failed: {}", failed.join(", "));
        Ok(ExitCode::FAILURE)
    }
}

/// A scenario with `[native]`: its Linux VM booted directly in QEMU and the scenario
/// itself, alternately, `runs` times each, then the comparison rows
/// ([`linuxbench::rows`]). False when interrupted.
fn compare_native(
    paths: &Paths,
    art: &artifacts::Artifacts,
    s: &scenario::Scenario,
    n: &scenario::Native,
    rows: &mut Vec<Row>,
    failed: &mut Vec<String>,
) -> Result<bool> {
    let (slot, _) = linuxbench::linux_vm(&s.config_text(&paths.root)?)?;
    let (mut natives, mut hvs) = (Vec::new(), Vec::new());
    let mut row = |source: &str, metric: String, value: String| {
        rows.push(Row {
            scenario: s.name.clone(),
            emulator: "qemu".into(),
            source: source.into(),
            metric,
            value,
        })
    };
    for k in 1..=n.runs {
        let nat = match linuxbench::run_native(paths, s, n, k) {
            Ok(r) => r,
            Err(e) => {
                println!("FAIL {:<24} [qemu, native #{k}] harness error: {e}", s.name);
                linuxbench::NativeRun {
                    passed: false,
                    secs: 0.0,
                    lines: Vec::new(),
                }
            }
        };
        if process::interrupted() {
            return Ok(false);
        }
        let verdict = if nat.passed { "PASS" } else { "FAIL" };
        if !nat.passed {
            failed.push(format!("{} [native #{k}]", s.name));
        }
        row(
            "native",
            format!("run time #{k}"),
            format!("{:.1} s ({verdict})", nat.secs),
        );
        natives.push(nat.passed.then(|| linuxbench::figures(&nat.lines, n, slot)));
        let Some(r) = suite::run_and_print(paths, art, Emulator::Qemu, s) else {
            return Ok(false);
        };
        let verdict = if r.passed { "PASS" } else { "FAIL" };
        if !r.passed {
            failed.push(format!("{} [qemu #{k}]", s.name));
        }
        row(
            "hv",
            format!("run time #{k}"),
            format!("{:.1} s ({verdict})", r.secs),
        );
        hvs.push(r.passed.then(|| linuxbench::figures(&r.stamps, n, slot)));
    }
    rows.extend(linuxbench::rows(&s.name, n, &natives, &hvs));
    Ok(true)
}

/// Runs gpu-pv's criterion bench if it exists: (succeeded, seconds), or `None`.
fn criterion_bench(root: &Path) -> Option<(bool, f64)> {
    let crate_dir = root.join("gpu-pv");
    let manifest = fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap_or_default();
    let declared = manifest.contains("name = \"mediator\"");
    if !crate_dir.join("benches").join("mediator.rs").is_file() && !declared {
        return None;
    }
    let t = Instant::now();
    let ok = run_checked(
        cargo()
            .current_dir(root)
            .args(["bench", "-p", "gpu-pv", "--bench", "mediator", "--"])
            .args(["--warm-up-time", "1", "--measurement-time", "3"]),
    );
    if let Err(e) = &ok {
        println!("bench: {e}");
    }
    Some((ok.is_ok(), t.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_line_extraction() {
        let log = "\x1b[0mBdsDxe: bench: not at the start\r\n\
                   bench: native fps: 412.5\r\n\
                   [vm0] bench: frames=200\n\
                   [vm1]   bench:  latency us = 35 (p50)\n\
                   [ INFO cpu0] bench: native fps = 1198.2\n\
                   [ WARN cpu1] [vm2] bench: nested: 1\n\
                   benchmark: no\n\
                   bench: lonely\n\
                   bench:\n";
        let v = bench_lines(log);
        let t = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
        assert_eq!(
            v,
            vec![
                t("hv", "native fps", "412.5"),
                t("vm0", "frames", "200"),
                t("vm1", "latency us", "35 (p50)"),
                t("hv", "native fps", "1198.2"),
                t("vm2", "nested", "1"),
                t("hv", "lonely", ""),
                t("hv", "", ""),
            ]
        );
    }

    #[test]
    fn table_alignment() {
        let r = |s: &str, m: &str, v: &str| Row {
            scenario: s.into(),
            emulator: "qemu".into(),
            source: "hv".into(),
            metric: m.into(),
            value: v.into(),
        };
        let t = table(&[
            r("gpu-share", "fps", "412"),
            r("x", "a longer metric", "1 s"),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "scenario   emu   source  metric           value");
        assert_eq!(lines[1], "---------  ----  ------  ---------------  -----");
        assert_eq!(lines[2], "gpu-share  qemu  hv      fps              412");
        assert_eq!(lines[3], "x          qemu  hv      a longer metric  1 s");
    }

    /// Every benchmark scenario in the repository parses.
    #[test]
    fn repository_bench_scenarios_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let dir = root.join("tests/bench");
        if dir.is_dir() {
            for s in scenario::load_dir(&dir).unwrap() {
                s.config_text(root).unwrap();
            }
        }
    }
}
