//! `hyperjob pool fill | drain | status`.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::bail;

use super::{fingerprint, new_vm_name, reap, PoolDir, PoolEntry, PoolPhase, POOL_JOB_ID};
use crate::boot::Boot;
use crate::config::Config;
use crate::exit::StageOutcome;
use crate::plugin::{Backend, Progress, Transport, VmRequest};
use crate::registry::Registry;
use crate::stages::{build_backend, build_transport, unix_now};

/// Where the boots of a fill report, one line at a time.
type Out<'o> = Mutex<&'o mut (dyn Write + Send)>;

/// Progress of one pooled VM's boot, one prefixed line each.
struct Prefixed<'a, 'o> {
    vm_name: &'a str,
    out: &'a Out<'o>,
}

impl Progress for Prefixed<'_, '_> {
    fn say(&self, message: &str) {
        if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(out, "{}: {message}", self.vm_name);
        }
    }
}

/// [`fill`] for every image whose pool is on (each image has its own pool).
pub fn fill_all(
    config: &Config,
    registry: &Registry,
    cancel: &AtomicBool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<StageOutcome> {
    let pooled: Vec<Config> = config
        .image_configs()
        .into_iter()
        .filter(|image| image.pool.size > 0)
        .collect();
    if pooled.is_empty() {
        return fill(config, registry, cancel, out);
    }
    for image in &pooled {
        if let Some(name) = &image.image {
            writeln!(out, "image {name}:")?;
        }
        fill(image, registry, cancel, out)?;
    }
    Ok(StageOutcome::Success)
}

/// Boots pooled VMs until `pool.size` are ready (removing stale and expired ones first), then
/// returns. Waits while another fill works on the pool.
pub fn fill(
    config: &Config,
    registry: &Registry,
    cancel: &AtomicBool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<StageOutcome> {
    if config.pool.size == 0 {
        writeln!(
            out,
            "the pool is off (pool.size = 0 in {})",
            config.path.display()
        )?;
        return Ok(StageOutcome::Success);
    }
    let backend = build_backend(config, registry)?;
    let transport = build_transport(config, registry)?;
    let Some(current) = fingerprint(config, backend.as_ref())? else {
        bail!(
            "the {} backend cannot say what its VMs are built from, so it cannot keep a warm \
             pool (set pool.size = 0)",
            config.backend
        );
    };
    let pool = PoolDir::new(&config.state_dir);
    let _lock = pool.lock()?;
    let backends = super::image_backends(config, registry)?;
    let fingerprints = super::fingerprints(config, &backends)?;
    reap::reap_locked(config, &backends, &pool, &fingerprints, false, out)?;
    let out = Mutex::new(out);
    loop {
        crate::boot::interrupted(cancel)?;
        let (entries, _) = pool.entries()?;
        let ready = entries
            .iter()
            .filter(|e| {
                e.phase == PoolPhase::Ready && e.fingerprint == current && e.image == config.image
            })
            .count();
        let missing = (config.pool.size as usize).saturating_sub(ready);
        if missing == 0 {
            let mut out = out.lock().map_err(|_| anyhow::anyhow!("output poisoned"))?;
            writeln!(
                out,
                "the pool has {ready} ready VM(s) of {}",
                config.pool.size
            )?;
            return Ok(StageOutcome::Success);
        }
        let booted: Vec<bool> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..missing)
                .map(|_| {
                    let (backend, transport, current, out, pool) =
                        (backend.as_ref(), transport.as_ref(), &current, &out, &pool);
                    scope.spawn(move || {
                        boot_one(config, backend, transport, pool, current, cancel, out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap_or(false))
                .collect()
        });
        if !booted.iter().any(|ok| *ok) {
            bail!("no pooled VM could be booted (see the lines above)");
        }
    }
}

/// Boots one pooled VM; reports how it went. Whatever fails is removed again.
fn boot_one(
    config: &Config,
    backend: &dyn Backend,
    transport: &dyn Transport,
    pool: &PoolDir,
    current: &str,
    cancel: &AtomicBool,
    out: &Out<'_>,
) -> bool {
    let vm_name = new_vm_name(config);
    let progress = Prefixed {
        vm_name: &vm_name,
        out,
    };
    let started = Instant::now();
    let created_unix = unix_now();
    let deadline_unix = created_unix.saturating_add(config.pool.max_idle_secs);
    let mut entry = PoolEntry::booting(
        vm_name.clone(),
        (created_unix, deadline_unix),
        current.to_string(),
    );
    entry.image = config.image.clone();
    let request = VmRequest {
        vm_name: vm_name.clone(),
        job_id: POOL_JOB_ID,
        created_unix,
        deadline_unix,
        owner: crate::ownership::owner_of(&config.state_dir),
        keys: None,
    };
    let result = pool.save(&entry).and_then(|()| {
        Boot {
            config,
            backend,
            transport,
            progress: &progress,
            cancel,
        }
        .boot(&request, &pool.keys_dir(&vm_name), started)
    });
    let result = result.and_then(|endpoint| {
        // With `runner_binary`, a pooled VM gets gitlab-runner now (the claiming prepare then
        // finds it); the runner's own executable is only known to a prepare.
        crate::guest_runner::Provide {
            config,
            transport,
            endpoint: &endpoint,
            runner: None,
            progress: &progress,
            cancel,
        }
        .provide()?;
        entry.phase = PoolPhase::Ready;
        entry.endpoint = Some(endpoint);
        pool.save(&entry)
    });
    match result {
        Ok(()) => {
            progress.say(&format!(
                "ready after {:.1} s",
                started.elapsed().as_secs_f64()
            ));
            true
        }
        Err(err) => {
            progress.say(&format!("could not be booted: {err:#}"));
            crate::boot::report_console_tail(backend, &vm_name);
            if backend.destroy(&vm_name).is_ok() {
                let _ = pool.remove(&vm_name);
            }
            false
        }
    }
}

/// `pool drain`: destroys every pooled VM nobody has claimed.
pub fn drain(
    config: &Config,
    registry: &Registry,
    out: &mut dyn Write,
) -> anyhow::Result<StageOutcome> {
    let backends = super::image_backends(config, registry)?;
    let default = build_backend(config, registry)?;
    let pool = PoolDir::new(&config.state_dir);
    let lock = pool.lock()?;
    let (entries, unreadable) = pool.entries()?;
    let mut failures = 0;
    let images: Vec<(&String, Option<&String>)> = entries
        .iter()
        .map(|e| (&e.vm_name, e.image.as_ref()))
        .chain(unreadable.iter().map(|vm| (vm, None)))
        .collect();
    for (vm_name, image) in images {
        if pool.claimed_by(vm_name).is_some() {
            // A prepare is taking it: it is the job's, not the pool's.
            continue;
        }
        let backend = backends
            .get(&image.cloned())
            .map_or(default.as_ref(), |backend| backend.as_ref());
        match backend
            .destroy(vm_name)
            .map_err(anyhow::Error::new)
            .and_then(|()| pool.remove(vm_name))
        {
            Ok(()) => writeln!(out, "removed {vm_name}: drained")?,
            Err(err) => {
                failures += 1;
                writeln!(out, "could not remove {vm_name}: {err:#}")?;
            }
        }
    }
    if failures > 0 {
        bail!("{failures} pooled VM(s) could not be removed");
    }
    pool.remove_if_empty(&lock)?;
    Ok(StageOutcome::Success)
}

/// `pool status`: the configured size, and one line per pooled VM.
pub fn status(
    config: &Config,
    registry: &Registry,
    out: &mut dyn Write,
) -> anyhow::Result<StageOutcome> {
    let current = super::fingerprints(config, &super::image_backends(config, registry)?)?;
    let pool = PoolDir::new(&config.state_dir);
    let (entries, unreadable) = pool.entries()?;
    let now = unix_now();
    for image in config.image_configs() {
        let ready = entries
            .iter()
            .filter(|e| e.phase == PoolPhase::Ready && e.image == image.image && e.fresh(&current))
            .count();
        let name = image
            .image
            .as_deref()
            .map(|name| format!(" (image {name})"))
            .unwrap_or_default();
        writeln!(
            out,
            "pool{name}: {ready} ready of size {} (max idle {} s)",
            image.pool.size, image.pool.max_idle_secs
        )?;
    }
    for entry in &entries {
        let state = match (entry.phase, entry.fresh(&current)) {
            (_, _) if pool.claimed_by(&entry.vm_name).is_some() => "claimed",
            (PoolPhase::Booting, _) => "booting",
            (PoolPhase::Ready, true) => "ready",
            (PoolPhase::Ready, false) => "stale",
        };
        writeln!(
            out,
            "{:<32} {:<8} {}age {} s, idle until {} s from now",
            entry.vm_name,
            state,
            entry
                .image
                .as_deref()
                .map(|image| format!("image {image}, "))
                .unwrap_or_default(),
            now.saturating_sub(entry.created_unix),
            entry.deadline_unix.saturating_sub(now)
        )?;
    }
    for vm_name in &unreadable {
        writeln!(out, "{vm_name:<32} unreadable")?;
    }
    Ok(StageOutcome::Success)
}
