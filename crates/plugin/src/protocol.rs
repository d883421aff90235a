//! The executable plugin protocol's messages (version 2, docs/plugin-protocol.md), shared by
//! the host side ([`super`]) and the plugin side ([`super::serve`]): negotiation, the hello and
//! its capabilities, requests, answers, frames, and the JSON forms of the plugin types.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::context::Kind;
use crate::endpoint::EndpointKind;
use crate::plugin::{Check, OwnedVm, PluginError, VmPresence};

/// The oldest protocol version this hyperjob speaks (version 1 plugins are refused).
pub const PROTOCOL_MIN: u64 = 2;
/// The newest protocol version this hyperjob speaks.
pub const PROTOCOL_MAX: u64 = 2;
/// Environment variables in which the host states the range it speaks; the plugin picks.
pub const ENV_PROTOCOL_MIN: &str = "HYPERJOB_PROTOCOL_MIN";
/// See [`ENV_PROTOCOL_MIN`].
pub const ENV_PROTOCOL_MAX: &str = "HYPERJOB_PROTOCOL_MAX";
/// Longest line either side accepts.
pub const MAX_LINE: usize = 4 << 20;
/// Most payload bytes in one frame (base64 makes 1 MiB of it 1.4 MiB of line).
pub const FRAME_BYTES: usize = 1 << 20;

/// What a plugin may declare besides the required methods. A backend: `per_job_keys` (its
/// `create` puts the job's keys into the guest), and the optional methods it answers
/// (`list_owned`, `inspect`, `names_with_files`, `halt`, `relabel`, `fingerprint`,
/// `console_tail`, `doctor`). A transport: `per_job_keys` (it logs in as `login_user` with
/// the endpoint's key and host key) and `doctor`. Unknown names are ignored.
pub const BACKEND_CAPABILITIES: &[&str] = &[
    "per_job_keys",
    "list_owned",
    "inspect",
    "names_with_files",
    "halt",
    "relabel",
    "fingerprint",
    "console_tail",
    "doctor",
];
/// See [`BACKEND_CAPABILITIES`].
pub const TRANSPORT_CAPABILITIES: &[&str] = &["per_job_keys", "doctor"];

/// What a plugin says first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The protocol version the plugin picked from the host's range.
    pub protocol: u64,
    /// What the plugin provides.
    pub kind: Kind,
    /// The name the config file selects it by.
    pub name: String,
    /// The plugin's own version.
    pub version: String,
    /// The known capabilities it declared.
    pub capabilities: Vec<String>,
    /// `endpoints`: the kinds of endpoint a backend hands out or a transport reaches (absent
    /// from the hello: TCP only).
    pub endpoint_kinds: Vec<EndpointKind>,
}

impl Hello {
    /// Whether the plugin declared `capability`.
    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }

    /// The hello line's JSON.
    pub fn to_json(&self) -> Value {
        json!({ "hello": {
            "protocol": self.protocol,
            "kind": self.kind.to_string(),
            "name": self.name,
            "version": self.version,
            "capabilities": self.capabilities,
            "endpoints": self.endpoint_kinds.iter().map(|kind| kind.name()).collect::<Vec<_>>(),
        }})
    }
}

/// Parses the hello line of a plugin the host offered `min..=max`; every deviation is a reason.
pub fn parse_hello(line: &str, min: u64, max: u64) -> Result<Hello, String> {
    let value: Value =
        serde_json::from_str(line).map_err(|err| format!("hello is not JSON ({err})"))?;
    let hello = value
        .get("hello")
        .ok_or_else(|| "the first message is not a hello".to_string())?;
    let protocol = hello
        .get("protocol")
        .and_then(Value::as_u64)
        .ok_or_else(|| "hello has no protocol version".to_string())?;
    if !(min..=max).contains(&protocol) {
        let speaks = if min == max {
            format!("{min}")
        } else {
            format!("{min} to {max}")
        };
        return Err(format!(
            "speaks protocol {protocol}, hyperjob speaks {speaks} (see docs/plugin-protocol.md)"
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
    let known = match kind {
        Kind::Backend => BACKEND_CAPABILITIES,
        Kind::Transport => TRANSPORT_CAPABILITIES,
    };
    let capabilities = match hello.get("capabilities") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => {
            let mut names = Vec::new();
            for entry in list {
                let name = entry
                    .as_str()
                    .ok_or_else(|| "hello `capabilities` must be a list of strings".to_string())?;
                if known.contains(&name) && !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
            names
        }
        Some(_) => return Err("hello `capabilities` must be a list of strings".to_string()),
    };
    Ok(Hello {
        protocol,
        kind,
        name: text("name")?,
        version: text("version")?,
        capabilities,
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

/// The protocol version a plugin that speaks `min..=max` picks when the host offers the range
/// in `host_min`/`host_max` (absent: the host speaks [`PROTOCOL_MAX`]): the newest both speak,
/// or else the plugin's newest (the host then refuses it, naming both).
pub fn pick_version(host_min: Option<&str>, host_max: Option<&str>, min: u64, max: u64) -> u64 {
    let host_min = host_min
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(PROTOCOL_MAX);
    let host_max = host_max
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(host_min);
    let top = max.min(host_max);
    if top >= min.max(host_min) {
        top
    } else {
        max
    }
}

/// Which output stream a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// The script's standard output.
    Stdout,
    /// The script's standard error.
    Stderr,
}

impl OutputStream {
    /// The stream's name on the wire (`stdout`, `stderr`).
    pub fn name(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

/// One message from the plugin, as far as the host cares.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    /// Request `id` succeeded with `result`.
    Result {
        /// The request's id.
        id: u64,
        /// What the method returned.
        result: Value,
    },
    /// Request `id` failed.
    Error {
        /// The request's id.
        id: u64,
        /// The failure, with its class.
        error: PluginError,
    },
    /// Output of request `id`'s script.
    Stream {
        /// The request's id.
        id: u64,
        /// Which stream.
        stream: OutputStream,
        /// The bytes, decoded.
        data: Vec<u8>,
    },
    /// A progress line for the job log.
    Progress {
        /// The line, without control characters.
        message: String,
    },
}

fn decode(data: Option<&Value>) -> Option<Vec<u8>> {
    data.and_then(Value::as_str)
        .and_then(|data| base64::engine::general_purpose::STANDARD.decode(data).ok())
}

/// Base64 of `bytes` (RFC 4648, padded).
pub fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
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
        let error = error_from_json(error)
            .ok_or_else(|| "sent an error without a known `class`".to_string())?;
        return Ok(Incoming::Error { id, error });
    }
    if let Some(stream) = value.get("stream").and_then(Value::as_str) {
        let stream = match stream {
            "stdout" => OutputStream::Stdout,
            "stderr" => OutputStream::Stderr,
            _ => return Err("sent a frame for an unknown stream".to_string()),
        };
        let data = decode(value.get("data"))
            .ok_or_else(|| "sent a stream frame without base64 `data`".to_string())?;
        return Ok(Incoming::Stream { id, stream, data });
    }
    Err("sent a message that is neither result, error, stream nor progress".to_string())
}

/// One message from the host, as the plugin sees it.
#[derive(Debug, PartialEq)]
pub enum HostMessage {
    /// Call `method` with `params`; answer with the same `id`.
    Request {
        /// The request's id.
        id: u64,
        /// The method's name.
        method: String,
        /// Its parameters (a JSON object).
        params: Value,
    },
    /// Stop request `id`.
    Cancel {
        /// The request to stop.
        id: u64,
    },
    /// A frame of request `id`'s input (`run_script`'s script).
    Stdin {
        /// The request the input belongs to.
        id: u64,
        /// The bytes, decoded.
        data: Vec<u8>,
    },
}

/// Parses one line from the host.
pub fn parse_host_message(line: &str) -> Result<HostMessage, String> {
    let value: Value =
        serde_json::from_str(line).map_err(|err| format!("a line that is not JSON ({err})"))?;
    let id = value.get("id").and_then(Value::as_u64);
    let method = value.get("method").and_then(Value::as_str);
    match (id, method) {
        (Some(id), Some(method)) => Ok(HostMessage::Request {
            id,
            method: method.to_string(),
            params: value.get("params").cloned().unwrap_or_else(|| json!({})),
        }),
        (None, Some("cancel")) => value
            .pointer("/params/id")
            .and_then(Value::as_u64)
            .map(|id| HostMessage::Cancel { id })
            .ok_or_else(|| "a cancel without `params.id`".to_string()),
        (Some(id), None) if value.get("stream").and_then(Value::as_str) == Some("stdin") => {
            decode(value.get("data"))
                .map(|data| HostMessage::Stdin { id, data })
                .ok_or_else(|| "a stdin frame without base64 `data`".to_string())
        }
        _ => Err("a message that is neither request, cancel nor stdin frame".to_string()),
    }
}

/// The lines of `id`'s frames of `stream` (`stdin`, `stdout`, `stderr`) carrying `bytes`, at
/// most [`FRAME_BYTES`] each; none for no bytes.
pub fn frames<'a>(id: u64, stream: &'a str, bytes: &'a [u8]) -> impl Iterator<Item = String> + 'a {
    bytes
        .chunks(FRAME_BYTES)
        .map(move |chunk| json!({ "id": id, "stream": stream, "data": encode(chunk) }).to_string())
}

/// The error object of an answer.
pub fn error_json(error: &PluginError) -> Value {
    let class = match error {
        PluginError::Config(_) => "config",
        PluginError::NotFound(_) => "not_found",
        PluginError::Unsupported(_) => "unsupported",
        PluginError::Interrupted(_) => "interrupted",
        _ => "system",
    };
    let message = match error {
        PluginError::Interrupted(what) => what.clone(),
        other => other.to_string(),
    };
    json!({ "class": class, "message": message.replace(['\n', '\r'], " ") })
}

/// The error an error object stands for; `None` for an unknown class.
pub fn error_from_json(error: &Value) -> Option<PluginError> {
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("no message")
        .replace(['\n', '\r'], " ");
    Some(match error.get("class").and_then(Value::as_str)? {
        "config" => PluginError::Config(message),
        "not_found" => PluginError::NotFound(message),
        "unsupported" => PluginError::Unsupported("this operation"),
        "interrupted" => PluginError::Interrupted(message),
        "system" => PluginError::msg(message),
        _ => return None,
    })
}

/// The JSON of an ownership record.
pub fn owned_vm_json(vm: &OwnedVm) -> Value {
    json!({
        "vm_name": vm.vm_name,
        "job_id": vm.job_id,
        "created_unix": vm.created_unix,
        "deadline_unix": vm.deadline_unix,
        "owner": vm.owner,
    })
}

/// One ownership record (a `list_owned` entry, `inspect`'s `vm`, `relabel`'s `vm`). `owner`
/// is optional: a VM from before owners were recorded has none.
pub fn owned_vm(vm: &Value) -> Result<OwnedVm, String> {
    let number = |key: &str| vm.get(key).and_then(Value::as_u64);
    let owner = match vm.get("owner") {
        None | Some(Value::Null) => None,
        Some(Value::String(owner)) => Some(owner.clone()),
        Some(_) => return Err("a VM record whose `owner` is not a string".to_string()),
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
        _ => Err("a VM record without name, job id, creation time or deadline".to_string()),
    }
}

/// `inspect`'s answer.
pub fn presence_json(presence: &VmPresence) -> Value {
    match presence {
        VmPresence::Absent => json!({ "presence": "absent" }),
        VmPresence::Owned(vm) => json!({ "presence": "owned", "vm": owned_vm_json(vm) }),
        VmPresence::Unrecognised(reason) => {
            json!({ "presence": "unrecognised", "reason": reason })
        }
    }
}

/// Reads `inspect`'s answer.
pub fn presence(value: &Value) -> Result<VmPresence, String> {
    match value.get("presence").and_then(Value::as_str) {
        Some("absent") => Ok(VmPresence::Absent),
        Some("owned") => owned_vm(value.get("vm").unwrap_or(&Value::Null)).map(VmPresence::Owned),
        Some("unrecognised") => Ok(VmPresence::Unrecognised(
            value
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
                .to_string(),
        )),
        _ => Err("`presence` is not absent, owned or unrecognised".to_string()),
    }
}

/// `doctor`'s answer.
pub fn checks_json(checks: &[Check]) -> Value {
    let checks: Vec<Value> = checks
        .iter()
        .map(|c| json!({ "ok": c.ok, "what": c.what, "fix": c.fix }))
        .collect();
    json!({ "checks": checks })
}

/// Reads `doctor`'s answer.
pub fn checks(value: &Value) -> Result<Vec<Check>, String> {
    let list = value
        .get("checks")
        .and_then(Value::as_array)
        .ok_or_else(|| "no `checks` list".to_string())?;
    list.iter()
        .map(|check| {
            let what = check
                .get("what")
                .and_then(Value::as_str)
                .ok_or_else(|| "a check without `what`".to_string())?;
            Ok(Check {
                ok: check.get("ok").and_then(Value::as_bool).unwrap_or(false),
                what: what.to_string(),
                fix: check.get("fix").and_then(Value::as_str).map(str::to_string),
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;
