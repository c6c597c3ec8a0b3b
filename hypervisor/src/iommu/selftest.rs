//! `test=iommu`: the IOMMU isolates the virtio-gpu's DMA.
//!
//! Attaches the virtio-gpu PCI function (1af4:1050) to a fresh domain, checks the page
//! tables through [`translate`](super::translate), then makes the device DMA through a
//! minimal virtio 1.x PCI transport (virtio 1.2, 4.1.4.3 common configuration, 4.1.4.4
//! notifications, 2.7 split virtqueues) with control queue 0:
//!
//! A. rings and a GET_DISPLAY_INFO request in one mapped page: the device reads the
//!    rings and request and writes the response and used ring, no fault;
//! B. the page unmapped (IOTLB invalidated), one more request: the device's read of
//!    the avail ring faults;
//! C. a reset device with rings at an IOVA never mapped (0x4000_0000): fault with
//!    the GPU's source id and that address;
//! D. page mapped again, a request works again; then the device detached and kicked
//!    once more: fault (no context entry);
//!
//! and every frame the domain used comes back.

use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

use log::{error, info, warn};

use super::{DomainId, Error, Fault};
use crate::mm::{frames, phys_to_ptr, PAGE_SIZE};
use crate::pci::{self, Device};
use crate::{apic, interrupts, println};

/// IOVA of the mapped ring page.
const RING_IOVA: u64 = 0x1000_0000;
/// IOVA range never mapped (rings of phase C: desc, driver, device areas).
const UNMAPPED_IOVA: u64 = 0x4000_0000;
/// Queue size used (the device offers 256 for the control queue).
const QSIZE: u16 = 16;
// Layout of the ring page: split virtqueue parts, request, response.
const DESC: u64 = 0x000;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const REQ: u64 = 0x400;
const RESP: u64 = 0x800;
/// struct virtio_gpu_ctrl_hdr.
const HDR_LEN: u32 = 24;
/// struct virtio_gpu_resp_display_info: header + 16 x (rect, enabled, flags).
const DISPLAY_INFO_LEN: u32 = 24 + 16 * 24;
const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
const RESP_OK_DISPLAY_INFO: u32 = 0x1101;

// Common configuration (virtio 1.2, 4.1.4.3).
const DFSELECT: u64 = 0x00;
const DF: u64 = 0x04;
const GFSELECT: u64 = 0x08;
const GF: u64 = 0x0c;
const STATUS: u64 = 0x14;
const Q_SELECT: u64 = 0x16;
const Q_SIZE: u64 = 0x18;
const Q_ENABLE: u64 = 0x1c;
const Q_NOTIFY_OFF: u64 = 0x1e;
const Q_DESC: u64 = 0x20;
const Q_DRIVER: u64 = 0x28;
const Q_DEVICE: u64 = 0x30;
const COMMON_LEN: u32 = 0x38;

const S_ACKNOWLEDGE: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;

/// Feature bits 32 (VERSION_1) and 33 (ACCESS_PLATFORM), in the upper feature word.
const F_HI_VERSION_1: u32 = 1 << 0;
const F_HI_ACCESS_PLATFORM: u32 = 1 << 1;

/// The virtio-pci modern register windows of one device.
struct Virtio {
    common: u64,
    notify: u64,
    notify_len: u32,
    multiplier: u32,
}

impl Virtio {
    fn find(d: &Device) -> Result<Virtio, &'static str> {
        let bar = |bar: u8| {
            d.bars
                .iter()
                .find(|b| b.index == bar && !b.io && b.addr != 0)
        };
        let cap = |t: u8| d.virtio.iter().find(|c| c.cfg_type == t);
        let common = cap(1).ok_or("no virtio common configuration capability")?;
        let notify = cap(2).ok_or("no virtio notify capability")?;
        let cb = bar(common.bar).ok_or("virtio common configuration BAR not assigned")?;
        let nb = bar(notify.bar).ok_or("virtio notify BAR not assigned")?;
        if common.length < COMMON_LEN
            || u64::from(common.offset) + u64::from(COMMON_LEN) > cb.size
            || u64::from(notify.offset) + u64::from(notify.length) > nb.size
        {
            return Err("virtio capability outside its BAR");
        }
        Ok(Virtio {
            common: cb.addr + u64::from(common.offset),
            notify: nb.addr + u64::from(notify.offset),
            notify_len: notify.length,
            multiplier: notify.notify_multiplier,
        })
    }

    fn r8(&self, off: u64) -> u8 {
        // SAFETY: the common configuration window lies inside a memory BAR that
        // `pci::scan` mapped uncached; `off` < COMMON_LEN, checked against the BAR.
        unsafe { core::ptr::read_volatile(phys_to_ptr::<u8>(self.common + off)) }
    }
    fn w8(&self, off: u64, v: u8) {
        // SAFETY: as in `r8`.
        unsafe { core::ptr::write_volatile(phys_to_ptr::<u8>(self.common + off), v) }
    }
    fn r16(&self, off: u64) -> u16 {
        // SAFETY: as in `r8`; naturally aligned field.
        unsafe { core::ptr::read_volatile(phys_to_ptr::<u16>(self.common + off)) }
    }
    fn w16(&self, off: u64, v: u16) {
        // SAFETY: as in `r16`.
        unsafe { core::ptr::write_volatile(phys_to_ptr::<u16>(self.common + off), v) }
    }
    fn r32(&self, off: u64) -> u32 {
        // SAFETY: as in `r8`; naturally aligned field.
        unsafe { core::ptr::read_volatile(phys_to_ptr::<u32>(self.common + off)) }
    }
    fn w32(&self, off: u64, v: u32) {
        // SAFETY: as in `r32`.
        unsafe { core::ptr::write_volatile(phys_to_ptr::<u32>(self.common + off), v) }
    }
    /// 64-bit fields as two 32-bit writes (QEMU's common window takes at most 4 bytes).
    fn w64(&self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }

    fn reset(&self) -> Result<(), &'static str> {
        self.w8(STATUS, 0);
        for _ in 0..100_000 {
            if self.r8(STATUS) == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err("virtio reset did not complete")
    }

    /// Reset, feature negotiation (VERSION_1 | ACCESS_PLATFORM), queue 0 with the three
    /// ring areas at the given IOVAs, DRIVER_OK. Returns the queue's notify address.
    fn start(&self, desc: u64, driver: u64, device: u64) -> Result<u64, &'static str> {
        self.reset()?;
        self.w8(STATUS, S_ACKNOWLEDGE);
        self.w8(STATUS, S_ACKNOWLEDGE | S_DRIVER);
        self.w32(DFSELECT, 1);
        let hi = self.r32(DF);
        if hi & F_HI_VERSION_1 == 0 {
            return Err("virtio-gpu does not offer VERSION_1");
        }
        if hi & F_HI_ACCESS_PLATFORM == 0 {
            return Err("virtio-gpu does not offer ACCESS_PLATFORM: its DMA bypasses the IOMMU (QEMU needs iommu_platform=on)");
        }
        self.w32(GFSELECT, 0);
        self.w32(GF, 0);
        self.w32(GFSELECT, 1);
        self.w32(GF, F_HI_VERSION_1 | F_HI_ACCESS_PLATFORM);
        self.w8(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if self.r8(STATUS) & S_FEATURES_OK == 0 {
            return Err("virtio-gpu refused the features");
        }
        self.w16(Q_SELECT, 0);
        let max = self.r16(Q_SIZE);
        if max < QSIZE {
            return Err("virtio-gpu control queue too small");
        }
        self.w16(Q_SIZE, QSIZE);
        self.w64(Q_DESC, desc);
        self.w64(Q_DRIVER, driver);
        self.w64(Q_DEVICE, device);
        self.w16(Q_ENABLE, 1);
        let off = u64::from(self.r16(Q_NOTIFY_OFF)) * u64::from(self.multiplier);
        if off + 2 > u64::from(self.notify_len) {
            return Err("virtio queue notify address outside the notify window");
        }
        self.w8(
            STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        Ok(self.notify + off)
    }

    fn kick(&self, notify: u64) {
        fence(Ordering::SeqCst);
        // SAFETY: `notify` is inside the notify window of a BAR `pci::scan` mapped
        // uncached (checked in `start`); a 16-bit write of the queue index.
        unsafe { core::ptr::write_volatile(phys_to_ptr::<u16>(notify), 0) };
    }
}

fn put16(pa: u64, v: u16) {
    // SAFETY: `pa` lies in the ring page this test allocated (identity mapped).
    unsafe { core::ptr::write_volatile(phys_to_ptr::<u16>(pa), v) }
}
fn put32(pa: u64, v: u32) {
    // SAFETY: as in `put16`.
    unsafe { core::ptr::write_volatile(phys_to_ptr::<u32>(pa), v) }
}
fn put64(pa: u64, v: u64) {
    // SAFETY: as in `put16`.
    unsafe { core::ptr::write_volatile(phys_to_ptr::<u64>(pa), v) }
}
fn get16(pa: u64) -> u16 {
    // SAFETY: as in `put16`.
    unsafe { core::ptr::read_volatile(phys_to_ptr::<u16>(pa)) }
}
fn get32(pa: u64) -> u32 {
    // SAFETY: as in `put16`.
    unsafe { core::ptr::read_volatile(phys_to_ptr::<u32>(pa)) }
}

/// Fresh rings in the page at host `page` / device address `iova`: descriptors 0
/// (GET_DISPLAY_INFO request, device-readable) -> 1 (response, device-writable),
/// available as entry 0, avail.idx = 1, interrupts suppressed.
fn prepare(page: u64, iova: u64) {
    // SAFETY: the page is ours (allocated by this test), identity mapped.
    unsafe { core::ptr::write_bytes(phys_to_ptr::<u8>(page), 0, PAGE_SIZE as usize) };
    put32(page + REQ, CMD_GET_DISPLAY_INFO);
    put64(page + DESC, iova + REQ);
    put32(page + DESC + 8, HDR_LEN);
    put16(page + DESC + 12, 1); // NEXT
    put16(page + DESC + 14, 1);
    put64(page + DESC + 16, iova + RESP);
    put32(page + DESC + 24, DISPLAY_INFO_LEN);
    put16(page + DESC + 28, 2); // WRITE
    put16(page + AVAIL, 1); // VIRTQ_AVAIL_F_NO_INTERRUPT
    put16(page + AVAIL + 4, 0);
    fence(Ordering::SeqCst);
    put16(page + AVAIL + 2, 1);
}

/// Makes descriptor chain 0 available once more (avail.idx += 1).
fn resubmit(page: u64) {
    put32(page + RESP, 0);
    let idx = get16(page + AVAIL + 2);
    put16(page + AVAIL + 4 + 2 * u64::from(idx % QSIZE), 0);
    fence(Ordering::SeqCst);
    put16(page + AVAIL + 2, idx.wrapping_add(1));
}

/// Waits until the device's used.idx reaches `want`.
fn wait_used(page: u64, want: u16, ms: u64) -> bool {
    for _ in 0..ms {
        if get16(page + USED + 2) == want {
            return true;
        }
        apic::delay_us(1000);
    }
    get16(page + USED + 2) == want
}

/// Waits for fault records (and the fault event interrupt) for up to `ms`; after the
/// first fault keeps collecting for a few more milliseconds. Returns the faults and
/// how many fault event interrupts arrived.
fn wait_faults(ms: u64) -> (Vec<Fault>, u64) {
    let mut faults = Vec::new();
    let mut irqs = 0;
    let mut grace = None;
    for t in 0..ms {
        interrupts::service_pending();
        irqs += interrupts::take_pending(interrupts::IOMMU_FAULT_VECTOR);
        let f = super::poll_faults();
        if !f.is_empty() && grace.is_none() {
            grace = Some(t + 20);
        }
        faults.extend(f);
        if grace.is_some_and(|g| t >= g) {
            break;
        }
        apic::delay_us(1000);
    }
    for f in &faults {
        warn!("iommu: {f}");
    }
    (faults, irqs)
}

fn expect_fault(
    faults: &[Fault],
    gpu: &Device,
    lo: u64,
    hi: u64,
    reasons: &[u8],
) -> Result<Fault, &'static str> {
    let Some(f) = faults.iter().find(|f| f.source == gpu.bdf) else {
        error!(
            "iommu test: expected a fault from {} at {lo:#x}..{hi:#x}, got {} fault(s)",
            gpu.bdf,
            faults.len()
        );
        return Err("no DMA fault from the GPU");
    };
    if !(lo..hi).contains(&f.addr) || !reasons.contains(&f.reason) {
        error!("iommu test: fault {f} not in {lo:#x}..{hi:#x} with reason in {reasons:x?}");
        return Err("wrong DMA fault");
    }
    Ok(*f)
}

fn check(cond: bool, what: &'static str) -> Result<(), &'static str> {
    if cond {
        Ok(())
    } else {
        error!("iommu test: {what}");
        Err(what)
    }
}

/// Map/translate/unmap on `dom` with no device traffic: 2 MiB and 4 KiB leaves, a
/// split by a partial unmap, read-only pages, overlap and range checks.
fn tables(dom: DomainId) -> Result<(), &'static str> {
    use super::{map, translate, translate_perm, unmap};
    let Some((levels, agaw, limit, large)) = super::geometry() else {
        return Err("no geometry");
    };
    let (base, hpa, len) = (0x2000_0000u64, 0x0040_0000u64, 4u64 << 20);
    check(map(dom, base, hpa, len, true).is_ok(), "map 4 MiB failed")?;
    let frames_mapped = super::table_frames(dom).unwrap_or(0);
    check(
        translate(dom, base + 0x1234) == Some(hpa + 0x1234),
        "translate at +0x1234",
    )?;
    check(
        translate(dom, base + 0x30_0abc) == Some(hpa + 0x30_0abc),
        "translate in the second 2 MiB",
    )?;
    check(
        translate(dom, base + len).is_none(),
        "translate past the end",
    )?;
    check(
        translate(dom, base - PAGE_SIZE).is_none(),
        "translate before the start",
    )?;
    check(
        unmap(dom, base + 0x10_0000, PAGE_SIZE).is_ok(),
        "partial unmap",
    )?;
    check(
        translate(dom, base + 0x10_0000).is_none(),
        "unmapped page still translates",
    )?;
    check(
        translate(dom, base + 0x10_1000) == Some(hpa + 0x10_1000)
            && translate(dom, base + 0xf_f000) == Some(hpa + 0xf_f000),
        "neighbours of a split page",
    )?;
    check(
        map(dom, base + 0x10_0000, hpa + 0x10_0000, PAGE_SIZE, false).is_ok()
            && translate_perm(dom, base + 0x10_0000) == Some((hpa + 0x10_0000, false)),
        "read-only remap",
    )?;
    check(
        map(dom, base, hpa, PAGE_SIZE, true) == Err(Error::AlreadyMapped),
        "overlapping map accepted",
    )?;
    check(
        map(dom, base + 1, hpa, PAGE_SIZE, true) == Err(Error::BadRange)
            && map(dom, limit - PAGE_SIZE, hpa, 2 * PAGE_SIZE, true) == Err(Error::BadRange)
            && map(dom, base, hpa, 0, true) == Err(Error::BadRange)
            && map(dom, !0xfff, hpa, PAGE_SIZE, true) == Err(Error::BadRange),
        "bad ranges accepted",
    )?;
    check(unmap(dom, base, len).is_ok(), "unmap 4 MiB")?;
    check(
        (0..len)
            .step_by(0x8_0000)
            .all(|o| translate(dom, base + o).is_none()),
        "pages left after unmap",
    )?;
    println!(
        "iommu test: page tables ok ({levels}-level, {agaw}-bit, 2 MiB pages {}, {} table frames for 4 MiB, split on partial unmap, overlap and range checks)",
        if large { "yes" } else { "no" },
        frames_mapped
    );
    Ok(())
}

/// Runs the test. `Err` names what failed (already logged).
pub fn run(devices: &[Device]) -> Result<(), &'static str> {
    if !super::translating() {
        return Err("DMA translation is not on (no DMAR table, or iommu=off)");
    }
    let gpu = devices
        .iter()
        .find(|d| d.vendor == 0x1af4 && d.device == 0x1050)
        .ok_or("no virtio-gpu (1af4:1050)")?;
    let vio = Virtio::find(gpu)?;
    // Memory decoding and bus mastering on.
    let cmd = pci::read32(gpu.bdf, 0x04);
    pci::write32(gpu.bdf, 0x04, (cmd & 0xffff) | 0x6);
    vio.reset()?;
    for f in super::poll_faults() {
        warn!("iommu test: earlier fault: {f}");
    }
    let frames_before = frames::stats().allocated;

    let dom = super::attach(gpu.bdf).map_err(|e| {
        error!("iommu test: attach {} failed: {e:?}", gpu.bdf);
        "attach failed"
    })?;
    tables(dom)?;

    let page = frames::alloc().ok_or("out of frames")?;
    let r = phases(gpu, &vio, dom, page);
    let _ = vio.reset();
    if super::translate(dom, RING_IOVA).is_some() {
        let _ = super::unmap(dom, RING_IOVA, PAGE_SIZE);
    }
    let _ = super::detach(gpu.bdf);
    frames::free(page, 1);
    r?;
    let frames_after = frames::stats().allocated;
    if frames_after != frames_before {
        error!("iommu test: frames allocated before {frames_before}, after {frames_after}");
        return Err("frames leaked");
    }
    let st = super::stats();
    println!(
        "iommu test: domain torn down, no frame leaked ({} faults, {} IOTLB and {} context-cache invalidations so far)",
        st.faults, st.iotlb_invalidations, st.context_invalidations
    );
    Ok(())
}

fn phases(gpu: &Device, vio: &Virtio, dom: DomainId, page: u64) -> Result<(), &'static str> {
    // A: the mapped page works both ways.
    super::map(dom, RING_IOVA, page, PAGE_SIZE, true).map_err(|e| {
        error!("iommu test: map failed: {e:?}");
        "map failed"
    })?;
    check(
        super::translate(dom, RING_IOVA + 0x10) == Some(page + 0x10),
        "translate ring page",
    )?;
    prepare(page, RING_IOVA);
    let notify = vio.start(RING_IOVA + DESC, RING_IOVA + AVAIL, RING_IOVA + USED)?;
    vio.kick(notify);
    let done = wait_used(page, 1, 2000);
    let (faults, _) = wait_faults(30);
    let resp = get32(page + RESP);
    if !done || resp != RESP_OK_DISPLAY_INFO || !faults.is_empty() {
        error!(
            "iommu test: mapped ring: used.idx {} response {resp:#x}, {} fault(s)",
            get16(page + USED + 2),
            faults.len()
        );
        return Err("DMA through the mapped page failed");
    }
    println!(
        "iommu test: mapped IOVA {RING_IOVA:#x} works: device read the rings and request, wrote response {resp:#x} and used ring, no fault"
    );

    // B: unmap revokes access (the IOTLB entry QEMU cached in A must be gone).
    super::unmap(dom, RING_IOVA, PAGE_SIZE).map_err(|e| {
        error!("iommu test: unmap failed: {e:?}");
        "unmap failed"
    })?;
    check(
        super::translate(dom, RING_IOVA).is_none(),
        "unmapped page translates",
    )?;
    resubmit(page);
    vio.kick(notify);
    let (faults, irqs_b) = wait_faults(2000);
    let f = expect_fault(&faults, gpu, RING_IOVA, RING_IOVA + PAGE_SIZE, &[0x5, 0x6])?;
    check(
        get16(page + USED + 2) == 1,
        "device used the ring after unmap",
    )?;
    println!(
        "iommu test: after unmap, DMA to {:#x} blocked (fault reason {:#x}, {})",
        f.addr,
        f.reason,
        f.access.as_str()
    );

    // C: the brief's check: rings at an IOVA never mapped.
    let notify = vio.start(
        UNMAPPED_IOVA,
        UNMAPPED_IOVA + 0x1000,
        UNMAPPED_IOVA + 0x2000,
    )?;
    vio.kick(notify);
    let (faults, irqs_c) = wait_faults(2000);
    let f = expect_fault(
        &faults,
        gpu,
        UNMAPPED_IOVA,
        UNMAPPED_IOVA + 0x3000,
        &[0x5, 0x6],
    )?;
    check(
        irqs_b + irqs_c > 0,
        "no fault event interrupt (vector 0xe8) arrived",
    )?;
    info!(
        "iommu test: fault event interrupts seen: {} (unmap phase), {} (unmapped phase)",
        irqs_b, irqs_c
    );
    println!(
        "iommu test: DMA to unmapped {:#x} blocked and reported (fault reason {:#x})",
        f.addr, f.reason
    );

    // D: map again, works again; detach, faults.
    super::map(dom, RING_IOVA, page, PAGE_SIZE, true).map_err(|_| "remap failed")?;
    prepare(page, RING_IOVA);
    let notify = vio.start(RING_IOVA + DESC, RING_IOVA + AVAIL, RING_IOVA + USED)?;
    vio.kick(notify);
    let done = wait_used(page, 1, 2000);
    let (faults, _) = wait_faults(30);
    check(
        done && get32(page + RESP) == RESP_OK_DISPLAY_INFO && faults.is_empty(),
        "DMA after remapping failed",
    )?;
    super::detach(gpu.bdf).map_err(|e| {
        error!("iommu test: detach failed: {e:?}");
        "detach failed"
    })?;
    resubmit(page);
    vio.kick(notify);
    let (faults, _) = wait_faults(2000);
    let f = expect_fault(&faults, gpu, RING_IOVA, RING_IOVA + PAGE_SIZE, &[0x1, 0x2])?;
    check(
        get16(page + USED + 2) == 1,
        "device used the ring after detach",
    )?;
    println!(
        "iommu test: after detach, DMA from {} blocked (fault reason {:#x}: {})",
        gpu.bdf,
        f.reason,
        f.reason_str()
    );
    Ok(())
}
