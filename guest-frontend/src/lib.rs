//! The guest side of GPU-PV: a small `no_std` runtime for test guests (serial output
//! through the emulated COM1, halting) on which the paravirtual GPU frontend driver
//! will be built. Shares the ABI (`gpu_pv::abi`, `gpu_pv::wire`) with the mediator.
#![no_std]

pub use gpu_pv::abi;

/// COM1 as the guest sees it (emulated by the hypervisor).
pub mod serial {
    const COM1: u16 = 0x3f8;

    fn outb(port: u16, v: u8) {
        // SAFETY: port output to COM1 has no memory effects; in a VM it exits to the
        // hypervisor's serial emulation.
        unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
    }

    /// Writes `s` to COM1.
    pub fn write(s: &str) {
        for b in s.bytes() {
            if b == b'\n' {
                outb(COM1, b'\r');
            }
            outb(COM1, b);
        }
    }
}

/// Stops this vCPU for good.
pub fn halt() -> ! {
    loop {
        // SAFETY: `cli; hlt` only stops this vCPU.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// The guest heap (the shared ABI crate uses `alloc`).
pub mod heap {
    use linked_list_allocator::LockedHeap;

    const HEAP_BYTES: usize = 256 * 1024;
    static mut ARENA: [u8; HEAP_BYTES] = [0; HEAP_BYTES];

    #[global_allocator]
    static HEAP: LockedHeap = LockedHeap::empty();

    /// Gives the heap its arena; call once at start-up.
    pub fn init() {
        // SAFETY: called once before any allocation; the arena is used by nothing else.
        unsafe { HEAP.lock().init((&raw mut ARENA).cast::<u8>(), HEAP_BYTES) };
    }
}
