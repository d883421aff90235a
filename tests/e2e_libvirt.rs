//! End-to-end: the real `hyperjob` binary, driven exactly as GitLab Runner drives a Custom
//! executor (tests/harness), against a real libvirtd, real TCG guests and a real SSH server.
//! Run with scripts/test.sh, which provides the namespaced test environment.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use std::os::unix::fs::PermissionsExt;

use hyperjob_test_harness::{
    run_job, Driver, Job, JobReport, JobResult, JobVariable, RunnerSettings, Stage, Step,
};
use support::{unique_job_id, GitServer, TestEnv, Workspace};

fn driver(env: &TestEnv, ws: &Workspace) -> Driver {
    Driver::single_binary(&env.hyperjob)
        .with_env("HYPERJOB_CONFIG", ws.config_path.to_str().expect("utf-8"))
}

/// The runner's settings, with the 3 s pause between preparation attempts shortened.
fn settings() -> RunnerSettings {
    RunnerSettings {
        preparation_retry_interval: Duration::from_millis(200),
        ..RunnerSettings::default()
    }
}

fn vm_name(job_id: i64) -> String {
    format!("hyperjob-job-{job_id}")
}

fn system_failure_message(report: &JobReport) -> String {
    match &report.result {
        JobResult::SystemFailure { message } => message.clone(),
        other => panic!(
            "expected a system failure, got {other:?}\n{}",
            report.log_text()
        ),
    }
}

/// Runs one hyperjob command by hand with the runner's fixed environment.
fn hyperjob(env: &TestEnv, ws: &Workspace, job_id: i64, args: &[&str]) -> Output {
    let tmp = tempfile::tempdir().expect("tempdir");
    let response = tmp.path().join("response.json");
    std::fs::write(
        &response,
        format!("{{\"id\":{job_id},\"token\":\"glcbt-not-a-real-token\"}}\n"),
    )
    .expect("response file");
    Command::new(&env.hyperjob)
        .args(args)
        .current_dir(tmp.path())
        .env("HYPERJOB_CONFIG", &ws.config_path)
        .env("JOB_RESPONSE_FILE", &response)
        .env("BUILD_FAILURE_EXIT_CODE", "1")
        .env("SYSTEM_FAILURE_EXIT_CODE", "2")
        .env("BUILD_EXIT_CODE_FILE", tmp.path().join("build_exit_code"))
        .env("TMPDIR", tmp.path())
        .output()
        .expect("run hyperjob")
}

#[test]
fn job_runs_every_stage_inside_a_fresh_vm_and_cleanup_removes_it() {
    let env = TestEnv::load();
    let ws = env.workspace("full-job");
    let git = GitServer::start(
        &env.bridge_ip,
        "demo",
        &[("hello.txt", "hello from the repository\n")],
    );
    let id = unique_job_id();
    let mut job = Job::new(
        id,
        "group/demo",
        &git.repo_url,
        &git.sha,
        &[
            "cat hello.txt",
            "echo \"build runs as $(id -un) in $(pwd)\"",
            "echo build-stderr >&2",
        ],
    );
    job.steps.push(Step::new(
        "release",
        &["echo \"release step on $(hostname)\""],
    ));
    job.after_script = vec!["echo \"after_script sees $CI_JOB_STATUS\"".to_string()];
    job.variables.push(JobVariable::new("GREETING", "it's me"));

    let report = run_job(&driver(&env, &ws), &job, &settings());

    let log = report.log_text();
    assert_eq!(report.result, JobResult::Success, "{log}");
    assert_eq!(
        report.run_stages(),
        [
            "prepare_script",
            "get_sources",
            "build_script",
            "step_release",
            "after_script",
            "cleanup_file_variables"
        ]
    );
    assert!(log.contains("Creating VM"), "{log}");
    assert!(log.contains("Guest ready at"), "{log}");
    assert!(log.contains(&format!("via {}...", vm_name(id))), "{log}");
    assert!(log.contains("hello from the repository"), "{log}");
    assert!(
        log.contains("build runs as gitlab-runner in /home/gitlab-runner/builds/demo"),
        "{log}"
    );
    assert!(log.contains("build-stderr"), "{log}");
    assert!(log.contains("release step on "), "{log}");
    assert!(log.contains("after_script sees success"), "{log}");
    assert!(
        !log.contains("hyperjob-remote-pgid"),
        "driver plumbing leaked into the log: {log}"
    );
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn image_with_a_bootloader_boots_without_kernel_keys() {
    let env = TestEnv::load();
    let ws = env.workspace("bootloader");
    let config = ws.bootloader_config();
    assert!(!config.contains("kernel ="), "{config}");
    ws.write_config(&config);
    let id = unique_job_id();
    // A second config: 2 vCPUs and 384 MiB, which the guest must see (the default config
    // has 1 and 512). A table of a plugin that is not selected is ignored.
    let config = config
        .replace("vcpus = 1", "vcpus = 2")
        .replace("memory_mib = 512", "memory_mib = 384")
        + "\n[backends.unselected]\nanything = \"goes\"\n";
    ws.write_config(&config);
    let mut job = Job::new(
        id,
        "group/boot",
        "",
        "",
        &[
            "cat /proc/cmdline",
            "echo \"cpus=$(nproc)\"",
            "echo \"memory_kib=$(sed -n 's/^MemTotal: *\\([0-9]*\\) kB$/\\1/p' /proc/meminfo)\"",
        ],
    );
    job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));

    let report = run_job(&driver(&env, &ws), &job, &settings());

    let log = report.log_text();
    assert_eq!(report.result, JobResult::Success, "{log}");
    // The command line comes from the image's syslinux.cfg: SeaBIOS booted the disk.
    assert!(log.contains("root=/dev/vda2"), "{log}");
    assert!(log.contains("cpus=2"), "{log}");
    let memory_kib: u64 = log
        .lines()
        .find_map(|line| line.strip_prefix("memory_kib="))
        .and_then(|kib| kib.trim().parse().ok())
        .unwrap_or_else(|| panic!("no memory figure: {log}"));
    // MemTotal is what is left after the kernel's own reservations.
    assert!(
        (300 * 1024..=384 * 1024).contains(&memory_kib),
        "guest sees {memory_kib} KiB: {log}"
    );
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn per_job_keys_reach_a_stock_cloud_init_guest_and_are_removed_with_the_job() {
    let env = TestEnv::load();
    let ws = env.workspace("per-job-keys");
    let config = ws.per_job_keys_config();
    assert!(
        !config.contains("identity_file") && !config.contains("known_hosts"),
        "{config}"
    );
    ws.write_config(&config);
    let id = unique_job_id();
    let mut job = Job::new(
        id,
        "group/keys",
        "",
        "",
        &[
            "echo \"host keys in the guest: $(ls /etc/ssh/ | grep -c '_key$')\"",
            "echo \"host key: $(ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null | cut -d' ' -f2,3)\"",
            "echo \"authorized: $(wc -l < ~/.ssh/authorized_keys)\"",
        ],
    );
    job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));
    let keys_dir = ws.state_dir.join(format!("job-{id}.keys"));
    let seed = ws.images_dir.join(format!("{}.seed.iso", vm_name(id)));

    let session =
        hyperjob_test_harness::ExecutorSession::new(&driver(&env, &ws), &job, &settings())
            .expect("session");
    session.run_config().expect("config");
    session.start_build().expect("dirs");
    session.prepare().expect("prepare with per-job keys");
    let key_mode =
        std::fs::metadata(keys_dir.join("id_ed25519")).map(|m| m.permissions().mode() & 0o777);
    let seed_mode = std::fs::metadata(&seed).map(|m| m.permissions().mode() & 0o777);
    let mode_of = |path: &std::path::Path| {
        std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o777)
            .ok()
    };
    let state_file_mode = mode_of(&ws.state_dir.join(format!("job-{id}.json")));
    let state_dir_mode = mode_of(&ws.state_dir);
    let keys_dir_mode = mode_of(&keys_dir);
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(ws.state_dir.join(format!("job-{id}.json"))).expect("state"),
    )
    .expect("state json");
    session.run_stage(&Stage::GetSources).expect("get_sources");
    let build = session
        .run_stage(&Stage::UserStep("script".into()))
        .expect("build_script")
        .expect("invoked");
    session.cleanup();

    let log = session
        .log()
        .iter()
        .map(|l| l.text.clone())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(build.succeeded(), "{log}");
    assert_eq!(key_mode.ok(), Some(0o600), "client key must be 0600");
    assert_eq!(seed_mode.ok(), Some(0o600), "seed must be 0600");
    assert_eq!(state_file_mode, Some(0o600), "state file must be 0600");
    assert_eq!(state_dir_mode, Some(0o700), "state_dir must be 0700");
    assert_eq!(
        keys_dir_mode,
        Some(0o700),
        "the job's key directory must be 0700"
    );
    let host_key = state["endpoint"]["host_key"]
        .as_str()
        .expect("state records the job's host key");
    let host_key_type_and_blob: String = host_key.split(' ').take(2).collect::<Vec<_>>().join(" ");
    assert!(
        log.contains(&format!("host key: {host_key_type_and_blob}")),
        "{log}"
    );
    assert!(log.contains("host keys in the guest: 1"), "{log}");
    assert!(log.contains("authorized: 1"), "{log}");
    ws.wait_for_teardown();
    assert!(!keys_dir.exists(), "the job's keys outlived cleanup");
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn a_second_job_gets_different_keys() {
    let env = TestEnv::load();
    let ws = env.workspace("per-job-keys-differ");
    ws.write_config(&ws.per_job_keys_config());
    let ids = [unique_job_id(), unique_job_id()];

    let host_keys: Vec<String> = ids
        .iter()
        .map(|&id| {
            let mut job = Job::new(
                id,
                "group/keys",
                "",
                "",
                &["ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null | cut -d' ' -f3"],
            );
            job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));
            let report = run_job(&driver(&env, &ws), &job, &settings());
            assert_eq!(report.result, JobResult::Success, "{}", report.log_text());
            report
                .log_text()
                .lines()
                .find(|l| l.starts_with("AAAAC3"))
                .unwrap_or_else(|| panic!("no host key printed: {}", report.log_text()))
                .to_string()
        })
        .collect();

    assert_ne!(host_keys[0], host_keys[1]);
    ws.assert_nothing_left(&vm_name(ids[0]));
    ws.assert_nothing_left(&vm_name(ids[1]));
}

#[test]
fn failing_script_is_a_build_failure_carrying_its_exit_code() {
    let env = TestEnv::load();
    let ws = env.workspace("exit-42");
    let id = unique_job_id();
    let mut job = Job::new(
        id,
        "group/fails",
        "",
        "",
        &["echo before the failure", "exit 42", "echo never printed"],
    );
    job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));
    job.after_script = vec!["echo \"after_script sees $CI_JOB_STATUS\"".to_string()];

    let report = run_job(&driver(&env, &ws), &job, &settings());

    let log = report.log_text();
    assert_eq!(
        report.result,
        JobResult::BuildFailure { exit_code: 42 },
        "{log}"
    );
    assert!(log.contains("before the failure"), "{log}");
    assert!(!log.contains("never printed"), "{log}");
    assert!(log.contains("after_script sees failed"), "{log}");
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn missing_base_image_fails_every_prepare_attempt_as_a_system_failure_leaving_nothing() {
    let env = TestEnv::load();
    let ws = env.workspace("no-base-image");
    let missing = ws.dir.join("missing.qcow2");
    ws.write_config(&ws.default_config().replace(
        &format!("base_image = \"{}\"", env.base_image.display()),
        &format!("base_image = \"{}\"", missing.display()),
    ));
    let id = unique_job_id();
    let job = Job::new(id, "group/p", "", "", &["true"]);

    let report = run_job(&driver(&env, &ws), &job, &settings());

    system_failure_message(&report);
    assert_eq!(report.invocations_of("prepare").len(), 3);
    assert_eq!(report.invocations_of("cleanup").len(), 3);
    assert!(report.run_stages().is_empty());
    let log = report.log_text();
    assert!(
        log.contains(&format!("base image {} does not exist", missing.display())),
        "{log}"
    );
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn unknown_config_key_fails_config_exec_naming_key_and_file() {
    let env = TestEnv::load();
    let ws = env.workspace("bad-config");
    ws.write_config(&ws.default_config().replacen(
        "[backends.libvirt]",
        "colour = \"blue\"\n[backends.libvirt]",
        1,
    ));
    let id = unique_job_id();
    let job = Job::new(id, "group/p", "", "", &["true"]);

    let report = run_job(&driver(&env, &ws), &job, &settings());

    system_failure_message(&report);
    assert_eq!(report.invocations_of("config").len(), 3);
    assert!(report.invocations_of("prepare").is_empty());
    let log = report.log_text();
    assert!(log.contains("unknown field `colour`"), "{log}");
    assert!(log.contains(&ws.config_path.display().to_string()), "{log}");
}

/// When the job log line containing `needle` arrived (panics if there is none).
fn line_at(report: &JobReport, needle: &str) -> std::time::Instant {
    report
        .log
        .iter()
        .find(|line| line.text.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} in the job log:\n{}", report.log_text()))
        .at
}

#[test]
fn guest_whose_ssh_never_answers_fails_prepare_within_ready_timeout_and_is_removed() {
    let env = TestEnv::load();
    let ws = env.workspace("never-ready");
    // Nothing listens on this port in the guest. The timeout leaves room for the guest to get
    // its address even with four TCG guests on two cores, so what expires is the SSH wait.
    ws.write_config(&ws.default_config().replace(
        "ready_timeout_secs = 180",
        "ready_timeout_secs = 90\nport = 2222",
    ));
    let id = unique_job_id();
    let job = Job::new(id, "group/p", "", "", &["true"]);
    let settings = RunnerSettings {
        preparation_retries: 1,
        ..settings()
    };

    let report = run_job(&driver(&env, &ws), &job, &settings);

    let message = system_failure_message(&report);
    let prepare = report.invocations_of("prepare");
    assert_eq!(prepare.len(), 1, "{message}");
    let log = report.log_text();
    assert!(
        prepare[0].duration < Duration::from_secs(90 + 30),
        "prepare took {:?}: {log}",
        prepare[0].duration
    );
    // The guest had its address: the time ran out in the SSH wait, not before it.
    let address_found = line_at(&report, "Guest address ");
    println!(
        "address after {:.1} s; prepare gave up {:.1} s later",
        address_found
            .saturating_duration_since(prepare[0].started)
            .as_secs_f64(),
        prepare[0]
            .ended
            .saturating_duration_since(address_found)
            .as_secs_f64()
    );
    assert!(log.contains("timed out after"), "{log}");
    assert!(log.contains("waiting for SSH at"), "{log}");
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn guest_with_an_unpinned_host_key_is_refused_at_once() {
    let env = TestEnv::load();
    let ws = env.workspace("wrong-host-key");
    let pinned = ws.dir.join("other_known_hosts");
    std::fs::write(
        &pinned,
        "* ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGh5cGVyam9iLXRlc3Qta2V5LTAxMjM0NTY3ODlhYmNk\n",
    )
    .expect("known_hosts");
    ws.write_config(&ws.default_config().replace(
        &format!("known_hosts = \"{}\"", env.known_hosts.display()),
        &format!("known_hosts = \"{}\"", pinned.display()),
    ));
    let id = unique_job_id();
    let job = Job::new(id, "group/p", "", "", &["true"]);
    let settings = RunnerSettings {
        preparation_retries: 1,
        ..settings()
    };

    let report = run_job(&driver(&env, &ws), &job, &settings);

    system_failure_message(&report);
    let log = report.log_text();
    assert!(
        log.contains(&format!("is not in {}", pinned.display())),
        "{log}"
    );
    // At once: after the first handshake, not after retrying until ready_timeout (180 s).
    let prepare = report.invocations_of("prepare");
    assert_eq!(prepare.len(), 1, "{log}");
    let refused_after = prepare[0]
        .ended
        .saturating_duration_since(line_at(&report, "Guest address "));
    println!(
        "host key refused {:.2} s after the guest had its address",
        refused_after.as_secs_f64()
    );
    assert!(
        refused_after < Duration::from_secs(30),
        "refusal took {refused_after:?}: {log}"
    );
    assert!(log.contains("SHA256:"), "{log}");
    assert!(report.run_stages().is_empty());
    std::fs::remove_file(&pinned).expect("remove known_hosts");
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn cleanup_succeeds_when_prepare_never_ran_and_when_repeated() {
    let env = TestEnv::load();
    let ws = env.workspace("cleanup-only");
    let id = unique_job_id();

    let first = hyperjob(&env, &ws, id, &["cleanup"]);
    let second = hyperjob(&env, &ws, id, &["cleanup"]);

    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    // cleanup reports errors only: nothing to say when there was nothing to remove.
    for output in [&first, &second] {
        assert!(
            output.stdout.is_empty() && output.stderr.is_empty(),
            "{output:?}"
        );
    }
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn run_without_a_prepared_vm_is_a_system_failure_with_a_reason() {
    let env = TestEnv::load();
    let ws = env.workspace("run-unprepared");
    let id = unique_job_id();
    let script = ws.dir.join("script");
    std::fs::write(&script, "#!/usr/bin/env bash\necho hi\n").expect("script");

    let output = hyperjob(
        &env,
        &ws,
        id,
        &["run", script.to_str().expect("utf-8"), "build_script"],
    );

    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("no VM is prepared for job {id}")),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    std::fs::remove_file(&script).expect("remove script");
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn config_prints_only_the_runner_json() {
    let env = TestEnv::load();
    let ws = env.workspace("config-json");
    let id = unique_job_id();

    let output = hyperjob(&env, &ws, id, &["config"]);

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("stdout is exactly one JSON document");
    assert_eq!(json["driver"]["name"], "hyperjob");
    assert_eq!(json["builds_dir"], "/home/gitlab-runner/builds");
    assert_eq!(json["cache_dir"], "/home/gitlab-runner/cache");
    assert_eq!(json["builds_dir_is_shared"], false);
    assert_eq!(json["hostname"], vm_name(id));
    assert!(Path::new(&env.hyperjob).exists());
}

#[test]
fn a_job_timeout_that_is_not_positive_means_the_runners_default_of_two_hours() {
    let env = TestEnv::load();
    let ws = env.workspace("default-timeout");
    let id = unique_job_id();
    let tmp = tempfile::tempdir().expect("tempdir");
    let response = tmp.path().join("response.json");
    std::fs::write(
        &response,
        format!("{{\"id\":{id},\"runner_info\":{{\"timeout\":-5}}}}\n"),
    )
    .expect("response file");
    let run = |args: &[&str]| {
        let mut command = Command::new(&env.hyperjob);
        command
            .args(args)
            .env("HYPERJOB_CONFIG", &ws.config_path)
            .env("JOB_RESPONSE_FILE", &response)
            .env("SYSTEM_FAILURE_EXIT_CODE", "2")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        command
    };

    // prepare records the job's deadline before it creates anything; that is all we need.
    let mut prepare = run(&["prepare"]).spawn().expect("start prepare");
    let state = ws.state_dir.join(format!("job-{id}.json"));
    support::wait_until("the state record", Duration::from_secs(300), || {
        state.exists()
    });
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).expect("state")).expect("state JSON");
    prepare.kill().expect("SIGKILL our prepare");
    let _ = prepare.wait();
    let cleanup = run(&["cleanup"]).status().expect("run cleanup");

    let created = record["created_unix"].as_u64().expect("created");
    let deadline = record["deadline_unix"].as_u64().expect("deadline");
    // runner_info.timeout -5 → the runner's default 7200 s, plus the default margin of 1 h.
    assert_eq!(deadline - created, 7200 + 3600, "{record}");
    assert!(cleanup.success());
    ws.assert_nothing_left(&vm_name(id));
}
