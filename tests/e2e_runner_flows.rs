//! End-to-end: GitLab Runner's own flows (tests/harness) against the real `hyperjob` binary and
//! real TCG guests — graceful cancel then after_script, job timeout, prepare timeout, the
//! runner's SIGTERM → SIGKILL escalation, a process tree that ignores SIGTERM and left the
//! process group — plus the `sh` and 17.4–19.0 script formats and small protocol facts.
//! Run with scripts/test.sh.

mod support;

use std::time::Duration;

use hyperjob_test_harness::{
    run_job, CancelKind, CancelPlan, Driver, ExecutorSession, ExitInfo, Invocation,
    InvocationError, Job, JobReport, JobResult, JobVariable, RunnerSettings, ScriptFormat, Stage,
    Step, StopReason,
};
use support::{domain_exists, session_log, unique_job_id, vm_name, TestEnv, Workspace};

/// What a script prints once its signal handling is in place. The runner echoes each command
/// first; that echo shows `$((6*7))`, so only the command's own output contains this.
const STARTED: &str = "42 started";
const SIGKILL: i32 = 9;
const PRINT_STARTED: &str = "echo \"$((6*7)) started\"";

/// Whether the log has exactly this line: the runner echoes every command before running it,
/// so a `contains` would also find the text of the command that prints it.
fn has_line(log: &str, text: &str) -> bool {
    log.lines().any(|line| line == text)
}

fn driver(env: &TestEnv, ws: &Workspace) -> Driver {
    support::hyperjob_driver(env, ws)
}

fn settings() -> RunnerSettings {
    RunnerSettings {
        preparation_retry_interval: Duration::from_millis(200),
        ..RunnerSettings::default()
    }
}

/// A job that needs no git server: sources are skipped.
fn job(id: i64, script: &[&str]) -> Job {
    support::job_without_sources(id, "group/flows", script)
}

fn only<'a>(report: &'a JobReport, label: &str) -> &'a Invocation {
    let invocations = report.invocations_of(label);
    assert_eq!(
        invocations.len(),
        1,
        "{label}: {:?}",
        report.invocation_labels()
    );
    invocations[0]
}

/// From the line `needle` in the job log to the end of `invocation`: how long the driver took
/// to exit after the runner acted on that line.
fn exit_after_line(report: &JobReport, needle: &str, invocation: &Invocation) -> Duration {
    let line = report
        .log
        .iter()
        .find(|line| line.text.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the log:\n{}", report.log_text()));
    invocation.ended.saturating_duration_since(line.at)
}

/// Processes of the cancelled script, looked for in the guest by a later stage: `sleep 300`
/// left the process group, `sleep 301` left it and ignores SIGTERM, `sleep 302` (the script's
/// own) ignores SIGTERM. Waits up to 10 s for the SIGKILL step, then reports.
const TREE_CHECK: &str = "i=0; while pgrep -f '^sleep 30[0-2]$' >/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; if pgrep -af '^sleep 30[0-2]$'; then echo tree-survived; else echo \"tree-gone after $i polls\"; fi";

#[test]
fn graceful_cancel_stops_the_whole_guest_tree_then_after_script_sees_canceled() {
    let env = TestEnv::load();
    let ws = env.workspace("flow-cancel");
    let id = unique_job_id();
    let mut job = job(
        id,
        &[
            "setsid sleep 300 &",
            "trap '' TERM",
            "setsid sleep 301 &",
            PRINT_STARTED,
            "sleep 302",
        ],
    );
    job.after_script = vec![
        "echo \"status=$CI_JOB_STATUS\"".to_owned(),
        TREE_CHECK.to_owned(),
    ];
    let settings = RunnerSettings {
        cancel_plan: Some(CancelPlan::on_output(
            "build_script",
            STARTED,
            CancelKind::Cancel,
        )),
        ..settings()
    };

    let report = run_job(&driver(&env, &ws), &job, &settings);

    let log = report.log_text();
    assert_eq!(report.result, JobResult::Canceled, "{log}");
    assert_eq!(
        report.run_stages(),
        [
            "prepare_script",
            "get_sources",
            "build_script",
            "after_script",
            "cleanup_file_variables"
        ]
    );
    let build = only(&report, "build_script");
    let termination = build
        .termination
        .as_ref()
        .expect("build_script was signalled");
    assert_eq!(
        (termination.reason, termination.scope.as_str()),
        (StopReason::Canceled, "script")
    );
    // hyperjob handled SIGTERM itself: no SIGKILL from the runner was needed.
    assert!(!termination.sent_sigkill, "{log}");
    assert_eq!(build.exit, ExitInfo::Exited(2), "{log}");
    assert!(has_line(&log, "status=canceled"), "{log}");
    assert!(
        log.lines().any(|line| line.starts_with("tree-gone after ")),
        "{log}"
    );
    assert!(!has_line(&log, "tree-survived"), "{log}");
    println!(
        "graceful cancel: run exited {:.2} s after the script printed {STARTED:?} (script ignoring SIGTERM, so the guest's SIGKILL step ended it); after_script: {}",
        exit_after_line(&report, STARTED, build).as_secs_f64(),
        log.lines().find(|l| l.starts_with("tree-gone")).unwrap_or_default()
    );
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn runner_escalates_to_sigkill_when_run_outlives_the_graceful_timeout() {
    let env = TestEnv::load();
    let ws = env.workspace("flow-escalate");
    let id = unique_job_id();
    let mut job = job(id, &["trap '' TERM", PRINT_STARTED, "sleep 300"]);
    job.after_script = vec!["echo after".to_owned()];
    // The script ignores SIGTERM, so `run` waits for the guest's SIGKILL one second after its
    // SIGTERM: far longer than this graceful timeout.
    let mut driver = driver(&env, &ws);
    driver.graceful_kill_timeout = Duration::from_millis(200);
    let settings = RunnerSettings {
        cancel_plan: Some(CancelPlan::on_output(
            "build_script",
            STARTED,
            CancelKind::Abort,
        )),
        ..settings()
    };

    let report = run_job(&driver, &job, &settings);

    let log = report.log_text();
    assert_eq!(report.result, JobResult::Canceled, "{log}");
    let build = only(&report, "build_script");
    assert_eq!(build.exit, ExitInfo::Signaled(SIGKILL), "{log}");
    assert!(build
        .termination
        .as_ref()
        .is_some_and(|termination| termination.sent_sigkill));
    assert_eq!(
        report.invocation_labels(),
        [
            "config",
            "prepare",
            "prepare_script",
            "get_sources",
            "build_script",
            "cleanup"
        ]
    );
    assert!(
        only(&report, "cleanup").error.is_none(),
        "{}",
        report.runner_log_text()
    );
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn job_timeout_terminates_the_step_and_cleanup_leaves_nothing() {
    let env = TestEnv::load();
    let ws = env.workspace("flow-job-timeout");
    let id = unique_job_id();
    let mut job = job(id, &[PRINT_STARTED, "sleep 600"]);
    job.after_script = vec!["echo after".to_owned()];
    // Long enough for a boot with other guests booting on two cores; the step then sleeps
    // into the timeout.
    job.timeout_secs = 90;

    let report = run_job(&driver(&env, &ws), &job, &settings());

    let log = report.log_text();
    assert!(
        log.contains(STARTED),
        "the step never started before the timeout:\n{log}"
    );
    assert_eq!(
        report.result,
        JobResult::TimedOut {
            message: "execution took longer than 1m30s seconds".to_owned()
        },
        "{log}"
    );
    let build = only(&report, "build_script");
    let termination = build
        .termination
        .as_ref()
        .expect("build_script was stopped");
    assert_eq!(
        (termination.reason, termination.scope.as_str()),
        (StopReason::DeadlineExceeded, "job")
    );
    assert!(!termination.sent_sigkill, "{log}");
    assert_eq!(
        report.invocation_labels().last().map(String::as_str),
        Some("cleanup")
    );
    assert!(report.invocations_of("after_script").is_empty());
    let prepare = only(&report, "prepare");
    println!(
        "job timeout: prepare took {:.1} s; the step ran until the 90 s deadline and exited {:.2} s after SIGTERM",
        prepare.duration.as_secs_f64(),
        (build.ended.saturating_duration_since(report.invocations[0].started))
            .saturating_sub(Duration::from_secs(90))
            .as_secs_f64()
    );
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn prepare_timeout_stops_the_boot_and_leaves_nothing() {
    let env = TestEnv::load();
    let ws = env.workspace("flow-prepare-timeout");
    let id = unique_job_id();
    let job = job(id, &["echo never"]);
    // A TCG boot to SSH takes 10 s and more; the VM is created within the first second.
    let settings = RunnerSettings {
        prepare_timeout: Some(Duration::from_secs(4)),
        ..settings()
    };

    let report = run_job(&driver(&env, &ws), &job, &settings);

    let log = report.log_text();
    assert_eq!(
        report.result,
        JobResult::TimedOut {
            message: "prepare timeout: exceeded timeout of 4s".to_owned()
        },
        "{log}"
    );
    // No retry after a prepare timeout, no stage, and the attempt's cleanup ran.
    assert_eq!(report.invocation_labels(), ["config", "prepare", "cleanup"]);
    let prepare = only(&report, "prepare");
    let termination = prepare.termination.as_ref().expect("prepare was stopped");
    assert_eq!(
        (termination.reason, termination.scope.as_str()),
        (StopReason::DeadlineExceeded, "prepare")
    );
    assert!(!termination.sent_sigkill, "{log}");
    assert_eq!(prepare.exit, ExitInfo::Exited(2), "{log}");
    assert!(log.contains("Creating VM"), "{log}");
    assert!(
        !log.contains("Guest ready"),
        "the guest was up before the timeout:\n{log}"
    );
    println!(
        "prepare timeout: prepare exited {:.2} s after the runner's SIGTERM at 4 s",
        prepare
            .duration
            .saturating_sub(Duration::from_secs(4))
            .as_secs_f64()
    );
    ws.assert_nothing_left(&vm_name(id));
}

const INSECURE_WARNING: &str =
    "WARNING: hyperjob does not verify the guest's SSH host key (insecure_ignore_host_key = true)";

/// A session for `job` on an already prepared VM (same job id, other runner settings): config
/// and dirs only, no prepare. Its temp dir is removed by [`drop_session`], never by cleanup_exec
/// (which would destroy the shared VM).
fn extra_session(driver: &Driver, job: &Job, settings: &RunnerSettings) -> ExecutorSession {
    let session = ExecutorSession::new(driver, job, settings).expect("executor session");
    session.run_config().expect("config_exec");
    session.start_build().expect("builds dir");
    session
}

fn drop_session(session: &ExecutorSession) {
    std::fs::remove_dir_all(session.temp_dir()).expect("remove the session's temp dir");
}

fn run_ok(session: &ExecutorSession, stage: &Stage) -> Invocation {
    let invocation = session
        .run_stage(stage)
        .expect("stage runs")
        .expect("stage is not skipped");
    assert!(invocation.error.is_none(), "{}", session_log(session));
    invocation
}

fn warnings_in(session: &ExecutorSession, stage: &str) -> usize {
    session
        .log()
        .iter()
        .filter(|line| line.stage == stage && line.text == INSECURE_WARNING)
        .count()
}

/// One guest, many facts (every boot costs both cores for 10-20 s):
/// identity from JOB_RESPONSE_FILE only, the insecure host-key warning in every stage, a stale
/// BUILD_EXIT_CODE_FILE removed, a script killed by SIGKILL reporting 137, then the same VM
/// runs `sh` jobs (default quoting and FF_POSIXLY_CORRECT_ESCAPES) and the 17.4-19.0 format.
#[test]
fn one_guest_identity_exit_codes_host_key_warning_and_script_formats() {
    let env = TestEnv::load();
    let ws = env.workspace("flow-facts");
    let config = ws.default_config().replace(
        &format!("known_hosts = \"{}\"", env.known_hosts.display()),
        "insecure_ignore_host_key = true",
    );
    assert!(config.contains("insecure_ignore_host_key = true"));
    ws.write_config(&config);
    let driver = driver(&env, &ws);
    let id = unique_job_id();
    let fake_id = id + 500;
    let mut job = job(id, &["echo build"]);
    job.variables
        .push(JobVariable::new("CI_JOB_ID", &fake_id.to_string()));
    job.steps.push(Step::new("stale", &["echo fresh-stage"]));
    job.steps
        .push(Step::new("killed", &["echo before-kill", "kill -9 $$"]));
    job.steps
        .push(Step::new("usr1", &["echo before-usr1", "kill -USR1 $$"]));
    job.steps.push(Step::new(
        "quit",
        &["echo quit-started", "sleep 2", "echo quit-finished"],
    ));
    let session = extra_session(&driver, &job, &settings());

    session.prepare().expect("prepare_exec");
    let prepare = &session.invocations()[1];
    assert_eq!(
        prepare.env("CUSTOM_ENV_CI_JOB_ID"),
        Some(fake_id.to_string().as_str()),
        "the job variable must really differ from the response file's id"
    );
    assert!(domain_exists(&env.libvirt_uri, &vm_name(id)));
    assert!(!domain_exists(&env.libvirt_uri, &vm_name(fake_id)));
    assert_eq!(
        session
            .config_output()
            .and_then(|c| c["hostname"].as_str().map(str::to_owned)),
        Some(vm_name(id))
    );
    run_ok(&session, &Stage::PrepareScript);
    run_ok(&session, &Stage::GetSources);

    // A stale exit code from an earlier stage must not survive a successful one.
    let code_file = session.build_exit_code_file().to_path_buf();
    std::fs::write(&code_file, "99\n").expect("write a stale exit code");
    run_ok(&session, &Stage::UserStep("stale".into()));
    assert!(
        !code_file.exists(),
        "run left the stale BUILD_EXIT_CODE_FILE"
    );

    let killed = session
        .run_stage(&Stage::UserStep("killed".into()))
        .expect("stage runs")
        .expect("not skipped");
    let log = session_log(&session);
    assert!(has_line(&log, "before-kill"), "{log}");
    assert_eq!(killed.exit, ExitInfo::Exited(1), "{log}");
    assert_eq!(
        std::fs::read_to_string(&code_file)
            .expect("exit code file")
            .trim(),
        "137"
    );
    assert!(
        matches!(
            killed.error,
            Some(InvocationError::Build { exit_code: 137, .. })
        ),
        "{:?}",
        killed.error
    );

    // A signal beyond the common ones counts as 128+N too (SIGUSR1 = 10).
    let usr1 = session
        .run_stage(&Stage::UserStep("usr1".into()))
        .expect("stage runs")
        .expect("not skipped");
    assert!(
        matches!(
            usr1.error,
            Some(InvocationError::Build { exit_code: 138, .. })
        ),
        "{:?}\n{}",
        usr1.error,
        session_log(&session)
    );

    // SIGQUIT (the runner's graceful stop, which systemd sends to the whole unit) must not
    // stop a stage: the job in flight finishes.
    let quit = session
        .spawn_stage(&Stage::UserStep("quit".into()))
        .expect("start step_quit");
    assert!(session.wait_for_log("quit-started", Duration::from_secs(300)));
    quit.signal_group(3).expect("SIGQUIT");
    let quit = quit.wait();
    let log = session_log(&session);
    assert_eq!(quit.exit, ExitInfo::Exited(0), "{log}");
    assert!(has_line(&log, "quit-finished"), "{log}");

    // Every stage that talks to the guest warns, once: not once per job or process tree.
    for stage in [
        "prepare",
        "prepare_script",
        "get_sources",
        "step_stale",
        "step_killed",
    ] {
        assert_eq!(warnings_in(&session, stage), 1, "{stage}:\n{log}");
    }

    script_formats_on(&driver, id);

    session.cleanup();
    ws.assert_nothing_left(&vm_name(id));
}

/// A value every kind of quoting has to carry through, and how the probe step prints it.
const GREETING: &str = "it's \"me\" `x` $'y' a\\b";
const GREETING_LINE: &str = "it's \"me\" `x` $'y' a\\b|";

/// `sh` jobs and the 17.4-19.0 bash format on the prepared VM of job `id`.
fn script_formats_on(driver: &Driver, id: i64) {
    let probe = "echo \"shell=$0 exe=$(readlink /proc/$$/exe)\"; printf '%s|\\n' \"$GREETING\"";
    let variant = |variables: &[(&str, &str)], script: &[&str]| {
        let mut job = job(id, script);
        job.variables.push(JobVariable::new("GREETING", GREETING));
        for (key, value) in variables {
            job.variables.push(JobVariable::new(key, value));
        }
        job
    };
    let sh = RunnerSettings {
        shell: Some("sh".to_owned()),
        ..settings()
    };

    // Default quoting: $'…' everywhere. The guest's sh is dash, which lacks it; the guest has
    // bash, so hyperjob runs the script with bash.
    let default_sh = extra_session(driver, &variant(&[], &[probe]), &sh);
    run_ok(&default_sh, &Stage::GetSources);
    let script = default_sh
        .script_for(&Stage::parse("build_script"))
        .expect("generated")
        .expect("exists");
    assert!(script.starts_with("#!/usr/bin/env sh\n") && script.contains("eval $'"));
    let default_run = run_ok(&default_sh, &Stage::parse("build_script"));
    let log = session_log(&default_sh);
    assert!(has_line(&log, "shell=bash exe=/usr/bin/bash"), "{log}");
    assert!(has_line(&log, GREETING_LINE), "{log}");
    drop_session(&default_sh);

    // POSIX quoting: the guest's own sh (dash) runs it.
    let posix_sh = extra_session(
        driver,
        &variant(&[("FF_POSIXLY_CORRECT_ESCAPES", "true")], &[probe]),
        &sh,
    );
    run_ok(&posix_sh, &Stage::GetSources);
    let posix_run = run_ok(&posix_sh, &Stage::parse("build_script"));
    let log = session_log(&posix_sh);
    assert!(has_line(&log, "shell=sh exe=/usr/bin/dash"), "{log}");
    assert!(has_line(&log, GREETING_LINE), "{log}");
    drop_session(&posix_sh);
    println!(
        "sh job, build_script: {:.2} s with $'…' quoting (one probe of the guest's sh first), {:.2} s with FF_POSIXLY_CORRECT_ESCAPES",
        default_run.duration.as_secs_f64(),
        posix_run.duration.as_secs_f64()
    );

    // The 17.4-19.0 bash wrapper: same success, same exit-code reporting.
    let old = RunnerSettings {
        script_format: ScriptFormat::Runner17_4,
        ..settings()
    };
    let old_bash = extra_session(
        driver,
        &variant(&[], &[probe, "echo format-17.4-ran", "exit 3"]),
        &old,
    );
    run_ok(&old_bash, &Stage::GetSources);
    let failed = old_bash
        .run_stage(&Stage::parse("build_script"))
        .expect("stage runs")
        .expect("not skipped");
    let log = session_log(&old_bash);
    assert!(
        failed
            .script
            .as_deref()
            .is_some_and(|script| script.contains("\ntrap exit 1 TERM\n")),
        "not the 17.4 wrapper"
    );
    assert!(has_line(&log, "format-17.4-ran"), "{log}");
    assert!(has_line(&log, GREETING_LINE), "{log}");
    assert!(
        matches!(
            failed.error,
            Some(InvocationError::Build { exit_code: 3, .. })
        ),
        "{:?}\n{log}",
        failed.error
    );
    drop_session(&old_bash);
}
