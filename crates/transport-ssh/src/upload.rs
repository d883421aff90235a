//! [`hyperjob_core::Transport::upload`] over SSH: the file's bytes are piped to `cat` in an
//! exec channel (no SFTP subsystem or `scp` needed, so it works with dropbear too), into a
//! file beside the target; the guest checks the size that arrived, sets the mode and renames
//! it into place, so the target is never seen half-written.

use std::io::{Read, Write};
use std::sync::atomic::Ordering;

use hyperjob_core::Upload;
use ssh2::Session;

use crate::{channel_error, SshError};

/// Bytes per write: large enough to keep libssh2's window busy.
const CHUNK: usize = 256 << 10;

/// The guest-side command: make the parent directory, receive into `<remote>.hyperjob-<id>`,
/// check its size, set its mode, rename it over `remote`.
pub(crate) fn remote_command(remote: &str, size: u64, mode: u32, id: &str) -> String {
    let dir = match remote.rfind('/') {
        Some(0) | None => "/".to_string(),
        Some(at) => remote[..at].to_string(),
    };
    let part = quote(&format!("{remote}.hyperjob-{id}"));
    let (dir, remote) = (quote(&dir), quote(remote));
    format!(
        "set -e; mkdir -p {dir}; (umask 077; cat > {part}); n=$(wc -c < {part}); \
         if [ \"$n\" -ne {size} ]; then rm -f {part}; echo \"received $n of {size} bytes\" >&2; exit 3; fi; \
         chmod {mode:o} {part}; mv -f {part} {remote}"
    )
}

/// `text` as one single-quoted shell word.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// Checks what the transport will put into a shell command.
pub(crate) fn check_remote(remote: &str) -> Result<(), String> {
    if !remote.starts_with('/') || remote.ends_with('/') {
        return Err(format!("{remote:?} is not an absolute file path"));
    }
    if remote.chars().any(char::is_control) {
        return Err(format!("{remote:?} contains a control character"));
    }
    Ok(())
}

/// Sends `file` (`size` bytes) as `upload` says over `session`.
pub(crate) fn send(
    session: &Session,
    upload: &Upload<'_>,
    mut file: impl Read,
    size: u64,
) -> Result<(), SshError> {
    let mut channel = session
        .channel_session()
        .map_err(|e| channel_error("opening a channel", &e))?;
    let command = remote_command(upload.remote, size, upload.mode, &crate::new_run_id());
    channel
        .exec(&command)
        .map_err(|e| channel_error("starting the copy", &e))?;
    let mut buffer = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < size {
        if upload.cancel.load(Ordering::Relaxed) {
            return Err(SshError::Interrupted("while copying the file"));
        }
        let want = usize::try_from((size - sent).min(CHUNK as u64)).unwrap_or(CHUNK);
        let read = file
            .read(&mut buffer[..want])
            .map_err(|e| SshError::Channel {
                what: "reading the local file",
                message: e.to_string(),
            })?;
        if read == 0 {
            return Err(SshError::Channel {
                what: "reading the local file",
                message: format!("it ended after {sent} of {size} bytes"),
            });
        }
        channel
            .write_all(&buffer[..read])
            .map_err(|e| SshError::Channel {
                what: "sending the file",
                message: e.to_string(),
            })?;
        sent += read as u64;
    }
    channel
        .send_eof()
        .map_err(|e| channel_error("ending the file", &e))?;
    let mut stderr = String::new();
    let _ = channel.stderr().read_to_string(&mut stderr);
    let mut sink = Vec::new();
    let _ = channel.read_to_end(&mut sink);
    channel
        .wait_close()
        .map_err(|e| channel_error("closing the copy's channel", &e))?;
    match channel.exit_status() {
        Ok(0) => Ok(()),
        Ok(code) => Err(SshError::Channel {
            what: "the copy in the guest",
            message: format!("exited with {code}: {}", stderr.trim()),
        }),
        Err(e) => Err(channel_error("reading the copy's exit status", &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(command: &str, input: &[u8]) -> std::process::Output {
        let mut child = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(command)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write");
        child.wait_with_output().expect("wait")
    }

    #[test]
    fn the_guest_command_puts_a_complete_file_in_place_with_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("new dir/it's here");
        let target_text = target.to_str().expect("utf-8");

        let output = run(&remote_command(target_text, 5, 0o755, "abc"), b"hello");

        assert!(output.status.success(), "{output:?}");
        assert_eq!(std::fs::read(&target).expect("target"), b"hello");
        let mode = std::fs::metadata(&target)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let left: Vec<_> = std::fs::read_dir(target.parent().expect("dir"))
            .expect("list")
            .collect();
        assert_eq!(left.len(), 1, "no part file is left");
    }

    #[test]
    fn a_short_file_never_replaces_the_target() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("gitlab-runner");
        std::fs::write(&target, b"old").expect("old");

        let output = run(
            &remote_command(target.to_str().expect("utf-8"), 10, 0o755, "abc"),
            b"short",
        );

        assert_eq!(output.status.code(), Some(3));
        assert!(String::from_utf8_lossy(&output.stderr).contains("received 5 of 10 bytes"));
        assert_eq!(std::fs::read(&target).expect("target"), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1);
    }

    #[test]
    fn only_absolute_file_paths_without_control_characters_are_taken() {
        assert!(check_remote("/usr/local/bin/gitlab-runner").is_ok());
        for bad in ["gitlab-runner", "/usr/local/bin/", "/tmp/a\nb", ""] {
            assert!(check_remote(bad).is_err(), "{bad:?}");
        }
    }
}
