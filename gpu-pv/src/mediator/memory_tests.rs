//! Hostile guests against the hypervisor's memory: every sink of guest-made
//! metadata is bounded by the VM's budget, and a reset gives it all back.

use alloc::vec;
use alloc::vec::Vec;
use core::mem::size_of;

use proptest::prelude::*;

use super::harness::*;
use super::vm::{HostRun, PendingReply, ReplyState, Resource, Tracked};
use super::*;
use crate::command::{Command, Response};
use crate::ring::Segment;
use crate::wire::{format, MemEntry};

/// The budget these tests assume (the mediator's default).
const BUDGET: u64 = DEFAULT_BUDGET;

/// Guests with the given budgets, on 640x480 displays, queues started.
fn world(budgets: &[u64], vram_in_hv_memory: bool) -> World {
    let mut med = Mediator::new(MediatorConfig {
        vram_in_hv_memory,
        ..MediatorConfig::new(VRAM, 4)
    });
    let mut guests = Vec::new();
    for (i, &budget) in budgets.iter().enumerate() {
        let vm = i as VmId + 1;
        let mut cfg = VmGpuConfig::new(vec![ScanoutConfig {
            physical: i as u32,
            width: 640,
            height: 480,
        }]);
        cfg.hv_memory = budget;
        med.add_vm(vm, cfg).unwrap();
        guests.push(Guest::new(vm, host_base(i), true));
    }
    let mut w = World {
        med,
        guests,
        iommu: Iommu::default(),
        faults: Vec::new(),
        log: Vec::new(),
    };
    for i in 0..budgets.len() {
        w.start(i, true);
    }
    w.med.take_events();
    w
}

/// A lower bound of the heap bytes the mediator really keeps for `v`: the sizes
/// of its records and of what their vectors hold. What is charged must cover it.
fn kept(v: &VmGpu, pixels_in_hv_memory: bool) -> u64 {
    let len = |n: usize, each: usize| (n * each) as u64;
    let mut bytes = 0;
    for r in v.resources.values() {
        bytes += len(1, size_of::<(u32, Resource)>());
        if let Some(b) = &r.backing {
            bytes += len(b.guest.capacity(), size_of::<MemEntry>());
            bytes += len(b.host.capacity(), size_of::<HostRun>());
        }
    }
    for (_, record) in v.held.iter() {
        let _ = record;
        bytes += len(1, size_of::<(u32, u64)>());
    }
    if pixels_in_hv_memory {
        bytes += v.resources.values().map(Resource::bytes).sum::<u64>();
    }
    for c in &v.staged {
        bytes += len(1, size_of::<HostCommand>()) + c.bytes.capacity() as u64;
        bytes += len(c.copies.capacity(), size_of::<BandCopy>());
        if let Command::ResourceAttachBacking { entries, .. } = &c.request.cmd {
            bytes += len(entries.capacity(), size_of::<MemEntry>());
        }
    }
    for t in v.tracked.values() {
        bytes += len(1, size_of::<(u64, Tracked)>());
        bytes += len(t.effect.unmaps().len(), size_of::<(Hpa, u64)>());
    }
    for r in v.replies.iter().flatten() {
        bytes += len(1, size_of::<PendingReply>());
        bytes += len(r.writable.capacity(), size_of::<Segment>());
        if let ReplyState::Ready(Response::Edid(e)) = &r.state {
            bytes += e.capacity() as u64;
        }
    }
    bytes
}

fn create(id: u32, width: u32, height: u32) -> Command {
    Command::ResourceCreate2d {
        resource_id: id,
        format: format::B8G8R8X8_UNORM,
        width,
        height,
    }
}

/// `n` one-byte entries two bytes apart from `gpa`: no two merge into one run.
fn tiny_entries(gpa: Gpa, n: usize) -> Vec<MemEntry> {
    (0..n as u64)
        .map(|k| MemEntry {
            addr: gpa.offset(2 * k).get(),
            length: 1,
            padding: 0,
        })
        .collect()
}

/// Many 1x1 resources, each with 4096 tiny backing entries that do not merge: the
/// metadata (guest entries, host runs, IOMMU ops, staged commands) is charged to
/// the VM, which gets `ERR_OUT_OF_MEMORY` long before the host's heap is at risk;
/// its neighbour keeps working, and a reset gives everything back.
#[test]
fn tiny_backings_on_many_resources_are_refused_past_the_budget() {
    let mut w = world(&[BUDGET, BUDGET], false);
    let vm = w.vm(0);
    let mut accepted = 0u64;
    let mut refused = false;
    for id in 1..=limits::MAX_RESOURCES_PER_VM as u32 {
        let r = w.call(0, &req(create(id, 1, 1)), &mut NullGpu);
        if r != Response::OkNoData {
            assert_eq!(r, Response::Err(wire::RESP_ERR_OUT_OF_MEMORY));
            refused = true;
            break;
        }
        let attach = Command::ResourceAttachBacking {
            resource_id: id,
            entries: tiny_entries(FB, limits::MAX_BACKING_ENTRIES as usize),
        };
        match w.call(0, &req(attach), &mut NullGpu) {
            Response::OkNoData => accepted += 1,
            r => {
                assert_eq!(r, Response::Err(wire::RESP_ERR_OUT_OF_MEMORY));
                refused = true;
                break;
            }
        }
        let v = w.med.vm(vm).unwrap();
        assert!(v.memory().used() <= v.memory().limit());
        assert!(kept(v, false) <= v.memory().used());
    }
    // Each accepted backing keeps at least 32 bytes per entry (its guest entries
    // and its host runs): no more of them than the budget holds.
    let per_backing = 32 * u64::from(limits::MAX_BACKING_ENTRIES);
    assert!(
        refused && accepted <= BUDGET / per_backing,
        "{accepted} backings of {} tiny entries accepted ({} KiB of metadata), none refused",
        limits::MAX_BACKING_ENTRIES,
        accepted * per_backing / 1024
    );
    assert!(accepted > 0);
    // Counted, reported on the debug channel, and visible in the counters.
    let c = *w.med.counters().vm(vm).unwrap();
    assert_eq!(c.rejected(RejectReason::HvMemory), 1);
    assert_eq!(c.hv_memory_budget, BUDGET);
    assert_eq!(c.hv_memory_used, w.med.vm(vm).unwrap().memory().used());
    assert!(c.hv_memory_peak >= c.hv_memory_used);
    assert!(w.med.take_events().iter().any(|e| e.vm == vm
        && e.channel == Channel::Debug
        && matches!(
            e.kind,
            EventKind::Rejected {
                reason: RejectReason::HvMemory,
                response: wire::RESP_ERR_OUT_OF_MEMORY,
                ..
            }
        )));
    // The neighbour is not touched: its budget is its own.
    let other = w.vm(1);
    let before = w.med.vm(other).unwrap().memory().used();
    assert_eq!(
        w.call(1, &req(create(1, 64, 64)), &mut NullGpu),
        Response::OkNoData
    );
    let attach = Command::ResourceAttachBacking {
        resource_id: 1,
        entries: tiny_entries(FB, 64),
    };
    assert_eq!(w.call(1, &req(attach), &mut NullGpu), Response::OkNoData);
    assert!(w.med.vm(other).unwrap().memory().used() > before);
    // A reset gives all of it back once the device dropped the resources.
    let r = w.med.reset_vm(vm).unwrap();
    w.iommu.apply_reset(vm, &r);
    w.run_all(0, &mut NullGpu);
    assert_eq!(w.med.vm(vm).unwrap().memory().used(), 0);
    assert_eq!(w.med.counters().vm(vm).unwrap().hv_memory_used, 0);
    assert_eq!(w.iommu.of(vm), 0);
}

/// Commands staged for the GPU (each `ATTACH_BACKING` with its entries twice) are
/// charged until they complete, and their backing until it is detached.
#[test]
fn staged_commands_are_charged_until_they_complete() {
    let mut w = world(&[BUDGET], false);
    let vm = w.vm(0);
    for id in 1..=40 {
        assert_eq!(
            w.call(0, &req(create(id, 1, 1)), &mut NullGpu),
            Response::OkNoData
        );
    }
    let records = w.med.vm(vm).unwrap().memory().used();
    for id in 1..=40 {
        let attach = Command::ResourceAttachBacking {
            resource_id: id,
            entries: tiny_entries(FB.offset(0x1_0000 * u64::from(id)), 1024),
        };
        w.send(0, QueueId::Control, &req(attach));
    }
    let v = w.med.vm(vm).unwrap();
    assert_eq!(v.staged_len(), 40);
    let staged = v.memory().used();
    assert!(kept(v, false) <= staged);
    w.run_all(0, &mut NullGpu);
    let attached = w.med.vm(vm).unwrap().memory().used();
    assert!(records < attached && attached < staged);
    for id in 1..=40 {
        let detach = Command::ResourceDetachBacking { resource_id: id };
        assert_eq!(w.call(0, &req(detach), &mut NullGpu), Response::OkNoData);
    }
    assert_eq!(w.med.vm(vm).unwrap().memory().used(), records);
    for id in 1..=40 {
        let unref = Command::ResourceUnref { resource_id: id };
        assert_eq!(w.call(0, &req(unref), &mut NullGpu), Response::OkNoData);
    }
    let queues = cost::queue(64) + cost::queue(16);
    assert_eq!(w.med.vm(vm).unwrap().memory().used(), queues);
    assert_eq!(w.iommu.of(vm), 0);
}

/// A queue reserves room to answer every chain it can hold: a budget that cannot
/// hold that refuses the queue, not a chain already taken.
#[test]
fn queues_reserve_their_answers_from_the_budget() {
    let queues = cost::queue(64) + cost::queue(16);
    let mut m = Mediator::new(MediatorConfig::new(VRAM, 2));
    for (vm, budget) in [(1, queues - 1), (2, queues)] {
        let mut cfg = VmGpuConfig::new(vec![ScanoutConfig {
            physical: u32::from(vm) - 1,
            width: 640,
            height: 480,
        }]);
        cfg.hv_memory = budget;
        m.add_vm(vm, cfg).unwrap();
    }
    let start =
        |m: &mut Mediator, vm| m.start_queues(vm, control_layout(true), cursor_layout(true));
    assert!(matches!(
        start(&mut m, 1),
        Err(MediatorError::OverBudget(_))
    ));
    assert_eq!(m.vm(1).unwrap().state(), VmState::Reset);
    assert_eq!(m.vm(1).unwrap().memory().used(), 0);
    assert!(m.take_events().iter().any(|e| e.vm == 1
        && e.channel == Channel::Debug
        && matches!(e.kind, EventKind::OverBudget { .. })));
    start(&mut m, 2).unwrap();
    assert_eq!(m.vm(2).unwrap().memory().used(), queues);
    // A queue reset gives its part back; restarting takes it again.
    m.reset_queue(2, QueueId::Cursor).unwrap();
    assert_eq!(m.vm(2).unwrap().memory().used(), cost::queue(64));
    m.restart_queue(2, QueueId::Cursor, cursor_layout(true))
        .unwrap();
    assert_eq!(m.vm(2).unwrap().memory().used(), queues);
    m.driver_reset(2).unwrap();
    assert_eq!(m.vm(2).unwrap().memory().used(), 0);
}

/// The hypervisor's own records for a VM (zero-copy buffers) come out of the same
/// budget.
#[test]
fn hypervisor_charges_share_the_budget() {
    let mut w = world(&[1 << 20], false);
    let vm = w.vm(0);
    let base = w.med.vm(vm).unwrap().memory().used();
    let left = (1 << 20) - base;
    w.med.charge(vm, left - 10).unwrap();
    assert!(matches!(
        w.med.charge(vm, 11),
        Err(MediatorError::OverBudget(OverBudget {
            asked: 11,
            available: 10
        }))
    ));
    assert_eq!(
        w.med
            .counters()
            .vm(vm)
            .unwrap()
            .rejected(RejectReason::HvMemory),
        1
    );
    // The guest's own commands find no room either.
    assert_eq!(
        w.call(0, &req(create(1, 64, 64)), &mut NullGpu),
        Response::Err(wire::RESP_ERR_OUT_OF_MEMORY)
    );
    w.med.release(vm, left - 10);
    assert_eq!(w.med.vm(vm).unwrap().memory().used(), base);
    assert_eq!(
        w.call(0, &req(create(1, 64, 64)), &mut NullGpu),
        Response::OkNoData
    );
    // A reset leaves the hypervisor's charges alone: they go with their records.
    w.med.charge(vm, 100).unwrap();
    w.med.reset_vm(vm).unwrap();
    w.run_all(0, &mut NullGpu);
    assert_eq!(w.med.vm(vm).unwrap().memory().used(), 100);
    w.med.release(vm, 100);
    assert_eq!(w.med.vm(vm).unwrap().memory().used(), 0);
}

/// An `UNREF` on the GPU when its VM is reset keeps its resource charged until
/// the device answers: the memory is given back when the device let it go.
#[test]
fn a_reset_gives_back_an_unref_in_flight_when_it_completes() {
    let mut w = world(&[BUDGET], true);
    let vm = w.vm(0);
    assert_eq!(
        w.call(0, &req(create(1, 64, 64)), &mut NullGpu),
        Response::OkNoData
    );
    w.send(
        0,
        QueueId::Control,
        &req(Command::ResourceUnref { resource_id: 1 }),
    );
    let batch = w.med.take_batch(vm, 8).unwrap();
    w.med.reset_vm(vm).unwrap();
    let held = w.med.vm(vm).unwrap().memory().used();
    assert_eq!(held, cost::RESOURCE + 64 * 64 * 4);
    let done: Vec<Completion> = batch
        .commands
        .iter()
        .map(|c| Completion {
            host_fence: c.host_fence,
            status: wire::RESP_OK_NODATA,
        })
        .collect();
    w.med
        .complete_batch(vm, &done, &mut w.guests[0].mem)
        .unwrap();
    assert_eq!(w.med.vm(vm).unwrap().memory().used(), 0);
}

/// A snapshot is untrusted bytes: restoring one that would not fit in the VM's
/// budget is refused, changing nothing.
#[test]
fn restore_refuses_a_context_over_the_budget() {
    let mut a = world(&[BUDGET], false);
    for id in 1..=8 {
        assert_eq!(
            a.call(0, &req(create(id, 1, 1)), &mut NullGpu),
            Response::OkNoData
        );
        let attach = Command::ResourceAttachBacking {
            resource_id: id,
            entries: tiny_entries(FB, 2048),
        };
        assert_eq!(a.call(0, &req(attach), &mut NullGpu), Response::OkNoData);
    }
    let bytes = a.med.snapshot(1).unwrap();
    let used = a.med.vm(1).unwrap().memory().used();
    for (budget, ok) in [(used / 2, false), (4 * used, true)] {
        let mut m = Mediator::new(MediatorConfig::new(VRAM, 1));
        let mut cfg = VmGpuConfig::new(vec![ScanoutConfig {
            physical: 0,
            width: 640,
            height: 480,
        }]);
        cfg.hv_memory = budget;
        m.add_vm(1, cfg).unwrap();
        let r = m.restore(1, &bytes, &a.guests[0].mem);
        let v = m.vm(1).unwrap();
        if ok {
            r.unwrap();
            assert!(v.memory().used() <= budget);
            assert!(kept(v, false) <= v.memory().used());
        } else {
            assert_eq!(r, Err(SnapshotError::OverBudget));
            assert_eq!(
                (v.state(), v.resource_count(), v.staged_len()),
                (VmState::Reset, 0, 0)
            );
            assert_eq!(v.memory().used(), 0);
            assert!(m.take_iommu_ops().is_empty());
        }
    }
}

/// Publishes head `head` of the control queue once more, as a guest may write any
/// head into its available ring.
fn republish(g: &mut Guest, head: u16) {
    let l = control_layout(true);
    let mut idx = [0u8; 2];
    g.mem.read(l.avail.offset(2), &mut idx).unwrap();
    let idx = u16::from_le_bytes(idx);
    let slot = l.avail.offset(4 + 2 * u64::from(idx % l.size));
    g.mem.write(slot, &head.to_le_bytes()).unwrap();
    g.mem
        .write(l.avail.offset(2), &idx.wrapping_add(1).to_le_bytes())
        .unwrap();
}

/// A head still in flight published again: without a check, every copy is taken
/// and waits behind the first for its turn to be answered, without bound. It is a
/// protocol error for that VM instead: `DEVICE_NEEDS_RESET`, and nothing kept.
#[test]
fn a_head_published_again_while_in_flight_is_a_protocol_error() {
    let mut w = World::new(2, true);
    let vm = w.vm(0);
    // A command that waits for the GPU (nobody runs it), then its head again and
    // again.
    let head = w.send(0, QueueId::Control, &req(create(1, 64, 64)));
    for _ in 0..10 {
        for _ in 0..control_layout(true).size {
            republish(&mut w.guests[0], head);
        }
        let _ = w
            .med
            .process_doorbell(vm, QueueId::Control, &mut w.guests[0].mem);
    }
    let v = w.med.vm(vm).unwrap();
    assert!(
        v.unanswered() <= usize::from(control_layout(true).size),
        "{} chains kept for a queue of {}",
        v.unanswered(),
        control_layout(true).size
    );
    assert_eq!(w.med.device_status(vm), Some(DEVICE_NEEDS_RESET));
    assert!(w.med.take_events().iter().any(|e| e.vm == vm
        && matches!(
            e.kind,
            EventKind::RingFault {
                error: RingError::HeadInFlight,
                ..
            }
        )));
    // The neighbour is untouched.
    assert_eq!(w.med.device_status(w.vm(1)), Some(0));
    assert_eq!(
        w.call(1, &req(create(1, 64, 64)), &mut NullGpu),
        Response::OkNoData
    );
}

/// A simulated GPU keeps its resources' pixels in hypervisor memory: they are
/// charged to the VM that created them, so a VM holds no more pixels than its
/// budget, whatever its VRAM quota says.
#[test]
fn simulated_gpu_pixels_are_bounded_by_the_budget() {
    // As the kernel sets the simulated GPU up: 256 MiB of VRAM, a quarter each,
    // in hypervisor memory.
    let mut med = Mediator::new(MediatorConfig {
        vram_in_hv_memory: true,
        ..MediatorConfig::new(256 << 20, 1)
    });
    let cfg = VmGpuConfig::new(alloc::vec![ScanoutConfig {
        physical: 0,
        width: 640,
        height: 480,
    }]);
    med.add_vm(1, cfg).unwrap();
    let mut w = World {
        med,
        guests: alloc::vec![Guest::new(1, host_base(0), true)],
        iommu: Iommu::default(),
        faults: Vec::new(),
        log: Vec::new(),
    };
    w.start(0, true);
    let mut gpu = crate::sim_gpu::SimGpu::new(crate::sim_gpu::SimGpuConfig {
        scanouts: alloc::vec![(640, 480)],
        vram_bytes: 256 << 20,
        cost: crate::sim_gpu::CostModel::FREE,
    })
    .unwrap();
    let mut created = 0;
    for id in 1..=100 {
        match w.call(0, &req(create(id, 640, 480)), &mut gpu) {
            Response::OkNoData => created += 1,
            r => {
                assert_eq!(r, Response::Err(wire::RESP_ERR_OUT_OF_MEMORY));
                break;
            }
        }
    }
    let pixels = gpu.vram_used();
    assert!(
        pixels <= BUDGET,
        "{created} resources: {} KiB of pixels in hypervisor memory for one VM",
        pixels / 1024
    );
}

/// What a hostile guest does in the property test below.
#[derive(Clone, Debug)]
enum Hostile {
    /// Create resource `id` of `w` x `h`.
    Create(u32, u32, u32),
    /// Attach `n` tiny entries (not merging) to resource `id`.
    Tiny(u32, usize),
    /// Attach `pages` whole pages to resource `id`.
    Pages(u32, u64),
    Detach(u32),
    Unref(u32),
    /// A command answered by the mediator itself (an EDID).
    Edid,
    /// Publish the last head again.
    Republish,
    /// Run one batch, or leave it on the GPU.
    Run,
    /// The hypervisor resets the channel.
    Reset,
    /// The driver resets the device and starts again.
    Restart,
    /// The driver resets the cursor queue and re-enables it.
    QueueReset,
    /// The hypervisor charges (or gives back) its own records.
    External(u64),
}

fn hostile() -> impl Strategy<Value = Hostile> {
    let id = 1u32..6;
    prop_oneof![
        4 => (id.clone(), 1u32..300, 1u32..300).prop_map(|(i, w, h)| Hostile::Create(i, w, h)),
        6 => (id.clone(), 1usize..4096).prop_map(|(i, n)| Hostile::Tiny(i, n)),
        2 => (id.clone(), 1u64..40).prop_map(|(i, p)| Hostile::Pages(i, p)),
        1 => id.clone().prop_map(Hostile::Detach),
        1 => id.prop_map(Hostile::Unref),
        1 => Just(Hostile::Edid),
        1 => Just(Hostile::Republish),
        4 => Just(Hostile::Run),
        1 => Just(Hostile::Reset),
        1 => Just(Hostile::Restart),
        1 => Just(Hostile::QueueReset),
        1 => (0u64..300_000).prop_map(Hostile::External),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Under random hostile streams, with budgets small enough to be hit, a VM's
    /// charge never exceeds its budget and always covers what the mediator keeps
    /// for it; a reset (once the device let go of its resources) brings it back to
    /// exactly what the hypervisor charged itself; the neighbour's charge moves
    /// only with its own work.
    #[test]
    fn charges_stay_within_the_budget_and_return_to_zero(
        budget in 500u64 << 10..2 << 20,
        pixels in any::<bool>(),
        ops in proptest::collection::vec(hostile(), 1..80),
    ) {
        let mut w = world(&[budget, BUDGET], pixels);
        let vm = w.vm(0);
        let neighbour = w.med.vm(w.vm(1)).unwrap().memory().used();
        let mut external = 0u64;
        let mut last_head = None;
        for op in &ops {
            let active = w.med.vm(vm).unwrap().state() == VmState::Active;
            let cmd = match *op {
                Hostile::Create(id, wd, h) => Some(create(id, wd, h)),
                Hostile::Tiny(id, n) => Some(Command::ResourceAttachBacking {
                    resource_id: id,
                    entries: tiny_entries(FB.offset(0x2000 * u64::from(id)), n),
                }),
                Hostile::Pages(id, p) => Some(Command::ResourceAttachBacking {
                    resource_id: id,
                    entries: entries(FB.offset(0x4_0000 * u64::from(id % 16)), p * 4096, p),
                }),
                Hostile::Detach(id) => Some(Command::ResourceDetachBacking { resource_id: id }),
                Hostile::Unref(id) => Some(Command::ResourceUnref { resource_id: id }),
                Hostile::Edid => Some(Command::GetEdid { scanout: 0 }),
                _ => None,
            };
            match (cmd, op) {
                (Some(c), _) => {
                    if active && w.guests[0].ctrl.num_free() > 1 {
                        last_head = Some(w.send(0, QueueId::Control, &req(c)));
                    }
                }
                (None, Hostile::Republish) => {
                    // Only while the device still holds it (the attack); a head
                    // already returned is the driver's to reuse.
                    let held = |h| w.med.vm(vm).unwrap().replies[0].iter().any(|r| r.head == h);
                    if let (true, Some(h)) = (active, last_head.filter(|&h| held(h))) {
                        republish(&mut w.guests[0], h);
                        let _ = w.med.process_doorbell(vm, QueueId::Control, &mut w.guests[0].mem);
                    }
                }
                (None, Hostile::Run) => {
                    w.run_batch(0, 16, &mut NullGpu);
                    w.guests[0].take_used(QueueId::Control);
                }
                (None, Hostile::Reset) => {
                    let r = w.med.reset_vm(vm).unwrap();
                    w.iommu.apply_reset(vm, &r);
                }
                (None, Hostile::Restart) => {
                    if w.med.vm(vm).unwrap().state() != VmState::Reset {
                        continue;
                    }
                    let r = w.med.driver_reset(vm).unwrap();
                    w.iommu.apply_reset(vm, &r);
                    w.guests[0].reinit_queues(true);
                    // Refused while what the VM held still fills its budget (the
                    // device then asks for a reset again).
                    let _ = w.med.start_queues(vm, control_layout(true), cursor_layout(true));
                    last_head = None;
                }
                (None, Hostile::QueueReset) => {
                    if active && w.med.reset_queue(vm, QueueId::Cursor).is_ok() {
                        w.guests[0].cursor =
                            crate::ring::driver::DriverQueue::new(&mut w.guests[0].mem, cursor_layout(true)).unwrap();
                        let _ = w.med.restart_queue(vm, QueueId::Cursor, cursor_layout(true));
                    }
                }
                (None, &Hostile::External(n)) => {
                    if n % 2 == 0 && w.med.charge(vm, n).is_ok() {
                        external += n;
                    } else {
                        w.med.release(vm, external);
                        external = 0;
                    }
                }
                (None, _) => {}
            }
            w.sync_iommu();
            let v = w.med.vm(vm).unwrap();
            prop_assert!(v.memory().used() <= v.memory().limit());
            prop_assert!(kept(v, pixels) <= v.memory().used(),
                "kept {} > charged {}", kept(v, pixels), v.memory().used());
            prop_assert_eq!(w.med.counters().vm(vm).unwrap().hv_memory_used, v.memory().used());
            prop_assert_eq!(w.med.vm(w.vm(1)).unwrap().memory().used(), neighbour);
        }
        // Reset, and let the device drop what the VM held.
        let r = w.med.reset_vm(vm).unwrap();
        w.iommu.apply_reset(vm, &r);
        while w.run_batch(0, 16, &mut NullGpu).is_some() {}
        prop_assert_eq!(w.med.vm(vm).unwrap().memory().used(), external);
        w.med.release(vm, external);
        prop_assert_eq!(w.med.vm(vm).unwrap().memory().used(), 0);
        prop_assert_eq!(w.iommu.of(vm), 0);
    }
}
