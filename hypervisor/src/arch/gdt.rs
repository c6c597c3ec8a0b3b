//! Per-CPU GDT and TSS. Each CPU has its own interrupt stacks (IST), so an exception
//! is always handled on a known-good stack, whatever state the faulting stack was in.

use alloc::boxed::Box;
use alloc::vec;

use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slot (1-based in the IDT, 0-based in the TSS) for double faults.
pub const IST_DOUBLE_FAULT: u16 = 0;
/// IST slot for NMIs.
pub const IST_NMI: u16 = 1;
/// IST slot for machine checks.
pub const IST_MACHINE_CHECK: u16 = 2;
/// IST slot for every other exception.
pub const IST_EXCEPTION: u16 = 3;

const IST_STACK_BYTES: usize = 32 * 1024;

/// Builds and loads this CPU's GDT and TSS (needs the heap).
pub fn init_this_cpu() {
    let tss: &'static mut TaskStateSegment = Box::leak(Box::new(TaskStateSegment::new()));
    for slot in 0..4 {
        let stack: &'static mut [u8] = vec![0u8; IST_STACK_BYTES].leak();
        let top = VirtAddr::from_ptr(stack.as_ptr()) + IST_STACK_BYTES as u64;
        tss.interrupt_stack_table[slot] = top.align_down(16u64);
    }
    let gdt: &'static mut GlobalDescriptorTable = Box::leak(Box::new(GlobalDescriptorTable::new()));
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let tss_sel = gdt.append(Descriptor::tss_segment(tss));
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, whose descriptors are valid
    // 64-bit code, data and TSS descriptors that live forever.
    unsafe {
        CS::set_reg(code);
        SS::set_reg(data);
        DS::set_reg(data);
        ES::set_reg(data);
        load_tss(tss_sel);
    }
}
