//! The QEMU command line (the emulator facts it relies on are noted where they are used).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::Result;

/// OVMF, used as `-bios`.
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// Exit status for a pass (0x10 written to port 0xf4: (0x10 << 1) | 1).
pub const PASS_STATUS: i32 = 33;
/// Exit status for a fail (0x11 written to port 0xf4).
pub const FAIL_STATUS: i32 = 35;
/// The virtio-gpu's QEMU id (for `screendump`).
pub const GPU_ID: &str = "gpu0";
/// The virtio-gpu's scanouts (`max_outputs`).
pub const GPU_HEADS: u32 = 16;
/// Heads screenshots and screendump checks look at unless told otherwise (the demo's
/// four VMs).
pub const SHOWN_HEADS: u32 = 4;

/// What QEMU boots from.
#[derive(Debug, Clone)]
pub enum Disk {
    /// An ESP directory, as a read-only FAT disk on virtio-blk-pci.
    Dir(PathBuf),
    /// A raw disk image on virtio (`-drive file=IMG,format=raw,if=virtio`).
    Image(PathBuf),
}

/// Where COM1 goes.
#[derive(Debug, Clone)]
pub enum Serial {
    /// A file (truncated at start).
    File(PathBuf),
    /// A unix socket QEMU listens on (a client types COM1's input there and must
    /// read its output), with the output also logged to a file (truncated at start).
    SocketLogged {
        /// Where output is logged.
        log: PathBuf,
        /// The socket.
        socket: PathBuf,
    },
    /// stdio, multiplexed with the monitor (Ctrl-A X quits, Ctrl-A C the monitor),
    /// everything written to the terminal also logged to this file.
    StdioWithMonitorLogged(PathBuf),
}

/// Options of one QEMU run.
#[derive(Debug, Clone)]
pub struct Opts {
    /// CPUs.
    pub smp: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// The boot disk.
    pub disk: Disk,
    /// COM1.
    pub serial: Serial,
    /// Show a window (else `-display none`).
    pub display: bool,
    /// KVM instead of TCG.
    pub kvm: bool,
    /// A QMP server on this unix socket (`-qmp unix:PATH,server=on,wait=off`).
    pub qmp: Option<PathBuf>,
    /// Appended as they are.
    pub extra: Vec<String>,
}

fn no_comma(p: &std::path::Path) -> Result<String> {
    let s = p.to_string_lossy().into_owned();
    if s.contains(',') {
        return Err(format!(
            "QEMU option values cannot hold a path with a comma: {s}"
        ));
    }
    Ok(s)
}

/// The arguments (without the program).
pub fn args(o: &Opts) -> Result<Vec<String>> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&["-nodefaults", "-machine", "q35"]);
    // Extra arguments may choose the accelerator themselves (e.g. `-accel
    // tcg,thread=single`): QEMU takes the first `-accel` that works.
    let own_accel = o.extra.iter().any(|a| a == "-accel");
    if o.kvm {
        push(&["-accel", "kvm", "-cpu", "host"]);
    } else if own_accel {
        push(&["-cpu", "max"]);
    } else {
        push(&["-accel", "tcg", "-cpu", "max"]);
    }
    push(&[
        "-smp",
        &o.smp.to_string(),
        "-m",
        &format!("{}M", o.memory_mib),
    ]);
    push(&["-bios", OVMF]);
    // The IOMMU must come before the PCI devices it translates for.
    push(&["-device", "intel-iommu"]);
    push(&[
        "-device",
        &format!("virtio-gpu-pci,id={GPU_ID},iommu_platform=on,max_outputs={GPU_HEADS}"),
    ]);
    match &o.disk {
        Disk::Dir(dir) => {
            // Read-only FAT directory: fine on virtio-blk, fails on q35's AHCI.
            let dir = no_comma(dir)?;
            push(&[
                "-drive",
                &format!("if=none,id=esp,format=raw,readonly=on,file=fat:{dir}"),
            ]);
            push(&["-device", "virtio-blk-pci,drive=esp"]);
        }
        Disk::Image(img) => {
            let img = no_comma(img)?;
            push(&["-drive", &format!("file={img},format=raw,if=virtio")]);
        }
    }
    push(&["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    match &o.serial {
        Serial::File(f) => {
            let f = no_comma(f)?;
            push(&["-serial", &format!("file:{f}")]);
        }
        Serial::SocketLogged { log, socket } => {
            let (log, socket) = (no_comma(log)?, no_comma(socket)?);
            push(&[
                "-chardev",
                &format!("socket,id=com1,path={socket},server=on,wait=off,logfile={log}"),
            ]);
            push(&["-serial", "chardev:com1"]);
        }
        Serial::StdioWithMonitorLogged(f) => {
            let f = no_comma(f)?;
            push(&["-chardev", &format!("stdio,id=con0,mux=on,logfile={f}")]);
            push(&[
                "-serial",
                "chardev:con0",
                "-mon",
                "chardev=con0,mode=readline",
            ]);
        }
    }
    if let Some(q) = &o.qmp {
        let q = no_comma(q)?;
        push(&["-qmp", &format!("unix:{q},server=on,wait=off")]);
    }
    push(&["-no-reboot"]);
    if !o.display {
        push(&["-display", "none"]);
    }
    a.extend(o.extra.iter().cloned());
    Ok(a)
}

/// The command, with stdin closed unless the serial port is on stdio.
pub fn command(o: &Opts) -> Result<Command> {
    let mut c = Command::new(QEMU);
    c.args(args(o)?);
    if matches!(o.serial, Serial::File(_) | Serial::SocketLogged { .. }) {
        c.stdin(Stdio::null());
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Opts {
        Opts {
            smp: 2,
            memory_mib: 512,
            disk: Disk::Dir("/tmp/esp".into()),
            serial: Serial::File("/tmp/log".into()),
            display: false,
            kvm: false,
            qmp: None,
            extra: vec!["-s".into()],
        }
    }

    #[test]
    fn iommu_before_pci_devices() {
        let a = args(&opts()).unwrap();
        let pos = |s: &str| a.iter().position(|x| x.starts_with(s)).unwrap();
        assert!(pos("intel-iommu") < pos("virtio-gpu-pci"));
        assert!(pos("intel-iommu") < pos("virtio-blk-pci"));
        assert!(a.contains(&"file:/tmp/log".to_string()));
        assert!(a.contains(&"-no-reboot".to_string()));
        assert_eq!(a.last().unwrap(), "-s");
        let joined = a.join(" ");
        assert!(joined.contains("-display none"));
        assert!(joined.contains("-smp 2 -m 512M"));
        assert!(joined.contains("readonly=on,file=fat:/tmp/esp"));
        assert!(joined.contains("isa-debug-exit,iobase=0xf4"));
        assert!(joined.contains("virtio-gpu-pci,id=gpu0,iommu_platform=on,max_outputs=16"));
        assert!(!joined.contains("-qmp"));
    }

    #[test]
    fn qmp_and_logged_stdio() {
        let mut o = opts();
        o.qmp = Some("/tmp/q.sock".into());
        o.serial = Serial::StdioWithMonitorLogged("/tmp/run.log".into());
        let joined = args(&o).unwrap().join(" ");
        assert!(joined.contains("-qmp unix:/tmp/q.sock,server=on,wait=off"));
        assert!(joined.contains(
            "-chardev stdio,id=con0,mux=on,logfile=/tmp/run.log -serial chardev:con0 -mon chardev=con0,mode=readline"
        ));
        o.qmp = Some("/tmp/a,b".into());
        assert!(args(&o).is_err());
    }

    #[test]
    fn image_disk_and_commas() {
        let mut o = opts();
        o.disk = Disk::Image("/tmp/x.img".into());
        assert!(args(&o)
            .unwrap()
            .join(" ")
            .contains("-drive file=/tmp/x.img,format=raw,if=virtio"));
        o.disk = Disk::Image("/tmp/a,b.img".into());
        assert!(args(&o).is_err());
    }
}
