//! The dispatcher over a scripted ring: what the kernel and the simulation both
//! rely on, checked step by step with the time in the test's hand.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use super::*;
use crate::command::Command;
use crate::mediator::harness::{self, host_addr, host_base, req, Guest, FB};
use crate::mediator::{MediatorConfig, ScanoutConfig, VmGpuConfig};
use crate::sched::{Mode, SchedConfig, VmParams};
use crate::wire::{self, format};

const MS: u64 = 1_000_000;

/// A ring the test completes by hand.
#[derive(Default)]
struct Ring {
    /// Slots the ring really has (what `free_slots` says may be more: `lie`).
    slots: usize,
    lie: usize,
    on_ring: VecDeque<(u64, VmId, u32)>,
    done: Vec<(u64, u32)>,
    /// Every command the device accepted: (vm, command type).
    ran: Vec<(VmId, u32)>,
    bound_ns: Option<u64>,
    /// The time now (set by the rig), and when each accepted command was submitted.
    now: u64,
    submitted_at: Vec<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Full;

impl Gpu for Ring {
    type Error = Full;
    fn free_slots(&self, _: QueueId) -> usize {
        (self.slots + self.lie).saturating_sub(self.on_ring.len())
    }
    fn submit(&mut self, vm: VmId, cmd: &HostCommand, token: u64) -> Result<(), Full> {
        if self.on_ring.len() >= self.slots {
            return Err(Full);
        }
        self.on_ring.push_back((token, vm, cmd.request.cmd.type_()));
        self.ran.push((vm, cmd.request.cmd.type_()));
        self.submitted_at.push(self.now);
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<(u64, u32)>) {
        out.append(&mut self.done);
    }
    fn cost_bound_ns(&self, _: &Command) -> Option<u64> {
        self.bound_ns
    }
}

impl Ring {
    /// The device completes its `n` oldest commands.
    fn complete(&mut self, n: usize) {
        for _ in 0..n {
            if let Some((token, _, _)) = self.on_ring.pop_front() {
                self.done.push((token, wire::RESP_OK_NODATA));
            }
        }
    }
}

struct Guests(Vec<Guest>);

impl Memories for Guests {
    fn memory(&mut self, vm: VmId) -> Option<&mut dyn GuestMemory> {
        self.0
            .iter_mut()
            .find(|g| g.vm == vm)
            .map(|g| &mut g.mem as &mut dyn GuestMemory)
    }
}

struct Rig {
    d: Dispatcher<Ring>,
    g: Guests,
    now: u64,
}

impl Rig {
    fn new(n: usize, mode: Mode, ring: Ring) -> Self {
        let mut med = Mediator::new(MediatorConfig::new(harness::VRAM, n as u32));
        let mut sched = Scheduler::new(SchedConfig {
            mode,
            base_quantum_ns: MS,
            adaptive: false,
        })
        .unwrap();
        let mut guests = Vec::new();
        for i in 0..n {
            let vm = i as VmId + 1;
            let cfg = VmGpuConfig::new(vec![ScanoutConfig {
                physical: i as u32,
                width: 64,
                height: 64,
            }]);
            med.add_vm(vm, cfg).unwrap();
            med.start_queues(
                vm,
                harness::control_layout(false),
                harness::cursor_layout(false),
            )
            .unwrap();
            med.set_vector(vm, QueueId::Control, 1).unwrap();
            sched.add_vm(vm, VmParams::default()).unwrap();
            guests.push(Guest::new(vm, host_base(i), false));
        }
        Self {
            d: Dispatcher::new(med, sched, ring, DispatchConfig::default()),
            g: Guests(guests),
            now: 0,
        }
    }

    /// VM `vm` queues `cmds` and rings.
    fn send(&mut self, vm: VmId, cmds: &[Command]) {
        let g = &mut self.g.0[usize::from(vm) - 1];
        for c in cmds {
            g.add(QueueId::Control, &req(c.clone()));
        }
        g.kick(QueueId::Control);
        self.d.gpu.now = self.now;
        self.d.doorbell(vm, QueueId::Control, &mut g.mem, self.now);
        self.d.schedule(self.now);
    }

    fn service(&mut self) -> Serviced {
        self.d.gpu.now = self.now;
        self.d.service(&mut self.g, self.now)
    }

    /// Responses VM `vm` got back, in order.
    fn answers(&mut self, vm: VmId) -> Vec<u32> {
        self.g.0[usize::from(vm) - 1]
            .take_used(QueueId::Control)
            .into_iter()
            .map(|r| r.resp.map_or(0, |(h, _)| h.type_))
            .collect()
    }
}

fn create(id: u32) -> Command {
    Command::ResourceCreate2d {
        resource_id: id,
        format: format::B8G8R8X8_UNORM,
        width: 16,
        height: 16,
    }
}

fn creates(first: u32, n: u32) -> Vec<Command> {
    (first..first + n).map(create).collect()
}

#[test]
fn a_refused_command_goes_back_and_runs_later_never_answered_as_failed() {
    // The ring says it has 8 free slots but takes 2.
    let mut r = Rig::new(
        1,
        Mode::BestEffort,
        Ring {
            slots: 2,
            lie: 6,
            ..Ring::default()
        },
    );
    r.send(1, &creates(1, 5));
    assert_eq!(r.d.gpu().ran.len(), 2);
    let refused: Vec<_> =
        r.d.take_events()
            .into_iter()
            .filter_map(|e| match e {
                DispatchEvent::Refused { requeued, .. } => Some(requeued),
                _ => None,
            })
            .collect();
    assert_eq!(
        refused,
        [3],
        "the refused command and the rest of its batch went back"
    );
    assert!(
        r.answers(1).is_empty(),
        "nothing answered before the device ran it"
    );
    for _ in 0..10 {
        r.d.gpu_mut().complete(2);
        r.now += 10_000;
        r.service();
    }
    assert_eq!(r.d.gpu().ran.len(), 5, "each command ran exactly once");
    assert_eq!(r.answers(1), vec![wire::RESP_OK_NODATA; 5]);
}

#[test]
fn batches_are_sized_to_the_slice_by_the_cost_bound() {
    let mut r = Rig::new(
        1,
        Mode::BestEffort,
        Ring {
            slots: 64,
            bound_ns: Some(400_000),
            ..Ring::default()
        },
    );
    r.send(1, &creates(1, 5));
    assert_eq!(
        r.d.gpu().on_ring.len(),
        2,
        "two 0.4 ms commands fit a 1 ms slice"
    );
    r.now = 800_000;
    r.d.gpu_mut().complete(2);
    r.service();
    // 0.2 ms left: the slice closes and the VM (alone) gets a fresh one.
    assert_eq!(r.d.gpu().on_ring.len(), 2);
    let closed =
        r.d.take_events()
            .into_iter()
            .filter(|e| matches!(e, DispatchEvent::SliceClosed { .. }))
            .count();
    assert_eq!(closed, 1);
}

#[test]
fn without_a_bound_batches_follow_the_measured_cost() {
    let mut r = Rig::new(
        1,
        Mode::BestEffort,
        Ring {
            slots: 64,
            ..Ring::default()
        },
    );
    // First guess 0.1 ms a command: ten fit the 1 ms slice.
    r.send(1, &creates(1, 20));
    assert_eq!(r.d.gpu().on_ring.len(), 10);
    // They took 0.5 ms each (5 ms, an overrun): the estimate moves up.
    r.now = 5 * MS;
    r.d.gpu_mut().complete(10);
    r.service();
    let first = r.d.gpu().on_ring.len();
    assert!(first < 10, "the next batch is smaller: {first}");
    assert_eq!(r.d.figures(1).unwrap().overruns, 1);
}

#[test]
fn a_fixed_share_slot_of_an_idle_vm_stays_idle_until_it_ends() {
    let mut r = Rig::new(
        2,
        Mode::FixedShare,
        Ring {
            slots: 64,
            bound_ns: Some(100_000),
            ..Ring::default()
        },
    );
    // VM 1 always has work; VM 2 never has.
    let mut next_id = 1;
    while r.now < 20 * MS {
        if r.d.mediator().vm(1).unwrap().staged_len() < 20 {
            r.send(1, &creates(next_id, 20));
            next_id += 20;
        }
        r.service();
        r.now += 50_000;
        let n = r.d.gpu().on_ring.len();
        r.d.gpu_mut().complete(n);
        r.service();
        r.answers(1);
    }
    let reserved: Vec<(u64, u64)> =
        r.d.take_events()
            .into_iter()
            .filter_map(|e| match e {
                DispatchEvent::SliceClosed { vm: 2, slice, .. } => {
                    assert_eq!(slice.kind, SliceKind::Reserved);
                    Some((slice.start_ns, slice.end_ns()))
                }
                _ => None,
            })
            .collect();
    assert!(reserved.len() >= 8, "VM 2 got its slots: {reserved:?}");
    for (start, end) in &reserved {
        assert!(
            !r.d.gpu().submitted_at.iter().any(|t| t >= start && t < end),
            "VM 1 ran in VM 2's slot {start}..{end}"
        );
    }
    // Half the time is VM 1's, the other half sits idle.
    let busy = r.d.figures(1).unwrap().gpu_busy_us;
    assert!(
        (8_000..=11_000).contains(&busy),
        "VM 1 busy {busy} us of 20 ms"
    );
}

#[test]
fn an_overdue_batch_is_parked_and_the_others_go_on() {
    let mut r = Rig::new(
        2,
        Mode::BestEffort,
        Ring {
            slots: 64,
            ..Ring::default()
        },
    );
    r.send(1, &creates(1, 1));
    r.send(2, &creates(100, 1));
    assert_eq!(
        r.d.gpu().on_ring.len(),
        1,
        "VM 1's batch is out, VM 2 waits"
    );
    // VM 1's command does not come back for a long time.
    r.now = 102 * MS;
    r.service();
    assert!(r
        .d
        .take_events()
        .iter()
        .any(|e| matches!(e, DispatchEvent::Parked { vm: 1, .. })));
    assert_eq!(
        r.d.gpu().ran,
        vec![
            (1, wire::CMD_RESOURCE_CREATE_2D),
            (2, wire::CMD_RESOURCE_CREATE_2D)
        ]
    );
    // Both come back: both guests get their answers.
    r.d.gpu_mut().complete(2);
    r.now += MS;
    r.service();
    assert_eq!(r.answers(1), [wire::RESP_OK_NODATA]);
    assert_eq!(r.answers(2), [wire::RESP_OK_NODATA]);
}

#[test]
fn a_hung_vm_is_reset_its_grants_revoked_and_the_other_vm_runs() {
    let mut r = Rig::new(
        2,
        Mode::BestEffort,
        Ring {
            slots: 64,
            ..Ring::default()
        },
    );
    // VM 1 backs a resource: its pages are granted.
    let attach = Command::ResourceAttachBacking {
        resource_id: 1,
        entries: harness::entries(FB, 16 * 16 * 4, 1),
    };
    r.send(1, &[create(1), attach]);
    r.d.gpu_mut().complete(2);
    r.now += MS;
    r.service();
    assert!(r.d.grants().of_vm(1) > 0);
    assert!(r.d.grants().covers(host_addr(0, FB), 4096));
    // Then a command that never completes.
    r.send(1, &creates(2, 1));
    r.d.gpu_mut().on_ring.clear();
    r.now += 3_000 * MS;
    let s = r.service();
    assert_eq!(s.hung, [1]);
    // The watchdog's wait is not taken as GPU time of its commands (it would make
    // the VM's next batches one command each).
    assert!(r.d.figures(1).unwrap().gpu_busy_us < 10_000);
    assert!(r.d.cost_per_cmd_ns.get(&1).is_none_or(|&c| c < 10 * MS));
    assert_eq!(
        r.d.grants().of_vm(1),
        0,
        "a reset VM's pages are unreachable"
    );
    assert!(!r.d.grants().covers(host_addr(0, FB), 4096));
    // VM 2 is served.
    r.send(2, &creates(100, 1));
    r.d.gpu_mut().complete(64);
    r.now += MS;
    r.service();
    r.d.gpu_mut().complete(64);
    r.now += MS;
    r.service();
    assert_eq!(r.answers(2), [wire::RESP_OK_NODATA]);
}

#[test]
fn zero_copy_buffers_are_checked_granted_charged_and_taken_back() {
    let mut r = Rig::new(
        1,
        Mode::BestEffort,
        Ring {
            slots: 8,
            ..Ring::default()
        },
    );
    let mem = r.g.0[0].mem.clone();
    assert_eq!(
        r.d.register_buffer(1, &mem, Gpa::new(0x1001), 4096),
        Err(BufferError::BadRange)
    );
    assert_eq!(
        r.d.register_buffer(1, &mem, Gpa::new(0), 0),
        Err(BufferError::BadRange)
    );
    assert!(matches!(
        r.d.register_buffer(1, &mem, Gpa::new(harness::RAM as u64), 4096),
        Err(BufferError::NotOwned(_))
    ));
    let before = r.d.mediator().vm(1).unwrap().memory().used();
    let h = r.d.register_buffer(1, &mem, FB, 2 * 4096).unwrap();
    assert!(r.d.grants().covers(host_addr(0, FB), 2 * 4096));
    assert!(
        r.d.mediator().vm(1).unwrap().memory().used() > before,
        "charged"
    );
    assert_eq!(r.d.unregister_buffer(1, h + 1), None);
    assert_eq!(r.d.unregister_buffer(1, h), Some(host_addr(0, FB)));
    assert!(!r.d.grants().covers(host_addr(0, FB), 4096));
    assert_eq!(r.d.mediator().vm(1).unwrap().memory().used(), before);
    let mut handles = Vec::new();
    for _ in 0..MAX_BUFFERS_PER_VM {
        handles.push(r.d.register_buffer(1, &mem, FB, 4096).unwrap());
    }
    assert_eq!(
        r.d.register_buffer(1, &mem, FB, 4096),
        Err(BufferError::TooMany)
    );
    r.d.remove_vm(1, 0).unwrap();
    assert_eq!(
        r.d.grants().granted_pages(),
        0,
        "a removed VM's buffers are unregistered"
    );
}
