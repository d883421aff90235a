//! The guest side of a script run: the command the SSH server executes (process group report,
//! run marker, interpreter), the command that stops the script's process tree, and the filter
//! that takes the process-group line off the script's stderr.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// First line the remote side prints on stderr: the process group of the remote shell. OpenSSH
/// makes the shell a group leader; dropbear puts it in the group of its own session process.
/// Either way every process the script starts (without `setsid` of its own) is in that group.
const PID_MARKER: &str = "hyperjob-remote-pgid ";
/// The variable that marks every process of one script run: the remote command exports it, so
/// every descendant inherits it, including those that left the process group with `setsid`.
pub const RUN_ID_VAR: &str = "HYPERJOB_RUN_ID";

/// A fresh marker value for one script run: 128 random bits in hex. Not a secret (any process
/// of the job can read it); it only has to be unique.
pub fn new_run_id() -> String {
    let mut bytes = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        // Unique enough without OS randomness: pid, time and a counter.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        bytes[..4].copy_from_slice(&std::process::id().to_le_bytes());
        bytes[4..12].copy_from_slice(&nanos.to_le_bytes()[..8]);
        bytes[12..].copy_from_slice(&count.to_le_bytes()[..4]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The remote command: report the shell's process group (from /proc; the shell's pid where
/// there is no /proc), mark the run with `HYPERJOB_RUN_ID`, then become the interpreter that
/// reads the script from stdin. `interpreter` is one of a fixed set of names (`bash`, `sh`);
/// `run_id` comes from [`new_run_id`] (hex digits only).
pub fn remote_command(interpreter: &str, umask: u32, run_id: &str) -> String {
    format!(
        "g=$$; if [ -r /proc/$$/stat ]; then read -r s < /proc/$$/stat; set -- ${{s##*\") \"}}; g=$3; fi; \
         printf '{PID_MARKER}%s\\n' \"$g\" >&2; umask {umask:04o}; {RUN_ID_VAR}={run_id}; export {RUN_ID_VAR}; exec {interpreter}"
    )
}

/// Sends `signal` to every process whose environment holds the run's marker: the processes the
/// user can read `/proc/PID/environ` of, i.e. the login user's own. One `grep` for all of them;
/// the shell running this has no marker of its own, so it never hits itself.
fn marker_kill(signal: &str, run_id: &str) -> String {
    format!(
        "for f in $(grep -lF \"{RUN_ID_VAR}={run_id}\" /proc/[0-9]*/environ 2>/dev/null); do \
         p=${{f#/proc/}}; kill -{signal} \"${{p%/environ}}\" 2>/dev/null; done"
    )
}

/// The command that stops the script's whole process tree: SIGTERM to its process group and to
/// every process carrying the run's marker (which reaches descendants that left the group with
/// `setsid`), SIGKILL to both a second later. It all happens in a detached helper, so the
/// command itself returns at once. Under dropbear this command's own shell is in the script's
/// process group (dropbear does not give a session a group of its own): the helper ignores
/// SIGTERM and SIGHUP, and the group's SIGKILL comes last, when the helper has nothing left to
/// do. Must run in a shell that does not carry the marker (a new SSH channel). A process that
/// removed the marker from its environment escapes unless it is still in the group; the VM is
/// destroyed at cleanup anyway.
pub fn kill_command(pgid: Option<u32>, run_id: &str) -> String {
    let group = |signal: &str| {
        // `kill -SIG -PGID`, without `--`: dash's kill refuses `--`.
        pgid.map(|pgid| format!("kill -{signal} -{pgid} 2>/dev/null; "))
            .unwrap_or_default()
    };
    format!(
        "trap '' TERM HUP; ({}{}; sleep 1; {}; {}) </dev/null >/dev/null 2>&1 &",
        group("TERM"),
        marker_kill("TERM", run_id),
        marker_kill("KILL", run_id),
        group("KILL"),
    )
}

/// Takes the pid line off the front of stderr and passes everything else through.
#[derive(Debug, Default)]
pub struct PidCapture {
    head: Vec<u8>,
    done: bool,
    pid: Option<u32>,
}

impl PidCapture {
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Whether the first line has been seen (or given up on): no process group comes later.
    pub fn settled(&self) -> bool {
        self.done
    }

    /// At the end of the stream: what is still held back (a first line that never ended).
    pub fn finish(&mut self) -> Vec<u8> {
        self.done = true;
        std::mem::take(&mut self.head)
    }

    /// Feeds stderr bytes; returns the bytes that belong to the script's stderr.
    pub fn feed<'a>(&mut self, data: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        if self.done {
            return std::borrow::Cow::Borrowed(data);
        }
        self.head.extend_from_slice(data);
        let Some(newline) = self.head.iter().position(|b| *b == b'\n') else {
            if self.head.len() > 64 {
                // Not our marker after all: stop looking and pass everything on.
                self.done = true;
                return std::borrow::Cow::Owned(std::mem::take(&mut self.head));
            }
            return std::borrow::Cow::Owned(Vec::new());
        };
        self.done = true;
        let line = String::from_utf8_lossy(&self.head[..newline]).into_owned();
        match line.strip_prefix(PID_MARKER) {
            Some(pid) => {
                // Process groups 0 and 1 would make the kill command hit everything the
                // user can reach: never remember those.
                self.pid = pid.trim().parse::<u32>().ok().filter(|pid| *pid > 1);
                let rest = self.head.split_off(newline + 1);
                self.head.clear();
                std::borrow::Cow::Owned(rest)
            }
            None => std::borrow::Cow::Owned(std::mem::take(&mut self.head)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;

    /// Runs `remote_command(interpreter)` in a local `sh` like an SSH server would, with `script`
    /// on stdin, in the process group `group` (0: its own).
    fn spawn_remote(interpreter: &str, run_id: &str, group: i32, script: &str) -> Child {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(remote_command(interpreter, 0o022, run_id))
            .env_remove(RUN_ID_VAR)
            .process_group(group)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run sh");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(script.as_bytes()).expect("write script");
        child
    }

    fn reported_group(child: Child) -> (Option<u32>, String) {
        let output = child.wait_with_output().expect("wait for sh");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let mut capture = PidCapture::default();
        let rest = capture.feed(stderr.as_bytes()).into_owned();
        assert!(rest.is_empty(), "{stderr}");
        (capture.pid(), stderr)
    }

    /// True once `pid` has exited (gone, or a zombie nobody reaped yet).
    fn is_dead(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
            Err(_) => true,
        }
    }

    /// SIGKILLs the processes a failed test left behind (all started by the test itself).
    struct KillOnDrop(Vec<u32>);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            for pid in self.0.iter().filter(|pid| !is_dead(**pid)) {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
            }
        }
    }

    fn wait_until(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + bound;
        while !done() {
            assert!(Instant::now() < deadline, "{what} within {bound:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn remote_command_reports_the_process_group_marks_the_run_then_execs_the_interpreter() {
        let command = remote_command("bash", 0o077, "00ff");

        assert!(command.contains("/proc/$$/stat"), "{command}");
        assert!(
            command.ends_with(
                "printf 'hyperjob-remote-pgid %s\\n' \"$g\" >&2; umask 0077; \
                 HYPERJOB_RUN_ID=00ff; export HYPERJOB_RUN_ID; exec bash"
            ),
            "{command}"
        );
    }

    #[test]
    fn remote_command_reports_its_own_group_when_it_leads_one() {
        let child = spawn_remote("true", "1", 0, "");
        let pid = child.id();

        let (group, stderr) = reported_group(child);

        assert_eq!(group, Some(pid), "{stderr}");
    }

    #[test]
    fn remote_command_reports_the_group_it_joined_not_its_own_pid() {
        let mut leader = Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("start a group leader");
        let leader_pid = leader.id();
        let child = spawn_remote("true", "1", i32::try_from(leader_pid).expect("pid"), "");
        let pid = child.id();

        let (group, stderr) = reported_group(child);
        let _ = leader.kill();
        let _ = leader.wait();

        assert_ne!(pid, leader_pid);
        assert_eq!(group, Some(leader_pid), "{stderr}");
    }

    #[test]
    fn the_script_and_its_children_carry_the_run_marker() {
        let child = spawn_remote(
            "sh",
            "abc123",
            0,
            "echo \"shell=$HYPERJOB_RUN_ID\"; sh -c 'echo \"child=$HYPERJOB_RUN_ID\"'\n",
        );

        let output = child.wait_with_output().expect("wait");

        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "shell=abc123\nchild=abc123\n"
        );
    }

    #[test]
    fn run_ids_are_hex_and_differ() {
        let (a, b) = (new_run_id(), new_run_id());

        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn kill_command_targets_the_group_and_the_marker() {
        let command = kill_command(Some(4321), "beef");

        assert!(
            command.starts_with("trap '' TERM HUP; (kill -TERM -4321 "),
            "{command}"
        );
        assert!(
            command.contains("; kill -KILL -4321 2>/dev/null; )"),
            "{command}"
        );
        assert!(
            command.contains("grep -lF \"HYPERJOB_RUN_ID=beef\" /proc/[0-9]*/environ"),
            "{command}"
        );
        assert!(
            command.contains("kill -TERM \"${p%/environ}\""),
            "{command}"
        );
        assert!(
            command.contains("kill -KILL \"${p%/environ}\""),
            "{command}"
        );
        assert!(!kill_command(None, "beef").contains("-4321"));
    }

    /// The real thing, on this machine: a script whose shell ignores SIGTERM, with one child
    /// that left the group with `setsid`, one that did so and ignores SIGTERM too, and one that
    /// stayed in the group but dropped its environment (so only the group reaches it). The kill
    /// command, run by `login_shell` without the marker — in the script's own process group as
    /// under dropbear, or in a group of its own as under OpenSSH — ends all of them.
    fn kill_command_stops_everything(login_shell: &str, in_the_scripts_group: bool) {
        let run_id = new_run_id();
        let mut child = spawn_remote(
            "sh",
            &run_id,
            0,
            "setsid sleep 300 & echo \"$!\"\n\
             trap '' TERM\n\
             setsid sleep 301 & echo \"$!\"\n\
             env -i sleep 302 & echo \"$!\"\n\
             exec sleep 303\n",
        );
        let pid = child.id();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut read_pid = || {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read a pid");
            line.trim().parse::<u32>().expect("a pid")
        };
        let (escaped, escaped_ignoring, unmarked) = (read_pid(), read_pid(), read_pid());
        let _reaper = KillOnDrop(vec![pid, escaped, escaped_ignoring, unmarked]);
        let stat_field = |pid: u32, index: usize| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let rest = stat.rsplit_once(") ").map(|(_, rest)| rest.to_owned());
            rest.and_then(|rest| rest.split(' ').nth(index).map(str::to_owned))
        };
        wait_until("the children are set up", Duration::from_secs(10), || {
            stat_field(escaped, 3) == Some(escaped.to_string())
                && stat_field(escaped_ignoring, 3) == Some(escaped_ignoring.to_string())
                && stat_field(unmarked, 2) == Some(pid.to_string())
                && std::fs::read(format!("/proc/{unmarked}/environ")).is_ok_and(|e| e.is_empty())
        });

        let group = if in_the_scripts_group {
            i32::try_from(pid).expect("pid")
        } else {
            0
        };
        let status = Command::new(login_shell)
            .arg("-c")
            .arg(kill_command(Some(pid), &run_id))
            .env_remove(RUN_ID_VAR)
            .process_group(group)
            .status()
            .expect("run the kill command");
        wait_until("the script's shell ends", Duration::from_secs(10), || {
            child.try_wait().expect("try_wait").is_some()
        });
        let exit = child.wait().expect("wait for the script");

        assert!(status.success());
        // The script's shell ignored SIGTERM: only the delayed SIGKILL ended it.
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&exit),
            Some(9)
        );
        wait_until("every child dies", Duration::from_secs(10), || {
            is_dead(escaped) && is_dead(escaped_ignoring) && is_dead(unmarked)
        });
    }

    #[test]
    fn kill_command_from_sh_in_a_group_of_its_own_stops_the_whole_tree() {
        kill_command_stops_everything("sh", false);
    }

    #[test]
    fn kill_command_from_sh_inside_the_scripts_group_stops_the_whole_tree() {
        kill_command_stops_everything("sh", true);
    }

    #[test]
    fn kill_command_from_bash_inside_the_scripts_group_stops_the_whole_tree() {
        kill_command_stops_everything("bash", true);
    }

    #[test]
    fn pid_line_is_taken_off_stderr_even_when_split() {
        let mut capture = PidCapture::default();

        let first = capture.feed(b"hyperjob-remote-p").into_owned();
        let second = capture.feed(b"gid 77\nreal stderr\n").into_owned();
        let third = capture.feed(b"more\n").into_owned();

        assert_eq!(capture.pid(), Some(77));
        assert!(first.is_empty());
        assert_eq!(second, b"real stderr\n");
        assert_eq!(third, b"more\n");
        assert!(
            capture.finish().is_empty(),
            "the marker line must not come back at the end"
        );
    }

    #[test]
    fn stderr_without_the_marker_passes_through_untouched() {
        let mut capture = PidCapture::default();

        let out = capture.feed(b"some shell complaint\nnext\n").into_owned();

        assert_eq!(capture.pid(), None);
        assert_eq!(out, b"some shell complaint\nnext\n");
    }

    #[test]
    fn a_short_unterminated_stream_is_returned_by_finish() {
        let mut capture = PidCapture::default();

        let fed = capture.feed(b"*\xfb").into_owned();
        let rest = capture.finish();

        assert!(fed.is_empty());
        assert_eq!(rest, b"*\xfb");
        assert!(capture.finish().is_empty());
    }

    #[test]
    fn process_groups_0_and_1_are_never_targeted() {
        for marker in [
            &b"hyperjob-remote-pgid 1\n"[..],
            b"hyperjob-remote-pgid 0\n",
        ] {
            let mut capture = PidCapture::default();

            let _ = capture.feed(marker);

            assert_eq!(capture.pid(), None);
        }
    }

    #[test]
    fn long_first_line_without_newline_is_not_held_back() {
        let mut capture = PidCapture::default();

        let out = capture.feed(&[b'x'; 100]).into_owned();

        assert_eq!(out.len(), 100);
        assert_eq!(capture.pid(), None);
    }
}
