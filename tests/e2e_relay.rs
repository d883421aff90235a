//! End-to-end: the job's relay (one connection to the guest for all of a job's stages; see
//! `hyperjob_core::relay`). Through the real binary, on the dropbear test guest and on the stock
//! OpenSSH guest: stages run through the relay with live, separate stdout and stderr and exact
//! exit codes (also 128+N, and the `sh` probe); SIGTERM and SIGKILL of `run` leave nothing of the
//! script in the guest; a SIGKILLed relay makes the next stage connect directly; cleanup and gc
//! end the relay and leave no process and no socket. Prints hyperjob's own time per stage
//! through the relay and directly. Run with scripts/test.sh (the namespaced test environment).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hyperjob_test_harness::{
    Driver, ExecutorSession, ExitInfo, Invocation, InvocationError, Job, LineKind, LogLine,
    RunnerSettings, RunningInvocation, Stage, Step,
};
use support::{
    configured_session_of, configured_session_with, hyperjob_driver, is_running,
    nothing_of_the_script_left, prepared_session, prepared_session_of, qemu_unix_endpoint_config,
    recorded_relay, relay_socket, session_log, stoppable_job, unique_job_id, virsh, vm_name,
    wait_until, TestEnv, Workspace,
};

const SIGTERM: i32 = 15;
const SIGKILL: i32 = 9;
/// Generous bounds: four TCG guests may share the two cores of a test machine.
const LOG_WAIT: Duration = Duration::from_secs(300);
const STOP_BOUND: Duration = Duration::from_secs(60);
/// Stages timed each way for the printed figures.
const ROUNDS: usize = 25;
/// What `run` says in the job log when it connects directly instead.
const FALLBACK_NOTE: &str = "hyperjob: the job's relay";
/// What `run` logs (debug) when the relay takes its script.
const THROUGH_THE_RELAY: &str = "sending the script to the job's relay";
/// What `run` logs (debug) when it makes a connection of its own.
const OWN_CONNECTION: &str = "SSH handshake with";

/// hyperjob with debug logs in the job log.
fn debug_driver(env: &TestEnv, ws: &Workspace) -> Driver {
    hyperjob_driver(env, ws).with_env("HYPERJOB_LOG", "debug")
}

/// The stoppable job plus the steps these tests run.
fn job(id: i64, project: &str) -> Job {
    let mut job = stoppable_job(id, project);
    job.steps.push(Step::new("trivial", &["true"]));
    // Until the guest has finished booting (systemd and cloud-init, where it has them): the
    // figures are not about a guest still busy with its boot.
    job.steps.push(Step::new(
        "settle",
        &[
            "if command -v systemctl >/dev/null; then systemctl is-system-running --wait || true; fi",
            "if command -v cloud-init >/dev/null; then cloud-init status --wait >/dev/null || true; fi",
        ],
    ));
    job.steps.push(Step::new(
        "streams",
        &["echo to-stdout", "echo to-stderr >&2", "exit 42"],
    ));
    job.steps
        .push(Step::new("usr1", &["echo before-usr1", "kill -USR1 $$"]));
    job.steps.push(Step::new(
        "shell",
        &["echo \"shell=$(basename \"$(readlink /proc/$$/exe)\")\""],
    ));
    job
}

/// The job log lines of stage `stage` from the `from`-th line on.
fn stage_lines(session: &ExecutorSession, from: usize, stage: &str) -> Vec<LogLine> {
    session.log()[from..]
        .iter()
        .filter(|line| line.stage == stage)
        .cloned()
        .collect()
}

fn text(lines: &[LogLine]) -> String {
    lines
        .iter()
        .map(|line| line.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `step`; returns its invocation and its log lines.
fn run_step(session: &ExecutorSession, step: &str) -> (Invocation, Vec<LogLine>) {
    let before = session.log().len();
    let invocation = session
        .run_stage(&Stage::UserStep(step.into()))
        .unwrap_or_else(|err| panic!("step {step}: {err:?}"))
        .unwrap_or_else(|| panic!("step {step} was not invoked"));
    (
        invocation,
        stage_lines(session, before, &format!("step_{step}")),
    )
}

/// Asserts that the stage whose debug log is `lines` ran through the relay.
fn assert_relayed(lines: &[LogLine]) {
    let log = text(lines);
    assert!(log.contains(THROUGH_THE_RELAY), "{log}");
    assert!(!log.contains(OWN_CONNECTION), "{log}");
    assert!(!log.contains(FALLBACK_NOTE), "{log}");
}

/// "median … s, p90 … s (min, max, n)" of `times` (seconds).
fn figures(mut times: Vec<f64>) -> String {
    times.sort_by(f64::total_cmp);
    let n = times.len();
    let at = |fraction: f64| times[((fraction * n as f64).ceil() as usize).max(1) - 1];
    format!(
        "median {:.3} s, p90 {:.3} s (min {:.3} s, max {:.3} s, {n} runs)",
        at(0.5),
        at(0.9),
        times[0],
        times[n - 1]
    )
}

/// Figures of hyperjob's own time per stage, printed (never asserted): the wall time of
/// `hyperjob run`, from its start to its exit, `rounds` times one after the other,
/// - for a script that is only `true`, started directly (the time is hyperjob's, plus the
///   guest's `bash` running `true`);
/// - for the `trivial` step (`true`) as the harness drives it like GitLab Runner: the runner's
///   whole generated script (exports, `mkdir`, `touch`, a subshell: the guest's work), and the
///   harness's pace between stages.
fn stage_figures(
    env: &TestEnv,
    ws: &Workspace,
    session: &ExecutorSession,
    rounds: usize,
) -> String {
    let files = tempfile::tempdir_in(&ws.dir).expect("tempdir");
    let script = files.path().join("true");
    std::fs::write(&script, "#!/usr/bin/env bash\ntrue\n").expect("script");
    let bare: Vec<f64> = (0..rounds)
        .map(|_| {
            let started = Instant::now();
            let output = Command::new(&env.hyperjob)
                .arg("run")
                .arg(&script)
                .arg("build_script")
                .env("HYPERJOB_CONFIG", &ws.config_path)
                .env("JOB_RESPONSE_FILE", session.response_file())
                .env("BUILD_FAILURE_EXIT_CODE", "1")
                .env("SYSTEM_FAILURE_EXIT_CODE", "2")
                .stdin(Stdio::null())
                .output()
                .expect("run hyperjob run");
            let took = started.elapsed().as_secs_f64();
            assert!(output.status.success(), "{output:?}");
            took
        })
        .collect();
    let stages: Vec<f64> = (0..rounds)
        .map(|_| {
            let (invocation, lines) = run_step(session, "trivial");
            assert!(invocation.succeeded(), "{}", text(&lines));
            invocation.duration.as_secs_f64()
        })
        .collect();
    format!(
        "`true` alone: {}; a runner-generated step of `true`: {}",
        figures(bare),
        figures(stages)
    )
}

/// Starts the `script` step and waits until it printed `started` (and, before it, on stderr,
/// `started-on-stderr`): both lines arrive while it still runs, each on its own stream.
fn start_the_script(session: &ExecutorSession) -> RunningInvocation {
    let before = session.log().len();
    let running = session
        .spawn_stage(&Stage::UserStep("script".into()))
        .expect("start build_script");
    wait_until("the line \"started\" in the job log", LOG_WAIT, || {
        session.log()[before..]
            .iter()
            .any(|line| line.text == "started")
    });
    let lines = session.log()[before..].to_vec();
    let kind_of = |text: &str| {
        lines
            .iter()
            .find(|line| line.text == text)
            .map(|line| line.kind)
    };
    assert_eq!(
        kind_of("started"),
        Some(LineKind::Stdout),
        "{}",
        text(&lines)
    );
    assert_eq!(
        kind_of("started-on-stderr"),
        Some(LineKind::Stderr),
        "{}",
        text(&lines)
    );
    running
}

fn stages_through_the_relay(env: &TestEnv, ws: &Workspace, name: &str) {
    let id = unique_job_id();
    let job = job(id, name);
    let session = prepared_session(env, ws, &job);

    // prepare started the relay; it listens on a socket only its user can use, which exists
    // before prepare returns: the first stage (get_sources, right after prepare) used it.
    let relay = recorded_relay(ws, id).expect("prepare recorded a relay");
    assert!(is_running(&relay));
    assert!(!session_log(&session).contains(FALLBACK_NOTE));
    let socket = relay_socket(ws, id);
    assert!(socket.exists());
    let mode = |path: &std::path::Path| {
        std::fs::symlink_metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(&ws.state_dir), 0o700);

    let (settled, lines) = run_step(&session, "settle");
    assert!(settled.succeeded(), "{}", text(&lines));
    let relayed = stage_figures(env, ws, &session, ROUNDS);
    println!("{name}: hyperjob run of `true` through the relay: {relayed}");

    // The same job with debug logs in `run`: what went through the relay, and how it ended.
    let debug = configured_session_of(&debug_driver(env, ws), &job);
    let (streams, lines) = run_step(&debug, "streams");
    assert_relayed(&lines);
    let kind_of = |text: &str| {
        lines
            .iter()
            .find(|line| line.text == text)
            .map(|line| line.kind)
    };
    assert_eq!(kind_of("to-stdout"), Some(LineKind::Stdout));
    assert_eq!(kind_of("to-stderr"), Some(LineKind::Stderr));
    assert!(
        matches!(
            streams.error,
            Some(InvocationError::Build { exit_code: 42, .. })
        ),
        "{:?}",
        streams.error
    );
    let (usr1, lines) = run_step(&debug, "usr1");
    assert_relayed(&lines);
    assert!(
        matches!(
            usr1.error,
            Some(InvocationError::Build { exit_code: 138, .. })
        ),
        "{:?}\n{}",
        usr1.error,
        text(&lines)
    );

    // An `sh` job with the runner's $'…' quoting: the probe of the guest's sh and the script
    // both go through the relay (the guests' sh is dash: the script runs with bash).
    let sh_settings = RunnerSettings {
        shell: Some("sh".to_owned()),
        ..RunnerSettings::default()
    };
    let sh = configured_session_with(&debug_driver(env, ws), &job, &sh_settings);
    let (shell, lines) = run_step(&sh, "shell");
    let log = text(&lines);
    assert!(shell.succeeded(), "{log}");
    assert!(lines.iter().any(|line| line.text == "shell=bash"), "{log}");
    assert_eq!(log.matches(THROUGH_THE_RELAY).count(), 2, "{log}");
    assert_relayed(&lines);

    // SIGTERM to `run`: the relay stops the script's whole process tree in the guest.
    let before = debug.log().len();
    let running = start_the_script(&debug);
    running.signal_group(SIGTERM).expect("SIGTERM");
    let stopped = running
        .wait_timeout(STOP_BOUND)
        .unwrap_or_else(|_| panic!("run still runs after SIGTERM\n{}", session_log(&debug)));
    assert_eq!(stopped.exit, ExitInfo::Exited(2), "{}", session_log(&debug));
    assert_relayed(&stage_lines(&debug, before, "build_script"));
    assert!(nothing_of_the_script_left(&debug));

    // SIGKILL to `run`: the relay sees its client vanish and stops the script all the same.
    let running = start_the_script(&debug);
    running.signal_group(SIGKILL).expect("SIGKILL");
    let killed = running
        .wait_timeout(STOP_BOUND)
        .unwrap_or_else(|_| panic!("run still runs after SIGKILL"));
    assert_eq!(killed.exit, ExitInfo::Signaled(SIGKILL));
    assert!(nothing_of_the_script_left(&debug));
    let (trivial, lines) = run_step(&debug, "trivial");
    assert!(trivial.succeeded(), "{}", text(&lines));
    // Under dropbear, stopping a script ends the relay's connection too (its processes share
    // one process group): the relay connects again, the stage does not notice.
    assert_relayed(&lines);
    assert!(is_running(&relay));
    assert!(!session_log(&debug).contains(FALLBACK_NOTE));

    // A relay that is gone (SIGKILL between stages): the next stage connects directly.
    let kill = Command::new("kill")
        .args(["-KILL", &relay.pid.to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    wait_until("the relay to die", STOP_BOUND, || !is_running(&relay));
    let (direct, lines) = run_step(&debug, "trivial");
    let log = text(&lines);
    assert!(direct.succeeded(), "{log}");
    assert_eq!(log.matches(FALLBACK_NOTE).count(), 1, "{log}");
    assert!(log.contains(OWN_CONNECTION), "{log}");
    let direct_figures = stage_figures(env, ws, &session, ROUNDS);
    println!("{name}: hyperjob run of `true` over a connection of its own: {direct_figures}");

    drop((debug, sh));
    session.cleanup();
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn stages_run_through_the_relay_on_the_test_guest() {
    let env = TestEnv::load();
    let ws = env.workspace("relay");
    stages_through_the_relay(&env, &ws, "relay");
}

/// The same over the QEMU plugin's UNIX socket endpoint (the guest's SSH on a virtio-serial
/// port, one session at a time): the relay's connection, its reconnects after a stopped
/// script, and the stage's own connection once the relay was killed without a goodbye.
#[test]
fn stages_run_through_the_relay_over_a_unix_socket_endpoint() {
    let env = TestEnv::load();
    let ws = env.workspace("relay-unix");
    ws.write_config(&qemu_unix_endpoint_config(&ws, true));
    stages_through_the_relay(&env, &ws, "relay over a unix socket");
}

#[test]
fn stages_run_through_the_relay_on_the_stock_guest() {
    let env = TestEnv::load();
    let ws = env.workspace("relay-stock");
    ws.write_config(&ws.stock_config());
    stages_through_the_relay(&env, &ws, "relay-stock");
}

/// Runs `hyperjob gc` for the workspace; its report.
fn hyperjob_gc(env: &TestEnv, ws: &Workspace) -> String {
    let output = Command::new(&env.hyperjob)
        .arg("--config")
        .arg(&ws.config_path)
        .arg("gc")
        .output()
        .expect("run hyperjob gc");
    assert!(
        output.status.success(),
        "gc failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn cleanup_and_gc_end_the_relay_and_leave_no_socket() {
    let env = TestEnv::load();
    let ws = env.workspace("relay-end");
    let (cleaned, collected) = (unique_job_id(), unique_job_id());
    let driver = hyperjob_driver(&env, &ws);
    let first = prepared_session_of(&driver, &job(cleaned, "relay-end"));
    let second = prepared_session_of(&driver, &job(collected, "relay-end"));
    let relays = [cleaned, collected].map(|id| {
        let relay = recorded_relay(&ws, id).expect("a relay");
        assert!(relay_socket(&ws, id).exists());
        assert!(is_running(&relay));
        relay
    });

    // cleanup ends the relay of its job.
    first.cleanup();
    assert!(!is_running(&relays[0]));
    assert!(!relay_socket(&ws, cleaned).exists());
    assert!(is_running(&relays[1]));

    // The other job's VM vanishes behind hyperjob's back; gc removes the job and its relay
    // (which would only notice the lost connection 45 s later).
    virsh(&env.libvirt_uri, &["destroy", &vm_name(collected)]);
    let report = hyperjob_gc(&env, &ws);

    assert!(
        report.contains(&format!("removed {}", vm_name(collected))),
        "{report}"
    );
    assert!(!is_running(&relays[1]));
    drop(second);
    ws.assert_nothing_left(&vm_name(cleaned));
    ws.assert_nothing_left(&vm_name(collected));
}

#[test]
fn with_the_relay_off_every_stage_logs_in_on_its_own() {
    let env = TestEnv::load();
    let ws = env.workspace("relay-off");
    ws.write_config(&ws.default_config().replace(
        "ready_timeout_secs = 180",
        "ready_timeout_secs = 180\nrelay = false",
    ));
    let id = unique_job_id();
    let session = prepared_session_of(&debug_driver(&env, &ws), &job(id, "relay-off"));

    let (trivial, lines) = run_step(&session, "trivial");

    let log = text(&lines);
    assert!(trivial.succeeded(), "{log}");
    assert!(recorded_relay(&ws, id).is_none());
    assert!(!relay_socket(&ws, id).exists());
    assert!(log.contains(OWN_CONNECTION), "{log}");
    assert!(!log.contains(FALLBACK_NOTE), "{log}");
    session.cleanup();
    ws.assert_nothing_left(&vm_name(id));
}
