//! Fuzzing entry point for the frame parser, built with or without the
//! `dpdk` feature (the parser is pure code): `dpdk/fuzz` runs it, and so
//! does a unit test over fixed inputs.

use std::net::SocketAddr;

use crate::wire::{Local, Rx, classify};

const OUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

/// Classifies `data` as an Ethernet frame for an IPv4 and for an IPv6
/// endpoint, and checks what the caller relies on: a datagram's payload
/// lies inside the frame and after the headers, and nothing panics. When
/// the first byte is odd the frame is addressed to our MAC, so that inputs
/// get past the MAC filter into the IP and UDP parsers.
///
/// # Panics
/// When an invariant does not hold (that is the point).
pub fn frame(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut f = rest.to_vec();
    if first & 1 == 1 && f.len() >= 6 {
        f[..6].copy_from_slice(&OUR_MAC);
    }
    let locals: [SocketAddr; 2] = [
        SocketAddr::from(([198, 51, 100, 2], 51820)),
        SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 2], 51820)),
    ];
    for addr in locals {
        let local = Local { mac: OUR_MAC, addr };
        if let Rx::Datagram { src, offset, len } = classify(&f, &local) {
            let (offset, len) = (usize::from(offset), usize::from(len));
            assert!(offset + len <= f.len(), "payload past the frame");
            assert!(offset >= 14 + 20 + 8, "payload inside the headers");
            assert_eq!(src.is_ipv4(), addr.is_ipv4(), "source of another family");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in seeds: a WireGuard-sized datagram to us (reaching
    /// the UDP parser) and an ARP request for our address.
    #[test]
    fn the_seed_corpus_reaches_the_parsers() {
        let udp = include_bytes!("../fuzz/corpus/frame/udp4-datagram");
        frame(udp);
        let local = Local {
            mac: OUR_MAC,
            addr: SocketAddr::from(([198, 51, 100, 2], 51820)),
        };
        let rx = classify(&udp[1..], &local);
        assert!(
            matches!(rx, Rx::Datagram { len: 32, .. }),
            "the seed is a datagram for us: {rx:?}"
        );
        let arp = include_bytes!("../fuzz/corpus/frame/arp-request");
        frame(arp);
        let rx = classify(&arp[1..], &local);
        assert!(
            matches!(rx, Rx::Arp { for_us: true, .. }),
            "the seed is an ARP request for us: {rx:?}"
        );
    }

    #[test]
    fn random_and_truncated_frames_keep_the_invariants() {
        let mut state = 0x9e37_79b9_u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        for len in 0..300usize {
            let data: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
            frame(&data);
        }
    }
}
