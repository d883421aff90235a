//! An executable transport, as a [`Transport`] to hyperjob.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::connection::CallOptions;
use super::protocol::{checks, Incoming, OutputStream};
use super::{bad_answer, cancellable, interrupted, remaining_ms, Shared, OVERRUN, WRITE_TIMEOUT};
use crate::plugin::{Check, Endpoint, PluginError, RemoteExit, ScriptRequest, Transport};

/// How long a script may run as far as the protocol is concerned: the job timeout bounds it
/// (the runner then cancels the job, and the plugin gets [`super::GRACE`] to stop).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

pub(super) struct ExecTransport(pub(super) Shared);

fn endpoint_json(endpoint: &Endpoint) -> Value {
    serde_json::to_value(endpoint).unwrap_or(Value::Null)
}

impl Transport for ExecTransport {
    fn endpoint_kinds(&self) -> Vec<crate::EndpointKind> {
        self.0.hello.endpoint_kinds.clone()
    }

    fn ready_timeout(&self) -> Duration {
        self.0
            .call("ready_timeout", json!({}))
            .ok()
            .and_then(|result| result.get("secs").and_then(Value::as_u64))
            .map_or(Duration::from_secs(300), Duration::from_secs)
    }

    fn login_user(&self) -> Option<String> {
        if !self.0.hello.has("per_job_keys") {
            return None;
        }
        self.0
            .call("login_user", json!({}))
            .ok()
            .and_then(|result| {
                result
                    .get("user")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
    }

    fn doctor(&self) -> Vec<Check> {
        if !self.0.hello.has("doctor") {
            return Vec::new();
        }
        self.0
            .call("doctor", json!({}))
            .and_then(|result| checks(&result).map_err(|reason| bad_answer("doctor", &reason)))
            .unwrap_or_else(|err| vec![Check::fail("the transport's own checks", err.to_string())])
    }

    fn wait_ready(
        &self,
        endpoint: &Endpoint,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<(), PluginError> {
        let params =
            json!({ "endpoint": endpoint_json(endpoint), "timeout_ms": remaining_ms(deadline) });
        let result = self.0.call_with(
            "wait_ready",
            params,
            &cancellable(deadline + OVERRUN, cancel),
            &mut |_| {},
        );
        interrupted(cancel, "while waiting for the guest")?;
        result.map(drop)
    }

    fn run_script(
        &self,
        endpoint: &Endpoint,
        request: &ScriptRequest<'_>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<RemoteExit, PluginError> {
        // The script follows the request in stdin frames: no size limit from the line cap.
        let params = json!({
            "endpoint": endpoint_json(endpoint),
            "interpreter": request.interpreter,
            "script_len": request.script.len(),
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
        let options = CallOptions {
            deadline: Instant::now() + SCRIPT_TIMEOUT,
            cancel: Some(request.cancel),
            input: Some(request.script),
            write_timeout: WRITE_TIMEOUT,
        };
        let result = self.0.call_with("run_script", params, &options, &mut sink);
        interrupted(request.cancel, "while the script was running")?;
        let result = result?;
        if let Some(signal) = result.get("signal").and_then(Value::as_str) {
            return Ok(RemoteExit::Signal(signal.to_string()));
        }
        result
            .get("exit_code")
            .and_then(Value::as_i64)
            .and_then(|code| i32::try_from(code).ok())
            .map(RemoteExit::Code)
            .ok_or_else(|| bad_answer("run_script", "neither `exit_code` nor `signal`"))
    }
}
