//! Per-job state on disk. prepare, every run and cleanup are separate processes, so what prepare
//! learned (the guest's endpoint) is written here and read back by run. Files are written
//! atomically (temporary file + rename) with mode 0600 in a 0700 directory.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plugin::Endpoint;

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
}

/// What prepare records for the later stages of one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    pub version: u32,
    pub job_id: u64,
    pub vm_name: String,
    pub backend: String,
    pub transport: String,
    pub endpoint: Endpoint,
    pub created_unix: u64,
    pub deadline_unix: u64,
}

impl JobState {
    pub fn new(
        job_id: u64,
        vm_name: String,
        plugins: (&str, &str),
        endpoint: Endpoint,
        times: (u64, u64),
    ) -> Self {
        Self {
            version: STATE_VERSION,
            job_id,
            vm_name,
            backend: plugins.0.to_string(),
            transport: plugins.1.to_string(),
            endpoint,
            created_unix: times.0,
            deadline_unix: times.1,
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

    /// Writes the state of a job atomically, 0600.
    pub fn save(&self, state: &JobState) -> Result<(), StateError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| StateError::CreateDir {
                path: self.dir.clone(),
                source,
            })?;
        let path = self.path_for(state.job_id);
        let tmp = self.dir.join(format!(
            ".job-{}.json.{}.tmp",
            state.job_id,
            std::process::id()
        ));
        let write = |tmp: &Path| -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(tmp)?;
            let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(tmp, &path)
        };
        write(&tmp).map_err(|source| {
            let _ = fs::remove_file(&tmp);
            StateError::Write {
                path: path.clone(),
                source,
            }
        })
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

    /// Removes a job's state; absent state is fine.
    pub fn remove(&self, job_id: u64) -> Result<(), StateError> {
        let path = self.path_for(job_id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Remove { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn sample(job_id: u64) -> JobState {
        JobState::new(
            job_id,
            format!("hyperjob-job-{job_id}"),
            ("libvirt", "ssh"),
            Endpoint {
                host: "192.0.2.10".to_string(),
                port: None,
            },
            (100, 200),
        )
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
    fn corrupt_state_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        fs::write(store.path_for(3), b"{not json").expect("write");

        let err = store.load(3).expect_err("corrupt");

        assert!(err.to_string().contains("is corrupt"), "{err}");
    }
}
