//! Jobs through the real binary, step by step: the pieces several end-to-end test files use
//! to drive hyperjob the way GitLab Runner does, and to look at what a job left on disk.

use std::path::PathBuf;

use hyperjob_core::runner::ProcessIdentity;
use hyperjob_core::state::StateStore;
use hyperjob_test_harness::{
    Driver, ExecutorSession, Job, JobVariable, RunnerSettings, Stage, Step,
};

use super::{session_log, TestEnv, Workspace};

/// The name hyperjob gives job `job_id`'s VM.
pub fn vm_name(job_id: i64) -> String {
    format!("hyperjob-job-{job_id}")
}

/// An executable file `name` in the workspace with `text`.
pub fn executable(ws: &Workspace, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = ws.dir.join(name);
    std::fs::write(&path, text).expect("write wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// The driver as the runner would start it through `wrapper`.
pub fn wrapped_driver(ws: &Workspace, wrapper: &std::path::Path) -> Driver {
    Driver::single_binary(wrapper)
        .with_env("HYPERJOB_CONFIG", ws.config_path.to_str().expect("utf-8"))
}

/// `runner.pl` in the workspace: a perl wrapper (not a shell, so hyperjob records it as the
/// job's runner) that runs hyperjob and ends with it, as a runner that crashed after the stage.
pub fn perl_runner(env: &TestEnv, ws: &Workspace) -> PathBuf {
    executable(
        ws,
        "runner.pl",
        &format!(
            "#!/usr/bin/perl\nexit(system('{}', @ARGV) >> 8);\n",
            env.hyperjob.display()
        ),
    )
}

/// hyperjob as the runner's `*_exec`, with the workspace's config.
pub fn hyperjob_driver(env: &TestEnv, ws: &Workspace) -> Driver {
    Driver::single_binary(&env.hyperjob)
        .with_env("HYPERJOB_CONFIG", ws.config_path.to_str().expect("utf-8"))
}

/// A job of `project` that needs no git server: sources are skipped.
pub fn job_without_sources(id: i64, project: &str, script: &[&str]) -> Job {
    let mut job = Job::new(id, project, "", "", script);
    job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));
    job
}

/// An executor session that has run config and is ready for prepare.
pub fn configured_session(env: &TestEnv, ws: &Workspace, job: &Job) -> ExecutorSession {
    configured_session_of(&hyperjob_driver(env, ws), job)
}

/// [`configured_session`] with `driver` (e.g. one with extra environment, or a wrapper).
pub fn configured_session_of(driver: &Driver, job: &Job) -> ExecutorSession {
    configured_session_with(driver, job, &RunnerSettings::default())
}

/// [`configured_session_of`] with the runner's `settings` (e.g. `shell = "sh"`).
pub fn configured_session_with(
    driver: &Driver,
    job: &Job,
    settings: &RunnerSettings,
) -> ExecutorSession {
    let session = ExecutorSession::new(driver, job, settings).expect("executor session");
    session.run_config().expect("config_exec");
    session.start_build().expect("builds dir");
    session
}

/// A session whose VM is up and whose project dir exists (get_sources ran).
pub fn prepared_session(env: &TestEnv, ws: &Workspace, job: &Job) -> ExecutorSession {
    prepared_session_of(&hyperjob_driver(env, ws), job)
}

/// [`prepared_session`] with `driver`.
pub fn prepared_session_of(driver: &Driver, job: &Job) -> ExecutorSession {
    let session = configured_session_of(driver, job);
    session.prepare().expect("prepare_exec");
    let sources = session
        .run_stage(&Stage::GetSources)
        .expect("get_sources")
        .expect("invoked");
    assert!(sources.succeeded(), "{}", session_log(&session));
    session
}

/// Where hyperjob keeps job `job_id`'s state.
pub fn state_file(ws: &Workspace, job_id: i64) -> PathBuf {
    ws.state_dir.join(format!("job-{job_id}.json"))
}

/// Job `job_id`'s state record, if there is a readable one.
pub fn recorded_state(ws: &Workspace, job_id: i64) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(state_file(ws, job_id)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Where a running prepare is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreparePoint {
    /// The state record exists (phase `creating`); the VM is still being created.
    Creating,
    /// The domain exists and prepare waits for the guest.
    Booting,
}

/// Waits until the prepare running for `session` (job `job_id`) has reached `point`.
pub fn wait_for_prepare_point(
    session: &ExecutorSession,
    ws: &Workspace,
    job_id: i64,
    point: PreparePoint,
    timeout: std::time::Duration,
) {
    match point {
        PreparePoint::Creating => {
            super::wait_until("the state record", timeout, || {
                recorded_state(ws, job_id).is_some()
            });
        }
        PreparePoint::Booting => {
            super::wait_for_log(session, "Waiting for the guest address", timeout);
        }
    }
}

/// The `phase` prepare recorded in job `job_id`'s state file, if there is a readable one.
pub fn recorded_phase(ws: &Workspace, job_id: i64) -> Option<String> {
    recorded_state(ws, job_id)?["phase"]
        .as_str()
        .map(str::to_string)
}

/// Runs the job's get_sources and `script` stages; both must succeed.
pub fn run_sources_and_script(session: &ExecutorSession) {
    for stage in [Stage::GetSources, Stage::UserStep("script".into())] {
        let invocation = session.run_stage(&stage).expect("stage").expect("invoked");
        assert!(invocation.succeeded(), "{}", session_log(session));
    }
}

/// The job log lines hyperjob itself wrote ("hyperjob <stage>: …").
pub fn driver_errors(report: &hyperjob_test_harness::JobReport) -> Vec<String> {
    report
        .log_text()
        .lines()
        .filter(|line| line.starts_with("hyperjob "))
        .map(str::to_string)
        .collect()
}

/// Runs the hyperjob under test with the workspace's config and `args` (`gc`, `pool fill`, …).
pub fn hyperjob_output(env: &TestEnv, ws: &Workspace, args: &[&str]) -> std::process::Output {
    std::process::Command::new(&env.hyperjob)
        .arg("--config")
        .arg(&ws.config_path)
        .args(args)
        .output()
        .expect("run hyperjob")
}

/// [`hyperjob_output`], which must succeed; its stdout and stderr.
pub fn hyperjob_ok(env: &TestEnv, ws: &Workspace, args: &[&str]) -> String {
    let output = hyperjob_output(env, ws, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "hyperjob {args:?} failed:\n{text}");
    text
}

/// The relay prepare recorded for job `job_id` (pid, start time, boot), if any.
pub fn recorded_relay(ws: &Workspace, job_id: i64) -> Option<ProcessIdentity> {
    let job_id = u64::try_from(job_id).expect("job id");
    Some(
        StateStore::new(&ws.state_dir)
            .load(job_id)
            .ok()??
            .relay?
            .process,
    )
}

/// Whether that very process (not another one under its pid) still runs.
pub fn is_running(process: &ProcessIdentity) -> bool {
    hyperjob_core::runner::is_alive(std::path::Path::new("/proc"), process) == Some(true)
}

/// Where job `job_id`'s relay listens.
pub fn relay_socket(ws: &Workspace, job_id: i64) -> PathBuf {
    ws.state_dir.join(format!("job-{job_id}.relay.sock"))
}

/// A job whose `script` step the signal tests stop: it starts a `sleep` that leaves its process
/// group with `setsid` and one that stays, says `started-on-stderr` on stderr and `started` on
/// stdout, then sleeps. Its `check` step ([`nothing_of_the_script_left`]) waits (up to 30 s:
/// the guest side kill sends SIGKILL one second after SIGTERM) until no `sleep` is left in the
/// guest, says whether the script had started, and resets that mark for the next round.
pub fn stoppable_job(id: i64, project: &str) -> Job {
    let mut job = job_without_sources(
        id,
        &format!("group/{project}"),
        &[
            "touch /tmp/script.started",
            "setsid sleep 301 &",
            "sleep 302 &",
            "echo started-on-stderr >&2",
            "echo started",
            "sleep 303",
        ],
    );
    job.steps.push(Step::new(
        "check",
        &[
            "for i in $(seq 300); do pgrep -x sleep >/dev/null || break; sleep 0.1; done",
            "if pgrep -x sleep; then echo sleep-survived; exit 4; fi",
            "if [ -e /tmp/script.started ]; then echo script-had-started; else echo script-never-started; fi",
            "rm -f /tmp/script.started",
            "echo no-job-process-left",
        ],
    ));
    job
}

/// Runs the `check` step of a [`stoppable_job`]; asserts nothing of the script is left; true
/// if it had started.
pub fn nothing_of_the_script_left(session: &ExecutorSession) -> bool {
    let before = session.log().len();
    let check = session
        .run_stage(&Stage::UserStep("check".into()))
        .expect("run step_check")
        .expect("invoked");
    let lines: Vec<String> = session.log()[before..]
        .iter()
        .map(|line| line.text.clone())
        .collect();
    // Whole lines: the job log also shows each command, which names these words.
    let said = |word: &str| lines.iter().any(|line| line == word);
    assert!(check.error.is_none(), "{}", lines.join("\n"));
    assert!(said("no-job-process-left"), "{}", lines.join("\n"));
    said("script-had-started")
}

/// The stand-in for `gitlab-runner` (tests/runner-standin), built next to the hyperjob binary
/// by `cargo build --workspace`.
pub fn runner_standin(env: &TestEnv) -> PathBuf {
    let path = env
        .hyperjob
        .parent()
        .expect("binary dir")
        .join("gitlab-runner");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --workspace` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// hyperjob called through the `gitlab-runner` stand-in (`gitlab-runner spawn hyperjob STAGE`),
/// so that, as under GitLab Runner, the process that calls hyperjob is `gitlab-runner`.
pub fn standin_driver(env: &TestEnv, ws: &Workspace) -> Driver {
    let standin = runner_standin(env);
    let hyperjob = env.hyperjob.to_str().expect("utf-8").to_owned();
    let through = |stage: &str| vec!["spawn".to_owned(), hyperjob.clone(), stage.to_owned()];
    Driver {
        config_exec: Some(standin.clone()),
        config_args: through("config"),
        prepare_exec: Some(standin.clone()),
        prepare_args: through("prepare"),
        run_exec: standin.clone(),
        run_args: through("run"),
        cleanup_exec: Some(standin),
        cleanup_args: through("cleanup"),
        ..hyperjob_driver(env, ws)
    }
}

/// `config` with the top-level key `runner_binary = "<path>"`.
pub fn with_runner_binary(config: &str, path: &std::path::Path) -> String {
    config.replacen(
        "state_dir = ",
        &format!("runner_binary = \"{}\"\nstate_dir = ", path.display()),
        1,
    )
}
