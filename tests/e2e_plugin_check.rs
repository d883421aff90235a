//! End-to-end: `hyperjob plugin-check`, the conformance run of the selected backend and
//! transport, through the real binary against real guests. The shipped plugins pass it (the
//! QEMU backend library with the SSH transport, the libvirt backend with the Python sshcli
//! transport); a broken backend and a transport that leaves a cancelled script running fail
//! it with the clause named; an interrupted check leaves no VM behind. Run with
//! scripts/test.sh (the QEMU ones need `HYPERJOB_QEMU_PLUGIN`).

mod support;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use support::{
    assert_nothing_left_of_qemu_vm, fixture_library, python_plugin, python_transport_config,
    qemu_plugin_library, qemu_unix_endpoint_config, TestEnv, Workspace,
};

/// The clauses every shipped plugin pair passes, as their lines begin.
const REQUIRED: &[&str] = &[
    "build: backend",
    "build: transport",
    "bad config: [backends.",
    "bad config: [transports.",
    "destroy of a name that never existed",
    "create:",
    "list_owned while the VM exists",
    "inspect while the VM exists",
    "wait_address",
    "wait_ready",
    "run_script (bash)",
    "run_script (sh)",
    "cancel a running script",
    "console_tail",
    "destroy:",
    "destroy again (idempotent)",
    "list_owned after destroy",
    "inspect after destroy",
];

/// How a plugin-check ended: its exit status, stdout, stderr and the VM name it used.
struct Checked {
    success: bool,
    stdout: String,
    stderr: String,
    vm_name: String,
}

impl Checked {
    /// The line of the clause starting with `clause`, with its mark (`✓ `, `✗ `, `- `) removed.
    fn clause(&self, mark: &str, clause: &str) -> Option<&str> {
        self.stdout
            .lines()
            .filter_map(|line| line.strip_prefix(mark))
            .find(|line| line.starts_with(clause))
    }

    fn failed_lines(&self) -> Vec<&str> {
        self.stdout.lines().filter(|l| l.starts_with('✗')).collect()
    }

    fn assert_passed(&self) {
        assert!(
            self.success && self.failed_lines().is_empty(),
            "{}\n{}",
            self.stdout,
            self.stderr
        );
        for clause in REQUIRED {
            assert!(
                self.clause("✓ ", clause).is_some(),
                "no ✓ line for {clause:?}:\n{}",
                self.stdout
            );
        }
    }
}

fn plugin_check_command(env: &TestEnv, ws: &Workspace) -> Command {
    let mut command = Command::new(&env.hyperjob);
    command
        .arg("--config")
        .arg(&ws.config_path)
        .arg("plugin-check")
        .env_remove("JOB_RESPONSE_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// The VM of the check run by process `pid`: a job id above `i64::MAX`, no GitLab job's.
fn vm_name_of(pid: u32) -> String {
    format!("hyperjob-job-{}", (1u64 << 63) + u64::from(pid))
}

fn plugin_check(env: &TestEnv, ws: &Workspace) -> Checked {
    let child = plugin_check_command(env, ws)
        .spawn()
        .expect("run plugin-check");
    let vm_name = vm_name_of(child.id());
    let output = child.wait_with_output().expect("wait for plugin-check");
    // The report, for --nocapture.
    println!("{}", String::from_utf8_lossy(&output.stdout));
    Checked {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        vm_name,
    }
}

fn qemu_workspace(env: &TestEnv, name: &str) -> Workspace {
    let ws = env.workspace(name);
    ws.write_config(&ws.qemu_config(&qemu_plugin_library()));
    ws
}

#[test]
fn the_qemu_library_with_the_ssh_transport_passes_plugin_check() {
    let env = TestEnv::load();
    let ws = qemu_workspace(&env, "check-qemu-ssh");

    let checked = plugin_check(&env, &ws);

    checked.assert_passed();
    let create = checked.clause("✓ ", "create:").expect("create");
    assert!(create.contains(&checked.vm_name), "{}", checked.stdout);
    let cancel = checked
        .clause("✓ ", "cancel a running script")
        .expect("cancel");
    assert!(cancel.contains("are gone"), "{}", checked.stdout);
    // The SSH transport keeps one connection for many scripts.
    assert!(
        checked
            .clause("✓ ", "connect: scripts over one connection")
            .is_some(),
        "{}",
        checked.stdout
    );
    assert_nothing_left_of_qemu_vm(&ws, &checked.vm_name);
}

/// The same over a UNIX socket endpoint (a virtio-serial port): every clause, the cancelled
/// script's processes checked over a session of their own, scripts over one connection.
#[test]
fn the_qemu_library_with_a_unix_endpoint_passes_plugin_check() {
    let env = TestEnv::load();
    let ws = env.workspace("check-qemu-unix");
    ws.write_config(&qemu_unix_endpoint_config(&ws, true));

    let checked = plugin_check(&env, &ws);

    checked.assert_passed();
    let address = checked.clause("✓ ", "wait_address").expect("wait_address");
    assert!(address.contains(".ssh.sock after "), "{}", checked.stdout);
    assert!(
        checked
            .clause("✓ ", "connect: scripts over one connection")
            .is_some(),
        "{}",
        checked.stdout
    );
    assert_nothing_left_of_qemu_vm(&ws, &checked.vm_name);
}

#[test]
fn the_libvirt_backend_with_the_sshcli_transport_passes_plugin_check() {
    let env = TestEnv::load();
    let ws = env.workspace("check-libvirt-sshcli");
    ws.write_config(&python_transport_config(&ws));

    let checked = plugin_check(&env, &ws);

    checked.assert_passed();
    let built = checked.clause("✓ ", "build: transport").expect("build");
    assert!(
        built.contains(&format!("executable {}", python_plugin().display())),
        "{}",
        checked.stdout
    );
    // libvirt has the optional operations the warm pool and cleanup use.
    for clause in ["relabel", "halt", "fingerprint", "names_with_files after"] {
        assert!(
            checked.clause("✓ ", clause).is_some(),
            "no ✓ line for {clause:?}:\n{}",
            checked.stdout
        );
    }
    ws.assert_nothing_left(&checked.vm_name);
}

/// The cloud-init guest with `guest_keys = "per-job"`: the check's VM gets its own keys (and
/// its client key, in the check's keys dir, goes with it).
#[test]
fn plugin_check_passes_with_per_job_keys() {
    let env = TestEnv::load();
    let ws = env.workspace("check-per-job-keys");
    ws.write_config(&ws.per_job_keys_config());

    let checked = plugin_check(&env, &ws);

    checked.assert_passed();
    let create = checked.clause("✓ ", "create:").expect("create");
    assert!(create.contains("with per-job keys"), "{}", checked.stdout);
    ws.assert_nothing_left(&checked.vm_name);
}

/// tests/plugins/panicky: its backend accepts any table and panics in create.
#[test]
fn a_broken_backend_fails_plugin_check_naming_each_clause_and_nothing_is_left() {
    let env = TestEnv::load();
    let ws = env.workspace("check-panicky");
    let library = fixture_library(&env.hyperjob, "panicky");
    let config = ws
        .default_config()
        .replacen(
            "backend = \"libvirt\"",
            &format!(
                "backend = \"panicky\"\nplugins = [{:?}]",
                library.display().to_string()
            ),
            1,
        )
        .replace("[backends.libvirt]", "[backends.panicky]");
    ws.write_config(&config);

    let checked = plugin_check(&env, &ws);

    assert!(!checked.success, "{}", checked.stdout);
    let bad_config = checked
        .clause("✗ ", "bad config: [backends.panicky] with an unknown key")
        .expect("the bad-config clause fails");
    assert!(
        bad_config.contains("was accepted")
            && bad_config.contains("hyperjob_plugin_check_unknown_key"),
        "{}",
        checked.stdout
    );
    let create = checked.clause("✗ ", "create").expect("create fails");
    assert!(create.contains("panicked"), "{}", checked.stdout);
    // Nothing after create ran; the VM was still destroyed.
    assert!(
        checked.clause("", "wait_address").is_none(),
        "{}",
        checked.stdout
    );
    assert!(
        checked.clause("✓ ", "destroy:").is_some(),
        "{}",
        checked.stdout
    );
    assert!(
        checked
            .clause("✓ ", "bad config: [transports.ssh]")
            .is_some(),
        "{}",
        checked.stdout
    );
    assert!(
        checked.stderr.contains("check(s) failed"),
        "{}",
        checked.stderr
    );
    ws.assert_nothing_left(&checked.vm_name);
}

/// The sshcli plugin as it was before it stopped a cancelled script in the guest: it only
/// ends its local ssh.
fn sshcli_without_remote_stop(dir: &Path) -> std::path::PathBuf {
    let source = std::fs::read_to_string(python_plugin()).expect("read sshcli");
    let stop = "self.stop_remote(endpoint, known_hosts, run_id)";
    assert!(source.contains(stop), "sshcli changed: update this test");
    let path = dir.join("hyperjob-transport-sshcli");
    std::fs::write(&path, source.replace(stop, "pass")).expect("write");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    path
}

#[test]
fn a_transport_that_leaves_a_cancelled_script_running_fails_the_cancel_clause() {
    let env = TestEnv::load();
    let ws = env.workspace("check-no-remote-stop");
    let plugins = tempfile::tempdir().expect("tempdir");
    let broken = sshcli_without_remote_stop(plugins.path());
    let config = ws
        .qemu_config(&qemu_plugin_library())
        .replacen(
            "plugins = [",
            &format!("plugins = [{:?}, ", broken.display().to_string()),
            1,
        )
        .replace("transport = \"ssh\"", "transport = \"sshcli\"")
        .replace("[transports.ssh]", "[transports.sshcli]");
    ws.write_config(&config);

    let checked = plugin_check(&env, &ws);

    assert!(!checked.success, "{}", checked.stdout);
    let cancel = checked
        .clause("✗ ", "cancel a running script")
        .expect("the cancel clause fails");
    assert!(cancel.contains("still run"), "{}", checked.stdout);
    assert_eq!(checked.failed_lines().len(), 1, "{}", checked.stdout);
    assert!(checked.clause("✓ ", "run_script (bash)").is_some());
    assert_nothing_left_of_qemu_vm(&ws, &checked.vm_name);
}

#[test]
fn an_interrupted_plugin_check_destroys_its_vm() {
    let env = TestEnv::load();
    let ws = qemu_workspace(&env, "check-interrupted");
    let mut child = plugin_check_command(&env, &ws)
        .spawn()
        .expect("run plugin-check");
    let vm_name = vm_name_of(child.id());
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut seen = String::new();
    // Stop it once its VM exists.
    while !seen.lines().any(|line| line.starts_with("✓ create:")) {
        let mut line = String::new();
        let read = stdout.read_line(&mut line).expect("read stdout");
        assert!(read > 0, "plugin-check ended before create:\n{seen}");
        seen.push_str(&line);
    }

    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    stdout.read_to_string(&mut seen).expect("read stdout");
    let status = child.wait().expect("wait");
    println!("{seen}");

    assert!(sent.success());
    assert!(!status.success(), "{seen}");
    assert!(
        seen.lines()
            .any(|line| line.starts_with("✗ plugin-check: interrupted by a signal")),
        "{seen}"
    );
    assert!(
        seen.lines().any(|line| line.starts_with("✓ destroy:")),
        "{seen}"
    );
    assert_nothing_left_of_qemu_vm(&ws, &vm_name);
}
