//! End-to-end reliability: signals and SIGKILL at awkward moments, leftovers, garbage
//! collection, cleanup racing a dying run, and concurrent jobs. Real binary, real libvirtd,
//! real TCG guests; run with scripts/test.sh.

mod support;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use hyperjob_test_harness::{
    run_job, Driver, ExecutorSession, ExitInfo, Invocation, Job, JobResult, RunnerSettings,
    RunningInvocation, Stage, Step,
};
use support::{
    configured_session, domain_exists, hyperjob_driver, job_without_sources, prepared_session,
    recorded_phase, session_log, state_file, unique_job_id, virsh, vm_name, wait_for_log,
    wait_for_prepare_point, PreparePoint, TestEnv, Workspace,
};

const SIGTERM: i32 = 15;
const SIGKILL: i32 = 9;

fn driver(env: &TestEnv, ws: &Workspace) -> Driver {
    hyperjob_driver(env, ws)
}

fn job(id: i64, script: &[&str]) -> Job {
    job_without_sources(id, "group/reliability", script)
}

fn log_text(session: &ExecutorSession) -> String {
    session_log(session)
}

/// Generous bounds: four TCG guests may share the two cores of a test machine.
const LOG_WAIT: Duration = Duration::from_secs(300);

/// Sends `signal` to the driver's process group now; returns the finished invocation and how
/// long it took to exit after the signal.
fn signal_now(running: RunningInvocation, signal: i32) -> (Invocation, Duration) {
    let sent = Instant::now();
    let _ = running.signal_group(signal);
    let invocation = running.wait();
    (invocation, sent.elapsed())
}

#[test]
fn sigterm_during_run_stops_the_remote_process_tree_promptly() {
    let env = TestEnv::load();
    let ws = env.workspace("sigterm-run");
    let id = unique_job_id();
    let mut job = job(
        id,
        &[
            "sleep 300 & echo $! > /tmp/background.pid",
            "echo started",
            "sleep 300",
        ],
    );
    // The guest-side helper sends SIGKILL one second after SIGTERM: the check waits (up to
    // 30 s) for the job's processes to be gone rather than for a fixed time.
    job.steps.push(Step::new(
        "check",
        &[
            "for i in $(seq 300); do kill -0 \"$(cat /tmp/background.pid)\" 2>/dev/null || pgrep -x sleep >/dev/null || break; sleep 0.1; done",
            "if kill -0 \"$(cat /tmp/background.pid)\" 2>/dev/null; then echo background-survived; exit 3; fi",
            "if pgrep -x sleep; then echo sleep-survived; exit 4; fi",
            "echo no-job-process-left",
        ],
    ));
    let session = prepared_session(&env, &ws, &job);
    let running = session
        .spawn_stage(&Stage::UserStep("script".into()))
        .expect("start build_script");
    wait_for_log(&session, "started", LOG_WAIT);

    let (invocation, took) = signal_now(running, SIGTERM);
    let check = session
        .run_stage(&Stage::UserStep("check".into()))
        .expect("run step_check");

    println!(
        "cancellation: hyperjob run exited {:.2} s after SIGTERM",
        took.as_secs_f64()
    );
    let log = log_text(&session);
    // hyperjob handled the signal and exited as a system failure (it was not killed).
    assert_eq!(invocation.exit, ExitInfo::Exited(2), "{log}");
    assert!(
        took < Duration::from_secs(30),
        "run ignored SIGTERM for {took:?}"
    );
    assert!(check.is_some_and(|c| c.error.is_none()), "{log}");
    assert!(log.contains("no-job-process-left"), "{log}");
    session.cleanup();
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn sigterm_during_prepare_removes_everything_it_created() {
    let env = TestEnv::load();
    let ws = env.workspace("sigterm-prepare");
    let id = unique_job_id();
    let job = job(id, &["true"]);
    let session = configured_session(&env, &ws, &job);
    let running = session.spawn_prepare().expect("start prepare");
    // The domain exists once prepare waits for its address: there is something to remove.
    wait_for_log(&session, "Waiting for the guest address", LOG_WAIT);
    assert!(domain_exists(&env.libvirt_uri, &vm_name(id)));

    let (invocation, took) = signal_now(running, SIGTERM);

    println!("prepare exited {:.2} s after SIGTERM", took.as_secs_f64());
    let log = log_text(&session);
    assert!(!log.contains("Guest ready"), "SIGTERM came too late: {log}");
    assert_eq!(invocation.exit, ExitInfo::Exited(2), "{log}");
    assert!(
        took < Duration::from_secs(60),
        "prepare ignored SIGTERM for {took:?}"
    );
    // prepare itself removed the VM: nothing is left even before cleanup runs.
    ws.assert_nothing_left(&vm_name(id));
    session.cleanup();
}

fn sigkill_prepare_then_cleanup(name: &str, point: PreparePoint) {
    let env = TestEnv::load();
    let ws = env.workspace(name);
    let id = unique_job_id();
    let job = job(id, &["true"]);
    let session = configured_session(&env, &ws, &job);
    let running = session.spawn_prepare().expect("start prepare");
    wait_for_prepare_point(&session, &ws, id, point, LOG_WAIT);

    let (invocation, _) = signal_now(running, SIGKILL);
    let log = log_text(&session);
    // The kill really hit the phase it is named after.
    assert_eq!(
        recorded_phase(&ws, id).as_deref(),
        Some("creating"),
        "{log}"
    );
    match point {
        PreparePoint::Creating => assert!(
            !log.contains("Waiting for the guest address"),
            "the VM was already created when the kill arrived: {log}"
        ),
        PreparePoint::Booting => {
            assert!(
                !log.contains("Guest address"),
                "the guest had booted: {log}"
            );
            assert!(domain_exists(&env.libvirt_uri, &vm_name(id)), "{log}");
        }
    }
    let cleanup = session.cleanup().expect("cleanup_exec ran");

    assert_eq!(invocation.exit, ExitInfo::Signaled(SIGKILL));
    assert!(
        cleanup.error.is_none(),
        "cleanup failed: {:?}",
        cleanup.error
    );
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn sigkill_of_prepare_while_creating_the_vm_then_cleanup_leaves_nothing() {
    sigkill_prepare_then_cleanup("sigkill-prepare-create", PreparePoint::Creating);
}

#[test]
fn sigkill_of_prepare_while_the_guest_boots_then_cleanup_leaves_nothing() {
    sigkill_prepare_then_cleanup("sigkill-prepare-boot", PreparePoint::Booting);
}

/// Runs `hyperjob run` by hand for `session`'s job with `script`, as the runner would.
fn run_by_hand(
    env: &TestEnv,
    ws: &Workspace,
    session: &ExecutorSession,
    script: &str,
) -> std::process::Output {
    let dir = tempfile::tempdir_in(&ws.dir).expect("tempdir");
    let path = dir.path().join("script");
    std::fs::write(&path, script).expect("script");
    Command::new(&env.hyperjob)
        .args(["run", path.to_str().expect("utf-8"), "build_script"])
        .env("HYPERJOB_CONFIG", &ws.config_path)
        .env("JOB_RESPONSE_FILE", session.response_file())
        .env("BUILD_FAILURE_EXIT_CODE", "1")
        .env("SYSTEM_FAILURE_EXIT_CODE", "2")
        .env("BUILD_EXIT_CODE_FILE", dir.path().join("exit_code"))
        .output()
        .expect("run hyperjob run")
}

#[test]
fn sigkill_of_run_then_cleanup_leaves_nothing() {
    let env = TestEnv::load();
    let ws = env.workspace("sigkill-run");
    let id = unique_job_id();
    let job = job(id, &["echo started", "sleep 300"]);
    let session = prepared_session(&env, &ws, &job);

    // While the VM is up: it is transient (nothing survives a destroy or a host reboot) and
    // carries hyperjob's ownership record with the job's id and deadline.
    let info = virsh(&env.libvirt_uri, &["dominfo", &vm_name(id)]);
    assert!(
        info.lines()
            .any(|l| l.starts_with("Persistent:") && l.trim_end().ends_with("no")),
        "{info}"
    );
    let metadata = virsh(
        &env.libvirt_uri,
        &["metadata", &vm_name(id), "http://hyperjob.dev/xmlns/job/1"],
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state_file(&ws, id)).expect("state"))
            .expect("state JSON");
    for (element, value) in [
        ("owner", ws.state_dir.display().to_string()),
        ("id", id.to_string()),
        ("created", state["created_unix"].to_string()),
        ("deadline", state["deadline_unix"].to_string()),
    ] {
        assert!(
            metadata.contains(&format!(">{value}</")) && metadata.contains(element),
            "{element} {value} not in {metadata}"
        );
    }
    // The job's timeout (the harness's default 3600 s) plus the default margin of one hour.
    assert_eq!(
        state["deadline_unix"].as_u64().expect("deadline")
            - state["created_unix"].as_u64().expect("created"),
        3600 + 3600,
        "{state}"
    );
    // The overlay holds the job's code and data: private while the guest runs on it.
    let overlay = ws.images_dir.join(format!("{}.qcow2", vm_name(id)));
    let overlay_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&overlay).expect("overlay").permissions(),
    );
    assert_eq!(overlay_mode & 0o777, 0o600, "{}", overlay.display());
    // stdout and stderr of the script stay apart on their way out of hyperjob.
    let streams = run_by_hand(
        &env,
        &ws,
        &session,
        "#!/usr/bin/env bash\necho to-stdout\necho to-stderr >&2\n",
    );
    assert!(streams.status.success(), "{streams:?}");
    assert_eq!(String::from_utf8_lossy(&streams.stdout), "to-stdout\n");
    assert_eq!(String::from_utf8_lossy(&streams.stderr), "to-stderr\n");

    let running = session
        .spawn_stage(&Stage::UserStep("script".into()))
        .expect("start build_script");
    wait_for_log(&session, "started", LOG_WAIT);

    let (invocation, _) = signal_now(running, SIGKILL);
    let log = log_text(&session);
    let cleanup = session.cleanup().expect("cleanup_exec ran");

    assert_eq!(invocation.exit, ExitInfo::Signaled(SIGKILL), "{log}");
    assert!(
        cleanup.error.is_none(),
        "cleanup failed: {:?}",
        cleanup.error
    );
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn a_guest_that_hangs_under_a_running_script_is_a_system_failure_not_a_wait_for_the_job_timeout() {
    let env = TestEnv::load();
    let ws = env.workspace("hung-guest");
    let id = unique_job_id();
    let job = job(id, &["echo started", "sleep 3000"]);
    let session = prepared_session(&env, &ws, &job);
    let running = session
        .spawn_stage(&Stage::UserStep("script".into()))
        .expect("start build_script");
    wait_for_log(&session, "started", LOG_WAIT);

    // The guest stops dead: no FIN, no RST, no answer to anything.
    virsh(&env.libvirt_uri, &["suspend", &vm_name(id)]);
    let hung = Instant::now();
    let run = running
        .wait_timeout(Duration::from_secs(300))
        .unwrap_or_else(|_| panic!("run still waits 300 s after the guest hung"));
    println!(
        "run gave up {:.1} s after the guest hung (keepalive 15 s, dead after 45 s unacknowledged)",
        hung.elapsed().as_secs_f64()
    );

    let log = log_text(&session);
    assert_eq!(run.exit, ExitInfo::Exited(2), "{log}");
    let cleanup = session.cleanup().expect("cleanup_exec ran");
    assert!(
        cleanup.error.is_none(),
        "cleanup failed: {:?}",
        cleanup.error
    );
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn cleanup_while_a_run_is_still_running_removes_everything_and_the_run_fails() {
    let env = TestEnv::load();
    let ws = env.workspace("cleanup-races-run");
    let id = unique_job_id();
    let job = job(id, &["echo started", "sleep 300"]);
    let session = prepared_session(&env, &ws, &job);
    let running = session
        .spawn_stage(&Stage::UserStep("script".into()))
        .expect("start build_script");
    wait_for_log(&session, "started", LOG_WAIT);

    let cleanup = session.cleanup().expect("cleanup_exec ran");
    let run = running
        .wait_timeout(Duration::from_secs(300))
        .unwrap_or_else(|_| panic!("run did not end after its VM was destroyed"));

    assert!(
        cleanup.error.is_none(),
        "cleanup failed: {:?}",
        cleanup.error
    );
    assert_eq!(
        run.exit,
        ExitInfo::Exited(2),
        "the run must fail as a system failure"
    );
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn prepare_after_a_killed_attempt_starts_clean_and_the_job_runs() {
    let env = TestEnv::load();
    let ws = env.workspace("retry-after-kill");
    let id = unique_job_id();
    let job = job(id, &["echo second attempt works"]);
    let first = configured_session(&env, &ws, &job);
    let running = first.spawn_prepare().expect("start prepare");
    wait_for_log(&first, "Waiting for the guest address", LOG_WAIT);
    let _ = signal_now(running, SIGKILL);
    assert!(domain_exists(&env.libvirt_uri, &vm_name(id)));

    // No cleanup in between: the next prepare must cope with the leftovers itself.
    let second = prepared_session(&env, &ws, &job);
    let run = second
        .run_stage(&Stage::UserStep("script".into()))
        .expect("build_script")
        .expect("invoked");

    let log = log_text(&second);
    assert!(run.error.is_none(), "{log}");
    assert!(log.contains("second attempt works"), "{log}");
    second.cleanup();
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn three_jobs_in_parallel_each_run_in_their_own_vm() {
    let env = TestEnv::load();
    let ws = env.workspace("parallel");
    let ids: Vec<i64> = (0..3).map(|_| unique_job_id()).collect();

    let reports: Vec<_> = thread::scope(|scope| {
        let handles: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(slot, &id)| {
                let driver = driver(&env, &ws);
                scope.spawn(move || {
                    let job = job(
                        id,
                        &["echo \"job $CI_JOB_ID slot $CI_CONCURRENT_ID ran in $(cat /proc/sys/kernel/random/boot_id)\""],
                    );
                    // As the runner does: every job running at once has its own concurrent id.
                    let mut settings = RunnerSettings::default();
                    settings.identity.concurrent_id = u32::try_from(slot).expect("slot");
                    run_job(&driver, &job, &settings)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("job thread"))
            .collect()
    });

    let mut boot_ids = Vec::new();
    for (slot, (id, report)) in ids.iter().zip(&reports).enumerate() {
        let log = report.log_text();
        assert_eq!(report.result, JobResult::Success, "{log}");
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("job {id} slot {slot} ran in ")))
            .unwrap_or_else(|| panic!("job {id} output missing: {log}"));
        boot_ids.push(line.rsplit(' ').next().expect("boot id").to_string());
        for other in ids.iter().filter(|other| *other != id) {
            assert!(
                !log.contains(&format!("job {other} ")),
                "cross-talk into {id}: {log}"
            );
        }
        ws.assert_nothing_left(&vm_name(*id));
    }
    boot_ids.sort();
    boot_ids.dedup();
    assert_eq!(boot_ids.len(), 3, "jobs shared a VM");
}
