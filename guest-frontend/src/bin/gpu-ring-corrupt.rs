//! A malicious GPU guest: after a few good frames it puts a descriptor chain that
//! loops (descriptor 0 -> 1 -> 0) on its control queue and notifies. It expects the
//! device to give up on the ring: DEVICE_NEEDS_RESET (status bit 0x40) announced by
//! a config interrupt. Then it resets the device, sets everything up again and keeps
//! drawing. One line per step: `gpu-ring-corrupt <name>: ...`.
#![no_std]
#![no_main]

use gpu_pv::memory::{Gpa, GuestMemory};
use gpu_pv::wire::virtq::{DESC_F_NEXT, DESC_SIZE};
use guest_frontend::boot_info::BootInfo;
use guest_frontend::virtio_gpu::app::App;
use guest_frontend::virtio_gpu::{status, Error, CONTROL_QUEUE};
use guest_frontend::{dma, exit, hypercall, println, timer};

guest_frontend::entry!(main);

fn main(info: &BootInfo) -> ! {
    let mut app = match App::start("gpu-ring-corrupt", info, false) {
        Ok(a) => a,
        Err(e) => {
            println!("gpu-ring-corrupt {}: error: {e}", info.name());
            hypercall::shutdown(exit::FAILED)
        }
    };
    let tag = app.tag.clone();
    if let Err(e) = app.setup(false) {
        app.fail(&e);
    }
    for _ in 0..5 {
        if let Err(e) = app.frame() {
            app.fail(&e);
        }
    }
    if let Err(e) = app.gpu.wait_idle() {
        app.fail(&e);
    }
    println!(
        "{tag}: step 1: {} good frames, status {:#x}",
        app.frame,
        app.gpu.status()
    );

    // Step 2: a chain that loops, published and notified.
    let Some(layout) = app.gpu.queue_layout(CONTROL_QUEUE) else {
        app.fail(&Error::NotLive(app.gpu.status()))
    };
    let Some(scratch) = dma::alloc_pages(1) else {
        app.fail(&Error::OutOfMemory)
    };
    // Counted before the chain is published: a hypervisor that polls the ring may
    // find it (and raise the interrupt) before the notify below.
    let (cfg_before, _, _) = app.gpu.interrupts();
    let idx = app.gpu.avail_idx(CONTROL_QUEUE);
    let ram = app.gpu.ram();
    let desc = |addr: Gpa, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.get().to_le_bytes());
        d[8..12].copy_from_slice(&24u32.to_le_bytes());
        d[12..14].copy_from_slice(&DESC_F_NEXT.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    };
    let ok = ram.write(layout.desc, &desc(scratch, 1)).is_ok()
        && ram
            .write(layout.desc.offset(DESC_SIZE), &desc(scratch.offset(64), 0))
            .is_ok()
        && ram
            .write(
                layout.avail.offset(4 + 2 * u64::from(idx % layout.size)),
                &0u16.to_le_bytes(),
            )
            .is_ok();
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    let ok = ok
        && ram
            .write(layout.avail.offset(2), &idx.wrapping_add(1).to_le_bytes())
            .is_ok();
    if !ok {
        app.fail(&Error::OutOfMemory);
    }
    app.gpu.notify(CONTROL_QUEUE);
    println!(
        "{tag}: step 2: looping chain 0 -> 1 -> 0 published at avail index {idx} and notified"
    );

    // Step 3: wait for the config interrupt that announces DEVICE_NEEDS_RESET.
    let t0 = timer::ticks();
    match app.gpu.wait_until("DEVICE_NEEDS_RESET", |_| false) {
        Err(Error::NeedsReset {
            status: st,
            config_irqs,
        }) => {
            let ms = (timer::ticks() - t0) * 1000 / u64::from(guest_frontend::virtio_gpu::TICK_HZ);
            if config_irqs > cfg_before {
                println!(
                    "{tag}: step 3: config interrupt (vector 0x40) within {ms} ms, status {st:#x}: DEVICE_NEEDS_RESET set, as expected"
                );
            } else {
                println!(
                    "{tag}: step 3: status {st:#x} shows DEVICE_NEEDS_RESET after {ms} ms, but NO config interrupt came"
                );
            }
        }
        Err(e) => {
            let st = app.gpu.status();
            println!(
                "{tag}: step 3: expected DEVICE_NEEDS_RESET, got: {e} (status {st:#x}{})",
                if st & status::DEVICE_NEEDS_RESET != 0 {
                    ", needs-reset bit set"
                } else {
                    ""
                }
            );
            hypercall::shutdown(exit::FAILED)
        }
        Ok(()) => unreachable!(),
    }

    // Step 4: reset and start over.
    if let Err(e) = app.restart() {
        app.fail(&e);
    }
    println!(
        "{tag}: step 4: device reset and set up again, status {:#x}",
        app.gpu.status()
    );
    if let Err(e) = app.frame() {
        app.fail(&e);
    }
    println!("{tag}: step 5: survived, drawing again after the reset");
    app.run_forever()
}
