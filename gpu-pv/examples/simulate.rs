//! Prints the GPU-sharing figures of the deterministic simulation (`gpu_pv::sim`):
//! four saturating VMs with weights 1, 2, 4 and 8; an interactive + saturating +
//! malicious + idle mix; and the noisy-neighbour comparison of an interactive VM's
//! latency alone and next to other loads.
//!
//! ```text
//! cargo run -p gpu-pv --features sim --example simulate --release [-- --seed N --ms N --ts-us N --adaptive --small K]
//! ```
//!
//! `--ms` is the simulated time per run, `--ts-us` the base quantum, `--small K`
//! divides the frames by K in each dimension (same GPU time per frame, K² fewer
//! host pixel copies).

use std::process::ExitCode;
use std::time::Instant;

use gpu_pv::sim::{self, Scenario};

struct Args {
    seed: u64,
    ms: u64,
    ts_us: Option<u64>,
    adaptive: bool,
    small: u32,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        seed: 1,
        ms: 1000,
        ts_us: None,
        adaptive: false,
        small: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--seed" => a.seed = num("--seed")?,
            "--ms" => a.ms = num("--ms")?.max(50),
            "--ts-us" => a.ts_us = Some(num("--ts-us")?),
            "--small" => a.small = num("--small")? as u32,
            "--adaptive" => a.adaptive = true,
            "--bench" => {} // passed by `cargo bench --all-targets`
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn configure(mut sc: Scenario, a: &Args) -> Scenario {
    sc.seed = a.seed;
    sc.duration_ns = a.ms * 1_000_000;
    if let Some(ts) = a.ts_us {
        sc.sched.base_quantum_ns = ts * 1000;
    }
    sc.sched.adaptive = a.adaptive;
    sc.small_frames(a.small)
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("simulate: {e}");
            return ExitCode::from(2);
        }
    };
    let mut bad = false;
    for sc in [Scenario::weighted_saturating(), Scenario::mix()] {
        let sc = configure(sc, &a);
        let t = Instant::now();
        match sim::run(&sc) {
            Ok(r) => {
                println!("{r}");
                println!(
                    "(simulated {} ms in {:.2} s of host time)\n",
                    a.ms,
                    t.elapsed().as_secs_f64()
                );
                bad |= r.vms.iter().any(|v| {
                    matches!(v.load, sim::Load::Interactive { .. })
                        && v.within_bound() == Some(false)
                });
            }
            Err(e) => {
                eprintln!("simulate: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let base = configure(Scenario::mix(), &a);
    let t = Instant::now();
    match sim::noisy_neighbour(&base) {
        Ok(n) => {
            println!(
                "== noisy neighbour (seed {}, {} ms each, TS {:.1} ms) ==",
                a.seed,
                a.ms,
                base.sched.base_quantum_ns as f64 / 1e6
            );
            println!("{n}");
            println!(
                "(4 runs in {:.2} s of host time)",
                t.elapsed().as_secs_f64()
            );
        }
        Err(e) => {
            eprintln!("simulate: {e}");
            return ExitCode::FAILURE;
        }
    }
    if bad {
        eprintln!("simulate: an interactive VM's p99 exceeded its L_max");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
