//! `nat44`: source NAT of IPv4 packets to one address, with the connection
//! tracking that brings the replies back.
//!
//! Packets going the `outbound` direction get their source address replaced
//! by the NAT address, and their TCP/UDP source port (or ICMP echo id)
//! replaced by one from the configured range; packets the other way that
//! are addressed to the NAT address are translated back. IPv6 passes
//! untouched, and so do inbound packets for other addresses.
//!
//! # Mappings
//! Two fixed-capacity flow tables (`flow::FlowTable`, see `stages/flow.rs`), allocated
//! when the stage is built:
//! - `out`: the original 5-tuple -> NAT port;
//! - `inb`: (remote address, remote port, NAT port, protocol) -> original
//!   source address and port.
//!
//! Mappings are endpoint dependent (the NAT port is unique per remote
//! endpoint, not globally), so one NAT address serves up to the port range
//! per remote address and port. A new mapping tries the original port
//! first, then up to 32 ports from a rotating cursor; if none is free (or
//! the tables have no slot) the packet is dropped
//! ([`DropReason::NatExhausted`]). Every packet refreshes both entries; a
//! mapping idle for `idle_timeout` is forgotten. O(1) per packet.
//!
//! # Checksums
//! Updated incrementally (RFC 1624, `HC' = ~(~HC + ~m + m')`): the IPv4
//! header checksum for the address; the TCP or UDP checksum for the address
//! (pseudo-header) and port; the ICMP checksum for the echo id. A UDP
//! checksum of zero ("none") stays zero. A first fragment is translated like
//! a whole packet (the delta is right for the whole datagram's checksum).
//!
//! # Not translated (dropped, [`DropReason::NatUntranslatable`])
//! Later fragments (no ports to find the mapping by), protocols other than
//! TCP, UDP and ICMP echo, ICMP errors (whose embedded header would need
//! translating too), truncated upper-layer headers. Packets to the NAT
//! address with no mapping are [`DropReason::NatNoMapping`].

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use crate::counters::Counter;
use crate::drop::DropReason;
use crate::packet::{IpPacket, IpVersion, read_array};
use crate::stage::{Direction, Stage, StageCtx, Verdict};
use crate::stages::flow::{Fields, FlowKey, FlowTable, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::stages::spec::Nat44Spec;

/// Candidate ports tried for a new mapping (besides the original one).
const TRIES: u32 = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Orig {
    addr: u32,
    port: u16,
}

#[derive(Debug, Default)]
struct Counters {
    translated_out: Counter,
    translated_in: Counter,
    mappings: Counter,
    exhausted: Counter,
    no_mapping: Counter,
    untranslatable: Counter,
}

/// The `nat44` service function.
#[derive(Debug)]
pub struct Nat44Stage {
    addr: u32,
    lo: u16,
    span: u32,
    cursor: u32,
    outbound: Direction,
    idle: Duration,
    out: FlowTable<FlowKey, u16>,
    inb: FlowTable<FlowKey, Orig>,
    counters: Arc<Counters>,
}

/// Reads a [`Nat44Stage`]'s counters from any thread.
#[derive(Clone, Debug)]
pub struct Nat44Handle(Arc<Counters>);

/// A NAT's counters, as plain numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Nat44Snapshot {
    /// Outbound packets translated.
    pub translated_out: u64,
    /// Inbound packets translated back.
    pub translated_in: u64,
    /// Mappings created.
    pub mappings: u64,
    /// New flows dropped: no free port or slot.
    pub exhausted: u64,
    /// Inbound packets to the NAT address without a mapping (dropped).
    pub no_mapping: u64,
    /// Packets that cannot be translated (dropped).
    pub untranslatable: u64,
}

impl Nat44Handle {
    /// Reads the counters.
    pub fn snapshot(&self) -> Nat44Snapshot {
        let c = &self.0;
        Nat44Snapshot {
            translated_out: c.translated_out.get(),
            translated_in: c.translated_in.get(),
            mappings: c.mappings.get(),
            exhausted: c.exhausted.get(),
            no_mapping: c.no_mapping.get(),
            untranslatable: c.untranslatable.get(),
        }
    }
}

// --- checksums -------------------------------------------------------------------

/// RFC 1624 incremental update of a ones'-complement checksum for a change
/// of `old` to `new` (same length, even).
#[inline]
pub(crate) fn csum_adjust(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u64::from(!csum);
    for c in old.chunks(2) {
        let w = u16::from_be_bytes([
            c.first().copied().unwrap_or(0),
            c.get(1).copied().unwrap_or(0),
        ]);
        sum += u64::from(!w);
    }
    for c in new.chunks(2) {
        let w = u16::from_be_bytes([
            c.first().copied().unwrap_or(0),
            c.get(1).copied().unwrap_or(0),
        ]);
        sum += u64::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

#[inline]
fn read16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(read_array::<2>(b, off))
}

#[inline]
fn write16(b: &mut [u8], off: usize, v: u16) {
    if let Some(d) = b.get_mut(off..off + 2) {
        d.copy_from_slice(&v.to_be_bytes());
    }
}

/// Which L4 field carries the translated "port".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L4 {
    Tcp,
    Udp,
    IcmpEcho,
}

impl L4 {
    /// What the packet is, if translatable (header long enough to rewrite).
    fn of(f: &Fields, l4_len: usize) -> Option<L4> {
        match f.proto {
            PROTO_TCP if f.ports.is_some() && l4_len >= 18 => Some(L4::Tcp),
            PROTO_UDP if f.ports.is_some() && l4_len >= 8 => Some(L4::Udp),
            PROTO_ICMP if f.echo.is_some() => Some(L4::IcmpEcho),
            _ => None,
        }
    }
}

/// Rewrites the source (`src = true`) or destination address and port of
/// an IPv4 packet, with every checksum it covers. Offsets are within the
/// lengths [`L4::of`] checked; writes past them are no-ops, never panics.
fn rewrite(packet: &mut IpPacket<'_>, l4: L4, src: bool, addr: u32, port: u16) {
    let header_len = packet.meta().header_len;
    let bytes = packet.bytes_mut();
    let addr_off = if src { 12 } else { 16 };
    let old_addr = read_array::<4>(bytes, addr_off);
    let new_addr = addr.to_be_bytes();
    let ip_csum = read16(bytes, 10);
    write16(bytes, 10, csum_adjust(ip_csum, &old_addr, &new_addr));
    if let Some(d) = bytes.get_mut(addr_off..addr_off + 4) {
        d.copy_from_slice(&new_addr);
    }
    let Some(seg) = bytes.get_mut(header_len..) else {
        return;
    };
    let (port_off, csum_off) = match l4 {
        L4::Tcp => (if src { 0 } else { 2 }, 16),
        L4::Udp => (if src { 0 } else { 2 }, 6),
        L4::IcmpEcho => (4, 2),
    };
    let old_port = read16(seg, port_off);
    write16(seg, port_off, port);
    let csum = read16(seg, csum_off);
    let new = match l4 {
        L4::IcmpEcho => csum_adjust(csum, &old_port.to_be_bytes(), &port.to_be_bytes()),
        L4::Udp if csum == 0 => return,
        L4::Tcp | L4::Udp => {
            let mut old = [0u8; 6];
            old[..4].copy_from_slice(&old_addr);
            old[4..].copy_from_slice(&old_port.to_be_bytes());
            let mut new = [0u8; 6];
            new[..4].copy_from_slice(&new_addr);
            new[4..].copy_from_slice(&port.to_be_bytes());
            let c = csum_adjust(csum, &old, &new);
            if l4 == L4::Udp && c == 0 { 0xffff } else { c }
        }
    };
    write16(seg, csum_off, new);
}

// --- stage -----------------------------------------------------------------------

impl Nat44Stage {
    /// Builds the stage from a validated spec (allocates both tables).
    pub(crate) fn new(spec: &Nat44Spec) -> (Self, Nat44Handle) {
        let counters = Arc::new(Counters::default());
        let stage = Nat44Stage {
            addr: u32::from(spec.address),
            lo: spec.ports.lo,
            span: u32::from(spec.ports.hi.saturating_sub(spec.ports.lo)) + 1,
            cursor: 0,
            outbound: spec.outbound,
            idle: spec.idle_timeout,
            out: FlowTable::new(spec.capacity),
            inb: FlowTable::new(spec.capacity),
            counters: counters.clone(),
        };
        (stage, Nat44Handle(counters))
    }

    /// The NAT address.
    pub fn address(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }

    fn addr_bits(&self) -> u128 {
        u128::from(self.addr) << 96
    }

    fn in_range(&self, port: u16) -> bool {
        port >= self.lo && u32::from(port - self.lo) < self.span
    }

    /// The reply-side key of a mapping through `nat_port`.
    fn inb_key(&self, f: &Fields, nat_port: u16) -> FlowKey {
        FlowKey {
            v6: false,
            proto: f.proto,
            a: f.dst,
            b: self.addr_bits(),
            pa: f.flow_ports.1,
            pb: nat_port,
        }
    }

    /// Finds or creates the NAT port for an outbound flow.
    fn map_out(&mut self, f: &Fields, now: std::time::Instant) -> Result<u16, DropReason> {
        let key = FlowKey::of(f);
        if let Some(p) = self.out.touch(&key, now, self.idle) {
            let ik = self.inb_key(f, p);
            if self.inb.touch(&ik, now, self.idle).is_some() {
                return Ok(p);
            }
            // Half a mapping (the other half's slot was reused): redo it.
            self.out.remove(&key);
        }
        let orig = Orig {
            addr: u32::try_from(f.src >> 96).unwrap_or(0),
            port: f.flow_ports.0,
        };
        let first = self.in_range(orig.port).then_some(orig.port);
        let start = self.cursor;
        self.cursor = self.cursor.wrapping_add(TRIES);
        let cursor = (0..TRIES).map(|i| {
            let off = start.wrapping_add(i) % self.span;
            self.lo.wrapping_add(u16::try_from(off).unwrap_or(0))
        });
        let candidates: [Option<u16>; 1] = [first];
        for port in candidates.into_iter().flatten().chain(cursor) {
            let ik = self.inb_key(f, port);
            if self.inb.contains(&ik, now) || self.inb.insert(ik, orig, now, self.idle).is_err() {
                continue;
            }
            if self.out.insert(key, port, now, self.idle).is_err() {
                self.inb.remove(&ik);
                return Err(DropReason::NatExhausted);
            }
            self.counters.mappings.inc();
            return Ok(port);
        }
        Err(DropReason::NatExhausted)
    }

    fn outbound(&mut self, ctx: &StageCtx, packet: &mut IpPacket<'_>, f: Fields) -> Verdict {
        let Some(l4) = L4::of(&f, packet.l4().len()) else {
            self.counters.untranslatable.inc();
            return Verdict::Drop(DropReason::NatUntranslatable);
        };
        if l4 == L4::IcmpEcho && !f.echo.is_some_and(|e| e.request) {
            self.counters.untranslatable.inc();
            return Verdict::Drop(DropReason::NatUntranslatable);
        }
        match self.map_out(&f, ctx.now) {
            Ok(port) => {
                rewrite(packet, l4, true, self.addr, port);
                self.counters.translated_out.inc();
                Verdict::Pass
            }
            Err(r) => {
                self.counters.exhausted.inc();
                Verdict::Drop(r)
            }
        }
    }

    fn inbound(&mut self, ctx: &StageCtx, packet: &mut IpPacket<'_>, f: Fields) -> Verdict {
        if f.dst != self.addr_bits() {
            return Verdict::Pass;
        }
        let l4 = L4::of(&f, packet.l4().len());
        let reply_echo = f.echo.is_some_and(|e| !e.request);
        let Some(l4) = l4.filter(|l| *l != L4::IcmpEcho || reply_echo) else {
            self.counters.no_mapping.inc();
            return Verdict::Drop(DropReason::NatNoMapping);
        };
        let key = FlowKey::of(&f);
        let Some(orig) = self.inb.touch(&key, ctx.now, self.idle) else {
            self.counters.no_mapping.inc();
            return Verdict::Drop(DropReason::NatNoMapping);
        };
        // Keep the outbound half alive too.
        let ok = FlowKey {
            v6: false,
            proto: f.proto,
            a: u128::from(orig.addr) << 96,
            b: f.src,
            pa: orig.port,
            pb: f.flow_ports.0,
        };
        let _ = self.out.touch(&ok, ctx.now, self.idle);
        rewrite(packet, l4, false, orig.addr, orig.port);
        self.counters.translated_in.inc();
        Verdict::Pass
    }
}

impl Nat44Stage {
    /// [`Stage::process`] with a chain's cache of the packet's fields;
    /// emptied when the packet is rewritten.
    #[inline]
    pub(crate) fn run(
        &mut self,
        ctx: &StageCtx,
        packet: &mut IpPacket<'_>,
        fields: &mut Option<Fields>,
    ) -> Verdict {
        if packet.meta().version != IpVersion::V4 {
            return Verdict::Pass;
        }
        if packet.meta().later_fragment {
            self.counters.untranslatable.inc();
            return Verdict::Drop(DropReason::NatUntranslatable);
        }
        let f = *Fields::cached(fields, packet);
        // Translation rewrites addresses and ports: whatever runs next
        // reads them again.
        *fields = None;
        if ctx.direction == self.outbound {
            self.outbound(ctx, packet, f)
        } else {
            self.inbound(ctx, packet, f)
        }
    }
}

impl Stage for Nat44Stage {
    #[inline]
    fn process(&mut self, ctx: &StageCtx, packet: &mut IpPacket<'_>) -> Verdict {
        self.run(ctx, packet, &mut None)
    }

    fn name(&self) -> &'static str {
        "nat44"
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
    use std::time::Instant;

    const NAT: [u8; 4] = [192, 0, 2, 100];
    const POD: [u8; 4] = [10, 0, 0, 1];
    const SERVER: [u8; 4] = [198, 51, 100, 7];

    fn spec() -> Nat44Spec {
        let mut s = Nat44Spec::new(NAT.into());
        s.ports = crate::stages::spec::PortRange::new(20000, 20099);
        s
    }

    fn run(nat: &mut Nat44Stage, dir: Direction, buf: &mut [u8]) -> Verdict {
        let mut p = IpPacket::parse(buf).expect("valid");
        nat.process(
            &StageCtx {
                now: Instant::now(),
                direction: dir,
            },
            &mut p,
        )
    }

    /// Checks every checksum with etherparse's own computation; returns
    /// (src, dst, sport-or-id, dport).
    fn verify(buf: &[u8]) -> ([u8; 4], [u8; 4], u16, u16) {
        let s = SlicedPacket::from_ip(buf).expect("parse");
        let Some(NetSlice::Ipv4(ip)) = s.net else {
            panic!("not v4")
        };
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum(), "ip checksum");
        let payload = ip.payload().payload;
        let (a, b) = match s.transport.expect("transport") {
            TransportSlice::Tcp(t) => {
                let th = t.to_header();
                let c = th.calc_checksum_ipv4(&h, t.payload()).expect("checksum");
                assert_eq!(th.checksum, c, "tcp checksum");
                (t.source_port(), t.destination_port())
            }
            TransportSlice::Udp(u) => {
                let uh = u.to_header();
                let c = uh.calc_checksum_ipv4(&h, u.payload()).expect("checksum");
                assert_eq!(uh.checksum, c, "udp checksum");
                (u.source_port(), u.destination_port())
            }
            TransportSlice::Icmpv4(i) => {
                let ih = i.header();
                let c = ih.icmp_type.calc_checksum(i.payload());
                assert_eq!(ih.checksum, c, "icmp checksum");
                (read16(payload, 4), 0)
            }
            other => panic!("{other:?}"),
        };
        (h.source, h.destination, a, b)
    }

    macro_rules! build {
        ($b:expr, $payload:expr) => {{
            let mut v = Vec::new();
            $b.write(&mut v, $payload).expect("write");
            v
        }};
    }

    #[test]
    fn tcp_udp_icmp_rewrite_and_reverse_with_valid_checksums() {
        let (mut nat, h) = Nat44Stage::new(&spec());
        let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (
                build!(
                    PacketBuilder::ipv4(POD, SERVER, 64).tcp(40000, 443, 1, 100),
                    b"hello"
                ),
                build!(
                    PacketBuilder::ipv4(SERVER, NAT, 64).tcp(443, 0, 1, 100),
                    b"world!"
                ),
            ),
            (
                build!(PacketBuilder::ipv4(POD, SERVER, 64).udp(20042, 53), b"q"),
                build!(PacketBuilder::ipv4(SERVER, NAT, 64).udp(53, 0), b"answer"),
            ),
            (
                build!(
                    PacketBuilder::ipv4(POD, SERVER, 64).icmpv4_echo_request(77, 1),
                    b"ping"
                ),
                build!(
                    PacketBuilder::ipv4(SERVER, NAT, 64).icmpv4_echo_reply(0, 1),
                    b"ping"
                ),
            ),
        ];
        for (i, (mut out, mut back)) in cases.into_iter().enumerate() {
            assert_eq!(run(&mut nat, Direction::AToB, &mut out), Verdict::Pass);
            let (src, dst, port, _) = verify(&out);
            assert_eq!((src, dst), (NAT, SERVER), "case {i}");
            assert!((20000..20100).contains(&port), "case {i}: {port}");
            if i == 1 {
                assert_eq!(port, 20042, "an in-range original port is kept");
            }
            // Address the reply to the mapped port (or echo id), fixing its
            // checksum the way a real sender would.
            let l4_off = 20;
            let port_off = if i == 2 { l4_off + 4 } else { l4_off + 2 };
            back[port_off..port_off + 2].copy_from_slice(&port.to_be_bytes());
            let fixed = {
                let s = SlicedPacket::from_ip(&back).expect("parse");
                let Some(NetSlice::Ipv4(ip)) = s.net else {
                    panic!()
                };
                let h = ip.header().to_header();
                match s.transport.expect("t") {
                    TransportSlice::Tcp(t) => t
                        .to_header()
                        .calc_checksum_ipv4(&h, t.payload())
                        .expect("c"),
                    TransportSlice::Udp(u) => u
                        .to_header()
                        .calc_checksum_ipv4(&h, u.payload())
                        .expect("c"),
                    TransportSlice::Icmpv4(ic) => ic.header().icmp_type.calc_checksum(ic.payload()),
                    _ => panic!(),
                }
            };
            let csum_off = l4_off + [16, 6, 2][i];
            back[csum_off..csum_off + 2].copy_from_slice(&fixed.to_be_bytes());
            verify(&back);

            assert_eq!(run(&mut nat, Direction::BToA, &mut back), Verdict::Pass);
            let (src, dst, a, b) = verify(&back);
            assert_eq!((src, dst), (SERVER, POD), "case {i}");
            let expect = [40000, 20042, 77][i];
            if i == 2 {
                assert_eq!(a, expect);
            } else {
                assert_eq!(b, expect);
            }
        }
        let s = h.snapshot();
        assert_eq!((s.translated_out, s.translated_in, s.mappings), (3, 3, 3));
    }

    #[test]
    fn same_flow_same_port_and_unknown_replies_dropped() {
        let (mut nat, h) = Nat44Stage::new(&spec());
        let pkt = build!(PacketBuilder::ipv4(POD, SERVER, 64).udp(1, 53), b"x");
        let mut a = pkt.clone();
        let mut b = pkt.clone();
        assert_eq!(run(&mut nat, Direction::AToB, &mut a), Verdict::Pass);
        assert_eq!(run(&mut nat, Direction::AToB, &mut b), Verdict::Pass);
        assert_eq!(a, b);
        let mut stray = build!(PacketBuilder::ipv4(SERVER, NAT, 64).udp(53, 20099), b"x");
        assert_eq!(
            run(&mut nat, Direction::BToA, &mut stray),
            Verdict::Drop(DropReason::NatNoMapping)
        );
        // Inbound to someone else: untouched.
        let mut other = build!(PacketBuilder::ipv4(SERVER, POD, 64).udp(53, 1), b"x");
        let copy = other.clone();
        assert_eq!(run(&mut nat, Direction::BToA, &mut other), Verdict::Pass);
        assert_eq!(other, copy);
        // GRE: untranslatable.
        let mut gre = build!(PacketBuilder::ipv4(POD, SERVER, 64).udp(1, 2), b"x");
        gre[9] = 47;
        assert_eq!(
            run(&mut nat, Direction::AToB, &mut gre),
            Verdict::Drop(DropReason::NatUntranslatable)
        );
        let s = h.snapshot();
        assert_eq!((s.mappings, s.no_mapping, s.untranslatable), (1, 1, 1));
    }

    #[test]
    fn port_exhaustion_is_a_counted_drop() {
        let mut s = spec();
        s.ports = crate::stages::spec::PortRange::new(30000, 30003);
        let (mut nat, h) = Nat44Stage::new(&s);
        for sport in 0..4 {
            let mut p = build!(
                PacketBuilder::ipv4(POD, SERVER, 64).tcp(sport, 80, 1, 1),
                b""
            );
            assert_eq!(run(&mut nat, Direction::AToB, &mut p), Verdict::Pass);
        }
        let mut p = build!(PacketBuilder::ipv4(POD, SERVER, 64).tcp(9, 80, 1, 1), b"");
        assert_eq!(
            run(&mut nat, Direction::AToB, &mut p),
            Verdict::Drop(DropReason::NatExhausted)
        );
        // Another server port is another endpoint: ports are free again.
        let mut p = build!(PacketBuilder::ipv4(POD, SERVER, 64).tcp(9, 81, 1, 1), b"");
        assert_eq!(run(&mut nat, Direction::AToB, &mut p), Verdict::Pass);
        assert_eq!(h.snapshot().exhausted, 1);
    }

    /// Random flows out and their replies back: every checksum stays
    /// valid (checked by etherparse's full recomputation) and the reply
    /// reaches the original source address and port.
    #[test]
    fn random_flows_keep_valid_checksums_both_ways() {
        let (mut nat, _) = Nat44Stage::new(&spec());
        let mut rng = crate::stages::flow::SplitMix64::new(5);
        for i in 0..2000u32 {
            let r = rng.next_u64().to_le_bytes();
            let src = [10, r[0], r[1], r[2]];
            let dst = [198, 51, 100, r[3]];
            let (sport, dport) = (u16::from_le_bytes([r[4], r[5]]), 1 + u16::from(r[6]));
            let payload: Vec<u8> = (0..usize::from(r[7])).map(|j| r[j % 8] ^ j as u8).collect();
            let kind = i % 3;
            let mut out = match kind {
                0 => build!(
                    PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, i, 100),
                    &payload
                ),
                1 => build!(
                    PacketBuilder::ipv4(src, dst, 64).udp(sport, dport),
                    &payload
                ),
                _ => build!(
                    PacketBuilder::ipv4(src, dst, 64).icmpv4_echo_request(sport, 1),
                    &payload
                ),
            };
            assert_eq!(run(&mut nat, Direction::AToB, &mut out), Verdict::Pass);
            let (s, d, p, _) = verify(&out);
            assert_eq!((s, d), (NAT, dst));
            let mut back = match kind {
                0 => build!(
                    PacketBuilder::ipv4(dst, NAT, 64).tcp(dport, p, 7, 100),
                    &payload
                ),
                1 => build!(PacketBuilder::ipv4(dst, NAT, 64).udp(dport, p), &payload),
                _ => build!(
                    PacketBuilder::ipv4(dst, NAT, 64).icmpv4_echo_reply(p, 1),
                    &payload
                ),
            };
            assert_eq!(
                run(&mut nat, Direction::BToA, &mut back),
                Verdict::Pass,
                "flow {i}"
            );
            let (s, d, a, b) = verify(&back);
            assert_eq!((s, d), (dst, src));
            assert_eq!(if kind == 2 { a } else { b }, sport, "flow {i}");
        }
    }

    #[test]
    fn csum_adjust_matches_recomputation() {
        // Worked example from RFC 1624 section 4: HC 0xdd2f, m 0x5555 -> 0x3285.
        assert_eq!(csum_adjust(0xdd2f, &[0x55, 0x55], &[0x32, 0x85]), 0x0000);
    }
}
