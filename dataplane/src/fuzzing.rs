//! Fuzzing harness: a programmed data plane that takes arbitrary bytes from
//! both sides. Used by `fuzz/fuzz_targets/pipeline.rs` (feature `fuzzing`)
//! and by this crate's own tests, which replay the checked-in corpus and a
//! seeded random run on every `cargo test`.
//!
//! Input format (one fuzz case):
//! `mode selector payload...`
//! - mode % 4 == 0: `payload` is read from pod port `selector % 8`;
//! - mode % 4 == 1: `payload` arrives on the underlay; selector bit 0 patches
//!   the live session's receiver index into it (so forged messages reach a
//!   real session), bit 1 makes it come from the configured peer address;
//! - mode % 4 == 2: `payload` is encrypted by the real WireGuard peer and
//!   delivered: arbitrary *plaintext* reaches the decapsulation path;
//! - mode % 4 == 3: timers run.
//!
//! Selector bit 7 swaps the output buffer for one of `selector & 0x7f`
//! bytes, to exercise every short-buffer path. Every case ends by draining
//! `poll_flush`. Outputs are checked for basic sanity (what goes to the wire
//! is a WireGuard message, what goes to a TUN is IP).
//!
//! Ports: 0 TUN <-> 1 TUN (same node), 2 TAP <-> 3 TAP (same node), 4 TUN <->
//! WireGuard (established with the in-process peer), 5 TAP <-> WireGuard (no
//! handshake ever completes), 6 TUN (no cross-connect).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};

use crate::xconn::TapConfig;
use crate::{
    Action, Dataplane, DataplaneConfig, FarEnd, MacAddr, Payload, PodEnd, PortId, PortKind,
    PublicKey, StaticSecret, WgPeer, XconnSpec, out_len, parse_ip,
};

/// Address of the in-process WireGuard peer.
pub const PEER_ADDR: &str = "192.0.2.2:51820";
/// Some other address.
pub const OTHER_ADDR: &str = "198.51.100.9:4000";

/// The data plane's key for the established WireGuard connection.
pub fn local_key() -> StaticSecret {
    StaticSecret::from([0x11; 32])
}

/// The in-process peer's key for it.
pub fn peer_key() -> StaticSecret {
    StaticSecret::from([0x22; 32])
}

/// A programmed data plane plus a real WireGuard peer.
pub struct Fixture {
    dp: Dataplane,
    peer: Box<Tunn>,
    peer_addr: SocketAddr,
    other_addr: SocketAddr,
    /// The receiver index the data plane expects from the peer.
    receiver_index: u32,
    out: Vec<u8>,
    small: Vec<u8>,
    scratch: Vec<u8>,
    now: Instant,
}

impl core::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Fixture")
            .field("dp", &self.dp)
            .finish_non_exhaustive()
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

fn tap(n: u8) -> PortKind {
    PortKind::Tap(TapConfig {
        peer_mac: MacAddr([2, 0, 0, 0, n, 2]),
        pod_mac: if n.is_multiple_of(2) {
            Some(MacAddr([2, 0, 0, 0, n, 1]))
        } else {
            None
        },
    })
}

fn end(port: u32) -> PodEnd {
    PodEnd {
        port: PortId(port),
        peer_ipv4: Some(Ipv4Addr::new(10, 0, 0, 2)),
        peer_ipv6: Some(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
    }
}

impl Fixture {
    /// Programs the ports and connections and completes one handshake.
    ///
    /// # Panics
    /// If the fixture itself cannot be set up (a bug in this crate).
    pub fn new() -> Self {
        let peer_addr: SocketAddr = PEER_ADDR.parse().expect("address literal");
        let mut dp = Dataplane::new(DataplaneConfig::default());
        for (port, kind) in [
            (0, PortKind::Tun),
            (1, PortKind::Tun),
            (2, tap(2)),
            (3, tap(3)),
            (4, PortKind::Tun),
            (5, tap(5)),
            (6, PortKind::Tun),
        ] {
            dp.add_port(PortId(port), kind).expect("fixture port");
        }
        let mut program = |id: &str, payload, a, b| {
            dp.upsert_xconnect(
                id,
                XconnSpec {
                    payload,
                    mtu: 1420,
                    a: end(a),
                    b,
                },
            )
            .expect("fixture cross-connect");
        };
        program("ip", Payload::Ip, 0, FarEnd::Pod(end(1)));
        program("eth", Payload::Ethernet, 2, FarEnd::Pod(end(3)));
        let wg = |local: StaticSecret, peer: &StaticSecret| {
            FarEnd::Wireguard(WgPeer {
                local_private: local,
                peer_public: PublicKey::from(peer),
                preshared_key: None,
                endpoint: peer_addr,
                persistent_keepalive: Some(10),
            })
        };
        program("wg-ip", Payload::Ip, 4, wg(local_key(), &peer_key()));
        program(
            "wg-eth",
            Payload::Ethernet,
            5,
            wg(
                StaticSecret::from([0x33; 32]),
                &StaticSecret::from([0x44; 32]),
            ),
        );

        let mut peer = Box::new(Tunn::new(
            peer_key(),
            PublicKey::from(&local_key()),
            None,
            None,
            77,
            None,
        ));
        let now = Instant::now();
        let mut out = vec![0u8; out_len(9000)];
        let mut scratch = vec![0u8; 65536 + 256];
        let Action::ToUnderlay { datagram, .. } = dp.initiate_handshake("wg-ip", &mut out) else {
            panic!("fixture: no initiation")
        };
        let receiver_index = u32::from_le_bytes(
            datagram
                .get(4..8)
                .and_then(|b| b.try_into().ok())
                .expect("initiation sender index"),
        );
        let TunnResult::WriteToNetwork(resp) =
            peer.decapsulate(Some(peer_addr.ip()), datagram, &mut scratch)
        else {
            panic!("fixture: no response")
        };
        let resp = resp.to_vec();
        let Action::ToUnderlay { datagram, .. } = dp.from_underlay(now, peer_addr, &resp, &mut out)
        else {
            panic!("fixture: no keepalive")
        };
        let keepalive = datagram.to_vec();
        while !matches!(dp.poll_flush(now, &mut out), Action::Done) {}
        let _ = peer.decapsulate(Some(peer_addr.ip()), &keepalive, &mut scratch);

        Fixture {
            dp,
            peer,
            peer_addr,
            other_addr: OTHER_ADDR.parse().expect("address literal"),
            receiver_index,
            out,
            small: vec![0u8; 128],
            scratch,
            now,
        }
    }

    /// The data plane, for tests that want to look at counters.
    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    /// Runs one fuzz case (see the module doc). Panics only if an output
    /// breaks an invariant, which is what the fuzzer looks for.
    pub fn run(&mut self, data: &[u8]) {
        let Some((&mode, rest)) = data.split_first() else {
            return;
        };
        let (sel, payload) = match rest.split_first() {
            Some((&sel, payload)) => (sel, payload),
            None => (0, rest),
        };
        self.now += Duration::from_millis(u64::from(sel & 7));
        let now = self.now;
        let out: &mut [u8] = if sel & 0x80 != 0 {
            &mut self.small[..usize::from(sel & 0x7f).min(128)]
        } else {
            &mut self.out
        };
        match mode % 4 {
            0 => {
                let mut packet = payload.to_vec();
                let action = self
                    .dp
                    .from_pod(now, PortId(u32::from(sel % 8)), &mut packet, out);
                check(&action);
            }
            1 => {
                let mut datagram = payload.to_vec();
                if sel & 1 != 0 {
                    let at = match datagram.first() {
                        Some(2) => 8,
                        _ => 4,
                    };
                    if let Some(idx) = datagram.get_mut(at..at + 4) {
                        idx.copy_from_slice(&self.receiver_index.to_le_bytes());
                    }
                }
                let src = if sel & 2 != 0 {
                    self.peer_addr
                } else {
                    self.other_addr
                };
                let action = self.dp.from_underlay(now, src, &datagram, out);
                check(&action);
            }
            2 => {
                if let TunnResult::WriteToNetwork(datagram) =
                    self.peer.encapsulate(payload, &mut self.scratch)
                {
                    let action = self.dp.from_underlay(now, self.peer_addr, datagram, out);
                    check(&action);
                }
            }
            _ => {
                for _ in 0..1000 {
                    let action = self.dp.poll_timers(now, out);
                    check(&action);
                    if !matches!(action, Action::ToUnderlay { .. }) {
                        break;
                    }
                }
            }
        }
        for _ in 0..1000 {
            let action = self.dp.poll_flush(now, &mut self.out);
            check(&action);
            if !matches!(action, Action::ToUnderlay { .. }) {
                break;
            }
        }
    }
}

/// Invariants every output must hold, whatever the input.
fn check(action: &Action<'_>) {
    match action {
        Action::ToUnderlay { datagram, .. } => {
            assert!(
                crate::wg::classify(datagram).is_ok(),
                "non-WireGuard datagram on the wire: {datagram:02x?}"
            );
        }
        Action::ToPod { port, packet } => match port.0 {
            0 | 1 | 4 | 6 => assert!(parse_ip(packet).is_ok(), "non-IP to a TUN"),
            _ => assert!(packet.len() >= 14, "runt frame to a TAP"),
        },
        Action::Drop(_) | Action::Done => {}
    }
}

/// Seed inputs: real packets in the fuzz input format, named.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use etherparse::{
        ArpEthIpv4Packet, ArpOperation, EtherType, Ethernet2Header, Icmpv6Header, Icmpv6Type,
        IpNumber, Ipv6Header, PacketBuilder,
    };
    let a4 = [10, 0, 0, 1];
    let b4 = [10, 0, 0, 2];
    let a6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).octets();
    let b6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).octets();
    let udp4 = |len: usize| {
        let mut v = Vec::new();
        PacketBuilder::ipv4(a4, b4, 64)
            .udp(1000, 53)
            .write(&mut v, &vec![0x61; len])
            .expect("build");
        v
    };
    let tcp4 = {
        let mut v = Vec::new();
        PacketBuilder::ipv4(a4, b4, 64)
            .tcp(40000, 443, 1, 65535)
            .syn()
            .write(&mut v, &[])
            .expect("build");
        v
    };
    let ping4 = {
        let mut v = Vec::new();
        PacketBuilder::ipv4(a4, b4, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut v, b"ping")
            .expect("build");
        v
    };
    let udp6 = |len: usize| {
        let mut v = Vec::new();
        PacketBuilder::ipv6(a6, b6, 64)
            .udp(1000, 53)
            .write(&mut v, &vec![0x62; len])
            .expect("build");
        v
    };
    let eth = |ty: EtherType, payload: &[u8]| {
        let mut f = Ethernet2Header {
            destination: [2, 0, 0, 0, 2, 2],
            source: [2, 0, 0, 0, 2, 1],
            ether_type: ty,
        }
        .to_bytes()
        .to_vec();
        f.extend_from_slice(payload);
        f
    };
    let arp = eth(
        EtherType::ARP,
        &ArpEthIpv4Packet {
            operation: ArpOperation::REQUEST,
            sender_mac: [2, 0, 0, 0, 2, 1],
            sender_ipv4: a4,
            target_mac: [0; 6],
            target_ipv4: b4,
        }
        .to_bytes(),
    );
    let ns = {
        let dst = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 2];
        let mut payload = b6.to_vec();
        payload.extend_from_slice(&[1, 1, 2, 0, 0, 0, 2, 1]);
        let icmp = Icmpv6Header::with_checksum(Icmpv6Type::NeighborSolicitation, a6, dst, &payload)
            .expect("checksum");
        let ip = Ipv6Header {
            traffic_class: 0,
            flow_label: Default::default(),
            payload_length: 32,
            next_header: IpNumber::IPV6_ICMP,
            hop_limit: 255,
            source: a6,
            destination: dst,
        };
        let mut v = ip.to_bytes().to_vec();
        v.extend_from_slice(&icmp.to_bytes());
        v.extend_from_slice(&payload);
        eth(EtherType::IPV6, &v)
    };
    // A valid initiation for the established connection, from a fresh peer.
    let init = {
        let mut t = Tunn::new(
            peer_key(),
            PublicKey::from(&local_key()),
            None,
            None,
            9,
            None,
        );
        let mut buf = [0u8; 256];
        match t.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(m) => m.to_vec(),
            _ => Vec::new(),
        }
    };
    let mut data_msg = vec![4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    data_msg.extend_from_slice(&[0x5c; 48]);
    let mut cookie = vec![3, 0, 0, 0];
    cookie.resize(64, 0x3c);
    let mut response = vec![2, 0, 0, 0];
    response.resize(92, 0x2c);

    let case = |mode: u8, sel: u8, payload: &[u8]| {
        let mut v = vec![mode, sel];
        v.extend_from_slice(payload);
        v
    };
    vec![
        ("pod-tun-udp4", case(0, 0, &udp4(64))),
        ("pod-tun-tcp4-syn", case(0, 0, &tcp4)),
        ("pod-tun-ping4", case(0, 1, &ping4)),
        ("pod-tun-udp6", case(0, 0, &udp6(100))),
        ("pod-tun-too-big4", case(0, 0, &udp4(1500))),
        ("pod-tun-too-big6", case(0, 1, &udp6(1500))),
        ("pod-tap-udp4", case(0, 2, &eth(EtherType::IPV4, &udp4(32)))),
        ("pod-tap-udp6", case(0, 3, &eth(EtherType::IPV6, &udp6(32)))),
        ("pod-tap-arp", case(0, 2, &arp)),
        ("pod-tap-ns", case(0, 2, &ns)),
        (
            "pod-tap-too-big",
            case(0, 2, &eth(EtherType::IPV4, &udp4(1500))),
        ),
        ("pod-wg-udp4", case(0, 4, &udp4(1400))),
        ("pod-wg-udp6", case(0, 4, &udp6(200))),
        (
            "pod-wg-tap-pending",
            case(0, 5, &eth(EtherType::IPV4, &udp4(64))),
        ),
        ("pod-unattached", case(0, 6, &udp4(64))),
        ("pod-short-out", case(0, 0x80 | 20, &udp4(64))),
        ("underlay-init", case(1, 2, &init)),
        ("underlay-data-indexed", case(1, 3, &data_msg)),
        ("underlay-cookie-indexed", case(1, 3, &cookie)),
        ("underlay-response-indexed", case(1, 3, &response)),
        ("underlay-garbage", case(1, 0, b"\x05\x00\x00\x00garbage")),
        ("peer-plaintext-udp4", case(2, 0, &udp4(64))),
        ("peer-plaintext-udp6", case(2, 0, &udp6(64))),
        (
            "peer-plaintext-bad",
            case(2, 0, &[0x45, 0, 0, 0xff, 1, 2, 3]),
        ),
        ("timers", case(3, 0, &[])),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn seeds_run_clean() {
        let mut f = Fixture::new();
        for (_, seed) in seeds() {
            f.run(&seed);
        }
    }

    /// Replays the checked-in corpus (and any crash reproducers saved under
    /// `fuzz/artifacts/pipeline`) on every `cargo test`.
    #[test]
    fn checked_in_corpus_runs_clean() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut f = Fixture::new();
        let mut n = 0;
        for dir in ["corpus/pipeline", "artifacts/pipeline"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for entry in entries.flatten() {
                let data = std::fs::read(entry.path()).expect("corpus file");
                f.run(&data);
                n += 1;
            }
        }
        assert!(n == 0 || n >= seeds().len());
    }

    /// A few thousand seeded random cases, mutated from the seeds, so that
    /// plain `cargo test` already covers what the fuzzer starts from.
    #[test]
    fn seeded_random_cases_run_clean() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let seeds = seeds();
        let mut f = Fixture::new();
        for _ in 0..20_000 {
            let (_, seed) = &seeds[rng.random_range(0..seeds.len())];
            let mut case = seed.clone();
            for _ in 0..rng.random_range(0..8) {
                match rng.random_range(0..4) {
                    0 if !case.is_empty() => {
                        let i = rng.random_range(0..case.len());
                        case[i] = rng.random();
                    }
                    1 if !case.is_empty() => {
                        let n = rng.random_range(0..case.len());
                        case.truncate(n);
                    }
                    2 => case.push(rng.random()),
                    _ => {
                        if let Some(b) = case.get_mut(1) {
                            *b = rng.random();
                        }
                    }
                }
            }
            f.run(&case);
        }
        let g = f.dataplane().global_counters().snapshot();
        assert!(g.total() > 0, "garbage was dropped and counted");
    }

    /// Writes the seeds to `fuzz/corpus/pipeline/` (run with `--ignored`).
    #[test]
    #[ignore]
    fn write_seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/pipeline");
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (name, seed) in seeds() {
            std::fs::write(dir.join(name), seed).expect("write seed");
        }
    }
}
