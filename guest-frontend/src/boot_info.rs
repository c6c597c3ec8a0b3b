//! The boot-info page the hypervisor writes for a new VM (layout in
//! [`crate::abi::guest::boot_info`]); its address arrives in RDI at the entry point.

use crate::abi::guest::{self, boot_info as off};

/// The boot-info page, copied out and checked.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// Layout version.
    pub version: u32,
    /// VM id (0-based, in configuration order).
    pub vm_id: u32,
    /// RAM size in bytes.
    pub memory_bytes: u64,
    /// vCPU count.
    pub vcpus: u32,
    /// Hypervisor feature mask.
    pub features: u32,
    /// GPU share weight.
    pub gpu_weight: u64,
    name: [u8; 32],
}

/// Why a boot-info page was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// The address is not where the guest ABI puts the page (or is misaligned).
    BadAddress(u64),
    /// The magic is not [`guest::BOOT_INFO_MAGIC`].
    BadMagic(u64),
    /// A layout version this runtime does not know (older than 1).
    BadVersion(u32),
}

impl BootInfo {
    /// Reads and checks the boot-info page at guest-physical `addr` (the value of RDI
    /// at the entry point; the guest ABI identity maps guest RAM).
    pub fn read(addr: u64) -> Result<BootInfo, BootInfoError> {
        // Only the ABI's address is trusted to be mapped RAM holding the page.
        if addr != guest::BOOT_INFO {
            return Err(BootInfoError::BadAddress(addr));
        }
        let base = addr as usize as *const u8;
        let u32_at = |o: usize| {
            // SAFETY: `base` is the guest ABI's boot-info page, identity mapped RAM of
            // this VM, 4 KiB long; every offset used is inside it. Unaligned reads are
            // used so no alignment assumption is needed.
            unsafe { base.add(o).cast::<u32>().read_unaligned() }
        };
        let u64_at = |o: usize| {
            // SAFETY: as above.
            unsafe { base.add(o).cast::<u64>().read_unaligned() }
        };
        let magic = u64_at(off::MAGIC);
        if magic != guest::BOOT_INFO_MAGIC {
            return Err(BootInfoError::BadMagic(magic));
        }
        let version = u32_at(off::VERSION);
        if version < 1 {
            return Err(BootInfoError::BadVersion(version));
        }
        let mut name = [0u8; 32];
        for (i, b) in name.iter_mut().enumerate() {
            // SAFETY: as above (NAME + 32 is inside the page).
            *b = unsafe { base.add(off::NAME + i).read() };
        }
        Ok(BootInfo {
            version,
            vm_id: u32_at(off::VM_ID),
            memory_bytes: u64_at(off::MEMORY_BYTES),
            vcpus: u32_at(off::VCPUS),
            features: u32_at(off::FEATURES),
            gpu_weight: u64_at(off::GPU_WEIGHT),
            name,
        })
    }

    /// A stand-in when the page is missing or damaged: name `"?"`, everything zero.
    pub const fn unknown() -> BootInfo {
        let mut name = [0u8; 32];
        name[0] = b'?';
        BootInfo {
            version: 0,
            vm_id: 0,
            memory_bytes: 0,
            vcpus: 0,
            features: 0,
            gpu_weight: 0,
            name,
        }
    }

    /// The VM's name (up to the first NUL; `"?"` if it is not UTF-8).
    pub fn name(&self) -> &str {
        let len = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        core::str::from_utf8(&self.name[..len]).unwrap_or("?")
    }

    /// RAM size in MiB.
    pub fn memory_mib(&self) -> u64 {
        self.memory_bytes >> 20
    }
}
