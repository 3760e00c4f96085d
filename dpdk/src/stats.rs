//! Counters of [`UdpUnderlay`](crate::UdpUnderlay), readable from any
//! thread, and the reasons frames are dropped.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a received frame was not delivered (and was not an ARP/NDP message
/// that was handled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RxDrop {
    /// Not addressed to us: another destination MAC, another IP address,
    /// an ARP request for someone else, the other IP family.
    NotForUs,
    /// UDP to our address but another port (the kernel would answer ICMP
    /// port unreachable; we stay silent).
    WrongPort,
    /// Bad IPv4 header checksum.
    BadIpv4Checksum,
    /// Bad UDP or ICMPv6 checksum, or a zero UDP checksum over IPv6.
    BadChecksum,
    /// The frame is shorter than its headers or their length fields say.
    Truncated,
    /// A header field is invalid (IP version, IHL, UDP length below 8, NDP
    /// hop limit other than 255, zero-length NDP option, ...).
    Malformed,
    /// An IPv4 fragment or an IPv6 fragment header: not reassembled
    /// (WireGuard peers keep their datagrams below the MTU).
    Fragment,
    /// Neither IPv4, IPv6 nor ARP; also VLAN-tagged frames, including those
    /// whose tag the driver stripped.
    UnknownEtherType,
    /// IP but neither UDP nor neighbour discovery (ICMP, TCP, IPv6
    /// extension headers, ...).
    UnsupportedProtocol,
    /// A source address no host may use (multicast, broadcast, ours).
    BadSource,
    /// A frame spread over several mbufs (scattered RX is not enabled, so
    /// only a driver's oversized frames end up here).
    MultiSegment,
}

impl RxDrop {
    /// Every reason, in counter order.
    pub const ALL: [RxDrop; 11] = [
        RxDrop::NotForUs,
        RxDrop::WrongPort,
        RxDrop::BadIpv4Checksum,
        RxDrop::BadChecksum,
        RxDrop::Truncated,
        RxDrop::Malformed,
        RxDrop::Fragment,
        RxDrop::UnknownEtherType,
        RxDrop::UnsupportedProtocol,
        RxDrop::BadSource,
        RxDrop::MultiSegment,
    ];

    /// A short snake_case name, for metrics labels.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            RxDrop::NotForUs => "not_for_us",
            RxDrop::WrongPort => "wrong_port",
            RxDrop::BadIpv4Checksum => "bad_ipv4_checksum",
            RxDrop::BadChecksum => "bad_checksum",
            RxDrop::Truncated => "truncated",
            RxDrop::Malformed => "malformed",
            RxDrop::Fragment => "fragment",
            RxDrop::UnknownEtherType => "unknown_ethertype",
            RxDrop::UnsupportedProtocol => "unsupported_protocol",
            RxDrop::BadSource => "bad_source",
            RxDrop::MultiSegment => "multi_segment",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RxDrop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a datagram (or an ARP/NDP frame of our own) was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum TxDrop {
    /// The destination's MAC address is not known: its resolution failed,
    /// or too many datagrams already wait for it.
    #[error("neighbour unresolved")]
    Unresolved,
    /// The neighbour table is full of entries that cannot be evicted.
    #[error("neighbour table full")]
    NeighborTableFull,
    /// The mbuf pool is empty.
    #[error("no mbuf")]
    NoMbuf,
    /// The payload does not fit the MTU (or was longer than the buffer
    /// asked for).
    #[error("payload too big")]
    TooBig,
    /// The destination is of the other IP family than the local address.
    #[error("wrong address family")]
    WrongFamily,
    /// The destination is not a unicast address and port.
    #[error("bad destination")]
    BadDestination,
    /// The driver's TX ring did not take the frame.
    #[error("TX ring full")]
    RingFull,
    /// [`UdpUnderlay::commit`](crate::UdpUnderlay::commit) without a
    /// buffer from [`UdpUnderlay::next_payload_buf`](crate::UdpUnderlay::next_payload_buf).
    #[error("nothing staged")]
    NothingStaged,
}

impl TxDrop {
    /// Every reason, in counter order.
    pub const ALL: [TxDrop; 8] = [
        TxDrop::Unresolved,
        TxDrop::NeighborTableFull,
        TxDrop::NoMbuf,
        TxDrop::TooBig,
        TxDrop::WrongFamily,
        TxDrop::BadDestination,
        TxDrop::RingFull,
        TxDrop::NothingStaged,
    ];

    /// A short snake_case name, for metrics labels.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            TxDrop::Unresolved => "unresolved",
            TxDrop::NeighborTableFull => "neighbor_table_full",
            TxDrop::NoMbuf => "no_mbuf",
            TxDrop::TooBig => "too_big",
            TxDrop::WrongFamily => "wrong_family",
            TxDrop::BadDestination => "bad_destination",
            TxDrop::RingFull => "ring_full",
            TxDrop::NothingStaged => "nothing_staged",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Live counters of one [`UdpUnderlay`](crate::UdpUnderlay), shared through
/// an `Arc` ([`UdpUnderlay::counters`](crate::UdpUnderlay::counters)).
///
/// Only the underlay's own thread writes them (a plain load and store, no
/// locked read-modify-write on the data path); any thread may read them.
/// Counts are per frame or datagram, bytes are UDP payload bytes.
#[derive(Debug, Default)]
pub struct Counters {
    rx_frames: AtomicU64,
    rx_datagrams: AtomicU64,
    rx_bytes: AtomicU64,
    rx_neighbor: AtomicU64,
    tx_datagrams: AtomicU64,
    tx_bytes: AtomicU64,
    tx_neighbor: AtomicU64,
    rx_drops: [AtomicU64; RxDrop::ALL.len()],
    tx_drops: [AtomicU64; TxDrop::ALL.len()],
}

/// A copy of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// Frames taken from the port.
    pub rx_frames: u64,
    /// Datagrams delivered to the caller.
    pub rx_datagrams: u64,
    /// Payload bytes delivered.
    pub rx_bytes: u64,
    /// ARP and NDP messages handled (requests answered, replies learnt).
    pub rx_neighbor: u64,
    /// Datagrams the driver took.
    pub tx_datagrams: u64,
    /// Payload bytes the driver took.
    pub tx_bytes: u64,
    /// ARP and NDP frames of our own (requests, replies) the driver took.
    pub tx_neighbor: u64,
    /// Dropped received frames, indexed like [`RxDrop::ALL`].
    pub rx_drops: [u64; RxDrop::ALL.len()],
    /// Dropped outgoing datagrams and frames, indexed like [`TxDrop::ALL`].
    pub tx_drops: [u64; TxDrop::ALL.len()],
}

impl CountersSnapshot {
    /// Received frames dropped for `reason`.
    #[must_use]
    pub fn rx_dropped(&self, reason: RxDrop) -> u64 {
        self.rx_drops[reason.index()]
    }

    /// Outgoing datagrams or frames dropped for `reason`.
    #[must_use]
    pub fn tx_dropped(&self, reason: TxDrop) -> u64 {
        self.tx_drops[reason.index()]
    }

    /// All received frames dropped.
    #[must_use]
    pub fn rx_dropped_total(&self) -> u64 {
        self.rx_drops.iter().sum()
    }

    /// All outgoing datagrams and frames dropped.
    #[must_use]
    pub fn tx_dropped_total(&self) -> u64 {
        self.tx_drops.iter().sum()
    }
}

/// Adds `n` to a counter that only the calling thread writes: a relaxed
/// load and store instead of a locked add, since there is no other writer.
#[inline]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

impl Counters {
    /// A copy of every counter. Each is read atomically; the set is not one
    /// atomic snapshot (a burst may be half-counted).
    #[must_use]
    pub fn snapshot(&self) -> CountersSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            rx_frames: load(&self.rx_frames),
            rx_datagrams: load(&self.rx_datagrams),
            rx_bytes: load(&self.rx_bytes),
            rx_neighbor: load(&self.rx_neighbor),
            tx_datagrams: load(&self.tx_datagrams),
            tx_bytes: load(&self.tx_bytes),
            tx_neighbor: load(&self.tx_neighbor),
            rx_drops: std::array::from_fn(|i| load(&self.rx_drops[i])),
            tx_drops: std::array::from_fn(|i| load(&self.tx_drops[i])),
        }
    }

    /// Received frames dropped for `reason` so far.
    #[must_use]
    pub fn rx_dropped(&self, reason: RxDrop) -> u64 {
        self.rx_drops[reason.index()].load(Ordering::Relaxed)
    }

    /// Outgoing datagrams or frames dropped for `reason` so far.
    #[must_use]
    pub fn tx_dropped(&self, reason: TxDrop) -> u64 {
        self.tx_drops[reason.index()].load(Ordering::Relaxed)
    }

    pub(crate) fn rx_drop(&self, reason: RxDrop) {
        bump(&self.rx_drops[reason.index()], 1);
    }

    pub(crate) fn tx_drop(&self, reason: TxDrop, n: u64) {
        bump(&self.tx_drops[reason.index()], n);
    }

    pub(crate) fn rx_burst(&self, frames: u64, datagrams: u64, bytes: u64, neighbor: u64) {
        bump(&self.rx_frames, frames);
        bump(&self.rx_datagrams, datagrams);
        bump(&self.rx_bytes, bytes);
        bump(&self.rx_neighbor, neighbor);
    }

    pub(crate) fn tx_burst(&self, datagrams: u64, bytes: u64, neighbor: u64) {
        bump(&self.tx_datagrams, datagrams);
        bump(&self.tx_bytes, bytes);
        bump(&self.tx_neighbor, neighbor);
    }
}
