//! The warm pool (`[pool]`): VMs booted ahead from the same base image, so that `prepare`
//! claims a ready one instead of booting.
//!
//! Everything lives in `<state_dir>/pool/` (0700):
//!
//! - `<vm>.json`: one pooled VM ([`PoolEntry`]: booting or ready, its endpoint, when it was
//!   made, until when it may idle, and the [`fingerprint`] of what it was built from);
//! - `<vm>.keys/`: its client key, with per-job keys (every pooled VM has its own host and
//!   client keys, like a job's);
//! - `<vm>.claim`: created exclusively (`O_EXCL`) by the one prepare that claims the VM; it
//!   holds that job's id;
//! - `fill.lock`: held exclusively by whoever boots or removes pooled VMs (`pool fill`, `pool
//!   drain`, `gc`), so only one of them works on the pool at a time.
//!
//! Pooled VMs are named `<name_prefix>pool-<random>`, never a job's name, and carry hyperjob's
//! ownership record with job id 0 ([`POOL_JOB_ID`]) and the end of their idle time as deadline.
//! A claim, in order: the claim file (only one prepare wins it); the job's state, naming the VM
//! (from here on `cleanup` and `gc` treat it as the job's); the pool's files of the VM go; its
//! client key moves to the job's key directory; its ownership record is relabelled to the job;
//! a replacement starts booting in the background; the VM is checked (a login); the job's state
//! says ready. A prepare killed at any point leaves a record `gc` acts on.

mod claim;
mod fill;
mod reap;

pub use claim::claim;
pub use fill::{drain, fill, fill_all, status};
pub use reap::reap;

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::plugin::{Backend, Endpoint, PluginError};
use anyhow::Context as _;

use crate::lock::lock_file;
use crate::state::{private_dir, private_file_options, replace_file, StateError};

/// The job id in the ownership record of a VM that waits in the pool.
pub const POOL_JOB_ID: u64 = 0;
const ENTRY_VERSION: u32 = 1;

/// How far a pooled VM got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolPhase {
    /// Being booted (or its booter died).
    Booting,
    /// Its guest accepted the transport: claimable.
    Ready,
}

/// One pooled VM, as recorded in `<state_dir>/pool/<vm>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolEntry {
    pub version: u32,
    pub vm_name: String,
    pub phase: PoolPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    pub created_unix: u64,
    /// When its idle time ends: `created_unix + pool.max_idle_secs`.
    pub deadline_unix: u64,
    /// [`fingerprint`] of what it was built from.
    pub fingerprint: String,
    /// The image it was built for (`[images.NAME]`); `None` without `[images]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl PoolEntry {
    /// The record written before a pooled VM is created.
    pub fn booting(vm_name: String, times: (u64, u64), fingerprint: String) -> Self {
        Self {
            version: ENTRY_VERSION,
            vm_name,
            phase: PoolPhase::Booting,
            endpoint: None,
            created_unix: times.0,
            deadline_unix: times.1,
            fingerprint,
            image: None,
        }
    }

    /// Whether this VM may still serve jobs of its image, given the current fingerprints.
    pub fn fresh(&self, current: &Fingerprints) -> bool {
        current
            .get(&self.image)
            .is_some_and(|fp| fp.as_deref().is_none_or(|fp| fp == self.fingerprint))
    }
}

/// The current [`fingerprint`] of every image (`None` key without `[images]`); a value of
/// `None` where the backend cannot tell.
pub type Fingerprints = std::collections::BTreeMap<Option<String>, Option<String>>;

/// The backend built for each image's config (keyed `None` without `[images]`).
pub type ImageBackends = std::collections::BTreeMap<Option<String>, Box<dyn Backend>>;

/// Builds [`ImageBackends`] for `config`'s installation.
pub fn image_backends(
    config: &Config,
    registry: &crate::registry::Registry,
) -> anyhow::Result<ImageBackends> {
    config
        .image_configs()
        .into_iter()
        .map(|image| {
            Ok((
                image.image.clone(),
                crate::stages::build_backend(&image, registry)?,
            ))
        })
        .collect()
}

/// The fingerprints of every image of `config`'s installation, from its [`ImageBackends`].
pub fn fingerprints(config: &Config, backends: &ImageBackends) -> anyhow::Result<Fingerprints> {
    let mut all = Fingerprints::new();
    for image in config.image_configs() {
        let fp = match backends.get(&image.image) {
            Some(backend) => fingerprint(&image, backend.as_ref())?,
            None => None,
        };
        all.insert(image.image.clone(), fp);
    }
    Ok(all)
}

/// What pooled VMs are built from, as one short text: the selected plugins and their config
/// tables, the key mode and name prefix, and the backend's own [`Backend::fingerprint`] (its
/// base image's identity, say). `None` when the backend cannot say: such a backend is never
/// pooled.
pub fn fingerprint(config: &Config, backend: &dyn Backend) -> anyhow::Result<Option<String>> {
    let images = match backend.fingerprint() {
        Ok(images) => images,
        Err(PluginError::Unsupported(_)) => return Ok(None),
        Err(err) => return Err(anyhow::Error::new(err).context("cannot describe the base image")),
    };
    Ok(Some(crate::config::digest(&[
        config.backend.as_str(),
        &toml::to_string(&config.backend_table).unwrap_or_default(),
        config.transport.as_str(),
        &toml::to_string(&config.transport_table).unwrap_or_default(),
        config.guest_keys.name(),
        config.name_prefix.as_str(),
        &images,
    ])))
}

/// A fresh pooled VM name: the installation's pool prefix and 8 random hex digits.
pub fn new_vm_name(config: &Config) -> String {
    let mut bytes = [0u8; 4];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    let suffix: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}{suffix}", config.pool_prefix())
}

/// The pool's directory.
#[derive(Debug, Clone)]
pub struct PoolDir {
    state_dir: PathBuf,
    dir: PathBuf,
}

impl PoolDir {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
            dir: state_dir.join("pool"),
        }
    }

    /// Whether the pool's directory exists.
    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    fn ensure(&self) -> Result<(), StateError> {
        private_dir(&self.state_dir, true)?;
        private_dir(&self.dir, false)
    }

    fn entry_path(&self, vm_name: &str) -> PathBuf {
        self.dir.join(format!("{vm_name}.json"))
    }

    fn claim_path(&self, vm_name: &str) -> PathBuf {
        self.dir.join(format!("{vm_name}.claim"))
    }

    /// Where a pooled VM's client key is kept until a job claims the VM.
    pub fn keys_dir(&self, vm_name: &str) -> PathBuf {
        self.dir.join(format!("{vm_name}.keys"))
    }

    /// The log of the last background fill.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("fill.log")
    }

    /// Every readable entry, oldest first. An unreadable one is reported by name.
    pub fn entries(&self) -> anyhow::Result<(Vec<PoolEntry>, Vec<String>)> {
        let listing = match fs::read_dir(&self.dir) {
            Ok(listing) => listing,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
            Err(err) => {
                return Err(
                    anyhow::Error::new(err).context(format!("cannot list {}", self.dir.display()))
                )
            }
        };
        let (mut entries, mut unreadable) = (Vec::new(), Vec::new());
        for item in listing.filter_map(Result::ok) {
            let name = item.file_name().to_string_lossy().into_owned();
            let Some(vm_name) = name.strip_suffix(".json") else {
                continue;
            };
            match fs::read(item.path())
                .ok()
                .and_then(|bytes| serde_json::from_slice::<PoolEntry>(&bytes).ok())
            {
                Some(entry) if entry.vm_name == vm_name => entries.push(entry),
                _ => unreadable.push(vm_name.to_string()),
            }
        }
        entries.sort_by(|a, b| (a.created_unix, &a.vm_name).cmp(&(b.created_unix, &b.vm_name)));
        unreadable.sort();
        Ok((entries, unreadable))
    }

    /// Writes an entry atomically, 0600.
    pub fn save(&self, entry: &PoolEntry) -> anyhow::Result<()> {
        self.ensure()?;
        let path = self.entry_path(&entry.vm_name);
        let tmp = self.dir.join(format!(
            ".{}.json.{}.tmp",
            entry.vm_name,
            std::process::id()
        ));
        serde_json::to_vec_pretty(entry)
            .map_err(std::io::Error::other)
            .and_then(|bytes| replace_file(&private_file_options(), &tmp, &path, &bytes))
            .map_err(|err| {
                anyhow::Error::new(err).context(format!("cannot write {}", path.display()))
            })
    }

    /// Removes everything the pool keeps of a VM (not the VM itself); absent is fine.
    pub fn remove(&self, vm_name: &str) -> anyhow::Result<()> {
        let keys = self.keys_dir(vm_name);
        match fs::remove_dir_all(&keys) {
            Ok(()) => {}
            Err(err) if err.kind() == ErrorKind::NotFound => {}
            Err(err) => {
                return Err(
                    anyhow::Error::new(err).context(format!("cannot remove {}", keys.display()))
                )
            }
        }
        for path in [self.entry_path(vm_name), self.claim_path(vm_name)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(anyhow::Error::new(err)
                        .context(format!("cannot remove {}", path.display())))
                }
            }
        }
        Ok(())
    }

    /// Claims a pooled VM for `job_id`: true for the one caller that created the claim file.
    pub fn try_claim(&self, vm_name: &str, job_id: u64) -> anyhow::Result<bool> {
        let path = self.claim_path(vm_name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(mut file) => {
                file.write_all(job_id.to_string().as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|err| {
                        anyhow::Error::new(err).context(format!("cannot write {}", path.display()))
                    })?;
                Ok(true)
            }
            Err(err) if err.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(err) => {
                Err(anyhow::Error::new(err).context(format!("cannot create {}", path.display())))
            }
        }
    }

    /// The job that claimed a pooled VM, if one did.
    pub fn claimed_by(&self, vm_name: &str) -> Option<u64> {
        fs::read_to_string(self.claim_path(vm_name))
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }

    /// The pool's lock, exclusively: blocks while another fill, drain or gc works on the pool.
    pub fn lock(&self) -> anyhow::Result<File> {
        self.lock_with(|file| file.lock().map(|()| true))?
            .context("cannot lock the pool")
    }

    /// [`PoolDir::lock`], or `None` at once when someone else holds it.
    pub fn try_lock(&self) -> anyhow::Result<Option<File>> {
        self.lock_with(|file| match file.try_lock() {
            Ok(()) => Ok(true),
            Err(fs::TryLockError::WouldBlock) => Ok(false),
            Err(fs::TryLockError::Error(err)) => Err(err),
        })
    }

    fn lock_with(
        &self,
        lock: impl Fn(&File) -> std::io::Result<bool>,
    ) -> anyhow::Result<Option<File>> {
        // `drain` removes the emptied directory; whoever opens the lock file meanwhile tries
        // again on the new one.
        loop {
            self.ensure()?;
            match lock_file(&self.dir.join("fill.lock"), &lock) {
                Err(StateError::Lock { source, .. }) if source.kind() == ErrorKind::NotFound => {}
                other => return Ok(other?),
            }
        }
    }

    /// Removes the pool's directory once nothing is left in it but its lock and log, while
    /// `_held` (the pool's lock) is held.
    pub fn remove_if_empty(&self, _held: &File) -> anyhow::Result<()> {
        let (entries, unreadable) = self.entries()?;
        let others = fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .filter(|item| !matches!(item.file_name().to_str(), Some("fill.lock" | "fill.log")))
            .count();
        if entries.is_empty() && unreadable.is_empty() && others == 0 {
            let _ = fs::remove_file(self.log_path());
            fs::remove_file(self.dir.join("fill.lock"))?;
            fs::remove_dir(&self.dir)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(
            Path::new("/etc/hyperjob/test.toml"),
            &format!("backend = \"libvirt\"\ntransport = \"ssh\"\n{extra}"),
        )
        .expect("config")
    }

    /// A backend that only describes its images.
    struct Images(Option<&'static str>);

    impl Backend for Images {
        fn create(
            &self,
            _: &crate::VmRequest,
            _: &dyn crate::plugin::Progress,
            _: std::time::Instant,
            _: &std::sync::atomic::AtomicBool,
        ) -> Result<(), PluginError> {
            Err(PluginError::Unsupported("create"))
        }

        fn wait_address(
            &self,
            _: &str,
            _: std::time::Instant,
            _: &std::sync::atomic::AtomicBool,
        ) -> Result<Endpoint, PluginError> {
            Err(PluginError::Unsupported("wait_address"))
        }

        fn destroy(&self, _: &str) -> Result<(), PluginError> {
            Ok(())
        }

        fn fingerprint(&self) -> Result<String, PluginError> {
            self.0
                .map(str::to_string)
                .ok_or(PluginError::Unsupported("fingerprint"))
        }
    }

    #[test]
    fn the_fingerprint_changes_with_the_image_and_the_config_and_nothing_else() {
        let base = config("[backends.libvirt]\nvcpus = 2\n");
        let image = Images(Some("/b.qcow2:1:2:3:4.5"));
        let first = fingerprint(&base, &image).expect("ok").expect("some");

        assert_eq!(fingerprint(&base, &image).expect("ok"), Some(first.clone()));
        let touched = Images(Some("/b.qcow2:1:2:3:4.6"));
        assert_ne!(
            fingerprint(&base, &touched).expect("ok"),
            Some(first.clone())
        );
        let bigger = config("[backends.libvirt]\nvcpus = 4\n");
        assert_ne!(
            fingerprint(&bigger, &image).expect("ok"),
            Some(first.clone())
        );
        let keys = config("guest_keys = \"per-job\"\n[backends.libvirt]\nvcpus = 2\n");
        assert_ne!(fingerprint(&keys, &image).expect("ok"), Some(first.clone()));
        let pooled = config("[pool]\nsize = 5\n[backends.libvirt]\nvcpus = 2\n");
        assert_eq!(
            fingerprint(&pooled, &image).expect("ok"),
            Some(first),
            "the pool's own size is not what a VM is made of"
        );
        assert_eq!(fingerprint(&base, &Images(None)).expect("ok"), None);
    }

    #[test]
    fn a_pooled_vm_is_fresh_only_for_its_own_image_at_its_fingerprint() {
        let mut entry = PoolEntry::booting("vm".into(), (1, 2), "fp-a".into());
        entry.image = Some("alma-9".into());
        let mut current = Fingerprints::new();
        current.insert(Some("debian-12".into()), Some("fp-a".into()));

        assert!(!entry.fresh(&current), "an image no longer in the config");
        current.insert(Some("alma-9".into()), Some("fp-b".into()));
        assert!(!entry.fresh(&current), "its image changed");
        current.insert(Some("alma-9".into()), Some("fp-a".into()));
        assert!(entry.fresh(&current));
    }

    #[test]
    fn pooled_vm_names_are_unique_and_never_a_jobs_name() {
        let config = config("");
        let (a, b) = (new_vm_name(&config), new_vm_name(&config));

        assert_ne!(a, b);
        assert!(a.starts_with("hyperjob-job-pool-"), "{a}");
        assert_eq!(a.len(), "hyperjob-job-pool-".len() + 8);
        assert_eq!(config.job_id_of(&a), None);
    }

    #[test]
    fn exactly_one_of_many_claims_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = PoolDir::new(&dir.path().join("state"));
        pool.save(&PoolEntry::booting("vm-a".into(), (1, 2), "f".into()))
            .expect("save");

        let wins: Vec<bool> = std::thread::scope(|scope| {
            let handles: Vec<_> = (1..=8)
                .map(|job| {
                    let pool = pool.clone();
                    scope.spawn(move || pool.try_claim("vm-a", job).expect("claim"))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("join"))
                .collect()
        });

        assert_eq!(wins.iter().filter(|won| **won).count(), 1, "{wins:?}");
        let winner = wins.iter().position(|won| *won).expect("a winner") as u64 + 1;
        assert_eq!(pool.claimed_by("vm-a"), Some(winner));
        pool.remove("vm-a").expect("remove");
        assert_eq!(pool.entries().expect("entries"), (Vec::new(), Vec::new()));
        assert_eq!(pool.claimed_by("vm-a"), None);
    }

    #[test]
    fn entries_come_back_oldest_first_and_unreadable_ones_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = PoolDir::new(&dir.path().join("state"));
        pool.save(&PoolEntry::booting("vm-new".into(), (20, 30), "f".into()))
            .expect("save");
        pool.save(&PoolEntry::booting("vm-old".into(), (10, 30), "f".into()))
            .expect("save");
        fs::write(dir.path().join("state/pool/vm-bad.json"), "{").expect("write");

        let (entries, unreadable) = pool.entries().expect("entries");

        let names: Vec<&str> = entries.iter().map(|e| e.vm_name.as_str()).collect();
        assert_eq!(names, ["vm-old", "vm-new"]);
        assert_eq!(unreadable, ["vm-bad"]);
    }
}
