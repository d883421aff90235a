//! The plugin side of Rust shared-library plugins (tier 2): the header a `cdylib` exports, the
//! registrar it fills in, [`export_plugin!`](crate::export_plugin), and the panic guards the
//! macro compiles into the plugin. hyperjob-core's `abi` module holds the host side (reading
//! the header from the file, the gate, loading).
//!
//! Rust has no stable ABI, so handing `Box<dyn Backend>` across a library boundary is sound
//! only when both sides were built by the same rustc, for the same target, against the same
//! boundary types, with the same panic strategy and allocator. Every plugin therefore exports a
//! frozen `#[repr(C)]` [`PluginHeader`] under the symbol `HYPERJOB_PLUGIN_HEADER`, which says
//! all of that and which plugins the library provides. hyperjob reads it from the library
//! *file* — a library that is not selected, or that the gate refuses, is never
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
mod guarded;
mod header;

pub use header::*;

use contain::guard;
use guarded::{GuardedBackend, GuardedTransport};

use crate::context::PluginContext;
use crate::plugin::{Backend, PluginError, Transport};

/// Symbol of the header.
pub const HEADER_SYMBOL: &str = "HYPERJOB_PLUGIN_HEADER";
/// Symbol of the registration function.
pub const REGISTER_SYMBOL: &[u8] = b"hyperjob_plugin_register\0";

/// Builds a backend from the TOML text of its config table.
pub type LibraryBackendFn = fn(&PluginContext, &str) -> Result<Box<dyn Backend>, PluginError>;
/// Builds a transport from the TOML text of its config table.
pub type LibraryTransportFn = fn(&PluginContext, &str) -> Result<Box<dyn Transport>, PluginError>;

/// What a library's `hyperjob_plugin_register` fills in. Written by the code
/// [`export_plugin!`](crate::export_plugin) generates; a plugin author never touches it.
#[derive(Debug, Default)]
pub struct PluginRegistrar {
    backends: Vec<(String, String, LibraryBackendFn)>,
    transports: Vec<(String, String, LibraryTransportFn)>,
}

/// A library's registrations: (name, plugin version, factory) of each backend and transport.
pub type Registrations = (
    Vec<(String, String, LibraryBackendFn)>,
    Vec<(String, String, LibraryTransportFn)>,
);

impl PluginRegistrar {
    /// Registers the backend `name` of plugin version `version`.
    pub fn backend(&mut self, name: &str, version: &str, build: LibraryBackendFn) {
        self.backends
            .push((name.to_string(), version.to_string(), build));
    }

    /// Registers the transport `name` of plugin version `version`.
    pub fn transport(&mut self, name: &str, version: &str, build: LibraryTransportFn) {
        self.transports
            .push((name.to_string(), version.to_string(), build));
    }

    /// What was registered (read by hyperjob's loader).
    pub fn into_parts(self) -> Registrations {
        (self.backends, self.transports)
    }
}

/// Exports a shared-library plugin: its header, its registration function and its allocator.
///
/// ```ignore
/// hyperjob_plugin::export_plugin! {
///     backends: ["qemu" => build_qemu_backend],
///     transports: [],
/// }
/// ```
/// where `build_qemu_backend: fn(&PluginContext, &str) -> Result<Box<dyn Backend>, PluginError>`
/// receives the TOML text of `[backends.qemu]` (parse it with [`crate::config::parse`]). Use
/// it once per library, at the top level of the crate (it defines two exported symbols and the
/// global allocator). Only `hyperjob-plugin` needs to be a dependency: the macro names
/// everything by its path in this crate. The names go into the header, so hyperjob
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::Kind;

    /// A plugin as `export_plugin!` builds one: its header is a static evaluated at compile
    /// time in the plugin, which the host reads as raw memory before anything else.
    mod exported {
        use crate::context::PluginContext;
        use crate::plugin::{Backend, PluginError};

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
        let (backends, transports) = registrar.into_parts();
        assert_eq!(backends.len(), 1);
        assert_eq!(backends[0].0, "unit-test");
        assert!(transports.is_empty());
    }
}
