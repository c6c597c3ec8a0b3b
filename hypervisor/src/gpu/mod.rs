//! The physical GPU, behind one trait.
//!
//! The `gpu-pv` mediator validates and re-encodes each guest command into a complete
//! host-side virtio-gpu command (host resource ids, host physical backing addresses,
//! `FLAG_FENCE` with a host fence id). Everything after that — copying the bytes
//! into the GPU's own DMA buffers, ringing its doorbell, harvesting its completions
//! after its interrupt — is the job of a [`GpuBackend`]. Adding another GPU (a lab
//! card, or a CPU-rendered GOP framebuffer backend for hosts with no supported GPU)
//! means implementing this trait; the mediator does not change.
//!
//! Drivers:
//! - [`virtio::HostVirtioGpu`]: virtio-gpu over the modern virtio-pci transport (QEMU's
//!   `virtio-gpu-pci`), MSI-X on [`crate::interrupts::GPU_VECTOR`].
//!
//! # Device addresses
//!
//! Every address a backend gives its device (rings, command buffers, and the backing
//! addresses inside the mediator's commands) is a *device address*: what the device
//! puts on the bus. With VT-d translation on (`iommu::init`), the GPU's domain maps
//! what it may reach identically (IOVA == HPA): the backend reports the hypervisor
//! memory its device must reach through [`GpuBackend::dma_regions`] and the mediator
//! reports guest backing through its `IommuOp`s; without an IOMMU the device address
//! is the host-physical address all the same. [`device_addr`] is the one place that
//! would change if the mapping ever stopped being identity.

pub mod sim;
pub mod virtio;

use alloc::vec::Vec;
use core::fmt;

use gpu_pv::mediator::QueueId;
use gpu_pv::memory::{check_range, Gpa, GuestMemory, Hpa, MemError};
use gpu_pv::ring::RingError;

use crate::mm::{frames, phys_to_ptr, PAGE_SIZE};

/// The physical side of the mediator: one GPU that executes host-side virtio-gpu
/// commands.
///
/// # Contract
///
/// - [`submit`](Self::submit) copies a command into the backend's own DMA memory
///   (the caller's buffer can be reused at once) and stages it; nothing reaches the
///   device until [`kick`](Self::kick), which publishes every staged command at once
///   and rings the doorbell at most once per queue. Submit a whole batch, then kick.
/// - Completions come back through [`poll`](Self::poll) as `(token, response
///   type)`, the token being the caller's (the mediator glue uses its host fence).
///   Every submitted token comes back exactly once, in the order the device
///   finished them (not necessarily submission order). Cursor-queue commands have
///   no response in virtio-gpu; they come back with `RESP_OK_NODATA`.
/// - The device interrupts on [`crate::interrupts::GPU_VECTOR`]; the top half only
///   counts, and the bottom half calls `poll` (calling it without an interrupt is
///   fine and cheap: it only reads memory). A backend coalesces: at most one
///   interrupt per set of kicked commands is the aim, not one per command.
/// - Back-pressure: `submit` fails with [`GpuError::QueueFull`] when
///   [`free_slots`](Self::free_slots) is 0; check it before taking a batch so a
///   batch goes to the device whole.
/// - If the device breaks (a malformed used ring, `DEVICE_NEEDS_RESET`), the
///   backend stops it, `poll` hands back every outstanding token with
///   `RESP_ERR_UNSPEC` (so no guest waits forever) and [`failed`](Self::failed)
///   says why; later submits fail with [`GpuError::DeviceFailed`].
///
/// Device notifications left to make: under an emulator a notify (an MMIO write)
/// takes the emulator's global lock, which the GPU's own command processing holds for
/// milliseconds, so the GPU-PV glue rings them after it released its own lock.
#[derive(Clone, Copy, Debug, Default)]
pub struct Doorbells {
    /// (physical address of a 16-bit notify register, value), per queue.
    writes: [Option<(u64, u16)>; 2],
}

impl Doorbells {
    /// Adds a notify of `value` to the 16-bit register at `pa`, which must lie in a
    /// device BAR the hypervisor mapped for good (the physical GPU's notify window).
    pub(crate) fn add(&mut self, pa: u64, value: u16) {
        if let Some(slot) = self
            .writes
            .iter_mut()
            .find(|w| w.is_none() || w.is_some_and(|(a, v)| a == pa && v == value))
        {
            *slot = Some((pa, value));
        }
    }

    /// Takes `other`'s notifications too.
    pub fn merge(&mut self, other: Doorbells) {
        for (pa, value) in other.writes.into_iter().flatten() {
            self.add(pa, value);
        }
    }

    /// Makes the notifications.
    pub fn ring(self) {
        for (pa, value) in self.writes.into_iter().flatten() {
            // SAFETY: `add`'s contract: a naturally aligned 16-bit register inside a
            // device BAR that stays mapped; a notify only tells the device to look at
            // its rings, whose entries were published before.
            unsafe { core::ptr::write_volatile(phys_to_ptr::<u16>(pa), value) }
        }
    }
}

/// The backend never interprets the commands beyond what it needs to carry them:
/// validation is the mediator's.
pub trait GpuBackend: Send {
    /// A name for logs.
    fn name(&self) -> &str;

    /// One entry per physical scanout: the size its display reports as
    /// `(width, height)`, or `(0, 0)` when no display is attached to it (QEMU: every
    /// head but 0 until a driver sets it). The scanout still works; the caller picks
    /// its size (the mediator sizes each VM's display from the config).
    fn scanouts(&self) -> &[(u32, u32)];

    /// Commands `queue` can take now.
    fn free_slots(&self, queue: QueueId) -> usize;

    /// Copies one complete host-side command (header first) into the backend's DMA
    /// memory and stages it on `queue`; `token` comes back with its completion.
    fn submit(&mut self, queue: QueueId, cmd: &[u8], token: u64) -> Result<(), GpuError>;

    /// Publishes everything staged since the last kick and notifies the device.
    fn kick(&mut self);

    /// Publishes everything staged since the last kick and returns the device
    /// notifications still to make, for a caller that rings them after releasing
    /// its lock (see [`Doorbells`]). By default: a kick, nothing left to ring.
    fn publish(&mut self) -> Doorbells {
        self.kick();
        Doorbells::default()
    }

    /// The bottom half: appends the completions the device has finished as
    /// `(token, response type)` and returns how many it appended.
    fn poll(&mut self, out: &mut Vec<(u64, u32)>) -> usize;

    /// Commands submitted and not yet handed back by `poll`.
    fn in_flight(&self) -> usize;

    /// Checks the device's health and configuration events (reads device
    /// registers, so call it at a low rate, e.g. from the watchdog tick, or after an
    /// interrupt that `poll` found no work for). Returns whether a display changed.
    fn check_device(&mut self) -> bool {
        false
    }

    /// Why the backend stopped, if it did.
    #[cfg_attr(not(feature = "selftest"), allow(dead_code))]
    fn failed(&self) -> Option<GpuError> {
        None
    }

    /// Hypervisor memory the device must reach by DMA (rings, command buffers), as
    /// `(device address, length)`: the IOMMU maps these into the GPU's domain
    /// identically, next to the guest backing the mediator reports.
    fn dma_regions(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
}

/// Why a backend refused something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuError {
    /// Not a device this backend drives.
    NotSupported,
    /// The device lacks something the driver needs (a capability, a BAR, MSI-X).
    Missing(&'static str),
    /// The device offers no `VIRTIO_F_VERSION_1` (legacy only).
    Legacy,
    /// The device cleared `FEATURES_OK`: it refused the negotiated features.
    FeaturesRejected,
    /// The device has no queue with this index (or size 0).
    NoQueue(u16),
    /// The device did not accept an MSI-X vector assignment.
    MsixRefused,
    /// This CPU's APIC id does not fit an MSI address (x2APIC id above 255 without
    /// interrupt remapping).
    ApicIdTooLarge(u32),
    /// Out of frames for DMA memory.
    NoMemory,
    /// The queue has no room: poll, then retry.
    QueueFull,
    /// Shorter than a virtio-gpu header.
    BadCommand,
    /// Larger than the device can take in one descriptor.
    TooLarge,
    /// The device did not answer in time.
    Timeout,
    /// The device answered something that cannot be a valid answer.
    BadResponse(u32),
    /// The device broke its ring (the backend stopped it).
    Ring(RingError),
    /// The device asked to be reset (`DEVICE_NEEDS_RESET`), or was stopped.
    DeviceFailed,
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuError::NotSupported => write!(f, "not a supported GPU"),
            GpuError::Missing(what) => write!(f, "device has no {what}"),
            GpuError::Legacy => write!(f, "legacy-only device (no VIRTIO_F_VERSION_1)"),
            GpuError::FeaturesRejected => write!(f, "device refused the features (FEATURES_OK)"),
            GpuError::NoQueue(q) => write!(f, "device has no queue {q}"),
            GpuError::MsixRefused => write!(f, "device refused an MSI-X vector"),
            GpuError::ApicIdTooLarge(id) => write!(f, "APIC id {id} does not fit an MSI address"),
            GpuError::NoMemory => write!(f, "out of DMA memory"),
            GpuError::QueueFull => write!(f, "queue full"),
            GpuError::BadCommand => write!(f, "command shorter than a header"),
            GpuError::TooLarge => write!(f, "command too large"),
            GpuError::Timeout => write!(f, "device timed out"),
            GpuError::BadResponse(t) => write!(f, "bad response {t:#x}"),
            GpuError::Ring(e) => write!(f, "device broke its ring: {e:?}"),
            GpuError::DeviceFailed => write!(f, "device failed (needs reset)"),
        }
    }
}

/// The device address of host-physical `hpa` (see the module docs: identity, now
/// and behind the IOMMU).
pub const fn device_addr(hpa: u64) -> u64 {
    hpa
}

/// A device address as an address of a `gpu_pv` ring. The ring code is typed in
/// [`Gpa`]: the physical address space of the ring's driver, as its device sees
/// it. For the hypervisor's own rings to the physical GPU that space is the
/// device (bus) address space, so [`DmaRegion`]'s memory view is addressed by
/// device addresses; this is where one becomes such an address.
pub const fn ring_addr(device_addr: u64) -> Gpa {
    Gpa::new(device_addr)
}

/// Checks that `[off, off+len)` neither overflows nor leaves `[0, size)`.
fn check_offset(off: u64, len: u64, size: u64) -> Result<(), MemError> {
    let end = off.checked_add(len).ok_or(MemError::Overflow)?;
    if end > size {
        return Err(MemError::OutOfRange);
    }
    Ok(())
}

/// Physically contiguous, zeroed hypervisor memory for device DMA, freed (and
/// scrubbed) on drop. Whoever lets a device reach it must stop the device before
/// dropping it.
///
/// As a [`GuestMemory`] it is addressed by *device address* (see [`ring_addr`]; so
/// virtqueue code in `gpu-pv` can lay rings out in it and hand the same addresses
/// to the device), translates to its host-physical frames, and
/// its accesses are volatile: 2-, 4- and 8-byte aligned accesses are single loads
/// and stores, so a ring index is never seen torn.
#[derive(Debug)]
pub struct DmaRegion {
    pa: u64,
    pages: usize,
}

impl DmaRegion {
    /// At least `bytes` (rounded up to pages) of zeroed contiguous memory.
    pub fn alloc(bytes: u64) -> Option<Self> {
        let pages = usize::try_from(bytes.max(1).div_ceil(PAGE_SIZE)).ok()?;
        let pa = frames::alloc_contiguous(pages, PAGE_SIZE, u64::MAX)?;
        Some(Self { pa, pages })
    }

    /// Device address of the start.
    pub fn device_addr(&self) -> u64 {
        device_addr(self.pa)
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.pages as u64 * PAGE_SIZE
    }

    /// The memory as bytes (for filling buffers the device will read).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the frames are ours alone (allocated for this region, freed only on
        // drop), identity mapped, and `len()` bytes long; `&mut self` makes the slice
        // exclusive on the CPU side. A device may read it concurrently, which is the
        // point of a DMA buffer and no Rust-level aliasing.
        unsafe { core::slice::from_raw_parts_mut(phys_to_ptr::<u8>(self.pa), self.len() as usize) }
    }

    /// Copies `data` to byte offset `off` (plain copy: for buffers published to
    /// the device afterwards through a ring, whose release fence orders them).
    pub fn write_at(&mut self, off: u64, data: &[u8]) -> Result<(), MemError> {
        check_offset(off, data.len() as u64, self.len())?;
        // SAFETY: the range is inside the region (checked above); see `as_mut_slice`.
        unsafe {
            core::ptr::copy_nonoverlapping(
                data.as_ptr(),
                phys_to_ptr::<u8>(self.pa + off),
                data.len(),
            )
        };
        Ok(())
    }

    /// Copies bytes at offset `off` into `out`, volatile (the device may have
    /// written them).
    pub fn read_at(&self, off: u64, out: &mut [u8]) -> Result<(), MemError> {
        check_offset(off, out.len() as u64, self.len())?;
        // SAFETY: the range is inside the region (checked above), identity mapped.
        unsafe { crate::mm::read_shared(self.pa + off, out) };
        Ok(())
    }

    fn offset(&self, addr: Gpa, len: u64) -> Result<u64, MemError> {
        check_range(addr, len, ring_addr(self.device_addr()), self.len())?;
        Ok(addr.get() - self.device_addr())
    }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        frames::free(self.pa, self.pages);
    }
}

impl GuestMemory for DmaRegion {
    fn translate(&self, addr: Gpa, len: u64) -> Result<Hpa, MemError> {
        let off = self.offset(addr, len)?;
        Ok(Hpa::new(self.pa + off))
    }

    fn read(&self, addr: Gpa, out: &mut [u8]) -> Result<(), MemError> {
        let off = self.offset(addr, out.len() as u64)?;
        self.read_at(off, out)
    }

    fn write(&mut self, addr: Gpa, data: &[u8]) -> Result<(), MemError> {
        let off = self.offset(addr, data.len() as u64)?;
        // SAFETY: the range is inside the region (checked by `offset`), identity mapped.
        unsafe { crate::mm::write_shared(self.pa + off, data) };
        Ok(())
    }
}
