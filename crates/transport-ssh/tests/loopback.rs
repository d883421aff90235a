//! The SSH transport against misbehaving servers on loopback: real sockets, real libssh2.

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use hyperjob_core::config::GuestKeyMode;
use hyperjob_core::{Endpoint, PluginError, Transport};
use hyperjob_transport_ssh::{SshConfig, SshTransport};

const HOST_KEY: &str =
    "* ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGh5cGVyam9iLXRlc3Qta2V5LTAxMjM0NTY3ODlhYmNk\n";

fn transport(dir: &tempfile::TempDir) -> SshTransport {
    let key = dir.path().join("id_ed25519");
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&key, "not used: the handshake never completes\n").expect("key");
    std::fs::write(&known_hosts, HOST_KEY).expect("known_hosts");
    let table: toml::Table = toml::from_str(&format!(
        "identity_file = {:?}\nknown_hosts = {:?}\nconnect_timeout_secs = 1\nready_timeout_secs = 3\n",
        key.display().to_string(),
        known_hosts.display().to_string()
    ))
    .expect("toml");
    SshTransport::new(SshConfig::from_table(&table, GuestKeyMode::Pinned).expect("config"))
        .expect("transport")
}

/// A server on loopback that runs `serve` for every connection it accepts.
fn server(serve: fn(std::net::TcpStream)) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || serve(stream));
        }
    });
    port
}

#[test]
fn port_that_accepts_tcp_but_never_speaks_ssh_times_out_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = transport(&dir);
    let port = server(|stream| {
        thread::sleep(Duration::from_secs(30));
        drop(stream);
    });
    let started = Instant::now();

    let err = transport
        .wait_ready(
            &Endpoint::new("127.0.0.1", Some(port)),
            started + Duration::from_secs(3),
            &AtomicBool::new(false),
        )
        .expect_err("a silent server is not ready");

    let message = err.to_string();
    assert!(matches!(err, PluginError::Timeout { .. }), "{message}");
    assert!(
        message.contains("SSH handshake with 127.0.0.1"),
        "{message}"
    );
    assert!(!message.contains('\n'), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn server_that_speaks_garbage_fails_the_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = transport(&dir);
    let port = server(|mut stream| {
        let _ = stream.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n");
        thread::sleep(Duration::from_secs(2));
    });
    let started = Instant::now();

    let err = transport
        .wait_ready(
            &Endpoint::new("127.0.0.1", Some(port)),
            started + Duration::from_secs(2),
            &AtomicBool::new(false),
        )
        .expect_err("not an SSH server");

    assert!(
        err.to_string().contains("SSH handshake with 127.0.0.1"),
        "{err}"
    );
}

/// A loopback port that refuses connections for as long as the returned socket lives: bound
/// by this test but never listening. Nobody else can bind or listen on it meanwhile (the socket
/// has no SO_REUSEADDR), so it stays closed however many tests run in parallel.
fn closed_port() -> (socket2::Socket, u16) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let port = socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet")
        .port();
    (socket, port)
}

#[test]
fn closed_port_times_out_naming_the_connection_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = transport(&dir);
    let (_held, port) = closed_port();
    let refused = std::net::TcpStream::connect(("127.0.0.1", port)).expect_err("closed");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let started = Instant::now();

    let err = transport
        .wait_ready(
            &Endpoint::new("127.0.0.1", Some(port)),
            started + Duration::from_secs(1),
            &AtomicBool::new(false),
        )
        .expect_err("nobody listens");

    assert!(matches!(err, PluginError::Timeout { .. }), "{err}");
    assert!(
        err.to_string().contains("TCP connection to 127.0.0.1"),
        "{err}"
    );
}

/// A server that accepts connections and never says anything; tells `accepted` of each.
fn silent_server(accepted: mpsc::Sender<()>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    thread::spawn(move || {
        let mut open = Vec::new();
        for stream in listener.incoming().flatten() {
            open.push(stream);
            if accepted.send(()).is_err() {
                return;
            }
        }
    });
    port
}

#[test]
fn cancel_stops_the_wait_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = transport(&dir);
    let (accepted, _) = mpsc::channel();
    let port = silent_server(accepted);
    let cancel = AtomicBool::new(true);
    let started = Instant::now();

    let err = transport
        .wait_ready(
            &Endpoint::new("127.0.0.1", Some(port)),
            started + Duration::from_secs(600),
            &cancel,
        )
        .expect_err("cancelled");

    assert!(matches!(err, PluginError::Interrupted(_)), "{err}");
    // Far below the 600 s deadline; generous for a loaded host.
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_cancel_arriving_during_the_wait_ends_it_soon_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = transport(&dir);
    let (accepted, connections) = mpsc::channel();
    let port = silent_server(accepted);
    let cancel = AtomicBool::new(false);
    let started = Instant::now();

    let (result, cancelled_at, returned_at) = thread::scope(|scope| {
        let cancel = &cancel;
        let canceller = scope.spawn(move || {
            // The wait is under way once the transport has connected to the server.
            connections
                .recv_timeout(Duration::from_secs(120))
                .expect("the transport connected");
            let at = Instant::now();
            cancel.store(true, Ordering::Relaxed);
            at
        });
        let result = transport.wait_ready(
            &Endpoint::new("127.0.0.1", Some(port)),
            started + Duration::from_secs(600),
            cancel,
        );
        let returned_at = Instant::now();
        (result, canceller.join().expect("canceller"), returned_at)
    });

    let err = result.expect_err("cancelled");
    assert!(matches!(err, PluginError::Interrupted(_)), "{err}");
    assert!(returned_at >= cancelled_at);
    // An SSH attempt runs for at most connect_timeout (1 s here) before the flag is looked at
    // again; the bound is generous for a loaded host and far below the 600 s deadline.
    assert!(
        returned_at - cancelled_at < Duration::from_secs(20),
        "took {:?} after the cancel",
        returned_at - cancelled_at
    );
}

fn script_request(cancel: &AtomicBool) -> hyperjob_core::ScriptRequest<'_> {
    hyperjob_core::ScriptRequest {
        interpreter: "sh",
        script: b"sleep 300\n",
        cancel,
    }
}

#[test]
fn a_run_stopped_before_it_started_does_not_even_connect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = transport(&dir);
    let (accepted, connections) = mpsc::channel();
    let port = silent_server(accepted);
    let cancel = AtomicBool::new(true);

    let err = transport
        .run_script(
            &Endpoint::new("127.0.0.1", Some(port)),
            &script_request(&cancel),
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .expect_err("cancelled");

    assert!(matches!(err, PluginError::Interrupted(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "interrupted before connecting; the script was not started"
    );
    assert!(connections.try_recv().is_err(), "it connected");
}

#[test]
fn a_run_stopped_during_the_handshake_is_interrupted_not_a_connection_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = transport(&dir);
    let (accepted, connections) = mpsc::channel();
    let port = silent_server(accepted);
    let cancel = AtomicBool::new(false);

    let result = thread::scope(|scope| {
        let cancel = &cancel;
        scope.spawn(move || {
            // The handshake is under way once the transport has connected.
            connections
                .recv_timeout(Duration::from_secs(120))
                .expect("the transport connected");
            cancel.store(true, Ordering::Relaxed);
        });
        transport.run_script(
            &Endpoint::new("127.0.0.1", Some(port)),
            &script_request(cancel),
            &mut Vec::new(),
            &mut Vec::new(),
        )
    });

    let err = result.expect_err("cancelled");
    assert!(matches!(err, PluginError::Interrupted(_)), "{err}");
    // The silent server never finishes the handshake (connect_timeout 1 s): either the stop
    // was seen right after connecting, or the handshake failed with the stop already asked.
    assert!(
        err.to_string().ends_with("; the script was not started"),
        "{err}"
    );
}

/// Over a UNIX socket the client sends nothing before the server's greeting: a server behind a
/// socket that outlives its sessions (a virtio-serial port) may still be finishing the last one.
#[test]
fn over_a_unix_socket_the_client_waits_for_the_greeting_before_it_speaks() {
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    let dir = tempfile::tempdir().expect("tempdir");
    let transport = transport(&dir);
    let path = dir.path().join("guest.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let mut early = [0u8; 64];
        let before = stream.read(&mut early).unwrap_or(0);
        // RFC 4253 lets a server send other lines before its version: they are skipped.
        stream
            .write_all(b"hyperjob vport-ssh: session over\r\n")
            .expect("notice");
        thread::sleep(Duration::from_millis(100));
        stream.write_all(b"SSH-2.0-test\r\n").expect("greet");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut banner = [0u8; 64];
        let after = stream.read(&mut banner).unwrap_or(0);
        tx.send((before, banner[..after].to_vec())).expect("send");
    });

    let err = transport
        .wait_ready(
            &Endpoint::unix(&path),
            Instant::now() + Duration::from_secs(2),
            &AtomicBool::new(false),
        )
        .expect_err("not a real SSH server");
    let (before, after) = rx.recv_timeout(Duration::from_secs(10)).expect("served");

    assert_eq!(before, 0, "the client spoke before the server");
    assert!(after.starts_with(b"SSH-2.0-"), "{after:?}");
    // The client got past the line before the version: the handshake failed only later.
    assert!(!err.to_string().contains("banner"), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("unix:{}", path.display())),
        "{err}"
    );
}

#[test]
fn a_unix_socket_that_never_greets_times_out_with_a_reason() {
    use std::os::unix::net::UnixListener;

    let dir = tempfile::tempdir().expect("tempdir");
    let transport = transport(&dir);
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(10).collect();
        thread::sleep(Duration::from_secs(30));
        drop(held);
    });

    let err = transport
        .run_script(
            &Endpoint::unix(&path),
            &hyperjob_core::ScriptRequest {
                interpreter: "sh",
                script: b"true",
                cancel: &AtomicBool::new(false),
            },
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .expect_err("silent");

    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "SSH handshake with unix:{} failed",
            path.display()
        )),
        "{message}"
    );
    assert!(!message.contains('\n'), "{message}");
}

#[test]
fn a_vsock_endpoint_is_refused_as_unsupported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = transport(&dir)
        .wait_ready(
            &Endpoint::vsock(3, 22),
            Instant::now() + Duration::from_secs(1),
            &AtomicBool::new(false),
        )
        .expect_err("vsock");
    assert_eq!(
        err.to_string(),
        "vsock endpoints are not supported by the ssh transport"
    );
}
