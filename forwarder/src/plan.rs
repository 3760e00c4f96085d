//! The one boundary where the manager's protobuf becomes typed, validated
//! values ([`Plan`]): every string is parsed here, once, and every refusal
//! carries the gRPC code and a message naming the offending field.
//!
//! Nothing here has side effects except looking at the netns path (it must
//! exist and be a network namespace), so a refused request leaves nothing
//! behind.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use ipnet::IpNet;
use nsm_dataplane::{MacAddr, PublicKey};
use nsm_proto::forwarder::v1 as pb;
use nsm_proto::mechanisms::{kernel::IFNAME_MAX_LEN, wireguard::DEFAULT_PORT};

use crate::keys;

/// A refused request: the gRPC code and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// The gRPC status code to answer with.
    pub code: tonic::Code,
    /// What is wrong, naming the field.
    pub message: String,
}

impl Refusal {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Refusal {
            code: tonic::Code::InvalidArgument,
            message: message.into(),
        }
    }

    pub(crate) fn new(code: tonic::Code, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        tonic::Status::new(r.code, r.message)
    }
}

/// A network namespace, named by its path and identified by its inode (two
/// paths to the same namespace compare equal).
#[derive(Debug, Clone)]
pub struct NetnsRef {
    /// As given (`/proc/PID/ns/net`, `/run/netns/NAME`).
    pub path: PathBuf,
    /// `(st_dev, st_ino)` of the namespace file.
    pub id: (u64, u64),
}

impl PartialEq for NetnsRef {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for NetnsRef {}

/// A validated pod-side interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPlan {
    /// Where to create it.
    pub netns: NetnsRef,
    /// Its name, 1-15 bytes, no '/', no whitespace.
    pub name: String,
    /// TAP (Ethernet) instead of TUN (IP).
    pub tap: bool,
    /// Addresses with prefix lengths.
    pub addresses: Vec<IpNet>,
    /// Routes through it.
    pub routes: Vec<RoutePlan>,
    /// Requested MTU; `None` derives it from the underlay.
    pub mtu: Option<u32>,
    /// MAC of the interface (TAP only).
    pub mac: Option<MacAddr>,
    /// Static neighbours (TAP only).
    pub neighbors: Vec<(IpAddr, MacAddr)>,
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// Destination.
    pub prefix: IpNet,
    /// Gateway; `None` = link-scope route.
    pub next_hop: Option<IpAddr>,
}

/// A validated WireGuard side.
#[derive(Debug, Clone, PartialEq)]
pub struct WgPlan {
    /// Where the peer forwarder listens; `None` while the manager does not
    /// know it yet (it may Program a first time with neither the peer's
    /// address nor its key, only to learn our key).
    pub peer: Option<SocketAddr>,
    /// The peer's key, once the manager knows it.
    pub peer_public: Option<PublicKey>,
    /// Keepalive interval, seconds.
    pub keepalive: Option<u16>,
}

/// One validated side.
#[derive(Debug, Clone, PartialEq)]
pub enum SidePlan {
    /// A pod interface on this node.
    Kernel(KernelPlan),
    /// A tunnel to another node.
    Wireguard(WgPlan),
}

/// A validated cross-connect.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The manager's id.
    pub id: String,
    /// The client-facing side.
    pub source: SidePlan,
    /// The endpoint-facing side.
    pub destination: SidePlan,
}

impl Plan {
    /// Both sides, source first.
    pub fn sides(&self) -> [&SidePlan; 2] {
        [&self.source, &self.destination]
    }

    /// The MTU of the pod interfaces: the smallest requested one, or the
    /// underlay's minus the WireGuard overhead.
    pub fn effective_mtu(&self, derived: u32) -> u32 {
        self.sides()
            .iter()
            .filter_map(|s| match s {
                SidePlan::Kernel(k) => k.mtu,
                SidePlan::Wireguard(_) => None,
            })
            .min()
            .unwrap_or(derived)
    }
}

/// Parses and validates a Program request.
///
/// # Errors
/// A [`Refusal`] naming the first thing wrong.
pub fn parse(req: &pb::CrossConnect) -> Result<Plan, Refusal> {
    if req.id.is_empty() {
        return Err(Refusal::invalid("id is empty"));
    }
    let source = parse_side(req.source.as_ref(), "source")?;
    let destination = parse_side(req.destination.as_ref(), "destination")?;
    match (&source, &destination) {
        (SidePlan::Wireguard(_), SidePlan::Wireguard(_)) => {
            return Err(Refusal::invalid(
                "both sides are wireguard: a cross-connect needs at least one kernel side",
            ));
        }
        (SidePlan::Kernel(a), SidePlan::Kernel(b)) => {
            if a.netns == b.netns && a.name == b.name {
                return Err(Refusal::new(
                    tonic::Code::AlreadyExists,
                    format!(
                        "source and destination both name interface {} in {}",
                        a.name,
                        a.netns.path.display()
                    ),
                ));
            }
            if a.tap != b.tap {
                return Err(Refusal::invalid(
                    "source and destination have different payloads",
                ));
            }
        }
        _ => {}
    }
    Ok(Plan {
        id: req.id.clone(),
        source,
        destination,
    })
}

fn parse_side(side: Option<&pb::Side>, what: &str) -> Result<SidePlan, Refusal> {
    match side.and_then(|s| s.kind.as_ref()) {
        None => Err(Refusal::invalid(format!(
            "{what}: missing (kernel or wireguard)"
        ))),
        Some(pb::side::Kind::Kernel(k)) => parse_kernel(k, what).map(SidePlan::Kernel),
        Some(pb::side::Kind::Wireguard(w)) => parse_wg(w, what).map(SidePlan::Wireguard),
    }
}

/// Checks an interface name the way the kernel's `dev_valid_name` does.
pub(crate) fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("interface name is empty".into());
    }
    if name.len() > IFNAME_MAX_LEN {
        return Err(format!(
            "interface name {name:?} is {} bytes, the limit is {IFNAME_MAX_LEN}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("interface name {name:?} is reserved"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || *c == '\0')
    {
        return Err(format!("interface name {name:?} contains {c:?}"));
    }
    Ok(())
}

fn parse_kernel(k: &pb::KernelInterface, what: &str) -> Result<KernelPlan, Refusal> {
    check_ifname(&k.name).map_err(|e| Refusal::invalid(format!("{what}.kernel.name: {e}")))?;
    if k.netns_path.is_empty() {
        return Err(Refusal::invalid(format!(
            "{what}.kernel.netns_path is empty"
        )));
    }
    let path = PathBuf::from(&k.netns_path);
    let meta = std::fs::metadata(&path).map_err(|e| {
        Refusal::new(
            tonic::Code::NotFound,
            format!("{what}.kernel.netns_path {}: {e}", path.display()),
        )
    })?;
    // A netns file is an nsfs inode; anything else (a directory, a regular
    // file) would make setns fail later with a less helpful error.
    if meta.is_dir() || meta.len() != 0 {
        return Err(Refusal::invalid(format!(
            "{what}.kernel.netns_path {} is not a network namespace",
            path.display()
        )));
    }
    let tap = match pb::Payload::try_from(k.payload) {
        Ok(pb::Payload::Ip) => false,
        Ok(pb::Payload::Ethernet) => true,
        Err(_) => {
            return Err(Refusal::invalid(format!(
                "{what}.kernel.payload {} is not IP or ETHERNET",
                k.payload
            )));
        }
    };
    let addresses = k
        .addresses
        .iter()
        .map(|a| {
            a.parse::<IpNet>().map_err(|_| {
                Refusal::invalid(format!("{what}.kernel.addresses: {a:?} is not a CIDR"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let routes = k
        .routes
        .iter()
        .map(|r| {
            let prefix = r.prefix.parse::<IpNet>().map_err(|_| {
                Refusal::invalid(format!("{what}.kernel.routes: prefix {:?} is not a CIDR", r.prefix))
            })?;
            let next_hop = if r.next_hop.is_empty() {
                None
            } else {
                let nh = r.next_hop.parse::<IpAddr>().map_err(|_| {
                    Refusal::invalid(format!(
                        "{what}.kernel.routes: next_hop {:?} is not an IP address",
                        r.next_hop
                    ))
                })?;
                if nh.is_ipv4() != prefix.addr().is_ipv4() {
                    return Err(Refusal::invalid(format!(
                        "{what}.kernel.routes: next_hop {nh} and prefix {prefix} are different families"
                    )));
                }
                Some(nh)
            };
            Ok(RoutePlan {
                prefix: prefix.trunc(),
                next_hop,
            })
        })
        .collect::<Result<Vec<_>, Refusal>>()?;
    let mtu = match k.mtu {
        0 => None,
        m if (u32::from(nsm_dataplane::MIN_MTU)..=65535).contains(&m) => Some(m),
        m => {
            return Err(Refusal::invalid(format!(
                "{what}.kernel.mtu {m} is outside {}..=65535",
                nsm_dataplane::MIN_MTU
            )));
        }
    };
    let mac = if k.mac.is_empty() || !tap {
        None
    } else {
        Some(parse_mac(&k.mac).map_err(|e| Refusal::invalid(format!("{what}.kernel.mac: {e}")))?)
    };
    let neighbors = k
        .neighbors
        .iter()
        .map(|n| {
            let ip = n.ip.parse::<IpAddr>().map_err(|_| {
                Refusal::invalid(format!(
                    "{what}.kernel.neighbors: ip {:?} is not an IP address",
                    n.ip
                ))
            })?;
            let mac = parse_mac(&n.mac)
                .map_err(|e| Refusal::invalid(format!("{what}.kernel.neighbors: {e}")))?;
            Ok((ip, mac))
        })
        .collect::<Result<Vec<_>, Refusal>>()?;
    Ok(KernelPlan {
        netns: NetnsRef {
            path,
            id: (meta.dev(), meta.ino()),
        },
        name: k.name.clone(),
        tap,
        addresses,
        routes,
        mtu,
        mac,
        neighbors,
    })
}

fn parse_wg(w: &pb::WireguardTunnel, what: &str) -> Result<WgPlan, Refusal> {
    let ip = if w.peer_ip.is_empty() {
        if !w.peer_public_key.is_empty() {
            return Err(Refusal::invalid(format!(
                "{what}.wireguard.peer_ip is empty but peer_public_key is set"
            )));
        }
        None
    } else {
        Some(w.peer_ip.parse::<IpAddr>().map_err(|_| {
            Refusal::invalid(format!(
                "{what}.wireguard.peer_ip {:?} is not an IP address",
                w.peer_ip
            ))
        })?)
    };
    let port = match w.peer_port {
        0 => DEFAULT_PORT,
        p => u16::try_from(p).map_err(|_| {
            Refusal::invalid(format!("{what}.wireguard.peer_port {p} is not a port"))
        })?,
    };
    let peer_public = if w.peer_public_key.is_empty() {
        None
    } else {
        Some(
            keys::parse_public(&w.peer_public_key)
                .map_err(|e| Refusal::invalid(format!("{what}.wireguard.peer_public_key: {e}")))?,
        )
    };
    let keepalive = match w.persistent_keepalive_secs {
        0 => None,
        s => Some(u16::try_from(s).map_err(|_| {
            Refusal::invalid(format!(
                "{what}.wireguard.persistent_keepalive_secs {s} is too large"
            ))
        })?),
    };
    Ok(WgPlan {
        peer: ip.map(|ip| SocketAddr::new(ip, port)),
        peer_public,
        keepalive,
    })
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub(crate) fn parse_mac(s: &str) -> Result<MacAddr, String> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts
            .next()
            .ok_or_else(|| format!("{s:?} is not a MAC address"))?;
        if p.len() != 2 {
            return Err(format!("{s:?} is not a MAC address"));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
    }
    if parts.next().is_some() {
        return Err(format!("{s:?} is not a MAC address"));
    }
    Ok(MacAddr(out))
}

/// First IPv4 and IPv6 address among `nets` (the peer addresses the data
/// plane answers ARP/ND for and sends ICMP errors from).
pub(crate) fn first_addrs(
    ips: impl Iterator<Item = IpAddr>,
) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let mut v4 = None;
    let mut v6 = None;
    for ip in ips {
        match ip {
            IpAddr::V4(a) if v4.is_none() => v4 = Some(a),
            IpAddr::V6(a) if v6.is_none() => v6 = Some(a),
            _ => {}
        }
    }
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifnames() {
        assert!(check_ifname("nsm-1").is_ok());
        assert!(check_ifname("0123456789abcde").is_ok());
        assert!(check_ifname("0123456789abcdef").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a b").is_err());
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:fe:00:00:00:01"),
            Ok(MacAddr([2, 0xfe, 0, 0, 0, 1]))
        );
        assert!(parse_mac("02:fe:00:00:00").is_err());
        assert!(parse_mac("02:fe:00:00:00:01:02").is_err());
        assert!(parse_mac("zz:fe:00:00:00:01").is_err());
    }

    fn kernel(name: &str) -> pb::Side {
        pb::Side {
            kind: Some(pb::side::Kind::Kernel(pb::KernelInterface {
                netns_path: "/proc/self/ns/net".into(),
                name: name.into(),
                addresses: vec!["192.0.2.1/32".into()],
                ..Default::default()
            })),
        }
    }

    #[test]
    fn refusals_carry_codes() {
        let mut req = pb::CrossConnect {
            id: "x".into(),
            source: Some(kernel("nsm-1")),
            destination: Some(kernel("nsm-2")),
        };
        assert!(parse(&req).is_ok());
        req.destination = Some(kernel("nsm-1"));
        assert_eq!(
            parse(&req).map(|_| ()).unwrap_err().code,
            tonic::Code::AlreadyExists
        );
        req.destination = Some(kernel("way-too-long-name"));
        assert_eq!(
            parse(&req).map(|_| ()).unwrap_err().code,
            tonic::Code::InvalidArgument
        );
        req.destination = Some(pb::Side {
            kind: Some(pb::side::Kind::Kernel(pb::KernelInterface {
                netns_path: "/nonexistent/ns".into(),
                name: "a".into(),
                ..Default::default()
            })),
        });
        assert_eq!(
            parse(&req).map(|_| ()).unwrap_err().code,
            tonic::Code::NotFound
        );
        req.destination = Some(pb::Side {
            kind: Some(pb::side::Kind::Wireguard(pb::WireguardTunnel {
                peer_ip: "192.0.2.2".into(),
                peer_public_key: "bad".into(),
                ..Default::default()
            })),
        });
        let e = parse(&req).map(|_| ()).unwrap_err();
        assert_eq!(e.code, tonic::Code::InvalidArgument);
        assert!(e.message.contains("peer_public_key"), "{}", e.message);
        // The manager's first Program may know neither the peer's address
        // nor its key: accepted, pending.
        req.destination = Some(pb::Side {
            kind: Some(pb::side::Kind::Wireguard(pb::WireguardTunnel::default())),
        });
        let p = parse(&req).expect("pending wireguard side");
        assert!(matches!(
            p.destination,
            SidePlan::Wireguard(WgPlan {
                peer: None,
                peer_public: None,
                ..
            })
        ));
        // A key without an address is not.
        req.destination = Some(pb::Side {
            kind: Some(pb::side::Kind::Wireguard(pb::WireguardTunnel {
                peer_public_key: crate::keys::format_public(
                    &crate::keys::PrivateKey::generate().expect("key").public(),
                ),
                ..Default::default()
            })),
        });
        let e = parse(&req).map(|_| ()).unwrap_err();
        assert!(e.message.contains("peer_ip"), "{}", e.message);
    }
}
