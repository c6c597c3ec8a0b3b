//! `cargo xtask`: the project's build, run and test driver.
//!
//! It builds the UEFI loader, the hypervisor and the guests for their bare-metal targets,
//! lays out an EFI system partition (ESP), boots it in QEMU or Bochs, and judges the test
//! scenarios under `tests/scenarios/` by exit status and serial output. See `USAGE` and
//! `tests/README.md`.

mod artifacts;
mod bench;
mod bochs;
mod counters;
mod esp;
mod gpt;
mod image;
mod initramfs;
mod judge;
#[cfg(test)]
mod layers;
mod linux;
mod linuxbench;
mod plot;
mod process;
mod qemu;
mod scenario;
mod screendump;
mod suite;
mod tools;
mod typist;
mod vmconfig;

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Errors are human-readable messages: xtask prints them and exits non-zero.
pub type Result<T, E = String> = std::result::Result<T, E>;

/// Adds a description of what was being done to an error.
pub trait Context<T> {
    /// Maps the error `e` to `"{what}: {e}"`.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| format!("{}: {e}", what()))
    }
}

/// Where things are: the repository root and the directories xtask writes to.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The workspace root (the directory holding the top-level `Cargo.toml`).
    pub root: PathBuf,
    /// Cargo's target directory (`CARGO_TARGET_DIR` or `<root>/target`).
    pub target: PathBuf,
    /// `<target>/xtask`: ESPs, images, logs and emulator work directories.
    pub xtask: PathBuf,
}

impl Paths {
    fn discover() -> Paths {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest.parent().unwrap_or(manifest).to_path_buf();
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(t) if !t.is_empty() => {
                let t = PathBuf::from(t);
                if t.is_absolute() {
                    t
                } else {
                    root.join(t)
                }
            }
            _ => root.join("target"),
        };
        let xtask = target.join("xtask");
        Paths {
            root,
            target,
            xtask,
        }
    }

    /// The directory of the per-run ESP called `name`.
    pub fn esp_dir(&self, name: &str) -> PathBuf {
        self.xtask.join("esp").join(name)
    }

    /// The directory holding serial and emulator logs.
    pub fn logs_dir(&self) -> PathBuf {
        self.xtask.join("logs")
    }

    /// The directory where emulator work files (images, bochsrc) of `name` go.
    pub fn work_dir(&self, name: &str) -> PathBuf {
        self.xtask.join("work").join(name)
    }

    /// [`Paths::work_dir`], created if needed.
    pub fn work_dir_ensure(&self, name: &str) -> Result<PathBuf> {
        let d = self.work_dir(name);
        std::fs::create_dir_all(&d).ctx(|| format!("cannot create {}", d.display()))?;
        Ok(d)
    }

    /// `path` relative to the repository root when it lies inside it (for messages).
    pub fn show(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }
}

/// The cargo to run: `$CARGO` (set by `cargo run`), else `cargo` from `PATH`.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Command::new(cargo)
}

/// Runs `cmd` in the foreground (inheriting stdio) and fails unless it exits with 0.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let shown = show_command(cmd);
    eprintln!("+ {shown}");
    let status = cmd.status().ctx(|| format!("cannot start `{shown}`"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{shown}` failed ({status})"))
    }
}

/// Runs `cmd` with its output captured; shows the output only when it fails.
pub fn run_quiet(cmd: &mut Command) -> Result<()> {
    let shown = show_command(cmd);
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .ctx(|| format!("cannot start `{shown}`"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "`{shown}` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// A shell-like rendering of a command line, for messages.
pub fn show_command(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
            format!("'{}'", a.replace('\'', r"'\''"))
        } else {
            a.into_owned()
        }
    }));
    parts.join(" ")
}

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  build                      build boot.efi, the hypervisor and the guest binaries (release)
  run [opts] [-- QEMU ARGS..]  build, lay out an ESP and boot it in QEMU (window if
                             $DISPLAY is set, else headless); serial on stdio (Ctrl-A X
                             quits; typing goes to the Linux VM's shell). Arguments after
                             `--` go to QEMU; any other unknown argument is refused
                             before anything is built.
      --config FILE          VM config for hv/vms.toml (default config/demo.toml: a
                             Linux VM and three drawing VMs)
      --cmdline STR          kernel command line for hv/cmdline.txt (default empty)
      --smp N, --memory MIB  CPUs (default 2) and memory (default: what the VMs need,
                             at least 512)
      --kvm                  use KVM (-accel kvm -cpu host) instead of TCG
      --screenshots DIR      every few seconds, write each GPU head to DIR/head<N>.png (QMP)
      --screenshot-secs N    the interval for --screenshots (default 3)
                             COM1 is also logged to target/xtask/logs/run-qemu.log; its
                             gpu-pv counters and samples become run-counters.json and
                             run-util.png there
  qemu-test [FILTER]         run the QEMU scenarios of tests/scenarios/ (names containing FILTER)
  bochs-test [FILTER]        run the Bochs scenarios of tests/scenarios/
  bench [FILTER]             run the benchmark scenarios of tests/bench/, print their
                             `bench:` lines and run times as a table, then
                             `cargo bench -p gpu-pv --bench mediator` (short settings)
      --no-criterion         skip the criterion bench
      --no-scenarios         only the criterion bench
  plot LOG [NAME]            from a serial log (e.g. of a bare-metal run), write
                             target/xtask/logs/NAME-counters.json, NAME-util.png and
                             NAME-util.csv (NAME defaults to the log's file stem)
  test                       cargo test, fuzz smoke run, qemu-test, bochs-test (stops at the
                             first failing stage)
      --no-unit --no-fuzz --no-qemu --no-bochs   skip a stage
      --fuzz-secs N          seconds per fuzz target (default 30, or $XTASK_FUZZ_SECS)
  check-config [--cmdline STR] FILE...   parse VM configs (and a hypervisor command line)
                             as the loader will (run, image and every scenario not about
                             a bad config do this before booting)
  image [opts]               write a bootable GPT disk image (FAT32 ESP) for bare-metal hosts
      --out FILE             default target/xtask/hypervisor.img
      --config FILE, --cmdline STR   as for run
      --check                boot the image in QEMU and wait for the hypervisor's boot marker
      --check-marker STR     the marker to wait for (default \"hv: boot summary\")

options of run, qemu-test, bochs-test, test, image, bench:
  --no-build                 do not run cargo; use the artifacts already in target/ (and the
                             hypervisors of `hv_features` scenarios in target/xtask/hv-features/)
  --prebuilt DIR             do not run cargo; use DIR/boot.efi, DIR/hypervisor[.elf] and
                             DIR/guests/*.elf (also $XTASK_PREBUILT); for testing the harness.
                             A scenario with hv_features = [\"a\", \"b\"] boots
                             DIR/hypervisor-a+b[.elf] (features sorted, joined by '+')

environment: XTASK_SCENARIOS (scenario directory, default tests/scenarios),
  XTASK_BENCH_SCENARIOS (default tests/bench), XTASK_PREBUILT, XTASK_FUZZ_SECS, CARGO,
  CARGO_TARGET_DIR.
";

/// How the bare-metal artifacts are obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildMode {
    /// Run cargo.
    Build,
    /// Use what is in `target/` already.
    NoBuild,
    /// Use the files of a directory.
    Prebuilt(PathBuf),
}

/// Pulls the options shared by several commands out of `args`.
fn take_build_mode(args: &mut Vec<String>) -> Result<BuildMode> {
    let mut mode = match std::env::var_os("XTASK_PREBUILT") {
        Some(d) if !d.is_empty() => BuildMode::Prebuilt(PathBuf::from(d)),
        _ => BuildMode::Build,
    };
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--no-build" => {
                args.remove(i);
                mode = BuildMode::NoBuild;
            }
            "--prebuilt" => {
                args.remove(i);
                if i >= args.len() {
                    return Err("--prebuilt needs a directory".into());
                }
                mode = BuildMode::Prebuilt(PathBuf::from(args.remove(i)));
            }
            "--" => break,
            _ => i += 1,
        }
    }
    Ok(mode)
}

/// Takes the value of option `name` at `args[i]`.
fn value(args: &[String], i: &mut usize, name: &str) -> Result<String> {
    *i += 1;
    args.get(*i)
        .cloned()
        .ok_or_else(|| format!("{name} needs a value"))
}

fn parse_num<T: std::str::FromStr>(s: &str, name: &str) -> Result<T> {
    s.parse()
        .map_err(|_| format!("{name}: `{s}` is not a valid number"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match real_main(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(mut args: Vec<String>) -> Result<ExitCode> {
    let paths = Paths::discover();
    if args.is_empty() {
        eprint!("{USAGE}");
        return Ok(ExitCode::from(2));
    }
    let cmd = args.remove(0);
    let mut args = split_equals(args);
    // `<cmd> --help` only prints that command's help (before a `--`, where QEMU's own
    // arguments may follow).
    let before_dashes = args.iter().take_while(|a| a.as_str() != "--");
    if before_dashes.clone().any(|a| a == "--help" || a == "-h") {
        if let Some(h) = command_help(&cmd) {
            print!("{h}");
            return Ok(ExitCode::SUCCESS);
        }
    }
    match cmd.as_str() {
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        "build" => {
            let art = artifacts::build(&paths)?;
            art.print(&paths);
            Ok(ExitCode::SUCCESS)
        }
        "run" => cmd_run(&paths, args),
        "qemu-test" | "bochs-test" => {
            let mode = take_build_mode(&mut args)?;
            let filter = single_filter(&args)?;
            let emu = if cmd == "qemu-test" {
                scenario::Emulator::Qemu
            } else {
                scenario::Emulator::Bochs
            };
            process::install_interrupt_handler();
            let mut art = artifacts::obtain(&paths, &mode)?;
            let ok = suite::run_suite(&paths, &mut art, emu, filter.as_deref())?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        "test" => cmd_test(&paths, args),
        "plot" => cmd_plot(&paths, &args),
        "bench" => {
            let mode = take_build_mode(&mut args)?;
            bench::cmd_bench(&paths, &mode, &args)
        }
        "image" => cmd_image(&paths, args),
        "check-config" => cmd_check_config(&args),
        other => Err(format!(
            "unknown command `{other}` (try `cargo xtask help`)"
        )),
    }
}

/// `--opt=value` as `--opt value`, up to a `--` (what follows it is QEMU's).
fn split_equals(args: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut rest = args.into_iter();
    for a in rest.by_ref() {
        if a == "--" {
            out.push(a);
            break;
        }
        match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") && k.len() > 2 => {
                out.push(k.to_string());
                out.push(v.to_string());
            }
            _ => out.push(a),
        }
    }
    out.extend(rest);
    out
}

/// The part of [`USAGE`] about `cmd` (its lines and its options, and the options
/// shared by several commands when they apply), or `None` for an unknown command.
fn command_help(cmd: &str) -> Option<String> {
    let lines: Vec<&str> = USAGE.lines().collect();
    let start = lines.iter().position(|l| {
        l.strip_prefix("  ")
            .and_then(|r| r.strip_prefix(cmd))
            .is_some_and(|r| r.is_empty() || r.starts_with(' '))
    })?;
    let mut out = format!("usage: cargo xtask {cmd} [options]\n\n{}\n", lines[start]);
    for l in &lines[start + 1..] {
        // The next command starts at two spaces; options and continuations go deeper.
        if l.is_empty() || !l.starts_with("   ") {
            break;
        }
        out.push_str(l);
        out.push('\n');
    }
    let shared = ["run", "qemu-test", "bochs-test", "test", "image", "bench"];
    if shared.contains(&cmd) {
        if let Some(i) = lines.iter().position(|l| l.starts_with("options of run,")) {
            out.push('\n');
            for l in lines[i..].iter().take_while(|l| !l.is_empty()) {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    Some(out)
}

fn single_filter(args: &[String]) -> Result<Option<String>> {
    match args {
        [] => Ok(None),
        [f] if !f.starts_with('-') => Ok(Some(f.clone())),
        _ => Err(format!(
            "unexpected arguments {args:?} (expected at most one FILTER)"
        )),
    }
}

/// Reads a VM config file (relative paths are taken from the current directory), or
/// `default` in the repository's `config/`.
fn read_config(root: &Path, file: Option<&str>, default: &str) -> Result<String> {
    let path = match file {
        Some(f) => PathBuf::from(f),
        None => root.join("config").join(default),
    };
    let text = std::fs::read_to_string(&path)
        .ctx(|| format!("cannot read VM config {}", path.display()))?;
    vmconfig::check(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text)
}

/// `check-config [--cmdline STR] FILE...`: each VM config (and the command line)
/// parsed as the loader will.
fn cmd_check_config(args: &[String]) -> Result<ExitCode> {
    let usage = "usage: cargo xtask check-config [--cmdline STR] FILE...";
    let mut files = Vec::new();
    let mut cmdline = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--cmdline" => cmdline = Some(value(args, &mut i, "--cmdline")?),
            a if a.starts_with('-') => return Err(usage.into()),
            f => files.push(f.to_string()),
        }
        i += 1;
    }
    if files.is_empty() && cmdline.is_none() {
        return Err(usage.into());
    }
    let mut ok = true;
    if let Some(c) = &cmdline {
        match boot_info::cmdline::check(c) {
            Ok(()) => println!("--cmdline: ok"),
            Err(e) => {
                println!("--cmdline: {e}");
                ok = false;
            }
        }
    }
    for f in &files {
        let text = std::fs::read_to_string(f).ctx(|| format!("cannot read VM config {f}"))?;
        match vmconfig::check(&text) {
            Ok(summary) => println!("{f}: ok: {summary}"),
            Err(e) => {
                println!("{f}: {e}");
                ok = false;
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn cmd_run(paths: &Paths, mut args: Vec<String>) -> Result<ExitCode> {
    let mode = take_build_mode(&mut args)?;
    let mut config = None;
    let mut cmdline = String::new();
    let mut smp = 2;
    let mut memory = None;
    let mut kvm = false;
    let mut screenshots: Option<PathBuf> = None;
    let mut screenshot_secs: f64 = 3.0;
    let mut i = 0;
    let mut extra = Vec::new();
    while i < args.len() {
        match args[i].as_str() {
            "--config" => config = Some(value(&args, &mut i, "--config")?),
            "--cmdline" => cmdline = value(&args, &mut i, "--cmdline")?,
            "--smp" => smp = parse_num(&value(&args, &mut i, "--smp")?, "--smp")?,
            "--memory" => memory = Some(parse_num(&value(&args, &mut i, "--memory")?, "--memory")?),
            "--kvm" => kvm = true,
            "--screenshots" => {
                screenshots = Some(PathBuf::from(value(&args, &mut i, "--screenshots")?))
            }
            "--screenshot-secs" => {
                screenshot_secs = parse_num(
                    &value(&args, &mut i, "--screenshot-secs")?,
                    "--screenshot-secs",
                )?;
                if !(screenshot_secs.is_finite() && screenshot_secs > 0.0) {
                    return Err("--screenshot-secs must be positive".into());
                }
            }
            "--" => {
                extra.extend_from_slice(&args[i + 1..]);
                break;
            }
            other => {
                return Err(format!(
                    "run: unknown argument `{other}` (QEMU's own arguments go after `--`)"
                ))
            }
        }
        i += 1;
    }
    boot_info::cmdline::check(&cmdline).map_err(|e| format!("run: --cmdline: {e}"))?;
    tools::ensure(&[tools::Tool::Qemu, tools::Tool::Ovmf])?;
    let config = read_config(&paths.root, config.as_deref(), "demo.toml")?;
    let art = artifacts::obtain(paths, &mode)?;
    let esp = paths.esp_dir("run");
    esp::make(&esp, &art, &config, &cmdline)?;
    linux::add_to_esp(paths, &esp, &config)?;
    let display = std::env::var_os("DISPLAY").is_some_and(|d| !d.is_empty());
    let logs = paths.logs_dir();
    std::fs::create_dir_all(&logs).ctx(|| "cannot create the log directory".to_string())?;
    let serial_log = logs.join("run-qemu.log");
    let _ = std::fs::remove_file(&serial_log);
    let screenshots = match screenshots {
        Some(d) => {
            let d = std::env::current_dir().map(|c| c.join(&d)).unwrap_or(d);
            std::fs::create_dir_all(&d).ctx(|| format!("cannot create {}", d.display()))?;
            let sock = screendump::socket_path(&paths.work_dir_ensure("run")?, "run");
            let _ = std::fs::remove_file(&sock);
            Some((d, sock))
        }
        None => None,
    };
    let opts = qemu::Opts {
        smp,
        memory_mib: memory.unwrap_or_else(|| vmconfig::machine_memory_mib(&config)),
        disk: qemu::Disk::Dir(esp),
        serial: qemu::Serial::StdioWithMonitorLogged(serial_log.clone()),
        display,
        kvm,
        qmp: screenshots.as_ref().map(|(_, sock)| sock.clone()),
        extra,
    };
    let mut cmd = qemu::command(&opts)?;
    eprintln!("+ {}", show_command(&cmd));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shooter = screenshots.clone().map(|(dir, sock)| {
        eprintln!(
            "xtask: screenshots of the first {} GPU heads every {screenshot_secs} s in {}/head<N>.png",
            qemu::SHOWN_HEADS,
            dir.display()
        );
        let stop = stop.clone();
        let every = std::time::Duration::from_secs_f64(screenshot_secs);
        std::thread::spawn(move || screendump::screenshot_loop(&sock, &dir, every, &stop))
    });
    let status = cmd.status();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(t) = shooter {
        let _ = t.join();
    }
    if let Some((_, sock)) = &screenshots {
        let _ = std::fs::remove_file(sock);
    }
    let status = status.ctx(|| "cannot start QEMU".to_string())?;
    match counters::capture(&logs, "run", &serial_log) {
        Ok(w) => {
            if let Some(s) = w.summary(paths) {
                eprintln!("xtask: {s}");
            }
        }
        Err(e) => eprintln!("xtask: counters: {e}"),
    }
    let code = status.code().unwrap_or(1);
    match code {
        qemu::PASS_STATUS => eprintln!("xtask: the software reported PASS through isa-debug-exit"),
        qemu::FAIL_STATUS => eprintln!("xtask: the software reported FAIL through isa-debug-exit"),
        _ => {}
    }
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn cmd_plot(paths: &Paths, args: &[String]) -> Result<ExitCode> {
    let (log, name) = match args {
        [log] => {
            let p = PathBuf::from(log);
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "log".into());
            (p, stem)
        }
        [log, name] => (PathBuf::from(log), name.clone()),
        _ => return Err("usage: cargo xtask plot LOG [NAME]".into()),
    };
    if !log.is_file() {
        return Err(format!("{}: no such file", log.display()));
    }
    let logs = paths.logs_dir();
    std::fs::create_dir_all(&logs).ctx(|| "cannot create the log directory".to_string())?;
    let w = counters::capture(&logs, &name, &log)?;
    match w.summary(paths) {
        Some(s) => println!("xtask: {s}"),
        None => {
            println!(
                "xtask: no `{}` or `{}` lines in {}",
                counters::SAMPLE_PREFIX.trim(),
                counters::COUNTERS_PREFIX.trim(),
                log.display()
            );
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_test(paths: &Paths, mut args: Vec<String>) -> Result<ExitCode> {
    let mode = take_build_mode(&mut args)?;
    let (mut unit, mut fuzz, mut qemu, mut bochs) = (true, true, true, true);
    let mut fuzz_secs: u64 = match std::env::var("XTASK_FUZZ_SECS") {
        Ok(s) if !s.is_empty() => parse_num(&s, "XTASK_FUZZ_SECS")?,
        _ => 30,
    };
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--no-unit" => unit = false,
            "--no-fuzz" => fuzz = false,
            "--no-qemu" => qemu = false,
            "--no-bochs" => bochs = false,
            "--fuzz-secs" => {
                fuzz_secs = parse_num(&value(&args, &mut i, "--fuzz-secs")?, "--fuzz-secs")?
            }
            other => return Err(format!("test: unknown option `{other}`")),
        }
        i += 1;
    }
    process::install_interrupt_handler();
    let total = [unit, fuzz, qemu, bochs].iter().filter(|&&on| on).count();
    let mut stages = Stages::new(total);
    if unit {
        stages.run("cargo test", || {
            run_checked(cargo().arg("test").current_dir(&paths.root))
                .map_err(|e| format!("stage `cargo test` failed: {e}"))
        })?;
    }
    if fuzz {
        stages.run("fuzz smoke run", || {
            suite::fuzz_smoke(paths, fuzz_secs).map_err(|e| format!("stage `fuzz` failed: {e}"))
        })?;
    }
    let mut art = None;
    if qemu {
        art = Some(stages.run("qemu-test", || {
            let mut a = artifacts::obtain(paths, &mode)?;
            if !suite::run_suite(paths, &mut a, scenario::Emulator::Qemu, None)? {
                return Err("stage `qemu-test` failed (see above)".into());
            }
            Ok(a)
        })?);
    }
    if bochs {
        stages.run("bochs-test", || {
            let mut a = match art.take() {
                Some(a) => a,
                None => artifacts::obtain(paths, &mode)?,
            };
            if !suite::run_suite(paths, &mut a, scenario::Emulator::Bochs, None)? {
                return Err("stage `bochs-test` failed (see above)".into());
            }
            Ok(())
        })?;
    }
    stages.report();
    Ok(ExitCode::SUCCESS)
}

/// The stages of `cargo xtask test`: each announced with its place and the time so
/// far, timed, and listed slowest first at the end.
struct Stages {
    total: usize,
    started: std::time::Instant,
    took: Vec<(&'static str, std::time::Duration)>,
}

impl Stages {
    fn new(total: usize) -> Self {
        Self {
            total,
            started: std::time::Instant::now(),
            took: Vec::new(),
        }
    }

    fn run<T>(&mut self, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        eprintln!(
            "\n==== xtask test: stage {name} [{}/{}], {:.0}s so far ====",
            self.took.len() + 1,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
        let t = std::time::Instant::now();
        let r = f();
        self.took.push((name, t.elapsed()));
        r
    }

    fn report(mut self) {
        eprintln!(
            "\nxtask test: all stages passed in {:.0?}",
            self.started.elapsed()
        );
        self.took.sort_by_key(|t| std::cmp::Reverse(t.1));
        eprintln!("xtask test: stages, slowest first:");
        for (name, d) in &self.took {
            eprintln!("    {:>7.1}s  {name}", d.as_secs_f64());
        }
    }
}

fn cmd_image(paths: &Paths, mut args: Vec<String>) -> Result<ExitCode> {
    let mode = take_build_mode(&mut args)?;
    let mut out = paths.xtask.join("hypervisor.img");
    let mut config = None;
    let mut cmdline = String::new();
    let mut check = false;
    let mut marker = String::from("hv: boot summary");
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--out" => out = PathBuf::from(value(&args, &mut i, "--out")?),
            "--config" => config = Some(value(&args, &mut i, "--config")?),
            "--cmdline" => cmdline = value(&args, &mut i, "--cmdline")?,
            "--check" => check = true,
            "--check-marker" => marker = value(&args, &mut i, "--check-marker")?,
            other => return Err(format!("image: unknown option `{other}`")),
        }
        i += 1;
    }
    boot_info::cmdline::check(&cmdline).map_err(|e| format!("image: --cmdline: {e}"))?;
    tools::ensure(&[tools::Tool::Mtools])?;
    let config = read_config(&paths.root, config.as_deref(), "vms.toml")?;
    let art = artifacts::obtain(paths, &mode)?;
    let esp = paths.esp_dir("image");
    esp::make(&esp, &art, &config, &cmdline)?;
    linux::add_to_esp(paths, &esp, &config)?;
    gpt::write_image(&esp, &out)?;
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!(
        "xtask: wrote {} ({} MiB); write it to a disk with `dd if={} of=/dev/sdX bs=4M conv=fsync`",
        out.display(),
        size >> 20,
        out.display()
    );
    if check {
        process::install_interrupt_handler();
        tools::ensure(&[tools::Tool::Qemu, tools::Tool::Ovmf])?;
        let ok = suite::check_image(paths, &out, &marker)?;
        if !ok {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_command_has_its_own_help() {
        let run = command_help("run").unwrap();
        assert!(
            run.contains("--config FILE") && run.contains("--screenshots"),
            "{run}"
        );
        assert!(run.contains("--no-build"), "{run}");
        assert!(!run.contains("qemu-test [FILTER]"), "{run}");
        let plot = command_help("plot").unwrap();
        assert!(
            plot.contains("plot LOG [NAME]") && !plot.contains("--no-build"),
            "{plot}"
        );
        let test = command_help("test").unwrap();
        assert!(test.contains("--fuzz-secs"), "{test}");
        assert!(command_help("check-config").unwrap().contains("FILE..."));
        assert_eq!(command_help("nope"), None);
        // A prefix of a command is not that command.
        assert_eq!(command_help("qemu"), None);
    }

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn equals_options_split_until_the_double_dash() {
        assert_eq!(
            split_equals(strings(&["--smp=4", "--cmdline", "a=b", "--", "-device=x"])),
            strings(&["--smp", "4", "--cmdline", "a=b", "--", "-device=x"])
        );
        assert_eq!(split_equals(strings(&["--=x"])), strings(&["--=x"]));
    }

    #[test]
    fn run_refuses_an_unknown_argument_before_building() {
        let paths = Paths::discover();
        for bad in [["--bogus"], ["-display"]] {
            let e = cmd_run(&paths, strings(&bad)).unwrap_err();
            assert!(e.contains("unknown argument") && e.contains("`--`"), "{e}");
        }
    }
}
