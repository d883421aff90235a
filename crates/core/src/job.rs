//! What GitLab Runner tells a driver about the job: the trusted job identity from
//! `JOB_RESPONSE_FILE`, the exit codes to use and the `BUILD_EXIT_CODE_FILE` path.
//!
//! `CUSTOM_ENV_*` variables are set by the pipeline and are never used for identity. The
//! response file holds secrets (the job token, variables): only the few fields needed are read,
//! and no value from it ever appears in an error message.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Environment variables the runner sets for every driver invocation.
pub const JOB_RESPONSE_FILE: &str = "JOB_RESPONSE_FILE";
pub const BUILD_FAILURE_EXIT_CODE: &str = "BUILD_FAILURE_EXIT_CODE";
pub const SYSTEM_FAILURE_EXIT_CODE: &str = "SYSTEM_FAILURE_EXIT_CODE";
pub const BUILD_EXIT_CODE_FILE: &str = "BUILD_EXIT_CODE_FILE";

/// The runner's default job timeout (`common.DefaultTimeout`), which it applies when the
/// response file's `runner_info.timeout` is missing, zero or negative (`GetBuildTimeout`).
const DEFAULT_JOB_TIMEOUT_SECS: u64 = 7200;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(
        "JOB_RESPONSE_FILE is not set: hyperjob must be started by GitLab Runner's Custom executor"
    )]
    MissingResponseFile,
    #[error("cannot read JOB_RESPONSE_FILE {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("JOB_RESPONSE_FILE {path} is not valid JSON (line {line}, column {column})")]
    Malformed {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    #[error("JOB_RESPONSE_FILE {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// The exit codes the runner asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitCodes {
    pub build_failure: u8,
    pub system_failure: u8,
}

impl ExitCodes {
    /// Reads the codes from the environment, falling back to the runner's constants (1 and 2).
    pub fn from_env() -> Self {
        Self {
            build_failure: code_from_env(BUILD_FAILURE_EXIT_CODE, 1),
            system_failure: code_from_env(SYSTEM_FAILURE_EXIT_CODE, 2),
        }
    }
}

fn code_from_env(name: &str, fallback: u8) -> u8 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(fallback)
}

/// The job identity hyperjob trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobIdentity {
    /// `id` from the response file: positive, unique per GitLab instance.
    pub job_id: u64,
    /// `runner_info.timeout`, the job timeout in seconds.
    pub timeout_secs: u64,
    /// `job_info.project_id`, when the response file has one.
    pub project_id: Option<u64>,
}

impl JobIdentity {
    /// Reads the response file named by `$JOB_RESPONSE_FILE`.
    pub fn from_env() -> Result<Self, JobError> {
        let path = std::env::var_os(JOB_RESPONSE_FILE)
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
            .ok_or(JobError::MissingResponseFile)?;
        Self::from_file(&path)
    }

    pub fn from_file(path: &Path) -> Result<Self, JobError> {
        let text = std::fs::read(path).map_err(|source| JobError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses response-file bytes; `path` only names the file in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, JobError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|err| JobError::Malformed {
            path: path.to_path_buf(),
            line: err.line(),
            column: err.column(),
        })?;
        let invalid = |problem: &str| JobError::Invalid {
            path: path.to_path_buf(),
            problem: problem.to_string(),
        };
        let job_id = match value.get("id") {
            None | Some(Value::Null) => return Err(invalid("has no job `id`")),
            Some(id) => id
                .as_u64()
                .filter(|id| *id > 0)
                .ok_or_else(|| invalid("job `id` is not a positive integer"))?,
        };
        let timeout_secs = match value.pointer("/runner_info/timeout") {
            None | Some(Value::Null) => DEFAULT_JOB_TIMEOUT_SECS,
            Some(timeout) => match (timeout.as_u64(), timeout.as_i64()) {
                (Some(secs), _) if secs > 0 => secs,
                (_, Some(secs)) if secs <= 0 => DEFAULT_JOB_TIMEOUT_SECS,
                _ => return Err(invalid("`runner_info.timeout` is not an integer")),
            },
        };
        let project_id = value
            .pointer("/job_info/project_id")
            .and_then(Value::as_u64)
            .filter(|id| *id > 0);
        Ok(Self {
            job_id,
            timeout_secs,
            project_id,
        })
    }

    /// Unix time after which this job's resources are certainly abandoned: creation, plus the
    /// job timeout, plus a margin for the runner's own cleanup.
    pub fn deadline_unix(&self, created_unix: u64, margin_secs: u64) -> u64 {
        created_unix
            .saturating_add(self.timeout_secs)
            .saturating_add(margin_secs)
    }
}

/// `BUILD_EXIT_CODE_FILE`, when the runner set it (17.9+).
pub fn build_exit_code_file() -> Option<PathBuf> {
    std::env::var_os(BUILD_EXIT_CODE_FILE)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<JobIdentity, JobError> {
        JobIdentity::parse(Path::new("/tmp/response.json"), json.as_bytes())
    }

    #[test]
    fn reads_id_and_timeout() {
        let job = parse(r#"{"id":4242,"token":"glcbt-secret","runner_info":{"timeout":600}}"#)
            .expect("valid");

        assert_eq!(
            job,
            JobIdentity {
                job_id: 4242,
                timeout_secs: 600,
                project_id: None,
            }
        );
    }

    #[test]
    fn reads_the_project_id_from_job_info_only() {
        let job = parse(r#"{"id":7,"job_info":{"project_id":12},"variables":[{"key":"CI_PROJECT_ID","value":"99"}]}"#)
            .expect("valid");
        assert_eq!(job.project_id, Some(12));
        for json in [r#"{"id":7}"#, r#"{"id":7,"job_info":{"project_id":"12"}}"#] {
            assert_eq!(parse(json).expect(json).project_id, None, "{json}");
        }
    }

    #[test]
    fn missing_zero_or_negative_timeout_uses_the_runners_default_of_two_hours() {
        for json in [
            r#"{"id":7}"#,
            r#"{"id":7,"runner_info":{}}"#,
            r#"{"id":7,"runner_info":{"timeout":null}}"#,
            r#"{"id":7,"runner_info":{"timeout":0}}"#,
            r#"{"id":7,"runner_info":{"timeout":-5}}"#,
        ] {
            assert_eq!(parse(json).expect(json).timeout_secs, 7200, "{json}");
        }
    }

    #[test]
    fn a_timeout_that_is_no_integer_is_rejected() {
        for json in [
            r#"{"id":7,"runner_info":{"timeout":"3600"}}"#,
            r#"{"id":7,"runner_info":{"timeout":1.5}}"#,
        ] {
            let err = parse(json).expect_err(json);
            assert!(err.to_string().contains("not an integer"), "{err}");
        }
    }

    #[test]
    fn string_id_is_rejected_without_echoing_it() {
        let err = parse(r#"{"id":"../../etc/passwd<x>"}"#).expect_err("string id");

        let message = err.to_string();
        assert!(message.contains("positive integer"), "{message}");
        assert!(!message.contains("passwd"), "{message}");
    }

    #[test]
    fn zero_and_negative_ids_are_rejected() {
        assert!(parse(r#"{"id":0}"#).is_err());
        assert!(parse(r#"{"id":-5}"#).is_err());
    }

    #[test]
    fn missing_id_is_rejected() {
        let message = parse(r#"{"token":"x"}"#).expect_err("no id").to_string();

        assert!(message.contains("no job `id`"), "{message}");
    }

    #[test]
    fn malformed_json_names_the_position_not_the_content() {
        let message = parse("{\"token\":\"glcbt-secret\", oops")
            .expect_err("bad")
            .to_string();

        assert!(message.contains("not valid JSON"), "{message}");
        assert!(!message.contains("glcbt"), "{message}");
    }

    #[test]
    fn deadline_is_creation_plus_timeout_plus_margin() {
        let job = parse(r#"{"id":1,"runner_info":{"timeout":100}}"#).expect("valid");

        assert_eq!(job.deadline_unix(1_000, 3600), 1_000 + 100 + 3600);
    }
}
