//! Rust shared-library plugins (tier 2): a `cdylib` built against the same hyperjob-core,
//! loaded with `libloading`.
//!
//! Rust has no stable ABI, so handing `Box<dyn Backend>` across a library boundary is sound
//! only when both sides were built by the same rustc, for the same target, against the same
//! hyperjob-core. Every plugin therefore exports a frozen `#[repr(C)]` [`PluginHeader`] under
//! the symbol `HYPERJOB_PLUGIN_HEADER`, which the host reads and checks *before* it calls any
//! Rust function in the library. Only then does it call `hyperjob_plugin_register`. Libraries
//! are never unloaded (code and vtables of their objects must outlive every use), and config
//! reaches a plugin as TOML text.
//!
//! Panics: a `cdylib` carries its own copy of the standard library, and a panic thrown by one
//! copy cannot be caught by another (the host would see a foreign exception and abort). So the
//! guard that turns a panic into a system failure runs *inside the plugin*: `export_plugin!`
//! wraps every factory and every object it returns in [`guarded_backend`] /
//! [`guarded_transport`], whose code is compiled into the plugin with the plugin's own std.
//!
//! A plugin is its trait implementations plus one [`export_plugin!`](crate::export_plugin).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod guarded;

use guarded::{guard, GuardedBackend, GuardedTransport};

use crate::plugin::{Backend, PluginError, Transport};
use crate::registry::{Entry, Origin, PluginContext, Registry, RegistryError};

/// First bytes of every header.
pub const HEADER_MAGIC: [u8; 8] = *b"HYPERJOB";
/// Layout version of [`PluginHeader`] itself. Frozen: fields are only ever appended, and a new
/// layout gets a new number.
pub const HEADER_VERSION: u32 = 1;
/// Version of the plugin API (the traits, `PluginContext`, the registrar). Bumped whenever a
/// plugin built against the old API would misbehave. 2: `VmRequest::owner`, `OwnedVm::owner`.
/// 3: `Backend::inspect`, `Backend::names_with_files`. 4: `Backend::relabel`,
/// `Backend::fingerprint`, `PoolConfig`. 5: `Transport::can_connect`, `Transport::connect`,
/// `Connection`, `PluginError::NotStarted`.
pub const CORE_API_VERSION: u32 = 5;
/// The rustc that built this hyperjob-core.
pub const RUSTC_VERSION: &str = env!("HYPERJOB_RUSTC_VERSION");
/// The target this hyperjob-core was built for.
pub const TARGET: &str = env!("HYPERJOB_TARGET");
/// Symbol of the header.
pub const HEADER_SYMBOL: &[u8] = b"HYPERJOB_PLUGIN_HEADER\0";
/// Symbol of the registration function.
pub const REGISTER_SYMBOL: &[u8] = b"hyperjob_plugin_register\0";

const TEXT: usize = 96;

/// The frozen header every shared-library plugin exports. Plain data only: the host reads it
/// before it trusts anything else in the library.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PluginHeader {
    pub magic: [u8; 8],
    pub header_version: u32,
    pub core_api_version: u32,
    /// NUL-padded UTF-8.
    pub rustc_version: [u8; TEXT],
    pub core_version: [u8; TEXT],
    pub target: [u8; TEXT],
}

const fn text(value: &str) -> [u8; TEXT] {
    let bytes = value.as_bytes();
    let mut out = [0u8; TEXT];
    let mut i = 0;
    while i < bytes.len() && i < TEXT - 1 {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

fn read_text(bytes: &[u8; TEXT]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(TEXT);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl PluginHeader {
    /// The header of a plugin built right now, against this hyperjob-core.
    pub const fn current() -> Self {
        Self {
            magic: HEADER_MAGIC,
            header_version: HEADER_VERSION,
            core_api_version: CORE_API_VERSION,
            rustc_version: text(RUSTC_VERSION),
            core_version: text(crate::VERSION),
            target: text(TARGET),
        }
    }

    /// Every way `self` (the plugin's) differs from `host`, as "what: plugin X, hyperjob Y".
    pub fn mismatches(&self, host: &PluginHeader) -> Vec<String> {
        if self.magic != host.magic {
            return vec!["header magic differs: not a hyperjob plugin header".to_string()];
        }
        if self.header_version != host.header_version {
            return vec![format!(
                "header version: plugin {}, hyperjob {}",
                self.header_version, host.header_version
            )];
        }
        let mut out = Vec::new();
        if self.core_api_version != host.core_api_version {
            out.push(format!(
                "core API version: plugin {}, hyperjob {}",
                self.core_api_version, host.core_api_version
            ));
        }
        for (what, plugin, ours) in [
            ("rustc", &self.rustc_version, &host.rustc_version),
            ("hyperjob-core", &self.core_version, &host.core_version),
            ("target", &self.target, &host.target),
        ] {
            if plugin != ours {
                out.push(format!(
                    "{what}: plugin {:?}, hyperjob {:?}",
                    read_text(plugin),
                    read_text(ours)
                ));
            }
        }
        out
    }
}

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

/// Exports a shared-library plugin: its header and its registration function.
///
/// ```ignore
/// hyperjob_core::export_plugin! {
///     backends: ["qemu" => build_qemu_backend],
///     transports: [],
/// }
/// ```
/// where `build_qemu_backend: fn(&PluginContext, &str) -> Result<Box<dyn Backend>, PluginError>`
/// receives the TOML text of `[backends.qemu]`.
#[macro_export]
macro_rules! export_plugin {
    (backends: [$($bname:literal => $bbuild:path),* $(,)?], transports: [$($tname:literal => $tbuild:path),* $(,)?] $(,)?) => {
        /// Read by hyperjob before anything else in this library.
        #[allow(unsafe_code)]
        #[no_mangle]
        pub static HYPERJOB_PLUGIN_HEADER: $crate::abi::PluginHeader =
            $crate::abi::PluginHeader::current();

        /// Called by hyperjob once the header matched. Every factory is wrapped so that its
        /// panics are caught here, by this library's own standard library.
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
    #[error("cannot load plugin library {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path} is not a hyperjob plugin: it exports no HYPERJOB_PLUGIN_HEADER")]
    NoHeader { path: PathBuf },
    #[error("plugin library {path} was built for another hyperjob: {details}")]
    Mismatch { path: PathBuf, details: String },
    #[error("plugin library {path} has a header but no hyperjob_plugin_register function")]
    NoRegister { path: PathBuf },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Loads one plugin library and adds its backends and transports to `registry`. Returns how
/// long loading took.
pub fn load_library(path: &Path, registry: &mut Registry) -> Result<Duration, LibraryError> {
    let started = Instant::now();
    let err_path = || path.to_path_buf();
    // SAFETY: loading a library runs its initialisers. Only libraries the administrator named
    // in the config file (or put in a configured plugin directory) are loaded.
    #[allow(unsafe_code)]
    let library = unsafe { libloading::Library::new(path) }.map_err(|err| LibraryError::Load {
        path: err_path(),
        message: err.to_string(),
    })?;
    // SAFETY: the symbol, if present, is a `PluginHeader` static: plain `#[repr(C)]` data that
    // is valid to read whatever rustc built the library. Nothing else is touched yet.
    #[allow(unsafe_code)]
    let header: PluginHeader = unsafe {
        let symbol = library
            .get::<*const PluginHeader>(HEADER_SYMBOL)
            .map_err(|_| LibraryError::NoHeader { path: err_path() })?;
        std::ptr::read_unaligned(*symbol)
    };
    let mismatches = header.mismatches(&PluginHeader::current());
    if !mismatches.is_empty() {
        return Err(LibraryError::Mismatch {
            path: err_path(),
            details: mismatches.join("; "),
        });
    }
    // SAFETY: the header proves the library was built by this rustc, for this target, against
    // this hyperjob-core, so the Rust signature of the function is the one we declare.
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

    /// The bytes of a header, as the loader sees them.
    fn bytes_of(header: &PluginHeader) -> Vec<u8> {
        let size = std::mem::size_of::<PluginHeader>();
        // SAFETY: PluginHeader is #[repr(C)] plain data without padding (asserted by
        // `the_header_layout_is_frozen`), so all of its `size` bytes are initialised.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(header).cast::<u8>(), size).to_vec()
        }
    }

    #[test]
    fn the_header_a_plugin_exports_is_accepted_by_the_host() {
        // SAFETY: read exactly as `load_library` reads the symbol of a loaded library.
        #[allow(unsafe_code)]
        let plugin: PluginHeader = unsafe {
            std::ptr::read_unaligned(std::ptr::from_ref(&exported::HYPERJOB_PLUGIN_HEADER))
        };
        let host = PluginHeader::current();

        assert_eq!(plugin.mismatches(&host), Vec::<String>::new());
        assert_eq!(bytes_of(&plugin), bytes_of(&host));
        let mut registrar = PluginRegistrar::default();
        exported::hyperjob_plugin_register(&mut registrar);
        assert_eq!(registrar.backends.len(), 1);
        assert_eq!(registrar.backends[0].0, "unit-test");
        assert!(registrar.transports.is_empty());
    }

    /// The header is frozen: built here byte by byte from its documented layout, it must equal
    /// what this hyperjob-core writes. A reordered, resized or retyped field fails this.
    #[test]
    fn the_header_layout_is_frozen() {
        let mut expected = Vec::new();
        expected.extend_from_slice(b"HYPERJOB");
        expected.extend_from_slice(&1u32.to_ne_bytes());
        expected.extend_from_slice(&CORE_API_VERSION.to_ne_bytes());
        for value in [RUSTC_VERSION, env!("CARGO_PKG_VERSION"), TARGET] {
            let mut field = [0u8; 96];
            field[..value.len()].copy_from_slice(value.as_bytes());
            expected.extend_from_slice(&field);
        }

        assert_eq!(std::mem::size_of::<PluginHeader>(), 8 + 4 + 4 + 3 * 96);
        assert_eq!(std::mem::align_of::<PluginHeader>(), 4);
        assert_eq!(bytes_of(&PluginHeader::current()), expected);
    }

    /// What the header carries comes from the real build: a build script that could not ask
    /// rustc would write the same placeholder into host and plugin, and they would "match".
    #[test]
    fn the_header_records_the_real_compiler_and_target() {
        assert!(RUSTC_VERSION.starts_with("rustc 1."), "{RUSTC_VERSION}");
        assert!(
            TARGET.starts_with(std::env::consts::ARCH),
            "{TARGET} is not for {}",
            std::env::consts::ARCH
        );
        assert!(
            TARGET.contains(std::env::consts::OS),
            "{TARGET} is not for {}",
            std::env::consts::OS
        );
        assert_eq!(crate::VERSION, env!("CARGO_PKG_VERSION"));
    }

    /// Each field, changed alone, is refused, and the refusal names that field.
    #[test]
    fn a_header_differing_in_any_one_field_is_refused_naming_it() {
        type Change = fn(&mut PluginHeader);
        let changes: [(&str, Change); 7] = [
            ("magic", |h| h.magic[7] ^= 1),
            ("header version", |h| h.header_version += 1),
            ("core API version", |h| h.core_api_version -= 1),
            ("rustc", |h| h.rustc_version[6] ^= 1),
            ("hyperjob-core", |h| h.core_version[0] ^= 1),
            ("target", |h| h.target[0] ^= 1),
            // Past the text's terminating NUL: invisible when printed, still a difference.
            ("target", |h| h.target[TEXT - 1] = b'x'),
        ];

        for (field, change) in changes {
            let mut plugin = PluginHeader::current();
            change(&mut plugin);

            let found = plugin.mismatches(&PluginHeader::current());

            assert_eq!(found.len(), 1, "{field}: {found:?}");
            assert!(found[0].contains(field), "{field}: {found:?}");
        }
    }

    #[test]
    fn api_version_mismatch_names_both_versions() {
        let mut plugin = PluginHeader::current();
        plugin.core_api_version = CORE_API_VERSION + 1;

        let found = plugin.mismatches(&PluginHeader::current());

        assert_eq!(
            found,
            vec![format!(
                "core API version: plugin {}, hyperjob {}",
                CORE_API_VERSION + 1,
                CORE_API_VERSION
            )]
        );
    }

    #[test]
    fn rustc_mismatch_shows_both_compilers() {
        let mut plugin = PluginHeader::current();
        plugin.rustc_version = text("rustc 1.0.0 (a28077b28 2015-05-13)");

        let found = plugin.mismatches(&PluginHeader::current()).join("; ");

        assert!(
            found.contains(
                "rustc: plugin \"rustc 1.0.0 (a28077b28 2015-05-13)\", hyperjob \"rustc "
            ),
            "{found}"
        );
    }

    #[test]
    fn foreign_magic_is_refused_before_anything_else_is_read() {
        let mut plugin = PluginHeader::current();
        plugin.magic = *b"NOTOURS!";
        plugin.core_api_version = 99;

        let found = plugin.mismatches(&PluginHeader::current());

        assert_eq!(found.len(), 1);
        assert!(found[0].contains("magic"), "{found:?}");
    }

    #[test]
    fn long_texts_are_truncated_and_nul_terminated() {
        let long = "x".repeat(500);

        let stored = text(&long);

        assert_eq!(read_text(&stored).len(), TEXT - 1);
    }

    #[test]
    fn a_panicking_call_becomes_a_system_failure() {
        let result: Result<(), PluginError> = guard("testing", || panic!("boom"));

        let message = result.expect_err("panicked").to_string();
        assert_eq!(message, "the plugin panicked while testing: boom");
    }

    #[test]
    fn a_file_that_is_no_library_is_refused_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("libfake.so");
        std::fs::write(&fake, b"not an ELF file").expect("write");
        let mut registry = Registry::default();

        let err = load_library(&fake, &mut registry).expect_err("not a library");

        assert!(
            err.to_string().starts_with("cannot load plugin library"),
            "{err}"
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
