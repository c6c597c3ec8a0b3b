//! Behaviours selected by `test=...` on the command line, for the emulator scenarios:
//! each checks something a user of the hypervisor would check, prints what it saw and
//! ends the run passing or failing.

use log::{error, info};

use crate::vm::VmState;
use crate::{mm, verdict, vmm};

/// `test=exception`: a page fault in the hypervisor on purpose, for the crash report.
pub fn early(bi: &boot_info::BootInfo) {
    if bi.option("test") == Some("exception") {
        log::info!("test: touching an unmapped address on purpose");
        // SAFETY: deliberately faults (frame 0 is unmapped) to exercise the crash report.
        unsafe { core::ptr::read_volatile(core::ptr::null::<u64>().wrapping_add(1)) };
    }
}

/// Before the GPU driver and the IOMMU come up: `test=gpu-native` (the hypervisor
/// draws alone, then ends the run) and `test=bench-gpu`'s native baseline.
pub fn before_gpu(bi: &boot_info::BootInfo, devices: &[crate::pci::Device]) -> Option<NativeFps> {
    match bi.option("test") {
        Some("gpu-native") => gpu_native(bi, devices),
        Some("bench-gpu") => Some(gpu_native_run(bi, devices)),
        _ => None,
    }
}

/// Once the IOMMU is up: `test=iommu` and `test=boot` (`all_cpus`: every CPU the
/// firmware listed came online), which end the run.
pub fn after_iommu(bi: &boot_info::BootInfo, devices: &[crate::pci::Device], all_cpus: bool) {
    match bi.option("test") {
        Some("iommu") => iommu(devices),
        Some("boot") => {
            if !all_cpus {
                log::error!("not every CPU came online");
                verdict::fail("cpus");
            }
            verdict::pass();
        }
        _ => {}
    }
}

/// Once the VMs are configured and the mediator runs: the modes that drive VMs
/// themselves (they end the run), and `test=iommu-bypass`, which arms its injection
/// and lets the ordinary run go on.
pub fn with_vms(bi: &boot_info::BootInfo, native: Option<NativeFps>, run_ms: Option<u64>) {
    match bi.option("test") {
        Some("vm-cycles") => vm_cycles(),
        Some("cpu-share") => cpu_share(run_ms.unwrap_or(3_000)),
        Some("lifecycle") => lifecycle(),
        Some("bench-vm") => bench_vm(bi, run_ms.unwrap_or(3_000)),
        Some("iommu-bypass") => {
            let vm = bi
                .option("bypass_vm")
                .and_then(|v| v.parse::<u16>().ok())
                .unwrap_or(0);
            if let Err(e) = crate::inject::arm_bad_dma(vm) {
                log::error!("test=iommu-bypass: {e}");
                verdict::fail("no test injection");
            }
        }
        Some("gpu-restart") => gpu_restart(bi),
        Some("gpu-destroy") => gpu_destroy(),
        Some("bench-hostile") => bench_hostile(run_ms.unwrap_or(2_000)),
        Some("gpu-share") => gpu_share(bi, run_ms.unwrap_or(6_000)),
        Some("bench-gpu") => match native {
            Some(n) => bench_gpu(bi, n, run_ms.unwrap_or(5_000)),
            None => verdict::fail("no native figures"),
        },
        _ => {}
    }
}

/// `test=vm-cycles`: creates, runs and destroys the first configured VM 100 times;
/// the frame count must come back to where it started.
pub fn vm_cycles() -> ! {
    let before = mm::frames::stats().allocated;
    for i in 0..100 {
        if let Err(e) = vmm::create(0) {
            error!("cycle {i}: create failed: {e}");
            verdict::fail("create");
        }
        vmm::run(Some(2_000));
        if vmm::state(0).is_some_and(|s| s == VmState::Running) {
            error!("cycle {i}: the VM did not finish in 2 s");
            verdict::fail("vm did not finish");
        }
        vmm::destroy(0);
    }
    let after = mm::frames::stats().allocated;
    info!(
        "vm cycles: 100 create/run/destroy cycles, frames allocated before {before}, after {after}"
    );
    if before == after {
        info!("vm cycles: no frame leaked");
        verdict::pass()
    }
    verdict::fail("frames leaked")
}

/// `test=cpu-share run_ms=N`: runs every VM (CPU hogs) for N ms; each VM's share of
/// CPU time must be within 5 percentage points of its weight's share.
pub fn cpu_share(run_ms: u64) -> ! {
    vmm::create_all();
    vmm::run(Some(run_ms));
    vmm::report();
    let mut ok = true;
    for (name, got, want) in vmm::shares() {
        let diff = got.abs_diff(want);
        info!(
            "cpu share {name}: {}.{}% of VM time for a weight share of {}.{}%",
            got / 10,
            got % 10,
            want / 10,
            want % 10
        );
        ok &= diff <= 50;
    }
    if ok {
        info!("cpu shares follow the weights");
        verdict::pass()
    }
    verdict::fail("cpu shares off")
}

/// `test=lifecycle`: pause, resume, restart and destroy, with frame accounting.
pub fn lifecycle() -> ! {
    let before = mm::frames::stats().allocated;
    vmm::create_all();
    vmm::run(Some(1_000));
    vmm::pause(0);
    let cpu_paused = vmm::with_vm(0, |vm| vm.stats.cpu_us).unwrap_or(0);
    vmm::run(Some(1_000));
    let cpu_after = vmm::with_vm(0, |vm| vm.stats.cpu_us).unwrap_or(0);
    if cpu_after != cpu_paused {
        error!("a paused VM ran ({cpu_paused} us -> {cpu_after} us)");
        verdict::fail("paused vm ran");
    }
    info!("lifecycle: paused VM did not run");
    vmm::resume(0);
    vmm::run(Some(500));
    if let Err(e) = vmm::restart(0) {
        error!("restart failed: {e}");
        verdict::fail("restart");
    }
    info!("lifecycle: VM restarted");
    vmm::run(Some(1_000));
    vmm::report();
    for i in 0..vmm::slot_count() {
        vmm::destroy(i);
    }
    let after = mm::frames::stats().allocated;
    info!("lifecycle: frames allocated before {before}, after destroying all {after}");
    if before != after {
        verdict::fail("frames leaked");
    }
    verdict::pass()
}

/// Scanout size the `gpu-native` test draws on each head.
const GPU_TEST_W: u32 = 640;
/// See [`GPU_TEST_W`].
const GPU_TEST_H: u32 = 480;

/// `test=gpu-native [frames=N] [hold[=S]]`: the hypervisor drives the physical GPU
/// itself, through the [`crate::gpu::GpuBackend`] trait, with no VM and no mediator:
/// it draws a distinct test pattern (color, checkerboard, gradient, border and the
/// head's number) on each of the first 4 scanouts, waits for every response by
/// interrupt (GPU_VECTOR), then times N (default 200) full-frame
/// TRANSFER_TO_HOST_2D + RESOURCE_FLUSH pairs, one frame at a time round-robin over
/// the heads, each waited for by interrupt: the "native" baseline of the
/// "% of native" benchmark. `hold` keeps the displays up for S (default 5) seconds
/// before exiting, for screendumps from the QEMU monitor.
/// Native frame rates (x10) of the physical GPU driven by the hypervisor alone.
#[derive(Clone, Copy, Debug)]
pub struct NativeFps {
    /// One frame at a time, each waited for by interrupt (as the `draw` guest does).
    pub serial_x10: u64,
    /// [`STREAM_DEPTH`] frames kept in flight, completions polled (as the
    /// `gpu-stream` guest does).
    pub stream_x10: u64,
}

/// Measurement windows of the GPU benchmarks (native and mediated alike).
const WINDOWS: u64 = 5;

/// The best and the median of `rates`.
fn best_and_median(rates: &mut [u64]) -> (u64, u64) {
    rates.sort_unstable();
    (
        rates.last().copied().unwrap_or(0),
        rates.get(rates.len() / 2).copied().unwrap_or(0),
    )
}

/// Frames the streaming workload keeps in flight (the `gpu-stream` guest's depth).
pub const STREAM_DEPTH: usize = 4;

pub fn gpu_native(bi: &boot_info::BootInfo, devices: &[crate::pci::Device]) -> ! {
    gpu_native_run(bi, devices);
    verdict::pass()
}

/// The body of `test=gpu-native`; returns the native frame rates (interrupt
/// coalescing on) for the benchmarks that compare the mediated path against them.
pub fn gpu_native_run(bi: &boot_info::BootInfo, devices: &[crate::pci::Device]) -> NativeFps {
    use alloc::vec;
    use alloc::vec::Vec;
    use gpu_pv::command::{encode, Command, Request};
    use gpu_pv::mediator::QueueId;
    use gpu_pv::wire::{self, format, CtrlHdr, MemEntry, Rect};

    use crate::gpu::virtio::HostVirtioGpu;
    use crate::gpu::{DmaRegion, GpuBackend};
    use crate::interrupts::{self, GPU_VECTOR};

    let Some(dev) = devices.iter().find(|d| HostVirtioGpu::matches(d)) else {
        error!("gpu native: no virtio-gpu found");
        verdict::fail("no gpu")
    };
    let mut vgpu = match HostVirtioGpu::new(dev) {
        Ok(g) => g,
        Err(e) => {
            error!("gpu native: bring-up failed: {e}");
            verdict::fail("gpu bring-up")
        }
    };
    let features = vgpu.features();
    let gpu: &mut dyn GpuBackend = &mut vgpu;
    let heads = gpu.scanouts().len().min(4);
    let dma: u64 = gpu.dma_regions().iter().map(|r| r.1).sum();
    info!(
        "gpu native: {} (features {features:#x}), {} KiB of DMA memory for rings and commands, {} control slots",
        gpu.name(),
        dma / 1024,
        gpu.free_slots(QueueId::Control)
    );
    // Bring-up waited by polling: an interrupt it caused is not ours to count.
    interrupts::service_pending();
    interrupts::take_pending(GPU_VECTOR);

    let (w, h) = (GPU_TEST_W, GPU_TEST_H);
    let bytes = w * h * 4;
    let rect = Rect {
        x: 0,
        y: 0,
        width: w,
        height: h,
    };
    let mut fbs = Vec::new();
    let mut setup = Vec::new();
    for head in 0..heads {
        let Some(mut fb) = DmaRegion::alloc(u64::from(bytes)) else {
            verdict::fail("no memory for the framebuffers")
        };
        draw_test_pattern(head, fb.as_mut_slice());
        let resource_id = head as u32 + 1;
        setup.extend([
            Command::ResourceCreate2d {
                resource_id,
                format: format::B8G8R8X8_UNORM,
                width: w,
                height: h,
            },
            Command::ResourceAttachBacking {
                resource_id,
                entries: vec![MemEntry {
                    addr: fb.device_addr(),
                    length: bytes,
                    padding: 0,
                }],
            },
            Command::TransferToHost2d {
                rect,
                offset: 0,
                resource_id,
            },
            Command::SetScanout {
                rect,
                scanout_id: head as u32,
                resource_id,
            },
            Command::ResourceFlush { rect, resource_id },
        ]);
        fbs.push(fb);
    }
    let wire_of = |cmd: Command| {
        let mut b = Vec::new();
        encode(
            &Request {
                hdr: CtrlHdr::default(),
                cmd,
            },
            &mut b,
        );
        b
    };
    let setup: Vec<Vec<u8>> = setup.into_iter().map(wire_of).collect();
    let mut waiter = GpuWaiter::default();
    let mut done = Vec::new();
    if gpu.free_slots(QueueId::Control) < setup.len() {
        verdict::fail("control queue too small for the set-up");
    }
    for (token, cmd) in setup.iter().enumerate() {
        if let Err(e) = gpu.submit(QueueId::Control, cmd, token as u64) {
            error!("gpu native: submit {token}: {e}");
            verdict::fail("submit");
        }
    }
    gpu.kick();
    if let Err(why) = waiter.wait(gpu, setup.len(), &mut done) {
        error!("gpu native: set-up: {why}");
        verdict::fail(why);
    }
    if let Some((token, status)) = done.iter().find(|d| d.1 != wire::RESP_OK_NODATA) {
        error!("gpu native: set-up command {token} answered {status:#x}");
        verdict::fail("set-up command refused");
    }
    info!(
        "gpu native: test pattern on {heads} scanouts ({} commands, all OK_NODATA), {} interrupts",
        setup.len(),
        waiter.irqs
    );
    if waiter.irqs == 0 {
        verdict::fail("no GPU interrupt");
    }
    // The cursor queue: one MOVE_CURSOR (no response in virtio-gpu; the backend
    // reports OK_NODATA when the device hands it back).
    let mv = wire_of(Command::MoveCursor {
        pos: wire::CursorPos {
            scanout_id: 0,
            x: 100,
            y: 100,
            padding: 0,
        },
    });
    done.clear();
    let irqs_before = waiter.irqs;
    if let Err(e) = gpu.submit(QueueId::Cursor, &mv, 1000) {
        error!("gpu native: cursor submit: {e}");
        verdict::fail("cursor submit");
    }
    gpu.kick();
    if let Err(why) = waiter.wait(gpu, 1, &mut done) {
        error!("gpu native: cursor queue: {why}");
        verdict::fail(why);
    }
    if done.as_slice() != [(1000, wire::RESP_OK_NODATA)] {
        error!("gpu native: cursor queue returned {done:?}");
        verdict::fail("cursor queue");
    }
    info!(
        "gpu native: cursor queue: MOVE_CURSOR returned, {} interrupts",
        waiter.irqs - irqs_before
    );

    let frames: u64 = bi
        .option("frames")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
        .max(1);
    let per_head: Vec<[Vec<u8>; 2]> = (0..heads as u32)
        .map(|head| {
            let resource_id = head + 1;
            [
                wire_of(Command::TransferToHost2d {
                    rect,
                    offset: 0,
                    resource_id,
                }),
                wire_of(Command::ResourceFlush { rect, resource_id }),
            ]
        })
        .collect();
    // Each measurement runs for about `native_ms` (default 1500; at least `frames`
    // frames), so a busy host machine blurs it less.
    let native_ms: u64 = bi
        .option("native_ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_500);
    // Untimed warm-up: the first pass through these code paths is slow under TCG.
    let warm_us = match time_frames(gpu, &mut waiter, &per_head, 20) {
        Ok((us, _)) => us,
        Err(why) => verdict::fail(why),
    };
    // Measured in WINDOWS windows; the best one counts (a shared host machine only
    // ever slows a window down), the median is printed too.
    let per_window = (native_ms * 1000 * 20 / warm_us.max(1) / WINDOWS)
        .max(frames / WINDOWS)
        .max(1);
    let mut rates = Vec::new();
    let mut irqs = 0;
    for _ in 0..WINDOWS {
        let (us, n) = match time_frames(gpu, &mut waiter, &per_head, per_window) {
            Ok(r) => r,
            Err(why) => verdict::fail(why),
        };
        irqs += n;
        rates.push(per_window * 10_000_000 / us);
    }
    let (serial_x10, median) = best_and_median(&mut rates);
    info!(
        "gpu native: {} frames in {WINDOWS} windows: best {}.{} fps, median {}.{} fps, {irqs} interrupts",
        per_window * WINDOWS,
        serial_x10 / 10,
        serial_x10 % 10,
        median / 10,
        median % 10
    );
    // The streaming workload: head 0's frames, STREAM_DEPTH in flight, polled.
    let warm_us = match stream_frames(gpu, &per_head[0], 20) {
        Ok(us) => us,
        Err(why) => verdict::fail(why),
    };
    let per_window = (native_ms * 1000 * 20 / warm_us.max(1) / WINDOWS).max(1);
    let mut rates = Vec::new();
    for _ in 0..WINDOWS {
        let us = match stream_frames(gpu, &per_head[0], per_window) {
            Ok(us) => us,
            Err(why) => verdict::fail(why),
        };
        rates.push(per_window * 10_000_000 / us);
    }
    let (stream_x10, median) = best_and_median(&mut rates);
    info!(
        "gpu native (stream, {STREAM_DEPTH} frames in flight, polled): {} frames in {WINDOWS} windows: best {}.{} fps, median {}.{} fps",
        per_window * WINDOWS,
        stream_x10 / 10,
        stream_x10 % 10,
        median / 10,
        median % 10
    );
    // For comparison: the same frames with an interrupt per completion.
    vgpu.set_coalescing(false);
    let gpu: &mut dyn GpuBackend = &mut vgpu;
    let (us, irqs) = match time_frames(gpu, &mut waiter, &per_head, frames) {
        Ok(r) => r,
        Err(why) => verdict::fail(why),
    };
    let fps_x10 = frames * 10_000_000 / us;
    info!(
        "gpu native (interrupt per completion): {frames} frames in {us} us = {}.{} fps, {irqs} interrupts",
        fps_x10 / 10,
        fps_x10 % 10
    );
    crate::apic::disarm();
    if gpu.check_device() || gpu.failed().is_some() || gpu.in_flight() != 0 {
        error!("gpu native: the device reports a change or failure, or work is left");
        verdict::fail("gpu state after the run");
    }
    let hold_s = bi
        .option("hold")
        .and_then(|v| v.parse::<u64>().ok())
        .or(bi.has_flag("hold").then_some(5));
    if let Some(s) = hold_s {
        info!("gpu native: holding the displays for {s} s");
        crate::apic::delay_us(s * 1_000_000);
    }
    drop(vgpu);
    drop(fbs);
    NativeFps {
        serial_x10,
        stream_x10,
    }
}

/// Streams `frames` frames of one head (`pair`: TRANSFER + FLUSH), keeping
/// [`STREAM_DEPTH`] in flight (one notify per refill) with completions polled, as
/// the `gpu-stream` guest does; returns the elapsed microseconds.
fn stream_frames(
    gpu: &mut dyn crate::gpu::GpuBackend,
    pair: &[alloc::vec::Vec<u8>; 2],
    frames: u64,
) -> Result<u64, &'static str> {
    use gpu_pv::mediator::QueueId;

    let mut done = alloc::vec::Vec::new();
    let (mut submitted, mut completed_cmds) = (0u64, 0u64);
    let t0 = crate::apic::now_us();
    let deadline = t0 + 30_000_000;
    while completed_cmds < frames * 2 {
        let before = submitted;
        while submitted < frames && submitted * 2 - completed_cmds < STREAM_DEPTH as u64 * 2 {
            for (i, cmd) in pair.iter().enumerate() {
                if let Err(e) = gpu.submit(QueueId::Control, cmd, submitted * 2 + i as u64) {
                    error!("gpu native: stream frame {submitted}: submit: {e}");
                    return Err("submit");
                }
            }
            submitted += 1;
        }
        // One notify for what was added (the mediator, too, kicks once per batch).
        if submitted != before {
            gpu.kick();
        }
        done.clear();
        gpu.poll(&mut done);
        if let Some((token, status)) = done.iter().find(|d| d.1 != gpu_pv::wire::RESP_OK_NODATA) {
            error!("gpu native: stream command {token} answered {status:#x}");
            return Err("stream command refused");
        }
        completed_cmds += done.len() as u64;
        if gpu.failed().is_some() {
            return Err("the GPU failed");
        }
        if crate::apic::now_us() > deadline {
            return Err("the stream did not finish in 30 s");
        }
    }
    // Interrupts the stream raised are not anybody's to count.
    crate::interrupts::service_pending();
    crate::interrupts::take_pending(crate::interrupts::GPU_VECTOR);
    Ok((crate::apic::now_us() - t0).max(1))
}

/// Submits `frames` frames (one TRANSFER+FLUSH pair each, round-robin over the
/// heads of `per_head`), each kicked and waited for by interrupt; returns the
/// elapsed microseconds and the interrupts taken.
fn time_frames(
    gpu: &mut dyn crate::gpu::GpuBackend,
    waiter: &mut GpuWaiter,
    per_head: &[[alloc::vec::Vec<u8>; 2]],
    frames: u64,
) -> Result<(u64, u64), &'static str> {
    use gpu_pv::mediator::QueueId;

    let mut done = alloc::vec::Vec::new();
    let irqs_before = waiter.irqs;
    let t0 = crate::apic::now_us();
    for f in 0..frames {
        done.clear();
        let pair = &per_head[(f % per_head.len() as u64) as usize];
        for (i, cmd) in pair.iter().enumerate() {
            if let Err(e) = gpu.submit(QueueId::Control, cmd, f * 2 + i as u64) {
                error!("gpu native: frame {f}: submit: {e}");
                return Err("submit");
            }
        }
        gpu.kick();
        if let Err(why) = waiter.wait(gpu, 2, &mut done) {
            error!("gpu native: frame {f}: {why}");
            return Err(why);
        }
        if let Some((token, status)) = done.iter().find(|d| d.1 != gpu_pv::wire::RESP_OK_NODATA) {
            error!("gpu native: frame {f}: command {token} answered {status:#x}");
            return Err("frame command refused");
        }
    }
    let us = (crate::apic::now_us() - t0).max(1);
    Ok((us, waiter.irqs - irqs_before))
}

/// Waits for GPU completions by interrupt, counting the interrupts.
#[derive(Default)]
struct GpuWaiter {
    irqs: u64,
    timer_until: u64,
}

impl GpuWaiter {
    /// Sleeps (`hlt`, with the APIC timer as a 10 ms safety net) until `done`
    /// holds `want` completions; completions are only harvested after a GPU
    /// interrupt, so a missing interrupt shows as a timeout.
    fn wait(
        &mut self,
        gpu: &mut dyn crate::gpu::GpuBackend,
        want: usize,
        done: &mut alloc::vec::Vec<(u64, u32)>,
    ) -> Result<(), &'static str> {
        use crate::interrupts::{take_pending, GPU_VECTOR};
        use x86_64::instructions::interrupts as cpu_irq;

        let deadline = crate::apic::now_us() + 5_000_000;
        loop {
            cpu_irq::disable();
            let n = take_pending(GPU_VECTOR);
            if n > 0 {
                self.irqs += n;
                gpu.poll(done);
            }
            if done.len() >= want {
                return Ok(());
            }
            if gpu.failed().is_some() {
                return Err("the GPU failed");
            }
            let now = crate::apic::now_us();
            if now >= deadline {
                let before = done.len();
                gpu.poll(done);
                return Err(if done.len() > before {
                    "GPU completions arrived without an interrupt"
                } else {
                    "the GPU did not answer in 5 s"
                });
            }
            if now >= self.timer_until {
                crate::apic::arm_oneshot_us(10_000);
                self.timer_until = now + 9_000;
            }
            // `sti; hlt`: an interrupt that is already pending wakes the hlt.
            cpu_irq::enable_and_hlt();
        }
    }
}

/// Fills `buf` (B8G8R8X8, [`GPU_TEST_W`] x [`GPU_TEST_H`]) with head `head`'s
/// pattern: its own color (red, green, blue, yellow) as a 40-pixel checkerboard
/// shaded left to right, a white 4-pixel border and the head's number in white.
fn draw_test_pattern(head: usize, buf: &mut [u8]) {
    const COLORS: [(u32, u32, u32); 4] =
        [(230, 40, 40), (40, 200, 40), (40, 80, 230), (230, 200, 40)];
    const FONT: [[u8; 5]; 4] = [
        [7, 5, 5, 5, 7],
        [2, 6, 2, 2, 7],
        [7, 1, 7, 4, 7],
        [7, 1, 7, 1, 7],
    ];
    let (w, h) = (GPU_TEST_W, GPU_TEST_H);
    let (r, g, b) = COLORS[head % 4];
    let glyph = &FONT[head % 4];
    let (ox, oy, cell) = (w / 2 - 60, h / 2 - 100, 40);
    for (i, px) in buf.chunks_exact_mut(4).take((w * h) as usize).enumerate() {
        let (x, y) = (i as u32 % w, i as u32 / w);
        let border = x < 4 || y < 4 || x >= w - 4 || y >= h - 4;
        let in_glyph = x >= ox
            && y >= oy
            && (x - ox) / cell < 3
            && (y - oy) / cell < 5
            && (glyph[((y - oy) / cell) as usize] >> (2 - (x - ox) / cell)) & 1 == 1;
        let (cr, cg, cb) = if border || in_glyph {
            (255, 255, 255)
        } else if ((x / 40) + (y / 40)) % 2 == 0 {
            let shade = 96 + 159 * x / w;
            (r * shade / 255, g * shade / 255, b * shade / 255)
        } else {
            (r / 3, g / 3, b / 3)
        };
        px.copy_from_slice(&((cr << 16) | (cg << 8) | cb).to_le_bytes());
    }
}

/// `test=iommu`: the IOMMU confines the GPU's DMA to its domain and reports the rest
/// (see `iommu::selftest`).
pub fn iommu(devices: &[crate::pci::Device]) -> ! {
    match crate::iommu::selftest::run(devices) {
        Ok(()) => verdict::pass(),
        Err(why) => verdict::fail(why),
    }
}

/// `test=bench-vm run_ms=N`: runs the configured VMs (a hypercall ping-pong and a
/// heartbeat) and prints the virtualization figures as `bench:` lines: VM-exit round
/// trips per second and hypercall cost (from the ping-pong VM), exits per heartbeat
/// line, and boot-to-first-guest time next to the firmware's own start-up time.
pub fn bench_vm(bi: &boot_info::BootInfo, run_ms: u64) -> ! {
    vmm::create_all();
    vmm::run(Some(run_ms));
    vmm::report();
    let backend = crate::virt::detect().map_or("none", |b| match b {
        crate::virt::Backend::Svm => "SVM",
        crate::virt::Backend::Vmx => "VMX",
    });
    for i in 0..vmm::slot_count() {
        vmm::with_vm(i, |vm| {
            let st = vm.stats;
            if st.hypercalls >= 1000 && st.cpu_us > 0 {
                info!(
                    "bench: {backend} vm-exit round trips per second: {} ({} exits in {} us of guest CPU time)",
                    st.exits * 1_000_000 / st.cpu_us,
                    st.exits,
                    st.cpu_us
                );
                info!(
                    "bench: {backend} hypercall round trip: {} ns",
                    st.cpu_us * 1000 / st.hypercalls.max(1)
                );
            } else if vm.lines_printed > 1 {
                info!(
                    "bench: {backend} exits per heartbeat line: {} ({} exits, {} lines)",
                    st.exits / vm.lines_printed,
                    st.exits,
                    vm.lines_printed
                );
            }
        });
    }
    let per_ms = crate::apic::tsc_per_ms().max(1);
    {
        use crate::virt::cpu_state::{SAVES, SWITCH_CYCLES, X87_INIT_SAVES, XCR0_SWITCHES};
        use core::sync::atomic::Ordering::Relaxed;
        let (saves, cycles) = (SAVES.load(Relaxed).max(1), SWITCH_CYCLES.load(Relaxed));
        let exits: u64 = (0..vmm::slot_count())
            .filter_map(|i| vmm::with_vm(i, |vm| vm.stats.exits))
            .sum();
        info!(
            "bench: {backend} vCPU state switch per slice (XRSTOR + XSAVE, DR0-3{}): {} ns over {saves} slices (x87 untouched in {}); XCR0 switched on {} of {exits} exits",
            if backend == "VMX" { ", DR6, CR2, kernel GS base" } else { "" },
            cycles * 1_000_000 / per_ms / saves,
            X87_INIT_SAVES.load(Relaxed),
            XCR0_SWITCHES.load(Relaxed)
        );
    }
    let first = crate::vm::FIRST_GUEST_LINE_TSC.load(core::sync::atomic::Ordering::Relaxed);
    let firmware = bi.loader_entry_tsc;
    if first > firmware && firmware > 0 {
        let fw_ms = firmware / per_ms;
        let hv_ms = (first - firmware) / per_ms;
        info!(
            "bench: {backend} boot to first guest line: {hv_ms} ms after the loader started; firmware to loader: {fw_ms} ms; ratio {}.{:02}",
            hv_ms / fw_ms.max(1),
            hv_ms * 100 / fw_ms.max(1) % 100
        );
    }
    verdict::pass()
}

/// `test=gpu-restart [restart_ms=N] [after_ms=M]`: the GPU VMs draw; after N ms
/// (default 3000) VM 0 is destroyed and created again (its GPU channel is reset and
/// released) and must draw again while the others go on, for M ms (default 4000);
/// at the end every VM is destroyed and every frame is back.
pub fn gpu_restart(bi: &boot_info::BootInfo) -> ! {
    let ms = |key, default| {
        bi.option(key)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let before = mm::frames::stats().allocated - crate::gpu_share::iommu_table_frames();
    vmm::create_all();
    vmm::run(Some(ms("restart_ms", 3_000)));
    info!("gpu restart: restarting VM 0");
    if let Err(e) = vmm::restart(0) {
        error!("restart failed: {e}");
        verdict::fail("restart");
    }
    // A line of its own for the moment of the re-creation: "vm vm0 created" also
    // appears at boot (before VM 1 even exists), so a screendump triggered by it
    // would look at the neighbour's head before the neighbour ever drew.
    info!("gpu restart: VM 0 re-created");
    vmm::run(Some(ms("after_ms", 4_000)));
    vmm::report();
    crate::gpu_share::dump_counters();
    for i in 0..vmm::slot_count() {
        vmm::destroy(i);
    }
    // The released host resources are freed by cleanup batches the mediator staged.
    vmm::run(Some(200));
    let tables = crate::gpu_share::iommu_table_frames();
    let after = mm::frames::stats().allocated - tables;
    info!(
        "gpu restart: frames allocated before {before}, after destroying all {after} (not counting {tables} IOMMU table frames kept for the GPU's domain)"
    );
    if before != after {
        verdict::fail("frames leaked");
    }
    verdict::pass()
}

/// `test=bench-gpu run_ms=N [workload=serial]`: in one run, the native frame rates
/// of the physical GPU driven by the hypervisor alone, then the same frames (640x480
/// full-frame TRANSFER+FLUSH) from the guest through the mediator, measured in steady
/// state (after a warm-up of `warmup_ms`, default 1500); prints the GPU-PV figures
/// as `bench:` lines. The default workload is the stream (`gpu-stream` guest,
/// [`STREAM_DEPTH`] frames in flight, polled); `workload=serial` compares one frame
/// at a time waited for by interrupt (`gpu-serial` guest).
pub fn bench_gpu(bi: &boot_info::BootInfo, native: NativeFps, run_ms: u64) -> ! {
    let serial = bi.option("workload") == Some("serial");
    let warmup_ms = bi
        .option("warmup_ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_500);
    let (native_fps_x10, workload) = if serial {
        (
            native.serial_x10,
            "one frame at a time, waited by interrupt",
        )
    } else {
        (native.stream_x10, "4 frames in flight, completions polled")
    };
    vmm::create_all();
    vmm::run(Some(warmup_ms));
    let snapshot = || {
        let f = crate::gpu_share::figures(0).unwrap_or_default();
        let exits = vmm::with_vm(0, |vm| vm.stats.exits).unwrap_or(0);
        (crate::apic::now_us(), f, exits)
    };
    let (t0, f0, exits0) = snapshot();
    // The same windows as the native measurement: the best one counts.
    let mut rates = alloc::vec::Vec::new();
    let mut last = (t0, f0.completed);
    for _ in 0..WINDOWS {
        vmm::run(Some(run_ms / WINDOWS));
        let (t, f, _) = snapshot();
        rates.push((f.completed - last.1) / 2 * 10_000_000 / (t - last.0).max(1));
        last = (t, f.completed);
    }
    let (t1, f1, exits1) = snapshot();
    let (best_x10, median_x10) = best_and_median(&mut rates);
    vmm::report();
    if vmm::state(0) != Some(crate::vm::VmState::Running) {
        verdict::fail("the benchmark guest stopped");
    }
    let elapsed_us = (t1 - t0).max(1);
    let completed = f1.completed - f0.completed;
    let commands = f1.commands - f0.commands;
    let exits = exits1 - exits0;
    let interrupts = f1.interrupts - f0.interrupts;
    let batches = f1.batches - f0.batches;
    let frames = completed / 2;
    if frames == 0 {
        verdict::fail("no frame completed in the measured window");
    }
    let fps_x10 = frames * 10_000_000 / elapsed_us;
    info!("bench: workload: {workload}");
    info!(
        "bench: native fps: {}.{} (hypervisor alone, same frames; best of {WINDOWS} windows)",
        native_fps_x10 / 10,
        native_fps_x10 % 10
    );
    info!(
        "bench: mediated fps: {}.{} (best of {WINDOWS} windows; median {}.{}; {frames} frames in {elapsed_us} us = {}.{} overall)",
        best_x10 / 10,
        best_x10 % 10,
        median_x10 / 10,
        median_x10 % 10,
        fps_x10 / 10,
        fps_x10 % 10
    );
    let pct_x10 = best_x10 * 1000 / native_fps_x10.max(1);
    info!(
        "bench: % of native: {}.{}% (best window against best window)",
        pct_x10 / 10,
        pct_x10 % 10
    );
    let cmds = commands.max(1);
    info!(
        "bench: VM exits per command: {}.{:03} ({exits} exits, {commands} commands)",
        exits / cmds,
        exits * 1000 / cmds % 1000,
    );
    info!(
        "bench: virtual interrupts per completion batch: {}.{:02} ({interrupts} interrupts, {batches} batches)",
        interrupts / batches.max(1),
        interrupts * 100 / batches.max(1) % 100,
    );
    let samples = f1.take_to_submit_samples - f0.take_to_submit_samples;
    info!(
        "bench: commands taken off the guest ring to their batch's physical submission: {} us on average per batch ({samples} batches; taken by doorbell or poll)",
        (f1.take_to_submit_us - f0.take_to_submit_us) / samples.max(1),
    );
    info!(
        "bench: commands per second through the mediator: {}",
        commands * 1_000_000 / elapsed_us
    );
    verdict::pass()
}

/// `test=gpu-share run_ms=N [warmup_ms=M]`: the configured VMs (guests that keep
/// the GPU saturated, with different weights) run; in steady state each VM's
/// measured GPU time (its batches, submission to completion) as a share of all of
/// it must match its weight share within the stride-scheduling bound that the
/// `gpu-pv` simulation asserts: `|share_i - w_i| <= (Q_i + sum(Q) * w_i + 2 max(Q)) / T`
/// with `Q` the longest GPU slice each VM was measured to take in the window and `T`
/// the window, capped at `gpu_pv::sched::MAX_SHARE_ERROR_PPM` (see
/// `gpu_pv::sched::share_within_bound`). In the fixed modes (equal-share,
/// fixed-share) a VM's share is of the window instead, and it must stay at most its
/// weight share plus the bound: a VM without work keeps its slots idle, so nobody
/// takes more than their own.
pub fn gpu_share(bi: &boot_info::BootInfo, run_ms: u64) -> ! {
    use alloc::vec::Vec;

    let warmup_ms = bi
        .option("warmup_ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_500);
    let n = vmm::create_all();
    if n == 0 {
        verdict::fail("no VM");
    }
    vmm::run(Some(warmup_ms));
    // Everything below is measured over the window only, warm-up excluded.
    crate::gpu_share::reset_longest_slices();
    let busy = |i: usize| crate::gpu_share::figures(i as u16).map_or(0, |f| f.gpu_busy_us);
    let slices =
        |i: usize| crate::gpu_share::figures(i as u16).map_or((0, 0), |f| (f.slices, f.overruns));
    let before: Vec<u64> = (0..n).map(busy).collect();
    let slices_before: Vec<(u64, u64)> = (0..n).map(slices).collect();
    let t0 = crate::apic::now_us();
    vmm::run(Some(run_ms));
    let window_us = (crate::apic::now_us() - t0).max(1);
    vmm::report();
    let used: Vec<u64> = (0..n).map(|i| busy(i) - before[i]).collect();
    // The fixed modes hold each VM's slots for it: its share is of the window, and
    // an idle VM's slots stay idle.
    use boot_info::config::SchedMode;
    let mode = SchedMode::from_code(bi.gpu_sched_mode).unwrap_or(SchedMode::BestEffort);
    let (fixed, equal) = (mode != SchedMode::BestEffort, mode == SchedMode::EqualShare);
    let busy_total: u64 = used.iter().sum::<u64>().max(1);
    let total = if fixed { window_us } else { busy_total };
    let weights: Vec<u64> = (0..n)
        .map(|i| {
            if equal {
                1
            } else {
                vmm::with_vm(i, |vm| u64::from(vm.weight)).unwrap_or(0)
            }
        })
        .collect();
    let total_w: u64 = weights.iter().sum::<u64>().max(1);
    let q: Vec<u64> = (0..n)
        .map(|i| crate::gpu_share::figures(i as u16).map_or(0, |f| f.max_slice_us))
        .collect();
    let (sum_q, max_q) = (q.iter().sum::<u64>(), q.iter().copied().max().unwrap_or(0));
    info!(
        "gpu share: {n} VMs, mode {}, GPU busy {}.{}% of {window_us} us",
        match mode {
            SchedMode::BestEffort => "best-effort",
            SchedMode::EqualShare => "equal-share",
            SchedMode::FixedShare => "fixed-share",
        },
        busy_total * 100 / window_us,
        busy_total * 1000 / window_us % 10
    );
    let mut ok = true;
    for i in 0..n {
        // Per million, to keep to integers.
        let share = used[i] * 1_000_000 / total;
        let ws = weights[i] * 1_000_000 / total_w;
        // The stride-scheduling bound from the slices measured in the window, capped:
        // a scheduler whose slices overrun must not widen its own tolerance.
        let (tol, mut within) =
            gpu_pv::sched::share_within_bound(share, ws, q[i], sum_q, max_q, window_us);
        if fixed {
            // A VM may leave its slots idle, never take another's.
            within = share <= ws + tol;
        }
        ok &= within && vmm::state(i) == Some(crate::vm::VmState::Running);
        let (s1, o1) = slices(i);
        let (s0, o0) = slices_before[i];
        info!(
            "gpu share vm{i}: weight {} = {}.{:02}%, measured {}.{:02}% of the {}, bound {}{}.{:02}% (longest slice {} us; {} of {} slices over their quantum): {}",
            weights[i],
            ws / 10_000,
            ws / 100 % 100,
            share / 10_000,
            share / 100 % 100,
            if fixed { "window" } else { "GPU time" },
            if fixed { "+" } else { "+-" },
            tol / 10_000,
            tol / 100 % 100,
            q[i],
            o1 - o0,
            s1 - s0,
            if within { "within" } else { "OUTSIDE" }
        );
    }
    if !ok {
        verdict::fail("GPU shares outside the bound, or a VM stopped");
    }
    info!("gpu shares follow the weights");
    verdict::pass()
}

/// `test=bench-hostile`: VM 0 draws; every other VM is hostile. In alternating
/// windows of `window_ms` the hostile VMs are destroyed (VM 0 alone) or created
/// afresh (each attack starts over), three of each. Prints VM 0's completed GPU
/// commands per second in each kind of window, their ratio (median over the rounds)
/// and the longest hold of the GPU-PV lock with and without the hostile VMs.
pub fn bench_hostile(window_ms: u64) -> ! {
    const ROUNDS: usize = 3;
    vmm::create_all();
    vmm::run(Some(1_500)); // warm-up: VM 0's driver up and drawing
    let hostile = 1..vmm::slot_count();
    let completed = || crate::gpu_share::figures(0).map_or(0, |f| f.completed);
    let mut alone = alloc::vec::Vec::new();
    let mut with = alloc::vec::Vec::new();
    let mut gpu_share = alloc::vec::Vec::new();
    let (mut hold_alone, mut hold_with) = ((0, 0, 0), (0, 0, 0));
    for _ in 0..ROUNDS {
        for slot in hostile.clone() {
            vmm::destroy(slot);
        }
        crate::gpu_share::longest_lock_hold(true);
        let (c0, t0) = (completed(), crate::apic::now_us());
        vmm::run(Some(window_ms));
        let rate = (completed() - c0) * 1_000_000 / crate::apic::now_us().saturating_sub(t0).max(1);
        alone.push(rate);
        hold_alone = hold_alone.max(crate::gpu_share::longest_lock_hold(true));
        for slot in hostile.clone() {
            if let Err(e) = vmm::create(slot) {
                error!("bench-hostile: cannot create VM {slot}: {e}");
                verdict::fail("create");
            }
        }
        let (c0, t0) = (completed(), crate::apic::now_us());
        let cpu = |i| vmm::with_vm(i, |vm| vm.stats.cpu_us).unwrap_or(0);
        let cpu_before: alloc::vec::Vec<u64> = (0..vmm::slot_count()).map(cpu).collect();
        let gpu = |i: usize| crate::gpu_share::figures(i as u16).map_or(0, |f| f.gpu_busy_us);
        let gpu_before: alloc::vec::Vec<u64> = (0..vmm::slot_count()).map(gpu).collect();
        vmm::run(Some(window_ms));
        let gpu_used: alloc::vec::Vec<u64> = (0..vmm::slot_count())
            .map(|i| gpu(i).saturating_sub(gpu_before[i]))
            .collect();
        let total: u64 = gpu_used.iter().sum();
        gpu_share.push(gpu_used[0] * 1000 / total.max(1));
        let rate = (completed() - c0) * 1_000_000 / crate::apic::now_us().saturating_sub(t0).max(1);
        with.push(rate);
        let cpu_used: alloc::vec::Vec<u64> = (0..vmm::slot_count())
            .map(|i| cpu(i).saturating_sub(cpu_before[i]) / 1000)
            .collect();
        info!(
            "bench-hostile: window with the hostile VMs: CPU ms per VM {cpu_used:?} in {} ms",
            crate::apic::now_us().saturating_sub(t0) / 1000
        );
        hold_with = hold_with.max(crate::gpu_share::longest_lock_hold(true));
    }
    vmm::report();
    let mut ratios: alloc::vec::Vec<u64> = alone
        .iter()
        .zip(&with)
        .map(|(&a, &w)| w * 1000 / a.max(1))
        .collect();
    ratios.sort_unstable();
    let median = ratios[ratios.len() / 2];
    info!("bench: hostile: neighbour GPU commands per second alone {alone:?}, with the hostile VMs {with:?}");
    info!(
        "bench: hostile: neighbour rate with the hostile VMs / alone: {}.{} % (median of {ROUNDS} rounds; {}.{}-{}.{} %)",
        median / 10,
        median % 10,
        ratios[0] / 10,
        ratios[0] % 10,
        ratios[ratios.len() - 1] / 10,
        ratios[ratios.len() - 1] % 10
    );
    gpu_share.sort_unstable();
    let n = vmm::slot_count().max(1) as u64;
    info!(
        "bench: hostile: neighbour share of the GPU time with the hostile VMs: {}.{} % (median; {}.{}-{}.{} %; equal weights give {}.{} %)",
        gpu_share[ROUNDS / 2] / 10,
        gpu_share[ROUNDS / 2] % 10,
        gpu_share[0] / 10,
        gpu_share[0] % 10,
        gpu_share[ROUNDS - 1] / 10,
        gpu_share[ROUNDS - 1] % 10,
        1000 / n / 10,
        1000 / n % 10
    );
    info!(
        "bench: hostile: longest GPU-PV lock hold: {} us with the hostile VMs (gpu_share line {}), {} us alone (line {}); longest GPU notify (made after the lock is released): {} us with, {} us alone",
        hold_with.0, hold_with.1, hold_alone.0, hold_alone.1, hold_with.2, hold_alone.2
    );
    verdict::pass()
}

/// `test=gpu-destroy`: the GPU VMs draw; VM 0 is destroyed for good. Its cleanup
/// (its scanout disabled, its resources unref'd) must run on the GPU although the VM
/// is gone; the scenario checks its head in the pixels while the others draw on.
pub fn gpu_destroy() -> ! {
    vmm::create_all();
    vmm::run(Some(3_000));
    info!("gpu destroy: destroying VM 0");
    vmm::destroy(0);
    vmm::run(Some(1_000));
    info!("gpu destroy: VM 0 gone for 1 s");
    vmm::run(Some(4_000));
    vmm::report();
    verdict::pass()
}
