//! The record of one driver invocation.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::control::StopReason;
use crate::exit::{ExitInfo, InvocationError};

/// Which executable of `[runners.custom]` was called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvocationKind {
    Config,
    Prepare,
    /// run_exec with this stage name (as the driver sees it, `build_script`).
    Run {
        stage: String,
    },
    Cleanup,
}

impl InvocationKind {
    /// `config`, `prepare`, `cleanup`, or the run stage name.
    pub fn label(&self) -> &str {
        match self {
            Self::Config => "config",
            Self::Prepare => "prepare",
            Self::Run { stage } => stage,
            Self::Cleanup => "cleanup",
        }
    }
}

/// Why the harness signalled the process group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    pub reason: StopReason,
    /// The scope that ended: `job`, `prepare`, `script`, `invocation`, …
    pub scope: String,
    /// SIGKILL followed SIGTERM because the graceful timeout passed.
    pub sent_sigkill: bool,
}

/// One call of a driver executable.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    pub kind: InvocationKind,
    /// Preparation attempt (1-based) this invocation belongs to.
    pub attempt: u32,
    /// Program followed by its arguments.
    pub argv: Vec<String>,
    /// The per-attempt temp dir (cwd and `TMPDIR`).
    pub temp_dir: PathBuf,
    /// For run_exec: the script that was written to `argv[-2]`.
    pub script: Option<String>,
    /// What the runner added to its own environment: fixed variables,
    /// `job_env`, then `CUSTOM_ENV_*` (order as passed, last wins).
    pub added_env: Vec<(String, String)>,
    pub exit: ExitInfo,
    /// The runner's error for this exit (§4.1), `None` on success.
    pub error: Option<InvocationError>,
    pub termination: Option<Termination>,
    pub started: Instant,
    pub ended: Instant,
    pub duration: Duration,
}

impl Invocation {
    /// The value of an added variable (last occurrence).
    pub fn env(&self, key: &str) -> Option<&str> {
        self.added_env
            .iter()
            .rev()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }

    pub fn succeeded(&self) -> bool {
        self.error.is_none()
    }
}
