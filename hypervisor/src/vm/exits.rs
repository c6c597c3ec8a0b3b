//! The exit dispatcher: every [`VmExit`] of a vCPU handled once for both backends,
//! and the MMIO emulation it needs (the faulting instruction fetched through the
//! guest's own page tables and decoded by `vdev::mmio`).

use log::warn;
use vdev::mmio::{self, Access, StringBus, StringKind, StringOp, StringProgress};
use vdev::platform::{IpiRequest, Platform};
use vdev::rtc::Rtc;

use crate::virt::{self, Instruction, VmExit};

use super::{StopReason, Vm, GUEST_ECAM_BASE, GUEST_ECAM_SIZE, IO_STORM_PER_SECOND};

impl Vm {
    /// Translates a guest-virtual address through the guest's own 4-level page tables.
    pub(super) fn guest_virt_to_phys(&mut self, cr3: u64, va: u64) -> Option<u64> {
        let mut table = cr3 & 0x000f_ffff_ffff_f000;
        for (level, shift) in [(4, 39u64), (3, 30), (2, 21), (1, 12)] {
            let mut e = [0u8; 8];
            if !self.read_guest(table + ((va >> shift) & 511) * 8, &mut e) {
                return None;
            }
            let e = u64::from_le_bytes(e);
            if e & 1 == 0 {
                return None;
            }
            let addr = e & 0x000f_ffff_ffff_f000;
            if (level == 3 || level == 2) && e & (1 << 7) != 0 {
                let mask = (1u64 << shift) - 1;
                return Some((addr & !mask) | (va & mask));
            }
            table = addr;
        }
        Some(table | (va & 0xfff))
    }

    /// Emulates the MMIO instruction at the guest's RIP against `dev`; returns false
    /// (after stopping the VM) when it cannot be emulated.
    pub(super) fn emulate_mmio(&mut self, idx: usize, gpa: u64) -> bool {
        let (rip, cr3) = (self.vcpus[idx].rip(), self.vcpus[idx].cr3());
        // Decoding and the page walk below are for 64-bit code (a starting AP's
        // real-mode trampoline touches no device).
        const EFER_LMA: u64 = 1 << 10;
        if self.vcpus[idx].efer() & EFER_LMA == 0 {
            warn!("MMIO at {gpa:#x} outside long mode (rip {rip:#x}) is not emulated");
            self.stop(idx, StopReason::BadMmio(gpa));
            return false;
        }
        // The instruction may cross into the next page, which the guest's tables map
        // elsewhere: fetch each part through them (the CPU just fetched it all, so
        // both translate unless another vCPU changed the tables meanwhile).
        let mut bytes = [0u8; 15];
        let first = (4096 - (rip & 0xfff)).min(15) as usize;
        let fetched = self
            .guest_virt_to_phys(cr3, rip)
            .is_some_and(|pa| self.read_guest(pa, &mut bytes[..first]));
        let avail = if first < 15
            && self
                .guest_virt_to_phys(cr3, rip.wrapping_add(first as u64))
                .is_some_and(|pa| self.read_guest(pa, &mut bytes[first..]))
        {
            15
        } else {
            first
        };
        if !fetched {
            self.stop(idx, StopReason::BadMmio(gpa));
            return false;
        }
        let now = crate::apic::now_us();
        // Bytes past `avail` are unknown: an instruction running into them fails to decode.
        let decoded = mmio::decode(&bytes[..avail], self.vcpus[idx].regs());
        let Ok((access, len)) = decoded else {
            warn!("cannot emulate the instruction at {rip:#x} touching {gpa:#x}: {decoded:?}");
            self.stop(idx, StopReason::BadMmio(gpa));
            return false;
        };
        let done = match access {
            Access::Read(load) => {
                let value = self.device_read(idx, gpa, load.size, now);
                load.complete(self.vcpus[idx].regs(), value);
                true
            }
            Access::Write { value, size } => self.device_write(idx, gpa, size, value, now),
            Access::String(op) => return self.emulate_string(idx, op, len as u64),
        };
        if done {
            self.vcpus[idx].skip(len as u64);
        }
        done
    }

    /// Whether guest-physical `gpa` is an emulated device's (an MMIO exit's target).
    pub(super) fn is_device(&self, gpa: u64) -> bool {
        let lapic = gpu_pv::abi::guest::LAPIC_BASE;
        (lapic..lapic + 4096).contains(&gpa)
            || Platform::is_ioapic(gpa)
            || (GUEST_ECAM_BASE..GUEST_ECAM_BASE + GUEST_ECAM_SIZE).contains(&gpa)
            || self.gpu.as_ref().is_some_and(|d| d.claims(gpa))
    }

    /// A device read of `size` bytes at `gpa` by vCPU `idx` (all ones where nothing
    /// answers).
    fn device_read(&mut self, idx: usize, gpa: u64, size: u8, now: u64) -> u64 {
        let lapic = gpu_pv::abi::guest::LAPIC_BASE;
        if (lapic..lapic + 4096).contains(&gpa) {
            u64::from(self.lapics[idx].read((gpa - lapic) as u32, now))
        } else if Platform::is_ioapic(gpa) {
            u64::from(self.platform.ioapic_read(gpa))
        } else if let Some((bus, dev, func, off)) = ecam(gpa) {
            self.pci_config_read(bus, dev, func, off, size)
        } else if let Some(d) = self.gpu.as_mut().filter(|d| d.claims(gpa)) {
            d.mmio_read(gpa, size)
        } else {
            u64::MAX
        }
    }

    /// A device write by vCPU `idx`; false when it stopped the VM.
    fn device_write(&mut self, idx: usize, gpa: u64, size: u8, value: u64, now: u64) -> bool {
        let lapic = gpu_pv::abi::guest::LAPIC_BASE;
        if (lapic..lapic + 4096).contains(&gpa) {
            let effect = self.lapics[idx].write((gpa - lapic) as u32, value as u32, now);
            let request = effect.and_then(|e| self.platform.lapic_effect(idx, e, &mut self.lapics));
            match request {
                None => {}
                Some(IpiRequest::Start {
                    vcpus,
                    mode,
                    vector,
                }) => self.start_ipi(idx, vcpus, mode == 5, vector),
                Some(request @ IpiRequest::Unsupported(_)) => {
                    self.stop(
                        idx,
                        StopReason::Unhandled(alloc::format!("IPI {request:?}")),
                    );
                    return false;
                }
            }
        } else if Platform::is_ioapic(gpa) {
            self.platform
                .ioapic_write(gpa, value as u32, &mut self.lapics);
        } else if let Some((bus, dev, func, off)) = ecam(gpa) {
            self.pci_config_write(bus, dev, func, off, size, value as u32);
        } else if let Some(d) = self.gpu.as_mut().filter(|d| d.claims(gpa)) {
            let action = d.mmio_write(gpa, size, value);
            self.gpu_action(action);
        }
        true
    }

    /// Runs a string instruction (`rep movs`, `stos`) that touched a device: its
    /// elements go to RAM or devices through the guest's page tables, at most
    /// [`STRING_ELEMENTS_PER_EXIT`] per exit (the rest on re-execution, as after an
    /// interrupt). Returns false when it stopped the VM.
    fn emulate_string(&mut self, idx: usize, op: StringOp, len: u64) -> bool {
        let mut regs = *self.vcpus[idx].regs();
        let df = self.vcpus[idx].rflags() & (1 << 10) != 0;
        let cr3 = self.vcpus[idx].cr3();
        let mut bus = VmBus { vm: self, idx, cr3 };
        let progress = op.run(&mut regs, df, &mut bus, STRING_ELEMENTS_PER_EXIT);
        *self.vcpus[idx].regs() = regs;
        if self.state != super::VmState::Running {
            return false;
        }
        match progress {
            StringProgress::Done => {
                self.vcpus[idx].skip(len);
                true
            }
            StringProgress::Partial => true,
            StringProgress::Fault => {
                let at = if op.kind == StringKind::Movs {
                    regs.rsi
                } else {
                    regs.rdi
                };
                warn!(
                    "{op:?} stopped at an address it cannot reach (rsi {:#x}, rdi {:#x})",
                    regs.rsi, regs.rdi
                );
                self.stop(idx, StopReason::BadMmio(at));
                false
            }
        }
    }

    /// Reads or writes `buf.len()` bytes at guest-virtual `va` of RAM, page by page
    /// through the guest's tables; false if a page is not RAM.
    fn ram_virt(&mut self, cr3: u64, va: u64, buf: &mut [u8], write: bool) -> bool {
        let mut done = 0;
        while done < buf.len() {
            let at = va.wrapping_add(done as u64);
            let n = ((4096 - (at & 0xfff)) as usize).min(buf.len() - done);
            let Some(pa) = self.guest_virt_to_phys(cr3, at) else {
                return false;
            };
            if pa.saturating_add(n as u64) > self.mem_size {
                return false;
            }
            let part = &mut buf[done..done + n];
            let ok = if write {
                self.write_guest(pa, part)
            } else {
                self.read_guest(pa, part)
            };
            if !ok {
                return false;
            }
            done += n;
        }
        true
    }

    /// RDMSR/WRMSR of an MSR the vCPU does not reach directly (the backend passes
    /// some through, see `virt::PASSED_MSRS`). Emulated: EFER (SCE and NXE; LME
    /// only while paging is off, as the CPU allows), APIC_BASE (the xAPIC at its
    /// fixed base, enabled; x2APIC is not offered), TSC_DEADLINE (the virtual local
    /// APIC's timer), PAT (kept per vCPU; guest RAM is write-back whatever it says)
    /// MISC_ENABLE (fast strings; writes ignored), AMD's INT_PENDING_MSG (0: no
    /// C1E, which Linux asks of CPUs that report a K8 family, as QEMU's does) and
    /// Intel's BIOS_SIGN_ID (microcode revision 0; writes ignored). Any
    /// other MSR gets #GP, as on a CPU without it.
    fn emulate_msr(&mut self, idx: usize, write: bool) -> bool {
        const APIC_BASE: u32 = 0x1b;
        const MISC_ENABLE: u32 = 0x1a0;
        const AMD_INT_PENDING_MSG: u32 = 0xc001_0055;
        const BIOS_SIGN_ID: u32 = 0x8b;
        const PAT: u32 = 0x277;
        const TSC_DEADLINE: u32 = 0x6e0;
        const EFER: u32 = 0xc000_0080;
        /// SCE, LME, LMA (read-only: what is written there is ignored), NXE.
        const EFER_WRITABLE: u64 = (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11);
        const EFER_LME: u64 = 1 << 8;
        const EFER_LMA: u64 = 1 << 10;
        /// APIC_BASE: BSP (bit 8), global enable (bit 11).
        const APIC_BSP: u64 = 1 << 8;
        const APIC_ENABLE: u64 = 1 << 11;
        let r = *self.vcpus[idx].regs();
        let paging = self.vcpus[idx].cr0() & (1 << 31) != 0;
        let msr = r.rcx as u32;
        let value = (r.rdx << 32) | (r.rax & 0xffff_ffff);
        let apic_base =
            gpu_pv::abi::guest::LAPIC_BASE | APIC_ENABLE | if idx == 0 { APIC_BSP } else { 0 };
        let read = match (msr, write) {
            (EFER, false) => Some(self.vcpus[idx].efer()),
            // LME changes only while paging is off (a starting AP's trampoline sets
            // it on its way to long mode); LMA follows LME and CR0.PG.
            (EFER, true)
                if value & !EFER_WRITABLE == 0
                    && (!paging || (value ^ self.vcpus[idx].efer()) & EFER_LME == 0) =>
            {
                let lma = if paging && value & EFER_LME != 0 {
                    EFER_LMA
                } else {
                    0
                };
                self.vcpus[idx].set_efer((value & !EFER_LMA) | lma);
                None
            }
            (APIC_BASE, false) => Some(apic_base),
            // Rewriting what it reads is fine; moving or disabling the APIC, or
            // x2APIC mode, is not offered.
            (APIC_BASE, true) if value == apic_base => None,
            (TSC_DEADLINE, false) => Some(self.lapics[idx].tsc_deadline()),
            (TSC_DEADLINE, true) => {
                let now_tsc = crate::arch::cpu::rdtsc();
                let per_ms = crate::apic::tsc_per_ms().max(1);
                let now = crate::apic::now_us();
                let wait_us = u128::from(value.saturating_sub(now_tsc)) * 1000 / u128::from(per_ms);
                let due = now.saturating_add(u64::try_from(wait_us).unwrap_or(u64::MAX));
                self.lapics[idx].set_tsc_deadline(value, due);
                None
            }
            (PAT, false) => Some(self.pat[idx]),
            // Each of the eight entries must name a memory type (0, 1, 4-7).
            (PAT, true)
                if value
                    .to_le_bytes()
                    .iter()
                    .all(|&t| matches!(t, 0 | 1 | 4..=7)) =>
            {
                self.pat[idx] = value;
                None
            }
            (MISC_ENABLE, false) => Some(1),
            (MISC_ENABLE, true) => None,
            (AMD_INT_PENDING_MSG, false) => Some(0),
            // Intel's microcode revision: none loaded (Linux writes 0, runs CPUID, reads).
            (BIOS_SIGN_ID, false) => Some(0),
            (BIOS_SIGN_ID, true) => None,
            _ => {
                self.vcpus[idx].inject_exception(13, Some(0));
                return true;
            }
        };
        let v = &mut self.vcpus[idx];
        if let Some(x) = read {
            let regs = v.regs();
            regs.rax = x & 0xffff_ffff;
            regs.rdx = x >> 32;
        }
        v.skip(2);
        true
    }

    /// Handles one exit; returns false when the vCPU should give up the CPU.
    pub(super) fn handle_exit(&mut self, idx: usize, exit: VmExit) -> bool {
        match exit {
            VmExit::Io(io) => {
                self.stats.io_exits += 1;
                // The legacy PC ports Linux probes (PIC, PIT, keyboard controller,
                // POST delay) read as absent, cheaply; for a Linux guest they are
                // expected, not a storm.
                let legacy = matches!(
                    io.port,
                    0x20 | 0x21 | 0x40..=0x43 | 0x60 | 0x61 | 0x64 | 0x80 | 0xa0 | 0xa1 | 0xed
                );
                if !Platform::is_com1(io.port)
                    && !Rtc::claims(io.port)
                    && !matches!(io.port, 0xcf8..=0xcff)
                    && !(legacy && self.linux)
                {
                    let now = crate::apic::now_us();
                    if now.saturating_sub(self.io_window.0) > 1_000_000 {
                        self.io_window = (now, 0);
                    }
                    self.io_window.1 += 1;
                    if self.io_window.1 > IO_STORM_PER_SECOND {
                        self.stop(idx, StopReason::IoStorm);
                        return false;
                    }
                }
                if io.string || io.rep {
                    self.stop(
                        idx,
                        StopReason::Unhandled(alloc::format!("string port I/O to {:#x}", io.port)),
                    );
                    return false;
                }
                let rax = self.vcpus[idx].regs().rax;
                if io.input {
                    let val = match io.port {
                        p if Platform::is_com1(p) => {
                            u64::from(self.platform.com1_read(p, &mut self.lapics))
                        }
                        p if Rtc::claims(p) => u64::from(self.rtc.read(p, crate::apic::now_us())),
                        0xcf8 => u64::from(self.pci_addr),
                        0xcfc..=0xcff => self.pci_port_read(io.port, io.size),
                        _ => 0xffff_ffff,
                    };
                    let mask = match io.size {
                        1 => 0xff,
                        2 => 0xffff,
                        _ => 0xffff_ffff,
                    };
                    self.vcpus[idx].regs().rax = (rax & !mask) | (val & mask);
                } else if Platform::is_com1(io.port) {
                    if let Some(b) = self
                        .platform
                        .com1_write(io.port, rax as u8, &mut self.lapics)
                    {
                        self.serial_byte(b);
                    }
                } else if Rtc::claims(io.port) {
                    self.rtc.write(io.port, rax as u8, crate::apic::now_us());
                } else if io.port == 0xcf8 && io.size == 4 {
                    self.pci_addr = rax as u32;
                } else if (0xcfc..=0xcff).contains(&io.port) {
                    self.pci_port_write(io.port, io.size, rax as u32);
                }
                let v = &mut self.vcpus[idx];
                v.skip(u64::from(io.len.max(1)));
                true
            }
            VmExit::Hypercall => {
                self.stats.hypercalls += 1;
                self.vcpus[idx].skip(3);
                self.hypercall(idx)
            }
            VmExit::Cpuid => {
                let v = &mut self.vcpus[idx];
                let view = virt::cpuid::GuestView {
                    cr4: v.cr4(),
                    xcr0: v.cpu_state().xcr0(),
                    apic_id: self.lapics[idx].id() as u8,
                };
                let r = v.regs();
                let (leaf, sub) = (r.rax as u32, r.rcx as u32);
                let res = match (leaf, virt::cpu_state::policy()) {
                    (0x4000_0000, _) => {
                        let sig = *b"GPUPVHVGPUPV";
                        let word = |i: usize| {
                            u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]])
                        };
                        core::arch::x86_64::CpuidResult {
                            eax: 0x4000_0000,
                            ebx: word(0),
                            ecx: word(4),
                            edx: word(8),
                        }
                    }
                    (_, Some(policy)) => {
                        virt::cpuid::guest_cpuid(leaf, sub, &crate::arch::cpu::cpuid, &policy, view)
                    }
                    (_, None) => crate::arch::cpu::cpuid(leaf, sub),
                };
                r.rax = u64::from(res.eax);
                r.rbx = u64::from(res.ebx);
                r.rcx = u64::from(res.ecx);
                r.rdx = u64::from(res.edx);
                v.skip(2);
                true
            }
            VmExit::Xsetbv => {
                let v = &mut self.vcpus[idx];
                let r = *v.regs();
                let value = (r.rdx << 32) | (r.rax & 0xffff_ffff);
                let ok = v.cpl() == 0 && v.cpu_state().set_xcr(r.rcx as u32, value).is_ok();
                if ok {
                    v.skip(3);
                } else {
                    v.inject_exception(13, Some(0));
                }
                true
            }
            VmExit::Instruction(insn) => {
                let v = &mut self.vcpus[idx];
                match insn {
                    // Guest RAM is write-back and DMA to it is coherent: nothing to do,
                    // and the machine's caches are not a guest's to flush or drop.
                    Instruction::Wbinvd | Instruction::Invd => v.skip(insn.len()),
                    // Host performance counters are not the guest's.
                    Instruction::Rdpmc => v.inject_exception(13, Some(0)),
                    // Not offered in CPUID.
                    Instruction::Rdtscp | Instruction::Monitor | Instruction::Mwait => {
                        v.inject_exception(6, None)
                    }
                }
                true
            }
            VmExit::Msr { write } => self.emulate_msr(idx, write),
            VmExit::Hlt => {
                let v = &mut self.vcpus[idx];
                v.skip(1);
                if v.rflags() & (1 << 9) == 0 {
                    self.stop(idx, StopReason::HaltedForever);
                    return false;
                }
                // An interrupt already waiting ends the halt at once (HLT right
                // after STI, while the timer had fired into the IRR).
                if self.lapics[idx].pending().is_some() {
                    return true;
                }
                self.halted[idx] = true;
                false
            }
            VmExit::InterruptWindow => {
                self.vcpus[idx].set_interrupt_window(false);
                true
            }
            VmExit::ExternalInterrupt | VmExit::Preempted => {
                // The interrupt may be the GPU's: its bottom half runs now, not at the
                // end of this slice.
                let _ = crate::gpu_share::service();
                true
            }
            VmExit::Shutdown => {
                self.stop(idx, StopReason::TripleFault);
                false
            }
            VmExit::NestedPageFault { gpa, .. } => {
                if self.is_device(gpa) {
                    return self.emulate_mmio(idx, gpa);
                }
                if gpa >= self.mem_size {
                    self.stop(idx, StopReason::OutsideMemory(gpa));
                } else {
                    self.stop(
                        idx,
                        StopReason::Unhandled(alloc::format!(
                            "nested fault inside RAM at {gpa:#x}"
                        )),
                    );
                }
                false
            }
            VmExit::Exception { vector, error_code } => {
                self.vcpus[idx].inject_exception(vector, error_code);
                true
            }
            VmExit::EntryFailed(code) => {
                self.stop(idx, StopReason::EntryFailed(code));
                false
            }
            VmExit::Other(code) => {
                self.stop(
                    idx,
                    StopReason::Unhandled(alloc::format!("exit code {code:#x}")),
                );
                false
            }
        }
    }
}

/// Elements of a string instruction emulated per exit (a guest's `rep movs` of any
/// length takes a bounded time per exit; the rest runs on re-execution).
const STRING_ELEMENTS_PER_EXIT: u64 = 512;

/// Bus, device, function and register offset of a guest ECAM address.
fn ecam(gpa: u64) -> Option<(u8, u8, u8, u16)> {
    let o = gpa
        .checked_sub(GUEST_ECAM_BASE)
        .filter(|&o| o < GUEST_ECAM_SIZE)?;
    Some((
        (o >> 20) as u8,
        ((o >> 15) & 31) as u8,
        ((o >> 12) & 7) as u8,
        (o & 0xfff) as u16,
    ))
}

/// A VM's memory and devices as one vCPU's string instruction reaches them.
struct VmBus<'a> {
    vm: &'a mut Vm,
    idx: usize,
    cr3: u64,
}

impl VmBus<'_> {
    /// The device address of an element at `va`, if it is one (and within a page).
    fn device(&mut self, va: u64, size: u8) -> Option<u64> {
        if (va & 0xfff) + u64::from(size) > 4096 {
            return None;
        }
        let pa = self.vm.guest_virt_to_phys(self.cr3, va)?;
        (pa >= self.vm.mem_size && self.vm.is_device(pa)).then_some(pa)
    }
}

impl StringBus for VmBus<'_> {
    fn read(&mut self, va: u64, size: u8) -> Option<u64> {
        let mut b = [0u8; 8];
        let n = usize::from(size.min(8));
        if self.vm.ram_virt(self.cr3, va, &mut b[..n], false) {
            return Some(u64::from_le_bytes(b));
        }
        let pa = self.device(va, size)?;
        Some(
            self.vm
                .device_read(self.idx, pa, size, crate::apic::now_us()),
        )
    }

    fn write(&mut self, va: u64, size: u8, value: u64) -> bool {
        let mut b = value.to_le_bytes();
        let n = usize::from(size.min(8));
        if self.vm.ram_virt(self.cr3, va, &mut b[..n], true) {
            return true;
        }
        match self.device(va, size) {
            Some(pa) => {
                let now = crate::apic::now_us();
                self.vm.device_write(self.idx, pa, size, value, now)
            }
            None => false,
        }
    }
}
