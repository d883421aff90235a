//! Per-job state on disk. prepare, every run and cleanup are separate processes, so what prepare
//! learned (the guest's endpoint) is written here and read back by run. Files are written
//! atomically (temporary file + rename) with mode 0600 in a 0700 directory.
//!
//! The state file is the anchor of everything a job owns: prepare writes it (phase `creating`)
//! *before* it creates anything, and cleanup removes it *last*, so a process killed at any point
//! leaves a record that `cleanup` or `gc` can act on. While prepare or run works on a job it
//! holds a shared lock on `job-<id>.lock`; `gc` treats a locked job as active.

use std::fs::{self, DirBuilder, OpenOptions, TryLockError};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::lock::lock_file;
pub use crate::lock::{ActivityLock, ExclusiveLock};
use crate::plugin::Endpoint;
use crate::runner::ProcessIdentity;

const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write state file {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read state file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot remove state file {path}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot list state directory {path}")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} {problem}")]
    Unsafe { path: PathBuf, problem: String },
}

/// How hyperjob opens a file of its own in `state_dir`: created 0600, and never through a
/// symbolic link someone planted at its name (`O_NOFOLLOW`: the open fails instead).
pub(crate) fn private_file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW);
    options
}

/// The effective user id of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions, cannot fail and only reads process state.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid()
    }
}

/// Creates `dir` (0700; with `parents`, also what is missing above it) or checks the one that is
/// there: a real directory, not a symbolic link, owned by the user hyperjob runs as. Group or
/// other access to it is taken away (with a warning), since it holds state, keys and locks.
pub(crate) fn private_dir(dir: &Path, parents: bool) -> Result<(), StateError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    DirBuilder::new()
        .recursive(parents)
        .mode(0o700)
        .create(dir)
        .or_else(|err| match err.kind() {
            ErrorKind::AlreadyExists => Ok(()),
            _ => Err(err),
        })
        .map_err(|source| StateError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    let unsafe_dir = |problem: String| StateError::Unsafe {
        path: dir.to_path_buf(),
        problem,
    };
    let meta = fs::symlink_metadata(dir).map_err(|source| StateError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir(
            "is a symbolic link; hyperjob keeps state and keys only in a real directory (set \
             state_dir to where it points)"
                .to_string(),
        ));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("exists and is not a directory".to_string()));
    }
    let me = effective_uid();
    if meta.uid() != me {
        return Err(unsafe_dir(format!(
            "belongs to uid {}, not to uid {me} that hyperjob runs as; other users must not \
             control its state and keys (chown it, or choose another state_dir)",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            StateError::CreateDir {
                path: dir.to_path_buf(),
                source,
            }
        })?;
        tracing::warn!(
            "{} was mode {mode:04o}; made it 0700 (it holds job state and keys)",
            dir.display()
        );
    }
    Ok(())
}

/// Stores a client private key as `id_ed25519` in `dir` (created 0700, its parent must exist),
/// 0600; returns its path.
pub fn save_client_key_in(dir: &Path, private_openssh: &str) -> Result<PathBuf, StateError> {
    private_dir(dir, false)?;
    let path = dir.join("id_ed25519");
    let write = || -> std::io::Result<()> {
        let mut file = private_file_options().truncate(true).open(&path)?;
        file.write_all(private_openssh.as_bytes())?;
        file.sync_all()
    };
    write().map_err(|source| StateError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Writes `bytes` to `tmp` (opened with `options`, truncated), syncs it and renames it over
/// `path`, so a reader sees the old file or the new one, never half of one; `tmp` is removed
/// again when anything fails.
pub(crate) fn replace_file(
    options: &OpenOptions,
    tmp: &Path,
    path: &Path,
    bytes: &[u8],
) -> std::io::Result<()> {
    let write = || -> std::io::Result<()> {
        let mut file = options.clone().truncate(true).open(tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(tmp, path)
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(tmp);
    })
}

/// How far prepare got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// prepare is creating the VM (or died doing so).
    Creating,
    /// The guest is reachable at `endpoint`.
    Ready,
    /// cleanup halted the VM and handed its removal to a background process
    /// ([`crate::teardown`]); `gc` finishes it if that process died.
    Destroying,
    /// The job is over and cleanup kept its VM for debugging until its hold expires
    /// ([`crate::hold`]); nothing runs in it for hyperjob any more.
    Held,
}

/// What prepare records for the later stages of one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    pub version: u32,
    pub job_id: u64,
    pub vm_name: String,
    pub backend: String,
    pub transport: String,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    pub created_unix: u64,
    pub deadline_unix: u64,
    /// The runner that started prepare ([`crate::runner`]); a job whose runner is gone is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<ProcessIdentity>,
    /// The job's first failure so far (`build_failure`, or `system_failure/<cause>`), for the
    /// metrics counted at cleanup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The image the job picked (`[images.NAME]`); `None` without `[images]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The job's relay ([`crate::relay`]), which `cleanup` and `gc` end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<crate::relay::RelayRecord>,
    /// The debug hold the job was granted when its script failed ([`crate::hold`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<crate::hold::HoldRecord>,
    /// A directory in the guest appended to every stage script's `PATH`: where prepare put
    /// `gitlab-runner` for a login user who can write to no directory on it
    /// ([`crate::guest_runner`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_path: Option<String>,
}

impl JobState {
    /// The record prepare writes before it creates anything.
    pub fn creating(
        job_id: u64,
        vm_name: String,
        plugins: (&str, &str),
        times: (u64, u64),
    ) -> Self {
        Self {
            version: STATE_VERSION,
            job_id,
            vm_name,
            backend: plugins.0.to_string(),
            transport: plugins.1.to_string(),
            phase: Phase::Creating,
            endpoint: None,
            created_unix: times.0,
            deadline_unix: times.1,
            runner: None,
            failure: None,
            image: None,
            relay: None,
            hold: None,
            guest_path: None,
        }
    }

    /// The same record once cleanup handed the VM's removal to the background.
    pub fn destroying(self) -> Self {
        Self {
            phase: Phase::Destroying,
            ..self
        }
    }

    /// The same record once the guest is reachable.
    pub fn ready(self, endpoint: Endpoint) -> Self {
        Self {
            phase: Phase::Ready,
            endpoint: Some(endpoint),
            ..self
        }
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path_for(&self, job_id: u64) -> PathBuf {
        self.dir.join(format!("job-{job_id}.json"))
    }

    /// The socket of the job's relay ([`crate::relay`]).
    pub fn relay_socket(&self, job_id: u64) -> PathBuf {
        self.dir.join(format!("job-{job_id}.relay.sock"))
    }

    /// The directory holding a job's per-job client key.
    pub fn keys_dir(&self, job_id: u64) -> PathBuf {
        self.dir.join(format!("job-{job_id}.keys"))
    }

    /// Stores the job's client private key (0600 in a 0700 directory); returns its path.
    pub fn save_client_key(
        &self,
        job_id: u64,
        private_openssh: &str,
    ) -> Result<PathBuf, StateError> {
        self.ensure_dir()?;
        save_client_key_in(&self.keys_dir(job_id), private_openssh)
    }

    fn lock_path(&self, job_id: u64) -> PathBuf {
        self.dir.join(format!("job-{job_id}.lock"))
    }

    /// Creates the state directory (0700) or checks the one that is there.
    pub fn ensure_exists(&self) -> Result<(), StateError> {
        self.ensure_dir()
    }

    fn ensure_dir(&self) -> Result<(), StateError> {
        private_dir(&self.dir, true)
    }

    /// Marks the job as being worked on until the returned lock is dropped (or the process
    /// dies: the kernel releases the lock). Waits while `gc` decides about the job.
    pub fn lock_activity(&self, job_id: u64) -> Result<ActivityLock, StateError> {
        self.ensure_dir()?;
        let path = self.lock_path(job_id);
        let file = lock_file(&path, &|file| file.lock_shared().map(|()| true))?
            .expect("a blocking lock is always taken");
        Ok(ActivityLock { file, path })
    }

    /// The job's lock, exclusively, once no prepare, run or gc holds it (waits until then).
    pub fn lock_exclusive(&self, job_id: u64) -> Result<ExclusiveLock, StateError> {
        self.ensure_dir()?;
        let path = self.lock_path(job_id);
        let file = lock_file(&path, &|file| file.lock().map(|()| true))?
            .expect("a blocking lock is always taken");
        Ok(ExclusiveLock { _file: file, path })
    }

    /// The job's lock, exclusively, if no prepare, run or gc holds it now: while it is held,
    /// no stage of the job can start. `None` when the job is busy.
    pub fn try_lock_exclusive(&self, job_id: u64) -> Result<Option<ExclusiveLock>, StateError> {
        self.ensure_dir()?;
        let path = self.lock_path(job_id);
        let file = lock_file(&path, &|file| match file.try_lock() {
            Ok(()) => Ok(true),
            Err(TryLockError::WouldBlock) => Ok(false),
            Err(TryLockError::Error(err)) => Err(err),
        })?;
        Ok(file.map(|file| ExclusiveLock { _file: file, path }))
    }

    fn entries(&self) -> Result<Vec<(String, fs::DirEntry)>, StateError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::List {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        Ok(entries
            .filter_map(Result::ok)
            .filter_map(|entry| Some((entry.file_name().to_str()?.to_string(), entry)))
            .collect())
    }

    /// Job ids that have a file in the state directory: a state file, a lock file, keys or a
    /// relay socket.
    pub fn job_ids_with_files(&self) -> Result<Vec<u64>, StateError> {
        let mut ids: Vec<u64> = self
            .entries()?
            .iter()
            .filter_map(|(name, _)| {
                let rest = name.strip_prefix("job-")?;
                [".json", ".lock", ".keys", ".relay.sock"]
                    .iter()
                    .find_map(|suffix| rest.strip_suffix(suffix))?
                    .parse()
                    .ok()
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// Temporary files of state writes ([`StateStore::save`]) older than `max_age_secs` at
    /// `now`: a killed process left them.
    pub fn stale_temporary_files(
        &self,
        now: u64,
        max_age_secs: u64,
    ) -> Result<Vec<PathBuf>, StateError> {
        let mut stale: Vec<PathBuf> = self
            .entries()?
            .into_iter()
            .filter(|(name, _)| name.starts_with(".job-") && name.ends_with(".tmp"))
            .filter(|(_, entry)| {
                let modified = entry
                    .metadata()
                    .ok()
                    .and_then(|meta| meta.modified().ok())
                    .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok());
                modified.is_some_and(|age| age.as_secs().saturating_add(max_age_secs) < now)
            })
            .map(|(_, entry)| entry.path())
            .collect();
        stale.sort();
        Ok(stale)
    }

    /// Writes the state of a job atomically, 0600.
    pub fn save(&self, state: &JobState) -> Result<(), StateError> {
        self.ensure_dir()?;
        let path = self.path_for(state.job_id);
        let tmp = self.dir.join(format!(
            ".job-{}.json.{}.tmp",
            state.job_id,
            std::process::id()
        ));
        serde_json::to_vec_pretty(state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| replace_file(&private_file_options(), &tmp, &path, &bytes))
            .map_err(|source| StateError::Write { path, source })
    }

    /// The state of a job, or `None` when prepare never recorded one.
    pub fn load(&self, job_id: u64) -> Result<Option<JobState>, StateError> {
        let path = self.path_for(job_id);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Corrupt { path, source })
    }

    /// Removes a job's keys, relay socket, state and lock file (the state file last but for the
    /// lock); absent files are fine.
    pub fn remove(&self, job_id: u64) -> Result<(), StateError> {
        let keys = self.keys_dir(job_id);
        match fs::remove_dir_all(&keys) {
            Ok(()) => {}
            Err(err) if err.kind() == ErrorKind::NotFound => {}
            Err(source) => return Err(StateError::Remove { path: keys, source }),
        }
        let files = [
            self.relay_socket(job_id),
            self.path_for(job_id),
            self.lock_path(job_id),
        ];
        for path in files {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == ErrorKind::NotFound => {}
                Err(source) => return Err(StateError::Remove { path, source }),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn sample(job_id: u64) -> JobState {
        JobState::creating(
            job_id,
            format!("hyperjob-job-{job_id}"),
            ("libvirt", "ssh"),
            (100, 200),
        )
        .ready(Endpoint::new("192.0.2.10", None))
    }

    #[test]
    fn saved_state_loads_back_and_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path().join("state"));

        store.save(&sample(42)).expect("save");

        assert_eq!(store.load(42).expect("load"), Some(sample(42)));
        let file_mode = fs::metadata(store.path_for(42))
            .expect("meta")
            .permissions()
            .mode();
        let dir_mode = fs::metadata(dir.path().join("state"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(file_mode & 0o777, 0o600);
        assert_eq!(dir_mode & 0o777, 0o700);
    }

    #[test]
    fn missing_state_is_none_and_removing_it_is_fine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());

        assert_eq!(store.load(7).expect("load"), None);
        store.remove(7).expect("remove absent");
    }

    #[test]
    fn save_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());

        store.save(&sample(1)).expect("save");
        store.remove(1).expect("remove");

        assert_eq!(fs::read_dir(dir.path()).expect("read_dir").count(), 0);
    }

    #[test]
    fn job_ids_with_files_lists_state_lock_and_key_files_of_jobs_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        store.save(&sample(12)).expect("save");
        store.save(&sample(3)).expect("save");
        let _lock = store.lock_activity(5).expect("lock");
        let _lock3 = store.lock_activity(3).expect("lock");
        store.save_client_key(8, "key").expect("key");
        fs::write(dir.path().join("unrelated.json"), b"{}").expect("write");
        fs::write(dir.path().join("job-x.json"), b"{}").expect("write");

        assert_eq!(store.job_ids_with_files().expect("list"), vec![3, 5, 8, 12]);
    }

    #[test]
    fn only_old_temporary_files_of_state_writes_are_stale() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        let old = dir.path().join(".job-4.json.123.tmp");
        fs::write(&old, b"{").expect("write");
        fs::write(dir.path().join("other.tmp"), b"").expect("write");
        let now = crate::stages::unix_now();

        assert_eq!(
            store.stale_temporary_files(now, 60).expect("list"),
            Vec::<PathBuf>::new()
        );
        assert_eq!(
            store.stale_temporary_files(now + 120, 60).expect("list"),
            vec![old]
        );
    }

    #[test]
    fn remove_takes_the_lock_file_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        store.save(&sample(4)).expect("save");
        drop(store.lock_activity(4).expect("lock"));

        store.remove(4).expect("remove");

        assert_eq!(fs::read_dir(dir.path()).expect("read_dir").count(), 0);
    }

    #[test]
    fn client_key_is_private_and_removed_with_the_job() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        store.save(&sample(8)).expect("save");

        let key = store
            .save_client_key(8, "-----BEGIN OPENSSH PRIVATE KEY-----\n")
            .expect("key");
        let key_mode = fs::metadata(&key).expect("meta").permissions().mode();
        let dir_mode = fs::metadata(store.keys_dir(8))
            .expect("meta")
            .permissions()
            .mode();
        store.remove(8).expect("remove");

        assert_eq!(key_mode & 0o777, 0o600);
        assert_eq!(dir_mode & 0o777, 0o700);
        assert_eq!(fs::read_dir(dir.path()).expect("read_dir").count(), 0);
    }

    #[test]
    fn corrupt_state_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        fs::write(store.path_for(3), b"{not json").expect("write");

        let err = store.load(3).expect_err("corrupt");

        assert!(err.to_string().contains("is corrupt"), "{err}");
    }

    #[test]
    fn an_existing_state_dir_open_to_others_is_made_private() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("state");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");

        StateStore::new(&dir).save(&sample(1)).expect("save");

        let mode = fs::metadata(&dir).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_state_dir_that_is_a_symlink_is_refused_naming_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let real = root.path().join("real");
        fs::create_dir(&real).expect("mkdir");
        let link = root.path().join("state");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");

        let err = StateStore::new(&link)
            .save(&sample(1))
            .expect_err("refused");

        let message = err.to_string();
        assert!(message.contains("is a symbolic link"), "{message}");
        assert!(message.contains(&link.display().to_string()), "{message}");
        assert!(fs::read_dir(&real).expect("list").next().is_none());
    }

    #[test]
    fn a_state_dir_of_another_user_is_refused() {
        use std::os::unix::fs::MetadataExt;
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("state");
        fs::create_dir(&dir).expect("mkdir");
        let other = effective_uid().wrapping_add(1);
        // Giving a directory away needs root, as the suite runs (scripts/test.sh).
        std::os::unix::fs::chown(&dir, Some(other), None).expect("chown (tests run as root)");
        assert_eq!(fs::metadata(&dir).expect("meta").uid(), other);

        let err = StateStore::new(&dir).lock_activity(1).expect_err("refused");

        let message = err.to_string();
        assert!(
            message.contains(&format!("belongs to uid {other}")),
            "{message}"
        );
    }

    #[test]
    fn files_in_the_state_dir_never_follow_a_planted_symlink() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("state");
        let store = StateStore::new(&dir);
        store.save(&sample(1)).expect("save");
        let target = root.path().join("victim");
        fs::write(&target, "untouched").expect("victim");
        std::os::unix::fs::symlink(&target, dir.join("job-2.lock")).expect("plant lock");
        fs::create_dir(dir.join("job-3.keys")).expect("keys dir");
        fs::set_permissions(dir.join("job-3.keys"), fs::Permissions::from_mode(0o700))
            .expect("chmod");
        std::os::unix::fs::symlink(&target, dir.join("job-3.keys/id_ed25519")).expect("plant key");

        assert!(store.lock_activity(2).is_err());
        assert!(store.save_client_key(3, "PRIVATE KEY").is_err());

        assert_eq!(fs::read_to_string(&target).expect("victim"), "untouched");
    }
}
