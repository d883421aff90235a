//! The guest's network interface through libvirt: the slot's MAC chosen under a lock, the
//! nwfilter checked before anything is created, the protection checked on the running domain,
//! and the guest's address read from the network's DHCP leases (see `network.rs`).

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use hyperjob_core::plugin::Progress;
use hyperjob_core::{PluginError, VmRequest};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::network::Network;

use crate::config::LibvirtConfig;
use crate::network::{self, current_lease, FilterRef, Lease, Mac, MacPool, Nic};

/// Fails at once, before anything is created, when the configured nwfilter cannot be used.
pub fn check_nwfilter(conn: &Connect, config: &LibvirtConfig) -> Result<(), PluginError> {
    let Some(filter) = &config.nwfilter else {
        return Ok(());
    };
    conn.lookup_nwfilter_by_name(filter)
        .map(drop)
        .map_err(|err| {
            PluginError::Config(format!(
                "nwfilter {filter:?} cannot be used at {}: {} (it needs libvirt's nwfilter \
                 driver with its stock filters, Debian package libvirt-daemon-config-nwfilter, \
                 and ebtables/iptables on the host; `nwfilter = \"\"` in [backends.libvirt] \
                 runs guests without it, see README \"Network isolation\")",
                config.uri,
                err.message()
            ))
        })
}

/// The interface of `request`'s VM: its slot's MAC, isolation and nwfilter. With a MAC pool
/// the slot lock comes with it: hold it until the domain exists (then its MAC is in use).
pub fn plan<'c>(
    conn: &Connect,
    config: &'c LibvirtConfig,
    request: &VmRequest,
    progress: &dyn Progress,
    leases_before: &LeasesBefore,
) -> Result<(Nic<'c>, Option<SlotLock>), PluginError> {
    let net = conn
        .lookup_network_by_name(&config.network)
        .map_err(|err| {
            PluginError::msg(format!(
                "cannot look up libvirt network {:?}: {}",
                config.network,
                err.message()
            ))
        })?;
    let mut nic = Nic {
        isolated: config.isolate,
        filter: config.nwfilter.as_ref().map(|name| FilterRef {
            name: name.clone(),
            dhcp_server: net
                .xml_desc(0)
                .ok()
                .and_then(|xml| network::dhcp_server(&xml)),
        }),
        ..Nic::plain(&config.network)
    };
    if config.mac_pool_size == 0 {
        return Ok((nic, None));
    }
    let lock = SlotLock::acquire(&config.images_dir)?;
    let domains = conn
        .list_all_domains(0)
        .map_err(|err| PluginError::msg(format!("cannot list domains: {}", err.message())))?;
    // A domain that goes away meanwhile has no XML any more, and needs no MAC either.
    let in_use = domains
        .iter()
        .filter_map(|domain| domain.xml_desc(0).ok())
        .flat_map(|xml| network::macs_in_xml(&xml))
        .collect();
    let pool = MacPool::new(
        &conn.hostname().unwrap_or_default(),
        &request.owner,
        config.mac_pool_size,
    );
    match pool.free_slot(&in_use) {
        Some((slot, mac)) => {
            // This MAC's leases from before the VM are not the VM's address.
            let before = dhcp_leases(&net, mac).unwrap_or_default();
            leases_before.record(&request.vm_name, mac, before);
            progress.say(&format!("Network slot {slot}: MAC {mac}"));
            nic.mac = Some(mac);
        }
        None => progress.say(&format!(
            "All {} network slots (mac_pool_size) are in use: this VM gets a random MAC, and \
             its DHCP lease is not reused",
            config.mac_pool_size
        )),
    }
    Ok((nic, Some(lock)))
}

/// Checks that the running domain has the isolation and filter `nic` asked for: a libvirt that
/// does not know an element ignores it, and no VM may run unprotected unseen.
pub fn check_running(domain: &Domain, nic: &Nic<'_>, uri: &str) -> Result<(), PluginError> {
    let name = domain.name().unwrap_or_default();
    let xml = domain
        .xml_desc(0)
        .map_err(|err| PluginError::msg(format!("cannot read domain {name}: {}", err.message())))?;
    match network::missing_protection(&xml, nic) {
        None => Ok(()),
        Some(element) => Err(PluginError::msg(format!(
            "libvirt at {uri} started domain {name} without {element} on its interface \
             (`isolate` needs libvirt 6.1 or later and a bridge-based network)"
        ))),
    }
}

/// Where a VM's address comes from: its network's leases for its MAC, minus the leases that
/// MAC had before the VM started.
#[derive(Debug)]
pub struct LeaseSource {
    net: Network,
    mac: Mac,
    before: Vec<Lease>,
}

impl LeaseSource {
    /// `None` if the domain's MAC or its network cannot be read.
    pub fn of(
        conn: &Connect,
        domain: &Domain,
        network_name: &str,
        leases_before: &LeasesBefore,
    ) -> Option<Self> {
        let xml = domain.xml_desc(0).ok()?;
        let mac = *network::macs_in_xml(&xml).first()?;
        let net = conn.lookup_network_by_name(network_name).ok()?;
        let vm_name = domain.name().ok()?;
        Some(Self {
            before: leases_before.of(&vm_name, mac),
            net,
            mac,
        })
    }

    /// The VM's IPv4 address, once it has a lease. An error here just means "no lease yet".
    pub fn address(&self) -> Option<String> {
        let leases = dhcp_leases(&self.net, self.mac).ok()?;
        current_lease(&leases, &self.before).map(|lease| lease.ip.clone())
    }
}

/// The IPv4 leases of `network` for `mac` (libvirt's `virNetworkGetDHCPLeases`, which the virt
/// crate does not wrap).
pub fn dhcp_leases(network: &Network, mac: Mac) -> Result<Vec<Lease>, virt::error::Error> {
    use std::ffi::{CStr, CString};
    use virt::sys;

    let mac = CString::new(mac.to_string()).expect("a MAC has no NUL");
    let mut array: *mut sys::virNetworkDHCPLeasePtr = std::ptr::null_mut();
    // SAFETY: `network` is a live network object (the wrapper holds its reference); `mac` is a
    // NUL-terminated string that outlives the call; libvirt allocates `array` and its leases.
    #[allow(unsafe_code)]
    let count =
        unsafe { sys::virNetworkGetDHCPLeases(network.as_ptr(), mac.as_ptr(), &mut array, 0) };
    if count < 0 {
        return Err(virt::error::Error::last_error());
    }
    let mut leases = Vec::new();
    for i in 0..usize::try_from(count).unwrap_or(0) {
        // SAFETY: libvirt returned `count` valid lease pointers in `array`; each is read once,
        // its strings are copied, and it is freed with libvirt's own function; then the array
        // itself is freed (as libvirt's documentation says) below.
        #[allow(unsafe_code)]
        unsafe {
            let lease = *array.add(i);
            let entry = &*lease;
            if entry.type_ == sys::VIR_IP_ADDR_TYPE_IPV4 as i32 && !entry.ipaddr.is_null() {
                leases.push(Lease {
                    ip: CStr::from_ptr(entry.ipaddr).to_string_lossy().into_owned(),
                    expiry: entry.expirytime,
                });
            }
            sys::virNetworkDHCPLeaseFree(lease);
        }
    }
    if !array.is_null() {
        // SAFETY: the array was allocated by libvirt with malloc and its leases are freed.
        #[allow(unsafe_code)]
        unsafe {
            libc::free(array.cast());
        }
    }
    Ok(leases)
}

/// Serialises slot choice between the prepares of one host: an exclusive `flock` on
/// `images_dir` itself (no file to create or leave behind), held until dropped.
#[derive(Debug)]
pub struct SlotLock {
    _dir: File,
}

impl SlotLock {
    pub fn acquire(images_dir: &Path) -> Result<Self, PluginError> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(images_dir)
            .map_err(|err| {
                PluginError::system(format!("cannot open {}", images_dir.display()), err)
            })?;
        dir.lock().map_err(|err| {
            PluginError::system(format!("cannot lock {}", images_dir.display()), err)
        })?;
        Ok(Self { _dir: dir })
    }
}

/// The leases each VM's MAC had before the VM started, for [`current_lease`]. Kept in memory
/// from `create` to `wait_address` (one prepare, one process).
#[derive(Debug, Default)]
pub struct LeasesBefore(Mutex<HashMap<String, (Mac, Vec<Lease>)>>);

impl LeasesBefore {
    pub fn record(&self, vm_name: &str, mac: Mac, leases: Vec<Lease>) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(vm_name.to_string(), (mac, leases));
        }
    }

    /// The leases recorded for `vm_name`'s `mac` (none if that VM was not created here).
    pub fn of(&self, vm_name: &str, mac: Mac) -> Vec<Lease> {
        self.0
            .lock()
            .ok()
            .and_then(|map| map.get(vm_name).cloned())
            .filter(|(recorded, _)| *recorded == mac)
            .map(|(_, leases)| leases)
            .unwrap_or_default()
    }

    pub fn forget(&self, vm_name: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(vm_name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(ip: &str, expiry: i64) -> Lease {
        Lease {
            ip: ip.into(),
            expiry,
        }
    }

    #[test]
    fn recorded_leases_belong_to_one_vm_and_mac() {
        let record = LeasesBefore::default();
        let mac = Mac([2, 0, 0, 0, 0, 1]);
        record.record("vm-1", mac, vec![lease("10.0.0.5", 3000)]);

        assert_eq!(record.of("vm-1", mac), vec![lease("10.0.0.5", 3000)]);
        assert_eq!(record.of("vm-1", Mac([2, 0, 0, 0, 0, 2])), vec![]);
        assert_eq!(record.of("vm-2", mac), vec![]);
        record.forget("vm-1");
        assert_eq!(record.of("vm-1", mac), vec![]);
    }

    #[test]
    fn the_slot_lock_excludes_a_second_holder_until_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lock = SlotLock::acquire(dir.path()).expect("first");
        let other = File::open(dir.path()).expect("open dir");

        assert!(matches!(
            other.try_lock(),
            Err(std::fs::TryLockError::WouldBlock)
        ));
        drop(lock);
        other.try_lock().expect("free after drop");
        assert!(
            std::fs::read_dir(dir.path())
                .expect("list")
                .next()
                .is_none(),
            "no file made"
        );
    }
}
