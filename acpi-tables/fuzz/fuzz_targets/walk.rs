//! RSDP -> XSDT/RSDT -> tables over a fuzz-provided memory image: byte 0 holds flags,
//! the rest is physical memory at `BASE` with the RSDP at its start. With flag bit 0
//! the harness first makes the image plausible: the signatures are written (the
//! RSDP's, the root's as its revision asks, and each listed table's chosen by its
//! first byte among MADT, MCFG, DMAR, HPET and FACP), the RSDP's root pointer and the
//! root table's pointers are folded into the image, lengths past its end are cut to
//! it, and every checksum is made right (tables first, then the root, then the RSDP),
//! so the walk reaches the table parsers; without it the image is taken as it is.
//! Nothing may panic, nothing outside the image may be read (the image is a plain
//! slice), and what is found must agree with the root table.
#![no_main]

use acpi_tables::{parse, root_entries, rsdp, MemoryImage, Table, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

/// Physical address of the image's first byte.
const BASE: u64 = 0x1000;

/// What a listed table becomes in a plausible image.
const SIGNATURES: [&[u8; 4]; 5] = [b"APIC", b"MCFG", b"DMAR", b"HPET", b"FACP"];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    let mut img = image.to_vec();
    if flags & 1 != 0 {
        make_plausible(&mut img);
    }
    let mem = MemoryImage {
        base: BASE,
        bytes: &img,
    };
    let found = parse(&mem, BASE);
    for w in &found.warnings {
        let _ = w.to_string();
    }
    // The walk is a function of the image alone.
    assert_eq!(parse(&mem, BASE), found);
    let Some(p) = found.platform else {
        assert_eq!(found.warnings.len(), 1, "no platform: one reason why");
        return;
    };
    let r = rsdp(&mem, BASE).expect("a platform comes from a valid RSDP");
    let root = Table::read(&mem, r.root).expect("and a valid root table");
    let entries = root_entries(&root, r.xsdt).expect("that lists its tables");
    let listed = if p.tables.is_empty() {
        0
    } else {
        p.tables.split(' ').count()
    };
    let nonnull = entries.iter().filter(|&&pa| pa != 0).count();
    assert_eq!(listed + found.warnings.len(), nonnull);
    if let Some(e) = p.ecam {
        assert!(e.bus_start <= e.bus_end);
    }
});

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

/// Makes `img[start..start + len]` (cut at the image's end) add up to 0 by setting
/// its byte at `start + at`.
fn fix_checksum(img: &mut [u8], start: usize, len: usize, at: usize) {
    let end = start.saturating_add(len).min(img.len());
    if start + at >= end {
        return;
    }
    img[start + at] = 0;
    img[start + at] = 0u8.wrapping_sub(sum(&img[start..end]));
}

/// Folds the `width`-byte pointer at `img[at..]` into the image and writes it back;
/// returns the offset it now points at.
fn fold_pointer(img: &mut [u8], at: usize, width: usize) -> Option<usize> {
    let n = img.len();
    let field = img.get_mut(at..at.checked_add(width)?)?;
    let mut v = [0u8; 8];
    v[..width].copy_from_slice(field);
    let off = (u64::from_le_bytes(v) % n as u64) as usize;
    field.copy_from_slice(&(BASE + off as u64).to_le_bytes()[..width]);
    Some(off)
}

/// Cuts the table length at `img[off + 4..]` to the image's end; returns it.
fn cut_length(img: &mut [u8], off: usize) -> Option<usize> {
    let field = img.get(off + 4..off + 8)?;
    let len = u32::from_le_bytes(field.try_into().ok()?) as usize;
    let avail = img.len() - off;
    if len > avail {
        img[off + 4..off + 8].copy_from_slice(&(avail as u32).to_le_bytes());
        return Some(avail);
    }
    Some(len)
}

fn make_plausible(img: &mut [u8]) {
    if img.len() < 20 {
        return;
    }
    let xsdt = img[15] >= 2 && img.len() >= 36;
    img[..8].copy_from_slice(b"RSD PTR ");
    let (root_at, width) = if xsdt { (24, 8) } else { (16, 4) };
    if let Some(root) = fold_pointer(img, root_at, width) {
        if root + 4 <= img.len() {
            img[root..root + 4].copy_from_slice(if xsdt { b"XSDT" } else { b"RSDT" });
        }
        if let Some(len) = cut_length(img, root) {
            let mut tables = Vec::new();
            let mut e = root + HEADER_LEN;
            while e + width <= root + len {
                if let Some(t) = fold_pointer(img, e, width) {
                    tables.push(t);
                }
                e += width;
            }
            for t in tables {
                if t + 4 <= img.len() {
                    let sig = SIGNATURES[usize::from(img[t]) % SIGNATURES.len()];
                    img[t..t + 4].copy_from_slice(sig);
                }
                if let Some(len) = cut_length(img, t) {
                    fix_checksum(img, t, len, 9);
                }
            }
            fix_checksum(img, root, len, 9);
        }
    }
    fix_checksum(img, 0, 20, 8);
    if xsdt {
        fix_checksum(img, 0, 36, 32);
    }
}
