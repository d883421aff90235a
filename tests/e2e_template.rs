//! The template backend (plugins/template-backend), the starting point of docs/plugins.md, as
//! hyperjob really loads it: `hyperjob plugins` lists the library, `config` builds it from its
//! table and reports a broken table naming the file, the table and the key, and a whole job runs
//! in a TCG guest it starts with plain QEMU, leaving nothing behind.
//!
//! The library is built next to the binary by `cargo build --workspace`. The first tests need no
//! VM; the last boots a guest of the test image (loopback only: QEMU forwards a port to it).

mod support;

use std::path::PathBuf;

use hyperjob_test_harness::{run_job, JobResult, RunnerSettings};
use support::{
    hyperjob, hyperjob_driver, job_without_sources, list_dir, qemu_processes_of, stderr, stdout,
    template_library, unique_job_id, vm_name, PluginSetup, TestEnv,
};

/// A config selecting the template backend with `table` as `[backends.template]`.
fn setup_with_table(table: &str) -> (PluginSetup, PathBuf) {
    let library = template_library(&hyperjob());
    let setup = PluginSetup::new("template", &[&library]);
    setup.write(
        "template",
        &[&library],
        &[],
        &format!("\n[backends.template]\n{table}"),
    );
    (setup, library)
}

#[test]
fn plugins_lists_the_template_backend_from_its_library() {
    let (setup, library) = setup_with_table("base_image = \"/img/base.qcow2\"\n");

    let output = setup.run(&["plugins"]);

    let listing = stdout(&output);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        listing.lines().any(|l| l.starts_with("backend")
            && l.split_whitespace().nth(1) == Some("template")
            && l.ends_with(&format!("library {}", library.display()))),
        "{listing}"
    );
    assert!(!listing.contains("REFUSED"), "{listing}");
}

#[test]
fn config_builds_the_template_backend_from_its_table() {
    let (setup, _) =
        setup_with_table("base_image = \"/img/base.qcow2\"\naccel = \"tcg\"\nvcpus = 2\n");

    let output = setup.run(&["config"]);

    assert!(output.status.success(), "{}", stderr(&output));
    let config: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert!(config["driver"]["name"].is_string(), "{config}");
    assert!(setup.state_files().iter().all(|f| f != "template"));
}

#[test]
fn a_broken_template_table_fails_config_naming_file_table_and_key() {
    for (table, message) in [
        (
            "base_image = \"/b\"\ncolour = \"blue\"\n",
            "unknown field `colour`, expected one of `base_image`, `accel`, `vcpus`, \
             `memory_mib`, `kernel`, `initrd`, `cmdline`",
        ),
        ("vcpus = 1\n", "`base_image` is required"),
        (
            "base_image = \"/b\"\nmemory_mib = \"1G\"\n",
            "`memory_mib`: invalid type: string \"1G\", expected u32",
        ),
        (
            "base_image = \"/b\"\naccel = \"hvf\"\n",
            "`accel` must be \"kvm\" or \"tcg\", not \"hvf\"",
        ),
    ] {
        let (setup, _) = setup_with_table(table);

        let output = setup.run(&["config"]);

        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{table}: {err}");
        assert!(output.stdout.is_empty(), "{table}");
        assert_eq!(
            err.trim_end(),
            format!(
                "hyperjob config: config file {} [backends.template]: {message}",
                setup.path("config.toml").display()
            ),
            "{table}"
        );
    }
}

#[test]
fn a_job_runs_in_a_guest_the_template_backend_starts_and_nothing_is_left() {
    let env = TestEnv::load();
    let ws = env.workspace("template-job");
    let library = template_library(&env.hyperjob);
    ws.write_config(&format!(
        r#"plugins = ["{library}"]
backend = "template"
transport = "ssh"
state_dir = "{state}"

[backends.template]
accel = "tcg"
base_image = "{base}"
vcpus = 1
memory_mib = 512
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "{cmdline}"

[transports.ssh]
user = "{user}"
identity_file = "{identity}"
known_hosts = "{known_hosts}"
ready_timeout_secs = 180
connect_timeout_secs = 2
"#,
        library = library.display(),
        state = ws.state_dir.display(),
        base = env.base_image.display(),
        kernel = env.kernel.display(),
        initrd = env.initrd.display(),
        cmdline = env.cmdline,
        user = env.guest_user,
        identity = env.identity_file.display(),
        known_hosts = env.known_hosts.display(),
    ));
    let id = unique_job_id();
    let job = job_without_sources(
        id,
        "group/template",
        &[
            "echo \"runs on $(hostname)\"",
            "echo to-stderr >&2",
            "exit 3",
        ],
    );

    let report = run_job(
        &hyperjob_driver(&env, &ws),
        &job,
        &RunnerSettings::default(),
    );

    let log = report.log_text();
    assert_eq!(
        report.result,
        JobResult::BuildFailure { exit_code: 3 },
        "{log}"
    );
    assert!(
        log.contains(&format!("Starting QEMU for {}", vm_name(id))),
        "{log}"
    );
    assert!(log.contains("Guest ready at 127.0.0.1:"), "{log}");
    assert!(log.contains("runs on hyperjob-guest"), "{log}");
    assert!(log.contains("to-stderr"), "{log}");
    assert_eq!(report.invocations_of("cleanup").len(), 1);
    assert!(qemu_processes_of(&vm_name(id)).is_empty());
    assert_eq!(
        list_dir(&ws.state_dir.join("template")),
        Vec::<String>::new()
    );
}
