//! Bringing up the application processors: INIT-SIPI-SIPI into a real-mode
//! trampoline below 1 MiB that switches to protected mode, then long mode on the
//! kernel's page tables, and jumps to [`ap_main`] on a stack of the AP's own.

use core::sync::atomic::Ordering;

use boot_info::BootInfo;
use log::{info, warn};

use crate::acpi::Platform;
use crate::arch::cpu::{self, MAX_CPUS};
use crate::mm::{frames, paging, phys_to_ptr};
use crate::{apic, arch};

const AP_STACK_PAGES: usize = 16;

core::arch::global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .global ap_tramp_start, ap_tramp_end, ap_tramp_gdtr, ap_tramp_gdt, ap_tramp_jmp32
    .global ap_tramp_32, ap_tramp_jmp64, ap_tramp_64, ap_tramp_cr3, ap_tramp_stack
    .global ap_tramp_arg, ap_tramp_entry
    .code16
ap_tramp_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    xor %ebx, %ebx
    mov %cs, %bx
    shl $4, %ebx
    lgdtl (ap_tramp_gdtr - ap_tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl *(ap_tramp_jmp32 - ap_tramp_start)
    .code32
ap_tramp_32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov (ap_tramp_cr3 - ap_tramp_start)(%ebx), %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or $0x900, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80010001, %eax
    mov %eax, %cr0
    ljmpl *(ap_tramp_jmp64 - ap_tramp_start)(%ebx)
    .code64
ap_tramp_64:
    mov (ap_tramp_stack - ap_tramp_start)(%rbx), %rsp
    mov (ap_tramp_arg - ap_tramp_start)(%rbx), %rdi
    mov (ap_tramp_entry - ap_tramp_start)(%rbx), %rax
    xor %rbp, %rbp
    jmp *%rax
    .balign 8
ap_tramp_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cf9a000000ffff
ap_tramp_gdtr:
    .word 31
    .long 0
    .balign 8
ap_tramp_jmp32:
    .long 0
    .word 0x18
    .balign 8
ap_tramp_jmp64:
    .long 0
    .word 0x08
    .balign 8
ap_tramp_cr3:
    .quad 0
ap_tramp_stack:
    .quad 0
ap_tramp_arg:
    .quad 0
ap_tramp_entry:
    .quad 0
ap_tramp_end:
    .text
"#,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static ap_tramp_gdt: u8;
    static ap_tramp_gdtr: u8;
    static ap_tramp_jmp32: u8;
    static ap_tramp_32: u8;
    static ap_tramp_jmp64: u8;
    static ap_tramp_64: u8;
    static ap_tramp_cr3: u8;
    static ap_tramp_stack: u8;
    static ap_tramp_arg: u8;
    static ap_tramp_entry: u8;
}

fn off(sym: *const u8) -> u64 {
    sym as u64 - (&raw const ap_tramp_start as u64)
}

/// Starts every enabled CPU the MADT lists; returns how many CPUs are online.
pub fn start_aps(bi: &BootInfo, platform: Option<&Platform>) -> usize {
    let t = bi.ap_trampoline;
    if t == 0 || t >= 0x10_0000 {
        warn!("smp: no trampoline page below 1 MiB; application processors stay off");
        return cpu::ONLINE.load(Ordering::SeqCst);
    }
    let len = off(&raw const ap_tramp_end) as usize;
    // SAFETY: the loader reserved page `t` for us; the trampoline is shorter than a page.
    unsafe {
        core::ptr::copy_nonoverlapping(&raw const ap_tramp_start, phys_to_ptr::<u8>(t), len);
    }
    paging::write_phys::<u32>(
        t + off(&raw const ap_tramp_gdtr) + 2,
        (t + off(&raw const ap_tramp_gdt)) as u32,
    );
    paging::write_phys::<u32>(
        t + off(&raw const ap_tramp_jmp32),
        (t + off(&raw const ap_tramp_32)) as u32,
    );
    paging::write_phys::<u32>(
        t + off(&raw const ap_tramp_jmp64),
        (t + off(&raw const ap_tramp_64)) as u32,
    );
    paging::write_phys::<u64>(t + off(&raw const ap_tramp_cr3), paging::kernel_pml4());
    paging::write_phys::<u64>(
        t + off(&raw const ap_tramp_entry),
        ap_main as *const () as u64,
    );

    let me = apic::id();
    // The MADT lists the CPUs. Without ACPI (OVMF under Bochs), APIC ids are probed
    // upwards until one does not answer.
    let (ids, probing): (alloc::vec::Vec<u32>, bool) = match platform {
        Some(p) => (p.cpus.clone(), false),
        None => ((0..MAX_CPUS as u32).collect(), true),
    };
    let wait_us = if probing { 500_000 } else { 2_000_000 };
    let mut index = 1usize;
    for &id in ids.iter().filter(|&&id| id != me) {
        if index >= MAX_CPUS {
            warn!("smp: more than {MAX_CPUS} CPUs; the rest stay off");
            break;
        }
        let Some(stack) = frames::alloc_contiguous(AP_STACK_PAGES, 4096, u64::MAX) else {
            warn!("smp: no memory for cpu{index}'s stack");
            break;
        };
        paging::write_phys::<u64>(
            t + off(&raw const ap_tramp_stack),
            stack + (AP_STACK_PAGES as u64) * 4096,
        );
        paging::write_phys::<u64>(t + off(&raw const ap_tramp_arg), index as u64);
        let before = cpu::ONLINE.load(Ordering::SeqCst);
        // INIT (assert), then two STARTUPs with the trampoline's page number (SDM Vol. 3A 8.4.4.1).
        apic::send_ipi(id, 0x0000_4500);
        apic::delay_us(10_000);
        let vector = (t >> 12) as u32;
        for _ in 0..2 {
            apic::send_ipi(id, 0x0000_4600 | vector);
            apic::delay_us(200);
        }
        // Wait (emulators are slow) for it to log in.
        let deadline = apic::now_us() + wait_us;
        while cpu::ONLINE.load(Ordering::SeqCst) == before && apic::now_us() < deadline {
            core::hint::spin_loop();
        }
        if cpu::ONLINE.load(Ordering::SeqCst) == before {
            // The stack stays allocated: a CPU that starts late must not land on
            // memory someone else owns.
            if probing {
                info!("smp: no ACPI; probing found no CPU with APIC id {id}, so {index} CPU(s)");
                break;
            }
            warn!("smp: cpu with APIC id {id} did not start");
        }
        index += 1;
    }
    cpu::ONLINE.load(Ordering::SeqCst)
}

/// First Rust code on an application processor.
extern "sysv64" fn ap_main(index: u64) -> ! {
    cpu::set_index(index as usize);
    arch::gdt::init_this_cpu();
    arch::idt::init_this_cpu();
    apic::enable_this_cpu();
    info!("cpu{index} online (APIC id {})", apic::id());
    cpu::log_in();
    crate::vmm::ap_loop()
}
