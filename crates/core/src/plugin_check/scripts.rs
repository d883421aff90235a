//! The transport's clauses of `hyperjob plugin-check`: a script's exit code and its two
//! streams, the cancellation of a running script (its processes in the guest must go), and the
//! optional one connection for many scripts.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{judge, Checker, Verdict};
use crate::plugin::{Endpoint, RemoteExit, ScriptRequest};

/// What the script prints on stdout, and on stderr, before it exits with [`EXIT_CODE`].
const STDOUT_TEXT: &str = "hyperjob plugin-check: stdout\n";
const STDERR_TEXT: &str = "hyperjob plugin-check: stderr\n";
const EXIT_CODE: i32 = 7;
const SCRIPT: &str = "printf '%s\\n' 'hyperjob plugin-check: stdout'\n\
                      printf '%s\\n' 'hyperjob plugin-check: stderr' >&2\n\
                      exit 7\n";

/// The line the cancellation script prints once it runs: its shell's pid and its child's.
const PIDS_MARKER: &str = "hyperjob-plugin-check-pids";
/// Printed only if the cancellation script was not stopped.
const NOT_STOPPED: &str = "hyperjob-plugin-check-not-stopped";
/// A script that runs (a shell and a child) until it is stopped, or for two minutes.
const CANCEL_SCRIPT: &str = "sleep 120 &\n\
                             echo \"hyperjob-plugin-check-pids $$ $!\"\n\
                             wait\n\
                             echo hyperjob-plugin-check-not-stopped\n";
/// How long the guest's processes may take to go after a cancel, in seconds.
const GONE_WITHIN_SECS: u32 = 30;
/// A shell function: `gone PID` succeeds once the process has ended (it is gone, or a zombie
/// nobody reaped yet: a guest whose init is a script may never reap orphans).
const GONE_FN: &str = "gone() { s=$(cat /proc/$1/stat 2>/dev/null) || return 0; \
                       case \"$s\" in *\") Z \"*) return 0;; esac; return 1; }\n";

/// A script in each interpreter: its exact exit code and exactly its stdout and its stderr.
pub(super) fn script(check: &mut Checker<'_>, endpoint: &Endpoint) -> std::io::Result<()> {
    for interpreter in ["bash", "sh"] {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let request = ScriptRequest {
            interpreter,
            script: SCRIPT.as_bytes(),
            cancel: check.cancel,
        };
        let result = check
            .transport
            .run_script(endpoint, &request, &mut stdout, &mut stderr);
        let verdict = judge(result, |exit| expect_script(&exit, &stdout, &stderr));
        check.say(&format!("run_script ({interpreter})"), verdict)?;
    }
    Ok(())
}

/// What [`SCRIPT`] must have done.
fn expect_script(exit: &RemoteExit, stdout: &[u8], stderr: &[u8]) -> Result<String, String> {
    if *exit != RemoteExit::Code(EXIT_CODE) {
        return Err(format!(
            "the script ended with {exit:?}, not Code({EXIT_CODE})"
        ));
    }
    let (stdout, stderr) = (
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr),
    );
    if stdout != STDOUT_TEXT || stderr != STDERR_TEXT {
        return Err(format!(
            "stdout was {stdout:?} and stderr {stderr:?}; expected {STDOUT_TEXT:?} and \
             {STDERR_TEXT:?}, each on its own stream"
        ));
    }
    Ok(format!(
        "exit code {EXIT_CODE}, stdout and stderr exact and apart"
    ))
}

/// Takes a running script's stdout and cancels it once it reported its pids.
struct CancelOnPids<'a> {
    stdout: Vec<u8>,
    pids: Option<String>,
    cancel: &'a AtomicBool,
    cancelled_at: Option<Instant>,
}

impl Write for CancelOnPids<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.stdout.extend_from_slice(data);
        if self.pids.is_none() {
            let text = String::from_utf8_lossy(&self.stdout);
            let line = text
                .split_inclusive('\n')
                .find(|line| line.starts_with(PIDS_MARKER) && line.ends_with('\n'));
            if let Some(line) = line {
                let pids = line[PIDS_MARKER.len()..].trim().to_string();
                // Only digits and spaces reach the guest's shell again.
                if !pids.is_empty() && pids.chars().all(|c| c.is_ascii_digit() || c == ' ') {
                    self.pids = Some(pids);
                    self.cancelled_at = Some(Instant::now());
                    self.cancel.store(true, Ordering::Relaxed);
                }
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A running script is cancelled: run_script returns before the script would have ended, and
/// the script's processes in the guest are gone.
pub(super) fn cancel(check: &mut Checker<'_>, endpoint: &Endpoint) -> std::io::Result<()> {
    let what = "cancel a running script";
    let (transport, signal) = (check.transport, check.cancel);
    let cancel = AtomicBool::new(false);
    let mut stdout = CancelOnPids {
        stdout: Vec::new(),
        pids: None,
        cancel: &cancel,
        cancelled_at: None,
    };
    let mut stderr = Vec::new();
    let request = ScriptRequest {
        interpreter: "sh",
        script: CANCEL_SCRIPT.as_bytes(),
        cancel: &cancel,
    };
    let finished = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        // A SIGINT/SIGTERM of hyperjob stops this script too.
        scope.spawn(|| {
            while !finished.load(Ordering::Relaxed) {
                if signal.load(Ordering::Relaxed) {
                    cancel.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let result = transport.run_script(endpoint, &request, &mut stdout, &mut stderr);
        finished.store(true, Ordering::Relaxed);
        result
    });
    let returned = stdout
        .cancelled_at
        .map(|at| at.elapsed().as_secs_f64())
        .unwrap_or_default();
    let outcome = match &result {
        Ok(exit) => format!("{exit:?}"),
        Err(err) => err.to_string(),
    };
    let text = String::from_utf8_lossy(&stdout.stdout).into_owned();
    let verdict = match stdout.pids {
        None => Verdict::Fail(format!(
            "the script never printed its pids (stdout {text:?}, stderr {:?}, result: {outcome})",
            String::from_utf8_lossy(&stderr)
        )),
        Some(_) if text.contains(NOT_STOPPED) => Verdict::Fail(format!(
            "the script ran to its end ({outcome}): the cancel did not stop it"
        )),
        Some(pids) => match processes_gone(check, endpoint, &pids) {
            Ok(()) => Verdict::Pass(format!(
                "run_script returned {returned:.1} s after the cancel ({outcome}); the script's \
                 processes in the guest (pids {pids}) are gone"
            )),
            Err(why) => Verdict::Fail(why),
        },
    };
    check.say(what, verdict)?;
    Ok(())
}

/// Asks the guest whether `pids` are gone (or zombies), for up to [`GONE_WITHIN_SECS`].
fn processes_gone(check: &Checker<'_>, endpoint: &Endpoint, pids: &str) -> Result<(), String> {
    let probe = format!(
        "{GONE_FN}\
         n=0\n\
         while [ $n -lt {GONE_WITHIN_SECS} ]; do\n\
         all=1; for p in {pids}; do gone $p || all=0; done\n\
         [ $all = 1 ] && exit 0\n\
         n=$((n+1)); sleep 1\n\
         done\n\
         for p in {pids}; do gone $p || echo \"$p: $(tr '\\0' ' ' < /proc/$p/cmdline)\"; done\n\
         exit 1\n"
    );
    let request = ScriptRequest {
        interpreter: "sh",
        script: probe.as_bytes(),
        cancel: check.cancel,
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    match check
        .transport
        .run_script(endpoint, &request, &mut stdout, &mut stderr)
    {
        Ok(RemoteExit::Code(0)) => Ok(()),
        Ok(RemoteExit::Code(1)) => Err(format!(
            "the script's processes still run {GONE_WITHIN_SECS} s after the cancel ({}): stop \
             the remote process tree, not only the local client",
            String::from_utf8_lossy(&stdout).trim().replace('\n', "; ")
        )),
        Ok(other) => Err(format!(
            "asking the guest whether the script's processes are gone ended with {other:?}: {}",
            String::from_utf8_lossy(&stderr).trim()
        )),
        Err(err) => Err(format!(
            "cannot ask the guest whether the script's processes are gone: {err}"
        )),
    }
}

/// The optional connection ([`crate::Transport::connect`]): two scripts over one connection,
/// each with its exit code and streams.
pub(super) fn connection(check: &mut Checker<'_>, endpoint: &Endpoint) -> std::io::Result<()> {
    let what = "connect: scripts over one connection";
    if !check.transport.can_connect() {
        return check
            .say(what, Verdict::Skip("not supported (optional)".into()))
            .map(drop);
    }
    let connection = check.transport.connect(endpoint, check.cancel);
    let cancel = check.cancel;
    let verdict = judge(connection, |mut connection| {
        connection
            .idle()
            .map_err(|err| format!("idle failed: {err}"))?;
        for round in 1..=2 {
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            let request = ScriptRequest {
                interpreter: "bash",
                script: SCRIPT.as_bytes(),
                cancel,
            };
            let exit = connection
                .run_script(&request, &mut stdout, &mut stderr)
                .map_err(|err| format!("script {round} failed: {err}"))?;
            expect_script(&exit, &stdout, &stderr)
                .map_err(|why| format!("script {round}: {why}"))?;
            connection
                .idle()
                .map_err(|err| format!("idle after script {round} failed: {err}"))?;
        }
        Ok("two scripts, each with its exit code and streams".into())
    });
    check.say(what, verdict).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pids_line_cancels_once_it_is_complete() {
        let cancel = AtomicBool::new(false);
        let mut stdout = CancelOnPids {
            stdout: Vec::new(),
            pids: None,
            cancel: &cancel,
            cancelled_at: None,
        };

        stdout
            .write_all(b"hello\nhyperjob-plugin-check-pids 12")
            .expect("write");
        let early = cancel.load(Ordering::Relaxed);
        stdout.write_all(b"3 456\n").expect("write");

        assert!(!early);
        assert!(cancel.load(Ordering::Relaxed));
        assert_eq!(stdout.pids.as_deref(), Some("123 456"));
    }

    #[test]
    fn a_pids_line_with_anything_but_digits_is_never_taken() {
        let cancel = AtomicBool::new(false);
        let mut stdout = CancelOnPids {
            stdout: Vec::new(),
            pids: None,
            cancel: &cancel,
            cancelled_at: None,
        };

        stdout
            .write_all(b"hyperjob-plugin-check-pids 1; reboot\n")
            .expect("write");

        assert!(!cancel.load(Ordering::Relaxed));
        assert_eq!(stdout.pids, None);
    }

    #[test]
    fn the_script_clause_wants_the_exact_code_and_each_stream_on_its_own() {
        let out = STDOUT_TEXT.as_bytes();
        let err = STDERR_TEXT.as_bytes();
        let mixed = format!("{STDOUT_TEXT}{STDERR_TEXT}");

        assert!(expect_script(&RemoteExit::Code(7), out, err).is_ok());
        assert!(expect_script(&RemoteExit::Code(0), out, err).is_err());
        assert!(expect_script(&RemoteExit::Signal("TERM".into()), out, err).is_err());
        assert!(expect_script(&RemoteExit::Code(7), mixed.as_bytes(), b"").is_err());
    }

    /// The probe's shell function, run by this machine's sh: a live process is not gone, an
    /// ended one is.
    #[test]
    fn the_probe_tells_a_live_process_from_a_gone_one() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let probe = |pid: u32| {
            let script = format!("{GONE_FN}gone {pid}");
            std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .status()
                .expect("sh")
                .success()
        };

        let stat = format!("/proc/{}/stat", child.id());
        let live = probe(child.id());
        child.kill().expect("kill");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&stat).is_ok_and(|s| s.contains(") Z ")) {
            assert!(std::time::Instant::now() < deadline, "no zombie");
            std::thread::sleep(Duration::from_millis(2));
        }
        let zombie = probe(child.id());
        child.wait().expect("wait");
        let reaped = probe(child.id());

        assert!(!live);
        assert!(zombie);
        assert!(reaped);
    }
}
