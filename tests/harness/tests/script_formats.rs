//! The generated script formats run by real shells of this machine: the 19.1+ and the
//! 17.4–19.0 bash wrappers, and the `sh` format under dash with and without
//! FF_POSIXLY_CORRECT_ESCAPES (protocol §7.1, §7.3, §7.7).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

use hyperjob_test_harness::{
    Driver, ExecutorSession, Job, JobVariable, RunnerSettings, ScriptFormat, Stage,
};

/// A job without a repository whose build_script is `script`.
fn job(script: &[&str], variables: &[(&str, &str)]) -> Job {
    let mut job = Job::new(4242, "mygroup/myproject", "", "", script);
    job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));
    for (key, value) in variables {
        job.variables.push(JobVariable::new(key, value));
    }
    job
}

/// The build_script the runner would write for `job`, after get_sources created the
/// project dir (run with `shell`, as the later stages need it).
fn build_script(root: &Path, job: &Job, settings: RunnerSettings, shell: &str) -> String {
    let settings = RunnerSettings {
        temp_root: Some(root.to_path_buf()),
        ..settings
    };
    let session =
        ExecutorSession::new(&Driver::run_only("/bin/true"), job, &settings).expect("session");
    session.start_build().expect("dirs");
    let get_sources = session
        .script_for(&Stage::GetSources)
        .expect("generated")
        .expect("never skipped");
    let (status, output) = run(shell, &get_sources);
    assert!(status.success(), "get_sources under {shell}: {output}");
    session
        .script_for(&Stage::parse("build_script"))
        .expect("generated")
        .expect("the step exists")
}

fn settings(root: &Path, shell: &str, format: ScriptFormat) -> RunnerSettings {
    RunnerSettings {
        shell: Some(shell.to_owned()),
        script_format: format,
        ..RunnerSettings::local(root)
    }
}

/// Runs `script` with `shell` reading it from stdin, like a driver does; status and output.
fn run(shell: &str, script: &str) -> (ExitStatus, String) {
    let output = spawn(shell, script)
        .wait_with_output()
        .expect("wait for the shell");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status, text)
}

fn spawn(shell: &str, script: &str) -> std::process::Child {
    let file = tempfile::NamedTempFile::new().expect("script file");
    std::fs::write(file.path(), script).expect("write script");
    Command::new(shell)
        .stdin(std::fs::File::open(file.path()).expect("open script"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start the shell")
}

/// Starts `script` under bash, waits for the line "42 started", sends SIGTERM to its process
/// group (as the runner does to a local driver) and returns the exit status.
fn terminated(script: &str) -> ExitStatus {
    let mut child = spawn("bash", script);
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    while line.trim_end() != "42 started" {
        line.clear();
        let read = stdout.read_line(&mut line).expect("read output");
        assert!(read > 0, "the script ended before it printed 42 started");
    }
    let pgid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) with the process group of the child we just spawned as its leader.
    #[allow(unsafe_code)]
    let sent = unsafe { libc::kill(-pgid, libc::SIGTERM) };
    assert_eq!(sent, 0);
    child.wait().expect("wait for bash")
}

const STARTED_THEN_SLEEP: [&str; 2] = ["echo \"$((6*7)) started\"", "sleep 30"];

#[test]
fn runner_17_4_script_propagates_the_exit_code_like_the_current_one() {
    let root = tempfile::tempdir().expect("tempdir");
    for format in [ScriptFormat::Current, ScriptFormat::Runner17_4] {
        let script = build_script(
            root.path(),
            &job(
                &["echo \"$GREETING\"", "exit 42"],
                &[("GREETING", "it's me")],
            ),
            settings(root.path(), "bash", format),
            "bash",
        );

        let (status, output) = run("bash", &script);

        assert_eq!(status.code(), Some(42), "{format:?}: {output}");
        assert!(output.contains("it's me\n"), "{format:?}: {output}");
    }
}

#[test]
fn a_terminated_script_exits_1_since_19_1_and_143_with_the_17_4_trap() {
    let root = tempfile::tempdir().expect("tempdir");
    let job = job(&STARTED_THEN_SLEEP, &[]);
    let current = build_script(
        root.path(),
        &job,
        settings(root.path(), "bash", ScriptFormat::Current),
        "bash",
    );
    let old = build_script(
        root.path(),
        &job,
        settings(root.path(), "bash", ScriptFormat::Runner17_4),
        "bash",
    );

    assert!(old.contains("\ntrap exit 1 TERM\n"), "{old}");
    assert_eq!(terminated(&current).code(), Some(1));
    assert_eq!(terminated(&old).code(), Some(143));
}

#[test]
fn sh_script_with_default_escapes_breaks_under_dash() {
    let root = tempfile::tempdir().expect("tempdir");
    let script = build_script(
        root.path(),
        &job(&["echo reached-the-job"], &[]),
        settings(root.path(), "sh", ScriptFormat::Current),
        "bash",
    );
    assert!(script.starts_with("#!/usr/bin/env sh\n"), "{script}");

    let (dash, dash_output) = run("dash", &script);
    let (bash, bash_output) = run("bash", &script);

    // dash has no $'…': the eval gets the escaped text itself.
    assert!(!dash.success(), "{dash_output}");
    assert!(!dash_output.contains("reached-the-job"), "{dash_output}");
    assert!(bash.success(), "{bash_output}");
    assert!(bash_output.contains("reached-the-job"), "{bash_output}");
}

#[test]
fn sh_script_with_posix_escapes_runs_under_dash() {
    let root = tempfile::tempdir().expect("tempdir");
    let job = job(
        &["printf '%s|%s\\n' \"$GREETING\" '$HOME'"],
        &[
            ("GREETING", "it's \"me\" `y` a\\b"),
            ("FF_POSIXLY_CORRECT_ESCAPES", "true"),
        ],
    );
    let script = build_script(
        root.path(),
        &job,
        settings(root.path(), "sh", ScriptFormat::Current),
        "dash",
    );
    assert!(!script.contains("$'"), "{script}");

    let (status, output) = run("dash", &script);

    assert!(status.success(), "{output}");
    assert!(
        output.contains("\nit's \"me\" `y` a\\b|$HOME\n"),
        "{output}"
    );
}
