//! A virtual I/O APIC: the 82093AA register model (version 0x11, 24 input pins) that
//! routes a VM's device interrupts to its local APICs.
//!
//! Why a VM needs one: a Linux guest without ACPI learns from the MP table
//! (`linux_boot::mptable`) that there is an I/O APIC, enters symmetric-I/O APIC mode
//! and programs one redirection table entry (RTE) per interrupt line: vector,
//! destination, trigger mode, mask. Its legacy ISA interrupts, COM1's IRQ 4 among
//! them, then reach it only through here (there is no 8259 PIC in virtual-wire mode
//! to fall back on).
//!
//! The guest reaches the registers indirectly, as on hardware: it writes a register
//! index to IOREGSEL ([`IOREGSEL`], offset 0x00) and reads or writes that register
//! through IOWIN ([`IOWIN`], offset 0x10), with aligned 32-bit accesses. Registers:
//! ID (0x00), VER (0x01: version 0x11, highest RTE index 23), ARB (0x02) and the RTEs,
//! pin `n` at 0x10 + 2n (low dword) and 0x11 + 2n (high dword).
//!
//! Devices drive the input pins: [`IoApic::pulse`] for an edge (ISA devices),
//! [`IoApic::set_level`] for a line that stays asserted until the device is serviced.
//! Every call that can make an interrupt due returns it as a [`Delivery`], which the
//! hypervisor hands to the local APIC(s) its destination names.
//!
//! Level-triggered entries: a delivered interrupt sets the entry's remote IRR, which
//! holds further deliveries until the local APIC's EOI of that vector is broadcast
//! back ([`IoApic::eoi`]); if the line is still asserted then, it is delivered again.
//! Version 0x11 has no EOI register (Linux's `__eoi_ioapic_pin` writes one only for
//! version 0x20 and up), so when Linux wants to end a level interrupt by hand
//! (`ioapic_ack_level`, whenever the local APIC's TMR does not show the vector as
//! level) it rewrites the RTE masked and edge-triggered, then restores it: switching
//! an entry to edge clears its remote IRR, as on the 82093AA (and in KVM and QEMU).
//!
//! Everything here is guest-controlled (offsets, values, the pins and vectors it
//! programs): no input panics; unknown offsets and registers read as 0 and ignore
//! writes.

/// Input pins (redirection table entries).
pub const PINS: usize = 24;
/// The version in the VER register: an 82093AA-class I/O APIC, without the EOI
/// register of version 0x20.
pub const VERSION: u8 = 0x11;
/// MMIO offset of the register select (index) register.
pub const IOREGSEL: u64 = 0x00;
/// MMIO offset of the data window onto the selected register.
pub const IOWIN: u64 = 0x10;

/// Register indices (written to IOREGSEL).
const REG_ID: u8 = 0x00;
const REG_VER: u8 = 0x01;
const REG_ARB: u8 = 0x02;
const REG_RTE0: u8 = 0x10;
const REG_RTE_END: u8 = REG_RTE0 + 2 * PINS as u8;

/// ID and ARB registers: the id sits in bits 31:24. ID keeps all eight bits (the
/// 82093AA has four, 27:24; Linux's `IO_APIC_reg_00` reads eight, and the MP table
/// numbers the I/O APIC after the vCPUs, so its id can exceed 15).
const ID_SHIFT: u32 = 24;
/// ARB holds a 4-bit arbitration id (bits 27:24).
const ARB_ID_MASK: u8 = 0x0f;
/// VER register: the highest RTE index sits in bits 23:16.
const VER_MAX_ENTRY_SHIFT: u32 = 16;

/// RTE fields.
const RTE_VECTOR: u64 = 0xff;
const RTE_DELIVERY_MODE_SHIFT: u32 = 8;
const RTE_DELIVERY_MODE: u64 = 0x7 << RTE_DELIVERY_MODE_SHIFT;
const RTE_DEST_LOGICAL: u64 = 1 << 11;
/// Delivery status (read-only): set while a message waits to be sent. Deliveries
/// here are immediate, so it always reads 0.
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_ACTIVE_LOW: u64 = 1 << 13;
/// Remote IRR (read-only): a level-triggered interrupt was accepted and not yet EOIed.
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
const RTE_DEST_SHIFT: u32 = 56;
const RTE_DEST: u64 = 0xff << RTE_DEST_SHIFT;
/// The bits a guest write sets; the rest are reserved (read as 0) or read-only.
const RTE_WRITABLE: u64 = RTE_VECTOR
    | RTE_DELIVERY_MODE
    | RTE_DEST_LOGICAL
    | RTE_ACTIVE_LOW
    | RTE_LEVEL
    | RTE_MASKED
    | RTE_DEST;
// The read-only bits are not among them.
const _: () = assert!(RTE_WRITABLE & (RTE_DELIVERY_STATUS | RTE_REMOTE_IRR) == 0);

/// Vectors 0..16 are reserved for exceptions: a local APIC refuses them as
/// interrupts (it sets "received illegal vector" in its ESR and drops them), so they
/// are not delivered here and set no remote IRR.
const FIRST_VECTOR: u8 = 16;

/// How the destination field is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// The local APIC whose 8-bit id this is (0xff: all of them).
    Physical(u8),
    /// The local APICs whose logical id (LDR, under the DFR's model) matches these
    /// 8 bits.
    Logical(u8),
}

/// The delivery mode of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// The vector, to every destination APIC.
    Fixed,
    /// The vector, to one of the destination APICs (the lowest priority).
    LowestPriority,
    /// An NMI (the vector is ignored).
    Nmi,
    /// An external interrupt: the vector comes from an 8259 PIC (the entry's vector is
    /// ignored).
    ExtInt,
    /// SMI (2), INIT (5) or a reserved mode (3, 6): the 3-bit field's value.
    Other(u8),
}

impl DeliveryMode {
    fn from_bits(bits: u8) -> Self {
        match bits & 0x7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            4 => DeliveryMode::Nmi,
            7 => DeliveryMode::ExtInt,
            other => DeliveryMode::Other(other),
        }
    }

    /// Whether the vector is the interrupt (rather than ignored).
    fn uses_vector(self) -> bool {
        matches!(self, DeliveryMode::Fixed | DeliveryMode::LowestPriority)
    }
}

/// Where an interrupt goes: vector and destination as the redirection entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The vector (meaningful for [`DeliveryMode::Fixed`] and
    /// [`DeliveryMode::LowestPriority`]; never below 16 for those).
    pub vector: u8,
    /// Which local APIC(s).
    pub dest: Destination,
    /// How.
    pub mode: DeliveryMode,
    /// The entry is level-triggered: the local APIC should mark the vector in its TMR
    /// and its EOI of it should reach [`IoApic::eoi`].
    pub level: bool,
}

/// A virtual I/O APIC.
#[derive(Clone, Debug)]
pub struct IoApic {
    id: u8,
    /// IOREGSEL (8 bits).
    select: u8,
    rte: [u64; PINS],
    /// Asserted input lines, one bit per pin (set by [`IoApic::set_level`]).
    lines: u32,
}

/// The pin index of `pin`, if the I/O APIC has it.
fn index(pin: u8) -> Option<usize> {
    let i = usize::from(pin);
    (i < PINS).then_some(i)
}

/// Whether `rte` has level-triggered semantics (remote IRR, redelivery): a
/// level-triggered entry carrying a vector. NMI, ExtINT and the rest are sent once per
/// rising edge whatever the trigger bit says (the 82093AA wants them edge-triggered).
fn is_level(rte: u64) -> bool {
    rte & RTE_LEVEL != 0 && mode_of(rte).uses_vector()
}

fn mode_of(rte: u64) -> DeliveryMode {
    DeliveryMode::from_bits(((rte & RTE_DELIVERY_MODE) >> RTE_DELIVERY_MODE_SHIFT) as u8)
}

impl IoApic {
    /// An I/O APIC after reset, with id `id`: every entry masked (bit 16), edge,
    /// vector 0; no line asserted.
    pub const fn new(id: u8) -> Self {
        Self {
            id,
            select: 0,
            rte: [RTE_MASKED; PINS],
            lines: 0,
        }
    }

    /// Its id (the ID register's).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Pin `pin`'s redirection table entry as the guest reads it, if the pin exists.
    pub fn entry(&self, pin: u8) -> Option<u64> {
        index(pin).map(|i| self.rte[i])
    }

    /// MMIO read at `offset` from the base: IOREGSEL (0x00) or IOWIN (0x10). The
    /// caller passes aligned 32-bit accesses only; any other offset reads as 0.
    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            IOREGSEL => u32::from(self.select),
            IOWIN => self.read_reg(self.select),
            _ => 0,
        }
    }

    /// MMIO write at `offset` (as [`IoApic::read`]; other offsets are ignored, as is
    /// the EOI register of version 0x20 at 0x40). Returns the interrupt that becomes
    /// due, if any: unmasking an entry (or making it level-triggered, or clearing its
    /// remote IRR by a level -> edge -> level rewrite) while its level-triggered line
    /// is still asserted delivers it.
    pub fn write(&mut self, offset: u64, value: u32) -> Option<Delivery> {
        match offset {
            // IOREGSEL is 8 bits wide; the rest is reserved.
            IOREGSEL => {
                self.select = value as u8;
                None
            }
            IOWIN => self.write_reg(self.select, value),
            _ => None,
        }
    }

    /// An edge on input `pin` (ISA devices): the interrupt, unless the entry is
    /// masked (then the edge is lost, as on the 82093AA: nothing latches it), the pin
    /// does not exist, the vector is below 16, or the entry is level-triggered with
    /// its remote IRR set (the pending interrupt covers it).
    pub fn pulse(&mut self, pin: u8) -> Option<Delivery> {
        self.send(index(pin)?)
    }

    /// The level of input `pin` (`asserted`: the device requests service; the
    /// entry's polarity bit is kept for the guest but not applied, the device model
    /// says when its line is asserted, as in KVM and QEMU). A level-triggered entry
    /// delivers while the line is asserted, the entry unmasked and its remote IRR
    /// clear; an edge-triggered one delivers on the rising edge only.
    pub fn set_level(&mut self, pin: u8, asserted: bool) -> Option<Delivery> {
        let i = index(pin)?;
        let bit = 1u32 << i;
        let was = self.lines & bit != 0;
        if !asserted {
            self.lines &= !bit;
            return None;
        }
        self.lines |= bit;
        if is_level(self.rte[i]) || !was {
            self.send(i)
        } else {
            None
        }
    }

    /// The local APIC's EOI of `vector`, broadcast to the I/O APIC: clears the remote
    /// IRR of every level-triggered entry with that vector and returns the
    /// redelivery of the lowest such pin whose line is still asserted (the others
    /// stay pending and go at the next EOI of the vector; a guest sharing one vector
    /// between pins is served one pin at a time).
    pub fn eoi(&mut self, vector: u8) -> Option<Delivery> {
        let matches = |rte: u64| rte & RTE_LEVEL != 0 && (rte & RTE_VECTOR) as u8 == vector;
        for rte in self.rte.iter_mut().filter(|r| matches(**r)) {
            *rte &= !RTE_REMOTE_IRR;
        }
        let asserted = self.lines;
        (0..PINS)
            .filter(|&i| asserted & (1 << i) != 0)
            .find_map(|i| {
                if matches(self.rte[i]) {
                    self.send(i)
                } else {
                    None
                }
            })
    }

    fn read_reg(&self, reg: u8) -> u32 {
        match reg {
            REG_ID => u32::from(self.id) << ID_SHIFT,
            REG_VER => ((PINS as u32 - 1) << VER_MAX_ENTRY_SHIFT) | u32::from(VERSION),
            REG_ARB => u32::from(self.id & ARB_ID_MASK) << ID_SHIFT,
            REG_RTE0..REG_RTE_END => {
                let n = usize::from(reg - REG_RTE0);
                let rte = self.rte[n / 2];
                if n % 2 == 0 {
                    rte as u32
                } else {
                    (rte >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, reg: u8, value: u32) -> Option<Delivery> {
        match reg {
            REG_ID => {
                self.id = (value >> ID_SHIFT) as u8;
                None
            }
            REG_RTE0..REG_RTE_END => {
                let n = usize::from(reg - REG_RTE0);
                let pin = n / 2;
                let old = self.rte[pin];
                let merged = if n % 2 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                let mut rte = (merged & RTE_WRITABLE) | (old & RTE_REMOTE_IRR);
                // Edge-triggered: no remote IRR (Linux's EOI for version < 0x20).
                if rte & RTE_LEVEL == 0 {
                    rte &= !RTE_REMOTE_IRR;
                }
                self.rte[pin] = rte;
                if is_level(rte) && self.lines & (1 << pin) != 0 {
                    self.send(pin)
                } else {
                    None
                }
            }
            // VER and ARB are read-only; other indices are not registers.
            _ => None,
        }
    }

    /// Sends pin `i`'s interrupt if its entry lets it: unmasked, a vector of 16 or
    /// more for the modes that carry one, and for a level-triggered entry its remote
    /// IRR clear (then set).
    fn send(&mut self, i: usize) -> Option<Delivery> {
        let rte = self.rte[i];
        let level = is_level(rte);
        if rte & RTE_MASKED != 0 || (level && rte & RTE_REMOTE_IRR != 0) {
            return None;
        }
        let mode = mode_of(rte);
        let vector = (rte & RTE_VECTOR) as u8;
        if mode.uses_vector() && vector < FIRST_VECTOR {
            return None;
        }
        let dest_id = (rte >> RTE_DEST_SHIFT) as u8;
        let dest = if rte & RTE_DEST_LOGICAL != 0 {
            Destination::Logical(dest_id)
        } else {
            Destination::Physical(dest_id)
        };
        if level {
            self.rte[i] |= RTE_REMOTE_IRR;
        }
        Some(Delivery {
            vector,
            dest,
            mode,
            level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes register `reg` through IOREGSEL/IOWIN.
    fn put(io: &mut IoApic, reg: u8, value: u32) -> Option<Delivery> {
        io.write(IOREGSEL, u32::from(reg));
        io.write(IOWIN, value)
    }

    fn get(io: &mut IoApic, reg: u8) -> u32 {
        io.write(IOREGSEL, u32::from(reg));
        io.read(IOWIN)
    }

    /// Programs pin `pin` as Linux does (`__ioapic_write_entry`: high dword first).
    fn program(io: &mut IoApic, pin: u8, rte: u64) -> Option<Delivery> {
        let d = put(io, REG_RTE0 + 2 * pin + 1, (rte >> 32) as u32);
        assert_eq!(d, None, "a high-dword write delivers nothing here");
        put(io, REG_RTE0 + 2 * pin, rte as u32)
    }

    fn fixed(vector: u8, apic: u8) -> Delivery {
        Delivery {
            vector,
            dest: Destination::Physical(apic),
            mode: DeliveryMode::Fixed,
            level: false,
        }
    }

    /// A fixed, physical, unmasked entry.
    fn rte(vector: u8, apic: u8, level: bool) -> u64 {
        let trig = if level { RTE_LEVEL } else { 0 };
        u64::from(vector) | trig | (u64::from(apic) << RTE_DEST_SHIFT)
    }

    #[test]
    fn id_version_arbitration_read_as_linux_expects() {
        let mut io = IoApic::new(4);
        // `mp_register_ioapic`: not all ones (`bad_ioapic_register`), version 0x11
        // (`io_apic_get_version`), 24 entries (`io_apic_get_redir_entries`: bits
        // 23:16 + 1), PRQ (bit 15) clear.
        let ver = get(&mut io, REG_VER);
        assert_eq!(ver, 0x0017_0011);
        assert_eq!(ver & 0xff, u32::from(VERSION));
        assert_eq!(((ver >> 16) & 0xff) + 1, PINS as u32);
        assert_eq!(get(&mut io, REG_ID), 4 << 24);
        assert_eq!(get(&mut io, REG_ARB), 4 << 24);
        assert_ne!(
            get(&mut io, REG_ARB),
            ver,
            "print_IO_APIC tells reg 2 by its value"
        );
        // `io_apic_unique_id` may move the id; it reads it back to check.
        put(&mut io, REG_ID, 0x2a << 24);
        assert_eq!(get(&mut io, REG_ID), 0x2a << 24);
        assert_eq!(io.id(), 0x2a);
        assert_eq!(get(&mut io, REG_ARB), 0x0a << 24);
        // VER and ARB are read-only.
        put(&mut io, REG_VER, 0xffff_ffff);
        put(&mut io, REG_ARB, 0xffff_ffff);
        assert_eq!(get(&mut io, REG_VER), 0x0017_0011);
        assert_eq!(get(&mut io, REG_ARB), 0x0a << 24);
    }

    #[test]
    fn ioregsel_reads_back_its_eight_bits() {
        let mut io = IoApic::new(0);
        io.write(IOREGSEL, 0x1234_5611);
        assert_eq!(io.read(IOREGSEL), 0x11);
    }

    #[test]
    fn reset_masks_every_pin() {
        let mut io = IoApic::new(0);
        for pin in 0..PINS as u8 {
            assert_eq!(get(&mut io, REG_RTE0 + 2 * pin), RTE_MASKED as u32);
            assert_eq!(get(&mut io, REG_RTE0 + 2 * pin + 1), 0);
            assert_eq!(io.pulse(pin), None);
            assert_eq!(io.set_level(pin, true), None);
        }
    }

    #[test]
    fn rte_write_readback_keeps_read_only_bits() {
        let mut io = IoApic::new(0);
        // Every bit set: delivery status, remote IRR and reserved bits stay clear.
        put(&mut io, REG_RTE0 + 2 * 3, 0xffff_ffff);
        put(&mut io, REG_RTE0 + 2 * 3 + 1, 0xffff_ffff);
        let low = get(&mut io, REG_RTE0 + 2 * 3);
        assert_eq!(low, 0x1_afff);
        assert_eq!(low & RTE_DELIVERY_STATUS as u32, 0);
        assert_eq!(low & RTE_REMOTE_IRR as u32, 0);
        assert_eq!(get(&mut io, REG_RTE0 + 2 * 3 + 1), 0xff00_0000);
        // Remote IRR set by a delivery survives a guest write of 0 to it.
        program(&mut io, 5, rte(0x31, 0, true));
        assert!(io.set_level(5, true).is_some());
        assert_ne!(io.entry(5).unwrap() & RTE_REMOTE_IRR, 0);
        put(&mut io, REG_RTE0 + 2 * 5, rte(0x31, 0, true) as u32);
        assert_ne!(io.entry(5).unwrap() & RTE_REMOTE_IRR, 0);
        // A written entry reads back as written; the other pins are untouched.
        let e = rte(0x42, 7, false) | RTE_DEST_LOGICAL | RTE_ACTIVE_LOW | (1 << 8);
        program(&mut io, 23, e);
        assert_eq!(io.entry(23), Some(e));
        assert_eq!(get(&mut io, REG_RTE0 + 2 * 23), e as u32);
        assert_eq!(get(&mut io, REG_RTE0 + 2 * 23 + 1), (e >> 32) as u32);
        assert_eq!(io.entry(22), Some(RTE_MASKED));
    }

    #[test]
    fn masked_edge_is_lost() {
        let mut io = IoApic::new(0);
        program(&mut io, 4, rte(0x24, 0, false) | RTE_MASKED);
        assert_eq!(io.pulse(4), None);
        // Unmasking does not bring the edge back.
        assert_eq!(program(&mut io, 4, rte(0x24, 0, false)), None);
        assert_eq!(io.pulse(4), Some(fixed(0x24, 0)));
    }

    #[test]
    fn pulse_delivers_physical_destination() {
        let mut io = IoApic::new(0);
        // COM1: ISA IRQ 4 on pin 4, edge, to APIC 1.
        program(&mut io, 4, rte(0x24, 1, false));
        assert_eq!(io.pulse(4), Some(fixed(0x24, 1)));
        // Edges are not held back: every pulse is an interrupt.
        assert_eq!(io.pulse(4), Some(fixed(0x24, 1)));
        // Broadcast is the caller's business: 0xff is passed on.
        program(&mut io, 4, rte(0x24, 0xff, false));
        assert_eq!(io.pulse(4), Some(fixed(0x24, 0xff)));
    }

    #[test]
    fn pulse_delivers_logical_destination_and_modes() {
        let mut io = IoApic::new(0);
        program(
            &mut io,
            1,
            rte(0x31, 0x03, false) | RTE_DEST_LOGICAL | (1 << 8),
        );
        assert_eq!(
            io.pulse(1),
            Some(Delivery {
                vector: 0x31,
                dest: Destination::Logical(0x03),
                mode: DeliveryMode::LowestPriority,
                level: false,
            })
        );
        // NMI and ExtINT ignore the vector (0 is fine).
        program(&mut io, 2, rte(0, 0, false) | (4 << 8));
        assert_eq!(io.pulse(2).map(|d| d.mode), Some(DeliveryMode::Nmi));
        program(&mut io, 0, rte(0, 0, false) | (7 << 8));
        assert_eq!(io.pulse(0).map(|d| d.mode), Some(DeliveryMode::ExtInt));
        program(&mut io, 0, rte(0, 0, false) | (2 << 8));
        assert_eq!(io.pulse(0).map(|d| d.mode), Some(DeliveryMode::Other(2)));
    }

    #[test]
    fn low_vectors_are_not_delivered() {
        let mut io = IoApic::new(0);
        for vector in 0..FIRST_VECTOR {
            program(&mut io, 9, rte(vector, 0, false));
            assert_eq!(io.pulse(9), None);
            program(&mut io, 9, rte(vector, 0, true));
            assert_eq!(io.set_level(9, true), None);
            // Nothing accepted, so no remote IRR.
            assert_eq!(io.entry(9).unwrap() & RTE_REMOTE_IRR, 0);
            io.set_level(9, false);
        }
        program(&mut io, 9, rte(FIRST_VECTOR, 0, false));
        assert_eq!(io.pulse(9), Some(fixed(FIRST_VECTOR, 0)));
    }

    #[test]
    fn level_remote_irr_holds_until_eoi() {
        let mut io = IoApic::new(0);
        program(&mut io, 16, rte(0x50, 0, true));
        let d = io.set_level(16, true).unwrap();
        assert_eq!((d.vector, d.level), (0x50, true));
        assert_ne!(get(&mut io, REG_RTE0 + 32) & RTE_REMOTE_IRR as u32, 0);
        // Held while remote IRR is set, however often the line is raised or pulsed.
        assert_eq!(io.set_level(16, true), None);
        assert_eq!(io.pulse(16), None);
        // Another vector's EOI does nothing.
        assert_eq!(io.eoi(0x51), None);
        assert_ne!(io.entry(16).unwrap() & RTE_REMOTE_IRR, 0);
        // Serviced: the line drops, then the EOI clears remote IRR, no redelivery.
        io.set_level(16, false);
        assert_eq!(io.eoi(0x50), None);
        assert_eq!(io.entry(16).unwrap() & RTE_REMOTE_IRR, 0);
        // The next assertion is delivered.
        assert!(io.set_level(16, true).is_some());
    }

    #[test]
    fn eoi_redelivers_while_line_asserted() {
        let mut io = IoApic::new(0);
        program(&mut io, 10, rte(0x60, 2, true));
        program(&mut io, 11, rte(0x60, 3, true));
        assert!(io.set_level(10, true).is_some());
        // Pin 11 shares the vector but has its own remote IRR: it goes at once.
        assert_eq!(
            io.set_level(11, true).map(|d| d.dest),
            Some(Destination::Physical(3))
        );
        // One EOI clears both; the lowest asserted pin goes again, the other waits.
        let d = io.eoi(0x60).unwrap();
        assert_eq!(d.dest, Destination::Physical(2));
        assert_eq!(io.entry(11).unwrap() & RTE_REMOTE_IRR, 0);
        io.set_level(10, false);
        assert_eq!(io.eoi(0x60).map(|d| d.dest), Some(Destination::Physical(3)));
        io.set_level(11, false);
        assert_eq!(io.eoi(0x60), None);
    }

    #[test]
    fn level_to_edge_rewrite_clears_remote_irr() {
        // Linux's `__eoi_ioapic_pin` for version < 0x20: masked + edge, then restore.
        let mut io = IoApic::new(0);
        let e = rte(0x70, 0, true);
        program(&mut io, 8, e);
        assert!(io.set_level(8, true).is_some());
        assert_eq!(program(&mut io, 8, (e & !RTE_LEVEL) | RTE_MASKED), None);
        assert_eq!(io.entry(8).unwrap() & RTE_REMOTE_IRR, 0);
        // Restored while the line is still asserted: delivered again.
        let d = program(&mut io, 8, e).unwrap();
        assert_eq!((d.vector, d.level), (0x70, true));
        // Line dropped: the same dance delivers nothing.
        io.set_level(8, false);
        program(&mut io, 8, (e & !RTE_LEVEL) | RTE_MASKED);
        assert_eq!(program(&mut io, 8, e), None);
        // A masked level entry keeps its remote IRR.
        assert!(io.set_level(8, true).is_some());
        program(&mut io, 8, e | RTE_MASKED);
        assert_ne!(io.entry(8).unwrap() & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn unmask_of_asserted_level_line_delivers() {
        let mut io = IoApic::new(0);
        program(&mut io, 20, rte(0x80, 1, true) | RTE_MASKED);
        assert_eq!(io.set_level(20, true), None);
        let d = program(&mut io, 20, rte(0x80, 1, true)).unwrap();
        assert_eq!((d.vector, d.dest), (0x80, Destination::Physical(1)));
        // Masked at EOI time: nothing; unmasked later: delivered.
        program(&mut io, 20, rte(0x80, 1, true) | RTE_MASKED);
        assert_eq!(io.eoi(0x80), None);
        assert!(program(&mut io, 20, rte(0x80, 1, true)).is_some());
        // An edge entry is not delivered by unmasking an asserted line.
        io.set_level(21, true);
        assert_eq!(program(&mut io, 21, rte(0x81, 0, false)), None);
        // ... but a rising edge is.
        io.set_level(21, false);
        assert!(io.set_level(21, true).is_some());
        assert_eq!(io.set_level(21, true), None, "no edge while high");
    }

    #[test]
    fn out_of_range_pins_and_registers_are_harmless() {
        let mut io = IoApic::new(1);
        for pin in [PINS as u8, 31, 32, 200, u8::MAX] {
            assert_eq!(io.pulse(pin), None);
            assert_eq!(io.set_level(pin, true), None);
            assert_eq!(io.set_level(pin, false), None);
            assert_eq!(io.entry(pin), None);
        }
        for reg in (0x03..0x10).chain(REG_RTE_END..=u8::MAX) {
            assert_eq!(put(&mut io, reg, 0xffff_ffff), None);
            assert_eq!(get(&mut io, reg), 0);
        }
        // Offsets other than IOREGSEL and IOWIN (including version 0x20's EOI at 0x40).
        io.write(IOREGSEL, u32::from(REG_ID));
        let offsets = [
            0x01,
            0x04,
            0x08,
            0x0c,
            0x11,
            0x14,
            0x20,
            0x40,
            0xfff,
            u64::MAX,
        ];
        for off in offsets {
            assert_eq!(io.write(off, 0xffff_ffff), None);
            assert_eq!(io.read(off), 0);
        }
        assert_eq!(io.read(IOWIN), 1 << 24);
        for pin in 0..PINS as u8 {
            assert_eq!(io.entry(pin), Some(RTE_MASKED));
        }
    }

    #[test]
    fn random_accesses_never_panic() {
        let mut io = IoApic::new(0);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200_000 {
            let r = next();
            let value = (r >> 32) as u32;
            match r % 8 {
                // Mostly the two real registers, with a valid index half the time.
                0 | 1 => {
                    io.write(IOREGSEL, value % 0x48);
                }
                2 => {
                    io.write(IOWIN, value);
                }
                3 => {
                    io.write(next() % 0x1000, value);
                    io.read(next());
                }
                4 => {
                    io.pulse(value as u8 % 32);
                }
                5 => {
                    io.set_level(value as u8 % 32, value & 0x100 != 0);
                }
                6 => {
                    io.eoi(value as u8);
                }
                _ => {
                    io.read(IOWIN);
                }
            }
            if let Some(d) = io.pulse(next() as u8) {
                if d.mode.uses_vector() {
                    assert!(d.vector >= FIRST_VECTOR);
                }
            }
        }
        // Still a working I/O APIC afterwards.
        let mut io2 = io.clone();
        program(&mut io2, 4, rte(0x24, 0, false));
        assert_eq!(io2.pulse(4), Some(fixed(0x24, 0)));
    }
}
