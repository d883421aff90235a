//! Plugin files for the tests: the built QEMU backend library, the fixture libraries of
//! tests/plugins, executables that misbehave on purpose, and a config without a VM to load
//! them with.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{list_dir, qemu_processes_of, Workspace};

/// The built QEMU backend plugin library (`HYPERJOB_QEMU_PLUGIN`); fails loudly, with
/// instructions, without it.
pub fn qemu_plugin_library() -> PathBuf {
    let path = std::env::var_os("HYPERJOB_QEMU_PLUGIN")
        .map(PathBuf::from)
        .expect(
            "HYPERJOB_QEMU_PLUGIN must name the QEMU backend plugin library: build it with \
         `cargo build -p hyperjob-backend-qemu` and set \
         HYPERJOB_QEMU_PLUGIN=$PWD/target/debug/libhyperjob_backend_qemu.so",
        );
    assert!(
        path.is_absolute() && path.is_file(),
        "HYPERJOB_QEMU_PLUGIN={} is not an absolute path to a file: build it with \
         `cargo build -p hyperjob-backend-qemu`",
        path.display()
    );
    path
}

/// A fixture library of tests/plugins (`mismatch`, `panicky`, `stale`), built next to the
/// hyperjob binary `hyperjob` by `cargo build --workspace`.
pub fn fixture_library(hyperjob: &Path, name: &str) -> PathBuf {
    let path = hyperjob
        .parent()
        .expect("binary dir")
        .join(format!("libhyperjob_test_plugin_{name}.so"));
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --workspace` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A file `cargo build --workspace` puts next to the hyperjob binary `hyperjob`.
fn built_beside(hyperjob: &Path, file: &str) -> PathBuf {
    let path = hyperjob.parent().expect("binary dir").join(file);
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --workspace` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The template backend plugin (plugins/template-backend), built next to the hyperjob binary
/// `hyperjob` by `cargo build --workspace`.
pub fn template_library(hyperjob: &Path) -> PathBuf {
    built_beside(hyperjob, "libhyperjob_backend_template.so")
}

/// The QEMU backend served as the executable plugin `qemuexec` (tests/plugins/served), built
/// next to the hyperjob binary `hyperjob` by `cargo build --workspace`.
pub fn served_backend(hyperjob: &Path) -> PathBuf {
    built_beside(hyperjob, "hyperjob-backend-qemuexec")
}

/// Writes an executable shell script `name` with `body` into `dir`.
pub fn write_executable(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write executable");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// An executable plugin that never says hello: it sleeps, as the very process hyperjob
/// started (so ending that process ends it).
pub fn write_hung_plugin(dir: &Path, name: &str) -> PathBuf {
    write_executable(dir, name, "exec sleep 600")
}

/// The hyperjob binary under test.
pub fn hyperjob() -> PathBuf {
    std::env::var_os("HYPERJOB_BIN")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_BIN_EXE_hyperjob").map(PathBuf::from))
        .expect("HYPERJOB_BIN names the hyperjob binary to test")
}

/// libc: a shared library that is no hyperjob plugin.
pub fn libc() -> PathBuf {
    [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/aarch64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .expect("a libc.so.6")
}

fn quoted(paths: &[&Path]) -> String {
    paths
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A config in a temporary directory, for tests without a VM: libvirt (whose build needs no libvirtd: the URI points
/// nowhere) or another backend, the SSH transport, and the given plugin files and directories.
#[derive(Debug)]
pub struct PluginSetup {
    pub dir: tempfile::TempDir,
}

impl PluginSetup {
    pub fn new(backend: &str, plugins: &[&Path]) -> Self {
        let setup = Self {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        setup.write(backend, plugins, &[], "");
        setup
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the config; `extra` is appended (more tables).
    pub fn write(&self, backend: &str, plugins: &[&Path], dirs: &[&Path], extra: &str) {
        let key = self.path("id");
        let known_hosts = self.path("known_hosts");
        std::fs::write(&key, "unused").expect("key");
        std::fs::write(
            &known_hosts,
            "* ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGh5cGVyam9iLXRlc3Qta2V5LTAxMjM0NTY3ODlhYmNk\n",
        )
        .expect("known_hosts");
        std::fs::write(
            self.path("config.toml"),
            format!(
                "backend = \"{backend}\"\ntransport = \"ssh\"\nstate_dir = {state:?}\n\
                 plugins = [{plugins}]\nplugin_dirs = [{dirs}]\n\n\
                 [backends.libvirt]\nuri = \"qemu+unix:///system?socket=/nonexistent/libvirt-sock\"\n\
                 base_image = {base:?}\nimages_dir = {images:?}\n\n\
                 [transports.ssh]\nidentity_file = {key:?}\nknown_hosts = {known_hosts:?}\n{extra}",
                state = self.path("state").display().to_string(),
                plugins = quoted(plugins),
                dirs = quoted(dirs),
                base = self.path("base.qcow2").display().to_string(),
                images = self.dir.path().display().to_string(),
                key = key.display().to_string(),
                known_hosts = known_hosts.display().to_string(),
            ),
        )
        .expect("config");
        std::fs::write(self.path("response.json"), "{\"id\":31337}\n").expect("response");
    }

    pub fn edit_config(&self, edit: impl Fn(String) -> String) {
        let path = self.path("config.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(&path, edit(text)).expect("config");
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(hyperjob())
            .arg("--config")
            .arg(self.path("config.toml"))
            .args(args)
            .env("JOB_RESPONSE_FILE", self.path("response.json"))
            .env("SYSTEM_FAILURE_EXIT_CODE", "2")
            .env("BUILD_FAILURE_EXIT_CODE", "1")
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("run hyperjob")
    }

    pub fn state_files(&self) -> Vec<String> {
        super::list_dir(&self.path("state"))
    }
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The lines of `hyperjob plugins` after its REFUSED heading.
pub fn refused_lines(listing: &str) -> Vec<String> {
    listing
        .lines()
        .skip_while(|l| !l.starts_with("REFUSED"))
        .skip(1)
        .map(str::to_string)
        .collect()
}

/// The Python executable transport plugin (plugins/transport-sshcli).
pub fn python_plugin() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("plugins/transport-sshcli/hyperjob-transport-sshcli")
}

/// The default config with the transport served by the Python plugin.
pub fn python_transport_config(ws: &Workspace) -> String {
    ws.default_config()
        .replace(
            "transport = \"ssh\"",
            &format!(
                "transport = \"sshcli\"\nplugins = [{:?}]",
                python_plugin().display().to_string()
            ),
        )
        .replace("[transports.ssh]", "[transports.sshcli]")
}

/// The qemu config (from the plugin library) with `endpoint = "unix"`: the guest's SSH on a
/// virtio-serial port, reached through a UNIX socket in the images dir (the test image serves
/// SSH on that port: scripts/lib/guest-image.sh, `guest_vport_ssh`); `relay` for the SSH
/// transport's table. The connect timeout is the default's (10 s), not the other tests' 2 s: a
/// session through the port starts only once the guest's bridge saw the last one end (up to a
/// second, more on a loaded host).
pub fn qemu_unix_endpoint_config(ws: &Workspace, relay: bool) -> String {
    ws.qemu_config(&qemu_plugin_library())
        .replacen(
            "connect_timeout_secs = 2\n",
            "connect_timeout_secs = 10\n",
            1,
        )
        .replacen(
            "[backends.qemu]\n",
            "[backends.qemu]\nendpoint = \"unix\"\n",
            1,
        )
        .replacen(
            "[transports.ssh]\n",
            &format!("[transports.ssh]\nrelay = {relay}\n"),
            1,
        )
}

/// Live processes whose command line names `overlay` (however QEMU was started).
pub fn processes_naming(overlay: &Path) -> Vec<u32> {
    let needle = overlay.as_os_str().as_encoded_bytes();
    fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.windows(needle.len()).any(|window| window == needle)
        })
        .collect()
}

/// Nothing of the QEMU backend plugin's VM `vm_name` remains: no QEMU process, no file in the
/// images or state dir.
pub fn assert_nothing_left_of_qemu_vm(ws: &Workspace, vm_name: &str) {
    let overlay = ws.images_dir.join(format!("{vm_name}.qcow2"));
    // A QEMU killed a moment ago may still be a zombie waiting for PID 1: its command line
    // is empty then, so it is not counted.
    let processes = [qemu_processes_of(vm_name), processes_naming(&overlay)].concat();
    assert!(
        processes.is_empty(),
        "QEMU of {vm_name} still runs: pids {processes:?}"
    );
    for dir in [&ws.images_dir, &ws.state_dir] {
        let leftovers = list_dir(dir);
        assert!(
            leftovers.is_empty(),
            "left behind in {}: {leftovers:?}",
            dir.display()
        );
    }
}
