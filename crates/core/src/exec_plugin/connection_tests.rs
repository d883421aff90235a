//! The host's connection against shell-script plugins that misbehave on purpose.

use std::os::unix::fs::PermissionsExt;

use super::*;

const HELLO: &str =
    r#"echo '{"hello":{"protocol":2,"kind":"backend","name":"test","version":"1"}}'"#;

fn plugin(dir: &tempfile::TempDir, body: &str) -> PathBuf {
    let path = dir.path().join("hyperjob-backend-test");
    std::fs::write(&path, format!("#!/bin/sh\n{HELLO}\n{body}\n")).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn start(dir: &tempfile::TempDir, body: &str) -> Connection {
    Connection::start(&plugin(dir, body), Duration::from_secs(10))
        .expect("hello")
        .0
}

fn options(deadline: Duration) -> CallOptions<'static> {
    CallOptions {
        deadline: Instant::now() + deadline,
        cancel: None,
        input: None,
        write_timeout: WRITE_TIMEOUT,
    }
}

fn call(connection: &mut Connection, options: &CallOptions<'_>) -> Result<Value, PluginError> {
    connection.call("probe", json!({}), options, &mut |_| {})
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet: it runs nothing).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn wait_gone(pid: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if gone(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn the_plugin_gets_an_allow_listed_environment_and_the_protocol_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env_file = dir.path().join("env");
    let mut connection = start(
        &dir,
        &format!(
            "env > '{}'; read line; echo '{{\"id\":1,\"result\":{{}}}}'; read line",
            env_file.display()
        ),
    );

    call(&mut connection, &options(Duration::from_secs(10))).expect("answer");

    let env = std::fs::read_to_string(&env_file).expect("env");
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    assert!(env.contains("HYPERJOB_PROTOCOL_MIN=2\n"), "{env}");
    assert!(env.contains("HYPERJOB_PROTOCOL_MAX=2\n"), "{env}");
    assert!(names.contains(&"PATH"), "{env}");
    // cargo sets CARGO_MANIFEST_DIR for this test process; the plugin must not see it.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    let allowed = |name: &str| {
        ENV_ALLOWED.contains(&name)
            || name.starts_with("HYPERJOB_PROTOCOL_")
            // Set by the shell itself.
            || ["PWD", "SHLVL", "_", "OLDPWD"].contains(&name)
    };
    assert!(names.iter().all(|n| allowed(n)), "{env}");
}

#[test]
fn a_plugin_that_stops_reading_fails_the_request_within_the_write_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("pid");
    let mut connection = start(
        &dir,
        &format!("sleep 600 & echo $! > '{}'; wait", pid_file.display()),
    );
    let input = vec![b'x'; 16 << 20];
    let started = Instant::now();

    let err = call(
        &mut connection,
        &CallOptions {
            input: Some(&input),
            write_timeout: Duration::from_millis(500),
            ..options(Duration::from_secs(600))
        },
    )
    .expect_err("not read");

    assert!(
        err.to_string()
            .ends_with("stopped reading its stdin (a line of `probe` was not taken within 1 s)"),
        "{err}"
    );
    // Bounded by the write timeout, not by the request's 600 s.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let pid = std::fs::read_to_string(&pid_file).expect("pid");
    assert!(wait_gone(&pid), "the plugin's child {pid} outlived it");
    assert!(call(&mut connection, &options(Duration::from_secs(1)))
        .expect_err("broken")
        .to_string()
        .contains("is no longer usable"));
}

#[test]
fn a_cancelled_request_that_is_not_answered_ends_the_plugins_whole_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("pid");
    // Takes the request (and the cancel) and ignores both.
    let mut connection = start(
        &dir,
        &format!(
            "sleep 600 & echo $! > '{}'; while read line; do :; done",
            pid_file.display()
        ),
    );
    let cancel = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            cancel.store(true, Ordering::Relaxed);
        });
        let err = call(
            &mut connection,
            &CallOptions {
                cancel: Some(&cancel),
                ..options(Duration::from_secs(600))
            },
        )
        .expect_err("cancelled");
        assert!(matches!(err, PluginError::Interrupted(_)), "{err}");
        assert!(err.to_string().contains("did not stop within 2 s"), "{err}");
    });

    let pid = std::fs::read_to_string(&pid_file).expect("pid");
    assert!(
        wait_gone(&pid),
        "the plugin's child {pid} outlived the cancel"
    );
}

#[test]
fn a_cancelled_request_the_plugin_answers_returns_the_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut connection = start(
        &dir,
        r#"read request; read cancel; echo '{"id":1,"error":{"class":"interrupted","message":"stopped"}}'; read line"#,
    );
    let cancel = AtomicBool::new(true);

    let err = call(
        &mut connection,
        &CallOptions {
            cancel: Some(&cancel),
            ..options(Duration::from_secs(600))
        },
    )
    .expect_err("interrupted");

    assert!(
        matches!(err, PluginError::Interrupted(ref m) if m == "stopped"),
        "{err}"
    );
}

#[test]
fn reader_failures_are_reported_as_what_they_are_at_once() {
    let cases = [
        (
            "head -c 5000000 /dev/zero | tr '\\0' a; echo; sleep 600",
            "sent a line longer than 4 MiB",
        ),
        (
            "printf '\\377\\n'; sleep 600",
            "sent a line that is not UTF-8",
        ),
        ("exec >&-; sleep 600", "exited (closed its stdout)"),
        (
            "printf '{\"id\":1'; exit 0",
            "closed its stdout in the middle of a line",
        ),
    ];
    for (body, reason) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut connection = start(&dir, body);
        let cancel = AtomicBool::new(false);
        let started = Instant::now();

        let err = call(
            &mut connection,
            &CallOptions {
                cancel: Some(&cancel),
                ..options(Duration::from_secs(60))
            },
        )
        .expect_err(reason);

        assert!(err.to_string().ends_with(reason), "{reason}: {err}");
        // Not retried until the deadline (the old busy loop with a cancel flag).
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{reason}: {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_request_without_an_answer_ends_at_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut connection = start(&dir, "while read line; do :; done");

    let err = call(&mut connection, &options(Duration::from_millis(300))).expect_err("silent");

    assert!(
        err.to_string()
            .ends_with("did not answer `probe` within 1 s"),
        "{err}"
    );
}
