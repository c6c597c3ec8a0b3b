//! The guest's interrupt descriptor table: every CPU exception (vectors 0-31) prints
//! what happened and shuts the VM down with [`crate::exit::EXCEPTION_BASE`] + vector
//! (unless the code armed [`expect_fault_slot`] to probe an instruction that may fault);
//! [`TIMER_VECTOR`] counts a tick and sends EOI to the virtual local APIC;
//! [`SPURIOUS_VECTOR`] returns at once (no EOI, as the APIC wants); the device vectors
//! [`DEVICE_VECTOR_BASE`]`..+`[`DEVICE_VECTORS`] (MSI-X messages of emulated devices)
//! count the interrupt per vector ([`device_interrupts`]) and send EOI. Other vectors
//! are not present: raising one is a #GP whose error code names the vector.
//!
//! The stubs are assembly (`extern "x86-interrupt"` is unstable): they save the
//! registers the System V ABI lets a callee clobber, align the stack, call Rust and
//! return with IRETQ. The target has no red zone and no SSE, so nothing else needs
//! saving.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The virtual local APIC timer's vector.
pub const TIMER_VECTOR: u8 = 0x30;
/// The virtual local APIC's spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// First vector for device interrupts (MSI-X messages): the virtio-gpu driver uses
/// `DEVICE_VECTOR_BASE` (configuration changes), `+1` (control queue) and `+2`
/// (cursor queue).
pub const DEVICE_VECTOR_BASE: u8 = 0x40;
/// Device vectors with a counting handler.
pub const DEVICE_VECTORS: usize = 8;

/// Interrupts taken per device vector.
static DEVICE_IRQS: [AtomicU64; DEVICE_VECTORS] = [const { AtomicU64::new(0) }; DEVICE_VECTORS];

/// Interrupts taken so far on device vector `vector` (0 for a vector outside
/// [`DEVICE_VECTOR_BASE`]`..+`[`DEVICE_VECTORS`]).
pub fn device_interrupts(vector: u8) -> u64 {
    vector
        .checked_sub(DEVICE_VECTOR_BASE)
        .and_then(|i| DEVICE_IRQS.get(usize::from(i)))
        .map_or(0, |c| c.load(Ordering::Acquire))
}

/// Vectors whose exceptions push an error code.
const HAS_ERROR_CODE: [u8; 10] = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];

global_asm!(
    r#"
    .section .text.guest_frontend_idt,"ax",@progbits
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    guest_frontend_exc_\v:
    .if (\v == 8) || (\v == 10) || (\v == 11) || (\v == 12) || (\v == 13) || (\v == 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    .else
        push 0
    .endif
        push \v
        jmp guest_frontend_exc_common
    .endr

    guest_frontend_exc_common:
        push rax
        push rcx
        push rdx
        push rsi
        push rdi
        push r8
        push r9
        push r10
        push r11
        push rbx
        push rbp
        push r12
        push r13
        push r14
        push r15
        mov rdi, rsp
        mov rbp, rsp
        cld
        and rsp, -16
        call {exception}
        // Returns only for a fault the code expected (see `expect_fault_slot`): resume.
        mov rsp, rbp
        pop r15
        pop r14
        pop r13
        pop r12
        pop rbp
        pop rbx
        pop r11
        pop r10
        pop r9
        pop r8
        pop rdi
        pop rsi
        pop rdx
        pop rcx
        pop rax
        add rsp, 16
        iretq

    .global guest_frontend_timer_stub
    .balign 16
    guest_frontend_timer_stub:
        push rax
        push rcx
        push rdx
        push rsi
        push rdi
        push r8
        push r9
        push r10
        push r11
        push rbp
        mov rbp, rsp
        and rsp, -16
        cld
        call {timer}
        mov rsp, rbp
        pop rbp
        pop r11
        pop r10
        pop r9
        pop r8
        pop rdi
        pop rsi
        pop rdx
        pop rcx
        pop rax
        iretq

    .global guest_frontend_spurious_stub
    .balign 16
    guest_frontend_spurious_stub:
        iretq

    .irp v, 0,1,2,3,4,5,6,7
    .balign 16
    guest_frontend_dev_\v:
        push \v
        jmp guest_frontend_dev_common
    .endr

    guest_frontend_dev_common:
        push rax
        push rcx
        push rdx
        push rsi
        push rdi
        push r8
        push r9
        push r10
        push r11
        push rbp
        mov rbp, rsp
        mov rdi, [rbp + 80]
        and rsp, -16
        cld
        call {device}
        mov rsp, rbp
        pop rbp
        pop r11
        pop r10
        pop r9
        pop r8
        pop rdi
        pop rsi
        pop rdx
        pop rcx
        pop rax
        add rsp, 8
        iretq

    .section .rodata.guest_frontend_idt,"a",@progbits
    .balign 8
    .global guest_frontend_exc_stubs
    guest_frontend_exc_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad guest_frontend_exc_\v
    .endr
    .global guest_frontend_dev_stubs
    guest_frontend_dev_stubs:
    .irp v, 0,1,2,3,4,5,6,7
        .quad guest_frontend_dev_\v
    .endr
    .text
    "#,
    exception = sym exception_entry,
    timer = sym timer_entry,
    device = sym device_entry,
);

unsafe extern "C" {
    /// Addresses of the 32 exception stubs above.
    static guest_frontend_exc_stubs: [u64; 32];
    /// Addresses of the device-vector stubs above.
    static guest_frontend_dev_stubs: [u64; DEVICE_VECTORS];
    fn guest_frontend_timer_stub();
    fn guest_frontend_spurious_stub();
}

/// One 16-byte 64-bit IDT gate.
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    attr: u8,
    offset_mid: u16,
    offset_hi: u32,
    reserved: u32,
}

impl Gate {
    const MISSING: Gate = Gate {
        offset_lo: 0,
        selector: 0,
        ist: 0,
        attr: 0,
        offset_mid: 0,
        offset_hi: 0,
        reserved: 0,
    };

    /// A present ring-0 interrupt gate (IF cleared on entry) to `handler`.
    fn interrupt(handler: u64, selector: u16) -> Gate {
        Gate {
            offset_lo: handler as u16,
            selector,
            ist: 0,
            attr: 0x8e,
            offset_mid: (handler >> 16) as u16,
            offset_hi: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Table([Gate; 256]);

static mut IDT: Table = Table([Gate::MISSING; 256]);

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

/// Fills the IDT (exceptions, timer, spurious, device vectors) and loads it. Interrupts are off while
/// the gates change and restored afterwards.
pub fn init() {
    let was_enabled = crate::cpu::interrupts_enabled();
    crate::cpu::cli();
    let cs: u16;
    // SAFETY: reads the CS selector.
    unsafe { asm!("mov {:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    let idt = (&raw mut IDT).cast::<Gate>();
    let set = |vector: u8, handler: u64| {
        // SAFETY: `vector` < 256 indexes the static table; interrupts are off and the
        // guest has one running vCPU, so nothing reads the table while it changes.
        unsafe {
            idt.add(usize::from(vector))
                .write(Gate::interrupt(handler, cs))
        };
    };
    // SAFETY: the table is defined in the assembly above and never written.
    let stubs = unsafe { guest_frontend_exc_stubs };
    for (v, &stub) in stubs.iter().enumerate() {
        set(v as u8, stub);
    }
    // SAFETY: as above.
    let dev_stubs = unsafe { guest_frontend_dev_stubs };
    for (i, &stub) in dev_stubs.iter().enumerate() {
        set(DEVICE_VECTOR_BASE + i as u8, stub);
    }
    set(TIMER_VECTOR, guest_frontend_timer_stub as *const () as u64);
    set(
        SPURIOUS_VECTOR,
        guest_frontend_spurious_stub as *const () as u64,
    );
    let ptr = Pointer {
        limit: (core::mem::size_of::<Table>() - 1) as u16,
        base: idt as u64,
    };
    // SAFETY: the table is static and every present gate points at a stub above.
    unsafe {
        asm!("lidt [{}]", in(reg) &raw const ptr, options(readonly, nostack, preserves_flags))
    };
    if was_enabled {
        crate::cpu::sti();
    }
}

/// The registers an exception stub saved, lowest address first.
#[derive(Debug)]
#[repr(C)]
pub struct ExceptionFrame {
    /// R15.
    pub r15: u64,
    /// R14.
    pub r14: u64,
    /// R13.
    pub r13: u64,
    /// R12.
    pub r12: u64,
    /// RBP.
    pub rbp: u64,
    /// RBX.
    pub rbx: u64,
    /// R11.
    pub r11: u64,
    /// R10.
    pub r10: u64,
    /// R9.
    pub r9: u64,
    /// R8.
    pub r8: u64,
    /// RDI.
    pub rdi: u64,
    /// RSI.
    pub rsi: u64,
    /// RDX.
    pub rdx: u64,
    /// RCX.
    pub rcx: u64,
    /// RAX.
    pub rax: u64,
    /// The vector.
    pub vector: u64,
    /// The error code (0 for exceptions without one).
    pub error_code: u64,
    /// Interrupted RIP.
    pub rip: u64,
    /// Interrupted CS.
    pub cs: u64,
    /// Interrupted RFLAGS.
    pub rflags: u64,
    /// Interrupted RSP.
    pub rsp: u64,
    /// Interrupted SS.
    pub ss: u64,
}

/// The mnemonic of exception `vector`.
pub fn exception_name(vector: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "(15)", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "(22)", "(23)", "(24)",
        "(25)", "(26)", "(27)", "#HV", "#VC", "#SX", "(31)",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("?")
}

static IN_EXCEPTION: AtomicBool = AtomicBool::new(false);

/// Where to resume after an expected fault (0: none expected).
static RESUME_RIP: AtomicU64 = AtomicU64::new(0);
/// Vector of the last expected fault taken.
static EXPECTED_VECTOR: AtomicU64 = AtomicU64::new(u64::MAX);

/// Prepares for one expected fault and returns the slot where the probing code stores
/// the address to resume at (in the same assembly block as the instruction): the next
/// exception then resumes there instead of stopping the VM. See [`crate::cpu::xsetbv`].
pub fn expect_fault_slot() -> *mut u64 {
    EXPECTED_VECTOR.store(u64::MAX, Ordering::Relaxed);
    RESUME_RIP.as_ptr()
}

/// Disarms [`expect_fault_slot`]; returns the vector taken meanwhile, if any.
pub fn expected_fault_taken() -> Option<u8> {
    RESUME_RIP.store(0, Ordering::Relaxed);
    let v = EXPECTED_VECTOR.swap(u64::MAX, Ordering::Relaxed);
    (v != u64::MAX).then_some(v as u8)
}

extern "C" fn exception_entry(f: &mut ExceptionFrame) {
    let resume = RESUME_RIP.swap(0, Ordering::Relaxed);
    if resume != 0 {
        EXPECTED_VECTOR.store(f.vector, Ordering::Relaxed);
        f.rip = resume;
        return;
    }
    if IN_EXCEPTION.swap(true, Ordering::Relaxed) {
        // A fault while reporting one (e.g. the hypercall itself faults): stop without
        // touching anything else.
        crate::println!(
            "guest: exception {} inside the exception handler, halting",
            f.vector
        );
        crate::cpu::halt();
    }
    crate::println!(
        "guest exception: vector {} {} error {:#x} at rip {:#x} (cs {:#x} rflags {:#x} rsp {:#x})",
        f.vector,
        exception_name(f.vector),
        f.error_code,
        f.rip,
        f.cs,
        f.rflags,
        f.rsp
    );
    if f.vector == 14 {
        let cr2: u64;
        // SAFETY: reads CR2 (ring 0).
        unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
        crate::println!("guest exception: page fault address {cr2:#x}");
    }
    if HAS_ERROR_CODE.contains(&(f.vector as u8)) && f.error_code & 2 != 0 {
        // Selector error code with the IDT bit set: an IDT gate was at fault. Hardware
        // puts the vector in the index field; QEMU's TCG (7.2) puts twice the vector
        // there in 64-bit mode, so the raw index is printed.
        crate::println!(
            "guest exception: caused by an IDT gate (error code index {})",
            f.error_code >> 3
        );
    }
    crate::hypercall::shutdown(crate::exit::EXCEPTION_BASE + f.vector)
}

extern "C" fn timer_entry() {
    crate::timer::on_tick();
}

/// Called by a device-vector stub with the vector's index: counts it and sends EOI.
extern "C" fn device_entry(index: u64) {
    if let Some(c) = DEVICE_IRQS.get(index as usize) {
        c.fetch_add(1, Ordering::AcqRel);
    }
    crate::lapic::eoi();
}
