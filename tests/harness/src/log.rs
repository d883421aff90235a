//! The job log as the runner would build it (protocol §6): driver output
//! assembled into lines and tagged with stream and stage, plus the runner's
//! own messages; optionally echoed live to this process's stdout.

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use crate::invocation::Invocation;

/// Which log a line went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// Job log, "executor" stream (id 0): config_exec stderr, prepare_exec
    /// output, runner messages.
    Executor,
    /// Job log, "work" stream (id 1): run_exec output.
    Work,
    /// The runner's own log, never shown in the job log: cleanup_exec output
    /// and some warnings.
    RunnerLog,
}

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    Stdout,
    Stderr,
    /// Written by the runner (here: the harness) itself.
    Runner,
}

/// One line of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub stream: LogStream,
    pub kind: LineKind,
    /// Driver stage name for run_exec output (`build_script`), otherwise
    /// `config`, `prepare`, `cleanup` or `job`.
    pub stage: String,
    /// The text without its line terminator, exactly as the driver wrote it
    /// (not masked).
    pub text: String,
    /// False for a trailing partial line (output that ended without `\n`).
    pub complete: bool,
    pub at: Instant,
}

/// Replaces every masked value by `[MASKED]`, like the runner's masker.
pub fn mask(text: &str, secrets: &[String]) -> String {
    let mut masked = text.to_owned();
    for secret in secrets.iter().filter(|secret| !secret.is_empty()) {
        masked = masked.replace(secret.as_str(), "[MASKED]");
    }
    masked
}

/// Shared sink for lines and invocation records of one job.
#[derive(Debug)]
pub(crate) struct Recorder {
    echo: bool,
    lines: Mutex<Vec<LogLine>>,
    invocations: Mutex<Vec<Invocation>>,
    secrets: Mutex<Vec<String>>,
}

impl Recorder {
    pub(crate) fn new(echo: bool) -> Self {
        Self {
            echo,
            lines: Mutex::new(Vec::new()),
            invocations: Mutex::new(Vec::new()),
            secrets: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn set_secrets(&self, secrets: Vec<String>) {
        if let Ok(mut guard) = self.secrets.lock() {
            *guard = secrets;
        }
    }

    pub(crate) fn secrets(&self) -> Vec<String> {
        self.secrets
            .lock()
            .map(|guard| guard.clone())
            .unwrap_or_default()
    }

    pub(crate) fn push(&self, line: LogLine) {
        let Ok(mut lines) = self.lines.lock() else {
            return;
        };
        if self.echo {
            let text = mask(&line.text, &self.secrets());
            let mut stdout = std::io::stdout().lock();
            // The demo's console is best effort: a closed stdout must not
            // break the job.
            let _ = match line.stream {
                LogStream::RunnerLog => writeln!(stdout, "[runner log] {text}"),
                LogStream::Executor | LogStream::Work => writeln!(stdout, "{text}"),
            };
            let _ = stdout.flush();
        }
        lines.push(line);
    }

    pub(crate) fn output(
        &self,
        stream: LogStream,
        kind: LineKind,
        stage: &str,
        text: String,
        complete: bool,
    ) {
        self.push(LogLine {
            stream,
            kind,
            stage: stage.to_owned(),
            text,
            complete,
            at: Instant::now(),
        });
    }

    /// A message of the runner in the job log.
    pub(crate) fn runner(&self, stage: &str, text: &str) {
        self.output(
            LogStream::Executor,
            LineKind::Runner,
            stage,
            text.to_owned(),
            true,
        );
    }

    pub(crate) fn runner_warning(&self, stage: &str, text: &str) {
        self.runner(stage, &format!("WARNING: {text}"));
    }

    /// A message only in the runner's own log.
    pub(crate) fn runner_log(&self, stage: &str, text: &str) {
        self.output(
            LogStream::RunnerLog,
            LineKind::Runner,
            stage,
            text.to_owned(),
            true,
        );
    }

    pub(crate) fn record(&self, invocation: Invocation) {
        if let Ok(mut invocations) = self.invocations.lock() {
            invocations.push(invocation);
        }
    }

    pub(crate) fn lines(&self) -> Vec<LogLine> {
        self.lines
            .lock()
            .map(|guard| guard.clone())
            .unwrap_or_default()
    }

    /// Whether a line of `stage` that arrived at or after `since` contains
    /// `needle` (`stage` `None`: any stage).
    pub(crate) fn has_line(&self, stage: Option<&str>, since: Instant, needle: &str) -> bool {
        let Ok(lines) = self.lines.lock() else {
            return false;
        };
        lines.iter().any(|line| {
            line.at >= since
                && stage.is_none_or(|stage| line.stage == stage)
                && line.text.contains(needle)
        })
    }

    pub(crate) fn invocations(&self) -> Vec<Invocation> {
        self.invocations
            .lock()
            .map(|guard| guard.clone())
            .unwrap_or_default()
    }
}

/// Splits a byte stream into lines; keeps an unterminated tail.
#[derive(Debug, Default)]
pub(crate) struct LineAssembler {
    pending: Vec<u8>,
}

impl LineAssembler {
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(newline) = self.pending.iter().position(|byte| *byte == b'\n') {
            let rest = self.pending.split_off(newline + 1);
            let mut line = std::mem::replace(&mut self.pending, rest);
            line.pop();
            lines.push(String::from_utf8_lossy(&line).into_owned());
        }
        lines
    }

    pub(crate) fn finish(self) -> Option<String> {
        (!self.pending.is_empty()).then(|| String::from_utf8_lossy(&self.pending).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembler_joins_lines_split_across_chunks_and_keeps_partial_tail() {
        let mut assembler = LineAssembler::default();

        let mut lines = assembler.feed(b"hel");
        lines.extend(assembler.feed(b"lo\nwor"));
        lines.extend(assembler.feed(b"ld\nprogress 50%"));
        let tail = assembler.finish();

        assert_eq!(lines, vec!["hello", "world"]);
        assert_eq!(tail.as_deref(), Some("progress 50%"));
    }

    #[test]
    fn mask_replaces_every_occurrence_of_each_secret() {
        let secrets = vec!["s3cr3t-value".to_owned()];

        let masked = mask("a s3cr3t-value b s3cr3t-value", &secrets);

        assert_eq!(masked, "a [MASKED] b [MASKED]");
    }
}
