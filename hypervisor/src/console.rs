//! Keyboard input from the hypervisor's serial console to a VM: bytes typed on the
//! host's COM1 go to the virtual COM1 of the VM that has the console's focus (the
//! first Linux VM: its shell is on ttyS0), so an operator, or a scenario, can talk
//! to a guest's shell.
//!
//! The BSP's scheduler loop polls the host UART ([`poll`]) and keeps what arrives
//! in a small buffer; the focused VM takes bytes from it when its virtual UART has
//! room ([`take`]), so nothing is lost while the guest is slow, and a halted vCPU
//! counts as ready while input waits for it ([`waiting_for`]). When the buffer is
//! full, further bytes are dropped and counted.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use spin::Mutex;

/// Bytes held for the focused VM.
const BUFFER: usize = 256;

/// The VM slot that receives input (`usize::MAX`: none).
static FOCUS: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Bytes dropped because the buffer was full.
static DROPPED: AtomicU64 = AtomicU64::new(0);

struct Ring {
    bytes: [u8; BUFFER],
    head: usize,
    len: usize,
}

static INPUT: Mutex<Ring> = Mutex::new(Ring {
    bytes: [0; BUFFER],
    head: 0,
    len: 0,
});

/// Gives the console's input to VM `slot`.
pub fn focus(slot: usize) {
    FOCUS.store(slot, Ordering::Relaxed);
}

/// Gives the console's input to VM `slot` unless a VM has it already.
pub fn focus_if_none(slot: usize) {
    let _ = FOCUS.compare_exchange(usize::MAX, slot, Ordering::Relaxed, Ordering::Relaxed);
}

/// Moves what the host UART received into the buffer (nothing if no VM has focus:
/// the bytes stay in the UART and are read once one has).
pub fn poll() {
    if FOCUS.load(Ordering::Relaxed) == usize::MAX {
        return;
    }
    while let Some(b) = crate::serial::try_read_byte() {
        let mut r = INPUT.lock();
        if r.len == BUFFER {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let at = (r.head + r.len) % BUFFER;
        r.bytes[at] = b;
        r.len += 1;
    }
}

/// Whether input waits for VM `slot`.
pub fn waiting_for(slot: usize) -> bool {
    FOCUS.load(Ordering::Relaxed) == slot && INPUT.lock().len > 0
}

/// The next byte for VM `slot`, if it has the focus and one waits.
pub fn take(slot: usize) -> Option<u8> {
    if FOCUS.load(Ordering::Relaxed) != slot {
        return None;
    }
    let mut r = INPUT.lock();
    if r.len == 0 {
        return None;
    }
    let b = r.bytes[r.head];
    r.head = (r.head + 1) % BUFFER;
    r.len -= 1;
    Some(b)
}

/// Bytes dropped so far because the focused VM did not take them in time.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}
