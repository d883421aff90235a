//! The libvirt backend's part of `hyperjob doctor`: libvirtd, the network, the nwfilter, the
//! images and directories QEMU must read, `/dev/kvm`, free space and the DHCP lease capacity.

use std::path::{Path, PathBuf};
use std::process::Command;

use hyperjob_core::Check;
use virt::connect::Connect;

use crate::config::{DomainType, LibvirtConfig};
use crate::network::attribute;

/// Below this much free space in `images_dir`, overlays of busy jobs may fill the disk.
const MIN_FREE_BYTES: u64 = 2 << 30;
/// dnsmasq's lease time when the network sets none.
const DEFAULT_LEASE_MINUTES: u64 = 60;

/// Every check, in the order an operator fixes things.
pub fn checks(config: &LibvirtConfig) -> Vec<Check> {
    let mut checks = Vec::new();
    match Connect::open(Some(&config.uri)) {
        Ok(conn) => {
            let version = conn
                .lib_version()
                .map(|v| format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000))
                .unwrap_or_else(|_| "?".into());
            checks.push(Check::pass(format!(
                "libvirt at {}: reachable (libvirt {version})",
                config.uri
            )));
            checks.push(network_check(&conn, config));
            if let Some(filter) = &config.nwfilter {
                checks.push(match crate::nic::check_nwfilter(&conn, config) {
                    Ok(()) => Check::pass(format!("nwfilter {filter:?}: defined")),
                    Err(err) => Check::fail(format!("nwfilter {filter:?}"), err.to_string()),
                });
            }
        }
        Err(err) => checks.push(Check::fail(
            format!("libvirt at {}", config.uri),
            format!(
                "cannot connect: {} (is libvirtd running? is this user allowed to use it, e.g. \
                 in group libvirt?)",
                err.message()
            ),
        )),
    }
    let qemu = QemuUser::of(&config.uri);
    checks.push(image_check("base_image", &config.base_image, &qemu));
    if let Some(boot) = &config.direct_boot {
        checks.push(readable_check("kernel", &boot.kernel, &qemu));
        if let Some(initrd) = &boot.initrd {
            checks.push(readable_check("initrd", initrd, &qemu));
        }
    }
    checks.push(images_dir_check(&config.images_dir, &qemu));
    checks.push(kvm_check(config.domain_type));
    checks
}

fn network_check(conn: &Connect, config: &LibvirtConfig) -> Check {
    let what = format!("network {:?}", config.network);
    let network = match conn.lookup_network_by_name(&config.network) {
        Ok(network) => network,
        Err(err) => {
            return Check::fail(
                what,
                format!(
                    "{} (define it, or set `network` in [backends.libvirt])",
                    err.message()
                ),
            )
        }
    };
    if !network.is_active().unwrap_or(false) {
        return Check::fail(
            what,
            format!(
                "is not active (virsh net-start {0}; virsh net-autostart {0})",
                config.network
            ),
        );
    }
    let xml = network.xml_desc(0).unwrap_or_default();
    let Some((addresses, lease_minutes)) = dhcp_capacity(&xml) else {
        return Check::fail(
            what,
            "serves no DHCP: guests get no address (add <dhcp><range …/></dhcp> to its <ip>)",
        );
    };
    let random_per_hour = addresses * 60 / lease_minutes.max(1);
    let leases = if config.mac_pool_size > 0 {
        format!(
            "job-slot MACs reuse their leases (≤ {} leases); a guest whose DHCP client uses a \
             DUID still takes one per job: ~{random_per_hour} jobs/h",
            config.mac_pool_size
        )
    } else {
        format!("random MACs: ~{random_per_hour} jobs/h before the range runs out")
    };
    Check::pass(format!(
        "{what}: active, DHCP with {addresses} addresses, {lease_minutes} min leases; {leases}"
    ))
}

/// The size of the network's first IPv4 DHCP range and its lease time in minutes.
pub fn dhcp_capacity(network_xml: &str) -> Option<(u64, u64)> {
    let range_at = network_xml.find("<range ")?;
    let rest = &network_xml[range_at..];
    let tag = &rest[..rest.find('>')?];
    let start: std::net::Ipv4Addr = attribute(tag, "start")?.parse().ok()?;
    let end: std::net::Ipv4Addr = attribute(tag, "end")?.parse().ok()?;
    let addresses = u64::from(u32::from(end)).checked_sub(u64::from(u32::from(start)))? + 1;
    let range_body = &rest[..rest.find("</range>").unwrap_or(tag.len())];
    let minutes = range_body
        .find("<lease ")
        .and_then(|at| {
            let lease = &range_body[at..];
            let lease = &lease[..lease.find('>')?];
            let expiry: u64 = attribute(lease, "expiry")?.parse().ok()?;
            Some(match attribute(lease, "unit").unwrap_or("minutes") {
                "seconds" => expiry.div_ceil(60),
                "hours" => expiry * 60,
                _ => expiry,
            })
        })
        .unwrap_or(DEFAULT_LEASE_MINUTES);
    Some((addresses, minutes))
}

/// The user QEMU runs as, for the permission checks.
#[derive(Debug, Clone)]
struct QemuUser {
    name: String,
    uid: u32,
    gids: Vec<u32>,
}

impl QemuUser {
    /// `qemu:///system`: the `user` of /etc/libvirt/qemu.conf, else Debian's libvirt-qemu;
    /// a session URI: this user.
    fn of(uri: &str) -> Option<Self> {
        let name = if uri.contains("/session") {
            users::name_of(effective_uid())?
        } else {
            std::fs::read_to_string("/etc/libvirt/qemu.conf")
                .ok()
                .and_then(|text| configured_user(&text))
                .unwrap_or_else(|| "libvirt-qemu".to_string())
        };
        let (uid, gids) = users::ids_of(&name)?;
        Some(Self { name, uid, gids })
    }

    /// Whether this user may do `need` (bits 4 read, 2 write, 1 search) on `path`.
    fn may(&self, path: &Path, need: u32) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        if self.uid == 0 {
            return true;
        }
        let mode = meta.mode();
        let bits = if meta.uid() == self.uid {
            mode >> 6
        } else if self.gids.contains(&meta.gid()) {
            mode >> 3
        } else {
            mode
        };
        bits & need == need
    }

    /// The first directory above `path` this user cannot search.
    fn blocked_above(&self, path: &Path) -> Option<PathBuf> {
        path.ancestors()
            .skip(1)
            .filter(|dir| !dir.as_os_str().is_empty())
            .find(|dir| !self.may(dir, 1))
            .map(Path::to_path_buf)
    }
}

/// `user = "…"` from qemu.conf (the line is commented out by default).
fn configured_user(qemu_conf: &str) -> Option<String> {
    qemu_conf.lines().find_map(|line| {
        let value = line.trim().strip_prefix("user")?.trim().strip_prefix('=')?;
        let value = value.trim().trim_matches('"');
        (!value.is_empty() && !value.starts_with('+')).then(|| value.to_string())
    })
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid()
    }
}

/// Users and groups by name, through the C library (so NSS sources count).
mod users {
    use std::ffi::{CStr, CString};

    pub fn name_of(uid: u32) -> Option<String> {
        // SAFETY: getpwuid returns NULL or a pointer to static storage read at once.
        #[allow(unsafe_code)]
        unsafe {
            let entry = libc::getpwuid(uid);
            if entry.is_null() {
                return None;
            }
            Some(
                CStr::from_ptr((*entry).pw_name)
                    .to_string_lossy()
                    .into_owned(),
            )
        }
    }

    pub fn ids_of(name: &str) -> Option<(u32, Vec<u32>)> {
        let c_name = CString::new(name).ok()?;
        // SAFETY: getpwnam returns NULL or static storage, read before any other call;
        // getgrouplist writes at most `count` entries into `groups`.
        #[allow(unsafe_code)]
        unsafe {
            let entry = libc::getpwnam(c_name.as_ptr());
            if entry.is_null() {
                return None;
            }
            let (uid, gid) = ((*entry).pw_uid, (*entry).pw_gid);
            let mut groups = vec![0 as libc::gid_t; 64];
            let mut count = groups.len() as libc::c_int;
            if libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) < 0 {
                return Some((uid, vec![gid]));
            }
            groups.truncate(count.max(0) as usize);
            Some((uid, groups))
        }
    }
}

fn readable_check(what: &str, path: &Path, qemu: &Option<QemuUser>) -> Check {
    let what = format!("{what} {}", path.display());
    if !path.is_file() {
        return Check::fail(what, "does not exist or is not a file");
    }
    let Some(qemu) = qemu else {
        return Check::pass(format!("{what}: exists (QEMU's user unknown: not checked)"));
    };
    if let Some(dir) = qemu.blocked_above(path) {
        return Check::fail(
            what,
            format!(
                "QEMU runs as {} and cannot search {} (chmod o+x, or give that user access)",
                qemu.name,
                dir.display()
            ),
        );
    }
    if !qemu.may(path, 4) {
        return Check::fail(
            what,
            format!("QEMU runs as {} and cannot read it (chmod o+r)", qemu.name),
        );
    }
    Check::pass(format!("{what}: readable by {}", qemu.name))
}

/// Readable, and a qcow2 or raw image whose whole backing chain exists.
fn image_check(what: &str, path: &Path, qemu: &Option<QemuUser>) -> Check {
    let readable = readable_check(what, path, qemu);
    if !readable.ok {
        return readable;
    }
    let output = Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "--backing-chain"])
        .arg(path)
        .output();
    let what = format!("{what} {}", path.display());
    let chain: Vec<serde_json::Value> = match output {
        Ok(out) if out.status.success() => serde_json::from_slice(&out.stdout).unwrap_or_default(),
        Ok(out) => {
            return Check::fail(
                what,
                format!(
                    "qemu-img cannot read it: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            )
        }
        Err(err) => return Check::fail(what, format!("cannot run qemu-img: {err}")),
    };
    let formats: Vec<&str> = chain
        .iter()
        .filter_map(|image| image["format"].as_str())
        .collect();
    match formats.first() {
        Some(&("qcow2" | "raw")) => Check::pass(format!(
            "{}; format {}, backing chain of {} image(s), all present",
            readable.what,
            formats[0],
            chain.len()
        )),
        Some(other) => Check::fail(
            what,
            format!(
                "is {other}; hyperjob overlays qcow2 or raw images (qemu-img convert -O qcow2)"
            ),
        ),
        None => Check::fail(what, "qemu-img reported no format"),
    }
}

fn images_dir_check(dir: &Path, qemu: &Option<QemuUser>) -> Check {
    let what = format!("images_dir {}", dir.display());
    if !dir.is_dir() {
        return Check::fail(what, "does not exist (create it)");
    }
    let writable = {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::CString::new(dir.as_os_str().as_bytes()).is_ok_and(|c| {
            // SAFETY: access(2) reads the NUL-terminated path only.
            #[allow(unsafe_code)]
            unsafe {
                libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0
            }
        })
    };
    if !writable {
        return Check::fail(
            what,
            "is not writable for this user (overlays are created there)",
        );
    }
    if let Some(qemu) = qemu {
        if let Some(blocked) = std::iter::once(dir)
            .chain(dir.ancestors().skip(1))
            .find(|d| !d.as_os_str().is_empty() && !qemu.may(d, 1))
        {
            return Check::fail(
                what,
                format!(
                    "QEMU runs as {} and cannot search {} (chmod o+x)",
                    qemu.name,
                    blocked.display()
                ),
            );
        }
    }
    let free = free_bytes(dir);
    match free {
        Some(free) if free < MIN_FREE_BYTES => Check::fail(
            what,
            format!(
                "only {} MiB free; job overlays grow with what jobs write (free some space)",
                free >> 20
            ),
        ),
        Some(free) => Check::pass(format!("{what}: writable, {} GiB free", free >> 30)),
        None => Check::pass(format!("{what}: writable")),
    }
}

fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe_zeroed();
    // SAFETY: statvfs writes into the struct we own and reads the NUL-terminated path.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail.saturating_mul(stat.f_frsize))
}

fn unsafe_zeroed() -> libc::statvfs {
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    #[allow(unsafe_code)]
    unsafe {
        std::mem::zeroed()
    }
}

fn kvm_check(domain_type: DomainType) -> Check {
    match domain_type {
        DomainType::Qemu => {
            Check::pass("domain_type \"qemu\" (software emulation): /dev/kvm is not needed")
        }
        DomainType::Kvm => match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            Ok(_) => Check::pass("/dev/kvm: usable for domain_type \"kvm\""),
            Err(err) => Check::fail(
                "/dev/kvm",
                format!(
                    "cannot open it: {err} (is virtualisation enabled and the kvm module loaded? \
                     or set domain_type = \"qemu\" for software emulation)"
                ),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dhcp_capacity_reads_the_range_and_the_lease_time() {
        let stock = "<network><ip address='192.168.122.1' netmask='255.255.255.0'><dhcp>\
                     <range start='192.168.122.2' end='192.168.122.254'/></dhcp></ip></network>";
        let short = "<network><ip address='10.0.0.1'><dhcp><range start='10.0.0.10' \
                     end='10.0.0.19'><lease expiry='2' unit='hours'/></range></dhcp></ip></network>";

        assert_eq!(dhcp_capacity(stock), Some((253, 60)));
        assert_eq!(dhcp_capacity(short), Some((10, 120)));
        assert_eq!(
            dhcp_capacity("<network><ip address='10.0.0.1'/></network>"),
            None
        );
    }

    #[test]
    fn the_qemu_user_comes_from_qemu_conf_when_set() {
        assert_eq!(configured_user("#user = \"root\"\n"), None);
        assert_eq!(
            configured_user("user = \"qemu\"\ngroup = \"kvm\"\n").as_deref(),
            Some("qemu")
        );
    }

    #[test]
    fn a_directory_closed_to_others_blocks_a_user_below_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let closed = dir.path().join("closed");
        std::fs::create_dir(&closed).expect("mkdir");
        std::fs::write(closed.join("image"), "x").expect("write");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let nobody = QemuUser {
            name: "nobody".into(),
            uid: 65534,
            gids: vec![65534],
        };

        assert_eq!(
            nobody.blocked_above(&closed.join("image")),
            Some(closed.clone())
        );
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).expect("chmod");
        assert_eq!(nobody.blocked_above(&closed.join("image")), None);
    }
}
