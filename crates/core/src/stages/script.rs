//! What runs a stage's script in the guest: the interpreter its `#!` line names (and, for `sh`
//! scripts with `$'…'` quoting, the guest shell that understands it), and the exit code of a
//! script a signal ended.

use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context as _};

use crate::plugin::{RemoteExit, ScriptRequest};

/// The interpreter named by the script's `#!` line: `bash` (also without a `#!` line) or `sh`.
pub fn interpreter_for(script: &[u8]) -> anyhow::Result<&'static str> {
    let Some(rest) = script.strip_prefix(b"#!") else {
        return Ok("bash");
    };
    let line = rest.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let program = words.next().unwrap_or_default();
    let name = match program.rsplit('/').next() {
        Some("env") => words.next().unwrap_or_default(),
        Some(name) => name,
        None => "",
    };
    match name {
        "bash" => Ok("bash"),
        "sh" => Ok("sh"),
        "pwsh" | "powershell" => {
            bail!("PowerShell scripts are not supported; set shell = \"bash\" for this runner")
        }
        other => bail!("unsupported script interpreter {other:?} in the script's #! line"),
    }
}

/// Whether a script uses ANSI-C quoting (`$'…'`), which POSIX sh (dash) does not have. GitLab
/// Runner quotes the whole job body that way, for `sh` too, unless FF_POSIXLY_CORRECT_ESCAPES is
/// on; then every `$` of the body is written as `\$`. So: a `$'` not preceded by a backslash.
pub fn uses_ansi_c_quoting(script: &[u8]) -> bool {
    script
        .windows(2)
        .enumerate()
        .any(|(at, pair)| pair == b"$'" && (at == 0 || script[at - 1] != b'\\'))
}

/// Asks the guest which interpreter can run an `sh` script that uses `$'…'`: its `sh` when that
/// understands `$'…'` (bash, busybox ash), else bash. Prints `sh`, `bash`, or `none <path of sh>`.
const SH_PROBE: &[u8] = b"if [ \"$(printf %s $'\\x41')\" = A ]; then echo sh; \
elif command -v bash >/dev/null 2>&1; then echo bash; \
else echo \"none $(readlink -f \"$(command -v sh)\" 2>/dev/null || command -v sh)\"; fi\n";

/// Runs [`SH_PROBE`] in the guest and picks the interpreter from its answer.
pub(super) fn guest_interpreter_for_sh(
    runner: &mut crate::relay::StageRunner<'_>,
    cancel: &AtomicBool,
) -> anyhow::Result<&'static str> {
    let request = ScriptRequest {
        interpreter: "sh",
        script: SH_PROBE,
        cancel,
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let exit = runner
        .run_script(&request, &mut stdout, &mut stderr)
        .context("cannot ask the guest which shell understands $'...' quoting")?;
    if exit != RemoteExit::Code(0) {
        bail!(
            "asking the guest which shell understands $'...' quoting failed ({exit:?}): {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    sh_interpreter_from_probe(&String::from_utf8_lossy(&stdout))
}

/// The interpreter named by the guest's answer to [`SH_PROBE`], or why there is none.
pub fn sh_interpreter_from_probe(answer: &str) -> anyhow::Result<&'static str> {
    let answer = answer.trim();
    match answer.split_whitespace().next() {
        Some("sh") => Ok("sh"),
        Some("bash") => Ok("bash"),
        Some("none") => {
            let sh = answer["none".len()..].trim();
            let sh = if sh.is_empty() { "sh" } else { sh };
            bail!(
                "this sh script uses $'...' quoting (GitLab Runner writes it unless \
                 FF_POSIXLY_CORRECT_ESCAPES is on), which the guest's sh ({sh}) does not \
                 understand, and the guest has no bash: install bash in the guest image, use \
                 shell = \"bash\", or set FF_POSIXLY_CORRECT_ESCAPES=true"
            )
        }
        _ => bail!("unexpected answer from the guest's shell probe: {answer:?}"),
    }
}

/// Linux's signal numbers by the names SSH servers report in `exit-signal` (RFC 4254 names the
/// common ones; dropbear names every signal; OpenSSH sends `SIG@openssh.com` for the rest).
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("IOT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("POLL", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// The number of the signal the SSH server named; 0 for a name it did not resolve (so the
/// exit code is 128: killed, by a signal nobody named).
pub(super) fn signal_number(name: &str) -> i32 {
    let name = name.trim_start_matches("SIG");
    SIGNALS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, number)| *number)
        .unwrap_or_else(|| {
            tracing::warn!(
                "the script was killed by a signal the SSH server did not name ({name})"
            );
            0
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_bash_shebang_selects_bash() {
        assert_eq!(
            interpreter_for(b"#!/usr/bin/env bash\n\ntrap").expect("ok"),
            "bash"
        );
    }

    #[test]
    fn runner_sh_shebang_selects_sh() {
        assert_eq!(
            interpreter_for(b"#!/usr/bin/env sh\nset -e").expect("ok"),
            "sh"
        );
        assert_eq!(interpreter_for(b"#!/bin/sh\n").expect("ok"), "sh");
    }

    #[test]
    fn script_without_shebang_runs_with_bash() {
        assert_eq!(interpreter_for(b"echo hi\n").expect("ok"), "bash");
    }

    #[test]
    fn powershell_is_refused_with_a_reason() {
        let err = interpreter_for(b"#!/usr/bin/env pwsh\n").expect_err("pwsh");

        assert!(err.to_string().contains("PowerShell"), "{err}");
    }

    #[test]
    fn runner_default_escapes_need_ansi_c_quoting() {
        let script = b"#!/usr/bin/env sh\n\ntrap 'exit 1' TERM\n\n(trap 'exit 1' TERM; eval $'echo hi\\n') < /dev/null\nexit 0\n";

        assert!(uses_ansi_c_quoting(script));
        assert!(uses_ansi_c_quoting(b"$'x'"));
    }

    #[test]
    fn posix_escapes_need_no_ansi_c_quoting() {
        // FF_POSIXLY_CORRECT_ESCAPES: a user's `echo $'a'` arrives as `echo \$'a'`.
        let script = b"#!/usr/bin/env sh\n\ntrap 'exit 1' TERM\n\ncase \"$(set -o)\" in *\"pipefail\"*) set -o pipefail;; esac; set -o errexit\n(trap 'exit 1' TERM; eval \"echo \\$'a'\n\") < /dev/null\nexit 0\n";

        assert!(!uses_ansi_c_quoting(script));
        assert!(!uses_ansi_c_quoting(b"echo \"$HOME\"\n"));
    }

    #[test]
    fn probe_answers_pick_the_guest_interpreter() {
        assert_eq!(sh_interpreter_from_probe("sh\n").expect("sh"), "sh");
        assert_eq!(sh_interpreter_from_probe("bash\n").expect("bash"), "bash");
        assert!(sh_interpreter_from_probe("").is_err());
    }

    /// The probe's answer from a real shell of this machine, run like the transport runs it.
    fn probe_with(shell: &str, path: &str) -> String {
        use std::io::Write as _;
        let mut child = std::process::Command::new(shell)
            .env("PATH", path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the shell");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(SH_PROBE)
            .expect("write the probe");
        let output = child.wait_with_output().expect("wait");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    #[test]
    fn the_probe_tells_dash_from_shells_that_understand_ansi_c_quoting() {
        let path = std::env::var("PATH").unwrap_or_default();

        assert_eq!(probe_with("/bin/bash", &path), "sh\n");
        assert_eq!(probe_with("/bin/dash", &path), "bash\n");
        assert_eq!(probe_with("/bin/dash", "/nonexistent"), "none \n");
    }

    #[test]
    fn a_guest_without_a_capable_shell_is_refused_naming_the_cause() {
        let err = sh_interpreter_from_probe("none /usr/bin/dash\n").expect_err("no shell");
        let message = format!("{err:#}");

        assert!(
            message.contains("the guest's sh (/usr/bin/dash)"),
            "{message}"
        );
        assert!(message.contains("$'...' quoting"), "{message}");
        assert!(message.contains("FF_POSIXLY_CORRECT_ESCAPES"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn killed_script_reports_128_plus_signal() {
        assert_eq!(128 + signal_number("KILL"), 137);
        assert_eq!(128 + signal_number("SIGTERM"), 143);
        assert_eq!(128 + signal_number("USR1"), 138);
        assert_eq!(128 + signal_number("SYS"), 159);
    }

    #[test]
    fn every_linux_signal_from_1_to_31_has_a_name() {
        let numbers: std::collections::BTreeSet<i32> = SIGNALS.iter().map(|(_, n)| *n).collect();

        assert_eq!(numbers, (1..=31).collect());
        assert_eq!(signal_number("SIG@openssh.com"), 0);
    }
}
