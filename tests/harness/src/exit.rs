//! How the runner turns a driver's exit into an error (protocol §4.1,
//! `executors/custom/command/command.go`).

use std::io::{BufRead, BufReader};
use std::path::Path;

/// How a driver process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitInfo {
    /// Normal exit with this status.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
    /// Could not be started (ENOENT, EACCES, …).
    StartFailed(String),
    /// Still alive after SIGKILL and `force_kill_timeout`: the runner gives
    /// up waiting ("likely process is dormant").
    Abandoned { pid: u32 },
}

/// The error one invocation produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvocationError {
    /// The runner's `BuildError` with failure reason `script_failure`.
    Build { exit_code: i64, message: String },
    /// Anything that is not a `BuildError` ("system failure").
    System { message: String },
}

impl InvocationError {
    pub fn message(&self) -> &str {
        match self {
            Self::Build { message, .. } | Self::System { message } => message,
        }
    }

    pub fn is_build_error(&self) -> bool {
        matches!(self, Self::Build { .. })
    }
}

impl std::fmt::Display for InvocationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for InvocationError {}

const BUILD_FAILURE_EXIT_CODE: i32 = 1;
const SYSTEM_FAILURE_EXIT_CODE: i32 = 2;

/// Go's text for a signal death (`signal: killed`).
fn go_signal_text(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "hangup",
        libc::SIGINT => "interrupt",
        libc::SIGQUIT => "quit",
        libc::SIGILL => "illegal instruction",
        libc::SIGTRAP => "trace/breakpoint trap",
        libc::SIGABRT => "aborted",
        libc::SIGBUS => "bus error",
        libc::SIGFPE => "floating point exception",
        libc::SIGKILL => "killed",
        libc::SIGUSR1 => "user defined signal 1",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGUSR2 => "user defined signal 2",
        libc::SIGPIPE => "broken pipe",
        libc::SIGALRM => "alarm clock",
        libc::SIGTERM => "terminated",
        other => return format!("signal: signal {other}"),
    };
    format!("signal: {name}")
}

fn unknown_failure(code: i64, inner: &str) -> InvocationError {
    InvocationError::System {
        message: format!(
            "unknown Custom executor executable exit code {code}; executable execution terminated with: {inner}"
        ),
    }
}

/// First line of the file the way `bufio.Scanner` returns it (a trailing
/// `\r` is dropped); `None` when the file cannot be opened.
fn first_line(path: &Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let mut line = Vec::new();
    // A read error (e.g. the path is a directory) leaves no token, which the
    // runner then fails to parse: same as an empty file.
    let _ = BufReader::new(file).read_until(b'\n', &mut line);
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Some(String::from_utf8_lossy(&line).into_owned())
}

/// Maps a driver exit to the runner's error, consulting
/// `BUILD_EXIT_CODE_FILE` exactly like `parseBuildFailure`.
pub fn map_exit_status(
    exit: &ExitInfo,
    build_exit_code_file: &Path,
) -> Result<(), InvocationError> {
    match exit {
        ExitInfo::Exited(0) => Ok(()),
        ExitInfo::Exited(BUILD_FAILURE_EXIT_CODE) => match first_line(build_exit_code_file) {
            None => Err(InvocationError::Build {
                exit_code: 1,
                message: "exit status 1".to_owned(),
            }),
            // strconv.Atoi: optional sign and decimal digits, nothing else.
            Some(text) => match text.parse::<i64>() {
                Ok(code) => Err(InvocationError::Build {
                    exit_code: code,
                    message: format!("exit status {text}"),
                }),
                Err(_) => Err(unknown_failure(
                    i64::from(SYSTEM_FAILURE_EXIT_CODE),
                    "exit status 1",
                )),
            },
        },
        ExitInfo::Exited(SYSTEM_FAILURE_EXIT_CODE) => Err(InvocationError::System {
            message: "exit status 2".to_owned(),
        }),
        ExitInfo::Exited(code) => Err(unknown_failure(
            i64::from(*code),
            &format!("exit status {code}"),
        )),
        ExitInfo::Signaled(signal) => Err(unknown_failure(-1, &go_signal_text(*signal))),
        ExitInfo::StartFailed(reason) => Err(InvocationError::System {
            message: format!("failed to start command: {reason}"),
        }),
        ExitInfo::Abandoned { pid } => Err(InvocationError::System {
            message: format!("failed to kill process PID={pid}, likely process is dormant"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_file(content: Option<&str>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("build_exit_code");
        if let Some(content) = content {
            std::fs::write(&path, content).expect("write code file");
        }
        (dir, path)
    }

    #[test]
    fn exit_zero_is_success() {
        let (_dir, file) = code_file(Some("42"));

        assert_eq!(map_exit_status(&ExitInfo::Exited(0), &file), Ok(()));
    }

    #[test]
    fn exit_one_without_code_file_is_build_failure_with_code_one() {
        let (_dir, file) = code_file(None);

        let result = map_exit_status(&ExitInfo::Exited(1), &file);

        assert_eq!(
            result,
            Err(InvocationError::Build {
                exit_code: 1,
                message: "exit status 1".to_owned()
            })
        );
    }

    #[test]
    fn exit_one_with_code_file_reports_first_line_as_exit_code() {
        let (_dir, file) = code_file(Some("42\r\nignored\n"));

        let result = map_exit_status(&ExitInfo::Exited(1), &file);

        assert_eq!(
            result,
            Err(InvocationError::Build {
                exit_code: 42,
                message: "exit status 42".to_owned()
            })
        );
    }

    #[test]
    fn code_file_with_zero_still_fails_the_build() {
        let (_dir, file) = code_file(Some("0\n"));

        let result = map_exit_status(&ExitInfo::Exited(1), &file);

        assert!(matches!(
            result,
            Err(InvocationError::Build { exit_code: 0, .. })
        ));
    }

    #[test]
    fn malformed_code_file_is_system_failure_with_code_two() {
        for content in ["", " 42", "42 foo", "0x2a"] {
            let (_dir, file) = code_file(Some(content));

            let result = map_exit_status(&ExitInfo::Exited(1), &file);

            assert_eq!(
                result,
                Err(InvocationError::System {
                    message: "unknown Custom executor executable exit code 2; executable execution terminated with: exit status 1".to_owned()
                }),
                "content {content:?}"
            );
        }
    }

    #[test]
    fn code_file_is_ignored_unless_driver_exits_one() {
        let (_dir, file) = code_file(Some("42"));

        let result = map_exit_status(&ExitInfo::Exited(2), &file);

        assert_eq!(
            result,
            Err(InvocationError::System {
                message: "exit status 2".to_owned()
            })
        );
    }

    #[test]
    fn other_exit_code_is_unknown_system_failure() {
        let (_dir, file) = code_file(None);

        let result = map_exit_status(&ExitInfo::Exited(3), &file);

        assert_eq!(
            result,
            Err(InvocationError::System {
                message: "unknown Custom executor executable exit code 3; executable execution terminated with: exit status 3".to_owned()
            })
        );
    }

    #[test]
    fn signal_death_is_unknown_failure_with_code_minus_one() {
        let (_dir, file) = code_file(None);

        let result = map_exit_status(&ExitInfo::Signaled(libc::SIGKILL), &file);

        assert_eq!(
            result,
            Err(InvocationError::System {
                message: "unknown Custom executor executable exit code -1; executable execution terminated with: signal: killed".to_owned()
            })
        );
    }
}
