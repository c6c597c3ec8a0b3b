//! Framebuffers on the virtio-gpu: a 2D resource backed by guest RAM, shown on a
//! scanout and presented with `TRANSFER_TO_HOST_2D` + `RESOURCE_FLUSH`, and a
//! 64x64 hardware cursor; the command batches Linux's framebuffer code sends.

use alloc::vec::Vec;

use gpu_pv::command::Command;
use gpu_pv::memory::Gpa;
use gpu_pv::wire::{self, format, Rect};

use super::{
    backing_entries, cursor_pos, fenced, full_rect, plain, Error, VirtioGpu, CONTROL_QUEUE,
};
use crate::dma;

/// Largest backing entry this driver sends (the framebuffer is contiguous; it is
/// still split into a few entries, as Linux's scatter lists are).
pub const MAX_BACKING_ENTRY: u64 = 512 * 1024;

/// A 32-bit-per-pixel image in guest RAM, and the resource it backs.
#[derive(Clone, Copy, Debug)]
pub struct Framebuffer {
    /// Resource id (the guest's name for it).
    pub resource_id: u32,
    /// Pixel format (`wire::format`).
    pub format: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Guest-physical address of the pixels (stride = width * 4).
    pub addr: Gpa,
}

impl Framebuffer {
    /// Allocates zeroed guest RAM for a `width` x `height` image.
    pub fn alloc(resource_id: u32, format: u32, width: u32, height: u32) -> Result<Self, Error> {
        let bytes = u64::from(width) * u64::from(height) * 4;
        let addr = dma::alloc_pages(bytes.div_ceil(dma::PAGE_SIZE)).ok_or(Error::OutOfMemory)?;
        Ok(Self {
            resource_id,
            format,
            width,
            height,
            addr,
        })
    }

    /// Bytes of the image.
    pub fn len(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height) * 4
    }

    /// Whether the image is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per row.
    pub fn stride(&self) -> u32 {
        self.width * 4
    }

    /// The pixels, row by row.
    pub fn pixels(&mut self) -> &mut [u32] {
        // SAFETY: `addr` is page-aligned guest RAM of `len()` bytes that `alloc` took
        // for this framebuffer alone (identity mapped); the device only reads it.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.addr.get() as *mut u32,
                (self.width * self.height) as usize,
            )
        }
    }

    /// The image as bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: as in `pixels`.
        unsafe { core::slice::from_raw_parts(self.addr.get() as *const u8, self.len() as usize) }
    }

    /// The whole image as a rectangle.
    pub fn rect(&self) -> Rect {
        full_rect(self.width, self.height)
    }

    /// `RESOURCE_CREATE_2D` of this image's size and format.
    pub fn create_cmd(&self) -> Command {
        Command::ResourceCreate2d {
            resource_id: self.resource_id,
            format: self.format,
            width: self.width,
            height: self.height,
        }
    }

    /// `RESOURCE_ATTACH_BACKING` of this image's pages.
    pub fn attach_cmd(&self) -> Command {
        Command::ResourceAttachBacking {
            resource_id: self.resource_id,
            entries: backing_entries(self.addr, self.len(), MAX_BACKING_ENTRY),
        }
    }

    /// `TRANSFER_TO_HOST_2D` of the whole image.
    pub fn transfer_cmd(&self) -> Command {
        Command::TransferToHost2d {
            rect: self.rect(),
            offset: 0,
            resource_id: self.resource_id,
        }
    }

    /// `RESOURCE_FLUSH` of the whole image.
    pub fn flush_cmd(&self) -> Command {
        Command::ResourceFlush {
            rect: self.rect(),
            resource_id: self.resource_id,
        }
    }
}

/// Queues `cmds` as one batch, notifies once and checks every response is
/// `OK_NODATA` (fenced ones with their fence).
pub fn batch(gpu: &mut VirtioGpu, cmds: Vec<(Command, bool)>) -> Result<(), Error> {
    let mut tickets = Vec::with_capacity(cmds.len());
    for (cmd, fence) in cmds {
        let req = if fence {
            let f = gpu.next_fence();
            fenced(cmd, f)
        } else {
            plain(cmd)
        };
        tickets.push(gpu.submit(&req)?);
    }
    gpu.kick(CONTROL_QUEUE)?;
    let mut first_err = None;
    for t in tickets {
        if let Err(e) = gpu.expect(t, wire::RESP_OK_NODATA) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Creates `fb`'s resource, attaches its pages and shows it on `scanout`: one batch
/// (three commands, one notify).
pub fn show(gpu: &mut VirtioGpu, fb: &Framebuffer, scanout: u32) -> Result<(), Error> {
    batch(
        gpu,
        alloc::vec![
            (fb.create_cmd(), false),
            (fb.attach_cmd(), false),
            (
                Command::SetScanout {
                    rect: fb.rect(),
                    scanout_id: scanout,
                    resource_id: fb.resource_id,
                },
                false
            ),
        ],
    )
}

/// Presents the whole of `fb`: `TRANSFER_TO_HOST_2D` then `RESOURCE_FLUSH` (fenced
/// when `fence`), one notify, both responses checked.
pub fn present(gpu: &mut VirtioGpu, fb: &Framebuffer, fence: bool) -> Result<(), Error> {
    batch(
        gpu,
        alloc::vec![(fb.transfer_cmd(), false), (fb.flush_cmd(), fence)],
    )
}

/// Releases `fb`'s resource (`RESOURCE_UNREF` also detaches its backing).
pub fn release(gpu: &mut VirtioGpu, fb: &Framebuffer) -> Result<(), Error> {
    batch(
        gpu,
        alloc::vec![(
            Command::ResourceUnref {
                resource_id: fb.resource_id
            },
            false
        )],
    )
}

/// Cursor image edge in pixels (what virtio-gpu devices accept).
pub const CURSOR_SIZE: u32 = 64;

/// Sets up a 64x64 arrow cursor as resource `resource_id` (in `image`, which must be
/// 64x64 B8G8R8A8), as Linux's cursor plane does: create, attach, transfer with a
/// fence and wait for it, then `UPDATE_CURSOR` on the cursor queue at (`x`, `y`).
pub fn setup_cursor(
    gpu: &mut VirtioGpu,
    image: &mut Framebuffer,
    x: u32,
    y: u32,
) -> Result<(), Error> {
    draw_arrow(image);
    batch(
        gpu,
        alloc::vec![
            (image.create_cmd(), false),
            (image.attach_cmd(), false),
            (image.transfer_cmd(), true),
        ],
    )?;
    gpu.cursor(Command::UpdateCursor {
        pos: cursor_pos(x, y),
        resource_id: image.resource_id,
        hot_x: 0,
        hot_y: 0,
    })
}

/// A cursor image for [`setup_cursor`].
pub fn cursor_image(resource_id: u32) -> Result<Framebuffer, Error> {
    Framebuffer::alloc(
        resource_id,
        format::B8G8R8A8_UNORM,
        CURSOR_SIZE,
        CURSOR_SIZE,
    )
}

/// Moves the cursor on scanout 0.
pub fn move_cursor(gpu: &mut VirtioGpu, x: u32, y: u32) -> Result<(), Error> {
    gpu.cursor(Command::MoveCursor {
        pos: cursor_pos(x, y),
    })
}

fn draw_arrow(img: &mut Framebuffer) {
    let w = img.width as usize;
    // Even resource ids get a white arrow, odd ones a yellow one.
    let fill = if img.resource_id.is_multiple_of(2) {
        0xffff_ffff
    } else {
        0xffff_d000
    };
    let px = img.pixels();
    for y in 0..CURSOR_SIZE as usize {
        for x in 0..CURSOR_SIZE as usize {
            // An arrow with a black border on a transparent background.
            let inside = x <= y / 2 + 1 && y < 40;
            let edge = inside && (x == 0 || x == y / 2 + 1 || y == 39);
            px[y * w + x] = if edge {
                0xff00_0000
            } else if inside {
                fill
            } else {
                0
            };
        }
    }
}
