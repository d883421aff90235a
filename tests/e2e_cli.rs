//! End-to-end, without a VM: the command line itself. Usage errors, `--help`/`--version`, where
//! the config comes from, that a job's identity comes only from `JOB_RESPONSE_FILE`, and that
//! `run` clears a stale `BUILD_EXIT_CODE_FILE` even when it fails. Real binary; run with
//! scripts/test.sh.

mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use support::{unique_job_id, TestEnv, Workspace};

/// Runs hyperjob with the runner's fixed variables and nothing else of this process's
/// environment that could change its behaviour.
fn hyperjob(env: &TestEnv, args: &[&str], vars: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(&env.hyperjob);
    command
        .args(args)
        .env_remove("HYPERJOB_CONFIG")
        .env_remove("JOB_RESPONSE_FILE")
        .env("BUILD_FAILURE_EXIT_CODE", "1")
        .env("SYSTEM_FAILURE_EXIT_CODE", "2");
    for (key, value) in vars {
        command.env(key, value);
    }
    command.output().expect("run hyperjob")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn response_file(ws: &Workspace, job_id: i64) -> std::path::PathBuf {
    let path = ws.dir.join("response.json");
    fs::write(
        &path,
        format!("{{\"id\":{job_id},\"token\":\"glcbt-x\"}}\n"),
    )
    .expect("response");
    path
}

#[test]
fn usage_errors_exit_2_and_help_and_version_exit_0() {
    let env = TestEnv::load();

    let unknown = hyperjob(&env, &["frobnicate"], &[]);
    let run_without_arguments = hyperjob(&env, &["run"], &[]);
    let version = hyperjob(&env, &["--version"], &[]);
    let help = hyperjob(&env, &["--help"], &[]);

    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    assert!(text(&unknown.stderr).contains("frobnicate"), "{unknown:?}");
    assert_eq!(run_without_arguments.status.code(), Some(2));
    assert!(
        text(&run_without_arguments.stderr).contains("<SCRIPT"),
        "{run_without_arguments:?}"
    );
    assert_eq!(version.status.code(), Some(0));
    assert_eq!(
        text(&version.stdout).trim(),
        format!("hyperjob {}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(help.status.code(), Some(0));
    for subcommand in [
        "config",
        "prepare",
        "run",
        "cleanup",
        "gc",
        "plugins",
        "plugin-check",
    ] {
        assert!(text(&help.stdout).contains(subcommand), "{help:?}");
    }
}

#[test]
fn the_command_line_config_wins_over_hyperjob_config() {
    let env = TestEnv::load();
    let ws = env.workspace("config-path");
    let id = unique_job_id();
    let response = response_file(&ws, id);
    let broken = ws.dir.join("broken.toml");
    fs::write(&broken, "backend = \n").expect("broken config");
    let good = ws.config_path.to_str().expect("utf-8");

    let both = hyperjob(
        &env,
        &["--config", good, "config"],
        &[
            ("HYPERJOB_CONFIG", &broken),
            ("JOB_RESPONSE_FILE", &response),
        ],
    );
    let env_only = hyperjob(
        &env,
        &["config"],
        &[
            ("HYPERJOB_CONFIG", &broken),
            ("JOB_RESPONSE_FILE", &response),
        ],
    );

    assert_eq!(both.status.code(), Some(0), "{both:?}");
    let env_error = text(&env_only.stderr);
    assert_eq!(env_only.status.code(), Some(2), "{env_only:?}");
    assert!(
        env_error.contains(broken.to_str().expect("utf-8")),
        "{env_error}"
    );
    assert_eq!(env_error.trim_end().lines().count(), 1, "{env_error}");
    fs::remove_file(&broken).expect("remove");
    fs::remove_file(&response).expect("remove");
}

#[test]
fn identity_comes_from_the_response_file_never_from_job_variables() {
    let env = TestEnv::load();
    let ws = env.workspace("identity");
    let id = unique_job_id();
    let response = response_file(&ws, id);

    let output = Command::new(&env.hyperjob)
        .arg("config")
        .env("HYPERJOB_CONFIG", &ws.config_path)
        .env("JOB_RESPONSE_FILE", &response)
        // What a pipeline can set: hyperjob must not believe any of it.
        .env("CUSTOM_ENV_CI_JOB_ID", "1")
        .env("CUSTOM_ENV_HYPERJOB_VM_NAME", "hyperjob-job-1")
        .output()
        .expect("run hyperjob config");

    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let document: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(
        document["hostname"],
        format!("hyperjob-job-{id}"),
        "{document}"
    );
    fs::remove_file(&response).expect("remove");
}

#[test]
fn a_stale_build_exit_code_file_is_removed_even_when_run_fails() {
    let env = TestEnv::load();
    let ws = env.workspace("stale-exit-code");
    let id = unique_job_id();
    let response = response_file(&ws, id);
    let exit_file = ws.dir.join("build_exit_code");
    fs::write(&exit_file, "42\n").expect("stale exit code file");
    let script = ws.dir.join("script");
    fs::write(&script, "#!/usr/bin/env bash\nexit 3\n").expect("script");

    // No VM was prepared for this job: run fails as a system failure, and the stale code
    // must not survive to decide a later build failure.
    let output = hyperjob(
        &env,
        &["run", script.to_str().expect("utf-8"), "build_script"],
        &[
            ("HYPERJOB_CONFIG", &ws.config_path),
            ("JOB_RESPONSE_FILE", &response),
            ("BUILD_EXIT_CODE_FILE", &exit_file),
        ],
    );

    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        !exit_file.exists(),
        "the stale BUILD_EXIT_CODE_FILE survived"
    );
    fs::remove_file(&script).expect("remove");
    fs::remove_file(&response).expect("remove");
}

#[test]
fn prepare_refuses_a_state_dir_that_another_user_controls_before_creating_anything() {
    let env = TestEnv::load();
    let ws = env.workspace("foreign-state-dir");
    let id = unique_job_id();
    let response = response_file(&ws, id);
    fs::create_dir_all(&ws.state_dir).expect("state dir");
    // nobody's directory (the suite runs as root, which may give it away).
    std::os::unix::fs::chown(&ws.state_dir, Some(65534), Some(65534)).expect("chown");

    let output = hyperjob(
        &env,
        &["prepare"],
        &[
            ("HYPERJOB_CONFIG", &ws.config_path),
            ("JOB_RESPONSE_FILE", &response),
        ],
    );

    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("{} belongs to uid 65534", ws.state_dir.display())),
        "{stderr}"
    );
    assert!(support::list_dir(&ws.state_dir).is_empty());
    fs::remove_file(&response).expect("remove");
    ws.assert_nothing_left(&format!("hyperjob-job-{id}"));
}
