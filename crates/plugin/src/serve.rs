//! The plugin side of the executable protocol in Rust: [`serve`] runs a type implementing
//! [`Backend`] or [`Transport`] as an executable plugin (version 2 over stdin and stdout), so
//! a Rust plugin can be shipped as a program instead of a library (no ABI gate to pass: any
//! rustc, any hyperjob-plugin of the same protocol).
//!
//! ```no_run
//! # use hyperjob_plugin::prelude::*;
//! # fn build(_: &PluginContext, _: &str) -> Result<Box<dyn Backend>, PluginError> { todo!() }
//! fn main() -> std::process::ExitCode {
//!     // The binary must be named hyperjob-backend-mine.
//!     serve(Served::backend("mine", env!("CARGO_PKG_VERSION"), &["list_owned"], build))
//! }
//! ```

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::context::{GuestKeyMode, Kind, PluginContext};
use crate::endpoint::EndpointKind;
use crate::keys::{GuestKeys, KeyPair, Secret};
use crate::plugin::{
    Backend, Endpoint, PluginError, Progress, RemoteExit, ScriptRequest, Transport, VmRequest,
};
use crate::protocol::{
    checks_json, error_json, frames, owned_vm, owned_vm_json, parse_host_message, pick_version,
    presence_json, Hello, HostMessage, ENV_PROTOCOL_MAX, ENV_PROTOCOL_MIN, MAX_LINE, PROTOCOL_MAX,
    PROTOCOL_MIN,
};

/// Builds the plugin from its context and its config table's TOML text (the signature of a
/// library plugin's factory, so one function can serve both tiers).
pub type BuildFn<T> = fn(&PluginContext, &str) -> Result<Box<T>, PluginError>;

enum Factory {
    Backend(BuildFn<dyn Backend>),
    Transport(BuildFn<dyn Transport>),
}

enum Built {
    Backend(Box<dyn Backend>),
    Transport(Box<dyn Transport>),
}

/// A plugin to serve: its name (the file must be named `hyperjob-<kind>-<name>`), version,
/// capabilities (docs/plugin-protocol.md: the optional methods it implements, and
/// `per_job_keys`) and factory.
pub struct Served {
    name: String,
    version: String,
    capabilities: Vec<String>,
    endpoint_kinds: Vec<EndpointKind>,
    factory: Factory,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("capabilities", &self.capabilities)
            .finish_non_exhaustive()
    }
}

impl Served {
    /// A backend named `name`, built by `build` from its config table's text (the same factory
    /// a library plugin exports); `capabilities` are what it answers beyond the required
    /// methods (see [`crate::protocol::BACKEND_CAPABILITIES`]).
    pub fn backend(
        name: &str,
        version: &str,
        capabilities: &[&str],
        build: BuildFn<dyn Backend>,
    ) -> Self {
        Self::new(name, version, capabilities, Factory::Backend(build))
    }

    /// A transport, as [`Served::backend`] (see [`crate::protocol::TRANSPORT_CAPABILITIES`]).
    pub fn transport(
        name: &str,
        version: &str,
        capabilities: &[&str],
        build: BuildFn<dyn Transport>,
    ) -> Self {
        Self::new(name, version, capabilities, Factory::Transport(build))
    }

    fn new(name: &str, version: &str, capabilities: &[&str], factory: Factory) -> Self {
        Self {
            name: name.to_string(),
            version: version.to_string(),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            endpoint_kinds: vec![EndpointKind::Tcp],
            factory,
        }
    }

    /// The kinds of endpoint the plugin hands out (a backend) or reaches (a transport), as its
    /// `Backend::endpoint_kinds` / `Transport::endpoint_kinds` say; TCP only unless set.
    pub fn endpoints(mut self, kinds: &[EndpointKind]) -> Self {
        self.endpoint_kinds = kinds.to_vec();
        self
    }

    fn hello(&self) -> Hello {
        let protocol = pick_version(
            std::env::var(ENV_PROTOCOL_MIN).ok().as_deref(),
            std::env::var(ENV_PROTOCOL_MAX).ok().as_deref(),
            PROTOCOL_MIN,
            PROTOCOL_MAX,
        );
        Hello {
            protocol,
            kind: match self.factory {
                Factory::Backend(_) => Kind::Backend,
                Factory::Transport(_) => Kind::Transport,
            },
            name: self.name.clone(),
            version: self.version.clone(),
            capabilities: self.capabilities.clone(),
            endpoint_kinds: self.endpoint_kinds.clone(),
        }
    }
}

/// Serves `plugin` on stdin and stdout until hyperjob closes stdin. Diagnostics go to stderr.
pub fn serve(plugin: Served) -> std::process::ExitCode {
    match serve_on(plugin, std::io::stdin(), std::io::stdout()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(reason) => {
            let _ = writeln!(std::io::stderr(), "plugin: {reason}");
            std::process::ExitCode::FAILURE
        }
    }
}

type Output = Arc<Mutex<Box<dyn Write + Send>>>;

fn send(out: &Output, line: &str) -> std::io::Result<()> {
    let mut out = out
        .lock()
        .map_err(|_| std::io::Error::other("output poisoned"))?;
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Which request runs, and the cancels that came for it (or before it started).
#[derive(Default)]
struct Cancels {
    current: Mutex<Option<(u64, Arc<AtomicBool>)>>,
    early: Mutex<HashSet<u64>>,
}

impl Cancels {
    fn cancel(&self, id: u64) {
        if let Ok(current) = self.current.lock() {
            match &*current {
                Some((running, flag)) if *running == id => flag.store(true, Ordering::Relaxed),
                _ => {
                    if let Ok(mut early) = self.early.lock() {
                        early.insert(id);
                    }
                }
            }
        }
    }

    /// hyperjob went away: whatever runs is cancelled.
    fn cancel_current(&self) {
        if let Ok(current) = self.current.lock() {
            if let Some((_, flag)) = &*current {
                flag.store(true, Ordering::Relaxed);
            }
        }
    }

    fn start(&self, id: u64) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        if let Ok(mut current) = self.current.lock() {
            if self.early.lock().is_ok_and(|mut early| early.remove(&id)) {
                flag.store(true, Ordering::Relaxed);
            }
            *current = Some((id, flag.clone()));
        }
        flag
    }
}

/// [`serve`] on any input and output (the tests drive it through pipes).
pub fn serve_on(
    plugin: Served,
    input: impl Read + Send + 'static,
    output: impl Write + Send + 'static,
) -> Result<(), String> {
    let out: Output = Arc::new(Mutex::new(Box::new(output)));
    send(&out, &plugin.hello().to_json().to_string())
        .map_err(|err| format!("cannot write the hello: {err}"))?;
    let cancels = Arc::new(Cancels::default());
    let messages = spawn_reader(input, cancels.clone());
    let mut built: Option<Built> = None;
    while let Ok(message) = messages.recv() {
        let (id, method, params) = match message? {
            HostMessage::Request { id, method, params } => (id, method, params),
            // Input of a request that failed before it read it all, or a cancel for a request
            // that already ended.
            HostMessage::Stdin { .. } | HostMessage::Cancel { .. } => continue,
        };
        let cancel = cancels.start(id);
        let request = Request {
            id,
            params: &params,
            cancel: &cancel,
            out: &out,
            messages: &messages,
        };
        let answer = match (&mut built, method.as_str()) {
            (_, "configure") => configure(&plugin.factory, &params).map(|plugin| {
                built = Some(plugin);
                json!({})
            }),
            (None, _) => Err(PluginError::msg("not configured")),
            (Some(Built::Backend(backend)), _) => {
                backend_method(backend.as_ref(), &method, &request)
            }
            (Some(Built::Transport(transport)), _) => {
                transport_method(transport.as_ref(), &method, &request)
            }
        };
        let line = match answer {
            Ok(result) => json!({ "id": id, "result": result }),
            Err(error) => json!({ "id": id, "error": error_json(&error) }),
        };
        send(&out, &line.to_string()).map_err(|err| format!("cannot answer: {err}"))?;
    }
    Ok(())
}

/// Reads the host's lines; cancels are handled here, at once, the rest is passed on.
fn spawn_reader(
    input: impl Read + Send + 'static,
    cancels: Arc<Cancels>,
) -> Receiver<Result<HostMessage, String>> {
    let (sender, messages) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(input);
        loop {
            let mut line = Vec::new();
            match Read::take(&mut reader, MAX_LINE as u64 + 1).read_until(b'\n', &mut line) {
                // hyperjob closed stdin (or died): the plugin is in a process group of its own
                // and gets no signal, so what runs stops now.
                Ok(0) => return cancels.cancel_current(),
                Ok(_) if line.len() > MAX_LINE => {
                    let _ = sender.send(Err("hyperjob sent a line that is too long".into()));
                    return;
                }
                Ok(_) => {}
                Err(err) => {
                    let _ = sender.send(Err(format!("cannot read stdin: {err}")));
                    return;
                }
            }
            let message = std::str::from_utf8(&line)
                .map_err(|_| "hyperjob sent a line that is not UTF-8".to_string())
                .and_then(parse_host_message)
                .map_err(|reason| format!("hyperjob sent {reason}"));
            match message {
                Ok(HostMessage::Cancel { id }) => cancels.cancel(id),
                other => {
                    let end = other.is_err();
                    if sender.send(other).is_err() || end {
                        return;
                    }
                }
            }
        }
    });
    messages
}

/// One request being served.
struct Request<'a> {
    id: u64,
    params: &'a Value,
    cancel: &'a AtomicBool,
    out: &'a Output,
    messages: &'a Receiver<Result<HostMessage, String>>,
}

impl Request<'_> {
    fn text(&self, key: &str) -> Result<String, PluginError> {
        self.params
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| PluginError::msg(format!("the request has no `{key}`")))
    }

    fn number(&self, key: &str) -> Result<u64, PluginError> {
        self.params
            .get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| PluginError::msg(format!("the request has no numeric `{key}`")))
    }

    fn deadline(&self) -> Instant {
        let millis = self.number("timeout_ms").unwrap_or(600_000);
        Instant::now() + Duration::from_millis(millis)
    }

    fn endpoint(&self) -> Result<Endpoint, PluginError> {
        serde_json::from_value(self.params.get("endpoint").cloned().unwrap_or(Value::Null))
            .map_err(|err| PluginError::msg(format!("the request has a bad `endpoint` ({err})")))
    }

    /// The `script_len` bytes that follow the request in stdin frames.
    fn input(&self) -> Result<Vec<u8>, PluginError> {
        let len = usize::try_from(self.number("script_len")?)
            .map_err(|_| PluginError::msg("`script_len` is too large"))?;
        let mut input = Vec::with_capacity(len);
        while input.len() < len {
            match self.messages.recv() {
                Ok(Ok(HostMessage::Stdin { id, data })) if id == self.id => {
                    input.extend_from_slice(&data);
                }
                Ok(Ok(_)) => {
                    return Err(PluginError::msg(
                        "the script's frames were interrupted by another message",
                    ))
                }
                Ok(Err(reason)) => return Err(PluginError::msg(reason)),
                Err(_) => return Err(PluginError::msg("stdin closed in the middle of a script")),
            }
        }
        if input.len() != len {
            return Err(PluginError::msg(
                "the script's frames hold more than `script_len`",
            ));
        }
        Ok(input)
    }
}

fn configure(factory: &Factory, params: &Value) -> Result<Built, PluginError> {
    let text = |key: &str| params.get(key).and_then(Value::as_str).unwrap_or_default();
    let ctx = PluginContext {
        state_dir: PathBuf::from(text("state_dir")),
        guest_keys: match text("guest_keys") {
            "per-job" => GuestKeyMode::PerJob,
            _ => GuestKeyMode::Pinned,
        },
        pool: params.get("pool").and_then(Value::as_bool).unwrap_or(false),
    };
    let config = text("config");
    Ok(match factory {
        Factory::Backend(build) => Built::Backend(build(&ctx, config)?),
        Factory::Transport(build) => Built::Transport(build(&ctx, config)?),
    })
}

/// Progress lines of a `create`.
struct SendProgress<'a>(&'a Output);

impl Progress for SendProgress<'_> {
    fn say(&self, message: &str) {
        let _ = send(self.0, &json!({ "progress": message }).to_string());
    }
}

fn backend_method(
    backend: &dyn Backend,
    method: &str,
    request: &Request<'_>,
) -> Result<Value, PluginError> {
    let vm_name = || request.text("vm_name");
    match method {
        "create" => {
            let vm = VmRequest {
                vm_name: vm_name()?,
                job_id: request.number("job_id")?,
                created_unix: request.number("created_unix")?,
                deadline_unix: request.number("deadline_unix")?,
                owner: request.text("owner")?,
                keys: guest_keys(request.params.get("keys"))?,
            };
            let progress = SendProgress(request.out);
            backend.create(&vm, &progress, request.deadline(), request.cancel)?;
            Ok(json!({}))
        }
        "wait_address" => {
            let endpoint = backend.wait_address(&vm_name()?, request.deadline(), request.cancel)?;
            serde_json::to_value(endpoint).map_err(|err| PluginError::system("bad endpoint", err))
        }
        "destroy" => backend.destroy(&vm_name()?).map(|()| json!({})),
        "halt" => backend.halt(&vm_name()?).map(|()| json!({})),
        "list_owned" => {
            let vms: Vec<Value> = backend.list_owned()?.iter().map(owned_vm_json).collect();
            Ok(json!({ "vms": vms }))
        }
        "inspect" => backend.inspect(&vm_name()?).map(|p| presence_json(&p)),
        "names_with_files" => Ok(json!({ "names": backend.names_with_files()? })),
        "relabel" => {
            let record = owned_vm(request.params.get("vm").unwrap_or(&Value::Null))
                .map_err(PluginError::msg)?;
            backend.relabel(&record).map(|()| json!({}))
        }
        "fingerprint" => Ok(json!({ "text": backend.fingerprint()? })),
        "console_tail" => Ok(json!({ "text": backend.console_tail(&vm_name()?)? })),
        "doctor" => Ok(checks_json(&backend.doctor())),
        _ => Err(PluginError::Unsupported("this method")),
    }
}

fn guest_keys(keys: Option<&Value>) -> Result<Option<GuestKeys>, PluginError> {
    let Some(keys) = keys.filter(|k| !k.is_null()) else {
        return Ok(None);
    };
    let text = |key: &str| {
        keys.get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| PluginError::msg(format!("`keys` has no `{key}`")))
    };
    Ok(Some(GuestKeys {
        user: text("user")?,
        authorized_key: text("authorized_key")?,
        host: KeyPair {
            private_openssh: Secret::new(text("host_private_key")?),
            public_openssh: text("host_public_key")?,
        },
    }))
}

/// A stream of a running script, written as frames as it comes.
struct FrameWriter<'a> {
    id: u64,
    stream: &'static str,
    out: &'a Output,
}

impl Write for FrameWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for frame in frames(self.id, self.stream, buf) {
            send(self.out, &frame)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn transport_method(
    transport: &dyn Transport,
    method: &str,
    request: &Request<'_>,
) -> Result<Value, PluginError> {
    match method {
        "ready_timeout" => Ok(json!({ "secs": transport.ready_timeout().as_secs() })),
        "login_user" => transport
            .login_user()
            .map(|user| json!({ "user": user }))
            .ok_or(PluginError::Unsupported("login_user")),
        "wait_ready" => transport
            .wait_ready(&request.endpoint()?, request.deadline(), request.cancel)
            .map(|()| json!({})),
        "run_script" => {
            // The frames come first, whatever else is wrong with the request.
            let script = request.input()?;
            let interpreter = request.text("interpreter")?;
            let script_request = ScriptRequest {
                interpreter: &interpreter,
                script: &script,
                cancel: request.cancel,
            };
            let mut stdout = FrameWriter {
                id: request.id,
                stream: "stdout",
                out: request.out,
            };
            let mut stderr = FrameWriter {
                id: request.id,
                stream: "stderr",
                out: request.out,
            };
            match transport.run_script(
                &request.endpoint()?,
                &script_request,
                &mut stdout,
                &mut stderr,
            )? {
                RemoteExit::Code(code) => Ok(json!({ "exit_code": code })),
                RemoteExit::Signal(signal) => Ok(json!({ "signal": signal })),
            }
        }
        "doctor" => Ok(checks_json(&transport.doctor())),
        _ => Err(PluginError::Unsupported("this method")),
    }
}

#[cfg(test)]
#[path = "serve_tests.rs"]
mod tests;
