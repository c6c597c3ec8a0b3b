//! The guest's general-purpose registers, as the kernel keeps them across VM entries.

/// Guest general-purpose registers kept by the hypervisor across VM entries (RSP and
/// RIP live in the VMCB/VMCS; RAX too on SVM, mirrored here by the backend).
///
/// The kernel's entry assembly (`svm_run`, `vmx_run`) loads and stores these by
/// offset: `#[repr(C)]`, 8 bytes each in this order. Do not reorder.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegs {
    #[allow(missing_docs)]
    pub rax: u64,
    #[allow(missing_docs)]
    pub rbx: u64,
    #[allow(missing_docs)]
    pub rcx: u64,
    #[allow(missing_docs)]
    pub rdx: u64,
    #[allow(missing_docs)]
    pub rsi: u64,
    #[allow(missing_docs)]
    pub rdi: u64,
    #[allow(missing_docs)]
    pub rbp: u64,
    #[allow(missing_docs)]
    pub r8: u64,
    #[allow(missing_docs)]
    pub r9: u64,
    #[allow(missing_docs)]
    pub r10: u64,
    #[allow(missing_docs)]
    pub r11: u64,
    #[allow(missing_docs)]
    pub r12: u64,
    #[allow(missing_docs)]
    pub r13: u64,
    #[allow(missing_docs)]
    pub r14: u64,
    #[allow(missing_docs)]
    pub r15: u64,
}

#[cfg(test)]
mod tests {
    use super::GuestRegs;
    use core::mem::{offset_of, size_of};

    /// The offsets the kernel's entry assembly uses.
    #[test]
    fn layout_matches_the_entry_assembly() {
        assert_eq!(size_of::<GuestRegs>(), 15 * 8);
        let offsets = [
            offset_of!(GuestRegs, rax),
            offset_of!(GuestRegs, rbx),
            offset_of!(GuestRegs, rcx),
            offset_of!(GuestRegs, rdx),
            offset_of!(GuestRegs, rsi),
            offset_of!(GuestRegs, rdi),
            offset_of!(GuestRegs, rbp),
            offset_of!(GuestRegs, r8),
            offset_of!(GuestRegs, r9),
            offset_of!(GuestRegs, r10),
            offset_of!(GuestRegs, r11),
            offset_of!(GuestRegs, r12),
            offset_of!(GuestRegs, r13),
            offset_of!(GuestRegs, r14),
            offset_of!(GuestRegs, r15),
        ];
        for (i, off) in offsets.into_iter().enumerate() {
            assert_eq!(off, i * 8);
        }
    }
}
