//! Linux guests' initial RAM disk: a tiny busybox userland, so a kernel that boots has
//! an `/init` to run, which says it is up on the console and then powers off or keeps a
//! shell there. Busybox is Debian's static build, fetched with `apt-get download
//! busybox-static` and unpacked with `dpkg -x` like the kernel in [`crate::linux`].
//! The archive is written here as an uncompressed newc cpio (Linux unpacks that with no
//! decompressor, and no cpio tool is needed), byte-for-byte reproducible, and cached
//! under `target/xtask/linux/` with a stamp naming the busybox version and [`FORMAT`],
//! so a second run fetches nothing. A VM config names it as
//! `initrd = "linux/initramfs.cpio"`; the ESP gets it as `\hv\linux\initramfs.cpio`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::linux::run;
use crate::{Context, Paths, Result};

/// The path a VM config uses for this initramfs.
pub const INITRD: &str = "linux/initramfs.cpio";

/// Debian's statically linked busybox: one file, no libraries to bring along.
const PACKAGE: &str = "busybox-static";

/// The archive's layout version: bump it when [`INIT`] or [`layout`] changes, so
/// cached archives are rebuilt.
const FORMAT: u32 = 1;

/// The busybox applets linked in `/bin`: what `/init` runs, and a few for the shell.
const APPLETS: &[&str] = &[
    "sh", "mount", "echo", "cat", "ls", "uname", "setsid", "cttyhack", "poweroff", "sleep",
];

/// The kernel runs this as pid 1. It must never exit (the kernel would panic), so
/// the shell is a child that is restarted, not `exec`ed.
const INIT: &str = r#"#!/bin/sh
# gpupv's /init: mount the kernel's filesystems, say the userland is up, then power
# off (gpupv.poweroff on the kernel command line) or keep a shell on the console.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "gpupv-init: up $(uname -r)" > /dev/console
case " $(cat /proc/cmdline) " in
*" gpupv.poweroff "*)
    echo "gpupv-init: poweroff" > /dev/console
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

/// The initramfs's entries around the `busybox` binary, in archive order (parents
/// first).
fn layout(busybox: &[u8]) -> Vec<Entry<'_>> {
    let mut e = Vec::new();
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
    e.push(Entry::new("init", 0o755, Kind::File(INIT.as_bytes())));
    e
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

/// The busybox version apt would fetch (`Candidate:` of `apt-cache policy`).
fn busybox_version() -> Result<String> {
    let policy = run(Command::new("apt-cache").args(["policy", PACKAGE]))?;
    policy
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .find(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_string)
        .ok_or_else(|| format!("apt-cache policy {PACKAGE} names no candidate (apt-get update?)"))
}

/// The cache stamp: which busybox the archive holds and which [`FORMAT`] it has.
fn stamp(version: &str) -> String {
    format!("{PACKAGE} {version}\nformat {FORMAT}\n")
}

/// Whether the cached `cpio` serves: it exists and its stamp file says `want`.
fn cached(cpio: &Path, stamp_file: &Path, want: &str) -> bool {
    cpio.is_file() && fs::read_to_string(stamp_file).is_ok_and(|s| s == want)
}

/// `bin/busybox` of `busybox-static` `version`, fetched and unpacked in `work`.
fn fetch_busybox(work: &Path, version: &str) -> Result<Vec<u8>> {
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work).ctx(|| format!("cannot create {}", work.display()))?;
    let pinned = format!("{PACKAGE}={version}");
    run(Command::new("apt-get")
        .args(["download", &pinned])
        .current_dir(work))?;
    let deb = fs::read_dir(work)
        .ctx(|| format!("cannot read {}", work.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| {
            format!(
                "apt-get download {pinned} left no .deb in {}",
                work.display()
            )
        })?;
    let root = work.join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    let busybox = root.join("bin").join("busybox");
    fs::read(&busybox).ctx(|| format!("{} holds no bin/busybox", deb.display()))
}

/// The initramfs (`target/xtask/linux/initramfs.cpio`), built once per busybox
/// version and [`FORMAT`].
pub fn build(paths: &Paths) -> Result<PathBuf> {
    let dir = paths.xtask.join("linux");
    let cpio = dir.join("initramfs.cpio");
    let stamp_file = dir.join("initramfs.stamp");
    let version = match busybox_version() {
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
    let want = stamp(&version);
    if cached(&cpio, &stamp_file, &want) {
        return Ok(cpio);
    }
    eprintln!(
        "xtask: fetching busybox for the Linux initramfs: apt-get download {PACKAGE}={version}"
    );
    fs::create_dir_all(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
    let work = dir.join("busybox-fetch");
    let busybox = fetch_busybox(&work, &version);
    let _ = fs::remove_dir_all(&work);
    let archive = newc(&layout(&busybox?))?;
    let part = dir.join("initramfs.cpio.part");
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

    #[test]
    fn the_archive_is_reproducible() {
        let busybox = b"\x7fELF fake busybox".to_vec();
        let one = newc(&layout(&busybox)).unwrap();
        let two = newc(&layout(&busybox.clone())).unwrap();
        assert_eq!(one, two);
        assert_ne!(one, newc(&layout(b"another busybox")).unwrap());
    }

    #[test]
    fn the_layout_is_busybox_links_console_and_init() {
        let busybox = b"\x7fELF fake busybox";
        let r = read_newc(&newc(&layout(busybox)).unwrap());
        for dir in ["bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "root"] {
            assert_eq!(find(&r, dir).mode & 0o170_000, S_IFDIR, "{dir}");
        }
        let bb = find(&r, "bin/busybox");
        assert_eq!((bb.mode, bb.data.as_slice()), (0o100_755, &busybox[..]));
        for applet in [
            "sh", "mount", "echo", "cat", "ls", "uname", "setsid", "cttyhack", "poweroff", "sleep",
        ] {
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
        // Parents come before their children.
        let at = |n: &str| r.iter().position(|e| e.name == n).unwrap();
        assert!(at("bin") < at("bin/busybox") && at("dev") < at("dev/console"));
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
        ] {
            assert!(APPLETS.contains(&cmd), "{cmd}");
        }
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
        let want = stamp("1:1.35.0-4");
        assert!(
            want.contains("busybox-static 1:1.35.0-4")
                && want.contains(&format!("format {FORMAT}"))
        );
        assert!(!cached(&cpio, &stamp_file, &want), "nothing built yet");
        fs::write(&cpio, b"070701").unwrap();
        assert!(!cached(&cpio, &stamp_file, &want), "no stamp");
        fs::write(&stamp_file, &want).unwrap();
        assert!(cached(&cpio, &stamp_file, &want));
        assert!(
            !cached(&cpio, &stamp_file, &stamp("1:1.36.1-1")),
            "another busybox"
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
        let archive = newc(&layout(b"\x7fELF fake busybox")).unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listed = String::from_utf8(out.stdout).unwrap();
        let names: Vec<_> = layout(b"").into_iter().map(|e| e.name).collect();
        assert_eq!(listed.lines().collect::<Vec<_>>(), names);
    }

    /// Fetches busybox for real (apt) into the real target directory.
    #[test]
    #[ignore = "fetches busybox-static with apt-get download"]
    fn builds_the_real_initramfs() {
        let paths = Paths::discover();
        let cpio = build(&paths).unwrap();
        assert_eq!(cpio, paths.xtask.join(INITRD));
        let before = fs::metadata(&cpio).unwrap().modified().unwrap();
        let r = read_newc(&fs::read(&cpio).unwrap());
        let bb = find(&r, "bin/busybox");
        assert!(bb.data.starts_with(b"\x7fELF") && bb.data.len() > 1 << 20);
        assert_eq!(find(&r, "init").data, INIT.as_bytes());
        assert!(!paths.xtask.join("linux/busybox-fetch").exists());
        // A second call serves the cache.
        assert_eq!(build(&paths).unwrap(), cpio);
        assert_eq!(fs::metadata(&cpio).unwrap().modified().unwrap(), before);
    }
}
