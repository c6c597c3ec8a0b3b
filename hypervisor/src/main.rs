//! The GPU-PV hypervisor kernel.
//!
//! Entered from the UEFI loader (`boot/`) with a [`BootInfo`] after ExitBootServices:
//! takes over the machine (descriptor tables, memory, page tables, heap), learns the
//! platform (ACPI, PCI, local APICs), brings up every CPU and prints a boot summary.
#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod apic;
mod arch;
mod console;
mod event_log;
mod exit_sample;
mod gpu;
mod gpu_share;
mod host_clock;
mod inject;
mod interrupts;
mod iommu;
mod mm;
mod pci;
#[cfg(feature = "selftest")]
mod selftest;
mod serial;
mod smp;
mod verdict;
mod virt;
mod vm;
mod vm_context;
mod vmm;

use boot_info::{BootInfo, RegionKind};
use log::{error, info, warn};

use crate::arch::cpu;

/// Entry point, called by the loader with the BootInfo's physical address in RDI.
///
/// # Safety
/// Only the loader may call this, once, with interrupts off, on the hand-over tables.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.entry")]
pub unsafe extern "sysv64" fn _start(boot_info: u64) -> ! {
    cpu::set_index(0);
    serial::init();
    // SAFETY: the loader passes a valid, identity-mapped BootInfo that lives forever.
    let bi: &'static BootInfo = unsafe { &*(boot_info as *const BootInfo) };
    if !bi.is_valid() {
        println!("hv: BootInfo is invalid (magic/version/size mismatch): stopping");
        verdict::fail("bad BootInfo");
    }
    verdict::set_harness(bi.has_flag("harness"));
    kmain(bi)
}

fn kmain(bi: &'static BootInfo) -> ! {
    println!(
        "hv: GPU-PV hypervisor {} starting",
        env!("CARGO_PKG_VERSION")
    );
    mm::frames::init(bi);
    // Every VM's hypervisor memory budget is reserved in the heap up front.
    let budgets: usize = bi
        .vms()
        .iter()
        .map(|v| (v.hv_memory_mib as usize) << 20)
        .sum();
    if !mm::heap::init(budgets) {
        println!(
            "hv: config error: no room for a {} MiB heap ({} MiB of it the VMs' hv_memory_mib budgets): {} MiB free",
            (mm::heap::HEAP_BYTES + budgets) >> 20,
            budgets >> 20,
            mm::frames::stats().free / 256
        );
        verdict::fail("config: hypervisor memory budgets");
    }
    arch::gdt::init_this_cpu();
    arch::idt::init_this_cpu();
    mm::paging::init(bi);
    cpu::log_in();
    info!("cpu0 online (bootstrap), W^X kernel tables loaded");

    refuse_missing_self_tests(bi);
    #[cfg(feature = "selftest")]
    selftest::early(bi);

    let platform = acpi::init(bi.rsdp);
    let devices = pci::scan(platform.as_ref());
    apic::init_bsp();
    let unix = host_clock::init();
    info!(
        "clock: {} s since 1970 by the host's RTC ({})",
        unix,
        vdev::rtc::DateTime::from_unix(unix)
    );
    let cpus = smp::start_aps(bi, platform.as_ref());
    summary(bi, platform.as_ref(), &devices, cpus);
    // The GPU driver comes up before the IOMMU translates, so its own set-up DMA
    // needs no mapping; the mediator then isolates it in a domain of its own.
    #[cfg(feature = "selftest")]
    let native_fps = selftest::before_gpu(bi, &devices);
    let physical_gpu = probe_gpu(bi, &devices);
    iommu::init(platform.as_ref(), bi.option("iommu") != Some("off"));
    #[cfg(feature = "selftest")]
    selftest::after_iommu(
        bi,
        &devices,
        cpus == platform.as_ref().map_or(1, |p| p.cpus.len().max(1)),
    );
    let Some(backend) = vmm::enable_this_cpu() else {
        error!("no usable hardware virtualization (SVM with NPT or VMX with EPT): no VM can run");
        verdict::fail("no virtualization");
    };
    info!("virtualization: {backend:?}");
    vmm::configure(bi, backend);
    if let Some(s) = bi.option("linux_stuck_s").and_then(|v| v.parse().ok()) {
        vm::set_linux_stuck_limit_s(s);
    }
    if let Some(ms) = bi.option("sample_ms").and_then(|v| v.parse().ok()) {
        vmm::set_sample_interval_ms(ms);
    }
    let sim = start_gpu_pv(bi, physical_gpu);
    check_memory(bi, sim);
    let run_ms = bi.option("run_ms").and_then(|v| v.parse::<u64>().ok());
    #[cfg(feature = "selftest")]
    selftest::with_vms(bi, native_fps, run_ms);
    if let Some(vm) = bi.option("hang_vm").and_then(|v| v.parse().ok()) {
        if let Err(e) = inject::arm_hang(vm) {
            error!("hang_vm: {e}");
            verdict::fail("no test injection");
        }
    }
    if let Some(ms) = bi.option("exit_sample_ms").and_then(|v| v.parse().ok()) {
        exit_sample::set_interval_ms(ms);
    }
    let created = vmm::create_all();
    info!("{created} of {} VMs created; running them", bi.vms().len());
    vmm::run(run_ms);
    inject::check_faults(&iommu::service());
    vmm::report();
    gpu_share::dump_counters();
    let failed = failed_guests(bi.option("allow_stop").unwrap_or(""));
    for i in 0..vmm::slot_count() {
        vmm::destroy(i);
    }
    info!(
        "all VMs stopped and destroyed; frames in use {}",
        mm::frames::stats().allocated
    );
    if failed > 0 {
        verdict::fail("a guest failed");
    }
    verdict::pass()
}

/// A `test=...` mode asked of a build without them (feature `selftest`): refused, the
/// run fails. Production builds carry no self-test code.
fn refuse_missing_self_tests(bi: &BootInfo) {
    if cfg!(feature = "selftest") {
        return;
    }
    if let Some(mode) = bi.option("test") {
        error!(
            "test={mode}: this hypervisor was built without the selftest feature (test-only modes are not in production builds)"
        );
        verdict::fail("no self-test modes");
    }
}

/// The run's verdict on its guests: a VM that stopped other than by asking to with
/// code 0 (an error exit, a fault, misbehaviour) fails the run, unless its name is in
/// `allowed` (`allow_stop=a,b` on the command line: the scenario provokes it). Logs each
/// and returns how many failed.
fn failed_guests(allowed: &str) -> usize {
    let mut failed = 0;
    for i in 0..vmm::slot_count() {
        let Some((name, reason)) = vmm::with_vm(i, |vm| match &vm.state {
            vm::VmState::Stopped(r) => Some((vm.name.clone(), r.clone())),
            _ => None,
        })
        .flatten() else {
            continue;
        };
        if matches!(reason, vm::StopReason::Shutdown(0)) {
            continue;
        }
        if allowed.split(',').any(|a| a == name) {
            info!("vm {name} stopped ({reason:?}), as the scenario allows");
        } else {
            error!("guest failed: vm {name} stopped ({reason:?})");
            failed += 1;
        }
    }
    failed
}

/// Brings up the physical virtio-gpu, if there is one (and `gpu=sim` does not ask
/// for the simulated GPU).
fn probe_gpu(
    bi: &BootInfo,
    devices: &[pci::Device],
) -> Option<(gpu::virtio::HostVirtioGpu, pci::Bdf)> {
    if bi.option("gpu") == Some("sim") {
        return None;
    }
    for d in devices
        .iter()
        .filter(|d| gpu::virtio::HostVirtioGpu::matches(d))
    {
        match gpu::virtio::HostVirtioGpu::new(d) {
            Ok(g) => return Some((g, d.bdf)),
            Err(e) => warn!(
                "gpu: virtio-gpu at {} not usable ({e:?}); using the simulated GPU",
                d.bdf
            ),
        }
    }
    None
}

/// Frames a VM takes beyond its RAM (nested page tables, vCPU state), counted
/// generously.
const VM_OVERHEAD_MIB: u64 = 1;
/// Frames the hypervisor keeps free for itself after every VM is created.
const HV_SPARE_MIB: u64 = 8;

/// Refuses a configuration whose VMs cannot all get their RAM and, with the
/// simulated GPU (`sim`), the frames their budgets may hold as pixels: checked
/// before any VM is created, so a VM never finds its reserved memory missing.
fn check_memory(bi: &BootInfo, sim: bool) {
    let ram: u64 = bi.vms().iter().map(|v| u64::from(v.memory_mib)).sum();
    let pixels: u64 = if sim {
        bi.vms().iter().map(|v| u64::from(v.hv_memory_mib)).sum()
    } else {
        0
    };
    let overhead = VM_OVERHEAD_MIB * bi.vms().len() as u64 + HV_SPARE_MIB;
    let free = mm::frames::stats().free as u64 / 256;
    let need = ram + pixels + overhead;
    if need > free {
        println!(
            "hv: config error: the VMs need {need} MiB ({ram} MiB guest RAM, {pixels} MiB of budgets for simulated-GPU pixels, {overhead} MiB overhead), {free} MiB free"
        );
        verdict::fail("config: VM memory");
    }
    info!("memory: {need} MiB needed by the VMs (RAM, budgets, overhead), {free} MiB free");
}

/// Each VM's hypervisor memory budget in bytes, in configuration order.
fn budgets(bi: &BootInfo) -> alloc::vec::Vec<u64> {
    bi.vms()
        .iter()
        .map(|v| u64::from(v.hv_memory_mib) << 20)
        .collect()
}

/// Starts the mediator over the best GPU backend available: the physical virtio-gpu
/// when its driver came up, otherwise the CPU-rendered simulated GPU. Returns
/// whether the simulated GPU runs (its pixels are hypervisor memory).
fn start_gpu_pv(bi: &BootInfo, physical: Option<(gpu::virtio::HostVirtioGpu, pci::Bdf)>) -> bool {
    let quantum = bi.gpu_quantum_us;
    let mode = bi.gpu_sched_mode;
    if let Some((g, bdf)) = physical {
        gpu_share::init(
            alloc::boxed::Box::new(g),
            Some(bdf),
            quantum,
            mode,
            256 << 20,
            budgets(bi),
            false,
        );
        return false;
    }
    let top = bi
        .memory()
        .iter()
        .filter(|r| r.kind != RegionKind::Reserved)
        .map(|r| r.end())
        .max()
        .unwrap_or(0);
    let n = bi.vms().len().max(1);
    match crate::gpu::sim::SimBackend::new(
        alloc::vec![gpu_share::DEFAULT_DISPLAY; n],
        256 << 20,
        top,
    ) {
        Some(b) => {
            gpu_share::init(
                alloc::boxed::Box::new(b),
                None,
                quantum,
                mode,
                256 << 20,
                budgets(bi),
                true,
            );
            true
        }
        None => {
            warn!("gpu-pv: no GPU backend; VMs get no paravirtual GPU");
            false
        }
    }
}

fn summary(bi: &BootInfo, platform: Option<&acpi::Platform>, devices: &[pci::Device], cpus: usize) {
    let pages = |k: RegionKind| -> u64 {
        bi.memory()
            .iter()
            .filter(|r| r.kind == k)
            .map(|r| r.pages)
            .sum()
    };
    let total: u64 = bi
        .memory()
        .iter()
        .filter(|r| r.kind != RegionKind::Reserved)
        .map(|r| r.pages)
        .sum();
    let f = mm::frames::stats();
    println!("hv: boot summary");
    println!(
        "  memory: {} MiB RAM, {} MiB usable, {} KiB hypervisor image+boot data, {} KiB in frames used now ({} KiB free), {} KiB heap in use",
        total * 4 / 1024,
        pages(RegionKind::Usable) * 4 / 1024,
        pages(RegionKind::Hypervisor) * 4,
        f.allocated * 4,
        f.free * 4,
        mm::heap::in_use() / 1024
    );
    let budgets: u64 = bi.vms().iter().map(|v| u64::from(v.hv_memory_mib)).sum();
    println!(
        "  heap: {} MiB: {} MiB the hypervisor's, {budgets} MiB the VMs' hypervisor memory budgets",
        mm::heap::size() >> 20,
        mm::heap::HEAP_BYTES >> 20
    );
    match platform {
        Some(p) => {
            println!("  acpi: {} (tables: {})", p.oem, p.tables);
            println!(
                "  cpus online: {cpus} of {} (LAPIC ids {:?}), lapic {:#x} {}",
                p.cpus.len(),
                p.cpus,
                p.lapic_base,
                if apic::x2apic() { "x2apic" } else { "xapic" }
            );
            for (id, base, gsi) in &p.ioapics {
                println!("  ioapic: id {id} at {base:#x}, GSI base {gsi}");
            }
            match &p.dmar {
                Some(d) => {
                    for u in &d.units {
                        println!(
                            "  iommu: DMAR DRHD at {:#x} segment {} {} ({} device scopes)",
                            u.base,
                            u.segment,
                            if u.include_all {
                                "INCLUDE_PCI_ALL"
                            } else {
                                "explicit"
                            },
                            u.scopes.len()
                        );
                        let scopes: alloc::vec::Vec<alloc::string::String> = u
                            .scopes
                            .iter()
                            .map(|sc| match sc.kind {
                                3 => alloc::format!("ioapic {}", sc.enum_id),
                                4 => alloc::format!("hpet {}", sc.enum_id),
                                _ => alloc::format!("{:02x}:{:02x}.{}", sc.bus, sc.dev, sc.func),
                            })
                            .collect();
                        println!("    scopes: {}", scopes.join(", "));
                    }
                    for r in &d.rmrrs {
                        println!("  iommu: RMRR {:#x}..{:#x}", r.base, r.limit);
                    }
                }
                None => println!("  iommu: none (no DMAR table): GPU DMA cannot be isolated"),
            }
            match &p.ecam {
                Some(e) => println!(
                    "  pci: ECAM at {:#x} buses {}-{}",
                    e.base, e.bus_start, e.bus_end
                ),
                None => {
                    println!("  pci: no MCFG table: configuration space through ports 0xCF8/0xCFC")
                }
            }
        }
        None => {
            println!("  acpi: none: single CPU, legacy PCI access");
            println!("  cpus online: {cpus}");
        }
    }
    println!("  timer: lapic {} ticks/ms", apic::ticks_per_ms());
    println!("  pci devices: {}", devices.len());
    for d in devices {
        println!("    {d}");
    }
    match devices
        .iter()
        .find(|d| d.vendor == 0x1af4 && d.device == 0x1050)
    {
        Some(g) => println!("  gpu: virtio-gpu 1af4:1050 at {}", g.bdf()),
        None => println!("  gpu: no supported GPU found"),
    }
    println!("  vms requested: {}", bi.vms().len());
    for vm in bi.vms() {
        let image = bi
            .modules()
            .get(vm.image_module as usize)
            .map_or("?", |m| m.name());
        println!(
            "    {}: {} MiB, {} vcpu, image {}, gpu weight {} alpha {}.{} vram quota {}, hv memory 0 of {} MiB",
            vm.name(),
            vm.memory_mib,
            vm.vcpus,
            image,
            vm.gpu_weight,
            vm.gpu_alpha_tenths / 10,
            vm.gpu_alpha_tenths % 10,
            if vm.vram_quota_mib == 0 {
                alloc::string::String::from("default")
            } else {
                alloc::format!("{} MiB", vm.vram_quota_mib)
            },
            vm.hv_memory_mib
        );
    }
    if platform.is_none() {
        info!("no ACPI: one CPU, no IOMMU, legacy PCI configuration access");
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    serial::write_fmt_unlocked(format_args!(
        "\r\n!!! PANIC on cpu{}: {info}\r\n",
        cpu::current_index()
    ));
    verdict::fail("panic")
}
