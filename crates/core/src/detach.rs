//! Starting a hyperjob process that outlives the stage that starts it (the pool's refill, a
//! job's relay): its own session (no signal to the stage's process group reaches it), no stdio
//! (nothing holds the runner's pipes open), and a clean environment: never the job's variables.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The descriptor number a passed descriptor has in the started process.
pub const PASSED_FD: i32 = 3;

/// Starts `hyperjob --config <config_path> <args…>` detached, without waiting for it; `pass`,
/// if given, is its descriptor [`PASSED_FD`] (every other descriptor is closed on exec).
pub fn spawn_hyperjob(
    config_path: &Path,
    args: &[&str],
    pass: Option<BorrowedFd<'_>>,
) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut command = Command::new(exe);
    command
        .arg("--config")
        .arg(config_path)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for name in ["HYPERJOB_LOG", "HYPERJOB_LOG_FORMAT"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    let pass = pass.map(|fd| fd.as_raw_fd());
    // SAFETY: setsid(2), dup2(2) and fcntl(2) are async-signal-safe and act on the child only;
    // `pass` is open in the parent for the whole spawn (it is borrowed across this call).
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            libc::setsid();
            if let Some(fd) = pass {
                // dup2 onto itself would keep close-on-exec: clear it instead.
                let moved = if fd == PASSED_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, PASSED_FD)
                };
                if moved < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    command.spawn()
}
