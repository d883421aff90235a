//! The one place where the outcome of a stage becomes the process exit code.
//!
//! GitLab Runner distinguishes a build failure (the job's own script failed: exit with
//! `BUILD_FAILURE_EXIT_CODE`, after writing the script's real exit code to
//! `BUILD_EXIT_CODE_FILE`) from a system failure (anything else: exit with
//! `SYSTEM_FAILURE_EXIT_CODE`; config and prepare are then retried by the runner).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use crate::job::{build_exit_code_file, ExitCodes};

/// How a stage ended when it did not fail itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageOutcome {
    Success,
    /// The job's script ran and exited non-zero.
    ScriptFailed {
        exit_code: i32,
    },
}

/// The exit code for a stage result; also reports errors on stderr (one line, the whole cause
/// chain) and writes `BUILD_EXIT_CODE_FILE` for script failures.
pub fn finish(command: &str, result: anyhow::Result<StageOutcome>) -> ExitCode {
    let codes = ExitCodes::from_env();
    let exit_file = build_exit_code_file();
    ExitCode::from(resolve(command, result, codes, exit_file.as_deref()))
}

fn resolve(
    command: &str,
    result: anyhow::Result<StageOutcome>,
    codes: ExitCodes,
    exit_file: Option<&Path>,
) -> u8 {
    match result {
        Ok(StageOutcome::Success) => 0,
        Ok(StageOutcome::ScriptFailed { exit_code }) => {
            if let Some(path) = exit_file {
                if let Err(err) = std::fs::write(path, format!("{exit_code}\n")) {
                    report(&format!(
                        "hyperjob {command}: cannot write BUILD_EXIT_CODE_FILE {}: {err}",
                        path.display()
                    ));
                }
            }
            codes.build_failure
        }
        Err(err) => {
            report(&format!("hyperjob {command}: {err:#}"));
            codes.system_failure
        }
    }
}

/// Environment variable choosing the log format on stderr: `json` for one JSON object per line.
pub const LOG_FORMAT_ENV: &str = "HYPERJOB_LOG_FORMAT";

/// Whether log lines on stderr are JSON (`HYPERJOB_LOG_FORMAT=json`).
pub fn json_logs() -> bool {
    std::env::var(LOG_FORMAT_ENV).is_ok_and(|format| format.eq_ignore_ascii_case("json"))
}

fn report(line: &str) {
    let line = line.replace('\n', " ");
    let mut stderr = std::io::stderr().lock();
    let _ = if json_logs() {
        writeln!(
            stderr,
            "{}",
            serde_json::json!({ "level": "ERROR", "message": line })
        )
    } else {
        writeln!(stderr, "{line}")
    };
    let _ = stderr.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    const CODES: ExitCodes = ExitCodes {
        build_failure: 11,
        system_failure: 22,
    };

    #[test]
    fn success_exits_zero_and_writes_no_exit_code_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("build_exit_code");

        let code = resolve("run", Ok(StageOutcome::Success), CODES, Some(&file));

        assert_eq!(code, 0);
        assert!(!file.exists());
    }

    #[test]
    fn script_failure_uses_build_code_and_records_the_real_exit_code() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("build_exit_code");

        let code = resolve(
            "run",
            Ok(StageOutcome::ScriptFailed { exit_code: 42 }),
            CODES,
            Some(&file),
        );

        assert_eq!(code, 11);
        assert_eq!(std::fs::read_to_string(&file).expect("written"), "42\n");
    }

    #[test]
    fn any_error_is_a_system_failure() {
        let code = resolve(
            "prepare",
            Err(anyhow::anyhow!("libvirt said no")),
            CODES,
            None,
        );

        assert_eq!(code, 22);
    }
}
