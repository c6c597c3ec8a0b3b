//! UEFI loader for the hypervisor.
//!
//! Reads `\hv\cmdline.txt`, `\hv\vms.toml`, `\hv\hypervisor.elf` and the guest images
//! the configuration names from the ESP; loads the hypervisor's segments into freshly
//! allocated pages; gathers the memory map, the ACPI RSDP and the GOP framebuffer into
//! one [`BootInfo`]; builds hand-over page tables (identity map of low memory plus the
//! hypervisor's higher-half image); exits boot services and jumps.
//!
//! Bad input (missing or malformed config, missing image, a non-x86_64 ELF, not
//! enough memory) ends in a clear message on console and serial and a clean stop.
#![no_std]
#![no_main]

extern crate alloc;

mod handover;
mod serial;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::time::Duration;

use boot_info::{config, BootInfo, MemoryRegion, Module, RegionKind, VmEntry};
use uefi::boot::{self, AllocateType, MemoryType};
use uefi::mem::memory_map::MemoryMap;
use uefi::prelude::*;
use uefi::proto::console::gop::{GraphicsOutput, PixelFormat};
use uefi::table::cfg::ConfigTableEntry;
use uefi::CString16;

/// Memory type of everything the hypervisor keeps: image, stack, BootInfo, page tables.
const MEMTYPE_HYPERVISOR: MemoryType = MemoryType::custom(0x8000_0000);
/// Memory type of loaded files (guest images).
const MEMTYPE_MODULE: MemoryType = MemoryType::custom(0x8000_0001);
/// Hypervisor stack for the bootstrap CPU.
const HV_STACK_BYTES: usize = 256 * 1024;

static HARNESS: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Prints a line to the UEFI console, which firmware such as OVMF mirrors to the
/// serial port (writing COM1 as well would print every line twice there).
macro_rules! say {
    ($($arg:tt)*) => {{
        uefi::println!($($arg)*);
    }};
}

static ENTRY_TSC: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

#[entry]
fn main() -> Status {
    // SAFETY: RDTSC has no side effects.
    ENTRY_TSC.store(
        unsafe { core::arch::x86_64::_rdtsc() },
        core::sync::atomic::Ordering::Relaxed,
    );
    serial::init();
    match load() {
        Ok(never) => match never {},
        Err(msg) => fail(&msg),
    }
}

/// Reports a boot failure and stops cleanly.
fn fail(msg: &str) -> ! {
    say!("boot: {msg}");
    say!("boot: stopping");
    if HARNESS.load(core::sync::atomic::Ordering::Relaxed) {
        serial::harness_exit(false);
    }
    boot::stall(Duration::from_secs(10));
    uefi::runtime::reset(uefi::runtime::ResetType::SHUTDOWN, Status::ABORTED, None)
}

fn read_file(path: &str) -> Result<Vec<u8>, String> {
    let fs = boot::get_image_file_system(boot::image_handle())
        .map_err(|e| format!("no file system on the boot device: {e:?}"))?;
    let mut fs = uefi::fs::FileSystem::new(fs);
    let p = CString16::try_from(path).map_err(|_| format!("bad path {path}"))?;
    fs.read(p.as_ref())
        .map_err(|e| format!("cannot read {path}: {e}"))
}

/// The module of file `path` below `\hv\` (loaded once for every VM naming it);
/// `what` and `vm` name it in errors.
fn load_module(bi: &mut BootInfo, path: &str, vm: &str, what: &str) -> Result<u32, String> {
    if let Some(i) = bi.modules().iter().position(|m| m.name() == path) {
        return Ok(i as u32);
    }
    let bytes = read_file(&format!("\\hv\\{}", path.replace('/', "\\")))
        .map_err(|e| format!("VM {vm}: {what}: {e}"))?;
    let i = add_module(bi, path, &bytes)?;
    say!("boot: {what} {path} ({} bytes)", bytes.len());
    Ok(i)
}

/// Copies `bytes` into pages of their own and lists them as module `name`.
fn add_module(bi: &mut BootInfo, name: &str, bytes: &[u8]) -> Result<u32, String> {
    let i = bi.modules_len as usize;
    if i >= boot_info::MAX_MODULES {
        return Err("too many files for the VMs (guest images, kernels, initrds)".into());
    }
    let dst = alloc_pages(MEMTYPE_MODULE, bytes.len(), name)?;
    // SAFETY: `dst` has room for `bytes.len()` bytes and does not overlap `bytes`.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
    bi.modules[i] = Module {
        name: boot_info::to_fixed(name),
        phys: dst as u64,
        len: bytes.len() as u64,
    };
    bi.modules_len += 1;
    Ok(i as u32)
}

/// A Linux VM's kernel, initrd and command line checked as the hypervisor will
/// place them: a bootable bzImage that fits the VM's RAM with its initrd.
fn check_linux(
    bi: &BootInfo,
    vm: &config::VmConfig,
    kernel: u32,
    initrd: u32,
    cmdline_len: usize,
) -> Result<(), String> {
    let module = |i: u32| bi.modules().get(i as usize).copied();
    let bytes = |m: Module| {
        // SAFETY: a module's pages were filled by `add_module` and stay allocated.
        unsafe { core::slice::from_raw_parts(m.phys as *const u8, m.len as usize) }
    };
    let k = module(kernel).ok_or("kernel module missing")?;
    let bz =
        linux_boot::BzImage::parse(bytes(k)).map_err(|e| format!("VM {}: kernel: {e}", vm.name))?;
    let initrd_len = module(initrd).map_or(0, |m| m.len);
    let ram = u64::from(vm.memory_mib) << 20;
    linux_boot::plan(
        &bz.header,
        bz.kernel.len() as u64,
        ram,
        initrd_len,
        cmdline_len,
    )
    .map_err(|e| format!("VM {}: {e}", vm.name))?;
    Ok(())
}

fn alloc_pages(ty: MemoryType, bytes: usize, what: &str) -> Result<*mut u8, String> {
    let pages = bytes.div_ceil(4096).max(1);
    let p = boot::allocate_pages(AllocateType::AnyPages, ty, pages)
        .map_err(|e| format!("not enough memory for {what} ({pages} pages): {e:?}"))?;
    // SAFETY: freshly allocated, exclusively ours, `pages * 4096` bytes long.
    unsafe { core::ptr::write_bytes(p.as_ptr(), 0, pages * 4096) };
    Ok(p.as_ptr())
}

fn load() -> Result<core::convert::Infallible, String> {
    let cmdline = match read_file("\\hv\\cmdline.txt") {
        Ok(b) => String::from_utf8_lossy(&b).trim().into(),
        Err(_) => String::new(),
    };
    if cmdline.split_ascii_whitespace().any(|t| t == "harness") {
        HARNESS.store(true, core::sync::atomic::Ordering::Relaxed);
    }
    say!("boot: GPU-PV hypervisor loader, cmdline {cmdline:?}");
    boot_info::cmdline::check(&cmdline).map_err(|e| format!("config error: cmdline.txt: {e}"))?;

    let text = read_file("\\hv\\vms.toml").map_err(|e| format!("config error: {e}"))?;
    let text = core::str::from_utf8(&text).map_err(|_| "config error: vms.toml is not UTF-8")?;
    let cfg = config::parse(text).map_err(|e| format!("config error: vms.toml: {e}"))?;
    say!(
        "boot: config ok: {} VMs, GPU quantum {} ms",
        cfg.vm.len(),
        cfg.scheduler.quantum_ms
    );

    // BootInfo lives in hypervisor memory: it outlives the loader.
    let bi_ptr = alloc_pages(
        MEMTYPE_HYPERVISOR,
        core::mem::size_of::<BootInfo>(),
        "BootInfo",
    )?
    .cast::<BootInfo>();
    // SAFETY: `bi_ptr` points to zeroed, page-aligned memory big enough for a BootInfo.
    let bi = unsafe {
        bi_ptr.write(BootInfo::new());
        &mut *bi_ptr
    };
    let n = cmdline.len().min(boot_info::CMDLINE_LEN);
    bi.cmdline[..n].copy_from_slice(&cmdline.as_bytes()[..n]);
    bi.cmdline_len = n as u32;
    bi.gpu_quantum_us = cfg.scheduler.quantum_ms * 1000;
    bi.loader_entry_tsc = ENTRY_TSC.load(core::sync::atomic::Ordering::Relaxed);
    bi.gpu_sched_mode = cfg.scheduler.mode.code();

    let elf = read_file("\\hv\\hypervisor.elf")?;
    let (entry, image) = load_hypervisor(&elf)?;
    bi.hv_phys_base = image.phys;
    bi.hv_virt_base = image.virt;
    bi.hv_size = image.size;
    say!(
        "boot: hypervisor.elf: {} KiB at {:#x} (linked at {:#x}), entry {entry:#x}",
        image.size / 1024,
        image.phys,
        image.virt
    );

    for vm in &cfg.vm {
        let (kind, idx, initrd, cmdline) = match vm.guest() {
            config::Guest::Elf(image) => {
                let idx = load_module(bi, image, &vm.name, "guest image")?;
                (
                    boot_info::GUEST_ELF,
                    idx,
                    boot_info::NO_MODULE,
                    boot_info::NO_MODULE,
                )
            }
            config::Guest::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let k = load_module(bi, kernel, &vm.name, "kernel")?;
                let i = match initrd {
                    Some(path) => load_module(bi, path, &vm.name, "initrd")?,
                    None => boot_info::NO_MODULE,
                };
                check_linux(bi, vm, k, i, cmdline.len())?;
                let c = add_module(bi, &format!("cmdline:{}", vm.name), cmdline.as_bytes())?;
                (boot_info::GUEST_LINUX, k, i, c)
            }
        };
        let slot = bi.vms_len as usize;
        bi.vms[slot] = VmEntry {
            name: boot_info::to_fixed(&vm.name),
            memory_mib: vm.memory_mib,
            vcpus: vm.vcpus,
            image_module: idx,
            kind,
            initrd_module: initrd,
            cmdline_module: cmdline,
            gpu_weight: vm.gpu_weight,
            gpu_alpha_tenths: vm.alpha_tenths(),
            vram_quota_mib: vm.vram_quota_mib.unwrap_or(0),
            hv_memory_mib: vm.hv_memory_mib,
        };
        bi.vms_len += 1;
    }

    bi.rsdp = find_rsdp();
    if bi.rsdp == 0 {
        say!("boot: warning: no ACPI RSDP in the firmware's configuration table");
    }
    if let Some(fb) = framebuffer() {
        say!(
            "boot: framebuffer {}x{} at {:#x}",
            fb.width,
            fb.height,
            fb.base
        );
        bi.framebuffer = fb;
    }

    // A page below 1 MiB for the application processors' real-mode start-up code.
    bi.ap_trampoline =
        match boot::allocate_pages(AllocateType::MaxAddress(0x9_f000), MEMTYPE_HYPERVISOR, 1) {
            Ok(p) => p.as_ptr() as u64,
            Err(_) => {
                say!("boot: warning: no page below 1 MiB: only the boot CPU will run");
                0
            }
        };

    let stack = alloc_pages(MEMTYPE_HYPERVISOR, HV_STACK_BYTES, "the hypervisor stack")?;
    let stack_top = stack as u64 + HV_STACK_BYTES as u64;
    let max_phys = max_physical_address()?;
    let pml4 = handover::build_page_tables(max_phys, &image, MEMTYPE_HYPERVISOR)?;

    say!("boot: exiting boot services, jumping to the hypervisor");
    serial::write_line("boot: handing over");
    // SAFETY: nothing below uses boot services; every allocation the hypervisor needs
    // was made above with our own memory types, which the final map reports.
    let mmap = unsafe { boot::exit_boot_services(Some(MemoryType::LOADER_DATA)) };
    fill_memory_map(bi, &mmap);
    // SAFETY: `pml4` maps the identity of all RAM (this code, the stack, BootInfo) and
    // the hypervisor image at its link address; `entry` is that image's entry point.
    unsafe { handover::jump(pml4, stack_top, entry, bi_ptr as u64) }
}

/// Where the hypervisor image went.
pub struct LoadedImage {
    /// Physical address of the lowest segment's page.
    pub phys: u64,
    /// Virtual address of the same (page aligned).
    pub virt: u64,
    /// Bytes covered, page rounded.
    pub size: u64,
}

fn load_hypervisor(bytes: &[u8]) -> Result<(u64, LoadedImage), String> {
    use elf::abi::{EM_X86_64, ET_EXEC, PT_LOAD};
    use elf::endian::AnyEndian;
    let file = elf::ElfBytes::<AnyEndian>::minimal_parse(bytes)
        .map_err(|e| format!("hypervisor.elf is not an ELF file: {e}"))?;
    if file.ehdr.class != elf::file::Class::ELF64 || file.ehdr.e_machine != EM_X86_64 {
        return Err(format!(
            "hypervisor.elf is not an x86_64 ELF64 image (machine {})",
            file.ehdr.e_machine
        ));
    }
    if file.ehdr.e_type != ET_EXEC {
        return Err("hypervisor.elf is not a statically linked executable".into());
    }
    let segs = file
        .segments()
        .ok_or("hypervisor.elf has no program headers")?;
    let loads: Vec<_> = segs
        .iter()
        .filter(|p| p.p_type == PT_LOAD && p.p_memsz > 0)
        .collect();
    if loads.is_empty() {
        return Err("hypervisor.elf has no loadable segments".into());
    }
    let lo = loads.iter().map(|p| p.p_vaddr).min().unwrap_or(0) & !0xfff;
    let mut hi = 0u64;
    for p in &loads {
        let end = p
            .p_vaddr
            .checked_add(p.p_memsz)
            .ok_or("hypervisor.elf: segment overflows")?;
        if p.p_filesz > p.p_memsz
            || p.p_offset
                .checked_add(p.p_filesz)
                .is_none_or(|e| e > bytes.len() as u64)
        {
            return Err("hypervisor.elf: segment outside the file".into());
        }
        hi = hi.max(end);
    }
    let size = (hi - lo).div_ceil(4096) * 4096;
    if size > 64 << 20 {
        return Err("hypervisor.elf: image larger than 64 MiB".into());
    }
    let dst = alloc_pages(MEMTYPE_HYPERVISOR, size as usize, "the hypervisor image")?;
    for p in &loads {
        let off = (p.p_vaddr - lo) as usize;
        let src = &bytes[p.p_offset as usize..(p.p_offset + p.p_filesz) as usize];
        // SAFETY: `off + filesz <= size` by the bounds computed above; the rest is zeroed.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), dst.add(off), src.len()) };
    }
    let entry = file.ehdr.e_entry;
    if !(lo..hi).contains(&entry) {
        return Err("hypervisor.elf: entry point outside its segments".into());
    }
    Ok((
        entry,
        LoadedImage {
            phys: dst as u64,
            virt: lo,
            size,
        },
    ))
}

fn find_rsdp() -> u64 {
    uefi::system::with_config_table(|t| {
        let find = |g| t.iter().find(|e| e.guid == g).map(|e| e.address as u64);
        find(ConfigTableEntry::ACPI2_GUID)
            .or_else(|| find(ConfigTableEntry::ACPI_GUID))
            .unwrap_or(0)
    })
}

fn framebuffer() -> Option<boot_info::Framebuffer> {
    let h = boot::get_handle_for_protocol::<GraphicsOutput>().ok()?;
    let mut gop = boot::open_protocol_exclusive::<GraphicsOutput>(h).ok()?;
    let mode = gop.current_mode_info();
    let (w, h) = mode.resolution();
    let format = match mode.pixel_format() {
        PixelFormat::Rgb => 0,
        PixelFormat::Bgr => 1,
        PixelFormat::Bitmask => 2,
        // No linear framebuffer (e.g. virtio-gpu's GOP): nothing to hand over.
        _ => return None,
    };
    let stride = mode.stride() as u32;
    let mut fb = gop.frame_buffer();
    Some(boot_info::Framebuffer {
        base: fb.as_mut_ptr() as u64,
        size: fb.size() as u64,
        width: w as u32,
        height: h as u32,
        stride,
        format,
    })
}

fn max_physical_address() -> Result<u64, String> {
    let map = boot::memory_map(MemoryType::LOADER_DATA)
        .map_err(|e| format!("cannot read the memory map: {e:?}"))?;
    Ok(map
        .entries()
        .filter(|d| d.ty != MemoryType::MMIO && d.ty != MemoryType::MMIO_PORT_SPACE)
        .map(|d| d.phys_start + d.page_count * 4096)
        .max()
        .unwrap_or(0))
}

/// Converts the final UEFI memory map into `bi.memory` without allocating (boot
/// services are gone): classify, sort by start, merge neighbours of one kind.
fn fill_memory_map(bi: &mut BootInfo, map: &impl MemoryMap) {
    let mut n = 0usize;
    for d in map.entries() {
        if n == boot_info::MAX_MEMORY_REGIONS {
            break;
        }
        let kind = match d.ty {
            MemoryType::CONVENTIONAL
            | MemoryType::BOOT_SERVICES_CODE
            | MemoryType::BOOT_SERVICES_DATA
            | MemoryType::LOADER_CODE
            | MemoryType::LOADER_DATA => RegionKind::Usable,
            MEMTYPE_HYPERVISOR => RegionKind::Hypervisor,
            MEMTYPE_MODULE => RegionKind::Module,
            MemoryType::ACPI_RECLAIM => RegionKind::AcpiReclaim,
            _ => RegionKind::Reserved,
        };
        bi.memory[n] = MemoryRegion {
            start: d.phys_start,
            pages: d.page_count,
            kind,
            _pad: 0,
        };
        n += 1;
    }
    bi.memory[..n].sort_unstable_by_key(|r| r.start);
    let mut out = 0usize;
    for i in 0..n {
        let r = bi.memory[i];
        if out > 0 && bi.memory[out - 1].kind == r.kind && bi.memory[out - 1].end() == r.start {
            bi.memory[out - 1].pages += r.pages;
        } else {
            bi.memory[out] = r;
            out += 1;
        }
    }
    bi.memory_len = out as u32;
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut s = String::new();
    let _ = write!(s, "boot: loader panic: {info}");
    serial::write_line(&s);
    if HARNESS.load(core::sync::atomic::Ordering::Relaxed) {
        serial::harness_exit(false);
    }
    loop {
        x86_64::instructions::hlt();
    }
}
