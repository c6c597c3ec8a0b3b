//! Intel VMX backend (Intel SDM Vol. 3C, chapters 23-29).

use super::{GuestRegs, StartState, Vcpu, VmExit};
use crate::arch::cpu::cpuid;

/// Whether this CPU offers VMX (EPT support is checked when enabling).
pub fn supported() -> bool {
    cpuid(1, 0).ecx & (1 << 5) != 0
}

/// Turns VMX on on this CPU.
pub fn enable_this_cpu() -> Result<(), &'static str> {
    Err("the VMX backend is not built yet")
}

/// A VMX virtual CPU.
pub struct VmxVcpu {
    regs: GuestRegs,
}

impl VmxVcpu {
    /// Creates a vCPU (not available yet).
    pub fn new(_ept: u64, _vpid: u16, _start: &StartState) -> Result<Self, &'static str> {
        Err("the VMX backend is not built yet")
    }
}

impl Vcpu for VmxVcpu {
    fn run(&mut self) -> VmExit {
        VmExit::EntryFailed(0)
    }
    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }
    fn rip(&self) -> u64 {
        0
    }
    fn set_rip(&mut self, _rip: u64) {}
    fn rsp(&self) -> u64 {
        0
    }
    fn rflags(&self) -> u64 {
        0
    }
    fn cr3(&self) -> u64 {
        0
    }
    fn interruptible(&self) -> bool {
        false
    }
    fn inject_interrupt(&mut self, _vector: u8) {}
    fn inject_exception(&mut self, _vector: u8, _error_code: Option<u32>) {}
    fn set_interrupt_window(&mut self, _on: bool) {}
    fn set_time_slice(&mut self, _us: u64) {}
}
