//! The TOML config file: which backend and transport to use, where state lives, and one table
//! per plugin (`[backends.<name>]`, `[transports.<name>]`) that the plugin parses itself.
//!
//! `ConfigFile` is the serde input; [`Config`] is the validated runtime object.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::plugin::PluginError;

/// Where the config file is looked for when neither `--config` nor `$HYPERJOB_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/hyperjob/config.toml";
/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "HYPERJOB_CONFIG";
const DEFAULT_STATE_DIR: &str = "/var/lib/hyperjob";
const DEFAULT_BUILDS_DIR: &str = "/home/gitlab-runner/builds";
const DEFAULT_CACHE_DIR: &str = "/home/gitlab-runner/cache";
const DEFAULT_DEADLINE_MARGIN_SECS: u64 = 3600;
/// The default start of every VM name: `hyperjob-job-<job id>`.
pub const DEFAULT_NAME_PREFIX: &str = "hyperjob-job-";
const MAX_NAME_PREFIX_LEN: usize = 40;
const DEFAULT_POOL_MAX_IDLE_SECS: u64 = 3600;
/// More ready VMs than this per installation is surely a typo.
const MAX_POOL_SIZE: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}{location}: {message}")]
    Invalid {
        path: PathBuf,
        location: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    backend: String,
    transport: String,
    state_dir: Option<PathBuf>,
    builds_dir: Option<String>,
    cache_dir: Option<String>,
    deadline_margin_secs: Option<u64>,
    guest_keys: Option<String>,
    name_prefix: Option<String>,
    pool: Option<PoolFile>,
    default_image: Option<String>,
    #[serde(default)]
    images: toml::Table,
    resources: Option<toml::Table>,
    metrics_file: Option<PathBuf>,
    debug_hold: Option<crate::hold::DebugHoldFile>,
    runner_binary: Option<PathBuf>,
    #[serde(default)]
    plugin_dirs: Vec<PathBuf>,
    #[serde(default)]
    plugins: Vec<PathBuf>,
    #[serde(default)]
    backends: toml::Table,
    #[serde(default)]
    transports: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolFile {
    size: Option<u32>,
    max_idle_secs: Option<u64>,
}

/// The warm pool (`[pool]`): VMs booted ahead, claimed by prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Ready VMs to keep; 0 turns the pool off.
    pub size: u32,
    /// A pooled VM nobody claimed for this long is destroyed.
    pub max_idle_secs: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            size: 0,
            max_idle_secs: DEFAULT_POOL_MAX_IDLE_SECS,
        }
    }
}

/// `[pool]` (or an image's pool table) over `base`.
fn pool_config(pool: &PoolFile, base: PoolConfig) -> Result<PoolConfig, String> {
    let size = pool.size.unwrap_or(base.size);
    if size > MAX_POOL_SIZE {
        return Err(format!(
            "`pool.size` must be at most {MAX_POOL_SIZE}, not {size}"
        ));
    }
    let max_idle_secs = pool.max_idle_secs.unwrap_or(base.max_idle_secs);
    if max_idle_secs == 0 {
        return Err("`pool.max_idle_secs` must be positive".to_string());
    }
    Ok(PoolConfig {
        size,
        max_idle_secs,
    })
}

pub use hyperjob_plugin::GuestKeyMode;

/// A short hex digest (96 bits of SHA-256) of `parts`, each length-prefixed.
pub fn digest(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.len().to_le_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, for error messages.
    pub path: PathBuf,
    pub backend: String,
    pub transport: String,
    /// Per-job state files (0700 directory, 0600 files).
    pub state_dir: PathBuf,
    /// `builds_dir` reported to the runner: a path inside the guest.
    pub builds_dir: String,
    /// `cache_dir` reported to the runner: a path inside the guest.
    pub cache_dir: String,
    /// How long after its job timeout a job's VM counts as abandoned (`hyperjob gc`).
    pub deadline_margin_secs: u64,
    pub guest_keys: GuestKeyMode,
    /// The start of every VM name of this installation; the job id follows.
    pub name_prefix: String,
    pub pool: PoolConfig,
    /// `default_image`, `[images]` and `[resources]`.
    pub images: crate::images::Images,
    /// The image this config was made for ([`Config::for_image`]); `None` without `[images]`.
    pub image: Option<String>,
    /// Where Prometheus metrics are written (`metrics_file`); `None`: no metrics.
    pub metrics_file: Option<PathBuf>,
    /// `[debug_hold]`: failed jobs' VMs may be kept for debugging; `None`: never.
    pub debug_hold: Option<crate::hold::DebugHold>,
    /// `runner_binary`: the `gitlab-runner` prepare copies into guests that lack one
    /// ([`crate::guest_runner`]); `None`: the runner's own executable.
    pub runner_binary: Option<PathBuf>,
    /// Directories whose `*.so` plugin libraries are loaded.
    pub plugin_dirs: Vec<PathBuf>,
    /// Plugin libraries loaded by path.
    pub plugins: Vec<PathBuf>,
    /// `[backends.<backend>]`, empty when absent.
    pub backend_table: toml::Table,
    /// `[transports.<transport>]`, empty when absent.
    pub transport_table: toml::Table,
}

/// The config path: the command-line value, else `$HYPERJOB_CONFIG`, else the default.
pub fn resolve_path(cli: Option<&Path>) -> PathBuf {
    if let Some(path) = cli {
        return path.to_path_buf();
    }
    match std::env::var_os(CONFIG_ENV) {
        Some(value) if !value.is_empty() => PathBuf::from(value),
        _ => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

impl Config {
    /// Reads and validates the config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates config text; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|err| ConfigError::Invalid {
            path: path.to_path_buf(),
            location: err
                .span()
                .map(|span| format!(" line {}", line_of(text, span.start)))
                .unwrap_or_default(),
            message: one_line(err.message()),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            location: String::new(),
            message,
        };
        for (key, value) in [("backend", &file.backend), ("transport", &file.transport)] {
            if value.trim().is_empty() {
                return Err(invalid(format!("`{key}` must name a plugin")));
            }
        }
        let state_dir = file
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            return Err(invalid(format!(
                "`state_dir` must be an absolute path, not {:?}",
                state_dir.display().to_string()
            )));
        }
        let builds_dir =
            guest_dir(file.builds_dir, DEFAULT_BUILDS_DIR, "builds_dir").map_err(invalid)?;
        let cache_dir =
            guest_dir(file.cache_dir, DEFAULT_CACHE_DIR, "cache_dir").map_err(invalid)?;
        if let Some(path) = file.runner_binary.as_ref().filter(|p| !p.is_absolute()) {
            return Err(invalid(format!(
                "`runner_binary` must be an absolute path, not {:?}",
                path.display().to_string()
            )));
        }
        for (key, paths) in [
            ("plugin_dirs", &file.plugin_dirs),
            ("plugins", &file.plugins),
        ] {
            if let Some(path) = paths.iter().find(|p| !p.is_absolute()) {
                return Err(invalid(format!(
                    "`{key}` entries must be absolute paths, not {:?}",
                    path.display().to_string()
                )));
            }
        }
        let guest_keys = match file.guest_keys.as_deref() {
            None | Some("pinned") => GuestKeyMode::Pinned,
            Some("per-job") => GuestKeyMode::PerJob,
            Some(other) => {
                return Err(invalid(format!(
                    "`guest_keys` must be \"pinned\" or \"per-job\", not {other:?}"
                )))
            }
        };
        let name_prefix = match file.name_prefix {
            None => DEFAULT_NAME_PREFIX.to_string(),
            Some(prefix) => check_name_prefix(&prefix)
                .map(|()| prefix)
                .map_err(invalid)?,
        };
        let pool = match &file.pool {
            None => PoolConfig::default(),
            Some(pool) => pool_config(pool, PoolConfig::default()).map_err(invalid)?,
        };
        let images = crate::images::Images::parse(
            file.default_image.clone(),
            &file.images,
            file.resources.as_ref(),
            pool,
            |table, base| {
                let file: PoolFile = toml::Value::Table(table.clone())
                    .try_into()
                    .map_err(|err: toml::de::Error| one_line(err.message()))?;
                pool_config(&file, base)
            },
        )
        .map_err(invalid)?;
        let debug_hold = file
            .debug_hold
            .map(crate::hold::DebugHold::from_file)
            .transpose()
            .map_err(invalid)?;
        let backend_table =
            plugin_table(&file.backends, "backends", &file.backend).map_err(invalid)?;
        let transport_table =
            plugin_table(&file.transports, "transports", &file.transport).map_err(invalid)?;
        Ok(Self {
            path: path.to_path_buf(),
            backend: file.backend,
            transport: file.transport,
            state_dir,
            builds_dir,
            cache_dir,
            guest_keys,
            name_prefix,
            pool,
            images,
            image: None,
            metrics_file: file.metrics_file,
            debug_hold,
            runner_binary: file.runner_binary,
            plugin_dirs: file.plugin_dirs,
            plugins: file.plugins,
            deadline_margin_secs: file
                .deadline_margin_secs
                .unwrap_or(DEFAULT_DEADLINE_MARGIN_SECS),
            backend_table,
            transport_table,
        })
    }

    /// A short digest of everything that shapes the transport (its name, its table, the key
    /// mode): a job's relay serves only `run`s whose config gives the same.
    pub fn transport_fingerprint(&self) -> String {
        digest(&[
            self.transport.as_str(),
            &toml::to_string(&self.transport_table).unwrap_or_default(),
            self.guest_keys.name(),
        ])
    }

    /// The name of a job's VM and the key of all its state: `name_prefix` and the job id.
    /// Safe in XML, file names and shell words (the prefix is checked, the id is digits).
    pub fn vm_name(&self, job_id: u64) -> String {
        format!("{}{job_id}", self.name_prefix)
    }

    /// The start of the name of every pooled VM of this installation (a random suffix
    /// follows): never a job's name, since that is the prefix and digits only.
    pub fn pool_prefix(&self) -> String {
        format!("{}pool-", self.name_prefix)
    }

    /// The job id in a VM name of this installation, or `None` for any other name. Since a
    /// prefix never ends in a digit, a name matches at most one installation's prefix.
    pub fn job_id_of(&self, vm_name: &str) -> Option<u64> {
        let digits = vm_name.strip_prefix(&self.name_prefix)?;
        if digits.is_empty()
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || digits.starts_with('0')
        {
            return None;
        }
        digits.parse().ok()
    }

    /// Wraps a plugin's config error with the file and table it came from.
    pub fn plugin_error(&self, section: &str, name: &str, err: PluginError) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            location: format!(" [{section}.{name}]"),
            message: err.to_string(),
        }
    }
}

/// A `name_prefix`: 1 to 40 ASCII letters, digits, `-`, `_` or `.`, starting with a letter and
/// not ending in a digit (so the job id after it is unambiguous).
fn check_name_prefix(prefix: &str) -> Result<(), String> {
    let ok = (1..=MAX_NAME_PREFIX_LEN).contains(&prefix.len())
        && prefix.starts_with(|c: char| c.is_ascii_alphabetic())
        && !prefix.ends_with(|c: char| c.is_ascii_digit())
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`name_prefix` must be 1 to {MAX_NAME_PREFIX_LEN} ASCII letters, digits, `-`, `_` or \
             `.`, start with a letter and not end in a digit, not {prefix:?}"
        ))
    }
}

fn guest_dir(value: Option<String>, default: &str, key: &str) -> Result<String, String> {
    let dir = value.unwrap_or_else(|| default.to_string());
    if !dir.starts_with('/') {
        return Err(format!(
            "`{key}` must be an absolute path inside the guest, not {dir:?}"
        ));
    }
    if dir.chars().any(char::is_control) {
        return Err(format!("`{key}` contains a control character"));
    }
    Ok(dir)
}

fn plugin_table(tables: &toml::Table, section: &str, name: &str) -> Result<toml::Table, String> {
    match tables.get(name) {
        None => Ok(toml::Table::new()),
        Some(toml::Value::Table(table)) => Ok(table.clone()),
        Some(_) => Err(format!("`{section}.{name:?}` must be a table")),
    }
}

/// Parses a plugin's table into its serde config type (which should `deny_unknown_fields`),
/// with the errors library plugins get from `hyperjob_plugin::config::parse` (one line, naming
/// the key): built-in and library plugins report a bad table alike.
pub fn parse_plugin_table<T: DeserializeOwned>(table: &toml::Table) -> Result<T, PluginError> {
    let text =
        toml::to_string(table).map_err(|err| PluginError::Config(one_line(&err.to_string())))?;
    hyperjob_plugin::config::parse(&text)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |head| head.bytes().filter(|b| *b == b'\n').count() + 1)
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "backend = \"libvirt\"\ntransport = \"ssh\"\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/hyperjob/test.toml"), text)
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = parse(MINIMAL).expect("minimal config is valid");

        assert_eq!(config.state_dir, PathBuf::from("/var/lib/hyperjob"));
        assert_eq!(config.builds_dir, "/home/gitlab-runner/builds");
        assert_eq!(config.cache_dir, "/home/gitlab-runner/cache");
        assert!(config.backend_table.is_empty());
    }

    #[test]
    fn vm_names_are_the_prefix_and_the_job_id_and_parse_back() {
        let default = parse(MINIMAL).expect("valid");
        let other = parse(&format!("{MINIMAL}name_prefix = \"ci-b.job_\"\n")).expect("valid");

        assert_eq!(default.vm_name(4242), "hyperjob-job-4242");
        assert_eq!(other.vm_name(7), "ci-b.job_7");
        assert_eq!(default.job_id_of("hyperjob-job-4242"), Some(4242));
        assert_eq!(other.job_id_of("ci-b.job_7"), Some(7));
        for foreign in [
            "ci-b.job_7",
            "hyperjob-job-",
            "hyperjob-job-07",
            "hyperjob-job-1x",
            "hyperjob-job-+1",
            "hyperjob-job-99999999999999999999999",
            "xhyperjob-job-1",
        ] {
            assert_eq!(default.job_id_of(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn the_pool_is_off_by_default_and_its_keys_are_checked() {
        assert_eq!(parse(MINIMAL).expect("valid").pool, PoolConfig::default());
        assert_eq!(PoolConfig::default().size, 0);
        let pool = parse(&format!("{MINIMAL}[pool]\nsize = 3\nmax_idle_secs = 600\n"))
            .expect("valid")
            .pool;
        assert_eq!(
            pool,
            PoolConfig {
                size: 3,
                max_idle_secs: 600
            }
        );
        for (bad, key) in [
            ("size = 65", "`pool.size`"),
            ("max_idle_secs = 0", "`pool.max_idle_secs`"),
            ("size = -1", "line 4"),
            ("sise = 2", "sise"),
        ] {
            let err = parse(&format!("{MINIMAL}[pool]\n{bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn a_bad_name_prefix_is_refused_naming_the_key() {
        for bad in ["", "1abc-", "job-1", "a b-", "a/b-", "a'b", &"a".repeat(41)] {
            let err = parse(&format!("{MINIMAL}name_prefix = {bad:?}\n"))
                .expect_err(bad)
                .to_string();

            assert!(err.contains("`name_prefix` must be"), "{bad:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn selected_plugin_tables_are_handed_over() {
        let text =
            format!("{MINIMAL}[backends.libvirt]\nvcpus = 4\n[transports.ssh]\nport = 2222\n");

        let config = parse(&text).expect("valid");

        assert_eq!(
            config.backend_table.get("vcpus"),
            Some(&toml::Value::Integer(4))
        );
        assert_eq!(
            config.transport_table.get("port"),
            Some(&toml::Value::Integer(2222))
        );
    }

    #[test]
    fn unknown_top_level_key_names_key_file_and_line() {
        let text = format!("{MINIMAL}colour = \"blue\"\n");

        let message = parse(&text).expect_err("unknown key").to_string();

        assert!(message.contains("colour"), "{message}");
        assert!(
            message.contains("/etc/hyperjob/test.toml line 3"),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn missing_backend_is_an_error() {
        let message = parse("transport = \"ssh\"\n")
            .expect_err("no backend")
            .to_string();

        assert!(message.contains("backend"), "{message}");
    }

    #[test]
    fn relative_state_dir_is_rejected() {
        let message = parse(&format!("{MINIMAL}state_dir = \"state\"\n"))
            .expect_err("relative")
            .to_string();

        assert!(message.contains("state_dir"), "{message}");
    }

    #[test]
    fn runner_binary_is_an_absolute_path() {
        assert_eq!(parse(MINIMAL).expect("valid").runner_binary, None);
        let set = parse(&format!(
            "{MINIMAL}runner_binary = \"/usr/bin/gitlab-runner\"\n"
        ))
        .expect("valid");
        assert_eq!(
            set.runner_binary,
            Some(PathBuf::from("/usr/bin/gitlab-runner"))
        );
        let message = parse(&format!("{MINIMAL}runner_binary = \"gitlab-runner\"\n"))
            .expect_err("relative")
            .to_string();
        assert!(
            message.contains("`runner_binary` must be an absolute path"),
            "{message}"
        );
    }

    #[test]
    fn relative_builds_dir_is_rejected() {
        let message = parse(&format!("{MINIMAL}builds_dir = \"builds\"\n"))
            .expect_err("relative")
            .to_string();

        assert!(message.contains("builds_dir"), "{message}");
    }

    #[test]
    fn values_with_line_breaks_cannot_break_the_error_line() {
        let state = parse(&format!("{MINIMAL}state_dir = \"a\\nb\"\n")).expect_err("relative");
        let table =
            parse("backend = \"x\\ny\"\ntransport = \"ssh\"\nbackends = {{ \"x\\ny\" = 1 }}\n")
                .expect_err("not a table");

        assert!(!state.to_string().contains('\n'), "{state}");
        assert!(!table.to_string().contains('\n'), "{table}");
    }

    #[test]
    fn malformed_toml_is_a_one_line_error() {
        let message = parse("backend = \n").expect_err("malformed").to_string();

        assert!(
            message.starts_with("config file /etc/hyperjob/test.toml line 1:"),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn plugin_table_with_unknown_key_is_reported_by_the_plugin_parser() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Demo {
            port: u16,
        }
        let table: toml::Table = toml::from_str("port = 22\nprot = 23\n").expect("toml");

        let err = parse_plugin_table::<Demo>(&table).expect_err("unknown key");
        let wrong_type: toml::Table = toml::from_str("port = \"ssh\"\n").expect("toml");

        assert!(err.to_string().contains("prot"), "{err}");
        assert_eq!(
            parse_plugin_table::<Demo>(&wrong_type)
                .expect_err("wrong type")
                .to_string(),
            "`port`: invalid type: string \"ssh\", expected u16"
        );
    }

    #[test]
    fn guest_keys_default_to_pinned_and_accept_per_job() {
        assert_eq!(
            parse(MINIMAL).expect("valid").guest_keys,
            GuestKeyMode::Pinned
        );
        let per_job = parse(&format!("{MINIMAL}guest_keys = \"per-job\"\n")).expect("valid");
        assert_eq!(per_job.guest_keys, GuestKeyMode::PerJob);
        assert!(parse(&format!("{MINIMAL}guest_keys = \"random\"\n")).is_err());
    }

    #[test]
    fn config_path_prefers_the_command_line() {
        let path = resolve_path(Some(Path::new("/tmp/x.toml")));

        assert_eq!(path, PathBuf::from("/tmp/x.toml"));
    }
}
