//! AMD SVM backend (AMD64 APM Vol. 2, chapter 15).
//!
//! One VMCB per vCPU, nested paging, an I/O permission map and MSR permission map
//! that intercept everything, ASIDs per VM. Nothing relies on NRIPS or decode assists
//! (QEMU's TCG offers neither): exit handlers know instruction lengths and decode
//! MMIO instructions themselves. Guest FS/GS/TR/LDTR and the syscall MSRs are switched
//! with VMLOAD/VMSAVE around VMRUN; general registers by hand; the FPU/vector state,
//! XCR0 and DR0-3 by [`super::cpu_state`].
//!
//! ASIDs are handed out per CPU, as KVM does: a vCPU takes a fresh ASID from the CPU's
//! pool whenever it lands on a CPU other than the one it last ran on (or the pool's
//! generation moved on), so no two vCPUs, even of one VM, ever share TLB entries, and
//! an exhausted pool starts a new generation with one full flush.

use core::sync::atomic::{AtomicU64, Ordering};

use super::cpu_state::{CpuState, Extras};
use super::{GuestRegs, Instruction, IoExit, StartState, Vcpu, VmExit};
use crate::arch::cpu::{self, cpuid, rdmsr, wrmsr, MAX_CPUS};
use crate::mm::{frames, phys_to_ptr};

const MSR_EFER: u32 = 0xc000_0080;
const MSR_VM_CR: u32 = 0xc001_0114;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
const EFER_SVME: u64 = 1 << 12;

// VMCB control area offsets (APM Vol. 2, Appendix B, Table B-1).
const C_INTERCEPT_EXC: usize = 0x008;
const C_INTERCEPT_MISC1: usize = 0x00c;
const C_INTERCEPT_MISC2: usize = 0x010;
const C_IOPM: usize = 0x040;
const C_MSRPM: usize = 0x048;
const C_ASID: usize = 0x058;
const C_TLB_CONTROL: usize = 0x05c;
const C_VINTR: usize = 0x060;
const C_INT_SHADOW: usize = 0x068;
const C_EXITCODE: usize = 0x070;
const C_EXITINFO1: usize = 0x078;
const C_EXITINFO2: usize = 0x080;
const C_EXITINTINFO: usize = 0x088;
const C_NP_ENABLE: usize = 0x090;
const C_EVENTINJ: usize = 0x0a8;
const C_NCR3: usize = 0x0b0;

// State save area (Table B-2).
const S_ES: usize = 0x400;
const S_CS: usize = 0x410;
const S_SS: usize = 0x420;
const S_DS: usize = 0x430;
const S_FS: usize = 0x440;
const S_GS: usize = 0x450;
const S_GDTR: usize = 0x460;
const S_LDTR: usize = 0x470;
const S_IDTR: usize = 0x480;
const S_TR: usize = 0x490;
const S_CPL: usize = 0x4cb;
const S_EFER: usize = 0x4d0;
const S_CR4: usize = 0x548;
const S_CR3: usize = 0x550;
const S_CR0: usize = 0x558;
const S_DR7: usize = 0x560;
const S_DR6: usize = 0x568;
const S_RFLAGS: usize = 0x570;
const S_RIP: usize = 0x578;
const S_RSP: usize = 0x5d8;
const S_RAX: usize = 0x5f8;
const S_G_PAT: usize = 0x668;

// Intercept bits.
const I1_INTR: u32 = 1 << 0;
const I1_NMI: u32 = 1 << 1;
const I1_VINTR: u32 = 1 << 4;
const I1_RDPMC: u32 = 1 << 15;
const I1_CPUID: u32 = 1 << 18;
const I1_INVD: u32 = 1 << 22;
const I1_HLT: u32 = 1 << 24;
const I1_INVLPGA: u32 = 1 << 26;
const I1_IOIO: u32 = 1 << 27;
const I1_MSR: u32 = 1 << 28;
const I1_SHUTDOWN: u32 = 1 << 31;
const I2_ALL_SVM: u32 = 0x7f; // VMRUN, VMMCALL, VMLOAD, VMSAVE, STGI, CLGI, SKINIT
const I2_RDTSCP: u32 = 1 << 7;
const I2_WBINVD: u32 = 1 << 9;
const I2_MONITOR: u32 = 1 << 10;
const I2_MWAIT: u32 = 1 << 11;
const I2_MWAIT_ARMED: u32 = 1 << 12;
const I2_XSETBV: u32 = 1 << 13;

/// TLB_CONTROL values (Table B-1).
const TLB_FLUSH_ALL: u8 = 1;

/// Per CPU: the next free ASID and the pool's generation (see the module doc).
static NEXT_ASID: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(1) }; MAX_CPUS];
static ASID_GENERATION: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(1) }; MAX_CPUS];
/// ASIDs per CPU (CPUID 8000_000A:EBX; ASID 0 is the host's).
static ASID_COUNT: spin::Once<u64> = spin::Once::new();

static HOST_SAVE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per-CPU host VMCB used with VMSAVE/VMLOAD for the host's hidden state.
static HOST_VMCB: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// I/O permission map (12 KiB, all ones: every port intercepted), shared.
static IOPM: spin::Once<u64> = spin::Once::new();
/// MSR permission map (8 KiB, all ones), shared.
static MSRPM: spin::Once<u64> = spin::Once::new();

/// Whether this CPU offers SVM with nested paging and it is not disabled by firmware.
pub fn supported() -> bool {
    let ext = cpuid(0x8000_0001, 0);
    if ext.ecx & (1 << 2) == 0 || cpuid(0x8000_0000, 0).eax < 0x8000_000a {
        return false;
    }
    // SAFETY: VM_CR exists when CPUID reports SVM.
    let vm_cr = unsafe { rdmsr(MSR_VM_CR) };
    vm_cr & (1 << 4) == 0 && cpuid(0x8000_000a, 0).edx & 1 != 0
}

fn filled_pages(pages: usize) -> Option<u64> {
    let pa = frames::alloc_contiguous(pages, 4096, u64::MAX)?;
    // SAFETY: fresh frames of ours.
    unsafe { core::ptr::write_bytes(phys_to_ptr::<u8>(pa), 0xff, pages * 4096) };
    Some(pa)
}

/// Clears `msr`'s read and write intercept bits in the MSR permission map at `pm`
/// (APM 15.11: two bits per MSR, three 2 KiB ranges).
fn pass_msr(pm: u64, msr: u32) {
    let (offset, first) = match msr {
        0..=0x1fff => (0, 0),
        0xc000_0000..=0xc000_1fff => (0x800, 0xc000_0000),
        0xc001_0000..=0xc001_1fff => (0x1000, 0xc001_0000),
        _ => return,
    };
    let bit = (msr - first) as u64 * 2;
    // SAFETY: inside the 8 KiB map, which is ours and not yet in use.
    unsafe { *phys_to_ptr::<u8>(pm + offset + bit / 8) &= !(0b11 << (bit % 8)) };
}

/// Sets EFER.SVME and this CPU's host save area.
pub fn enable_this_cpu() -> Result<(), &'static str> {
    let i = cpu::current_index();
    let hsave = frames::alloc().ok_or("no memory for the SVM host save area")?;
    let hvmcb = frames::alloc().ok_or("no memory for the host VMCB")?;
    // SAFETY: SVM is supported (checked by `supported`); the save area is a fresh,
    // page-aligned frame that stays ours.
    unsafe {
        wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SVME);
        wrmsr(MSR_VM_HSAVE_PA, hsave);
    }
    HOST_SAVE[i].store(hsave, Ordering::Relaxed);
    HOST_VMCB[i].store(hvmcb, Ordering::Relaxed);
    ASID_COUNT.call_once(|| u64::from(cpuid(0x8000_000a, 0).ebx).max(2));
    IOPM.call_once(|| filled_pages(3).expect("no memory for the IOPM"));
    MSRPM.call_once(|| {
        let pm = filled_pages(2).expect("no memory for the MSRPM");
        // VMLOAD and VMSAVE switch them with the guest's VMCB (APM 15.5.2).
        for msr in super::PASSED_MSRS {
            pass_msr(pm, msr);
        }
        pm
    });
    Ok(())
}

/// An SVM virtual CPU: its VMCB and saved registers.
pub struct SvmVcpu {
    vmcb: u64,
    regs: GuestRegs,
    slice_us: u64,
    cpu_state: CpuState,
    /// The CPU and pool generation this vCPU's ASID belongs to.
    asid_owner: Option<(usize, u64)>,
}

impl SvmVcpu {
    fn w<T: Copy>(&mut self, off: usize, v: T) {
        // SAFETY: `off` is a VMCB field offset inside our own 4 KiB VMCB frame.
        unsafe { core::ptr::write_volatile(phys_to_ptr::<u8>(self.vmcb).add(off).cast::<T>(), v) }
    }
    fn r<T: Copy>(&self, off: usize) -> T {
        // SAFETY: as in `w`.
        unsafe { core::ptr::read_volatile(phys_to_ptr::<u8>(self.vmcb).add(off).cast::<T>()) }
    }
    fn seg(&mut self, off: usize, sel: u16, attrib: u16, limit: u32, base: u64) {
        self.w(off, sel);
        self.w(off + 2, attrib);
        self.w(off + 4, limit);
        self.w(off + 8, base);
    }

    /// A vCPU starting in 64-bit mode at `start`, with nested tables `ncr3` (its ASID
    /// comes from the CPU it runs on).
    pub fn new(ncr3: u64, start: &StartState) -> Result<Self, &'static str> {
        let cpu_state = CpuState::new(Extras::DebugAddresses)?;
        let vmcb = frames::alloc().ok_or("no memory for a VMCB")?;
        let mut v = Self {
            vmcb,
            regs: GuestRegs::default(),
            slice_us: 0,
            cpu_state,
            asid_owner: None,
        };
        v.w::<u32>(C_INTERCEPT_EXC, 1 << 18); // #MC
        v.w::<u32>(
            C_INTERCEPT_MISC1,
            I1_INTR
                | I1_NMI
                | I1_RDPMC
                | I1_CPUID
                | I1_INVD
                | I1_HLT
                | I1_INVLPGA
                | I1_IOIO
                | I1_MSR
                | I1_SHUTDOWN,
        );
        v.w::<u32>(
            C_INTERCEPT_MISC2,
            I2_ALL_SVM | I2_RDTSCP | I2_WBINVD | I2_MONITOR | I2_MWAIT | I2_MWAIT_ARMED | I2_XSETBV,
        );
        v.w::<u64>(C_IOPM, *IOPM.get().ok_or("SVM not enabled")?);
        v.w::<u64>(C_MSRPM, *MSRPM.get().ok_or("SVM not enabled")?);
        v.w::<u64>(C_VINTR, 1 << 24); // V_INTR_MASKING: host IF governs physical interrupts
        v.w::<u64>(C_NP_ENABLE, 1);
        v.w::<u64>(C_NCR3, ncr3);
        // 64-bit flat segments (attrib: type, S, DPL, P, AVL, L, D/B, G packed in 12 bits).
        v.seg(S_CS, 0x08, 0x0a9b, 0xffff_ffff, 0);
        for off in [S_ES, S_SS, S_DS, S_FS, S_GS] {
            v.seg(off, 0x10, 0x0c93, 0xffff_ffff, 0);
        }
        v.seg(S_GDTR, 0, 0, u32::from(start.gdt_limit), start.gdt_base);
        v.seg(S_IDTR, 0, 0, 0, 0);
        v.seg(S_LDTR, 0, 0x0082, 0, 0);
        v.seg(S_TR, 0, 0x008b, 0x67, 0);
        v.w::<u8>(S_CPL, 0);
        v.w::<u64>(S_EFER, (1 << 8) | (1 << 10) | EFER_SVME); // LME, LMA, SVME

        // PG, WP, NE, ET, PE. WP as the host has it: a guest CR0.WP that differs from
        // the host's costs QEMU two full TLB flushes per world switch.
        v.w::<u64>(S_CR0, 0x8001_0031);
        v.w::<u64>(S_CR3, start.cr3);
        v.w::<u64>(S_CR4, 1 << 5); // PAE
        v.w::<u64>(S_DR6, 0xffff_0ff0);
        v.w::<u64>(S_DR7, 0x400);
        v.w::<u64>(S_RFLAGS, 0x2);
        v.w::<u64>(S_RIP, start.rip);
        v.w::<u64>(S_RSP, start.rsp);
        v.w::<u64>(S_G_PAT, 0x0007_0406_0007_0406);
        v.regs.rdi = start.rdi;
        v.regs.rsi = start.rsi;
        Ok(v)
    }

    fn decode_exit(&mut self) -> VmExit {
        let code: u64 = self.r(C_EXITCODE);
        let info1: u64 = self.r(C_EXITINFO1);
        let info2: u64 = self.r(C_EXITINFO2);
        // An event we injected that did not complete is re-queued (valid bit 31).
        let intinfo: u64 = self.r(C_EXITINTINFO);
        if intinfo & (1 << 31) != 0 {
            self.w::<u64>(C_EVENTINJ, intinfo);
        }
        if code as u32 == u32::MAX {
            return VmExit::EntryFailed(code);
        }
        match code {
            0x40..=0x5f => {
                let vector = (code - 0x40) as u8;
                let has_err = matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30);
                VmExit::Exception {
                    vector,
                    error_code: has_err.then_some(info1 as u32),
                }
            }
            0x60 => VmExit::ExternalInterrupt,
            0x61 => VmExit::ExternalInterrupt,
            0x64 => VmExit::InterruptWindow,
            0x72 => VmExit::Cpuid,
            0x78 => VmExit::Hlt,
            0x7b => {
                let size = if info1 & (1 << 4) != 0 {
                    1
                } else if info1 & (1 << 5) != 0 {
                    2
                } else {
                    4
                };
                let len = info2.wrapping_sub(self.rip()) as u8;
                VmExit::Io(IoExit {
                    port: (info1 >> 16) as u16,
                    size,
                    input: info1 & 1 != 0,
                    string: info1 & (1 << 2) != 0,
                    rep: info1 & (1 << 3) != 0,
                    len,
                })
            }
            0x6f => VmExit::Instruction(Instruction::Rdpmc),
            0x76 => VmExit::Instruction(Instruction::Invd),
            0x7c => VmExit::Msr { write: info1 == 1 },
            0x7f => VmExit::Shutdown,
            0x81 => VmExit::Hypercall,
            0x87 => VmExit::Instruction(Instruction::Rdtscp),
            0x89 => VmExit::Instruction(Instruction::Wbinvd),
            0x8a => VmExit::Instruction(Instruction::Monitor),
            0x8b | 0x8c => VmExit::Instruction(Instruction::Mwait),
            0x8d => VmExit::Xsetbv,
            0x400 => VmExit::NestedPageFault {
                gpa: info2,
                write: info1 & 2 != 0,
                fetch: info1 & (1 << 4) != 0,
            },
            other => VmExit::Other(other),
        }
    }
}

unsafe extern "sysv64" {
    /// Enters the guest whose VMCB is at `vmcb` with general registers `regs`;
    /// `host_vmcb` holds the host's VMSAVE state. Returns after #VMEXIT with the
    /// guest's registers stored back into `regs`.
    fn svm_run(regs: *mut GuestRegs, vmcb: u64, host_vmcb: u64);
}

core::arch::global_asm!(
    ".global svm_run",
    "svm_run:",
    " push rbx",
    " push rbp",
    " push r12",
    " push r13",
    " push r14",
    " push r15",
    " push rdi",
    " push rsi",
    " mov rax, rdx",
    " vmsave rax",
    " push rdx",
    " mov rbx, [rdi + 8]",
    " mov rcx, [rdi + 16]",
    " mov rdx, [rdi + 24]",
    " mov rsi, [rdi + 32]",
    " mov rbp, [rdi + 48]",
    " mov r8, [rdi + 56]",
    " mov r9, [rdi + 64]",
    " mov r10, [rdi + 72]",
    " mov r11, [rdi + 80]",
    " mov r12, [rdi + 88]",
    " mov r13, [rdi + 96]",
    " mov r14, [rdi + 104]",
    " mov r15, [rdi + 112]",
    " mov rax, [rsp + 8]",
    " mov rdi, [rdi + 40]",
    " clgi",
    " sti",
    " vmload rax",
    " vmrun rax",
    " vmsave rax",
    " cli",
    // Stack: [rsp] host vmcb, [rsp+8] guest vmcb, [rsp+16] regs pointer.
    " xchg rdi, [rsp + 16]",
    " mov [rdi + 8], rbx",
    " mov [rdi + 16], rcx",
    " mov [rdi + 24], rdx",
    " mov [rdi + 32], rsi",
    " mov [rdi + 48], rbp",
    " mov [rdi + 56], r8",
    " mov [rdi + 64], r9",
    " mov [rdi + 72], r10",
    " mov [rdi + 80], r11",
    " mov [rdi + 88], r12",
    " mov [rdi + 96], r13",
    " mov [rdi + 104], r14",
    " mov [rdi + 112], r15",
    " mov rax, [rsp + 16]",
    " mov [rdi + 40], rax",
    " pop rax",
    " vmload rax",
    " stgi",
    " add rsp, 16",
    " pop r15",
    " pop r14",
    " pop r13",
    " pop r12",
    " pop rbp",
    " pop rbx",
    " ret",
);

impl Vcpu for SvmVcpu {
    fn run(&mut self) -> VmExit {
        let i = cpu::current_index();
        let host = HOST_VMCB[i].load(Ordering::Relaxed);
        if host == 0 {
            return VmExit::EntryFailed(0);
        }
        let rax = self.regs.rax;
        self.w::<u64>(S_RAX, rax);
        self.assign_asid(i);
        self.cpu_state.load();
        if self.slice_us != 0 {
            // Left armed after the exit: most exits are handled well within the
            // slice, and the next entry keeps the timer if it still fires in time.
            crate::apic::arm_within_us(self.slice_us);
        }
        self.cpu_state.before_entry();
        // SAFETY: this CPU has SVM enabled with a host save area; the VMCB is ours and
        // fully initialised; `regs` outlives the call.
        unsafe { svm_run(&mut self.regs, self.vmcb, host) };
        self.cpu_state.after_exit();
        self.regs.rax = self.r(S_RAX);
        self.w::<u8>(C_TLB_CONTROL, 0);
        let exit = self.decode_exit();
        if exit == VmExit::ExternalInterrupt {
            crate::interrupts::service_pending();
        }
        exit
    }
    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }
    fn rip(&self) -> u64 {
        self.r(S_RIP)
    }
    fn set_rip(&mut self, rip: u64) {
        self.w(S_RIP, rip);
    }
    fn rsp(&self) -> u64 {
        self.r(S_RSP)
    }
    fn set_rsp(&mut self, rsp: u64) {
        self.w(S_RSP, rsp);
    }
    fn rflags(&self) -> u64 {
        self.r(S_RFLAGS)
    }
    fn cr3(&self) -> u64 {
        self.r(S_CR3)
    }
    fn interruptible(&self) -> bool {
        self.rflags() & (1 << 9) != 0
            && self.r::<u64>(C_INT_SHADOW) & 1 == 0
            && self.r::<u64>(C_EVENTINJ) & (1 << 31) == 0
    }
    fn inject_interrupt(&mut self, vector: u8) {
        self.w::<u64>(C_EVENTINJ, u64::from(vector) | (1 << 31));
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        let mut e = u64::from(vector) | (3 << 8) | (1 << 31);
        if let Some(code) = error_code {
            e |= (1 << 11) | (u64::from(code) << 32);
        }
        self.w::<u64>(C_EVENTINJ, e);
    }
    fn set_interrupt_window(&mut self, on: bool) {
        let mut m: u32 = self.r(C_INTERCEPT_MISC1);
        let mut vintr: u64 = self.r(C_VINTR);
        if on {
            m |= I1_VINTR;
            // A virtual interrupt request (V_IRQ, V_IGN_TPR) makes the CPU exit with
            // VINTR as soon as the guest could take it.
            vintr |= (1 << 8) | (1 << 20);
        } else {
            m &= !I1_VINTR;
            vintr &= !((1 << 8) | (1 << 20));
        }
        self.w(C_INTERCEPT_MISC1, m);
        self.w(C_VINTR, vintr);
    }
    fn set_time_slice(&mut self, us: u64) {
        self.slice_us = us;
    }
    fn put(&mut self) {
        self.cpu_state.save();
    }
    fn cpl(&self) -> u8 {
        self.r::<u8>(S_CPL) & 3
    }
    fn cr0(&self) -> u64 {
        self.r(S_CR0)
    }
    fn cr4(&self) -> u64 {
        self.r(S_CR4)
    }
    fn start_up(&mut self, vector: u8) -> Result<(), &'static str> {
        // Nested paging runs a real-mode guest as it is: guest-physical = linear.
        let page = u64::from(vector) << 12;
        self.seg(S_CS, u16::from(vector) << 8, 0x009b, 0xffff, page);
        for off in [S_ES, S_SS, S_DS, S_FS, S_GS] {
            self.seg(off, 0, 0x0093, 0xffff, 0);
        }
        self.seg(S_GDTR, 0, 0, 0xffff, 0);
        self.seg(S_IDTR, 0, 0, 0xffff, 0);
        self.seg(S_LDTR, 0, 0x0082, 0xffff, 0);
        self.seg(S_TR, 0, 0x0083, 0xffff, 0);
        self.w::<u8>(S_CPL, 0);
        self.w::<u64>(S_EFER, EFER_SVME);
        self.w::<u64>(S_CR0, 0x10); // ET
        self.w::<u64>(S_CR3, 0);
        self.w::<u64>(S_CR4, 0);
        self.w::<u64>(S_DR6, 0xffff_0ff0);
        self.w::<u64>(S_DR7, 0x400);
        self.w::<u64>(S_RFLAGS, 0x2);
        self.w::<u64>(S_RIP, 0);
        self.w::<u64>(S_RSP, 0);
        self.w::<u64>(S_G_PAT, 0x0007_0406_0007_0406);
        self.w::<u64>(C_EVENTINJ, 0);
        self.w::<u64>(C_INT_SHADOW, 0);
        self.set_interrupt_window(false);
        self.regs = GuestRegs::default();
        // Translations cached for its earlier life go with a fresh ASID.
        self.asid_owner = None;
        self.cpu_state
            .set_xcr(0, 1)
            .map_err(|()| "XCR0 cannot be reset")
    }
    fn efer(&self) -> u64 {
        self.r::<u64>(S_EFER) & !EFER_SVME
    }
    fn set_efer(&mut self, efer: u64) {
        // VMRUN needs SVME in the guest's EFER; the guest never sees it.
        self.w::<u64>(S_EFER, efer | EFER_SVME);
    }
    fn cpu_state(&mut self) -> &mut CpuState {
        &mut self.cpu_state
    }
}

impl SvmVcpu {
    /// Gives the vCPU a fresh ASID of CPU `i`'s pool unless it holds one of the current
    /// generation there (see the module doc).
    fn assign_asid(&mut self, i: usize) {
        let generation = ASID_GENERATION[i].load(Ordering::Relaxed);
        if self.asid_owner == Some((i, generation)) {
            return;
        }
        let count = ASID_COUNT.get().copied().unwrap_or(2);
        let mut asid = NEXT_ASID[i].load(Ordering::Relaxed);
        let mut generation = generation;
        let mut flush = 0;
        if asid >= count {
            // Pool exhausted: every ASID of this CPU may now be reused, so flush them all.
            generation += 1;
            ASID_GENERATION[i].store(generation, Ordering::Relaxed);
            asid = 1;
            flush = TLB_FLUSH_ALL;
        }
        NEXT_ASID[i].store(asid + 1, Ordering::Relaxed);
        self.asid_owner = Some((i, generation));
        self.w::<u32>(C_ASID, asid as u32);
        self.w::<u8>(C_TLB_CONTROL, flush);
    }
}

impl Drop for SvmVcpu {
    fn drop(&mut self) {
        frames::free(self.vmcb, 1);
    }
}
