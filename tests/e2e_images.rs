//! End-to-end per-job images: one config serving two images (the fast test guest as the
//! default, the stock guest with systemd and OpenSSH by name), a refused image name, and
//! per-job vCPUs within and beyond the configured maximum. Real binary, real libvirtd, real TCG
//! guests; run with scripts/test.sh.

mod support;

use hyperjob_test_harness::{run_job, Job, JobResult, JobVariable, RunnerSettings};
use support::{driver_errors, hyperjob_driver, job_without_sources, unique_job_id, TestEnv};

/// `default_image = "fast"` (the plugin tables as they are) and `[images.stock]` (the stock
/// guest's base image, kernel command line and pinned keys); vCPUs up to 2 per job.
fn two_images(env: &TestEnv, ws: &support::Workspace) -> String {
    format!(
        "default_image = \"fast\"\n{}\n[images.fast.backend]\n\
         [images.stock.backend]\nbase_image = \"{}\"\ncmdline = \"{}\"\n\
         [images.stock.transport]\nknown_hosts = \"{}\"\nready_timeout_secs = 300\n\
         [resources]\nmax_vcpus = 2\n",
        ws.default_config(),
        env.stock_image.display(),
        env.stock_cmdline,
        env.stock_known_hosts.display()
    )
}

/// A job that tells which guest it ran in: systemd (the stock guest) or not.
fn probe(image: Option<&str>) -> Job {
    let mut job = job_without_sources(
        unique_job_id(),
        "group/images",
        &[
            "if [ -d /run/systemd/system ]; then echo guest-is-stock; else echo guest-is-fast; fi",
            "echo vcpus-$(nproc)",
        ],
    );
    job.image = image.map(str::to_string);
    job
}

fn settings() -> RunnerSettings {
    RunnerSettings {
        preparation_retries: 1,
        ..RunnerSettings::default()
    }
}

#[test]
fn jobs_pick_their_image_by_name_and_the_default_serves_jobs_without_one() {
    let env = TestEnv::load();
    let ws = env.workspace("images");
    ws.write_config(&two_images(&env, &ws));
    let driver = hyperjob_driver(&env, &ws);

    let (default, stock) = std::thread::scope(|scope| {
        let default = scope.spawn(|| run_job(&driver, &probe(None), &settings()));
        let stock = scope.spawn(|| run_job(&driver, &probe(Some("stock")), &settings()));
        (
            default.join().expect("default job"),
            stock.join().expect("stock job"),
        )
    });

    assert_eq!(default.result, JobResult::Success, "{}", default.log_text());
    assert!(
        default.log_text().contains("guest-is-fast"),
        "{}",
        default.log_text()
    );
    assert_eq!(stock.result, JobResult::Success, "{}", stock.log_text());
    assert!(
        stock.log_text().contains("guest-is-stock"),
        "{}",
        stock.log_text()
    );
    ws.assert_nothing_left("hyperjob-job-");
}

#[test]
fn an_image_not_allowed_and_resources_beyond_the_maximum_are_refused() {
    let env = TestEnv::load();
    let ws = env.workspace("images-refused");
    ws.write_config(&two_images(&env, &ws));
    let driver = hyperjob_driver(&env, &ws);

    let refused = run_job(&driver, &probe(Some("ubuntu:24.04")), &settings());
    let mut greedy = probe(None);
    greedy
        .variables
        .push(JobVariable::new("HYPERJOB_VCPUS", "9"));
    let too_many = run_job(&driver, &greedy, &settings());
    let mut two = probe(None);
    two.variables.push(JobVariable::new("HYPERJOB_VCPUS", "2"));
    let within = run_job(&driver, &two, &settings());

    assert!(
        matches!(refused.result, JobResult::SystemFailure { .. }),
        "{}",
        refused.log_text()
    );
    let errors = driver_errors(&refused);
    assert!(
        errors.iter().any(|line| line.contains(
            "the job's image \"ubuntu:24.04\" is not allowed on this runner; allowed: fast, stock"
        )),
        "{errors:?}"
    );
    assert!(matches!(too_many.result, JobResult::SystemFailure { .. }));
    assert!(
        driver_errors(&too_many).iter().any(
            |line| line.contains("HYPERJOB_VCPUS = 9 is more than this runner's max_vcpus = 2")
        ),
        "{}",
        too_many.log_text()
    );
    assert_eq!(within.result, JobResult::Success, "{}", within.log_text());
    assert!(
        within.log_text().contains("vcpus-2"),
        "{}",
        within.log_text()
    );
    ws.assert_nothing_left("hyperjob-job-");
}
