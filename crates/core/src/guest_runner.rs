//! `gitlab-runner` in guests that lack it (issue 11 §6).
//!
//! Jobs with `artifacts:` or `cache:` run `gitlab-runner` inside the build environment (the
//! artifacts uploader, the cache archiver and extractor); the runner's scripts look for it on
//! `PATH` and, when it is missing, only print "Missing gitlab-runner. … is disabled.". The
//! runner host always has it, so prepare copies it into a guest that has none, as the Tart
//! executor does:
//!
//! - **What**: `runner_binary` from the config, else the executable of the process that
//!   called hyperjob ([`crate::runner`]: its nearest ancestor that is not a shell), read
//!   through `/proc/PID/exe` (so an upgrade that replaced the file on disk still copies the
//!   running one) — but only when that executable is GitLab Runner's (its name starts with
//!   `gitlab-runner`): a test harness or a shell session calling hyperjob is no runner to
//!   copy.
//! - **Whether**: not when the guest already has one (on the scripts' `PATH`, or in
//!   `~/.local/bin` from an earlier copy); not when the file cannot run there (an ELF file for
//!   another machine than the guest's `uname -m`); not when the transport cannot copy files.
//!   Each of these says one line in the job log, and prepare goes on: the job runs as it
//!   would on any executor without `gitlab-runner`.
//! - **Where**: the first directory on the stage scripts' `PATH` the login user can write to
//!   (`/usr/local/bin` for root). For a user who can write to none (a non-root login user;
//!   hyperjob never uses sudo on its own), `~/.local/bin/gitlab-runner`, and that directory is
//!   appended to the `PATH` of every stage script of the job (recorded as
//!   [`crate::state::JobState::guest_path`]): the SSH server starts scripts with its own fixed
//!   `PATH`, which no profile extends.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context as _;

use crate::config::Config;
use crate::plugin::{
    Endpoint, PluginError, Progress, RemoteExit, ScriptRequest, Transport, Upload,
};
use crate::runner::ProcessIdentity;

/// The command the runner's scripts call.
pub const COMMAND: &str = "gitlab-runner";
/// Where a login user who can write to no directory on `PATH` gets it, below `$HOME`.
const HOME_BIN: &str = ".local/bin";

/// Asks the guest whether it has `gitlab-runner`, and if not, its machine, home and the
/// directories on `PATH` it can write to. One line each: `found PATH`, `found-home DIR`, or
/// `machine M`, `home H`, `writable DIR`...
const PROBE: &[u8] = b"if p=$(command -v gitlab-runner 2>/dev/null); then echo \"found $p\"; exit 0; fi
if [ -n \"$HOME\" ] && [ -x \"$HOME/.local/bin/gitlab-runner\" ]; then echo \"found-home $HOME/.local/bin\"; exit 0; fi
echo \"machine $(uname -m)\"
echo \"home $HOME\"
set -f; IFS=:
for d in $PATH; do case $d in /*) if [ -d \"$d\" ] && [ -w \"$d\" ]; then echo \"writable $d\"; fi;; esac; done
";

/// What the guest said about `gitlab-runner`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestState {
    /// On the scripts' `PATH`, at this path.
    Found(String),
    /// In this directory below the home directory, from an earlier copy: on `PATH` once
    /// appended to it.
    FoundInHome(String),
    Missing {
        /// `uname -m`.
        machine: String,
        /// `$HOME`, if set and absolute.
        home: Option<String>,
        /// Directories on `PATH` the login user can write to, in `PATH` order.
        writable: Vec<String>,
    },
}

/// Parses the guest's answer to [`PROBE`].
pub fn parse_probe(answer: &str) -> Result<GuestState, String> {
    let mut machine = None;
    let mut home = None;
    let mut writable = Vec::new();
    for line in answer.lines() {
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        match key {
            "found" => return Ok(GuestState::Found(value.to_string())),
            "found-home" => return Ok(GuestState::FoundInHome(value.to_string())),
            "machine" => machine = Some(value.trim().to_string()),
            "home" => home = Some(value.to_string()).filter(|h| is_safe_dir(h)),
            "writable" => writable.push(value.to_string()),
            _ => {}
        }
    }
    let machine = machine
        .filter(|m| !m.is_empty())
        .ok_or_else(|| format!("unexpected answer from the guest: {:?}", answer.trim()))?;
    Ok(GuestState::Missing {
        machine,
        home,
        writable,
    })
}

/// An absolute path without control characters (it goes into a shell word, quoted).
fn is_safe_dir(dir: &str) -> bool {
    dir.starts_with('/') && !dir.chars().any(char::is_control)
}

/// Where the copy goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub dir: String,
    /// The directory is not on the scripts' `PATH`: every stage script gets it appended.
    pub append_to_path: bool,
}

impl Target {
    /// The copy's path in the guest.
    pub fn path(&self) -> String {
        format!("{}/{COMMAND}", self.dir.trim_end_matches('/'))
    }
}

/// Where to put `gitlab-runner`: `/usr/local/bin` when it is writable, else the first writable
/// directory on `PATH` named `.../bin`, else the first writable one; else `~/.local/bin`,
/// appended to `PATH`. `None` without a writable directory and a home.
pub fn choose_target(home: Option<&str>, writable: &[String]) -> Option<Target> {
    let on_path = writable
        .iter()
        .filter(|dir| is_safe_dir(dir))
        .find(|dir| dir.trim_end_matches('/') == "/usr/local/bin")
        .or_else(|| {
            writable
                .iter()
                .filter(|dir| is_safe_dir(dir))
                .find(|dir| dir.trim_end_matches('/').ends_with("/bin"))
        })
        .or_else(|| writable.iter().find(|dir| is_safe_dir(dir)));
    if let Some(dir) = on_path {
        return Some(Target {
            dir: dir.clone(),
            append_to_path: false,
        });
    }
    let home = home.filter(|h| is_safe_dir(h))?;
    Some(Target {
        dir: format!("{}/{HOME_BIN}", home.trim_end_matches('/')),
        append_to_path: true,
    })
}

/// The line put before every stage script when `dir` holds the job's `gitlab-runner` but is
/// not on the scripts' `PATH`: appends it (POSIX sh, so it works for `sh` and `bash` scripts).
pub fn path_prefix(dir: &str) -> String {
    format!(
        "PATH=\"${{PATH:+$PATH:}}\"{}; export PATH\n",
        single_quote(dir)
    )
}

/// A stage script as the guest runs it: with `guest_path` (where prepare put gitlab-runner,
/// off the scripts' `PATH`), [`path_prefix`] before it.
pub fn with_guest_path(guest_path: Option<&str>, script: Vec<u8>) -> Vec<u8> {
    match guest_path {
        Some(dir) => [path_prefix(dir).as_bytes(), &script].concat(),
        None => script,
    }
}

fn single_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The file to offer guests, and how the job log names it; `Err` says why there is none.
pub fn source(
    configured: Option<&Path>,
    runner: Option<&ProcessIdentity>,
    proc_root: &Path,
) -> Result<(PathBuf, String), String> {
    if let Some(path) = configured {
        return Ok((
            path.to_path_buf(),
            format!("runner_binary {}", path.display()),
        ));
    }
    let Some(runner) = runner else {
        return Err("hyperjob was not called by a runner process".to_string());
    };
    let exe = proc_root.join(runner.pid.to_string()).join("exe");
    let target = std::fs::read_link(&exe).map_err(|err| {
        format!(
            "the executable of the calling process {} ({}) cannot be read: {err}",
            runner.pid, runner.comm
        )
    })?;
    let name = target
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string()
        })
        .unwrap_or_default();
    if !name.starts_with(COMMAND) {
        return Err(format!(
            "the calling process {} ({}) is not GitLab Runner",
            runner.pid,
            target.display()
        ));
    }
    Ok((exe, format!("the runner's own {}", target.display())))
}

/// ELF machine numbers and the `uname -m` names of machines that run them.
const MACHINES: &[(u16, &[&str])] = &[
    (3, &["i386", "i486", "i586", "i686", "x86_64"]),
    (62, &["x86_64"]),
    (40, &["armv6l", "armv7l", "armv8l", "arm", "aarch64"]),
    (183, &["aarch64", "arm64"]),
    (243, &["riscv64", "riscv32"]),
    (21, &["ppc64", "ppc64le"]),
    (20, &["ppc"]),
    (22, &["s390x", "s390"]),
];

/// Whether a file that starts with `head` can run on a guest whose `uname -m` is `machine`:
/// an ELF file of that machine (64-bit ppc by its byte order), or a script (`#!`).
pub fn check_runs_on(head: &[u8], machine: &str) -> Result<(), String> {
    if head.starts_with(b"#!") {
        return Ok(());
    }
    if head.len() < 20 || !head.starts_with(b"\x7fELF") {
        return Err("it is neither an ELF executable nor a script".to_string());
    }
    let number = match head[5] {
        2 => u16::from_be_bytes([head[18], head[19]]),
        _ => u16::from_le_bytes([head[18], head[19]]),
    };
    let runs = MACHINES
        .iter()
        .find(|(known, _)| *known == number)
        .is_some_and(|(_, names)| names.contains(&machine));
    let endian_ok = number != 21 || (machine == "ppc64le") == (head[5] == 1);
    if runs && endian_ok {
        Ok(())
    } else {
        Err(format!(
            "it is an ELF file for machine {number}, which a {machine} guest cannot run"
        ))
    }
}

/// `hyperjob doctor`'s line for `runner_binary`: readable, and an executable of some machine
/// (which one is said: guests of another machine do not get it).
pub fn doctor_check(path: &Path) -> crate::plugin::Check {
    use crate::plugin::Check;
    let what = format!("runner_binary {}", path.display());
    let mut head = Vec::with_capacity(64);
    let read = std::fs::File::open(path).and_then(|file| file.take(64).read_to_end(&mut head));
    if let Err(err) = read {
        return Check::fail(
            what,
            format!("cannot read it ({err}): point runner_binary at a gitlab-runner binary"),
        );
    }
    if head.starts_with(b"#!") {
        return Check::pass(format!(
            "{what}: a script, copied into guests without gitlab-runner"
        ));
    }
    let machine = (head.len() >= 20 && head.starts_with(b"\x7fELF")).then(|| match head[5] {
        2 => u16::from_be_bytes([head[18], head[19]]),
        _ => u16::from_le_bytes([head[18], head[19]]),
    });
    match machine.and_then(|number| MACHINES.iter().find(|(known, _)| *known == number)) {
        Some((_, names)) => Check::pass(format!(
            "{what}: an ELF executable for {}, copied into such guests without gitlab-runner",
            names[0]
        )),
        None => Check::fail(
            what,
            "is neither an ELF executable of a known machine nor a script: point runner_binary \
             at a gitlab-runner binary",
        ),
    }
}

/// What prepare needs to provide `gitlab-runner`.
#[allow(missing_debug_implementations)]
pub struct Provide<'a> {
    pub config: &'a Config,
    pub transport: &'a dyn Transport,
    pub endpoint: &'a Endpoint,
    /// The process that called hyperjob ([`crate::runner::current_runner`]).
    pub runner: Option<&'a ProcessIdentity>,
    pub progress: &'a dyn Progress,
    pub cancel: &'a AtomicBool,
}

impl Provide<'_> {
    /// Makes sure the guest has `gitlab-runner` on the stage scripts' `PATH`, copying it when
    /// it has none and there is one to copy. Returns the directory to append to the scripts'
    /// `PATH`, if one is needed. Only a failure to reach the guest is an error.
    pub fn provide(&self) -> anyhow::Result<Option<String>> {
        // Nothing to copy: not even the guest is asked.
        let (local, named) = match source(
            self.config.runner_binary.as_deref(),
            self.runner,
            Path::new("/proc"),
        ) {
            Ok(found) => found,
            Err(why) => {
                tracing::debug!("no {COMMAND} to offer the guest: {why}");
                return Ok(None);
            }
        };
        let answer = self
            .run("sh", PROBE)
            .context("cannot ask the guest for gitlab-runner")?;
        let (machine, home, writable) = match parse_probe(&answer).map_err(anyhow::Error::msg)? {
            GuestState::Found(path) => {
                tracing::debug!("the guest has {COMMAND} at {path}");
                return Ok(None);
            }
            GuestState::FoundInHome(dir) => return Ok(Some(dir)),
            GuestState::Missing {
                machine,
                home,
                writable,
            } => (machine, home, writable),
        };
        let cannot = |why: String| {
            self.progress.say(&format!(
                "The guest has no {COMMAND} and hyperjob cannot copy {named} into it: {why}. \
                 Artifacts and caches are disabled for this job."
            ));
            Ok(None)
        };
        let mut head = Vec::with_capacity(64);
        let read = std::fs::File::open(&local)
            .and_then(|file| file.take(64).read_to_end(&mut head))
            .with_context(|| format!("cannot read {}", local.display()));
        if let Err(err) = read {
            return cannot(format!("{err:#}"));
        }
        if let Err(why) = check_runs_on(&head, &machine) {
            return cannot(why);
        }
        let Some(target) = choose_target(home.as_deref(), &writable) else {
            return cannot(
                "the login user has no home and can write to no directory on PATH".into(),
            );
        };
        let size = std::fs::metadata(&local).map(|m| m.len()).unwrap_or(0);
        let started = Instant::now();
        let remote = target.path();
        let upload = Upload {
            local: &local,
            remote: &remote,
            mode: 0o755,
            cancel: self.cancel,
        };
        match self.transport.upload(self.endpoint, &upload) {
            Ok(()) => {}
            Err(PluginError::Unsupported(_)) => {
                return cannot(format!(
                    "the {} transport cannot copy files",
                    self.config.transport
                ))
            }
            Err(err) => {
                return Err(anyhow::Error::new(err)
                    .context(format!("cannot copy {named} to {remote} in the guest")))
            }
        }
        self.progress.say(&format!(
            "Copied {named} ({:.1} MB) to {remote} in the guest in {:.1} s{}",
            size as f64 / 1e6,
            started.elapsed().as_secs_f64(),
            if target.append_to_path {
                "; stage scripts get that directory on their PATH"
            } else {
                ""
            }
        ));
        Ok(target.append_to_path.then_some(target.dir))
    }

    /// Runs a short script in the guest and returns its stdout.
    fn run(&self, interpreter: &str, script: &[u8]) -> anyhow::Result<String> {
        let request = ScriptRequest {
            interpreter,
            script,
            cancel: self.cancel,
        };
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let exit = self
            .transport
            .run_script(self.endpoint, &request, &mut stdout, &mut stderr)?;
        if exit != RemoteExit::Code(0) {
            anyhow::bail!(
                "the guest's answer failed ({exit:?}): {}",
                String::from_utf8_lossy(&stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    }
}

/// [`Provide::provide`] for the job's VM, called by `runner` (the job log gets its lines).
pub fn provide_for_job(
    ctx: &crate::stages::StageContext<'_>,
    transport: &dyn Transport,
    endpoint: &Endpoint,
    runner: Option<&ProcessIdentity>,
) -> anyhow::Result<Option<String>> {
    Provide {
        config: ctx.config,
        transport,
        endpoint,
        runner,
        progress: &crate::progress::StdoutProgress,
        cancel: ctx.cancel,
    }
    .provide()
}

/// [`Provide::provide`] for a VM prepare claimed from the pool (whose record is saved
/// already): records the directory to append to the scripts' `PATH`, if one is needed.
pub fn provide_for_claimed(
    ctx: &crate::stages::StageContext<'_>,
    transport: &dyn Transport,
    endpoint: &Endpoint,
    store: &crate::state::StateStore,
) -> anyhow::Result<()> {
    let Some(mut state) = store.load(ctx.job.job_id)? else {
        anyhow::bail!("the job's record is gone");
    };
    let guest_path = provide_for_job(ctx, transport, endpoint, state.runner.as_ref())?;
    if guest_path.is_some() {
        state.guest_path = guest_path;
        store.save(&state)?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "guest_runner_tests.rs"]
mod tests;
