//! `prepare`'s side of the pool: claim a ready VM for the job.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::{fingerprint, PoolDir, PoolEntry, PoolPhase};
use crate::plugin::{Backend, Endpoint, OwnedVm, Transport};
use crate::stages::{unix_now, StageContext};
use crate::state::{JobState, StateStore};

/// How long the login check of a claimed VM may take before the VM is given up.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// A VM whose idle time ends sooner than this is not claimed: gc may be about to remove it.
const CLAIM_MARGIN_SECS: u64 = 60;

/// Claims a ready pooled VM for the job and records it as the job's VM; returns its name and
/// endpoint, or `None` when the pool is off, empty or holds nothing fit (prepare then boots).
/// `record` is the job's state as prepare would write it for a cold boot. A claimed VM that
/// fails its check is destroyed and the next one tried.
pub fn claim(
    ctx: &StageContext<'_>,
    backend: &dyn Backend,
    transport: &dyn Transport,
    record: &JobState,
) -> anyhow::Result<Option<(String, Endpoint)>> {
    let config = ctx.config;
    if config.pool.size == 0 {
        return Ok(None);
    }
    let Some(current) = fingerprint(config, backend)? else {
        return Ok(None);
    };
    let pool = PoolDir::new(&config.state_dir);
    let store = StateStore::new(&config.state_dir);
    let (entries, _) = pool.entries()?;
    let now = unix_now();
    let fit = entries.into_iter().filter(|entry| {
        entry.phase == PoolPhase::Ready
            && entry.fingerprint == current
            && entry.image == config.image
            && entry.deadline_unix > now + CLAIM_MARGIN_SECS
            && entry.endpoint.is_some()
    });
    for entry in fit {
        if !pool.try_claim(&entry.vm_name, ctx.job.job_id)? {
            continue;
        }
        let started = Instant::now();
        match take(ctx, backend, transport, &pool, &store, &entry, record) {
            Ok(endpoint) => {
                println!(
                    "Claimed the pooled VM {} (ready for {} s) in {:.2} s",
                    entry.vm_name,
                    now.saturating_sub(entry.created_unix),
                    started.elapsed().as_secs_f64()
                );
                return Ok(Some((entry.vm_name, endpoint)));
            }
            Err(err) => {
                tracing::warn!(
                    "the pooled VM {} failed its check ({err:#}); trying another",
                    entry.vm_name
                );
                let _ = backend.destroy(&entry.vm_name);
                let _ = pool.remove(&entry.vm_name);
                // The job's state is rewritten by what comes next; its lock stays held.
                let _ = std::fs::remove_dir_all(store.keys_dir(ctx.job.job_id));
                crate::boot::interrupted(ctx.cancel)?;
            }
        }
    }
    Ok(None)
}

/// Makes a claimed VM the job's: recorded, relabelled, replaced in the pool, checked.
fn take(
    ctx: &StageContext<'_>,
    backend: &dyn Backend,
    transport: &dyn Transport,
    pool: &PoolDir,
    store: &StateStore,
    entry: &PoolEntry,
    record: &JobState,
) -> anyhow::Result<Endpoint> {
    // From here on the VM is the job's for cleanup and gc.
    let record = JobState {
        vm_name: entry.vm_name.clone(),
        ..record.clone()
    };
    store.save(&record)?;
    let mut endpoint = entry.endpoint.clone().context("no endpoint recorded")?;
    if endpoint.identity_file.is_some() {
        let keys = store.keys_dir(ctx.job.job_id);
        let _ = std::fs::remove_dir_all(&keys);
        std::fs::rename(pool.keys_dir(&entry.vm_name), &keys)
            .with_context(|| format!("cannot move the VM's key to {}", keys.display()))?;
        endpoint.identity_file = Some(keys.join("id_ed25519"));
    }
    pool.remove(&entry.vm_name)?;
    spawn_refill(&ctx.config.path);
    backend
        .relabel(&OwnedVm {
            vm_name: entry.vm_name.clone(),
            job_id: ctx.job.job_id,
            created_unix: record.created_unix,
            deadline_unix: record.deadline_unix,
            owner: Some(crate::ownership::owner_of(&ctx.config.state_dir)),
        })
        .context("cannot relabel it for the job")?;
    transport
        .wait_ready(&endpoint, Instant::now() + CHECK_TIMEOUT, ctx.cancel)
        .context("it does not accept a login")?;
    crate::boot::interrupted(ctx.cancel)?;
    crate::relay::save_ready(ctx.config, transport, store, record.ready(endpoint.clone()))?;
    Ok(endpoint)
}

/// Starts `hyperjob pool fill --background` for the config at `config_path`, detached, without
/// waiting.
fn spawn_refill(config_path: &Path) {
    if let Err(err) =
        crate::detach::spawn_hyperjob(config_path, &["pool", "fill", "--background"], None)
    {
        tracing::warn!("cannot start refilling the pool: {err}");
    }
}
