//! `cargo xtask`: the project's build, run and test driver.
//!
//! It builds the UEFI loader, the hypervisor and the guests for their bare-metal targets,
//! lays out an EFI system partition (ESP), boots it in QEMU or Bochs, and judges the test
//! scenarios under `tests/scenarios/` by exit status and serial output. See `USAGE` and
//! `tests/README.md`.

mod artifacts;
mod bench;
mod bochs;
mod cli;
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

use std::ffi::OsString;
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
  help [COMMAND]             this list, or one command's help (as `<command> --help` or -h);
                             every option takes its value as `--opt value` or `--opt=value`

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

fn parse_num<T: std::str::FromStr>(s: &str, name: &str) -> Result<T> {
    s.parse()
        .map_err(|_| format!("{name}: `{s}` is not a valid number"))
}

fn main() -> ExitCode {
    match real_main(std::env::args_os().skip(1)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the whole command line first (see [`cli`]): a bad argument stops xtask before
/// anything is built or installed, and `<command> --help` does nothing but print.
fn real_main(args: impl IntoIterator<Item = OsString>) -> Result<ExitCode> {
    let cli = cli::parse(args)?;
    let paths = Paths::discover();
    match cli {
        cli::Cli::Missing => {
            eprint!("{USAGE}");
            Ok(ExitCode::from(2))
        }
        cli::Cli::Help(cmd) => {
            match cmd.and_then(command_help) {
                Some(h) => print!("{h}"),
                None => print!("{USAGE}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        cli::Cli::Build => {
            let art = artifacts::build(&paths)?;
            art.print(&paths);
            Ok(ExitCode::SUCCESS)
        }
        cli::Cli::Run(o) => cmd_run(&paths, o),
        cli::Cli::Suite(o) => {
            let mode = build_mode(o.build);
            process::install_interrupt_handler();
            let mut art = artifacts::obtain(&paths, &mode)?;
            let ok = suite::run_suite(&paths, &mut art, o.emulator, o.filter.as_deref())?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        cli::Cli::Test(o) => cmd_test(&paths, o),
        cli::Cli::Plot(o) => cmd_plot(&paths, o),
        cli::Cli::Bench(o) => bench::cmd_bench(&paths, &build_mode(o.build.clone()), &o),
        cli::Cli::Image(o) => cmd_image(&paths, o),
        cli::Cli::CheckConfig(o) => cmd_check_config(&o),
    }
}

/// The build mode the flags chose, else `$XTASK_PREBUILT`, else a build.
fn build_mode(chosen: Option<BuildMode>) -> BuildMode {
    cli::build_mode(chosen, std::env::var_os("XTASK_PREBUILT"))
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
fn cmd_check_config(o: &cli::CheckConfigOpts) -> Result<ExitCode> {
    let mut ok = true;
    if let Some(c) = &o.cmdline {
        match boot_info::cmdline::check(c) {
            Ok(()) => println!("--cmdline: ok"),
            Err(e) => {
                println!("--cmdline: {e}");
                ok = false;
            }
        }
    }
    for f in &o.files {
        let text =
            std::fs::read_to_string(f).ctx(|| format!("cannot read VM config {}", f.display()))?;
        let f = f.display();
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

fn cmd_run(paths: &Paths, o: cli::RunOpts) -> Result<ExitCode> {
    let mode = build_mode(o.build);
    let (cmdline, screenshot_secs) = (o.cmdline, o.screenshot_secs);
    boot_info::cmdline::check(&cmdline).map_err(|e| format!("run: --cmdline: {e}"))?;
    tools::ensure(&[tools::Tool::Qemu, tools::Tool::Ovmf])?;
    let config = read_config(&paths.root, o.config.as_deref(), "demo.toml")?;
    let art = artifacts::obtain(paths, &mode)?;
    let esp = paths.esp_dir("run");
    esp::make(&esp, &art, &config, &cmdline)?;
    linux::add_to_esp(paths, &esp, &config)?;
    let display = std::env::var_os("DISPLAY").is_some_and(|d| !d.is_empty());
    let logs = paths.logs_dir();
    std::fs::create_dir_all(&logs).ctx(|| "cannot create the log directory".to_string())?;
    let serial_log = logs.join("run-qemu.log");
    let _ = std::fs::remove_file(&serial_log);
    let screenshots = match o.screenshots {
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
        smp: o.smp,
        memory_mib: o
            .memory
            .unwrap_or_else(|| vmconfig::machine_memory_mib(&config)),
        disk: qemu::Disk::Dir(esp),
        serial: qemu::Serial::StdioWithMonitorLogged(serial_log.clone()),
        display,
        kvm: o.kvm,
        qmp: screenshots.as_ref().map(|(_, sock)| sock.clone()),
        extra: o.qemu_args,
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

fn cmd_plot(paths: &Paths, o: cli::PlotOpts) -> Result<ExitCode> {
    let (log, name) = (o.log, o.name);
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

fn cmd_test(paths: &Paths, o: cli::TestOpts) -> Result<ExitCode> {
    let mode = build_mode(o.build);
    let (unit, fuzz, qemu, bochs) = (o.unit, o.fuzz, o.qemu, o.bochs);
    let env_fuzz_secs: u64 = match std::env::var("XTASK_FUZZ_SECS") {
        Ok(s) if !s.is_empty() => parse_num(&s, "XTASK_FUZZ_SECS")?,
        _ => 30,
    };
    let fuzz_secs = o.fuzz_secs.unwrap_or(env_fuzz_secs);
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

fn cmd_image(paths: &Paths, o: cli::ImageOpts) -> Result<ExitCode> {
    let mode = build_mode(o.build);
    let out = o.out.unwrap_or_else(|| paths.xtask.join("hypervisor.img"));
    let (cmdline, marker) = (o.cmdline, o.check_marker);
    boot_info::cmdline::check(&cmdline).map_err(|e| format!("image: --cmdline: {e}"))?;
    tools::ensure(&[tools::Tool::Mtools])?;
    let config = read_config(&paths.root, o.config.as_deref(), "vms.toml")?;
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
    if o.check {
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

    #[test]
    fn help_lists_every_command_and_each_has_its_own() {
        for &c in cli::COMMANDS {
            let h = command_help(c).unwrap_or_else(|| panic!("no help for `{c}`"));
            assert!(h.starts_with(&format!("usage: cargo xtask {c} ")), "{h}");
        }
        // And USAGE names nothing that is not a command.
        let listed = USAGE
            .lines()
            .filter_map(|l| l.strip_prefix("  "))
            .filter(|l| l.starts_with(|c: char| c.is_ascii_lowercase()))
            .filter_map(|l| l.split_whitespace().next());
        for c in listed {
            assert!(cli::COMMANDS.contains(&c), "USAGE lists `{c}`");
        }
    }

    #[test]
    fn bad_arguments_stop_before_anything_runs() {
        // Each of these would build, install or boot something if it got that far.
        for bad in [
            &["run", "--bogus"][..],
            &["run", "-display", "none"],
            &["run", "--smp"],
            &["build", "--release"],
            &["qemu-test", "--nope"],
            &["test", "--fuzz-secs=x"],
            &["image", "--check=yes"],
            &["bench", "a", "b"],
        ] {
            let e = real_main(bad.iter().map(OsString::from)).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
        }
        let e = real_main(["run", "--bogus"].map(OsString::from)).unwrap_err();
        assert!(
            e.contains("unknown argument `--bogus`") && e.contains("`--`"),
            "{e}"
        );
    }

    #[test]
    fn help_only_prints() {
        for args in [
            &["help"][..],
            &["--help"],
            &["help", "plot"],
            &["check-config", "-h"],
        ] {
            let code = real_main(args.iter().map(OsString::from)).unwrap();
            assert_eq!(code, ExitCode::SUCCESS, "{args:?}");
        }
    }
}
