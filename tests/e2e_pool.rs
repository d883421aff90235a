//! End-to-end warm pool: `hyperjob pool fill | status | drain`, prepare claiming a pooled VM
//! (each exactly once, also when prepares race), the replacement booted in the background, a
//! prepare SIGKILLed in the middle of a claim, a pool drained when the base image changes, and
//! gc of VMs idle too long. Real binary, real libvirtd, real TCG guests; run with
//! scripts/test.sh.

mod support;

use std::time::{Duration, Instant};

use hyperjob_test_harness::{ExitInfo, Job};
use support::{
    configured_session, domain_exists, hyperjob_ok, job_without_sources, recorded_state,
    run_sources_and_script, session_log, unique_job_id, virsh, wait_until, TestEnv, Workspace,
};

/// Generous bounds: four TCG guests may share the two cores of a test machine.
const BOOT_WAIT: Duration = Duration::from_secs(300);
const SIGKILL: i32 = 9;

fn job(id: i64) -> Job {
    job_without_sources(id, "group/pool", &["echo stage-ran-in-$(hostname)"])
}

/// The workspace's config with a `[pool]` table and VM names of its own (`<tag>-…`), so the
/// tests of this file, which run at once, never see each other's pooled VMs.
fn with_pool(ws: &Workspace, tag: &str, base: &str, pool: &str) {
    ws.write_config(&format!(
        "name_prefix = \"{tag}-\"\n{base}\n[pool]\n{pool}\n"
    ));
}

/// Pooled VMs of the workspace and their state, from `pool status`.
fn pooled(env: &TestEnv, ws: &Workspace) -> Vec<(String, String)> {
    hyperjob_ok(env, ws, &["pool", "status"])
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect()
}

fn ready_count(env: &TestEnv, ws: &Workspace) -> usize {
    pooled(env, ws).iter().filter(|(_, s)| s == "ready").count()
}

/// Waits until `count` pooled VMs are ready and no boot is under way (the background refill
/// a claim started has finished).
fn wait_for_ready(env: &TestEnv, ws: &Workspace, count: usize) {
    wait_until("the pool to be refilled", BOOT_WAIT, || {
        let vms = pooled(env, ws);
        vms.iter().filter(|(_, s)| s == "ready").count() == count
            && !vms.iter().any(|(_, s)| s == "booting")
    });
}

/// The VM job `id`'s state names.
fn job_vm(ws: &Workspace, id: i64) -> String {
    recorded_state(ws, id).expect("state")["vm_name"]
        .as_str()
        .expect("vm_name")
        .to_string()
}

/// Drains the pool and checks that nothing of the workspace is left.
fn drain_and_check(env: &TestEnv, ws: &Workspace, tag: &str) {
    let report = hyperjob_ok(env, ws, &["pool", "drain"]);
    println!("{report}");
    assert!(pooled(env, ws).is_empty());
    ws.assert_nothing_left(&format!("{tag}-pool-"));
}

#[test]
fn prepare_claims_a_pooled_vm_at_once_and_a_replacement_boots_in_the_background() {
    let env = TestEnv::load();
    let ws = env.workspace("pool-claim");
    with_pool(&ws, "claim", &ws.default_config(), "size = 1");

    let filled = Instant::now();
    let report = hyperjob_ok(&env, &ws, &["pool", "fill"]);
    println!(
        "pool fill of 1 VM took {:.1} s:\n{report}",
        filled.elapsed().as_secs_f64()
    );
    let before = pooled(&env, &ws);
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].1, "ready");
    let id = unique_job_id();
    let session = configured_session(&env, &ws, &job(id));
    let started = Instant::now();
    session.prepare().expect("prepare");
    let warm = started.elapsed();

    println!(
        "warm prepare (through the harness) took {:.2} s",
        warm.as_secs_f64()
    );
    let log = session_log(&session);
    assert!(log.contains("Claimed the pooled VM"), "{log}");
    assert_eq!(job_vm(&ws, id), before[0].0);
    assert_eq!(recorded_state(&ws, id).expect("state")["phase"], "ready");
    run_sources_and_script(&session);
    // The replacement was started by the claim, and prepare did not wait for it.
    wait_for_ready(&env, &ws, 1);
    let after = pooled(&env, &ws);
    assert_ne!(after[0].0, before[0].0, "the claimed VM is still pooled");
    // The claimed VM is the job's now: gc keeps it, cleanup removes it.
    let report = hyperjob_ok(&env, &ws, &["gc"]);
    assert!(!report.contains("removed"), "{report}");
    session.cleanup();
    ws.wait_for_teardown();
    assert!(!domain_exists(&env.libvirt_uri, &before[0].0));
    drain_and_check(&env, &ws, "claim");
}

#[test]
fn racing_prepares_never_claim_the_same_pooled_vm() {
    let env = TestEnv::load();
    let ws = env.workspace("pool-race");
    with_pool(&ws, "race", &ws.default_config(), "size = 2");
    hyperjob_ok(&env, &ws, &["pool", "fill"]);
    let pool_before: Vec<String> = pooled(&env, &ws).into_iter().map(|(vm, _)| vm).collect();
    assert_eq!(pool_before.len(), 2);

    let ids = [unique_job_id(), unique_job_id(), unique_job_id()];
    let sessions: Vec<_> = ids
        .iter()
        .map(|id| configured_session(&env, &ws, &job(*id)))
        .collect();
    let running: Vec<_> = sessions
        .iter()
        .map(|session| session.spawn_prepare().expect("start prepare"))
        .collect();
    for (invocation, session) in running.into_iter().map(|r| r.wait()).zip(&sessions) {
        assert!(invocation.succeeded(), "{}", session_log(session));
    }

    let vms: Vec<String> = ids.iter().map(|id| job_vm(&ws, *id)).collect();
    println!("three racing prepares got {vms:?} from the pool {pool_before:?}");
    let mut distinct = vms.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "two jobs share a VM: {vms:?}");
    let claimed = vms.iter().filter(|vm| pool_before.contains(vm)).count();
    assert_eq!(claimed, 2, "{vms:?}");
    for session in &sessions {
        run_sources_and_script(session);
    }
    wait_for_ready(&env, &ws, 2);
    for session in &sessions {
        session.cleanup();
    }
    ws.wait_for_teardown();
    for vm in &vms {
        assert!(!domain_exists(&env.libvirt_uri, vm));
    }
    drain_and_check(&env, &ws, "race");
}

#[test]
fn a_prepare_killed_in_the_middle_of_a_claim_leaves_nothing_after_gc() {
    let env = TestEnv::load();
    let ws = env.workspace("pool-kill");
    with_pool(&ws, "kill", &ws.default_config(), "size = 1");
    hyperjob_ok(&env, &ws, &["pool", "fill"]);
    let (vm, _) = pooled(&env, &ws).remove(0);
    // A suspended guest holds the claim in its login check until the test kills prepare.
    virsh(&env.libvirt_uri, &["suspend", &vm]);
    let id = unique_job_id();
    let session = configured_session(&env, &ws, &job(id));
    let running = session.spawn_prepare().expect("start prepare");
    // Recorded, and past starting the replacement (whose log exists once it runs in a session
    // of its own): a SIGKILL to prepare's group any earlier would also hit the refill while it
    // is still forking, or come before prepare started it.
    let refill_log = ws.state_dir.join("pool").join("fill.log");
    wait_until("the claim to be recorded", BOOT_WAIT, || {
        recorded_state(&ws, id).is_some_and(|state| state["vm_name"] == vm.as_str())
            && refill_log.exists()
    });

    let _ = running.signal_group(SIGKILL);
    assert_eq!(running.wait().exit, ExitInfo::Signaled(SIGKILL));
    assert_eq!(recorded_state(&ws, id).expect("state")["phase"], "creating");
    let report = hyperjob_ok(&env, &ws, &["gc"]);

    assert!(
        report.contains(&format!(
            "removed {vm}: its prepare was killed before the VM was ready"
        )),
        "{report}"
    );
    assert!(!domain_exists(&env.libvirt_uri, &vm));
    assert!(recorded_state(&ws, id).is_none());
    // The claim had started a replacement; a fill waits for it (or replaces it) and returns
    // with the pool full, which no job has touched.
    hyperjob_ok(&env, &ws, &["pool", "fill"]);
    assert_eq!(ready_count(&env, &ws), 1);
    drain_and_check(&env, &ws, "kill");
}

#[test]
fn a_changed_base_image_drains_the_pool_and_idle_vms_are_reaped() {
    let env = TestEnv::load();
    let ws = env.workspace("pool-stale");
    // A base image of the workspace's own, so that changing it touches no other test.
    let base = ws.dir.join("base.qcow2");
    std::fs::copy(&env.base_image, &base).expect("copy the base image");
    let config = ws.default_config().replace(
        &env.base_image.display().to_string(),
        &base.display().to_string(),
    );
    with_pool(&ws, "stale", &config, "size = 1");
    hyperjob_ok(&env, &ws, &["pool", "fill"]);
    let (old, _) = pooled(&env, &ws).remove(0);

    // The image changes (here: only its modification time, as a rewrite in place would).
    std::fs::File::options()
        .write(true)
        .open(&base)
        .and_then(|file| file.set_modified(std::time::SystemTime::now()))
        .expect("touch the base image");
    assert_eq!(pooled(&env, &ws), [(old.clone(), "stale".to_string())]);
    let id = unique_job_id();
    let session = configured_session(&env, &ws, &job(id));
    session.prepare().expect("prepare");
    assert!(
        !session_log(&session).contains("Claimed"),
        "{}",
        session_log(&session)
    );
    assert_ne!(job_vm(&ws, id), old);
    session.cleanup();
    let report = hyperjob_ok(&env, &ws, &["pool", "fill"]);
    assert!(
        report.contains(&format!(
            "removed {old}: it was built from another base image or config"
        )),
        "{report}"
    );
    assert!(!domain_exists(&env.libvirt_uri, &old));
    assert_eq!(ready_count(&env, &ws), 1);

    // Idle for longer than max_idle_secs: gc reaps it.
    let (fresh, _) = pooled(&env, &ws).remove(0);
    let text = std::fs::read_to_string(ws.state_dir.join(format!("pool/{fresh}.json")))
        .expect("pool record");
    let created = serde_json::from_str::<serde_json::Value>(&text).expect("json")["created_unix"]
        .as_u64()
        .expect("created");
    // The record keeps the idle limit it was made with; judge the VM by an aged copy.
    let mut record: serde_json::Value = serde_json::from_str(&text).expect("json");
    record["deadline_unix"] = (created + 1).into();
    std::fs::write(
        ws.state_dir.join(format!("pool/{fresh}.json")),
        serde_json::to_vec(&record).expect("json"),
    )
    .expect("write");
    wait_until("the idle time to end", Duration::from_secs(10), || {
        support::unix_now() > created + 1
    });
    let report = hyperjob_ok(&env, &ws, &["gc"]);
    assert!(
        report.contains(&format!(
            "removed {fresh}: idle in the pool for more than 1 s"
        )),
        "{report}"
    );
    ws.assert_nothing_left("stale-pool-");
    std::fs::remove_file(&base).expect("remove the base image copy");
}

#[test]
fn with_per_job_keys_every_pooled_vm_has_its_own_keys_and_the_claim_hands_them_to_the_job() {
    let env = TestEnv::load();
    let ws = env.workspace("pool-keys");
    with_pool(&ws, "keys", &ws.per_job_keys_config(), "size = 2");
    hyperjob_ok(&env, &ws, &["pool", "fill"]);
    let records: Vec<serde_json::Value> = pooled(&env, &ws)
        .iter()
        .map(|(vm, _)| {
            let text = std::fs::read_to_string(ws.state_dir.join(format!("pool/{vm}.json")))
                .expect("pool record");
            serde_json::from_str(&text).expect("json")
        })
        .collect();
    let host_keys: Vec<&str> = records
        .iter()
        .map(|r| r["endpoint"]["host_key"].as_str().expect("a host key"))
        .collect();
    assert_eq!(host_keys.len(), 2);
    assert_ne!(
        host_keys[0], host_keys[1],
        "two pooled VMs share a host key"
    );

    let id = unique_job_id();
    let session = configured_session(&env, &ws, &job(id));
    session.prepare().expect("prepare");
    assert!(session_log(&session).contains("Claimed the pooled VM"));
    let state = recorded_state(&ws, id).expect("state");
    let vm = job_vm(&ws, id);
    let identity = state["endpoint"]["identity_file"]
        .as_str()
        .expect("identity file");
    assert_eq!(
        identity,
        ws.state_dir
            .join(format!("job-{id}.keys/id_ed25519"))
            .display()
            .to_string()
    );
    assert!(!ws.state_dir.join(format!("pool/{vm}.keys")).exists());
    // The job logs in with the key it was handed and checks the pooled VM's own host key.
    run_sources_and_script(&session);
    session.cleanup();
    ws.wait_for_teardown();
    assert!(!ws.state_dir.join(format!("job-{id}.keys")).exists());
    wait_for_ready(&env, &ws, 2);
    drain_and_check(&env, &ws, "keys");
}
