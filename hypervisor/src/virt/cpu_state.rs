//! The CPU state a guest reaches without a VM exit that VM entry and exit do not
//! switch, kept per vCPU.
//!
//! VMRUN/#VMEXIT (APM Vol. 2, 15.5) and VM entry/exit (SDM Vol. 3C, 28.3 and 29.5)
//! leave these registers as the guest left them: the x87/SSE/AVX/AVX-512 registers
//! and PKRU (XSAVE state components), XCR0, DR0-DR3, and under VMX also DR6, CR2,
//! IA32_KERNEL_GS_BASE and the SYSCALL MSRs, which VMX guests reach directly (SVM
//! keeps DR6 and CR2 in the VMCB and switches the others with VMLOAD/VMSAVE). Without this module the next vCPU on a CPU, of any VM,
//! reads what the previous one left there.
//!
//! A vCPU's [`CpuState`] is loaded when it starts a slice on a CPU and saved when the
//! slice ends ([`super::Vcpu::put`]). A saved image whose x87 state is untouched is
//! marked as such, as real CPUs do ([`vdev::xsave::mark_x87_init`], which also says
//! why this matters under QEMU). Loading restores *every* switched component
//! (XRSTOR with the full mask: components the guest never used get their reset state),
//! so nothing of an earlier vCPU survives. The hypervisor itself is built without
//! SSE and never touches these registers in between.
//!
//! XCR0 is different: the hypervisor never runs with a guest's XCR0. The host keeps
//! XCR0 at the full switched mask; the guest's value (checked when it runs XSETBV,
//! which exits) is loaded right before each entry and the host's right after each
//! exit, only when the two differ. After every exit the CPU's XCR0 is also read back:
//! QEMU's TCG ignores the SVM XSETBV intercept, so there a guest's XSETBV runs
//! natively, checked only by the CPU's own rules. The value read back becomes the
//! guest's, and since every user component the CPU lets a guest enable (AMX aside,
//! which needs XFD) is in the switched mask, isolation holds there too; only the
//! refusal of components not offered then rests on the intercept (real AMD CPUs and
//! VMX, where XSETBV always exits).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::cpu::{self, cpuid, rdmsr, wrmsr, MAX_CPUS};
use crate::mm::{frames, phys_to_ptr};

/// XCR0 state-component bits (SDM Vol. 1, 13.1).
pub mod xcr0 {
    /// x87 FPU state (must always be set).
    pub const X87: u64 = 1 << 0;
    /// SSE state (XMM registers, MXCSR).
    pub const SSE: u64 = 1 << 1;
    /// AVX state (upper halves of the YMM registers).
    pub const AVX: u64 = 1 << 2;
    /// MPX bound registers and configuration (switched, never offered).
    pub const MPX: u64 = (1 << 3) | (1 << 4);
    /// AVX-512: opmask, upper halves of ZMM0-15, ZMM16-31 (all or none).
    pub const AVX512: u64 = (1 << 5) | (1 << 6) | (1 << 7);
    /// PKRU (protection keys for user pages).
    pub const PKRU: u64 = 1 << 9;
}

const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// STAR, LSTAR, CSTAR, SFMASK: where SYSCALL goes (switched under VMX, whose guests
/// reach them directly; the hypervisor never runs SYSCALL, so nothing of its own is
/// saved).
const SYSCALL_MSRS: [u32; 4] = [0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084];
const MSR_TSC_AUX: u32 = 0xc000_0103;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;

/// What this machine switches and what guests may enable, decided once at boot.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// XSAVE/XRSTOR are used (else FXSAVE/FXRSTOR: x87 and SSE only).
    pub xsave: bool,
    /// Components saved and restored for every vCPU; also the host's XCR0.
    pub switched: u64,
    /// Components a guest may enable with XSETBV (and CPUID leaf 0xD offers).
    pub guest_allowed: u64,
    /// Bytes of the save area for `switched` (standard format, at most a page).
    pub area_size: u32,
}

static POLICY: spin::Once<Policy> = spin::Once::new();

/// Guest XCR0 changes found at an exit rather than through an XSETBV exit.
pub static NATIVE_XSETBV: AtomicU64 = AtomicU64::new(0);
/// Slices whose state was saved, the TSC cycles spent loading and saving it, and
/// entries that switched XCR0 (for the exit-cost benchmark).
pub static SAVES: AtomicU64 = AtomicU64::new(0);
/// See [`SAVES`].
pub static SWITCH_CYCLES: AtomicU64 = AtomicU64::new(0);
/// See [`SAVES`].
pub static XCR0_SWITCHES: AtomicU64 = AtomicU64::new(0);
/// Saves whose x87 state was in its initial configuration, marked so in the image
/// (see [`vdev::xsave`]: the XRSTOR that follows then takes the x87 init path).
pub static X87_INIT_SAVES: AtomicU64 = AtomicU64::new(0);

/// The area of the vCPU whose state is in each CPU's registers (0: none).
static OWNER: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// The policy ([`init_this_cpu`] must have run on some CPU).
pub fn policy() -> Option<Policy> {
    POLICY.get().copied()
}

fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

fn xsetbv(value: u64) {
    // SAFETY: called only with CR4.OSXSAVE set and a value made of components this CPU
    // supports (checked by `decide` and `check_xsetbv`), so XSETBV cannot fault.
    unsafe {
        asm!("xsetbv", in("ecx") 0, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nomem, nostack, preserves_flags))
    };
}

fn decide() -> Policy {
    let xsave = cpuid(1, 0).ecx & (1 << 26) != 0;
    if !xsave {
        return Policy {
            xsave: false,
            switched: xcr0::X87 | xcr0::SSE,
            guest_allowed: 0,
            area_size: 512,
        };
    }
    let d = cpuid(0xd, 0);
    let supported = (u64::from(d.edx) << 32) | u64::from(d.eax);
    let mut allowed = supported & (xcr0::X87 | xcr0::SSE | xcr0::AVX | xcr0::AVX512);
    if allowed & xcr0::AVX == 0 || allowed & xcr0::AVX512 != xcr0::AVX512 {
        allowed &= !xcr0::AVX512;
    }
    if allowed & xcr0::SSE == 0 {
        allowed &= !(xcr0::AVX | xcr0::AVX512);
    }
    // PKRU is switched but not offered: WRPKRU needs only CR4.PKE, which a guest can set
    // without an exit under SVM, so its value must never outlive its vCPU. MPX too,
    // for a CPU that runs a guest's XSETBV natively (see the module doc).
    let switched = allowed | (supported & (xcr0::PKRU | xcr0::MPX));
    // Standard format: the legacy area and header, then each component at its offset.
    let area_size = (2..63)
        .filter(|i| switched & (1u64 << i) != 0)
        .map(|i| {
            let c = cpuid(0xd, i);
            c.ebx.saturating_add(c.eax)
        })
        .fold(512 + 64, u32::max);
    Policy {
        xsave,
        switched,
        guest_allowed: allowed,
        area_size,
    }
}

/// Prepares this CPU for switching guest state: CR4.OSFXSR/OSXMMEXCPT (and OSXSAVE
/// with XCR0 = the switched mask), and TSC_AUX = 0, since RDPID reads it natively
/// under SVM and guests must not learn host CPU numbers from it. Runs on every CPU
/// before its first guest.
pub fn init_this_cpu() -> Result<Policy, &'static str> {
    let p = *POLICY.call_once(decide);
    if p.area_size > 4096 {
        return Err("the XSAVE area of the switched components is larger than a page");
    }
    let mut cr4 = read_cr4() | CR4_OSFXSR | CR4_OSXMMEXCPT;
    if p.xsave {
        cr4 |= CR4_OSXSAVE;
    }
    // SAFETY: OSFXSR/OSXMMEXCPT exist on every x86_64 CPU and OSXSAVE is set only when
    // CPUID reports XSAVE; they change how SSE/XSAVE instructions behave, which the
    // hypervisor (built without SSE) does not use.
    unsafe { asm!("mov cr4, {}", in(reg) cr4, options(nomem, nostack, preserves_flags)) };
    if p.xsave {
        xsetbv(p.switched);
    }
    let ext = cpuid(0x8000_0000, 0).eax;
    let rdtscp = ext >= 0x8000_0001 && cpuid(0x8000_0001, 0).edx & (1 << 27) != 0;
    let rdpid = cpuid(0, 0).eax >= 7 && cpuid(7, 0).ecx & (1 << 22) != 0;
    if rdtscp || rdpid {
        // SAFETY: TSC_AUX exists when RDTSCP or RDPID does; nothing in the hypervisor
        // reads it.
        unsafe { wrmsr(MSR_TSC_AUX, 0) };
    }
    Ok(p)
}

/// Which of the registers outside the XSAVE area a backend needs switched here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extras {
    /// DR0-DR3 only (SVM: DR6, DR7, CR2 in the VMCB; kernel GS base by VMLOAD/VMSAVE).
    DebugAddresses,
    /// DR0-DR3, DR6, CR2, IA32_KERNEL_GS_BASE and the SYSCALL MSRs (VMX: DR7, the
    /// FS/GS bases and the SYSENTER MSRs are in the VMCS).
    DebugAndSyscallState,
}

/// One vCPU's copy of the unswitched CPU state.
pub struct CpuState {
    /// A frame holding the XSAVE (or FXSAVE) image, 64-byte aligned.
    area: u64,
    xcr0: u64,
    dr: [u64; 4],
    dr6: u64,
    cr2: u64,
    kernel_gs_base: u64,
    syscall: [u64; 4],
    extras: Extras,
}

impl CpuState {
    /// Reset state (SDM Vol. 3A, 10.1.1: XCR0 = 1, MXCSR = 0x1F80, FCW = 0x37F, all
    /// vector registers zero, DR0-3 zero, DR6 = 0xFFFF0FF0).
    pub fn new(extras: Extras) -> Result<Self, &'static str> {
        policy().ok_or("CPU state switching is not initialised")?;
        let area = frames::alloc().ok_or("no memory for the vCPU's FPU state")?;
        let p = phys_to_ptr::<u8>(area);
        // SAFETY: a fresh frame of ours; the legacy area's FCW (offset 0) and MXCSR
        // (offset 24) get their reset values, the XSAVE header (XSTATE_BV = 0: every
        // component in its initial configuration) stays zero.
        unsafe {
            core::ptr::write_bytes(p, 0, 4096);
            p.cast::<u16>().write(0x037f);
            p.add(24).cast::<u32>().write(0x1f80);
        }
        Ok(Self {
            area,
            xcr0: xcr0::X87,
            dr: [0; 4],
            dr6: 0xffff_0ff0,
            cr2: 0,
            kernel_gs_base: 0,
            syscall: [0; 4],
            extras,
        })
    }

    /// The guest's XCR0.
    pub fn xcr0(&self) -> u64 {
        self.xcr0
    }

    /// Emulates XSETBV of `value` into XCR`index`: `Err(())` means #GP (SDM Vol. 2C,
    /// XSETBV; APM Vol. 3, XSETBV): only XCR0, x87 always on, AVX needs SSE, AVX-512 all
    /// or none and with AVX, and nothing the hypervisor does not offer.
    pub fn set_xcr(&mut self, index: u32, value: u64) -> Result<(), ()> {
        let p = policy().ok_or(())?;
        let valid = index == 0
            && p.xsave
            && value & xcr0::X87 != 0
            && value & !p.guest_allowed == 0
            && !(value & xcr0::AVX != 0 && value & xcr0::SSE == 0)
            && matches!(value & xcr0::AVX512, 0 | xcr0::AVX512)
            && !(value & xcr0::AVX512 != 0 && value & xcr0::AVX == 0);
        if !valid {
            return Err(());
        }
        self.xcr0 = value;
        Ok(())
    }

    /// Loads this vCPU's state into the CPU, unless it is there already. Call before
    /// each entry; cheap when nothing changed.
    pub fn load(&mut self) {
        if cfg!(feature = "test-broken-cpu-state") {
            return;
        }
        let i = cpu::current_index();
        if OWNER[i].load(Ordering::Relaxed) == self.area {
            return;
        }
        let Some(p) = policy() else { return };
        let t0 = cpu::rdtsc();
        let area = phys_to_ptr::<u8>(self.area);
        // SAFETY: `area` is this vCPU's 64-byte aligned image, written by `new` or by
        // `save` with the same policy, so XRSTOR/FXRSTOR accept it; XCR0 is the
        // switched mask here, so every switched component is restored or reset.
        unsafe {
            if p.xsave {
                asm!("xrstor64 [{}]", in(reg) area, in("eax") p.switched as u32,
                     in("edx") (p.switched >> 32) as u32, options(readonly, nostack));
            } else {
                asm!("fxrstor64 [{}]", in(reg) area, options(readonly, nostack));
            }
            asm!("mov dr0, {}", in(reg) self.dr[0], options(nomem, nostack));
            asm!("mov dr1, {}", in(reg) self.dr[1], options(nomem, nostack));
            asm!("mov dr2, {}", in(reg) self.dr[2], options(nomem, nostack));
            asm!("mov dr3, {}", in(reg) self.dr[3], options(nomem, nostack));
            if self.extras == Extras::DebugAndSyscallState {
                asm!("mov dr6, {}", in(reg) self.dr6, options(nomem, nostack));
                asm!("mov cr2, {}", in(reg) self.cr2, options(nomem, nostack));
                wrmsr(MSR_KERNEL_GS_BASE, self.kernel_gs_base);
                for (msr, v) in SYSCALL_MSRS.iter().zip(self.syscall) {
                    wrmsr(*msr, v);
                }
            }
        }
        OWNER[i].store(self.area, Ordering::Relaxed);
        SWITCH_CYCLES.fetch_add(cpu::rdtsc().wrapping_sub(t0), Ordering::Relaxed);
    }

    /// Saves this vCPU's state from the CPU if it is there (end of its slice).
    pub fn save(&mut self) {
        let i = cpu::current_index();
        if OWNER[i].load(Ordering::Relaxed) != self.area {
            return;
        }
        let Some(p) = policy() else { return };
        let t0 = cpu::rdtsc();
        let area = phys_to_ptr::<u8>(self.area);
        // SAFETY: writes this vCPU's own image (large enough for `switched`, checked
        // at boot); the register reads have no side effects. XCR0 is the host's.
        unsafe {
            if p.xsave {
                asm!("xsave64 [{}]", in(reg) area, in("eax") p.switched as u32,
                     in("edx") (p.switched >> 32) as u32, options(nostack));
                // The image is ours and `area_size` (>= the legacy area and header)
                // long; nothing else touches it while we hold `&mut self`.
                let image = core::slice::from_raw_parts_mut(area, p.area_size as usize);
                if vdev::xsave::mark_x87_init(image) {
                    X87_INIT_SAVES.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                asm!("fxsave64 [{}]", in(reg) area, options(nostack));
            }
            asm!("mov {}, dr0", out(reg) self.dr[0], options(nomem, nostack));
            asm!("mov {}, dr1", out(reg) self.dr[1], options(nomem, nostack));
            asm!("mov {}, dr2", out(reg) self.dr[2], options(nomem, nostack));
            asm!("mov {}, dr3", out(reg) self.dr[3], options(nomem, nostack));
            if self.extras == Extras::DebugAndSyscallState {
                asm!("mov {}, dr6", out(reg) self.dr6, options(nomem, nostack));
                asm!("mov {}, cr2", out(reg) self.cr2, options(nomem, nostack));
                self.kernel_gs_base = rdmsr(MSR_KERNEL_GS_BASE);
                for (msr, v) in SYSCALL_MSRS.iter().zip(&mut self.syscall) {
                    *v = rdmsr(*msr);
                }
            }
        }
        OWNER[i].store(0, Ordering::Relaxed);
        SAVES.fetch_add(1, Ordering::Relaxed);
        SWITCH_CYCLES.fetch_add(cpu::rdtsc().wrapping_sub(t0), Ordering::Relaxed);
    }

    /// Right before entry: the guest's XCR0 if it differs from the host's.
    #[inline]
    pub fn before_entry(&self) {
        match policy() {
            Some(p) if p.xsave && self.xcr0 != p.switched => {
                XCR0_SWITCHES.fetch_add(1, Ordering::Relaxed);
                xsetbv(self.xcr0);
            }
            _ => {}
        }
    }

    /// Right after exit: takes the guest's XCR0 as the CPU holds it (see the module
    /// doc) and puts the host's back.
    #[inline]
    pub fn after_exit(&mut self) {
        let Some(p) = policy().filter(|p| p.xsave) else {
            return;
        };
        let (lo, hi): (u32, u32);
        // SAFETY: XGETBV only reads XCR0; CR4.OSXSAVE is set on every CPU that runs
        // guests when the policy uses XSAVE.
        unsafe {
            asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi,
                 options(nomem, nostack, preserves_flags))
        };
        let hw = (u64::from(hi) << 32) | u64::from(lo);
        if hw != self.xcr0 {
            NATIVE_XSETBV.fetch_add(1, Ordering::Relaxed);
            self.xcr0 = hw;
        }
        if hw != p.switched {
            xsetbv(p.switched);
        }
    }
}

impl Drop for CpuState {
    fn drop(&mut self) {
        // A dropped vCPU's registers may still be on a CPU; the next load there
        // overwrites them all, but the owner mark must not match a reused frame.
        for o in &OWNER {
            let _ = o.compare_exchange(self.area, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
        frames::free(self.area, 1);
    }
}
