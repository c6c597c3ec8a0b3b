//! Scenario files: `tests/scenarios/*.toml` (the format is documented in `tests/README.md`).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Context, Result};

/// An emulator a scenario runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Emulator {
    /// QEMU with TCG (AMD SVM, VT-d, virtio-gpu).
    Qemu,
    /// Bochs (Intel VMX).
    Bochs,
}

impl fmt::Display for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Emulator::Qemu => "qemu",
            Emulator::Bochs => "bochs",
        })
    }
}

/// How the software under test is expected to end the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpectExit {
    /// Through the pass port protocol.
    Pass,
    /// Through the fail port protocol.
    Fail,
}

impl fmt::Display for ExpectExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExpectExit::Pass => "pass",
            ExpectExit::Fail => "fail",
        })
    }
}

/// Where QEMU boots from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootFrom {
    /// The ESP directory as a read-only FAT disk (QEMU's `fat:` driver).
    #[default]
    Dir,
    /// A GPT disk image as made by `cargo xtask image`.
    Image,
}

/// Default QEMU timeout in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
/// Default number of QEMU CPUs.
pub const DEFAULT_SMP: u32 = 2;
/// Default number of Bochs CPUs.
pub const DEFAULT_BOCHS_SMP: u32 = 1;
/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = crate::vmconfig::MIN_MACHINE_MIB;

/// A parsed scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// The file stem (`boot` for `boot.toml`).
    #[serde(skip)]
    pub name: String,
    /// The file.
    #[serde(skip)]
    pub path: PathBuf,
    /// What the scenario checks.
    pub description: String,
    /// The emulators it runs in.
    pub emulators: Vec<Emulator>,
    /// The kernel command line (the harness appends `harness`).
    #[serde(default)]
    pub cmdline: String,
    /// Inline VM config (the text of `hv/vms.toml`).
    #[serde(default)]
    pub config: Option<String>,
    /// VM config file, relative to the repository root.
    #[serde(default)]
    pub config_file: Option<PathBuf>,
    /// The expected way out.
    pub expect_exit: ExpectExit,
    /// Substrings that must appear in the serial log, in this order.
    #[serde(default)]
    pub expect: Vec<String>,
    /// Substrings that must each appear somewhere in the serial log, in any order (for
    /// output of concurrent VMs whose interleaving depends on timing).
    #[serde(default)]
    pub expect_unordered: Vec<String>,
    /// Substrings that must not appear anywhere in the serial log.
    #[serde(default)]
    pub forbid: Vec<String>,
    /// Hard timeout for QEMU, seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Hard timeout for Bochs, seconds (default: three times `timeout_secs`).
    #[serde(default)]
    pub bochs_timeout_secs: Option<u64>,
    /// QEMU CPUs.
    #[serde(default)]
    pub smp: Option<u32>,
    /// Bochs CPUs.
    #[serde(default)]
    pub bochs_smp: Option<u32>,
    /// Guest memory in MiB (both emulators).
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Extra QEMU arguments, appended after the standard ones.
    #[serde(default)]
    pub qemu_args: Vec<String>,
    /// QEMU boots the ESP directory (`dir`) or a GPT disk image of it (`image`).
    #[serde(default)]
    pub boot_from: BootFrom,
    /// Screendumps of the GPU's heads taken while QEMU runs, with pixel checks.
    #[serde(default)]
    pub screendump: Vec<Screendump>,
    /// Cargo features of the `hypervisor` package to build the booted hypervisor with
    /// (default none: the ordinary build).
    #[serde(default)]
    pub hv_features: Vec<String>,
    /// Keyboard input typed on COM1 (QEMU only), in order.
    #[serde(default)]
    pub input: Vec<Input>,
    /// `cargo xtask bench` only: also boot the config's Linux VM directly in QEMU,
    /// alternating with the hypervisor runs, and compare them.
    #[serde(default)]
    pub native: Option<Native>,
    /// Checks each listed VM's share of their GPU time against its weight.
    #[serde(default)]
    pub gpu_shares: Option<GpuShares>,
    /// Why the scenario is left out of the full suites (`qemu-test`/`bochs-test`
    /// without a filter, `cargo xtask test`): it runs when a filter names it.
    #[serde(default)]
    pub only_when_named: Option<String>,
}

/// A `[gpu_shares]` table: the listed VMs' GPU time (`used_ns` in the run's last
/// `gpu-pv counters:` line), each VM's share of their total against its `gpu_weight`'s
/// share of their weights.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpuShares {
    /// VM ids (configuration order).
    pub vms: Vec<usize>,
    /// Largest relative error allowed, e.g. 0.15: a share within 15 % of its weight's.
    pub tolerance: f64,
}

/// A `[native]` table: the config's first Linux VM (its kernel, initrd, command line,
/// memory and vCPUs) booted directly in QEMU (`-kernel`), alternating with the
/// scenario's own runs, each serial line timestamped by xtask as it arrives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Native {
    /// Runs of each kind: native, hypervisor, native, hypervisor, ... (default 2).
    #[serde(default = "default_native_runs")]
    pub runs: u32,
    /// The boot is timed from the first serial line containing this ...
    pub boot_from: String,
    /// ... to the first line after it containing this, in both kinds of run.
    pub boot_to: String,
    /// The hypervisor run's line that marks the VM's start (its boot is also timed
    /// from there), e.g. `vm linux created`.
    #[serde(default)]
    pub hv_start: Option<String>,
    /// Lines a native run must show (in order) to pass; it must also power off
    /// (QEMU exits with 0).
    #[serde(default)]
    pub expect: Vec<String>,
    /// Extra QEMU arguments of the native runs (its devices, e.g. the GPU).
    #[serde(default)]
    pub qemu_args: Vec<String>,
}

fn default_native_runs() -> u32 {
    2
}

/// One `[[input]]` table: text typed on the serial console once a line appears.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// Type once this substring appears in the serial log after the previous
    /// input was typed (or after the start, for the first) ...
    pub after: String,
    /// ... this text (TOML escapes: `\n` for Enter).
    pub send: String,
}

/// What the heads of a [`Screendump`] must show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShotExpect {
    /// Nothing: the dumps are only saved (and compared, with `changes_after_secs`).
    #[default]
    Any,
    /// Anything but QEMU's "Guest has not initialized the display (yet)." screen.
    Initialized,
    /// QEMU's "Guest has not initialized the display (yet)." screen.
    NotInitialized,
    /// Head `heads[i]` shows VM `vms[i]`'s colour (`abi::guest::vm_color`; `vms`
    /// defaults to `heads`) as its dominant colour, and is initialized. With `bands`,
    /// the same for each band, `vms` listing one VM per band.
    VmColors,
    /// Head `heads[i]` has the dominant colour `colors[i]`, and is initialized. With
    /// `bands`, the same for each band, `colors` listing one colour per band.
    Colors,
    /// Every colour in `colors` covers at least [`MIN_PRESENT_SHARE`] of each head
    /// (a test pattern of several colours, such as modetest's bars).
    ColorsPresent,
}

/// The share of a head's pixels a colour of `expect = "colors-present"` must cover.
pub const MIN_PRESENT_SHARE: f64 = 0.02;

impl fmt::Display for ShotExpect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShotExpect::Any => "any",
            ShotExpect::Initialized => "initialized",
            ShotExpect::NotInitialized => "not-initialized",
            ShotExpect::VmColors => "vm-colors",
            ShotExpect::Colors => "colors",
            ShotExpect::ColorsPresent => "colors-present",
        })
    }
}

/// A colour in a scenario file: `0xc03030` or `"#c03030"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ColorValue {
    /// `0x00RRGGBB`.
    Int(u32),
    /// `"#rrggbb"` (the `#` is optional).
    Text(String),
}

impl ColorValue {
    /// `0x00RRGGBB`.
    pub fn rgb(&self) -> Result<u32> {
        match self {
            ColorValue::Int(v) if *v <= 0x00ff_ffff => Ok(*v),
            ColorValue::Int(v) => Err(format!("colour {v:#x} is more than 24 bits")),
            ColorValue::Text(t) => {
                let h = t.strip_prefix('#').unwrap_or(t);
                match u32::from_str_radix(h, 16) {
                    Ok(v) if h.len() == 6 => Ok(v),
                    _ => Err(format!("colour {t:?} is not \"#rrggbb\"")),
                }
            }
        }
    }
}

/// A screendump trigger: one serial substring, or several that must all have appeared
/// (for displays of VMs that run concurrently, where no single line comes last).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum After {
    /// One substring.
    One(String),
    /// Every one of these substrings.
    All(Vec<String>),
}

impl After {
    /// The substrings.
    pub fn lines(&self) -> &[String] {
        match self {
            After::One(s) => core::slice::from_ref(s),
            After::All(v) => v,
        }
    }
}

/// Default per-channel tolerance of colour checks.
pub const DEFAULT_TOLERANCE: u8 = 16;

/// Most horizontal bands a head can be split into (the loader's VM limit).
pub const MAX_BANDS: u32 = 32;

/// One `[[screendump]]` table: when to dump which heads, and what they must show.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Screendump {
    /// Dump once this substring (or every one of these substrings, in any order)
    /// appears in the serial log ...
    #[serde(default)]
    pub after: Option<After>,
    /// ... or this many seconds after QEMU started.
    #[serde(default)]
    pub at_secs: Option<f64>,
    /// The heads (scanouts) to dump; default all of them.
    #[serde(default = "all_heads")]
    pub heads: Vec<u32>,
    /// What they must show.
    #[serde(default)]
    pub expect: ShotExpect,
    /// Each head shows this many VMs stacked vertically: its image is split into as
    /// many equal horizontal bands, each checked like a whole head (default 1).
    #[serde(default)]
    pub bands: Option<u32>,
    /// For `vm-colors`: the VM whose colour head `heads[i]` shows (default `heads`);
    /// with `bands = N`, one VM per band, head-major (default `heads[i] * N + b`).
    #[serde(default)]
    pub vms: Option<Vec<u32>>,
    /// For `colors`: the dominant colour of head `heads[i]` (with `bands`, of each
    /// band, head-major).
    #[serde(default)]
    pub colors: Option<Vec<ColorValue>>,
    /// Per-channel tolerance of the colour checks (default 16).
    #[serde(default)]
    pub tolerance: Option<u8>,
    /// Dump the heads again this much later and require each one to have changed.
    #[serde(default)]
    pub changes_after_secs: Option<f64>,
}

fn all_heads() -> Vec<u32> {
    (0..crate::qemu::SHOWN_HEADS).collect()
}

impl Screendump {
    fn validate(&self) -> Result<()> {
        match (&self.after, self.at_secs) {
            (Some(_), Some(_)) => return Err("give `after` or `at_secs`, not both".into()),
            (None, None) => return Err("needs `after` (a serial substring) or `at_secs`".into()),
            (Some(a), None) if a.lines().is_empty() || a.lines().iter().any(|l| l.is_empty()) => {
                return Err("`after` is empty".into())
            }
            (Some(a), None) if a.lines().len() > 64 => {
                return Err("`after` lists more than 64 lines".into())
            }
            (None, Some(t)) if !(t.is_finite() && t >= 0.0) => {
                return Err("`at_secs` must be a number >= 0".into())
            }
            _ => {}
        }
        if self.heads.is_empty() {
            return Err("`heads` is empty".into());
        }
        for (i, h) in self.heads.iter().enumerate() {
            if *h >= crate::qemu::GPU_HEADS {
                return Err(format!(
                    "head {h} does not exist (the GPU has {} heads)",
                    crate::qemu::GPU_HEADS
                ));
            }
            if self.heads[..i].contains(h) {
                return Err(format!("head {h} is listed twice"));
            }
        }
        if let Some(t) = self.changes_after_secs {
            if !(t.is_finite() && t > 0.0) {
                return Err("`changes_after_secs` must be a number > 0".into());
            }
        }
        let bands = self.bands();
        if !(1..=MAX_BANDS).contains(&bands) {
            return Err(format!("`bands` must be 1 to {MAX_BANDS}, not {bands}"));
        }
        if bands > 1 {
            match self.expect {
                ShotExpect::VmColors | ShotExpect::Colors => {}
                ShotExpect::Any if self.changes_after_secs.is_some() => {}
                ShotExpect::Any => {
                    return Err(format!(
                        "`bands = {bands}` with `expect = \"any\"` checks nothing: add \
                         `changes_after_secs` (each band must change) or a colour check"
                    ))
                }
                e @ (ShotExpect::Initialized
                | ShotExpect::NotInitialized
                | ShotExpect::ColorsPresent) => {
                    return Err(format!(
                        "`bands = {bands}` goes with `expect = \"vm-colors\"`, `\"colors\"` \
                         or `\"any\"`, not `\"{e}\"` (QEMU's not-initialized screen covers \
                         a whole head; check it with a table without `bands`)"
                    ))
                }
            }
        }
        let n = self.heads.len() * bands as usize;
        let per = if bands > 1 {
            format!("`heads` x `bands` = {n} (one per band, head-major)")
        } else {
            format!("`heads` {n}")
        };
        match (&self.vms, self.expect) {
            (Some(v), ShotExpect::VmColors) if v.len() != n => {
                return Err(format!("`vms` has {} entries, {per}", v.len()))
            }
            (Some(_), e) if e != ShotExpect::VmColors => {
                return Err("`vms` goes with `expect = \"vm-colors\"`".into())
            }
            _ => {}
        }
        match (&self.colors, self.expect) {
            (Some(c), ShotExpect::Colors) => {
                if c.len() != n {
                    return Err(format!("`colors` has {} entries, {per}", c.len()));
                }
                for c in c {
                    c.rgb()?;
                }
            }
            (Some(c), ShotExpect::ColorsPresent) => {
                if c.is_empty() {
                    return Err("`colors` is empty".into());
                }
                for c in c {
                    c.rgb()?;
                }
            }
            (None, ShotExpect::Colors | ShotExpect::ColorsPresent) => {
                return Err(format!("`expect = \"{}\"` needs `colors`", self.expect))
            }
            (Some(_), _) => {
                return Err(
                    "`colors` goes with `expect = \"colors\"` or `\"colors-present\"`".into(),
                )
            }
            _ => {}
        }
        if self.tolerance.is_some()
            && !matches!(
                self.expect,
                ShotExpect::VmColors | ShotExpect::Colors | ShotExpect::ColorsPresent
            )
        {
            return Err(
                "`tolerance` goes with `expect = \"vm-colors\"`, `\"colors\"` or `\"colors-present\"`"
                    .into(),
            );
        }
        Ok(())
    }

    /// The number of horizontal bands each head is split into (`bands`, default 1).
    pub fn bands(&self) -> u32 {
        self.bands.unwrap_or(1)
    }

    /// The index of band `band` of head `heads[i]` in the head-major list of bands
    /// (`vms`, `colors`): `i * bands + band`.
    pub fn slot(&self, i: usize, band: u32) -> usize {
        i * self.bands() as usize + band as usize
    }

    /// The colour band `slot` (see [`Screendump::slot`]; without bands, head
    /// `heads[slot]`) must have as its dominant colour, and where that expectation
    /// comes from (for messages); `None` when no colour is expected.
    pub fn expected_color(&self, slot: usize) -> Option<(u32, String)> {
        match self.expect {
            ShotExpect::VmColors => {
                let vm = match &self.vms {
                    Some(v) => *v.get(slot)?,
                    None => {
                        let bands = self.bands() as usize;
                        let head = *self.heads.get(slot / bands)?;
                        head * self.bands() + (slot % bands) as u32
                    }
                };
                Some((gpu_pv::abi::guest::vm_color(vm), format!("vm_color({vm})")))
            }
            ShotExpect::Colors => {
                let c = self.colors.as_ref()?.get(slot)?.rgb().ok()?;
                Some((c, format!("colors[{slot}]")))
            }
            _ => None,
        }
    }

    /// The per-channel tolerance of colour checks.
    pub fn tolerance(&self) -> u8 {
        self.tolerance.unwrap_or(DEFAULT_TOLERANCE)
    }

    /// The trigger, for messages: `after "..."` or `at 6s`.
    pub fn trigger(&self) -> String {
        match (&self.after, self.at_secs) {
            (Some(After::One(a)), _) => format!("after {a:?}"),
            (Some(After::All(v)), _) => format!("after all of {v:?}"),
            (None, Some(t)) => format!("at {t}s"),
            (None, None) => "never".into(),
        }
    }
}

impl Scenario {
    /// Parses and validates scenario text; `name` and `path` are for messages.
    pub fn parse(name: &str, path: &Path, text: &str) -> Result<Scenario> {
        let mut s: Scenario =
            toml::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?;
        s.name = name.to_string();
        s.path = path.to_path_buf();
        s.validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(s)
    }

    fn validate(&self) -> Result<()> {
        if self.emulators.is_empty() {
            return Err("`emulators` is empty".into());
        }
        if self.config.is_some() && self.config_file.is_some() {
            return Err("give `config` or `config_file`, not both".into());
        }
        if self.timeout_secs == Some(0) || self.bochs_timeout_secs == Some(0) {
            return Err("timeouts must be positive".into());
        }
        if self.smp == Some(0) || self.bochs_smp == Some(0) || self.memory_mib == Some(0) {
            return Err("`smp`, `bochs_smp` and `memory_mib` must be positive".into());
        }
        let all = self
            .expect
            .iter()
            .chain(&self.expect_unordered)
            .chain(&self.forbid);
        if all.clone().any(|s| s.is_empty()) {
            return Err(
                "empty strings in `expect`/`expect_unordered`/`forbid` match everything".into(),
            );
        }
        if self.cmdline.contains(['\n', '\r']) {
            return Err("`cmdline` must be one line".into());
        }
        // The loader's own check of the hypervisor command line (a scenario about a
        // bad one expects its `config error`).
        if !self.expect.iter().any(|e| e.contains("config error")) {
            boot_info::cmdline::check(&self.cmdline).map_err(|e| format!("`cmdline`: {e}"))?;
        }
        if self.boot_from == BootFrom::Image && self.emulators.contains(&Emulator::Bochs) {
            return Err("`boot_from = \"image\"` is supported for qemu only".into());
        }
        if !self.screendump.is_empty() && self.emulators.contains(&Emulator::Bochs) {
            return Err("`[[screendump]]` needs QEMU's GPU: list only \"qemu\"".into());
        }
        for (i, d) in self.screendump.iter().enumerate() {
            d.validate()
                .map_err(|e| format!("[[screendump]] #{}: {e}", i + 1))?;
        }
        if !self.input.is_empty() && self.emulators.contains(&Emulator::Bochs) {
            return Err("`[[input]]` is typed into QEMU's serial port: list only \"qemu\"".into());
        }
        if let Some(i) = self
            .input
            .iter()
            .position(|i| i.after.is_empty() || i.send.is_empty())
        {
            return Err(format!("[[input]] #{}: empty `after` or `send`", i + 1));
        }
        if let Some(n) = &self.native {
            if self.emulators != [Emulator::Qemu] {
                return Err("`[native]` compares QEMU runs: list only \"qemu\"".into());
            }
            if !(1..=20).contains(&n.runs) {
                return Err("`[native]`: `runs` must be 1 to 20".into());
            }
            let lines = [&n.boot_from, &n.boot_to].into_iter().chain(&n.hv_start);
            if lines.chain(&n.expect).any(|l| l.is_empty()) {
                return Err("`[native]`: empty line to look for".into());
            }
        }
        for (i, f) in self.hv_features.iter().enumerate() {
            let mut chars = f.chars();
            let ok = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                return Err(format!(
                    "`hv_features`: {f:?} is not a feature name of the hypervisor package \
                     (letters, digits, '_' and '-', not starting with '-')"
                ));
            }
            if self.hv_features[..i].contains(f) {
                return Err(format!("`hv_features`: {f:?} is listed twice"));
            }
        }
        Ok(())
    }

    /// The hypervisor build this scenario boots: `None` for the ordinary one, else its
    /// `hv_features` sorted by name and joined by `+` (`a+b`), which names the build's
    /// directory and the `--prebuilt` file (`hypervisor-a+b`).
    pub fn hv_features_key(&self) -> Option<String> {
        if self.hv_features.is_empty() {
            return None;
        }
        let mut f: Vec<&str> = self.hv_features.iter().map(String::as_str).collect();
        f.sort_unstable();
        Some(f.join("+"))
    }

    /// The command line written to `hv/cmdline.txt`: the scenario's plus `harness`.
    pub fn harness_cmdline(&self) -> String {
        let mut tokens: Vec<&str> = self.cmdline.split_whitespace().collect();
        if !tokens.contains(&"harness") {
            tokens.push("harness");
        }
        tokens.join(" ")
    }

    /// The VM config text, checked with the loader's parser unless the scenario is
    /// about a bad config (it expects the loader's `config error`).
    pub fn config_text(&self, root: &Path) -> Result<String> {
        let text = match (&self.config, &self.config_file) {
            (Some(c), _) => c.clone(),
            (None, f) => {
                let file = match f {
                    Some(f) => root.join(f),
                    None => root.join("config").join("vms.toml"),
                };
                std::fs::read_to_string(&file)
                    .ctx(|| format!("{}: cannot read config {}", self.name, file.display()))?
            }
        };
        if !self.expect.iter().any(|e| e.contains("config error")) {
            crate::vmconfig::check(&text).map_err(|e| format!("{}: {e}", self.name))?;
        }
        Ok(text)
    }

    /// QEMU's hard timeout.
    pub fn qemu_timeout_secs(&self) -> u64 {
        self.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS)
    }

    /// Bochs's hard timeout.
    pub fn bochs_timeout_secs(&self) -> u64 {
        self.bochs_timeout_secs
            .unwrap_or(3 * self.qemu_timeout_secs())
    }

    /// QEMU's CPU count.
    pub fn qemu_smp(&self) -> u32 {
        self.smp.unwrap_or(DEFAULT_SMP)
    }

    /// Bochs's CPU count.
    pub fn bochs_cpus(&self) -> u32 {
        self.bochs_smp.unwrap_or(DEFAULT_BOCHS_SMP)
    }

    /// The emulated machine's memory: `memory_mib`, or what its VM config `config`
    /// needs ([`crate::vmconfig::machine_memory_mib`]).
    pub fn memory(&self, config: &str) -> u32 {
        self.memory_mib
            .unwrap_or_else(|| crate::vmconfig::machine_memory_mib(config))
    }
}

/// Loads every `*.toml` of `dir`, sorted by name.
pub fn load_dir(dir: &Path) -> Result<Vec<Scenario>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir)
        .ctx(|| format!("cannot read scenario directory {}", dir.display()))?;
    for e in rd {
        let e = e.ctx(|| format!("cannot read {}", dir.display()))?;
        let p = e.path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let Some(name) = p.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        let text = std::fs::read_to_string(&p).ctx(|| format!("cannot read {}", p.display()))?;
        out.push(Scenario::parse(&name, &p, &text)?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario> {
        Scenario::parse("t", Path::new("t.toml"), text)
    }

    #[test]
    fn native_tables() {
        let base = "description = \"d\"\nemulators = [\"qemu\"]\nexpect_exit = \"pass\"\n";
        let native = "[native]\nboot_from = \"a\"\nboot_to = \"b\"\n";
        let s = parse(&format!("{base}{native}")).unwrap();
        let n = s.native.unwrap();
        assert_eq!(
            (n.runs, n.boot_from.as_str(), n.boot_to.as_str()),
            (2, "a", "b")
        );
        assert!(n.hv_start.is_none() && n.expect.is_empty() && n.qemu_args.is_empty());
        assert!(parse(base).unwrap().native.is_none());
        let bochs = base.replace("[\"qemu\"]", "[\"qemu\", \"bochs\"]");
        assert!(parse(&format!("{bochs}{native}"))
            .unwrap_err()
            .contains("only \"qemu\""));
        for bad in [
            "runs = 0\n",
            "runs = 21\n",
            "expect = [\"\"]\n",
            "typo = 1\n",
        ] {
            assert!(parse(&format!("{base}{native}{bad}")).is_err(), "{bad}");
        }
        assert!(parse(&format!("{base}[native]\nboot_from = \"a\"\n")).is_err());
    }

    #[test]
    fn minimal_and_defaults() {
        let s =
            parse("description = \"d\"\nemulators = [\"qemu\"]\nexpect_exit = \"pass\"\n").unwrap();
        assert_eq!(s.harness_cmdline(), "harness");
        assert_eq!(s.qemu_smp(), 2);
        assert_eq!(s.bochs_cpus(), 1);
        assert_eq!(s.memory(""), 512);
        assert_eq!(s.qemu_timeout_secs(), 60);
        assert_eq!(s.bochs_timeout_secs(), 180);
        assert_eq!(s.boot_from, BootFrom::Dir);
    }

    #[test]
    fn harness_token_added_once() {
        let s = parse("description = \"d\"\nemulators = [\"qemu\"]\nexpect_exit = \"fail\"\ncmdline = \" test=boot  harness \"\n").unwrap();
        assert_eq!(s.harness_cmdline(), "test=boot harness");
        let s = parse("description = \"d\"\nemulators = [\"qemu\"]\nexpect_exit = \"fail\"\ncmdline = \"test=boot\"\n").unwrap();
        assert_eq!(s.harness_cmdline(), "test=boot harness");
    }

    #[test]
    fn rejects_bad_files() {
        let base = "description = \"d\"\nexpect_exit = \"pass\"\n";
        assert!(parse(&format!("{base}emulators = []\n")).is_err());
        assert!(parse(&format!("{base}emulators = [\"vbox\"]\n")).is_err());
        assert!(parse(&format!("{base}emulators = [\"qemu\"]\nexpectt = []\n")).is_err());
        assert!(parse(&format!(
            "{base}emulators = [\"qemu\"]\nconfig = \"\"\nconfig_file = \"x\"\n"
        ))
        .is_err());
        assert!(parse(&format!("{base}emulators = [\"qemu\"]\nexpect = [\"\"]\n")).is_err());
        assert!(parse(&format!(
            "{base}emulators = [\"qemu\"]\nexpect_unordered = [\"\"]\n"
        ))
        .is_err());
        assert!(parse(&format!(
            "{base}emulators = [\"bochs\"]\nboot_from = \"image\"\n"
        ))
        .is_err());
        assert!(
            parse("description = \"d\"\nemulators = [\"qemu\"]\nexpect_exit = \"maybe\"\n")
                .is_err()
        );
    }

    #[test]
    fn screendump_tables() {
        let base = "description = \"d\"\nemulators = [\"qemu\"]\nexpect_exit = \"pass\"\n";
        let s = parse(&format!(
            "{base}[[screendump]]\nafter = \"draw vm0: frame 20\"\nheads = [0, 1, 2, 3]\n\
             expect = \"vm-colors\"\nchanges_after_secs = 1.0\n\
             [[screendump]]\nat_secs = 6\nexpect = \"colors\"\nheads = [2]\ncolors = [\"#0d420d\"]\ntolerance = 3\n"
        ))
        .unwrap();
        assert_eq!(s.screendump.len(), 2);
        let a = &s.screendump[0];
        assert_eq!(a.expect, ShotExpect::VmColors);
        assert_eq!(a.changes_after_secs, Some(1.0));
        assert_eq!(a.expected_color(2), Some((0x3050c0, "vm_color(2)".into())));
        assert_eq!(a.tolerance(), DEFAULT_TOLERANCE);
        assert_eq!(a.trigger(), "after \"draw vm0: frame 20\"");
        let b = &s.screendump[1];
        assert_eq!(b.at_secs, Some(6.0));
        assert_eq!(b.trigger(), "at 6s");
        assert_eq!(b.expected_color(0), Some((0x0d420d, "colors[0]".into())));
        assert_eq!(b.tolerance(), 3);
        // Defaults: every head, no check.
        let s = parse(&format!("{base}[[screendump]]\nat_secs = 1.5\n")).unwrap();
        assert_eq!(s.screendump[0].heads, vec![0, 1, 2, 3]);
        assert_eq!(s.screendump[0].expect, ShotExpect::Any);
        assert_eq!(s.screendump[0].expected_color(0), None);
        let bad = [
            "[[screendump]]\nheads = [0]\n",
            "[[screendump]]\nafter = \"x\"\nat_secs = 1\n",
            "[[screendump]]\nafter = \"\"\n",
            "[[screendump]]\nafter = []\n",
            "[[screendump]]\nafter = [\"a\", \"\"]\n",
            "[[screendump]]\nat_secs = -1\n",
            "[[screendump]]\nat_secs = 1\nheads = []\n",
            "[[screendump]]\nat_secs = 1\nheads = [16]\n",
            "[[screendump]]\nat_secs = 1\nheads = [1, 1]\n",
            "[[screendump]]\nat_secs = 1\nexpect = \"vm-colours\"\n",
            "[[screendump]]\nat_secs = 1\nexpect = \"colors\"\n",
            "[[screendump]]\nat_secs = 1\nexpect = \"colors\"\nheads = [0]\ncolors = [1, 2]\n",
            "[[screendump]]\nat_secs = 1\nexpect = \"colors\"\nheads = [0]\ncolors = [\"red\"]\n",
            "[[screendump]]\nat_secs = 1\nexpect = \"colors\"\nheads = [0]\ncolors = [0x1000000]\n",
            "[[screendump]]\nat_secs = 1\ncolors = [1]\nheads = [0]\n",
            "[[screendump]]\nat_secs = 1\nvms = [1]\nheads = [0]\n",
            "[[screendump]]\nat_secs = 1\nexpect = \"vm-colors\"\nvms = [1]\nheads = [0, 1]\n",
            "[[screendump]]\nat_secs = 1\ntolerance = 5\n",
            "[[screendump]]\nat_secs = 1\nchanges_after_secs = 0\n",
            "[[screendump]]\nat_secs = 1\nafterr = \"x\"\n",
        ];
        for b in bad {
            assert!(parse(&format!("{base}{b}")).is_err(), "{b}");
        }
        let both = "description = \"d\"\nemulators = [\"qemu\", \"bochs\"]\nexpect_exit = \"pass\"\n[[screendump]]\nat_secs = 1\n";
        assert!(parse(both).is_err());
    }

    #[test]
    fn screendump_bands() {
        let base = "description = \"d\"\nemulators = [\"qemu\"]\nexpect_exit = \"pass\"\n";
        let s = parse(&format!(
            "{base}[[screendump]]\nat_secs = 1\nheads = [1, 3]\nbands = 2\nexpect = \"vm-colors\"\n\
             [[screendump]]\nat_secs = 1\nheads = [0, 1]\nbands = 3\nexpect = \"vm-colors\"\n\
             vms = [7, 6, 5, 4, 3, 2]\nchanges_after_secs = 0.5\n\
             [[screendump]]\nat_secs = 1\nheads = [2]\nbands = 2\nexpect = \"colors\"\n\
             colors = [0x102030, \"#405060\"]\n\
             [[screendump]]\nat_secs = 1\nbands = 4\nchanges_after_secs = 1\n\
             [[screendump]]\nat_secs = 1\nheads = [2]\nbands = 1\nexpect = \"initialized\"\n"
        ))
        .unwrap();
        let d = &s.screendump;
        // Default VMs: heads[i] * bands + band, head-major.
        assert_eq!(d[0].bands(), 2);
        assert_eq!(d[0].slot(1, 0), 2);
        let vms: Vec<String> = (0..4).map(|k| d[0].expected_color(k).unwrap().1).collect();
        assert_eq!(
            vms,
            ["vm_color(2)", "vm_color(3)", "vm_color(6)", "vm_color(7)"]
        );
        assert_eq!(d[0].expected_color(4), None);
        // Explicit VMs, one per band.
        assert_eq!(d[1].slot(1, 2), 5);
        assert_eq!(
            d[1].expected_color(d[1].slot(1, 2)),
            Some((gpu_pv::abi::guest::vm_color(2), "vm_color(2)".into()))
        );
        assert_eq!(d[2].expected_color(1), Some((0x405060, "colors[1]".into())));
        assert_eq!(d[3].expect, ShotExpect::Any);
        assert_eq!(d[3].heads, vec![0, 1, 2, 3]);
        assert_eq!(d[4].bands(), 1);
        // Without bands nothing changes: one slot per head.
        let s = parse(&format!(
            "{base}[[screendump]]\nat_secs = 1\nexpect = \"vm-colors\"\n"
        ))
        .unwrap();
        assert_eq!(s.screendump[0].bands(), 1);
        assert_eq!(s.screendump[0].slot(3, 0), 3);
        assert_eq!(s.screendump[0].expected_color(3).unwrap().1, "vm_color(3)");
        let bad = [
            (
                "bands = 0\nexpect = \"vm-colors\"\n",
                "`bands` must be 1 to 32, not 0",
            ),
            ("bands = 33\nexpect = \"vm-colors\"\n", "not 33"),
            ("bands = -1\nexpect = \"vm-colors\"\n", "bands"),
            ("bands = 2\n", "checks nothing"),
            ("bands = 2\nexpect = \"any\"\n", "checks nothing"),
            (
                "bands = 2\nexpect = \"initialized\"\n",
                "not `\"initialized\"`",
            ),
            (
                "bands = 2\nexpect = \"not-initialized\"\nchanges_after_secs = 1\n",
                "not `\"not-initialized\"`",
            ),
            (
                "bands = 2\nheads = [0, 1]\nexpect = \"vm-colors\"\nvms = [0, 1]\n",
                "`vms` has 2 entries, `heads` x `bands` = 4 (one per band, head-major)",
            ),
            (
                "bands = 3\nheads = [0]\nexpect = \"colors\"\ncolors = [1, 2]\n",
                "`colors` has 2 entries, `heads` x `bands` = 3",
            ),
            ("bandz = 2\n", "bandz"),
        ];
        for (b, msg) in bad {
            let e = parse(&format!("{base}[[screendump]]\nat_secs = 1\n{b}")).unwrap_err();
            assert!(e.contains(msg), "{b}: {e}");
            assert!(e.starts_with("t.toml: "), "{e}");
        }
    }

    #[test]
    fn hv_features() {
        let base = "description = \"d\"\nemulators = [\"qemu\"]\nexpect_exit = \"pass\"\n";
        let s = parse(base).unwrap();
        assert!(s.hv_features.is_empty());
        assert_eq!(s.hv_features_key(), None);
        let s = parse(&format!("{base}hv_features = []\n")).unwrap();
        assert_eq!(s.hv_features_key(), None);
        let s = parse(&format!("{base}hv_features = [\"test-inject\"]\n")).unwrap();
        assert_eq!(s.hv_features, ["test-inject"]);
        assert_eq!(s.hv_features_key().as_deref(), Some("test-inject"));
        // The key is canonical: sorted, so the same set is built once.
        let s = parse(&format!("{base}hv_features = [\"zz\", \"a_b\", \"m-1\"]\n")).unwrap();
        assert_eq!(s.hv_features_key().as_deref(), Some("a_b+m-1+zz"));
        for (b, msg) in [
            ("hv_features = \"test-inject\"", "invalid type"),
            ("hv_features = [\"\"]", "is not a feature name"),
            ("hv_features = [\"-x\"]", "is not a feature name"),
            ("hv_features = [\"a+b\"]", "is not a feature name"),
            ("hv_features = [\"a,b\"]", "is not a feature name"),
            ("hv_features = [\"gpu-pv/std\"]", "is not a feature name"),
            ("hv_features = [\"dep:x\"]", "is not a feature name"),
            (
                "hv_features = [\"a\", \"b\", \"a\"]",
                "\"a\" is listed twice",
            ),
            ("hv_feature = [\"a\"]", "unknown field"),
        ] {
            let e = parse(&format!("{base}{b}\n")).unwrap_err();
            assert!(e.contains(msg), "{b}: {e}");
        }
    }

    /// Every scenario in the repository parses, its config is readable and the
    /// hypervisor features it asks for exist.
    #[test]
    fn repository_scenarios_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let all = load_dir(&root.join("tests/scenarios")).unwrap();
        assert!(!all.is_empty());
        let manifest = std::fs::read_to_string(root.join("hypervisor/Cargo.toml")).unwrap();
        let manifest: toml::Table = toml::from_str(&manifest).unwrap();
        let features = manifest.get("features").and_then(toml::Value::as_table);
        for s in &all {
            s.config_text(root).unwrap();
            for f in &s.hv_features {
                assert!(
                    features.is_some_and(|t| t.contains_key(f)),
                    "{}: hv_features: hypervisor/Cargo.toml has no feature {f:?}",
                    s.name
                );
            }
        }
    }

    /// The default demo config is valid TOML with four VMs.
    #[test]
    fn default_config_is_toml() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let text = std::fs::read_to_string(root.join("config/vms.toml")).unwrap();
        let v: toml::Table = toml::from_str(&text).unwrap();
        let vms = v["vm"].as_array().unwrap();
        assert_eq!(vms.len(), 4);
        for (i, vm) in vms.iter().enumerate() {
            assert_eq!(vm["name"].as_str().unwrap(), format!("vm{i}"));
        }
    }
}
