//! TUN offloads: the `virtio_net_hdr` in front of each packet of a TUN
//! opened with `IFF_VNET_HDR`, TCP segmentation of the superpackets the pod's
//! kernel hands us, checksum completion, and coalescing (TCP and UDP) of
//! what we write back ([`Gro`]).
//!
//! # Why
//! With `TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)` the pod's TCP
//! stack stops segmenting and checksumming: one `read` returns up to 64 KB
//! of a TCP stream (a "superpacket") instead of one MSS, which removes most
//! of the per-packet syscalls on the sending side, the cost that dominates
//! userspace WireGuard (REFERENCE.md). We then cut the superpacket into
//! MTU-sized segments here, in place (each segment's headers go over the
//! tail of the previous one, already encrypted), before the data plane
//! (which sees only ordinary IP packets) encrypts them straight into a send
//! buffer: no copy of the payload between the TUN read and the UDP send.
//!
//! On the way back we write packets with `VIRTIO_NET_HDR_F_DATA_VALID`: they
//! were authenticated by WireGuard, so the pod's kernel need not verify the
//! checksum again (the kernel WireGuard module does the same).
//!
//! Pure code, no I/O; every index is checked, so no input panics.

/// Size of `struct virtio_net_hdr` (no `num_buffers`): TUN's default.
pub(crate) const VNET_HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const F_DATA_VALID: u8 = 2;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4`: a run of UDP datagrams of `gso_size`
/// payload bytes each (the last may be shorter) behind one header.
const GSO_UDP_L4: u8 = 5;
/// Most datagrams joined into one UDP superpacket: the kernel's own UDP
/// GSO limit was 64 before it became 128.
const MAX_UDP_SEGMENTS: usize = 64;
const GSO_ECN: u8 = 0x80;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// The header written in front of every packet we hand a TUN: no GSO,
/// checksum already verified (see the module doc).
pub(crate) const WRITE_HDR: [u8; VNET_HDR_LEN] = [F_DATA_VALID, GSO_NONE, 0, 0, 0, 0, 0, 0, 0, 0];

/// A `virtio_net_hdr` as the TUN driver writes it (native endianness, which
/// is what TUN uses unless `TUNSETVNETLE`/`BE` say otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VnetHdr {
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

impl VnetHdr {
    pub(crate) fn parse(b: &[u8]) -> Option<Self> {
        let h = b.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([h[i], h[i + 1]]);
        Some(VnetHdr {
            flags: h[0],
            gso_type: h[1] & !GSO_ECN,
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }
}

/// Why a packet from the TUN could not be handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OffloadError {
    /// Headers shorter than they claim, or offsets outside the packet.
    Malformed,
    /// A GSO type we did not enable (we only ask for TCP).
    Unsupported,
}

/// Turns one read from an offloading TUN (`buf` = header + packet) into
/// ordinary IP packets, calling `emit` for each: the packet itself (its
/// checksum completed if the kernel left it to us) or, for a TCP
/// superpacket, each segment, cut in place in `buf` (`scratch` only when
/// the headers are longer than the MSS).
pub(crate) fn for_each_packet(
    buf: &mut [u8],
    scratch: &mut [u8],
    mut emit: impl FnMut(&mut [u8]),
) -> Result<(), OffloadError> {
    let hdr = VnetHdr::parse(buf).ok_or(OffloadError::Malformed)?;
    let pkt = buf.get_mut(VNET_HDR_LEN..).ok_or(OffloadError::Malformed)?;
    match hdr.gso_type {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                complete_checksum(
                    pkt,
                    usize::from(hdr.csum_start),
                    usize::from(hdr.csum_offset),
                )?;
            }
            emit(pkt);
            Ok(())
        }
        GSO_TCPV4 | GSO_TCPV6 if hdr.gso_size > 0 => segment_tcp(
            pkt,
            hdr.gso_type == GSO_TCPV6,
            usize::from(hdr.gso_size),
            scratch,
            emit,
        ),
        GSO_TCPV4 | GSO_TCPV6 => Err(OffloadError::Malformed),
        _ => Err(OffloadError::Unsupported),
    }
}

/// Ones'-complement sum of `data` as big-endian 16-bit words, added to
/// `acc` (not folded).
///
/// This runs over every byte of every TCP segment we cut (and every UDP
/// datagram we join), so it reads 8 bytes at a time in native order and
/// swaps once at the end: the ones'-complement sum is byte-order
/// independent (RFC 1071, 2.B), and since 2^16 = 1 (mod 2^16 - 1) the
/// 32-bit halves of each word can be added whole into a 64-bit
/// accumulator (under 2^33 per word: no overflow below 16 GiB of data).
fn sum(data: &[u8], acc: u64) -> u64 {
    let mut native: u64 = 0;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let w = u64::from_ne_bytes(b);
        native += (w & 0xffff_ffff) + (w >> 32);
    }
    // The tail, zero-padded at its end: its bytes keep their offsets'
    // parity, so they land in the same halves of 16-bit words.
    let rest = words.remainder();
    let mut b = [0u8; 8];
    b[..rest.len()].copy_from_slice(rest);
    let w = u64::from_ne_bytes(b);
    native += (w & 0xffff_ffff) + (w >> 32);
    // The folded native-order sum, its bytes read in network order: the
    // sum of the big-endian words.
    acc + u64::from(u16::from_be_bytes(fold(native).to_ne_bytes()))
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // The loop leaves at most 16 bits.
    u16::try_from(acc).unwrap_or(u16::MAX)
}

/// Completes a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`): the field
/// at `start + offset` holds the pseudo-header sum; the checksum covers
/// everything from `start` to the end.
fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) -> Result<(), OffloadError> {
    let field = start.checked_add(offset).ok_or(OffloadError::Malformed)?;
    if field + 2 > pkt.len() || start > pkt.len() {
        return Err(OffloadError::Malformed);
    }
    let mut c = !fold(sum(&pkt[start..], 0));
    // UDP sends a computed 0 as 0xffff (0 means "no checksum").
    if c == 0 && offset == 6 && ip_protocol(pkt) == Some(PROTO_UDP) {
        c = 0xffff;
    }
    pkt[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

fn ip_protocol(pkt: &[u8]) -> Option<u8> {
    match pkt.first()? >> 4 {
        4 => pkt.get(9).copied(),
        6 => pkt.get(6).copied(),
        _ => None,
    }
}

/// Cuts a TCP superpacket into segments of `mss` payload bytes, each with
/// its own IP length/id/checksum and TCP sequence number/flags/checksum.
///
/// In place, without copying the payload: segment i's headers are written
/// just in front of its payload, over the tail of segment i-1's payload,
/// which `emit` is done with. Only when the headers are longer than `mss`
/// (never for a real MSS) is each segment built in `scratch` instead.
fn segment_tcp(
    pkt: &mut [u8],
    v6: bool,
    mss: usize,
    scratch: &mut [u8],
    mut emit: impl FnMut(&mut [u8]),
) -> Result<(), OffloadError> {
    let bad = OffloadError::Malformed;
    let (ip_hlen, ip_len) = if v6 {
        // Only a bare IPv6 header: the kernel puts no extension headers on
        // TSO packets it hands a TUN.
        if pkt.len() < 40 || pkt[0] >> 4 != 6 || pkt[6] != PROTO_TCP {
            return Err(bad);
        }
        (40, 40 + usize::from(u16::from_be_bytes([pkt[4], pkt[5]])))
    } else {
        if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != PROTO_TCP {
            return Err(bad);
        }
        (
            usize::from(pkt[0] & 0x0f) * 4,
            usize::from(u16::from_be_bytes([pkt[2], pkt[3]])),
        )
    };
    // A 64 KB superpacket may not fit the 16-bit length: trust the read.
    let total = if ip_len > ip_hlen && ip_len <= pkt.len() {
        ip_len
    } else {
        pkt.len()
    };
    let tcp = ip_hlen;
    if total < tcp + 20 {
        return Err(bad);
    }
    let tcp_hlen = usize::from(pkt[tcp + 12] >> 4) * 4;
    let hl = tcp + tcp_hlen;
    if tcp_hlen < 20 || total < hl || (mss < hl && scratch.len() < hl + mss) {
        return Err(bad);
    }
    // The headers as the kernel wrote them (at most 60 + 60 bytes): every
    // segment starts from them.
    let mut h0 = [0u8; 120];
    h0[..hl].copy_from_slice(&pkt[..hl]);
    let seg = Seg {
        h0: &h0[..hl],
        v6,
        tcp,
        seq0: u32::from_be_bytes([pkt[tcp + 4], pkt[tcp + 5], pkt[tcp + 6], pkt[tcp + 7]]),
        id0: u16::from_be_bytes([pkt[4], pkt[5]]),
        flags0: pkt[tcp + 13],
    };
    let payload_len = total - hl;
    let n = payload_len.div_ceil(mss).max(1);
    for i in 0..n {
        let chunk = mss.min(payload_len - (i * mss).min(payload_len));
        let s = if mss >= hl {
            // Headers at [i*mss, i*mss + hl), payload right after.
            let start = i * mss;
            let s = pkt.get_mut(start..start + hl + chunk).ok_or(bad)?;
            if i > 0 {
                s[..hl].copy_from_slice(seg.h0);
            }
            s
        } else {
            let from = hl + i * mss;
            let s = &mut scratch[..hl + chunk];
            s[..hl].copy_from_slice(seg.h0);
            s[hl..].copy_from_slice(pkt.get(from..from + chunk).ok_or(bad)?);
            s
        };
        seg.fix(s, i, n, mss)?;
        emit(s);
    }
    Ok(())
}

/// What every segment of one superpacket shares.
struct Seg<'a> {
    /// The superpacket's IP and TCP headers.
    h0: &'a [u8],
    v6: bool,
    /// Offset of the TCP header (the IP header's length).
    tcp: usize,
    seq0: u32,
    id0: u16,
    flags0: u8,
}

impl Seg<'_> {
    /// Fills in segment `i` of `n` (`s`: its headers, a copy of `h0`, and
    /// its payload): lengths, IPv4 id and checksum, sequence number, flags
    /// and the TCP checksum.
    fn fix(&self, s: &mut [u8], i: usize, n: usize, mss: usize) -> Result<(), OffloadError> {
        let bad = OffloadError::Malformed;
        let (tcp, ip_hlen) = (self.tcp, self.tcp);
        let len16 = u16::try_from(s.len()).map_err(|_| bad)?;
        if self.v6 {
            s[4..6].copy_from_slice(&(len16 - 40).to_be_bytes());
        } else {
            s[2..4].copy_from_slice(&len16.to_be_bytes());
            // Truncation intended: the IPv4 id is a 16-bit counter.
            let id = self
                .id0
                .wrapping_add(u16::try_from(i & 0xffff).unwrap_or(0));
            s[4..6].copy_from_slice(&id.to_be_bytes());
            s[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(&s[..ip_hlen], 0));
            s[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let offset = u32::try_from(i * mss).map_err(|_| bad)?;
        s[tcp + 4..tcp + 8].copy_from_slice(&self.seq0.wrapping_add(offset).to_be_bytes());
        let mut f = self.flags0;
        if i + 1 < n {
            f &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            f &= !TCP_CWR;
        }
        s[tcp + 13] = f;
        s[tcp + 16..tcp + 18].copy_from_slice(&[0, 0]);
        let tcp_len = u64::try_from(s.len() - tcp).map_err(|_| bad)?;
        let pseudo = if self.v6 {
            sum(&s[8..40], 0) + u64::from(PROTO_TCP) + tcp_len
        } else {
            sum(&s[12..20], 0) + u64::from(PROTO_TCP) + tcp_len
        };
        let c = !fold(sum(&s[tcp..], pseudo));
        s[tcp + 16..tcp + 18].copy_from_slice(&c.to_be_bytes());
        Ok(())
    }
}

/// Receive-side coalescing ("GRO") for packets written to an offloading
/// TUN: consecutive in-order TCP segments of one flow, as they come out of
/// one batch of decrypted datagrams, are joined into one superpacket and
/// written with one syscall and a GSO header. The pod's kernel then runs
/// its TCP receive path once per superpacket instead of once per segment.
///
/// UDP likewise: consecutive datagrams of one flow (same addresses and
/// ports), every one but the last of the first one's size, become one
/// `GSO_UDP_L4` superpacket. The pod's kernel routes it once and cuts it
/// back into the same datagrams at the socket, so one `writev` and one
/// trip through IP replace one per datagram. A datagram whose UDP checksum
/// is wrong is never joined (the superpacket's checksums are computed
/// anew, which would rewrite it): it goes out alone, byte for byte as it
/// came. Like every packet we write it is marked verified (see the module
/// doc: the kernel's own WireGuard marks decrypted packets so too), so the
/// pod's kernel does not check it again; TCP segments are joined without a
/// check for the same reason.
///
/// Only the plain case is joined: IPv4 without options or IPv6 without
/// extension headers, TCP with ACK (and PSH on the last segment) only,
/// identical headers apart from length, id, sequence number and
/// checksums, every segment but the last exactly `mss` long. Anything
/// else flushes the pending superpacket and goes out on its own, so the
/// order of packets on a port never changes.
#[derive(Debug)]
pub(crate) struct Gro {
    buf: Vec<u8>,
    /// Bytes of `buf` in use (header + packet), 0 when nothing is pending.
    len: usize,
    port: u32,
    segments: usize,
    mss: usize,
    next_seq: u32,
    ip_hlen: usize,
    tcp_hlen: usize,
    v6: bool,
    /// The pending run is UDP datagrams (`tcp_hlen` is then 8).
    udp: bool,
    /// The last segment was shorter than `mss` or had PSH: no more joins.
    closed: bool,
}

impl Gro {
    pub(crate) fn new() -> Self {
        Gro {
            buf: vec![0; VNET_HDR_LEN + 65535],
            len: 0,
            port: 0,
            segments: 0,
            mss: 0,
            next_seq: 0,
            ip_hlen: 0,
            tcp_hlen: 0,
            v6: false,
            udp: false,
            closed: true,
        }
    }

    /// Hands `pkt`, bound for offloading port `port`, to the coalescer;
    /// `write(port, vnet_header, packet)` is called for whatever must go
    /// out now.
    pub(crate) fn push(
        &mut self,
        port: u32,
        pkt: &[u8],
        write: &mut impl FnMut(u32, &[u8], &[u8]),
    ) {
        if let Some(seg) = TcpSeg::parse(pkt) {
            self.push_tcp(port, pkt, &seg, write);
        } else if let Some(d) = UdpDatagram::parse(pkt) {
            self.push_udp(port, pkt, &d, write);
        } else {
            self.flush(write);
            write_plain(port, pkt, write);
        }
    }

    fn push_udp(
        &mut self,
        port: u32,
        pkt: &[u8],
        d: &UdpDatagram,
        write: &mut impl FnMut(u32, &[u8], &[u8]),
    ) {
        let payload = &pkt[d.ip_hlen + 8..d.total];
        let valid = d.checksum_ok(pkt);
        if self.len > 0
            && valid
            && self.udp
            && !self.closed
            && port == self.port
            && d.v6 == self.v6
            && !payload.is_empty()
            && payload.len() <= self.mss
            && self.segments < MAX_UDP_SEGMENTS
            && self.len + payload.len() <= self.buf.len()
            && same_udp_headers(&self.buf[VNET_HDR_LEN..self.len], pkt, d.ip_hlen, d.v6)
        {
            let end = self.len + payload.len();
            self.buf[self.len..end].copy_from_slice(payload);
            self.len = end;
            self.segments += 1;
            self.closed = payload.len() < self.mss;
            return;
        }
        self.flush(write);
        if !valid || payload.is_empty() {
            write_plain(port, pkt, write);
            return;
        }
        self.buf[VNET_HDR_LEN..VNET_HDR_LEN + d.total].copy_from_slice(&pkt[..d.total]);
        self.len = VNET_HDR_LEN + d.total;
        self.port = port;
        self.segments = 1;
        self.mss = payload.len();
        self.ip_hlen = d.ip_hlen;
        self.tcp_hlen = 8;
        self.v6 = d.v6;
        self.udp = true;
        self.closed = false;
    }

    fn push_tcp(
        &mut self,
        port: u32,
        pkt: &[u8],
        seg: &TcpSeg,
        write: &mut impl FnMut(u32, &[u8], &[u8]),
    ) {
        if self.len > 0 && self.joins(port, pkt, seg) {
            let payload = &pkt[seg.hl..seg.total];
            let end = self.len + payload.len();
            self.buf[self.len..end].copy_from_slice(payload);
            self.len = end;
            self.segments += 1;
            self.next_seq = seg
                .seq
                .wrapping_add(u32::try_from(payload.len()).unwrap_or(0));
            // The superpacket carries the last segment's flags (PSH).
            self.buf[VNET_HDR_LEN + self.ip_hlen + 13] = seg.flags;
            self.closed = payload.len() < self.mss || seg.flags & TCP_PSH != 0;
            return;
        }
        self.flush(write);
        let payload_len = seg.total - seg.hl;
        if payload_len == 0 || seg.flags & !(TCP_ACK | TCP_PSH) != 0 || seg.flags & TCP_ACK == 0 {
            // Pure ACKs and control segments are not worth holding.
            write_plain(port, pkt, write);
            return;
        }
        self.buf[VNET_HDR_LEN..VNET_HDR_LEN + seg.total].copy_from_slice(&pkt[..seg.total]);
        self.len = VNET_HDR_LEN + seg.total;
        self.port = port;
        self.segments = 1;
        self.mss = payload_len;
        self.next_seq = seg
            .seq
            .wrapping_add(u32::try_from(payload_len).unwrap_or(0));
        self.ip_hlen = seg.ip_hlen;
        self.tcp_hlen = seg.hl - seg.ip_hlen;
        self.v6 = seg.v6;
        self.udp = false;
        self.closed = seg.flags & TCP_PSH != 0;
    }

    fn joins(&self, port: u32, pkt: &[u8], seg: &TcpSeg) -> bool {
        let payload_len = seg.total - seg.hl;
        let held = &self.buf[VNET_HDR_LEN..self.len];
        !self.closed
            && !self.udp
            && port == self.port
            && seg.v6 == self.v6
            && seg.ip_hlen == self.ip_hlen
            && seg.hl - seg.ip_hlen == self.tcp_hlen
            && seg.seq == self.next_seq
            && payload_len > 0
            && payload_len <= self.mss
            && self.len + payload_len <= self.buf.len()
            && seg.flags & !TCP_PSH == TCP_ACK
            && same_headers(held, pkt, seg.ip_hlen, seg.hl, seg.v6)
    }

    /// Writes the pending superpacket, if any.
    pub(crate) fn flush(&mut self, write: &mut impl FnMut(u32, &[u8], &[u8])) {
        if self.len == 0 {
            return;
        }
        let len = std::mem::take(&mut self.len);
        let port = self.port;
        if self.segments == 1 {
            write(port, &WRITE_HDR, &self.buf[VNET_HDR_LEN..len]);
            return;
        }
        let (ip_hlen, hl) = (self.ip_hlen, self.ip_hlen + self.tcp_hlen);
        let pkt_len = len - VNET_HDR_LEN;
        let p = &mut self.buf[VNET_HDR_LEN..len];
        if self.v6 {
            let pl = u16::try_from(pkt_len - 40).unwrap_or(u16::MAX);
            p[4..6].copy_from_slice(&pl.to_be_bytes());
        } else {
            let tl = u16::try_from(pkt_len).unwrap_or(u16::MAX);
            p[2..4].copy_from_slice(&tl.to_be_bytes());
            p[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(&p[..ip_hlen], 0));
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        // Partial checksum: the pseudo-header sum, not inverted; the
        // kernel adds the rest (VIRTIO_NET_HDR_F_NEEDS_CSUM). For UDP the
        // length field covers the whole run: the kernel rewrites it, and
        // adjusts the checksum to match, in each datagram it cuts.
        let l4_len = pkt_len - ip_hlen;
        let (proto, check_at) = if self.udp {
            let ul = u16::try_from(l4_len).unwrap_or(u16::MAX);
            p[ip_hlen + 4..ip_hlen + 6].copy_from_slice(&ul.to_be_bytes());
            (PROTO_UDP, ip_hlen + 6)
        } else {
            (PROTO_TCP, ip_hlen + 16)
        };
        let l4_len = u64::try_from(l4_len).unwrap_or(0);
        let pseudo = if self.v6 {
            sum(&p[8..40], 0) + u64::from(proto) + l4_len
        } else {
            sum(&p[12..20], 0) + u64::from(proto) + l4_len
        };
        p[check_at..check_at + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
        let h = &mut self.buf[..VNET_HDR_LEN];
        h[0] = F_NEEDS_CSUM;
        h[1] = match (self.udp, self.v6) {
            (true, _) => GSO_UDP_L4,
            (false, true) => GSO_TCPV6,
            (false, false) => GSO_TCPV4,
        };
        let u = |v: usize| u16::try_from(v).unwrap_or(u16::MAX).to_ne_bytes();
        h[2..4].copy_from_slice(&u(hl));
        h[4..6].copy_from_slice(&u(self.mss));
        h[6..8].copy_from_slice(&u(ip_hlen));
        h[8..10].copy_from_slice(&u(check_at - ip_hlen));
        write(
            port,
            &self.buf[..VNET_HDR_LEN],
            &self.buf[VNET_HDR_LEN..len],
        );
    }
}

fn write_plain(port: u32, pkt: &[u8], write: &mut impl FnMut(u32, &[u8], &[u8])) {
    write(port, &WRITE_HDR, pkt);
}

const TCP_ACK: u8 = 0x10;

/// Offsets of a TCP segment GRO may join.
struct TcpSeg {
    v6: bool,
    ip_hlen: usize,
    /// IP + TCP header length.
    hl: usize,
    total: usize,
    seq: u32,
    flags: u8,
}

/// The plain IP packets GRO joins: IPv4 without options and not a
/// fragment (MF clear, offset 0), or IPv6 whose next header is `proto`
/// itself (no extension headers), at least `min_l4` bytes past the IP
/// header. Returns (IPv6?, IP header length, IP total length).
fn plain_ip(pkt: &[u8], proto: u8, min_l4: usize) -> Option<(bool, usize, usize)> {
    match pkt.first()? >> 4 {
        6 if pkt.len() >= 40 + min_l4 && pkt[6] == proto => Some((
            true,
            40,
            40 + usize::from(u16::from_be_bytes([pkt[4], pkt[5]])),
        )),
        4 if pkt.len() >= 20 + min_l4
            && pkt[0] == 0x45
            && pkt[9] == proto
            && pkt[6] & 0x3f == 0
            && pkt[7] == 0 =>
        {
            Some((false, 20, usize::from(u16::from_be_bytes([pkt[2], pkt[3]]))))
        }
        _ => None,
    }
}

/// Whether two plain IP headers agree on everything but length, id and
/// checksum.
fn same_ip_headers(a: &[u8], b: &[u8], v6: bool) -> bool {
    if v6 {
        // version/class/flow, next header, hop limit, addresses
        a[0..4] == b[0..4] && a[6..40] == b[6..40]
    } else {
        // tos, flags/fragment, ttl, protocol, addresses
        a[1] == b[1] && a[6..10] == b[6..10] && a[12..20] == b[12..20]
    }
}

impl TcpSeg {
    fn parse(pkt: &[u8]) -> Option<Self> {
        let (v6, ip_hlen, total) = plain_ip(pkt, PROTO_TCP, 20)?;
        let tcp_hlen = usize::from(pkt[ip_hlen + 12] >> 4) * 4;
        let hl = ip_hlen + tcp_hlen;
        if tcp_hlen < 20 || total < hl || total > pkt.len() {
            return None;
        }
        Some(TcpSeg {
            v6,
            ip_hlen,
            hl,
            total,
            seq: u32::from_be_bytes([
                pkt[ip_hlen + 4],
                pkt[ip_hlen + 5],
                pkt[ip_hlen + 6],
                pkt[ip_hlen + 7],
            ]),
            flags: pkt[ip_hlen + 13],
        })
    }
}

/// Offsets of a UDP datagram GRO may join: IPv4 without options or
/// fragmentation, or IPv6 without extension headers, whose UDP length
/// matches the IP length.
struct UdpDatagram {
    v6: bool,
    ip_hlen: usize,
    /// IP header + UDP length: the bytes of `pkt` that are the datagram.
    total: usize,
}

impl UdpDatagram {
    fn parse(pkt: &[u8]) -> Option<Self> {
        let (v6, ip_hlen, total) = plain_ip(pkt, PROTO_UDP, 8)?;
        let udp_len = usize::from(u16::from_be_bytes([pkt[ip_hlen + 4], pkt[ip_hlen + 5]]));
        if total > pkt.len() || udp_len < 8 || ip_hlen + udp_len != total {
            return None;
        }
        Some(UdpDatagram { v6, ip_hlen, total })
    }

    /// The UDP checksum verifies (or is absent: 0 over IPv4).
    fn checksum_ok(&self, pkt: &[u8]) -> bool {
        let t = self.ip_hlen;
        if !self.v6 && pkt[t + 6..t + 8] == [0, 0] {
            return true;
        }
        let len = u64::try_from(self.total - t).unwrap_or(0);
        let pseudo = if self.v6 {
            sum(&pkt[8..40], 0)
        } else {
            sum(&pkt[12..20], 0)
        } + u64::from(PROTO_UDP)
            + len;
        fold(sum(&pkt[t..self.total], pseudo)) == 0xffff
    }
}

/// Whether two UDP datagrams' headers agree on everything but length, id
/// and checksums.
fn same_udp_headers(a: &[u8], b: &[u8], ip_hlen: usize, v6: bool) -> bool {
    let hl = ip_hlen + 8;
    if a.len() < hl || b.len() < hl {
        return false;
    }
    same_ip_headers(a, b, v6) && a[ip_hlen..ip_hlen + 4] == b[ip_hlen..ip_hlen + 4]
}

/// Whether two segments' headers agree on everything but length, id,
/// checksums, sequence number and flags.
fn same_headers(a: &[u8], b: &[u8], ip_hlen: usize, hl: usize, v6: bool) -> bool {
    if a.len() < hl || b.len() < hl {
        return false;
    }
    let t = ip_hlen;
    same_ip_headers(a, b, v6)
        // ports
        && a[t..t + 4] == b[t..t + 4]
        // ack number, data offset
        && a[t + 8..t + 13] == b[t + 8..t + 13]
        // window, urgent pointer, options
        && a[t + 14..t + 16] == b[t + 14..t + 16]
        && a[t + 18..hl] == b[t + 18..hl]
}

#[cfg(test)]
mod tests {
    /// The plain definition: big-endian 16-bit words, a trailing byte
    /// padded with zero.
    fn sum_reference(data: &[u8]) -> u64 {
        data.chunks(2)
            .map(|c| u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
            .sum()
    }

    #[test]
    fn checksum_sum_matches_the_definition() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut data = vec![0u8; 1600];
        for b in &mut data {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x.to_le_bytes()[0];
        }
        // Every length and start (odd ones too), and all-0xff words, whose
        // sums fold to the ones'-complement "negative zero".
        let ones = [0xffu8; 64];
        for buf in [&data[..], &ones[..]] {
            for start in 0..9 {
                for len in 0..buf.len() - start {
                    let d = &buf[start..start + len];
                    assert_eq!(
                        fold(super::sum(d, 7)),
                        fold(sum_reference(d) + 7),
                        "start {start} len {len}"
                    );
                }
            }
        }
    }

    use super::*;

    fn tcp_v4(payload_len: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..payload_len)
            .map(|i| u8::try_from(i % 251).expect("< 251"))
            .collect();
        let b = etherparse::PacketBuilder::ipv4([198, 51, 100, 1], [198, 51, 100, 2], 64)
            .tcp(40000, 5201, 1000, 65535)
            .psh()
            .ack(7);
        let mut v = Vec::new();
        b.write(&mut v, &payload).expect("build");
        v
    }

    fn with_hdr(gso_type: u8, gso_size: u16, pkt: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; VNET_HDR_LEN];
        h[0] = F_NEEDS_CSUM;
        h[1] = gso_type;
        h[4..6].copy_from_slice(&gso_size.to_ne_bytes());
        h[6..8].copy_from_slice(&20u16.to_ne_bytes());
        h[8..10].copy_from_slice(&16u16.to_ne_bytes());
        h.extend_from_slice(pkt);
        h
    }

    #[test]
    fn tso_segments_are_valid_tcp() {
        let pkt = tcp_v4(3000);
        let mut buf = with_hdr(GSO_TCPV4, 1400, &pkt);
        let mut scratch = vec![0u8; 65536];
        let mut segs = Vec::new();
        for_each_packet(&mut buf, &mut scratch, |s| segs.push(s.to_vec())).expect("splits");
        assert_eq!(segs.len(), 3);
        let mut seq = 1000u32;
        let mut data = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let h = etherparse::SlicedPacket::from_ip(s).expect("parses");
            let Some(etherparse::NetSlice::Ipv4(ip)) = &h.net else {
                panic!("ipv4")
            };
            assert_eq!(ip.header().total_len() as usize, s.len());
            assert_eq!(
                ip.header().to_header().calc_header_checksum(),
                ip.header().header_checksum()
            );
            let Some(etherparse::TransportSlice::Tcp(t)) = &h.transport else {
                panic!("tcp")
            };
            assert_eq!(t.sequence_number(), seq);
            assert_eq!(t.psh(), i == 2, "PSH only on the last segment");
            let want = t
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), t.payload())
                .expect("checksum");
            assert_eq!(t.checksum(), want, "segment {i} TCP checksum");
            seq += u32::try_from(t.payload().len()).expect("small");
            data.extend_from_slice(t.payload());
        }
        assert_eq!(data, pkt[40..].to_vec());
    }

    #[test]
    fn partial_checksum_is_completed() {
        let mut pkt = tcp_v4(100);
        let good = [pkt[36], pkt[37]];
        // What the kernel leaves: the pseudo-header sum, not inverted.
        let pseudo = fold(sum(&pkt[12..20], 0) + 6 + (pkt.len() - 20) as u64);
        pkt[36..38].copy_from_slice(&pseudo.to_be_bytes());
        let mut buf = with_hdr(GSO_NONE, 0, &pkt);
        let mut scratch = vec![0u8; 2048];
        let mut out = Vec::new();
        for_each_packet(&mut buf, &mut scratch, |s| out = s.to_vec()).expect("ok");
        assert_eq!([out[36], out[37]], good);
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        let mut scratch = vec![0u8; 2048];
        for len in 0..80 {
            let mut buf = vec![0xffu8; len];
            for t in [GSO_NONE, GSO_TCPV4, GSO_TCPV6, 3] {
                if len > 1 {
                    buf[1] = t;
                }
                let _ = for_each_packet(&mut buf, &mut scratch, |_| {});
            }
        }
    }

    #[test]
    fn gro_rejoins_what_tso_split() {
        let pkt = tcp_v4(3000);
        let mut buf = with_hdr(GSO_TCPV4, 1400, &pkt);
        let mut scratch = vec![0u8; 65536];
        let mut segs = Vec::new();
        for_each_packet(&mut buf, &mut scratch, |s| segs.push(s.to_vec())).expect("splits");
        let mut gro = Gro::new();
        let mut writes: Vec<(u32, Vec<u8>, Vec<u8>)> = Vec::new();
        let mut w = |p: u32, h: &[u8], b: &[u8]| writes.push((p, h.to_vec(), b.to_vec()));
        for s in &segs {
            gro.push(7, s, &mut w);
        }
        gro.flush(&mut w);
        assert_eq!(writes.len(), 1, "one superpacket");
        let (port, h, b) = &writes[0];
        assert_eq!(*port, 7);
        let hdr = VnetHdr::parse(h).expect("header");
        assert_eq!(hdr.gso_type, GSO_TCPV4);
        assert_eq!(hdr.gso_size, 1400);
        assert_eq!(hdr.flags, F_NEEDS_CSUM);
        assert_eq!((hdr.csum_start, hdr.csum_offset), (20, 16));
        assert_eq!(b.len(), pkt.len());
        assert_eq!(
            b[..36],
            pkt[..36],
            "same IP header and TCP header up to the checksum"
        );
        assert_eq!(b[38..], pkt[38..], "same payload");
        // Completing the partial checksum gives the original one.
        let mut done = b.clone();
        complete_checksum(&mut done, 20, 16).expect("completes");
        assert_eq!(done, pkt);
    }

    #[test]
    fn gro_keeps_gaps_and_other_flows_apart() {
        let pkt = tcp_v4(2800);
        let mut buf = with_hdr(GSO_TCPV4, 1400, &pkt);
        let mut scratch = vec![0u8; 65536];
        let mut segs = Vec::new();
        for_each_packet(&mut buf, &mut scratch, |s| segs.push(s.to_vec())).expect("splits");
        let mut gro = Gro::new();
        let mut n = 0;
        let mut w = |_: u32, _: &[u8], _: &[u8]| n += 1;
        // Second segment first: out of order, nothing may be joined.
        gro.push(1, &segs[1], &mut w);
        gro.push(1, &segs[0], &mut w);
        // Same segments to another port: not joined with port 1's.
        gro.push(2, &segs[1], &mut w);
        gro.flush(&mut w);
        assert_eq!(n, 3);
    }

    fn udp_v4(sport: u16, payload: &[u8]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4([198, 51, 100, 1], [198, 51, 100, 2], 64)
            .udp(sport, 5300);
        let mut v = Vec::new();
        b.write(&mut v, payload).expect("build");
        v
    }

    fn udp_v6(payload: &[u8]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv6(
            [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            64,
        )
        .udp(40000, 5300);
        let mut v = Vec::new();
        b.write(&mut v, payload).expect("build");
        v
    }

    /// What the pod's kernel does with a `GSO_UDP_L4` write: cut the
    /// payload into `gso_size` pieces, each with the headers, its own
    /// lengths, and the checksum completed.
    fn kernel_cut(h: &VnetHdr, b: &[u8]) -> Vec<Vec<u8>> {
        let ip_hlen = usize::from(h.csum_start);
        let hl = ip_hlen + 8;
        let v6 = b[0] >> 4 == 6;
        b[hl..]
            .chunks(usize::from(h.gso_size))
            .map(|chunk| {
                let mut p = b[..hl].to_vec();
                p.extend_from_slice(chunk);
                let l4 = u16::try_from(8 + chunk.len()).expect("small");
                p[ip_hlen + 4..ip_hlen + 6].copy_from_slice(&l4.to_be_bytes());
                if v6 {
                    p[4..6].copy_from_slice(&l4.to_be_bytes());
                } else {
                    let tl = u16::try_from(p.len()).expect("small");
                    p[2..4].copy_from_slice(&tl.to_be_bytes());
                    p[10..12].copy_from_slice(&[0, 0]);
                    let c = !fold(sum(&p[..20], 0));
                    p[10..12].copy_from_slice(&c.to_be_bytes());
                }
                let pseudo = if v6 {
                    sum(&p[8..40], 0)
                } else {
                    sum(&p[12..20], 0)
                } + u64::from(PROTO_UDP)
                    + u64::from(l4);
                p[ip_hlen + 6..ip_hlen + 8].copy_from_slice(&fold(pseudo).to_be_bytes());
                complete_checksum(&mut p, ip_hlen, 6).expect("completes");
                p
            })
            .collect()
    }

    fn gro_all(pkts: &[Vec<u8>]) -> Vec<(u32, Vec<u8>, Vec<u8>)> {
        let mut gro = Gro::new();
        let mut writes: Vec<(u32, Vec<u8>, Vec<u8>)> = Vec::new();
        let mut w = |p: u32, h: &[u8], b: &[u8]| writes.push((p, h.to_vec(), b.to_vec()));
        for p in pkts {
            gro.push(3, p, &mut w);
        }
        gro.flush(&mut w);
        writes
    }

    #[test]
    fn udp_gro_joins_a_flow_and_the_kernel_cut_gives_it_back() {
        for v6 in [false, true] {
            let sizes = [1000usize, 1000, 1000, 377];
            let pkts: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let payload: Vec<u8> = (0..*n)
                        .map(|j| u8::try_from((i * 7 + j) % 251).expect("< 251"))
                        .collect();
                    if v6 {
                        udp_v6(&payload)
                    } else {
                        udp_v4(40000, &payload)
                    }
                })
                .collect();
            let writes = gro_all(&pkts);
            assert_eq!(writes.len(), 1, "one superpacket (v6: {v6})");
            let (port, h, b) = &writes[0];
            assert_eq!(*port, 3);
            let hdr = VnetHdr::parse(h).expect("header");
            let ip_hlen = if v6 { 40 } else { 20 };
            assert_eq!(hdr.gso_type, GSO_UDP_L4);
            assert_eq!(hdr.gso_size, 1000);
            assert_eq!(hdr.flags, F_NEEDS_CSUM);
            assert_eq!((hdr.csum_start, hdr.csum_offset), (ip_hlen, 6));
            assert_eq!(
                kernel_cut(&hdr, b),
                pkts,
                "the kernel's cut gives back every datagram, checksums included"
            );
        }
    }

    #[test]
    fn udp_gro_keeps_flows_bad_checksums_and_bigger_datagrams_apart() {
        let a = udp_v4(40000, &[1; 500]);
        let other_flow = udp_v4(40001, &[2; 500]);
        let bigger = udp_v4(40000, &[3; 600]);
        let mut bad = udp_v4(40000, &[4; 500]);
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let writes = gro_all(&[
            a.clone(),
            a.clone(),
            other_flow.clone(),
            bigger.clone(),
            bad.clone(),
            a.clone(),
        ]);
        let shapes: Vec<(u8, usize)> = writes
            .iter()
            .map(|(_, h, b)| (VnetHdr::parse(h).expect("hdr").gso_type, b.len()))
            .collect();
        assert_eq!(
            shapes,
            [
                (GSO_UDP_L4, a.len() + 500),
                (GSO_NONE, other_flow.len()),
                (GSO_NONE, bigger.len()),
                (GSO_NONE, bad.len()),
                (GSO_NONE, a.len()),
            ],
            "only the first two join; order is kept"
        );
        assert_eq!(writes[3].2, bad, "a bad checksum goes out as it came");
        // A shorter datagram ends a run: nothing joins after it.
        let short = udp_v4(40000, &[5; 100]);
        let writes = gro_all(&[a.clone(), short.clone(), a.clone()]);
        assert_eq!(writes.len(), 2);
        assert_eq!(writes[0].2.len(), a.len() + 100);
        // At most MAX_UDP_SEGMENTS per superpacket.
        let tiny = udp_v4(40000, &[6; 10]);
        let many = vec![tiny; MAX_UDP_SEGMENTS + 1];
        let writes = gro_all(&many);
        assert_eq!(writes.len(), 2);
        assert_eq!(writes[1].2.len(), 38, "the extra one alone");
    }

    #[test]
    fn udp_fragments_and_garbage_are_not_joined() {
        let mut frag = udp_v4(40000, &[1; 500]);
        frag[6] |= 0x20; // MF
        assert!(UdpDatagram::parse(&frag).is_none());
        let mut lying = udp_v4(40000, &[1; 500]);
        lying[25] = lying[25].wrapping_add(4); // UDP length != IP length
        assert!(UdpDatagram::parse(&lying).is_none());
        let mut state = 0x1234_5678_u32;
        for len in 0..200 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    u8::try_from(state & 0xff).expect("byte")
                })
                .collect();
            let _ = gro_all(&[junk.clone(), junk]);
        }
    }

    #[test]
    fn in_place_and_scratch_segmentation_agree() {
        let pkt = tcp_v4(1000);
        let cut = |mss: u16| {
            let mut buf = with_hdr(GSO_TCPV4, mss, &pkt);
            let mut scratch = vec![0u8; 65536];
            let mut segs = Vec::new();
            for_each_packet(&mut buf, &mut scratch, |s| segs.push(s.to_vec())).expect("splits");
            segs
        };
        // mss 40 >= 40 header bytes: in place; mss 39: in scratch. Both
        // must give the same segments as cutting by hand.
        for mss in [40u16, 39] {
            let segs = cut(mss);
            let m = usize::from(mss);
            assert_eq!(segs.len(), 1000usize.div_ceil(m), "mss {mss}");
            let mut data = Vec::new();
            for s in &segs {
                let h = etherparse::SlicedPacket::from_ip(s).expect("parses");
                let Some(etherparse::TransportSlice::Tcp(t)) = &h.transport else {
                    panic!("tcp")
                };
                let Some(etherparse::NetSlice::Ipv4(ip)) = &h.net else {
                    panic!("ipv4")
                };
                let want = t
                    .to_header()
                    .calc_checksum_ipv4(&ip.header().to_header(), t.payload())
                    .expect("checksum");
                assert_eq!(t.checksum(), want, "mss {mss}");
                data.extend_from_slice(t.payload());
            }
            assert_eq!(data, pkt[40..], "mss {mss}: the payload, in order");
        }
    }
}
