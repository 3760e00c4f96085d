//! The UDP underlay against the Linux kernel, over real drivers: DPDK's
//! `net_af_packet` on one end of a veth pair (IPv4 and IPv6) and `net_tap`,
//! with a kernel UDP socket on the other end, each in its own network
//! namespace. Needs root.
//!
//! Every `#[test]` here makes the namespace, then runs its scenario in a
//! child process (this binary again, filtered to `child_entry`): the EAL
//! may start once per process and must start inside the namespace.

#![cfg(feature = "dpdk")]

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{
    NETNS_ENV, Netns, SCENARIO_ENV, disable_tx_checksum, enter_netns, ip_in, kernel_recv, mac_in,
    run_child, send_raw,
};
use etherparse::PacketBuilder;
use nsm_dpdk::{
    BURST, CountersSnapshot, Eal, Error, Port, PortConfig, RecvBatch, RxBatch, RxDrop, TxDrop,
    UdpUnderlay, UdpUnderlayConfig, format_mac,
};

const CHILD_TIMEOUT: Duration = Duration::from_secs(45);
const STEP: Duration = Duration::from_secs(5);

#[test]
fn af_packet_ipv4() {
    let ns = Netns::new();
    ns.veth("vk0", "vd0");
    ns.ip(&["addr", "add", "198.51.100.1/24", "dev", "vk0"]);
    run_child("af_packet_ipv4", &ns, CHILD_TIMEOUT);
}

#[test]
fn af_packet_ipv6() {
    let ns = Netns::new();
    ns.veth("vk0", "vd0");
    ns.ip(&["addr", "add", "fd00::1/64", "dev", "vk0", "nodad"]);
    run_child("af_packet_ipv6", &ns, CHILD_TIMEOUT);
}

#[test]
fn af_packet_raw_port() {
    let ns = Netns::new();
    ns.veth("vk0", "vd0");
    ns.ip(&["addr", "add", "198.51.100.1/24", "dev", "vk0"]);
    run_child("af_packet_raw_port", &ns, CHILD_TIMEOUT);
}

#[test]
fn tap_ipv4() {
    // The tap interface is made by DPDK (in the child), inside the namespace.
    let ns = Netns::new();
    run_child("tap_ipv4", &ns, CHILD_TIMEOUT);
}

/// The child side: runs the scenario named in the environment, inside the
/// namespace named there. Does nothing in a normal test run.
#[test]
fn child_entry() {
    let Ok(scenario) = std::env::var(SCENARIO_ENV) else {
        return;
    };
    let ns = std::env::var(NETNS_ENV).expect("namespace name");
    enter_netns(&ns);
    if scenario.starts_with("af_packet") {
        disable_tx_checksum("vk0");
    }
    match scenario.as_str() {
        "af_packet_ipv4" => af_packet_ipv4_scenario(&ns),
        "af_packet_ipv6" => af_packet_ipv6_scenario(&ns),
        "tap_ipv4" => tap_ipv4_scenario(&ns),
        "af_packet_raw_port" => raw_port_scenario(&ns),
        other => panic!("unknown scenario {other}"),
    }
}

/// EAL arguments for a test process: no hugepages, nothing shared with
/// other DPDK processes, no PCI scan, quiet logs.
fn eal_args(vdev: &str) -> Vec<String> {
    [
        "--no-huge",
        "-m",
        "128",
        "--no-shconf",
        &format!("--file-prefix=nsmdpdk-{}", std::process::id()),
        "--no-pci",
        "--no-telemetry",
        "-l",
        "0",
        "--log-level=*:warning",
        vdev,
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

fn open(vdev_arg: &str, vdev_name: &str, local: &str) -> (Eal, UdpUnderlay) {
    let t = Instant::now();
    let eal = Eal::init(&eal_args(vdev_arg)).expect("EAL");
    println!("EAL up in {:?}", t.elapsed());
    // Once per process: a second call is an error, not undefined behaviour.
    assert!(matches!(
        Eal::init(&eal_args(vdev_arg)),
        Err(Error::EalAlreadyInitialized)
    ));
    let missing = eal.port_by_name("net_nothing0").unwrap_err();
    assert!(
        matches!(missing, Error::PortNotFound { ref available, .. } if available.contains(vdev_name)),
        "{missing}"
    );
    let id = eal.port_by_name(vdev_name).expect("port");
    let port = Port::open(&eal, id, &PortConfig::default()).expect("port open");
    println!("{port:?}");
    assert_eq!(port.mtu(), 1500);
    let mut config = UdpUnderlayConfig::new(local.parse().unwrap());
    // Quicker than the kernel's 1 s, so giving up on a silent neighbour
    // takes under a second.
    config.neighbor_retransmit = Duration::from_millis(250);
    let udp = UdpUnderlay::new(port, config).expect("underlay");
    (eal, udp)
}

/// Polls DPDK until `n` datagrams arrived or `timeout` passed.
fn dpdk_recv(udp: &mut UdpUnderlay, n: usize, timeout: Duration) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut got = Vec::with_capacity(n);
    let mut batch = RecvBatch::new();
    let deadline = Instant::now() + timeout;
    while got.len() < n && Instant::now() < deadline {
        udp.recv(&mut batch);
        for (src, payload) in batch.iter() {
            got.push((src, payload.to_vec()));
        }
        if batch.is_empty() {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
    got
}

/// Polls DPDK until `done` holds for the counters, or panics after
/// `timeout`. No datagram may arrive meanwhile.
fn wait_counters(udp: &mut UdpUnderlay, what: &str, done: impl Fn(&CountersSnapshot) -> bool) {
    let counters = udp.counters();
    let deadline = Instant::now() + STEP;
    while !done(&counters.snapshot()) {
        let got = dpdk_recv(udp, 1, Duration::from_millis(10));
        assert!(got.is_empty(), "{what}: unexpected datagram {got:?}");
        assert!(
            Instant::now() < deadline,
            "{what}: counters now {:#?}",
            counters.snapshot()
        );
    }
}

/// Payload `seq` of a bulk run: its number, then a pattern, of a length
/// that varies between 1 and ~1400 bytes.
#[allow(clippy::cast_possible_truncation, reason = "a byte pattern")]
fn bulk_payload(seq: u32, buf: &mut Vec<u8>) {
    let len = 4 + (seq as usize * 37) % 1380;
    buf.clear();
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.extend((4..len).map(|i| (i as u32).wrapping_mul(seq | 1) as u8));
}

/// DPDK resolves the kernel by ARP/NDP and sends; the kernel socket gets
/// the datagram from our address.
fn dpdk_to_kernel_first(
    udp: &mut UdpUnderlay,
    sock: &UdpSocket,
    kernel: SocketAddr,
    kernel_mac: [u8; 6],
) {
    assert_eq!(udp.neighbor(kernel.ip()), None);
    udp.send(kernel, b"from dpdk").expect("send");
    udp.flush();
    let got = kernel_recv(sock, 1, STEP, || {
        udp.recv_with(|src, p| panic!("unexpected datagram from {src}: {p:?}"));
        udp.flush();
    });
    assert_eq!(got, vec![(udp.local_addr(), b"from dpdk".to_vec())]);
    assert_eq!(
        udp.neighbor(kernel.ip()),
        Some(kernel_mac),
        "resolved the kernel's MAC"
    );
    let c = udp.counters().snapshot();
    assert!(
        c.tx_neighbor >= 1 && c.rx_neighbor >= 1,
        "request sent, answer handled: {c:#?}"
    );
    assert_eq!(c.tx_datagrams, 1);
}

/// The kernel (its neighbour cache flushed) resolves us by ARP/NDP, which
/// DPDK answers, and sends; DPDK delivers the datagram with its source.
fn kernel_to_dpdk_first(
    ns: &str,
    dev: &str,
    udp: &mut UdpUnderlay,
    sock: &UdpSocket,
    kernel: SocketAddr,
) {
    ip_in(ns, &["neigh", "flush", "dev", dev]);
    let before = udp.counters().snapshot();
    sock.send_to(b"from kernel", udp.local_addr())
        .expect("kernel send");
    let got = dpdk_recv(udp, 1, STEP);
    assert_eq!(
        got,
        vec![(kernel, b"from kernel".to_vec())],
        "{:#?} {:?} {}",
        udp.counters().snapshot(),
        udp.port().stats(),
        ip_in(ns, &["neigh", "show"])
    );
    let after = udp.counters().snapshot();
    assert!(
        after.tx_neighbor > before.tx_neighbor,
        "answered the kernel's request"
    );
    let neigh = ip_in(
        ns,
        &[
            "neigh",
            "show",
            &udp.local_addr().ip().to_string(),
            "dev",
            dev,
        ],
    );
    assert!(
        neigh.contains(&format_mac(&udp.mac())),
        "kernel learnt our MAC {}: {neigh}",
        format_mac(&udp.mac())
    );
}

/// 10,000 datagrams each way in bursts, every byte checked; the second
/// direction writes straight into the mbufs.
#[allow(
    clippy::cast_possible_truncation,
    reason = "indexes within a burst of 50"
)]
fn bulk(udp: &mut UdpUnderlay, sock: &UdpSocket, kernel: SocketAddr, total: u32) {
    let start = udp.counters().snapshot();
    let t = Instant::now();
    let mut expected = Vec::new();
    let mut seq = 0u32;
    while seq < total {
        let burst = 50.min(total - seq);
        for s in seq..seq + burst {
            bulk_payload(s, &mut expected);
            sock.send_to(&expected, udp.local_addr())
                .expect("kernel send");
        }
        let got = dpdk_recv(udp, burst as usize, STEP);
        assert_eq!(
            got.len(),
            burst as usize,
            "burst at {seq}: {:#?}",
            udp.counters().snapshot()
        );
        for (i, (src, payload)) in got.iter().enumerate() {
            bulk_payload(seq + i as u32, &mut expected);
            assert_eq!(*src, kernel);
            assert!(*payload == expected, "datagram {} differs", seq + i as u32);
        }
        seq += burst;
    }
    println!("kernel -> dpdk: {total} datagrams in {:?}", t.elapsed());

    let t = Instant::now();
    let mut seq = 0u32;
    while seq < total {
        let burst = 32.min(total - seq);
        for s in seq..seq + burst {
            bulk_payload(s, &mut expected);
            let buf = udp.next_payload_buf(expected.len()).expect("buffer");
            buf.copy_from_slice(&expected);
            udp.commit(kernel, expected.len()).expect("commit");
        }
        udp.flush();
        let got = kernel_recv(sock, burst as usize, STEP, || {
            udp.recv_with(|_, _| {});
        });
        assert_eq!(
            got.len(),
            burst as usize,
            "burst at {seq}: {:#?}",
            udp.counters().snapshot()
        );
        for (i, (src, payload)) in got.iter().enumerate() {
            bulk_payload(seq + i as u32, &mut expected);
            assert_eq!(*src, udp.local_addr());
            assert!(*payload == expected, "datagram {} differs", seq + i as u32);
        }
        seq += burst;
    }
    println!("dpdk -> kernel: {total} datagrams in {:?}", t.elapsed());
    let end = udp.counters().snapshot();
    assert_eq!(end.rx_datagrams - start.rx_datagrams, u64::from(total));
    assert_eq!(end.tx_datagrams - start.tx_datagrams, u64::from(total));
    assert_eq!(end.tx_dropped_total(), start.tx_dropped_total(), "{end:#?}");
}

fn af_packet_ipv4_scenario(ns: &str) {
    let (eal, mut udp) = open(
        "--vdev=net_af_packet0,iface=vd0",
        "net_af_packet0",
        "198.51.100.2:51820",
    );
    assert_eq!(
        udp.mac(),
        mac_in(ns, "vd0"),
        "af_packet uses the interface's MAC"
    );
    let kernel: SocketAddr = "198.51.100.1:40000".parse().unwrap();
    let kernel_mac = mac_in(ns, "vk0");
    let sock = UdpSocket::bind(kernel).expect("bind in the namespace");
    sock.set_nonblocking(true).unwrap();

    dpdk_to_kernel_first(&mut udp, &sock, kernel, kernel_mac);
    kernel_to_dpdk_first(ns, "vk0", &mut udp, &sock, kernel);

    // Frames to drop, each with its reason; the counters are read from
    // another thread, as a metrics scraper would.
    let counters = udp.counters();
    let before = std::thread::spawn({
        let c = counters.clone();
        move || c.snapshot()
    })
    .join()
    .unwrap();
    sock.send_to(b"to another port", "198.51.100.2:51821")
        .unwrap();
    let good = {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(kernel_mac, udp.mac())
            .ipv4([198, 51, 100, 1], [198, 51, 100, 2], 64)
            .udp(40000, 51820)
            .write(&mut f, b"crafted payload")
            .unwrap();
        f
    };
    let mut bad_udp = good.clone();
    *bad_udp.last_mut().unwrap() ^= 0xff;
    let mut bad_ip = good.clone();
    bad_ip[24] ^= 0xff;
    let mut truncated = good.clone();
    truncated[17] += 100; // IPv4 total length past the frame
    fix_ipv4_checksum(&mut truncated);
    let mut unknown = good.clone();
    unknown[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    // (No IPv4 fragment here: net_af_packet's socket joins a fanout group
    // with PACKET_FANOUT_FLAG_DEFRAG, so the kernel reassembles fragments
    // before DPDK sees them and a lone fragment never arrives. The tap
    // scenario covers fragments.)
    for f in [&good, &bad_udp, &bad_ip, &truncated, &unknown] {
        send_raw("vk0", f);
    }
    // The good crafted one arrives; the others are counted.
    let got = dpdk_recv(&mut udp, 1, STEP);
    assert_eq!(got, vec![(kernel, b"crafted payload".to_vec())]);
    wait_counters(&mut udp, "drops", |c| {
        let d = |r| c.rx_dropped(r) - before.rx_dropped(r);
        d(RxDrop::WrongPort) == 1
            && d(RxDrop::BadChecksum) == 1
            && d(RxDrop::BadIpv4Checksum) == 1
            && d(RxDrop::Truncated) == 1
            && d(RxDrop::UnknownEtherType) == 1
    });

    // Sending to the other family, a multicast address, or too much.
    assert_eq!(
        udp.send("[fd00::1]:1".parse().unwrap(), b"x"),
        Err(TxDrop::WrongFamily)
    );
    assert_eq!(
        udp.send("224.0.0.1:1".parse().unwrap(), b"x"),
        Err(TxDrop::BadDestination)
    );
    let too_big = vec![0u8; udp.max_payload() + 1];
    assert_eq!(udp.max_payload(), 1500 - 28);
    assert_eq!(udp.send(kernel, &too_big), Err(TxDrop::TooBig));
    assert_eq!(counters.tx_dropped(TxDrop::TooBig), 1);
    // A payload of the full MTU goes out whole (DF set, no fragmentation).
    let full = vec![0xa5u8; udp.max_payload()];
    udp.send(kernel, &full).unwrap();
    udp.flush();
    let got = kernel_recv(&sock, 1, STEP, || {
        udp.recv_with(|_, _| {});
    });
    assert_eq!(got, vec![(udp.local_addr(), full)]);

    // A silent neighbour: the datagrams wait (4), the rest is dropped, and
    // after 3 requests the waiting ones are dropped too.
    let silent: SocketAddr = "198.51.100.77:9".parse().unwrap();
    for _ in 0..6 {
        let _ = udp.send(silent, b"nobody");
    }
    assert_eq!(counters.tx_dropped(TxDrop::Unresolved), 2);
    let deadline = Instant::now() + STEP;
    while counters.tx_dropped(TxDrop::Unresolved) < 6 {
        udp.recv_with(|_, _| {});
        udp.flush();
        assert!(Instant::now() < deadline, "{:#?}", counters.snapshot());
        std::thread::sleep(Duration::from_millis(5));
    }

    // A static neighbour needs no ARP.
    let fixed: IpAddr = "198.51.100.1".parse().unwrap();
    udp.add_neighbor(fixed, kernel_mac).unwrap();
    assert_eq!(udp.neighbor(fixed), Some(kernel_mac));

    bulk(&mut udp, &sock, kernel, 10_000);

    let stats = udp.port().stats().unwrap();
    println!("{stats:?}\n{:#?}", counters.snapshot());
    assert!(stats.opackets >= 10_000 && stats.ipackets >= 10_000);
    // Everything goes back to the pool, the port closes, EAL cleans up.
    drop(udp);
    drop(eal);
}

fn af_packet_ipv6_scenario(ns: &str) {
    let (_eal, mut udp) = open(
        "--vdev=net_af_packet0,iface=vd0",
        "net_af_packet0",
        "[fd00::2]:51820",
    );
    let kernel: SocketAddr = "[fd00::1]:40000".parse().unwrap();
    let kernel_mac = mac_in(ns, "vk0");
    let sock = UdpSocket::bind(kernel).expect("bind in the namespace");
    sock.set_nonblocking(true).unwrap();
    assert_eq!(udp.max_payload(), 1500 - 48);

    dpdk_to_kernel_first(&mut udp, &sock, kernel, kernel_mac);
    kernel_to_dpdk_first(ns, "vk0", &mut udp, &sock, kernel);

    let before = udp.counters().snapshot();
    sock.send_to(b"to another port", "[fd00::2]:51821").unwrap();
    let build = |payload: &[u8]| {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(kernel_mac, udp.mac())
            .ipv6(
                kernel_ip6(kernel).octets(),
                "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets(),
                64,
            )
            .udp(40000, 51820)
            .write(&mut f, payload)
            .unwrap();
        f
    };
    // Checksum 0 is "none" for IPv4 but forbidden over IPv6.
    let mut zero_sum = build(b"no checksum");
    zero_sum[14 + 40 + 6] = 0;
    zero_sum[14 + 40 + 7] = 0;
    let mut bad_sum = build(b"bad checksum");
    *bad_sum.last_mut().unwrap() ^= 0xff;
    // A UDP datagram behind a fragment header (next header 44).
    let plain = build(b"fragmented");
    let mut fragment = plain[..14 + 40].to_vec();
    fragment[14 + 6] = 44;
    fragment[14 + 5] += 8; // payload length
    fragment.extend_from_slice(&[17, 0, 0, 0, 0, 0, 0, 1]); // UDP, offset 0, no M, id 1
    fragment.extend_from_slice(&plain[14 + 40..]);
    send_raw("vk0", &zero_sum);
    send_raw("vk0", &bad_sum);
    send_raw("vk0", &fragment);
    wait_counters(&mut udp, "drops", |c| {
        let d = |r| c.rx_dropped(r) - before.rx_dropped(r);
        d(RxDrop::WrongPort) == 1 && d(RxDrop::BadChecksum) == 2 && d(RxDrop::Fragment) == 1
    });

    bulk(&mut udp, &sock, kernel, 2_000);
}

fn kernel_ip6(a: SocketAddr) -> std::net::Ipv6Addr {
    match a.ip() {
        IpAddr::V6(ip) => ip,
        IpAddr::V4(_) => panic!("not IPv6"),
    }
}

fn tap_ipv4_scenario(ns: &str) {
    let (_eal, mut udp) = open(
        "--vdev=net_tap0,iface=dtap0",
        "net_tap0",
        "198.51.100.2:51820",
    );
    // DPDK made the tap interface in our namespace; the kernel end of it is
    // an ordinary interface.
    ip_in(ns, &["addr", "add", "198.51.100.1/24", "dev", "dtap0"]);
    ip_in(ns, &["link", "set", "dtap0", "up"]);
    let kernel: SocketAddr = "198.51.100.1:40000".parse().unwrap();
    // net_tap gives the kernel's interface the port's own MAC.
    let kernel_mac = mac_in(ns, "dtap0");
    assert_eq!(kernel_mac, udp.mac());
    let sock = UdpSocket::bind(kernel).expect("bind in the namespace");
    sock.set_nonblocking(true).unwrap();

    dpdk_to_kernel_first(&mut udp, &sock, kernel, kernel_mac);
    kernel_to_dpdk_first(ns, "dtap0", &mut udp, &sock, kernel);

    // IPv4 fragments are dropped (tap, unlike af_packet, passes them on as
    // they are); a header with options is fine.
    let before = udp.counters().snapshot();
    let mut fragment = Vec::new();
    PacketBuilder::ethernet2(kernel_mac, udp.mac())
        .ipv4([198, 51, 100, 1], [198, 51, 100, 2], 64)
        .udp(40000, 51820)
        .write(&mut fragment, b"first fragment")
        .unwrap();
    let mut with_options = fragment.clone();
    fragment[20] |= 0x20; // more fragments
    fix_ipv4_checksum(&mut fragment);
    // Four NOP options: IHL 6, total length + 4.
    with_options.splice(34..34, [1u8, 1, 1, 1]);
    with_options[14] = 0x46;
    with_options[17] += 4;
    fix_ipv4_checksum(&mut with_options);
    send_raw("dtap0", &fragment);
    send_raw("dtap0", &with_options);
    let got = dpdk_recv(&mut udp, 1, STEP);
    assert_eq!(got, vec![(kernel, b"first fragment".to_vec())]);
    wait_counters(&mut udp, "fragment", |c| {
        c.rx_dropped(RxDrop::Fragment) - before.rx_dropped(RxDrop::Fragment) == 1
    });

    bulk(&mut udp, &sock, kernel, 2_000);
}

/// Recomputes the IPv4 header checksum of an Ethernet frame.
fn fix_ipv4_checksum(f: &mut [u8]) {
    f[24] = 0;
    f[25] = 0;
    let h = etherparse::Ipv4HeaderSlice::from_slice(&f[14..])
        .unwrap()
        .to_header();
    f[24..26].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
}

/// The frame-level API under the UDP layer: whatever the kernel puts on
/// the wire arrives byte for byte, and a frame staged in an mbuf reaches
/// the kernel's socket.
fn raw_port_scenario(ns: &str) {
    let eal = Eal::init(&eal_args("--vdev=net_af_packet0,iface=vd0")).expect("EAL");
    let mut port = Port::open(
        &eal,
        eal.port_by_name("net_af_packet0").unwrap(),
        &PortConfig::default(),
    )
    .unwrap();
    assert!(port.link_up());
    assert!(!port.promiscuous());
    port.set_promiscuous(true).unwrap();
    assert!(port.promiscuous());
    let kernel_mac = mac_in(ns, "vk0");
    let sock = UdpSocket::bind("198.51.100.1:40000").unwrap();
    sock.set_nonblocking(true).unwrap();

    // Kernel to DPDK: raw frames, odd sizes included.
    let mut rx = RxBatch::new();
    for len in [60usize, 61, 333, 1514] {
        let mut frame = vec![0u8; len];
        frame[..6].copy_from_slice(&port.mac());
        frame[6..12].copy_from_slice(&kernel_mac);
        frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        for (i, b) in frame[14..].iter_mut().enumerate() {
            *b = u8::try_from(i % 251).unwrap_or(0);
        }
        send_raw("vk0", &frame);
        let deadline = Instant::now() + STEP;
        let got = loop {
            port.rx_burst(&mut rx);
            if let Some(f) = rx.iter().find(|f| f.data[12..14] == [0x88, 0xb5]) {
                break f.data.to_vec();
            }
            assert!(
                Instant::now() < deadline,
                "raw frame of {len} bytes not received"
            );
            std::thread::sleep(Duration::from_micros(50));
        };
        assert_eq!(got, frame);
    }
    rx.clear();

    // DPDK to kernel: a UDP frame built in place in an mbuf.
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(port.mac(), kernel_mac)
        .ipv4([198, 51, 100, 2], [198, 51, 100, 1], 64)
        .udp(51820, 40000)
        .write(&mut frame, b"staged by hand")
        .unwrap();
    let mut tx = port.tx_batch();
    for _ in 0..BURST {
        port.stage(&mut tx, u16::try_from(frame.len()).unwrap())
            .unwrap()
            .copy_from_slice(&frame);
    }
    assert_eq!(
        port.stage(&mut tx, 60).unwrap_err(),
        nsm_dpdk::StageError::BatchFull
    );
    assert_eq!(
        port.stage(&mut port.tx_batch(), 9000).unwrap_err(),
        nsm_dpdk::StageError::TooLong
    );
    let mut sent = 0;
    while !tx.is_empty() {
        sent += port.tx_burst(&mut tx);
    }
    assert_eq!(sent, BURST);
    let got = kernel_recv(&sock, BURST, STEP, || {});
    assert_eq!(got.len(), BURST);
    for (src, payload) in got {
        assert_eq!(src, "198.51.100.2:51820".parse().unwrap());
        assert_eq!(payload, b"staged by hand");
    }
    let stats = port.stats().unwrap();
    assert!(
        stats.opackets >= BURST as u64 && stats.ipackets >= 4,
        "{stats:?}"
    );
}
