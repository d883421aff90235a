//! End-to-end: DHCP leases are reused (README "Network isolation" › DHCP leases). Jobs of one
//! installation, one after another and then two at once, on the test network: every VM gets
//! the MAC of the lowest free job slot, the guest's DHCP client (busybox udhcpc: client id
//! `01:<MAC>`) gets the slot's lease back, and the network holds one lease per slot used, not
//! one per job. A guest whose client identifies by a DUID (the stock guest's systemd-networkd,
//! with a new machine id per VM) gets a new address on the same MAC: hyperjob must wait for
//! that lease and not take the previous job's. Run with scripts/test.sh, which provides the
//! namespaced test environment.

mod support;

use std::collections::BTreeSet;
use std::thread;

use hyperjob_test_harness::{run_job, JobReport, JobResult, RunnerSettings};
use support::{unique_job_id, virsh, vm_name, TestEnv, Workspace};

const SEQUENTIAL_JOBS: usize = 5;

/// What one job saw: the slot and MAC hyperjob chose, the guest's MAC and address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Nic {
    slot: String,
    mac: String,
    guest_mac: String,
    address: String,
}

fn run(env: &TestEnv, ws: &Workspace, settings: &RunnerSettings) -> (i64, JobReport) {
    let id = unique_job_id();
    let job = support::job_without_sources(
        id,
        "group/leases",
        &[
            // iproute2 in the stock guest, busybox in the test guest.
            "ipcmd() { if command -v ip >/dev/null; then ip \"$@\"; else busybox ip \"$@\"; fi; }",
            "set -- $(ipcmd -4 -o addr show dev eth0); echo \"guest-nic $(cat /sys/class/net/eth0/address) ${4%/*}\"",
        ],
    );
    let report = run_job(&support::hyperjob_driver(env, ws), &job, settings);
    (id, report)
}

/// The job's NIC, from hyperjob's progress line and the guest's own output.
fn nic_of(report: &JobReport) -> Nic {
    let log = report.log_text();
    assert_eq!(report.result, JobResult::Success, "{log}");
    // "Network slot 0: MAC 02:…"
    let (slot, mac) = log
        .lines()
        .find_map(|line| line.split("Network slot ").nth(1)?.split_once(": MAC "))
        .unwrap_or_else(|| panic!("no network slot in the log:\n{log}"));
    let guest = log
        .lines()
        .find_map(|line| line.strip_prefix("guest-nic "))
        .unwrap_or_else(|| panic!("no guest-nic line:\n{log}"));
    let (guest_mac, address) = guest.split_once(' ').expect("mac and address");
    // The address hyperjob waited for and connected to is the guest's own.
    assert!(
        log.contains(&format!("Guest address {} after", address.trim())),
        "{log}"
    );
    Nic {
        slot: slot.trim().to_string(),
        mac: mac.trim().to_string(),
        guest_mac: guest_mac.to_string(),
        address: address.trim().to_string(),
    }
}

/// The network's leases for `mac`: one `(address, client id)` per lease.
fn leases_of(env: &TestEnv, mac: &str) -> Vec<String> {
    virsh(
        &env.libvirt_uri,
        &["net-dhcp-leases", &env.network, "--mac", mac],
    )
    .lines()
    .filter(|line| line.contains(mac))
    .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
    .collect()
}

#[test]
fn jobs_reuse_their_slots_mac_and_lease() {
    let env = TestEnv::load();
    let ws = env.workspace("leases");

    let mut nics = Vec::new();
    for _ in 0..SEQUENTIAL_JOBS {
        let (id, report) = run(&env, &ws, &RunnerSettings::default());
        nics.push(nic_of(&report));
        ws.assert_nothing_left(&vm_name(id));
    }
    // Two at once: the second prepare finds slot 0 taken and takes slot 1.
    let parallel: Vec<(i64, JobReport)> = thread::scope(|scope| {
        let handles: Vec<_> = (0..2u32)
            .map(|concurrent_id| {
                let (env, ws) = (&env, &ws);
                scope.spawn(move || {
                    let mut settings = RunnerSettings::default();
                    settings.identity.concurrent_id = concurrent_id;
                    run(env, ws, &settings)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("job thread"))
            .collect()
    });
    let parallel_nics: Vec<Nic> = parallel.iter().map(|(_, r)| nic_of(r)).collect();
    for (id, _) in &parallel {
        ws.assert_nothing_left(&vm_name(*id));
    }

    println!("sequential jobs: {nics:#?}\nparallel jobs: {parallel_nics:#?}");
    for nic in nics.iter().chain(&parallel_nics) {
        assert_eq!(
            nic.mac, nic.guest_mac,
            "the guest has its slot's MAC: {nic:?}"
        );
        assert!(nic.mac.starts_with("02:"), "locally administered: {nic:?}");
    }
    let first = &nics[0];
    assert_eq!(first.slot, "0");
    for nic in &nics {
        assert_eq!(
            nic, first,
            "one after another, every job gets slot 0 and its lease"
        );
    }
    let slots: BTreeSet<&str> = parallel_nics.iter().map(|n| n.slot.as_str()).collect();
    assert_eq!(slots, BTreeSet::from(["0", "1"]), "{parallel_nics:#?}");
    let slot0 = parallel_nics
        .iter()
        .find(|n| n.slot == "0")
        .expect("slot 0");
    assert_eq!(slot0, first, "slot 0 kept its MAC and address");
    let slot1 = parallel_nics
        .iter()
        .find(|n| n.slot == "1")
        .expect("slot 1");
    assert_ne!(slot1.mac, first.mac);
    assert_ne!(slot1.address, first.address);

    let macs: BTreeSet<&str> = nics
        .iter()
        .chain(&parallel_nics)
        .map(|n| n.mac.as_str())
        .collect();
    let addresses: BTreeSet<&str> = nics
        .iter()
        .chain(&parallel_nics)
        .map(|n| n.address.as_str())
        .collect();
    let leases: Vec<String> = macs.iter().flat_map(|mac| leases_of(&env, mac)).collect();
    println!(
        "lease figure: {} jobs used {} MACs, {} addresses and hold {} leases: {leases:#?}",
        nics.len() + parallel_nics.len(),
        macs.len(),
        addresses.len(),
        leases.len()
    );
    assert_eq!(macs.len(), 2);
    assert_eq!(addresses.len(), 2);
    assert_eq!(leases.len(), 2, "one lease per slot: {leases:#?}");
}

#[test]
fn a_duid_guest_gets_a_new_address_on_its_slot_and_hyperjob_waits_for_it() {
    let env = TestEnv::load();
    let ws = env.workspace("leases-duid");
    ws.write_config(&ws.stock_config());

    let (first_id, first) = run(&env, &ws, &RunnerSettings::default());
    let first = nic_of(&first);
    ws.assert_nothing_left(&vm_name(first_id));
    let (second_id, second) = run(&env, &ws, &RunnerSettings::default());
    let second = nic_of(&second);
    ws.assert_nothing_left(&vm_name(second_id));

    let leases = leases_of(&env, &first.mac);
    println!("DUID guest: {first:?} then {second:?}; leases of the MAC: {leases:#?}");
    assert_eq!((first.slot.as_str(), second.slot.as_str()), ("0", "0"));
    assert_eq!(first.mac, second.mac);
    // The first job's lease outlives its VM: a new machine id, a new DUID, a new address.
    assert_ne!(first.address, second.address);
    assert_eq!(leases.len(), 2, "{leases:#?}");
    for lease in &leases {
        let client_id = lease.rsplit(' ').next().unwrap_or_default();
        assert!(
            client_id.starts_with("ff:"),
            "an RFC 4361 client id (IAID + DUID), not 01:<MAC>: {lease}"
        );
    }
}
