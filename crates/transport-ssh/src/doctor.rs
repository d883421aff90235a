//! The SSH transport's part of `hyperjob doctor`: the pinned host keys and the client key.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use hyperjob_core::Check;

use crate::config::{HostKeyPolicy, SshConfig};
use crate::known_hosts;

/// One check each for the host keys and the client key.
pub fn checks(config: &SshConfig) -> Vec<Check> {
    let mut checks = vec![host_keys(&config.host_keys)];
    if let Some(identity) = &config.identity_file {
        checks.push(identity_file(identity));
    }
    checks
}

fn host_keys(policy: &HostKeyPolicy) -> Check {
    match policy {
        HostKeyPolicy::PerJob => {
            Check::pass("ssh host keys: a fresh host key per job (guest_keys = \"per-job\")")
        }
        HostKeyPolicy::InsecureIgnore => Check::fail(
            "ssh host keys",
            "insecure_ignore_host_key = true: any guest (or anyone on its network) is trusted; \
             pin the image's keys in known_hosts or use guest_keys = \"per-job\"",
        ),
        HostKeyPolicy::KnownHosts(path) => {
            let what = format!("ssh known_hosts {}", path.display());
            match std::fs::read_to_string(path) {
                Err(err) => Check::fail(what, format!("cannot read it: {err}")),
                Ok(text) => {
                    let keys = known_hosts::parse(&text);
                    if keys.is_empty() {
                        return Check::fail(
                            what,
                            "holds no host key hyperjob can read (lines like \
                             `* ssh-ed25519 AAAA…` or the image's ssh_host_*_key.pub)",
                        );
                    }
                    let mut types: Vec<&str> = keys.iter().map(|k| k.key_type.as_str()).collect();
                    types.sort_unstable();
                    types.dedup();
                    Check::pass(format!(
                        "{what}: {} key(s), type(s) {}",
                        keys.len(),
                        types.join(", ")
                    ))
                }
            }
        }
    }
}

fn identity_file(path: &Path) -> Check {
    let what = format!("ssh identity_file {}", path.display());
    match std::fs::metadata(path) {
        Err(err) => Check::fail(what, format!("cannot read it: {err}")),
        Ok(meta) if !meta.is_file() => Check::fail(what, "is not a file"),
        Ok(meta) if meta.mode() & 0o077 != 0 => Check::fail(
            what,
            format!(
                "is mode {:04o}: a private key must be readable by its owner only (chmod 0600)",
                meta.mode() & 0o7777
            ),
        ),
        Ok(_) => match std::fs::read_to_string(path) {
            Ok(text) if text.contains("PRIVATE KEY-----") => {
                Check::pass(format!("{what}: a private key, 0600"))
            }
            Ok(_) => Check::fail(what, "is not a private key in PEM/OpenSSH form"),
            Err(err) => Check::fail(what, format!("cannot read it: {err}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn readable_pinned_keys_and_a_private_key_pass_and_problems_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let known = dir.path().join("known_hosts");
        std::fs::write(
            &known,
            "* ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKzz1zJ9bM5hEpVhYgk6Qm1vGZ8sxo4Yv1mT3b5wR4Jx c\n",
        )
        .expect("write");
        let key = dir.path().join("id");
        std::fs::write(&key, "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n").expect("write");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");

        assert!(host_keys(&HostKeyPolicy::KnownHosts(known.clone())).ok);
        assert!(identity_file(&key).ok);

        std::fs::write(&known, "# nothing\n").expect("write");
        assert!(host_keys(&HostKeyPolicy::KnownHosts(known))
            .fix
            .is_some_and(|f| f.contains("no host key")));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(identity_file(&key)
            .fix
            .is_some_and(|f| f.contains("mode 0644")));
        assert!(!host_keys(&HostKeyPolicy::InsecureIgnore).ok);
        assert!(!identity_file(&dir.path().join("missing")).ok);
    }
}
