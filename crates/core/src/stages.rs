//! The four runner stages: `config`, `prepare`, `run` and `cleanup`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use serde_json::json;

use crate::boot::Boot;
use crate::config::Config;
use crate::exit::StageOutcome;
use crate::job::{build_exit_code_file, JobIdentity};
use crate::plugin::{Backend, Progress, RemoteExit, ScriptRequest, Transport, VmRequest};
use crate::progress::StdoutProgress;
use crate::registry::{PluginContext, Registry};
use crate::state::{JobState, Phase, StateStore};

mod script;

use script::{guest_interpreter_for_sh, signal_number};
pub use script::{interpreter_for, sh_interpreter_from_probe, uses_ansi_c_quoting};

/// Everything a stage needs: the config, the registry and the trusted job identity.
#[derive(Debug)]
pub struct StageContext<'a> {
    pub config: &'a Config,
    pub registry: &'a Registry,
    pub job: &'a JobIdentity,
    /// Set by the binary's SIGTERM/SIGINT handler.
    pub cancel: &'a AtomicBool,
    /// Set by `run`: how long its script ran in the guest, where that is known (through the
    /// job's relay); the stage's wall time less this is the stage overhead in the metrics.
    pub script_seconds: std::cell::Cell<Option<f64>>,
}

impl StageContext<'_> {
    fn backend(&self) -> anyhow::Result<Box<dyn Backend>> {
        build_backend(self.config, self.registry)
    }

    fn transport(&self) -> anyhow::Result<Box<dyn Transport>> {
        build_transport(self.config, self.registry)
    }

    fn store(&self) -> StateStore {
        StateStore::new(&self.config.state_dir)
    }
}

fn plugin_context(config: &Config) -> PluginContext {
    PluginContext {
        state_dir: config.state_dir.clone(),
        guest_keys: config.guest_keys,
        pool: config.pool.size > 0,
    }
}

/// Builds the configured backend; its config errors name the file and table.
pub fn build_backend(config: &Config, registry: &Registry) -> anyhow::Result<Box<dyn Backend>> {
    let entry = registry.backend(&config.backend)?;
    (entry.build)(&plugin_context(config), &config.backend_table)
        .map_err(|err| plugin_failure(config, "backends", &config.backend, err))
}

/// Builds the configured transport; its config errors name the file and table.
pub fn build_transport(config: &Config, registry: &Registry) -> anyhow::Result<Box<dyn Transport>> {
    let entry = registry.transport(&config.transport)?;
    (entry.build)(&plugin_context(config), &config.transport_table)
        .map_err(|err| plugin_failure(config, "transports", &config.transport, err))
}

fn plugin_failure(
    config: &Config,
    section: &str,
    name: &str,
    err: crate::PluginError,
) -> anyhow::Error {
    match err {
        crate::PluginError::Config(_) => config.plugin_error(section, name, err).into(),
        other => anyhow::Error::new(other).context(format!("cannot start {section}.{name}")),
    }
}

/// `config_exec`: the JSON document GitLab Runner reads from stdout.
pub fn config(ctx: &StageContext<'_>) -> anyhow::Result<serde_json::Value> {
    // Build the selected plugins from their tables now, so a broken selection or table fails
    // before a VM is asked for. Building only parses and checks: it creates nothing and
    // touches no VM (the libvirt backend does not even connect).
    let backend = ctx.backend()?;
    let transport = ctx.transport()?;
    // ...and refuse a pair whose transport cannot reach what the backend hands out.
    crate::endpoints::check_pair(ctx.config, backend.as_ref(), transport.as_ref())?;
    drop(backend);
    drop(transport);
    Ok(json!({
        "driver": { "name": "hyperjob", "version": crate::VERSION },
        "builds_dir": ctx.config.builds_dir,
        "cache_dir": ctx.config.cache_dir,
        "builds_dir_is_shared": false,
        "hostname": ctx.config.vm_name(ctx.job.job_id),
    }))
}

/// `prepare_exec`: creates the VM and returns once the transport can run commands in it.
pub fn prepare(ctx: &StageContext<'_>) -> anyhow::Result<StageOutcome> {
    let backend = ctx.backend()?;
    let transport = ctx.transport()?;
    let progress = StdoutProgress;
    let vm_name = ctx.config.vm_name(ctx.job.job_id);
    let store = ctx.store();
    let me = crate::ownership::owner_of(&ctx.config.state_dir);

    // The job's lock comes first: gc decides about a job only while it holds that lock
    // exclusively, so gc and this prepare never interleave.
    let active = store.lock_activity(ctx.job.job_id)?;
    // A retried prepare (the runner tries up to three times) may find what an earlier, failed
    // or killed attempt of the same job left behind: start from nothing — but never destroy a
    // VM of that name that another installation owns.
    // An earlier attempt may have recorded another VM (one it claimed from the pool), and a
    // relay.
    let earlier = match store.load(ctx.job.job_id) {
        Ok(Some(state)) => {
            crate::relay::stop(&store, ctx.job.job_id, state.relay.as_ref());
            crate::hold::end_at_prepare(&progress, &state);
            Some(state.vm_name).filter(|name| *name != vm_name)
        }
        _ => None,
    };
    let leftovers = std::iter::once(&vm_name)
        .chain(earlier.as_ref())
        .try_for_each(
            |name| match crate::ownership::refusal(backend.as_ref(), name, &me)? {
                Some(why) => bail!("refusing to destroy it: {why}"),
                None => Ok(backend.destroy(name)?),
            },
        )
        .with_context(|| format!("cannot remove leftovers of an earlier attempt for {vm_name}"));
    if let Err(err) = leftovers {
        // Nothing was written yet: a backend that cannot even be reached leaves no trace.
        if matches!(store.load(ctx.job.job_id), Ok(None)) {
            active.release_and_remove();
        }
        return Err(err);
    }
    let started = Instant::now();
    let created_unix = unix_now();
    let request = VmRequest {
        vm_name: vm_name.clone(),
        job_id: ctx.job.job_id,
        created_unix,
        deadline_unix: ctx
            .job
            .deadline_unix(created_unix, ctx.config.deadline_margin_secs),
        owner: me,
        keys: None,
    };
    // The record comes first, so whatever happens next can be found and removed again.
    let record = JobState {
        runner: crate::runner::current_runner(),
        image: ctx.config.image.clone(),
        ..JobState::creating(
            ctx.job.job_id,
            vm_name.clone(),
            (&ctx.config.backend, &ctx.config.transport),
            (request.created_unix, request.deadline_unix),
        )
    };
    if let Some((pooled, endpoint)) =
        crate::pool::claim(ctx, backend.as_ref(), transport.as_ref(), &record)?
    {
        progress.say(&format!(
            "Guest ready at {endpoint} in the pooled VM {pooled} after {:.2} s",
            started.elapsed().as_secs_f64()
        ));
        crate::guest_runner::provide_for_claimed(ctx, transport.as_ref(), &endpoint, &store)?;
        prepared_metric(ctx, "warm", started);
        return Ok(StageOutcome::Success);
    }
    store.save(&record)?;
    progress.say(&format!(
        "Creating VM {vm_name} with the {} backend...",
        ctx.config.backend
    ));
    let booted = Boot {
        config: ctx.config,
        backend: backend.as_ref(),
        transport: transport.as_ref(),
        progress: &progress,
        cancel: ctx.cancel,
    };
    let result = booted
        .boot(&request, &store.keys_dir(ctx.job.job_id), started)
        .and_then(|endpoint| {
            let guest_path = crate::guest_runner::provide_for_job(
                ctx,
                transport.as_ref(),
                &endpoint,
                record.runner.as_ref(),
            )?;
            let ready = JobState {
                guest_path,
                ..record.ready(endpoint.clone())
            };
            crate::relay::save_ready(ctx.config, transport.as_ref(), &store, ready)?;
            Ok(endpoint)
        });
    match result {
        Ok(endpoint) => {
            progress.say(&format!(
                "Guest ready at {endpoint} after {:.1} s",
                started.elapsed().as_secs_f64()
            ));
            prepared_metric(ctx, "cold", started);
            Ok(StageOutcome::Success)
        }
        Err(err) => {
            crate::boot::report_console_tail(backend.as_ref(), &vm_name);
            match backend.destroy(&vm_name) {
                Ok(()) => {
                    let _ = store.remove(ctx.job.job_id);
                }
                // Keep the record: cleanup or gc will try again.
                Err(destroy_err) => tracing::warn!(
                    "removing the VM after a failed prepare failed too: {destroy_err:#}"
                ),
            }
            Err(err)
        }
    }
}

/// `run_exec`: runs one stage script inside the VM, whatever the stage is called.
pub fn run(
    ctx: &StageContext<'_>,
    script_path: &Path,
    stage_name: &str,
) -> anyhow::Result<StageOutcome> {
    // The runner never clears this file between stages; a stale code must not be reported
    // for a later failure.
    if let Some(path) = build_exit_code_file() {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| {
                    format!(
                        "cannot remove stale BUILD_EXIT_CODE_FILE {}",
                        path.display()
                    )
                })
            }
        }
    }
    let script = std::fs::read(script_path)
        .with_context(|| format!("cannot read script {}", script_path.display()))?;
    let interpreter = interpreter_for(&script)?;
    let store = ctx.store();
    let Some((state, endpoint)) = store.load(ctx.job.job_id)?.and_then(|state| {
        let endpoint = state
            .endpoint
            .clone()
            .filter(|_| state.phase == Phase::Ready)?;
        Some((state, endpoint))
    }) else {
        bail!(
            "no VM is prepared for job {} (prepare did not run or did not succeed)",
            ctx.job.job_id
        );
    };
    let script = crate::guest_runner::with_guest_path(state.guest_path.as_deref(), script);
    // Only now: a run for a job that was never prepared must not leave a lock file behind.
    let _active = store.lock_activity(ctx.job.job_id)?;
    let transport = ctx.transport()?;
    let vm_name = &state.vm_name;
    let mut runner = crate::relay::StageRunner::new(
        &store,
        &state,
        &ctx.config.transport_fingerprint(),
        transport.as_ref(),
        &endpoint,
    );
    let interpreter = if interpreter == "sh" && uses_ansi_c_quoting(&script) {
        guest_interpreter_for_sh(&mut runner, ctx.cancel)
            .with_context(|| format!("stage {stage_name} cannot run in VM {vm_name}"))?
    } else {
        interpreter
    };
    tracing::debug!(stage = stage_name, vm = %vm_name, interpreter, "running stage script");
    let request = ScriptRequest {
        interpreter,
        script: &script,
        cancel: ctx.cancel,
    };
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let exit = runner
        .run_script(&request, &mut stdout, &mut stderr)
        .with_context(|| format!("stage {stage_name} could not run in VM {vm_name}"))?;
    ctx.script_seconds.set(runner.script_seconds());
    let outcome = match exit {
        RemoteExit::Code(0) => StageOutcome::Success,
        RemoteExit::Code(exit_code) => StageOutcome::ScriptFailed { exit_code },
        RemoteExit::Signal(signal) => StageOutcome::ScriptFailed {
            exit_code: 128 + signal_number(&signal),
        },
    };
    // A script the runner stopped did not fail: no hold for it.
    if outcome != StageOutcome::Success && !ctx.cancel.load(Ordering::Relaxed) {
        let requested = std::env::var(crate::hold::HOLD_ENV).ok();
        crate::hold::Failure {
            config: ctx.config,
            store: &store,
            state: &state,
            endpoint: &endpoint,
            transport: transport.as_ref(),
            project_id: ctx.job.project_id,
            stage: stage_name,
            requested: requested.as_deref(),
        }
        .hold(&mut stdout);
    }
    Ok(outcome)
}

/// `cleanup_exec`: destroys the VM and the job's state. Idempotent, and it takes no lock: the
/// runner may start it while a killed run of the same job is still dying. A VM of that name
/// another installation owns is left alone (this job's state still goes). A backend that can
/// halt its VMs gets the slow part of the destroy done in the background ([`crate::teardown`]).
/// A failed job granted a debug hold keeps its VM running instead ([`crate::hold`]).
pub fn cleanup(ctx: &StageContext<'_>) -> anyhow::Result<StageOutcome> {
    let started = Instant::now();
    let backend = ctx.backend()?;
    let store = ctx.store();
    let state = store.load(ctx.job.job_id).ok().flatten();
    let (had_state, failure) = (
        state.is_some(),
        state.as_ref().and_then(|s| s.failure.clone()),
    );
    let vm_name = match &state {
        Some(state) => {
            crate::relay::stop(&store, ctx.job.job_id, state.relay.as_ref());
            state.vm_name.clone()
        }
        None => ctx.config.vm_name(ctx.job.job_id),
    };
    let me = crate::ownership::owner_of(&ctx.config.state_dir);
    let refusal = crate::ownership::refusal(backend.as_ref(), &vm_name, &me)
        .with_context(|| format!("cannot destroy VM {vm_name}"))?;
    // A failed job's VM kept for debugging ([`crate::hold`]): its relay is ended, it stays.
    if let (None, Some(state)) = (&refusal, &state) {
        if crate::hold::keep_at_cleanup(ctx.config, &store, state)? {
            cleanup_metric(ctx, failure.as_deref(), had_state, started);
            return Ok(StageOutcome::Success);
        }
    }
    let handed_off = match refusal {
        // Not this job's VM: nothing of the job is left to destroy.
        Some(why) => {
            tracing::warn!("left {vm_name} alone: {why}");
            false
        }
        None => {
            // With a record to anchor it, the VM is halted now and removed in the background
            // (crate::teardown); else, or if that cannot be done, right here.
            let handed_off = match state {
                Some(state) => {
                    crate::teardown::hand_off(&ctx.config.path, backend.as_ref(), &store, state)?
                }
                None => false,
            };
            if !handed_off {
                backend
                    .destroy(&vm_name)
                    .with_context(|| format!("cannot destroy VM {vm_name}"))?;
            }
            handed_off
        }
    };
    if !handed_off {
        store.remove(ctx.job.job_id)?;
    }
    cleanup_metric(ctx, failure.as_deref(), had_state, started);
    Ok(StageOutcome::Success)
}

/// Counts a finished job and its cleanup's time.
fn cleanup_metric(
    ctx: &StageContext<'_>,
    failure: Option<&str>,
    had_state: bool,
    started: Instant,
) {
    if let Some(metrics_file) = &ctx.config.metrics_file {
        crate::metrics::record(
            metrics_file,
            &crate::metrics::Update {
                job: Some(crate::metrics::job_outcome(failure, had_state)),
                cleanup_seconds: Some(started.elapsed().as_secs_f64()),
                ..Default::default()
            },
        );
    }
}

/// Counts a successful prepare, `cold` (booted) or `warm` (claimed from the pool).
fn prepared_metric(ctx: &StageContext<'_>, kind: &'static str, started: Instant) {
    if let Some(metrics_file) = &ctx.config.metrics_file {
        crate::metrics::record(
            metrics_file,
            &crate::metrics::Update {
                prepare: Some((kind, started.elapsed().as_secs_f64())),
                ..Default::default()
            },
        );
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
