//! Draws an animated pattern on its virtual GPU forever: the VM's own background
//! colour (from its id) with a moving bar and a moving cursor. Every frame is a full
//! TRANSFER_TO_HOST_2D + fenced RESOURCE_FLUSH, waited for by interrupt. Prints
//! `draw <name>: <w>x<h> on scanout 0, protocol <rev>, features 0x...` once and
//! `draw <name>: frame <n>` every 10 frames. If the device asks for a reset, it
//! resets it and carries on; any other error stops the VM with exit code 1.
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::virtio_gpu::app::App;
use guest_frontend::{exit, hypercall, println};

guest_frontend::entry!(main);

fn main(info: &BootInfo) -> ! {
    println!("draw {}: vm {} starting", info.name(), info.vm_id);
    let mut app = match App::start("draw", info, true) {
        Ok(a) => a,
        Err(e) => {
            println!("draw {}: error: {e}", info.name());
            hypercall::shutdown(exit::FAILED)
        }
    };
    if let Err(e) = app.setup(true) {
        app.fail(&e);
    }
    app.run_forever()
}
