//! Devices the hypervisor emulates for every guest, and the MMIO instruction decoder
//! their traps need (no decode assists under TCG: the instruction is decoded in
//! software).

pub mod mmio;
pub mod vgpu;
pub mod vlapic;
