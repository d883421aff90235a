//! `[transports.ssh]`: the serde input and its validated runtime form.

use std::path::PathBuf;
use std::time::Duration;

use hyperjob_core::config::{parse_plugin_table, GuestKeyMode};
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
    umask: Option<String>,
    relay: Option<bool>,
}

/// How the guest's host key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// Accept only keys listed in this file (the image's pinned host keys).
    KnownHosts(PathBuf),
    /// Accept only the host key generated for the job (`guest_keys = "per-job"`).
    PerJob,
    /// Accept any key. Only with an explicit `insecure_ignore_host_key = true`.
    InsecureIgnore,
}

/// The validated `[transports.ssh]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshConfig {
    pub user: String,
    /// The configured client key; `None` with per-job keys.
    pub identity_file: Option<PathBuf>,
    pub port: u16,
    pub ready_timeout: Duration,
    pub connect_timeout: Duration,
    pub host_keys: HostKeyPolicy,
    /// The umask scripts run with in the guest (octal), so files the job writes, such as file
    /// variables, are not readable by other guest users.
    pub umask: u32,
    /// Whether a job's stages share one connection, kept by the job's relay (the default), or
    /// each stage logs in anew.
    pub relay: bool,
}

impl SshConfig {
    pub fn from_table(table: &toml::Table, keys: GuestKeyMode) -> Result<Self, PluginError> {
        let file: SshConfigFile = parse_plugin_table(table)?;
        let invalid = |message: &str| PluginError::Config(message.to_string());
        let user = file.user.unwrap_or_else(|| "gitlab-runner".to_string());
        if !valid_user(&user) {
            return Err(invalid(
                "`user` must be a user name (letters, digits, `.`, `_`, `-`; not starting with `-`)",
            ));
        }
        if file
            .identity_file
            .as_ref()
            .is_some_and(|p| !p.is_absolute())
        {
            return Err(invalid("`identity_file` must be an absolute path"));
        }
        if file.known_hosts.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(invalid("`known_hosts` must be an absolute path"));
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
        let umask = match file.umask.as_deref() {
            None => 0o077,
            Some(text) => u32::from_str_radix(text, 8)
                .ok()
                .filter(|mask| *mask <= 0o777 && !text.is_empty() && text.len() <= 4)
                .ok_or_else(|| invalid("`umask` must be an octal mask such as \"077\""))?,
        };
        let (identity_file, host_keys) = match keys {
            GuestKeyMode::PerJob => {
                if file.identity_file.is_some()
                    || file.known_hosts.is_some()
                    || file.insecure_ignore_host_key
                {
                    return Err(invalid(
                        "with guest_keys = \"per-job\" every job gets its own keys: remove `identity_file`, `known_hosts` and `insecure_ignore_host_key`",
                    ));
                }
                (None, HostKeyPolicy::PerJob)
            }
            GuestKeyMode::Pinned => {
                let identity_file = file.identity_file.ok_or_else(|| {
                    invalid("`identity_file` is required (the private key for the guest user)")
                })?;
                let host_keys = match (file.known_hosts, file.insecure_ignore_host_key) {
                    (Some(_), true) => {
                        return Err(invalid(
                            "`known_hosts` and `insecure_ignore_host_key = true` contradict each other",
                        ))
                    }
                    (Some(path), false) => HostKeyPolicy::KnownHosts(path),
                    (None, true) => HostKeyPolicy::InsecureIgnore,
                    (None, false) => return Err(invalid(
                        "`known_hosts` is required: a file with the guest image's SSH host keys (or set insecure_ignore_host_key = true to skip host-key checks, or use guest_keys = \"per-job\")",
                    )),
                };
                (Some(identity_file), host_keys)
            }
        };
        Ok(Self {
            user,
            identity_file,
            port,
            ready_timeout: Duration::from_secs(ready_timeout_secs),
            connect_timeout: Duration::from_secs(connect_timeout_secs),
            host_keys,
            umask,
            relay: file.relay.unwrap_or(true),
        })
    }
}

/// A user name that is safe in a shell word and in cloud-init YAML.
fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 32
        && !user.starts_with('-')
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SshConfig, PluginError> {
        SshConfig::from_table(&toml::from_str(text).expect("toml"), GuestKeyMode::Pinned)
    }

    fn parse_per_job(text: &str) -> Result<SshConfig, PluginError> {
        SshConfig::from_table(&toml::from_str(text).expect("toml"), GuestKeyMode::PerJob)
    }

    #[test]
    fn per_job_keys_need_no_key_files() {
        let config = parse_per_job("user = \"ci\"").expect("valid");

        assert_eq!(config.identity_file, None);
        assert_eq!(config.host_keys, HostKeyPolicy::PerJob);
    }

    #[test]
    fn per_job_keys_refuse_configured_keys() {
        let err = parse_per_job("identity_file = \"/k\"").expect_err("contradiction");

        assert!(
            err.to_string().contains("every job gets its own keys"),
            "{err}"
        );
    }

    #[test]
    fn umask_defaults_to_private_and_parses_octal() {
        assert_eq!(
            parse("identity_file = \"/k\"\nknown_hosts = \"/kh\"")
                .expect("valid")
                .umask,
            0o077
        );
        assert_eq!(
            parse("identity_file = \"/k\"\nknown_hosts = \"/kh\"\numask = \"022\"")
                .expect("valid")
                .umask,
            0o022
        );
        assert!(parse("identity_file = \"/k\"\nknown_hosts = \"/kh\"\numask = \"999\"").is_err());
    }

    #[test]
    fn user_names_that_could_break_a_shell_or_yaml_are_refused() {
        for user in ["a b", "x;rm", "-opt", "", "\"q\""] {
            let text = format!("user = {user:?}\nidentity_file = \"/k\"\nknown_hosts = \"/kh\"");
            assert!(parse(&text).is_err(), "{user:?} accepted");
        }
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
        assert_eq!(config.identity_file, Some(PathBuf::from("/k")));
        assert!(config.relay);
    }

    #[test]
    fn the_relay_can_be_turned_off() {
        let config =
            parse("identity_file = \"/k\"\nknown_hosts = \"/kh\"\nrelay = false").expect("valid");

        assert!(!config.relay);
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
