//! The relay process itself: `hyperjob relay <job id>`, started by prepare (see the parent
//! module). One connection to the guest, one client at a time, one script at a time.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::frame::{self, Kind};
use super::socket;
use crate::config::Config;
use crate::exit::StageOutcome;
use crate::plugin::{Connection, Endpoint, PluginError, ScriptRequest, Transport};
use crate::registry::Registry;
use crate::runner::{identity_of, ProcessIdentity};
use crate::stages::{build_transport, unix_now};
use crate::state::{JobState, Phase, StateStore};

/// How long a new relay waits for prepare to record it in the job's state.
const RECORD_WAIT: Duration = Duration::from_secs(10);
/// How often the relay looks at the job's state (and its own reasons to end) while idle.
const TICK: Duration = Duration::from_millis(250);
/// How often an idle relay lets its connection keep itself alive.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// How long a client may take to send its next script before it is let go.
const REQUEST_WAIT: Duration = Duration::from_secs(30);
/// How often the client watcher looks at the relay's own stop flag.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);

/// The frames to the current client, shared by the script's output and the relay's log lines.
type ClientWriter = Arc<Mutex<UnixStream>>;

/// The client whose job log gets the relay's log lines while its script runs.
static LOG_CLIENT: Mutex<Option<ClientWriter>> = Mutex::new(None);

/// Where the relay's log lines go: to the current client's stderr (its job log), else nowhere.
pub fn log_writer() -> impl Write {
    FrameWriter {
        kind: Kind::Stderr,
        to: LOG_CLIENT.lock().ok().and_then(|client| client.clone()),
    }
}

/// Writes each buffer it is given as one frame of `kind` to the client, if there is one.
/// Output the client cannot take is dropped (a client that is gone stopped the script).
struct FrameWriter {
    kind: Kind,
    to: Option<ClientWriter>,
}

impl Write for FrameWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let (Some(to), false) = (&self.to, data.is_empty()) {
            if let Ok(mut stream) = to.lock() {
                let _ = frame::write_frame(&mut *stream, self.kind, data);
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `hyperjob relay <job_id>`: serves the job's stages until a reason to end comes (see the
/// parent module). `stop` is the process's SIGTERM/SIGINT flag.
pub fn serve(
    config: &Config,
    registry: &Registry,
    job_id: u64,
    stop: &AtomicBool,
) -> anyhow::Result<StageOutcome> {
    let store = StateStore::new(&config.state_dir);
    let me = identity_of(Path::new("/proc"), std::process::id())
        .context("cannot read this process's identity from /proc")?;
    let state = recorded(&store, job_id, &me, stop)?;
    let started_with = state.relay.as_ref().map(|r| r.transport_config.as_str());
    if started_with != Some(config.transport_fingerprint().as_str()) {
        bail!("the config changed since prepare recorded this relay");
    }
    let endpoint = state
        .endpoint
        .clone()
        .context("the job's state has no endpoint")?;
    let listener = socket::passed_listener()
        .context("the relay's socket was not passed to it (prepare starts the relay)")?;
    let _socket = OwnSocket::new(store.relay_socket(job_id))?;
    let transport = build_transport(config, registry)?;
    let connection = connect(transport.as_ref(), &endpoint, stop)?;
    let mut relay = Relay {
        store,
        job_id,
        me,
        deadline_unix: state.deadline_unix,
        transport,
        endpoint,
        connection,
        last_used: Instant::now(),
    };
    relay.serve(&listener, stop)?;
    Ok(StageOutcome::Success)
}

fn connect(
    transport: &dyn Transport,
    endpoint: &Endpoint,
    stop: &AtomicBool,
) -> anyhow::Result<Box<dyn Connection>> {
    let mut connection = transport
        .connect(endpoint, stop)
        .with_context(|| format!("cannot connect to the guest at {endpoint}"))?;
    connection
        .idle()
        .with_context(|| format!("the new connection to {endpoint} does not work"))?;
    Ok(connection)
}

/// Waits until the job's state is ready and names this process as its relay (prepare writes
/// that right after starting it).
fn recorded(
    store: &StateStore,
    job_id: u64,
    me: &ProcessIdentity,
    stop: &AtomicBool,
) -> anyhow::Result<JobState> {
    let started = Instant::now();
    loop {
        if let Ok(Some(state)) = store.load(job_id) {
            let mine = state
                .relay
                .as_ref()
                .is_some_and(|r| r.process.is_same_process(me));
            if mine && state.phase == Phase::Ready {
                return Ok(state);
            }
        }
        if stop.load(Ordering::Relaxed) || started.elapsed() > RECORD_WAIT {
            bail!("job {job_id}'s state does not name this relay");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The socket file, removed when the relay ends, unless another relay has bound its own there
/// since.
struct OwnSocket {
    path: PathBuf,
    inode: u64,
}

impl OwnSocket {
    fn new(path: PathBuf) -> anyhow::Result<Self> {
        let inode = std::fs::symlink_metadata(&path)
            .with_context(|| format!("cannot look at {}", path.display()))?
            .ino();
        Ok(Self { path, inode })
    }
}

impl Drop for OwnSocket {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|meta| meta.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The place of a connection that was lost, while the next is made.
struct Lost;

impl Connection for Lost {
    fn run_script(
        &mut self,
        _: &ScriptRequest<'_>,
        _: &mut dyn Write,
        _: &mut dyn Write,
    ) -> Result<crate::plugin::RemoteExit, PluginError> {
        Err(PluginError::NotStarted(
            "the relay's connection to the guest was lost".into(),
        ))
    }

    fn idle(&mut self) -> Result<(), PluginError> {
        Err(PluginError::NotStarted(
            "the relay's connection to the guest was lost".into(),
        ))
    }
}

/// What a client's watcher hands the relay.
enum Incoming {
    Script(&'static str, Vec<u8>),
    Closed,
}

struct Relay {
    store: StateStore,
    job_id: u64,
    me: ProcessIdentity,
    deadline_unix: u64,
    transport: Box<dyn Transport>,
    endpoint: Endpoint,
    connection: Box<dyn Connection>,
    last_used: Instant,
}

impl Relay {
    fn serve(&mut self, listener: &UnixListener, stop: &AtomicBool) -> anyhow::Result<()> {
        let mut last_idle = Instant::now();
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if let Some(why) = self.reason_to_end() {
                tracing::debug!("the relay ends: {why}");
                return Ok(());
            }
            if !socket::wait_readable(listener.as_raw_fd(), TICK)? {
                if last_idle.elapsed() >= KEEPALIVE {
                    self.idle(stop)?;
                    last_idle = Instant::now();
                }
                continue;
            }
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err).context("cannot accept a client"),
            };
            self.client(stream, stop);
            self.last_used = Instant::now();
            self.idle(stop)?;
            last_idle = Instant::now();
        }
    }

    /// Lets the connection get ready for the next script; a lost connection is made anew
    /// once (a stage may end it: under dropbear, stopping a script ends every process of the
    /// connection it ran on).
    fn idle(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        let Err(err) = self.connection.idle() else {
            return Ok(());
        };
        tracing::debug!("the relay's connection is lost ({err}); connecting again");
        // The lost one goes first: behind a socket that serves one session at a time (a
        // virtio-serial port's) the new one would wait for it to close.
        self.connection = Box::new(Lost);
        self.connection = connect(self.transport.as_ref(), &self.endpoint, stop)
            .context("the connection to the guest was lost")?;
        Ok(())
    }

    /// Why the relay should end now, if it should.
    fn reason_to_end(&self) -> Option<String> {
        match self.store.load(self.job_id) {
            Ok(None) => return Some("the job's state is gone".into()),
            Ok(Some(state))
                if !state
                    .relay
                    .as_ref()
                    .is_some_and(|r| r.process.is_same_process(&self.me)) =>
            {
                return Some("the job's state names another relay".into())
            }
            // Unreadable for now: cleanup or gc decide, and end the relay.
            _ => {}
        }
        if unix_now() > self.deadline_unix {
            return Some("the job's deadline has passed".into());
        }
        if self.last_used.elapsed() > super::IDLE_LIMIT {
            return Some(format!(
                "no script for {} s",
                self.last_used.elapsed().as_secs()
            ));
        }
        None
    }

    /// Serves one client: its scripts, one after the other, until it closes the connection.
    fn client(&mut self, stream: UnixStream, stop: &AtomicBool) {
        match socket::peer_uid(&stream) {
            Ok(uid) if uid == socket::own_uid() => {}
            other => {
                tracing::warn!(
                    "refused a client of the relay socket that is not this user's ({other:?})"
                );
                return;
            }
        }
        let Ok(writer) = stream.try_clone() else {
            return;
        };
        let writer: ClientWriter = Arc::new(Mutex::new(writer));
        if let Ok(mut client) = LOG_CLIENT.lock() {
            *client = Some(Arc::clone(&writer));
        }
        let cancel = AtomicBool::new(false);
        let (incoming, scripts) = mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| watch(&stream, &cancel, stop, &incoming));
            // Until the client closes the connection (or takes too long to send a script).
            while let Ok(Incoming::Script(interpreter, script)) = scripts.recv_timeout(REQUEST_WAIT)
            {
                self.run(interpreter, &script, &cancel, &writer);
            }
            // Ends the watcher's read, if the client has not ended it.
            let _ = stream.shutdown(std::net::Shutdown::Both);
        });
        if let Ok(mut client) = LOG_CLIENT.lock() {
            *client = None;
        }
    }

    /// Runs one script for the client and reports how it ended.
    fn run(
        &mut self,
        interpreter: &'static str,
        script: &[u8],
        cancel: &AtomicBool,
        writer: &ClientWriter,
    ) {
        let send = |kind: Kind, payload: &[u8]| {
            if let Ok(mut stream) = writer.lock() {
                let _ = frame::write_frame(&mut *stream, kind, payload);
            }
        };
        send(Kind::Accepted, b"");
        let request = ScriptRequest {
            interpreter,
            script,
            cancel,
        };
        let mut stdout = FrameWriter {
            kind: Kind::Stdout,
            to: Some(Arc::clone(writer)),
        };
        let mut stderr = FrameWriter {
            kind: Kind::Stderr,
            to: Some(Arc::clone(writer)),
        };
        let started = std::time::Instant::now();
        match self
            .connection
            .run_script(&request, &mut stdout, &mut stderr)
        {
            Ok(exit) => send(
                Kind::Exit,
                &frame::encode_exit(&exit, started.elapsed().as_secs_f64()),
            ),
            Err(PluginError::NotStarted(why)) => send(Kind::NotStarted, why.as_bytes()),
            Err(err) => send(Kind::Failed, &frame::encode_failure(&err)),
        }
    }
}

/// Reads the client's frames: scripts go to the relay, a stop request or the client's end (it
/// was killed, or it is done) sets `cancel`, and so does the relay's own `stop`.
fn watch(
    stream: &UnixStream,
    cancel: &AtomicBool,
    stop: &AtomicBool,
    incoming: &mpsc::Sender<Incoming>,
) {
    let closed = || {
        cancel.store(true, Ordering::Relaxed);
        let _ = incoming.send(Incoming::Closed);
    };
    let mut reader = stream;
    loop {
        if stop.load(Ordering::Relaxed) {
            cancel.store(true, Ordering::Relaxed);
        }
        match socket::wait_readable(stream.as_raw_fd(), WATCH_INTERVAL) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(_) => return closed(),
        }
        match frame::read_frame(&mut reader) {
            Ok(Some((Kind::Run, payload))) => match frame::decode_run(payload) {
                Some((interpreter, script)) => {
                    let _ = incoming.send(Incoming::Script(interpreter, script));
                }
                None => return closed(),
            },
            Ok(Some((Kind::Cancel, _))) => cancel.store(true, Ordering::Relaxed),
            Ok(_) | Err(_) => return closed(),
        }
    }
}
