//! The per-job lock in `state_dir` (`job-<id>.lock`). prepare and run hold it shared while
//! they work on a job; `gc` holds it exclusively while it decides about the job and removes
//! it, so the two never interleave. Held locks die with their process.

use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::state::{private_file_options, StateError};

/// A shared lock on a job, held while prepare or run works on it.
#[derive(Debug)]
pub struct ActivityLock {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
}

impl ActivityLock {
    /// Releases the lock and removes its file, unless another process holds or waits for the
    /// lock (then the file stays: it is theirs too). For a stage that leaves nothing behind.
    pub fn release_and_remove(self) {
        if self.file.try_lock().is_ok() && same_file(&self.file, &self.path) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The exclusive lock `gc` holds on a job while it decides about it and removes it.
#[derive(Debug)]
pub struct ExclusiveLock {
    pub(crate) _file: File,
    pub(crate) path: PathBuf,
}

impl ExclusiveLock {
    /// Removes the lock file (while the lock is still held, so nobody holds a lock on it).
    pub fn remove_file(&self) -> Result<(), StateError> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Remove {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

/// Opens (creating it) and locks `path` with `lock` (`Ok(false)`: not taken). A lock file is
/// removed only while its lock is held exclusively; whoever locked a file that has since been
/// removed or replaced holds nothing, so it tries again on the file now at `path`.
pub(crate) fn lock_file(
    path: &Path,
    lock: &dyn Fn(&File) -> std::io::Result<bool>,
) -> Result<Option<File>, StateError> {
    let failed = |source| StateError::Lock {
        path: path.to_path_buf(),
        source,
    };
    loop {
        let file = private_file_options()
            .truncate(false)
            .open(path)
            .map_err(failed)?;
        if !lock(&file).map_err(failed)? {
            return Ok(None);
        }
        if same_file(&file, path) {
            return Ok(Some(file));
        }
    }
}

/// Whether `file` is still the file at `path`.
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use crate::state::StateStore;

    #[test]
    fn a_held_activity_lock_keeps_gc_out_until_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());

        let lock = store.lock_activity(9).expect("lock");
        let while_held = store.try_lock_exclusive(9).expect("try").is_some();
        drop(lock);
        let after = store.try_lock_exclusive(9).expect("try").is_some();

        assert!(!while_held);
        assert!(after);
    }

    #[test]
    fn gc_holding_a_job_makes_a_stage_wait_and_a_removed_lock_file_is_never_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        let gc = store.try_lock_exclusive(3).expect("try").expect("free");
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let store = store.clone();
            std::thread::spawn(move || {
                let lock = store.lock_activity(3).expect("lock");
                tx.send(()).expect("send");
                lock
            })
        };

        let blocked = rx
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err();
        gc.remove_file().expect("remove");
        drop(gc);
        rx.recv().expect("the stage gets its lock once gc is done");
        let stage = waiter.join().expect("join");

        assert!(blocked, "the stage waited while gc held the job");
        assert!(
            store.try_lock_exclusive(3).expect("try").is_none(),
            "the stage holds the lock on the file now at the path, not on the removed one"
        );
        stage.release_and_remove();
        assert!(!dir.path().join("job-3.lock").exists());
    }

    #[test]
    fn release_and_remove_keeps_the_file_another_stage_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        let first = store.lock_activity(4).expect("lock");
        let second = store.lock_activity(4).expect("lock");

        first.release_and_remove();

        assert!(dir.path().join("job-4.lock").exists());
        assert!(store.try_lock_exclusive(4).expect("try").is_none());
        drop(second);
    }
}
