//! Proves the "no allocation per packet" rule: a counting global allocator
//! watches the steady-state data path (same-node forwarding, encryption,
//! decryption, ICMP replies, drops) and must see zero allocations.
//!
//! The counting allocator is `tests/common`; it counts per thread, inside
//! `count` only.

use std::net::SocketAddr;
use std::time::Instant;

use etherparse::PacketBuilder;
use nsm_dataplane::{
    Action, Dataplane, DataplaneConfig, FarEnd, Payload, PodEnd, PortId, PortKind, PublicKey,
    StaticSecret, WgPeer, XconnSpec, out_len,
};

mod common;
use common::count;

fn udp4(src: [u8; 4], dst: [u8; 4], len: usize) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64).udp(1, 2);
    let mut v = Vec::new();
    b.write(&mut v, &vec![0x5a; len - 28]).expect("write");
    v
}

#[test]
fn steady_state_data_path_never_allocates() {
    let addr_a: SocketAddr = "192.0.2.1:51820".parse().expect("addr");
    let addr_b: SocketAddr = "192.0.2.2:51820".parse().expect("addr");
    let ka = StaticSecret::from([1u8; 32]);
    let kb = StaticSecret::from([2u8; 32]);
    let mut a = Dataplane::new(DataplaneConfig::default());
    let mut b = Dataplane::new(DataplaneConfig::default());
    for (dp, local, peer, endpoint) in [(&mut a, &ka, &kb, addr_b), (&mut b, &kb, &ka, addr_a)] {
        dp.add_port(PortId(0), PortKind::Tun).expect("port");
        dp.upsert_xconnect(
            "wg",
            XconnSpec {
                payload: Payload::Ip,
                mtu: 1420,
                a: PodEnd::new(PortId(0)),
                b: FarEnd::Wireguard(WgPeer {
                    local_private: local.clone(),
                    peer_public: PublicKey::from(peer),
                    preshared_key: None,
                    endpoint,
                    persistent_keepalive: None,
                }),
            },
        )
        .expect("xconn");
    }
    a.add_port(PortId(1), PortKind::Tun).expect("port");
    a.add_port(PortId(2), PortKind::Tun).expect("port");
    a.upsert_xconnect(
        "local",
        XconnSpec {
            payload: Payload::Ip,
            mtu: 1420,
            a: PodEnd::new(PortId(1)),
            b: FarEnd::Pod(PodEnd::new(PortId(2))),
        },
    )
    .expect("xconn");

    let mut out_a = vec![0u8; out_len(1420)];
    let mut out_b = vec![0u8; out_len(1420)];
    let now = Instant::now();

    // Handshake (allowed to allocate: it is not the steady state).
    let Action::ToUnderlay { datagram, .. } = a.initiate_handshake("wg", &mut out_a) else {
        panic!("no init")
    };
    let init = datagram.to_vec();
    let Action::ToUnderlay { datagram, .. } = b.from_underlay(now, addr_a, &init, &mut out_b)
    else {
        panic!("no response")
    };
    let resp = datagram.to_vec();
    let Action::ToUnderlay { datagram, .. } = a.from_underlay(now, addr_b, &resp, &mut out_a)
    else {
        panic!("no keepalive")
    };
    let keepalive = datagram.to_vec();
    while !matches!(a.poll_flush(now, &mut out_a), Action::Done) {}
    assert!(matches!(
        b.from_underlay(now, addr_a, &keepalive, &mut out_b),
        Action::Done
    ));

    let packet = udp4([10, 0, 0, 1], [10, 0, 0, 2], 1400);
    let big = udp4([10, 0, 0, 1], [10, 0, 0, 2], 1500);
    let mut buf = packet.clone();
    let mut wire = vec![0u8; 2048];
    // Warm up once (lazy statics, first-use paths), then count.
    for round in 0..2 {
        let ((), n) = count(|| {
            for _ in 0..100 {
                buf.copy_from_slice(&packet);
                let len = match a.from_pod(now, PortId(0), &mut buf, &mut out_a) {
                    Action::ToUnderlay { datagram, .. } => {
                        wire[..datagram.len()].copy_from_slice(datagram);
                        datagram.len()
                    }
                    other => panic!("{other:?}"),
                };
                assert!(matches!(
                    b.from_underlay(now, addr_a, &wire[..len], &mut out_b),
                    Action::ToPod { .. }
                ));
                while !matches!(b.poll_flush(now, &mut out_b), Action::Done) {}
                // Replay, garbage, unknown port: drops allocate nothing either.
                assert!(matches!(
                    b.from_underlay(now, addr_a, &wire[..len], &mut out_b),
                    Action::Drop(_)
                ));
                assert!(matches!(
                    b.from_underlay(now, addr_a, &[9u8; 40], &mut out_b),
                    Action::Drop(_)
                ));
                buf.copy_from_slice(&packet);
                assert!(matches!(
                    a.from_pod(now, PortId(1), &mut buf, &mut out_a),
                    Action::ToPod { .. }
                ));
                assert!(matches!(
                    a.from_pod(now, PortId(9), &mut buf, &mut out_a),
                    Action::Drop(_)
                ));
            }
        });
        if round == 1 {
            assert_eq!(n, 0, "allocations on the data path");
        }
    }
    // The ICMP path, counted separately (it needs its own buffer).
    let mut big_buf = big.clone();
    let (_, n) = count(|| {
        for _ in 0..10 {
            assert!(matches!(
                a.from_pod(now, PortId(0), &mut big_buf, &mut out_a),
                Action::ToPod { .. }
            ));
        }
    });
    assert_eq!(n, 0, "allocations building ICMP replies");
}

/// The counter itself sees allocations, so a zero above means something.
#[test]
fn the_counter_counts() {
    let (b, n) = count(|| std::hint::black_box(Box::new([0u8; 64])));
    drop(b);
    assert_eq!(n, 1);
}
