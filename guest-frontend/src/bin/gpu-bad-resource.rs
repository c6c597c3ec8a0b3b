//! A malicious GPU guest: uses resource id 1 without creating it (in a neighbour VM
//! that id is the framebuffer on its screen), expecting ERR_INVALID_RESOURCE_ID for
//! every command, then an absurd id, then creates its own resource 1 (ids are per
//! VM) and keeps drawing to show it survived. One line per step:
//! `gpu-bad-resource <name>: ...`.
#![no_std]
#![no_main]

use gpu_pv::command::Command;
use gpu_pv::wire;
use guest_frontend::boot_info::BootInfo;
use guest_frontend::virtio_gpu::app::{App, FB_RESOURCE};
use guest_frontend::virtio_gpu::display::Framebuffer;
use guest_frontend::virtio_gpu::{backing_entries, fenced, full_rect, plain};
use guest_frontend::{exit, hypercall, println};

guest_frontend::entry!(main);

fn main(info: &BootInfo) -> ! {
    let mut app = match App::start("gpu-bad-resource", info, false) {
        Ok(a) => a,
        Err(e) => {
            println!("gpu-bad-resource {}: error: {e}", info.name());
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
    let rect = full_rect(app.width, app.height);
    let want = wire::RESP_ERR_INVALID_RESOURCE_ID;
    let mut refused = 0;
    let fence = app.gpu.next_fence();
    let steps: [(&str, gpu_pv::command::Request); 7] = [
        (
            "step 1: TRANSFER_TO_HOST_2D to resource 1 (never created)",
            plain(Command::TransferToHost2d {
                rect,
                offset: 0,
                resource_id: 1,
            }),
        ),
        (
            "step 2: fenced RESOURCE_FLUSH of resource 1",
            fenced(
                Command::ResourceFlush {
                    rect,
                    resource_id: 1,
                },
                fence,
            ),
        ),
        (
            "step 3: SET_SCANOUT 0 to resource 1",
            plain(Command::SetScanout {
                rect,
                scanout_id: 0,
                resource_id: 1,
            }),
        ),
        (
            "step 4: ATTACH_BACKING of its own pages to resource 1",
            plain(Command::ResourceAttachBacking {
                resource_id: 1,
                entries: backing_entries(fb.addr, fb.len(), 1 << 20),
            }),
        ),
        (
            "step 5: RESOURCE_DETACH_BACKING of resource 1",
            plain(Command::ResourceDetachBacking { resource_id: 1 }),
        ),
        (
            "step 6: RESOURCE_UNREF of resource 1",
            plain(Command::ResourceUnref { resource_id: 1 }),
        ),
        (
            "step 7: RESOURCE_FLUSH of resource 0x7fffffff",
            plain(Command::ResourceFlush {
                rect,
                resource_id: 0x7fff_ffff,
            }),
        ),
    ];
    for (step, req) in steps.iter() {
        if app.expect_response(step, req, want).is_some() {
            refused += 1;
        }
    }
    println!("{tag}: {refused} of 7 commands on foreign resources refused");
    app.fb = None;
    if let Err(e) = app.setup(false) {
        app.fail(&e);
    }
    if let Err(e) = app.frame() {
        app.fail(&e);
    }
    println!("{tag}: step 8: created its own resource 1, survived, drawing correctly");
    app.run_forever()
}
