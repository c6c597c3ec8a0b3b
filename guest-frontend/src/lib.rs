//! The guest side of GPU-PV: a small `no_std` runtime for test guests on which the
//! paravirtual GPU frontend driver will be built. The guest ABI comes from the
//! `guest-abi` crate (re-exported as [`abi`]), the virtio-pci transport definitions
//! from `virtio-pci`; the virtio-gpu wire format, the split-ring driver and the
//! checked guest-memory trait are shared with the mediator (`gpu_pv::wire`,
//! `gpu_pv::ring`, `gpu_pv::command`, `gpu_pv::memory`).
//!
//! What a guest gets (see [`entry!`]):
//! - an entry point that aligns the stack, installs an IDT (every exception prints
//!   its vector and shuts the VM down with [`exit::EXCEPTION_BASE`] + vector; the
//!   timer and spurious vectors of the virtual local APIC), reads the boot-info page
//!   ([`boot_info::BootInfo`]) and calls the guest's `main`;
//! - [`println!`]/[`print!`] on the emulated COM1;
//! - hypercalls ([`hypercall`]) with VMMCALL or VMCALL chosen once from the CPU vendor;
//! - the virtual local APIC ([`lapic`]) and a periodic tick counter on its timer
//!   ([`timer`]);
//! - [`cpu`] helpers: `rdtsc`, interrupt flag, halting;
//! - a panic handler that prints and shuts down with [`exit::PANIC`];
//! - for the paravirtual GPU: PCI discovery through the guest ECAM window ([`pci`],
//!   register access in [`mmio`]), guest RAM for devices ([`dma`]), the virtio-gpu
//!   frontend driver ([`virtio_gpu`]) and the test pattern the GPU guests draw
//!   ([`gfx`]); MSI-X messages arrive on the device vectors of [`idt`].
#![no_std]

extern crate alloc;

pub use guest_abi as abi;

pub mod boot_info;
pub mod cpu;
pub mod dma;
pub mod gfx;
pub mod hypercall;
pub mod idt;
pub mod lapic;
pub mod mmio;
pub mod pci;
pub mod serial;
pub mod timer;
pub mod virtio_gpu;

#[doc(hidden)]
pub mod rt;

pub use cpu::halt;

/// Exit codes the runtime passes to [`hypercall::shutdown`].
pub mod exit {
    /// The guest did what it set out to do.
    pub const OK: u64 = 0;
    /// The guest's own check failed.
    pub const FAILED: u64 = 1;
    /// The guest panicked.
    pub const PANIC: u64 = 0xdead;
    /// A CPU exception: the code is this plus the vector (e.g. 0x10d for #GP).
    pub const EXCEPTION_BASE: u64 = 0x100;
}

/// Defines the guest's entry point `_start` and its panic handler, and runs `main`
/// (a `fn(&BootInfo) -> !`) once the runtime is set up.
///
/// ```ignore
/// guest_frontend::entry!(main);
/// fn main(info: &guest_frontend::boot_info::BootInfo) -> ! { ... }
/// ```
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// Guest entry (the guest ABI starts it in 64-bit mode with RDI = the boot-info
        /// page and RSP = the stack top): aligns the stack as the System V ABI expects
        /// at a call and enters the runtime with RDI untouched.
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        #[unsafe(link_section = ".text.entry")]
        pub extern "sysv64" fn _start() -> ! {
            ::core::arch::naked_asm!(
                "and rsp, -16",
                "xor ebp, ebp",
                "call {start}",
                "ud2",
                start = sym __guest_frontend_start,
            )
        }

        extern "sysv64" fn __guest_frontend_start(boot_info: u64) -> ! {
            let main: fn(&$crate::boot_info::BootInfo) -> ! = $main;
            $crate::rt::start(boot_info, main)
        }

        #[panic_handler]
        fn __guest_frontend_panic(info: &::core::panic::PanicInfo<'_>) -> ! {
            $crate::rt::panic(info)
        }
    };
}

/// The guest heap (the shared ABI crate uses `alloc`).
pub mod heap {
    use linked_list_allocator::LockedHeap;

    const HEAP_BYTES: usize = 256 * 1024;
    static mut ARENA: [u8; HEAP_BYTES] = [0; HEAP_BYTES];

    #[global_allocator]
    static HEAP: LockedHeap = LockedHeap::empty();

    /// Gives the heap its arena; call once at start-up ([`crate::entry!`] does).
    pub fn init() {
        static DONE: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
        if DONE.swap(true, core::sync::atomic::Ordering::AcqRel) {
            return;
        }
        // SAFETY: runs once (guarded above) before any allocation; the arena is used by
        // nothing else.
        unsafe { HEAP.lock().init((&raw mut ARENA).cast::<u8>(), HEAP_BYTES) };
    }
}
