//! `hyperjob plugin-check`: a conformance run of the backend and the transport the config
//! selects, against the real environment. It builds them, refuses them a table with an unknown
//! key, boots one VM, runs scripts in it (exit code, separate streams, cancellation), tries
//! every optional operation the plugins have, and destroys the VM (twice): one line per clause,
//! ✓ / ✗ like `hyperjob doctor`, `-` for an optional operation a plugin does not have.
//!
//! The VM is destroyed on every path: after a failed clause, on SIGTERM/SIGINT (the binary's
//! cancel flag ends the waits), and if a built-in plugin panics (a guard destroys it while the
//! panic unwinds). It is a job's VM as `hyperjob gc` knows them, of a job id no GitLab job can
//! have ([`job_id`]: above `i64::MAX`), and the check holds that job's activity lock like a
//! prepare: gc leaves it alone while the check runs, and removes what a killed check left (its
//! files and keys at once, its VM once the recorded deadline has passed).

mod scripts;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::boot::{attach_keys, Boot};
use crate::config::{Config, ConfigError};
use crate::doctor::{one_line, Indented, Report};
use crate::exit::StageOutcome;
use crate::plugin::{
    Backend, Check, Endpoint, OwnedVm, PluginError, Transport, VmPresence, VmRequest,
};
use crate::registry::{Kind, Registry};
use crate::stages::{build_backend, build_transport, unix_now};

/// The key added to a plugin's table to see it refused.
pub const UNKNOWN_KEY: &str = "hyperjob_plugin_check_unknown_key";

/// The job id of the check run by process `pid`: GitLab's job ids are positive `i64`s, these
/// are above `i64::MAX`, so no job ever has one.
pub fn job_id(pid: u32) -> u64 {
    (1 << 63) + u64::from(pid)
}

/// How long after the check's boot deadline its VM counts as abandoned (for `hyperjob gc`),
/// in seconds: the scripts and the teardown take well under that.
const DEADLINE_MARGIN_SECS: u64 = 600;

/// Runs every clause, writing one line each to `out`; fails when any clause failed.
pub fn plugin_check(
    config: &Config,
    registry: &Registry,
    cancel: &AtomicBool,
    out: &mut dyn Write,
) -> anyhow::Result<StageOutcome> {
    let mut report = Report { out, failed: 0 };
    let backend = built(&mut report, config, registry, Kind::Backend, || {
        build_backend(config, registry)
    })?;
    let transport = built(&mut report, config, registry, Kind::Transport, || {
        build_transport(config, registry)
    })?;
    for kind in [Kind::Backend, Kind::Transport] {
        report.line(&refuses_unknown_key(config, registry, kind))?;
    }
    let (Some(backend), Some(transport)) = (backend, transport) else {
        return report.finish();
    };
    let mut check = Checker {
        config,
        backend: backend.as_ref(),
        transport: transport.as_ref(),
        cancel,
        report,
    };
    check.run()?;
    check.report.finish()
}

/// Builds one selected plugin from its table: the first clause.
fn built<T: ?Sized>(
    report: &mut Report<'_>,
    config: &Config,
    registry: &Registry,
    kind: Kind,
    build: impl FnOnce() -> anyhow::Result<Box<T>>,
) -> std::io::Result<Option<Box<T>>> {
    let (name, section) = selected(config, kind);
    let origin = match kind {
        Kind::Backend => registry.backend(name).map(|e| e.origin.to_string()),
        Kind::Transport => registry.transport(name).map(|e| e.origin.to_string()),
    };
    let what = format!("build: {kind} {name:?}");
    match build() {
        Ok(plugin) => {
            let origin = origin.unwrap_or_default();
            report.line(&Check::pass(format!(
                "{what} ({origin}) builds from [{section}.{name}]"
            )))?;
            Ok(Some(plugin))
        }
        Err(err) => {
            report.line(&Check::fail(what, one_line(&err)))?;
            Ok(None)
        }
    }
}

/// The selected plugin's name and its table's section.
fn selected(config: &Config, kind: Kind) -> (&str, &'static str) {
    match kind {
        Kind::Backend => (&config.backend, "backends"),
        Kind::Transport => (&config.transport, "transports"),
    }
}

/// The plugin's table with [`UNKNOWN_KEY`] added must be refused as a config error that names
/// the key (the core adds the file and the table): a typo then fails `config`, not a job.
fn refuses_unknown_key(config: &Config, registry: &Registry, kind: Kind) -> Check {
    let (name, section) = selected(config, kind);
    let what = format!("bad config: [{section}.{name}] with an unknown key");
    let mut bad = config.clone();
    let table = match kind {
        Kind::Backend => &mut bad.backend_table,
        Kind::Transport => &mut bad.transport_table,
    };
    table.insert(UNKNOWN_KEY.to_string(), toml::Value::Boolean(true));
    let result = match kind {
        Kind::Backend => build_backend(&bad, registry).map(drop),
        Kind::Transport => build_transport(&bad, registry).map(drop),
    };
    match result {
        Ok(()) => Check::fail(
            what,
            format!(
                "was accepted: `{UNKNOWN_KEY} = true` must fail with PluginError::Config naming \
                 the key (serde's deny_unknown_fields does it)"
            ),
        ),
        Err(err) => {
            let message = one_line(&err);
            if err.downcast_ref::<ConfigError>().is_some() && message.contains(UNKNOWN_KEY) {
                Check::pass(format!("{what} is refused: {message}"))
            } else {
                Check::fail(
                    what,
                    format!(
                        "was refused, but not as a config error naming `{UNKNOWN_KEY}`: {message}"
                    ),
                )
            }
        }
    }
}

/// Destroys the VM if it is still armed when dropped: when a built-in plugin panics.
struct DestroyOnDrop<'a> {
    backend: &'a dyn Backend,
    vm_name: &'a str,
    armed: bool,
}

impl Drop for DestroyOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.backend.destroy(self.vm_name);
        }
    }
}

/// The check's VM as it was asked for.
struct Vm {
    request: VmRequest,
    /// The per-job client key, with `guest_keys = "per-job"`.
    identity_file: Option<PathBuf>,
    created: Instant,
}

/// What the lifecycle learnt that the clauses after the destroy check against.
#[derive(Default)]
struct Seen {
    /// `Some(true)`: list_owned listed the VM while it existed.
    listed: Option<bool>,
    /// `Some(true)`: names_with_files named the VM while it existed.
    files_listed: Option<bool>,
}

struct Checker<'a> {
    config: &'a Config,
    backend: &'a dyn Backend,
    transport: &'a dyn Transport,
    /// Set by the binary's SIGTERM/SIGINT handler.
    cancel: &'a AtomicBool,
    report: Report<'a>,
}

impl Checker<'_> {
    fn run(&mut self) -> anyhow::Result<()> {
        let job_id = job_id(std::process::id());
        let vm_name = self.config.vm_name(job_id);
        let verdict = judge(self.backend.destroy(&format!("{vm_name}-never")), |()| {
            Ok("success".into())
        });
        self.say("destroy of a name that never existed", verdict)?;
        let store = crate::state::StateStore::new(&self.config.state_dir);
        // As a prepare does: gc never judges the job while this runs.
        let active = store.lock_activity(job_id)?;
        let mut guard = DestroyOnDrop {
            backend: self.backend,
            vm_name: &vm_name,
            armed: true,
        };
        let mut seen = Seen::default();
        let key_dir = store.keys_dir(job_id);
        let lifecycle = self.lifecycle(job_id, &key_dir, &mut seen);
        self.teardown(&vm_name, &seen)?;
        guard.armed = false;
        let _ = std::fs::remove_dir_all(&key_dir);
        active.release_and_remove();
        lifecycle?;
        if self.cancel.load(Ordering::Relaxed) {
            self.report.line(&Check::fail(
                "plugin-check",
                "interrupted by a signal; the VM was destroyed",
            ))?;
        }
        Ok(())
    }

    /// Create, the listings while the VM exists, address, login, scripts and the optional
    /// operations. Returns early (`Ok`) after a clause the rest depends on failed.
    fn lifecycle(&mut self, job_id: u64, key_dir: &Path, seen: &mut Seen) -> anyhow::Result<()> {
        let Some(vm) = self.create(job_id, key_dir)? else {
            return Ok(());
        };
        seen.listed = self.listed_while_it_exists(&vm)?;
        self.inspected_while_it_exists(&vm, &record_of(&vm.request))?;
        seen.files_listed = self.files_while_it_exists(&vm.request.vm_name)?;
        let Some(endpoint) = self.reach(&vm)? else {
            return Ok(());
        };
        if self.stopped() {
            return Ok(());
        }
        scripts::script(self, &endpoint)?;
        if self.stopped() {
            return Ok(());
        }
        scripts::cancel(self, &endpoint)?;
        if self.stopped() {
            return Ok(());
        }
        scripts::connection(self, &endpoint)?;
        Ok(self.optional_backend_operations(&vm)?)
    }

    fn stopped(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Writes one clause's line; true when it passed.
    fn say(&mut self, what: &str, verdict: Verdict) -> std::io::Result<bool> {
        match verdict {
            Verdict::Pass(found) if found.is_empty() => {
                self.report.line(&Check::pass(what))?;
                Ok(true)
            }
            Verdict::Pass(found) => {
                self.report.line(&Check::pass(format!("{what}: {found}")))?;
                Ok(true)
            }
            Verdict::Fail(why) => {
                self.report.line(&Check::fail(what, why))?;
                Ok(false)
            }
            Verdict::Skip(why) => {
                self.report.skip(what, &why)?;
                Ok(false)
            }
        }
    }

    fn create(&mut self, job_id: u64, key_dir: &Path) -> anyhow::Result<Option<Vm>> {
        let now = unix_now();
        let vm_name = self.config.vm_name(job_id);
        let request = VmRequest {
            vm_name: vm_name.clone(),
            job_id,
            created_unix: now,
            deadline_unix: now + self.transport.ready_timeout().as_secs() + DEADLINE_MARGIN_SECS,
            owner: crate::ownership::owner_of(&self.config.state_dir),
            keys: None,
        };
        let boot = Boot {
            config: self.config,
            backend: self.backend,
            transport: self.transport,
            progress: &Indented,
            cancel: self.cancel,
        };
        let (request, identity_file) = match boot.with_keys(&request, key_dir) {
            Ok(keyed) => keyed,
            Err(err) => {
                let why = format!("VM {vm_name}: {}", one_line(&err));
                self.say("create", Verdict::Fail(why))?;
                return Ok(None);
            }
        };
        let created = Instant::now();
        let deadline = created + self.transport.ready_timeout();
        let result = self
            .backend
            .create(&request, &Indented, deadline, self.cancel);
        let keys = if request.keys.is_some() {
            " with per-job keys"
        } else {
            ""
        };
        let verdict = match judge(result, |()| {
            Ok(format!(
                "VM {vm_name} created{keys} in {:.1} s",
                created.elapsed().as_secs_f64()
            ))
        }) {
            Verdict::Fail(why) => Verdict::Fail(format!("VM {vm_name}: {why}")),
            other => other,
        };
        if !self.say("create", verdict)? {
            return Ok(None);
        }
        Ok(Some(Vm {
            request,
            identity_file,
            created,
        }))
    }

    /// list_owned names the VM with the record it was created with.
    fn listed_while_it_exists(&mut self, vm: &Vm) -> std::io::Result<Option<bool>> {
        let expected = record_of(&vm.request);
        let verdict = judge(self.backend.list_owned(), |vms| {
            match vms.iter().find(|v| v.vm_name == expected.vm_name) {
                Some(vm) if *vm == expected => {
                    Ok("lists it with its job id, times and owner".into())
                }
                Some(vm) => Err(format!("lists it as {vm:?}, not as created: {expected:?}")),
                None => Err(format!(
                    "does not list it (gc would never find it); listed: {:?}",
                    vms.iter().map(|v| v.vm_name.as_str()).collect::<Vec<_>>()
                )),
            }
        });
        let supported = !matches!(verdict, Verdict::Skip(_));
        let passed = self.say("list_owned while the VM exists", verdict)?;
        Ok(supported.then_some(passed))
    }

    /// inspect finds the VM, owned, with its record.
    fn inspected_while_it_exists(&mut self, vm: &Vm, record: &OwnedVm) -> std::io::Result<()> {
        let verdict = judge(
            self.backend.inspect(&vm.request.vm_name),
            |presence| match presence {
                VmPresence::Owned(found) if found == *record => Ok("owned, with its record".into()),
                other => Err(format!("found {other:?}, expected {record:?}")),
            },
        );
        self.say("inspect while the VM exists", verdict)?;
        Ok(())
    }

    /// names_with_files: optional; a backend that lists files must list the VM's.
    fn files_while_it_exists(&mut self, vm_name: &str) -> std::io::Result<Option<bool>> {
        let what = "names_with_files while the VM exists";
        match self.backend.names_with_files() {
            Ok(names) if names.is_empty() => {
                self.say(what, Verdict::Skip("lists no files (optional)".into()))?;
                Ok(None)
            }
            result => {
                let verdict = judge(result, |names| {
                    if names.iter().any(|n| n == vm_name) {
                        Ok("names it".into())
                    } else {
                        Err(format!("does not name it; named: {names:?}"))
                    }
                });
                Ok(Some(self.say(what, verdict)?))
            }
        }
    }

    /// wait_address, then wait_ready, both by the transport's ready timeout from create.
    fn reach(&mut self, vm: &Vm) -> std::io::Result<Option<Endpoint>> {
        let deadline = vm.created + self.transport.ready_timeout();
        let vm_name = &vm.request.vm_name;
        let result = self.backend.wait_address(vm_name, deadline, self.cancel);
        let mut address = None;
        let (config, backend, transport) = (self.config, self.backend, self.transport);
        let verdict = judge(result, |endpoint| {
            crate::endpoints::check_endpoint(config, backend, transport, &endpoint)
                .map_err(|err| err.to_string())?;
            let found = format!(
                "{endpoint} after {:.1} s",
                vm.created.elapsed().as_secs_f64()
            );
            address = Some(endpoint);
            Ok(found)
        });
        if !self.say("wait_address", verdict)? {
            return Ok(None);
        }
        let Some(endpoint) = address else {
            return Ok(None);
        };
        let endpoint = attach_keys(endpoint, &vm.request, vm.identity_file.clone());
        let result = self.transport.wait_ready(&endpoint, deadline, self.cancel);
        let verdict = judge(result, |()| {
            Ok(format!(
                "the guest runs commands after {:.1} s",
                vm.created.elapsed().as_secs_f64()
            ))
        });
        Ok(self.say("wait_ready", verdict)?.then_some(endpoint))
    }

    /// console_tail, fingerprint, relabel and halt: each only if the backend has it.
    fn optional_backend_operations(&mut self, vm: &Vm) -> std::io::Result<()> {
        let vm_name = &vm.request.vm_name;
        let verdict = judge(self.backend.console_tail(vm_name), |tail| {
            Ok(format!("{} line(s)", tail.lines().count()))
        });
        self.say("console_tail", verdict)?;
        let first = self.backend.fingerprint();
        let verdict = judge(first, |first| match self.backend.fingerprint() {
            Ok(second) if second == first && !first.trim().is_empty() => {
                Ok("stable across calls".into())
            }
            Ok(second) if second != first => Err(format!(
                "changed between two calls: {first:?}, then {second:?}"
            )),
            Ok(_) => Err("is empty".into()),
            Err(err) => Err(format!("the second call failed: {err}")),
        });
        self.say("fingerprint", verdict)?;
        // The pool's relabel: a new deadline, as list_owned and inspect report it afterwards.
        let relabelled = OwnedVm {
            deadline_unix: vm.request.deadline_unix + 1,
            ..record_of(&vm.request)
        };
        let verdict = judge(self.backend.relabel(&relabelled), |()| {
            match self.backend.inspect(vm_name) {
                Ok(VmPresence::Owned(found)) if found == relabelled => {
                    Ok("inspect reports the new record".into())
                }
                Ok(other) => Err(format!(
                    "inspect then found {other:?}, expected {relabelled:?}"
                )),
                Err(err) => Err(format!("inspect then failed: {err}")),
            }
        });
        self.say("relabel", verdict)?;
        // halt last: the VM stops running; a second halt of a stopped VM is no error.
        let verdict = judge(self.backend.halt(vm_name), |()| {
            match self.backend.halt(vm_name) {
                Ok(()) => Ok("stopped it; halting it again is no error".into()),
                Err(err) => Err(format!("a second halt failed: {err}")),
            }
        });
        self.say("halt", verdict)?;
        Ok(())
    }

    /// destroy, destroy again, and the listings afterwards. Runs whatever happened before.
    fn teardown(&mut self, vm_name: &str, seen: &Seen) -> std::io::Result<()> {
        let started = Instant::now();
        let result = self.backend.destroy(vm_name);
        let verdict = judge(result, |()| {
            Ok(format!("done in {:.1} s", started.elapsed().as_secs_f64()))
        });
        self.say("destroy", verdict)?;
        let verdict = judge(self.backend.destroy(vm_name), |()| {
            Ok("success: already gone".into())
        });
        self.say("destroy again (idempotent)", verdict)?;
        if seen.listed.is_some() {
            let verdict = judge(self.backend.list_owned(), |vms| {
                if vms.iter().any(|vm| vm.vm_name == vm_name) {
                    Err("still lists it".into())
                } else {
                    Ok("no longer lists it".into())
                }
            });
            self.say("list_owned after destroy", verdict)?;
        }
        let verdict = judge(self.backend.inspect(vm_name), |presence| match presence {
            VmPresence::Absent => Ok("absent".into()),
            other => Err(format!("found {other:?}, expected Absent")),
        });
        self.say("inspect after destroy", verdict)?;
        if seen.files_listed.is_some() {
            let verdict = judge(self.backend.names_with_files(), |names| {
                if names.iter().any(|n| n == vm_name) {
                    Err("still names it: its files were left behind".into())
                } else {
                    Ok("no longer names it".into())
                }
            });
            self.say("names_with_files after destroy", verdict)?;
        }
        Ok(())
    }
}

/// How one clause went.
enum Verdict {
    /// Passed; what was found (may be empty).
    Pass(String),
    Fail(String),
    /// An optional operation the plugin does not have.
    Skip(String),
}

/// The verdict on a plugin call: its error fails the clause (an unsupported optional operation
/// skips it), its value is judged by `check`.
fn judge<T>(
    result: Result<T, PluginError>,
    check: impl FnOnce(T) -> Result<String, String>,
) -> Verdict {
    match result {
        Ok(value) => match check(value) {
            Ok(found) => Verdict::Pass(found),
            Err(why) => Verdict::Fail(why),
        },
        Err(PluginError::Unsupported(_)) => Verdict::Skip("not supported (optional)".into()),
        Err(err) => Verdict::Fail(one_line(&anyhow::Error::new(err))),
    }
}

/// The VM's ownership record as `request` asked for it.
fn record_of(request: &VmRequest) -> OwnedVm {
    OwnedVm {
        vm_name: request.vm_name.clone(),
        job_id: request.job_id,
        created_unix: request.created_unix,
        deadline_unix: request.deadline_unix,
        owner: Some(request.owner.clone()),
    }
}

#[cfg(test)]
#[path = "plugin_check/tests.rs"]
mod tests;
