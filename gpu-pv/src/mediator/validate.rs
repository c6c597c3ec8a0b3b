//! Validation and renaming of one decoded command.
//!
//! Each command is checked completely before anything is changed, so a refused
//! command leaves the VM's context exactly as it was; an accepted one is rewritten
//! into host terms (host resource id, physical scanout, host-physical backing) and
//! its bookkeeping (resource table, VRAM, scanout state, IOMMU mappings) is
//! committed in the same step.

use alloc::vec::Vec;

use crate::abi::limits;
use crate::budget::cost;
use crate::command::{self, Command, Response};
use crate::counters::RejectReason;
use crate::memory::{Gpa, GuestMemory, Hpa, MemError};
use crate::wire::{self, format, CursorPos, MemEntry, Rect};

use super::vm::{resource_bytes, Backing, Effect, HostRun, Resource, ScanoutState, VmGpu};
use super::{Band, BandCopy, IommuOp, Shared};

/// Granule in which a backing range that is not host-contiguous as a whole is
/// translated.
const PAGE_SIZE: u64 = 4096;

/// Backing may exceed the resource's size only up to the next multiple of this
/// (a guest backs a resource with whole pages, at most huge ones). Bounds the
/// translation work of one command by the VM's VRAM quota.
pub(super) const BACKING_SLACK: u64 = 2 << 20;

/// Smallest scanout rectangle edge the device accepts (QEMU's limit): refused
/// here already, so the VM's recorded scanout state never disagrees with the
/// device.
pub(super) const MIN_SCANOUT_EDGE: u32 = 16;

/// How an accepted command proceeds.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Answered by the mediator from the VM's virtual display.
    Emulated(Response),
    /// Goes to the GPU, renamed into host terms.
    Host {
        /// The host command.
        cmd: Command,
        /// What its completion must do.
        effect: Effect,
        /// Copies into a shared head's composite the hypervisor makes first.
        copies: Vec<BandCopy>,
        /// Hypervisor memory charged to the VM (already) until the command
        /// completes: the staged command and what its effect holds.
        charge: u64,
        /// Room reserved for the command's encoding (empty: it is small).
        buf: Vec<u8>,
    },
}

/// A refused command: why, what the guest is answered, and the guest address
/// that failed translation, if that was the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rejection {
    /// Counter it is charged to.
    pub reason: RejectReason,
    /// Response type for the guest.
    pub response: u32,
    /// `(gpa, len, error)` of a refused translation.
    pub fault: Option<(Gpa, u64, MemError)>,
}

impl Rejection {
    fn new(reason: RejectReason, response: u32) -> Self {
        Self {
            reason,
            response,
            fault: None,
        }
    }
    /// Answered with `ERR_UNSPEC`.
    pub fn unspec(reason: RejectReason) -> Self {
        Self::new(reason, wire::RESP_ERR_UNSPEC)
    }
    /// Answered with `ERR_INVALID_PARAMETER`.
    pub fn param(reason: RejectReason) -> Self {
        Self::new(reason, wire::RESP_ERR_INVALID_PARAMETER)
    }
    fn resource() -> Self {
        Self::new(
            RejectReason::BadResource,
            wire::RESP_ERR_INVALID_RESOURCE_ID,
        )
    }
    fn scanout() -> Self {
        Self::new(RejectReason::BadScanout, wire::RESP_ERR_INVALID_SCANOUT_ID)
    }
    fn out_of_memory() -> Self {
        Self::new(RejectReason::Quota, wire::RESP_ERR_OUT_OF_MEMORY)
    }
    /// The VM's hypervisor memory budget (or the hypervisor's memory) cannot hold
    /// what the command needs.
    pub fn over_budget() -> Self {
        Self::new(RejectReason::HvMemory, wire::RESP_ERR_OUT_OF_MEMORY)
    }
    fn memory(gpa: Gpa, len: u64, error: MemError) -> Self {
        Self {
            reason: error.into(),
            response: wire::RESP_ERR_UNSPEC,
            fault: Some((gpa, len, error)),
        }
    }
}

/// Charges `bytes` to the VM's budget, or refuses the command.
fn charge(sh: &mut Shared, v: &mut VmGpu, bytes: u64) -> Result<(), Rejection> {
    sh.charge(v, bytes).map_err(|_| Rejection::over_budget())
}

/// What staging `cmd` with `copies` band copies keeps until it completes: the
/// command, and for `ATTACH_BACKING` its entries twice (the request and its
/// encoding).
pub(super) fn command_charge(cmd: &Command, copies: usize) -> u64 {
    let entries = match cmd {
        Command::ResourceAttachBacking { entries, .. } => entries.len() as u64,
        _ => 0,
    };
    cost::COMMAND + 2 * cost::ENTRY * entries + cost::COPY * copies as u64
}

/// What a backing keeps until it is detached and unmapped: its record, its guest
/// entries, its host runs, and a grant record per page the GPU may reach.
pub(super) fn backing_charge(guest: usize, host: &[HostRun]) -> u64 {
    let pages: u64 = host
        .iter()
        .map(|r| cost::pages(r.hpa.get(), u64::from(r.len)))
        .sum();
    cost::BACKING + cost::ENTRY * guest as u64 + cost::RUN * host.len() as u64 + cost::PAGE * pages
}

/// Room for the encoding of an `ATTACH_BACKING` of `entries` entries, reserved
/// without panicking when memory is short.
pub(super) fn encoding_buffer(entries: usize) -> Result<Vec<u8>, Rejection> {
    let mut buf = Vec::new();
    buf.try_reserve_exact(wire::size::RESOURCE_ATTACH_BACKING + 16 * entries)
        .map_err(|_| Rejection::over_budget())?;
    Ok(buf)
}

/// The band (and the display's width and height) of the VM's scanout `id`, if that
/// scanout is shown in a band of a shared head.
pub(super) fn band_of(v: &VmGpu, id: u32) -> Option<(Band, u32, u32)> {
    let band = v.config.bands.iter().find(|b| b.scanout == id)?;
    let s = v.config.scanouts.get(id as usize)?;
    Some((*band, s.width, s.height))
}

/// The band whose display guest resource `id` is on now, if any.
fn banded_resource(v: &VmGpu, id: u32) -> Option<(Band, u32, u32)> {
    v.scanouts
        .iter()
        .enumerate()
        .filter(|(_, s)| s.resource == id)
        .find_map(|(i, _)| band_of(v, i as u32))
}

/// The host transfer of a guest's `rect` (at `offset` in its `w` x `h` resource's
/// backing `b`) into its band of the composite, and the copies of those pixels from
/// the guest's pages into the band that the hypervisor makes first. Rows are copied
/// as QEMU reads a transfer: row `i` from `offset + i * stride`.
pub(super) fn band_transfer(
    band: &Band,
    w: u32,
    h: u32,
    rect: &Rect,
    offset: u64,
    b: &Backing,
) -> Result<(Command, Vec<BandCopy>), Rejection> {
    let stride = u64::from(w) * 4;
    let top = u64::from(band.index) * u64::from(h);
    let dst0 = (top + u64::from(rect.y)) * stride + u64::from(rect.x) * 4;
    let row = u64::from(rect.width) * 4;
    // Each copy ends at a row's end or a run's: room for all of them is reserved
    // (fallibly) before the walk, which then never grows the list.
    let mut copies = Vec::new();
    copies
        .try_reserve_exact((rect.height as usize).saturating_add(b.host.len()))
        .map_err(|_| Rejection::over_budget())?;
    let mut cursor = RunCursor::default();
    if rect.x == 0 && rect.width == w {
        // Whole rows, back to back on both sides: one range.
        backing_runs(
            b,
            &mut cursor,
            offset,
            row * u64::from(rect.height),
            dst0,
            &mut copies,
        );
    } else {
        for i in 0..u64::from(rect.height) {
            let (off, dst) = (offset + i * stride, dst0 + i * stride);
            backing_runs(b, &mut cursor, off, row, dst, &mut copies);
        }
    }
    let cmd = Command::TransferToHost2d {
        rect: Rect {
            y: rect.y + band.index * h,
            ..*rect
        },
        offset: dst0,
        resource_id: band.host_resource,
    };
    Ok((cmd, copies))
}

/// Where the previous row's copies ended in a backing's runs: rows come at rising
/// offsets, so each row resumes the walk there instead of from the first run, and a
/// transfer costs O(rows + runs), not O(rows x runs), under the GPU-PV lock.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct RunCursor {
    /// Index of the run to look at first.
    idx: usize,
    /// Backing offset of that run's first byte.
    at: u64,
}

/// Appends the copies of bytes `[off, off + len)` of backing `b` (host runs) to
/// `dst..` of the composite. `off` must not lie before where `cursor` stopped.
pub(super) fn backing_runs(
    b: &Backing,
    cursor: &mut RunCursor,
    off: u64,
    len: u64,
    dst: u64,
    out: &mut Vec<BandCopy>,
) {
    let (mut off, mut left, mut dst) = (off, len, dst);
    while left > 0 {
        let Some(e) = b.host.get(cursor.idx) else {
            break;
        };
        let elen = u64::from(e.len);
        if off >= cursor.at + elen {
            cursor.at += elen;
            cursor.idx += 1;
            continue;
        }
        let within = off.saturating_sub(cursor.at);
        let n = (elen - within).min(left);
        out.push(BandCopy {
            src: Some(e.hpa.offset(within)),
            dst,
            len: n,
        });
        off += n;
        dst += n;
        left -= n;
    }
}

/// The host commands that blank a band: zeros copied into it, its transfer and
/// its flush.
pub(super) fn blank_band(band: &Band, w: u32, h: u32) -> (Command, Command, Vec<BandCopy>) {
    let stride = u64::from(w) * 4;
    let top = u64::from(band.index) * u64::from(h) * stride;
    let rect = Rect {
        x: 0,
        y: band.index * h,
        width: w,
        height: h,
    };
    let copies = alloc::vec![BandCopy {
        src: None,
        dst: top,
        len: stride * u64::from(h),
    }];
    let transfer = Command::TransferToHost2d {
        rect,
        offset: top,
        resource_id: band.host_resource,
    };
    let flush = Command::ResourceFlush {
        rect,
        resource_id: band.host_resource,
    };
    (transfer, flush, copies)
}

/// The physical scanout behind the VM's scanout `id`.
fn physical_scanout(v: &VmGpu, id: u32) -> Result<u32, Rejection> {
    usize::try_from(id)
        .ok()
        .and_then(|i| v.config.scanouts.get(i))
        .map(|s| s.physical)
        .ok_or_else(Rejection::scanout)
}

/// The VM's resource `id` (never 0, never another VM's).
fn resource(v: &VmGpu, id: u32) -> Result<&Resource, Rejection> {
    v.resources.get(&id).ok_or_else(Rejection::resource)
}

/// A rectangle that lies inside the resource.
fn check_rect(r: &Resource, rect: &Rect) -> Result<(), Rejection> {
    if rect.fits_in(r.width, r.height) {
        Ok(())
    } else {
        Err(Rejection::param(RejectReason::BadParameter))
    }
}

/// A cursor position on one of the VM's scanouts, renamed to the physical one.
fn cursor_pos(v: &VmGpu, pos: &CursorPos) -> Result<CursorPos, Rejection> {
    Ok(CursorPos {
        scanout_id: physical_scanout(v, pos.scanout_id)?,
        x: pos.x,
        y: pos.y,
        padding: 0,
    })
}

/// Validates `cmd` for `v` and, if accepted, commits its bookkeeping and returns
/// it in host terms.
pub(super) fn validate(
    sh: &mut Shared,
    v: &mut VmGpu,
    cmd: &Command,
    mem: &dyn GuestMemory,
) -> Result<Outcome, Rejection> {
    match *cmd {
        Command::GetDisplayInfo => display_info(v),
        Command::GetEdid { scanout } => edid(v, scanout),
        Command::ResourceCreate2d {
            resource_id,
            format,
            width,
            height,
        } => create_2d(sh, v, resource_id, format, width, height),
        Command::ResourceUnref { resource_id } => unref(sh, v, resource_id),
        Command::SetScanout {
            rect,
            scanout_id,
            resource_id,
        } if band_of(v, scanout_id).is_some() => set_band_scanout(v, rect, scanout_id, resource_id),
        Command::SetScanout {
            rect,
            scanout_id,
            resource_id,
        } => set_scanout(sh, v, rect, scanout_id, resource_id),
        Command::ResourceFlush { rect, resource_id } => flush(sh, v, rect, resource_id),
        Command::TransferToHost2d {
            rect,
            offset,
            resource_id,
        } => transfer_to_host(sh, v, rect, offset, resource_id),
        Command::ResourceAttachBacking {
            resource_id,
            ref entries,
        } => attach_backing(sh, v, mem, resource_id, entries),
        Command::ResourceDetachBacking { resource_id } => detach_backing(v, resource_id),
        // A shared head has one hardware cursor and several VMs: a VM shown in a band
        // gets no cursor (its cursor commands are taken and dropped, after the same
        // checks), so no VM moves a cursor over another's band.
        Command::UpdateCursor {
            pos, resource_id, ..
        } if band_of(v, pos.scanout_id).is_some() => {
            cursor_pos(v, &pos)?;
            if resource_id != 0 {
                resource(v, resource_id)?;
            }
            Ok(Outcome::Emulated(Response::OkNoData))
        }
        Command::MoveCursor { pos } if band_of(v, pos.scanout_id).is_some() => {
            cursor_pos(v, &pos)?;
            Ok(Outcome::Emulated(Response::OkNoData))
        }
        Command::UpdateCursor {
            pos,
            resource_id,
            hot_x,
            hot_y,
        } => update_cursor(sh, v, pos, resource_id, hot_x, hot_y),
        Command::MoveCursor { pos } => {
            let pos = cursor_pos(v, &pos)?;
            pass_through(sh, v, Command::MoveCursor { pos })
        }
    }
}

/// A command that commits nothing but its own staging: charged, then sent.
fn pass_through(sh: &mut Shared, v: &mut VmGpu, cmd: Command) -> Result<Outcome, Rejection> {
    let c = command_charge(&cmd, 0);
    charge(sh, v, c)?;
    Ok(host(cmd, Effect::None, c))
}

/// `GET_DISPLAY_INFO`, answered from the VM's own scanouts.
fn display_info(v: &VmGpu) -> Result<Outcome, Rejection> {
    let modes = v
        .config
        .scanouts
        .iter()
        .map(|s| {
            let r = Rect {
                x: 0,
                y: 0,
                width: s.width,
                height: s.height,
            };
            (r, true)
        })
        .collect();
    Ok(Outcome::Emulated(Response::DisplayInfo(modes)))
}

/// `GET_EDID`, answered with an EDID for the scanout's size.
fn edid(v: &VmGpu, scanout: u32) -> Result<Outcome, Rejection> {
    physical_scanout(v, scanout)?;
    let s = v.config.scanouts[scanout as usize];
    let edid = command::edid_for(s.width, s.height);
    Ok(Outcome::Emulated(Response::Edid(edid.to_vec())))
}

/// `RESOURCE_CREATE_2D`: a fresh host id, the record and the VRAM charged.
fn create_2d(
    sh: &mut Shared,
    v: &mut VmGpu,
    resource_id: u32,
    format: u32,
    width: u32,
    height: u32,
) -> Result<Outcome, Rejection> {
    if resource_id == 0 || v.resources.contains_key(&resource_id) {
        return Err(Rejection::resource());
    }
    let dim_ok = |d: u32| (1..=limits::MAX_RESOURCE_DIM).contains(&d);
    if !format::is_known(format) || !dim_ok(width) || !dim_ok(height) {
        return Err(Rejection::param(RejectReason::BadParameter));
    }
    let bytes = resource_bytes(width, height);
    let over_quota = v.vram_used.saturating_add(bytes) > v.quota;
    let over_vram = sh.vram_used.saturating_add(bytes) > sh.vram_total;
    if v.resources.len() >= limits::MAX_RESOURCES_PER_VM || over_quota || over_vram {
        return Err(Rejection::out_of_memory());
    }
    // The record lives until the device dropped the resource; so do its
    // pixels when they are hypervisor memory.
    let record = cost::RESOURCE + if sh.vram_in_hv_memory { bytes } else { 0 };
    let c = cost::COMMAND;
    charge(sh, v, record + c)?;
    let Some(host_id) = sh.alloc_host_id() else {
        sh.release(v, record + c);
        return Err(Rejection::out_of_memory());
    };
    v.resources.insert(
        resource_id,
        Resource {
            host_id,
            format,
            width,
            height,
            backing: None,
        },
    );
    v.held.insert(host_id, record);
    v.vram_used += bytes;
    sh.vram_used += bytes;
    Ok(host(
        Command::ResourceCreate2d {
            resource_id: host_id,
            format,
            width,
            height,
        },
        Effect::Created {
            guest: resource_id,
            host: host_id,
        },
        c,
    ))
}

/// `RESOURCE_UNREF`: the host id goes with the device's completion.
fn unref(sh: &mut Shared, v: &mut VmGpu, resource_id: u32) -> Result<Outcome, Rejection> {
    let r = v
        .resources
        .remove(&resource_id)
        .ok_or_else(Rejection::resource)?;
    v.vram_used = v.vram_used.saturating_sub(r.bytes());
    sh.refund(r.bytes());
    // The device takes the resource off any scanout showing it.
    for s in v.scanouts.iter_mut().filter(|s| s.resource == resource_id) {
        *s = ScanoutState::default();
    }
    // The command was paid with the resource's record; what the backing
    // holds stays charged until the device is done with it.
    let (unmap, held) = r
        .backing
        .map_or((Vec::new(), 0), |b| (b.mappings().collect(), b.charge));
    Ok(host(
        Command::ResourceUnref {
            resource_id: r.host_id,
        },
        Effect::Released {
            host: r.host_id,
            unmap,
        },
        held,
    ))
}

/// `SET_SCANOUT` on a band of a shared head.
fn set_band_scanout(
    v: &mut VmGpu,
    rect: Rect,
    scanout_id: u32,
    resource_id: u32,
) -> Result<Outcome, Rejection> {
    // A band of a shared head: the head keeps showing the composite; the
    // resource must be exactly the display's size, shown whole.
    let Some((_, w, h)) = band_of(v, scanout_id) else {
        return Err(Rejection::scanout());
    };
    if resource_id != 0 {
        let r = resource(v, resource_id)?;
        let whole = Rect {
            x: 0,
            y: 0,
            width: w,
            height: h,
        };
        if r.width != w || r.height != h || rect != whole {
            return Err(Rejection::param(RejectReason::BadParameter));
        }
    }
    v.scanouts[scanout_id as usize] = ScanoutState {
        resource: resource_id,
        rect: if resource_id == 0 {
            Rect::default()
        } else {
            rect
        },
    };
    Ok(Outcome::Emulated(Response::OkNoData))
}

/// `SET_SCANOUT` on a head of the VM's own.
fn set_scanout(
    sh: &mut Shared,
    v: &mut VmGpu,
    rect: Rect,
    scanout_id: u32,
    resource_id: u32,
) -> Result<Outcome, Rejection> {
    let physical = physical_scanout(v, scanout_id)?;
    let (host_id, rect) = if resource_id == 0 {
        (0, Rect::default())
    } else {
        let r = resource(v, resource_id)?;
        check_rect(r, &rect)?;
        if rect.width < MIN_SCANOUT_EDGE || rect.height < MIN_SCANOUT_EDGE {
            return Err(Rejection::param(RejectReason::BadParameter));
        }
        (r.host_id, rect)
    };
    let cmd = Command::SetScanout {
        rect,
        scanout_id: physical,
        resource_id: host_id,
    };
    let c = command_charge(&cmd, 0);
    charge(sh, v, c)?;
    v.scanouts[scanout_id as usize] = ScanoutState {
        resource: resource_id,
        rect,
    };
    Ok(host(cmd, Effect::None, c))
}

/// `RESOURCE_FLUSH` (into the VM's band of a composite, if it has one).
fn flush(
    sh: &mut Shared,
    v: &mut VmGpu,
    rect: Rect,
    resource_id: u32,
) -> Result<Outcome, Rejection> {
    let r = resource(v, resource_id)?;
    check_rect(r, &rect)?;
    let host_id = r.host_id;
    if let Some((band, _, h)) = banded_resource(v, resource_id) {
        let cmd = Command::ResourceFlush {
            rect: Rect {
                y: rect.y + band.index * h,
                ..rect
            },
            resource_id: band.host_resource,
        };
        return pass_through(sh, v, cmd);
    }
    pass_through(
        sh,
        v,
        Command::ResourceFlush {
            rect,
            resource_id: host_id,
        },
    )
}

/// `TRANSFER_TO_HOST_2D`, inside the backing (into the VM's band, as copies, if it
/// has one).
fn transfer_to_host(
    sh: &mut Shared,
    v: &mut VmGpu,
    rect: Rect,
    offset: u64,
    resource_id: u32,
) -> Result<Outcome, Rejection> {
    let r = resource(v, resource_id)?;
    check_rect(r, &rect)?;
    let Some(b) = &r.backing else {
        return Err(Rejection::unspec(RejectReason::BadResource));
    };
    if transfer_end(r.width, &rect, offset).is_none_or(|end| end > b.len) {
        return Err(Rejection::param(RejectReason::BadParameter));
    }
    let host_id = r.host_id;
    if let Some((band, w, h)) = banded_resource(v, resource_id) {
        let (cmd, copies) = band_transfer(&band, w, h, &rect, offset, b)?;
        let c = command_charge(&cmd, copies.len());
        charge(sh, v, c)?;
        return Ok(Outcome::Host {
            cmd,
            effect: Effect::None,
            copies,
            charge: c,
            buf: Vec::new(),
        });
    }
    pass_through(
        sh,
        v,
        Command::TransferToHost2d {
            rect,
            offset,
            resource_id: host_id,
        },
    )
}

/// `RESOURCE_ATTACH_BACKING`: every entry translated and checked against the VM's
/// RAM, everything reserved and charged before anything changes.
fn attach_backing(
    sh: &mut Shared,
    v: &mut VmGpu,
    mem: &dyn GuestMemory,
    resource_id: u32,
    entries: &[MemEntry],
) -> Result<Outcome, Rejection> {
    let r = resource(v, resource_id)?;
    if r.backing.is_some() {
        return Err(Rejection::unspec(RejectReason::BadResource));
    }
    let limit = r.bytes().div_ceil(BACKING_SLACK) * BACKING_SLACK;
    let host_id = r.host_id;
    let mut backing = translate_backing(mem, entries, limit)?;
    // Everything the command and the backing need, reserved and charged
    // before anything changes.
    let mut host_entries = Vec::new();
    host_entries
        .try_reserve_exact(backing.host.len())
        .map_err(|_| Rejection::over_budget())?;
    // The host command names the runs by their raw host-physical addresses.
    host_entries.extend(backing.host.iter().map(HostRun::entry));
    let buf = encoding_buffer(backing.host.len())?;
    sh.iommu
        .try_reserve(backing.host.len())
        .map_err(|_| Rejection::over_budget())?;
    let cmd = Command::ResourceAttachBacking {
        resource_id: host_id,
        entries: host_entries,
    };
    backing.charge = backing_charge(backing.guest.len(), &backing.host);
    let c = command_charge(&cmd, 0);
    charge(sh, v, backing.charge + c)?;
    sh.iommu.extend(
        backing
            .mappings()
            .map(|(hpa, len)| IommuOp::Map { vm: v.id, hpa, len }),
    );
    if let Some(r) = v.resources.get_mut(&resource_id) {
        r.backing = Some(backing);
    }
    Ok(Outcome::Host {
        cmd,
        effect: Effect::Attached {
            guest: resource_id,
            host: host_id,
        },
        copies: Vec::new(),
        charge: c,
        buf,
    })
}

/// `RESOURCE_DETACH_BACKING`: unmapped when the device is done with it.
fn detach_backing(v: &mut VmGpu, resource_id: u32) -> Result<Outcome, Rejection> {
    let r = resource(v, resource_id)?;
    if r.backing.is_none() {
        return Err(Rejection::unspec(RejectReason::BadResource));
    }
    let host_id = r.host_id;
    // Paid with the backing, whose charge stays until it is unmapped.
    let (unmap, held) = v
        .resources
        .get_mut(&resource_id)
        .and_then(|r| r.backing.take())
        .map_or((Vec::new(), 0), |b| (b.mappings().collect(), b.charge));
    Ok(host(
        Command::ResourceDetachBacking {
            resource_id: host_id,
        },
        Effect::Detached { unmap },
        held,
    ))
}

/// `UPDATE_CURSOR` on a head of the VM's own.
fn update_cursor(
    sh: &mut Shared,
    v: &mut VmGpu,
    pos: CursorPos,
    resource_id: u32,
    hot_x: u32,
    hot_y: u32,
) -> Result<Outcome, Rejection> {
    let pos = cursor_pos(v, &pos)?;
    let host_id = match resource_id {
        0 => 0,
        id => resource(v, id)?.host_id,
    };
    pass_through(
        sh,
        v,
        Command::UpdateCursor {
            pos,
            resource_id: host_id,
            hot_x,
            hot_y,
        },
    )
}

/// A host command that needs no band copies nor a reserved encoding.
fn host(cmd: Command, effect: Effect, charge: u64) -> Outcome {
    Outcome::Host {
        cmd,
        effect,
        copies: Vec::new(),
        charge,
        buf: Vec::new(),
    }
}

/// One past the last backing byte a `TRANSFER_TO_HOST_2D` of `rect` at `offset`
/// reads from a resource `width` pixels wide (rows `width * 4` bytes apart, as the
/// device lays them out); `None` on overflow.
pub(super) fn transfer_end(width: u32, rect: &Rect, offset: u64) -> Option<u64> {
    if rect.width == 0 || rect.height == 0 {
        return Some(offset);
    }
    let stride = u64::from(width) * 4;
    offset
        .checked_add(stride.checked_mul(u64::from(rect.height) - 1)?)?
        .checked_add(u64::from(rect.width) * 4)
}

/// Translates backing entries into host-contiguous runs, checking every byte
/// with `P = V(i) AND M(i)`. A range refused as a whole is retried page by page,
/// since guest RAM may be host-contiguous only per page.
pub(super) fn translate_backing(
    mem: &dyn GuestMemory,
    entries: &[MemEntry],
    limit: u64,
) -> Result<Backing, Rejection> {
    if entries.is_empty() {
        return Err(Rejection::param(RejectReason::BadParameter));
    }
    let mut host: Vec<HostRun> = Vec::new();
    let mut total = 0u64;
    for e in entries {
        let len = u64::from(e.length);
        total += len;
        if len == 0 || total > limit {
            return Err(Rejection::param(RejectReason::BadParameter));
        }
        // Trust boundary: the address the guest wrote into its entry is taken as
        // guest-physical; only `mem.translate` below turns it into a host address.
        let gpa = Gpa::new(e.addr);
        let end = gpa
            .checked_add(len)
            .ok_or(Rejection::memory(gpa, len, MemError::Overflow))?;
        match mem.translate(gpa, len) {
            Ok(hpa) => push_run(&mut host, hpa, len)?,
            Err(err) if gpa.get() / PAGE_SIZE == (end.get() - 1) / PAGE_SIZE => {
                return Err(Rejection::memory(gpa, len, err));
            }
            Err(_) => {
                // Page by page: `done` bytes translated so far, each step up to the
                // next page boundary (or the end).
                let mut done = 0;
                while done < len {
                    let cur = gpa.offset(done);
                    let n = (PAGE_SIZE - cur.get() % PAGE_SIZE).min(len - done);
                    let hpa = mem
                        .translate(cur, n)
                        .map_err(|err| Rejection::memory(cur, n, err))?;
                    push_run(&mut host, hpa, n)?;
                    done += n;
                }
            }
        }
    }
    let mut guest = Vec::new();
    guest
        .try_reserve_exact(entries.len())
        .map_err(|_| Rejection::over_budget())?;
    guest.extend_from_slice(entries);
    Ok(Backing {
        guest,
        host,
        len: total,
        charge: 0,
    })
}

/// Appends a host run, merging it into the previous one when they touch.
fn push_run(runs: &mut Vec<HostRun>, hpa: Hpa, len: u64) -> Result<(), Rejection> {
    if let Some(last) = runs.last_mut() {
        let merged = u64::from(last.len) + len;
        if last.hpa.checked_add(u64::from(last.len)) == Some(hpa) && merged <= u64::from(u32::MAX) {
            last.len = merged as u32;
            return Ok(());
        }
    }
    runs.try_reserve(1).map_err(|_| Rejection::over_budget())?;
    // `len` came from one guest entry's u32 length, or less.
    runs.push(HostRun {
        hpa,
        len: len as u32,
    });
    Ok(())
}
