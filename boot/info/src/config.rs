//! The VM configuration file (`\hv\vms.toml` on the ESP).
//!
//! ```toml
//! [scheduler]            # optional
//! quantum_ms = 2         # GPU time slice, 1..=10
//! mode = "best-effort"   # or "equal-share", "fixed-share"
//!
//! [[vm]]                 # one table per VM, 1..=32 of them
//! name = "vm0"           # unique, 1..=31 bytes
//! memory_mib = 16        # guest RAM, 4..=2816 (ends below the MMIO at 0xB0000000)
//! vcpus = 1              # 1..=16
//! image = "guests/hello.elf"  # path below \hv\ on the ESP
//! gpu_weight = 1         # GPU share weight, 1..=1000 (default 1)
//! gpu_alpha = 0.0        # priority boost alpha, 0.0..=2.0 (default 0)
//! vram_quota_mib = 64    # optional; default: a quarter of the GPU's VRAM
//! hv_memory_mib = 8      # hypervisor memory the VM may make it keep, 1..=1024 (default 8)
//! ```
//! Unknown keys are errors, so a typo never silently falls back to a default.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use serde::Deserialize;

/// GPU scheduler mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchedMode {
    /// Idle VMs' time goes to the busy ones.
    #[default]
    BestEffort,
    /// Every VM gets the same slot, used or not.
    EqualShare,
    /// Every VM gets a slot by its weight, used or not.
    FixedShare,
}

impl SchedMode {
    /// The number carried in `BootInfo::gpu_sched_mode`.
    pub fn code(self) -> u32 {
        match self {
            SchedMode::BestEffort => 0,
            SchedMode::EqualShare => 1,
            SchedMode::FixedShare => 2,
        }
    }

    /// The mode whose [`SchedMode::code`] is `code`, if any.
    pub fn from_code(code: u32) -> Option<SchedMode> {
        [
            SchedMode::BestEffort,
            SchedMode::EqualShare,
            SchedMode::FixedShare,
        ]
        .into_iter()
        .find(|m| m.code() == code)
    }
}

/// The `[scheduler]` table.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// GPU time slice in milliseconds.
    #[serde(default = "default_quantum")]
    pub quantum_ms: u32,
    /// Scheduler mode.
    #[serde(default)]
    pub mode: SchedMode,
}

fn default_quantum() -> u32 {
    2
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            quantum_ms: default_quantum(),
            mode: SchedMode::default(),
        }
    }
}

/// One `[[vm]]` table.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Unique name.
    pub name: String,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPU count.
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Guest image path below `\hv\` (an ELF guest of this hypervisor's ABI);
    /// exactly one of `image` and `kernel`.
    #[serde(default)]
    pub image: Option<String>,
    /// Linux kernel (a bzImage) path below `\hv\`, booted with the Linux x86
    /// 64-bit boot protocol.
    #[serde(default)]
    pub kernel: Option<String>,
    /// The Linux kernel's initial RAM disk, path below `\hv\` (only with `kernel`).
    #[serde(default)]
    pub initrd: Option<String>,
    /// The Linux kernel's command line (only with `kernel`).
    #[serde(default)]
    pub cmdline: Option<String>,
    /// GPU share weight.
    #[serde(default = "one")]
    pub gpu_weight: u32,
    /// Priority boost alpha.
    #[serde(default)]
    pub gpu_alpha: f64,
    /// VRAM quota in MiB.
    #[serde(default)]
    pub vram_quota_mib: Option<u32>,
    /// Hypervisor memory budget in MiB: what the VM's GPU traffic may make the
    /// hypervisor keep (records, staged commands, grants, a simulated GPU's pixels).
    #[serde(default = "default_hv_memory")]
    pub hv_memory_mib: u32,
}

fn one() -> u32 {
    1
}

/// Budget of a VM whose table names none (`gpu_pv::budget::DEFAULT_BUDGET`).
pub const DEFAULT_HV_MEMORY_MIB: u32 = 8;

/// Largest budget: the hypervisor reserves every VM's budget at boot.
pub const MAX_HV_MEMORY_MIB: u32 = 1024;

fn default_hv_memory() -> u32 {
    DEFAULT_HV_MEMORY_MIB
}

/// Smallest guest RAM in MiB: the guest ABI's minimum (`guest_abi::guest`: page
/// tables, boot-info page and the stack below the image at 2 MiB), which the
/// hypervisor checks again when it creates a VM.
pub const MIN_MEMORY_MIB: u32 = guest_abi::guest::MIN_MEMORY_MIB;

/// Largest guest RAM in MiB. RAM is guest-physical `0..memory_mib` MiB and must end at
/// or below the lowest MMIO window every guest sees: its PCI ECAM at 0xB000_0000
/// (`GUEST_ECAM_BASE` in `hypervisor/src/vm.rs`); the virtual GPU's BARs follow at
/// 0xC000_0000 (`BAR4_BASE`, `BAR1_BASE`) and the local APIC at 0xFEE0_0000. More RAM
/// would sit where the guest expects those devices. 0xB000_0000 bytes = 2816 MiB.
pub const MAX_MEMORY_MIB: u32 = (0xb000_0000u64 >> 20) as u32;

/// What a VM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guest<'a> {
    /// An ELF guest of this hypervisor's ABI.
    Elf(&'a str),
    /// A Linux kernel.
    Linux {
        /// The bzImage.
        kernel: &'a str,
        /// Its initial RAM disk.
        initrd: Option<&'a str>,
        /// Its command line.
        cmdline: &'a str,
    },
}

/// Longest Linux command line in a config (`linux_boot::MAX_CMDLINE`; the kernel's
/// own limit, 2047 bytes for Debian's, is checked when it is loaded).
pub const MAX_LINUX_CMDLINE: usize = 4095;

impl VmConfig {
    /// What the VM runs (validated: exactly one of `image` and `kernel`).
    pub fn guest(&self) -> Guest<'_> {
        match (&self.image, &self.kernel) {
            (_, Some(kernel)) => Guest::Linux {
                kernel,
                initrd: self.initrd.as_deref(),
                cmdline: self.cmdline.as_deref().unwrap_or(""),
            },
            (Some(image), None) => Guest::Elf(image),
            (None, None) => Guest::Elf(""),
        }
    }

    /// Alpha in tenths (0..=20), as the scheduler takes it.
    pub fn alpha_tenths(&self) -> u32 {
        // Validated to 0.0..=2.0 before this is called.
        (self.gpu_alpha * 10.0 + 0.5) as u32
    }
}

/// The whole file.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Scheduler settings.
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    /// The VMs.
    #[serde(default)]
    pub vm: Vec<VmConfig>,
}

/// Why a configuration was refused.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigError {
    /// Not valid TOML or wrong types/keys (the parser's message, with line and column).
    Syntax(String),
    /// No `[[vm]]` table.
    NoVms,
    /// More VMs than [`crate::MAX_VMS`].
    TooManyVms(usize),
    /// A field out of its range: (vm name or "scheduler", field, why).
    Invalid(String, &'static str, &'static str),
    /// Two VMs share a name.
    DuplicateName(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Syntax(m) => write!(f, "syntax: {}", m.trim_end()),
            ConfigError::NoVms => write!(f, "no [[vm]] defined"),
            ConfigError::TooManyVms(n) => write!(f, "{n} VMs defined, at most {}", crate::MAX_VMS),
            ConfigError::Invalid(vm, field, why) => write!(f, "{vm}: {field} {why}"),
            ConfigError::DuplicateName(n) => write!(f, "VM name {n:?} used twice"),
        }
    }
}

/// Parses and validates a configuration.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
    validate(&cfg)?;
    Ok(cfg)
}

fn validate(cfg: &Config) -> Result<(), ConfigError> {
    let bad = |vm: &str, field, why| Err(ConfigError::Invalid(vm.to_string(), field, why));
    if !(1..=10).contains(&cfg.scheduler.quantum_ms) {
        return bad("scheduler", "quantum_ms", "must be 1..=10");
    }
    if cfg.vm.is_empty() {
        return Err(ConfigError::NoVms);
    }
    if cfg.vm.len() > crate::MAX_VMS {
        return Err(ConfigError::TooManyVms(cfg.vm.len()));
    }
    for (i, vm) in cfg.vm.iter().enumerate() {
        let n = vm.name.as_str();
        if n.is_empty() || n.len() >= crate::NAME_LEN {
            return bad(n, "name", "must be 1..=31 bytes");
        }
        if !n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad(n, "name", "may hold only letters, digits, '-' and '_'");
        }
        if cfg.vm[..i].iter().any(|o| o.name == vm.name) {
            return Err(ConfigError::DuplicateName(vm.name.clone()));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&vm.memory_mib) {
            return bad(
                n,
                "memory_mib",
                "must be 4..=2816: the guest ABI needs 4 MiB, and guest RAM must end below the guest's MMIO windows at 0xB0000000",
            );
        }
        if !(1..=16).contains(&vm.vcpus) {
            return bad(n, "vcpus", "must be 1..=16");
        }
        let path_ok = |p: &str| !p.is_empty() && p.len() < crate::NAME_LEN && !p.contains("..");
        const PATH: &str = "must be a path of 1..=31 bytes below \\hv\\ without '..'";
        match (&vm.image, &vm.kernel) {
            (Some(_), Some(_)) | (None, None) => {
                return bad(n, "image", "or kernel: exactly one of them is needed");
            }
            (Some(image), None) => {
                if !path_ok(image) {
                    return bad(n, "image", PATH);
                }
                if vm.initrd.is_some() || vm.cmdline.is_some() {
                    return bad(n, "initrd", "and cmdline go only with kernel");
                }
            }
            (None, Some(kernel)) => {
                if !path_ok(kernel) {
                    return bad(n, "kernel", PATH);
                }
                if vm.initrd.as_deref().is_some_and(|p| !path_ok(p)) {
                    return bad(n, "initrd", PATH);
                }
                let cmdline = vm.cmdline.as_deref().unwrap_or("");
                if cmdline.len() > MAX_LINUX_CMDLINE {
                    return bad(n, "cmdline", "must be at most 4095 bytes");
                }
                if cmdline.contains(|c: char| c.is_control()) {
                    return bad(n, "cmdline", "must be one line of printable text");
                }
            }
        }
        if !(1..=1000).contains(&vm.gpu_weight) {
            return bad(n, "gpu_weight", "must be 1..=1000");
        }
        if !(0.0..=2.0).contains(&vm.gpu_alpha) {
            return bad(n, "gpu_alpha", "must be 0.0..=2.0");
        }
        if vm.vram_quota_mib == Some(0) {
            return bad(n, "vram_quota_mib", "must be at least 1");
        }
        if !(1..=MAX_HV_MEMORY_MIB).contains(&vm.hv_memory_mib) {
            return bad(n, "hv_memory_mib", "must be 1..=1024");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sched_mode_codes_round_trip() {
        for m in [
            SchedMode::BestEffort,
            SchedMode::EqualShare,
            SchedMode::FixedShare,
        ] {
            assert_eq!(SchedMode::from_code(m.code()), Some(m));
        }
        assert_eq!(SchedMode::from_code(3), None);
    }

    const GOOD: &str = r#"
[scheduler]
quantum_ms = 3
mode = "fixed-share"

[[vm]]
name = "vm0"
memory_mib = 16
image = "guests/hello.elf"
gpu_weight = 2
gpu_alpha = 1.5

[[vm]]
name = "vm1"
memory_mib = 32
vcpus = 2
image = "guests/hello.elf"
vram_quota_mib = 64
hv_memory_mib = 16
"#;

    #[test]
    fn parses_a_full_config_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.scheduler.quantum_ms, 3);
        assert_eq!(c.scheduler.mode, SchedMode::FixedShare);
        assert_eq!(c.vm.len(), 2);
        assert_eq!(c.vm[0].vcpus, 1);
        assert_eq!(c.vm[0].alpha_tenths(), 15);
        assert_eq!(c.vm[1].gpu_weight, 1);
        assert_eq!(c.vm[1].vram_quota_mib, Some(64));
        assert_eq!(c.vm[0].hv_memory_mib, DEFAULT_HV_MEMORY_MIB);
        assert_eq!(c.vm[1].hv_memory_mib, 16);
    }

    #[test]
    fn hv_memory_budget_is_range_checked() {
        let with = |v: &str| {
            parse(&alloc::format!(
                "[[vm]]\nname=\"a\"\nmemory_mib=8\nimage=\"g.elf\"\nhv_memory_mib = {v}"
            ))
        };
        assert_eq!(with("1").unwrap().vm[0].hv_memory_mib, 1);
        assert_eq!(with("1024").unwrap().vm[0].hv_memory_mib, MAX_HV_MEMORY_MIB);
        for bad in ["0", "1025", "4294967295"] {
            let e = with(bad).unwrap_err();
            assert!(
                matches!(e, ConfigError::Invalid(_, "hv_memory_mib", _)),
                "{bad}: {e:?}"
            );
            assert!(alloc::format!("{e}").contains("1..=1024"));
        }
        assert!(matches!(with("-1"), Err(ConfigError::Syntax(_))));
        assert!(matches!(with("\"8\""), Err(ConfigError::Syntax(_))));
    }

    #[test]
    fn malformed_toml_reports_the_line() {
        let e = parse("[[vm]]\nname = \"a\"\nmemory_mib = \n").unwrap_err();
        let msg = alloc::format!("{e}");
        assert!(matches!(e, ConfigError::Syntax(_)));
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn out_of_range_fields_are_refused() {
        let with = |extra: &str| {
            parse(&alloc::format!(
                "[[vm]]\nname=\"a\"\nmemory_mib=8\nimage=\"g.elf\"\n{extra}"
            ))
        };
        assert!(with("").is_ok());
        assert!(matches!(
            with("gpu_alpha = 2.5"),
            Err(ConfigError::Invalid(_, "gpu_alpha", _))
        ));
        assert!(matches!(
            with("gpu_weight = 0"),
            Err(ConfigError::Invalid(_, "gpu_weight", _))
        ));
        assert!(matches!(
            with("vcpus = 0"),
            Err(ConfigError::Invalid(_, "vcpus", _))
        ));
        assert!(matches!(with("colour = 1"), Err(ConfigError::Syntax(_))));
        assert_eq!(parse(""), Err(ConfigError::NoVms));
        let q =
            parse("[scheduler]\nquantum_ms = 11\n[[vm]]\nname=\"a\"\nmemory_mib=8\nimage=\"g\"");
        assert!(matches!(q, Err(ConfigError::Invalid(_, "quantum_ms", _))));
    }

    #[test]
    fn memory_must_fit_below_the_guest_mmio_windows() {
        let with = |mib: u32| {
            parse(&alloc::format!(
                "[[vm]]\nname=\"big-vm\"\nmemory_mib={mib}\nimage=\"g.elf\""
            ))
        };
        // RAM is guest-physical 0..memory_mib MiB; the guest's PCI ECAM window starts
        // at 0xB000_0000 (its BARs at 0xC000_0000, its local APIC at 0xFEE0_0000).
        assert_eq!(u64::from(MAX_MEMORY_MIB) << 20, 0xb000_0000);
        assert_eq!(MIN_MEMORY_MIB, 4);
        assert!(with(MIN_MEMORY_MIB).is_ok());
        assert!(with(MAX_MEMORY_MIB).is_ok());
        for bad in [
            MIN_MEMORY_MIB - 1,
            MAX_MEMORY_MIB + 1,
            3072,
            4096,
            1,
            0,
            u32::MAX,
        ] {
            let e = with(bad).unwrap_err();
            assert!(
                matches!(e, ConfigError::Invalid(ref vm, "memory_mib", _) if vm == "big-vm"),
                "{bad}: {e:?}"
            );
            let msg = alloc::format!("{e}");
            assert!(msg.starts_with("big-vm: memory_mib"), "{msg}");
            assert!(msg.contains("4..=2816"), "{msg}");
        }
    }

    #[test]
    fn a_vm_runs_an_elf_image_or_a_linux_kernel() {
        let vm = |body: &str| {
            parse(&alloc::format!(
                "[[vm]]\nname=\"a\"\nmemory_mib=256\n{body}"
            ))
        };
        let c = vm(
            "kernel=\"linux/vmlinuz\"\ninitrd=\"linux/initrd\"\ncmdline=\"console=ttyS0 quiet\"",
        )
        .unwrap();
        assert_eq!(
            c.vm[0].guest(),
            Guest::Linux {
                kernel: "linux/vmlinuz",
                initrd: Some("linux/initrd"),
                cmdline: "console=ttyS0 quiet"
            }
        );
        let c = vm("kernel=\"linux/vmlinuz\"").unwrap();
        assert!(matches!(
            c.vm[0].guest(),
            Guest::Linux {
                initrd: None,
                cmdline: "",
                ..
            }
        ));
        assert_eq!(
            vm("image=\"g.elf\"").unwrap().vm[0].guest(),
            Guest::Elf("g.elf")
        );
        let refused = |body: &str, field: &str| {
            assert!(
                matches!(vm(body), Err(ConfigError::Invalid(_, f, _)) if f == field),
                "{body}: {:?}",
                vm(body)
            )
        };
        refused("", "image");
        refused("image=\"g.elf\"\nkernel=\"k\"", "image");
        refused("image=\"g.elf\"\ninitrd=\"i\"", "initrd");
        refused("image=\"g.elf\"\ncmdline=\"x\"", "initrd");
        refused("kernel=\"../k\"", "kernel");
        refused("kernel=\"k\"\ninitrd=\"\"", "initrd");
        refused(
            &alloc::format!("kernel=\"k\"\ncmdline=\"{}\"", "x".repeat(4096)),
            "cmdline",
        );
        refused("kernel=\"k\"\ncmdline=\"a\\nb\"", "cmdline");
        assert!(vm(&alloc::format!(
            "kernel=\"k\"\ncmdline=\"{}\"",
            "x".repeat(4095)
        ))
        .is_ok());
    }

    #[test]
    fn duplicate_names_and_bad_paths_are_refused() {
        let dup = "[[vm]]\nname=\"a\"\nmemory_mib=8\nimage=\"g\"\n[[vm]]\nname=\"a\"\nmemory_mib=8\nimage=\"g\"";
        assert_eq!(parse(dup), Err(ConfigError::DuplicateName("a".into())));
        let up = "[[vm]]\nname=\"a\"\nmemory_mib=8\nimage=\"../x\"";
        assert!(matches!(
            parse(up),
            Err(ConfigError::Invalid(_, "image", _))
        ));
    }
}
