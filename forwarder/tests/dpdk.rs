//! Root integration test of the DPDK underlay (cargo feature `dpdk`): two
//! `nsm-forwarder`s whose WireGuard leaves through a DPDK `net_af_packet`
//! port on their node's veth, not the kernel's UDP stack, carrying pings
//! and TCP between pods. Run with
//! `cargo test -p nsm-forwarder --features dpdk --test dpdk`.

#![cfg(feature = "dpdk")]
#![forbid(unsafe_code)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(10);

/// EAL arguments for a forwarder on `iface` of its node: no hugepages, no
/// shared files beyond an empty run directory named after this test.
fn eal(tag: &str) -> String {
    format!(
        "--no-huge -m 256 --no-shconf --file-prefix=nsmfwtest-{}-{tag} --no-pci \
         --no-telemetry -l 0 --log-level=*:warning --vdev=net_af_packet0,iface=eth0",
        std::process::id()
    )
}

#[test]
fn wireguard_over_dpdk_af_packet() {
    require_root();
    let (na, nb) = two_nodes();
    let (pa, pb) = (Netns::new(), Netns::new());
    // The DPDK endpoints use addresses the nodes' kernels do not own
    // (.101 and .102 on the same link), so only DPDK answers for them.
    let (eal_a, eal_b) = (eal("a"), eal("b"));
    let args = |eal: &'static str| ["--dpdk-eal", eal, "--dpdk-port", "net_af_packet0"];
    let (eal_a, eal_b): (&'static str, &'static str) = (eal_a.leak(), eal_b.leak());
    let fa = Forwarder::start(&na, "node-a", "192.0.2.101", &args(eal_a));
    let fb = Forwarder::start(&nb, "node-b", "192.0.2.102", &args(eal_b));
    // From before the first handshake: the ARP exchange is on it too.
    let cap = Capture::start(&na, "eth0");
    let (sa_, sb) = current_thread_rt().block_on(async {
        let (mut ca, mut cb) = (fa.client().await, fb.client().await);
        connect_pair_via(
            &mut ca,
            &mut cb,
            ("192.0.2.101", "192.0.2.102"),
            "dpdk-1",
            kernel(&pa, "nsm-1", &["198.51.100.1/32"], &["198.51.100.2/32"]),
            kernel(&pb, "nsm-1", &["198.51.100.2/32"], &["198.51.100.1/32"]),
        )
        .await
    });
    assert_eq!(sa_.mtu, 1440, "the port's MTU (1500) - 60");
    assert_eq!(
        (sa_.underlay_ip.as_str(), sb.underlay_ip.as_str()),
        ("192.0.2.101", "192.0.2.102")
    );

    let dst: IpAddr = "198.51.100.2".parse().expect("ip");
    assert!(
        pa.ping(dst, WAIT),
        "ping over DPDK\nA: {}\nB: {}",
        fa.log_text(),
        fb.log_text()
    );
    // 1 MiB of TCP, echoed back intact.
    let at: SocketAddr = "198.51.100.2:7000".parse().expect("addr");
    let l = pb.tcp_listen(at);
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0; 1 << 20];
        s.read_exact(&mut buf).expect("server read");
        s.write_all(&buf).expect("server write");
    });
    let mut c = pa.tcp_connect(at);
    c.set_read_timeout(Some(WAIT)).expect("timeout");
    let data: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    c.write_all(&data).expect("client write");
    let mut back = vec![0; data.len()];
    c.read_exact(&mut back).expect("client read");
    assert!(back == data, "TCP over DPDK came back intact");
    server.join().expect("server");

    // On the wire: only WireGuard, between the DPDK addresses, which no
    // kernel owns: DPDK resolved them with ARP.
    let ends = [[192, 0, 2, 101], [192, 0, 2, 102]];
    let (mut wg_bytes, mut arp) = (0, 0);
    for f in cap.finish() {
        match u16::from_be_bytes([f[12], f[13]]) {
            // ARP from a DPDK address (sender IP at 28..32): the other
            // side resolving us (what a forwarder sends itself may bypass
            // the capture, with af_packet's qdisc bypass).
            0x0806 if ends.iter().any(|e| f[28..32] == e[..]) => arp += 1,
            0x0800 => {
                assert_eq!(f[14 + 9], 17, "only UDP on the underlay");
                let (src, dst) = (&f[26..30], &f[30..34]);
                assert!(
                    ends.iter().any(|e| src == e) && ends.iter().any(|e| dst == e),
                    "UDP between the DPDK endpoints, not the kernels' addresses"
                );
                let payload = &f[14 + 20 + 8..];
                assert!((1..=4).contains(&payload[0]), "a WireGuard message");
                wg_bytes += payload.len();
            }
            _ => {}
        }
    }
    assert!(arp > 0, "the DPDK endpoints speak ARP for their addresses");
    // What node A receives is on the capture for sure (its own sends may
    // bypass it): most of the 1 MiB coming back.
    assert!(
        wg_bytes > 512 << 10,
        "the echo crossed as WireGuard ({wg_bytes} B)"
    );
    drop((fa, fb));
    let prefix = format!("/var/run/dpdk/nsmfwtest-{}-a", std::process::id());
    assert!(
        !std::path::Path::new(&prefix).exists(),
        "the EAL run directory is removed at shutdown"
    );
}

/// Bad DPDK settings stop the forwarder at start with the reason: more
/// than one packet thread, an unknown port, EAL arguments EAL refuses.
#[test]
fn bad_dpdk_settings_are_refused() {
    require_root();
    let node = one_node();
    let good = eal("bad");
    for (args, want) in [
        (
            vec![
                "--dpdk-eal",
                &good,
                "--dpdk-port",
                "net_af_packet0",
                "--workers",
                "2",
            ],
            "one packet thread",
        ),
        (
            vec!["--dpdk-eal", &good, "--dpdk-port", "net_nosuch0"],
            "port net_nosuch0",
        ),
        (
            vec!["--dpdk-eal", "--no-such-eal-option", "--dpdk-port", "x"],
            "EAL",
        ),
        (vec!["--dpdk-eal", &good], "--dpdk-port"),
    ] {
        let err = refused(&node, "192.0.2.101", &args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
