//! A malicious GPU guest: after a few correctly fenced frames it sends fenced
//! commands whose fence ids go backwards, replays the last fence id, and uses fence
//! id 0, expecting an error response (and no fence echoed) for each; then goes on
//! with increasing fence ids and keeps drawing to show it survived. One line per
//! step: `gpu-forged-fence <name>: ...`.
#![no_std]
#![no_main]

extern crate alloc;

use gpu_pv::wire;
use guest_frontend::boot_info::BootInfo;
use guest_frontend::virtio_gpu::app::App;
use guest_frontend::virtio_gpu::fenced;
use guest_frontend::{exit, hypercall, println};

guest_frontend::entry!(main);

fn main(info: &BootInfo) -> ! {
    let mut app = match App::start("gpu-forged-fence", info, false) {
        Ok(a) => a,
        Err(e) => {
            println!("gpu-forged-fence {}: error: {e}", info.name());
            hypercall::shutdown(exit::FAILED)
        }
    };
    let tag = app.tag.clone();
    if let Err(e) = app.setup(false) {
        app.fail(&e);
    }
    for _ in 0..3 {
        if let Err(e) = app.frame() {
            app.fail(&e);
        }
    }
    let Some(fb) = app.fb else {
        app.fail(&guest_frontend::virtio_gpu::Error::NoScanout)
    };
    // Fences go up: a properly fenced flush first.
    let top = app.gpu.next_fence() + 10;
    app.expect_response(
        &alloc::format!("step 1: RESOURCE_FLUSH with fence {top}"),
        &fenced(fb.flush_cmd(), top),
        wire::RESP_OK_NODATA,
    );
    let want = wire::RESP_ERR_INVALID_PARAMETER;
    let mut refused = 0;
    for (step, id) in [
        ("step 2: fence going backwards", top - 5),
        ("step 3: fence going backwards again", top - 7),
        ("step 4: the last fence replayed", top),
        ("step 5: fence 0", 0),
    ] {
        let s = alloc::format!("{step}: RESOURCE_FLUSH with fence {id} (last was {top})");
        if let Some(hdr) = app.expect_response(&s, &fenced(fb.flush_cmd(), id), want) {
            if hdr.flags & wire::FLAG_FENCE == 0 {
                refused += 1;
            } else {
                println!(
                    "{tag}: ... but the refused fence {} was echoed",
                    hdr.fence_id
                );
            }
        }
    }
    println!("{tag}: {refused} of 4 forged fences refused");
    // Back to increasing ids, above the forged ones.
    while app.gpu.next_fence() <= top {}
    let t = app.gpu.next_fence();
    app.expect_response(
        &alloc::format!("step 6: TRANSFER_TO_HOST_2D with fence {t}"),
        &fenced(fb.transfer_cmd(), t),
        wire::RESP_OK_NODATA,
    );
    if let Err(e) = app.frame() {
        app.fail(&e);
    }
    println!("{tag}: step 7: survived, drawing correctly");
    app.run_forever()
}
