//! Everything a backend or transport plugin touches, for `use hyperjob_plugin::prelude::*;`.
//!
//! The traits ([`Backend`], [`Transport`], [`Connection`], [`Progress`]), the types their
//! methods take and return, [`PluginError`], what a factory gets ([`PluginContext`]), the
//! config helper ([`parse_config`]) and [`export_plugin!`](crate::export_plugin).

pub use crate::config::parse as parse_config;
pub use crate::context::{GuestKeyMode, PluginContext};
pub use crate::export_plugin;
pub use crate::keys::GuestKeys;
pub use crate::plugin::{
    Backend, Check, Connection, Endpoint, OwnedVm, PluginError, Progress, RemoteExit,
    ScriptRequest, Transport, VmPresence, VmRequest,
};
// TO WIRE AT MERGE: `pub use crate::serve::serve;` (executable plugins, see lib.rs).
