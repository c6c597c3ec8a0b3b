//! GPU paravirtualization (GPU-PV) mediator, as pure logic.
//!
//! The hypervisor feeds this crate guest memory (through [`memory::GuestMemory`]),
//! time and interrupts; everything that decides what a guest may do with the shared
//! GPU lives here, where it is tested on the host with plain `cargo test`.
//!
//! Both the guest-visible paravirtual GPU and the physical GPU under QEMU speak the
//! virtio-gpu command set ([`wire`]), so commands are copied without repacking: only
//! ids and addresses are rewritten.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod abi;
pub mod budget;
pub mod command;
pub mod counters;
pub mod mediator;
pub mod memory;
pub mod msix;
pub mod ring;
pub mod sched;
pub mod sim;
pub mod sim_gpu;
pub mod wire;
