//! Draws one frame on its virtual GPU and stops: prints
//! `draw-once <name>: frame drawn, checksum 0x<FNV-1a of the framebuffer>` and shuts
//! down with code 0 (1 on any error). For tests.
#![no_std]
#![no_main]

use guest_frontend::boot_info::BootInfo;
use guest_frontend::virtio_gpu::app::App;
use guest_frontend::virtio_gpu::Error;
use guest_frontend::{exit, hypercall, println};

guest_frontend::entry!(main);

fn main(info: &BootInfo) -> ! {
    match run(info) {
        Ok(app) => {
            println!(
                "draw-once {}: frame drawn, checksum {:#018x}",
                info.name(),
                app.checksum()
            );
            println!("{}", app.stats_line());
            hypercall::shutdown(exit::OK)
        }
        Err(e) => {
            println!("draw-once {}: error: {e}", info.name());
            hypercall::shutdown(exit::FAILED)
        }
    }
}

fn run(info: &BootInfo) -> Result<App, Error> {
    let mut app = App::start("draw-once", info, false)?;
    app.setup(false)?;
    app.frame()?;
    app.gpu.wait_idle()?;
    Ok(app)
}
