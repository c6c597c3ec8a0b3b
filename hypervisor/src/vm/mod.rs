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
use core::sync::atomic::{AtomicU64, Ordering};

use gpu_pv::abi::guest;
use gpu_pv::memory::{Gpa, GuestMemory, Hpa};
use log::{info, warn};
use vdev::platform::Platform;
use vdev::vgpu::VirtioGpuDevice;
use vdev::vlapic::VLapic;

use crate::mm::frames;
use crate::virt::cpu_state::{CpuState, Extras};
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
/// vCPU costs only its own VM's CPU share meanwhile). `linux_stuck_s=N` on the
/// command line sets it (see [`set_linux_stuck_limit_s`]).
pub const LINUX_STUCK_LIMIT_US: u64 = 600_000_000;
static LINUX_STUCK_US: AtomicU64 = AtomicU64::new(LINUX_STUCK_LIMIT_US);

/// Sets how long a Linux VM's vCPU may run with interrupts off before it is stopped.
pub fn set_linux_stuck_limit_s(s: u64) {
    LINUX_STUCK_US.store(s.max(1).saturating_mul(1_000_000), Ordering::Relaxed);
}
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
    /// Spun with interrupts off for longer than [`STUCK_LIMIT_US`] (`linux_stuck_s`, by default [`LINUX_STUCK_LIMIT_US`],
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
    /// The most of its vCPUs seen in guest mode at once (on different CPUs).
    pub most_in_guest: u64,
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
    /// Its CMOS real-time clock.
    rtc: vdev::rtc::Rtc,
    /// Each vCPU's IA32_PAT as it last wrote it.
    pat: Vec<u64>,
    halted: Vec<bool>,
    /// Secondary vCPUs stay parked until the guest starts them (VCPU_START, or
    /// INIT and STARTUP IPIs).
    started: Vec<bool>,
    /// Each vCPU's INIT/STARTUP state, applied by the vCPU's own next entry.
    startup: Vec<Startup>,
    /// The physical CPU each vCPU is in guest mode on, with the VM unlocked (its
    /// [`Vcpu`] is then with that CPU and `vcpus` holds a [`Parked`] in its place).
    in_guest: Vec<Option<usize>>,
    /// One [`Parked`] stand-in per vCPU, swapped into `vcpus` while it runs.
    spare: Vec<Option<Box<dyn Vcpu>>>,
    /// When each vCPU next has work (host us; 0: now, `u64::MAX`: never), shared with
    /// the scheduler, which reads it without the VM's lock.
    wake: &'static [AtomicU64],
    pci_addr: u32,
    io_window: (u64, u64),
    /// How long each vCPU has run with interrupts off.
    stuck_us: Vec<u64>,
    /// Whether it runs a Linux kernel (rather than an ELF guest of this ABI).
    linux: bool,
    /// Its paravirtual GPU, when the mediator runs and a scanout is free for it.
    gpu: Option<VirtioGpuDevice>,
    /// Its port to the shared GPU (with `gpu`).
    port: Option<crate::gpu_share::GpuPort>,
    /// When it was created (host microseconds).
    created_us: u64,
}

/// Where a vCPU stands with INIT and STARTUP IPIs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Startup {
    /// Running (or parked for VCPU_START): STARTUP IPIs are ignored.
    Running,
    /// An INIT arrived: the vCPU stops at its next entry and waits for STARTUP.
    InitPending,
    /// Waiting for a STARTUP IPI (after INIT, or never started).
    Waiting,
    /// A STARTUP IPI with this page arrived: the vCPU starts there at its next entry.
    Due(u8),
}

/// The stand-in [`Vm::vcpus`] holds for a vCPU that is in guest mode on some CPU
/// while the VM is unlocked: nothing but that vCPU's own exit handling touches a
/// vCPU's registers, so nothing should ever reach it; if something does, it reads
/// zeros and writes nowhere.
struct Parked {
    regs: virt::GuestRegs,
    cpu_state: CpuState,
}

impl Parked {
    fn boxed() -> Result<Box<dyn Vcpu>, CreateError> {
        let cpu_state = CpuState::new(Extras::DebugAddresses).map_err(CreateError::Backend)?;
        Ok(Box::new(Parked {
            regs: virt::GuestRegs::default(),
            cpu_state,
        }))
    }
}

impl Vcpu for Parked {
    fn run(&mut self) -> VmExit {
        VmExit::EntryFailed(0)
    }
    fn regs(&mut self) -> &mut virt::GuestRegs {
        &mut self.regs
    }
    fn rip(&self) -> u64 {
        0
    }
    fn set_rip(&mut self, _: u64) {}
    fn rsp(&self) -> u64 {
        0
    }
    fn set_rsp(&mut self, _: u64) {}
    fn rflags(&self) -> u64 {
        0x2
    }
    fn cr3(&self) -> u64 {
        0
    }
    fn interruptible(&self) -> bool {
        false
    }
    fn inject_interrupt(&mut self, _: u8) {}
    fn inject_exception(&mut self, _: u8, _: Option<u32>) {}
    fn set_interrupt_window(&mut self, _: bool) {}
    fn set_time_slice(&mut self, _: u64) {}
    fn cpl(&self) -> u8 {
        0
    }
    fn cr0(&self) -> u64 {
        0
    }
    fn cr4(&self) -> u64 {
        0
    }
    fn efer(&self) -> u64 {
        0
    }
    fn set_efer(&mut self, _: u64) {}
    fn start_up(&mut self, _: u8) -> Result<(), &'static str> {
        Err("the vCPU is running elsewhere")
    }
    fn cpu_state(&mut self) -> &mut CpuState {
        &mut self.cpu_state
    }
}

/// One slice of one vCPU in progress (see [`Vm::begin_slice`]).
pub struct Slice {
    idx: usize,
    t0: u64,
    deadline: u64,
    slice_us: u64,
    polled: bool,
    /// When the vCPU last entered the guest.
    entered: u64,
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
    /// `wake` has one entry per vCPU: the scheduler's view of when each has work.
    pub fn create(
        backend: Backend,
        id: u16,
        spec: &VmSpec,
        image: &[u8],
        wake: &'static [AtomicU64],
    ) -> Result<Vm, CreateError> {
        if wake.len() < spec.vcpus.max(1) as usize {
            return Err(CreateError::BadConfig(
                "more vCPUs than the scheduler has room for",
            ));
        }
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
            rtc: {
                let now = crate::apic::now_us();
                vdev::rtc::Rtc::new(crate::host_clock::unix_at(now), now)
            },
            pat: Vec::new(),
            halted: Vec::new(),
            started: Vec::new(),
            startup: Vec::new(),
            in_guest: Vec::new(),
            spare: Vec::new(),
            wake,
            pci_addr: 0,
            io_window: (0, 0),
            stuck_us: Vec::new(),
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
            let first = vm.vcpus.is_empty();
            vm.started.push(first);
            vm.startup.push(if first {
                Startup::Running
            } else {
                Startup::Waiting
            });
            vm.in_guest.push(None);
            vm.stuck_us.push(0);
            vm.spare.push(Some(Parked::boxed()?));
            let i = vm.vcpus.len();
            vm.vcpus.push(v);
            vm.wake[i].store(vm.wake_time(i), Ordering::Relaxed);
        }
        Ok(vm)
    }

    /// Where each vCPU's interrupts stand (halted, its local APIC) and its GPU's
    /// (commands unanswered, interrupts waiting, MSI-X messages held), for the
    /// end-of-run report: why a VM sits idle.
    pub fn interrupt_report(&self) -> String {
        let mut s = alloc::format!(
            "{} vCPU(s), at most {} in guest mode at once; ",
            self.vcpus.len(),
            self.stats.most_in_guest
        );
        for (i, l) in self.lapics.iter().enumerate() {
            let halted = self.halted.get(i).copied().unwrap_or(false);
            // Where it is (a vCPU in guest mode elsewhere shows its stand-in's 0).
            let rip = self.vcpus.get(i).map_or(0, |v| v.rip());
            s += &alloc::format!("vcpu{i}: rip {rip:#x}, halted {halted}, {}; ", l.summary());
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
        // Per vCPU: its VMCB or VMCS, its FPU state area and its stand-in's.
        (self.mem_size / 4096) as usize + self.nested.table_frames() + 3 * self.vcpus.len()
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
        self.kick_running();
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
    /// virtual GPU, delivered to the local APICs their addresses name.
    fn collect_gpu_interrupts(&mut self) {
        let Some(dev) = self.gpu.as_mut() else { return };
        // Messages held pending while their MSI-X entry (or the function) was masked,
        // released by the driver's unmask.
        for message in dev.take_released() {
            vdev::platform::route(message, &mut self.lapics);
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
            if let Some(message) = dev.raise(entry, config) {
                vdev::platform::route(message, &mut self.lapics);
            }
        }
    }

    /// When vCPU `idx` next has work (host microseconds): 0 when runnable now,
    /// its timer deadline when halted, `u64::MAX` when halted with nothing armed or
    /// not started.
    pub fn wake_time(&self, idx: usize) -> u64 {
        match self.startup.get(idx) {
            Some(Startup::InitPending | Startup::Due(_)) => return 0,
            _ if !self.started.get(idx).copied().unwrap_or(false) => return u64::MAX,
            _ => {}
        }
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

    /// Which vCPUs have an interrupt waiting (bit n: vCPU n), to see what an exit
    /// raised in the others.
    fn pending_mask(&self) -> u64 {
        if self.lapics.len() < 2 {
            return 0;
        }
        self.lapics
            .iter()
            .take(64)
            .enumerate()
            .filter(|(_, l)| l.pending().is_some())
            .fold(0, |m, (i, _)| m | (1 << i))
    }

    /// Makes the other vCPUs with an interrupt newly waiting (pending now, not in
    /// `before`) take it: one in guest mode on another CPU is made to exit (a host
    /// IPI to that CPU); one halted or off a CPU becomes runnable for the scheduler.
    fn notify(&self, me: usize, before: u64) {
        let now = self.pending_mask() & !before & !(1u64 << me);
        self.wake_vcpus(now);
    }

    /// Gets the vCPUs in `mask` to look at their state soon (see [`notify`](Self::notify)).
    fn wake_vcpus(&self, mask: u64) {
        for j in (0..self.vcpus.len().min(64)).filter(|j| mask & (1 << j) != 0) {
            match self.in_guest[j] {
                Some(cpu) => crate::interrupts::wake_cpu(cpu),
                None => self.wake[j].store(0, Ordering::Relaxed),
            }
        }
    }

    /// An INIT or STARTUP IPI from vCPU `from` to the vCPUs in `targets`: recorded for
    /// each target, which acts on it at its next entry (SDM 3 8.4.4.1: a STARTUP
    /// reaches only a CPU waiting for one).
    fn start_ipi(&mut self, from: usize, targets: u64, init: bool, vector: u8) {
        let mut woken = 0u64;
        for j in (0..self.vcpus.len().min(64)).filter(|j| targets & (1 << j) != 0) {
            let s = &mut self.startup[j];
            *s = match (*s, init) {
                (_, true) => Startup::InitPending,
                (Startup::InitPending | Startup::Waiting, false) => Startup::Due(vector),
                (other, false) => other,
            };
            if j != from {
                woken |= 1 << j;
            }
        }
        self.wake_vcpus(woken);
    }

    /// Acts on vCPU `idx`'s INIT or STARTUP (see [`start_ipi`](Self::start_ipi)).
    fn apply_startup(&mut self, idx: usize) {
        match self.startup[idx] {
            Startup::InitPending => {
                self.started[idx] = false;
                self.halted[idx] = false;
                self.lapics[idx] = VLapic::new(idx as u32);
                self.startup[idx] = Startup::Waiting;
            }
            Startup::Due(vector) => {
                // INIT and STARTUP came in one go: the reset first.
                self.lapics[idx] = VLapic::new(idx as u32);
                self.pat[idx] = 0x0007_0406_0007_0406;
                self.stuck_us[idx] = 0;
                match self.vcpus[idx].start_up(vector) {
                    Ok(()) => {
                        self.started[idx] = true;
                        self.halted[idx] = false;
                        self.startup[idx] = Startup::Running;
                        info!(
                            "vcpu{idx} started at {:#x} (STARTUP IPI)",
                            u64::from(vector) << 12
                        );
                    }
                    Err(why) => {
                        self.startup[idx] = Startup::Waiting;
                        self.stop(
                            idx,
                            StopReason::Unhandled(alloc::format!("vcpu{idx}: {why}")),
                        );
                    }
                }
            }
            Startup::Running | Startup::Waiting => {}
        }
    }

    /// Delivers a pending virtual interrupt, or asks for an interrupt window.
    fn deliver_interrupts(&mut self, idx: usize, now: u64) {
        let before = self.pending_mask();
        self.collect_gpu_interrupts();
        // Console input, as fast as the guest's UART takes it.
        while self.platform.com1.can_receive() {
            let Some(b) = crate::console::take(usize::from(self.id)) else {
                break;
            };
            self.platform.com1_receive(b, &mut self.lapics);
        }
        self.notify(idx, before);
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

    /// Starts a slice of vCPU `idx` of `slice_us` (0: until it stops), or returns
    /// `None` when it has nothing to run. The slice then alternates
    /// [`enter`](Self::enter), the guest running with the VM unlocked, and
    /// [`exited`](Self::exited), and ends with [`end_slice`](Self::end_slice), all on
    /// this CPU: so the vCPUs of one VM run in guest mode on several CPUs at once and
    /// share the VM's lock only to handle their exits.
    pub fn begin_slice(&mut self, idx: usize, slice_us: u64) -> Option<Slice> {
        if idx >= self.vcpus.len() {
            return None;
        }
        self.apply_startup(idx);
        if !self.ready(idx) {
            self.wake[idx].store(self.wake_time(idx), Ordering::Relaxed);
            return None;
        }
        vm_context::set(Some(self.log_id));
        // While vCPU 0 runs, its VM's GPU queues are polled instead of trapping kicks.
        let polled = idx == 0
            && self
                .port
                .as_ref()
                .filter(|_| self.gpu.as_ref().is_some_and(|d| d.live()))
                .inspect(|port| port.slice_begin(true))
                .is_some();
        let t0 = crate::apic::now_us();
        self.stats.runs += 1;
        Some(Slice {
            idx,
            t0,
            deadline: if slice_us == 0 {
                u64::MAX
            } else {
                t0 + slice_us
            },
            slice_us,
            polled,
            entered: t0,
        })
    }

    /// Prepares the next entry of the slice's vCPU: delivers its interrupts, bounds
    /// its run by the slice and its timer, and hands out the vCPU to run with the VM
    /// unlocked (`None`: the slice is over). The VM keeps a stand-in meanwhile and
    /// knows which CPU runs it, to make it exit when another vCPU sends it an
    /// interrupt; [`exited`](Self::exited) takes it back.
    pub fn enter(&mut self, slice: &mut Slice) -> Option<Box<dyn Vcpu>> {
        let idx = slice.idx;
        if self.state != VmState::Running {
            return None;
        }
        self.apply_startup(idx);
        if !self.started[idx] {
            return None;
        }
        let now = crate::apic::now_us();
        let left = slice.deadline.saturating_sub(now);
        if left == 0 {
            return None;
        }
        self.deliver_interrupts(idx, now);
        let until_timer = self.lapics[idx]
            .deadline_us()
            .map_or(u64::MAX, |d| d.saturating_sub(now));
        self.vcpus[idx].set_time_slice(if slice.slice_us == 0 {
            0
        } else {
            left.min(until_timer).max(50)
        });
        let stand_in = self.spare[idx].take()?;
        let v = core::mem::replace(&mut self.vcpus[idx], stand_in);
        self.in_guest[idx] = Some(crate::arch::cpu::current_index());
        let in_guest = self.in_guest.iter().flatten().count() as u64;
        self.stats.most_in_guest = self.stats.most_in_guest.max(in_guest);
        slice.entered = now;
        Some(v)
    }

    /// Takes back the vCPU [`enter`](Self::enter) handed out, after it exited with
    /// `exit`, and handles the exit; returns whether the slice goes on.
    /// `others_ready` says whether another vCPU waits for a CPU (a halted vCPU
    /// stops polling for its GPU then).
    pub fn exited(
        &mut self,
        slice: &mut Slice,
        v: Box<dyn Vcpu>,
        exit: VmExit,
        others_ready: fn() -> bool,
    ) -> bool {
        let idx = slice.idx;
        self.spare[idx] = Some(core::mem::replace(&mut self.vcpus[idx], v));
        self.in_guest[idx] = None;
        self.stats.exits += 1;
        self.stats.exits_by_reason[exit.reason()] += 1;
        if self.state != VmState::Running {
            // Paused, stopped or being destroyed while it ran: the exit is not handled
            // (its instruction was not completed, so it runs again after a resume).
            return false;
        }
        let after = crate::apic::now_us();
        if matches!(exit, VmExit::ExternalInterrupt | VmExit::Preempted)
            && self.vcpus[idx].rflags() & (1 << 9) == 0
        {
            self.stuck_us[idx] += after.saturating_sub(slice.entered);
            let limit = if self.linux {
                LINUX_STUCK_US.load(Ordering::Relaxed)
            } else {
                STUCK_LIMIT_US
            };
            if self.stuck_us[idx] > limit {
                self.stop(idx, StopReason::StuckInterruptsOff);
                return false;
            }
        } else {
            self.stuck_us[idx] = 0;
        }
        let before = self.pending_mask();
        let go_on = self.handle_exit(idx, exit);
        self.notify(idx, before);
        if go_on {
            return self.state == VmState::Running;
        }
        self.halt_poll(idx, slice.deadline, others_ready)
    }

    /// Ends the slice: the vCPU leaves this CPU. Returns the slice's length (us).
    pub fn end_slice(&mut self, slice: Slice) -> u64 {
        if let Some(v) = self.vcpus.get_mut(slice.idx) {
            v.put();
        }
        if let Some(port) = self.port.as_ref().filter(|_| slice.polled) {
            port.slice_end();
        }
        let used = crate::apic::now_us().saturating_sub(slice.t0);
        self.stats.cpu_us += used;
        self.wake[slice.idx].store(self.wake_time(slice.idx), Ordering::Relaxed);
        vm_context::set(None);
        used
    }

    /// Makes every vCPU in guest mode on another CPU exit (to see the VM stopped or
    /// paused); returns whether any was.
    pub fn kick_running(&self) -> bool {
        let mut any = false;
        for cpu in self.in_guest.iter().flatten() {
            crate::interrupts::wake_cpu(*cpu);
            any = true;
        }
        any
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
