//! End-to-end: jobs cannot reach each other (README "Network isolation"). Two concurrent jobs
//! of two installations on the same libvirt network; the first job's script, as root in its
//! VM, tries to open TCP connections to the second guest's SSH port (on the link, and routed
//! through the host) and to take over its address (the address on its own interface plus
//! gratuitous ARP); then the second job's next stage runs and must reach its own VM. The same
//! attack against guests without `isolate` and `nwfilter` shows that it is real: there it
//! connects, and the second job's next stage runs in the attacker's VM.
//! Run with scripts/test.sh, which provides the namespaced test environment.

mod support;

use std::process::Command;
use std::time::Duration;

use hyperjob_test_harness::{
    run_job, ExecutorSession, Job, JobResult, RunnerSettings, Stage, Step,
};
use support::{configured_session, session_log, unique_job_id, vm_name, TestEnv, Workspace};

/// The file in which a job's VM says whose it is (read by the victim's second stage).
const OWNER_FILE: &str = "/tmp/hyperjob-owner";

/// The job's own output line that starts with `prefix`, without the prefix. The runner echoes
/// every command first (`$ echo …`), so only lines the commands printed start with it.
fn output(log: &str, prefix: &str) -> Option<String> {
    log.lines()
        .find_map(|line| line.strip_prefix(prefix))
        .map(|rest| rest.trim().to_string())
}

fn expect_output(log: &str, prefix: &str) -> String {
    output(log, prefix).unwrap_or_else(|| panic!("no line {prefix:?} in the job log:\n{log}"))
}

/// Runs `stage`, which must succeed, and returns the whole job log afterwards.
fn run_stage(session: &ExecutorSession, stage: &Stage) -> String {
    let invocation = session
        .run_stage(stage)
        .unwrap_or_else(|err| panic!("{stage:?}: {err:?}\n{}", session_log(session)))
        .unwrap_or_else(|| panic!("{stage:?} was not invoked"));
    let log = session_log(session);
    assert!(
        invocation.succeeded(),
        "{stage:?} failed: {:?}\n{log}",
        invocation.error
    );
    log
}

fn run_step(session: &ExecutorSession, name: &str) -> String {
    run_stage(session, &Stage::UserStep(name.into()))
}

/// The jobs' sessions, cleaned up (VMs destroyed) however the test ends.
struct Sessions(Vec<ExecutorSession>);

impl Sessions {
    /// Adds a session for `job` and brings its VM up (prepare, get_sources).
    fn start(&mut self, env: &TestEnv, ws: &Workspace, job: &Job) -> usize {
        self.0.push(configured_session(env, ws, job));
        let session = self.0.last().expect("just added");
        session
            .prepare()
            .unwrap_or_else(|err| panic!("prepare: {err:?}\n{}", session_log(session)));
        run_stage(session, &Stage::GetSources);
        self.0.len() - 1
    }
}

impl Drop for Sessions {
    fn drop(&mut self) {
        for session in self.0.drain(..).rev() {
            session.cleanup();
        }
    }
}

/// The default config; without protection, with `isolate = false` and `nwfilter = ""`.
fn config(ws: &Workspace, protected: bool) -> String {
    let config = ws.default_config();
    if protected {
        return config;
    }
    // The control shows the network attack as it is: every stage connects anew (with the
    // job's relay, the victim's next stage would ride on a connection made before the attack,
    // and fail when the takeover resets it, or run in the attacker's VM once the relay
    // connects again).
    config
        .replacen(
            "[backends.libvirt]\n",
            "[backends.libvirt]\nisolate = false\nnwfilter = \"\"\n",
            1,
        )
        .replacen("[transports.ssh]\n", "[transports.ssh]\nrelay = false\n", 1)
}

/// The attacker's config: its job runs as root in its VM, as a job does whenever the image runs
/// jobs as root. The test image has no sudo, so the kernel command line starts a shell as PID 1
/// that authorises the test key for root before it hands over to the image's init.
fn attacker_config(env: &TestEnv, ws: &Workspace, protected: bool) -> String {
    let root_login = format!(
        "init=/bin/sh -- -c \"mkdir -p /root/.ssh; cp /home/{user}/.ssh/authorized_keys /root/.ssh/; exec /etc/hyperjob/init\"",
        user = env.guest_user
    );
    let config = config(ws, protected);
    let cmdline = format!("cmdline = \"{}\"", env.cmdline);
    let user = format!("user = \"{}\"", env.guest_user);
    assert!(
        config.contains(&cmdline) && config.contains(&user),
        "{config}"
    );
    config
        .replace(
            &cmdline,
            &format!("cmdline = '{} {root_login}'", env.cmdline),
        )
        .replace(&user, "user = \"root\"")
}

/// The attacker's script against the guest at `victim_ip`. Every attempt prints one line:
/// `<what> rc=<nc's exit status> <what nc printed>` (an SSH banner shortened to `ssh-banner`).
/// The control attempt, to the host's own DNS port, shows that `nc` and the network work, so a
/// failure of the others is the isolation, not the test.
fn attack_script(env: &TestEnv, attacker_id: i64, victim_ip: &str) -> Vec<String> {
    let user = &env.guest_user;
    let gateway = &env.bridge_ip;
    vec![
        format!("V={victim_ip}; GW={gateway}"),
        "umask 022".to_string(),
        // Whose VM a stage runs in; and the project dir the victim's next stage would enter,
        // made the victim user's (the two jobs have the same CI_PROJECT_DIR).
        format!("echo attacker-{attacker_id} > {OWNER_FILE}"),
        format!("chown -R {user}:{user} \"$CI_BUILDS_DIR\""),
        "echo \"attacker-mac $(cat /sys/class/net/eth0/address)\"".to_string(),
        // (The runner's scripts stop at the first failing command: `|| rc=$?` keeps going.)
        "probe() { rc=0; echo | busybox nc -w 5 \"$2\" \"$3\" >/tmp/probe 2>&1 || rc=$?; out=$(tr -d '\\000' </tmp/probe); case \"$out\" in *SSH-*) out=ssh-banner ;; esac; echo \"$1 rc=$rc $(echo $out)\"; }".to_string(),
        "probe control-gateway-dns \"$GW\" 53".to_string(),
        "probe onlink-ssh \"$V\" 22".to_string(),
        // Through the host: the host forwards between guests of its network.
        "busybox ip route add \"$V/32\" via \"$GW\" dev eth0".to_string(),
        "probe routed-ssh \"$V\" 22".to_string(),
        "busybox ip route del \"$V/32\" via \"$GW\" dev eth0".to_string(),
        // Take over the address: on our interface, announced by gratuitous ARP (request and
        // reply forms). It stays while the victim's next stage runs.
        "busybox ip addr add \"$V/32\" dev eth0".to_string(),
        "busybox arping -U -c 3 -I eth0 -s \"$V\" \"$V\" || true".to_string(),
        "busybox arping -A -c 3 -I eth0 -s \"$V\" \"$V\" || true".to_string(),
        "echo \"claimed $(busybox ip -4 -o addr show dev eth0 | grep -c \"inet $V/32\")\"".to_string(),
    ]
}

/// The host's neighbour entry for `ip` (read in the test namespace, as hyperjob sees it).
fn host_neighbour(ip: &str) -> String {
    let output = Command::new("ip")
        .args(["neigh", "show", ip])
        .output()
        .expect("run ip neigh");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// What happened.
#[derive(Debug)]
struct Outcome {
    victim_mac: String,
    attacker_mac: String,
    control: String,
    onlink: String,
    routed: String,
    claimed: String,
    neighbour: String,
    /// `<owner> <mac>` of the VM the victim's second stage ran in.
    victim_next_stage: String,
}

/// Victim up and marked; attacker up, attacks; victim's next stage; both cleaned up.
fn attack(name: &str, protected: bool) -> Outcome {
    let env = TestEnv::load();
    let victim_ws = env.workspace(&format!("{name}-victim"));
    let attacker_ws = env.workspace(&format!("{name}-attacker"));
    victim_ws.write_config(&config(&victim_ws, protected));
    attacker_ws.write_config(&attacker_config(&env, &attacker_ws, protected));
    let victim_id = unique_job_id();
    let attacker_id = unique_job_id();

    let mut victim_job = support::job_without_sources(
        victim_id,
        "group/net",
        &[
            &format!("echo victim-{victim_id} > {OWNER_FILE}"),
            "echo \"victim-mac $(cat /sys/class/net/eth0/address)\"",
            "set -- $(busybox ip -4 -o addr show dev eth0); echo \"victim-ip ${4%/*}\"",
        ],
    );
    victim_job.steps.push(Step::new(
        "check",
        &[&format!(
            "echo \"stage-ran-on $(cat {OWNER_FILE}) $(cat /sys/class/net/eth0/address)\""
        )],
    ));
    let mut sessions = Sessions(Vec::new());
    let victim = sessions.start(&env, &victim_ws, &victim_job);
    let log = run_step(&sessions.0[victim], "script");
    let victim_ip = expect_output(&log, "victim-ip ");
    let victim_mac = expect_output(&log, "victim-mac ");

    let script = attack_script(&env, attacker_id, &victim_ip);
    let script: Vec<&str> = script.iter().map(String::as_str).collect();
    let attacker_job: Job = support::job_without_sources(attacker_id, "group/net", &script);
    let attacker = sessions.start(&env, &attacker_ws, &attacker_job);
    let attack_log = run_step(&sessions.0[attacker], "script");
    println!("{name}: attacker's job log:\n{attack_log}");
    let neighbour = host_neighbour(&victim_ip);

    let check_log = run_step(&sessions.0[victim], "check");
    let outcome = Outcome {
        victim_mac,
        attacker_mac: expect_output(&attack_log, "attacker-mac "),
        control: expect_output(&attack_log, "control-gateway-dns "),
        onlink: expect_output(&attack_log, "onlink-ssh "),
        routed: expect_output(&attack_log, "routed-ssh "),
        claimed: expect_output(&attack_log, "claimed "),
        neighbour,
        victim_next_stage: expect_output(&check_log, "stage-ran-on "),
    };
    println!("{name}: {outcome:#?}");

    drop(sessions);
    attacker_ws.assert_nothing_left(&vm_name(attacker_id));
    victim_ws.assert_nothing_left(&vm_name(victim_id));
    outcome
}

#[test]
fn a_job_cannot_reach_or_take_over_another_jobs_vm() {
    let outcome = attack("isolated", true);

    assert!(
        outcome.control.starts_with("rc=0"),
        "the control connection failed: {outcome:#?}"
    );
    assert_eq!(
        outcome.claimed, "1",
        "the attacker holds the address: {outcome:#?}"
    );
    assert!(
        !outcome.onlink.starts_with("rc=0") && !outcome.onlink.contains("ssh-banner"),
        "{outcome:#?}"
    );
    assert!(
        !outcome.routed.starts_with("rc=0") && !outcome.routed.contains("ssh-banner"),
        "{outcome:#?}"
    );
    assert!(
        outcome.neighbour.contains(&outcome.victim_mac),
        "the host's neighbour entry moved: {outcome:#?}"
    );
    let victim_id = outcome
        .victim_next_stage
        .split_whitespace()
        .next()
        .unwrap_or_default();
    assert!(
        victim_id.starts_with("victim-")
            && outcome.victim_next_stage.ends_with(&outcome.victim_mac),
        "the victim's next stage ran elsewhere: {outcome:#?}"
    );
}

#[test]
fn without_isolation_the_same_attack_takes_over_the_other_jobs_vm() {
    let outcome = attack("unprotected", false);

    assert!(outcome.control.starts_with("rc=0"), "{outcome:#?}");
    assert!(
        outcome.onlink.starts_with("rc=0") && outcome.onlink.contains("ssh-banner"),
        "{outcome:#?}"
    );
    assert!(
        outcome.neighbour.contains(&outcome.attacker_mac),
        "the host's neighbour entry did not move: {outcome:#?}"
    );
    assert!(
        outcome.victim_next_stage.starts_with("attacker-")
            && outcome.victim_next_stage.ends_with(&outcome.attacker_mac),
        "the victim's next stage did not run in the attacker's VM: {outcome:#?}"
    );
}

#[test]
fn a_missing_nwfilter_fails_prepare_with_its_name_before_anything_is_created() {
    let env = TestEnv::load();
    let ws = env.workspace("nwfilter-missing");
    ws.write_config(&ws.default_config().replacen(
        "[backends.libvirt]\n",
        "[backends.libvirt]\nnwfilter = \"hyperjob-no-such-filter\"\n",
        1,
    ));
    let id = unique_job_id();
    let job = support::job_without_sources(id, "group/net", &["echo never runs"]);
    let settings = RunnerSettings {
        preparation_retry_interval: Duration::from_millis(200),
        ..RunnerSettings::default()
    };

    let report = run_job(&support::hyperjob_driver(&env, &ws), &job, &settings);

    let log = report.log_text();
    assert!(
        matches!(report.result, JobResult::SystemFailure { .. }),
        "{:?}\n{log}",
        report.result
    );
    let line = log
        .lines()
        .find(|line| line.contains("nwfilter \"hyperjob-no-such-filter\" cannot be used"))
        .unwrap_or_else(|| panic!("no nwfilter error in the log:\n{log}"));
    println!("{line}");
    assert!(line.contains("nwfilter = \"\""), "{line}");
    assert!(!log.contains("Overlay "), "something was created: {log}");
    assert!(!log.contains("never runs\n"), "{log}");
    ws.assert_nothing_left(&vm_name(id));
}
