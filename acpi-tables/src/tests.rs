//! Hand-built tables: good ones parse to what they say, and every kind of damage
//! (bad checksums, truncation, zero or overlong lengths) is refused with a warning.

use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use super::*;

// ---------------------------------------------------------------- builders

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

/// A table: the standard header (length and checksum filled in) and `body`.
fn table(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(sig);
    t.extend_from_slice(&((HEADER_LEN + body.len()) as u32).to_le_bytes());
    t.push(1); // revision
    t.push(0); // checksum
    t.extend_from_slice(b"TESTID"); // OEM id
    t.extend_from_slice(b"TESTTBL "); // OEM table id
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"TEST");
    t.extend_from_slice(&1u32.to_le_bytes());
    assert_eq!(t.len(), HEADER_LEN);
    t.extend_from_slice(body);
    fix(&mut t);
    t
}

/// Makes the table's bytes add up to 0 again after an edit.
fn fix(t: &mut [u8]) {
    t[9] = 0;
    t[9] = 0u8.wrapping_sub(sum(t));
}

/// An RSDP of `revision` (36 bytes for 2 and later, 20 before), checksums right.
fn rsdp(revision: u8, rsdt: u32, xsdt: u64) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(b"RSD PTR ");
    r.push(0);
    r.extend_from_slice(b"BOCHS ");
    r.push(revision);
    r.extend_from_slice(&rsdt.to_le_bytes());
    if revision >= 2 {
        r.extend_from_slice(&36u32.to_le_bytes());
        r.extend_from_slice(&xsdt.to_le_bytes());
        r.extend_from_slice(&[0; 4]);
    }
    r[8] = 0u8.wrapping_sub(sum(&r[..20]));
    if revision >= 2 {
        r[32] = 0u8.wrapping_sub(sum(&r));
    }
    r
}

fn u16le(v: u16) -> [u8; 2] {
    v.to_le_bytes()
}
fn u32le(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}
fn u64le(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// MADT body: local APIC base, flags, then `entries`.
fn madt_body(entries: &[u8]) -> Vec<u8> {
    cat(&[&u32le(0xfee0_0000), &u32le(1), entries])
}
fn lapic(uid: u8, id: u8, enabled: bool) -> Vec<u8> {
    cat(&[&[0, 8, uid, id], &u32le(u32::from(enabled))])
}
fn ioapic(id: u8, base: u32, gsi: u32) -> Vec<u8> {
    cat(&[&[1, 12, id, 0], &u32le(base), &u32le(gsi)])
}
fn x2apic(id: u32, enabled: bool) -> Vec<u8> {
    cat(&[
        &[9, 16, 0, 0],
        &u32le(id),
        &u32le(u32::from(enabled)),
        &u32le(id),
    ])
}
fn lapic_override(base: u64) -> Vec<u8> {
    cat(&[&[5, 12, 0, 0], &u64le(base)])
}

fn mcfg_entry(base: u64, seg: u16, start: u8, end: u8) -> Vec<u8> {
    cat(&[&u64le(base), &u16le(seg), &[start, end], &[0; 4]])
}
fn mcfg_body(entries: &[u8]) -> Vec<u8> {
    cat(&[&[0; 8], entries])
}

fn scope(kind: u8, enum_id: u8, bus: u8, dev: u8, func: u8) -> Vec<u8> {
    vec![kind, 8, 0, 0, enum_id, bus, dev, func]
}
fn drhd(include_all: bool, seg: u16, base: u64, scopes: &[u8]) -> Vec<u8> {
    cat(&[
        &u16le(0),
        &u16le((16 + scopes.len()) as u16),
        &[u8::from(include_all), 0],
        &u16le(seg),
        &u64le(base),
        scopes,
    ])
}
fn rmrr(base: u64, limit: u64, scopes: &[u8]) -> Vec<u8> {
    cat(&[
        &u16le(1),
        &u16le((24 + scopes.len()) as u16),
        &[0, 0],
        &u16le(0),
        &u64le(base),
        &u64le(limit),
        scopes,
    ])
}
fn dmar_body(haw_minus_1: u8, structures: &[u8]) -> Vec<u8> {
    cat(&[&[haw_minus_1, 1], &[0; 10], structures])
}

fn hpet_body(base: u64) -> Vec<u8> {
    cat(&[
        &u32le(0x8086_a201),
        &[0, 64, 0, 0],
        &u64le(base),
        &[0],
        &u16le(0x80),
        &[0],
    ])
}

/// A memory image at [`BASE`] with the pieces placed at their physical addresses.
struct Image {
    bytes: Vec<u8>,
}

const BASE: u64 = 0xe_0000;

impl Image {
    fn new(size: usize) -> Self {
        Image {
            bytes: vec![0; size],
        }
    }
    fn put(&mut self, pa: u64, b: &[u8]) -> &mut Self {
        let o = (pa - BASE) as usize;
        self.bytes[o..o + b.len()].copy_from_slice(b);
        self
    }
    fn parse(&self, rsdp: u64) -> Parsed {
        parse(
            &MemoryImage {
                base: BASE,
                bytes: &self.bytes,
            },
            rsdp,
        )
    }
}

/// Lays out RSDP (revision 2) -> XSDT -> `tables`, one per 4 KiB.
fn platform_with(tables: &[Vec<u8>]) -> Image {
    let mut img = Image::new(0x1000 * (tables.len() + 2));
    let xsdt_pa = BASE + 0x1000;
    let pas: Vec<u64> = (0..tables.len())
        .map(|i| BASE + 0x2000 + 0x1000 * i as u64)
        .collect();
    let entries: Vec<u8> = pas.iter().flat_map(|p| p.to_le_bytes()).collect();
    img.put(BASE, &rsdp(2, 0, xsdt_pa));
    img.put(xsdt_pa, &table(b"XSDT", &entries));
    for (t, pa) in tables.iter().zip(&pas) {
        img.put(*pa, t);
    }
    img
}

fn good_madt() -> Vec<u8> {
    table(
        b"APIC",
        &madt_body(&cat(&[
            &lapic(0, 0, true),
            &lapic(1, 1, true),
            &lapic(2, 2, false),
            &ioapic(0, 0xfec0_0000, 0),
            &x2apic(1, true),   // already listed: not twice
            &x2apic(300, true), // beyond 8-bit ids
            &x2apic(301, false),
        ])),
    )
}

fn good_mcfg() -> Vec<u8> {
    table(
        b"MCFG",
        &mcfg_body(&cat(&[
            &mcfg_entry(0xe000_0000, 1, 0, 15),
            &mcfg_entry(0xb000_0000, 0, 0, 255),
        ])),
    )
}

fn good_dmar() -> Vec<u8> {
    table(
        b"DMAR",
        &dmar_body(
            38,
            &cat(&[
                &drhd(
                    false,
                    0,
                    0xfed9_0000,
                    &cat(&[&scope(1, 0, 0, 1, 0), &scope(3, 2, 0xf0, 0x1f, 0)]),
                ),
                &rmrr(0x7000_0000, 0x7000_ffff, &scope(1, 0, 0, 2, 0)),
                &drhd(true, 0, 0xfed9_1000, &[]),
            ]),
        ),
    )
}

fn good_tables() -> Vec<Vec<u8>> {
    vec![
        table(b"FACP", &[0; 80]),
        good_madt(),
        good_mcfg(),
        good_dmar(),
        table(b"HPET", &hpet_body(0xfed0_0000)),
    ]
}

fn expected() -> Platform {
    Platform {
        oem: "BOCHS".into(),
        tables: "FACP APIC MCFG DMAR HPET".into(),
        cpus: vec![0, 1, 300],
        lapic_base: 0xfee0_0000,
        ioapics: vec![(0, 0xfec0_0000, 0)],
        ecam: Some(Ecam {
            base: 0xb000_0000,
            bus_start: 0,
            bus_end: 255,
        }),
        dmar: Some(Dmar {
            host_address_width: 39,
            units: vec![
                Drhd {
                    base: 0xfed9_0000,
                    segment: 0,
                    include_all: false,
                    scopes: vec![
                        DeviceScope {
                            kind: 1,
                            enum_id: 0,
                            bus: 0,
                            dev: 1,
                            func: 0,
                        },
                        DeviceScope {
                            kind: 3,
                            enum_id: 2,
                            bus: 0xf0,
                            dev: 0x1f,
                            func: 0,
                        },
                    ],
                },
                Drhd {
                    base: 0xfed9_1000,
                    segment: 0,
                    include_all: true,
                    scopes: vec![],
                },
            ],
            rmrrs: vec![Rmrr {
                base: 0x7000_0000,
                limit: 0x7000_ffff,
                scopes: vec![DeviceScope {
                    kind: 1,
                    enum_id: 0,
                    bus: 0,
                    dev: 2,
                    func: 0,
                }],
            }],
        }),
        hpet: Some(0xfed0_0000),
    }
}

/// The only warning is about `sig` and is `error`.
fn assert_one_warning(p: &Parsed, sig: &[u8; 4], error: Error) {
    assert_eq!(p.warnings.len(), 1, "{:#?}", p.warnings);
    assert_eq!(&p.warnings[0].signature, sig, "{}", p.warnings[0]);
    assert_eq!(p.warnings[0].error, error, "{}", p.warnings[0]);
}

/// [`expected`] without what the table `sig` gives.
fn expected_without(sig: &[u8; 4]) -> Platform {
    let mut e = expected();
    let s = core::str::from_utf8(sig).unwrap();
    e.tables = e
        .tables
        .split(' ')
        .filter(|t| *t != s)
        .collect::<Vec<_>>()
        .join(" ");
    match sig {
        b"APIC" => {
            e.cpus.clear();
            e.ioapics.clear();
            e.lapic_base = 0;
        }
        b"MCFG" => e.ecam = None,
        b"DMAR" => e.dmar = None,
        b"HPET" => e.hpet = None,
        _ => unreachable!(),
    }
    e
}

/// Parses the good tables with one of them, `sig`, damaged: the others give what
/// they gave undamaged, nothing of `sig` is used, one warning says why.
fn assert_skipped(tables: Vec<Vec<u8>>, sig: &[u8; 4], error: Error) -> Platform {
    let p = platform_with(&tables).parse(BASE);
    assert_eq!(p.platform, Some(expected_without(sig)), "{:#?}", p.warnings);
    assert_one_warning(&p, sig, error);
    p.platform.unwrap()
}

// ---------------------------------------------------------------- good tables

#[test]
fn good_tables_parse_to_what_they_say() {
    let p = platform_with(&good_tables()).parse(BASE);
    assert_eq!(p.warnings, vec![]);
    assert_eq!(p.platform, Some(expected()));
}

#[test]
fn revision_0_rsdp_uses_the_rsdt_and_is_only_20_bytes() {
    // The RSDP sits in the last 20 bytes of readable memory: nothing after it may be
    // read (the old code always read 36).
    let mut img = Image::new(0x2000);
    let madt_pa = BASE + 0x1000;
    let rsdt_pa = BASE + 0x800;
    let rsdp_pa = BASE + 0x2000 - 20;
    img.put(rsdp_pa, &rsdp(0, rsdt_pa as u32, 0))
        .put(rsdt_pa, &table(b"RSDT", &u32le(madt_pa as u32)))
        .put(madt_pa, &table(b"APIC", &madt_body(&lapic(0, 3, true))));
    let p = img.parse(rsdp_pa);
    assert_eq!(p.warnings, vec![]);
    let p = p.platform.unwrap();
    assert_eq!(p.tables, "APIC");
    assert_eq!(p.cpus, vec![3]);
}

#[test]
fn lapic_override_and_null_or_unreadable_pointers() {
    let mut tables = good_tables();
    tables[1] = table(
        b"APIC",
        &madt_body(&cat(&[&lapic(0, 0, true), &lapic_override(0x1_fee0_0000)])),
    );
    let mut img = platform_with(&tables);
    // Two more XSDT entries: a null one (skipped quietly) and one outside memory.
    let xsdt_pa = BASE + 0x1000;
    let mut entries: Vec<u8> = (0..tables.len())
        .flat_map(|i| (BASE + 0x2000 + 0x1000 * i as u64).to_le_bytes())
        .collect();
    entries.extend_from_slice(&u64le(0));
    entries.extend_from_slice(&u64le(0xdead_0000));
    entries.extend_from_slice(&u64le(u64::MAX - 3)); // pa + 36 overflows
    img.put(xsdt_pa, &table(b"XSDT", &entries));
    let p = img.parse(BASE);
    let unreadable = |pa| Warning {
        pa,
        signature: *b"????",
        error: Error::Unreadable,
    };
    assert_eq!(
        p.warnings,
        vec![unreadable(0xdead_0000), unreadable(u64::MAX - 3)]
    );
    assert_eq!(
        p.warnings[0].to_string(),
        "???? at 0xdead0000: not in readable memory; ignored"
    );
    let p = p.platform.unwrap();
    assert_eq!(p.lapic_base, 0x1_fee0_0000);
    assert_eq!(p.cpus, vec![0]);
}

// ---------------------------------------------------------------- the RSDP

#[test]
fn rsdp_with_a_bad_checksum_is_refused() {
    let mut img = platform_with(&good_tables());
    img.bytes[8] = img.bytes[8].wrapping_add(1);
    // Keep the extended checksum right, so only the first one is wrong.
    img.bytes[32] = img.bytes[32].wrapping_sub(1);
    let p = img.parse(BASE);
    assert_eq!(p.platform, None);
    assert_one_warning(&p, b"RSDP", Error::Checksum);
}

#[test]
fn rsdp_with_a_bad_extended_checksum_is_refused() {
    let mut img = platform_with(&good_tables());
    img.bytes[32] = img.bytes[32].wrapping_add(1);
    let p = img.parse(BASE);
    assert_eq!(p.platform, None);
    assert_one_warning(&p, b"RSDP", Error::ExtendedChecksum);
}

#[test]
fn rsdp_without_its_signature_is_refused() {
    let mut img = platform_with(&good_tables());
    img.bytes[0] = b'X';
    let p = img.parse(BASE);
    assert_eq!(p.platform, None);
    assert_one_warning(&p, b"RSDP", Error::Signature);
}

// ---------------------------------------------------------------- root table

#[test]
fn root_table_with_a_bad_checksum_gives_no_platform() {
    let mut img = platform_with(&good_tables());
    img.bytes[0x1000 + 40] ^= 0xff; // an entry of the XSDT
    let p = img.parse(BASE);
    assert_eq!(p.platform, None);
    assert_one_warning(&p, b"XSDT", Error::Checksum);
}

#[test]
fn root_table_with_the_wrong_signature_is_refused() {
    // The RSDP points at a MADT: its body must not be read as table pointers.
    let mut img = platform_with(&good_tables());
    img.put(BASE + 0x1000, &good_madt());
    let p = img.parse(BASE);
    assert_eq!(p.platform, None);
    assert_one_warning(&p, b"APIC", Error::Signature);
}

#[test]
fn root_table_with_a_partial_entry_is_refused() {
    let mut img = platform_with(&good_tables());
    let entries: Vec<u8> = (0..5u64)
        .flat_map(|i| (BASE + 0x2000 + 0x1000 * i).to_le_bytes())
        .chain([0, 0, 0, 0])
        .collect();
    img.put(BASE + 0x1000, &table(b"XSDT", &entries));
    let p = img.parse(BASE);
    assert_eq!(p.platform, None);
    assert_one_warning(
        &p,
        b"XSDT",
        Error::PastEnd {
            offset: 76,
            len: 8,
            end: 80,
        },
    );
}

// ---------------------------------------------------------------- any table

#[test]
fn table_with_a_bad_checksum_is_skipped() {
    let mut tables = good_tables();
    tables[1][50] ^= 1;
    let p = assert_skipped(tables, b"APIC", Error::Checksum);
    assert_eq!(p.tables, "FACP MCFG DMAR HPET");
    assert_eq!(p.cpus, vec![]);
    assert_eq!(p.ecam, expected().ecam);
}

#[test]
fn table_length_smaller_than_its_header_is_refused() {
    let mut tables = good_tables();
    tables[2][4..8].copy_from_slice(&u32le(20));
    fix(&mut tables[2]);
    let p = assert_skipped(tables, b"MCFG", Error::Length(20));
    assert_eq!(p.ecam, None);
}

#[test]
fn table_length_past_readable_memory_is_refused() {
    // The HPET is the last table: its length runs past the end of memory.
    let mut tables = good_tables();
    tables[4][4..8].copy_from_slice(&u32le(0x2000));
    fix(&mut tables[4]);
    let p = assert_skipped(tables, b"HPET", Error::Unreadable);
    assert_eq!(p.hpet, None);
}

#[test]
fn table_length_over_the_cap_is_refused() {
    let mut tables = good_tables();
    tables[3][4..8].copy_from_slice(&u32le(u32::MAX));
    fix(&mut tables[3]);
    let p = assert_skipped(tables, b"DMAR", Error::Length(u32::MAX));
    assert_eq!(p.dmar, None);
}

#[test]
fn table_slice_shorter_than_its_length_field_is_refused() {
    let t = good_madt();
    assert_eq!(
        Table::new(&t[..t.len() - 1]).unwrap_err(),
        Error::Unreadable
    );
    assert_eq!(Table::new(&t[..10]).unwrap_err(), Error::Unreadable);
    // Longer slices are fine: the table is its length.
    let mut longer = t.clone();
    longer.push(0x55);
    assert_eq!(Table::new(&longer).unwrap().bytes(), &t[..]);
}

// ---------------------------------------------------------------- MADT

fn madt_with(entries: &[u8]) -> Vec<Vec<u8>> {
    let mut tables = good_tables();
    tables[1] = table(b"APIC", &madt_body(entries));
    tables
}

#[test]
fn madt_entry_of_length_zero_is_refused() {
    let entries = cat(&[&lapic(0, 0, true), &[0, 0], &lapic(1, 1, true)]);
    let tables = madt_with(&entries);
    let p = assert_skipped(
        tables.clone(),
        b"APIC",
        Error::Short {
            offset: 52,
            len: 0,
            min: 8,
        },
    );
    assert_eq!(p.cpus, vec![]);
    // What the kernel logs.
    assert_eq!(
        platform_with(&tables).parse(BASE).warnings[0].to_string(),
        "APIC at 0xe3000: entry at offset 0x34: length 0 below its kind's 8; ignored"
    );
}

#[test]
fn madt_entry_running_past_the_end_is_refused() {
    let entries = cat(&[&lapic(0, 0, true), &[0, 8, 1, 1, 1]]);
    let p = assert_skipped(
        madt_with(&entries),
        b"APIC",
        Error::PastEnd {
            offset: 52,
            len: 8,
            end: 57,
        },
    );
    assert_eq!(p.cpus, vec![]);
}

#[test]
fn madt_entry_shorter_than_its_kind_is_refused() {
    // A local APIC entry of 4 bytes: its "flags" would be the next entry's first
    // bytes, [1, 12, ..] here: "enabled" (the old code took a CPU with id 7).
    let entries = cat(&[&[0, 4, 0, 7], &ioapic(0, 0xfec0_0000, 0)]);
    let p = assert_skipped(
        madt_with(&entries),
        b"APIC",
        Error::Short {
            offset: 44,
            len: 4,
            min: 8,
        },
    );
    assert_eq!(p.cpus, vec![]);
    // Unknown kinds need only their 2-byte header.
    let ok = madt_with(&cat(&[&[0x7f, 2], &lapic(1, 1, true)]));
    let p = platform_with(&ok).parse(BASE);
    assert_eq!(p.warnings, vec![]);
    assert_eq!(p.platform.unwrap().cpus, vec![1]);
}

#[test]
fn madt_shorter_than_its_fixed_part_is_refused() {
    let mut tables = good_tables();
    tables[1] = table(b"APIC", &u32le(0xfee0_0000));
    assert_skipped(
        tables,
        b"APIC",
        Error::Truncated {
            needed: 44,
            len: 40,
        },
    );
}

// ---------------------------------------------------------------- MCFG

#[test]
fn mcfg_with_a_partial_allocation_is_refused() {
    let mut tables = good_tables();
    tables[2] = table(
        b"MCFG",
        &mcfg_body(&cat(&[&mcfg_entry(0xb000_0000, 0, 0, 255), &[0; 8]])),
    );
    let p = assert_skipped(
        tables,
        b"MCFG",
        Error::PastEnd {
            offset: 60,
            len: 16,
            end: 68,
        },
    );
    assert_eq!(p.ecam, None);
}

#[test]
fn mcfg_with_an_inverted_bus_range_is_refused() {
    let mut tables = good_tables();
    tables[2] = table(b"MCFG", &mcfg_body(&mcfg_entry(0xb000_0000, 0, 9, 3)));
    let p = assert_skipped(
        tables,
        b"MCFG",
        Error::Invalid {
            offset: 44,
            why: "ends below its first bus",
        },
    );
    assert_eq!(p.ecam, None);
}

// ---------------------------------------------------------------- DMAR

fn dmar_with(structures: &[u8]) -> Vec<Vec<u8>> {
    let mut tables = good_tables();
    tables[3] = table(b"DMAR", &dmar_body(38, structures));
    tables
}

#[test]
fn dmar_structure_of_length_zero_is_refused() {
    let s = cat(&[
        &drhd(false, 0, 0xfed9_0000, &[]),
        &u16le(0x7f),
        &u16le(0),
        &drhd(true, 0, 0xfed9_1000, &[]),
    ]);
    let p = assert_skipped(
        dmar_with(&s),
        b"DMAR",
        Error::Short {
            offset: 64,
            len: 0,
            min: 4,
        },
    );
    assert_eq!(p.dmar, None);
}

#[test]
fn dmar_unit_shorter_than_its_fixed_part_is_refused() {
    // A DRHD claiming 8 bytes: its base would be read from the next structure.
    let s = cat(&[
        &u16le(0),
        &u16le(8),
        &[1, 0],
        &u16le(0),
        &drhd(false, 0, 0xfed9_0000, &[]),
    ]);
    assert_skipped(
        dmar_with(&s),
        b"DMAR",
        Error::Short {
            offset: 48,
            len: 8,
            min: 16,
        },
    );
}

#[test]
fn dmar_scope_of_length_zero_is_refused() {
    let scopes = cat(&[&scope(1, 0, 0, 1, 0), &[1, 0, 0, 0, 0, 0, 0, 0]]);
    assert_skipped(
        dmar_with(&drhd(false, 0, 0xfed9_0000, &scopes)),
        b"DMAR",
        Error::Short {
            offset: 72,
            len: 0,
            min: 6,
        },
    );
}

#[test]
fn dmar_scope_running_past_its_unit_is_refused() {
    // The scope claims 16 bytes; its unit ends after 8 of them (the table goes on
    // with a second unit, so the table's own bounds would not catch it).
    let mut unit = drhd(false, 0, 0xfed9_0000, &scope(1, 0, 0, 1, 0));
    unit[16 + 1] = 16;
    let s = cat(&[&unit, &drhd(true, 0, 0xfed9_1000, &[])]);
    assert_skipped(
        dmar_with(&s),
        b"DMAR",
        Error::PastEnd {
            offset: 64,
            len: 16,
            end: 72,
        },
    );
}

#[test]
fn dmar_structure_running_past_the_end_is_refused() {
    let mut unit = drhd(false, 0, 0xfed9_0000, &scope(1, 0, 0, 1, 0));
    unit[2..4].copy_from_slice(&u16le(200));
    assert_skipped(
        dmar_with(&unit),
        b"DMAR",
        Error::PastEnd {
            offset: 48,
            len: 200,
            end: 72,
        },
    );
}

#[test]
fn dmar_shorter_than_its_fixed_part_is_refused() {
    let mut tables = good_tables();
    tables[3] = table(b"DMAR", &[38]);
    assert_skipped(
        tables,
        b"DMAR",
        Error::Truncated {
            needed: 48,
            len: 37,
        },
    );
}

// ---------------------------------------------------------------- HPET

#[test]
fn hpet_shorter_than_its_fixed_part_is_refused() {
    let mut tables = good_tables();
    tables[4] = table(b"HPET", &hpet_body(0xfed0_0000)[..16]);
    let p = assert_skipped(
        tables,
        b"HPET",
        Error::Truncated {
            needed: 56,
            len: 52,
        },
    );
    assert_eq!(p.hpet, None);
}

#[test]
fn hpet_outside_memory_space_is_refused() {
    let mut body = hpet_body(0xfed0_0000);
    body[4] = 1; // system I/O space
    let mut tables = good_tables();
    tables[4] = table(b"HPET", &body);
    let p = assert_skipped(
        tables,
        b"HPET",
        Error::Invalid {
            offset: 40,
            why: "is not in system memory space",
        },
    );
    assert_eq!(p.hpet, None);
}

// ---------------------------------------------------------------- found by fuzzing

#[test]
fn unprintable_signatures_are_listed_as_question_marks() {
    // Found by the `walk` fuzz target: tables whose signatures hold spaces or NULs
    // (e.g. "\0\0I ") made the space-separated `tables` list longer than the root
    // table (and would put control bytes from firmware into the boot log).
    let mut tables = good_tables();
    tables[0] = table(b"\0\0I ", &[0; 8]);
    tables.push(table(b"A\nB\x1b", &[]));
    let p = platform_with(&tables).parse(BASE);
    assert_eq!(p.warnings, vec![]);
    let p = p.platform.unwrap();
    assert_eq!(p.tables, "???? APIC MCFG DMAR HPET ????");
    assert_eq!(p.tables.split(' ').count(), tables.len());
}
