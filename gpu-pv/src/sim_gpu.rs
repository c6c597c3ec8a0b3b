//! A simulated virtio-gpu: executes 2D commands into in-memory framebuffers.
//!
//! It stands in for the physical GPU wherever there is none: in host tests, in the
//! many-VM simulation (fairness, latency, isolation, reset) and as a reference
//! model for the mediator's validator. Commands arrive as the mediator hands them
//! to the device, after renaming: resource ids are host ids, and backing entries
//! hold host-physical addresses, read through a [`GuestMemory`] view of host
//! memory addressed by them (see `dma_addr`). Each command has a cost in
//! nanoseconds ([`CostModel`]), which gives the simulation its notion of GPU time.
//!
//! Semantics follow the virtio 1.2 specification (5.7.6) and, where it is silent,
//! QEMU's `virtio-gpu` (the physical device under test): the same checks in the
//! same order and the same `RESP_ERR_*` codes. Two deliberate differences, both
//! stricter: a `TRANSFER_TO_HOST_2D` whose source lies beyond the backing is
//! refused with `ERR_INVALID_PARAMETER` (QEMU copies what there is and succeeds),
//! and cursor commands report errors (QEMU's cursor queue ignores bad ones
//! silently). Pixels are copied as raw 32-bit words, whatever the format.
//!
//! The model must never panic, whatever the input: all arithmetic on guest values
//! is checked, memory is only reached through the view, and allocations are
//! bounded by the VRAM budget and made fallibly.
//!
//! Resource pixels come from a [`PixelAlloc`]: the heap on a host, while the
//! kernel gives them frames of their own (a simulated GPU's VRAM is hypervisor
//! memory, which must not be the kernel's shared heap; the mediator charges it to
//! the VM that created the resource). The kernel also keeps no copy of what each
//! scanout shows ([`SimGpu::set_scanout_images`]): nobody looks at it there.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

use crate::command::{edid_for, Command, Request, Response};
use crate::memory::{Gpa, GuestMemory};
use crate::wire::{self, format, CursorPos, MemEntry, Rect};

/// Bytes per pixel of every 2D format.
pub const BYTES_PER_PIXEL: u32 = 4;
/// Width and height a cursor image must have.
pub const CURSOR_SIZE: u32 = 64;
/// Most entries one `RESOURCE_ATTACH_BACKING` may carry (QEMU's limit).
pub const MAX_BACKING_ENTRIES: usize = 16384;
/// Smallest scanout rectangle edge QEMU accepts in `SET_SCANOUT`.
pub const MIN_SCANOUT_EDGE: u32 = 16;

/// Cost of each command in nanoseconds of GPU time: a base cost per command type,
/// plus a per-byte cost (in picoseconds, so fractions of a nanosecond per byte can
/// be expressed) for commands that move pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CostModel {
    /// `GET_DISPLAY_INFO`.
    pub display_info_ns: u64,
    /// `GET_EDID`.
    pub edid_ns: u64,
    /// `RESOURCE_CREATE_2D`.
    pub create_ns: u64,
    /// `RESOURCE_UNREF`.
    pub unref_ns: u64,
    /// `RESOURCE_ATTACH_BACKING`, before its entries.
    pub attach_ns: u64,
    /// `RESOURCE_ATTACH_BACKING`, per entry.
    pub attach_per_entry_ns: u64,
    /// `RESOURCE_DETACH_BACKING`.
    pub detach_ns: u64,
    /// `SET_SCANOUT`.
    pub set_scanout_ns: u64,
    /// `TRANSFER_TO_HOST_2D`, before its pixels.
    pub transfer_ns: u64,
    /// `TRANSFER_TO_HOST_2D`, per byte of the rectangle.
    pub transfer_ps_per_byte: u64,
    /// `RESOURCE_FLUSH`, before its pixels.
    pub flush_ns: u64,
    /// `RESOURCE_FLUSH`, per byte copied to scanouts.
    pub flush_ps_per_byte: u64,
    /// `UPDATE_CURSOR` and `MOVE_CURSOR`.
    pub cursor_ns: u64,
    /// Any command refused with an error.
    pub error_ns: u64,
}

impl CostModel {
    /// Every command free: for tests that only care about pixels.
    pub const FREE: Self = Self {
        display_info_ns: 0,
        edid_ns: 0,
        create_ns: 0,
        unref_ns: 0,
        attach_ns: 0,
        attach_per_entry_ns: 0,
        detach_ns: 0,
        set_scanout_ns: 0,
        transfer_ns: 0,
        transfer_ps_per_byte: 0,
        flush_ns: 0,
        flush_ps_per_byte: 0,
        cursor_ns: 0,
        error_ns: 0,
    };
}

impl Default for CostModel {
    /// Plausible orders of magnitude for a GPU behind a paravirtual interface, not
    /// measurements: a few microseconds per command, transfers at 10 GB/s and
    /// flushes at 20 GB/s.
    fn default() -> Self {
        Self {
            display_info_ns: 2_000,
            edid_ns: 2_000,
            create_ns: 20_000,
            unref_ns: 5_000,
            attach_ns: 5_000,
            attach_per_entry_ns: 100,
            detach_ns: 3_000,
            set_scanout_ns: 10_000,
            transfer_ns: 5_000,
            transfer_ps_per_byte: 100,
            flush_ns: 5_000,
            flush_ps_per_byte: 50,
            cursor_ns: 2_000,
            error_ns: 1_000,
        }
    }
}

/// A resource's pixels, `width * height` of them, row-major.
pub trait PixelBuf: fmt::Debug + Send {
    /// The pixels.
    fn pixels(&self) -> &[u32];
    /// The pixels, to write.
    fn pixels_mut(&mut self) -> &mut [u32];
}

impl PixelBuf for Vec<u32> {
    fn pixels(&self) -> &[u32] {
        self
    }
    fn pixels_mut(&mut self) -> &mut [u32] {
        self
    }
}

/// Gives `n` zeroed pixels, or `None` when there is no memory for them.
pub type PixelAlloc = fn(n: usize) -> Option<Box<dyn PixelBuf>>;

/// The default [`PixelAlloc`]: the heap, fallibly.
pub fn heap_pixels(n: usize) -> Option<Box<dyn PixelBuf>> {
    let v = alloc_pixels(n as u64).ok()?;
    Some(Box::new(v))
}

/// Configuration of a [`SimGpu`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimGpuConfig {
    /// Each scanout's display mode (width, height), reported by
    /// `GET_DISPLAY_INFO` and `GET_EDID`; 1 to [`wire::MAX_SCANOUTS`] of them.
    pub scanouts: Vec<(u32, u32)>,
    /// Bytes of resource memory; resources beyond it get `ERR_OUT_OF_MEMORY`. The
    /// simulation really allocates it, so it must fit in host memory.
    pub vram_bytes: u64,
    /// Command costs.
    pub cost: CostModel,
}

/// Why a [`SimGpuConfig`] was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimConfigError {
    /// No scanout.
    NoScanouts,
    /// More than [`wire::MAX_SCANOUTS`] scanouts.
    TooManyScanouts(usize),
    /// A scanout with a zero width or height (its index).
    EmptyScanout(usize),
}

impl fmt::Display for SimConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoScanouts => f.write_str("no scanouts"),
            Self::TooManyScanouts(n) => {
                write!(f, "{n} scanouts, at most {} allowed", wire::MAX_SCANOUTS)
            }
            Self::EmptyScanout(i) => write!(f, "scanout {i} has a zero dimension"),
        }
    }
}

/// The outcome of one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executed {
    /// The response the device gives (an error carries its `RESP_ERR_*` code).
    pub response: Response,
    /// GPU time the command took.
    pub cost_ns: u64,
}

/// The address in the GPU's memory view of a host command's raw entry address.
///
/// After the mediator's renaming, a backing entry holds a host-physical address
/// (the GPU's DMA address: the IOMMU maps granted pages 1:1). The view the GPU is
/// given ([`SimGpu::execute`]'s `host_mem`) is a [`GuestMemory`] whose address space
/// is that DMA space, the GPU being its "guest"; this is the one place the
/// simulated GPU turns a raw entry address into an address of that view.
fn dma_addr(raw: u64) -> Gpa {
    Gpa::new(raw)
}

/// A resource's backing: its non-empty entries with their offsets in the backing.
#[derive(Clone, Debug)]
struct Backing {
    /// (offset of the entry's first byte in the backing, entry), ascending.
    chunks: Vec<(u64, MemEntry)>,
    /// Total bytes.
    len: u64,
}

impl Backing {
    /// Reads `out.len()` bytes at backing offset `off`, following the scatter list.
    fn read(&self, mem: &dyn GuestMemory, off: u64, out: &mut [u8]) -> Option<()> {
        let mut k = self
            .chunks
            .partition_point(|(start, e)| start + u64::from(e.length) <= off);
        let mut off = off;
        let mut done = 0usize;
        while done < out.len() {
            let (start, e) = self.chunks.get(k)?;
            let inner = off.checked_sub(*start)?;
            let avail = u64::from(e.length).checked_sub(inner)?;
            let n = usize::try_from(avail).map_or(out.len() - done, |a| a.min(out.len() - done));
            let addr = dma_addr(e.addr).checked_add(inner)?;
            mem.read(addr, out.get_mut(done..done + n)?).ok()?;
            done += n;
            off += n as u64;
            k += 1;
        }
        Some(())
    }
}

#[derive(Debug)]
struct Resource {
    format: u32,
    width: u32,
    height: u32,
    /// Row-major, `width * height` pixels.
    pixels: Box<dyn PixelBuf>,
    backing: Option<Backing>,
}

impl Resource {
    fn bytes(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height) * u64::from(BYTES_PER_PIXEL)
    }
}

#[derive(Clone, Debug)]
struct Scanout {
    mode: (u32, u32),
    /// 0 when disabled.
    resource_id: u32,
    rect: Rect,
    /// What the display shows: `rect.width * rect.height` pixels.
    image: Vec<u32>,
    flushes: u64,
}

impl Scanout {
    fn disable(&mut self) {
        self.resource_id = 0;
        self.rect = Rect::default();
        self.image = Vec::new();
    }
}

#[derive(Clone, Debug, Default)]
struct Cursor {
    resource_id: u32,
    pos: CursorPos,
    hot_x: u32,
    hot_y: u32,
    image: Vec<u32>,
}

/// What a scanout shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanoutView<'a> {
    /// Width of the shown image (of the `SET_SCANOUT` rectangle; 0 when disabled).
    pub width: u32,
    /// Height of the shown image.
    pub height: u32,
    /// The resource shown, 0 when disabled.
    pub resource_id: u32,
    /// The rectangle of the resource shown.
    pub rect: Rect,
    /// The image, row-major, as of the last `SET_SCANOUT` or `RESOURCE_FLUSH`.
    pub pixels: &'a [u32],
    /// Flushes that reached this scanout (flushes of the resource it showed).
    pub flushes: u64,
    /// The display mode (width, height) from the configuration.
    pub mode: (u32, u32),
}

impl ScanoutView<'_> {
    /// Whether a resource is shown.
    pub fn enabled(&self) -> bool {
        self.resource_id != 0
    }

    /// The pixel at (`x`, `y`) of the shown image.
    pub fn pixel(&self, x: u32, y: u32) -> Option<u32> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = usize::try_from(u64::from(y) * u64::from(self.width) + u64::from(x)).ok()?;
        self.pixels.get(i).copied()
    }

    /// FNV-1a (64-bit) over the image's dimensions and pixels (little endian): a
    /// compact fingerprint of what is on screen, for logs and scenario checks.
    pub fn checksum(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let words = [self.width, self.height]
            .into_iter()
            .chain(self.pixels.iter().copied());
        for w in words {
            for b in w.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }
}

/// A resource's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceView<'a> {
    /// Pixel format (`wire::format`).
    pub format: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Contents, row-major.
    pub pixels: &'a [u32],
    /// Bytes of attached backing, `None` when none is attached.
    pub backing_bytes: Option<u64>,
}

/// The cursor's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CursorView<'a> {
    /// Resource the image came from; 0 when the cursor is hidden.
    pub resource_id: u32,
    /// Position (scanout, x, y).
    pub pos: CursorPos,
    /// Hot spot x.
    pub hot_x: u32,
    /// Hot spot y.
    pub hot_y: u32,
    /// The 64x64 image copied at the last `UPDATE_CURSOR` (empty when hidden).
    pub image: &'a [u32],
}

/// The simulated GPU (see the module docs).
#[derive(Debug)]
pub struct SimGpu {
    cost: CostModel,
    /// Where resource pixels come from.
    pixel_alloc: PixelAlloc,
    /// Whether scanouts keep a copy of what they show.
    scanout_images: bool,
    vram_bytes: u64,
    vram_used: u64,
    resources: BTreeMap<u32, Resource>,
    scanouts: Vec<Scanout>,
    cursor: Cursor,
    commands: u64,
    errors: u64,
    busy_ns: u64,
}

type Outcome = Result<(Response, u64), u32>;

/// `bytes * ps_per_byte` picoseconds, in nanoseconds.
fn byte_cost(bytes: u64, ps_per_byte: u64) -> u64 {
    u64::try_from(u128::from(bytes) * u128::from(ps_per_byte) / 1000).unwrap_or(u64::MAX)
}

/// A zeroed pixel buffer of `n` pixels, or `ERR_OUT_OF_MEMORY`.
fn alloc_pixels(n: u64) -> Result<Vec<u32>, u32> {
    let n = usize::try_from(n).map_err(|_| wire::RESP_ERR_OUT_OF_MEMORY)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| wire::RESP_ERR_OUT_OF_MEMORY)?;
    v.resize(n, 0);
    Ok(v)
}

/// Copies `rect` (inside a `width`-wide image `src`) into a new buffer.
fn copy_rect(src: &[u32], width: u32, rect: &Rect) -> Result<Vec<u32>, u32> {
    let mut out = alloc_pixels(u64::from(rect.width) * u64::from(rect.height))?;
    let (w, rw) = (width as usize, rect.width as usize);
    for row in 0..rect.height as usize {
        let s = (rect.y as usize + row) * w + rect.x as usize;
        let from = src.get(s..s + rw).ok_or(wire::RESP_ERR_UNSPEC)?;
        let to = out
            .get_mut(row * rw..(row + 1) * rw)
            .ok_or(wire::RESP_ERR_UNSPEC)?;
        to.copy_from_slice(from);
    }
    Ok(out)
}

impl SimGpu {
    /// A GPU with no resources, every scanout disabled and the cursor hidden.
    pub fn new(cfg: SimGpuConfig) -> Result<Self, SimConfigError> {
        if cfg.scanouts.is_empty() {
            return Err(SimConfigError::NoScanouts);
        }
        if cfg.scanouts.len() > wire::MAX_SCANOUTS {
            return Err(SimConfigError::TooManyScanouts(cfg.scanouts.len()));
        }
        if let Some(i) = cfg.scanouts.iter().position(|&(w, h)| w == 0 || h == 0) {
            return Err(SimConfigError::EmptyScanout(i));
        }
        Ok(Self {
            cost: cfg.cost,
            pixel_alloc: heap_pixels,
            scanout_images: true,
            vram_bytes: cfg.vram_bytes,
            vram_used: 0,
            resources: BTreeMap::new(),
            scanouts: cfg
                .scanouts
                .iter()
                .map(|&mode| Scanout {
                    mode,
                    resource_id: 0,
                    rect: Rect::default(),
                    image: Vec::new(),
                    flushes: 0,
                })
                .collect(),
            cursor: Cursor::default(),
            commands: 0,
            errors: 0,
            busy_ns: 0,
        })
    }

    /// Takes resource pixels from `alloc` from now on (resources already made
    /// keep theirs).
    pub fn set_pixel_alloc(&mut self, alloc: PixelAlloc) {
        self.pixel_alloc = alloc;
    }

    /// Whether scanouts keep a copy of what they show (on by default). Off, a
    /// [`ScanoutView`] has no pixels: a headless device needs no second copy of
    /// every displayed resource.
    pub fn set_scanout_images(&mut self, on: bool) {
        self.scanout_images = on;
        if !on {
            for s in &mut self.scanouts {
                s.image = Vec::new();
            }
        }
    }

    /// Executes one command, reading backing memory through `host_mem` (addressed
    /// by host-physical DMA addresses, see `dma_addr`). Never panics; bad input
    /// gets a `RESP_ERR_*` response.
    pub fn execute(&mut self, req: &Request, host_mem: &dyn GuestMemory) -> Executed {
        let c = self.cost;
        let outcome: Outcome = match &req.cmd {
            Command::GetDisplayInfo => Ok((self.display_info(), c.display_info_ns)),
            Command::GetEdid { scanout } => self.edid(*scanout),
            Command::ResourceCreate2d {
                resource_id,
                format,
                width,
                height,
            } => self.create(*resource_id, *format, *width, *height),
            Command::ResourceUnref { resource_id } => self.unref(*resource_id),
            Command::ResourceAttachBacking {
                resource_id,
                entries,
            } => self.attach(*resource_id, entries, host_mem),
            Command::ResourceDetachBacking { resource_id } => self.detach(*resource_id),
            Command::TransferToHost2d {
                rect,
                offset,
                resource_id,
            } => self.transfer(*resource_id, rect, *offset, host_mem),
            Command::SetScanout {
                rect,
                scanout_id,
                resource_id,
            } => self.set_scanout(*scanout_id, *resource_id, rect),
            Command::ResourceFlush { rect, resource_id } => self.flush(*resource_id, rect),
            Command::UpdateCursor {
                pos,
                resource_id,
                hot_x,
                hot_y,
            } => self.update_cursor(pos, *resource_id, *hot_x, *hot_y),
            Command::MoveCursor { pos } => self.move_cursor(pos),
        };
        self.commands += 1;
        let (response, cost_ns) = match outcome {
            Ok(ok) => ok,
            Err(code) => {
                self.errors += 1;
                (Response::Err(code), c.error_ns)
            }
        };
        self.busy_ns = self.busy_ns.saturating_add(cost_ns);
        Executed { response, cost_ns }
    }

    fn scanout_index(&self, id: u32) -> Option<usize> {
        usize::try_from(id)
            .ok()
            .filter(|&i| i < self.scanouts.len())
    }

    fn display_info(&self) -> Response {
        Response::DisplayInfo(
            self.scanouts
                .iter()
                .map(|s| {
                    let r = Rect {
                        x: 0,
                        y: 0,
                        width: s.mode.0,
                        height: s.mode.1,
                    };
                    (r, true)
                })
                .collect(),
        )
    }

    fn edid(&self, scanout: u32) -> Outcome {
        let i = self
            .scanout_index(scanout)
            .ok_or(wire::RESP_ERR_INVALID_PARAMETER)?;
        let (w, h) = self.scanouts[i].mode;
        Ok((Response::Edid(edid_for(w, h).to_vec()), self.cost.edid_ns))
    }

    fn create(&mut self, id: u32, fmt: u32, width: u32, height: u32) -> Outcome {
        if id == 0 || self.resources.contains_key(&id) {
            return Err(wire::RESP_ERR_INVALID_RESOURCE_ID);
        }
        if !format::is_known(fmt) || width == 0 || height == 0 {
            return Err(wire::RESP_ERR_INVALID_PARAMETER);
        }
        let pixels = u64::from(width) * u64::from(height);
        let bytes = pixels
            .checked_mul(u64::from(BYTES_PER_PIXEL))
            .ok_or(wire::RESP_ERR_OUT_OF_MEMORY)?;
        if bytes > self.vram_bytes - self.vram_used {
            return Err(wire::RESP_ERR_OUT_OF_MEMORY);
        }
        let n = usize::try_from(pixels).map_err(|_| wire::RESP_ERR_OUT_OF_MEMORY)?;
        let pixels = (self.pixel_alloc)(n).ok_or(wire::RESP_ERR_OUT_OF_MEMORY)?;
        self.resources.insert(
            id,
            Resource {
                format: fmt,
                width,
                height,
                pixels,
                backing: None,
            },
        );
        self.vram_used += bytes;
        Ok((Response::OkNoData, self.cost.create_ns))
    }

    fn unref(&mut self, id: u32) -> Outcome {
        let res = self
            .resources
            .remove(&id)
            .ok_or(wire::RESP_ERR_INVALID_RESOURCE_ID)?;
        self.vram_used -= res.bytes();
        for s in self.scanouts.iter_mut().filter(|s| s.resource_id == id) {
            s.disable();
        }
        Ok((Response::OkNoData, self.cost.unref_ns))
    }

    fn attach(&mut self, id: u32, entries: &[MemEntry], mem: &dyn GuestMemory) -> Outcome {
        let res = self
            .resources
            .get_mut(&id)
            .ok_or(wire::RESP_ERR_INVALID_RESOURCE_ID)?;
        if res.backing.is_some() || entries.len() > MAX_BACKING_ENTRIES {
            return Err(wire::RESP_ERR_UNSPEC);
        }
        let mut chunks = Vec::new();
        chunks
            .try_reserve_exact(entries.len())
            .map_err(|_| wire::RESP_ERR_OUT_OF_MEMORY)?;
        let mut len = 0u64;
        for e in entries {
            mem.translate(dma_addr(e.addr), u64::from(e.length))
                .map_err(|_| wire::RESP_ERR_UNSPEC)?;
            if e.length > 0 {
                chunks.push((len, *e));
                // At most 16384 entries of under 4 GiB each: no overflow.
                len += u64::from(e.length);
            }
        }
        res.backing = Some(Backing { chunks, len });
        let per_entry = self
            .cost
            .attach_per_entry_ns
            .saturating_mul(entries.len() as u64);
        Ok((
            Response::OkNoData,
            self.cost.attach_ns.saturating_add(per_entry),
        ))
    }

    fn detach(&mut self, id: u32) -> Outcome {
        let res = self
            .resources
            .get_mut(&id)
            .ok_or(wire::RESP_ERR_INVALID_RESOURCE_ID)?;
        res.backing.take().ok_or(wire::RESP_ERR_UNSPEC)?;
        Ok((Response::OkNoData, self.cost.detach_ns))
    }

    fn transfer(&mut self, id: u32, rect: &Rect, offset: u64, mem: &dyn GuestMemory) -> Outcome {
        let res = self
            .resources
            .get_mut(&id)
            .ok_or(wire::RESP_ERR_INVALID_RESOURCE_ID)?;
        let Resource {
            width,
            height,
            pixels,
            backing,
            ..
        } = res;
        let backing = backing.as_ref().ok_or(wire::RESP_ERR_UNSPEC)?;
        if !rect.fits_in(*width, *height) {
            return Err(wire::RESP_ERR_INVALID_PARAMETER);
        }
        let bytes = u64::from(rect.width) * u64::from(rect.height) * u64::from(BYTES_PER_PIXEL);
        let cost = self
            .cost
            .transfer_ns
            .saturating_add(byte_cost(bytes, self.cost.transfer_ps_per_byte));
        if bytes == 0 {
            return Ok((Response::OkNoData, cost));
        }
        // Row r of the rectangle starts `offset + r * stride` bytes into the
        // backing (the offset already holds y * stride + x * 4, as Linux sends it).
        let stride = u64::from(*width) * u64::from(BYTES_PER_PIXEL);
        let row_bytes = u64::from(rect.width) * u64::from(BYTES_PER_PIXEL);
        let end = u64::from(rect.height - 1)
            .checked_mul(stride)
            .and_then(|v| v.checked_add(offset))
            .and_then(|v| v.checked_add(row_bytes))
            .ok_or(wire::RESP_ERR_INVALID_PARAMETER)?;
        if end > backing.len {
            return Err(wire::RESP_ERR_INVALID_PARAMETER);
        }
        let mut row = Vec::new();
        row.try_reserve_exact(row_bytes as usize)
            .map_err(|_| wire::RESP_ERR_OUT_OF_MEMORY)?;
        row.resize(row_bytes as usize, 0u8);
        let w = *width as usize;
        for r in 0..rect.height {
            let src = offset + u64::from(r) * stride;
            backing
                .read(mem, src, &mut row)
                .ok_or(wire::RESP_ERR_UNSPEC)?;
            let d = (rect.y + r) as usize * w + rect.x as usize;
            let dst = pixels
                .pixels_mut()
                .get_mut(d..d + rect.width as usize)
                .ok_or(wire::RESP_ERR_UNSPEC)?;
            for (px, b) in dst.iter_mut().zip(row.chunks_exact(4)) {
                *px = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Ok((Response::OkNoData, cost))
    }

    fn set_scanout(&mut self, scanout_id: u32, id: u32, rect: &Rect) -> Outcome {
        let i = self
            .scanout_index(scanout_id)
            .ok_or(wire::RESP_ERR_INVALID_SCANOUT_ID)?;
        if id == 0 {
            self.scanouts[i].disable();
            return Ok((Response::OkNoData, self.cost.set_scanout_ns));
        }
        let res = self
            .resources
            .get(&id)
            .ok_or(wire::RESP_ERR_INVALID_RESOURCE_ID)?;
        if !rect.fits_in(res.width, res.height)
            || rect.width < MIN_SCANOUT_EDGE
            || rect.height < MIN_SCANOUT_EDGE
        {
            return Err(wire::RESP_ERR_INVALID_PARAMETER);
        }
        let image = if self.scanout_images {
            copy_rect(res.pixels.pixels(), res.width, rect)?
        } else {
            Vec::new()
        };
        let s = &mut self.scanouts[i];
        s.resource_id = id;
        s.rect = *rect;
        s.image = image;
        Ok((Response::OkNoData, self.cost.set_scanout_ns))
    }

    fn flush(&mut self, id: u32, rect: &Rect) -> Outcome {
        let res = self
            .resources
            .get(&id)
            .ok_or(wire::RESP_ERR_INVALID_RESOURCE_ID)?;
        if !rect.fits_in(res.width, res.height) {
            return Err(wire::RESP_ERR_INVALID_PARAMETER);
        }
        let mut bytes = 0u64;
        let w = res.width as usize;
        for s in self.scanouts.iter_mut().filter(|s| s.resource_id == id) {
            s.flushes += 1;
            // The flushed part of what the scanout shows. Both rectangles fit in
            // the resource, so none of this overflows.
            let x0 = rect.x.max(s.rect.x);
            let y0 = rect.y.max(s.rect.y);
            let x1 = (rect.x + rect.width).min(s.rect.x + s.rect.width);
            let y1 = (rect.y + rect.height).min(s.rect.y + s.rect.height);
            if x0 >= x1 || y0 >= y1 {
                continue;
            }
            let n = (x1 - x0) as usize;
            let sw = s.rect.width as usize;
            for y in y0..y1 {
                let from = y as usize * w + x0 as usize;
                let to = (y - s.rect.y) as usize * sw + (x0 - s.rect.x) as usize;
                let src = res.pixels.pixels().get(from..from + n);
                let dst = s.image.get_mut(to..to + n);
                if let (Some(src), Some(dst)) = (src, dst) {
                    dst.copy_from_slice(src);
                }
            }
            bytes += u64::from(x1 - x0) * u64::from(y1 - y0) * u64::from(BYTES_PER_PIXEL);
        }
        let cost = self
            .cost
            .flush_ns
            .saturating_add(byte_cost(bytes, self.cost.flush_ps_per_byte));
        Ok((Response::OkNoData, cost))
    }

    fn update_cursor(&mut self, pos: &CursorPos, id: u32, hot_x: u32, hot_y: u32) -> Outcome {
        self.scanout_index(pos.scanout_id)
            .ok_or(wire::RESP_ERR_INVALID_SCANOUT_ID)?;
        let image = if id == 0 {
            Vec::new()
        } else {
            let res = self
                .resources
                .get(&id)
                .ok_or(wire::RESP_ERR_INVALID_RESOURCE_ID)?;
            if res.width != CURSOR_SIZE || res.height != CURSOR_SIZE {
                return Err(wire::RESP_ERR_INVALID_PARAMETER);
            }
            let mut image = Vec::new();
            image
                .try_reserve_exact(res.pixels.pixels().len())
                .map_err(|_| wire::RESP_ERR_OUT_OF_MEMORY)?;
            image.extend_from_slice(res.pixels.pixels());
            image
        };
        self.cursor = Cursor {
            resource_id: id,
            pos: *pos,
            hot_x,
            hot_y,
            image,
        };
        Ok((Response::OkNoData, self.cost.cursor_ns))
    }

    fn move_cursor(&mut self, pos: &CursorPos) -> Outcome {
        self.scanout_index(pos.scanout_id)
            .ok_or(wire::RESP_ERR_INVALID_SCANOUT_ID)?;
        self.cursor.pos = *pos;
        Ok((Response::OkNoData, self.cost.cursor_ns))
    }

    /// Resets the device: every resource is destroyed, every scanout disabled and
    /// the cursor hidden. Flush counts and the command statistics are kept.
    pub fn reset(&mut self) {
        self.resources.clear();
        self.vram_used = 0;
        for s in &mut self.scanouts {
            s.disable();
        }
        self.cursor = Cursor::default();
    }

    /// What scanout `id` shows, or `None` if there is no such scanout.
    pub fn scanout(&self, id: u32) -> Option<ScanoutView<'_>> {
        let s = &self.scanouts[self.scanout_index(id)?];
        Some(ScanoutView {
            width: s.rect.width,
            height: s.rect.height,
            resource_id: s.resource_id,
            rect: s.rect,
            pixels: &s.image,
            flushes: s.flushes,
            mode: s.mode,
        })
    }

    /// Flushes that reached scanout `id`.
    pub fn flushes(&self, id: u32) -> Option<u64> {
        self.scanout(id).map(|s| s.flushes)
    }

    /// Number of scanouts.
    pub fn scanout_count(&self) -> usize {
        self.scanouts.len()
    }

    /// A resource's state.
    pub fn resource(&self, id: u32) -> Option<ResourceView<'_>> {
        self.resources.get(&id).map(|r| ResourceView {
            format: r.format,
            width: r.width,
            height: r.height,
            pixels: r.pixels.pixels(),
            backing_bytes: r.backing.as_ref().map(|b| b.len),
        })
    }

    /// Number of live resources.
    pub fn resource_count(&self) -> usize {
        self.resources.len()
    }

    /// Ids of the live resources, ascending.
    pub fn resource_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.resources.keys().copied()
    }

    /// Bytes of VRAM held by resources.
    pub fn vram_used(&self) -> u64 {
        self.vram_used
    }

    /// The VRAM budget.
    pub fn vram_bytes(&self) -> u64 {
        self.vram_bytes
    }

    /// The cursor's state.
    pub fn cursor(&self) -> CursorView<'_> {
        CursorView {
            resource_id: self.cursor.resource_id,
            pos: self.cursor.pos,
            hot_x: self.cursor.hot_x,
            hot_y: self.cursor.hot_y,
            image: &self.cursor.image,
        }
    }

    /// Commands executed, successful or not.
    pub fn commands_executed(&self) -> u64 {
        self.commands
    }

    /// Commands answered with an error.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Sum of the costs of all commands executed: the GPU's busy time.
    pub fn busy_ns(&self) -> u64 {
        self.busy_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Hpa, VecMemory};
    use crate::wire::CtrlHdr;
    use alloc::vec;
    use proptest::prelude::*;

    const BASE: u64 = 0x10_0000;

    /// The GPU's memory view: 16 KiB of host memory at `BASE`, addressed by DMA
    /// addresses that are host-physical ones (an identity mapping).
    fn host_mem() -> VecMemory {
        VecMemory::new(dma_addr(BASE), Hpa::new(BASE), 0x4000)
    }

    fn gpu() -> SimGpu {
        SimGpu::new(SimGpuConfig {
            scanouts: vec![(1280, 800), (640, 480)],
            vram_bytes: 64 * 1024,
            cost: CostModel::FREE,
        })
        .unwrap()
    }

    fn req(cmd: Command) -> Request {
        Request {
            hdr: CtrlHdr {
                type_: cmd.type_(),
                ..CtrlHdr::default()
            },
            cmd,
        }
    }

    fn run(g: &mut SimGpu, mem: &VecMemory, cmd: Command) -> u32 {
        g.execute(&req(cmd), mem).response.type_()
    }

    fn rect(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    fn create(id: u32, w: u32, h: u32) -> Command {
        Command::ResourceCreate2d {
            resource_id: id,
            format: format::B8G8R8X8_UNORM,
            width: w,
            height: h,
        }
    }

    fn entry(addr: u64, length: u32) -> MemEntry {
        MemEntry {
            addr,
            length,
            padding: 0,
        }
    }

    fn pattern(x: u32, y: u32) -> u32 {
        0xff00_0000 | (y << 12) | x
    }

    /// A 32x16 resource whose backing is split in two entries, the split falling
    /// inside a pixel, with `pattern` written into it.
    fn drawn() -> (SimGpu, VecMemory) {
        let mut mem = host_mem();
        let (w, h) = (32u32, 16u32);
        let first = 1002u32;
        let total = w * h * 4;
        let mut bytes = Vec::new();
        for y in 0..h {
            for x in 0..w {
                bytes.extend_from_slice(&pattern(x, y).to_le_bytes());
            }
        }
        mem.write(dma_addr(BASE + 0x100), &bytes[..first as usize])
            .unwrap();
        mem.write(dma_addr(BASE + 0x2000), &bytes[first as usize..])
            .unwrap();
        let mut g = gpu();
        let ok = wire::RESP_OK_NODATA;
        assert_eq!(run(&mut g, &mem, create(2, w, h)), ok);
        let entries = vec![
            entry(BASE + 0x100, first),
            entry(BASE + 0x2000, total - first),
        ];
        assert_eq!(
            run(
                &mut g,
                &mem,
                Command::ResourceAttachBacking {
                    resource_id: 2,
                    entries
                }
            ),
            ok
        );
        let t = Command::TransferToHost2d {
            rect: rect(0, 0, w, h),
            offset: 0,
            resource_id: 2,
        };
        assert_eq!(run(&mut g, &mem, t), ok);
        (g, mem)
    }

    #[test]
    fn draws_through_transfer_set_scanout_and_flush() {
        let (mut g, mut mem) = drawn();
        let ok = wire::RESP_OK_NODATA;
        assert_eq!(g.resource(2).unwrap().pixels[250], pattern(26, 7));
        assert_eq!(g.resource(2).unwrap().backing_bytes, Some(2048));
        let set = Command::SetScanout {
            rect: rect(0, 0, 32, 16),
            scanout_id: 0,
            resource_id: 2,
        };
        assert_eq!(run(&mut g, &mem, set), ok);
        let s = g.scanout(0).unwrap();
        assert!(s.enabled());
        assert_eq!((s.width, s.height, s.resource_id), (32, 16, 2));
        for y in 0..16 {
            for x in 0..32 {
                assert_eq!(s.pixel(x, y), Some(pattern(x, y)));
            }
        }
        assert_eq!(s.pixel(32, 0), None);
        let before = s.checksum();

        // Change an 8x4 block at (5, 3) in guest memory and transfer it as Linux
        // does (offset = y * stride + x * 4): the scanout changes only at flush.
        let stride = 32 * 4;
        let off = 3 * stride + 5 * 4;
        for r in 0..4u64 {
            let row: Vec<u8> = (0..8).flat_map(|_| 0x1234_5678u32.to_le_bytes()).collect();
            let at = off + r * stride;
            // The backing is split at byte 1002; write each byte where it lives.
            for (i, b) in row.iter().enumerate() {
                let o = at + i as u64;
                let addr = if o < 1002 {
                    BASE + 0x100 + o
                } else {
                    BASE + 0x2000 + o - 1002
                };
                mem.write(dma_addr(addr), &[*b]).unwrap();
            }
        }
        let t = Command::TransferToHost2d {
            rect: rect(5, 3, 8, 4),
            offset: off,
            resource_id: 2,
        };
        assert_eq!(run(&mut g, &mem, t), ok);
        assert_eq!(g.scanout(0).unwrap().checksum(), before);
        assert_eq!(g.flushes(0), Some(0));
        // Flush only the left half of the block.
        let f = Command::ResourceFlush {
            rect: rect(0, 0, 9, 16),
            resource_id: 2,
        };
        assert_eq!(run(&mut g, &mem, f), ok);
        let s = g.scanout(0).unwrap();
        assert_eq!(s.flushes, 1);
        assert_eq!(g.flushes(1), Some(0));
        for y in 0..16 {
            for x in 0..32 {
                let changed = (5..9).contains(&x) && (3..7).contains(&y);
                let want = if changed { 0x1234_5678 } else { pattern(x, y) };
                assert_eq!(s.pixel(x, y), Some(want), "({x}, {y})");
            }
        }
    }

    #[test]
    fn scanout_shows_a_sub_rectangle_and_flushes_clip_to_it() {
        let (mut g, mem) = drawn();
        let ok = wire::RESP_OK_NODATA;
        let set = Command::SetScanout {
            rect: rect(8, 0, 16, 16),
            scanout_id: 1,
            resource_id: 2,
        };
        assert_eq!(run(&mut g, &mem, set), ok);
        let s = g.scanout(1).unwrap();
        assert_eq!((s.width, s.height, s.mode), (16, 16, (640, 480)));
        assert_eq!(s.pixel(0, 0), Some(pattern(8, 0)));
        assert_eq!(s.pixel(15, 15), Some(pattern(23, 15)));
        // A flush outside the shown part still reaches the scanout but copies nothing.
        let f = Command::ResourceFlush {
            rect: rect(0, 0, 8, 16),
            resource_id: 2,
        };
        assert_eq!(run(&mut g, &mem, f), ok);
        assert_eq!(g.flushes(1), Some(1));
        // Resource 0 disables the scanout.
        let off = Command::SetScanout {
            rect: Rect::default(),
            scanout_id: 1,
            resource_id: 0,
        };
        assert_eq!(run(&mut g, &mem, off), ok);
        assert!(!g.scanout(1).unwrap().enabled());
        assert!(g.scanout(1).unwrap().pixels.is_empty());
        assert!(g.scanout(2).is_none());
    }

    #[test]
    fn resource_lifecycle_errors() {
        let mem = host_mem();
        let mut g = gpu();
        use wire::{
            RESP_ERR_INVALID_PARAMETER as PARAM, RESP_ERR_INVALID_RESOURCE_ID as RID,
            RESP_ERR_OUT_OF_MEMORY as OOM, RESP_ERR_UNSPEC as UNSPEC, RESP_OK_NODATA as OK,
        };
        assert_eq!(run(&mut g, &mem, create(0, 4, 4)), RID);
        assert_eq!(run(&mut g, &mem, create(1, 0, 4)), PARAM);
        assert_eq!(run(&mut g, &mem, create(1, 4, 0)), PARAM);
        let bad_format = Command::ResourceCreate2d {
            resource_id: 1,
            format: 5,
            width: 4,
            height: 4,
        };
        assert_eq!(run(&mut g, &mem, bad_format), PARAM);
        assert_eq!(run(&mut g, &mem, create(1, u32::MAX, u32::MAX)), OOM);
        assert_eq!(run(&mut g, &mem, create(1, 128, 129)), OOM);
        assert_eq!(run(&mut g, &mem, create(1, 128, 64)), OK);
        assert_eq!(g.vram_used(), 32 * 1024);
        assert_eq!(run(&mut g, &mem, create(1, 4, 4)), RID);
        assert_eq!(run(&mut g, &mem, create(2, 128, 64)), OK);
        assert_eq!(g.vram_used(), g.vram_bytes());
        assert_eq!(run(&mut g, &mem, create(3, 1, 1)), OOM);
        assert_eq!(g.resource_count(), 2);
        assert_eq!(g.resource_ids().collect::<Vec<_>>(), [1, 2]);

        let attach = |id, entries| Command::ResourceAttachBacking {
            resource_id: id,
            entries,
        };
        assert_eq!(run(&mut g, &mem, attach(9, vec![])), RID);
        // Backing outside host memory, or overflowing, is refused.
        assert_eq!(
            run(&mut g, &mem, attach(1, vec![entry(BASE - 4, 8)])),
            UNSPEC
        );
        assert_eq!(
            run(&mut g, &mem, attach(1, vec![entry(u64::MAX - 2, 8)])),
            UNSPEC
        );
        let too_many = vec![entry(BASE, 0); MAX_BACKING_ENTRIES + 1];
        assert_eq!(run(&mut g, &mem, attach(1, too_many)), UNSPEC);
        assert_eq!(g.resource(1).unwrap().backing_bytes, None);
        let transfer = |id, r, offset| Command::TransferToHost2d {
            rect: r,
            offset,
            resource_id: id,
        };
        assert_eq!(run(&mut g, &mem, transfer(1, rect(0, 0, 1, 1), 0)), UNSPEC);
        assert_eq!(run(&mut g, &mem, transfer(7, rect(0, 0, 1, 1), 0)), RID);
        assert_eq!(run(&mut g, &mem, attach(1, vec![entry(BASE, 0x1000)])), OK);
        assert_eq!(
            run(&mut g, &mem, attach(1, vec![entry(BASE, 0x1000)])),
            UNSPEC
        );
        // Rectangles outside the resource, offsets overflowing or past the backing.
        assert_eq!(run(&mut g, &mem, transfer(1, rect(120, 0, 9, 1), 0)), PARAM);
        assert_eq!(
            run(&mut g, &mem, transfer(1, rect(u32::MAX, 0, 2, 1), 0)),
            PARAM
        );
        assert_eq!(
            run(&mut g, &mem, transfer(1, rect(0, 0, 1, 1), u64::MAX - 2)),
            PARAM
        );
        // 0x1000 bytes of backing hold 8 rows of 128 pixels.
        assert_eq!(run(&mut g, &mem, transfer(1, rect(0, 0, 128, 8), 0)), OK);
        assert_eq!(run(&mut g, &mem, transfer(1, rect(0, 0, 128, 9), 0)), PARAM);
        assert_eq!(run(&mut g, &mem, transfer(1, rect(0, 0, 128, 8), 4)), PARAM);
        assert_eq!(run(&mut g, &mem, transfer(1, rect(3, 3, 0, 0), 0)), OK);
        let detach = |id| Command::ResourceDetachBacking { resource_id: id };
        assert_eq!(run(&mut g, &mem, detach(1)), OK);
        assert_eq!(run(&mut g, &mem, detach(1)), UNSPEC);
        assert_eq!(run(&mut g, &mem, detach(9)), RID);

        // Unref frees VRAM, detaches, and disables the scanouts showing it.
        let set = Command::SetScanout {
            rect: rect(0, 0, 128, 64),
            scanout_id: 1,
            resource_id: 2,
        };
        assert_eq!(run(&mut g, &mem, set), OK);
        assert_eq!(run(&mut g, &mem, attach(2, vec![entry(BASE, 16)])), OK);
        let unref = |id| Command::ResourceUnref { resource_id: id };
        assert_eq!(run(&mut g, &mem, unref(2)), OK);
        assert_eq!(run(&mut g, &mem, unref(2)), RID);
        assert!(!g.scanout(1).unwrap().enabled());
        assert_eq!(g.vram_used(), 32 * 1024);
        assert_eq!(g.errors(), 23);
        assert_eq!(g.commands_executed(), 32);
    }

    #[test]
    fn scanout_flush_cursor_and_info_errors() {
        let (mut g, mem) = drawn();
        use wire::{
            RESP_ERR_INVALID_PARAMETER as PARAM, RESP_ERR_INVALID_RESOURCE_ID as RID,
            RESP_ERR_INVALID_SCANOUT_ID as SID, RESP_OK_NODATA as OK,
        };
        let set = |scanout_id, resource_id, r| Command::SetScanout {
            rect: r,
            scanout_id,
            resource_id,
        };
        assert_eq!(run(&mut g, &mem, set(2, 2, rect(0, 0, 16, 16))), SID);
        assert_eq!(run(&mut g, &mem, set(u32::MAX, 0, rect(0, 0, 0, 0))), SID);
        assert_eq!(run(&mut g, &mem, set(0, 5, rect(0, 0, 16, 16))), RID);
        assert_eq!(run(&mut g, &mem, set(0, 2, rect(0, 0, 15, 16))), PARAM);
        assert_eq!(run(&mut g, &mem, set(0, 2, rect(17, 0, 16, 16))), PARAM);
        assert_eq!(run(&mut g, &mem, set(0, 2, rect(0, 1, 16, 16))), PARAM);
        let flush = |id, r| Command::ResourceFlush {
            rect: r,
            resource_id: id,
        };
        assert_eq!(run(&mut g, &mem, flush(5, rect(0, 0, 1, 1))), RID);
        assert_eq!(run(&mut g, &mem, flush(2, rect(0, 0, 33, 1))), PARAM);
        assert_eq!(run(&mut g, &mem, flush(2, rect(0, 0, 32, 16))), OK);

        // GET_DISPLAY_INFO and GET_EDID describe the configured modes.
        let info = g.execute(&req(Command::GetDisplayInfo), &mem).response;
        assert_eq!(
            info,
            Response::DisplayInfo(vec![
                (rect(0, 0, 1280, 800), true),
                (rect(0, 0, 640, 480), true)
            ])
        );
        let edid = g
            .execute(&req(Command::GetEdid { scanout: 1 }), &mem)
            .response;
        assert_eq!(edid, Response::Edid(edid_for(640, 480).to_vec()));
        assert_eq!(run(&mut g, &mem, Command::GetEdid { scanout: 2 }), PARAM);

        // The cursor takes a 64x64 resource, copied at update time.
        let pos = |scanout_id, x, y| CursorPos {
            scanout_id,
            x,
            y,
            padding: 0,
        };
        let update = |p, id| Command::UpdateCursor {
            pos: p,
            resource_id: id,
            hot_x: 1,
            hot_y: 2,
        };
        assert_eq!(run(&mut g, &mem, update(pos(0, 5, 5), 2)), PARAM);
        assert_eq!(run(&mut g, &mem, update(pos(0, 5, 5), 9)), RID);
        assert_eq!(run(&mut g, &mem, update(pos(3, 5, 5), 0)), SID);
        assert_eq!(run(&mut g, &mem, create(3, 64, 64)), OK);
        assert_eq!(run(&mut g, &mem, update(pos(1, 5, 6), 3)), OK);
        let c = g.cursor();
        assert_eq!(
            (c.resource_id, c.pos, c.hot_x, c.hot_y),
            (3, pos(1, 5, 6), 1, 2)
        );
        assert_eq!(c.image.len(), 64 * 64);
        let mv = |p| Command::MoveCursor { pos: p };
        assert_eq!(run(&mut g, &mem, mv(pos(0, 100, 200))), OK);
        assert_eq!(run(&mut g, &mem, mv(pos(7, 1, 1))), SID);
        assert_eq!(g.cursor().pos, pos(0, 100, 200));
        // The image survives the resource; resource 0 hides the cursor.
        assert_eq!(
            run(&mut g, &mem, Command::ResourceUnref { resource_id: 3 }),
            OK
        );
        assert_eq!(g.cursor().image.len(), 64 * 64);
        assert_eq!(run(&mut g, &mem, update(pos(0, 0, 0), 0)), OK);
        assert!(g.cursor().image.is_empty());

        // A reset clears the device but keeps the statistics.
        assert_eq!(run(&mut g, &mem, set(0, 2, rect(0, 0, 16, 16))), OK);
        assert_eq!(run(&mut g, &mem, flush(2, rect(0, 0, 32, 16))), OK);
        let commands = g.commands_executed();
        g.reset();
        assert_eq!((g.resource_count(), g.vram_used()), (0, 0));
        assert!(!g.scanout(0).unwrap().enabled());
        assert_eq!(g.commands_executed(), commands);
        assert_eq!(g.flushes(0), Some(1));
    }

    #[test]
    fn costs_follow_the_model() {
        let cost = CostModel {
            create_ns: 100,
            attach_ns: 10,
            attach_per_entry_ns: 3,
            transfer_ns: 50,
            transfer_ps_per_byte: 500,
            flush_ns: 7,
            flush_ps_per_byte: 2000,
            error_ns: 1,
            ..CostModel::FREE
        };
        let mem = host_mem();
        let mut g = SimGpu::new(SimGpuConfig {
            scanouts: vec![(64, 64)],
            vram_bytes: 1 << 20,
            cost,
        })
        .unwrap();
        let mut exec = |cmd| g.execute(&req(cmd), &mem).cost_ns;
        assert_eq!(exec(create(1, 32, 32)), 100);
        assert_eq!(exec(create(1, 32, 32)), 1);
        let entries = vec![entry(BASE, 0x1000), entry(BASE + 0x1000, 0x1000)];
        assert_eq!(
            exec(Command::ResourceAttachBacking {
                resource_id: 1,
                entries
            }),
            16
        );
        // 16x16 pixels = 1024 bytes at 0.5 ns each.
        let t = Command::TransferToHost2d {
            rect: rect(0, 0, 16, 16),
            offset: 0,
            resource_id: 1,
        };
        assert_eq!(exec(t), 50 + 512);
        assert_eq!(
            exec(Command::SetScanout {
                rect: rect(0, 0, 32, 32),
                scanout_id: 0,
                resource_id: 1
            }),
            0
        );
        // Flushing 4x4 pixels = 64 bytes at 2 ns each.
        let f = Command::ResourceFlush {
            rect: rect(0, 0, 4, 4),
            resource_id: 1,
        };
        assert_eq!(exec(f), 7 + 128);
        assert_eq!(g.busy_ns(), 100 + 1 + 16 + 562 + 135);
    }

    #[test]
    fn config_is_validated() {
        let cfg = |scanouts| SimGpuConfig {
            scanouts,
            vram_bytes: 0,
            cost: CostModel::default(),
        };
        assert_eq!(
            SimGpu::new(cfg(vec![])).err(),
            Some(SimConfigError::NoScanouts)
        );
        assert_eq!(
            SimGpu::new(cfg(vec![(1, 1); 17])).err(),
            Some(SimConfigError::TooManyScanouts(17))
        );
        assert_eq!(
            SimGpu::new(cfg(vec![(1, 1), (0, 5)])).err(),
            Some(SimConfigError::EmptyScanout(1))
        );
        assert_eq!(
            SimGpu::new(cfg(vec![(1, 1); 16])).unwrap().scanout_count(),
            16
        );
    }

    /// Coordinates and sizes mostly inside the 16..=48-pixel resources the
    /// generator creates, so that commands often succeed, sometimes wildly off.
    fn arb_rect() -> impl Strategy<Value = Rect> {
        let at = prop_oneof![8 => 0u32..24, 1 => any::<u32>()];
        let len = prop_oneof![8 => 0u32..=48, 1 => any::<u32>()];
        (at.clone(), at, len.clone(), len).prop_map(|(x, y, width, height)| Rect {
            x,
            y,
            width,
            height,
        })
    }

    fn arb_id() -> impl Strategy<Value = u32> {
        prop_oneof![8 => 1u32..=3, 1 => Just(0u32), 1 => any::<u32>()]
    }

    fn arb_scanout() -> impl Strategy<Value = u32> {
        prop_oneof![8 => 0u32..2, 1 => any::<u32>()]
    }

    fn arb_entry() -> impl Strategy<Value = MemEntry> {
        let addr = prop_oneof![
            8 => BASE..(BASE + 0x1000),
            1 => (BASE - 0x100)..(BASE + 0x4100),
            1 => any::<u64>(),
        ];
        let length = prop_oneof![8 => 0x800u32..0x3000, 1 => 0u32..0x800, 1 => any::<u32>()];
        (addr, length).prop_map(|(addr, length)| entry(addr, length))
    }

    fn arb_pos() -> impl Strategy<Value = CursorPos> {
        (arb_scanout(), any::<u32>(), any::<u32>()).prop_map(|(scanout_id, x, y)| CursorPos {
            scanout_id,
            x,
            y,
            padding: 0,
        })
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let dim =
            || prop_oneof![8 => 16u32..=48, 2 => 0u32..16, 1 => Just(64u32), 1 => any::<u32>()];
        let fmt = prop_oneof![8 => Just(2u32), 1 => Just(134), 1 => Just(0), 1 => any::<u32>()];
        let offset = prop_oneof![8 => 0u64..0x800, 1 => any::<u64>()];
        prop_oneof![
            1 => Just(Command::GetDisplayInfo),
            1 => arb_scanout().prop_map(|scanout| Command::GetEdid { scanout }),
            3 => (arb_id(), fmt, dim(), dim()).prop_map(|(resource_id, format, width, height)| {
                Command::ResourceCreate2d { resource_id, format, width, height }
            }),
            1 => arb_id().prop_map(|resource_id| Command::ResourceUnref { resource_id }),
            3 => (arb_id(), proptest::collection::vec(arb_entry(), 0..4)).prop_map(
                |(resource_id, entries)| Command::ResourceAttachBacking { resource_id, entries }
            ),
            1 => arb_id().prop_map(|resource_id| Command::ResourceDetachBacking { resource_id }),
            5 => (arb_rect(), offset, arb_id()).prop_map(|(rect, offset, resource_id)| {
                Command::TransferToHost2d { rect, offset, resource_id }
            }),
            3 => (arb_rect(), arb_scanout(), arb_id()).prop_map(|(rect, scanout_id, resource_id)| {
                Command::SetScanout { rect, scanout_id, resource_id }
            }),
            4 => (arb_rect(), arb_id()).prop_map(|(rect, resource_id)| {
                Command::ResourceFlush { rect, resource_id }
            }),
            1 => (arb_pos(), arb_id(), any::<u32>(), any::<u32>()).prop_map(
                |(pos, resource_id, hot_x, hot_y)| Command::UpdateCursor { pos, resource_id, hot_x, hot_y }
            ),
            1 => arb_pos().prop_map(|pos| Command::MoveCursor { pos }),
        ]
    }

    proptest! {
        /// Arbitrary command sequences never panic, every response is OK or a
        /// virtio error, and the device's state stays consistent.
        #[test]
        fn arbitrary_commands_never_panic(
            cmds in proptest::collection::vec(arb_command(), 1..60),
            fill in any::<u8>(),
        ) {
            let mut mem = host_mem();
            mem.bytes.iter_mut().enumerate().for_each(|(i, b)| *b = fill ^ i as u8);
            let mut g = SimGpu::new(SimGpuConfig {
                scanouts: vec![(1024, 768), (64, 64)],
                vram_bytes: 48 * 1024,
                cost: CostModel::default(),
            })
            .unwrap();
            // Start from resources with backing, so that later commands reach the
            // deeper paths (transfers, flushes, cursor images) as well.
            let setup = [(1, 32, 32), (2, 48, 16), (3, 64, 64)].into_iter().flat_map(|(id, w, h)| {
                let entries = vec![entry(BASE, 0x1000), entry(BASE + 0x1000, 0x3000)];
                [create(id, w, h), Command::ResourceAttachBacking { resource_id: id, entries }]
            });
            for cmd in setup.chain(cmds) {
                let e = g.execute(&req(cmd), &mem);
                let t = e.response.type_();
                prop_assert!(
                    matches!(t, wire::RESP_OK_NODATA | wire::RESP_OK_DISPLAY_INFO | wire::RESP_OK_EDID)
                        || (wire::RESP_ERR_UNSPEC..=wire::RESP_ERR_INVALID_PARAMETER).contains(&t)
                );
                let mut used = 0u64;
                for id in g.resource_ids() {
                    let r = g.resource(id).unwrap();
                    prop_assert_eq!(r.pixels.len() as u64, u64::from(r.width) * u64::from(r.height));
                    used += r.pixels.len() as u64 * 4;
                }
                prop_assert_eq!(used, g.vram_used());
                prop_assert!(g.vram_used() <= g.vram_bytes());
                for s in 0..2 {
                    let v = g.scanout(s).unwrap();
                    prop_assert_eq!(v.pixels.len() as u64, u64::from(v.width) * u64::from(v.height));
                    if v.enabled() {
                        let r = g.resource(v.resource_id).unwrap();
                        prop_assert!(v.rect.fits_in(r.width, r.height));
                    }
                }
            }
        }
    }
}
