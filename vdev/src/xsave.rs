//! The XSAVE image's standard format, as far as the kernel's per-vCPU state switching
//! needs it (SDM Vol. 1, 13.4 and 13.6; APM Vol. 2, 11.5).
//!
//! An XSAVE image says in its header (`XSTATE_BV`) which components it holds; a
//! component whose bit is clear is put in its initial configuration by XRSTOR
//! instead of being read from the image. Real CPUs clear the x87 bit themselves
//! when the x87 unit was never used (the XINUSE optimisation). QEMU's TCG does not:
//! it marks every component in use, so every XRSTOR then loads the x87 state from
//! memory, and that path of QEMU 7.2 (`cpu_set_fpus` -> `cpu_clear_ignne`) does an
//! unlocked read-modify-write of the *first* CPU's `hflags2`. Done on another CPU
//! while the first one runs VMRUN or takes a #VMEXIT, it undoes that CPU's
//! nested-paging and GIF flags: spurious page faults follow, host and guest triple
//! faults (seen in the 32-VM density scenario). [`mark_x87_init`] does what the
//! hardware does, which keeps XRSTOR of an untouched x87 unit on the init path.

/// Offset of `XSTATE_BV` (the XSAVE header starts after the 512-byte legacy area).
pub const XSTATE_BV: usize = 512;
/// Bytes of the legacy area plus the header: the least an XSAVE image has.
pub const MIN_IMAGE: usize = 512 + 64;

const FCW_INIT: u16 = 0x037f;

/// If the image's x87 state (control, status and abridged tag words, last
/// instruction and operand pointers, opcode, ST0-ST7) is the initial one, clears the
/// x87 bit of `XSTATE_BV` so XRSTOR takes its init path, and returns true. The
/// state XRSTOR then produces is the same (SDM Vol. 1, 13.6: FCW 037FH, FSW 0, all
/// registers empty, pointers 0, ST registers 0). MXCSR belongs to the SSE component
/// and is untouched. Returns false, changing nothing, for any other state or for an
/// image shorter than [`MIN_IMAGE`].
pub fn mark_x87_init(image: &mut [u8]) -> bool {
    if image.len() < MIN_IMAGE {
        return false;
    }
    let fcw = u16::from_le_bytes([image[0], image[1]]);
    // Bytes 2..24: FSW, abridged FTW (0 = all empty), reserved, FOP, FIP, FDP.
    let rest_zero = image[2..24].iter().all(|&b| b == 0);
    // ST0-ST7 (MM0-MM7): 10 significant bytes in each 16-byte slot.
    let regs_zero = image[32..160]
        .chunks_exact(16)
        .all(|slot| slot[..10].iter().all(|&b| b == 0));
    if fcw != FCW_INIT || !rest_zero || !regs_zero {
        return false;
    }
    image[XSTATE_BV] &= !1;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved_init() -> [u8; 1024] {
        let mut a = [0u8; 1024];
        a[0..2].copy_from_slice(&FCW_INIT.to_le_bytes());
        a[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR
        a[28..32].copy_from_slice(&0xffffu32.to_le_bytes()); // MXCSR_MASK
        a[XSTATE_BV] = 0x17; // x87, SSE, AVX, BNDCSR: what QEMU writes
        a[XSTATE_BV + 1] = 0x02; // PKRU
        a
    }

    #[test]
    fn an_untouched_x87_unit_is_marked_init_and_nothing_else_changes() {
        let mut a = saved_init();
        assert!(mark_x87_init(&mut a));
        let mut want = saved_init();
        want[XSTATE_BV] = 0x16;
        assert_eq!(a, want);
    }

    #[test]
    fn any_used_x87_state_keeps_the_image_as_saved() {
        // Each field of the x87 state, changed alone, must keep the x87 bit.
        let fields: &[(usize, u8)] = &[
            (0, 0x7f),   // FCW: a different precision or masking
            (2, 0x01),   // FSW: an exception flag
            (3, 0x38),   // FSW: TOP
            (4, 0x01),   // abridged FTW: ST0 valid
            (6, 0x01),   // FOP
            (8, 0x10),   // FIP
            (16, 0x20),  // FDP
            (32, 0x01),  // ST0 significand
            (41, 0x3f),  // ST0 exponent
            (153, 0x80), // ST7 sign
        ];
        for &(off, v) in fields {
            let mut a = saved_init();
            a[off] ^= v;
            let before = a;
            assert!(!mark_x87_init(&mut a), "offset {off}");
            assert_eq!(a, before, "offset {off}");
        }
    }

    #[test]
    fn reserved_bytes_of_st_slots_and_sse_state_do_not_count() {
        let mut a = saved_init();
        a[42] = 0xaa; // ST0 slot, byte 10: reserved
        a[160] = 0x55; // XMM0
        assert!(mark_x87_init(&mut a));
        assert_eq!(a[XSTATE_BV], 0x16);
        assert_eq!(a[160], 0x55);
    }

    #[test]
    fn a_short_image_is_left_alone() {
        let mut a = [0u8; 512];
        a[0..2].copy_from_slice(&FCW_INIT.to_le_bytes());
        assert!(!mark_x87_init(&mut a));
    }
}
