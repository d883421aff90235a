//! The demo job behind `scripts/demo.sh`: one GitLab CI job, driven through the real `hyperjob`
//! binary exactly as GitLab Runner's Custom executor drives it, in a real VM of the namespaced
//! test environment. The job log is printed live as the VM produces it, then the time every
//! driver invocation took.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::ExitCode;

use hyperjob_test_harness::{run_job, Driver, JobResult};
use support::{demo_git_server, demo_job, unique_job_id, TestEnv};

fn main() -> ExitCode {
    let env = TestEnv::load();
    let ws = env.workspace("demo");
    let qemu_plugin = match std::env::var("HYPERJOB_DEMO_BACKEND").as_deref() {
        Ok("qemu") => Some(
            std::env::var("HYPERJOB_QEMU_PLUGIN")
                .expect("HYPERJOB_QEMU_PLUGIN names the QEMU backend plugin library"),
        ),
        _ => None,
    };
    // The libvirt guests reach the host at the bridge address; QEMU user-mode guests reach the
    // host's loopback at 10.0.2.2.
    let (bind_ip, guest_sees_host) = match &qemu_plugin {
        Some(plugin) => {
            ws.write_config(&ws.qemu_config(std::path::Path::new(plugin)));
            ("127.0.0.1".to_string(), "10.0.2.2".to_string())
        }
        None => (env.bridge_ip.clone(), env.bridge_ip.clone()),
    };
    let git = demo_git_server(&bind_ip);
    let repo_url = git.repo_url.replacen(&bind_ip, &guest_sees_host, 1);
    let id = unique_job_id();
    let job = demo_job(id, &repo_url, &git.sha);
    let driver = Driver::single_binary(&env.hyperjob).with_env(
        "HYPERJOB_CONFIG",
        ws.config_path.to_str().expect("utf-8 path"),
    );
    let settings = hyperjob_test_harness::RunnerSettings {
        echo_log: true,
        ..Default::default()
    };

    let backend = if qemu_plugin.is_some() {
        "qemu (plugin library)"
    } else {
        "libvirt"
    };
    println!(
        "== demo: job {id} through {} with the {backend} backend ==",
        env.hyperjob.display()
    );
    let report = run_job(&driver, &job, &settings);

    println!("\n== time per driver invocation ==");
    for invocation in &report.invocations {
        println!(
            "{:<24} {:>7.2} s",
            invocation.kind.label(),
            invocation.duration.as_secs_f64()
        );
    }
    println!(
        "{:<24} {:>7.2} s",
        "whole job",
        report.duration.as_secs_f64()
    );
    ws.assert_nothing_left(&format!("hyperjob-job-{id}"));
    println!("after cleanup: no domain, overlay, state file or QEMU process of the job remains");
    match report.result {
        JobResult::Success => ExitCode::SUCCESS,
        other => {
            eprintln!("demo job did not succeed: {other:?}");
            ExitCode::FAILURE
        }
    }
}
