//! hyperjob's default transport: SSH through libssh2 (the `ssh2` crate), with the guest's host
//! key verified against pinned keys, a bounded backoff wait for readiness, and scripts fed to
//! the guest shell on stdin with stdout and stderr relayed live and separately.

mod access;
pub mod config;
mod connect;
mod connection;
mod doctor;
pub mod known_hosts;
mod relay;
mod remote;
mod stream;
mod upload;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use hyperjob_core::registry::{PluginContext, TransportFactory};
use hyperjob_core::wait::Backoff;
use hyperjob_core::{
    Address, Connection, Endpoint, EndpointKind, PluginError, RemoteExit, ScriptRequest, Transport,
    Upload,
};
use ssh2::Session;

pub use config::{HostKeyPolicy, SshConfig};
use relay::RelayError;
pub use remote::{kill_command, new_run_id, remote_command, PidCapture, RUN_ID_VAR};
use stream::{greeted, Stream};

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
    #[error("connection to {addr} failed: {source}")]
    ConnectSocket {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0} endpoints are not supported by the ssh transport")]
    Kind(EndpointKind),
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
    /// The stop was asked for before the script was started (nothing runs in the guest).
    #[error("interrupted {0}; the script was not started")]
    Interrupted(&'static str),
}

impl SshError {
    /// A wrong host key (or none of a pinned type) will not fix itself by waiting.
    fn is_permanent(&self) -> bool {
        matches!(
            self,
            SshError::HostKeyMismatch { .. } | SshError::NoPinnedKeyType { .. } | SshError::Kind(_)
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

    /// How messages name the endpoint: `host:port` (the default port filled in), a socket.
    fn addr_text(&self, endpoint: &Endpoint) -> String {
        match &endpoint.address {
            Address::Tcp { host, port } => format!("{host}:{}", port.unwrap_or(self.config.port)),
            other => other.to_string(),
        }
    }

    /// Connects, verifies the host key and logs in. Every blocking step is bounded by
    /// `timeout`, so a socket that accepts connections but never speaks SSH cannot hang us;
    /// after each step a set `cancel` ends it.
    fn open_session(
        &self,
        endpoint: &Endpoint,
        timeout: Duration,
        cancel: &AtomicBool,
    ) -> Result<Session, SshError> {
        interrupted(cancel, "before connecting")?;
        let stream = match &endpoint.address {
            Address::Tcp { .. } => {
                let (addr, addr_text) = self.resolve(endpoint)?;
                Stream::Tcp(
                    TcpStream::connect_timeout(&addr, timeout).map_err(|source| {
                        SshError::Connect {
                            addr: addr_text,
                            source,
                        }
                    })?,
                )
            }
            Address::Unix { path } => {
                Stream::Unix(UnixStream::connect(path).map_err(|source| {
                    SshError::ConnectSocket {
                        addr: self.addr_text(endpoint),
                        source,
                    }
                })?)
            }
            Address::Vsock { .. } => return Err(SshError::Kind(EndpointKind::Vsock)),
        };
        self.session_over(stream, endpoint, timeout, cancel)
    }

    /// A TCP endpoint's socket address, and how errors name it.
    fn resolve(&self, endpoint: &Endpoint) -> Result<(SocketAddr, String), SshError> {
        let Address::Tcp { host, port } = &endpoint.address else {
            return Err(SshError::Kind(endpoint.kind()));
        };
        let port = port.unwrap_or(self.config.port);
        let addr_text = format!("{host}:{port}");
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| SshError::Resolve(addr_text.clone()))?;
        Ok((addr, addr_text))
    }

    /// One connection attempt of [`Transport::wait_ready`]: TCP by probing (connect.rs), a
    /// UNIX socket by one connect (it is local: it either exists and listens, or not yet).
    fn first_stream(
        &self,
        endpoint: &Endpoint,
        window: Duration,
        cancel: &AtomicBool,
    ) -> Result<Stream, SshError> {
        if let Address::Unix { path } = &endpoint.address {
            return UnixStream::connect(path)
                .map(Stream::Unix)
                .map_err(|source| SshError::ConnectSocket {
                    addr: self.addr_text(endpoint),
                    source,
                });
        }
        let (addr, addr_text) = self.resolve(endpoint)?;
        connect::first_connection(addr, window, cancel)
            .map(Stream::Tcp)
            .map_err(|source| match source.kind() {
                ErrorKind::Interrupted => SshError::Interrupted("before connecting"),
                _ => SshError::Connect {
                    addr: addr_text,
                    source,
                },
            })
    }

    /// The SSH session over an open connection: handshake, host key check, login.
    fn session_over(
        &self,
        stream: Stream,
        endpoint: &Endpoint,
        timeout: Duration,
        cancel: &AtomicBool,
    ) -> Result<Session, SshError> {
        let interrupted = |during: &'static str| interrupted(cancel, during);
        let addr_text = self.addr_text(endpoint);
        tracing::debug!("connection to {addr_text} open");
        interrupted("while connecting")?;
        let mut session = Session::new().map_err(|err| SshError::Handshake {
            addr: addr_text.clone(),
            message: err.message().to_string(),
        })?;
        match stream {
            Stream::Tcp(tcp) => {
                let _ = tcp.set_nodelay(true);
                let _ = socket2::SockRef::from(&tcp).set_tcp_user_timeout(Some(DEAD_PEER));
                session.set_tcp_stream(tcp);
            }
            // libssh2 only needs the file descriptor of a connected stream socket. The server
            // speaks first; until it has, send nothing: behind a socket that outlives its
            // sessions (a virtio-serial port) a session only exists once it greets us, and
            // what we sent earlier could reach the one before, still ending.
            Stream::Unix(unix) => {
                greeted(&unix, timeout, cancel).map_err(|err| match err.kind() {
                    ErrorKind::Interrupted => SshError::Interrupted("while connecting"),
                    _ => SshError::Handshake {
                        addr: addr_text.clone(),
                        message: err.to_string(),
                    },
                })?;
                session.set_tcp_stream(unix);
            }
        }
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
        tracing::debug!("SSH handshake with {addr_text} done");
        interrupted("during the SSH handshake")?;
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
        tracing::debug!("logged in as {} at {addr_text}", self.config.user);
        interrupted("while logging in")?;
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
    /// Ends a session with a goodbye, so the server ends it at once rather than when it sees
    /// the connection close (a server behind a UNIX socket, such as one on a virtio-serial
    /// port, may never see that before the next connection arrives).
    fn close(session: &Session) {
        let _ = session.disconnect(None, "done", None);
    }

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

/// What every stage's log says when host keys are not checked.
const INSECURE_WARNING: &str =
    "WARNING: hyperjob does not verify the guest's SSH host key (insecure_ignore_host_key = true)";

fn warn_insecure_once() {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(stderr, "{INSECURE_WARNING}");
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

    /// TCP and UNIX sockets; vsock is not reached (nothing here could test it).
    fn endpoint_kinds(&self) -> Vec<EndpointKind> {
        vec![EndpointKind::Tcp, EndpointKind::Unix]
    }

    fn access_command(
        &self,
        endpoint: &Endpoint,
        dir: &std::path::Path,
    ) -> Result<Vec<String>, PluginError> {
        access::command(&self.config, &self.pinned, endpoint, dir)
    }

    fn doctor(&self) -> Vec<hyperjob_core::Check> {
        doctor::checks(&self.config)
    }

    fn wait_ready(
        &self,
        endpoint: &Endpoint,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<(), PluginError> {
        let _deferred = hyperjob_core::signals::DeferSignals::new();
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut attempts = 0u32;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            // Short first attempts get past a lost first SYN; a UNIX socket has none, and a
            // server behind it may take long to answer the first connection (a guest that
            // starts its SSH server on a virtio-serial port once a client is there).
            let attempts_so_far = match endpoint.address {
                Address::Tcp { .. } => attempts,
                _ => u32::MAX,
            };
            let attempt_timeout =
                attempt_timeout(attempts_so_far, self.config.connect_timeout, remaining);
            attempts = attempts.saturating_add(1);
            // A new connection attempt every 50 ms until one gets through (connect.rs).
            let attempt = self
                .first_stream(endpoint, attempt_timeout, cancel)
                .and_then(|stream| self.session_over(stream, endpoint, attempt_timeout, cancel))
                .and_then(|session| Self::probe(&session).map(|()| session))
                .map(|session| Self::close(&session));
            let err = match attempt {
                Ok(()) => return Ok(()),
                Err(err) if err.is_permanent() => return Err(PluginError::msg(err.to_string())),
                Err(SshError::Interrupted(_)) => {
                    return Err(PluginError::Interrupted("while waiting for SSH".into()))
                }
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
        let _deferred = hyperjob_core::signals::DeferSignals::new();
        let session = self
            .open_session(endpoint, self.config.connect_timeout, request.cancel)
            .map_err(|err| interrupted_or(err, request.cancel))?;
        let outcome = relay::relay(&session, request, self.config.umask, stdout, stderr);
        Self::close(&session);
        outcome.map_err(|err| match err {
            RelayError::Ssh(SshError::Interrupted(during)) => not_started(during),
            RelayError::Ssh(err) => PluginError::msg(err.to_string()),
            RelayError::Interrupted => {
                PluginError::Interrupted("while the script was running".into())
            }
        })
    }

    fn upload(&self, endpoint: &Endpoint, upload: &Upload<'_>) -> Result<(), PluginError> {
        let _deferred = hyperjob_core::signals::DeferSignals::new();
        upload::check_remote(upload.remote).map_err(PluginError::Config)?;
        let file = std::fs::File::open(upload.local).map_err(|err| {
            PluginError::system(format!("cannot read {}", upload.local.display()), err)
        })?;
        let size = file
            .metadata()
            .map_err(|err| {
                PluginError::system(format!("cannot read {}", upload.local.display()), err)
            })?
            .len();
        let session = self
            .open_session(endpoint, self.config.connect_timeout, upload.cancel)
            .map_err(|err| interrupted_or(err, upload.cancel))?;
        upload::send(&session, upload, file, size).map_err(|err| match err {
            SshError::Interrupted(during) => PluginError::Interrupted(during.to_string()),
            err => PluginError::msg(err.to_string()),
        })
    }

    fn can_connect(&self) -> bool {
        self.config.relay
    }

    fn connect(
        &self,
        endpoint: &Endpoint,
        cancel: &AtomicBool,
    ) -> Result<Box<dyn Connection>, PluginError> {
        let _deferred = hyperjob_core::signals::DeferSignals::new();
        let session = self
            .open_session(endpoint, self.config.connect_timeout, cancel)
            .map_err(|err| match err {
                SshError::Interrupted(during) => PluginError::Interrupted(during.to_string()),
                err => PluginError::msg(err.to_string()),
            })?;
        session.set_keepalive(false, relay::KEEPALIVE_SECS);
        // Said in every stage, as a connection of the stage's own would.
        let warning = self
            .expected_host_keys(endpoint)
            .is_none()
            .then_some(INSECURE_WARNING);
        Ok(Box::new(connection::SshConnection::new(
            session,
            self.config.umask,
            self.config.connect_timeout,
            warning,
        )))
    }
}

/// `Interrupted(during)` once a stop was asked for.
fn interrupted(cancel: &AtomicBool, during: &'static str) -> Result<(), SshError> {
    if cancel.load(Ordering::Relaxed) {
        Err(SshError::Interrupted(during))
    } else {
        Ok(())
    }
}

/// A stop that came before anything of the script ran in the guest.
fn not_started(during: &str) -> PluginError {
    PluginError::Interrupted(format!("{during}; the script was not started"))
}

/// A failure to open the session: `Interrupted` when a stop was asked for meanwhile.
fn interrupted_or(err: SshError, cancel: &AtomicBool) -> PluginError {
    match err {
        SshError::Interrupted(during) => not_started(during),
        err if cancel.load(Ordering::Relaxed) => not_started(&format!(
            "while opening the SSH session (which then failed: {err})"
        )),
        err => PluginError::msg(err.to_string()),
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
