//! Booting one VM until its guest accepts the transport: what a cold `prepare` does, and what
//! the warm pool does ahead of time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Context as _};

use crate::config::{Config, GuestKeyMode};
use crate::keys::{GuestKeys, KeyPair};
use crate::plugin::{Backend, Endpoint, Progress, Transport, VmRequest};

/// What a boot works with.
#[allow(missing_debug_implementations)]
pub struct Boot<'a> {
    pub config: &'a Config,
    pub backend: &'a dyn Backend,
    pub transport: &'a dyn Transport,
    pub progress: &'a dyn Progress,
    /// Set by the binary's SIGTERM/SIGINT handler.
    pub cancel: &'a AtomicBool,
}

impl Boot<'_> {
    /// Creates the VM `request` describes and waits (until the transport's ready timeout after
    /// `started`) for its address and for the transport. With per-job keys, the client key is
    /// stored in `key_dir`. On error the caller destroys the VM.
    pub fn boot(
        &self,
        request: &VmRequest,
        key_dir: &Path,
        started: Instant,
    ) -> anyhow::Result<Endpoint> {
        // A stop that came while the record was written: create nothing.
        interrupted(self.cancel)?;
        let deadline = started + self.transport.ready_timeout();
        let (request, identity_file) = self.with_keys(request, key_dir)?;
        self.backend
            .create(&request, self.progress, deadline, self.cancel)
            .with_context(|| format!("cannot create VM {}", request.vm_name))?;
        interrupted(self.cancel)?;
        self.progress.say("Waiting for the guest address...");
        let endpoint = self
            .backend
            .wait_address(&request.vm_name, deadline, self.cancel)
            .with_context(|| format!("VM {} got no address", request.vm_name))?;
        crate::endpoints::check_endpoint(self.config, self.backend, self.transport, &endpoint)?;
        let endpoint = attach_keys(endpoint, &request, identity_file);
        self.progress.say(&format!(
            "Guest address {endpoint} after {:.1} s; waiting for the {} transport...",
            started.elapsed().as_secs_f64(),
            self.config.transport
        ));
        self.transport
            .wait_ready(&endpoint, deadline, self.cancel)
            .with_context(|| format!("guest of VM {} never became reachable", request.vm_name))?;
        interrupted(self.cancel)?;
        Ok(endpoint)
    }

    /// `request` with the job's own keys when the config says `guest_keys = "per-job"` (and
    /// the path of the stored client key), else as it is.
    pub(crate) fn with_keys(
        &self,
        request: &VmRequest,
        key_dir: &Path,
    ) -> anyhow::Result<(VmRequest, Option<PathBuf>)> {
        match self.config.guest_keys {
            GuestKeyMode::Pinned => Ok((request.clone(), None)),
            GuestKeyMode::PerJob => {
                let (keys, identity_file) = self.per_job_keys(&request.vm_name, key_dir)?;
                let request = VmRequest {
                    keys: Some(keys),
                    ..request.clone()
                };
                Ok((request, Some(identity_file)))
            }
        }
    }

    /// Generates the VM's host and client keys; stores the client's private key in `key_dir`
    /// and returns what the backend injects plus the client key's path.
    fn per_job_keys(&self, vm_name: &str, key_dir: &Path) -> anyhow::Result<(GuestKeys, PathBuf)> {
        let user = self.transport.login_user().with_context(|| {
            format!(
                "guest_keys = \"per-job\" needs a transport that logs in as a user; {:?} does not",
                self.config.transport
            )
        })?;
        let client = KeyPair::generate(&format!("hyperjob client {vm_name}"))?;
        let host = KeyPair::generate(&format!("hyperjob host {vm_name}"))?;
        let identity_file =
            crate::state::save_client_key_in(key_dir, client.private_openssh.expose())?;
        Ok((
            GuestKeys {
                user,
                authorized_key: client.public_openssh,
                host,
            },
            identity_file,
        ))
    }
}

/// The guest's endpoint with the job's own client key and expected host key attached, when
/// `request` carries per-job keys ([`Boot::with_keys`]).
pub(crate) fn attach_keys(
    mut endpoint: Endpoint,
    request: &VmRequest,
    identity_file: Option<PathBuf>,
) -> Endpoint {
    if let Some(keys) = &request.keys {
        endpoint.identity_file = identity_file;
        endpoint.host_key = Some(keys.host.public_openssh.clone());
    }
    endpoint
}

/// An error when the binary's signal handler asked the stage to stop.
pub fn interrupted(cancel: &AtomicBool) -> anyhow::Result<()> {
    if cancel.load(std::sync::atomic::Ordering::Relaxed) {
        bail!("interrupted by a signal");
    }
    Ok(())
}

/// Shows the last lines of the guest's console on stderr, to explain a failed boot.
pub fn report_console_tail(backend: &dyn Backend, vm_name: &str) {
    let Ok(tail) = backend.console_tail(vm_name) else {
        return;
    };
    if tail.trim().is_empty() {
        return;
    }
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "Last lines of the guest console:");
    for line in tail.lines() {
        let _ = writeln!(stderr, "  | {line}");
    }
    let _ = stderr.flush();
}
