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

/// The guest ABI, defined in the `guest-abi` crate (re-exported so `gpu_pv::abi`
/// paths keep working).
pub use guest_abi as abi;
pub mod budget;
pub mod command;
pub mod counters;
pub mod dispatch;
pub mod grants;
pub mod mediator;
pub mod memory;
pub mod msix;
pub mod ratio;
pub mod ring;
pub mod sched;
/// The host simulation of the whole GPU-PV path (guests, mediator, dispatcher,
/// simulated GPU), for tests and the `simulate` example only: not in the library the
/// hypervisor links (feature `sim`).
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod sim_gpu;
pub mod wire;
