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

// Built-in plugins register themselves with `inventory`; naming the crates keeps the linker
// from dropping those registrations.
use hyperjob_backend_libvirt as _;
use hyperjob_transport_ssh as _;

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
    /// The warm pool of VMs booted ahead ([pool] in the config)
    Pool {
        #[command(subcommand)]
        action: PoolAction,
    },
    /// A job's relay: one connection to its VM for all its stages (prepare starts it)
    #[command(hide = true)]
    Relay {
        /// The job id prepare read from JOB_RESPONSE_FILE
        job: u64,
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
            Command::Plugins => "plugins",
            Command::Relay { .. } => "relay",
        }
    }
}

fn main() -> ExitCode {
    // First of all: a signal that comes before the handlers are in place kills the process
    // instead of stopping the stage.
    let cancel = install_signal_handlers();
    let cli = Cli::parse();
    init_logging(matches!(cli.command, Command::Relay { .. }));
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
    let config_path = config::resolve_path(cli.config.as_deref());
    let config = Config::load(&config_path)?;
    let registry = Registry::load(&config)?;
    if let Command::Plugins = cli.command {
        print_plugins(&registry)?;
        return Ok(StageOutcome::Success);
    }
    if let Command::Gc { dry_run } = cli.command {
        // gc serves the whole host, not one job: no JOB_RESPONSE_FILE.
        return hyperjob_core::gc::gc(&config, &registry, dry_run, &mut std::io::stdout());
    }
    if let Command::Pool { action } = &cli.command {
        // The pool serves the whole installation, not one job: no JOB_RESPONSE_FILE.
        return pool(action, &config, &registry, cancel);
    }
    if let Command::Relay { job } = cli.command {
        // Started by prepare, with the job id prepare trusted, and without the job's
        // environment.
        return hyperjob_core::relay::serve(&config, &registry, job, cancel);
    }
    let job = JobIdentity::from_env()?;
    let ctx = StageContext {
        config: &config,
        registry: &registry,
        job: &job,
        cancel,
    };
    match &cli.command {
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
        Command::Gc { .. } | Command::Plugins | Command::Pool { .. } | Command::Relay { .. } => {
            anyhow::bail!("not a job stage")
        }
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
            pool::fill(config, registry, cancel, &mut std::io::stdout())
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
            let result = pool::fill(config, registry, cancel, &mut log);
            if let Err(err) = &result {
                let _ = writeln!(log, "fill failed: {err:#}");
            }
            result
        }
    }
}

/// `hyperjob plugins`: one line per plugin.
fn print_plugins(registry: &Registry) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<10} {:<12} {:<10} ORIGIN",
        "KIND", "NAME", "VERSION"
    )?;
    for entry in registry.backends() {
        writeln!(
            out,
            "{:<10} {:<12} {:<10} {}",
            "backend", entry.name, entry.version, entry.origin
        )?;
    }
    for entry in registry.transports() {
        writeln!(
            out,
            "{:<10} {:<12} {:<10} {}",
            "transport", entry.name, entry.version, entry.origin
        )?;
    }
    Ok(())
}

/// Logs go to stderr (the job log for prepare and run), a relay's to the job log of the stage
/// it serves; `HYPERJOB_LOG` sets the filter.
fn init_logging(relay: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HYPERJOB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .without_time();
    if relay {
        logs.with_writer(hyperjob_core::relay::log_writer).init();
    } else {
        logs.with_writer(std::io::stderr).init();
    }
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
