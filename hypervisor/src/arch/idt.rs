//! Exception entry: assembly stubs save the full register state on an IST stack and
//! call [`exception`], which prints a crash report (vector, error code, RIP, CR2, all
//! registers, CPU id) on serial and stops: in test runs with a failing exit.

use core::sync::atomic::{AtomicBool, Ordering};

use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::VirtAddr;

use super::gdt;

/// Register state saved by the exception stubs, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    /// General registers as pushed by the common stub.
    pub r15: u64,
    #[allow(missing_docs)]
    pub r14: u64,
    #[allow(missing_docs)]
    pub r13: u64,
    #[allow(missing_docs)]
    pub r12: u64,
    #[allow(missing_docs)]
    pub r11: u64,
    #[allow(missing_docs)]
    pub r10: u64,
    #[allow(missing_docs)]
    pub r9: u64,
    #[allow(missing_docs)]
    pub r8: u64,
    #[allow(missing_docs)]
    pub rbp: u64,
    #[allow(missing_docs)]
    pub rdi: u64,
    #[allow(missing_docs)]
    pub rsi: u64,
    #[allow(missing_docs)]
    pub rdx: u64,
    #[allow(missing_docs)]
    pub rcx: u64,
    #[allow(missing_docs)]
    pub rbx: u64,
    #[allow(missing_docs)]
    pub rax: u64,
    /// Exception vector.
    pub vector: u64,
    /// Error code (0 for vectors without one).
    pub error: u64,
    /// Faulting instruction.
    pub rip: u64,
    #[allow(missing_docs)]
    pub cs: u64,
    #[allow(missing_docs)]
    pub rflags: u64,
    #[allow(missing_docs)]
    pub rsp: u64,
    #[allow(missing_docs)]
    pub ss: u64,
}

macro_rules! stub {
    (err $v:literal) => {
        concat!(
            ".global exc_stub_",
            $v,
            "\nexc_stub_",
            $v,
            ":\n push ",
            $v,
            "\n jmp exc_common\n"
        )
    };
    (noerr $v:literal) => {
        concat!(
            ".global exc_stub_",
            $v,
            "\nexc_stub_",
            $v,
            ":\n push 0\n push ",
            $v,
            "\n jmp exc_common\n"
        )
    };
}

core::arch::global_asm!(
    ".section .text",
    stub!(noerr 0), stub!(noerr 1), stub!(noerr 2), stub!(noerr 3), stub!(noerr 4),
    stub!(noerr 5), stub!(noerr 6), stub!(noerr 7), stub!(err 8), stub!(noerr 9),
    stub!(err 10), stub!(err 11), stub!(err 12), stub!(err 13), stub!(err 14),
    stub!(noerr 15), stub!(noerr 16), stub!(err 17), stub!(noerr 18), stub!(noerr 19),
    stub!(noerr 20), stub!(err 21), stub!(noerr 22), stub!(noerr 23), stub!(noerr 24),
    stub!(noerr 25), stub!(noerr 26), stub!(noerr 27), stub!(noerr 28), stub!(err 29),
    stub!(err 30), stub!(noerr 31),
    "exc_common:",
    " push rax", " push rbx", " push rcx", " push rdx", " push rsi", " push rdi", " push rbp",
    " push r8", " push r9", " push r10", " push r11", " push r12", " push r13", " push r14",
    " push r15",
    " mov rdi, rsp",
    " cld",
    " call {handler}",
    " ud2",
    ".global irq_stub_e0",
    "irq_stub_e0:",
    " push 0xe0",
    " jmp irq_common",
    ".global irq_stub_e1",
    "irq_stub_e1:",
    " push 0xe1",
    " jmp irq_common",
    ".global irq_stub_e2",
    "irq_stub_e2:",
    " push 0xe2",
    " jmp irq_common",
    ".global irq_stub_e3",
    "irq_stub_e3:",
    " push 0xe3",
    " jmp irq_common",
    ".global irq_stub_e4",
    "irq_stub_e4:",
    " push 0xe4",
    " jmp irq_common",
    ".global irq_stub_e5",
    "irq_stub_e5:",
    " push 0xe5",
    " jmp irq_common",
    ".global irq_stub_e6",
    "irq_stub_e6:",
    " push 0xe6",
    " jmp irq_common",
    ".global irq_stub_e7",
    "irq_stub_e7:",
    " push 0xe7",
    " jmp irq_common",
    ".global irq_stub_e8",
    "irq_stub_e8:",
    " push 0xe8",
    " jmp irq_common",
    ".global irq_stub_e9",
    "irq_stub_e9:",
    " push 0xe9",
    " jmp irq_common",
    ".global irq_stub_ea",
    "irq_stub_ea:",
    " push 0xea",
    " jmp irq_common",
    ".global irq_stub_eb",
    "irq_stub_eb:",
    " push 0xeb",
    " jmp irq_common",
    ".global irq_stub_ec",
    "irq_stub_ec:",
    " push 0xec",
    " jmp irq_common",
    ".global irq_stub_ed",
    "irq_stub_ed:",
    " push 0xed",
    " jmp irq_common",
    ".global irq_stub_ee",
    "irq_stub_ee:",
    " push 0xee",
    " jmp irq_common",
    ".global irq_stub_ef",
    "irq_stub_ef:",
    " push 0xef",
    " jmp irq_common",
    ".global irq_stub_f0",
    "irq_stub_f0:",
    " push 0xf0",
    " jmp irq_common",
    ".global irq_stub_ff",
    "irq_stub_ff:",
    " push 0xff",
    " jmp irq_common",
    "irq_common:",
    " push rax", " push rcx", " push rdx", " push rsi", " push rdi",
    " push r8", " push r9", " push r10", " push r11",
    " mov rdi, [rsp + 72]",
    " sub rsp, 8",
    " cld",
    " call {irq}",
    " add rsp, 8",
    " pop r11", " pop r10", " pop r9", " pop r8",
    " pop rdi", " pop rsi", " pop rdx", " pop rcx", " pop rax",
    " add rsp, 8",
    " iretq",
    handler = sym exception_entry,
    irq = sym irq_entry,
);

extern "sysv64" fn irq_entry(vector: u64) {
    crate::interrupts::top_half(vector as u8);
}

unsafe extern "C" {
    static exc_stub_0: u8;
    static exc_stub_1: u8;
    static exc_stub_2: u8;
    static exc_stub_3: u8;
    static exc_stub_4: u8;
    static exc_stub_5: u8;
    static exc_stub_6: u8;
    static exc_stub_7: u8;
    static exc_stub_8: u8;
    static exc_stub_9: u8;
    static exc_stub_10: u8;
    static exc_stub_11: u8;
    static exc_stub_12: u8;
    static exc_stub_13: u8;
    static exc_stub_14: u8;
    static exc_stub_15: u8;
    static exc_stub_16: u8;
    static exc_stub_17: u8;
    static exc_stub_18: u8;
    static exc_stub_19: u8;
    static exc_stub_20: u8;
    static exc_stub_21: u8;
    static exc_stub_22: u8;
    static exc_stub_23: u8;
    static exc_stub_24: u8;
    static exc_stub_25: u8;
    static exc_stub_26: u8;
    static exc_stub_27: u8;
    static exc_stub_28: u8;
    static exc_stub_29: u8;
    static exc_stub_30: u8;
    static exc_stub_31: u8;
    static irq_stub_e0: u8;
    static irq_stub_e1: u8;
    static irq_stub_e2: u8;
    static irq_stub_e3: u8;
    static irq_stub_e4: u8;
    static irq_stub_e5: u8;
    static irq_stub_e6: u8;
    static irq_stub_e7: u8;
    static irq_stub_e8: u8;
    static irq_stub_e9: u8;
    static irq_stub_ea: u8;
    static irq_stub_eb: u8;
    static irq_stub_ec: u8;
    static irq_stub_ed: u8;
    static irq_stub_ee: u8;
    static irq_stub_ef: u8;
    static irq_stub_f0: u8;
    static irq_stub_ff: u8;
}

static IDT: spin::Once<InterruptDescriptorTable> = spin::Once::new();

fn stubs() -> [u64; 32] {
    [
        &raw const exc_stub_0,
        &raw const exc_stub_1,
        &raw const exc_stub_2,
        &raw const exc_stub_3,
        &raw const exc_stub_4,
        &raw const exc_stub_5,
        &raw const exc_stub_6,
        &raw const exc_stub_7,
        &raw const exc_stub_8,
        &raw const exc_stub_9,
        &raw const exc_stub_10,
        &raw const exc_stub_11,
        &raw const exc_stub_12,
        &raw const exc_stub_13,
        &raw const exc_stub_14,
        &raw const exc_stub_15,
        &raw const exc_stub_16,
        &raw const exc_stub_17,
        &raw const exc_stub_18,
        &raw const exc_stub_19,
        &raw const exc_stub_20,
        &raw const exc_stub_21,
        &raw const exc_stub_22,
        &raw const exc_stub_23,
        &raw const exc_stub_24,
        &raw const exc_stub_25,
        &raw const exc_stub_26,
        &raw const exc_stub_27,
        &raw const exc_stub_28,
        &raw const exc_stub_29,
        &raw const exc_stub_30,
        &raw const exc_stub_31,
    ]
    .map(|p| p as u64)
}

/// Loads the (shared) IDT on this CPU, building it on first use.
pub fn init_this_cpu() {
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        let stubs = stubs();
        for (v, &addr) in stubs.iter().enumerate() {
            let ist = match v {
                8 => gdt::IST_DOUBLE_FAULT,
                2 => gdt::IST_NMI,
                18 => gdt::IST_MACHINE_CHECK,
                _ => gdt::IST_EXCEPTION,
            };
            let entry = match v {
                0 => &mut idt.divide_error,
                1 => &mut idt.debug,
                2 => &mut idt.non_maskable_interrupt,
                3 => &mut idt.breakpoint,
                4 => &mut idt.overflow,
                5 => &mut idt.bound_range_exceeded,
                6 => &mut idt.invalid_opcode,
                7 => &mut idt.device_not_available,
                9 | 15 | 22..=27 | 31 => continue,
                16 => &mut idt.x87_floating_point,
                19 => &mut idt.simd_floating_point,
                20 => &mut idt.virtualization,
                28 => &mut idt.hv_injection_exception,
                _ => {
                    // Vectors with an error code have typed entries of another type;
                    // set them below.
                    continue;
                }
            };
            // SAFETY: `addr` is an exception stub that never returns and expects the
            // CPU-pushed frame; the IST index names a stack of every CPU's TSS.
            unsafe {
                entry
                    .set_handler_addr(VirtAddr::new(addr))
                    .set_stack_index(ist)
            };
        }
        macro_rules! set_err {
            ($field:ident, $v:expr, $ist:expr) => {
                // SAFETY: as above.
                unsafe {
                    idt.$field
                        .set_handler_addr(VirtAddr::new(stubs[$v]))
                        .set_stack_index($ist)
                };
            };
        }
        set_err!(double_fault, 8, gdt::IST_DOUBLE_FAULT);
        set_err!(invalid_tss, 10, gdt::IST_EXCEPTION);
        set_err!(segment_not_present, 11, gdt::IST_EXCEPTION);
        set_err!(stack_segment_fault, 12, gdt::IST_EXCEPTION);
        set_err!(general_protection_fault, 13, gdt::IST_EXCEPTION);
        set_err!(page_fault, 14, gdt::IST_EXCEPTION);
        set_err!(alignment_check, 17, gdt::IST_EXCEPTION);
        set_err!(machine_check, 18, gdt::IST_MACHINE_CHECK);
        set_err!(cp_protection_exception, 21, gdt::IST_EXCEPTION);
        set_err!(vmm_communication_exception, 29, gdt::IST_EXCEPTION);
        set_err!(security_exception, 30, gdt::IST_EXCEPTION);
        // SAFETY: the stubs save the interrupted context and return with IRETQ.
        unsafe {
            let device_stubs: [*const u8; 16] = [
                &raw const irq_stub_e0,
                &raw const irq_stub_e1,
                &raw const irq_stub_e2,
                &raw const irq_stub_e3,
                &raw const irq_stub_e4,
                &raw const irq_stub_e5,
                &raw const irq_stub_e6,
                &raw const irq_stub_e7,
                &raw const irq_stub_e8,
                &raw const irq_stub_e9,
                &raw const irq_stub_ea,
                &raw const irq_stub_eb,
                &raw const irq_stub_ec,
                &raw const irq_stub_ed,
                &raw const irq_stub_ee,
                &raw const irq_stub_ef,
            ];
            for (i, stub) in device_stubs.iter().enumerate() {
                idt[crate::interrupts::DEVICE_VECTOR_BASE + i as u8]
                    .set_handler_addr(VirtAddr::new(*stub as u64));
            }
            idt[crate::apic::TIMER_VECTOR]
                .set_handler_addr(VirtAddr::new(&raw const irq_stub_f0 as u64));
            idt[crate::apic::SPURIOUS_VECTOR]
                .set_handler_addr(VirtAddr::new(&raw const irq_stub_ff as u64));
        }
        idt
    });
    idt.load();
}

const NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor overrun",
    "invalid TSS",
    "segment not present",
    "stack fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 FP",
    "alignment check",
    "machine check",
    "SIMD FP",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "HV injection",
    "VMM communication",
    "security",
    "reserved",
];

static IN_CRASH: AtomicBool = AtomicBool::new(false);

extern "sysv64" fn exception_entry(f: &ExceptionFrame) -> ! {
    exception(f)
}

/// Prints the crash report and stops the machine.
fn exception(f: &ExceptionFrame) -> ! {
    let first = !IN_CRASH.swap(true, Ordering::SeqCst);
    let cpu = super::cpu::current_index();
    let p = crate::serial::write_fmt_unlocked;
    let name = NAMES.get(f.vector as usize).copied().unwrap_or("?");
    p(format_args!(
        "\r\n!!! EXCEPTION on cpu{cpu}: vector {} ({name}), error code {:#x}\r\n",
        f.vector, f.error
    ));
    p(format_args!(
        "    rip {:#018x}  cs {:#06x}  rflags {:#010x}  rsp {:#018x}  ss {:#06x}  cr2 {:#018x}\r\n",
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
        f.ss,
        super::cpu::cr2()
    ));
    p(format_args!(
        "    rax {:#018x} rbx {:#018x} rcx {:#018x} rdx {:#018x}\r\n",
        f.rax, f.rbx, f.rcx, f.rdx
    ));
    p(format_args!(
        "    rsi {:#018x} rdi {:#018x} rbp {:#018x} r8  {:#018x}\r\n",
        f.rsi, f.rdi, f.rbp, f.r8
    ));
    p(format_args!(
        "    r9  {:#018x} r10 {:#018x} r11 {:#018x} r12 {:#018x}\r\n",
        f.r9, f.r10, f.r11, f.r12
    ));
    p(format_args!(
        "    r13 {:#018x} r14 {:#018x} r15 {:#018x}\r\n",
        f.r13, f.r14, f.r15
    ));
    if first {
        crate::verdict::fail("unhandled exception");
    }
    super::cpu::halt_forever()
}
