//! The job's relay: one process per job that keeps one connection to the guest open for all of
//! the job's stages, so a `run` costs no new connection (TCP, SSH handshake, login).
//!
//! - **Start**: when prepare has made the job ready (a cold boot or a claim from the pool, both
//!   through [`save_ready`]) and the transport can keep a connection
//!   ([`crate::Transport::can_connect`]), prepare starts `hyperjob relay <job id>` detached
//!   ([`crate::detach`]) and records its identity (pid, start time, boot) in the job's state.
//! - **Serve** ([`serve`]): the relay waits until the job's record names it, binds
//!   `<state_dir>/job-<id>.relay.sock` (0600 in the 0700 state dir; only processes of the same
//!   user are served), connects ([`crate::Transport::connect`]) and runs the scripts `run`
//!   sends, one at a time, streaming their output back ([`frame`]).
//! - **Use** ([`StageRunner`]): `run` sends its script through the socket; when the relay is
//!   gone or has not taken the script, `run` connects directly as before, with one line in the
//!   job log. A SIGTERM to `run` is passed on; a `run` that vanishes (SIGKILL) stops its script
//!   too: either way the relay stops the script's process tree in the guest, as `run` would.
//! - **End**: `cleanup` and `gc` end it ([`stop`]: by pid after checking its identity) and
//!   remove the socket. It also ends on its own once the job's state is gone or names another
//!   relay, at the job's deadline, after [`IDLE_LIMIT`] without a script, when its connection
//!   is lost, and on SIGTERM/SIGINT (after stopping a script it runs).

mod client;
mod frame;
mod server;
mod socket;

pub use client::StageRunner;
pub use server::{log_writer, serve};

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::plugin::Transport;
use crate::runner::{identity_of, is_alive, ProcessIdentity};
use crate::state::{JobState, StateStore};

/// The job's relay, as prepare records it in the job's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRecord {
    pub process: ProcessIdentity,
    /// [`Config::transport_fingerprint`] of the config it was started with: a `run` whose
    /// config differs (another `known_hosts`, say) connects and verifies on its own.
    pub transport_config: String,
}

/// A relay that has run no script for this long ends (later stages connect directly).
pub const IDLE_LIMIT: Duration = Duration::from_secs(600);
/// How long [`stop`] waits for a relay to be gone after SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Saves the job's record as ready: the one place a cold boot and a claim from the pool both
/// go through. Starts the job's relay first, when the transport can keep a connection, and
/// records it; a relay that cannot be started only costs speed.
pub fn save_ready(
    config: &Config,
    transport: &dyn Transport,
    store: &StateStore,
    record: JobState,
) -> anyhow::Result<()> {
    let relay = if transport.can_connect() {
        start(config, store, record.job_id).map(|process| RelayRecord {
            process,
            transport_config: config.transport_fingerprint(),
        })
    } else {
        None
    };
    let record = JobState {
        relay: relay.clone(),
        ..record
    };
    if let Err(err) = store.save(&record) {
        stop(store, record.job_id, relay.as_ref());
        return Err(err.into());
    }
    Ok(())
}

/// Binds the job's relay socket and starts `hyperjob relay <job_id>` with it (as descriptor
/// [`crate::detach::PASSED_FD`]): the socket exists before the job is ready, so the first
/// stage's `run` never misses a relay that is still starting (it waits in the socket's backlog
/// instead). The relay's identity, or `None` (with a warning) when it could not be started.
fn start(config: &Config, store: &StateStore, job_id: u64) -> Option<ProcessIdentity> {
    let path = store.relay_socket(job_id);
    let started = socket::bind_private(&path).and_then(|listener| {
        let args = ["relay", &job_id.to_string()];
        crate::detach::spawn_hyperjob(&config.path, &args, Some(listener.as_fd()))
    });
    let identity = match started {
        Ok(child) => identity_of(Path::new("/proc"), child.id()),
        Err(err) => {
            tracing::warn!("cannot start the job's relay ({err}): every stage connects anew");
            None
        }
    };
    if identity.is_none() {
        let _ = std::fs::remove_file(&path);
    }
    identity
}

/// Ends the job's relay `relay` if that very process still runs, waits until it is gone, and
/// removes its socket.
pub fn stop(store: &StateStore, job_id: u64, relay: Option<&RelayRecord>) {
    if let Some(relay) = relay {
        end_process(&relay.process);
    }
    match std::fs::remove_file(store.relay_socket(job_id)) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => tracing::warn!("cannot remove the relay's socket: {err}"),
    }
}

/// SIGKILL to `process`, through a pidfd opened before its identity is checked (so a reused
/// pid is never hit), then a bounded wait until it has exited.
#[allow(unsafe_code)]
fn end_process(process: &ProcessIdentity) {
    let proc_root = Path::new("/proc");
    let Ok(pid) = libc::pid_t::try_from(process.pid) else {
        return;
    };
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        // ESRCH: it is gone already. ENOSYS (a kernel before 5.3) is not supported: the relay
        // ends on its own once the job's state is gone.
        return;
    }
    let Ok(pidfd) = i32::try_from(pidfd) else {
        return;
    };
    // SAFETY: `pidfd` was just returned to us and is owned by nothing else.
    let pidfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd) };
    if is_alive(proc_root, process) != Some(true) {
        return;
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&pidfd);
    // SAFETY: pidfd_send_signal(2) on a pidfd we own, with no siginfo.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd,
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if sent != 0 {
        tracing::warn!(
            "cannot end the job's relay (pid {}): {}",
            process.pid,
            std::io::Error::last_os_error()
        );
        return;
    }
    // A pidfd becomes readable once its process has exited.
    let started = Instant::now();
    while started.elapsed() < STOP_WAIT {
        match socket::wait_readable(fd, STOP_WAIT.saturating_sub(started.elapsed())) {
            Ok(true) | Err(_) => return,
            Ok(false) => {}
        }
    }
    tracing::warn!("the job's relay (pid {}) did not end", process.pid);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(process: ProcessIdentity) -> RelayRecord {
        RelayRecord {
            process,
            transport_config: "test".into(),
        }
    }

    #[test]
    fn stop_ends_the_recorded_process_and_removes_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        let mut child = std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .expect("sleep");
        let identity = identity_of(Path::new("/proc"), child.id()).expect("identity");
        std::fs::write(store.relay_socket(7), "").expect("socket stand-in");

        stop(&store, 7, Some(&record(identity)));

        let status = child.try_wait().expect("try_wait");
        assert_eq!(
            status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
            Some(libc::SIGKILL)
        );
        assert!(!store.relay_socket(7).exists());
    }

    #[test]
    fn stop_never_hits_another_process_under_a_recorded_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        let mut child = std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .expect("sleep");
        let identity = identity_of(Path::new("/proc"), child.id()).expect("identity");
        let earlier = ProcessIdentity {
            start_ticks: identity.start_ticks.saturating_sub(1),
            ..identity
        };

        stop(&store, 7, Some(&record(earlier)));

        assert_eq!(child.try_wait().expect("try_wait"), None);
        child.kill().expect("kill");
        child.wait().expect("wait");
    }
}
