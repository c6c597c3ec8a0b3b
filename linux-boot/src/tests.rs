//! The boot protocol against hand-built images shaped like Debian's 6.1 bzImage
//! (protocol 2.15, xloadflags 0x7f, preferred address 16 MiB, init_size about 64 MiB).

extern crate std;

use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;

const MIB: u64 = 1 << 20;

/// A bzImage with `setup_sects` setup sectors and `kernel` protected-mode bytes.
fn image(version: u16, xloadflags: u16, setup_sects: u8, kernel: usize) -> Vec<u8> {
    let sects = if setup_sects == 0 {
        4
    } else {
        setup_sects as usize
    };
    let mut b = vec![0u8; (sects + 1) * 512 + kernel];
    b[0x1f1] = setup_sects;
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    // jmp short to the end of a 2.15 header (0x26c).
    b[0x200] = 0xeb;
    b[0x201] = (0x26c - 0x202) as u8;
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    b[0x211] = 0x01;
    b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    b[0x230..0x234].copy_from_slice(&(2 * MIB as u32).to_le_bytes());
    b[0x234] = 1;
    b[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
    b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    b[0x258..0x260].copy_from_slice(&(16 * MIB).to_le_bytes());
    b[0x260..0x264].copy_from_slice(&(64 * MIB as u32).to_le_bytes());
    for (i, x) in b[(sects + 1) * 512..].iter_mut().enumerate() {
        *x = i as u8;
    }
    b
}

fn debian() -> Vec<u8> {
    image(0x020f, 0x7f, 27, 8 * MIB as usize)
}

#[test]
fn a_debian_shaped_bzimage_parses() {
    let img = debian();
    let bz = BzImage::parse(&img).unwrap();
    assert_eq!(bz.header.version, 0x020f);
    assert_eq!(bz.header.pref_address, 16 * MIB);
    assert_eq!(bz.header.init_size, 64 * MIB as u32);
    assert!(bz.header.relocatable);
    assert_eq!(bz.header.cmdline_size, 2047);
    // The protected-mode part starts after the boot sector and 27 setup sectors.
    assert_eq!(bz.kernel.len(), 8 * MIB as usize);
    assert_eq!(bz.kernel.as_ptr(), img[28 * 512..].as_ptr());
    // setup_sects 0 means 4.
    let img = image(0x020f, 0x7f, 0, 4096);
    assert_eq!(BzImage::parse(&img).unwrap().kernel.len(), 4096);
}

#[test]
fn what_cannot_boot_is_refused_by_name() {
    let elf = b"\x7fELF\x02\x01\x01\0".repeat(100);
    assert_eq!(BzImage::parse(&elf).unwrap_err(), BootError::NotBzImage);
    assert_eq!(BzImage::parse(&[0; 16]).unwrap_err(), BootError::Truncated);
    let img = debian();
    assert_eq!(
        BzImage::parse(&img[..0x230]).unwrap_err(),
        BootError::Truncated
    );
    assert_eq!(
        BzImage::parse(&img[..28 * 512]).unwrap_err(),
        BootError::Truncated
    );
    let old = image(0x020b, 0x7f, 27, 4096);
    assert_eq!(
        BzImage::parse(&old).unwrap_err(),
        BootError::ProtocolTooOld(0x020b)
    );
    let no64 = image(0x020f, 0x02, 27, 4096);
    assert_eq!(BzImage::parse(&no64).unwrap_err(), BootError::No64BitEntry);
    assert_eq!(
        std::format!("{}", BootError::ProtocolTooOld(0x020b)),
        "boot protocol 2.11 is too old (64-bit entry needs 2.12)"
    );
}

#[test]
fn kernel_initrd_and_cmdline_are_placed_in_ram() {
    let img = debian();
    let bz = BzImage::parse(&img).unwrap();
    let p = plan(
        &bz.header,
        bz.kernel.len() as u64,
        256 * MIB,
        20 * MIB + 5,
        100,
    )
    .unwrap();
    assert_eq!((p.kernel, p.entry), (16 * MIB, 16 * MIB + 0x200));
    assert_eq!(
        p.kernel_end,
        80 * MIB,
        "init_size, not the image, bounds the kernel"
    );
    let (at, len) = p.initrd.unwrap();
    assert_eq!(len, 20 * MIB + 5);
    assert!(at >= p.kernel_end && at + len <= 256 * MIB && at % 4096 == 0);
    assert_eq!(p.cmdline, (CMDLINE, 100));
    assert_eq!(
        p.e820[2],
        E820Entry {
            addr: MIB,
            size: 255 * MIB,
            kind: E820_RAM
        }
    );
    assert!(plan(&bz.header, 0, 256 * MIB, 0, 0)
        .unwrap()
        .initrd
        .is_none());
}

#[test]
fn what_does_not_fit_is_refused_by_name() {
    let img = debian();
    let h = BzImage::parse(&img).unwrap().header;
    assert_eq!(
        plan(&h, 8 * MIB, 64 * MIB, 0, 0),
        Err(BootError::KernelTooLarge {
            load: 16 * MIB,
            needs: 64 * MIB,
            ram: 64 * MIB
        })
    );
    assert_eq!(
        plan(&h, 8 * MIB, 128 * MIB, 49 * MIB, 0),
        Err(BootError::InitrdTooLarge {
            len: 49 * MIB,
            room: 48 * MIB
        })
    );
    assert_eq!(
        plan(&h, 8 * MIB, 128 * MIB, 0, 2048),
        Err(BootError::CmdlineTooLong {
            len: 2048,
            max: 2047
        })
    );
    assert!(plan(&h, 8 * MIB, 128 * MIB, 48 * MIB, 2047).is_ok());
}

#[test]
fn the_zero_page_carries_the_header_the_loader_fields_and_the_e820_map() {
    let img = debian();
    let bz = BzImage::parse(&img).unwrap();
    let p = plan(&bz.header, bz.kernel.len() as u64, 256 * MIB, 4096, 10).unwrap();
    let z = zero_page(&bz, &p);
    // The image's setup header, as it was, except what the loader fills in.
    assert_eq!(&z[0x202..0x206], b"HdrS");
    assert_eq!(&z[0x258..0x260], &(16 * MIB).to_le_bytes());
    assert_eq!(z[0x210], 0xff, "type_of_loader");
    assert_eq!(z[0x211] & 0x81, 0x81, "LOADED_HIGH and CAN_USE_HEAP");
    assert_eq!(u32_at(&z, 0x228), CMDLINE as u32);
    let (initrd, _) = p.initrd.unwrap();
    assert_eq!(u32_at(&z, 0x218), initrd as u32);
    assert_eq!(u32_at(&z, 0x21c), 4096);
    assert_eq!(z[0x1e8], 3);
    assert_eq!(u64_at(&z, 0x2d0 + 40), MIB, "third entry: RAM from 1 MiB");
    assert_eq!(u64_at(&z, 0x2d0 + 48), 255 * MIB);
    assert_eq!(u32_at(&z, 0x2d0 + 56), E820_RAM);
    // Nothing past the header's end was copied from the image.
    assert!(z[0x26c..0x2d0].iter().all(|&b| b == 0));
}

proptest! {
    /// Whatever the sizes, an accepted plan keeps everything inside RAM, above the
    /// first MiB for the kernel and the initrd, and nothing overlaps.
    #[test]
    fn an_accepted_plan_never_overlaps(
        ram_mib in 2u64..1024,
        kernel_len in 0u64..(96 * MIB),
        init_size in 0u32..(128 * MIB as u32),
        initrd_len in 0u64..(512 * MIB),
        cmdline in 0usize..3000,
        pref_mib in 0u64..64,
        relocatable: bool,
    ) {
        let h = SetupHeader {
            version: 0x020f,
            setup_sects: 27,
            pref_address: pref_mib * MIB,
            init_size,
            kernel_alignment: 2 * MIB as u32,
            relocatable,
            initrd_addr_max: 0x7fff_ffff,
            cmdline_size: 2047,
            xloadflags: 0x7f,
        };
        let ram = ram_mib * MIB;
        if let Ok(p) = plan(&h, kernel_len, ram, initrd_len, cmdline) {
            prop_assert!(p.kernel >= HIGH_RAM_START && p.kernel_end <= ram);
            prop_assert!(p.kernel_end - p.kernel >= kernel_len.max(u64::from(init_size)));
            // With its NUL.
            prop_assert!(p.cmdline.0 + (p.cmdline.1 as u64) < LOW_RAM_END);
            prop_assert!(p.zero_page + 4096 <= p.cmdline.0);
            if let Some((at, len)) = p.initrd {
                prop_assert!(at >= p.kernel_end && at + len <= ram);
            }
            let total: u64 = p.e820.iter().map(|e| e.size).sum();
            prop_assert_eq!(total, ram);
        }
    }
}

#[test]
fn the_tsc_frequency_is_appended_unless_the_command_line_sets_it() {
    let mut buf = [0u8; MAX_CMDLINE];
    assert_eq!(
        with_tsc_khz(b"console=ttyS0", 2_994_373, &mut buf).unwrap(),
        b"console=ttyS0 tsc_early_khz=2994373"
    );
    assert_eq!(with_tsc_khz(b"", 0, &mut buf).unwrap(), b"tsc_early_khz=0");
    let own = b"quiet tsc_early_khz=1000 ro";
    assert_eq!(with_tsc_khz(own, 2_000_000, &mut buf).unwrap(), own);
    // A word that merely contains the name does not count.
    assert_eq!(
        with_tsc_khz(b"xtsc_early_khz=5", 7, &mut buf).unwrap(),
        b"xtsc_early_khz=5 tsc_early_khz=7"
    );
    let long = vec![b'a'; MAX_CMDLINE - 5];
    assert!(matches!(
        with_tsc_khz(&long, 1_000_000, &mut buf),
        Err(BootError::CmdlineTooLong {
            max: MAX_CMDLINE,
            ..
        })
    ));
}
