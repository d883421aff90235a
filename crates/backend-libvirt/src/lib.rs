//! hyperjob's default backend: one transient libvirt domain per job, booted from a per-job
//! qcow2 overlay of a base image, found again by name alone.
//!
//! Domains are *transient* (`virDomainCreateXML`): nothing is ever defined, so destroying the
//! domain removes it completely and a host reboot cannot leave a defined domain behind.

pub mod config;
pub mod doctor;
pub mod machine;
pub mod network;
pub mod nic;
pub mod xml;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyperjob_core::plugin::Progress;
use hyperjob_core::registry::{BackendFactory, PluginContext};
use hyperjob_core::wait::Backoff;
use hyperjob_core::{Backend, Endpoint, OwnedVm, PluginError, VmPresence, VmRequest};
use hyperjob_image_tools::{console, overlay, seed};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;

pub use config::LibvirtConfig;

/// How often `wait_address` looks for the guest's DHCP lease.
const LEASE_POLL: Duration = Duration::from_millis(50);

inventory::submit! {
    BackendFactory {
        name: "libvirt",
        version: env!("CARGO_PKG_VERSION"),
        build,
    }
}

fn build(_ctx: &PluginContext, table: &toml::Table) -> Result<Box<dyn Backend>, PluginError> {
    // libvirt's default error handler prints every error to stderr; errors are reported
    // through return values instead.
    virt::error::clear_error_callback();
    Ok(Box::new(LibvirtBackend::new(LibvirtConfig::from_table(
        table,
    )?)))
}

/// The libvirt backend.
#[derive(Debug)]
pub struct LibvirtBackend {
    config: LibvirtConfig,
    /// From `create` to `wait_address`: the leases a slot's MAC had before its VM started.
    leases_before: nic::LeasesBefore,
}

impl LibvirtBackend {
    pub fn new(config: LibvirtConfig) -> Self {
        Self {
            config,
            leases_before: nic::LeasesBefore::default(),
        }
    }

    fn overlay_path(&self, vm_name: &str) -> PathBuf {
        self.config.images_dir.join(format!("{vm_name}.qcow2"))
    }

    fn seed_path(&self, vm_name: &str) -> PathBuf {
        self.config.images_dir.join(format!("{vm_name}.seed.iso"))
    }

    /// The UEFI variable store of a VM with `firmware = "efi"` (libvirt creates it at start
    /// from the firmware's template and leaves it behind at destroy).
    fn nvram_path(&self, vm_name: &str) -> PathBuf {
        self.config.images_dir.join(format!("{vm_name}.nvram.fd"))
    }

    /// Every file a VM owns, removed by destroy.
    fn files_of(&self, vm_name: &str) -> [PathBuf; 4] {
        [
            self.overlay_path(vm_name),
            self.console_log_path(vm_name),
            self.seed_path(vm_name),
            self.nvram_path(vm_name),
        ]
    }

    /// The VM whose file `file_name` in `images_dir` is, if it is one of [`Self::files_of`] or
    /// the seed's work directory ([`seed::work_dir`]).
    fn vm_of_file(file_name: &str) -> Option<&str> {
        if let Some(work) = file_name.strip_prefix('.') {
            return work.strip_suffix(seed::WORK_DIR_SUFFIX);
        }
        [".seed.iso", ".console.log", ".nvram.fd", ".qcow2"]
            .iter()
            .find_map(|suffix| file_name.strip_suffix(suffix))
            .filter(|name| !name.is_empty())
    }

    fn console_log_path(&self, vm_name: &str) -> PathBuf {
        self.config
            .images_dir
            .join(format!("{vm_name}.console.log"))
    }

    fn connect(&self) -> Result<Connect, PluginError> {
        Connect::open(Some(&self.config.uri)).map_err(|err| {
            PluginError::msg(format!(
                "cannot connect to libvirt at {}: {} (is libvirtd running?)",
                self.config.uri,
                err.message()
            ))
        })
    }

    /// The domain, or `None` when libvirt does not know it.
    fn lookup(conn: &Connect, vm_name: &str) -> Result<Option<Domain>, PluginError> {
        match conn.lookup_domain_by_name(vm_name) {
            Ok(domain) => Ok(Some(domain)),
            Err(err) if err.code().is_known_and(|c| c == ErrorNumber::NoDomain) => Ok(None),
            Err(err) => Err(libvirt_error(
                format!("cannot look up domain {vm_name}"),
                &err,
            )),
        }
    }

    fn start_domain(
        &self,
        request: &VmRequest,
        progress: &dyn Progress,
    ) -> Result<(), PluginError> {
        let overlay = self.overlay_path(&request.vm_name);
        let console_log = self.console_log_path(&request.vm_name);
        let seed = self.seed_path(&request.vm_name);
        let nvram = self.nvram_path(&request.vm_name);
        let conn = self.connect()?;
        let (nic, slot_lock) =
            nic::plan(&conn, &self.config, request, progress, &self.leases_before)?;
        let spec = xml::DomainSpec {
            name: &request.vm_name,
            domain_type: self.config.domain_type,
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            overlay: &overlay,
            nic: nic.clone(),
            direct_boot: self.config.direct_boot.as_ref(),
            machine: &self.config.machine,
            nvram: &nvram,
            console_log: &console_log,
            seed: request.keys.as_ref().map(|_| seed.as_path()),
            job_id: request.job_id,
            created_unix: request.created_unix,
            deadline_unix: request.deadline_unix,
            owner: &request.owner,
        };
        let domain = conn
            .create_domain_xml(&xml::domain_xml(&spec), virt::sys::VIR_DOMAIN_NONE)
            .map_err(|err| {
                let hint = self.config.machine.start_error_hint(err.message());
                let error = libvirt_error(
                    format!("libvirt could not start domain {}", request.vm_name),
                    &err,
                );
                match hint {
                    Some(hint) => PluginError::msg(format!("{error} ({hint})")),
                    None => error,
                }
            })?;
        // The domain holds its MAC now: the next prepare sees it in use.
        drop(slot_lock);
        if let Err(err) = nic::check_running(&domain, &nic, &self.config.uri) {
            let _ = destroy_domain(&domain, &request.vm_name);
            return Err(err);
        }
        Ok(())
    }
}

impl Backend for LibvirtBackend {
    fn create(
        &self,
        request: &VmRequest,
        progress: &dyn Progress,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<(), PluginError> {
        let started = Instant::now();
        let what = format!("creating VM {}", request.vm_name);
        hyperjob_core::wait::still_wanted(&what, started, deadline, cancel)?;
        nic::check_nwfilter(&self.connect()?, &self.config)?;
        if let Some(boot) = &self.config.direct_boot {
            for path in std::iter::once(&boot.kernel).chain(boot.initrd.iter()) {
                if !path.is_file() {
                    return Err(PluginError::NotFound(format!(
                        "kernel/initrd {} does not exist",
                        path.display()
                    )));
                }
            }
        }
        let overlay = self.overlay_path(&request.vm_name);
        overlay::create(&self.config.base_image, &overlay)?;
        if let Some(keys) = &request.keys {
            if let Err(err) =
                seed::create(&self.seed_path(&request.vm_name), &request.vm_name, keys)
            {
                let _ = overlay::remove_file(&overlay);
                return Err(err);
            }
            progress.say("cloud-init seed with the job's SSH keys created");
        }
        progress.say(&format!(
            "Overlay {} on {} created; starting domain ({}, {}, {} vCPU, {} MiB)...",
            overlay.display(),
            self.config.base_image.display(),
            self.config.domain_type.as_str(),
            self.config.machine.summary(),
            self.config.vcpus,
            self.config.memory_mib
        ));
        let started_domain = hyperjob_core::wait::still_wanted(&what, started, deadline, cancel)
            .and_then(|()| self.start_domain(request, progress));
        if let Err(err) = started_domain {
            for file in self.files_of(&request.vm_name) {
                let _ = overlay::remove_file(&file);
            }
            return Err(err);
        }
        Ok(())
    }

    fn wait_address(
        &self,
        vm_name: &str,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<Endpoint, PluginError> {
        let started = Instant::now();
        let conn = self.connect()?;
        let domain = Self::lookup(&conn, vm_name)?
            .ok_or_else(|| PluginError::msg(format!("domain {vm_name} vanished while booting")))?;
        let leases =
            nic::LeaseSource::of(&conn, &domain, &self.config.network, &self.leases_before);
        // Every 50 ms, as a probe loop run beside the boot would: a backoff up to 1 s lost
        // 0.5 s on average (the lease comes 5-10 s into the boot); a poll is one cheap call.
        let mut backoff = Backoff::new(LEASE_POLL, LEASE_POLL);
        loop {
            if !domain.is_active().unwrap_or(false) {
                return Err(PluginError::msg(format!(
                    "domain {vm_name} stopped while booting"
                )));
            }
            let address = match &leases {
                Some(leases) => leases.address(),
                // An error here just means "no lease yet" on some libvirt versions.
                None => domain
                    .interface_addresses(virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
                    .ok()
                    .and_then(|interfaces| first_ipv4(&interfaces)),
            };
            if let Some(address) = address {
                return Ok(Endpoint::new(address, None));
            }
            if !backoff.sleep(deadline, cancel) {
                if cancel.load(Ordering::Relaxed) {
                    return Err(PluginError::Interrupted(
                        "while waiting for the guest address".into(),
                    ));
                }
                return Err(PluginError::Timeout {
                    what: format!(
                        "waiting for a DHCP lease on network {:?}",
                        self.config.network
                    ),
                    secs: started.elapsed().as_secs(),
                });
            }
        }
    }

    fn destroy(&self, vm_name: &str) -> Result<(), PluginError> {
        self.leases_before.forget(vm_name);
        let domain_result = self.connect().and_then(|conn| {
            if let Some(domain) = Self::lookup(&conn, vm_name)? {
                destroy_domain(&domain, vm_name)?;
            }
            Ok(())
        });
        // Files go even when libvirt cannot be reached: a dead domain's disk is garbage, and
        // a running one keeps its open file.
        let files_result = self
            .files_of(vm_name)
            .iter()
            .map(|file| overlay::remove_file(file))
            .fold(Ok(()), Result::and)
            .and(seed::remove_work_dir(&self.seed_path(vm_name), vm_name));
        domain_result.and(files_result)
    }

    /// Pauses the domain (QEMU stops its vCPUs; ~10 ms): the slow part of destroy, waiting
    /// until libvirt has seen QEMU exit and removed its filter rules, can then happen later.
    fn halt(&self, vm_name: &str) -> Result<(), PluginError> {
        let conn = self.connect()?;
        let Some(domain) = Self::lookup(&conn, vm_name)? else {
            return Ok(());
        };
        match domain.suspend() {
            Ok(_) => Ok(()),
            // Not running (any more): nothing runs in it either.
            Err(err)
                if err.code().is_known_and(|c| {
                    matches!(c, ErrorNumber::OperationInvalid | ErrorNumber::NoDomain)
                }) =>
            {
                Ok(())
            }
            Err(err) => Err(libvirt_error(
                format!("cannot pause domain {vm_name}"),
                &err,
            )),
        }
    }

    fn inspect(&self, vm_name: &str) -> Result<VmPresence, PluginError> {
        let conn = self.connect()?;
        let Some(domain) = Self::lookup(&conn, vm_name)? else {
            return Ok(VmPresence::Absent);
        };
        let metadata = match domain.metadata(
            virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(xml::METADATA_NS),
            0,
        ) {
            Ok(metadata) => metadata,
            Err(err)
                if err
                    .code()
                    .is_known_and(|c| c == ErrorNumber::NoDomainMetadata) =>
            {
                return Ok(VmPresence::Unrecognised(
                    "the domain carries no hyperjob metadata".to_string(),
                ))
            }
            Err(err) if err.code().is_known_and(|c| c == ErrorNumber::NoDomain) => {
                return Ok(VmPresence::Absent)
            }
            Err(err) => {
                return Ok(VmPresence::Unrecognised(format!(
                    "its hyperjob metadata cannot be read: {}",
                    err.message()
                )))
            }
        };
        Ok(match xml::parse_metadata(&metadata) {
            Some(record) => VmPresence::Owned(OwnedVm {
                vm_name: vm_name.to_string(),
                job_id: record.job_id,
                created_unix: record.created_unix,
                deadline_unix: record.deadline_unix,
                owner: record.owner,
            }),
            None => VmPresence::Unrecognised("its hyperjob metadata is malformed".to_string()),
        })
    }

    fn relabel(&self, record: &OwnedVm) -> Result<(), PluginError> {
        let conn = self.connect()?;
        let domain = Self::lookup(&conn, &record.vm_name)?.ok_or_else(|| {
            PluginError::NotFound(format!("domain {} does not exist", record.vm_name))
        })?;
        let element = xml::metadata_for_set(
            record.job_id,
            (record.created_unix, record.deadline_unix),
            record.owner.as_deref().unwrap_or_default(),
        );
        domain
            .set_metadata(
                virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(&element),
                Some("hyperjob"),
                Some(xml::METADATA_NS),
                virt::sys::VIR_DOMAIN_AFFECT_LIVE,
            )
            .map_err(|err| libvirt_error(format!("cannot relabel domain {}", record.vm_name), &err))
    }

    fn fingerprint(&self) -> Result<String, PluginError> {
        use std::os::unix::fs::MetadataExt;
        let mut text = String::new();
        let images = std::iter::once(&self.config.base_image).chain(
            self.config
                .direct_boot
                .iter()
                .flat_map(|boot| std::iter::once(&boot.kernel).chain(boot.initrd.iter())),
        );
        // A file replaced or rewritten in place changes its inode, size or modification time.
        for path in images {
            let meta = std::fs::metadata(path).map_err(|err| {
                PluginError::system(format!("cannot read {}", path.display()), err)
            })?;
            text.push_str(&format!(
                "{}:{}:{}:{}:{}.{}\n",
                path.display(),
                meta.dev(),
                meta.ino(),
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec()
            ));
        }
        Ok(text)
    }

    fn names_with_files(&self) -> Result<Vec<String>, PluginError> {
        let dir = &self.config.images_dir;
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => {
                return Err(PluginError::system(
                    format!("cannot list {}", dir.display()),
                    err,
                ))
            }
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            // The base image may live in images_dir too: it is never anyone's file.
            .filter(|entry| entry.path() != self.config.base_image)
            .filter_map(|entry| Some(Self::vm_of_file(entry.file_name().to_str()?)?.to_string()))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn list_owned(&self) -> Result<Vec<OwnedVm>, PluginError> {
        let conn = self.connect()?;
        let domains = conn
            .list_all_domains(0)
            .map_err(|err| libvirt_error("cannot list domains".to_string(), &err))?;
        let mut owned = Vec::new();
        for domain in domains {
            // Ownership is the metadata element hyperjob wrote, not the name.
            let Ok(metadata) = domain.metadata(
                virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(xml::METADATA_NS),
                0,
            ) else {
                continue;
            };
            let (Some(record), Ok(name)) = (xml::parse_metadata(&metadata), domain.name()) else {
                continue;
            };
            owned.push(OwnedVm {
                vm_name: name,
                job_id: record.job_id,
                created_unix: record.created_unix,
                deadline_unix: record.deadline_unix,
                owner: record.owner,
            });
        }
        Ok(owned)
    }

    fn doctor(&self) -> Vec<hyperjob_core::Check> {
        doctor::checks(&self.config)
    }

    fn console_tail(&self, vm_name: &str) -> Result<String, PluginError> {
        console::tail_of_log(&self.console_log_path(vm_name))
    }
}

fn destroy_domain(domain: &Domain, vm_name: &str) -> Result<(), PluginError> {
    if domain.is_active().unwrap_or(true) {
        if let Err(err) = domain.destroy() {
            // Raced with the domain stopping on its own: that is what we wanted.
            let gone = err.code().is_known_and(|c| {
                matches!(c, ErrorNumber::OperationInvalid | ErrorNumber::NoDomain)
            });
            if !gone {
                return Err(libvirt_error(
                    format!("cannot destroy domain {vm_name}"),
                    &err,
                ));
            }
        }
    }
    // A domain defined by someone else under our name would survive destroy; hyperjob never
    // defines domains, so only undefine what is still persistent.
    if domain.is_persistent().unwrap_or(false) {
        domain
            .undefine()
            .map_err(|err| libvirt_error(format!("cannot undefine domain {vm_name}"), &err))?;
    }
    Ok(())
}

fn first_ipv4(interfaces: &[virt::domain::Interface]) -> Option<String> {
    interfaces
        .iter()
        .flat_map(|iface| iface.addrs.iter())
        .find(|addr| addr.typed == i64::from(virt::sys::VIR_IP_ADDR_TYPE_IPV4))
        .map(|addr| addr.addr.clone())
}

fn libvirt_error(context: String, err: &virt::error::Error) -> PluginError {
    PluginError::msg(format!("{context}: {}", err.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_tail_reads_the_vms_console_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LibvirtConfig::from_table(
            &toml::from_str(&format!(
                "base_image = \"/b.qcow2\"\nimages_dir = \"{}\"",
                dir.path().display()
            ))
            .expect("toml"),
        )
        .expect("config");
        let backend = LibvirtBackend::new(config);
        std::fs::write(
            dir.path().join("hyperjob-job-1.console.log"),
            "booting\n\x1b[0;32mlogin:\x1b[0m\n",
        )
        .expect("log");

        let tail = backend.console_tail("hyperjob-job-1").expect("tail");

        assert_eq!(tail, "booting\nlogin:");
        assert!(backend.console_tail("hyperjob-job-2").is_err());
    }

    #[test]
    fn every_file_a_vm_owns_names_the_vm() {
        for (file, vm) in [
            ("hyperjob-job-7.qcow2", Some("hyperjob-job-7")),
            ("hyperjob-job-7.seed.iso", Some("hyperjob-job-7")),
            ("hyperjob-job-7.console.log", Some("hyperjob-job-7")),
            ("hyperjob-job-7.nvram.fd", Some("hyperjob-job-7")),
            (".hyperjob-job-7.seed.d", Some("hyperjob-job-7")),
            ("ci-b.job_7.qcow2", Some("ci-b.job_7")),
            (".qcow2", None),
            ("notes.txt", None),
            (".hidden", None),
        ] {
            assert_eq!(LibvirtBackend::vm_of_file(file), vm, "{file}");
        }
    }

    #[test]
    fn overlay_and_console_log_live_in_images_dir_named_after_the_vm() {
        let config = LibvirtConfig::from_table(
            &toml::from_str("base_image = \"/b.qcow2\"\nimages_dir = \"/images\"").expect("toml"),
        )
        .expect("config");
        let backend = LibvirtBackend::new(config);

        assert_eq!(
            backend.overlay_path("hyperjob-job-1"),
            PathBuf::from("/images/hyperjob-job-1.qcow2")
        );
        assert_eq!(
            backend.console_log_path("hyperjob-job-1"),
            PathBuf::from("/images/hyperjob-job-1.console.log")
        );
        // The UEFI variable store is the VM's too: destroy removes it with the others.
        assert!(backend
            .files_of("hyperjob-job-1")
            .contains(&PathBuf::from("/images/hyperjob-job-1.nvram.fd")));
    }
}
