//! Putting a guest in its VM: the ELF image's segments into guest RAM, and the
//! guest ABI's boot state (page tables, GDT, boot-info page) around it.

use gpu_pv::abi::guest;

use crate::virt::StartState;

use super::{CreateError, LinuxSpec, Vm, VmSpec};

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

    /// The start-up page tables (the first 4 GiB identity mapped with 2 MiB pages)
    /// and GDT (null, 64-bit code 0x08, data 0x10) both kinds of guest start with.
    fn write_boot_tables(&mut self) {
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
    }

    /// A Linux guest: its kernel, initrd, command line and zero page placed as the
    /// 64-bit boot protocol says (`linux_boot`), and the MP table describing its
    /// `vcpus` CPUs and I/O APIC; returns where it starts (RSI: the zero page).
    pub(super) fn load_linux(
        &mut self,
        image: &[u8],
        linux: &LinuxSpec,
        vcpus: u32,
    ) -> Result<StartState, CreateError> {
        let bz = linux_boot::BzImage::parse(image).map_err(CreateError::Linux)?;
        let initrd_len = linux.initrd.map_or(0, |i| i.len() as u64);
        let mut buf = [0u8; linux_boot::MAX_CMDLINE];
        let cmdline = linux_boot::with_tsc_khz(linux.cmdline, crate::apic::tsc_per_ms(), &mut buf)
            .map_err(CreateError::Linux)?;
        let plan = linux_boot::plan(
            &bz.header,
            bz.kernel.len() as u64,
            self.mem_size,
            initrd_len,
            cmdline.len(),
        )
        .map_err(CreateError::Linux)?;
        self.write_boot_tables();
        let mut ok = self.write_guest(plan.kernel, bz.kernel);
        if let (Some((at, _)), Some(initrd)) = (plan.initrd, linux.initrd) {
            ok &= self.write_guest(at, initrd);
        }
        ok &= self.write_guest(plan.cmdline.0, cmdline);
        ok &= self.write_guest(plan.cmdline.0 + cmdline.len() as u64, &[0]);
        ok &= self.write_guest(plan.zero_page, &linux_boot::zero_page(&bz, &plan));
        let mut mptable = [0u8; linux_boot::mptable::MPTABLE_SIZE];
        linux_boot::mptable::build(vcpus, &mut mptable)
            .map_err(|_| CreateError::BadConfig("more vCPUs than the MP table holds"))?;
        ok &= self.write_guest(linux_boot::mptable::MPTABLE_START, &mptable);
        if !ok {
            return Err(CreateError::BadConfig("the Linux layout left the VM's RAM"));
        }
        Ok(StartState {
            rip: plan.entry,
            // The kernel sets up its own stack first thing; this one is unused RAM.
            rsp: linux_boot::CMDLINE,
            rdi: 0,
            rsi: plan.zero_page,
            cr3: guest::PML4,
            gdt_base: guest::GDT,
            gdt_limit: 23,
        })
    }

    pub(super) fn write_guest_abi(&mut self, spec: &VmSpec) {
        let w64 = |vm: &mut Vm, gpa: u64, v: u64| {
            vm.write_guest(gpa, &v.to_le_bytes());
        };
        self.write_boot_tables();
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
