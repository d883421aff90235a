//! The bare boot: the lower bound a cold `prepare` is measured against. The very domain hyperjob
//! would create (its domain XML builder, the workspace's `[backends.libvirt]` table, a slot MAC
//! of its own so the DHCP lease is reused as hyperjob's is), created directly through libvirt,
//! the network's leases read every 50 ms, then a TCP connection attempt started every 50 ms and
//! an SSH login (libssh2, host key compared, `true`) over the first that gets through, until a
//! login succeeds. No hyperjob process is involved, and the probes cost next to no CPU (an
//! OpenSSH client started every 50 ms took enough CPU on two cores to slow the guest it waited
//! for, and a handshake per connection swamped the guest once a dozen got through at once).

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use hyperjob_backend_libvirt::network::{self, current_lease, FilterRef, MacPool, Nic};
use hyperjob_backend_libvirt::{nic, xml, LibvirtConfig};
use hyperjob_image_tools::overlay;
use virt::connect::Connect;

use crate::support::TestEnv;

const PROBE_INTERVAL: Duration = Duration::from_millis(50);
const TIMEOUT: Duration = Duration::from_secs(180);

/// When the guest's lease appeared, the first TCP connection got through and the first login
/// succeeded, after the start.
#[derive(Debug, Clone, Copy)]
pub struct BareBoot {
    pub address: Duration,
    pub connected: Duration,
    pub ready: Duration,
}

/// Boots one bare domain named `name` with the libvirt table of the hyperjob config at
/// `config_path`, and removes it again.
pub fn boot(env: &TestEnv, config_path: &Path, name: &str) -> BareBoot {
    let text = std::fs::read_to_string(config_path).expect("read the bench config");
    let table: toml::Table = toml::from_str(&text).expect("parse the bench config");
    let libvirt = table["backends"]["libvirt"]
        .as_table()
        .expect("[backends.libvirt]");
    let config = LibvirtConfig::from_table(libvirt).expect("libvirt config");
    let conn = Connect::open(Some(&config.uri)).expect("connect to libvirt");
    let net = conn
        .lookup_network_by_name(&config.network)
        .expect("the network");
    let mac = MacPool::new("hyperjob-bench", "bare-boot", 1).mac(0);
    let before = nic::dhcp_leases(&net, mac).expect("leases");
    let overlay_path = config.images_dir.join(format!("{name}.qcow2"));
    let console_log = config.images_dir.join(format!("{name}.console.log"));
    let nvram = config.images_dir.join(format!("{name}.nvram.fd"));
    let spec = xml::DomainSpec {
        name,
        domain_type: config.domain_type,
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        overlay: &overlay_path,
        nic: Nic {
            mac: Some(mac),
            isolated: config.isolate,
            filter: config.nwfilter.as_ref().map(|filter| FilterRef {
                name: filter.clone(),
                dhcp_server: net
                    .xml_desc(0)
                    .ok()
                    .and_then(|xml| network::dhcp_server(&xml)),
            }),
            ..Nic::plain(&config.network)
        },
        direct_boot: config.direct_boot.as_ref(),
        machine: &config.machine,
        nvram: &nvram,
        console_log: &console_log,
        seed: None,
        job_id: 1,
        created_unix: 0,
        deadline_unix: 0,
        owner: "hyperjob-bench bare boot",
    };
    let domain_xml = xml::domain_xml(&spec);

    let started = Instant::now();
    overlay::create(&config.base_image, &overlay_path).expect("overlay");
    let domain = conn
        .create_domain_xml(&domain_xml, 0)
        .expect("create the bare domain");
    let ip = loop {
        let leases = nic::dhcp_leases(&net, mac).unwrap_or_default();
        if let Some(lease) = current_lease(&leases, &before) {
            break lease.ip.clone();
        }
        assert!(started.elapsed() < TIMEOUT, "bare boot: no lease");
        std::thread::sleep(PROBE_INTERVAL);
    };
    let address = started.elapsed();
    let (connected, ready) = first_login(env, &ip, started);

    let _ = domain.destroy();
    for file in [&overlay_path, &console_log, &nvram] {
        let _ = std::fs::remove_file(file);
    }
    BareBoot {
        address,
        connected,
        ready,
    }
}

/// Starts a TCP connection attempt every 50 ms, each in its own thread; the first connection
/// that gets through is used for the login (libssh2, the guest's host key compared with
/// `known_hosts`, `true` run), later ones are closed at once (a dozen SSH handshakes at once
/// would swamp the emulated guest). If that login fails, probing goes on. The time after
/// `started` of the first connection and of the first login that succeeded.
fn first_login(env: &TestEnv, ip: &str, started: Instant) -> (Duration, Duration) {
    let addr: SocketAddr = format!("{ip}:22").parse().expect("guest address");
    let host_key = pinned_host_key(&env.known_hosts);
    let (tx, rx) = mpsc::channel::<TcpStream>();
    let taken = Arc::new(AtomicBool::new(false));
    let mut next = Instant::now();
    let mut connected = None;
    loop {
        if Instant::now() >= next {
            let (tx, taken) = (tx.clone(), Arc::clone(&taken));
            std::thread::spawn(move || {
                if let Ok(tcp) = TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
                    if !taken.swap(true, Ordering::SeqCst) {
                        let _ = tx.send(tcp);
                    }
                }
            });
            next += PROBE_INTERVAL;
        }
        let wait = next.saturating_duration_since(Instant::now());
        if let Ok(tcp) = rx.recv_timeout(wait) {
            let at = *connected.get_or_insert_with(|| started.elapsed());
            if login(env, tcp, &host_key).is_ok() {
                return (at, started.elapsed());
            }
            taken.store(false, Ordering::SeqCst);
        }
        assert!(started.elapsed() < TIMEOUT, "bare boot: no SSH login");
    }
}

/// The login over a connection: handshake, check the host key, log in, run `true`.
fn login(env: &TestEnv, tcp: TcpStream, host_key: &[u8]) -> Result<(), String> {
    // As any SSH client does: no Nagle delay on the handshake's small packets.
    let _ = tcp.set_nodelay(true);
    let mut session = ssh2::Session::new().map_err(|e| e.to_string())?;
    session.set_tcp_stream(tcp);
    session.set_timeout(10_000);
    session.handshake().map_err(|e| e.to_string())?;
    match session.host_key() {
        Some((key, _)) if key == host_key => {}
        _ => return Err("unexpected host key".to_string()),
    }
    session
        .userauth_pubkey_file(&env.guest_user, None, &env.identity_file, None)
        .map_err(|e| e.to_string())?;
    let mut channel = session.channel_session().map_err(|e| e.to_string())?;
    channel.exec("true").map_err(|e| e.to_string())?;
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut channel, &mut sink);
    channel.wait_close().map_err(|e| e.to_string())?;
    match channel.exit_status() {
        Ok(0) => Ok(()),
        other => Err(format!("true exited with {other:?}")),
    }
}

/// The key blob of the first `* TYPE BASE64` line of `known_hosts`.
fn pinned_host_key(known_hosts: &Path) -> Vec<u8> {
    use base64::Engine as _;
    let text = std::fs::read_to_string(known_hosts).expect("read known_hosts");
    let encoded = text
        .lines()
        .find_map(|line| line.split_whitespace().nth(2))
        .expect("a key in known_hosts");
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64 key")
}
