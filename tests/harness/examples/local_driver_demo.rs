//! Runs a job through `testdata/driver.sh` (stage scripts run locally) with
//! the job log echoed live: `cargo run -p hyperjob-test-harness --example
//! local_driver_demo`.

use std::path::Path;
use std::process::ExitCode;

use hyperjob_test_harness::{run_job, Driver, Job, JobResult, JobVariable, RunnerSettings, Step};

fn main() -> ExitCode {
    let Ok(root) = tempfile::tempdir() else {
        eprintln!("cannot create a temp dir");
        return ExitCode::FAILURE;
    };
    let driver =
        Driver::single_binary(Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/driver.sh"));
    let repo_url = Job::gitlab_repo_url("https://gitlab.example.com", "demo/project", "token");
    let mut job = Job::new(
        1,
        "demo/project",
        &repo_url,
        "0123456789abcdef",
        &[
            "echo hello",
            "for i in 1 2 3; do echo tick $i; sleep 0.2; done",
        ],
    );
    job.steps.push(Step::new(
        "release",
        &["echo releasing $CI_COMMIT_SHORT_SHA"],
    ));
    job.after_script = vec!["echo job status is $CI_JOB_STATUS".to_owned()];
    job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));
    let settings = RunnerSettings {
        echo_log: true,
        ..RunnerSettings::local(root.path())
    };

    let report = run_job(&driver, &job, &settings);

    println!("--- invocations: {:?}", report.invocation_labels());
    if report.result == JobResult::Success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
