//! Debug hold on failure (`[debug_hold]`): a failed job's VM kept for a bounded time so that the
//! runner host's administrator can look into it.
//!
//! - A job asks with the variable `HYPERJOB_HOLD_ON_FAILURE` (`1800`, `30m`, `1h`; capped at
//!   `max_secs`), which reaches the driver as `CUSTOM_ENV_HYPERJOB_HOLD_ON_FAILURE`. Only the
//!   runner's config enables holds (`[debug_hold]`, optionally for some project ids only, taken
//!   from `JOB_RESPONSE_FILE`, never from a variable a pipeline could set).
//! - When the job's own script fails (the `step_script`/`build_script` stage or any other
//!   `step_*` stage; not the runner's stages such as `get_sources`, nor `after_script`), `run`
//!   asks the transport for the command that reaches the guest
//!   ([`crate::plugin::Transport::access_command`]: existing credentials, host key pinned),
//!   records the hold in the job's state ([`HoldRecord`]) and says in the job log that the VM
//!   will be held, until when, and with which command it is reached.
//! - `cleanup` ends the job's relay and keeps the VM running: the job's state says phase `held`.
//!   Nothing else uses it: `run` and the relay serve only a `ready` job, the pool only its own
//!   VMs, and a new prepare of the same job id ends the hold (its VM is destroyed, as any
//!   leftover of that job).
//! - `hyperjob hold list` shows holds, `hyperjob hold release JOB_ID` ends one now, and `gc`
//!   removes a held VM once its hold has expired: at the recorded end, or earlier when
//!   `max_secs` has been lowered since (or `[debug_hold]` removed). Until then gc keeps it
//!   whatever its runner or deadline: the runner has finished the job. Before cleanup (the
//!   job still runs `after_script`, say) the job is judged as any other: if its runner dies
//!   then, no cleanup comes and gc removes it as usual.

use std::io::Write;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::exit::StageOutcome;
use crate::plugin::{Endpoint, Progress, Transport};
use crate::registry::Registry;
use crate::stages::unix_now;
use crate::state::{JobState, Phase, StateStore};

/// How the job's variable reaches the driver.
pub const HOLD_ENV: &str = "CUSTOM_ENV_HYPERJOB_HOLD_ON_FAILURE";
/// The job variable's name, as the job sets it.
const HOLD_VARIABLE: &str = "HYPERJOB_HOLD_ON_FAILURE";

/// `[debug_hold]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DebugHoldFile {
    max_secs: u64,
    projects: Option<Vec<u64>>,
}

/// `[debug_hold]`: holds are allowed, for at most `max_secs`, for these projects (all without
/// a list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugHold {
    pub max_secs: u64,
    pub projects: Option<Vec<u64>>,
}

impl DebugHold {
    pub(crate) fn from_file(file: DebugHoldFile) -> Result<Self, String> {
        if file.max_secs == 0 {
            return Err("`debug_hold.max_secs` must be positive".to_string());
        }
        if file.projects.as_ref().is_some_and(Vec::is_empty) {
            return Err(
                "`debug_hold.projects` is empty: list the project ids that may hold VMs, or \
                 remove the key to allow every project"
                    .to_string(),
            );
        }
        Ok(Self {
            max_secs: file.max_secs,
            projects: file.projects,
        })
    }
}

/// A hold, as recorded in the job's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRecord {
    /// When the script failed and the hold was granted.
    pub since_unix: u64,
    /// When the hold ends, as granted (the request, capped at `max_secs` of that moment).
    pub until_unix: u64,
    /// The command that reaches the guest (program and arguments).
    pub command: Vec<String>,
}

impl HoldRecord {
    /// When the hold ends under the config of now: never later than granted, nor later than
    /// `max_secs` after it began; at once without `[debug_hold]`.
    pub fn expires_unix(&self, current: Option<&DebugHold>) -> u64 {
        let max = current.map_or(0, |hold| hold.max_secs);
        self.until_unix.min(self.since_unix.saturating_add(max))
    }
}

/// What to do about a failed script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The job did not ask.
    NotAsked,
    /// The job asked and gets no hold, for the reason given (one job-log line).
    Refused(String),
    /// Hold the VM this long; `capped` when the request was longer than `max_secs`.
    Hold { secs: u64, capped: bool },
}

/// Whether a failure in stage `stage` (as the runner names it) is a failure of the job's own
/// script: `step_script` (`build_script` in older runners) and the other `step_*` stages.
pub fn counts(stage: &str) -> bool {
    stage == "build_script" || stage.starts_with("step_")
}

/// The decision about a job of `project_id` that asked for `requested` (the variable's value).
pub fn decide(
    config: Option<&DebugHold>,
    project_id: Option<u64>,
    requested: Option<&str>,
) -> Decision {
    let Some(requested) = requested.map(str::trim).filter(|value| !value.is_empty()) else {
        return Decision::NotAsked;
    };
    let Some(config) = config else {
        return Decision::Refused(format!(
            "{HOLD_VARIABLE} is set, but this runner does not hold VMs (no [debug_hold] in \
             hyperjob's config); the VM is removed as usual"
        ));
    };
    if let Some(projects) = &config.projects {
        if !project_id.is_some_and(|id| projects.contains(&id)) {
            let project =
                project_id.map_or("this project".to_string(), |id| format!("project {id}"));
            return Decision::Refused(format!(
                "{HOLD_VARIABLE} is set, but {project} may not hold VMs on this runner \
                 ([debug_hold] projects); the VM is removed as usual"
            ));
        }
    }
    match parse_duration(requested) {
        Ok(secs) => Decision::Hold {
            secs: secs.min(config.max_secs),
            capped: secs > config.max_secs,
        },
        Err(why) => Decision::Refused(format!(
            "{HOLD_VARIABLE}={:?} {why}; no hold, the VM is removed as usual",
            shown(requested)
        )),
    }
}

/// At most 40 characters of a value, for a message.
fn shown(value: &str) -> String {
    value.chars().take(40).collect()
}

/// A duration: seconds (`90`), or a number with `s`, `m` or `h` (`30m`, `1h`); positive.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    const EXPECTED: &str = "is not a duration such as 1800, 30m or 1h";
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(EXPECTED.to_string()),
    };
    let number: u64 = digits.parse().map_err(|_| EXPECTED.to_string())?;
    let secs = number
        .checked_mul(factor)
        .ok_or_else(|| "is too long".to_string())?;
    if secs == 0 {
        return Err("is zero".to_string());
    }
    Ok(secs)
}

/// `unix` as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(unix: u64) -> String {
    let (days, rest) = (unix / 86_400, unix % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = i64::try_from(days).unwrap_or(i64::MAX / 2) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// A command as one line a shell runs as it is: words with anything but safe characters are
/// single-quoted.
pub fn shell_line(argv: &[String]) -> String {
    argv.iter()
        .map(|word| {
            let safe = !word.is_empty()
                && word.chars().all(|c| {
                    c.is_ascii_alphanumeric()
                        || matches!(
                            c,
                            '-' | '_' | '.' | '/' | '=' | ':' | '@' | ',' | '+' | '[' | ']'
                        )
                });
            if safe {
                word.clone()
            } else {
                format!("'{}'", word.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What `run` knows when a stage script failed.
#[allow(missing_debug_implementations)]
pub struct Failure<'a> {
    pub config: &'a Config,
    pub store: &'a StateStore,
    pub state: &'a JobState,
    pub endpoint: &'a Endpoint,
    pub transport: &'a dyn Transport,
    pub project_id: Option<u64>,
    /// The stage as the runner names it.
    pub stage: &'a str,
    /// The job's `HYPERJOB_HOLD_ON_FAILURE`.
    pub requested: Option<&'a str>,
}

impl Failure<'_> {
    /// Grants the hold the job asked for, if it gets one, and says so (or why not) in the job
    /// log, `out`. The job's result is the script's, whatever happens here.
    pub fn hold(&self, out: &mut dyn Write) {
        if !counts(self.stage) || self.state.hold.is_some() {
            return;
        }
        let mut say = |line: &str| {
            let _ = writeln!(out, "hyperjob: {line}");
        };
        let (secs, capped) = match decide(
            self.config.debug_hold.as_ref(),
            self.project_id,
            self.requested,
        ) {
            Decision::NotAsked => return,
            Decision::Refused(why) => return say(&why),
            Decision::Hold { secs, capped } => (secs, capped),
        };
        let since_unix = unix_now();
        let record = match self.grant(since_unix, secs) {
            Ok(record) => record,
            Err(err) => return say(&format!("no hold ({err:#}); the VM is removed as usual")),
        };
        let cap = if capped {
            format!(", capped at [debug_hold] max_secs = {secs}")
        } else {
            String::new()
        };
        say(&format!(
            "the script failed: VM {} is held for debugging until {} ({secs} s{cap}).",
            self.state.vm_name,
            utc(record.until_unix)
        ));
        say("the runner host's administrator reaches it with:");
        say(&format!("  {}", shell_line(&record.command)));
        say(&format!(
            "and ends the hold earlier with: hyperjob hold release {}",
            self.state.job_id
        ));
    }

    /// Asks the transport for the command and records the hold.
    fn grant(&self, since_unix: u64, secs: u64) -> anyhow::Result<HoldRecord> {
        let dir = self.store.keys_dir(self.state.job_id);
        crate::state::private_dir(&dir, false)?;
        let command = self
            .transport
            .access_command(self.endpoint, &dir)
            .with_context(|| {
                format!(
                    "the {} transport gives no command to reach the VM",
                    self.config.transport
                )
            })?;
        if command.is_empty() {
            bail!(
                "the {} transport gave an empty command",
                self.config.transport
            );
        }
        let record = HoldRecord {
            since_unix,
            until_unix: since_unix.saturating_add(secs),
            command,
        };
        // Read again: this run may have recorded more since it started.
        let mut state = self
            .store
            .load(self.state.job_id)?
            .unwrap_or_else(|| self.state.clone());
        state.hold = Some(record.clone());
        self.store.save(&state).context("cannot record the hold")?;
        Ok(record)
    }
}

/// prepare, finding what an earlier run of the same job left: a held VM serves no job, it is
/// removed with the rest. Job ids are unique, so only a reused id meets a hold.
pub fn end_at_prepare(progress: &dyn Progress, earlier: &JobState) {
    if let Some(hold) = &earlier.hold {
        progress.say(&format!(
            "VM {} of an earlier run of job {} was held for debugging until {}; this prepare \
             ends the hold and removes it",
            earlier.vm_name,
            earlier.job_id,
            utc(hold.until_unix)
        ));
    }
}

/// cleanup: keeps the VM of a job whose hold has not expired (phase `held`; the caller has
/// ended its relay). `Ok(false)`: no hold, the VM goes as usual.
pub fn keep_at_cleanup(
    config: &Config,
    store: &StateStore,
    state: &JobState,
) -> anyhow::Result<bool> {
    let Some(hold) = &state.hold else {
        return Ok(false);
    };
    if !matches!(state.phase, Phase::Ready | Phase::Held) {
        return Ok(false);
    }
    let expires = hold.expires_unix(config.debug_hold.as_ref());
    if expires <= unix_now() {
        tracing::warn!(
            "the debug hold of VM {} ended at {}; removing it",
            state.vm_name,
            utc(expires)
        );
        return Ok(false);
    }
    if state.phase == Phase::Ready {
        store.save(&JobState {
            phase: Phase::Held,
            relay: None,
            ..state.clone()
        })?;
    }
    tracing::warn!(
        "keeping VM {} for debugging until {} (hyperjob hold release {} ends it now)",
        state.vm_name,
        utc(expires),
        state.job_id
    );
    Ok(true)
}

/// `hyperjob hold list`: every job with a hold, held or still running.
pub fn list(config: &Config, out: &mut dyn Write) -> anyhow::Result<StageOutcome> {
    let store = StateStore::new(&config.state_dir);
    let now = unix_now();
    writeln!(
        out,
        "{:<12} {:<28} {:<8} {:<24} COMMAND",
        "JOB", "VM", "STATE", "UNTIL"
    )?;
    for job_id in store.job_ids_with_files()? {
        let Ok(Some(state)) = store.load(job_id) else {
            continue;
        };
        let Some(hold) = &state.hold else {
            continue;
        };
        let expires = hold.expires_unix(config.debug_hold.as_ref());
        let what = match state.phase {
            _ if expires <= now => "expired",
            Phase::Held => "held",
            Phase::Ready => "running",
            Phase::Creating | Phase::Destroying => continue,
        };
        writeln!(
            out,
            "{job_id:<12} {:<28} {what:<8} {:<24} {}",
            state.vm_name,
            utc(expires),
            shell_line(&hold.command)
        )?;
    }
    Ok(StageOutcome::Success)
}

/// `hyperjob hold release JOB_ID`: destroys a held VM now. A job that is still running gets
/// no hold (its cleanup removes the VM as usual).
pub fn release(
    config: &Config,
    registry: &Registry,
    job_id: u64,
    out: &mut dyn Write,
) -> anyhow::Result<StageOutcome> {
    let store = StateStore::new(&config.state_dir);
    let Some(lock) = store.try_lock_exclusive(job_id)? else {
        bail!("a stage of job {job_id} is running; release its hold once the stage has ended");
    };
    let state = match store.load(job_id)? {
        Some(state) if state.hold.is_some() => state,
        _ => {
            // Nothing of the job: leave no lock file behind.
            if store.load(job_id)?.is_none() {
                lock.remove_file()?;
            }
            bail!("job {job_id} is not held (hyperjob hold list shows the holds)");
        }
    };
    match state.phase {
        Phase::Held => {
            crate::teardown::destroy_recorded(config, registry, &store, &state)?;
            drop(lock);
            writeln!(out, "released job {job_id}: removed VM {}", state.vm_name)?;
        }
        Phase::Ready => {
            store.save(&JobState {
                hold: None,
                ..state
            })?;
            writeln!(
                out,
                "job {job_id} is still running: it gets no hold, its cleanup removes the VM"
            )?;
        }
        Phase::Creating | Phase::Destroying => {
            bail!("job {job_id} is not held (hyperjob hold list shows the holds)")
        }
    }
    Ok(StageOutcome::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(max_secs: u64, projects: Option<Vec<u64>>) -> DebugHold {
        DebugHold { max_secs, projects }
    }

    #[test]
    fn durations_are_seconds_minutes_or_hours() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("45s"), Ok(45));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration(" 1h "), Ok(3600));
        for bad in [
            "", "0", "0m", "1d", "m", "-5", "1.5h", "1h30m", "30 m", "h1", "x",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_duration("99999999999999999999h").is_err());
        assert_eq!(
            parse_duration("18446744073709551615h"),
            Err("is too long".to_string())
        );
    }

    #[test]
    fn a_request_is_capped_at_max_secs() {
        let config = hold(3600, None);
        assert_eq!(
            decide(Some(&config), Some(1), Some("30m")),
            Decision::Hold {
                secs: 1800,
                capped: false
            }
        );
        assert_eq!(
            decide(Some(&config), Some(1), Some("2h")),
            Decision::Hold {
                secs: 3600,
                capped: true
            }
        );
        assert_eq!(
            decide(Some(&config), None, Some("3600")),
            Decision::Hold {
                secs: 3600,
                capped: false
            }
        );
    }

    #[test]
    fn no_request_no_table_a_bad_value_or_another_project_get_no_hold() {
        let config = hold(600, Some(vec![12, 13]));
        assert_eq!(decide(Some(&config), Some(12), None), Decision::NotAsked);
        assert_eq!(
            decide(Some(&config), Some(12), Some(" ")),
            Decision::NotAsked
        );
        let refused = |decision: Decision| match decision {
            Decision::Refused(why) => why,
            other => panic!("not refused: {other:?}"),
        };
        let none = refused(decide(None, Some(12), Some("5m")));
        assert!(none.contains("no [debug_hold]"), "{none}");
        let other = refused(decide(Some(&config), Some(14), Some("5m")));
        assert!(other.contains("project 14 may not hold"), "{other}");
        let unknown = refused(decide(Some(&config), None, Some("5m")));
        assert!(unknown.contains("this project may not hold"), "{unknown}");
        let bad = refused(decide(Some(&config), Some(13), Some("soon\nplease")));
        assert!(bad.contains("\"soon\\nplease\" is not a duration"), "{bad}");
        assert!(!bad.contains('\n'), "{bad}");
        assert_eq!(
            decide(Some(&config), Some(13), Some("5m")),
            Decision::Hold {
                secs: 300,
                capped: false
            }
        );
    }

    #[test]
    fn a_hold_never_outlives_the_current_max_secs() {
        let record = HoldRecord {
            since_unix: 1000,
            until_unix: 4600,
            command: vec!["ssh".into()],
        };
        assert_eq!(record.expires_unix(Some(&hold(3600, None))), 4600);
        assert_eq!(record.expires_unix(Some(&hold(7200, None))), 4600);
        assert_eq!(record.expires_unix(Some(&hold(60, None))), 1060);
        assert_eq!(record.expires_unix(None), 1000);
    }

    #[test]
    fn only_the_jobs_own_script_stages_count() {
        for stage in ["step_script", "build_script", "step_release"] {
            assert!(counts(stage), "{stage}");
        }
        for stage in [
            "prepare_script",
            "get_sources",
            "after_script",
            "upload_artifacts_on_failure",
            "archive_cache_on_failure",
        ] {
            assert!(!counts(stage), "{stage}");
        }
    }

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_798_590_225), "2026-12-30 00:23:45 UTC");
    }

    #[test]
    fn the_command_line_quotes_what_a_shell_would_split() {
        let argv: Vec<String> = ["ssh", "-o", "UserKnownHostsFile=/var/lib/my dir/k", "it's"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            shell_line(&argv),
            r"ssh -o 'UserKnownHostsFile=/var/lib/my dir/k' 'it'\''s'"
        );
    }

    #[test]
    fn the_config_table_is_read_and_checked_naming_the_key() {
        let parse = |extra: &str| {
            Config::parse(
                std::path::Path::new("/etc/hyperjob/t.toml"),
                &format!("backend = \"libvirt\"\ntransport = \"ssh\"\n{extra}"),
            )
        };
        assert_eq!(parse("").expect("valid").debug_hold, None);
        assert_eq!(
            parse("[debug_hold]\nmax_secs = 600\nprojects = [12]\n")
                .expect("valid")
                .debug_hold,
            Some(hold(600, Some(vec![12])))
        );
        for (bad, named) in [
            ("max_secs = 0", "`debug_hold.max_secs` must be positive"),
            (
                "max_secs = 5\nprojects = []",
                "`debug_hold.projects` is empty",
            ),
            ("max_sec = 5", "max_sec"),
            ("", "max_secs"),
            ("max_secs = \"1h\"", "line 4"),
        ] {
            let err = parse(&format!("[debug_hold]\n{bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(err.contains(named), "{bad}: {err}");
            assert!(err.starts_with("config file /etc/hyperjob/t.toml"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }
}
