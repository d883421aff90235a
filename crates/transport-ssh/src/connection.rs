//! One SSH session kept open for script after script (hyperjob's per-job relay uses it), with
//! the next script's guest shell started ahead.
//!
//! What makes a stage cost little is not only the saved connection: starting the guest shell
//! (the SSH server's fork, the login shell, the interpreter) takes tens of milliseconds under
//! emulation. So while the connection idles it keeps one shell per interpreter asked for so
//! far (`bash` to begin with) started and waiting for its script on stdin, exactly as a shell
//! started for the script would wait; the script then only has to be sent. Each such shell is
//! started after the previous script has ended, so it sees what that script left (files,
//! installed programs). It carries its own run marker and reports its own process group, so
//! stopping a script works as before.
//!
//! A stopped script ends the connection's use: the guest-side kill helper sends its last
//! SIGKILL to the script's process group a second later, and under dropbear every command of a
//! connection shares one process group (the connection's own process): the next script must
//! not be in it. The relay then connects anew.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use hyperjob_core::{Connection, PluginError, RemoteExit, ScriptRequest};
use ssh2::Session;

use crate::relay::{self, RelayError, Shell};
use crate::{not_started, SshError};
use hyperjob_core::signals::DeferSignals;

/// How long dropping a channel may wait for the server (a stopped script's channel is closed
/// from our side).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// An open, verified, logged-in session and the shells started ahead on it.
pub(crate) struct SshConnection {
    session: Session,
    umask: u32,
    /// Bounds every blocking step outside a running script.
    timeout: Duration,
    /// Shells waiting for a script, at most one per interpreter.
    ready: Vec<Shell>,
    /// The interpreters scripts asked for so far: a shell for each is started ahead.
    wanted: Vec<String>,
    /// Set once a script was stopped: the connection is not used again.
    stopped: bool,
    /// A line for the stderr of every script (the host key is not checked).
    warning: Option<&'static str>,
}

impl SshConnection {
    pub(crate) fn new(
        session: Session,
        umask: u32,
        timeout: Duration,
        warning: Option<&'static str>,
    ) -> Self {
        Self {
            session,
            umask,
            timeout,
            ready: Vec::new(),
            wanted: vec!["bash".to_string()],
            stopped: false,
            warning,
        }
    }

    fn blocking(&self, timeout: Duration) {
        self.session.set_blocking(true);
        self.session
            .set_timeout(u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX));
    }

    /// A shell started ahead for `interpreter` that is still alive, if there is one.
    fn take_ready(&mut self, interpreter: &str) -> Result<Option<Shell>, SshError> {
        let Some(at) = self
            .ready
            .iter()
            .position(|shell| shell.interpreter == interpreter)
        else {
            return Ok(None);
        };
        let mut shell = self.ready.swap_remove(at);
        self.session.set_blocking(false);
        let alive = shell.alive();
        self.blocking(CLOSE_TIMEOUT);
        if alive? {
            return Ok(Some(shell));
        }
        tracing::debug!(
            "the guest shell started ahead (run {}) has ended; starting another",
            shell.run_id()
        );
        Ok(None)
    }
}

impl Connection for SshConnection {
    fn run_script(
        &mut self,
        request: &ScriptRequest<'_>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<RemoteExit, PluginError> {
        let _deferred = DeferSignals::new();
        if self.stopped {
            return Err(PluginError::NotStarted(
                "its connection stopped a script and is not used again".into(),
            ));
        }
        if let Some(warning) = self.warning {
            let _ = writeln!(stderr, "{warning}");
            let _ = stderr.flush();
        }
        if !self.wanted.iter().any(|name| name == request.interpreter) {
            self.wanted.push(request.interpreter.to_string());
        }
        let lost = |err: SshError| match err {
            SshError::Interrupted(during) => not_started(during),
            err => PluginError::NotStarted(format!("its connection is lost: {err}")),
        };
        let ahead = self.take_ready(request.interpreter).map_err(lost)?;
        let mut shell = match ahead {
            Some(shell) => {
                tracing::debug!("guest shell started ahead (run {})", shell.run_id());
                shell
            }
            None => {
                self.blocking(self.timeout);
                relay::start_shell(
                    &self.session,
                    request.interpreter,
                    self.umask,
                    request.cancel,
                )
                .map_err(lost)?
            }
        };
        let outcome = relay::run(&self.session, &mut shell, request, stdout, stderr);
        // A stopped script's channel is still open: closing it must not hang the relay.
        self.blocking(CLOSE_TIMEOUT);
        drop(shell);
        self.blocking(self.timeout);
        outcome.map_err(|err| match err {
            RelayError::Ssh(SshError::Interrupted(during)) => not_started(during),
            RelayError::Ssh(err) => PluginError::msg(err.to_string()),
            RelayError::Interrupted => {
                self.stopped = true;
                PluginError::Interrupted("while the script was running".into())
            }
        })
    }

    fn idle(&mut self) -> Result<(), PluginError> {
        if self.stopped {
            return Err(PluginError::msg(
                "the connection stopped a script: a new one serves the next",
            ));
        }
        let _deferred = DeferSignals::new();
        let lost = |err: SshError| PluginError::msg(format!("the connection is lost: {err}"));
        // Shells started ahead that something in the guest ended meanwhile are replaced.
        self.session.set_blocking(false);
        let mut checked = Vec::with_capacity(self.ready.len());
        let mut failure = None;
        for mut shell in self.ready.drain(..) {
            match shell.alive() {
                Ok(true) => checked.push(shell),
                Ok(false) => {}
                Err(err) => failure = Some(err),
            }
        }
        self.blocking(CLOSE_TIMEOUT);
        self.ready = checked;
        if let Some(err) = failure {
            return Err(lost(err));
        }
        self.blocking(self.timeout);
        let never = AtomicBool::new(false);
        for interpreter in &self.wanted {
            if self
                .ready
                .iter()
                .any(|shell| shell.interpreter == *interpreter)
            {
                continue;
            }
            let shell =
                relay::start_shell(&self.session, interpreter, self.umask, &never).map_err(lost)?;
            self.ready.push(shell);
        }
        self.session
            .keepalive_send()
            .map_err(|err| lost(crate::channel_error("sending a keepalive", &err)))?;
        Ok(())
    }
}

impl Drop for SshConnection {
    fn drop(&mut self) {
        // Shells waiting for a script read the end of their input when the session goes, and
        // exit without running anything.
        self.blocking(CLOSE_TIMEOUT);
        self.ready.clear();
        let _ = self.session.disconnect(None, "the job's relay ends", None);
    }
}
