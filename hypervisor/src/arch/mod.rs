//! x86_64 specifics: CPU identity and privileged-instruction wrappers, descriptor
//! tables, exception entry and the crash report.

pub mod cpu;
pub mod gdt;
pub mod idt;
