//! The bounds the simulation must show. Tests run with frames 8 times smaller in
//! each dimension and per-byte costs 64 times higher ([`Scenario::small_frames`]):
//! the GPU time of every frame is that of a 1280x800 frame, the host copies 64
//! times fewer pixels, so a debug build simulates a second in a few seconds.

use super::*;
use crate::sched::MAX_QUANTUM_NS;

fn small(sc: Scenario, ms: u64) -> Scenario {
    Scenario {
        duration_ns: ms * 1_000_000,
        ..sc.small_frames(8)
    }
}

/// Checks that hold in every run: nothing invalid reached the GPU, the GPU only
/// touched mapped memory, nothing ran that no guest asked for, no slice overran,
/// no VM hung, `U_gpu <= 1`, and every VM waited for a slice no longer than the
/// scheduler's bound.
fn assert_sound(r: &Report) {
    assert_eq!(r.gpu_errors, 0, "{r}");
    assert_eq!(r.iommu_faults, 0, "{r}");
    assert_eq!(r.iommu_errors, 0, "{r}");
    assert_eq!(r.unexpected_host_commands, 0, "{r}");
    assert_eq!(r.overruns, 0, "{r}");
    assert_eq!(r.hangs, 0, "{r}");
    assert!(r.u_gpu <= 1.0, "{r}");
    assert!(r.u_gpu_sched.num <= r.u_gpu_sched.den, "{r}");
    let sum: f64 = r.vms.iter().map(|v| v.utilization).sum();
    assert!((sum - r.u_gpu).abs() < 1e-9);
    for v in &r.vms {
        assert!(
            v.max_wait_ns <= v.wait_bound_ns,
            "VM {} waited {} > {}\n{r}",
            v.vm,
            v.max_wait_ns,
            v.wait_bound_ns
        );
        if !matches!(v.load, Load::Malicious { .. }) {
            assert_eq!(v.errors, 0, "VM {} got error responses\n{r}", v.vm);
        }
    }
    assert_eq!(r.fences.violations, 0, "{r}");
    assert_eq!(r.fences.echo_errors, 0, "{r}");
}

/// The stride-scheduling bound of `sched.rs` (`|S_i·S − T·s_i| <= (Q_i + 2)·S +
/// (ΣQ + 2n)·s_i`, as a fraction of the window) plus one slice at each end of
/// the window, where a slice may straddle it.
fn share_tolerance(r: &Report, vm: &VmReport) -> f64 {
    let q = |v: &VmReport| {
        let nominal = boosted(r.sched.base_quantum_ns, v.alpha_tenths);
        if r.sched.adaptive {
            MAX_QUANTUM_NS
        } else {
            nominal
        }
    };
    let sum_q: u64 = r.vms.iter().map(q).sum();
    let max_q = r.vms.iter().map(q).max().unwrap_or(0);
    let ws_ppm = (vm.weight_share * 1e6) as u64;
    crate::sched::share_error_bound_ppm(q(vm), sum_q, max_q, ws_ppm, r.window_ns) as f64 / 1e6
}

fn boosted(base: u64, alpha_tenths: u8) -> u64 {
    crate::sched::boosted_quantum_ns(base, alpha_tenths).min(MAX_QUANTUM_NS)
}

#[test]
fn shares_follow_weights_within_the_stated_tolerance() {
    let r = run(&small(Scenario::weighted_saturating(), 600)).unwrap();
    assert_sound(&r);
    for v in &r.vms {
        let tol = share_tolerance(&r, v);
        assert!(
            tol < crate::sched::MAX_SHARE_ERROR_PPM as f64 / 1e6,
            "tolerance {tol} too loose to mean anything"
        );
        assert!(
            (v.gpu_share - v.weight_share).abs() <= tol,
            "VM {}: GPU share {} vs weight share {} (tolerance {tol})\n{r}",
            v.vm,
            v.gpu_share,
            v.weight_share
        );
        // No starvation: even the lightest VM is served all along, and its
        // latency stays within what the scheduler promises.
        assert!(v.completed > 50, "VM {} starved\n{r}", v.vm);
        let within = v.within_bound();
        assert_eq!(within, Some(true), "VM {}: p99 over L_max\n{r}", v.vm);
    }
    let j = r.jain.unwrap();
    assert!(j > 0.999, "Jain's index {j}\n{r}");
    // Always busy, and the switches are the only overhead.
    assert!(r.u_gpu > 0.99, "{r}");
    assert!(r.efficiency > 0.9, "{r}");
}

#[test]
fn boost_alpha_doubles_share_and_slice() {
    let mut sc = Scenario::new(
        "alpha",
        vec![
            VmSpec {
                alpha_tenths: 10,
                ..VmSpec::new(Load::SATURATING, 1)
            },
            VmSpec::new(Load::SATURATING, 1),
        ],
    );
    sc.sched.base_quantum_ns = 1_000_000;
    let r = run(&small(sc, 400)).unwrap();
    assert_sound(&r);
    let (a, b) = (&r.vms[0], &r.vms[1]);
    assert!((a.weight_share - 2.0 / 3.0).abs() < 1e-9);
    for v in [a, b] {
        let tol = share_tolerance(&r, v);
        assert!((v.gpu_share - v.weight_share).abs() <= tol, "{r}");
    }
    // TS_high = TS_base * (1 + α): the boosted VM's slices are 2 ms, the other's 1.
    let quantum = |v: &VmReport| v.window.allocated_ns / v.window.quanta_allocated;
    assert_eq!((quantum(a), quantum(b)), (2_000_000, 1_000_000), "{r}");
}

#[test]
fn the_malicious_vm_is_refused_everything_and_the_others_are_served() {
    let r = run(&small(Scenario::mix(), 500)).unwrap();
    assert_sound(&r);
    let evil = r.first("malicious").unwrap();
    assert!(evil.attacks > 200, "{r}");
    assert_eq!(evil.attacks_accepted, 0, "{r}");
    // Every attack command was refused (ring faults count on top).
    assert!(evil.rejected >= evil.attacks + evil.ring_attacks, "{r}");
    // Every corrupted ring ended in a reset, and the reset gave everything back.
    assert!(evil.ring_attacks > 0, "{r}");
    assert_eq!(evil.resets, evil.ring_attacks, "{r}");
    assert_eq!(evil.mapped_pages, 0, "{r}");
    assert!(evil.storms.1 > 1000, "{r}");
    // The others' resources were never touched.
    assert!(!r.good_resources.0.is_empty());
    assert_eq!(r.good_resources.0, r.good_resources.1);
    // ... and they were served: the saturating VM took what the others left.
    let sat = r.first("saturating").unwrap();
    let int = r.first("interactive").unwrap();
    assert!(sat.completed > 1000 && int.completed > 20, "{r}");
    assert!(sat.gpu_share > 0.95, "{r}");
    assert_eq!(int.within_bound(), Some(true), "{r}");
    assert_eq!(sat.within_bound(), Some(true), "{r}");
    // The interactive VM's fenced cursor uploads were measured.
    assert!(r.fences.count > 0, "{r}");
    // A fence is never signalled before the GPU finished the command.
    assert!(r.fences.t_wait_ns.0 >= r.fences.t_real_ns.0);
}

#[test]
fn an_interactive_vm_stays_within_its_latency_bound_next_to_any_neighbour() {
    let base = small(Scenario::mix(), 300);
    let n = noisy_neighbour(&base).unwrap();
    assert_eq!(n.runs.len(), 4);
    let alone = n.alone().p99_ns;
    for (name, v) in &n.runs {
        assert!(v.completed > 10, "{name}\n{n}");
        assert_eq!(v.errors, 0, "{name}\n{n}");
        assert_eq!(v.within_bound(), Some(true), "{name}\n{n}");
        assert!(v.p99_ns >= alone, "{name}\n{n}");
    }
    // Next to a saturating VM the interactive one waits for its slices: the
    // noisy neighbour is real, and bounded.
    let with = &n.runs[1].1;
    assert!(with.p99_ns > 10 * alone, "{n}");
}

#[test]
fn a_run_is_a_function_of_its_seed() {
    let sc = small(Scenario::mix(), 120);
    let a = run(&sc).unwrap();
    let b = run(&sc).unwrap();
    assert_eq!(a, b);
    let c = run(&Scenario { seed: 2, ..sc }).unwrap();
    assert_ne!(a.vms, c.vms);
}

#[test]
fn equal_share_holds_an_idle_vms_slots() {
    let mut sc = Scenario::new(
        "equal share",
        vec![VmSpec::new(Load::SATURATING, 4), VmSpec::new(Load::Idle, 1)],
    );
    sc.sched.mode = Mode::EqualShare;
    let r = run(&small(sc, 300)).unwrap();
    assert_sound(&r);
    // Weights are ignored and the idle VM's slot is held idle: the saturating
    // VM gets about half the GPU, which is idle the other half.
    let u = r.vms[0].utilization;
    assert!((0.45..=0.51).contains(&u), "{r}");
    assert!(r.vms[1].window.quanta_allocated > 50, "{r}");
    assert_eq!(r.vms[1].window.quanta_used, 0, "{r}");
}

#[test]
fn adaptive_quanta_keep_the_bounds() {
    let mut sc = Scenario::mix();
    sc.sched.adaptive = true;
    let r = run(&small(sc, 300)).unwrap();
    assert_sound(&r);
    let int = r.first("interactive").unwrap();
    assert_eq!(int.within_bound(), Some(true), "{r}");
}

#[test]
fn scenarios_are_checked() {
    let bad = [
        Scenario::new("none", Vec::new()),
        Scenario {
            display: (32, 32),
            ..Scenario::mix()
        },
        Scenario {
            display: (2048, 2048),
            ..Scenario::mix()
        },
        Scenario {
            warmup_ns: 2_000_000_000,
            ..Scenario::mix()
        },
        Scenario {
            max_batch: 0,
            ..Scenario::mix()
        },
    ];
    for sc in bad {
        assert!(matches!(run(&sc), Err(SimError::Scenario(_))), "{sc:?}");
    }
    let mut sc = Scenario::mix();
    sc.vms[0].weight = 0;
    assert!(matches!(run(&sc), Err(SimError::Sched(_))));
}

#[test]
fn rng_is_deterministic_and_in_range() {
    let mut a = Rng::new(7);
    let mut b = Rng::new(7);
    let mut hist = [0u32; 10];
    for _ in 0..10_000 {
        let x = a.below(10);
        assert_eq!(x, b.below(10));
        hist[x as usize] += 1;
        let y = a.range(3, 5);
        b.range(3, 5);
        assert!((3..=5).contains(&y));
    }
    assert!(hist.iter().all(|&h| (800..1200).contains(&h)), "{hist:?}");
    assert_eq!(Rng::new(1).below(0), 0);
    assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
}

#[test]
fn jain_index_extremes() {
    assert_eq!(jain_index(&[]), None);
    assert_eq!(jain_index(&[1.0, 1.0, 1.0]), Some(1.0));
    assert_eq!(jain_index(&[1.0, 0.0, 0.0, 0.0]), Some(0.25));
}

#[test]
fn cost_bounds_match_the_sim_gpu() {
    let c = CostModel::default();
    let fullframe = Command::TransferToHost2d {
        rect: full(1280, 800),
        offset: 0,
        resource_id: 1,
    };
    // 5 us + 4,096,000 bytes at 100 ps.
    assert_eq!(cost_bound_ns(&c, &fullframe), 5_000 + 409_600);
    let attach = Command::ResourceAttachBacking {
        resource_id: 1,
        entries: vec![MemEntry::default(); 85],
    };
    assert_eq!(cost_bound_ns(&c, &attach), 5_000 + 8_500);
    assert_eq!(cost_bound_ns(&CostModel::FREE, &Command::GetDisplayInfo), 0);
}
