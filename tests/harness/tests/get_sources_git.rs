//! The generated get_sources script, run for real by the local test driver,
//! checks a local bare repository out into the builds dir.

use std::path::{Path, PathBuf};
use std::process::Command;

use hyperjob_test_harness::{run_job, Driver, Job, JobResult, RunnerSettings};

fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Harness")
        .env("GIT_AUTHOR_EMAIL", "harness@example.invalid")
        .env("GIT_COMMITTER_NAME", "Harness")
        .env("GIT_COMMITTER_EMAIL", "harness@example.invalid")
        .output()
        .expect("git runs");
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A bare repository with one commit on `main`; returns its path and the sha.
fn bare_repository(root: &Path) -> (PathBuf, String) {
    let bare = root.join("remote/mygroup/myproject.git");
    let work = root.join("work");
    std::fs::create_dir_all(&bare).expect("bare dir");
    std::fs::create_dir_all(&work).expect("work dir");
    git(
        &bare,
        &["init", "--bare", "--quiet", "--initial-branch=main"],
    );
    git(&work, &["init", "--quiet", "--initial-branch=main"]);
    std::fs::write(work.join("README.md"), "hello from the repository\n").expect("write README");
    git(&work, &["add", "README.md"]);
    git(&work, &["commit", "--quiet", "-m", "first"]);
    git(&work, &["push", "--quiet", &bare.to_string_lossy(), "main"]);
    let sha = git(&work, &["rev-parse", "HEAD"]);
    (bare, sha)
}

fn run_clone_job(root: &Path, bare: &Path, sha: &str) -> hyperjob_test_harness::JobReport {
    let driver =
        Driver::single_binary(Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/driver.sh"));
    let repo_url = format!("file://{}", bare.display());
    let job = Job::new(
        7,
        "mygroup/myproject",
        &repo_url,
        sha,
        &["cat README.md", "git rev-parse HEAD"],
    );
    run_job(&driver, &job, &RunnerSettings::local(root))
}

#[test]
fn get_sources_checks_out_the_job_sha_into_the_project_dir() {
    let root = tempfile::tempdir().expect("temp dir");
    let (bare, sha) = bare_repository(root.path());

    let report = run_clone_job(root.path(), &bare, &sha);

    assert_eq!(report.result, JobResult::Success, "{}", report.log_text());
    // A file:// URL has no host, so the runner falls back to project-<id>.
    let project_dir = root.path().join("builds/project-12");
    assert_eq!(report.dirs.project_dir, project_dir.to_string_lossy());
    let readme =
        std::fs::read_to_string(project_dir.join("README.md")).expect("checked out README");
    assert_eq!(readme, "hello from the repository\n");
    let log = report.log_text();
    assert!(log.contains("Created fresh repository."), "{log}");
    assert!(log.contains(&format!("{sha}\n")), "{log}");
    assert_eq!(git(&project_dir, &["rev-parse", "HEAD"]), sha);
}

#[test]
fn second_fetch_job_cleans_untracked_files_from_the_existing_checkout() {
    let root = tempfile::tempdir().expect("temp dir");
    let (bare, sha) = bare_repository(root.path());
    let first = run_clone_job(root.path(), &bare, &sha);
    let leftover = root.path().join("builds/project-12/leftover.txt");
    std::fs::write(&leftover, "from the previous job").expect("write leftover");

    let second = run_clone_job(root.path(), &bare, &sha);

    assert_eq!(first.result, JobResult::Success);
    assert_eq!(second.result, JobResult::Success, "{}", second.log_text());
    assert!(!leftover.exists(), "git clean -ffdx removed it");
    assert!(second.log_text().contains("hello from the repository"));
}

#[test]
fn fetching_an_unknown_sha_fails_get_sources_as_build_failure() {
    let root = tempfile::tempdir().expect("temp dir");
    let (bare, _) = bare_repository(root.path());

    let report = run_clone_job(
        root.path(),
        &bare,
        "1111111111111111111111111111111111111111",
    );

    assert!(
        matches!(report.result, JobResult::BuildFailure { .. }),
        "{:?}",
        report.result
    );
    assert_eq!(
        report.run_stages(),
        vec!["prepare_script", "get_sources", "cleanup_file_variables"]
    );
}
