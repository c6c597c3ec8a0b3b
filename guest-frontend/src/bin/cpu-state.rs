//! CPU-state isolation probe: run two or more of these on one physical CPU and each
//! checks, over many switches, that the CPU state it can reach without a VM exit is
//! its own.
//!
//! Every round the guest writes values tagged with its VM id into xmm0-15 (ymm0-15
//! when AVX is offered), DR0-DR3 and DR6, the GS base and, through SWAPGS, the kernel
//! GS base (when FSGSBASE is offered), the syscall MSRs LSTAR and SYSENTER_EIP (when
//! the hypervisor lets it reach them: a RDMSR that does not fault), and sets XCR0;
//! then it yields, so a neighbour
//! runs on the same CPU, and reads everything back. A guest named `spy*` also flips
//! its XCR0 between x87|SSE and x87|SSE|AVX every round, so a hypervisor that lets a
//! guest's XCR0 reach the CPU for others breaks its neighbour's AVX state.
//!
//! Before its first write it checks that a fresh vCPU sees the architectural reset
//! state (zeroed vector registers, DR0-3, kernel GS base, LSTAR, SYSENTER_EIP;
//! XCR0 = 1). It also checks
//! what the hypervisor refuses: XSETBV of values that are invalid or not offered
//! (#GP), CPUID.1:ECX.OSXSAVE following CR4, RDTSCP and MONITOR only when offered
//! (#UD otherwise), RDPMC (#GP: host performance counters are not the guest's), and
//! that WBINVD completes.
//!
//! Prints `cpu-state: <name>: N rounds, own state intact ...` and shuts down with 0,
//! or names the first register that held a value that was not its own and fails.
#![no_std]
#![no_main]

use core::arch::asm;

use guest_frontend::boot_info::BootInfo;
use guest_frontend::{cpu, exit, hypercall, idt, println};

guest_frontend::entry!(main);

const ROUNDS: u64 = 150;

const XCR0_X87: u64 = 1;
const XCR0_SSE: u64 = 2;
const XCR0_AVX: u64 = 4;

/// What CPUID offers this guest.
#[derive(Clone, Copy)]
struct Offered {
    xsave: bool,
    avx: bool,
    fsgsbase: bool,
    /// RDMSR/WRMSR of LSTAR and SYSENTER_EIP reach this vCPU's own copies.
    msrs: bool,
    rdtscp: bool,
    monitor: bool,
    /// XCR0 bits the hypervisor lets the guest enable (CPUID.(0xD,0):EDX:EAX).
    xcr0_mask: u64,
}

/// The register image one round writes and reads back.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, align(32))]
struct VectorRegs([[u64; 4]; 16]);

#[derive(Clone, Copy, PartialEq, Eq, Default)]
struct OtherRegs {
    dr: [u64; 4],
    dr6: u64,
    gs_base: u64,
    kernel_gs_base: u64,
    lstar: u64,
    sysenter_eip: u64,
    xcr0: u64,
}

const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SYSENTER_EIP: u32 = 0x176;

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only called for MSRs `offered` found readable.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: LSTAR and SYSENTER_EIP get canonical values; nothing in this guest
    // executes SYSCALL or SYSENTER.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nomem, nostack))
    };
}

fn fail(name: &str, what: core::fmt::Arguments<'_>) -> ! {
    println!("cpu-state: {name}: FAIL: {what}");
    hypercall::shutdown(exit::FAILED)
}

/// Runs `$insn` with the exception handler armed: `Some(vector)` if it faulted.
macro_rules! probe {
    ($($insn:literal),+ $(; $($operands:tt)*)?) => {{
        let slot = idt::expect_fault_slot();
        // SAFETY: the handler resumes at the label after the instruction if it faults;
        // the probed instructions change nothing but this vCPU's registers.
        unsafe {
            asm!(
                "lea {tmp}, [rip + 3f]",
                "mov [{slot}], {tmp}",
                $($insn,)+
                "3:",
                tmp = out(reg) _,
                slot = in(reg) slot,
                $($($operands)*,)?
                options(nostack),
            )
        };
        idt::expected_fault_taken()
    }};
}

fn read_cr(n: u8) -> u64 {
    let v: u64;
    // SAFETY: reading control registers at CPL0 has no side effects.
    unsafe {
        match n {
            0 => asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)),
            _ => asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)),
        }
    }
    v
}

fn write_cr(n: u8, v: u64) {
    // SAFETY: the caller sets only the FPU/SSE/XSAVE/FSGSBASE enables CPUID offered.
    unsafe {
        match n {
            0 => asm!("mov cr0, {}", in(reg) v, options(nomem, nostack)),
            _ => asm!("mov cr4, {}", in(reg) v, options(nomem, nostack)),
        }
    }
}

fn offered() -> Offered {
    let l1 = cpu::cpuid(1, 0);
    let l7 = cpu::cpuid(7, 0);
    let ext = cpu::cpuid(0x8000_0001, 0);
    let xsave = l1.ecx & (1 << 26) != 0;
    let xcr0_mask = if xsave {
        let d = cpu::cpuid(0xd, 0);
        (u64::from(d.edx) << 32) | u64::from(d.eax)
    } else {
        0
    };
    Offered {
        xsave,
        avx: xsave && l1.ecx & (1 << 28) != 0 && xcr0_mask & XCR0_AVX != 0,
        fsgsbase: l7.ebx & 1 != 0,
        msrs: probe!("rdmsr"; in("ecx") MSR_LSTAR, out("eax") _, out("edx") _).is_none(),
        rdtscp: ext.edx & (1 << 27) != 0,
        monitor: l1.ecx & (1 << 3) != 0,
        xcr0_mask,
    }
}

/// Turns on what the probe needs: x87/SSE (CR0.EM off, CR4.OSFXSR), XSAVE and
/// FSGSBASE where offered.
fn enable(o: &Offered) {
    let cr0 = (read_cr(0) & !((1 << 2) | (1 << 3))) | (1 << 1);
    write_cr(0, cr0);
    let mut cr4 = read_cr(4) | (1 << 9) | (1 << 10);
    if o.xsave {
        cr4 |= 1 << 18;
    }
    if o.fsgsbase {
        cr4 |= 1 << 16;
    }
    write_cr(4, cr4);
    // SAFETY: FNINIT resets this vCPU's x87 state only.
    unsafe { asm!("fninit", options(nomem, nostack)) };
}

fn store_vectors(avx: bool) -> VectorRegs {
    let mut r = VectorRegs([[0; 4]; 16]);
    let p = r.0.as_mut_ptr();
    // SAFETY: `r` is 32-byte aligned and 512 bytes: 16 slots of 32 bytes; the stores
    // only write it.
    unsafe {
        if avx {
            asm!(
                "vmovdqa [{p}], ymm0", "vmovdqa [{p} + 32], ymm1", "vmovdqa [{p} + 64], ymm2",
                "vmovdqa [{p} + 96], ymm3", "vmovdqa [{p} + 128], ymm4", "vmovdqa [{p} + 160], ymm5",
                "vmovdqa [{p} + 192], ymm6", "vmovdqa [{p} + 224], ymm7", "vmovdqa [{p} + 256], ymm8",
                "vmovdqa [{p} + 288], ymm9", "vmovdqa [{p} + 320], ymm10", "vmovdqa [{p} + 352], ymm11",
                "vmovdqa [{p} + 384], ymm12", "vmovdqa [{p} + 416], ymm13", "vmovdqa [{p} + 448], ymm14",
                "vmovdqa [{p} + 480], ymm15",
                p = in(reg) p, options(nostack),
            );
        } else {
            asm!(
                "movdqa [{p}], xmm0", "movdqa [{p} + 32], xmm1", "movdqa [{p} + 64], xmm2",
                "movdqa [{p} + 96], xmm3", "movdqa [{p} + 128], xmm4", "movdqa [{p} + 160], xmm5",
                "movdqa [{p} + 192], xmm6", "movdqa [{p} + 224], xmm7", "movdqa [{p} + 256], xmm8",
                "movdqa [{p} + 288], xmm9", "movdqa [{p} + 320], xmm10", "movdqa [{p} + 352], xmm11",
                "movdqa [{p} + 384], xmm12", "movdqa [{p} + 416], xmm13", "movdqa [{p} + 448], xmm14",
                "movdqa [{p} + 480], xmm15",
                p = in(reg) p, options(nostack),
            );
        }
    }
    r
}

fn load_vectors(r: &VectorRegs, avx: bool) {
    let p = r.0.as_ptr();
    // SAFETY: reads the 512-byte aligned image into this vCPU's vector registers,
    // which no compiled code uses (the target has no SSE).
    unsafe {
        if avx {
            asm!(
                "vmovdqa ymm0, [{p}]", "vmovdqa ymm1, [{p} + 32]", "vmovdqa ymm2, [{p} + 64]",
                "vmovdqa ymm3, [{p} + 96]", "vmovdqa ymm4, [{p} + 128]", "vmovdqa ymm5, [{p} + 160]",
                "vmovdqa ymm6, [{p} + 192]", "vmovdqa ymm7, [{p} + 224]", "vmovdqa ymm8, [{p} + 256]",
                "vmovdqa ymm9, [{p} + 288]", "vmovdqa ymm10, [{p} + 320]", "vmovdqa ymm11, [{p} + 352]",
                "vmovdqa ymm12, [{p} + 384]", "vmovdqa ymm13, [{p} + 416]", "vmovdqa ymm14, [{p} + 448]",
                "vmovdqa ymm15, [{p} + 480]",
                p = in(reg) p, options(nostack, readonly),
            );
        } else {
            asm!(
                "movdqa xmm0, [{p}]", "movdqa xmm1, [{p} + 32]", "movdqa xmm2, [{p} + 64]",
                "movdqa xmm3, [{p} + 96]", "movdqa xmm4, [{p} + 128]", "movdqa xmm5, [{p} + 160]",
                "movdqa xmm6, [{p} + 192]", "movdqa xmm7, [{p} + 224]", "movdqa xmm8, [{p} + 256]",
                "movdqa xmm9, [{p} + 288]", "movdqa xmm10, [{p} + 320]", "movdqa xmm11, [{p} + 352]",
                "movdqa xmm12, [{p} + 384]", "movdqa xmm13, [{p} + 416]", "movdqa xmm14, [{p} + 448]",
                "movdqa xmm15, [{p} + 480]",
                p = in(reg) p, options(nostack, readonly),
            );
        }
    }
}

fn read_other(o: &Offered) -> OtherRegs {
    let mut r = OtherRegs::default();
    // SAFETY: debug-register reads at CPL0 have no side effects.
    unsafe {
        asm!("mov {}, dr0", out(reg) r.dr[0], options(nomem, nostack));
        asm!("mov {}, dr1", out(reg) r.dr[1], options(nomem, nostack));
        asm!("mov {}, dr2", out(reg) r.dr[2], options(nomem, nostack));
        asm!("mov {}, dr3", out(reg) r.dr[3], options(nomem, nostack));
        asm!("mov {}, dr6", out(reg) r.dr6, options(nomem, nostack));
    }
    if o.fsgsbase {
        // SAFETY: SWAPGS twice leaves GS as it was; nothing in this guest uses GS.
        unsafe {
            asm!(
                "rdgsbase {g}", "swapgs", "rdgsbase {k}", "swapgs",
                g = out(reg) r.gs_base, k = out(reg) r.kernel_gs_base, options(nomem, nostack),
            )
        };
    }
    if o.msrs {
        r.lstar = rdmsr(MSR_LSTAR);
        r.sysenter_eip = rdmsr(MSR_SYSENTER_EIP);
    }
    if o.xsave {
        r.xcr0 = cpu::xgetbv(0);
    }
    r
}

fn write_other(o: &Offered, r: &OtherRegs) {
    // SAFETY: DR7 keeps every breakpoint disabled, so DR0-3 only hold values; DR6 gets
    // its reserved bits as they read.
    unsafe {
        asm!("mov dr0, {}", in(reg) r.dr[0], options(nomem, nostack));
        asm!("mov dr1, {}", in(reg) r.dr[1], options(nomem, nostack));
        asm!("mov dr2, {}", in(reg) r.dr[2], options(nomem, nostack));
        asm!("mov dr3, {}", in(reg) r.dr[3], options(nomem, nostack));
        asm!("mov dr6, {}", in(reg) r.dr6, options(nomem, nostack));
    }
    if o.fsgsbase {
        // SAFETY: as in `read_other`: the kernel GS base gets `k`, the GS base `g`.
        unsafe {
            asm!(
                "wrgsbase {k}", "swapgs", "wrgsbase {g}",
                k = in(reg) r.kernel_gs_base, g = in(reg) r.gs_base, options(nomem, nostack),
            )
        };
    }
    if o.msrs {
        wrmsr(MSR_LSTAR, r.lstar);
        wrmsr(MSR_SYSENTER_EIP, r.sysenter_eip);
    }
}

/// A canonical, VM-tagged value: bits 47:40 hold the VM id + 1, so a value that
/// leaked from a neighbour names it.
fn tagged(vm: u32, round: u64, k: u64) -> u64 {
    (u64::from(vm + 1) << 40) | ((round & 0xffff) << 16) | ((k & 0xff) << 4)
}

fn owner(v: u64) -> u64 {
    ((v >> 40) & 0xff).wrapping_sub(1)
}

/// Checks the reset state a fresh vCPU must see.
fn check_fresh(name: &str, o: &Offered) {
    let v = store_vectors(false);
    if let Some((i, w)) = v.0.iter().enumerate().find(|(_, w)| w[0] != 0 || w[1] != 0) {
        fail(
            name,
            format_args!(
                "fresh vCPU: xmm{i} = {:#x}:{:#x}, not zero (value of vm {})",
                w[1],
                w[0],
                owner(w[0])
            ),
        );
    }
    let r = read_other(o);
    if r.dr != [0; 4] {
        fail(
            name,
            format_args!("fresh vCPU: DR0-3 = {:x?}, not zero", r.dr),
        );
    }
    if r.kernel_gs_base != 0 {
        fail(
            name,
            format_args!(
                "fresh vCPU: kernel GS base {:#x}, not zero",
                r.kernel_gs_base
            ),
        );
    }
    if r.lstar != 0 || r.sysenter_eip != 0 {
        fail(
            name,
            format_args!(
                "fresh vCPU: LSTAR {:#x}, SYSENTER_EIP {:#x}, not zero (value of vm {})",
                r.lstar,
                r.sysenter_eip,
                owner(r.lstar | r.sysenter_eip)
            ),
        );
    }
    if o.xsave && r.xcr0 != XCR0_X87 {
        fail(
            name,
            format_args!("fresh vCPU: XCR0 {:#x}, not the reset value 1", r.xcr0),
        );
    }
}

/// XSETBV must refuse what the architecture or the hypervisor does not allow.
fn check_xsetbv_refusals(name: &str, o: &Offered) {
    if !o.xsave {
        return;
    }
    if cpu::cpuid(1, 0).ecx & (1 << 27) == 0 {
        fail(
            name,
            format_args!("CPUID.1:ECX.OSXSAVE is clear with CR4.OSXSAVE set"),
        );
    }
    let not_offered = (0..63)
        .map(|b| 1u64 << b)
        .find(|b| o.xcr0_mask & b == 0)
        .unwrap_or(1 << 62);
    for (what, xcr, value) in [
        ("XCR0 without x87", 0u32, XCR0_SSE),
        ("AVX without SSE", 0, XCR0_X87 | XCR0_AVX),
        ("a bit not offered", 0, XCR0_X87 | XCR0_SSE | not_offered),
        ("XCR1", 1, XCR0_X87),
    ] {
        if cpu::xsetbv(xcr, value) != Err(13) {
            fail(
                name,
                format_args!("XSETBV of {what} (XCR{xcr} = {value:#x}) did not #GP"),
            );
        }
    }
    if let Err(v) = cpu::xsetbv(0, o.xcr0_mask) {
        fail(
            name,
            format_args!(
                "XSETBV of the offered mask {:#x} faulted ({v})",
                o.xcr0_mask
            ),
        );
    }
    if cpu::xgetbv(0) != o.xcr0_mask {
        fail(
            name,
            format_args!(
                "XCR0 reads {:#x} after setting {:#x}",
                cpu::xgetbv(0),
                o.xcr0_mask
            ),
        );
    }
}

/// Instructions that would reach host state or the whole machine.
fn check_instructions(name: &str, o: &Offered) {
    // RDTSCP when not offered: #UD, or (QEMU's SVM ignores the RDTSCP intercept) it
    // runs and must read a TSC_AUX of 0, nothing that names a host CPU.
    let aux: u32;
    let rdtscp = probe!("xor ecx, ecx", "rdtscp"; out("eax") _, out("edx") _, out("ecx") aux);
    match (o.rdtscp, rdtscp) {
        (false, Some(6)) | (true, None) => {}
        (false, None) if aux == 0 => {}
        (offered, got) => fail(
            name,
            format_args!("RDTSCP (offered: {offered}) gave {got:?}, TSC_AUX {aux:#x}"),
        ),
    }
    let rdpmc = probe!("rdpmc"; in("ecx") 0u32, out("eax") _, out("edx") _);
    if rdpmc != Some(13) {
        fail(
            name,
            format_args!("RDPMC of counter 0 gave {rdpmc:?}, not #GP"),
        );
    }
    let wbinvd = probe!("wbinvd");
    if wbinvd.is_some() {
        fail(name, format_args!("WBINVD faulted: {wbinvd:?}"));
    }
    let monitor = probe!("monitor"; in("rax") 0x8000u64, in("ecx") 0u32, in("edx") 0u32);
    match (o.monitor, monitor) {
        (false, Some(6)) | (true, None) => {}
        (offered, got) => fail(
            name,
            format_args!("MONITOR (offered: {offered}) gave {got:?}"),
        ),
    }
}

fn main(info: &BootInfo) -> ! {
    let name = info.name();
    let vm = info.vm_id;
    let spy = name.starts_with("spy");
    let o = offered();
    enable(&o);
    check_fresh(name, &o);
    check_xsetbv_refusals(name, &o);
    check_instructions(name, &o);
    let full = if o.avx {
        XCR0_X87 | XCR0_SSE | XCR0_AVX
    } else {
        XCR0_X87 | XCR0_SSE
    };
    println!(
        "cpu-state: {name}: checking {ROUNDS} switches (xsave {}, avx {}, fsgsbase {}, msrs {}, xcr0 mask {:#x})",
        o.xsave, o.avx, o.fsgsbase, o.msrs, o.xcr0_mask
    );
    for round in 0..ROUNDS {
        let xcr0 = if spy && round % 2 == 0 {
            XCR0_X87 | XCR0_SSE
        } else {
            full
        };
        if o.xsave {
            if let Err(v) = cpu::xsetbv(0, xcr0) {
                fail(name, format_args!("XSETBV {xcr0:#x} faulted ({v})"));
            }
        }
        let avx = o.avx && xcr0 & XCR0_AVX != 0;
        let mut want = VectorRegs([[0; 4]; 16]);
        for (i, w) in want.0.iter_mut().enumerate() {
            for (j, q) in w.iter_mut().enumerate() {
                *q = if avx || j < 2 {
                    tagged(vm, round, (i * 4 + j) as u64)
                } else {
                    0
                };
            }
        }
        let other = OtherRegs {
            dr: core::array::from_fn(|i| tagged(vm, round, 0x80 + i as u64)),
            dr6: 0xffff_0ff0 | (round & 0xf),
            gs_base: if o.fsgsbase {
                tagged(vm, round, 0xa0)
            } else {
                0
            },
            kernel_gs_base: if o.fsgsbase {
                tagged(vm, round, 0xa1)
            } else {
                0
            },
            lstar: if o.msrs { tagged(vm, round, 0xa2) } else { 0 },
            sysenter_eip: if o.msrs { tagged(vm, round, 0xa3) } else { 0 },
            xcr0: if o.xsave { xcr0 } else { 0 },
        };
        load_vectors(&want, avx);
        write_other(&o, &other);
        hypercall::yield_now();
        let got = store_vectors(avx);
        let got_other = read_other(&o);
        for (i, (g, w)) in got.0.iter().zip(want.0.iter()).enumerate() {
            let lanes = if avx { 4 } else { 2 };
            if g[..lanes] != w[..lanes] {
                let reg = if avx { "ymm" } else { "xmm" };
                fail(
                    name,
                    format_args!(
                        "round {round}: {reg}{i} = {:x?}, expected {:x?} (value of vm {})",
                        &g[..lanes],
                        &w[..lanes],
                        owner(g[0])
                    ),
                );
            }
        }
        if got_other != other {
            let what = if got_other.dr != other.dr {
                "DR0-3"
            } else if got_other.dr6 != other.dr6 {
                "DR6"
            } else if got_other.gs_base != other.gs_base {
                "GS base"
            } else if got_other.kernel_gs_base != other.kernel_gs_base {
                "kernel GS base"
            } else if got_other.lstar != other.lstar {
                "LSTAR"
            } else if got_other.sysenter_eip != other.sysenter_eip {
                "SYSENTER_EIP"
            } else {
                "XCR0"
            };
            fail(
                name,
                format_args!(
                "round {round}: {what} changed: dr {:x?} dr6 {:#x} gs {:#x} kgs {:#x} lstar {:#x} \
                 sysenter_eip {:#x} xcr0 {:#x}, expected dr {:x?} dr6 {:#x} gs {:#x} kgs {:#x} \
                 lstar {:#x} sysenter_eip {:#x} xcr0 {:#x}",
                got_other.dr, got_other.dr6, got_other.gs_base, got_other.kernel_gs_base,
                got_other.lstar, got_other.sysenter_eip, got_other.xcr0,
                other.dr, other.dr6, other.gs_base, other.kernel_gs_base, other.lstar,
                other.sysenter_eip, other.xcr0
            ),
            );
        }
    }
    println!(
        "cpu-state: {name}: {ROUNDS} rounds, own state intact after every switch \
         (vector registers, DR0-3, DR6, GS bases, syscall MSRs, XCR0)"
    );
    hypercall::shutdown(exit::OK)
}
