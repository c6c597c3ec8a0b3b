//! The simulated GPU as a backend: the `gpu-pv` CPU-rendered GPU over host memory,
//! for machines without a supported GPU (e.g. Bochs). Its resources' pixels live in
//! frames of their own, charged by the mediator to the VM that made them.

use alloc::boxed::Box;
use alloc::vec::Vec;

use gpu_pv::command;
use gpu_pv::mediator::QueueId;
use gpu_pv::memory::{check_range, Gpa, GuestMemory, Hpa, MemError};
use gpu_pv::sim_gpu::{CostModel, PixelBuf, SimGpu, SimGpuConfig};

use super::{DmaRegion, GpuBackend, GpuError};

/// Commands the simulated ring takes at a time.
const SLOTS: usize = 32;

/// A CPU-rendered GPU (the `gpu-pv` simulated GPU over host memory): the backend for
/// machines without a supported GPU, e.g. Bochs.
pub struct SimBackend {
    gpu: SimGpu,
    done: Vec<(u64, u32)>,
    host: HostMemory,
    sizes: Vec<(u32, u32)>,
}

/// All RAM below `top`, for the simulated GPU's DMA.
///
/// It is the simulated GPU's memory view, addressed by the GPU's DMA addresses:
/// the host-physical addresses the mediator renamed the backing to (no IOMMU
/// stands between this GPU and memory). So `translate` is the identity, converting
/// the view's address to the host-physical one explicitly.
#[derive(Clone, Copy)]
struct HostMemory {
    top: u64,
}

impl GuestMemory for HostMemory {
    fn translate(&self, addr: Gpa, len: u64) -> Result<Hpa, MemError> {
        check_range(addr, len, Gpa::new(0x10_0000), self.top - 0x10_0000)?;
        Ok(Hpa::new(addr.get()))
    }
    fn read(&self, addr: Gpa, out: &mut [u8]) -> Result<(), MemError> {
        let hpa = self.translate(addr, out.len() as u64)?;
        // SAFETY: RAM below the top of memory, identity mapped; the mediator only
        // hands the GPU addresses of pages it validated as the VM's own.
        unsafe { crate::mm::read_shared(hpa.get(), out) };
        Ok(())
    }
    fn write(&mut self, addr: Gpa, data: &[u8]) -> Result<(), MemError> {
        let hpa = self.translate(addr, data.len() as u64)?;
        // SAFETY: as in `read`.
        unsafe { crate::mm::write_shared(hpa.get(), data) };
        Ok(())
    }
}

/// A simulated-GPU resource's pixels in frames of their own, not on the shared
/// heap (the mediator charges them to the VM that made the resource).
#[derive(Debug)]
struct FramePixels {
    /// Owns the frames (freed and scrubbed on drop).
    _region: DmaRegion,
    /// Where the frames are mapped (identity), as an address.
    at: usize,
    /// Pixels.
    len: usize,
}

impl PixelBuf for FramePixels {
    fn pixels(&self) -> &[u32] {
        // SAFETY: the region holds at least `len * 4` bytes at `at`, page aligned,
        // ours alone until it is dropped with `self`; shared access follows `&self`.
        unsafe { core::slice::from_raw_parts(self.at as *const u32, self.len) }
    }
    fn pixels_mut(&mut self) -> &mut [u32] {
        // SAFETY: as in `pixels`; `&mut self` makes the access exclusive.
        unsafe { core::slice::from_raw_parts_mut(self.at as *mut u32, self.len) }
    }
}

/// The simulated GPU's pixel allocator: zeroed contiguous frames, `None` when
/// there are none.
fn frame_pixels(n: usize) -> Option<Box<dyn PixelBuf>> {
    let bytes = u64::try_from(n).ok()?.checked_mul(4)?;
    let mut region = DmaRegion::alloc(bytes)?;
    let at = region.as_mut_slice().as_mut_ptr() as usize;
    Some(Box::new(FramePixels {
        _region: region,
        at,
        len: n,
    }))
}

impl SimBackend {
    /// A simulated GPU with `scanouts` displays and `vram` bytes, DMA below `top`.
    /// Its pixels live in frames; it keeps no copy of what the scanouts show.
    pub fn new(scanouts: Vec<(u32, u32)>, vram: u64, top: u64) -> Option<Self> {
        let sizes = scanouts.clone();
        let mut gpu = SimGpu::new(SimGpuConfig {
            scanouts,
            vram_bytes: vram,
            cost: CostModel::FREE,
        })
        .ok()?;
        gpu.set_pixel_alloc(frame_pixels);
        gpu.set_scanout_images(false);
        Some(Self {
            gpu,
            done: Vec::new(),
            host: HostMemory { top },
            sizes,
        })
    }
}

impl GpuBackend for SimBackend {
    fn name(&self) -> &str {
        "simulated GPU (CPU rendered)"
    }
    fn scanouts(&self) -> &[(u32, u32)] {
        &self.sizes
    }
    fn free_slots(&self, _queue: QueueId) -> usize {
        SLOTS
    }
    fn submit(&mut self, _queue: QueueId, cmd: &[u8], token: u64) -> Result<(), GpuError> {
        let status = match command::decode(cmd) {
            Ok(req) => self.gpu.execute(&req, &self.host).response.type_(),
            Err(e) => e.response_type(),
        };
        self.done.push((token, status));
        Ok(())
    }
    fn kick(&mut self) {}
    fn poll(&mut self, out: &mut Vec<(u64, u32)>) -> usize {
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
}
