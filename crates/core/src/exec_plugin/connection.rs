//! The host's side of one executable plugin process: started in its own process group with a
//! clean environment, read by a reader thread and written by a writer thread, so that every
//! wait — for a line, for the plugin to take a frame, for it to stop after a cancel, for it to
//! exit — has a deadline. A connection that failed in any way is ended (its whole process
//! group killed) and refuses further requests.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::protocol::{
    frames, parse_hello, parse_incoming, Hello, Incoming, ENV_PROTOCOL_MAX, ENV_PROTOCOL_MIN,
    MAX_LINE, PROTOCOL_MAX, PROTOCOL_MIN,
};
use crate::plugin::PluginError;

/// The variables of hyperjob's environment a plugin gets (when set); nothing else, never a
/// job's `CUSTOM_ENV_*`.
pub const ENV_ALLOWED: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "TMPDIR",
    "HYPERJOB_LOG",
    "RUST_LOG",
    "RUST_BACKTRACE",
];
/// How long the plugin may take to accept one line (a frame) hyperjob writes.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a plugin may take to answer after a cancel, and to exit once its stdin is closed,
/// before its process group is killed.
pub const GRACE: Duration = Duration::from_secs(2);

/// What the reader and writer threads report.
enum Event {
    Line(Result<String, String>),
    Wrote,
    WriteFailed(String),
}

/// How a request is run.
pub struct CallOptions<'a> {
    pub deadline: Instant,
    /// Set by hyperjob's signal handler: the request is cancelled, and GRACE later killed.
    pub cancel: Option<&'a AtomicBool>,
    /// Input sent after the request in `stdin` frames (the script).
    pub input: Option<&'a [u8]>,
    /// Limit of the wait for one frame to be taken ([`WRITE_TIMEOUT`]).
    pub write_timeout: Duration,
}

/// A running plugin process.
pub struct Connection {
    path: PathBuf,
    child: Child,
    writer: Option<Sender<Vec<u8>>>,
    events: Receiver<Event>,
    /// Lines handed to the writer and not yet written.
    unwritten: usize,
    next_id: u64,
    /// Why the connection cannot be used any more.
    broken: Option<String>,
    /// The plugin was reaped: its pid (and group id) may belong to another process now.
    reaped: bool,
}

impl Connection {
    /// Starts the executable and reads its hello.
    pub fn start(path: &Path, hello_timeout: Duration) -> Result<(Self, Hello), PluginError> {
        let mut command = Command::new(path);
        command
            .env_clear()
            .envs(
                ENV_ALLOWED
                    .iter()
                    .filter_map(|key| Some((key, std::env::var_os(key)?))),
            )
            .env(ENV_PROTOCOL_MIN, PROTOCOL_MIN.to_string())
            .env(ENV_PROTOCOL_MAX, PROTOCOL_MAX.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0);
        let mut child = command.spawn().map_err(|err| {
            PluginError::system(
                format!("cannot start executable plugin {}", path.display()),
                err,
            )
        })?;
        let (stdin, stdout) = match (child.stdin.take(), child.stdout.take()) {
            (Some(stdin), Some(stdout)) => (stdin, stdout),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(PluginError::msg(
                    "the plugin's stdin or stdout is not a pipe",
                ));
            }
        };
        let (events_in, events) = mpsc::channel();
        let lines = events_in.clone();
        std::thread::spawn(move || read_lines(stdout, &lines));
        let (writer, queue) = mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || write_lines(stdin, &queue, &events_in));
        let mut connection = Self {
            path: path.to_path_buf(),
            child,
            writer: Some(writer),
            events,
            unwritten: 0,
            next_id: 1,
            broken: None,
            reaped: false,
        };
        let hello = connection
            .next_line(Instant::now() + hello_timeout)
            .and_then(|line| {
                parse_hello(&line, PROTOCOL_MIN, PROTOCOL_MAX)
                    .map_err(|reason| connection.failure(&reason))
            });
        match hello {
            Ok(hello) => Ok((connection, hello)),
            Err(err) => {
                // No use waiting for a plugin that cannot even say hello.
                connection.kill();
                Err(err)
            }
        }
    }

    pub fn failure(&self, reason: &str) -> PluginError {
        PluginError::msg(format!(
            "executable plugin {} {reason}",
            self.path.display()
        ))
    }

    /// The next line, within `deadline` (for the hello: nothing is written yet).
    fn next_line(&mut self, deadline: Instant) -> Result<String, PluginError> {
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(wait) {
                Ok(Event::Line(Ok(line))) => return Ok(line),
                Ok(Event::Line(Err(reason))) => return Err(self.failure(&reason)),
                Ok(Event::Wrote | Event::WriteFailed(_)) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.failure(&format!(
                        "did not answer within {} s",
                        wait.as_millis().div_ceil(1000).max(1)
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.failure("exited")),
            }
        }
    }

    fn queue(&mut self, line: String) -> Result<(), PluginError> {
        let mut bytes = line.into_bytes();
        bytes.push(b'\n');
        let sent = self.writer.as_ref().is_some_and(|w| w.send(bytes).is_ok());
        if !sent {
            return Err(self.failure("stopped reading its stdin"));
        }
        self.unwritten += 1;
        Ok(())
    }

    /// Marks the connection unusable, ends the plugin and returns `error`.
    fn fail(&mut self, error: PluginError) -> PluginError {
        self.broken = Some(error.to_string());
        self.kill();
        error
    }

    /// Sends request `method` and waits for its answer, handing stream frames and progress
    /// lines to `sink`.
    pub fn call(
        &mut self,
        method: &str,
        params: Value,
        options: &CallOptions<'_>,
        sink: &mut dyn FnMut(Incoming),
    ) -> Result<Value, PluginError> {
        if let Some(reason) = &self.broken {
            return Err(PluginError::msg(format!(
                "executable plugin {} is no longer usable: {reason}",
                self.path.display()
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.queue(json!({ "id": id, "method": method, "params": params }).to_string())?;
        for frame in frames(id, "stdin", options.input.unwrap_or_default()) {
            self.queue(frame)?;
        }
        let started = Instant::now();
        let mut write_deadline = Instant::now() + options.write_timeout;
        let mut cancelled_at: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if cancelled_at.is_none() && options.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                cancelled_at = Some(now);
                self.queue(json!({ "method": "cancel", "params": { "id": id } }).to_string())?;
                write_deadline = now + options.write_timeout.min(GRACE);
            }
            if let Some(at) = cancelled_at {
                if now >= at + GRACE {
                    return Err(self.fail(PluginError::Interrupted(format!(
                        "while {method} ran (the plugin did not stop within {} s, so it was \
                         killed)",
                        GRACE.as_secs()
                    ))));
                }
            }
            if self.unwritten > 0 && now >= write_deadline {
                let reason = format!(
                    "stopped reading its stdin (a line of `{method}` was not taken within {} s)",
                    options.write_timeout.as_secs().max(1)
                );
                return Err(self.fail(self.failure(&reason)));
            }
            if now >= options.deadline {
                let secs = options.deadline.saturating_duration_since(started);
                let reason = format!(
                    "did not answer `{method}` within {} s",
                    secs.as_millis().div_ceil(1000).max(1)
                );
                return Err(self.fail(self.failure(&reason)));
            }
            let mut wake = options.deadline;
            if self.unwritten > 0 {
                wake = wake.min(write_deadline);
            }
            if let Some(at) = cancelled_at {
                wake = wake.min(at + GRACE);
            } else if options.cancel.is_some() {
                wake = wake.min(now + Duration::from_millis(100));
            }
            let line = match self
                .events
                .recv_timeout(wake.saturating_duration_since(now))
            {
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.fail(self.failure("exited")))
                }
                Ok(Event::Wrote) => {
                    self.unwritten = self.unwritten.saturating_sub(1);
                    write_deadline = Instant::now() + options.write_timeout;
                    continue;
                }
                Ok(Event::WriteFailed(err)) => {
                    let reason = format!("stopped reading its stdin ({err})");
                    return Err(self.fail(self.failure(&reason)));
                }
                // The reader has ended: report what ended it, once.
                Ok(Event::Line(Err(reason))) => return Err(self.fail(self.failure(&reason))),
                Ok(Event::Line(Ok(line))) => line,
            };
            let incoming = match parse_incoming(&line) {
                Ok(incoming) => incoming,
                Err(reason) => return Err(self.fail(self.failure(&reason))),
            };
            match incoming {
                Incoming::Result {
                    id: answered,
                    result,
                } if answered == id => return Ok(result),
                Incoming::Error {
                    id: answered,
                    error,
                } if answered == id => return Err(error),
                Incoming::Stream { id: answered, .. }
                | Incoming::Result { id: answered, .. }
                | Incoming::Error { id: answered, .. }
                    if answered != id =>
                {
                    let reason = format!("answered request {answered}, but {id} was asked");
                    return Err(self.fail(self.failure(&reason)));
                }
                other => sink(other),
            }
        }
    }

    /// Whether the plugin process has exited (without reaping it: its process group id stays
    /// valid until [`Connection::kill`]).
    #[allow(unsafe_code)]
    fn exited(&self) -> bool {
        let pid: libc::id_t = self.child.id();
        // SAFETY: waitid with a zeroed siginfo_t out-parameter; WNOWAIT leaves the child
        // waitable, so the `Child` still reaps it.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            rc != 0 || info.si_pid() != 0
        }
    }

    /// Kills the plugin's whole process group and reaps the plugin.
    #[allow(unsafe_code)]
    fn kill(&mut self) {
        drop(self.writer.take());
        if self.reaped {
            return;
        }
        if let Ok(pgid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: plain syscall; the group is the plugin's own (process_group(0)), and its
            // leader is not reaped yet, so the id cannot have been reused.
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Closing stdin asks the plugin to exit; GRACE later its process group is killed (and
        // so is whatever it left running in that group).
        drop(self.writer.take());
        let deadline = Instant::now() + GRACE;
        while !self.reaped && Instant::now() < deadline && !self.exited() {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }
}

/// The reader thread: lines until the first failure, which is reported once and ends it.
fn read_lines(stdout: impl Read, events: &Sender<Event>) {
    let mut reader = BufReader::new(stdout);
    loop {
        let mut line = Vec::new();
        let read = Read::take(&mut reader, MAX_LINE as u64 + 1).read_until(b'\n', &mut line);
        let message = match read {
            Ok(0) => Err("exited (closed its stdout)".to_string()),
            Ok(_) if line.len() > MAX_LINE => {
                Err(format!("sent a line longer than {} MiB", MAX_LINE >> 20))
            }
            Ok(_) if line.last() != Some(&b'\n') => {
                Err("closed its stdout in the middle of a line".to_string())
            }
            Ok(_) => String::from_utf8(line)
                .map(|l| l.trim_end().to_string())
                .map_err(|_| "sent a line that is not UTF-8".to_string()),
            Err(err) => Err(format!("cannot be read: {err}")),
        };
        let end = message.is_err();
        if events.send(Event::Line(message)).is_err() || end {
            return;
        }
    }
}

/// The writer thread: writes what it is given, reporting each line written, until the
/// connection drops its sender (then the plugin's stdin is closed) or a write fails.
fn write_lines(mut stdin: impl Write, queue: &Receiver<Vec<u8>>, events: &Sender<Event>) {
    while let Ok(bytes) = queue.recv() {
        if let Err(err) = stdin.write_all(&bytes).and_then(|()| stdin.flush()) {
            let _ = events.send(Event::WriteFailed(err.to_string()));
            return;
        }
        if events.send(Event::Wrote).is_err() {
            return;
        }
    }
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
