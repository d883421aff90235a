//! `hyperjob gc`: removes what jobs left behind when cleanup never ran (the runner died, the
//! host rebooted, a process was killed) — and never touches anything hyperjob does not own.
//!
//! Owned means: a VM the backend reports with hyperjob's ownership record (job id, creation
//! time, deadline, owner), or a job with a state file in `state_dir`. A job's resources are
//! removed when its deadline (creation + job timeout + 1 h) has passed, or when the job is gone:
//! no prepare or run of it is running (its activity lock is free) and its VM no longer exists.
//!
//! Several installations (configs with different `state_dir`s) may share one hypervisor. Each
//! VM records its owner, the `state_dir` of the installation that made it ([`owner_of`]), and gc
//! only judges VMs of its own installation ([`ownership`]); a VM recorded without an owner (by a
//! hyperjob from before owners were recorded) is judged as before, so nothing leaks across an
//! upgrade.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

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

/// The owner an installation records on its VMs: the absolute path of its `state_dir`, written
/// the same way every time (lexically normalised: no `.`, no doubled or trailing `/`), as UTF-8
/// with every control character replaced by U+FFFD, so any backend's record (XML, JSON) keeps it
/// exactly.
pub fn owner_of(state_dir: &Path) -> String {
    let normal: PathBuf = state_dir
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    normal
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

/// Whose VM a listed VM is, as far as this installation's gc is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// Made by this installation: judged.
    Ours,
    /// Recorded without an owner, by an older hyperjob: judged as before owners existed.
    Unrecorded,
    /// Made by another installation: left alone.
    Other,
}

/// The owner rule, as a pure function: `recorded` is the VM's recorded owner, `ours` this
/// installation's ([`owner_of`] its `state_dir`).
pub fn ownership(recorded: Option<&str>, ours: &str) -> Ownership {
    match recorded {
        None => Ownership::Unrecorded,
        Some(owner) if owner == ours => Ownership::Ours,
        Some(_) => Ownership::Other,
    }
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
    // Another installation's VMs are left alone, even past their deadline: their own gc
    // removes them. A dry run names those it would otherwise have removed.
    let me = owner_of(&config.state_dir);
    let mut judged = Vec::new();
    for vm in owned.iter().flatten() {
        match (ownership(vm.owner.as_deref(), &me), &vm.owner) {
            (Ownership::Other, Some(owner)) => {
                if dry_run && now > vm.deadline_unix {
                    let _ = writeln!(out, "skipping {}: owned by {owner}", vm.vm_name);
                }
            }
            _ => judged.push(vm),
        }
    }
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

    for vm in judged {
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
    use crate::plugin::OwnedVm;

    #[test]
    fn a_vm_of_this_installation_is_judged() {
        let ours = owner_of(Path::new("/var/lib/hyperjob"));

        assert_eq!(ownership(Some("/var/lib/hyperjob"), &ours), Ownership::Ours);
    }

    #[test]
    fn a_vm_without_a_recorded_owner_is_judged_as_before() {
        assert_eq!(ownership(None, "/var/lib/hyperjob"), Ownership::Unrecorded);
    }

    #[test]
    fn a_vm_of_another_installation_is_left_alone() {
        let ours = "/var/lib/hyperjob";

        for other in [
            "/var/lib/hyperjob-b",
            "/var/lib",
            "/var/lib/hyperjob/sub",
            "var/lib/hyperjob",
            "",
        ] {
            assert_eq!(ownership(Some(other), ours), Ownership::Other, "{other:?}");
        }
    }

    #[test]
    fn the_owner_is_written_the_same_way_for_the_same_directory() {
        for spelling in [
            "/var/lib/hyperjob",
            "/var/lib/hyperjob/",
            "/var//lib/./hyperjob",
        ] {
            assert_eq!(owner_of(Path::new(spelling)), "/var/lib/hyperjob");
        }
        assert_ne!(
            owner_of(Path::new("/var/lib/hyperjob/../x")),
            "/var/lib/x",
            "`..` is kept: it may cross a symlink"
        );
    }

    #[test]
    fn the_owner_carries_no_control_characters() {
        use std::os::unix::ffi::OsStrExt;
        let odd = Path::new(std::ffi::OsStr::from_bytes(b"/srv/a\nb\x01\xff<&>'\""));

        let owner = owner_of(odd);

        assert_eq!(owner, "/srv/a\u{FFFD}b\u{FFFD}\u{FFFD}<&>'\"");
    }

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

    /// Lists fixed VMs and records what it is asked to destroy: gc's decisions, without VMs.
    struct Listed {
        vms: Vec<OwnedVm>,
        destroyed: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl Backend for Listed {
        fn create(
            &self,
            _request: &crate::VmRequest,
            _progress: &dyn crate::plugin::Progress,
        ) -> Result<(), PluginError> {
            Err(PluginError::Unsupported("create"))
        }

        fn wait_address(
            &self,
            _vm_name: &str,
            _deadline: std::time::Instant,
            _cancel: &std::sync::atomic::AtomicBool,
        ) -> Result<crate::Endpoint, PluginError> {
            Err(PluginError::Unsupported("wait_address"))
        }

        fn destroy(&self, vm_name: &str) -> Result<(), PluginError> {
            self.destroyed
                .lock()
                .expect("lock")
                .push(vm_name.to_string());
            Ok(())
        }

        fn list_owned(&self) -> Result<Vec<OwnedVm>, PluginError> {
            Ok(self.vms.clone())
        }
    }

    /// Runs gc with `state_dir` over a backend listing `vms`: its report and what it destroyed.
    fn gc_over(state_dir: &Path, vms: &[OwnedVm], dry_run: bool) -> (Vec<String>, Vec<String>) {
        use crate::registry::{Entry, Origin};
        let destroyed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (listed, log) = (vms.to_vec(), destroyed.clone());
        let mut registry = Registry::default();
        registry
            .add_backend(Entry {
                name: "listed".into(),
                version: "0".into(),
                origin: Origin::BuiltIn,
                build: std::sync::Arc::new(move |_, _| {
                    Ok(Box::new(Listed {
                        vms: listed.clone(),
                        destroyed: log.clone(),
                    }) as Box<dyn Backend>)
                }),
            })
            .expect("register");
        let config = Config::parse(
            Path::new("/etc/hyperjob/test.toml"),
            &format!(
                "backend = \"listed\"\ntransport = \"ssh\"\nstate_dir = {:?}\n",
                state_dir.display().to_string()
            ),
        )
        .expect("config");
        let mut out = Vec::new();

        gc(&config, &registry, dry_run, &mut out).expect("gc");

        let report = String::from_utf8(out).expect("utf-8");
        let destroyed = destroyed.lock().expect("lock").clone();
        (report.lines().map(str::to_string).collect(), destroyed)
    }

    fn listed_vm(job_id: u64, deadline_unix: u64, owner: Option<&str>) -> OwnedVm {
        OwnedVm {
            vm_name: format!("hyperjob-job-{job_id}"),
            job_id,
            created_unix: 0,
            deadline_unix,
            owner: owner.map(str::to_string),
        }
    }

    #[test]
    fn gc_removes_expired_vms_of_its_own_or_of_no_owner_and_leaves_others_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state_dir = dir.path().join("state");
        let ours = owner_of(&state_dir);
        let vms = [
            listed_vm(1, 1, Some(&ours)),
            listed_vm(2, 1, None),
            listed_vm(3, 1, Some("/srv/other-runner")),
            listed_vm(4, u64::MAX, Some("/srv/other-runner")),
            listed_vm(5, u64::MAX, Some(&ours)),
        ];

        let (dry, dry_destroyed) = gc_over(&state_dir, &vms, true);
        let (real, destroyed) = gc_over(&state_dir, &vms, false);

        assert_eq!(
            dry,
            [
                "skipping hyperjob-job-3: owned by /srv/other-runner",
                "would remove hyperjob-job-1: its deadline has passed",
                "would remove hyperjob-job-2: its deadline has passed",
            ]
        );
        assert!(dry_destroyed.is_empty());
        assert_eq!(
            real,
            [
                "removed hyperjob-job-1: its deadline has passed",
                "removed hyperjob-job-2: its deadline has passed",
            ]
        );
        assert_eq!(destroyed, ["hyperjob-job-1", "hyperjob-job-2"]);
    }
}
