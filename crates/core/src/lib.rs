//! hyperjob-core: everything hyperjob knows that is not a particular hypervisor or transport.
//!
//! The binary (`src/main.rs`) parses the command line and hands over to [`stages`]; stage logic
//! reads the [`config`] file and the [`job`] context that GitLab Runner provides, builds the
//! selected plugins through the [`registry`], keeps per-job [`state`] on disk (every runner stage
//! is a separate process) and finally turns the outcome into an exit code in [`exit`] — the only
//! place where that happens. The plugin contract lives in the hyperjob-plugin crate, re-exported
//! here at its old paths ([`plugin`], [`keys`], the plugin side of [`abi`], [`export_plugin!`]);
//! the core never names a concrete backend or transport.

pub mod abi;
pub mod boot;
pub mod config;
pub mod detach;
pub mod discovery;
pub mod doctor;
pub mod endpoints;
pub mod exec_plugin;
pub mod exit;
pub mod guest_runner;
pub mod hold;
pub mod job;
pub mod lock;
pub mod metrics;
pub mod ownership;
pub mod plugin_check;
pub mod pool;
pub mod progress;
pub mod registry;
pub mod relay;
pub mod runner;
pub mod signals;
pub mod stages;
pub mod state;
pub mod teardown;
pub mod wait;

pub use hyperjob_plugin::export_plugin;
pub use hyperjob_plugin::{keys, plugin};
pub use plugin::{
    Address, Backend, Check, Connection, Endpoint, EndpointKind, OwnedVm, PluginError, RemoteExit,
    ScriptRequest, Transport, Upload, VmPresence, VmRequest,
};
pub mod gc;
pub mod images;

/// Version of hyperjob-core, shown by `config` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
