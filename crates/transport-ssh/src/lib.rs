//! hyperjob's default transport: SSH through libssh2 (the `ssh2` crate), with the guest's host
//! key verified against pinned keys, a bounded backoff wait for readiness, and scripts fed to
//! the guest shell on stdin with stdout and stderr relayed live and separately.

pub mod config;
pub mod known_hosts;
mod remote;

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use hyperjob_core::registry::{PluginContext, TransportFactory};
use hyperjob_core::wait::Backoff;
use hyperjob_core::{Endpoint, PluginError, RemoteExit, ScriptRequest, Transport};
use ssh2::Session;

pub use config::{HostKeyPolicy, SshConfig};
pub use remote::{kill_command, new_run_id, remote_command, PidCapture, RUN_ID_VAR};

const READ_CHUNK: usize = 32 * 1024;
/// How long the relay loop waits for the socket before checking for cancellation again.
const POLL_INTERVAL_MS: i32 = 200;
/// Keepalive interval while a script runs: keeps NAT and firewalls from dropping a quiet
/// connection, and gives the kernel data whose acknowledgement it can miss.
const KEEPALIVE_SECS: u32 = 15;
/// A connection whose sent data stays unacknowledged this long is dead (`TCP_USER_TIMEOUT`):
/// a guest that died or hung cannot keep a stage waiting until the job timeout.
const DEAD_PEER: Duration = Duration::from_secs(45);

inventory::submit! {
    TransportFactory {
        name: "ssh",
        version: env!("CARGO_PKG_VERSION"),
        build,
    }
}

fn build(ctx: &PluginContext, table: &toml::Table) -> Result<Box<dyn Transport>, PluginError> {
    Ok(Box::new(SshTransport::new(SshConfig::from_table(
        table,
        ctx.guest_keys,
    )?)?))
}

#[derive(Debug, thiserror::Error)]
enum SshError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("TCP connection to {addr} failed: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("SSH handshake with {addr} failed: {message}")]
    Handshake { addr: String, message: String },
    #[error("host key of {addr} ({key_type} {fingerprint}) is not in {known_hosts}")]
    HostKeyMismatch {
        addr: String,
        key_type: String,
        fingerprint: String,
        known_hosts: String,
    },
    #[error(
        "{addr} offers no host key of the types pinned in {known_hosts} \
         (the key exchange failed with only {algorithms} offered: {message})"
    )]
    NoPinnedKeyType {
        addr: String,
        algorithms: String,
        known_hosts: String,
        message: String,
    },
    #[error("login as {user} at {addr} failed: {message}")]
    Auth {
        addr: String,
        user: String,
        message: String,
    },
    #[error("{what} failed: {message}")]
    Channel { what: &'static str, message: String },
}

impl SshError {
    /// A wrong host key (or none of a pinned type) will not fix itself by waiting.
    fn is_permanent(&self) -> bool {
        matches!(
            self,
            SshError::HostKeyMismatch { .. } | SshError::NoPinnedKeyType { .. }
        )
    }
}

/// libssh2's "key exchange failed" (no algorithm in common, among others).
const LIBSSH2_ERROR_KEX_FAILURE: std::os::raw::c_int = -5;

fn channel_error(what: &'static str, err: &ssh2::Error) -> SshError {
    SshError::Channel {
        what,
        message: err.message().to_string(),
    }
}

/// The SSH transport.
#[derive(Debug)]
pub struct SshTransport {
    config: SshConfig,
    pinned: Vec<known_hosts::HostKey>,
}

impl SshTransport {
    pub fn new(config: SshConfig) -> Result<Self, PluginError> {
        if let Some(identity_file) = &config.identity_file {
            if !identity_file.is_file() {
                return Err(PluginError::NotFound(format!(
                    "identity_file {} does not exist",
                    identity_file.display()
                )));
            }
        }
        let pinned = match &config.host_keys {
            HostKeyPolicy::KnownHosts(path) => {
                let text = std::fs::read_to_string(path).map_err(|err| match err.kind() {
                    ErrorKind::NotFound => PluginError::NotFound(format!(
                        "known_hosts file {} does not exist",
                        path.display()
                    )),
                    _ => PluginError::system(
                        format!("cannot read known_hosts file {}", path.display()),
                        err,
                    ),
                })?;
                let keys = known_hosts::parse(&text);
                if keys.is_empty() {
                    return Err(PluginError::Config(format!(
                        "known_hosts file {} contains no host keys",
                        path.display()
                    )));
                }
                keys
            }
            HostKeyPolicy::PerJob | HostKeyPolicy::InsecureIgnore => Vec::new(),
        };
        Ok(Self { config, pinned })
    }

    fn port(&self, endpoint: &Endpoint) -> u16 {
        endpoint.port.unwrap_or(self.config.port)
    }

    /// Connects, verifies the host key and logs in. Every blocking step is bounded by
    /// `timeout`, so a port that accepts TCP but never speaks SSH cannot hang us.
    fn open_session(&self, endpoint: &Endpoint, timeout: Duration) -> Result<Session, SshError> {
        let port = self.port(endpoint);
        let addr_text = format!("{}:{port}", endpoint.host);
        let addr = (endpoint.host.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| SshError::Resolve(addr_text.clone()))?;
        let tcp =
            TcpStream::connect_timeout(&addr, timeout).map_err(|source| SshError::Connect {
                addr: addr_text.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let _ = socket2::SockRef::from(&tcp).set_tcp_user_timeout(Some(DEAD_PEER));
        let mut session = Session::new().map_err(|err| SshError::Handshake {
            addr: addr_text.clone(),
            message: err.message().to_string(),
        })?;
        session.set_tcp_stream(tcp);
        session.set_timeout(u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX));
        let expected = self.expected_host_keys(endpoint);
        // Ask for a host key we can check, as OpenSSH's client does: a server with several
        // host keys would otherwise present the one the library likes best.
        let algorithms = expected
            .as_ref()
            .and_then(|(keys, _)| known_hosts::host_key_algorithms(keys));
        if let Some(algorithms) = &algorithms {
            session
                .method_pref(ssh2::MethodType::HostKey, algorithms)
                .map_err(|err| SshError::Handshake {
                    addr: addr_text.clone(),
                    message: format!(
                        "cannot offer the host-key algorithms {algorithms}: {}",
                        err.message()
                    ),
                })?;
        }
        session
            .handshake()
            .map_err(|err| match (&algorithms, &expected) {
                // The key exchange itself failed with only the pinned types offered: the guest
                // has no host key of those types (waiting will not change that).
                (Some(algorithms), Some((_, source)))
                    if err.code() == ssh2::ErrorCode::Session(LIBSSH2_ERROR_KEX_FAILURE) =>
                {
                    SshError::NoPinnedKeyType {
                        addr: addr_text.clone(),
                        algorithms: algorithms.clone(),
                        known_hosts: source.clone(),
                        message: err.message().to_string(),
                    }
                }
                _ => SshError::Handshake {
                    addr: addr_text.clone(),
                    message: err.message().to_string(),
                },
            })?;
        self.verify_host_key(&session, expected, &addr_text)?;
        let identity_file = endpoint
            .identity_file
            .as_ref()
            .or(self.config.identity_file.as_ref())
            .ok_or_else(|| SshError::Auth {
                addr: addr_text.clone(),
                user: self.config.user.clone(),
                message: "no client key: the job has no per-job key and none is configured"
                    .to_string(),
            })?;
        session
            .userauth_pubkey_file(&self.config.user, None, identity_file, None)
            .map_err(|err| SshError::Auth {
                addr: addr_text.clone(),
                user: self.config.user.clone(),
                message: err.message().to_string(),
            })?;
        Ok(session)
    }

    /// The host keys the guest may present and where they come from; `None` when host keys
    /// are not checked (`insecure_ignore_host_key`).
    fn expected_host_keys(
        &self,
        endpoint: &Endpoint,
    ) -> Option<(Vec<known_hosts::HostKey>, String)> {
        match (&endpoint.host_key, &self.config.host_keys) {
            (Some(line), _) => Some((known_hosts::parse(line), "the job's host key".to_string())),
            (None, HostKeyPolicy::KnownHosts(path)) => {
                Some((self.pinned.clone(), path.display().to_string()))
            }
            (None, HostKeyPolicy::InsecureIgnore) => None,
            (None, HostKeyPolicy::PerJob) => {
                Some((Vec::new(), "the job's host key (missing)".to_string()))
            }
        }
    }

    fn verify_host_key(
        &self,
        session: &Session,
        expected: Option<(Vec<known_hosts::HostKey>, String)>,
        addr: &str,
    ) -> Result<(), SshError> {
        let Some((expected, source)) = expected else {
            warn_insecure_once();
            return Ok(());
        };
        let (blob, key_type) = session.host_key().ok_or_else(|| SshError::Handshake {
            addr: addr.to_string(),
            message: "the server sent no host key".to_string(),
        })?;
        if expected.iter().any(|key| key.blob == blob) {
            return Ok(());
        }
        Err(SshError::HostKeyMismatch {
            addr: addr.to_string(),
            key_type: format!("{key_type:?}"),
            fingerprint: known_hosts::fingerprint(blob),
            known_hosts: source,
        })
    }

    /// Runs `true` to prove the guest executes commands for us.
    fn probe(session: &Session) -> Result<(), SshError> {
        let mut channel = session
            .channel_session()
            .map_err(|e| channel_error("opening a channel", &e))?;
        channel
            .exec("true")
            .map_err(|e| channel_error("running a probe command", &e))?;
        let mut sink = Vec::new();
        let _ = channel.read_to_end(&mut sink);
        channel
            .wait_close()
            .map_err(|e| channel_error("closing the probe channel", &e))?;
        match channel.exit_status() {
            Ok(0) => Ok(()),
            Ok(code) => Err(SshError::Channel {
                what: "the probe command",
                message: format!("exited with {code}"),
            }),
            Err(e) => Err(channel_error("reading the probe's exit status", &e)),
        }
    }
}

/// The time one readiness attempt may take: short at first, doubling up to
/// `connect_timeout`. Some port forwarders (QEMU user-mode networking) accept the TCP
/// connection before the guest listens and then stall it for seconds; a short first attempt
/// gives up on such a connection quickly, while a slow but live guest still gets the full
/// timeout after a few attempts.
pub fn attempt_timeout(attempt: u32, connect_timeout: Duration, remaining: Duration) -> Duration {
    let grown = Duration::from_secs(2).saturating_mul(1u32 << attempt.min(16));
    grown
        .min(connect_timeout)
        .min(remaining)
        .max(Duration::from_millis(100))
}

fn warn_insecure_once() {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(
            stderr,
            "WARNING: hyperjob does not verify the guest's SSH host key (insecure_ignore_host_key = true)"
        );
        let _ = stderr.flush();
    });
}

impl Transport for SshTransport {
    fn ready_timeout(&self) -> Duration {
        self.config.ready_timeout
    }

    fn login_user(&self) -> Option<String> {
        Some(self.config.user.clone())
    }

    fn wait_ready(
        &self,
        endpoint: &Endpoint,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<(), PluginError> {
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut attempts = 0u32;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt_timeout = attempt_timeout(attempts, self.config.connect_timeout, remaining);
            attempts = attempts.saturating_add(1);
            let attempt = self
                .open_session(endpoint, attempt_timeout)
                .and_then(|session| Self::probe(&session));
            let err = match attempt {
                Ok(()) => return Ok(()),
                Err(err) if err.is_permanent() => return Err(PluginError::msg(err.to_string())),
                Err(err) => err,
            };
            tracing::debug!("guest not ready yet: {err}");
            if !backoff.sleep(deadline, cancel) {
                if cancel.load(Ordering::Relaxed) {
                    return Err(PluginError::Interrupted("while waiting for SSH".into()));
                }
                return Err(PluginError::Timeout {
                    what: format!("waiting for SSH at {endpoint} (last error: {err})"),
                    secs: started.elapsed().as_secs(),
                });
            }
        }
    }

    fn run_script(
        &self,
        endpoint: &Endpoint,
        request: &ScriptRequest<'_>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<RemoteExit, PluginError> {
        let session = self
            .open_session(endpoint, self.config.connect_timeout)
            .map_err(|err| PluginError::msg(err.to_string()))?;
        relay(&session, request, self.config.umask, stdout, stderr).map_err(|err| match err {
            RelayError::Ssh(err) => PluginError::msg(err.to_string()),
            RelayError::Interrupted => {
                PluginError::Interrupted("while the script was running".into())
            }
        })
    }
}

#[derive(Debug)]
enum RelayError {
    Ssh(SshError),
    Interrupted,
}

impl From<SshError> for RelayError {
    fn from(err: SshError) -> Self {
        RelayError::Ssh(err)
    }
}

/// How long a cancelled script gets to finish and flush its output before we give up on it.
const CANCEL_GRACE: Duration = Duration::from_millis(1500);

/// Starts the interpreter, feeds it the script on stdin and relays its output until it exits.
/// On cancellation the script's process group in the guest is stopped, its last output is
/// relayed for a short grace period, and the relay ends.
fn relay(
    session: &Session,
    request: &ScriptRequest<'_>,
    umask: u32,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<RemoteExit, RelayError> {
    let mut channel = session
        .channel_session()
        .map_err(|e| channel_error("opening a channel", &e))?;
    let run_id = new_run_id();
    channel
        .exec(&remote_command(request.interpreter, umask, &run_id))
        .map_err(|e| channel_error("starting the guest shell", &e))?;
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
    let mut capture = PidCapture::default();
    let mut cancelled_at: Option<Instant> = None;
    loop {
        if cancelled_at.is_none() && request.cancel.load(Ordering::Relaxed) {
            cancelled_at = Some(Instant::now());
            stop_remote(session, capture.pid(), &run_id);
        }
        if cancelled_at.is_some_and(|at| at.elapsed() > CANCEL_GRACE) {
            flush_held(&mut capture, stderr);
            return Err(RelayError::Interrupted);
        }
        let mut progressed = pump(&mut channel, &mut buf, stdout, None)?;
        progressed |= pump(&mut channel.stderr(), &mut buf, stderr, Some(&mut capture))?;
        if channel.eof() && !progressed {
            flush_held(&mut capture, stderr);
            break;
        }
        if !progressed {
            let _ = session.keepalive_send();
            wait_readable(session);
        }
    }
    if cancelled_at.is_some() {
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

/// Passes on stderr bytes the pid capture still holds.
fn flush_held(capture: &mut PidCapture, stderr: &mut dyn Write) {
    let held = capture.finish();
    if !held.is_empty() {
        let _ = stderr.write_all(&held);
        let _ = stderr.flush();
    }
}

/// Sends the kill command on a second channel of the same session. Best effort: if it cannot
/// be delivered, cleanup destroys the VM anyway. Without the process group (the pid line never
/// came) the run's marker alone still finds the script's processes.
fn stop_remote(session: &Session, pgid: Option<u32>, run_id: &str) {
    if pgid.is_none() {
        tracing::warn!(
            "the remote shell's process group is unknown; stopping the script by its run marker only"
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_attempts_start_short_and_grow_to_the_connect_timeout() {
        let timeouts: Vec<u64> = (0..5)
            .map(|n| {
                attempt_timeout(n, Duration::from_secs(10), Duration::from_secs(300)).as_secs()
            })
            .collect();

        assert_eq!(timeouts, vec![2, 4, 8, 10, 10]);
    }

    #[test]
    fn a_readiness_attempt_never_outlasts_the_deadline() {
        let timeout = attempt_timeout(3, Duration::from_secs(10), Duration::from_millis(700));

        assert_eq!(timeout, Duration::from_millis(700));
        assert_eq!(
            attempt_timeout(0, Duration::from_secs(10), Duration::ZERO),
            Duration::from_millis(100)
        );
    }
}
