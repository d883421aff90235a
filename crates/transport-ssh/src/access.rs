//! The OpenSSH command with which the host's administrator reaches a guest held for debugging
//! (`[debug_hold]`): the transport's own client key (the configured `identity_file`, or the
//! job's per-job key) and only the guest's pinned host keys, written for the guest's address to
//! a known_hosts file of the job, so the first connection is verified like the transport's own.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine as _;
use hyperjob_core::{Address, Endpoint, PluginError};

use crate::config::{HostKeyPolicy, SshConfig};
use crate::known_hosts::HostKey;

/// The file written in the job's directory.
pub const KNOWN_HOSTS_FILE: &str = "known_hosts";

/// Writes `dir/known_hosts` and returns the `ssh` command line (program and arguments).
pub fn command(
    config: &SshConfig,
    pinned: &[HostKey],
    endpoint: &Endpoint,
    dir: &Path,
) -> Result<Vec<String>, PluginError> {
    // OpenSSH reaches a UNIX socket or vsock only through a helper program (socat), which
    // hyperjob does not require.
    let Address::Tcp { host, port } = &endpoint.address else {
        return Err(PluginError::Unsupported(
            "access_command for an endpoint other than TCP",
        ));
    };
    let port = port.unwrap_or(config.port);
    let identity = endpoint
        .identity_file
        .as_ref()
        .or(config.identity_file.as_ref())
        .ok_or_else(|| PluginError::Config("there is no client key to log in with".into()))?;
    let keys: Vec<String> = match (&endpoint.host_key, &config.host_keys) {
        // The job's own host key: `ssh-ed25519 AAAA… comment`.
        (Some(key), _) => vec![key.split_whitespace().take(2).collect::<Vec<_>>().join(" ")],
        (None, HostKeyPolicy::KnownHosts(_)) => pinned
            .iter()
            .map(|key| {
                format!(
                    "{} {}",
                    key.key_type,
                    base64::engine::general_purpose::STANDARD.encode(&key.blob)
                )
            })
            .collect(),
        (None, _) => {
            return Err(PluginError::Config(
                "the guest's host key is not pinned (insecure_ignore_host_key = true)".into(),
            ))
        }
    };
    let known_as = if port == 22 {
        host.clone()
    } else {
        format!("[{host}]:{port}")
    };
    let text: String = keys
        .iter()
        .map(|key| format!("{known_as} {key}\n"))
        .collect();
    let path = dir.join(KNOWN_HOSTS_FILE);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()
    };
    write().map_err(|err| PluginError::system(format!("cannot write {}", path.display()), err))?;
    Ok(vec![
        "ssh".into(),
        "-o".into(),
        format!("UserKnownHostsFile={}", path.display()),
        "-o".into(),
        "GlobalKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-i".into(),
        identity.display().to_string(),
        "-p".into(),
        port.to_string(),
        format!("{}@{host}", config.user),
    ])
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use hyperjob_core::config::GuestKeyMode;

    fn config(extra: &str, keys: GuestKeyMode) -> SshConfig {
        let table: toml::Table = toml::from_str(&format!("user = \"ci\"\n{extra}")).expect("toml");
        SshConfig::from_table(&table, keys).expect("valid")
    }

    #[test]
    fn pinned_keys_are_written_for_the_guests_address_and_the_configured_key_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(
            "identity_file = \"/etc/hj/id\"\nknown_hosts = \"/etc/hj/kh\"\nport = 2222\n",
            GuestKeyMode::Pinned,
        );
        let pinned = crate::known_hosts::parse(
            "* ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGmIlwBQP5YE+maciJUN+1SwQxVo6PAj8AnvHRwwMXDe\n",
        );

        let argv = command(
            &config,
            &pinned,
            &Endpoint::new("192.0.2.7", None),
            dir.path(),
        )
        .expect("command");

        let known = dir.path().join("known_hosts");
        assert_eq!(
            std::fs::read_to_string(&known).expect("read"),
            "[192.0.2.7]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGmIlwBQP5YE+maciJUN+1SwQxVo6PAj8AnvHRwwMXDe\n"
        );
        assert_eq!(
            argv.join(" "),
            format!(
                "ssh -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null -o \
                 StrictHostKeyChecking=yes -o IdentitiesOnly=yes -i /etc/hj/id -p 2222 ci@192.0.2.7",
                known.display()
            )
        );
    }

    #[test]
    fn per_job_keys_give_the_jobs_key_and_host_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config("", GuestKeyMode::PerJob);
        let endpoint = Endpoint {
            identity_file: Some(PathBuf::from("/var/lib/hj/job-1.keys/id_ed25519")),
            host_key: Some("ssh-ed25519 AAAAkey hyperjob host vm".into()),
            ..Endpoint::new("192.0.2.8", None)
        };

        let argv = command(&config, &[], &endpoint, dir.path()).expect("command");

        assert_eq!(
            std::fs::read_to_string(dir.path().join("known_hosts")).expect("read"),
            "192.0.2.8 ssh-ed25519 AAAAkey\n"
        );
        assert!(argv.contains(&"/var/lib/hj/job-1.keys/id_ed25519".to_string()));
        assert_eq!(argv.last().map(String::as_str), Some("ci@192.0.2.8"));
    }

    #[test]
    fn an_unpinned_host_key_gives_no_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(
            "identity_file = \"/k\"\ninsecure_ignore_host_key = true\n",
            GuestKeyMode::Pinned,
        );

        let err = command(&config, &[], &Endpoint::new("192.0.2.9", None), dir.path())
            .expect_err("not pinned");

        assert!(err.to_string().contains("not pinned"), "{err}");
        assert!(!dir.path().join("known_hosts").exists());
    }

    #[test]
    fn a_unix_endpoint_has_no_openssh_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config("", GuestKeyMode::PerJob);
        let endpoint = Endpoint {
            host_key: Some("ssh-ed25519 AAAA".into()),
            ..Endpoint::unix("/run/vm.ssh.sock")
        };

        let err = command(&config, &[], &endpoint, dir.path()).expect_err("unix");

        assert!(matches!(err, PluginError::Unsupported(_)), "{err}");
        assert!(!dir.path().join(KNOWN_HOSTS_FILE).exists());
    }
}
