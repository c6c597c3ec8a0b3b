//! Putting a guest in its VM: the ELF image's segments into guest RAM, and the
//! guest ABI's boot state (page tables, GDT, boot-info page) around it.

use gpu_pv::abi::guest;

use super::{CreateError, Vm, VmSpec};

impl Vm {
    pub(super) fn load_elf(&mut self, image: &[u8]) -> Result<u64, CreateError> {
        use elf::abi::{EM_X86_64, PT_LOAD};
        use elf::endian::LittleEndian;
        let file = elf::ElfBytes::<LittleEndian>::minimal_parse(image)
            .map_err(|_| CreateError::BadImage("not an ELF file"))?;
        if file.ehdr.class != elf::file::Class::ELF64 || file.ehdr.e_machine != EM_X86_64 {
            return Err(CreateError::BadImage("not an x86_64 ELF64 image"));
        }
        let segs = file
            .segments()
            .ok_or(CreateError::BadImage("no program headers"))?;
        let mut loaded = false;
        for p in segs.iter().filter(|p| p.p_type == PT_LOAD && p.p_memsz > 0) {
            let end = p
                .p_paddr
                .checked_add(p.p_memsz)
                .ok_or(CreateError::BadImage("segment overflows"))?;
            if p.p_paddr < guest::IMAGE_BASE || end > self.mem_size || p.p_filesz > p.p_memsz {
                return Err(CreateError::BadImage("segment outside the VM's RAM"));
            }
            let src = p
                .p_offset
                .checked_add(p.p_filesz)
                .and_then(|e| image.get(p.p_offset as usize..e as usize))
                .ok_or(CreateError::BadImage("segment outside the file"))?;
            self.write_guest(p.p_paddr, src);
            loaded = true;
        }
        if !loaded {
            return Err(CreateError::BadImage("no loadable segment"));
        }
        Ok(file.ehdr.e_entry)
    }

    pub(super) fn write_guest_abi(&mut self, spec: &VmSpec) {
        let w64 = |vm: &mut Vm, gpa: u64, v: u64| {
            vm.write_guest(gpa, &v.to_le_bytes());
        };
        w64(self, guest::PML4, guest::PDPT | 0x7);
        for i in 0..4u64 {
            w64(self, guest::PDPT + i * 8, (guest::PD + i * 0x1000) | 0x7);
            for j in 0..512u64 {
                let pa = (i << 30) | (j << 21);
                w64(self, guest::PD + i * 0x1000 + j * 8, pa | 0x83);
            }
        }
        w64(self, guest::GDT, 0);
        w64(self, guest::GDT + 8, 0x00af_9a00_0000_ffff);
        w64(self, guest::GDT + 16, 0x00cf_9200_0000_ffff);
        use guest::boot_info as bi;
        let base = guest::BOOT_INFO;
        w64(self, base + bi::MAGIC as u64, guest::BOOT_INFO_MAGIC);
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&guest::BOOT_INFO_VERSION.to_le_bytes());
        b[4..].copy_from_slice(&u32::from(self.id).to_le_bytes());
        self.write_guest(base + bi::VERSION as u64, &b);
        w64(self, base + bi::MEMORY_BYTES as u64, self.mem_size);
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&spec.vcpus.to_le_bytes());
        self.write_guest(base + bi::VCPUS as u64, &b);
        let name: [u8; 32] = boot_info::to_fixed(&spec.name);
        self.write_guest(base + bi::NAME as u64, &name);
        w64(self, base + bi::GPU_WEIGHT as u64, u64::from(spec.weight));
    }
}
