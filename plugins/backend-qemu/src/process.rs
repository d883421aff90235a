//! Finding, proving and stopping a VM's QEMU process — never anything else.
//!
//! QEMU runs detached (`-daemonize`), so it is not our child: all we have is a pid from the
//! state file or QEMU's pid file, and pids are recycled. A pid counts as this VM's QEMU only
//! while its `/proc/<pid>/cmdline` holds `-drive <this VM's overlay drive>` (the overlay's full
//! path is unique per VM). Signals go through a pidfd opened *before* that check, so the
//! process checked is the process signalled even if the pid is recycled in between.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::argv::overlay_drive;

/// A loopback TCP port that was free a moment ago.
///
/// The port is released before QEMU binds it, so another process may take it in between;
/// QEMU then fails to start with "Could not set up host forwarding rule" and the caller tries
/// again with a new port (see `QemuBackend::create`).
pub fn pick_free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Whether an argv (NUL-separated, as in `/proc/<pid>/cmdline`) runs the VM whose disk is
/// `overlay`: it holds `-drive` followed by exactly that VM's overlay drive.
pub fn argv_runs_overlay(cmdline: &[u8], overlay: &Path) -> bool {
    let drive: OsString = overlay_drive(overlay);
    let drive = drive.as_bytes();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|pair| pair[0] == b"-drive" && pair[1] == drive)
}

/// Whether `pid` is, right now, a live process running this VM's QEMU. A zombie has an
/// empty command line, so it is not.
pub fn is_our_qemu(pid: u32, overlay: &Path) -> bool {
    pid > 1
        && fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| argv_runs_overlay(&cmdline, overlay))
}

/// Every live process running this VM's QEMU (the last resort when no pid is known).
pub fn find_our_qemus(overlay: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| is_our_qemu(*pid, overlay))
        .collect()
}

/// A process proven to be this VM's QEMU, held by a pidfd.
#[derive(Debug)]
pub struct OurQemu {
    pub pid: u32,
    pidfd: OwnedFd,
}

impl OurQemu {
    /// Opens `pid` and keeps it only if it runs this VM's QEMU.
    pub fn open(pid: u32, overlay: &Path) -> io::Result<Option<Self>> {
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(err) if err.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(err) => return Err(err),
        };
        // Checked after the pidfd exists: if `pid` was recycled before it was opened, the
        // check sees the newcomer's command line and fails; the pidfd cannot be recycled.
        if !is_our_qemu(pid, overlay) {
            return Ok(None);
        }
        Ok(Some(Self { pid, pidfd }))
    }

    /// Waits up to `timeout` for the process to exit; true once it has.
    pub fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match sys::poll_readable(&self.pidfd, left) {
                Ok(exited) => {
                    if exited || left.is_zero() {
                        return Ok(exited);
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// SIGKILL. A process that already exited is fine.
    pub fn kill(&self) -> io::Result<()> {
        match sys::pidfd_send_signal(&self.pidfd, libc::SIGKILL) {
            Err(err) if err.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }
}

/// The few system calls std has no safe wrapper for.
mod sys {
    use super::*;

    pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
        let pid =
            libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open(2) takes two integers and returns a new file descriptor or -1;
        // no memory is shared with the kernel.
        #[allow(unsafe_code)]
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        #[allow(unsafe_code)]
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn pidfd_send_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal(2) with a valid pidfd we own, a signal number, a null
        // siginfo (allowed: the kernel fills in a default) and no flags.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A pidfd becomes readable when its process exits.
    pub fn poll_readable(fd: &OwnedFd, timeout: Duration) -> io::Result<bool> {
        let mut pollfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid, exclusively borrowed pollfd and a count of 1.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::poll(&mut pollfd, 1, millis) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc > 0)
    }
}

/// Stand-ins for a VM's QEMU in unit tests: real processes whose argv holds the VM's drive.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::is_our_qemu;
    use crate::argv::overlay_drive;

    /// A real process whose argv holds `-drive <overlay drive>` like QEMU's: `sh` waiting on
    /// its stdin (held open by the returned `Child`) with the drive as a positional argument,
    /// and no child process of its own. Returns once `/proc` shows that command line (spawn
    /// returns right after fork, before the exec).
    pub(crate) fn qemu_lookalike(overlay: &Path) -> Child {
        let child = Command::new("sh")
            .arg("-c")
            .arg("read line")
            .arg("sh")
            .arg("-drive")
            .arg(overlay_drive(overlay))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn sh");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_our_qemu(child.id(), overlay) {
            assert!(
                Instant::now() < deadline,
                "pid {} never looked like ours",
                child.id()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    /// SIGKILLs and reaps a lookalike: afterwards it is really gone.
    pub(crate) fn kill_and_reap(mut child: Child) {
        use std::os::unix::process::ExitStatusExt;
        child.kill().expect("kill");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::test_support::qemu_lookalike;
    use super::*;

    #[test]
    fn argv_must_hold_exactly_our_drive_after_a_drive_flag() {
        let overlay = Path::new("/i/hyperjob-job-3.qcow2");
        let drive = overlay_drive(overlay);
        let mut ours = b"qemu-system-x86_64\0-m\x00512\0-drive\0".to_vec();
        ours.extend_from_slice(drive.as_bytes());
        ours.push(0);
        let mut other_vm = b"qemu-system-x86_64\0-drive\0".to_vec();
        other_vm.extend_from_slice(overlay_drive(Path::new("/i/hyperjob-job-33.qcow2")).as_bytes());
        let mut no_flag = b"grep\0".to_vec();
        no_flag.extend_from_slice(drive.as_bytes());

        assert!(argv_runs_overlay(&ours, overlay));
        assert!(!argv_runs_overlay(&other_vm, overlay));
        assert!(!argv_runs_overlay(&no_flag, overlay));
        assert!(!argv_runs_overlay(b"", overlay));
    }

    #[test]
    fn a_real_process_is_recognised_killed_and_then_no_longer_ours() {
        let dir = tempfile::tempdir().expect("tempdir");
        let overlay = dir.path().join("hyperjob-job-1.qcow2");
        let other = dir.path().join("hyperjob-job-2.qcow2");
        let mut child = qemu_lookalike(&overlay);
        let pid = child.id();

        // Really alive and really ours: our child, not exited, reachable through its pidfd.
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "exited early"
        );
        assert!(!is_our_qemu(pid, &other));
        assert_eq!(find_our_qemus(&overlay), vec![pid]);
        assert!(OurQemu::open(pid, &other).expect("open").is_none());
        let ours = OurQemu::open(pid, &overlay)
            .expect("open")
            .expect("is ours");
        assert_eq!(ours.pid, pid);
        sys::pidfd_send_signal(&ours.pidfd, 0).expect("signal 0 reaches a live process");
        assert!(!ours.wait_exit(Duration::ZERO).expect("poll"));
        assert!(child.try_wait().expect("try_wait").is_none(), "exited");

        ours.kill().expect("kill");
        assert!(ours.wait_exit(Duration::from_secs(30)).expect("poll"));
        // Not reaped yet: a zombie, whose empty command line is nobody's QEMU.
        assert!(!is_our_qemu(pid, &overlay));
        ours.kill().expect("killing an exited process is fine");
        let status = child.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));

        // Really gone: reaped. The pidfd names that very process, so a recycled pid cannot
        // stand in for it.
        let gone = sys::pidfd_send_signal(&ours.pidfd, 0).expect_err("reaped");
        assert_eq!(gone.raw_os_error(), Some(libc::ESRCH));
        assert!(find_our_qemus(&overlay).is_empty());
        assert!(OurQemu::open(pid, &overlay).expect("open").is_none());
    }

    #[test]
    fn a_process_of_another_vm_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let overlay = dir.path().join("hyperjob-job-1.qcow2");
        let mut bystander = qemu_lookalike(&dir.path().join("hyperjob-job-10.qcow2"));

        let opened = OurQemu::open(bystander.id(), &overlay).expect("open");

        assert!(opened.is_none());
        assert!(bystander.try_wait().expect("try_wait").is_none(), "killed");
        test_support::kill_and_reap(bystander);
    }

    #[test]
    fn a_pid_that_does_not_exist_is_not_ours() {
        // pid_max is at most 2^22 on Linux.
        let pid = 4_194_304 + 7;
        let overlay = PathBuf::from("/nonexistent/vm.qcow2");

        assert!(!is_our_qemu(pid, &overlay));
        assert!(OurQemu::open(pid, &overlay).expect("open").is_none());
        assert!(!is_our_qemu(1, &overlay));
    }

    /// `pick_free_port` releases the port before QEMU binds it, so no test can prove the port
    /// is still free later (another process may take it; `QemuBackend::create` retries with a
    /// new port by design, see `a_port_taken_meanwhile_is_retried_with_another…` in lib.rs).
    /// What holds regardless: the kernel hands out an ephemeral port, never one that is held.
    #[test]
    fn a_picked_port_is_an_ephemeral_port_that_nobody_holds_when_picked() {
        let held: Vec<TcpListener> = (0..8)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind"))
            .collect();
        let held_ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().expect("addr").port())
            .collect();
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .expect("ephemeral port range");
        let bounds: Vec<u16> = range
            .split_whitespace()
            .map(|n| n.parse().expect("port number"))
            .collect();

        let picked: Vec<u16> = (0..32).map(|_| pick_free_port().expect("port")).collect();

        for port in picked {
            assert!(
                (bounds[0]..=bounds[1]).contains(&port),
                "{port} outside {range:?}"
            );
            assert!(!held_ports.contains(&port), "{port} is held by this test");
        }
        drop(held);
    }
}
