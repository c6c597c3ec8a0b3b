//! A malicious GPU guest: attaches backing pages that are not its own RAM to a
//! resource it created (past the end of its RAM, straddling the end, in the
//! hypervisor-reserved range above 4 GiB, and an address that wraps), expects an
//! error response for each, then attaches its real framebuffer and keeps drawing
//! correctly to show it (and the device) survived. One line per step:
//! `gpu-bad-backing <name>: ...`.
#![no_std]
#![no_main]

extern crate alloc;

use gpu_pv::command::Command;
use gpu_pv::wire::{self, MemEntry};
use guest_frontend::boot_info::BootInfo;
use guest_frontend::virtio_gpu::app::{App, FB_RESOURCE};
use guest_frontend::virtio_gpu::display::Framebuffer;
use guest_frontend::virtio_gpu::plain;
use guest_frontend::{exit, hypercall, println};

guest_frontend::entry!(main);

fn main(info: &BootInfo) -> ! {
    let mut app = match App::start("gpu-bad-backing", info, false) {
        Ok(a) => a,
        Err(e) => {
            println!("gpu-bad-backing {}: error: {e}", info.name());
            hypercall::shutdown(exit::FAILED)
        }
    };
    let tag = app.tag.clone();
    let fb = match Framebuffer::alloc(
        FB_RESOURCE,
        wire::format::B8G8R8X8_UNORM,
        app.width,
        app.height,
    ) {
        Ok(fb) => fb,
        Err(e) => app.fail(&e),
    };
    app.expect_response(
        "step 1: RESOURCE_CREATE_2D of its framebuffer",
        &plain(fb.create_cmd()),
        wire::RESP_OK_NODATA,
    );
    let ram = info.memory_bytes;
    let len = fb.len() as u32;
    let attempts: [(&str, u64, u32); 4] = [
        ("past the end of its RAM", ram, len),
        ("straddling the end of its RAM", ram - 4096, 8192),
        ("above 4 GiB", 0x1_0000_0000, len),
        ("wrapping the address space", u64::MAX - 4095, len),
    ];
    let mut refused = 0;
    for (i, (what, addr, length)) in attempts.iter().enumerate() {
        let step = alloc::format!(
            "step {}: ATTACH_BACKING at {addr:#x} + {length:#x} ({what}, RAM is {:#x} bytes)",
            i + 2,
            ram
        );
        let cmd = Command::ResourceAttachBacking {
            resource_id: FB_RESOURCE,
            entries: alloc::vec![MemEntry {
                addr: *addr,
                length: *length,
                padding: 0
            }],
        };
        if app
            .expect_response(&step, &plain(cmd), wire::RESP_ERR_UNSPEC)
            .is_some()
        {
            refused += 1;
        }
    }
    // A bad entry hidden behind a good one.
    let cmd = Command::ResourceAttachBacking {
        resource_id: FB_RESOURCE,
        entries: alloc::vec![
            MemEntry {
                addr: fb.addr.get(),
                length: 4096,
                padding: 0
            },
            MemEntry {
                addr: ram + 0x10_0000,
                length: len - 4096,
                padding: 0
            },
        ],
    };
    if app
        .expect_response(
            "step 6: ATTACH_BACKING with a good entry then one past its RAM",
            &plain(cmd),
            wire::RESP_ERR_UNSPEC,
        )
        .is_some()
    {
        refused += 1;
    }
    println!("{tag}: {refused} of 5 bad backings refused");
    app.expect_response(
        "step 7: ATTACH_BACKING of its real framebuffer",
        &plain(fb.attach_cmd()),
        wire::RESP_OK_NODATA,
    );
    app.expect_response(
        "step 8: SET_SCANOUT 0",
        &plain(Command::SetScanout {
            rect: fb.rect(),
            scanout_id: 0,
            resource_id: FB_RESOURCE,
        }),
        wire::RESP_OK_NODATA,
    );
    app.fb = Some(fb);
    if let Err(e) = app.frame() {
        app.fail(&e);
    }
    println!("{tag}: step 9: survived, drawing correctly");
    app.run_forever()
}
