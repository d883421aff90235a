//! cleanup's teardown in two steps, so that the runner is not kept waiting while the hypervisor
//! releases a VM.
//!
//! Destroying a libvirt domain takes 1.4-2.7 s on the test machines, nearly all of it inside
//! libvirt after the guest has stopped: libvirt polls every 200 ms until QEMU has been reaped
//! (seconds when PID 1 reaps orphans late) and then removes the nwfilter rules one
//! `ebtables`/`iptables` call at a time. So cleanup:
//!
//! 1. halts the VM ([`Backend::halt`]: the libvirt backend pauses it, ~10 ms): from here on
//!    nothing of the job runs;
//! 2. records phase `destroying` in the job's state (crash-safe: the record names the VM);
//! 3. starts `hyperjob finish-cleanup JOB_ID` detached ([`crate::detached`]) and returns.
//!
//! The finisher ([`finish`]) takes the job's lock exclusively, destroys the VM and removes the
//! state. If it dies, `gc` finds the `destroying` record with a free lock and finishes the job
//! at once. A retried prepare of the same job waits for the finisher's lock; a finisher that gets
//! the lock after such a prepare finds a record that is no longer `destroying` and leaves it
//! alone. A backend without `halt`, a failed halt or a finisher that cannot be started: cleanup
//! destroys in the foreground, as before.

use std::path::Path;

use anyhow::Context as _;

use crate::config::Config;
use crate::exit::StageOutcome;
use crate::plugin::{Backend, PluginError};
use crate::registry::Registry;
use crate::stages::build_backend;
use crate::state::{JobState, Phase, StateStore};

/// The hidden subcommand the finisher runs as.
pub const FINISH_COMMAND: &str = "finish-cleanup";

/// Halts the job's VM and hands its removal to a background finisher. `Ok(false)`: nothing
/// was handed over, the caller destroys the VM itself.
pub fn hand_off(
    config_path: &Path,
    backend: &dyn Backend,
    store: &StateStore,
    state: JobState,
) -> anyhow::Result<bool> {
    match backend.halt(&state.vm_name) {
        Ok(()) => {}
        Err(PluginError::Unsupported(_)) => return Ok(false),
        Err(err) => {
            tracing::warn!(
                "cannot halt VM {}: {err}; destroying it in the foreground",
                state.vm_name
            );
            return Ok(false);
        }
    }
    let job_id = state.job_id;
    store.save(&state.destroying())?;
    match crate::detach::spawn_hyperjob(config_path, &[FINISH_COMMAND, &job_id.to_string()], None) {
        Ok(_) => Ok(true),
        Err(err) => {
            tracing::warn!(
                "cannot start the background teardown ({err}); destroying in the foreground"
            );
            Ok(false)
        }
    }
}

/// `hyperjob finish-cleanup JOB_ID`: destroys the VM cleanup halted and removes the job's state,
/// under the job's exclusive lock. Does nothing when the job's record is no longer `destroying`
/// (a new prepare of the job took it over, or gc finished it).
pub fn finish(config: &Config, registry: &Registry, job_id: u64) -> anyhow::Result<StageOutcome> {
    let store = StateStore::new(&config.state_dir);
    let lock = store.lock_exclusive(job_id)?;
    let state = match store.load(job_id)? {
        Some(state) if state.phase == Phase::Destroying => state,
        // Nothing of ours to finish.
        _ => return Ok(StageOutcome::Success),
    };
    destroy_recorded(config, registry, &store, &state)?;
    drop(lock);
    Ok(StageOutcome::Success)
}

/// Destroys the VM `state` records (unless another installation owns one of its name) and
/// removes the job's state. The caller holds the job's lock exclusively: the lock file goes
/// too, while it is still held.
pub fn destroy_recorded(
    config: &Config,
    registry: &Registry,
    store: &StateStore,
    state: &JobState,
) -> anyhow::Result<()> {
    // The job's image decides where its VM's files are (its own images_dir, say).
    let config = config
        .for_image(state.image.as_deref())
        .unwrap_or_else(|_| config.clone());
    let backend = build_backend(&config, registry)?;
    let me = crate::ownership::owner_of(&config.state_dir);
    let vm_name = &state.vm_name;
    match crate::ownership::refusal(backend.as_ref(), vm_name, &me)
        .with_context(|| format!("cannot destroy VM {vm_name}"))?
    {
        Some(why) => tracing::warn!("left {vm_name} alone: {why}"),
        None => backend
            .destroy(vm_name)
            .with_context(|| format!("cannot destroy VM {vm_name}"))?,
    }
    store.remove(state.job_id)?;
    Ok(())
}
