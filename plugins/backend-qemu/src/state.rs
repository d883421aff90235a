//! `<images_dir>/<vm>.qemu.json`: how any later process (cleanup, gc) finds a VM's QEMU again,
//! and the VM's ownership record for `list_owned`.
//!
//! Written 0600 through a temporary file and a rename, first *before* QEMU starts (no pid yet)
//! and again once QEMU has written its pid file. Destroy trusts only the pid and re-derives
//! every path from the VM name, so a tampered record cannot direct it at other files, and the
//! pid is only signalled after it is proven to be this VM's QEMU (`process`).

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hyperjob_plugin::PluginError;
use serde::{Deserialize, Serialize};

/// File name suffix of a state file.
pub const STATE_SUFFIX: &str = ".qemu.json";
/// The `format` of records this version writes; others are not ours (or not understood).
pub const FORMAT: &str = "hyperjob-backend-qemu/1";

/// One VM's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuState {
    pub format: String,
    pub vm_name: String,
    pub job_id: u64,
    pub created_unix: u64,
    pub deadline_unix: u64,
    /// The loopback port forwarded to the guest.
    pub host_port: u16,
    /// QEMU's pid once known (it is written by QEMU to the pid file as it daemonizes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub qmp_socket: PathBuf,
    pub overlay: PathBuf,
    /// The installation that made the VM (`VmRequest::owner`); absent in records of a
    /// hyperjob from before owners were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl QemuState {
    pub fn is_ours(&self, vm_name: &str) -> bool {
        self.format == FORMAT && self.vm_name == vm_name
    }
}

/// Writes `state` to `path` (0600) through `tmp` and a rename.
pub fn write(path: &Path, tmp: &Path, state: &QemuState) -> Result<(), PluginError> {
    let text = serde_json::to_vec_pretty(state)
        .map_err(|err| PluginError::system("cannot encode the QEMU state", err))?;
    let _ = fs::remove_file(tmp);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .and_then(|mut file| {
            file.write_all(&text)?;
            file.write_all(b"\n")?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(tmp, path));
    written.map_err(|err| {
        let _ = fs::remove_file(tmp);
        PluginError::system(format!("cannot write {}", path.display()), err)
    })
}

/// Reads a state file; `None` when there is none.
pub fn read(path: &Path) -> Result<Option<QemuState>, PluginError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(PluginError::system(
                format!("cannot read {}", path.display()),
                err,
            ))
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|err| PluginError::system(format!("{} is not a QEMU state", path.display()), err))
}

/// The pid QEMU wrote to its pid file, if there is a readable one.
pub fn read_pidfile(path: &Path) -> Option<u32> {
    fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|pid| *pid > 1)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn sample() -> QemuState {
        QemuState {
            format: FORMAT.to_string(),
            vm_name: "hyperjob-job-9".to_string(),
            job_id: 9,
            created_unix: 1_700_000_000,
            deadline_unix: 1_700_007_200,
            host_port: 40123,
            pid: None,
            qmp_socket: PathBuf::from("/i/hyperjob-job-9.qmp"),
            overlay: PathBuf::from("/i/hyperjob-job-9.qcow2"),
            owner: Some("/var/lib/hyperjob".to_string()),
        }
    }

    #[test]
    fn state_round_trips_private_and_without_leftovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hyperjob-job-9.qemu.json");
        let tmp = dir.path().join(".hyperjob-job-9.qemu.json.tmp");
        let mut state = sample();

        write(&path, &tmp, &state).expect("write before start");
        let before = read(&path).expect("read").expect("present");
        state.pid = Some(4242);
        write(&path, &tmp, &state).expect("write with pid");
        let after = read(&path).expect("read").expect("present");

        assert_eq!(before.pid, None);
        assert_eq!(after, state);
        assert!(after.is_ours("hyperjob-job-9"));
        assert!(!after.is_ours("hyperjob-job-10"));
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!tmp.exists());
    }

    #[test]
    fn missing_state_is_none_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.qemu.json");

        assert_eq!(read(&path).expect("absent"), None);
        fs::write(&path, b"{not json").expect("write");
        let err = read(&path).expect_err("garbage");
        assert!(err.to_string().ends_with("is not a QEMU state"), "{err}");
    }

    #[test]
    fn a_record_written_without_an_owner_reads_as_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hyperjob-job-9.qemu.json");
        let mut old = serde_json::to_value(sample()).expect("encode");
        old.as_object_mut().expect("object").remove("owner");
        fs::write(&path, old.to_string()).expect("write");

        let record = read(&path).expect("read").expect("present");

        assert_eq!(record.owner, None);
        assert_eq!(
            record,
            QemuState {
                owner: None,
                ..sample()
            }
        );
    }

    #[test]
    fn a_record_of_another_format_is_not_ours() {
        let state = QemuState {
            format: "something-else/1".to_string(),
            ..sample()
        };

        assert!(!state.is_ours("hyperjob-job-9"));
    }

    #[test]
    fn pidfile_is_read_leniently() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm.pid");

        assert_eq!(read_pidfile(&path), None);
        fs::write(&path, "1234\n").expect("write");
        assert_eq!(read_pidfile(&path), Some(1234));
        fs::write(&path, "1\n").expect("write");
        assert_eq!(read_pidfile(&path), None);
        fs::write(&path, "").expect("write");
        assert_eq!(read_pidfile(&path), None);
    }
}
