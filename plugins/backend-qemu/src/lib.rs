//! A hyperjob backend that drives `qemu-system-x86_64` directly — no libvirt — loaded as a
//! shared-library plugin (`plugins = [".../libhyperjob_backend_qemu.so"]`, `backend = "qemu"`).
//!
//! One detached QEMU per job, on a per-job qcow2 overlay of a base image, with user-mode
//! networking: the guest's SSH port is forwarded to a loopback port of the host, so there is no
//! bridge, no DHCP server, no root and no network namespace to set up. Everything a VM owns
//! lives in `images_dir` under its name, so any later process can find and remove it from the
//! name alone:
//!
//! | file | what |
//! |---|---|
//! | `<vm>.qemu.json` | the state: pid, port, QMP socket, ownership (0600; written before QEMU starts) |
//! | `<vm>.qcow2` | the overlay (0600) |
//! | `<vm>.seed.iso` | the cloud-init seed with per-job keys (0600), only with `guest_keys = "per-job"` |
//! | `<vm>.console.log` | the serial console (0600) |
//! | `<vm>.pid` | QEMU's pid file |
//! | `<vm>.qmp` | QEMU's QMP socket |
//! | `<vm>.ssh.sock` | the guest's SSH on a virtio-serial port, only with `endpoint = "unix"` |

pub mod argv;
pub mod config;
pub mod process;
pub mod qmp;
pub mod state;

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyperjob_image_tools::{console, overlay, seed};
use hyperjob_plugin::{
    Backend, Endpoint, EndpointKind, OwnedVm, PluginContext, PluginError, Progress, VmRequest,
};

pub use argv::VmPaths;
pub use config::QemuConfig;
use process::OurQemu;
use state::QemuState;

/// How often a start is retried when the forwarded port was taken in the meantime.
const PORT_ATTEMPTS: usize = 4;
/// How long QEMU may take to set itself up before its daemonizing parent exits.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Bounds each QMP read and write.
const QMP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long QEMU gets to exit after `quit`, and again after SIGKILL.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

hyperjob_plugin::export_plugin! {
    backends: ["qemu" => build],
    transports: [],
}

/// The factory hyperjob calls with the TOML text of `[backends.qemu]`.
pub fn build(ctx: &PluginContext, table_text: &str) -> Result<Box<dyn Backend>, PluginError> {
    Ok(Box::new(QemuBackend::new(QemuConfig::from_toml_text(
        table_text,
        &ctx.state_dir,
    )?)))
}

/// The QEMU backend.
#[derive(Debug)]
pub struct QemuBackend {
    config: QemuConfig,
}

impl QemuBackend {
    pub fn new(config: QemuConfig) -> Self {
        Self { config }
    }

    pub fn paths(&self, vm_name: &str) -> VmPaths {
        VmPaths::new(&self.config.images_dir, vm_name)
    }

    fn check_inputs(&self, paths: &VmPaths) -> Result<(), PluginError> {
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
        let mut sockets = vec![("QMP socket", &paths.qmp_socket)];
        if self.config.endpoint == EndpointKind::Unix {
            sockets.push(("SSH socket", &paths.ssh_socket));
        }
        for (what, socket) in sockets {
            let socket_len = socket.as_os_str().len();
            if socket_len > MAX_SOCKET_PATH {
                return Err(PluginError::Config(format!(
                    "`images_dir` is too long: the {what} {} would be {socket_len} bytes, unix \
                     sockets allow {MAX_SOCKET_PATH}",
                    socket.display()
                )));
            }
        }
        Ok(())
    }

    /// Creates `images_dir` (0700) when it does not exist yet.
    fn ensure_images_dir(&self) -> Result<(), PluginError> {
        let dir = &self.config.images_dir;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|err| PluginError::system(format!("cannot create {}", dir.display()), err))
    }

    /// The overlay (0600: it will hold whatever the job writes), the seed, an empty console
    /// log (0600, so QEMU's own umask never decides who may read the guest console).
    fn create_disks(&self, request: &VmRequest, paths: &VmPaths) -> Result<(), PluginError> {
        overlay::create(&self.config.base_image, &paths.overlay)?;
        fs::set_permissions(&paths.overlay, fs::Permissions::from_mode(0o600)).map_err(|err| {
            PluginError::system(format!("cannot restrict {}", paths.overlay.display()), err)
        })?;
        if let Some(keys) = &request.keys {
            seed::create(&paths.seed, &request.vm_name, keys)?;
        }
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&paths.console_log)
            .map(drop)
            .map_err(|err| {
                PluginError::system(
                    format!("cannot create {}", paths.console_log.display()),
                    err,
                )
            })
    }

    /// Starts QEMU and waits for its daemonizing parent. `Ok(Err(reason))` when QEMU refused
    /// to start, with its one-line reason.
    fn start_qemu(
        &self,
        request: &VmRequest,
        paths: &VmPaths,
        host_port: u16,
    ) -> Result<Result<(), String>, PluginError> {
        let args = argv::qemu_args(&argv::Launch {
            config: &self.config,
            vm_name: &request.vm_name,
            paths,
            with_seed: request.keys.is_some(),
            host_port,
        });
        let mut command = Command::new(&self.config.qemu);
        command
            .args(&args)
            // The job's environment (CUSTOM_ENV_*, tokens) must not live on in a detached
            // process's /proc/<pid>/environ: QEMU gets PATH and nothing else.
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        let mut child = command.spawn().map_err(|err| {
            PluginError::system(format!("cannot run {}", self.config.qemu.display()), err)
        })?;
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() < START_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ok(Err(format!(
                        "QEMU did not finish starting within {} s",
                        START_TIMEOUT.as_secs()
                    )));
                }
                Err(err) => return Err(PluginError::system("cannot wait for QEMU", err)),
            }
        };
        if status.success() {
            return Ok(Ok(()));
        }
        // The daemon closed its copy of stderr before the parent exited (or died): this read
        // ends promptly.
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        let stderr = stderr.split_whitespace().collect::<Vec<_>>().join(" ");
        Ok(Err(if stderr.is_empty() {
            format!("QEMU exited with {status} while starting")
        } else {
            stderr
        }))
    }

    fn record(&self, request: &VmRequest, paths: &VmPaths, host_port: u16) -> QemuState {
        QemuState {
            format: state::FORMAT.to_string(),
            vm_name: request.vm_name.clone(),
            job_id: request.job_id,
            created_unix: request.created_unix,
            deadline_unix: request.deadline_unix,
            host_port,
            pid: None,
            qmp_socket: paths.qmp_socket.clone(),
            overlay: paths.overlay.clone(),
            owner: Some(request.owner.clone()),
        }
    }

    fn try_create(
        &self,
        request: &VmRequest,
        paths: &VmPaths,
        progress: &dyn Progress,
        wanted: &Wanted<'_>,
    ) -> Result<(), PluginError> {
        for attempt in 1..=PORT_ATTEMPTS {
            wanted.check()?;
            let host_port = process::pick_free_port()
                .map_err(|err| PluginError::system("cannot find a free loopback port", err))?;
            let mut record = self.record(request, paths, host_port);
            // Before QEMU starts, so whatever happens next can be found again.
            state::write(&paths.state, &paths.state_tmp, &record)?;
            if attempt == 1 {
                self.create_disks(request, paths)?;
                if request.keys.is_some() {
                    progress.say("cloud-init seed with the job's SSH keys created");
                }
                let ssh = match self.config.endpoint {
                    EndpointKind::Unix => format!("unix:{}", paths.ssh_socket.display()),
                    _ => format!("127.0.0.1:{host_port}"),
                };
                progress.say(&format!(
                    "Overlay {} on {} created; starting QEMU ({}, {} vCPU, {} MiB, SSH on \
                     {ssh})...",
                    paths.overlay.display(),
                    self.config.base_image.display(),
                    self.config.accel.as_str(),
                    self.config.vcpus,
                    self.config.memory_mib
                ));
            }
            match self.start_qemu(request, paths, host_port)? {
                Ok(()) => {
                    record.pid = state::read_pidfile(&paths.pidfile);
                    state::write(&paths.state, &paths.state_tmp, &record)?;
                    // QEMU's umask made it 0750; only its owner has any business there.
                    let _ =
                        fs::set_permissions(&paths.qmp_socket, fs::Permissions::from_mode(0o600));
                    return Ok(());
                }
                // The port was taken between pick_free_port and QEMU binding it: next port.
                Err(reason)
                    if reason.contains("host forwarding rule") && attempt < PORT_ATTEMPTS => {}
                Err(reason) => {
                    return Err(PluginError::msg(format!(
                        "QEMU could not start VM {}: {reason}",
                        request.vm_name
                    )))
                }
            }
        }
        Err(PluginError::msg(format!(
            "QEMU could not start VM {}: no free loopback port after {PORT_ATTEMPTS} attempts",
            request.vm_name
        )))
    }

    /// Stops every QEMU of this VM: `quit` over QMP, then SIGKILL whatever is still running
    /// after a grace period. Only processes proven to run this VM's overlay are touched.
    fn stop_qemu(&self, vm_name: &str, paths: &VmPaths) -> Result<(), PluginError> {
        let recorded = match state::read(&paths.state) {
            Ok(record) => record.filter(|r| r.is_ours(vm_name)).and_then(|r| r.pid),
            Err(err) => {
                warn(&format!("{err}; looking for {vm_name}'s QEMU without it"));
                None
            }
        };
        // Fails harmlessly (no socket, refused) when QEMU is not running; a hung QEMU times
        // out and is killed below.
        let quit = qmp::quit(&paths.qmp_socket, QMP_TIMEOUT);
        let mut pids: Vec<u32> = recorded
            .into_iter()
            .chain(state::read_pidfile(&paths.pidfile))
            .collect();
        pids.dedup();
        let mut running = Vec::new();
        for pid in pids {
            if let Some(qemu) = OurQemu::open(pid, &paths.overlay)
                .map_err(|err| PluginError::system(format!("cannot open process {pid}"), err))?
            {
                running.push(qemu);
            }
        }
        if running.is_empty() {
            // No usable pid (prepare was killed before QEMU wrote one, or the pid file is
            // gone): look for a process running this VM's overlay.
            for pid in process::find_our_qemus(&paths.overlay) {
                if let Some(qemu) = OurQemu::open(pid, &paths.overlay)
                    .map_err(|err| PluginError::system(format!("cannot open process {pid}"), err))?
                {
                    running.push(qemu);
                }
            }
        }
        for qemu in &running {
            let exited = qemu.wait_exit(if quit.is_ok() {
                EXIT_GRACE
            } else {
                Duration::ZERO
            });
            if !matches!(exited, Ok(true)) {
                qemu.kill().map_err(|err| {
                    PluginError::system(format!("cannot kill QEMU (pid {})", qemu.pid), err)
                })?;
                if !matches!(qemu.wait_exit(EXIT_GRACE), Ok(true)) {
                    return Err(PluginError::msg(format!(
                        "QEMU of VM {vm_name} (pid {}) did not exit after SIGKILL",
                        qemu.pid
                    )));
                }
            }
        }
        Ok(())
    }

    fn remove_files(paths: &VmPaths) -> Result<(), PluginError> {
        paths
            .all()
            .iter()
            .map(|file| overlay::remove_file(file))
            .fold(Ok(()), Result::and)
    }

    /// The last non-empty console line, for a one-line error.
    fn last_console_line(&self, vm_name: &str) -> Option<String> {
        let tail = self.console_tail(vm_name).ok()?;
        tail.lines().last().map(|line| line.trim().to_string())
    }
}

/// The bounds of one `create`.
struct Wanted<'a> {
    what: String,
    started: Instant,
    deadline: Instant,
    cancel: &'a AtomicBool,
}

impl Wanted<'_> {
    fn check(&self) -> Result<(), PluginError> {
        hyperjob_plugin::wait::still_wanted(&self.what, self.started, self.deadline, self.cancel)
    }
}

impl Backend for QemuBackend {
    fn create(
        &self,
        request: &VmRequest,
        progress: &dyn Progress,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<(), PluginError> {
        let paths = self.paths(&request.vm_name);
        self.check_inputs(&paths)?;
        self.ensure_images_dir()?;
        let wanted = Wanted {
            what: format!("creating VM {}", request.vm_name),
            started: Instant::now(),
            deadline,
            cancel,
        };
        if let Err(err) = self.try_create(request, &paths, progress, &wanted) {
            // Whatever got created goes, the QEMU (if it came up after all) included.
            if let Err(destroy_err) = self.destroy(&request.vm_name) {
                warn(&format!(
                    "removing the half-created VM failed: {destroy_err}"
                ));
            }
            return Err(err);
        }
        Ok(())
    }

    fn endpoint_kinds(&self) -> Vec<EndpointKind> {
        vec![self.config.endpoint]
    }

    fn wait_address(
        &self,
        vm_name: &str,
        _deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<Endpoint, PluginError> {
        if cancel.load(Ordering::Relaxed) {
            return Err(PluginError::Interrupted(
                "while waiting for the guest address".into(),
            ));
        }
        let paths = self.paths(vm_name);
        let record = state::read(&paths.state)?
            .filter(|record| record.is_ours(vm_name))
            .ok_or_else(|| {
                PluginError::NotFound(format!(
                    "VM {vm_name} has no QEMU state at {}",
                    paths.state.display()
                ))
            })?;
        let pid = record.pid.or_else(|| state::read_pidfile(&paths.pidfile));
        if !pid.is_some_and(|pid| process::is_our_qemu(pid, &paths.overlay)) {
            let last = self
                .last_console_line(vm_name)
                .map(|line| format!("; last console line: {line:?}"))
                .unwrap_or_default();
            return Err(PluginError::msg(format!(
                "QEMU of VM {vm_name} is not running (it exited while booting){last}"
            )));
        }
        Ok(match self.config.endpoint {
            // The virtio-serial port's socket: QEMU made it before it daemonized.
            EndpointKind::Unix => Endpoint::unix(&paths.ssh_socket),
            // User-mode networking: the guest is reached through the forwarded loopback port;
            // there is no address to wait for.
            _ => Endpoint::new("127.0.0.1", Some(record.host_port)),
        })
    }

    fn destroy(&self, vm_name: &str) -> Result<(), PluginError> {
        let paths = self.paths(vm_name);
        // A QEMU that could not be stopped keeps its files: the next attempt finds it again.
        self.stop_qemu(vm_name, &paths)?;
        Self::remove_files(&paths)
    }

    fn list_owned(&self) -> Result<Vec<OwnedVm>, PluginError> {
        let dir = &self.config.images_dir;
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => {
                return Err(PluginError::system(
                    format!("cannot list {}", dir.display()),
                    err,
                ))
            }
        };
        let mut owned = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(vm_name) = name
                .to_str()
                .and_then(|n| n.strip_suffix(state::STATE_SUFFIX))
                .filter(|n| !n.starts_with('.'))
            else {
                continue;
            };
            // Ownership is the record hyperjob wrote; existence is a live QEMU on its overlay.
            let Ok(Some(record)) = state::read(&entry.path()) else {
                continue;
            };
            if !record.is_ours(vm_name) {
                continue;
            }
            let paths = self.paths(vm_name);
            let pid = record.pid.or_else(|| state::read_pidfile(&paths.pidfile));
            if pid.is_some_and(|pid| process::is_our_qemu(pid, &paths.overlay)) {
                owned.push(OwnedVm {
                    vm_name: record.vm_name,
                    job_id: record.job_id,
                    created_unix: record.created_unix,
                    deadline_unix: record.deadline_unix,
                    owner: record.owner,
                });
            }
        }
        owned.sort_by(|a, b| a.vm_name.cmp(&b.vm_name));
        Ok(owned)
    }

    fn console_tail(&self, vm_name: &str) -> Result<String, PluginError> {
        console::tail_of_log(&self.paths(vm_name).console_log)
    }
}

/// A warning on stderr (the job log during prepare). Not `tracing`: a shared-library plugin
/// has its own copy of tracing's global dispatcher, which hyperjob's subscriber never reaches.
fn warn(message: &str) {
    eprintln!("WARN hyperjob-backend-qemu: {}", message.replace('\n', " "));
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::process::test_support::{kill_and_reap, qemu_lookalike};

    fn far_deadline() -> Instant {
        Instant::now() + Duration::from_secs(600)
    }

    fn backend_in(images_dir: &Path) -> QemuBackend {
        QemuBackend::new(
            QemuConfig::from_toml_text(
                &format!(
                    "base_image = \"/nonexistent/base.qcow2\"\nimages_dir = \"{}\"",
                    images_dir.display()
                ),
                Path::new("/var/lib/hyperjob"),
            )
            .expect("config"),
        )
    }

    struct Quiet;
    impl Progress for Quiet {
        fn say(&self, _message: &str) {}
    }

    fn request(job_id: u64) -> VmRequest {
        VmRequest {
            vm_name: format!("hyperjob-job-{job_id}"),
            job_id,
            created_unix: 100,
            deadline_unix: 200,
            owner: "/var/lib/hyperjob".to_string(),
            keys: None,
        }
    }

    /// A stand-in for QEMU: the first start fails as if the forwarded port had been taken
    /// meanwhile, the second succeeds. Each start logs its argv and its environment.
    fn fake_qemu(dir: &Path) -> PathBuf {
        let script = dir.join("fake-qemu");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\n\
                 log={log}\n\
                 echo \"ARGV $*\" >> \"$log\"\n\
                 env | sed 's/=.*//' | sed 's/^/ENV /' >> \"$log\"\n\
                 if [ ! -e \"$log.started\" ]; then\n\
                   : > \"$log.started\"\n\
                   echo \"qemu-system-x86_64: -netdev user: Could not set up host forwarding rule 'tcp:127.0.0.1:1-:22'\" >&2\n\
                   exit 1\n\
                 fi\n",
                log = dir.join("fake.log").display()
            ),
        )
        .expect("script");
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
        script
    }

    #[test]
    fn a_port_taken_meanwhile_is_retried_with_another_and_qemu_gets_no_job_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        fs::write(&base, vec![0u8; 1 << 20]).expect("base");
        let images = dir.path().join("images");
        let config = QemuConfig::from_toml_text(
            &format!(
                "qemu = \"{}\"\nbase_image = \"{}\"\nimages_dir = \"{}\"",
                fake_qemu(dir.path()).display(),
                base.display(),
                images.display()
            ),
            Path::new("/var/lib/hyperjob"),
        )
        .expect("config");
        let backend = QemuBackend::new(config);

        backend
            .create(&request(5), &Quiet, far_deadline(), &AtomicBool::new(false))
            .expect("second attempt starts");

        let log = fs::read_to_string(dir.path().join("fake.log")).expect("log");
        let ports: Vec<&str> = log
            .lines()
            .filter_map(|line| line.strip_prefix("ARGV "))
            .filter_map(|argv| argv.split("hostfwd=tcp:127.0.0.1:").nth(1))
            .filter_map(|rest| rest.split('-').next())
            .collect();
        assert_eq!(ports.len(), 2, "{log}");
        let record = state::read(&backend.paths("hyperjob-job-5").state)
            .expect("read")
            .expect("state");
        assert_eq!(record.host_port.to_string(), ports[1]);
        let env: Vec<&str> = log
            .lines()
            .filter_map(|line| line.strip_prefix("ENV "))
            .collect();
        assert!(env.contains(&"PATH"), "{env:?}");
        // Only PATH, plus what sh itself sets.
        assert!(
            env.iter()
                .all(|name| ["PATH", "PWD", "OLDPWD", "SHLVL", "_"].contains(name)),
            "{env:?}"
        );
        backend.destroy("hyperjob-job-5").expect("destroy");
        assert_eq!(fs::read_dir(&images).expect("list").count(), 0);
    }

    #[test]
    fn destroy_of_nothing_succeeds_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = backend_in(dir.path());

        backend.destroy("hyperjob-job-1").expect("first");
        backend.destroy("hyperjob-job-1").expect("second");
        backend
            .destroy("hyperjob-job-1")
            .expect("even without images_dir");
    }

    #[test]
    fn destroy_removes_every_file_of_the_vm_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = backend_in(dir.path());
        let paths = backend.paths("hyperjob-job-1");
        for file in paths.all() {
            fs::write(file, b"x").expect("write");
        }
        let neighbour = backend.paths("hyperjob-job-11");
        fs::write(&neighbour.overlay, b"x").expect("write");

        backend.destroy("hyperjob-job-1").expect("destroy");

        let left: Vec<PathBuf> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(left, vec![neighbour.overlay]);
    }

    #[test]
    fn a_missing_base_image_fails_create_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = dir.path().join("images");
        let backend = backend_in(&images);

        let err = backend
            .create(&request(5), &Quiet, far_deadline(), &AtomicBool::new(false))
            .expect_err("no base");

        assert_eq!(
            err.to_string(),
            "base image /nonexistent/base.qcow2 does not exist"
        );
        assert_eq!(fs::read_dir(&images).expect("list").count(), 0);
        let mode = fs::metadata(&images).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_too_long_images_dir_is_refused_before_anything_is_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = dir.path().join("x".repeat(100));
        let backend = backend_in(&images);

        let err = backend
            .create(&request(5), &Quiet, far_deadline(), &AtomicBool::new(false))
            .expect_err("too long");

        assert!(
            err.to_string().starts_with("`images_dir` is too long"),
            "{err}"
        );
        assert!(!images.exists());
    }

    #[test]
    fn wait_address_without_state_is_not_found_and_with_a_dead_qemu_fails_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = backend_in(dir.path());
        let cancel = AtomicBool::new(false);
        let deadline = Instant::now() + Duration::from_secs(600);

        let err = backend
            .wait_address("hyperjob-job-5", deadline, &cancel)
            .expect_err("no state");
        assert!(matches!(err, PluginError::NotFound(_)), "{err}");

        let paths = backend.paths("hyperjob-job-5");
        let qemu = qemu_lookalike(&paths.overlay);
        let mut record = backend.record(&request(5), &paths, 40001);
        record.pid = Some(qemu.id());
        state::write(&paths.state, &paths.state_tmp, &record).expect("state");
        fs::write(&paths.console_log, "boot\nKernel panic - not syncing\n").expect("log");

        // While its QEMU runs, the VM is reached through the forwarded port.
        let endpoint = backend
            .wait_address("hyperjob-job-5", deadline, &cancel)
            .expect("running");
        assert_eq!(endpoint, Endpoint::new("127.0.0.1", Some(40001)));

        kill_and_reap(qemu);
        let started = Instant::now();
        let err = backend
            .wait_address("hyperjob-job-5", deadline, &cancel)
            .expect_err("its QEMU is gone");
        // At once: nowhere near the deadline (generous for a loaded machine).
        assert!(started.elapsed() < Duration::from_secs(30));
        assert_eq!(
            err.to_string(),
            "QEMU of VM hyperjob-job-5 is not running (it exited while booting); last console \
             line: \"Kernel panic - not syncing\""
        );
    }

    #[test]
    fn wait_address_refuses_a_live_process_that_is_not_the_vms_qemu() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = backend_in(dir.path());
        let paths = backend.paths("hyperjob-job-5");
        let mut record = backend.record(&request(5), &paths, 40001);
        // Alive for as long as this test runs, and not a QEMU of this VM.
        record.pid = Some(std::process::id());
        state::write(&paths.state, &paths.state_tmp, &record).expect("state");

        let err = backend
            .wait_address(
                "hyperjob-job-5",
                Instant::now() + Duration::from_secs(600),
                &AtomicBool::new(false),
            )
            .expect_err("not our QEMU");

        assert!(
            err.to_string()
                .starts_with("QEMU of VM hyperjob-job-5 is not running"),
            "{err}"
        );
    }

    #[test]
    fn console_tail_is_the_last_lines_of_the_vms_console_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = backend_in(dir.path());
        let log: String = (1..=60)
            .map(|n| format!("\x1b[1mboot line {n}\x1b[0m\r\n"))
            .collect();
        fs::write(backend.paths("hyperjob-job-5").console_log, log).expect("log");

        let tail = backend.console_tail("hyperjob-job-5").expect("tail");

        let expected: Vec<String> = (61 - console::TAIL_LINES..=60)
            .map(|n| format!("boot line {n}"))
            .collect();
        assert_eq!(tail.lines().collect::<Vec<_>>(), expected);
        assert_eq!(
            backend.last_console_line("hyperjob-job-5").as_deref(),
            Some("boot line 60")
        );
    }

    #[test]
    fn list_owned_reports_nothing_without_a_live_qemu() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = backend_in(dir.path());
        // A VM whose QEMU ran and is gone (killed and reaped).
        let gone = backend.paths("hyperjob-job-5");
        let qemu = qemu_lookalike(&gone.overlay);
        let mut record = backend.record(&request(5), &gone, 40001);
        record.pid = Some(qemu.id());
        state::write(&gone.state, &gone.state_tmp, &record).expect("state");
        assert_eq!(
            backend.list_owned().expect("list").len(),
            1,
            "while it runs"
        );
        kill_and_reap(qemu);
        // A VM whose recorded pid is a live process that is not its QEMU (this test).
        let other = backend.paths("hyperjob-job-6");
        let mut record = backend.record(&request(6), &other, 40002);
        record.pid = Some(std::process::id());
        state::write(&other.state, &other.state_tmp, &record).expect("state");
        fs::write(dir.path().join("unrelated.qemu.json"), b"{}").expect("write");

        assert_eq!(backend.list_owned().expect("list"), vec![]);
        assert_eq!(
            backend_in(&dir.path().join("absent"))
                .list_owned()
                .expect("no dir"),
            vec![]
        );
    }

    #[test]
    fn list_owned_reports_a_vm_whose_qemu_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = backend_in(dir.path());
        let paths = backend.paths("hyperjob-job-5");
        let mut fake = qemu_lookalike(&paths.overlay);
        let mut record = backend.record(&request(5), &paths, 40001);
        record.pid = Some(fake.id());
        state::write(&paths.state, &paths.state_tmp, &record).expect("state");

        let owned = backend.list_owned().expect("list");
        backend.destroy("hyperjob-job-5").expect("destroy kills it");

        assert_eq!(
            owned,
            vec![OwnedVm {
                vm_name: "hyperjob-job-5".to_string(),
                job_id: 5,
                created_unix: 100,
                deadline_unix: 200,
                owner: Some("/var/lib/hyperjob".to_string()),
            }]
        );
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(fake.wait().expect("wait").signal(), Some(libc::SIGKILL));
        assert!(!paths.state.exists());
    }
}
