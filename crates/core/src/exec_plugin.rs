//! Executable plugins (tier 3): a program in any language, spoken to over its stdin and stdout
//! with newline-delimited JSON. This is hyperjob's stable public plugin contract; the protocol
//! is specified in docs/plugin-protocol.md, and this module is its host side.
//!
//! Every hyperjob stage is a short-lived process, so a plugin process lives for one stage: it
//! is started when the plugin is built, says hello, is configured, serves requests, and is
//! ended (stdin closed, then killed by pid if it lingers) when hyperjob drops it. Anything the
//! plugin does wrong — malformed JSON, a message out of protocol, exiting, hanging past a
//! deadline — is a system failure with a one-line reason, never a hang.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::config::GuestKeyMode;
use crate::plugin::{
    Backend, Endpoint, EndpointKind, OwnedVm, PluginError, Progress, RemoteExit, ScriptRequest,
    Transport, VmRequest,
};
use crate::registry::{Kind, PluginContext};

mod files;

pub use files::{executables_in, identify, probe, register};

/// The protocol version this host speaks.
pub const PROTOCOL_VERSION: u64 = 1;
/// How long a plugin may take to say hello when a stage starts it.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `hyperjob plugins` waits for the hellos of all executables (started in parallel).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long any request without its own deadline may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest line accepted from a plugin (a stream frame carries at most 1 MiB of output).
const MAX_LINE: usize = 4 << 20;

/// What a plugin says first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub kind: Kind,
    pub name: String,
    pub version: String,
    /// `endpoints`: the kinds of endpoint a backend hands out or a transport reaches (absent:
    /// TCP only).
    pub endpoint_kinds: Vec<EndpointKind>,
}

/// Parses the hello line; every deviation is a reason.
pub fn parse_hello(line: &str) -> Result<Hello, String> {
    let value: Value =
        serde_json::from_str(line).map_err(|err| format!("hello is not JSON ({err})"))?;
    let hello = value
        .get("hello")
        .ok_or_else(|| "the first message is not a hello".to_string())?;
    let protocol = hello
        .get("protocol")
        .and_then(Value::as_u64)
        .ok_or_else(|| "hello has no protocol version".to_string())?;
    if protocol != PROTOCOL_VERSION {
        return Err(format!(
            "speaks protocol {protocol}, hyperjob speaks {PROTOCOL_VERSION}"
        ));
    }
    let kind = match hello.get("kind").and_then(Value::as_str) {
        Some("backend") => Kind::Backend,
        Some("transport") => Kind::Transport,
        _ => return Err("hello `kind` must be \"backend\" or \"transport\"".to_string()),
    };
    let text = |key: &str| {
        hello
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 64 && !s.chars().any(char::is_control))
            .map(str::to_string)
            .ok_or_else(|| format!("hello `{key}` must be a short non-empty string"))
    };
    Ok(Hello {
        kind,
        name: text("name")?,
        version: text("version")?,
        endpoint_kinds: hello_endpoint_kinds(hello)?,
    })
}

/// The hello's optional `endpoints` list (`["tcp", "unix"]`); TCP only without one.
fn hello_endpoint_kinds(hello: &Value) -> Result<Vec<EndpointKind>, String> {
    let Some(list) = hello.get("endpoints") else {
        return Ok(vec![EndpointKind::Tcp]);
    };
    let bad = || {
        format!(
            "hello `endpoints` must be a non-empty list of endpoint kinds ({})",
            EndpointKind::list(&EndpointKind::ALL)
        )
    };
    let names = list.as_array().filter(|l| !l.is_empty()).ok_or_else(bad)?;
    names
        .iter()
        .map(|name| {
            name.as_str()
                .and_then(EndpointKind::from_name)
                .ok_or_else(bad)
        })
        .collect()
}

/// One message from the plugin, as far as the host cares.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Result {
        id: u64,
        result: Value,
    },
    Error {
        id: u64,
        error: PluginError,
    },
    Stream {
        id: u64,
        stream: OutputStream,
        data: Vec<u8>,
    },
    Progress {
        message: String,
    },
}

/// Which output stream a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Parses one line from the plugin.
pub fn parse_incoming(line: &str) -> Result<Incoming, String> {
    let value: Value = serde_json::from_str(line)
        .map_err(|err| format!("sent a line that is not JSON ({err})"))?;
    if let Some(message) = value.get("progress").and_then(Value::as_str) {
        return Ok(Incoming::Progress {
            message: message.chars().filter(|c| !c.is_control()).collect(),
        });
    }
    let id = value
        .get("id")
        .and_then(Value::as_u64)
        .ok_or_else(|| "sent a message without a numeric `id`".to_string())?;
    if let Some(result) = value.get("result") {
        return Ok(Incoming::Result {
            id,
            result: result.clone(),
        });
    }
    if let Some(error) = value.get("error") {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("no message")
            .replace(['\n', '\r'], " ");
        let error = match error.get("class").and_then(Value::as_str) {
            Some("config") => PluginError::Config(message),
            Some("not_found") => PluginError::NotFound(message),
            Some("unsupported") => PluginError::Unsupported("this operation"),
            Some("system") => PluginError::msg(message),
            _ => return Err("sent an error without a known `class`".to_string()),
        };
        return Ok(Incoming::Error { id, error });
    }
    if let Some(stream) = value.get("stream").and_then(Value::as_str) {
        let stream = match stream {
            "stdout" => OutputStream::Stdout,
            "stderr" => OutputStream::Stderr,
            _ => return Err("sent a frame for an unknown stream".to_string()),
        };
        let data = value
            .get("data")
            .and_then(Value::as_str)
            .and_then(|data| base64::engine::general_purpose::STANDARD.decode(data).ok())
            .ok_or_else(|| "sent a stream frame without base64 `data`".to_string())?;
        return Ok(Incoming::Stream { id, stream, data });
    }
    Err("sent a message that is neither result, error, stream nor progress".to_string())
}

/// A running plugin process.
struct Connection {
    path: PathBuf,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Result<String, String>>,
    next_id: u64,
}

impl Connection {
    fn start(path: &Path, hello_timeout: Duration) -> Result<(Self, Hello), PluginError> {
        let mut child = Command::new(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|err| {
                PluginError::system(
                    format!("cannot start executable plugin {}", path.display()),
                    err,
                )
            })?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| PluginError::msg("the plugin's stdout is not a pipe"))?;
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            loop {
                let mut line = Vec::new();
                let read =
                    Read::take(&mut reader, MAX_LINE as u64 + 1).read_until(b'\n', &mut line);
                let message = match read {
                    Ok(0) => Err("exited (closed its stdout)".to_string()),
                    Ok(_) if line.len() > MAX_LINE => {
                        Err("sent a line longer than 4 MiB".to_string())
                    }
                    Ok(_) => String::from_utf8(line)
                        .map(|l| l.trim_end().to_string())
                        .map_err(|_| "sent a line that is not UTF-8".to_string()),
                    Err(err) => Err(format!("cannot be read: {err}")),
                };
                let end = message.is_err();
                if sender.send(message).is_err() || end {
                    return;
                }
            }
        });
        let mut connection = Self {
            path: path.to_path_buf(),
            child,
            stdin,
            lines,
            next_id: 1,
        };
        let hello = match connection.next_line(Instant::now() + hello_timeout) {
            Ok(line) => parse_hello(&line).map_err(|reason| connection.failure(&reason)),
            Err(err) => Err(err),
        };
        match hello {
            Ok(hello) => Ok((connection, hello)),
            Err(err) => {
                // No use waiting for a plugin that cannot even say hello.
                let _ = connection.child.kill();
                let _ = connection.child.wait();
                Err(err)
            }
        }
    }

    fn failure(&self, reason: &str) -> PluginError {
        PluginError::msg(format!(
            "executable plugin {} {reason}",
            self.path.display()
        ))
    }

    fn next_line(&mut self, deadline: Instant) -> Result<String, PluginError> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(wait) {
            Ok(Ok(line)) => Ok(line),
            Ok(Err(reason)) => Err(self.failure(&reason)),
            Err(RecvTimeoutError::Timeout) => Err(self.failure(&format!(
                "did not answer within {} s",
                wait.as_millis().div_ceil(1000).max(1)
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(self.failure("exited")),
        }
    }

    fn send(&mut self, message: &Value) -> Result<(), PluginError> {
        let mut line = message.to_string();
        line.push('\n');
        let path = self.path.display().to_string();
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| PluginError::msg(format!("executable plugin {path} is closed")))?;
        stdin
            .write_all(line.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|err| {
                PluginError::msg(format!("executable plugin {path} stopped reading ({err})"))
            })
    }

    /// Sends a request and waits for its answer, relaying stream frames and progress.
    fn call(
        &mut self,
        method: &str,
        params: Value,
        deadline: Instant,
        sink: &mut dyn FnMut(Incoming),
        cancel: Option<&AtomicBool>,
    ) -> Result<Value, PluginError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({ "id": id, "method": method, "params": params }))?;
        let mut cancel_sent = false;
        loop {
            if let Some(cancel) = cancel {
                if !cancel_sent && cancel.load(Ordering::Relaxed) {
                    cancel_sent = true;
                    self.send(&json!({ "method": "cancel", "params": { "id": id } }))?;
                }
            }
            let slice = if cancel.is_some() {
                deadline.min(Instant::now() + Duration::from_millis(200))
            } else {
                deadline
            };
            let line = match self.next_line(slice) {
                Ok(line) => line,
                Err(_) if Instant::now() < deadline && cancel.is_some() && self.alive() => continue,
                Err(err) => return Err(err),
            };
            match parse_incoming(&line).map_err(|reason| self.failure(&reason))? {
                Incoming::Result {
                    id: answered,
                    result,
                } if answered == id => return Ok(result),
                Incoming::Error {
                    id: answered,
                    error,
                } if answered == id => return Err(error),
                Incoming::Stream { id: answered, .. }
                | Incoming::Result { id: answered, .. }
                | Incoming::Error { id: answered, .. }
                    if answered != id =>
                {
                    return Err(
                        self.failure(&format!("answered request {answered}, but {id} was asked"))
                    );
                }
                other => sink(other),
            }
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Closing stdin asks the plugin to exit; one that lingers is ended by its pid.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plugin connection shared by the trait methods (which take `&self`).
struct Shared(Mutex<Connection>);

impl Shared {
    fn call(&self, method: &str, params: Value, timeout: Duration) -> Result<Value, PluginError> {
        self.call_with(method, params, Instant::now() + timeout, &mut |_| {}, None)
    }

    fn call_with(
        &self,
        method: &str,
        params: Value,
        deadline: Instant,
        sink: &mut dyn FnMut(Incoming),
        cancel: Option<&AtomicBool>,
    ) -> Result<Value, PluginError> {
        let mut connection = self
            .0
            .lock()
            .map_err(|_| PluginError::msg("executable plugin connection is poisoned"))?;
        connection.call(method, params, deadline, sink, cancel)
    }
}

/// Starts the executable and checks that its hello says what its file name says.
fn start_checked(
    path: &Path,
    kind: Kind,
    name: &str,
    hello_timeout: Duration,
) -> Result<(Connection, Hello), PluginError> {
    let (connection, hello) = Connection::start(path, hello_timeout)?;
    if hello.kind != kind || hello.name != name {
        return Err(connection.failure(&format!(
            "says it is {} {:?}, but its file name says {kind} {name:?}",
            hello.kind, hello.name
        )));
    }
    Ok((connection, hello))
}

fn connect_and_configure(
    path: &Path,
    kind: Kind,
    name: &str,
    ctx: &PluginContext,
    table: &toml::Table,
) -> Result<(Shared, Vec<EndpointKind>), PluginError> {
    let (connection, hello) = start_checked(path, kind, name, HELLO_TIMEOUT)?;
    let shared = Shared(Mutex::new(connection));
    let config = toml::to_string(table).map_err(|err| PluginError::Config(err.to_string()))?;
    shared.call(
        "configure",
        json!({
            "config": config,
            "state_dir": ctx.state_dir,
            "guest_keys": match ctx.guest_keys { GuestKeyMode::Pinned => "pinned", GuestKeyMode::PerJob => "per-job" },
        }),
        REQUEST_TIMEOUT,
    )?;
    Ok((shared, hello.endpoint_kinds))
}

fn endpoint_json(endpoint: &Endpoint) -> Value {
    serde_json::to_value(endpoint).unwrap_or(Value::Null)
}

fn remaining_ms(deadline: Instant) -> u64 {
    u64::try_from(
        deadline
            .saturating_duration_since(Instant::now())
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

fn field<'a>(value: &'a Value, key: &str, method: &str) -> Result<&'a Value, PluginError> {
    value.get(key).ok_or_else(|| {
        PluginError::msg(format!(
            "executable plugin answered `{method}` without `{key}`"
        ))
    })
}

/// One entry of a `list_owned` answer. `owner` is optional: a plugin (or a VM) from before
/// owners were recorded has none.
fn owned_vm(vm: &Value) -> Result<OwnedVm, PluginError> {
    let number = |key: &str| vm.get(key).and_then(Value::as_u64);
    let owner = match vm.get("owner") {
        None | Some(Value::Null) => None,
        Some(Value::String(owner)) => Some(owner.clone()),
        Some(_) => {
            return Err(PluginError::msg(
                "executable plugin listed a VM whose `owner` is not a string",
            ))
        }
    };
    match (
        vm.get("vm_name").and_then(Value::as_str),
        number("job_id"),
        number("created_unix"),
        number("deadline_unix"),
    ) {
        (Some(name), Some(job_id), Some(created), Some(deadline)) => Ok(OwnedVm {
            vm_name: name.to_string(),
            job_id,
            created_unix: created,
            deadline_unix: deadline,
            owner,
        }),
        _ => Err(PluginError::msg(
            "executable plugin listed a VM without name, job id, creation time or deadline",
        )),
    }
}

struct ExecBackend(Shared, Vec<EndpointKind>);

impl Backend for ExecBackend {
    fn endpoint_kinds(&self) -> Vec<EndpointKind> {
        self.1.clone()
    }

    fn create(&self, request: &VmRequest, progress: &dyn Progress) -> Result<(), PluginError> {
        let keys = request.keys.as_ref().map(|keys| {
            json!({
                "user": keys.user,
                "authorized_key": keys.authorized_key,
                "host_private_key": keys.host.private_openssh.expose(),
                "host_public_key": keys.host.public_openssh,
            })
        });
        let params = json!({
            "vm_name": request.vm_name,
            "job_id": request.job_id,
            "created_unix": request.created_unix,
            "deadline_unix": request.deadline_unix,
            "owner": request.owner,
            "keys": keys,
        });
        let mut sink = |incoming: Incoming| {
            if let Incoming::Progress { message } = incoming {
                progress.say(&message);
            }
        };
        self.0
            .call_with(
                "create",
                params,
                Instant::now() + REQUEST_TIMEOUT,
                &mut sink,
                None,
            )
            .map(drop)
    }

    fn wait_address(
        &self,
        vm_name: &str,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<Endpoint, PluginError> {
        let params = json!({ "vm_name": vm_name, "timeout_ms": remaining_ms(deadline) });
        let result = self.0.call_with(
            "wait_address",
            params,
            deadline + Duration::from_secs(5),
            &mut |_| {},
            Some(cancel),
        )?;
        serde_json::from_value(result).map_err(|err| {
            PluginError::msg(format!(
                "executable plugin answered `wait_address` with a bad endpoint ({err})"
            ))
        })
    }

    fn destroy(&self, vm_name: &str) -> Result<(), PluginError> {
        self.0
            .call("destroy", json!({ "vm_name": vm_name }), REQUEST_TIMEOUT)
            .map(drop)
    }

    fn list_owned(&self) -> Result<Vec<OwnedVm>, PluginError> {
        let result = self.0.call("list_owned", json!({}), REQUEST_TIMEOUT)?;
        let vms = field(&result, "vms", "list_owned")?
            .as_array()
            .ok_or_else(|| {
                PluginError::msg("executable plugin answered `list_owned` without a list")
            })?;
        vms.iter().map(owned_vm).collect()
    }

    fn console_tail(&self, vm_name: &str) -> Result<String, PluginError> {
        let result = self.0.call(
            "console_tail",
            json!({ "vm_name": vm_name }),
            REQUEST_TIMEOUT,
        )?;
        Ok(field(&result, "text", "console_tail")?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }
}

struct ExecTransport(Shared, Vec<EndpointKind>);

impl Transport for ExecTransport {
    fn endpoint_kinds(&self) -> Vec<EndpointKind> {
        self.1.clone()
    }

    fn ready_timeout(&self) -> Duration {
        self.0
            .call("ready_timeout", json!({}), REQUEST_TIMEOUT)
            .ok()
            .and_then(|result| result.get("secs").and_then(Value::as_u64))
            .map_or(Duration::from_secs(300), Duration::from_secs)
    }

    fn login_user(&self) -> Option<String> {
        self.0
            .call("login_user", json!({}), REQUEST_TIMEOUT)
            .ok()
            .and_then(|result| {
                result
                    .get("user")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
    }

    fn wait_ready(
        &self,
        endpoint: &Endpoint,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<(), PluginError> {
        let params =
            json!({ "endpoint": endpoint_json(endpoint), "timeout_ms": remaining_ms(deadline) });
        self.0
            .call_with(
                "wait_ready",
                params,
                deadline + Duration::from_secs(5),
                &mut |_| {},
                Some(cancel),
            )
            .map(drop)
    }

    fn run_script(
        &self,
        endpoint: &Endpoint,
        request: &ScriptRequest<'_>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<RemoteExit, PluginError> {
        let params = json!({
            "endpoint": endpoint_json(endpoint),
            "interpreter": request.interpreter,
            "script": base64::engine::general_purpose::STANDARD.encode(request.script),
        });
        let mut sink = |incoming: Incoming| {
            if let Incoming::Stream { stream, data, .. } = incoming {
                let out: &mut dyn Write = match stream {
                    OutputStream::Stdout => &mut *stdout,
                    OutputStream::Stderr => &mut *stderr,
                };
                let _ = out.write_all(&data);
                let _ = out.flush();
            }
        };
        // A script may run for hours: the job timeout bounds it, not us.
        let deadline = Instant::now() + Duration::from_secs(7 * 24 * 3600);
        let result = self.0.call_with(
            "run_script",
            params,
            deadline,
            &mut sink,
            Some(request.cancel),
        )?;
        if request.cancel.load(Ordering::Relaxed) {
            return Err(PluginError::Interrupted(
                "while the script was running".into(),
            ));
        }
        if let Some(signal) = result.get("signal").and_then(Value::as_str) {
            return Ok(RemoteExit::Signal(signal.to_string()));
        }
        result
            .get("exit_code")
            .and_then(Value::as_i64)
            .and_then(|code| i32::try_from(code).ok())
            .map(RemoteExit::Code)
            .ok_or_else(|| {
                PluginError::msg(
                    "executable plugin answered `run_script` without `exit_code` or `signal`",
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_hello_is_accepted() {
        let hello = parse_hello(
            r#"{"hello":{"protocol":1,"kind":"transport","name":"ssh-cli","version":"0.1.0"}}"#,
        )
        .expect("valid");

        assert_eq!(
            hello,
            Hello {
                kind: Kind::Transport,
                name: "ssh-cli".into(),
                version: "0.1.0".into(),
                endpoint_kinds: vec![EndpointKind::Tcp],
            }
        );
    }

    #[test]
    fn a_hello_may_declare_endpoint_kinds() {
        let hello = |endpoints: &str| {
            parse_hello(&format!(
                r#"{{"hello":{{"protocol":1,"kind":"backend","name":"b","version":"1"{endpoints}}}}}"#
            ))
        };
        assert_eq!(
            hello(r#","endpoints":["unix","tcp"]"#).map(|h| h.endpoint_kinds),
            Ok(vec![EndpointKind::Unix, EndpointKind::Tcp])
        );
        for bad in [
            r#","endpoints":[]"#,
            r#","endpoints":["udp"]"#,
            r#","endpoints":"tcp""#,
        ] {
            assert_eq!(
                hello(bad).map(|h| h.endpoint_kinds),
                Err("hello `endpoints` must be a non-empty list of endpoint kinds (tcp, unix, vsock)".into()),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_hello_with_another_protocol_version_names_both() {
        let err =
            parse_hello(r#"{"hello":{"protocol":2,"kind":"backend","name":"x","version":"1"}}"#)
                .expect_err("v2");

        assert_eq!(err, "speaks protocol 2, hyperjob speaks 1");
    }

    #[test]
    fn garbage_instead_of_a_hello_is_refused() {
        assert!(parse_hello("Traceback (most recent call last):")
            .expect_err("text")
            .starts_with("hello is not JSON"));
        assert_eq!(
            parse_hello(r#"{"id":1,"result":{}}"#).expect_err("no hello"),
            "the first message is not a hello"
        );
        assert!(parse_hello(
            r#"{"hello":{"protocol":1,"kind":"hypervisor","name":"x","version":"1"}}"#
        )
        .is_err());
        assert!(parse_hello(
            r#"{"hello":{"protocol":1,"kind":"backend","name":"a\nb","version":"1"}}"#
        )
        .is_err());
    }

    #[test]
    fn results_errors_streams_and_progress_are_told_apart() {
        assert_eq!(
            parse_incoming(r#"{"id":3,"result":{"ok":true}}"#).expect("result"),
            Incoming::Result {
                id: 3,
                result: json!({"ok": true})
            }
        );
        assert_eq!(
            parse_incoming(r#"{"id":4,"stream":"stderr","data":"aGk="}"#).expect("frame"),
            Incoming::Stream {
                id: 4,
                stream: OutputStream::Stderr,
                data: b"hi".to_vec()
            }
        );
        assert_eq!(
            parse_incoming(r#"{"progress":"booting"}"#).expect("progress"),
            Incoming::Progress {
                message: "booting".into()
            }
        );
        let Incoming::Error { id, error } =
            parse_incoming(r#"{"id":5,"error":{"class":"not_found","message":"no image\nhere"}}"#)
                .expect("error")
        else {
            panic!("not an error");
        };
        assert_eq!(id, 5);
        assert!(matches!(error, PluginError::NotFound(ref m) if m == "no image here"));
    }

    #[test]
    fn out_of_protocol_messages_are_refused_with_a_reason() {
        assert!(parse_incoming("not json")
            .expect_err("text")
            .starts_with("sent a line that is not JSON"));
        assert_eq!(
            parse_incoming(r#"{"result":{}}"#).expect_err("no id"),
            "sent a message without a numeric `id`"
        );
        assert_eq!(
            parse_incoming(r#"{"id":1,"error":{"class":"oops","message":"m"}}"#)
                .expect_err("class"),
            "sent an error without a known `class`"
        );
        assert_eq!(
            parse_incoming(r#"{"id":1,"stream":"stdout","data":"***"}"#).expect_err("b64"),
            "sent a stream frame without base64 `data`"
        );
        assert_eq!(
            parse_incoming(r#"{"id":1}"#).expect_err("empty"),
            "sent a message that is neither result, error, stream nor progress"
        );
    }

    #[test]
    fn listed_vms_carry_their_owner_when_the_plugin_reports_one() {
        let with = owned_vm(&json!({"vm_name": "hyperjob-job-1", "job_id": 1,
            "created_unix": 5, "deadline_unix": 9, "owner": "/var/lib/hyperjob"}))
        .expect("valid");
        let without = owned_vm(&json!({"vm_name": "hyperjob-job-2", "job_id": 2,
            "created_unix": 5, "deadline_unix": 9}))
        .expect("valid without an owner");

        assert_eq!(
            with,
            OwnedVm {
                vm_name: "hyperjob-job-1".into(),
                job_id: 1,
                created_unix: 5,
                deadline_unix: 9,
                owner: Some("/var/lib/hyperjob".into()),
            }
        );
        assert_eq!(without.owner, None);
        assert!(
            owned_vm(&json!({"vm_name": "x", "job_id": 1, "created_unix": 5,
            "deadline_unix": 9, "owner": 7}))
            .is_err()
        );
        assert!(owned_vm(&json!({"vm_name": "x", "job_id": 1, "created_unix": 5})).is_err());
    }
}
