//! Per-queue reset (`VIRTIO_F_RING_RESET`) and MSI-X pending bits, end to end.
//!
//! The guest brings the device up with the standard driver ([`App::start`]), checks
//! that a `queue_reset` write is ignored while RING_RESET is not negotiated, then
//! re-initialises the device itself with RING_RESET negotiated and drives the control
//! queue with its own small driver (the standard one has no queue-reset path):
//!
//! 1. draws frames (TRANSFER_TO_HOST_2D + fenced RESOURCE_FLUSH) on the control queue;
//! 2. queues several frames (more than one batch of the mediator), publishes them
//!    without a notify (the hypervisor polls a running VM's queues, so some may be
//!    taken, validated and sent to the GPU, others not yet), and resets the control
//!    queue at once, with commands still on their way: the reset completes within
//!    the write
//!    (`queue_reset` and `queue_enable` read 0), and for 300 ms after it no used
//!    entry and no response reaches the dropped chains;
//! 3. re-enables the queue somewhere else with a smaller size and draws again (the
//!    resources survived: only the queue was reset), fences still increasing;
//! 4. masks the control queue's MSI-X entry, lets a command complete, reads the
//!    entry's bit in the Pending Bit Array, unmasks it and must then get the
//!    interrupt; the same again with the function mask;
//! 5. draws forever, printing `frame <n>` every 10 frames.
//!
//! One line per step: `gpu-queue-reset <name>: step <n>: ...`; any failure prints
//! `... error: ...` and stops the VM with exit code 1.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;

use gpu_pv::command::{self, Request, Response};
use gpu_pv::memory::{Gpa, GuestMemory};
use gpu_pv::ring::driver::DriverQueue;
use gpu_pv::ring::QueueLayout;
use gpu_pv::wire::{self, feature, format as pixel};
use guest_frontend::boot_info::BootInfo;
use guest_frontend::dma::{self, GuestRam};
use guest_frontend::gfx::Pattern;
use guest_frontend::virtio_gpu::app::{App, FB_RESOURCE};
use guest_frontend::virtio_gpu::display::Framebuffer;
use guest_frontend::virtio_gpu::transport::{common, VirtioPci};
use guest_frontend::virtio_gpu::{
    fenced, plain, status, CONTROL_QUEUE, CONTROL_VECTOR, CURSOR_QUEUE, TICK_HZ,
};
use guest_frontend::{cpu, exit, hypercall, idt, println, timer};

guest_frontend::entry!(main);

const CONFIG_ENTRY: u16 = 0;
const CONTROL_ENTRY: u16 = 1;
const CURSOR_ENTRY: u16 = 2;
/// Bytes per command slot: the request at +0, the response at +RESPONSE, the
/// indirect descriptor table at +TABLE.
const SLOT: u64 = 1024;
const RESPONSE: u64 = 512;
const TABLE: u64 = 768;
/// Frames queued at once before the control queue is reset under them: 60 chains,
/// more than one batch of the mediator, so some are still unanswered (staged or on
/// the GPU) when the reset comes.
const IN_FLIGHT_FRAMES: u32 = 30;
/// How long a wait may take.
const TIMEOUT_MS: u64 = 5_000;

type R<T> = Result<T, String>;

fn main(info: &BootInfo) -> ! {
    let prog = "gpu-queue-reset";
    let tag = format!("{prog} {}", info.name());
    match run(info, prog, &tag) {
        Ok(never) => match never {},
        Err(e) => {
            println!("{tag}: error: {e}");
            hypercall::shutdown(exit::FAILED)
        }
    }
}

/// What a chain in the ring waits for.
struct Sent {
    slot: Gpa,
    fence: Option<u64>,
}

/// A minimal control-queue driver over the raw transport.
struct Control {
    pci: VirtioPci,
    mem: GuestRam,
    layout: QueueLayout,
    dq: DriverQueue,
    notify: u64,
    slots: Gpa,
    next_slot: u64,
    sent: BTreeMap<u16, Sent>,
    fence: u64,
    completed: u64,
}

impl Control {
    fn new(pci: VirtioPci, layout: QueueLayout, notify: u64, fence: u64) -> R<Control> {
        let mut mem = GuestRam::this_guest();
        let dq = DriverQueue::new(&mut mem, layout).map_err(|e| format!("ring: {e:?}"))?;
        let pages = (2 * u64::from(layout.size) * SLOT).div_ceil(dma::PAGE_SIZE);
        let slots = dma::alloc_pages(pages).ok_or("out of memory for command slots")?;
        Ok(Control {
            pci,
            mem,
            layout,
            dq,
            notify,
            slots,
            next_slot: 0,
            sent: BTreeMap::new(),
            fence,
            completed: 0,
        })
    }

    fn next_fence(&mut self) -> u64 {
        self.fence += 1;
        self.fence
    }

    /// Adds `req` (one readable, one writable buffer, through an indirect table when
    /// negotiated). Slots are used in turn, and there are twice as many as the ring
    /// can have in flight, so a slot is free when it comes round again.
    fn submit(&mut self, req: &Request) -> R<()> {
        let per_chain = if self.layout.indirect { 1 } else { 2 };
        if usize::from(self.layout.size / per_chain) <= self.sent.len() {
            return Err(format!("{} chains in flight: ring full", self.sent.len()));
        }
        let mut bytes = alloc::vec::Vec::new();
        command::encode(req, &mut bytes);
        if bytes.len() as u64 > RESPONSE {
            return Err(format!("request of {} bytes too large", bytes.len()));
        }
        let slot = self
            .slots
            .offset((self.next_slot % (2 * u64::from(self.layout.size))) * SLOT);
        self.next_slot += 1;
        let w = |m: &mut GuestRam, a: Gpa, b: &[u8]| m.write(a, b).map_err(|e| format!("{e:?}"));
        w(&mut self.mem, slot, &bytes)?;
        w(&mut self.mem, slot.offset(RESPONSE), &[0u8; 64])?;
        let head = self
            .dq
            .add(
                &mut self.mem,
                &[(slot, bytes.len() as u32)],
                &[(slot.offset(RESPONSE), wire::size::RESP_NODATA as u32)],
                self.layout.indirect.then_some(slot.offset(TABLE)),
            )
            .map_err(|e| format!("add: {e:?}"))?;
        let fence = (req.hdr.flags & wire::FLAG_FENCE != 0).then_some(req.hdr.fence_id);
        self.sent.insert(head, Sent { slot, fence });
        Ok(())
    }

    /// Publishes what was added (the available index), without notifying.
    fn publish(&mut self) -> R<()> {
        self.dq
            .kick(&mut self.mem)
            .map(|_| ())
            .map_err(|e| format!("kick: {e:?}"))
    }

    /// Publishes what was added and notifies (whatever the event index says).
    fn kick(&mut self) -> R<()> {
        self.publish()?;
        self.pci.notify_queue(self.notify, CONTROL_QUEUE);
        Ok(())
    }

    /// Asks for an interrupt at the next used entry (event index).
    fn arm(&mut self) -> R<()> {
        self.dq
            .set_used_event(&mut self.mem, self.dq.last_used_idx())
            .map_err(|e| format!("used event: {e:?}"))
    }

    /// Takes every used entry; each must be OK_NODATA with its fence echoed.
    fn reap(&mut self) -> R<usize> {
        let mut n = 0;
        while let Some((head, _len)) = self
            .dq
            .take_used(&self.mem)
            .map_err(|e| format!("used ring: {e:?}"))?
        {
            let s = self.sent.remove(&head).ok_or(format!(
                "used entry for head {head}, which is not in flight"
            ))?;
            let mut b = [0u8; wire::size::RESP_NODATA];
            self.mem
                .read(s.slot.offset(RESPONSE), &mut b)
                .map_err(|e| format!("{e:?}"))?;
            let (hdr, resp) = Response::decode(&b).map_err(|e| format!("response: {e:?}"))?;
            if resp != Response::OkNoData {
                return Err(format!("response {:#x}, expected OK_NODATA", hdr.type_));
            }
            if let Some(f) = s.fence {
                if hdr.flags & wire::FLAG_FENCE == 0 || hdr.fence_id != f {
                    return Err(format!("fence {f} not echoed (got {})", hdr.fence_id));
                }
            }
            n += 1;
            self.completed += 1;
        }
        Ok(n)
    }

    /// Halts (interrupts on) until every chain came back.
    fn wait_all(&mut self, what: &str) -> R<()> {
        let start = timer::ticks();
        let limit = TIMEOUT_MS * u64::from(TICK_HZ) / 1000 + 1;
        loop {
            cpu::cli();
            self.reap()?;
            if self.sent.is_empty() {
                cpu::sti();
                return Ok(());
            }
            self.arm()?;
            if self.reap()? > 0 && self.sent.is_empty() {
                cpu::sti();
                return Ok(());
            }
            if timer::ticks().wrapping_sub(start) >= limit {
                cpu::sti();
                return Err(format!(
                    "timeout waiting for {what}: {} chains outstanding, status {:#x}",
                    self.sent.len(),
                    self.pci.status()
                ));
            }
            cpu::enable_interrupts_and_halt();
        }
    }

    /// Queues one frame: full transfer and a fenced flush.
    fn queue_frame(&mut self, fb: &Framebuffer) -> R<()> {
        self.submit(&plain(fb.transfer_cmd()))?;
        let f = self.next_fence();
        self.submit(&fenced(fb.flush_cmd(), f))
    }
}

/// Three pages for a queue of up to 64 entries: descriptors, available, used.
fn ring_pages(size: u16, event_idx: bool, indirect: bool) -> R<QueueLayout> {
    let p = dma::alloc_pages(3).ok_or("out of memory for a ring")?;
    Ok(QueueLayout {
        size,
        desc: p,
        avail: p.offset(dma::PAGE_SIZE),
        used: p.offset(2 * dma::PAGE_SIZE),
        event_idx,
        indirect,
    })
}

/// The used index the device last published in `layout`'s used ring.
fn used_idx(mem: &GuestRam, layout: &QueueLayout) -> R<u16> {
    let mut b = [0u8; 2];
    mem.read(layout.used.offset(2), &mut b)
        .map_err(|e| format!("{e:?}"))?;
    Ok(u16::from_le_bytes(b))
}

/// Halts for about `ms` milliseconds (interrupts on).
fn sleep_ms(ms: u64) {
    let ticks = (ms * u64::from(TICK_HZ)).div_ceil(1000);
    let mut now = timer::ticks();
    let end = now + ticks;
    while now < end {
        now = timer::wait_for_tick_after(now);
    }
}

/// Halts until the control vector's count passes `seen`, for up to `ms`.
fn wait_control_irq(seen: u64, ms: u64) -> bool {
    let end = timer::ticks() + (ms * u64::from(TICK_HZ)).div_ceil(1000);
    loop {
        cpu::cli();
        if idt::device_interrupts(CONTROL_VECTOR) > seen {
            cpu::sti();
            return true;
        }
        if timer::ticks() >= end {
            cpu::sti();
            return false;
        }
        cpu::enable_interrupts_and_halt();
    }
}

/// The device status sequence again, this time accepting `features` (RING_RESET
/// among them), with both queues set up at `control` / `cursor`. Returns the
/// control queue's notification address.
fn reinit(pci: &VirtioPci, features: u64, control: &QueueLayout, cursor: &QueueLayout) -> R<u64> {
    pci.set_status(0);
    let mut st = pci.status();
    for _ in 0..1000 {
        if st == 0 {
            break;
        }
        st = pci.status();
    }
    if st != 0 {
        return Err(format!("reset stuck, status {st:#x}"));
    }
    let base = status::ACKNOWLEDGE | status::DRIVER;
    pci.set_status(status::ACKNOWLEDGE);
    pci.set_status(base);
    pci.set_driver_features(features);
    pci.set_status(base | status::FEATURES_OK);
    if pci.status() & status::FEATURES_OK == 0 {
        return Err(format!("FEATURES_OK refused for {features:#x}"));
    }
    pci.write16(common::CONFIG_MSIX_VECTOR, CONFIG_ENTRY);
    // Not allowed before DRIVER_OK: the device ignores it (and logs it).
    pci.select_queue(CONTROL_QUEUE);
    pci.write16(common::QUEUE_RESET, 1);
    let notify = pci
        .program_queue(CONTROL_QUEUE, control, CONTROL_ENTRY)
        .map_err(|e| format!("{e}"))?;
    pci.enable_queue(CONTROL_QUEUE)
        .map_err(|e| format!("{e}"))?;
    pci.program_queue(CURSOR_QUEUE, cursor, CURSOR_ENTRY)
        .map_err(|e| format!("{e}"))?;
    pci.enable_queue(CURSOR_QUEUE).map_err(|e| format!("{e}"))?;
    pci.set_status(base | status::FEATURES_OK | status::DRIVER_OK);
    let st = pci.status();
    if st & status::DRIVER_OK == 0 || st & (status::DEVICE_NEEDS_RESET | status::FAILED) != 0 {
        return Err(format!("device not live after DRIVER_OK, status {st:#x}"));
    }
    Ok(notify)
}

fn run(info: &BootInfo, prog: &str, tag: &str) -> R<core::convert::Infallible> {
    let app = App::start(prog, info, false).map_err(|e| format!("{e}"))?;
    let pci = app.gpu.pci;
    let (width, height) = (app.width, app.height);
    let reset_bit = feature::bit(feature::RING_RESET);
    if app.gpu.offered_features() & reset_bit == 0 {
        return Err(format!(
            "the device does not offer RING_RESET (features {:#x})",
            app.gpu.offered_features()
        ));
    }
    // Step 1: the standard driver did not negotiate RING_RESET: a reset is ignored.
    pci.select_queue(CONTROL_QUEUE);
    pci.write16(common::QUEUE_RESET, 1);
    let (enable, reset) = pci.queue_state(CONTROL_QUEUE);
    if (enable, reset) != (1, 0) {
        return Err(format!(
            "queue_reset without RING_RESET negotiated was not ignored: queue_enable {enable}, queue_reset {reset}"
        ));
    }
    println!(
        "{tag}: step 1: queue_reset without RING_RESET negotiated ignored (queue_enable {enable}, queue_reset {reset})"
    );

    // Step 2: the device again, with RING_RESET.
    let features = app.gpu.features() | reset_bit;
    let (event_idx, indirect) = (
        features & feature::bit(feature::RING_EVENT_IDX) != 0,
        features & feature::bit(feature::RING_INDIRECT_DESC) != 0,
    );
    let first = ring_pages(64, event_idx, indirect)?;
    let cursor = ring_pages(16, event_idx, indirect)?;
    let notify = reinit(&pci, features, &first, &cursor)?;
    let mut ctl = Control::new(pci, first, notify, 0)?;
    let mut fb = Framebuffer::alloc(FB_RESOURCE, pixel::B8G8R8X8_UNORM, width, height)
        .map_err(|e| format!("{e}"))?;
    let mut pattern = Pattern::new(info.vm_id, width, height);
    ctl.submit(&plain(fb.create_cmd()))?;
    ctl.submit(&plain(fb.attach_cmd()))?;
    ctl.submit(&plain(gpu_pv::command::Command::SetScanout {
        rect: fb.rect(),
        scanout_id: 0,
        resource_id: FB_RESOURCE,
    }))?;
    ctl.kick()?;
    ctl.wait_all("the framebuffer set-up")?;
    println!(
        "{tag}: step 2: device re-initialised with RING_RESET negotiated (features {features:#x}), framebuffer on scanout 0"
    );

    let mut frame = 0u64;
    for _ in 0..10 {
        pattern.draw(fb.pixels(), frame);
        frame += 1;
        ctl.queue_frame(&fb)?;
        ctl.kick()?;
        ctl.wait_all("a frame")?;
    }
    println!(
        "{tag}: step 3: 10 frames completed on the control queue ({} entries at {:#x})",
        first.size, first.desc
    );

    // Step 4: frames queued and notified, and the queue reset under them.
    for _ in 0..IN_FLIGHT_FRAMES {
        pattern.draw(fb.pixels(), frame);
        frame += 1;
        ctl.queue_frame(&fb)?;
    }
    let queued = ctl.sent.len();
    ctl.arm()?;
    ctl.publish()?;
    ctl.pci
        .reset_queue(CONTROL_QUEUE)
        .map_err(|e| format!("{e}"))?;
    let (enable, reset) = ctl.pci.queue_state(CONTROL_QUEUE);
    if (enable, reset) != (0, 0) {
        return Err(format!(
            "after the queue reset queue_enable reads {enable}, queue_reset {reset} (expected 0, 0)"
        ));
    }
    let came_back = ctl.reap()?;
    let dropped = ctl.sent.len();
    let used_at_reset = used_idx(&ctl.mem, &first)?;
    println!(
        "{tag}: step 4: {queued} commands published, control queue reset under them: queue_enable 0, queue_reset 0; {came_back} came back before the reset, {dropped} dropped"
    );

    // Step 5: nothing more reaches the reset queue.
    sleep_ms(300);
    let used_later = used_idx(&ctl.mem, &first)?;
    let mut answered = 0;
    for s in ctl.sent.values() {
        let mut b = [0u8; 4];
        ctl.mem
            .read(s.slot.offset(RESPONSE), &mut b)
            .map_err(|e| format!("{e:?}"))?;
        if u32::from_le_bytes(b) != 0 {
            answered += 1;
        }
    }
    if used_later != used_at_reset || answered != 0 {
        return Err(format!(
            "the reset queue was written after its reset: used index {used_at_reset} -> {used_later}, {answered} of {dropped} dropped chains got a response"
        ));
    }
    println!(
        "{tag}: step 5: 300 ms after the reset the old used index is still {used_later} and none of the {dropped} dropped chains got a response"
    );

    // Step 6: the queue again, elsewhere and smaller.
    let second = ring_pages(32, event_idx, indirect)?;
    let notify = ctl
        .pci
        .program_queue(CONTROL_QUEUE, &second, CONTROL_ENTRY)
        .map_err(|e| format!("{e}"))?;
    ctl.pci
        .enable_queue(CONTROL_QUEUE)
        .map_err(|e| format!("{e}"))?;
    let fence_before = ctl.fence;
    ctl = Control::new(pci, second, notify, fence_before)?;
    let (enable, reset) = ctl.pci.queue_state(CONTROL_QUEUE);
    println!(
        "{tag}: step 6: control queue re-enabled with {} entries at {:#x} (queue_enable {enable}, queue_reset {reset})",
        second.size, second.desc
    );

    // Step 7: drawing again on the re-enabled queue.
    for _ in 0..20 {
        pattern.draw(fb.pixels(), frame);
        frame += 1;
        ctl.queue_frame(&fb)?;
        ctl.kick()?;
        ctl.wait_all("a frame after the queue reset")?;
    }
    println!(
        "{tag}: step 7: 20 frames completed after the queue reset (fences {} to {} echoed)",
        fence_before + 1,
        ctl.fence
    );

    // Step 8: a masked MSI-X entry holds its message pending until unmasked.
    let m = pci.msix;
    for function_mask in [false, true] {
        let what = if function_mask { "function" } else { "entry" };
        let mask = |on: bool| {
            if function_mask {
                m.set_control(true, on);
            } else {
                m.program(pci.msix_table, CONTROL_ENTRY, CONTROL_VECTOR, on);
            }
        };
        mask(true);
        let irqs = idt::device_interrupts(CONTROL_VECTOR);
        pattern.draw(fb.pixels(), frame);
        frame += 1;
        ctl.queue_frame(&fb)?;
        ctl.arm()?;
        ctl.kick()?;
        ctl.wait_all("a frame with the control vector masked")?;
        // The interrupt was asked for (event index) but must be held back.
        sleep_ms(100);
        let held = idt::device_interrupts(CONTROL_VECTOR);
        let pba = pci.read_pba();
        if held != irqs || pba & (1 << CONTROL_ENTRY) == 0 {
            mask(false);
            return Err(format!(
                "MSI-X {what} mask: {} interrupts while masked, PBA {pba:#x} (expected none, bit {CONTROL_ENTRY} set)",
                held - irqs
            ));
        }
        mask(false);
        let delivered = wait_control_irq(irqs, 1000);
        let after = pci.read_pba();
        if !delivered || after & (1 << CONTROL_ENTRY) != 0 {
            return Err(format!(
                "MSI-X {what} unmask: the pending interrupt was {} (PBA now {after:#x})",
                if delivered {
                    "delivered"
                } else {
                    "NOT delivered"
                }
            ));
        }
        println!(
            "{tag}: step 8: control vector {what} masked: completion held pending (PBA {pba:#x}, no interrupt); unmasked: interrupt delivered, PBA now {after:#x}"
        );
    }

    // Step 9: on and on.
    println!(
        "{tag}: step 9: done: {} commands completed, drawing on",
        ctl.completed
    );
    loop {
        pattern.draw(fb.pixels(), frame);
        frame += 1;
        ctl.queue_frame(&fb)?;
        ctl.kick()?;
        ctl.wait_all("a frame")?;
        if frame.is_multiple_of(10) {
            println!("{tag}: frame {frame}");
        }
    }
}
