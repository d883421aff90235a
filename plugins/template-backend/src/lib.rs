//! A minimal hyperjob backend, as a shared-library plugin: one throw-away QEMU VM per job.
//!
//! `create` starts `qemu-system-x86_64 -snapshot` on the configured base image (writes go to a
//! temporary file QEMU deletes, so the image stays as it was), with QEMU's user-mode network
//! forwarding a free port on 127.0.0.1 to the guest's SSH port. Everything a VM has is in one
//! directory, `<state_dir>/template/<vm name>/`: its record (job, times, owner, port), the QMP
//! socket `destroy` asks QEMU to quit through, and the console log. Every stage is a new
//! process, so nothing is kept in memory: each method finds the VM from its name alone.
//!
//! Copy this crate to start your own backend (docs/plugins.md walks through it).

mod config;
mod vm;

use std::path::PathBuf;

use hyperjob_plugin::prelude::*;

pub use config::TemplateConfig;
use vm::VmDir;

// The library's header, registration function and allocator: hyperjob reads the header from
// the file to learn that this library provides the backend "template".
export_plugin! {
    backends: ["template" => build],
    transports: [],
}

/// The factory: gets the TOML text of `[backends.template]`. It only parses and checks (hyperjob
/// builds the backend for `config` too, to check the table): it creates and starts nothing.
pub fn build(ctx: &PluginContext, table_text: &str) -> Result<Box<dyn Backend>, PluginError> {
    Ok(Box::new(TemplateBackend {
        config: TemplateConfig::from_toml_text(table_text)?,
        vms_dir: ctx.state_dir.join("template"),
    }))
}

/// The backend: its config and where its VMs' directories are.
#[derive(Debug)]
pub struct TemplateBackend {
    config: TemplateConfig,
    vms_dir: PathBuf,
}

impl TemplateBackend {
    fn vm(&self, vm_name: &str) -> VmDir {
        VmDir::new(&self.vms_dir, vm_name)
    }
}

impl Backend for TemplateBackend {
    fn create(
        &self,
        request: &VmRequest,
        progress: &dyn Progress,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<(), PluginError> {
        if request.keys.is_some() {
            // This backend cannot put keys into the guest: say so, as the contract asks.
            return Err(PluginError::Unsupported("per-job guest keys"));
        }
        // Starting QEMU takes a moment and cannot be interrupted: check the bounds before.
        let what = format!("creating VM {}", request.vm_name);
        hyperjob_plugin::wait::still_wanted(&what, Instant::now(), deadline, cancel)?;
        let vm = self.vm(&request.vm_name);
        vm.create_record(request)?;
        progress.say(&format!("Starting QEMU for {}", request.vm_name));
        if let Err(err) = vm.start_qemu(&self.config) {
            // On error, remove whatever was created.
            let _ = self.destroy(&request.vm_name);
            return Err(err);
        }
        Ok(())
    }

    fn wait_address(
        &self,
        vm_name: &str,
        _deadline: Instant,
        _cancel: &AtomicBool,
    ) -> Result<Endpoint, PluginError> {
        // The address is known at once: the forwarded port. The transport waits for sshd.
        let record = self.vm(vm_name).record()?;
        Ok(Endpoint::new("127.0.0.1", Some(record.port)))
    }

    fn destroy(&self, vm_name: &str) -> Result<(), PluginError> {
        self.vm(vm_name).destroy()
    }

    fn list_owned(&self) -> Result<Vec<OwnedVm>, PluginError> {
        let names = match std::fs::read_dir(&self.vms_dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().into_string().ok()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(PluginError::system("cannot list the VMs", err)),
        };
        let mut owned = Vec::new();
        for name in names {
            // A directory without a readable record is not listed: it may be half-created.
            if let Ok(record) = self.vm(&name).record() {
                owned.push(record.owned_vm(&name));
            }
        }
        Ok(owned)
    }
}

#[cfg(test)]
mod tests {
    use hyperjob_plugin::keys::{KeyPair, Secret};

    use super::*;

    /// A backend whose VMs live in a fresh directory (these tests start no QEMU).
    fn backend(test: &str) -> TemplateBackend {
        let state_dir =
            std::env::temp_dir().join(format!("hyperjob-template-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        TemplateBackend {
            config: TemplateConfig::from_toml_text("base_image = \"/img/base.qcow2\"\n")
                .expect("config"),
            vms_dir: state_dir.join("template"),
        }
    }

    fn request(vm_name: &str) -> VmRequest {
        VmRequest {
            vm_name: vm_name.to_string(),
            job_id: 7,
            created_unix: 100,
            deadline_unix: 200,
            owner: "/var/lib/hyperjob".to_string(),
            keys: None,
        }
    }

    /// Progress that goes nowhere.
    struct Quiet;

    impl Progress for Quiet {
        fn say(&self, _: &str) {}
    }

    #[test]
    fn a_recorded_vm_is_listed_with_its_record_and_destroyed_twice() {
        let backend = backend("record");
        backend
            .vm("vm-7")
            .create_record(&request("vm-7"))
            .expect("record");

        let listed = backend.list_owned().expect("list");
        let address = backend
            .wait_address("vm-7", Instant::now(), &AtomicBool::new(false))
            .expect("address");
        backend.destroy("vm-7").expect("first destroy");
        backend.destroy("vm-7").expect("second destroy");

        assert_eq!(
            listed,
            [OwnedVm {
                vm_name: "vm-7".to_string(),
                job_id: 7,
                created_unix: 100,
                deadline_unix: 200,
                owner: Some("/var/lib/hyperjob".to_string()),
            }]
        );
        assert!(matches!(
            &address.address,
            Address::Tcp { host, port: Some(port) } if host == "127.0.0.1" && *port > 0
        ));
        assert!(backend.list_owned().expect("list").is_empty());
        let _ = std::fs::remove_dir_all(backend.vms_dir.parent().expect("state dir"));
    }

    #[test]
    fn per_job_keys_are_refused_before_anything_is_created() {
        let backend = backend("keys");
        let mut with_keys = request("vm-8");
        with_keys.keys = Some(GuestKeys {
            user: "ci".to_string(),
            authorized_key: "ssh-ed25519 AAAA client".to_string(),
            host: KeyPair {
                private_openssh: Secret::new("unused".to_string()),
                public_openssh: "ssh-ed25519 AAAA host".to_string(),
            },
        });

        let deadline = Instant::now() + Duration::from_secs(60);
        let err = backend
            .create(&with_keys, &Quiet, deadline, &AtomicBool::new(false))
            .expect_err("unsupported");

        assert_eq!(
            err.to_string(),
            "per-job guest keys is not supported by this plugin"
        );
        assert!(!backend.vms_dir.exists());
    }

    #[test]
    fn an_unknown_vm_has_no_address_and_destroying_it_succeeds() {
        let backend = backend("unknown");

        let err = backend
            .wait_address("vm-9", Instant::now(), &AtomicBool::new(false))
            .expect_err("no such VM");

        assert!(matches!(err, PluginError::NotFound(_)), "{err}");
        assert!(backend.destroy("vm-9").is_ok());
        assert!(backend.list_owned().expect("list").is_empty());
    }
}
