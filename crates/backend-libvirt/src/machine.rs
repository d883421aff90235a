//! The guest machine: architecture and machine type, CPU model and firmware (the `arch`,
//! `cpu_mode` and `firmware` keys of `[backends.libvirt]`), validated once and rendered as the
//! `<os>`, `<cpu>` and `<features>` elements of the domain XML.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::{DirectBoot, DomainType};
use crate::xml::{escape, escape_path};

/// Guest architectures the backend builds domains for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    I686,
    Aarch64,
}

impl Arch {
    const ALL: [Arch; 3] = [Arch::X86_64, Arch::I686, Arch::Aarch64];

    /// libvirt's name (`<type arch=…>`), which is also the config value.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::I686 => "i686",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The machine type. x86: `pc` (i440fx), what libvirt and QEMU pick when none is given, so
    /// the same as before `arch` existed; it boots SeaBIOS and OVMF (without Secure Boot, which
    /// would need q35 and SMM). aarch64: `virt`, the only general-purpose one.
    pub fn machine(self) -> &'static str {
        match self {
            Arch::X86_64 | Arch::I686 => "pc",
            Arch::Aarch64 => "virt",
        }
    }

    /// The architecture of this host (the one hyperjob was built for), if supported.
    pub fn of_host() -> Option<Arch> {
        Self::from_rust(std::env::consts::ARCH)
    }

    /// Rust's name of an architecture (`std::env::consts::ARCH`) to libvirt's.
    fn from_rust(arch: &str) -> Option<Arch> {
        match arch {
            "x86_64" => Some(Arch::X86_64),
            "x86" => Some(Arch::I686),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    fn parse(name: &str) -> Option<Arch> {
        Self::ALL.into_iter().find(|arch| arch.as_str() == name)
    }

    /// Whether KVM on a `host` can run this architecture.
    fn kvm_runs_on(self, host: Option<Arch>) -> bool {
        host == Some(self) || (host == Some(Arch::X86_64) && self == Arch::I686)
    }
}

/// The guest CPU (`cpu_mode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuMode {
    /// The host CPU as it is (KVM only).
    HostPassthrough,
    /// The named model closest to the host CPU, with its extra features, as libvirt computes it.
    HostModel,
    /// Every feature the hypervisor can give (= host-passthrough under KVM; under TCG all
    /// that QEMU emulates).
    Maximum,
    /// A named CPU model (e.g. `Skylake-Server`): exactly that, or the domain does not start.
    Model(String),
}

impl CpuMode {
    fn parse(value: &str) -> Option<CpuMode> {
        Some(match value {
            "host-passthrough" => CpuMode::HostPassthrough,
            "host-model" => CpuMode::HostModel,
            "maximum" => CpuMode::Maximum,
            name if is_model_name(name) => CpuMode::Model(name.to_string()),
            _ => return None,
        })
    }

    fn as_str(&self) -> &str {
        match self {
            CpuMode::HostPassthrough => "host-passthrough",
            CpuMode::HostModel => "host-model",
            CpuMode::Maximum => "maximum",
            CpuMode::Model(name) => name,
        }
    }
}

/// A CPU model name as QEMU and libvirt spell them (`Skylake-Server-v4`, `EPYC`, `qemu64`,
/// `cortex-a57`, `Opteron_G5`): a letter or digit, then letters, digits, `-`, `_` and `.`.
fn is_model_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.len() <= 64
}

/// The firmware (`firmware`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS on x86; on aarch64 no firmware at all (only direct kernel boot).
    Bios,
    /// UEFI, chosen by libvirt's firmware autoselection (OVMF on x86, AAVMF on aarch64),
    /// without Secure Boot.
    Efi,
}

/// The validated machine of every job's VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub arch: Arch,
    /// `None`: no `<cpu>` element, the hypervisor's default model (`qemu64` for x86 under TCG).
    pub cpu: Option<CpuMode>,
    pub firmware: Firmware,
}

/// The three keys as the config file has them.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineKeys<'a> {
    pub arch: Option<&'a str>,
    pub cpu_mode: Option<&'a str>,
    pub firmware: Option<&'a str>,
}

impl Machine {
    /// Validates the keys for this host; the error is one line naming the key.
    pub fn from_keys(
        keys: MachineKeys<'_>,
        domain_type: DomainType,
        direct_boot: bool,
    ) -> Result<Machine, String> {
        Self::for_host(keys, domain_type, direct_boot, Arch::of_host())
    }

    fn for_host(
        keys: MachineKeys<'_>,
        domain_type: DomainType,
        direct_boot: bool,
        host: Option<Arch>,
    ) -> Result<Machine, String> {
        let supported = || {
            Arch::ALL
                .iter()
                .map(|a| format!("{:?}", a.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let arch = match keys.arch {
            Some(name) => Arch::parse(name)
                .ok_or_else(|| format!("`arch` must be one of {}, not {name:?}", supported()))?,
            None => host.ok_or_else(|| {
                format!(
                    "this host's architecture ({}) has no default guest architecture: set `arch` to one of {}",
                    std::env::consts::ARCH,
                    supported()
                )
            })?,
        };
        if domain_type == DomainType::Kvm && !arch.kvm_runs_on(host) {
            return Err(format!(
                "`arch` = {:?} needs `domain_type` = \"qemu\" on this {} host (KVM runs only the host's architecture)",
                arch.as_str(),
                std::env::consts::ARCH
            ));
        }
        let cpu = match keys.cpu_mode {
            Some(value) => Some(CpuMode::parse(value).ok_or_else(|| {
                format!(
                    "`cpu_mode` must be \"host-passthrough\", \"host-model\", \"maximum\" or a CPU model name such as \"Skylake-Server\", not {value:?}"
                )
            })?),
            None => Self::default_cpu(domain_type, arch),
        };
        if domain_type == DomainType::Qemu && cpu == Some(CpuMode::HostPassthrough) {
            return Err("`cpu_mode` = \"host-passthrough\" needs `domain_type` = \"kvm\" (libvirt refuses it under TCG); use \"maximum\" or a CPU model name".to_string());
        }
        let firmware = match keys.firmware {
            Some("bios") => Firmware::Bios,
            Some("efi") => Firmware::Efi,
            Some(other) => {
                return Err(format!(
                    "`firmware` must be \"bios\" or \"efi\", not {other:?}"
                ))
            }
            // aarch64 has no BIOS: UEFI is how its images boot.
            None if arch == Arch::Aarch64 => Firmware::Efi,
            None => Firmware::Bios,
        };
        if arch == Arch::Aarch64 && firmware == Firmware::Bios && !direct_boot {
            return Err("`firmware` = \"bios\" on aarch64 means no firmware, so it needs `kernel` (direct kernel boot); use \"efi\" to boot the image's own bootloader".to_string());
        }
        Ok(Machine {
            arch,
            cpu,
            firmware,
        })
    }

    /// `cpu_mode` when the key is left out: the host CPU under KVM; under TCG QEMU's default
    /// model on x86 (`qemu64`, as before), and everything TCG emulates on aarch64 (QEMU's
    /// default there, `cortex-a15`, is a 32-bit CPU).
    fn default_cpu(domain_type: DomainType, arch: Arch) -> Option<CpuMode> {
        match (domain_type, arch) {
            (DomainType::Kvm, _) => Some(CpuMode::HostPassthrough),
            (DomainType::Qemu, Arch::Aarch64) => Some(CpuMode::Maximum),
            (DomainType::Qemu, Arch::X86_64 | Arch::I686) => None,
        }
    }

    /// One line for the job log: `x86_64 pc, BIOS, CPU host-passthrough`.
    pub fn summary(&self) -> String {
        format!(
            "{} {}, {}, CPU {}",
            self.arch.as_str(),
            self.arch.machine(),
            match self.firmware {
                Firmware::Bios if self.arch == Arch::Aarch64 => "no firmware",
                Firmware::Bios => "BIOS",
                Firmware::Efi => "UEFI",
            },
            self.cpu.as_ref().map_or("default", CpuMode::as_str)
        )
    }

    /// A hint to add to libvirt's error when the domain did not start.
    pub fn start_error_hint(&self, libvirt_message: &str) -> Option<String> {
        let message = libvirt_message.to_ascii_lowercase();
        if self.firmware == Firmware::Efi && message.contains("firmware") {
            let package = match self.arch {
                Arch::X86_64 => "ovmf",
                Arch::I686 => "ovmf-ia32",
                Arch::Aarch64 => "qemu-efi-aarch64",
            };
            return Some(format!(
                "firmware = \"efi\" needs UEFI firmware for {} without Secure Boot on the host (Debian/Ubuntu package {package})",
                self.arch.as_str()
            ));
        }
        if matches!(self.cpu, Some(CpuMode::Model(_))) && message.contains("cpu") {
            return Some(
                "check `cpu_mode`: `virsh domcapabilities` lists the CPU models this host can run"
                    .to_string(),
            );
        }
        None
    }
}

/// Writes the `<os>` element. `nvram` is where the VM's UEFI variables live (`firmware` =
/// "efi" only): libvirt copies the firmware's template there and never removes it, not even
/// for a transient domain, so it is one of the VM's files in `images_dir`.
pub fn write_os(
    xml: &mut String,
    machine: &Machine,
    nvram: &Path,
    direct_boot: Option<&DirectBoot>,
) {
    let efi = machine.firmware == Firmware::Efi;
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(xml, "  <os{}>", if efi { " firmware='efi'" } else { "" });
    let _ = writeln!(
        xml,
        "    <type arch='{}' machine='{}'>hvm</type>",
        machine.arch.as_str(),
        machine.arch.machine()
    );
    if efi {
        // Secure Boot off, so autoselection picks plain UEFI: no SMM or q35 needed, and a
        // kernel booted directly need not be signed with the enrolled keys.
        let _ = writeln!(xml, "    <firmware>");
        let _ = writeln!(xml, "      <feature enabled='no' name='secure-boot'/>");
        let _ = writeln!(xml, "      <feature enabled='no' name='enrolled-keys'/>");
        let _ = writeln!(xml, "    </firmware>");
        let _ = writeln!(xml, "    <nvram>{}</nvram>", escape_path(nvram));
    }
    match direct_boot {
        // Under UEFI the firmware starts the kernel through its EFI stub.
        Some(boot) => {
            let _ = writeln!(xml, "    <kernel>{}</kernel>", escape_path(&boot.kernel));
            if let Some(initrd) = &boot.initrd {
                let _ = writeln!(xml, "    <initrd>{}</initrd>", escape_path(initrd));
            }
            if let Some(cmdline) = &boot.cmdline {
                let _ = writeln!(xml, "    <cmdline>{}</cmdline>", escape(cmdline));
            }
        }
        None => {
            let _ = writeln!(xml, "    <boot dev='hd'/>");
        }
    }
    let _ = writeln!(xml, "  </os>");
}

/// Writes the `<cpu>` element, if the machine has one.
pub fn write_cpu(xml: &mut String, machine: &Machine) {
    let _ = match &machine.cpu {
        None => Ok(()),
        Some(CpuMode::HostPassthrough) => writeln!(xml, "  <cpu mode='host-passthrough'/>"),
        Some(CpuMode::HostModel) => writeln!(xml, "  <cpu mode='host-model'/>"),
        Some(CpuMode::Maximum) => writeln!(xml, "  <cpu mode='maximum'/>"),
        Some(CpuMode::Model(name)) => writeln!(
            xml,
            "  <cpu mode='custom' match='exact'><model fallback='forbid'>{}</model></cpu>",
            escape(name)
        ),
    };
}

/// Writes the `<features>` element: ACPI and the APIC on x86; on aarch64 ACPI with UEFI only
/// (libvirt refuses it without), else the device tree QEMU generates.
pub fn write_features(xml: &mut String, machine: &Machine) {
    let _ = match (machine.arch, machine.firmware) {
        (Arch::X86_64 | Arch::I686, _) => writeln!(xml, "  <features><acpi/><apic/></features>"),
        (Arch::Aarch64, Firmware::Efi) => writeln!(xml, "  <features><acpi/></features>"),
        (Arch::Aarch64, Firmware::Bios) => Ok(()),
    };
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    const X86: Option<Arch> = Some(Arch::X86_64);

    fn machine(
        arch: Option<&str>,
        cpu_mode: Option<&str>,
        firmware: Option<&str>,
        domain_type: DomainType,
    ) -> Result<Machine, String> {
        let keys = MachineKeys {
            arch,
            cpu_mode,
            firmware,
        };
        Machine::for_host(keys, domain_type, false, X86)
    }

    fn rendered(machine: &Machine, boot: Option<&DirectBoot>) -> String {
        let mut xml = String::new();
        write_os(
            &mut xml,
            machine,
            Path::new("/images/hyperjob-job-1.nvram.fd"),
            boot,
        );
        write_cpu(&mut xml, machine);
        write_features(&mut xml, machine);
        xml
    }

    #[test]
    fn host_architecture_maps_to_libvirts_names() {
        assert_eq!(Arch::from_rust("x86_64"), Some(Arch::X86_64));
        assert_eq!(Arch::from_rust("x86"), Some(Arch::I686));
        assert_eq!(Arch::from_rust("aarch64"), Some(Arch::Aarch64));
        assert_eq!(Arch::from_rust("powerpc64"), None);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(Arch::of_host(), Some(Arch::X86_64));
    }

    #[test]
    fn kvm_defaults_to_the_host_cpu_bios_and_the_host_architecture() {
        let m = machine(None, None, None, DomainType::Kvm).expect("valid");

        assert_eq!(
            m,
            Machine {
                arch: Arch::X86_64,
                cpu: Some(CpuMode::HostPassthrough),
                firmware: Firmware::Bios,
            }
        );
        let xml = rendered(&m, None);
        assert!(xml.contains("<os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n    <boot dev='hd'/>\n  </os>"), "{xml}");
        assert!(xml.contains("  <cpu mode='host-passthrough'/>\n"), "{xml}");
        assert!(xml.contains("<features><acpi/><apic/></features>"), "{xml}");
        assert!(!xml.contains("firmware") && !xml.contains("nvram"), "{xml}");
        assert_eq!(m.summary(), "x86_64 pc, BIOS, CPU host-passthrough");
    }

    #[test]
    fn tcg_on_x86_keeps_qemus_default_cpu() {
        let m = machine(None, None, None, DomainType::Qemu).expect("valid");

        assert_eq!(m.cpu, None);
        assert!(!rendered(&m, None).contains("<cpu"));
        assert_eq!(m.summary(), "x86_64 pc, BIOS, CPU default");
    }

    #[test]
    fn each_cpu_mode_is_rendered() {
        for (value, element) in [
            ("host-passthrough", "<cpu mode='host-passthrough'/>"),
            ("host-model", "<cpu mode='host-model'/>"),
            ("maximum", "<cpu mode='maximum'/>"),
            (
                "Skylake-Server",
                "<cpu mode='custom' match='exact'><model fallback='forbid'>Skylake-Server</model></cpu>",
            ),
            (
                "Cascadelake-Server-v4",
                "<model fallback='forbid'>Cascadelake-Server-v4</model>",
            ),
            ("Opteron_G5", "<model fallback='forbid'>Opteron_G5</model>"),
        ] {
            let m = machine(None, Some(value), None, DomainType::Kvm).expect(value);

            assert!(rendered(&m, None).contains(element), "{value}");
            assert!(m.summary().ends_with(&format!("CPU {value}")), "{value}");
        }
    }

    #[test]
    fn named_models_and_host_model_work_under_tcg() {
        for value in ["Nehalem", "qemu64", "host-model", "maximum"] {
            assert!(
                machine(None, Some(value), None, DomainType::Qemu).is_ok(),
                "{value}"
            );
        }
    }

    #[test]
    fn host_passthrough_under_tcg_is_a_config_error() {
        let err = machine(None, Some("host-passthrough"), None, DomainType::Qemu)
            .expect_err("TCG cannot pass the host CPU through");

        assert!(
            err.starts_with("`cpu_mode` = \"host-passthrough\" needs `domain_type` = \"kvm\""),
            "{err}"
        );
    }

    #[test]
    fn a_cpu_mode_that_is_not_a_plain_name_is_rejected_on_one_line() {
        for bad in [
            "",
            "-Skylake",
            "Skylake Server",
            "a'/><evil/>",
            "host\npassthrough",
            "Sky/lake",
            &"x".repeat(65),
        ] {
            let err = machine(None, Some(bad), None, DomainType::Kvm).expect_err(bad);

            assert!(err.starts_with("`cpu_mode` must be \"host-passthrough\", \"host-model\", \"maximum\" or a CPU model name"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn arch_is_configurable_and_picks_the_machine_type() {
        let m = machine(Some("aarch64"), None, None, DomainType::Qemu).expect("valid");

        assert_eq!(m.arch, Arch::Aarch64);
        assert_eq!(m.firmware, Firmware::Efi, "aarch64 has no BIOS");
        assert_eq!(m.cpu, Some(CpuMode::Maximum), "QEMU's default is 32-bit");
        let xml = rendered(&m, None);
        assert!(
            xml.contains("<type arch='aarch64' machine='virt'>hvm</type>"),
            "{xml}"
        );
        assert!(xml.contains("<features><acpi/></features>"), "{xml}");
        assert!(!xml.contains("<apic/>"), "{xml}");

        let i686 = machine(Some("i686"), None, None, DomainType::Kvm).expect("valid");
        assert!(rendered(&i686, None).contains("<type arch='i686' machine='pc'>hvm</type>"));
    }

    #[test]
    fn unknown_arch_is_rejected_with_the_supported_ones() {
        let err = machine(Some("sparc"), None, None, DomainType::Qemu).expect_err("sparc");

        assert_eq!(
            err,
            "`arch` must be one of \"x86_64\", \"i686\", \"aarch64\", not \"sparc\""
        );
    }

    #[test]
    fn kvm_only_runs_the_hosts_architecture() {
        let err = machine(Some("aarch64"), None, None, DomainType::Kvm).expect_err("foreign");

        assert!(
            err.starts_with("`arch` = \"aarch64\" needs `domain_type` = \"qemu\""),
            "{err}"
        );
        let keys = MachineKeys::default();
        assert!(Machine::for_host(keys, DomainType::Kvm, false, Some(Arch::Aarch64)).is_ok());
        let err = Machine::for_host(keys, DomainType::Qemu, false, None).expect_err("no default");
        assert!(err.contains("set `arch` to one of"), "{err}");
        assert!(Machine::for_host(
            MachineKeys {
                arch: Some("x86_64"),
                ..keys
            },
            DomainType::Qemu,
            false,
            None
        )
        .is_ok());
    }

    #[test]
    fn efi_uses_autoselection_without_secure_boot_and_a_per_vm_nvram() {
        let m = machine(None, None, Some("efi"), DomainType::Kvm).expect("valid");

        let xml = rendered(&m, None);

        assert!(
            xml.contains(
                "  <os firmware='efi'>\n    <type arch='x86_64' machine='pc'>hvm</type>\n    <firmware>\n      <feature enabled='no' name='secure-boot'/>\n      <feature enabled='no' name='enrolled-keys'/>\n    </firmware>\n    <nvram>/images/hyperjob-job-1.nvram.fd</nvram>\n    <boot dev='hd'/>\n  </os>\n"
            ),
            "{xml}"
        );
        assert!(
            !xml.contains("<loader"),
            "libvirt picks the firmware: {xml}"
        );
        assert_eq!(m.summary(), "x86_64 pc, UEFI, CPU host-passthrough");
    }

    #[test]
    fn efi_with_direct_kernel_boot_keeps_the_kernel() {
        let m = machine(None, None, Some("efi"), DomainType::Qemu).expect("valid");
        let boot = DirectBoot {
            kernel: PathBuf::from("/boot/vmlinuz"),
            initrd: None,
            cmdline: Some("console=ttyS0".into()),
        };

        let xml = rendered(&m, Some(&boot));

        assert!(xml.contains("<nvram>/images/hyperjob-job-1.nvram.fd</nvram>\n    <kernel>/boot/vmlinuz</kernel>\n    <cmdline>console=ttyS0</cmdline>\n  </os>"), "{xml}");
        assert!(!xml.contains("<boot dev"), "{xml}");
    }

    #[test]
    fn unknown_firmware_is_rejected() {
        let err = machine(None, None, Some("uefi"), DomainType::Kvm).expect_err("uefi");

        assert_eq!(err, "`firmware` must be \"bios\" or \"efi\", not \"uefi\"");
    }

    #[test]
    fn aarch64_without_firmware_needs_a_kernel() {
        let keys = MachineKeys {
            arch: Some("aarch64"),
            firmware: Some("bios"),
            ..MachineKeys::default()
        };

        let err = Machine::for_host(keys, DomainType::Qemu, false, X86).expect_err("no kernel");
        let direct = Machine::for_host(keys, DomainType::Qemu, true, X86).expect("direct boot");

        assert!(err.contains("needs `kernel`"), "{err}");
        let xml = rendered(&direct, None);
        assert!(
            !xml.contains("<features>") && !xml.contains("firmware"),
            "{xml}"
        );
        assert_eq!(direct.summary(), "aarch64 virt, no firmware, CPU maximum");
    }

    #[test]
    fn start_errors_get_a_hint_for_missing_firmware_and_unknown_models() {
        let efi = machine(None, None, Some("efi"), DomainType::Qemu).expect("valid");
        let named = machine(None, Some("Nehalem"), None, DomainType::Qemu).expect("valid");
        let no_firmware = "operation failed: Unable to find 'efi' firmware that is compatible with the current configuration";

        assert!(efi
            .start_error_hint(no_firmware)
            .is_some_and(|h| h.contains("package ovmf")));
        assert!(named
            .start_error_hint("internal error: Unknown CPU model Nehalme")
            .is_some_and(|h| h.contains("domcapabilities")));
        assert_eq!(named.start_error_hint(no_firmware), None);
        assert_eq!(efi.start_error_hint("Network not found"), None);
    }
}
