//! What the control plane programs: ports and cross-connects.
//!
//! A *port* is a pod-side device the forwarder opened (a TUN for IP payload,
//! a TAP for Ethernet payload), named by a small integer the forwarder picks
//! ([`PortId`], typically the index of its fd table). A *cross-connect*
//! joins two ends with an MTU, a payload kind, a service chain and counters:
//! side A is always a local pod port; side B is either another local pod port
//! (same node, no encryption) or a WireGuard session to another node.
//!
//! These types are plain data. The forwarder converts the manager's protobuf
//! into them at its one `TryFrom` boundary; [`crate::Dataplane`] validates
//! them when they are programmed and returns [`ConfigError`]s.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::packet::MacAddr;
use crate::wg::WgPeer;

/// A pod-side port: a handle chosen by the caller, used as an index. Keep
/// them small and dense (below [`crate::DataplaneConfig::max_ports`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u32);

impl PortId {
    #[inline]
    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }
}

impl core::fmt::Display for PortId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "port#{}", self.0)
    }
}

/// What kind of device a port is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortKind {
    /// A TUN: reads and writes bare IP packets.
    Tun,
    /// A TAP: reads and writes Ethernet frames. The data plane plays the
    /// pod's one neighbor (its peer) at layer 2.
    Tap(TapConfig),
}

/// Layer-2 identity of a TAP port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TapConfig {
    /// The MAC the data plane answers ARP/ND with and sends frames from: the
    /// peer's MAC as the pod sees it (NSM's `EthernetContext.dst_mac`).
    pub peer_mac: MacAddr,
    /// The pod interface's own MAC, the destination of frames sent to it.
    /// `None`: learned from the first frame the pod sends (broadcast until
    /// then).
    pub pod_mac: Option<MacAddr>,
}

/// The payload a connection carries (NSM's `payload`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Payload {
    /// IP packets; pod ports are TUNs.
    Ip,
    /// Ethernet frames; pod ports are TAPs. Only IP (and the ARP/ND needed
    /// to reach the peer) crosses the connection.
    Ethernet,
}

impl core::fmt::Display for Payload {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Payload::Ip => "IP",
            Payload::Ethernet => "ETHERNET",
        })
    }
}

/// A local pod's end of a cross-connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodEnd {
    /// The pod's device.
    pub port: PortId,
    /// The IPv4 address of the other end of the connection, as the pod sees
    /// it: answered in proxy ARP and used as the source of ICMP errors.
    pub peer_ipv4: Option<Ipv4Addr>,
    /// The IPv6 address of the other end: answered in proxy ND and used as
    /// the source of ICMPv6 errors.
    pub peer_ipv6: Option<Ipv6Addr>,
}

impl PodEnd {
    /// An end with no peer addresses (no proxy ARP/ND; ICMP errors come from
    /// the offending packet's destination).
    pub fn new(port: PortId) -> Self {
        PodEnd {
            port,
            peer_ipv4: None,
            peer_ipv6: None,
        }
    }
}

/// Side B of a cross-connect.
#[derive(Clone, Debug)]
pub enum FarEnd {
    /// Another pod on this node: packets are forwarded without encryption.
    Pod(PodEnd),
    /// A WireGuard session to another node.
    Wireguard(WgPeer),
}

/// Everything needed to program one cross-connect.
#[derive(Clone, Debug)]
pub struct XconnSpec {
    /// What the connection carries; must match the pod ports' kinds.
    pub payload: Payload,
    /// Path MTU: the largest IP packet (without any L2 header) that may cross
    /// the connection. For WireGuard, the underlay MTU minus 60 (IPv4
    /// underlay) or 80 (IPv6 underlay).
    pub mtu: u16,
    /// Side A: the local pod.
    pub a: PodEnd,
    /// Side B: another local pod or a WireGuard peer.
    pub b: FarEnd,
}

/// Smallest MTU accepted: the datagram size every IPv4 host must accept
/// (RFC 791). Below 1280 a connection cannot carry full-size IPv6.
pub const MIN_MTU: u16 = 576;

/// Which side of a cross-connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    A,
    B,
}

impl Side {
    #[inline]
    pub(crate) fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// Programming a port or cross-connect failed; nothing was changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The port id is not below `max_ports`.
    #[error("{0} is out of range (max_ports is {1})")]
    PortOutOfRange(PortId, u32),
    /// `add_port` for an id in use.
    #[error("{0} is already registered")]
    PortExists(PortId),
    /// The port was never added.
    #[error("{0} is not registered")]
    UnknownPort(PortId),
    /// The port already belongs to another cross-connect.
    #[error("{port} is already used by cross-connect {by}")]
    PortInUse {
        /// The port.
        port: PortId,
        /// The cross-connect holding it.
        by: String,
    },
    /// `remove_port` while a cross-connect uses the port.
    #[error("{port} is still attached to cross-connect {by}")]
    PortAttached {
        /// The port.
        port: PortId,
        /// The cross-connect holding it.
        by: String,
    },
    /// Both sides name the same port.
    #[error("both sides use {0}")]
    SamePort(PortId),
    /// A TUN port on an Ethernet connection or a TAP port on an IP one.
    #[error("{port} is a {kind} device but the payload is {payload}")]
    PayloadMismatch {
        /// The port.
        port: PortId,
        /// "TUN" or "TAP".
        kind: &'static str,
        /// The connection's payload.
        payload: Payload,
    },
    /// MTU below [`MIN_MTU`].
    #[error("MTU {0} is below the minimum of {MIN_MTU}")]
    InvalidMtu(u16),
    /// Every WireGuard session slot is in use.
    #[error("no free WireGuard session slot (max_sessions is {0})")]
    TooManySessions(usize),
    /// Another cross-connect already uses this local static key, so
    /// handshake initiations could not be told apart.
    #[error("local WireGuard public key is already used by cross-connect {0}")]
    DuplicateLocalKey(String),
    /// No cross-connect has this id.
    #[error("no such cross-connect")]
    UnknownXconn,
}

/// A cross-connect operation failed; carries the connection id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cross-connect {id}: {source}")]
pub struct XconnError {
    /// The connection id given to the operation.
    pub id: String,
    /// What was wrong.
    #[source]
    pub source: ConfigError,
}

impl XconnError {
    pub(crate) fn new(id: &str, source: ConfigError) -> Self {
        XconnError {
            id: id.to_owned(),
            source,
        }
    }
}
