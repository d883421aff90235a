//! End-to-end `hyperjob doctor`: every check passes on the test environment (with a GitLab
//! Runner config that calls hyperjob correctly), each broken setup is named by its own ✗ line
//! with a fix and a non-zero exit, and `--boot` boots, logs in and leaves nothing. Real binary,
//! real libvirtd; run with scripts/test.sh.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{assert_nothing_left_of_qemu_vm, qemu_unix_endpoint_config, TestEnv, Workspace};

/// Runs `hyperjob doctor` with the workspace's config; its exit success and its report.
fn doctor(env: &TestEnv, ws: &Workspace, runner_config: &Path, extra: &[&str]) -> (bool, String) {
    let output = Command::new(&env.hyperjob)
        .arg("--config")
        .arg(&ws.config_path)
        .arg("doctor")
        .arg("--runner-config")
        .arg(runner_config)
        .args(extra)
        .output()
        .expect("run hyperjob doctor");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), report)
}

/// A GitLab Runner config whose custom executor calls the hyperjob under test with `config`.
fn runner_config(env: &TestEnv, ws: &Workspace, run_args: &str) -> PathBuf {
    let path = ws.dir.join("gitlab-runner.toml");
    let exe = env.hyperjob.display();
    let config = ws.config_path.display();
    let mut text = String::from(
        "concurrent = 2\n[[runners]]\nname = \"vm-runner\"\nexecutor = \"custom\"\n[runners.custom]\n",
    );
    for (stage, args) in [
        ("config", "\"config\""),
        ("prepare", "\"prepare\""),
        ("run", run_args),
        ("cleanup", "\"cleanup\""),
    ] {
        text.push_str(&format!(
            "{stage}_exec = \"{exe}\"\n{stage}_args = [\"--config\", \"{config}\", {args}]\n"
        ));
    }
    std::fs::write(&path, text).expect("runner config");
    path
}

fn failed_lines(report: &str) -> Vec<&str> {
    report.lines().filter(|l| l.starts_with('✗')).collect()
}

#[test]
fn doctor_passes_on_a_healthy_setup_and_boots_a_vm_end_to_end() {
    let env = TestEnv::load();
    let ws = env.workspace("doctor-healthy");
    let runner = runner_config(&env, &ws, "\"run\"");

    let (ok, report) = doctor(&env, &ws, &runner, &[]);
    println!("hyperjob doctor on the test environment:\n{report}");

    assert!(ok, "{report}");
    assert!(failed_lines(&report).is_empty(), "{report}");
    for needle in [
        "✓ config ",
        "✓ plugins: ",
        "✓ libvirt at ",
        "✓ network ",
        "✓ nwfilter ",
        "✓ base_image ",
        "✓ kernel ",
        "✓ images_dir ",
        "✓ ssh known_hosts ",
        "✓ ssh identity_file ",
        "runner \"vm-runner\": [runners.custom] runs hyperjob",
    ] {
        assert!(report.contains(needle), "{needle}: {report}");
    }

    let (ok, report) = doctor(&env, &ws, &runner, &["--boot"]);
    println!("hyperjob doctor --boot:\n{report}");
    assert!(ok, "{report}");
    assert!(report.contains("✓ --boot: VM "), "{report}");
    std::fs::remove_file(runner).expect("remove runner config");
    ws.assert_nothing_left("hyperjob-job-doctor-");
}

/// `--boot` over a UNIX socket endpoint: the QEMU plugin's virtio-serial port.
#[test]
fn doctor_boot_logs_in_over_a_unix_endpoint_of_the_qemu_plugin() {
    let env = TestEnv::load();
    let ws = env.workspace("doctor-unix");
    ws.write_config(&qemu_unix_endpoint_config(&ws, true));
    let runner = runner_config(&env, &ws, "\"run\"");

    let (ok, report) = doctor(&env, &ws, &runner, &["--boot"]);
    println!("hyperjob doctor --boot (unix endpoint):\n{report}");

    assert!(ok, "{report}");
    let boot = report
        .lines()
        .find(|line| line.starts_with("✓ --boot: VM "))
        .unwrap_or_else(|| panic!("no --boot line: {report}"));
    assert!(boot.contains(".ssh.sock"), "{boot}");
    std::fs::remove_file(runner).expect("remove runner config");
    let vm = format!("hyperjob-job-doctor-{}", boot_pid(boot));
    assert_nothing_left_of_qemu_vm(&ws, &vm);
}

/// The pid in `--boot: VM hyperjob-job-doctor-<pid> …`.
fn boot_pid(line: &str) -> String {
    line.split("doctor-")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn each_broken_setup_is_named_with_a_fix_and_fails_the_doctor() {
    let env = TestEnv::load();
    let ws = env.workspace("doctor-broken");
    let good = ws.default_config();
    let runner = runner_config(&env, &ws, "\"run\"");
    let closed = ws.dir.join("closed");
    std::fs::create_dir_all(closed.join("images")).expect("mkdir");
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let loose_key = ws.dir.join("id_loose");
    std::fs::copy(&env.identity_file, &loose_key).expect("copy key");
    std::fs::set_permissions(&loose_key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let empty_known_hosts = ws.dir.join("known_hosts.empty");
    std::fs::write(&empty_known_hosts, "# nothing pinned\n").expect("write");
    let images = ws.images_dir.display().to_string();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "libvirtd unreachable",
            good.replace(&env.libvirt_uri, "qemu:///system?socket=/nonexistent/sock"),
            "✗ libvirt at qemu:///system?socket=/nonexistent/sock: cannot connect",
        ),
        (
            "no such network",
            good.replace(
                &format!("network = \"{}\"", env.network),
                "network = \"nope\"",
            ),
            "✗ network \"nope\"",
        ),
        (
            "missing base image",
            good.replace(
                &env.base_image.display().to_string(),
                "/nonexistent/base.qcow2",
            ),
            "✗ base_image /nonexistent/base.qcow2: does not exist",
        ),
        (
            "images_dir QEMU cannot reach",
            good.replace(&images, &closed.join("images").display().to_string()),
            "cannot search",
        ),
        (
            "a private key others can read",
            good.replace(
                &env.identity_file.display().to_string(),
                &loose_key.display().to_string(),
            ),
            "is mode 0644",
        ),
        (
            "known_hosts without a key",
            good.replace(
                &env.known_hosts.display().to_string(),
                &empty_known_hosts.display().to_string(),
            ),
            "contains no host keys",
        ),
        (
            "a config with an unknown key",
            good.replacen("[backends.libvirt]", "[backends.libvirt]\nvcpu = 2", 1),
            "✗ the selected plugins",
        ),
    ];
    let mut summary = Vec::new();
    for (name, config, needle) in &cases {
        ws.write_config(config);
        let (ok, report) = doctor(&env, &ws, &runner, &[]);
        let failed = failed_lines(&report);
        summary.push(format!("{name}: {}", failed.join(" | ")));
        assert!(!ok, "{name}: doctor passed:\n{report}");
        assert!(
            failed.iter().any(|line| line.contains(needle)),
            "{name}: no ✗ line with {needle:?}:\n{report}"
        );
    }
    ws.write_config(&good);
    let bad_runner = runner_config(&env, &ws, "\"run\", \"extra\"");
    let (ok, report) = doctor(&env, &ws, &bad_runner, &[]);
    summary.push(format!(
        "runner config: {}",
        failed_lines(&report).join(" | ")
    ));
    assert!(!ok, "{report}");
    assert!(
        report.contains("run_args must end with \"run\""),
        "{report}"
    );
    println!("{}", summary.join("\n"));

    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::remove_dir_all(&closed).expect("remove");
    for file in [loose_key, empty_known_hosts, bad_runner] {
        std::fs::remove_file(file).expect("remove");
    }
    ws.assert_nothing_left("hyperjob-job-doctor-");
}
