//! The command line: the command, then its options and positional arguments, read with
//! [`lexopt`] into one typed options struct per command. Parsing has no side effects, so
//! a bad argument is refused (one line naming it) before anything is built or installed.
//!
//! Every command takes `--help`/`-h` (its help, see [`crate::command_help`]), options as
//! `--opt value` or `--opt=value`, and, where they apply, the build-mode flags
//! `--no-build` and `--prebuilt DIR` (see [`Args::next`]). The help texts live in
//! [`crate::USAGE`].

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use crate::scenario::Emulator;
use crate::BuildMode;

/// Every command, as typed.
pub const COMMANDS: &[&str] = &[
    "build",
    "run",
    "qemu-test",
    "bochs-test",
    "bench",
    "plot",
    "test",
    "check-config",
    "image",
    "help",
];

/// The commands that take the build-mode flags (`--no-build`, `--prebuilt DIR`).
const BUILDING: &[&str] = &["run", "qemu-test", "bochs-test", "test", "image", "bench"];

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Cli {
    /// No command at all: the overview, and a usage error.
    Missing,
    /// `help`, `--help`, `-h`: the overview; `help CMD` and `CMD --help`: that command's help.
    Help(Option<&'static str>),
    /// `build`.
    Build,
    /// `run`.
    Run(RunOpts),
    /// `qemu-test` and `bochs-test`.
    Suite(SuiteOpts),
    /// `test`.
    Test(TestOpts),
    /// `bench`.
    Bench(BenchOpts),
    /// `image`.
    Image(ImageOpts),
    /// `plot`.
    Plot(PlotOpts),
    /// `check-config`.
    CheckConfig(CheckConfigOpts),
}

/// `run [opts] [-- QEMU ARGS..]`.
#[derive(Debug, PartialEq)]
pub struct RunOpts {
    /// `--no-build`/`--prebuilt DIR` (`None`: the default, see [`build_mode`]).
    pub build: Option<BuildMode>,
    /// `--config FILE` (`None`: `config/demo.toml`).
    pub config: Option<String>,
    /// `--cmdline STR`.
    pub cmdline: String,
    /// `--smp N`.
    pub smp: u32,
    /// `--memory MIB` (`None`: what the config's VMs need).
    pub memory: Option<u32>,
    /// `--kvm`.
    pub kvm: bool,
    /// `--screenshots DIR`.
    pub screenshots: Option<PathBuf>,
    /// `--screenshot-secs N` (finite and positive).
    pub screenshot_secs: f64,
    /// Everything after `--`, unchanged.
    pub qemu_args: Vec<String>,
}

impl Default for RunOpts {
    fn default() -> Self {
        Self {
            build: None,
            config: None,
            cmdline: String::new(),
            smp: 2,
            memory: None,
            kvm: false,
            screenshots: None,
            screenshot_secs: 3.0,
            qemu_args: Vec::new(),
        }
    }
}

/// `qemu-test [FILTER]`, `bochs-test [FILTER]`.
#[derive(Debug, PartialEq)]
pub struct SuiteOpts {
    /// Which suite.
    pub emulator: Emulator,
    /// `--no-build`/`--prebuilt DIR`.
    pub build: Option<BuildMode>,
    /// Only the scenarios whose names contain this.
    pub filter: Option<String>,
}

/// `test`.
#[derive(Debug, PartialEq)]
pub struct TestOpts {
    /// `--no-build`/`--prebuilt DIR`.
    pub build: Option<BuildMode>,
    /// The stages to run (`--no-unit`, `--no-fuzz`, `--no-qemu`, `--no-bochs` clear them).
    pub unit: bool,
    /// See `unit`.
    pub fuzz: bool,
    /// See `unit`.
    pub qemu: bool,
    /// See `unit`.
    pub bochs: bool,
    /// `--fuzz-secs N` (`None`: `$XTASK_FUZZ_SECS`, else 30).
    pub fuzz_secs: Option<u64>,
}

impl Default for TestOpts {
    fn default() -> Self {
        Self {
            build: None,
            unit: true,
            fuzz: true,
            qemu: true,
            bochs: true,
            fuzz_secs: None,
        }
    }
}

/// `bench [FILTER]`.
#[derive(Debug, PartialEq)]
pub struct BenchOpts {
    /// `--no-build`/`--prebuilt DIR`.
    pub build: Option<BuildMode>,
    /// Only the scenarios whose names contain this.
    pub filter: Option<String>,
    /// Run the criterion bench (`--no-criterion` clears it).
    pub criterion: bool,
    /// Run the benchmark scenarios (`--no-scenarios` clears it).
    pub scenarios: bool,
}

impl Default for BenchOpts {
    fn default() -> Self {
        Self {
            build: None,
            filter: None,
            criterion: true,
            scenarios: true,
        }
    }
}

/// `image [opts]`.
#[derive(Debug, PartialEq)]
pub struct ImageOpts {
    /// `--no-build`/`--prebuilt DIR`.
    pub build: Option<BuildMode>,
    /// `--out FILE` (`None`: `target/xtask/hypervisor.img`).
    pub out: Option<PathBuf>,
    /// `--config FILE` (`None`: `config/vms.toml`).
    pub config: Option<String>,
    /// `--cmdline STR`.
    pub cmdline: String,
    /// `--check`.
    pub check: bool,
    /// `--check-marker STR`.
    pub check_marker: String,
}

impl Default for ImageOpts {
    fn default() -> Self {
        Self {
            build: None,
            out: None,
            config: None,
            cmdline: String::new(),
            check: false,
            check_marker: "hv: boot summary".into(),
        }
    }
}

/// `plot LOG [NAME]`.
#[derive(Debug, PartialEq)]
pub struct PlotOpts {
    /// The serial log.
    pub log: PathBuf,
    /// The name of the files written (default: the log's file stem).
    pub name: String,
}

/// `check-config [--cmdline STR] FILE...`.
#[derive(Debug, Default, PartialEq)]
pub struct CheckConfigOpts {
    /// `--cmdline STR`.
    pub cmdline: Option<String>,
    /// The VM configs.
    pub files: Vec<PathBuf>,
}

/// The build mode: the flags' choice, else `$XTASK_PREBUILT` (`prebuilt_env`) when set
/// and non-empty, else a build.
pub fn build_mode(chosen: Option<BuildMode>, prebuilt_env: Option<OsString>) -> BuildMode {
    match (chosen, prebuilt_env) {
        (Some(m), _) => m,
        (None, Some(d)) if !d.is_empty() => BuildMode::Prebuilt(PathBuf::from(d)),
        (None, _) => BuildMode::Build,
    }
}

/// Reads the command line (without the program name).
pub fn parse<I>(args: I) -> crate::Result<Cli>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut p = lexopt::Parser::from_args(args);
    let cmd = match p.next() {
        Ok(None) => return Ok(Cli::Missing),
        Ok(Some(lexopt::Arg::Long("help") | lexopt::Arg::Short('h'))) => "help",
        Ok(Some(lexopt::Arg::Value(v))) => match COMMANDS.iter().find(|&&c| v == c) {
            Some(c) => c,
            None => return Err(unknown_command(&v.to_string_lossy())),
        },
        Ok(Some(lexopt::Arg::Long(l))) => return Err(unknown_command(&format!("--{l}"))),
        Ok(Some(lexopt::Arg::Short(c))) => return Err(unknown_command(&format!("-{c}"))),
        Err(e) => return Err(format!("{e}")),
    };
    let mut a = Args {
        p,
        cmd,
        building: BUILDING.contains(&cmd),
        build: None,
        typed: None,
    };
    let parsed = match cmd {
        "help" => parse_help(&mut a),
        "build" => parse_build(&mut a),
        "run" => parse_run(&mut a).map(Cli::Run),
        "qemu-test" => parse_suite(&mut a, Emulator::Qemu).map(Cli::Suite),
        "bochs-test" => parse_suite(&mut a, Emulator::Bochs).map(Cli::Suite),
        "test" => parse_test(&mut a).map(Cli::Test),
        "bench" => parse_bench(&mut a).map(Cli::Bench),
        "image" => parse_image(&mut a).map(Cli::Image),
        "plot" => parse_plot(&mut a).map(Cli::Plot),
        "check-config" => parse_check_config(&mut a).map(Cli::CheckConfig),
        other => unreachable!("command `{other}` has no parser"),
    };
    match parsed {
        Ok(cli) => Ok(cli),
        Err(Stop::Help) if cmd == "help" => Ok(Cli::Help(None)),
        Err(Stop::Help) => Ok(Cli::Help(Some(cmd))),
        Err(Stop::Error(e)) => Err(e),
    }
}

fn unknown_command(c: &str) -> String {
    format!("unknown command `{c}` (try `cargo xtask help`)")
}

/// Why a command's parser stopped early.
#[derive(Debug)]
enum Stop {
    /// `--help` or `-h`.
    Help,
    /// A bad argument: the message.
    Error(String),
}

impl From<String> for Stop {
    fn from(e: String) -> Self {
        Stop::Error(e)
    }
}

type Parsed<T> = Result<T, Stop>;

/// One argument of a command, as [`Args::next`] hands it over.
#[derive(Debug)]
enum Arg {
    /// An option, with its dashes and without any `=value` (`--smp`, `-x`); its value,
    /// if it takes one, comes from [`Args::value`] and friends.
    Opt(String),
    /// A positional argument.
    Pos(OsString),
    /// A `--` and everything after it, unchanged.
    Rest(Vec<OsString>),
}

/// The arguments of one command, read with lexopt. Errors start with the command's name.
struct Args {
    p: lexopt::Parser,
    cmd: &'static str,
    /// Whether the command takes the build-mode flags.
    building: bool,
    /// What the build-mode flags chose (the last one wins).
    build: Option<BuildMode>,
    /// The argument being read, as typed (to name `-display` rather than `-d`).
    typed: Option<OsString>,
}

impl Args {
    /// The next argument. `--help`/`-h` stop the parse ([`Stop::Help`]); the build-mode
    /// flags are taken here for the commands they apply to (see [`Args::build`]).
    fn next(&mut self) -> Parsed<Option<Arg>> {
        loop {
            if let Some(mut raw) = self.p.try_raw_args() {
                if raw.peek() == Some(OsStr::new("--")) {
                    raw.next();
                    return Ok(Some(Arg::Rest(raw.collect())));
                }
                self.typed = raw.peek().map(OsStr::to_os_string);
            }
            let opt = match self.p.next() {
                Ok(None) => return Ok(None),
                Ok(Some(lexopt::Arg::Value(v))) => return Ok(Some(Arg::Pos(v))),
                Ok(Some(lexopt::Arg::Long(l))) => format!("--{l}"),
                Ok(Some(lexopt::Arg::Short(c))) => format!("-{c}"),
                Err(e) => return Err(self.error(e)),
            };
            match opt.as_str() {
                "--help" | "-h" => return Err(Stop::Help),
                "--no-build" if self.building => self.build = Some(BuildMode::NoBuild),
                "--prebuilt" if self.building => {
                    self.build = Some(BuildMode::Prebuilt(self.path(&opt, "a directory")?));
                }
                _ => return Ok(Some(Arg::Opt(opt))),
            }
        }
    }

    /// The build mode the flags chose (`None`: the default).
    fn build(&mut self) -> Option<BuildMode> {
        self.build.take()
    }

    /// The value of option `opt` (the next argument, or what follows its `=`); `what`
    /// names it when it is missing.
    fn value(&mut self, opt: &str, what: &str) -> Parsed<OsString> {
        self.p.value().map_err(|e| match e {
            lexopt::Error::MissingValue { .. } => self.fail(format!("{opt} needs {what}")),
            e => self.error(e),
        })
    }

    /// [`Args::value`] as a string.
    fn string(&mut self, opt: &str) -> Parsed<String> {
        let v = self.value(opt, "a value")?;
        self.utf8(v, opt)
    }

    /// [`Args::value`] as the path of a `what` (`"a file"`, `"a directory"`).
    fn path(&mut self, opt: &str, what: &str) -> Parsed<PathBuf> {
        self.value(opt, what).map(PathBuf::from)
    }

    /// [`Args::value`] as a number.
    fn number<T: std::str::FromStr>(&mut self, opt: &str) -> Parsed<T> {
        let v = self.string(opt)?;
        v.parse()
            .map_err(|_| self.fail(format!("{opt}: `{v}` is not a valid number")))
    }

    /// `v` (the value of `what`) as a string.
    fn utf8(&self, v: OsString, what: &str) -> Parsed<String> {
        v.into_string()
            .map_err(|v| self.fail(format!("{what}: {v:?} is not valid UTF-8")))
    }

    /// The option `opt` as typed (`-display`, where lexopt sees `-d`).
    fn typed(&self, opt: &str) -> String {
        match &self.typed {
            Some(t) if !opt.starts_with("--") => t.to_string_lossy().into_owned(),
            _ => opt.to_string(),
        }
    }

    /// Refuses the option `opt`.
    fn unknown(&self, opt: &str) -> Stop {
        self.fail(format!("unknown option `{}`", self.typed(opt)))
    }

    /// Refuses the positional argument (or `--`) `arg`; `expected` says what may come.
    fn unexpected(&self, arg: &Arg, expected: &str) -> Stop {
        let shown = match arg {
            Arg::Opt(o) => self.typed(o),
            Arg::Pos(v) => v.to_string_lossy().into_owned(),
            Arg::Rest(_) => "--".into(),
        };
        self.fail(format!("unexpected argument `{shown}` ({expected})"))
    }

    /// Refuses whatever `arg` is, when the command takes no such argument.
    fn reject(&self, arg: Arg) -> Stop {
        match arg {
            Arg::Opt(o) => self.unknown(&o),
            other => self.unexpected(&other, "it takes no positional arguments"),
        }
    }

    fn fail(&self, what: String) -> Stop {
        Stop::Error(format!("{}: {what}", self.cmd))
    }

    fn error(&self, e: lexopt::Error) -> Stop {
        match e {
            lexopt::Error::UnexpectedValue { option, value } => self.fail(format!(
                "{option} takes no value (got `{}`)",
                value.to_string_lossy()
            )),
            lexopt::Error::MissingValue {
                option: Some(option),
            } => self.fail(format!("{option} needs a value")),
            e => self.fail(e.to_string()),
        }
    }
}

/// `help [COMMAND]`.
fn parse_help(a: &mut Args) -> Parsed<Cli> {
    let mut which = None;
    while let Some(arg) = a.next()? {
        match arg {
            Arg::Pos(ref v) if which.is_none() => match COMMANDS.iter().find(|&&c| v == c) {
                Some(&c) => which = Some(c),
                None => {
                    let v = v.to_string_lossy();
                    return Err(a.fail(format!("unknown command `{v}`")));
                }
            },
            Arg::Opt(o) => return Err(a.unknown(&o)),
            other => return Err(a.unexpected(&other, "expected at most one COMMAND")),
        }
    }
    Ok(Cli::Help(which.filter(|&c| c != "help")))
}

/// `build`: no options.
fn parse_build(a: &mut Args) -> Parsed<Cli> {
    match a.next()? {
        None => Ok(Cli::Build),
        Some(arg) => Err(a.reject(arg)),
    }
}

fn parse_run(a: &mut Args) -> Parsed<RunOpts> {
    let mut o = RunOpts::default();
    while let Some(arg) = a.next()? {
        match arg {
            Arg::Opt(opt) => match opt.as_str() {
                "--config" => o.config = Some(a.string(&opt)?),
                "--cmdline" => o.cmdline = a.string(&opt)?,
                "--smp" => o.smp = a.number(&opt)?,
                "--memory" => o.memory = Some(a.number(&opt)?),
                "--kvm" => o.kvm = true,
                "--screenshots" => o.screenshots = Some(a.path(&opt, "a directory")?),
                "--screenshot-secs" => {
                    o.screenshot_secs = a.number(&opt)?;
                    if !(o.screenshot_secs.is_finite() && o.screenshot_secs > 0.0) {
                        return Err(a.fail(format!("{opt} must be positive")));
                    }
                }
                _ => {
                    return Err(a.fail(format!(
                        "unknown argument `{}` (QEMU's own arguments go after `--`)",
                        a.typed(&opt)
                    )))
                }
            },
            Arg::Rest(rest) => {
                for v in rest {
                    o.qemu_args.push(a.utf8(v, "a QEMU argument")?);
                }
            }
            Arg::Pos(v) => {
                return Err(a.fail(format!(
                    "unknown argument `{}` (QEMU's own arguments go after `--`)",
                    v.to_string_lossy()
                )))
            }
        }
    }
    o.build = a.build();
    Ok(o)
}

/// At most one FILTER.
fn filter(a: &Args, filter: &mut Option<String>, arg: Arg) -> Parsed<()> {
    match arg {
        Arg::Pos(v) if filter.is_none() => *filter = Some(a.utf8(v, "FILTER")?),
        Arg::Opt(o) => return Err(a.unknown(&o)),
        other => return Err(a.unexpected(&other, "expected at most one FILTER")),
    }
    Ok(())
}

fn parse_suite(a: &mut Args, emulator: Emulator) -> Parsed<SuiteOpts> {
    let mut f = None;
    while let Some(arg) = a.next()? {
        filter(a, &mut f, arg)?;
    }
    Ok(SuiteOpts {
        emulator,
        build: a.build(),
        filter: f,
    })
}

fn parse_test(a: &mut Args) -> Parsed<TestOpts> {
    let mut o = TestOpts::default();
    while let Some(arg) = a.next()? {
        let Arg::Opt(opt) = arg else {
            return Err(a.reject(arg));
        };
        match opt.as_str() {
            "--no-unit" => o.unit = false,
            "--no-fuzz" => o.fuzz = false,
            "--no-qemu" => o.qemu = false,
            "--no-bochs" => o.bochs = false,
            "--fuzz-secs" => o.fuzz_secs = Some(a.number(&opt)?),
            _ => return Err(a.unknown(&opt)),
        }
    }
    o.build = a.build();
    Ok(o)
}

fn parse_bench(a: &mut Args) -> Parsed<BenchOpts> {
    let mut o = BenchOpts::default();
    while let Some(arg) = a.next()? {
        match arg {
            Arg::Opt(ref opt) if opt == "--no-criterion" => o.criterion = false,
            Arg::Opt(ref opt) if opt == "--no-scenarios" => o.scenarios = false,
            other => filter(a, &mut o.filter, other)?,
        }
    }
    o.build = a.build();
    Ok(o)
}

fn parse_image(a: &mut Args) -> Parsed<ImageOpts> {
    let mut o = ImageOpts::default();
    while let Some(arg) = a.next()? {
        let Arg::Opt(opt) = arg else {
            return Err(a.reject(arg));
        };
        match opt.as_str() {
            "--out" => o.out = Some(a.path(&opt, "a file")?),
            "--config" => o.config = Some(a.string(&opt)?),
            "--cmdline" => o.cmdline = a.string(&opt)?,
            "--check" => o.check = true,
            "--check-marker" => o.check_marker = a.string(&opt)?,
            _ => return Err(a.unknown(&opt)),
        }
    }
    o.build = a.build();
    Ok(o)
}

fn parse_plot(a: &mut Args) -> Parsed<PlotOpts> {
    let mut pos = Vec::new();
    while let Some(arg) = a.next()? {
        match arg {
            Arg::Pos(v) => pos.push(v),
            Arg::Opt(o) => return Err(a.unknown(&o)),
            rest => return Err(a.unexpected(&rest, "expected LOG [NAME]")),
        }
    }
    let mut pos = pos.into_iter();
    match (pos.next(), pos.next(), pos.next()) {
        (Some(log), name, None) => {
            let log = PathBuf::from(log);
            let name = match name {
                Some(n) => a.utf8(n, "NAME")?,
                None => log
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "log".into()),
            };
            Ok(PlotOpts { log, name })
        }
        _ => Err(Stop::Error("usage: cargo xtask plot LOG [NAME]".into())),
    }
}

fn parse_check_config(a: &mut Args) -> Parsed<CheckConfigOpts> {
    let mut o = CheckConfigOpts::default();
    while let Some(arg) = a.next()? {
        match arg {
            Arg::Opt(ref opt) if opt == "--cmdline" => o.cmdline = Some(a.string(opt)?),
            Arg::Opt(opt) => return Err(a.unknown(&opt)),
            Arg::Pos(f) => o.files.push(PathBuf::from(f)),
            rest => return Err(a.unexpected(&rest, "expected FILE...")),
        }
    }
    if o.files.is_empty() && o.cmdline.is_none() {
        return Err(Stop::Error(
            "usage: cargo xtask check-config [--cmdline STR] FILE...".into(),
        ));
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> crate::Result<Cli> {
        parse(args.iter().copied())
    }

    fn ok(args: &[&str]) -> Cli {
        cli(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// The error for `args`: one line, starting with the command.
    fn err(args: &[&str]) -> String {
        let e = match cli(args) {
            Ok(c) => panic!("{args:?} parsed: {c:?}"),
            Err(e) => e,
        };
        assert!(!e.contains('\n'), "{e}");
        e
    }

    fn run(args: &[&str]) -> RunOpts {
        match ok(&[&["run"], args].concat()) {
            Cli::Run(o) => o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_are_as_before() {
        assert_eq!(ok(&[]), Cli::Missing);
        assert_eq!(ok(&["build"]), Cli::Build);
        let r = run(&[]);
        assert_eq!((r.smp, r.memory, r.screenshot_secs), (2, None, 3.0));
        assert_eq!(r, RunOpts::default());
        assert_eq!(ok(&["test"]), Cli::Test(TestOpts::default()));
        assert_eq!(ok(&["bench"]), Cli::Bench(BenchOpts::default()));
        let Cli::Image(i) = ok(&["image"]) else {
            panic!()
        };
        assert_eq!((i.out, i.check_marker.as_str()), (None, "hv: boot summary"));
        assert_eq!(
            ok(&["qemu-test"]),
            Cli::Suite(SuiteOpts {
                emulator: Emulator::Qemu,
                build: None,
                filter: None
            })
        );
    }

    #[test]
    fn values_come_spaced_or_after_an_equals_sign() {
        for args in [
            &["--config", "c.toml", "--cmdline", "a=b c", "--smp", "4"][..],
            &["--config=c.toml", "--cmdline=a=b c", "--smp=4"],
        ] {
            let r = run(args);
            assert_eq!(r.config.as_deref(), Some("c.toml"));
            assert_eq!((r.cmdline.as_str(), r.smp), ("a=b c", 4));
        }
        let r = run(&[
            "--memory=768",
            "--kvm",
            "--screenshots",
            "shots",
            "--screenshot-secs=0.5",
        ]);
        assert_eq!((r.memory, r.kvm), (Some(768), true));
        assert_eq!(r.screenshots, Some(PathBuf::from("shots")));
        assert_eq!(r.screenshot_secs, 0.5);
        // A value may look like an option.
        assert_eq!(run(&["--cmdline", "--kvm"]).cmdline, "--kvm");
        assert_eq!(run(&["--cmdline="]).cmdline, "");

        let Cli::Image(i) = ok(&[
            "image",
            "--out=x.img",
            "--config",
            "v.toml",
            "--cmdline=q",
            "--check",
            "--check-marker",
            "hi there",
        ]) else {
            panic!()
        };
        assert_eq!(i.out, Some(PathBuf::from("x.img")));
        assert_eq!(
            (i.config.as_deref(), i.cmdline.as_str()),
            (Some("v.toml"), "q")
        );
        assert!(i.check);
        assert_eq!(i.check_marker, "hi there");

        for args in [
            &["test", "--fuzz-secs", "7"][..],
            &["test", "--fuzz-secs=7"],
        ] {
            let Cli::Test(t) = ok(args) else { panic!() };
            assert_eq!(t.fuzz_secs, Some(7));
        }
        let Cli::Test(t) = ok(&["test", "--no-unit", "--no-fuzz", "--no-qemu", "--no-bochs"])
        else {
            panic!()
        };
        assert!(!(t.unit || t.fuzz || t.qemu || t.bochs));

        for args in [
            &["check-config", "--cmdline", "x=1", "a.toml", "b.toml"][..],
            &["check-config", "a.toml", "--cmdline=x=1", "b.toml"],
        ] {
            assert_eq!(
                ok(args),
                Cli::CheckConfig(CheckConfigOpts {
                    cmdline: Some("x=1".into()),
                    files: vec!["a.toml".into(), "b.toml".into()],
                })
            );
        }
    }

    #[test]
    fn build_mode_flags_apply_to_the_commands_that_build() {
        for cmd in BUILDING {
            for (args, want) in [
                (&["--no-build"][..], BuildMode::NoBuild),
                (&["--prebuilt", "d"], BuildMode::Prebuilt("d".into())),
                (&["--prebuilt=d"], BuildMode::Prebuilt("d".into())),
                // The last one wins.
                (&["--prebuilt=d", "--no-build"], BuildMode::NoBuild),
            ] {
                let build = match ok(&[&[*cmd], args].concat()) {
                    Cli::Run(o) => o.build,
                    Cli::Suite(o) => o.build,
                    Cli::Test(o) => o.build,
                    Cli::Image(o) => o.build,
                    Cli::Bench(o) => o.build,
                    other => panic!("{other:?}"),
                };
                assert_eq!(build, Some(want), "{cmd} {args:?}");
            }
            let e = err(&[cmd, "--prebuilt"]);
            assert_eq!(e, format!("{cmd}: --prebuilt needs a directory"));
            let e = err(&[cmd, "--no-build=1"]);
            assert!(e.contains("--no-build takes no value"), "{e}");
        }
        for cmd in ["build", "plot", "check-config", "help"] {
            let e = err(&[cmd, "--no-build"]);
            assert!(e.contains("unknown option `--no-build`"), "{e}");
        }
        // The flags win over $XTASK_PREBUILT, which wins over a build.
        let env = || Some(OsString::from("e"));
        assert_eq!(
            build_mode(Some(BuildMode::NoBuild), env()),
            BuildMode::NoBuild
        );
        assert_eq!(build_mode(None, env()), BuildMode::Prebuilt("e".into()));
        assert_eq!(build_mode(None, Some("".into())), BuildMode::Build);
        assert_eq!(build_mode(None, None), BuildMode::Build);
    }

    #[test]
    fn help_wins_and_does_nothing_else() {
        for &cmd in COMMANDS {
            let want = Cli::Help((cmd != "help").then_some(cmd));
            for h in ["--help", "-h"] {
                assert_eq!(ok(&[cmd, h]), want, "{cmd} {h}");
            }
        }
        assert_eq!(ok(&["run", "--smp", "4", "--help"]), Cli::Help(Some("run")));
        assert_eq!(
            ok(&["qemu-test", "gpu", "-h"]),
            Cli::Help(Some("qemu-test"))
        );
        assert_eq!(ok(&["--help"]), Cli::Help(None));
        assert_eq!(ok(&["-h"]), Cli::Help(None));
        assert_eq!(ok(&["help"]), Cli::Help(None));
        assert_eq!(ok(&["help", "image"]), Cli::Help(Some("image")));
        assert!(err(&["help", "nope"]).contains("unknown command `nope`"));
        // After `--` it is QEMU's; as a value it is the value.
        assert_eq!(run(&["--", "--help"]).qemu_args, ["--help"]);
        assert_eq!(run(&["--cmdline", "--help"]).cmdline, "--help");
    }

    #[test]
    fn unknown_options_are_refused_by_name() {
        for &cmd in COMMANDS {
            for bad in ["--bogus", "--bogus=1", "-x"] {
                let e = err(&[cmd, bad]);
                let name = bad.split('=').next().unwrap();
                assert!(e.starts_with(&format!("{cmd}: ")), "{e}");
                assert!(e.contains(&format!("`{name}`")), "{e}");
            }
        }
        assert_eq!(
            err(&["run", "-display", "none"]),
            "run: unknown argument `-display` (QEMU's own arguments go after `--`)"
        );
        assert!(err(&["run", "stray"]).contains("unknown argument `stray`"));
        assert!(err(&["build", "x"]).contains("unexpected argument `x`"));
        assert!(err(&["test", "--", "x"]).contains("unexpected argument `--`"));
        assert_eq!(
            err(&["nope"]),
            "unknown command `nope` (try `cargo xtask help`)"
        );
        assert!(err(&["--bogus"]).contains("unknown command `--bogus`"));
        // A prefix of a command is not that command.
        assert!(err(&["qemu"]).contains("unknown command"));
    }

    #[test]
    fn missing_and_invalid_values_are_refused_by_name() {
        for (args, want) in [
            (&["run", "--smp"][..], "run: --smp needs a value"),
            (
                &["run", "--smp", "x"],
                "run: --smp: `x` is not a valid number",
            ),
            (
                &["run", "--memory=-1"],
                "run: --memory: `-1` is not a valid number",
            ),
            (
                &["run", "--screenshot-secs=0"],
                "run: --screenshot-secs must be positive",
            ),
            (
                &["run", "--screenshot-secs", "inf"],
                "run: --screenshot-secs must be positive",
            ),
            (
                &["run", "--kvm=yes"],
                "run: --kvm takes no value (got `yes`)",
            ),
            (&["run", "--config"], "run: --config needs a value"),
            (&["image", "--out"], "image: --out needs a file"),
            (
                &["image", "--check=1"],
                "image: --check takes no value (got `1`)",
            ),
            (
                &["test", "--fuzz-secs", "1.5"],
                "test: --fuzz-secs: `1.5` is not a valid number",
            ),
            (
                &["check-config", "--cmdline"],
                "check-config: --cmdline needs a value",
            ),
        ] {
            assert_eq!(err(args), want, "{args:?}");
        }
    }

    #[test]
    fn positional_arguments_are_as_before() {
        let suite = |args: &[&str]| match ok(args) {
            Cli::Suite(s) => s,
            other => panic!("{other:?}"),
        };
        let s = suite(&["bochs-test", "gpu", "--no-build"]);
        assert_eq!(s.emulator, Emulator::Bochs);
        assert_eq!(
            (s.filter.as_deref(), s.build),
            (Some("gpu"), Some(BuildMode::NoBuild))
        );
        assert!(err(&["qemu-test", "a", "b"]).contains("expected at most one FILTER"));

        let Cli::Bench(b) = ok(&["bench", "--no-criterion", "boot", "--no-scenarios"]) else {
            panic!()
        };
        assert_eq!(
            (b.filter.as_deref(), b.criterion, b.scenarios),
            (Some("boot"), false, false)
        );
        assert!(err(&["bench", "a", "b"]).contains("unexpected argument `b`"));

        assert_eq!(
            ok(&["plot", "logs/x.log"]),
            Cli::Plot(PlotOpts {
                log: "logs/x.log".into(),
                name: "x".into()
            })
        );
        assert_eq!(
            ok(&["plot", "x.log", "metal"]),
            Cli::Plot(PlotOpts {
                log: "x.log".into(),
                name: "metal".into()
            })
        );
        for bad in [&["plot"][..], &["plot", "a", "b", "c"]] {
            assert_eq!(err(bad), "usage: cargo xtask plot LOG [NAME]");
        }
        assert_eq!(
            err(&["check-config"]),
            "usage: cargo xtask check-config [--cmdline STR] FILE..."
        );
    }

    #[test]
    fn run_passes_everything_after_the_double_dash_to_qemu() {
        let r = run(&["--smp=4", "--", "-display", "gtk", "--smp=9", "--", "-h"]);
        assert_eq!(r.smp, 4);
        assert_eq!(r.qemu_args, ["-display", "gtk", "--smp=9", "--", "-h"]);
        assert!(run(&["--"]).qemu_args.is_empty());
        // `--` as an option's value is that value.
        let r = run(&["--cmdline", "--", "--kvm"]);
        assert_eq!((r.cmdline.as_str(), r.kvm), ("--", true));
    }
}
