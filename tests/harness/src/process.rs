//! Starting a driver process the way the runner does (§1.2) and stopping it
//! the way the runner does (§5.1).

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::control::{StopReason, POLL};
use crate::exit::ExitInfo;
use crate::invocation::Termination;
use crate::log::{LineAssembler, LineKind, LogStream, Recorder};

/// Where one output pipe goes.
#[derive(Debug, Clone)]
pub(crate) enum Sink {
    /// Kept in memory (config_exec stdout).
    Capture,
    /// Line-assembled into the log.
    Log { stream: LogStream, stage: String },
}

#[derive(Debug)]
pub(crate) struct ProcessRequest {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// The complete environment, in order; a later key wins.
    pub env: Vec<(OsString, OsString)>,
    pub stdout: Sink,
    pub stderr: Sink,
}

/// SIGTERM → wait → SIGKILL → wait.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KillTimeouts {
    pub graceful: Duration,
    pub force: Duration,
}

#[derive(Debug)]
struct Finished {
    exit: ExitInfo,
    captured: Vec<u8>,
}

/// A started driver process.
#[derive(Debug)]
pub(crate) struct Running {
    pid: u32,
    finished: Receiver<Finished>,
}

#[derive(Debug)]
pub(crate) struct ProcessOutcome {
    pub exit: ExitInfo,
    pub captured_stdout: Vec<u8>,
    pub termination: Option<Termination>,
}

/// `kill(-pgid, signal)`: the driver is the leader of its own group, so this
/// reaches it and every child that did not leave the group.
#[allow(unsafe_code)]
pub(crate) fn signal_process_group(pgid: u32, signal: i32) -> std::io::Result<()> {
    let pgid =
        i32::try_from(pgid).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    if pgid <= 1 {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; the
    // negative pid addresses the process group whose leader we spawned, and
    // pgid > 1 rules out "every process" (-1) and our own group (0).
    let result = unsafe { libc::kill(-pgid, signal) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn pump(mut pipe: impl Read, sink: Sink, kind: LineKind, recorder: Arc<Recorder>) -> Vec<u8> {
    let mut captured = Vec::new();
    let mut assembler = LineAssembler::default();
    let mut buffer = [0_u8; 8192];
    loop {
        let count = match pipe.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => count,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        match &sink {
            Sink::Capture => captured.extend_from_slice(&buffer[..count]),
            Sink::Log { stream, stage } => {
                for line in assembler.feed(&buffer[..count]) {
                    recorder.output(*stream, kind, stage, line, true);
                }
            }
        }
    }
    if let Sink::Log { stream, stage } = &sink {
        if let Some(tail) = assembler.finish() {
            recorder.output(*stream, kind, stage, tail, false);
        }
    }
    captured
}

fn exit_info(status: std::process::ExitStatus) -> ExitInfo {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitInfo::Exited(code),
        (None, Some(signal)) => ExitInfo::Signaled(signal),
        (None, None) => ExitInfo::StartFailed("process ended without status".to_owned()),
    }
}

fn start_failure(program: &Path, error: &std::io::Error) -> String {
    let reason = error.to_string();
    let reason = reason
        .split(" (os error")
        .next()
        .unwrap_or(&reason)
        .to_lowercase();
    format!("fork/exec {}: {reason}", program.display())
}

/// Starts the process in its own process group with stdin from /dev/null and
/// both output pipes pumped on their own threads. Like Go's `cmd.Wait`, the
/// process counts as finished once it exited and both pipes are closed.
pub(crate) fn spawn(
    request: ProcessRequest,
    recorder: &Arc<Recorder>,
) -> Result<Running, ExitInfo> {
    let mut command = Command::new(&request.program);
    command
        .args(&request.args)
        .current_dir(&request.cwd)
        .env_clear()
        .envs(request.env.iter().map(|(key, value)| (key, value)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child: Child = command
        .spawn()
        .map_err(|error| ExitInfo::StartFailed(start_failure(&request.program, &error)))?;
    let pid = child.id();
    let readers: Vec<JoinHandle<Vec<u8>>> = [
        child.stdout.take().map(|pipe| {
            let (sink, recorder) = (request.stdout.clone(), Arc::clone(recorder));
            thread::spawn(move || pump(pipe, sink, LineKind::Stdout, recorder))
        }),
        child.stderr.take().map(|pipe| {
            let (sink, recorder) = (request.stderr.clone(), Arc::clone(recorder));
            thread::spawn(move || pump(pipe, sink, LineKind::Stderr, recorder))
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    let (sender, finished) = mpsc::channel();
    thread::spawn(move || {
        let exit = match child.wait() {
            Ok(status) => exit_info(status),
            Err(error) => ExitInfo::StartFailed(format!("wait: {error}")),
        };
        let mut captured = Vec::new();
        for reader in readers {
            // A panicking reader only loses output.
            if let Ok(bytes) = reader.join() {
                captured.extend(bytes);
            }
        }
        // The receiver is gone when the harness abandoned the process.
        let _ = sender.send(Finished { exit, captured });
    });
    Ok(Running { pid, finished })
}

impl Running {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the process ends, or until `should_stop` reports a reason;
    /// then runs the runner's kill sequence (`KillAndWait`).
    pub(crate) fn wait_controlled(
        self,
        should_stop: &mut dyn FnMut() -> Option<(StopReason, String)>,
        kill: KillTimeouts,
    ) -> ProcessOutcome {
        loop {
            match self.finished.recv_timeout(POLL) {
                Ok(finished) => {
                    return ProcessOutcome {
                        exit: finished.exit,
                        captured_stdout: finished.captured,
                        termination: None,
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return ProcessOutcome {
                        exit: ExitInfo::StartFailed("waiter thread ended".to_owned()),
                        captured_stdout: Vec::new(),
                        termination: None,
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if let Some((reason, scope)) = should_stop() {
                return self.kill_and_wait(reason, scope, kill);
            }
        }
    }

    fn kill_and_wait(
        self,
        reason: StopReason,
        scope: String,
        kill: KillTimeouts,
    ) -> ProcessOutcome {
        let mut termination = Termination {
            reason,
            scope,
            sent_sigkill: false,
        };
        if signal_process_group(self.pid, libc::SIGTERM).is_err() {
            termination.sent_sigkill = true;
            // Best effort, exactly like the runner: a failing SIGKILL is only logged.
            let _ = signal_process_group(self.pid, libc::SIGKILL);
        }
        if let Ok(finished) = self.finished.recv_timeout(kill.graceful) {
            return Self::outcome(finished, termination);
        }
        termination.sent_sigkill = true;
        let _ = signal_process_group(self.pid, libc::SIGKILL);
        match self.finished.recv_timeout(kill.force) {
            Ok(finished) => Self::outcome(finished, termination),
            Err(_) => ProcessOutcome {
                exit: ExitInfo::Abandoned { pid: self.pid },
                captured_stdout: Vec::new(),
                termination: Some(termination),
            },
        }
    }

    fn outcome(finished: Finished, termination: Termination) -> ProcessOutcome {
        ProcessOutcome {
            exit: finished.exit,
            captured_stdout: finished.captured,
            termination: Some(termination),
        }
    }

    /// Waits without any deadline.
    pub(crate) fn wait(self) -> ProcessOutcome {
        match self.finished.recv() {
            Ok(finished) => ProcessOutcome {
                exit: finished.exit,
                captured_stdout: finished.captured,
                termination: None,
            },
            Err(_) => ProcessOutcome {
                exit: ExitInfo::StartFailed("waiter thread ended".to_owned()),
                captured_stdout: Vec::new(),
                termination: None,
            },
        }
    }

    /// Returns the outcome if the process ended within `timeout`.
    pub(crate) fn wait_timeout(&self, timeout: Duration) -> Option<ProcessOutcome> {
        let deadline = Instant::now() + timeout;
        self.finished
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
            .map(|finished| ProcessOutcome {
                exit: finished.exit,
                captured_stdout: finished.captured,
                termination: None,
            })
    }
}
