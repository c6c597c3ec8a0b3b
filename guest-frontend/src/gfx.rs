//! The test pattern the GPU guests draw: a solid background whose colour comes from
//! the VM id (`abi::guest::vm_color`, which screendump checks look for), a row of
//! marker squares counting the VM id + 1 (so two VMs can be told apart on a
//! screenshot even with similar colours), a row of small cells showing the frame
//! number in binary, and a vertical bar that moves across the screen, 8 pixels per
//! frame. Pixels are B8G8R8X8 (`0x00RRGGBB` as a little-endian `u32`).
//!
//! The bar alone repeats itself (every 77 frames on a 640-pixel screen: at 38.5
//! frames a second, two screenshots 2 s apart are identical); the frame number makes
//! any two frames differ, so "the picture changed" means "frames were shown".
//!
//! Frames after the first only repaint the columns the bar left and entered, so a
//! frame costs little guest CPU; the picture is the same as a full repaint.

use crate::abi::guest::vm_color;

/// The bar's colour.
pub const BAR: u32 = 0x00f0_f0e0;
/// The marker squares' colour.
pub const MARKER: u32 = 0x00ff_d000;
/// Bar width in pixels.
pub const BAR_WIDTH: u32 = 24;
/// Pixels the bar moves per frame.
pub const BAR_STEP: u32 = 8;
/// Bits of the frame number shown, low bit first, each a cell of [`CELL`] pixels
/// ([`MARKER`] for 1, background for 0) every [`CELL`] + 2 pixels, below the markers.
pub const COUNTER_BITS: usize = 24;
/// Side of a frame-number cell in pixels.
pub const CELL: usize = 6;
const COUNTER_Y: usize = 32;

/// The background colour of VM `vm_id`: [`vm_color`], the colour a test harness
/// looks for on the VM's scanout.
pub fn background(vm_id: u32) -> u32 {
    vm_color(vm_id)
}

/// The animated pattern of one VM on one framebuffer.
#[derive(Clone, Copy, Debug)]
pub struct Pattern {
    /// VM id (picks the background and the marker count).
    pub vm_id: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Where the bar was drawn last (its left column), if the frame was painted.
    last_bar: Option<u32>,
}

impl Pattern {
    /// A pattern for VM `vm_id` on a `width` x `height` framebuffer.
    pub fn new(vm_id: u32, width: u32, height: u32) -> Self {
        Self {
            vm_id,
            width,
            height,
            last_bar: None,
        }
    }

    /// The bar's left column in frame `frame`.
    pub fn bar_x(&self, frame: u64) -> u32 {
        let span = self.width.saturating_sub(BAR_WIDTH).max(1);
        ((frame * u64::from(BAR_STEP)) % u64::from(span)) as u32
    }

    /// Paints frame `frame` into `px` (`width * height` pixels, row by row).
    pub fn draw(&mut self, px: &mut [u32], frame: u64) {
        let (w, h) = (self.width as usize, self.height as usize);
        if px.len() < w * h || w == 0 || h == 0 {
            return;
        }
        let bg = background(self.vm_id);
        let bar = self.bar_x(frame) as usize;
        let bar_end = (bar + BAR_WIDTH as usize).min(w);
        match self.last_bar {
            None => {
                for y in 0..h {
                    let row = &mut px[y * w..(y + 1) * w];
                    row.fill(bg);
                    row[bar..bar_end].fill(BAR);
                }
            }
            Some(old) => {
                let old = old as usize;
                let old_end = (old + BAR_WIDTH as usize).min(w);
                for y in 0..h {
                    let row = &mut px[y * w..(y + 1) * w];
                    row[old..old_end].fill(bg);
                    row[bar..bar_end].fill(BAR);
                }
            }
        }
        self.markers(px);
        self.counter(px, frame, bg);
        self.last_bar = Some(bar as u32);
    }

    /// The marker squares (16x16, 8 apart) in the top-left corner: VM id + 1 of
    /// them, at most 16.
    fn markers(&self, px: &mut [u32]) {
        let w = self.width as usize;
        let n = (self.vm_id as usize + 1).min(16);
        for i in 0..n {
            let x0 = 8 + i * 24;
            if x0 + 16 > w || 24 > self.height as usize {
                break;
            }
            for y in 8..24 {
                px[y * w + x0..y * w + x0 + 16].fill(MARKER);
            }
        }
    }
}

impl Pattern {
    /// The frame number's cells (see [`COUNTER_BITS`]), as far as the screen has
    /// room; the bar, drawn before, may be overwritten where it crosses them.
    fn counter(&self, px: &mut [u32], frame: u64, bg: u32) {
        let (w, h) = (self.width as usize, self.height as usize);
        if COUNTER_Y + CELL > h {
            return;
        }
        for bit in 0..COUNTER_BITS {
            let x0 = 8 + bit * (CELL + 2);
            if x0 + CELL > w {
                break;
            }
            let c = if frame >> bit & 1 != 0 { MARKER } else { bg };
            for y in COUNTER_Y..COUNTER_Y + CELL {
                px[y * w + x0..y * w + x0 + CELL].fill(c);
            }
        }
    }
}

/// 64-bit FNV-1a of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
