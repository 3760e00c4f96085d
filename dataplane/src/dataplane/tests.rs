//! Table, same-node forwarding, L2 and MTU behaviour of [`Dataplane`].
//! WireGuard between two data planes is exercised in `tests/sim.rs`.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{
    ArpEthIpv4Packet, ArpOperation, EtherType, Ethernet2Header, Icmpv4Slice, Icmpv4Type, Ipv4Slice,
    PacketBuilder,
};

use super::*;
use crate::stage::Stage;
use crate::stages::CounterStage;
use crate::xconn::TapConfig;

const POD_A_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xa1]);
const POD_B_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xb1]);
const PEER_OF_A_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xa2]);
const PEER_OF_B_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xb2]);

fn v4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64).udp(4000, 5000);
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("write");
    v
}

fn v6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ipv6(src.octets(), dst.octets(), 64).udp(4000, 5000);
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("write");
    v
}

fn eth(dst: MacAddr, src: MacAddr, ether_type: EtherType, payload: &[u8]) -> Vec<u8> {
    let mut f = Ethernet2Header {
        destination: dst.0,
        source: src.0,
        ether_type,
    }
    .to_bytes()
    .to_vec();
    f.extend_from_slice(payload);
    f
}

fn end(port: u32, peer4: [u8; 4]) -> PodEnd {
    PodEnd {
        port: PortId(port),
        peer_ipv4: Some(Ipv4Addr::from(peer4)),
        peer_ipv6: Some(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(peer4[3]))),
    }
}

/// Two TUN pods joined on one node: A = port 0 (10.0.0.1), B = port 1
/// (10.0.0.2), MTU 1400.
fn tun_pair() -> Dataplane {
    let mut dp = Dataplane::new(DataplaneConfig::default());
    dp.add_port(PortId(0), PortKind::Tun).expect("port 0");
    dp.add_port(PortId(1), PortKind::Tun).expect("port 1");
    dp.upsert_xconnect(
        "local",
        XconnSpec {
            payload: Payload::Ip,
            mtu: 1400,
            a: end(0, [10, 0, 0, 2]),
            b: FarEnd::Pod(end(1, [10, 0, 0, 1])),
        },
    )
    .expect("xconn");
    dp
}

fn tap_pair() -> Dataplane {
    let mut dp = Dataplane::new(DataplaneConfig::default());
    let tap = |pod, peer| {
        PortKind::Tap(TapConfig {
            peer_mac: peer,
            pod_mac: Some(pod),
        })
    };
    dp.add_port(PortId(0), tap(POD_A_MAC, PEER_OF_A_MAC))
        .expect("port 0");
    dp.add_port(PortId(1), tap(POD_B_MAC, PEER_OF_B_MAC))
        .expect("port 1");
    dp.upsert_xconnect(
        "l2",
        XconnSpec {
            payload: Payload::Ethernet,
            mtu: 1400,
            a: end(0, [10, 0, 0, 2]),
            b: FarEnd::Pod(end(1, [10, 0, 0, 1])),
        },
    )
    .expect("xconn");
    dp
}

#[test]
fn same_node_tun_forwards_both_ways_in_place() {
    let mut dp = tun_pair();
    let mut out = vec![0u8; out_len(1400)];
    for (from, to, src, dst) in [
        (0, 1, [10, 0, 0, 1], [10, 0, 0, 2]),
        (1, 0, [10, 0, 0, 2], [10, 0, 0, 1]),
    ] {
        let sent = v4(src, dst, b"hello");
        let mut buf = sent.clone();
        let input_ptr = buf.as_ptr();
        match dp.from_pod(Instant::now(), PortId(from), &mut buf, &mut out) {
            Action::ToPod { port, packet } => {
                assert_eq!(port, PortId(to));
                assert_eq!(packet, &sent[..]);
                assert_eq!(packet.as_ptr(), input_ptr, "zero copy");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let s = dp.counters("local").expect("counters").snapshot();
    assert_eq!((s.a.rx_packets, s.a.tx_packets), (1, 1));
    assert_eq!((s.b.rx_packets, s.b.tx_packets), (1, 1));
    assert_eq!(s.drops.total(), 0);
}

#[test]
fn same_node_trims_trailing_bytes() {
    let mut dp = tun_pair();
    let mut out = vec![0u8; out_len(1400)];
    let sent = v4([10, 0, 0, 1], [10, 0, 0, 2], b"x");
    let mut buf = sent.clone();
    buf.extend_from_slice(&[0xee; 7]);
    match dp.from_pod(Instant::now(), PortId(0), &mut buf, &mut out) {
        Action::ToPod { packet, .. } => assert_eq!(packet, &sent[..]),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn unknown_and_unattached_ports_drop_globally() {
    let mut dp = tun_pair();
    dp.add_port(PortId(7), PortKind::Tun).expect("port 7");
    let mut out = vec![0u8; 2048];
    let mut buf = v4([10, 0, 0, 1], [10, 0, 0, 2], b"x");
    assert!(matches!(
        dp.from_pod(Instant::now(), PortId(3), &mut buf, &mut out),
        Action::Drop(DropReason::UnknownPort)
    ));
    assert!(matches!(
        dp.from_pod(Instant::now(), PortId(u32::MAX), &mut buf, &mut out),
        Action::Drop(DropReason::UnknownPort)
    ));
    assert!(matches!(
        dp.from_pod(Instant::now(), PortId(7), &mut buf, &mut out),
        Action::Drop(DropReason::NoCrossConnect)
    ));
    let g = dp.global_counters().snapshot();
    assert_eq!(g.get(DropReason::UnknownPort), 2);
    assert_eq!(g.get(DropReason::NoCrossConnect), 1);
}

#[test]
fn removing_a_cross_connect_drops_its_traffic() {
    let mut dp = tun_pair();
    let counters = dp.counters("local").expect("counters");
    let mut out = vec![0u8; 2048];
    let mut buf = v4([10, 0, 0, 1], [10, 0, 0, 2], b"x");
    assert!(matches!(
        dp.from_pod(Instant::now(), PortId(0), &mut buf, &mut out),
        Action::ToPod { .. }
    ));
    let chain = dp.remove_xconnect("local").expect("remove");
    assert!(chain.is_empty());
    assert!(matches!(
        dp.from_pod(Instant::now(), PortId(0), &mut buf, &mut out),
        Action::Drop(DropReason::NoCrossConnect)
    ));
    assert!(dp.counters("local").is_none());
    // The handle outlives the connection for a final scrape.
    assert_eq!(counters.snapshot().a.rx_packets, 1);
    assert_eq!(
        dp.global_counters()
            .snapshot()
            .get(DropReason::NoCrossConnect),
        1
    );
    assert_eq!(
        dp.remove_xconnect("local").map(|_| ()),
        Err(XconnError::new("local", ConfigError::UnknownXconn))
    );
    // The ports are free again.
    dp.remove_port(PortId(0)).expect("port 0 free");
}

#[test]
fn malformed_pod_packets_are_counted_on_the_connection() {
    let mut dp = tun_pair();
    let mut out = vec![0u8; 2048];
    let good = v4([10, 0, 0, 1], [10, 0, 0, 2], b"hello");
    let mut bad_version = good.clone();
    bad_version[0] = 0x75;
    let mut bad_ihl = good.clone();
    bad_ihl[0] = 0x43;
    let cases: Vec<(Vec<u8>, DropReason)> = vec![
        (Vec::new(), DropReason::TooShort),
        (good[..19].to_vec(), DropReason::TooShort),
        (good[..good.len() - 1].to_vec(), DropReason::TooShort),
        (bad_version, DropReason::BadIpVersion),
        (bad_ihl, DropReason::MalformedHeader),
        (vec![0xff; 64], DropReason::BadIpVersion),
    ];
    for (mut buf, reason) in cases {
        match dp.from_pod(Instant::now(), PortId(0), &mut buf, &mut out) {
            Action::Drop(r) => assert_eq!(r, reason),
            other => panic!("unexpected {other:?}"),
        }
    }
    let s = dp.counters("local").expect("counters").snapshot();
    assert_eq!(s.drops.get(DropReason::TooShort), 3);
    assert_eq!(s.drops.get(DropReason::BadIpVersion), 2);
    assert_eq!(s.drops.get(DropReason::MalformedHeader), 1);
    assert_eq!(s.a.rx_packets, 6);
}

#[test]
fn oversized_ipv4_gets_fragmentation_needed_from_the_peer() {
    let mut dp = tun_pair();
    let mut out = vec![0u8; out_len(1400)];
    let mut buf = v4([10, 0, 0, 1], [10, 0, 0, 2], &[7u8; 1500]);
    match dp.from_pod(Instant::now(), PortId(0), &mut buf, &mut out) {
        Action::ToPod { port, packet } => {
            assert_eq!(port, PortId(0), "back to the sender");
            let ip = Ipv4Slice::from_slice(packet).expect("ipv4");
            assert_eq!(ip.header().source_addr(), Ipv4Addr::new(10, 0, 0, 2));
            assert_eq!(ip.header().destination_addr(), Ipv4Addr::new(10, 0, 0, 1));
            let icmp = Icmpv4Slice::from_slice(ip.payload().payload).expect("icmp");
            assert_eq!(
                icmp.icmp_type(),
                Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: 1400
                    }
                )
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    // Exactly at the MTU passes.
    let mut fits = v4([10, 0, 0, 1], [10, 0, 0, 2], &[7u8; 1400 - 28]);
    assert!(matches!(
        dp.from_pod(Instant::now(), PortId(0), &mut fits, &mut out),
        Action::ToPod {
            port: PortId(1),
            ..
        }
    ));
    let s = dp.counters("local").expect("counters").snapshot();
    assert_eq!(s.drops.get(DropReason::PacketTooBig), 1);
    assert_eq!(s.a.tx_packets, 1, "the ICMP reply went back to A");
}

#[test]
fn set_chain_swaps_and_runs_the_counter_stage() {
    let mut dp = tun_pair();
    let (stage, handle) = CounterStage::new();
    let old = dp.set_chain("local", Chain::new(stage)).expect("set");
    assert!(old.is_empty());
    let mut out = vec![0u8; 2048];
    for (port, src, dst) in [
        (0, [10, 0, 0, 1], [10, 0, 0, 2]),
        (1, [10, 0, 0, 2], [10, 0, 0, 1]),
    ] {
        let mut buf = v4(src, dst, &[0; 72]);
        assert!(matches!(
            dp.from_pod(Instant::now(), PortId(port), &mut buf, &mut out),
            Action::ToPod { .. }
        ));
    }
    let c = handle.snapshot();
    assert_eq!((c.a_to_b_packets, c.a_to_b_bytes), (1, 100));
    assert_eq!((c.b_to_a_packets, c.b_to_a_bytes), (1, 100));
    let status = dp.status("local", Instant::now()).expect("status");
    assert_eq!(status.chain, vec!["counter"]);
    assert!(dp.set_chain("nope", Chain::empty()).is_err());
}

/// A stage that drops everything, to check verdicts are honoured.
struct DenyAll;

impl Stage for DenyAll {
    fn process(&mut self, _: &StageCtx, _: &mut IpPacket<'_>) -> Verdict {
        Verdict::Drop(DropReason::AclDenied)
    }
    fn name(&self) -> &'static str {
        "deny"
    }
}

#[test]
fn chain_drop_is_counted() {
    let mut dp = tun_pair();
    let _ = dp.set_chain("local", Chain::new(DenyAll)).expect("set");
    let mut out = vec![0u8; 2048];
    let mut buf = v4([10, 0, 0, 1], [10, 0, 0, 2], b"x");
    assert!(matches!(
        dp.from_pod(Instant::now(), PortId(0), &mut buf, &mut out),
        Action::Drop(DropReason::AclDenied)
    ));
    let s = dp.counters("local").expect("counters").snapshot();
    assert_eq!(s.drops.get(DropReason::AclDenied), 1);
    assert_eq!(s.b.tx_packets, 0);
}

#[test]
fn tap_to_tap_rewrites_macs_in_place() {
    let mut dp = tap_pair();
    let mut out = vec![0u8; out_len(1400)];
    let ip = v4([10, 0, 0, 1], [10, 0, 0, 2], b"over L2");
    let mut frame = eth(PEER_OF_A_MAC, POD_A_MAC, EtherType::IPV4, &ip);
    frame.resize(frame.len().max(60), 0); // minimum frame padding
    match dp.from_pod(Instant::now(), PortId(0), &mut frame, &mut out) {
        Action::ToPod { port, packet } => {
            assert_eq!(port, PortId(1));
            assert_eq!(&packet[..6], &POD_B_MAC.0);
            assert_eq!(&packet[6..12], &PEER_OF_B_MAC.0);
            assert_eq!(&packet[12..14], &[0x08, 0x00]);
            assert_eq!(&packet[14..], &ip[..], "padding trimmed");
        }
        other => panic!("unexpected {other:?}"),
    }
    let ip6 = v6(
        "fd00::1".parse().expect("a"),
        "fd00::2".parse().expect("a"),
        b"v6",
    );
    let mut frame = eth(PEER_OF_B_MAC, POD_B_MAC, EtherType::IPV6, &ip6);
    match dp.from_pod(Instant::now(), PortId(1), &mut frame, &mut out) {
        Action::ToPod { port, packet } => {
            assert_eq!(port, PortId(0));
            assert_eq!(&packet[..6], &POD_A_MAC.0);
            assert_eq!(&packet[12..14], &[0x86, 0xdd]);
            assert_eq!(&packet[14..], &ip6[..]);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn tap_answers_arp_for_the_peer_and_ignores_the_rest() {
    let mut dp = tap_pair();
    let mut out = vec![0u8; out_len(1400)];
    let arp = |target: [u8; 4]| {
        eth(
            MacAddr::BROADCAST,
            POD_A_MAC,
            EtherType::ARP,
            &ArpEthIpv4Packet {
                operation: ArpOperation::REQUEST,
                sender_mac: POD_A_MAC.0,
                sender_ipv4: [10, 0, 0, 1],
                target_mac: [0; 6],
                target_ipv4: target,
            }
            .to_bytes(),
        )
    };
    let mut req = arp([10, 0, 0, 2]);
    match dp.from_pod(Instant::now(), PortId(0), &mut req, &mut out) {
        Action::ToPod { port, packet } => {
            assert_eq!(port, PortId(0));
            assert_eq!(&packet[..6], &POD_A_MAC.0);
            assert_eq!(&packet[6..12], &PEER_OF_A_MAC.0);
            // sender hardware / protocol address of the reply
            assert_eq!(&packet[22..28], &PEER_OF_A_MAC.0);
            assert_eq!(&packet[28..32], &[10, 0, 0, 2]);
        }
        other => panic!("unexpected {other:?}"),
    }
    let mut other = arp([10, 0, 0, 9]);
    assert!(matches!(
        dp.from_pod(Instant::now(), PortId(0), &mut other, &mut out),
        Action::Drop(DropReason::ArpIgnored)
    ));
    let mut lldp = eth(MacAddr::BROADCAST, POD_A_MAC, EtherType(0x88cc), &[0; 46]);
    assert!(matches!(
        dp.from_pod(Instant::now(), PortId(0), &mut lldp, &mut out),
        Action::Drop(DropReason::PayloadMismatch)
    ));
}

#[test]
fn tap_learns_the_pod_mac_when_not_configured() {
    let mut dp = Dataplane::new(DataplaneConfig::default());
    let learning = PortKind::Tap(TapConfig {
        peer_mac: PEER_OF_A_MAC,
        pod_mac: None,
    });
    dp.add_port(PortId(0), learning).expect("port");
    dp.add_port(
        PortId(1),
        PortKind::Tap(TapConfig {
            peer_mac: PEER_OF_B_MAC,
            pod_mac: Some(POD_B_MAC),
        }),
    )
    .expect("port");
    dp.upsert_xconnect(
        "l2",
        XconnSpec {
            payload: Payload::Ethernet,
            mtu: 1400,
            a: end(0, [10, 0, 0, 2]),
            b: FarEnd::Pod(end(1, [10, 0, 0, 1])),
        },
    )
    .expect("xconn");
    let mut out = vec![0u8; 2048];
    let to_a = v4([10, 0, 0, 2], [10, 0, 0, 1], b"x");
    let mut frame = eth(PEER_OF_B_MAC, POD_B_MAC, EtherType::IPV4, &to_a);
    match dp.from_pod(Instant::now(), PortId(1), &mut frame, &mut out) {
        Action::ToPod { packet, .. } => assert_eq!(&packet[..6], &MacAddr::BROADCAST.0),
        other => panic!("unexpected {other:?}"),
    }
    let from_a = v4([10, 0, 0, 1], [10, 0, 0, 2], b"x");
    let mut frame = eth(PEER_OF_A_MAC, POD_A_MAC, EtherType::IPV4, &from_a);
    let _ = dp.from_pod(Instant::now(), PortId(0), &mut frame, &mut out);
    let mut frame = eth(PEER_OF_B_MAC, POD_B_MAC, EtherType::IPV4, &to_a);
    match dp.from_pod(Instant::now(), PortId(1), &mut frame, &mut out) {
        Action::ToPod { packet, .. } => assert_eq!(&packet[..6], &POD_A_MAC.0),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn tap_oversized_gets_framed_icmp() {
    let mut dp = tap_pair();
    let mut out = vec![0u8; out_len(1400)];
    let ip = v6(
        "fd00::1".parse().expect("a"),
        "fd00::2".parse().expect("a"),
        &[1; 1500],
    );
    let mut frame = eth(PEER_OF_A_MAC, POD_A_MAC, EtherType::IPV6, &ip);
    match dp.from_pod(Instant::now(), PortId(0), &mut frame, &mut out) {
        Action::ToPod { port, packet } => {
            assert_eq!(port, PortId(0));
            assert_eq!(packet.len(), 14 + 1280);
            let p = etherparse::SlicedPacket::from_ethernet(packet).expect("parse");
            let Some(etherparse::TransportSlice::Icmpv6(icmp)) = p.transport else {
                panic!("no icmpv6")
            };
            assert_eq!(
                icmp.icmp_type(),
                etherparse::Icmpv6Type::PacketTooBig { mtu: 1400 }
            );
            assert_eq!(&packet[..6], &POD_A_MAC.0);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn config_errors() {
    let mut dp = tun_pair();
    let tap = PortKind::Tap(TapConfig {
        peer_mac: PEER_OF_A_MAC,
        pod_mac: None,
    });
    assert_eq!(
        dp.add_port(PortId(0), PortKind::Tun),
        Err(ConfigError::PortExists(PortId(0)))
    );
    assert_eq!(
        dp.add_port(PortId(1 << 20), PortKind::Tun),
        Err(ConfigError::PortOutOfRange(PortId(1 << 20), 4096))
    );
    dp.add_port(PortId(2), PortKind::Tun).expect("port 2");
    dp.add_port(PortId(3), tap).expect("port 3");
    let spec = |a: u32, b: u32, mtu: u16, payload: Payload| XconnSpec {
        payload,
        mtu,
        a: PodEnd::new(PortId(a)),
        b: FarEnd::Pod(PodEnd::new(PortId(b))),
    };
    let err = |r: Result<XconnCounters, XconnError>| r.map(|_| ()).map_err(|e| e.source);
    assert_eq!(
        err(dp.upsert_xconnect("x", spec(2, 9, 1400, Payload::Ip))),
        Err(ConfigError::UnknownPort(PortId(9)))
    );
    assert_eq!(
        err(dp.upsert_xconnect("x", spec(2, 2, 1400, Payload::Ip))),
        Err(ConfigError::SamePort(PortId(2)))
    );
    assert_eq!(
        err(dp.upsert_xconnect("x", spec(2, 0, 1400, Payload::Ip))),
        Err(ConfigError::PortInUse {
            port: PortId(0),
            by: "local".into()
        })
    );
    assert_eq!(
        err(dp.upsert_xconnect("x", spec(2, 3, 1400, Payload::Ip))),
        Err(ConfigError::PayloadMismatch {
            port: PortId(3),
            kind: "TAP",
            payload: Payload::Ip
        })
    );
    assert_eq!(
        err(dp.upsert_xconnect("x", spec(2, 3, 100, Payload::Ip))),
        Err(ConfigError::InvalidMtu(100))
    );
    assert_eq!(
        dp.remove_port(PortId(0)),
        Err(ConfigError::PortAttached {
            port: PortId(0),
            by: "local".into()
        })
    );
    let e = dp
        .upsert_xconnect("x", spec(2, 9, 1400, Payload::Ip))
        .map(|_| ())
        .expect_err("unknown port");
    assert_eq!(e.to_string(), "cross-connect x: port#9 is not registered");
    // Nothing was half-programmed by the failures.
    assert!(dp.counters("x").is_none());
    dp.upsert_xconnect("x", spec(2, 3, 1400, Payload::Ip))
        .map(|_| ())
        .expect_err("still a mismatch");
}

#[test]
fn update_moves_ports_and_keeps_counters() {
    let mut dp = tun_pair();
    dp.add_port(PortId(2), PortKind::Tun).expect("port 2");
    let before = dp.counters("local").expect("counters");
    let mut out = vec![0u8; 2048];
    let mut buf = v4([10, 0, 0, 1], [10, 0, 0, 2], b"x");
    let _ = dp.from_pod(Instant::now(), PortId(0), &mut buf, &mut out);
    let after = dp
        .upsert_xconnect(
            "local",
            XconnSpec {
                payload: Payload::Ip,
                mtu: 1400,
                a: end(0, [10, 0, 0, 2]),
                b: FarEnd::Pod(end(2, [10, 0, 0, 1])),
            },
        )
        .expect("update");
    assert_eq!(after.snapshot(), before.snapshot());
    match dp.from_pod(Instant::now(), PortId(0), &mut buf, &mut out) {
        Action::ToPod { port, .. } => assert_eq!(port, PortId(2)),
        other => panic!("unexpected {other:?}"),
    }
    // Port 1 is no longer attached.
    assert!(matches!(
        dp.from_pod(Instant::now(), PortId(1), &mut buf, &mut out),
        Action::Drop(DropReason::NoCrossConnect)
    ));
}

#[test]
fn short_out_buffer_is_a_counted_drop_not_a_panic() {
    let mut dp = tap_pair();
    let ip = v4([10, 0, 0, 1], [10, 0, 0, 2], &[0; 1500]);
    let mut frame = eth(PEER_OF_A_MAC, POD_A_MAC, EtherType::IPV4, &ip);
    let mut out = [0u8; 16];
    assert!(matches!(
        dp.from_pod(Instant::now(), PortId(0), &mut frame, &mut out),
        Action::Drop(DropReason::BufferTooSmall)
    ));
    let mut out: [u8; 0] = [];
    let _ = dp.poll_timers(Instant::now(), &mut out);
    let _ = dp.poll_flush(Instant::now(), &mut out);
}

#[test]
fn out_len_covers_every_reply() {
    assert_eq!(out_len(1420), 1420 + 32 + 14);
    assert_eq!(out_len(576), 14 + 1280);
    assert_eq!(out_len(9000), 9046);
}

#[test]
fn dataplane_moves_to_a_worker_and_counters_are_shared() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<Dataplane>();
    send::<Chain>();
    send_sync::<XconnCounters>();
    send_sync::<GlobalCounters>();
    send_sync::<crate::stages::CounterHandle>();
}
