//! One table through its parser. The input as it is goes through `Table::new` (length
//! and checksum checks) and, if it passes, the parser its signature names. Then byte 0
//! picks a signature (MADT, MCFG, DMAR, HPET) and the rest becomes that table's
//! header fields after the length, and its body, with the length and checksum made
//! right, so the fuzzer spends its time inside the parsers. Nothing may panic, and
//! whatever parses must respect the table's bounds.
#![no_main]

use acpi_tables::{contents, Contents, Error, Table, HEADER_LEN, MAX_TABLE_LEN};
use libfuzzer_sys::fuzz_target;

const SIGNATURES: [&[u8; 4]; 4] = [b"APIC", b"MCFG", b"DMAR", b"HPET"];

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = Table::new(data) {
        check(&t);
    }
    let Some((&select, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = Vec::with_capacity(HEADER_LEN + rest.len());
    bytes.extend_from_slice(SIGNATURES[usize::from(select) % SIGNATURES.len()]);
    bytes.extend_from_slice(&[0; 4]);
    bytes.extend_from_slice(rest);
    if bytes.len() < HEADER_LEN {
        bytes.resize(HEADER_LEN, 0);
    }
    bytes.truncate(MAX_TABLE_LEN);
    let len = bytes.len() as u32;
    bytes[4..8].copy_from_slice(&len.to_le_bytes());
    bytes[9] = 0;
    bytes[9] = 0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)));
    let t = Table::new(&bytes).expect("a table with its length and checksum made right");
    assert_eq!(t.len(), bytes.len());
    check(&t);
    // Bytes after the table's length are not part of it.
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0xff; 64]);
    let t2 = Table::new(&longer).expect("the same table, followed by other bytes");
    assert_eq!(contents(&t2), contents(&t));
});

fn check(t: &Table) {
    let len = t.len();
    match contents(t) {
        Ok(Contents::Madt(m)) => {
            // Every CPU and I/O APIC comes from an entry of at least 8 / 12 bytes.
            let room = len - 44;
            assert!(m.cpus.len() * 8 + m.ioapics.len() * 12 <= room);
        }
        Ok(Contents::Mcfg(allocations)) => {
            assert_eq!(allocations.len() * 16, len - 44);
            assert!(allocations.iter().all(|(_, e)| e.bus_start <= e.bus_end));
        }
        Ok(Contents::Dmar(d)) => {
            let scopes: usize = d.units.iter().map(|u| u.scopes.len()).sum::<usize>()
                + d.rmrrs.iter().map(|r| r.scopes.len()).sum::<usize>();
            assert!(d.units.len() * 16 + d.rmrrs.len() * 24 + scopes * 6 <= len - 48);
        }
        Ok(Contents::Hpet(_)) => assert!(len >= 56),
        Ok(Contents::Other) => assert!(!SIGNATURES.contains(&&t.signature())),
        Err(e) => {
            // Every refusal names a place inside the table.
            match e {
                Error::Short { offset, .. } | Error::PastEnd { offset, .. } => {
                    assert!(offset < len)
                }
                Error::Invalid { offset, .. } => assert!(offset < len),
                Error::Truncated { needed, len: l } => assert!(l == len && l < needed),
                _ => panic!("a checked table refused for {e:?}"),
            }
            let _ = format!("{e}");
        }
    }
}
