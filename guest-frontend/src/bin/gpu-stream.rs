//! A steady stream of frames, the GPU-PV benchmark's drawing workload
//! ([`App::stream`]): full-frame TRANSFER_TO_HOST_2D + fenced RESOURCE_FLUSH pairs
//! kept four frames deep, completions polled from the used ring (no interrupts, no
//! halts), kicks only when the device's event index asks. While the hypervisor polls
//! the ring, the stream costs (almost) no VM exits.
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::virtio_gpu::app::App;
use guest_frontend::{exit, hypercall, println};

guest_frontend::entry!(main);

fn main(info: &BootInfo) -> ! {
    let mut app = match App::start("gpu-stream", info, true) {
        Ok(a) => a,
        Err(e) => {
            println!("gpu-stream {}: error: {e}", info.name());
            hypercall::shutdown(exit::FAILED)
        }
    };
    if let Err(e) = app.setup(false) {
        app.fail(&e);
    }
    app.stream(4, true, 500)
}
