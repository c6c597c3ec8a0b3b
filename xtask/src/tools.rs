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
