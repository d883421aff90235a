//! `hyperjob doctor`: everything an operator gets wrong, checked one line each (✓ / ✗ with a
//! fix), without creating anything — unless `--boot` asks for one VM booted end to end.
//!
//! The core checks the config, the plugins, `state_dir` and GitLab Runner's config; each plugin
//! checks its own needs ([`crate::Backend::doctor`], [`crate::Transport::doctor`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::boot::Boot;
use crate::config::Config;
use crate::exit::StageOutcome;
use crate::plugin::{Backend, Check, Progress, Transport, VmRequest};
use crate::registry::Registry;
use crate::stages::{build_backend, build_transport, unix_now};

/// GitLab Runner's config file, where a runner installed from its package keeps it.
pub const RUNNER_CONFIG: &str = "/etc/gitlab-runner/config.toml";

/// What `doctor` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// hyperjob's config file.
    pub config_path: PathBuf,
    /// GitLab Runner's config file; checked only when it exists.
    pub runner_config: PathBuf,
    /// Also boot one VM and log in.
    pub boot: bool,
}

/// Writes one line per check to `out`; fails when any check failed.
pub fn doctor(
    options: &Options,
    load_registry: impl Fn(&Config) -> anyhow::Result<Registry>,
    cancel: &AtomicBool,
    out: &mut dyn Write,
) -> anyhow::Result<StageOutcome> {
    let mut report = Report { out, failed: 0 };
    let config = match Config::load(&options.config_path) {
        Ok(config) => {
            report.line(&Check::pass(format!(
                "config {}: backend {:?}, transport {:?}, state_dir {}",
                options.config_path.display(),
                config.backend,
                config.transport,
                config.state_dir.display()
            )))?;
            config
        }
        Err(err) => {
            report.line(&Check::fail(
                format!("config {}", options.config_path.display()),
                one_line(&anyhow::Error::new(err)),
            ))?;
            return report.finish();
        }
    };
    let plugins = load_registry(&config).and_then(|registry| {
        let backend = build_backend(&config, &registry)?;
        let transport = build_transport(&config, &registry)?;
        Ok((backend, transport))
    });
    let (backend, transport) = match plugins {
        Ok(plugins) => {
            report.line(&Check::pass(format!(
                "plugins: backend {:?} and transport {:?} load, their tables are valid",
                config.backend, config.transport
            )))?;
            plugins
        }
        Err(err) => {
            report.line(&Check::fail("the selected plugins", one_line(&err)))?;
            return report.finish();
        }
    };
    report.line(&state_dir_check(&config.state_dir))?;
    if let Some(runner_binary) = &config.runner_binary {
        report.line(&crate::guest_runner::doctor_check(runner_binary))?;
    }
    if config.images.allowed.is_empty() {
        for check in backend.doctor().iter().chain(transport.doctor().iter()) {
            report.line(check)?;
        }
    }
    // Each allowed image with its own tables: its own base image, keys, directories.
    let mut images = Vec::new();
    for image in config
        .image_configs()
        .into_iter()
        .filter(|c| c.image.is_some())
    {
        let name = image.image.clone().unwrap_or_default();
        let loaded = load_registry(&image).and_then(|registry| {
            Ok((
                build_backend(&image, &registry)?,
                build_transport(&image, &registry)?,
            ))
        });
        match loaded {
            Ok((backend, transport)) => {
                for check in backend.doctor().iter().chain(transport.doctor().iter()) {
                    report.line(&Check {
                        what: format!("image {name}: {}", check.what),
                        ..check.clone()
                    })?;
                }
                images.push((image, backend, transport));
            }
            Err(err) => report.line(&Check::fail(format!("image {name}"), one_line(&err)))?,
        }
    }
    if options.runner_config.exists() {
        for check in runner_config_checks(&options.runner_config, &options.config_path) {
            report.line(&check)?;
        }
    }
    if options.boot {
        if images.is_empty() {
            let check = boot_check(&config, backend.as_ref(), transport.as_ref(), cancel);
            report.line(&check)?;
        }
        for (image, backend, transport) in &images {
            let check = boot_check(image, backend.as_ref(), transport.as_ref(), cancel);
            let name = image.image.as_deref().unwrap_or_default();
            report.line(&Check {
                what: format!("image {name}: {}", check.what),
                ..check
            })?;
        }
    }
    report.finish()
}

/// Writes check lines (✓ / ✗) and counts the failures; `hyperjob plugin-check` reports the
/// same way.
pub(crate) struct Report<'a> {
    pub(crate) out: &'a mut dyn Write,
    pub(crate) failed: usize,
}

impl Report<'_> {
    pub(crate) fn line(&mut self, check: &Check) -> std::io::Result<()> {
        match &check.fix {
            None if check.ok => writeln!(self.out, "✓ {}", check.what),
            fix => {
                self.failed += 1;
                let fix = fix.as_deref().unwrap_or("failed");
                writeln!(self.out, "✗ {}: {fix}", check.what)
            }
        }
    }

    /// A check that does not apply (an optional operation the plugin does not have).
    pub(crate) fn skip(&mut self, what: &str, why: &str) -> std::io::Result<()> {
        writeln!(self.out, "- {what}: {why}")
    }

    pub(crate) fn finish(self) -> anyhow::Result<StageOutcome> {
        if self.failed > 0 {
            anyhow::bail!("{} check(s) failed", self.failed);
        }
        Ok(StageOutcome::Success)
    }
}

/// An error and its causes on one line.
pub(crate) fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}").replace('\n', " ")
}

/// `state_dir` is (or can be made) a real directory of this user, closed to everyone else.
fn state_dir_check(dir: &Path) -> Check {
    use std::os::unix::fs::MetadataExt;
    let what = format!("state_dir {}", dir.display());
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => Check::fail(
            what,
            "is a symbolic link; set state_dir to the real directory it points to",
        ),
        Ok(meta) if !meta.is_dir() => Check::fail(what, "exists and is not a directory"),
        Ok(meta) if meta.uid() != crate::state::effective_uid() => Check::fail(
            what,
            format!(
                "belongs to uid {}, not to uid {} that hyperjob runs as (chown it)",
                meta.uid(),
                crate::state::effective_uid()
            ),
        ),
        Ok(meta) if meta.mode() & 0o077 != 0 => Check::fail(
            what,
            format!(
                "is mode {:04o}; others must not read job state and keys (chmod 0700)",
                meta.mode() & 0o7777
            ),
        ),
        Ok(_) => Check::pass(format!("{what}: a 0700 directory of this user")),
        Err(_) => {
            let parent = dir
                .ancestors()
                .skip(1)
                .find(|p| p.exists())
                .unwrap_or(Path::new("/"));
            if writable(parent) {
                Check::pass(format!(
                    "{what}: will be created (0700) in {}",
                    parent.display()
                ))
            } else {
                Check::fail(
                    what,
                    format!(
                        "does not exist and {} is not writable for this user (create it, 0700)",
                        parent.display()
                    ),
                )
            }
        }
    }
}

/// Whether this user may create files in `path` (write and search).
pub fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) reads the NUL-terminated path and nothing else.
    #[allow(unsafe_code)]
    unsafe {
        libc::access(c_path.as_ptr(), libc::W_OK | libc::X_OK) == 0
    }
}

/// GitLab Runner's `[[runners]]` that use the custom executor call hyperjob correctly: each
/// of the four stages runs hyperjob with its stage name, with this config.
pub fn runner_config_checks(runner_config: &Path, config_path: &Path) -> Vec<Check> {
    let what = format!("GitLab Runner config {}", runner_config.display());
    let text = match std::fs::read_to_string(runner_config) {
        Ok(text) => text,
        Err(err) => return vec![Check::fail(what, format!("cannot read it: {err}"))],
    };
    let table: toml::Table = match toml::from_str(&text) {
        Ok(table) => table,
        Err(err) => {
            return vec![Check::fail(
                what,
                format!("is not valid TOML: {}", err.message().replace('\n', " ")),
            )]
        }
    };
    let runners = table
        .get("runners")
        .and_then(toml::Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ours: Vec<&toml::Table> = runners
        .iter()
        .filter_map(toml::Value::as_table)
        .filter(|runner| runner.get("executor").and_then(toml::Value::as_str) == Some("custom"))
        .filter(|runner| {
            runner
                .get("custom")
                .and_then(toml::Value::as_table)
                .is_some_and(|custom| {
                    STAGES
                        .iter()
                        .any(|stage| custom_exec(custom, stage).is_some_and(|e| is_hyperjob(&e)))
                })
        })
        .collect();
    if ours.is_empty() {
        return vec![Check::fail(
            what,
            "no [[runners]] with executor = \"custom\" runs hyperjob (see README, \"GitLab \
             Runner configuration\")",
        )];
    }
    ours.into_iter()
        .map(|runner| runner_check(runner, &what, config_path))
        .collect()
}

const STAGES: [&str; 4] = ["config", "prepare", "run", "cleanup"];

fn custom_exec(custom: &toml::Table, stage: &str) -> Option<String> {
    custom
        .get(&format!("{stage}_exec"))
        .and_then(toml::Value::as_str)
        .map(str::to_string)
}

fn is_hyperjob(exec: &str) -> bool {
    let exec = Path::new(exec);
    exec.file_name().is_some_and(|name| name == "hyperjob")
        || std::env::current_exe()
            .ok()
            .zip(exec.canonicalize().ok())
            .is_some_and(|(me, exec)| me.canonicalize().is_ok_and(|me| me == exec))
}

fn runner_check(runner: &toml::Table, what: &str, config_path: &Path) -> Check {
    let name = runner
        .get("name")
        .and_then(toml::Value::as_str)
        .unwrap_or("(unnamed)");
    let what = format!("{what}, runner {name:?}");
    let Some(custom) = runner.get("custom").and_then(toml::Value::as_table) else {
        return Check::fail(what, "has no [runners.custom] table");
    };
    let default_config = config_path == Path::new(crate::config::DEFAULT_CONFIG_PATH);
    let env_config = runner
        .get("environment")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(toml::Value::as_str)
        .any(|pair| pair == format!("{}={}", crate::config::CONFIG_ENV, config_path.display()));
    for stage in STAGES {
        let Some(exec) = custom_exec(custom, stage) else {
            return Check::fail(
                what,
                format!("{stage}_exec is not set; set it to hyperjob's path"),
            );
        };
        if !is_hyperjob(&exec) {
            return Check::fail(what, format!("{stage}_exec = {exec:?} is not hyperjob"));
        }
        if !Path::new(&exec).is_file() {
            return Check::fail(what, format!("{stage}_exec = {exec:?} does not exist"));
        }
        let args: Vec<&str> = custom
            .get(&format!("{stage}_args"))
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(toml::Value::as_str)
            .collect();
        if args.last() != Some(&stage) {
            return Check::fail(
                what,
                format!("{stage}_args must end with \"{stage}\", not {args:?}"),
            );
        }
        let names_config = args
            .windows(2)
            .any(|pair| pair[0] == "--config" && Path::new(pair[1]) == config_path);
        if !default_config && !env_config && !names_config {
            return Check::fail(
                what,
                format!(
                    "{stage}_args do not name this config: add \"--config\", \"{}\"",
                    config_path.display()
                ),
            );
        }
    }
    Check::pass(format!(
        "{what}: [runners.custom] runs hyperjob for config, prepare, run and cleanup with this \
         config"
    ))
}

/// Prints each boot step on its own line under the check.
pub(crate) struct Indented;

impl Progress for Indented {
    fn say(&self, message: &str) {
        println!("    {message}");
    }
}

/// Boots one VM from the configured image, as prepare would, and logs in; then destroys it.
fn boot_check(
    config: &Config,
    backend: &dyn Backend,
    transport: &dyn Transport,
    cancel: &AtomicBool,
) -> Check {
    let vm_name = format!("{}doctor-{}", config.name_prefix, std::process::id());
    let started = Instant::now();
    let now = unix_now();
    let request = VmRequest {
        vm_name: vm_name.clone(),
        job_id: 0,
        created_unix: now,
        // A doctor's VM that outlives its run is garbage at once.
        deadline_unix: now + 600,
        owner: crate::ownership::owner_of(&config.state_dir),
        keys: None,
    };
    let key_dir = config.state_dir.join(format!("{vm_name}.keys"));
    let result = crate::state::StateStore::new(&config.state_dir)
        .ensure_exists()
        .map_err(anyhow::Error::new)
        .and_then(|()| {
            Boot {
                config,
                backend,
                transport,
                progress: &Indented,
                cancel,
            }
            .boot(&request, &key_dir, started)
        });
    let took = started.elapsed().as_secs_f64();
    let destroyed = backend.destroy(&vm_name);
    let _ = std::fs::remove_dir_all(&key_dir);
    match (result, destroyed) {
        (Ok(endpoint), Ok(())) => Check::pass(format!(
            "--boot: VM {vm_name} booted, its host key matched and the login worked at {endpoint} \
             after {took:.1} s; destroyed again"
        )),
        (Err(err), _) => Check::fail(format!("--boot: VM {vm_name}"), one_line(&err)),
        (Ok(_), Err(err)) => Check::fail(
            format!("--boot: VM {vm_name}"),
            format!("booted, but destroying it failed: {err}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner_config(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    fn custom(exec: &str, args: [&str; 4]) -> String {
        let mut text = String::from(
            "concurrent = 1\n[[runners]]\nname = \"vm\"\nexecutor = \"custom\"\n[runners.custom]\n",
        );
        for (stage, args) in STAGES.iter().zip(args) {
            text.push_str(&format!(
                "{stage}_exec = {exec:?}\n{stage}_args = [{args}]\n"
            ));
        }
        text
    }

    #[test]
    fn a_runner_that_calls_hyperjob_for_every_stage_with_this_config_passes() {
        let (_dir, path) = runner_config(&custom(
            "/bin/true",
            [
                "\"--config\", \"/etc/h.toml\", \"config\"",
                "\"--config\", \"/etc/h.toml\", \"prepare\"",
                "\"--config\", \"/etc/h.toml\", \"run\"",
                "\"--config\", \"/etc/h.toml\", \"cleanup\"",
            ],
        ));

        // /bin/true is not hyperjob: the check names the stage.
        let checks = runner_config_checks(&path, Path::new("/etc/h.toml"));
        assert!(checks.iter().all(|c| !c.ok), "{checks:?}");
    }

    #[test]
    fn wrong_args_or_a_missing_config_are_named() {
        let exe = std::env::current_exe().expect("exe");
        let exe = exe.to_str().expect("utf-8");
        let good = ["\"config\"", "\"prepare\"", "\"run\"", "\"cleanup\""];
        let (_d, path) = runner_config(&custom(exe, good));

        let default = runner_config_checks(&path, Path::new(crate::config::DEFAULT_CONFIG_PATH));
        let other = runner_config_checks(&path, Path::new("/srv/hyperjob.toml"));

        assert!(default.iter().all(|c| c.ok), "{default:?}");
        let fix = other[0].fix.as_deref().expect("a fix");
        assert!(fix.contains("config_args do not name this config"), "{fix}");
        let (_d, path) = runner_config(&custom(
            exe,
            ["\"config\"", "\"prepare\"", "\"run\", \"x\"", "\"cleanup\""],
        ));
        let checks = runner_config_checks(&path, Path::new(crate::config::DEFAULT_CONFIG_PATH));
        let fix = checks[0].fix.as_deref().expect("a fix");
        assert!(fix.contains("run_args must end with \"run\""), "{fix}");
        let (_d, path) = runner_config("[[runners]]\nexecutor = \"shell\"\n");
        let checks = runner_config_checks(&path, Path::new("/x"));
        assert!(checks[0]
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("no [[runners]]")));
    }

    #[test]
    fn state_dir_problems_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&open, &link).expect("symlink");

        assert!(state_dir_check(&dir.path().join("new")).ok);
        assert!(state_dir_check(&open)
            .fix
            .is_some_and(|f| f.contains("mode 0755")));
        assert!(state_dir_check(&link)
            .fix
            .is_some_and(|f| f.contains("symbolic link")));
    }
}
