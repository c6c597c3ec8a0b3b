//! Keeps the GPU busy: the streaming workload of [`App::stream`] 24 frames deep
//! (48 commands queued), completions polled, so the VM always has work waiting
//! when its GPU slice comes, even while its vCPU is not running. For the scenario
//! that measures GPU shares against weights.
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::virtio_gpu::app::App;
use guest_frontend::{exit, hypercall, println};

guest_frontend::entry!(main);

fn main(info: &BootInfo) -> ! {
    let mut app = match App::start("gpu-saturate", info, true) {
        Ok(a) => a,
        Err(e) => {
            println!("gpu-saturate {}: error: {e}", info.name());
            hypercall::shutdown(exit::FAILED)
        }
    };
    if let Err(e) = app.setup(false) {
        app.fail(&e);
    }
    app.stream(24, true, 1000)
}
