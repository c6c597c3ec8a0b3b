//! What the UEFI loader hands to the hypervisor, defined once for both sides.
//!
//! [`BootInfo`] is a `#[repr(C)]`, versioned block in memory the loader allocated: the
//! final memory map, the ACPI RSDP, the GOP framebuffer, the command line, the files
//! it loaded and the VMs the configuration asks for. The configuration format
//! ([`config`]) is parsed here too, so it is tested on the host.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod cmdline;
pub mod config;

/// `"GPUPVBI\0"` little endian: marks a valid [`BootInfo`].
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"GPUPVBI\0");
/// Layout version of [`BootInfo`]; bumped on every incompatible change.
pub const BOOT_INFO_VERSION: u32 = 4;
/// Most memory-map entries carried.
pub const MAX_MEMORY_REGIONS: usize = 512;
/// Most loaded files carried.
pub const MAX_MODULES: usize = 40;
/// Most VMs a configuration may define.
pub const MAX_VMS: usize = 32;
/// Bytes of a VM name (UTF-8, NUL padded).
pub const NAME_LEN: usize = 32;
/// Bytes of the command line.
pub const CMDLINE_LEN: usize = 256;

/// What a physical memory region holds once boot services are gone.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Free RAM the hypervisor may use.
    Usable = 1,
    /// RAM holding the hypervisor image, its boot stack, page tables and this BootInfo.
    Hypervisor = 2,
    /// RAM holding a loaded file (guest image, config): usable after it is consumed.
    Module = 3,
    /// ACPI tables (reclaimable after they are parsed).
    AcpiReclaim = 4,
    /// ACPI NVS, runtime services, MMIO, reserved: never touched.
    Reserved = 5,
}

/// One physical memory region.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// First byte (4 KiB aligned).
    pub start: u64,
    /// Number of 4 KiB pages.
    pub pages: u64,
    /// What it holds.
    pub kind: RegionKind,
    /// Padding.
    pub _pad: u32,
}

impl MemoryRegion {
    /// An empty region (used to fill the fixed array).
    pub const EMPTY: Self = Self {
        start: 0,
        pages: 0,
        kind: RegionKind::Reserved,
        _pad: 0,
    };
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.pages.saturating_mul(4096))
    }
}

/// The GOP framebuffer, if firmware has one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Framebuffer {
    /// Physical base address (0: none).
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
    /// Visible width in pixels.
    pub width: u32,
    /// Visible height in pixels.
    pub height: u32,
    /// Pixels per scan line.
    pub stride: u32,
    /// 0 = RGB (red in the low byte), 1 = BGR, 2 = other.
    pub format: u32,
}

/// A file the loader read from the ESP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module {
    /// Path on the ESP below `\hv\` (UTF-8, NUL padded).
    pub name: [u8; NAME_LEN],
    /// Physical address of its bytes.
    pub phys: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Module {
    /// An empty slot.
    pub const EMPTY: Self = Self {
        name: [0; NAME_LEN],
        phys: 0,
        len: 0,
    };
    /// The name as text.
    pub fn name(&self) -> &str {
        fixed_str(&self.name)
    }
}

/// One VM the configuration asks for, in fixed-size form.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmEntry {
    /// VM name (UTF-8, NUL padded).
    pub name: [u8; NAME_LEN],
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Index into [`BootInfo::modules`] of its guest image (its bzImage when `kind`
    /// is [`GUEST_LINUX`]).
    pub image_module: u32,
    /// [`GUEST_ELF`] or [`GUEST_LINUX`].
    pub kind: u32,
    /// Index into [`BootInfo::modules`] of a Linux guest's initrd, or [`NO_MODULE`].
    pub initrd_module: u32,
    /// Index into [`BootInfo::modules`] of a Linux guest's command line (its bytes,
    /// without a NUL), or [`NO_MODULE`].
    pub cmdline_module: u32,
    /// GPU share weight (>= 1).
    pub gpu_weight: u32,
    /// Priority boost alpha in tenths (0..=20 for 0.0..=2.0).
    pub gpu_alpha_tenths: u32,
    /// VRAM quota in MiB (0: the default, a quarter of the total).
    pub vram_quota_mib: u32,
    /// Hypervisor memory budget in MiB (reserved at boot).
    pub hv_memory_mib: u32,
}

impl VmEntry {
    /// An empty slot.
    pub const EMPTY: Self = Self {
        name: [0; NAME_LEN],
        memory_mib: 0,
        vcpus: 0,
        image_module: 0,
        kind: GUEST_ELF,
        initrd_module: NO_MODULE,
        cmdline_module: NO_MODULE,
        gpu_weight: 0,
        gpu_alpha_tenths: 0,
        vram_quota_mib: 0,
        hv_memory_mib: 0,
    };
    /// The name as text.
    pub fn name(&self) -> &str {
        fixed_str(&self.name)
    }
}

/// [`VmEntry::kind`]: an ELF guest of this hypervisor's ABI.
pub const GUEST_ELF: u32 = 0;
/// [`VmEntry::kind`]: a Linux kernel, booted with the 64-bit boot protocol.
pub const GUEST_LINUX: u32 = 1;
/// No module.
pub const NO_MODULE: u32 = u32::MAX;

/// The loader's hand-over to the hypervisor.
#[repr(C)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// `size_of::<BootInfo>()` as the loader saw it.
    pub size: u32,
    /// ACPI RSDP physical address (0: none found).
    pub rsdp: u64,
    /// Physical address the hypervisor image was loaded at.
    pub hv_phys_base: u64,
    /// Virtual address it is linked at.
    pub hv_virt_base: u64,
    /// Bytes of the loaded image (all segments, page rounded).
    pub hv_size: u64,
    /// Physical address of a 4 KiB page below 1 MiB for the AP start-up trampoline (0: none).
    pub ap_trampoline: u64,
    /// Time-stamp counter when the loader started (firmware time since reset, for
    /// the boot-time figures).
    pub loader_entry_tsc: u64,
    /// GOP framebuffer.
    pub framebuffer: Framebuffer,
    /// Scheduler quantum from the config, in microseconds.
    pub gpu_quantum_us: u32,
    /// Scheduler mode from the config (0 best-effort, 1 equal-share, 2 fixed-share).
    pub gpu_sched_mode: u32,
    /// Used entries of `memory`.
    pub memory_len: u32,
    /// Used entries of `modules`.
    pub modules_len: u32,
    /// Used entries of `vms`.
    pub vms_len: u32,
    /// Used bytes of `cmdline`.
    pub cmdline_len: u32,
    /// The command line (`\hv\cmdline.txt`).
    pub cmdline: [u8; CMDLINE_LEN],
    /// Memory map after ExitBootServices, sorted by start, adjacent equal kinds merged.
    pub memory: [MemoryRegion; MAX_MEMORY_REGIONS],
    /// Files loaded from the ESP.
    pub modules: [Module; MAX_MODULES],
    /// VMs from the configuration.
    pub vms: [VmEntry; MAX_VMS],
}

impl BootInfo {
    /// A zeroed, valid-magic BootInfo (the loader fills it in place).
    pub const fn new() -> Self {
        Self {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            size: core::mem::size_of::<Self>() as u32,
            rsdp: 0,
            hv_phys_base: 0,
            hv_virt_base: 0,
            hv_size: 0,
            ap_trampoline: 0,
            loader_entry_tsc: 0,
            framebuffer: Framebuffer {
                base: 0,
                size: 0,
                width: 0,
                height: 0,
                stride: 0,
                format: 0,
            },
            gpu_quantum_us: 0,
            gpu_sched_mode: 0,
            memory_len: 0,
            modules_len: 0,
            vms_len: 0,
            cmdline_len: 0,
            cmdline: [0; CMDLINE_LEN],
            memory: [MemoryRegion::EMPTY; MAX_MEMORY_REGIONS],
            modules: [Module::EMPTY; MAX_MODULES],
            vms: [VmEntry::EMPTY; MAX_VMS],
        }
    }

    /// Whether magic, version and size match this build.
    pub fn is_valid(&self) -> bool {
        self.magic == BOOT_INFO_MAGIC
            && self.version == BOOT_INFO_VERSION
            && self.size as usize == core::mem::size_of::<Self>()
            && self.memory_len as usize <= MAX_MEMORY_REGIONS
            && self.modules_len as usize <= MAX_MODULES
            && self.vms_len as usize <= MAX_VMS
            && self.cmdline_len as usize <= CMDLINE_LEN
    }
    /// The used part of the memory map.
    pub fn memory(&self) -> &[MemoryRegion] {
        &self.memory[..(self.memory_len as usize).min(MAX_MEMORY_REGIONS)]
    }
    /// The loaded files.
    pub fn modules(&self) -> &[Module] {
        &self.modules[..(self.modules_len as usize).min(MAX_MODULES)]
    }
    /// The configured VMs.
    pub fn vms(&self) -> &[VmEntry] {
        &self.vms[..(self.vms_len as usize).min(MAX_VMS)]
    }
    /// The command line.
    pub fn cmdline(&self) -> &str {
        let n = (self.cmdline_len as usize).min(CMDLINE_LEN);
        core::str::from_utf8(&self.cmdline[..n]).unwrap_or("")
    }
    /// Whether the command line holds `token` as a whole word (e.g. `harness`, `test=boot`).
    pub fn has_flag(&self, token: &str) -> bool {
        self.cmdline().split_ascii_whitespace().any(|t| t == token)
    }
    /// The value of `key=value` on the command line.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.cmdline()
            .split_ascii_whitespace()
            .find_map(|t| t.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }
}

impl Default for BootInfo {
    fn default() -> Self {
        Self::new()
    }
}

/// Copies `s` into a NUL-padded fixed buffer, truncating at a char boundary.
pub fn to_fixed<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let mut n = s.len().min(N);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

/// The text of a NUL-padded fixed buffer.
pub fn fixed_str(b: &[u8]) -> &str {
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    core::str::from_utf8(&b[..n]).unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_flags_and_options() {
        let mut bi = BootInfo::new();
        let line = "harness test=boot  quantum=3";
        bi.cmdline[..line.len()].copy_from_slice(line.as_bytes());
        bi.cmdline_len = line.len() as u32;
        assert!(bi.is_valid());
        assert!(bi.has_flag("harness"));
        assert!(!bi.has_flag("test"));
        assert_eq!(bi.option("test"), Some("boot"));
        assert_eq!(bi.option("quantum"), Some("3"));
        assert_eq!(bi.option("nope"), None);
    }

    #[test]
    fn fixed_names_truncate_on_char_boundaries() {
        let f: [u8; 4] = to_fixed("abé"); // é is 2 bytes: fits exactly
        assert_eq!(fixed_str(&f), "abé");
        let f: [u8; 3] = to_fixed("abé");
        assert_eq!(fixed_str(&f), "ab");
    }
}
