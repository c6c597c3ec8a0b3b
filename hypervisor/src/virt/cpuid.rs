//! The CPUID a guest sees: the host's, with everything the hypervisor does not
//! virtualize or switch per vCPU taken out, and the bits that depend on the guest's
//! own state (OSXSAVE, the XSAVE area sizes) computed from it.
//!
//! Hidden: VMX and SVM; MONITOR/MWAIT (intercepted, #UD); RDTSCP and RDPID (TSC_AUX is
//! not the guest's); performance monitoring (leaf 0xA, PDCM, PERFCTR_CORE: RDPMC is
//! refused); PKU, CET, MPX, AMX and XSAVES (state not offered); AVX/AVX-512 when the
//! XCR0 policy does not offer them; x2APIC (the virtual local APIC is an xAPIC) and
//! the host's topology (HTT, leaves 0xB/0x1F/0x8000_001E: each vCPU is a core of its
//! own with its APIC id in leaf 1); machine checks and MTRRs (MCE, MCA, MTRR: their
//! MSRs are not emulated, and guest RAM is write-back whatever they would say).
//!
//! Offered beyond the host: TSC-deadline (the virtual local APIC emulates
//! IA32_TSC_DEADLINE) and ARAT (its timer does not stop in deep C-states: there are
//! none), which together let Linux run its clock events without a PIT.

use core::arch::x86_64::CpuidResult;

use super::cpu_state::{xcr0, Policy};

/// The guest state CPUID depends on.
#[derive(Clone, Copy, Debug)]
pub struct GuestView {
    /// CR4 as the guest sees it.
    pub cr4: u64,
    /// The guest's XCR0.
    pub xcr0: u64,
    /// The vCPU's local APIC id.
    pub apic_id: u8,
}

const ZERO: CpuidResult = CpuidResult {
    eax: 0,
    ebx: 0,
    ecx: 0,
    edx: 0,
};

/// Bytes of a standard-format XSAVE area holding the components in `mask`.
fn xsave_size(host: &dyn Fn(u32, u32) -> CpuidResult, mask: u64) -> u32 {
    (2..63)
        .filter(|i| mask & (1u64 << i) != 0)
        .map(|i| {
            let c = host(0xd, i);
            c.ebx.saturating_add(c.eax)
        })
        .fold(512 + 64, u32::max)
}

/// Bytes of a compacted-format XSAVE area (XSAVEC) holding the components in `mask`:
/// the legacy area and header, then each component in order, 64-byte aligned where
/// its sub-leaf's ECX bit 1 says so (SDM 1, 13.4.3).
fn xsave_compacted_size(host: &dyn Fn(u32, u32) -> CpuidResult, mask: u64) -> u32 {
    (2..63)
        .filter(|i| mask & (1u64 << i) != 0)
        .fold(512 + 64, |size: u32, i| {
            let c = host(0xd, i);
            let start = if c.ecx & 2 != 0 {
                size.saturating_add(63) & !63
            } else {
                size
            };
            start.saturating_add(c.eax)
        })
}

/// CPUID leaf `leaf`, sub-leaf `sub` as vCPU `view` sees it, from the host's answers.
pub fn guest_cpuid(
    leaf: u32,
    sub: u32,
    host: &dyn Fn(u32, u32) -> CpuidResult,
    policy: &Policy,
    view: GuestView,
) -> CpuidResult {
    let avx = policy.guest_allowed & xcr0::AVX != 0;
    let avx512 = policy.guest_allowed & xcr0::AVX512 != 0;
    let mut r = host(leaf, sub);
    match leaf {
        1 => {
            r.ecx &= !((1 << 3) | (1 << 5) | (1 << 15) | (1 << 21)); // MONITOR, VMX, PDCM, x2APIC
            r.ecx |= (1 << 31) | (1 << 24); // hypervisor present, TSC-deadline
                                            // Initial APIC id (31:24), one logical processor (23:16), no HTT.
            r.ebx = (r.ebx & 0xffff) | (u32::from(view.apic_id) << 24) | (1 << 16);
            // HTT; MCE, MCA and MTRR: their MSRs are not offered; ACPI (thermal
            // control MSRs) and TM (thermal monitor): neither are theirs.
            r.edx &= !((1 << 28) | (1 << 7) | (1 << 14) | (1 << 12) | (1 << 22) | (1 << 29));
            if !policy.xsave {
                r.ecx &= !(1 << 26);
            }
            // OSXSAVE mirrors the guest's CR4.OSXSAVE (bit 18).
            r.ecx &= !(1 << 27);
            if policy.xsave && view.cr4 & (1 << 18) != 0 {
                r.ecx |= 1 << 27;
            }
            if !avx {
                r.ecx &= !((1 << 12) | (1 << 28) | (1 << 29)); // FMA, AVX, F16C
            }
        }
        7 if sub == 0 => {
            // MPX; TSC_ADJUST (the MSR would move the host's TSC; not offered).
            r.ebx &= !((1 << 14) | (1 << 1));
            if !avx {
                r.ebx &= !(1 << 5); // AVX2
            }
            if !avx512 {
                // F, DQ, IFMA, PF, ER, CD, BW, VL
                r.ebx &= !((1 << 16)
                    | (1 << 17)
                    | (1 << 21)
                    | (1 << 26)
                    | (1 << 27)
                    | (1 << 28)
                    | (1 << 30)
                    | (1 << 31));
                // VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ
                r.ecx &= !((1 << 1) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14));
                // 4VNNIW, 4FMAPS, VP2INTERSECT, FP16
                r.edx &= !((1 << 2) | (1 << 3) | (1 << 8) | (1 << 23));
            }
            // PKU, OSPKE, CET_SS, LA57, RDPID. LA57: this hypervisor walks a guest's
            // page tables in four levels (MMIO emulation fetches the instruction
            // through them); a Linux guest offered LA57 turns on 5-level paging.
            r.ecx &= !((1 << 3) | (1 << 4) | (1 << 7) | (1 << 16) | (1 << 22));
            // CET_IBT, AMX-BF16, AMX-TILE, AMX-INT8
            r.edx &= !((1 << 20) | (1 << 22) | (1 << 24) | (1 << 25));
        }
        7 => {}
        // ARAT only: the thermal and power-management features (digital sensor,
        // package thermal, HWP, ...) have MSRs a guest does not get.
        6 => {
            r = ZERO;
            r.eax = 1 << 2;
        }
        0xa | 0xb | 0x1f | 0x8000_001e => r = ZERO,
        0xd if !policy.xsave => r = ZERO,
        0xd => match sub {
            0 => {
                r.eax = policy.guest_allowed as u32;
                r.edx = (policy.guest_allowed >> 32) as u32;
                r.ebx = xsave_size(host, view.xcr0);
                r.ecx = xsave_size(host, policy.guest_allowed);
            }
            // XSAVEOPT, XSAVEC, XGETBV with ECX = 1; no XSAVES (no IA32_XSS), no XFD.
            // EBX: the compacted size for XCR0 (Linux sizes its buffers by it when
            // XSAVEC is offered; 0 there was "XSAVE consistency problem" under VMX).
            1 => {
                r.eax &= 0b111;
                r.ebx = if r.eax & 0b10 != 0 {
                    xsave_compacted_size(host, view.xcr0)
                } else {
                    0
                };
                r.ecx = 0;
                r.edx = 0;
            }
            i if i < 63 && policy.guest_allowed & (1u64 << i) != 0 => {}
            _ => r = ZERO,
        },
        0x8000_0001 => {
            // CmpLegacy, SVM, TOPOEXT, PERFCTR_CORE, MONITORX
            r.ecx &= !((1 << 1) | (1 << 2) | (1 << 22) | (1 << 23) | (1 << 29));
            r.edx &= !(1 << 27); // RDTSCP
        }
        // One core per package (NC, bits 7:0, and the APIC id size, 15:12).
        0x8000_0008 => r.ecx &= !0xf0ff,
        _ => {}
    }
    r
}
