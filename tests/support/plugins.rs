//! Plugin files for the tests: the built QEMU backend library, the fixture libraries of
//! tests/plugins, and executables that misbehave on purpose.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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
