//! virtio-gpu commands decoded from staging bytes into a typed enum, and the
//! responses the mediator writes back.
//!
//! Decoding never trusts a length or a count the guest wrote: every error is a
//! [`DecodeError`] that maps to a virtio-gpu error response.

use alloc::vec::Vec;

use crate::wire::{CtrlHdr, CursorPos, MemEntry, Rect};

/// One decoded virtio-gpu command (2D subset plus cursor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `GET_DISPLAY_INFO`.
    GetDisplayInfo,
    /// `GET_EDID` for `scanout`.
    GetEdid {
        /// Scanout index.
        scanout: u32,
    },
    /// `RESOURCE_CREATE_2D`.
    ResourceCreate2d {
        /// Resource id (guest-local before renaming, host id after).
        resource_id: u32,
        /// Pixel format (`wire::format`).
        format: u32,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// `RESOURCE_UNREF` (also detaches backing).
    ResourceUnref {
        /// Resource id.
        resource_id: u32,
    },
    /// `SET_SCANOUT` (resource 0 disables the scanout).
    SetScanout {
        /// Source rectangle in the resource.
        rect: Rect,
        /// Scanout index.
        scanout_id: u32,
        /// Resource id, or 0.
        resource_id: u32,
    },
    /// `RESOURCE_FLUSH`.
    ResourceFlush {
        /// Rectangle to flush.
        rect: Rect,
        /// Resource id.
        resource_id: u32,
    },
    /// `TRANSFER_TO_HOST_2D`.
    TransferToHost2d {
        /// Rectangle to copy from backing into the resource.
        rect: Rect,
        /// Byte offset into the backing of the rectangle's first pixel.
        offset: u64,
        /// Resource id.
        resource_id: u32,
    },
    /// `RESOURCE_ATTACH_BACKING` with its entries.
    ResourceAttachBacking {
        /// Resource id.
        resource_id: u32,
        /// Backing pages (guest addresses before translation, host after).
        entries: Vec<MemEntry>,
    },
    /// `RESOURCE_DETACH_BACKING`.
    ResourceDetachBacking {
        /// Resource id.
        resource_id: u32,
    },
    /// `UPDATE_CURSOR` (cursor queue).
    UpdateCursor {
        /// Position.
        pos: CursorPos,
        /// Cursor image resource (0 hides the cursor).
        resource_id: u32,
        /// Hot spot x.
        hot_x: u32,
        /// Hot spot y.
        hot_y: u32,
    },
    /// `MOVE_CURSOR` (cursor queue).
    MoveCursor {
        /// Position.
        pos: CursorPos,
    },
}

/// A command with the header it came with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The header as the guest wrote it (type, flags, fence id, context).
    pub hdr: CtrlHdr,
    /// The decoded command.
    pub cmd: Command,
}

/// Why bytes did not decode into a [`Command`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than a header.
    ShortHeader,
    /// Fewer bytes than the command type needs (type, needed, got).
    ShortCommand {
        /// Command type.
        type_: u32,
        /// Bytes the command needs.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// A command type this device does not implement (3D, blob, unknown).
    UnsupportedType(u32),
    /// `nr_entries` of `ATTACH_BACKING` is above the limit.
    TooManyEntries(u32),
    /// Flags other than `FLAG_FENCE` set.
    BadFlags(u32),
}
