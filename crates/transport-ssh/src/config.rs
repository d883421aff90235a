//! `[transports.ssh]`: the serde input and its validated runtime form.

use std::path::PathBuf;
use std::time::Duration;

use hyperjob_core::config::parse_plugin_table;
use hyperjob_core::PluginError;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SshConfigFile {
    user: Option<String>,
    identity_file: Option<PathBuf>,
    port: Option<u16>,
    ready_timeout_secs: Option<u64>,
    connect_timeout_secs: Option<u64>,
    known_hosts: Option<PathBuf>,
    #[serde(default)]
    insecure_ignore_host_key: bool,
}

/// How the guest's host key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// Accept only keys listed in this file (the image's pinned host keys).
    KnownHosts(PathBuf),
    /// Accept any key. Only with an explicit `insecure_ignore_host_key = true`.
    InsecureIgnore,
}

/// The validated `[transports.ssh]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshConfig {
    pub user: String,
    pub identity_file: PathBuf,
    pub port: u16,
    pub ready_timeout: Duration,
    pub connect_timeout: Duration,
    pub host_keys: HostKeyPolicy,
}

impl SshConfig {
    pub fn from_table(table: &toml::Table) -> Result<Self, PluginError> {
        let file: SshConfigFile = parse_plugin_table(table)?;
        let invalid = |message: &str| PluginError::Config(message.to_string());
        let user = file.user.unwrap_or_else(|| "gitlab-runner".to_string());
        if user.is_empty() || user.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid("`user` must be a user name without spaces"));
        }
        let identity_file = file.identity_file.ok_or_else(|| {
            invalid("`identity_file` is required (the private key for the guest user)")
        })?;
        if !identity_file.is_absolute() {
            return Err(invalid("`identity_file` must be an absolute path"));
        }
        let port = file.port.unwrap_or(22);
        if port == 0 {
            return Err(invalid("`port` must be between 1 and 65535"));
        }
        let ready_timeout_secs = file.ready_timeout_secs.unwrap_or(300);
        if ready_timeout_secs == 0 {
            return Err(invalid("`ready_timeout_secs` must be at least 1"));
        }
        let connect_timeout_secs = file.connect_timeout_secs.unwrap_or(10);
        if connect_timeout_secs == 0 {
            return Err(invalid("`connect_timeout_secs` must be at least 1"));
        }
        let host_keys = match (file.known_hosts, file.insecure_ignore_host_key) {
            (Some(_), true) => {
                return Err(invalid(
                    "`known_hosts` and `insecure_ignore_host_key = true` contradict each other",
                ))
            }
            (Some(path), false) if !path.is_absolute() => {
                return Err(invalid("`known_hosts` must be an absolute path"))
            }
            (Some(path), false) => HostKeyPolicy::KnownHosts(path),
            (None, true) => HostKeyPolicy::InsecureIgnore,
            (None, false) => {
                return Err(invalid(
                    "`known_hosts` is required: a file with the guest image's SSH host keys (or set insecure_ignore_host_key = true to skip host-key checks)",
                ))
            }
        };
        Ok(Self {
            user,
            identity_file,
            port,
            ready_timeout: Duration::from_secs(ready_timeout_secs),
            connect_timeout: Duration::from_secs(connect_timeout_secs),
            host_keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SshConfig, PluginError> {
        SshConfig::from_table(&toml::from_str(text).expect("toml"))
    }

    #[test]
    fn defaults_apply() {
        let config = parse("identity_file = \"/k\"\nknown_hosts = \"/kh\"").expect("valid");

        assert_eq!(config.user, "gitlab-runner");
        assert_eq!(config.port, 22);
        assert_eq!(config.ready_timeout, Duration::from_secs(300));
        assert_eq!(
            config.host_keys,
            HostKeyPolicy::KnownHosts(PathBuf::from("/kh"))
        );
    }

    #[test]
    fn host_key_checking_cannot_be_left_out_silently() {
        let err = parse("identity_file = \"/k\"").expect_err("no known_hosts");

        assert!(
            err.to_string().contains("`known_hosts` is required"),
            "{err}"
        );
    }

    #[test]
    fn insecure_mode_must_be_explicit() {
        let config =
            parse("identity_file = \"/k\"\ninsecure_ignore_host_key = true").expect("valid");

        assert_eq!(config.host_keys, HostKeyPolicy::InsecureIgnore);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("identity_file = \"/k\"\nknown_hosts = \"/kh\"\nhost = \"x\"")
            .expect_err("unknown");

        assert!(err.to_string().contains("unknown field `host`"), "{err}");
    }

    #[test]
    fn missing_identity_file_is_reported() {
        let err = parse("known_hosts = \"/kh\"").expect_err("no key");

        assert!(
            err.to_string().contains("`identity_file` is required"),
            "{err}"
        );
    }

    #[test]
    fn zero_ready_timeout_is_rejected() {
        let err = parse("identity_file = \"/k\"\nknown_hosts = \"/kh\"\nready_timeout_secs = 0")
            .expect_err("zero");

        assert!(err.to_string().contains("ready_timeout_secs"), "{err}");
    }
}
