//! The virtio-gpu wire format (virtio 1.2, section 5.7), little endian.
//!
//! Defined once and shared by the mediator (`gpu-pv`), the physical driver in the
//! hypervisor and the guest frontend. Each struct is `#[repr(C)]` with its size
//! checked at compile time against the specification; (de)serialisation is explicit
//! little-endian byte access, so the code stays free of `unsafe` and of alignment
//! assumptions about guest buffers.

/// `VIRTIO_GPU_CMD_GET_DISPLAY_INFO`.
pub const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
/// `VIRTIO_GPU_CMD_RESOURCE_CREATE_2D`.
pub const CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
/// `VIRTIO_GPU_CMD_RESOURCE_UNREF`.
pub const CMD_RESOURCE_UNREF: u32 = 0x0102;
/// `VIRTIO_GPU_CMD_SET_SCANOUT`.
pub const CMD_SET_SCANOUT: u32 = 0x0103;
/// `VIRTIO_GPU_CMD_RESOURCE_FLUSH`.
pub const CMD_RESOURCE_FLUSH: u32 = 0x0104;
/// `VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D`.
pub const CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
/// `VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING`.
pub const CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
/// `VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING`.
pub const CMD_RESOURCE_DETACH_BACKING: u32 = 0x0107;
/// `VIRTIO_GPU_CMD_GET_CAPSET_INFO` (3D; not offered, answered with an error).
pub const CMD_GET_CAPSET_INFO: u32 = 0x0108;
/// `VIRTIO_GPU_CMD_GET_CAPSET` (3D; not offered, answered with an error).
pub const CMD_GET_CAPSET: u32 = 0x0109;
/// `VIRTIO_GPU_CMD_GET_EDID`.
pub const CMD_GET_EDID: u32 = 0x010a;
/// `VIRTIO_GPU_CMD_UPDATE_CURSOR` (cursor queue).
pub const CMD_UPDATE_CURSOR: u32 = 0x0300;
/// `VIRTIO_GPU_CMD_MOVE_CURSOR` (cursor queue).
pub const CMD_MOVE_CURSOR: u32 = 0x0301;

/// `VIRTIO_GPU_RESP_OK_NODATA`.
pub const RESP_OK_NODATA: u32 = 0x1100;
/// `VIRTIO_GPU_RESP_OK_DISPLAY_INFO`.
pub const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
/// `VIRTIO_GPU_RESP_OK_EDID`.
pub const RESP_OK_EDID: u32 = 0x1104;
/// `VIRTIO_GPU_RESP_ERR_UNSPEC`.
pub const RESP_ERR_UNSPEC: u32 = 0x1200;
/// `VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY`.
pub const RESP_ERR_OUT_OF_MEMORY: u32 = 0x1201;
/// `VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID`.
pub const RESP_ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
/// `VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID`.
pub const RESP_ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
/// `VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID`.
pub const RESP_ERR_INVALID_CONTEXT_ID: u32 = 0x1204;
/// `VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER`.
pub const RESP_ERR_INVALID_PARAMETER: u32 = 0x1205;

/// `VIRTIO_GPU_FLAG_FENCE`: the response must wait until the command completed.
pub const FLAG_FENCE: u32 = 1 << 0;
/// `VIRTIO_GPU_FLAG_INFO_RING_IDX`: `ring_idx` is valid (context rings; 3D only).
pub const FLAG_INFO_RING_IDX: u32 = 1 << 1;

/// Maximum scanouts in the virtio-gpu protocol (`VIRTIO_GPU_MAX_SCANOUTS`).
pub const MAX_SCANOUTS: usize = 16;
/// Size of the EDID blob in a `GET_EDID` response.
pub const EDID_BLOB_SIZE: usize = 1024;

/// Pixel formats (`enum virtio_gpu_formats`).
pub mod format {
    /// `VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM`.
    pub const B8G8R8A8_UNORM: u32 = 1;
    /// `VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM` (what Linux uses for its framebuffer).
    pub const B8G8R8X8_UNORM: u32 = 2;
    /// `VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM`.
    pub const A8R8G8B8_UNORM: u32 = 3;
    /// `VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM`.
    pub const X8R8G8B8_UNORM: u32 = 4;
    /// `VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM`.
    pub const R8G8B8A8_UNORM: u32 = 67;
    /// `VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM`.
    pub const X8B8G8R8_UNORM: u32 = 68;
    /// `VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM`.
    pub const A8B8G8R8_UNORM: u32 = 121;
    /// `VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM`.
    pub const R8G8B8X8_UNORM: u32 = 134;

    /// Whether `f` is one of the 2D formats above (all 4 bytes per pixel).
    pub const fn is_known(f: u32) -> bool {
        matches!(f, 1 | 2 | 3 | 4 | 67 | 68 | 121 | 134)
    }
}

/// Little-endian field access for wire structs. `read` returns `None` when `bytes`
/// is shorter than the struct; extra bytes are ignored (the caller checks lengths).
pub trait Wire: Sized {
    /// Encoded size in bytes.
    const SIZE: usize;
    /// Decodes from the first `SIZE` bytes.
    fn read(bytes: &[u8]) -> Option<Self>;
    /// Encodes into the first `SIZE` bytes of `out`; returns `None` if `out` is short.
    fn write(&self, out: &mut [u8]) -> Option<()>;
}

/// Reads a little-endian u16 at `off`.
pub fn le16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
/// Reads a little-endian u32 at `off`.
pub fn le32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
/// Reads a little-endian u64 at `off`.
pub fn le64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}
/// Writes a little-endian u16 at `off`.
pub fn put16(b: &mut [u8], off: usize, v: u16) -> Option<()> {
    b.get_mut(off..off + 2)?.copy_from_slice(&v.to_le_bytes());
    Some(())
}
/// Writes a little-endian u32 at `off`.
pub fn put32(b: &mut [u8], off: usize, v: u32) -> Option<()> {
    b.get_mut(off..off + 4)?.copy_from_slice(&v.to_le_bytes());
    Some(())
}
/// Writes a little-endian u64 at `off`.
pub fn put64(b: &mut [u8], off: usize, v: u64) -> Option<()> {
    b.get_mut(off..off + 8)?.copy_from_slice(&v.to_le_bytes());
    Some(())
}

/// `struct virtio_gpu_ctrl_hdr`: starts every command and response.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlHdr {
    /// Command or response type.
    pub type_: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Fence id, meaningful with [`FLAG_FENCE`].
    pub fence_id: u64,
    /// 3D context id (0 for 2D).
    pub ctx_id: u32,
    /// Context ring index, meaningful with [`FLAG_INFO_RING_IDX`].
    pub ring_idx: u8,
    /// Reserved.
    pub padding: [u8; 3],
}

impl Wire for CtrlHdr {
    const SIZE: usize = 24;
    fn read(b: &[u8]) -> Option<Self> {
        Some(Self {
            type_: le32(b, 0)?,
            flags: le32(b, 4)?,
            fence_id: le64(b, 8)?,
            ctx_id: le32(b, 16)?,
            ring_idx: *b.get(20)?,
            padding: b.get(21..24)?.try_into().ok()?,
        })
    }
    fn write(&self, o: &mut [u8]) -> Option<()> {
        put32(o, 0, self.type_)?;
        put32(o, 4, self.flags)?;
        put64(o, 8, self.fence_id)?;
        put32(o, 16, self.ctx_id)?;
        o.get_mut(20..24)?.copy_from_slice(&[
            self.ring_idx,
            self.padding[0],
            self.padding[1],
            self.padding[2],
        ]);
        Some(())
    }
}

/// `struct virtio_gpu_rect`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rect {
    /// Left edge in pixels.
    pub x: u32,
    /// Top edge in pixels.
    pub y: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl Rect {
    /// Whether the rectangle lies inside a `w` x `h` area (no overflow possible).
    pub fn fits_in(&self, w: u32, h: u32) -> bool {
        u64::from(self.x) + u64::from(self.width) <= u64::from(w)
            && u64::from(self.y) + u64::from(self.height) <= u64::from(h)
    }
}

impl Wire for Rect {
    const SIZE: usize = 16;
    fn read(b: &[u8]) -> Option<Self> {
        Some(Self {
            x: le32(b, 0)?,
            y: le32(b, 4)?,
            width: le32(b, 8)?,
            height: le32(b, 12)?,
        })
    }
    fn write(&self, o: &mut [u8]) -> Option<()> {
        put32(o, 0, self.x)?;
        put32(o, 4, self.y)?;
        put32(o, 8, self.width)?;
        put32(o, 12, self.height)
    }
}

/// One `struct virtio_gpu_mem_entry` of `RESOURCE_ATTACH_BACKING`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemEntry {
    /// Guest physical (or, behind an IOMMU, I/O virtual) address.
    pub addr: u64,
    /// Length in bytes.
    pub length: u32,
    /// Reserved.
    pub padding: u32,
}

impl Wire for MemEntry {
    const SIZE: usize = 16;
    fn read(b: &[u8]) -> Option<Self> {
        Some(Self {
            addr: le64(b, 0)?,
            length: le32(b, 8)?,
            padding: le32(b, 12)?,
        })
    }
    fn write(&self, o: &mut [u8]) -> Option<()> {
        put64(o, 0, self.addr)?;
        put32(o, 8, self.length)?;
        put32(o, 12, self.padding)
    }
}

/// `struct virtio_gpu_cursor_pos`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CursorPos {
    /// Scanout the cursor is on.
    pub scanout_id: u32,
    /// X position.
    pub x: u32,
    /// Y position.
    pub y: u32,
    /// Reserved.
    pub padding: u32,
}

impl Wire for CursorPos {
    const SIZE: usize = 16;
    fn read(b: &[u8]) -> Option<Self> {
        Some(Self {
            scanout_id: le32(b, 0)?,
            x: le32(b, 4)?,
            y: le32(b, 8)?,
            padding: le32(b, 12)?,
        })
    }
    fn write(&self, o: &mut [u8]) -> Option<()> {
        put32(o, 0, self.scanout_id)?;
        put32(o, 4, self.x)?;
        put32(o, 8, self.y)?;
        put32(o, 12, self.padding)
    }
}

/// Request sizes of the fixed-size commands (header included), from the spec.
pub mod size {
    /// `GET_DISPLAY_INFO` request (header only).
    pub const GET_DISPLAY_INFO: usize = 24;
    /// `GET_EDID` request.
    pub const GET_EDID: usize = 32;
    /// `RESOURCE_CREATE_2D` request.
    pub const RESOURCE_CREATE_2D: usize = 40;
    /// `RESOURCE_UNREF` request.
    pub const RESOURCE_UNREF: usize = 32;
    /// `SET_SCANOUT` request.
    pub const SET_SCANOUT: usize = 48;
    /// `RESOURCE_FLUSH` request.
    pub const RESOURCE_FLUSH: usize = 48;
    /// `TRANSFER_TO_HOST_2D` request.
    pub const TRANSFER_TO_HOST_2D: usize = 56;
    /// `RESOURCE_ATTACH_BACKING` request without its entries.
    pub const RESOURCE_ATTACH_BACKING: usize = 32;
    /// `RESOURCE_DETACH_BACKING` request.
    pub const RESOURCE_DETACH_BACKING: usize = 32;
    /// `UPDATE_CURSOR` / `MOVE_CURSOR` request.
    pub const CURSOR: usize = 56;
    /// Plain response (`OK_NODATA` and errors).
    pub const RESP_NODATA: usize = 24;
    /// `OK_DISPLAY_INFO` response.
    pub const RESP_DISPLAY_INFO: usize = 24 + 16 * 24;
    /// `OK_EDID` response.
    pub const RESP_EDID: usize = 24 + 8 + 1024;
}

/// Split-virtqueue layout (virtio 1.2, section 2.7).
pub mod virtq {
    /// Descriptor continues in `next`.
    pub const DESC_F_NEXT: u16 = 1;
    /// Buffer is device-writable.
    pub const DESC_F_WRITE: u16 = 2;
    /// Buffer holds an indirect descriptor table.
    pub const DESC_F_INDIRECT: u16 = 4;
    /// Size of one descriptor.
    pub const DESC_SIZE: u64 = 16;
    /// Size of one used-ring element.
    pub const USED_ELEM_SIZE: u64 = 8;
    /// Largest queue size virtio allows.
    pub const MAX_QUEUE_SIZE: u16 = 32768;
}

/// Transport and device feature bits: virtio-gpu's own here, the
/// device-independent ones from the `virtio-pci` crate (defined there once).
pub mod feature {
    pub use virtio_pci::feature::{
        bit, ACCESS_PLATFORM, RING_EVENT_IDX, RING_INDIRECT_DESC, RING_RESET, VERSION_1,
    };

    /// `VIRTIO_GPU_F_VIRGL` (3D; never offered).
    pub const GPU_VIRGL: u32 = 0;
    /// `VIRTIO_GPU_F_EDID`.
    pub const GPU_EDID: u32 = 1;
}

const _: () = {
    assert!(core::mem::size_of::<CtrlHdr>() == CtrlHdr::SIZE);
    assert!(core::mem::size_of::<Rect>() == Rect::SIZE);
    assert!(core::mem::size_of::<MemEntry>() == MemEntry::SIZE);
    assert!(core::mem::size_of::<CursorPos>() == CursorPos::SIZE);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_little_endian() {
        let h = CtrlHdr {
            type_: CMD_RESOURCE_FLUSH,
            flags: FLAG_FENCE,
            fence_id: 0x1122_3344_5566_7788,
            ctx_id: 7,
            ring_idx: 3,
            padding: [0; 3],
        };
        let mut b = [0u8; 24];
        h.write(&mut b).unwrap();
        assert_eq!(&b[0..4], &[0x04, 0x01, 0, 0]);
        assert_eq!(&b[8..16], &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        assert_eq!(CtrlHdr::read(&b), Some(h));
        assert_eq!(CtrlHdr::read(&b[..23]), None);
    }

    #[test]
    fn rect_fit_check_does_not_overflow() {
        let r = Rect {
            x: u32::MAX,
            y: 0,
            width: 2,
            height: 1,
        };
        assert!(!r.fits_in(u32::MAX, 10));
        assert!(Rect {
            x: 10,
            y: 10,
            width: 10,
            height: 10
        }
        .fits_in(20, 20));
    }
}
