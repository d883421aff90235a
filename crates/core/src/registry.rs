//! The plugin registry: every backend and transport hyperjob can use, by name.
//!
//! Built-in plugins register a factory with [`inventory::submit!`]; the binary must name each
//! built-in plugin crate (`use hyperjob_backend_libvirt as _;`) so the linker keeps its
//! registration. Other plugin tiers add entries with their own [`Origin`]. A stage's registry
//! ([`Registry::load`]) holds the built-in plugins and the plugin files that provide what the
//! config selects, nothing else ([`crate::discovery`]).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::discovery::{PluginFile, Refused};
use crate::plugin::{Backend, PluginError, Transport};

/// Everything a plugin factory gets besides its own config table.
#[derive(Debug, Clone)]
pub struct PluginContext {
    /// hyperjob's state directory; a plugin may keep per-job files below it.
    pub state_dir: PathBuf,
    /// Where guest SSH keys come from: with per-job keys a transport needs no configured
    /// client key or pinned host keys.
    pub guest_keys: crate::config::GuestKeyMode,
    /// Whether the config keeps a warm pool (`[pool]` with a size): the backend must then
    /// list, relabel and fingerprint its VMs.
    pub pool: bool,
}

/// A compiled-in backend factory.
pub type BackendFn = fn(&PluginContext, &toml::Table) -> Result<Box<dyn Backend>, PluginError>;
/// A compiled-in transport factory.
pub type TransportFn = fn(&PluginContext, &toml::Table) -> Result<Box<dyn Transport>, PluginError>;
/// Builds a backend of any tier (compiled in, shared library, executable).
pub type BuildBackend = Arc<
    dyn Fn(&PluginContext, &toml::Table) -> Result<Box<dyn Backend>, PluginError> + Send + Sync,
>;
/// Builds a transport of any tier.
pub type BuildTransport = Arc<
    dyn Fn(&PluginContext, &toml::Table) -> Result<Box<dyn Transport>, PluginError> + Send + Sync,
>;

/// A compiled-in backend, registered with `inventory::submit!`.
#[derive(Debug)]
pub struct BackendFactory {
    pub name: &'static str,
    pub version: &'static str,
    pub build: BackendFn,
}

/// A compiled-in transport, registered with `inventory::submit!`.
#[derive(Debug)]
pub struct TransportFactory {
    pub name: &'static str,
    pub version: &'static str,
    pub build: TransportFn,
}

inventory::collect!(BackendFactory);
inventory::collect!(TransportFactory);

/// Where a registered plugin comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    BuiltIn,
    /// A Rust shared library loaded from this path.
    Library(PathBuf),
    /// An executable spoken to over stdio.
    Executable(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::BuiltIn => f.write_str("built-in"),
            Origin::Library(path) => write!(f, "library {}", path.display()),
            Origin::Executable(path) => write!(f, "executable {}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown {kind} {name:?}; registered {kind}s: {known}{refused}")]
    Unknown {
        kind: Kind,
        name: String,
        known: String,
        /// Empty, or "; plugin files that could not be looked at …" (one might be meant).
        refused: String,
    },
    /// The selected plugin's file could not be used; the reason names the file.
    #[error("{reason}")]
    Unusable { reason: String },
    #[error("{kind} {name:?} is registered twice ({first} and {second})")]
    Duplicate {
        kind: Kind,
        name: String,
        first: Origin,
        second: Origin,
    },
}

/// The files in `dir` that `keep` accepts, sorted (plugin discovery in `plugin_dirs`).
pub fn files_in(
    dir: &std::path::Path,
    keep: impl Fn(&std::path::Path) -> bool,
) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| keep(path))
        .collect();
    found.sort();
    Ok(found)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Backend,
    Transport,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Backend => f.write_str("backend"),
            Kind::Transport => f.write_str("transport"),
        }
    }
}

/// One registered plugin.
#[derive(Clone)]
pub struct Entry<B> {
    pub name: String,
    pub version: String,
    pub origin: Origin,
    pub build: B,
}

impl<B> fmt::Debug for Entry<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// All registered backends and transports.
#[derive(Debug, Default)]
pub struct Registry {
    backends: Vec<Entry<BuildBackend>>,
    transports: Vec<Entry<BuildTransport>>,
    /// Plugins that plugin files provide but that were not loaded (not selected).
    others: Vec<(Kind, String)>,
    /// Plugin files that cannot be used.
    refused: Vec<Refused>,
    /// Selected plugins whose file passed the gate but could not be loaded, or clashes with
    /// another provider of the name: (kind, name, reason). Never used.
    failed: Vec<(Kind, String, String)>,
    /// Selected plugins provided by a library the gate refused: the reason is the error when
    /// no other file provides the name, and a warning when one does.
    refused_selected: Vec<(Kind, String, String)>,
}

impl Registry {
    /// The compiled-in plugins.
    pub fn builtin() -> Result<Self, RegistryError> {
        let mut registry = Self::default();
        for factory in inventory::iter::<BackendFactory> {
            registry.add_backend(Entry {
                name: factory.name.to_string(),
                version: factory.version.to_string(),
                origin: Origin::BuiltIn,
                build: Arc::new(factory.build),
            })?;
        }
        for factory in inventory::iter::<TransportFactory> {
            registry.add_transport(Entry {
                name: factory.name.to_string(),
                version: factory.version.to_string(),
                origin: Origin::BuiltIn,
                build: Arc::new(factory.build),
            })?;
        }
        Ok(registry)
    }

    /// The compiled-in plugins plus the plugin files that provide the selected backend or
    /// transport (`plugins`, `plugin_dirs`). Other plugin files are looked at (a library's
    /// header is read from the file, an executable's name from its file name) but never
    /// loaded or started, and nothing wrong with them fails this: a selected plugin that
    /// cannot be used fails when it is looked up ([`Registry::backend`]).
    pub fn load(config: &crate::config::Config) -> Result<Self, RegistryError> {
        let mut registry = Self::builtin()?;
        let selected = |kind: Kind, name: &str| match kind {
            Kind::Backend => name == config.backend,
            Kind::Transport => name == config.transport,
        };
        let found = crate::discovery::find(config);
        registry.refused = found.refused;
        for file in found.files {
            match file {
                PluginFile::Library(path) => registry.consider_library(path, &selected),
                PluginFile::Executable(path) => registry.consider_executable(path, &selected),
            }
        }
        Ok(registry)
    }

    fn consider_library(&mut self, path: PathBuf, selected: &dyn Fn(Kind, &str) -> bool) {
        let header = match crate::abi::read_header(&path) {
            Ok(header) => header,
            Err(err) => {
                self.refused.push(Refused {
                    reason: err.to_string(),
                    path,
                });
                return;
            }
        };
        let provided: Vec<(Kind, String)> = [Kind::Backend, Kind::Transport]
            .into_iter()
            .flat_map(|kind| header.names(kind).into_iter().map(move |name| (kind, name)))
            .collect();
        let wanted: Vec<(Kind, String)> = provided
            .iter()
            .filter(|(kind, name)| selected(*kind, name))
            .cloned()
            .collect();
        if let Err(err) = crate::abi::check_header(&path, &header) {
            let reason = err.to_string();
            for (kind, name) in wanted {
                self.refused_selected.push((kind, name, reason.clone()));
            }
            self.refused.push(Refused { path, reason });
            return;
        }
        if wanted.is_empty() {
            self.others.extend(provided);
            return;
        }
        match crate::abi::load_library(&path, self) {
            Ok(took) => tracing::debug!(
                library = %path.display(),
                micros = took.as_micros() as u64,
                "plugin library loaded"
            ),
            Err(err) => {
                let reason = err.to_string();
                for (kind, name) in wanted {
                    self.failed.push((kind, name, reason.clone()));
                }
            }
        }
    }

    fn consider_executable(&mut self, path: PathBuf, selected: &dyn Fn(Kind, &str) -> bool) {
        match crate::exec_plugin::identify(&path) {
            Ok((kind, name)) if selected(kind, &name) => {
                if let Err(err) = crate::exec_plugin::register(&path, kind, &name, "", self) {
                    self.failed.push((kind, name, err.to_string()));
                }
            }
            Ok(provided) => self.others.push(provided),
            Err(reason) => self.refused.push(Refused { path, reason }),
        }
    }

    pub fn add_backend(&mut self, entry: Entry<BuildBackend>) -> Result<(), RegistryError> {
        add(&mut self.backends, Kind::Backend, entry)
    }

    pub fn add_transport(&mut self, entry: Entry<BuildTransport>) -> Result<(), RegistryError> {
        add(&mut self.transports, Kind::Transport, entry)
    }

    pub fn backend(&self, name: &str) -> Result<&Entry<BuildBackend>, RegistryError> {
        self.check(Kind::Backend, name)?;
        let entry = find(&self.backends, Kind::Backend, name).map_err(|err| self.explain(err))?;
        self.note_shadowed(Kind::Backend, name, &entry.origin);
        Ok(entry)
    }

    pub fn transport(&self, name: &str) -> Result<&Entry<BuildTransport>, RegistryError> {
        self.check(Kind::Transport, name)?;
        let entry =
            find(&self.transports, Kind::Transport, name).map_err(|err| self.explain(err))?;
        self.note_shadowed(Kind::Transport, name, &entry.origin);
        Ok(entry)
    }

    /// A selected plugin whose file failed to load, or that clashes, is not used at all.
    fn check(&self, kind: Kind, name: &str) -> Result<(), RegistryError> {
        match self.failed.iter().find(|(k, n, _)| *k == kind && n == name) {
            Some((_, _, reason)) => Err(RegistryError::Unusable {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// A refused library that also provides the plugin in use should go: say so.
    fn note_shadowed(&self, kind: Kind, name: &str, used: &Origin) {
        for (_, _, reason) in self
            .refused_selected
            .iter()
            .filter(|(k, n, _)| *k == kind && n == name)
        {
            tracing::warn!("{kind} {name:?} comes from {used}; ignored: {reason}");
        }
    }

    /// An unknown name: the gate's refusal if a refused library provides it, else the names
    /// of every plugin found (loaded or not) and the files that could not be looked at.
    fn explain(&self, err: RegistryError) -> RegistryError {
        let RegistryError::Unknown {
            kind, name, known, ..
        } = err
        else {
            return err;
        };
        if let Some((_, _, reason)) = self
            .refused_selected
            .iter()
            .find(|(k, n, _)| *k == kind && *n == name)
        {
            return RegistryError::Unusable {
                reason: reason.clone(),
            };
        }
        let mut names: Vec<&str> = known.split(", ").filter(|n| *n != "none").collect();
        names.extend(
            self.others
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, n)| n.as_str()),
        );
        names.sort_unstable();
        names.dedup();
        let refused = if self.refused.is_empty() {
            String::new()
        } else {
            format!(
                "; plugin files that could not be looked at (`hyperjob plugins` says why): {}",
                self.refused
                    .iter()
                    .map(|r| r.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        RegistryError::Unknown {
            kind,
            name,
            known: if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            },
            refused,
        }
    }

    pub fn backends(&self) -> &[Entry<BuildBackend>] {
        &self.backends
    }

    pub fn transports(&self) -> &[Entry<BuildTransport>] {
        &self.transports
    }
}

fn add<B>(entries: &mut Vec<Entry<B>>, kind: Kind, entry: Entry<B>) -> Result<(), RegistryError> {
    if let Some(existing) = entries.iter().find(|e| e.name == entry.name) {
        return Err(RegistryError::Duplicate {
            kind,
            name: entry.name,
            first: existing.origin.clone(),
            second: entry.origin,
        });
    }
    entries.push(entry);
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(())
}

fn find<'a, B>(
    entries: &'a [Entry<B>],
    kind: Kind,
    name: &str,
) -> Result<&'a Entry<B>, RegistryError> {
    entries
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| RegistryError::Unknown {
            kind,
            name: name.to_string(),
            refused: String::new(),
            known: if entries.is_empty() {
                "none".to_string()
            } else {
                entries
                    .iter()
                    .map(|e| e.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_backend(_: &PluginContext, _: &toml::Table) -> Result<Box<dyn Backend>, PluginError> {
        Err(PluginError::Unsupported("test"))
    }

    fn entry(name: &str) -> Entry<BuildBackend> {
        Entry {
            name: name.to_string(),
            version: "0".to_string(),
            origin: Origin::BuiltIn,
            build: Arc::new(no_backend),
        }
    }

    #[test]
    fn unknown_name_lists_registered_names() {
        let mut registry = Registry::default();
        registry.add_backend(entry("libvirt")).expect("first");
        registry.add_backend(entry("qemu")).expect("second");

        let message = registry.backend("vbox").expect_err("unknown").to_string();

        assert_eq!(
            message,
            "unknown backend \"vbox\"; registered backends: libvirt, qemu"
        );
    }

    #[test]
    fn duplicate_name_is_rejected_naming_both_origins() {
        let mut registry = Registry::default();
        registry.add_backend(entry("libvirt")).expect("first");

        let message = registry
            .add_backend(entry("libvirt"))
            .expect_err("dup")
            .to_string();

        assert!(
            message.contains("registered twice (built-in and built-in)"),
            "{message}"
        );
    }
}
