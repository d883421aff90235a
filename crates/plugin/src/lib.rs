//! hyperjob-plugin: the contract between hyperjob and its plugins — the one crate a plugin
//! author depends on.
//!
//! A **backend** ([`Backend`]) owns the VM lifecycle: create and boot a job's VM, find its
//! address, destroy it. A **transport** ([`Transport`]) reaches the guest at that address and
//! runs the job's scripts. hyperjob selects one of each by name in its config file and hands
//! each its own table (`[backends.<name>]`, `[transports.<name>]`).
//!
//! A Rust plugin is a `cdylib` with its trait implementations, a factory that parses its table
//! ([`config::parse`]) and one [`export_plugin!`] call; `use hyperjob_plugin::prelude::*;`
//! brings in everything that takes. docs/plugins.md walks through the template
//! (`plugins/template-backend`), which is such a crate.
//!
//! What is here: the traits and the types they exchange ([`plugin`]), what a factory gets
//! besides its table ([`PluginContext`]), per-job keys ([`keys`]), the config helper
//! ([`config`]), and the plugin side of the shared-library ABI ([`abi`]: the header
//! `export_plugin!` exports, the panic guards it compiles into the plugin, the fingerprint of
//! every type that crosses the library boundary). hyperjob-core — stages, state, the registry
//! and the loaders — depends on this crate and re-exports it at its old paths
//! (`hyperjob_core::plugin`, `hyperjob_core::abi`, …). Nothing here links libvirt.

#![warn(missing_docs)]

pub mod abi;
pub mod config;
pub mod context;
pub mod endpoint;
pub mod keys;
pub mod plugin;
pub mod prelude;
pub mod protocol;
pub mod serve;
pub mod wait;

pub use context::{GuestKeyMode, Kind, PluginContext};
pub use plugin::{
    Address, Backend, Check, Connection, Endpoint, EndpointKind, OwnedVm, PluginError, Progress,
    RemoteExit, ScriptRequest, Transport, Upload, VmPresence, VmRequest,
};

/// Version of this crate, recorded in every plugin header (`core_version`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
