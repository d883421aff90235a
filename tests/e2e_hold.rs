//! End-to-end debug hold on failure (`[debug_hold]`, issue 11 §5): a job whose script fails and
//! that asks with `HYPERJOB_HOLD_ON_FAILURE` keeps its VM after cleanup; the job log names the
//! end of the hold and the command that reaches the VM, which works (host key pinned, the
//! transport's own key); `hyperjob hold list` shows it, gc keeps it even though its runner is
//! gone, `hyperjob hold release` destroys it, and gc reaps it once the hold has expired (also
//! when `max_secs` was lowered since). Without the table, for a project not allowed, or with a
//! bad value, nothing is held and the job's result is the script's. Real binary, real
//! libvirtd, real TCG guests, the real OpenSSH client; run with scripts/test.sh.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use hyperjob_test_harness::{ExecutorSession, InvocationError, Job, JobVariable, Stage};
use support::{
    hyperjob_ok, is_running, job_without_sources, perl_runner, prepared_session,
    prepared_session_of, recorded_phase, recorded_relay, recorded_state, session_log,
    unique_job_id, unix_now, virsh, vm_name, wait_until, wrapped_driver, TestEnv, Workspace,
};

const HOLD_VARIABLE: &str = "HYPERJOB_HOLD_ON_FAILURE";
/// Bound on how long the administrator's `ssh … true` may take (a TCG guest on a busy host).
const SSH_BOUND_SECS: &str = "120";

/// A job whose script fails with exit code 3, asking for `hold` if given.
fn failing_job(id: i64, hold: Option<&str>) -> Job {
    let mut job = job_without_sources(id, "group/hold", &["echo failing-on-purpose", "exit 3"]);
    if let Some(value) = hold {
        job.variables.push(JobVariable::new(HOLD_VARIABLE, value));
    }
    job
}

/// The workspace's default config with a `[debug_hold]` table of `keys`.
fn config_with_hold(ws: &Workspace, keys: &str) -> String {
    format!("{}\n[debug_hold]\n{keys}\n", ws.default_config())
}

/// Runs the job's failing script step, which must end as a build failure with the script's
/// code whatever the hold; returns the job-log lines hyperjob wrote (`hyperjob: ` stripped).
fn run_failing_script(session: &ExecutorSession) -> Vec<String> {
    let before = session.log().len();
    let script = session
        .run_stage(&Stage::UserStep("script".into()))
        .expect("run step_script")
        .expect("invoked");
    assert!(
        matches!(
            script.error,
            Some(InvocationError::Build { exit_code: 3, .. })
        ),
        "{:?}\n{}",
        script.error,
        session_log(session)
    );
    session.log()[before..]
        .iter()
        .filter_map(|line| line.text.strip_prefix("hyperjob: "))
        .map(str::to_string)
        .collect()
}

/// The one line of `said` that contains `needle`.
fn line_with<'a>(said: &'a [String], needle: &str) -> &'a str {
    said.iter()
        .find(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no job-log line with {needle:?}: {said:#?}"))
}

/// Runs cleanup, which must succeed.
fn cleanup_ok(session: &ExecutorSession) {
    let cleanup = session.cleanup().expect("cleanup ran");
    assert!(cleanup.succeeded(), "{:?}", cleanup.error);
}

/// The state of libvirt's domain `vm`.
fn domain_state(env: &TestEnv, vm: &str) -> String {
    virsh(&env.libvirt_uri, &["domstate", vm])
        .trim()
        .to_string()
}

/// `since_unix` and `until_unix` of job `id`'s recorded hold.
fn recorded_hold(ws: &Workspace, id: i64) -> (u64, u64) {
    let state = recorded_state(ws, id).expect("the job's state");
    let hold = &state["hold"];
    (
        hold["since_unix"].as_u64().expect("since"),
        hold["until_unix"].as_u64().expect("until"),
    )
}

/// Fails job `id`'s script (which asked for 30 minutes) and runs its cleanup: the job log names
/// the hold and the command, cleanup keeps the VM running, and the command reaches it (run for
/// real: `true` over it succeeds). Returns the command.
fn held_and_reachable(env: &TestEnv, ws: &Workspace, session: &ExecutorSession, id: i64) -> String {
    let vm = vm_name(id);
    let said = run_failing_script(session);

    let held = line_with(&said, "is held for debugging until");
    assert!(
        held.starts_with(&format!(
            "the script failed: VM {vm} is held for debugging until "
        )) && held.ends_with(" UTC (1800 s)."),
        "{held}"
    );
    let command = said
        .iter()
        .find_map(|line| line.strip_prefix("  "))
        .expect("the command line")
        .to_string();
    println!("job log: {said:#?}");
    assert!(
        command.starts_with("ssh -o UserKnownHostsFile=")
            && command.contains("-o StrictHostKeyChecking=yes"),
        "{command}"
    );
    line_with(
        &said,
        &format!("and ends the hold earlier with: hyperjob hold release {id}"),
    );
    let (since, until) = recorded_hold(ws, id);
    assert_eq!(until - since, 1800);

    cleanup_ok(session);

    assert_eq!(recorded_phase(ws, id).as_deref(), Some("held"));
    assert_eq!(domain_state(env, &vm), "running");
    // The administrator's command, for real: the pinned host key, the transport's own key.
    let ssh = Command::new("timeout")
        .args([SSH_BOUND_SECS, "sh", "-c", &format!("{command} true")])
        .stdin(Stdio::null())
        .output()
        .expect("run ssh");
    assert!(
        ssh.status.success(),
        "{command} true: {:?}\n{}",
        ssh.status,
        String::from_utf8_lossy(&ssh.stderr)
    );
    command
}

#[test]
fn a_failed_jobs_vm_is_held_reachable_with_the_printed_command_listed_and_released() {
    let env = TestEnv::load();
    let ws = env.workspace("hold");
    ws.write_config(&config_with_hold(&ws, "max_secs = 3600"));
    let id = unique_job_id();
    let vm = vm_name(id);
    // Every stage through a runner process that ends with the stage: to gc the job's runner
    // is gone, which must not matter for a held VM.
    let runner = perl_runner(&env, &ws);
    let session = prepared_session_of(&wrapped_driver(&ws, &runner), &failing_job(id, Some("30m")));
    let relay = recorded_relay(&ws, id).expect("the job's relay");

    let command = held_and_reachable(&env, &ws, &session, id);

    assert!(
        command.contains(&format!("-i {} ", env.identity_file.display())),
        "{command}"
    );
    assert!(!is_running(&relay), "the relay still runs after cleanup");
    let list = hyperjob_ok(&env, &ws, &["hold", "list"]);
    println!("hyperjob hold list:\n{list}");
    let row = list
        .lines()
        .find(|line| line.starts_with(&id.to_string()))
        .unwrap_or_else(|| panic!("job {id} not listed:\n{list}"));
    assert!(
        row.contains(&vm) && row.contains(" held ") && row.ends_with(&command),
        "{row}"
    );
    let gc = hyperjob_ok(&env, &ws, &["gc"]);
    assert!(!gc.contains(&vm), "gc took the held VM: {gc}");
    assert_eq!(domain_state(&env, &vm), "running");

    let released = hyperjob_ok(&env, &ws, &["hold", "release", &id.to_string()]);

    assert!(
        released.contains(&format!("released job {id}: removed VM {vm}")),
        "{released}"
    );
    drop(session);
    std::fs::remove_file(runner).expect("remove the runner wrapper");
    ws.assert_nothing_left(&vm);
}

#[test]
fn with_per_job_keys_the_jobs_own_keys_reach_the_held_vm_until_it_is_released() {
    let env = TestEnv::load();
    let ws = env.workspace("hold-per-job-keys");
    ws.write_config(&format!(
        "{}\n[debug_hold]\nmax_secs = 3600\n",
        ws.per_job_keys_config()
    ));
    let id = unique_job_id();
    let session = prepared_session(&env, &ws, &failing_job(id, Some("30m")));

    let command = held_and_reachable(&env, &ws, &session, id);

    let keys = ws.state_dir.join(format!("job-{id}.keys"));
    assert!(
        command.contains(&format!("-i {}/id_ed25519 ", keys.display())),
        "{command}"
    );
    hyperjob_ok(&env, &ws, &["hold", "release", &id.to_string()]);
    drop(session);
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn gc_reaps_held_vms_once_their_hold_expired_also_after_max_secs_was_lowered() {
    let env = TestEnv::load();
    let ws = env.workspace("hold-expiry");
    ws.write_config(&config_with_hold(&ws, "max_secs = 3600"));
    let (long, short) = (unique_job_id(), unique_job_id());
    let long_session = prepared_session(&env, &ws, &failing_job(long, Some("1h")));
    let short_session = prepared_session(&env, &ws, &failing_job(short, Some("1h")));

    // Granted an hour under max_secs = 3600.
    run_failing_script(&long_session);
    cleanup_ok(&long_session);
    let (since, until) = recorded_hold(&ws, long);
    assert_eq!(until - since, 3600);
    assert_eq!(recorded_phase(&ws, long).as_deref(), Some("held"));
    // The operator lowers max_secs: the next request is capped, and the hold granted before
    // ends no later than the new max_secs after it began.
    ws.write_config(&config_with_hold(&ws, "max_secs = 20"));
    let said = run_failing_script(&short_session);
    let held = line_with(&said, "is held for debugging until");
    assert!(
        held.ends_with("UTC (20 s, capped at [debug_hold] max_secs = 20)."),
        "{held}"
    );
    cleanup_ok(&short_session);
    assert_eq!(recorded_phase(&ws, short).as_deref(), Some("held"));
    let (_, short_until) = recorded_hold(&ws, short);
    let ends = short_until.max(since + 20);
    wait_until("the holds to expire", Duration::from_secs(60), || {
        unix_now() > ends
    });

    let gc = hyperjob_ok(&env, &ws, &["gc"]);

    println!("gc after the holds expired:\n{gc}");
    for id in [long, short] {
        assert!(
            gc.contains(&format!(
                "removed {}: its debug hold has expired",
                vm_name(id)
            )),
            "{gc}"
        );
    }
    drop((long_session, short_session));
    ws.assert_nothing_left(&vm_name(long));
    ws.assert_nothing_left(&vm_name(short));
}

#[test]
fn no_hold_without_the_table_for_a_project_not_allowed_or_with_a_bad_value() {
    let env = TestEnv::load();
    let ws = env.workspace("hold-refused");
    let allowed_elsewhere = config_with_hold(&ws, "max_secs = 600\nprojects = [99]");
    let mut of_project_99 = failing_job(unique_job_id(), Some("soon"));
    of_project_99.project_id = 99;
    let cases = [
        (
            ws.default_config(),
            failing_job(unique_job_id(), Some("30m")),
            "HYPERJOB_HOLD_ON_FAILURE is set, but this runner does not hold VMs (no \
             [debug_hold] in hyperjob's config); the VM is removed as usual",
        ),
        (
            allowed_elsewhere.clone(),
            failing_job(unique_job_id(), Some("30m")),
            "HYPERJOB_HOLD_ON_FAILURE is set, but project 12 may not hold VMs on this runner \
             ([debug_hold] projects); the VM is removed as usual",
        ),
        (
            allowed_elsewhere,
            of_project_99,
            "HYPERJOB_HOLD_ON_FAILURE=\"soon\" is not a duration such as 1800, 30m or 1h; no \
             hold, the VM is removed as usual",
        ),
    ];
    for (config, job, why) in cases {
        ws.write_config(&config);
        let session = prepared_session(&env, &ws, &job);

        let said = run_failing_script(&session);

        assert_eq!(said, [why.to_string()]);
        cleanup_ok(&session);
        drop(session);
        ws.assert_nothing_left(&vm_name(job.id));
    }
}
