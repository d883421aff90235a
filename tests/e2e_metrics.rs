//! End-to-end metrics and structured logs: two real jobs at once (one succeeds, one fails its
//! script) and thirty cleanups racing them all update one `metrics_file`, and not one count is
//! lost; gc's removals are counted by reason; with `HYPERJOB_LOG_FORMAT=json` every line
//! hyperjob writes to stderr is a JSON object, and none carries the job's secret. Real binary,
//! real libvirtd, real TCG guests; run with scripts/test.sh.

mod support;

use std::process::Command;

use hyperjob_test_harness::{run_job, JobResult, JobVariable, RunnerSettings};
use support::{hyperjob_driver, job_without_sources, unique_job_id, TestEnv, Workspace};

/// The value of the sample `name` (with its labels, as written) in the metrics text.
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn with_metrics(ws: &Workspace) -> std::path::PathBuf {
    let dir = ws.dir.join("metrics");
    std::fs::create_dir_all(&dir).expect("metrics dir");
    let file = dir.join("hyperjob.prom");
    ws.write_config(&format!(
        "metrics_file = \"{}\"\n{}",
        file.display(),
        ws.default_config()
    ));
    file
}

#[test]
fn concurrent_stages_never_lose_a_count_and_every_outcome_is_counted() {
    let env = TestEnv::load();
    let ws = env.workspace("metrics");
    let file = with_metrics(&ws);
    let driver = hyperjob_driver(&env, &ws);
    let ok = job_without_sources(unique_job_id(), "group/metrics", &["echo fine"]);
    let failing = job_without_sources(unique_job_id(), "group/metrics", &["exit 3"]);

    let (reports, cleanups) = std::thread::scope(|scope| {
        let jobs: Vec<_> = [&ok, &failing]
            .into_iter()
            .map(|job| scope.spawn(|| run_job(&driver, job, &RunnerSettings::default())))
            .collect();
        // Thirty cleanups of jobs that never got a VM, all at once, beside the two jobs.
        let cleanups: Vec<_> = (0..30)
            .map(|_| {
                let response = ws.dir.join(format!("response-{}.json", unique_job_id()));
                let id = unique_job_id();
                std::fs::write(&response, format!("{{\"id\": {id}}}")).expect("response");
                let child = Command::new(&env.hyperjob)
                    .args([
                        "--config",
                        ws.config_path.to_str().expect("utf-8"),
                        "cleanup",
                    ])
                    .env("JOB_RESPONSE_FILE", &response)
                    .spawn()
                    .expect("cleanup");
                (child, response)
            })
            .collect();
        let cleanups: Vec<bool> = cleanups
            .into_iter()
            .map(|(mut child, response)| {
                let ok = child.wait().expect("wait").success();
                std::fs::remove_file(response).expect("remove response");
                ok
            })
            .collect();
        let reports: Vec<_> = jobs.into_iter().map(|j| j.join().expect("job")).collect();
        (reports, cleanups)
    });

    assert_eq!(
        reports[0].result,
        JobResult::Success,
        "{}",
        reports[0].log_text()
    );
    assert!(
        matches!(reports[1].result, JobResult::BuildFailure { exit_code: 3 }),
        "{}",
        reports[1].log_text()
    );
    assert!(cleanups.iter().all(|ok| *ok));
    let text = std::fs::read_to_string(&file).expect("metrics file");
    println!("{text}");
    for (name, expected) in [
        (
            "hyperjob_stages_total{stage=\"cleanup\",outcome=\"success\"}",
            32,
        ),
        (
            "hyperjob_stages_total{stage=\"prepare\",outcome=\"success\"}",
            2,
        ),
        (
            "hyperjob_stages_total{stage=\"run\",outcome=\"build_failure\"}",
            1,
        ),
        ("hyperjob_jobs_total{outcome=\"success\",cause=\"\"}", 1),
        (
            "hyperjob_jobs_total{outcome=\"build_failure\",cause=\"\"}",
            1,
        ),
        (
            "hyperjob_jobs_total{outcome=\"system_failure\",cause=\"prepare\"}",
            30,
        ),
        ("hyperjob_prepare_seconds_count{kind=\"cold\"}", 2),
        ("hyperjob_cleanup_seconds_count", 32),
    ] {
        assert_eq!(sample(&text, name), Some(expected), "{name}:\n{text}");
    }
    let runs_ok = sample(
        &text,
        "hyperjob_stages_total{stage=\"run\",outcome=\"success\"}",
    )
    .expect("successful runs");
    assert!(runs_ok >= 3, "{text}");
    // Every run went through its job's relay, which times the script in the guest: each one is
    // an observation of hyperjob's own time in the stage.
    assert_eq!(
        sample(&text, "hyperjob_stage_overhead_seconds_count"),
        Some(runs_ok + 1),
        "{text}"
    );

    // gc counts what it removes, by reason: here a lock file a killed prepare left.
    std::fs::write(
        ws.state_dir.join(format!("job-{}.lock", unique_job_id())),
        "",
    )
    .expect("lock");
    let gc = Command::new(&env.hyperjob)
        .args(["--config", ws.config_path.to_str().expect("utf-8"), "gc"])
        .output()
        .expect("gc");
    assert!(gc.status.success());
    let text = std::fs::read_to_string(&file).expect("metrics file");
    assert_eq!(
        sample(&text, "hyperjob_gc_removals_total{reason=\"vm_gone\"}"),
        Some(1),
        "{text}"
    );
    assert_eq!(sample(&text, "hyperjob_vms_alive"), Some(0), "{text}");
    std::fs::remove_dir_all(ws.dir.join("metrics")).expect("remove metrics");
    ws.assert_nothing_left("hyperjob-job-");
}

#[test]
fn json_logs_are_one_object_per_line_and_carry_no_secret() {
    let env = TestEnv::load();
    let ws = env.workspace("json-logs");
    let driver = hyperjob_driver(&env, &ws).with_env("HYPERJOB_LOG_FORMAT", "json");
    let secret = "s3cr3t-json-canary-value";
    let mut job = job_without_sources(unique_job_id(), "group/json", &["exit 4"]);
    job.variables.push(JobVariable::masked("API_TOKEN", secret));

    let report = run_job(&driver, &job, &RunnerSettings::default());

    assert!(
        matches!(report.result, JobResult::BuildFailure { exit_code: 4 }),
        "{}",
        report.log_text()
    );
    // hyperjob's own stderr lines: errors and warnings, from any stage.
    let run = Command::new(&env.hyperjob)
        .args([
            "--config",
            ws.config_path.to_str().expect("utf-8"),
            "run",
            "/nonexistent",
            "build",
        ])
        .env("HYPERJOB_LOG_FORMAT", "json")
        .env("JOB_RESPONSE_FILE", ws.dir.join("no-such-response.json"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!stderr.trim().is_empty());
    for line in stderr.lines() {
        let object: serde_json::Value = serde_json::from_str(line).expect("a JSON object per line");
        assert_eq!(object["level"], "ERROR", "{line}");
        assert!(object["message"]
            .as_str()
            .is_some_and(|m| m.contains("JOB_RESPONSE_FILE")));
    }
    assert!(
        !report.log_text().contains(secret),
        "the secret reached the job log"
    );
    ws.assert_nothing_left("hyperjob-job-");
}
