//! Linux guests' initial RAM disk: a tiny busybox userland, so a kernel that boots has
//! an `/init` to run, which says it is up on the console and then powers off or keeps a
//! shell there. With `gpupv.gpu` on the kernel command line it first drives the virtual
//! GPU the way a stock distribution would: it loads Linux's own virtio-gpu driver (the
//! modules of Debian's kernel from [`crate::linux`], in dependency order) and runs
//! `modetest` from Debian's `libdrm-tests`, which lists the connectors and draws its
//! test pattern through the DRM interface, so the mediator meets an unmodified driver.
//!
//! Busybox is Debian's static build; modetest is dynamically linked, so the archive
//! carries the libraries its ELF names (transitively) at the paths Debian's `ld.so`
//! searches with no `ld.so.cache`, and the interpreter, and nothing else of those
//! packages. All come from `apt-get download` and `dpkg -x` like the kernel.
//! The archive is written here as an uncompressed newc cpio (Linux unpacks that with no
//! decompressor, and no cpio tool is needed), byte-for-byte reproducible, and cached
//! under `target/xtask/linux/` with a stamp naming the package versions, the kernel's
//! modules and [`FORMAT`], so a second run fetches nothing. A VM config names it as
//! `initrd = "linux/initramfs.cpio"`; the ESP gets it as `\hv\linux\initramfs.cpio`.

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::linux::{self, elf, run};
use crate::{Context, Paths, Result};

/// The path a VM config uses for this initramfs.
pub const INITRD: &str = "linux/initramfs.cpio";

/// The packages the archive's files come from: Debian's statically linked busybox,
/// and modetest with the libraries it links (libdrm, glibc and its `ld.so`).
const PACKAGES: &[&str] = &["busybox-static", "libdrm-tests", "libdrm2", "libc6"];

/// modetest's path, in `libdrm-tests` and in the archive.
const MODETEST: &str = "usr/bin/modetest";

/// Where Debian's `ld.so` looks for libraries when there is no `ld.so.cache` (its
/// `--help` lists them), in its order.
const LIB_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib",
    "usr/lib",
];

/// The archive's layout version: bump it when [`INIT`] or [`layout`] changes, so
/// cached archives are rebuilt.
const FORMAT: u32 = 7;

/// The busybox applets linked in `/bin`: what `/init` runs, and a few for the shell.
const APPLETS: &[&str] = &[
    "sh", "mount", "echo", "cat", "ls", "uname", "setsid", "cttyhack", "poweroff", "sleep",
    "insmod", "awk", "timeout", "lsmod", "modprobe", "dmesg",
];

/// The list `/init` loads the modules from: their absolute paths, in load order.
const MODULE_LIST: &str = "etc/gpupv/modules";

/// Where `/init` finds [`FIRST_MODE`].
const FIRST_MODE_AWK: &str = "etc/gpupv/first-mode.awk";

/// Prints `<connector id> <mode name>` of the first connected connector that has a
/// mode, from `modetest -c`: rows `id encoder status name size modes encoders`, each
/// followed by its modes as `  #<index> <name> <refresh> ...`. Property lines
/// (`<id> <name>:`) never have a number and a status in the second and third fields.
const FIRST_MODE: &str = r#"# gpupv: the first connected connector's id and first mode, from `modetest -c`.
$1 ~ /^[0-9]+$/ && $2 ~ /^[0-9]+$/ && $3 ~ /^(connected|disconnected|unknown)$/ {
    if (id != "") exit
    if ($3 == "connected" && $6 > 0) id = $1
    next
}
id != "" && $1 ~ /^#[0-9]+$/ { print id, $2; exit }
"#;

/// The kernel runs this as pid 1. It must never exit (the kernel would panic), so
/// the shell is a child that is restarted, not `exec`ed.
const INIT: &str = r#"#!/bin/sh
# gpupv's /init: mount the kernel's filesystems, say the userland is up, drive the
# virtual GPU (gpupv.gpu on the kernel command line; gpupv.irq-cpu1 moves its
# interrupts to CPU 1 first; gpupv.flip=SECONDS adds a bounded page-flip run),
# then power off (gpupv.poweroff) or keep a shell on the console.
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "gpupv-init: up $(uname -r)" > /dev/console

# The SECONDS of gpupv.flip=SECONDS in the command line $1: nothing without one, `bad`
# unless whole seconds (the last one counts).
flip_secs() {
    f=
    for w in $1; do
        case "$w" in
        gpupv.flip=*) f=${w#gpupv.flip=} ;;
        gpupv.flip) f=bad ;;
        esac
    done
    case "$f" in
    "") ;;
    *[!0-9]*) echo bad ;;
    *) echo "$f" ;;
    esac
}

# Loads virtio-gpu and what it needs in dependency order, waits for its DRM device,
# lists the connectors, then has modetest set the first connected one's first mode and
# draw its test pattern. modetest then waits for a key on stdin: the pipe from sleep
# closes after 5 s. timeout turns a modetest stuck on the device into a failure.
gpu() {
    while read -r ko; do
        name=${ko##*/}
        if ! insmod "$ko"; then
            echo "gpupv-init: module ${name%.ko} failed"
            return 1
        fi
    done < /etc/gpupv/modules
    echo "gpupv-init: modules loaded"
    n=0
    while [ ! -e /dev/dri/card0 ]; do
        if [ $n -ge 30 ]; then
            echo "gpupv-init: no /dev/dri/card0"
            return 1
        fi
        sleep 1
        n=$((n + 1))
    done
    echo "gpupv-init: drm ready"
    case " $(cat /proc/cmdline) " in
    *" gpupv.irq-cpu1 "*)
        # Every virtio interrupt to CPU 1: its MSI-X messages then name APIC 1.
        for irq in $(awk -F: '/virtio/ { print $1 }' /proc/interrupts); do
            echo 1 > "/proc/irq/$irq/smp_affinity_list"
        done
        irq_cpu1=1
        ;;
    esac
    timeout 60 modetest -M virtio_gpu -c > /tmp/connectors
    rc=$?
    cat /tmp/connectors
    if [ $rc -ne 0 ]; then
        echo "gpupv-init: modetest failed $rc"
        return 1
    fi
    set -- $(awk -f /etc/gpupv/first-mode.awk /tmp/connectors)
    if [ $# -ne 2 ]; then
        echo "gpupv-init: no connected connector with a mode"
        return 1
    fi
    # modetest draws, then holds the picture until its stdin closes; halfway
    # through, a line says the picture is up (a scenario dumps the screen then).
    (sleep 3; echo "gpupv-init: modetest showing $2" >&2; sleep 3) |
        timeout 60 modetest -M virtio_gpu -s "$1:$2"
    rc=$?
    if [ $rc -ne 0 ]; then
        echo "gpupv-init: modetest failed $rc"
        return 1
    fi
    echo "gpupv-init: modetest drew $2"
    if [ -n "$irq_cpu1" ]; then
        awk '/virtio/ { c0 += $2; c1 += $3 }
            END { print "gpupv-init: virtio interrupts on cpu0", c0, "on cpu1", c1,
                (c1 > 0 ? "(cpu1 took some)" : "(none on cpu1)") }' \
            /proc/interrupts
    fi
    # gpupv.flip=SECONDS: modetest -v page-flips between two pictures, printing
    # `freq: N.NNHz` on stderr every 60 flips, until its stdin (sleep's pipe) closes.
    secs=$(flip_secs "$(cat /proc/cmdline)")
    case "$secs" in
    "") ;;
    bad)
        echo "gpupv-init: gpupv.flip wants whole seconds"
        return 1
        ;;
    *)
        echo "gpupv-init: flipping $1:$2 for $secs s"
        sleep "$secs" | timeout $((secs + 60)) modetest -M virtio_gpu -s "$1:$2" -v
        rc=$?
        if [ $rc -ne 0 ]; then
            echo "gpupv-init: modetest failed $rc"
            return 1
        fi
        echo "gpupv-init: flipped $2"
        ;;
    esac
}
case " $(cat /proc/cmdline) " in
*" gpupv.gpu "*)
    gpu > /dev/console 2>&1
    ;;
esac
case " $(cat /proc/cmdline) " in
*" gpupv.poweroff "*)
    echo "gpupv-init: poweroff" > /dev/console
    # The framebuffer console off first: its cursor blink flushes through the GPU
    # driver, which races with the device shutdown of `poweroff -f` (a WARN).
    for b in /sys/class/vtconsole/vtcon*/bind; do echo 0 > "$b"; done 2>/dev/null
    sleep 1
    poweroff -f
    ;;
esac
# setsid + cttyhack: the shell gets the console as its controlling tty (job control).
while :; do
    setsid cttyhack sh
    sleep 1
done
"#;

/// The newc trailer entry's name, which ends the archive.
const TRAILER: &str = "TRAILER!!!";

/// File type bits of a cpio mode (as in `st_mode`).
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind<'a> {
    Dir,
    File(&'a [u8]),
    /// A symbolic link to the target path.
    Symlink(&'a str),
    /// A character device node.
    CharDev {
        major: u32,
        minor: u32,
    },
}

/// One archive entry: a path without the leading `/`, permission bits and its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry<'a> {
    name: String,
    perm: u32,
    kind: Kind<'a>,
}

impl<'a> Entry<'a> {
    fn new(name: &str, perm: u32, kind: Kind<'a>) -> Self {
        Entry {
            name: name.to_string(),
            perm,
            kind,
        }
    }
}

/// A file or link the archive holds besides its skeleton, busybox and `/init`:
/// modetest and its libraries, the kernel modules and their lists.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Extra {
    /// The archive path, without the leading `/`.
    path: String,
    perm: u32,
    what: Owned,
}

/// What an [`Extra`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owned {
    File(Vec<u8>),
    /// A symbolic link to the target path.
    Link(String),
}

impl Extra {
    fn file(path: &str, perm: u32, data: Vec<u8>) -> Self {
        let (path, what) = (path.to_string(), Owned::File(data));
        Extra { path, perm, what }
    }

    fn link(path: &str, target: &str) -> Self {
        let (path, what) = (path.to_string(), Owned::Link(target.to_string()));
        Extra {
            path,
            perm: 0o777,
            what,
        }
    }
}

/// The initramfs's entries around the `busybox` binary and the `extras`, in archive
/// order: parents first (the kernel creates no missing directories), the extras in
/// their order.
fn layout<'a>(busybox: &'a [u8], extras: &'a [Extra]) -> Vec<Entry<'a>> {
    let mut e = Vec::new();
    let mut dirs = BTreeSet::new();
    for (dir, perm) in [
        ("bin", 0o755),
        ("sbin", 0o755),
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("etc", 0o755),
        ("root", 0o700),
    ] {
        e.push(Entry::new(dir, perm, Kind::Dir));
        dirs.insert(dir.to_string());
    }
    // The kernel opens it as init's stdin/stdout/stderr before devtmpfs is mounted.
    e.push(Entry::new(
        "dev/console",
        0o600,
        Kind::CharDev { major: 5, minor: 1 },
    ));
    e.push(Entry::new("bin/busybox", 0o755, Kind::File(busybox)));
    for applet in APPLETS {
        let name = format!("bin/{applet}");
        e.push(Entry::new(&name, 0o777, Kind::Symlink("busybox")));
    }
    // `mount` then neither writes nor misreports a mount table.
    e.push(Entry::new("etc/mtab", 0o777, Kind::Symlink("/proc/mounts")));
    let awk = Entry::new(FIRST_MODE_AWK, 0o644, Kind::File(FIRST_MODE.as_bytes()));
    with_parents(&mut e, &mut dirs, awk);
    for x in extras {
        let kind = match &x.what {
            Owned::File(d) => Kind::File(d),
            Owned::Link(t) => Kind::Symlink(t),
        };
        with_parents(&mut e, &mut dirs, Entry::new(&x.path, x.perm, kind));
    }
    e.push(Entry::new("init", 0o755, Kind::File(INIT.as_bytes())));
    e
}

/// Appends `entry` to `e`, after each of its ancestors that `dirs` does not hold yet
/// (outermost first, as directories with mode 0755).
fn with_parents<'a>(e: &mut Vec<Entry<'a>>, dirs: &mut BTreeSet<String>, entry: Entry<'a>) {
    for (i, _) in entry.name.match_indices('/') {
        let dir = &entry.name[..i];
        if dirs.insert(dir.to_string()) {
            e.push(Entry::new(dir, 0o755, Kind::Dir));
        }
    }
    e.push(entry);
}

/// Pads `out` with zeros to a multiple of 4 bytes, as newc wants after names and data.
fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| format!("{what} is too large for a newc cpio archive"))
}

/// Appends one newc header and its name: owner root, mtime 0, no checksum.
fn header(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
    name: &str,
) -> Result<()> {
    let namesize = u32_of(name.len() + 1, name)?;
    let (uid, gid, mtime, devmajor, devminor, check) = (0, 0, 0, 0, 0, 0);
    let fields = [
        ino, mode, uid, gid, nlink, mtime, size, devmajor, devminor, rdev.0, rdev.1, namesize,
        check,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    Ok(())
}

/// `entries` as a newc ("070701") cpio archive ending in the trailer; the same entries
/// always give the same bytes.
fn newc(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let (ty, nlink, data, rdev) = match &e.kind {
            Kind::Dir => (S_IFDIR, 2, &[][..], (0, 0)),
            Kind::File(d) => (S_IFREG, 1, *d, (0, 0)),
            Kind::Symlink(t) => (S_IFLNK, 1, t.as_bytes(), (0, 0)),
            Kind::CharDev { major, minor } => (S_IFCHR, 1, &[][..], (*major, *minor)),
        };
        let ino = u32_of(i + 1, "the entry count")?;
        let size = u32_of(data.len(), &e.name)?;
        header(
            &mut out,
            ino,
            ty | (e.perm & 0o7777),
            nlink,
            size,
            rdev,
            &e.name,
        )?;
        out.extend_from_slice(data);
        pad4(&mut out);
    }
    header(&mut out, 0, 0, 1, 0, (0, 0), TRAILER)?;
    Ok(out)
}

/// Whether `config` (a vms.toml) gives some VM this initramfs.
pub fn wants_initramfs(config: &str) -> bool {
    boot_info::config::parse(config)
        .is_ok_and(|c| c.vm.iter().any(|v| v.initrd.as_deref() == Some(INITRD)))
}

/// The version apt would fetch of each of `packages` (`Candidate:` of one
/// `apt-cache policy`), in their order.
fn candidates(policy: &str, packages: &[&str]) -> Result<Vec<(String, String)>> {
    let mut found = Vec::new();
    let mut current = None;
    for line in policy.lines() {
        if !line.starts_with(char::is_whitespace) {
            // `libc6:` or, with foreign architectures, `libc6:amd64:`.
            let name = line.trim_end().trim_end_matches(':');
            current = Some(name.strip_suffix(":amd64").unwrap_or(name));
        } else if let (Some(p), Some(v)) = (current, line.trim().strip_prefix("Candidate:")) {
            let v = v.trim();
            if !v.is_empty() && v != "(none)" {
                found.push((p.to_string(), v.to_string()));
            }
        }
    }
    packages
        .iter()
        .map(|p| {
            found
                .iter()
                .find(|(name, _)| name == p)
                .cloned()
                .ok_or_else(|| format!("apt-cache policy {p} names no candidate (apt-get update?)"))
        })
        .collect()
}

/// The cache stamp: which packages and kernel modules the archive holds and which
/// [`FORMAT`] it has.
fn stamp(versions: &[(String, String)], modules: &str) -> String {
    let mut s = String::new();
    for (p, v) in versions {
        s.push_str(&format!("{p} {v}\n"));
    }
    s.push_str(modules);
    s.push_str(&format!("format {FORMAT}\n"));
    s
}

/// Whether the cached `cpio` serves: it exists and its stamp file says `want`.
fn cached(cpio: &Path, stamp_file: &Path, want: &str) -> bool {
    cpio.is_file() && fs::read_to_string(stamp_file).is_ok_and(|s| s == want)
}

/// Fetches the `pinned` packages (`name=version`) into `work` and unpacks them all into
/// one tree, which it returns.
fn fetch_packages(work: &Path, pinned: &[String]) -> Result<PathBuf> {
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work).ctx(|| format!("cannot create {}", work.display()))?;
    run(Command::new("apt-get")
        .arg("download")
        .args(pinned)
        .current_dir(work))?;
    let root = work.join("root");
    let mut debs = 0;
    for e in fs::read_dir(work).ctx(|| format!("cannot read {}", work.display()))? {
        let deb = e.ctx(|| format!("cannot read {}", work.display()))?.path();
        if deb.extension().is_some_and(|x| x == "deb") {
            run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
            debs += 1;
        }
    }
    if debs != pinned.len() {
        return Err(format!(
            "apt-get download {} left {debs} .deb files in {}",
            pinned.join(" "),
            work.display()
        ));
    }
    Ok(root)
}

/// `rel` without `.` and with each `..` dropping the component before it.
fn normalize(rel: &Path) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().unwrap_or_default()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    parts.join("/")
}

/// Follows the symlinks of `rel` (a path in the tree at `root`) inside that tree, not
/// the host's: the links passed as (path, target) and the path of the file reached.
fn follow(root: &Path, rel: &str) -> Result<(Vec<(String, String)>, String)> {
    let mut links = Vec::new();
    let mut at = rel.to_string();
    for _ in 0..16 {
        let meta = fs::symlink_metadata(root.join(&at))
            .ctx(|| format!("{at} is not in {}", root.display()))?;
        if !meta.file_type().is_symlink() {
            return Ok((links, at));
        }
        let target = fs::read_link(root.join(&at)).ctx(|| format!("cannot read {at}"))?;
        let next = match target.strip_prefix("/") {
            Ok(abs) => normalize(abs),
            Err(_) => normalize(
                &Path::new(&at)
                    .parent()
                    .unwrap_or(Path::new(""))
                    .join(&target),
            ),
        };
        links.push((at, target.to_string_lossy().into_owned()));
        at = next;
    }
    Err(format!("{rel} has too many levels of symbolic links"))
}

/// `program` (a path in the tree at `root`) and all the dynamic loader needs to run it:
/// its interpreter and the libraries it names (`DT_NEEDED`), transitively, each
/// where `ld.so` finds it first among [`LIB_DIRS`]. Symlinks on the way (the
/// interpreter's `/lib64` link, a library's soname link) stay links.
fn userland(root: &Path, program: &str) -> Result<Vec<Extra>> {
    let mut out = Vec::new();
    let mut have = BTreeSet::new();
    let mut add = |rel: &str, out: &mut Vec<Extra>| -> Result<Vec<u8>> {
        let (links, file) = follow(root, rel)?;
        for (path, target) in links {
            if have.insert(path.clone()) {
                out.push(Extra::link(&path, &target));
            }
        }
        let data = fs::read(root.join(&file)).ctx(|| format!("cannot read {file}"))?;
        if have.insert(file.clone()) {
            let meta = fs::metadata(root.join(&file)).ctx(|| format!("cannot read {file}"))?;
            out.push(Extra::file(
                &file,
                meta.permissions().mode() & 0o7777,
                data.clone(),
            ));
        }
        Ok(data)
    };
    let elf_of = |rel: &str, data: &[u8]| -> Result<(Vec<String>, Option<String>)> {
        let needed = elf::needed(data).ctx(|| format!("cannot read {rel}"))?;
        let interp = elf::interpreter(data).ctx(|| format!("cannot read {rel}"))?;
        Ok((needed, interp))
    };
    let data = add(program, &mut out)?;
    let (needed, interp) = elf_of(program, &data)?;
    if let Some(interp) = interp {
        add(interp.trim_start_matches('/'), &mut out)?;
    }
    let mut todo: VecDeque<(String, String)> = needed
        .into_iter()
        .map(|n| (n, program.to_string()))
        .collect();
    let mut seen = BTreeSet::new();
    while let Some((lib, by)) = todo.pop_front() {
        if !seen.insert(lib.clone()) {
            continue;
        }
        let rel = LIB_DIRS
            .iter()
            .map(|d| format!("{d}/{lib}"))
            .find(|p| fs::symlink_metadata(root.join(p)).is_ok())
            .ok_or_else(|| {
                format!(
                    "{by} needs {lib}, which none of {} holds in {}",
                    PACKAGES.join(", "),
                    LIB_DIRS.join(", ")
                )
            })?;
        let data = add(&rel, &mut out)?;
        let (needed, _) = elf_of(&rel, &data)?;
        todo.extend(needed.into_iter().map(|n| (n, lib.clone())));
    }
    Ok(out)
}

/// The kernel modules of a `modules.dep` for `release` as archive files: each `.ko`
/// (its bytes from `read`) at `lib/modules/<release>/<path>` in load order, that
/// `modules.dep` (for busybox's modprobe at the shell) and [`MODULE_LIST`], the
/// absolute paths in load order that `/init` insmods.
fn module_extras(
    release: &str,
    modules_dep: &str,
    read: impl Fn(&str) -> Result<Vec<u8>>,
) -> Result<Vec<Extra>> {
    let base = format!("lib/modules/{release}");
    let mut out = Vec::new();
    let mut list = String::new();
    for m in linux::load_order(modules_dep)? {
        let path = format!("{base}/{m}");
        out.push(Extra::file(&path, 0o644, read(&m)?));
        list.push_str(&format!("/{path}\n"));
    }
    let dep = modules_dep.as_bytes().to_vec();
    out.push(Extra::file(&format!("{base}/modules.dep"), 0o644, dep));
    out.push(Extra::file(MODULE_LIST, 0o644, list.into_bytes()));
    Ok(out)
}

/// Busybox and the extras (modetest's userland, then the kernel modules) from the
/// packages unpacked at `root` and the cached `modules`.
fn contents(root: &Path, modules: &linux::Modules) -> Result<(Vec<u8>, Vec<Extra>)> {
    let busybox = fs::read(root.join("bin").join("busybox"))
        .ctx(|| format!("{} holds no bin/busybox", PACKAGES[0]))?;
    let mut extras = userland(root, MODETEST)?;
    let dep_file = modules.dir.join("modules.dep");
    let dep =
        fs::read_to_string(&dep_file).ctx(|| format!("cannot read {}", dep_file.display()))?;
    let read = |m: &str| fs::read(modules.dir.join(m)).ctx(|| format!("cannot read module {m}"));
    extras.extend(module_extras(&modules.release, &dep, read)?);
    Ok((busybox, extras))
}

/// The initramfs (`target/xtask/linux/initramfs.cpio`), built once per set of package
/// versions, kernel modules and [`FORMAT`].
pub fn build(paths: &Paths) -> Result<PathBuf> {
    let dir = paths.xtask.join("linux");
    let cpio = dir.join("initramfs.cpio");
    let stamp_file = dir.join("initramfs.stamp");
    let policy = run(Command::new("apt-cache").arg("policy").args(PACKAGES));
    let versions = match policy.and_then(|p| candidates(&p, PACKAGES)) {
        Ok(v) => v,
        // Without apt, an archive of this format still serves.
        Err(e) => {
            let format = format!("\nformat {FORMAT}\n");
            let have = fs::read_to_string(&stamp_file).unwrap_or_default();
            return if cpio.is_file() && have.ends_with(&format) {
                Ok(cpio)
            } else {
                Err(e)
            };
        }
    };
    let modules = linux::modules(paths)?;
    let want = stamp(&versions, &modules.stamp);
    if cached(&cpio, &stamp_file, &want) {
        return Ok(cpio);
    }
    let pinned: Vec<String> = versions.iter().map(|(p, v)| format!("{p}={v}")).collect();
    eprintln!(
        "xtask: fetching busybox and modetest for the Linux initramfs: apt-get download {}",
        pinned.join(" ")
    );
    fs::create_dir_all(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
    // Per process, so two xtasks building at once do not unpack into each other.
    let work = dir.join(format!("initramfs-fetch.{}", std::process::id()));
    let parts = fetch_packages(&work, &pinned).and_then(|root| contents(&root, &modules));
    let _ = fs::remove_dir_all(&work);
    let (busybox, extras) = parts?;
    let archive = newc(&layout(&busybox, &extras))?;
    let part = dir.join(format!("initramfs.cpio.part.{}", std::process::id()));
    fs::write(&part, &archive).ctx(|| format!("cannot write {}", part.display()))?;
    fs::rename(&part, &cpio).ctx(|| format!("cannot create {}", cpio.display()))?;
    // Last: a stamp never vouches for an archive that is not there yet.
    fs::write(&stamp_file, want).ctx(|| format!("cannot write {}", stamp_file.display()))?;
    Ok(cpio)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry as read back from an archive.
    #[derive(Debug)]
    struct Read {
        name: String,
        mode: u32,
        uid: u32,
        gid: u32,
        nlink: u32,
        mtime: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// A strict newc reader: checks magic, 4-byte alignment, the trailer and that
    /// nothing follows it.
    fn read_newc(a: &[u8]) -> Vec<Read> {
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            assert_eq!(at % 4, 0, "header at {at} is not 4-byte aligned");
            assert_eq!(&a[at..at + 6], b"070701", "magic at {at}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&a[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let size = field(6) as usize;
            let namesize = field(11) as usize;
            let name_at = at + 110;
            assert_eq!(a[name_at + namesize - 1], 0, "name is NUL-terminated");
            let name = std::str::from_utf8(&a[name_at..name_at + namesize - 1]).unwrap();
            let data_at = (name_at + namesize).next_multiple_of(4);
            assert!(a[name_at + namesize..data_at].iter().all(|&b| b == 0));
            let end = data_at + size;
            let next = end.next_multiple_of(4);
            assert!(a[end..next].iter().all(|&b| b == 0));
            assert_eq!(field(12), 0, "check field");
            let r = Read {
                name: name.to_string(),
                mode: field(1),
                uid: field(2),
                gid: field(3),
                nlink: field(4),
                mtime: field(5),
                rdev: (field(9), field(10)),
                data: a[data_at..end].to_vec(),
            };
            at = next;
            if r.name == TRAILER {
                assert_eq!(at, a.len(), "nothing follows the trailer");
                return out;
            }
            out.push(r);
        }
    }

    fn find<'a>(r: &'a [Read], name: &str) -> &'a Read {
        r.iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn newc_entries_read_back_with_names_modes_sizes_and_devices() {
        // Odd lengths everywhere, so every padding case is hit.
        let entries = [
            Entry::new("d", 0o755, Kind::Dir),
            Entry::new("d/file", 0o644, Kind::File(b"hello")),
            Entry::new("d/ln", 0o777, Kind::Symlink("file")),
            Entry::new("d/tty", 0o600, Kind::CharDev { major: 5, minor: 1 }),
            Entry::new("empty", 0o640, Kind::File(b"")),
        ];
        let a = newc(&entries).unwrap();
        let r = read_newc(&a);
        let names: Vec<_> = r.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["d", "d/file", "d/ln", "d/tty", "empty"]);
        assert_eq!(r[0].mode, 0o040_755);
        assert_eq!(r[0].nlink, 2);
        assert_eq!(
            (r[1].mode, r[1].data.as_slice()),
            (0o100_644, &b"hello"[..])
        );
        assert_eq!((r[2].mode, r[2].data.as_slice()), (0o120_777, &b"file"[..]));
        assert_eq!(
            (r[3].mode, r[3].rdev, r[3].data.len()),
            (0o020_600, (5, 1), 0)
        );
        assert_eq!((r[4].mode, r[4].data.len()), (0o100_640, 0));
        for e in &r {
            assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 0), "{}", e.name);
        }
        let trailer = a.len() - (110 + TRAILER.len() + 1).next_multiple_of(4);
        assert!(a[trailer..].starts_with(b"070701"));
        assert!(a.windows(TRAILER.len()).any(|w| w == TRAILER.as_bytes()));
    }

    /// A modules.dep as [`linux`] writes it: transitive, last-loaded first.
    const DEP: &str = "kernel/drivers/virtio/virtio_ring.ko:\n\
        kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
        kernel/drivers/gpu/drm/drm.ko:\n\
        kernel/drivers/gpu/drm/virtio/virtio-gpu.ko: kernel/drivers/gpu/drm/drm.ko \
        kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n";

    /// The modules of [`DEP`] in load order.
    const ORDER: [&str; 4] = [
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/gpu/drm/drm.ko",
        "kernel/drivers/gpu/drm/virtio/virtio-gpu.ko",
    ];

    const RELEASE: &str = "6.1.0-9-amd64";

    /// Each fake module's bytes: its path.
    fn fake_module(m: &str) -> Result<Vec<u8>> {
        Ok(format!("ko {m}").into_bytes())
    }

    /// Extras as [`contents`] gives them: a userland (by hand) and [`DEP`]'s modules.
    fn sample_extras() -> Vec<Extra> {
        let mut x = vec![
            Extra::file(MODETEST, 0o755, b"\x7fELF modetest".to_vec()),
            Extra::link(
                "lib64/ld-linux-x86-64.so.2",
                "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            ),
            Extra::file(
                "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                0o755,
                b"\x7fELF ld.so".to_vec(),
            ),
            Extra::link("usr/lib/x86_64-linux-gnu/libdrm.so.2", "libdrm.so.2.4.0"),
            Extra::file(
                "usr/lib/x86_64-linux-gnu/libdrm.so.2.4.0",
                0o644,
                b"\x7fELF libdrm".to_vec(),
            ),
            Extra::file(
                "lib/x86_64-linux-gnu/libc.so.6",
                0o755,
                b"\x7fELF libc".to_vec(),
            ),
        ];
        x.extend(module_extras(RELEASE, DEP, fake_module).unwrap());
        x
    }

    #[test]
    fn the_archive_is_reproducible() {
        let busybox = b"\x7fELF fake busybox".to_vec();
        let one = newc(&layout(&busybox, &sample_extras())).unwrap();
        let two = newc(&layout(&busybox.clone(), &sample_extras())).unwrap();
        assert_eq!(one, two);
        assert_ne!(
            one,
            newc(&layout(b"another busybox", &sample_extras())).unwrap()
        );
        assert_ne!(one, newc(&layout(&busybox, &[])).unwrap());
    }

    #[test]
    fn the_layout_is_busybox_links_console_and_init() {
        let busybox = b"\x7fELF fake busybox";
        let extras = sample_extras();
        let r = read_newc(&newc(&layout(busybox, &extras)).unwrap());
        for dir in ["bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "root"] {
            assert_eq!(find(&r, dir).mode & 0o170_000, S_IFDIR, "{dir}");
        }
        let bb = find(&r, "bin/busybox");
        assert_eq!((bb.mode, bb.data.as_slice()), (0o100_755, &busybox[..]));
        for applet in APPLETS {
            let l = find(&r, &format!("bin/{applet}"));
            assert_eq!(
                (l.mode & 0o170_000, l.data.as_slice()),
                (S_IFLNK, &b"busybox"[..])
            );
        }
        let console = find(&r, "dev/console");
        assert_eq!((console.mode, console.rdev), (0o020_600, (5, 1)));
        let init = find(&r, "init");
        assert_eq!(init.mode, 0o100_755);
        assert!(init.data.starts_with(b"#!/bin/sh\n"));
        assert_eq!(find(&r, FIRST_MODE_AWK).data, FIRST_MODE.as_bytes());
        // Every entry's parent is a directory entry before it.
        let at = |n: &str| r.iter().position(|e| e.name == n).unwrap();
        for (i, e) in r.iter().enumerate() {
            if let Some((parent, _)) = e.name.rsplit_once('/') {
                assert!(at(parent) < i, "{} before {parent}", e.name);
                assert_eq!(r[at(parent)].mode & 0o170_000, S_IFDIR, "{parent}");
            }
        }
        let names: Vec<_> = r.iter().map(|e| e.name.as_str()).collect();
        let unique: BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "no path twice");
    }

    #[test]
    fn the_layout_holds_modetest_its_libraries_and_the_modules_in_load_order() {
        let r = read_newc(&newc(&layout(b"bb", &sample_extras())).unwrap());
        let mt = find(&r, MODETEST);
        assert_eq!(
            (mt.mode, mt.data.as_slice()),
            (0o100_755, &b"\x7fELF modetest"[..])
        );
        let ld = find(&r, "lib64/ld-linux-x86-64.so.2");
        assert_eq!(
            (ld.mode & 0o170_000, ld.data.as_slice()),
            (S_IFLNK, &b"/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"[..])
        );
        for lib in [
            "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            "lib/x86_64-linux-gnu/libc.so.6",
            "usr/lib/x86_64-linux-gnu/libdrm.so.2.4.0",
        ] {
            assert_eq!(find(&r, lib).mode & 0o170_000, S_IFREG, "{lib}");
        }
        // The modules, in load order in the archive and in the list /init reads.
        let base = format!("lib/modules/{RELEASE}");
        let at = |n: &str| r.iter().position(|e| e.name == n).unwrap();
        let places: Vec<_> = ORDER.iter().map(|m| at(&format!("{base}/{m}"))).collect();
        assert!(places.windows(2).all(|w| w[0] < w[1]), "{places:?}");
        for m in ORDER {
            let ko = find(&r, &format!("{base}/{m}"));
            assert_eq!(
                (ko.mode, ko.data.clone()),
                (0o100_644, fake_module(m).unwrap())
            );
        }
        assert_eq!(
            find(&r, &format!("{base}/modules.dep")).data,
            DEP.as_bytes()
        );
        let list = String::from_utf8(find(&r, MODULE_LIST).data.clone()).unwrap();
        let want: Vec<_> = ORDER.iter().map(|m| format!("/{base}/{m}")).collect();
        assert_eq!(list.lines().collect::<Vec<_>>(), want);
    }

    #[test]
    fn module_extras_follow_the_load_order_and_fail_on_a_broken_modules_dep() {
        let x = module_extras(RELEASE, DEP, fake_module).unwrap();
        let paths: Vec<_> = x.iter().map(|e| e.path.as_str()).collect();
        let mut want: Vec<_> = ORDER
            .iter()
            .map(|m| format!("lib/modules/{RELEASE}/{m}"))
            .collect();
        want.push(format!("lib/modules/{RELEASE}/modules.dep"));
        want.push(MODULE_LIST.to_string());
        assert_eq!(paths, want);
        let cycle = "a.ko: b.ko\nb.ko: a.ko\n";
        assert!(module_extras(RELEASE, cycle, fake_module).is_err());
        let unreadable = |m: &str| Err(format!("no {m}"));
        assert!(module_extras(RELEASE, DEP, unreadable).is_err());
    }

    #[test]
    fn init_says_it_is_up_once_and_powers_off_on_request() {
        let up: Vec<_> = INIT
            .lines()
            .filter(|l| l.contains("gpupv-init: up"))
            .collect();
        assert_eq!(up, [r#"echo "gpupv-init: up $(uname -r)" > /dev/console"#]);
        for mount in [
            "-t proc proc /proc",
            "-t sysfs sysfs /sys",
            "-t devtmpfs devtmpfs /dev",
        ] {
            assert!(INIT.contains(&format!("mount {mount}\n")), "{mount}");
        }
        let poweroff = INIT.find("gpupv-init: poweroff").unwrap();
        assert!(INIT[..poweroff].contains(r#"*" gpupv.poweroff "*)"#));
        assert!(INIT[poweroff..].contains("poweroff -f"));
        // pid 1 never execs away into a shell that could exit.
        assert!(!INIT.contains("exec "));
        assert!(INIT.contains("while :; do\n    setsid cttyhack sh\n    sleep 1\ndone"));
        // Every command /init runs is linked.
        for cmd in [
            "mount", "echo", "uname", "cat", "poweroff", "setsid", "cttyhack", "sh", "sleep",
            "insmod", "awk", "timeout",
        ] {
            assert!(APPLETS.contains(&cmd), "{cmd}");
        }
    }

    /// Runs `/init`'s `flip_secs` with this host's `sh` on a command line.
    fn flip_secs(cmdline: &str) -> Option<String> {
        let start = INIT.find("flip_secs() {").unwrap();
        let end = start + INIT[start..].find("\n}\n").unwrap() + 3;
        let script = format!("{}flip_secs \"$1\"\n", &INIT[start..end]);
        let out = Command::new("sh")
            .args(["-c", &script, "sh", cmdline])
            .output()
            .ok()?;
        assert!(out.status.success());
        Some(String::from_utf8(out.stdout).unwrap())
    }

    #[test]
    fn init_takes_the_flip_seconds_from_the_command_line() {
        for (cmdline, want) in [
            ("console=ttyS0 gpupv.gpu gpupv.poweroff", ""),
            (
                "console=ttyS0 gpupv.gpu gpupv.flip=10 gpupv.poweroff",
                "10\n",
            ),
            ("gpupv.flip=5", "5\n"),
            ("gpupv.flip=3 gpupv.flip=12", "12\n"),
            ("gpupv.flip=1.5", "bad\n"),
            ("gpupv.flip=", ""),
            ("gpupv.flip=x9", "bad\n"),
            ("gpupv.flip", "bad\n"),
            ("gpupv.flipper=4", ""),
        ] {
            let Some(got) = flip_secs(cmdline) else {
                eprintln!("no sh on this host: skipped");
                return;
            };
            assert_eq!(got, want, "{cmdline}");
        }
        // The flip follows the drawing, bounded by timeout, its stdin a pipe that closes.
        let drew = INIT.find(r#"echo "gpupv-init: modetest drew $2""#).unwrap();
        let flip = INIT
            .find(r#"secs=$(flip_secs "$(cat /proc/cmdline)")"#)
            .unwrap();
        let run = INIT
            .find(r#"sleep "$secs" | timeout $((secs + 60)) modetest -M virtio_gpu -s "$1:$2" -v"#)
            .unwrap();
        let flipping = INIT
            .find(r#"echo "gpupv-init: flipping $1:$2 for $secs s""#)
            .unwrap();
        let flipped = INIT.find(r#"echo "gpupv-init: flipped $2""#).unwrap();
        assert!(drew < flip && flip < flipping && flipping < run && run < flipped);
        assert!(INIT.find("flip_secs() {").unwrap() < INIT.find("gpu() {").unwrap());
    }

    #[test]
    fn init_drives_the_gpu_on_request_before_powering_off() {
        let gpu = INIT.find(r#"*" gpupv.gpu "*)"#).unwrap();
        let poweroff = INIT.find(r#"*" gpupv.poweroff "*)"#).unwrap();
        assert!(INIT.find("gpupv-init: up").unwrap() < gpu && gpu < poweroff);
        assert!(INIT[gpu..poweroff].contains("    gpu > /dev/console 2>&1\n"));
        // The steps, in order, each with its marker.
        let steps = [
            "while read -r ko; do",
            r#"insmod "$ko""#,
            r#"echo "gpupv-init: module ${name%.ko} failed""#,
            &format!("done < /{MODULE_LIST}"),
            r#"echo "gpupv-init: modules loaded""#,
            "while [ ! -e /dev/dri/card0 ]; do",
            "if [ $n -ge 30 ]; then",
            r#"echo "gpupv-init: no /dev/dri/card0""#,
            r#"echo "gpupv-init: drm ready""#,
            "timeout 60 modetest -M virtio_gpu -c > /tmp/connectors",
            "cat /tmp/connectors",
            &format!("set -- $(awk -f /{FIRST_MODE_AWK} /tmp/connectors)"),
            r#"(sleep 3; echo "gpupv-init: modetest showing $2" >&2; sleep 3) |"#,
            r#"timeout 60 modetest -M virtio_gpu -s "$1:$2""#,
            r#"echo "gpupv-init: modetest failed $rc""#,
            r#"echo "gpupv-init: modetest drew $2""#,
        ];
        let mut from = 0;
        for s in steps {
            let at = INIT[from..]
                .find(s)
                .unwrap_or_else(|| panic!("{s} after {from}"));
            from += at + s.len();
        }
        assert!(INIT.find("gpu() {").unwrap() < gpu);
        // modetest's directory is on PATH.
        assert!(INIT.contains("export PATH=/bin:/sbin:/usr/bin\n"));
        assert!(MODETEST.starts_with("usr/bin/"));
    }

    /// `modetest -c` as modetest 2.4.114 prints it (tabs and all): a disconnected
    /// connector, a connected one without modes, then the one to pick.
    const CONNECTORS: &str = "Connectors:\n\
        id\tencoder\tstatus\t\tname\t\tsize (mm)\tmodes\tencoders\n\
        35\t0\tdisconnected\tVirtual-1      \t0x0\t\t0\t34\n  props:\n\
        \t1 EDID:\n\t\tflags: immutable blob\n\t\tblobs:\n\n\t\tvalue:\n\
        \t2 DPMS:\n\t\tflags: enum\n\t\tenums: On=0 Standby=1 Suspend=2 Off=3\n\t\tvalue: 0\n\
        36\t0\tconnected\tVirtual-2      \t0x0\t\t0\t34\n  props:\n\
        \t20 max bpc:\n\t\tflags: range\n\t\tvalues: 0 16\n\t\tvalue: 0\n\
        37\t36\tconnected\tVirtual-3      \t0x0\t\t2\t36\n  modes:\n\
        \tindex name refresh (Hz) hdisp hss hse htot vdisp vss vse vtot\n\
        \x20 #0 1024x768 74.98 1024 1080 1184 1344 768 771 777 806 82000 flags: nhsync, nvsync; type: preferred, driver\n\
        \x20 #1 800x600 60.32 800 840 968 1056 600 601 605 628 40000 flags: phsync, pvsync; type: driver\n\
        \x20 props:\n\t1 EDID:\n\t\tflags: immutable blob\n\
        38\t0\tconnected\tVirtual-4      \t0x0\t\t1\t36\n  modes:\n\
        \tindex name refresh (Hz) hdisp hss hse htot vdisp vss vse vtot\n\
        \x20 #0 640x480 60.00 640 656 752 800 480 490 492 525 25175 flags: nhsync, nvsync; type: driver\n";

    /// What `awk` (a program path) prints running [`FIRST_MODE`] on `input`, or `None`
    /// when there is no such program.
    fn first_mode(awk: &Path, input: &str) -> Option<String> {
        let dir = std::env::temp_dir().join(format!(
            "xtask-first-mode-{}-{}",
            std::process::id(),
            input.len()
        ));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("first-mode.awk"), FIRST_MODE).unwrap();
        fs::write(dir.join("connectors"), input).unwrap();
        let out = Command::new(awk)
            .arg("-f")
            .arg(dir.join("first-mode.awk"))
            .arg(dir.join("connectors"))
            .output();
        let _ = fs::remove_dir_all(&dir);
        let out = out.ok()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(String::from_utf8(out.stdout).unwrap())
    }

    /// The cases every awk must agree on: (input, output).
    fn first_mode_cases() -> Vec<(String, &'static str)> {
        let only_disconnected = CONNECTORS.split("36\t0\tconnected").next().unwrap();
        vec![
            (CONNECTORS.to_string(), "37 1024x768\n"),
            (only_disconnected.to_string(), ""),
            (String::new(), ""),
            (
                CONNECTORS.replace("\tconnected\tVirtual-3", "\tunknown\tVirtual-3"),
                "38 640x480\n",
            ),
        ]
    }

    #[test]
    fn the_first_mode_script_picks_the_first_connected_connector_with_a_mode() {
        for (input, want) in first_mode_cases() {
            let Some(got) = first_mode(Path::new("awk"), &input) else {
                eprintln!("no awk on this host: skipped");
                return;
            };
            assert_eq!(got, want, "on:\n{input}");
        }
    }

    /// A tree as `dpkg -x` leaves it for modetest's packages (fake ELFs).
    fn fake_packages(dir: &Path) {
        let put = |rel: &str, data: Vec<u8>, perm: u32| {
            let p = dir.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, data).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(perm)).unwrap();
        };
        let link = |rel: &str, target: &str| {
            let p = dir.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(target, p).unwrap();
        };
        let ld = "/lib64/ld-linux-x86-64.so.2";
        let modetest = elf::fake(None, &["libdrm.so.2", "libc.so.6"], Some(ld));
        put(MODETEST, modetest, 0o755);
        put(
            "usr/bin/modeprint",
            elf::fake(None, &["libc.so.6"], Some(ld)),
            0o755,
        );
        let gnu = "lib/x86_64-linux-gnu";
        let usr = "usr/lib/x86_64-linux-gnu";
        put(
            &format!("{usr}/libdrm.so.2.4.0"),
            elf::fake(None, &["libc.so.6"], None),
            0o644,
        );
        link(&format!("{usr}/libdrm.so.2"), "libdrm.so.2.4.0");
        let libc = elf::fake(None, &["ld-linux-x86-64.so.2"], None);
        put(&format!("{gnu}/libc.so.6"), libc, 0o755);
        put(
            &format!("{gnu}/libm.so.6"),
            elf::fake(None, &["libc.so.6"], None),
            0o644,
        );
        put(
            &format!("{gnu}/ld-linux-x86-64.so.2"),
            elf::fake(None, &[], None),
            0o755,
        );
        link(
            ld.trim_start_matches('/'),
            &format!("/{gnu}/ld-linux-x86-64.so.2"),
        );
        put("bin/busybox", b"\x7fELF busybox".to_vec(), 0o755);
    }

    #[test]
    fn the_userland_is_modetest_its_libraries_and_interpreter_only() {
        let dir = std::env::temp_dir().join(format!("xtask-userland-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fake_packages(&dir);
        let x = userland(&dir, MODETEST).unwrap();
        let got: Vec<_> = x
            .iter()
            .map(|e| match &e.what {
                Owned::File(_) => format!("{} {:o}", e.path, e.perm),
                Owned::Link(t) => format!("{} -> {t}", e.path),
            })
            .collect();
        assert_eq!(
            got,
            [
                "usr/bin/modetest 755",
                "lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 755",
                "usr/lib/x86_64-linux-gnu/libdrm.so.2 -> libdrm.so.2.4.0",
                "usr/lib/x86_64-linux-gnu/libdrm.so.2.4.0 644",
                "lib/x86_64-linux-gnu/libc.so.6 755",
            ]
        );
        let Owned::File(libc) = &x[5].what else {
            panic!()
        };
        assert_eq!(
            libc,
            &fs::read(dir.join("lib/x86_64-linux-gnu/libc.so.6")).unwrap()
        );

        // A library no package holds is an error naming who needs it.
        fs::remove_file(dir.join("lib/x86_64-linux-gnu/libc.so.6")).unwrap();
        let e = userland(&dir, MODETEST).unwrap_err();
        assert!(e.contains("usr/bin/modetest needs libc.so.6"), "{e}");
        assert!(userland(&dir, "usr/bin/absent").is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn symlinks_are_followed_inside_the_tree() {
        let dir = std::env::temp_dir().join(format!("xtask-follow-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::write(dir.join("a/file"), b"x").unwrap();
        std::os::unix::fs::symlink("../file", dir.join("a/b/up")).unwrap();
        std::os::unix::fs::symlink("/a/b/up", dir.join("abs")).unwrap();
        std::os::unix::fs::symlink("loop", dir.join("loop")).unwrap();
        let (links, file) = follow(&dir, "abs").unwrap();
        assert_eq!(file, "a/file");
        assert_eq!(
            links,
            [
                ("abs".to_string(), "/a/b/up".to_string()),
                ("a/b/up".to_string(), "../file".to_string())
            ]
        );
        assert!(follow(&dir, "loop")
            .unwrap_err()
            .contains("too many levels"));
        assert!(follow(&dir, "missing").is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn candidates_come_from_one_apt_cache_policy() {
        let policy = "busybox-static:\n  Installed: (none)\n  Candidate: 1:1.35.0-4+b1\n  \
            Version table:\n     1:1.35.0-4+b1 500\n        500 http://deb.debian.org/debian \
            bookworm/main amd64 Packages\nlibc6:amd64:\n  Installed: 2.36-9\n  Candidate: \
            2.36-9+deb12u14\n  Version table:\n *** 2.36-9+deb12u14 500\nlibdrm2:\n  \
            Installed: (none)\n  Candidate: (none)\n";
        let got = candidates(policy, &["libc6", "busybox-static"]).unwrap();
        let want = [
            ("libc6", "2.36-9+deb12u14"),
            ("busybox-static", "1:1.35.0-4+b1"),
        ];
        assert_eq!(got, want.map(|(p, v)| (p.to_string(), v.to_string())));
        let e = candidates(policy, &["libdrm2"]).unwrap_err();
        assert!(e.contains("libdrm2 names no candidate"), "{e}");
        assert!(candidates(policy, &["libdrm-tests"]).is_err());
    }

    #[test]
    fn only_configs_naming_the_initramfs_want_it() {
        let vm = "[[vm]]\nname=\"l\"\nmemory_mib=256\nkernel=\"linux/vmlinuz\"\n";
        assert!(wants_initramfs(&format!(
            "{vm}initrd=\"linux/initramfs.cpio\"\n"
        )));
        assert!(!wants_initramfs(vm));
        assert!(!wants_initramfs(&format!("{vm}initrd=\"mine/initrd\"\n")));
        let elf = "[[vm]]\nname=\"g\"\nmemory_mib=16\nimage=\"guests/draw.elf\"\n";
        assert!(!wants_initramfs(elf));
        assert!(!wants_initramfs("not toml ["));
    }

    #[test]
    fn the_stamp_decides_whether_the_cache_serves() {
        let dir = std::env::temp_dir().join(format!("xtask-initramfs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (cpio, stamp_file) = (dir.join("initramfs.cpio"), dir.join("initramfs.stamp"));
        let versions = |busybox: &str| {
            [
                ("busybox-static", busybox),
                ("libdrm-tests", "2.4.114-1"),
                ("libc6", "2.36-9"),
            ]
            .map(|(p, v)| (p.to_string(), v.to_string()))
        };
        let kernel = "linux-image-6.1.0-9-amd64_6.1.1-1_amd64.deb\nrelease 6.1.0-9-amd64\n";
        let want = stamp(&versions("1:1.35.0-4"), kernel);
        for part in [
            "busybox-static 1:1.35.0-4\n",
            "libdrm-tests 2.4.114-1\n",
            "libc6 2.36-9\n",
            kernel,
            &format!("format {FORMAT}\n"),
        ] {
            assert!(want.contains(part), "{part}");
        }
        assert!(
            want.ends_with(&format!("\nformat {FORMAT}\n")),
            "the no-apt check"
        );
        assert!(!cached(&cpio, &stamp_file, &want), "nothing built yet");
        fs::write(&cpio, b"070701").unwrap();
        assert!(!cached(&cpio, &stamp_file, &want), "no stamp");
        fs::write(&stamp_file, &want).unwrap();
        assert!(cached(&cpio, &stamp_file, &want));
        assert!(
            !cached(&cpio, &stamp_file, &stamp(&versions("1:1.36.1-1"), kernel)),
            "another busybox"
        );
        let other_kernel = kernel.replace("6.1.0-9", "6.1.0-10");
        assert!(
            !cached(
                &cpio,
                &stamp_file,
                &stamp(&versions("1:1.35.0-4"), &other_kernel)
            ),
            "another kernel"
        );
        fs::write(
            &stamp_file,
            want.replace(&format!("format {FORMAT}"), "format 0"),
        )
        .unwrap();
        assert!(!cached(&cpio, &stamp_file, &want), "an older /init");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_cpio_tool_lists_the_archive() {
        use std::io::Write;
        use std::process::Stdio;
        let Ok(mut child) = Command::new("cpio")
            .arg("-t")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        else {
            eprintln!("no cpio tool: skipped");
            return;
        };
        let extras = sample_extras();
        let archive = newc(&layout(b"\x7fELF fake busybox", &extras)).unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listed = String::from_utf8(out.stdout).unwrap();
        let names: Vec<_> = layout(b"", &extras).into_iter().map(|e| e.name).collect();
        assert_eq!(listed.lines().collect::<Vec<_>>(), names);
    }

    /// Fetches busybox, modetest and the kernel for real (apt) into the real target
    /// directory, then runs the archive's modetest with its own `ld.so` and libraries
    /// and its busybox's awk on this host.
    #[test]
    #[ignore = "fetches the kernel, busybox-static and libdrm-tests with apt-get download"]
    fn builds_the_real_initramfs() {
        let paths = Paths::discover();
        let cpio = build(&paths).unwrap();
        assert_eq!(cpio, paths.xtask.join(INITRD));
        let before = fs::metadata(&cpio).unwrap().modified().unwrap();
        let bytes = fs::read(&cpio).unwrap();
        eprintln!("initramfs: {} bytes", bytes.len());
        let r = read_newc(&bytes);
        let bb = find(&r, "bin/busybox");
        assert!(bb.data.starts_with(b"\x7fELF") && bb.data.len() > 1 << 20);
        assert_eq!(find(&r, "init").data, INIT.as_bytes());
        let leftovers = fs::read_dir(paths.xtask.join("linux"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("fetch") || n.contains(".part"))
            .collect::<Vec<_>>();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // The modules: the list in load order, each built for the cached kernel.
        let modules = linux::modules(&paths).unwrap();
        let list = String::from_utf8(find(&r, MODULE_LIST).data.clone()).unwrap();
        let names: Vec<_> = list
            .lines()
            .map(|l| l.rsplit('/').next().unwrap())
            .collect();
        eprintln!("modules: {}", names.join(" "));
        for want in [
            "virtio_pci.ko",
            "virtio-gpu.ko",
            "drm.ko",
            "drm_kms_helper.ko",
        ] {
            assert!(names.contains(&want), "{want} in {names:?}");
        }
        let at = |n: &str| names.iter().position(|m| *m == n).unwrap();
        assert!(at("virtio_ring.ko") < at("virtio.ko") && at("virtio.ko") < at("virtio_pci.ko"));
        assert!(
            at("drm.ko") < at("drm_kms_helper.ko") && at("drm_kms_helper.ko") < at("virtio-gpu.ko")
        );
        for path in list.lines() {
            let ko = &find(&r, path.trim_start_matches('/')).data;
            let vermagic = elf::modinfo(ko, "vermagic").unwrap().unwrap();
            assert!(
                vermagic.starts_with(&format!("{} ", modules.release)),
                "{vermagic}"
            );
        }

        // The userland runs on this host with nothing but the archive's files.
        let dir = std::env::temp_dir().join(format!("xtask-initramfs-real-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for e in &r {
            let p = dir.join(&e.name);
            match e.mode & 0o170_000 {
                S_IFDIR => fs::create_dir_all(&p).unwrap(),
                S_IFREG => {
                    fs::write(&p, &e.data).unwrap();
                    fs::set_permissions(&p, fs::Permissions::from_mode(e.mode & 0o7777)).unwrap();
                }
                S_IFLNK => {
                    let t = String::from_utf8(e.data.clone()).unwrap();
                    // Absolute links point into the archive, not at this host.
                    let t = match t.strip_prefix('/') {
                        Some(abs) => dir.join(abs).to_string_lossy().into_owned(),
                        None => t,
                    };
                    std::os::unix::fs::symlink(t, &p).unwrap();
                }
                _ => {}
            }
        }
        let ld = dir.join("lib64/ld-linux-x86-64.so.2");
        let lib_path = LIB_DIRS
            .iter()
            .map(|d| dir.join(d).to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":");
        let run_ld = |args: &[&str]| {
            Command::new(&ld)
                .args(["--inhibit-cache", "--library-path", &lib_path])
                .args(args)
                .arg(dir.join(MODETEST))
                .output()
                .unwrap()
        };
        let list = run_ld(&["--list"]);
        let listed = String::from_utf8_lossy(&list.stdout).into_owned();
        eprintln!("{listed}");
        assert!(
            list.status.success(),
            "{}",
            String::from_utf8_lossy(&list.stderr)
        );
        for l in listed.lines().filter(|l| l.contains("=>")) {
            assert!(l.contains(&*dir.to_string_lossy()), "from the archive: {l}");
        }
        assert!(listed.contains("libdrm.so.2") && listed.contains("libc.so.6"));
        let help = Command::new(&ld)
            .args(["--inhibit-cache", "--library-path", &lib_path])
            .arg(dir.join(MODETEST))
            .arg("-h")
            .output()
            .unwrap();
        assert!(help.status.success());
        assert!(String::from_utf8_lossy(&help.stderr).contains("-s <connector_id>"));
        // Its busybox's awk agrees on the connector to pick.
        for (input, want) in first_mode_cases() {
            let got = first_mode(&dir.join("bin/awk"), &input).unwrap();
            assert_eq!(got, want, "busybox awk on:\n{input}");
        }
        let _ = fs::remove_dir_all(&dir);

        // A second call serves the cache.
        assert_eq!(build(&paths).unwrap(), cpio);
        assert_eq!(fs::metadata(&cpio).unwrap().modified().unwrap(), before);
    }
}
