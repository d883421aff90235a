//! End-to-end: the real `hyperjob` binary with `backend = "qemu"` loaded from the shared-library
//! plugin (`plugins/backend-qemu`), driven as GitLab Runner drives a Custom executor
//! (tests/harness), booting real TCG guests from the test image with plain QEMU.
//!
//! No libvirt is involved: QEMU's user-mode network forwards a loopback port to the guest's
//! SSH, so these tests need only loopback (they also run inside scripts/test.sh's namespace).
//! The plugin is not built here: set `HYPERJOB_QEMU_PLUGIN` to the built library.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use hyperjob_test_harness::{run_job, Driver, Job, JobResult, JobVariable, RunnerSettings, Step};
use support::{
    assert_nothing_left_of_qemu_vm, qemu_plugin_library, qemu_processes_of,
    qemu_unix_endpoint_config, unique_job_id, wait_until, GitServer, TestEnv, Workspace,
};

/// The guest reaches the host's loopback at this address (QEMU user networking).
const HOST_FROM_GUEST: &str = "10.0.2.2";

fn workspace(env: &TestEnv, name: &str) -> Workspace {
    let ws = env.workspace(name);
    ws.write_config(&ws.qemu_config(&qemu_plugin_library()));
    ws
}

fn driver(env: &TestEnv, ws: &Workspace) -> Driver {
    Driver::single_binary(&env.hyperjob)
        .with_env("HYPERJOB_CONFIG", ws.config_path.to_str().expect("utf-8"))
}

fn settings() -> RunnerSettings {
    RunnerSettings {
        preparation_retry_interval: Duration::from_millis(200),
        ..RunnerSettings::default()
    }
}

fn vm_name(job_id: i64) -> String {
    format!("hyperjob-job-{job_id}")
}

/// One hyperjob command, run by hand with the runner's fixed environment.
struct Stage {
    tmp: tempfile::TempDir,
    command: Command,
}

impl Stage {
    fn new(env: &TestEnv, ws: &Workspace, job_id: i64, args: &[&str]) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let response = tmp.path().join("response.json");
        fs::write(&response, format!("{{\"id\":{job_id}}}\n")).expect("response file");
        let mut command = Command::new(&env.hyperjob);
        command
            .args(args)
            .current_dir(tmp.path())
            .env("HYPERJOB_CONFIG", &ws.config_path)
            .env("JOB_RESPONSE_FILE", &response)
            .env("BUILD_FAILURE_EXIT_CODE", "1")
            .env("SYSTEM_FAILURE_EXIT_CODE", "2")
            .env("BUILD_EXIT_CODE_FILE", tmp.path().join("build_exit_code"))
            .stdin(Stdio::null());
        Self { tmp, command }
    }

    fn output(mut self) -> Output {
        self.command.output().expect("run hyperjob")
    }
}

#[test]
fn plugin_lists_the_qemu_backend_from_its_library() {
    let env = TestEnv::load();
    let ws = workspace(&env, "qemu-plugins");

    let output = Stage::new(&env, &ws, unique_job_id(), &["plugins"]).output();

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let line = stdout
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some("qemu"))
        .unwrap_or_else(|| panic!("no qemu backend listed: {stdout}"));
    assert!(line.starts_with("backend"), "{line}");
    assert!(
        line.ends_with(&format!("library {}", qemu_plugin_library().display())),
        "{line}"
    );
}

#[test]
fn job_runs_every_stage_in_a_plain_qemu_guest_and_cleanup_removes_it() {
    let env = TestEnv::load();
    let ws = workspace(&env, "qemu-full-job");
    let git = GitServer::start(
        "127.0.0.1",
        "demo",
        &[("hello.txt", "hello from the repository\n")],
    );
    let repo_url = git.repo_url.replacen("127.0.0.1", HOST_FROM_GUEST, 1);
    let id = unique_job_id();
    let mut job = Job::new(
        id,
        "group/demo",
        &repo_url,
        &git.sha,
        &[
            "cat hello.txt",
            "echo \"build runs as $(id -un) on $(hostname) with kernel $(uname -r)\"",
            "echo build-stderr >&2",
        ],
    );
    job.steps.push(Step::new(
        "release",
        &["echo \"release step sees $GREETING\""],
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
    assert!(
        log.contains(&format!(
            "Creating VM {} with the qemu backend",
            vm_name(id)
        )),
        "{log}"
    );
    assert!(log.contains("Guest ready at 127.0.0.1:"), "{log}");
    assert!(log.contains("hello from the repository"), "{log}");
    assert!(
        log.contains("build runs as gitlab-runner on hyperjob-guest with kernel ")
            && log.contains("-cloud-amd64"),
        "{log}"
    );
    assert!(log.contains("build-stderr"), "{log}");
    assert!(log.contains("release step sees it's me"), "{log}");
    assert!(log.contains("after_script sees success"), "{log}");
    assert_eq!(report.invocations_of("cleanup").len(), 1);
    assert_nothing_left_of_qemu_vm(&ws, &vm_name(id));
}

#[test]
fn failing_script_is_a_build_failure_carrying_its_exit_code() {
    let env = TestEnv::load();
    let ws = workspace(&env, "qemu-exit-42");
    let id = unique_job_id();
    let mut job = Job::new(
        id,
        "group/fails",
        "",
        "",
        &["echo before the failure", "exit 42", "echo never printed"],
    );
    job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));

    let report = run_job(&driver(&env, &ws), &job, &settings());

    let log = report.log_text();
    assert_eq!(
        report.result,
        JobResult::BuildFailure { exit_code: 42 },
        "{log}"
    );
    assert!(log.contains("before the failure"), "{log}");
    assert!(!log.contains("never printed"), "{log}");
    assert_nothing_left_of_qemu_vm(&ws, &vm_name(id));
}

#[test]
fn per_job_keys_reach_a_cloud_init_guest_through_the_seed_disk() {
    let env = TestEnv::load();
    let ws = workspace(&env, "qemu-per-job-keys");
    let config = ws.qemu_per_job_keys_config(&qemu_plugin_library());
    assert!(
        config.contains("guest_keys = \"per-job\"")
            && config.contains(&env.cloudinit_image.display().to_string())
            && !config.contains("identity_file")
            && !config.contains("known_hosts"),
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
            "echo \"authorized: $(wc -l < ~/.ssh/authorized_keys)\"",
        ],
    );
    job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));

    let report = run_job(&driver(&env, &ws), &job, &settings());

    let log = report.log_text();
    assert_eq!(report.result, JobResult::Success, "{log}");
    assert!(
        log.contains("cloud-init seed with the job's SSH keys created"),
        "{log}"
    );
    assert!(log.contains("host keys in the guest: 1"), "{log}");
    assert!(log.contains("authorized: 1"), "{log}");
    // The seed (it holds the guest's private host key) and the job's key directory are gone.
    assert_nothing_left_of_qemu_vm(&ws, &vm_name(id));
}

#[test]
fn prepare_killed_mid_boot_leaves_a_qemu_that_cleanup_removes() {
    let env = TestEnv::load();
    let ws = workspace(&env, "qemu-killed-prepare");
    let id = unique_job_id();
    let vm = vm_name(id);
    let record = ws.images_dir.join(format!("{vm}.qemu.json"));

    let mut prepare = Stage::new(&env, &ws, id, &["prepare"]);
    let mut child = prepare
        .command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prepare");
    // Kill it as soon as QEMU runs (its pid is recorded): the guest is booting.
    wait_until("QEMU's pid in the record", Duration::from_secs(300), || {
        fs::read_to_string(&record).is_ok_and(|recorded| recorded.contains("\"pid\""))
    });
    child.kill().expect("SIGKILL prepare");
    let status = child.wait().expect("wait prepare");
    let mut progress = String::new();
    std::io::Read::read_to_string(
        &mut child.stdout.take().expect("prepare's stdout"),
        &mut progress,
    )
    .expect("read prepare's output");
    drop(prepare.tmp);
    assert!(
        !progress.contains("Guest ready"),
        "the kill came after the boot: {progress}"
    );

    let orphaned = qemu_processes_of(&vm);
    let mode = fs::metadata(&record).map(|m| m.permissions().mode() & 0o777);
    let cleanup = Stage::new(&env, &ws, id, &["cleanup"]).output();

    assert!(!status.success(), "prepare finished before it was killed");
    assert!(
        !orphaned.is_empty(),
        "QEMU should outlive the killed prepare (it runs detached)"
    );
    assert_eq!(mode.ok(), Some(0o600), "state file must be 0600");
    assert!(
        cleanup.status.success(),
        "{}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    assert_nothing_left_of_qemu_vm(&ws, &vm);
}

#[test]
fn cleanup_without_a_prepare_succeeds_and_repeats() {
    let env = TestEnv::load();
    let ws = workspace(&env, "qemu-cleanup-only");
    let id = unique_job_id();

    let first = Stage::new(&env, &ws, id, &["cleanup"]).output();
    let second = Stage::new(&env, &ws, id, &["cleanup"]).output();

    for output in [&first, &second] {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_nothing_left_of_qemu_vm(&ws, &vm_name(id));
}

#[test]
fn job_runs_over_a_unix_socket_endpoint_through_the_relay_and_keeps_the_exit_code() {
    let env = TestEnv::load();
    let ws = workspace(&env, "qemu-unix-relay");
    ws.write_config(&qemu_unix_endpoint_config(&ws, true));
    let id = unique_job_id();
    let mut job = Job::new(
        id,
        "group/unix",
        "",
        "",
        &[
            "echo \"stdout over the socket from $(hostname)\"",
            "echo stderr-over-the-socket >&2",
        ],
    );
    job.steps.push(Step::new(
        "release",
        &["echo release runs", "exit 7", "echo never printed"],
    ));
    job.after_script = vec!["echo \"after_script sees $CI_JOB_STATUS\"".to_string()];
    job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));

    let report = run_job(&driver(&env, &ws), &job, &settings());

    let log = report.log_text();
    assert_eq!(
        report.result,
        JobResult::BuildFailure { exit_code: 7 },
        "{log}"
    );
    let socket = ws.images_dir.join(format!("{}.ssh.sock", vm_name(id)));
    assert!(
        log.contains(&format!("Guest ready at unix:{}", socket.display())),
        "{log}"
    );
    assert!(
        log.contains("stdout over the socket from hyperjob-guest"),
        "{log}"
    );
    assert!(log.contains("stderr-over-the-socket"), "{log}");
    assert!(log.contains("release runs"), "{log}");
    assert!(!log.contains("never printed"), "{log}");
    assert!(log.contains("after_script sees failed"), "{log}");
    assert_eq!(report.invocations_of("cleanup").len(), 1);
    assert_nothing_left_of_qemu_vm(&ws, &vm_name(id));
}

/// Without the relay every stage opens its own session: one connection after another through
/// the same socket (and the same virtio-serial port), each a fresh SSH session.
#[test]
fn every_stage_opens_its_own_session_over_a_unix_socket_endpoint() {
    let env = TestEnv::load();
    let ws = workspace(&env, "qemu-unix-direct");
    ws.write_config(&qemu_unix_endpoint_config(&ws, false));
    let id = unique_job_id();
    let mut job = Job::new(id, "group/unix", "", "", &["echo build-$((6 * 7))"]);
    for step in ["one", "two", "three"] {
        job.steps
            .push(Step::new(step, &[&format!("echo step-{step} >&2")]));
    }
    job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));

    let report = run_job(&driver(&env, &ws), &job, &settings());

    let log = report.log_text();
    assert_eq!(report.result, JobResult::Success, "{log}");
    assert!(log.contains("build-42"), "{log}");
    for step in ["one", "two", "three"] {
        assert!(log.contains(&format!("step-{step}")), "{log}");
    }
    assert_nothing_left_of_qemu_vm(&ws, &vm_name(id));
}

/// `hyperjob config` refuses a transport that cannot reach what the backend hands out: the
/// Python sshcli transport reaches TCP only.
#[test]
fn config_refuses_a_transport_that_cannot_reach_the_unix_endpoint() {
    let env = TestEnv::load();
    let ws = workspace(&env, "qemu-unix-sshcli");
    let config = qemu_unix_endpoint_config(&ws, true)
        .replacen(
            "transport = \"ssh\"",
            &format!(
                "transport = \"sshcli\"\nplugins = [{:?}, {:?}]",
                qemu_plugin_library().display().to_string(),
                support::python_plugin().display().to_string()
            ),
            1,
        )
        .lines()
        .filter(|line| !line.starts_with("plugins = [") || line.contains("sshcli"))
        .map(|line| format!("{line}\n"))
        .collect::<String>()
        .replace("[transports.ssh]\nrelay = true\n", "[transports.sshcli]\n");
    ws.write_config(&config);

    let output = Stage::new(&env, &ws, unique_job_id(), &["config"]).output();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "backend \"qemu\" hands out unix endpoints, but transport \"sshcli\" reaches only tcp"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
