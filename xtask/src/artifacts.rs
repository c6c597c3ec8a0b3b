//! Building the bare-metal artifacts: the UEFI loader, the hypervisor and the guests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::{cargo, show_command, BuildMode, Context, Paths, Result};

/// The files that go onto an ESP.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The UEFI loader (`boot.efi`), installed as `EFI/BOOT/BOOTX64.EFI`.
    pub boot_efi: PathBuf,
    /// The hypervisor ELF, installed as `hv/hypervisor.elf`.
    pub hypervisor: PathBuf,
    /// Guest binaries by name, installed as `hv/guests/<name>.elf`.
    pub guests: Vec<(String, PathBuf)>,
}

impl Artifacts {
    /// Prints where the artifacts are.
    pub fn print(&self, paths: &Paths) {
        println!("boot:       {}", paths.show(&self.boot_efi));
        println!("hypervisor: {}", paths.show(&self.hypervisor));
        for (name, path) in &self.guests {
            println!("guest {name}: {}", paths.show(path));
        }
        if self.guests.is_empty() {
            println!("guests:     (guest-frontend has no bin targets)");
        }
    }
}

const UEFI_TARGET: &str = "x86_64-unknown-uefi";
const NONE_TARGET: &str = "x86_64-unknown-none";

/// Gets the artifacts as `mode` says.
pub fn obtain(paths: &Paths, mode: &BuildMode) -> Result<Artifacts> {
    match mode {
        BuildMode::Build => build(paths),
        BuildMode::NoBuild => existing(paths),
        BuildMode::Prebuilt(dir) => prebuilt(dir),
    }
}

/// One line of cargo's `--message-format=json` output (only the fields used here).
#[derive(Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    manifest_path: Option<PathBuf>,
    #[serde(default)]
    target: Option<TargetInfo>,
    #[serde(default)]
    executable: Option<PathBuf>,
}

#[derive(Deserialize)]
struct TargetInfo {
    name: String,
    kind: Vec<String>,
}

/// The executables a cargo build produced: (manifest path, bin name, executable).
fn cargo_build(
    paths: &Paths,
    target: &str,
    packages: &[&str],
) -> Result<Vec<(PathBuf, String, PathBuf)>> {
    let mut cmd = cargo();
    cmd.current_dir(&paths.root)
        .args([
            "build",
            "--release",
            "--message-format=json-render-diagnostics",
        ])
        .args(["--target", target]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    cmd.stdout(Stdio::piped());
    let shown = show_command(&cmd);
    eprintln!("+ {shown}");
    let out = cmd.output().ctx(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        return Err(format!("`{shown}` failed ({})", out.status));
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Message>(line) else {
            continue;
        };
        if msg.reason != "compiler-artifact" {
            continue;
        }
        if let (Some(manifest), Some(t), Some(exe)) =
            (msg.manifest_path, msg.target, msg.executable)
        {
            if t.kind.iter().any(|k| k == "bin") {
                exes.push((manifest, t.name, exe));
            }
        }
    }
    Ok(exes)
}

/// Builds everything with cargo (release) and returns where the files are.
pub fn build(paths: &Paths) -> Result<Artifacts> {
    let boot_manifest = paths.root.join("boot/Cargo.toml");
    let hv_manifest = paths.root.join("hypervisor/Cargo.toml");
    let guest_manifest = paths.root.join("guest-frontend/Cargo.toml");

    let uefi = cargo_build(paths, UEFI_TARGET, &["boot"])?;
    let boot_efi = uefi
        .iter()
        .find(|(m, name, _)| same_file(m, &boot_manifest) && name == "boot")
        .map(|(_, _, exe)| exe.clone())
        .ok_or("cargo built no `boot` executable for x86_64-unknown-uefi")?;

    let none = cargo_build(paths, NONE_TARGET, &["hypervisor", "guest-frontend"])?;
    let hypervisor = none
        .iter()
        .find(|(m, name, _)| same_file(m, &hv_manifest) && name == "hypervisor")
        .map(|(_, _, exe)| exe.clone())
        .ok_or("cargo built no `hypervisor` executable for x86_64-unknown-none")?;
    let mut guests: Vec<(String, PathBuf)> = none
        .iter()
        .filter(|(m, _, _)| same_file(m, &guest_manifest))
        .map(|(_, name, exe)| (name.clone(), exe.clone()))
        .collect();
    guests.sort();
    guests.dedup();
    Ok(Artifacts {
        boot_efi,
        hypervisor,
        guests,
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
}

#[derive(Deserialize)]
struct Metadata {
    packages: Vec<MetaPackage>,
}

#[derive(Deserialize)]
struct MetaPackage {
    name: String,
    targets: Vec<TargetInfo>,
}

/// The artifacts of an earlier `cargo xtask build`, found by path (guest names come from
/// `cargo metadata`).
fn existing(paths: &Paths) -> Result<Artifacts> {
    let uefi_dir = paths.target.join(UEFI_TARGET).join("release");
    let none_dir = paths.target.join(NONE_TARGET).join("release");
    let boot_efi = uefi_dir.join("boot.efi");
    let hypervisor = none_dir.join("hypervisor");
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&paths.root)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .stderr(Stdio::inherit())
        .output()
        .ctx(|| "cannot run cargo metadata".to_string())?;
    if !out.status.success() {
        return Err(format!("cargo metadata failed ({})", out.status));
    }
    let meta: Metadata =
        serde_json::from_slice(&out.stdout).ctx(|| "cannot parse cargo metadata".to_string())?;
    let mut guests = Vec::new();
    for p in meta.packages.iter().filter(|p| p.name == "guest-frontend") {
        for t in p
            .targets
            .iter()
            .filter(|t| t.kind.iter().any(|k| k == "bin"))
        {
            guests.push((t.name.clone(), none_dir.join(&t.name)));
        }
    }
    let art = Artifacts {
        boot_efi,
        hypervisor,
        guests,
    };
    check_exist(&art, "run `cargo xtask build` first, or drop --no-build")?;
    Ok(art)
}

/// Artifacts from a directory: `boot.efi`, `hypervisor` or `hypervisor.elf`, `guests/*.elf`.
fn prebuilt(dir: &Path) -> Result<Artifacts> {
    let boot_efi = dir.join("boot.efi");
    let hypervisor = ["hypervisor.elf", "hypervisor"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join("hypervisor.elf"));
    let mut guests = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir.join("guests")) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "elf") {
                if let Some(stem) = p.file_stem() {
                    guests.push((stem.to_string_lossy().into_owned(), p.clone()));
                }
            }
        }
    }
    guests.sort();
    let art = Artifacts {
        boot_efi,
        hypervisor,
        guests,
    };
    check_exist(
        &art,
        "--prebuilt DIR needs DIR/boot.efi and DIR/hypervisor.elf",
    )?;
    eprintln!("xtask: using prebuilt artifacts from {}", dir.display());
    Ok(art)
}

fn check_exist(art: &Artifacts, hint: &str) -> Result<()> {
    let mut all = vec![&art.boot_efi, &art.hypervisor];
    all.extend(art.guests.iter().map(|(_, p)| p));
    for p in all {
        if !p.is_file() {
            return Err(format!("{} does not exist ({hint})", p.display()));
        }
    }
    Ok(())
}
