//! Virtual machines: creation from the boot configuration (memory, nested paging,
//! the guest image, the guest ABI's page tables, GDT and boot-info page), the exit
//! handlers written once against [`VmExit`], and teardown that returns every frame.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use gpu_pv::abi::{guest, hypercall};
use gpu_pv::memory::GuestMemory;
use log::{info, warn};
use vdev::mmio::{self, Access};
use vdev::vgpu::{Action, VirtioGpuDevice};
use vdev::vlapic::VLapic;

use crate::mm::frames;
use crate::virt::npt::{Format, NestedTables, Perm};
use crate::virt::{self, Backend, Instruction, StartState, Vcpu, VmExit};
use crate::vm_context;

const TWO_MIB: u64 = 2 << 20;
/// Accesses to ports no device implements that a VM may make in one second before
/// it is stopped as a storm (emulated ports, COM1 and PCI, do not count).
pub const IO_STORM_PER_SECOND: u64 = 1_000;
/// How long a vCPU may spin with interrupts off (never exiting on its own) before
/// the VM is stopped as hung.
pub const STUCK_LIMIT_US: u64 = 1_000_000;
/// How long a halted vCPU whose VM has GPU work in flight is polled for before it
/// gives up its slice (see `Vm::halt_poll`).
pub const HALT_POLL_US: u64 = 1_000;
/// Guest-physical base of the (empty) PCI ECAM window every guest sees.
pub const GUEST_ECAM_BASE: u64 = 0xb000_0000;
const GUEST_ECAM_SIZE: u64 = 256 << 20;

/// Time-stamp counter when any guest first printed a line (0: none yet).
pub static FIRST_GUEST_LINE_TSC: core::sync::atomic::AtomicU64 =
    core::sync::atomic::AtomicU64::new(0);

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest asked (hypercall SHUTDOWN) with this code.
    Shutdown(u64),
    /// Halted with interrupts off: it can never run again.
    HaltedForever,
    /// Triple fault / shutdown event.
    TripleFault,
    /// Touched guest-physical memory it does not own.
    OutsideMemory(u64),
    /// Port I/O at a rate no device needs.
    IoStorm,
    /// Spun with interrupts off for longer than [`STUCK_LIMIT_US`].
    StuckInterruptsOff,
    /// An MMIO instruction the hypervisor cannot emulate.
    BadMmio(u64),
    /// The hardware refused its state.
    EntryFailed(u64),
    /// An exit the hypervisor does not handle.
    Unhandled(String),
    /// The host destroyed it.
    Destroyed,
}

/// Lifecycle state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Runnable.
    Running,
    /// Paused by the host (keeps its memory).
    Paused,
    /// Stopped; memory still held until destroyed.
    Stopped(StopReason),
}

/// Per-VM counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct VmStats {
    /// VM exits.
    pub exits: u64,
    /// Hypercalls.
    pub hypercalls: u64,
    /// Port I/O exits.
    pub io_exits: u64,
    /// Microseconds of guest CPU time.
    pub cpu_us: u64,
    /// Times it was scheduled.
    pub runs: u64,
    /// Halts that halt polling turned into an immediate resume.
    pub halt_polls_won: u64,
}

/// What a VM is made from.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// Name.
    pub name: String,
    /// RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// CPU/GPU weight.
    pub weight: u32,
    /// GPU priority boost alpha, in tenths.
    pub gpu_alpha_tenths: u32,
    /// VRAM quota in MiB (0: the default).
    pub vram_quota_mib: u32,
}

/// One virtual machine.
pub struct Vm {
    /// Index in configuration order.
    pub id: u16,
    /// Name.
    pub name: String,
    log_id: u32,
    /// Host-physical base of its RAM (contiguous).
    pub mem_base: u64,
    /// RAM size in bytes.
    pub mem_size: u64,
    nested: NestedTables,
    /// Its vCPUs.
    pub vcpus: Vec<Box<dyn Vcpu>>,
    /// Lifecycle.
    pub state: VmState,
    /// Counters.
    pub stats: VmStats,
    /// CPU share weight.
    pub weight: u32,
    serial_line: Vec<u8>,
    /// Lines the guest printed (kept for tests that check output).
    pub lines_printed: u64,
    /// The last line it printed.
    pub last_line: String,
    lapics: Vec<VLapic>,
    halted: Vec<bool>,
    /// Secondary vCPUs stay parked until the guest starts them (VCPU_START).
    started: Vec<bool>,
    pci_addr: u32,
    io_window: (u64, u64),
    stuck_us: u64,
    /// Its paravirtual GPU, when the mediator runs and a scanout is free for it.
    gpu: Option<VirtioGpuDevice>,
    /// Its port to the shared GPU (with `gpu`).
    port: Option<crate::gpupv::GpuPort>,
}

/// Why a VM could not be created.
#[derive(Debug)]
pub enum CreateError {
    /// Not enough frames.
    OutOfMemory,
    /// The guest image is not a loadable x86_64 ELF inside the VM's RAM.
    BadImage(&'static str),
    /// The configuration asks for something impossible.
    BadConfig(&'static str),
    /// The backend refused.
    Backend(&'static str),
}

impl core::fmt::Display for CreateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CreateError::OutOfMemory => write!(f, "not enough memory"),
            CreateError::BadImage(why) => write!(f, "bad guest image: {why}"),
            CreateError::BadConfig(why) => write!(f, "bad configuration: {why}"),
            CreateError::Backend(why) => write!(f, "virtualization backend: {why}"),
        }
    }
}

impl Vm {
    /// Creates a VM: allocates and scrubs its RAM, builds nested paging, loads `image`,
    /// writes the guest ABI structures, and creates its vCPUs (only the first starts).
    pub fn create(
        backend: Backend,
        id: u16,
        spec: &VmSpec,
        image: &[u8],
    ) -> Result<Vm, CreateError> {
        if spec.memory_mib < guest::MIN_MEMORY_MIB {
            return Err(CreateError::BadConfig(
                "memory below the guest ABI minimum (4 MiB)",
            ));
        }
        let mem_size = u64::from(spec.memory_mib) << 20;
        let pages = (mem_size / 4096) as usize;
        let mem_base =
            frames::alloc_contiguous(pages, TWO_MIB, u64::MAX).ok_or(CreateError::OutOfMemory)?;
        let mut vm = Vm {
            id,
            name: spec.name.clone(),
            log_id: vm_context::register(id, &spec.name),
            mem_base,
            mem_size,
            nested: match NestedTables::new(match backend {
                Backend::Svm => Format::Npt,
                Backend::Vmx => Format::Ept,
            }) {
                Some(n) => n,
                None => {
                    frames::free(mem_base, pages);
                    return Err(CreateError::OutOfMemory);
                }
            },
            vcpus: Vec::new(),
            state: VmState::Running,
            stats: VmStats::default(),
            weight: spec.weight.max(1),
            serial_line: Vec::new(),
            lines_printed: 0,
            last_line: String::new(),
            lapics: Vec::new(),
            halted: Vec::new(),
            started: Vec::new(),
            pci_addr: 0,
            io_window: (0, 0),
            stuck_us: 0,
            gpu: None,
            port: None,
        };
        // From here on, dropping `vm` returns its frames.
        vm.nested
            .map(
                0,
                mem_base,
                mem_size,
                Perm {
                    write: true,
                    exec: true,
                },
            )
            .ok_or(CreateError::OutOfMemory)?;
        let entry = vm.load_elf(image)?;
        vm.write_guest_abi(spec);
        let start = StartState {
            rip: entry,
            rsp: guest::STACK_TOP,
            rdi: guest::BOOT_INFO,
            cr3: guest::PML4,
            gdt_base: guest::GDT,
            gdt_limit: 23,
        };
        let mem = vm.memory();
        if let Some(port) = crate::gpupv::add_vm(
            id,
            &spec.name,
            mem,
            spec.weight,
            spec.gpu_alpha_tenths,
            spec.vram_quota_mib,
        ) {
            vm.gpu = Some(VirtioGpuDevice::new(port.scanouts()));
            vm.port = Some(port);
        }
        let root = vm.nested.root_pointer();
        for _ in 0..spec.vcpus.max(1) {
            // Unique per vCPU (slot < 32, at most 16 vCPUs): VMX's VPID.
            let tag = 1 + id * 16 + vm.vcpus.len() as u16;
            let v = virt::create_vcpu(backend, root, tag, &start).map_err(CreateError::Backend)?;
            vm.lapics.push(VLapic::new(vm.vcpus.len() as u32));
            vm.halted.push(false);
            vm.started.push(vm.vcpus.is_empty());
            vm.vcpus.push(v);
        }
        Ok(vm)
    }

    /// Whether its GPU has interrupts waiting, readable without the VM's lock.
    pub fn pending_gpu_interrupts(&self) -> Option<crate::gpupv::PendingGpuInterrupts> {
        self.port.as_ref().map(|p| p.pending_interrupts())
    }

    /// The VM's RAM as a checked guest-memory view (what the mediator gets too).
    pub fn memory(&self) -> crate::gpupv::VmMemory {
        crate::gpupv::VmMemory {
            base: self.mem_base,
            size: self.mem_size,
        }
    }

    /// Copies guest memory out, checked against the VM's RAM.
    pub fn read_guest(&mut self, gpa: u64, out: &mut [u8]) -> bool {
        GuestMemory::read(&self.memory(), gpa, out).is_ok()
    }

    fn write_guest(&mut self, gpa: u64, data: &[u8]) -> bool {
        GuestMemory::write(&mut self.memory(), gpa, data).is_ok()
    }

    fn load_elf(&mut self, image: &[u8]) -> Result<u64, CreateError> {
        use elf::abi::{EM_X86_64, PT_LOAD};
        use elf::endian::LittleEndian;
        let file = elf::ElfBytes::<LittleEndian>::minimal_parse(image)
            .map_err(|_| CreateError::BadImage("not an ELF file"))?;
        if file.ehdr.class != elf::file::Class::ELF64 || file.ehdr.e_machine != EM_X86_64 {
            return Err(CreateError::BadImage("not an x86_64 ELF64 image"));
        }
        let segs = file
            .segments()
            .ok_or(CreateError::BadImage("no program headers"))?;
        let mut loaded = false;
        for p in segs.iter().filter(|p| p.p_type == PT_LOAD && p.p_memsz > 0) {
            let end = p
                .p_paddr
                .checked_add(p.p_memsz)
                .ok_or(CreateError::BadImage("segment overflows"))?;
            if p.p_paddr < guest::IMAGE_BASE || end > self.mem_size || p.p_filesz > p.p_memsz {
                return Err(CreateError::BadImage("segment outside the VM's RAM"));
            }
            let src = p
                .p_offset
                .checked_add(p.p_filesz)
                .and_then(|e| image.get(p.p_offset as usize..e as usize))
                .ok_or(CreateError::BadImage("segment outside the file"))?;
            self.write_guest(p.p_paddr, src);
            loaded = true;
        }
        if !loaded {
            return Err(CreateError::BadImage("no loadable segment"));
        }
        Ok(file.ehdr.e_entry)
    }

    fn write_guest_abi(&mut self, spec: &VmSpec) {
        let w64 = |vm: &mut Vm, gpa: u64, v: u64| {
            vm.write_guest(gpa, &v.to_le_bytes());
        };
        w64(self, guest::PML4, guest::PDPT | 0x7);
        for i in 0..4u64 {
            w64(self, guest::PDPT + i * 8, (guest::PD + i * 0x1000) | 0x7);
            for j in 0..512u64 {
                let pa = (i << 30) | (j << 21);
                w64(self, guest::PD + i * 0x1000 + j * 8, pa | 0x83);
            }
        }
        w64(self, guest::GDT, 0);
        w64(self, guest::GDT + 8, 0x00af_9a00_0000_ffff);
        w64(self, guest::GDT + 16, 0x00cf_9200_0000_ffff);
        use guest::boot_info as bi;
        let base = guest::BOOT_INFO;
        w64(self, base + bi::MAGIC as u64, guest::BOOT_INFO_MAGIC);
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&guest::BOOT_INFO_VERSION.to_le_bytes());
        b[4..].copy_from_slice(&u32::from(self.id).to_le_bytes());
        self.write_guest(base + bi::VERSION as u64, &b);
        w64(self, base + bi::MEMORY_BYTES as u64, self.mem_size);
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&spec.vcpus.to_le_bytes());
        self.write_guest(base + bi::VCPUS as u64, &b);
        let name: [u8; 32] = boot_info::to_fixed(&spec.name);
        self.write_guest(base + bi::NAME as u64, &name);
        w64(self, base + bi::GPU_WEIGHT as u64, u64::from(spec.weight));
    }

    /// Frames this VM holds (RAM plus nested tables plus VMCB/VMCS pages).
    pub fn frames_held(&self) -> usize {
        (self.mem_size / 4096) as usize + self.nested.table_frames() + self.vcpus.len()
    }

    /// Stops the VM, logging why with its vCPU state.
    pub fn stop(&mut self, vcpu: usize, reason: StopReason) {
        if matches!(reason, StopReason::HaltedForever | StopReason::Shutdown(_)) {
            info!("vm stopped: {reason:?}");
        } else if let Some(v) = self.vcpus.get(vcpu) {
            warn!(
                "vm stopped: {:?} (vcpu{vcpu} rip {:#x} rsp {:#x} rflags {:#x} cr3 {:#x})",
                reason,
                v.rip(),
                v.rsp(),
                v.rflags(),
                v.cr3()
            );
        }
        self.state = VmState::Stopped(reason);
    }

    /// Halt polling: when vCPU 0 halted while its VM has GPU commands in flight, the
    /// completion usually comes sooner than a deschedule and wake-up would take. The
    /// CPU then serves the GPU path itself for up to [`HALT_POLL_US`] (within the
    /// slice) and returns true as soon as an interrupt is due, so the vCPU resumes
    /// without giving up its slice.
    fn halt_poll(&mut self, idx: usize, slice_deadline: u64, others_ready: fn() -> bool) -> bool {
        if idx != 0
            || self.state != VmState::Running
            || !self.halted.first().copied().unwrap_or(false)
        {
            return false;
        }
        // What the guest queued just before halting is taken (it is polled, so it
        // did not kick) and goes to the GPU now.
        let _ = crate::gpupv::service();
        if !self.port.as_ref().is_some_and(|p| p.has_work()) {
            return false;
        }
        let until = (crate::apic::now_us() + HALT_POLL_US).min(slice_deadline);
        loop {
            let _ = crate::gpupv::service();
            if self.ready(0) {
                self.halted[0] = false;
                self.stats.halt_polls_won += 1;
                return true;
            }
            if crate::apic::now_us() >= until || others_ready() {
                return false;
            }
            core::hint::spin_loop();
        }
    }

    /// Whether vCPU `idx` has something to do now (not halted, or an interrupt is due).
    pub fn ready(&mut self, idx: usize) -> bool {
        if !self.started.get(idx).copied().unwrap_or(false) {
            return false;
        }
        if !self.halted.get(idx).copied().unwrap_or(false) {
            return true;
        }
        let now = crate::apic::now_us();
        self.lapics[idx].tick(now);
        self.lapics[idx].pending().is_some()
            || (idx == 0
                && (self.port.as_ref().is_some_and(|p| p.has_interrupts())
                    || self.gpu.as_ref().is_some_and(|d| d.has_released())))
    }

    /// Turns the mediator's coalesced interrupts into MSI-X messages of the VM's
    /// virtual GPU, delivered to its bootstrap vCPU's local APIC.
    fn collect_gpu_interrupts(&mut self) {
        let Some(dev) = self.gpu.as_mut() else { return };
        // Messages held pending while their MSI-X entry (or the function) was masked,
        // released by the driver's unmask.
        for vector in dev.take_released() {
            self.lapics[0].raise(vector);
        }
        let Some(port) = self.port.as_ref() else {
            return;
        };
        let bits = port.take_interrupts();
        if bits == 0 {
            return;
        }
        let config_entry = dev.config_vector();
        for entry in 0..64u16 {
            if bits & (1 << entry) == 0 {
                continue;
            }
            let config = entry == config_entry;
            if config && port.needs_reset() {
                dev.needs_reset = true;
            }
            if let Some(vector) = dev.raise(entry, config) {
                self.lapics[0].raise(vector);
            }
        }
    }

    /// When vCPU `idx` next has work (host microseconds): 0 when runnable now,
    /// its timer deadline when halted, `u64::MAX` when halted with nothing armed.
    pub fn wake_time(&self, idx: usize) -> u64 {
        if !self.halted.get(idx).copied().unwrap_or(false) || self.state != VmState::Running {
            return 0;
        }
        self.lapics[idx].deadline_us().unwrap_or(u64::MAX)
    }

    /// Delivers a pending virtual interrupt, or asks for an interrupt window.
    fn deliver_interrupts(&mut self, idx: usize, now: u64) {
        if idx == 0 {
            self.collect_gpu_interrupts();
        }
        let lapic = &mut self.lapics[idx];
        lapic.tick(now);
        if let Some(vector) = lapic.pending() {
            let v = &mut self.vcpus[idx];
            if v.interruptible() {
                v.inject_interrupt(vector);
                lapic.acknowledge(vector);
                self.halted[idx] = false;
            } else {
                v.set_interrupt_window(true);
            }
        }
    }

    /// Runs vCPU `idx` for one slice of `slice_us` (0: until it stops); returns when the
    /// slice is over, the vCPU blocks, or the VM stops. `others_ready` says whether
    /// another vCPU waits for a CPU (a halted vCPU stops polling for its GPU then).
    pub fn run_slice(&mut self, idx: usize, slice_us: u64, others_ready: fn() -> bool) {
        if idx >= self.vcpus.len() || !self.ready(idx) {
            return;
        }
        vm_context::set(Some(self.log_id));
        // While the vCPU runs, its GPU queues are polled instead of trapping kicks.
        let polled = self
            .port
            .as_ref()
            .filter(|_| self.gpu.as_ref().is_some_and(|d| d.live()));
        if let Some(port) = polled {
            port.slice_begin(idx == 0);
        }
        let polled = polled.is_some();
        let t0 = crate::apic::now_us();
        let deadline = if slice_us == 0 {
            u64::MAX
        } else {
            t0 + slice_us
        };
        self.stats.runs += 1;
        while self.state == VmState::Running {
            let now = crate::apic::now_us();
            let left = deadline.saturating_sub(now);
            if left == 0 {
                break;
            }
            self.deliver_interrupts(idx, now);
            let until_timer = self.lapics[idx]
                .deadline_us()
                .map_or(u64::MAX, |d| d.saturating_sub(now));
            let v = &mut self.vcpus[idx];
            v.set_time_slice(if slice_us == 0 {
                0
            } else {
                left.min(until_timer).max(50)
            });
            let exit = v.run();
            self.stats.exits += 1;
            let after = crate::apic::now_us();
            if matches!(exit, VmExit::ExternalInterrupt | VmExit::Preempted)
                && self.vcpus[idx].rflags() & (1 << 9) == 0
            {
                self.stuck_us += after.saturating_sub(now);
                if self.stuck_us > STUCK_LIMIT_US {
                    self.stop(idx, StopReason::StuckInterruptsOff);
                    break;
                }
            } else {
                self.stuck_us = 0;
            }
            if !self.handle_exit(idx, exit) {
                if self.halt_poll(idx, deadline, others_ready) {
                    continue;
                }
                break;
            }
        }
        if let Some(v) = self.vcpus.get_mut(idx) {
            v.put();
        }
        if let Some(port) = self.port.as_ref().filter(|_| polled) {
            port.slice_end();
        }
        self.stats.cpu_us += crate::apic::now_us().saturating_sub(t0);
        vm_context::set(None);
    }

    /// Translates a guest-virtual address through the guest's own 4-level page tables.
    fn guest_virt_to_phys(&mut self, cr3: u64, va: u64) -> Option<u64> {
        let mut table = cr3 & 0x000f_ffff_ffff_f000;
        for (level, shift) in [(4, 39u64), (3, 30), (2, 21), (1, 12)] {
            let mut e = [0u8; 8];
            if !self.read_guest(table + ((va >> shift) & 511) * 8, &mut e) {
                return None;
            }
            let e = u64::from_le_bytes(e);
            if e & 1 == 0 {
                return None;
            }
            let addr = e & 0x000f_ffff_ffff_f000;
            if (level == 3 || level == 2) && e & (1 << 7) != 0 {
                let mask = (1u64 << shift) - 1;
                return Some((addr & !mask) | (va & mask));
            }
            table = addr;
        }
        Some(table | (va & 0xfff))
    }

    /// Emulates the MMIO instruction at the guest's RIP against `dev`; returns false
    /// (after stopping the VM) when it cannot be emulated.
    fn emulate_mmio(&mut self, idx: usize, gpa: u64) -> bool {
        let (rip, cr3) = (self.vcpus[idx].rip(), self.vcpus[idx].cr3());
        // The instruction may cross into the next page, which the guest's tables map
        // elsewhere: fetch each part through them (the CPU just fetched it all, so
        // both translate unless another vCPU changed the tables meanwhile).
        let mut bytes = [0u8; 15];
        let first = (4096 - (rip & 0xfff)).min(15) as usize;
        let fetched = self
            .guest_virt_to_phys(cr3, rip)
            .is_some_and(|pa| self.read_guest(pa, &mut bytes[..first]));
        let avail = if first < 15
            && self
                .guest_virt_to_phys(cr3, rip.wrapping_add(first as u64))
                .is_some_and(|pa| self.read_guest(pa, &mut bytes[first..]))
        {
            15
        } else {
            first
        };
        if !fetched {
            self.stop(idx, StopReason::BadMmio(gpa));
            return false;
        }
        let now = crate::apic::now_us();
        // Bytes past `avail` are unknown: an instruction running into them fails to decode.
        let decoded = mmio::decode(&bytes[..avail], self.vcpus[idx].regs());
        let Ok((access, len)) = decoded else {
            warn!("cannot emulate the instruction at {rip:#x} touching {gpa:#x}: {decoded:?}");
            self.stop(idx, StopReason::BadMmio(gpa));
            return false;
        };
        let lapic = gpu_pv::abi::guest::LAPIC_BASE;
        let in_ecam = (GUEST_ECAM_BASE..GUEST_ECAM_BASE + GUEST_ECAM_SIZE).contains(&gpa);
        let ecam = |gpa: u64| {
            let o = gpa - GUEST_ECAM_BASE;
            (
                (o >> 20) as u8,
                ((o >> 15) & 31) as u8,
                ((o >> 12) & 7) as u8,
                (o & 0xfff) as u16,
            )
        };
        match access {
            Access::Read { reg, size } => {
                let value = if (lapic..lapic + 4096).contains(&gpa) {
                    u64::from(self.lapics[idx].read((gpa - lapic) as u32, now))
                } else if in_ecam {
                    let (bus, dev, func, off) = ecam(gpa);
                    match self.gpu.as_ref() {
                        Some(d) if bus == 0 => d.config_read(dev, func, off, size),
                        _ => u64::MAX,
                    }
                } else if let Some(d) = self.gpu.as_mut().filter(|d| d.claims(gpa)) {
                    d.mmio_read(gpa, size)
                } else {
                    u64::MAX
                };
                mmio::complete_read(self.vcpus[idx].regs(), reg, value);
            }
            Access::Write { value, size } => {
                if (lapic..lapic + 4096).contains(&gpa) {
                    self.lapics[idx].write((gpa - lapic) as u32, value as u32, now);
                } else if in_ecam {
                    let (bus, dev, func, off) = ecam(gpa);
                    if let (Some(d), 0) = (self.gpu.as_mut(), bus) {
                        d.config_write(dev, func, off, size, value as u32);
                    }
                } else if let Some(d) = self.gpu.as_mut().filter(|d| d.claims(gpa)) {
                    let action = d.mmio_write(gpa, size, value);
                    self.gpu_action(action);
                }
            }
        }
        self.vcpus[idx].skip(len as u64);
        true
    }

    /// Handles one exit; returns false when the vCPU should give up the CPU.
    fn handle_exit(&mut self, idx: usize, exit: VmExit) -> bool {
        match exit {
            VmExit::Io(io) => {
                self.stats.io_exits += 1;
                if !matches!(io.port, 0x3f8..=0x3ff | 0xcf8..=0xcff) {
                    let now = crate::apic::now_us();
                    if now.saturating_sub(self.io_window.0) > 1_000_000 {
                        self.io_window = (now, 0);
                    }
                    self.io_window.1 += 1;
                    if self.io_window.1 > IO_STORM_PER_SECOND {
                        self.stop(idx, StopReason::IoStorm);
                        return false;
                    }
                }
                if io.string || io.rep {
                    self.stop(
                        idx,
                        StopReason::Unhandled(alloc::format!("string port I/O to {:#x}", io.port)),
                    );
                    return false;
                }
                let rax = self.vcpus[idx].regs().rax;
                if io.input {
                    let val = match io.port {
                        0x3fd => 0x60, // COM1 LSR: transmitter empty
                        0xcf8 => u64::from(self.pci_addr),
                        0xcfc..=0xcff => self.pci_port_read(io.port, io.size),
                        _ => 0xffff_ffff,
                    };
                    let mask = match io.size {
                        1 => 0xff,
                        2 => 0xffff,
                        _ => 0xffff_ffff,
                    };
                    self.vcpus[idx].regs().rax = (rax & !mask) | (val & mask);
                } else if io.port == 0x3f8 {
                    self.serial_byte(rax as u8);
                } else if io.port == 0xcf8 && io.size == 4 {
                    self.pci_addr = rax as u32;
                } else if (0xcfc..=0xcff).contains(&io.port) {
                    self.pci_port_write(io.port, io.size, rax as u32);
                }
                let v = &mut self.vcpus[idx];
                v.skip(u64::from(io.len.max(1)));
                true
            }
            VmExit::Hypercall => {
                self.stats.hypercalls += 1;
                self.vcpus[idx].skip(3);
                self.hypercall(idx)
            }
            VmExit::Cpuid => {
                let v = &mut self.vcpus[idx];
                let view = virt::cpuid::GuestView {
                    cr4: v.cr4(),
                    xcr0: v.cpu_state().xcr0(),
                };
                let r = v.regs();
                let (leaf, sub) = (r.rax as u32, r.rcx as u32);
                let res = match (leaf, virt::cpu_state::policy()) {
                    (0x4000_0000, _) => {
                        let sig = *b"GPUPVHVGPUPV";
                        let word = |i: usize| {
                            u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]])
                        };
                        core::arch::x86_64::CpuidResult {
                            eax: 0x4000_0000,
                            ebx: word(0),
                            ecx: word(4),
                            edx: word(8),
                        }
                    }
                    (_, Some(policy)) => {
                        virt::cpuid::guest_cpuid(leaf, sub, &crate::arch::cpu::cpuid, &policy, view)
                    }
                    (_, None) => crate::arch::cpu::cpuid(leaf, sub),
                };
                r.rax = u64::from(res.eax);
                r.rbx = u64::from(res.ebx);
                r.rcx = u64::from(res.ecx);
                r.rdx = u64::from(res.edx);
                v.skip(2);
                true
            }
            VmExit::Xsetbv => {
                let v = &mut self.vcpus[idx];
                let r = *v.regs();
                let value = (r.rdx << 32) | (r.rax & 0xffff_ffff);
                let ok = v.cpl() == 0 && v.cpu_state().set_xcr(r.rcx as u32, value).is_ok();
                if ok {
                    v.skip(3);
                } else {
                    v.inject_exception(13, Some(0));
                }
                true
            }
            VmExit::Instruction(insn) => {
                let v = &mut self.vcpus[idx];
                match insn {
                    // Guest RAM is write-back and DMA to it is coherent: nothing to do,
                    // and the machine's caches are not a guest's to flush or drop.
                    Instruction::Wbinvd | Instruction::Invd => v.skip(insn.len()),
                    // Host performance counters are not the guest's.
                    Instruction::Rdpmc => v.inject_exception(13, Some(0)),
                    // Not offered in CPUID.
                    Instruction::Rdtscp | Instruction::Monitor | Instruction::Mwait => {
                        v.inject_exception(6, None)
                    }
                }
                true
            }
            VmExit::Msr { .. } => {
                // No MSR is passed through or emulated yet: the guest gets #GP.
                self.vcpus[idx].inject_exception(13, Some(0));
                true
            }
            VmExit::Hlt => {
                let v = &mut self.vcpus[idx];
                v.skip(1);
                if v.rflags() & (1 << 9) == 0 {
                    self.stop(idx, StopReason::HaltedForever);
                } else {
                    self.halted[idx] = true;
                }
                false
            }
            VmExit::InterruptWindow => {
                self.vcpus[idx].set_interrupt_window(false);
                true
            }
            VmExit::ExternalInterrupt | VmExit::Preempted => {
                // The interrupt may be the GPU's: its bottom half runs now, not at the
                // end of this slice.
                let _ = crate::gpupv::service();
                true
            }
            VmExit::Shutdown => {
                self.stop(idx, StopReason::TripleFault);
                false
            }
            VmExit::NestedPageFault { gpa, .. } => {
                let lapic = gpu_pv::abi::guest::LAPIC_BASE;
                if (lapic..lapic + 4096).contains(&gpa)
                    || (GUEST_ECAM_BASE..GUEST_ECAM_BASE + GUEST_ECAM_SIZE).contains(&gpa)
                    || self.gpu.as_ref().is_some_and(|d| d.claims(gpa))
                {
                    return self.emulate_mmio(idx, gpa);
                }
                if gpa >= self.mem_size {
                    self.stop(idx, StopReason::OutsideMemory(gpa));
                } else {
                    self.stop(
                        idx,
                        StopReason::Unhandled(alloc::format!(
                            "nested fault inside RAM at {gpa:#x}"
                        )),
                    );
                }
                false
            }
            VmExit::Exception { vector, error_code } => {
                self.vcpus[idx].inject_exception(vector, error_code);
                true
            }
            VmExit::EntryFailed(code) => {
                self.stop(idx, StopReason::EntryFailed(code));
                false
            }
            VmExit::Other(code) => {
                self.stop(
                    idx,
                    StopReason::Unhandled(alloc::format!("exit code {code:#x}")),
                );
                false
            }
        }
    }

    /// Bus/device/function/register of the PCI mechanism #1 address, if enabled.
    fn pci_target(&self, port: u16) -> Option<(u8, u8, u8, u16)> {
        let a = self.pci_addr;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let off = (a & 0xfc) as u16 + (port - 0xcfc);
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 31) as u8,
            ((a >> 8) & 7) as u8,
            off,
        ))
    }

    fn pci_port_read(&self, port: u16, size: u8) -> u64 {
        match (self.pci_target(port), self.gpu.as_ref()) {
            (Some((0, dev, func, off)), Some(d)) => d.config_read(dev, func, off, size),
            _ => 0xffff_ffff,
        }
    }

    fn pci_port_write(&mut self, port: u16, size: u8, value: u32) {
        if let (Some((0, dev, func, off)), Some(d)) = (self.pci_target(port), self.gpu.as_mut()) {
            d.config_write(dev, func, off, size, value);
        }
    }

    /// Carries out what the virtual GPU asked for after a register write.
    fn gpu_action(&mut self, action: Action) {
        let Some(port) = self.port.as_ref() else {
            return;
        };
        match action {
            Action::None => {}
            Action::Notify(q) => port.doorbell(q),
            Action::Start(control, cursor) => {
                if !port.start(control, cursor) {
                    if let Some(d) = self.gpu.as_mut() {
                        d.needs_reset = true;
                    }
                }
            }
            Action::Reset => port.driver_reset(),
            Action::Vector(q, entry) => port.set_vector(q, entry),
            Action::QueueReset(q) => port.reset_queue(q),
            Action::QueueRestart(q, layout) => {
                if !port.restart_queue(q, layout) {
                    if let Some(d) = self.gpu.as_mut() {
                        d.needs_reset = true;
                    }
                }
            }
        }
    }

    fn serial_byte(&mut self, b: u8) {
        match b {
            b'\n' => self.flush_serial(),
            b'\r' => {}
            _ if self.serial_line.len() >= 200 => {
                self.flush_serial();
                self.serial_line.push(b);
            }
            _ => self.serial_line.push(b),
        }
    }

    fn flush_serial(&mut self) {
        let mut s = String::new();
        for &c in &self.serial_line {
            let _ = s.write_char(if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '.'
            });
        }
        self.serial_line.clear();
        self.lines_printed += 1;
        let _ = FIRST_GUEST_LINE_TSC.compare_exchange(
            0,
            crate::arch::cpu::rdtsc(),
            core::sync::atomic::Ordering::Relaxed,
            core::sync::atomic::Ordering::Relaxed,
        );
        crate::println!("[{}] {}", self.name, s);
        self.last_line = s;
    }

    fn hypercall(&mut self, idx: usize) -> bool {
        let r = *self.vcpus[idx].regs();
        let (ret, keep_running) = match r.rax {
            hypercall::VERSION => {
                self.vcpus[idx].regs().rdi = 0;
                (1, true)
            }
            hypercall::CONSOLE_WRITE => {
                let len = r.rsi.min(512);
                let mut buf = alloc::vec![0u8; len as usize];
                if self.read_guest(r.rdi, &mut buf) {
                    for b in buf {
                        self.serial_byte(b);
                    }
                    (hypercall::OK, true)
                } else {
                    (hypercall::ERR_INVALID, true)
                }
            }
            hypercall::YIELD => (hypercall::OK, false),
            hypercall::GPU_REGISTER_BUFFER => {
                match self
                    .port
                    .as_ref()
                    .and_then(|p| p.register_buffer(r.rdi, r.rsi))
                {
                    Some(handle) => {
                        self.vcpus[idx].regs().rdi = handle;
                        let reach = crate::gpupv::gpu_can_reach(self.mem_base + r.rdi);
                        info!("zero-copy buffer {handle}: GPU can reach it: {reach:?}");
                        (hypercall::OK, true)
                    }
                    None => {
                        warn!("zero-copy buffer refused: guest {:#x}+{:#x}", r.rdi, r.rsi);
                        (hypercall::ERR_INVALID, true)
                    }
                }
            }
            hypercall::GPU_UNREGISTER_BUFFER => {
                if self
                    .port
                    .as_ref()
                    .is_some_and(|p| p.unregister_buffer(r.rdi))
                {
                    (hypercall::OK, true)
                } else {
                    (hypercall::ERR_INVALID, true)
                }
            }
            hypercall::VCPU_START => {
                let target = r.rdi as usize;
                if target == 0 || target >= self.vcpus.len() || self.started[target] {
                    (hypercall::ERR_INVALID, true)
                } else {
                    let t = &mut self.vcpus[target];
                    t.set_rip(r.rsi);
                    t.set_rsp(r.rdx);
                    t.regs().rdi = r.rcx;
                    self.started[target] = true;
                    info!("vcpu{target} started at {:#x}", r.rsi);
                    (hypercall::OK, true)
                }
            }
            hypercall::SHUTDOWN => {
                info!("guest requested shutdown with code {}", r.rdi);
                self.state = VmState::Stopped(StopReason::Shutdown(r.rdi));
                (hypercall::OK, false)
            }
            _ => (hypercall::ERR_UNKNOWN, true),
        };
        self.vcpus[idx].regs().rax = ret;
        keep_running
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Off the GPU first: its memory must be unreachable before it is freed.
        drop(self.port.take());
        self.vcpus.clear();
        frames::free(self.mem_base, (self.mem_size / 4096) as usize);
    }
}
