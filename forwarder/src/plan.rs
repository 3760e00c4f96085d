//! The one boundary where the manager's protobuf becomes typed, validated
//! values ([`Plan`]): every string is parsed here, once, and every refusal
//! carries the gRPC code and a message naming the offending field.
//!
//! Nothing here has side effects except looking at the netns path (it must
//! exist and be a network namespace), so a refused request leaves nothing
//! behind.
//!
//! The service chain is converted here too ([`parse_chain`]): the proto's
//! source/destination directions become the data plane's A/B ones (side A
//! is always the kernel side, which is the destination on the endpoint's
//! node), proto defaults become explicit values, and the whole
//! [`ChainSpec`] is validated, so that a bad chain is refused before
//! anything is touched and the chain in force stays.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use ipnet::IpNet;
use nsm_dataplane::stages::{
    AclAction, AclRule, AclSpec, ChainElement, ChainSpec, FaultSpec, FlowMatch, FunctionSpec,
    MirrorSpec, Nat44Spec, PortRange, Prefix, Proto, RateLimitSpec,
};
use nsm_dataplane::{Direction, MacAddr, PublicKey};
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
    /// The ports of the peer's lanes, lane 0 (the `peer` port) first;
    /// empty when the peer named none (one lane).
    pub lane_ports: Vec<u16>,
}

/// Lane ports a request may name at most.
pub const MAX_LANES: usize = nsm_proto::mechanisms::wireguard::MAX_LANES;

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
    /// The built-in functions, directions already in A/B terms.
    pub chain: ChainPlan,
}

/// A validated chain: the data plane's spec plus what only the forwarder
/// acts on (where mirrors write).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChainPlan {
    /// Validated: `nsm_dataplane::stages::build` cannot refuse it.
    pub spec: ChainSpec,
    /// `pcap[i]` is the file of `spec.functions[i]` when it is a mirror.
    pub pcap: Vec<Option<PathBuf>>,
    /// Side A is the source side (false on the endpoint's node of a
    /// cross-node connection): maps A/B back to forward/reverse in status.
    pub a_is_source: bool,
}

impl Plan {
    /// Both sides, source first.
    pub fn sides(&self) -> [&SidePlan; 2] {
        [&self.source, &self.destination]
    }

    /// The WireGuard side, for a cross-node connection.
    pub fn wireguard(&self) -> Option<&WgPlan> {
        self.sides().into_iter().find_map(|s| match s {
            SidePlan::Wireguard(w) => Some(w),
            SidePlan::Kernel(_) => None,
        })
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
    // Side A is the source when the source is a kernel side (see service).
    let a_is_source = matches!(source, SidePlan::Kernel(_));
    let chain = parse_chain(req.chain.as_ref(), a_is_source)?;
    Ok(Plan {
        id: req.id.clone(),
        source,
        destination,
        chain,
    })
}

/// Largest `Fault.delay_ms`: a delay line holds a fixed number of
/// packets, so a longer delay only turns into loss at any useful rate.
pub const MAX_DELAY_MS: u32 = 10_000;
/// Default `Mirror.snaplen`, bytes (a jumbo frame).
pub const DEFAULT_SNAPLEN: u16 = 9216;
/// Default `Mirror.slots`, packets.
pub const DEFAULT_MIRROR_SLOTS: usize = 512;
/// Default ACL/NAT table size, entries.
pub const DEFAULT_TABLE: usize = 65_536;
/// Default ACL/NAT idle timeout.
pub const DEFAULT_IDLE: std::time::Duration = std::time::Duration::from_secs(120);

/// Converts and validates a chain. Errors name the element the way
/// [`nsm_dataplane::stages::SpecError`] does: `chain[1] (ratelimit): ...`.
///
/// # Errors
/// INVALID_ARGUMENT for anything malformed.
pub fn parse_chain(chain: Option<&pb::Chain>, a_is_source: bool) -> Result<ChainPlan, Refusal> {
    let Some(chain) = chain else {
        return Ok(ChainPlan {
            a_is_source,
            ..ChainPlan::default()
        });
    };
    let dir = |d: i32, what: &str| -> Result<Option<Direction>, String> {
        let (fwd, rev) = if a_is_source {
            (Direction::AToB, Direction::BToA)
        } else {
            (Direction::BToA, Direction::AToB)
        };
        match pb::ChainDirection::try_from(d) {
            Ok(pb::ChainDirection::Both) => Ok(None),
            Ok(pb::ChainDirection::Forward) => Ok(Some(fwd)),
            Ok(pb::ChainDirection::Reverse) => Ok(Some(rev)),
            Err(_) => Err(format!(
                "{what}direction {d} is not BOTH, FORWARD or REVERSE"
            )),
        }
    };
    let ports = |r: Option<&pb::PortRange>, what: &str| -> Result<Option<PortRange>, String> {
        let Some(r) = r else { return Ok(None) };
        let port =
            |p: u32| u16::try_from(p).map_err(|_| format!("{what}: port {p} is above 65535"));
        let lo = port(r.lo)?;
        let hi = if r.hi == 0 { lo } else { port(r.hi)? };
        Ok(Some(PortRange::new(lo, hi)))
    };
    let prefix = |s: &str, what: &str| -> Result<Option<Prefix>, String> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse::<Prefix>()
            .map(Some)
            .map_err(|e| format!("{what} {s:?}: {e}"))
    };
    let flow = |m: Option<&pb::FlowMatch>, what: &str| -> Result<FlowMatch, String> {
        let Some(m) = m else {
            return Ok(FlowMatch::default());
        };
        let proto = match pb::MatchProtocol::try_from(m.protocol) {
            Ok(pb::MatchProtocol::Any) => Proto::Any,
            Ok(pb::MatchProtocol::Icmp) => Proto::Icmp,
            Ok(pb::MatchProtocol::Icmpv6) => Proto::Icmpv6,
            Ok(pb::MatchProtocol::Tcp) => Proto::Tcp,
            Ok(pb::MatchProtocol::Udp) => Proto::Udp,
            Err(_) => return Err(format!("{what}protocol {} is unknown", m.protocol)),
        };
        Ok(FlowMatch {
            proto,
            src: prefix(&m.src, &format!("{what}src"))?,
            dst: prefix(&m.dst, &format!("{what}dst"))?,
            src_ports: ports(m.src_ports.as_ref(), &format!("{what}src_ports"))?,
            dst_ports: ports(m.dst_ports.as_ref(), &format!("{what}dst_ports"))?,
            direction: dir(m.direction, what)?,
        })
    };
    let action = |a: i32, what: &str| match pb::AclAction::try_from(a) {
        Ok(pb::AclAction::Allow) => Ok(AclAction::Allow),
        Ok(pb::AclAction::Deny) => Ok(AclAction::Deny),
        Err(_) => Err(format!("{what} {a} is not ALLOW or DENY")),
    };
    let secs = |s: u32| {
        if s == 0 {
            DEFAULT_IDLE
        } else {
            std::time::Duration::from_secs(u64::from(s))
        }
    };
    let table = |n: u32| {
        if n == 0 {
            DEFAULT_TABLE
        } else {
            usize::try_from(n).unwrap_or(usize::MAX)
        }
    };

    let mut functions = Vec::with_capacity(chain.functions.len());
    let mut pcap = Vec::with_capacity(chain.functions.len());
    for (i, f) in chain.functions.iter().enumerate() {
        use pb::function::Kind;
        let Some(kind) = f.kind.as_ref() else {
            return Err(Refusal::invalid(format!(
                "chain[{i}]: no function set (acl, ratelimit, nat44, mirror, counter or fault)"
            )));
        };
        let name = match kind {
            Kind::Acl(_) => "acl",
            Kind::Ratelimit(_) => "ratelimit",
            Kind::Nat44(_) => "nat44",
            Kind::Mirror(_) => "mirror",
            Kind::Counter(_) => "counter",
            Kind::Fault(_) => "fault",
        };
        let bad = |e: String| Refusal::invalid(format!("chain[{i}] ({name}): {e}"));
        let mut path = None;
        let spec =
            match kind {
                Kind::Acl(a) => {
                    let rules = a
                        .rules
                        .iter()
                        .enumerate()
                        .map(|(r, rule)| {
                            Ok(AclRule {
                                action: action(rule.action, &format!("rule[{r}]: action"))?,
                                matches: flow(rule.r#match.as_ref(), &format!("rule[{r}]: "))?,
                            })
                        })
                        .collect::<Result<Vec<_>, String>>()
                        .map_err(bad)?;
                    FunctionSpec::Acl(AclSpec {
                        rules,
                        default: action(a.default_action, "default_action").map_err(bad)?,
                        stateful: a.stateful.unwrap_or(true),
                        conntrack_capacity: table(a.conntrack_capacity),
                        idle_timeout: secs(a.idle_timeout_secs),
                    })
                }
                Kind::Ratelimit(r) => FunctionSpec::RateLimit(RateLimitSpec {
                    rate_bps: r.rate_bps,
                    burst_bytes: (r.burst_bytes != 0).then_some(r.burst_bytes),
                    direction: dir(r.direction, "").map_err(bad)?,
                }),
                Kind::Nat44(n) => {
                    let address = n.address.parse().map_err(|_| {
                        bad(format!("address {:?} is not an IPv4 address", n.address))
                    })?;
                    let mut spec = Nat44Spec::new(address);
                    if let Some(p) = ports(n.ports.as_ref(), "ports").map_err(bad)? {
                        spec.ports = p;
                    }
                    spec.outbound = if a_is_source {
                        Direction::AToB
                    } else {
                        Direction::BToA
                    };
                    spec.capacity = table(n.capacity);
                    spec.idle_timeout = secs(n.idle_timeout_secs);
                    FunctionSpec::Nat44(spec)
                }
                Kind::Mirror(m) => {
                    let p = PathBuf::from(&m.pcap_path);
                    if !p.is_absolute() {
                        return Err(bad(format!(
                            "pcap_path {:?} is not an absolute path",
                            m.pcap_path
                        )));
                    }
                    path = Some(p);
                    let snaplen = match m.snaplen {
                        0 => DEFAULT_SNAPLEN,
                        n => u16::try_from(n)
                            .map_err(|_| bad(format!("snaplen {n} is above 65535")))?,
                    };
                    FunctionSpec::Mirror(MirrorSpec {
                        filter: flow(m.filter.as_ref(), "filter: ").map_err(bad)?,
                        snaplen,
                        slots: match m.slots {
                            0 => DEFAULT_MIRROR_SLOTS,
                            n => usize::try_from(n).unwrap_or(usize::MAX),
                        },
                    })
                }
                Kind::Counter(_) => FunctionSpec::Counter,
                Kind::Fault(fl) => {
                    if fl.delay_ms > MAX_DELAY_MS {
                        return Err(bad(format!(
                            "delay_ms {} is above {MAX_DELAY_MS}",
                            fl.delay_ms
                        )));
                    }
                    let mut spec = FaultSpec {
                        delay: std::time::Duration::from_millis(u64::from(fl.delay_ms)),
                        drop_percent: fl.drop_percent,
                        corrupt_percent: fl.corrupt_percent,
                        direction: dir(fl.direction, "").map_err(bad)?,
                        ..FaultSpec::default()
                    };
                    if fl.seed != 0 {
                        spec.seed = fl.seed;
                    }
                    FunctionSpec::Fault(spec)
                }
            };
        let selector = match f.selector.as_ref() {
            None => None,
            Some(m) => Some(flow(Some(m), "selector: ").map_err(bad)?),
        };
        functions.push(ChainElement {
            function: spec,
            selector,
        });
        pcap.push(path);
    }
    let spec = ChainSpec { functions };
    // The data plane's own checks (prefixes, ranges, rates, sizes), with
    // the same `chain[i] (name): ...` naming.
    spec.validate()
        .map_err(|e| Refusal::invalid(e.to_string()))?;
    Ok(ChainPlan {
        spec,
        pcap,
        a_is_source,
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
    if w.peer_lane_ports.len() > MAX_LANES {
        return Err(Refusal::invalid(format!(
            "{what}.wireguard.peer_lane_ports has {} ports; at most {MAX_LANES}",
            w.peer_lane_ports.len()
        )));
    }
    let lane_ports = w
        .peer_lane_ports
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
                Refusal::invalid(format!(
                    "{what}.wireguard.peer_lane_ports[{i}] {p} is not a port"
                ))
            })
        })
        .collect::<Result<Vec<u16>, Refusal>>()?;
    if let Some(i) = (1..lane_ports.len()).find(|&i| lane_ports[..i].contains(&lane_ports[i])) {
        return Err(Refusal::invalid(format!(
            "{what}.wireguard.peer_lane_ports[{i}] {} is named twice",
            lane_ports[i]
        )));
    }
    if let Some(&first) = lane_ports.first()
        && first != port
    {
        return Err(Refusal::invalid(format!(
            "{what}.wireguard.peer_lane_ports[0] {first} is not peer_port {port}"
        )));
    }
    Ok(WgPlan {
        peer: ip.map(|ip| SocketAddr::new(ip, port)),
        peer_public,
        keepalive,
        lane_ports,
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

    fn f(kind: pb::function::Kind) -> pb::Function {
        pb::Function {
            kind: Some(kind),
            selector: None,
        }
    }

    #[test]
    fn chain_directions_follow_the_source_side() {
        let chain = pb::Chain {
            functions: vec![f(pb::function::Kind::Ratelimit(pb::RateLimit {
                rate_bps: 1_000_000,
                direction: pb::ChainDirection::Forward as i32,
                ..Default::default()
            }))],
        };
        // Client's node: source = kernel = side A, so forward is A to B.
        let p = parse_chain(Some(&chain), true).expect("valid");
        let FunctionSpec::RateLimit(r) = &p.spec.functions[0].function else {
            panic!("ratelimit");
        };
        assert_eq!(r.direction, Some(Direction::AToB));
        assert_eq!(r.burst_bytes, None, "0 = the data plane's default");
        // Endpoint's node: side A is the destination's pod.
        let p = parse_chain(Some(&chain), false).expect("valid");
        let FunctionSpec::RateLimit(r) = &p.spec.functions[0].function else {
            panic!("ratelimit");
        };
        assert_eq!(r.direction, Some(Direction::BToA));
    }

    #[test]
    fn chain_defaults_are_explicit() {
        let chain = pb::Chain {
            functions: vec![
                f(pb::function::Kind::Acl(pb::Acl {
                    rules: vec![pb::AclRule {
                        action: pb::AclAction::Allow as i32,
                        r#match: Some(pb::FlowMatch {
                            protocol: pb::MatchProtocol::Tcp as i32,
                            dst: "192.0.2.0/24".into(),
                            dst_ports: Some(pb::PortRange { lo: 5201, hi: 0 }),
                            ..Default::default()
                        }),
                    }],
                    ..Default::default()
                })),
                f(pb::function::Kind::Mirror(pb::Mirror {
                    pcap_path: "/tmp/x.pcap".into(),
                    ..Default::default()
                })),
                f(pb::function::Kind::Counter(pb::CounterFunction {})),
            ],
        };
        let p = parse_chain(Some(&chain), true).expect("valid");
        let FunctionSpec::Acl(a) = &p.spec.functions[0].function else {
            panic!("acl");
        };
        assert!(a.stateful, "absent stateful = true");
        assert_eq!(a.default, AclAction::Deny);
        assert_eq!(a.conntrack_capacity, DEFAULT_TABLE);
        assert_eq!(a.rules[0].matches.dst_ports, Some(PortRange::single(5201)));
        let FunctionSpec::Mirror(m) = &p.spec.functions[1].function else {
            panic!("mirror");
        };
        assert_eq!(
            (m.snaplen, m.slots),
            (DEFAULT_SNAPLEN, DEFAULT_MIRROR_SLOTS)
        );
        assert_eq!(
            p.pcap[1].as_deref(),
            Some(std::path::Path::new("/tmp/x.pcap"))
        );
        assert_eq!(p.pcap[2], None);
        assert_eq!(
            parse_chain(None, true).expect("none").spec.functions.len(),
            0
        );
    }

    #[test]
    fn chain_refusals_name_the_element() {
        let refuse = |functions: Vec<pb::Function>| {
            parse_chain(Some(&pb::Chain { functions }), true)
                .map(|_| ())
                .unwrap_err()
        };
        let counter = || f(pb::function::Kind::Counter(pb::CounterFunction {}));
        let e = refuse(vec![
            counter(),
            f(pb::function::Kind::Ratelimit(pb::RateLimit::default())),
        ]);
        assert_eq!(e.code, tonic::Code::InvalidArgument);
        assert_eq!(e.message, "chain[1] (ratelimit): rate must be > 0");
        let e = refuse(vec![
            counter(),
            pb::Function {
                kind: None,
                selector: None,
            },
        ]);
        assert!(
            e.message.starts_with("chain[1]: no function"),
            "{}",
            e.message
        );
        let e = refuse(vec![f(pb::function::Kind::Nat44(pb::Nat44 {
            address: "2001:db8::1".into(),
            ..Default::default()
        }))]);
        assert!(
            e.message.starts_with("chain[0] (nat44): address"),
            "{}",
            e.message
        );
        let e = refuse(vec![f(pb::function::Kind::Acl(pb::Acl {
            rules: vec![pb::AclRule {
                action: pb::AclAction::Allow as i32,
                r#match: Some(pb::FlowMatch {
                    dst_ports: Some(pb::PortRange { lo: 70000, hi: 0 }),
                    ..Default::default()
                }),
            }],
            ..Default::default()
        }))]);
        assert!(
            e.message.starts_with("chain[0] (acl): rule[0]: dst_ports"),
            "{}",
            e.message
        );
        let e = refuse(vec![f(pb::function::Kind::Mirror(pb::Mirror {
            pcap_path: "relative.pcap".into(),
            ..Default::default()
        }))]);
        assert!(e.message.contains("absolute"), "{}", e.message);
        let e = refuse(vec![f(pb::function::Kind::Fault(pb::Fault {
            drop_percent: f64::NAN,
            ..Default::default()
        }))]);
        assert!(
            e.message.starts_with("chain[0] (fault): drop_percent"),
            "{}",
            e.message
        );
        let e = refuse(vec![f(pb::function::Kind::Fault(pb::Fault {
            delay_ms: 60_000,
            ..Default::default()
        }))]);
        assert!(
            e.message.starts_with("chain[0] (fault): delay_ms"),
            "{}",
            e.message
        );
    }

    #[test]
    fn selectors_are_converted_with_directions_and_checked() {
        let sel = |m: pb::FlowMatch| pb::Function {
            kind: Some(pb::function::Kind::Counter(pb::CounterFunction {})),
            selector: Some(m),
        };
        let chain = |m| pb::Chain {
            functions: vec![
                f(pb::function::Kind::Counter(pb::CounterFunction {})),
                sel(m),
            ],
        };
        let web = pb::FlowMatch {
            protocol: pb::MatchProtocol::Tcp as i32,
            dst_ports: Some(pb::PortRange { lo: 80, hi: 0 }),
            direction: pb::ChainDirection::Forward as i32,
            ..Default::default()
        };
        let p = parse_chain(Some(&chain(web.clone())), false).expect("valid");
        assert_eq!(p.spec.functions[0].selector, None);
        assert_eq!(
            p.spec.functions[1].selector,
            Some(FlowMatch {
                proto: Proto::Tcp,
                dst_ports: Some(PortRange::single(80)),
                // The endpoint's node: forward is B to A.
                direction: Some(Direction::BToA),
                ..FlowMatch::default()
            })
        );
        let e = parse_chain(
            Some(&chain(pb::FlowMatch {
                dst_ports: Some(pb::PortRange { lo: 90, hi: 80 }),
                ..Default::default()
            })),
            true,
        )
        .map(|_| ())
        .unwrap_err();
        assert_eq!(e.code, tonic::Code::InvalidArgument);
        assert_eq!(
            e.message,
            "chain[1] (counter): selector: port range 90-80 has lo > hi"
        );
        let e = parse_chain(
            Some(&chain(pb::FlowMatch {
                src: "10.0.0.0/8x".into(),
                ..Default::default()
            })),
            true,
        )
        .map(|_| ())
        .unwrap_err();
        assert!(
            e.message.starts_with("chain[1] (counter): selector: src"),
            "{}",
            e.message
        );
    }

    #[test]
    fn refusals_carry_codes() {
        let mut req = pb::CrossConnect {
            id: "x".into(),
            source: Some(kernel("nsm-1")),
            destination: Some(kernel("nsm-2")),
            chain: None,
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

    #[test]
    fn peer_lane_ports_are_ports_and_start_with_the_peer_port() {
        let mut req = pb::CrossConnect {
            id: "x".into(),
            source: Some(kernel("nsm-1")),
            destination: None,
            chain: None,
        };
        let wg = |ports: Vec<u32>| {
            Some(pb::Side {
                kind: Some(pb::side::Kind::Wireguard(pb::WireguardTunnel {
                    peer_ip: "192.0.2.7".into(),
                    peer_port: 51830,
                    peer_lane_ports: ports,
                    ..Default::default()
                })),
            })
        };
        req.destination = wg(vec![51830, 51831]);
        let p = parse(&req).expect("two lanes");
        let SidePlan::Wireguard(w) = p.destination else {
            panic!("not wireguard")
        };
        assert_eq!(w.lane_ports, [51830, 51831]);
        for (ports, says) in [
            (vec![51830, 0], "peer_lane_ports[1] 0"),
            (vec![51830, 70000], "peer_lane_ports[1] 70000"),
            (
                vec![51831, 51830],
                "peer_lane_ports[0] 51831 is not peer_port 51830",
            ),
            (vec![51830; 65], "at most 64"),
            (
                vec![51830, 51831, 51830],
                "peer_lane_ports[2] 51830 is named twice",
            ),
        ] {
            req.destination = wg(ports);
            let e = parse(&req).map(|_| ()).unwrap_err();
            assert_eq!(e.code, tonic::Code::InvalidArgument);
            assert!(e.message.contains(says), "{}", e.message);
        }
    }
}
