//! Root integration tests: real `nsm-forwarder` processes in node
//! namespaces, programmed over gRPC the way nsm-manager does, carrying
//! real traffic between pod namespaces.

#![forbid(unsafe_code)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use nsm_proto::forwarder::v1 as pb;

const WAIT: Duration = Duration::from_secs(10);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket addr")
}

/// Pod A (node A) <-> pod B (node B) over WireGuard: IPv4 and IPv6 ping,
/// TCP and UDP both ways, and the underlay sees only WireGuard.
#[test]
fn cross_node_traffic_is_wireguard_only_on_the_wire() {
    require_root();
    let (na, nb) = two_nodes();
    let (pa, pb_) = (Netns::new(), Netns::new());
    let fa = Forwarder::start(&na, "node-a", "192.0.2.1", &[]);
    let fb = Forwarder::start(&nb, "node-b", "192.0.2.2", &[]);
    let rt = current_thread_rt();
    rt.block_on(async {
        let (mut ca, mut cb) = (fa.client().await, fb.client().await);
        let info = ca
            .info(pb::InfoRequest {})
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info.underlay_ip, "192.0.2.1");
        assert_eq!(info.wireguard_port, 51820);
        assert_eq!(info.underlay_mtu, 1500, "detected from eth0");
        let (sa_, sb) = connect_pair(
            &mut ca,
            &mut cb,
            "conn-1",
            kernel(
                &pa,
                "nsm-1",
                &["198.51.100.1/32", "2001:db8:1::1/128"],
                &["198.51.100.2/32", "2001:db8:1::2/128"],
            ),
            kernel(
                &pb_,
                "nsm-1",
                &["198.51.100.2/32", "2001:db8:1::2/128"],
                &["198.51.100.1/32", "2001:db8:1::1/128"],
            ),
        )
        .await;
        assert_eq!(sa_.mtu, 1440, "1500 - 60 for an IPv4 underlay");
        assert_eq!(sb.mtu, 1440);
        assert_eq!(sa_.underlay_ip, "192.0.2.1");
        assert_eq!(sa_.wireguard_port, 51820);
    });
    assert!(pa.has_link("nsm-1") && pb_.has_link("nsm-1"));
    assert!(pa.ip(&["link", "show", "nsm-1"]).contains("mtu 1440"));

    let cap = Capture::start(&na, "eth0");
    assert!(
        pa.ping(ip("198.51.100.2"), WAIT),
        "IPv4 ping A -> B\n{}",
        fa.log_text()
    );
    assert!(pb_.ping(ip("198.51.100.1"), WAIT), "IPv4 ping B -> A");
    assert!(pa.ping(ip("2001:db8:1::2"), WAIT), "IPv6 ping A -> B");
    assert!(pb_.ping(ip("2001:db8:1::1"), WAIT), "IPv6 ping B -> A");

    // TCP: 1 MiB of a recognisable pattern from A to B, echoed back.
    const MARK: &[u8] = b"nsm-plaintext-marker-";
    let listener = pb_.tcp_listen(sa("198.51.100.2:7000"));
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0; 1 << 20];
        s.read_exact(&mut buf).expect("server read");
        s.write_all(&buf).expect("server write");
    });
    let mut c = pa.tcp_connect(sa("198.51.100.2:7000"));
    c.set_read_timeout(Some(WAIT)).expect("timeout");
    let data: Vec<u8> = MARK.iter().copied().cycle().take(1 << 20).collect();
    c.write_all(&data).expect("client write");
    let mut back = vec![0; data.len()];
    c.read_exact(&mut back).expect("client read");
    assert!(back == data, "TCP echo over IPv4 came back intact");
    server.join().expect("server");

    // TCP over IPv6 too (the offload paths differ per family).
    let listener = pb_.tcp_listen(sa("[2001:db8:1::2]:7002"));
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0; 1 << 20];
        s.read_exact(&mut buf).expect("server read");
        s.write_all(&buf).expect("server write");
    });
    let mut c = pa.tcp_connect(sa("[2001:db8:1::2]:7002"));
    c.set_read_timeout(Some(WAIT)).expect("timeout");
    c.write_all(&data).expect("client write");
    let mut back = vec![0; data.len()];
    c.read_exact(&mut back).expect("client read");
    assert!(back == data, "TCP echo over IPv6 came back intact");
    server.join().expect("server");

    // UDP over IPv6, both ways.
    let ub = pb_.udp(sa("[2001:db8:1::2]:7001"));
    let ua = pa.udp(sa("[2001:db8:1::1]:7001"));
    ua.send_to(b"nsm-plaintext-marker-udp", sa("[2001:db8:1::2]:7001"))
        .expect("send");
    let mut buf = [0u8; 64];
    let (n, from) = ub.recv_from(&mut buf).expect("UDP A -> B");
    assert_eq!(&buf[..n], b"nsm-plaintext-marker-udp");
    assert_eq!(from, sa("[2001:db8:1::1]:7001"));
    ub.send_to(b"reply", from).expect("send back");
    let (n, _) = ua.recv_from(&mut buf).expect("UDP B -> A");
    assert_eq!(&buf[..n], b"reply");

    let frames = cap.finish();
    let mut wg_data = 0;
    let mut wg_handshake = 0;
    for f in &frames {
        assert!(
            !f.windows(MARK.len()).any(|w| w == MARK),
            "pod plaintext seen on the underlay"
        );
        let ethertype = u16::from_be_bytes([f[12], f[13]]);
        match ethertype {
            0x0806 => {} // ARP between the nodes
            0x0800 => {
                let ihl = usize::from(f[14] & 0x0f) * 4;
                assert_eq!(f[14 + 9], 17, "only UDP crosses the IPv4 underlay");
                let udp = &f[14 + ihl..];
                let sport = u16::from_be_bytes([udp[0], udp[1]]);
                let dport = u16::from_be_bytes([udp[2], udp[3]]);
                assert!(sport == 51820 && dport == 51820, "UDP {sport} -> {dport}");
                let payload = &udp[8..];
                assert!(
                    (1..=4).contains(&payload[0]) && payload[1..4] == [0, 0, 0],
                    "payload is a WireGuard message"
                );
                if payload[0] == 4 {
                    // With UDP GSO a captured frame may hold a whole run
                    // of data messages: count bytes, not frames.
                    wg_data += payload.len();
                } else {
                    wg_handshake += 1;
                }
            }
            0x86dd => {
                // Only the veth's own link-local ND/MLD (MLD reports come
                // behind a hop-by-hop header): never the pods'.
                assert!(
                    matches!(f[14 + 6], 0 | 58),
                    "IPv6 on the underlay is ICMPv6 of the link"
                );
                let src = &f[14 + 8..14 + 24];
                assert!(
                    src[0] == 0xfe || src.iter().all(|b| *b == 0),
                    "link-local or unspecified source"
                );
            }
            other => panic!("unexpected ethertype {other:#06x} on the underlay"),
        }
    }
    assert!(
        wg_data > 4 << 20,
        "the 4 MiB of TCP went as WireGuard data ({wg_data} bytes)"
    );
    let _ = wg_handshake;

    // Counters and state after traffic.
    rt.block_on(async {
        let mut ca = fa.client().await;
        let list = ca
            .list(pb::ListRequest {})
            .await
            .expect("list")
            .into_inner();
        let st = &list.cross_connects[0];
        assert_eq!(
            st.state,
            pb::cross_connect_status::State::Up as i32,
            "{st:?}"
        );
        let c = st.counters.as_ref().expect("counters");
        assert!(c.rx_packets > 100 && c.tx_packets > 100, "{c:?}");
        assert!(c.last_handshake_unix_ms > 0);
    });
}

/// Two pods on the same node: no encryption, and Remove deletes both
/// interfaces.
#[test]
fn same_node_cross_connect_and_remove() {
    require_root();
    let node = one_node();
    let (p1, p2) = (Netns::new(), Netns::new());
    let fw = Forwarder::start(&node, "node", "192.0.2.1", &["--underlay-mtu", "9000"]);
    let rt = current_thread_rt();
    rt.block_on(async {
        let mut c = fw.client().await;
        let st = c
            .program(pb::CrossConnect {
                id: "local".into(),
                source: Some(kernel(
                    &p1,
                    "nsm-a",
                    &["203.0.113.1/24", "2001:db8:2::1/64"],
                    &[],
                )),
                destination: Some(kernel(
                    &p2,
                    "nsm-b",
                    &["203.0.113.2/24", "2001:db8:2::2/64"],
                    &[],
                )),
                chain: None,
            })
            .await
            .expect("program")
            .into_inner();
        assert_eq!(st.state, pb::cross_connect_status::State::Up as i32);
        assert!(
            st.wireguard_public_key.is_empty(),
            "no key without a wireguard side"
        );
        assert_eq!(st.mtu, 8940, "9000 - 60");
    });
    assert!(p1.ping(ip("203.0.113.2"), WAIT), "{}", fw.log_text());
    assert!(p2.ping(ip("2001:db8:2::1"), WAIT));
    let l = p2.tcp_listen(sa("203.0.113.2:7000"));
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut b = [0u8; 5];
        s.read_exact(&mut b).expect("read");
        b
    });
    p1.tcp_connect(sa("203.0.113.2:7000"))
        .write_all(b"hello")
        .expect("write");
    assert_eq!(&t.join().expect("server"), b"hello");

    rt.block_on(async {
        let mut c = fw.client().await;
        c.remove(pb::RemoveRequest { id: "local".into() })
            .await
            .expect("remove");
        c.remove(pb::RemoveRequest { id: "local".into() })
            .await
            .expect("removing an unknown id succeeds");
        let list = c.list(pb::ListRequest {}).await.expect("list").into_inner();
        assert!(list.cross_connects.is_empty());
    });
    assert!(!p1.has_link("nsm-a"), "Remove deleted the interface");
    assert!(!p2.has_link("nsm-b"));
}

/// Many Removes at once (the forwarder deletes their devices outside its
/// registry lock, so the kernel's waits overlap): each Remove, and a second
/// Remove of an id already being removed, returns only once its interfaces
/// are gone; the same names can be programmed again at once and carry
/// traffic.
#[test]
fn removes_at_once_return_with_their_devices_gone() {
    require_root();
    let node = one_node();
    let (p1, p2) = (Netns::new(), Netns::new());
    let fw = Forwarder::start(&node, "node", "192.0.2.1", &[]);
    const N: usize = 16;
    let program = |c: &mut pb::forwarder_client::ForwarderClient<tonic::transport::Channel>,
                   i: usize| {
        let req = same_node(&p1, &p2, &format!("many-{i}"), &format!("nsm-{i}"), i);
        let mut c = c.clone();
        async move {
            let st = c.program(req).await.expect("program").into_inner();
            assert_eq!(st.state, pb::cross_connect_status::State::Up as i32);
        }
    };
    let rt = current_thread_rt();
    rt.block_on(async {
        let mut c = fw.client().await;
        for i in 0..N {
            program(&mut c, i).await;
        }
        // Every Remove at once, and each id twice: whichever of the two
        // returns first, the interfaces must be gone by then.
        let removes = (0..2 * N).map(|k| {
            let (mut c, i) = (c.clone(), k % N);
            let (p1, p2) = (&p1, &p2);
            async move {
                c.remove(pb::RemoveRequest {
                    id: format!("many-{i}"),
                })
                .await
                .expect("remove");
                let name = format!("nsm-{i}");
                assert!(
                    !p1.has_link(&name) && !p2.has_link(&name),
                    "{name} still exists after a Remove of many-{i} returned"
                );
            }
        });
        futures_util::future::join_all(removes).await;
        let list = c.list(pb::ListRequest {}).await.expect("list").into_inner();
        assert!(list.cross_connects.is_empty());
        // The names are free again.
        for i in 0..N {
            program(&mut c, i).await;
        }
        // A Program of the same names sent while their Remove is deleting
        // the devices waits for that instead of finding the names taken
        // (or, sent first, is a repeat the Remove then undoes).
        let churn = (0..N).map(|i| {
            let (mut r, mut p) = (c.clone(), c.clone());
            let again = program(&mut p, i);
            async move {
                let remove = r.remove(pb::RemoveRequest {
                    id: format!("many-{i}"),
                });
                let again = async {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    again.await;
                };
                let (removed, ()) = tokio::join!(remove, again);
                removed.expect("remove");
            }
        });
        futures_util::future::join_all(churn).await;
        // Whatever the order was, every id can be programmed and used.
        for i in 0..N {
            program(&mut c, i).await;
        }
    });
    assert!(p1.ping(ip("203.0.113.16"), WAIT), "{}", fw.log_text());
}

/// Programs at once (their devices are made with the registry let go):
/// each succeeds and carries traffic; of two ids asking for one interface
/// name at the same moment exactly one gets it, the other AlreadyExists,
/// and nothing of the loser is left.
#[test]
fn programs_at_once_and_a_contested_name() {
    require_root();
    let node = one_node();
    let (p1, p2) = (Netns::new(), Netns::new());
    let fw = Forwarder::start(&node, "node", "192.0.2.1", &[]);
    const N: usize = 12;
    let req = |id: &str, name: &str, i: usize| same_node(&p1, &p2, id, name, i);
    current_thread_rt().block_on(async {
        let c = fw.client().await;
        let all = (0..N).map(|i| {
            let (mut c, r) = (c.clone(), req(&format!("many-{i}"), &format!("nsm-{i}"), i));
            async move { c.program(r).await.map(|s| s.into_inner().state) }
        });
        for r in futures_util::future::join_all(all).await {
            assert_eq!(
                r.expect("program"),
                pb::cross_connect_status::State::Up as i32
            );
        }
        let contest = ["first", "second"].map(|id| {
            let (mut c, r) = (c.clone(), req(id, "nsm-contested", N));
            async move { c.program(r).await }
        });
        let [a, b] = contest;
        let (a, b) = tokio::join!(a, b);
        let lost = match (&a, &b) {
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => e,
            _ => panic!("exactly one may win: {a:?} / {b:?}"),
        };
        assert_eq!(lost.code(), tonic::Code::AlreadyExists, "{lost}");
        let mut c = c.clone();
        let list = c.list(pb::ListRequest {}).await.expect("list").into_inner();
        assert_eq!(list.cross_connects.len(), N + 1);

        // Callers that give up halfway (the call dropped after a fraction
        // of a millisecond) leave no name reserved: once their ids are
        // removed, the name can be had again.
        for k in 0..10u64 {
            let call = c.program(req(&format!("gave-up-{k}"), "nsm-again", N + 1));
            let _ = tokio::time::timeout(Duration::from_micros(100 * k), call).await;
        }
        for k in 0..10 {
            c.remove(pb::RemoveRequest {
                id: format!("gave-up-{k}"),
            })
            .await
            .expect("remove");
        }
        let st = c
            .program(req("again", "nsm-again", N + 1))
            .await
            .expect("the name is free again")
            .into_inner();
        assert_eq!(st.state, pb::cross_connect_status::State::Up as i32);
    });
    for i in 0..N {
        assert!(
            p1.ping(ip(&format!("203.0.113.{}", i + 1)), WAIT),
            "{}",
            fw.log_text()
        );
    }
    assert!(p1.has_link("nsm-contested") && p2.has_link("nsm-contested"));
}

/// Refusals carry the right code and a useful message, and leave nothing
/// behind; the same Program twice gives the same result.
#[test]
fn bad_requests_and_idempotence() {
    require_root();
    let node = one_node();
    let (p1, p2) = (Netns::new(), Netns::new());
    let fw = Forwarder::start(&node, "node", "192.0.2.1", &[]);
    let rt = current_thread_rt();
    rt.block_on(async {
        let mut c = fw.client().await;
        let good = pb::CrossConnect {
            id: "x1".into(),
            source: Some(kernel(
                &p1,
                "nsm-0",
                &["198.51.100.1/32"],
                &["198.51.100.2/32"],
            )),
            destination: Some(wireguard("192.0.2.2", "")),
            chain: None,
        };
        let s1 = c.program(good.clone()).await.expect("program").into_inner();
        assert_eq!(s1.state, pb::cross_connect_status::State::Pending as i32);
        let idx1 = p1.ip(&["-o", "link", "show", "nsm-0"]);
        let s2 = c
            .program(good.clone())
            .await
            .expect("program again")
            .into_inner();
        assert_eq!(s1, s2, "same request, same result");
        assert_eq!(
            idx1,
            p1.ip(&["-o", "link", "show", "nsm-0"]),
            "same interface"
        );
        // The alias marks it as ours.
        assert!(
            p1.ip(&["link", "show", "nsm-0"])
                .contains("alias nsm-rs:x1")
        );

        let before1 = p1.links();
        let before2 = p2.links();
        let mut cases: Vec<(pb::CrossConnect, tonic::Code, &str)> = Vec::new();
        let mut bad = |f: &dyn Fn(&mut pb::CrossConnect), code, needle| {
            let mut r = pb::CrossConnect {
                id: "bad".into(),
                source: Some(kernel(&p2, "nsm-9", &["198.51.100.9/32"], &[])),
                destination: Some(wireguard("192.0.2.2", "")),
                chain: None,
            };
            f(&mut r);
            cases.push((r, code, needle));
        };
        let set_kernel = |r: &mut pb::CrossConnect, g: &dyn Fn(&mut pb::KernelInterface)| {
            if let Some(pb::side::Kind::Kernel(k)) = r.source.as_mut().and_then(|s| s.kind.as_mut())
            {
                g(k);
            }
        };
        bad(
            &|r| {
                set_kernel(r, &|k| {
                    k.netns_path = "/run/netns/nsmfw-does-not-exist".into()
                })
            },
            tonic::Code::NotFound,
            "netns_path",
        );
        bad(
            &|r| set_kernel(r, &|k| k.name = "sixteen-chars-xx".into()),
            tonic::Code::InvalidArgument,
            "15",
        );
        bad(
            &|r| set_kernel(r, &|k| k.name = "a/b".into()),
            tonic::Code::InvalidArgument,
            "'/'",
        );
        bad(
            &|r| set_kernel(r, &|k| k.addresses = vec!["198.51.100.300/24".into()]),
            tonic::Code::InvalidArgument,
            "CIDR",
        );
        bad(
            &|r| r.destination = Some(wireguard("192.0.2.2", "not-base64!")),
            tonic::Code::InvalidArgument,
            "peer_public_key",
        );
        bad(
            &|r| r.destination = Some(wireguard("192.0.2.2", "AAAA")),
            tonic::Code::InvalidArgument,
            "32",
        );
        // Same name in the same netns as x1's interface.
        bad(
            &|r| {
                set_kernel(r, &|k| {
                    k.netns_path = format!("/run/netns/{}", p1.name);
                    k.name = "nsm-0".into();
                })
            },
            tonic::Code::AlreadyExists,
            "x1",
        );
        // A next hop of the other family than its prefix.
        bad(
            &|r| {
                set_kernel(r, &|k| {
                    k.routes = vec![pb::Route {
                        prefix: "203.0.113.0/24".into(),
                        next_hop: "2001:db8::1".into(),
                    }]
                })
            },
            tonic::Code::InvalidArgument,
            "families",
        );
        for (req, code, needle) in cases {
            let e = c.program(req.clone()).await.expect_err("refused");
            assert_eq!(e.code(), code, "{req:?}: {e:?}");
            assert!(
                e.message().contains(needle),
                "{:?} should mention {needle}",
                e.message()
            );
        }
        // A failure in the kernel, after the device was made: an
        // unreachable gateway makes the route add fail.
        let e = c
            .program(pb::CrossConnect {
                id: "late-fail".into(),
                source: Some(pb::Side {
                    kind: Some(pb::side::Kind::Kernel(pb::KernelInterface {
                        netns_path: p2.path(),
                        name: "nsm-late".into(),
                        addresses: vec!["198.51.100.9/32".into()],
                        routes: vec![pb::Route {
                            prefix: "203.0.113.0/24".into(),
                            next_hop: "192.0.2.99".into(),
                        }],
                        ..Default::default()
                    })),
                }),
                destination: Some(wireguard("192.0.2.2", "")),
                chain: None,
            })
            .await
            .expect_err("refused by the kernel");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("route"), "{}", e.message());

        assert_eq!(p1.links(), before1, "nothing left in pod 1");
        assert_eq!(p2.links(), before2, "nothing left in pod 2");
        let list = c.list(pb::ListRequest {}).await.expect("list").into_inner();
        assert_eq!(list.cross_connects.len(), 1, "only x1");
    });
}

/// The Watch stream: snapshot first, then updates and deletes.
#[test]
fn watch_reports_snapshot_updates_and_deletes() {
    require_root();
    let node = one_node();
    let p1 = Netns::new();
    let fw = Forwarder::start(&node, "node", "192.0.2.1", &[]);
    current_thread_rt().block_on(async {
        let mut c = fw.client().await;
        let mut w = c
            .watch(pb::WatchRequest {
                counters_interval_ms: 200,
            })
            .await
            .expect("watch")
            .into_inner();
        let first = w.message().await.expect("stream").expect("event");
        assert_eq!(first.r#type, pb::cross_connect_event::Type::Snapshot as i32);
        assert!(first.cross_connects.is_empty());
        c.program(pb::CrossConnect {
            id: "w1".into(),
            source: Some(kernel(&p1, "nsm-w", &["198.51.100.1/32"], &[])),
            destination: Some(wireguard("192.0.2.2", "")),
            chain: None,
        })
        .await
        .expect("program");
        let ev = w.message().await.expect("stream").expect("event");
        assert_eq!(ev.r#type, pb::cross_connect_event::Type::Update as i32);
        assert_eq!(ev.cross_connects[0].id, "w1");
        // A periodic counters update follows.
        let ev = tokio::time::timeout(Duration::from_secs(2), w.message())
            .await
            .expect("periodic update")
            .expect("stream")
            .expect("event");
        assert_eq!(ev.r#type, pb::cross_connect_event::Type::Update as i32);
        c.remove(pb::RemoveRequest { id: "w1".into() })
            .await
            .expect("remove");
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let ev = w.message().await.expect("stream").expect("event");
            if ev.r#type == pb::cross_connect_event::Type::Delete as i32 {
                assert_eq!(ev.cross_connects[0].id, "w1");
                break;
            }
            assert!(Instant::now() < deadline, "no DELETE event");
        }
    });
}

/// SIGTERM removes every interface; so does SIGKILL (the kernel deletes
/// non-persistent TUN/TAP devices with their last fd), and a restarted
/// forwarder comes up empty.
#[test]
fn interfaces_die_with_the_forwarder() {
    require_root();
    let node = one_node();
    let (p1, p2) = (Netns::new(), Netns::new());
    let program = |fw: &Forwarder, id: &str, name: &str| {
        current_thread_rt().block_on(async {
            let mut c = fw.client().await;
            c.program(pb::CrossConnect {
                id: id.into(),
                source: Some(kernel(&p1, name, &["198.51.100.1/32"], &[])),
                destination: Some(kernel(&p2, name, &["198.51.100.2/32"], &[])),
                chain: None,
            })
            .await
            .expect("program");
        })
    };
    let mut fw = Forwarder::start(&node, "node", "192.0.2.1", &[]);
    program(&fw, "t1", "nsm-t");
    assert!(p1.has_link("nsm-t") && p2.has_link("nsm-t"));
    assert!(
        fw.terminate().success(),
        "clean exit on SIGTERM: {}",
        fw.log_text()
    );
    assert!(
        !p1.has_link("nsm-t") && !p2.has_link("nsm-t"),
        "SIGTERM removed them"
    );

    let mut fw = Forwarder::start(&node, "node", "192.0.2.1", &[]);
    program(&fw, "t2", "nsm-k");
    assert!(p1.has_link("nsm-k"));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(fw.pid()).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = fw.terminate();
    let deadline = Instant::now() + Duration::from_secs(5);
    while p1.has_link("nsm-k") || p2.has_link("nsm-k") {
        assert!(
            Instant::now() < deadline,
            "devices outlived a killed forwarder"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let fw = Forwarder::start(&node, "node", "192.0.2.1", &[]);
    current_thread_rt().block_on(async {
        let mut c = fw.client().await;
        let list = c.list(pb::ListRequest {}).await.expect("list").into_inner();
        assert!(
            list.cross_connects.is_empty(),
            "a restarted forwarder is empty"
        );
    });
}

/// 100 connections between the same two nodes at once, two of them with
/// the same pod addresses (in different pods): each packet reaches only
/// its own connection's pod.
#[test]
fn hundred_connections_without_crosstalk() {
    require_root();
    let start = Instant::now();
    let (na, nb) = two_nodes();
    // 98 connections between one pod pair; the two overlapping ones each
    // get a pod pair of their own.
    let (pa, pb_) = (Netns::new(), Netns::new());
    let (pc, pd) = (Netns::new(), Netns::new());
    let (pe, pf) = (Netns::new(), Netns::new());
    let fa = Forwarder::start(&na, "node-a", "192.0.2.1", &[]);
    let fb = Forwarder::start(&nb, "node-b", "192.0.2.2", &[]);
    const N: usize = 98;
    current_thread_rt().block_on(async {
        let (mut ca, mut cb) = (fa.client().await, fb.client().await);
        for i in 0..N {
            let (a4, b4) = (
                format!("198.51.100.{}", i + 1),
                format!("203.0.113.{}", i + 1),
            );
            connect_pair(
                &mut ca,
                &mut cb,
                &format!("many-{i}"),
                kernel(
                    &pa,
                    &format!("nsm-{i}"),
                    &[&format!("{a4}/32")],
                    &[&format!("{b4}/32")],
                ),
                kernel(
                    &pb_,
                    &format!("nsm-{i}"),
                    &[&format!("{b4}/32")],
                    &[&format!("{a4}/32")],
                ),
            )
            .await;
        }
        for (id, a, b) in [("dup-1", &pc, &pd), ("dup-2", &pe, &pf)] {
            connect_pair(
                &mut ca,
                &mut cb,
                id,
                kernel(a, "nsm-dup", &["198.51.100.250/32"], &["203.0.113.250/32"]),
                kernel(b, "nsm-dup", &["203.0.113.250/32"], &["198.51.100.250/32"]),
            )
            .await;
        }
        let list = ca
            .list(pb::ListRequest {})
            .await
            .expect("list")
            .into_inner();
        assert_eq!(list.cross_connects.len(), N + 2);
    });
    eprintln!("programmed {} connections in {:?}", N + 2, start.elapsed());

    // One datagram per connection, each to its own socket.
    let receivers: Vec<_> = (0..N)
        .map(|i| pb_.udp(sa(&format!("203.0.113.{}:9000", i + 1))))
        .collect();
    let senders: Vec<_> = (0..N)
        .map(|i| pa.udp(sa(&format!("198.51.100.{}:9000", i + 1))))
        .collect();
    let rd = pd.udp(sa("203.0.113.250:9000"));
    let rf = pf.udp(sa("203.0.113.250:9000"));
    let sc = pc.udp(sa("198.51.100.250:9000"));
    let se = pe.udp(sa("198.51.100.250:9000"));
    // The first packet of each session waits for its handshake; resend
    // until everything arrived.
    let mut got = [false; N];
    let (mut got_d, mut got_f) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 64];
    while !(got.iter().all(|g| *g) && got_d && got_f) {
        assert!(
            Instant::now() < deadline,
            "missing: {:?}",
            got.iter().filter(|g| !**g).count()
        );
        for i in 0..N {
            if !got[i] {
                let _ = senders[i].send_to(
                    format!("conn-{i}").as_bytes(),
                    sa(&format!("203.0.113.{}:9000", i + 1)),
                );
            }
        }
        let _ = sc.send_to(b"from-c", sa("203.0.113.250:9000"));
        let _ = se.send_to(b"from-e", sa("203.0.113.250:9000"));
        std::thread::sleep(Duration::from_millis(200));
        for (i, r) in receivers.iter().enumerate() {
            r.set_nonblocking(true).expect("nonblocking");
            while let Ok((n, from)) = r.recv_from(&mut buf) {
                assert_eq!(
                    &buf[..n],
                    format!("conn-{i}").as_bytes(),
                    "delivered to the wrong connection"
                );
                assert_eq!(from, sa(&format!("198.51.100.{}:9000", i + 1)));
                got[i] = true;
            }
        }
        for (r, want, flag) in [(&rd, b"from-c", &mut got_d), (&rf, b"from-e", &mut got_f)] {
            r.set_nonblocking(true).expect("nonblocking");
            while let Ok((n, _)) = r.recv_from(&mut buf) {
                assert_eq!(&buf[..n], want, "overlapping connections crossed");
                *flag = true;
            }
        }
    }
    eprintln!(
        "all {} connections carried traffic after {:?}",
        N + 2,
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
}

/// A TAP (Ethernet payload) cross-connect on one node: the data plane
/// answers ARP/ND for the peer, and IP crosses.
#[test]
fn same_node_ethernet_payload() {
    require_root();
    let node = one_node();
    let (p1, p2) = (Netns::new(), Netns::new());
    let fw = Forwarder::start(&node, "node", "192.0.2.1", &[]);
    let tap = |pod: &Netns, name: &str, addrs: &[&str], mac: &str| pb::Side {
        kind: Some(pb::side::Kind::Kernel(pb::KernelInterface {
            netns_path: pod.path(),
            name: name.into(),
            payload: pb::Payload::Ethernet as i32,
            addresses: addrs.iter().map(|s| s.to_string()).collect(),
            mac: mac.into(),
            ..Default::default()
        })),
    };
    current_thread_rt().block_on(async {
        let mut c = fw.client().await;
        c.program(pb::CrossConnect {
            id: "eth".into(),
            source: Some(tap(
                &p1,
                "nsm-e",
                &["203.0.113.1/24", "2001:db8:3::1/64"],
                "02:fe:00:00:00:01",
            )),
            destination: Some(tap(
                &p2,
                "nsm-e",
                &["203.0.113.2/24", "2001:db8:3::2/64"],
                "02:fe:00:00:00:02",
            )),
            chain: None,
        })
        .await
        .expect("program");
    });
    let link = p1.ip(&["link", "show", "nsm-e"]);
    assert!(link.contains("link/ether 02:fe:00:00:00:01"), "{link}");
    assert!(
        p1.ping(ip("203.0.113.2"), WAIT),
        "IPv4 over TAP: {}",
        fw.log_text()
    );
    assert!(p2.ping(ip("2001:db8:3::1"), WAIT), "IPv6 over TAP");
}

/// A pod namespace deleted under a live cross-connect: the device dies,
/// the connection reports DOWN, and Remove still succeeds.
#[test]
fn pod_namespace_or_interface_gone_reports_down() {
    require_root();
    let node = one_node();
    let p1 = Netns::new();
    let p2 = Netns::new();
    let fw = Forwarder::start(&node, "node", "192.0.2.1", &[]);
    let rt = current_thread_rt();
    rt.block_on(async {
        let mut c = fw.client().await;
        c.program(pb::CrossConnect {
            id: "gone".into(),
            source: Some(kernel(&p1, "nsm-g", &["198.51.100.1/24"], &[])),
            destination: Some(kernel(&p2, "nsm-g", &["198.51.100.2/24"], &[])),
            chain: None,
        })
        .await
        .expect("program");
    });
    drop(p2);
    let deadline = Instant::now() + WAIT;
    rt.block_on(async {
        let mut c = fw.client().await;
        loop {
            // Traffic towards the dead side makes the worker notice.
            let _ = p1.ping(ip("198.51.100.2"), Duration::from_millis(10));
            let l = c.list(pb::ListRequest {}).await.expect("list").into_inner();
            if l.cross_connects[0].state == pb::cross_connect_status::State::Down as i32 {
                assert!(!l.cross_connects[0].error.is_empty());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "never reported DOWN: {:?}",
                l.cross_connects[0]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c.remove(pb::RemoveRequest { id: "gone".into() })
            .await
            .expect("remove");
    });
    assert!(!p1.has_link("nsm-g"));

    // An interface deleted from inside the pod: the worker sees its fd
    // fail, stops polling it (no busy loop), and reports DOWN.
    let p3 = Netns::new();
    rt.block_on(async {
        let mut c = fw.client().await;
        c.program(pb::CrossConnect {
            id: "deleted".into(),
            source: Some(kernel(&p1, "nsm-d", &["198.51.100.1/24"], &[])),
            destination: Some(kernel(&p3, "nsm-d", &["198.51.100.2/24"], &[])),
            chain: None,
        })
        .await
        .expect("program");
    });
    p3.ip(&["link", "del", "nsm-d"]);
    let deadline = Instant::now() + WAIT;
    rt.block_on(async {
        let mut c = fw.client().await;
        loop {
            let _ = p1.ping(ip("198.51.100.2"), Duration::from_millis(10));
            let l = c.list(pb::ListRequest {}).await.expect("list").into_inner();
            if l.cross_connects[0].state == pb::cross_connect_status::State::Down as i32 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "never reported DOWN: {:?}\n{}",
                l.cross_connects[0],
                fw.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c.remove(pb::RemoveRequest {
            id: "deleted".into(),
        })
        .await
        .expect("remove");
    });
    assert!(!p1.has_link("nsm-d"));
}

/// An IPv6 underlay: WireGuard over IPv6 between the nodes, and the pod
/// MTU derived with the 80-byte overhead.
#[test]
fn ipv6_underlay() {
    require_root();
    let (na, nb) = two_nodes_v6();
    let (pa, pb_) = (Netns::new(), Netns::new());
    let fa = Forwarder::start(&na, "node-a", "2001:db8:ffff::1", &[]);
    let fb = Forwarder::start(&nb, "node-b", "2001:db8:ffff::2", &[]);
    current_thread_rt().block_on(async {
        let (mut ca, mut cb) = (fa.client().await, fb.client().await);
        let (sa_, _) = connect_pair_via(
            &mut ca,
            &mut cb,
            ("2001:db8:ffff::1", "2001:db8:ffff::2"),
            "v6",
            kernel(&pa, "nsm-1", &["198.51.100.1/32"], &["198.51.100.2/32"]),
            kernel(&pb_, "nsm-1", &["198.51.100.2/32"], &["198.51.100.1/32"]),
        )
        .await;
        assert_eq!(sa_.mtu, 1420, "1500 - 80 for an IPv6 underlay");
        assert_eq!(sa_.underlay_ip, "2001:db8:ffff::1");
        // With no periodic counters, the handshake completing still shows
        // as an UPDATE to UP (unless it was already UP when we looked).
        let mut w = ca
            .watch(pb::WatchRequest {
                counters_interval_ms: 0,
            })
            .await
            .expect("watch")
            .into_inner();
        let snap = w.message().await.expect("stream").expect("snapshot");
        let up = pb::cross_connect_status::State::Up as i32;
        if snap.cross_connects[0].state != up {
            let ev = tokio::time::timeout(Duration::from_secs(8), w.message())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no UPDATE when the session comes up\nA: {}\nB: {}",
                        fa.log_text(),
                        fb.log_text()
                    )
                })
                .expect("stream")
                .expect("event");
            assert_eq!(ev.r#type, pb::cross_connect_event::Type::Update as i32);
            assert_eq!(ev.cross_connects[0].state, up, "{ev:?}");
        }
    });
    assert!(pa.ping(ip("198.51.100.2"), WAIT), "{}", fa.log_text());
    let l = pb_.tcp_listen(sa("198.51.100.2:7000"));
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut b = vec![0u8; 256 << 10];
        s.read_exact(&mut b).expect("read");
        b
    });
    let data: Vec<u8> = (0..256u32 << 10).map(|i| (i % 253) as u8).collect();
    pa.tcp_connect(sa("198.51.100.2:7000"))
        .write_all(&data)
        .expect("write");
    assert!(t.join().expect("server") == data);
}

/// `--workers 3`: connections spread over the packet threads, one per
/// thread while they are equally loaded, each reached on its own port
/// (51820 + k) by the peer; traffic crosses on all of them at once, and
/// a new connection fills the thread a removed one left.
#[test]
fn connections_spread_over_workers() {
    require_root();
    let (na, nb) = two_nodes();
    let (pa, pb_) = (Netns::new(), Netns::new());
    let fa = Forwarder::start(&na, "node-a", "192.0.2.1", &["--workers", "3"]);
    let fb = Forwarder::start(&nb, "node-b", "192.0.2.2", &["--workers", "3"]);
    let threads = |pid: u32| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("tasks")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|c| c.trim().to_string())
            .filter(|c| c.starts_with("nsm-packet"))
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        threads(fa.pid()),
        ["nsm-packet-0", "nsm-packet-1", "nsm-packet-2"],
        "one named packet thread per worker"
    );
    // Connection i: pod addresses 198.51.100.(10+i) <-> 203.0.113.(10+i).
    let side = |pod: &Netns, i: usize, here: &str, there: &str| {
        kernel(
            pod,
            &format!("nsm-{i}"),
            &[&format!("{here}.{}/32", 10 + i)],
            &[&format!("{there}.{}/32", 10 + i)],
        )
    };
    let rt = current_thread_rt();
    let connect = |i: usize| -> (u32, u32) {
        rt.block_on(async {
            let (mut ca, mut cb) = (fa.client().await, fb.client().await);
            let (a, b) = connect_pair(
                &mut ca,
                &mut cb,
                &format!("w{i}"),
                side(&pa, i, "198.51.100", "203.0.113"),
                side(&pb_, i, "203.0.113", "198.51.100"),
            )
            .await;
            (a.wireguard_port, b.wireguard_port)
        })
    };
    let ports: Vec<(u32, u32)> = (0..3).map(connect).collect();
    assert_eq!(
        ports,
        [(51820, 51820), (51821, 51821), (51822, 51822)],
        "one connection per worker, each on its worker's port"
    );

    let cap = Capture::start(&na, "eth0");
    for i in 0..3 {
        let dst = ip(&format!("203.0.113.{}", 10 + i));
        assert!(pa.ping(dst, WAIT), "ping over w{i}\n{}", fa.log_text());
    }
    // All three at once: one TCP stream each, 256 KiB echoed back.
    let to: Vec<SocketAddr> = (0..3)
        .map(|i| sa(&format!("203.0.113.{}:7100", 10 + i)))
        .collect();
    assert!(
        echo_streams(&pa, &pb_, &to, 256 << 10),
        "every stream came back intact"
    );
    let mut seen = std::collections::BTreeSet::new();
    for f in cap.finish() {
        if u16::from_be_bytes([f[12], f[13]]) == 0x0800 && f[14 + 9] == 17 {
            let udp = &f[14 + usize::from(f[14] & 0x0f) * 4..];
            let sport = u16::from_be_bytes([udp[0], udp[1]]);
            let dport = u16::from_be_bytes([udp[2], udp[3]]);
            assert_eq!(sport, dport, "each worker talks to its peer worker");
            seen.insert(sport);
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [51820, 51821, 51822],
        "WireGuard crossed on every worker's port"
    );

    // Worker 1 loses its connection; the next one goes there.
    rt.block_on(async {
        let (mut ca, mut cb) = (fa.client().await, fb.client().await);
        for c in [&mut ca, &mut cb] {
            c.remove(pb::RemoveRequest { id: "w1".into() })
                .await
                .expect("remove");
        }
    });
    assert_eq!(connect(3), (51821, 51821), "the least loaded worker");
    assert!(pa.ping(ip("203.0.113.13"), WAIT), "ping over w3");
    assert!(pa.ping(ip("203.0.113.10"), WAIT), "w0 unaffected");
}

/// TCP streams from pod A to pod B at once, one to each of `to` (a flow
/// each), each `len` bytes echoed back; true when every stream came back
/// intact.
fn echo_streams(pa: &Netns, pb: &Netns, to: &[SocketAddr], len: usize) -> bool {
    let data: Vec<u8> = (0..=255u8).cycle().take(len).collect();
    let streams: Vec<_> = to
        .iter()
        .map(|&at| {
            let l = pb.tcp_listen(at);
            let server = std::thread::spawn(move || {
                let (mut s, _) = l.accept().expect("accept");
                let mut buf = vec![0; len];
                s.read_exact(&mut buf).expect("server read");
                s.write_all(&buf).expect("server write");
            });
            let c = pa.tcp_connect(at);
            c.set_read_timeout(Some(WAIT)).expect("timeout");
            (c, server)
        })
        .collect();
    let clients: Vec<_> = streams
        .into_iter()
        .map(|(mut c, server)| {
            let data = data.clone();
            std::thread::spawn(move || {
                c.write_all(&data).expect("client write");
                let mut back = vec![0; data.len()];
                c.read_exact(&mut back).expect("client read");
                server.join().expect("server");
                back == data
            })
        })
        .collect();
    clients.into_iter().all(|c| c.join().expect("client"))
}

/// `n` addresses of `ip` from port `first` up.
fn ports_of(ip: &str, first: u16, n: u16) -> Vec<SocketAddr> {
    (first..first + n)
        .map(|p| sa(&format!("{ip}:{p}")))
        .collect()
}

/// Segments the TCP stack of `pod` received out of order, so far.
fn out_of_order(pod: &Netns) -> u64 {
    let out = pod
        .command("nstat")
        .args(["-asz", "TcpExtTCPOFOQueue"])
        .output()
        .expect("nstat");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("TcpExtTCPOFOQueue"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("TcpExtTCPOFOQueue in nstat's output")
}

/// The tx queues of interface `dev` in `pod` (one per lane).
fn queues(pod: &Netns, dev: &str) -> usize {
    let out = pod
        .command("ls")
        .arg(format!("/sys/class/net/{dev}/queues"))
        .output()
        .expect("ls queues");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|q| q.starts_with("tx-"))
        .count()
}

/// `--lanes 2` on both forwarders: one connection gets a two-queue pod
/// interface and two WireGuard sessions, lane k on packet thread k and
/// port 51820 + k on each node; many flows at once spread over both lanes
/// in both directions and arrive intact. A chain then drops the connection
/// to one lane (and one queue), and the peer follows once told.
#[test]
fn one_connection_spreads_its_flows_over_lanes() {
    require_root();
    let (na, nb) = two_nodes();
    let (pa, pb_) = (Netns::new(), Netns::new());
    let flags = ["--workers", "3", "--lanes", "2"];
    let fa = Forwarder::start(&na, "node-a", "192.0.2.1", &flags);
    let fb = Forwarder::start(&nb, "node-b", "192.0.2.2", &flags);
    let rt = current_thread_rt();
    let a_side = kernel(&pa, "nsm-1", &["198.51.100.1/32"], &["198.51.100.2/32"]);
    let b_side = kernel(&pb_, "nsm-1", &["198.51.100.2/32"], &["198.51.100.1/32"]);
    let (a, b) = rt.block_on(async {
        let (mut ca, mut cb) = (fa.client().await, fb.client().await);
        connect_pair(&mut ca, &mut cb, "ln", a_side.clone(), b_side.clone()).await
    });
    assert_eq!(lane_ports(&a), [51820, 51821], "A's lanes");
    assert_eq!(lane_ports(&b), [51820, 51821], "B's lanes");
    assert_eq!((queues(&pa, "nsm-1"), queues(&pb_, "nsm-1")), (2, 2));
    assert!(pa.ping(ip("198.51.100.2"), WAIT), "{}", fa.log_text());

    // Sixteen flows: the kernel hashes them over both queues (all on one
    // lane has odds of 2 in 65536).
    assert!(
        echo_streams(&pa, &pb_, &ports_of("198.51.100.2", 7200, 16), 64 << 10),
        "every stream came back intact\n{}\n{}",
        fa.log_text(),
        fb.log_text()
    );
    // Each flow kept to one lane both ways: nothing arrived out of order.
    assert_eq!(
        (out_of_order(&pa), out_of_order(&pb_)),
        (0, 0),
        "no flow reordered"
    );
    let status = |f: &Forwarder| {
        rt.block_on(async {
            let mut c = f.client().await;
            let l = c.list(pb::ListRequest {}).await.expect("list").into_inner();
            l.cross_connects
                .into_iter()
                .next()
                .expect("one cross-connect")
        })
    };
    let a_before = status(&fa).counters.expect("counters");
    for (name, st) in [("A", status(&fa)), ("B", status(&fb))] {
        assert_eq!(
            st.state,
            pb::cross_connect_status::State::Up as i32,
            "{name}"
        );
        assert_eq!(st.lanes.len(), 2, "{name}");
        for (k, lane) in st.lanes.iter().enumerate() {
            assert!(lane.established, "{name} lane {k} has a session");
            assert!(
                lane.rx_packets > 0 && lane.tx_packets > 0,
                "{name} lane {k} carried traffic both ways: {lane:?}"
            );
        }
        let c = st.counters.expect("counters");
        let sum = |f: fn(&pb::Lane) -> u64| st.lanes.iter().map(f).sum::<u64>();
        assert_eq!(c.rx_packets, sum(|l| l.rx_packets), "{name}: lanes add up");
        assert_eq!(c.tx_packets, sum(|l| l.tx_packets), "{name}: lanes add up");
    }

    // A chain keeps one lane: A drops lane 1 and its queue at once, B when
    // the manager passes it A's one port.
    let counter = pb::Chain {
        functions: vec![pb::Function {
            kind: Some(pb::function::Kind::Counter(pb::CounterFunction {})),
            selector: None,
        }],
    };
    let a1 = rt.block_on(async {
        let (mut ca, mut cb) = (fa.client().await, fb.client().await);
        let a1 = ca
            .program(pb::CrossConnect {
                id: "ln".into(),
                source: Some(a_side.clone()),
                destination: Some(wireguard_lanes(
                    "192.0.2.2",
                    &lane_ports(&b),
                    &b.wireguard_public_key,
                )),
                chain: Some(counter),
            })
            .await
            .expect("chain on A")
            .into_inner();
        let b1 = cb
            .program(pb::CrossConnect {
                id: "ln".into(),
                source: Some(wireguard_lanes(
                    "192.0.2.1",
                    &lane_ports(&a1),
                    &a1.wireguard_public_key,
                )),
                destination: Some(b_side.clone()),
                chain: None,
            })
            .await
            .expect("B follows")
            .into_inner();
        assert_eq!(lane_ports(&b1), [51820], "B keeps one lane");
        a1
    });
    assert_eq!(lane_ports(&a1), [51820], "A keeps one lane");
    let a_after = a1.counters.clone().expect("counters");
    assert!(
        a_after.rx_packets >= a_before.rx_packets && a_after.tx_bytes >= a_before.tx_bytes,
        "the dropped lane's traffic stays counted: {a_before:?} then {a_after:?}"
    );
    assert_eq!(a1.wireguard_public_key, a.wireguard_public_key, "same key");
    assert_eq!((queues(&pa, "nsm-1"), queues(&pb_, "nsm-1")), (1, 1));
    assert!(
        echo_streams(&pa, &pb_, &ports_of("198.51.100.2", 7300, 4), 16 << 10),
        "streams cross on one lane"
    );
}

/// A forwarder with two lanes and one with one: the connection uses one
/// (the extra queue made before the peer was known goes away), and traffic
/// crosses.
#[test]
fn lanes_are_the_fewer_both_forwarders_offer() {
    require_root();
    let (na, nb) = two_nodes();
    let (pa, pb_) = (Netns::new(), Netns::new());
    let fa = Forwarder::start(
        &na,
        "node-a",
        "192.0.2.1",
        &["--workers", "2", "--lanes", "2"],
    );
    let fb = Forwarder::start(&nb, "node-b", "192.0.2.2", &["--workers", "2"]);
    let (a, b) = current_thread_rt().block_on(async {
        let (mut ca, mut cb) = (fa.client().await, fb.client().await);
        connect_pair(
            &mut ca,
            &mut cb,
            "l1",
            kernel(&pa, "nsm-1", &["198.51.100.1/32"], &["198.51.100.2/32"]),
            kernel(&pb_, "nsm-1", &["198.51.100.2/32"], &["198.51.100.1/32"]),
        )
        .await
    });
    assert_eq!((lane_ports(&a), lane_ports(&b)), (vec![51820], vec![51820]));
    assert_eq!(queues(&pa, "nsm-1"), 1, "A's second queue is gone");
    assert!(pa.ping(ip("198.51.100.2"), WAIT), "{}", fa.log_text());
    assert!(echo_streams(
        &pa,
        &pb_,
        &ports_of("198.51.100.2", 7400, 4),
        16 << 10
    ));
}

/// A port range past 65535, a worker count of 0, and DPDK options in a
/// build without DPDK are refused at start, with the reason and a non-zero
/// exit.
#[test]
fn bad_worker_settings_are_refused() {
    require_root();
    let node = one_node();
    for (args, want) in [
        (vec!["--workers", "0"], "--workers"),
        (vec!["--workers", "65"], "--workers"),
        (
            vec!["--wireguard-port", "65535", "--workers", "2"],
            "do not fit below 65536",
        ),
        (vec!["--lanes", "0"], "--lanes"),
        (
            vec!["--workers", "2", "--lanes", "3"],
            "--lanes 3 needs as many packet threads, but there are 2",
        ),
    ] {
        let err = refused(&node, "192.0.2.1", &args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A build without the `dpdk` feature says so.
    if !cfg!(feature = "dpdk") {
        let args = ["--dpdk-eal", "--no-huge", "--dpdk-port", "net_tap0"];
        let err = refused(&node, "192.0.2.1", &args);
        assert!(err.contains("without the cargo feature `dpdk`"), "{err}");
    }
}

/// Bursts of small UDP datagrams (IPv4 and IPv6), which the receiving
/// forwarder joins into UDP GSO superpackets for the pod's TUN: every
/// datagram arrives once, intact and in order, and the pod's kernel counts
/// no checksum error.
#[test]
fn udp_bursts_arrive_whole_through_udp_gro() {
    require_root();
    let ConnectedPair {
        pa, pb: pb_, fb, ..
    } = &ConnectedPair::new("burst", &[], true);
    const BURSTS: u32 = 20;
    const PER_BURST: u32 = 200;
    for (from, to) in [
        ("198.51.100.1:7300", "198.51.100.2:7300"),
        ("[2001:db8:1::1]:7301", "[2001:db8:1::2]:7301"),
    ] {
        let rx = pb_.udp(sa(to));
        // Room for every burst: nothing may be lost at the socket.
        nix::sys::socket::setsockopt(&rx, nix::sys::socket::sockopt::RcvBufForce, &(8 << 20))
            .expect("SO_RCVBUFFORCE");
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let tx = pa.udp(sa(from));
        let mut payload = [0u8; 200];
        for n in 0..BURSTS * PER_BURST {
            payload[..4].copy_from_slice(&n.to_be_bytes());
            payload[4..].fill(u8::try_from(n % 251).expect("< 251"));
            tx.send_to(&payload, sa(to)).expect("send");
            if n % PER_BURST == PER_BURST - 1 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut buf = [0u8; 2048];
        for want in 0..BURSTS * PER_BURST {
            let (len, src) = rx
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {want} of {to}: {e}\n{}", fb.log_text()));
            assert_eq!(src, sa(from));
            assert_eq!(len, 200, "datagram {want} has its own length");
            let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            assert_eq!(n, want, "in order, none lost");
            let fill = u8::try_from(n % 251).expect("< 251");
            assert!(
                buf[4..200].iter().all(|b| *b == fill),
                "datagram {n} intact"
            );
        }
    }
    let snmp = String::from_utf8(
        pb_.command("cat")
            .arg("/proc/net/snmp")
            .output()
            .expect("snmp")
            .stdout,
    )
    .expect("utf8");
    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    let (names, values) = (udp[0].split_whitespace(), udp[1].split_whitespace());
    let errors = names
        .zip(values)
        .find(|(k, _)| *k == "InCsumErrors")
        .map(|(_, v)| v.to_string());
    assert_eq!(errors.as_deref(), Some("0"), "{snmp}");
}
