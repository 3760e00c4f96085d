//! Frame parsing and building for the UDP underlay: Ethernet, ARP, IPv4,
//! IPv6, UDP and the two neighbour-discovery messages. Pure functions over
//! byte slices (no DPDK), so they are unit-tested and fuzzed directly.
//!
//! Parsing validates what the kernel validates before it hands a datagram
//! to a socket: header lengths against the frame, the IPv4 header checksum,
//! the UDP checksum (optional over IPv4, mandatory over IPv6), and for NDP
//! the ICMPv6 checksum, hop limit 255 and option lengths (RFC 4861 7.1).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use etherparse::checksum::Sum16BitWords;
use etherparse::err::ipv4::HeaderSliceError as Ipv4Error;
use etherparse::err::ipv6::HeaderSliceError as Ipv6Error;
use etherparse::{Ethernet2HeaderSlice, Ipv4HeaderSlice, Ipv6HeaderSlice};

use crate::stats::RxDrop;

pub(crate) const ETH_LEN: usize = 14;
pub(crate) const IPV4_LEN: usize = 20;
pub(crate) const IPV6_LEN: usize = 40;
pub(crate) const UDP_LEN: usize = 8;
/// Ethernet's minimum frame without FCS; shorter frames are padded since
/// not every NIC pads by itself.
pub(crate) const MIN_FRAME: usize = 60;
/// Ethernet + IPv4 + UDP headers.
pub(crate) const UDP4_HEADERS: usize = ETH_LEN + IPV4_LEN + UDP_LEN;
/// Ethernet + IPv6 + UDP headers.
pub(crate) const UDP6_HEADERS: usize = ETH_LEN + IPV6_LEN + UDP_LEN;
/// ARP over Ethernet for IPv4, padded to the minimum frame.
pub(crate) const ARP_FRAME: usize = MIN_FRAME;
/// A neighbour solicitation or advertisement with one link-layer option.
pub(crate) const NDP_FRAME: usize = ETH_LEN + IPV6_LEN + NDP_LEN;
const NDP_LEN: usize = 32;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
const PROTO_IPV6_FRAGMENT: u8 = 44;
const ICMPV6_NS: u8 = 135;
const ICMPV6_NA: u8 = 136;
const NDP_OPT_SOURCE_LL: u8 = 1;
const NDP_OPT_TARGET_LL: u8 = 2;
const NA_FLAG_SOLICITED: u8 = 0x40;
const NA_FLAG_OVERRIDE: u8 = 0x20;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

pub(crate) const BROADCAST_MAC: [u8; 6] = [0xff; 6];
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// What this end of the underlay is: its MAC, its address and UDP port.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Local {
    pub(crate) mac: [u8; 6],
    pub(crate) addr: SocketAddr,
}

/// ARP operation of a handled ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArpOp {
    Request,
    Reply,
}

/// The outcome of [`classify`] for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rx {
    /// A UDP datagram for our address and port; the payload is
    /// `frame[offset..offset + len]`.
    Datagram {
        src: SocketAddr,
        offset: u16,
        len: u16,
    },
    /// An ARP packet. `for_us`: its target address is ours.
    Arp {
        op: ArpOp,
        sender_mac: [u8; 6],
        sender_ip: Ipv4Addr,
        for_us: bool,
    },
    /// A neighbour solicitation for our address. `src` is unspecified for
    /// duplicate address detection; `src_mac` is the source link-layer
    /// option, or the Ethernet source when it is absent.
    Solicitation {
        src: Ipv6Addr,
        src_mac: [u8; 6],
        has_source_ll: bool,
    },
    /// A neighbour advertisement: `target` is at `mac` (the target
    /// link-layer option, or the Ethernet source when it is absent).
    Advertisement {
        target: Ipv6Addr,
        mac: [u8; 6],
        solicited: bool,
        override_flag: bool,
    },
    /// Not for us or invalid.
    Drop(RxDrop),
}

/// A header length field from a length in bytes. Frames live in mbufs,
/// whose lengths are `u16`, so this never saturates in practice.
fn len16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn mac_at(b: &[u8], at: usize) -> [u8; 6] {
    let mut mac = [0; 6];
    mac.copy_from_slice(&b[at..at + 6]);
    mac
}

fn is_multicast_mac(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 1
}

/// The solicited-node multicast group of `ip` (RFC 4291 2.7.1).
pub(crate) fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The Ethernet multicast address of IPv6 group `ip` (RFC 2464 7).
pub(crate) fn multicast_mac(ip: Ipv6Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// Classifies one Ethernet frame (without FCS) for `local`.
///
/// Never panics, whatever `frame` holds.
pub(crate) fn classify(frame: &[u8], local: &Local) -> Rx {
    let Ok(eth) = Ethernet2HeaderSlice::from_slice(frame) else {
        return Rx::Drop(RxDrop::Truncated);
    };
    let dst_mac = eth.destination();
    let src_mac = eth.source();
    if is_multicast_mac(&src_mac) {
        return Rx::Drop(RxDrop::BadSource);
    }
    let rest = &frame[ETH_LEN..];
    let unicast_to_us = dst_mac == local.mac;
    match (be16(frame, 12), local.addr.ip()) {
        (ETHERTYPE_ARP, IpAddr::V4(ours)) => {
            if !unicast_to_us && dst_mac != BROADCAST_MAC {
                return Rx::Drop(RxDrop::NotForUs);
            }
            arp(rest, ours)
        }
        (ETHERTYPE_IPV4, IpAddr::V4(ours)) => {
            if !unicast_to_us {
                return Rx::Drop(RxDrop::NotForUs);
            }
            ipv4(rest, ours, local.addr.port(), ETH_LEN)
        }
        (ETHERTYPE_IPV6, IpAddr::V6(ours)) => {
            // Unicast to us, or the multicast groups neighbour discovery
            // uses: our solicited-node group (solicitations) and all-nodes
            // (unsolicited advertisements).
            let multicast_ok = dst_mac == multicast_mac(solicited_node(ours))
                || dst_mac == multicast_mac(ALL_NODES);
            if !unicast_to_us && !multicast_ok {
                return Rx::Drop(RxDrop::NotForUs);
            }
            ipv6(rest, ours, local.addr.port(), src_mac, unicast_to_us)
        }
        (ETHERTYPE_ARP | ETHERTYPE_IPV4 | ETHERTYPE_IPV6, _) => Rx::Drop(RxDrop::NotForUs),
        _ => Rx::Drop(RxDrop::UnknownEtherType),
    }
}

/// ARP for IPv4 over Ethernet (RFC 826).
fn arp(p: &[u8], ours: Ipv4Addr) -> Rx {
    if p.len() < 28 {
        return Rx::Drop(RxDrop::Truncated);
    }
    // htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4: nothing else is ours.
    if be16(p, 0) != 1 || be16(p, 2) != ETHERTYPE_IPV4 || p[4] != 6 || p[5] != 4 {
        return Rx::Drop(RxDrop::Malformed);
    }
    let op = match be16(p, 6) {
        ARP_REQUEST => ArpOp::Request,
        ARP_REPLY => ArpOp::Reply,
        _ => return Rx::Drop(RxDrop::Malformed),
    };
    let sender_mac = mac_at(p, 8);
    let sender_ip = Ipv4Addr::new(p[14], p[15], p[16], p[17]);
    let target_ip = Ipv4Addr::new(p[24], p[25], p[26], p[27]);
    if is_multicast_mac(&sender_mac) || sender_ip.is_multicast() || sender_ip.is_broadcast() {
        return Rx::Drop(RxDrop::BadSource);
    }
    Rx::Arp {
        op,
        sender_mac,
        sender_ip,
        for_us: target_ip == ours,
    }
}

/// The sum of the pseudo-header of an upper-layer packet (RFC 768, 8200).
fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: u32) -> Sum16BitWords {
    let sum = Sum16BitWords::new();
    let sum = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum.add_slice(&s.octets()).add_slice(&d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum.add_slice(&s.octets()).add_slice(&d.octets()),
        // Mixed families never reach here: both come from one IP header.
        _ => sum,
    };
    sum.add_slice(&len.to_be_bytes()).add_2bytes([0, proto])
}

fn ipv4(p: &[u8], ours: Ipv4Addr, port: u16, base: usize) -> Rx {
    let ip = match Ipv4HeaderSlice::from_slice(p) {
        Ok(ip) => ip,
        Err(Ipv4Error::Len(_)) => return Rx::Drop(RxDrop::Truncated),
        Err(Ipv4Error::Content(_)) => return Rx::Drop(RxDrop::Malformed),
    };
    let header_len = ip.slice().len();
    if Sum16BitWords::new().add_slice(ip.slice()).ones_complement() != 0 {
        return Rx::Drop(RxDrop::BadIpv4Checksum);
    }
    let total = usize::from(ip.total_len());
    if total < header_len {
        return Rx::Drop(RxDrop::Malformed);
    }
    if total > p.len() {
        return Rx::Drop(RxDrop::Truncated);
    }
    let dst = ip.destination_addr();
    if dst != ours {
        return Rx::Drop(RxDrop::NotForUs);
    }
    let src = ip.source_addr();
    if src.is_multicast() || src.is_broadcast() || src.is_unspecified() || src == ours {
        return Rx::Drop(RxDrop::BadSource);
    }
    if ip.is_fragmenting_payload() {
        return Rx::Drop(RxDrop::Fragment);
    }
    if ip.protocol().0 != PROTO_UDP {
        return Rx::Drop(RxDrop::UnsupportedProtocol);
    }
    // Ethernet padding past the IP total length is cut off here.
    udp(
        &p[header_len..total],
        src.into(),
        dst.into(),
        port,
        base + header_len,
    )
}

/// A UDP segment (`seg`: from the UDP header to the end of the IP payload)
/// starting at frame offset `base`.
fn udp(seg: &[u8], src: IpAddr, dst: IpAddr, port: u16, base: usize) -> Rx {
    if seg.len() < UDP_LEN {
        return Rx::Drop(RxDrop::Truncated);
    }
    let len = usize::from(be16(seg, 4));
    if len < UDP_LEN {
        return Rx::Drop(RxDrop::Malformed);
    }
    if len > seg.len() {
        return Rx::Drop(RxDrop::Truncated);
    }
    // Like the kernel, trust the UDP length when the IP payload is longer.
    let seg = &seg[..len];
    let checksum = be16(seg, 6);
    if checksum == 0 {
        // "No checksum" exists only for IPv4 (RFC 768); IPv6 forbids it
        // (RFC 8200 8.1) and the kernel drops such datagrams.
        if src.is_ipv6() {
            return Rx::Drop(RxDrop::BadChecksum);
        }
    } else {
        let sum = pseudo_header(src, dst, PROTO_UDP, u32::from(len16(len))).add_slice(seg);
        if sum.ones_complement() != 0 {
            return Rx::Drop(RxDrop::BadChecksum);
        }
    }
    if be16(seg, 2) != port {
        return Rx::Drop(RxDrop::WrongPort);
    }
    let (Ok(offset), Ok(payload_len)) =
        (u16::try_from(base + UDP_LEN), u16::try_from(len - UDP_LEN))
    else {
        return Rx::Drop(RxDrop::Malformed);
    };
    Rx::Datagram {
        src: SocketAddr::new(src, be16(seg, 0)),
        offset,
        len: payload_len,
    }
}

fn ipv6(p: &[u8], ours: Ipv6Addr, port: u16, eth_src: [u8; 6], unicast_to_us: bool) -> Rx {
    let ip = match Ipv6HeaderSlice::from_slice(p) {
        Ok(ip) => ip,
        Err(Ipv6Error::Len(_)) => return Rx::Drop(RxDrop::Truncated),
        Err(Ipv6Error::Content(_)) => return Rx::Drop(RxDrop::Malformed),
    };
    let plen = usize::from(ip.payload_length());
    if plen == 0 {
        // Jumbograms need a hop-by-hop option we do not support; a zero
        // length without one is invalid.
        return Rx::Drop(RxDrop::Malformed);
    }
    if IPV6_LEN + plen > p.len() {
        return Rx::Drop(RxDrop::Truncated);
    }
    let payload = &p[IPV6_LEN..IPV6_LEN + plen];
    let src = ip.source_addr();
    let dst = ip.destination_addr();
    if src.is_multicast() {
        return Rx::Drop(RxDrop::BadSource);
    }
    match ip.next_header().0 {
        PROTO_UDP => {
            if !unicast_to_us || dst != ours {
                return Rx::Drop(RxDrop::NotForUs);
            }
            if src.is_unspecified() || src == ours {
                return Rx::Drop(RxDrop::BadSource);
            }
            udp(payload, src.into(), dst.into(), port, ETH_LEN + IPV6_LEN)
        }
        PROTO_ICMPV6 => ndp(payload, src, dst, ip.hop_limit(), ours, eth_src),
        PROTO_IPV6_FRAGMENT => Rx::Drop(RxDrop::Fragment),
        _ => Rx::Drop(RxDrop::UnsupportedProtocol),
    }
}

/// Neighbour solicitations and advertisements (RFC 4861 4.3, 4.4, 7.1).
fn ndp(
    icmp: &[u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    ours: Ipv6Addr,
    eth_src: [u8; 6],
) -> Rx {
    if icmp.len() < 4 {
        return Rx::Drop(RxDrop::Truncated);
    }
    let kind = icmp[0];
    if kind != ICMPV6_NS && kind != ICMPV6_NA {
        return Rx::Drop(RxDrop::UnsupportedProtocol);
    }
    let sum = pseudo_header(
        src.into(),
        dst.into(),
        PROTO_ICMPV6,
        u32::from(len16(icmp.len())),
    )
    .add_slice(icmp);
    if sum.ones_complement() != 0 {
        return Rx::Drop(RxDrop::BadChecksum);
    }
    // Hop limit 255 proves the sender is on-link.
    if hop_limit != 255 || icmp[1] != 0 {
        return Rx::Drop(RxDrop::Malformed);
    }
    if icmp.len() < 24 {
        return Rx::Drop(RxDrop::Truncated);
    }
    let mut t = [0u8; 16];
    t.copy_from_slice(&icmp[8..24]);
    let target = Ipv6Addr::from(t);
    if target.is_multicast() {
        return Rx::Drop(RxDrop::Malformed);
    }
    let mut source_ll = None;
    let mut target_ll = None;
    let mut opts = &icmp[24..];
    while !opts.is_empty() {
        if opts.len() < 2 {
            return Rx::Drop(RxDrop::Truncated);
        }
        let len = usize::from(opts[1]) * 8;
        if len == 0 {
            return Rx::Drop(RxDrop::Malformed);
        }
        if len > opts.len() {
            return Rx::Drop(RxDrop::Truncated);
        }
        match opts[0] {
            NDP_OPT_SOURCE_LL if len >= 8 => source_ll = Some(mac_at(opts, 2)),
            NDP_OPT_TARGET_LL if len >= 8 => target_ll = Some(mac_at(opts, 2)),
            _ => {}
        }
        opts = &opts[len..];
    }
    if kind == ICMPV6_NS {
        if target != ours || (dst != ours && dst != solicited_node(ours)) {
            return Rx::Drop(RxDrop::NotForUs);
        }
        if src.is_unspecified() && (dst == ours || source_ll.is_some()) {
            // RFC 4861 7.1.1: DAD probes go to the solicited-node group and
            // carry no source link-layer option.
            return Rx::Drop(RxDrop::Malformed);
        }
        if let Some(mac) = source_ll
            && is_multicast_mac(&mac)
        {
            return Rx::Drop(RxDrop::BadSource);
        }
        Rx::Solicitation {
            src,
            src_mac: source_ll.unwrap_or(eth_src),
            has_source_ll: source_ll.is_some(),
        }
    } else {
        let flags = icmp[4];
        let solicited = flags & NA_FLAG_SOLICITED != 0;
        if dst.is_multicast() && solicited {
            return Rx::Drop(RxDrop::Malformed);
        }
        if dst != ours && dst != ALL_NODES {
            return Rx::Drop(RxDrop::NotForUs);
        }
        let mac = target_ll.unwrap_or(eth_src);
        if is_multicast_mac(&mac) || target == ours {
            return Rx::Drop(RxDrop::BadSource);
        }
        Rx::Advertisement {
            target,
            mac,
            solicited,
            override_flag: flags & NA_FLAG_OVERRIDE != 0,
        }
    }
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn write_eth(b: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    b[0..6].copy_from_slice(&dst);
    b[6..12].copy_from_slice(&src);
    put16(b, 12, ethertype);
}

/// Writes a whole ARP frame (padded to [`ARP_FRAME`]) into `b[..ARP_FRAME]`.
pub(crate) fn write_arp(
    b: &mut [u8],
    op: ArpOp,
    eth_dst: [u8; 6],
    sender: ([u8; 6], Ipv4Addr),
    target: ([u8; 6], Ipv4Addr),
) {
    let b = &mut b[..ARP_FRAME];
    b.fill(0);
    write_eth(b, eth_dst, sender.0, ETHERTYPE_ARP);
    let p = &mut b[ETH_LEN..];
    put16(p, 0, 1);
    put16(p, 2, ETHERTYPE_IPV4);
    p[4] = 6;
    p[5] = 4;
    put16(
        p,
        6,
        match op {
            ArpOp::Request => ARP_REQUEST,
            ArpOp::Reply => ARP_REPLY,
        },
    );
    p[8..14].copy_from_slice(&sender.0);
    p[14..18].copy_from_slice(&sender.1.octets());
    p[18..24].copy_from_slice(&target.0);
    p[24..28].copy_from_slice(&target.1.octets());
}

/// Writes a neighbour solicitation (with the source link-layer option) or
/// advertisement (with the target link-layer option) into `b[..NDP_FRAME]`.
/// For a solicitation `target` is the address looked for; for an
/// advertisement it is `src` itself.
pub(crate) fn write_ndp(
    b: &mut [u8],
    eth_dst: [u8; 6],
    mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ndp: Ndp,
) {
    let b = &mut b[..NDP_FRAME];
    write_eth(b, eth_dst, mac, ETHERTYPE_IPV6);
    write_ipv6(
        &mut b[ETH_LEN..],
        src,
        dst,
        PROTO_ICMPV6,
        len16(NDP_LEN),
        255,
    );
    let icmp = &mut b[ETH_LEN + IPV6_LEN..];
    icmp.fill(0);
    let (target, option) = match ndp {
        Ndp::Solicit { target } => {
            icmp[0] = ICMPV6_NS;
            (target, NDP_OPT_SOURCE_LL)
        }
        Ndp::Advertise { solicited } => {
            icmp[0] = ICMPV6_NA;
            icmp[4] = NA_FLAG_OVERRIDE | if solicited { NA_FLAG_SOLICITED } else { 0 };
            (src, NDP_OPT_TARGET_LL)
        }
    };
    icmp[8..24].copy_from_slice(&target.octets());
    icmp[24] = option;
    icmp[25] = 1;
    icmp[26..32].copy_from_slice(&mac);
    let sum = pseudo_header(
        src.into(),
        dst.into(),
        PROTO_ICMPV6,
        u32::from(len16(NDP_LEN)),
    )
    .add_slice(icmp);
    icmp[2..4].copy_from_slice(&sum.ones_complement().to_ne_bytes());
}

/// Which NDP message [`write_ndp`] writes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ndp {
    Solicit { target: Ipv6Addr },
    Advertise { solicited: bool },
}

fn write_ipv6(
    b: &mut [u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next: u8,
    payload_len: u16,
    hop_limit: u8,
) {
    b[0] = 0x60;
    b[1] = 0;
    b[2] = 0;
    b[3] = 0;
    put16(b, 4, payload_len);
    b[6] = next;
    b[7] = hop_limit;
    b[8..24].copy_from_slice(&src.octets());
    b[24..40].copy_from_slice(&dst.octets());
}

/// Length of the Ethernet + IP + UDP headers towards `dst`.
pub(crate) fn udp_headers_len(dst: &SocketAddr) -> usize {
    if dst.is_ipv4() {
        UDP4_HEADERS
    } else {
        UDP6_HEADERS
    }
}

/// Fills the headers of a UDP frame whose payload already sits in
/// `b[udp_headers_len(dst)..]` (the whole slice is the frame, without
/// padding). The destination MAC is left as it is: it is written once the
/// neighbour is resolved ([`set_eth_dst`]). `src` and `dst` are of the same
/// family (the caller checks).
pub(crate) fn write_udp_headers(
    b: &mut [u8],
    src_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    ip_id: u16,
    ttl: u8,
) {
    let hl = udp_headers_len(&dst);
    let udp_len = b.len() - hl + UDP_LEN;
    b[6..12].copy_from_slice(&src_mac);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            put16(b, 12, ETHERTYPE_IPV4);
            let ip = &mut b[ETH_LEN..ETH_LEN + IPV4_LEN];
            ip[0] = 0x45;
            ip[1] = 0;
            put16(ip, 2, len16(IPV4_LEN + udp_len));
            put16(ip, 4, ip_id);
            // Don't fragment, like the kernel's UDP sockets with path MTU
            // discovery: WireGuard sizes its packets to the MTU.
            put16(ip, 6, 0x4000);
            ip[8] = ttl;
            ip[9] = PROTO_UDP;
            ip[10] = 0;
            ip[11] = 0;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let sum = Sum16BitWords::new().add_slice(ip).ones_complement();
            ip[10..12].copy_from_slice(&sum.to_ne_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            put16(b, 12, ETHERTYPE_IPV6);
            write_ipv6(&mut b[ETH_LEN..], s, d, PROTO_UDP, len16(udp_len), ttl);
        }
        _ => return,
    }
    let seg = &mut b[hl - UDP_LEN..];
    put16(seg, 0, src.port());
    put16(seg, 2, dst.port());
    put16(seg, 4, len16(udp_len));
    put16(seg, 6, 0);
    let sum =
        pseudo_header(src.ip(), dst.ip(), PROTO_UDP, u32::from(len16(udp_len))).add_slice(seg);
    // A computed 0 is sent as 0xffff: 0 means "no checksum" (RFC 768).
    seg[6..8].copy_from_slice(&sum.to_ones_complement_with_no_zero().to_ne_bytes());
}

/// Writes the destination MAC of a built frame.
pub(crate) fn set_eth_dst(b: &mut [u8], mac: [u8; 6]) {
    b[0..6].copy_from_slice(&mac);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation, reason = "test data generation")]

    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    const OUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

    fn local4() -> Local {
        Local {
            mac: OUR_MAC,
            addr: "198.51.100.2:51820".parse().unwrap(),
        }
    }

    fn local6() -> Local {
        Local {
            mac: OUR_MAC,
            addr: "[fd00::2]:51820".parse().unwrap(),
        }
    }

    fn udp4_frame(dst_port: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(PEER_MAC, OUR_MAC)
            .ipv4([198, 51, 100, 1], [198, 51, 100, 2], 64)
            .udp(4000, dst_port);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn udp6_frame(dst_port: u16, payload: &[u8]) -> Vec<u8> {
        let src: Ipv6Addr = "fd00::1".parse().unwrap();
        let dst: Ipv6Addr = "fd00::2".parse().unwrap();
        let b = PacketBuilder::ethernet2(PEER_MAC, OUR_MAC)
            .ipv6(src.octets(), dst.octets(), 64)
            .udp(4000, dst_port);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn ipv4_datagram_is_delivered_with_its_source() {
        let f = udp4_frame(51820, b"hello");
        let Rx::Datagram { src, offset, len } = classify(&f, &local4()) else {
            panic!("{:?}", classify(&f, &local4()));
        };
        assert_eq!(src, "198.51.100.1:4000".parse().unwrap());
        assert_eq!(&f[usize::from(offset)..usize::from(offset + len)], b"hello");
    }

    #[test]
    fn ethernet_padding_is_ignored() {
        let mut f = udp4_frame(51820, b"x");
        f.resize(60, 0xee);
        let Rx::Datagram { len, .. } = classify(&f, &local4()) else {
            panic!()
        };
        assert_eq!(len, 1);
    }

    #[test]
    fn ipv4_checks() {
        let l = local4();
        assert_eq!(
            classify(&udp4_frame(53, b"x"), &l),
            Rx::Drop(RxDrop::WrongPort)
        );
        let mut f = udp4_frame(51820, b"x");
        f[ETH_LEN + 10] ^= 1;
        assert_eq!(classify(&f, &l), Rx::Drop(RxDrop::BadIpv4Checksum));
        let mut f = udp4_frame(51820, b"payload");
        *f.last_mut().unwrap() ^= 0x55;
        assert_eq!(classify(&f, &l), Rx::Drop(RxDrop::BadChecksum));
        // Checksum 0: none, allowed over IPv4.
        let mut f = udp4_frame(51820, b"payload");
        f[ETH_LEN + IPV4_LEN + 6] = 0;
        f[ETH_LEN + IPV4_LEN + 7] = 0;
        assert!(matches!(classify(&f, &l), Rx::Datagram { .. }));
        let f = udp4_frame(51820, b"payload");
        assert_eq!(classify(&f[..f.len() - 1], &l), Rx::Drop(RxDrop::Truncated));
        let mut f = udp4_frame(51820, b"x");
        f[0] = 0x04;
        assert_eq!(classify(&f, &l), Rx::Drop(RxDrop::NotForUs));
        assert_eq!(
            classify(&udp6_frame(51820, b"x"), &l),
            Rx::Drop(RxDrop::NotForUs)
        );
        let mut f = udp4_frame(51820, b"x");
        f[12] = 0x81;
        f[13] = 0x00;
        assert_eq!(classify(&f, &l), Rx::Drop(RxDrop::UnknownEtherType));
    }

    #[test]
    fn ipv4_fragments_are_dropped() {
        let mut f = udp4_frame(51820, b"x");
        // More fragments set, then recompute the header checksum.
        f[ETH_LEN + 6] = 0x20;
        f[ETH_LEN + 10] = 0;
        f[ETH_LEN + 11] = 0;
        let sum = Sum16BitWords::new()
            .add_slice(&f[ETH_LEN..ETH_LEN + 20])
            .ones_complement();
        f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&sum.to_ne_bytes());
        assert_eq!(classify(&f, &local4()), Rx::Drop(RxDrop::Fragment));
    }

    #[test]
    fn ipv6_datagram_and_zero_checksum() {
        let l = local6();
        let f = udp6_frame(51820, b"hello6");
        let Rx::Datagram { src, offset, len } = classify(&f, &l) else {
            panic!("{:?}", classify(&f, &l))
        };
        assert_eq!(src, "[fd00::1]:4000".parse().unwrap());
        assert_eq!(
            &f[usize::from(offset)..usize::from(offset + len)],
            b"hello6"
        );
        let mut f = udp6_frame(51820, b"hello6");
        f[ETH_LEN + IPV6_LEN + 6] = 0;
        f[ETH_LEN + IPV6_LEN + 7] = 0;
        assert_eq!(classify(&f, &l), Rx::Drop(RxDrop::BadChecksum));
    }

    #[test]
    fn built_udp_frames_parse_back_with_valid_checksums() {
        for (src, dst) in [
            ("198.51.100.2:51820", "198.51.100.1:4000"),
            ("[fd00::2]:51820", "[fd00::1]:4000"),
        ] {
            let src: SocketAddr = src.parse().unwrap();
            let dst: SocketAddr = dst.parse().unwrap();
            for plen in [0usize, 1, 7, 100, 1400] {
                let hl = udp_headers_len(&dst);
                let mut f = vec![0u8; hl + plen];
                for (i, b) in f[hl..].iter_mut().enumerate() {
                    *b = i as u8;
                }
                write_udp_headers(&mut f, OUR_MAC, src, dst, 7, 64);
                set_eth_dst(&mut f, PEER_MAC);
                let p = SlicedPacket::from_ethernet(&f).unwrap();
                let Some(TransportSlice::Udp(u)) = p.transport else {
                    panic!()
                };
                assert_eq!(u.source_port(), src.port());
                assert_eq!(u.destination_port(), dst.port());
                assert_eq!(u.payload(), &f[hl..]);
                // Parse it back as the receiver would.
                let peer = Local {
                    mac: PEER_MAC,
                    addr: dst,
                };
                let Rx::Datagram { src: got, len, .. } = classify(&f, &peer) else {
                    panic!("{:?}", classify(&f, &peer))
                };
                assert_eq!((got, usize::from(len)), (src, plen));
                // And etherparse's own checksum agrees.
                let expected = match p.net {
                    Some(etherparse::NetSlice::Ipv4(ref ip)) => u
                        .to_header()
                        .calc_checksum_ipv4(&ip.header().to_header(), u.payload())
                        .unwrap(),
                    Some(etherparse::NetSlice::Ipv6(ref ip)) => u
                        .to_header()
                        .calc_checksum_ipv6(&ip.header().to_header(), u.payload())
                        .unwrap(),
                    _ => panic!(),
                };
                assert_eq!(u.checksum(), expected);
                if let Some(etherparse::NetSlice::Ipv4(ip)) = p.net {
                    let h = ip.header().to_header();
                    assert_eq!(h.header_checksum, h.calc_header_checksum());
                    assert!(h.dont_fragment);
                }
            }
        }
    }

    #[test]
    fn arp_request_and_reply() {
        let l = local4();
        let peer: Ipv4Addr = "198.51.100.1".parse().unwrap();
        let ours: Ipv4Addr = "198.51.100.2".parse().unwrap();
        let mut f = [0u8; ARP_FRAME];
        write_arp(
            &mut f,
            ArpOp::Request,
            BROADCAST_MAC,
            (PEER_MAC, peer),
            ([0; 6], ours),
        );
        assert_eq!(
            classify(&f, &l),
            Rx::Arp {
                op: ArpOp::Request,
                sender_mac: PEER_MAC,
                sender_ip: peer,
                for_us: true
            }
        );
        write_arp(
            &mut f,
            ArpOp::Reply,
            OUR_MAC,
            (PEER_MAC, peer),
            (OUR_MAC, ours),
        );
        assert!(matches!(
            classify(&f, &l),
            Rx::Arp {
                op: ArpOp::Reply,
                ..
            }
        ));
        // etherparse reads ours the same way.
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::NetSlice::Arp(a)) = p.net else {
            panic!()
        };
        assert_eq!(a.sender_protocol_addr(), &peer.octets());
        assert_eq!(a.target_hw_addr(), &OUR_MAC);
        assert_eq!(classify(&f[..41], &l), Rx::Drop(RxDrop::Truncated));
        assert_eq!(classify(&f, &local6()), Rx::Drop(RxDrop::NotForUs));
    }

    #[test]
    fn ndp_solicitation_and_advertisement() {
        let l = local6();
        let ours: Ipv6Addr = "fd00::2".parse().unwrap();
        let peer: Ipv6Addr = "fd00::1".parse().unwrap();
        let group = solicited_node(ours);
        assert_eq!(group, "ff02::1:ff00:2".parse::<Ipv6Addr>().unwrap());
        let mut f = [0u8; NDP_FRAME];
        write_ndp(
            &mut f,
            multicast_mac(group),
            PEER_MAC,
            peer,
            group,
            Ndp::Solicit { target: ours },
        );
        assert_eq!(
            classify(&f, &l),
            Rx::Solicitation {
                src: peer,
                src_mac: PEER_MAC,
                has_source_ll: true
            }
        );
        let mut bad = f;
        bad[ETH_LEN + 7] = 64;
        assert_eq!(classify(&bad, &l), Rx::Drop(RxDrop::Malformed));
        let mut bad = f;
        bad[NDP_FRAME - 1] ^= 1;
        assert_eq!(classify(&bad, &l), Rx::Drop(RxDrop::BadChecksum));
        // A solicitation for someone else's address.
        let mut other = [0u8; NDP_FRAME];
        write_ndp(
            &mut other,
            multicast_mac(group),
            PEER_MAC,
            peer,
            group,
            Ndp::Solicit { target: peer },
        );
        assert_eq!(classify(&other, &l), Rx::Drop(RxDrop::NotForUs));

        write_ndp(
            &mut f,
            OUR_MAC,
            PEER_MAC,
            peer,
            ours,
            Ndp::Advertise { solicited: true },
        );
        assert_eq!(
            classify(&f, &l),
            Rx::Advertisement {
                target: peer,
                mac: PEER_MAC,
                solicited: true,
                override_flag: true
            }
        );
        // etherparse agrees on the checksum.
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(TransportSlice::Icmpv6(icmp)) = p.transport else {
            panic!()
        };
        let Some(etherparse::NetSlice::Ipv6(ip)) = p.net else {
            panic!()
        };
        let expected = icmp
            .header()
            .icmp_type
            .calc_checksum(
                ip.header().source(),
                ip.header().destination(),
                icmp.payload(),
            )
            .unwrap();
        assert_eq!(icmp.checksum(), expected);
    }

    /// A seeded xorshift: reproducible garbage without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn classify_never_panics_on_garbage() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let seeds = [
            udp4_frame(51820, b"seed payload"),
            udp6_frame(51820, b"seed payload"),
            {
                let mut f = vec![0u8; ARP_FRAME];
                write_arp(
                    &mut f,
                    ArpOp::Request,
                    BROADCAST_MAC,
                    (PEER_MAC, "198.51.100.1".parse().unwrap()),
                    ([0; 6], "198.51.100.2".parse().unwrap()),
                );
                f
            },
            {
                let ours: Ipv6Addr = "fd00::2".parse().unwrap();
                let mut f = vec![0u8; NDP_FRAME];
                let g = solicited_node(ours);
                write_ndp(
                    &mut f,
                    multicast_mac(g),
                    PEER_MAC,
                    "fd00::1".parse().unwrap(),
                    g,
                    Ndp::Solicit { target: ours },
                );
                f
            },
        ];
        let locals = [local4(), local6()];
        let mut buf = Vec::with_capacity(2048);
        for i in 0..200_000u32 {
            buf.clear();
            let r = rng.next();
            if i % 2 == 0 {
                // Pure random bytes of random length.
                let len = (r % 1600) as usize;
                buf.extend((0..len).map(|_| rng.next() as u8));
            } else {
                // A valid frame with a few bytes flipped and a random cut, so
                // the parser gets deep with bad fields.
                let seed = &seeds[(r % seeds.len() as u64) as usize];
                buf.extend_from_slice(seed);
                for _ in 0..(1 + rng.next() % 4) {
                    let at = (rng.next() % buf.len() as u64) as usize;
                    buf[at] = rng.next() as u8;
                }
                let cut = (rng.next() % (buf.len() as u64 + 1)) as usize;
                buf.truncate(cut);
            }
            for l in &locals {
                if let Rx::Datagram { offset, len, .. } = classify(&buf, l) {
                    assert!(usize::from(offset) + usize::from(len) <= buf.len());
                }
            }
        }
    }
}
