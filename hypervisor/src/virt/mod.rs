//! Hardware virtualization behind one vendor-neutral interface.
//!
//! [`VmExit`] is the one exit enum every exit handler is written against; [`Vcpu`] is
//! implemented by the AMD SVM backend ([`svm`]) and the Intel VMX backend ([`vmx`]).
//! Nested paging ([`npt`]) builds AMD NPT or Intel EPT tables from the same calls;
//! [`cpu_state`] keeps the CPU state neither backend's hardware switches per vCPU.

pub mod cpu_state;
pub mod cpuid;
pub mod npt;
pub mod svm;
pub mod vmx;

use alloc::boxed::Box;

use cpu_state::CpuState;

/// Guest general-purpose registers: defined in the `vdev` crate (the MMIO decoder
/// reads and writes them) with the `#[repr(C)]` layout the entry assembly uses.
pub use vdev::GuestRegs;

/// A port I/O exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoExit {
    /// Port.
    pub port: u16,
    /// Access size in bytes (1, 2 or 4).
    pub size: u8,
    /// IN (else OUT).
    pub input: bool,
    /// INS/OUTS.
    pub string: bool,
    /// REP prefix.
    pub rep: bool,
    /// Length of the instruction, so the handler can skip it.
    pub len: u8,
}

/// An instruction the backends intercept because running it natively would reach host
/// state or the whole machine; the exit handler decides what the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instruction {
    /// RDTSCP (3 bytes): would read the host's TSC_AUX.
    Rdtscp,
    /// RDPMC (2 bytes): would read the host's performance counters.
    Rdpmc,
    /// WBINVD (2 bytes): flushes every cache of the machine.
    Wbinvd,
    /// INVD (2 bytes): drops every cache line of the machine without writing it back.
    Invd,
    /// MONITOR (3 bytes).
    Monitor,
    /// MWAIT (3 bytes): would idle the physical CPU.
    Mwait,
}

impl Instruction {
    /// Its length without prefixes (SVM without NRIPS reports no length).
    pub fn len(self) -> u64 {
        match self {
            Instruction::Rdpmc | Instruction::Wbinvd | Instruction::Invd => 2,
            Instruction::Rdtscp | Instruction::Monitor | Instruction::Mwait => 3,
        }
    }
}

/// Why the guest stopped running: the one enum all exit handling is written against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// Port I/O.
    Io(IoExit),
    /// Access to guest-physical memory that nested paging does not map (MMIO or
    /// outside the guest's RAM).
    NestedPageFault {
        /// Faulting guest-physical address.
        gpa: u64,
        /// A write.
        write: bool,
        /// An instruction fetch.
        fetch: bool,
    },
    /// VMMCALL / VMCALL (3 bytes).
    Hypercall,
    /// CPUID (2 bytes).
    Cpuid,
    /// XSETBV (3 bytes): the guest writes an extended control register (ECX, EDX:EAX).
    Xsetbv,
    /// An intercepted instruction (see [`Instruction`]).
    Instruction(Instruction),
    /// RDMSR / WRMSR (2 bytes).
    Msr {
        /// WRMSR.
        write: bool,
    },
    /// HLT (1 byte).
    Hlt,
    /// The guest can take an interrupt now (requested with `set_interrupt_window`).
    InterruptWindow,
    /// A host interrupt arrived while the guest ran (the hypervisor's timer: the
    /// vCPU's time slice may be over).
    ExternalInterrupt,
    /// The VMX preemption timer expired.
    Preempted,
    /// Triple fault or shutdown.
    Shutdown,
    /// An intercepted guest exception.
    Exception {
        /// Vector.
        vector: u8,
        /// Error code, if the exception has one.
        error_code: Option<u32>,
    },
    /// The hardware refused the guest state (VMEXIT_INVALID / VM-entry failure).
    EntryFailed(u64),
    /// Any other exit (raw code), handled as a guest error.
    Other(u64),
}

impl VmExit {
    /// The names of the exit reasons [`reason`](Self::reason) numbers, for counters.
    pub const REASONS: [&'static str; 12] = [
        "io",
        "mmio",
        "hypercall",
        "cpuid",
        "xsetbv",
        "instruction",
        "msr",
        "hlt",
        "interrupt-window",
        "host-interrupt",
        "exception",
        "other",
    ];

    /// This exit's index in [`REASONS`](Self::REASONS).
    pub fn reason(&self) -> usize {
        match self {
            VmExit::Io(_) => 0,
            VmExit::NestedPageFault { .. } => 1,
            VmExit::Hypercall => 2,
            VmExit::Cpuid => 3,
            VmExit::Xsetbv => 4,
            VmExit::Instruction(_) => 5,
            VmExit::Msr { .. } => 6,
            VmExit::Hlt => 7,
            VmExit::InterruptWindow => 8,
            VmExit::ExternalInterrupt | VmExit::Preempted => 9,
            VmExit::Exception { .. } => 10,
            VmExit::Shutdown | VmExit::EntryFailed(_) | VmExit::Other(_) => 11,
        }
    }
}

/// A virtual CPU as the exit handlers see it.
pub trait Vcpu: Send {
    /// Enters the guest and runs it until the next exit.
    fn run(&mut self) -> VmExit;
    /// General registers.
    fn regs(&mut self) -> &mut GuestRegs;
    /// Guest RIP.
    fn rip(&self) -> u64;
    /// Sets the guest RIP.
    fn set_rip(&mut self, rip: u64);
    /// Guest RSP.
    fn rsp(&self) -> u64;
    /// Sets the guest RSP.
    fn set_rsp(&mut self, rsp: u64);
    /// Guest RFLAGS.
    fn rflags(&self) -> u64;
    /// Guest CR3 (for the crash report).
    fn cr3(&self) -> u64;
    /// Whether an external interrupt could be delivered now (RFLAGS.IF set, no
    /// interrupt shadow, nothing being injected).
    fn interruptible(&self) -> bool;
    /// Injects external interrupt `vector` at the next entry (call only when
    /// `interruptible`).
    fn inject_interrupt(&mut self, vector: u8);
    /// Injects an exception at the next entry.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>);
    /// Asks for an [`VmExit::InterruptWindow`] exit as soon as the guest can take an interrupt.
    fn set_interrupt_window(&mut self, on: bool);
    /// Bounds the next `run` to about `us` microseconds of guest time (0: no bound).
    fn set_time_slice(&mut self, us: u64);
    /// Called when the vCPU leaves this physical CPU at the end of a slice (it may run
    /// on another CPU next): VMX must VMCLEAR its VMCS here. No-op by default.
    fn put(&mut self) {}
    /// The guest's current privilege level.
    fn cpl(&self) -> u8;
    /// Guest CR0 as the guest sees it.
    fn cr0(&self) -> u64;
    /// Guest CR4 as the guest sees it.
    fn cr4(&self) -> u64;
    /// Guest EFER as the guest sees it (under SVM without SVME).
    fn efer(&self) -> u64;
    /// Sets the guest's EFER to `efer` (already checked by the caller: long mode stays
    /// on).
    fn set_efer(&mut self, efer: u64);
    /// Puts the vCPU in the state a STARTUP IPI gives a CPU waiting for one (after
    /// INIT): real mode at `vector * 4096` (CS = `vector << 8`, IP 0), paging, caches
    /// and interrupts as after INIT, general registers zero (SDM 3 10.4.4, 9.1.1;
    /// APM 2 15.20, 14.1.3). Fails when the backend cannot run real mode.
    fn start_up(&mut self, vector: u8) -> Result<(), &'static str>;
    /// The vCPU's own copy of the state the hardware does not switch (FPU/vector
    /// registers, XCR0, debug registers).
    fn cpu_state(&mut self) -> &mut CpuState;
    /// Skips `len` bytes of the current instruction.
    fn skip(&mut self, len: u64) {
        let r = self.rip();
        self.set_rip(r.wrapping_add(len));
    }
}

/// MSRs a guest reads and writes without an exit, all others exit: FS, GS and kernel
/// GS base; STAR, LSTAR, CSTAR, SFMASK; SYSENTER CS, ESP, EIP. Each backend switches
/// them per vCPU (see `svm.rs` and `vmx.rs`).
pub const PASSED_MSRS: [u32; 10] = [
    0xc000_0100,
    0xc000_0101,
    0xc000_0102,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0x174,
    0x175,
    0x176,
];

/// Which hardware virtualization this machine offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// AMD SVM with nested paging.
    Svm,
    /// Intel VMX with EPT.
    Vmx,
}

/// Detects SVM+NPT or VMX+EPT.
pub fn detect() -> Option<Backend> {
    if svm::supported() {
        Some(Backend::Svm)
    } else if vmx::supported() {
        Some(Backend::Vmx)
    } else {
        None
    }
}

/// Turns virtualization on on this CPU (SVME / VMXON) and prepares it for switching
/// the guests' CPU state ([`cpu_state::init_this_cpu`]).
pub fn enable_this_cpu(b: Backend) -> Result<(), &'static str> {
    cpu_state::init_this_cpu()?;
    match b {
        Backend::Svm => svm::enable_this_cpu(),
        Backend::Vmx => vmx::enable_this_cpu(),
    }
}

/// Guest start state the backends load into a new vCPU.
#[derive(Clone, Copy, Debug)]
pub struct StartState {
    /// Entry point.
    pub rip: u64,
    /// Initial stack.
    pub rsp: u64,
    /// First argument (guest boot-info page).
    pub rdi: u64,
    /// Second argument (a Linux guest's zero page).
    pub rsi: u64,
    /// Guest page-table root.
    pub cr3: u64,
    /// Guest GDT base (null, code 0x08, data 0x10).
    pub gdt_base: u64,
    /// Guest GDT limit.
    pub gdt_limit: u16,
}

/// Creates a vCPU for the backend with nested-paging root `nested_root` (already
/// formatted for the backend). `tag` is unique per vCPU and non-zero: VMX uses it as
/// the VPID; SVM hands out ASIDs per CPU instead.
pub fn create_vcpu(
    b: Backend,
    nested_root: u64,
    tag: u16,
    start: &StartState,
) -> Result<Box<dyn Vcpu>, &'static str> {
    match b {
        Backend::Svm => Ok(Box::new(svm::SvmVcpu::new(nested_root, start)?)),
        Backend::Vmx => Ok(Box::new(vmx::VmxVcpu::new(nested_root, tag, start)?)),
    }
}
