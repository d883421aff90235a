//! The two sides of the bench, driven alike through the GitLab Runner replica: hyperjob (the
//! real binary, with a workspace config) and the baseline (scripts/bench-baseline, the shell
//! driver from GitLab's documentation).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyperjob_test_harness::{
    run_job, Driver, ExecutorSession, Invocation, InvocationKind, Job, JobReport, JobResult,
    RunnerSettings, Stage,
};

use crate::figures::Samples;
use crate::support::{demo_job, job_without_sources, virsh, TestEnv, Workspace};

/// Which driver a side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hyperjob,
    Baseline,
}

/// One driver and everything it needs.
#[derive(Debug)]
pub struct Side {
    pub kind: Kind,
    pub driver: Driver,
    pub settings: RunnerSettings,
    uri: String,
    /// Baseline VMs its cleanup left running (destroyed by the bench afterwards).
    pub left_running: usize,
    /// Baseline disks its cleanup left (removed by the bench afterwards).
    pub left_disks: usize,
    /// Where the baseline's disks are (unused for hyperjob).
    images_dir: PathBuf,
    /// Why jobs of this side failed (the runner's failure message), one entry per job.
    pub failures: Vec<String>,
}

impl Side {
    pub fn hyperjob(env: &TestEnv, ws: &Workspace) -> Self {
        Self {
            kind: Kind::Hyperjob,
            driver: Driver::single_binary(&env.hyperjob)
                .with_env("HYPERJOB_CONFIG", ws.config_path.to_str().expect("utf-8")),
            settings: RunnerSettings::default(),
            uri: env.libvirt_uri.clone(),
            left_running: 0,
            left_disks: 0,
            images_dir: PathBuf::new(),
            failures: Vec::new(),
        }
    }

    /// The baseline's scripts from `scripts_dir`, its disks in `images_dir` (world-searchable).
    pub fn baseline(env: &TestEnv, scripts_dir: &Path, images_dir: &Path) -> Self {
        let path = |p: &Path| p.to_str().expect("utf-8").to_string();
        let script = |name: &str| scripts_dir.join(name);
        let mut driver = Driver::single_binary(script("run.sh"));
        driver.config_exec = None;
        driver.config_args = Vec::new();
        driver.prepare_exec = Some(script("prepare.sh"));
        driver.prepare_args = Vec::new();
        driver.run_args = Vec::new();
        driver.cleanup_exec = Some(script("cleanup.sh"));
        driver.cleanup_args = Vec::new();
        for (key, value) in [
            ("LIBVIRT_DEFAULT_URI", env.libvirt_uri.clone()),
            ("BASELINE_IMAGES_DIR", path(images_dir)),
            ("BASELINE_BASE_IMAGE", path(&env.base_image)),
            ("BASELINE_KERNEL", path(&env.kernel)),
            ("BASELINE_INITRD", path(&env.initrd)),
            ("BASELINE_CMDLINE", env.cmdline.clone()),
            ("BASELINE_IDENTITY_FILE", path(&env.identity_file)),
            (
                "BASELINE_KNOWN_HOSTS",
                path(&images_dir.join("known_hosts")),
            ),
            ("BASELINE_USER", env.guest_user.clone()),
            ("BASELINE_NETWORK", env.network.clone()),
            ("BASELINE_VCPUS", "1".to_string()),
            ("BASELINE_MEMORY_MIB", "512".to_string()),
        ] {
            driver = driver.with_env(key, &value);
        }
        Self {
            kind: Kind::Baseline,
            driver,
            // The baseline has no config_exec: the runner's own builds_dir and cache_dir.
            settings: RunnerSettings {
                builds_dir: Some("/home/gitlab-runner/builds".to_string()),
                cache_dir: Some("/home/gitlab-runner/cache".to_string()),
                ..RunnerSettings::default()
            },
            uri: env.libvirt_uri.clone(),
            left_running: 0,
            left_disks: 0,
            images_dir: images_dir.to_path_buf(),
            failures: Vec::new(),
        }
    }

    fn session(&self, job: &Job) -> ExecutorSession {
        let session =
            ExecutorSession::new(&self.driver, job, &self.settings).expect("executor session");
        session.run_config().expect("config_exec");
        session.start_build().expect("builds dir");
        session
    }

    /// A job run step by step: prepare, get_sources (not timed), `stages` trivial `build_script`
    /// stages, cleanup. Records `prefix` prepare, the prepare breakdown, each stage and cleanup.
    pub fn step_job(&mut self, id: i64, stages: usize, prefix: &str, out: &mut Samples) {
        let job = job_without_sources(id, "bench/steps", &["true"]);
        let session = self.session(&job);
        let prepared = session.prepare();
        let prepare = last_of(&session, &InvocationKind::Prepare);
        if let Err(err) = prepared {
            // As the runner does after a failed attempt: cleanup; the job counts as failed.
            let log = crate::support::session_log(&session);
            let detail = log.lines().rfind(|line| line.contains("Waited"));
            let why = format!("prepare: {} {}", err.message(), detail.unwrap_or_default());
            eprintln!("{:?}: job {id} failed: {why}", self.kind);
            self.failures.push(why);
            session.cleanup();
            self.after_cleanup(id);
            return;
        }
        out.add(&format!("{prefix} prepare"), secs(prepare.duration));
        for (needle, name) in self.milestones(prefix) {
            if let Some(at) = line_at(&session, "prepare", needle) {
                out.add(name, secs(at.duration_since(prepare.started)));
            }
        }
        let sources = session
            .run_stage(&Stage::GetSources)
            .expect("get_sources")
            .expect("invoked");
        assert!(
            sources.succeeded(),
            "{}",
            crate::support::session_log(&session)
        );
        for _ in 0..stages {
            let stage = session
                .run_stage(&Stage::UserStep("script".to_string()))
                .expect("build_script")
                .expect("invoked");
            assert!(
                stage.succeeded(),
                "{}",
                crate::support::session_log(&session)
            );
            out.add("stage", secs(stage.duration));
        }
        let cleanup = session.cleanup().expect("cleanup invoked");
        assert!(
            cleanup.succeeded(),
            "{}",
            crate::support::session_log(&session)
        );
        out.add(&format!("{prefix} cleanup"), secs(cleanup.duration));
        self.after_cleanup(id);
    }

    /// Log lines of prepare that mark its phases, and the sample each is recorded as.
    fn milestones(&self, prefix: &str) -> Vec<(&'static str, &'static str)> {
        match (self.kind, prefix) {
            (Kind::Hyperjob, "cold") => vec![
                ("Waiting for the guest address", "cold: domain started"),
                ("Guest address", "cold: address"),
            ],
            (Kind::Baseline, "cold") => vec![("VM got IP", "cold: address")],
            _ => Vec::new(),
        }
    }

    /// The demo job through `run_job`; its whole duration if it succeeded.
    pub fn demo_job(&mut self, id: i64, repo_url: &str, sha: &str) -> Option<Duration> {
        let report = run_job(&self.driver, &demo_job(id, repo_url, sha), &self.settings);
        self.after_cleanup(id);
        self.record(id, &report).then_some(report.duration)
    }

    /// Demo jobs `ids` at once; the time until the last one ended, and how many failed. Each
    /// successful prepare's duration goes to `out` as `concurrent prepare`.
    pub fn concurrent_jobs(
        &mut self,
        ids: &[i64],
        repo_url: &str,
        sha: &str,
        out: &mut Samples,
    ) -> (Duration, usize) {
        let started = Instant::now();
        let reports: Vec<Option<JobReport>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ids
                .iter()
                .map(|&id| {
                    let side = &*self;
                    scope.spawn(move || {
                        run_job(&side.driver, &demo_job(id, repo_url, sha), &side.settings)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().ok()).collect()
        });
        let wall = started.elapsed();
        let mut failed = 0;
        for (&id, report) in ids.iter().zip(&reports) {
            self.after_cleanup(id);
            let ok = report
                .as_ref()
                .is_some_and(|report| self.record(id, report));
            failed += usize::from(!ok);
            let prepares = report.iter().flat_map(|report| &report.invocations);
            for prepare in prepares.filter(|i| i.kind == InvocationKind::Prepare && i.succeeded()) {
                out.add("concurrent prepare", secs(prepare.duration));
            }
        }
        (wall, failed)
    }

    /// Whether the job succeeded; if not, why (kept in `failures` and printed).
    fn record(&mut self, id: i64, report: &JobReport) -> bool {
        if report.result == JobResult::Success {
            return true;
        }
        let why = report
            .failure_message
            .clone()
            .unwrap_or_else(|| format!("{:?}", report.result));
        // The driver's own last word, e.g. the baseline's "Waited 30 seconds for VM to start".
        let log = report.log_text();
        let detail = log
            .lines()
            .rfind(|line| line.contains("Waited") || line.contains("rror"))
            .unwrap_or_default();
        eprintln!("{:?}: job {id} failed: {why} {detail}", self.kind);
        self.failures.push(format!("{why} {detail}"));
        false
    }

    /// What the bench removes after a job's cleanup: the baseline's guest, which its cleanup
    /// asks to shut down and leaves running (counted), so that it loads no later measurement.
    fn after_cleanup(&mut self, id: i64) {
        if self.kind != Kind::Baseline {
            return;
        }
        let suffix = format!("-job-{id}");
        let domains = virsh(&self.uri, &["list", "--all", "--name"]);
        for name in domains
            .lines()
            .map(str::trim)
            .filter(|n| n.ends_with(&suffix))
        {
            self.left_running += 1;
            let _ = std::process::Command::new("virsh")
                .args(["-q", "-c", &self.uri, "destroy", name])
                .output();
            let _ = std::process::Command::new("virsh")
                .args(["-q", "-c", &self.uri, "undefine", name])
                .output();
        }
        // After failed prepares the baseline's cleanup leaves the disk (its `set -e` ends it
        // when a virsh step fails, before the `rm`).
        for file in crate::support::list_dir(&self.images_dir) {
            if file.ends_with(&format!("{suffix}.qcow2")) {
                self.left_disks += 1;
                let _ = std::fs::remove_file(self.images_dir.join(file));
            }
        }
    }
}

/// The last invocation of `kind` in the session.
fn last_of(session: &ExecutorSession, kind: &InvocationKind) -> Invocation {
    session
        .invocations()
        .into_iter()
        .rev()
        .find(|invocation| &invocation.kind == kind)
        .expect("the invocation ran")
}

/// When a line of `stage` containing `needle` arrived.
fn line_at(session: &ExecutorSession, stage: &str, needle: &str) -> Option<Instant> {
    session
        .log()
        .iter()
        .find(|line| line.stage == stage && line.text.contains(needle))
        .map(|line| line.at)
}

fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}
