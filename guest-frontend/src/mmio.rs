//! Memory-mapped device registers, accessed the way the hypervisor can emulate them.
//!
//! Every emulated page (PCI ECAM, the virtual GPU's BARs) faults into the hypervisor,
//! which decodes the faulting instruction and only handles a plain `mov` of 1, 2, 4
//! or 8 bytes between a general register and memory. A `read_volatile` of a `u8` or
//! `u16` may compile to `movzx`, and the compiler is free to pick other forms too, so
//! each access here is one fixed `mov` with the address in RDI and the value in
//! RAX/EAX/AX/AL (as [`crate::lapic`] does): `mov al, byte ptr [rdi]` and friends.

use core::arch::asm;

/// Reads one byte at `addr`.
///
/// # Safety
/// `addr` must be a device register (or memory) this guest may read.
#[inline]
pub unsafe fn read8(addr: u64) -> u8 {
    let v: u8;
    // SAFETY: the caller names a readable location; the access is one `mov`.
    unsafe {
        asm!("mov al, byte ptr [rdi]", in("rdi") addr, out("al") v, options(nostack, preserves_flags))
    };
    v
}

/// Reads a little-endian `u16` at `addr`.
///
/// # Safety
/// As [`read8`].
#[inline]
pub unsafe fn read16(addr: u64) -> u16 {
    let v: u16;
    // SAFETY: as in `read8`.
    unsafe {
        asm!("mov ax, word ptr [rdi]", in("rdi") addr, out("ax") v, options(nostack, preserves_flags))
    };
    v
}

/// Reads a little-endian `u32` at `addr`.
///
/// # Safety
/// As [`read8`].
#[inline]
pub unsafe fn read32(addr: u64) -> u32 {
    let v: u32;
    // SAFETY: as in `read8`.
    unsafe {
        asm!("mov eax, dword ptr [rdi]", in("rdi") addr, out("eax") v, options(nostack, preserves_flags))
    };
    v
}

/// Reads a little-endian `u64` at `addr`.
///
/// # Safety
/// As [`read8`].
#[inline]
pub unsafe fn read64(addr: u64) -> u64 {
    let v: u64;
    // SAFETY: as in `read8`.
    unsafe {
        asm!("mov rax, qword ptr [rdi]", in("rdi") addr, out("rax") v, options(nostack, preserves_flags))
    };
    v
}

/// Writes one byte at `addr`.
///
/// # Safety
/// `addr` must be a device register (or memory) this guest may write, and the write
/// must not break memory the program relies on.
#[inline]
pub unsafe fn write8(addr: u64, v: u8) {
    // SAFETY: the caller names a writable location; the access is one `mov`.
    unsafe {
        asm!("mov byte ptr [rdi], al", in("rdi") addr, in("al") v, options(nostack, preserves_flags))
    };
}

/// Writes a little-endian `u16` at `addr`.
///
/// # Safety
/// As [`write8`].
#[inline]
pub unsafe fn write16(addr: u64, v: u16) {
    // SAFETY: as in `write8`.
    unsafe {
        asm!("mov word ptr [rdi], ax", in("rdi") addr, in("ax") v, options(nostack, preserves_flags))
    };
}

/// Writes a little-endian `u32` at `addr`.
///
/// # Safety
/// As [`write8`].
#[inline]
pub unsafe fn write32(addr: u64, v: u32) {
    // SAFETY: as in `write8`.
    unsafe {
        asm!("mov dword ptr [rdi], eax", in("rdi") addr, in("eax") v, options(nostack, preserves_flags))
    };
}

/// Writes a little-endian `u64` at `addr`.
///
/// # Safety
/// As [`write8`].
#[inline]
pub unsafe fn write64(addr: u64, v: u64) {
    // SAFETY: as in `write8`.
    unsafe {
        asm!("mov qword ptr [rdi], rax", in("rdi") addr, in("rax") v, options(nostack, preserves_flags))
    };
}
