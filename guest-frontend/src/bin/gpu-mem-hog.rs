//! A hostile GPU guest that tries to exhaust the hypervisor's memory, one sink
//! after the other, and expects its own budget to stop it each time:
//!
//! 0. display-sized resources until refused (with the simulated GPU their pixels
//!    are hypervisor memory, charged to its budget; on a real GPU its VRAM quota
//!    stops it), all released again;
//! 1. 1x1 resources, each with as many tiny backing entries as a request holds,
//!    none of which merge, until a command is answered `ERR_OUT_OF_MEMORY`;
//! 2. a control-queue head published twice while the device still holds it,
//!    which must end in `DEVICE_NEEDS_RESET` (and a config interrupt), not in an
//!    ever-growing queue of chains;
//! 3. a device reset, after which everything it held is given back: it draws again;
//! 4. the same 32 MiB of its RAM registered for zero-copy over and over
//!    (`GPU_REGISTER_BUFFER`) until refused, then all unregistered, and one more
//!    registration to show the memory came back (paced, so that the hypervisor's
//!    per-VM log rate keeps the line that reports the refusal).
//!
//! Then it keeps drawing. One line per step: `gpu-mem-hog <name>: ...`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use gpu_pv::command::Command;
use gpu_pv::memory::GuestMemory;
use gpu_pv::wire::{self, MemEntry};
use guest_frontend::abi::hypercall::{GPU_REGISTER_BUFFER, GPU_UNREGISTER_BUFFER, OK};
use guest_frontend::boot_info::BootInfo;
use guest_frontend::virtio_gpu::app::App;
use guest_frontend::virtio_gpu::{
    plain, response_name, Error, CONTROL_QUEUE, MAX_REQUEST, TICK_HZ,
};
use guest_frontend::{dma, exit, hypercall, println, timer};

guest_frontend::entry!(main);

/// Backing entries per `ATTACH_BACKING`: as many as one request slot holds.
const ENTRIES: usize = (MAX_REQUEST - wire::size::RESOURCE_ATTACH_BACKING) / 16;
/// First resource id it creates (its framebuffer, made later, is 1).
const FIRST_ID: u32 = 100;
/// Size of the buffer it registers again and again (its RAM must hold it).
const BUFFER_BYTES: u64 = 32 << 20;

fn main(info: &BootInfo) -> ! {
    let mut app = match App::start("gpu-mem-hog", info, false) {
        Ok(a) => a,
        Err(e) => {
            println!("gpu-mem-hog {}: error: {e}", info.name());
            hypercall::shutdown(exit::FAILED)
        }
    };
    let tag = app.tag.clone();
    large_resources(&mut app);
    tiny_backings(&mut app);
    republished_head(&mut app);
    if let Err(e) = app.restart() {
        app.fail(&e);
    }
    if let Err(e) = app.frame() {
        app.fail(&e);
    }
    println!(
        "{tag}: step 3: device reset and set up again, status {:#x}: drawing again",
        app.gpu.status()
    );
    registered_buffers(&app.tag);
    println!("{tag}: step 5: survived, drawing");
    app.run_forever()
}

/// Answers `cmd` (a driver error stops the VM).
fn call(app: &mut App, cmd: Command) -> u32 {
    match app.gpu.call(&plain(cmd)) {
        Ok(c) => c.hdr.type_,
        Err(e) => app.fail(&e),
    }
}

/// Step 0: resources of the display's size until one is refused, then released.
fn large_resources(app: &mut App) {
    let (w, h) = (app.width, app.height);
    let mut made = Vec::new();
    let refusal = loop {
        let id = FIRST_ID + made.len() as u32;
        let create = Command::ResourceCreate2d {
            resource_id: id,
            format: wire::format::B8G8R8X8_UNORM,
            width: w,
            height: h,
        };
        match call(app, create) {
            wire::RESP_OK_NODATA if made.len() < 1000 => made.push(id),
            t => break t,
        }
    };
    let n = made.len();
    let released = made
        .into_iter()
        .filter(|&id| call(app, Command::ResourceUnref { resource_id: id }) == wire::RESP_OK_NODATA)
        .count();
    let verdict = if refusal == wire::RESP_ERR_OUT_OF_MEMORY {
        "as expected"
    } else {
        "expected ERR_OUT_OF_MEMORY"
    };
    println!(
        "{}: step 0: {n} resources of {w}x{h} ({} KiB of pixels each) created, the next answered {} ({refusal:#x}), {verdict}; {released} released",
        app.tag,
        u64::from(w) * u64::from(h) * 4 / 1024,
        response_name(refusal)
    );
}

/// Step 1: 1x1 resources with `ENTRIES` one-byte entries two bytes apart each.
fn tiny_backings(app: &mut App) {
    let Some(page) = dma::alloc_pages(1) else {
        app.fail(&Error::OutOfMemory)
    };
    let entries: Vec<MemEntry> = (0..ENTRIES as u64)
        .map(|k| MemEntry {
            addr: page.offset(2 * k).get(),
            length: 1,
            padding: 0,
        })
        .collect();
    let mut accepted = 0u32;
    for id in FIRST_ID.. {
        let create = Command::ResourceCreate2d {
            resource_id: id,
            format: wire::format::B8G8R8X8_UNORM,
            width: 1,
            height: 1,
        };
        let attach = Command::ResourceAttachBacking {
            resource_id: id,
            entries: entries.clone(),
        };
        for (what, cmd) in [("RESOURCE_CREATE_2D", create), ("ATTACH_BACKING", attach)] {
            let t = call(app, cmd);
            if t == wire::RESP_OK_NODATA {
                continue;
            }
            let verdict = if t == wire::RESP_ERR_OUT_OF_MEMORY {
                "as expected"
            } else {
                "expected ERR_OUT_OF_MEMORY"
            };
            println!(
                "{}: step 1: {accepted} resources of 1x1 with {ENTRIES} tiny backing entries each accepted ({} entries), then {what} of resource {id} answered {} ({t:#x}), {verdict}",
                app.tag,
                u64::from(accepted) * ENTRIES as u64,
                response_name(t)
            );
            return;
        }
        accepted += 1;
    }
}

/// Step 2: a command's head published twice in one go (the device still holds it
/// when it meets the second), then the wait for `DEVICE_NEEDS_RESET`.
fn republished_head(app: &mut App) {
    let tag = app.tag.clone();
    let Some(layout) = app.gpu.queue_layout(CONTROL_QUEUE) else {
        app.fail(&Error::NotLive(app.gpu.status()))
    };
    let (cfg_before, _, _) = app.gpu.interrupts();
    // Added, not published yet.
    if let Err(e) = app.gpu.submit(&plain(Command::GetDisplayInfo)) {
        app.fail(&e);
    }
    let idx = app.gpu.avail_idx(CONTROL_QUEUE);
    let slot = |i: u16| layout.avail.offset(4 + 2 * u64::from(i % layout.size));
    let ram = app.gpu.ram();
    let mut head = [0u8; 2];
    let ok = ram.read(slot(idx.wrapping_sub(1)), &mut head).is_ok()
        && ram.write(slot(idx), &head).is_ok();
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    // Both entries become visible at once.
    let ok = ok
        && ram
            .write(layout.avail.offset(2), &idx.wrapping_add(1).to_le_bytes())
            .is_ok();
    if !ok {
        app.fail(&Error::OutOfMemory);
    }
    app.gpu.notify(CONTROL_QUEUE);
    let head = u16::from_le_bytes(head);
    println!("{tag}: step 2: head {head} published twice at avail index {idx} and notified");
    match app.gpu.wait_until("DEVICE_NEEDS_RESET", |_| false) {
        Err(Error::NeedsReset {
            status: st,
            config_irqs,
        }) => {
            let irq = if config_irqs > cfg_before {
                "a config interrupt"
            } else {
                "NO config interrupt"
            };
            println!(
                "{tag}: step 2: status {st:#x} after {irq}: DEVICE_NEEDS_RESET set, as expected"
            );
        }
        Err(e) => {
            println!(
                "{tag}: step 2: expected DEVICE_NEEDS_RESET, got: {e} (status {:#x})",
                app.gpu.status()
            );
            hypercall::shutdown(exit::FAILED)
        }
        Ok(()) => unreachable!(),
    }
}

/// Step 4: the same RAM registered for zero-copy until refused, all of it
/// unregistered, then registered once more.
fn registered_buffers(tag: &str) {
    let Some(gpa) = dma::alloc_pages(BUFFER_BYTES / dma::PAGE_SIZE) else {
        println!("{tag}: step 4: no {BUFFER_BYTES:#x} bytes of RAM to register");
        hypercall::shutdown(exit::FAILED)
    };
    let mut handles = Vec::new();
    sleep_ticks(u64::from(TICK_HZ) + 2);
    loop {
        sleep_ticks(2);
        let (r, handle) = hypercall::call(GPU_REGISTER_BUFFER, gpa.get(), BUFFER_BYTES, 0, 0);
        if r != OK || handles.len() >= 1000 {
            break;
        }
        handles.push(handle);
    }
    let n = handles.len();
    let freed = handles
        .into_iter()
        .filter(|&h| hypercall::call(GPU_UNREGISTER_BUFFER, h, 0, 0, 0).0 == OK)
        .count();
    let (again, handle) = hypercall::call(GPU_REGISTER_BUFFER, gpa.get(), BUFFER_BYTES, 0, 0);
    let back = again == OK && hypercall::call(GPU_UNREGISTER_BUFFER, handle, 0, 0, 0).0 == OK;
    println!(
        "{tag}: step 4: {n} registrations of the same {} MiB accepted, the next refused; {freed} unregistered; registering again {}",
        BUFFER_BYTES >> 20,
        if back { "works, as expected" } else { "FAILED" }
    );
}

/// Sleeps `n` ticks of the guest's timer.
fn sleep_ticks(n: u64) {
    let mut t = timer::ticks();
    let end = t + n;
    while t < end {
        t = timer::wait_for_tick_after(t);
    }
}
