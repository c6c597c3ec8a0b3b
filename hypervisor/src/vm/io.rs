//! Port I/O and device actions: PCI configuration mechanism #1 for the virtual GPU,
//! what the virtual GPU asks of its port to the shared GPU, and COM1 output lines.

use alloc::string::String;
use core::fmt::Write;

use vdev::vgpu::Action;

use super::{Vm, FIRST_GUEST_LINE_TSC};

impl Vm {
    /// Bus/device/function/register of the PCI mechanism #1 address, if enabled.
    pub(super) fn pci_target(&self, port: u16) -> Option<(u8, u8, u8, u16)> {
        let a = self.pci_addr;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let off = (a & 0xfc) as u16 + (port - 0xcfc);
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 31) as u8,
            ((a >> 8) & 7) as u8,
            off,
        ))
    }

    pub(super) fn pci_port_read(&self, port: u16, size: u8) -> u64 {
        match self.pci_target(port) {
            Some((bus, dev, func, off)) => self.pci_config_read(bus, dev, func, off, size),
            None => 0xffff_ffff,
        }
    }

    pub(super) fn pci_port_write(&mut self, port: u16, size: u8, value: u32) {
        if let Some((bus, dev, func, off)) = self.pci_target(port) {
            self.pci_config_write(bus, dev, func, off, size, value);
        }
    }

    /// A configuration-space read on the VM's PCI bus 0 (ports or ECAM): the host
    /// bridge at 00:00.0, the virtual GPU, nothing else.
    pub(super) fn pci_config_read(&self, bus: u8, dev: u8, func: u8, off: u16, size: u8) -> u64 {
        match (bus, dev, func, self.gpu.as_ref()) {
            (0, vdev::platform::HOST_BRIDGE_DEVICE, 0, _) => {
                vdev::platform::host_bridge_config_read(off, size)
            }
            (0, _, _, Some(d)) => d.config_read(dev, func, off, size),
            _ => u64::MAX,
        }
    }

    /// A configuration-space write on the VM's PCI bus 0.
    pub(super) fn pci_config_write(
        &mut self,
        bus: u8,
        dev: u8,
        func: u8,
        off: u16,
        size: u8,
        value: u32,
    ) {
        if let (0, Some(d)) = (bus, self.gpu.as_mut()) {
            d.config_write(dev, func, off, size, value);
        }
    }

    /// Carries out what the virtual GPU asked for after a register write.
    pub(super) fn gpu_action(&mut self, action: Action) {
        let Some(port) = self.port.as_ref() else {
            return;
        };
        match action {
            Action::None => {}
            Action::Notify(q) => port.doorbell(q),
            Action::Start(control, cursor) => {
                if !port.start(control, cursor) {
                    if let Some(d) = self.gpu.as_mut() {
                        d.needs_reset = true;
                    }
                }
            }
            Action::Reset => port.driver_reset(),
            Action::Vector(q, entry) => port.set_vector(q, entry),
            Action::QueueReset(q) => port.reset_queue(q),
            Action::QueueRestart(q, layout) => {
                if !port.restart_queue(q, layout) {
                    if let Some(d) = self.gpu.as_mut() {
                        d.needs_reset = true;
                    }
                }
            }
        }
    }

    pub(super) fn serial_byte(&mut self, b: u8) {
        match b {
            b'\n' => self.flush_serial(),
            b'\r' => {}
            _ if self.serial_line.len() >= 200 => {
                self.flush_serial();
                self.serial_line.push(b);
            }
            _ => self.serial_line.push(b),
        }
    }

    pub(super) fn flush_serial(&mut self) {
        let mut s = String::new();
        for &c in &self.serial_line {
            let _ = s.write_char(if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '.'
            });
        }
        self.serial_line.clear();
        self.lines_printed += 1;
        let _ = FIRST_GUEST_LINE_TSC.compare_exchange(
            0,
            crate::arch::cpu::rdtsc(),
            core::sync::atomic::Ordering::Relaxed,
            core::sync::atomic::Ordering::Relaxed,
        );
        crate::println!("[{}] {}", self.name, s);
        self.last_line = s;
    }
}
