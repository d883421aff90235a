//! `[backends.qemu]`: the serde input and its validated runtime form.

use std::path::{Path, PathBuf};

use hyperjob_plugin::{EndpointKind, PluginError};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QemuConfigFile {
    qemu: Option<PathBuf>,
    accel: Option<String>,
    base_image: Option<PathBuf>,
    images_dir: Option<PathBuf>,
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    guest_port: Option<u16>,
    restrict_network: Option<bool>,
    endpoint: Option<String>,
}

/// Hardware virtualisation (`kvm`) or software emulation (`tcg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
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

/// The validated `[backends.qemu]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConfig {
    /// The emulator: a command name looked up in `PATH`, or an absolute path.
    pub qemu: PathBuf,
    pub accel: Accel,
    pub base_image: PathBuf,
    /// Per-job overlays, seeds, console logs, pid files, QMP sockets and state files.
    pub images_dir: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub direct_boot: Option<DirectBoot>,
    /// The guest port the host's forwarded loopback port leads to (the guest's sshd).
    pub guest_port: u16,
    /// `restrict=on` for QEMU's user-mode network: the guest reaches nothing outside QEMU.
    pub restrict_network: bool,
    /// How the guest's SSH server is handed out: `tcp`, the forwarded loopback port; `unix`, a
    /// UNIX socket of a virtio-serial port (`org.hyperjob.ssh`) the guest bridges to its SSH
    /// server.
    pub endpoint: EndpointKind,
}

/// `images_dir` when the table names none: a directory below hyperjob's state directory.
pub fn default_images_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("qemu")
}

impl QemuConfig {
    /// Parses the TOML text of the table (what a shared-library plugin receives): one-line
    /// errors naming the key.
    pub fn from_toml_text(text: &str, state_dir: &Path) -> Result<Self, PluginError> {
        let file: QemuConfigFile = hyperjob_plugin::config::parse(text)?;
        let invalid = |message: String| PluginError::Config(message);
        let quoted = |path: &Path| format!("{:?}", path.display().to_string());
        let qemu = file
            .qemu
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        let qemu_text = qemu.to_string_lossy();
        if qemu_text.trim().is_empty()
            || qemu_text.contains('\0')
            || (!qemu.is_absolute() && qemu_text.contains('/'))
        {
            return Err(invalid(format!(
                "`qemu` must be a command name or an absolute path, not {}",
                quoted(&qemu)
            )));
        }
        let accel = match file.accel.as_deref().unwrap_or("kvm") {
            "kvm" => Accel::Kvm,
            "tcg" => Accel::Tcg,
            other => {
                return Err(invalid(format!(
                    "`accel` must be \"kvm\" or \"tcg\", not {other:?}"
                )))
            }
        };
        let base_image = file
            .base_image
            .ok_or_else(|| invalid("`base_image` is required".to_string()))?;
        let images_dir = file
            .images_dir
            .unwrap_or_else(|| default_images_dir(state_dir));
        for (key, path) in [
            ("base_image", Some(&base_image)),
            ("images_dir", Some(&images_dir)),
            ("kernel", file.kernel.as_ref()),
            ("initrd", file.initrd.as_ref()),
        ] {
            if let Some(path) = path {
                if !path.is_absolute() {
                    return Err(invalid(format!(
                        "`{key}` must be an absolute path, not {}",
                        quoted(path)
                    )));
                }
            }
        }
        let vcpus = file.vcpus.unwrap_or(2);
        if !(1..=255).contains(&vcpus) {
            return Err(invalid(format!(
                "`vcpus` must be between 1 and 255, not {vcpus}"
            )));
        }
        let memory_mib = file.memory_mib.unwrap_or(2048);
        if !(64..=(1 << 24)).contains(&memory_mib) {
            return Err(invalid(format!(
                "`memory_mib` must be between 64 and 16777216, not {memory_mib}"
            )));
        }
        let guest_port = file.guest_port.unwrap_or(22);
        if guest_port == 0 {
            return Err(invalid(
                "`guest_port` must be between 1 and 65535".to_string(),
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
        if let Some(cmdline) = direct_boot.as_ref().and_then(|b| b.cmdline.as_ref()) {
            if cmdline.contains('\0') {
                return Err(invalid("`cmdline` must not contain NUL".to_string()));
            }
        }
        let endpoint = match file.endpoint.as_deref().unwrap_or("tcp") {
            "tcp" => EndpointKind::Tcp,
            "unix" => EndpointKind::Unix,
            other => {
                return Err(invalid(format!(
                    "`endpoint` must be \"tcp\" or \"unix\", not {other:?}"
                )))
            }
        };
        Ok(Self {
            qemu,
            accel,
            base_image,
            images_dir,
            vcpus,
            memory_mib,
            direct_boot,
            guest_port,
            restrict_network: file.restrict_network.unwrap_or(false),
            endpoint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<QemuConfig, PluginError> {
        QemuConfig::from_toml_text(text, Path::new("/var/lib/hyperjob"))
    }

    #[test]
    fn defaults_fill_everything_but_the_base_image() {
        let config = parse("base_image = \"/images/base.qcow2\"").expect("valid");

        assert_eq!(config.qemu, PathBuf::from("qemu-system-x86_64"));
        assert_eq!(config.accel, Accel::Kvm);
        assert_eq!(config.images_dir, PathBuf::from("/var/lib/hyperjob/qemu"));
        assert_eq!((config.vcpus, config.memory_mib), (2, 2048));
        assert_eq!(config.guest_port, 22);
        assert_eq!(config.direct_boot, None);
        assert!(!config.restrict_network);
        assert_eq!(config.endpoint, EndpointKind::Tcp);
    }

    #[test]
    fn unknown_endpoint_is_rejected_naming_the_key() {
        let err = parse("base_image = \"/b\"\nendpoint = \"vsock\"").expect_err("vsock");

        assert_eq!(
            err.to_string(),
            "`endpoint` must be \"tcp\" or \"unix\", not \"vsock\""
        );
    }

    #[test]
    fn every_key_is_read() {
        let config = parse(
            "qemu = \"/opt/qemu/bin/qemu-system-x86_64\"\naccel = \"tcg\"\nbase_image = \"/b\"\n\
             images_dir = \"/i\"\nvcpus = 1\nmemory_mib = 512\nkernel = \"/k\"\ninitrd = \"/r\"\n\
             cmdline = \"root=/dev/vda\"\nguest_port = 2222\nrestrict_network = true\n\
             endpoint = \"unix\"",
        )
        .expect("valid");

        assert_eq!(
            config,
            QemuConfig {
                qemu: PathBuf::from("/opt/qemu/bin/qemu-system-x86_64"),
                accel: Accel::Tcg,
                base_image: PathBuf::from("/b"),
                images_dir: PathBuf::from("/i"),
                vcpus: 1,
                memory_mib: 512,
                direct_boot: Some(DirectBoot {
                    kernel: PathBuf::from("/k"),
                    initrd: Some(PathBuf::from("/r")),
                    cmdline: Some("root=/dev/vda".to_string()),
                }),
                guest_port: 2222,
                restrict_network: true,
                endpoint: EndpointKind::Unix,
            }
        );
    }

    #[test]
    fn missing_base_image_is_reported() {
        let err = parse("vcpus = 1").expect_err("no base image");

        assert_eq!(err.to_string(), "`base_image` is required");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("base_image = \"/b\"\nnetwork = \"default\"").expect_err("unknown");

        assert!(err.to_string().contains("unknown field `network`"), "{err}");
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[test]
    fn unknown_accel_is_rejected_naming_the_key() {
        let err = parse("base_image = \"/b\"\naccel = \"hvf\"").expect_err("hvf");

        assert_eq!(
            err.to_string(),
            "`accel` must be \"kvm\" or \"tcg\", not \"hvf\""
        );
    }

    #[test]
    fn wrongly_typed_value_is_one_line() {
        let err = parse("base_image = \"/b\"\nvcpus = \"two\"").expect_err("string");

        assert!(err.to_string().contains("invalid type"), "{err}");
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[test]
    fn out_of_range_numbers_name_their_key() {
        for (text, key) in [
            ("vcpus = 0", "`vcpus`"),
            ("vcpus = 256", "`vcpus`"),
            ("memory_mib = 32", "`memory_mib`"),
            ("guest_port = 0", "`guest_port`"),
        ] {
            let err = parse(&format!("base_image = \"/b\"\n{text}")).expect_err(text);

            assert!(err.to_string().starts_with(key), "{text}: {err}");
        }
    }

    #[test]
    fn relative_paths_are_rejected() {
        for key in ["base_image", "images_dir", "kernel", "initrd"] {
            let text = if key == "base_image" {
                "base_image = \"base.qcow2\"".to_string()
            } else {
                format!("base_image = \"/b\"\n{key} = \"rel/x\"")
            };

            let err = parse(&text).expect_err(key);

            assert!(
                err.to_string()
                    .starts_with(&format!("`{key}` must be an absolute path")),
                "{err}"
            );
        }
    }

    #[test]
    fn qemu_must_be_a_command_name_or_absolute() {
        let err = parse("base_image = \"/b\"\nqemu = \"bin/qemu\"").expect_err("relative");

        assert!(
            err.to_string()
                .starts_with("`qemu` must be a command name or an absolute path"),
            "{err}"
        );
        parse("base_image = \"/b\"\nqemu = \"qemu-kvm\"").expect("a command name");
    }

    #[test]
    fn cmdline_without_kernel_is_rejected() {
        let err = parse("base_image = \"/b\"\ncmdline = \"console=ttyS0\"").expect_err("no kernel");

        assert!(err.to_string().contains("need `kernel`"), "{err}");
    }

    #[test]
    fn a_path_with_a_line_break_stays_on_one_line() {
        let err = parse("base_image = \"b\\n\"").expect_err("relative");

        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[test]
    fn broken_toml_text_is_a_config_error() {
        let err = parse("base_image = ").expect_err("syntax");

        assert!(matches!(err, PluginError::Config(_)), "{err:?}");
        assert!(!err.to_string().contains('\n'), "{err}");
    }
}
