//! The bare boot: the lower bound a cold `prepare` is measured against. The very domain hyperjob
//! would create (its domain XML builder, the workspace's `[backends.libvirt]` table, a slot MAC
//! of its own so the DHCP lease is reused as hyperjob's is), created directly through libvirt,
//! the network's leases read every 50 ms, then an OpenSSH login (`ssh … true`, host key checked)
//! started every 50 ms until one succeeds. No hyperjob process is involved.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyperjob_backend_libvirt::network::{self, current_lease, FilterRef, MacPool, Nic};
use hyperjob_backend_libvirt::{nic, overlay, xml, LibvirtConfig};
use virt::connect::Connect;

use crate::support::TestEnv;

const PROBE_INTERVAL: Duration = Duration::from_millis(50);
const TIMEOUT: Duration = Duration::from_secs(180);

/// When the guest's lease appeared and when the first login succeeded, after the start.
#[derive(Debug, Clone, Copy)]
pub struct BareBoot {
    pub address: Duration,
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
    let ready = first_login(env, &ip, started);

    let _ = domain.destroy();
    for file in [&overlay_path, &console_log, &nvram] {
        let _ = std::fs::remove_file(file);
    }
    BareBoot { address, ready }
}

/// Starts `ssh … true` every 50 ms until one exits 0; the time of that exit after `started`.
fn first_login(env: &TestEnv, ip: &str, started: Instant) -> Duration {
    let mut probes: Vec<Child> = Vec::new();
    let mut next = Instant::now();
    let ready = loop {
        if Instant::now() >= next {
            probes.push(ssh_probe(env, ip));
            next += PROBE_INTERVAL;
        }
        let mut done = None;
        probes.retain_mut(|child| match child.try_wait() {
            Ok(Some(status)) => {
                if status.success() {
                    done = Some(started.elapsed());
                }
                false
            }
            Ok(None) => true,
            Err(_) => false,
        });
        if let Some(ready) = done {
            break ready;
        }
        assert!(started.elapsed() < TIMEOUT, "bare boot: no SSH login");
        std::thread::sleep(Duration::from_millis(5));
    };
    for mut child in probes {
        let _ = child.kill();
        let _ = child.wait();
    }
    ready
}

fn ssh_probe(env: &TestEnv, ip: &str) -> Child {
    Command::new("ssh")
        .arg("-i")
        .arg(&env.identity_file)
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", env.known_hosts.display()))
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=QUIET",
        ])
        .arg(format!("{}@{ip}", env.guest_user))
        .arg("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ssh")
}
