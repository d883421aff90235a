//! Shared-library plugins through the real binary: refused when built against another core,
//! refused without a header, panics turned into system failures, duplicates named, and
//! `hyperjob plugins`. The fixture libraries are workspace members (tests/plugins/*), built
//! next to the binary by `cargo build --workspace`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn hyperjob() -> PathBuf {
    std::env::var_os("HYPERJOB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_hyperjob")))
}

/// A fixture library built next to the binary.
fn fixture(name: &str) -> PathBuf {
    let path = hyperjob()
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

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(backend: &str, plugins: &[&Path]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("id");
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(&key, "unused").expect("key");
        std::fs::write(
            &known_hosts,
            "* ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGh5cGVyam9iLXRlc3Qta2V5LTAxMjM0NTY3ODlhYmNk\n",
        )
        .expect("known_hosts");
        let plugins: Vec<String> = plugins
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect();
        std::fs::write(
            dir.path().join("config.toml"),
            format!(
                "backend = \"{backend}\"\ntransport = \"ssh\"\nstate_dir = {:?}\nplugins = [{}]\n\n[transports.ssh]\nidentity_file = {:?}\nknown_hosts = {:?}\n",
                dir.path().join("state").display().to_string(),
                plugins.join(", "),
                key.display().to_string(),
                known_hosts.display().to_string(),
            ),
        )
        .expect("config");
        std::fs::write(dir.path().join("response.json"), "{\"id\":31337}\n").expect("response");
        Self { dir }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(hyperjob())
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .args(args)
            .env("JOB_RESPONSE_FILE", self.dir.path().join("response.json"))
            .env("SYSTEM_FAILURE_EXIT_CODE", "2")
            .env("BUILD_FAILURE_EXIT_CODE", "1")
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("run hyperjob")
    }

    fn state_files(&self) -> Vec<String> {
        match std::fs::read_dir(self.dir.path().join("state")) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn plugins_lists_built_in_and_library_plugins_with_their_origin() {
    let panicky = fixture("panicky");
    let setup = Setup::new("libvirt", &[&panicky]);

    let output = setup.run(&["plugins"]);

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout.starts_with("KIND"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("backend") && l.contains("libvirt") && l.ends_with("built-in")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("transport") && l.contains("ssh") && l.ends_with("built-in")),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("backend")
            && l.contains("panicky")
            && l.ends_with(&format!("library {}", panicky.display()))),
        "{stdout}"
    );
}

#[test]
fn library_built_against_another_core_api_version_is_refused_naming_both_versions() {
    let mismatch = fixture("mismatch");
    let setup = Setup::new("libvirt", &[&mismatch]);

    let output = setup.run(&["config"]);

    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(output.stdout.is_empty());
    assert!(
        err.contains(&format!(
            "plugin library {} was built for another hyperjob",
            mismatch.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "core API version: plugin {}, hyperjob {}",
            hyperjob_core::abi::CORE_API_VERSION + 1,
            hyperjob_core::abi::CORE_API_VERSION
        )),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn library_without_a_header_is_refused() {
    let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
    let setup = Setup::new("libvirt", &[libc]);

    let output = setup.run(&["plugins"]);

    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is not a hyperjob plugin: it exports no HYPERJOB_PLUGIN_HEADER"),
        "{err}"
    );
}

#[test]
fn panic_inside_a_plugin_is_a_system_failure_and_leaves_nothing() {
    let panicky = fixture("panicky");
    let setup = Setup::new("panicky", &[&panicky]);

    let output = setup.run(&["prepare"]);

    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "not an abort: {err}");
    assert!(
        err.contains("the plugin panicked while creating the VM: panicky backend: create is broken on purpose"),
        "{err}"
    );
    assert!(setup.state_files().is_empty(), "{:?}", setup.state_files());
}

#[test]
fn the_same_name_twice_is_refused_naming_both_origins() {
    let panicky = fixture("panicky");
    let setup = Setup::new("libvirt", &[&panicky, &panicky]);

    let output = setup.run(&["plugins"]);

    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "backend \"panicky\" is registered twice (library {} and library {})",
            panicky.display(),
            panicky.display()
        )),
        "{err}"
    );
}

#[test]
fn plugin_dirs_load_every_library_and_named_executable_in_them() {
    let setup = Setup::new("libvirt", &[]);
    let dir = setup.dir.path().join("plugins.d");
    std::fs::create_dir(&dir).expect("plugin dir");
    std::fs::copy(fixture("panicky"), dir.join("libpanicky.so")).expect("copy library");
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("plugins/transport-sshcli/hyperjob-transport-sshcli");
    std::fs::copy(&python, dir.join("hyperjob-transport-sshcli")).expect("copy executable");
    std::fs::write(dir.join("README.txt"), "not a plugin").expect("write");
    let config = setup.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replacen(
            "plugins = []",
            &format!("plugin_dirs = [{:?}]", dir.display().to_string()),
            1,
        ),
    )
    .expect("config");

    let output = setup.run(&["plugins"]);

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout.contains(&format!("library {}", dir.join("libpanicky.so").display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "executable {}",
            dir.join("hyperjob-transport-sshcli").display()
        )),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 5, "{stdout}");
}
