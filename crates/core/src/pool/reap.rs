//! Removing pooled VMs that must not serve a job: idle too long, built from something else,
//! half-booted by a filler that died, half-claimed by a prepare that died, or without a record.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use super::{PoolDir, PoolPhase, POOL_JOB_ID};
use crate::config::Config;
use crate::ownership::{owner_of, ownership, refusal, Ownership};
use crate::plugin::PluginError;
use crate::stages::unix_now;
use crate::state::StateStore;

/// `gc`'s part: reaps the pool unless a fill holds it (then its VMs wait for the next gc).
/// Returns how many VMs could not be removed.
pub fn reap(
    config: &Config,
    backends: &super::ImageBackends,
    registry: &crate::registry::Registry,
    dry_run: bool,
    out: &mut dyn Write,
) -> anyhow::Result<usize> {
    let pool = PoolDir::new(&config.state_dir);
    // A fill writes down every pooled VM before it creates it: no directory, no pooled VM.
    if !pool.exists() {
        return Ok(0);
    }
    let Some(lock) = pool.try_lock()? else {
        writeln!(
            out,
            "the pool is being filled; its VMs are judged by the next gc"
        )?;
        return Ok(0);
    };
    let current = super::fingerprints(config, registry)?;
    let failures = reap_locked(config, backends, &pool, &current, dry_run, out)?;
    if !dry_run {
        pool.remove_if_empty(&lock)?;
    }
    Ok(failures)
}

/// [`reap`] with the pool's lock held and `current` the fingerprint of what each image's VMs
/// are built from now.
pub(super) fn reap_locked(
    config: &Config,
    backends: &super::ImageBackends,
    pool: &PoolDir,
    current: &super::Fingerprints,
    dry_run: bool,
    out: &mut dyn Write,
) -> anyhow::Result<usize> {
    let now = unix_now();
    let store = StateStore::new(&config.state_dir);
    let me = owner_of(&config.state_dir);
    let (entries, unreadable) = pool.entries()?;
    let default = backends
        .get(&config.images.default)
        .or_else(|| backends.values().next())
        .map(|backend| backend.as_ref())
        .ok_or_else(|| anyhow::anyhow!("no backend"))?;
    // Whose storage a pooled VM's files are in: its image's.
    let mut image_of: BTreeMap<String, Option<String>> = entries
        .iter()
        .map(|e| (e.vm_name.clone(), e.image.clone()))
        .collect();
    let mut doomed: Vec<(String, String)> = Vec::new();
    for entry in &entries {
        let vm = &entry.vm_name;
        if let Some(job) = pool.claimed_by(vm) {
            let Some(lock) = store.try_lock_exclusive(job)? else {
                continue; // a prepare is claiming it right now
            };
            if matches!(store.load(job), Ok(None)) {
                lock.remove_file()?;
            }
            if job_vms(&store)?.contains(vm) {
                // The claim went through; only the pool's files of it were left.
                if !dry_run {
                    pool.remove(vm)?;
                }
                continue;
            }
            doomed.push((
                vm.clone(),
                format!("its claim by job {job} was interrupted"),
            ));
            continue;
        }
        let reason = if entry.phase == PoolPhase::Booting {
            // Only a fill boots, and it holds the lock we hold: this boot's filler died.
            "its boot was interrupted".to_string()
        } else if now > entry.deadline_unix {
            format!(
                "idle in the pool for more than {} s",
                entry.deadline_unix.saturating_sub(entry.created_unix)
            )
        } else if !entry.fresh(current) {
            "it was built from another base image or config".to_string()
        } else {
            continue;
        };
        doomed.push((vm.clone(), reason));
    }
    for vm in &unreadable {
        doomed.push((vm.clone(), "its pool record is unreadable".to_string()));
    }
    // VMs of the pool's names without a record: a filler died between creating the VM and
    // writing down... nothing (it writes first), or the record was removed by hand.
    let recorded: BTreeSet<&String> = entries
        .iter()
        .map(|e| &e.vm_name)
        .chain(&unreadable)
        .collect();
    let prefix = config.pool_prefix();
    let mut unrecorded = BTreeSet::new();
    match default.list_owned() {
        Ok(vms) => unrecorded.extend(
            vms.into_iter()
                .filter(|vm| vm.job_id == POOL_JOB_ID && vm.vm_name.starts_with(&prefix))
                .filter(|vm| ownership(vm.owner.as_deref(), &me) != Ownership::Other)
                .map(|vm| vm.vm_name),
        ),
        Err(PluginError::Unsupported(_)) => {}
        Err(err) => return Err(anyhow::Error::new(err).context("cannot list the backend's VMs")),
    }
    for (image, backend) in backends {
        match backend.names_with_files() {
            Ok(names) => {
                for name in names.into_iter().filter(|n| n.starts_with(&prefix)) {
                    image_of
                        .entry(name.clone())
                        .or_insert_with(|| image.clone());
                    unrecorded.insert(name);
                }
            }
            Err(PluginError::Unsupported(_)) => {}
            Err(err) => {
                return Err(anyhow::Error::new(err).context("cannot list the backend's VM files"))
            }
        }
    }
    unrecorded.retain(|name| !recorded.contains(name));
    if !unrecorded.is_empty() {
        // Listed after the records: a VM claimed meanwhile is named by its job's state now.
        let taken = job_vms(&store)?;
        for vm in unrecorded.into_iter().filter(|vm| !taken.contains(vm)) {
            doomed.push((vm, "a pooled VM without a pool record".to_string()));
        }
    }
    let mut failures = 0;
    for (vm, reason) in doomed {
        if dry_run {
            writeln!(out, "would remove {vm}: {reason}")?;
            continue;
        }
        let backend = image_of
            .get(&vm)
            .and_then(|image| backends.get(image))
            .map_or(default, |backend| backend.as_ref());
        let removed = refusal(backend, &vm, &me)
            .map_err(anyhow::Error::new)
            .and_then(|refused| match refused {
                Some(why) => Err(anyhow::anyhow!("left alone: {why}")),
                None => Ok(backend.destroy(&vm)?),
            })
            .and_then(|()| pool.remove(&vm));
        match removed {
            Ok(()) => writeln!(out, "removed {vm}: {reason}")?,
            Err(err) => {
                failures += 1;
                writeln!(out, "could not remove {vm}: {err:#}")?;
            }
        }
    }
    Ok(failures)
}

/// The VM names the jobs' state records name.
fn job_vms(store: &StateStore) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for job_id in store.job_ids_with_files()? {
        if let Ok(Some(state)) = store.load(job_id) {
            names.insert(state.vm_name);
        }
    }
    Ok(names)
}
