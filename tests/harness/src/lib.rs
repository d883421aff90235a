//! A replica of GitLab Runner's Custom executor call sequence, for driving a
//! Custom-executor driver (hyperjob) in end-to-end tests and demos exactly
//! the way `gitlab-runner` 19.x does. It knows the protocol only
//! (`shared/reference/custom-executor-protocol.md`), nothing about hyperjob.
//!
//! # What it replicates
//!
//! * **Invocation** (§1.2): `*_exec *_args…` with no shell; run_exec gets
//!   `run_args… <abs script path> <stage>` (`step_script` sent as
//!   `build_script`); cwd and `TMPDIR` = a fresh `custom-executor*` dir per
//!   preparation attempt; stdin `/dev/null`; a new process group.
//! * **Environment** (§3): this process's environment, plus
//!   [`Driver::env`], then `TMPDIR`, `BUILD_FAILURE_EXIT_CODE=1`,
//!   `SYSTEM_FAILURE_EXIT_CODE=2`, `BUILD_EXIT_CODE_FILE` (never created),
//!   `JOB_RESPONSE_FILE` (0600, §3.4 shape and key order), config_exec's
//!   `job_env`, `CUSTOM_ENV_*` for the runner's variable list in the runner's
//!   order (all 51 `FF_*` flags, runner variables, GitLab's predefined and the
//!   job's variables, expanded like `os.Expand`), and
//!   `CUSTOM_ENV_CI_JOB_SERVICES` last. The builds-dir variables are empty
//!   for config_exec on the first attempt, as in the runner.
//! * **config_exec** (§2): stdout captured and parsed strictly (empty = no
//!   overrides, whitespace = error, unknown keys ignored, wrong types
//!   rejected), the overrides applied, "Using Custom executor with driver N
//!   V..." logged, stderr in the job log.
//! * **Preparation retries** (§12): up to 3 attempts, cleanup_exec and temp
//!   dir removal after each failed one, no retry for build/config errors,
//!   configurable interval.
//! * **Exit codes** (§4.1) including `BUILD_EXIT_CODE_FILE` (first line,
//!   `strconv.Atoi` rules, stale file never cleared), unknown codes and
//!   signal deaths — see [`map_exit_status`].
//! * **Stage sequence** (§1.3, §12): prepare_script (its failure ends the
//!   script phase), get_sources with `GET_SOURCES_ATTEMPTS`, clear_worktree
//!   before the second try and exponential backoff, `build_script` /
//!   `step_<name>`, after_script with the final `CI_JOB_STATUS` (skipped when
//!   the script phase was not entered or it is empty; errors ignored unless
//!   `AFTER_SCRIPT_IGNORE_ERRORS=false`), cleanup_file_variables, then
//!   cleanup_exec (own timeout, never cancelled) and temp dir removal.
//! * **Scripts** (§7): the 19.1+ bash/sh wrapper byte for byte (or the
//!   17.4–19.0 one, [`RunnerSettings::script_format`]),
//!   `ShellEscape`, Go `%q` paths, file variables, `GITLAB_ENV`, the
//!   get_sources body (template dir, external git config with Gitaly
//!   correlation ID, bundle URIs and `insteadOf` credential rewrites, `git
//!   init`/`remote add`/`fetch`/`checkout -f -q`/`clean -ffdx`, LFS guard,
//!   ownership fix, `git credential reject`), written with mode 0700 to
//!   `<tmp>/script<random>/script`. The scripts really run: a local driver
//!   can `bash` them and get a real checkout.
//! * **Output** (§6): stdout/stderr read concurrently, assembled into lines
//!   (a trailing partial line is kept and flagged), tagged with stream and
//!   stage; cleanup_exec output goes to the "runner log", not the job log.
//!   [`RunnerSettings::echo_log`] prints the log live (masked).
//! * **Termination** (§5): per-scope deadlines (job timeout, `prepare_timeout`,
//!   `get_sources_timeout`, `RUNNER_SCRIPT_TIMEOUT`,
//!   `RUNNER_AFTER_SCRIPT_TIMEOUT`, the `*_exec_timeout`s), graceful cancel
//!   (stops only the current step, then after_script runs with
//!   `CI_JOB_STATUS=canceled`) and hard abort via [`CancelHandle`] or
//!   [`CancelPlan`], `kill(-pgid, SIGTERM)` → `graceful_kill_timeout` →
//!   SIGKILL → `force_kill_timeout` → abandon, and the 5-minute
//!   `WaitForBuildFinishTimeout` after which cleanup_exec starts even though
//!   a stage is still dying.
//!
//! # What it leaves out, on purpose
//!
//! * Caches and artifacts only in part: [`Job::cache`] and [`Job::artifacts`]
//!   give restore_cache, archive_cache* and upload_artifacts_* their scripts
//!   (local caches: no cache server URL; no artifacts metadata), which call
//!   `gitlab-runner` in the environment as the runner's do; download_artifacts
//!   is skipped (no dependencies), as the runner skips it without any.
//! * PowerShell scripts, git submodules, `FF_GIT_URLS_WITHOUT_TOKENS`,
//!   `FF_USE_GIT_NATIVE_CLONE`, TLS file variables, secrets, job hooks,
//!   native steps: reported as errors or not generated. Feature flags are
//!   exported faithfully but, except for a few that change the script
//!   (exit-code check, legacy eval, POSIX escapes, script sections, job
//!   cleanup, Gitaly correlation ID, bundle URIs), only their defaults shape
//!   the generated scripts.
//! * GitLab itself: no trace upload, no timestamps/section markers in the log,
//!   masking is a plain string replace (no token-prefix or URL sanitiser),
//!   only a representative set of predefined `CI_*` variables. Runner log
//!   lines are plain text without ANSI colours.
//! * URL handling is minimal (`scheme://[userinfo@]host/path`); a `file://`
//!   repository has no host, so its project dir is `project-<id>` — as in
//!   the runner.

mod compat;
mod config;
mod control;
mod escape;
mod exit;
mod invocation;
mod job;
mod log;
mod process;
mod runner;
mod script;
mod session;
mod variables;

pub use config::{parse_config_output, startup_message, ConfigOutput, DriverInfo};
pub use control::{CancelHandle, CancelKind, CancelPlan, StopReason};
pub use escape::{go_quote, shell_escape};
pub use exit::{map_exit_status, ExitInfo, InvocationError};
pub use invocation::{Invocation, InvocationKind, Termination};
pub use job::{Job, JobVariable, RefType, Service, Step};
pub use log::{mask, LineKind, LogLine, LogStream};
pub use runner::{run_job, run_job_with, JobReport, JobResult};
pub use script::{
    generate_script, wrap_script, wrap_script_as, Artifact, Cache, GitSource, RunnerHooks,
    ScriptContext, ScriptFormat, ScriptShell, Stage, UnsupportedStage,
};
pub use session::{Driver, ExecutorSession, JobError, RunnerSettings, RunningInvocation};
pub use variables::{
    all_variables, build_settings, BuildDirs, BuildSettings, GitStrategy, RunnerIdentity,
    SubmoduleStrategy, FEATURE_FLAGS,
};
