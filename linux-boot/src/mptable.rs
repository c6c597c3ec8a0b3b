//! The Intel MultiProcessor Specification 1.4 tables of a VM: the MP floating
//! pointer and the MP configuration table, as the firmware of a PC would leave them.
//!
//! Why a VM needs them: a Linux guest booted without ACPI learns its CPUs and its
//! I/O APIC only from these. `mpparse_find_mptable` (`default_find_smp_config` in
//! older kernels) scans the last KiB of base memory for the floating pointer
//! (`smp_scan_config`: "_MP_", length 1, spec 1 or 4, bytes summing to 0), then
//! `smp_read_mpc` checks the table (`smp_check_mpc`: "PCMP", checksum over `length`
//! bytes, spec 1 or 4, a local APIC address) and walks its entries by type:
//! processors (`MP_processor_info`), buses (`MP_bus_info`), I/O APICs
//! (`MP_ioapic_info`), interrupt routes (`mp_save_irq`), local interrupts
//! (`MP_lintsrc_info`). With a table found, `apic_intr_mode_select` chooses
//! symmetric-I/O mode: the local APICs (and their TSC-deadline timers) and the I/O
//! APIC are used, and ISA interrupts such as COM1's IRQ 4 go through the I/O APIC pin
//! the table names. Without one, Linux stays in virtual-wire mode with no I/O APIC.
//!
//! [`build`] writes both structures into one KiB at [`MPTABLE_START`], allocation-free.

use core::fmt;

use crate::LOW_RAM_END;

/// Where the VM's I/O APIC registers are (the PC's default).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Where each vCPU's local APIC registers are (the PC's default).
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Where a VM's MP floating pointer and configuration table go: the last KiB of base
/// memory, which the e820 map of [`crate::plan`] reserves and Linux scans.
pub const MPTABLE_START: u64 = LOW_RAM_END;
/// Bytes reserved for the tables at [`MPTABLE_START`].
pub const MPTABLE_SIZE: usize = 1024;
/// The end of base memory (640 KiB): the tables fill the KiB just below it.
const BASE_MEMORY_END: u64 = 640 * 1024;
const _: () = assert!(MPTABLE_START + MPTABLE_SIZE as u64 == BASE_MEMORY_END);

/// The I/O APIC version the table states (an 82093AA-class part, as the hypervisor's
/// virtual I/O APIC reports; Linux reads the version from the device itself).
pub const IOAPIC_VERSION: u8 = 0x11;
/// The local APIC version the table states: the virtual local APIC's version register
/// (an integrated xAPIC). Linux warns when the two differ.
pub const LAPIC_VERSION: u8 = 0x14;
/// ISA interrupts routed to the I/O APIC: IRQ `n` to pin `n`.
pub const ISA_IRQS: u8 = 16;

/// The floating pointer's and the configuration table's spec revision (1.4).
const SPEC_REV: u8 = 4;
const OEM_ID: &[u8; 8] = b"GPUPVHV ";
const PRODUCT_ID: &[u8; 12] = b"GPU-PV VM   ";
/// The ISA bus type, blank padded (Linux compares the leading "ISA").
const BUS_ISA: &[u8; 6] = b"ISA   ";
const ISA_BUS_ID: u8 = 0;

/// Structure sizes (bytes).
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const CPU_LEN: usize = 20;
const BUS_LEN: usize = 8;
const IOAPIC_LEN: usize = 8;
const INTSRC_LEN: usize = 8;
const LINTSRC_LEN: usize = 8;
/// Local interrupt entries: ExtINT on LINT0, NMI on LINT1.
const LINTSRCS: usize = 2;
/// Everything but the processor entries.
const FIXED_LEN: usize = FLOATING_LEN
    + HEADER_LEN
    + BUS_LEN
    + IOAPIC_LEN
    + ISA_IRQS as usize * INTSRC_LEN
    + LINTSRCS * LINTSRC_LEN;

/// Most vCPUs whose processor entries fit in the KiB (40).
pub const MAX_CPUS: u32 = ((MPTABLE_SIZE - FIXED_LEN) / CPU_LEN) as u32;
const _: () = assert!(MAX_CPUS >= 16);

/// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

/// Interrupt types of I/O and local interrupt entries.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

/// Interrupt flags: polarity and trigger mode "conforming to the bus" (ISA: active
/// high, edge), which Linux's `irq_active_low`/`irq_is_level` read that way.
const IRQFLAG_CONFORMING: u16 = 0;
/// A local interrupt entry's destination: every local APIC.
const MP_APIC_ALL: u8 = 0xff;

/// Processor entry flags.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTPROCESSOR: u8 = 1 << 1;
/// CPU signature (family 6, model 0, stepping 0) and CPUID.1:EDX feature flags (FPU,
/// APIC) for the processor entries. Linux does not use them (it asks CPUID).
const CPU_SIGNATURE: u32 = 6 << 8;
const CPU_FEATURE_FPU: u32 = 1 << 0;
const CPU_FEATURE_APIC: u32 = 1 << 9;
/// I/O APIC entry flag: usable.
const IOAPIC_USABLE: u8 = 1 << 0;

/// Why the tables were not built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MpTableError {
    /// A VM has at least one vCPU.
    NoCpus,
    /// More vCPUs than fit in the KiB.
    TooManyCpus {
        /// vCPUs asked for.
        cpus: u32,
        /// [`MAX_CPUS`].
        max: u32,
    },
}

impl fmt::Display for MpTableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MpTableError::NoCpus => write!(f, "an MP table needs at least one CPU"),
            MpTableError::TooManyCpus { cpus, max } => {
                write!(f, "{cpus} CPUs do not fit in the MP table (at most {max})")
            }
        }
    }
}

/// Appends little-endian fields to a byte buffer.
struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
        self
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes(&[v])
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
}

/// The byte that makes `bytes` sum to 0 (mod 256) when added.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b)))
}

/// Builds the MP floating pointer and configuration table for a VM of `cpus` vCPUs
/// into `out` (placed at [`MPTABLE_START`]; bytes past the returned length are
/// zeroed, so the whole KiB may be copied):
///
/// - the floating pointer (16 bytes): "_MP_", the table's physical address (right
///   after it), length 1 (paragraph), spec 1.4, checksum, no default configuration,
///   virtual-wire mode (no IMCR);
/// - the configuration table: "PCMP", its length, spec 1.4, checksum, OEM and product
///   ids, entry count, the local APIC address [`LAPIC_ADDR`]; then
/// - one processor entry per vCPU, local APIC ids `0..cpus`, all enabled, the first
///   the bootstrap processor;
/// - one bus: ISA, id 0;
/// - one I/O APIC: id `cpus` (after the local APICs'), version [`IOAPIC_VERSION`],
///   usable, at [`IOAPIC_ADDR`];
/// - ISA IRQs `0..16` routed to I/O APIC pins `0..16` (INT, conforming: edge,
///   active high);
/// - ExtINT on LINT0 and NMI on LINT1 of every local APIC.
///
/// Returns the bytes used; refuses 0 vCPUs and more than [`MAX_CPUS`].
pub fn build(cpus: u32, out: &mut [u8; MPTABLE_SIZE]) -> Result<usize, MpTableError> {
    if cpus == 0 {
        return Err(MpTableError::NoCpus);
    }
    if cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus {
            cpus,
            max: MAX_CPUS,
        });
    }
    out.fill(0);
    // Both fit in a u8: cpus <= MAX_CPUS (40).
    let ioapic_id = cpus as u8;
    let table = FLOATING_LEN;

    let mut w = Writer {
        buf: out,
        at: table + HEADER_LEN,
    };
    for apic_id in 0..cpus as u8 {
        let bsp = if apic_id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        w.u8(MP_PROCESSOR)
            .u8(apic_id)
            .u8(LAPIC_VERSION)
            .u8(CPU_ENABLED | bsp)
            .u32(CPU_SIGNATURE)
            .u32(CPU_FEATURE_FPU | CPU_FEATURE_APIC)
            .bytes(&[0; 8]);
    }
    w.u8(MP_BUS).u8(ISA_BUS_ID).bytes(BUS_ISA);
    w.u8(MP_IOAPIC)
        .u8(ioapic_id)
        .u8(IOAPIC_VERSION)
        .u8(IOAPIC_USABLE)
        .u32(IOAPIC_ADDR as u32);
    for irq in 0..ISA_IRQS {
        w.u8(MP_INTSRC)
            .u8(MP_INT)
            .u16(IRQFLAG_CONFORMING)
            .u8(ISA_BUS_ID)
            .u8(irq)
            .u8(ioapic_id)
            .u8(irq);
    }
    for (lint, kind) in [MP_EXTINT, MP_NMI].into_iter().enumerate() {
        w.u8(MP_LINTSRC)
            .u8(kind)
            .u16(IRQFLAG_CONFORMING)
            .u8(ISA_BUS_ID)
            .u8(0)
            .u8(MP_APIC_ALL)
            .u8(lint as u8);
    }
    let end = w.at;
    let entries = cpus as usize + 1 + 1 + usize::from(ISA_IRQS) + LINTSRCS;

    let mut h = Writer {
        buf: out,
        at: table,
    };
    h.bytes(b"PCMP")
        .u16((end - table) as u16)
        .u8(SPEC_REV)
        .u8(0) // checksum, below
        .bytes(OEM_ID)
        .bytes(PRODUCT_ID)
        .u32(0) // no OEM table
        .u16(0)
        .u16(entries as u16)
        .u32(LAPIC_ADDR as u32)
        .u16(0) // no extended table
        .u8(0)
        .u8(0);
    out[table + 7] = checksum(&out[table..end]);

    let mut f = Writer { buf: out, at: 0 };
    f.bytes(b"_MP_")
        .u32((MPTABLE_START + table as u64) as u32)
        .u8(1) // length in 16-byte paragraphs
        .u8(SPEC_REV)
        .u8(0) // checksum, below
        .bytes(&[0; 5]); // feature bytes: table present, virtual-wire mode
    out[10] = checksum(&out[..FLOATING_LEN]);
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{plan, SetupHeader, E820_RAM, E820_RESERVED};

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    fn built(cpus: u32) -> ([u8; MPTABLE_SIZE], usize) {
        let mut out = [0xaa; MPTABLE_SIZE];
        let len = build(cpus, &mut out).unwrap();
        (out, len)
    }

    /// What a parser like Linux's `smp_read_mpc` finds.
    #[derive(Debug, Default)]
    struct Found {
        cpus: u32,
        /// APIC id of the (single) processor flagged BSP.
        bsp: Option<u8>,
        bsps: u32,
        /// Local APIC ids in table order must be 0, 1, ...
        ids_in_order: bool,
        isa_bus: Option<u8>,
        ioapic: Option<(u8, u8, u32)>,
        /// Pin of ISA IRQ n (as `find_isa_irq_pin`), if routed.
        routes: [Option<u8>; 16],
        route_count: u32,
        lints: [Option<(u8, u8)>; 2],
        entries: u32,
    }

    /// Scans `mem` (the KiB at `MPTABLE_START`) as Linux does: the floating pointer at
    /// a 16-byte boundary, then the table it points at, walked by entry type.
    fn parse(mem: &[u8; MPTABLE_SIZE]) -> Found {
        // smp_scan_config(639 * 0x400, 0x400)
        assert_eq!(MPTABLE_START, 639 * 0x400);
        let at = (0..MPTABLE_SIZE)
            .step_by(16)
            .find(|&a| {
                &mem[a..a + 4] == b"_MP_"
                    && mem[a + 8] == 1
                    && sum(&mem[a..a + 16]) == 0
                    && matches!(mem[a + 9], 1 | 4)
            })
            .expect("floating pointer");
        let mpf = &mem[at..at + 16];
        assert_eq!(mpf[11], 0, "feature1: not a default configuration");
        let physptr = u64::from(u32_at(mpf, 4));
        assert!(physptr >= MPTABLE_START);
        let t = usize::try_from(physptr - MPTABLE_START).unwrap();
        // smp_check_mpc
        let length = usize::from(u16_at(mem, t + 4));
        assert!(t + length <= MPTABLE_SIZE);
        let mpc = &mem[t..t + length];
        assert_eq!(&mpc[..4], b"PCMP");
        assert_eq!(sum(mpc), 0, "table checksum");
        assert!(matches!(mpc[6], 1 | 4));
        assert_eq!(u32_at(mpc, 36), LAPIC_ADDR as u32);
        // smp_read_mpc
        let mut found = Found {
            ids_in_order: true,
            ..Found::default()
        };
        let mut p = HEADER_LEN;
        while p < length {
            found.entries += 1;
            let e = &mpc[p..];
            p += match e[0] {
                MP_PROCESSOR => {
                    if e[3] & CPU_ENABLED != 0 {
                        found.ids_in_order &= u32::from(e[1]) == found.cpus;
                        found.cpus += 1;
                        assert_eq!(e[2], LAPIC_VERSION);
                    }
                    if e[3] & CPU_BOOTPROCESSOR != 0 {
                        found.bsp = Some(e[1]);
                        found.bsps += 1;
                    }
                    CPU_LEN
                }
                MP_BUS => {
                    if &e[2..5] == b"ISA" {
                        found.isa_bus = Some(e[1]);
                    }
                    BUS_LEN
                }
                MP_IOAPIC => {
                    if e[3] & IOAPIC_USABLE != 0 {
                        found.ioapic = Some((e[1], e[2], u32_at(e, 4)));
                    }
                    IOAPIC_LEN
                }
                MP_INTSRC => {
                    if e[1] == MP_INT && Some(e[4]) == found.isa_bus && e[5] < 16 {
                        assert_eq!(u16_at(e, 2), 0, "conforming polarity and trigger");
                        assert_eq!(Some(e[6]), found.ioapic.map(|(id, _, _)| id));
                        found.routes[usize::from(e[5])] = Some(e[7]);
                        found.route_count += 1;
                    }
                    INTSRC_LEN
                }
                MP_LINTSRC => {
                    assert_eq!(e[6], MP_APIC_ALL);
                    found.lints[usize::from(e[7])] = Some((e[1], e[6]));
                    LINTSRC_LEN
                }
                other => panic!("unknown entry type {other} at {p}"),
            };
        }
        assert_eq!(p, length, "entries end where the table does");
        assert_eq!(u32::from(u16_at(mpc, 34)), found.entries, "entry count");
        found
    }

    #[test]
    fn floating_pointer_checksums_and_points_at_table() {
        for cpus in [1, 2, 4, MAX_CPUS] {
            let (mem, _) = built(cpus);
            assert_eq!(&mem[..4], b"_MP_");
            assert_eq!(sum(&mem[..FLOATING_LEN]), 0);
            assert_eq!((mem[8], mem[9]), (1, 4), "one paragraph, spec 1.4");
            assert_eq!(mem[12] & 0x80, 0, "virtual-wire mode, no IMCR");
            let physptr = u64::from(u32_at(&mem, 4));
            assert_eq!(physptr, MPTABLE_START + FLOATING_LEN as u64);
            assert_eq!(&mem[FLOATING_LEN..FLOATING_LEN + 4], b"PCMP");
        }
    }

    #[test]
    fn config_table_checksum_length_and_count() {
        for cpus in 1..=MAX_CPUS {
            let (mem, len) = built(cpus);
            let t = FLOATING_LEN;
            let length = usize::from(u16_at(&mem, t + 4));
            assert_eq!(t + length, len);
            assert_eq!(sum(&mem[t..t + length]), 0);
            assert_eq!(mem[t + 6], 4, "spec 1.4");
            assert_eq!(&mem[t + 8..t + 16], OEM_ID);
            assert_eq!(&mem[t + 16..t + 28], PRODUCT_ID);
            assert_eq!(u32_at(&mem, t + 28), 0, "no OEM table");
            assert_eq!(u32::from(u16_at(&mem, t + 34)), cpus + 1 + 1 + 16 + 2);
            assert_eq!(u32_at(&mem, t + 36), 0xfee0_0000);
            assert_eq!(u16_at(&mem, t + 40), 0, "no extended table");
            assert_eq!(
                length,
                HEADER_LEN + 20 * cpus as usize + 8 * (1 + 1 + 16 + 2)
            );
            // The rest of the KiB is zeroed.
            assert!(mem[len..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn parser_finds_cpus_bsp_ioapic_and_routes() {
        for cpus in [1, 2, 3, 8, 16, MAX_CPUS] {
            let (mem, _) = built(cpus);
            let f = parse(&mem);
            assert_eq!(f.cpus, cpus);
            assert!(f.ids_in_order);
            assert_eq!((f.bsp, f.bsps), (Some(0), 1));
            assert_eq!(f.isa_bus, Some(0));
            assert_eq!(
                f.ioapic,
                Some((cpus as u8, IOAPIC_VERSION, IOAPIC_ADDR as u32))
            );
            assert_eq!(f.route_count, 16);
            for irq in 0..16u8 {
                assert_eq!(f.routes[usize::from(irq)], Some(irq));
            }
            // COM1.
            assert_eq!(f.routes[4], Some(4));
            assert_eq!(f.lints, [Some((MP_EXTINT, 0xff)), Some((MP_NMI, 0xff))]);
        }
    }

    #[test]
    fn fits_in_a_kib_for_max_cpus() {
        assert_eq!(MAX_CPUS, 40);
        let (_, len) = built(MAX_CPUS);
        assert!(len <= MPTABLE_SIZE);
        // One more processor entry would not.
        assert!(len + CPU_LEN > MPTABLE_SIZE);
    }

    #[test]
    fn zero_and_too_many_cpus_refused() {
        let mut out = [0x55; MPTABLE_SIZE];
        assert_eq!(build(0, &mut out), Err(MpTableError::NoCpus));
        assert_eq!(
            build(MAX_CPUS + 1, &mut out),
            Err(MpTableError::TooManyCpus {
                cpus: MAX_CPUS + 1,
                max: MAX_CPUS
            })
        );
        assert!(build(u32::MAX, &mut out).is_err());
        // Refused without touching the buffer.
        assert!(out.iter().all(|&b| b == 0x55));
    }

    #[test]
    fn tables_sit_in_memory_the_e820_map_reserves() {
        let h = SetupHeader {
            version: 0x020f,
            setup_sects: 27,
            pref_address: 0x100_0000,
            init_size: 0x400_0000,
            kernel_alignment: 0x20_0000,
            relocatable: true,
            initrd_addr_max: 0x7fff_ffff,
            cmdline_size: 2047,
            xloadflags: 0x7f,
        };
        let p = plan(&h, 8 << 20, 256 << 20, 0, 0).unwrap();
        let (start, end) = (MPTABLE_START, MPTABLE_START + MPTABLE_SIZE as u64);
        assert!(p
            .e820
            .iter()
            .any(|e| e.kind == E820_RESERVED && e.addr <= start && end <= e.addr + e.size));
        assert!(p
            .e820
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .all(|e| e.addr + e.size <= start || end <= e.addr));
        // Above the zero page and the command line the loader places.
        assert!(p.zero_page + 4096 <= start && p.cmdline.0 < start);
    }
}
