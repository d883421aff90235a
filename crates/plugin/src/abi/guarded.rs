//! The guarded objects `export_plugin!` hands to hyperjob: every call of a library backend,
//! transport or connection runs under the plugin's own panic guard ([`super::contain`]).

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::contain::guard;
use crate::plugin::{
    Backend, Check, Connection, Endpoint, EndpointKind, OwnedVm, PluginError, Progress, RemoteExit,
    ScriptRequest, Transport, Upload, VmPresence, VmRequest,
};

/// A library backend whose every call is guarded against panics.
pub(super) struct GuardedBackend(pub(super) Box<dyn Backend>);

impl Backend for GuardedBackend {
    fn create(
        &self,
        request: &VmRequest,
        progress: &dyn Progress,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<(), PluginError> {
        guard("creating the VM", || {
            self.0.create(request, progress, deadline, cancel)
        })?
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

    fn endpoint_kinds(&self) -> Vec<EndpointKind> {
        // A backend that cannot say declares nothing: `config` then refuses the pair.
        guard("reporting its endpoint kinds", || self.0.endpoint_kinds()).unwrap_or_default()
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

    fn halt(&self, vm_name: &str) -> Result<(), PluginError> {
        guard("halting the VM", || self.0.halt(vm_name))?
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

    fn doctor(&self) -> Vec<Check> {
        guard("checking the host", || self.0.doctor())
            .unwrap_or_else(|err| vec![Check::fail("the backend's own checks", err.to_string())])
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

    fn doctor(&self) -> Vec<Check> {
        guard("checking its setup", || self.0.doctor())
            .unwrap_or_else(|err| vec![Check::fail("the transport's own checks", err.to_string())])
    }

    fn endpoint_kinds(&self) -> Vec<EndpointKind> {
        guard("reporting its endpoint kinds", || self.0.endpoint_kinds()).unwrap_or_default()
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

    fn upload(&self, endpoint: &Endpoint, upload: &Upload<'_>) -> Result<(), PluginError> {
        guard("copying a file into the guest", || {
            self.0.upload(endpoint, upload)
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

    fn access_command(
        &self,
        endpoint: &Endpoint,
        dir: &std::path::Path,
    ) -> Result<Vec<String>, PluginError> {
        guard("describing access to the guest", || {
            self.0.access_command(endpoint, dir)
        })?
    }
}

/// A library transport's connection whose every call is guarded against panics.
pub(super) struct GuardedConnection(pub(super) Box<dyn Connection>);

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
