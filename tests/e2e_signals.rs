//! End-to-end: signals as systemd and GitLab Runner send them. A `systemctl stop` delivers two
//! SIGTERMs nearly at once (systemd's to the whole unit, the runner's to the stage's process
//! group): neither may cut the remote kill or the teardown of a half-built VM short. A stop
//! that comes at the very start of `run` (while it connects, shakes hands, logs in or starts
//! the guest shell) leaves no process of the script in the guest. Real binary, real libvirtd,
//! real TCG guests (the dropbear test image and the stock OpenSSH guest); run with
//! scripts/test.sh.

mod support;

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hyperjob_core::state::{JobState, StateStore};
use hyperjob_core::Endpoint;

use hyperjob_test_harness::{
    Driver, ExecutorSession, ExitInfo, Invocation, RunningInvocation, Stage,
};
use support::{
    configured_session_of, hyperjob_driver, nothing_of_the_script_left, prepared_session_of,
    recorded_phase, session_log, stoppable_job, unique_job_id, unix_now, vm_name,
    wait_for_prepare_point, wait_until, PreparePoint, TestEnv, Workspace,
};

const SIGTERM: i32 = 15;

/// Generous bounds: four TCG guests may share the two cores of a test machine.
const LOG_WAIT: Duration = Duration::from_secs(300);
/// A stop that did not wait for anything: far below the 30 s hyperjob allows itself.
const STOP_BOUND: Duration = Duration::from_secs(60);

/// hyperjob with debug logs in the job log: each step of `run` (TCP connection, handshake,
/// login, guest shell) and each signal it receives, in the order they happened.
fn logging_driver(env: &TestEnv, ws: &Workspace) -> Driver {
    hyperjob_driver(env, ws).with_env("HYPERJOB_LOG", "debug")
}

/// Whether process `pid` has a handler for `signal` (its `SigCgt` mask in /proc).
fn catches(pid: u32, signal: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// Whether `signal` is still pending for process `pid` as a whole (`ShdPnd`).
fn pending(pid: u32, signal: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("ShdPnd:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// Two SIGTERMs to the stage's process group as close together as the kernel lets them be
/// two: the second goes as soon as the first has been taken (a signal still pending would
/// merge with it). Returns when the first was sent.
fn sigterm_twice(running: &RunningInvocation) -> Instant {
    let pid = running.pid().expect("running");
    let sent = Instant::now();
    running.signal_group(SIGTERM).expect("first SIGTERM");
    wait_until("the first SIGTERM taken", Duration::from_secs(10), || {
        !pending(pid, SIGTERM)
    });
    running.signal_group(SIGTERM).expect("second SIGTERM");
    sent
}

/// Waits for the stage to end after the signal; panics (with the log) if it does not.
fn ended(running: RunningInvocation, session: &ExecutorSession) -> Invocation {
    running.wait_timeout(STOP_BOUND).unwrap_or_else(|_| {
        panic!(
            "the stage still runs {STOP_BOUND:?} after SIGTERM\n{}",
            session_log(session)
        )
    })
}

#[test]
fn two_sigterms_at_once_during_run_still_stop_the_remote_process_tree() {
    let env = TestEnv::load();
    let ws = env.workspace("two-sigterms-run");
    let id = unique_job_id();
    let session = prepared_session_of(
        &logging_driver(&env, &ws),
        &stoppable_job(id, "two-sigterms"),
    );
    let running = session
        .spawn_stage(&Stage::UserStep("script".into()))
        .expect("start build_script");
    // The whole line: hyperjob's debug lines say "guest shell started" too.
    wait_until("the line \"started\" in the job log", LOG_WAIT, || {
        session.log().iter().any(|line| line.text == "started")
    });

    let sent = sigterm_twice(&running);
    let run = ended(running, &session);

    println!(
        "run exited {:.2} s after two SIGTERMs",
        sent.elapsed().as_secs_f64()
    );
    let log = session_log(&session);
    // A system failure: neither killed by the second signal nor a build failure (1).
    assert_eq!(run.exit, ExitInfo::Exited(2), "{log}");
    assert!(nothing_of_the_script_left(&session), "{log}");
    // Two signals arrived, not one that the kernel merged.
    assert!(log.contains("received SIGTERM again"), "{log}");
    session.cleanup();
    ws.assert_nothing_left(&vm_name(id));
}

fn two_sigterms_during_prepare(name: &str, point: PreparePoint) {
    let env = TestEnv::load();
    let ws = env.workspace(name);
    let id = unique_job_id();
    let session = configured_session_of(&logging_driver(&env, &ws), &stoppable_job(id, name));
    let running = session.spawn_prepare().expect("start prepare");
    wait_for_prepare_point(&session, &ws, id, point, LOG_WAIT);
    assert_eq!(recorded_phase(&ws, id).as_deref(), Some("creating"));

    let sent = sigterm_twice(&running);
    let prepare = ended(running, &session);

    println!(
        "prepare ({point:?}) exited {:.2} s after two SIGTERMs",
        sent.elapsed().as_secs_f64()
    );
    let log = session_log(&session);
    assert_eq!(prepare.exit, ExitInfo::Exited(2), "{log}");
    // The signals hit the phase the test is named after.
    match point {
        PreparePoint::Creating => assert!(
            !log.contains("Waiting for the guest address"),
            "the VM was already created when the signals came: {log}"
        ),
        PreparePoint::Booting => assert!(!log.contains("Guest ready"), "{log}"),
    }
    // prepare itself removed domain, overlay and state: nothing is left before cleanup runs.
    ws.assert_nothing_left(&vm_name(id));
    // Whether prepare logged the second SIGTERM before it exited depends on scheduling (the
    // group's SIGTERM also ends qemu-img; an interrupted wait for the address ends at once):
    // what must hold either way is asserted above.
    let again = log.contains("received SIGTERM again");
    println!("the second SIGTERM was logged by prepare while it stopped: {again}");
    let cleanup = session.cleanup().expect("cleanup_exec ran");
    assert!(cleanup.error.is_none(), "{:?}", cleanup.error);
}

#[test]
fn two_sigterms_at_once_while_prepare_creates_the_vm_leave_nothing() {
    two_sigterms_during_prepare("two-sigterms-create", PreparePoint::Creating);
}

#[test]
fn two_sigterms_at_once_while_the_guest_boots_leave_nothing() {
    two_sigterms_during_prepare("two-sigterms-boot", PreparePoint::Booting);
}

/// How long after `run` has its signal handlers in place the SIGTERM goes.
const OFFSETS_MS: [u64; 8] = [0, 50, 100, 200, 300, 500, 750, 1000];

/// Where `run` was when the signal came, from the order of its debug lines and the signal's
/// own line in `log`.
fn phase_hit(log: &str) -> &'static str {
    let steps = [
        ("running stage script", "connecting"),
        ("TCP connection to", "the SSH handshake"),
        ("SSH handshake with", "logging in"),
        ("logged in as", "starting the guest shell"),
        ("guest shell started", "the script running"),
    ];
    let mut phase = "loading config and state";
    for line in log.lines() {
        if line.contains("received SIGTERM") {
            return phase;
        }
        if let Some((_, next)) = steps.iter().find(|(needle, _)| line.contains(needle)) {
            phase = next;
        }
    }
    // The signal came before the log was set up, the first thing after the handlers.
    "startup (before the log was set up)"
}

/// SIGTERM at each of [`OFFSETS_MS`] after `run` starts: every time the stage exits as a
/// system failure and no process of the script is left in the guest, whether it had started
/// or not. Prints which phase each signal hit.
fn stop_at_the_very_start(env: &TestEnv, ws: &Workspace, name: &str) {
    let id = unique_job_id();
    let session = prepared_session_of(&logging_driver(env, ws), &stoppable_job(id, name));
    for offset in OFFSETS_MS {
        let before = session.log().len();
        let running = session
            .spawn_stage(&Stage::UserStep("script".into()))
            .expect("start build_script");
        let pid = running.pid().expect("running");
        wait_until("run's SIGTERM handler", Duration::from_secs(30), || {
            catches(pid, SIGTERM)
        });
        // The offset is what this test varies: a time, not a condition to wait for.
        std::thread::sleep(Duration::from_millis(offset));
        let sent = Instant::now();
        running.signal_group(SIGTERM).expect("SIGTERM");
        let run = ended(running, &session);
        let took = sent.elapsed();
        let log = session.log()[before..]
            .iter()
            .map(|line| line.text.clone())
            .collect::<Vec<_>>()
            .join("\n");

        assert_eq!(run.exit, ExitInfo::Exited(2), "offset {offset} ms: {log}");
        let started = nothing_of_the_script_left(&session);
        let not_started = log.contains("the script was not started");
        // What hyperjob says and what the guest shows agree.
        assert!(!(started && not_started), "offset {offset} ms: {log}");
        let outcome = log
            .lines()
            .find(|line| line.contains("hyperjob run:"))
            .unwrap_or("(no error line)");
        let group = if log.contains("has not reported its process group yet") {
            " (before the shell reported its process group)"
        } else {
            ""
        };
        println!(
            "{name}: SIGTERM {offset} ms after start hit {}{group}; script {}; exited {:.2} s later: {outcome}",
            phase_hit(&log),
            if started { "had started, nothing left" } else { "never started" },
            took.as_secs_f64()
        );
    }
    session.cleanup();
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn sigterm_at_the_very_start_of_run_leaves_no_script_process_in_the_test_guest() {
    let env = TestEnv::load();
    let ws = env.workspace("early-stop");
    stop_at_the_very_start(&env, &ws, "early-stop");
}

#[test]
fn sigterm_at_the_very_start_of_run_leaves_no_script_process_in_the_stock_guest() {
    let env = TestEnv::load();
    let ws = env.workspace("early-stop-stock");
    ws.write_config(&ws.stock_config());
    stop_at_the_very_start(&env, &ws, "early-stop-stock");
}

/// A loopback "SSH server" that accepts connections, reads what the client sends and never
/// answers; tells `heard` once a client has sent something (its SSH banner).
fn mute_server(heard: mpsc::Sender<()>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let heard = heard.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while stream.read(&mut buf).is_ok_and(|n| n > 0) {
                    let _ = heard.send(());
                }
            });
        }
    });
    port
}

#[test]
fn a_stage_that_cannot_stop_still_ends_30_s_after_the_signal_as_a_system_failure() {
    let env = TestEnv::load();
    let ws = env.workspace("stop-deadline");
    let id = unique_job_id();
    let (heard, banner) = mpsc::channel();
    let port = mute_server(heard);
    // A "prepared" job whose guest is that server: `run` blocks in the SSH handshake for up to
    // connect_timeout_secs, and a blocked handshake does not look at the cancel flag.
    ws.write_config(&ws.default_config().replace(
        "ready_timeout_secs = 180",
        "ready_timeout_secs = 180\nconnect_timeout_secs = 600",
    ));
    let job_id = u64::try_from(id).expect("id");
    let created = unix_now();
    let state = JobState::creating(
        job_id,
        vm_name(id),
        ("libvirt", "ssh"),
        (created, created + 3600),
    )
    .ready(Endpoint::new("127.0.0.1", Some(port)));
    StateStore::new(&ws.state_dir).save(&state).expect("state");
    // The runner's files, in a directory that goes with the test.
    let files = tempfile::tempdir_in(&ws.dir).expect("tempdir");
    let response = files.path().join("response.json");
    std::fs::write(
        &response,
        format!("{{\"id\":{id},\"token\":\"glcbt-x\"}}\n"),
    )
    .expect("response");
    let script = files.path().join("script");
    std::fs::write(&script, "#!/usr/bin/env bash\nsleep 300\n").expect("script");
    let hyperjob = |args: &[&str]| {
        let mut command = Command::new(&env.hyperjob);
        command
            .args(args)
            .env("HYPERJOB_CONFIG", &ws.config_path)
            .env("JOB_RESPONSE_FILE", &response)
            .env("BUILD_FAILURE_EXIT_CODE", "1")
            .env("SYSTEM_FAILURE_EXIT_CODE", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // As the runner starts it: leader of a process group of its own.
            .process_group(0);
        command
    };
    let mut run = hyperjob(&["run", script.to_str().expect("utf-8"), "build_script"])
        .spawn()
        .expect("start hyperjob run");
    banner
        .recv_timeout(Duration::from_secs(60))
        .expect("run started the SSH handshake");

    let sent = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", "--", &format!("-{}", run.id())])
        .status()
        .expect("kill");
    assert!(kill.success());
    wait_until("run ends", Duration::from_secs(120), || {
        run.try_wait().expect("try_wait").is_some()
    });
    let took = sent.elapsed();
    let output = run.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr);

    println!("run exited {:.1} s after SIGTERM", took.as_secs_f64());
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    // Ended by hyperjob's own bound, long before the 600 s handshake timeout.
    assert!(
        stderr.contains("the stage did not stop within 30 s of the signal"),
        "{stderr}"
    );
    let cleanup = hyperjob(&["cleanup"]).output().expect("cleanup");
    assert!(cleanup.status.success(), "{cleanup:?}");
    ws.assert_nothing_left(&vm_name(id));
}
