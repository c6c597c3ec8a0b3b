//! `cargo xtask bench`'s Linux comparisons (a scenario's `[native]` table): the
//! config's Linux VM booted directly in QEMU (`-kernel`, `-initrd`, `-append`, TCG,
//! the VM's memory and vCPUs) alternating with the scenario's runs under the
//! hypervisor, every serial line timestamped by xtask as it arrives; then the boot
//! time ratio, modetest's page-flip rate as % of native and the hypervisor's exit
//! rates by reason during boot and during drawing, as rows of the bench table.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::bench::Row;
use crate::process::{self, Outcome, Watch};
use crate::scenario::{Native, Scenario};
use crate::{initramfs, judge, linux, qemu, show_command, Context, Paths, Result};

/// Serial lines with the time xtask first saw each (seconds since the run started).
pub type Stamped = Vec<(f64, String)>;

/// Reads a growing serial log and timestamps each complete line as it appears.
pub struct Stamper {
    path: PathBuf,
    start: Instant,
    offset: u64,
    partial: Vec<u8>,
    lines: Stamped,
}

impl Stamper {
    /// Times the lines of `path` (which may not exist yet) from now on.
    pub fn new(path: &Path) -> Self {
        Stamper {
            path: path.to_path_buf(),
            start: Instant::now(),
            offset: 0,
            partial: Vec::new(),
            lines: Vec::new(),
        }
    }

    /// Takes the lines written since the last call, stamped with the time now.
    pub fn poll(&mut self) {
        let Ok(mut f) = fs::File::open(&self.path) else {
            return;
        };
        let mut new = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_err() || f.read_to_end(&mut new).is_err() {
            return;
        }
        self.offset += new.len() as u64;
        self.feed(self.start.elapsed().as_secs_f64(), &new);
    }

    /// Adds `bytes` seen at `t`.
    fn feed(&mut self, t: f64, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line);
            self.lines
                .push((t, text.trim_end_matches(['\r', '\n']).to_string()));
        }
    }

    /// The lines, an unterminated last one included.
    pub fn finish(mut self) -> Stamped {
        self.poll();
        if !self.partial.is_empty() {
            let t = self.start.elapsed().as_secs_f64();
            let text = String::from_utf8_lossy(&self.partial).into_owned();
            self.lines.push((t, text));
        }
        self.lines
    }
}

/// The config's first VM with a kernel: (its index = slot, its config).
pub fn linux_vm(config: &str) -> Result<(usize, boot_info::config::VmConfig)> {
    let c = boot_info::config::parse(config).map_err(|e| format!("vms.toml: {e}"))?;
    c.vm.into_iter()
        .enumerate()
        .find(|(_, v)| v.kernel.is_some())
        .ok_or_else(|| "`[native]` needs a VM with a `kernel` in the config".to_string())
}

/// QEMU's arguments for booting `vm` directly: TCG like the scenarios, its memory
/// and vCPUs, its kernel, initrd and command line, COM1 to `log`.
pub fn native_args(
    vm: &boot_info::config::VmConfig,
    kernel: &Path,
    initrd: Option<&Path>,
    log: &Path,
    extra: &[String],
) -> Vec<String> {
    let mut a: Vec<String> = [
        "-nodefaults",
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-cpu",
        "max",
    ]
    .map(String::from)
    .to_vec();
    a.extend(["-smp".into(), vm.vcpus.max(1).to_string()]);
    a.extend(["-m".into(), format!("{}M", vm.memory_mib)]);
    a.extend(["-kernel".into(), kernel.display().to_string()]);
    if let Some(i) = initrd {
        a.extend(["-initrd".into(), i.display().to_string()]);
    }
    a.extend([
        "-append".into(),
        vm.cmdline.clone().unwrap_or_default(),
        "-serial".into(),
        format!("file:{}", log.display()),
        "-no-reboot".into(),
        "-display".into(),
        "none".into(),
    ]);
    a.extend(extra.iter().cloned());
    a
}

/// One native run.
pub struct NativeRun {
    /// It powered off with every expected line.
    pub passed: bool,
    /// Wall-clock seconds.
    pub secs: f64,
    /// Its serial lines, timestamped.
    pub lines: Stamped,
}

/// Boots the scenario's Linux VM directly in QEMU (run `k`, from 1) and prints a
/// `PASS|FAIL` line like a scenario's.
pub fn run_native(paths: &Paths, s: &Scenario, n: &Native, k: u32) -> Result<NativeRun> {
    let config = s.config_text(&paths.root)?;
    let (_, vm) = linux_vm(&config)?;
    let file = |name: &Option<String>, ours: &str, build: &dyn Fn() -> Result<PathBuf>| {
        name.as_ref()
            .map(|f| {
                if f == ours {
                    build()
                } else {
                    Ok(paths.root.join(f))
                }
            })
            .transpose()
    };
    let kernel = file(&vm.kernel, linux::KERNEL, &|| linux::kernel(paths))?.ok_or("no kernel")?;
    let initrd = file(&vm.initrd, initramfs::INITRD, &|| initramfs::build(paths))?;
    let logs = paths.logs_dir();
    fs::create_dir_all(&logs).ctx(|| "cannot create the log directory".to_string())?;
    let log = logs.join(format!("{}-native{k}.log", s.name));
    let console = logs.join(format!("{}-native{k}.console.log", s.name));
    let _ = fs::remove_file(&log);
    let mut cmd = Command::new(qemu::QEMU);
    cmd.args(native_args(
        &vm,
        &kernel,
        initrd.as_deref(),
        &log,
        &n.qemu_args,
    ));
    cmd.stdin(std::process::Stdio::null());
    fs::write(
        paths.work_dir_ensure(&s.name)?.join("native-command.txt"),
        show_command(&cmd) + "\n",
    )
    .ctx(|| "cannot write the QEMU command".to_string())?;
    let out = fs::File::create(&console).ctx(|| format!("cannot create {}", console.display()))?;
    let err = out
        .try_clone()
        .ctx(|| "cannot duplicate a file handle".to_string())?;
    cmd.stdout(out).stderr(err);
    let t = Instant::now();
    let mut stamper = Stamper::new(&log);
    let outcome = process::run_watched(
        &mut cmd,
        Duration::from_secs(s.qemu_timeout_secs()),
        &mut |_| {
            stamper.poll();
            Watch::Continue
        },
    )?;
    let secs = t.elapsed().as_secs_f64();
    let lines = stamper.finish();
    let text = String::from_utf8_lossy(&fs::read(&log).unwrap_or_default()).into_owned();
    let mut problems = Vec::new();
    if outcome != Outcome::Exited(0) {
        problems.push(format!(
            "QEMU did not power off (exit status 0): {outcome:?}"
        ));
    }
    let mut want = vec![n.boot_from.clone(), n.boot_to.clone()];
    want.extend(n.expect.iter().cloned());
    problems.extend(judge::check_log(&text, &want, &[], &s.forbid));
    let passed = problems.is_empty();
    println!(
        "{} {:<24} [qemu, native #{k}] {secs:6.1}s  the same Linux VM booted directly in QEMU (-kernel)",
        if passed { "PASS" } else { "FAIL" },
        s.name
    );
    for p in &problems {
        println!("    - {p}");
    }
    if !passed {
        for line in judge::tail(&text, 20) {
            println!("    | {line}");
        }
        println!("    --- full serial log: {}", paths.show(&log));
    }
    Ok(NativeRun {
        passed,
        secs,
        lines,
    })
}

/// The time from the first line containing `from` to the first line after it
/// containing `to`.
pub fn span(lines: &[(f64, String)], from: &str, to: &str) -> Option<f64> {
    let i = lines.iter().position(|(_, l)| l.contains(from))?;
    let j = i + lines[i..].iter().position(|(_, l)| l.contains(to))?;
    Some(lines[j].0 - lines[i].0)
}

/// The frequency of a modetest `freq: 60.00Hz` line.
pub fn freq(line: &str) -> Option<f64> {
    let rest = &line[line.find("freq: ")? + 6..];
    let hz = rest.trim_end().strip_suffix("Hz")?;
    hz.trim().parse().ok().filter(|f: &f64| f.is_finite())
}

/// A run's page-flip rate: the median of its `freq:` lines but the first (which
/// includes the start), or the only one.
pub fn flip_rate(lines: &[(f64, String)]) -> Option<f64> {
    let f: Vec<f64> = lines.iter().filter_map(|(_, l)| freq(l)).collect();
    let steady = if f.len() > 1 { &f[1..] } else { &f[..] };
    median(steady)
}

/// One `vm-exits sample:` line: the hypervisor's time and each VM's exits so far.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExitSample {
    /// Milliseconds since the hypervisor started.
    pub t_ms: u64,
    /// Per VM (slot).
    pub vms: Vec<VmExits>,
}

/// One VM's entry of an [`ExitSample`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VmExits {
    /// Its slot (the config's VM index).
    pub vm: usize,
    /// Exits by reason, cumulative.
    pub exits: BTreeMap<String, u64>,
}

/// The sample a line carries, if it is a `vm-exits sample:` line.
pub fn exit_sample(line: &str) -> Option<ExitSample> {
    let json = &line[line.find("vm-exits sample: ")? + 17..];
    serde_json::from_str(json.trim()).ok()
}

/// VM `vm`'s exits per second by reason (and `total`) between the first and the last
/// sample that lie strictly between line `from` and line `to` (indices into `lines`).
pub fn exit_rates(
    lines: &[(f64, String)],
    vm: usize,
    from: usize,
    to: usize,
) -> Option<BTreeMap<String, f64>> {
    let samples: Vec<(u64, BTreeMap<String, u64>)> = lines
        .get(from + 1..to)?
        .iter()
        .filter_map(|(_, l)| exit_sample(l))
        .filter_map(|s| {
            let v = s.vms.into_iter().find(|v| v.vm == vm)?;
            Some((s.t_ms, v.exits))
        })
        .collect();
    let (first, last) = (samples.first()?, samples.last()?);
    let ms = last.0.checked_sub(first.0).filter(|&ms| ms > 0)?;
    let mut rates = BTreeMap::new();
    let mut total = 0u64;
    for (reason, &n) in &last.1 {
        let d = n.saturating_sub(first.1.get(reason).copied().unwrap_or(0));
        total += d;
        rates.insert(reason.clone(), d as f64 * 1000.0 / ms as f64);
    }
    rates.insert("total".into(), total as f64 * 1000.0 / ms as f64);
    Some(rates)
}

/// The median (of an even count, the mean of the middle two).
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// `median unit (min-max, n runs)`, with `decimals`; `-` when `v` is empty.
pub fn spread(v: &[f64], unit: &str, decimals: usize, what: &str) -> String {
    let Some(m) = median(v) else {
        return "- (no run measured it)".into();
    };
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{m:.decimals$}{unit} (median of {} {what}; min {min:.decimals$}, max {max:.decimals$})",
        v.len()
    )
}

/// What one run (native or hypervisor) measured.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Figures {
    /// `boot_from` to `boot_to`, seconds.
    pub boot: Option<f64>,
    /// Hypervisor runs: `hv_start` to `boot_from` and to `boot_to`, seconds.
    pub entry: Option<f64>,
    /// See `entry`.
    pub hv_boot: Option<f64>,
    /// Page flips per second (see [`flip_rate`]).
    pub flip_hz: Option<f64>,
    /// The flipped mode, from `gpupv-init: flipping CONN:MODE for`.
    pub mode: Option<String>,
    /// Exits per second by reason booting: the samples between the start of the run
    /// (or `hv_start`) and `boot_to`.
    pub exits_boot: Option<BTreeMap<String, f64>>,
    /// ... and page flipping: between the first and the last `freq:` line.
    pub exits_draw: Option<BTreeMap<String, f64>>,
}

/// The figures of one run's stamped lines; `vm` is the Linux VM's slot.
pub fn figures(lines: &[(f64, String)], n: &Native, vm: usize) -> Figures {
    let pos = |pat: &str| lines.iter().position(|(_, l)| l.contains(pat));
    let mut f = Figures {
        boot: span(lines, &n.boot_from, &n.boot_to),
        flip_hz: flip_rate(lines),
        ..Figures::default()
    };
    if let Some(h) = &n.hv_start {
        f.entry = span(lines, h, &n.boot_from);
        f.hv_boot = span(lines, h, &n.boot_to);
    }
    f.mode = lines.iter().find_map(|(_, l)| {
        let rest = &l[l.find("gpupv-init: flipping ")? + 21..];
        let conn_mode = rest.split_whitespace().next()?;
        Some(conn_mode.split_once(':')?.1.to_string())
    });
    let start = n.hv_start.as_deref().and_then(pos).unwrap_or(0);
    if let Some(up) = pos(&n.boot_to) {
        f.exits_boot = exit_rates(lines, vm, start, up);
    }
    let flips: Vec<usize> = (0..lines.len())
        .filter(|&i| freq(&lines[i].1).is_some())
        .collect();
    if let (Some(&a), Some(&b)) = (flips.first(), flips.last()) {
        f.exits_draw = exit_rates(lines, vm, a, b);
    }
    f
}

/// The table rows comparing `natives` with `hvs` (the passed runs' figures, in run
/// order; pair `i` is native run `i` and the hypervisor run after it).
pub fn rows(
    scenario: &str,
    n: &Native,
    natives: &[Option<Figures>],
    hvs: &[Option<Figures>],
) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut row = |source: &str, metric: String, value: String| {
        rows.push(Row {
            scenario: scenario.into(),
            emulator: "qemu".into(),
            source: source.into(),
            metric,
            value,
        })
    };
    let all = |v: &[Option<Figures>], f: &dyn Fn(&Figures) -> Option<f64>| -> Vec<f64> {
        v.iter().flatten().filter_map(f).collect()
    };
    let pairs = |f: &dyn Fn(&Figures, &Figures) -> Option<f64>| -> Vec<f64> {
        natives
            .iter()
            .zip(hvs)
            .filter_map(|(a, b)| f(a.as_ref()?, b.as_ref()?))
            .collect()
    };
    let boot = format!("boot: `{}` to `{}`", n.boot_from, n.boot_to);
    row(
        "native",
        format!("{boot}, QEMU -kernel"),
        spread(&all(natives, &|f| f.boot), " s", 2, "runs"),
    );
    row(
        "hv",
        format!("{boot}, under the hypervisor"),
        spread(&all(hvs, &|f| f.boot), " s", 2, "runs"),
    );
    if let Some(h) = &n.hv_start {
        row(
            "hv",
            format!("boot: `{h}` to `{}`", n.boot_from),
            spread(&all(hvs, &|f| f.entry), " s", 2, "runs"),
        );
        row(
            "hv",
            format!("boot: `{h}` to `{}`", n.boot_to),
            spread(&all(hvs, &|f| f.hv_boot), " s", 2, "runs"),
        );
    }
    row(
        "hv/native",
        "boot time ratio, hypervisor / native (each pair of alternating runs)".into(),
        spread(&pairs(&|a, b| Some(b.boot? / a.boot?)), "", 2, "pairs"),
    );
    let flipped = natives
        .iter()
        .chain(hvs)
        .flatten()
        .any(|f| f.flip_hz.is_some());
    if flipped {
        let mode = |v: &[Option<Figures>]| {
            let mut m: Vec<String> = v.iter().flatten().filter_map(|f| f.mode.clone()).collect();
            m.dedup();
            m.join("/")
        };
        let what = "modetest -v page flips (median of a run's `freq:` lines after the first)";
        row(
            "native",
            format!("{what}, {}", mode(natives)),
            spread(&all(natives, &|f| f.flip_hz), " Hz", 2, "runs"),
        );
        row(
            "hv",
            format!("{what}, {}", mode(hvs)),
            spread(&all(hvs, &|f| f.flip_hz), " Hz", 2, "runs"),
        );
        row(
            "hv/native",
            "page-flip rate through the mediator, % of native (each pair)".into(),
            spread(
                &pairs(&|a, b| Some(100.0 * b.flip_hz? / a.flip_hz?)),
                " %",
                1,
                "pairs",
            ),
        );
    }
    for (label, get) in [
        (
            format!("exits/s booting (vm-exits samples to `{}`)", n.boot_to),
            &(|f: &Figures| f.exits_boot.clone()) as &dyn Fn(&Figures) -> _,
        ),
        (
            "exits/s page flipping (vm-exits samples between the first and last `freq:`)".into(),
            &|f: &Figures| f.exits_draw.clone(),
        ),
    ] {
        let per_run: Vec<BTreeMap<String, f64>> = hvs.iter().flatten().filter_map(get).collect();
        if per_run.is_empty() {
            continue;
        }
        // `total` first, then the reasons by their median rate, busiest first
        // (those under 0.05/s left out).
        let mut reasons: Vec<(String, f64)> = per_run[0]
            .keys()
            .map(|r| {
                let v: Vec<f64> = per_run.iter().filter_map(|m| m.get(r).copied()).collect();
                (r.clone(), median(&v).unwrap_or(0.0))
            })
            .filter(|(r, m)| r == "total" || *m >= 0.05)
            .collect();
        reasons.sort_by(|a, b| {
            (b.0 == "total")
                .cmp(&(a.0 == "total"))
                .then(b.1.total_cmp(&a.1))
        });
        for (r, _) in reasons {
            let v: Vec<f64> = per_run.iter().filter_map(|m| m.get(&r).copied()).collect();
            row("hv", format!("{label}: {r}"), spread(&v, "/s", 0, "runs"));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native() -> Native {
        Native {
            runs: 2,
            boot_from: "KASLR disabled".into(),
            boot_to: "gpupv-init: up".into(),
            hv_start: Some("vm linux created".into()),
            expect: Vec::new(),
            qemu_args: Vec::new(),
        }
    }

    fn stamped(v: &[(f64, &str)]) -> Stamped {
        v.iter().map(|(t, l)| (*t, l.to_string())).collect()
    }

    #[test]
    fn median_and_spread() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(
            spread(&[1.5, 2.0, 1.0], " s", 2, "runs"),
            "1.50 s (median of 3 runs; min 1.00, max 2.00)"
        );
        assert_eq!(spread(&[], " s", 2, "runs"), "- (no run measured it)");
    }

    #[test]
    fn lines_are_stamped_when_complete() {
        let mut s = Stamper::new(Path::new("/nonexistent/xtask-stamper"));
        s.poll();
        s.feed(1.0, b"first\r\nsec");
        s.feed(2.5, b"ond\nthird\n");
        s.feed(3.0, b"tail");
        let lines = s.finish();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            &lines[..3],
            &stamped(&[(1.0, "first"), (2.5, "second"), (2.5, "third")])[..]
        );
        assert_eq!(lines[3].1, "tail");

        // From a growing file.
        let p = std::env::temp_dir().join(format!("xtask-stamper-{}", std::process::id()));
        fs::write(&p, "a\nb").unwrap();
        let mut s = Stamper::new(&p);
        s.poll();
        fs::write(&p, "a\nbc\nd\n").unwrap();
        s.poll();
        let got: Vec<String> = s.finish().into_iter().map(|(_, l)| l).collect();
        assert_eq!(got, ["a", "bc", "d"]);
        let _ = fs::remove_file(p);
    }

    #[test]
    fn spans_between_lines() {
        let l = stamped(&[
            (0.5, "gpupv-init: up early?"),
            (1.0, "[linux] KASLR disabled: 'nokaslr' on cmdline."),
            (2.0, "[linux] KASLR disabled again"),
            (13.25, "[linux] gpupv-init: up 6.1.0"),
            (14.0, "[linux] gpupv-init: up 6.1.0"),
        ]);
        assert_eq!(span(&l, "KASLR disabled", "gpupv-init: up"), Some(12.25));
        assert_eq!(span(&l, "KASLR disabled", "never"), None);
        assert_eq!(span(&l, "never", "gpupv-init: up"), None);
    }

    #[test]
    fn modetest_frequencies() {
        assert_eq!(freq("freq: 59.94Hz"), Some(59.94));
        assert_eq!(freq("[linux] freq: 120.00Hz\r"), Some(120.0));
        assert_eq!(freq("freq: Hz"), None);
        assert_eq!(freq("frequency 60Hz"), None);
        assert_eq!(freq("freq: nanHz"), None);
        let l = stamped(&[
            (1.0, "freq: 10.00Hz"),
            (2.0, "freq: 40.00Hz"),
            (3.0, "freq: 44.00Hz"),
            (4.0, "freq: 41.00Hz"),
        ]);
        assert_eq!(flip_rate(&l), Some(41.0));
        assert_eq!(flip_rate(&l[..1]), Some(10.0));
        assert_eq!(flip_rate(&[]), None);
    }

    fn sample(t: u64, io: u64, hlt: u64) -> String {
        format!(
            "vm-exits sample: {{\"t_ms\":{t},\"vms\":[{{\"vm\":0,\"exits\":{{\"io\":{io},\"hlt\":{hlt}}}}},{{\"vm\":1,\"exits\":{{\"io\":7}}}}]}}"
        )
    }

    #[test]
    fn exit_samples_give_rates_over_a_window() {
        let s = exit_sample(&sample(500, 10, 2)).unwrap();
        assert_eq!(s.t_ms, 500);
        assert_eq!(s.vms[0].exits["io"], 10);
        assert_eq!(s.vms[1].vm, 1);
        assert!(exit_sample("gpu-pv sample: {}").is_none());
        assert!(exit_sample("vm-exits sample: {bad").is_none());
        let lines: Stamped = [
            sample(250, 1, 0),
            "start".into(),
            sample(500, 100, 1),
            sample(1000, 600, 3),
            sample(1500, 1100, 11),
            "end".into(),
            sample(2000, 9999, 99),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, l)| (i as f64, l))
        .collect();
        let r = exit_rates(&lines, 0, 1, 5).unwrap();
        assert_eq!(r["io"], 1000.0);
        assert_eq!(r["hlt"], 10.0);
        assert_eq!(r["total"], 1010.0);
        assert_eq!(exit_rates(&lines, 1, 1, 5).unwrap()["io"], 0.0);
        assert!(exit_rates(&lines, 2, 1, 5).is_none(), "no such VM");
        assert!(
            exit_rates(&lines, 0, 1, 3).is_none(),
            "one sample is no window"
        );
        assert!(exit_rates(&lines, 0, 5, 99).is_none());
    }

    #[test]
    fn figures_and_rows() {
        let hv = stamped(&[
            (0.0, "BdsDxe: loading"),
            (3.0, "[ INFO cpu0] vm linux created: 256 MiB"),
            (3.0, &sample(100, 0, 0)),
            (4.0, "[linux] KASLR disabled: 'nokaslr' on cmdline."),
            (5.0, &sample(1100, 5000, 10)),
            (23.0, &sample(3100, 45000, 30)),
            (24.0, "[linux] gpupv-init: up 6.1.0-57-amd64"),
            (30.0, "[linux] gpupv-init: flipping 35:640x480 for 10 s"),
            (31.0, "[linux] freq: 20.00Hz"),
            (32.0, &sample(10_000, 50_000, 40)),
            (33.0, "[linux] freq: 30.00Hz"),
            (34.0, &sample(12_000, 54_000, 40)),
            (35.0, "[linux] freq: 34.00Hz"),
        ]);
        let n = native();
        let f = figures(&hv, &n, 0);
        assert_eq!(f.boot, Some(20.0));
        assert_eq!(f.entry, Some(1.0));
        assert_eq!(f.hv_boot, Some(21.0));
        assert_eq!(f.flip_hz, Some(32.0));
        assert_eq!(f.mode.as_deref(), Some("640x480"));
        assert_eq!(f.exits_boot.as_ref().unwrap()["io"], 15000.0);
        assert_eq!(f.exits_draw.as_ref().unwrap()["io"], 2000.0);
        let nat = stamped(&[
            (1.0, "KASLR disabled: 'nokaslr' on cmdline."),
            (11.0, "gpupv-init: up 6.1.0-57-amd64"),
            (12.0, "gpupv-init: flipping 34:640x480 for 10 s"),
            (13.0, "freq: 50.00Hz"),
            (14.0, "freq: 64.00Hz"),
        ]);
        let g = figures(&nat, &n, 0);
        assert_eq!((g.boot, g.flip_hz, g.entry), (Some(10.0), Some(64.0), None));
        assert_eq!(g.exits_boot, None);
        let r = rows(
            "lb",
            &n,
            &[Some(g.clone()), None],
            &[Some(f.clone()), Some(f)],
        );
        let find = |m: &str| {
            r.iter()
                .find(|r| r.metric.starts_with(m))
                .unwrap_or_else(|| panic!("{m} in {r:#?}"))
                .value
                .clone()
        };
        assert_eq!(
            find("boot time ratio"),
            "2.00 (median of 1 pairs; min 2.00, max 2.00)"
        );
        assert_eq!(
            find("page-flip rate through the mediator"),
            "50.0 % (median of 1 pairs; min 50.0, max 50.0)"
        );
        assert!(find("boot: `KASLR disabled` to `gpupv-init: up`, QEMU").starts_with("10.00 s"));
        assert!(find("modetest -v page flips").starts_with("64.00 Hz"));
        let exits: Vec<&str> = r
            .iter()
            .filter(|r| r.metric.starts_with("exits/s booting"))
            .map(|r| r.metric.rsplit(": ").next().unwrap())
            .collect();
        assert_eq!(exits, ["total", "io", "hlt"]);
        assert!(r.iter().all(|r| r.scenario == "lb" && r.emulator == "qemu"));
    }

    #[test]
    fn native_command_line() {
        let cfg = "[[vm]]\nname=\"g\"\nmemory_mib=16\nimage=\"guests/draw.elf\"\n\
                   [[vm]]\nname=\"linux\"\nmemory_mib=256\nkernel=\"linux/vmlinuz\"\n\
                   initrd=\"linux/initramfs.cpio\"\ncmdline=\"console=ttyS0 gpupv.gpu\"\n";
        let (slot, vm) = linux_vm(cfg).unwrap();
        assert_eq!((slot, vm.name.as_str()), (1, "linux"));
        let a = native_args(
            &vm,
            Path::new("/k"),
            Some(Path::new("/i")),
            Path::new("/log"),
            &["-device".into(), "virtio-gpu-pci".into()],
        )
        .join(" ");
        assert!(
            a.starts_with("-nodefaults -machine q35 -accel tcg -cpu max -smp 1 -m 256M"),
            "{a}"
        );
        assert!(a.contains("-kernel /k -initrd /i -append console=ttyS0 gpupv.gpu -serial file:/log -no-reboot -display none -device virtio-gpu-pci"), "{a}");
        assert!(linux_vm("[[vm]]\nname=\"g\"\nmemory_mib=16\nimage=\"x.elf\"\n").is_err());
    }
}
