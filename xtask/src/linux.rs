//! Linux guests' files: Debian's stock kernel, fetched with `apt-get download` (no
//! install, no root needed for the fetch itself) and unpacked with `dpkg -x`, cached
//! under `target/xtask/linux/` so a second run fetches nothing. A VM config names it
//! as `kernel = "linux/vmlinuz"`; the ESP gets it as `\hv\linux\vmlinuz`, and with
//! it the busybox initramfs of [`crate::initramfs`] when a VM names that.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{initramfs, Context, Paths, Result};

/// The path a VM config uses for Debian's kernel.
pub const KERNEL: &str = "linux/vmlinuz";

/// The metapackage whose dependency is the current kernel of the Debian release.
const METAPACKAGE: &str = "linux-image-amd64";

/// Runs `cmd` and returns its stdout, or its stderr as the error.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().ctx(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kernel package `apt-cache depends linux-image-amd64` names.
fn kernel_package() -> Result<String> {
    let deps = run(Command::new("apt-cache").args(["depends", METAPACKAGE]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_string)
        .ok_or_else(|| format!("apt-cache depends {METAPACKAGE} names no linux-image package"))
}

/// Debian's stock kernel (a bzImage), fetched once.
pub fn kernel(paths: &Paths) -> Result<PathBuf> {
    let dir = paths.xtask.join("linux");
    let vmlinuz = dir.join("vmlinuz");
    if vmlinuz.is_file() {
        return Ok(vmlinuz);
    }
    let pkg = kernel_package()?;
    eprintln!("xtask: fetching Debian's kernel for the Linux guests: apt-get download {pkg}");
    let work = dir.join("fetch");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).ctx(|| format!("cannot create {}", work.display()))?;
    run(Command::new("apt-get")
        .args(["download", &pkg])
        .current_dir(&work))?;
    let deb = fs::read_dir(&work)
        .ctx(|| format!("cannot read {}", work.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download {pkg} left no .deb in {}", work.display()))?;
    let root = work.join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    let boot = root.join("boot");
    let image = fs::read_dir(&boot)
        .ctx(|| format!("{} has no boot/ folder", deb.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| format!("{} holds no boot/vmlinuz-*", deb.display()))?;
    let tmp = dir.join("vmlinuz.part");
    fs::copy(&image, &tmp).ctx(|| format!("cannot copy {}", image.display()))?;
    fs::write(dir.join("version"), format!("{pkg}\n")).ctx(|| "cannot write the version".into())?;
    fs::rename(&tmp, &vmlinuz).ctx(|| format!("cannot create {}", vmlinuz.display()))?;
    let _ = fs::remove_dir_all(&work);
    Ok(vmlinuz)
}

/// Whether `config` (a vms.toml) boots Debian's kernel in some VM.
pub fn wants_kernel(config: &str) -> bool {
    boot_info::config::parse(config)
        .is_ok_and(|c| c.vm.iter().any(|v| v.kernel.as_deref() == Some(KERNEL)))
}

/// Puts Debian's kernel (`\hv\linux\vmlinuz`) and the busybox initramfs
/// (`\hv\linux\initramfs.cpio`) into the ESP at `esp`, each when `config` names it.
pub fn add_to_esp(paths: &Paths, esp: &Path, config: &str) -> Result<()> {
    if wants_kernel(config) {
        copy_into_esp(&kernel(paths)?, esp, KERNEL)?;
    }
    if initramfs::wants_initramfs(config) {
        copy_into_esp(&initramfs::build(paths)?, esp, initramfs::INITRD)?;
    }
    Ok(())
}

/// Copies `src` to `\hv\<name>` of the ESP at `esp`.
fn copy_into_esp(src: &Path, esp: &Path, name: &str) -> Result<()> {
    let dst = esp.join("hv").join(name);
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent).ctx(|| format!("cannot create {}", parent.display()))?;
    }
    fs::copy(src, &dst)
        .map(|_| ())
        .ctx(|| format!("cannot copy {} to {}", src.display(), dst.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configs_naming_the_debian_kernel_fetch_it() {
        let linux = "[[vm]]\nname=\"l\"\nmemory_mib=256\nkernel=\"linux/vmlinuz\"\n";
        assert!(wants_kernel(linux));
        let elf = "[[vm]]\nname=\"g\"\nmemory_mib=16\nimage=\"guests/draw.elf\"\n";
        assert!(!wants_kernel(elf));
        let own = "[[vm]]\nname=\"l\"\nmemory_mib=256\nkernel=\"mine/bzImage\"\n";
        assert!(!wants_kernel(own));
    }
}
