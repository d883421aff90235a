//! Which process is the job's runner, and whether it is still alive.
//!
//! GitLab Runner starts every stage of a job as its child. If the runner dies (crash, restart,
//! host reboot) it never calls `cleanup_exec`; prepare therefore records the runner's identity
//! and `hyperjob gc` treats a job whose runner is gone as gone. A pid alone could be reused by
//! another process, so the identity also holds the process's start time (in clock ticks since
//! boot) and the kernel's boot id, so a process of a later boot is never mistaken for it.
//!
//! The runner is the nearest ancestor that is not a shell: a wrapper script in `prepare_exec`
//! (`sh -c 'hyperjob prepare'`, or a script without `exec`) is skipped, since it ends when the
//! stage does while the runner lives on. A process is a shell when the program it runs
//! (`/proc/PID/exe`; a script's is its interpreter) is one, or, where that link cannot be read
//! (another user's process), when its name (`/proc/PID/comm`) is.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Program names skipped when looking for the runner.
const SHELLS: &[&str] = &[
    "sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox", "fish", "tcsh", "csh",
];

/// A process, identified so that a reused pid does not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat`: clock ticks after boot when the process started.
    pub start_ticks: u64,
    /// `/proc/sys/kernel/random/boot_id` when it was recorded.
    pub boot_id: String,
    /// Its program name, for messages.
    pub comm: String,
}

/// What `/proc/PID/stat` says about one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    pub state: char,
    pub ppid: u32,
    pub start_ticks: u64,
}

/// Parses `/proc/PID/stat`. The program name is in parentheses and may itself hold spaces and
/// parentheses, so the fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // After the name: state (field 3), ppid (4), ... starttime (22).
    Some(Stat {
        comm,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

fn stat_of(proc_root: &Path, pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?)
}

/// Whether process `pid` (named `comm`) runs a shell.
fn is_shell(proc_root: &Path, pid: u32, comm: &str) -> bool {
    let program = std::fs::read_link(proc_root.join(pid.to_string()).join("exe"))
        .ok()
        .and_then(|exe| Some(exe.file_name()?.to_string_lossy().into_owned()));
    SHELLS.contains(&program.as_deref().unwrap_or(comm))
}

fn boot_id(proc_root: &Path) -> Option<String> {
    let text = std::fs::read_to_string(proc_root.join("sys/kernel/random/boot_id")).ok()?;
    Some(text.trim().to_string()).filter(|id| !id.is_empty())
}

/// The runner of this process: its nearest ancestor that is not a shell, or `None` when there
/// is none but init (hyperjob was started by no runner at all) or `/proc` cannot tell.
pub fn current_runner() -> Option<ProcessIdentity> {
    runner_of(Path::new("/proc"), std::process::id())
}

/// [`current_runner`] of process `pid`, reading `proc_root` (normally `/proc`).
pub fn runner_of(proc_root: &Path, pid: u32) -> Option<ProcessIdentity> {
    let boot_id = boot_id(proc_root)?;
    let mut pid = stat_of(proc_root, pid)?.ppid;
    // A bounded walk: a cycle in a faked /proc must not hang.
    for _ in 0..64 {
        if pid <= 1 {
            return None;
        }
        let stat = stat_of(proc_root, pid)?;
        if !is_shell(proc_root, pid, &stat.comm) {
            return Some(ProcessIdentity {
                pid,
                start_ticks: stat.start_ticks,
                boot_id,
                comm: stat.comm,
            });
        }
        pid = stat.ppid;
    }
    None
}

/// Process `pid` as it runs now, reading `proc_root` (normally `/proc`); `None` when it does
/// not run or `/proc` cannot tell.
pub fn identity_of(proc_root: &Path, pid: u32) -> Option<ProcessIdentity> {
    let boot_id = boot_id(proc_root)?;
    let stat = stat_of(proc_root, pid)?;
    Some(ProcessIdentity {
        pid,
        start_ticks: stat.start_ticks,
        boot_id,
        comm: stat.comm,
    })
}

impl ProcessIdentity {
    /// Whether both name the same process (its name may change when it execs).
    pub fn is_same_process(&self, other: &ProcessIdentity) -> bool {
        self.pid == other.pid
            && self.start_ticks == other.start_ticks
            && self.boot_id == other.boot_id
    }
}

/// Whether the recorded process still runs: same boot, same pid, same start time, not a
/// zombie. `None` when this cannot be told (no `/proc`).
pub fn is_alive(proc_root: &Path, process: &ProcessIdentity) -> Option<bool> {
    let now = boot_id(proc_root)?;
    if now != process.boot_id {
        return Some(false);
    }
    Some(
        stat_of(proc_root, process.pid)
            .is_some_and(|stat| stat.start_ticks == process.start_ticks && stat.state != 'Z'),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_line(pid: u32, comm: &str, state: char, ppid: u32, start: u64) -> String {
        format!(
            "{pid} ({comm}) {state} {ppid} 1 1 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {start} \
             1000 100 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
        )
    }

    /// A fake `/proc`: (pid, comm, state, ppid, start ticks); `exe` links where given.
    fn fake_proc_with_exe(
        processes: &[(u32, &str, char, u32, u64)],
        exe: &[(u32, &str)],
    ) -> tempfile::TempDir {
        let root = fake_proc(processes);
        for &(pid, program) in exe {
            std::os::unix::fs::symlink(program, root.path().join(pid.to_string()).join("exe"))
                .expect("exe link");
        }
        root
    }

    /// A fake `/proc`: (pid, comm, state, ppid, start ticks).
    fn fake_proc(processes: &[(u32, &str, char, u32, u64)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("sys/kernel/random")).expect("mkdir");
        std::fs::write(root.path().join("sys/kernel/random/boot_id"), "boot-a\n").expect("boot");
        for &(pid, comm, state, ppid, start) in processes {
            let dir = root.path().join(pid.to_string());
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("stat"), stat_line(pid, comm, state, ppid, start))
                .expect("stat");
        }
        root
    }

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let stat = parse_stat(&stat_line(42, "odd) (name x", 'S', 7, 123456)).expect("parse");

        assert_eq!(
            stat,
            Stat {
                comm: "odd) (name x".into(),
                state: 'S',
                ppid: 7,
                start_ticks: 123456
            }
        );
        assert_eq!(parse_stat("42 (short) S 7"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn the_runner_is_the_nearest_ancestor_that_is_not_a_shell() {
        let proc = fake_proc(&[
            (300, "hyperjob", 'R', 200, 9),
            (200, "sh", 'S', 150, 8),
            (150, "bash", 'S', 100, 7),
            (100, "gitlab-runner", 'S', 1, 5),
        ]);

        let runner = runner_of(proc.path(), 300).expect("runner");

        assert_eq!(
            runner,
            ProcessIdentity {
                pid: 100,
                start_ticks: 5,
                boot_id: "boot-a".into(),
                comm: "gitlab-runner".into()
            }
        );
    }

    #[test]
    fn a_wrapper_script_is_a_shell_by_its_interpreter_and_a_perl_wrapper_is_not() {
        let proc = fake_proc_with_exe(
            &[
                (300, "hyperjob", 'R', 200, 9),
                (200, "prepare-wrap", 'S', 150, 8),
                (150, "wrap.pl", 'S', 100, 7),
                (100, "gitlab-runner", 'S', 1, 5),
            ],
            &[(200, "/usr/bin/dash"), (150, "/usr/bin/perl")],
        );

        let runner = runner_of(proc.path(), 300).expect("runner");

        assert_eq!((runner.pid, runner.comm.as_str()), (150, "wrap.pl"));
    }

    #[test]
    fn no_runner_when_only_init_or_shells_are_above() {
        let proc = fake_proc(&[(300, "hyperjob", 'R', 200, 9), (200, "sh", 'S', 1, 8)]);

        assert_eq!(runner_of(proc.path(), 300), None);
    }

    #[test]
    fn a_runner_is_alive_only_with_the_same_start_time_on_the_same_boot() {
        let proc = fake_proc(&[(100, "gitlab-runner", 'S', 1, 5), (101, "other", 'Z', 1, 6)]);
        let runner = ProcessIdentity {
            pid: 100,
            start_ticks: 5,
            boot_id: "boot-a".into(),
            comm: "gitlab-runner".into(),
        };

        assert_eq!(is_alive(proc.path(), &runner), Some(true));
        let reused = ProcessIdentity {
            start_ticks: 4,
            ..runner.clone()
        };
        assert_eq!(is_alive(proc.path(), &reused), Some(false));
        let earlier_boot = ProcessIdentity {
            boot_id: "boot-0".into(),
            ..runner.clone()
        };
        assert_eq!(is_alive(proc.path(), &earlier_boot), Some(false));
        let exited = ProcessIdentity {
            pid: 555,
            ..runner.clone()
        };
        assert_eq!(is_alive(proc.path(), &exited), Some(false));
        let zombie = ProcessIdentity {
            pid: 101,
            start_ticks: 6,
            ..runner
        };
        assert_eq!(is_alive(proc.path(), &zombie), Some(false));
    }

    #[test]
    fn a_process_is_identified_by_pid_start_time_and_boot_not_by_name() {
        let proc = fake_proc(&[(100, "hyperjob", 'S', 1, 5)]);

        let identity = identity_of(proc.path(), 100).expect("identity");
        let renamed = ProcessIdentity {
            comm: "other".into(),
            ..identity.clone()
        };
        let reused = ProcessIdentity {
            start_ticks: 6,
            ..identity.clone()
        };

        assert_eq!((identity.pid, identity.start_ticks), (100, 5));
        assert!(identity.is_same_process(&renamed));
        assert!(!identity.is_same_process(&reused));
        assert_eq!(identity_of(proc.path(), 101), None);
    }

    #[test]
    fn this_test_process_has_a_living_runner() {
        let runner = current_runner().expect("cargo test runs under a parent");

        assert_eq!(is_alive(Path::new("/proc"), &runner), Some(true));
        assert_ne!(runner.pid, std::process::id());
    }
}
