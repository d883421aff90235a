//! The ABI gate against real builds: a small backend plugin is built with cargo (offline) the
//! way an outside author builds one — against a copy of this hyperjob-plugin, the contract
//! crate — and the real binary is asked to use it:
//!
//! - built against an unchanged copy: accepted (the control: copying the crate changes nothing);
//! - built against a copy in which one boundary type changed (`Backend` gained a method in
//!   the middle, so the plugin's vtable has another slot where hyperjob expects `destroy`):
//!   refused before it is loaded, naming the boundary-type fingerprints of both sides;
//! - built with `panic = "abort"` (a panic would end hyperjob, not fail the call): refused,
//!   naming both panic strategies.
//!
//! The fixture workspaces and their target directory live below `CARGO_TARGET_TMPDIR` and are
//! reused: the first run compiles hyperjob-plugin's dependencies once, later runs only the
//! copies of the crate that changed. Each build's time is printed.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use support::{stderr, stdout, PluginSetup};

/// The workspace this test belongs to.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the fixture workspaces and their shared target directory are.
fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("abi-gate")
}

/// Writes `contents` to `path` unless it already holds exactly that (so cargo sees no change
/// and reuses what it built before).
fn write_if_changed(path: &Path, contents: &[u8]) {
    if std::fs::read(path).ok().as_deref() == Some(contents) {
        return;
    }
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, contents).expect("write");
}

/// Copies crates/plugin (manifest, build script, sources) to `to`, then replaces `patch.0` by
/// `patch.1` in `patch_file`.
fn copy_contract(to: &Path, patch: Option<(&str, &str, &str)>) {
    let from = root().join("crates/plugin");
    let mut pending = vec![
        PathBuf::from("Cargo.toml"),
        PathBuf::from("build.rs"),
        PathBuf::from("src"),
    ];
    while let Some(relative) = pending.pop() {
        let source = from.join(&relative);
        if source.is_dir() {
            for entry in std::fs::read_dir(&source).expect("read crates/plugin") {
                pending.push(relative.join(entry.expect("entry").file_name()));
            }
            continue;
        }
        let mut contents = std::fs::read(&source).expect("read crates/plugin file");
        if let Some((file, old, new)) = patch {
            if relative == Path::new(file) {
                let text = String::from_utf8(contents).expect("utf-8");
                assert!(text.contains(old), "{file} no longer contains {old:?}");
                contents = text.replacen(old, new, 1).into_bytes();
            }
        }
        write_if_changed(&to.join(&relative), &contents);
    }
}

/// The fixture plugin's source: a backend `name` that refuses to create VMs.
fn plugin_source(name: &str) -> String {
    format!(
        r#"//! A backend plugin built by tests/e2e_abi_gate.rs.
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use hyperjob_plugin::prelude::*;

struct Gate;

impl Backend for Gate {{
    fn create(&self, _: &VmRequest, _: &dyn Progress, _: Instant, _: &AtomicBool) -> Result<(), PluginError> {{
        Err(PluginError::Unsupported("create"))
    }}

    fn wait_address(&self, _: &str, _: Instant, _: &AtomicBool) -> Result<Endpoint, PluginError> {{
        Err(PluginError::Unsupported("wait_address"))
    }}

    fn destroy(&self, _: &str) -> Result<(), PluginError> {{
        Ok(())
    }}
}}

fn build(_: &PluginContext, _: &str) -> Result<Box<dyn Backend>, PluginError> {{
    Ok(Box::new(Gate))
}}

export_plugin! {{
    backends: ["{name}" => build],
    transports: [],
}}
"#
    )
}

/// A fixture workspace: a copy of hyperjob-plugin (patched or not) and the plugins built
/// against it.
struct Fixture {
    /// The workspace's directory name below [`fixtures_dir`].
    workspace: &'static str,
    patch: Option<(&'static str, &'static str, &'static str)>,
    /// The fixture plugins in it (each provides the backend `gate-<plugin>`).
    plugins: &'static [&'static str],
}

/// Writes the fixture's workspace, builds `plugin` in it (with `-C panic=abort` if
/// `panic_abort`) and returns the library.
fn build_plugin(fixture: &Fixture, plugin: &str, panic_abort: bool) -> PathBuf {
    let dir = fixtures_dir().join(fixture.workspace);
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml")).expect("root manifest"))
            .expect("root manifest");
    let workspace = manifest["workspace"].as_table().expect("[workspace]");
    // The root's shared settings, without path dependencies (they point into the root).
    let mut dependencies = workspace["dependencies"].as_table().expect("deps").clone();
    dependencies.retain(|_, spec| spec.get("path").is_none());
    // Each fixture's copy of the contract has its own directory name: cargo identifies a path
    // package by its path within the workspace, and the fixtures share one target directory.
    let contract = format!("contract-{}", fixture.workspace);
    let mut members = vec![contract.clone()];
    members.extend(fixture.plugins.iter().map(|p| format!("plugin-{p}")));
    let mut fixture_workspace = toml::Table::new();
    fixture_workspace.insert("members".into(), members.into());
    fixture_workspace.insert("resolver".into(), "2".into());
    for key in ["package", "lints"] {
        fixture_workspace.insert(key.into(), workspace[key].clone());
    }
    fixture_workspace.insert("dependencies".into(), dependencies.into());
    let mut root_manifest = toml::Table::new();
    root_manifest.insert("workspace".into(), fixture_workspace.into());
    write_if_changed(
        &dir.join("Cargo.toml"),
        toml::to_string(&root_manifest)
            .expect("manifest")
            .as_bytes(),
    );
    write_if_changed(
        &dir.join("Cargo.lock"),
        &std::fs::read(root().join("Cargo.lock")).expect("lock file"),
    );
    copy_contract(&dir.join(&contract), fixture.patch);
    for name in fixture.plugins {
        write_if_changed(
            &dir.join(format!("plugin-{name}/Cargo.toml")),
            format!(
                "[package]\nname = \"hyperjob-gate-{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\
                 publish = false\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n\
                 [dependencies]\nhyperjob-plugin = {{ path = \"../{contract}\" }}\n"
            )
            .as_bytes(),
        );
        write_if_changed(
            &dir.join(format!("plugin-{name}/src/lib.rs")),
            plugin_source(&format!("gate-{name}")).as_bytes(),
        );
    }
    let package = format!("hyperjob-gate-{plugin}");
    let target = fixtures_dir().join("target");
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .args(["rustc", "--offline", "--quiet", "--lib", "-p", &package])
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", &target);
    if panic_abort {
        // Only the plugin crate: an abort cdylib may link crates built to unwind (its
        // dependencies stay those of the other fixtures), and what it says in its header comes
        // from `cfg!(panic)` in this crate.
        command.args(["--", "-C", "panic=abort"]);
    }
    let started = Instant::now();
    let output = command.output().expect("run cargo");
    println!(
        "built the {plugin} fixture plugin in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        output.status.success(),
        "cargo build of the {plugin} fixture failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let library = target
        .join("debug")
        .join(format!("lib{}.so", package.replace('-', "_")));
    assert!(library.is_file(), "{} was not built", library.display());
    library
}

/// Built against an unchanged copy of the contract: the plugin `same`, and `abort` (built to
/// abort).
const UNCHANGED: Fixture = Fixture {
    workspace: "unchanged",
    patch: None,
    plugins: &["same", "abort"],
};

/// Built against a contract whose `Backend` has a new method before `destroy`.
const CHANGED: Fixture = Fixture {
    workspace: "changed",
    patch: Some((
        "src/plugin.rs",
        "    fn destroy(&self, vm_name: &str) -> Result<(), PluginError>;",
        "    fn warm_up(&self) -> Result<(), PluginError> {\n        Ok(())\n    }\n\n    \
         fn destroy(&self, vm_name: &str) -> Result<(), PluginError>;",
    )),
    plugins: &["changed"],
};

/// `hyperjob config` with the fixture's backend selected, and `hyperjob plugins`.
fn use_plugin(library: &Path, name: &str) -> (std::process::Output, std::process::Output) {
    let setup = PluginSetup::new(&format!("gate-{name}"), &[library]);
    (setup.run(&["config"]), setup.run(&["plugins"]))
}

#[test]
fn a_plugin_built_against_the_same_core_is_accepted() {
    let library = build_plugin(&UNCHANGED, "same", false);

    let (config, listing) = use_plugin(&library, "same");

    assert!(config.status.success(), "{}", stderr(&config));
    assert!(listing.status.success(), "{}", stderr(&listing));
    assert!(
        stdout(&listing).lines().any(|l| l.starts_with("backend")
            && l.contains("gate-same")
            && l.ends_with(&format!("library {}", library.display()))),
        "{}",
        stdout(&listing)
    );
}

#[test]
fn a_plugin_built_against_a_core_with_a_changed_boundary_type_is_refused() {
    let library = build_plugin(&CHANGED, "changed", false);

    let (config, listing) = use_plugin(&library, "changed");

    let err = stderr(&config);
    println!("{err}");
    assert_eq!(config.status.code(), Some(2), "{err}");
    let ours = hyperjob_core::abi::BOUNDARY_FINGERPRINT;
    let prefix = format!(
        "plugin library {} was built for another hyperjob: boundary types: plugin \"sha256:",
        library.display()
    );
    let at = err.find(&prefix).unwrap_or_else(|| panic!("{err}"));
    let theirs = &err[at + prefix.len() - "sha256:".len()..][..ours.len()];
    assert_ne!(theirs, ours);
    assert!(
        err.trim_end().ends_with(&format!("hyperjob \"{ours}\"")),
        "only the boundary types differ: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(listing.status.success(), "{}", stderr(&listing));
    assert!(stdout(&listing).contains(&prefix), "{}", stdout(&listing));
}

#[test]
fn a_plugin_built_with_panic_abort_is_refused() {
    let library = build_plugin(&UNCHANGED, "abort", true);

    let (config, _) = use_plugin(&library, "abort");

    let err = stderr(&config);
    println!("{err}");
    assert_eq!(config.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "plugin library {} was built for another hyperjob: panic strategy: plugin abort, \
             hyperjob unwind (a panic in the plugin would abort hyperjob mid-stage",
            library.display()
        )),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
