//! The guest's network interface: what it is made of (pure functions; `nic.rs` applies them
//! through libvirt).
//!
//! - **A MAC per job slot.** libvirt's dnsmasq keeps a lease for an hour after the VM is gone,
//!   so a new random MAC per job uses up a /24 network at ~250 jobs an hour. Instead every VM
//!   gets the MAC of the lowest free slot of a pool (`mac_pool_size`): the same few MACs come
//!   back job after job, and a DHCP client that identifies itself by its MAC (busybox udhcpc,
//!   dhclient, NetworkManager; systemd-networkd with `ClientIdentifier=mac`) gets its old lease
//!   back. Slot MACs are locally administered (`02:…`) and derived from the libvirt host's name
//!   and the installation (`VmRequest::owner`), so two installations never share one. The slot
//!   is chosen under a lock on `images_dir` held until the domain exists.
//! - **Isolation.** `<port isolated='yes'/>`: guests on the same bridge cannot exchange frames.
//! - **Anti-spoofing.** An nwfilter (`clean-traffic`): the guest can use only its own MAC and
//!   the IPv4 address the network's DHCP server gave it, so it cannot take over another VM's
//!   address and receive what hyperjob sends to that VM.

use std::collections::HashSet;
use std::fmt;
use std::fmt::Write as _;

use crate::xml::escape;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Mac {
    /// Parses `aa:bb:cc:dd:ee:ff` (either case).
    pub fn parse(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 6];
        let mut parts = text.trim().split(':');
        for byte in &mut bytes {
            let part = parts.next()?;
            if part.len() != 2 {
                return None;
            }
            *byte = u8::from_str_radix(part, 16).ok()?;
        }
        parts.next().is_none().then_some(Self(bytes))
    }
}

/// The MACs of one installation: `02:h0:h1:h2:s1:s0`, with `h` a hash of the libvirt host's
/// name and the installation and `s` the slot number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacPool {
    prefix: [u8; 4],
    size: u32,
}

impl MacPool {
    /// The pool of the installation `owner` on the libvirt host `host`, `size` slots.
    pub fn new(host: &str, owner: &str, size: u32) -> Self {
        let hash = fnv1a64(&["hyperjob-mac-v1", host, owner]).to_be_bytes();
        // 0x02: locally administered (never a vendor's), unicast.
        Self {
            prefix: [0x02, hash[0], hash[1], hash[2]],
            size: size.min(1 << 16),
        }
    }

    /// The MAC of `slot` (`slot < size`).
    pub fn mac(&self, slot: u32) -> Mac {
        let [a, b, c, d] = self.prefix;
        let [.., hi, lo] = slot.to_be_bytes();
        Mac([a, b, c, d, hi, lo])
    }

    /// The lowest slot whose MAC no domain uses, with that MAC.
    pub fn free_slot(&self, in_use: &HashSet<Mac>) -> Option<(u32, Mac)> {
        (0..self.size)
            .map(|slot| (slot, self.mac(slot)))
            .find(|(_, mac)| !in_use.contains(mac))
    }
}

/// 64-bit FNV-1a over the parts, each followed by a NUL: stable across builds and platforms.
fn fnv1a64(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &byte in part.as_bytes().iter().chain(std::iter::once(&0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// Every `<mac address='…'/>` in a domain's XML.
pub fn macs_in_xml(xml: &str) -> Vec<Mac> {
    let mut macs = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find("<mac ") {
        rest = &rest[at + 5..];
        let tag = &rest[..rest.find('>').unwrap_or(rest.len())];
        if let Some(mac) = attribute(tag, "address").and_then(Mac::parse) {
            macs.push(mac);
        }
    }
    macs
}

/// The value of `name='…'` or `name="…"` in the text of one tag (after its element name).
pub(crate) fn attribute<'t>(tag: &'t str, name: &str) -> Option<&'t str> {
    let mut from = 0;
    while let Some(found) = tag[from..].find(name) {
        let at = from + found;
        from = at + name.len();
        let starts_word = tag[..at]
            .chars()
            .next_back()
            .is_none_or(char::is_whitespace);
        let Some(value) = tag[from..].trim_start().strip_prefix('=') else {
            continue;
        };
        if !starts_word {
            continue;
        }
        let value = value.trim_start();
        let quote = value.chars().next().filter(|q| matches!(q, '\'' | '"'))?;
        let value = &value[1..];
        return value.find(quote).map(|end| &value[..end]);
    }
    None
}

/// The IPv4 address of the libvirt network itself (the host's side of the bridge) if that
/// address serves DHCP: the trusted DHCP server of the nwfilter.
pub fn dhcp_server(network_xml: &str) -> Option<String> {
    let mut rest = network_xml;
    while let Some(at) = rest.find("<ip ") {
        rest = &rest[at + 4..];
        let tag_end = rest.find('>')?;
        let tag = &rest[..tag_end];
        let body = if tag.ends_with('/') {
            ""
        } else {
            &rest[tag_end..rest.find("</ip>").unwrap_or(rest.len())]
        };
        let ipv4 = attribute(tag, "family").is_none_or(|f| f == "ipv4");
        if let (true, Some(address)) = (ipv4, attribute(tag, "address")) {
            if body.contains("<dhcp") && address.parse::<std::net::Ipv4Addr>().is_ok() {
                return Some(address.to_string());
            }
        }
    }
    None
}

/// The nwfilter bound to the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterRef {
    pub name: String,
    /// The network's DHCP server: the only one whose answers set the guest's address.
    pub dhcp_server: Option<String>,
}

/// Everything the `<interface>` element is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic<'a> {
    pub network: &'a str,
    /// `None`: libvirt picks a random MAC.
    pub mac: Option<Mac>,
    pub isolated: bool,
    pub filter: Option<FilterRef>,
}

impl<'a> Nic<'a> {
    /// A plain interface on `network`: random MAC, no isolation, no filter.
    pub fn plain(network: &'a str) -> Self {
        Self {
            network,
            mac: None,
            isolated: false,
            filter: None,
        }
    }
}

/// Renders the `<interface>` element (indented for `<devices>`). Every value is escaped.
pub fn interface_xml(nic: &Nic<'_>) -> String {
    let mut xml = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(xml, "    <interface type='network'>");
    if let Some(mac) = nic.mac {
        let _ = writeln!(xml, "      <mac address='{mac}'/>");
    }
    let _ = writeln!(xml, "      <source network='{}'/>", escape(nic.network));
    let _ = writeln!(xml, "      <model type='virtio'/>");
    if nic.isolated {
        let _ = writeln!(xml, "      <port isolated='yes'/>");
    }
    if let Some(filter) = &nic.filter {
        let _ = writeln!(xml, "      <filterref filter='{}'>", escape(&filter.name));
        // The address is learnt from the DHCP server's answer only, never from what the guest
        // sends (which a job could choose).
        let _ = writeln!(
            xml,
            "        <parameter name='CTRL_IP_LEARNING' value='dhcp'/>"
        );
        if let Some(server) = &filter.dhcp_server {
            let _ = writeln!(
                xml,
                "        <parameter name='DHCPSERVER' value='{}'/>",
                escape(server)
            );
        }
        let _ = writeln!(xml, "      </filterref>");
    }
    let _ = writeln!(xml, "    </interface>");
    xml
}

/// What libvirt left out of the running domain's interface that `nic` asked for (an old
/// libvirt ignores elements it does not know), or `None` when everything is there.
pub fn missing_protection(live_xml: &str, nic: &Nic<'_>) -> Option<&'static str> {
    let start = live_xml.find("<interface")?;
    let end = live_xml[start..]
        .find("</interface>")
        .map_or(live_xml.len(), |e| start + e);
    let interface = &live_xml[start..end];
    if nic.isolated
        && !(interface.contains("<port isolated='yes'/>")
            || interface.contains("<port isolated=\"yes\"/>"))
    {
        return Some("<port isolated='yes'/>");
    }
    if nic.filter.is_some() && !interface.contains("<filterref") {
        return Some("<filterref>");
    }
    None
}

/// One IPv4 DHCP lease of the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: String,
    /// Unix time the lease expires; a renewal moves it.
    pub expiry: i64,
}

/// The lease the VM holds now: the newest lease for its MAC that is not one of `before` (the
/// leases its MAC had before the VM started). A slot's MAC can still have the lease of an earlier
/// job: the same address for a guest that identifies by MAC (dnsmasq renews it, which moves the
/// expiry), or another address for one that identifies by a DUID, which is no longer anyone's.
pub fn current_lease<'l>(leases: &'l [Lease], before: &[Lease]) -> Option<&'l Lease> {
    leases
        .iter()
        .filter(|lease| !before.contains(lease))
        .max_by_key(|lease| lease.expiry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_macs_are_locally_administered_unicast_and_numbered() {
        let pool = MacPool::new("host-a", "/var/lib/hyperjob", 64);

        for slot in [0, 1, 63, 300] {
            let mac = pool.mac(slot);
            assert_eq!(mac.0[0], 0x02, "{mac}");
            assert_eq!(u32::from(u16::from_be_bytes([mac.0[4], mac.0[5]])), slot);
            assert_eq!(mac.0[..4], pool.mac(0).0[..4]);
        }
    }

    #[test]
    fn slot_macs_are_stable_across_runs() {
        // The same installation must get the same MACs from every build of hyperjob, or its
        // leases would not be reused after an upgrade: the derivation is pinned here.
        let pool = MacPool::new("ci-host-1", "/var/lib/hyperjob", 64);

        assert_eq!(
            pool.mac(0),
            MacPool::new("ci-host-1", "/var/lib/hyperjob", 8).mac(0)
        );
        assert_eq!(pool.mac(0).to_string(), PINNED_SLOT0);
        assert_eq!(
            pool.mac(1).to_string(),
            PINNED_SLOT0.replace(":00:00", ":00:01")
        );
    }

    /// `MacPool::new("ci-host-1", "/var/lib/hyperjob", _).mac(0)`.
    const PINNED_SLOT0: &str = "02:b0:eb:5f:00:00";

    #[test]
    fn installations_and_hosts_get_different_macs() {
        let a = MacPool::new("host-a", "/var/lib/hyperjob", 64);
        let b = MacPool::new("host-a", "/srv/other-runner/state", 64);
        let c = MacPool::new("host-b", "/var/lib/hyperjob", 64);

        assert_ne!(a.mac(0), b.mac(0));
        assert_ne!(a.mac(0), c.mac(0));
        assert_ne!(b.mac(0), c.mac(0));
        // Field boundaries count: ("ab", "c") is not ("a", "bc").
        assert_ne!(
            MacPool::new("ab", "c", 1).mac(0),
            MacPool::new("a", "bc", 1).mac(0)
        );
    }

    #[test]
    fn the_lowest_free_slot_is_taken() {
        let pool = MacPool::new("h", "/o", 4);
        let mut in_use: HashSet<Mac> = [pool.mac(0), pool.mac(2)].into();

        assert_eq!(pool.free_slot(&in_use), Some((1, pool.mac(1))));
        in_use.insert(pool.mac(1));
        assert_eq!(pool.free_slot(&in_use), Some((3, pool.mac(3))));
        in_use.insert(pool.mac(3));
        assert_eq!(pool.free_slot(&in_use), None, "all four slots in use");
        in_use.remove(&pool.mac(0));
        assert_eq!(pool.free_slot(&in_use), Some((0, pool.mac(0))));
    }

    #[test]
    fn an_empty_pool_has_no_slot() {
        assert_eq!(MacPool::new("h", "/o", 0).free_slot(&HashSet::new()), None);
    }

    #[test]
    fn macs_parse_and_print() {
        let mac = Mac::parse("52:54:00:AB:cd:0f").expect("valid");

        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:01",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert_eq!(Mac::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn macs_are_read_from_domain_xml() {
        let xml = "<domain><devices><interface type='network'>\n<mac address='52:54:00:11:22:33'/>\n</interface><interface type=\"bridge\"><mac address=\"02:AA:bb:cc:dd:ee\" /></interface><macsomething address='x'/></devices></domain>";

        assert_eq!(
            macs_in_xml(xml),
            vec![
                Mac([0x52, 0x54, 0, 0x11, 0x22, 0x33]),
                Mac([2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee])
            ]
        );
    }

    #[test]
    fn the_dhcp_server_is_the_networks_ipv4_address_with_dhcp() {
        let default = "<network>\n  <name>default</name>\n  <forward mode='nat'/>\n  <ip family='ipv6' address='fd00::1' prefix='64'>\n    <dhcp/>\n  </ip>\n  <ip address='10.0.0.1' netmask='255.255.255.0'/>\n  <ip address='192.168.122.1' netmask='255.255.255.0'>\n    <dhcp>\n      <range start='192.168.122.2' end='192.168.122.254'/>\n    </dhcp>\n  </ip>\n</network>";

        assert_eq!(dhcp_server(default).as_deref(), Some("192.168.122.1"));
        assert_eq!(
            dhcp_server("<network><ip address='10.1.1.1' prefix='24'></ip></network>"),
            None
        );
    }

    #[test]
    fn an_isolated_filtered_interface_has_its_mac_port_and_filter() {
        let nic = Nic {
            network: "default",
            mac: Some(Mac([2, 1, 2, 3, 0, 5])),
            isolated: true,
            filter: Some(FilterRef {
                name: "clean-traffic".into(),
                dhcp_server: Some("192.168.122.1".into()),
            }),
        };

        let xml = interface_xml(&nic);

        assert_eq!(
            xml,
            "    <interface type='network'>\n      <mac address='02:01:02:03:00:05'/>\n      <source network='default'/>\n      <model type='virtio'/>\n      <port isolated='yes'/>\n      <filterref filter='clean-traffic'>\n        <parameter name='CTRL_IP_LEARNING' value='dhcp'/>\n        <parameter name='DHCPSERVER' value='192.168.122.1'/>\n      </filterref>\n    </interface>\n"
        );
    }

    #[test]
    fn a_plain_interface_leaves_the_mac_to_libvirt() {
        let xml = interface_xml(&Nic::plain("net'/><evil/>"));

        assert!(!xml.contains("<mac"));
        assert!(!xml.contains("<port"));
        assert!(!xml.contains("<filterref"));
        assert!(xml.contains("<source network='net&apos;/&gt;&lt;evil/&gt;'/>"));
    }

    #[test]
    fn protection_libvirt_dropped_is_named() {
        let nic = Nic {
            isolated: true,
            filter: Some(FilterRef {
                name: "clean-traffic".into(),
                dhcp_server: None,
            }),
            ..Nic::plain("default")
        };
        let live = "<domain><devices><interface type='network'><mac address='02:00:00:00:00:00'/><port isolated='yes'/><filterref filter='clean-traffic'/></interface></devices></domain>";

        assert_eq!(missing_protection(live, &nic), None);
        assert_eq!(
            missing_protection(&live.replace("<port isolated='yes'/>", ""), &nic),
            Some("<port isolated='yes'/>")
        );
        assert_eq!(
            missing_protection(
                &live.replace("<filterref filter='clean-traffic'/>", ""),
                &nic
            ),
            Some("<filterref>")
        );
        assert_eq!(
            missing_protection(
                "<domain><devices><interface type='network'/></devices></domain>",
                &Nic::plain("default")
            ),
            None
        );
    }

    fn lease(ip: &str, expiry: i64) -> Lease {
        Lease {
            ip: ip.into(),
            expiry,
        }
    }

    #[test]
    fn an_earlier_jobs_lease_is_not_taken_for_the_vms() {
        let before = vec![lease("192.168.122.10", 1000)];

        // Nothing new yet: the old lease is not the VM's address.
        assert_eq!(current_lease(&before, &before), None);
        // Same client id: dnsmasq renewed the same address, the expiry moved.
        let renewed = vec![lease("192.168.122.10", 4000)];
        assert_eq!(current_lease(&renewed, &before), Some(&renewed[0]));
        // A DUID guest: a second lease for the same MAC; the old one stays until it expires.
        let both = vec![lease("192.168.122.10", 1000), lease("192.168.122.11", 4000)];
        assert_eq!(
            current_lease(&both, &before).map(|l| l.ip.as_str()),
            Some("192.168.122.11")
        );
    }

    #[test]
    fn without_a_record_the_newest_lease_counts() {
        let leases = vec![
            lease("10.0.0.5", 3000),
            lease("10.0.0.6", 5000),
            lease("10.0.0.7", 4000),
        ];

        assert_eq!(
            current_lease(&leases, &[]).map(|l| l.ip.as_str()),
            Some("10.0.0.6")
        );
        assert_eq!(current_lease(&[], &[]), None);
    }
}
