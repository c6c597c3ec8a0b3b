//! What every GPU test guest does: bring the device up, learn the display, put a
//! framebuffer (and a cursor) on scanout 0 and present animated frames of the VM's
//! [`Pattern`]. Lines are printed as `<prog> <vm name>: ...`.

use alloc::string::String;

use super::display::{self, Framebuffer};
use super::{parse_edid, response_name, Error, VirtioGpu};
use crate::boot_info::BootInfo;
use crate::gfx::Pattern;
use crate::{exit, hypercall, println};
use gpu_pv::command::Request;
use gpu_pv::wire::format;
use gpu_pv::wire::{self, CtrlHdr};

/// The framebuffer's resource id (the first one a guest creates).
pub const FB_RESOURCE: u32 = 1;
/// The cursor image's resource id.
pub const CURSOR_RESOURCE: u32 = 2;
/// The other cursor image's resource id (see [`App::swap_cursor`]).
pub const CURSOR_RESOURCE_ALT: u32 = 3;

/// A GPU guest's display.
pub struct App {
    /// The driver.
    pub gpu: VirtioGpu,
    /// `<prog> <vm name>`, the prefix of every line.
    pub tag: String,
    /// VM id.
    pub vm_id: u32,
    /// Scanout 0's width.
    pub width: u32,
    /// Scanout 0's height.
    pub height: u32,
    /// In [`stream`](Self::stream) with polling: give up the vCPU's slice (YIELD)
    /// when the queue is full and nothing came back, instead of spinning.
    pub yield_when_waiting: bool,
    /// The framebuffer (allocated by [`setup`](Self::setup)).
    pub fb: Option<Framebuffer>,
    /// The cursor image, if [`setup`](Self::setup) was asked for one.
    pub cursor: Option<Framebuffer>,
    /// The cursor image not in use (its resource released), kept for reuse.
    pub cursor_spare: Option<Framebuffer>,
    /// The pattern.
    pub pattern: Pattern,
    /// Frames presented.
    pub frame: u64,
}

impl App {
    /// Probes and initialises the GPU, reads scanout 0's size (`GET_DISPLAY_INFO`)
    /// and its EDID (`GET_EDID`, when negotiated), and prints
    /// `<prog> <name>: <w>x<h> on scanout 0, protocol <rev>, features 0x...`.
    pub fn start(prog: &str, info: &BootInfo, verbose: bool) -> Result<App, Error> {
        let tag = alloc::format!("{prog} {}", info.name());
        let mut gpu = VirtioGpu::probe(verbose)?;
        let modes = gpu.display_info()?;
        let (rect, enabled) = modes.first().copied().ok_or(Error::NoScanout)?;
        if !enabled || rect.width == 0 || rect.height == 0 {
            println!(
                "{tag}: GET_DISPLAY_INFO: {} scanout(s), scanout 0 is {}x{}+{}+{} {}",
                modes.len(),
                rect.width,
                rect.height,
                rect.x,
                rect.y,
                if enabled { "enabled" } else { "disabled" }
            );
            return Err(Error::NoScanout);
        }
        println!(
            "{tag}: {}x{} on scanout 0, protocol {}, features {:#x}",
            rect.width,
            rect.height,
            gpu.revision_name(),
            gpu.features()
        );
        if gpu.has(gpu_pv::wire::feature::GPU_EDID) {
            let edid = gpu.edid(0)?;
            match parse_edid(&edid) {
                Some(e) => println!(
                    "{tag}: EDID {} bytes, preferred mode {}x{}, monitor \"{}\", checksum {}",
                    edid.len(),
                    e.width,
                    e.height,
                    e.name,
                    if e.checksum_ok { "ok" } else { "BAD" }
                ),
                None => println!("{tag}: EDID of {} bytes does not parse", edid.len()),
            }
        }
        Ok(App {
            gpu,
            tag,
            vm_id: info.vm_id,
            width: rect.width,
            height: rect.height,
            fb: None,
            cursor: None,
            cursor_spare: None,
            pattern: Pattern::new(info.vm_id, rect.width, rect.height),
            yield_when_waiting: false,
            frame: 0,
        })
    }

    /// Allocates the framebuffer (once), creates its B8G8R8X8 resource, attaches the
    /// pages and sets scanout 0 to it; with `cursor`, also the cursor.
    pub fn setup(&mut self, cursor: bool) -> Result<(), Error> {
        let fb = match self.fb {
            Some(fb) => fb,
            None => {
                let fb = Framebuffer::alloc(
                    FB_RESOURCE,
                    format::B8G8R8X8_UNORM,
                    self.width,
                    self.height,
                )?;
                self.fb = Some(fb);
                fb
            }
        };
        display::show(&mut self.gpu, &fb, 0)?;
        if cursor {
            let mut img = match self.cursor {
                Some(c) => c,
                None => display::cursor_image(CURSOR_RESOURCE)?,
            };
            display::setup_cursor(&mut self.gpu, &mut img, self.width / 2, self.height / 2)?;
            self.cursor = Some(img);
        }
        Ok(())
    }

    /// Draws the next frame and presents it (transfer + fenced flush, one notify),
    /// and moves the cursor if there is one.
    pub fn frame(&mut self) -> Result<(), Error> {
        let mut fb = self.fb.ok_or(Error::NoScanout)?;
        self.pattern.draw(fb.pixels(), self.frame);
        display::present(&mut self.gpu, &fb, true)?;
        if self.cursor.is_some() {
            let (x, y) = self.cursor_xy();
            display::move_cursor(&mut self.gpu, x, y)?;
        }
        self.frame += 1;
        Ok(())
    }

    /// Replaces the cursor image by a new resource (ids 2 and 3 alternate), as
    /// Linux's cursor plane does on a cursor change: create, attach, fenced
    /// transfer, `UPDATE_CURSOR`; once the cursor queue took it, `RESOURCE_UNREF` of
    /// the old image. Returns (new id, released id).
    pub fn swap_cursor(&mut self) -> Result<(u32, u32), Error> {
        let old = self.cursor.ok_or(Error::NoScanout)?;
        let id = if old.resource_id == CURSOR_RESOURCE {
            CURSOR_RESOURCE_ALT
        } else {
            CURSOR_RESOURCE
        };
        let mut img = match self.cursor_spare.take() {
            Some(c) if c.resource_id == id => c,
            _ => display::cursor_image(id)?,
        };
        let (x, y) = self.cursor_xy();
        display::setup_cursor(&mut self.gpu, &mut img, x, y)?;
        self.cursor = Some(img);
        self.gpu.wait_idle()?;
        display::release(&mut self.gpu, &old)?;
        self.cursor_spare = Some(old);
        Ok((id, old.resource_id))
    }

    fn cursor_xy(&self) -> (u32, u32) {
        let t = self.frame as u32;
        (
            t.wrapping_mul(5) % self.width.max(1),
            t.wrapping_mul(3) % self.height.max(1),
        )
    }

    /// Resets the device and sets the display up again (the resources died with
    /// the reset; the framebuffer's pixels did not).
    pub fn restart(&mut self) -> Result<(), Error> {
        self.gpu.init()?;
        // Every resource died with the reset; set up the cursor image in use again.
        let had_cursor = self.cursor.is_some();
        self.setup(had_cursor)
    }

    /// Presents frames forever, printing `<tag>: frame <n>` every 10 frames and the
    /// driver statistics every 100. A device that asks for a reset is reset and set
    /// up again; any other error prints `<tag>: error: ...` and stops the VM with
    /// [`exit::FAILED`].
    pub fn run_forever(&mut self) -> ! {
        loop {
            match self.frame() {
                Ok(()) => {
                    if self.frame.is_multiple_of(10) {
                        println!("{}: frame {}", self.tag, self.frame);
                    }
                    if self.frame.is_multiple_of(100) {
                        println!("{}", self.stats_line());
                        if self.cursor.is_some() {
                            match self.swap_cursor() {
                                Ok((new, old)) => println!(
                                    "{}: cursor image now resource {new}, resource {old} released",
                                    self.tag
                                ),
                                Err(e @ Error::NeedsReset { .. }) => {
                                    println!("{}: {e}; resetting the device", self.tag);
                                    if let Err(e) = self.restart() {
                                        self.fail(&e);
                                    }
                                }
                                Err(e) => self.fail(&e),
                            }
                        }
                    }
                }
                Err(e @ Error::NeedsReset { .. }) => {
                    println!("{}: {e}; resetting the device", self.tag);
                    if let Err(e) = self.restart() {
                        self.fail(&e);
                    }
                }
                Err(e) => self.fail(&e),
            }
        }
    }

    /// The benchmark workload, forever: the pattern drawn once, then full-frame
    /// TRANSFER_TO_HOST_2D + fenced RESOURCE_FLUSH pairs kept `depth` frames deep.
    /// `polled`: completions are taken from the used ring without interrupts or
    /// halts (and the guest's tick is stopped); otherwise each frame is waited for
    /// by interrupt. Kicks follow the device's event index. Prints `<tag>: <n>
    /// frames` every `report_every` frames; any error stops the VM.
    pub fn stream(&mut self, depth: usize, polled: bool, report_every: u64) -> ! {
        use super::{fenced, plain, Ticket};
        use alloc::collections::VecDeque;

        let Some(mut fb) = self.fb else {
            self.fail(&Error::NoScanout)
        };
        self.pattern.draw(fb.pixels(), 0);
        println!(
            "{}: streaming {}x{}, {depth} frame(s) deep, completions {}",
            self.tag,
            self.width,
            self.height,
            if polled { "polled" } else { "by interrupt" }
        );
        if polled {
            crate::timer::stop();
        }
        let depth = depth.max(1);
        // (transfer, flush) tickets of the frames on the queue, oldest first.
        let mut in_flight: VecDeque<(Ticket, Ticket)> = VecDeque::new();
        let mut frames = 0u64;
        loop {
            let r = (|| -> Result<(), Error> {
                while in_flight.len() < depth {
                    let transfer = self.gpu.submit(&plain(fb.transfer_cmd()))?;
                    let fence = self.gpu.next_fence();
                    let flush = self.gpu.submit(&fenced(fb.flush_cmd(), fence))?;
                    in_flight.push_back((transfer, flush));
                    self.gpu.kick(0)?;
                }
                if polled && self.gpu.poll()? == 0 && self.yield_when_waiting {
                    // Nothing came back and the queue is full: the CPU is better
                    // spent by other VMs until the next slice.
                    hypercall::yield_now();
                }
                while let Some(&(transfer, flush)) = in_flight.front() {
                    if polled && !(self.gpu.is_done(transfer) && self.gpu.is_done(flush)) {
                        break;
                    }
                    in_flight.pop_front();
                    for t in [transfer, flush] {
                        let c = self.gpu.wait(t)?;
                        if c.hdr.type_ != wire::RESP_OK_NODATA {
                            println!(
                                "{}: frame {frames}: answered {}",
                                self.tag,
                                response_name(c.hdr.type_)
                            );
                            hypercall::shutdown(exit::FAILED)
                        }
                    }
                    frames += 1;
                    if frames.is_multiple_of(report_every.max(1)) {
                        // One exit for the line (CONSOLE_WRITE), not one per byte.
                        let line = alloc::format!("{}: {frames} frames\n", self.tag);
                        hypercall::console_write(line.as_bytes());
                    }
                }
                Ok(())
            })();
            if let Err(e) = r {
                self.fail(&e);
            }
        }
    }

    /// Prints `<tag>: error: <e>` and stops the VM with [`exit::FAILED`].
    pub fn fail(&self, e: &Error) -> ! {
        println!("{}: error: {e}", self.tag);
        hypercall::shutdown(exit::FAILED)
    }

    /// Sends `req` alone (one notify), waits for its answer and prints
    /// `<tag>: <step>: got <RESPONSE> (<type>), as expected` when it is `want`, or
    /// `<tag>: <step>: got <RESPONSE> (<type>), expected <WANT>` otherwise. Returns
    /// the response header when the answer was `want`; a driver error (timeout, reset)
    /// stops the VM.
    pub fn expect_response(&mut self, step: &str, req: &Request, want: u32) -> Option<CtrlHdr> {
        match self.gpu.call(req) {
            Ok(c) => {
                let t = c.hdr.type_;
                let fence = if c.hdr.flags & wire::FLAG_FENCE != 0 {
                    alloc::format!(", fence {} echoed", c.hdr.fence_id)
                } else {
                    String::new()
                };
                if t == want {
                    println!(
                        "{}: {step}: got {} ({t:#x}){fence}, as expected",
                        self.tag,
                        response_name(t)
                    );
                    Some(c.hdr)
                } else {
                    println!(
                        "{}: {step}: got {} ({t:#x}){fence}, expected {} ({want:#x})",
                        self.tag,
                        response_name(t),
                        response_name(want)
                    );
                    None
                }
            }
            Err(e) => self.fail(&e),
        }
    }

    /// FNV-1a of the framebuffer's bytes (0 without one).
    pub fn checksum(&self) -> u64 {
        self.fb.map_or(0, |fb| crate::gfx::fnv1a(fb.bytes()))
    }

    /// One line of driver statistics.
    pub fn stats_line(&self) -> String {
        let (cfg, ctl, cur) = self.gpu.interrupts();
        let s = &self.gpu.stats;
        alloc::format!(
            "{}: {} commands + {} cursor, {} notifies ({} suppressed by event idx), interrupts config {cfg} control {ctl} cursor {cur}, {} halts, {} completions seen without an interrupt",
            self.tag,
            s.commands,
            s.cursor_commands,
            s.notifies,
            s.notifies_suppressed,
            s.halts,
            s.found_without_interrupt
        )
    }
}
