//! Virtual machines: creation from the boot configuration (memory, nested paging,
//! the guest image, the guest ABI's page tables, GDT and boot-info page), the exit
//! handlers written once against [`VmExit`], and teardown that returns every frame.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use gpu_pv::abi::{guest, hypercall};
use log::{info, warn};

use crate::mm::{frames, phys_to_ptr};
use crate::virt::npt::{Format, NestedTables, Perm};
use crate::virt::{self, Backend, StartState, Vcpu, VmExit};
use crate::vm_context;

const TWO_MIB: u64 = 2 << 20;
/// Exits a VM may cause per vCPU run before it is considered a storm and stopped.
pub const EXIT_STORM_LIMIT: u64 = 200_000;

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
    /// Too many exits without progress.
    ExitStorm,
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
}

/// One virtual machine.
pub struct Vm {
    /// Index in configuration order.
    pub id: u16,
    /// Name (leaked once per VM slot: log lines carry it).
    pub name: &'static str,
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

impl Vm {
    /// Creates a VM: allocates and scrubs its RAM, builds nested paging, loads `image`,
    /// writes the guest ABI structures, and creates its vCPUs (only the first starts).
    pub fn create(backend: Backend, id: u16, spec: &VmSpec, image: &[u8]) -> Result<Vm, CreateError> {
        if spec.memory_mib < guest::MIN_MEMORY_MIB {
            return Err(CreateError::BadConfig("memory below the guest ABI minimum (4 MiB)"));
        }
        let mem_size = u64::from(spec.memory_mib) << 20;
        let pages = (mem_size / 4096) as usize;
        let mem_base =
            frames::alloc_contiguous(pages, TWO_MIB, u64::MAX).ok_or(CreateError::OutOfMemory)?;
        let name: &'static str = Box::leak(spec.name.clone().into_boxed_str());
        let mut vm = Vm {
            id,
            name,
            log_id: vm_context::register(name),
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
        };
        // From here on, dropping `vm` returns its frames.
        vm.nested
            .map(0, mem_base, mem_size, Perm { write: true, exec: true })
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
        let root = vm.nested.root_pointer();
        for _ in 0..spec.vcpus.max(1) {
            let v = virt::create_vcpu(backend, root, id + 1, &start).map_err(CreateError::Backend)?;
            vm.vcpus.push(v);
        }
        Ok(vm)
    }

    fn guest_slice(&mut self, gpa: u64, len: u64) -> Option<&mut [u8]> {
        let end = gpa.checked_add(len)?;
        if end > self.mem_size {
            return None;
        }
        // SAFETY: inside this VM's RAM, which the hypervisor owns and identity maps.
        Some(unsafe { core::slice::from_raw_parts_mut(phys_to_ptr::<u8>(self.mem_base + gpa), len as usize) })
    }

    /// Copies guest memory out, checked against the VM's RAM.
    pub fn read_guest(&mut self, gpa: u64, out: &mut [u8]) -> bool {
        match self.guest_slice(gpa, out.len() as u64) {
            Some(s) => {
                out.copy_from_slice(s);
                true
            }
            None => false,
        }
    }

    fn write_guest(&mut self, gpa: u64, data: &[u8]) -> bool {
        match self.guest_slice(gpa, data.len() as u64) {
            Some(s) => {
                s.copy_from_slice(data);
                true
            }
            None => false,
        }
    }

    fn load_elf(&mut self, image: &[u8]) -> Result<u64, CreateError> {
        use elf::abi::{EM_X86_64, PT_LOAD};
        use elf::endian::LittleEndian;
        let file = elf::ElfBytes::<LittleEndian>::minimal_parse(image)
            .map_err(|_| CreateError::BadImage("not an ELF file"))?;
        if file.ehdr.class != elf::file::Class::ELF64 || file.ehdr.e_machine != EM_X86_64 {
            return Err(CreateError::BadImage("not an x86_64 ELF64 image"));
        }
        let segs = file.segments().ok_or(CreateError::BadImage("no program headers"))?;
        let mut loaded = false;
        for p in segs.iter().filter(|p| p.p_type == PT_LOAD && p.p_memsz > 0) {
            let end = p.p_paddr.checked_add(p.p_memsz).ok_or(CreateError::BadImage("segment overflows"))?;
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
        if let Some(v) = self.vcpus.get(vcpu) {
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

    /// Runs vCPU `idx` for one slice of `slice_us` (0: until it stops); returns when the
    /// slice is over, the vCPU blocks, or the VM stops.
    pub fn run_slice(&mut self, idx: usize, slice_us: u64) {
        vm_context::set(Some(self.log_id));
        let t0 = crate::apic::now_us();
        let deadline = if slice_us == 0 { u64::MAX } else { t0 + slice_us };
        let mut exits_this_run = 0u64;
        self.stats.runs += 1;
        while self.state == VmState::Running {
            let Some(v) = self.vcpus.get_mut(idx) else { break };
            let left = deadline.saturating_sub(crate::apic::now_us());
            if left == 0 {
                break;
            }
            v.set_time_slice(if slice_us == 0 { 0 } else { left.max(50) });
            let exit = v.run();
            self.stats.exits += 1;
            exits_this_run += 1;
            if exits_this_run > EXIT_STORM_LIMIT {
                self.stop(idx, StopReason::ExitStorm);
                break;
            }
            if !self.handle_exit(idx, exit) {
                break;
            }
        }
        if let Some(v) = self.vcpus.get_mut(idx) {
            v.put();
        }
        self.stats.cpu_us += crate::apic::now_us().saturating_sub(t0);
        vm_context::set(None);
    }

    /// Handles one exit; returns false when the vCPU should give up the CPU.
    fn handle_exit(&mut self, idx: usize, exit: VmExit) -> bool {
        match exit {
            VmExit::Io(io) => {
                self.stats.io_exits += 1;
                if io.string || io.rep {
                    self.stop(idx, StopReason::Unhandled(alloc::format!("string port I/O to {:#x}", io.port)));
                    return false;
                }
                let v = &mut self.vcpus[idx];
                if io.input {
                    let val = match io.port {
                        0x3fd => 0x60, // COM1 LSR: transmitter empty
                        _ => 0xffff_ffff,
                    };
                    let mask = match io.size {
                        1 => 0xff,
                        2 => 0xffff,
                        _ => 0xffff_ffff,
                    };
                    let r = v.regs();
                    r.rax = (r.rax & !mask) | (val & mask);
                } else if io.port == 0x3f8 {
                    let b = v.regs().rax as u8;
                    self.serial_byte(b);
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
                let r = v.regs();
                let (leaf, sub) = (r.rax as u32, r.rcx as u32);
                let mut res = crate::arch::cpu::cpuid(leaf, sub);
                match leaf {
                    1 => {
                        res.ecx &= !(1 << 5); // no VMX
                        res.ecx |= 1 << 31; // hypervisor present
                    }
                    0x8000_0001 => res.ecx &= !(1 << 2), // no SVM
                    0x4000_0000 => {
                        let sig = *b"GPUPVHVGPUPV";
                        res.eax = 0x4000_0000;
                        res.ebx = u32::from_le_bytes(sig[0..4].try_into().unwrap_or_default());
                        res.ecx = u32::from_le_bytes(sig[4..8].try_into().unwrap_or_default());
                        res.edx = u32::from_le_bytes(sig[8..12].try_into().unwrap_or_default());
                    }
                    _ => {}
                }
                r.rax = u64::from(res.eax);
                r.rbx = u64::from(res.ebx);
                r.rcx = u64::from(res.ecx);
                r.rdx = u64::from(res.edx);
                v.skip(2);
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
                }
                false
            }
            VmExit::InterruptWindow => {
                self.vcpus[idx].set_interrupt_window(false);
                true
            }
            VmExit::ExternalInterrupt | VmExit::Preempted => true,
            VmExit::Shutdown => {
                self.stop(idx, StopReason::TripleFault);
                false
            }
            VmExit::NestedPageFault { gpa, write, .. } => {
                if gpa >= self.mem_size {
                    let _ = write;
                    self.stop(idx, StopReason::OutsideMemory(gpa));
                } else {
                    self.stop(idx, StopReason::Unhandled(alloc::format!("nested fault inside RAM at {gpa:#x}")));
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
                self.stop(idx, StopReason::Unhandled(alloc::format!("exit code {code:#x}")));
                false
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
            let _ = s.write_char(if (0x20..0x7f).contains(&c) { c as char } else { '.' });
        }
        self.serial_line.clear();
        self.lines_printed += 1;
        crate::println!("[{}] {}", self.name, s);
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
        self.vcpus.clear();
        frames::free(self.mem_base, (self.mem_size / 4096) as usize);
    }
}
