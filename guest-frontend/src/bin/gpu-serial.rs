//! The GPU-PV benchmark's drawing workload one frame at a time ([`App::stream`]
//! with depth 1): full-frame TRANSFER_TO_HOST_2D + fenced RESOURCE_FLUSH, each frame
//! waited for by interrupt (halting meanwhile), as the hypervisor's native serial
//! loop does.
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::virtio_gpu::app::App;
use guest_frontend::{exit, hypercall, println};

guest_frontend::entry!(main);

fn main(info: &BootInfo) -> ! {
    let mut app = match App::start("gpu-serial", info, true) {
        Ok(a) => a,
        Err(e) => {
            println!("gpu-serial {}: error: {e}", info.name());
            hypercall::shutdown(exit::FAILED)
        }
    };
    if let Err(e) = app.setup(false) {
        app.fail(&e);
    }
    app.stream(1, false, 100)
}
