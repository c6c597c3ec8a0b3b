//! A bootable GPT disk image: protective MBR, primary and backup GPT, one EFI System
//! Partition holding a FAT32 filesystem (made with mtools) with the ESP's files.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use crate::{esp, run_quiet, Context, Result};

/// Sector size.
pub const SECTOR: u64 = 512;
/// First LBA of the ESP (1 MiB alignment).
pub const PART_START: u64 = 2048;
/// Entries in each partition array (the minimum the spec allows: 16 KiB).
const ENTRIES: u32 = 128;
const ENTRY_SIZE: u32 = 128;
/// Sectors of one partition entry array.
const ARRAY_SECTORS: u64 = (ENTRIES as u64 * ENTRY_SIZE as u64) / SECTOR;

/// The EFI System Partition type GUID, C12A7328-F81F-11D2-BA4B-00A0C93EC93B.
pub const ESP_TYPE: Guid = Guid::parse_const("C12A7328-F81F-11D2-BA4B-00A0C93EC93B");

/// A GUID in its text field order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guid(pub u32, pub u16, pub u16, pub [u8; 8]);

impl Guid {
    const fn parse_const(s: &str) -> Guid {
        let b = s.as_bytes();
        const fn hex(c: u8) -> u64 {
            match c {
                b'0'..=b'9' => (c - b'0') as u64,
                b'a'..=b'f' => (c - b'a' + 10) as u64,
                b'A'..=b'F' => (c - b'A' + 10) as u64,
                _ => panic!("bad hex digit"),
            }
        }
        const fn field(b: &[u8], start: usize, len: usize) -> u64 {
            let mut v = 0;
            let mut i = 0;
            while i < len {
                v = v << 4 | hex(b[start + i]);
                i += 1;
            }
            v
        }
        let tail_hi = field(b, 19, 4);
        let tail_lo = field(b, 24, 12);
        let mut tail = [0u8; 8];
        tail[0] = (tail_hi >> 8) as u8;
        tail[1] = tail_hi as u8;
        let mut i = 0;
        while i < 6 {
            tail[2 + i] = (tail_lo >> (40 - 8 * i)) as u8;
            i += 1;
        }
        Guid(
            field(b, 0, 8) as u32,
            field(b, 9, 4) as u16,
            field(b, 14, 4) as u16,
            tail,
        )
    }

    /// The on-disk (mixed-endian) encoding.
    pub fn bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&self.0.to_le_bytes());
        out[4..6].copy_from_slice(&self.1.to_le_bytes());
        out[6..8].copy_from_slice(&self.2.to_le_bytes());
        out[8..16].copy_from_slice(&self.3);
        out
    }

    /// A random (version 4) GUID.
    pub fn random() -> Guid {
        let mut r = [0u8; 16];
        let ok = fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut r))
            .is_ok();
        if !ok {
            // Fall back to time and pid: unique enough for an image's identity.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            r.copy_from_slice(&(t ^ (u128::from(std::process::id()) << 64)).to_le_bytes());
        }
        r[6] = (r[6] & 0x0f) | 0x40;
        r[8] = (r[8] & 0x3f) | 0x80;
        let d1 = u32::from_be_bytes([r[0], r[1], r[2], r[3]]);
        let d2 = u16::from_be_bytes([r[4], r[5]]);
        let d3 = u16::from_be_bytes([r[6], r[7]]);
        let mut d4 = [0u8; 8];
        d4.copy_from_slice(&r[8..16]);
        Guid(d1, d2, d3, d4)
    }
}

/// CRC-32 (IEEE 802.3, reflected, as GPT uses).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The metadata sectors of a GPT disk with one ESP.
#[derive(Debug)]
pub struct Layout {
    /// LBA 0.
    pub mbr: Vec<u8>,
    /// LBA 1.
    pub primary_header: Vec<u8>,
    /// LBA 2..34 and, as the backup, LBA total-33..total-1.
    pub entries: Vec<u8>,
    /// LBA total-1.
    pub backup_header: Vec<u8>,
}

/// Lays out a disk of `total_sectors` with one ESP of `part_sectors` at [`PART_START`].
pub fn layout(total_sectors: u64, part_sectors: u64, disk: Guid, part: Guid) -> Result<Layout> {
    let last_lba = total_sectors - 1;
    let first_usable = 2 + ARRAY_SECTORS;
    let last_usable = last_lba - ARRAY_SECTORS - 1;
    let part_last = PART_START + part_sectors - 1;
    if part_last > last_usable || PART_START < first_usable {
        return Err(format!(
            "partition {PART_START}..={part_last} does not fit the usable range {first_usable}..={last_usable}"
        ));
    }

    let mut mbr = vec![0u8; SECTOR as usize];
    let pe = &mut mbr[446..462];
    pe[0] = 0x00; // not bootable
    pe[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
    pe[4] = 0xee; // GPT protective
    pe[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    pe[8..12].copy_from_slice(&1u32.to_le_bytes());
    let size = u32::try_from(total_sectors - 1).unwrap_or(u32::MAX);
    pe[12..16].copy_from_slice(&size.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;

    let mut entries = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
    let e = &mut entries[0..ENTRY_SIZE as usize];
    e[0..16].copy_from_slice(&ESP_TYPE.bytes());
    e[16..32].copy_from_slice(&part.bytes());
    e[32..40].copy_from_slice(&PART_START.to_le_bytes());
    e[40..48].copy_from_slice(&part_last.to_le_bytes());
    // Attributes (48..56) stay 0; the name is UTF-16LE.
    for (i, u) in "EFI System Partition".encode_utf16().enumerate() {
        e[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    let entries_crc = crc32(&entries);

    let header = |my_lba: u64, alt_lba: u64, entries_lba: u64| {
        let mut h = vec![0u8; SECTOR as usize];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        // 16..20: header CRC, computed last over the 92 bytes with this field zero.
        h[24..32].copy_from_slice(&my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
        h[40..48].copy_from_slice(&first_usable.to_le_bytes());
        h[48..56].copy_from_slice(&last_usable.to_le_bytes());
        h[56..72].copy_from_slice(&disk.bytes());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&ENTRIES.to_le_bytes());
        h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32(&h[0..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    Ok(Layout {
        mbr,
        primary_header: header(1, last_lba, 2),
        entries,
        backup_header: header(last_lba, 1, last_lba - ARRAY_SECTORS),
    })
}

/// Size of the FAT32 partition for `content` bytes of files: at least 64 MiB (FAT32
/// with 512-byte clusters needs 65525 clusters; firmware is happiest with FAT32).
pub fn partition_sectors(content: u64) -> u64 {
    let mib = (content + content / 4).div_ceil(1 << 20) + 16;
    mib.max(64) * (1 << 20) / SECTOR
}

/// Writes the disk image `out` with the files of `esp_dir`.
pub fn write_image(esp_dir: &Path, out: &Path) -> Result<()> {
    let content: u64 = esp::files(esp_dir)?
        .iter()
        .map(|(_, n)| n.div_ceil(4096) * 4096)
        .sum();
    let part_sectors = partition_sectors(content);
    // 1 MiB before the partition, 1 MiB after it (backup GPT at the very end).
    let total = PART_START + part_sectors + 2048;
    let l = layout(total, part_sectors, Guid::random(), Guid::random())?;

    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).ctx(|| format!("cannot create {}", dir.display()))?;
    }
    let _ = fs::remove_file(out);
    let mut f = fs::File::create(out).ctx(|| format!("cannot create {}", out.display()))?;
    f.set_len(total * SECTOR)
        .ctx(|| format!("cannot size {}", out.display()))?;
    let last = total - 1;
    for (lba, bytes) in [
        (0, &l.mbr),
        (1, &l.primary_header),
        (2, &l.entries),
        (last - ARRAY_SECTORS, &l.entries),
        (last, &l.backup_header),
    ] {
        f.seek(SeekFrom::Start(lba * SECTOR))
            .and_then(|_| f.write_all(bytes))
            .ctx(|| format!("cannot write {}", out.display()))?;
    }
    f.sync_all()
        .ctx(|| format!("cannot write {}", out.display()))?;
    drop(f);

    // FAT32 in the partition, through mtools' image@@offset syntax.
    let target = format!("{}@@{}", out.display(), PART_START * SECTOR);
    run_quiet(Command::new("mformat").env("MTOOLS_SKIP_CHECK", "1").args([
        "-i",
        &target,
        "-F",
        "-T",
        &part_sectors.to_string(),
        "-h",
        "64",
        "-s",
        "32",
        "-H",
        &PART_START.to_string(),
        "-v",
        "HV-ESP",
        "::",
    ]))?;
    let mut top: Vec<_> = fs::read_dir(esp_dir)
        .ctx(|| format!("cannot read {}", esp_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    top.sort();
    run_quiet(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-s", "-Q", "-i", &target])
            .args(&top)
            .arg("::/"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn crc_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn esp_guid_encoding() {
        assert_eq!(
            ESP_TYPE.bytes(),
            [
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
        let g = Guid::random();
        assert_eq!(g.2 >> 12, 4);
        assert_ne!(g, Guid::random());
    }

    #[test]
    fn headers_are_consistent() {
        let part = partition_sectors(3 << 20);
        let total = PART_START + part + 2048;
        let l = layout(total, part, Guid::random(), Guid::random()).unwrap();
        assert_eq!(&l.mbr[510..], &[0x55, 0xaa]);
        assert_eq!(l.mbr[450], 0xee);
        assert_eq!(u32_at(&l.mbr, 454), 1);
        for (h, my, alt, arr) in [
            (&l.primary_header, 1, total - 1, 2),
            (&l.backup_header, total - 1, 1, total - 33),
        ] {
            assert_eq!(&h[0..8], b"EFI PART");
            let mut z = h[0..92].to_vec();
            z[16..20].fill(0);
            assert_eq!(u32_at(h, 16), crc32(&z));
            assert_eq!(u64_at(h, 24), my);
            assert_eq!(u64_at(h, 32), alt);
            assert_eq!(u64_at(h, 40), 34);
            assert_eq!(u64_at(h, 48), total - 34);
            assert_eq!(u64_at(h, 72), arr);
            assert_eq!(u32_at(h, 88), crc32(&l.entries));
        }
        assert_eq!(&l.entries[0..16], &ESP_TYPE.bytes());
        assert_eq!(u64_at(&l.entries, 32), PART_START);
        assert_eq!(u64_at(&l.entries, 40), PART_START + part - 1);
        assert!(l.entries[128..].iter().all(|&b| b == 0));
        assert!(layout(PART_START + 10, 100, Guid::random(), Guid::random()).is_err());
    }

    #[test]
    fn partition_is_fat32_sized() {
        // 64 MiB of 512-byte clusters is comfortably above FAT32's 65525-cluster minimum.
        assert!(partition_sectors(0) >= 131072);
        assert!(partition_sectors(200 << 20) * SECTOR > 250 << 20);
    }
}
