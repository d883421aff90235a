//! Executable plugins (protocol 2) through the real binary, against real guests: the Python
//! transport (plugins/transport-sshcli) with the libvirt backend — a job passes through it, a
//! failing script keeps its exit code, a 20 MiB script arrives whole, `hyperjob plugins` names
//! it — and a job whose backend *and* transport are executables: the QEMU backend served by
//! hyperjob-core's `serve()` (tests/plugins/served) with the Python transport. Without a VM:
//! `config` checks the capabilities the config needs, refuses a version 1 plugin, and starts
//! plugins with a clean environment. A SIGTERM to `run` reaches the plugin, which runs in a
//! process group of its own, as a cancel. Run with scripts/test.sh.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hyperjob_test_harness::{
    run_job, Driver, ExitInfo, Job, JobResult, JobVariable, RunnerSettings, Stage, Step,
};
use support::{
    job_without_sources, prepared_session_of, python_plugin, python_transport_config,
    qemu_plugin_library, served_backend, session_log, stderr, stoppable_job, unique_job_id,
    vm_name, wait_until, write_executable, PluginSetup, TestEnv, Workspace,
};

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
            && l.contains("0.2.0")
            && l.ends_with(&format!("executable {}", python_plugin().display()))),
        "{stdout}"
    );
}

/// A script of 20 MiB (the runner's wrapper around a command whose here-document pads it)
/// goes to the guest in frames, whole: the v1 protocol's 4 MiB line cap would have refused it.
#[test]
fn a_20_mib_script_reaches_the_guest_whole_through_the_python_plugin() {
    const PAD: usize = 20 << 20;
    let env = TestEnv::load();
    let ws = env.workspace("python-20mib");
    // bash holds the runner's script several times over (read, unquoted, eval'd, the
    // here-document): more than the default guest's 512 MiB.
    ws.write_config(&python_transport_config(&ws).replace("memory_mib = 512", "memory_mib = 2048"));
    let id = unique_job_id();
    let line = "x".repeat(1023);
    let lines = PAD / 1024;
    let command = format!(
        "n=$(wc -c <<'HYPERJOB_PAD'\n{}HYPERJOB_PAD\n); echo \"padding of $n bytes reached the guest\"",
        format!("{line}\n").repeat(lines)
    );
    let job = job_without_sources(id, "group/python-big", &[&command]);
    let started = std::time::Instant::now();

    let report = run_job(&driver(&env, &ws), &job, &settings());

    let log = report.log_text();
    let build_script = report
        .invocations
        .iter()
        .filter_map(|i| i.script.as_ref().map(String::len))
        .find(|len| *len > PAD);
    println!(
        "job with a {:.1} MiB build script: {:.1} s",
        build_script.unwrap_or(0) as f64 / f64::from(1 << 20),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(report.result, JobResult::Success, "{}", tail(&log));
    assert!(
        log.contains(&format!("padding of {PAD} bytes reached the guest")),
        "{}",
        tail(&log)
    );
    assert!(
        build_script.is_some(),
        "no build script over 20 MiB was run"
    );
    ws.assert_nothing_left(&format!("hyperjob-job-{id}"));
}

/// The end of a long log (the padding is not in it, but the runner's lines are).
fn tail(log: &str) -> &str {
    let mut start = log.len().saturating_sub(4000);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}

/// `config` (a QEMU-plugin config) with the backend served by `served` as `qemuexec` and the
/// Python transport as `sshcli`.
fn served_config(config: &str, served: &Path) -> String {
    config
        .replacen(
            &format!("plugins = [\"{}\"]", qemu_plugin_library().display()),
            &format!(
                "plugins = [{:?}, {:?}]",
                served.display().to_string(),
                python_plugin().display().to_string()
            ),
            1,
        )
        .replace("backend = \"qemu\"", "backend = \"qemuexec\"")
        .replace("[backends.qemu]", "[backends.qemuexec]")
        .replace("transport = \"ssh\"", "transport = \"sshcli\"")
        .replace("[transports.ssh]", "[transports.sshcli]")
}

/// The QEMU backend's library factory served as the executable backend `qemuexec` (Rust,
/// `serve()`), with the Python transport: both plugins are executables. The job runs, create's
/// progress reaches the job log, cleanup removes everything, and gc (the served `list_owned`)
/// and `hyperjob plugins` work with it.
#[test]
fn a_job_runs_with_a_served_rust_backend_and_the_python_transport() {
    let env = TestEnv::load();
    let ws = env.workspace("served-backend");
    let served = served_backend(&env.hyperjob);
    ws.write_config(&served_config(
        &ws.qemu_config(&qemu_plugin_library()),
        &served,
    ));
    let id = unique_job_id();
    let job = job_without_sources(
        id,
        "group/served",
        &["echo \"served backend reached $(hostname)\""],
    );

    let report = run_job(&driver(&env, &ws), &job, &settings());
    let gc_after = Command::new(&env.hyperjob)
        .arg("--config")
        .arg(&ws.config_path)
        .arg("gc")
        .output()
        .expect("run gc");
    let listing = Command::new(&env.hyperjob)
        .arg("--config")
        .arg(&ws.config_path)
        .arg("plugins")
        .output()
        .expect("run plugins");

    let log = report.log_text();
    assert_eq!(report.result, JobResult::Success, "{log}");
    assert!(
        log.contains("served backend reached hyperjob-guest"),
        "{log}"
    );
    assert!(
        log.contains("starting QEMU"),
        "create's progress is missing: {log}"
    );
    assert!(
        gc_after.status.success(),
        "{}",
        String::from_utf8_lossy(&gc_after.stderr)
    );
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.lines().any(|l| l.starts_with("backend")
            && l.contains("qemuexec")
            && l.ends_with(&format!("executable {}", served.display()))),
        "{listing}"
    );
    ws.assert_nothing_left(&vm_name(id));
}

/// Per-job keys through two executables: the served backend gets the job's keys in `create`
/// (its cloud-init seed puts them into the guest), the Python transport logs in with the job's
/// key and accepts only the job's host key. The config has no client key and no known_hosts.
#[test]
fn per_job_keys_pass_through_a_served_backend_and_the_python_transport() {
    let env = TestEnv::load();
    let ws = env.workspace("served-per-job");
    let base = ws.qemu_per_job_keys_config(&qemu_plugin_library());
    ws.write_config(&served_config(&base, &served_backend(&env.hyperjob)));
    let id = unique_job_id();
    let job = job_without_sources(
        id,
        "group/served-keys",
        &["echo \"logged in as $(id -un)\""],
    );

    let report = run_job(&driver(&env, &ws), &job, &settings());

    let log = report.log_text();
    assert_eq!(report.result, JobResult::Success, "{log}");
    assert!(
        log.contains("cloud-init seed with the job's SSH keys created"),
        "{log}"
    );
    assert!(
        log.contains(&format!("logged in as {}", env.guest_user)),
        "{log}"
    );
    ws.assert_nothing_left(&vm_name(id));
}

/// A shell backend `shell` speaking protocol `protocol` with `capabilities` (a JSON list):
/// writes its environment to `env_file`, answers every request with `{}`.
fn shell_backend(setup: &PluginSetup, protocol: u32, capabilities: &str) -> PathBuf {
    let env_file = setup.path("plugin-env");
    write_executable(
        setup.dir.path(),
        "hyperjob-backend-shell",
        &format!(
            r#"echo '{{"hello":{{"protocol":{protocol},"kind":"backend","name":"shell","version":"1","capabilities":{capabilities}}}}}'
env > '{env}'
while read line; do
  id=$(echo "$line" | sed -n 's/^{{"id":\([0-9]*\).*/\1/p')
  [ -n "$id" ] && echo "{{\"id\":$id,\"result\":{{}}}}"
done"#,
            env = env_file.display()
        ),
    )
}

#[test]
fn config_fails_with_one_line_when_the_plugin_lacks_a_capability_the_config_needs() {
    let setup = PluginSetup::new("libvirt", &[]);
    let plugin = shell_backend(&setup, 2, r#"["list_owned"]"#);
    setup.write("shell", &[&plugin], &[], "");
    let plain = setup.run(&["config"]);
    setup.edit_config(|c| {
        c.replacen(
            "transport = \"ssh\"\n",
            "transport = \"ssh\"\nguest_keys = \"per-job\"\n",
            1,
        )
    });
    let per_job = setup.run(&["config"]);
    setup.edit_config(|c| {
        format!("{c}\n[pool]\nsize = 1\n").replace("guest_keys = \"per-job\"\n", "")
    });
    let pooled = setup.run(&["config"]);

    assert!(plain.status.success(), "{}", stderr(&plain));
    for (output, expected) in [
        (
            &per_job,
            "guest_keys = \"per-job\" needs the capability `per_job_keys`",
        ),
        (
            &pooled,
            "a warm pool ([pool] size > 0) needs the capability `relabel`",
        ),
    ] {
        let err = stderr(output);
        assert_eq!(output.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!(
                "config file {} [backends.shell]: {expected}, which backend \"shell\" (executable plugin {}) does not declare",
                setup.path("config.toml").display(),
                plugin.display()
            )),
            "{err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
}

#[test]
fn a_version_1_plugin_is_refused_naming_both_versions() {
    let setup = PluginSetup::new("libvirt", &[]);
    let plugin = shell_backend(&setup, 1, "[]");
    setup.write("shell", &[&plugin], &[], "");

    let output = setup.run(&["config"]);

    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "executable plugin {} speaks protocol 1, hyperjob speaks 2 (see docs/plugin-protocol.md)",
            plugin.display()
        )),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// The runner passes job variables as `CUSTOM_ENV_*` to every stage; a plugin gets none of
/// them, nor anything else outside the allow-list, but the protocol range.
#[test]
fn a_plugin_gets_a_clean_environment_without_job_variables() {
    let setup = PluginSetup::new("libvirt", &[]);
    let plugin = shell_backend(&setup, 2, "[]");
    setup.write("shell", &[&plugin], &[], "");

    let output = std::process::Command::new(support::hyperjob())
        .arg("--config")
        .arg(setup.path("config.toml"))
        .arg("config")
        .env("JOB_RESPONSE_FILE", setup.path("response.json"))
        .env("CUSTOM_ENV_DEPLOY_TOKEN", "secret-token-value")
        .env("CUSTOM_ENV_CI_JOB_ID", "31337")
        .env("SOME_OPERATOR_VARIABLE", "x")
        .env("LANG", "C.UTF-8")
        .output()
        .expect("run hyperjob");

    assert!(output.status.success(), "{}", stderr(&output));
    let env = std::fs::read_to_string(setup.path("plugin-env")).expect("the plugin's env");
    assert!(!env.contains("CUSTOM_ENV_"), "{env}");
    assert!(!env.contains("secret-token-value"), "{env}");
    assert!(!env.contains("SOME_OPERATOR_VARIABLE"), "{env}");
    for expected in [
        "LANG=C.UTF-8\n",
        "HYPERJOB_PROTOCOL_MIN=2\n",
        "HYPERJOB_PROTOCOL_MAX=2\n",
        "\nPATH=",
    ] {
        assert!(env.contains(expected), "{expected:?} missing in {env}");
    }
}

/// Field `index` of /proc/PID/stat (1-based as in proc(5): 4 is the parent, 5 the group).
fn stat_field(pid: u32, index: usize) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses come the fields from 3 (the state) on.
    stat.rsplit(") ")
        .next()?
        .split(' ')
        .nth(index - 3)?
        .parse()
        .ok()
}

/// Whether process `pid` descends from process `ancestor`.
fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut current = pid;
    for _ in 0..32 {
        match stat_field(current, 4) {
            Some(parent) if parent == ancestor => return true,
            Some(parent) if parent > 1 => current = parent,
            _ => return false,
        }
    }
    false
}

/// The Python plugin processes below process `driver`.
fn plugin_children(driver: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| descends_from(*pid, driver))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("hyperjob-transport-sshcli"))
        })
        .collect()
}

/// The runner's SIGTERM goes to the stage's process group; the plugin is in a group of its own
/// and hears of it as a `cancel`: `run` ends as a system failure, and the plugin is gone.
#[test]
fn a_sigterm_to_run_cancels_the_script_in_the_plugin_and_ends_the_plugin() {
    let env = TestEnv::load();
    let ws = env.workspace("python-sigterm");
    ws.write_config(&python_transport_config(&ws));
    let id = unique_job_id();
    let session = prepared_session_of(&driver(&env, &ws), &stoppable_job(id, "python-sigterm"));
    let running = session
        .spawn_stage(&Stage::UserStep("script".into()))
        .expect("start build_script");
    let hyperjob = running.pid().expect("running");
    wait_until(
        "the line \"started\" in the job log",
        Duration::from_secs(300),
        || session.log().iter().any(|line| line.text == "started"),
    );
    let plugins = plugin_children(hyperjob);
    let groups: Vec<Option<u32>> = plugins.iter().map(|pid| stat_field(*pid, 5)).collect();

    let sent = std::time::Instant::now();
    running.signal_group(15).expect("SIGTERM");
    let run = running.wait_timeout(Duration::from_secs(60));
    let took = sent.elapsed();
    let plugin_left = plugins.iter().any(|pid| descends_from(*pid, hyperjob));
    let log = session_log(&session);
    session.cleanup();

    println!("run exited {:.2} s after SIGTERM", took.as_secs_f64());
    let run = run.unwrap_or_else(|_| panic!("run still runs 60 s after SIGTERM\n{log}"));
    assert_eq!(plugins.len(), 1, "{plugins:?}");
    assert_eq!(
        groups,
        [Some(plugins[0])],
        "the plugin is not in a process group of its own"
    );
    assert_eq!(run.exit, ExitInfo::Exited(2), "{log}");
    assert!(log.contains("interrupted"), "{log}");
    assert!(!plugin_left, "the plugin outlived run");
    ws.assert_nothing_left(&vm_name(id));
}
