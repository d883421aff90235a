//! Fixtures for the end-to-end tests: the namespaced libvirt test environment that
//! `scripts/test.sh` starts, a per-test workspace with its own hyperjob config, a git server
//! the guest can clone from, and checks that nothing was left behind.
//!
//! The tests need that environment and fail, loudly, without it: a real-VM test must never
//! pass by skipping.

#![allow(dead_code)]

mod demo;
mod jobs;
mod lookalike;
mod plugins;
#[allow(unused_imports)]
pub use demo::*;
#[allow(unused_imports)]
pub use jobs::*;
#[allow(unused_imports)]
pub use lookalike::*;
#[allow(unused_imports)]
pub use plugins::*;

use std::collections::HashMap;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const HOW_TO_RUN: &str = "the end-to-end tests need the namespaced libvirt test environment: run them with scripts/test.sh (as root)";

/// Facts about the running test environment and the guest image.
#[derive(Debug, Clone)]
pub struct TestEnv {
    pub libvirt_uri: String,
    pub network: String,
    pub bridge_ip: String,
    pub base_image: PathBuf,
    /// The same guest on a whole disk with MBR + SYSLINUX, for booting without kernel keys.
    pub bootable_image: PathBuf,
    /// A guest with cloud-init and OpenSSH and no keys or CI user: both come from a seed.
    pub cloudinit_image: PathBuf,
    pub cloudinit_cmdline: String,
    /// A guest as stock cloud images are: systemd, OpenSSH (ed25519, ecdsa and rsa host keys,
    /// all in `stock_known_hosts`), cloud-init; `identity_file` logs in as `guest_user`.
    pub stock_image: PathBuf,
    pub stock_cmdline: String,
    pub stock_known_hosts: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub identity_file: PathBuf,
    pub known_hosts: PathBuf,
    pub guest_user: String,
    pub hyperjob: PathBuf,
    pub work_root: PathBuf,
}

impl TestEnv {
    /// Loads the environment `scripts/test.sh` describes; panics with instructions without it.
    pub fn load() -> Self {
        let env_file = std::env::var("HYPERJOB_TEST_ENV_FILE").expect(HOW_TO_RUN);
        let image_file = std::env::var("HYPERJOB_TEST_IMAGE_ENV").expect(HOW_TO_RUN);
        let env = parse_env_file(Path::new(&env_file));
        let image = parse_env_file(Path::new(&image_file));
        let get = |map: &HashMap<String, String>, key: &str| -> String {
            map.get(key)
                .unwrap_or_else(|| panic!("{key} missing from the test environment; {HOW_TO_RUN}"))
                .clone()
        };
        let hyperjob = std::env::var_os("HYPERJOB_BIN")
            .map(PathBuf::from)
            .or_else(|| option_env!("CARGO_BIN_EXE_hyperjob").map(PathBuf::from))
            .expect("HYPERJOB_BIN names the hyperjob binary to test");
        let work_root = std::env::var_os("HYPERJOB_TEST_WORK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/hyperjob-test/work"));
        Self {
            libvirt_uri: get(&env, "LIBVIRT_URI"),
            network: get(&env, "NETWORK"),
            bridge_ip: get(&env, "BRIDGE_IP"),
            base_image: get(&image, "BASE_IMAGE").into(),
            bootable_image: get(&image, "BOOTABLE_IMAGE").into(),
            cloudinit_image: get(&image, "CLOUDINIT_IMAGE").into(),
            cloudinit_cmdline: get(&image, "CLOUDINIT_CMDLINE"),
            stock_image: get(&image, "STOCK_IMAGE").into(),
            stock_cmdline: get(&image, "STOCK_CMDLINE"),
            stock_known_hosts: get(&image, "STOCK_KNOWN_HOSTS").into(),
            kernel: get(&image, "KERNEL").into(),
            initrd: get(&image, "INITRD").into(),
            cmdline: get(&image, "CMDLINE"),
            identity_file: get(&image, "IDENTITY_FILE").into(),
            known_hosts: get(&image, "KNOWN_HOSTS").into(),
            guest_user: get(&image, "GUEST_USER"),
            hyperjob,
            work_root,
        }
    }

    /// A fresh workspace (images dir, state dir, config file) for one test.
    pub fn workspace(&self, name: &str) -> Workspace {
        Workspace::new(self, name)
    }
}

/// Reads a shell-sourceable `KEY=value` file (values optionally in single or double quotes).
pub fn parse_env_file(path: &Path) -> HashMap<String, String> {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}; {HOW_TO_RUN}", path.display()));
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| {
            let value = value.trim();
            let unquoted = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                .unwrap_or(value);
            (key.trim().to_string(), unquoted.to_string())
        })
        .collect()
}

/// One test's private directory tree and hyperjob config.
#[derive(Debug)]
pub struct Workspace {
    pub dir: PathBuf,
    pub images_dir: PathBuf,
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
    env: TestEnv,
}

impl Workspace {
    fn new(env: &TestEnv, name: &str) -> Self {
        let dir = env.work_root.join(format!("{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let images_dir = dir.join("images");
        let state_dir = dir.join("state");
        fs::create_dir_all(&images_dir).expect("create images dir");
        // libvirt's QEMU runs as libvirt-qemu: every directory on the way must be searchable.
        for path in [&env.work_root, &dir, &images_dir] {
            fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let config_path = dir.join("config.toml");
        let workspace = Self {
            dir,
            images_dir,
            state_dir,
            config_path,
            env: env.clone(),
        };
        workspace.write_config(&workspace.default_config());
        workspace
    }

    /// The config every test starts from: TCG guests from the test image, small and quick.
    pub fn default_config(&self) -> String {
        let env = &self.env;
        format!(
            r#"backend = "libvirt"
transport = "ssh"
state_dir = "{state}"

[backends.libvirt]
uri = "{uri}"
domain_type = "qemu"
base_image = "{base}"
images_dir = "{images}"
network = "{network}"
vcpus = 1
memory_mib = 512
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "{cmdline}"

[transports.ssh]
user = "{user}"
identity_file = "{identity}"
known_hosts = "{known_hosts}"
ready_timeout_secs = 180
"#,
            state = self.state_dir.display(),
            uri = env.libvirt_uri,
            base = env.base_image.display(),
            images = self.images_dir.display(),
            network = env.network,
            kernel = env.kernel.display(),
            initrd = env.initrd.display(),
            cmdline = env.cmdline,
            user = env.guest_user,
            identity = env.identity_file.display(),
            known_hosts = env.known_hosts.display(),
        )
    }

    /// A config for the direct-QEMU backend loaded from the plugin library `plugin`: TCG guests
    /// from the test image, everything the VM owns in the workspace's images dir.
    pub fn qemu_config(&self, plugin: &Path) -> String {
        let env = &self.env;
        format!(
            r#"plugins = ["{plugin}"]
backend = "qemu"
transport = "ssh"
state_dir = "{state}"

[backends.qemu]
accel = "tcg"
base_image = "{base}"
images_dir = "{images}"
vcpus = 1
memory_mib = 512
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "{cmdline}"

[transports.ssh]
user = "{user}"
identity_file = "{identity}"
known_hosts = "{known_hosts}"
ready_timeout_secs = 180
connect_timeout_secs = 2
"#,
            plugin = plugin.display(),
            state = self.state_dir.display(),
            base = env.base_image.display(),
            images = self.images_dir.display(),
            kernel = env.kernel.display(),
            initrd = env.initrd.display(),
            cmdline = env.cmdline,
            user = env.guest_user,
            identity = env.identity_file.display(),
            known_hosts = env.known_hosts.display(),
        )
    }

    /// [`Workspace::qemu_config`] with `guest_keys = "per-job"` on the cloud-init image: no
    /// client key, no known_hosts.
    pub fn qemu_per_job_keys_config(&self, plugin: &Path) -> String {
        let env = &self.env;
        self.qemu_config(plugin)
            .replacen(
                "transport = \"ssh\"\n",
                "transport = \"ssh\"\nguest_keys = \"per-job\"\n",
                1,
            )
            .replace(
                &format!("base_image = \"{}\"", env.base_image.display()),
                &format!("base_image = \"{}\"", env.cloudinit_image.display()),
            )
            .replace(
                &format!("cmdline = \"{}\"", env.cmdline),
                &format!("cmdline = \"{}\"", env.cloudinit_cmdline),
            )
            .lines()
            .filter(|line| !line.starts_with("identity_file") && !line.starts_with("known_hosts"))
            .map(|line| format!("{line}\n"))
            .collect()
    }

    /// The default config, booting the image's own bootloader instead of a kernel file.
    pub fn bootloader_config(&self) -> String {
        let env = &self.env;
        self.default_config()
            .replace(
                &format!("base_image = \"{}\"", env.base_image.display()),
                &format!("base_image = \"{}\"", env.bootable_image.display()),
            )
            .replace(&format!("kernel = \"{}\"\n", env.kernel.display()), "")
            .replace(&format!("initrd = \"{}\"\n", env.initrd.display()), "")
            .replace(&format!("cmdline = \"{}\"\n", env.cmdline), "")
    }

    /// The default config for the cloud-init image with `guest_keys = "per-job"`: no client
    /// key, no known_hosts.
    pub fn per_job_keys_config(&self) -> String {
        let env = &self.env;
        self.default_config()
            .replacen(
                "[backends.libvirt]",
                "guest_keys = \"per-job\"\n\n[backends.libvirt]",
                1,
            )
            .replace(
                &format!("base_image = \"{}\"", env.base_image.display()),
                &format!("base_image = \"{}\"", env.cloudinit_image.display()),
            )
            .replace(
                &format!("cmdline = \"{}\"", env.cmdline),
                &format!("cmdline = \"{}\"", env.cloudinit_cmdline),
            )
            .replace(
                &format!("identity_file = \"{}\"\n", env.identity_file.display()),
                "",
            )
            .replace(
                &format!("known_hosts = \"{}\"\n", env.known_hosts.display()),
                "",
            )
    }

    /// The default config for the stock (systemd + OpenSSH + cloud-init) image with pinned
    /// keys: its three host keys in known_hosts. systemd and cloud-init take ~30-60 s to SSH
    /// under TCG, more with other guests booting: a generous ready timeout.
    pub fn stock_config(&self) -> String {
        let env = &self.env;
        self.default_config()
            .replace(
                &format!("base_image = \"{}\"", env.base_image.display()),
                &format!("base_image = \"{}\"", env.stock_image.display()),
            )
            .replace(
                &format!("cmdline = \"{}\"", env.cmdline),
                &format!("cmdline = \"{}\"", env.stock_cmdline),
            )
            .replace(
                &format!("known_hosts = \"{}\"", env.known_hosts.display()),
                &format!("known_hosts = \"{}\"", env.stock_known_hosts.display()),
            )
            .replace("ready_timeout_secs = 180", "ready_timeout_secs = 300")
    }

    /// [`Self::stock_config`] with `guest_keys = "per-job"`: no client key, no known_hosts.
    pub fn stock_per_job_keys_config(&self) -> String {
        let env = &self.env;
        self.stock_config()
            .replacen(
                "[backends.libvirt]",
                "guest_keys = \"per-job\"\n\n[backends.libvirt]",
                1,
            )
            .replace(
                &format!("identity_file = \"{}\"\n", env.identity_file.display()),
                "",
            )
            .replace(
                &format!("known_hosts = \"{}\"\n", env.stock_known_hosts.display()),
                "",
            )
    }

    pub fn write_config(&self, text: &str) {
        fs::write(&self.config_path, text).expect("write config");
    }

    /// Waits until no job of this workspace is still being torn down in the background:
    /// cleanup halts the VM, records phase `destroying` and leaves the rest to a detached
    /// `hyperjob finish-cleanup`, which removes the record last (hyperjob_core::teardown). A
    /// teardown that never finishes fails the test.
    pub fn wait_for_teardown(&self) {
        wait_until("cleanup's background teardown", TEARDOWN_WAIT, || {
            !self.teardown_pending()
        });
    }

    /// Whether a job of this workspace is `destroying` (its finisher has not removed it yet).
    fn teardown_pending(&self) -> bool {
        list_dir(&self.state_dir).iter().any(|name| {
            name.ends_with(".json")
                && fs::read_to_string(self.state_dir.join(name))
                    .ok()
                    .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                    .is_some_and(|record| record["phase"] == "destroying")
        })
    }

    /// Asserts that nothing of `vm_name` remains: no domain, no file in the images or state
    /// dir, no QEMU process (once cleanup's background teardown is done).
    pub fn assert_nothing_left(&self, vm_name: &str) {
        self.wait_for_teardown();
        let domains = virsh(&self.env.libvirt_uri, &["list", "--all", "--name"]);
        assert!(
            !domains.lines().any(|line| line.trim() == vm_name),
            "domain {vm_name} still exists: {domains}"
        );
        for dir in [&self.images_dir, &self.state_dir] {
            let leftovers = list_dir(dir);
            assert!(
                leftovers.is_empty(),
                "left behind in {}: {leftovers:?}",
                dir.display()
            );
        }
        let processes = qemu_processes_of(vm_name);
        assert!(
            processes.is_empty(),
            "QEMU of {vm_name} still runs: pids {processes:?}"
        );
    }
}

/// How long a test waits for cleanup's background teardown (seconds, normally).
const TEARDOWN_WAIT: Duration = Duration::from_secs(120);

impl Drop for Workspace {
    fn drop(&mut self) {
        // A finisher cleanup started reads the config: let it finish before the config goes
        // (never a panic here; a teardown still pending afterwards is the leak check's).
        let started = Instant::now();
        while self.teardown_pending() && started.elapsed() < TEARDOWN_WAIT {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Only empty directories go: a leftover overlay stays for scripts/leak-check.sh.
        let _ = fs::remove_file(&self.config_path);
        let _ = fs::remove_dir(&self.images_dir);
        let _ = fs::remove_dir(&self.state_dir);
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Files in `dir` (none when it does not exist).
pub fn list_dir(dir: &Path) -> Vec<String> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Runs virsh (for independent verification only; hyperjob itself never runs it).
pub fn virsh(uri: &str, args: &[&str]) -> String {
    let output = Command::new("virsh")
        .arg("-q")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .expect("run virsh");
    assert!(
        output.status.success(),
        "virsh {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Pids of QEMU processes running the guest `vm_name`.
pub fn qemu_processes_of(vm_name: &str) -> Vec<u32> {
    let needle = format!("guest={vm_name},");
    let needle_end = format!("guest={vm_name}\0");
    fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("qemu-system")
                && (cmdline.contains(&needle) || cmdline.contains(&needle_end))
        })
        .collect()
}

/// A job id no other test of this run uses.
pub fn unique_job_id() -> i64 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    i64::from(std::process::id()) * 1000 + i64::from(NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A git repository with one commit, served over git:// on the test network's host side.
#[derive(Debug)]
pub struct GitServer {
    child: Child,
    pub repo_url: String,
    pub sha: String,
    _dir: tempfile::TempDir,
}

impl GitServer {
    /// Serves a repository whose files are `files` (path, content) on branch `main`.
    pub fn start(bind_ip: &str, project: &str, files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path().join(format!("{project}.git"));
        let work = dir.path().join("work");
        fs::create_dir_all(&work).expect("mkdir");
        git(&work, &["init", "-q", "-b", "main"]);
        for (path, content) in files {
            let file = work.join(path);
            fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            fs::write(&file, content).expect("write file");
        }
        git(&work, &["add", "-A"]);
        git(
            &work,
            &[
                "-c",
                "user.name=hyperjob tests",
                "-c",
                "user.email=tests@hyperjob.invalid",
                "commit",
                "-q",
                "-m",
                "fixture",
            ],
        );
        let sha = git(&work, &["rev-parse", "HEAD"]).trim().to_string();
        git(
            dir.path(),
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().expect("utf-8"),
                repo.to_str().expect("utf-8"),
            ],
        );
        // A port picked here can be taken by someone else before the daemon binds it (any
        // outgoing connection in the namespace uses the same ephemeral range): then the daemon
        // exits, or another listener answers. Only a daemon that serves this very repository
        // counts; otherwise try another port.
        let (child, port) = (0..10)
            .find_map(|_| start_git_daemon(dir.path(), bind_ip, project, &sha))
            .expect("git daemon could not listen on any of 10 ports");
        Self {
            child,
            repo_url: format!("git://{bind_ip}:{port}/{project}.git"),
            sha,
            _dir: dir,
        }
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        // Our own child and its connection handlers, by process group id.
        stop_process_group(&mut self.child);
    }
}

/// Starts `git daemon` for `base` on a free port of `ip`; the child and its port once it serves
/// `project` at `sha`, None (with the daemon stopped) if the port was taken meanwhile.
fn start_git_daemon(base: &Path, ip: &str, project: &str, sha: &str) -> Option<(Child, u16)> {
    let port = free_port(ip);
    let mut child = Command::new("git")
        .args([
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--informative-errors",
        ])
        .arg(format!("--listen={ip}"))
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", base.display()))
        .arg(base)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: the daemon forks one child per connection, and those
        // must go with it.
        .process_group(0)
        .spawn()
        .expect("start git daemon");
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = format!("git://{ip}:{port}/{project}.git");
    while Instant::now() < deadline {
        if child.try_wait().expect("poll git daemon").is_some() {
            return None;
        }
        if std::net::TcpStream::connect((ip, port)).is_ok() {
            let served = Command::new("git")
                .args(["ls-remote", &url, "refs/heads/main"])
                .output()
                .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).starts_with(sha));
            if served {
                return Some((child, port));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop_process_group(&mut child);
    None
}

/// Ends our own child `child` and everything in its process group.
fn stop_process_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", "--", &format!("-{}", child.id())])
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run git");
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|listener| listener.local_addr())
        .expect("find a free port")
        .port()
}

/// Polls `condition` every few milliseconds until it holds; panics naming `what` after
/// `timeout`. Returns how long it took. Tests wait for conditions, never for fixed times.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if condition() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "gave up after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The job log of `session` so far, one line per log line.
pub fn session_log(session: &hyperjob_test_harness::ExecutorSession) -> String {
    session
        .log()
        .iter()
        .map(|line| line.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until a line of the job log contains `needle` (what a running stage printed).
pub fn wait_for_log(
    session: &hyperjob_test_harness::ExecutorSession,
    needle: &str,
    timeout: Duration,
) {
    let started = Instant::now();
    while !session.log().iter().any(|line| line.text.contains(needle)) {
        assert!(
            started.elapsed() < timeout,
            "gave up after {timeout:?} waiting for {needle:?} in the job log:\n{}",
            session_log(session)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether libvirt has a domain named `vm_name` (running or not) right now.
pub fn domain_exists(uri: &str, vm_name: &str) -> bool {
    virsh(uri, &["list", "--all", "--name"])
        .lines()
        .any(|line| line.trim() == vm_name)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}
