//! Where a guest is reached: an [`Endpoint`] is an [`Address`] of some [`EndpointKind`] (TCP,
//! a UNIX socket, vsock) plus the job's credentials.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A way into a guest, without its address: what a backend declares it hands out
/// ([`Backend::endpoint_kinds`]) and a transport declares it can reach
/// ([`Transport::endpoint_kinds`]). `hyperjob config` refuses a pair that shares none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    /// A TCP host and port ([`Address::Tcp`]).
    Tcp,
    /// A UNIX stream socket on the host ([`Address::Unix`]).
    Unix,
    /// An AF_VSOCK context id and port ([`Address::Vsock`]).
    Vsock,
}

impl EndpointKind {
    /// Every kind, in the order they are shown.
    pub const ALL: [EndpointKind; 3] = [EndpointKind::Tcp, EndpointKind::Unix, EndpointKind::Vsock];

    /// The kind's name as configs, the executable protocol and messages spell it: `tcp`,
    /// `unix`, `vsock`.
    pub const fn name(self) -> &'static str {
        match self {
            EndpointKind::Tcp => "tcp",
            EndpointKind::Unix => "unix",
            EndpointKind::Vsock => "vsock",
        }
    }

    /// The kind of that name ([`EndpointKind::name`]), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// A list of kinds as messages show it: `tcp, unix` (`none` for an empty list).
    pub fn list(kinds: &[EndpointKind]) -> String {
        if kinds.is_empty() {
            return "none".to_string();
        }
        kinds
            .iter()
            .map(|kind| kind.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for EndpointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a guest is reached: the one part of an [`Endpoint`] that differs by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP address: the guest's own (`192.168.122.5`, port `None`: the transport's default)
    /// or a port the backend forwards to the guest (`127.0.0.1`, port `Some(40022)`).
    Tcp {
        /// An IP address or a host name.
        host: String,
        /// The port, if not the transport's default (SSH: `port` of its table, 22).
        port: Option<u16>,
    },
    /// A UNIX stream socket on the host; every connection to it is a fresh byte stream to the
    /// guest's service (for SSH: the server speaks first, as over TCP). The QEMU plugin's
    /// `endpoint = "unix"` is a virtio-serial port bridged in the guest to its SSH daemon.
    Unix {
        /// The socket's absolute path.
        path: std::path::PathBuf,
    },
    /// An AF_VSOCK address (a guest's context id; `port` is the vsock port, not a TCP one).
    Vsock {
        /// The guest's context id (3 and up).
        cid: u32,
        /// The vsock port the guest's service listens on.
        port: u32,
    },
}

impl Address {
    /// Which kind of address this is.
    pub fn kind(&self) -> EndpointKind {
        match self {
            Address::Tcp { .. } => EndpointKind::Tcp,
            Address::Unix { .. } => EndpointKind::Unix,
            Address::Vsock { .. } => EndpointKind::Vsock,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp {
                host,
                port: Some(port),
            } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp {
                host,
                port: Some(port),
            } => write!(f, "{host}:{port}"),
            Address::Tcp { host, port: None } => f.write_str(host),
            Address::Unix { path } => write!(f, "unix:{}", path.display()),
            Address::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

/// Where and how the transport reaches a guest: an [`Address`] the backend discovered (a TCP
/// host and port, a UNIX socket or a vsock address), and with per-job keys the job's own
/// client key and the guest's expected host key.
///
/// As JSON (state files, the executable protocol) a TCP endpoint is what it always was,
/// `{"host": "127.0.0.1", "port": 40022}`; the other kinds say so:
/// `{"kind": "unix", "path": "/run/vm.sock"}`, `{"kind": "vsock", "cid": 3, "port": 22}`.
/// `identity_file` and `host_key` sit beside them in every kind.
///
/// ```
/// use hyperjob_plugin::{Address, Endpoint, EndpointKind};
///
/// let tcp = Endpoint::new("127.0.0.1", Some(40022));
/// assert_eq!(serde_json::to_string(&tcp).unwrap(), r#"{"host":"127.0.0.1","port":40022}"#);
/// let unix = Endpoint::unix("/run/hyperjob/vm.sock");
/// assert_eq!(unix.kind(), EndpointKind::Unix);
/// let back: Endpoint = serde_json::from_str(r#"{"kind":"unix","path":"/run/hyperjob/vm.sock"}"#).unwrap();
/// assert_eq!(back, unix);
/// assert!(matches!(back.address, Address::Unix { .. }));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "EndpointWire", into = "EndpointWire")]
pub struct Endpoint {
    /// Where the guest is reached.
    pub address: Address,
    /// The job's private key file (0600), overriding the transport's configured key.
    pub identity_file: Option<std::path::PathBuf>,
    /// The one host key the guest may present (`ssh-ed25519 AAAA…`), overriding pinned keys.
    pub host_key: Option<String>,
}

impl Endpoint {
    /// A TCP address without credentials attached: `Endpoint::new("192.168.122.5", None)`, or a
    /// forwarded port, `Endpoint::new("127.0.0.1", Some(40022))`. hyperjob attaches the job's
    /// keys itself with `guest_keys = "per-job"`.
    pub fn new(host: impl Into<String>, port: Option<u16>) -> Self {
        Self::at(Address::Tcp {
            host: host.into(),
            port,
        })
    }

    /// A UNIX socket on the host, without credentials attached.
    pub fn unix(path: impl Into<std::path::PathBuf>) -> Self {
        Self::at(Address::Unix { path: path.into() })
    }

    /// A vsock address, without credentials attached.
    pub fn vsock(cid: u32, port: u32) -> Self {
        Self::at(Address::Vsock { cid, port })
    }

    /// Any address, without credentials attached.
    pub fn at(address: Address) -> Self {
        Self {
            address,
            identity_file: None,
            host_key: None,
        }
    }

    /// The address's kind.
    pub fn kind(&self) -> EndpointKind {
        self.address.kind()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.address.fmt(f)
    }
}

/// An [`Endpoint`] as JSON: flat, with `kind` only for kinds other than TCP (so TCP endpoints
/// read and write exactly as before kinds existed).
#[derive(Serialize, Deserialize)]
struct EndpointWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<EndpointKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity_file: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host_key: Option<String>,
}

impl From<Endpoint> for EndpointWire {
    fn from(endpoint: Endpoint) -> Self {
        let mut wire = EndpointWire {
            kind: None,
            host: None,
            port: None,
            path: None,
            cid: None,
            identity_file: endpoint.identity_file,
            host_key: endpoint.host_key,
        };
        match endpoint.address {
            Address::Tcp { host, port } => {
                wire.host = Some(host);
                wire.port = port.map(u32::from);
            }
            Address::Unix { path } => {
                wire.kind = Some(EndpointKind::Unix);
                wire.path = Some(path);
            }
            Address::Vsock { cid, port } => {
                wire.kind = Some(EndpointKind::Vsock);
                wire.cid = Some(cid);
                wire.port = Some(port);
            }
        }
        wire
    }
}

impl TryFrom<EndpointWire> for Endpoint {
    type Error = String;

    fn try_from(wire: EndpointWire) -> Result<Self, String> {
        let kind = wire.kind.unwrap_or(EndpointKind::Tcp);
        let stray = |key: &str, present: bool| {
            if present {
                Err(format!("`{key}` does not belong to a {kind} endpoint"))
            } else {
                Ok(())
            }
        };
        let needs = |key: &str| format!("a {kind} endpoint needs `{key}`");
        let address = match kind {
            EndpointKind::Tcp => {
                stray("path", wire.path.is_some())?;
                stray("cid", wire.cid.is_some())?;
                let host = wire
                    .host
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| needs("host"))?;
                let port = match wire.port {
                    None => None,
                    Some(port) => Some(
                        u16::try_from(port)
                            .ok()
                            .filter(|p| *p > 0)
                            .ok_or_else(|| format!("tcp port {port} is out of range"))?,
                    ),
                };
                Address::Tcp { host, port }
            }
            EndpointKind::Unix => {
                stray("host", wire.host.is_some())?;
                stray("port", wire.port.is_some())?;
                stray("cid", wire.cid.is_some())?;
                let path = wire.path.ok_or_else(|| needs("path"))?;
                if !path.is_absolute() {
                    return Err(format!(
                        "unix endpoint path {} is not absolute",
                        path.display()
                    ));
                }
                Address::Unix { path }
            }
            EndpointKind::Vsock => {
                stray("host", wire.host.is_some())?;
                stray("path", wire.path.is_some())?;
                Address::Vsock {
                    cid: wire.cid.ok_or_else(|| needs("cid"))?,
                    port: wire.port.ok_or_else(|| needs("port"))?,
                }
            }
        };
        Ok(Endpoint {
            address,
            identity_file: wire.identity_file,
            host_key: wire.host_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(endpoint: &Endpoint) -> String {
        serde_json::to_string(endpoint).expect("serialises")
    }

    fn parse(text: &str) -> Result<Endpoint, String> {
        serde_json::from_str(text).map_err(|err| err.to_string())
    }

    #[test]
    fn tcp_endpoints_read_and_write_as_before_kinds_existed() {
        // What state files and the executable protocol held before endpoints had kinds.
        let old = r#"{"host":"192.0.2.10","port":2222,"identity_file":"/s/id","host_key":"ssh-ed25519 AAAA"}"#;
        let endpoint = parse(old).expect("an old endpoint loads");
        assert_eq!(
            endpoint,
            Endpoint {
                identity_file: Some("/s/id".into()),
                host_key: Some("ssh-ed25519 AAAA".into()),
                ..Endpoint::new("192.0.2.10", Some(2222))
            }
        );
        assert_eq!(json(&endpoint), old);
        assert_eq!(json(&Endpoint::new("h", None)), r#"{"host":"h"}"#);
        assert_eq!(
            parse(r#"{"kind":"tcp","host":"h"}"#),
            Ok(Endpoint::new("h", None))
        );
    }

    #[test]
    fn unix_and_vsock_endpoints_name_their_kind() {
        let unix = Endpoint {
            host_key: Some("ssh-ed25519 AAAA".into()),
            ..Endpoint::unix("/run/vm/ssh.sock")
        };
        let text = json(&unix);
        assert_eq!(
            text,
            r#"{"kind":"unix","path":"/run/vm/ssh.sock","host_key":"ssh-ed25519 AAAA"}"#
        );
        assert_eq!(parse(&text), Ok(unix.clone()));
        assert_eq!(unix.kind(), EndpointKind::Unix);
        assert_eq!(unix.to_string(), "unix:/run/vm/ssh.sock");

        let vsock = Endpoint::vsock(3, 22);
        assert_eq!(json(&vsock), r#"{"kind":"vsock","port":22,"cid":3}"#);
        assert_eq!(
            parse(r#"{"kind":"vsock","cid":3,"port":22}"#),
            Ok(vsock.clone())
        );
        assert_eq!(vsock.to_string(), "vsock:3:22");
        assert_eq!(Endpoint::new("::1", Some(22)).to_string(), "[::1]:22");
    }

    #[test]
    fn a_bad_endpoint_is_refused_naming_the_key() {
        let refused = |text: &str| parse(text).expect_err(text);
        assert!(refused(r#"{"port":22}"#).contains("a tcp endpoint needs `host`"));
        assert!(refused(r#"{"host":"h","port":70000}"#).contains("tcp port 70000 is out of range"));
        assert!(refused(r#"{"kind":"unix"}"#).contains("a unix endpoint needs `path`"));
        assert!(refused(r#"{"kind":"unix","path":"rel.sock"}"#).contains("is not absolute"));
        assert!(refused(r#"{"kind":"unix","path":"/s","host":"h"}"#)
            .contains("`host` does not belong to a unix endpoint"));
        assert!(refused(r#"{"kind":"vsock","cid":3}"#).contains("a vsock endpoint needs `port`"));
        assert!(refused(r#"{"kind":"serial","path":"/s"}"#).contains("unknown variant `serial`"));
    }

    #[test]
    fn kinds_have_names() {
        for kind in EndpointKind::ALL {
            assert_eq!(EndpointKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(EndpointKind::from_name("udp"), None);
        assert_eq!(
            EndpointKind::list(&[EndpointKind::Tcp, EndpointKind::Unix]),
            "tcp, unix"
        );
        assert_eq!(EndpointKind::list(&[]), "none");
    }
}
