//! The Linux x86 boot protocol (Documentation/x86/boot.rst, "64-bit boot protocol"),
//! as pure logic the loader and the hypervisor share and `cargo test` checks:
//!
//! - [`BzImage::parse`] reads a bzImage's setup header and refuses what this
//!   hypervisor cannot boot (not a bzImage, a protocol older than 2.12, no 64-bit
//!   entry), naming the problem.
//! - [`plan`] places the kernel, the initrd, the command line and the zero page in a
//!   VM's RAM, or says what does not fit.
//! - [`zero_page`] builds `struct boot_params`: the image's setup header with the
//!   loader's fields filled in, and the e820 map of the VM's RAM.
//!
//! A VM running Linux is entered in 64-bit mode at [`Plan::entry`] with RSI pointing
//! at the zero page, interrupts off, paging on with an identity map covering the
//! kernel, the zero page, the command line and the initrd.

#![no_std]
#![forbid(unsafe_code)]

use core::fmt;

pub mod mptable;

/// Where the zero page goes (guest-physical; below the first MiB, beside the page
/// tables and GDT the hypervisor builds at 0x1000..0x8000).
pub const ZERO_PAGE: u64 = 0x8000;
/// Where the command line goes.
pub const CMDLINE: u64 = 0x2_0000;
/// Most command-line bytes this loader places (the kernel may accept fewer:
/// `cmdline_size` in its header).
pub const MAX_CMDLINE: usize = 4095;
/// Where low RAM ends for the e820 map: the last KiB below 640 KiB is reserved (for
/// firmware tables such as an MP table), as on a PC; 640 KiB..1 MiB is reserved too.
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// The first MiB.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Oldest boot protocol with a 64-bit entry point (`xloadflags`).
pub const MIN_PROTOCOL: u16 = 0x020c;

/// Offsets in the image and in the zero page (the setup header sits at the same
/// offset in both).
mod off {
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const HEAP_END_PTR: usize = 0x224;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    pub const XLOADFLAGS: usize = 0x236;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
    /// Zero page only.
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const E820_TABLE: usize = 0x2d0;
}

/// `loadflags`: the protected-mode code is loaded at 1 MiB or above.
const LOADED_HIGH: u8 = 0x01;
/// `loadflags`: `heap_end_ptr` is valid.
const CAN_USE_HEAP: u8 = 0x80;
/// `xloadflags`: the kernel has the 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 0x01;

/// Why a kernel cannot be booted as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// Shorter than its own header says.
    Truncated,
    /// No `0xAA55` boot flag or no `HdrS` header: not a bzImage.
    NotBzImage,
    /// Boot protocol older than [`MIN_PROTOCOL`].
    ProtocolTooOld(u16),
    /// The kernel has no 64-bit entry point.
    No64BitEntry,
    /// The kernel needs `needs` bytes from its load address `load`, past the VM's RAM.
    KernelTooLarge {
        /// Where it is loaded.
        load: u64,
        /// Bytes from the load address (the larger of the image and `init_size`).
        needs: u64,
        /// Bytes of RAM the VM has.
        ram: u64,
    },
    /// The initrd does not fit between the kernel and the end of RAM (or below the
    /// highest address the kernel takes one at).
    InitrdTooLarge {
        /// Its bytes.
        len: u64,
        /// Bytes there is room for.
        room: u64,
    },
    /// The command line is longer than the kernel (or this loader) accepts.
    CmdlineTooLong {
        /// Its bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BootError::Truncated => write!(f, "the kernel image is truncated"),
            BootError::NotBzImage => write!(f, "not a bzImage (no boot flag or HdrS header)"),
            BootError::ProtocolTooOld(v) => write!(
                f,
                "boot protocol {}.{:02} is too old (64-bit entry needs {}.{:02})",
                v >> 8,
                v & 0xff,
                MIN_PROTOCOL >> 8,
                MIN_PROTOCOL & 0xff
            ),
            BootError::No64BitEntry => write!(f, "the kernel has no 64-bit entry point"),
            BootError::KernelTooLarge { load, needs, ram } => write!(
                f,
                "the kernel needs {} MiB from its load address at {} MiB; the VM has {} MiB of RAM",
                needs.div_ceil(1 << 20),
                load >> 20,
                ram >> 20
            ),
            BootError::InitrdTooLarge { len, room } => write!(
                f,
                "the initrd ({} KiB) does not fit in the {} KiB of RAM left above the kernel",
                len.div_ceil(1024),
                room / 1024
            ),
            BootError::CmdlineTooLong { len, max } => {
                write!(f, "the command line has {len} bytes, at most {max}")
            }
        }
    }
}

/// The fields of a bzImage's setup header this loader uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupHeader {
    /// Boot protocol version (major << 8 | minor).
    pub version: u16,
    /// 512-byte setup sectors before the protected-mode code.
    pub setup_sects: u8,
    /// Load address the kernel prefers.
    pub pref_address: u64,
    /// Bytes the kernel needs from its load address while it decompresses itself.
    pub init_size: u32,
    /// Alignment a relocated kernel needs.
    pub kernel_alignment: u32,
    /// Whether the kernel may be loaded elsewhere than `pref_address`.
    pub relocatable: bool,
    /// Highest address the initrd may end at (+1).
    pub initrd_addr_max: u32,
    /// Longest command line the kernel takes (bytes, without the NUL).
    pub cmdline_size: u32,
    /// `xloadflags`.
    pub xloadflags: u16,
}

/// A parsed bzImage.
#[derive(Clone, Copy, Debug)]
pub struct BzImage<'a> {
    /// Its header.
    pub header: SetupHeader,
    /// The setup header's bytes (from offset 0x1f1 to its end), copied into the zero page.
    raw_header: &'a [u8],
    /// The protected-mode kernel (what is loaded at the load address).
    pub kernel: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | u64::from(u32_at(b, at + 4)) << 32
}

impl<'a> BzImage<'a> {
    /// Reads `image`'s setup header; refuses what cannot be booted in 64-bit mode.
    pub fn parse(image: &'a [u8]) -> Result<Self, BootError> {
        if image.len() < off::HEADER + 4 {
            return Err(BootError::Truncated);
        }
        if u16_at(image, off::BOOT_FLAG) != 0xaa55
            || &image[off::HEADER..off::HEADER + 4] != b"HdrS"
        {
            return Err(BootError::NotBzImage);
        }
        // The header ends where its first instruction jumps to.
        let header_end = off::JUMP + 2 + usize::from(image[off::JUMP + 1]);
        if image.len() < header_end.max(off::INIT_SIZE + 4) {
            return Err(BootError::Truncated);
        }
        let version = u16_at(image, off::VERSION);
        if version < MIN_PROTOCOL {
            return Err(BootError::ProtocolTooOld(version));
        }
        let header = SetupHeader {
            version,
            setup_sects: image[off::SETUP_SECTS],
            pref_address: u64_at(image, off::PREF_ADDRESS),
            init_size: u32_at(image, off::INIT_SIZE),
            kernel_alignment: u32_at(image, off::KERNEL_ALIGNMENT),
            relocatable: image[off::RELOCATABLE_KERNEL] != 0,
            initrd_addr_max: u32_at(image, off::INITRD_ADDR_MAX),
            cmdline_size: u32_at(image, off::CMDLINE_SIZE),
            xloadflags: u16_at(image, off::XLOADFLAGS),
        };
        if header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::No64BitEntry);
        }
        // A setup_sects of 0 means 4.
        let sects = match header.setup_sects {
            0 => 4,
            n => usize::from(n),
        };
        let kernel_at = (sects + 1) * 512;
        if image.len() <= kernel_at {
            return Err(BootError::Truncated);
        }
        Ok(Self {
            header,
            raw_header: &image[off::SETUP_SECTS..header_end],
            kernel: &image[kernel_at..],
        })
    }
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Bytes.
    pub size: u64,
    /// 1: RAM, 2: reserved.
    pub kind: u32,
}

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// Where everything goes in the VM's RAM (guest-physical).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Where the protected-mode kernel is loaded.
    pub kernel: u64,
    /// The 64-bit entry point (`kernel + 0x200`).
    pub entry: u64,
    /// The kernel's extent while it boots: `kernel..kernel_end`.
    pub kernel_end: u64,
    /// The initrd, `(address, bytes)`, when there is one.
    pub initrd: Option<(u64, u64)>,
    /// The command line (NUL-terminated there), `(address, bytes without the NUL)`.
    pub cmdline: (u64, usize),
    /// The zero page.
    pub zero_page: u64,
    /// The VM's RAM as the kernel sees it.
    pub e820: [E820Entry; 3],
}

/// The command-line parameter that hands Linux the TSC frequency.
const TSC_KHZ_PARAM: &[u8] = b"tsc_early_khz=";

/// The command line a VM's kernel gets: the configured one with
/// `tsc_early_khz=<kHz>` appended (unless it sets that itself), written into `buf`.
/// Linux times everything with the TSC and the TSC-deadline timer, but on AMD it
/// learns the TSC's frequency only by calibrating against the PIT, which a VM here
/// does not have; the hypervisor has measured the frequency and says it this way.
pub fn with_tsc_khz<'a>(
    cmdline: &[u8],
    tsc_khz: u64,
    buf: &'a mut [u8; MAX_CMDLINE],
) -> Result<&'a [u8], BootError> {
    let present = cmdline
        .split(|&b| b == b' ')
        .any(|w| w.starts_with(TSC_KHZ_PARAM));
    let mut digits = [0u8; 20];
    let mut n = digits.len();
    let mut k = tsc_khz;
    loop {
        n -= 1;
        digits[n] = b'0' + (k % 10) as u8;
        k /= 10;
        if k == 0 {
            break;
        }
    }
    let sep: &[u8] = if cmdline.is_empty() { b"" } else { b" " };
    let parts: [&[u8]; 4] = if present {
        [cmdline, b"", b"", b""]
    } else {
        [cmdline, sep, TSC_KHZ_PARAM, &digits[n..]]
    };
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_CMDLINE {
        return Err(BootError::CmdlineTooLong {
            len,
            max: MAX_CMDLINE,
        });
    }
    let mut at = 0;
    for p in parts {
        buf[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    Ok(&buf[..len])
}

/// Places a kernel of header `h` and `kernel_len` bytes, an initrd of `initrd_len`
/// bytes (0: none) and a command line of `cmdline_len` bytes in `ram` bytes of RAM
/// at guest-physical 0.
pub fn plan(
    h: &SetupHeader,
    kernel_len: u64,
    ram: u64,
    initrd_len: u64,
    cmdline_len: usize,
) -> Result<Plan, BootError> {
    let max = MAX_CMDLINE.min(h.cmdline_size as usize);
    if cmdline_len > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline_len,
            max,
        });
    }
    // The preferred address, which a relocatable kernel also takes when it is
    // aligned (it is for every kernel seen); below 1 MiB is never used.
    let align = u64::from(h.kernel_alignment).max(1);
    let kernel = if h.pref_address >= HIGH_RAM_START
        && (!h.relocatable || h.pref_address.is_multiple_of(align))
    {
        h.pref_address
    } else {
        HIGH_RAM_START.next_multiple_of(align)
    };
    let needs = kernel_len.max(u64::from(h.init_size));
    let kernel_end = kernel.saturating_add(needs);
    if kernel_end > ram {
        return Err(BootError::KernelTooLarge {
            load: kernel,
            needs,
            ram,
        });
    }
    let initrd = match initrd_len {
        0 => None,
        len => {
            // As high as the kernel takes it, page aligned, above the kernel.
            let top = ram.min(u64::from(h.initrd_addr_max) + 1) & !0xfff;
            let room = top.saturating_sub(kernel_end.next_multiple_of(0x1000));
            if len > room {
                return Err(BootError::InitrdTooLarge { len, room });
            }
            Some(((top - len) & !0xfff, len))
        }
    };
    Ok(Plan {
        kernel,
        entry: kernel + 0x200,
        kernel_end,
        initrd,
        cmdline: (CMDLINE, cmdline_len),
        zero_page: ZERO_PAGE,
        e820: [
            E820Entry {
                addr: 0,
                size: LOW_RAM_END,
                kind: E820_RAM,
            },
            E820Entry {
                addr: LOW_RAM_END,
                size: HIGH_RAM_START - LOW_RAM_END,
                kind: E820_RESERVED,
            },
            E820Entry {
                addr: HIGH_RAM_START,
                size: ram - HIGH_RAM_START,
                kind: E820_RAM,
            },
        ],
    })
}

/// The zero page (`struct boot_params`) for `image` placed as `plan` says.
pub fn zero_page(image: &BzImage<'_>, plan: &Plan) -> [u8; 4096] {
    let mut z = [0u8; 4096];
    let put = |z: &mut [u8; 4096], at: usize, bytes: &[u8]| {
        z[at..at + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut z, off::SETUP_SECTS, image.raw_header);
    // An undefined loader (0xff): this hypervisor has no assigned id.
    z[off::TYPE_OF_LOADER] = 0xff;
    z[off::LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP;
    put(&mut z, off::HEAP_END_PTR, &0xfe00u16.to_le_bytes());
    let (cmdline, _) = plan.cmdline;
    put(&mut z, off::CMD_LINE_PTR, &(cmdline as u32).to_le_bytes());
    put(
        &mut z,
        off::EXT_CMD_LINE_PTR,
        &((cmdline >> 32) as u32).to_le_bytes(),
    );
    let (addr, len) = plan.initrd.unwrap_or((0, 0));
    put(&mut z, off::RAMDISK_IMAGE, &(addr as u32).to_le_bytes());
    put(&mut z, off::RAMDISK_SIZE, &(len as u32).to_le_bytes());
    put(
        &mut z,
        off::EXT_RAMDISK_IMAGE,
        &((addr >> 32) as u32).to_le_bytes(),
    );
    put(
        &mut z,
        off::EXT_RAMDISK_SIZE,
        &((len >> 32) as u32).to_le_bytes(),
    );
    z[off::E820_ENTRIES] = plan.e820.len() as u8;
    for (i, e) in plan.e820.iter().enumerate() {
        let at = off::E820_TABLE + i * 20;
        put(&mut z, at, &e.addr.to_le_bytes());
        put(&mut z, at + 8, &e.size.to_le_bytes());
        put(&mut z, at + 16, &e.kind.to_le_bytes());
    }
    z
}

#[cfg(test)]
mod tests;
