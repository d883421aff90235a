//! One VM's directory (`<state_dir>/template/<vm name>/`): its record, starting QEMU, and
//! asking QEMU to quit.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hyperjob_plugin::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::TemplateConfig;

/// How long QEMU may take to quit when asked.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// What `create` records about a VM, read back by every later stage.
#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub job_id: u64,
    pub created_unix: u64,
    pub deadline_unix: u64,
    pub owner: String,
    /// The port on 127.0.0.1 that QEMU forwards to the guest's SSH port.
    pub port: u16,
}

impl Record {
    /// The record as `list_owned` reports it.
    pub fn owned_vm(&self, vm_name: &str) -> OwnedVm {
        OwnedVm {
            vm_name: vm_name.to_string(),
            job_id: self.job_id,
            created_unix: self.created_unix,
            deadline_unix: self.deadline_unix,
            owner: Some(self.owner.clone()),
        }
    }
}

/// The directory of one VM.
#[derive(Debug)]
pub struct VmDir {
    name: String,
    dir: PathBuf,
}

impl VmDir {
    pub fn new(vms_dir: &Path, vm_name: &str) -> Self {
        Self {
            name: vm_name.to_string(),
            dir: vms_dir.join(vm_name),
        }
    }

    fn record_path(&self) -> PathBuf {
        self.dir.join("record.toml")
    }

    fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// Creates the directory (0700) and writes the record (0600), before anything is started:
    /// a later `destroy` or `hyperjob gc` finds the VM from it.
    pub fn create_record(&self, request: &VmRequest) -> Result<(), PluginError> {
        let fail = |what: &str, err: std::io::Error| {
            PluginError::system(format!("cannot {what} for {}", self.name), err)
        };
        if let Some(parent) = self.dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|err| fail("create the VMs' directory", err))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.dir)
            .map_err(|err| fail("create the VM's directory", err))?;
        let record = Record {
            job_id: request.job_id,
            created_unix: request.created_unix,
            deadline_unix: request.deadline_unix,
            owner: request.owner.clone(),
            port: free_port().map_err(|err| fail("find a free port", err))?,
        };
        let text = toml::to_string(&record)
            .map_err(|err| PluginError::system("cannot encode the VM record", err))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.record_path())
            .map_err(|err| fail("write the VM record", err))?;
        file.write_all(text.as_bytes())
            .map_err(|err| fail("write the VM record", err))
    }

    /// The VM's record; [`PluginError::NotFound`] if there is no such VM.
    pub fn record(&self) -> Result<Record, PluginError> {
        let text = match std::fs::read_to_string(self.record_path()) {
            Ok(text) => text,
            Err(err) if err.kind() == ErrorKind::NotFound => {
                return Err(PluginError::NotFound(format!("no VM {}", self.name)))
            }
            Err(err) => return Err(PluginError::system("cannot read the VM record", err)),
        };
        toml::from_str(&text).map_err(|err| {
            PluginError::msg(format!(
                "the record of {} is corrupt: {}",
                self.name,
                err.message()
            ))
        })
    }

    /// Starts QEMU in the background (`-daemonize`: QEMU exits non-zero, saying why on stderr,
    /// if it cannot start the VM).
    pub fn start_qemu(&self, config: &TemplateConfig) -> Result<(), PluginError> {
        let port = self.record()?.port;
        let mut command = Command::new("qemu-system-x86_64");
        command
            .arg("-name")
            .arg(format!("guest={}", self.name))
            .args(["-nodefaults", "-no-user-config"])
            .args(["-machine", &format!("accel={}", config.accel)])
            .args(["-m", &config.memory_mib.to_string()])
            .args(["-smp", &config.vcpus.to_string()])
            .args(["-display", "none", "-daemonize", "-snapshot"])
            .arg("-drive")
            .arg(with_path(
                "file=",
                &config.base_image,
                ",if=virtio,format=qcow2",
            ))
            .args([
                "-netdev",
                &format!("user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22"),
            ])
            .args([
                "-device",
                "virtio-net-pci,netdev=net0",
                "-device",
                "virtio-rng-pci",
            ])
            .arg("-serial")
            .arg(with_path("file:", &self.dir.join("console.log"), ""))
            .arg("-qmp")
            .arg(with_path(
                "unix:",
                &self.qmp_socket(),
                ",server=on,wait=off",
            ));
        if let Some(kernel) = &config.kernel {
            command.arg("-kernel").arg(kernel);
        }
        if let Some(initrd) = &config.initrd {
            command.arg("-initrd").arg(initrd);
        }
        if let Some(cmdline) = &config.cmdline {
            command.args(["-append", cmdline]);
        }
        let output = command
            .stdin(Stdio::null())
            .output()
            .map_err(|err| PluginError::system("cannot run qemu-system-x86_64", err))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(PluginError::msg(format!(
                "QEMU could not start {}: {}",
                self.name,
                stderr.split_whitespace().collect::<Vec<_>>().join(" ")
            )));
        }
        Ok(())
    }

    /// Asks QEMU to quit and removes the directory. Idempotent: no directory, no QEMU (its
    /// socket gone or refusing) is success.
    pub fn destroy(&self) -> Result<(), PluginError> {
        if !self.dir.exists() {
            return Ok(());
        }
        match UnixStream::connect(self.qmp_socket()) {
            Ok(stream) => quit(stream).map_err(|err| {
                PluginError::system(format!("cannot make QEMU of {} quit", self.name), err)
            })?,
            Err(err)
                if matches!(
                    err.kind(),
                    ErrorKind::NotFound | ErrorKind::ConnectionRefused
                ) => {}
            Err(err) => return Err(PluginError::system("cannot reach QEMU's QMP socket", err)),
        }
        match std::fs::remove_dir_all(&self.dir) {
            Err(err) if err.kind() != ErrorKind::NotFound => Err(PluginError::system(
                format!("cannot remove the directory of {}", self.name),
                err,
            )),
            _ => Ok(()),
        }
    }
}

/// Tells QEMU to quit over QMP and waits until it closed the connection (it has exited then).
fn quit(stream: UnixStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(QUIT_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut lines = BufReader::new(stream).lines();
    lines.next().transpose()?; // QEMU's greeting
    writer.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n")?;
    for line in lines {
        match line {
            Err(err) if err.kind() == ErrorKind::ConnectionReset => break,
            other => drop(other?),
        }
    }
    Ok(())
}

/// `prefix` + `path` + `suffix` as one QEMU option value.
fn with_path(prefix: &str, path: &Path, suffix: &str) -> std::ffi::OsString {
    let mut value = std::ffi::OsString::from(prefix);
    value.push(path);
    value.push(suffix);
    value
}

/// A port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
