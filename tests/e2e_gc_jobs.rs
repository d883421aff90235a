//! End-to-end `hyperjob gc` and prepare against live and dead jobs: gc decides about each job
//! under the job's lock, from what the VM is at that moment; a killed prepare and a job whose
//! runner died are removed at once; files a killed process left are swept; a VM another
//! installation owns, or whose record cannot be read, is never destroyed (`name_prefix` keeps
//! installations apart). Real binary, real libvirtd, real TCG guests; run with scripts/test.sh.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use hyperjob_test_harness::{ExecutorSession, ExitInfo, Job};
use support::{
    configured_session, configured_session_of, domain_exists, executable, hyperjob_metadata,
    hyperjob_ok, job_without_sources, list_dir, perl_runner, run_sources_and_script, session_log,
    unique_job_id, vm_name, wait_for_log, wrapped_driver, Lookalike, TestEnv, Workspace,
};

/// Generous bounds: four TCG guests may share the two cores of a test machine.
const LOG_WAIT: Duration = Duration::from_secs(300);
const SIGKILL: i32 = 9;

fn job(id: i64) -> Job {
    job_without_sources(id, "group/gc-jobs", &["echo stage-ran"])
}

fn gc_ok(env: &TestEnv, ws: &Workspace) -> String {
    hyperjob_ok(env, ws, &["gc"])
}

/// Runs the job's sources and script stages: the job is unharmed.
fn run_the_script(session: &ExecutorSession) {
    run_sources_and_script(session);
    assert!(session_log(session).contains("stage-ran"));
}

fn state_files_of(ws: &Workspace, id: i64) -> Vec<String> {
    list_dir(&ws.state_dir)
        .into_iter()
        .filter(|name| name.starts_with(&format!("job-{id}.")))
        .collect()
}

#[test]
fn gc_removes_a_killed_prepare_and_a_job_whose_runner_died_at_once_but_keeps_a_wrapped_live_job() {
    let env = TestEnv::load();
    let ws = env.workspace("gc-dead-jobs");
    let (killed, orphaned, wrapped) = (unique_job_id(), unique_job_id(), unique_job_id());

    // 1. prepare SIGKILLed while the guest boots: the record still says `creating`.
    let session = configured_session(&env, &ws, &job(killed));
    let running = session.spawn_prepare().expect("start prepare");
    wait_for_log(&session, "Waiting for the guest address", LOG_WAIT);
    let _ = running.signal_group(SIGKILL);
    assert_eq!(running.wait().exit, ExitInfo::Signaled(SIGKILL));
    assert!(domain_exists(&env.libvirt_uri, &vm_name(killed)));

    // 2. A job started by a runner that is gone now: here a perl wrapper (not a shell, so it
    //    counts as the runner) that ends after prepare, as a crashed runner would.
    let perl = perl_runner(&env, &ws);
    let orphan_session = configured_session_of(&wrapped_driver(&ws, &perl), &job(orphaned));
    orphan_session
        .prepare()
        .expect("prepare through the perl runner");

    // 3. A live job whose prepare_exec is a shell wrapper without `exec`: the wrapper ends
    //    with the stage, but the runner (this test) lives: the job must be kept.
    let sh = executable(
        &ws,
        "prepare-wrapper",
        &format!("#!/bin/sh\n'{}' \"$@\"\n", env.hyperjob.display()),
    );
    let wrapped_session = configured_session_of(&wrapped_driver(&ws, &sh), &job(wrapped));
    wrapped_session
        .prepare()
        .expect("prepare through a shell wrapper");

    let started = Instant::now();
    let report = gc_ok(&env, &ws);
    println!(
        "gc decided about 3 jobs in {:.2} s:\n{report}",
        started.elapsed().as_secs_f64()
    );

    assert!(
        report.contains(&format!(
            "removed {}: its prepare was killed before the VM was ready",
            vm_name(killed)
        )),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "removed {}: its runner (runner.pl, pid",
            vm_name(orphaned)
        )),
        "{report}"
    );
    assert!(!report.contains(&vm_name(wrapped)), "{report}");
    for gone in [killed, orphaned] {
        assert!(!domain_exists(&env.libvirt_uri, &vm_name(gone)));
        assert!(
            state_files_of(&ws, gone).is_empty(),
            "{:?}",
            list_dir(&ws.state_dir)
        );
    }
    run_the_script(&wrapped_session);
    drop(session);
    drop(orphan_session);
    wrapped_session.cleanup();
    for wrapper in [perl, sh] {
        std::fs::remove_file(wrapper).expect("remove wrapper");
    }
    ws.assert_nothing_left(&vm_name(wrapped));
}

#[test]
fn gc_never_interleaves_with_prepare_and_decides_each_job_from_what_its_vm_is_now() {
    let env = TestEnv::load();
    let ws = env.workspace("gc-vs-prepare");
    let id = unique_job_id();
    let session = configured_session(&env, &ws, &job(id));
    std::fs::create_dir_all(&ws.state_dir).expect("state dir");
    std::fs::set_permissions(&ws.state_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    // The test holds the job's lock as gc does while deciding: prepare must wait for it
    // before it touches anything, its removal of leftovers included.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(ws.state_dir.join(format!("job-{id}.lock")))
        .expect("lock file");
    lock.lock().expect("exclusive lock");
    let running = session.spawn_prepare().expect("start prepare");
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(3) {
        assert!(
            !ws.state_dir.join(format!("job-{id}.json")).exists(),
            "prepare went on while gc held the job"
        );
        assert!(!domain_exists(&env.libvirt_uri, &vm_name(id)));
        std::thread::sleep(Duration::from_millis(100));
    }
    lock.unlock().expect("unlock");
    drop(lock);

    // Now gc runs again and again while prepare creates and boots the VM and records it
    // ready: none of them may take the job for gone.
    let mut rounds = 0;
    let mut running = running;
    let prepare = loop {
        let report = gc_ok(&env, &ws);
        rounds += 1;
        assert!(!report.contains(&vm_name(id)), "round {rounds}: {report}");
        match running.wait_timeout(Duration::ZERO) {
            Ok(invocation) => break invocation,
            Err(still_running) => running = *still_running,
        }
    };
    println!("gc ran {rounds} times while prepare ran");
    assert!(prepare.succeeded(), "{}", session_log(&session));
    let report = gc_ok(&env, &ws);
    assert!(!report.contains(&vm_name(id)), "{report}");
    run_the_script(&session);
    session.cleanup();
    ws.assert_nothing_left(&vm_name(id));
}

/// Writes the state record prepare writes for a ready job of `ws` whose VM is `vm`.
fn write_ready_state(ws: &Workspace, id: i64, vm: &str) {
    std::fs::create_dir_all(&ws.state_dir).expect("state dir");
    std::fs::set_permissions(&ws.state_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let now = support::unix_now();
    let record = serde_json::json!({
        "version": 1, "job_id": id, "vm_name": vm, "backend": "libvirt", "transport": "ssh",
        "phase": "ready", "endpoint": {"host": "192.0.2.1"},
        "created_unix": now, "deadline_unix": now + 3600,
    });
    std::fs::write(
        ws.state_dir.join(format!("job-{id}.json")),
        serde_json::to_vec(&record).expect("json"),
    )
    .expect("state file");
}

#[test]
fn gc_reports_and_keeps_a_vm_it_cannot_claim_and_files_of_a_busy_job_but_sweeps_leftovers() {
    let env = TestEnv::load();
    let ws = env.workspace("gc-claims");
    let other = env.workspace("gc-claims-other");
    let (bare, foreign, files, busy, lone) = (
        unique_job_id(),
        unique_job_id(),
        unique_job_id(),
        unique_job_id(),
        unique_job_id(),
    );
    // Our records name VMs that exist now but are not provably ours: one without hyperjob's
    // metadata, one another installation owns. Before, gc took both for "gone" by name.
    write_ready_state(&ws, bare, &vm_name(bare));
    write_ready_state(&ws, foreign, &vm_name(foreign));
    let bare_vm = Lookalike::create(&env, &ws, vm_name(bare), None);
    let foreign_vm = Lookalike::create(
        &env,
        &ws,
        vm_name(foreign),
        Some(hyperjob_metadata(foreign, u64::MAX / 2, &other.state_dir)),
    );
    // What killed processes leave: files of a VM that is gone (overlay, log, the seed's work
    // directory with a private key), a lone lock file, a temporary state file.
    for file in ["qcow2", "console.log"] {
        std::fs::write(
            ws.images_dir.join(format!("{}.{file}", vm_name(files))),
            "x",
        )
        .expect("file");
    }
    let work = ws.images_dir.join(format!(".{}.seed.d", vm_name(files)));
    std::fs::create_dir(&work).expect("work dir");
    std::fs::write(work.join("user-data"), "secret").expect("file");
    std::fs::write(ws.state_dir.join(format!("job-{lone}.lock")), "").expect("lock file");
    let temporary = ws.state_dir.join(format!(".job-{lone}.json.4242.tmp"));
    std::fs::write(&temporary, "{").expect("temporary");
    std::fs::File::options()
        .write(true)
        .open(&temporary)
        .and_then(|file| file.set_modified(std::time::SystemTime::now() - Duration::from_secs(600)))
        .expect("age the temporary file");
    // A job whose prepare is creating its overlay right now: it holds the job's lock.
    let busy_lock =
        std::fs::File::create(ws.state_dir.join(format!("job-{busy}.lock"))).expect("lock file");
    busy_lock.lock_shared().expect("shared lock");
    let busy_overlay = ws.images_dir.join(format!("{}.qcow2", vm_name(busy)));
    std::fs::write(&busy_overlay, "being written").expect("overlay");
    let unrelated = ws.images_dir.join("base-not-a-job.qcow2");
    std::fs::write(&unrelated, "x").expect("file");

    let report = gc_ok(&env, &ws);
    println!("{report}");

    for (id, why) in [
        (bare, "the domain carries no hyperjob metadata"),
        (foreign, "belongs to another hyperjob installation"),
    ] {
        let line = format!("left {} alone: ", vm_name(id));
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(&line) && l.contains(why)),
            "{report}"
        );
        assert!(domain_exists(&env.libvirt_uri, &vm_name(id)), "{report}");
        assert!(ws.state_dir.join(format!("job-{id}.json")).exists());
    }
    assert!(
        report.contains(&format!(
            "removed {}: its VM is gone and no stage is running",
            vm_name(files)
        )),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "removed {}: a stale temporary file",
            temporary.display()
        )),
        "{report}"
    );
    assert!(!report.contains(&vm_name(busy)), "{report}");
    assert!(busy_overlay.exists() && unrelated.exists());
    let images = list_dir(&ws.images_dir);
    assert_eq!(images.len(), 2, "{images:?}");
    assert!(state_files_of(&ws, lone).is_empty());
    assert!(!temporary.exists());

    drop(busy_lock);
    std::fs::remove_file(busy_overlay).expect("remove");
    std::fs::remove_file(unrelated).expect("remove");
    drop((bare_vm, foreign_vm));
    let report = gc_ok(&env, &ws);
    assert!(
        report.contains(&format!("removed {}", vm_name(bare))),
        "{report}"
    );
    ws.assert_nothing_left(&vm_name(bare));
}

#[test]
fn prepare_and_cleanup_never_destroy_another_installations_vm_and_name_prefix_keeps_them_apart() {
    let env = TestEnv::load();
    let ws = env.workspace("prefix-b");
    let other = env.workspace("prefix-a");
    let id = unique_job_id();
    // Installation A runs job `id` (same job id: another GitLab instance, say).
    let theirs = Lookalike::create(
        &env,
        &other,
        vm_name(id),
        Some(hyperjob_metadata(id, u64::MAX / 2, &other.state_dir)),
    );

    let session = configured_session(&env, &ws, &job(id));
    let refused = session.prepare();
    let log = session_log(&session);
    let cleanup = session.cleanup().expect("cleanup ran");

    assert!(refused.is_err(), "{log}");
    assert!(
        log.contains(&format!(
            "VM {} belongs to another hyperjob installation",
            vm_name(id)
        )),
        "{log}"
    );
    assert!(cleanup.error.is_none(), "{:?}", cleanup.error);
    assert!(domain_exists(&env.libvirt_uri, &theirs.name), "{log}");
    assert!(
        list_dir(&ws.state_dir).is_empty(),
        "{:?}",
        list_dir(&ws.state_dir)
    );
    assert!(list_dir(&ws.images_dir).is_empty());

    // With its own name_prefix, installation B runs the same job id beside A.
    ws.write_config(&ws.default_config().replacen(
        "[backends.libvirt]",
        "name_prefix = \"ci-b-job-\"\n[backends.libvirt]",
        1,
    ));
    let ours = format!("ci-b-job-{id}");
    let session = configured_session(&env, &ws, &job(id));
    assert_eq!(
        session.config_output().expect("config output")["hostname"],
        ours.as_str()
    );
    session.prepare().expect("prepare with its own name_prefix");
    assert!(domain_exists(&env.libvirt_uri, &ours));
    run_the_script(&session);
    session.cleanup();
    ws.assert_nothing_left(&ours);
    assert!(domain_exists(&env.libvirt_uri, &theirs.name));
    drop(theirs);
}
