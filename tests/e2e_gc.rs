//! End-to-end `hyperjob gc`: what jobs left behind is removed (a dead VM, a passed deadline),
//! and nothing else is touched (a job whose stage holds its lock, another installation's VMs,
//! domains without hyperjob's ownership record, stray files). Real binary, real libvirtd, real
//! TCG guests; run with scripts/test.sh.

mod support;

use std::process::Command;
use std::time::Duration;

use hyperjob_test_harness::Job;
use support::{
    domain_exists, hyperjob_metadata, job_without_sources, list_dir, prepared_session,
    qemu_processes_of, recorded_state, unique_job_id, virsh, vm_name, wait_until, Lookalike,
    TestEnv, Workspace,
};

fn job(id: i64, script: &[&str]) -> Job {
    job_without_sources(id, "group/gc", script)
}

fn hyperjob_gc(env: &TestEnv, ws: &Workspace, dry_run: bool) -> String {
    let mut command = Command::new(&env.hyperjob);
    command.arg("--config").arg(&ws.config_path).arg("gc");
    if dry_run {
        command.arg("--dry-run");
    }
    let output = command.output().expect("run hyperjob gc");
    assert!(
        output.status.success(),
        "gc failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The gc tests run one at a time. Each gc only judges VMs whose ownership record names its
/// own state_dir (every workspace has its own), so they could not hit each other's or any
/// other test's VMs anyway; serialising them keeps their reports about their own jobs only.
static GC_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn gc_test_lock() -> std::sync::MutexGuard<'static, ()> {
    GC_TESTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn gc_removes_a_job_whose_vm_died_and_keeps_a_live_one() {
    let _serial = gc_test_lock();
    let env = TestEnv::load();
    let ws = env.workspace("gc-gone");
    let dead_id = unique_job_id();
    let live_id = unique_job_id();
    let dead = prepared_session(&env, &ws, &job(dead_id, &["true"]));
    let live = prepared_session(&env, &ws, &job(live_id, &["true"]));
    // The host "crashes" under the first job: its transient domain vanishes.
    virsh(&env.libvirt_uri, &["destroy", &vm_name(dead_id)]);

    // While a stage of the job holds its activity lock, the job is alive whatever its VM
    // looks like: gc keeps it.
    let lock = std::fs::File::open(ws.state_dir.join(format!("job-{dead_id}.lock")))
        .expect("the job's lock file");
    lock.lock_shared().expect("take the job's activity lock");
    let while_locked = hyperjob_gc(&env, &ws, true);
    drop(lock);
    assert!(!while_locked.contains(&vm_name(dead_id)), "{while_locked}");

    let dry = hyperjob_gc(&env, &ws, true);
    let files_after_dry_run = list_dir(&ws.images_dir).len();
    let real = hyperjob_gc(&env, &ws, false);

    assert!(
        dry.contains(&format!("would remove {}", vm_name(dead_id))),
        "{dry}"
    );
    assert!(!dry.contains(&vm_name(live_id)), "{dry}");
    assert_eq!(files_after_dry_run, 4, "dry run removed something");
    assert!(
        real.contains(&format!("removed {}", vm_name(dead_id))),
        "{real}"
    );
    assert!(!real.contains(&vm_name(live_id)), "{real}");
    let left = list_dir(&ws.images_dir);
    assert!(
        left.iter().all(|f| f.starts_with(&vm_name(live_id))),
        "{left:?}"
    );
    assert!(
        !qemu_processes_of(&vm_name(live_id)).is_empty(),
        "gc stopped the live job"
    );
    drop(dead);
    live.cleanup();
    ws.assert_nothing_left(&vm_name(live_id));
}

#[test]
fn gc_removes_vms_past_their_deadline() {
    let _serial = gc_test_lock();
    let env = TestEnv::load();
    let ws = env.workspace("gc-deadline");
    ws.write_config(&ws.default_config().replacen(
        "[backends.libvirt]",
        "deadline_margin_secs = 0\n[backends.libvirt]",
        1,
    ));
    let id = unique_job_id();
    let mut job = job(id, &["true"]);
    job.timeout_secs = 1;
    let _session = prepared_session(&env, &ws, &job);
    let deadline = recorded_state(&ws, id).expect("state record")["deadline_unix"]
        .as_u64()
        .expect("deadline_unix");
    wait_until(
        "the job's deadline to pass",
        Duration::from_secs(30),
        || support::unix_now() > deadline,
    );

    let report = hyperjob_gc(&env, &ws, false);

    assert!(
        report.contains(&format!("removed {}: its deadline has passed", vm_name(id))),
        "{report}"
    );
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn gc_leaves_what_it_does_not_own_alone() {
    let _serial = gc_test_lock();
    let env = TestEnv::load();
    let ws = env.workspace("gc-foreign");
    let other = env.workspace("gc-foreign-other");
    let (foreign_id, bare_id) = (unique_job_id(), unique_job_id());
    // Expired long ago, but made by another installation (another state_dir).
    let foreign = Lookalike::create(
        &env,
        &ws,
        vm_name(foreign_id),
        Some(hyperjob_metadata(foreign_id, 2, &other.state_dir)),
    );
    // A hyperjob-like name and no ownership record at all.
    let bare = Lookalike::create(&env, &ws, vm_name(bare_id), None);
    // Files of no job of ours in the images dir.
    let stray = ws.images_dir.join("not-hyperjob.qcow2");
    std::fs::write(&stray, "not ours").expect("stray file");

    let dry = hyperjob_gc(&env, &ws, true);
    let real = hyperjob_gc(&env, &ws, false);

    assert!(
        dry.contains(&format!(
            "skipping {}: owned by {}",
            vm_name(foreign_id),
            other.state_dir.display()
        )),
        "{dry}"
    );
    assert!(!real.contains("removed"), "{real}");
    for name in [&foreign.name, &bare.name] {
        assert!(
            domain_exists(&env.libvirt_uri, name),
            "gc removed {name}: {real}"
        );
    }
    assert!(stray.exists(), "gc removed a file it does not own");
    std::fs::remove_file(&stray).expect("remove stray file");
    drop((foreign, bare));
    ws.assert_nothing_left(&vm_name(foreign_id));
    ws.assert_nothing_left(&vm_name(bare_id));
}
