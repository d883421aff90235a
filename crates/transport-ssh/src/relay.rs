//! One script run over an open session: start the guest shell, feed it the script, relay its
//! output until it exits, and on cancellation stop its whole process tree in the guest. (Not
//! hyperjob's per-job relay process: that one uses this, through [`crate::connection`].)

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyperjob_core::{RemoteExit, ScriptRequest};
use ssh2::{Channel, Session};

use crate::remote::{kill_command, new_run_id, remote_command, PidCapture};
use crate::{channel_error, SshError};

const READ_CHUNK: usize = 32 * 1024;
/// How long the relay loop waits for the socket before checking for cancellation again.
const POLL_INTERVAL_MS: i32 = 200;
/// Keepalive interval while a script runs: keeps NAT and firewalls from dropping a quiet
/// connection, and gives the kernel data whose acknowledgement it can miss.
pub(crate) const KEEPALIVE_SECS: u32 = 15;
/// How long a cancelled script gets to finish and flush its output before we give up on it.
const CANCEL_GRACE: Duration = Duration::from_millis(1500);
/// How long a cancelled run waits for the guest shell to report its process group, when the
/// stop came so early that it has not yet: until then only the run marker finds the script's
/// processes, and the shell itself carries the marker only once it runs the interpreter.
const GROUP_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) enum RelayError {
    Ssh(SshError),
    Interrupted,
}

impl From<SshError> for RelayError {
    fn from(err: SshError) -> Self {
        RelayError::Ssh(err)
    }
}

/// A guest shell that was started (it reports its process group first thing) and waits for
/// its script on stdin.
pub(crate) struct Shell {
    channel: Channel,
    run_id: String,
    pub(crate) interpreter: String,
    /// Takes the process-group line off its stderr.
    capture: PidCapture,
    /// What it printed before its script was sent (a login shell's startup files may), passed
    /// on when the script runs.
    early_stdout: Vec<u8>,
    early_stderr: Vec<u8>,
}

impl Shell {
    pub(crate) fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Reads what the shell has sent so far, without waiting (the session must be in
    /// non-blocking mode); false once it has ended (something in the guest killed it).
    pub(crate) fn alive(&mut self) -> Result<bool, SshError> {
        let mut buf = vec![0u8; READ_CHUNK];
        while pump(&mut self.channel, &mut buf, &mut self.early_stdout, None)? {}
        while pump(
            &mut self.channel.stderr(),
            &mut buf,
            &mut self.early_stderr,
            Some(&mut self.capture),
        )? {}
        Ok(!self.channel.eof())
    }
}

/// Starts the guest shell for `interpreter` (session in blocking mode). A stop asked for
/// before it starts starts nothing.
pub(crate) fn start_shell(
    session: &Session,
    interpreter: &str,
    umask: u32,
    cancel: &AtomicBool,
) -> Result<Shell, SshError> {
    let mut channel = session
        .channel_session()
        .map_err(|e| channel_error("opening a channel", &e))?;
    let run_id = new_run_id();
    // The last look before anything runs in the guest.
    if cancel.load(Ordering::Relaxed) {
        return Err(SshError::Interrupted("before the guest shell was started"));
    }
    channel
        .exec(&remote_command(interpreter, umask, &run_id))
        .map_err(|e| channel_error("starting the guest shell", &e))?;
    tracing::debug!("guest shell started (run {run_id})");
    Ok(Shell {
        channel,
        run_id,
        interpreter: interpreter.to_string(),
        capture: PidCapture::default(),
        early_stdout: Vec::new(),
        early_stderr: Vec::new(),
    })
}

/// Starts the interpreter, feeds it the script on stdin and relays its output until it exits.
/// A stop asked for before the guest shell starts starts nothing; one asked for before the
/// script is sent leaves the shell an empty script. Later, the script's process tree in the
/// guest is stopped, its last output is relayed for a short grace period, and the relay ends.
pub(crate) fn relay(
    session: &Session,
    request: &ScriptRequest<'_>,
    umask: u32,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<RemoteExit, RelayError> {
    let mut shell = start_shell(session, request.interpreter, umask, request.cancel)?;
    run(session, &mut shell, request, stdout, stderr)
}

/// Feeds `shell` (started, waiting for its script) the script and relays its output until it
/// exits, as [`relay`] does. Leaves the session in blocking mode only when the script exited.
pub(crate) fn run(
    session: &Session,
    shell: &mut Shell,
    request: &ScriptRequest<'_>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<RemoteExit, RelayError> {
    let Shell {
        channel,
        run_id,
        capture,
        early_stdout,
        early_stderr,
        ..
    } = shell;
    let run_id = run_id.as_str();
    pass_on_early(early_stdout, stdout);
    pass_on_early(early_stderr, stderr);
    if request.cancel.load(Ordering::Relaxed) {
        // The shell waits for its script: end its input instead, it reads nothing and exits.
        let _ = channel.send_eof();
        return Err(SshError::Interrupted("before the script was sent").into());
    }
    channel
        .write_all(request.script)
        .map_err(|e| SshError::Channel {
            what: "sending the script",
            message: e.to_string(),
        })?;
    channel
        .send_eof()
        .map_err(|e| channel_error("closing the script's stdin", &e))?;

    // Blocking calls are bounded by the session timeout, which a long quiet script would hit:
    // relay in non-blocking mode and wait on the socket instead.
    session.set_timeout(0);
    session.set_keepalive(false, KEEPALIVE_SECS);
    session.set_blocking(false);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut stop: Option<Stop> = None;
    loop {
        if stop.is_none() && request.cancel.load(Ordering::Relaxed) {
            stop = Some(Stop::now(session, capture.pid(), run_id));
        }
        if let Some(stop) = &mut stop {
            stop.with_group_once_known(session, capture.pid(), run_id);
            if stop.done(capture) {
                flush_held(capture, stderr);
                return Err(RelayError::Interrupted);
            }
        }
        let mut progressed = pump(channel, &mut buf, stdout, None)?;
        progressed |= pump(&mut channel.stderr(), &mut buf, stderr, Some(capture))?;
        if channel.eof() && !progressed {
            flush_held(capture, stderr);
            break;
        }
        if !progressed {
            let _ = session.keepalive_send();
            wait_readable(session);
        }
    }
    if let Some(mut stop) = stop {
        // The shell is gone, but what it started in the background may not be.
        stop.with_group_once_known(session, capture.pid(), run_id);
        return Err(RelayError::Interrupted);
    }
    session.set_blocking(true);
    channel
        .wait_close()
        .map_err(|e| channel_error("closing the channel", &e))?;
    let signal = channel
        .exit_signal()
        .map_err(|e| channel_error("reading the exit signal", &e))?;
    if let Some(name) = signal.exit_signal {
        return Ok(RemoteExit::Signal(name));
    }
    let code = channel
        .exit_status()
        .map_err(|e| channel_error("reading the exit status", &e))?;
    Ok(RemoteExit::Code(code))
}

/// What a cancelled run did to stop the script in the guest.
struct Stop {
    asked: Instant,
    last_sent: Instant,
    /// Whether a kill went to the shell's process group (not only to the run marker).
    with_group: bool,
}

impl Stop {
    /// Sends the kill now: to the process group if the shell reported it, else to the run
    /// marker alone (the group follows once it is known).
    fn now(session: &Session, pgid: Option<u32>, run_id: &str) -> Self {
        if pgid.is_none() {
            tracing::debug!(
                "the guest shell has not reported its process group yet: stopping the script by its run marker for now"
            );
        }
        stop_remote(session, pgid, run_id);
        let now = Instant::now();
        Self {
            asked: now,
            last_sent: now,
            with_group: pgid.is_some(),
        }
    }

    /// Sends the kill again, with the process group, if that became known after the first.
    fn with_group_once_known(&mut self, session: &Session, pgid: Option<u32>, run_id: &str) {
        if self.with_group || pgid.is_none() {
            return;
        }
        tracing::debug!("the guest shell reported its process group: stopping that too");
        stop_remote(session, pgid, run_id);
        self.last_sent = Instant::now();
        self.with_group = true;
    }

    /// Whether to stop relaying: the grace after the last kill is over, and the process group
    /// was reached (or will not be reported, or took too long to be).
    fn done(&self, capture: &PidCapture) -> bool {
        self.last_sent.elapsed() > CANCEL_GRACE
            && (self.with_group || capture.settled() || self.asked.elapsed() > GROUP_WAIT)
    }
}

/// Passes on (and forgets) what a shell printed before its script was sent.
fn pass_on_early(early: &mut Vec<u8>, to: &mut dyn Write) {
    if !early.is_empty() {
        let _ = to.write_all(early);
        let _ = to.flush();
        early.clear();
    }
}

/// Passes on stderr bytes the pid capture still holds.
fn flush_held(capture: &mut PidCapture, stderr: &mut dyn Write) {
    let held = capture.finish();
    if !held.is_empty() {
        let _ = stderr.write_all(&held);
        let _ = stderr.flush();
    }
}

/// Sends the kill command on a second channel of the same session. Best effort: if it cannot
/// be delivered, cleanup destroys the VM anyway. Without the process group the run's marker
/// alone finds the script's processes.
fn stop_remote(session: &Session, pgid: Option<u32>, run_id: &str) {
    session.set_blocking(true);
    session.set_timeout(1000);
    let sent = session.channel_session().and_then(|mut channel| {
        channel.exec(&kill_command(pgid, run_id))?;
        channel.send_eof()
    });
    if let Err(err) = sent {
        tracing::warn!("could not stop the script in the guest: {}", err.message());
    }
    session.set_timeout(0);
    session.set_blocking(false);
}

/// Moves what is available from `from` to `to` (through `capture`, if given); true when
/// something moved.
fn pump(
    from: &mut dyn Read,
    buf: &mut [u8],
    to: &mut dyn Write,
    capture: Option<&mut PidCapture>,
) -> Result<bool, SshError> {
    match from.read(buf) {
        Ok(0) => Ok(false),
        Ok(n) => {
            let data = match capture {
                Some(capture) => capture.feed(&buf[..n]),
                None => std::borrow::Cow::Borrowed(&buf[..n]),
            };
            // Output the job log cannot take is dropped rather than failing the job.
            let _ = to.write_all(&data);
            let _ = to.flush();
            Ok(true)
        }
        Err(err) if err.kind() == ErrorKind::WouldBlock => Ok(false),
        Err(err) => Err(SshError::Channel {
            what: "reading the script's output",
            message: err.to_string(),
        }),
    }
}

/// Waits until the session's socket is readable (or a short interval passes).
fn wait_readable(session: &Session) {
    let fd = session.as_raw_fd();
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pollfd` is a valid, exclusively borrowed array of one element for the duration
    // of the call, and `fd` belongs to the session, which outlives the call.
    #[allow(unsafe_code)]
    unsafe {
        libc::poll(&mut pollfd, 1, POLL_INTERVAL_MS);
    }
}
