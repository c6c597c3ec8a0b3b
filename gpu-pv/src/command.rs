//! virtio-gpu commands decoded from staging bytes into a typed enum, and the
//! responses the mediator writes back.
//!
//! Decoding never trusts a length or a count the guest wrote: every error is a
//! [`DecodeError`] that maps to a virtio-gpu error response.

use alloc::vec::Vec;

use crate::abi::limits;
use crate::wire::{self, le32, le64, size, CtrlHdr, CursorPos, MemEntry, Rect, Wire};

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
    /// The hypervisor had no memory for the command's entries.
    OutOfMemory,
    /// Flags other than `FLAG_FENCE` set.
    BadFlags(u32),
    /// A response shorter than its type needs (guest frontend side).
    ShortResponse {
        /// Response type.
        type_: u32,
        /// Bytes the response needs.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// A response type that is neither a known success type nor an error.
    UnknownResponse(u32),
    /// An `OK_EDID` response whose size field exceeds the 1024-byte blob.
    BadEdidSize(u32),
}

impl DecodeError {
    /// The virtio-gpu response type to answer a command that failed to decode with.
    ///
    /// Malformed or unsupported commands get `ERR_UNSPEC`, as QEMU answers them;
    /// well-formed commands with a value out of bounds get `ERR_INVALID_PARAMETER`.
    /// The response-side variants never reach a device; they map to `ERR_UNSPEC`.
    pub fn response_type(&self) -> u32 {
        match self {
            DecodeError::TooManyEntries(_) | DecodeError::BadFlags(_) => {
                wire::RESP_ERR_INVALID_PARAMETER
            }
            DecodeError::ShortHeader
            | DecodeError::ShortCommand { .. }
            | DecodeError::UnsupportedType(_)
            | DecodeError::ShortResponse { .. }
            | DecodeError::UnknownResponse(_)
            | DecodeError::BadEdidSize(_) => wire::RESP_ERR_UNSPEC,
            DecodeError::OutOfMemory => wire::RESP_ERR_OUT_OF_MEMORY,
        }
    }
}

/// Fails unless `bytes` holds at least `needed` bytes of a `type_` command.
fn need(bytes: &[u8], type_: u32, needed: usize) -> Result<(), DecodeError> {
    if bytes.len() < needed {
        return Err(DecodeError::ShortCommand {
            type_,
            needed,
            got: bytes.len(),
        });
    }
    Ok(())
}

/// Reads field `T` at `off`; callers have checked the length with [`need`], so the
/// error is unreachable and only keeps the decoder panic-free.
fn field<T: Wire>(bytes: &[u8], off: usize, type_: u32) -> Result<T, DecodeError> {
    bytes
        .get(off..)
        .and_then(T::read)
        .ok_or(DecodeError::ShortCommand {
            type_,
            needed: off + T::SIZE,
            got: bytes.len(),
        })
}

/// A little-endian `u32` field at `off` (see [`field`]).
fn u32_at(bytes: &[u8], off: usize, type_: u32) -> Result<u32, DecodeError> {
    le32(bytes, off).ok_or(DecodeError::ShortCommand {
        type_,
        needed: off + 4,
        got: bytes.len(),
    })
}

/// Decodes one command from the bytes the guest made readable (header first).
///
/// Bytes past the command are ignored, as a device reading a fixed-size struct
/// ignores them; `RESOURCE_ATTACH_BACKING` is checked for `nr_entries` against
/// [`limits::MAX_BACKING_ENTRIES`] before its entries are counted against the bytes
/// present. Only `FLAG_FENCE` may be set (no 3D contexts, so no ring index).
pub fn decode(bytes: &[u8]) -> Result<Request, DecodeError> {
    let hdr = CtrlHdr::read(bytes).ok_or(DecodeError::ShortHeader)?;
    let t = hdr.type_;
    let needed = match t {
        wire::CMD_GET_DISPLAY_INFO => size::GET_DISPLAY_INFO,
        wire::CMD_GET_EDID => size::GET_EDID,
        wire::CMD_RESOURCE_CREATE_2D => size::RESOURCE_CREATE_2D,
        wire::CMD_RESOURCE_UNREF => size::RESOURCE_UNREF,
        wire::CMD_SET_SCANOUT => size::SET_SCANOUT,
        wire::CMD_RESOURCE_FLUSH => size::RESOURCE_FLUSH,
        wire::CMD_TRANSFER_TO_HOST_2D => size::TRANSFER_TO_HOST_2D,
        wire::CMD_RESOURCE_ATTACH_BACKING => size::RESOURCE_ATTACH_BACKING,
        wire::CMD_RESOURCE_DETACH_BACKING => size::RESOURCE_DETACH_BACKING,
        wire::CMD_UPDATE_CURSOR | wire::CMD_MOVE_CURSOR => size::CURSOR,
        _ => return Err(DecodeError::UnsupportedType(t)),
    };
    need(bytes, t, needed)?;
    if hdr.flags & !wire::FLAG_FENCE != 0 {
        return Err(DecodeError::BadFlags(hdr.flags));
    }
    let h = CtrlHdr::SIZE;
    let cmd = match t {
        wire::CMD_GET_DISPLAY_INFO => Command::GetDisplayInfo,
        wire::CMD_GET_EDID => Command::GetEdid {
            scanout: u32_at(bytes, h, t)?,
        },
        wire::CMD_RESOURCE_CREATE_2D => Command::ResourceCreate2d {
            resource_id: u32_at(bytes, h, t)?,
            format: u32_at(bytes, h + 4, t)?,
            width: u32_at(bytes, h + 8, t)?,
            height: u32_at(bytes, h + 12, t)?,
        },
        wire::CMD_RESOURCE_UNREF => Command::ResourceUnref {
            resource_id: u32_at(bytes, h, t)?,
        },
        wire::CMD_SET_SCANOUT => Command::SetScanout {
            rect: field(bytes, h, t)?,
            scanout_id: u32_at(bytes, h + 16, t)?,
            resource_id: u32_at(bytes, h + 20, t)?,
        },
        wire::CMD_RESOURCE_FLUSH => Command::ResourceFlush {
            rect: field(bytes, h, t)?,
            resource_id: u32_at(bytes, h + 16, t)?,
        },
        wire::CMD_TRANSFER_TO_HOST_2D => Command::TransferToHost2d {
            rect: field(bytes, h, t)?,
            offset: le64(bytes, h + 16).ok_or(DecodeError::ShortCommand {
                type_: t,
                needed,
                got: bytes.len(),
            })?,
            resource_id: u32_at(bytes, h + 24, t)?,
        },
        wire::CMD_RESOURCE_ATTACH_BACKING => {
            let resource_id = u32_at(bytes, h, t)?;
            let nr = u32_at(bytes, h + 4, t)?;
            if nr > limits::MAX_BACKING_ENTRIES {
                return Err(DecodeError::TooManyEntries(nr));
            }
            // nr <= MAX_BACKING_ENTRIES, so this cannot overflow.
            let needed = size::RESOURCE_ATTACH_BACKING + nr as usize * MemEntry::SIZE;
            need(bytes, t, needed)?;
            let mut entries = Vec::new();
            entries
                .try_reserve_exact(nr as usize)
                .map_err(|_| DecodeError::OutOfMemory)?;
            entries.extend(
                bytes[size::RESOURCE_ATTACH_BACKING..needed]
                    .chunks_exact(MemEntry::SIZE)
                    .filter_map(MemEntry::read),
            );
            Command::ResourceAttachBacking {
                resource_id,
                entries,
            }
        }
        wire::CMD_RESOURCE_DETACH_BACKING => Command::ResourceDetachBacking {
            resource_id: u32_at(bytes, h, t)?,
        },
        wire::CMD_UPDATE_CURSOR => Command::UpdateCursor {
            pos: field(bytes, h, t)?,
            resource_id: u32_at(bytes, h + 16, t)?,
            hot_x: u32_at(bytes, h + 20, t)?,
            hot_y: u32_at(bytes, h + 24, t)?,
        },
        // Only CMD_MOVE_CURSOR is left: `needed` matched every other type above.
        _ => Command::MoveCursor {
            pos: field(bytes, h, t)?,
        },
    };
    Ok(Request { hdr, cmd })
}

impl Command {
    /// The virtio-gpu command type (`wire::CMD_*`).
    pub fn type_(&self) -> u32 {
        match self {
            Command::GetDisplayInfo => wire::CMD_GET_DISPLAY_INFO,
            Command::GetEdid { .. } => wire::CMD_GET_EDID,
            Command::ResourceCreate2d { .. } => wire::CMD_RESOURCE_CREATE_2D,
            Command::ResourceUnref { .. } => wire::CMD_RESOURCE_UNREF,
            Command::SetScanout { .. } => wire::CMD_SET_SCANOUT,
            Command::ResourceFlush { .. } => wire::CMD_RESOURCE_FLUSH,
            Command::TransferToHost2d { .. } => wire::CMD_TRANSFER_TO_HOST_2D,
            Command::ResourceAttachBacking { .. } => wire::CMD_RESOURCE_ATTACH_BACKING,
            Command::ResourceDetachBacking { .. } => wire::CMD_RESOURCE_DETACH_BACKING,
            Command::UpdateCursor { .. } => wire::CMD_UPDATE_CURSOR,
            Command::MoveCursor { .. } => wire::CMD_MOVE_CURSOR,
        }
    }
}

/// Appends `v` in its wire encoding.
fn push<T: Wire>(out: &mut Vec<u8>, v: &T) {
    let start = out.len();
    out.resize(start + T::SIZE, 0);
    // Cannot fail: exactly `T::SIZE` bytes were just made room for.
    let written = v.write(&mut out[start..]);
    debug_assert!(written.is_some());
}

fn push32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends the wire bytes of `req` to `out`: what a driver puts in its readable
/// buffers (for `ATTACH_BACKING`, header and entries in one run). The header's type
/// is the command's (`req.hdr.type_` is not consulted); its other fields are written
/// as they are. Padding fields outside the header, entries and cursor position are
/// zero, so `decode(encode(x)) == x` for every request `decode` accepts.
pub fn encode(req: &Request, out: &mut Vec<u8>) {
    let hdr = CtrlHdr {
        type_: req.cmd.type_(),
        ..req.hdr
    };
    push(out, &hdr);
    match &req.cmd {
        Command::GetDisplayInfo => {}
        Command::GetEdid { scanout } => {
            push32(out, *scanout);
            push32(out, 0);
        }
        Command::ResourceCreate2d {
            resource_id,
            format,
            width,
            height,
        } => {
            for v in [*resource_id, *format, *width, *height] {
                push32(out, v);
            }
        }
        Command::ResourceUnref { resource_id } | Command::ResourceDetachBacking { resource_id } => {
            push32(out, *resource_id);
            push32(out, 0);
        }
        Command::SetScanout {
            rect,
            scanout_id,
            resource_id,
        } => {
            push(out, rect);
            push32(out, *scanout_id);
            push32(out, *resource_id);
        }
        Command::ResourceFlush { rect, resource_id } => {
            push(out, rect);
            push32(out, *resource_id);
            push32(out, 0);
        }
        Command::TransferToHost2d {
            rect,
            offset,
            resource_id,
        } => {
            push(out, rect);
            out.extend_from_slice(&offset.to_le_bytes());
            push32(out, *resource_id);
            push32(out, 0);
        }
        Command::ResourceAttachBacking {
            resource_id,
            entries,
        } => {
            push32(out, *resource_id);
            push32(out, u32::try_from(entries.len()).unwrap_or(u32::MAX));
            for e in entries {
                push(out, e);
            }
        }
        Command::UpdateCursor {
            pos,
            resource_id,
            hot_x,
            hot_y,
        } => {
            push(out, pos);
            for v in [*resource_id, *hot_x, *hot_y, 0] {
                push32(out, v);
            }
        }
        Command::MoveCursor { pos } => {
            push(out, pos);
            for _ in 0..4 {
                push32(out, 0);
            }
        }
    }
}

/// A response to a control command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// `OK_NODATA`.
    OkNoData,
    /// `OK_DISPLAY_INFO`: per scanout (at most [`wire::MAX_SCANOUTS`]), its
    /// rectangle and whether it is enabled.
    DisplayInfo(Vec<(Rect, bool)>),
    /// `OK_EDID`: the EDID bytes (at most [`wire::EDID_BLOB_SIZE`]).
    Edid(Vec<u8>),
    /// An error response (`wire::RESP_ERR_*`).
    Err(u32),
}

/// Bytes of one `virtio_gpu_display_one` in `OK_DISPLAY_INFO`.
const PMODE_SIZE: usize = Rect::SIZE + 8;

impl Response {
    /// The virtio-gpu response type.
    pub fn type_(&self) -> u32 {
        match self {
            Response::OkNoData => wire::RESP_OK_NODATA,
            Response::DisplayInfo(_) => wire::RESP_OK_DISPLAY_INFO,
            Response::Edid(_) => wire::RESP_OK_EDID,
            Response::Err(code) => *code,
        }
    }

    /// Appends the response's wire bytes to `out`, answering the request whose
    /// header was `req_hdr`. As virtio 1.2, 5.7.6.7 requires, a fenced request gets
    /// `FLAG_FENCE` and its `fence_id` (and `ctx_id`, as QEMU does) back, and a
    /// request with `FLAG_INFO_RING_IDX` its `ring_idx`; otherwise those are zero.
    ///
    /// `DisplayInfo` always carries 16 entries (missing ones zero, extra ones
    /// dropped); `Edid` a 1024-byte blob (longer input is cut to 1024 bytes).
    pub fn encode(&self, req_hdr: &CtrlHdr, out: &mut Vec<u8>) {
        let mut hdr = CtrlHdr {
            type_: self.type_(),
            ..CtrlHdr::default()
        };
        if req_hdr.flags & wire::FLAG_FENCE != 0 {
            hdr.flags |= wire::FLAG_FENCE;
            hdr.fence_id = req_hdr.fence_id;
            hdr.ctx_id = req_hdr.ctx_id;
        }
        if req_hdr.flags & wire::FLAG_INFO_RING_IDX != 0 {
            hdr.flags |= wire::FLAG_INFO_RING_IDX;
            hdr.ring_idx = req_hdr.ring_idx;
        }
        push(out, &hdr);
        match self {
            Response::OkNoData | Response::Err(_) => {}
            Response::DisplayInfo(modes) => {
                let start = out.len();
                for (rect, enabled) in modes.iter().take(wire::MAX_SCANOUTS) {
                    push(out, rect);
                    push32(out, u32::from(*enabled));
                    push32(out, 0);
                }
                out.resize(start + wire::MAX_SCANOUTS * PMODE_SIZE, 0);
            }
            Response::Edid(edid) => {
                let n = edid.len().min(wire::EDID_BLOB_SIZE);
                push32(out, n as u32);
                push32(out, 0);
                let start = out.len();
                out.extend_from_slice(&edid[..n]);
                out.resize(start + wire::EDID_BLOB_SIZE, 0);
            }
        }
    }

    /// Decodes a response (the guest frontend's side): its header and contents.
    ///
    /// `DisplayInfo` comes back without trailing entries that are entirely zero
    /// (disabled, empty rectangle): the wire always has 16, and the scanouts that
    /// exist are the ones the device filled in. Types `0x1200..=0x12ff` are errors.
    pub fn decode(bytes: &[u8]) -> Result<(CtrlHdr, Response), DecodeError> {
        let hdr = CtrlHdr::read(bytes).ok_or(DecodeError::ShortHeader)?;
        let t = hdr.type_;
        let short = |needed: usize| DecodeError::ShortResponse {
            type_: t,
            needed,
            got: bytes.len(),
        };
        let resp = match t {
            wire::RESP_OK_NODATA => Response::OkNoData,
            wire::RESP_OK_DISPLAY_INFO => {
                let body = bytes
                    .get(CtrlHdr::SIZE..size::RESP_DISPLAY_INFO)
                    .ok_or(short(size::RESP_DISPLAY_INFO))?;
                let mut modes: Vec<(Rect, bool)> = body
                    .chunks_exact(PMODE_SIZE)
                    .filter_map(|p| Some((Rect::read(p)?, le32(p, Rect::SIZE)? != 0)))
                    .collect();
                while modes.last() == Some(&(Rect::default(), false)) {
                    modes.pop();
                }
                Response::DisplayInfo(modes)
            }
            wire::RESP_OK_EDID => {
                let body = bytes
                    .get(CtrlHdr::SIZE..size::RESP_EDID)
                    .ok_or(short(size::RESP_EDID))?;
                let n = le32(body, 0).ok_or(short(size::RESP_EDID))?;
                let blob = &body[8..];
                let edid = blob.get(..n as usize).ok_or(DecodeError::BadEdidSize(n))?;
                Response::Edid(edid.to_vec())
            }
            0x1200..=0x12ff => Response::Err(t),
            _ => return Err(DecodeError::UnknownResponse(t)),
        };
        Ok((hdr, resp))
    }
}

/// A valid EDID 1.3 base block (checksum included) for a digital display whose
/// preferred and only detailed mode is `width` x `height` at about 60 Hz, with a
/// monitor name ("GPU-PV") and range limits descriptor as EDID 1.3 asks.
///
/// A detailed timing holds at most 4095 x 4095 pixels, so larger (and zero)
/// dimensions are clamped to `1..=4095`; blanking is reduced as in CVT-RB (widened
/// for modes too small to reach a 10 MHz pixel clock at 60 Hz), and the pixel
/// clock is capped at the 655.35 MHz a detailed timing can express (the
/// refresh rate then drops below 60 Hz and the range limits follow it). The physical
/// size assumes 96 dots per inch.
pub fn edid_for(width: u32, height: u32) -> [u8; 128] {
    let w = width.clamp(1, 4095);
    let h = height.clamp(1, 4095);
    let mut e = [0u8; 128];
    e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // Manufacturer "GPV": three 5-bit letters ('A' = 1), big endian.
    let id = |c: u8| u16::from(c - b'A' + 1);
    let mfg = (id(b'G') << 10) | (id(b'P') << 5) | id(b'V');
    e[8..10].copy_from_slice(&mfg.to_be_bytes());
    e[10..12].copy_from_slice(&1u16.to_le_bytes()); // product code
    e[16] = 0; // week: unspecified
    e[17] = (2024 - 1990) as u8; // model year
    e[18] = 1; // EDID version 1
    e[19] = 3; // revision 3
    e[20] = 0x80; // digital input
                  // Physical size in cm at 96 dpi (25.4 mm per 96 pixels).
    let mm_w = (w * 254 / 960).max(1);
    let mm_h = (h * 254 / 960).max(1);
    e[21] = (mm_w / 10).clamp(1, 255) as u8;
    e[22] = (mm_h / 10).clamp(1, 255) as u8;
    e[23] = 120; // gamma 2.2
                 // RGB colour, sRGB default colour space, preferred timing in descriptor 1.
    e[24] = 0x08 | 0x04 | 0x02;
    // sRGB chromaticity (x, y of red, green, blue, white) in 1/1024 units.
    let c: [u16; 8] = [655, 338, 307, 614, 154, 61, 320, 337];
    e[25] = ((c[0] & 3) << 6 | (c[1] & 3) << 4 | (c[2] & 3) << 2 | (c[3] & 3)) as u8;
    e[26] = ((c[4] & 3) << 6 | (c[5] & 3) << 4 | (c[6] & 3) << 2 | (c[7] & 3)) as u8;
    for (i, v) in c.iter().enumerate() {
        e[27 + i] = (v >> 2) as u8;
    }
    // No established timings (35..38); standard timings unused (38..54).
    e[38..54].fill(0x01);

    // Detailed timing descriptor 1: the preferred mode.
    // Reduced blanking in the manner of CVT-RB (160-pixel horizontal blank, at
    // least 460 us of vertical blank at 60 Hz), widened for small modes so that
    // 60 Hz needs at least the 10 MHz pixel clock EDID consumers expect
    // (420 x 400 x 60 Hz = 10.08 MHz).
    let h_front: u32 = 48;
    let h_sync: u32 = 32;
    let h_blank = 160u32.max(420u32.saturating_sub(w));
    let v_front: u32 = 3;
    let v_sync: u32 = 6;
    let v_blank = (h * 460)
        .div_ceil(16_207)
        .max(v_front + v_sync + 6)
        .max(400u32.saturating_sub(h));
    let h_total = u64::from(w + h_blank);
    let v_total = u64::from(h + v_blank);
    let clock_10khz = (60 * h_total * v_total).div_ceil(10_000).clamp(1, 0xffff);
    let d = &mut e[54..72];
    d[0..2].copy_from_slice(&(clock_10khz as u16).to_le_bytes());
    d[2] = w as u8;
    d[3] = h_blank as u8;
    d[4] = ((w >> 8) << 4 | (h_blank >> 8)) as u8;
    d[5] = h as u8;
    d[6] = v_blank as u8;
    d[7] = ((h >> 8) << 4 | (v_blank >> 8)) as u8;
    d[8] = h_front as u8;
    d[9] = h_sync as u8;
    d[10] = ((v_front & 0xf) << 4 | (v_sync & 0xf)) as u8;
    d[11] = ((h_front >> 8) << 6 | (h_sync >> 8) << 4 | (v_front >> 4) << 2 | (v_sync >> 4)) as u8;
    d[12] = mm_w as u8;
    d[13] = mm_h as u8;
    d[14] = ((mm_w >> 8) << 4 | (mm_h >> 8)) as u8;
    d[17] = 0x1e; // digital separate sync, both polarities positive

    // Descriptor 2: range limits around the mode actually produced.
    let pixel_hz = clock_10khz * 10_000;
    let refresh = (pixel_hz / (h_total * v_total)) as u32;
    let line_khz = (pixel_hz / h_total / 1000) as u32;
    let r = &mut e[72..90];
    r[3] = 0xfd;
    r[5] = refresh.clamp(1, 50) as u8;
    r[6] = (refresh + 1).clamp(75, 255) as u8;
    r[7] = line_khz.clamp(1, 30) as u8;
    r[8] = (line_khz + 1).clamp(90, 255) as u8;
    r[9] = (clock_10khz.div_ceil(1000) as u32).clamp(1, 255) as u8; // 10 MHz units
    r[10] = 0; // no secondary timing formula
    r[11] = 0x0a;
    r[12..18].fill(0x20);

    // Descriptor 3: monitor name.
    let n = &mut e[90..108];
    n[3] = 0xfc;
    let name = b"GPU-PV\n";
    n[5..5 + name.len()].copy_from_slice(name);
    n[5 + name.len()..].fill(0x20);

    // Descriptor 4: dummy.
    e[108 + 3] = 0x10;

    e[126] = 0; // no extension blocks
    let sum = e[..127].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use proptest::prelude::*;

    fn hdr(type_: u32) -> CtrlHdr {
        CtrlHdr {
            type_,
            ..CtrlHdr::default()
        }
    }

    fn req(cmd: Command) -> Request {
        Request {
            hdr: hdr(cmd.type_()),
            cmd,
        }
    }

    fn bytes_of(r: &Request) -> Vec<u8> {
        let mut out = Vec::new();
        encode(r, &mut out);
        out
    }

    /// Hand-assembled wire bytes: header then little-endian u32 words.
    fn wire(type_: u32, flags: u32, fence: u64, words: &[u32]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&type_.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&fence.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        for w in words {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b
    }

    const R: Rect = Rect {
        x: 8,
        y: 16,
        width: 640,
        height: 2,
    };

    fn every_command() -> Vec<Command> {
        let pos = CursorPos {
            scanout_id: 0,
            x: 100,
            y: 200,
            padding: 0,
        };
        vec![
            Command::GetDisplayInfo,
            Command::GetEdid { scanout: 1 },
            Command::ResourceCreate2d {
                resource_id: 2,
                format: wire::format::B8G8R8X8_UNORM,
                width: 1280,
                height: 800,
            },
            Command::ResourceUnref { resource_id: 2 },
            Command::SetScanout {
                rect: R,
                scanout_id: 0,
                resource_id: 2,
            },
            Command::ResourceFlush {
                rect: R,
                resource_id: 2,
            },
            Command::TransferToHost2d {
                rect: R,
                offset: 16 * 5120 + 8 * 4,
                resource_id: 2,
            },
            Command::ResourceAttachBacking {
                resource_id: 2,
                entries: vec![
                    MemEntry {
                        addr: 0x1_0000_0000,
                        length: 0x40_0000,
                        padding: 0,
                    },
                    MemEntry {
                        addr: 0x2000,
                        length: 0x1000,
                        padding: 0,
                    },
                ],
            },
            Command::ResourceDetachBacking { resource_id: 2 },
            Command::UpdateCursor {
                pos,
                resource_id: 3,
                hot_x: 1,
                hot_y: 2,
            },
            Command::MoveCursor { pos },
        ]
    }

    #[test]
    fn wire_bytes_match_the_spec_layouts() {
        let transfer = req(Command::TransferToHost2d {
            rect: R,
            offset: 0x1_0000_0020,
            resource_id: 2,
        });
        let mut expected = wire(wire::CMD_TRANSFER_TO_HOST_2D, 0, 0, &[8, 16, 640, 2]);
        expected.extend_from_slice(&0x1_0000_0020u64.to_le_bytes());
        expected.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bytes_of(&transfer), expected);

        let mut fenced = req(Command::ResourceFlush {
            rect: R,
            resource_id: 9,
        });
        fenced.hdr.flags = wire::FLAG_FENCE;
        fenced.hdr.fence_id = 289;
        let expected = wire(
            wire::CMD_RESOURCE_FLUSH,
            wire::FLAG_FENCE,
            289,
            &[8, 16, 640, 2, 9, 0],
        );
        assert_eq!(bytes_of(&fenced), expected);

        let attach = &every_command()[7];
        let expected = wire(
            wire::CMD_RESOURCE_ATTACH_BACKING,
            0,
            0,
            &[2, 2, 0, 1, 0x40_0000, 0, 0x2000, 0, 0x1000, 0],
        );
        assert_eq!(bytes_of(&req(attach.clone())), expected);

        let cursor = &every_command()[9];
        let expected = wire(wire::CMD_UPDATE_CURSOR, 0, 0, &[0, 100, 200, 0, 3, 1, 2, 0]);
        assert_eq!(bytes_of(&req(cursor.clone())), expected);

        let create = &every_command()[2];
        let expected = wire(wire::CMD_RESOURCE_CREATE_2D, 0, 0, &[2, 2, 1280, 800]);
        assert_eq!(bytes_of(&req(create.clone())), expected);
    }

    #[test]
    fn every_command_has_its_spec_size_and_round_trips() {
        let sizes = [
            size::GET_DISPLAY_INFO,
            size::GET_EDID,
            size::RESOURCE_CREATE_2D,
            size::RESOURCE_UNREF,
            size::SET_SCANOUT,
            size::RESOURCE_FLUSH,
            size::TRANSFER_TO_HOST_2D,
            size::RESOURCE_ATTACH_BACKING + 2 * 16,
            size::RESOURCE_DETACH_BACKING,
            size::CURSOR,
            size::CURSOR,
        ];
        for (cmd, len) in every_command().into_iter().zip(sizes) {
            let r = req(cmd);
            let b = bytes_of(&r);
            assert_eq!(b.len(), len, "{:?}", r.cmd);
            assert_eq!(decode(&b), Ok(r.clone()));
            // Trailing bytes are ignored.
            let mut longer = b.clone();
            longer.extend_from_slice(&[0xff; 8]);
            assert_eq!(decode(&longer), Ok(r.clone()));
            // One byte short is a typed error naming what was needed.
            let short = &b[..len - 1];
            let expected = if len == CtrlHdr::SIZE {
                DecodeError::ShortHeader
            } else {
                DecodeError::ShortCommand {
                    type_: r.cmd.type_(),
                    needed: len,
                    got: len - 1,
                }
            };
            assert_eq!(decode(short), Err(expected), "{:?}", r.cmd);
        }
    }

    #[test]
    fn encode_takes_the_type_from_the_command_and_appends() {
        let mut r = req(Command::ResourceUnref { resource_id: 5 });
        r.hdr.type_ = wire::CMD_GET_CAPSET;
        let mut out = vec![0xee];
        encode(&r, &mut out);
        assert_eq!(out[0], 0xee);
        assert_eq!(
            decode(&out[1..]).unwrap().hdr.type_,
            wire::CMD_RESOURCE_UNREF
        );
    }

    #[test]
    fn malformed_commands_are_typed_errors() {
        assert_eq!(decode(&[]), Err(DecodeError::ShortHeader));
        assert_eq!(decode(&[0; 23]), Err(DecodeError::ShortHeader));
        for t in [
            0,
            wire::CMD_GET_CAPSET_INFO,
            wire::CMD_GET_CAPSET,
            0x0200, // CTX_CREATE (3D)
            0x010c, // RESOURCE_CREATE_BLOB
            wire::RESP_OK_NODATA,
            u32::MAX,
        ] {
            assert_eq!(
                decode(&wire(t, 0, 0, &[0; 10])),
                Err(DecodeError::UnsupportedType(t))
            );
        }
        for flags in [wire::FLAG_INFO_RING_IDX, 4, u32::MAX] {
            assert_eq!(
                decode(&wire(wire::CMD_GET_DISPLAY_INFO, flags, 0, &[])),
                Err(DecodeError::BadFlags(flags))
            );
        }
        let ab = wire::CMD_RESOURCE_ATTACH_BACKING;
        let max = limits::MAX_BACKING_ENTRIES;
        assert_eq!(
            decode(&wire(ab, 0, 0, &[1, max + 1])),
            Err(DecodeError::TooManyEntries(max + 1))
        );
        assert_eq!(
            decode(&wire(ab, 0, 0, &[1, u32::MAX])),
            Err(DecodeError::TooManyEntries(u32::MAX))
        );
        // Entries counted against the bytes present.
        assert_eq!(
            decode(&wire(ab, 0, 0, &[1, 2, 0, 0, 0x1000, 0])),
            Err(DecodeError::ShortCommand {
                type_: ab,
                needed: 64,
                got: 48
            })
        );
        let mut full = wire(ab, 0, 0, &[1, max]);
        full.resize(32 + 16 * max as usize, 0);
        match decode(&full) {
            Ok(Request {
                cmd: Command::ResourceAttachBacking { entries, .. },
                ..
            }) => assert_eq!(entries.len(), max as usize),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(&wire(ab, 0, 0, &[1, 0])),
            Ok(Request {
                cmd: Command::ResourceAttachBacking { .. },
                ..
            })
        ));
    }

    #[test]
    fn decode_errors_map_to_virtio_error_responses() {
        let unspec = [
            DecodeError::ShortHeader,
            DecodeError::ShortCommand {
                type_: 0x105,
                needed: 56,
                got: 24,
            },
            DecodeError::UnsupportedType(0x200),
            DecodeError::ShortResponse {
                type_: 0x1101,
                needed: 408,
                got: 24,
            },
            DecodeError::UnknownResponse(7),
            DecodeError::BadEdidSize(2000),
        ];
        for e in unspec {
            assert_eq!(e.response_type(), wire::RESP_ERR_UNSPEC, "{e:?}");
        }
        for e in [DecodeError::TooManyEntries(5000), DecodeError::BadFlags(2)] {
            assert_eq!(e.response_type(), wire::RESP_ERR_INVALID_PARAMETER, "{e:?}");
        }
    }

    #[test]
    fn responses_echo_the_fence_and_have_linux_sizes() {
        let fenced = CtrlHdr {
            type_: wire::CMD_TRANSFER_TO_HOST_2D,
            flags: wire::FLAG_FENCE,
            fence_id: 289,
            ctx_id: 3,
            ring_idx: 0,
            padding: [0; 3],
        };
        let mut out = Vec::new();
        Response::OkNoData.encode(&fenced, &mut out);
        assert_eq!(out.len(), size::RESP_NODATA);
        let (h, r) = Response::decode(&out).unwrap();
        assert_eq!(r, Response::OkNoData);
        assert_eq!(
            h,
            CtrlHdr {
                type_: wire::RESP_OK_NODATA,
                ..fenced
            }
        );

        // Unfenced requests get no fence id or context back.
        let plain = CtrlHdr { flags: 0, ..fenced };
        out.clear();
        Response::Err(wire::RESP_ERR_INVALID_RESOURCE_ID).encode(&plain, &mut out);
        assert_eq!(
            Response::decode(&out),
            Ok((
                hdr(wire::RESP_ERR_INVALID_RESOURCE_ID),
                Response::Err(wire::RESP_ERR_INVALID_RESOURCE_ID)
            ))
        );

        // A ring index is echoed with its flag.
        let ringed = CtrlHdr {
            flags: wire::FLAG_INFO_RING_IDX,
            ring_idx: 2,
            ..fenced
        };
        out.clear();
        Response::OkNoData.encode(&ringed, &mut out);
        let (h, _) = Response::decode(&out).unwrap();
        assert_eq!(
            (h.flags, h.ring_idx, h.fence_id),
            (wire::FLAG_INFO_RING_IDX, 2, 0)
        );

        let info = Response::DisplayInfo(vec![(
            Rect {
                x: 0,
                y: 0,
                width: 1280,
                height: 800,
            },
            true,
        )]);
        out.clear();
        info.encode(&plain, &mut out);
        assert_eq!(out.len(), size::RESP_DISPLAY_INFO);
        let pmode: Vec<u8> = [0u32, 0, 1280, 800, 1, 0]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(&out[24..48], &pmode[..]);
        assert!(out[48..].iter().all(|&b| b == 0));
        assert_eq!(Response::decode(&out).unwrap().1, info);

        let edid = Response::Edid(edid_for(1280, 800).to_vec());
        out.clear();
        edid.encode(&plain, &mut out);
        assert_eq!(out.len(), size::RESP_EDID);
        assert_eq!(&out[24..28], &128u32.to_le_bytes());
        assert_eq!(Response::decode(&out).unwrap().1, edid);

        // Over-long input is cut to what the wire can carry.
        out.clear();
        Response::Edid(vec![7; 2000]).encode(&plain, &mut out);
        assert_eq!(out.len(), size::RESP_EDID);
        assert_eq!(
            Response::decode(&out).unwrap().1,
            Response::Edid(vec![7; 1024])
        );
        out.clear();
        Response::DisplayInfo(vec![(R, true); 20]).encode(&plain, &mut out);
        assert_eq!(out.len(), size::RESP_DISPLAY_INFO);
        assert_eq!(
            Response::decode(&out).unwrap().1,
            Response::DisplayInfo(vec![(R, true); 16])
        );
    }

    #[test]
    fn malformed_responses_are_typed_errors() {
        assert_eq!(Response::decode(&[0; 10]), Err(DecodeError::ShortHeader));
        let short_info = wire(wire::RESP_OK_DISPLAY_INFO, 0, 0, &[0; 10]);
        assert_eq!(
            Response::decode(&short_info),
            Err(DecodeError::ShortResponse {
                type_: wire::RESP_OK_DISPLAY_INFO,
                needed: size::RESP_DISPLAY_INFO,
                got: 64
            })
        );
        let short_edid = wire(wire::RESP_OK_EDID, 0, 0, &[128, 0]);
        assert!(matches!(
            Response::decode(&short_edid),
            Err(DecodeError::ShortResponse { needed: 1056, .. })
        ));
        let mut bad_size = wire(wire::RESP_OK_EDID, 0, 0, &[1025, 0]);
        bad_size.resize(size::RESP_EDID, 0);
        assert_eq!(
            Response::decode(&bad_size),
            Err(DecodeError::BadEdidSize(1025))
        );
        for t in [0, wire::CMD_GET_DISPLAY_INFO, 0x1102, 0x1300] {
            assert_eq!(
                Response::decode(&wire(t, 0, 0, &[])),
                Err(DecodeError::UnknownResponse(t))
            );
        }
    }

    fn checksum_ok(e: &[u8; 128]) -> bool {
        e.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    /// The preferred mode's active size, from detailed timing descriptor 1.
    fn dtd_size(e: &[u8; 128]) -> (u32, u32) {
        let d = &e[54..72];
        let w = u32::from(d[2]) | (u32::from(d[4] >> 4) << 8);
        let h = u32::from(d[5]) | (u32::from(d[7] >> 4) << 8);
        (w, h)
    }

    #[test]
    fn edid_is_a_valid_1_3_block_for_the_mode() {
        let e = edid_for(1280, 800);
        assert_eq!(&e[0..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!((e[18], e[19]), (1, 3));
        assert!(checksum_ok(&e));
        assert_eq!(dtd_size(&e), (1280, 800));
        assert_ne!(u16::from_le_bytes([e[54], e[55]]), 0, "pixel clock");
        assert_eq!(e[24] & 0x02, 0x02, "preferred timing is descriptor 1");
        // Descriptors 2..4: range limits, name, dummy (display descriptors).
        assert_eq!(&e[72..76], &[0, 0, 0, 0xfd]);
        assert_eq!(&e[90..96], &[0, 0, 0, 0xfc, 0, b'G']);
        assert_eq!(&e[108..112], &[0, 0, 0, 0x10]);
        assert_eq!(e[126], 0, "no extensions");
        // The range limits admit the mode: 1280x800 at 60 Hz.
        let clock = u64::from(u16::from_le_bytes([e[54], e[55]])) * 10_000;
        let d = &e[54..72];
        let htotal = 1280 + (u64::from(d[3]) | (u64::from(d[4] & 0xf) << 8));
        let vtotal = 800 + (u64::from(d[6]) | (u64::from(d[7] & 0xf) << 8));
        let hz = clock / (htotal * vtotal);
        assert!((59..=60).contains(&hz), "{hz}");
        assert!(u64::from(e[77]) <= hz && hz <= u64::from(e[78]));
        let khz = clock / htotal / 1000;
        assert!(u64::from(e[79]) <= khz && khz <= u64::from(e[80]));
    }

    #[test]
    fn edid_clamps_sizes_a_detailed_timing_cannot_hold() {
        assert_eq!(dtd_size(&edid_for(0, 0)), (1, 1));
        assert_eq!(dtd_size(&edid_for(5000, 100_000)), (4095, 4095));
        assert!(checksum_ok(&edid_for(u32::MAX, u32::MAX)));
    }

    fn arb_rect() -> impl Strategy<Value = Rect> {
        any::<[u32; 4]>().prop_map(|[x, y, width, height]| Rect {
            x,
            y,
            width,
            height,
        })
    }

    fn arb_pos() -> impl Strategy<Value = CursorPos> {
        any::<[u32; 4]>().prop_map(|[scanout_id, x, y, padding]| CursorPos {
            scanout_id,
            x,
            y,
            padding,
        })
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let entry =
            (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(addr, length, padding)| {
                MemEntry {
                    addr,
                    length,
                    padding,
                }
            });
        prop_oneof![
            Just(Command::GetDisplayInfo),
            any::<u32>().prop_map(|scanout| Command::GetEdid { scanout }),
            any::<[u32; 4]>().prop_map(|[resource_id, format, width, height]| {
                Command::ResourceCreate2d {
                    resource_id,
                    format,
                    width,
                    height,
                }
            }),
            any::<u32>().prop_map(|resource_id| Command::ResourceUnref { resource_id }),
            (arb_rect(), any::<u32>(), any::<u32>()).prop_map(|(rect, scanout_id, resource_id)| {
                Command::SetScanout {
                    rect,
                    scanout_id,
                    resource_id,
                }
            }),
            (arb_rect(), any::<u32>())
                .prop_map(|(rect, resource_id)| Command::ResourceFlush { rect, resource_id }),
            (arb_rect(), any::<u64>(), any::<u32>()).prop_map(|(rect, offset, resource_id)| {
                Command::TransferToHost2d {
                    rect,
                    offset,
                    resource_id,
                }
            }),
            (any::<u32>(), proptest::collection::vec(entry, 0..100)).prop_map(
                |(resource_id, entries)| Command::ResourceAttachBacking {
                    resource_id,
                    entries,
                }
            ),
            any::<u32>().prop_map(|resource_id| Command::ResourceDetachBacking { resource_id }),
            (arb_pos(), any::<[u32; 3]>()).prop_map(|(pos, [resource_id, hot_x, hot_y])| {
                Command::UpdateCursor {
                    pos,
                    resource_id,
                    hot_x,
                    hot_y,
                }
            }),
            arb_pos().prop_map(|pos| Command::MoveCursor { pos }),
        ]
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        (
            arb_command(),
            any::<bool>(),
            any::<u64>(),
            any::<u32>(),
            any::<u8>(),
            any::<[u8; 3]>(),
        )
            .prop_map(
                |(cmd, fence, fence_id, ctx_id, ring_idx, padding)| Request {
                    hdr: CtrlHdr {
                        type_: cmd.type_(),
                        flags: if fence { wire::FLAG_FENCE } else { 0 },
                        fence_id,
                        ctx_id,
                        ring_idx,
                        padding,
                    },
                    cmd,
                },
            )
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        let mode = (arb_rect(), any::<bool>());
        prop_oneof![
            Just(Response::OkNoData),
            proptest::collection::vec(mode, 0..=16).prop_map(|mut v| {
                // Trailing all-zero entries are indistinguishable from absent ones.
                while v.last() == Some(&(Rect::default(), false)) {
                    v.pop();
                }
                Response::DisplayInfo(v)
            }),
            proptest::collection::vec(any::<u8>(), 0..=1024).prop_map(Response::Edid),
            (0x1200u32..=0x12ff).prop_map(Response::Err),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn decode_inverts_encode(r in arb_request()) {
            let b = bytes_of(&r);
            prop_assert_eq!(decode(&b), Ok(r));
        }

        #[test]
        fn decode_never_panics_on_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(r) = decode(&b) {
                // What decodes re-encodes to a prefix-compatible command.
                let again = bytes_of(&r);
                prop_assert!(again.len() <= b.len());
                prop_assert_eq!(decode(&again), Ok(r));
            }
            let _ = Response::decode(&b);
        }

        #[test]
        fn decode_never_panics_on_plausible_headers(
            t in prop_oneof![0x100u32..0x10c, 0x300u32..0x302, 0x1100u32..0x1106, 0x1200u32..0x1206],
            flags in 0u32..4,
            body in proptest::collection::vec(any::<u8>(), 0..1100),
        ) {
            let mut b = wire(t, flags, 0, &[]);
            b.extend_from_slice(&body);
            if let Ok(r) = decode(&b) {
                prop_assert_eq!(decode(&bytes_of(&r)), Ok(r));
            }
            if let Ok((h, resp)) = Response::decode(&b) {
                let mut out = Vec::new();
                resp.encode(&h, &mut out);
                prop_assert_eq!(Response::decode(&out).map(|x| x.1), Ok(resp));
            }
        }

        #[test]
        fn responses_round_trip(resp in arb_response(), fenced in any::<bool>(), fence_id in any::<u64>()) {
            let req = CtrlHdr {
                type_: wire::CMD_GET_EDID,
                flags: if fenced { wire::FLAG_FENCE } else { 0 },
                fence_id,
                ..CtrlHdr::default()
            };
            let mut out = Vec::new();
            resp.encode(&req, &mut out);
            let (h, back) = Response::decode(&out).unwrap();
            prop_assert_eq!(back, resp);
            prop_assert_eq!(h.fence_id, if fenced { fence_id } else { 0 });
            prop_assert_eq!(h.flags, req.flags);
        }

        #[test]
        fn edid_checksum_and_mode_hold_for_any_size(w in 1u32..=4095, h in 1u32..=4095) {
            let e = edid_for(w, h);
            prop_assert!(checksum_ok(&e));
            prop_assert_eq!(dtd_size(&e), (w, h));
        }
    }
}
