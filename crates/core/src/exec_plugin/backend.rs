//! An executable backend, as a [`Backend`] to hyperjob.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use serde_json::json;

use super::protocol::{checks, owned_vm, owned_vm_json, presence, Incoming};
use super::{bad_answer, cancellable, field, interrupted, remaining_ms, Shared, OVERRUN};
use crate::plugin::{
    Backend, Check, Endpoint, OwnedVm, PluginError, Progress, VmPresence, VmRequest,
};

pub(super) struct ExecBackend(pub(super) Shared);

impl Backend for ExecBackend {
    fn endpoint_kinds(&self) -> Vec<crate::EndpointKind> {
        self.0.hello.endpoint_kinds.clone()
    }

    fn create(
        &self,
        request: &VmRequest,
        progress: &dyn Progress,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<(), PluginError> {
        if request.keys.is_some() && !self.0.hello.has("per_job_keys") {
            return Err(PluginError::Unsupported("per-job keys"));
        }
        let keys = request.keys.as_ref().map(|keys| {
            json!({
                "user": keys.user,
                "authorized_key": keys.authorized_key,
                "host_private_key": keys.host.private_openssh.expose(),
                "host_public_key": keys.host.public_openssh,
            })
        });
        let params = json!({
            "vm_name": request.vm_name,
            "job_id": request.job_id,
            "created_unix": request.created_unix,
            "deadline_unix": request.deadline_unix,
            "owner": request.owner,
            "keys": keys,
            "timeout_ms": remaining_ms(deadline),
        });
        let mut sink = |incoming: Incoming| {
            if let Incoming::Progress { message } = incoming {
                progress.say(&message);
            }
        };
        let result = self.0.call_with(
            "create",
            params,
            &cancellable(deadline + OVERRUN, cancel),
            &mut sink,
        );
        interrupted(cancel, "while the VM was created")?;
        result.map(drop)
    }

    fn wait_address(
        &self,
        vm_name: &str,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<Endpoint, PluginError> {
        let params = json!({ "vm_name": vm_name, "timeout_ms": remaining_ms(deadline) });
        let result = self.0.call_with(
            "wait_address",
            params,
            &cancellable(deadline + OVERRUN, cancel),
            &mut |_| {},
        );
        interrupted(cancel, "while waiting for the guest address")?;
        serde_json::from_value(result?)
            .map_err(|err| bad_answer("wait_address", &format!("a bad endpoint ({err})")))
    }

    fn destroy(&self, vm_name: &str) -> Result<(), PluginError> {
        self.0
            .call("destroy", json!({ "vm_name": vm_name }))
            .map(drop)
    }

    fn halt(&self, vm_name: &str) -> Result<(), PluginError> {
        self.0
            .optional("halt", json!({ "vm_name": vm_name }))
            .map(drop)
    }

    fn list_owned(&self) -> Result<Vec<OwnedVm>, PluginError> {
        let result = self.0.optional("list_owned", json!({}))?;
        let vms = field(&result, "vms", "list_owned")?
            .as_array()
            .ok_or_else(|| bad_answer("list_owned", "no list"))?;
        vms.iter()
            .map(|vm| owned_vm(vm).map_err(|reason| bad_answer("list_owned", &reason)))
            .collect()
    }

    fn inspect(&self, vm_name: &str) -> Result<VmPresence, PluginError> {
        if !self.0.hello.has("inspect") {
            // The trait's default: from the listing.
            return Ok(self
                .list_owned()?
                .into_iter()
                .find(|vm| vm.vm_name == vm_name)
                .map_or(VmPresence::Absent, VmPresence::Owned));
        }
        let result = self.0.call("inspect", json!({ "vm_name": vm_name }))?;
        presence(&result).map_err(|reason| bad_answer("inspect", &reason))
    }

    fn names_with_files(&self) -> Result<Vec<String>, PluginError> {
        if !self.0.hello.has("names_with_files") {
            return Ok(Vec::new());
        }
        let result = self.0.call("names_with_files", json!({}))?;
        field(&result, "names", "names_with_files")?
            .as_array()
            .and_then(|names| {
                names
                    .iter()
                    .map(|n| n.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad_answer("names_with_files", "`names` that are not strings"))
    }

    fn relabel(&self, record: &OwnedVm) -> Result<(), PluginError> {
        self.0
            .optional("relabel", json!({ "vm": owned_vm_json(record) }))
            .map(drop)
    }

    fn fingerprint(&self) -> Result<String, PluginError> {
        let result = self.0.optional("fingerprint", json!({}))?;
        field(&result, "text", "fingerprint")?
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| bad_answer("fingerprint", "a `text` that is no string"))
    }

    fn doctor(&self) -> Vec<Check> {
        if !self.0.hello.has("doctor") {
            return Vec::new();
        }
        self.0
            .call("doctor", json!({}))
            .and_then(|result| checks(&result).map_err(|reason| bad_answer("doctor", &reason)))
            .unwrap_or_else(|err| vec![Check::fail("the backend's own checks", err.to_string())])
    }

    fn console_tail(&self, vm_name: &str) -> Result<String, PluginError> {
        let result = self
            .0
            .optional("console_tail", json!({ "vm_name": vm_name }))?;
        Ok(field(&result, "text", "console_tail")?
            .as_str()
            .map(str::to_string)
            .unwrap_or_default())
    }
}
