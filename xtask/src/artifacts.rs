//! Building the bare-metal artifacts: the UEFI loader, the hypervisor and the guests;
//! and hypervisors built with the cargo features scenarios ask for (`hv_features`).
//!
//! Featured hypervisors are built in a cargo target directory of their own,
//! `<target>/xtask/hv-features/build/`, so the ordinary build in
//! `<target>/x86_64-unknown-none/release/hypervisor` is never replaced by a featured
//! one; each is then kept in `<target>/xtask/hv-features/<key>/` (`key`: the features
//! sorted and joined by `+`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::scenario::Scenario;
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
    /// How these were obtained; hypervisors with features are obtained the same way.
    pub mode: BuildMode,
    /// Hypervisor ELFs built with cargo features, by feature key
    /// ([`Scenario::hv_features_key`]); see [`Artifacts::prepare_features`].
    pub featured: BTreeMap<String, PathBuf>,
}

impl Artifacts {
    /// Obtains, once per feature set, the hypervisor of every scenario in `scenarios`
    /// that asks for `hv_features`, the way these artifacts were obtained: built with
    /// cargo (in a target directory of its own), taken from that directory
    /// (`--no-build`) or from `DIR/hypervisor-<key>` (`--prebuilt DIR`). Feature sets
    /// obtained before are not obtained again.
    pub fn prepare_features<'s>(
        &mut self,
        paths: &Paths,
        scenarios: impl IntoIterator<Item = &'s Scenario>,
    ) -> Result<()> {
        for s in scenarios {
            let Some(key) = s.hv_features_key() else {
                continue;
            };
            if self.featured.contains_key(&key) {
                continue;
            }
            let elf = featured(paths, &self.mode, &key, &s.hv_features).map_err(|e| {
                format!(
                    "scenario {}: the hypervisor with features {key}: {e}",
                    s.name
                )
            })?;
            eprintln!(
                "xtask: hypervisor with features {key}: {}",
                paths.show(&elf)
            );
            self.featured.insert(key, elf);
        }
        Ok(())
    }

    /// The artifacts scenario `s` boots: these, with the hypervisor built with its
    /// `hv_features` when it has some (which [`Artifacts::prepare_features`] must have
    /// obtained).
    pub fn for_scenario(&self, s: &Scenario) -> Result<Artifacts> {
        let mut art = self.clone();
        if let Some(key) = s.hv_features_key() {
            art.hypervisor = self.featured.get(&key).cloned().ok_or_else(|| {
                format!(
                    "the hypervisor with features {key} was not obtained before the run \
                     (harness bug)"
                )
            })?;
        }
        Ok(art)
    }

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

const UEFI_TARGET: &str = crate::tools::RUST_TARGETS[0];
const NONE_TARGET: &str = crate::tools::RUST_TARGETS[1];

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
/// `extra` goes after the standard arguments (`--features`, `--target-dir`).
fn cargo_build(
    paths: &Paths,
    target: &str,
    packages: &[&str],
    extra: &[&str],
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
    cmd.args(extra);
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
    crate::tools::ensure_rust_targets(&paths.root)?;

    let uefi = cargo_build(paths, UEFI_TARGET, &["boot"], &[])?;
    let boot_efi = uefi
        .iter()
        .find(|(m, name, _)| same_file(m, &boot_manifest) && name == "boot")
        .map(|(_, _, exe)| exe.clone())
        .ok_or("cargo built no `boot` executable for x86_64-unknown-uefi")?;

    let none = cargo_build(paths, NONE_TARGET, &["hypervisor", "guest-frontend"], &[])?;
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
        mode: BuildMode::Build,
        featured: BTreeMap::new(),
    })
}

/// Where the hypervisor built with the features of `key` is kept (its ELF in
/// `x86_64-unknown-none/release/hypervisor` below it).
pub fn featured_target_dir(paths: &Paths, key: &str) -> PathBuf {
    paths.xtask.join("hv-features").join(key)
}

/// The cargo target directory every featured hypervisor is built in.
fn featured_build_dir(paths: &Paths) -> PathBuf {
    paths.xtask.join("hv-features").join("build")
}

/// The `--prebuilt DIR` file names of the hypervisor with the features of `key`, in
/// the order they are looked for.
pub fn prebuilt_featured_names(key: &str) -> [String; 2] {
    [format!("hypervisor-{key}.elf"), format!("hypervisor-{key}")]
}

/// The hypervisor with `features` (whose key is `key`), obtained as `mode` says.
fn featured(paths: &Paths, mode: &BuildMode, key: &str, features: &[String]) -> Result<PathBuf> {
    let hv_manifest = paths.root.join("hypervisor/Cargo.toml");
    let dir = featured_target_dir(paths, key);
    match mode {
        BuildMode::Build => {
            // One cargo target directory for every feature set: the dependencies are
            // built once, and cargo keeps the hypervisor of each set apart (its
            // features are in its fingerprint). The ELF is then copied to the set's
            // own directory, where `--no-build` finds it.
            let shared = featured_build_dir(paths);
            let dir_arg = shared.to_string_lossy();
            let list = features.join(",");
            let built = cargo_build(
                paths,
                NONE_TARGET,
                &["hypervisor"],
                &["--features", &list, "--target-dir", &dir_arg],
            )?;
            let exe = built
                .into_iter()
                .find(|(m, name, _)| same_file(m, &hv_manifest) && name == "hypervisor")
                .map(|(_, _, exe)| exe)
                .ok_or_else(|| {
                    format!("cargo built no `hypervisor` executable with features {list}")
                })?;
            let elf = dir.join(NONE_TARGET).join("release").join("hypervisor");
            if let Some(parent) = elf.parent() {
                std::fs::create_dir_all(parent)
                    .ctx(|| format!("cannot create {}", parent.display()))?;
            }
            std::fs::copy(&exe, &elf)
                .ctx(|| format!("cannot copy {} to {}", exe.display(), elf.display()))?;
            Ok(elf)
        }
        BuildMode::NoBuild => {
            let elf = dir.join(NONE_TARGET).join("release").join("hypervisor");
            if elf.is_file() {
                Ok(elf)
            } else {
                Err(format!(
                    "{} does not exist (--no-build uses the featured build of an earlier run; \
                     run once without --no-build)",
                    elf.display()
                ))
            }
        }
        BuildMode::Prebuilt(pre) => {
            let names = prebuilt_featured_names(key);
            names
                .iter()
                .map(|n| pre.join(n))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    format!(
                        "--prebuilt {}: neither {} nor {} exists (a hypervisor built with \
                         `--features {}`)",
                        pre.display(),
                        names[1],
                        names[0],
                        features.join(",")
                    )
                })
        }
    }
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
        mode: BuildMode::NoBuild,
        featured: BTreeMap::new(),
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
        mode: BuildMode::Prebuilt(dir.to_path_buf()),
        featured: BTreeMap::new(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn scenario(name: &str, features: &str) -> Scenario {
        let text = format!(
            "description = \"d\"\nemulators = [\"qemu\"]\nexpect_exit = \"pass\"\n{features}\n"
        );
        Scenario::parse(name, Path::new("s.toml"), &text).unwrap()
    }

    fn artifacts(dir: &Path, mode: BuildMode) -> Artifacts {
        Artifacts {
            boot_efi: dir.join("boot.efi"),
            hypervisor: dir.join("hypervisor"),
            guests: Vec::new(),
            mode,
            featured: BTreeMap::new(),
        }
    }

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-art-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn prebuilt_featured_hypervisors() {
        let dir = temp("pre");
        let paths = Paths {
            root: dir.clone(),
            target: dir.join("target"),
            xtask: dir.join("target/xtask"),
        };
        let plain = scenario("plain", "");
        let ab = scenario("ab", "hv_features = [\"b\", \"a\"]");
        let ab2 = scenario("ab2", "hv_features = [\"a\", \"b\"]");
        let inject = scenario("inject", "hv_features = [\"test-inject\"]");
        fs::write(dir.join("hypervisor-a+b"), "ab").unwrap();
        fs::write(dir.join("hypervisor-test-inject.elf"), "ti").unwrap();
        let mut art = artifacts(&dir, BuildMode::Prebuilt(dir.clone()));
        // Not obtained yet.
        let e = art.for_scenario(&ab).unwrap_err();
        assert!(e.contains("features a+b was not obtained"), "{e}");
        art.prepare_features(&paths, [&plain, &ab, &ab2, &inject])
            .unwrap();
        assert_eq!(art.featured.len(), 2);
        assert_eq!(
            art.for_scenario(&plain).unwrap().hypervisor,
            dir.join("hypervisor")
        );
        assert_eq!(
            art.for_scenario(&ab).unwrap().hypervisor,
            dir.join("hypervisor-a+b")
        );
        assert_eq!(
            art.for_scenario(&ab2).unwrap().hypervisor,
            dir.join("hypervisor-a+b")
        );
        assert_eq!(
            art.for_scenario(&inject).unwrap().hypervisor,
            dir.join("hypervisor-test-inject.elf")
        );
        // The default hypervisor is untouched.
        assert_eq!(art.hypervisor, dir.join("hypervisor"));
        // A missing file names the file, the features and the scenario.
        let other = scenario("needs-x", "hv_features = [\"x\"]");
        let e = art.prepare_features(&paths, [&other]).unwrap_err();
        assert!(
            e.contains("hypervisor-x nor hypervisor-x.elf exists"),
            "{e}"
        );
        assert!(e.contains("`--features x`"), "{e}");
        assert!(e.contains("scenario needs-x"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_build_uses_the_featured_target_dir() {
        let dir = temp("nobuild");
        let paths = Paths {
            root: dir.clone(),
            target: dir.join("target"),
            xtask: dir.join("target/xtask"),
        };
        let s = scenario("inject", "hv_features = [\"test-inject\"]");
        let mut art = artifacts(&paths.target, BuildMode::NoBuild);
        let e = art.prepare_features(&paths, [&s]).unwrap_err();
        assert!(e.contains("run once without --no-build"), "{e}");
        let elf = featured_target_dir(&paths, "test-inject")
            .join("x86_64-unknown-none/release/hypervisor");
        assert!(elf.starts_with(dir.join("target/xtask/hv-features/test-inject")));
        fs::create_dir_all(elf.parent().unwrap()).unwrap();
        fs::write(&elf, "elf").unwrap();
        art.prepare_features(&paths, [&s]).unwrap();
        assert_eq!(art.for_scenario(&s).unwrap().hypervisor, elf);
        assert_ne!(art.hypervisor, elf);
        fs::remove_dir_all(&dir).unwrap();
    }
}
