//! Virtual machines: creation from the boot configuration (memory, nested paging,
//! the guest image, the guest ABI's page tables, GDT and boot-info page), the exit
//! handlers written once against [`VmExit`], and teardown that returns every frame.
//!
//! Here: the [`Vm`], its creation, its vCPU slices and interrupt delivery. In the
//! submodules: `load` (the ELF image and the guest ABI's boot state), `exits` (the
//! exit dispatcher and MMIO emulation), `io` (port I/O: PCI configuration, COM1;
//! what the virtual GPU asks of its port), `hypercalls`.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use gpu_pv::abi::guest;
use gpu_pv::memory::{Gpa, GuestMemory, Hpa};
use log::{info, warn};
use vdev::platform::Platform;
use vdev::vgpu::VirtioGpuDevice;
use vdev::vlapic::VLapic;

use crate::mm::frames;
use crate::virt::npt::{Format, NestedTables, Perm};
use crate::virt::{self, Backend, StartState, Vcpu, VmExit};
use crate::vm_context;

mod exits;
mod hypercalls;
mod io;
mod load;

const TWO_MIB: u64 = 2 << 20;
/// Accesses to ports no device implements that a VM may make in one second before
/// it is stopped as a storm (emulated ports, COM1 and PCI, do not count).
pub const IO_STORM_PER_SECOND: u64 = 1_000;
/// How long a vCPU may spin with interrupts off (never exiting on its own) before
/// the VM is stopped as hung.
pub const STUCK_LIMIT_US: u64 = 1_000_000;
/// The same for a Linux guest: its decompressor and early boot run with interrupts
/// off and without an exit for seconds under QEMU, minutes under Bochs (a stuck
/// vCPU costs only its own VM's CPU share meanwhile).
pub const LINUX_STUCK_LIMIT_US: u64 = 600_000_000;
/// How long a halted vCPU whose VM has GPU work in flight is polled for before it
/// gives up its slice (see `Vm::halt_poll`).
pub const HALT_POLL_US: u64 = 1_000;
// The MP table a Linux guest reads names the I/O APIC where the platform has it.
const _: () = assert!(vdev::platform::IOAPIC_BASE == linux_boot::mptable::IOAPIC_ADDR);

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
    /// Spun with interrupts off for longer than [`STUCK_LIMIT_US`] ([`LINUX_STUCK_LIMIT_US`]
    /// for a Linux guest).
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
    /// Exits by reason (`VmExit::REASONS`).
    pub exits_by_reason: [u64; VmExit::REASONS.len()],
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
    /// For a Linux guest (the image is its bzImage): its initrd and command line.
    pub linux: Option<LinuxSpec>,
}

/// What a Linux guest boots with besides its kernel.
#[derive(Clone, Copy, Debug)]
pub struct LinuxSpec {
    /// Its initial RAM disk.
    pub initrd: Option<&'static [u8]>,
    /// Its command line.
    pub cmdline: &'static [u8],
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
    /// COM1 and the I/O APIC.
    platform: Platform,
    /// Each vCPU's IA32_PAT as it last wrote it.
    pat: Vec<u64>,
    halted: Vec<bool>,
    /// Secondary vCPUs stay parked until the guest starts them (VCPU_START).
    started: Vec<bool>,
    pci_addr: u32,
    io_window: (u64, u64),
    stuck_us: u64,
    /// Whether it runs a Linux kernel (rather than an ELF guest of this ABI).
    linux: bool,
    /// Its paravirtual GPU, when the mediator runs and a scanout is free for it.
    gpu: Option<VirtioGpuDevice>,
    /// Its port to the shared GPU (with `gpu`).
    port: Option<crate::gpu_share::GpuPort>,
    /// When it was created (host microseconds).
    created_us: u64,
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
    /// A Linux kernel that cannot boot as configured.
    Linux(linux_boot::BootError),
    /// The backend refused.
    Backend(&'static str),
}

impl core::fmt::Display for CreateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CreateError::OutOfMemory => write!(f, "not enough memory"),
            CreateError::BadImage(why) => write!(f, "bad guest image: {why}"),
            CreateError::BadConfig(why) => write!(f, "bad configuration: {why}"),
            CreateError::Linux(why) => write!(f, "Linux kernel: {why}"),
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
            // The I/O APIC's id follows the vCPUs' APIC ids, as the MP table says.
            platform: Platform::new(spec.vcpus.max(1) as u8),
            pat: Vec::new(),
            halted: Vec::new(),
            started: Vec::new(),
            pci_addr: 0,
            io_window: (0, 0),
            stuck_us: 0,
            linux: spec.linux.is_some(),
            gpu: None,
            port: None,
            created_us: crate::apic::now_us(),
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
        let start = match spec.linux {
            Some(linux) => vm.load_linux(image, &linux, spec.vcpus.max(1))?,
            None => {
                let entry = vm.load_elf(image)?;
                vm.write_guest_abi(spec);
                StartState {
                    rip: entry,
                    rsp: guest::STACK_TOP,
                    rdi: guest::BOOT_INFO,
                    rsi: 0,
                    cr3: guest::PML4,
                    gdt_base: guest::GDT,
                    gdt_limit: 23,
                }
            }
        };
        let mem = vm.memory();
        if let Some(port) = crate::gpu_share::add_vm(
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
            // The power-on default: WB, WT, UC-, UC, repeated.
            vm.pat.push(0x0007_0406_0007_0406);
            vm.halted.push(false);
            vm.started.push(vm.vcpus.is_empty());
            vm.vcpus.push(v);
        }
        Ok(vm)
    }

    /// Where each vCPU's interrupts stand (halted, its local APIC) and its GPU's
    /// (commands unanswered, interrupts waiting, MSI-X messages held), for the
    /// end-of-run report: why a VM sits idle.
    pub fn interrupt_report(&self) -> String {
        let mut s = String::new();
        for (i, l) in self.lapics.iter().enumerate() {
            let halted = self.halted.get(i).copied().unwrap_or(false);
            s += &alloc::format!("vcpu{i}: halted {halted}, {}; ", l.summary());
        }
        if let Some(p) = self.port.as_ref() {
            s += &alloc::format!(
                "gpu: unanswered {}, interrupts waiting {}, released {}",
                p.has_work(),
                p.has_interrupts(),
                self.gpu.as_ref().is_some_and(|d| d.has_released())
            );
        }
        s
    }

    /// Its exits by reason, with their rate per second of its life so far (the
    /// reasons that never happened left out), for the end-of-run report.
    pub fn exit_report(&self) -> String {
        let secs_x10 = crate::apic::now_us().saturating_sub(self.created_us) / 100_000;
        let mut s = alloc::format!("over {}.{} s:", secs_x10 / 10, secs_x10 % 10);
        for (name, &n) in VmExit::REASONS.iter().zip(&self.stats.exits_by_reason) {
            if n > 0 {
                s += &alloc::format!(" {name} {n} ({}/s)", n * 10 / secs_x10.max(1));
            }
        }
        s
    }

    /// Whether its GPU has interrupts waiting, readable without the VM's lock.
    pub fn pending_gpu_interrupts(&self) -> Option<crate::gpu_share::PendingGpuInterrupts> {
        self.port.as_ref().map(|p| p.pending_interrupts())
    }

    /// The VM's RAM as a checked guest-memory view (what the mediator gets too).
    pub fn memory(&self) -> crate::gpu_share::VmMemory {
        crate::gpu_share::VmMemory {
            // Where the frame allocator put the VM's RAM.
            base: Hpa::new(self.mem_base),
            size: self.mem_size,
        }
    }

    /// Copies guest memory out, checked against the VM's RAM. `gpa` is a raw
    /// guest-physical address as the guest gave it (a register, a page-table
    /// entry): it becomes a [`Gpa`] here and is checked by the read.
    pub fn read_guest(&mut self, gpa: u64, out: &mut [u8]) -> bool {
        GuestMemory::read(&self.memory(), Gpa::new(gpa), out).is_ok()
    }

    /// Copies into guest memory, checked against the VM's RAM; `gpa` is raw, as
    /// for [`read_guest`](Self::read_guest) (an ELF load address, a boot-info field).
    fn write_guest(&mut self, gpa: u64, data: &[u8]) -> bool {
        GuestMemory::write(&mut self.memory(), Gpa::new(gpa), data).is_ok()
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
        let _ = crate::gpu_share::service();
        if !self.port.as_ref().is_some_and(|p| p.has_work()) {
            return false;
        }
        let until = (crate::apic::now_us() + HALT_POLL_US).min(slice_deadline);
        loop {
            let _ = crate::gpu_share::service();
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
                && ((crate::console::waiting_for(usize::from(self.id))
                    && self.platform.com1.can_receive())
                    || self.port.as_ref().is_some_and(|p| p.has_interrupts())
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
        let lapic = &self.lapics[idx];
        // A timer that already fired into the IRR (seen while the guest could not
        // take it) has no deadline left but must still wake the vCPU.
        if lapic.pending().is_some() {
            return 0;
        }
        lapic.deadline_us().unwrap_or(u64::MAX)
    }

    /// Delivers a pending virtual interrupt, or asks for an interrupt window.
    fn deliver_interrupts(&mut self, idx: usize, now: u64) {
        if idx == 0 {
            self.collect_gpu_interrupts();
            // Console input, as fast as the guest's UART takes it.
            while self.platform.com1.can_receive() {
                let Some(b) = crate::console::take(usize::from(self.id)) else {
                    break;
                };
                self.platform.com1_receive(b, &mut self.lapics);
            }
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
            self.stats.exits_by_reason[exit.reason()] += 1;
            let after = crate::apic::now_us();
            if matches!(exit, VmExit::ExternalInterrupt | VmExit::Preempted)
                && self.vcpus[idx].rflags() & (1 << 9) == 0
            {
                self.stuck_us += after.saturating_sub(now);
                let limit = if self.linux {
                    LINUX_STUCK_LIMIT_US
                } else {
                    STUCK_LIMIT_US
                };
                if self.stuck_us > limit {
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
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Off the GPU first: its memory must be unreachable before it is freed.
        drop(self.port.take());
        self.vcpus.clear();
        frames::free(self.mem_base, (self.mem_size / 4096) as usize);
    }
}
