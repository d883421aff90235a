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

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

use anyhow::bail;

use crate::config::Config;
use crate::exit::StageOutcome;
use crate::ownership::refusal_of;
pub use crate::ownership::{owner_of, ownership, Ownership};
use crate::plugin::{Backend, PluginError, VmPresence};
use crate::registry::Registry;
use crate::runner::ProcessIdentity;
use crate::stages::{build_backend, unix_now};
use crate::state::{Phase, StateStore};

/// Why a job's resources are garbage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep: the job may still be running.
    Keep,
    DeadlinePassed,
    /// Its prepare was killed: the record still says `creating` and nobody holds the lock.
    PrepareKilled,
    /// The runner that started the job is gone (crash, restart, reboot): no cleanup will come.
    RunnerGone,
    /// Its VM no longer exists and nothing works on the job.
    Gone,
    /// cleanup halted its VM and handed the removal to a background process that is gone.
    CleanupUnfinished,
    /// Its VM was held for debugging ([`crate::hold`]) and the hold has expired.
    HoldExpired,
}

impl Verdict {
    fn reason(&self, runner: Option<&ProcessIdentity>) -> String {
        match self {
            Verdict::Keep => "kept".to_string(),
            Verdict::DeadlinePassed => "its deadline has passed".to_string(),
            Verdict::PrepareKilled => "its prepare was killed before the VM was ready".to_string(),
            Verdict::RunnerGone => match runner {
                Some(runner) => format!("its runner ({}, pid {}) is gone", runner.comm, runner.pid),
                None => "its runner is gone".to_string(),
            },
            Verdict::Gone => "its VM is gone and no stage is running".to_string(),
            Verdict::CleanupUnfinished => {
                "its cleanup began and its background teardown is gone".to_string()
            }
            Verdict::HoldExpired => "its debug hold has expired".to_string(),
        }
    }
}

/// What gc saw of a job's VM, at the moment it decided, under the job's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmSeen {
    /// Nothing of its name exists.
    Absent,
    /// It exists and is this installation's.
    Exists,
    /// Something of its name exists that is not, or not provably, this installation's.
    NotOurs,
}

/// Everything gc observed about one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub now: u64,
    /// From the job's state, else from its VM's record; `None`: neither could be read.
    pub deadline: Option<u64>,
    /// A prepare or run holds the job's lock.
    pub active: bool,
    /// `None`: no readable state file.
    pub phase: Option<Phase>,
    /// Whether the recorded runner still runs; `None`: none recorded, or it cannot be told.
    pub runner_alive: Option<bool>,
    pub vm: VmSeen,
    /// When the job's debug hold expires (under the config of now), if its phase is `held`
    /// (granted at a failure, the hold begins once cleanup kept the VM: until then the job is
    /// judged as any other, its runner's death included).
    pub held_until: Option<u64>,
}

/// The rule, as a pure function of what gc observed.
pub fn judge(seen: &Observed) -> Verdict {
    // A held job's hold is its deadline, and its runner has finished the job: neither the
    // runner rule nor the job's deadline applies.
    if let (Some(until), false) = (seen.held_until, seen.active) {
        return if seen.now > until {
            Verdict::HoldExpired
        } else if seen.vm == VmSeen::Absent {
            Verdict::Gone
        } else {
            Verdict::Keep
        };
    }
    if seen.deadline.is_some_and(|deadline| seen.now > deadline) {
        return Verdict::DeadlinePassed;
    }
    if seen.active {
        return Verdict::Keep;
    }
    if seen.phase == Some(Phase::Creating) {
        return Verdict::PrepareKilled;
    }
    if seen.phase == Some(Phase::Destroying) {
        return Verdict::CleanupUnfinished;
    }
    if seen.phase.is_some() && seen.runner_alive == Some(false) {
        return Verdict::RunnerGone;
    }
    if seen.vm == VmSeen::Absent {
        Verdict::Gone
    } else {
        Verdict::Keep
    }
}

/// One gc run: what it works with and what it reports.
struct Collector<'a> {
    config: &'a Config,
    /// The backend built for each image's config (one, keyed `None`, without `[images]`).
    image_backends: &'a BTreeMap<Option<String>, Box<dyn Backend>>,
    /// The image whose storage holds a VM name's files.
    file_images: BTreeMap<String, Option<String>>,
    /// The default image's backend: for what no state or file ties to an image.
    backend: &'a dyn Backend,
    store: StateStore,
    me: String,
    now: u64,
    dry_run: bool,
    out: &'a mut dyn Write,
    failures: usize,
}

/// Runs garbage collection, reporting one line per VM it acts on to `out`.
///
/// Every job is decided on its own, while gc holds the job's lock exclusively (prepare and run
/// hold it shared, so neither runs meanwhile), from what the backend reports about its VM at
/// that moment. A job whose lock is busy is only removed once its deadline has passed.
pub fn gc(
    config: &Config,
    registry: &Registry,
    dry_run: bool,
    out: &mut dyn Write,
) -> anyhow::Result<StageOutcome> {
    let mut counted = crate::metrics::RemovalCounter::new(out);
    let result = collect(config, registry, dry_run, &mut counted);
    if let (Some(metrics_file), false) = (&config.metrics_file, dry_run) {
        let vms_alive = build_backend(config, registry)
            .ok()
            .and_then(|backend| backend.list_owned().ok())
            .map(|vms| {
                let me = owner_of(&config.state_dir);
                vms.iter()
                    .filter(|vm| ownership(vm.owner.as_deref(), &me) != Ownership::Other)
                    .count() as u64
            });
        crate::metrics::record(
            metrics_file,
            &crate::metrics::Update {
                gc_removals: counted.removals(),
                vms_alive,
                ..Default::default()
            },
        );
    }
    result
}

fn collect(
    config: &Config,
    registry: &Registry,
    dry_run: bool,
    out: &mut dyn Write,
) -> anyhow::Result<StageOutcome> {
    let backend = build_backend(config, registry)?;
    let store = StateStore::new(&config.state_dir);
    let me = owner_of(&config.state_dir);
    let now = unix_now();
    // Candidates: every job with a file in state_dir, every VM the backend lists as this
    // installation's, and every name with files in the backend's storage.
    let mut jobs: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut jobless = Vec::new();
    match backend.list_owned() {
        Ok(vms) => {
            for vm in vms {
                match (ownership(vm.owner.as_deref(), &me), &vm.owner) {
                    // Another installation's VMs are left alone, even past their deadline:
                    // their own gc removes them. A dry run names those it would have removed.
                    (Ownership::Other, Some(owner)) => {
                        if dry_run && now > vm.deadline_unix {
                            let _ = writeln!(out, "skipping {}: owned by {owner}", vm.vm_name);
                        }
                    }
                    // A VM of no job and no pool (`hyperjob doctor --boot`'s): its deadline.
                    _ if vm.job_id == crate::pool::POOL_JOB_ID
                        && !vm.vm_name.starts_with(&config.pool_prefix()) =>
                    {
                        if now > vm.deadline_unix {
                            jobless.push(vm.vm_name);
                        }
                    }
                    _ => {
                        jobs.entry(vm.job_id).or_default().insert(vm.vm_name);
                    }
                }
            }
        }
        Err(PluginError::Unsupported(_)) => {}
        Err(err) => return Err(anyhow::Error::new(err).context("cannot list the backend's VMs")),
    }
    for job_id in store.job_ids_with_files()? {
        jobs.entry(job_id).or_default();
    }
    // Each image may keep its files elsewhere (its own images_dir): each image's backend
    // lists and removes its own.
    let image_backends = crate::pool::image_backends(config, registry)?;
    let mut file_images = BTreeMap::new();
    for (image, image_backend) in &image_backends {
        match image_backend.names_with_files() {
            Ok(names) => {
                for name in names {
                    if let Some(job_id) = config.job_id_of(&name) {
                        file_images.insert(name.clone(), image.clone());
                        jobs.entry(job_id).or_default().insert(name);
                    }
                }
            }
            Err(PluginError::Unsupported(_)) => {}
            Err(err) => {
                return Err(anyhow::Error::new(err).context("cannot list the backend's VM files"))
            }
        }
    }
    let mut collector = Collector {
        config,
        image_backends: &image_backends,
        file_images,
        backend: backend.as_ref(),
        store,
        me,
        now,
        dry_run,
        out,
        failures: 0,
    };
    // The pool's VMs are judged by the pool's rules.
    jobs.remove(&crate::pool::POOL_JOB_ID);
    for (job_id, names) in jobs {
        if let Err(err) = collector.job(job_id, names) {
            collector.failures += 1;
            let _ = writeln!(collector.out, "could not remove job {job_id}: {err:#}");
        }
    }
    for vm_name in jobless {
        collector.jobless(&vm_name);
    }
    collector.failures += crate::pool::reap(config, &image_backends, dry_run, collector.out)?;
    collector.stale_temporary_files();
    if collector.failures > 0 {
        bail!("{} job(s) could not be removed", collector.failures);
    }
    Ok(StageOutcome::Success)
}

impl<'a> Collector<'a> {
    /// The backend of `vm_name`: its job's image, else the image whose storage holds its
    /// files, else the default.
    fn backend_of(&self, image: Option<&Option<String>>, vm_name: &str) -> &'a dyn Backend {
        image
            .or_else(|| self.file_images.get(vm_name))
            .and_then(|image| self.image_backends.get(image))
            .map_or(self.backend, |backend| backend.as_ref())
    }

    /// Decides about one job and acts on the decision.
    fn job(&mut self, job_id: u64, mut names: BTreeSet<String>) -> anyhow::Result<()> {
        let lock = self.store.try_lock_exclusive(job_id)?;
        // Read under the lock: what a prepare that just finished wrote counts.
        let state = self.store.load(job_id);
        let state = match state {
            Ok(state) => state,
            // An unreadable record of ours: judged by the job's name alone.
            Err(err) => {
                let _ = writeln!(self.out, "job {job_id}: {err:#}");
                None
            }
        };
        match &state {
            Some(state) => {
                names.insert(state.vm_name.clone());
            }
            None if names.is_empty() => {
                names.insert(self.config.vm_name(job_id));
            }
            None => {}
        }
        let mut seen = Observed {
            now: self.now,
            deadline: state.as_ref().map(|state| state.deadline_unix),
            active: lock.is_none(),
            phase: state.as_ref().map(|state| state.phase),
            runner_alive: state
                .as_ref()
                .and_then(|state| state.runner.as_ref())
                .and_then(|runner| crate::runner::is_alive(Path::new("/proc"), runner)),
            vm: VmSeen::Absent,
            held_until: state
                .as_ref()
                .filter(|state| state.phase == Phase::Held)
                .and_then(|state| state.hold.as_ref())
                .map(|hold| hold.expires_unix(self.config.debug_hold.as_ref())),
        };
        // Each name is looked up now, not taken from the listing made before.
        let mut refusals = BTreeMap::new();
        for name in &names {
            let backend = self.backend_of(state.as_ref().map(|s| &s.image), name);
            let presence = match backend.inspect(name) {
                Ok(presence) => presence,
                // Whether it exists cannot be told: never "gone".
                Err(PluginError::Unsupported(_)) => {
                    seen.vm = VmSeen::NotOurs;
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            if let Some(why) = refusal_of(&presence, name, &self.me) {
                seen.vm = VmSeen::NotOurs;
                refusals.insert(name.clone(), why);
            } else if let VmPresence::Owned(vm) = presence {
                seen.vm = seen.vm.max_with(VmSeen::Exists);
                if state.is_none() {
                    let deadline = seen
                        .deadline
                        .map_or(vm.deadline_unix, |d| d.min(vm.deadline_unix));
                    seen.deadline = Some(deadline);
                }
            }
        }
        let verdict = judge(&seen);
        for (name, why) in &refusals {
            let _ = writeln!(self.out, "left {name} alone: {why}");
        }
        if verdict == Verdict::Keep {
            if state.is_none() {
                if let Some(lock) = &lock {
                    lock.remove_file()?;
                }
            }
            return Ok(());
        }
        let reason = verdict.reason(state.as_ref().and_then(|state| state.runner.as_ref()));
        if !self.dry_run {
            let relay = state.as_ref().and_then(|state| state.relay.as_ref());
            crate::relay::stop(&self.store, job_id, relay);
        }
        let mut removed_all = true;
        for name in names.iter().filter(|name| !refusals.contains_key(*name)) {
            if self.dry_run {
                let _ = writeln!(self.out, "would remove {name}: {reason}");
                continue;
            }
            let backend = self.backend_of(state.as_ref().map(|s| &s.image), name);
            match backend.destroy(name) {
                Ok(()) => {
                    let _ = writeln!(self.out, "removed {name}: {reason}");
                }
                Err(err) => {
                    removed_all = false;
                    self.failures += 1;
                    let _ = writeln!(self.out, "could not remove {name}: {err:#}");
                }
            }
        }
        if self.dry_run {
            if state.is_none() {
                if let Some(lock) = &lock {
                    lock.remove_file()?;
                }
            }
        } else if removed_all {
            self.store.remove(job_id)?;
        }
        Ok(())
    }

    /// Removes a VM of no job whose deadline has passed, if it is still ours now.
    fn jobless(&mut self, vm_name: &str) {
        let verdict = Verdict::DeadlinePassed.reason(None);
        if self.dry_run {
            let _ = writeln!(self.out, "would remove {vm_name}: {verdict}");
            return;
        }
        let removed = crate::ownership::destroy_unless_refused(self.backend, vm_name, &self.me);
        match removed {
            Ok(()) => {
                let _ = writeln!(self.out, "removed {vm_name}: {verdict}");
            }
            Err(err) => {
                self.failures += 1;
                let _ = writeln!(self.out, "could not remove {vm_name}: {err:#}");
            }
        }
    }

    /// Temporary files of state writes a killed process never finished.
    fn stale_temporary_files(&mut self) {
        match self
            .store
            .stale_temporary_files(self.now, STALE_TEMPORARY_SECS)
        {
            Ok(paths) => {
                for path in paths {
                    if self.dry_run {
                        let _ = writeln!(
                            self.out,
                            "would remove {}: a stale temporary file",
                            path.display()
                        );
                    } else if let Err(err) = std::fs::remove_file(&path) {
                        self.failures += 1;
                        let _ = writeln!(self.out, "could not remove {}: {err}", path.display());
                    } else {
                        let _ = writeln!(
                            self.out,
                            "removed {}: a stale temporary file",
                            path.display()
                        );
                    }
                }
            }
            Err(err) => {
                self.failures += 1;
                let _ = writeln!(self.out, "cannot list temporary files: {err:#}");
            }
        }
    }
}

/// A temporary file older than this was left by a killed process (a write takes milliseconds).
const STALE_TEMPORARY_SECS: u64 = 60;

impl VmSeen {
    fn max_with(self, other: VmSeen) -> VmSeen {
        match (self, other) {
            (VmSeen::NotOurs, _) | (_, VmSeen::NotOurs) => VmSeen::NotOurs,
            (VmSeen::Exists, _) | (_, VmSeen::Exists) => VmSeen::Exists,
            _ => VmSeen::Absent,
        }
    }
}

#[cfg(test)]
#[path = "gc_tests.rs"]
mod tests;
