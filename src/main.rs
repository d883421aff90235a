//! The `hyperjob` binary: GitLab Runner's Custom executor calls it once per stage
//! (`config`, `prepare`, `run <script> <stage>`, `cleanup`). It parses the command line,
//! installs signal handling and hands over to `hyperjob_core::stages`; the exit code is decided
//! in one place, `hyperjob_core::exit::finish`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hyperjob_core::config::{self, Config};
use hyperjob_core::exit::{self, StageOutcome};
use hyperjob_core::job::JobIdentity;
use hyperjob_core::registry::Registry;
use hyperjob_core::stages::{self, StageContext};

/// Plugin libraries allocate what hyperjob frees and the other way round: both sides use the
/// system allocator (`export_plugin!` installs it in every plugin; plugin headers say
/// `hyperjob_core::abi::ALLOCATOR`). A dependency that sets another one fails this build.
#[global_allocator]
static ALLOCATOR: std::alloc::System = std::alloc::System;

// Built-in plugins register themselves with `inventory`; naming the crates keeps the linker
// from dropping those registrations.
use hyperjob_backend_libvirt as _;
use hyperjob_transport_ssh as _;

mod logging;

#[derive(Debug, Parser)]
#[command(
    name = "hyperjob",
    version,
    about = "GitLab Runner Custom executor driver: every CI job in a fresh, throw-away VM",
    long_about = None
)]
struct Cli {
    /// Config file [default: $HYPERJOB_CONFIG, else /etc/hyperjob/config.toml]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// config_exec: print the driver's JSON settings for the runner
    Config,
    /// prepare_exec: create the job's VM and wait until it is reachable
    Prepare,
    /// run_exec: run one stage script inside the job's VM
    Run {
        /// The script file the runner generated
        script: PathBuf,
        /// The stage name (prepare_script, get_sources, build_script, step_*, ...)
        stage: String,
    },
    /// cleanup_exec: destroy the job's VM, disk and state (idempotent)
    Cleanup,
    /// List every registered backend and transport: name, kind, version, origin
    Plugins,
    /// Remove what jobs left behind: VMs past their deadline, and jobs whose VM is gone
    Gc {
        /// Only report what would be removed
        #[arg(long)]
        dry_run: bool,
    },
    /// Check everything hyperjob needs on this host, one line each (exit 1 on any ✗)
    Doctor {
        /// Also boot one VM from the configured image, check its host key and log in
        #[arg(long)]
        boot: bool,
        /// GitLab Runner's config file, checked when it exists
        #[arg(long, value_name = "PATH", default_value = hyperjob_core::doctor::RUNNER_CONFIG)]
        runner_config: PathBuf,
    },
    /// Drive the selected backend and transport through the plugin contract on one real VM,
    /// one line per clause (exit 1 on any ✗); the VM is destroyed on every path
    #[command(name = "plugin-check")]
    PluginCheck,
    /// The warm pool of VMs booted ahead ([pool] in the config)
    Pool {
        #[command(subcommand)]
        action: PoolAction,
    },
    /// VMs of failed jobs kept for debugging ([debug_hold] in the config)
    Hold {
        #[command(subcommand)]
        action: HoldAction,
    },
    /// The rest of a cleanup: what `cleanup` starts in the background after halting the VM
    #[command(name = "finish-cleanup", hide = true)]
    FinishCleanup {
        /// The job whose VM cleanup halted
        job_id: u64,
    },
    /// A job's relay: one connection to its VM for all its stages (prepare starts it)
    #[command(hide = true)]
    Relay {
        /// The job id prepare read from JOB_RESPONSE_FILE
        job: u64,
    },
}

#[derive(Debug, Subcommand)]
enum HoldAction {
    /// Show every hold: job, VM, state, until when (UTC) and the command that reaches the VM
    List,
    /// End a hold now: destroy the held VM and the job's state
    Release {
        /// The job whose VM is held
        job_id: u64,
    },
}

#[derive(Debug, Subcommand)]
enum PoolAction {
    /// Show the pool's size and every pooled VM
    Status,
    /// Boot pooled VMs until pool.size are ready (removing stale ones first); then return
    Fill {
        /// Report to <state_dir>/pool/fill.log instead of stdout (how prepare starts it)
        #[arg(long, hide = true)]
        background: bool,
    },
    /// Destroy every pooled VM no job has claimed
    Drain,
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Config => "config",
            Command::Prepare => "prepare",
            Command::Run { .. } => "run",
            Command::Cleanup => "cleanup",
            Command::Gc { .. } => "gc",
            Command::Pool { .. } => "pool",
            Command::Hold { .. } => "hold",
            Command::Doctor { .. } => "doctor",
            Command::FinishCleanup { .. } => "finish-cleanup",
            Command::Plugins => "plugins",
            Command::PluginCheck => "plugin-check",
            Command::Relay { .. } => "relay",
        }
    }
}

fn main() -> ExitCode {
    // First of all: a signal that comes before the handlers are in place kills the process
    // instead of stopping the stage.
    let cancel = install_signal_handlers();
    let cli = Cli::parse();
    logging::init(matches!(cli.command, Command::Relay { .. }));
    let result = match run(&cli, &cancel) {
        // A stopped script is the runner's doing, never a build failure.
        Ok(StageOutcome::ScriptFailed { exit_code }) if cancel.load(Ordering::Relaxed) => Err(
            anyhow::anyhow!("interrupted by a signal (the script exited with {exit_code})"),
        ),
        other => other,
    };
    exit::finish(cli.command.name(), result)
}

fn run(cli: &Cli, cancel: &AtomicBool) -> anyhow::Result<StageOutcome> {
    let started = std::time::Instant::now();
    let config_path = config::resolve_path(cli.config.as_deref());
    if let Command::Doctor {
        boot,
        runner_config,
    } = &cli.command
    {
        // The doctor reports a broken config as one of its lines, so it loads it itself.
        let options = hyperjob_core::doctor::Options {
            config_path,
            runner_config: runner_config.clone(),
            boot: *boot,
        };
        return hyperjob_core::doctor::doctor(
            &options,
            |config| Ok(Registry::load(config)?),
            cancel,
            &mut std::io::stdout(),
        );
    }
    let config = Config::load(&config_path)?;
    if let Command::Plugins = cli.command {
        print_plugins(&hyperjob_core::discovery::survey(&config)?)?;
        return Ok(StageOutcome::Success);
    }
    if let Command::PluginCheck = cli.command {
        // Serves no job (no JOB_RESPONSE_FILE): the default image's tables.
        let config = config.for_image(None)?;
        let registry = Registry::load(&config)?;
        return hyperjob_core::plugin_check::plugin_check(
            &config,
            &registry,
            cancel,
            &mut std::io::stdout(),
        );
    }
    // Only the selected plugins are loaded: nothing wrong with another plugin file can fail
    // or slow a stage.
    let registry = Registry::load(&config)?;
    if let Command::Gc { dry_run } = cli.command {
        // gc serves the whole host, not one job: no JOB_RESPONSE_FILE.
        return hyperjob_core::gc::gc(&config, &registry, dry_run, &mut std::io::stdout());
    }
    if let Command::FinishCleanup { job_id } = cli.command {
        // Started by cleanup, which has the job id from JOB_RESPONSE_FILE (gone by now).
        return hyperjob_core::teardown::finish(&config, &registry, job_id);
    }
    if let Command::Hold { action } = &cli.command {
        // Holds outlive their jobs: no JOB_RESPONSE_FILE.
        let mut out = std::io::stdout();
        return match action {
            HoldAction::List => hyperjob_core::hold::list(&config, &mut out),
            HoldAction::Release { job_id } => {
                hyperjob_core::hold::release(&config, &registry, *job_id, &mut out)
            }
        };
    }
    if let Command::Pool { action } = &cli.command {
        // The pool serves the whole installation, not one job: no JOB_RESPONSE_FILE.
        return pool(action, &config, &registry, cancel);
    }
    if let Command::Relay { job } = cli.command {
        // Started by prepare, with the job id prepare trusted, and without the job's
        // environment; it serves the job with the image's settings the job's stages use.
        let config = job_config(&config, &cli.command, job)?;
        return hyperjob_core::relay::serve(&config, &registry, job, cancel);
    }
    let job = JobIdentity::from_env()?;
    let config = job_config(&config, &cli.command, job.job_id)?;
    let ctx = StageContext {
        config: &config,
        registry: &registry,
        job: &job,
        cancel,
        script_seconds: std::cell::Cell::new(None),
    };
    let result = match &cli.command {
        Command::Config => {
            let document = stages::config(&ctx)?;
            let mut stdout = std::io::stdout().lock();
            serde_json::to_writer(&mut stdout, &document)
                .context("cannot write the config JSON")?;
            stdout.flush().context("cannot write the config JSON")?;
            Ok(StageOutcome::Success)
        }
        Command::Prepare => stages::prepare(&ctx),
        Command::Run { script, stage } => stages::run(&ctx, script, stage),
        Command::Cleanup => stages::cleanup(&ctx),
        Command::Gc { .. }
        | Command::Plugins
        | Command::PluginCheck
        | Command::Pool { .. }
        | Command::Hold { .. }
        | Command::Doctor { .. }
        | Command::FinishCleanup { .. }
        | Command::Relay { .. } => {
            anyhow::bail!("not a job stage")
        }
    };
    if matches!(
        cli.command,
        Command::Prepare | Command::Run { .. } | Command::Cleanup
    ) {
        let overhead = ctx
            .script_seconds
            .get()
            .map(|script| (started.elapsed().as_secs_f64() - script).max(0.0));
        hyperjob_core::metrics::stage_finished(
            &config,
            job.job_id,
            cli.command.name(),
            &result,
            cancel.load(Ordering::Relaxed),
            overhead,
        );
    }
    result
}

/// The config for this job: its image's tables merged in (`[images]`), and at prepare its
/// resource requests. prepare reads the job's choice from the runner's variables; the later
/// stages read what prepare recorded, so a job keeps its image to the end.
fn job_config(config: &Config, command: &Command, job_id: u64) -> anyhow::Result<Config> {
    use hyperjob_core::images::{JOB_IMAGE_ENV, MEMORY_ENV, VCPUS_ENV};
    let var = |name: &str| std::env::var(name).ok();
    match command {
        Command::Prepare => Ok(config
            .for_image(var(JOB_IMAGE_ENV).as_deref())?
            .with_resources(var(VCPUS_ENV).as_deref(), var(MEMORY_ENV).as_deref())?),
        Command::Run { .. } | Command::Cleanup | Command::Relay { .. } => {
            let recorded = hyperjob_core::state::StateStore::new(&config.state_dir)
                .load(job_id)
                .ok()
                .flatten()
                .and_then(|state| state.image);
            match config.for_image(recorded.as_deref()) {
                Ok(config) => Ok(config),
                // The image left the config since prepare: its VM is still removed by name.
                Err(err) if matches!(command, Command::Cleanup) => {
                    tracing::warn!("{err}; cleaning up with the default image's settings");
                    Ok(config.for_image(None)?)
                }
                Err(err) => Err(err.into()),
            }
        }
        _ => Ok(config.clone()),
    }
}

/// `hyperjob pool status | fill | drain`.
fn pool(
    action: &PoolAction,
    config: &Config,
    registry: &Registry,
    cancel: &AtomicBool,
) -> anyhow::Result<StageOutcome> {
    use hyperjob_core::pool;
    match action {
        PoolAction::Status => pool::status(config, registry, &mut std::io::stdout()),
        PoolAction::Drain => pool::drain(config, registry, &mut std::io::stdout()),
        PoolAction::Fill { background: false } => {
            pool::fill_all(config, registry, cancel, &mut std::io::stdout())
        }
        PoolAction::Fill { background: true } => {
            let path = pool::PoolDir::new(&config.state_dir).log_path();
            let mut log = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            let result = pool::fill_all(config, registry, cancel, &mut log);
            if let Err(err) = &result {
                let _ = writeln!(log, "fill failed: {err:#}");
            }
            result
        }
    }
}

/// `hyperjob plugins`: one line per plugin, then every plugin file that was refused, and why.
fn print_plugins(survey: &hyperjob_core::discovery::Survey) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<10} {:<12} {:<10} ORIGIN",
        "KIND", "NAME", "VERSION"
    )?;
    for plugin in &survey.plugins {
        writeln!(
            out,
            "{:<10} {:<12} {:<10} {}",
            plugin.kind.to_string(),
            plugin.name,
            plugin.version,
            plugin.origin
        )?;
    }
    if !survey.refused.is_empty() {
        writeln!(out, "\nREFUSED (no stage uses these)")?;
        for refused in &survey.refused {
            writeln!(out, "{}", refused.reason)?;
        }
    }
    Ok(())
}

/// How long a stage may take to stop after the first SIGTERM/SIGINT before the process ends
/// anyway, with `SYSTEM_FAILURE_EXIT_CODE`: GitLab Runner's own limit on a forced shutdown
/// (`ShutdownTimeout`, 30 s), after which it exits itself. A normal stop takes a few seconds;
/// what an interrupted teardown leaves is recorded in the job's state for `cleanup` and `gc`.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// SIGTERM and SIGINT ask the running stage to stop cleanly; further ones change nothing (a
/// `systemctl stop` delivers two SIGTERMs at once, systemd's and the runner's, and neither may
/// cut the remote kill or the teardown short). The stop is bounded by [`STOP_DEADLINE`]; the
/// hard stop is SIGKILL (the runner's after `graceful_kill_timeout`, systemd's after
/// `TimeoutStopSec`). SIGQUIT is GitLab Runner's graceful stop ("finish the jobs you have"),
/// which systemd also delivers to every process of the runner's unit: the stage goes on.
fn install_signal_handlers() -> Arc<AtomicBool> {
    use signal_hook::consts::{SIGINT, SIGQUIT, SIGTERM};
    let cancel = Arc::new(AtomicBool::new(false));
    // A handler that only sets a flag nobody reads: SIGQUIT neither kills nor stops anything.
    let _ = signal_hook::flag::register(SIGQUIT, Arc::new(AtomicBool::new(false)));
    for signal in [SIGTERM, SIGINT] {
        // Set in the handler itself, so the stage sees the request at once. Registration only
        // fails for forbidden signals, which these are not.
        let _ = signal_hook::flag::register(signal, Arc::clone(&cancel));
    }
    let status = i32::from(hyperjob_core::job::ExitCodes::from_env().system_failure);
    // The watcher thread blocks no signal: it takes those the stage's thread defers while a
    // blocking call must not be cut short (the SSH transport does so).
    if let Ok(signals) = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        std::thread::spawn(move || watch_stop(signals, status));
    }
    cancel
}

/// Logs the stop request, absorbs repeated ones, and ends the process if the stage has not
/// finished [`STOP_DEADLINE`] after the first.
fn watch_stop(mut signals: signal_hook::iterator::Signals, status: i32) {
    let name = |signal: i32| {
        if signal == signal_hook::consts::SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        }
    };
    let mut received = signals.forever();
    let Some(first) = received.next() else {
        return;
    };
    tracing::info!("received {}: stopping the stage", name(first));
    std::thread::spawn(move || {
        std::thread::sleep(STOP_DEADLINE);
        tracing::warn!(
            "the stage did not stop within {} s of the signal; exiting (cleanup or gc removes what is left)",
            STOP_DEADLINE.as_secs()
        );
        // `_exit`: no atexit handlers run while the main thread may be inside libvirt or
        // libssh2.
        signal_hook::low_level::exit(status);
    });
    for again in received {
        tracing::info!(
            "received {} again: the stop is already under way",
            name(again)
        );
    }
}
