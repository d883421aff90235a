//! End-to-end: `gitlab-runner` in guests that lack it (issue 11 §6). The stock guest
//! (`stock.qcow2`: Debian, OpenSSH, a non-root login user, no gitlab-runner) gets the runner's
//! binary from prepare — `runner_binary` from the config, or by default the executable of the
//! process that called hyperjob — and jobs then call `gitlab-runner` in their scripts and in
//! the runner's own artifact and cache stages. The "runner" is tests/runner-standin, a small
//! executable named `gitlab-runner` that prints a version, handles the artifact and cache
//! subcommands, and can call hyperjob as GitLab Runner does.
//! Run with scripts/test.sh, which provides the namespaced test environment.

mod support;

use std::time::Duration;

use hyperjob_test_harness::{run_job, Artifact, Cache, Job, JobResult, RunnerSettings};
use support::{unique_job_id, vm_name, TestEnv};

/// The stand-in's `--version` line.
const STANDIN_VERSION: &str = "Version:      19.4.0~hyperjob-standin";

fn settings() -> RunnerSettings {
    RunnerSettings {
        preparation_retry_interval: Duration::from_millis(200),
        ..RunnerSettings::default()
    }
}

/// A job without sources that calls gitlab-runner, makes an artifact and a cache directory,
/// and has `artifacts:` and `cache:` entries (so the runner's stages call gitlab-runner too).
fn job_with_artifacts_and_cache(id: i64) -> Job {
    let mut job = support::job_without_sources(
        id,
        "group/runner",
        &[
            "gitlab-runner --version",
            "echo \"gitlab-runner is $(command -v gitlab-runner)\"",
            "mkdir -p out vendor && echo built > out/result.txt && echo dep > vendor/dep.txt",
        ],
    );
    job.cache = vec![Cache::new("", &["vendor/"])];
    job.artifacts = vec![Artifact::new("build", &["out/"])];
    job
}

/// What every job of [`job_with_artifacts_and_cache`] shows once gitlab-runner is in the guest.
fn assert_artifact_and_cache_stages_ran(report: &hyperjob_test_harness::JobReport, id: i64) {
    let log = report.log_text();
    assert_eq!(report.result, JobResult::Success, "{log}");
    assert_eq!(
        report.run_stages(),
        [
            "prepare_script",
            "get_sources",
            "restore_cache",
            "build_script",
            "archive_cache",
            "upload_artifacts_on_success",
            "cleanup_file_variables"
        ],
        "{log}"
    );
    assert!(log.contains(STANDIN_VERSION), "{log}");
    // A fresh VM has no cache yet: the extractor runs and reports that.
    assert!(log.contains("cache not found"), "{log}");
    assert!(log.contains("Failed to extract cache"), "{log}");
    // The default key (`<job name>/<ref>`) below the runner's cache_dir, from the project dir.
    assert!(
        log.lines()
            .any(|line| line.starts_with("standin cache-archiver: ../")
                && line.ends_with("/cache/project-12/test/main/cache.zip with 1 file(s)")),
        "{log}"
    );
    assert!(log.contains("Created cache"), "{log}");
    assert!(
        log.contains(&format!(
            "standin artifacts-uploader: job {id} artifacts \"build\" (1 file(s), 6 bytes)"
        )),
        "{log}"
    );
    assert!(log.contains("out/result.txt\t6"), "{log}");
    assert!(!log.contains("Missing gitlab-runner"), "{log}");
}

#[test]
fn runner_binary_gives_a_stock_guest_gitlab_runner_for_scripts_artifacts_and_caches() {
    let env = TestEnv::load();
    let ws = env.workspace("runner-binary");
    let standin = support::runner_standin(&env);
    ws.write_config(&support::with_runner_binary(&ws.stock_config(), &standin));
    let id = unique_job_id();

    // The test process calls hyperjob (it is not GitLab Runner): runner_binary is the source.
    let report = run_job(
        &support::hyperjob_driver(&env, &ws),
        &job_with_artifacts_and_cache(id),
        &settings(),
    );

    let log = report.log_text();
    println!(
        "runner_binary: {}",
        log.lines()
            .find(|line| line.contains("Copied"))
            .unwrap_or("no \"Copied\" line")
    );
    assert!(
        log.contains(&format!("Copied runner_binary {} (", standin.display())),
        "{log}"
    );
    // The login user (gitlab-runner) can write to no directory on the SSH server's PATH.
    assert!(
        log.contains("to /home/gitlab-runner/.local/bin/gitlab-runner in the guest"),
        "{log}"
    );
    assert!(
        log.contains("gitlab-runner is /home/gitlab-runner/.local/bin/gitlab-runner"),
        "{log}"
    );
    assert_artifact_and_cache_stages_ran(&report, id);
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn the_calling_gitlab_runner_is_copied_by_default_and_nothing_else_is() {
    let env = TestEnv::load();
    let ws = env.workspace("runner-default");
    ws.write_config(&ws.stock_config());
    let standin = support::runner_standin(&env);

    // Called through `gitlab-runner spawn hyperjob …`: the caller's own executable is copied.
    let id = unique_job_id();
    let report = run_job(
        &support::standin_driver(&env, &ws),
        &job_with_artifacts_and_cache(id),
        &settings(),
    );
    let log = report.log_text();
    println!(
        "default: {}",
        log.lines()
            .find(|line| line.contains("Copied"))
            .unwrap_or("no \"Copied\" line")
    );
    assert!(
        log.contains(&format!("Copied the runner's own {} (", standin.display())),
        "{log}"
    );
    assert_artifact_and_cache_stages_ran(&report, id);
    ws.assert_nothing_left(&vm_name(id));

    // Called by the test process, which is no GitLab Runner: nothing is copied, and the
    // runner's stages say what they say on any executor without gitlab-runner.
    let id = unique_job_id();
    let mut job = job_with_artifacts_and_cache(id);
    job.steps[0].script[0] = "command -v gitlab-runner || echo no-gitlab-runner-here".into();
    let report = run_job(&support::hyperjob_driver(&env, &ws), &job, &settings());
    let log = report.log_text();
    assert_eq!(report.result, JobResult::Success, "{log}");
    assert!(!log.contains("Copied"), "{log}");
    assert!(log.contains("no-gitlab-runner-here"), "{log}");
    assert!(
        log.contains("Missing gitlab-runner. Creating cache is disabled."),
        "{log}"
    );
    assert!(
        log.contains("Missing gitlab-runner. Uploading artifacts is disabled."),
        "{log}"
    );
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn a_runner_binary_for_another_machine_is_not_copied_and_the_job_goes_on() {
    let env = TestEnv::load();
    let ws = env.workspace("runner-mismatch");
    // The ELF header of an aarch64 executable: enough for the check, never run.
    let mut header = vec![0u8; 64];
    header[..6].copy_from_slice(b"\x7fELF\x02\x01");
    header[18..20].copy_from_slice(&183u16.to_le_bytes());
    let foreign = ws.dir.join("gitlab-runner-arm64");
    std::fs::write(&foreign, &header).expect("write the foreign binary");
    let _remove = RemovedOnDrop(foreign.clone());
    // The fast guest (dropbear): the check happens before anything is copied.
    ws.write_config(&support::with_runner_binary(&ws.default_config(), &foreign));
    let id = unique_job_id();
    let job = support::job_without_sources(
        id,
        "group/runner",
        &["command -v gitlab-runner || echo no-gitlab-runner-here"],
    );

    let report = run_job(&support::hyperjob_driver(&env, &ws), &job, &settings());

    let log = report.log_text();
    assert_eq!(report.result, JobResult::Success, "{log}");
    assert!(
        log.contains(&format!(
            "The guest has no gitlab-runner and hyperjob cannot copy runner_binary {} into it: \
             it is an ELF file for machine 183, which a x86_64 guest cannot run. Artifacts and \
             caches are disabled for this job.",
            foreign.display()
        )),
        "{log}"
    );
    assert!(log.contains("no-gitlab-runner-here"), "{log}");
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn a_pooled_vm_gets_runner_binary_when_filled_and_the_claiming_job_finds_it() {
    let env = TestEnv::load();
    let ws = env.workspace("runner-pool");
    let standin = support::runner_standin(&env);
    // The fast guest, pooled under VM names of this test's own.
    let config = support::with_runner_binary(&ws.default_config(), &standin);
    ws.write_config(&format!(
        "name_prefix = \"runner-pool-\"\n{config}\n[pool]\nsize = 1\n"
    ));

    let filled = support::hyperjob_ok(&env, &ws, &["pool", "fill"]);

    assert!(
        filled.contains(&format!("Copied runner_binary {} (", standin.display())),
        "{filled}"
    );
    let id = unique_job_id();
    let job = support::job_without_sources(
        id,
        "group/runner",
        &[
            "gitlab-runner --version",
            "echo \"gitlab-runner is $(command -v gitlab-runner)\"",
        ],
    );
    let report = run_job(&support::hyperjob_driver(&env, &ws), &job, &settings());
    let log = report.log_text();
    assert_eq!(report.result, JobResult::Success, "{log}");
    assert!(log.contains("Claimed the pooled VM"), "{log}");
    // Found in the guest: nothing is copied while the job waits.
    assert!(!log.contains("Copied"), "{log}");
    assert!(log.contains(STANDIN_VERSION), "{log}");
    assert!(
        log.contains("gitlab-runner is /home/gitlab-runner/.local/bin/gitlab-runner"),
        "{log}"
    );
    // The claim started a replacement: once it is ready (or failed), drain the pool.
    support::wait_until("the pool's refill", Duration::from_secs(300), || {
        let status = support::hyperjob_ok(&env, &ws, &["pool", "status"]);
        !status.contains("booting")
    });
    support::hyperjob_ok(&env, &ws, &["pool", "drain"]);
    ws.assert_nothing_left("runner-pool-");
}

/// A figure, not a check: how long prepare takes to copy an 80 MB runner (the size of GitLab
/// Runner 19's binary) into the stock guest. The stand-in is padded to that size (an ELF file
/// runs with bytes appended). Run by hand: `-- --ignored figure_`.
#[test]
#[ignore = "a measurement (80 MB copied under TCG), not a check; run by hand"]
fn figure_copy_of_an_80_mb_runner_into_the_stock_guest() {
    let env = TestEnv::load();
    let ws = env.workspace("runner-80mb");
    let mut padded = std::fs::read(support::runner_standin(&env)).expect("stand-in");
    padded.resize(80_000_000, 0);
    let big = ws.dir.join("gitlab-runner-80mb");
    std::fs::write(&big, &padded).expect("write");
    let _remove = RemovedOnDrop(big.clone());
    std::fs::set_permissions(&big, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    for (name, config) in [("stock", ws.stock_config()), ("fast", ws.default_config())] {
        ws.write_config(&support::with_runner_binary(&config, &big));
        let id = unique_job_id();
        let job = support::job_without_sources(id, "group/runner", &["gitlab-runner --version"]);
        let report = run_job(&support::hyperjob_driver(&env, &ws), &job, &settings());
        let log = report.log_text();
        assert_eq!(report.result, JobResult::Success, "{log}");
        for line in log
            .lines()
            .filter(|line| line.contains("Copied") || line.contains("Guest ready"))
        {
            println!("80 MB runner, {name} guest: {line}");
        }
        ws.assert_nothing_left(&vm_name(id));
    }
}

/// A file the test wrote into its workspace, removed however the test ends (before the
/// workspace itself, which only removes empty directories).
struct RemovedOnDrop(std::path::PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
