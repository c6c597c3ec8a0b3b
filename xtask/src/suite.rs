//! Running scenarios in an emulator, the image boot check and the fuzz smoke run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::artifacts::Artifacts;
use crate::judge;
use crate::process::{self, Outcome, Watch};
use crate::scenario::{self, BootFrom, Emulator, Scenario};
use crate::{
    bochs, counters, esp, gpt, linux, linuxbench, qemu, run_checked, screendump, show_command,
    tools, typist, Context, Paths, Result,
};

/// Serial log lines shown for a failing scenario.
const TAIL_LINES: usize = 40;

/// The scenario directory: `$XTASK_SCENARIOS` or `tests/scenarios`.
pub fn scenario_dir(paths: &Paths) -> PathBuf {
    match std::env::var_os("XTASK_SCENARIOS") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => paths.root.join("tests").join("scenarios"),
    }
}

/// What one scenario run produced.
struct Report {
    problems: Vec<String>,
    serial_log: PathBuf,
    other_logs: Vec<PathBuf>,
    outcome: Option<Outcome>,
    /// Shown under the PASS/FAIL line whatever the result (files written).
    notes: Vec<String>,
    /// The serial lines timestamped as they came (scenarios with `[native]`).
    stamps: linuxbench::Stamped,
}

/// How one scenario run went.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// It passed.
    pub passed: bool,
    /// Wall-clock seconds, building the ESP included.
    pub secs: f64,
    /// Its serial log (absent if the harness failed before the run).
    pub serial_log: Option<PathBuf>,
    /// Its serial lines timestamped as they came (QEMU runs of scenarios with
    /// `[native]`; else empty).
    pub stamps: linuxbench::Stamped,
}

/// Runs scenario `s` in `emu` and prints its `PASS|FAIL` line, and why it failed.
/// `None` when interrupted. A scenario with `hv_features` needs its hypervisor
/// obtained first ([`Artifacts::prepare_features`]).
pub fn run_and_print(
    paths: &Paths,
    art: &Artifacts,
    emu: Emulator,
    s: &Scenario,
) -> Option<RunResult> {
    let t = Instant::now();
    let report = match emu {
        Emulator::Qemu => run_qemu(paths, art, s),
        Emulator::Bochs => run_bochs(paths, art, s),
    };
    let secs = t.elapsed().as_secs_f64();
    if process::interrupted() {
        return None;
    }
    let line = |verdict: &str| {
        println!(
            "{verdict} {:<24} [{emu}] {secs:6.1}s  {}",
            s.name, s.description
        )
    };
    match report {
        Ok(r) => {
            let passed = r.problems.is_empty();
            line(if passed { "PASS" } else { "FAIL" });
            for n in &r.notes {
                println!("    {n}");
            }
            if !passed {
                print_failure(paths, emu, &r);
            }
            Some(RunResult {
                passed,
                secs,
                serial_log: Some(r.serial_log),
                stamps: r.stamps,
            })
        }
        Err(e) => {
            line("FAIL");
            println!("    harness error: {e}");
            Some(RunResult {
                passed: false,
                secs,
                serial_log: None,
                stamps: Vec::new(),
            })
        }
    }
}

/// Runs the scenarios for `emu` (names containing `filter`); true when all pass.
/// First obtains the hypervisors with the `hv_features` the selected scenarios ask
/// for (each feature set once, kept in `art` for later suites).
pub fn run_suite(
    paths: &Paths,
    art: &mut Artifacts,
    emu: Emulator,
    filter: Option<&str>,
) -> Result<bool> {
    let dir = scenario_dir(paths);
    let all = scenario::load_dir(&dir)?;
    let selected: Vec<&Scenario> = all
        .iter()
        .filter(|s| s.emulators.contains(&emu))
        .filter(|s| filter.is_none_or(|f| s.name.contains(f)))
        // A scenario kept out of the full suites runs when a filter names it.
        .filter(|s| s.only_when_named.is_none() || filter.is_some())
        .collect();
    let skipped: Vec<&Scenario> = all
        .iter()
        .filter(|s| s.emulators.contains(&emu) && s.only_when_named.is_some() && filter.is_none())
        .collect();
    for s in &skipped {
        println!(
            "{emu}-test: {} left out of the full suite (run it by name): {}",
            s.name,
            s.only_when_named.as_deref().unwrap_or_default()
        );
    }
    let label = format!("{emu}-test");
    if selected.is_empty() {
        if let Some(f) = filter {
            return Err(format!(
                "{label}: no {emu} scenario in {} matches {f:?}",
                dir.display()
            ));
        }
        println!("{label}: no {emu} scenarios in {}", dir.display());
        println!("{label}: 0 passed, 0 failed");
        return Ok(true);
    }
    tools::ensure(match emu {
        Emulator::Qemu => tools::QEMU_TOOLS,
        Emulator::Bochs => tools::BOCHS_TOOLS,
    })?;
    art.prepare_features(paths, selected.iter().copied())?;
    fs::create_dir_all(paths.logs_dir()).ctx(|| "cannot create the log directory".to_string())?;
    println!(
        "{label}: {} scenario(s) from {}",
        selected.len(),
        paths.show(&dir)
    );
    let started = Instant::now();
    let (mut passed, mut failed) = (0, 0);
    let mut failed_names = Vec::new();
    let mut times: Vec<(&str, f64)> = Vec::new();
    let n = selected.len();
    for (k, s) in selected.iter().enumerate() {
        if process::interrupted() {
            break;
        }
        eprintln!(
            "{label} [{}/{n}, {:.0}s so far]: {}",
            k + 1,
            started.elapsed().as_secs_f64(),
            s.name
        );
        let Some(r) = run_and_print(paths, art, emu, s) else {
            break;
        };
        times.push((&s.name, r.secs));
        if r.passed {
            passed += 1;
        } else {
            failed += 1;
            failed_names.push(s.name.clone());
        }
    }
    if process::interrupted() {
        return Err(format!("{label}: interrupted"));
    }
    println!(
        "{label}: {} scenario(s) in {:.1}s{}",
        passed + failed,
        started.elapsed().as_secs_f64(),
        if failed_names.is_empty() {
            String::new()
        } else {
            format!("; failed: {}", failed_names.join(", "))
        }
    );
    println!("{label}: {passed} passed, {failed} failed");
    times.sort_by(|a, b| b.1.total_cmp(&a.1));
    let slowest: Vec<String> = times
        .iter()
        .take(5)
        .map(|(name, secs)| format!("{name} {secs:.1}s"))
        .collect();
    println!("{label}: slowest: {}", slowest.join(", "));
    Ok(failed == 0)
}

fn print_failure(paths: &Paths, emu: Emulator, r: &Report) {
    for p in &r.problems {
        println!("    - {p}");
    }
    let log = fs::read(&r.serial_log).unwrap_or_default();
    let log = String::from_utf8_lossy(&log);
    println!("    --- last {TAIL_LINES} lines of the serial log ---");
    for line in judge::tail(&log, TAIL_LINES) {
        println!("    | {line}");
    }
    println!("    --- full serial log: {}", paths.show(&r.serial_log));
    for other in &r.other_logs {
        let text = fs::read(other).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let notable = notable_emulator_lines(emu, &text);
        if !notable.is_empty() {
            println!("    --- from {} ---", paths.show(other));
            for l in notable {
                println!("    | {l}");
            }
        }
        println!("    --- emulator log: {}", paths.show(other));
    }
    if let Some(o) = &r.outcome {
        if matches!(o, Outcome::TimedOut) {
            println!("    (the emulator was killed at the scenario's timeout)");
        }
    }
}

/// Bochs exits with 1 for the fail protocol and for panics (triple fault, bad state)
/// alike, and with 0 for a magic break: tell them apart from Bochs's own log.
fn bochs_exit_cause(outcome: &Outcome, emu_log: &str, console: &str) -> Option<String> {
    match outcome {
        Outcome::Exited(judge::BOCHS_FAIL) => {
            let panic = emu_log
                .lines()
                .find(|l| l.contains(">>PANIC<<") && !l.contains(BOCHS_SHUTDOWN));
            match panic {
                Some(p) => Some(format!(
                    "bochs stopped on a panic, not the fail port: {}",
                    p.trim()
                )),
                None if !emu_log.contains(BOCHS_SHUTDOWN) => {
                    Some("bochs exited with 1 without a \"Shutdown\" write to port 0x8900".into())
                }
                None => None,
            }
        }
        Outcome::Exited(judge::BOCHS_PASS) if !console.contains("Magic breakpoint") => {
            Some("bochs exited with 0 without a magic breakpoint (xchg bx,bx)".into())
        }
        _ => None,
    }
}

/// What Bochs logs for "Shutdown" written to port 0x8900.
const BOCHS_SHUTDOWN: &str = "Shutdown port: shutdown requested";

/// Bochs errors OVMF always causes; not worth showing.
const BOCHS_BENIGN: &[&str] = &[
    "RDMSR: Unknown register 0x17",
    "write to control register 0x0d ignored",
    "read from non existent offset",
];

/// Emulator messages worth showing with a failure: QEMU's stderr (all of it, up to 20
/// lines), Bochs's errors and panics (level `e`/`p`, last 15).
fn notable_emulator_lines(emu: Emulator, text: &str) -> Vec<String> {
    let clean = judge::sanitize(text);
    let lines: Vec<&str> = match emu {
        Emulator::Qemu => clean.lines().filter(|l| !l.trim().is_empty()).collect(),
        Emulator::Bochs => clean
            .lines()
            .filter(|l| {
                let rest = l.trim_start_matches(|c: char| c.is_ascii_digit());
                rest.len() < l.len()
                    && (rest.starts_with('e') || rest.starts_with('p'))
                    && !BOCHS_BENIGN.iter().any(|b| l.contains(b))
            })
            .collect(),
    };
    let n = if emu == Emulator::Qemu { 20 } else { 15 };
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Reads the serial log and judges a finished run.
fn judge_run(
    paths: &Paths,
    s: &Scenario,
    emu: Emulator,
    outcome: &Outcome,
    serial_log: &Path,
) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(p) = judge::check_exit(emu, s.expect_exit, outcome) {
        problems.push(p);
    }
    let log = fs::read(serial_log).unwrap_or_default();
    let log = String::from_utf8_lossy(&log);
    if log.is_empty() {
        problems.push("the serial log is empty".into());
    }
    problems.extend(judge::check_log(
        &log,
        &s.expect,
        &s.expect_unordered,
        &s.forbid,
    ));
    if let Some(shares) = &s.gpu_shares {
        match s.config_text(&paths.root) {
            Ok(config) => problems.extend(judge::check_gpu_shares(shares, &config, &log)),
            Err(e) => problems.push(e),
        }
    }
    problems
}

fn run_qemu(paths: &Paths, art: &Artifacts, s: &Scenario) -> Result<Report> {
    let config = s.config_text(&paths.root)?;
    let esp_dir = paths.esp_dir(&s.name);
    esp::make(
        &esp_dir,
        &art.for_scenario(s)?,
        &config,
        &s.harness_cmdline(),
    )?;
    linux::add_to_esp(paths, &esp_dir, &config)?;
    let disk = match s.boot_from {
        BootFrom::Dir => qemu::Disk::Dir(esp_dir.clone()),
        BootFrom::Image => {
            tools::ensure(&[tools::Tool::Mtools])?;
            let img = paths.work_dir(&s.name).join("disk.img");
            gpt::write_image(&esp_dir, &img)?;
            qemu::Disk::Image(img)
        }
    };
    let logs = paths.logs_dir();
    let serial_log = logs.join(format!("{}-qemu.log", s.name));
    let console = logs.join(format!("{}-qemu.console.log", s.name));
    let _ = fs::remove_file(&serial_log);
    let qmp = if s.screendump.is_empty() {
        None
    } else {
        let sock = screendump::socket_path(&paths.work_dir_ensure(&s.name)?, &s.name);
        let _ = fs::remove_file(&sock);
        Some(sock)
    };
    let serial_sock = paths.work_dir_ensure(&s.name)?.join("serial.sock");
    let _ = fs::remove_file(&serial_sock);
    let serial = if s.input.is_empty() {
        qemu::Serial::File(serial_log.clone())
    } else {
        qemu::Serial::SocketLogged {
            log: serial_log.clone(),
            socket: serial_sock.clone(),
        }
    };
    let mut typist =
        (!s.input.is_empty()).then(|| typist::Typist::new(&serial_sock, &serial_log, &s.input));
    let opts = qemu::Opts {
        smp: s.qemu_smp(),
        memory_mib: s.memory(&config),
        disk,
        serial,
        display: false,
        kvm: false,
        qmp: qmp.clone(),
        extra: s.qemu_args.clone(),
    };
    let mut cmd = qemu::command(&opts)?;
    let out = fs::File::create(&console).ctx(|| format!("cannot create {}", console.display()))?;
    let err = out
        .try_clone()
        .ctx(|| "cannot duplicate a file handle".to_string())?;
    fs::write(
        paths.work_dir_ensure(&s.name)?.join("qemu-command.txt"),
        show_command(&cmd) + "\n",
    )
    .ctx(|| "cannot write the QEMU command".to_string())?;
    cmd.stdout(out).stderr(err);
    let mut shots = qmp
        .clone()
        .map(|sock| screendump::Session::new(paths, s, sock, serial_log.clone()));
    let mut stamper = s
        .native
        .is_some()
        .then(|| linuxbench::Stamper::new(&serial_log));
    let outcome = process::run_watched(
        &mut cmd,
        Duration::from_secs(s.qemu_timeout_secs()),
        &mut |elapsed| {
            if let Some(st) = stamper.as_mut() {
                st.poll();
            }
            if let Some(sh) = shots.as_mut() {
                sh.poll(elapsed);
            }
            if let Some(t) = typist.as_mut() {
                t.poll();
            }
            Watch::Continue
        },
    )?;
    let mut problems = judge_run(paths, s, Emulator::Qemu, &outcome, &serial_log);
    if let Some(t) = typist.take() {
        problems.extend(t.untyped());
        drop(t);
        let _ = fs::remove_file(&serial_sock);
    }
    if let Some(sh) = shots {
        problems.extend(sh.finish());
    }
    if let Some(sock) = &qmp {
        let _ = fs::remove_file(sock);
    }
    let mut notes = Vec::new();
    match counters::capture(&logs, &s.name, &serial_log) {
        Ok(w) => notes.extend(w.summary(paths)),
        Err(e) => notes.push(format!("counters: {e}")),
    }
    Ok(Report {
        problems,
        serial_log,
        other_logs: vec![console],
        outcome: Some(outcome),
        notes,
        stamps: stamper.map(linuxbench::Stamper::finish).unwrap_or_default(),
    })
}

fn run_bochs(paths: &Paths, art: &Artifacts, s: &Scenario) -> Result<Report> {
    let config = s.config_text(&paths.root)?;
    let esp_dir = paths.esp_dir(&s.name);
    esp::make(
        &esp_dir,
        &art.for_scenario(s)?,
        &config,
        &s.harness_cmdline(),
    )?;
    linux::add_to_esp(paths, &esp_dir, &config)?;
    let work = paths.work_dir_ensure(&s.name)?;
    let iso = bochs::make_iso(&esp_dir, &work)?;
    let logs = paths.logs_dir();
    let serial_log = logs.join(format!("{}-bochs.log", s.name));
    let bochs_log = logs.join(format!("{}-bochs.emu.log", s.name));
    let console = logs.join(format!("{}-bochs.console.log", s.name));
    for f in [&serial_log, &bochs_log] {
        let _ = fs::remove_file(f);
    }
    let opts = bochs::Opts {
        cpus: s.bochs_cpus(),
        memory_mib: s.memory(&config),
        iso,
        serial_log: serial_log.clone(),
        bochs_log: bochs_log.clone(),
    };
    let mut cmd = bochs::command(&opts, &work, &console)?;
    let outcome =
        process::run_with_timeout(&mut cmd, Duration::from_secs(s.bochs_timeout_secs()), None)?;
    let mut problems = judge_run(paths, s, Emulator::Bochs, &outcome, &serial_log);
    let emu_log = String::from_utf8_lossy(&fs::read(&bochs_log).unwrap_or_default()).into_owned();
    let console_text =
        String::from_utf8_lossy(&fs::read(&console).unwrap_or_default()).into_owned();
    problems.extend(bochs_exit_cause(&outcome, &emu_log, &console_text));
    Ok(Report {
        problems,
        serial_log,
        other_logs: vec![bochs_log, console],
        outcome: Some(outcome),
        notes: Vec::new(),
        stamps: Vec::new(),
    })
}

/// Boots the disk image `img` in QEMU and waits for `marker` on the serial port (or a
/// pass through isa-debug-exit). True when seen.
pub fn check_image(paths: &Paths, img: &Path, marker: &str) -> Result<bool> {
    let logs = paths.logs_dir();
    fs::create_dir_all(&logs).ctx(|| "cannot create the log directory".to_string())?;
    let serial_log = logs.join("image-check-qemu.log");
    let _ = fs::remove_file(&serial_log);
    let opts = qemu::Opts {
        smp: scenario::DEFAULT_SMP,
        memory_mib: scenario::DEFAULT_MEMORY_MIB,
        disk: qemu::Disk::Image(img.to_path_buf()),
        serial: qemu::Serial::File(serial_log.clone()),
        display: false,
        kvm: false,
        qmp: None,
        extra: Vec::new(),
    };
    let mut cmd = qemu::command(&opts)?;
    let console = logs.join("image-check-qemu.console.log");
    let out = fs::File::create(&console).ctx(|| format!("cannot create {}", console.display()))?;
    let err = out
        .try_clone()
        .ctx(|| "cannot duplicate a file handle".to_string())?;
    cmd.stdout(out).stderr(err);
    eprintln!("+ {}", show_command(&cmd));
    let t = Instant::now();
    let outcome = process::run_with_timeout(
        &mut cmd,
        Duration::from_secs(scenario::DEFAULT_TIMEOUT_SECS * 2),
        Some((&serial_log, marker)),
    )?;
    let log = String::from_utf8_lossy(&fs::read(&serial_log).unwrap_or_default()).into_owned();
    let ok = log.contains(marker)
        && matches!(
            outcome,
            Outcome::MarkerSeen | Outcome::Exited(judge::QEMU_PASS)
        );
    let secs = t.elapsed().as_secs_f64();
    if ok {
        println!("image check: PASS in {secs:.1}s ({marker:?} seen on the serial port)");
    } else {
        println!(
            "image check: FAIL in {secs:.1}s: {marker:?} not seen; QEMU {}",
            judge::describe_exit(Emulator::Qemu, &outcome)
        );
        for line in judge::tail(&log, TAIL_LINES) {
            println!("    | {line}");
        }
        println!("    --- full serial log: {}", paths.show(&serial_log));
    }
    Ok(ok)
}

/// The crates with cargo-fuzz targets: every top-level directory holding `fuzz/Cargo.toml`
/// (sorted, so runs are in a stable order).
fn fuzz_crates(paths: &Paths) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(&paths.root)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|d| d.join("fuzz").join("Cargo.toml").is_file())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// The fuzz smoke run: every target of every crate's `fuzz/` for `secs` seconds.
pub fn fuzz_smoke(paths: &Paths, secs: u64) -> Result<()> {
    let crates = fuzz_crates(paths);
    if crates.is_empty() {
        println!("fuzz: no <crate>/fuzz/Cargo.toml; nothing to fuzz");
        return Ok(());
    }
    // `cargo` from PATH is rustup's proxy, which understands `+toolchain`.
    let fuzz_ok = Command::new("cargo")
        .args(["fuzz", "--version"])
        .current_dir(&paths.root)
        .output()
        .is_ok_and(|o| o.status.success());
    if !fuzz_ok {
        run_checked(
            Command::new("cargo")
                .args(["install", "cargo-fuzz", "--locked"])
                .current_dir(&paths.root),
        )?;
    }
    let nightly = ensure_nightly();
    let (mut passed, mut failed) = (0, 0);
    for crate_dir in &crates {
        let (p, f) = fuzz_crate(paths, crate_dir, nightly, secs)?;
        passed += p;
        failed += f;
    }
    println!("fuzz: {passed} passed, {failed} failed");
    if failed > 0 {
        return Err(format!("{failed} fuzz target(s) failed"));
    }
    Ok(())
}

/// Runs every target of `crate_dir/fuzz` for `secs` seconds: (passed, failed).
fn fuzz_crate(paths: &Paths, crate_dir: &Path, nightly: bool, secs: u64) -> Result<(u32, u32)> {
    let name = crate_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let fuzz_cmd = || {
        let mut c = Command::new("cargo");
        if nightly {
            c.arg("+nightly");
        } else {
            // The pinned stable toolchain ships the sanitizer runtimes; let it take the
            // unstable flags cargo-fuzz passes.
            c.env("RUSTC_BOOTSTRAP", "1");
        }
        c.arg("fuzz").current_dir(crate_dir);
        c
    };
    let out = fuzz_cmd()
        .arg("list")
        .output()
        .ctx(|| "cannot run `cargo fuzz list`".to_string())?;
    if !out.status.success() {
        return Err(format!(
            "`cargo fuzz list` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let targets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    println!(
        "fuzz: {name}: {} target(s), {secs} s each: {}",
        targets.len(),
        targets.join(", ")
    );
    let (mut passed, mut failed) = (0, 0);
    for t in &targets {
        if process::interrupted() {
            return Err("interrupted".into());
        }
        let started = Instant::now();
        let log = paths.logs_dir().join(format!("fuzz-{name}-{t}.log"));
        let r = run_logged(
            fuzz_cmd()
                .args(["run", t, "--"])
                .arg(format!("-max_total_time={secs}"))
                .arg("-rss_limit_mb=2048"),
            &log,
        );
        let took = started.elapsed().as_secs_f64();
        match r {
            Ok(()) => {
                passed += 1;
                println!(
                    "PASS fuzz {t:<20} {took:6.1}s (build + run; log {})",
                    paths.show(&log)
                );
            }
            Err(e) => {
                failed += 1;
                println!("FAIL fuzz {t:<20} {took:6.1}s: {e}");
                let text =
                    String::from_utf8_lossy(&fs::read(&log).unwrap_or_default()).into_owned();
                for line in judge::tail(&text, TAIL_LINES) {
                    println!("    | {line}");
                }
                println!(
                    "    --- full log: {}; crash inputs: {name}/fuzz/artifacts/{t}/",
                    paths.show(&log)
                );
            }
        }
    }
    Ok((passed, failed))
}

/// Runs `cmd` with stdout and stderr into `log`; fails unless it exits with 0.
fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let shown = show_command(cmd);
    println!("+ {shown} > {}", log.display());
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir).ctx(|| format!("cannot create {}", dir.display()))?;
    }
    let out = fs::File::create(log).ctx(|| format!("cannot create {}", log.display()))?;
    let err = out
        .try_clone()
        .ctx(|| "cannot duplicate a file handle".to_string())?;
    let status = cmd
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .ctx(|| format!("cannot start `{shown}`"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{shown}` failed ({status})"))
    }
}

/// True when a nightly toolchain is available (installing it if needed and possible).
fn ensure_nightly() -> bool {
    let have = || {
        Command::new("rustup")
            .args(["run", "nightly", "rustc", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if have() {
        return true;
    }
    let installed = run_checked(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
    ]));
    if installed.is_ok() && have() {
        return true;
    }
    eprintln!("xtask: warning: no nightly toolchain; fuzzing with the pinned toolchain and RUSTC_BOOTSTRAP=1");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bochs_causes() {
        let shutdown = "00678791916p[UNMAP ] >>PANIC<< Shutdown port: shutdown requested\n";
        let triple =
            "00678769390p[CPU0  ] >>PANIC<< exception(): 3rd (13) exception with no resolution\n";
        assert_eq!(bochs_exit_cause(&Outcome::Exited(1), shutdown, ""), None);
        assert!(bochs_exit_cause(&Outcome::Exited(1), triple, "")
            .unwrap()
            .contains("3rd (13)"));
        assert!(bochs_exit_cause(&Outcome::Exited(1), "", "").is_some());
        assert_eq!(
            bochs_exit_cause(&Outcome::Exited(0), "", "(0) Magic breakpoint\n"),
            None
        );
        assert!(bochs_exit_cause(&Outcome::Exited(0), "", "").is_some());
        let lines = notable_emulator_lines(
            Emulator::Bochs,
            "00450922360e[CPU0  ] RDMSR: Unknown register 0x17\n00000000000i[CPU0 ] x\n00678769390e[CPU0  ] VMFAIL: VMCS invalid host TR selector\n",
        );
        assert_eq!(
            lines,
            vec!["00678769390e[CPU0  ] VMFAIL: VMCS invalid host TR selector"]
        );
    }
}
