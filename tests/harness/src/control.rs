//! Cancellation and deadlines: a small stand-in for Go's `context.Context`
//! tree the runner uses (job → prepare / script / after_script / get_sources),
//! and the handle tests use to cancel or abort a running job.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a scope ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Cancelled (UI/API cancel, abort).
    Canceled,
    /// A deadline passed (a timeout).
    DeadlineExceeded,
}

/// Which kind of cancellation a test asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelKind {
    /// GitLab's graceful cancel (job state `canceling`): during user steps it
    /// stops only the current step, so after_script and the clean-up stages
    /// still run; before the steps it stops the whole job.
    Cancel,
    /// Hard abort (job state `canceled`/`failed`): stops the job; only
    /// cleanup_exec runs afterwards.
    Abort,
}

/// "Cancel the job once the invocation for `stage` has run for `after` and,
/// when `after_output` is set, has printed a line containing that text".
/// `stage` is the name a driver sees: a run_exec stage (`build_script`,
/// `get_sources`, …), or `config` / `prepare` for config_exec / prepare_exec.
/// Prefer [`CancelPlan::on_output`]: a line the stage prints once its signal
/// handling is in place is a condition, a duration only a guess.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelPlan {
    pub stage: String,
    pub after: Duration,
    pub after_output: Option<String>,
    pub kind: CancelKind,
}

impl CancelPlan {
    /// Cancels once the invocation for `stage` has run for `after`.
    pub fn after(stage: &str, after: Duration, kind: CancelKind) -> Self {
        Self {
            stage: stage.to_owned(),
            after,
            after_output: None,
            kind,
        }
    }

    /// Cancels as soon as the invocation for `stage` printed a line (stdout
    /// or stderr) containing `text`.
    pub fn on_output(stage: &str, text: &str, kind: CancelKind) -> Self {
        Self {
            stage: stage.to_owned(),
            after: Duration::ZERO,
            after_output: Some(text.to_owned()),
            kind,
        }
    }
}

#[derive(Debug)]
struct ScopeInner {
    name: &'static str,
    deadline: Option<Instant>,
    canceled: AtomicBool,
    parent: Option<Scope>,
}

/// A node of the context tree: done when cancelled, past its deadline, or
/// when an ancestor is done.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    inner: Arc<ScopeInner>,
}

impl Scope {
    pub(crate) fn root(name: &'static str, timeout: Option<Duration>) -> Self {
        Self {
            inner: Arc::new(ScopeInner {
                name,
                deadline: timeout.map(|timeout| Instant::now() + timeout),
                canceled: AtomicBool::new(false),
                parent: None,
            }),
        }
    }

    pub(crate) fn child(&self, name: &'static str, timeout: Option<Duration>) -> Self {
        Self {
            inner: Arc::new(ScopeInner {
                name,
                deadline: timeout.map(|timeout| Instant::now() + timeout),
                canceled: AtomicBool::new(false),
                parent: Some(self.clone()),
            }),
        }
    }

    pub(crate) fn cancel(&self) {
        self.inner.canceled.store(true, Ordering::SeqCst);
    }

    /// Why and where (scope name) this scope is done, ancestors first.
    pub(crate) fn done(&self) -> Option<(StopReason, &'static str)> {
        if let Some(parent) = &self.inner.parent {
            if let Some(done) = parent.done() {
                return Some(done);
            }
        }
        if self.inner.canceled.load(Ordering::SeqCst) {
            return Some((StopReason::Canceled, self.inner.name));
        }
        match self.inner.deadline {
            Some(deadline) if Instant::now() >= deadline => {
                Some((StopReason::DeadlineExceeded, self.inner.name))
            }
            _ => None,
        }
    }

    /// Sleeps up to `duration`; returns early (false) when the scope ends.
    pub(crate) fn sleep(&self, duration: Duration) -> bool {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            if self.done().is_some() {
                return false;
            }
            std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
        }
        true
    }
}

pub(crate) const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
struct HandleState {
    job: Option<Scope>,
    graceful_target: Option<Scope>,
    pending: Option<CancelKind>,
}

/// Cancels or aborts a job run by [`crate::run_job_with`] from another
/// thread. One handle per job.
#[derive(Debug, Clone, Default)]
pub struct CancelHandle {
    state: Arc<Mutex<HandleState>>,
}

impl CancelHandle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Graceful cancel (see [`CancelKind::Cancel`]).
    pub fn cancel(&self) {
        self.trigger(CancelKind::Cancel);
    }

    /// Hard abort (see [`CancelKind::Abort`]).
    pub fn abort(&self) {
        self.trigger(CancelKind::Abort);
    }

    pub fn trigger(&self, kind: CancelKind) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let target = match kind {
            CancelKind::Cancel => state.graceful_target.clone(),
            CancelKind::Abort => state.job.clone(),
        };
        match target {
            Some(scope) => scope.cancel(),
            None => state.pending = Some(kind),
        }
    }

    /// The job scope exists: graceful cancel targets it until user steps start.
    pub(crate) fn attach_job(&self, job: &Scope) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.job = Some(job.clone());
        state.graceful_target = Some(job.clone());
        if state.pending.take().is_some() {
            job.cancel();
        }
    }

    /// User steps started: graceful cancel now only stops the script scope
    /// (the runner's `trace.SetCancelFunc(cancel)`).
    pub(crate) fn attach_script(&self, script: &Scope) {
        if let Ok(mut state) = self.state.lock() {
            state.graceful_target = Some(script.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_is_done_when_parent_is_cancelled() {
        let job = Scope::root("job", None);
        let script = job.child("script", None);

        job.cancel();

        assert_eq!(script.done(), Some((StopReason::Canceled, "job")));
    }

    #[test]
    fn cancelling_child_leaves_parent_running() {
        let job = Scope::root("job", None);
        let script = job.child("script", None);

        script.cancel();

        assert_eq!(job.done(), None);
        assert_eq!(script.done(), Some((StopReason::Canceled, "script")));
    }

    #[test]
    fn scope_past_deadline_reports_deadline_exceeded() {
        let job = Scope::root("job", Some(Duration::ZERO));

        assert_eq!(job.done(), Some((StopReason::DeadlineExceeded, "job")));
    }

    #[test]
    fn graceful_cancel_after_steps_start_targets_only_the_script_scope() {
        let handle = CancelHandle::new();
        let job = Scope::root("job", None);
        let script = job.child("script", None);
        handle.attach_job(&job);
        handle.attach_script(&script);

        handle.cancel();

        assert_eq!(job.done(), None);
        assert!(script.done().is_some());
    }

    #[test]
    fn cancel_requested_before_the_job_starts_applies_on_attach() {
        let handle = CancelHandle::new();
        let job = Scope::root("job", None);

        handle.abort();
        handle.attach_job(&job);

        assert_eq!(job.done(), Some((StopReason::Canceled, "job")));
    }
}
