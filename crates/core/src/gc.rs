//! `hyperjob gc`: removes what jobs left behind when cleanup never ran (the runner died, the
//! host rebooted, a process was killed) — and never touches anything hyperjob does not own.
//!
//! Owned means: a VM the backend reports with hyperjob's ownership record (job id, creation
//! time, deadline), or a job with a state file in `state_dir`. A job's resources are removed
//! when its deadline (creation + job timeout + 1 h) has passed, or when the job is gone: no
//! prepare or run of it is running (its activity lock is free) and its VM no longer exists.

use std::collections::HashSet;
use std::io::Write;

use anyhow::bail;

use crate::config::Config;
use crate::exit::StageOutcome;
use crate::plugin::{Backend, PluginError};
use crate::registry::Registry;
use crate::stages::{build_backend, unix_now};
use crate::state::StateStore;

/// Why a job's resources are garbage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep: the job may still be running.
    Keep,
    DeadlinePassed,
    /// Its VM no longer exists and nothing works on the job.
    Gone,
}

/// The rule, as a pure function of what gc observed.
pub fn judge(now: u64, deadline: u64, active: bool, vm_exists: Option<bool>) -> Verdict {
    if now > deadline {
        Verdict::DeadlinePassed
    } else if active {
        Verdict::Keep
    } else if vm_exists == Some(false) {
        Verdict::Gone
    } else {
        Verdict::Keep
    }
}

/// Runs garbage collection, reporting one line per job to `out`.
pub fn gc(
    config: &Config,
    registry: &Registry,
    dry_run: bool,
    out: &mut dyn Write,
) -> anyhow::Result<StageOutcome> {
    let backend = build_backend(config, registry)?;
    let store = StateStore::new(&config.state_dir);
    let now = unix_now();
    let owned = match backend.list_owned() {
        Ok(owned) => Some(owned),
        Err(PluginError::Unsupported(_)) => None,
        Err(err) => return Err(anyhow::Error::new(err).context("cannot list the backend's VMs")),
    };
    let live: Option<HashSet<String>> = owned
        .as_ref()
        .map(|vms| vms.iter().map(|vm| vm.vm_name.clone()).collect());
    let mut handled = HashSet::new();
    let mut failures = 0usize;
    let mut act = |vm_name: &str, job_id: Option<u64>, reason: &str| {
        if dry_run {
            let _ = writeln!(out, "would remove {vm_name}: {reason}");
            return;
        }
        match remove(backend.as_ref(), &store, vm_name, job_id) {
            Ok(()) => {
                let _ = writeln!(out, "removed {vm_name}: {reason}");
            }
            Err(err) => {
                failures += 1;
                let _ = writeln!(out, "could not remove {vm_name}: {err:#}");
            }
        }
    };

    for vm in owned.iter().flatten() {
        let active = store.is_active(vm.job_id).unwrap_or(true);
        if judge(now, vm.deadline_unix, active, Some(true)) == Verdict::DeadlinePassed {
            act(&vm.vm_name, Some(vm.job_id), "its deadline has passed");
            handled.insert(vm.job_id);
        }
    }
    for job_id in store.job_ids()? {
        if handled.contains(&job_id) {
            continue;
        }
        let active = store.is_active(job_id)?;
        let (vm_name, deadline) = match store.load(job_id) {
            Ok(Some(state)) => (state.vm_name, state.deadline_unix),
            Ok(None) => continue,
            // An unreadable record of ours: judge it by its name alone, as if expired.
            Err(_) if !active => (format!("hyperjob-job-{job_id}"), 0),
            Err(_) => continue,
        };
        let exists = live.as_ref().map(|live| live.contains(&vm_name));
        match judge(now, deadline, active, exists) {
            Verdict::Keep => {}
            Verdict::DeadlinePassed => act(&vm_name, Some(job_id), "its deadline has passed"),
            Verdict::Gone => act(
                &vm_name,
                Some(job_id),
                "its VM is gone and no stage is running",
            ),
        }
    }
    if failures > 0 {
        bail!("{failures} job(s) could not be removed");
    }
    Ok(StageOutcome::Success)
}

fn remove(
    backend: &dyn Backend,
    store: &StateStore,
    vm_name: &str,
    job_id: Option<u64>,
) -> anyhow::Result<()> {
    backend.destroy(vm_name)?;
    if let Some(job_id) = job_id {
        store.remove(job_id)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_deadline_is_garbage_even_while_active() {
        assert_eq!(judge(101, 100, true, Some(true)), Verdict::DeadlinePassed);
    }

    #[test]
    fn active_job_is_kept() {
        assert_eq!(judge(50, 100, true, Some(false)), Verdict::Keep);
    }

    #[test]
    fn idle_job_without_vm_is_gone() {
        assert_eq!(judge(50, 100, false, Some(false)), Verdict::Gone);
    }

    #[test]
    fn idle_job_with_running_vm_is_kept() {
        assert_eq!(judge(50, 100, false, Some(true)), Verdict::Keep);
    }

    #[test]
    fn unknown_vm_existence_keeps_the_job_until_its_deadline() {
        assert_eq!(judge(50, 100, false, None), Verdict::Keep);
        assert_eq!(judge(150, 100, false, None), Verdict::DeadlinePassed);
    }
}
