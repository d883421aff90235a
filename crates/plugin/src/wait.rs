//! Helpers for bounded plugin work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Whether work may go on: an [`Interrupted`](crate::PluginError::Interrupted) error once
/// `cancel` is set, a [`Timeout`](crate::PluginError::Timeout) once `deadline` has passed
/// (`what` says what was being done, "creating VM x"). For the steps of a bounded operation
/// that does not wait itself (`Backend::create`).
pub fn still_wanted(
    what: &str,
    started: Instant,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<(), crate::PluginError> {
    if cancel.load(Ordering::Relaxed) {
        return Err(crate::PluginError::Interrupted(what.to_string()));
    }
    if Instant::now() >= deadline {
        return Err(crate::PluginError::Timeout {
            what: what.to_string(),
            secs: deadline.saturating_duration_since(started).as_secs(),
        });
    }
    Ok(())
}
