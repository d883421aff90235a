//! The SSH transport against misbehaving servers on loopback: real sockets, real libssh2.

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
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

#[test]
fn closed_port_times_out_naming_the_connection_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = transport(&dir);
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let started = Instant::now();

    let err = transport
        .wait_ready(
            &Endpoint::new("127.0.0.1", Some(port)),
            started + Duration::from_secs(1),
            &AtomicBool::new(false),
        )
        .expect_err("nobody listens");

    assert!(
        err.to_string().contains("TCP connection to 127.0.0.1"),
        "{err}"
    );
}

#[test]
fn cancel_stops_the_wait_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = transport(&dir);
    let port = server(|stream| {
        thread::sleep(Duration::from_secs(30));
        drop(stream);
    });
    let cancel = AtomicBool::new(true);
    let started = Instant::now();

    let err = transport
        .wait_ready(
            &Endpoint::new("127.0.0.1", Some(port)),
            started + Duration::from_secs(30),
            &cancel,
        )
        .expect_err("cancelled");

    assert!(matches!(err, PluginError::Interrupted(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
