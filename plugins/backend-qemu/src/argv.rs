//! The QEMU command line, as a pure function of the validated config, the VM's file paths and
//! the forwarded host port.
//!
//! Nothing from the job reaches it: the only inputs are the administrator's config, paths
//! derived from the VM name (itself derived from the trusted job id) and numbers. Values inside
//! QEMU's `key=value,...` options have their commas doubled (QEMU's escape), so a path cannot
//! add options.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::config::QemuConfig;
use hyperjob_plugin::EndpointKind;

/// Every file a VM owns, all in `images_dir` and named after the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub overlay: PathBuf,
    pub seed: PathBuf,
    pub console_log: PathBuf,
    pub pidfile: PathBuf,
    pub qmp_socket: PathBuf,
    /// The UNIX socket of the guest's SSH port (`endpoint = "unix"`).
    pub ssh_socket: PathBuf,
    pub state: PathBuf,
    /// Where the state file is written before it is renamed into place.
    pub state_tmp: PathBuf,
}

impl VmPaths {
    pub fn new(images_dir: &Path, vm_name: &str) -> Self {
        let file = |suffix: &str| images_dir.join(format!("{vm_name}{suffix}"));
        Self {
            overlay: file(".qcow2"),
            seed: file(".seed.iso"),
            console_log: file(".console.log"),
            pidfile: file(".pid"),
            qmp_socket: file(".qmp"),
            ssh_socket: file(".ssh.sock"),
            state: file(crate::state::STATE_SUFFIX),
            state_tmp: images_dir.join(format!(".{vm_name}{}.tmp", crate::state::STATE_SUFFIX)),
        }
    }

    /// Every file, in the order destroy removes them (the state file last).
    pub fn all(&self) -> [&Path; 8] {
        [
            &self.overlay,
            &self.seed,
            &self.console_log,
            &self.pidfile,
            &self.qmp_socket,
            &self.ssh_socket,
            &self.state_tmp,
            &self.state,
        ]
    }
}

/// Doubles every comma: QEMU's escape for a value inside a `key=value,...` option.
pub fn escape_option_value(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &byte in value.as_bytes() {
        out.push(byte);
        if byte == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

fn option(prefix: &str, value: &OsStr, suffix: &str) -> OsString {
    let mut out = OsString::from(prefix);
    out.push(escape_option_value(value));
    out.push(suffix);
    out
}

/// The `-drive` value of the VM's overlay. It names the overlay's full path, which is unique
/// per VM, so finding it in a process's argv identifies that VM's QEMU (see `process`).
pub fn overlay_drive(overlay: &Path) -> OsString {
    option(
        "file=",
        overlay.as_os_str(),
        ",if=virtio,format=qcow2,discard=unmap",
    )
}

/// The name of the virtio-serial port the guest serves SSH on (`endpoint = "unix"`).
pub const SSH_PORT_NAME: &str = "org.hyperjob.ssh";

/// What one VM's QEMU is started with.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    pub config: &'a QemuConfig,
    pub vm_name: &'a str,
    pub paths: &'a VmPaths,
    /// Attach the cloud-init seed (per-job keys).
    pub with_seed: bool,
    /// The host's loopback port forwarded to the guest's `guest_port`.
    pub host_port: u16,
}

/// The arguments after the program name.
pub fn qemu_args(launch: &Launch<'_>) -> Vec<OsString> {
    let config = launch.config;
    let paths = launch.paths;
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&OsStr]| args.extend(items.iter().map(|s| s.to_os_string()));
    let restrict = if config.restrict_network { "on" } else { "off" };
    let netdev = format!(
        "user,id=net0,restrict={restrict},hostfwd=tcp:127.0.0.1:{}-:{}",
        launch.host_port, config.guest_port
    );
    let memory = config.memory_mib.to_string();
    let vcpus = config.vcpus.to_string();
    let machine = format!("accel={}", config.accel.as_str());
    let name = option("guest=", OsStr::new(launch.vm_name), "");
    let console = option("file,id=console,path=", paths.console_log.as_os_str(), "");
    let qmp = option(
        "socket,id=qmp,path=",
        paths.qmp_socket.as_os_str(),
        ",server=on,wait=off",
    );
    let overlay = overlay_drive(&paths.overlay);
    push(&[
        "-name".as_ref(),
        &name,
        // No defaults (VGA, floppy, CD-ROM, NIC, monitor) and no host-wide QEMU config.
        "-nodefaults".as_ref(),
        "-no-user-config".as_ref(),
        "-machine".as_ref(),
        machine.as_ref(),
        "-m".as_ref(),
        memory.as_ref(),
        "-smp".as_ref(),
        vcpus.as_ref(),
        "-display".as_ref(),
        "none".as_ref(),
        // Detached: QEMU outlives the prepare process; the parent exits once QEMU is set up
        // (non-zero, with the reason on stderr, when it could not be).
        "-daemonize".as_ref(),
        "-pidfile".as_ref(),
        paths.pidfile.as_os_str(),
        "-chardev".as_ref(),
        &console,
        "-serial".as_ref(),
        "chardev:console".as_ref(),
        "-chardev".as_ref(),
        &qmp,
        "-mon".as_ref(),
        "chardev=qmp,mode=control".as_ref(),
        "-drive".as_ref(),
        &overlay,
    ]);
    if launch.with_seed {
        let seed = option(
            "file=",
            paths.seed.as_os_str(),
            ",if=virtio,format=raw,readonly=on",
        );
        push(&["-drive".as_ref(), &seed]);
    }
    push(&[
        "-netdev".as_ref(),
        netdev.as_ref(),
        "-device".as_ref(),
        "virtio-net-pci,netdev=net0".as_ref(),
        // Guests otherwise wait seconds for entropy before sshd starts.
        "-device".as_ref(),
        "virtio-rng-pci".as_ref(),
    ]);
    if config.endpoint == EndpointKind::Unix {
        // The guest's SSH server on a virtio-serial port: every connection to the socket is
        // one session (the guest runs its SSH server in inetd mode on the port, see
        // scripts/lib/guest-image.sh); one connection at a time, later ones wait their turn.
        let chardev = option(
            "socket,id=sshport,path=",
            paths.ssh_socket.as_os_str(),
            ",server=on,wait=off",
        );
        push(&[
            "-device".as_ref(),
            "virtio-serial-pci,id=vserial0".as_ref(),
            "-chardev".as_ref(),
            &chardev,
            "-device".as_ref(),
            format!("virtserialport,bus=vserial0.0,chardev=sshport,name={SSH_PORT_NAME}").as_ref(),
        ]);
    }
    match &config.direct_boot {
        Some(boot) => {
            push(&["-kernel".as_ref(), boot.kernel.as_os_str()]);
            if let Some(initrd) = &boot.initrd {
                push(&["-initrd".as_ref(), initrd.as_os_str()]);
            }
            if let Some(cmdline) = &boot.cmdline {
                push(&["-append".as_ref(), cmdline.as_ref()]);
            }
        }
        None => push(&["-boot".as_ref(), "order=c".as_ref()]),
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QemuConfig;

    fn config(extra: &str) -> QemuConfig {
        QemuConfig::from_toml_text(
            &format!("base_image = \"/img/base.qcow2\"\nimages_dir = \"/run/hj\"\n{extra}"),
            Path::new("/var/lib/hyperjob"),
        )
        .expect("config")
    }

    fn args_of(config: &QemuConfig, with_seed: bool) -> Vec<String> {
        let paths = VmPaths::new(&config.images_dir, "hyperjob-job-7");
        qemu_args(&Launch {
            config,
            vm_name: "hyperjob-job-7",
            paths: &paths,
            with_seed,
            host_port: 40022,
        })
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
    }

    /// The value following `flag`, for flags that appear once.
    fn value_of<'a>(args: &'a [String], flag: &str) -> &'a str {
        let at = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} missing: {args:?}"));
        &args[at + 1]
    }

    fn values_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn paths_are_named_after_the_vm_in_images_dir() {
        let paths = VmPaths::new(Path::new("/run/hj"), "hyperjob-job-7");

        assert_eq!(paths.overlay, PathBuf::from("/run/hj/hyperjob-job-7.qcow2"));
        assert_eq!(paths.seed, PathBuf::from("/run/hj/hyperjob-job-7.seed.iso"));
        assert_eq!(
            paths.console_log,
            PathBuf::from("/run/hj/hyperjob-job-7.console.log")
        );
        assert_eq!(paths.pidfile, PathBuf::from("/run/hj/hyperjob-job-7.pid"));
        assert_eq!(
            paths.qmp_socket,
            PathBuf::from("/run/hj/hyperjob-job-7.qmp")
        );
        assert_eq!(
            paths.state,
            PathBuf::from("/run/hj/hyperjob-job-7.qemu.json")
        );
        assert_eq!(*paths.all().last().expect("last"), paths.state.as_path());
    }

    #[test]
    fn a_unix_endpoint_adds_the_virtio_serial_port_and_its_socket() {
        let tcp = args_of(&config("accel = \"tcg\""), false);
        let unix = args_of(&config("accel = \"tcg\"\nendpoint = \"unix\""), false);

        assert!(!tcp.iter().any(|a| a.contains("virtserialport")), "{tcp:?}");
        assert_eq!(
            values_of(&unix, "-chardev").last().copied(),
            Some("socket,id=sshport,path=/run/hj/hyperjob-job-7.ssh.sock,server=on,wait=off")
        );
        let devices = values_of(&unix, "-device");
        assert!(
            devices.contains(&"virtio-serial-pci,id=vserial0")
                && devices.contains(
                    &"virtserialport,bus=vserial0.0,chardev=sshport,name=org.hyperjob.ssh"
                ),
            "{devices:?}"
        );
    }

    #[test]
    fn machine_size_disk_console_and_monitor_are_set() {
        let args = args_of(
            &config("accel = \"tcg\"\nvcpus = 1\nmemory_mib = 512"),
            false,
        );

        assert_eq!(value_of(&args, "-name"), "guest=hyperjob-job-7");
        assert_eq!(value_of(&args, "-machine"), "accel=tcg");
        assert_eq!(value_of(&args, "-m"), "512");
        assert_eq!(value_of(&args, "-smp"), "1");
        assert_eq!(value_of(&args, "-display"), "none");
        assert!(args.contains(&"-daemonize".to_string()), "{args:?}");
        assert!(args.contains(&"-nodefaults".to_string()), "{args:?}");
        assert_eq!(value_of(&args, "-pidfile"), "/run/hj/hyperjob-job-7.pid");
        assert_eq!(
            values_of(&args, "-drive"),
            ["file=/run/hj/hyperjob-job-7.qcow2,if=virtio,format=qcow2,discard=unmap"]
        );
        assert_eq!(
            values_of(&args, "-chardev"),
            [
                "file,id=console,path=/run/hj/hyperjob-job-7.console.log",
                "socket,id=qmp,path=/run/hj/hyperjob-job-7.qmp,server=on,wait=off"
            ]
        );
        assert_eq!(value_of(&args, "-serial"), "chardev:console");
        assert_eq!(value_of(&args, "-mon"), "chardev=qmp,mode=control");
    }

    #[test]
    fn user_networking_forwards_a_loopback_port_to_the_guest_port() {
        let args = args_of(&config("guest_port = 2222"), false);

        assert_eq!(
            value_of(&args, "-netdev"),
            "user,id=net0,restrict=off,hostfwd=tcp:127.0.0.1:40022-:2222"
        );
        assert_eq!(
            values_of(&args, "-device"),
            ["virtio-net-pci,netdev=net0", "virtio-rng-pci"]
        );
    }

    #[test]
    fn restricted_network_sets_restrict_on() {
        let args = args_of(&config("restrict_network = true"), false);

        assert!(
            value_of(&args, "-netdev").starts_with("user,id=net0,restrict=on,"),
            "{args:?}"
        );
    }

    #[test]
    fn kvm_is_the_default_accelerator() {
        let args = args_of(&config(""), false);

        assert_eq!(value_of(&args, "-machine"), "accel=kvm");
        assert_eq!(value_of(&args, "-smp"), "2");
        assert_eq!(value_of(&args, "-m"), "2048");
    }

    #[test]
    fn seed_is_a_second_read_only_virtio_disk() {
        let args = args_of(&config(""), true);

        assert_eq!(
            values_of(&args, "-drive"),
            [
                "file=/run/hj/hyperjob-job-7.qcow2,if=virtio,format=qcow2,discard=unmap",
                "file=/run/hj/hyperjob-job-7.seed.iso,if=virtio,format=raw,readonly=on"
            ]
        );
    }

    #[test]
    fn direct_kernel_boot_passes_kernel_initrd_and_cmdline() {
        let args = args_of(
            &config("kernel = \"/k/vmlinuz\"\ninitrd = \"/k/initrd.img\"\ncmdline = \"root=/dev/vda rw console=ttyS0\""),
            false,
        );

        assert_eq!(value_of(&args, "-kernel"), "/k/vmlinuz");
        assert_eq!(value_of(&args, "-initrd"), "/k/initrd.img");
        assert_eq!(value_of(&args, "-append"), "root=/dev/vda rw console=ttyS0");
        assert!(!args.contains(&"-boot".to_string()), "{args:?}");
    }

    #[test]
    fn without_a_kernel_the_disk_boots() {
        let args = args_of(&config(""), false);

        assert_eq!(value_of(&args, "-boot"), "order=c");
        assert!(!args.contains(&"-kernel".to_string()), "{args:?}");
    }

    #[test]
    fn commas_in_paths_are_doubled_so_they_cannot_add_options() {
        let config = QemuConfig::from_toml_text(
            "base_image = \"/b\"\nimages_dir = \"/x,readonly=off,file=/etc/shadow\"",
            Path::new("/s"),
        )
        .expect("config");

        let args = args_of(&config, false);

        assert_eq!(
            values_of(&args, "-drive"),
            ["file=/x,,readonly=off,,file=/etc/shadow/hyperjob-job-7.qcow2,if=virtio,format=qcow2,discard=unmap"]
        );
    }

    #[test]
    fn only_config_values_paths_and_numbers_reach_the_command_line() {
        // `qemu_args` sees nothing but `Launch` (config, VM paths, a port): no environment,
        // no job variable. Every word of every value is a fixed option word, a number, or
        // part of a path that came from the config or the VM name.
        let args = args_of(&config("accel = \"tcg\""), true);

        let fixed = [
            "guest", "accel", "tcg", "none", "chardev", "console", "file", "id", "path", "socket",
            "qmp", "server", "on", "off", "wait", "mode", "control", "if", "virtio", "format",
            "qcow2", "raw", "readonly", "discard", "unmap", "user", "net0", "restrict", "hostfwd",
            "tcp", "netdev", "pci", "net", "rng", "order", "c",
        ];
        let vm_files = ["seed", "iso", "log", "pid", "hyperjob", "job"];
        for arg in args.iter().filter(|a| !a.starts_with('-')) {
            let rest = arg.replace("/run/hj/", " ");
            for word in rest.split(|c: char| !c.is_ascii_alphanumeric()) {
                assert!(
                    word.is_empty()
                        || word.chars().all(|c| c.is_ascii_digit())
                        || fixed.contains(&word)
                        || vm_files.contains(&word),
                    "unexpected word {word:?} in {arg:?}"
                );
            }
        }
    }
}
