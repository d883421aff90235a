//! `run`'s side: scripts go through the job's relay when it has one, and over a connection of
//! `run`'s own when it has none or the relay did not take them.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::frame::{self, Kind};
use super::socket;
use crate::plugin::{Endpoint, PluginError, RemoteExit, ScriptRequest, Transport};
use crate::state::{JobState, StateStore};

/// How often `run` looks at its stop flag while it waits for the relay.
const CANCEL_INTERVAL: Duration = Duration::from_millis(20);

/// Runs one stage's scripts (the `sh` probe, the script): through the job's relay, else
/// directly through the transport.
#[allow(missing_debug_implementations)]
pub struct StageRunner<'a> {
    transport: &'a dyn Transport,
    endpoint: &'a Endpoint,
    relay: Option<UnixStream>,
    /// How long the last script ran in the guest, as the relay saw it.
    script_seconds: Option<f64>,
}

/// How a script sent to the relay ended.
enum Relayed {
    /// The relay ran it (or tried to): this is the outcome.
    Done(Result<RemoteExit, PluginError>),
    /// It exited, after running this many seconds in the guest (if the relay says).
    Exited(RemoteExit, Option<f64>),
    /// Nothing of it ran: run it another way, for this reason.
    NotStarted(String),
}

impl<'a> StageRunner<'a> {
    /// Connects to the job's relay if its state records one that was started with the
    /// transport config `transport_config` ([`crate::config::Config::transport_fingerprint`]);
    /// notes in the job log when it does not use the relay.
    pub fn new(
        store: &StateStore,
        state: &JobState,
        transport_config: &str,
        transport: &'a dyn Transport,
        endpoint: &'a Endpoint,
    ) -> Self {
        let relay = state.relay.as_ref().and_then(|relay| {
            if relay.transport_config != transport_config {
                note("was started with another transport config");
                return None;
            }
            let path = store.relay_socket(state.job_id);
            socket::connect(&path)
                .map_err(|err| note(&format!("is not running ({err})")))
                .ok()
        });
        Self {
            transport,
            endpoint,
            relay,
            script_seconds: None,
        }
    }

    /// How long the last script ran in the guest, where the relay ran it: `run`'s wall time
    /// less this is hyperjob's own time in the stage (the stage-overhead metric).
    pub fn script_seconds(&self) -> Option<f64> {
        self.script_seconds
    }

    /// Runs `request` with the guarantees of [`Transport::run_script`].
    pub fn run_script(
        &mut self,
        request: &ScriptRequest<'_>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<RemoteExit, PluginError> {
        if let Some(relay) = &self.relay {
            tracing::debug!("sending the script to the job's relay");
            // As while the transport works: the signal thread takes (and logs) every signal.
            let deferred = crate::signals::DeferSignals::new();
            let outcome = relayed(relay, request, stdout, stderr);
            drop(deferred);
            match outcome {
                Relayed::Done(outcome) => return outcome,
                Relayed::Exited(exit, seconds) => {
                    self.script_seconds = seconds;
                    return Ok(exit);
                }
                Relayed::NotStarted(why) => {
                    note(&why);
                    self.relay = None;
                }
            }
        }
        self.transport
            .run_script(self.endpoint, request, stdout, stderr)
    }
}

/// The one line in the job log when the relay is not used.
fn note(why: &str) {
    let mut stderr = io::stderr().lock();
    let _ = writeln!(
        stderr,
        "hyperjob: the job's relay {why}; connecting to the guest directly"
    );
    let _ = stderr.flush();
}

/// Sends the script to the relay and relays back what it reports, passing a stop request on.
fn relayed(
    relay: &UnixStream,
    request: &ScriptRequest<'_>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Relayed {
    if request.cancel.load(Ordering::Relaxed) {
        return Relayed::Done(Err(PluginError::Interrupted(
            "before the script was sent to the job's relay; the script was not started".into(),
        )));
    }
    let mut stream = relay;
    let payload = frame::encode_run(request.interpreter, request.script);
    if let Err(err) = frame::write_frame(&mut stream, Kind::Run, &payload) {
        return Relayed::NotStarted(format!("closed its connection ({err})"));
    }
    let mut taken = false;
    let mut cancel_sent = false;
    loop {
        if !cancel_sent && request.cancel.load(Ordering::Relaxed) {
            // A relay that is gone cannot start the script any more either.
            let _ = frame::write_frame(&mut stream, Kind::Cancel, b"");
            cancel_sent = true;
        }
        match socket::wait_readable(relay.as_raw_fd(), CANCEL_INTERVAL) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(err) => return gone(taken, &err.to_string()),
        }
        match frame::read_frame(&mut stream) {
            Ok(Some((Kind::Accepted, _))) => taken = true,
            Ok(Some((Kind::Stdout, data))) => pass_on(stdout, &data),
            Ok(Some((Kind::Stderr, data))) => pass_on(stderr, &data),
            Ok(Some((Kind::Exit, payload))) => {
                return match frame::decode_exit(&payload) {
                    Some(exit) => Relayed::Exited(exit, frame::decode_ran(&payload)),
                    None => Relayed::Done(Err(PluginError::msg(
                        "the job's relay reported an exit it cannot have",
                    ))),
                }
            }
            Ok(Some((Kind::Failed, payload))) => {
                return Relayed::Done(Err(frame::decode_failure(&payload)))
            }
            Ok(Some((Kind::NotStarted, why))) => {
                return Relayed::NotStarted(format!(
                    "could not start the script ({})",
                    String::from_utf8_lossy(&why)
                ))
            }
            Ok(Some((kind, _))) => {
                return Relayed::Done(Err(PluginError::msg(format!(
                    "the job's relay sent what only a client sends ({kind:?})"
                ))))
            }
            Ok(None) => return gone(taken, "it closed the connection"),
            Err(err) => return gone(taken, &err.to_string()),
        }
    }
}

/// The relay went away: before it took the script nothing ran, after that the script's fate
/// is unknown.
fn gone(taken: bool, how: &str) -> Relayed {
    if taken {
        Relayed::Done(Err(PluginError::msg(format!(
            "the job's relay ended while the script was running ({how})"
        ))))
    } else {
        Relayed::NotStarted(format!("ended before it took the script ({how})"))
    }
}

/// Output the job log cannot take is dropped rather than failing the job.
fn pass_on(to: &mut dyn Write, data: &[u8]) {
    let _ = to.write_all(data);
    let _ = to.flush();
}
