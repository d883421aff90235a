//! The harness driving `testdata/driver.sh`, a driver that runs each stage
//! script locally. These tests check the harness's call sequence, not hyperjob.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyperjob_test_harness::{
    run_job, run_job_with, CancelHandle, CancelKind, CancelPlan, Driver, ExecutorSession, ExitInfo,
    InvocationKind, Job, JobResult, JobVariable, LineKind, LogStream, RunnerSettings, StopReason,
};

struct Fixture {
    root: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(root.path().join("tmp")).expect("runner tmp dir");
        std::fs::create_dir(root.path().join("state")).expect("driver state dir");
        Self { root }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn driver(&self, knobs: &[(&str, &str)]) -> Driver {
        let program = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/driver.sh");
        let mut driver = Driver::single_binary(program)
            .with_env("HJT_CALLS", &self.path("calls").to_string_lossy())
            .with_env("HJT_STATE_DIR", &self.path("state").to_string_lossy());
        for (key, value) in knobs {
            driver = driver.with_env(key, value);
        }
        driver.graceful_kill_timeout = Duration::from_secs(5);
        driver
    }

    fn settings(&self) -> RunnerSettings {
        RunnerSettings {
            temp_root: Some(self.path("tmp")),
            ..RunnerSettings::local(self.root.path())
        }
    }

    /// The driver's own record of its calls.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// A job that needs no repository (`GIT_STRATEGY=none`).
fn job(script: &[&str]) -> Job {
    let repo_url = Job::gitlab_repo_url("https://gitlab.example.com", "mygroup/myproject", "tok");
    let mut job = Job::new(
        4242,
        "mygroup/myproject",
        &repo_url,
        "0123456789abcdef",
        script,
    );
    job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));
    job
}

fn labels(values: &[&str]) -> Vec<String> {
    values.iter().map(|value| (*value).to_owned()).collect()
}

#[test]
fn successful_job_calls_every_stage_in_runner_order_with_release_step() {
    let fixture = Fixture::new();
    let mut job = job(&["echo hello from the script"]);
    job.steps.push(hyperjob_test_harness::Step::new(
        "release",
        &["echo releasing"],
    ));
    job.after_script = vec!["echo after".to_owned()];

    let report = run_job(&fixture.driver(&[]), &job, &fixture.settings());

    assert_eq!(report.result, JobResult::Success);
    let expected = [
        "config",
        "prepare",
        "prepare_script",
        "get_sources",
        "build_script",
        "step_release",
        "after_script",
        "cleanup_file_variables",
        "cleanup",
    ];
    assert_eq!(report.invocation_labels(), labels(&expected));
    let driver_view: Vec<String> = expected
        .iter()
        .map(|label| match *label {
            "config" | "prepare" | "cleanup" => (*label).to_owned(),
            stage => format!("run {stage}"),
        })
        .collect();
    assert_eq!(fixture.calls(), driver_view);
    let log = report.log_text();
    assert!(
        log.contains("Using Custom executor with driver harness-test-driver 1.0..."),
        "{log}"
    );
    assert!(log.contains("hello from the script\n"), "{log}");
    assert!(log.contains("releasing\n"), "{log}");
    assert!(log.contains("Job succeeded"), "{log}");
    assert!(report.temp_dirs.iter().all(|dir| !dir.exists()));
}

#[test]
fn run_exec_gets_run_args_then_absolute_script_path_then_stage() {
    let fixture = Fixture::new();

    let report = run_job(&fixture.driver(&[]), &job(&["true"]), &fixture.settings());

    let build = report.invocations_of("build_script");
    let argv = &build[0].argv;
    assert_eq!(argv.len(), 4, "{argv:?}");
    assert_eq!(argv[1], "run");
    assert_eq!(argv[3], "build_script");
    let script_path = Path::new(&argv[2]);
    assert!(script_path.is_absolute());
    assert!(script_path.starts_with(&build[0].temp_dir));
    assert_eq!(
        script_path.file_name().and_then(|name| name.to_str()),
        Some("script")
    );
    let script_dir = script_path
        .parent()
        .and_then(Path::file_name)
        .and_then(|name| name.to_str());
    assert!(
        script_dir.is_some_and(|name| name.starts_with("script")),
        "{argv:?}"
    );
    let mut script_dirs: Vec<&str> = report
        .invocations
        .iter()
        .filter(|invocation| matches!(invocation.kind, InvocationKind::Run { .. }))
        .map(|invocation| invocation.argv[2].as_str())
        .collect();
    let run_calls = script_dirs.len();
    script_dirs.dedup();
    assert_eq!(script_dirs.len(), run_calls, "a new script dir per call");
}

#[test]
fn driver_runs_in_temp_dir_with_null_stdin_in_its_own_process_group() {
    let fixture = Fixture::new();

    let report = run_job(&fixture.driver(&[]), &job(&["true"]), &fixture.settings());

    let prepare = report.invocations_of("prepare")[0];
    let temp_dir = prepare.temp_dir.to_string_lossy().into_owned();
    let log = report.log_text();
    assert!(log.contains(&format!("prepare: cwd={temp_dir}\n")), "{log}");
    assert!(
        log.contains(&format!("prepare: tmpdir={temp_dir}\n")),
        "{log}"
    );
    assert!(log.contains("prepare: stdin=/dev/null\n"), "{log}");
    assert!(log.contains("prepare: response_mode=600\n"), "{log}");
    let pid_line = log
        .lines()
        .find(|line| line.starts_with("prepare: pid="))
        .expect("the driver prints its pid and pgid");
    let (pid, pgid) = pid_line
        .trim_start_matches("prepare: pid=")
        .split_once(" pgid=")
        .expect("pid and pgid");
    assert_eq!(pid, pgid, "the driver leads its own process group");
    assert!(prepare
        .temp_dir
        .file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.starts_with("custom-executor")));
}

#[test]
fn driver_environment_has_fixed_variables_then_custom_env_with_services_last() {
    let fixture = Fixture::new();

    let report = run_job(&fixture.driver(&[]), &job(&["true"]), &fixture.settings());

    let prepare = report.invocations_of("prepare")[0];
    let temp_dir = prepare.temp_dir.to_string_lossy().into_owned();
    assert_eq!(prepare.env("TMPDIR"), Some(temp_dir.as_str()));
    assert_eq!(prepare.env("BUILD_FAILURE_EXIT_CODE"), Some("1"));
    assert_eq!(prepare.env("SYSTEM_FAILURE_EXIT_CODE"), Some("2"));
    assert_eq!(
        prepare.env("BUILD_EXIT_CODE_FILE"),
        Some(format!("{temp_dir}/build_exit_code").as_str())
    );
    assert_eq!(
        prepare.env("JOB_RESPONSE_FILE"),
        Some(format!("{temp_dir}/response.json").as_str())
    );
    assert_eq!(prepare.env("CUSTOM_ENV_CI_JOB_ID"), Some("4242"));
    assert_eq!(prepare.env("CUSTOM_ENV_CI_SERVER"), Some("yes"));
    assert_eq!(
        prepare.env("CUSTOM_ENV_CI_SHARED_ENVIRONMENT"),
        Some("true")
    );
    let builds_dir = fixture.path("builds").to_string_lossy().into_owned();
    assert_eq!(
        prepare.env("CUSTOM_ENV_CI_BUILDS_DIR"),
        Some(builds_dir.as_str())
    );
    assert_eq!(
        prepare.env("CUSTOM_ENV_CI_PROJECT_DIR"),
        Some(format!("{builds_dir}/mygroup/myproject").as_str())
    );
    let last = prepare.added_env.last().expect("variables were added");
    assert_eq!(
        last,
        &("CUSTOM_ENV_CI_JOB_SERVICES".to_owned(), String::new())
    );
}

#[test]
fn config_exec_sees_empty_builds_dir_on_first_attempt() {
    let fixture = Fixture::new();

    let report = run_job(&fixture.driver(&[]), &job(&["true"]), &fixture.settings());

    let config = report.invocations_of("config")[0];
    assert_eq!(config.env("CUSTOM_ENV_CI_BUILDS_DIR"), Some(""));
    assert_eq!(
        config.env("CUSTOM_ENV_RUNNER_TEMP_PROJECT_DIR"),
        Some(".tmp")
    );
}

#[test]
fn script_exit_42_is_build_failure_42_and_after_script_sees_failed_status() {
    let fixture = Fixture::new();
    let mut job = job(&["exit 42", "echo never"]);
    job.after_script = vec!["echo status=$CI_JOB_STATUS".to_owned()];

    let report = run_job(&fixture.driver(&[]), &job, &fixture.settings());

    assert_eq!(report.result, JobResult::BuildFailure { exit_code: 42 });
    assert_eq!(
        report.failure_message.as_deref(),
        Some("Job failed: exit status 42")
    );
    let log = report.log_text();
    assert!(log.contains("status=failed\n"), "{log}");
    assert!(!log.contains("never\n"), "{log}");
    assert_eq!(
        report.run_stages(),
        labels(&[
            "prepare_script",
            "get_sources",
            "build_script",
            "after_script",
            "cleanup_file_variables"
        ])
    );
}

#[test]
fn prepare_exit_2_is_retried_three_times_with_cleanup_after_each_attempt() {
    let fixture = Fixture::new();

    let report = run_job(
        &fixture.driver(&[("HJT_PREPARE_EXIT", "2")]),
        &job(&["true"]),
        &fixture.settings(),
    );

    assert_eq!(
        report.result,
        JobResult::SystemFailure {
            message: "exit status 2".to_owned()
        }
    );
    let attempt = ["config", "prepare", "cleanup"];
    assert_eq!(
        report.invocation_labels(),
        labels(&[attempt, attempt, attempt].concat())
    );
    let attempts: Vec<u32> = report
        .invocations
        .iter()
        .map(|invocation| invocation.attempt)
        .collect();
    assert_eq!(attempts, vec![1, 1, 1, 2, 2, 2, 3, 3, 3]);
    assert_eq!(report.temp_dirs.len(), 3);
    assert!(report.temp_dirs.iter().all(|dir| !dir.exists()));
    assert!(report
        .log_text()
        .contains("ERROR: Preparation failed: exit status 2"));
}

#[test]
fn prepare_exit_1_fails_the_build_without_retry() {
    let fixture = Fixture::new();

    let report = run_job(
        &fixture.driver(&[("HJT_PREPARE_EXIT", "1")]),
        &job(&["true"]),
        &fixture.settings(),
    );

    assert_eq!(report.result, JobResult::BuildFailure { exit_code: 1 });
    assert_eq!(
        report.invocation_labels(),
        labels(&["config", "prepare", "cleanup"])
    );
}

#[test]
fn stale_build_exit_code_file_decides_a_later_build_failure() {
    let fixture = Fixture::new();
    let driver = fixture.driver(&[("HJT_PREPARE_CODE_FILE", "42"), ("HJT_NO_CODE_FILE", "1")]);

    let report = run_job(&driver, &job(&["exit 3"]), &fixture.settings());

    assert_eq!(report.result, JobResult::BuildFailure { exit_code: 42 });
}

#[test]
fn malformed_build_exit_code_file_is_a_retried_system_failure() {
    let fixture = Fixture::new();
    let driver = fixture.driver(&[("HJT_PREPARE_CODE_FILE", " 42"), ("HJT_PREPARE_EXIT", "1")]);

    let report = run_job(&driver, &job(&["true"]), &fixture.settings());

    assert_eq!(
        report.result,
        JobResult::SystemFailure {
            message: "unknown Custom executor executable exit code 2; executable execution terminated with: exit status 1"
                .to_owned()
        }
    );
    assert_eq!(report.invocations_of("prepare").len(), 3);
}

#[test]
fn unknown_run_exit_code_is_system_failure() {
    let fixture = Fixture::new();
    let driver = fixture.driver(&[("HJT_FAIL_STAGE", "build_script"), ("HJT_FAIL_EXIT", "3")]);

    let report = run_job(&driver, &job(&["true"]), &fixture.settings());

    assert_eq!(
        report.result,
        JobResult::SystemFailure {
            message: "unknown Custom executor executable exit code 3; executable execution terminated with: exit status 3"
                .to_owned()
        }
    );
}

#[test]
fn whitespace_only_config_output_is_retried_and_never_reaches_prepare() {
    let fixture = Fixture::new();

    let report = run_job(
        &fixture.driver(&[("HJT_CONFIG_JSON", "\n")]),
        &job(&["true"]),
        &fixture.settings(),
    );

    assert!(
        matches!(report.result, JobResult::SystemFailure { ref message } if message.starts_with("error while parsing JSON output"))
    );
    let attempt = ["config", "cleanup"];
    assert_eq!(
        report.invocation_labels(),
        labels(&[attempt, attempt, attempt].concat())
    );
}

#[test]
fn empty_builds_dir_from_config_is_config_error_without_retry() {
    let fixture = Fixture::new();

    let report = run_job(
        &fixture.driver(&[("HJT_CONFIG_JSON", r#"{"builds_dir":""}"#)]),
        &job(&["true"]),
        &fixture.settings(),
    );

    assert_eq!(
        report.result,
        JobResult::ConfigError {
            message: "the builds_dir is not configured".to_owned()
        }
    );
    assert_eq!(report.invocation_labels(), labels(&["config", "cleanup"]));
}

#[test]
fn config_job_env_and_hostname_reach_later_invocations() {
    let fixture = Fixture::new();
    let config = r#"{"job_env":{"VM_NAME":"vm-4242"},"hostname":"vm-host","unknown_key":[1]}"#;

    let report = run_job(
        &fixture.driver(&[("HJT_CONFIG_JSON", config)]),
        &job(&["true"]),
        &fixture.settings(),
    );

    assert_eq!(report.result, JobResult::Success);
    let log = report.log_text();
    assert!(log.contains("prepare: job=4242 vm=vm-4242\n"), "{log}");
    assert!(log.contains(" via vm-host...\n"), "{log}");
    assert!(report.runner_log_text().contains("vm=vm-4242"));
    let config_call = report.invocations_of("config")[0];
    assert_eq!(config_call.env("VM_NAME"), None);
    assert_eq!(
        report
            .config_output
            .as_ref()
            .map(|json| json["hostname"].clone()),
        Some("vm-host".into())
    );
}

#[test]
fn config_stderr_goes_to_the_job_log_and_stdout_does_not() {
    let fixture = Fixture::new();

    let report = run_job(
        &fixture.driver(&[("HJT_CONFIG_STDERR", "config says hi")]),
        &job(&["true"]),
        &fixture.settings(),
    );

    let line = report
        .log
        .iter()
        .find(|line| line.text == "config says hi")
        .expect("config stderr is in the log");
    assert_eq!(
        (line.stream, line.kind, line.stage.as_str()),
        (LogStream::Executor, LineKind::Stderr, "config")
    );
    assert!(!report
        .log_text()
        .contains("harness-test-driver\",\"version"));
}

#[test]
fn cleanup_output_goes_to_the_runner_log_only() {
    let fixture = Fixture::new();

    let report = run_job(&fixture.driver(&[]), &job(&["true"]), &fixture.settings());

    assert!(!report.log_text().contains("cleanup-stdout"));
    assert!(report.runner_log_text().contains("cleanup-stdout job=4242"));
    assert!(report.runner_log_text().contains("cleanup-stderr"));
}

#[test]
fn failed_get_sources_is_retried_after_clear_worktree() {
    let fixture = Fixture::new();
    let mut job = job(&["true"]);
    job.variables
        .push(JobVariable::new("GET_SOURCES_ATTEMPTS", "2"));

    let report = run_job(
        &fixture.driver(&[("HJT_FAIL_ONCE_STAGE", "get_sources")]),
        &job,
        &fixture.settings(),
    );

    assert_eq!(report.result, JobResult::Success);
    assert_eq!(
        report.run_stages(),
        labels(&[
            "prepare_script",
            "get_sources",
            "clear_worktree",
            "get_sources",
            "build_script",
            "cleanup_file_variables"
        ])
    );
}

#[test]
fn failed_get_sources_skips_steps_and_after_script_but_not_file_variable_cleanup() {
    let fixture = Fixture::new();
    let mut job = job(&["true"]);
    job.after_script = vec!["echo after".to_owned()];
    let driver = fixture.driver(&[("HJT_FAIL_STAGE", "get_sources"), ("HJT_FAIL_EXIT", "1")]);

    let report = run_job(&driver, &job, &fixture.settings());

    assert_eq!(report.result, JobResult::BuildFailure { exit_code: 1 });
    assert_eq!(
        report.run_stages(),
        labels(&["prepare_script", "get_sources", "cleanup_file_variables"])
    );
}

#[test]
fn failed_prepare_script_ends_the_script_phase() {
    let fixture = Fixture::new();
    let driver = fixture.driver(&[("HJT_FAIL_STAGE", "prepare_script"), ("HJT_FAIL_EXIT", "1")]);

    let report = run_job(&driver, &job(&["true"]), &fixture.settings());

    assert_eq!(report.result, JobResult::BuildFailure { exit_code: 1 });
    assert_eq!(
        report.invocation_labels(),
        labels(&["config", "prepare", "prepare_script", "cleanup"])
    );
    let message = report.failure_message.unwrap_or_default();
    assert!(
        message.starts_with("Job failed: prepare environment: exit status 1."),
        "{message}"
    );
}

#[test]
fn graceful_cancel_stops_the_step_then_runs_after_script_with_canceled_status() {
    let fixture = Fixture::new();
    // The script's TERM trap is its first line: output means it is in place.
    // (The echoed command shows `$((6*7))`; only the output says 42.)
    let mut job = job(&["echo \"$((6*7)) started\"", "sleep 30"]);
    job.after_script = vec!["echo status=$CI_JOB_STATUS".to_owned()];
    let settings = RunnerSettings {
        cancel_plan: Some(CancelPlan::on_output(
            "build_script",
            "42 started",
            CancelKind::Cancel,
        )),
        ..fixture.settings()
    };

    let report = run_job(&fixture.driver(&[]), &job, &settings);

    assert_eq!(report.result, JobResult::Canceled);
    let build = report.invocations_of("build_script")[0];
    let termination = build
        .termination
        .as_ref()
        .expect("build_script was signalled");
    assert_eq!(
        (termination.reason, termination.scope.as_str()),
        (StopReason::Canceled, "script")
    );
    assert!(!termination.sent_sigkill);
    assert!(build.duration < Duration::from_secs(10));
    assert!(report.log_text().contains("status=canceled\n"));
    assert_eq!(
        report.invocation_labels()[4..],
        labels(&[
            "build_script",
            "after_script",
            "cleanup_file_variables",
            "cleanup"
        ])
    );
}

#[test]
fn abort_of_a_driver_ignoring_sigterm_escalates_to_sigkill_and_skips_later_stages() {
    let fixture = Fixture::new();
    let mut job = job(&["true"]);
    job.after_script = vec!["echo after".to_owned()];
    let mut driver = fixture.driver(&[("HJT_IGNORE_TERM_STAGE", "build_script")]);
    driver.graceful_kill_timeout = Duration::from_millis(300);
    let settings = RunnerSettings {
        cancel_plan: Some(CancelPlan::on_output(
            "build_script",
            "ignoring SIGTERM",
            CancelKind::Abort,
        )),
        ..fixture.settings()
    };

    let report = run_job(&driver, &job, &settings);

    assert_eq!(report.result, JobResult::Canceled);
    let build = report.invocations_of("build_script")[0];
    assert_eq!(build.exit, ExitInfo::Signaled(libc::SIGKILL));
    assert!(build
        .termination
        .as_ref()
        .is_some_and(|termination| termination.sent_sigkill));
    assert_eq!(
        report.invocation_labels(),
        labels(&[
            "config",
            "prepare",
            "prepare_script",
            "get_sources",
            "build_script",
            "cleanup"
        ])
    );
}

#[test]
fn job_timeout_terminates_the_step_and_reports_timed_out() {
    let fixture = Fixture::new();
    let mut job = job(&["sleep 30"]);
    job.timeout_secs = 1;

    let report = run_job(&fixture.driver(&[]), &job, &fixture.settings());

    assert_eq!(
        report.result,
        JobResult::TimedOut {
            message: "execution took longer than 1s seconds".to_owned()
        }
    );
    assert!(report.duration < Duration::from_secs(15));
    assert_eq!(
        report.invocation_labels().last().map(String::as_str),
        Some("cleanup")
    );
}

#[test]
fn cancel_handle_from_another_thread_cancels_the_running_job() {
    let fixture = Fixture::new();
    let handle = CancelHandle::new();
    let canceller = handle.clone();
    let driver = fixture.driver(&[]);
    let settings = fixture.settings();
    let job = job(&["sleep 30"]);

    let worker = std::thread::spawn(move || run_job_with(&driver, &job, &settings, &handle));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !fixture
        .calls()
        .iter()
        .any(|call| call == "run build_script")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "build_script never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    canceller.cancel();
    let report = worker.join().expect("the job thread ends");

    assert_eq!(report.result, JobResult::Canceled);
    assert!(report.duration < Duration::from_secs(20));
}

#[test]
fn killed_prepare_can_be_followed_by_cleanup_by_hand() {
    let fixture = Fixture::new();
    let driver = fixture.driver(&[("HJT_PREPARE_SLEEP", "30")]);
    let session =
        ExecutorSession::new(&driver, &job(&["true"]), &fixture.settings()).expect("session");
    session.run_config().expect("config succeeds");
    session.start_build().expect("dirs are computed");
    let running = session.spawn_prepare().expect("prepare starts");
    let running = running
        .wait_timeout(Duration::from_millis(300))
        .expect_err("prepare is still sleeping");

    running
        .signal_group(libc::SIGKILL)
        .expect("the group exists");
    let prepare = running.wait();
    let cleanup = session.cleanup().expect("cleanup_exec is configured");

    assert_eq!(prepare.exit, ExitInfo::Signaled(libc::SIGKILL));
    assert!(prepare
        .error
        .as_ref()
        .is_some_and(|error| error.message().ends_with("terminated with: signal: killed")));
    assert!(cleanup.succeeded());
    assert!(!session.temp_dir().exists());
}

#[test]
fn trailing_output_without_newline_is_kept_as_partial_line() {
    let fixture = Fixture::new();

    let report = run_job(
        &fixture.driver(&[]),
        &job(&["printf 'no newline at the end'"]),
        &fixture.settings(),
    );

    let line = report
        .log
        .iter()
        .find(|line| line.text.ends_with("no newline at the end"))
        .expect("the partial line is kept");
    assert!(!line.complete);
    assert_eq!(
        (line.stream, line.stage.as_str()),
        (LogStream::Work, "build_script")
    );
}

#[test]
fn file_variable_content_is_written_to_a_file_whose_path_is_exported() {
    let fixture = Fixture::new();
    let mut job = job(&["cat \"$MY_FILE\""]);
    job.variables
        .push(JobVariable::file("MY_FILE", "file-content-123"));

    let report = run_job(&fixture.driver(&[]), &job, &fixture.settings());

    assert_eq!(report.result, JobResult::Success);
    assert!(report.log_text().contains("file-content-123"));
    let build = report.invocations_of("build_script")[0];
    assert_eq!(build.env("CUSTOM_ENV_MY_FILE"), Some("file-content-123"));
    let file = fixture.path("builds/mygroup/myproject.tmp/MY_FILE");
    assert!(!file.exists(), "cleanup_file_variables removed it");
}

#[test]
fn masked_log_hides_masked_variable_values_that_the_raw_log_keeps() {
    let fixture = Fixture::new();
    let mut job = job(&["echo token=$CI_JOB_TOKEN secret=$MY_SECRET"]);
    job.variables
        .push(JobVariable::masked("MY_SECRET", "s3cr3t-value-xyz"));

    let report = run_job(&fixture.driver(&[]), &job, &fixture.settings());

    assert!(report.log_text().contains("secret=s3cr3t-value-xyz"));
    let masked = report.masked_log_text();
    assert!(
        masked.contains("token=[MASKED] secret=[MASKED]\n"),
        "{masked}"
    );
    assert!(!masked.contains("s3cr3t-value-xyz"));
}

#[test]
fn killing_a_stage_by_hand_maps_the_signal_like_the_runner() {
    let fixture = Fixture::new();
    let session = ExecutorSession::new(
        &fixture.driver(&[]),
        &job(&["echo \"$((6*7)) started\"", "sleep 30"]),
        &fixture.settings(),
    )
    .expect("session");
    session.start_build().expect("dirs are computed");
    session
        .run_stage(&hyperjob_test_harness::Stage::GetSources)
        .expect("get_sources runs")
        .expect("get_sources is never skipped");
    let running = session
        .spawn_stage(&hyperjob_test_harness::Stage::parse("build_script"))
        .expect("build_script starts");
    assert!(session.wait_for_log("42 started", Duration::from_secs(10)));

    running
        .signal_group(libc::SIGTERM)
        .expect("the group exists");
    let invocation = running.wait();
    session.cleanup();

    assert_eq!(
        invocation.argv.last().map(String::as_str),
        Some("build_script")
    );
    assert!(invocation.error.is_some());
    assert!(invocation.duration < Duration::from_secs(10));
    assert!(!session.temp_dir().exists());
}

#[test]
fn cleanup_starts_while_a_stage_ignoring_sigterm_is_still_alive() {
    let fixture = Fixture::new();
    let mut driver = fixture.driver(&[("HJT_IGNORE_TERM_STAGE", "build_script")]);
    driver.graceful_kill_timeout = Duration::from_secs(2);
    let settings = RunnerSettings {
        wait_for_build_finish_timeout: Duration::from_millis(300),
        cancel_plan: Some(CancelPlan::on_output(
            "build_script",
            "ignoring SIGTERM",
            CancelKind::Abort,
        )),
        ..fixture.settings()
    };

    let report = run_job(&driver, &job(&["true"]), &settings);

    let build = report.invocations_of("build_script")[0];
    let cleanup = report.invocations_of("cleanup")[0];
    assert!(
        cleanup.started < build.ended,
        "cleanup_exec overlapped the dying run_exec"
    );
    assert_eq!(build.exit, ExitInfo::Signaled(libc::SIGKILL));
    assert!(report
        .log_text()
        .contains("WARNING: Timed out waiting for the build to finish"));
    assert_eq!(
        report.invocation_labels().last().map(String::as_str),
        Some("cleanup")
    );
}
