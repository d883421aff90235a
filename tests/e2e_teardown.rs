//! End-to-end cleanup in two steps (hyperjob_core::teardown): cleanup returns with the VM
//! halted and a detached `hyperjob finish-cleanup` removes it; a finisher killed before it
//! finished is finished by gc; a retried prepare of the same job and a finisher that waited for
//! it never destroy the new VM. Real binary, real libvirtd, real TCG guests; run with
//! scripts/test.sh.

mod support;

use std::fs::{File, OpenOptions};
use std::process::Command;
use std::time::{Duration, Instant};

use hyperjob_test_harness::Job;
use support::{
    configured_session, domain_exists, hyperjob_ok, job_without_sources, prepared_session,
    recorded_phase, run_sources_and_script, session_log, unique_job_id, vm_name, wait_until,
    TestEnv, Workspace,
};

/// Generous: four TCG guests may share the two cores of a test machine.
const WAIT: Duration = Duration::from_secs(120);

fn job(id: i64) -> Job {
    job_without_sources(id, "group/teardown", &["echo stage-ran"])
}

/// libvirt's state of the domain (`running`, `paused`, …), `None` when it does not exist.
fn domain_state(env: &TestEnv, vm: &str) -> Option<String> {
    let output = Command::new("virsh")
        .args(["-q", "-c", &env.libvirt_uri, "domstate", vm])
        .output()
        .expect("run virsh");
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Pids of the `hyperjob finish-cleanup JOB_ID` processes of this workspace's config.
fn finishers(ws: &Workspace, job_id: i64) -> Vec<u32> {
    let config = ws.config_path.to_string_lossy().into_owned();
    let wanted = ["finish-cleanup".to_string(), job_id.to_string(), config];
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect();
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.rsplit(") ").next().unwrap_or("").starts_with('Z'));
            alive && wanted.iter().all(|w| args.contains(w))
        })
        .collect()
}

/// The job's lock, held exclusively by the test (as gc holds it): a finisher waits for it.
fn hold_job_lock(ws: &Workspace, job_id: i64) -> File {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(ws.state_dir.join(format!("job-{job_id}.lock")))
        .expect("lock file");
    lock.lock().expect("exclusive lock");
    lock
}

fn gc(env: &TestEnv, ws: &Workspace) -> String {
    hyperjob_ok(env, ws, &["gc"])
}

#[test]
fn cleanup_returns_with_the_vm_halted_and_the_background_teardown_removes_everything() {
    let env = TestEnv::load();
    let ws = env.workspace("teardown-halt");
    let id = unique_job_id();
    let vm = vm_name(id);
    let session = prepared_session(&env, &ws, &job(id));

    let cleanup = session.cleanup().expect("cleanup invoked");
    let returned = Instant::now();
    let state_on_return = domain_state(&env, &vm);

    assert!(cleanup.succeeded(), "{}", session_log(&session));
    // Nothing of the job runs once cleanup has returned: the VM is paused, or the background
    // teardown is already killing it ("in shutdown": QEMU reports the SIGTERM of libvirt's
    // destroy as a shutdown until its process is gone), or it is gone.
    assert!(
        matches!(
            state_on_return.as_deref(),
            None | Some("paused" | "in shutdown" | "shut off")
        ),
        "{state_on_return:?}"
    );
    ws.assert_nothing_left(&vm);
    println!(
        "cleanup returned after {:.2} s; the background teardown finished {:.2} s later",
        cleanup.duration.as_secs_f64(),
        returned.elapsed().as_secs_f64()
    );
}

#[test]
fn a_background_teardown_killed_before_it_finished_is_finished_by_gc() {
    let env = TestEnv::load();
    let ws = env.workspace("teardown-killed");
    let id = unique_job_id();
    let vm = vm_name(id);
    let session = prepared_session(&env, &ws, &job(id));
    let lock = hold_job_lock(&ws, id);

    let cleanup = session.cleanup().expect("cleanup invoked");
    assert!(cleanup.succeeded(), "{}", session_log(&session));
    wait_until("the finisher waiting for the job's lock", WAIT, || {
        !finishers(&ws, id).is_empty()
    });
    for pid in finishers(&ws, id) {
        // SIGKILL: the finisher dies without a chance to do anything.
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    wait_until("the killed finisher to be gone", WAIT, || {
        finishers(&ws, id).is_empty()
    });
    drop(lock);
    let left = (recorded_phase(&ws, id), domain_state(&env, &vm));
    let report = gc(&env, &ws);

    assert_eq!(
        left,
        (Some("destroying".to_string()), Some("paused".to_string())),
        "the killed finisher left the halted VM and its record"
    );
    assert!(
        report.contains(&format!(
            "removed {vm}: its cleanup began and its background teardown is gone"
        )),
        "{report}"
    );
    ws.assert_nothing_left(&vm);
}

#[test]
fn a_retried_prepare_and_the_earlier_attempts_teardown_never_destroy_the_new_vm() {
    let env = TestEnv::load();
    let ws = env.workspace("teardown-retry");
    let id = unique_job_id();
    let vm = vm_name(id);
    let first = prepared_session(&env, &ws, &job(id));
    let lock = hold_job_lock(&ws, id);
    first.cleanup().expect("cleanup invoked");
    wait_until("the finisher waiting for the job's lock", WAIT, || {
        !finishers(&ws, id).is_empty()
    });
    // The runner's next attempt of the same job: its prepare waits for the lock as well.
    let retry = configured_session(&env, &ws, &job(id));
    let prepare = retry.spawn_prepare().expect("start prepare");

    // Whichever gets the lock first: the finisher removes the first VM before the prepare
    // starts, or the prepare removes it itself and the finisher then leaves the new one alone.
    drop(lock);
    let prepared = prepare.wait();
    wait_until("the finisher to be done", WAIT, || {
        finishers(&ws, id).is_empty()
    });

    assert!(prepared.succeeded(), "{}", session_log(&retry));
    assert_eq!(recorded_phase(&ws, id).as_deref(), Some("ready"));
    assert_eq!(domain_state(&env, &vm).as_deref(), Some("running"));
    assert!(domain_exists(&env.libvirt_uri, &vm));
    run_sources_and_script(&retry);
    assert!(session_log(&retry).contains("stage-ran"));
    retry.cleanup().expect("cleanup invoked");
    ws.assert_nothing_left(&vm);
}
