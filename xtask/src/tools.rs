//! Host tools the emulator stages need, and installing them on Debian.

use std::path::Path;
use std::process::Command;

use crate::{run_checked, Result};

/// The Debian packages of every host tool xtask uses.
pub const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "ovmf",
    "bochs",
    "bochsbios",
    "vgabios",
    "xorriso",
    "mtools",
];

/// A host tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// qemu-system-x86_64.
    Qemu,
    /// /usr/share/ovmf/OVMF.fd.
    Ovmf,
    /// bochs (with its plugins).
    Bochs,
    /// /usr/share/vgabios/vgabios.bin.
    Vgabios,
    /// xorriso.
    Xorriso,
    /// mformat, mcopy.
    Mtools,
}

impl Tool {
    fn present(self) -> bool {
        match self {
            Tool::Qemu => in_path("qemu-system-x86_64"),
            Tool::Ovmf => Path::new(crate::qemu::OVMF).is_file(),
            Tool::Bochs => in_path("bochs"),
            Tool::Vgabios => Path::new(crate::bochs::VGABIOS).is_file(),
            Tool::Xorriso => in_path("xorriso"),
            Tool::Mtools => in_path("mformat") && in_path("mcopy"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Tool::Qemu => "qemu-system-x86_64",
            Tool::Ovmf => crate::qemu::OVMF,
            Tool::Bochs => "bochs",
            Tool::Vgabios => crate::bochs::VGABIOS,
            Tool::Xorriso => "xorriso",
            Tool::Mtools => "mformat/mcopy",
        }
    }
}

/// The tools a Bochs run needs.
pub const BOCHS_TOOLS: &[Tool] = &[
    Tool::Bochs,
    Tool::Ovmf,
    Tool::Vgabios,
    Tool::Xorriso,
    Tool::Mtools,
];
/// The tools a QEMU run needs.
pub const QEMU_TOOLS: &[Tool] = &[Tool::Qemu, Tool::Ovmf];

fn in_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Makes sure `tools` are present: installs them with apt-get when running as root on
/// Debian, else fails with the command to run.
pub fn ensure(tools: &[Tool]) -> Result<()> {
    let missing: Vec<Tool> = tools.iter().copied().filter(|t| !t.present()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|t| t.name()).collect();
    let install = format!(
        "apt-get update && apt-get install -y {}",
        PACKAGES.join(" ")
    );
    if is_root() && Path::new("/etc/debian_version").exists() {
        eprintln!("xtask: missing {}; installing them", names.join(", "));
        run_checked(Command::new("apt-get").arg("update"))?;
        run_checked(
            Command::new("apt-get")
                .args(["install", "-y"])
                .args(PACKAGES)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        let still: Vec<&str> = tools
            .iter()
            .filter(|t| !t.present())
            .map(|t| t.name())
            .collect();
        if !still.is_empty() {
            return Err(format!(
                "still missing after apt-get install: {}",
                still.join(", ")
            ));
        }
        return Ok(());
    }
    Err(format!(
        "missing {}; install with:\n    sudo sh -c '{install}'",
        names.join(", ")
    ))
}

/// The bare-metal targets the loader and the hypervisor are built for.
pub const RUST_TARGETS: &[&str] = &["x86_64-unknown-uefi", "x86_64-unknown-none"];

/// Which of `wanted` are not in `installed` (`rustup target list --installed`).
fn missing_targets<'a>(installed: &str, wanted: &[&'a str]) -> Vec<&'a str> {
    wanted
        .iter()
        .copied()
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect()
}

/// Makes sure the pinned toolchain (rust-toolchain.toml, in effect in `root`) has
/// [`RUST_TARGETS`]: a toolchain installed before the file named them, or by a
/// rustup that does not read the file's `targets`, lacks them, and cargo then
/// fails with a bare "can't find crate for `core`". Adds them with rustup,
/// saying so first; without rustup, says the command.
pub fn ensure_rust_targets(root: &Path) -> Result<()> {
    let listed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(root)
        .output();
    let installed = match listed {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        // No rustup: the toolchain is someone else's to manage; cargo will tell.
        _ => return Ok(()),
    };
    let missing = missing_targets(&installed, RUST_TARGETS);
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: the pinned Rust toolchain lacks the targets {}; installing them: rustup target add {}",
        missing.join(", "),
        missing.join(" ")
    );
    run_checked(
        Command::new("rustup")
            .args(["target", "add"])
            .args(&missing)
            .current_dir(root),
    )
    .map_err(|e| {
        format!(
            "{e}\nthe build needs them; run in {}: rustup target add {}",
            root.display(),
            missing.join(" ")
        )
    })
}

#[cfg(test)]
mod target_tests {
    use super::*;

    #[test]
    fn missing_targets_are_those_not_listed() {
        let listed = "x86_64-unknown-linux-gnu\nx86_64-unknown-none\n";
        assert_eq!(
            missing_targets(listed, RUST_TARGETS),
            vec!["x86_64-unknown-uefi"]
        );
        let all = "x86_64-unknown-uefi\nx86_64-unknown-none\n";
        assert!(missing_targets(all, RUST_TARGETS).is_empty());
        // A target name inside another line does not count.
        assert_eq!(
            missing_targets("x86_64-unknown-none-elf\n", &["x86_64-unknown-none"]).len(),
            1
        );
    }
}
