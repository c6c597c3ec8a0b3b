//! The EFI system partition layout, as a directory.
//!
//! ```text
//! EFI/BOOT/BOOTX64.EFI   the UEFI loader (boot.efi)
//! hv/hypervisor.elf      the hypervisor
//! hv/vms.toml            the VM configuration
//! hv/cmdline.txt         the kernel command line (one line)
//! hv/guests/<bin>.elf    every guest binary
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use crate::artifacts::Artifacts;
use crate::{Context, Result};

/// Makes a fresh ESP directory at `dir` (removing what was there).
pub fn make(dir: &Path, art: &Artifacts, config: &str, cmdline: &str) -> Result<()> {
    if cmdline.contains(['\n', '\r']) {
        return Err(format!(
            "the kernel command line must be one line: {cmdline:?}"
        ));
    }
    if dir.exists() {
        fs::remove_dir_all(dir).ctx(|| format!("cannot remove {}", dir.display()))?;
    }
    let boot_dir = dir.join("EFI").join("BOOT");
    let hv = dir.join("hv");
    let guests = hv.join("guests");
    for d in [&boot_dir, &guests] {
        fs::create_dir_all(d).ctx(|| format!("cannot create {}", d.display()))?;
    }
    copy(&art.boot_efi, &boot_dir.join("BOOTX64.EFI"))?;
    copy(&art.hypervisor, &hv.join("hypervisor.elf"))?;
    for (name, path) in &art.guests {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(format!("bad guest binary name {name:?}"));
        }
        copy(path, &guests.join(format!("{name}.elf")))?;
    }
    write(&hv.join("vms.toml"), config)?;
    write(&hv.join("cmdline.txt"), &format!("{}\n", cmdline.trim()))?;
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(|_| ())
        .ctx(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).ctx(|| format!("cannot write {}", path.display()))
}

/// Every file under `dir` with its size, relative paths with `/` separators, sorted.
pub fn files(dir: &Path) -> Result<Vec<(String, u64)>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> Result<()> {
        for e in fs::read_dir(dir).ctx(|| format!("cannot read {}", dir.display()))? {
            let e = e.ctx(|| format!("cannot read {}", dir.display()))?;
            let p: PathBuf = e.path();
            let md = e
                .metadata()
                .ctx(|| format!("cannot stat {}", p.display()))?;
            if md.is_dir() {
                walk(base, &p, out)?;
            } else {
                let rel = p.strip_prefix(base).unwrap_or(&p);
                let rel = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((rel, md.len()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let tmp = std::env::temp_dir().join(format!("xtask-esp-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let src = tmp.join("src");
        fs::create_dir_all(&src).unwrap();
        for n in ["boot.efi", "hypervisor", "hello"] {
            fs::write(src.join(n), n).unwrap();
        }
        let art = Artifacts {
            boot_efi: src.join("boot.efi"),
            hypervisor: src.join("hypervisor"),
            guests: vec![("hello".into(), src.join("hello"))],
            mode: crate::BuildMode::NoBuild,
            featured: Default::default(),
        };
        let esp = tmp.join("esp");
        fs::create_dir_all(esp.join("stale")).unwrap();
        make(&esp, &art, "[scheduler]\n", " test=boot harness ").unwrap();
        let names: Vec<String> = files(&esp).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "EFI/BOOT/BOOTX64.EFI",
                "hv/cmdline.txt",
                "hv/guests/hello.elf",
                "hv/hypervisor.elf",
                "hv/vms.toml"
            ]
        );
        assert_eq!(
            fs::read_to_string(esp.join("hv/cmdline.txt")).unwrap(),
            "test=boot harness\n"
        );
        assert!(make(&esp, &art, "", "a\nb").is_err());
        fs::remove_dir_all(&tmp).unwrap();
    }
}
