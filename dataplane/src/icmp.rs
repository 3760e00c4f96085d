//! "Too big" replies, so that path MTU discovery works through the mesh.
//!
//! A packet larger than its connection's path MTU is not fragmented and not
//! silently lost: the sender gets an ICMPv4 "fragmentation needed" (type 3
//! code 4, RFC 1191) or ICMPv6 "packet too big" (type 2, RFC 4443) carrying
//! the MTU, its TCP lowers its MSS, and the connection never stalls on a black
//! hole. The reply comes from the peer address (the other end of the pod's
//! connection), the only router the pod knows on this link.
//!
//! The rules are the ones routers follow (RFC 1812 4.3.2.7, RFC 4443 2.4):
//! no error about an ICMP error, about a non-first IPv4 fragment, or to a
//! source that is not unicast. The reply quotes as much of the packet as fits
//! in 576 bytes (IPv4) or 1280 bytes (IPv6), the sizes every host accepts.
//!
//! Headers and checksums are built with etherparse types into the caller's
//! buffer; nothing is allocated.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::icmpv4::DestUnreachableHeader;
use etherparse::{
    Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, IpNumber, Ipv4Header, Ipv6Header,
};

use crate::drop::DropReason;
use crate::packet::{IPV4_HEADER_LEN, IPV6_HEADER_LEN, IpMeta, read_array};

/// Largest IPv4 ICMP error (RFC 1812: "as much as fits in 576 bytes").
const IPV4_ERROR_MAX: usize = 576;
/// Largest ICMPv6 error (RFC 4443: "not exceed the minimum IPv6 MTU").
const IPV6_ERROR_MAX: usize = 1280;
/// ICMP header length (type, code, checksum, 4 bytes of rest-of-header).
const ICMP_HEADER_LEN: usize = 8;
/// The smallest MTU an IPv6 link may have (RFC 8200 section 5).
pub(crate) const IPV6_MIN_MTU: u16 = 1280;

/// Builds an ICMPv4 "fragmentation needed" for the IPv4 packet `orig`
/// (classified as `meta`) into `out`; returns the reply's length.
///
/// `src` is the reply's source (the peer address); `None` falls back to the
/// packet's own destination.
pub(crate) fn frag_needed_v4(
    orig: &[u8],
    meta: &IpMeta,
    mtu: u16,
    src: Option<Ipv4Addr>,
    out: &mut [u8],
) -> Result<usize, DropReason> {
    if !meta.dont_fragment {
        return Err(DropReason::PacketTooBigNoDf);
    }
    let orig_src = Ipv4Addr::from(read_array::<4>(orig, 12));
    let orig_dst = Ipv4Addr::from(read_array::<4>(orig, 16));
    if meta.later_fragment
        || !is_unicast_v4(orig_src)
        || orig_dst.is_multicast()
        || orig_dst.is_broadcast()
        || is_icmpv4_error(orig, meta)
    {
        return Err(DropReason::PacketTooBigNoReply);
    }
    let src = src.unwrap_or(orig_dst);

    let quote_len = meta
        .len
        .min(orig.len())
        .min(IPV4_ERROR_MAX - IPV4_HEADER_LEN - ICMP_HEADER_LEN);
    let total = IPV4_HEADER_LEN + ICMP_HEADER_LEN + quote_len;
    let quote = orig.get(..quote_len).ok_or(DropReason::TooShort)?;
    let out = out.get_mut(..total).ok_or(DropReason::BufferTooSmall)?;

    let icmp = Icmpv4Header::with_checksum(
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: mtu,
        }),
        quote,
    );
    let icmp_len = u16::try_from(ICMP_HEADER_LEN + quote_len).map_err(|_| DropReason::TooShort)?;
    let mut ip = Ipv4Header::new(
        icmp_len,
        64,
        IpNumber::ICMP,
        src.octets(),
        orig_src.octets(),
    )
    .map_err(|_| DropReason::BufferTooSmall)?;
    // Routers send errors without DF so that they are never themselves
    // dropped for size on the way back.
    ip.dont_fragment = false;
    ip.header_checksum = ip.calc_header_checksum();

    let (ip_out, rest) = out.split_at_mut(IPV4_HEADER_LEN);
    let (icmp_out, quote_out) = rest.split_at_mut(ICMP_HEADER_LEN);
    ip_out.copy_from_slice(&ip.to_bytes());
    icmp_out.copy_from_slice(&icmp.to_bytes());
    quote_out.copy_from_slice(quote);
    Ok(total)
}

/// Builds an ICMPv6 "packet too big" for the IPv6 packet `orig` into `out`;
/// returns the reply's length.
///
/// The reported MTU is never below 1280: IPv6 hosts ignore a smaller one
/// (RFC 8201), so a connection programmed below 1280 cannot carry IPv6
/// packets larger than its MTU at all.
pub(crate) fn packet_too_big_v6(
    orig: &[u8],
    meta: &IpMeta,
    mtu: u16,
    src: Option<Ipv6Addr>,
    out: &mut [u8],
) -> Result<usize, DropReason> {
    let orig_src = Ipv6Addr::from(read_array::<16>(orig, 8));
    let orig_dst = Ipv6Addr::from(read_array::<16>(orig, 24));
    if orig_src.is_unspecified() || orig_src.is_multicast() || is_icmpv6_error(orig, meta) {
        return Err(DropReason::PacketTooBigNoReply);
    }
    // Unlike other errors, "packet too big" is sent even for multicast
    // destinations (RFC 4443 2.4 e.2), but its source must be unicast.
    let src = match src {
        Some(s) => s,
        None if !orig_dst.is_multicast() => orig_dst,
        None => return Err(DropReason::PacketTooBigNoReply),
    };

    let quote_len = meta
        .len
        .min(orig.len())
        .min(IPV6_ERROR_MAX - IPV6_HEADER_LEN - ICMP_HEADER_LEN);
    let total = IPV6_HEADER_LEN + ICMP_HEADER_LEN + quote_len;
    let quote = orig.get(..quote_len).ok_or(DropReason::TooShort)?;
    let out = out.get_mut(..total).ok_or(DropReason::BufferTooSmall)?;

    let icmp = Icmpv6Header::with_checksum(
        Icmpv6Type::PacketTooBig {
            mtu: u32::from(mtu.max(IPV6_MIN_MTU)),
        },
        src.octets(),
        orig_src.octets(),
        quote,
    )
    .map_err(|_| DropReason::BufferTooSmall)?;
    let payload_length =
        u16::try_from(ICMP_HEADER_LEN + quote_len).map_err(|_| DropReason::TooShort)?;
    let ip = Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length,
        next_header: IpNumber::IPV6_ICMP,
        hop_limit: 64,
        source: src.octets(),
        destination: orig_src.octets(),
    };

    let (ip_out, rest) = out.split_at_mut(IPV6_HEADER_LEN);
    let (icmp_out, quote_out) = rest.split_at_mut(ICMP_HEADER_LEN);
    ip_out.copy_from_slice(&ip.to_bytes());
    icmp_out.copy_from_slice(&icmp.to_bytes());
    quote_out.copy_from_slice(quote);
    Ok(total)
}

fn is_unicast_v4(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback())
}

/// ICMPv4 error messages (destination unreachable, source quench, redirect,
/// time exceeded, parameter problem) never trigger another error.
fn is_icmpv4_error(orig: &[u8], meta: &IpMeta) -> bool {
    meta.protocol == 1
        && match orig.get(meta.header_len) {
            Some(t) => matches!(t, 3 | 4 | 5 | 11 | 12),
            // No ICMP header to look at: be conservative, no reply.
            None => true,
        }
}

/// ICMPv6 types below 128 are errors (RFC 4443 2.1).
fn is_icmpv6_error(orig: &[u8], meta: &IpMeta) -> bool {
    meta.protocol == 58
        && !meta.later_fragment
        && match orig.get(meta.header_len) {
            Some(t) => *t < 128,
            None => true,
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::parse_ip;
    use etherparse::{
        IcmpEchoHeader, Icmpv4Slice, Icmpv6Slice, Ipv4Slice, Ipv6Slice, PacketBuilder,
    };

    fn v4(len: usize, df: bool) -> Vec<u8> {
        let b = PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(1000, 2000);
        let mut v = Vec::new();
        b.write(&mut v, &vec![0xab; len - 28]).expect("write");
        if !df {
            v[6] &= !0x40;
            // fix the header checksum after flipping DF
            v[10] = 0;
            v[11] = 0;
            let h = Ipv4Header::from_slice(&v).expect("hdr").0;
            v[10..12].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
        }
        v
    }

    fn v6(len: usize) -> Vec<u8> {
        let b = PacketBuilder::ipv6(
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            64,
        )
        .udp(1000, 2000);
        let mut v = Vec::new();
        b.write(&mut v, &vec![0xcd; len - 48]).expect("write");
        v
    }

    #[test]
    fn ipv4_fragmentation_needed() {
        let p = v4(1500, true);
        let meta = parse_ip(&p).expect("valid");
        let mut out = [0u8; 2048];
        let peer = Ipv4Addr::new(10, 0, 0, 2);
        let n = frag_needed_v4(&p, &meta, 1400, Some(peer), &mut out).expect("reply");
        assert_eq!(n, 576);

        let ip = Ipv4Slice::from_slice(&out[..n]).expect("ipv4");
        let h = ip.header();
        assert_eq!(h.source_addr(), peer);
        assert_eq!(h.destination_addr(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(h.protocol(), IpNumber::ICMP);
        assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());

        let icmp = Icmpv4Slice::from_slice(ip.payload().payload).expect("icmp");
        assert_eq!(
            icmp.icmp_type(),
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1400
            })
        );
        let recomputed = Icmpv4Header::with_checksum(icmp.icmp_type(), icmp.payload());
        assert_eq!(recomputed.checksum, icmp.checksum());
        // The quote starts with the original header.
        assert_eq!(&icmp.payload()[..28], &p[..28]);
    }

    #[test]
    fn ipv4_small_packet_is_quoted_whole() {
        let p = v4(100, true);
        let meta = parse_ip(&p).expect("valid");
        let mut out = [0u8; 2048];
        let n = frag_needed_v4(&p, &meta, 68, None, &mut out).expect("reply");
        assert_eq!(n, 20 + 8 + 100);
        // Without a peer address the source is the packet's destination.
        assert_eq!(&out[12..16], &[10, 0, 0, 2]);
    }

    #[test]
    fn ipv4_without_df_is_not_answered() {
        let p = v4(1500, false);
        let meta = parse_ip(&p).expect("valid");
        let mut out = [0u8; 2048];
        assert_eq!(
            frag_needed_v4(&p, &meta, 1400, None, &mut out),
            Err(DropReason::PacketTooBigNoDf)
        );
    }

    #[test]
    fn no_error_about_an_icmp_error() {
        let b = PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).icmpv4(
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        );
        let mut p = Vec::new();
        b.write(&mut p, &[0u8; 1400]).expect("write");
        let meta = parse_ip(&p).expect("valid");
        let mut out = [0u8; 2048];
        assert_eq!(
            frag_needed_v4(&p, &meta, 1400, None, &mut out),
            Err(DropReason::PacketTooBigNoReply)
        );

        // ...but an echo request does get one.
        let b = PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).icmpv4_echo_request(1, 1);
        let mut p = Vec::new();
        b.write(&mut p, &[0u8; 1400]).expect("write");
        let meta = parse_ip(&p).expect("valid");
        assert!(frag_needed_v4(&p, &meta, 1400, None, &mut out).is_ok());
    }

    #[test]
    fn small_out_buffer_is_reported_not_panicked() {
        let p = v4(1500, true);
        let meta = parse_ip(&p).expect("valid");
        let mut out = [0u8; 100];
        assert_eq!(
            frag_needed_v4(&p, &meta, 1400, None, &mut out),
            Err(DropReason::BufferTooSmall)
        );
        let p = v6(1500);
        let meta = parse_ip(&p).expect("valid");
        assert_eq!(
            packet_too_big_v6(&p, &meta, 1400, None, &mut out),
            Err(DropReason::BufferTooSmall)
        );
    }

    #[test]
    fn ipv6_packet_too_big() {
        let p = v6(1500);
        let meta = parse_ip(&p).expect("valid");
        let mut out = [0u8; 2048];
        let peer: Ipv6Addr = "fd00::2".parse().expect("addr");
        let n = packet_too_big_v6(&p, &meta, 1400, Some(peer), &mut out).expect("reply");
        assert_eq!(n, 1280);

        let ip = Ipv6Slice::from_slice(&out[..n]).expect("ipv6");
        assert_eq!(ip.header().source_addr(), peer);
        assert_eq!(
            ip.header().destination_addr(),
            "fd00::1".parse::<Ipv6Addr>().expect("addr")
        );
        let icmp = Icmpv6Slice::from_slice(ip.payload().payload).expect("icmpv6");
        assert_eq!(icmp.icmp_type(), Icmpv6Type::PacketTooBig { mtu: 1400 });
        assert!(icmp.is_checksum_valid(peer.octets(), p[8..24].try_into().expect("16")));
        assert_eq!(&icmp.payload()[..48], &p[..48]);
    }

    #[test]
    fn ipv6_mtu_is_never_reported_below_1280() {
        let p = v6(1300);
        let meta = parse_ip(&p).expect("valid");
        let mut out = [0u8; 2048];
        let n = packet_too_big_v6(&p, &meta, 1000, None, &mut out).expect("reply");
        let icmp = Icmpv6Slice::from_slice(&out[40..n]).expect("icmpv6");
        assert_eq!(icmp.icmp_type(), Icmpv6Type::PacketTooBig { mtu: 1280 });
    }

    #[test]
    fn no_icmpv6_error_about_an_error() {
        let b = PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1 });
        let mut p = Vec::new();
        b.write(&mut p, &[0u8; 1400]).expect("write");
        let meta = parse_ip(&p).expect("valid");
        let mut out = [0u8; 2048];
        assert_eq!(
            packet_too_big_v6(&p, &meta, 1280, None, &mut out),
            Err(DropReason::PacketTooBigNoReply)
        );
        let b = PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
            .icmpv6(Icmpv6Type::EchoRequest(IcmpEchoHeader { id: 1, seq: 1 }));
        let mut p = Vec::new();
        b.write(&mut p, &[0u8; 1400]).expect("write");
        let meta = parse_ip(&p).expect("valid");
        assert!(packet_too_big_v6(&p, &meta, 1280, None, &mut out).is_ok());
    }
}
