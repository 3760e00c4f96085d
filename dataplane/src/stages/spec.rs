//! Typed chain specs: what each built-in function is configured with, how
//! a spec is checked ([`ChainSpec::validate`]) and how it becomes a running
//! [`Chain`] ([`build`]).
//!
//! These are plain Rust values with no serde: the forwarder converts the
//! manager's protobuf into them at its one `TryFrom` boundary, and this
//! module is where their meaning is pinned down. Every field says its unit
//! and default.
//!
//! # Why build once
//! [`build`] validates, allocates every table and ring the stages will ever
//! use (flow tables, classifier indexes, mirror slots), and type-erases the
//! result once: the stages sit in one `Vec` of a concrete enum behind a
//! single `Box<dyn Stage>`, so a packet pays one indirect call for the whole
//! chain and a jump per stage, and never an allocation. What the control
//! plane keeps is a list of [`StageHandle`]s, one per function, to read
//! counters from any thread (and, for `mirror`, to drain copies).
//!
//! Invalid input is rejected with a [`SpecError`] naming the element
//! (`chain[1] (ratelimit): rate must be > 0`); the caller keeps the chain it
//! had.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::packet::IpPacket;
use crate::stage::{Chain, Direction, Stage, StageCtx, Verdict};
use crate::stages::acl::{AclHandle, AclStage};
use crate::stages::counter::{CounterHandle, CounterStage};
use crate::stages::fault::{FaultHandle, FaultStage};
use crate::stages::flow::{Fields, MAX_CAPACITY, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use crate::stages::flowlog::{FlowLogReader, FlowLogSpec, FlowLogStage};
use crate::stages::mirror::{MirrorHandle, MirrorReader, MirrorStage};
use crate::stages::nat44::{Nat44Handle, Nat44Stage};
use crate::stages::ratelimit::{RateLimitHandle, RateLimitStage};

/// Most rules one `acl` may have.
pub const MAX_ACL_RULES: usize = 100_000;
/// Largest `mirror` ring, in slots.
pub const MAX_MIRROR_SLOTS: usize = 65_536;
/// Largest `mirror` ring, in bytes (`slots * snaplen`): 256 MiB.
pub const MAX_MIRROR_BYTES: usize = 256 << 20;

/// The built-in functions of one connection's chain, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChainSpec {
    /// Run in this order; the first `Drop` ends a packet's trip.
    pub functions: Vec<ChainElement>,
}

/// One function of a chain and the packets it applies to.
///
/// A packet the selector does not match skips the function entirely: it
/// passes on to the next element untouched, is not counted by this one and
/// leaves its state (buckets, flow tables, rings) alone. Build one with
/// `FunctionSpec::into()` (every packet) or [`FunctionSpec::when`].
#[derive(Clone, Debug, PartialEq)]
pub struct ChainElement {
    /// What to do.
    pub function: FunctionSpec,
    /// Which packets (default `None`: every packet). Same semantics as an
    /// ACL rule's match: a port range never matches ICMP or a later
    /// fragment. A `fault` with a selector may not have a `delay` (the
    /// forwarder delays whole directions, not selected packets).
    pub selector: Option<FlowMatch>,
}

impl From<Vec<FunctionSpec>> for ChainSpec {
    /// A chain of `functions`, each for every packet.
    fn from(functions: Vec<FunctionSpec>) -> Self {
        ChainSpec {
            functions: functions.into_iter().map(ChainElement::from).collect(),
        }
    }
}

impl From<FunctionSpec> for ChainElement {
    /// The function for every packet.
    fn from(function: FunctionSpec) -> Self {
        ChainElement {
            function,
            selector: None,
        }
    }
}

/// One built-in function.
#[derive(Clone, Debug, PartialEq)]
pub enum FunctionSpec {
    /// Firewall, see [`AclSpec`].
    Acl(AclSpec),
    /// Token-bucket shaper, see [`RateLimitSpec`].
    RateLimit(RateLimitSpec),
    /// Source NAT, see [`Nat44Spec`].
    Nat44(Nat44Spec),
    /// Packet copies, see [`MirrorSpec`].
    Mirror(MirrorSpec),
    /// Packet and byte counts at this point of the chain.
    Counter,
    /// Fault injection, see [`FaultSpec`].
    Fault(FaultSpec),
}

impl FunctionSpec {
    /// The function's name in error messages and status.
    pub fn name(&self) -> &'static str {
        match self {
            FunctionSpec::Acl(_) => "acl",
            FunctionSpec::RateLimit(_) => "ratelimit",
            FunctionSpec::Nat44(_) => "nat44",
            FunctionSpec::Mirror(_) => "mirror",
            FunctionSpec::Counter => "counter",
            FunctionSpec::Fault(_) => "fault",
        }
    }

    /// This function, only for packets matching `selector`.
    pub fn when(self, selector: FlowMatch) -> ChainElement {
        ChainElement {
            function: self,
            selector: Some(selector),
        }
    }
}

// --- matching ----------------------------------------------------------------

/// Upper-layer protocol a rule matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Proto {
    /// Any protocol.
    #[default]
    Any,
    /// ICMP (IPv4, protocol 1). Does not match ICMPv6.
    Icmp,
    /// ICMPv6 (protocol 58).
    Icmpv6,
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
}

impl Proto {
    /// The IP protocol number, `None` for [`Proto::Any`].
    pub fn number(self) -> Option<u8> {
        match self {
            Proto::Any => None,
            Proto::Icmp => Some(PROTO_ICMP),
            Proto::Icmpv6 => Some(PROTO_ICMPV6),
            Proto::Tcp => Some(PROTO_TCP),
            Proto::Udp => Some(PROTO_UDP),
        }
    }
}

/// An address prefix, IPv4 or IPv6, without host bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    /// The network address.
    pub addr: IpAddr,
    /// Prefix length in bits (0..=32 for IPv4, 0..=128 for IPv6).
    pub len: u8,
}

impl Prefix {
    /// A prefix; checked by [`Prefix::check`] (and by `validate`).
    pub fn new(addr: IpAddr, len: u8) -> Self {
        Prefix { addr, len }
    }

    /// True for an IPv6 prefix.
    pub fn is_v6(&self) -> bool {
        self.addr.is_ipv6()
    }

    /// The length is within the family's bits and no host bit is set.
    pub fn check(&self) -> Result<(), SpecErrorKind> {
        let max = if self.is_v6() { 128 } else { 32 };
        if self.len > max {
            return Err(SpecErrorKind::PrefixLength { prefix: *self, max });
        }
        if self.bits() & !mask128(self.len) != 0 {
            return Err(SpecErrorKind::HostBits { prefix: *self });
        }
        Ok(())
    }

    /// The address as used by the classifier (IPv4 in the top 32 bits).
    pub(crate) fn bits(&self) -> u128 {
        match self.addr {
            IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
            IpAddr::V6(a) => u128::from(a),
        }
    }

    /// Whether `addr` (classifier form, same family) is inside.
    #[inline]
    pub(crate) fn contains_bits(&self, addr: u128) -> bool {
        (addr ^ self.bits()) & mask128(self.len) == 0
    }
}

/// The top `len` bits set (len clamped to 128).
#[inline]
pub(crate) fn mask128(len: u8) -> u128 {
    match len {
        0 => 0,
        l if l >= 128 => u128::MAX,
        l => u128::MAX << (128 - u32::from(l)),
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Why a prefix string did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a prefix (expected ADDR/LEN)")]
pub struct PrefixParseError;

impl FromStr for Prefix {
    type Err = PrefixParseError;

    /// `10.0.0.0/8`, `fd00::/64`, or a bare address (a host prefix).
    /// Only the syntax is checked here; `check` does the rest.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((a, l)) => Ok(Prefix {
                addr: a.parse().map_err(|_| PrefixParseError)?,
                len: l.parse().map_err(|_| PrefixParseError)?,
            }),
            None => {
                let addr: IpAddr = s.parse().map_err(|_| PrefixParseError)?;
                Ok(Prefix {
                    addr,
                    len: if addr.is_ipv6() { 128 } else { 32 },
                })
            }
        }
    }
}

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port (>= `lo`).
    pub hi: u16,
}

impl PortRange {
    /// One port.
    pub fn single(port: u16) -> Self {
        PortRange { lo: port, hi: port }
    }

    /// `lo..=hi`; checked by `validate`.
    pub fn new(lo: u16, hi: u16) -> Self {
        PortRange { lo, hi }
    }

    #[inline]
    fn contains(&self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

/// Which packets a rule (or a mirror filter) applies to. Every field left
/// at its default matches everything; set fields must all match.
///
/// Port ranges match only TCP and UDP packets that carry their header (not
/// later fragments): a rule with a port range never matches ICMP.
/// A prefix restricts the rule to its address family.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowMatch {
    /// Protocol (default any).
    pub proto: Proto,
    /// Source prefix (default any).
    pub src: Option<Prefix>,
    /// Destination prefix (default any).
    pub dst: Option<Prefix>,
    /// Source port range (default any; needs TCP/UDP).
    pub src_ports: Option<PortRange>,
    /// Destination port range (default any; needs TCP/UDP).
    pub dst_ports: Option<PortRange>,
    /// Direction across the connection (default both).
    pub direction: Option<Direction>,
}

impl FlowMatch {
    /// Checks prefixes, port ranges and their consistency with the protocol.
    pub fn check(&self) -> Result<(), SpecErrorKind> {
        for p in [self.src, self.dst].into_iter().flatten() {
            p.check()?;
        }
        if let (Some(s), Some(d)) = (self.src, self.dst)
            && s.is_v6() != d.is_v6()
        {
            return Err(SpecErrorKind::MixedFamilies);
        }
        for r in [self.src_ports, self.dst_ports].into_iter().flatten() {
            if r.lo > r.hi {
                return Err(SpecErrorKind::PortRange { range: r });
            }
        }
        let has_ports = self.src_ports.is_some() || self.dst_ports.is_some();
        if has_ports && matches!(self.proto, Proto::Icmp | Proto::Icmpv6) {
            return Err(SpecErrorKind::PortsWithoutL4);
        }
        let v6 = self.family_v6();
        match (self.proto, v6) {
            (Proto::Icmp, Some(true)) | (Proto::Icmpv6, Some(false)) => {
                Err(SpecErrorKind::ProtoFamily)
            }
            _ => Ok(()),
        }
    }

    /// `Some(true)` if the prefixes restrict to IPv6, `Some(false)` to IPv4.
    pub(crate) fn family_v6(&self) -> Option<bool> {
        self.src.or(self.dst).map(|p| p.is_v6())
    }

    /// The reference semantics, field by field (also what the indexed
    /// classifier must agree with).
    #[inline]
    pub(crate) fn matches(&self, f: &Fields, dir: Direction) -> bool {
        if self.direction.is_some_and(|d| d != dir) {
            return false;
        }
        if self.proto.number().is_some_and(|n| n != f.proto) {
            return false;
        }
        if self.family_v6().is_some_and(|v6| v6 != f.v6) {
            return false;
        }
        if self.src.is_some_and(|p| !p.contains_bits(f.src))
            || self.dst.is_some_and(|p| !p.contains_bits(f.dst))
        {
            return false;
        }
        if self.src_ports.is_some() || self.dst_ports.is_some() {
            let Some((sp, dp)) = f.ports else {
                return false;
            };
            if self.src_ports.is_some_and(|r| !r.contains(sp))
                || self.dst_ports.is_some_and(|r| !r.contains(dp))
            {
                return false;
            }
        }
        true
    }
}

// --- functions -------------------------------------------------------------------

/// What an ACL does with a packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AclAction {
    /// Pass it on.
    Allow,
    /// Drop it ([`crate::DropReason::AclDenied`]).
    #[default]
    Deny,
}

/// One ACL rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AclRule {
    /// Allow or deny.
    pub action: AclAction,
    /// Which packets.
    pub matches: FlowMatch,
}

/// `acl`: ordered rules, first match wins, else `default`.
#[derive(Clone, Debug, PartialEq)]
pub struct AclSpec {
    /// The rules, in priority order (at most [`MAX_ACL_RULES`]).
    pub rules: Vec<AclRule>,
    /// When no rule matches (default deny).
    pub default: AclAction,
    /// Track flows: once a packet is allowed, the rest of its flow passes
    /// both ways (replies too) without consulting the rules (default true).
    pub stateful: bool,
    /// Flow-table size when stateful, in flows (default 65,536; at most
    /// 2^22). When it is full, new flows are dropped
    /// ([`crate::DropReason::ConntrackFull`]).
    pub conntrack_capacity: usize,
    /// A flow is forgotten after this long without packets (default 120 s).
    pub idle_timeout: Duration,
}

impl Default for AclSpec {
    fn default() -> Self {
        AclSpec {
            rules: Vec::new(),
            default: AclAction::Deny,
            stateful: true,
            conntrack_capacity: 65_536,
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// `ratelimit`: a token-bucket shaper per direction of the connection.
///
/// Packets that find their size in the bucket pass at once; the others
/// wait in a FIFO per direction and leave at the rate, and only when that
/// queue is full ([`RateLimitSpec::queue_bytes`],
/// [`RateLimitSpec::QUEUE_PACKETS`]) are packets dropped
/// ([`crate::DropReason::RateLimited`]). See [`crate::stages::ratelimit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitSpec {
    /// Sustained rate in bits per second of IP packet (> 0).
    pub rate_bps: u64,
    /// Bucket depth in bytes: what may leave back to back, faster than the
    /// rate. Default [`RateLimitSpec::default_burst`]: 10 ms at the rate,
    /// at least 18,000 bytes (two 9000-byte packets). Must be at least
    /// 1,500 bytes, or full-size packets could never pass.
    pub burst_bytes: Option<u64>,
    /// Limit only this direction (default: both, each its own bucket and
    /// queue).
    pub direction: Option<Direction>,
}

impl RateLimitSpec {
    /// Smallest burst accepted, in bytes.
    pub const MIN_BURST: u64 = 1_500;

    /// Most packets waiting in one direction's queue. The forwarder sizes
    /// its holding FIFOs from this.
    pub const QUEUE_PACKETS: usize = 1_024;

    /// The longest a packet waits in the queue, unless the burst is longer
    /// at the rate (see [`RateLimitSpec::queue_bytes`]).
    pub const QUEUE_TIME: Duration = Duration::from_millis(50);

    /// `max(rate * 10 ms, 18,000 bytes)`: bursts of a few packets, like a
    /// TCP sender's, pass without delay. The burst sets how bursty the
    /// output may be, not whether TCP reaches the rate: what exceeds the
    /// bucket waits in the queue instead of being dropped, so a TCP flow
    /// settles at the rate with any burst (measured within 10% of
    /// 50 Mbit/s with a 64 KiB burst).
    pub fn default_burst(rate_bps: u64) -> u64 {
        (rate_bps / 8 / 100).max(18_000)
    }

    /// The burst in effect.
    pub fn burst(&self) -> u64 {
        self.burst_bytes
            .unwrap_or_else(|| Self::default_burst(self.rate_bps))
    }

    /// Bytes one direction's queue holds at most: [`Self::QUEUE_TIME`] at
    /// the rate, or the burst if that is more. (And at most
    /// [`Self::QUEUE_PACKETS`] packets.) A full queue drops.
    pub fn queue_bytes(&self) -> u64 {
        let ms = u64::try_from(Self::QUEUE_TIME.as_millis()).unwrap_or(u64::MAX);
        ((self.rate_bps / 8).saturating_mul(ms) / 1000).max(self.burst())
    }
}

/// `nat44`: source NAT of IPv4 packets going `outbound` to `address`.
///
/// TCP and UDP source ports are mapped into `ports`, ICMP echo ids too;
/// replies (the other direction) are translated back. IPv6 passes untouched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nat44Spec {
    /// The translated source address (not unspecified, broadcast or
    /// multicast).
    pub address: std::net::Ipv4Addr,
    /// Ports (and ICMP ids) to map to (default 1024-65535; not 0).
    pub ports: PortRange,
    /// The direction whose sources are translated (default A to B: the
    /// local pod's traffic).
    pub outbound: Direction,
    /// Mappings kept at most (default 65,536; at most 2^22).
    pub capacity: usize,
    /// A mapping is forgotten after this long without packets (default
    /// 120 s).
    pub idle_timeout: Duration,
}

impl Nat44Spec {
    /// A spec with the defaults for everything but the address.
    pub fn new(address: std::net::Ipv4Addr) -> Self {
        Nat44Spec {
            address,
            ports: PortRange::new(1024, 65535),
            outbound: Direction::AToB,
            capacity: 65_536,
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// `mirror`: copies of matching packets into a ring the forwarder drains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorSpec {
    /// Which packets to copy (default all).
    pub filter: FlowMatch,
    /// Bytes copied per packet at most (default 9,216: a jumbo frame;
    /// 1..=65,535).
    pub snaplen: u16,
    /// Ring size in packets (default 512; 1..=65,536). When full, copies
    /// are dropped and counted; the packet itself always passes. The ring
    /// takes `slots * snaplen` bytes (at most [`MAX_MIRROR_BYTES`]),
    /// allocated at build.
    pub slots: usize,
}

impl Default for MirrorSpec {
    fn default() -> Self {
        MirrorSpec {
            filter: FlowMatch::default(),
            snaplen: 9216,
            slots: 512,
        }
    }
}

/// `fault`: loss and corruption injection for resilience tests.
///
/// Delay is not done by the stage: the packet's buffer belongs to the
/// caller, and holding packets would need a buffer pool and a wake-up the
/// data plane does not have. `delay` is carried in the spec and
/// [`FaultHandle::delay`] so that the forwarder applies it to every packet
/// of the direction, where it owns time and queues, with a
/// [`crate::stages::DelayLine`]. (Which is why a `fault` with a selector
/// may not have a delay.)
#[derive(Clone, Debug, PartialEq)]
pub struct FaultSpec {
    /// Percentage of packets to drop, 0..=100 (default 0).
    pub drop_percent: f64,
    /// Percentage of packets (of those not dropped) with one byte after
    /// the IP header flipped, 0..=100 (default 0).
    pub corrupt_percent: f64,
    /// Delay to add, applied by the forwarder (default 0).
    pub delay: Duration,
    /// Only this direction (default both).
    pub direction: Option<Direction>,
    /// PRNG seed: equal seeds give equal decisions for equal traffic.
    pub seed: u64,
}

impl Default for FaultSpec {
    fn default() -> Self {
        FaultSpec {
            drop_percent: 0.0,
            corrupt_percent: 0.0,
            delay: Duration::ZERO,
            direction: None,
            seed: 0x6e73_6d2d_7273,
        }
    }
}

// --- errors ----------------------------------------------------------------------

/// A chain spec element that cannot be built.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("chain[{index}] ({function}): {kind}")]
pub struct SpecError {
    /// Position in [`ChainSpec::functions`].
    pub index: usize,
    /// The function's name.
    pub function: &'static str,
    /// What is wrong.
    pub kind: SpecErrorKind,
}

/// What is wrong with one function's spec.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecErrorKind {
    /// An ACL rule is bad.
    #[error("rule[{rule}]: {kind}")]
    Rule {
        /// Position in [`AclSpec::rules`].
        rule: usize,
        /// What is wrong with it.
        kind: Box<SpecErrorKind>,
    },
    /// The mirror filter is bad.
    #[error("filter: {0}")]
    Filter(Box<SpecErrorKind>),
    /// The element's selector is bad.
    #[error("selector: {0}")]
    Selector(Box<SpecErrorKind>),
    /// A `fault` delay with a selector: the delay is applied by the
    /// forwarder to a whole direction, it cannot follow a selector.
    #[error("selector: a fault with a selector cannot have a delay")]
    SelectorWithDelay,
    /// Too many ACL rules.
    #[error("{count} rules, at most {max}")]
    TooManyRules {
        /// Given.
        count: usize,
        /// Allowed.
        max: usize,
    },
    /// Prefix longer than its family allows.
    #[error("prefix {prefix} is longer than {max} bits")]
    PrefixLength {
        /// The prefix.
        prefix: Prefix,
        /// Family maximum.
        max: u8,
    },
    /// Address bits set past the prefix length.
    #[error("prefix {prefix} has host bits set")]
    HostBits {
        /// The prefix.
        prefix: Prefix,
    },
    /// IPv4 source with IPv6 destination or the reverse.
    #[error("source and destination prefixes are of different families")]
    MixedFamilies,
    /// `icmp` with an IPv6 prefix, `icmpv6` with an IPv4 one.
    #[error("protocol does not exist in the prefixes' address family")]
    ProtoFamily,
    /// lo > hi.
    #[error("port range {range} has lo > hi")]
    PortRange {
        /// The range.
        range: PortRange,
    },
    /// A NAT port range including port 0.
    #[error("port range {range} includes port 0")]
    PortZero {
        /// The range.
        range: PortRange,
    },
    /// Port ranges with `icmp`/`icmpv6`.
    #[error("port ranges need proto tcp, udp or any")]
    PortsWithoutL4,
    /// A rate of zero.
    #[error("rate must be > 0")]
    ZeroRate,
    /// A burst too small for a full-size packet.
    #[error("burst {burst} bytes is below the minimum of {min}")]
    BurstTooSmall {
        /// Given.
        burst: u64,
        /// Minimum.
        min: u64,
    },
    /// A table or ring size out of bounds.
    #[error("{field} {value} is outside 1..={max}")]
    Size {
        /// Which field.
        field: &'static str,
        /// Given.
        value: usize,
        /// Maximum.
        max: usize,
    },
    /// A zero timeout.
    #[error("{field} must be > 0")]
    ZeroTimeout {
        /// Which field.
        field: &'static str,
    },
    /// A percentage outside 0..=100 (or NaN).
    #[error("{field} {value} is outside 0..=100")]
    Percent {
        /// Which field.
        field: &'static str,
        /// Given.
        value: f64,
    },
    /// A NAT address that cannot be a source.
    #[error("address {0} cannot be a source address")]
    NatAddress(std::net::Ipv4Addr),
    /// A zero snaplen.
    #[error("snaplen must be > 0")]
    ZeroSnaplen,
}

fn size(field: &'static str, value: usize, max: usize) -> Result<(), SpecErrorKind> {
    if (1..=max).contains(&value) {
        Ok(())
    } else {
        Err(SpecErrorKind::Size { field, value, max })
    }
}

fn timeout(field: &'static str, d: Duration) -> Result<(), SpecErrorKind> {
    if d.is_zero() {
        Err(SpecErrorKind::ZeroTimeout { field })
    } else {
        Ok(())
    }
}

fn percent(field: &'static str, value: f64) -> Result<(), SpecErrorKind> {
    if (0.0..=100.0).contains(&value) {
        Ok(())
    } else {
        Err(SpecErrorKind::Percent { field, value })
    }
}

impl FunctionSpec {
    /// Checks this function's spec alone.
    pub fn validate(&self) -> Result<(), SpecErrorKind> {
        match self {
            FunctionSpec::Acl(a) => {
                if a.rules.len() > MAX_ACL_RULES {
                    return Err(SpecErrorKind::TooManyRules {
                        count: a.rules.len(),
                        max: MAX_ACL_RULES,
                    });
                }
                for (i, r) in a.rules.iter().enumerate() {
                    r.matches.check().map_err(|kind| SpecErrorKind::Rule {
                        rule: i,
                        kind: Box::new(kind),
                    })?;
                }
                if a.stateful {
                    size("conntrack_capacity", a.conntrack_capacity, MAX_CAPACITY)?;
                    timeout("idle_timeout", a.idle_timeout)?;
                }
                Ok(())
            }
            FunctionSpec::RateLimit(r) => {
                if r.rate_bps == 0 {
                    return Err(SpecErrorKind::ZeroRate);
                }
                if r.burst() < RateLimitSpec::MIN_BURST {
                    return Err(SpecErrorKind::BurstTooSmall {
                        burst: r.burst(),
                        min: RateLimitSpec::MIN_BURST,
                    });
                }
                Ok(())
            }
            FunctionSpec::Nat44(n) => {
                let a = n.address;
                if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
                    return Err(SpecErrorKind::NatAddress(a));
                }
                if n.ports.lo > n.ports.hi {
                    return Err(SpecErrorKind::PortRange { range: n.ports });
                }
                if n.ports.lo == 0 {
                    return Err(SpecErrorKind::PortZero { range: n.ports });
                }
                size("capacity", n.capacity, MAX_CAPACITY)?;
                timeout("idle_timeout", n.idle_timeout)
            }
            FunctionSpec::Mirror(m) => {
                m.filter
                    .check()
                    .map_err(|k| SpecErrorKind::Filter(Box::new(k)))?;
                if m.snaplen == 0 {
                    return Err(SpecErrorKind::ZeroSnaplen);
                }
                size("slots", m.slots, MAX_MIRROR_SLOTS)?;
                let bytes = m.slots.saturating_mul(usize::from(m.snaplen));
                size("slots * snaplen", bytes, MAX_MIRROR_BYTES)
            }
            FunctionSpec::Counter => Ok(()),
            FunctionSpec::Fault(f) => {
                percent("drop_percent", f.drop_percent)?;
                percent("corrupt_percent", f.corrupt_percent)
            }
        }
    }
}

impl ChainElement {
    /// Checks the selector, then the function.
    pub fn validate(&self) -> Result<(), SpecErrorKind> {
        if let Some(sel) = &self.selector {
            sel.check()
                .map_err(|k| SpecErrorKind::Selector(Box::new(k)))?;
            if let FunctionSpec::Fault(f) = &self.function
                && !f.delay.is_zero()
            {
                return Err(SpecErrorKind::SelectorWithDelay);
            }
        }
        self.function.validate()
    }
}

impl ChainSpec {
    /// Checks every function; the first error names its element.
    pub fn validate(&self) -> Result<(), SpecError> {
        for (index, e) in self.functions.iter().enumerate() {
            e.validate().map_err(|kind| SpecError {
                index,
                function: e.function.name(),
                kind,
            })?;
        }
        Ok(())
    }
}

// --- building ----------------------------------------------------------------

/// A function's control-plane side: counters to read from any thread, and
/// for `mirror` the ring to drain.
#[derive(Debug)]
pub enum StageHandle {
    /// `acl` counters.
    Acl(AclHandle),
    /// `ratelimit` counters.
    RateLimit(RateLimitHandle),
    /// `nat44` counters.
    Nat44(Nat44Handle),
    /// `mirror` counters and the ring's consumer end.
    Mirror(MirrorHandle, MirrorReader),
    /// `counter` counts.
    Counter(CounterHandle),
    /// `fault` counters (and the delay the forwarder applies).
    Fault(FaultHandle),
}

impl StageHandle {
    /// The function's name.
    pub fn name(&self) -> &'static str {
        match self {
            StageHandle::Acl(_) => "acl",
            StageHandle::RateLimit(_) => "ratelimit",
            StageHandle::Nat44(_) => "nat44",
            StageHandle::Mirror(..) => "mirror",
            StageHandle::Counter(_) => "counter",
            StageHandle::Fault(_) => "fault",
        }
    }
}

/// What [`build`] returns: the chain for [`crate::Dataplane::set_chain`] and
/// one handle per function, in spec order.
#[derive(Debug)]
pub struct BuiltChain {
    /// Ready to install.
    pub chain: Chain,
    /// `handles[i]` belongs to `spec.functions[i]`.
    pub handles: Vec<StageHandle>,
}

/// One built-in stage: the chain's stages are a `Vec` of this, so dispatch
/// is a `match`, not a pointer per stage.
#[derive(Debug)]
enum Builtin {
    Acl(AclStage),
    RateLimit(RateLimitStage),
    Nat44(Nat44Stage),
    Mirror(MirrorStage),
    Counter(CounterStage),
    Fault(FaultStage),
}

/// One element as built: the packets it applies to (`None`: all) and its
/// stage.
#[derive(Debug)]
struct Element {
    selector: Option<FlowMatch>,
    stage: Builtin,
}

#[derive(Debug)]
struct Builtins(Vec<Element>, Option<FlowLogStage>);

impl Stage for Builtins {
    /// Runs the elements in order. The packet's [`Fields`] are read once,
    /// when the first selector or stage needs them, and shared by the
    /// selectors, `acl`, `nat44` and `mirror`; they are read again only
    /// after a stage that may have rewritten them (`nat44` after a
    /// translation, `fault` after a corruption).
    #[inline]
    fn process(&mut self, ctx: &StageCtx, packet: &mut IpPacket<'_>) -> Verdict {
        let mut fields: Option<Fields> = None;
        let mut verdict = Verdict::Pass;
        // With a flow log: the tuple as the packet entered, and each
        // function's answer as a bit (function i = bit i; none past 32).
        let logged = self
            .1
            .as_ref()
            .map(|_| *Fields::cached(&mut fields, packet));
        let (mut bit, mut passed, mut held) = (1u32, 0u32, 0u32);
        for e in self.0.iter_mut() {
            let this = bit;
            bit <<= 1;
            if let Some(sel) = &e.selector
                && !sel.matches(Fields::cached(&mut fields, packet), ctx.direction)
            {
                continue;
            }
            let v = match &mut e.stage {
                Builtin::Acl(s) => {
                    let f = *Fields::cached(&mut fields, packet);
                    s.run(ctx, packet, &f)
                }
                Builtin::RateLimit(s) => s.process(ctx, packet),
                Builtin::Nat44(s) => s.run(ctx, packet, &mut fields),
                Builtin::Mirror(s) => s.run(ctx, packet, &mut fields),
                Builtin::Counter(s) => s.process(ctx, packet),
                Builtin::Fault(s) => {
                    let v = s.process(ctx, packet);
                    fields = None;
                    v
                }
            };
            match v {
                Verdict::Pass => passed |= this,
                Verdict::Hold(_) => held |= this,
                Verdict::Drop(_) => {}
            }
            verdict = verdict.and(v);
            if let Verdict::Drop(r) = verdict {
                if let (Some(log), Some(f)) = (&mut self.1, &logged) {
                    let len = packet.bytes().len();
                    log.observe(ctx, f, len, (passed, held, this), Some(r));
                }
                return Verdict::Drop(r);
            }
        }
        if let (Some(log), Some(f)) = (&mut self.1, &logged) {
            log.observe(ctx, f, packet.bytes().len(), (passed, held, 0), None);
        }
        verdict
    }

    fn poll(&mut self, now: Instant) {
        if let Some(log) = &mut self.1 {
            log.poll(now);
        }
    }

    fn name(&self) -> &'static str {
        "builtin"
    }
}

/// Validates `spec` and builds its chain: all allocation happens here.
/// `now` is the mirror ring's time origin (records carry `Instant`s).
pub fn build(spec: &ChainSpec, now: Instant) -> Result<BuiltChain, SpecError> {
    build_with_flow_log(spec, now, None).map(|(b, _)| b)
}

/// [`build`], and with `flow_log` a flow log run after the functions (even
/// when there are none) and the reader of its records (see [`super::flowlog`];
/// `now` is also its records' time origin).
pub fn build_with_flow_log(
    spec: &ChainSpec,
    now: Instant,
    flow_log: Option<&FlowLogSpec>,
) -> Result<(BuiltChain, Option<FlowLogReader>), SpecError> {
    spec.validate()?;
    let mut stages = Vec::with_capacity(spec.functions.len());
    let mut handles = Vec::with_capacity(spec.functions.len());
    let mut names = Vec::with_capacity(spec.functions.len());
    for e in &spec.functions {
        names.push(e.function.name());
        let (stage, handle) = match &e.function {
            FunctionSpec::Acl(a) => {
                let (s, h) = AclStage::new(a);
                (Builtin::Acl(s), StageHandle::Acl(h))
            }
            FunctionSpec::RateLimit(r) => {
                let (s, h) = RateLimitStage::new(r);
                (Builtin::RateLimit(s), StageHandle::RateLimit(h))
            }
            FunctionSpec::Nat44(n) => {
                let (s, h) = Nat44Stage::new(n);
                (Builtin::Nat44(s), StageHandle::Nat44(h))
            }
            FunctionSpec::Mirror(m) => {
                let (s, h, r) = MirrorStage::new(m, now);
                (Builtin::Mirror(s), StageHandle::Mirror(h, r))
            }
            FunctionSpec::Counter => {
                let (s, h) = CounterStage::new();
                (Builtin::Counter(s), StageHandle::Counter(h))
            }
            FunctionSpec::Fault(fs) => {
                let (s, h) = FaultStage::new(fs);
                (Builtin::Fault(s), StageHandle::Fault(h))
            }
        };
        // A match-everything selector costs a field read per packet for
        // nothing: drop it.
        let selector = e.selector.clone().filter(|m| *m != FlowMatch::default());
        stages.push(Element { selector, stage });
        handles.push(handle);
    }
    let (log, reader) = match flow_log {
        Some(fl) => {
            let (s, r) = FlowLogStage::new(fl, names.clone(), now);
            (Some(s), Some(r))
        }
        None => (None, None),
    };
    let chain = if stages.is_empty() && log.is_none() {
        Chain::empty()
    } else {
        Chain::with_names(Builtins(stages, log), names)
    };
    Ok((BuiltChain { chain, handles }, reader))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(spec: FunctionSpec) -> String {
        ChainSpec::from(vec![FunctionSpec::Counter, spec])
            .validate()
            .expect_err("invalid")
            .to_string()
    }

    #[test]
    fn errors_name_the_element() {
        assert_eq!(
            err(FunctionSpec::RateLimit(RateLimitSpec {
                rate_bps: 0,
                burst_bytes: None,
                direction: None
            })),
            "chain[1] (ratelimit): rate must be > 0"
        );
        let rule = |m: FlowMatch| AclRule {
            action: AclAction::Allow,
            matches: m,
        };
        let acl = |rules| {
            FunctionSpec::Acl(AclSpec {
                rules,
                ..AclSpec::default()
            })
        };
        assert_eq!(
            err(acl(vec![
                rule(FlowMatch::default()),
                rule(FlowMatch {
                    dst_ports: Some(PortRange::new(90, 80)),
                    ..FlowMatch::default()
                })
            ])),
            "chain[1] (acl): rule[1]: port range 90-80 has lo > hi"
        );
        assert_eq!(
            err(acl(vec![rule(FlowMatch {
                src: Some("10.0.0.1/24".parse().expect("syntax")),
                ..FlowMatch::default()
            })])),
            "chain[1] (acl): rule[0]: prefix 10.0.0.1/24 has host bits set"
        );
        assert_eq!(
            err(acl(vec![rule(FlowMatch {
                dst: Some("fd00::/129".parse().expect("syntax")),
                ..FlowMatch::default()
            })])),
            "chain[1] (acl): rule[0]: prefix fd00::/129 is longer than 128 bits"
        );
        assert_eq!(
            err(acl(vec![rule(FlowMatch {
                proto: Proto::Icmp,
                dst_ports: Some(PortRange::single(1)),
                ..FlowMatch::default()
            })])),
            "chain[1] (acl): rule[0]: port ranges need proto tcp, udp or any"
        );
        assert_eq!(
            err(FunctionSpec::Fault(FaultSpec {
                drop_percent: 101.0,
                ..FaultSpec::default()
            })),
            "chain[1] (fault): drop_percent 101 is outside 0..=100"
        );
        assert!(
            err(FunctionSpec::Fault(FaultSpec {
                corrupt_percent: f64::NAN,
                ..FaultSpec::default()
            }))
            .contains("corrupt_percent NaN")
        );
        let mut nat = Nat44Spec::new([192, 0, 2, 1].into());
        nat.ports = PortRange::new(2000, 1000);
        assert_eq!(
            err(FunctionSpec::Nat44(nat)),
            "chain[1] (nat44): port range 2000-1000 has lo > hi"
        );
        let mut nat = Nat44Spec::new([192, 0, 2, 1].into());
        nat.ports = PortRange::new(0, 1000);
        assert_eq!(
            err(FunctionSpec::Nat44(nat)),
            "chain[1] (nat44): port range 0-1000 includes port 0"
        );
        assert_eq!(
            err(FunctionSpec::Nat44(Nat44Spec::new([0, 0, 0, 0].into()))),
            "chain[1] (nat44): address 0.0.0.0 cannot be a source address"
        );
        assert_eq!(
            err(FunctionSpec::Mirror(MirrorSpec {
                slots: 0,
                ..MirrorSpec::default()
            })),
            "chain[1] (mirror): slots 0 is outside 1..=65536"
        );
        assert!(
            err(FunctionSpec::RateLimit(RateLimitSpec {
                rate_bps: 1,
                burst_bytes: Some(100),
                direction: None
            }))
            .contains("burst 100 bytes")
        );
    }

    #[test]
    fn build_names_and_handles() {
        let spec = ChainSpec::from(vec![
            FunctionSpec::Acl(AclSpec::default()),
            FunctionSpec::RateLimit(RateLimitSpec {
                rate_bps: 50_000_000,
                burst_bytes: None,
                direction: None,
            }),
            FunctionSpec::Counter,
            FunctionSpec::Mirror(MirrorSpec::default()),
            FunctionSpec::Fault(FaultSpec::default()),
            FunctionSpec::Nat44(Nat44Spec::new([192, 0, 2, 1].into())),
        ]);
        let built = build(&spec, Instant::now()).expect("valid");
        assert_eq!(
            built.chain.names(),
            &["acl", "ratelimit", "counter", "mirror", "fault", "nat44"]
        );
        let names: Vec<_> = built.handles.iter().map(StageHandle::name).collect();
        assert_eq!(names, built.chain.names());
        assert!(
            build(&ChainSpec::default(), Instant::now())
                .expect("valid")
                .chain
                .is_empty()
        );
    }

    #[test]
    fn selector_errors_name_the_element() {
        let limit = FunctionSpec::RateLimit(RateLimitSpec {
            rate_bps: 1_000_000,
            burst_bytes: None,
            direction: None,
        });
        let chain = |e: ChainElement| {
            ChainSpec {
                functions: vec![FunctionSpec::Counter.into(), e],
            }
            .validate()
            .expect_err("invalid")
            .to_string()
        };
        assert_eq!(
            chain(limit.clone().when(FlowMatch {
                dst_ports: Some(PortRange::new(90, 80)),
                ..FlowMatch::default()
            })),
            "chain[1] (ratelimit): selector: port range 90-80 has lo > hi"
        );
        assert_eq!(
            chain(FunctionSpec::Counter.when(FlowMatch {
                proto: Proto::Icmpv6,
                src: Some("10.0.0.0/8".parse().expect("syntax")),
                ..FlowMatch::default()
            })),
            "chain[1] (counter): selector: protocol does not exist in the prefixes' address family"
        );
        assert_eq!(
            chain(
                FunctionSpec::Fault(FaultSpec {
                    delay: Duration::from_millis(5),
                    ..FaultSpec::default()
                })
                .when(FlowMatch::default())
            ),
            "chain[1] (fault): selector: a fault with a selector cannot have a delay"
        );
        // The function itself is still checked.
        let zero = FunctionSpec::RateLimit(RateLimitSpec {
            rate_bps: 0,
            burst_bytes: None,
            direction: None,
        });
        assert_eq!(
            chain(zero.when(FlowMatch::default())),
            "chain[1] (ratelimit): rate must be > 0"
        );
        assert!(
            ChainSpec {
                functions: vec![limit.when(FlowMatch {
                    proto: Proto::Tcp,
                    dst_ports: Some(PortRange::single(80)),
                    ..FlowMatch::default()
                })],
            }
            .validate()
            .is_ok()
        );
    }

    fn tcp(dport: u16, len: usize) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, dport, 1, 1000);
        let mut v = Vec::new();
        b.write(&mut v, &vec![0u8; len]).expect("write");
        v
    }

    fn ping() -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .icmpv4_echo_request(7, 1);
        let mut v = Vec::new();
        b.write(&mut v, b"ping").expect("write");
        v
    }

    fn run(chain: &mut Chain, now: Instant, mut pkt: Vec<u8>) -> Verdict {
        let mut p = IpPacket::parse(&mut pkt).expect("valid");
        let ctx = StageCtx {
            now,
            direction: Direction::AToB,
        };
        chain.run(&ctx, &mut p)
    }

    #[test]
    fn selected_functions_skip_other_packets() {
        let web = FlowMatch {
            proto: Proto::Tcp,
            dst_ports: Some(PortRange::single(80)),
            ..FlowMatch::default()
        };
        let spec = ChainSpec {
            functions: vec![
                FunctionSpec::Counter.when(web.clone()),
                FunctionSpec::Acl(AclSpec::default()).when(web.clone()),
                FunctionSpec::Counter.into(),
            ],
        };
        let BuiltChain { mut chain, handles } = build(&spec, Instant::now()).expect("valid");
        let now = Instant::now();
        assert_eq!(run(&mut chain, now, ping()), Verdict::Pass);
        assert_eq!(run(&mut chain, now, tcp(5201, 10)), Verdict::Pass);
        assert_eq!(
            run(&mut chain, now, tcp(80, 10)),
            Verdict::Drop(crate::DropReason::AclDenied)
        );
        let [
            StageHandle::Counter(web_count),
            StageHandle::Acl(acl),
            StageHandle::Counter(all),
        ] = &handles[..]
        else {
            panic!("{handles:?}")
        };
        assert_eq!(web_count.snapshot().a_to_b_packets, 1);
        let a = acl.snapshot();
        assert_eq!((a.denied, a.allowed, a.default_hits), (1, 0, 1));
        assert_eq!(all.snapshot().a_to_b_packets, 2, "the drop ended the trip");
    }

    #[test]
    fn selected_ratelimit_limits_only_its_traffic() {
        let spec = ChainSpec {
            functions: vec![
                FunctionSpec::RateLimit(RateLimitSpec {
                    rate_bps: 8_000, // 1000 bytes/s
                    burst_bytes: Some(2000),
                    direction: None,
                })
                .when(FlowMatch {
                    proto: Proto::Tcp,
                    dst_ports: Some(PortRange::single(80)),
                    ..FlowMatch::default()
                }),
            ],
        };
        let BuiltChain { mut chain, handles } = build(&spec, Instant::now()).expect("valid");
        let now = Instant::now();
        let mut held = 0;
        let mut dropped = 0;
        for _ in 0..10 {
            // 5201 and pings are never held or dropped, however many.
            assert_eq!(run(&mut chain, now, tcp(5201, 1000)), Verdict::Pass);
            assert_eq!(run(&mut chain, now, ping()), Verdict::Pass);
            match run(&mut chain, now, tcp(80, 1000)) {
                Verdict::Pass => {}
                Verdict::Hold(t) => {
                    assert!(t > now);
                    held += 1;
                }
                Verdict::Drop(_) => dropped += 1,
            }
        }
        assert!(held > 0 && dropped > 0, "{held} held, {dropped} dropped");
        let StageHandle::RateLimit(h) = &handles[0] else {
            panic!("{handles:?}")
        };
        let s = h.snapshot().a_to_b;
        assert_eq!(s.passed_packets + s.dropped_packets, 10);
        assert_eq!(s.queued_packets, held);
    }

    #[test]
    fn holds_combine_to_the_latest_and_drops_win() {
        let t = Instant::now();
        let later = t + Duration::from_millis(1);
        assert_eq!(Verdict::Pass.and(Verdict::Hold(t)), Verdict::Hold(t));
        assert_eq!(
            Verdict::Hold(later).and(Verdict::Hold(t)),
            Verdict::Hold(later)
        );
        let d = Verdict::Drop(crate::DropReason::AclDenied);
        assert_eq!(Verdict::Hold(t).and(d), d);
        assert_eq!(d.and(Verdict::Pass), d);
    }

    #[test]
    fn prefix_parsing() {
        let p: Prefix = "10.1.0.0/16".parse().expect("ok");
        assert_eq!(p.len, 16);
        assert!(p.check().is_ok());
        let h: Prefix = "fd00::1".parse().expect("ok");
        assert_eq!(h.len, 128);
        assert!("10.0.0.0/x".parse::<Prefix>().is_err());
        assert_eq!(RateLimitSpec::default_burst(50_000_000), 62_500);
        assert_eq!(RateLimitSpec::default_burst(1_000_000), 18_000);
    }
}
