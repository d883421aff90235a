//! Progress lines for the job log ("Creating VM …", "Guest ready …").
//!
//! prepare_exec's stdout goes to the job log, so progress is written there, one flushed line at
//! a time so it shows up live.

use std::io::Write;

use crate::plugin::Progress;

/// Writes progress lines to stdout.
#[derive(Debug, Default)]
pub struct StdoutProgress;

impl Progress for StdoutProgress {
    fn say(&self, message: &str) {
        let mut out = std::io::stdout().lock();
        // A job log we cannot write to is not a reason to fail the job.
        let _ = writeln!(out, "{message}");
        let _ = out.flush();
    }
}
