//! Keeps the GPU busy: the streaming workload of [`App::stream`] 30 frames deep
//! (60 of the 64 control slots), completions polled, so the VM always has work waiting
//! when its GPU slice comes, even while its vCPU is not running; with the queue full
//! and nothing back it yields its vCPU rather than spin. For the scenario
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
    app.yield_when_waiting = true;
    app.stream(30, true, 1000)
}
