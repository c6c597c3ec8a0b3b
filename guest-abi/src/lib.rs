//! The contract between a guest and this hypervisor (in the spirit of uhyve's ABI
//! crate): how a new VM's memory is laid out and how it starts ([`guest`], with the
//! boot-info page in [`guest::boot_info`]), the hypercall numbers and results
//! ([`hypercall`]), the GPU-PV protocol revisions offered as virtio feature bits
//! ([`feature`], [`negotiate_revision`]) and the guest-visible limits of the
//! paravirtual GPU ([`limits`]).
//!
//! A guest depends on this crate alone for it; the hypervisor and the `gpu-pv`
//! mediator (as `gpu_pv::abi`) use the same definitions. Versions are negotiated
//! through feature bits (each protocol revision is one bit; both sides use the
//! highest bit they share), never required to match exactly.
#![no_std]
#![forbid(unsafe_code)]

/// Device-specific virtio feature bits (0..=23 are the device's own range).
pub mod feature {
    /// Protocol revision 1 of the GPU-PV extensions: zero-copy buffer registration
    /// ([`super::hypercall::GPU_REGISTER_BUFFER`]).
    pub const GPUPV_V1: u32 = 23;
    /// Protocol revision 2: adds the promise that completions of one batch arrive as
    /// one interrupt per queue, so a driver may wait for a batch instead of a command.
    pub const GPUPV_V2: u32 = 22;
    /// All protocol revisions, newest first.
    pub const REVISIONS: [(u32, u32); 2] = [(GPUPV_V2, 2), (GPUPV_V1, 1)];
}

/// Negotiates the GPU-PV protocol revision from the device's offered features and
/// the driver's accepted features: the highest revision both set, or `None` when
/// they share none (the guest then speaks plain virtio-gpu, which always works).
pub fn negotiate_revision(offered: u64, accepted: u64) -> Option<u32> {
    let common = offered & accepted;
    feature::REVISIONS
        .iter()
        .find(|(bit, _)| common & (1u64 << bit) != 0)
        .map(|&(_, rev)| rev)
}

/// Hypercall numbers (in RAX; arguments in RDI, RSI, RDX, RCX; result in RAX).
/// One ABI for VMMCALL (SVM) and VMCALL (VMX).
pub mod hypercall {
    /// Returns the hypervisor ABI version in RAX and feature mask in RDI.
    pub const VERSION: u64 = 0;
    /// Writes RSI bytes at guest-physical RDI to the console.
    pub const CONSOLE_WRITE: u64 = 1;
    /// Gives up the rest of the vCPU's time slice.
    pub const YIELD: u64 = 2;
    /// Stops the VM with exit code RDI.
    pub const SHUTDOWN: u64 = 3;
    /// Starts secondary vCPU RDI (1..vcpus) at RIP = RSI with RSP = RDX and RDI = RCX
    /// (secondary vCPUs stay parked until started, like an INIT-SIPI).
    pub const VCPU_START: u64 = 4;
    /// Registers a page-aligned buffer of the caller's RAM (GPA in RDI, length in RSI) in
    /// the GPU's IOMMU domain for zero-copy exchange; returns OK and the handle in RDI.
    pub const GPU_REGISTER_BUFFER: u64 = 0x100;
    /// Unregisters a buffer registered with [`GPU_REGISTER_BUFFER`] (handle in RDI).
    pub const GPU_UNREGISTER_BUFFER: u64 = 0x101;

    /// Hypercall status: success.
    pub const OK: u64 = 0;
    /// Hypercall status: unknown hypercall number.
    pub const ERR_UNKNOWN: u64 = u64::MAX;
    /// Hypercall status: an argument failed validation.
    pub const ERR_INVALID: u64 = u64::MAX - 1;
}

/// Guest-visible limits of the paravirtual GPU.
pub mod limits {
    /// Entries in the control queue offered to a guest (Linux uses 64).
    pub const CONTROL_QUEUE_SIZE: u16 = 64;
    /// Entries in the cursor queue offered to a guest (Linux uses 16).
    pub const CURSOR_QUEUE_SIZE: u16 = 16;
    /// Descriptors the ring reader follows in one chain (direct plus indirect).
    pub const MAX_CHAIN_DESCRIPTORS: usize = 256;
    /// Largest indirect descriptor table accepted, in descriptors.
    pub const MAX_INDIRECT_DESCRIPTORS: usize = 256;
    /// Largest command accepted into staging memory (header and payload), in bytes.
    pub const MAX_COMMAND_BYTES: usize = 24 + 8 + 16 * 4096;
    /// Most backing entries in one `RESOURCE_ATTACH_BACKING` (Linux sends up to 85).
    pub const MAX_BACKING_ENTRIES: u32 = 4096;
    /// Largest resource edge in pixels.
    pub const MAX_RESOURCE_DIM: u32 = 16384;
    /// Resources one VM may hold at once.
    pub const MAX_RESOURCES_PER_VM: usize = 1024;
    /// Commands queued per VM before its doorbell is ignored (back-pressure).
    pub const MAX_QUEUED_PER_VM: usize = 256;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channels(c: u32) -> [i32; 3] {
        [
            (c >> 16) as i32 & 0xff,
            (c >> 8) as i32 & 0xff,
            c as i32 & 0xff,
        ]
    }

    /// Largest per-channel difference (how screendump checks compare colours).
    fn distance(a: u32, b: u32) -> i32 {
        let (a, b) = (channels(a), channels(b));
        (0..3).map(|i| (a[i] - b[i]).abs()).max().unwrap_or(0)
    }

    #[test]
    fn vm_colours_are_far_from_black_and_from_each_other() {
        use guest::vm_color;
        for i in 0..32 {
            assert!(distance(vm_color(i), 0) >= 0x80, "vm {i} is too dark");
            for j in i + 1..32 {
                assert!(
                    distance(vm_color(i), vm_color(j)) >= 0x30,
                    "vms {i} and {j}: {:06x} {:06x}",
                    vm_color(i),
                    vm_color(j)
                );
            }
        }
        assert_eq!(vm_color(32), vm_color(0));
    }

    #[test]
    fn revision_is_the_highest_shared_bit() {
        let v1 = 1u64 << feature::GPUPV_V1;
        let v2 = 1u64 << feature::GPUPV_V2;
        assert_eq!(negotiate_revision(v1 | v2, v1 | v2), Some(2));
        assert_eq!(negotiate_revision(v1 | v2, v1), Some(1));
        assert_eq!(negotiate_revision(v1, v1 | v2), Some(1));
        assert_eq!(negotiate_revision(v1 | v2, 0), None);
    }
}

/// The guest ABI: how the hypervisor lays out a new VM's memory and starts it.
///
/// A guest starts in 64-bit mode on its bootstrap vCPU at its ELF entry point with
/// RDI = [`guest::BOOT_INFO`], RSP = [`guest::STACK_TOP`], interrupts off, on page
/// tables at [`guest::PML4`] that identity-map the first 4 GiB with 2 MiB pages
/// (writable, executable), and a GDT at [`guest::GDT`] (0x08 64-bit code, 0x10 data).
/// RAM is guest-physical `0..memory_mib MiB`; everything the guest does not own (the
/// emulated devices, the rest of the 4 GiB) faults into the hypervisor.
pub mod guest {
    /// Guest PML4.
    pub const PML4: u64 = 0x1000;
    /// Guest PDPT.
    pub const PDPT: u64 = 0x2000;
    /// Four guest page directories (0..4 GiB).
    pub const PD: u64 = 0x3000;
    /// Guest GDT.
    pub const GDT: u64 = 0x7000;
    /// The boot-info page (layout in [`boot_info`]).
    pub const BOOT_INFO: u64 = 0x8000;
    /// Initial stack pointer (the stack grows down from the image base).
    pub const STACK_TOP: u64 = 0x20_0000;
    /// Lowest address a guest image may load at.
    pub const IMAGE_BASE: u64 = 0x20_0000;
    /// Smallest guest RAM accepted, in MiB.
    pub const MIN_MEMORY_MIB: u32 = 4;
    /// `"GPUPVGST"`: marks the boot-info page.
    pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"GPUPVGST");
    /// Boot-info layout version.
    pub const BOOT_INFO_VERSION: u32 = 1;
    /// Guest-physical base of the virtual local APIC (xAPIC MMIO layout).
    pub const LAPIC_BASE: u64 = 0xfee0_0000;
    /// Rate of the virtual APIC timer before its divider, in Hz (divide-by-1 counts
    /// this many ticks per second).
    pub const APIC_TIMER_HZ: u64 = 100_000_000;

    /// Background colour (0x00RRGGBB) of the test pattern VM `id` draws, so a test
    /// harness can tell whose pixels a scanout shows: 32 colours (then they repeat),
    /// each at least 0x80 in its brightest channel (never taken for a blank, black
    /// head) and at least 0x30 apart from every other in some channel (two VMs are
    /// never taken for each other at a ±16 tolerance); see the tests.
    pub const fn vm_color(id: u32) -> u32 {
        const PALETTE: [u32; 32] = [
            0x00c0_3030,
            0x0030_a040,
            0x0030_50c0,
            0x00c0_a020, // red, green, blue, yellow
            0x00a0_30a0,
            0x0020_a0a0,
            0x00d0_7020,
            0x0080_8080, // magenta, cyan, orange, grey
            0x0080_b0e0,
            0x00b0_e080,
            0x00e0_b0e0,
            0x00e0_8080,
            0x0020_2080,
            0x0020_b0e0,
            0x0020_e020,
            0x0020_e080,
            0x0080_2020,
            0x0080_20e0,
            0x0080_8020,
            0x0080_e020,
            0x00e0_2080,
            0x00e0_20e0,
            0x0020_20b0,
            0x0020_20e0,
            0x0020_5080,
            0x0020_80e0,
            0x0020_e050,
            0x0020_e0b0,
            0x0020_e0e0,
            0x0050_2080,
            0x0050_20b0,
            0x0050_20e0,
        ];
        PALETTE[(id % 32) as usize]
    }

    /// Byte offsets of the boot-info page's fields (all little endian).
    pub mod boot_info {
        /// u64 [`super::BOOT_INFO_MAGIC`].
        pub const MAGIC: usize = 0;
        /// u32 layout version.
        pub const VERSION: usize = 8;
        /// u32 VM id (0-based, in configuration order).
        pub const VM_ID: usize = 12;
        /// u64 RAM size in bytes.
        pub const MEMORY_BYTES: usize = 16;
        /// u32 vCPU count.
        pub const VCPUS: usize = 24;
        /// u32 hypervisor feature mask (see [`crate::hypercall::VERSION`]).
        pub const FEATURES: usize = 28;
        /// 32 bytes: the VM's name, NUL padded.
        pub const NAME: usize = 32;
        /// u64 GPU share weight.
        pub const GPU_WEIGHT: usize = 64;
    }
}
