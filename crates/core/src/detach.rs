//! Starting a hyperjob process that outlives the stage that starts it (the pool's refill, a
//! job's relay): its own session (no signal to the stage's process group reaches it), no stdio
//! (nothing holds the runner's pipes open), and a clean environment: never the job's variables.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts `hyperjob --config <config_path> <args…>` detached, without waiting for it.
pub fn spawn_hyperjob(config_path: &Path, args: &[&str]) -> std::io::Result<Child> {
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
    if let Some(log) = std::env::var_os("HYPERJOB_LOG") {
        command.env("HYPERJOB_LOG", log);
    }
    // SAFETY: setsid(2) is async-signal-safe and touches nothing of the parent.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    command.spawn()
}
