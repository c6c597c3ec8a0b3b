//! The devices the hypervisor emulates for every guest, as pure logic: the virtual
//! local APIC ([`vlapic`]), the virtual I/O APIC routing device interrupts to it
//! ([`ioapic`]), the decoder for the instruction that touched an emulated MMIO page
//! ([`mmio`]), the virtual virtio-gpu PCI function ([`vgpu`]), and the
//! 16550A serial port on COM1 ([`uart`]), and the CMOS real-time clock ([`rtc`]).
//!
//! Every register a guest reads or writes lands here with guest-chosen offsets,
//! sizes and values, so this is attack surface. It lives in its own crate, apart
//! from the bare-metal kernel, so it is tested on the host with plain `cargo test`
//! (and fuzzed, `vdev/fuzz`). The kernel (`hypervisor/src/vm.rs`) wires these
//! devices to VM exits: it decodes the trapped instruction, routes the access by
//! guest-physical address and carries out the [`vgpu::Action`] a write asks for.
//!
//! Two formats of guest CPU state live here too, for the same reason (pure logic,
//! tested on the host): the general registers the entry assembly keeps ([`regs`])
//! and the XSAVE image of each vCPU's extended state ([`xsave`]).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod ioapic;
pub mod mmio;
pub mod platform;
pub mod regs;
pub mod rtc;
pub mod uart;
pub mod vgpu;
pub mod vlapic;
pub mod xsave;

pub use regs::GuestRegs;
