//! The demo job of `scripts/demo.sh`, which `scripts/bench.sh` also times: a small project
//! cloned from a git server on the host, built, its output streamed, then a release step and
//! an after_script.

use hyperjob_test_harness::{Job, Step};

use super::GitServer;

const BUILD_SH: &str = r#"#!/bin/sh
set -e
echo "compiling on $(uname -srm) with $(nproc) vCPU"
printf 'int main(void) { return 0; }\n' > main.c
echo "checksum of the sources: $(cat main.c build.sh | sha256sum | cut -c1-16)"
"#;

/// Serves the demo project on `bind_ip` (where the guests reach the host).
pub fn demo_git_server(bind_ip: &str) -> GitServer {
    GitServer::start(
        bind_ip,
        "hello",
        &[
            (
                "README.md",
                "# hello\nA project cloned into the VM by get_sources.\n",
            ),
            ("build.sh", BUILD_SH),
        ],
    )
}

/// The demo job `id`, cloning `repo_url` at `sha`.
pub fn demo_job(id: i64, repo_url: &str, sha: &str) -> Job {
    let mut job = Job::new(
        id,
        "demo/hello",
        repo_url,
        sha,
        &[
            "echo \"this is $(hostname), kernel $(uname -r), user $(id -un)\"",
            "head -n 2 README.md",
            "sh build.sh",
            "for i in 1 2 3; do echo \"streaming line $i\"; sleep 1; done",
        ],
    );
    job.steps.push(Step::new(
        "release",
        &["echo \"releasing commit $CI_COMMIT_SHA\""],
    ));
    job.after_script = vec!["echo \"after_script: job status is $CI_JOB_STATUS\"".to_string()];
    job
}
