//! The PC platform a VM sees besides its virtual GPU: COM1 (a [`Uart16550`]), the
//! I/O APIC, and the wiring between them and the vCPUs' local APICs: a device's
//! interrupt line into an I/O APIC pin, the pin's redirection entry to the local
//! APIC(s) it names, a local APIC's EOI back to the I/O APIC, and IPIs from one
//! local APIC to the others.
//!
//! Why one place: an unmodified Linux needs all of it at once (its serial console
//! takes interrupts through the I/O APIC; its clock and its other CPUs are driven by
//! IPIs and EOIs), and the routing is the part that is easy to get subtly wrong, so
//! it is pure logic here, tested with the devices it connects. The kernel holds one
//! [`Platform`] per VM and the VM's [`VLapic`]s, and calls in on port I/O, MMIO and
//! local APIC register effects. Our own ELF guests use the same COM1 (they write
//! bytes and read LSR, which this UART answers as they expect).

use crate::ioapic::{Delivery, DeliveryMode, Destination, IoApic};
use crate::uart::{Uart16550, COM1_BASE, COM1_IRQ, PORT_COUNT};
use crate::vlapic::{Effect, Ipi, IpiDest, VLapic};

/// Guest-physical base of the I/O APIC's registers (the MP table says the same).
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Bytes of the I/O APIC's register window.
pub const IOAPIC_SIZE: u64 = 0x1000;

/// PCI device number of the host bridge on bus 0.
pub const HOST_BRIDGE_DEVICE: u8 = 0;
/// The host bridge's vendor and device id: the generic PCIe host bridge id QEMU's
/// GPEX uses (1b36:0008), for which no OS loads a driver.
const HOST_BRIDGE_ID: u32 = 0x0008_1b36;
/// Class code host bridge (06/00/00), revision 0.
const HOST_BRIDGE_CLASS: u32 = 0x0600_0000;

/// A configuration-space read of the host bridge at 00:00.0: its id and class, the
/// rest zero (no BARs, no capabilities); writes are ignored. Linux checks for a
/// host bridge on bus 0 before it trusts configuration access through ports
/// 0xCF8/0xCFC (`pci_sanity_check`).
pub fn host_bridge_config_read(off: u16, size: u8) -> u64 {
    let dword = |o: u16| match o & !3 {
        0x00 => HOST_BRIDGE_ID,
        0x08 => HOST_BRIDGE_CLASS,
        _ => 0,
    };
    let size = u16::from(size.clamp(1, 4));
    (0..size).fold(0u64, |v, i| {
        let at = off.wrapping_add(i);
        let byte = (dword(at) >> (8 * (at & 3))) & 0xff;
        v | u64::from(byte) << (8 * i)
    })
}

/// What an IPI asks of the kernel beyond raising vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpiRequest {
    /// INIT or STARTUP to the vCPUs in the mask (bit n: vCPU n), with the startup
    /// page for STARTUP: starting secondary vCPUs is the kernel's.
    Start {
        /// Which vCPUs.
        vcpus: u64,
        /// 5: INIT, 6: STARTUP.
        mode: u8,
        /// The startup vector (page number of the real-mode entry).
        vector: u8,
    },
    /// A delivery mode this platform does not offer (SMI, NMI, reserved).
    Unsupported(u8),
}

/// A VM's platform devices.
#[derive(Clone, Debug)]
pub struct Platform {
    /// COM1.
    pub com1: Uart16550,
    /// The I/O APIC.
    pub ioapic: IoApic,
}

impl Platform {
    /// The devices after reset; the I/O APIC gets id `ioapic_id` (the MP table's).
    pub const fn new(ioapic_id: u8) -> Self {
        Self {
            com1: Uart16550::new(),
            ioapic: IoApic::new(ioapic_id),
        }
    }

    /// Whether `port` is one of COM1's.
    pub fn is_com1(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + PORT_COUNT).contains(&port)
    }

    /// Whether `gpa` is in the I/O APIC's window.
    pub fn is_ioapic(gpa: u64) -> bool {
        (IOAPIC_BASE..IOAPIC_BASE + IOAPIC_SIZE).contains(&gpa)
    }

    /// A byte read of COM1 port `port`.
    pub fn com1_read(&mut self, port: u16, lapics: &mut [VLapic]) -> u8 {
        let v = self.com1.read(port.wrapping_sub(COM1_BASE) as u8);
        self.com1_irq(lapics);
        v
    }

    /// A byte write of COM1 port `port`; returns the byte sent to the outside world.
    pub fn com1_write(&mut self, port: u16, value: u8, lapics: &mut [VLapic]) -> Option<u8> {
        let out = self.com1.write(port.wrapping_sub(COM1_BASE) as u8, value);
        self.com1_irq(lapics);
        out
    }

    /// A byte typed for the VM's COM1; false when its receive FIFO is full.
    pub fn com1_receive(&mut self, byte: u8, lapics: &mut [VLapic]) -> bool {
        let taken = self.com1.receive(byte);
        self.com1_irq(lapics);
        taken
    }

    /// COM1's interrupt line is edge-triggered on the ISA bus: each rising edge is
    /// one pulse on its I/O APIC pin.
    fn com1_irq(&mut self, lapics: &mut [VLapic]) {
        if self.com1.take_irq_edge() {
            if let Some(d) = self.ioapic.pulse(COM1_IRQ) {
                route(d, lapics);
            }
        }
    }

    /// A 32-bit read at `gpa` in the I/O APIC's window.
    pub fn ioapic_read(&self, gpa: u64) -> u32 {
        self.ioapic.read(gpa.wrapping_sub(IOAPIC_BASE))
    }

    /// A 32-bit write at `gpa` in the I/O APIC's window.
    pub fn ioapic_write(&mut self, gpa: u64, value: u32, lapics: &mut [VLapic]) {
        if let Some(d) = self.ioapic.write(gpa.wrapping_sub(IOAPIC_BASE), value) {
            route(d, lapics);
        }
    }

    /// What a write to vCPU `from`'s local APIC asked for: EOIs go to the I/O APIC
    /// (level-triggered entries wait for them), fixed IPIs are raised in their
    /// receivers; INIT and STARTUP are handed back.
    pub fn lapic_effect(
        &mut self,
        from: usize,
        effect: Effect,
        lapics: &mut [VLapic],
    ) -> Option<IpiRequest> {
        match effect {
            Effect::Eoi(vector) => {
                if let Some(d) = self.ioapic.eoi(vector) {
                    route(d, lapics);
                }
                None
            }
            Effect::Ipi(ipi) => send_ipi(from, ipi, lapics),
        }
    }
}

/// The vCPUs an IPI from `from` reaches, as a mask.
fn ipi_targets(from: usize, dest: IpiDest, lapics: &[VLapic]) -> u64 {
    let all = if lapics.len() >= 64 {
        u64::MAX
    } else {
        (1u64 << lapics.len()) - 1
    };
    let me = if from < 64 { 1u64 << from } else { 0 };
    match dest {
        IpiDest::ToSelf => me & all,
        IpiDest::All => all,
        IpiDest::Others => all & !me,
        IpiDest::Physical(id) => matching(lapics, |l| id == 0xff || l.id() == u32::from(id)),
        IpiDest::Logical(mask) => matching(lapics, |l| l.matches_logical(mask)),
    }
}

fn matching(lapics: &[VLapic], f: impl Fn(&VLapic) -> bool) -> u64 {
    lapics
        .iter()
        .take(64)
        .enumerate()
        .filter(|(_, l)| f(l))
        .fold(0, |m, (i, _)| m | (1 << i))
}

fn send_ipi(from: usize, ipi: Ipi, lapics: &mut [VLapic]) -> Option<IpiRequest> {
    let targets = ipi_targets(from, ipi.dest, lapics);
    match ipi.mode {
        // Fixed; lowest priority goes to the first receiver.
        0 | 1 => {
            let targets = if ipi.mode == 1 {
                targets & targets.wrapping_neg()
            } else {
                targets
            };
            for (i, l) in lapics.iter_mut().enumerate().take(64) {
                if targets & (1 << i) != 0 {
                    l.raise(ipi.vector);
                }
            }
            None
        }
        5 | 6 => Some(IpiRequest::Start {
            vcpus: targets,
            mode: ipi.mode,
            vector: ipi.vector,
        }),
        m => Some(IpiRequest::Unsupported(m)),
    }
}

/// Hands an I/O APIC delivery to the local APIC(s) it names. Only fixed and
/// lowest-priority deliveries carry a vector; NMI, ExtINT and the rest are not
/// offered (Linux programs none of them for its devices) and are dropped.
pub fn route(d: Delivery, lapics: &mut [VLapic]) {
    let dest = match d.dest {
        Destination::Physical(id) => IpiDest::Physical(id),
        Destination::Logical(mask) => IpiDest::Logical(mask),
    };
    let mode = match d.mode {
        DeliveryMode::Fixed => 0,
        DeliveryMode::LowestPriority => 1,
        _ => return,
    };
    // The sender does not matter for a physical or logical destination.
    let _ = send_ipi(
        usize::MAX,
        Ipi {
            vector: d.vector,
            mode,
            dest,
        },
        lapics,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const LSR: u16 = COM1_BASE + 5;
    const IER: u16 = COM1_BASE + 1;
    const IIR: u16 = COM1_BASE + 2;
    const MCR: u16 = COM1_BASE + 4;
    const THRI: u8 = 1 << 1;
    const OUT2: u8 = 1 << 3;

    fn lapics(n: u32) -> alloc::vec::Vec<VLapic> {
        (0..n)
            .map(|i| {
                let mut l = VLapic::new(i);
                l.write(0xf0, 0x1ff, 0); // software enable
                l
            })
            .collect()
    }

    /// Programs pin `pin`'s entry: `vector`, physical destination `dest`, unmasked.
    fn route_pin(p: &mut Platform, pin: u32, vector: u8, dest: u8, lapics: &mut [VLapic]) {
        p.ioapic_write(IOAPIC_BASE, 0x10 + 2 * pin + 1, lapics);
        p.ioapic_write(IOAPIC_BASE + 0x10, u32::from(dest) << 24, lapics);
        p.ioapic_write(IOAPIC_BASE, 0x10 + 2 * pin, lapics);
        p.ioapic_write(IOAPIC_BASE + 0x10, u32::from(vector), lapics);
    }

    #[test]
    fn the_host_bridge_reads_as_one() {
        assert_eq!(host_bridge_config_read(0x00, 4), 0x0008_1b36);
        assert_eq!(host_bridge_config_read(0x00, 2), 0x1b36);
        assert_eq!(host_bridge_config_read(0x02, 2), 0x0008);
        // Linux's check: the 16-bit class at 0x0a is PCI_CLASS_BRIDGE_HOST.
        assert_eq!(host_bridge_config_read(0x0a, 2), 0x0600);
        assert_eq!(
            host_bridge_config_read(0x0e, 1),
            0,
            "header type 0, one function"
        );
        assert_eq!(host_bridge_config_read(0x10, 4), 0, "no BARs");
        assert_eq!(host_bridge_config_read(0xfff, 4), 0, "no panic at the end");
    }

    /// Linux's serial driver with its IRQ routed: enabling the transmit interrupt
    /// with OUT2 set raises the programmed vector in the destination vCPU only.
    #[test]
    fn com1_interrupts_reach_the_vcpu_the_ioapic_names() {
        let mut l = lapics(2);
        let mut p = Platform::new(2);
        route_pin(&mut p, u32::from(COM1_IRQ), 0x24, 1, &mut l);
        p.com1_write(MCR, OUT2, &mut l);
        p.com1_write(IER, THRI, &mut l);
        assert_eq!(l[1].pending(), Some(0x24));
        assert_eq!(l[0].pending(), None);
        // The driver's handler reads IIR (THRE acknowledged), then LSR.
        l[1].acknowledge(0x24);
        assert_eq!(p.com1_read(IIR, &mut l) & 0x0f, 0x02);
        assert_eq!(p.com1_read(IIR, &mut l) & 0x0f, 0x01, "no interrupt left");
        let _ = p.com1_read(LSR, &mut l);
        l[1].write(0xb0, 0, 0); // EOI
                                // Writing a byte transmits it and raises THRE again: a new edge.
        assert_eq!(p.com1_write(COM1_BASE, b'x', &mut l), Some(b'x'));
        assert_eq!(l[1].pending(), Some(0x24));
    }

    #[test]
    fn a_masked_pin_or_out2_clear_delivers_nothing() {
        let mut l = lapics(1);
        let mut p = Platform::new(1);
        // Entry still masked (reset state).
        p.com1_write(MCR, OUT2, &mut l);
        p.com1_write(IER, THRI, &mut l);
        assert_eq!(l[0].pending(), None);
        // Routed, but OUT2 clear: the UART's line never rises.
        let mut p = Platform::new(1);
        route_pin(&mut p, u32::from(COM1_IRQ), 0x24, 0, &mut l);
        p.com1_write(IER, THRI, &mut l);
        assert_eq!(l[0].pending(), None);
    }

    #[test]
    fn received_bytes_interrupt_and_read_back() {
        let mut l = lapics(1);
        let mut p = Platform::new(1);
        route_pin(&mut p, u32::from(COM1_IRQ), 0x30, 0, &mut l);
        p.com1_write(COM1_BASE + 2, 0x01, &mut l); // FIFOs on
        p.com1_write(MCR, OUT2, &mut l);
        p.com1_write(IER, 1, &mut l); // received data
        assert_eq!(l[0].pending(), None);
        assert!(p.com1_receive(b'a', &mut l));
        assert_eq!(l[0].pending(), Some(0x30));
        assert_eq!(p.com1_read(LSR, &mut l) & 1, 1, "data ready");
        assert_eq!(p.com1_read(COM1_BASE, &mut l), b'a');
        assert_eq!(p.com1_read(LSR, &mut l) & 1, 0);
    }

    #[test]
    fn ipis_reach_their_receivers_and_start_requests_go_back() {
        let mut l = lapics(3);
        let mut p = Platform::new(3);
        let ipi = |vector, mode, dest| Effect::Ipi(Ipi { vector, mode, dest });
        assert_eq!(
            p.lapic_effect(0, ipi(0xf0, 0, IpiDest::ToSelf), &mut l),
            None
        );
        assert_eq!(l[0].pending(), Some(0xf0));
        assert_eq!(
            p.lapic_effect(0, ipi(0xf1, 0, IpiDest::Others), &mut l),
            None
        );
        assert_eq!((l[1].pending(), l[2].pending()), (Some(0xf1), Some(0xf1)));
        p.lapic_effect(1, ipi(0xf2, 0, IpiDest::Physical(2)), &mut l);
        assert_eq!(l[2].pending(), Some(0xf2));
        // Flat logical: vCPU 1 has logical id bit 1.
        l[1].write(0xd0, 0x0200_0000, 0);
        p.lapic_effect(0, ipi(0xf3, 0, IpiDest::Logical(0x02)), &mut l);
        assert_eq!(l[1].pending(), Some(0xf3));
        assert_eq!(
            p.lapic_effect(0, ipi(0, 5, IpiDest::Others), &mut l),
            Some(IpiRequest::Start {
                vcpus: 0b110,
                mode: 5,
                vector: 0
            })
        );
        assert_eq!(
            p.lapic_effect(0, ipi(0x9f, 6, IpiDest::Physical(1)), &mut l),
            Some(IpiRequest::Start {
                vcpus: 0b010,
                mode: 6,
                vector: 0x9f
            })
        );
        assert_eq!(
            p.lapic_effect(0, ipi(0, 4, IpiDest::All), &mut l),
            Some(IpiRequest::Unsupported(4))
        );
        // A destination no vCPU has reaches nobody.
        p.lapic_effect(0, ipi(0xf4, 0, IpiDest::Physical(9)), &mut l);
        assert!(l.iter().all(|l| l.pending() != Some(0xf4)));
    }

    /// A level-triggered entry holds its next delivery until the vector's EOI
    /// reaches the I/O APIC through the local APIC's EOI register.
    #[test]
    fn eoi_releases_a_level_triggered_pin() {
        let mut l = lapics(1);
        let mut p = Platform::new(1);
        p.ioapic_write(IOAPIC_BASE, 0x10 + 2 * 9, &mut l);
        p.ioapic_write(IOAPIC_BASE + 0x10, 0x41 | (1 << 15), &mut l);
        let d = p.ioapic.set_level(9, true).expect("delivered");
        route(d, &mut l);
        assert_eq!(l[0].pending(), Some(0x41));
        l[0].acknowledge(0x41);
        assert_eq!(p.ioapic.set_level(9, true), None, "remote IRR holds it");
        let eoi = l[0].write(0xb0, 0, 0).expect("EOI effect");
        p.lapic_effect(0, eoi, &mut l);
        assert_eq!(
            l[0].pending(),
            Some(0x41),
            "still asserted: delivered again"
        );
    }
}
