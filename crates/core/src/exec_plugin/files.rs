//! Executable plugin files: what a file provides (from its name), finding them in a plugin
//! directory, registering one without starting it, and probing one for `hyperjob plugins`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{connect_and_configure, start_checked, ExecBackend, ExecTransport, Hello};
use crate::plugin::{Backend, PluginError, Transport};
use crate::registry::{Entry, Kind, Origin, Registry, RegistryError};

/// The kind and name an executable plugin provides, from its file name alone
/// (`hyperjob-backend-<name>`, `hyperjob-transport-<name>`): a stage starts only the one it
/// selected, so it must know which that is without starting any. Also checks that it is an
/// executable file.
pub fn identify(path: &Path) -> Result<(Kind, String), String> {
    use std::os::unix::fs::PermissionsExt;
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let (kind, name) = if let Some(name) = file_name.strip_prefix("hyperjob-backend-") {
        (Kind::Backend, name)
    } else if let Some(name) = file_name.strip_prefix("hyperjob-transport-") {
        (Kind::Transport, name)
    } else {
        return Err(format!(
            "executable plugin {} is not named hyperjob-backend-<name> or \
             hyperjob-transport-<name> (its file name says what it provides)",
            path.display()
        ));
    };
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(format!(
            "executable plugin {}: the name after hyperjob-{kind}- must be 1 to 64 characters",
            path.display()
        ));
    }
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
            Ok((kind, name.to_string()))
        }
        Ok(_) => Err(format!(
            "executable plugin {} is not an executable file",
            path.display()
        )),
        Err(err) => Err(format!(
            "cannot use executable plugin {}: {err}",
            path.display()
        )),
    }
}

/// Starts the executable `kind` plugin `name` at `path`, reads its hello (within `timeout`)
/// and ends it: what `hyperjob plugins` shows.
pub fn probe(path: &Path, kind: Kind, name: &str, timeout: Duration) -> Result<Hello, PluginError> {
    let (connection, hello) = start_checked(path, kind, name, timeout)?;
    drop(connection);
    Ok(hello)
}

/// Registers the executable `kind` plugin `name` at `path` without starting it: building it
/// starts the process, checks its hello and configures it.
pub fn register(
    path: &Path,
    kind: Kind,
    name: &str,
    version: &str,
    registry: &mut Registry,
) -> Result<(), RegistryError> {
    let origin = Origin::Executable(path.to_path_buf());
    let owned = path.to_path_buf();
    let plugin = name.to_string();
    match kind {
        Kind::Backend => registry.add_backend(Entry {
            name: name.to_string(),
            version: version.to_string(),
            origin,
            build: Arc::new(move |ctx, table| {
                let (shared, kinds) =
                    connect_and_configure(&owned, Kind::Backend, &plugin, ctx, table)?;
                Ok(Box::new(ExecBackend(shared, kinds)) as Box<dyn Backend>)
            }),
        }),
        Kind::Transport => registry.add_transport(Entry {
            name: name.to_string(),
            version: version.to_string(),
            origin,
            build: Arc::new(move |ctx, table| {
                let (shared, kinds) =
                    connect_and_configure(&owned, Kind::Transport, &plugin, ctx, table)?;
                Ok(Box::new(ExecTransport(shared, kinds)) as Box<dyn Transport>)
            }),
        }),
    }
}

/// Executables in a plugin directory named `hyperjob-backend-*` or `hyperjob-transport-*`.
pub fn executables_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    crate::registry::files_in(dir, |path| {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        (name.starts_with("hyperjob-backend-") || name.starts_with("hyperjob-transport-"))
            && std::fs::metadata(path)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::config::GuestKeyMode;
    use crate::exec_plugin::PROBE_TIMEOUT;
    use crate::registry::PluginContext;

    #[test]
    fn only_named_executables_are_discovered() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, mode) in [
            ("hyperjob-transport-b", 0o755),
            ("hyperjob-backend-a", 0o755),
            ("hyperjob-backend-noexec", 0o644),
            ("other", 0o755),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, "#!/bin/sh\n").expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }

        let found = executables_in(dir.path()).expect("list");

        let names: Vec<_> = found
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["hyperjob-backend-a", "hyperjob-transport-b"]);
    }

    fn script_plugin(dir: &tempfile::TempDir, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join("hyperjob-backend-test");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[test]
    fn the_file_name_says_what_an_executable_provides() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugin = script_plugin(&dir, "exit 0");
        let other = dir.path().join("my-plugin");
        std::fs::copy(&plugin, &other).expect("copy");
        let transport = dir.path().join("hyperjob-transport-x.py");
        std::fs::write(&transport, "").expect("write");

        assert_eq!(
            identify(&plugin).expect("named"),
            (Kind::Backend, "test".to_string())
        );
        assert!(identify(&other)
            .expect_err("unnamed")
            .contains("is not named hyperjob-backend-<name>"));
        assert!(identify(&transport)
            .expect_err("not executable")
            .ends_with("is not an executable file"));
        assert!(identify(&dir.path().join("hyperjob-backend-gone"))
            .expect_err("missing")
            .starts_with("cannot use executable plugin"));
    }

    #[test]
    fn a_plugin_that_exits_before_hello_is_a_clear_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugin = script_plugin(&dir, "exit 3");

        let err = probe(&plugin, Kind::Backend, "test", PROBE_TIMEOUT).expect_err("exits");

        assert!(
            err.to_string().ends_with("exited (closed its stdout)"),
            "{err}"
        );
    }

    #[test]
    fn a_plugin_that_never_says_hello_is_given_up_on_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugin = script_plugin(&dir, "exec sleep 30");
        let started = Instant::now();

        let err =
            probe(&plugin, Kind::Backend, "test", Duration::from_millis(300)).expect_err("hangs");

        assert!(err.to_string().contains("did not answer within"), "{err}");
        // Killed when the hello did not come, not 2 s later.
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_hello_that_contradicts_the_file_name_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugin = script_plugin(
            &dir,
            r#"echo '{"hello":{"protocol":1,"kind":"transport","name":"other","version":"1"}}'; read line"#,
        );

        let err = probe(&plugin, Kind::Backend, "test", PROBE_TIMEOUT).expect_err("lies");

        assert!(
            err.to_string().ends_with(
                "says it is transport \"other\", but its file name says backend \"test\""
            ),
            "{err}"
        );
    }

    #[test]
    fn a_malformed_answer_to_configure_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugin = script_plugin(
            &dir,
            r#"echo '{"hello":{"protocol":1,"kind":"backend","name":"test","version":"1"}}'; read line; echo 'this is not json'; read line"#,
        );
        let mut registry = Registry::default();
        register(&plugin, Kind::Backend, "test", "", &mut registry).expect("registered");
        let ctx = PluginContext {
            state_dir: dir.path().to_path_buf(),
            guest_keys: GuestKeyMode::Pinned,
        };

        let entry = registry.backend("test").expect("registered");
        let err = (entry.build)(&ctx, &toml::Table::new())
            .map(drop)
            .expect_err("malformed");

        assert!(
            err.to_string().contains("sent a line that is not JSON"),
            "{err}"
        );
    }
}
