//! Ingress classification: the one place packet bytes are validated.
//!
//! Each packet is sliced once, by etherparse, when it enters the data plane:
//! [`parse_ip`] for the IP packet (from a TUN, from a TAP after the Ethernet
//! header, or out of a WireGuard session) and [`parse_ethernet`] for TAP
//! frames. What comes out is a small `Copy` summary ([`IpMeta`]) of offsets
//! and header facts, not the etherparse slices themselves: the slices borrow
//! the buffer immutably, while the service chain must be able to rewrite the
//! packet in place (NAT, TTL). Later code re-reads fields at the offsets the
//! summary vouches for instead of parsing again.
//!
//! What is validated, and nothing more: the buffer holds a whole header, the
//! version is 4 or 6, IPv4 IHL >= 5, the length field covers the header and
//! fits in the buffer, the IPv6 extension-header chain is well formed.
//! Checksums are not checked (the receiving kernel does that; a forwarder
//! that checked would only spend cycles to drop what the endpoint drops
//! anyway), and neither is anything above IP.
//!
//! # No-panic contract
//! After [`parse_ip`] returns `Ok(meta)` for a buffer, that buffer is at
//! least `meta.len` bytes long, `meta.len >= meta.header_len`, and
//! `meta.header_len >= 20` (IPv4) or `>= 40` (IPv6); every accessor of
//! [`IpPacket`] relies on exactly this and nothing else.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::err::LenError;
use etherparse::err::ip::{HeaderError, HeadersError, SliceError};
use etherparse::{EtherType, Ethernet2HeaderSlice, IpSlice, LenSource};

use crate::drop::DropReason;

/// Length of an Ethernet II header (no VLAN tag, no FCS: TAP devices give
/// frames without it).
pub const ETHERNET_HEADER_LEN: usize = 14;
/// Minimum IPv4 header length.
pub const IPV4_HEADER_LEN: usize = 20;
/// IPv6 fixed header length.
pub const IPV6_HEADER_LEN: usize = 40;

/// IP version of a classified packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpVersion {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// What classification learned about an IP packet: offsets and flags, no
/// borrowed data, `Copy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpMeta {
    /// IPv4 or IPv6.
    pub version: IpVersion,
    /// Length of the whole IP packet from its own length field (bytes past it
    /// in the buffer, e.g. Ethernet padding, are not part of the packet).
    pub len: usize,
    /// Offset of the upper-layer header: the IPv4 header with options (and an
    /// authentication header if present), or the IPv6 header with its
    /// extension headers.
    pub header_len: usize,
    /// Upper-layer protocol number after the extension headers (6 TCP, 17
    /// UDP, 1 ICMP, 58 ICMPv6, ...).
    pub protocol: u8,
    /// The payload is a fragment (not the whole upper-layer message).
    pub fragmented: bool,
    /// Non-first fragment: no upper-layer header at `header_len`.
    pub later_fragment: bool,
    /// IPv4 DF bit. Always true for IPv6, which routers never fragment.
    pub dont_fragment: bool,
}

/// Validates and summarises the IP packet at the start of `buf`.
///
/// See the module doc for what is (and is not) checked.
pub fn parse_ip(buf: &[u8]) -> Result<IpMeta, DropReason> {
    let slice = IpSlice::from_slice(buf).map_err(map_slice_error)?;
    let (version, dont_fragment, later_fragment) = match &slice {
        IpSlice::Ipv4(v4) => {
            let h = v4.header();
            (
                IpVersion::V4,
                h.dont_fragment(),
                h.fragments_offset().value() != 0,
            )
        }
        IpSlice::Ipv6(v6) => {
            // A non-first IPv6 fragment carries no upper-layer header; the
            // fragment header says where it sits.
            let later = v6.is_payload_fragmented() && ipv6_fragment_offset(v6) != 0;
            (IpVersion::V6, true, later)
        }
    };
    let payload = slice.payload();
    // Offsets from addresses: etherparse hands out sub-slices of `buf`, so
    // the payload's distance from the start is the header length. No unsafe,
    // only address arithmetic.
    let header_len = (payload.payload.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    let len = header_len.saturating_add(payload.payload.len());
    if header_len > buf.len() || len > buf.len() {
        // Cannot happen with etherparse's guarantees; keeps the contract
        // independent of them.
        return Err(DropReason::MalformedHeader);
    }
    Ok(IpMeta {
        version,
        len,
        header_len,
        protocol: payload.ip_number.0,
        fragmented: payload.fragmented,
        later_fragment,
        dont_fragment,
    })
}

fn ipv6_fragment_offset(v6: &etherparse::Ipv6Slice<'_>) -> u16 {
    use etherparse::Ipv6ExtensionSlice;
    v6.extensions()
        .clone()
        .into_iter()
        .find_map(|ext| match ext {
            Ipv6ExtensionSlice::Fragment(f) => Some(f.fragment_offset().value()),
            _ => None,
        })
        .unwrap_or(0)
}

fn map_slice_error(e: SliceError) -> DropReason {
    match e {
        SliceError::Len(LenError {
            len_source: LenSource::Slice,
            ..
        }) => DropReason::TooShort,
        SliceError::Len(_) => DropReason::MalformedHeader,
        SliceError::IpHeaders(HeadersError::Ip(HeaderError::UnsupportedIpVersion { .. })) => {
            DropReason::BadIpVersion
        }
        SliceError::IpHeaders(_) => DropReason::MalformedHeader,
    }
}

/// A 6-byte MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Group (multicast or broadcast) bit set.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl core::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl core::fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(self, f)
    }
}

/// What a TAP frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EthPayload {
    /// An IPv4 or IPv6 packet at [`ETHERNET_HEADER_LEN`].
    Ip(IpMeta),
    /// An ARP packet at [`ETHERNET_HEADER_LEN`] (not yet validated).
    Arp,
}

/// A classified Ethernet frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthFrame {
    /// Destination MAC.
    pub dst: MacAddr,
    /// Source MAC.
    pub src: MacAddr,
    /// The payload, classified.
    pub payload: EthPayload,
}

/// Validates and summarises an Ethernet II frame (as read from a TAP).
///
/// Only IPv4, IPv6 and ARP are accepted; anything else (including 802.1Q
/// tags) is [`DropReason::PayloadMismatch`]: a connection carries IP, and ARP
/// only so that the pod can resolve its peer.
pub fn parse_ethernet(buf: &[u8]) -> Result<EthFrame, DropReason> {
    let eth = Ethernet2HeaderSlice::from_slice(buf).map_err(|_| DropReason::TooShort)?;
    let rest = buf.get(ETHERNET_HEADER_LEN..).ok_or(DropReason::TooShort)?;
    let payload = match eth.ether_type() {
        EtherType::IPV4 | EtherType::IPV6 => {
            let meta = parse_ip(rest)?;
            // The EtherType and the version nibble must agree, or a later
            // stage would read an IPv6 packet with IPv4 offsets.
            let expected = if eth.ether_type() == EtherType::IPV4 {
                IpVersion::V4
            } else {
                IpVersion::V6
            };
            if meta.version != expected {
                return Err(DropReason::MalformedHeader);
            }
            EthPayload::Ip(meta)
        }
        EtherType::ARP => EthPayload::Arp,
        _ => return Err(DropReason::PayloadMismatch),
    };
    Ok(EthFrame {
        dst: MacAddr(eth.destination()),
        src: MacAddr(eth.source()),
        payload,
    })
}

/// An IP packet on its way through the service chain: exactly the packet's
/// bytes (no trailing padding) plus its classification.
///
/// Stages may rewrite bytes in place (addresses, ports, TTL, checksums) but
/// not change the length or the headers' layout; `meta` stays valid because
/// of that.
#[derive(Debug)]
pub struct IpPacket<'a> {
    bytes: &'a mut [u8],
    meta: IpMeta,
}

impl<'a> IpPacket<'a> {
    /// Classifies `buf` and wraps the packet (trimmed to its length field).
    pub fn parse(buf: &'a mut [u8]) -> Result<Self, DropReason> {
        let meta = parse_ip(buf)?;
        Ok(Self::new_unchecked(buf, meta))
    }

    /// Wraps a buffer already classified as `meta` by [`parse_ip`].
    ///
    /// "Unchecked" in smoltcp's sense: if `meta` does not come from
    /// `parse_ip(buf)`, accessors return wrong values or empty slices, but
    /// never panic.
    pub(crate) fn new_unchecked(buf: &'a mut [u8], meta: IpMeta) -> Self {
        let len = meta.len.min(buf.len());
        let bytes = match buf.get_mut(..len) {
            Some(b) => b,
            None => &mut [],
        };
        IpPacket { bytes, meta }
    }

    /// The classification.
    pub fn meta(&self) -> &IpMeta {
        &self.meta
    }

    /// The whole IP packet.
    pub fn bytes(&self) -> &[u8] {
        self.bytes
    }

    /// The whole IP packet, writable in place.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.bytes
    }

    /// Source address.
    pub fn src(&self) -> IpAddr {
        self.addr(12, 8)
    }

    /// Destination address.
    pub fn dst(&self) -> IpAddr {
        self.addr(16, 24)
    }

    fn addr(&self, v4_off: usize, v6_off: usize) -> IpAddr {
        match self.meta.version {
            IpVersion::V4 => IpAddr::V4(Ipv4Addr::from(read_array::<4>(self.bytes, v4_off))),
            IpVersion::V6 => IpAddr::V6(Ipv6Addr::from(read_array::<16>(self.bytes, v6_off))),
        }
    }

    /// Everything after the IP headers: the TCP/UDP/ICMP header and data,
    /// or, for a non-first fragment (`meta().later_fragment`), a slice of
    /// data with no header.
    pub fn l4(&self) -> &[u8] {
        self.bytes.get(self.meta.header_len..).unwrap_or(&[])
    }

    /// The upper-layer bytes, writable in place.
    pub fn l4_mut(&mut self) -> &mut [u8] {
        let off = self.meta.header_len;
        match self.bytes.get_mut(off..) {
            Some(b) => b,
            None => &mut [],
        }
    }
}

/// Reads `N` bytes at `off`, or zeros if out of range (never panics; callers
/// only read offsets their classification vouches for).
#[inline]
pub(crate) fn read_array<const N: usize>(buf: &[u8], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = buf.get(off..off.saturating_add(N)) {
        out.copy_from_slice(src);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn v4_udp(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(1000, 2000);
        let mut v = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut v, payload).expect("write");
        v
    }

    fn v6_tcp(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).tcp(1, 2, 3, 4);
        let mut v = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut v, payload).expect("write");
        v
    }

    #[test]
    fn parse_ipv4() {
        let p = v4_udp(b"hello");
        let m = parse_ip(&p).expect("valid");
        assert_eq!(m.version, IpVersion::V4);
        assert_eq!(m.len, 20 + 8 + 5);
        assert_eq!(m.header_len, 20);
        assert_eq!(m.protocol, 17);
        assert!(m.dont_fragment, "PacketBuilder sets DF");
        assert!(!m.fragmented && !m.later_fragment);
    }

    #[test]
    fn parse_ipv6() {
        let p = v6_tcp(b"x");
        let m = parse_ip(&p).expect("valid");
        assert_eq!(m.version, IpVersion::V6);
        assert_eq!(m.len, 40 + 20 + 1);
        assert_eq!(m.header_len, 40);
        assert_eq!(m.protocol, 6);
        assert!(m.dont_fragment);
    }

    #[test]
    fn trailing_bytes_are_not_part_of_the_packet() {
        let mut p = v4_udp(b"abc");
        let len = p.len();
        p.extend_from_slice(&[0u8; 20]); // Ethernet minimum-size padding
        assert_eq!(parse_ip(&p).expect("valid").len, len);
    }

    #[test]
    fn rejects_with_the_right_reason() {
        let good = v4_udp(b"hello");
        assert_eq!(parse_ip(&[]), Err(DropReason::TooShort));
        assert_eq!(parse_ip(&good[..10]), Err(DropReason::TooShort));
        assert_eq!(parse_ip(&good[..good.len() - 1]), Err(DropReason::TooShort));

        let mut bad_version = good.clone();
        bad_version[0] = 0x55;
        assert_eq!(parse_ip(&bad_version), Err(DropReason::BadIpVersion));

        let mut bad_ihl = good.clone();
        bad_ihl[0] = 0x44;
        assert_eq!(parse_ip(&bad_ihl), Err(DropReason::MalformedHeader));

        let mut short_total = good.clone();
        short_total[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(parse_ip(&short_total), Err(DropReason::MalformedHeader));

        let v6 = v6_tcp(b"x");
        assert_eq!(parse_ip(&v6[..39]), Err(DropReason::TooShort));
        assert_eq!(parse_ip(&v6[..v6.len() - 1]), Err(DropReason::TooShort));
    }

    #[test]
    fn ipv4_fragments() {
        let mut p = v4_udp(&[0u8; 16]);
        // offset 8 (units of 8 bytes), MF clear: a later fragment.
        p[6] = 0;
        p[7] = 1;
        let m = parse_ip(&p).expect("valid");
        assert!(m.fragmented && m.later_fragment && !m.dont_fragment);
    }

    #[test]
    fn ipv6_extension_headers_are_skipped() {
        // Hop-by-hop (8 bytes of padding options) before UDP.
        let udp = [0u8, 1, 0, 2, 0, 8, 0, 0];
        let mut p = vec![0x60, 0, 0, 0, 0, 16, 0 /* HBH */, 64];
        p.extend_from_slice(&[0xfd; 16]);
        p.extend_from_slice(&[0xfe; 16]);
        p.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]); // next=UDP, len 0, PadN
        p.extend_from_slice(&udp);
        let m = parse_ip(&p).expect("valid");
        assert_eq!(m.header_len, 48);
        assert_eq!(m.protocol, 17);
        assert_eq!(m.len, 56);

        // A hop-by-hop header that claims more bytes than there are.
        let mut bad = p.clone();
        bad[41] = 4;
        assert!(parse_ip(&bad).is_err());
    }

    #[test]
    fn ethernet_frames() {
        let ip = v4_udp(b"hi");
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
        f.extend_from_slice(&ip);
        let e = parse_ethernet(&f).expect("valid");
        assert_eq!(e.dst, MacAddr([2, 0, 0, 0, 0, 1]));
        assert_eq!(e.src, MacAddr([2, 0, 0, 0, 0, 2]));
        assert!(matches!(e.payload, EthPayload::Ip(m) if m.len == ip.len()));

        let mut vlan = f.clone();
        vlan[12..14].copy_from_slice(&[0x81, 0x00]);
        assert_eq!(parse_ethernet(&vlan), Err(DropReason::PayloadMismatch));

        let mut mismatch = f.clone();
        mismatch[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(parse_ethernet(&mismatch), Err(DropReason::MalformedHeader));

        assert_eq!(parse_ethernet(&f[..13]), Err(DropReason::TooShort));
        let mut arp = f[..14].to_vec();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(parse_ethernet(&arp).map(|e| e.payload), Ok(EthPayload::Arp));
    }

    #[test]
    fn ip_packet_accessors() {
        let mut p = v4_udp(b"data");
        p.extend_from_slice(&[9, 9]);
        let pkt = IpPacket::parse(&mut p).expect("valid");
        assert_eq!(pkt.src(), IpAddr::from([10, 0, 0, 1]));
        assert_eq!(pkt.dst(), IpAddr::from([10, 0, 0, 2]));
        assert_eq!(pkt.bytes().len(), 32);
        assert_eq!(pkt.l4().len(), 12);

        let mut v6 = v6_tcp(b"");
        let pkt = IpPacket::parse(&mut v6).expect("valid");
        assert_eq!(pkt.src(), IpAddr::from([0xfd; 16]));
        assert_eq!(pkt.dst(), IpAddr::from([0xfe; 16]));
    }

    #[test]
    fn unchecked_with_a_lying_meta_never_panics() {
        let mut buf = [0x45u8; 8];
        let meta = IpMeta {
            version: IpVersion::V6,
            len: 1000,
            header_len: 500,
            protocol: 0,
            fragmented: false,
            later_fragment: false,
            dont_fragment: true,
        };
        let mut pkt = IpPacket::new_unchecked(&mut buf, meta);
        let _ = (pkt.src(), pkt.dst(), pkt.l4().len(), pkt.l4_mut().len());
    }
}
