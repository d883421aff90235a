//! The benchmark behind `scripts/bench.sh`: hyperjob against a baseline that does what GitLab's
//! documented libvirt shell driver does (`virt-install`, `virsh domifaddr` polled once a second,
//! a new `ssh` per stage; scripts/bench-baseline), on the same guest image in the same run,
//! both driven exactly as GitLab Runner drives a Custom executor (tests/harness). It prints
//! medians over N rounds and asserts nothing.
//!
//!   bench [--rounds N] [--concurrent K] [--stages M]
//!
//! Per round, alternating the two sides: a job step by step (cold prepare, M trivial
//! `build_script` stages, cleanup), the demo job of `scripts/demo.sh` as a whole, and a bare
//! boot (bare.rs, the lower bound of a cold prepare). Then N warm prepares from a pool of one
//! (hyperjob only), then N rounds of K demo jobs at once per side. A warm-up job per side comes
//! first and is not counted (it leaves the DHCP leases every later round reuses).

#[path = "../../tests/support/mod.rs"]
mod support;

mod bare;
mod figures;
mod sides;

use std::process::{Command, ExitCode};
use std::time::Instant;

use figures::{print_table, Row, Samples};
use sides::Side;
use support::{demo_git_server, unique_job_id, TestEnv, Workspace};

#[derive(Debug)]
struct Options {
    rounds: usize,
    concurrent: usize,
    stages: usize,
    /// Only the bare boot, `rounds` times (calibration).
    bare_only: bool,
}

impl Options {
    fn from_args() -> Self {
        let mut options = Self {
            rounds: 5,
            concurrent: 4,
            stages: 5,
            bare_only: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            if arg == "--bare-only" {
                options.bare_only = true;
                continue;
            }
            let value = args
                .next()
                .and_then(|v| v.parse().ok())
                .filter(|v| *v > 0)
                .unwrap_or_else(|| usage(&arg));
            match arg.as_str() {
                "--rounds" => options.rounds = value,
                "--concurrent" => options.concurrent = value,
                "--stages" => options.stages = value,
                _ => usage(&arg),
            }
        }
        options
    }
}

fn usage(arg: &str) -> ! {
    eprintln!("bench: bad argument {arg:?}; usage: bench [--rounds N] [--concurrent K] [--stages M] (each a positive number)");
    std::process::exit(2)
}

fn main() -> ExitCode {
    let options = Options::from_args();
    let env = TestEnv::load();
    if options.bare_only {
        let ws = env.workspace("bench-bare");
        for round in 0..=options.rounds {
            let boot = bare::boot(&env, &ws.config_path, &bare_name(round));
            println!("bare boot {round}: {boot:?}");
        }
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    let cold_ws = env.workspace("bench-hyperjob");
    let warm_ws = env.workspace("bench-pool");
    warm_ws.write_config(&format!("{}\n[pool]\nsize = 1\n", warm_ws.default_config()));
    let baseline_ws = env.workspace("bench-baseline");
    let scripts = std::env::current_dir()
        .expect("cwd")
        .join("scripts/bench-baseline");
    let mut hj = Side::hyperjob(&env, &cold_ws);
    let mut warm = Side::hyperjob(&env, &warm_ws);
    let mut base = Side::baseline(&env, &scripts, &baseline_ws.images_dir);
    let git = demo_git_server(&env.bridge_ip);
    let (mut hs, mut bs) = (Samples::default(), Samples::default());

    println!(
        "bench: {} rounds, {} trivial stages per job, {} concurrent jobs; hyperjob {}",
        options.rounds,
        options.stages,
        options.concurrent,
        env.hyperjob.display()
    );
    println!("load average at the start: {}", load_average());
    println!("warm-up (not counted): one job per side and one bare boot");
    hj.step_job(unique_job_id(), 1, "warm-up", &mut Samples::default());
    base.step_job(unique_job_id(), 1, "warm-up", &mut Samples::default());
    bare::boot(&env, &cold_ws.config_path, &bare_name(0));

    for round in 1..=options.rounds {
        hj.step_job(unique_job_id(), options.stages, "cold", &mut hs);
        base.step_job(unique_job_id(), options.stages, "cold", &mut bs);
        let boot = bare::boot(&env, &cold_ws.config_path, &bare_name(round));
        hs.add("bare: address", boot.address.as_secs_f64());
        hs.add("bare: connected", boot.connected.as_secs_f64());
        hs.add("bare: ready", boot.ready.as_secs_f64());
        for (side, samples) in [(&mut hj, &mut hs), (&mut base, &mut bs)] {
            if let Some(duration) = side.demo_job(unique_job_id(), &git.repo_url, &git.sha) {
                samples.add("demo job", duration.as_secs_f64());
            }
        }
        println!(
            "round {round}: cold prepare {:.2} / {:.2} s (bare {:.2} s), cleanup {:.2} / {:.2} s, demo job {:.1} / {:.1} s (hyperjob / baseline, medians so far)",
            hs.median("cold prepare").unwrap_or(f64::NAN),
            bs.median("cold prepare").unwrap_or(f64::NAN),
            hs.median("bare: ready").unwrap_or(f64::NAN),
            hs.median("cold cleanup").unwrap_or(f64::NAN),
            bs.median("cold cleanup").unwrap_or(f64::NAN),
            hs.median("demo job").unwrap_or(f64::NAN),
            bs.median("demo job").unwrap_or(f64::NAN),
        );
    }

    for round in 1..=options.rounds {
        // Returns once the pool's VM is ready (also after the refill a claim started).
        pool(&env, &warm_ws, "fill");
        warm.step_job(unique_job_id(), 1, "warm", &mut hs);
        println!(
            "warm round {round}: prepare {:.2} s",
            hs.median("warm prepare").unwrap_or(f64::NAN)
        );
    }
    pool(&env, &warm_ws, "drain");

    for round in 1..=options.rounds {
        for (side, samples) in [(&mut hj, &mut hs), (&mut base, &mut bs)] {
            let ids: Vec<i64> = (0..options.concurrent).map(|_| unique_job_id()).collect();
            let (wall, failed) = side.concurrent_jobs(&ids, &git.repo_url, &git.sha, samples);
            samples.add("concurrent wall", wall.as_secs_f64());
            samples.add("concurrent failed", failed as f64);
        }
        println!(
            "throughput round {round}: {} jobs in {:.1} / {:.1} s",
            options.concurrent,
            hs.median("concurrent wall").unwrap_or(f64::NAN),
            bs.median("concurrent wall").unwrap_or(f64::NAN)
        );
    }

    println!(
        "\n== medians over {} rounds (seconds; lower is better) ==",
        options.rounds
    );
    let k = options.concurrent;
    let rows = vec![
        Row::of("cold prepare", "s", "cold prepare", &hs, &bs),
        Row::of(
            "  of which: domain started",
            "s",
            "cold: domain started",
            &hs,
            &bs,
        ),
        Row::of("  of which: address known", "s", "cold: address", &hs, &bs),
        Row::of(
            "bare boot (lower bound): address",
            "s",
            "bare: address",
            &hs,
            &bs,
        ),
        Row::of(
            "bare boot (lower bound): TCP connect",
            "s",
            "bare: connected",
            &hs,
            &bs,
        ),
        Row::of(
            "bare boot (lower bound): SSH login",
            "s",
            "bare: ready",
            &hs,
            &bs,
        ),
        Row::of("warm prepare (pool of 1)", "s", "warm prepare", &hs, &bs),
        Row::of("per-stage overhead (trivial run)", "s", "stage", &hs, &bs),
        Row::of("cleanup", "s", "cold cleanup", &hs, &bs),
        Row::of("whole demo job", "s", "demo job", &hs, &bs),
        Row::of(
            &format!("{k} concurrent demo jobs (wall)"),
            "s",
            "concurrent wall",
            &hs,
            &bs,
        ),
        Row::of(
            &format!("  prepare with {k} at once"),
            "s",
            "concurrent prepare",
            &hs,
            &bs,
        ),
        Row::of(
            &format!("  of which failed (of {k})"),
            "",
            "concurrent failed",
            &hs,
            &bs,
        ),
    ];
    print_table(&rows);
    // Jobs that succeeded per hour: K at once, the median wall time, less the median failures.
    let per_hour = |samples: &Samples| match (
        samples.median("concurrent wall"),
        samples.median("concurrent failed"),
    ) {
        (Some(wall), Some(failed)) => format!("{:.0}", (k as f64 - failed) * 3600.0 / wall),
        _ => "n/a".to_string(),
    };
    println!(
        "throughput with {k} at once: {} successful jobs/h (hyperjob), {} (baseline)",
        per_hour(&hs),
        per_hour(&bs)
    );
    for side in [&hj, &warm, &base] {
        if let Some(first) = side.failures.first() {
            println!(
                "{:?}: {} job(s) failed, e.g. {first}",
                side.kind,
                side.failures.len()
            );
        }
    }
    println!(
        "baseline cleanups that left their VM running: {}, their disk: {} (removed by the bench afterwards)",
        base.left_running, base.left_disks
    );
    println!(
        "bench took {:.0} s; load average at the end: {} (the machine is shared)",
        started.elapsed().as_secs_f64(),
        load_average()
    );
    let _ = std::fs::remove_file(baseline_ws.images_dir.join("known_hosts"));
    for ws in [&cold_ws, &warm_ws, &baseline_ws] {
        ws.assert_nothing_left("hyperjob-job-");
    }
    ExitCode::SUCCESS
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn bare_name(round: usize) -> String {
    format!("hyperjob-bench-bare-{}-{round}", std::process::id())
}

/// `hyperjob pool ACTION` for the warm workspace.
fn pool(env: &TestEnv, ws: &Workspace, action: &str) {
    let output = Command::new(&env.hyperjob)
        .args(["pool", action])
        .env("HYPERJOB_CONFIG", &ws.config_path)
        .output()
        .expect("run hyperjob pool");
    assert!(
        output.status.success(),
        "hyperjob pool {action} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
