//! The Python executable transport plugin (plugins/transport-sshcli) through the real binary,
//! against real libvirt guests: a job passes through it, a failing script keeps its exit code,
//! and `hyperjob plugins` names it. Run with scripts/test.sh.

mod support;

use std::process::Command;
use std::time::Duration;

use hyperjob_test_harness::{run_job, Driver, Job, JobResult, JobVariable, RunnerSettings, Step};
use support::{python_plugin, python_transport_config, unique_job_id, TestEnv, Workspace};

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

#[test]
fn a_job_passes_through_the_python_transport_plugin() {
    let env = TestEnv::load();
    let ws = env.workspace("python-transport");
    ws.write_config(&python_transport_config(&ws));
    let id = unique_job_id();
    let mut job = Job::new(
        id,
        "group/python",
        "",
        "",
        &[
            "echo \"python transport reached $(hostname)\"",
            "echo to-stderr >&2",
        ],
    );
    job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));
    job.steps.push(Step::new("release", &["echo release step"]));

    let report = run_job(&driver(&env, &ws), &job, &settings());

    let log = report.log_text();
    assert_eq!(report.result, JobResult::Success, "{log}");
    assert!(
        log.contains("python transport reached hyperjob-guest"),
        "{log}"
    );
    assert!(log.contains("to-stderr"), "{log}");
    assert!(log.contains("release step"), "{log}");
    ws.assert_nothing_left(&format!("hyperjob-job-{id}"));
}

#[test]
fn a_failing_script_keeps_its_exit_code_through_the_python_plugin() {
    let env = TestEnv::load();
    let ws = env.workspace("python-transport-42");
    ws.write_config(&python_transport_config(&ws));
    let id = unique_job_id();
    let mut job = Job::new(id, "group/python", "", "", &["exit 42"]);
    job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));

    let report = run_job(&driver(&env, &ws), &job, &settings());

    assert_eq!(
        report.result,
        JobResult::BuildFailure { exit_code: 42 },
        "{}",
        report.log_text()
    );
    ws.assert_nothing_left(&format!("hyperjob-job-{id}"));
}

#[test]
fn plugins_names_the_executable_plugin() {
    let env = TestEnv::load();
    let ws = env.workspace("python-listed");
    ws.write_config(&python_transport_config(&ws));

    let output = Command::new(&env.hyperjob)
        .arg("--config")
        .arg(&ws.config_path)
        .arg("plugins")
        .output()
        .expect("run");

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("transport")
            && l.contains("sshcli")
            && l.contains("0.1.0")
            && l.ends_with(&format!("executable {}", python_plugin().display()))),
        "{stdout}"
    );
}
