//! The panic guards around everything a shared-library plugin builds: every call into the
//! plugin's objects runs inside `catch_unwind` *in the plugin's own code* (see the parent
//! module), so a panic becomes a [`PluginError`] instead of crossing the library boundary.

use std::any::Any;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::plugin::{
    Backend, Connection, Endpoint, OwnedVm, PluginError, Progress, RemoteExit, ScriptRequest,
    Transport, VmPresence, VmRequest,
};

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Runs a call into a plugin; a panic becomes a system failure naming what was being done.
pub(super) fn guard<T>(what: &str, call: impl FnOnce() -> T) -> Result<T, PluginError> {
    catch_unwind(AssertUnwindSafe(call)).map_err(|panic| {
        let _ = std::io::stderr().flush();
        PluginError::msg(format!(
            "the plugin panicked while {what}: {}",
            panic_message(panic.as_ref())
        ))
    })
}

/// A library backend whose every call is guarded against panics.
pub(super) struct GuardedBackend(pub(super) Box<dyn Backend>);

impl Backend for GuardedBackend {
    fn create(&self, request: &VmRequest, progress: &dyn Progress) -> Result<(), PluginError> {
        guard("creating the VM", || self.0.create(request, progress))?
    }

    fn wait_address(
        &self,
        vm_name: &str,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<Endpoint, PluginError> {
        guard("waiting for the address", || {
            self.0.wait_address(vm_name, deadline, cancel)
        })?
    }

    fn destroy(&self, vm_name: &str) -> Result<(), PluginError> {
        guard("destroying the VM", || self.0.destroy(vm_name))?
    }

    fn list_owned(&self) -> Result<Vec<OwnedVm>, PluginError> {
        guard("listing its VMs", || self.0.list_owned())?
    }

    fn inspect(&self, vm_name: &str) -> Result<VmPresence, PluginError> {
        guard("looking up the VM", || self.0.inspect(vm_name))?
    }

    fn names_with_files(&self) -> Result<Vec<String>, PluginError> {
        guard("listing its files", || self.0.names_with_files())?
    }

    fn relabel(&self, record: &OwnedVm) -> Result<(), PluginError> {
        guard("relabelling the VM", || self.0.relabel(record))?
    }

    fn fingerprint(&self) -> Result<String, PluginError> {
        guard("describing its images", || self.0.fingerprint())?
    }

    fn console_tail(&self, vm_name: &str) -> Result<String, PluginError> {
        guard("reading the console", || self.0.console_tail(vm_name))?
    }
}

/// A library transport whose every call is guarded against panics.
pub(super) struct GuardedTransport(pub(super) Box<dyn Transport>);

impl Transport for GuardedTransport {
    fn ready_timeout(&self) -> Duration {
        guard("reporting its timeout", || self.0.ready_timeout())
            .unwrap_or(Duration::from_secs(300))
    }

    fn login_user(&self) -> Option<String> {
        guard("reporting its user", || self.0.login_user())
            .ok()
            .flatten()
    }

    fn wait_ready(
        &self,
        endpoint: &Endpoint,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<(), PluginError> {
        guard("waiting for the guest", || {
            self.0.wait_ready(endpoint, deadline, cancel)
        })?
    }

    fn run_script(
        &self,
        endpoint: &Endpoint,
        request: &ScriptRequest<'_>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<RemoteExit, PluginError> {
        guard("running the script", || {
            self.0.run_script(endpoint, request, stdout, stderr)
        })?
    }

    fn can_connect(&self) -> bool {
        guard("reporting whether it connects", || self.0.can_connect()).unwrap_or(false)
    }

    fn connect(
        &self,
        endpoint: &Endpoint,
        cancel: &AtomicBool,
    ) -> Result<Box<dyn Connection>, PluginError> {
        let connection = guard("connecting", || self.0.connect(endpoint, cancel))??;
        Ok(Box::new(GuardedConnection(connection)))
    }
}

/// A library transport's connection whose every call is guarded against panics.
struct GuardedConnection(Box<dyn Connection>);

impl Connection for GuardedConnection {
    fn run_script(
        &mut self,
        request: &ScriptRequest<'_>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<RemoteExit, PluginError> {
        guard("running the script", || {
            self.0.run_script(request, stdout, stderr)
        })?
    }

    fn idle(&mut self) -> Result<(), PluginError> {
        guard("keeping its connection", || self.0.idle())?
    }
}
