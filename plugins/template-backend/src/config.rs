//! `[backends.template]`: what the config file may say (serde), checked into what the backend
//! uses.

use std::path::{Path, PathBuf};

use hyperjob_plugin::prelude::*;
use serde::Deserialize;

/// The table as written. `deny_unknown_fields`: a misspelt key is an error, not ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateConfigFile {
    base_image: PathBuf,
    accel: Option<String>,
    vcpus: Option<u32>,
    memory_mib: Option<u32>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
}

/// The checked table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateConfig {
    /// The disk every VM starts from; QEMU's `-snapshot` keeps it unchanged.
    pub base_image: PathBuf,
    /// `kvm` (hardware virtualisation) or `tcg` (software emulation).
    pub accel: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// A kernel to boot directly, for images without a bootloader.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
}

impl TemplateConfig {
    /// Parses and checks the TOML text of `[backends.template]`. Errors name the key; hyperjob
    /// adds the file and the table.
    pub fn from_toml_text(text: &str) -> Result<Self, PluginError> {
        let file: TemplateConfigFile = parse_config(text)?;
        let accel = file.accel.unwrap_or_else(|| "kvm".to_string());
        if accel != "kvm" && accel != "tcg" {
            return Err(PluginError::Config(format!(
                "`accel` must be \"kvm\" or \"tcg\", not {accel:?}"
            )));
        }
        for (key, path) in [
            ("base_image", Some(&file.base_image)),
            ("kernel", file.kernel.as_ref()),
            ("initrd", file.initrd.as_ref()),
        ] {
            if let Some(path) = path {
                check_path(key, path)?;
            }
        }
        if file.kernel.is_none() && (file.initrd.is_some() || file.cmdline.is_some()) {
            return Err(PluginError::Config(
                "`initrd` and `cmdline` need `kernel`".to_string(),
            ));
        }
        let vcpus = file.vcpus.unwrap_or(1);
        if !(1..=64).contains(&vcpus) {
            return Err(PluginError::Config(format!(
                "`vcpus` must be 1 to 64, not {vcpus}"
            )));
        }
        let memory_mib = file.memory_mib.unwrap_or(1024);
        if !(128..=65536).contains(&memory_mib) {
            return Err(PluginError::Config(format!(
                "`memory_mib` must be 128 to 65536, not {memory_mib}"
            )));
        }
        Ok(Self {
            base_image: file.base_image,
            accel,
            vcpus,
            memory_mib,
            kernel: file.kernel,
            initrd: file.initrd,
            cmdline: file.cmdline,
        })
    }
}

/// An absolute path without a comma (QEMU's option syntax would split it there).
fn check_path(key: &str, path: &Path) -> Result<(), PluginError> {
    if !path.is_absolute() || path.to_string_lossy().contains(',') {
        return Err(PluginError::Config(format!(
            "`{key}` must be an absolute path without a comma, not {:?}",
            path.display().to_string()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_table_gets_the_defaults() {
        let config =
            TemplateConfig::from_toml_text("base_image = \"/img/base.qcow2\"\n").expect("valid");

        assert_eq!(config.accel, "kvm");
        assert_eq!((config.vcpus, config.memory_mib), (1, 1024));
        assert_eq!(config.kernel, None);
    }

    #[test]
    fn bad_tables_are_refused_naming_the_key() {
        for (text, message) in [
            ("", "`base_image` is required"),
            (
                "base_image = \"rel.qcow2\"\n",
                "`base_image` must be an absolute path",
            ),
            (
                "base_image = \"/b\"\naccel = \"hvf\"\n",
                "`accel` must be \"kvm\" or \"tcg\"",
            ),
            (
                "base_image = \"/b\"\nvcpus = 0\n",
                "`vcpus` must be 1 to 64, not 0",
            ),
            (
                "base_image = \"/b\"\nmemory_mib = \"1G\"\n",
                "`memory_mib`: invalid type",
            ),
            (
                "base_image = \"/b\"\ncmdline = \"quiet\"\n",
                "`initrd` and `cmdline` need",
            ),
            (
                "base_image = \"/b\"\ncolour = 1\n",
                "unknown field `colour`",
            ),
        ] {
            let err = TemplateConfig::from_toml_text(text).expect_err(text);

            assert!(err.to_string().starts_with(message), "{text:?}: {err}");
        }
    }
}
