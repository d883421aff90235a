//! serve() driven with the host's lines, its output read back as the host would.

use std::io::Cursor;

use super::*;
use crate::plugin::{Endpoint, OwnedVm};
use crate::protocol::{parse_hello, parse_incoming, Incoming, OutputStream};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Echo;

impl Transport for Echo {
    fn ready_timeout(&self) -> Duration {
        Duration::from_secs(42)
    }

    fn wait_ready(
        &self,
        _: &Endpoint,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<(), PluginError> {
        while Instant::now() < deadline {
            if cancel.load(Ordering::Relaxed) {
                return Err(PluginError::Interrupted("waiting for the echo".into()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(PluginError::msg("the cancel never came"))
    }

    fn run_script(
        &self,
        endpoint: &Endpoint,
        request: &ScriptRequest<'_>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<RemoteExit, PluginError> {
        for chunk in request.script.chunks(100_000) {
            stdout
                .write_all(chunk)
                .map_err(|e| PluginError::system("write", e))?;
        }
        write!(stderr, "{} via {}", request.interpreter, endpoint.address)
            .map_err(|e| PluginError::system("write", e))?;
        Ok(RemoteExit::Code(3))
    }
}

fn build_echo(ctx: &PluginContext, config: &str) -> Result<Box<dyn Transport>, PluginError> {
    if config.contains("bad") {
        return Err(PluginError::Config("unknown field `bad`".into()));
    }
    assert_eq!(ctx.guest_keys, GuestKeyMode::PerJob);
    Ok(Box::new(Echo))
}

/// Serves `plugin` the `lines` and returns what it wrote, line by line.
fn served(plugin: Served, lines: &[String]) -> Vec<String> {
    let input = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    let output = Captured::default();
    serve_on(plugin, Cursor::new(input.into_bytes()), output.clone()).expect("served");
    let bytes = output.0.lock().expect("lock").clone();
    String::from_utf8(bytes)
        .expect("utf-8")
        .lines()
        .map(str::to_string)
        .collect()
}

fn request(id: u64, method: &str, params: Value) -> String {
    json!({ "id": id, "method": method, "params": params }).to_string()
}

fn answer(lines: &[String], id: u64) -> Incoming {
    lines
        .iter()
        .skip(1)
        .map(|l| parse_incoming(l).expect("protocol"))
        .find(|m| matches!(m, Incoming::Result { id: i, .. } | Incoming::Error { id: i, .. } if *i == id))
        .expect("answered")
}

#[test]
fn a_served_transport_takes_its_script_in_frames_streams_output_and_honours_cancel() {
    let script: Vec<u8> = (0..3_000_000u32)
        .map(|i| b"abcdefgh\n"[(i % 9) as usize])
        .collect();
    let endpoint = json!({"host": "192.0.2.7", "port": null});
    let mut lines = vec![
        request(
            1,
            "configure",
            json!({"config": "", "state_dir": "/s", "guest_keys": "per-job"}),
        ),
        request(
            2,
            "run_script",
            json!({"endpoint": endpoint, "interpreter": "bash", "script_len": script.len()}),
        ),
    ];
    lines.extend(frames(2, "stdin", &script));
    lines.push(request(
        3,
        "wait_ready",
        json!({"endpoint": endpoint, "timeout_ms": 10_000}),
    ));
    lines.push(json!({"method": "cancel", "params": {"id": 3}}).to_string());
    lines.push(request(4, "teleport", json!({})));
    lines.push(request(5, "ready_timeout", json!({})));

    let out = served(
        Served::transport("echo", "9.9", &["per_job_keys"], build_echo),
        &lines,
    );

    let hello = parse_hello(&out[0], PROTOCOL_MIN, PROTOCOL_MAX).expect("hello");
    assert_eq!(
        (hello.kind, hello.name.as_str(), hello.version.as_str()),
        (Kind::Transport, "echo", "9.9")
    );
    assert_eq!(hello.capabilities, ["per_job_keys"]);
    assert_eq!(
        answer(&out, 1),
        Incoming::Result {
            id: 1,
            result: json!({})
        }
    );
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    for line in &out[1..] {
        if let Incoming::Stream {
            id: 2,
            stream,
            data,
        } = parse_incoming(line).expect("protocol")
        {
            match stream {
                OutputStream::Stdout => stdout.extend(data),
                OutputStream::Stderr => stderr.extend(data),
            }
        }
    }
    assert!(out.iter().all(|l| l.len() < MAX_LINE));
    assert_eq!(stdout, script);
    assert_eq!(stderr, b"bash via 192.0.2.7");
    assert_eq!(
        answer(&out, 2),
        Incoming::Result {
            id: 2,
            result: json!({"exit_code": 3})
        }
    );
    assert_eq!(
        answer(&out, 3),
        Incoming::Error {
            id: 3,
            error: PluginError::Interrupted("waiting for the echo".into())
        }
    );
    assert!(matches!(
        answer(&out, 4),
        Incoming::Error {
            error: PluginError::Unsupported(_),
            ..
        }
    ));
    assert_eq!(
        answer(&out, 5),
        Incoming::Result {
            id: 5,
            result: json!({"secs": 42})
        }
    );
}

#[test]
fn a_served_plugin_reports_a_bad_table_and_refuses_work_before_configure() {
    let lines = [
        request(1, "ready_timeout", json!({})),
        request(
            2,
            "configure",
            json!({"config": "bad = 1", "guest_keys": "per-job"}),
        ),
    ];

    let out = served(Served::transport("echo", "1", &[], build_echo), &lines);

    assert_eq!(
        answer(&out, 1),
        Incoming::Error {
            id: 1,
            error: PluginError::msg("not configured")
        }
    );
    assert!(matches!(
        answer(&out, 2),
        Incoming::Error { error: PluginError::Config(ref m), .. } if m == "unknown field `bad`"
    ));
}

/// Records what it is asked and lists one VM.
struct Recorder;

impl Backend for Recorder {
    fn create(
        &self,
        request: &VmRequest,
        progress: &dyn Progress,
        deadline: Instant,
        _: &AtomicBool,
    ) -> Result<(), PluginError> {
        let keys = request.keys.as_ref().expect("keys");
        progress.say(&format!(
            "creating {} for {} with {} (host key {}), {} s left",
            request.vm_name,
            request.owner,
            keys.user,
            keys.host.private_openssh.expose(),
            deadline
                .saturating_duration_since(Instant::now())
                .as_secs()
                .div_ceil(10)
                * 10
        ));
        Ok(())
    }

    fn wait_address(
        &self,
        vm_name: &str,
        _: Instant,
        _: &AtomicBool,
    ) -> Result<Endpoint, PluginError> {
        Ok(Endpoint::new(format!("{vm_name}.example"), Some(2222)))
    }

    fn destroy(&self, _: &str) -> Result<(), PluginError> {
        Ok(())
    }

    fn list_owned(&self) -> Result<Vec<OwnedVm>, PluginError> {
        Ok(vec![OwnedVm {
            vm_name: "v".into(),
            job_id: 7,
            created_unix: 1,
            deadline_unix: 2,
            owner: None,
        }])
    }
}

fn build_recorder(_: &PluginContext, _: &str) -> Result<Box<dyn Backend>, PluginError> {
    Ok(Box::new(Recorder))
}

#[test]
fn a_served_backend_creates_with_keys_and_progress_and_lists_its_vms() {
    let keys = json!({"user": "ci", "authorized_key": "ssh-ed25519 A", "host_private_key": "PRIV",
        "host_public_key": "ssh-ed25519 H"});
    let lines = [
        request(
            1,
            "configure",
            json!({"config": "", "guest_keys": "pinned"}),
        ),
        request(
            2,
            "create",
            json!({"vm_name": "v", "job_id": 7, "created_unix": 1,
            "deadline_unix": 2, "owner": "/o", "keys": keys, "timeout_ms": 60_000}),
        ),
        request(
            3,
            "wait_address",
            json!({"vm_name": "v", "timeout_ms": 1000}),
        ),
        request(4, "list_owned", json!({})),
        request(5, "halt", json!({"vm_name": "v"})),
    ];

    let out = served(
        Served::backend("rec", "1", &["list_owned"], build_recorder),
        &lines,
    );

    assert!(
        out.contains(
            &json!({"progress": "creating v for /o with ci (host key PRIV), 60 s left"})
                .to_string()
        ),
        "{out:?}"
    );
    assert_eq!(
        answer(&out, 2),
        Incoming::Result {
            id: 2,
            result: json!({})
        }
    );
    assert_eq!(
        answer(&out, 3),
        Incoming::Result {
            id: 3,
            result: json!({"host": "v.example", "port": 2222})
        }
    );
    assert_eq!(
        answer(&out, 4),
        Incoming::Result {
            id: 4,
            result: json!({"vms": [{"vm_name": "v", "job_id": 7,
            "created_unix": 1, "deadline_unix": 2, "owner": null}]})
        }
    );
    assert!(matches!(
        answer(&out, 5),
        Incoming::Error {
            error: PluginError::Unsupported(_),
            ..
        }
    ));
}
