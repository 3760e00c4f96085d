//! Proxy ARP and proxy Neighbor Discovery for TAP ports.
//!
//! A pod on a TAP (Ethernet payload) sees one neighbor: its peer, the other
//! end of the connection. The data plane plays that neighbor. It answers ARP
//! requests and IPv6 Neighbor Solicitations for the peer's address with the
//! peer MAC the port was configured with, and carries only IP across the
//! connection (WireGuard carries IP, not frames). Every other ARP or ND
//! message is consumed and counted, never forwarded: there is nobody on the
//! other side to answer it at layer 2.
//!
//! Replies are built with etherparse types into the caller's buffer.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::icmpv6::NeighborAdvertisementHeader;
use etherparse::{
    ArpEthIpv4Packet, ArpHardwareId, ArpOperation, ArpPacketSlice, EtherType, Ethernet2Header,
    Icmpv6Header, Icmpv6Slice, Icmpv6Type, IpNumber, Ipv6Header,
};

use crate::drop::DropReason;
use crate::packet::{ETHERNET_HEADER_LEN, IPV6_HEADER_LEN, IpMeta, MacAddr, read_array};

/// ICMPv6 type of a Neighbor Solicitation.
const ND_NEIGHBOR_SOLICIT: u8 = 135;
/// NS and NA messages must arrive with hop limit 255 (RFC 4861 7.1.1): proof
/// that they were not routed.
const ND_HOP_LIMIT: u8 = 255;
/// ICMPv6 header (8) + target address (16): the smallest valid NS.
const NS_MIN_LEN: usize = 24;
/// Length of an ARP reply frame for Ethernet/IPv4.
pub(crate) const ARP_REPLY_LEN: usize = ETHERNET_HEADER_LEN + ArpEthIpv4Packet::LEN;
/// NA payload after the ICMPv6 header: target address + target link-layer
/// address option (type 2, length 1 unit of 8 bytes).
const NA_PAYLOAD_LEN: usize = 16 + 8;
/// ICMPv6 length of a Neighbor Advertisement (IPv6 payload length).
const NA_ICMP_LEN: u16 = 32;
const _: () = assert!(NA_ICMP_LEN as usize == 8 + NA_PAYLOAD_LEN);
/// Length of a Neighbor Advertisement frame.
pub(crate) const NA_LEN: usize = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN + 8 + NA_PAYLOAD_LEN;

/// Answers the ARP packet in `frame` (an Ethernet frame whose EtherType is
/// ARP) if it asks for `peer_ip`; writes the reply frame to `out` and returns
/// its length.
pub(crate) fn arp_reply(
    frame: &[u8],
    peer_ip: Option<Ipv4Addr>,
    peer_mac: MacAddr,
    out: &mut [u8],
) -> Result<usize, DropReason> {
    let arp_bytes = frame
        .get(ETHERNET_HEADER_LEN..)
        .ok_or(DropReason::TooShort)?;
    let arp = ArpPacketSlice::from_slice(arp_bytes).map_err(|_| DropReason::TooShort)?;
    if arp.hw_addr_type() != ArpHardwareId::ETHERNET
        || arp.proto_addr_type() != EtherType::IPV4
        || arp.hw_addr_size() != 6
        || arp.proto_addr_size() != 4
    {
        return Err(DropReason::MalformedHeader);
    }
    let sender_mac = read_array::<6>(arp.sender_hw_addr(), 0);
    let sender_ip = read_array::<4>(arp.sender_protocol_addr(), 0);
    let target_ip = read_array::<4>(arp.target_protocol_addr(), 0);
    let Some(peer_ip) = peer_ip else {
        return Err(DropReason::ArpIgnored);
    };
    // Replies, gratuitous announcements (sender == target) and requests for
    // any other address are not ours to answer.
    if arp.operation() != ArpOperation::REQUEST
        || target_ip != peer_ip.octets()
        || sender_ip == target_ip
        || MacAddr(sender_mac).is_multicast()
    {
        return Err(DropReason::ArpIgnored);
    }

    let out = out
        .get_mut(..ARP_REPLY_LEN)
        .ok_or(DropReason::BufferTooSmall)?;
    let eth = Ethernet2Header {
        destination: sender_mac,
        source: peer_mac.0,
        ether_type: EtherType::ARP,
    };
    let reply = ArpEthIpv4Packet {
        operation: ArpOperation::REPLY,
        sender_mac: peer_mac.0,
        sender_ipv4: peer_ip.octets(),
        target_mac: sender_mac,
        target_ipv4: sender_ip,
    };
    let (eth_out, arp_out) = out.split_at_mut(ETHERNET_HEADER_LEN);
    eth_out.copy_from_slice(&eth.to_bytes());
    arp_out.copy_from_slice(&reply.to_bytes());
    Ok(ARP_REPLY_LEN)
}

/// Is the IPv6 packet `ip` (classified as `meta`) a Neighbor Solicitation?
/// One byte compare on the fast path: only ICMPv6 packets look further.
#[inline]
pub(crate) fn is_neighbor_solicitation(ip: &[u8], meta: &IpMeta) -> bool {
    meta.protocol == 58 && !meta.fragmented && ip.get(meta.header_len) == Some(&ND_NEIGHBOR_SOLICIT)
}

/// Answers the Neighbor Solicitation `ip` (from a frame sent by `src_mac`)
/// if its target is `peer_ip`; writes a Neighbor Advertisement frame to `out`
/// and returns its length.
///
/// Duplicate address detection probes (unspecified source) are not
/// answered: the pod probes its own addresses, never the peer's.
pub(crate) fn neighbor_advertisement(
    src_mac: MacAddr,
    ip: &[u8],
    meta: &IpMeta,
    peer_ip: Option<Ipv6Addr>,
    peer_mac: MacAddr,
    out: &mut [u8],
) -> Result<usize, DropReason> {
    let icmp_bytes = ip
        .get(meta.header_len..meta.len)
        .ok_or(DropReason::TooShort)?;
    let ns_src = read_array::<16>(ip, 8);
    let ns_dst = read_array::<16>(ip, 24);
    let hop_limit = ip.get(7).copied().unwrap_or(0);
    if icmp_bytes.len() < NS_MIN_LEN || hop_limit != ND_HOP_LIMIT {
        return Err(DropReason::MalformedHeader);
    }
    let icmp = Icmpv6Slice::from_slice(icmp_bytes).map_err(|_| DropReason::TooShort)?;
    // ND is small and rare: verifying its checksum costs nothing and keeps a
    // corrupted solicitation from poisoning anything.
    if icmp.code_u8() != 0 || !icmp.is_checksum_valid(ns_src, ns_dst) {
        return Err(DropReason::MalformedHeader);
    }
    let target = Ipv6Addr::from(read_array::<16>(icmp_bytes, 8));
    let Some(peer_ip) = peer_ip else {
        return Err(DropReason::NeighborSolicitationIgnored);
    };
    let requester = Ipv6Addr::from(ns_src);
    if target != peer_ip || requester.is_unspecified() || src_mac.is_multicast() {
        return Err(DropReason::NeighborSolicitationIgnored);
    }

    let out = out.get_mut(..NA_LEN).ok_or(DropReason::BufferTooSmall)?;
    let (eth_out, rest) = out.split_at_mut(ETHERNET_HEADER_LEN);
    let (ip_out, rest) = rest.split_at_mut(IPV6_HEADER_LEN);
    let (icmp_out, payload_out) = rest.split_at_mut(8);

    // Payload first: the checksum covers it.
    let (target_out, option_out) = payload_out.split_at_mut(16);
    target_out.copy_from_slice(&peer_ip.octets());
    option_out[0] = 2; // target link-layer address
    option_out[1] = 1; // length in units of 8 bytes
    option_out[2..8].copy_from_slice(&peer_mac.0);

    let icmp = Icmpv6Header::with_checksum(
        Icmpv6Type::NeighborAdvertisement(NeighborAdvertisementHeader {
            // The peer is a host on this link as far as the pod is concerned;
            // R=0 never touches the pod's default-router list.
            router: false,
            solicited: true,
            // No real owner of the address shares the link, so the answer
            // may replace a stale cache entry.
            r#override: true,
        }),
        peer_ip.octets(),
        ns_src,
        payload_out,
    )
    .map_err(|_| DropReason::BufferTooSmall)?;
    icmp_out.copy_from_slice(&icmp.to_bytes());

    let ip_hdr = Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: NA_ICMP_LEN,
        next_header: IpNumber::IPV6_ICMP,
        hop_limit: ND_HOP_LIMIT,
        source: peer_ip.octets(),
        destination: ns_src,
    };
    ip_out.copy_from_slice(&ip_hdr.to_bytes());
    let eth = Ethernet2Header {
        destination: src_mac.0,
        source: peer_mac.0,
        ether_type: EtherType::IPV6,
    };
    eth_out.copy_from_slice(&eth.to_bytes());
    Ok(NA_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{EthPayload, parse_ethernet};
    use etherparse::{Ethernet2Slice, Ipv6Slice, LinkSlice, SlicedPacket};

    const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    const PEER_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0b]);

    fn arp_request(target: [u8; 4]) -> Vec<u8> {
        let mut f = Ethernet2Header {
            destination: [0xff; 6],
            source: POD_MAC,
            ether_type: EtherType::ARP,
        }
        .to_bytes()
        .to_vec();
        f.extend_from_slice(
            &ArpEthIpv4Packet {
                operation: ArpOperation::REQUEST,
                sender_mac: POD_MAC,
                sender_ipv4: [10, 0, 0, 1],
                target_mac: [0; 6],
                target_ipv4: target,
            }
            .to_bytes(),
        );
        f.resize(60, 0); // minimum Ethernet frame, as a real NIC pads it
        f
    }

    #[test]
    fn answers_arp_for_the_peer() {
        let req = arp_request([10, 0, 0, 2]);
        let mut out = [0u8; 128];
        let n =
            arp_reply(&req, Some(Ipv4Addr::new(10, 0, 0, 2)), PEER_MAC, &mut out).expect("reply");
        assert_eq!(n, 42);
        let eth = Ethernet2Slice::from_slice_without_fcs(&out[..n]).expect("eth");
        assert_eq!(eth.destination(), POD_MAC);
        assert_eq!(eth.source(), PEER_MAC.0);
        let arp = ArpPacketSlice::from_slice(&out[14..n]).expect("arp");
        let arp = arp.to_packet().try_eth_ipv4().expect("eth/ipv4");
        assert_eq!(arp.operation, ArpOperation::REPLY);
        assert_eq!(arp.sender_mac, PEER_MAC.0);
        assert_eq!(arp.sender_ipv4, [10, 0, 0, 2]);
        assert_eq!(arp.target_mac, POD_MAC);
        assert_eq!(arp.target_ipv4, [10, 0, 0, 1]);
    }

    #[test]
    fn ignores_other_arp() {
        let mut out = [0u8; 128];
        let peer = Some(Ipv4Addr::new(10, 0, 0, 2));
        let other = arp_request([10, 0, 0, 3]);
        assert_eq!(
            arp_reply(&other, peer, PEER_MAC, &mut out),
            Err(DropReason::ArpIgnored)
        );
        let mut reply = arp_request([10, 0, 0, 2]);
        reply[21] = 2; // operation: reply
        assert_eq!(
            arp_reply(&reply, peer, PEER_MAC, &mut out),
            Err(DropReason::ArpIgnored)
        );
        let req = arp_request([10, 0, 0, 2]);
        assert_eq!(
            arp_reply(&req, None, PEER_MAC, &mut out),
            Err(DropReason::ArpIgnored)
        );
        assert_eq!(
            arp_reply(&req[..20], peer, PEER_MAC, &mut out),
            Err(DropReason::TooShort)
        );
        let mut bad = req.clone();
        bad[18] = 16; // hardware address size
        assert!(arp_reply(&bad, peer, PEER_MAC, &mut out).is_err());
        assert_eq!(
            arp_reply(&req, peer, PEER_MAC, &mut out[..10]),
            Err(DropReason::BufferTooSmall)
        );
    }

    fn ns(target: Ipv6Addr, hop_limit: u8) -> Vec<u8> {
        let src: Ipv6Addr = "fd00::1".parse().expect("addr");
        let mut dst = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0];
        dst[13..].copy_from_slice(&target.octets()[13..]);
        let mut payload = target.octets().to_vec();
        payload.extend_from_slice(&[1, 1]); // source link-layer address option
        payload.extend_from_slice(&POD_MAC);
        let icmp = Icmpv6Header::with_checksum(
            Icmpv6Type::NeighborSolicitation,
            src.octets(),
            dst,
            &payload,
        )
        .expect("checksum");
        let ip = Ipv6Header {
            traffic_class: 0,
            flow_label: Default::default(),
            payload_length: u16::try_from(8 + payload.len()).expect("small"),
            next_header: IpNumber::IPV6_ICMP,
            hop_limit,
            source: src.octets(),
            destination: dst,
        };
        let mut f = Ethernet2Header {
            destination: [0x33, 0x33, 0xff, dst[13], dst[14], dst[15]],
            source: POD_MAC,
            ether_type: EtherType::IPV6,
        }
        .to_bytes()
        .to_vec();
        f.extend_from_slice(&ip.to_bytes());
        f.extend_from_slice(&icmp.to_bytes());
        f.extend_from_slice(&payload);
        f
    }

    fn answer(frame: &[u8], peer: Option<Ipv6Addr>, out: &mut [u8]) -> Result<usize, DropReason> {
        let eth = parse_ethernet(frame).expect("frame");
        let EthPayload::Ip(meta) = eth.payload else {
            panic!("not ip")
        };
        let ip = &frame[14..];
        assert!(is_neighbor_solicitation(ip, &meta));
        neighbor_advertisement(eth.src, ip, &meta, peer, PEER_MAC, out)
    }

    #[test]
    fn answers_neighbor_solicitation_for_the_peer() {
        let peer: Ipv6Addr = "fd00::2".parse().expect("addr");
        let frame = ns(peer, 255);
        let mut out = [0u8; 256];
        let n = answer(&frame, Some(peer), &mut out).expect("reply");
        assert_eq!(n, NA_LEN);

        let p = SlicedPacket::from_ethernet(&out[..n]).expect("parse");
        let Some(LinkSlice::Ethernet2(eth)) = &p.link else {
            panic!("no ethernet")
        };
        assert_eq!(eth.destination(), POD_MAC);
        assert_eq!(eth.source(), PEER_MAC.0);
        let ip = Ipv6Slice::from_slice(&out[14..n]).expect("ipv6");
        assert_eq!(ip.header().source_addr(), peer);
        assert_eq!(
            ip.header().destination_addr(),
            "fd00::1".parse::<Ipv6Addr>().expect("a")
        );
        assert_eq!(ip.header().hop_limit(), 255);
        let icmp = Icmpv6Slice::from_slice(ip.payload().payload).expect("icmp");
        assert!(icmp.is_checksum_valid(peer.octets(), ip.header().destination()));
        assert_eq!(
            icmp.icmp_type(),
            Icmpv6Type::NeighborAdvertisement(NeighborAdvertisementHeader {
                router: false,
                solicited: true,
                r#override: true
            })
        );
        assert_eq!(&icmp.payload()[..16], &peer.octets());
        assert_eq!(&icmp.payload()[16..18], &[2, 1]);
        assert_eq!(&icmp.payload()[18..24], &PEER_MAC.0);
    }

    #[test]
    fn ignores_other_solicitations() {
        let peer: Ipv6Addr = "fd00::2".parse().expect("addr");
        let mut out = [0u8; 256];
        let other = ns("fd00::3".parse().expect("addr"), 255);
        assert_eq!(
            answer(&other, Some(peer), &mut out),
            Err(DropReason::NeighborSolicitationIgnored)
        );
        let routed = ns(peer, 64);
        assert_eq!(
            answer(&routed, Some(peer), &mut out),
            Err(DropReason::MalformedHeader)
        );
        let mut corrupt = ns(peer, 255);
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        assert_eq!(
            answer(&corrupt, Some(peer), &mut out),
            Err(DropReason::MalformedHeader)
        );
        let frame = ns(peer, 255);
        assert_eq!(
            answer(&frame, None, &mut out),
            Err(DropReason::NeighborSolicitationIgnored)
        );
        assert_eq!(
            answer(&frame, Some(peer), &mut out[..50]),
            Err(DropReason::BufferTooSmall)
        );
    }
}
