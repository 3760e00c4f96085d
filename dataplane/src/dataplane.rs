//! The per-node packet engine: ports, cross-connects, sessions, and the
//! per-packet entry points.
//!
//! # Shape of a call
//! Every data-path call takes the caller's clock (`now`), the input and an
//! output buffer, and returns one [`Action`] that borrows either buffer: the
//! forwarder matches on it and does the I/O. Same-node forwarding and
//! delivery to a TUN return a slice of the *input* buffer (zero copy); the
//! WireGuard paths encrypt or decrypt into `out` (boringtun copies once
//! there). Nothing is allocated, locked or logged per packet.
//!
//! # The flush protocol
//! boringtun holds pod packets while a session has no keys and releases them
//! through `decapsulate` calls with an empty datagram ("call again until
//! `Done`"). The data plane keeps a list of sessions that may have something
//! to release, and [`Dataplane::poll_flush`] drains it: after any
//! [`Dataplane::from_underlay`] call, the caller calls `poll_flush` until it
//! returns [`Action::Done`]. It may defer that to the end of a receive batch
//! (boringtun allows it); it costs one branch when nothing is pending. Each
//! call writes into the `out` it is given, so a batching caller passes the
//! next free slot of its send batch every time.
//!
//! A session is listed only when its keys just became usable: we completed
//! a handshake as initiator (boringtun answered with a keepalive), or an
//! authenticated data message arrived while packets were queued (what
//! confirms the keys on the responder side). boringtun's own device also
//! flushes after sending a handshake *response*; we do not, because the
//! responder cannot use its new keys yet, and the flush would only make
//! boringtun start a competing handshake and forget the one in flight. With
//! both ends sending at once (crossing handshakes) that cost a round of
//! dropped responses; without it the simulation's 100 crossing handshakes
//! complete with no drop.

//! # Timers
//! [`Dataplane::poll_timers`] (or [`Dataplane::tick`]) must run every 100 to
//! 250 ms: it retries handshakes, rekeys, sends keepalives and expires
//! sessions. boringtun reads the monotonic clock itself for these (and its OS
//! RNG for handshake ephemerals); that is the one place this crate's time is
//! not the caller's `now`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use boringtun::noise::TunnResult;

use crate::counters::{GlobalCounters, XconnCounters};
use crate::drop::DropReason;
use crate::icmp;
use crate::neigh;
use crate::packet::{
    ETHERNET_HEADER_LEN, EthPayload, IpMeta, IpPacket, IpVersion, MacAddr, parse_ethernet, parse_ip,
};
use crate::stage::{Chain, Direction, StageCtx, Verdict};
use crate::wg::{
    self, Addressed, DATA_OVERHEAD, MSG_COOKIE_REPLY, MSG_DATA, MSG_INITIATION, MSG_RESPONSE,
    PublicKey, QUEUE_CAP, ScanLimiter, Session, SessionRef, SessionSlot, WgPeer,
};
use crate::xconn::{
    ConfigError, FarEnd, MIN_MTU, Payload, PodEnd, PortId, PortKind, Side, XconnError, XconnSpec,
};

/// What the caller must do with a packet it handed in (or with the next
/// queued output). Borrows the caller's buffers.
#[derive(Debug)]
#[must_use]
pub enum Action<'a> {
    /// Write `packet` to the pod device `port` (an IP packet for a TUN, an
    /// Ethernet frame for a TAP). `port` may be the one the packet came from
    /// (ARP/ND answers, ICMP "too big").
    ToPod {
        /// Destination device.
        port: PortId,
        /// The bytes to write, in one of the caller's buffers.
        packet: &'a mut [u8],
    },
    /// Send `datagram` as one UDP datagram from the forwarder's WireGuard
    /// socket to `dst`.
    ToUnderlay {
        /// Destination node.
        dst: SocketAddr,
        /// The WireGuard message (UDP payload).
        datagram: &'a mut [u8],
    },
    /// The packet was discarded; already counted.
    Drop(DropReason),
    /// Nothing to send: the packet was consumed (a keepalive, a cookie, a
    /// packet held until its session's handshake completes), or there is no
    /// more queued output.
    Done,
}

/// Sizing and limits of a [`Dataplane`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// Port ids must be below this (ports index a `Vec`). Default 4096.
    pub max_ports: u32,
    /// Most WireGuard sessions at once; at most 65536 (16 bits of the
    /// receiver index). Default 65536.
    pub max_sessions: usize,
    /// Handshake initiations per second that may be checked against *every*
    /// session because none of the sessions configured for their source IP
    /// matched (peers behind NAT, or roamed). Default 50.
    pub unmatched_initiations_per_sec: u32,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            max_ports: 4096,
            max_sessions: 1 << 16,
            unmatched_initiations_per_sec: 50,
        }
    }
}

/// WireGuard state of a cross-node connection, for status APIs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WgStatus {
    /// This connection's local static public key.
    pub local_public_key: PublicKey,
    /// The peer's static public key.
    pub peer_public_key: PublicKey,
    /// Where packets currently go (the configured endpoint, or where the
    /// peer last sent authenticated packets from).
    pub endpoint: SocketAddr,
    /// A session with current keys exists.
    pub established: bool,
    /// When the current keys were made, on the caller's clock.
    pub last_handshake: Option<Instant>,
    /// boringtun gave up (no handshake for too long); the next packet from
    /// the pod starts over.
    pub expired: bool,
    /// Plaintext bytes sent and received over this session (boringtun's
    /// count).
    pub tx_bytes: usize,
    /// See `tx_bytes`.
    pub rx_bytes: usize,
    /// boringtun's loss estimate, 0.0 to 1.0.
    pub estimated_loss: f32,
    /// Round-trip time of the last handshake, in milliseconds.
    pub rtt_ms: Option<u32>,
    /// Pod packets waiting for the handshake.
    pub queued: u16,
}

/// One cross-connect's state, for status APIs.
#[derive(Clone, Debug, PartialEq)]
pub struct XconnStatus {
    /// Payload kind.
    pub payload: Payload,
    /// Path MTU.
    pub mtu: u16,
    /// Side A's pod port.
    pub a_port: PortId,
    /// Side B's pod port, for a same-node connection.
    pub b_port: Option<PortId>,
    /// Names of the chain's stages.
    pub chain: Vec<&'static str>,
    /// WireGuard state, for a cross-node connection.
    pub wireguard: Option<WgStatus>,
}

#[derive(Debug)]
struct Port {
    kind: PortKind,
    /// For a TAP: the pod's MAC as configured or last learned.
    pod_mac: MacAddr,
    attached: Option<(usize, Side)>,
}

#[derive(Debug)]
enum Far {
    Pod(PodEnd),
    Wg(SessionRef),
}

#[derive(Debug)]
struct Xconn {
    id: Box<str>,
    payload: Payload,
    mtu: u16,
    a: PodEnd,
    b: Far,
    chain: Chain,
    counters: XconnCounters,
}

impl Xconn {
    #[inline]
    fn pod_end(&self, side: Side) -> Option<&PodEnd> {
        match (side, &self.b) {
            (Side::A, _) => Some(&self.a),
            (Side::B, Far::Pod(end)) => Some(end),
            (Side::B, Far::Wg(_)) => None,
        }
    }
}

/// The packet core of one worker: see the crate documentation.
///
/// `Send`, not `Sync`: one thread owns it and runs every call, control-plane
/// ones included (the forwarder forwards control messages to it between
/// batches). Counters are readable from other threads through their handles.
pub struct Dataplane {
    config: DataplaneConfig,
    ports: Vec<Option<Port>>,
    xconns: Vec<Option<Xconn>>,
    free_xconns: Vec<usize>,
    by_id: HashMap<Box<str>, usize>,
    sessions: Vec<SessionSlot>,
    free_sessions: Vec<u16>,
    /// Session slots by configured endpoint IP: the first candidates for an
    /// initiation from that IP.
    by_endpoint_ip: HashMap<IpAddr, Vec<u16>>,
    /// Local static public key -> cross-connect id: keys must be unique or
    /// mac1 dispatch would be ambiguous.
    local_keys: HashMap<[u8; 32], Box<str>>,
    /// Sessions that may have queued output. Capacity is kept at the number
    /// of session slots, so pushing never allocates.
    flush_list: Vec<SessionRef>,
    timer_cursor: usize,
    scan_limiter: ScanLimiter,
    global: GlobalCounters,
    /// What [`Dataplane::hold_until`] reports for the last packet.
    hold: Option<Instant>,
}

impl core::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Dataplane")
            .field("config", &self.config)
            .field("ports", &self.ports.iter().flatten().count())
            .field("xconns", &self.by_id.len())
            .field(
                "sessions",
                &self.sessions.iter().filter(|s| s.session.is_some()).count(),
            )
            .finish_non_exhaustive()
    }
}

/// Smallest `out` buffer every call accepts for a connection of this MTU:
/// an encapsulated packet (`mtu + 32`) or a decrypted one behind an Ethernet
/// header, whichever is larger, and never less than an Ethernet-framed
/// 1280-byte ICMPv6 error.
pub const fn out_len(mtu: u16) -> usize {
    let wg = mtu as usize + DATA_OVERHEAD + ETHERNET_HEADER_LEN;
    let icmp = ETHERNET_HEADER_LEN + icmp::IPV6_MIN_MTU as usize;
    if wg > icmp { wg } else { icmp }
}

/// Smallest `out` buffer for a handshake message (timers, flush).
const HANDSHAKE_OUT_LEN: usize = 148;

impl Dataplane {
    /// An empty data plane.
    pub fn new(config: DataplaneConfig) -> Self {
        Dataplane {
            config: DataplaneConfig {
                max_sessions: config.max_sessions.min(1 << 16),
                ..config
            },
            ports: Vec::new(),
            xconns: Vec::new(),
            free_xconns: Vec::new(),
            by_id: HashMap::new(),
            sessions: Vec::new(),
            free_sessions: Vec::new(),
            by_endpoint_ip: HashMap::new(),
            local_keys: HashMap::new(),
            flush_list: Vec::new(),
            timer_cursor: 0,
            scan_limiter: ScanLimiter::new(config.unmatched_initiations_per_sec),
            global: GlobalCounters::default(),
            hold: None,
        }
    }

    /// See [`out_len`].
    pub const fn out_len(mtu: u16) -> usize {
        out_len(mtu)
    }

    // ------------------------------------------------------------------
    // Control plane. May allocate; runs on the owning thread between
    // batches.
    // ------------------------------------------------------------------

    /// Registers a pod device under `id`.
    pub fn add_port(&mut self, id: PortId, kind: PortKind) -> Result<(), ConfigError> {
        if id.0 >= self.config.max_ports {
            return Err(ConfigError::PortOutOfRange(id, self.config.max_ports));
        }
        if self.port(id).is_some() {
            return Err(ConfigError::PortExists(id));
        }
        if self.ports.len() <= id.index() {
            self.ports.resize_with(id.index() + 1, || None);
        }
        let pod_mac = match kind {
            PortKind::Tap(tap) => tap.pod_mac.unwrap_or(MacAddr::BROADCAST),
            PortKind::Tun => MacAddr::BROADCAST,
        };
        self.ports[id.index()] = Some(Port {
            kind,
            pod_mac,
            attached: None,
        });
        Ok(())
    }

    /// Forgets a pod device. Its cross-connect must be removed first.
    pub fn remove_port(&mut self, id: PortId) -> Result<(), ConfigError> {
        let port = self.port(id).ok_or(ConfigError::UnknownPort(id))?;
        if let Some((xi, _)) = port.attached {
            return Err(ConfigError::PortAttached {
                port: id,
                by: self.xconn_name(xi),
            });
        }
        if let Some(slot) = self.ports.get_mut(id.index()) {
            *slot = None;
        }
        Ok(())
    }

    /// Programs cross-connect `id`, or updates it in place. An update keeps
    /// the chain, the counters and, when the keys are unchanged, the
    /// WireGuard session (no new handshake). Returns the counters handle.
    pub fn upsert_xconnect(
        &mut self,
        id: &str,
        spec: XconnSpec,
    ) -> Result<XconnCounters, XconnError> {
        let existing = self.by_id.get(id).copied();
        self.validate(id, existing, &spec)
            .map_err(|e| XconnError::new(id, e))?;

        let xi = match existing {
            Some(xi) => xi,
            None => match self.free_xconns.pop() {
                Some(xi) => xi,
                None => {
                    self.xconns.push(None);
                    self.xconns.len() - 1
                }
            },
        };

        // Old state out: ports detached, session kept only if reusable.
        let mut kept_session = None;
        let (chain, counters) = match existing.and_then(|xi| self.xconns[xi].take()) {
            Some(old) => {
                self.detach_ports(&old);
                if let (Far::Wg(sref), FarEnd::Wireguard(peer)) = (&old.b, &spec.b)
                    && self.session(*sref).is_some_and(|s| s.same_keys(peer))
                {
                    kept_session = Some(*sref);
                }
                if let Far::Wg(sref) = old.b
                    && kept_session != Some(sref)
                {
                    self.free_session(sref);
                }
                (old.chain, old.counters)
            }
            None => (Chain::empty(), XconnCounters::new()),
        };

        let b = match &spec.b {
            FarEnd::Pod(end) => Far::Pod(*end),
            FarEnd::Wireguard(peer) => {
                let sref = match kept_session {
                    Some(sref) => {
                        self.update_session_endpoint(sref, peer.endpoint);
                        sref
                    }
                    // Capacity was checked in `validate`.
                    None => self
                        .alloc_session(peer, xi, id)
                        .map_err(|e| XconnError::new(id, e))?,
                };
                Far::Wg(sref)
            }
        };

        self.attach(spec.a.port, xi, Side::A);
        if let Far::Pod(end) = &b {
            self.attach(end.port, xi, Side::B);
        }
        self.xconns[xi] = Some(Xconn {
            id: id.into(),
            payload: spec.payload,
            mtu: spec.mtu,
            a: spec.a,
            b,
            chain,
            counters: counters.clone(),
        });
        self.by_id.insert(id.into(), xi);
        tracing::debug!(
            xconn = id,
            mtu = spec.mtu,
            payload = %spec.payload,
            updated = existing.is_some(),
            "cross-connect programmed"
        );
        Ok(counters)
    }

    /// Removes cross-connect `id`: its ports stay registered and drop their
    /// traffic as [`DropReason::NoCrossConnect`]; its WireGuard session is
    /// gone (late messages drop as unknown index / no session). Returns the
    /// chain so the caller can drop it off the packet thread.
    pub fn remove_xconnect(&mut self, id: &str) -> Result<Chain, XconnError> {
        let xi = self
            .by_id
            .remove(id)
            .ok_or_else(|| XconnError::new(id, ConfigError::UnknownXconn))?;
        let Some(old) = self.xconns.get_mut(xi).and_then(Option::take) else {
            return Err(XconnError::new(id, ConfigError::UnknownXconn));
        };
        self.detach_ports(&old);
        if let Far::Wg(sref) = old.b {
            self.free_session(sref);
        }
        self.free_xconns.push(xi);
        tracing::debug!(xconn = id, "cross-connect removed");
        Ok(old.chain)
    }

    /// Replaces the service chain of `id`; returns the old one. Packets
    /// already processed saw the old chain, every later one sees the new.
    pub fn set_chain(&mut self, id: &str, chain: Chain) -> Result<Chain, XconnError> {
        let xc = self
            .by_id
            .get(id)
            .and_then(|&xi| self.xconns.get_mut(xi))
            .and_then(Option::as_mut)
            .ok_or_else(|| XconnError::new(id, ConfigError::UnknownXconn))?;
        Ok(std::mem::replace(&mut xc.chain, chain))
    }

    /// The counters of `id`, readable from any thread.
    pub fn counters(&self, id: &str) -> Option<XconnCounters> {
        self.xconn_by_id(id).map(|x| x.counters.clone())
    }

    /// Drops that matched no cross-connect, readable from any thread.
    pub fn global_counters(&self) -> GlobalCounters {
        self.global.clone()
    }

    /// Ids of the programmed cross-connects.
    pub fn xconnect_ids(&self) -> impl Iterator<Item = &str> {
        self.by_id.keys().map(|k| &**k)
    }

    /// State of `id` for status APIs. `now` converts boringtun's "time since
    /// handshake" to the caller's clock. Takes a lock inside boringtun: not
    /// for the packet path.
    pub fn status(&self, id: &str, now: Instant) -> Option<XconnStatus> {
        let xc = self.xconn_by_id(id)?;
        let (b_port, wireguard) = match &xc.b {
            Far::Pod(end) => (Some(end.port), None),
            Far::Wg(sref) => {
                let s = self.session(*sref)?;
                let (since, tx_bytes, rx_bytes, estimated_loss, rtt_ms) = s.tunn.stats();
                (
                    None,
                    Some(WgStatus {
                        local_public_key: s.local_public,
                        peer_public_key: s.peer_public,
                        endpoint: s.endpoint,
                        established: since.is_some(),
                        last_handshake: since.and_then(|d| now.checked_sub(d)),
                        expired: s.expired,
                        tx_bytes,
                        rx_bytes,
                        estimated_loss,
                        rtt_ms,
                        queued: s.queued,
                    }),
                )
            }
        };
        Some(XconnStatus {
            payload: xc.payload,
            mtu: xc.mtu,
            a_port: xc.a.port,
            b_port,
            chain: xc.chain.names().to_vec(),
            wireguard,
        })
    }

    /// Starts a WireGuard handshake for `id` now instead of on its first
    /// packet (e.g. right after programming, so the first packet does not
    /// wait a round trip). `Done` if one is already in progress.
    pub fn initiate_handshake<'o>(&mut self, id: &str, out: &'o mut [u8]) -> Action<'o> {
        let Some(&xi) = self.by_id.get(id) else {
            return Action::Drop(DropReason::NoCrossConnect);
        };
        let Some(Some(xc)) = self.xconns.get(xi) else {
            return Action::Drop(DropReason::NoCrossConnect);
        };
        let Far::Wg(sref) = xc.b else {
            return Action::Done;
        };
        let counters = xc.counters.clone();
        let Some(s) = session_mut(&mut self.sessions, sref) else {
            return Action::Drop(DropReason::WgNoSession);
        };
        if out.len() < HANDSHAKE_OUT_LEN {
            counters.drop(DropReason::BufferTooSmall);
            return Action::Drop(DropReason::BufferTooSmall);
        }
        match s.tunn.format_handshake_initiation(out, false) {
            TunnResult::WriteToNetwork(msg) => {
                counters.wg().handshake_initiations_tx.inc();
                counters.side(Side::B).tx(msg.len());
                Action::ToUnderlay {
                    dst: s.endpoint,
                    datagram: msg,
                }
            }
            TunnResult::Err(e) => {
                let r = wg::drop_reason(&e);
                counters.drop(r);
                Action::Drop(r)
            }
            _ => Action::Done,
        }
    }

    // ------------------------------------------------------------------
    // Data plane.
    // ------------------------------------------------------------------

    /// Whether the output of the last [`Dataplane::from_pod`] or
    /// [`Dataplane::from_underlay`] call must wait: `Some(t)` when a shaping
    /// stage of its chain (`ratelimit`) queued the packet
    /// ([`Verdict::Hold`]), and the caller must not send the output before
    /// `t`; `None` (send at once) otherwise. A stage's times for one
    /// direction never decrease, so a FIFO per direction
    /// ([`crate::stages::DelayLine::push_at`]) keeps them in order. A caller
    /// that ignores this sends held outputs at once: the limit then acts as
    /// a policer whose bucket is the burst plus the queue.
    #[inline]
    pub fn hold_until(&self) -> Option<Instant> {
        self.hold
    }

    /// A packet (TUN) or frame (TAP) read from pod device `port`.
    ///
    /// `packet` may be rewritten in place (service chain, Ethernet header)
    /// and is returned for same-node delivery; `out` receives encrypted
    /// datagrams and locally generated replies, and must be at least
    /// [`out_len`] for the connection's MTU.
    pub fn from_pod<'a>(
        &mut self,
        now: Instant,
        port: PortId,
        packet: &'a mut [u8],
        out: &'a mut [u8],
    ) -> Action<'a> {
        self.hold = None;
        let Self {
            ports,
            xconns,
            sessions,
            global,
            hold,
            ..
        } = self;
        let Some(p) = ports.get_mut(port.index()).and_then(Option::as_mut) else {
            global.drop(DropReason::UnknownPort);
            return Action::Drop(DropReason::UnknownPort);
        };
        let Some((xi, side)) = p.attached else {
            global.drop(DropReason::NoCrossConnect);
            return Action::Drop(DropReason::NoCrossConnect);
        };
        let Some(xc) = xconns.get_mut(xi).and_then(Option::as_mut) else {
            global.drop(DropReason::NoCrossConnect);
            return Action::Drop(DropReason::NoCrossConnect);
        };
        let counters = &xc.counters;
        counters.side(side).rx(packet.len());
        let drop = |r: DropReason| {
            counters.drop(r);
            Action::Drop(r)
        };
        let Some(&end) = xc.pod_end(side) else {
            return drop(DropReason::NoCrossConnect);
        };

        // Layer 2, then layer 3: the only parse of this packet.
        let (l2_len, meta) = match p.kind {
            PortKind::Tun => match parse_ip(packet) {
                Ok(meta) => (0, meta),
                Err(r) => return drop(r),
            },
            PortKind::Tap(tap) => {
                let eth = match parse_ethernet(packet) {
                    Ok(eth) => eth,
                    Err(r) => return drop(r),
                };
                if tap.pod_mac.is_none() && !eth.src.is_multicast() {
                    p.pod_mac = eth.src;
                }
                let meta = match eth.payload {
                    EthPayload::Arp => {
                        return match neigh::arp_reply(packet, end.peer_ipv4, tap.peer_mac, out) {
                            Ok(n) => reply_to_pod(counters, side, port, out, n),
                            Err(r) => drop(r),
                        };
                    }
                    EthPayload::Ip(meta) => meta,
                };
                let ip = packet.get(ETHERNET_HEADER_LEN..).unwrap_or(&[]);
                if meta.version == IpVersion::V6 && neigh::is_neighbor_solicitation(ip, &meta) {
                    return match neigh::neighbor_advertisement(
                        eth.src,
                        ip,
                        &meta,
                        end.peer_ipv6,
                        tap.peer_mac,
                        out,
                    ) {
                        Ok(n) => reply_to_pod(counters, side, port, out, n),
                        Err(r) => drop(r),
                    };
                }
                (ETHERNET_HEADER_LEN, meta)
            }
        };
        let tap_reply = match p.kind {
            PortKind::Tap(tap) => Some((p.pod_mac, tap.peer_mac)),
            PortKind::Tun => None,
        };

        // Path MTU: answer instead of forwarding, so PMTU discovery works.
        if meta.len > usize::from(xc.mtu) {
            let ip = packet.get(l2_len..).unwrap_or(&[]);
            return too_big(
                counters, side, port, &end, xc.mtu, ip, &meta, tap_reply, out,
            );
        }

        let ip_end = l2_len + meta.len;
        {
            let Some(ip) = packet.get_mut(l2_len..ip_end) else {
                return drop(DropReason::TooShort);
            };
            let ctx = StageCtx {
                now,
                direction: match side {
                    Side::A => Direction::AToB,
                    Side::B => Direction::BToA,
                },
            };
            match xc.chain.run(&ctx, &mut IpPacket::new_unchecked(ip, meta)) {
                Verdict::Drop(r) => return drop(r),
                Verdict::Hold(t) => *hold = Some(t),
                Verdict::Pass => {}
            }
        }

        let to = side.other();
        match (to, &xc.b) {
            (Side::B, Far::Wg(sref)) => {
                let Some(s) = session_mut(sessions, *sref) else {
                    return drop(DropReason::WgNoSession);
                };
                let Some(ip) = packet.get(l2_len..ip_end) else {
                    return drop(DropReason::TooShort);
                };
                encapsulate(counters, s, ip, out)
            }
            (Side::B, Far::Pod(dst)) | (Side::A, Far::Pod(dst)) => {
                let dst = if to == Side::A { &xc.a } else { dst };
                let Some(dst_port) = ports.get(dst.port.index()).and_then(Option::as_ref) else {
                    return drop(DropReason::NoCrossConnect);
                };
                deliver_local(counters, to, dst.port, dst_port, packet, l2_len, &meta, out)
            }
            (Side::A, Far::Wg(_)) => drop(DropReason::NoCrossConnect),
        }
    }

    /// A UDP datagram received on the WireGuard socket from `src`.
    ///
    /// `out` must hold `datagram.len() + 14` bytes (see [`out_len`]). After
    /// this call (or after the batch), drain [`Dataplane::poll_flush`].
    pub fn from_underlay<'a>(
        &mut self,
        now: Instant,
        src: SocketAddr,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Action<'a> {
        self.hold = None;
        let addressed = match wg::classify(datagram) {
            Ok(a) => a,
            Err(r) => {
                self.global.drop(r);
                return Action::Drop(r);
            }
        };
        let sref = match addressed {
            Addressed::Receiver(idx) => SessionRef::from_receiver_index(idx),
            Addressed::Initiation => match self.find_initiation_target(now, src, datagram) {
                Ok(sref) => sref,
                Err(r) => {
                    self.global.drop(r);
                    return Action::Drop(r);
                }
            },
        };

        let Self {
            ports,
            xconns,
            sessions,
            flush_list,
            global,
            hold,
            ..
        } = self;
        let Some(s) = session_mut(sessions, sref) else {
            global.drop(DropReason::WgUnknownReceiverIndex);
            return Action::Drop(DropReason::WgUnknownReceiverIndex);
        };
        let Some(xc) = xconns.get_mut(s.xconn).and_then(Option::as_mut) else {
            global.drop(DropReason::NoCrossConnect);
            return Action::Drop(DropReason::NoCrossConnect);
        };
        let counters = &xc.counters;
        counters.side(Side::B).rx(datagram.len());
        let drop = |r: DropReason| {
            counters.drop(r);
            Action::Drop(r)
        };
        let pod = xc.a;
        let Some(pod_port) = ports.get(pod.port.index()).and_then(Option::as_ref) else {
            return drop(DropReason::NoCrossConnect);
        };
        // A TAP pod needs room for the Ethernet header in front of the
        // plaintext: decrypt behind it, then write the header in place.
        let headroom = match pod_port.kind {
            PortKind::Tap(_) => ETHERNET_HEADER_LEN,
            PortKind::Tun => 0,
        };
        if out.len() < headroom + datagram.len() {
            return drop(DropReason::BufferTooSmall);
        }

        let (kind, off, len) = {
            let dst = out.get_mut(headroom..).unwrap_or(&mut []);
            let base = dst.as_ptr() as usize;
            let offset_of = |b: &[u8]| (b.as_ptr() as usize).wrapping_sub(base);
            match s.tunn.decapsulate(Some(src.ip()), datagram, dst) {
                TunnResult::WriteToNetwork(b) => (Decap::Reply, offset_of(b), b.len()),
                TunnResult::WriteToTunnelV4(b, _) | TunnResult::WriteToTunnelV6(b, _) => {
                    (Decap::Packet, offset_of(b), b.len())
                }
                TunnResult::Done => (Decap::Consumed, 0, 0),
                TunnResult::Err(e) => return drop(wg::drop_reason(&e)),
            }
        };
        let msg_type = datagram.first().copied().unwrap_or(0);
        // Anything but a cookie reply we answer means the datagram
        // authenticated: the peer is really at `src` (WireGuard roaming).
        let authenticated = match kind {
            Decap::Reply => out.get(headroom + off).copied() != Some(MSG_COOKIE_REPLY),
            Decap::Packet => true,
            Decap::Consumed => msg_type == MSG_DATA,
        };
        if authenticated {
            s.expired = false;
            if s.endpoint != src {
                s.endpoint = src;
            }
        }
        // boringtun may now release packets it held for the handshake: when
        // we just completed one as initiator (its answer is a keepalive), or
        // when an authenticated data message arrived (as responder, that is
        // what confirms the new keys). Not after sending a handshake
        // response: the responder cannot use its keys yet, so a flush would
        // only make boringtun start a competing handshake and forget the one
        // it has in flight, which breaks crossing handshakes.
        let reply_type = match kind {
            Decap::Reply => out.get(headroom + off).copied(),
            _ => None,
        };
        let keys_usable = reply_type == Some(MSG_DATA)
            || (authenticated && kind != Decap::Reply && msg_type == MSG_DATA);
        if keys_usable && (s.queued > 0 || reply_type == Some(MSG_DATA)) {
            mark_flush(flush_list, s, sref);
        }

        let start = headroom + off;
        match kind {
            Decap::Consumed => Action::Done,
            Decap::Reply => {
                let Some(msg) = out.get_mut(start..start + len) else {
                    return drop(DropReason::BufferTooSmall);
                };
                match msg.first().copied() {
                    Some(MSG_RESPONSE) => counters.wg().handshake_responses_tx.inc(),
                    Some(MSG_COOKIE_REPLY) => counters.wg().cookie_replies_tx.inc(),
                    Some(MSG_DATA) => counters.wg().keepalives_tx.inc(),
                    Some(MSG_INITIATION) => counters.wg().handshake_initiations_tx.inc(),
                    _ => {}
                }
                counters.side(Side::B).tx(len);
                Action::ToUnderlay {
                    dst: src,
                    datagram: msg,
                }
            }
            Decap::Packet => {
                // The frame starts `headroom` bytes before the plaintext
                // (always in range: `off` is an offset into `out[headroom..]`).
                let Some(frame) = out.get_mut(start - headroom..start + len) else {
                    return drop(DropReason::BufferTooSmall);
                };
                let meta = match parse_ip(frame.get(headroom..).unwrap_or(&[])) {
                    Ok(meta) => meta,
                    Err(r) => return drop(r),
                };
                let ctx = StageCtx {
                    now,
                    direction: Direction::BToA,
                };
                let ip = frame
                    .get_mut(headroom..headroom + meta.len)
                    .unwrap_or(&mut []);
                match xc.chain.run(&ctx, &mut IpPacket::new_unchecked(ip, meta)) {
                    Verdict::Drop(r) => return drop(r),
                    Verdict::Hold(t) => *hold = Some(t),
                    Verdict::Pass => {}
                }
                let Some(frame) = frame.get_mut(..headroom + meta.len) else {
                    return drop(DropReason::BufferTooSmall);
                };
                if let PortKind::Tap(tap) = pod_port.kind {
                    write_eth_header(frame, pod_port.pod_mac, tap.peer_mac, meta.version);
                }
                counters.side(Side::A).tx(frame.len());
                Action::ToPod {
                    port: pod.port,
                    packet: frame,
                }
            }
        }
    }

    /// True when [`Dataplane::poll_flush`] has something to do.
    #[inline]
    pub fn has_pending_flush(&self) -> bool {
        !self.flush_list.is_empty()
    }

    /// Next datagram boringtun released after a handshake (or another
    /// queued message); [`Action::Done`] when there is none. Call until
    /// `Done` after [`Dataplane::from_underlay`] (see the module doc).
    /// `out` must be [`out_len`] of the largest MTU in use.
    pub fn poll_flush<'o>(&mut self, _now: Instant, out: &'o mut [u8]) -> Action<'o> {
        let Self {
            xconns,
            sessions,
            flush_list,
            ..
        } = self;
        while let Some(&sref) = flush_list.last() {
            let Some(s) = session_mut(sessions, sref) else {
                flush_list.pop();
                continue;
            };
            let counters = xconns
                .get(s.xconn)
                .and_then(Option::as_ref)
                .map(|x| &x.counters);
            // boringtun panics if a queued packet does not fit: skip the
            // session instead (its packets stay queued until the next
            // flush) and count the caller's bug. Skipping, not returning an
            // error, keeps a caller that loops until `Done` from spinning.
            if out.len() < HANDSHAKE_OUT_LEN.max(s.max_queued_len + DATA_OVERHEAD) {
                if let Some(c) = counters {
                    c.drop(DropReason::BufferTooSmall);
                }
                s.needs_flush = false;
                flush_list.pop();
                continue;
            }
            let (is_msg, len) = match s.tunn.decapsulate(None, &[], out) {
                TunnResult::WriteToNetwork(b) => (true, b.len()),
                _ => (false, 0),
            };
            if !is_msg {
                s.needs_flush = false;
                flush_list.pop();
                continue;
            }
            let Some(msg) = out.get_mut(..len) else {
                return Action::Drop(DropReason::BufferTooSmall);
            };
            match msg.first().copied() {
                Some(MSG_DATA) => s.note_dequeued(),
                Some(MSG_INITIATION) => {
                    if let Some(c) = counters {
                        c.wg().handshake_initiations_tx.inc();
                    }
                }
                _ => {}
            }
            if let Some(c) = counters {
                c.side(Side::B).tx(len);
            }
            return Action::ToUnderlay {
                dst: s.endpoint,
                datagram: msg,
            };
        }
        Action::Done
    }

    /// Lets every chain do its bounded housekeeping ([`crate::Stage::poll`]:
    /// the flow log finishes idle flows). Call with the timers.
    pub fn poll_chains(&mut self, now: Instant) {
        for xc in self.xconns.iter_mut().flatten() {
            xc.chain.poll(now);
        }
    }

    /// Runs WireGuard timers, one session at a time: returns the next
    /// message a timer wants sent (handshake retry or rekey, keepalive), or
    /// [`Action::Done`] when every session has been visited. Call until
    /// `Done` every 100 to 250 ms. `out` must be at least 148 bytes.
    pub fn poll_timers<'o>(&mut self, _now: Instant, out: &'o mut [u8]) -> Action<'o> {
        if out.len() < HANDSHAKE_OUT_LEN {
            // Counted, and the round ends: a caller looping until `Done`
            // must not spin on its own bug.
            self.global.drop(DropReason::BufferTooSmall);
            self.timer_cursor = 0;
            return Action::Done;
        }
        let Self {
            xconns,
            sessions,
            timer_cursor,
            ..
        } = self;
        // Find the next message without holding `out` across iterations,
        // then build the action from it.
        let found = loop {
            let Some(slot) = sessions.get_mut(*timer_cursor) else {
                break None;
            };
            *timer_cursor += 1;
            let Some(s) = slot.session.as_mut() else {
                continue;
            };
            let len = match s.tunn.update_timers(out) {
                TunnResult::WriteToNetwork(b) => b.len(),
                TunnResult::Err(boringtun::noise::errors::WireGuardError::ConnectionExpired) => {
                    // boringtun dropped its keys and its queue.
                    if !s.expired {
                        tracing::debug!(endpoint = %s.endpoint, "wireguard session expired");
                    }
                    s.expired = true;
                    s.note_queue_cleared();
                    continue;
                }
                _ => continue,
            };
            if let Some(c) = xconns.get(s.xconn).and_then(Option::as_ref) {
                match out.first().copied() {
                    Some(MSG_INITIATION) => c.counters.wg().handshake_initiations_tx.inc(),
                    Some(MSG_DATA) => c.counters.wg().keepalives_tx.inc(),
                    _ => {}
                }
                c.counters.side(Side::B).tx(len);
            }
            break Some((s.endpoint, len));
        };
        match found {
            Some((dst, len)) => match out.get_mut(..len) {
                Some(datagram) => Action::ToUnderlay { dst, datagram },
                None => Action::Drop(DropReason::BufferTooSmall),
            },
            None => {
                *timer_cursor = 0;
                Action::Done
            }
        }
    }

    /// Convenience over [`Dataplane::poll_timers`]: runs a whole timer round,
    /// handing each message to `emit` (written into `out`, valid only during
    /// the callback; copy it into a send batch).
    pub fn tick(&mut self, now: Instant, out: &mut [u8], mut emit: impl FnMut(Action<'_>)) {
        loop {
            match self.poll_timers(now, out) {
                Action::Done => return,
                a => emit(a),
            }
        }
    }

    // ------------------------------------------------------------------
    // Internals.
    // ------------------------------------------------------------------

    fn port(&self, id: PortId) -> Option<&Port> {
        self.ports.get(id.index()).and_then(Option::as_ref)
    }

    fn xconn_by_id(&self, id: &str) -> Option<&Xconn> {
        let xi = *self.by_id.get(id)?;
        self.xconns.get(xi).and_then(Option::as_ref)
    }

    fn xconn_name(&self, xi: usize) -> String {
        self.xconns
            .get(xi)
            .and_then(Option::as_ref)
            .map(|x| x.id.to_string())
            .unwrap_or_default()
    }

    fn session(&self, sref: SessionRef) -> Option<&Session> {
        let slot = self.sessions.get(usize::from(sref.slot))?;
        if slot.generation != sref.generation {
            return None;
        }
        slot.session.as_ref()
    }

    fn validate(
        &self,
        id: &str,
        existing: Option<usize>,
        spec: &XconnSpec,
    ) -> Result<(), ConfigError> {
        if spec.mtu < MIN_MTU {
            return Err(ConfigError::InvalidMtu(spec.mtu));
        }
        let mut pod_ports = vec![spec.a.port];
        if let FarEnd::Pod(b) = &spec.b {
            if b.port == spec.a.port {
                return Err(ConfigError::SamePort(b.port));
            }
            pod_ports.push(b.port);
        }
        for id_port in pod_ports {
            let port = self
                .port(id_port)
                .ok_or(ConfigError::UnknownPort(id_port))?;
            let (kind, ok) = match port.kind {
                PortKind::Tun => ("TUN", spec.payload == Payload::Ip),
                PortKind::Tap(_) => ("TAP", spec.payload == Payload::Ethernet),
            };
            if !ok {
                return Err(ConfigError::PayloadMismatch {
                    port: id_port,
                    kind,
                    payload: spec.payload,
                });
            }
            if let Some((xi, _)) = port.attached
                && Some(xi) != existing
            {
                return Err(ConfigError::PortInUse {
                    port: id_port,
                    by: self.xconn_name(xi),
                });
            }
        }
        if let FarEnd::Wireguard(peer) = &spec.b {
            let public = PublicKey::from(&peer.local_private);
            if let Some(owner) = self.local_keys.get(public.as_bytes())
                && &**owner != id
            {
                return Err(ConfigError::DuplicateLocalKey(owner.to_string()));
            }
            let reusable = existing
                .and_then(|xi| self.xconns.get(xi))
                .and_then(Option::as_ref)
                .is_some_and(|x| match x.b {
                    Far::Wg(sref) => self.session(sref).is_some_and(|s| s.same_keys(peer)),
                    Far::Pod(_) => false,
                });
            let frees_one = existing
                .and_then(|xi| self.xconns.get(xi))
                .and_then(Option::as_ref)
                .is_some_and(|x| matches!(x.b, Far::Wg(_)));
            let has_room = !self.free_sessions.is_empty()
                || self.sessions.len() < self.config.max_sessions
                || frees_one;
            if !reusable && !has_room {
                return Err(ConfigError::TooManySessions(self.config.max_sessions));
            }
        }
        Ok(())
    }

    fn attach(&mut self, port: PortId, xi: usize, side: Side) {
        if let Some(Some(p)) = self.ports.get_mut(port.index()) {
            p.attached = Some((xi, side));
        }
    }

    fn detach_ports(&mut self, xc: &Xconn) {
        let mut ports = vec![xc.a.port];
        if let Far::Pod(end) = &xc.b {
            ports.push(end.port);
        }
        for port in ports {
            if let Some(Some(p)) = self.ports.get_mut(port.index()) {
                p.attached = None;
            }
        }
    }

    fn alloc_session(
        &mut self,
        peer: &WgPeer,
        xi: usize,
        id: &str,
    ) -> Result<SessionRef, ConfigError> {
        let slot = match self.free_sessions.pop() {
            Some(slot) => slot,
            None => {
                if self.sessions.len() >= self.config.max_sessions {
                    return Err(ConfigError::TooManySessions(self.config.max_sessions));
                }
                let slot = u16::try_from(self.sessions.len())
                    .map_err(|_| ConfigError::TooManySessions(self.config.max_sessions))?;
                self.sessions.push(SessionSlot::default());
                // Keep the flush list able to hold every session without
                // growing on the packet path.
                self.flush_list
                    .reserve(self.sessions.len().saturating_sub(self.flush_list.len()));
                slot
            }
        };
        let cell = &mut self.sessions[usize::from(slot)];
        let sref = SessionRef {
            slot,
            generation: cell.generation,
        };
        let session = Session::new(peer, sref, xi);
        self.local_keys
            .insert(*session.local_public.as_bytes(), id.into());
        self.by_endpoint_ip
            .entry(session.indexed_ip)
            .or_default()
            .push(slot);
        cell.session = Some(session);
        Ok(sref)
    }

    fn free_session(&mut self, sref: SessionRef) {
        let Some(cell) = self.sessions.get_mut(usize::from(sref.slot)) else {
            return;
        };
        if cell.generation != sref.generation {
            return;
        }
        let Some(s) = cell.session.take() else {
            return;
        };
        // A new generation: messages for the old occupant no longer match.
        cell.generation = cell.generation.wrapping_add(1);
        self.local_keys.remove(s.local_public.as_bytes());
        if let Some(list) = self.by_endpoint_ip.get_mut(&s.indexed_ip) {
            list.retain(|&slot| slot != sref.slot);
            if list.is_empty() {
                self.by_endpoint_ip.remove(&s.indexed_ip);
            }
        }
        self.flush_list.retain(|r| *r != sref);
        self.free_sessions.push(sref.slot);
    }

    fn update_session_endpoint(&mut self, sref: SessionRef, endpoint: SocketAddr) {
        let Some(s) = session_mut(&mut self.sessions, sref) else {
            return;
        };
        s.endpoint = endpoint;
        let old_ip = std::mem::replace(&mut s.indexed_ip, endpoint.ip());
        if old_ip != endpoint.ip() {
            if let Some(list) = self.by_endpoint_ip.get_mut(&old_ip) {
                list.retain(|&slot| slot != sref.slot);
                if list.is_empty() {
                    self.by_endpoint_ip.remove(&old_ip);
                }
            }
            self.by_endpoint_ip
                .entry(endpoint.ip())
                .or_default()
                .push(sref.slot);
        }
    }

    /// The session a handshake initiation is addressed to, by mac1.
    fn find_initiation_target(
        &mut self,
        now: Instant,
        src: SocketAddr,
        msg: &[u8],
    ) -> Result<SessionRef, DropReason> {
        if let Some(candidates) = self.by_endpoint_ip.get(&src.ip()) {
            for &slot in candidates {
                if let Some((sref, s)) = live_session(&self.sessions, slot)
                    && wg::initiation_mac1_matches(&s.mac1_key, msg)
                {
                    return Ok(sref);
                }
            }
        }
        // Nothing configured for this source matched: a roamed or NATed
        // peer, or garbage. Scanning everything costs one hash per session,
        // so it is rate-limited.
        if !self.scan_limiter.allow(now) {
            return Err(DropReason::WgHandshakeRateLimited);
        }
        for (i, cell) in self.sessions.iter().enumerate() {
            let Some(s) = &cell.session else { continue };
            if s.indexed_ip == src.ip() {
                continue; // already checked above
            }
            if wg::initiation_mac1_matches(&s.mac1_key, msg) {
                let slot = u16::try_from(i).map_err(|_| DropReason::WgNoSessionForInitiation)?;
                return Ok(SessionRef {
                    slot,
                    generation: cell.generation,
                });
            }
        }
        Err(DropReason::WgNoSessionForInitiation)
    }
}

/// What boringtun made of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decap {
    /// A message to send back (handshake response, keepalive, cookie).
    Reply,
    /// A decrypted IP packet for the pod.
    Packet,
    /// Nothing to do (keepalive received, cookie stored).
    Consumed,
}

fn live_session(sessions: &[SessionSlot], slot: u16) -> Option<(SessionRef, &Session)> {
    let cell = sessions.get(usize::from(slot))?;
    let s = cell.session.as_ref()?;
    Some((
        SessionRef {
            slot,
            generation: cell.generation,
        },
        s,
    ))
}

#[inline]
fn session_mut(sessions: &mut [SessionSlot], sref: SessionRef) -> Option<&mut Session> {
    let cell = sessions.get_mut(usize::from(sref.slot))?;
    if cell.generation != sref.generation {
        return None;
    }
    cell.session.as_mut()
}

#[inline]
fn mark_flush(flush_list: &mut Vec<SessionRef>, s: &mut Session, sref: SessionRef) {
    if !s.needs_flush {
        s.needs_flush = true;
        // Capacity covers every session slot (see `alloc_session`) and a
        // session is listed at most once: this push never allocates.
        flush_list.push(sref);
    }
}

/// Encrypts `ip` for session `s` into `out`.
#[inline]
fn encapsulate<'o>(
    counters: &XconnCounters,
    s: &mut Session,
    ip: &[u8],
    out: &'o mut [u8],
) -> Action<'o> {
    // boringtun panics on a short buffer; check first.
    if out.len() < HANDSHAKE_OUT_LEN.max(ip.len() + DATA_OVERHEAD) {
        counters.drop(DropReason::BufferTooSmall);
        return Action::Drop(DropReason::BufferTooSmall);
    }
    let was_full = s.queued >= QUEUE_CAP;
    let (kind, len) = match s.tunn.encapsulate(ip, out) {
        TunnResult::WriteToNetwork(b) => (b.first().copied().unwrap_or(0), b.len()),
        TunnResult::Err(e) => {
            let r = wg::drop_reason(&e);
            counters.drop(r);
            return Action::Drop(r);
        }
        _ => (0, 0),
    };
    if kind != MSG_DATA {
        // No session yet: boringtun queued the packet (or, full, dropped it)
        // and may have started a handshake.
        if was_full {
            counters.drop(DropReason::WgQueueFull);
            return Action::Drop(DropReason::WgQueueFull);
        }
        s.note_queued(ip.len());
        counters.wg().packets_queued.inc();
        if kind != MSG_INITIATION {
            return Action::Done;
        }
        counters.wg().handshake_initiations_tx.inc();
    }
    let Some(msg) = out.get_mut(..len) else {
        return Action::Drop(DropReason::BufferTooSmall);
    };
    counters.side(Side::B).tx(len);
    Action::ToUnderlay {
        dst: s.endpoint,
        datagram: msg,
    }
}

/// Hands a same-node packet to the other pod, rewriting or adding the
/// Ethernet header as the destination device needs.
#[allow(clippy::too_many_arguments)]
#[inline]
fn deliver_local<'a>(
    counters: &XconnCounters,
    to: Side,
    dst_id: PortId,
    dst: &Port,
    packet: &'a mut [u8],
    l2_len: usize,
    meta: &IpMeta,
    out: &'a mut [u8],
) -> Action<'a> {
    let ip_end = l2_len + meta.len;
    let frame = match (dst.kind, l2_len) {
        // TUN destination: the IP packet, wherever it sits (zero copy).
        (PortKind::Tun, _) => packet.get_mut(l2_len..ip_end),
        // TAP to TAP: rewrite the header in place (zero copy).
        (PortKind::Tap(tap), ETHERNET_HEADER_LEN) => packet.get_mut(..ip_end).map(|f| {
            write_eth_header(f, dst.pod_mac, tap.peer_mac, meta.version);
            &mut *f
        }),
        // TUN to TAP (not produced by validated specs): copy behind a header.
        (PortKind::Tap(tap), _) => {
            let n = ETHERNET_HEADER_LEN + meta.len;
            match (out.get_mut(..n), packet.get(l2_len..ip_end)) {
                (Some(f), Some(ip)) => {
                    f[ETHERNET_HEADER_LEN..].copy_from_slice(ip);
                    write_eth_header(f, dst.pod_mac, tap.peer_mac, meta.version);
                    Some(f)
                }
                _ => None,
            }
        }
    };
    let Some(frame) = frame else {
        counters.drop(DropReason::BufferTooSmall);
        return Action::Drop(DropReason::BufferTooSmall);
    };
    counters.side(to).tx(frame.len());
    Action::ToPod {
        port: dst_id,
        packet: frame,
    }
}

/// Writes dst MAC, src MAC and EtherType at the start of `frame`.
#[inline]
fn write_eth_header(frame: &mut [u8], dst: MacAddr, src: MacAddr, version: IpVersion) {
    let ether_type: [u8; 2] = match version {
        IpVersion::V4 => [0x08, 0x00],
        IpVersion::V6 => [0x86, 0xdd],
    };
    if let Some(h) = frame.get_mut(..ETHERNET_HEADER_LEN) {
        h[..6].copy_from_slice(&dst.0);
        h[6..12].copy_from_slice(&src.0);
        h[12..].copy_from_slice(&ether_type);
    }
}

#[inline]
fn reply_to_pod<'o>(
    counters: &XconnCounters,
    side: Side,
    port: PortId,
    out: &'o mut [u8],
    n: usize,
) -> Action<'o> {
    match out.get_mut(..n) {
        Some(reply) => {
            counters.side(side).tx(n);
            Action::ToPod {
                port,
                packet: reply,
            }
        }
        None => {
            counters.drop(DropReason::BufferTooSmall);
            Action::Drop(DropReason::BufferTooSmall)
        }
    }
}

/// Answers an oversized packet with ICMP(v6) "too big" from the peer
/// address, framed for a TAP if needed. The packet itself is dropped.
#[allow(clippy::too_many_arguments)]
#[cold]
fn too_big<'o>(
    counters: &XconnCounters,
    side: Side,
    port: PortId,
    end: &PodEnd,
    mtu: u16,
    ip: &[u8],
    meta: &IpMeta,
    tap: Option<(MacAddr, MacAddr)>,
    out: &'o mut [u8],
) -> Action<'o> {
    let l2 = if tap.is_some() {
        ETHERNET_HEADER_LEN
    } else {
        0
    };
    let body = out.get_mut(l2..).unwrap_or(&mut []);
    let built = match meta.version {
        IpVersion::V4 => icmp::frag_needed_v4(ip, meta, mtu, end.peer_ipv4, body),
        IpVersion::V6 => icmp::packet_too_big_v6(ip, meta, mtu, end.peer_ipv6, body),
    };
    counters.drop(match built {
        Ok(_) => DropReason::PacketTooBig,
        Err(r) => r,
    });
    match built {
        Ok(n) => {
            let Some(reply) = out.get_mut(..l2 + n) else {
                return Action::Drop(DropReason::BufferTooSmall);
            };
            if let Some((pod_mac, peer_mac)) = tap {
                write_eth_header(reply, pod_mac, peer_mac, meta.version);
            }
            counters.side(side).tx(reply.len());
            Action::ToPod {
                port,
                packet: reply,
            }
        }
        Err(r) => Action::Drop(r),
    }
}

#[cfg(test)]
mod tests;
