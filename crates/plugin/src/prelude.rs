//! Everything a backend or transport plugin touches, for `use hyperjob_plugin::prelude::*;`.
//!
//! The traits ([`Backend`], [`Transport`], [`Connection`], [`Progress`]), the types their
//! methods take and return (the standard library's among them: [`Instant`], [`Duration`],
//! [`AtomicBool`], [`Write`]), [`PluginError`], what a factory gets ([`PluginContext`]), the
//! config helper ([`parse_config`]) and [`export_plugin!`](crate::export_plugin).
//!
//! A whole (if useless) transport plugin with no other `use` line:
//!
//! ```
//! use hyperjob_plugin::prelude::*;
//!
//! /// `[transports.echo]`
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct EchoConfig {
//!     ready_timeout_secs: Option<u64>,
//! }
//!
//! struct Echo {
//!     ready_timeout: Duration,
//! }
//!
//! impl Transport for Echo {
//!     fn ready_timeout(&self) -> Duration {
//!         self.ready_timeout
//!     }
//!
//!     fn wait_ready(&self, _: &Endpoint, _: Instant, _: &AtomicBool) -> Result<(), PluginError> {
//!         Ok(())
//!     }
//!
//!     fn run_script(
//!         &self,
//!         endpoint: &Endpoint,
//!         request: &ScriptRequest<'_>,
//!         stdout: &mut dyn Write,
//!         _stderr: &mut dyn Write,
//!     ) -> Result<RemoteExit, PluginError> {
//!         writeln!(stdout, "{} would run at {endpoint}", request.interpreter)
//!             .map_err(|err| PluginError::system("cannot write the output", err))?;
//!         Ok(RemoteExit::Code(0))
//!     }
//! }
//!
//! fn build(_ctx: &PluginContext, table_text: &str) -> Result<Box<dyn Transport>, PluginError> {
//!     let config: EchoConfig = parse_config(table_text)?;
//!     let secs = config.ready_timeout_secs.unwrap_or(60);
//!     Ok(Box::new(Echo { ready_timeout: Duration::from_secs(secs) }))
//! }
//!
//! export_plugin! {
//!     backends: [],
//!     transports: ["echo" => build],
//! }
//! # fn main() {
//! #     let echo = build(
//! #         &PluginContext { state_dir: "/tmp".into(), guest_keys: GuestKeyMode::Pinned, pool: false },
//! #         "ready_timeout_secs = 5\n",
//! #     )
//! #     .expect("valid");
//! #     assert_eq!(echo.ready_timeout(), Duration::from_secs(5));
//! # }
//! ```

pub use crate::config::parse as parse_config;
pub use crate::context::{GuestKeyMode, PluginContext};
pub use crate::export_plugin;
pub use crate::keys::GuestKeys;
pub use crate::plugin::{
    Address, Backend, Check, Connection, Endpoint, EndpointKind, OwnedVm, PluginError, Progress,
    RemoteExit, ScriptRequest, Transport, Upload, VmPresence, VmRequest,
};
pub use crate::serve::{serve, Served};
pub use crate::wait::still_wanted;
pub use std::io::Write;
pub use std::sync::atomic::AtomicBool;
pub use std::time::{Duration, Instant};
