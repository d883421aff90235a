//! Prometheus metrics in a file the node exporter's textfile collector reads
//! (`metrics_file = "PATH"`, names prefixed `hyperjob_`).
//!
//! Every stage is its own short process, so the numbers live on disk: `<metrics_file>.json`
//! holds them (the collector reads only `*.prom`), and each update takes an exclusive lock on
//! `<metrics_file>.lock`, reads, adds, and writes the JSON and then the text file, each through
//! a temporary file and a rename. Concurrent stages therefore never lose a count, and the
//! collector never reads a half-written file. A metrics failure is logged, never a stage
//! failure.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plugin::PluginError;

/// Upper bounds (seconds) of the prepare histogram's buckets.
const PREPARE_BUCKETS: &[f64] = &[
    0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// Upper bounds of the cleanup and stage-overhead histograms' buckets.
const SHORT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0];

/// One histogram: cumulative counts per bucket bound, as Prometheus reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Histogram {
    /// Count of observations ≤ each bound (same order as the bounds).
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], value: f64) {
        self.buckets.resize(bounds.len(), 0);
        for (bound, bucket) in bounds.iter().zip(self.buckets.iter_mut()) {
            if value <= *bound {
                *bucket += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }
}

/// Everything counted so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Counts {
    /// `stage/outcome` → count.
    #[serde(default)]
    stages: BTreeMap<String, u64>,
    /// `outcome/cause` → jobs, counted when their cleanup runs.
    #[serde(default)]
    jobs: BTreeMap<String, u64>,
    /// `stage/cause` → system failures.
    #[serde(default)]
    system_failures: BTreeMap<String, u64>,
    /// `cold` / `warm` → prepare seconds.
    #[serde(default)]
    prepare: BTreeMap<String, Histogram>,
    #[serde(default)]
    cleanup: Histogram,
    #[serde(default)]
    stage_overhead: Histogram,
    /// reason → VMs gc removed.
    #[serde(default)]
    gc_removals: BTreeMap<String, u64>,
    #[serde(default)]
    vms_alive: u64,
}

/// What one process adds.
#[derive(Debug, Clone, Default)]
pub struct Update {
    /// (stage, outcome): outcome is `success`, `build_failure` or `system_failure`.
    pub stage: Option<(String, &'static str)>,
    /// (stage, cause) of a system failure.
    pub system_failure: Option<(String, String)>,
    /// (outcome, cause) of a job that ended (cleanup ran).
    pub job: Option<(&'static str, String)>,
    /// (`cold`|`warm`, seconds) of a successful prepare.
    pub prepare: Option<(&'static str, f64)>,
    pub cleanup_seconds: Option<f64>,
    pub stage_overhead_seconds: Option<f64>,
    /// reason → count.
    pub gc_removals: Vec<(String, u64)>,
    /// VMs alive now, where the process knows it (gc).
    pub vms_alive: Option<u64>,
}

/// The cause of a system failure, as a short label: what kind of error is in the chain.
pub fn cause_of(err: &anyhow::Error, interrupted: bool) -> String {
    if interrupted {
        return "interrupted".into();
    }
    for cause in err.chain() {
        if let Some(plugin) = cause.downcast_ref::<PluginError>() {
            return match plugin {
                PluginError::Config(_) => "config",
                PluginError::NotFound(_) => "not_found",
                PluginError::Unsupported(_) => "unsupported",
                PluginError::Timeout { .. } => "timeout",
                PluginError::Interrupted(_) => "interrupted",
                PluginError::NotStarted(_) => "not_started",
                PluginError::System { .. } => "system",
            }
            .into();
        }
        if cause.downcast_ref::<crate::config::ConfigError>().is_some() {
            return "config".into();
        }
        if cause.downcast_ref::<crate::job::JobError>().is_some() {
            return "job_response".into();
        }
        if cause.downcast_ref::<crate::state::StateError>().is_some() {
            return "state".into();
        }
    }
    "other".into()
}

/// What a job stage (`prepare`, `run`, `cleanup`) ended with, counted when `metrics_file` is
/// set; a failed `run` also marks the job's state with its first failure, for the job's count
/// at cleanup. `stage_overhead`: hyperjob's own seconds in a `run` whose script's time in the
/// guest is known.
pub fn stage_finished(
    config: &crate::config::Config,
    job_id: u64,
    stage: &str,
    result: &anyhow::Result<crate::exit::StageOutcome>,
    interrupted: bool,
    stage_overhead: Option<f64>,
) {
    use crate::exit::StageOutcome;
    let (outcome, failure) = match result {
        Ok(StageOutcome::Success) => ("success", None),
        // A stopped script is the runner's doing: the binary reports it as a system failure.
        Ok(StageOutcome::ScriptFailed { .. }) if interrupted => {
            ("system_failure", Some("system_failure/interrupted".into()))
        }
        Ok(StageOutcome::ScriptFailed { .. }) => ("build_failure", Some("build_failure".into())),
        Err(err) => (
            "system_failure",
            Some(format!("system_failure/{}", cause_of(err, interrupted))),
        ),
    };
    if stage == "run" {
        if let Some(failure) = &failure {
            mark_failure(config, job_id, failure);
        }
    }
    let Some(metrics_file) = &config.metrics_file else {
        return;
    };
    let system_failure = failure
        .as_deref()
        .and_then(|f| f.strip_prefix("system_failure/"))
        .map(|cause| (stage.to_string(), cause.to_string()));
    record(
        metrics_file,
        &Update {
            stage: Some((stage.to_string(), outcome)),
            system_failure,
            stage_overhead_seconds: stage_overhead,
            ..Update::default()
        },
    );
}

/// Records a run's failure in the job's state, unless an earlier one is recorded.
fn mark_failure(config: &crate::config::Config, job_id: u64, failure: &str) {
    let store = crate::state::StateStore::new(&config.state_dir);
    if let Ok(Some(mut state)) = store.load(job_id) {
        if state.failure.is_none() {
            state.failure = Some(failure.to_string());
            if let Err(err) = store.save(&state) {
                tracing::warn!("cannot record the job's failure: {err:#}");
            }
        }
    }
}

/// The outcome and cause a job ended with, from its first recorded failure (`None`: none,
/// success); a job that never got a ready VM (no state at cleanup) failed in prepare.
pub fn job_outcome(failure: Option<&str>, had_state: bool) -> (&'static str, String) {
    match failure {
        _ if !had_state => ("system_failure", "prepare".into()),
        None => ("success", String::new()),
        Some("build_failure") => ("build_failure", String::new()),
        Some(other) => (
            "system_failure",
            other
                .strip_prefix("system_failure/")
                .unwrap_or(other)
                .to_string(),
        ),
    }
}

/// Passes gc's report through and counts its `removed <what>: <reason>` lines by reason.
#[allow(missing_debug_implementations)]
pub struct RemovalCounter<'a> {
    inner: &'a mut dyn Write,
    line: Vec<u8>,
    removals: BTreeMap<String, u64>,
}

impl<'a> RemovalCounter<'a> {
    pub fn new(inner: &'a mut dyn Write) -> Self {
        Self {
            inner,
            line: Vec::new(),
            removals: BTreeMap::new(),
        }
    }

    /// The removals counted, by reason.
    pub fn removals(&self) -> Vec<(String, u64)> {
        self.removals
            .iter()
            .map(|(reason, count)| (reason.clone(), *count))
            .collect()
    }
}

impl Write for RemovalCounter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(buf)?;
        for &byte in &buf[..written] {
            if byte == b'\n' {
                let line = String::from_utf8_lossy(&self.line).into_owned();
                if let Some(reason) = line
                    .strip_prefix("removed ")
                    .and_then(|rest| rest.split_once(": "))
                    .map(|(_, reason)| removal_reason(reason))
                {
                    *self.removals.entry(reason.to_string()).or_default() += 1;
                }
                self.line.clear();
            } else {
                self.line.push(byte);
            }
        }
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A short label for a gc reason (its text holds pids, job ids and seconds).
pub fn removal_reason(reason: &str) -> &'static str {
    const REASONS: &[(&str, &str)] = &[
        ("deadline has passed", "deadline_passed"),
        ("prepare was killed", "prepare_killed"),
        ("runner", "runner_gone"),
        ("VM is gone", "vm_gone"),
        ("debug hold has expired", "hold_expired"),
        ("temporary file", "stale_temporary_file"),
        ("idle in the pool", "pool_idle"),
        ("another base image", "pool_stale"),
        ("boot was interrupted", "pool_boot_interrupted"),
        ("claim by job", "pool_claim_interrupted"),
        ("pool record", "pool_unrecorded"),
    ];
    REASONS
        .iter()
        .find(|(needle, _)| reason.contains(needle))
        .map_or("other", |(_, label)| label)
}

/// Adds `update` to the metrics behind `metrics_file`; a failure is logged, not returned.
pub fn record(metrics_file: &Path, update: &Update) {
    if let Err(err) = apply(metrics_file, update) {
        tracing::warn!(
            "cannot update the metrics in {}: {err:#}",
            metrics_file.display()
        );
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn apply(metrics_file: &Path, update: &Update) -> anyhow::Result<()> {
    let lock = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(sibling(metrics_file, ".lock"))?;
    lock.lock()?;
    let json = sibling(metrics_file, ".json");
    let mut counts: Counts = match fs::read(&json) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Counts::default(),
        Err(err) => return Err(err.into()),
    };
    add(&mut counts, update);
    write_atomically(&json, serde_json::to_vec(&counts)?.as_slice(), 0o600)?;
    write_atomically(metrics_file, render(&counts).as_bytes(), 0o644)?;
    drop::<File>(lock);
    Ok(())
}

fn add(counts: &mut Counts, update: &Update) {
    if let Some((stage, outcome)) = &update.stage {
        *counts
            .stages
            .entry(format!("{stage}/{outcome}"))
            .or_default() += 1;
    }
    if let Some((stage, cause)) = &update.system_failure {
        *counts
            .system_failures
            .entry(format!("{stage}/{cause}"))
            .or_default() += 1;
    }
    if let Some((outcome, cause)) = &update.job {
        *counts.jobs.entry(format!("{outcome}/{cause}")).or_default() += 1;
    }
    if let Some((kind, seconds)) = update.prepare {
        counts
            .prepare
            .entry(kind.to_string())
            .or_default()
            .observe(PREPARE_BUCKETS, seconds);
    }
    if let Some(seconds) = update.cleanup_seconds {
        counts.cleanup.observe(SHORT_BUCKETS, seconds);
    }
    if let Some(seconds) = update.stage_overhead_seconds {
        counts.stage_overhead.observe(SHORT_BUCKETS, seconds);
    }
    for (reason, count) in &update.gc_removals {
        *counts.gc_removals.entry(reason.clone()).or_default() += count;
    }
    if let Some(alive) = update.vms_alive {
        counts.vms_alive = alive;
    }
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = sibling(path, &format!(".{}.tmp", std::process::id()));
    let mut options = OpenOptions::new();
    options.write(true).create(true).mode(mode);
    crate::state::replace_file(&options, &tmp, path, bytes)
}

/// A label value, escaped as the text format wants.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Splits a `a/b` key into its two label values.
fn pair(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or((key, ""))
}

/// The Prometheus text exposition of `counts`.
fn render(counts: &Counts) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    };
    family(
        "hyperjob_stages_total",
        "counter",
        "Stage invocations (prepare, run, cleanup) by outcome.",
    );
    let mut text = out;
    for (key, count) in &counts.stages {
        let (stage, outcome) = pair(key);
        text.push_str(&format!(
            "hyperjob_stages_total{{stage=\"{}\",outcome=\"{}\"}} {count}\n",
            label(stage),
            label(outcome)
        ));
    }
    let mut section = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for line in lines {
            text.push_str(&line);
            text.push('\n');
        }
    };
    section(
        "hyperjob_jobs_total",
        "counter",
        "Jobs by outcome (and the cause of a system failure), counted when their cleanup runs.",
        counts
            .jobs
            .iter()
            .map(|(key, count)| {
                let (outcome, cause) = pair(key);
                format!(
                    "hyperjob_jobs_total{{outcome=\"{}\",cause=\"{}\"}} {count}",
                    label(outcome),
                    label(cause)
                )
            })
            .collect(),
    );
    section(
        "hyperjob_system_failures_total",
        "counter",
        "System failures by stage and cause.",
        counts
            .system_failures
            .iter()
            .map(|(key, count)| {
                let (stage, cause) = pair(key);
                format!(
                    "hyperjob_system_failures_total{{stage=\"{}\",cause=\"{}\"}} {count}",
                    label(stage),
                    label(cause)
                )
            })
            .collect(),
    );
    let mut prepare = Vec::new();
    for (kind, histogram) in &counts.prepare {
        prepare.extend(histogram_lines(
            "hyperjob_prepare_seconds",
            &format!("kind=\"{}\",", label(kind)),
            PREPARE_BUCKETS,
            histogram,
        ));
    }
    section(
        "hyperjob_prepare_seconds",
        "histogram",
        "Successful prepares: cold (booted) or warm (claimed from the pool).",
        prepare,
    );
    section(
        "hyperjob_stage_overhead_seconds",
        "histogram",
        "hyperjob's own time per run stage, without the script's.",
        histogram_lines(
            "hyperjob_stage_overhead_seconds",
            "",
            SHORT_BUCKETS,
            &counts.stage_overhead,
        ),
    );
    section(
        "hyperjob_cleanup_seconds",
        "histogram",
        "Successful cleanups.",
        histogram_lines(
            "hyperjob_cleanup_seconds",
            "",
            SHORT_BUCKETS,
            &counts.cleanup,
        ),
    );
    section(
        "hyperjob_gc_removals_total",
        "counter",
        "VMs and files gc removed, by reason.",
        counts
            .gc_removals
            .iter()
            .map(|(reason, count)| {
                format!(
                    "hyperjob_gc_removals_total{{reason=\"{}\"}} {count}",
                    label(reason)
                )
            })
            .collect(),
    );
    section(
        "hyperjob_vms_alive",
        "gauge",
        "VMs of this installation (jobs' and pooled) when last counted.",
        vec![format!("hyperjob_vms_alive {}", counts.vms_alive)],
    );
    text
}

fn histogram_lines(name: &str, labels: &str, bounds: &[f64], h: &Histogram) -> Vec<String> {
    let mut lines: Vec<String> = bounds
        .iter()
        .enumerate()
        .map(|(i, bound)| {
            format!(
                "{name}_bucket{{{labels}le=\"{bound}\"}} {}",
                h.buckets.get(i).copied().unwrap_or(0)
            )
        })
        .collect();
    let plain = labels.trim_end_matches(',');
    let plain = if plain.is_empty() {
        String::new()
    } else {
        format!("{{{plain}}}")
    };
    lines.push(format!("{name}_bucket{{{labels}le=\"+Inf\"}} {}", h.count));
    lines.push(format!("{name}_sum{plain} {}", h.sum));
    lines.push(format!("{name}_count{plain} {}", h.count));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let mut h = Histogram::default();
        for value in [0.02, 0.25, 7.0] {
            h.observe(SHORT_BUCKETS, value);
        }

        let lines = histogram_lines("x", "", SHORT_BUCKETS, &h);

        assert!(
            lines.contains(&"x_bucket{le=\"0.01\"} 0".to_string()),
            "{lines:?}"
        );
        assert!(lines.contains(&"x_bucket{le=\"0.025\"} 1".to_string()));
        assert!(lines.contains(&"x_bucket{le=\"0.5\"} 2".to_string()));
        assert!(lines.contains(&"x_bucket{le=\"10\"} 3".to_string()));
        assert!(lines.contains(&"x_bucket{le=\"+Inf\"} 3".to_string()));
        assert!(lines.contains(&"x_sum 7.27".to_string()), "{lines:?}");
        assert!(lines.contains(&"x_count 3".to_string()));
    }

    #[test]
    fn concurrent_updates_never_lose_a_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("hyperjob.prom");
        let update = Update {
            stage: Some(("cleanup".into(), "success")),
            cleanup_seconds: Some(0.2),
            ..Update::default()
        };

        std::thread::scope(|scope| {
            for _ in 0..16 {
                scope.spawn(|| {
                    for _ in 0..5 {
                        apply(&file, &update).expect("update");
                    }
                });
            }
        });

        let text = fs::read_to_string(&file).expect("read");
        assert!(
            text.contains("hyperjob_stages_total{stage=\"cleanup\",outcome=\"success\"} 80\n"),
            "{text}"
        );
        assert!(
            text.contains("hyperjob_cleanup_seconds_count 80\n"),
            "{text}"
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn causes_come_from_the_error_chain() {
        let timeout = anyhow::Error::new(PluginError::Timeout {
            what: "x".into(),
            secs: 1,
        })
        .context("VM got no address");

        assert_eq!(cause_of(&timeout, false), "timeout");
        assert_eq!(cause_of(&timeout, true), "interrupted");
        assert_eq!(cause_of(&anyhow::anyhow!("plain"), false), "other");
    }

    #[test]
    fn gc_reasons_become_short_labels_and_are_counted() {
        let mut report = Vec::new();
        let mut counter = RemovalCounter::new(&mut report);
        write!(
            counter,
            "removed hyperjob-job-1: its runner (gitlab-runner, pid 812) is gone\n\
             left hyperjob-job-2 alone: x\nremoved hyperjob-job-3: its deadline has passed\n\
             removed hyperjob-job-4: its runner (perl, pid 9) is gone\n"
        )
        .expect("write");

        assert_eq!(
            counter.removals(),
            [
                ("deadline_passed".to_string(), 1),
                ("runner_gone".to_string(), 2)
            ]
        );
        assert!(String::from_utf8(report)
            .expect("utf-8")
            .contains("left hyperjob-job-2"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
