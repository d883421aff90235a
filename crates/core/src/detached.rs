//! Starting hyperjob again as a detached background process: its own session (the runner's
//! kill of a stage's process group never reaches it), no stdio (the runner waits for a stage's
//! output to end, so a child holding it would stretch the stage), and a clean environment
//! (never the job's variables).

use std::path::Path;
use std::process::{Command, Stdio};

/// Starts `hyperjob --config CONFIG_PATH ARGS...` detached, without waiting for it.
pub fn spawn(config_path: &Path, args: &[&str]) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
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
    command.spawn().map(drop)
}
