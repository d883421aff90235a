//! Executable plugins (tier 3): a program in any language, spoken to over its stdin and stdout
//! with newline-delimited JSON. This is hyperjob's stable public plugin contract; the protocol
//! (version 2) is specified in docs/plugin-protocol.md. This module is its host side;
//! [`protocol`] holds the messages both sides share and [`serve`] the plugin side in Rust.
//!
//! Every hyperjob stage is a short-lived process, so a plugin process lives for one stage: it
//! is started when the plugin is built, says hello (with the protocol version it picked and
//! its capabilities), is configured, serves requests, and is ended (stdin closed, then its
//! process group killed if it lingers) when hyperjob drops it. Anything the plugin does wrong —
//! malformed JSON, a message out of protocol, exiting, hanging past a deadline, not reading —
//! is a system failure with a one-line reason, never a hang.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config::GuestKeyMode;
use crate::registry::{Kind, PluginContext};

mod backend;
mod connection;
mod files;
/// The protocol's messages and the plugin side ([`serve`]) live in the plugin contract crate,
/// which plugin authors depend on.
pub use hyperjob_plugin::{protocol, serve};
mod transport;

pub use connection::{ENV_ALLOWED, GRACE, WRITE_TIMEOUT};
pub use files::{executables_in, identify, probe, register};
pub use protocol::{Hello, Incoming, OutputStream, PROTOCOL_MAX, PROTOCOL_MIN};

use connection::{CallOptions, Connection};
use protocol::Hello as PluginHello;

/// How long a plugin may take to say hello when a stage starts it.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `hyperjob plugins` waits for the hellos of all executables (started in parallel).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long wait_address and wait_ready may overrun the deadline they pass on (the plugin
/// answers after its own timeout ran out).
const OVERRUN: Duration = Duration::from_secs(5);

/// The longest each method may take, where the caller sets no deadline (docs/plugin-protocol.md).
pub fn method_timeout(method: &str) -> Duration {
    Duration::from_secs(match method {
        "ready_timeout" | "login_user" | "console_tail" => 10,
        "configure" | "halt" | "relabel" => 30,
        "list_owned" | "inspect" | "names_with_files" | "fingerprint" | "doctor" => 60,
        "destroy" => 120,
        _ => 600,
    })
}

/// A plugin connection shared by the trait methods (which take `&self`), with its hello.
struct Shared {
    connection: Mutex<Connection>,
    hello: PluginHello,
}

impl Shared {
    /// A request bounded by its method's own timeout.
    fn call(&self, method: &str, params: Value) -> Result<Value, crate::PluginError> {
        let options = CallOptions {
            deadline: Instant::now() + method_timeout(method),
            cancel: None,
            input: None,
            write_timeout: WRITE_TIMEOUT,
        };
        self.call_with(method, params, &options, &mut |_| {})
    }

    fn call_with(
        &self,
        method: &str,
        params: Value,
        options: &CallOptions<'_>,
        sink: &mut dyn FnMut(Incoming),
    ) -> Result<Value, crate::PluginError> {
        let mut connection = self
            .connection
            .lock()
            .map_err(|_| crate::PluginError::msg("executable plugin connection is poisoned"))?;
        connection.call(method, params, options, sink)
    }

    /// An optional method: `Unsupported` without asking when the hello did not declare it.
    fn optional(
        &self,
        capability: &'static str,
        params: Value,
    ) -> Result<Value, crate::PluginError> {
        if !self.hello.has(capability) {
            return Err(crate::PluginError::Unsupported(capability));
        }
        self.call(capability, params)
    }
}

/// Starts the executable and checks that its hello says what its file name says.
fn start_checked(
    path: &std::path::Path,
    kind: Kind,
    name: &str,
    hello_timeout: Duration,
) -> Result<(Connection, PluginHello), crate::PluginError> {
    let (connection, hello) = Connection::start(path, hello_timeout)?;
    if hello.kind != kind || hello.name != name {
        return Err(connection.failure(&format!(
            "says it is {} {:?}, but its file name says {kind} {name:?}",
            hello.kind, hello.name
        )));
    }
    Ok((connection, hello))
}

/// The capabilities a `kind` plugin must have declared for the config described by `ctx`.
pub fn required_capabilities(kind: Kind, ctx: &PluginContext) -> Vec<(&'static str, &'static str)> {
    let mut needed = Vec::new();
    if ctx.guest_keys == GuestKeyMode::PerJob {
        needed.push(("per_job_keys", "guest_keys = \"per-job\""));
    }
    if kind == Kind::Backend && ctx.pool {
        for capability in ["list_owned", "relabel", "fingerprint"] {
            needed.push((capability, "a warm pool ([pool] size > 0)"));
        }
    }
    needed
}

fn connect_and_configure(
    path: &std::path::Path,
    kind: Kind,
    name: &str,
    ctx: &PluginContext,
    table: &toml::Table,
) -> Result<Shared, crate::PluginError> {
    let (connection, hello) = start_checked(path, kind, name, HELLO_TIMEOUT)?;
    for (capability, why) in required_capabilities(kind, ctx) {
        if !hello.has(capability) {
            return Err(crate::PluginError::Config(format!(
                "{why} needs the capability `{capability}`, which {kind} {name:?} (executable \
                 plugin {}) does not declare",
                path.display()
            )));
        }
    }
    let shared = Shared {
        connection: Mutex::new(connection),
        hello,
    };
    let config =
        toml::to_string(table).map_err(|err| crate::PluginError::Config(err.to_string()))?;
    shared.call(
        "configure",
        json!({
            "config": config,
            "state_dir": ctx.state_dir,
            "guest_keys": ctx.guest_keys.name(),
            "pool": ctx.pool,
        }),
    )?;
    Ok(shared)
}

fn remaining_ms(deadline: Instant) -> u64 {
    u64::try_from(
        deadline
            .saturating_duration_since(Instant::now())
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

fn field<'a>(value: &'a Value, key: &str, method: &str) -> Result<&'a Value, crate::PluginError> {
    value.get(key).ok_or_else(|| {
        crate::PluginError::msg(format!(
            "executable plugin answered `{method}` without `{key}`"
        ))
    })
}

fn bad_answer(method: &str, reason: &str) -> crate::PluginError {
    crate::PluginError::msg(format!(
        "executable plugin answered `{method}` with {reason}"
    ))
}

/// Options of a cancellable request bounded by `deadline`.
fn cancellable<'a>(deadline: Instant, cancel: &'a AtomicBool) -> CallOptions<'a> {
    CallOptions {
        deadline,
        cancel: Some(cancel),
        input: None,
        write_timeout: WRITE_TIMEOUT,
    }
}

/// The error for a request the signal handler cancelled, whatever the plugin answered.
fn interrupted(cancel: &AtomicBool, what: &str) -> Result<(), crate::PluginError> {
    if cancel.load(Ordering::Relaxed) {
        return Err(crate::PluginError::Interrupted(what.to_string()));
    }
    Ok(())
}
