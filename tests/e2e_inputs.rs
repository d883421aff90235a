//! End-to-end: bad input and a misbehaving host get a one-line reason and the right exit code,
//! and leave nothing behind; secrets stay out of argv, logs and readable files. Real binary,
//! real libvirtd, real TCG guests; run with scripts/test.sh.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use hyperjob_test_harness::{
    run_job, Driver, Job, JobReport, JobResult, JobVariable, RunnerSettings,
};
use support::{driver_errors, list_dir, unique_job_id, virsh, TestEnv, Workspace};

fn driver(env: &TestEnv, ws: &Workspace) -> Driver {
    Driver::single_binary(&env.hyperjob)
        .with_env("HYPERJOB_CONFIG", ws.config_path.to_str().expect("utf-8"))
}

fn settings(attempts: u32) -> RunnerSettings {
    RunnerSettings {
        preparation_retries: attempts,
        preparation_retry_interval: Duration::from_millis(200),
        ..RunnerSettings::default()
    }
}

fn vm_name(job_id: i64) -> String {
    format!("hyperjob-job-{job_id}")
}

fn job(id: i64, script: &[&str]) -> Job {
    let mut job = Job::new(id, "group/inputs", "", "", script);
    job.variables.push(JobVariable::new("GIT_STRATEGY", "none"));
    job
}

fn system_failure(report: &JobReport) -> String {
    match &report.result {
        JobResult::SystemFailure { message } => message.clone(),
        other => panic!(
            "expected a system failure, got {other:?}\n{}",
            report.log_text()
        ),
    }
}

fn replace_in_config(ws: &Workspace, from: &str, to: &str) {
    let config = ws.default_config();
    assert!(config.contains(from), "{from} not in config");
    ws.write_config(&config.replace(from, to));
}

#[test]
fn unreachable_libvirtd_fails_prepare_with_a_reason_and_leaves_nothing() {
    let env = TestEnv::load();
    let ws = env.workspace("no-libvirtd");
    replace_in_config(
        &ws,
        &format!("uri = \"{}\"", env.libvirt_uri),
        "uri = \"qemu:///system?socket=/nonexistent/libvirt-sock\"",
    );
    let id = unique_job_id();

    let report = run_job(&driver(&env, &ws), &job(id, &["true"]), &settings(3));

    system_failure(&report);
    assert_eq!(report.invocations_of("prepare").len(), 3);
    let errors = driver_errors(&report);
    // One error line per attempt: `all` below must not pass on an empty list.
    assert_eq!(errors.len(), 3, "{}", report.log_text());
    assert!(
        errors.iter().all(|e| e.contains(
            "cannot connect to libvirt at qemu:///system?socket=/nonexistent/libvirt-sock"
        )),
        "{errors:?}"
    );
    assert!(
        errors.iter().all(|e| e.contains("(is libvirtd running?)")),
        "{errors:?}"
    );
    ws.assert_nothing_left(&vm_name(id));
}

#[test]
fn unknown_backend_is_refused_listing_the_registered_ones() {
    let env = TestEnv::load();
    let ws = env.workspace("unknown-backend");
    replace_in_config(&ws, "backend = \"libvirt\"", "backend = \"vmware\"");
    let id = unique_job_id();

    let report = run_job(&driver(&env, &ws), &job(id, &["true"]), &settings(1));

    system_failure(&report);
    let log = report.log_text();
    assert!(
        log.contains("unknown backend \"vmware\"; registered backends: libvirt"),
        "{log}"
    );
}

struct Network<'a> {
    env: &'a TestEnv,
    name: &'static str,
}

impl Drop for Network<'_> {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-q", "-c", &self.env.libvirt_uri, "net-destroy", self.name])
            .output();
    }
}

#[test]
fn guest_that_never_gets_an_address_fails_within_the_timeout_and_is_removed() {
    let env = TestEnv::load();
    let ws = env.workspace("no-dhcp");
    let xml = ws.dir.join("nodhcp.xml");
    fs::write(
        &xml,
        "<network><name>hyperjob-nodhcp</name><bridge name='hjnodhcp0' stp='off'/><ip address='192.168.251.1' netmask='255.255.255.0'/></network>\n",
    )
    .expect("network xml");
    virsh(
        &env.libvirt_uri,
        &["net-create", xml.to_str().expect("utf-8")],
    );
    let _network = Network {
        env: &env,
        name: "hyperjob-nodhcp",
    };
    fs::remove_file(&xml).expect("remove xml");
    let config = ws
        .default_config()
        .replace(
            &format!("network = \"{}\"", env.network),
            "network = \"hyperjob-nodhcp\"",
        )
        .replace("ready_timeout_secs = 180", "ready_timeout_secs = 20");
    ws.write_config(&config);
    let id = unique_job_id();

    let report = run_job(&driver(&env, &ws), &job(id, &["true"]), &settings(1));

    system_failure(&report);
    let log = report.log_text();
    assert!(log.contains("got no address: timed out after"), "{log}");
    assert!(
        log.contains("waiting for a DHCP lease on network \"hyperjob-nodhcp\""),
        "{log}"
    );
    // The tail itself, not only its header: the guest's last words are its DHCP client
    // asking in vain, the very reason prepare failed.
    let tail: Vec<&str> = log
        .lines()
        .skip_while(|line| !line.contains("Last lines of the guest console:"))
        .skip(1)
        .take_while(|line| !line.starts_with("hyperjob "))
        .collect();
    println!("console tail ({} lines):\n{}", tail.len(), tail.join("\n"));
    assert!(tail.len() >= 3, "{log}");
    assert!(tail.iter().any(|line| line.contains("udhcpc")), "{log}");
    ws.assert_nothing_left(&vm_name(id));
}

/// A tiny, full filesystem mounted for one test.
struct FullDisk {
    path: PathBuf,
}

impl FullDisk {
    fn mount(path: &Path) -> Self {
        fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=128k,mode=0755",
                "hyperjob-full",
                path.to_str().expect("utf-8"),
            ])
            .status()
            .expect("mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs at {}",
            path.display()
        );
        // Fill it up; dd stops with ENOSPC.
        let _ = Command::new("dd")
            .args([
                "if=/dev/zero",
                &format!("of={}/filler", path.display()),
                "bs=4k",
            ])
            .output();
        Self {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = fs::remove_dir(&self.path);
    }
}

#[test]
fn full_disk_while_creating_the_overlay_is_a_system_failure_leaving_nothing() {
    let env = TestEnv::load();
    let ws = env.workspace("disk-full");
    let full = FullDisk::mount(&ws.dir.join("full"));
    replace_in_config(
        &ws,
        &format!("images_dir = \"{}\"", ws.images_dir.display()),
        &format!("images_dir = \"{}\"", full.path.display()),
    );
    let id = unique_job_id();

    let report = run_job(&driver(&env, &ws), &job(id, &["true"]), &settings(1));

    system_failure(&report);
    let log = report.log_text();
    assert!(log.contains("qemu-img could not create overlay"), "{log}");
    assert!(log.contains("No space left on device"), "{log}");
    assert_eq!(list_dir(&full.path), vec!["filler".to_string()]);
    ws.assert_nothing_left(&vm_name(id));
}

fn run_hyperjob(env: &TestEnv, ws: &Workspace, response: Option<&Path>, args: &[&str]) -> Output {
    let mut command = Command::new(&env.hyperjob);
    command
        .args(args)
        .env("HYPERJOB_CONFIG", &ws.config_path)
        .env("SYSTEM_FAILURE_EXIT_CODE", "2")
        .env("BUILD_FAILURE_EXIT_CODE", "1")
        .env_remove("JOB_RESPONSE_FILE");
    if let Some(path) = response {
        command.env("JOB_RESPONSE_FILE", path);
    }
    command.output().expect("run hyperjob")
}

#[test]
fn missing_or_malformed_job_response_file_is_a_one_line_system_failure() {
    let env = TestEnv::load();
    let ws = env.workspace("bad-response");
    let malformed = ws.dir.join("response.json");
    fs::write(&malformed, "{\"token\":\"glcbt-SECRET-value\",\"id\":").expect("write");
    let string_id = ws.dir.join("string-id.json");
    fs::write(&string_id, "{\"id\":\"4242</name><evil/>\"}").expect("write");

    let missing = run_hyperjob(&env, &ws, None, &["prepare"]);
    let broken = run_hyperjob(&env, &ws, Some(&malformed), &["prepare"]);
    let hostile = run_hyperjob(&env, &ws, Some(&string_id), &["prepare"]);

    for (output, expected) in [
        (&missing, "JOB_RESPONSE_FILE is not set"),
        (&broken, "is not valid JSON"),
        (&hostile, "job `id` is not a positive integer"),
    ] {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            !stderr.contains("SECRET") && !stderr.contains("evil"),
            "{stderr}"
        );
    }
    fs::remove_file(&malformed).expect("remove");
    fs::remove_file(&string_id).expect("remove");
    assert!(list_dir(&ws.state_dir).is_empty());
    assert!(list_dir(&ws.images_dir).is_empty());
}

/// Every process's command line on this host that contains `needle`.
fn processes_with_in_argv(needle: &str) -> Vec<String> {
    fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|entry| fs::read(entry.path().join("cmdline")).ok())
        .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(needle))
        .collect()
}

/// Watches the guest for the whole job: over a separate SSH connection (started as soon as
/// prepare recorded the guest's address), sweeps every process's argv in the guest for the
/// secret, which it reads from stdin so that it never sits on a command line itself.
struct GuestSampler {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

/// The sampler, in the guest's bash. Reads the secret and a harmless canary from stdin;
/// prints `up`, then `sweep N` after every pass over /proc, `HIT <file>` for an argument
/// carrying the secret and `CANARY` for one carrying the canary (which the job puts on a
/// command line on purpose: proof that the sampler sees the job's processes). Builtins only.
const SAMPLER: &str = r#"IFS= read -r secret; IFS= read -r canary; echo up; n=0
while :; do
  for f in /proc/[0-9]*/cmdline; do
    { while IFS= read -r -d '' arg; do case "$arg" in *"$secret"*) echo "HIT $f";; *"$canary"*) echo CANARY;; esac; done < "$f"; } 2>/dev/null
  done
  n=$((n + 1)); echo "sweep $n"
done"#;

impl GuestSampler {
    fn start(env: &TestEnv, host: &str, secret: &str, canary: &str) -> Self {
        use std::io::{BufRead, Write};
        let mut child = Command::new("ssh")
            .args(["-i", env.identity_file.to_str().expect("utf-8")])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", env.known_hosts.display()))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
            .args(["-o", "ConnectTimeout=30"])
            .arg(format!("{}@{host}", env.guest_user))
            .arg(format!("bash -c '{}'", SAMPLER.replace('\'', r"'\''")))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start ssh");
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{secret}\n{canary}").expect("send the secret to the sampler");
        // Kept open: the sampler ends with the VM (or when the test kills ssh).
        std::mem::forget(stdin);
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Stops the sampler (our own ssh child, by pid) and returns everything it printed.
    fn finish(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lines.try_iter().collect()
    }
}

/// The guest address prepare recorded, once the job's state says it is ready.
fn ready_guest_host(ws: &Workspace, job_id: i64) -> Option<String> {
    let text = fs::read_to_string(ws.state_dir.join(format!("job-{job_id}.json"))).ok()?;
    let state: serde_json::Value = serde_json::from_str(&text).ok()?;
    (state["phase"] == "ready")
        .then(|| state["endpoint"]["host"].as_str().map(str::to_string))
        .flatten()
}

/// A driver wrapper that records every exec of the driver and its children with strace, and
/// holds each `run` until the guest-side sampler is up (so it sees every stage). strace records
/// each child's exec and then lets it go (`-b execve`): otherwise it would wait for the job's
/// relay, which prepare starts and which lives until cleanup.
fn traced_driver(env: &TestEnv, ws: &Workspace, trace_dir: &Path, ready: &Path) -> Driver {
    let strace = ["/usr/bin/strace", "/bin/strace"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .expect("strace is installed (scripts/install-deps.sh)");
    let wrapper = ws.dir.join("traced-hyperjob");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             if [ \"$1\" = run ]; then\n\
             \x20 i=0; while [ ! -e '{ready}' ] && [ $i -lt 6000 ]; do sleep 0.05; i=$((i + 1)); done\n\
             fi\n\
             exec {strace} -f -b execve -qq -e trace=execve,execveat -s 65536 -ff -o '{trace}/exec' '{hyperjob}' \"$@\"\n",
            ready = ready.display(),
            trace = trace_dir.display(),
            hyperjob = env.hyperjob.display(),
        ),
    )
    .expect("write wrapper");
    fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod wrapper");
    Driver::single_binary(&wrapper)
        .with_env("HYPERJOB_CONFIG", ws.config_path.to_str().expect("utf-8"))
}

#[test]
fn secrets_stay_out_of_argv_logs_and_readable_guest_files() {
    let env = TestEnv::load();
    let ws = env.workspace("secrets");
    let id = unique_job_id();
    let secret = format!("hj-secret-{id}-value");
    let canary = format!("hj-canary-{id}");
    let mut job = job(
        id,
        &[
            "echo \"file variable mode: $(stat -c %a \"$FILE_VAR\")\"",
            // Long enough for the sampler to sweep the guest while it runs; the canary sits in
            // argv on purpose.
            &format!("sh -c 'sleep 3' {canary}"),
        ],
    );
    job.after_script = vec!["echo after-script-ran".to_string()];
    job.variables
        .push(JobVariable::masked("MASKED_VAR", &secret));
    job.variables.push(JobVariable::file(
        "FILE_VAR",
        &format!("file content {secret}"),
    ));
    let trace_dir = ws.dir.join("trace");
    fs::create_dir_all(&trace_dir).expect("trace dir");
    let ready = ws.dir.join("sampler-up");
    let watching = AtomicBool::new(true);

    let (report, host_hits, sampler) = thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut hits = Vec::new();
            while watching.load(Ordering::Relaxed) {
                hits.extend(processes_with_in_argv(&secret));
                thread::sleep(Duration::from_millis(20));
            }
            hits
        });
        let starter = scope.spawn(|| {
            let host = loop {
                if let Some(host) = ready_guest_host(&ws, id) {
                    break Some(host);
                }
                if !watching.load(Ordering::Relaxed) {
                    break None;
                }
                thread::sleep(Duration::from_millis(5));
            }?;
            let sampler = GuestSampler::start(&env, &host, &secret, &canary);
            match sampler.lines.recv_timeout(Duration::from_secs(300)) {
                Ok(line) if line == "up" => fs::write(&ready, "").expect("mark sampler up"),
                other => panic!("the guest sampler did not start: {other:?}"),
            }
            Some(sampler)
        });
        let report = run_job(
            &traced_driver(&env, &ws, &trace_dir, &ready),
            &job,
            &settings(1),
        );
        watching.store(false, Ordering::Relaxed);
        let sampler = starter.join().expect("sampler starter");
        (report, watcher.join().expect("watcher"), sampler)
    });

    let log = report.log_text();
    assert_eq!(report.result, JobResult::Success, "{log}");
    assert!(host_hits.is_empty(), "secret in host argv: {host_hits:?}");

    // The guest, sampled from before the first stage until the VM was gone.
    let sampled = sampler
        .expect("prepare never recorded a ready guest")
        .finish();
    let sweeps = sampled.iter().filter(|l| l.starts_with("sweep ")).count();
    let guest_hits: Vec<_> = sampled.iter().filter(|l| l.starts_with("HIT ")).collect();
    println!("guest sampler: {sweeps} sweeps of every process's argv over the whole job");
    assert!(
        guest_hits.is_empty(),
        "secret in guest argv: {guest_hits:?}"
    );
    assert!(sweeps >= 3, "the sampler hardly ran: {sampled:?}");
    assert!(
        sampled.iter().any(|l| l == "CANARY"),
        "the sampler never saw the job's own command line: {sampled:?}"
    );

    // Every exec of the driver and of everything it started, for every stage.
    let mut execs = Vec::new();
    for file in list_dir(&trace_dir) {
        let text = fs::read_to_string(trace_dir.join(&file)).expect("trace");
        execs.extend(
            text.lines()
                .filter(|line| line.starts_with("execve"))
                .map(str::to_string),
        );
        fs::remove_file(trace_dir.join(&file)).expect("remove trace");
    }
    fs::remove_dir(&trace_dir).expect("remove trace dir");
    fs::remove_file(&ready).expect("remove marker");
    fs::remove_file(ws.dir.join("traced-hyperjob")).expect("remove wrapper");
    let hyperjob_runs = execs
        .iter()
        .filter(|line| line.contains(&format!("\"{}\"", env.hyperjob.display())))
        .count();
    println!("strace: {} execs, {hyperjob_runs} of hyperjob", execs.len());
    // config, prepare, one run per stage (at least 5 here), cleanup.
    assert!(hyperjob_runs >= 8, "{execs:#?}");
    assert!(
        execs.iter().any(|line| line.contains("qemu-img")),
        "strace did not follow the driver's children: {execs:#?}"
    );
    // hyperjob talks to libvirt and to the guest through libraries, never through virsh/ssh.
    let programs: Vec<&str> = execs
        .iter()
        .filter_map(|line| line.split('"').nth(1))
        .collect();
    assert!(
        !programs
            .iter()
            .any(|p| p.ends_with("/virsh") || p.ends_with("/ssh")),
        "{programs:?}"
    );
    let leaked: Vec<_> = execs.iter().filter(|line| line.contains(&secret)).collect();
    assert!(leaked.is_empty(), "secret in an exec's argv: {leaked:#?}");

    assert!(log.contains("file variable mode: 600"), "{log}");
    assert!(log.contains("after-script-ran"), "{log}");
    assert!(
        !log.contains(&secret),
        "the job never prints it, so nobody else may: {log}"
    );
    ws.wait_for_teardown();
    let state_files: Vec<_> = list_dir(&ws.state_dir);
    assert!(state_files.is_empty(), "{state_files:?}");
    ws.assert_nothing_left(&vm_name(id));
}
