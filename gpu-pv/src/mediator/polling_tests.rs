//! Polling mode: while the hypervisor polls a VM's queues during its slice, the
//! guest is asked not to kick, and every command still gets through; leaving polling
//! mode asks for kicks again and serves what was queued.

use super::harness::*;
use super::*;
use crate::command::Command;

fn flushes(w: &mut World, n: usize) -> usize {
    let mut kicks = 0;
    for _ in 0..n {
        w.guests[0].add(
            QueueId::Control,
            &req(Command::ResourceFlush {
                rect: rect(8, 8),
                resource_id: 0,
            }),
        );
        if w.guests[0].kick(QueueId::Control) {
            kicks += 1;
        }
    }
    kicks
}

fn polling_suppresses_kicks_and_loses_nothing(event_idx: bool) {
    let mut w = World::new(1, event_idx);
    let vm = w.vm(0);
    // Not polled: the first chain after the ring drained asks for a kick.
    assert_eq!(flushes(&mut w, 1), 1, "a kick is due when not polled");
    w.med.poll(vm, &mut w.guests[0].mem).unwrap();
    w.med.set_polled(vm, true, &mut w.guests[0].mem).unwrap();
    assert!(w.med.vm(vm).unwrap().polled());
    let mut answered = w.guests[0].take_used(QueueId::Control).len();
    for _ in 0..20 {
        assert_eq!(flushes(&mut w, 3), 0, "no kick while polled");
        let r = w.med.poll(vm, &mut w.guests[0].mem).unwrap();
        assert_eq!(
            r.emulated + r.staged + r.rejected,
            3,
            "the poll takes all three"
        );
        answered += w.guests[0].take_used(QueueId::Control).len();
    }
    assert_eq!(answered, 61);
    // Chains queued at the end of the slice are served when polling stops, and the
    // next chain asks for a kick again.
    assert_eq!(flushes(&mut w, 2), 0);
    let r = w.med.set_polled(vm, false, &mut w.guests[0].mem).unwrap();
    assert_eq!(r.emulated + r.staged + r.rejected, 2);
    assert_eq!(flushes(&mut w, 1), 1, "kicks are asked for again");
}

#[test]
fn polling_with_event_idx() {
    polling_suppresses_kicks_and_loses_nothing(true);
}

#[test]
fn polling_with_flags() {
    polling_suppresses_kicks_and_loses_nothing(false);
}

#[test]
fn set_polled_on_unknown_vm_is_an_error() {
    let mut w = World::new(1, true);
    let r = w.med.set_polled(99, true, &mut w.guests[0].mem);
    assert!(matches!(r, Err(MediatorError::UnknownVm(99))));
}
