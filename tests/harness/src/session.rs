//! One preparation attempt's executor (the runner's `custom.executor`): its
//! temp dir, `JOB_RESPONSE_FILE`, environment composition, and the calls of
//! config_exec, prepare_exec, run_exec and cleanup_exec. [`crate::run_job`]
//! drives it; tests can also drive it by hand.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::compat::{path_clean, path_join, UrlParts};
use crate::config::{parse_config_output, startup_message, DriverInfo};
use crate::control::{CancelHandle, CancelPlan, Scope, StopReason};
use crate::exit::{map_exit_status, ExitInfo, InvocationError};
use crate::invocation::{Invocation, InvocationKind};
use crate::job::{Job, JobVariable};
use crate::log::{LogLine, LogStream, Recorder};
use crate::process::{self, KillTimeouts, ProcessOutcome, ProcessRequest, Running, Sink};
use crate::script::{
    generate_script, GitSource, RunnerHooks, ScriptContext, ScriptFormat, ScriptShell, Stage,
};
use crate::variables::{
    all_variables, build_settings, overwrite_first, BuildDirs, BuildSettings, GitStrategy,
    RunnerIdentity,
};

/// `[runners.custom]`: the driver executables, their arguments and timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Driver {
    pub config_exec: Option<PathBuf>,
    pub config_args: Vec<String>,
    pub config_exec_timeout: Duration,
    pub prepare_exec: Option<PathBuf>,
    pub prepare_args: Vec<String>,
    pub prepare_exec_timeout: Duration,
    pub run_exec: PathBuf,
    pub run_args: Vec<String>,
    pub cleanup_exec: Option<PathBuf>,
    pub cleanup_args: Vec<String>,
    pub cleanup_exec_timeout: Duration,
    /// SIGTERM → SIGKILL delay, for every invocation (runner default 600 s).
    pub graceful_kill_timeout: Duration,
    /// How long to wait after SIGKILL before giving up (runner default 10 s).
    pub force_kill_timeout: Duration,
    /// Added to this process's environment for every invocation, i.e. the
    /// runner's own environment (e.g. `HYPERJOB_CONFIG`).
    pub env: Vec<(String, String)>,
}

impl Driver {
    /// One executable for all four stages with `config`, `prepare`, `run`
    /// and `cleanup` as first argument (hyperjob's layout).
    pub fn single_binary(program: impl Into<PathBuf>) -> Self {
        let program = program.into();
        Self {
            config_exec: Some(program.clone()),
            config_args: vec!["config".to_owned()],
            prepare_exec: Some(program.clone()),
            prepare_args: vec!["prepare".to_owned()],
            run_args: vec!["run".to_owned()],
            cleanup_exec: Some(program.clone()),
            cleanup_args: vec!["cleanup".to_owned()],
            ..Self::run_only(program)
        }
    }

    /// Only `run_exec` configured (the minimal valid `[runners.custom]`).
    pub fn run_only(program: impl Into<PathBuf>) -> Self {
        Self {
            config_exec: None,
            config_args: Vec::new(),
            config_exec_timeout: Duration::from_secs(3600),
            prepare_exec: None,
            prepare_args: Vec::new(),
            prepare_exec_timeout: Duration::from_secs(3600),
            run_exec: program.into(),
            run_args: Vec::new(),
            cleanup_exec: None,
            cleanup_args: Vec::new(),
            cleanup_exec_timeout: Duration::from_secs(3600),
            graceful_kill_timeout: Duration::from_secs(600),
            force_kill_timeout: Duration::from_secs(10),
            env: Vec::new(),
        }
    }

    /// Adds a variable to the driver's (runner's) environment.
    #[must_use]
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// `[[runners]]` settings plus the knobs the harness adds for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerSettings {
    /// `builds_dir`; required unless config_exec provides it.
    pub builds_dir: Option<String>,
    /// `cache_dir`; required unless config_exec provides it.
    pub cache_dir: Option<String>,
    /// `shell` (`bash` when unset).
    pub shell: Option<String>,
    /// Whose script wrapper to write: runner 19.1+ (default) or 17.4–19.0.
    pub script_format: ScriptFormat,
    /// `[runners.custom_build_dir] enabled` (allows `GIT_CLONE_PATH`).
    pub custom_build_dir_enabled: bool,
    pub identity: RunnerIdentity,
    pub hooks: RunnerHooks,
    /// `PreparationRetries` (3).
    pub preparation_retries: u32,
    /// `PreparationRetryInterval` (3 s).
    pub preparation_retry_interval: Duration,
    /// `prepare_timeout` (capped at the job timeout).
    pub prepare_timeout: Option<Duration>,
    /// `get_sources_timeout` (capped at the job timeout).
    pub get_sources_timeout: Option<Duration>,
    /// Stage retry backoff (`DefaultStageRetryBackoffMin/Max`: 5 s, 5 min).
    pub stage_retry_backoff_min: Duration,
    pub stage_retry_backoff_max: Duration,
    /// `WaitForBuildFinishTimeout` (5 min): how long the runner waits for a
    /// killed stage before it moves on to cleanup_exec anyway.
    pub wait_for_build_finish_timeout: Duration,
    /// Where the per-attempt `custom-executor*` dirs are created (the
    /// runner's `$TMPDIR`); `None` = this process's temp dir.
    pub temp_root: Option<PathBuf>,
    /// Print the job log to this process's stdout as it arrives (masked).
    pub echo_log: bool,
    /// Cancel the job while a given invocation runs.
    pub cancel_plan: Option<CancelPlan>,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        Self {
            builds_dir: None,
            cache_dir: None,
            shell: None,
            script_format: ScriptFormat::Current,
            custom_build_dir_enabled: false,
            identity: RunnerIdentity::default(),
            hooks: RunnerHooks::default(),
            preparation_retries: 3,
            preparation_retry_interval: Duration::from_secs(3),
            prepare_timeout: None,
            get_sources_timeout: None,
            stage_retry_backoff_min: Duration::from_secs(5),
            stage_retry_backoff_max: Duration::from_secs(300),
            wait_for_build_finish_timeout: Duration::from_secs(300),
            temp_root: None,
            echo_log: false,
            cancel_plan: None,
        }
    }
}

impl RunnerSettings {
    /// Settings for a local run: builds and cache dirs below `root`, and
    /// retry delays shrunk so failure paths are fast.
    pub fn local(root: &Path) -> Self {
        Self {
            builds_dir: Some(root.join("builds").to_string_lossy().into_owned()),
            cache_dir: Some(root.join("cache").to_string_lossy().into_owned()),
            preparation_retry_interval: Duration::from_millis(10),
            stage_retry_backoff_min: Duration::from_millis(10),
            stage_retry_backoff_max: Duration::from_millis(50),
            ..Self::default()
        }
    }
}

/// Why a preparation step or stage failed, in the runner's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// `BuildError` / `script_failure`: not retried by the preparation loop.
    Build { exit_code: i64, message: String },
    /// `BuildError` / `config_error`: not retried.
    Config { message: String },
    /// Anything else: the preparation loop retries it.
    System { message: String },
    /// The job, prepare, script or invocation scope ended.
    Stopped { reason: StopReason, scope: String },
}

impl JobError {
    pub fn message(&self) -> String {
        match self {
            Self::Build { message, .. } | Self::Config { message } | Self::System { message } => {
                message.clone()
            }
            Self::Stopped { reason, scope } => format!("{scope} scope ended: {reason:?}"),
        }
    }

    pub(crate) fn is_retryable_preparation_error(&self) -> bool {
        matches!(self, Self::System { .. })
    }
}

impl From<InvocationError> for JobError {
    fn from(error: InvocationError) -> Self {
        match error {
            InvocationError::Build { exit_code, message } => Self::Build { exit_code, message },
            InvocationError::System { message } => Self::System { message },
        }
    }
}

#[derive(Debug)]
struct State {
    dirs: BuildDirs,
    build_settings: BuildSettings,
    variables: Vec<JobVariable>,
    job_env: Vec<(String, String)>,
    hostname: String,
    builds_dir: Option<String>,
    cache_dir: Option<String>,
    shared_builds_dir: bool,
    shell: Option<String>,
    script_shell: ScriptShell,
    driver_info: Option<DriverInfo>,
    config_output: Option<serde_json::Value>,
}

#[derive(Debug)]
struct Shared {
    driver: Driver,
    job: Job,
    settings: RunnerSettings,
    attempt: u32,
    temp_dir: PathBuf,
    response_file: PathBuf,
    exit_code_file: PathBuf,
    recorder: Arc<Recorder>,
    cancel: CancelHandle,
    /// When this executor was created: log lines before it belong to others.
    created: Instant,
    state: Mutex<State>,
}

impl Drop for Shared {
    /// The runner removes an executor's temporary directory (with the job response file and
    /// every stage's script) when it is done with the executor; so does the harness when the
    /// last handle to a session goes, also in tests that never call cleanup_exec.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.temp_dir);
    }
}

/// One preparation attempt's executor. Cloning shares it.
#[derive(Debug, Clone)]
pub struct ExecutorSession {
    shared: Arc<Shared>,
}

/// Carried from one preparation attempt to the next, like fields of the
/// runner's `Build` object that outlive an executor.
#[derive(Debug, Clone, Default)]
pub(crate) struct Carry {
    pub dirs: BuildDirs,
    pub hostname: String,
}

#[derive(Serialize)]
struct ServiceJson {
    name: String,
    alias: String,
    entrypoint: Option<Vec<String>>,
    command: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    variables: Option<BTreeMap<String, String>>,
}

/// Whether `path` lies inside `root` (the runner's `filepath.Rel` check).
fn is_within(path: &str, root: &str) -> bool {
    let (path, root) = (path_clean(path), path_clean(root));
    path == root || path.starts_with(&format!("{}/", root.trim_end_matches('/')))
}

fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

fn write_script_file(temp_dir: &Path, script: &str) -> std::io::Result<PathBuf> {
    let script_dir = tempfile::Builder::new()
        .prefix("script")
        .tempdir_in(temp_dir)?
        .keep();
    let path = script_dir.join("script");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o700)
        .open(&path)?;
    file.write_all(script.as_bytes())?;
    Ok(path)
}

impl ExecutorSession {
    /// A fresh executor for attempt 1: creates `custom-executor*` and writes
    /// `response.json` (0600). Nothing is invoked yet.
    pub fn new(driver: &Driver, job: &Job, settings: &RunnerSettings) -> std::io::Result<Self> {
        let recorder = Arc::new(Recorder::new(settings.echo_log));
        Self::create(
            driver,
            job,
            settings,
            1,
            recorder,
            CancelHandle::new(),
            Carry::default(),
        )
    }

    pub(crate) fn create(
        driver: &Driver,
        job: &Job,
        settings: &RunnerSettings,
        attempt: u32,
        recorder: Arc<Recorder>,
        cancel: CancelHandle,
        carry: Carry,
    ) -> std::io::Result<Self> {
        let root = settings
            .temp_root
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let temp_dir = tempfile::Builder::new()
            .prefix("custom-executor")
            .tempdir_in(root)?
            .keep();
        let response_file = temp_dir.join("response.json");
        let bytes = job.response_file_bytes().map_err(std::io::Error::other)?;
        write_private_file(&response_file, &bytes)?;
        let build_settings = build_settings(job, &settings.identity, &carry.dirs);
        let variables = all_variables(job, &settings.identity, &carry.dirs, &build_settings);
        recorder.set_secrets(
            variables
                .iter()
                .filter(|variable| variable.masked)
                .map(|variable| variable.value.clone())
                .collect(),
        );
        Ok(Self {
            shared: Arc::new(Shared {
                driver: driver.clone(),
                job: job.clone(),
                settings: settings.clone(),
                attempt,
                exit_code_file: temp_dir.join("build_exit_code"),
                temp_dir,
                response_file,
                recorder,
                cancel,
                created: Instant::now(),
                state: Mutex::new(State {
                    dirs: carry.dirs,
                    build_settings,
                    variables,
                    job_env: Vec::new(),
                    hostname: carry.hostname,
                    builds_dir: None,
                    cache_dir: None,
                    shared_builds_dir: false,
                    shell: None,
                    script_shell: ScriptShell::Bash,
                    driver_info: None,
                    config_output: None,
                }),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update; the
        // data is still the best record there is.
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn carry(&self) -> Carry {
        let state = self.state();
        Carry {
            dirs: state.dirs.clone(),
            hostname: state.hostname.clone(),
        }
    }

    pub(crate) fn recorder(&self) -> &Arc<Recorder> {
        &self.shared.recorder
    }

    /// The per-attempt temp dir (driver cwd and `TMPDIR`).
    pub fn temp_dir(&self) -> &Path {
        &self.shared.temp_dir
    }

    /// `JOB_RESPONSE_FILE`.
    pub fn response_file(&self) -> &Path {
        &self.shared.response_file
    }

    /// `BUILD_EXIT_CODE_FILE` (never created by the runner).
    pub fn build_exit_code_file(&self) -> &Path {
        &self.shared.exit_code_file
    }

    pub fn attempt(&self) -> u32 {
        self.shared.attempt
    }

    /// `CI_BUILDS_DIR` / `CI_PROJECT_DIR` as currently computed.
    pub fn dirs(&self) -> BuildDirs {
        self.state().dirs.clone()
    }

    /// `GetAllVariables()` as currently computed.
    pub fn variables(&self) -> Vec<JobVariable> {
        self.state().variables.clone()
    }

    /// Parsed config_exec stdout, if config_exec printed anything valid.
    pub fn config_output(&self) -> Option<serde_json::Value> {
        self.state().config_output.clone()
    }

    pub fn invocations(&self) -> Vec<Invocation> {
        self.shared.recorder.invocations()
    }

    pub fn log(&self) -> Vec<LogLine> {
        self.shared.recorder.lines()
    }

    /// Waits until a log line (any stage, any stream) contains `needle`;
    /// false when `timeout` passes first. For acting on a condition (a stage
    /// printed "started") instead of after a guessed delay.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let since = self.shared.created;
        loop {
            if self.shared.recorder.has_line(None, since, needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(crate::control::POLL);
        }
    }

    fn refresh_variables(&self, state: &mut State) {
        let identity = &self.shared.settings.identity;
        state.build_settings = build_settings(&self.shared.job, identity, &state.dirs);
        state.variables = all_variables(
            &self.shared.job,
            identity,
            &state.dirs,
            &state.build_settings,
        );
    }

    /// Overwrites `CI_JOB_STATUS` in the cached variable list, as the runner
    /// does before after_script (it stays for the later invocations).
    pub fn set_job_status(&self, status: &str) {
        overwrite_first(&mut self.state().variables, "CI_JOB_STATUS", status);
    }

    fn services_json(&self, variables: &[JobVariable]) -> String {
        let services = &self.shared.job.services;
        if services.is_empty() {
            return String::new();
        }
        let entries: Vec<ServiceJson> = services
            .iter()
            .map(|service| ServiceJson {
                name: service.name.clone(),
                alias: service
                    .alias
                    .replace(',', " ")
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_owned(),
                entrypoint: service.entrypoint.clone(),
                command: service.command.clone(),
                variables: (!service.variables.is_empty()).then(|| {
                    let mut source = variables.to_vec();
                    source.extend(service.variables.iter().cloned());
                    let expanded = crate::variables::expand_all(&source);
                    service
                        .variables
                        .iter()
                        .map(|variable| {
                            let value = crate::variables::value_of(&expanded, &variable.key)
                                .unwrap_or("")
                                .to_owned();
                            (variable.key.clone(), value)
                        })
                        .collect()
                }),
            })
            .collect();
        serde_json::to_string(&entries).unwrap_or_default()
    }

    /// What the runner adds to its own environment for every invocation:
    /// fixed variables, `job_env`, `CUSTOM_ENV_*`, `CUSTOM_ENV_CI_JOB_SERVICES`.
    pub fn added_env(&self) -> Vec<(String, String)> {
        let state = self.state();
        let temp_dir = self.shared.temp_dir.to_string_lossy().into_owned();
        let mut env = vec![
            ("TMPDIR".to_owned(), temp_dir),
            ("BUILD_FAILURE_EXIT_CODE".to_owned(), "1".to_owned()),
            ("SYSTEM_FAILURE_EXIT_CODE".to_owned(), "2".to_owned()),
            (
                "BUILD_EXIT_CODE_FILE".to_owned(),
                self.shared.exit_code_file.to_string_lossy().into_owned(),
            ),
            (
                "JOB_RESPONSE_FILE".to_owned(),
                self.shared.response_file.to_string_lossy().into_owned(),
            ),
        ];
        env.extend(state.job_env.iter().cloned());
        env.extend(state.variables.iter().map(|variable| {
            (
                format!("CUSTOM_ENV_{}", variable.key),
                variable.value.clone(),
            )
        }));
        env.push((
            "CUSTOM_ENV_CI_JOB_SERVICES".to_owned(),
            self.services_json(&state.variables),
        ));
        env
    }

    fn full_env(&self, added: &[(String, String)]) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        env.extend(
            self.shared
                .driver
                .env
                .iter()
                .map(|(key, value)| (OsString::from(key), OsString::from(value))),
        );
        env.extend(
            added
                .iter()
                .map(|(key, value)| (OsString::from(key), OsString::from(value))),
        );
        env
    }

    fn argv(
        &self,
        kind: &InvocationKind,
        script_path: Option<&Path>,
    ) -> Option<(PathBuf, Vec<String>)> {
        let driver = &self.shared.driver;
        match kind {
            InvocationKind::Config => driver
                .config_exec
                .clone()
                .map(|program| (program, driver.config_args.clone())),
            InvocationKind::Prepare => driver
                .prepare_exec
                .clone()
                .map(|program| (program, driver.prepare_args.clone())),
            InvocationKind::Cleanup => driver
                .cleanup_exec
                .clone()
                .map(|program| (program, driver.cleanup_args.clone())),
            InvocationKind::Run { stage } => {
                let mut args = driver.run_args.clone();
                args.push(
                    script_path
                        .map(|path| path.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
                args.push(stage.clone());
                Some((driver.run_exec.clone(), args))
            }
        }
    }

    fn sinks(kind: &InvocationKind) -> (Sink, Sink) {
        let log = |stream| Sink::Log {
            stream,
            stage: kind.label().to_owned(),
        };
        match kind {
            InvocationKind::Config => (Sink::Capture, log(LogStream::Executor)),
            InvocationKind::Prepare => (log(LogStream::Executor), log(LogStream::Executor)),
            InvocationKind::Run { .. } => (log(LogStream::Work), log(LogStream::Work)),
            InvocationKind::Cleanup => (log(LogStream::RunnerLog), log(LogStream::RunnerLog)),
        }
    }

    fn start(
        &self,
        kind: InvocationKind,
        script: Option<String>,
    ) -> Result<RunningInvocation, JobError> {
        let script_path = match &script {
            Some(text) => Some(write_script_file(&self.shared.temp_dir, text).map_err(
                |error| JobError::System {
                    message: format!("writing the stage script: {error}"),
                },
            )?),
            None => None,
        };
        let Some((program, args)) = self.argv(&kind, script_path.as_deref()) else {
            return Err(JobError::System {
                message: format!("no {}_exec configured", kind.label()),
            });
        };
        let added_env = self.added_env();
        let (stdout, stderr) = Self::sinks(&kind);
        let mut argv = vec![program.to_string_lossy().into_owned()];
        argv.extend(args.iter().cloned());
        let request = ProcessRequest {
            program,
            args,
            cwd: self.shared.temp_dir.clone(),
            env: self.full_env(&added_env),
            stdout,
            stderr,
        };
        let started = Instant::now();
        let running = process::spawn(request, &self.shared.recorder);
        Ok(RunningInvocation {
            session: self.clone(),
            kind,
            argv,
            script,
            added_env,
            started,
            running,
        })
    }

    fn kill_timeouts(&self) -> KillTimeouts {
        KillTimeouts {
            graceful: self.shared.driver.graceful_kill_timeout,
            force: self.shared.driver.force_kill_timeout,
        }
    }

    /// Starts and waits for one invocation, stopping it when `scope` (plus an
    /// optional per-invocation timeout) ends.
    fn invoke(
        &self,
        kind: InvocationKind,
        script: Option<String>,
        scope: &Scope,
        timeout: Option<Duration>,
    ) -> Result<(Invocation, Vec<u8>), JobError> {
        let scope = scope.child("invocation", timeout);
        let plan = self
            .shared
            .settings
            .cancel_plan
            .clone()
            .filter(|plan| plan.stage == kind.label());
        let handle = self.shared.cancel.clone();
        let label = kind.label().to_owned();
        let running = self.start(kind, script)?;
        let started = running.started;
        let recorder = Arc::clone(&self.shared.recorder);
        let mut plan_fired = false;
        let mut should_stop = || {
            if let Some(plan) = plan.as_ref().filter(|_| !plan_fired) {
                let printed = plan
                    .after_output
                    .as_deref()
                    .is_none_or(|text| recorder.has_line(Some(&label), started, text));
                if started.elapsed() >= plan.after && printed {
                    plan_fired = true;
                    handle.trigger(plan.kind);
                }
            }
            scope.done().map(|(reason, name)| (reason, name.to_owned()))
        };
        let kill = self.kill_timeouts();
        Ok(running.finish_with(|process| process.wait_controlled(&mut should_stop, kill)))
    }

    /// Runs config_exec (if configured), parses and applies its JSON and
    /// logs "Using Custom executor…".
    pub fn run_config(&self) -> Result<(), JobError> {
        self.run_config_in(&Scope::root("prepare", None))
    }

    pub(crate) fn run_config_in(&self, scope: &Scope) -> Result<(), JobError> {
        if self.shared.driver.config_exec.is_some() {
            {
                let mut state = self.state();
                self.refresh_variables(&mut state);
            }
            let timeout = self.shared.driver.config_exec_timeout;
            let (invocation, stdout) =
                self.invoke(InvocationKind::Config, None, scope, Some(timeout))?;
            if let Some(error) = invocation.error {
                return Err(error.into());
            }
            let parsed =
                parse_config_output(&stdout).map_err(|message| JobError::System { message })?;
            if let Some(config) = parsed {
                let mut state = self.state();
                state.config_output = serde_json::from_slice(&stdout).ok();
                if let Some(hostname) = config.hostname {
                    state.hostname = hostname;
                }
                if let Some(builds_dir) = config.builds_dir {
                    state.builds_dir = Some(builds_dir);
                }
                if let Some(cache_dir) = config.cache_dir {
                    state.cache_dir = Some(cache_dir);
                }
                if let Some(shared) = config.builds_dir_is_shared {
                    state.shared_builds_dir = shared;
                }
                state.driver_info = config.driver;
                if let Some(job_env) = config.job_env {
                    state.job_env = job_env.into_iter().collect();
                }
                if let Some(shell) = config.shell {
                    state.shell = Some(shell);
                }
            }
        }
        let message = startup_message(self.state().driver_info.as_ref());
        self.shared.recorder.runner("prepare", &message);
        Ok(())
    }

    fn project_slug(&self) -> Option<String> {
        let url = UrlParts::parse(&self.shared.job.repo_url)?;
        if url.host.is_empty() {
            return None;
        }
        let path = url.path.strip_suffix(".git").unwrap_or(&url.path);
        let slug = path_clean(path);
        (slug != "." && !slug.contains("..")).then_some(slug)
    }

    /// The runner's `StartBuild` + shell selection: computes `CI_BUILDS_DIR`
    /// and `CI_PROJECT_DIR` from builds_dir (config_exec's, else the runner's).
    pub fn start_build(&self) -> Result<(), JobError> {
        let settings = &self.shared.settings;
        let mut state = self.state();
        let root = state
            .builds_dir
            .clone()
            .or_else(|| settings.builds_dir.clone())
            .unwrap_or_default();
        if root.is_empty() {
            return Err(JobError::Config {
                message: "the builds_dir is not configured".to_owned(),
            });
        }
        let cache = state
            .cache_dir
            .clone()
            .or_else(|| settings.cache_dir.clone())
            .unwrap_or_default();
        if cache.is_empty() {
            return Err(JobError::Config {
                message: "the cache_dir is not configured".to_owned(),
            });
        }
        state.dirs.builds_dir = root.clone();
        self.refresh_variables(&mut state);

        let mut unique = self
            .project_slug()
            .unwrap_or_else(|| format!("project-{}", self.shared.job.project_id));
        if state.shared_builds_dir {
            let identity = &settings.identity;
            unique = path_join(&[
                &identity.short_token,
                &identity.concurrent_project_id.to_string(),
                &unique,
            ]);
        }
        if state.build_settings.git_strategy == GitStrategy::Empty {
            unique.push_str("-empty");
        }
        let clone_path = state.build_settings.git_clone_path.clone();
        state.dirs.project_dir = if clone_path.is_empty() {
            path_join(&[&root, &unique])
        } else if !settings.custom_build_dir_enabled {
            return Err(JobError::Config {
                message: "setting GIT_CLONE_PATH is not allowed, enable `custom_build_dir` feature"
                    .to_owned(),
            });
        } else if !is_within(&clone_path, &root) {
            return Err(JobError::Config {
                message: format!("the GIT_CLONE_PATH={clone_path:?} has to be within {root:?}"),
            });
        } else {
            path_clean(&clone_path)
        };
        self.refresh_variables(&mut state);

        let shell = state.shell.clone().filter(|shell| !shell.is_empty());
        let shell = shell
            .or_else(|| settings.shell.clone())
            .unwrap_or_else(|| "bash".to_owned());
        state.script_shell = match shell.as_str() {
            "bash" => ScriptShell::Bash,
            "sh" => ScriptShell::Sh,
            "pwsh" | "powershell" => {
                return Err(JobError::Config {
                    message: format!(
                        "shell {shell} is valid for the runner but not supported by the harness"
                    ),
                })
            }
            other => {
                return Err(JobError::System {
                    message: format!("shell {other} not found"),
                })
            }
        };
        Ok(())
    }

    /// Runs prepare_exec (if configured).
    pub fn prepare(&self) -> Result<(), JobError> {
        self.prepare_in(&Scope::root("prepare", None))
    }

    pub(crate) fn prepare_in(&self, scope: &Scope) -> Result<(), JobError> {
        if self.shared.driver.prepare_exec.is_none() {
            return Ok(());
        }
        let timeout = self.shared.driver.prepare_exec_timeout;
        let (invocation, _) = self.invoke(InvocationKind::Prepare, None, scope, Some(timeout))?;
        invocation.error.map_or(Ok(()), |error| Err(error.into()))
    }

    /// Starts prepare_exec without waiting, e.g. to kill it mid-way.
    pub fn spawn_prepare(&self) -> Result<RunningInvocation, JobError> {
        self.start(InvocationKind::Prepare, None)
    }

    /// The script the runner would pass for `stage` now, or `None` when the
    /// runner would skip the stage.
    pub fn script_for(&self, stage: &Stage) -> Result<Option<String>, JobError> {
        let context = self.script_context();
        generate_script(stage, &context).map_err(|error| JobError::System {
            message: error.to_string(),
        })
    }

    fn script_context(&self) -> ScriptContext {
        let state = self.state();
        let job = &self.shared.job;
        let identity = &self.shared.settings.identity;
        ScriptContext {
            shell: state.script_shell,
            format: self.shared.settings.script_format,
            variables: state.variables.clone(),
            dirs: state.dirs.clone(),
            hostname: state.hostname.clone(),
            steps: job.payload_steps(),
            settings: state.build_settings.clone(),
            git: GitSource {
                repo_url: job.repo_url.clone(),
                server_url: job.server_url.clone(),
                token: job.token.clone(),
                git_ref: job.git_ref.clone(),
                sha: job.sha.clone(),
                refspecs: job.refspecs.clone(),
                depth: job.depth,
                correlation_id: job.correlation_id.clone(),
                user_agent: format!("gitlab-runner {} {}", identity.version, identity.arch),
            },
            hooks: self.shared.settings.hooks.clone(),
            trace_sections: true,
            job_name: job.name.clone(),
            cache_dir: state
                .cache_dir
                .clone()
                .or_else(|| self.shared.settings.cache_dir.clone())
                .filter(|dir| !dir.is_empty())
                .map(|dir| {
                    let unique = self
                        .project_slug()
                        .unwrap_or_else(|| format!("project-{}", job.project_id));
                    path_join(&[&dir, &unique])
                })
                .unwrap_or_default(),
            cache: job.cache.clone(),
            artifacts: job.artifacts.clone(),
        }
    }

    /// Runs one stage through run_exec (the runner's `executeStage`):
    /// `Ok(None)` when the stage is skipped without a call.
    pub fn run_stage(&self, stage: &Stage) -> Result<Option<Invocation>, JobError> {
        self.run_stage_in(stage, &Scope::root("job", None))
    }

    pub(crate) fn run_stage_in(
        &self,
        stage: &Stage,
        scope: &Scope,
    ) -> Result<Option<Invocation>, JobError> {
        if let Some((reason, name)) = scope.done() {
            return Err(JobError::Stopped {
                reason,
                scope: name.to_owned(),
            });
        }
        let Some(script) = self.script_for(stage)? else {
            return Ok(None);
        };
        let recorder = &self.shared.recorder;
        recorder.runner(&stage.driver_name(), &stage.description());
        if stage.internal_name() == "step_script" {
            recorder.runner_warning(
                "build_script",
                "Starting with version 17.0 the 'build_script' stage will be replaced with 'step_script': https://gitlab.com/groups/gitlab-org/-/epics/6112",
            );
        }
        let kind = InvocationKind::Run {
            stage: stage.driver_name(),
        };
        let (invocation, _) = self.invoke(kind, Some(script), scope, None)?;
        Ok(Some(invocation))
    }

    /// Starts run_exec for `stage` without waiting.
    pub fn spawn_stage(&self, stage: &Stage) -> Result<RunningInvocation, JobError> {
        let script = self.script_for(stage)?.ok_or_else(|| JobError::System {
            message: format!("stage {} would be skipped", stage.driver_name()),
        })?;
        self.start(
            InvocationKind::Run {
                stage: stage.driver_name(),
            },
            Some(script),
        )
    }

    /// The runner's `executor.Cleanup()`: cleanup_exec (if configured) under
    /// its own timeout only, then the temp dir is removed.
    pub fn cleanup(&self) -> Option<Invocation> {
        let invocation = if self.shared.driver.cleanup_exec.is_some() {
            let scope = Scope::root("cleanup", None);
            let timeout = self.shared.driver.cleanup_exec_timeout;
            match self.invoke(InvocationKind::Cleanup, None, &scope, Some(timeout)) {
                Ok((invocation, _)) => {
                    if let Some(error) = &invocation.error {
                        self.shared
                            .recorder
                            .runner_warning("cleanup", &format!("Cleanup script failed: {error}"));
                    }
                    Some(invocation)
                }
                Err(error) => {
                    self.shared.recorder.runner_warning(
                        "cleanup",
                        &format!("Cleanup script failed: {}", error.message()),
                    );
                    None
                }
            }
        } else {
            None
        };
        // Removal is best effort in the runner too (`os.RemoveAll`, error ignored).
        let _ = std::fs::remove_dir_all(&self.shared.temp_dir);
        invocation
    }

    /// Payload step names in order (`script`, `release`, …, `after_script`).
    pub(crate) fn job_steps(&self) -> Vec<String> {
        self.shared
            .job
            .payload_steps()
            .into_iter()
            .map(|step| step.name)
            .collect()
    }

    pub(crate) fn build_settings(&self) -> BuildSettings {
        self.state().build_settings.clone()
    }

    pub(crate) fn variable(&self, key: &str) -> Option<String> {
        crate::variables::value_of(&self.state().variables, key).map(str::to_owned)
    }
}

/// A driver invocation that is running; see [`ExecutorSession::spawn_prepare`].
#[derive(Debug)]
pub struct RunningInvocation {
    session: ExecutorSession,
    kind: InvocationKind,
    argv: Vec<String>,
    script: Option<String>,
    added_env: Vec<(String, String)>,
    started: Instant,
    running: Result<Running, ExitInfo>,
}

impl RunningInvocation {
    /// The driver's pid, which is also its process group id.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().ok().map(Running::pid)
    }

    /// Sends `signal` to the driver's whole process group.
    pub fn signal_group(&self, signal: i32) -> std::io::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        process::signal_process_group(pid, signal)
    }

    /// Waits for the end and records the invocation.
    pub fn wait(self) -> Invocation {
        self.finish_with(Running::wait).0
    }

    /// Waits up to `timeout`; gives the invocation back if still running.
    pub fn wait_timeout(self, timeout: Duration) -> Result<Invocation, Box<Self>> {
        let outcome = match &self.running {
            Ok(running) => running.wait_timeout(timeout),
            Err(_) => None,
        };
        match (outcome, &self.running) {
            (Some(outcome), _) => Ok(self.record(outcome).0),
            (None, Err(_)) => Ok(self.wait()),
            (None, Ok(_)) => Err(Box::new(self)),
        }
    }

    fn finish_with(
        mut self,
        wait: impl FnOnce(Running) -> ProcessOutcome,
    ) -> (Invocation, Vec<u8>) {
        let placeholder = Err(ExitInfo::StartFailed(String::new()));
        let outcome = match std::mem::replace(&mut self.running, placeholder) {
            Ok(running) => wait(running),
            Err(exit) => ProcessOutcome {
                exit,
                captured_stdout: Vec::new(),
                termination: None,
            },
        };
        self.record(outcome)
    }

    fn record(self, outcome: ProcessOutcome) -> (Invocation, Vec<u8>) {
        let ended = Instant::now();
        let error = map_exit_status(&outcome.exit, self.session.build_exit_code_file()).err();
        let invocation = Invocation {
            kind: self.kind,
            attempt: self.session.attempt(),
            argv: self.argv,
            temp_dir: self.session.temp_dir().to_path_buf(),
            script: self.script,
            added_env: self.added_env,
            exit: outcome.exit,
            error,
            termination: outcome.termination,
            started: self.started,
            ended,
            duration: ended.saturating_duration_since(self.started),
        };
        self.session.recorder().record(invocation.clone());
        (invocation, outcome.captured_stdout)
    }
}
