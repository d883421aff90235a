//! Plugin files: finding them (`plugins`, `plugin_dirs`), telling them apart, and deciding
//! which of them a stage loads.
//!
//! A stage loads only what its config selects (`backend`, `transport`). It learns what a file
//! provides without running it: a library's header, read from the file ([`crate::abi`]), lists
//! its plugins; an executable's file name says its kind and name
//! (`hyperjob-backend-<name>`). So a stale, broken or hung plugin that is not selected is
//! never loaded or started and cannot fail or slow a stage. `hyperjob plugins`
//! ([`survey`]) looks at every file, loads every library that passes the gate and starts every
//! executable (all at once, each bounded by [`crate::exec_plugin::PROBE_TIMEOUT`]), and lists
//! what it found and what it refused, and why.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::registry::{Kind, Origin, Registry, RegistryError};

/// A plugin file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginFile {
    /// A Rust shared library (`*.so`, `*.so.N`).
    Library(PathBuf),
    /// An executable plugin.
    Executable(PathBuf),
}

impl PluginFile {
    pub fn path(&self) -> &Path {
        match self {
            PluginFile::Library(path) | PluginFile::Executable(path) => path,
        }
    }
}

/// A plugin file (or directory) that cannot be used, and why (one line that names it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub path: PathBuf,
    pub reason: String,
}

/// The distinct plugin files a config names, in order: `plugins` entries, then each
/// directory's files (sorted). One file under several spellings (listed and found in a
/// directory, reached through a symlink or a `..`) counts once, under its first spelling.
#[derive(Debug, Default)]
pub struct Found {
    pub files: Vec<PluginFile>,
    pub refused: Vec<Refused>,
}

/// Finds the plugin files of `config`. Nothing is read but directory listings and metadata.
pub fn find(config: &Config) -> Found {
    let mut found = Found::default();
    let mut candidates = Vec::new();
    // `plugins` entries: shared objects (`*.so`, `*.so.N`) are libraries, anything else an
    // executable plugin.
    for path in &config.plugins {
        candidates.push(if crate::abi::is_shared_object_name(path) {
            PluginFile::Library(path.clone())
        } else {
            PluginFile::Executable(path.clone())
        });
    }
    for dir in &config.plugin_dirs {
        let listing = crate::abi::libraries_in(dir)
            .and_then(|libs| Ok((libs, crate::exec_plugin::executables_in(dir)?)));
        match listing {
            Ok((libs, exes)) => {
                candidates.extend(libs.into_iter().map(PluginFile::Library));
                candidates.extend(exes.into_iter().map(PluginFile::Executable));
            }
            Err(err) => found.refused.push(Refused {
                path: dir.clone(),
                reason: format!("cannot list plugin directory {}: {err}", dir.display()),
            }),
        }
    }
    let mut seen = HashSet::new();
    for candidate in candidates {
        match std::fs::canonicalize(candidate.path()) {
            Ok(real) => {
                if seen.insert(real) {
                    found.files.push(candidate);
                }
            }
            Err(err) => {
                let path = candidate.path().to_path_buf();
                if !found.refused.iter().any(|r| r.path == path) {
                    found.refused.push(Refused {
                        reason: format!("cannot use plugin file {}: {err}", path.display()),
                        path,
                    });
                }
            }
        }
    }
    found
}

/// One row of `hyperjob plugins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub kind: Kind,
    pub name: String,
    pub version: String,
    pub origin: Origin,
}

/// What `hyperjob plugins` shows: every usable plugin, and every file refused with the reason.
#[derive(Debug, Default)]
pub struct Survey {
    pub plugins: Vec<Listed>,
    pub refused: Vec<Refused>,
}

/// Looks at every plugin file of `config`: loads each library that passes the gate and starts
/// each executable to read its hello (all executables at once, each for at most
/// [`crate::exec_plugin::PROBE_TIMEOUT`]). Fails only if the built-in plugins clash.
pub fn survey(config: &Config) -> Result<Survey, RegistryError> {
    let mut registry = Registry::builtin()?;
    let found = find(config);
    let mut refused = found.refused;
    let mut executables = Vec::new();
    for file in found.files {
        match file {
            PluginFile::Library(path) => {
                if let Err(err) = crate::abi::load_library(&path, &mut registry) {
                    refused.push(Refused {
                        reason: err.to_string(),
                        path,
                    });
                }
            }
            PluginFile::Executable(path) => match crate::exec_plugin::identify(&path) {
                Ok((kind, name)) => executables.push((path, kind, name)),
                Err(reason) => refused.push(Refused { path, reason }),
            },
        }
    }
    let hellos: Vec<_> = std::thread::scope(|scope| {
        let probes: Vec<_> = executables
            .iter()
            .map(|(path, kind, name)| {
                scope.spawn(move || {
                    crate::exec_plugin::probe(path, *kind, name, crate::exec_plugin::PROBE_TIMEOUT)
                })
            })
            .collect();
        probes
            .into_iter()
            .map(|probe| {
                probe
                    .join()
                    .unwrap_or_else(|_| Err(crate::PluginError::msg("probing it panicked")))
            })
            .collect()
    });
    for ((path, kind, name), hello) in executables.into_iter().zip(hellos) {
        let added = hello.map_err(|err| err.to_string()).and_then(|hello| {
            crate::exec_plugin::register(&path, kind, &name, &hello.version, &mut registry)
                .map_err(|err| err.to_string())
        });
        if let Err(reason) = added {
            refused.push(Refused { path, reason });
        }
    }
    let mut plugins = Vec::new();
    for entry in registry.backends() {
        plugins.push(Listed {
            kind: Kind::Backend,
            name: entry.name.clone(),
            version: entry.version.clone(),
            origin: entry.origin.clone(),
        });
    }
    for entry in registry.transports() {
        plugins.push(Listed {
            kind: Kind::Transport,
            name: entry.name.clone(),
            version: entry.version.clone(),
            origin: entry.origin.clone(),
        });
    }
    Ok(Survey { plugins, refused })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(plugins: &[&Path], dirs: &[&Path]) -> Config {
        let list = |paths: &[&Path]| {
            paths
                .iter()
                .map(|p| format!("{:?}", p.display().to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let text = format!(
            "backend = \"libvirt\"\ntransport = \"ssh\"\nplugins = [{}]\nplugin_dirs = [{}]\n",
            list(plugins),
            list(dirs)
        );
        Config::parse(Path::new("/etc/hyperjob/config.toml"), &text).expect("config")
    }

    fn executable(path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn one_file_under_several_spellings_is_found_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugins = dir.path().join("plugins.d");
        std::fs::create_dir(&plugins).expect("mkdir");
        let library = plugins.join("libx.so");
        std::fs::write(&library, b"").expect("write");
        let exe = plugins.join("hyperjob-backend-y");
        executable(&exe);
        let link = dir.path().join("liblink.so");
        std::os::unix::fs::symlink(&library, &link).expect("symlink");
        let dotted = plugins.join("../plugins.d/libx.so");

        let found = find(&config_with(&[&library, &dotted, &link, &exe], &[&plugins]));

        assert_eq!(
            found.files,
            [
                PluginFile::Library(library.clone()),
                PluginFile::Executable(exe.clone())
            ]
        );
        assert!(found.refused.is_empty(), "{:?}", found.refused);
    }

    #[test]
    fn missing_files_and_directories_are_refused_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("libgone.so");
        let no_dir = dir.path().join("nothing-here");

        let found = find(&config_with(&[&missing], &[&no_dir]));

        assert!(found.files.is_empty());
        let reasons: Vec<_> = found.refused.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(
            reasons[0].starts_with("cannot list plugin directory"),
            "{reasons:?}"
        );
        assert!(
            reasons[1].starts_with("cannot use plugin file"),
            "{reasons:?}"
        );
    }

    #[test]
    fn the_survey_lists_refused_files_with_their_reason_and_probes_executables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = dir.path().join("libtext.so");
        std::fs::write(&text, b"not ELF").expect("write");
        let unnamed = dir.path().join("my-plugin");
        executable(&unnamed);
        let silent = dir.path().join("hyperjob-transport-silent");
        executable(&silent);

        let survey = survey(&config_with(&[&text, &unnamed, &silent], &[])).expect("survey");

        assert!(survey.plugins.iter().all(|p| p.origin == Origin::BuiltIn));
        let reasons: Vec<_> = survey.refused.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].ends_with("it is not an ELF file"), "{reasons:?}");
        assert!(
            reasons[1].contains("is not named hyperjob-backend-<name>"),
            "{reasons:?}"
        );
        assert!(
            reasons[2].ends_with("exited (closed its stdout)"),
            "{reasons:?}"
        );
    }
}
