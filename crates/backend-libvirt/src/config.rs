//! `[backends.libvirt]`: the serde input and its validated runtime form.

use std::path::PathBuf;

use hyperjob_core::config::parse_plugin_table;
use hyperjob_core::PluginError;
use serde::Deserialize;

use crate::machine::{Machine, MachineKeys};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LibvirtConfigFile {
    uri: Option<String>,
    domain_type: Option<String>,
    base_image: Option<PathBuf>,
    images_dir: Option<PathBuf>,
    network: Option<String>,
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    arch: Option<String>,
    cpu_mode: Option<String>,
    firmware: Option<String>,
    mac_pool_size: Option<u32>,
    isolate: Option<bool>,
    nwfilter: Option<String>,
}

/// Hardware virtualisation (`kvm`) or software emulation (`qemu`, TCG).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainType {
    Kvm,
    Qemu,
}

impl DomainType {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
        }
    }
}

/// Direct kernel boot, for images without a bootloader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
}

/// The validated `[backends.libvirt]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtConfig {
    pub uri: String,
    pub domain_type: DomainType,
    pub base_image: PathBuf,
    pub images_dir: PathBuf,
    pub network: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub direct_boot: Option<DirectBoot>,
    /// `arch`, `cpu_mode` and `firmware`.
    pub machine: Machine,
    /// Job slots with a fixed MAC each (`mac_pool_size`); 0: libvirt picks a random MAC.
    pub mac_pool_size: u32,
    /// `<port isolated='yes'/>`: guests on the network cannot reach each other (`isolate`).
    pub isolate: bool,
    /// The nwfilter bound to the guest's interface (`nwfilter`); `None` for `nwfilter = ""`.
    pub nwfilter: Option<String>,
}

/// Default `mac_pool_size`: more than the jobs one host runs at once.
pub const DEFAULT_MAC_POOL_SIZE: u32 = 64;

impl LibvirtConfig {
    pub fn from_table(table: &toml::Table) -> Result<Self, PluginError> {
        check_network_types(table)?;
        let file: LibvirtConfigFile = parse_plugin_table(table)?;
        let invalid = |message: String| PluginError::Config(message);
        let domain_type = match file.domain_type.as_deref().unwrap_or("kvm") {
            "kvm" => DomainType::Kvm,
            "qemu" => DomainType::Qemu,
            other => {
                return Err(invalid(format!(
                    "`domain_type` must be \"kvm\" or \"qemu\", not {other:?}"
                )))
            }
        };
        let base_image = file
            .base_image
            .ok_or_else(|| invalid("`base_image` is required".to_string()))?;
        let images_dir = file
            .images_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/libvirt/images"));
        for (key, path) in [
            ("base_image", Some(&base_image)),
            ("images_dir", Some(&images_dir)),
            ("kernel", file.kernel.as_ref()),
            ("initrd", file.initrd.as_ref()),
        ] {
            if let Some(path) = path {
                if !path.is_absolute() {
                    return Err(invalid(format!(
                        "`{key}` must be an absolute path, not {:?}",
                        path.display().to_string()
                    )));
                }
            }
        }
        let vcpus = file.vcpus.unwrap_or(2);
        if !(1..=1024).contains(&vcpus) {
            return Err(invalid(format!(
                "`vcpus` must be between 1 and 1024, not {vcpus}"
            )));
        }
        let memory_mib = file.memory_mib.unwrap_or(2048);
        if memory_mib < 64 {
            return Err(invalid(format!(
                "`memory_mib` must be at least 64, not {memory_mib}"
            )));
        }
        let network = file.network.unwrap_or_else(|| "default".to_string());
        if network.trim().is_empty() {
            return Err(invalid("`network` must name a libvirt network".to_string()));
        }
        let uri = file.uri.unwrap_or_else(|| "qemu:///system".to_string());
        if uri.trim().is_empty() || uri.contains('\0') {
            return Err(invalid(
                "`uri` must be a libvirt connection URI".to_string(),
            ));
        }
        let direct_boot = match (file.kernel, file.initrd, file.cmdline) {
            (None, None, None) => None,
            (Some(kernel), initrd, cmdline) => Some(DirectBoot {
                kernel,
                initrd,
                cmdline,
            }),
            (None, _, _) => {
                return Err(invalid(
                    "`initrd` and `cmdline` need `kernel` (direct kernel boot)".to_string(),
                ))
            }
        };
        let keys = MachineKeys {
            arch: file.arch.as_deref(),
            cpu_mode: file.cpu_mode.as_deref(),
            firmware: file.firmware.as_deref(),
        };
        let machine =
            Machine::from_keys(keys, domain_type, direct_boot.is_some()).map_err(invalid)?;
        let mac_pool_size = file.mac_pool_size.unwrap_or(DEFAULT_MAC_POOL_SIZE);
        let nwfilter = match file.nwfilter {
            None => Some("clean-traffic".to_string()),
            Some(name) if name.is_empty() => None,
            Some(name) => {
                if name.trim() != name || name.contains(char::is_control) {
                    return Err(invalid(format!(
                        "`nwfilter` must name a libvirt nwfilter (or be \"\" for none), not {name:?}"
                    )));
                }
                Some(name)
            }
        };
        Ok(Self {
            uri,
            domain_type,
            base_image,
            images_dir,
            network,
            vcpus,
            memory_mib,
            direct_boot,
            machine,
            mac_pool_size,
            isolate: file.isolate.unwrap_or(true),
            nwfilter,
        })
    }
}

/// The network keys' types, checked first so that a wrong one is named (serde's message for a
/// value of the wrong type does not say which key it is).
fn check_network_types(table: &toml::Table) -> Result<(), PluginError> {
    let wrong = |message: String| Err(PluginError::Config(message));
    if let Some(value) = table.get("mac_pool_size") {
        match value.as_integer() {
            Some(size) if (0..=1 << 16).contains(&size) => {}
            _ => {
                return wrong(format!(
                    "`mac_pool_size` must be between 0 and 65536, not {value}"
                ))
            }
        }
    }
    if let Some(value) = table.get("isolate") {
        if !value.is_bool() {
            return wrong(format!("`isolate` must be true or false, not {value}"));
        }
    }
    if let Some(value) = table.get("nwfilter") {
        if !value.is_str() {
            return wrong(format!(
                "`nwfilter` must name a libvirt nwfilter (or be \"\" for none), not {value}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Arch, CpuMode, Firmware};

    fn parse(text: &str) -> Result<LibvirtConfig, PluginError> {
        LibvirtConfig::from_table(&toml::from_str(text).expect("toml"))
    }

    #[test]
    fn defaults_fill_everything_but_the_base_image() {
        let config = parse("base_image = \"/images/base.qcow2\"").expect("valid");

        assert_eq!(config.uri, "qemu:///system");
        assert_eq!(config.domain_type, DomainType::Kvm);
        assert_eq!(config.images_dir, PathBuf::from("/var/lib/libvirt/images"));
        assert_eq!(config.network, "default");
        assert_eq!((config.vcpus, config.memory_mib), (2, 2048));
        assert_eq!(config.direct_boot, None);
        assert_eq!(config.machine.cpu, Some(CpuMode::HostPassthrough));
        assert_eq!(config.machine.firmware, Firmware::Bios);
        assert_eq!(
            config.machine.arch,
            Arch::of_host().expect("a supported host")
        );
        assert_eq!(config.mac_pool_size, 64);
        assert!(config.isolate);
        assert_eq!(config.nwfilter.as_deref(), Some("clean-traffic"));
    }

    #[test]
    fn machine_keys_are_read() {
        let config = parse(
            "base_image = \"/b\"\ndomain_type = \"qemu\"\narch = \"x86_64\"\ncpu_mode = \"Nehalem\"\nfirmware = \"efi\"",
        )
        .expect("valid");

        assert_eq!(config.machine.arch, Arch::X86_64);
        assert_eq!(config.machine.cpu, Some(CpuMode::Model("Nehalem".into())));
        assert_eq!(config.machine.firmware, Firmware::Efi);
    }

    #[test]
    fn a_bad_machine_key_is_a_config_error() {
        for (text, expected) in [
            (
                "cpu_mode = \"host-passthrough\"\ndomain_type = \"qemu\"",
                "`cpu_mode` = \"host-passthrough\" needs `domain_type` = \"kvm\"",
            ),
            ("cpu_mode = \"Sky lake\"", "`cpu_mode` must be"),
            (
                "firmware = \"uefi\"",
                "`firmware` must be \"bios\" or \"efi\"",
            ),
            (
                "arch = \"sparc\"\ndomain_type = \"qemu\"",
                "`arch` must be one of",
            ),
        ] {
            let err = parse(&format!("base_image = \"/b\"\n{text}")).expect_err(text);

            assert!(matches!(err, PluginError::Config(_)), "{err:?}");
            assert!(err.to_string().starts_with(expected), "{err}");
        }
    }

    #[test]
    fn network_protection_can_be_set_or_turned_off() {
        let config =
            parse("base_image = \"/b\"\nmac_pool_size = 0\nisolate = false\nnwfilter = \"\"")
                .expect("valid");

        assert_eq!(config.mac_pool_size, 0);
        assert!(!config.isolate);
        assert_eq!(config.nwfilter, None);
        let config = parse("base_image = \"/b\"\nnwfilter = \"my-filter\"").expect("valid");
        assert_eq!(config.nwfilter.as_deref(), Some("my-filter"));
    }

    #[test]
    fn bad_network_protection_values_are_named() {
        for (text, needle) in [
            (
                "mac_pool_size = 70000",
                "`mac_pool_size` must be between 0 and 65536",
            ),
            (
                "mac_pool_size = -1",
                "`mac_pool_size` must be between 0 and 65536, not -1",
            ),
            (
                "mac_pool_size = \"8\"",
                "`mac_pool_size` must be between 0 and 65536",
            ),
            ("nwfilter = 1", "`nwfilter` must name a libvirt nwfilter"),
            (
                "nwfilter = \" \"",
                "`nwfilter` must name a libvirt nwfilter",
            ),
            (
                "nwfilter = \"a\\nb\"",
                "`nwfilter` must name a libvirt nwfilter",
            ),
            (
                "isolate = \"yes\"",
                "`isolate` must be true or false, not \"yes\"",
            ),
        ] {
            let err = parse(&format!("base_image = \"/b\"\n{text}")).expect_err(text);

            assert!(err.to_string().contains(needle), "{text}: {err}");
            assert!(!err.to_string().contains('\n'), "{text}: {err}");
        }
    }

    #[test]
    fn missing_base_image_is_reported() {
        let err = parse("vcpus = 1").expect_err("no base image");

        assert_eq!(err.to_string(), "`base_image` is required");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("base_image = \"/b\"\nmemory = 5").expect_err("unknown");

        assert!(err.to_string().contains("unknown field `memory`"), "{err}");
    }

    #[test]
    fn unknown_domain_type_is_rejected() {
        let err = parse("base_image = \"/b\"\ndomain_type = \"xen\"").expect_err("xen");

        assert!(err.to_string().contains("\"xen\""), "{err}");
    }

    #[test]
    fn cmdline_without_kernel_is_rejected() {
        let err = parse("base_image = \"/b\"\ncmdline = \"console=ttyS0\"").expect_err("no kernel");

        assert!(err.to_string().contains("need `kernel`"), "{err}");
    }

    #[test]
    fn relative_paths_are_rejected() {
        let err = parse("base_image = \"base.qcow2\"").expect_err("relative");

        assert!(
            err.to_string()
                .contains("`base_image` must be an absolute path"),
            "{err}"
        );
    }

    #[test]
    fn a_path_with_a_line_break_stays_on_one_line() {
        let err = parse("base_image = \"b\\n\"").expect_err("relative");

        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[test]
    fn direct_boot_is_assembled() {
        let config = parse(
            "base_image = \"/b\"\nkernel = \"/k\"\ninitrd = \"/i\"\ncmdline = \"root=/dev/vda\"",
        )
        .expect("valid");

        assert_eq!(
            config.direct_boot,
            Some(DirectBoot {
                kernel: PathBuf::from("/k"),
                initrd: Some(PathBuf::from("/i")),
                cmdline: Some("root=/dev/vda".to_string()),
            })
        );
    }
}
