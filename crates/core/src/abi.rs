//! Rust shared-library plugins (tier 2): a `cdylib` built against the same hyperjob-core,
//! loaded with `libloading`.
//!
//! Rust has no stable ABI, so handing `Box<dyn Backend>` across a library boundary is sound
//! only when both sides were built by the same rustc, for the same target, against the same
//! boundary types, with the same panic strategy and allocator. Every plugin therefore exports a
//! frozen `#[repr(C)]` [`PluginHeader`] under the symbol `HYPERJOB_PLUGIN_HEADER`, which says
//! all of that and which plugins the library provides. hyperjob reads it from the library
//! *file* ([`elf`]) — a library that is not selected, or that the gate refuses, is never
//! loaded, and none of its code runs. Only a library that passed is loaded; only then does
//! hyperjob call `hyperjob_plugin_register`. Libraries are never unloaded (code and vtables of
//! their objects must outlive every use), and config reaches a plugin as TOML text.
//!
//! Panics: a `cdylib` carries its own copy of the standard library, and a panic thrown by one
//! copy cannot be caught by another (the host would see a foreign exception and abort). So the
//! guard that turns a panic into a system failure runs *inside the plugin*: `export_plugin!`
//! wraps every factory and every object it returns in [`guarded_backend`] /
//! [`guarded_transport`], whose code is compiled into the plugin with the plugin's own std.
//! The guard covers every call, the objects' `Drop`, and the errors a plugin returns: an
//! error's source chain (plugin types with plugin `Display` and `Drop` code) is rendered to
//! text and dropped inside the plugin, so hyperjob only ever formats and frees plain strings.
//! A plugin built with `panic = "abort"` could not contain anything: the gate refuses it.
//!
//! A plugin is its trait implementations plus one [`export_plugin!`](crate::export_plugin).

pub mod boundary;
mod contain;
pub mod elf;
mod guarded;
mod header;

pub use header::*;

use contain::guard;
use guarded::{GuardedBackend, GuardedTransport};

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::plugin::{Backend, PluginError, Transport};
use crate::registry::{Entry, Kind, Origin, PluginContext, Registry, RegistryError};

/// Symbol of the header.
pub const HEADER_SYMBOL: &str = "HYPERJOB_PLUGIN_HEADER";
/// Symbol of the registration function.
pub const REGISTER_SYMBOL: &[u8] = b"hyperjob_plugin_register\0";

/// Builds a backend from the TOML text of its config table.
pub type LibraryBackendFn = fn(&PluginContext, &str) -> Result<Box<dyn Backend>, PluginError>;
/// Builds a transport from the TOML text of its config table.
pub type LibraryTransportFn = fn(&PluginContext, &str) -> Result<Box<dyn Transport>, PluginError>;

/// What a library's `hyperjob_plugin_register` fills in.
#[derive(Debug, Default)]
pub struct PluginRegistrar {
    backends: Vec<(String, String, LibraryBackendFn)>,
    transports: Vec<(String, String, LibraryTransportFn)>,
}

impl PluginRegistrar {
    pub fn backend(&mut self, name: &str, version: &str, build: LibraryBackendFn) {
        self.backends
            .push((name.to_string(), version.to_string(), build));
    }

    pub fn transport(&mut self, name: &str, version: &str, build: LibraryTransportFn) {
        self.transports
            .push((name.to_string(), version.to_string(), build));
    }
}

/// Exports a shared-library plugin: its header, its registration function and its allocator.
///
/// ```ignore
/// hyperjob_core::export_plugin! {
///     backends: ["qemu" => build_qemu_backend],
///     transports: [],
/// }
/// ```
/// where `build_qemu_backend: fn(&PluginContext, &str) -> Result<Box<dyn Backend>, PluginError>`
/// receives the TOML text of `[backends.qemu]`. The names go into the header, so hyperjob
/// knows what the library provides without loading it. The macro also makes
/// `std::alloc::System` the library's global allocator (hyperjob frees what the plugin
/// allocates): a crate that sets another `#[global_allocator]` cannot be linked into a plugin.
#[macro_export]
macro_rules! export_plugin {
    (backends: [$($bname:literal => $bbuild:path),* $(,)?], transports: [$($tname:literal => $tbuild:path),* $(,)?] $(,)?) => {
        /// Read by hyperjob from the library file before anything else.
        #[allow(unsafe_code)]
        #[no_mangle]
        pub static HYPERJOB_PLUGIN_HEADER: $crate::abi::PluginHeader =
            $crate::abi::PluginHeader::with(
                &[$($bname),*],
                &[$($tname),*],
                env!("CARGO_PKG_VERSION"),
                // Asked here, in the plugin's own crate: the strategy its build really uses.
                $crate::abi::panic_strategy(cfg!(panic = "unwind"), cfg!(panic = "abort")),
            );

        /// Objects cross the boundary in both directions: both sides use the system allocator.
        #[global_allocator]
        static HYPERJOB_PLUGIN_ALLOCATOR: ::std::alloc::System = ::std::alloc::System;

        /// Called by hyperjob once the header passed the gate. Every factory is wrapped so that
        /// its panics are caught here, by this library's own standard library.
        #[allow(unsafe_code)]
        #[no_mangle]
        pub fn hyperjob_plugin_register(registrar: &mut $crate::abi::PluginRegistrar) {
            $(registrar.backend($bname, env!("CARGO_PKG_VERSION"), |ctx, text| {
                $crate::abi::guarded_backend(ctx, text, $bbuild)
            });)*
            $(registrar.transport($tname, env!("CARGO_PKG_VERSION"), |ctx, text| {
                $crate::abi::guarded_transport(ctx, text, $tbuild)
            });)*
        }
    };
}

/// Runs a library backend factory and wraps what it builds so that no panic leaves the
/// library. Called by the code `export_plugin!` generates inside the plugin.
pub fn guarded_backend(
    ctx: &PluginContext,
    text: &str,
    build: LibraryBackendFn,
) -> Result<Box<dyn Backend>, PluginError> {
    let backend = guard("building the backend", || build(ctx, text))??;
    Ok(Box::new(GuardedBackend(backend)))
}

/// Runs a library transport factory and wraps what it builds so that no panic leaves the
/// library. Called by the code `export_plugin!` generates inside the plugin.
pub fn guarded_transport(
    ctx: &PluginContext,
    text: &str,
    build: LibraryTransportFn,
) -> Result<Box<dyn Transport>, PluginError> {
    let transport = guard("building the transport", || build(ctx, text))??;
    Ok(Box::new(GuardedTransport(transport)))
}

#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("cannot read plugin library {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("cannot load plugin library {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path} is not a hyperjob plugin: it exports no HYPERJOB_PLUGIN_HEADER")]
    NoHeader { path: PathBuf },
    #[error("plugin library {path} was built for another hyperjob: {details}")]
    Mismatch { path: PathBuf, details: String },
    #[error("plugin library {path} has a header but no hyperjob_plugin_register function")]
    NoRegister { path: PathBuf },
    #[error("plugin library {path} is inconsistent: {details}")]
    Inconsistent { path: PathBuf, details: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Reads the header of the plugin library at `path` from the file, without loading it.
pub fn read_header(path: &Path) -> Result<PluginHeader, LibraryError> {
    match elf::exported_symbol(path, HEADER_SYMBOL) {
        Ok(elf::Found::Symbol(bytes)) => {
            PluginHeader::from_bytes(&bytes).map_err(|details| LibraryError::Mismatch {
                path: path.to_path_buf(),
                details,
            })
        }
        Ok(elf::Found::Missing) => Err(LibraryError::NoHeader {
            path: path.to_path_buf(),
        }),
        Err(reason) => Err(LibraryError::Unreadable {
            path: path.to_path_buf(),
            reason,
        }),
    }
}

/// The gate: refuses a header that differs from this hyperjob's in anything that matters.
pub fn check_header(path: &Path, header: &PluginHeader) -> Result<(), LibraryError> {
    let mismatches = header.mismatches(&PluginHeader::host());
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(LibraryError::Mismatch {
            path: path.to_path_buf(),
            details: mismatches.join("; "),
        })
    }
}

/// Loads one plugin library — after reading its header from the file and passing the gate —
/// and adds its backends and transports to `registry`. Returns how long loading took.
pub fn load_library(path: &Path, registry: &mut Registry) -> Result<Duration, LibraryError> {
    let started = Instant::now();
    let header = read_header(path)?;
    check_header(path, &header)?;
    let err_path = || path.to_path_buf();
    // SAFETY: loading a library runs its initialisers. Only libraries the administrator named
    // in the config file (or put in a configured plugin directory), whose header shows they
    // were built for this hyperjob, are loaded.
    #[allow(unsafe_code)]
    let library = unsafe { libloading::Library::new(path) }.map_err(|err| LibraryError::Load {
        path: err_path(),
        message: err.to_string(),
    })?;
    // SAFETY: the symbol, if present, is a `PluginHeader` static: plain `#[repr(C)]` data that
    // is valid to read whatever built the library. It must be the header the gate passed (the
    // file could have been replaced in between).
    #[allow(unsafe_code)]
    let loaded: PluginHeader = unsafe {
        let symbol = library
            .get::<*const PluginHeader>(HEADER_SYMBOL.as_bytes())
            .map_err(|_| LibraryError::NoHeader { path: err_path() })?;
        std::ptr::read_unaligned(*symbol)
    };
    if loaded.to_bytes() != header.to_bytes() {
        return Err(LibraryError::Inconsistent {
            path: err_path(),
            details:
                "the header of the loaded library differs from the file's (replaced while loading?)"
                    .to_string(),
        });
    }
    // SAFETY: the header proves the library was built by this rustc, for this target, against
    // these boundary types, so the Rust signature of the function is the one we declare.
    #[allow(unsafe_code)]
    let register: fn(&mut PluginRegistrar) = unsafe {
        *library
            .get::<fn(&mut PluginRegistrar)>(REGISTER_SYMBOL)
            .map_err(|_| LibraryError::NoRegister { path: err_path() })?
    };
    let mut registrar = PluginRegistrar::default();
    // Generated by export_plugin!: it only records factories and cannot panic.
    register(&mut registrar);
    // Never unloaded: objects the library creates point into its code.
    std::mem::forget(library);
    let registered = |list: Vec<&String>| list.into_iter().cloned().collect::<Vec<_>>();
    for (kind, said, did) in [
        (
            Kind::Backend,
            header.names(Kind::Backend),
            registered(registrar.backends.iter().map(|b| &b.0).collect()),
        ),
        (
            Kind::Transport,
            header.names(Kind::Transport),
            registered(registrar.transports.iter().map(|t| &t.0).collect()),
        ),
    ] {
        if said != did {
            return Err(LibraryError::Inconsistent {
                path: err_path(),
                details: format!("its header lists {kind}s {said:?}, it registers {did:?}"),
            });
        }
    }
    for (name, version, build) in registrar.backends {
        registry.add_backend(Entry {
            name,
            version,
            origin: Origin::Library(path.to_path_buf()),
            build: Arc::new(move |ctx, table| build(ctx, &table_text(table)?)),
        })?;
    }
    for (name, version, build) in registrar.transports {
        registry.add_transport(Entry {
            name,
            version,
            origin: Origin::Library(path.to_path_buf()),
            build: Arc::new(move |ctx, table| build(ctx, &table_text(table)?)),
        })?;
    }
    Ok(started.elapsed())
}

fn table_text(table: &toml::Table) -> Result<String, PluginError> {
    toml::to_string(table).map_err(|err| PluginError::Config(err.to_string()))
}

/// Whether a file name looks like a shared object: `libx.so` or `libx.so.1`.
pub fn is_shared_object_name(path: &Path) -> bool {
    let name = path.file_name().and_then(OsStr::to_str).unwrap_or_default();
    name.ends_with(".so") || name.contains(".so.")
}

/// The `*.so` files in a plugin directory, sorted.
pub fn libraries_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    crate::registry::files_in(dir, |path| {
        path.extension() == Some(OsStr::new("so")) && path.is_file()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plugin as `export_plugin!` builds one: its header is a static evaluated at compile
    /// time in the plugin, which the host reads as raw memory before anything else.
    mod exported {
        use crate::plugin::{Backend, PluginError};
        use crate::registry::PluginContext;

        fn build(_ctx: &PluginContext, _text: &str) -> Result<Box<dyn Backend>, PluginError> {
            Err(PluginError::Unsupported("building in a unit test"))
        }

        crate::export_plugin! {
            backends: ["unit-test" => build],
            transports: [],
        }
    }

    #[test]
    fn the_header_a_plugin_exports_is_accepted_by_the_host_and_names_its_plugins() {
        // SAFETY: read exactly as `load_library` reads the symbol of a loaded library.
        #[allow(unsafe_code)]
        let plugin: PluginHeader = unsafe {
            std::ptr::read_unaligned(std::ptr::from_ref(&exported::HYPERJOB_PLUGIN_HEADER))
        };

        assert_eq!(
            plugin.mismatches(&PluginHeader::host()),
            Vec::<String>::new()
        );
        assert_eq!(plugin.names(Kind::Backend), ["unit-test"]);
        assert!(plugin.names(Kind::Transport).is_empty());
        assert_eq!(plugin.panic_strategy, PANIC_UNWIND);
        let mut registrar = PluginRegistrar::default();
        exported::hyperjob_plugin_register(&mut registrar);
        assert_eq!(registrar.backends.len(), 1);
        assert_eq!(registrar.backends[0].0, "unit-test");
        assert!(registrar.transports.is_empty());
    }

    #[test]
    fn a_file_that_is_no_library_is_refused_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("libfake.so");
        std::fs::write(&fake, b"not an ELF file").expect("write");
        let mut registry = Registry::default();

        let err = load_library(&fake, &mut registry).expect_err("not a library");

        assert_eq!(
            err.to_string(),
            format!(
                "cannot read plugin library {}: it is not an ELF file",
                fake.display()
            )
        );
    }

    #[test]
    fn shared_object_names_are_recognised() {
        assert!(is_shared_object_name(Path::new("/x/libq.so")));
        assert!(is_shared_object_name(Path::new("/lib/libc.so.6")));
        assert!(!is_shared_object_name(Path::new("/x/hyperjob-backend-so")));
        assert!(!is_shared_object_name(Path::new("/x/plugin.py")));
    }

    #[test]
    fn only_so_files_count_as_libraries() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["libb.so", "liba.so", "readme.txt", "hyperjob-backend-x"] {
            std::fs::write(dir.path().join(name), b"").expect("write");
        }

        let found = libraries_in(dir.path()).expect("list");

        let names: Vec<_> = found
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["liba.so", "libb.so"]);
    }
}
