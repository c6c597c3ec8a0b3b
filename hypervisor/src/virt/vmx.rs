//! Intel VMX backend (Intel SDM Vol. 3C, chapters 24-31, and the VMX appendices A-C;
//! section numbers below are those of the 2023/2024 editions, order number 325462,
//! where VMX starts at chapter 24; older editions number them one lower).
//!
//! One VMCS per vCPU, EPT for nested paging, a VPID per vCPU, every port and MSR
//! intercepted, external-interrupt and NMI exiting, and the VMX-preemption timer for
//! time slices. RDPMC, MONITOR, MWAIT, WBINVD, INVD and XSETBV exit; RDTSCP and RDPID
//! are not enabled (#UD); DR7 is switched by the VMCS (the debug-controls entry and
//! exit controls); the FPU/vector state, XCR0, DR0-3, DR6, CR2 and the kernel GS base
//! by [`super::cpu_state`].
//!
//! A vCPU may run on a different physical CPU in each slice (the run queue is shared),
//! while a VMCS is bound to the CPU that loaded it until VMCLEAR (25.11.1, "Software
//! Use of Virtual-Machine Control Structures": a VMCS must be cleared before it is
//! made current on another logical processor). So:
//! - `run` VMPTRLDs the VMCS when it is not current on this CPU, and then writes the
//!   host-state fields of *this* CPU (GDT, TSS, GS base differ per CPU);
//! - `put` (end of the slice) VMCLEARs it, which also resets its launch state, so the
//!   next entry, on whatever CPU, is a VMLAUNCH;
//! - the VPID's and EPTP's cached translations are flushed (INVVPID, INVEPT) when the
//!   vCPU lands on a CPU other than the one it last ran on, since that CPU may hold
//!   stale translations from an earlier visit.
//!
//! VMX saves no guest general registers except RSP and RIP: the entry stub
//! [`vmx_run`] loads them from [`GuestRegs`] and stores them back after the exit.

use core::sync::atomic::{AtomicU64, Ordering};

use log::{error, warn};

use super::cpu_state::{CpuState, Extras};
use super::{GuestRegs, Instruction, IoExit, StartState, Vcpu, VmExit};
use crate::arch::cpu::{self, cpuid, rdmsr, wrmsr, MAX_CPUS};
use crate::mm::{frames, phys_to_ptr};

// ---------------------------------------------------------------------------------
// MSRs (SDM Vol. 4, chapter 2; the VMX capability MSRs: Appendix A).

const IA32_FEATURE_CONTROL: u32 = 0x3a;
const IA32_VMX_BASIC: u32 = 0x480;
const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
const IA32_VMX_EXIT_CTLS: u32 = 0x483;
const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
const IA32_VMX_MISC: u32 = 0x485;
const IA32_VMX_CR0_FIXED0: u32 = 0x486;
const IA32_VMX_CR0_FIXED1: u32 = 0x487;
const IA32_VMX_CR4_FIXED0: u32 = 0x488;
const IA32_VMX_CR4_FIXED1: u32 = 0x489;
const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
const IA32_EFER: u32 = 0xc000_0080;
const IA32_FS_BASE: u32 = 0xc000_0100;
const IA32_GS_BASE: u32 = 0xc000_0101;

const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;

const CR4_VMXE: u64 = 1 << 13;

// ---------------------------------------------------------------------------------
// VMCS field encodings (Appendix B).

// 16-bit control / guest / host fields (B.1).
const VPID: u32 = 0x0000;
const GUEST_ES_SEL: u32 = 0x0800;
const GUEST_CS_SEL: u32 = 0x0802;
const GUEST_SS_SEL: u32 = 0x0804;
const GUEST_DS_SEL: u32 = 0x0806;
const GUEST_FS_SEL: u32 = 0x0808;
const GUEST_GS_SEL: u32 = 0x080a;
const GUEST_LDTR_SEL: u32 = 0x080c;
const GUEST_TR_SEL: u32 = 0x080e;
const HOST_ES_SEL: u32 = 0x0c00;
const HOST_CS_SEL: u32 = 0x0c02;
const HOST_SS_SEL: u32 = 0x0c04;
const HOST_DS_SEL: u32 = 0x0c06;
const HOST_FS_SEL: u32 = 0x0c08;
const HOST_GS_SEL: u32 = 0x0c0a;
const HOST_TR_SEL: u32 = 0x0c0c;

// 64-bit fields (B.2).
const MSR_BITMAP: u32 = 0x2004;
const TSC_OFFSET: u32 = 0x2010;
const EPT_POINTER: u32 = 0x201a;
const GUEST_PHYSICAL_ADDRESS: u32 = 0x2400;
const VMCS_LINK_POINTER: u32 = 0x2800;
const GUEST_DEBUGCTL: u32 = 0x2802;
const GUEST_EFER: u32 = 0x2806;
const HOST_EFER: u32 = 0x2c02;

// 32-bit fields (B.3).
const PIN_CONTROLS: u32 = 0x4000;
const PROC_CONTROLS: u32 = 0x4002;
const EXCEPTION_BITMAP: u32 = 0x4004;
const PF_ERROR_MASK: u32 = 0x4006;
const PF_ERROR_MATCH: u32 = 0x4008;
const CR3_TARGET_COUNT: u32 = 0x400a;
const EXIT_CONTROLS: u32 = 0x400c;
const EXIT_MSR_STORE_COUNT: u32 = 0x400e;
const EXIT_MSR_LOAD_COUNT: u32 = 0x4010;
const ENTRY_CONTROLS: u32 = 0x4012;
const ENTRY_MSR_LOAD_COUNT: u32 = 0x4014;
const ENTRY_INTR_INFO: u32 = 0x4016;
const ENTRY_EXCEPTION_ERROR: u32 = 0x4018;
const ENTRY_INSTRUCTION_LEN: u32 = 0x401a;
const PROC_CONTROLS2: u32 = 0x401e;
const VM_INSTRUCTION_ERROR: u32 = 0x4400;
const EXIT_REASON: u32 = 0x4402;
const EXIT_INTR_INFO: u32 = 0x4404;
const EXIT_INTR_ERROR: u32 = 0x4406;
const IDT_VECTORING_INFO: u32 = 0x4408;
const IDT_VECTORING_ERROR: u32 = 0x440a;
const EXIT_INSTRUCTION_LEN: u32 = 0x440c;
const GUEST_ES_LIMIT: u32 = 0x4800;
const GUEST_CS_LIMIT: u32 = 0x4802;
const GUEST_SS_LIMIT: u32 = 0x4804;
const GUEST_DS_LIMIT: u32 = 0x4806;
const GUEST_FS_LIMIT: u32 = 0x4808;
const GUEST_GS_LIMIT: u32 = 0x480a;
const GUEST_LDTR_LIMIT: u32 = 0x480c;
const GUEST_TR_LIMIT: u32 = 0x480e;
const GUEST_GDTR_LIMIT: u32 = 0x4810;
const GUEST_IDTR_LIMIT: u32 = 0x4812;
const GUEST_ES_AR: u32 = 0x4814;
const GUEST_CS_AR: u32 = 0x4816;
const GUEST_SS_AR: u32 = 0x4818;
const GUEST_DS_AR: u32 = 0x481a;
const GUEST_FS_AR: u32 = 0x481c;
const GUEST_GS_AR: u32 = 0x481e;
const GUEST_LDTR_AR: u32 = 0x4820;
const GUEST_TR_AR: u32 = 0x4822;
const GUEST_INTERRUPTIBILITY: u32 = 0x4824;
const GUEST_ACTIVITY_STATE: u32 = 0x4826;
const GUEST_SYSENTER_CS: u32 = 0x482a;
const PREEMPTION_TIMER_VALUE: u32 = 0x482e;
const HOST_SYSENTER_CS: u32 = 0x4c00;

// Natural-width fields (B.4).
const CR0_GUEST_HOST_MASK: u32 = 0x6000;
const CR4_GUEST_HOST_MASK: u32 = 0x6002;
const CR0_READ_SHADOW: u32 = 0x6004;
const CR4_READ_SHADOW: u32 = 0x6006;
const EXIT_QUALIFICATION: u32 = 0x6400;
const GUEST_CR0: u32 = 0x6800;
const GUEST_CR3: u32 = 0x6802;
const GUEST_CR4: u32 = 0x6804;
const GUEST_ES_BASE: u32 = 0x6806;
const GUEST_CS_BASE: u32 = 0x6808;
const GUEST_SS_BASE: u32 = 0x680a;
const GUEST_DS_BASE: u32 = 0x680c;
const GUEST_FS_BASE: u32 = 0x680e;
const GUEST_GS_BASE: u32 = 0x6810;
const GUEST_LDTR_BASE: u32 = 0x6812;
const GUEST_TR_BASE: u32 = 0x6814;
const GUEST_GDTR_BASE: u32 = 0x6816;
const GUEST_IDTR_BASE: u32 = 0x6818;
const GUEST_DR7: u32 = 0x681a;
const GUEST_RSP: u32 = 0x681c;
const GUEST_RIP: u32 = 0x681e;
const GUEST_RFLAGS: u32 = 0x6820;
const GUEST_PENDING_DBG: u32 = 0x6822;
const GUEST_SYSENTER_ESP: u32 = 0x6824;
const GUEST_SYSENTER_EIP: u32 = 0x6826;
const HOST_CR0: u32 = 0x6c00;
const HOST_CR3: u32 = 0x6c02;
const HOST_CR4: u32 = 0x6c04;
const HOST_FS_BASE: u32 = 0x6c06;
const HOST_GS_BASE: u32 = 0x6c08;
const HOST_TR_BASE: u32 = 0x6c0a;
const HOST_GDTR_BASE: u32 = 0x6c0c;
const HOST_IDTR_BASE: u32 = 0x6c0e;
const HOST_SYSENTER_ESP: u32 = 0x6c10;
const HOST_SYSENTER_EIP: u32 = 0x6c12;
const HOST_RIP: u32 = 0x6c16;

// ---------------------------------------------------------------------------------
// Control bits.

/// Pin-based controls (25.6.1).
const PIN_EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
const PIN_NMI_EXITING: u32 = 1 << 3;
const PIN_PREEMPTION_TIMER: u32 = 1 << 6;

/// Primary processor-based controls (25.6.2).
const PROC_INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
const PROC_HLT_EXITING: u32 = 1 << 7;
const PROC_MWAIT_EXITING: u32 = 1 << 10;
const PROC_RDPMC_EXITING: u32 = 1 << 11;
const PROC_CR8_LOAD_EXITING: u32 = 1 << 19;
const PROC_CR8_STORE_EXITING: u32 = 1 << 20;
const PROC_UNCONDITIONAL_IO_EXITING: u32 = 1 << 24;
const PROC_USE_MSR_BITMAPS: u32 = 1 << 28;
const PROC_MONITOR_EXITING: u32 = 1 << 29;
const PROC_SECONDARY_CONTROLS: u32 = 1 << 31;

/// Secondary processor-based controls (25.6.2).
const PROC2_ENABLE_EPT: u32 = 1 << 1;
const PROC2_ENABLE_VPID: u32 = 1 << 5;
const PROC2_WBINVD_EXITING: u32 = 1 << 6;
const PROC2_ENABLE_INVPCID: u32 = 1 << 12;

/// VM-exit controls (25.7.1).
const EXIT_SAVE_DEBUG_CONTROLS: u32 = 1 << 2;
const EXIT_HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
const EXIT_SAVE_EFER: u32 = 1 << 20;
const EXIT_LOAD_EFER: u32 = 1 << 21;

/// VM-entry controls (25.8.1).
const ENTRY_LOAD_DEBUG_CONTROLS: u32 = 1 << 2;
const ENTRY_IA32E_MODE_GUEST: u32 = 1 << 9;
const ENTRY_LOAD_EFER: u32 = 1 << 15;

/// IA32_VMX_EPT_VPID_CAP bits (A.10).
const EPT_CAP_WALK_4: u64 = 1 << 6;
const EPT_CAP_WB: u64 = 1 << 14;
const EPT_CAP_2MB: u64 = 1 << 16;
const EPT_CAP_INVEPT: u64 = 1 << 20;
const EPT_CAP_INVEPT_SINGLE: u64 = 1 << 25;
const EPT_CAP_INVEPT_ALL: u64 = 1 << 26;
const VPID_CAP_INVVPID: u64 = 1 << 32;
const VPID_CAP_INVVPID_SINGLE: u64 = 1 << 41;
const VPID_CAP_INVVPID_ALL: u64 = 1 << 42;

/// Basic exit reasons (Appendix C).
mod reason {
    pub const EXCEPTION_OR_NMI: u32 = 0;
    pub const EXTERNAL_INTERRUPT: u32 = 1;
    pub const TRIPLE_FAULT: u32 = 2;
    pub const INTERRUPT_WINDOW: u32 = 7;
    pub const CPUID: u32 = 10;
    pub const HLT: u32 = 12;
    pub const INVD: u32 = 13;
    pub const RDPMC: u32 = 15;
    pub const VMCALL: u32 = 18;
    pub const IO_INSTRUCTION: u32 = 30;
    pub const RDMSR: u32 = 31;
    pub const WRMSR: u32 = 32;
    pub const MWAIT: u32 = 36;
    pub const MONITOR: u32 = 39;
    pub const EPT_VIOLATION: u32 = 48;
    pub const PREEMPTION_TIMER: u32 = 52;
    pub const WBINVD: u32 = 54;
    pub const XSETBV: u32 = 55;
}

/// Bit 31 of the exit reason: the VM entry failed (25.9.1, 27.8).
const EXIT_REASON_ENTRY_FAILURE: u32 = 1 << 31;

/// Interruption-information format shared by the VM-entry interruption-information,
/// VM-exit interruption-information and IDT-vectoring fields (25.8.3, 25.9.2).
const INTR_INFO_VALID: u32 = 1 << 31;
const INTR_INFO_ERROR_CODE: u32 = 1 << 11;
const INTR_TYPE_EXTERNAL: u32 = 0 << 8;
const INTR_TYPE_NMI: u32 = 2 << 8;
const INTR_TYPE_HW_EXCEPTION: u32 = 3 << 8;
const INTR_TYPE_MASK: u32 = 7 << 8;

/// Guest interruptibility state bits 0 and 1: blocking by STI and by MOV SS (25.4.2).
const INTERRUPTIBILITY_SHADOW: u64 = 0b11;

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;

/// [`VmExit::EntryFailed`] code when VMLAUNCH/VMRESUME failed with VMfailInvalid (no
/// current VMCS); a VMfailValid gives the VM-instruction error number (31.4) and a
/// VM exit reporting a failed entry gives its exit reason with bit 31 set.
pub const ENTRY_FAIL_INVALID: u64 = 0xffff_ffff;

// ---------------------------------------------------------------------------------
// Per-CPU and shared state.

/// Physical address of each CPU's VMXON region (0: VMX is off on that CPU).
static VMXON_REGION: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Physical address of the VMCS current on each CPU (0: none we know of).
static CURRENT_VMCS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Clears `msr`'s read and write bits in the MSR bitmaps at `pa` (SDM 3 25.6.9: read
/// bitmaps for MSRs 0-0x1FFF and 0xC0000000-0xC0001FFF at 0 and 0x400, write bitmaps at
/// 0x800 and 0xC00).
fn pass_msr(pa: u64, msr: u32) {
    let (base, bit) = match msr {
        0..=0x1fff => (0, msr),
        0xc000_0000..=0xc000_1fff => (0x400, msr - 0xc000_0000),
        _ => return,
    };
    for half in [0, 0x800] {
        let byte = base + half + (bit / 8) as usize;
        // SAFETY: inside the 4 KiB bitmap frame, ours and not yet in use.
        unsafe { *phys_to_ptr::<u8>(pa + byte as u64) &= !(1 << (bit % 8)) };
    }
}

/// MSR bitmaps (4 KiB; every RDMSR/WRMSR exits but those of [`super::PASSED_MSRS`]:
/// VM entry and exit switch the FS/GS bases and SYSENTER MSRs, SDM 3 28.3, 27.5;
/// `cpu_state` the others), shared
/// by all vCPUs.
static MSR_BITMAPS: spin::Once<u64> = spin::Once::new();
/// What the bootstrap CPU's capability MSRs allow, and the control values used.
static CAPS: spin::Once<Caps> = spin::Once::new();

/// The VMX capabilities the backend relies on, read once (Appendix A).
#[derive(Clone, Copy, Debug)]
struct Caps {
    /// VMCS revision identifier (IA32_VMX_BASIC bits 30:0, A.1).
    revision: u32,
    /// VMXON/VMCS regions must lie below 4 GiB (IA32_VMX_BASIC bit 48).
    below_4g: bool,
    /// Control values (adjusted to the allowed-0/allowed-1 settings, A.3-A.5).
    pin: u32,
    proc: u32,
    proc2: u32,
    exit: u32,
    entry: u32,
    cr0_fixed0: u64,
    cr0_fixed1: u64,
    cr4_fixed0: u64,
    cr4_fixed1: u64,
    /// The preemption timer counts down once every 2^shift TSC ticks (IA32_VMX_MISC
    /// bits 4:0, A.6; 26.5.1).
    timer_shift: u32,
    invept_single: bool,
    invvpid_single: bool,
}

impl Caps {
    fn region_limit(&self) -> u64 {
        if self.below_4g {
            1 << 32
        } else {
            u64::MAX
        }
    }
}

/// Whether this CPU offers VMX (CPUID.1:ECX.VMX[bit 5], 24.6); EPT, VPID and the
/// preemption timer are checked by [`enable_this_cpu`].
pub fn supported() -> bool {
    cpuid(1, 0).ecx & (1 << 5) != 0
}

/// Adjusts the wanted control bits `want` to what capability MSR value `cap` allows
/// (allowed-0 settings in bits 31:0 must be 1, allowed-1 settings in bits 63:32 may
/// be 1; A.3.1), and fails when a bit of `required` cannot be set.
fn adjust_controls(
    cap: u64,
    want: u32,
    required: u32,
    what: &'static str,
) -> Result<u32, &'static str> {
    let must_be_one = cap as u32;
    let may_be_one = (cap >> 32) as u32;
    let v = (want | must_be_one) & may_be_one;
    if v & required != required {
        error!(
            "vmx: {what}: wanted {required:#x}, allowed-1 is {may_be_one:#x} (missing {:#x})",
            required & !v
        );
        return Err("a required VMX control is not supported");
    }
    Ok(v)
}

/// Reads the capability MSRs (only those CPUID and IA32_VMX_BASIC say exist, A.1) and
/// computes the controls.
fn probe() -> Result<Caps, &'static str> {
    // SAFETY: IA32_VMX_BASIC and the non-TRUE control MSRs, MISC and the CR fixed-bit
    // MSRs exist on every CPU with CPUID.1:ECX.VMX (A.1-A.8); every other MSR read
    // below is guarded by the bit that says it exists.
    unsafe {
        let basic = rdmsr(IA32_VMX_BASIC);
        let region_size = (basic >> 32) & 0x1fff;
        if region_size > 4096 {
            return Err("VMCS region larger than a page");
        }
        if (basic >> 50) & 0xf != 6 {
            return Err("VMCS memory type is not write-back");
        }
        let has_true = basic & (1 << 55) != 0;
        let (pin_msr, proc_msr, exit_msr, entry_msr) = if has_true {
            (
                IA32_VMX_TRUE_PINBASED_CTLS,
                IA32_VMX_TRUE_PROCBASED_CTLS,
                IA32_VMX_TRUE_EXIT_CTLS,
                IA32_VMX_TRUE_ENTRY_CTLS,
            )
        } else {
            (
                IA32_VMX_PINBASED_CTLS,
                IA32_VMX_PROCBASED_CTLS,
                IA32_VMX_EXIT_CTLS,
                IA32_VMX_ENTRY_CTLS,
            )
        };
        let pin_want = PIN_EXTERNAL_INTERRUPT_EXITING | PIN_NMI_EXITING | PIN_PREEMPTION_TIMER;
        let pin = adjust_controls(rdmsr(pin_msr), pin_want, pin_want, "pin-based controls")?;

        let proc_cap = rdmsr(proc_msr);
        let proc_required = PROC_HLT_EXITING
            | PROC_MWAIT_EXITING
            | PROC_RDPMC_EXITING
            | PROC_MONITOR_EXITING
            | PROC_UNCONDITIONAL_IO_EXITING
            | PROC_USE_MSR_BITMAPS
            | PROC_SECONDARY_CONTROLS;
        // CR8 accesses would otherwise reach the physical TPR (no TPR shadow): make
        // them exit where the CPU allows it.
        let proc_want = proc_required | PROC_CR8_LOAD_EXITING | PROC_CR8_STORE_EXITING;
        let proc = adjust_controls(
            proc_cap,
            proc_want,
            proc_required,
            "processor-based controls",
        )?;
        if (proc_cap >> 32) as u32 & PROC_INTERRUPT_WINDOW_EXITING == 0 {
            return Err("no interrupt-window exiting");
        }

        // IA32_VMX_PROCBASED_CTLS2 exists because "activate secondary controls" may
        // be 1 (checked above, A.3.3).
        // "Enable RDTSCP" stays off: RDTSCP and RDPID would read the host's TSC_AUX.
        let proc2_required = PROC2_ENABLE_EPT | PROC2_ENABLE_VPID | PROC2_WBINVD_EXITING;
        let proc2_want = proc2_required | PROC2_ENABLE_INVPCID;
        let proc2 = adjust_controls(
            rdmsr(IA32_VMX_PROCBASED_CTLS2),
            proc2_want,
            proc2_required,
            "secondary processor-based controls",
        )?;

        // IA32_VMX_EPT_VPID_CAP exists because EPT and VPID may be enabled (A.10).
        let ept = rdmsr(IA32_VMX_EPT_VPID_CAP);
        let ept_needed =
            EPT_CAP_WALK_4 | EPT_CAP_WB | EPT_CAP_2MB | EPT_CAP_INVEPT | VPID_CAP_INVVPID;
        if ept & ept_needed != ept_needed {
            error!(
                "vmx: IA32_VMX_EPT_VPID_CAP {ept:#x} lacks {:#x}",
                ept_needed & !ept
            );
            return Err("EPT lacks 4-level walks, write-back, 2 MiB pages, INVEPT or INVVPID");
        }
        if ept & (EPT_CAP_INVEPT_SINGLE | EPT_CAP_INVEPT_ALL) == 0
            || ept & (VPID_CAP_INVVPID_SINGLE | VPID_CAP_INVVPID_ALL) == 0
        {
            return Err("no usable INVEPT/INVVPID type");
        }

        let exit_want = EXIT_SAVE_DEBUG_CONTROLS
            | EXIT_HOST_ADDRESS_SPACE_SIZE
            | EXIT_SAVE_EFER
            | EXIT_LOAD_EFER;
        let exit = adjust_controls(rdmsr(exit_msr), exit_want, exit_want, "VM-exit controls")?;
        let entry_want = ENTRY_LOAD_DEBUG_CONTROLS | ENTRY_IA32E_MODE_GUEST | ENTRY_LOAD_EFER;
        let entry = adjust_controls(
            rdmsr(entry_msr),
            entry_want,
            entry_want,
            "VM-entry controls",
        )?;

        Ok(Caps {
            revision: basic as u32 & 0x7fff_ffff,
            below_4g: basic & (1 << 48) != 0,
            pin,
            proc,
            proc2,
            exit,
            entry,
            cr0_fixed0: rdmsr(IA32_VMX_CR0_FIXED0),
            cr0_fixed1: rdmsr(IA32_VMX_CR0_FIXED1),
            cr4_fixed0: rdmsr(IA32_VMX_CR4_FIXED0),
            cr4_fixed1: rdmsr(IA32_VMX_CR4_FIXED1),
            timer_shift: rdmsr(IA32_VMX_MISC) as u32 & 0x1f,
            invept_single: ept & EPT_CAP_INVEPT_SINGLE != 0,
            invvpid_single: ept & VPID_CAP_INVVPID_SINGLE != 0,
        })
    }
}

/// Enters VMX operation on this CPU (24.7, "Enabling and Entering VMX Operation"):
/// checks/sets IA32_FEATURE_CONTROL, applies the CR0/CR4 fixed bits (24.8, A.7, A.8),
/// and executes VMXON with a fresh VMXON region (25.11.5).
pub fn enable_this_cpu() -> Result<(), &'static str> {
    if !supported() {
        return Err("this CPU has no VMX");
    }
    let i = cpu::current_index();
    if VMXON_REGION[i].load(Ordering::Relaxed) != 0 {
        return Ok(());
    }
    // SAFETY: IA32_FEATURE_CONTROL exists when CPUID reports VMX (Vol. 4, chapter 2);
    // while unlocked, setting "VMX outside SMX" and the lock bit is the documented
    // way to allow VMXON (24.7).
    unsafe {
        let fc = rdmsr(IA32_FEATURE_CONTROL);
        if fc & FEATURE_CONTROL_LOCK == 0 {
            wrmsr(
                IA32_FEATURE_CONTROL,
                fc | FEATURE_CONTROL_VMX_OUTSIDE_SMX | FEATURE_CONTROL_LOCK,
            );
        } else if fc & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
            return Err("VMX is disabled by the firmware (IA32_FEATURE_CONTROL locked)");
        }
    }
    let caps = *CAPS.try_call_once(probe)?;
    MSR_BITMAPS.call_once(|| {
        let pa = frames::alloc().expect("no memory for the MSR bitmaps");
        // SAFETY: a fresh frame of ours, identity mapped.
        unsafe { core::ptr::write_bytes(phys_to_ptr::<u8>(pa), 0xff, 4096) };
        for msr in super::PASSED_MSRS {
            pass_msr(pa, msr);
        }
        pa
    });
    let region = frames::alloc_contiguous(1, 4096, caps.region_limit())
        .ok_or("no memory for the VMXON region")?;
    // SAFETY: the region is a fresh frame of ours; its first 31 bits take the VMCS
    // revision identifier (25.11.5). CR0/CR4 only gain the bits VMX operation
    // requires (fixed-0 bits are 1 in FIXED0) and lose the bits it forbids (0 in
    // FIXED1): the hypervisor already runs with PE, PG and (from the loader) NE set,
    // so this changes nothing else it relies on.
    unsafe {
        phys_to_ptr::<u32>(region).write_volatile(caps.revision);
        let cr0 = (read_cr0() | caps.cr0_fixed0) & caps.cr0_fixed1;
        let cr4 = (read_cr4() | CR4_VMXE | caps.cr4_fixed0) & caps.cr4_fixed1;
        core::arch::asm!("mov cr0, {}", in(reg) cr0, options(nostack, preserves_flags));
        core::arch::asm!("mov cr4, {}", in(reg) cr4, options(nostack, preserves_flags));
    }
    // SAFETY: CR4.VMXE and the fixed bits are set, IA32_FEATURE_CONTROL allows VMXON,
    // and `region` is a page-aligned VMXON region with the revision id.
    if let Err(e) = unsafe { vmxon(region) } {
        frames::free(region, 1);
        error!("vmx: VMXON failed on cpu{i}: {e:?}");
        return Err("VMXON failed");
    }
    VMXON_REGION[i].store(region, Ordering::Relaxed);
    CURRENT_VMCS[i].store(0, Ordering::Relaxed);
    Ok(())
}

// ---------------------------------------------------------------------------------
// VMX instructions (chapter 31), each returning the VMfail outcome (31.2).

/// How a VMX instruction failed (31.2, "Conventions").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VmFail {
    /// CF=1: no current VMCS / bad operand pointer.
    Invalid,
    /// ZF=1: with the VM-instruction error number (31.4).
    Valid(u32),
}

fn vm_result(cf: u8, zf: u8) -> Result<(), VmFail> {
    if cf != 0 {
        Err(VmFail::Invalid)
    } else if zf != 0 {
        Err(VmFail::Valid(
            vmread(VM_INSTRUCTION_ERROR).unwrap_or(0) as u32
        ))
    } else {
        Ok(())
    }
}

/// VMXON (31.3).
///
/// # Safety
/// `region` must be a page-aligned VMXON region holding the revision id, kept for as
/// long as the CPU stays in VMX operation; CR0/CR4 and IA32_FEATURE_CONTROL must
/// allow VMX operation.
unsafe fn vmxon(region: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: per the contract; the operand is a pointer to the 64-bit address.
    unsafe {
        core::arch::asm!(
            "vmxon [{p}]", "setc {cf}", "setz {zf}",
            p = in(reg) &region, cf = out(reg_byte) cf, zf = out(reg_byte) zf,
            options(nostack),
        )
    };
    vm_result(cf, zf)
}

/// VMCLEAR (31.3): writes the VMCS at `vmcs` back to memory, marks it clear and not
/// current.
///
/// # Safety
/// VMX operation must be on; `vmcs` must be a VMCS region of ours that is not active
/// on another CPU.
unsafe fn vmclear(vmcs: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: per the contract.
    unsafe {
        core::arch::asm!(
            "vmclear [{p}]", "setc {cf}", "setz {zf}",
            p = in(reg) &vmcs, cf = out(reg_byte) cf, zf = out(reg_byte) zf,
            options(nostack),
        )
    };
    vm_result(cf, zf)
}

/// VMPTRLD (31.3): makes the VMCS at `vmcs` current on this CPU.
///
/// # Safety
/// VMX operation must be on; `vmcs` must be a VMCS region of ours (revision id set)
/// that is not active on another CPU.
unsafe fn vmptrld(vmcs: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: per the contract.
    unsafe {
        core::arch::asm!(
            "vmptrld [{p}]", "setc {cf}", "setz {zf}",
            p = in(reg) &vmcs, cf = out(reg_byte) cf, zf = out(reg_byte) zf,
            options(nostack),
        )
    };
    vm_result(cf, zf)
}

/// VMREAD (31.3) of `field` in the current VMCS. Reading has no side effects; without
/// VMX operation it would #UD, so it is only called on CPUs that executed VMXON.
fn vmread(field: u32) -> Result<u64, VmFail> {
    let (v, cf, zf): (u64, u8, u8);
    // SAFETY: VMREAD only reads the current VMCS; every caller runs on a CPU in VMX
    // operation (after `enable_this_cpu`).
    unsafe {
        core::arch::asm!(
            "vmread {v}, {f}", "setc {cf}", "setz {zf}",
            v = out(reg) v, f = in(reg) u64::from(field), cf = out(reg_byte) cf, zf = out(reg_byte) zf,
            options(nostack, nomem),
        )
    };
    // Not `vm_result`: its VMfailValid path reads the error with VMREAD again.
    if cf != 0 {
        Err(VmFail::Invalid)
    } else if zf != 0 {
        Err(VmFail::Valid(0))
    } else {
        Ok(v)
    }
}

/// VMREAD that yields 0 on failure (for fields every VMCS has).
fn vmr(field: u32) -> u64 {
    vmread(field).unwrap_or(0)
}

/// VMWRITE (31.3) of `value` to `field` in the current VMCS.
///
/// # Safety
/// Host-state fields decide what the CPU loads at the next VM exit: they must
/// describe this CPU's real host state; control fields must point at memory the
/// vCPU owns.
unsafe fn vmwrite(field: u32, value: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: per the contract.
    unsafe {
        core::arch::asm!(
            "vmwrite {f}, {v}", "setc {cf}", "setz {zf}",
            f = in(reg) u64::from(field), v = in(reg) value, cf = out(reg_byte) cf, zf = out(reg_byte) zf,
            options(nostack, nomem),
        )
    };
    vm_result(cf, zf)
}

/// INVEPT (31.3, 29.4.3.1) of type 1 (single context, for `eptp`) or 2 (all contexts).
fn invept(single: bool, eptp: u64) {
    let desc: [u64; 2] = [eptp, 0];
    let ty: u64 = if single { 1 } else { 2 };
    // SAFETY: INVEPT only drops cached translations; the type is one the CPU
    // supports (checked in `probe`), VMX operation is on.
    unsafe {
        core::arch::asm!("invept {t}, [{d}]", t = in(reg) ty, d = in(reg) &desc, options(nostack))
    };
}

/// INVVPID (31.3, 29.4.3.1) of type 1 (single context, for `vpid`) or 2 (all contexts
/// but VPID 0).
fn invvpid(single: bool, vpid: u16) {
    let desc: [u64; 2] = [u64::from(vpid), 0];
    let ty: u64 = if single { 1 } else { 2 };
    // SAFETY: as in `invept`.
    unsafe {
        core::arch::asm!("invvpid {t}, [{d}]", t = in(reg) ty, d = in(reg) &desc, options(nostack))
    };
}

fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 has no side effects (CPL 0).
    unsafe {
        core::arch::asm!("mov {}, cr0", out(reg) v, options(nostack, nomem, preserves_flags))
    };
    v
}

fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: as in `read_cr0`.
    unsafe {
        core::arch::asm!("mov {}, cr3", out(reg) v, options(nostack, nomem, preserves_flags))
    };
    v
}

fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: as in `read_cr0`.
    unsafe {
        core::arch::asm!("mov {}, cr4", out(reg) v, options(nostack, nomem, preserves_flags))
    };
    v
}

/// This CPU's host-state values that differ between CPUs or may change (25.5).
struct HostState {
    cr0: u64,
    cr3: u64,
    cr4: u64,
    cs: u16,
    ss: u16,
    ds: u16,
    es: u16,
    tr: u16,
    fs_base: u64,
    gs_base: u64,
    tr_base: u64,
    gdtr_base: u64,
    idtr_base: u64,
    efer: u64,
}

impl HostState {
    fn this_cpu() -> Self {
        let (cs, ss, ds, es, tr): (u16, u16, u16, u16, u16);
        let mut gdtr = [0u8; 10];
        let mut idtr = [0u8; 10];
        // SAFETY: reads the segment selectors, the task register and the
        // descriptor-table registers into locals; no side effects.
        unsafe {
            core::arch::asm!(
                "mov {cs:x}, cs", "mov {ss:x}, ss", "mov {ds:x}, ds", "mov {es:x}, es", "str {tr:x}",
                "sgdt [{g}]", "sidt [{i}]",
                cs = out(reg) cs, ss = out(reg) ss, ds = out(reg) ds, es = out(reg) es, tr = out(reg) tr,
                g = in(reg) gdtr.as_mut_ptr(), i = in(reg) idtr.as_mut_ptr(),
                options(nostack, preserves_flags),
            )
        };
        let gdtr_base = u64::from_le_bytes(gdtr[2..10].try_into().unwrap_or_default());
        let idtr_base = u64::from_le_bytes(idtr[2..10].try_into().unwrap_or_default());
        // The TSS descriptor is a 16-byte system descriptor (Vol. 3A 8.2.3): base
        // 23:0 in bits 39:16, 31:24 in bits 63:56, 63:32 in the second quadword.
        let d = (gdtr_base + u64::from(tr & !7)) as *const u64;
        // SAFETY: TR indexes this CPU's GDT (loaded by `arch::gdt`, mapped and never
        // freed), whose TSS descriptor spans two quadwords.
        let (lo, hi) = unsafe { (d.read_volatile(), d.add(1).read_volatile()) };
        let tr_base =
            ((lo >> 16) & 0xff_ffff) | (((lo >> 56) & 0xff) << 24) | ((hi & 0xffff_ffff) << 32);
        // SAFETY: FS_BASE, GS_BASE and EFER are architectural on x86_64.
        let (fs_base, gs_base, efer) =
            unsafe { (rdmsr(IA32_FS_BASE), rdmsr(IA32_GS_BASE), rdmsr(IA32_EFER)) };
        Self {
            cr0: read_cr0(),
            cr3: read_cr3(),
            cr4: read_cr4(),
            cs,
            ss,
            ds,
            es,
            tr,
            fs_base,
            gs_base,
            tr_base,
            gdtr_base,
            idtr_base,
            efer,
        }
    }
}

/// An event to inject at the next VM entry (25.8.3).
#[derive(Clone, Copy, Debug)]
struct Event {
    info: u32,
    error_code: u32,
    instruction_len: u32,
}

/// A VMX virtual CPU: its VMCS, saved registers, and where the VMCS is loaded.
pub struct VmxVcpu {
    /// Physical address of the VMCS region.
    vmcs: u64,
    regs: GuestRegs,
    eptp: u64,
    vpid: u16,
    /// The CPU on which the VMCS is active (VMPTRLD'ed and not yet VMCLEARed).
    active_on: Option<usize>,
    /// VMLAUNCH succeeded since the last VMCLEAR: the next entry is a VMRESUME.
    launched: bool,
    /// The CPU the guest last ran on (for the TLB flush on migration).
    last_cpu: Option<usize>,
    // Guest state cached at each exit (the VMCS can only be read while current).
    rip: u64,
    rip_dirty: bool,
    rsp: u64,
    rsp_dirty: bool,
    rflags: u64,
    cr3: u64,
    interruptibility: u64,
    interruptibility_dirty: bool,
    /// Event for the next entry.
    pending: Option<Event>,
    /// Pin-based / primary processor-based controls as they should be at the next
    /// entry, and as last written.
    pin: u32,
    pin_written: u32,
    proc: u32,
    proc_written: u32,
    slice_us: u64,
    timer_shift: u32,
    cpu_state: CpuState,
}

unsafe extern "sysv64" {
    /// Enters the guest with VMLAUNCH (`launched` = 0) or VMRESUME, with general
    /// registers from `regs`; stores them back after the VM exit. Returns 0 after a
    /// VM exit, 1 on VMfailInvalid, 2 on VMfailValid.
    fn vmx_run(regs: *mut GuestRegs, launched: u64) -> u64;
    /// Where VM exits land (HOST_RIP).
    static vmx_exit: u8;
}

// The stack at VM exit (HOST_RSP, written right before the entry): [rsp] = `regs`,
// then the host's callee-saved registers and the return address. VM exits load
// RFLAGS with only bit 1 set (28.5.3), so interrupts stay off until the exit handling
// opens a window. GuestRegs offsets: rax 0, rbx 8, rcx 16, rdx 24, rsi 32, rdi 40,
// rbp 48, r8 56 ... r15 112.
core::arch::global_asm!(
    ".global vmx_run",
    ".global vmx_exit",
    "vmx_run:",
    " push rbx",
    " push rbp",
    " push r12",
    " push r13",
    " push r14",
    " push r15",
    " push rdi",
    " mov rax, 0x6c14", // HOST_RSP
    " vmwrite rax, rsp",
    " jbe .Lvmx_fail",
    " test rsi, rsi",
    " mov rax, [rdi]",
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
    " mov rdi, [rdi + 40]",
    " jnz .Lvmx_resume",
    " vmlaunch",
    " jmp .Lvmx_fail",
    ".Lvmx_resume:",
    " vmresume",
    ".Lvmx_fail:",
    // Still on our stack: CF=1 VMfailInvalid, ZF=1 VMfailValid.
    " mov eax, 1",
    " mov ecx, 2",
    " cmovz eax, ecx",
    " add rsp, 8",
    " pop r15",
    " pop r14",
    " pop r13",
    " pop r12",
    " pop rbp",
    " pop rbx",
    " ret",
    "vmx_exit:",
    " push rdi",
    " mov rdi, [rsp + 8]",
    " mov [rdi], rax",
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
    " pop rax",
    " mov [rdi + 40], rax",
    " add rsp, 8",
    " pop r15",
    " pop r14",
    " pop r13",
    " pop r12",
    " pop rbp",
    " pop rbx",
    " xor eax, eax",
    " ret",
);

/// Access rights in the VMCS format (25.4.1): type 3:0, S 4, DPL 6:5,
/// P 7, L 13, D/B 14, G 15, unusable 16.
const AR_CODE64: u64 = 0xa09b; // execute/read accessed, S, P, L, G
const AR_DATA: u64 = 0xc093; // read/write accessed, S, P, D/B, G
const AR_TSS64_BUSY: u64 = 0x008b; // busy 64-bit TSS, P
const AR_UNUSABLE: u64 = 1 << 16;

impl VmxVcpu {
    /// A vCPU starting in 64-bit mode at `start`, with EPT pointer `eptp` and VPID
    /// `vpid` (non-zero). The VMCS is initialised on this CPU (25.11.3: VMCLEAR, then
    /// VMPTRLD, then VMWRITEs) and cleared again, so it can be loaded anywhere.
    pub fn new(eptp: u64, vpid: u16, start: &StartState) -> Result<Self, &'static str> {
        let caps = *CAPS.get().ok_or("VMX not enabled")?;
        if vpid == 0 {
            return Err("VPID 0 is the host's");
        }
        let i = cpu::current_index();
        if VMXON_REGION[i].load(Ordering::Relaxed) == 0 {
            return Err("VMX is off on this CPU");
        }
        let msr_bitmaps = *MSR_BITMAPS.get().ok_or("VMX not enabled")?;
        let cpu_state = CpuState::new(Extras::DebugAndSyscallState)?;
        let vmcs =
            frames::alloc_contiguous(1, 4096, caps.region_limit()).ok_or("no memory for a VMCS")?;
        // SAFETY: a fresh frame of ours: its first 31 bits take the revision id and
        // bit 31 (shadow VMCS) stays 0 (25.2).
        unsafe { phys_to_ptr::<u32>(vmcs).write_volatile(caps.revision) };
        let mut v = Self {
            vmcs,
            regs: GuestRegs::default(),
            eptp,
            vpid,
            active_on: None,
            launched: false,
            last_cpu: None,
            rip: start.rip,
            rip_dirty: false,
            rsp: start.rsp,
            rsp_dirty: false,
            rflags: 0x2,
            cr3: start.cr3,
            interruptibility: 0,
            interruptibility_dirty: false,
            pending: None,
            pin: caps.pin & !PIN_PREEMPTION_TIMER,
            pin_written: caps.pin & !PIN_PREEMPTION_TIMER,
            proc: caps.proc,
            proc_written: caps.proc,
            slice_us: 0,
            timer_shift: caps.timer_shift,
            cpu_state,
        };
        v.regs.rdi = start.rdi;
        v.regs.rsi = start.rsi;
        // SAFETY: the VMCS is ours and not active anywhere; VMX operation is on.
        let r = unsafe { vmclear(vmcs).and_then(|()| vmptrld(vmcs)) };
        if let Err(e) = r {
            error!("vmx: VMCLEAR/VMPTRLD of a new VMCS failed: {e:?}");
            frames::free(vmcs, 1);
            return Err("VMPTRLD failed");
        }
        CURRENT_VMCS[i].store(vmcs, Ordering::Relaxed);
        let r = v.init_fields(&caps, msr_bitmaps, start);
        // SAFETY: the VMCS is current on this CPU; clearing it leaves it inactive so
        // `run` can load it on any CPU.
        let c = unsafe { vmclear(vmcs) };
        CURRENT_VMCS[i].store(0, Ordering::Relaxed);
        if let Err(e) = r.and(c) {
            error!("vmx: VMCS setup failed: {e:?}");
            // Dropping `v` returns the frame (not active anywhere now).
            return Err("VMCS setup failed");
        }
        Ok(v)
    }

    /// Writes the control and guest-state fields of the (current) VMCS (25.4, 25.6-25.8).
    fn init_fields(&self, caps: &Caps, msr_bitmaps: u64, start: &StartState) -> Result<(), VmFail> {
        // CR0: PG, NE, ET, PE; CR4: PAE; plus what VMX operation requires (VMXE).
        let cr0 = (0x8000_0031 | caps.cr0_fixed0) & caps.cr0_fixed1;
        let cr4 = (0x20 | caps.cr4_fixed0) & caps.cr4_fixed1;
        // Bits the guest may not change are owned by the host: reads see the shadow,
        // writes that differ from it exit (25.6.6).
        let cr0_mask = caps.cr0_fixed0 | !caps.cr0_fixed1;
        let cr4_mask = caps.cr4_fixed0 | !caps.cr4_fixed1;
        let exit_rip = &raw const vmx_exit as u64;
        // SAFETY: the VMCS is current; the control fields point at frames that live as
        // long as the vCPU (MSR bitmaps: forever; EPT: the VM's); HOST_RIP is the exit
        // stub; all other host fields are written per CPU in `load` before any entry.
        unsafe {
            // Controls.
            vmwrite(PIN_CONTROLS, u64::from(self.pin))?;
            vmwrite(PROC_CONTROLS, u64::from(self.proc))?;
            vmwrite(PROC_CONTROLS2, u64::from(caps.proc2))?;
            vmwrite(EXIT_CONTROLS, u64::from(caps.exit))?;
            vmwrite(ENTRY_CONTROLS, u64::from(caps.entry))?;
            vmwrite(EXCEPTION_BITMAP, 1 << 18)?; // #MC, as the SVM backend
            vmwrite(PF_ERROR_MASK, 0)?;
            vmwrite(PF_ERROR_MATCH, 0)?;
            vmwrite(CR3_TARGET_COUNT, 0)?;
            vmwrite(EXIT_MSR_STORE_COUNT, 0)?;
            vmwrite(EXIT_MSR_LOAD_COUNT, 0)?;
            vmwrite(ENTRY_MSR_LOAD_COUNT, 0)?;
            vmwrite(ENTRY_INTR_INFO, 0)?;
            vmwrite(MSR_BITMAP, msr_bitmaps)?;
            vmwrite(TSC_OFFSET, 0)?;
            vmwrite(EPT_POINTER, self.eptp)?;
            vmwrite(VPID, u64::from(self.vpid))?;
            vmwrite(CR0_GUEST_HOST_MASK, cr0_mask)?;
            vmwrite(CR4_GUEST_HOST_MASK, cr4_mask)?;
            vmwrite(CR0_READ_SHADOW, 0x8000_0031)?;
            vmwrite(CR4_READ_SHADOW, 0x20)?;
            vmwrite(HOST_RIP, exit_rip)?;
            vmwrite(HOST_SYSENTER_CS, 0)?;
            vmwrite(HOST_SYSENTER_ESP, 0)?;
            vmwrite(HOST_SYSENTER_EIP, 0)?;

            // Guest state: 64-bit mode as the guest ABI starts it (25.4).
            vmwrite(GUEST_CR0, cr0)?;
            vmwrite(GUEST_CR3, start.cr3)?;
            vmwrite(GUEST_CR4, cr4)?;
            vmwrite(GUEST_DR7, 0x400)?;
            vmwrite(GUEST_RSP, start.rsp)?;
            vmwrite(GUEST_RIP, start.rip)?;
            vmwrite(GUEST_RFLAGS, 0x2)?;
            for (sel, base, limit, ar, s, ar_v) in [
                (
                    GUEST_CS_SEL,
                    GUEST_CS_BASE,
                    GUEST_CS_LIMIT,
                    GUEST_CS_AR,
                    0x08,
                    AR_CODE64,
                ),
                (
                    GUEST_SS_SEL,
                    GUEST_SS_BASE,
                    GUEST_SS_LIMIT,
                    GUEST_SS_AR,
                    0x10,
                    AR_DATA,
                ),
                (
                    GUEST_DS_SEL,
                    GUEST_DS_BASE,
                    GUEST_DS_LIMIT,
                    GUEST_DS_AR,
                    0x10,
                    AR_DATA,
                ),
                (
                    GUEST_ES_SEL,
                    GUEST_ES_BASE,
                    GUEST_ES_LIMIT,
                    GUEST_ES_AR,
                    0x10,
                    AR_DATA,
                ),
                (
                    GUEST_FS_SEL,
                    GUEST_FS_BASE,
                    GUEST_FS_LIMIT,
                    GUEST_FS_AR,
                    0x10,
                    AR_DATA,
                ),
                (
                    GUEST_GS_SEL,
                    GUEST_GS_BASE,
                    GUEST_GS_LIMIT,
                    GUEST_GS_AR,
                    0x10,
                    AR_DATA,
                ),
            ] {
                vmwrite(sel, s)?;
                vmwrite(base, 0)?;
                vmwrite(limit, 0xffff_ffff)?;
                vmwrite(ar, ar_v)?;
            }
            vmwrite(GUEST_TR_SEL, 0)?;
            vmwrite(GUEST_TR_BASE, 0)?;
            vmwrite(GUEST_TR_LIMIT, 0x67)?;
            vmwrite(GUEST_TR_AR, AR_TSS64_BUSY)?;
            vmwrite(GUEST_LDTR_SEL, 0)?;
            vmwrite(GUEST_LDTR_BASE, 0)?;
            vmwrite(GUEST_LDTR_LIMIT, 0)?;
            vmwrite(GUEST_LDTR_AR, AR_UNUSABLE)?;
            vmwrite(GUEST_GDTR_BASE, start.gdt_base)?;
            vmwrite(GUEST_GDTR_LIMIT, u64::from(start.gdt_limit))?;
            vmwrite(GUEST_IDTR_BASE, 0)?;
            vmwrite(GUEST_IDTR_LIMIT, 0)?;
            vmwrite(GUEST_DEBUGCTL, 0)?;
            vmwrite(GUEST_SYSENTER_CS, 0)?;
            vmwrite(GUEST_SYSENTER_ESP, 0)?;
            vmwrite(GUEST_SYSENTER_EIP, 0)?;
            vmwrite(GUEST_EFER, (1 << 8) | (1 << 10))?; // LME, LMA
            vmwrite(VMCS_LINK_POINTER, u64::MAX)?;
            vmwrite(GUEST_ACTIVITY_STATE, 0)?;
            vmwrite(GUEST_INTERRUPTIBILITY, 0)?;
            vmwrite(GUEST_PENDING_DBG, 0)?;
            vmwrite(PREEMPTION_TIMER_VALUE, 0)?;
        }
        Ok(())
    }

    /// Makes the VMCS current on CPU `i` (VMPTRLD) if it is not, writing this CPU's
    /// host state (25.5) when the VMCS arrives from elsewhere, and flushing the
    /// VPID/EPT translations this CPU may hold from an earlier visit (29.4.3).
    fn load(&mut self, i: usize) -> Result<(), VmExit> {
        match self.active_on {
            Some(c) if c != i => {
                // `put` was not called when the vCPU left CPU c: its VMCS may still be
                // cached there, and only CPU c can clear it.
                error!("vmx: vCPU VMCS still active on cpu{c}, now asked to run on cpu{i}");
                return Err(VmExit::EntryFailed(ENTRY_FAIL_INVALID));
            }
            Some(_) => {
                if CURRENT_VMCS[i].load(Ordering::Relaxed) != self.vmcs {
                    // Another VMCS was loaded here meanwhile; ours is still active
                    // (launch state kept), just not current.
                    // SAFETY: our VMCS, active on this CPU only.
                    if let Err(e) = unsafe { vmptrld(self.vmcs) } {
                        error!("vmx: VMPTRLD failed: {e:?}");
                        return Err(VmExit::EntryFailed(ENTRY_FAIL_INVALID));
                    }
                    CURRENT_VMCS[i].store(self.vmcs, Ordering::Relaxed);
                }
                return Ok(());
            }
            None => {}
        }
        // SAFETY: our VMCS, clear (not active on any CPU).
        if let Err(e) = unsafe { vmptrld(self.vmcs) } {
            error!("vmx: VMPTRLD failed: {e:?}");
            return Err(VmExit::EntryFailed(ENTRY_FAIL_INVALID));
        }
        CURRENT_VMCS[i].store(self.vmcs, Ordering::Relaxed);
        self.active_on = Some(i);
        self.launched = false;
        let h = HostState::this_cpu();
        // SAFETY: the values are this CPU's live host state (selectors with RPL/TI
        // cleared as 27.2.3 requires; FS/GS null with their bases from the MSRs, so a
        // VM exit restores IA32_GS_BASE, which holds the CPU index).
        let r = unsafe {
            (|| -> Result<(), VmFail> {
                vmwrite(HOST_CR0, h.cr0)?;
                vmwrite(HOST_CR3, h.cr3)?;
                vmwrite(HOST_CR4, h.cr4)?;
                vmwrite(HOST_CS_SEL, u64::from(h.cs & !7))?;
                vmwrite(HOST_SS_SEL, u64::from(h.ss & !7))?;
                vmwrite(HOST_DS_SEL, u64::from(h.ds & !7))?;
                vmwrite(HOST_ES_SEL, u64::from(h.es & !7))?;
                vmwrite(HOST_FS_SEL, 0)?;
                vmwrite(HOST_GS_SEL, 0)?;
                vmwrite(HOST_TR_SEL, u64::from(h.tr & !7))?;
                vmwrite(HOST_FS_BASE, h.fs_base)?;
                vmwrite(HOST_GS_BASE, h.gs_base)?;
                vmwrite(HOST_TR_BASE, h.tr_base)?;
                vmwrite(HOST_GDTR_BASE, h.gdtr_base)?;
                vmwrite(HOST_IDTR_BASE, h.idtr_base)?;
                vmwrite(HOST_EFER, h.efer)?;
                Ok(())
            })()
        };
        if let Err(e) = r {
            error!("vmx: writing host state failed: {e:?}");
            return Err(VmExit::EntryFailed(ENTRY_FAIL_INVALID));
        }
        if self.last_cpu != Some(i) {
            if let Some(c) = CAPS.get() {
                invvpid(c.invvpid_single, self.vpid);
                invept(c.invept_single, self.eptp);
            }
            self.last_cpu = Some(i);
        }
        Ok(())
    }

    /// Whether the VMCS is the current one on this CPU (so VMREAD reads it).
    fn is_current(&self) -> bool {
        let i = cpu::current_index();
        self.active_on == Some(i) && CURRENT_VMCS[i].load(Ordering::Relaxed) == self.vmcs
    }

    /// Brings the VMCS up to date with what the exit handlers changed.
    fn sync_to_vmcs(&mut self) -> Result<(), VmFail> {
        // SAFETY: the VMCS is current on this CPU; only guest-state and execution
        // control fields are written, with values the entry checks accept (event
        // injection only when `interruptible` said so, 27.3.1.5).
        unsafe {
            if self.rip_dirty {
                vmwrite(GUEST_RIP, self.rip)?;
                self.rip_dirty = false;
            }
            if self.rsp_dirty {
                vmwrite(GUEST_RSP, self.rsp)?;
                self.rsp_dirty = false;
            }
            if self.interruptibility_dirty {
                vmwrite(GUEST_INTERRUPTIBILITY, self.interruptibility)?;
                self.interruptibility_dirty = false;
            }
            if let Some(e) = self.pending {
                vmwrite(ENTRY_INTR_INFO, u64::from(e.info))?;
                if e.info & INTR_INFO_ERROR_CODE != 0 {
                    vmwrite(ENTRY_EXCEPTION_ERROR, u64::from(e.error_code))?;
                }
                if e.instruction_len != 0 {
                    vmwrite(ENTRY_INSTRUCTION_LEN, u64::from(e.instruction_len))?;
                }
            }
            let pin = if self.slice_us != 0 {
                self.pin | PIN_PREEMPTION_TIMER
            } else {
                self.pin & !PIN_PREEMPTION_TIMER
            };
            if pin != self.pin_written {
                vmwrite(PIN_CONTROLS, u64::from(pin))?;
                self.pin_written = pin;
            }
            if self.slice_us != 0 {
                // 26.5.1: the timer counts down at the TSC rate divided by 2^shift.
                let tsc = crate::apic::tsc_per_ms().max(1000) * self.slice_us / 1000;
                let ticks = (tsc >> self.timer_shift).clamp(1, u64::from(u32::MAX));
                vmwrite(PREEMPTION_TIMER_VALUE, ticks)?;
            }
            if self.proc != self.proc_written {
                vmwrite(PROC_CONTROLS, u64::from(self.proc))?;
                self.proc_written = self.proc;
            }
        }
        Ok(())
    }

    /// Reads the guest state the handlers need and decodes the exit (28.2).
    fn decode_exit(&mut self) -> VmExit {
        let exit_reason = vmr(EXIT_REASON) as u32;
        self.rip = vmr(GUEST_RIP);
        self.rflags = vmr(GUEST_RFLAGS);
        self.interruptibility = vmr(GUEST_INTERRUPTIBILITY);
        if exit_reason & EXIT_REASON_ENTRY_FAILURE != 0 {
            // 27.8: failed guest-state checks (33), MSR loading (34) or a machine
            // check (41); the exit qualification says more for 33/34.
            warn!(
                "vmx: VM entry failed: exit reason {:#x}, qualification {:#x}",
                exit_reason,
                vmr(EXIT_QUALIFICATION)
            );
            return VmExit::EntryFailed(u64::from(exit_reason));
        }
        self.launched = true;
        // An event whose delivery the exit interrupted is re-injected (25.9.3, 28.2.4).
        let idt = vmr(IDT_VECTORING_INFO) as u32;
        self.pending = if idt & INTR_INFO_VALID != 0 {
            let ty = idt & INTR_TYPE_MASK;
            Some(Event {
                info: idt & (INTR_INFO_VALID | 0xfff),
                error_code: if idt & INTR_INFO_ERROR_CODE != 0 {
                    vmr(IDT_VECTORING_ERROR) as u32
                } else {
                    0
                },
                // Software interrupts/exceptions (types 4, 5, 6) need the length.
                instruction_len: if ty >= (4 << 8) {
                    vmr(EXIT_INSTRUCTION_LEN) as u32
                } else {
                    0
                },
            })
        } else {
            None
        };
        match exit_reason & 0xffff {
            reason::EXCEPTION_OR_NMI => {
                let info = vmr(EXIT_INTR_INFO) as u32;
                let vector = info as u8;
                if info & INTR_TYPE_MASK == INTR_TYPE_NMI {
                    // The host's NMI (NMI exiting consumed it): hand it to the host
                    // IDT, as SVM does after STGI.
                    // SAFETY: invokes the host's own NMI handler through its IDT.
                    unsafe { core::arch::asm!("int 2") };
                    return VmExit::ExternalInterrupt;
                }
                let error_code =
                    (info & INTR_INFO_ERROR_CODE != 0).then(|| vmr(EXIT_INTR_ERROR) as u32);
                VmExit::Exception { vector, error_code }
            }
            reason::EXTERNAL_INTERRUPT => VmExit::ExternalInterrupt,
            reason::TRIPLE_FAULT => VmExit::Shutdown,
            reason::INTERRUPT_WINDOW => VmExit::InterruptWindow,
            reason::CPUID => VmExit::Cpuid,
            reason::HLT => VmExit::Hlt,
            reason::INVD => VmExit::Instruction(Instruction::Invd),
            reason::RDPMC => VmExit::Instruction(Instruction::Rdpmc),
            reason::MWAIT => VmExit::Instruction(Instruction::Mwait),
            reason::MONITOR => VmExit::Instruction(Instruction::Monitor),
            reason::WBINVD => VmExit::Instruction(Instruction::Wbinvd),
            reason::XSETBV => VmExit::Xsetbv,
            reason::VMCALL => VmExit::Hypercall,
            reason::IO_INSTRUCTION => {
                // Exit qualification for I/O instructions (28.2.1).
                let q = vmr(EXIT_QUALIFICATION);
                VmExit::Io(IoExit {
                    port: (q >> 16) as u16,
                    size: ((q & 7) + 1) as u8,
                    input: q & (1 << 3) != 0,
                    string: q & (1 << 4) != 0,
                    rep: q & (1 << 5) != 0,
                    len: vmr(EXIT_INSTRUCTION_LEN) as u8,
                })
            }
            reason::RDMSR => VmExit::Msr { write: false },
            reason::WRMSR => VmExit::Msr { write: true },
            reason::EPT_VIOLATION => {
                // Exit qualification for EPT violations (28.2.1).
                let q = vmr(EXIT_QUALIFICATION);
                VmExit::NestedPageFault {
                    gpa: vmr(GUEST_PHYSICAL_ADDRESS),
                    write: q & (1 << 1) != 0,
                    fetch: q & (1 << 2) != 0,
                }
            }
            reason::PREEMPTION_TIMER => VmExit::Preempted,
            other => VmExit::Other(u64::from(other)),
        }
    }
}

impl Vcpu for VmxVcpu {
    fn run(&mut self) -> VmExit {
        let i = cpu::current_index();
        if VMXON_REGION[i].load(Ordering::Relaxed) == 0 {
            return VmExit::EntryFailed(ENTRY_FAIL_INVALID);
        }
        if let Err(e) = self.load(i) {
            return e;
        }
        if let Err(e) = self.sync_to_vmcs() {
            error!("vmx: updating the VMCS failed: {e:?}");
            return VmExit::EntryFailed(ENTRY_FAIL_INVALID);
        }
        self.cpu_state.load();
        self.cpu_state.before_entry();
        // SAFETY: VMX operation is on here, the VMCS is current and fully
        // initialised with this CPU's host state and HOST_RIP = `vmx_exit`; the stub
        // writes HOST_RSP itself; `regs` outlives the call.
        let r = unsafe { vmx_run(&mut self.regs, u64::from(self.launched)) };
        self.cpu_state.after_exit();
        let injected = self.pending.take();
        match r {
            0 => {}
            1 => {
                self.pending = injected;
                return VmExit::EntryFailed(ENTRY_FAIL_INVALID);
            }
            _ => {
                self.pending = injected;
                let err = vmr(VM_INSTRUCTION_ERROR);
                warn!(
                    "vmx: {} failed with VM-instruction error {err}",
                    if self.launched {
                        "VMRESUME"
                    } else {
                        "VMLAUNCH"
                    }
                );
                return VmExit::EntryFailed(err);
            }
        }
        let exit = self.decode_exit();
        if exit == VmExit::ExternalInterrupt {
            // External-interrupt exiting without "acknowledge interrupt on exit": the
            // interrupt is still pending in the local APIC; let the host IDT take it.
            crate::interrupts::service_pending();
        }
        exit
    }
    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn set_rip(&mut self, rip: u64) {
        self.rip = rip;
        self.rip_dirty = true;
        // Moving past an instruction ends a blocking-by-STI/MOV-SS shadow.
        if self.interruptibility & INTERRUPTIBILITY_SHADOW != 0 {
            self.interruptibility &= !INTERRUPTIBILITY_SHADOW;
            self.interruptibility_dirty = true;
        }
    }
    fn rsp(&self) -> u64 {
        if self.is_current() {
            vmread(GUEST_RSP).unwrap_or(self.rsp)
        } else {
            self.rsp
        }
    }
    fn set_rsp(&mut self, rsp: u64) {
        self.rsp = rsp;
        self.rsp_dirty = true;
    }
    fn rflags(&self) -> u64 {
        self.rflags
    }
    fn cr3(&self) -> u64 {
        if self.is_current() {
            vmread(GUEST_CR3).unwrap_or(self.cr3)
        } else {
            self.cr3
        }
    }
    fn interruptible(&self) -> bool {
        self.rflags & RFLAGS_IF != 0
            && self.interruptibility & INTERRUPTIBILITY_SHADOW == 0
            && self.pending.is_none()
    }
    fn inject_interrupt(&mut self, vector: u8) {
        self.pending = Some(Event {
            info: INTR_INFO_VALID | INTR_TYPE_EXTERNAL | u32::from(vector),
            error_code: 0,
            instruction_len: 0,
        });
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        // Vector 2 is an NMI, which has its own interruption type (27.6.1.1).
        let ty = if vector == 2 {
            INTR_TYPE_NMI
        } else {
            INTR_TYPE_HW_EXCEPTION
        };
        let mut info = INTR_INFO_VALID | ty | u32::from(vector);
        if error_code.is_some() {
            info |= INTR_INFO_ERROR_CODE;
        }
        self.pending = Some(Event {
            info,
            error_code: error_code.unwrap_or(0),
            instruction_len: 0,
        });
    }
    fn set_interrupt_window(&mut self, on: bool) {
        if on {
            self.proc |= PROC_INTERRUPT_WINDOW_EXITING;
        } else {
            self.proc &= !PROC_INTERRUPT_WINDOW_EXITING;
        }
    }
    fn set_time_slice(&mut self, us: u64) {
        self.slice_us = us;
    }
    fn cpl(&self) -> u8 {
        ((vmr(GUEST_SS_AR) >> 5) & 3) as u8
    }
    fn cr0(&self) -> u64 {
        let mask = vmr(CR0_GUEST_HOST_MASK);
        (vmr(GUEST_CR0) & !mask) | (vmr(CR0_READ_SHADOW) & mask)
    }
    fn start_up(&mut self, _vector: u8) -> Result<(), &'static str> {
        Err("a startup IPI needs real mode, which this VMX backend does not run (no unrestricted guest)")
    }
    fn cr4(&self) -> u64 {
        let mask = vmr(CR4_GUEST_HOST_MASK);
        (vmr(GUEST_CR4) & !mask) | (vmr(CR4_READ_SHADOW) & mask)
    }
    fn efer(&self) -> u64 {
        vmr(GUEST_EFER)
    }
    fn set_efer(&mut self, efer: u64) {
        // SAFETY: a guest-state field of this vCPU's current VMCS; VM entry loads it
        // (ENTRY_LOAD_EFER), and the caller kept long mode on, as the entry controls
        // (IA-32e mode guest) require.
        let _ = unsafe { vmwrite(GUEST_EFER, efer) };
    }
    fn cpu_state(&mut self) -> &mut CpuState {
        &mut self.cpu_state
    }
    fn put(&mut self) {
        self.cpu_state.save();
        let i = cpu::current_index();
        match self.active_on {
            Some(c) if c == i => {}
            Some(c) => {
                error!("vmx: put on cpu{i} of a VMCS active on cpu{c}");
                return;
            }
            None => return,
        }
        if CURRENT_VMCS[i].load(Ordering::Relaxed) == self.vmcs {
            self.rsp = vmr(GUEST_RSP);
            self.cr3 = vmr(GUEST_CR3);
        }
        // SAFETY: our VMCS, active on this CPU.
        if let Err(e) = unsafe { vmclear(self.vmcs) } {
            error!("vmx: VMCLEAR failed: {e:?}");
        }
        if CURRENT_VMCS[i].load(Ordering::Relaxed) == self.vmcs {
            CURRENT_VMCS[i].store(0, Ordering::Relaxed);
        }
        self.active_on = None;
        self.launched = false;
    }
}

impl Drop for VmxVcpu {
    fn drop(&mut self) {
        if self.active_on.is_some() {
            self.put();
        }
        if self.active_on.is_some() {
            // Still cached by another CPU, which may write it back: never reuse it.
            error!("vmx: leaking a VMCS still active on another CPU");
            return;
        }
        frames::free(self.vmcs, 1);
    }
}
