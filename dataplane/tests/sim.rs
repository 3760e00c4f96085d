//! Two data planes (node A and node B) wired together through an in-memory
//! underlay, quinn `Pair` style: every datagram one node emits is queued and
//! handed to the other's `from_underlay`, and the test inspects what crossed
//! the wire and what reached each pod port.
//!
//! Time: the data planes get a virtual `now`; boringtun's own handshake
//! timers read the real clock, so nothing here waits on them.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use etherparse::{
    ArpEthIpv4Packet, ArpOperation, EtherType, Ethernet2Header, Icmpv4Slice, Icmpv4Type,
    Icmpv6Header, Icmpv6Slice, Icmpv6Type, IpNumber, Ipv4Slice, Ipv6Header, Ipv6Slice,
    PacketBuilder,
};
use nsm_dataplane::{
    Action, Dataplane, DataplaneConfig, DropReason, FarEnd, MacAddr, Payload, PodEnd, PortId,
    PortKind, PublicKey, StaticSecret, TapConfig, WgPeer, XconnSpec, out_len,
};
use rand::{Rng, SeedableRng};

const MTU: u16 = 1420;

/// What one call produced, owned so the test can look at it later.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Out {
    Pod(PortId, Vec<u8>),
    Wire(SocketAddr, Vec<u8>),
    Drop(DropReason),
    Done,
}

impl Out {
    fn of(a: Action<'_>) -> Self {
        match a {
            Action::ToPod { port, packet } => Out::Pod(port, packet.to_vec()),
            Action::ToUnderlay { dst, datagram } => Out::Wire(dst, datagram.to_vec()),
            Action::Drop(r) => Out::Drop(r),
            Action::Done => Out::Done,
        }
    }
}

struct Node {
    dp: Dataplane,
    addr: SocketAddr,
    /// Packets written to each pod port, in order.
    delivered: HashMap<PortId, Vec<Vec<u8>>>,
    out: Vec<u8>,
}

impl Node {
    fn new(addr: SocketAddr) -> Self {
        Node {
            dp: Dataplane::new(DataplaneConfig::default()),
            addr,
            delivered: HashMap::new(),
            out: vec![0u8; out_len(9000)],
        }
    }

    fn take(&mut self, port: u32) -> Vec<Vec<u8>> {
        self.delivered.remove(&PortId(port)).unwrap_or_default()
    }
}

/// Node A, node B and the wire between them.
struct Pair {
    nodes: [Node; 2],
    /// (sender index, destination, datagram)
    wire: VecDeque<(usize, SocketAddr, Vec<u8>)>,
    /// Every datagram that ever crossed the wire.
    seen: Vec<Vec<u8>>,
    now: Instant,
    /// Drop everything put on the wire (a partitioned underlay).
    cut: bool,
}

impl Pair {
    fn new() -> Self {
        Pair {
            nodes: [
                Node::new("192.0.2.1:51820".parse().expect("addr")),
                Node::new("192.0.2.2:51820".parse().expect("addr")),
            ],
            wire: VecDeque::new(),
            seen: Vec::new(),
            now: Instant::now(),
            cut: false,
        }
    }

    fn route(&mut self, from: usize, out: Out) -> Out {
        match &out {
            Out::Wire(dst, d) => {
                self.seen.push(d.clone());
                if !self.cut {
                    self.wire.push_back((from, *dst, d.clone()));
                }
            }
            Out::Pod(port, p) => self.nodes[from]
                .delivered
                .entry(*port)
                .or_default()
                .push(p.clone()),
            _ => {}
        }
        out
    }

    /// A pod on `node` writes `packet` to its port.
    fn pod_send(&mut self, node: usize, port: u32, packet: &[u8]) -> Out {
        let now = self.now;
        let n = &mut self.nodes[node];
        let mut buf = packet.to_vec();
        let out = Out::of(n.dp.from_pod(now, PortId(port), &mut buf, &mut n.out));
        self.route(node, out)
    }

    /// Feeds a datagram to `node` as if it came from `src`.
    fn underlay_recv(&mut self, node: usize, src: SocketAddr, datagram: &[u8]) -> Out {
        let now = self.now;
        let n = &mut self.nodes[node];
        let out = Out::of(n.dp.from_underlay(now, src, datagram, &mut n.out));
        let out = self.route(node, out);
        self.flush(node);
        out
    }

    fn flush(&mut self, node: usize) {
        for _ in 0..10_000 {
            let now = self.now;
            let n = &mut self.nodes[node];
            let out = Out::of(n.dp.poll_flush(now, &mut n.out));
            if out == Out::Done {
                return;
            }
            self.route(node, out);
        }
        panic!("flush never finished");
    }

    /// Delivers datagrams until the wire is quiet; returns how many.
    fn drive(&mut self) -> usize {
        let mut n = 0;
        while let Some((from, dst, d)) = self.wire.pop_front() {
            n += 1;
            assert!(n < 100_000, "the wire never went quiet");
            let to = self
                .nodes
                .iter()
                .position(|node| node.addr == dst)
                .expect("datagram to an unknown node");
            let src = self.nodes[from].addr;
            self.underlay_recv(to, src, &d);
        }
        n
    }

    fn tick(&mut self, node: usize) -> Vec<Out> {
        self.now += Duration::from_millis(250);
        let now = self.now;
        let mut outs = Vec::new();
        loop {
            let n = &mut self.nodes[node];
            let out = Out::of(n.dp.poll_timers(now, &mut n.out));
            if out == Out::Done {
                return outs;
            }
            outs.push(self.route(node, out));
        }
    }
}

fn key(node: u8, conn: u16) -> StaticSecret {
    let mut k = [0u8; 32];
    k[0] = node;
    k[1..3].copy_from_slice(&conn.to_le_bytes());
    k[3] = 0x5a;
    StaticSecret::from(k)
}

/// Programs connection `i` on both nodes: A's port i <-> WireGuard <->
/// B's port i, with keys of its own, pod addresses `a_ip`/`b_ip`.
fn program(
    pair: &mut Pair,
    i: u16,
    a_ip: (Ipv4Addr, Ipv6Addr),
    b_ip: (Ipv4Addr, Ipv6Addr),
    kind: PortKind,
) {
    let port = PortId(u32::from(i));
    let [a, b] = &mut pair.nodes;
    let (a_addr, b_addr) = (a.addr, b.addr);
    let payload = match kind {
        PortKind::Tun => Payload::Ip,
        PortKind::Tap(_) => Payload::Ethernet,
    };
    for (node, me, peer_node, peer_ip, other_addr) in
        [(a, 0u8, 1u8, b_ip, b_addr), (b, 1u8, 0u8, a_ip, a_addr)]
    {
        node.dp.add_port(port, kind).expect("port");
        node.dp
            .upsert_xconnect(
                &format!("conn-{i}"),
                XconnSpec {
                    payload,
                    mtu: MTU,
                    a: PodEnd {
                        port,
                        peer_ipv4: Some(peer_ip.0),
                        peer_ipv6: Some(peer_ip.1),
                    },
                    b: FarEnd::Wireguard(WgPeer {
                        local_private: key(me, i),
                        peer_public: PublicKey::from(&key(peer_node, i)),
                        preshared_key: None,
                        endpoint: other_addr,
                        persistent_keepalive: None,
                    }),
                },
            )
            .expect("xconn");
    }
}

fn addrs(i: u16) -> ((Ipv4Addr, Ipv6Addr), (Ipv4Addr, Ipv6Addr)) {
    let [hi, lo] = i.to_be_bytes();
    (
        (
            Ipv4Addr::new(10, hi, lo, 1),
            Ipv6Addr::new(0xfd00, 0, 0, i, 0, 0, 0, 1),
        ),
        (
            Ipv4Addr::new(10, hi, lo, 2),
            Ipv6Addr::new(0xfd00, 0, 0, i, 0, 0, 0, 2),
        ),
    )
}

fn udp4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(40000, 7);
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("write");
    v
}

fn udp6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ipv6(src.octets(), dst.octets(), 64).udp(40000, 7);
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("write");
    v
}

/// One connection, handshake done by A's first packet.
fn established_pair() -> Pair {
    let mut pair = Pair::new();
    let (a, b) = addrs(0);
    program(&mut pair, 0, a, b, PortKind::Tun);
    let first = udp4(a.0, b.0, b"first");
    pair.pod_send(0, 0, &first);
    pair.drive();
    assert_eq!(pair.nodes[1].take(0), vec![first]);
    pair
}

/// Checks that every datagram is a well-formed WireGuard message.
fn assert_only_wireguard(seen: &[Vec<u8>]) {
    for d in seen {
        let ty = u32::from_le_bytes(d[..4].try_into().expect("4"));
        let ok = match ty {
            1 => d.len() == 148,
            2 => d.len() == 92,
            3 => d.len() == 64,
            4 => d.len() >= 32,
            _ => false,
        };
        assert!(ok, "not a WireGuard message: type {ty}, {} bytes", d.len());
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn handshake_completes_and_packets_cross_both_ways() {
    let mut pair = Pair::new();
    let (a, b) = addrs(0);
    program(&mut pair, 0, a, b, PortKind::Tun);

    // The first packet waits for the handshake, then arrives intact.
    let first = udp4(a.0, b.0, b"PLAINTEXT-MARKER-first");
    assert!(matches!(pair.pod_send(0, 0, &first), Out::Wire(_, d) if d[0] == 1));
    pair.drive();
    assert_eq!(pair.nodes[1].take(0), vec![first]);

    for node in 0..2 {
        let st = pair.nodes[node]
            .dp
            .status("conn-0", pair.now)
            .expect("status");
        let wg = st.wireguard.expect("wireguard");
        assert!(wg.established, "node {node} has keys");
        assert!(wg.last_handshake.is_some());
        assert_eq!(wg.queued, 0);
    }

    let packets = [
        (0, udp4(a.0, b.0, b"PLAINTEXT-MARKER-a4")),
        (1, udp4(b.0, a.0, b"PLAINTEXT-MARKER-b4")),
        (0, udp6(a.1, b.1, b"PLAINTEXT-MARKER-a6")),
        (1, udp6(b.1, a.1, b"PLAINTEXT-MARKER-b6")),
    ];
    for (from, p) in &packets {
        match pair.pod_send(*from, 0, p) {
            Out::Wire(dst, d) => {
                assert_eq!(dst, pair.nodes[1 - from].addr);
                assert_eq!(d[0], 4, "data message");
                assert_eq!(d.len(), p.len() + 32);
            }
            other => panic!("unexpected {other:?}"),
        }
        pair.drive();
        assert_eq!(pair.nodes[1 - from].take(0), vec![p.clone()]);
    }

    assert_only_wireguard(&pair.seen);
    for d in &pair.seen {
        assert!(!contains(d, b"PLAINTEXT-MARKER"), "plaintext on the wire");
    }
    let s = pair.nodes[0].dp.counters("conn-0").expect("c").snapshot();
    assert_eq!(s.wg.handshake_initiations_tx, 1);
    assert_eq!(s.wg.packets_queued, 1);
    assert_eq!(s.a.rx_packets, 3);
    assert_eq!(s.a.tx_packets, 2);
    assert_eq!(s.drops.total(), 0);
    let s = pair.nodes[1].dp.counters("conn-0").expect("c").snapshot();
    assert_eq!(s.wg.handshake_responses_tx, 1);
    assert_eq!(s.drops.total(), 0);
}

#[test]
fn explicit_handshake_before_any_packet() {
    let mut pair = Pair::new();
    let (a, b) = addrs(0);
    program(&mut pair, 0, a, b, PortKind::Tun);
    let n = &mut pair.nodes[0];
    let out = Out::of(n.dp.initiate_handshake("conn-0", &mut n.out));
    let out = pair.route(0, out);
    assert!(matches!(out, Out::Wire(_, ref d) if d[0] == 1));
    pair.drive();
    let wg = |pair: &Pair, node: usize| {
        pair.nodes[node]
            .dp
            .status("conn-0", pair.now)
            .and_then(|s| s.wireguard)
            .expect("wg")
    };
    assert!(wg(&pair, 0).established);
    assert!(wg(&pair, 1).established);
    // No timer is due right after a handshake.
    assert!(pair.tick(0).is_empty());
    assert!(pair.tick(1).is_empty());
    // Data flows without any queueing.
    let p = udp4(b.0, a.0, b"from b");
    assert!(matches!(pair.pod_send(1, 0, &p), Out::Wire(_, ref d) if d[0] == 4));
    pair.drive();
    assert_eq!(pair.nodes[0].take(0), vec![p]);
}

#[test]
fn hundred_connections_with_overlapping_addresses_stay_apart() {
    let mut pair = Pair::new();
    const N: u16 = 100;
    // Connections 7 and 8 use the very same pod addresses on both sides.
    let same = addrs(7);
    let conn_addrs = |i: u16| if i == 8 { same } else { addrs(i) };
    for i in 0..N {
        let (a, b) = conn_addrs(i);
        program(&mut pair, i, a, b, PortKind::Tun);
    }
    for round in 0..3 {
        for i in 0..N {
            let (a, b) = conn_addrs(i);
            let payload = format!("PLAINTEXT-MARKER conn {i} round {round} a->b");
            pair.pod_send(0, u32::from(i), &udp4(a.0, b.0, payload.as_bytes()));
            let payload = format!("PLAINTEXT-MARKER conn {i} round {round} b->a");
            pair.pod_send(1, u32::from(i), &udp6(b.1, a.1, payload.as_bytes()));
        }
        pair.drive();
        for i in 0..N {
            for (node, dir) in [(1usize, "a->b"), (0, "b->a")] {
                let got = pair.nodes[node].take(u32::from(i));
                let want = format!("conn {i} round {round} {dir}");
                assert_eq!(got.len(), 1, "conn {i} round {round} node {node}: {got:?}");
                assert!(
                    contains(&got[0], want.as_bytes()),
                    "conn {i}: delivered someone else's packet"
                );
            }
        }
        assert!(pair.nodes.iter().all(|n| n.delivered.is_empty()));
    }
    assert_only_wireguard(&pair.seen);
    assert!(pair.seen.iter().all(|d| !contains(d, b"PLAINTEXT-MARKER")));
    for node in &pair.nodes {
        assert_eq!(node.dp.global_counters().snapshot().total(), 0);
        for i in 0..N {
            let s = node
                .dp
                .counters(&format!("conn-{i}"))
                .expect("c")
                .snapshot();
            assert_eq!(
                s.drops.total(),
                0,
                "conn {i}: {:?}",
                s.drops.nonzero().collect::<Vec<_>>()
            );
        }
    }
}

#[test]
fn removing_a_cross_connect_drops_its_traffic() {
    let mut pair = established_pair();
    let (a, b) = addrs(0);
    let p = udp4(a.0, b.0, b"after removal");

    pair.nodes[1].dp.remove_xconnect("conn-0").expect("remove");
    let Out::Wire(_, d) = pair.pod_send(0, 0, &p) else {
        panic!("A still sends")
    };
    pair.wire.clear();
    assert_eq!(
        pair.underlay_recv(1, pair.nodes[0].addr, &d),
        Out::Drop(DropReason::WgUnknownReceiverIndex)
    );
    // B's pod port is still there, unattached.
    assert_eq!(
        pair.pod_send(1, 0, &udp4(b.0, a.0, b"x")),
        Out::Drop(DropReason::NoCrossConnect)
    );
    pair.nodes[0].dp.remove_xconnect("conn-0").expect("remove");
    assert_eq!(
        pair.pod_send(0, 0, &p),
        Out::Drop(DropReason::NoCrossConnect)
    );
    let g = pair.nodes[1].dp.global_counters().snapshot();
    assert_eq!(g.get(DropReason::WgUnknownReceiverIndex), 1);
    assert_eq!(g.get(DropReason::NoCrossConnect), 1);

    // Re-programming the slot gives a new generation: the old index stays dead.
    let (a2, b2) = addrs(1);
    program_one_side(&mut pair, 1, 0, a2, b2);
    assert_eq!(
        pair.underlay_recv(1, pair.nodes[0].addr, &d),
        Out::Drop(DropReason::WgUnknownReceiverIndex)
    );
}

/// Programs only `node`'s half of connection `i` (port i must be new there).
fn program_one_side(
    pair: &mut Pair,
    node: usize,
    i: u16,
    a_ip: (Ipv4Addr, Ipv6Addr),
    b_ip: (Ipv4Addr, Ipv6Addr),
) {
    let other = pair.nodes[1 - node].addr;
    let n = &mut pair.nodes[node];
    let port = PortId(u32::from(i) + 1000);
    n.dp.add_port(port, PortKind::Tun).expect("port");
    let peer_ip = if node == 0 { b_ip } else { a_ip };
    n.dp.upsert_xconnect(
        &format!("conn-{i}"),
        XconnSpec {
            payload: Payload::Ip,
            mtu: MTU,
            a: PodEnd {
                port,
                peer_ipv4: Some(peer_ip.0),
                peer_ipv6: Some(peer_ip.1),
            },
            b: FarEnd::Wireguard(WgPeer {
                local_private: key(u8::try_from(node).expect("small") + 10, i),
                peer_public: PublicKey::from(&key(99, i)),
                preshared_key: None,
                endpoint: other,
                persistent_keepalive: None,
            }),
        },
    )
    .expect("xconn");
}

#[test]
fn malformed_underlay_input_is_dropped_and_counted() {
    let mut pair = established_pair();
    let (a, b) = addrs(0);
    let from = pair.nodes[0].addr;

    // Real data messages: one delivered (then replayed), one never
    // delivered (then corrupted, so that only its tag is wrong).
    let Out::Wire(_, data) = pair.pod_send(0, 0, &udp4(a.0, b.0, b"genuine")) else {
        panic!("no data")
    };
    let Out::Wire(_, fresh) = pair.pod_send(0, 0, &udp4(a.0, b.0, b"fresh")) else {
        panic!("no data")
    };
    pair.wire.clear();
    assert!(matches!(pair.underlay_recv(1, from, &data), Out::Pod(..)));
    pair.nodes[1].take(0);

    let mut cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
        ("empty", vec![], DropReason::WgBadMessage),
        (
            "truncated header",
            data[..3].to_vec(),
            DropReason::WgBadMessage,
        ),
        (
            "truncated data",
            data[..31].to_vec(),
            DropReason::WgBadMessage,
        ),
        (
            "type 0",
            {
                let mut d = data.clone();
                d[0] = 0;
                d
            },
            DropReason::WgBadMessage,
        ),
        (
            "type 5",
            {
                let mut d = data.clone();
                d[0] = 5;
                d
            },
            DropReason::WgBadMessage,
        ),
        (
            "reserved set",
            {
                let mut d = data.clone();
                d[2] = 1;
                d
            },
            DropReason::WgBadMessage,
        ),
        (
            "initiation of wrong size",
            {
                let mut d = vec![1, 0, 0, 0];
                d.resize(147, 0);
                d
            },
            DropReason::WgBadMessage,
        ),
        (
            "garbage initiation",
            {
                let mut d = vec![1, 0, 0, 0];
                d.resize(148, 0x42);
                d
            },
            DropReason::WgNoSessionForInitiation,
        ),
        (
            "wrong receiver index",
            {
                let mut d = data.clone();
                d[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
                d
            },
            DropReason::WgUnknownReceiverIndex,
        ),
        (
            "response to nobody",
            {
                let mut d = vec![2, 0, 0, 0];
                d.resize(92, 0);
                d[8..12].copy_from_slice(&0x0100_0000u32.to_le_bytes());
                d
            },
            DropReason::WgUnknownReceiverIndex,
        ),
        (
            "corrupted ciphertext",
            {
                let mut d = fresh.clone();
                let last = d.len() - 1;
                d[last] ^= 1;
                d
            },
            DropReason::WgDecryptFailed,
        ),
        ("replay", data.clone(), DropReason::WgReplay),
        (
            "text",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            DropReason::WgBadMessage,
        ),
    ];
    // A response with the right receiver index but no handshake in flight.
    let rx_index = u32::from_le_bytes(data[4..8].try_into().expect("4"));
    let mut stray = vec![2, 0, 0, 0, 9, 9, 9, 9];
    stray.extend_from_slice(&rx_index.to_le_bytes());
    stray.resize(92, 0x11);
    cases.push(("stray response", stray, DropReason::WgBadMac));

    for (name, d, reason) in cases {
        assert_eq!(pair.underlay_recv(1, from, &d), Out::Drop(reason), "{name}");
    }
    let g = pair.nodes[1].dp.global_counters().snapshot();
    let c = pair.nodes[1].dp.counters("conn-0").expect("c").snapshot();
    assert_eq!(g.get(DropReason::WgBadMessage), 8);
    assert_eq!(g.get(DropReason::WgUnknownReceiverIndex), 2);
    assert_eq!(g.get(DropReason::WgNoSessionForInitiation), 1);
    assert_eq!(c.drops.get(DropReason::WgDecryptFailed), 1);
    assert_eq!(c.drops.get(DropReason::WgReplay), 1);
    assert_eq!(c.drops.get(DropReason::WgBadMac), 1);

    // Random bytes, random sizes, random WireGuard-looking headers: never a
    // panic, never a delivery.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..5000 {
        let len = rng.random_range(0..200);
        let mut d: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if len >= 16 && rng.random_bool(0.7) {
            d[0] = rng.random_range(1..=4);
            d[1..4].fill(0);
            if rng.random_bool(0.5) {
                d[4..8].copy_from_slice(&rx_index.to_le_bytes());
            }
        }
        let out = pair.underlay_recv(1, from, &d);
        assert!(matches!(out, Out::Drop(_)), "{out:?}");
    }
    // The session still works afterwards.
    let p = udp4(a.0, b.0, b"still alive");
    pair.pod_send(0, 0, &p);
    pair.drive();
    assert_eq!(pair.nodes[1].take(0), vec![p]);
}

#[test]
fn malformed_inner_packets_from_the_pod_never_reach_the_wire() {
    let mut pair = established_pair();
    let seen_before = pair.seen.len();
    for (p, reason) in [
        (vec![], DropReason::TooShort),
        (vec![0x45; 10], DropReason::TooShort),
        (vec![0x15; 40], DropReason::BadIpVersion),
        (vec![0x41; 40], DropReason::MalformedHeader),
    ] {
        assert_eq!(pair.pod_send(0, 0, &p), Out::Drop(reason));
    }
    assert_eq!(pair.seen.len(), seen_before);
}

#[test]
fn oversized_packets_get_too_big_replies_from_the_peer() {
    let mut pair = established_pair();
    let (a, b) = addrs(0);
    let seen_before = pair.seen.len();

    let big4 = udp4(a.0, b.0, &[0x33; 1500]);
    let Out::Pod(port, reply) = pair.pod_send(0, 0, &big4) else {
        panic!("no ICMP reply")
    };
    assert_eq!(port, PortId(0));
    let ip = Ipv4Slice::from_slice(&reply).expect("ipv4");
    assert_eq!(ip.header().source_addr(), b.0, "from the peer");
    assert_eq!(ip.header().destination_addr(), a.0);
    assert_eq!(
        ip.header().to_header().calc_header_checksum(),
        ip.header().header_checksum()
    );
    let icmp = Icmpv4Slice::from_slice(ip.payload().payload).expect("icmp");
    assert_eq!(
        icmp.icmp_type(),
        Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: MTU }
        )
    );
    assert_eq!(
        etherparse::Icmpv4Header::with_checksum(icmp.icmp_type(), icmp.payload()).checksum,
        icmp.checksum()
    );

    let big6 = udp6(a.1, b.1, &[0x44; 1500]);
    let Out::Pod(_, reply) = pair.pod_send(0, 0, &big6) else {
        panic!("no ICMPv6 reply")
    };
    let ip = Ipv6Slice::from_slice(&reply).expect("ipv6");
    assert_eq!(ip.header().source_addr(), b.1);
    assert_eq!(ip.header().destination_addr(), a.1);
    let icmp = Icmpv6Slice::from_slice(ip.payload().payload).expect("icmpv6");
    assert_eq!(
        icmp.icmp_type(),
        Icmpv6Type::PacketTooBig {
            mtu: u32::from(MTU)
        }
    );
    assert!(icmp.is_checksum_valid(b.1.octets(), a.1.octets()));
    assert_eq!(&icmp.payload()[..48], &big6[..48], "quotes the packet");

    // Nothing went to the underlay; the largest allowed packet does.
    assert_eq!(pair.seen.len(), seen_before);
    let fits = udp4(a.0, b.0, &vec![0x55; usize::from(MTU) - 28]);
    assert!(matches!(pair.pod_send(0, 0, &fits), Out::Wire(..)));
    pair.drive();
    assert_eq!(pair.nodes[1].take(0), vec![fits]);
    let c = pair.nodes[0].dp.counters("conn-0").expect("c").snapshot();
    assert_eq!(c.drops.get(DropReason::PacketTooBig), 2);
}

const A_POD_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0xa, 1]);
const A_PEER_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0xa, 2]);

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

fn neighbor_solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let dst = [
        0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
    ];
    let mut payload = t.to_vec();
    payload.extend_from_slice(&[1, 1]);
    payload.extend_from_slice(&A_POD_MAC.0);
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
        hop_limit: 255,
        source: src.octets(),
        destination: dst,
    };
    let mut v = ip.to_bytes().to_vec();
    v.extend_from_slice(&icmp.to_bytes());
    v.extend_from_slice(&payload);
    eth(
        MacAddr([0x33, 0x33, 0xff, t[13], t[14], t[15]]),
        A_POD_MAC,
        EtherType::IPV6,
        &v,
    )
}

#[test]
fn tap_pods_across_nodes_with_proxy_arp_and_nd() {
    let mut pair = Pair::new();
    let (a, b) = addrs(0);
    // Node A: TAP whose pod MAC is learned; node B: configured.
    let [na, nb] = &mut pair.nodes;
    let (a_addr, b_addr) = (na.addr, nb.addr);
    let b_pod_mac = MacAddr([2, 0, 0, 0, 0xb, 1]);
    let b_peer_mac = MacAddr([2, 0, 0, 0, 0xb, 2]);
    for (node, me, other, pod_mac, peer_mac, peer_ip, other_addr) in [
        (na, 0u8, 1u8, None, A_PEER_MAC, b, b_addr),
        (nb, 1, 0, Some(b_pod_mac), b_peer_mac, a, a_addr),
    ] {
        node.dp
            .add_port(PortId(0), PortKind::Tap(TapConfig { peer_mac, pod_mac }))
            .expect("port");
        node.dp
            .upsert_xconnect(
                "l2",
                XconnSpec {
                    payload: Payload::Ethernet,
                    mtu: MTU,
                    a: PodEnd {
                        port: PortId(0),
                        peer_ipv4: Some(peer_ip.0),
                        peer_ipv6: Some(peer_ip.1),
                    },
                    b: FarEnd::Wireguard(WgPeer {
                        local_private: key(me, 0),
                        peer_public: PublicKey::from(&key(other, 0)),
                        preshared_key: None,
                        endpoint: other_addr,
                        persistent_keepalive: Some(25),
                    }),
                },
            )
            .expect("xconn");
    }

    // Pod A resolves its peer (B's address) over ARP...
    let arp = eth(
        MacAddr::BROADCAST,
        A_POD_MAC,
        EtherType::ARP,
        &ArpEthIpv4Packet {
            operation: ArpOperation::REQUEST,
            sender_mac: A_POD_MAC.0,
            sender_ipv4: a.0.octets(),
            target_mac: [0; 6],
            target_ipv4: b.0.octets(),
        }
        .to_bytes(),
    );
    let Out::Pod(PortId(0), reply) = pair.pod_send(0, 0, &arp) else {
        panic!("no ARP reply")
    };
    assert_eq!(&reply[..6], &A_POD_MAC.0);
    let arp_reply = etherparse::ArpPacketSlice::from_slice(&reply[14..])
        .expect("arp")
        .to_packet()
        .try_eth_ipv4()
        .expect("eth/ipv4");
    assert_eq!(arp_reply.operation, ArpOperation::REPLY);
    assert_eq!(arp_reply.sender_mac, A_PEER_MAC.0);
    assert_eq!(arp_reply.sender_ipv4, b.0.octets());

    // ...and over ND.
    let Out::Pod(PortId(0), na) = pair.pod_send(0, 0, &neighbor_solicitation(a.1, b.1)) else {
        panic!("no NA")
    };
    let p = etherparse::SlicedPacket::from_ethernet(&na).expect("parse");
    let Some(etherparse::TransportSlice::Icmpv6(icmp)) = p.transport else {
        panic!("no icmpv6")
    };
    assert!(matches!(
        icmp.icmp_type(),
        Icmpv6Type::NeighborAdvertisement(_)
    ));
    assert!(icmp.is_checksum_valid(b.1.octets(), a.1.octets()));
    assert_eq!(&icmp.payload()[..16], &b.1.octets());
    assert_eq!(&icmp.payload()[18..24], &A_PEER_MAC.0);
    // Neither crossed the wire.
    assert!(pair.seen.is_empty());
    pair.nodes[0].delivered.clear();

    // IP frames cross; B's pod gets them framed for it.
    for (from, ip) in [
        (0usize, udp4(a.0, b.0, b"PLAINTEXT-MARKER tap v4")),
        (0, udp6(a.1, b.1, b"PLAINTEXT-MARKER tap v6")),
        (1, udp4(b.0, a.0, b"PLAINTEXT-MARKER tap back")),
    ] {
        let (dst_mac, src_mac, to_pod, to_peer) = if from == 0 {
            (A_PEER_MAC, A_POD_MAC, b_pod_mac, b_peer_mac)
        } else {
            (b_peer_mac, b_pod_mac, A_POD_MAC, A_PEER_MAC)
        };
        let et = if ip[0] >> 4 == 4 {
            EtherType::IPV4
        } else {
            EtherType::IPV6
        };
        let mut frame = eth(dst_mac, src_mac, et, &ip);
        frame.resize(frame.len().max(60), 0);
        pair.pod_send(from, 0, &frame);
        pair.drive();
        let got = pair.nodes[1 - from].take(0);
        assert_eq!(got.len(), 1, "{got:02x?}");
        assert_eq!(&got[0][..6], &to_pod.0);
        assert_eq!(&got[0][6..12], &to_peer.0);
        assert_eq!(&got[0][12..14], &et.0.to_be_bytes());
        assert_eq!(&got[0][14..], &ip[..]);
    }
    assert_only_wireguard(&pair.seen);
    assert!(pair.seen.iter().all(|d| !contains(d, b"PLAINTEXT-MARKER")));
}

#[test]
fn queue_fills_while_the_peer_is_unreachable() {
    let mut pair = Pair::new();
    let (a, b) = addrs(0);
    program(&mut pair, 0, a, b, PortKind::Tun);
    pair.cut = true;
    let mut outs = Vec::new();
    for i in 0..300u16 {
        outs.push(pair.pod_send(0, 0, &udp4(a.0, b.0, &i.to_be_bytes())));
    }
    assert!(matches!(outs[0], Out::Wire(_, ref d) if d[0] == 1));
    assert!(outs[1..256].iter().all(|o| *o == Out::Done));
    assert!(
        outs[256..]
            .iter()
            .all(|o| *o == Out::Drop(DropReason::WgQueueFull))
    );
    let c = pair.nodes[0].dp.counters("conn-0").expect("c").snapshot();
    assert_eq!(c.wg.packets_queued, 256);
    assert_eq!(c.drops.get(DropReason::WgQueueFull), 44);

    // The link heals: the handshake completes (retried via the first
    // initiation here) and the 256 queued packets are flushed in order.
    pair.cut = false;
    let n = &mut pair.nodes[0];
    let out = Out::of(n.dp.initiate_handshake("conn-0", &mut n.out));
    // A handshake is already in progress: nothing new to send.
    assert_eq!(out, Out::Done);
    let init = pair.seen[0].clone();
    pair.underlay_recv(1, pair.nodes[0].addr, &init);
    pair.drive();
    let got = pair.nodes[1].take(0);
    assert_eq!(got.len(), 256);
    for (i, p) in got.iter().enumerate() {
        assert_eq!(&p[28..30], &u16::try_from(i).expect("small").to_be_bytes());
    }
    let wg = pair.nodes[0]
        .dp
        .status("conn-0", pair.now)
        .and_then(|s| s.wireguard)
        .expect("wg");
    assert_eq!(wg.queued, 0);
}

#[test]
fn roaming_peer_is_followed_and_found_by_mac1_scan() {
    let mut pair = Pair::new();
    let (a, b) = addrs(0);
    program(&mut pair, 0, a, b, PortKind::Tun);
    // A's packets reach B from a NAT address B was not told about.
    let nat: SocketAddr = "198.51.100.7:40001".parse().expect("addr");
    let Out::Wire(_, init) = pair.pod_send(0, 0, &udp4(a.0, b.0, b"via nat")) else {
        panic!("no init")
    };
    pair.wire.clear();
    let Out::Wire(dst, resp) = pair.underlay_recv(1, nat, &init) else {
        panic!("initiation from an unknown address not matched")
    };
    assert_eq!(dst, nat, "answer goes where the initiation came from");
    pair.wire.clear();
    pair.underlay_recv(0, pair.nodes[1].addr, &resp);
    // A's keepalive and queued packet, delivered from the NAT address.
    let queued: Vec<_> = pair.wire.drain(..).collect();
    for (_, _, d) in &queued {
        pair.underlay_recv(1, nat, d);
    }
    assert_eq!(pair.nodes[1].take(0).len(), 1);
    let wg = pair.nodes[1]
        .dp
        .status("conn-0", pair.now)
        .and_then(|s| s.wireguard)
        .expect("wg");
    assert_eq!(wg.endpoint, nat, "B follows the roamed peer");
    match pair.pod_send(1, 0, &udp4(b.0, a.0, b"reply")) {
        Out::Wire(dst, _) => assert_eq!(dst, nat),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn unmatched_initiations_are_rate_limited() {
    let mut pair = Pair::new();
    let (a, b) = addrs(0);
    program(&mut pair, 0, a, b, PortKind::Tun);
    let stranger: SocketAddr = "203.0.113.9:1".parse().expect("addr");
    let mut junk = vec![1u8, 0, 0, 0];
    junk.resize(148, 0x77);
    let outs: Vec<_> = (0..100)
        .map(|_| pair.underlay_recv(1, stranger, &junk))
        .collect();
    let limited = outs
        .iter()
        .filter(|o| **o == Out::Drop(DropReason::WgHandshakeRateLimited))
        .count();
    let scanned = outs
        .iter()
        .filter(|o| **o == Out::Drop(DropReason::WgNoSessionForInitiation))
        .count();
    assert_eq!(scanned, 50, "one second's burst at the default rate");
    assert_eq!(limited, 50);
    // From a configured endpoint, candidates are checked without the limiter.
    let from_a = pair.nodes[0].addr;
    assert_eq!(
        pair.underlay_recv(1, from_a, &junk),
        Out::Drop(DropReason::WgHandshakeRateLimited),
        "no candidate matched, so the scan is still limited"
    );
    let Out::Wire(_, init) = pair.pod_send(0, 0, &udp4(a.0, b.0, b"x")) else {
        panic!("no init")
    };
    pair.wire.clear();
    assert!(matches!(
        pair.underlay_recv(1, from_a, &init),
        Out::Wire(..)
    ));
}

#[test]
fn update_with_same_keys_keeps_the_session() {
    let mut pair = established_pair();
    let (a, b) = addrs(0);
    let before = pair.nodes[0].dp.counters("conn-0").expect("c").snapshot();
    // Re-program node A's side with identical keys and a new MTU.
    let b_addr = pair.nodes[1].addr;
    pair.nodes[0]
        .dp
        .upsert_xconnect(
            "conn-0",
            XconnSpec {
                payload: Payload::Ip,
                mtu: 1280,
                a: PodEnd {
                    port: PortId(0),
                    peer_ipv4: Some(b.0),
                    peer_ipv6: Some(b.1),
                },
                b: FarEnd::Wireguard(WgPeer {
                    local_private: key(0, 0),
                    peer_public: PublicKey::from(&key(1, 0)),
                    preshared_key: None,
                    endpoint: b_addr,
                    persistent_keepalive: None,
                }),
            },
        )
        .expect("update");
    let p = udp4(a.0, b.0, b"same session");
    assert!(matches!(pair.pod_send(0, 0, &p), Out::Wire(_, ref d) if d[0] == 4));
    pair.drive();
    assert_eq!(pair.nodes[1].take(0), vec![p]);
    let after = pair.nodes[0].dp.counters("conn-0").expect("c").snapshot();
    assert_eq!(
        after.wg.handshake_initiations_tx,
        before.wg.handshake_initiations_tx
    );
    // The new MTU applies.
    assert!(matches!(
        pair.pod_send(0, 0, &udp4(a.0, b.0, &[0; 1300])),
        Out::Pod(PortId(0), _)
    ));
    // A duplicate local key on another connection is refused.
    pair.nodes[0]
        .dp
        .add_port(PortId(5), PortKind::Tun)
        .expect("port");
    let err = pair.nodes[0]
        .dp
        .upsert_xconnect(
            "dup",
            XconnSpec {
                payload: Payload::Ip,
                mtu: MTU,
                a: PodEnd::new(PortId(5)),
                b: FarEnd::Wireguard(WgPeer {
                    local_private: key(0, 0),
                    peer_public: PublicKey::from(&key(1, 5)),
                    preshared_key: None,
                    endpoint: b_addr,
                    persistent_keepalive: None,
                }),
            },
        )
        .map(|_| ())
        .expect_err("duplicate key");
    assert_eq!(
        err.source,
        nsm_dataplane::ConfigError::DuplicateLocalKey("conn-0".into())
    );
}

#[test]
fn status_never_shows_private_keys() {
    let pair = established_pair();
    let st = pair.nodes[0].dp.status("conn-0", pair.now).expect("status");
    let text = format!("{st:?} {:?}", pair.nodes[0].dp);
    let secret = key(0, 0).to_bytes();
    let as_list = format!("{:?}", &secret[..8]);
    assert!(!text.contains(&as_list), "private key bytes in {text}");
    let _ = IpAddr::from([0u8; 4]);
}

#[test]
fn short_flush_buffer_neither_spins_nor_loses_the_queue() {
    let mut pair = Pair::new();
    let (a, b) = addrs(0);
    program(&mut pair, 0, a, b, PortKind::Tun);
    let queued = udp4(a.0, b.0, b"held for the handshake");
    let Out::Wire(_, init) = pair.pod_send(0, 0, &queued) else {
        panic!("no init")
    };
    pair.wire.clear();
    let from_a = pair.nodes[0].addr;
    let from_b = pair.nodes[1].addr;
    let Out::Wire(_, resp) = pair.underlay_recv(1, from_a, &init) else {
        panic!("no response")
    };
    pair.wire.clear();
    // A processes the response by hand, then flushes into a tiny buffer.
    let now = pair.now;
    let n = &mut pair.nodes[0];
    let keepalive = match n.dp.from_underlay(now, from_b, &resp, &mut n.out) {
        Action::ToUnderlay { datagram, .. } => datagram.to_vec(),
        other => panic!("unexpected {other:?}"),
    };
    assert!(n.dp.has_pending_flush());
    let mut tiny = [0u8; 16];
    assert!(matches!(n.dp.poll_flush(now, &mut tiny), Action::Done));
    assert!(!n.dp.has_pending_flush());
    let c = n.dp.counters("conn-0").expect("c").snapshot();
    assert_eq!(c.drops.get(DropReason::BufferTooSmall), 1);
    // The packet is still queued: the next authenticated packet from B
    // lists the session again and a proper buffer releases it.
    pair.underlay_recv(1, from_a, &keepalive);
    let reply = udp4(b.0, a.0, b"reply");
    pair.pod_send(1, 0, &reply);
    pair.drive();
    assert_eq!(pair.nodes[0].take(0), vec![reply]);
    assert_eq!(pair.nodes[1].take(0), vec![queued]);
    // Timers with a tiny buffer end the round instead of spinning.
    let n = &mut pair.nodes[0];
    assert!(matches!(n.dp.poll_timers(now, &mut tiny), Action::Done));
}

#[test]
fn same_node_and_cross_node_connections_side_by_side() {
    let mut pair = Pair::new();
    let (a, b) = addrs(0);
    program(&mut pair, 0, a, b, PortKind::Tun);
    // Two more pods on node A, joined locally.
    let n = &mut pair.nodes[0];
    for port in [10, 11] {
        n.dp.add_port(PortId(port), PortKind::Tun).expect("port");
    }
    n.dp.upsert_xconnect(
        "local",
        XconnSpec {
            payload: Payload::Ip,
            mtu: 9000,
            a: PodEnd::new(PortId(10)),
            b: FarEnd::Pod(PodEnd::new(PortId(11))),
        },
    )
    .expect("local xconn");
    let local = udp4(a.0, b.0, b"PLAINTEXT-MARKER stays on the node");
    let jumbo = udp6(a.1, b.1, &[0x77; 8000]);
    for (from, to, p) in [(10, 11, &local), (11, 10, &local), (10, 11, &jumbo)] {
        assert_eq!(pair.pod_send(0, from, p), Out::Pod(PortId(to), p.clone()));
    }
    let remote = udp4(a.0, b.0, b"PLAINTEXT-MARKER crosses");
    pair.pod_send(0, 0, &remote);
    pair.drive();
    assert_eq!(pair.nodes[1].take(0), vec![remote]);
    assert_eq!(pair.nodes[0].take(11).len(), 2);
    assert_eq!(pair.nodes[0].take(10).len(), 1);
    assert!(pair.seen.iter().all(|d| !contains(d, b"PLAINTEXT-MARKER")));
    assert_only_wireguard(&pair.seen);
}
