//! The images a job may pick (`default_image`, `[images.NAME]`) and the resources it may ask
//! for (`[resources]`).
//!
//! A job names its image with `image:` in `.gitlab-ci.yml`; the runner passes that name to the
//! driver as `CUSTOM_ENV_CI_JOB_IMAGE`. Only that name crosses from the job, and only as a key
//! into this allow-list: each `[images.NAME]` table's `backend` and `transport` sub-tables are
//! merged, key by key, over the selected plugins' own tables, and its `pool` table over
//! `[pool]`. Without `[images]` the job's `image:` is ignored, as before.
//!
//! Resources: the job variables `HYPERJOB_VCPUS` and `HYPERJOB_MEMORY_MIB` (positive integers,
//! at most `[resources] max_vcpus` / `max_memory_mib`) set the backend table's `vcpus` and
//! `memory_mib` for that job.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::{Config, PoolConfig};

/// The job's image, as the runner passes it.
pub const JOB_IMAGE_ENV: &str = "CUSTOM_ENV_CI_JOB_IMAGE";
/// The job variables that ask for resources.
pub const VCPUS_ENV: &str = "CUSTOM_ENV_HYPERJOB_VCPUS";
pub const MEMORY_ENV: &str = "CUSTOM_ENV_HYPERJOB_MEMORY_MIB";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageFile {
    #[serde(default)]
    backend: toml::Table,
    #[serde(default)]
    transport: toml::Table,
    pool: Option<toml::Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesFile {
    max_vcpus: Option<u32>,
    max_memory_mib: Option<u64>,
}

/// One allowed image: what it changes in the plugin tables and the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub backend: toml::Table,
    pub transport: toml::Table,
    /// `[images.NAME.pool]` merged over `[pool]`; `None`: `[pool]` as it is.
    pub pool: Option<PoolConfig>,
}

/// The allow-list and the resource bounds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Images {
    /// Empty: no `[images]`, the job's `image:` is ignored.
    pub allowed: BTreeMap<String, Image>,
    pub default: Option<String>,
    pub max_vcpus: Option<u32>,
    pub max_memory_mib: Option<u64>,
}

/// An image name in the config: 1 to 128 characters of what image references are made of.
fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:/@".contains(c))
}

impl Images {
    /// Validates `default_image`, `[images]` and `[resources]`; `pool` is the top-level one.
    pub fn parse(
        default: Option<String>,
        images: &toml::Table,
        resources: Option<&toml::Table>,
        pool: PoolConfig,
        parse_pool: impl Fn(&toml::Table, PoolConfig) -> Result<PoolConfig, String>,
    ) -> Result<Self, String> {
        let mut allowed = BTreeMap::new();
        for (name, value) in images {
            if !valid_name(name) {
                return Err(format!(
                    "image name {name:?} must be 1 to 128 ASCII letters, digits or `._-:/@`"
                ));
            }
            let file: ImageFile = value
                .clone()
                .try_into()
                .map_err(|err: toml::de::Error| format!("[images.{name:?}]: {}", err.message()))?;
            let image_pool = file
                .pool
                .as_ref()
                .map(|table| parse_pool(table, pool))
                .transpose()
                .map_err(|err| format!("[images.{name:?}.pool]: {err}"))?;
            allowed.insert(
                name.clone(),
                Image {
                    backend: file.backend,
                    transport: file.transport,
                    pool: image_pool,
                },
            );
        }
        let default = match (default, allowed.len()) {
            (Some(name), 0) => {
                return Err(format!(
                    "`default_image` = {name:?} names no [images.{name}] table"
                ))
            }
            (Some(name), _) if !allowed.contains_key(&name) => {
                return Err(format!(
                    "`default_image` = {name:?} is not one of the images: {}",
                    names(&allowed)
                ))
            }
            (Some(name), _) => Some(name),
            (None, 0) => None,
            (None, 1) => allowed.keys().next().cloned(),
            (None, _) => {
                return Err(format!(
                    "`default_image` must name the image of jobs without `image:`: one of {}",
                    names(&allowed)
                ))
            }
        };
        let resources: Option<ResourcesFile> = resources
            .map(|table| toml::Value::Table(table.clone()).try_into())
            .transpose()
            .map_err(|err: toml::de::Error| format!("[resources]: {}", err.message()))?;
        let (max_vcpus, max_memory_mib) = resources
            .map(|r| (r.max_vcpus, r.max_memory_mib))
            .unwrap_or_default();
        Ok(Self {
            allowed,
            default,
            max_vcpus,
            max_memory_mib,
        })
    }

    /// The allowed names, for messages.
    pub fn names(&self) -> String {
        names(&self.allowed)
    }
}

fn names(allowed: &BTreeMap<String, Image>) -> String {
    allowed.keys().cloned().collect::<Vec<_>>().join(", ")
}

/// Why a job's choice was refused. Never carries more of the job's text than needed.
#[derive(Debug, thiserror::Error)]
pub enum ChoiceError {
    #[error("the job's image {0} is not allowed on this runner; allowed: {1}")]
    NotAllowed(String, String),
    #[error("{0}")]
    Resources(String),
}

/// A job-given name, quoted for a message if it is short and plain, else described.
fn quoted(name: &str) -> String {
    if valid_name(name) {
        format!("{name:?}")
    } else {
        "(a name with characters no image name has)".to_string()
    }
}

impl Config {
    /// The config for jobs of image `image` (`None` or empty: the default image), with the
    /// image's tables merged over the plugins' and its pool over `[pool]`. Without `[images]`
    /// this config as it is, whatever the job asked for.
    pub fn for_image(&self, image: Option<&str>) -> Result<Config, ChoiceError> {
        if self.images.allowed.is_empty() {
            return Ok(self.clone());
        }
        let name = image
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .or(self.images.default.as_deref())
            .unwrap_or_default();
        let chosen = self
            .images
            .allowed
            .get(name)
            .ok_or_else(|| ChoiceError::NotAllowed(quoted(name), self.images.names()))?;
        let mut config = self.clone();
        merge(&mut config.backend_table, &chosen.backend);
        merge(&mut config.transport_table, &chosen.transport);
        if let Some(pool) = chosen.pool {
            config.pool = pool;
        }
        config.image = Some(name.to_string());
        Ok(config)
    }

    /// This config with the job's resource requests (`HYPERJOB_VCPUS`, `HYPERJOB_MEMORY_MIB`
    /// as given) in the backend table, within `[resources]`.
    pub fn with_resources(
        &self,
        vcpus: Option<&str>,
        memory_mib: Option<&str>,
    ) -> Result<Config, ChoiceError> {
        let mut config = self.clone();
        for (variable, given, max, key) in [
            (
                "HYPERJOB_VCPUS",
                vcpus,
                self.images.max_vcpus.map(u64::from),
                "vcpus",
            ),
            (
                "HYPERJOB_MEMORY_MIB",
                memory_mib,
                self.images.max_memory_mib,
                "memory_mib",
            ),
        ] {
            let Some(given) = given.map(str::trim).filter(|g| !g.is_empty()) else {
                continue;
            };
            let value: u64 = given.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
                ChoiceError::Resources(format!(
                    "{variable} must be a positive whole number, not {}",
                    quoted(given)
                ))
            })?;
            let max = max.ok_or_else(|| {
                ChoiceError::Resources(format!(
                    "{variable} is not allowed on this runner ([resources] sets no max_{key})"
                ))
            })?;
            if value > max {
                return Err(ChoiceError::Resources(format!(
                    "{variable} = {value} is more than this runner's max_{key} = {max}"
                )));
            }
            let value = i64::try_from(value).unwrap_or(i64::MAX);
            config
                .backend_table
                .insert(key.to_string(), toml::Value::Integer(value));
        }
        Ok(config)
    }

    /// The config of every allowed image (or this one, without `[images]`), by name.
    pub fn image_configs(&self) -> Vec<Config> {
        if self.images.allowed.is_empty() {
            return vec![self.clone()];
        }
        self.images
            .allowed
            .keys()
            .filter_map(|name| self.for_image(Some(name)).ok())
            .collect()
    }
}

/// `over`'s keys replace `base`'s.
fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (key, value) in over {
        base.insert(key.clone(), value.clone());
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    const TWO_IMAGES: &str = r#"backend = "libvirt"
transport = "ssh"
default_image = "debian-12"
[pool]
size = 1
[backends.libvirt]
base_image = "/b/default.qcow2"
vcpus = 2
[transports.ssh]
known_hosts = "/etc/k"
[images.debian-12.backend]
base_image = "/b/debian-12.qcow2"
[images.debian-12.transport]
known_hosts = "/etc/debian-12.known_hosts"
[images.alma-9.backend]
base_image = "/b/alma-9.qcow2"
[images.alma-9.pool]
size = 0
[resources]
max_vcpus = 4
"#;

    fn parse(text: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        crate::config::Config::parse(Path::new("/etc/hyperjob/test.toml"), text)
    }

    #[test]
    fn a_job_gets_its_images_tables_merged_over_the_plugins() {
        let config = parse(TWO_IMAGES).expect("valid");

        let debian = config.for_image(None).expect("default");
        let alma = config.for_image(Some("alma-9")).expect("alma");

        assert_eq!(debian.image.as_deref(), Some("debian-12"));
        assert_eq!(
            debian.backend_table["base_image"].as_str(),
            Some("/b/debian-12.qcow2")
        );
        assert_eq!(debian.backend_table["vcpus"].as_integer(), Some(2));
        assert_eq!(
            debian.transport_table["known_hosts"].as_str(),
            Some("/etc/debian-12.known_hosts")
        );
        assert_eq!(debian.pool.size, 1);
        assert_eq!(
            alma.backend_table["base_image"].as_str(),
            Some("/b/alma-9.qcow2")
        );
        assert_eq!(alma.transport_table["known_hosts"].as_str(), Some("/etc/k"));
        assert_eq!(alma.pool.size, 0);
        assert_eq!(config.image_configs().len(), 2);
    }

    #[test]
    fn a_name_not_allowed_is_refused_listing_the_allowed_ones() {
        let config = parse(TWO_IMAGES).expect("valid");

        let err = config.for_image(Some("ubuntu:24.04")).expect_err("refused");
        let odd = config
            .for_image(Some("/etc/passwd; rm -rf /"))
            .expect_err("refused");

        assert_eq!(
            err.to_string(),
            "the job's image \"ubuntu:24.04\" is not allowed on this runner; allowed: alma-9, debian-12"
        );
        assert!(odd
            .to_string()
            .contains("(a name with characters no image name has)"));
        assert!(!odd.to_string().contains("passwd"));
    }

    #[test]
    fn without_images_the_jobs_image_is_ignored() {
        let config = parse("backend = \"libvirt\"\ntransport = \"ssh\"\n").expect("valid");

        let chosen = config.for_image(Some("anything")).expect("ignored");

        assert_eq!(chosen.image, None);
        assert_eq!(chosen.backend_table, config.backend_table);
    }

    #[test]
    fn resources_are_bounded_and_need_a_maximum() {
        let config = parse(TWO_IMAGES).expect("valid");

        let four = config.with_resources(Some("4"), None).expect("within");
        assert_eq!(four.backend_table["vcpus"].as_integer(), Some(4));
        for (vcpus, memory, needle) in [
            (
                Some("5"),
                None,
                "HYPERJOB_VCPUS = 5 is more than this runner's max_vcpus = 4",
            ),
            (
                Some("0"),
                None,
                "HYPERJOB_VCPUS must be a positive whole number",
            ),
            (Some("two"), None, "not \"two\""),
            (None, Some("1024"), "[resources] sets no max_memory_mib"),
        ] {
            let err = config.with_resources(vcpus, memory).expect_err(needle);
            assert!(err.to_string().contains(needle), "{err}");
        }
    }

    #[test]
    fn a_bad_images_config_is_named() {
        for (text, needle) in [
            ("default_image = \"x\"\n", "names no [images.x] table"),
            (
                "[images.a.backend]\n[images.b.backend]\n",
                "`default_image` must name the image",
            ),
            (
                "default_image = \"c\"\n[images.a.backend]\n",
                "is not one of the images: a",
            ),
            ("[images.a]\nbackend = 1\n", "[images.\"a\"]"),
            ("[images.a.disk]\nx = 1\n", "unknown field `disk`"),
            ("[images.\"a b\".backend]\n", "image name \"a b\" must be"),
            ("[resources]\nmax_cpus = 2\n", "[resources]"),
        ] {
            let err = parse(&format!(
                "backend = \"libvirt\"\ntransport = \"ssh\"\n{text}"
            ))
            .expect_err(needle)
            .to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
