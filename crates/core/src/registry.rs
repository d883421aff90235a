//! The plugin registry: every backend and transport hyperjob can use, by name.
//!
//! Built-in plugins register a factory with [`inventory::submit!`]; the binary must name each
//! built-in plugin crate (`use hyperjob_backend_libvirt as _;`) so the linker keeps its
//! registration. Other plugin tiers add entries with their own [`Origin`].

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::plugin::{Backend, PluginError, Transport};

/// Everything a plugin factory gets besides its own config table.
#[derive(Debug, Clone)]
pub struct PluginContext {
    /// hyperjob's state directory; a plugin may keep per-job files below it.
    pub state_dir: PathBuf,
    /// Where guest SSH keys come from: with per-job keys a transport needs no configured
    /// client key or pinned host keys.
    pub guest_keys: crate::config::GuestKeyMode,
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
    #[error("unknown {kind} {name:?}; registered {kind}s: {known}")]
    Unknown {
        kind: Kind,
        name: String,
        known: String,
    },
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

/// Why the configured plugins could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Library(#[from] crate::abi::LibraryError),
    #[error(transparent)]
    Executable(#[from] crate::exec_plugin::ExecPluginError),
    #[error("cannot list plugin directory {path}: {message}")]
    Dir { path: PathBuf, message: String },
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

    /// The compiled-in plugins plus every plugin library the config names, directly
    /// (`plugins`) or through a directory (`plugin_dirs`).
    pub fn load(config: &crate::config::Config) -> Result<Self, LoadError> {
        let mut registry = Self::builtin()?;
        let mut libraries = Vec::new();
        let mut executables = Vec::new();
        // `plugins` entries: shared objects (`*.so`, `*.so.N`) are libraries, anything else
        // an executable plugin.
        for path in &config.plugins {
            if crate::abi::is_shared_object_name(path) {
                libraries.push(path.clone());
            } else {
                executables.push(path.clone());
            }
        }
        for dir in &config.plugin_dirs {
            let listing = crate::abi::libraries_in(dir)
                .and_then(|libs| Ok((libs, crate::exec_plugin::executables_in(dir)?)));
            let (libs, exes) = listing.map_err(|err| LoadError::Dir {
                path: dir.clone(),
                message: err.to_string(),
            })?;
            libraries.extend(libs);
            executables.extend(exes);
        }
        for library in libraries {
            let took = crate::abi::load_library(&library, &mut registry)?;
            tracing::debug!(library = %library.display(), micros = took.as_micros() as u64, "plugin library loaded");
        }
        for executable in executables {
            crate::exec_plugin::load_executable(&executable, &mut registry)?;
        }
        Ok(registry)
    }

    pub fn add_backend(&mut self, entry: Entry<BuildBackend>) -> Result<(), RegistryError> {
        add(&mut self.backends, Kind::Backend, entry)
    }

    pub fn add_transport(&mut self, entry: Entry<BuildTransport>) -> Result<(), RegistryError> {
        add(&mut self.transports, Kind::Transport, entry)
    }

    pub fn backend(&self, name: &str) -> Result<&Entry<BuildBackend>, RegistryError> {
        find(&self.backends, Kind::Backend, name)
    }

    pub fn transport(&self, name: &str) -> Result<&Entry<BuildTransport>, RegistryError> {
        find(&self.transports, Kind::Transport, name)
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
