//! Per-packet cost of the data plane's three hot paths, at 64, 1420 and
//! 9000-byte IP packets:
//! - `encapsulate`: `from_pod` on a TUN whose cross-connect is a WireGuard
//!   session (classify, MTU check, empty chain, ChaCha20-Poly1305 seal);
//! - `decapsulate`: `from_underlay` of a data message (dispatch by receiver
//!   index, replay window, open, classify, deliver);
//! - `same_node`: `from_pod` between two TUNs on one node (zero copy);
//! - `copy`: a bare copy of the packet into the output buffer, the copy
//!   boringtun makes before sealing (and before opening) in place: what a
//!   zero-copy seal could save at most.
//!
//! Throughput is in bytes of IP packet. The two data planes are wired
//! together in memory; a handshake is done once during setup.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use nsm_dataplane::{
    Action, Dataplane, DataplaneConfig, FarEnd, Payload, PodEnd, PortId, PortKind, PublicKey,
    StaticSecret, WgPeer, XconnSpec, out_len,
};

const SIZES: [usize; 3] = [64, 1420, 9000];
const MTU: u16 = 9000;

struct Nodes {
    a: Dataplane,
    b: Dataplane,
    addr_a: SocketAddr,
    now: Instant,
}

fn packet(len: usize) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(40000, 5201);
    let mut v = Vec::with_capacity(len);
    b.write(&mut v, &vec![0xa5; len - 28])
        .expect("build packet");
    v
}

fn nodes() -> Nodes {
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
                mtu: MTU,
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
            mtu: MTU,
            a: PodEnd::new(PortId(1)),
            b: FarEnd::Pod(PodEnd::new(PortId(2))),
        },
    )
    .expect("xconn");

    let now = Instant::now();
    let mut out_a = vec![0u8; out_len(MTU)];
    let mut out_b = vec![0u8; out_len(MTU)];
    let Action::ToUnderlay { datagram, .. } = a.initiate_handshake("wg", &mut out_a) else {
        panic!("no initiation")
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
    let _ = b.from_underlay(now, addr_a, &keepalive, &mut out_b);
    Nodes { a, b, addr_a, now }
}

fn pipeline(c: &mut Criterion) {
    let Nodes {
        mut a,
        mut b,
        addr_a,
        now,
    } = nodes();
    let mut out = vec![0u8; out_len(MTU)];
    let mut group = c.benchmark_group("pipeline");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let pkt = packet(size);

        let mut buf = pkt.clone();
        group.bench_function(format!("encapsulate/{size}"), |bench| {
            bench.iter(|| {
                match a.from_pod(now, PortId(0), black_box(&mut buf), &mut out) {
                    Action::ToUnderlay { datagram, .. } => black_box(datagram.len()),
                    other => panic!("unexpected {other:?}"),
                };
            })
        });

        // Fresh datagrams (the replay window rejects repeats), sealed
        // outside the timed routine, opened in order inside it.
        group.bench_function(format!("decapsulate/{size}"), |bench| {
            bench.iter_batched_ref(
                || {
                    let mut seal_buf = pkt.clone();
                    let mut sealed = vec![0u8; out_len(MTU)];
                    match a.from_pod(now, PortId(0), &mut seal_buf, &mut sealed) {
                        Action::ToUnderlay { datagram, .. } => datagram.to_vec(),
                        other => panic!("unexpected {other:?}"),
                    }
                },
                |datagram| {
                    match b.from_underlay(now, addr_a, black_box(datagram), &mut out) {
                        Action::ToPod { packet, .. } => black_box(packet.len()),
                        other => panic!("unexpected {other:?}"),
                    };
                },
                BatchSize::SmallInput,
            )
        });

        group.bench_function(format!("copy/{size}"), |bench| {
            bench.iter(|| {
                let src = black_box(&pkt[..]);
                out[16..16 + src.len()].copy_from_slice(src);
                black_box(&out);
            })
        });

        let mut buf = pkt.clone();
        group.bench_function(format!("same_node/{size}"), |bench| {
            bench.iter(|| {
                match a.from_pod(now, PortId(1), black_box(&mut buf), &mut out) {
                    Action::ToPod { packet, .. } => black_box(packet.len()),
                    other => panic!("unexpected {other:?}"),
                };
            })
        });
    }
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
