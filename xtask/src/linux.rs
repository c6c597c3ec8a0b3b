//! Linux guests' files: Debian's stock kernel and the few of its modules the GPU
//! guests load (virtio-gpu and what it needs), fetched with `apt-get download` (no
//! install, no root needed for the fetch itself) and unpacked with `dpkg -x`, cached
//! under `target/xtask/linux/` so a second run fetches nothing. Kernel and modules come
//! from one fetch of one `.deb`, so the modules always match the kernel they boot with
//! (Debian's modules are signed and versioned against their own build). A VM config
//! names the kernel as `kernel = "linux/vmlinuz"`; the ESP gets it as
//! `\hv\linux\vmlinuz`, and with it the busybox initramfs of [`crate::initramfs`]
//! (which carries the modules) when a VM names that.
//!
//! The `.deb` has no `modules.dep` (Debian's postinst runs depmod, which may not even
//! be installed here), so the dependencies come from each module's own `.modinfo`
//! (`depends=`), read with the `elf` crate (module [`elf`]). The cache then holds a
//! depmod-style `modules.dep` for the kept set, which [`load_order`] turns into the
//! order the initramfs loads them in.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{initramfs, Context, Paths, Result};

/// The path a VM config uses for Debian's kernel.
pub const KERNEL: &str = "linux/vmlinuz";

/// The metapackage whose dependency is the current kernel of the Debian release.
const METAPACKAGE: &str = "linux-image-amd64";

/// The modules the GPU guests load, by module name: the virtio PCI transport (the
/// virtual GPU is a virtio PCI device; virtio-gpu does not depend on it) and the
/// virtio-gpu DRM driver. What they depend on comes along; what is built in is skipped.
pub const GPU_MODULES: &[&str] = &["virtio_pci", "virtio_gpu"];

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

/// The cached modules of Debian's kernel (see [`modules`]).
#[derive(Debug, Clone)]
pub struct Modules {
    /// The kernel release they are built for (`uname -r`).
    pub release: String,
    /// `modules/<release>/`: the `.ko` files under `kernel/` and their `modules.dep`.
    pub dir: PathBuf,
    /// Which `.deb` and which module set: part of the initramfs's cache stamp.
    pub stamp: String,
}

/// Debian's stock kernel (a bzImage), fetched once together with its modules.
pub fn kernel(paths: &Paths) -> Result<PathBuf> {
    let vmlinuz = paths.xtask.join("linux").join("vmlinuz");
    match fetched(paths) {
        Ok(_) => Ok(vmlinuz),
        // Offline, a kernel cached before the modules were kept still boots.
        Err(e) if vmlinuz.is_file() => {
            eprintln!("xtask: keeping the cached kernel without its modules: {e}");
            Ok(vmlinuz)
        }
        Err(e) => Err(e),
    }
}

/// The modules of [`GPU_MODULES`] and their dependencies, from the `.deb` of
/// [`kernel`], fetched once with it.
pub fn modules(paths: &Paths) -> Result<Modules> {
    fetched(paths)
}

/// The content of `modules/stamp`: the `.deb` and the module set; written last.
fn modules_stamp(deb: &str, release: &str) -> String {
    format!(
        "{deb}\nrelease {release}\nmodules {}\n",
        GPU_MODULES.join(" ")
    )
}

/// The cache in `dir` when it holds the kernel and the modules of [`GPU_MODULES`].
fn cached(dir: &Path) -> Option<Modules> {
    let stamp = fs::read_to_string(dir.join("modules").join("stamp")).ok()?;
    let release = stamp.lines().find_map(|l| l.strip_prefix("release "))?;
    let set = format!("modules {}", GPU_MODULES.join(" "));
    let mdir = dir.join("modules").join(release);
    let ok = stamp.lines().any(|l| l == set)
        && dir.join("vmlinuz").is_file()
        && mdir.join("modules.dep").is_file();
    ok.then(|| Modules {
        release: release.to_string(),
        dir: mdir,
        stamp: stamp.clone(),
    })
}

/// The cache, fetched first unless it is complete.
fn fetched(paths: &Paths) -> Result<Modules> {
    let dir = paths.xtask.join("linux");
    if let Some(m) = cached(&dir) {
        return Ok(m);
    }
    // Per process, so two xtasks fetching at once do not unpack into each other.
    let work = dir.join(format!("fetch.{}", std::process::id()));
    let r = fetch(&dir, &work);
    let _ = fs::remove_dir_all(&work);
    r
}

/// Fetches the kernel `.deb` into `work` and stores its kernel and the needed modules
/// in `dir`.
fn fetch(dir: &Path, work: &Path) -> Result<Modules> {
    let pkg = kernel_package()?;
    eprintln!(
        "xtask: fetching Debian's kernel and its GPU modules for the Linux guests: \
         apt-get download {pkg}"
    );
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work).ctx(|| format!("cannot create {}", work.display()))?;
    run(Command::new("apt-get")
        .args(["download", &pkg])
        .current_dir(work))?;
    let deb = fs::read_dir(work)
        .ctx(|| format!("cannot read {}", work.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download {pkg} left no .deb in {}", work.display()))?;
    let deb_name = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
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
    let release = image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .ok_or_else(|| format!("cannot tell the release of {}", image.display()))?
        .to_string();
    let src = root.join("lib").join("modules").join(&release);
    let set = select(&src)?;

    // The stamp is removed first and written last: an interrupted fetch is redone.
    let modules = dir.join("modules");
    let _ = fs::remove_file(modules.join("stamp"));
    let staged = work.join("modules");
    let kept = staged.join(&release);
    for (path, _) in &set {
        let to = kept.join(path);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).ctx(|| format!("cannot create {}", parent.display()))?;
        }
        fs::copy(src.join(path), &to).ctx(|| format!("cannot copy {path}"))?;
    }
    let dep = kept.join("modules.dep");
    fs::write(&dep, modules_dep(&set)?).ctx(|| format!("cannot write {}", dep.display()))?;
    let _ = fs::remove_dir_all(&modules);
    fs::rename(&staged, &modules).ctx(|| format!("cannot create {}", modules.display()))?;

    let tmp = dir.join(format!("vmlinuz.part.{}", std::process::id()));
    fs::copy(&image, &tmp).ctx(|| format!("cannot copy {}", image.display()))?;
    let vmlinuz = dir.join("vmlinuz");
    fs::rename(&tmp, &vmlinuz).ctx(|| format!("cannot create {}", vmlinuz.display()))?;
    fs::write(dir.join("version"), format!("{pkg}\n")).ctx(|| "cannot write the version".into())?;
    let stamp = modules_stamp(&deb_name, &release);
    fs::write(modules.join("stamp"), &stamp).ctx(|| "cannot write the modules' stamp".into())?;
    Ok(Modules {
        dir: modules.join(&release),
        release,
        stamp,
    })
}

/// A module's name from its file name: `virtio-gpu.ko` is `virtio_gpu`, as the
/// kernel's build names it (`KBUILD_MODNAME`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.find(".ko").map_or(file, |i| &file[..i]);
    stem.replace('-', "_")
}

/// Every module file under `moddir/kernel/`, by module name, as a path relative to
/// `moddir` (`kernel/drivers/...`).
fn index_modules(moddir: &Path) -> Result<BTreeMap<String, String>> {
    let mut index = BTreeMap::new();
    let mut todo = vec![moddir.join("kernel")];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).ctx(|| format!("cannot read {}", d.display()))? {
            let p = e.ctx(|| format!("cannot read {}", d.display()))?.path();
            if p.is_dir() {
                todo.push(p);
            } else if let Ok(rel) = p.strip_prefix(moddir) {
                let rel = rel.to_string_lossy().into_owned();
                if rel.contains(".ko") {
                    index.insert(module_name(&rel), rel);
                }
            }
        }
    }
    Ok(index)
}

/// The modules of [`GPU_MODULES`] in `moddir` (an unpacked `lib/modules/<release>/`)
/// and, transitively, those they depend on, as (path, direct dependencies' paths) in
/// load order. Names in `modules.builtin` are in the kernel already and are skipped.
fn select(moddir: &Path) -> Result<Vec<(String, Vec<String>)>> {
    let index = index_modules(moddir)?;
    let builtin_file = moddir.join("modules.builtin");
    let builtin: BTreeSet<String> = fs::read_to_string(&builtin_file)
        .ctx(|| format!("cannot read {}", builtin_file.display()))?
        .lines()
        .map(module_name)
        .collect();
    let mut graph = Vec::new();
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = GPU_MODULES.iter().rev().map(|m| m.to_string()).collect();
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let Some(path) = index.get(&name) else {
            if builtin.contains(&name) {
                continue;
            }
            return Err(format!(
                "{name} is neither a module in {} nor built in",
                moddir.display()
            ));
        };
        // Debian 12 builds with CONFIG_MODULE_COMPRESS_NONE; a later one may not.
        if !path.ends_with(".ko") {
            return Err(format!(
                "{path} is compressed: decompress it for the initramfs first"
            ));
        }
        let ko = fs::read(moddir.join(path)).ctx(|| format!("cannot read {path}"))?;
        let depends = elf::modinfo(&ko, "depends")
            .ctx(|| format!("cannot read the .modinfo of {path}"))?
            .ok_or_else(|| format!("{path} has no depends= in its .modinfo"))?;
        let depends: Vec<String> = depends
            .split(',')
            .filter(|d| !d.is_empty())
            .map(str::to_string)
            .collect();
        let deps = depends
            .iter()
            .filter_map(|d| index.get(d).cloned())
            .collect();
        graph.push((path.clone(), deps));
        // Depth first, in .modinfo order.
        todo.extend(depends.into_iter().rev());
    }
    let order = topo(&graph)?;
    let mut by_path: BTreeMap<String, Vec<String>> = graph.into_iter().collect();
    Ok(order
        .into_iter()
        .map(|p| {
            let deps = by_path.remove(&p).unwrap_or_default();
            (p, deps)
        })
        .collect())
}

/// A depmod-style `modules.dep` for `set` (in load order, with direct dependencies):
/// each module with all it needs, transitively, listed last-loaded first (busybox's
/// modprobe and kmod's load that list from its end).
fn modules_dep(set: &[(String, Vec<String>)]) -> Result<String> {
    let at: BTreeMap<&str, usize> = set
        .iter()
        .enumerate()
        .map(|(i, (p, _))| (p.as_str(), i))
        .collect();
    let direct: BTreeMap<&str, &[String]> = set
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    let mut out = String::new();
    for (path, deps) in set {
        let mut all = BTreeSet::new();
        let mut todo: Vec<&str> = deps.iter().map(String::as_str).collect();
        while let Some(d) = todo.pop() {
            let pos = *at
                .get(d)
                .ok_or_else(|| format!("{path} needs {d}, which is not in the set"))?;
            if all.insert((std::cmp::Reverse(pos), d)) {
                todo.extend(direct[d].iter().map(String::as_str));
            }
        }
        out.push_str(path);
        out.push(':');
        for (_, d) in all {
            out.push(' ');
            out.push_str(d);
        }
        out.push('\n');
    }
    Ok(out)
}

/// The modules of a `modules.dep` (lines `path: dep dep ...`) in an order that loads
/// every module after all it depends on: depth first over the lines in file order,
/// each line's dependencies taken from its end (as modprobe does). A dependency
/// cycle, or a dependency with no line of its own, is an error.
pub(crate) fn load_order(modules_dep: &str) -> Result<Vec<String>> {
    let mut graph = Vec::new();
    for (i, line) in modules_dep.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (module, deps) = line
            .split_once(':')
            .ok_or_else(|| format!("modules.dep line {}: no ':' in {line:?}", i + 1))?;
        let deps = deps.split_whitespace().map(str::to_string).collect();
        graph.push((module.trim().to_string(), deps));
    }
    topo(&graph)
}

/// [`load_order`] of `graph` (module, its dependencies).
fn topo(graph: &[(String, Vec<String>)]) -> Result<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    struct Walk<'a> {
        deps: BTreeMap<&'a str, &'a [String]>,
        marks: BTreeMap<&'a str, Mark>,
        order: Vec<String>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, m: &'a str, by: &str) -> Result<()> {
            match self.marks.get(m) {
                Some(Mark::Done) => return Ok(()),
                Some(Mark::Visiting) => {
                    return Err(format!("modules.dep has a dependency cycle through {m}"))
                }
                None => {}
            }
            let deps = *self
                .deps
                .get(m)
                .ok_or_else(|| format!("{by} needs {m}, which modules.dep does not list"))?;
            self.marks.insert(m, Mark::Visiting);
            for d in deps.iter().rev() {
                self.visit(d, m)?;
            }
            self.marks.insert(m, Mark::Done);
            self.order.push(m.to_string());
            Ok(())
        }
    }
    let mut walk = Walk {
        deps: BTreeMap::new(),
        marks: BTreeMap::new(),
        order: Vec::new(),
    };
    for (m, d) in graph {
        if walk.deps.insert(m, d).is_some() {
            return Err(format!("modules.dep lists {m} twice"));
        }
    }
    for (m, _) in graph {
        walk.visit(m, "modules.dep")?;
    }
    Ok(walk.order)
}

/// What xtask reads from ELF files, with the `elf` crate the loader and the
/// hypervisor use: a kernel module's `.modinfo`, a program's libraries
/// (`DT_NEEDED`) and interpreter (`PT_INTERP`). A truncated or malformed file is an
/// error, not a panic.
pub(crate) mod elf {
    use elf::abi::{DT_NEEDED, PT_INTERP};
    use elf::endian::AnyEndian;
    use elf::ElfBytes;

    use crate::Result;

    #[cfg(test)]
    const SHT_DYNAMIC: u32 = elf::abi::SHT_DYNAMIC;

    fn parse(data: &[u8]) -> Result<ElfBytes<'_, AnyEndian>> {
        ElfBytes::minimal_parse(data).map_err(|e| format!("not an ELF file: {e}"))
    }

    fn bad(e: elf::ParseError) -> String {
        format!("malformed ELF file: {e}")
    }

    /// The NUL-terminated string at the start of `bytes`.
    fn cstr(bytes: &[u8]) -> Result<String> {
        let end = bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| "ELF string without its NUL".to_string())?;
        Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
    }

    /// The value of `key=` in a kernel module's `.modinfo` (e.g. `depends`), or `None`
    /// if the section has no such key. A file without `.modinfo` is an error.
    pub fn modinfo(data: &[u8], key: &str) -> Result<Option<String>> {
        let file = parse(data)?;
        let shdr = file
            .section_header_by_name(".modinfo")
            .map_err(bad)?
            .ok_or_else(|| "no .modinfo section: not a kernel module".to_string())?;
        let (info, _) = file.section_data(&shdr).map_err(bad)?;
        let prefix = format!("{key}=");
        Ok(info
            .split(|&b| b == 0)
            .find_map(|f| f.strip_prefix(prefix.as_bytes()))
            .map(|v| String::from_utf8_lossy(v).into_owned()))
    }

    /// The libraries a program or library names (`DT_NEEDED`), in order.
    pub fn needed(data: &[u8]) -> Result<Vec<String>> {
        let file = parse(data)?;
        let Some(shdrs) = file.section_headers() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for dynamic in shdrs.iter().filter(|s| s.sh_type == elf::abi::SHT_DYNAMIC) {
            let strings = shdrs
                .get(dynamic.sh_link as usize)
                .and_then(|s| file.section_data_as_strtab(&s))
                .map_err(|_| "the dynamic section links no string table".to_string())?;
            let (raw, _) = file.section_data(&dynamic).map_err(bad)?;
            let table = elf::dynamic::DynamicTable::new(file.ehdr.endianness, file.ehdr.class, raw);
            for entry in table.iter().take_while(|d| d.d_tag != elf::abi::DT_NULL) {
                if entry.d_tag == DT_NEEDED {
                    let name = strings.get(entry.d_val() as usize).map_err(bad)?;
                    out.push(name.to_string());
                }
            }
        }
        Ok(out)
    }

    /// The program interpreter (`PT_INTERP`), or `None` for a static program.
    pub fn interpreter(data: &[u8]) -> Result<Option<String>> {
        let file = parse(data)?;
        let Some(segments) = file.segments() else {
            return Ok(None);
        };
        match segments.iter().find(|p| p.p_type == PT_INTERP) {
            Some(p) => cstr(file.segment_data(&p).map_err(bad)?).map(Some),
            None => Ok(None),
        }
    }

    /// A minimal ELF64 for tests: the named sections (a `.dynamic` gets a `.dynstr`
    /// with `needed`) and, with `interp`, a `PT_INTERP` program header.
    #[cfg(test)]
    pub fn fake(modinfo: Option<&[u8]>, needed: &[&str], interp: Option<&str>) -> Vec<u8> {
        // (name, type, data, link)
        let mut secs: Vec<(&str, u32, Vec<u8>, u32)> = vec![("", 0, Vec::new(), 0)];
        if let Some(m) = modinfo {
            secs.push((".modinfo", 1, m.to_vec(), 0));
        }
        if !needed.is_empty() {
            let mut strs = vec![0u8];
            let mut dynamic = Vec::new();
            for n in needed {
                dynamic.extend_from_slice(&DT_NEEDED.to_le_bytes());
                dynamic.extend_from_slice(&(strs.len() as u64).to_le_bytes());
                strs.extend_from_slice(n.as_bytes());
                strs.push(0);
            }
            dynamic.extend_from_slice(&[0; 16]);
            let link = secs.len() as u32;
            secs.push((".dynstr", 3, strs, 0));
            secs.push((".dynamic", SHT_DYNAMIC, dynamic, link));
        }
        let mut shstrtab = vec![0u8];
        let mut name_at = Vec::new();
        for (name, ..) in &secs {
            name_at.push(if name.is_empty() {
                0
            } else {
                shstrtab.len() as u32
            });
            shstrtab.extend_from_slice(name.as_bytes());
            shstrtab.push(0);
        }
        name_at.push(shstrtab.len() as u32);
        shstrtab.extend_from_slice(b".shstrtab\0");
        secs.push((".shstrtab", 3, shstrtab, 0));

        let mut out = vec![0u8; 64];
        // ELF64, little-endian, version 1; e_version 1, e_ehsize 64.
        out[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
        out[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        out[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        let interp = interp.map(|i| format!("{i}\0"));
        if let Some(i) = &interp {
            let (ph, data) = (64u64, 64 + 56u64);
            out[0x20..0x28].copy_from_slice(&ph.to_le_bytes());
            out[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
            out[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
            let mut h = vec![0u8; 56];
            h[..4].copy_from_slice(&PT_INTERP.to_le_bytes());
            h[8..16].copy_from_slice(&data.to_le_bytes());
            h[32..40].copy_from_slice(&(i.len() as u64).to_le_bytes());
            out.extend_from_slice(&h);
            out.extend_from_slice(i.as_bytes());
        }
        let mut at = Vec::new();
        for (_, _, data, _) in &secs {
            at.push(out.len() as u64);
            out.extend_from_slice(data);
        }
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
        let shoff = out.len() as u64;
        out[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        out[0x3c..0x3e].copy_from_slice(&(secs.len() as u16).to_le_bytes());
        out[0x3e..0x40].copy_from_slice(&((secs.len() - 1) as u16).to_le_bytes());
        for (i, (_, ty, data, link)) in secs.iter().enumerate() {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name_at[i].to_le_bytes());
            h[4..8].copy_from_slice(&ty.to_le_bytes());
            h[24..32].copy_from_slice(&at[i].to_le_bytes());
            h[32..40].copy_from_slice(&(data.len() as u64).to_le_bytes());
            h[40..44].copy_from_slice(&link.to_le_bytes());
            if *ty == SHT_DYNAMIC {
                h[56..64].copy_from_slice(&16u64.to_le_bytes());
            }
            out.extend_from_slice(&h);
        }
        out
    }
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
    for name in own_files(config) {
        // Already on the ESP: one of xtask's own files (a guest image, say).
        if esp.join("hv").join(&name).is_file() {
            continue;
        }
        let src = paths.root.join(&name);
        if !src.is_file() {
            return Err(format!(
                "the VM config names {name}, which is not at {} (a Linux VM's own kernel \
                 and initrd are taken from the repository root, at the path the config gives)",
                src.display()
            ));
        }
        copy_into_esp(&src, esp, &name)?;
    }
    Ok(())
}

/// The kernels and initrds `config` names that are not xtask's own (Debian's kernel,
/// the busybox initramfs): the user's, copied from the repository root.
fn own_files(config: &str) -> Vec<String> {
    let Ok(c) = boot_info::config::parse(config) else {
        return Vec::new();
    };
    c.vm.iter()
        .flat_map(|v| [v.kernel.clone(), v.initrd.clone()])
        .flatten()
        .filter(|p| p != KERNEL && p != initramfs::INITRD)
        .collect()
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
    fn own_kernels_and_initrds_are_those_xtask_does_not_make() {
        let c = "[[vm]]\nname=\"a\"\nmemory_mib=256\nkernel=\"linux/vmlinuz\"\ninitrd=\"linux/initramfs.cpio\"\n\
                 [[vm]]\nname=\"b\"\nmemory_mib=256\nkernel=\"mine/bzImage\"\ninitrd=\"mine/initrd.img\"\n";
        assert_eq!(own_files(c), ["mine/bzImage", "mine/initrd.img"]);
    }

    #[test]
    fn only_configs_naming_the_debian_kernel_fetch_it() {
        let linux = "[[vm]]\nname=\"l\"\nmemory_mib=256\nkernel=\"linux/vmlinuz\"\n";
        assert!(wants_kernel(linux));
        let elf = "[[vm]]\nname=\"g\"\nmemory_mib=16\nimage=\"guests/draw.elf\"\n";
        assert!(!wants_kernel(elf));
        let own = "[[vm]]\nname=\"l\"\nmemory_mib=256\nkernel=\"mine/bzImage\"\n";
        assert!(!wants_kernel(own));
    }

    /// Whether every module of `order` comes after each one its line lists.
    fn respects(order: &[String], dep: &str) -> bool {
        let at = |m: &str| order.iter().position(|o| o == m).unwrap();
        dep.lines().filter(|l| !l.is_empty()).all(|l| {
            let (m, deps) = l.split_once(':').unwrap();
            deps.split_whitespace().all(|d| at(d) < at(m))
        })
    }

    #[test]
    fn the_load_order_puts_dependencies_first() {
        // Direct dependencies only, a module listed before what it needs, and a
        // diamond (gpu needs kms and shmem, both need drm).
        let dep = "kernel/gpu.ko: kernel/kms.ko kernel/shmem.ko kernel/virtio.ko\n\
                   kernel/kms.ko: kernel/drm.ko\n\
                   kernel/shmem.ko: kernel/drm.ko\n\
                   \n\
                   kernel/drm.ko:\n\
                   kernel/virtio.ko: kernel/ring.ko\n\
                   kernel/ring.ko:\n";
        let order = load_order(dep).unwrap();
        assert_eq!(
            order,
            [
                "kernel/ring.ko",
                "kernel/virtio.ko",
                "kernel/drm.ko",
                "kernel/shmem.ko",
                "kernel/kms.ko",
                "kernel/gpu.ko"
            ]
        );
        assert!(respects(&order, dep));
        assert_eq!(load_order("").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_dependency_cycle_or_missing_line_is_an_error() {
        let cycle = "a.ko: b.ko\nb.ko: c.ko\nc.ko: a.ko\n";
        let e = load_order(cycle).unwrap_err();
        assert!(e.contains("cycle"), "{e}");
        let self_dep = "a.ko: a.ko\n";
        assert!(load_order(self_dep).unwrap_err().contains("cycle"));
        let missing = "a.ko: b.ko\n";
        let e = load_order(missing).unwrap_err();
        assert!(e.contains("a.ko needs b.ko"), "{e}");
        assert!(load_order("a.ko:\na.ko:\n").unwrap_err().contains("twice"));
        assert!(load_order("no colon\n").unwrap_err().contains("line 1"));
    }

    #[test]
    fn the_written_modules_dep_is_transitive_and_keeps_the_order() {
        let set: Vec<(String, Vec<String>)> = [
            ("ring.ko", &[][..]),
            ("virtio.ko", &["ring.ko"][..]),
            ("drm.ko", &[]),
            ("kms.ko", &["drm.ko"]),
            ("gpu.ko", &["kms.ko", "virtio.ko"]),
        ]
        .into_iter()
        .map(|(m, d)| (m.to_string(), d.iter().map(|s| s.to_string()).collect()))
        .collect();
        let dep = modules_dep(&set).unwrap();
        assert_eq!(
            dep,
            "ring.ko:\nvirtio.ko: ring.ko\ndrm.ko:\nkms.ko: drm.ko\n\
             gpu.ko: kms.ko drm.ko virtio.ko ring.ko\n"
        );
        let order: Vec<_> = set.iter().map(|(m, _)| m.clone()).collect();
        assert_eq!(load_order(&dep).unwrap(), order);
        let broken = [("a.ko".to_string(), vec!["b.ko".to_string()])];
        assert!(modules_dep(&broken).is_err());
    }

    #[test]
    fn module_names_come_from_file_names() {
        assert_eq!(
            module_name("kernel/drivers/gpu/drm/virtio/virtio-gpu.ko"),
            "virtio_gpu"
        );
        assert_eq!(
            module_name("kernel/drivers/virtio/virtio_pci.ko.xz"),
            "virtio_pci"
        );
        assert_eq!(module_name("kernel/arch/x86/video/fbdev.ko"), "fbdev");
    }

    #[test]
    fn modules_and_their_dependencies_are_picked_and_builtins_skipped() {
        let dir = std::env::temp_dir().join(format!("xtask-linux-mods-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ko = |path: &str, depends: &str| {
            let p = dir.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            let info = format!("license=GPL\0depends={depends}\0name=x\0");
            fs::write(p, elf::fake(Some(info.as_bytes()), &[], None)).unwrap();
        };
        ko("kernel/drivers/virtio/virtio_pci.ko", "virtio_ring,virtio");
        ko("kernel/drivers/virtio/virtio.ko", "virtio_ring");
        ko("kernel/drivers/virtio/virtio_ring.ko", "");
        ko(
            "kernel/drivers/gpu/drm/virtio/virtio-gpu.ko",
            "drm,virtio,virtio_ring",
        );
        ko("kernel/drivers/gpu/drm/drm.ko", "");
        ko("kernel/drivers/net/unrelated.ko", "");
        fs::write(
            dir.join("modules.builtin"),
            "kernel/drivers/gpu/drm/drm.ko\n",
        )
        .unwrap();
        // drm is both: the module file wins, as modprobe would load it.
        let set = select(&dir).unwrap();
        let paths: Vec<_> = set.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_pci.ko",
                "kernel/drivers/gpu/drm/drm.ko",
                "kernel/drivers/gpu/drm/virtio/virtio-gpu.ko"
            ]
        );
        let dep = modules_dep(&set).unwrap();
        assert_eq!(load_order(&dep).unwrap(), paths);

        // A dependency built in is skipped; one that is neither is an error.
        fs::remove_file(dir.join("kernel/drivers/gpu/drm/drm.ko")).unwrap();
        let set = select(&dir).unwrap();
        assert!(set.iter().all(|(p, _)| !p.ends_with("/drm.ko")));
        fs::write(dir.join("modules.builtin"), "").unwrap();
        let e = select(&dir).unwrap_err();
        assert!(e.contains("drm is neither"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_cache_serves_only_kernel_and_the_same_module_set_together() {
        let dir = std::env::temp_dir().join(format!("xtask-linux-cache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mdir = dir.join("modules").join("6.1.0-9-amd64");
        fs::create_dir_all(&mdir).unwrap();
        fs::write(mdir.join("modules.dep"), "").unwrap();
        let stamp = modules_stamp(
            "linux-image-6.1.0-9-amd64_6.1.1-1_amd64.deb",
            "6.1.0-9-amd64",
        );
        fs::write(dir.join("modules").join("stamp"), &stamp).unwrap();
        assert!(cached(&dir).is_none(), "no kernel");
        fs::write(dir.join("vmlinuz"), b"bzImage").unwrap();
        let m = cached(&dir).unwrap();
        assert_eq!((m.release.as_str(), &m.dir), ("6.1.0-9-amd64", &mdir));
        assert_eq!(m.stamp, stamp);
        let other = stamp.replace("virtio_gpu", "virtio_gpu other");
        fs::write(dir.join("modules").join("stamp"), other).unwrap();
        assert!(cached(&dir).is_none(), "another module set");
        fs::remove_file(dir.join("modules").join("stamp")).unwrap();
        assert!(cached(&dir).is_none(), "an interrupted fetch");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_elf_reader_finds_modinfo_needed_and_interpreter() {
        let ko = elf::fake(
            Some(b"license=GPL\0depends=drm,virtio\0name=virtio_gpu\0"),
            &[],
            None,
        );
        assert_eq!(
            elf::modinfo(&ko, "depends").unwrap().as_deref(),
            Some("drm,virtio")
        );
        assert_eq!(
            elf::modinfo(&ko, "name").unwrap().as_deref(),
            Some("virtio_gpu")
        );
        assert_eq!(elf::modinfo(&ko, "vermagic").unwrap(), None);
        assert_eq!(elf::interpreter(&ko).unwrap(), None);
        assert!(elf::needed(&ko).unwrap().is_empty());

        let prog = elf::fake(None, &["libdrm.so.2", "libc.so.6"], Some("/lib64/ld.so"));
        assert_eq!(elf::needed(&prog).unwrap(), ["libdrm.so.2", "libc.so.6"]);
        assert_eq!(
            elf::interpreter(&prog).unwrap().as_deref(),
            Some("/lib64/ld.so")
        );
        assert!(elf::modinfo(&prog, "depends")
            .unwrap_err()
            .contains("not a kernel module"));

        // Truncated or foreign files are errors, not panics.
        for cut in [0, 5, 63, prog.len() / 2, prog.len() - 1] {
            let _ = elf::needed(&prog[..cut]);
            let _ = elf::interpreter(&prog[..cut]);
        }
        assert!(elf::needed(&prog[..prog.len() - 1]).is_err());
        assert!(elf::needed(b"#!/bin/sh\n").is_err());
    }

    #[test]
    fn the_elf_reader_reads_this_test_program() {
        // A real binary of this host: dynamically linked against libc on Linux.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        let needed = elf::needed(&me).unwrap();
        assert!(
            needed.iter().any(|n| n.starts_with("libc.so")),
            "{needed:?}"
        );
        let interp = elf::interpreter(&me).unwrap().unwrap();
        assert!(interp.contains("ld-linux"), "{interp}");
    }
}
