//! The job flow of `common/build.go` (protocol §1.3 and §12): preparation
//! with retries, the stage sequence, cancellation, cleanup and the verdict.

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::compat::{format_go_duration, parse_go_duration};
use crate::control::{CancelHandle, Scope, StopReason, POLL};
use crate::invocation::{Invocation, InvocationKind};
use crate::job::Job;
use crate::log::{mask, LogLine, LogStream, Recorder};
use crate::script::Stage;
use crate::session::{Carry, Driver, ExecutorSession, JobError, RunnerSettings};
use crate::variables::BuildDirs;

/// How the job ended, in GitLab's terms (failure reasons in brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    Success,
    /// [script_failure] with the exit code reported to GitLab.
    BuildFailure {
        exit_code: i64,
    },
    /// [runner_system_failure].
    SystemFailure {
        message: String,
    },
    /// [config_error], e.g. an empty `builds_dir`.
    ConfigError {
        message: String,
    },
    /// [canceled].
    Canceled,
    /// [job_execution_timeout]: job, prepare, get_sources or script timeout.
    TimedOut {
        message: String,
    },
}

/// Everything observable about one job run.
#[derive(Debug, Clone)]
pub struct JobReport {
    pub result: JobResult,
    /// Text of the final "Job failed…" line, if the job failed.
    pub failure_message: Option<String>,
    /// Job log and runner log lines in arrival order.
    pub log: Vec<LogLine>,
    /// Every driver call in start order.
    pub invocations: Vec<Invocation>,
    /// config_exec's parsed JSON from the last attempt that printed any.
    pub config_output: Option<serde_json::Value>,
    /// The `custom-executor*` dir of each preparation attempt (all removed).
    pub temp_dirs: Vec<PathBuf>,
    /// Builds/project dirs of the last attempt that computed them.
    pub dirs: BuildDirs,
    /// Values of masked variables (what the runner's masker hides).
    pub masked_values: Vec<String>,
    pub duration: Duration,
}

impl JobReport {
    /// The job log as GitLab would show it (without timestamps, unmasked).
    pub fn log_text(&self) -> String {
        self.lines_of(|line| line.stream != LogStream::RunnerLog)
    }

    /// The job log with masked variable values replaced by `[MASKED]`.
    pub fn masked_log_text(&self) -> String {
        mask(&self.log_text(), &self.masked_values)
    }

    /// Lines that went only to the runner's own log (cleanup_exec output).
    pub fn runner_log_text(&self) -> String {
        self.lines_of(|line| line.stream == LogStream::RunnerLog)
    }

    fn lines_of(&self, keep: impl Fn(&LogLine) -> bool) -> String {
        let mut text = String::new();
        for line in self.log.iter().filter(|line| keep(line)) {
            text.push_str(&line.text);
            text.push('\n');
        }
        text
    }

    /// Labels of all invocations in order: `config`, `prepare`, run stage
    /// names, `cleanup`.
    pub fn invocation_labels(&self) -> Vec<String> {
        self.invocations
            .iter()
            .map(|invocation| invocation.kind.label().to_owned())
            .collect()
    }

    /// The run_exec stage names in call order.
    pub fn run_stages(&self) -> Vec<String> {
        self.invocations
            .iter()
            .filter_map(|invocation| match &invocation.kind {
                InvocationKind::Run { stage } => Some(stage.clone()),
                _ => None,
            })
            .collect()
    }

    /// All invocations with this label.
    pub fn invocations_of(&self, label: &str) -> Vec<&Invocation> {
        self.invocations
            .iter()
            .filter(|invocation| invocation.kind.label() == label)
            .collect()
    }
}

/// Runs `job` through `driver` exactly like GitLab Runner's Custom executor.
pub fn run_job(driver: &Driver, job: &Job, settings: &RunnerSettings) -> JobReport {
    run_job_with(driver, job, settings, &CancelHandle::new())
}

/// [`run_job`] with a handle another thread can cancel or abort the job with.
pub fn run_job_with(
    driver: &Driver,
    job: &Job,
    settings: &RunnerSettings,
    cancel: &CancelHandle,
) -> JobReport {
    let started = Instant::now();
    let recorder = Arc::new(Recorder::new(settings.echo_log));
    recorder.runner(
        "job",
        &format!(
            "Running with gitlab-runner {} (hyperjob-test-harness)",
            settings.identity.version
        ),
    );
    let job_timeout = Duration::from_secs(job.effective_timeout_secs());
    let job_scope = Scope::root("job", Some(job_timeout));
    cancel.attach_job(&job_scope);
    let prepare_timeout = settings
        .prepare_timeout
        .map_or(job_timeout, |timeout| timeout.min(job_timeout));
    let prepare_scope = job_scope.child("prepare", Some(prepare_timeout));

    let mut flow = Flow {
        driver,
        job,
        settings,
        cancel,
        recorder: Arc::clone(&recorder),
        temp_dirs: Vec::new(),
        config_output: None,
        dirs: BuildDirs::default(),
    };
    let outcome = match flow.prepare_executor(&prepare_scope) {
        Ok(session) => {
            let (outcome, straggler) =
                run_phase(&session, &job_scope, &prepare_scope, settings, cancel);
            session.cleanup();
            // Only for a complete report: the runner itself never waits for a
            // stage it gave up on; the kill sequence bounds this wait.
            if let Some(straggler) = straggler {
                let _ = straggler.join();
            }
            outcome
        }
        Err(error) => Err(error),
    };
    let (result, failure_message) = verdict(outcome, job_timeout, prepare_timeout, settings);
    match &failure_message {
        None => recorder.runner("job", "Job succeeded"),
        Some(message) => recorder.runner("job", &format!("ERROR: {message}")),
    }
    // Recorded when they end; a straggling stage can end after cleanup.
    let mut invocations = recorder.invocations();
    invocations.sort_by_key(|invocation| invocation.started);
    JobReport {
        result,
        failure_message,
        log: recorder.lines(),
        invocations,
        config_output: flow.config_output,
        temp_dirs: flow.temp_dirs,
        dirs: flow.dirs,
        masked_values: recorder.secrets(),
        duration: started.elapsed(),
    }
}

struct Flow<'a> {
    driver: &'a Driver,
    job: &'a Job,
    settings: &'a RunnerSettings,
    cancel: &'a CancelHandle,
    recorder: Arc<Recorder>,
    temp_dirs: Vec<PathBuf>,
    config_output: Option<serde_json::Value>,
    dirs: BuildDirs,
}

impl Flow<'_> {
    /// `retryCreateExecutor`: up to `preparation_retries` executors, each
    /// cleaned up when its preparation fails.
    fn prepare_executor(&mut self, prepare_scope: &Scope) -> Result<ExecutorSession, JobError> {
        self.recorder
            .runner("prepare", "Preparing the \"custom\" executor");
        let interval = self.settings.preparation_retry_interval;
        let mut carry = Carry::default();
        let mut last_error = JobError::System {
            message: "no preparation attempt was made".to_owned(),
        };
        for attempt in 1..=self.settings.preparation_retries.max(1) {
            let error = match self.attempt(attempt, carry.clone(), prepare_scope) {
                Ok(session) => return Ok(session),
                Err((error, next_carry)) => {
                    carry = next_carry;
                    error
                }
            };
            if !error.is_retryable_preparation_error() {
                return Err(error);
            }
            if let Some((reason, scope)) = prepare_scope.done() {
                return Err(JobError::Stopped {
                    reason,
                    scope: scope.to_owned(),
                });
            }
            self.recorder.runner(
                "prepare",
                &format!("ERROR: Preparation failed: {}", error.message()),
            );
            self.recorder.runner(
                "prepare",
                &format!("Will be retried in {} ...", format_go_duration(interval)),
            );
            last_error = error;
            if !prepare_scope.sleep(interval) {
                if let Some((reason, scope)) = prepare_scope.done() {
                    return Err(JobError::Stopped {
                        reason,
                        scope: scope.to_owned(),
                    });
                }
            }
        }
        Err(last_error)
    }

    fn attempt(
        &mut self,
        attempt: u32,
        carry: Carry,
        prepare_scope: &Scope,
    ) -> Result<ExecutorSession, (JobError, Carry)> {
        let session = ExecutorSession::create(
            self.driver,
            self.job,
            self.settings,
            attempt,
            Arc::clone(&self.recorder),
            self.cancel.clone(),
            carry.clone(),
        )
        .map_err(|error| {
            let message = format!("creating the executor temp dir: {error}");
            (JobError::System { message }, carry)
        })?;
        self.temp_dirs.push(session.temp_dir().to_path_buf());
        let result = session
            .run_config_in(prepare_scope)
            .and_then(|()| session.start_build())
            .and_then(|()| session.prepare_in(prepare_scope));
        if let Some(output) = session.config_output() {
            self.config_output = Some(output);
        }
        let next_carry = session.carry();
        if !next_carry.dirs.project_dir.is_empty() {
            self.dirs = next_carry.dirs.clone();
        }
        match result {
            Ok(()) => Ok(session),
            Err(error) => {
                session.cleanup();
                Err((error, next_carry))
            }
        }
    }
}

fn stopped((reason, scope): (StopReason, &str)) -> JobError {
    JobError::Stopped {
        reason,
        scope: scope.to_owned(),
    }
}

/// The runner's `run()`: the stages run on their own thread while this one
/// watches the job scope; after a cancel/abort/timeout it waits at most
/// `wait_for_build_finish_timeout` before moving on to cleanup.
fn run_phase(
    session: &ExecutorSession,
    job_scope: &Scope,
    prepare_scope: &Scope,
    settings: &RunnerSettings,
    cancel: &CancelHandle,
) -> (Result<(), JobError>, Option<JoinHandle<()>>) {
    let (sender, receiver) = mpsc::channel();
    let stages = StageRunner {
        session: session.clone(),
        job: job_scope.clone(),
        prepare: prepare_scope.clone(),
        settings: settings.clone(),
        cancel: cancel.clone(),
    };
    let worker = thread::spawn(move || {
        // The receiver may be gone when the runner stopped waiting.
        let _ = sender.send(stages.execute_script());
    });
    loop {
        match receiver.recv_timeout(POLL) {
            Ok(result) => {
                let _ = worker.join();
                return (
                    job_scope.done().map_or(result, |done| Err(stopped(done))),
                    None,
                );
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = worker.join();
                let message = "the stage thread ended without a result".to_owned();
                return (Err(JobError::System { message }), None);
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Some(done) = job_scope.done() {
            let error = stopped(done);
            return match receiver.recv_timeout(settings.wait_for_build_finish_timeout) {
                Ok(_) => {
                    let _ = worker.join();
                    (Err(error), None)
                }
                Err(_) => {
                    session
                        .recorder()
                        .runner_warning("job", "Timed out waiting for the build to finish");
                    (Err(error), Some(worker))
                }
            };
        }
    }
}

struct StageRunner {
    session: ExecutorSession,
    job: Scope,
    prepare: Scope,
    settings: RunnerSettings,
    cancel: CancelHandle,
}

/// An invocation's error as the stage's error.
fn invocation_result(result: Result<Option<Invocation>, JobError>) -> Result<(), JobError> {
    match result? {
        Some(Invocation {
            error: Some(error), ..
        }) => Err(error.into()),
        _ => Ok(()),
    }
}

fn is_deadline_of(scope: &Scope, name: &str) -> bool {
    matches!(scope.done(), Some((StopReason::DeadlineExceeded, ended)) if ended == name)
}

impl StageRunner {
    fn run(&self, stage: &Stage, scope: &Scope) -> Result<(), JobError> {
        invocation_result(self.session.run_stage_in(stage, scope))
    }

    /// `executeScript`.
    fn execute_script(&self) -> Result<(), JobError> {
        if let Err(error) = self.run(&Stage::PrepareScript, &self.prepare) {
            if is_deadline_of(&self.prepare, "prepare") {
                return Err(JobError::Stopped {
                    reason: StopReason::DeadlineExceeded,
                    scope: "prepare".to_owned(),
                });
            }
            return Err(wrap_prepare_error(error));
        }
        let mut result = self.get_sources();
        if let Err(JobError::Stopped { scope, .. }) = &result {
            if scope == "get_sources" {
                // A get_sources timeout ends the script phase at once.
                return result;
            }
        }
        if result.is_ok() {
            result = self.attempt_stage(&Stage::RestoreCache, &self.job, 1, false);
        }
        if result.is_ok() {
            result = self.attempt_stage(&Stage::DownloadArtifacts, &self.job, 1, false);
        }
        if result.is_ok() {
            result = self.execute_user_scripts();
        }
        let archive = self.run(
            if result.is_ok() {
                &Stage::ArchiveCache
            } else {
                &Stage::ArchiveCacheOnFailure
            },
            &self.job,
        );
        let upload = self.run(
            if result.is_ok() {
                &Stage::UploadArtifactsOnSuccess
            } else {
                &Stage::UploadArtifactsOnFailure
            },
            &self.job,
        );
        let result = result.and(archive).and(upload);
        if let Err(error) = self.run(&Stage::CleanupFileVariables, &self.job) {
            self.session.recorder().runner_log(
                "cleanup_file_variables",
                &format!(
                    "Error while executing file based variables removal script: {}",
                    error.message()
                ),
            );
        }
        result
    }

    fn get_sources(&self) -> Result<(), JobError> {
        let job_timeout = self.job_timeout();
        let timeout = self
            .settings
            .get_sources_timeout
            .map_or(job_timeout, |timeout| timeout.min(job_timeout));
        let scope = self.job.child("get_sources", Some(timeout));
        let attempts = self.session.build_settings().get_sources_attempts;
        let result = self.attempt_stage(&Stage::GetSources, &scope, attempts, true);
        if result.is_err() && is_deadline_of(&scope, "get_sources") {
            return Err(JobError::Stopped {
                reason: StopReason::DeadlineExceeded,
                scope: "get_sources".to_owned(),
            });
        }
        result
    }

    fn job_timeout(&self) -> Duration {
        Duration::from_secs(
            self.session
                .variable("CI_JOB_TIMEOUT")
                .and_then(|text| text.parse().ok())
                .unwrap_or(7200),
        )
    }

    /// `attemptExecuteStage`: retries any error, with exponential backoff;
    /// before the second try of get_sources runs clear_worktree.
    fn attempt_stage(
        &self,
        stage: &Stage,
        scope: &Scope,
        attempts: u32,
        clear_worktree: bool,
    ) -> Result<(), JobError> {
        let attempts = attempts.clamp(1, 10);
        let mut delay = self.settings.stage_retry_backoff_min;
        let mut last = Ok(());
        for index in 0..attempts {
            last = if index == 1 && clear_worktree {
                self.run(&Stage::ClearWorktree, scope)
                    .and_then(|()| self.run(stage, scope))
            } else {
                self.run(stage, scope)
            };
            let Err(error) = &last else {
                return Ok(());
            };
            if index + 1 < attempts {
                self.session.recorder().runner_warning(
                    &stage.driver_name(),
                    &format!("Retrying... error={}", error.message()),
                );
                thread::sleep(delay);
                delay = (delay * 2).min(self.settings.stage_retry_backoff_max);
            }
        }
        last
    }

    fn stage_timeout(&self, name: &str, default: Option<Duration>) -> Option<Duration> {
        let raw = self.session.variable(name).unwrap_or_default();
        if raw.trim().is_empty() {
            return default;
        }
        match parse_go_duration(&raw) {
            Some(duration) if !duration.is_zero() => Some(duration),
            Some(_) => default,
            None => {
                self.session
                    .recorder()
                    .runner_warning("job", &format!("Ignoring malformed {name} timeout: {raw}"));
                default
            }
        }
    }

    /// `executeUserScripts`: steps in order under the script scope (the one a
    /// graceful cancel stops), then after_script with the final status.
    fn execute_user_scripts(&self) -> Result<(), JobError> {
        let script_scope = self
            .job
            .child("script", self.stage_timeout("RUNNER_SCRIPT_TIMEOUT", None));
        self.cancel.attach_script(&script_scope);
        let mut result = Ok(());
        for step in self.session_steps() {
            result = self.run(&Stage::UserStep(step), &script_scope);
            if result.is_err() {
                break;
            }
        }
        let job_done = self.job.done();
        match script_scope.done() {
            Some((StopReason::Canceled, "script")) if job_done.is_none() => {
                result = Err(JobError::Stopped {
                    reason: StopReason::Canceled,
                    scope: "script".to_owned(),
                });
                self.session
                    .recorder()
                    .runner_warning("job", "script canceled externally (UI, API)");
            }
            Some((StopReason::DeadlineExceeded, "script"))
                if !matches!(job_done, Some((StopReason::DeadlineExceeded, _))) =>
            {
                result = Err(JobError::Stopped {
                    reason: StopReason::DeadlineExceeded,
                    scope: "script".to_owned(),
                });
            }
            _ => {}
        }

        let after_timeout = self.stage_timeout(
            "RUNNER_AFTER_SCRIPT_TIMEOUT",
            Some(Duration::from_secs(300)),
        );
        let after_scope = self.job.child("after_script", after_timeout);
        self.session.set_job_status(runtime_state(&result));
        if let Err(error) = self.run(&Stage::AfterScript, &after_scope) {
            let job_deadline = matches!(self.job.done(), Some((StopReason::DeadlineExceeded, _)));
            if !job_deadline {
                if self.session.build_settings().after_script_ignore_errors {
                    self.session.recorder().runner_warning(
                        "after_script",
                        &format!(
                            "after_script failed, but job will continue unaffected: {}",
                            error.message()
                        ),
                    );
                } else if result.is_ok() {
                    result = Err(error);
                }
            }
        }
        result
    }

    fn session_steps(&self) -> Vec<String> {
        self.session
            .job_steps()
            .into_iter()
            .filter(|name| name != "after_script")
            .collect()
    }
}

/// `runtimeStateAndError`: the value of `CI_JOB_STATUS` for after_script.
fn runtime_state(result: &Result<(), JobError>) -> &'static str {
    match result {
        Ok(()) => "success",
        Err(JobError::Stopped {
            reason: StopReason::Canceled,
            ..
        }) => "canceled",
        Err(JobError::Stopped {
            reason: StopReason::DeadlineExceeded,
            ..
        }) => "timedout",
        Err(_) => "failed",
    }
}

fn wrap_prepare_error(error: JobError) -> JobError {
    let wrap = |message: String| {
        format!(
            "prepare environment: {message}. Check https://docs.gitlab.com/runner/shells/#shell-profile-loading for more information"
        )
    };
    match error {
        JobError::Build { exit_code, message } => JobError::Build {
            exit_code,
            message: wrap(message),
        },
        JobError::Config { message } => JobError::Config {
            message: wrap(message),
        },
        JobError::System { message } => JobError::System {
            message: wrap(message),
        },
        stopped @ JobError::Stopped { .. } => stopped,
    }
}

/// `setTraceStatus`: the job result and the final log line's text.
fn verdict(
    outcome: Result<(), JobError>,
    job_timeout: Duration,
    prepare_timeout: Duration,
    settings: &RunnerSettings,
) -> (JobResult, Option<String>) {
    let error = match outcome {
        Ok(()) => return (JobResult::Success, None),
        Err(error) => error,
    };
    match error {
        JobError::Build { exit_code, message } => (
            JobResult::BuildFailure { exit_code },
            Some(format!("Job failed: {message}")),
        ),
        JobError::Config { message } => (
            JobResult::ConfigError {
                message: message.clone(),
            },
            Some(format!("Job failed: {message}")),
        ),
        JobError::System { message } => (
            JobResult::SystemFailure {
                message: message.clone(),
            },
            Some(format!("Job failed (system failure): {message}")),
        ),
        JobError::Stopped {
            reason: StopReason::Canceled,
            ..
        } => (JobResult::Canceled, Some("Job failed: canceled".to_owned())),
        JobError::Stopped {
            reason: StopReason::DeadlineExceeded,
            scope,
        } => {
            let message = match scope.as_str() {
                "prepare" => format!(
                    "prepare timeout: exceeded timeout of {}",
                    format_go_duration(prepare_timeout)
                ),
                "get_sources" => format!(
                    "get sources timeout: exceeded timeout of {}",
                    format_go_duration(
                        settings
                            .get_sources_timeout
                            .unwrap_or(job_timeout)
                            .min(job_timeout)
                    )
                ),
                "script" => "script timeout: context deadline exceeded".to_owned(),
                _ => format!(
                    "execution took longer than {} seconds",
                    format_go_duration(job_timeout)
                ),
            };
            (
                JobResult::TimedOut {
                    message: message.clone(),
                },
                Some(format!("Job failed: {message}")),
            )
        }
    }
}
