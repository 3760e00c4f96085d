//! Service chains on a real cross-node connection: two node namespaces,
//! two pod namespaces, two `nsm-forwarder` processes programmed over gRPC
//! the way the manager does, and real traffic (ping, iperf3, TCP). The
//! chain runs on node A's forwarder, the client's.
//!
//! Needs root, `ping`, `iperf3` and `tcpdump`.

#![forbid(unsafe_code)]

mod common;

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nsm_proto::forwarder::v1 as pb;
use pb::forwarder_client::ForwarderClient;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(10);
const B_IP: &str = "198.51.100.2";

/// Nodes, pods, forwarders and the connection between the pods.
struct Env {
    _nodes: (Netns, Netns),
    pa: Netns,
    pb: Netns,
    fa: Forwarder,
    _fb: Forwarder,
    /// Node B's WireGuard key, for re-programming A with its full request.
    b_key: String,
}

impl Env {
    fn new(id: &str) -> Self {
        require_root();
        let (na, nb) = two_nodes();
        let (pa, pb) = (Netns::new(), Netns::new());
        let fa = Forwarder::start(&na, "node-a", "192.0.2.1", &[]);
        let fb = Forwarder::start(&nb, "node-b", "192.0.2.2", &[]);
        let b_key = current_thread_rt().block_on(async {
            let (mut ca, mut cb) = (fa.client().await, fb.client().await);
            let (_, b) = connect_pair(&mut ca, &mut cb, id, a_side(&pa), b_side(&pb)).await;
            b.wireguard_public_key
        });
        assert!(
            pa.ping(ip(B_IP), WAIT),
            "ping before any chain\n{}",
            fa.log_text()
        );
        Env {
            _nodes: (na, nb),
            pa,
            pb,
            fa,
            _fb: fb,
            b_key,
        }
    }

    /// A's full request for `id` with `chain`: the same sides as before, so
    /// only the chain changes.
    fn request(&self, id: &str, chain: Option<pb::Chain>) -> pb::CrossConnect {
        pb::CrossConnect {
            id: id.into(),
            source: Some(a_side(&self.pa)),
            destination: Some(wireguard("192.0.2.2", &self.b_key)),
            chain,
        }
    }

    fn program(&self, id: &str, chain: pb::Chain) -> Result<pb::CrossConnectStatus, tonic::Status> {
        let req = self.request(id, Some(chain));
        current_thread_rt().block_on(async {
            let mut c = self.fa.client().await;
            c.program(req).await.map(tonic::Response::into_inner)
        })
    }

    fn status(&self) -> pb::CrossConnectStatus {
        current_thread_rt().block_on(async {
            let mut c: ForwarderClient<Channel> = self.fa.client().await;
            let l = c.list(pb::ListRequest {}).await.expect("list").into_inner();
            l.cross_connects.into_iter().next().expect("one xconn")
        })
    }
}

fn a_side(pa: &Netns) -> pb::Side {
    kernel(pa, "nsm-1", &["198.51.100.1/32"], &["198.51.100.2/32"])
}

fn b_side(pb_: &Netns) -> pb::Side {
    kernel(pb_, "nsm-1", &["198.51.100.2/32"], &["198.51.100.1/32"])
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn func(kind: pb::function::Kind) -> pb::Function {
    pb::Function {
        kind: Some(kind),
        selector: None,
    }
}

fn chain(functions: Vec<pb::Function>) -> pb::Chain {
    pb::Chain { functions }
}

fn rule(action: pb::AclAction, protocol: pb::MatchProtocol, dst_port: u32) -> pb::AclRule {
    pb::AclRule {
        action: action as i32,
        r#match: Some(pb::FlowMatch {
            protocol: protocol as i32,
            dst_ports: (dst_port != 0).then_some(pb::PortRange {
                lo: dst_port,
                hi: 0,
            }),
            ..Default::default()
        }),
    }
}

/// icmp and tcp/5201 allowed, the rest denied (stateful: replies pass).
fn web_guard() -> pb::Function {
    func(pb::function::Kind::Acl(pb::Acl {
        rules: vec![
            rule(pb::AclAction::Allow, pb::MatchProtocol::Icmp, 0),
            rule(pb::AclAction::Allow, pb::MatchProtocol::Tcp, 5201),
        ],
        default_action: pb::AclAction::Deny as i32,
        ..Default::default()
    }))
}

/// A rate limit with a 64 KiB bucket, as users configure it
/// (`{rate: 50Mbit, burst: 64KiB}`). The stage shapes: what exceeds the
/// bucket waits in a queue and leaves at the rate. (As a policer, dropping
/// the excess, it let TCP through at 3 to 4 Mbit/s of 50 with this bucket:
/// the pod's TSO hands the forwarder 64 KB bursts at once.)
fn ratelimit(rate_bps: u64) -> pb::Function {
    func(pb::function::Kind::Ratelimit(pb::RateLimit {
        rate_bps,
        burst_bytes: 65_536,
        ..Default::default()
    }))
}

/// `f`, only for TCP to `port` (forward).
fn for_tcp_port(f: pb::Function, port: u32) -> pb::Function {
    pb::Function {
        selector: Some(pb::FlowMatch {
            protocol: pb::MatchProtocol::Tcp as i32,
            dst_ports: Some(pb::PortRange { lo: port, hi: 0 }),
            ..Default::default()
        }),
        ..f
    }
}

fn counters<'a>(st: &'a pb::CrossConnectStatus, i: usize, name: &str) -> &'a pb::FunctionCounters {
    let f = st
        .functions
        .get(i)
        .unwrap_or_else(|| panic!("function {i} in status: {:?}", st.functions));
    assert_eq!(f.name, name);
    f
}

fn get(f: &pb::FunctionCounters, key: &str) -> u64 {
    *f.counters
        .get(key)
        .unwrap_or_else(|| panic!("counter {key} in {:?}", f.counters))
}

fn iperf3_server(pod: &Netns, port: u16) -> Child {
    let child = pod
        .command("iperf3")
        .args(["-s", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server (is iperf3 installed?)");
    std::thread::sleep(Duration::from_millis(300));
    child
}

/// Starts an iperf3 client in `pod`: TCP, `secs` seconds, JSON output,
/// the first second (slow start) omitted from the totals.
fn iperf3_client(pod: &Netns, port: u16, secs: u32) -> Child {
    pod.command("iperf3")
        .args(["-c", B_IP, "-p", &port.to_string(), "-t", &secs.to_string()])
        .args(["-O", "1", "-i", "1", "-J"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("iperf3 client")
}

/// Waits for an iperf3 client; its JSON, after asserting it succeeded.
fn iperf3_json(child: Child) -> String {
    let out = child.wait_with_output().expect("iperf3 client");
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "iperf3 failed ({}): {json}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    json
}

/// The number after `"bits_per_second":` at or after `from`.
fn bps_after(json: &str, from: usize) -> f64 {
    let at = json[from..]
        .find("\"bits_per_second\":")
        .expect("bits_per_second")
        + from
        + 18;
    json[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
        .collect::<String>()
        .parse()
        .expect("a number")
}

/// Receiver's rate over the whole run (minus the omitted first second).
fn received_bps(json: &str) -> f64 {
    bps_after(json, json.find("\"sum_received\"").expect("sum_received"))
}

/// Per-second rates, from the `intervals` array (omitted ones excluded).
fn interval_bps(json: &str) -> Vec<f64> {
    let start = json.find("\"intervals\"").expect("intervals");
    // The top-level "end" object; intervals have numeric "end" keys.
    let end = json
        .match_indices("\"end\":")
        .find(|(i, _)| json[i + 6..].trim_start().starts_with('{'))
        .map_or(json.len(), |(i, _)| i);
    let mut out = Vec::new();
    let mut at = start;
    while let Some(i) = json[at..end].find("\"sum\":") {
        let s = at + i;
        let omitted = json[s..end]
            .find("\"omitted\":")
            .map(|o| json[s + o + 10..].trim_start().starts_with("true"))
            .unwrap_or(false);
        if !omitted {
            out.push(bps_after(json, s));
        }
        at = s + 6;
    }
    out
}

fn ifindex(pod: &Netns, dev: &str) -> String {
    let out = pod.ip(&["-o", "link", "show", dev]);
    out.split(':').next().expect("ifindex").trim().to_string()
}

/// TCP connect from `pod` to `dst`, in the pod's namespace.
fn tcp_connects(pod: &Netns, dst: SocketAddr, within: Duration) -> bool {
    pod.enter(move || TcpStream::connect_timeout(&dst, within).is_ok())
}

#[test]
fn acl_allows_icmp_and_5201_drops_port_80_and_bad_chain_keeps_it() {
    let env = Env::new("acl");
    let st = env
        .program("acl", chain(vec![web_guard()]))
        .expect("acl chain accepted");
    assert_eq!(st.functions.len(), 1);

    assert!(env.pa.ping(ip(B_IP), WAIT), "ICMP is allowed");
    let mut srv = iperf3_server(&env.pb, 5201);
    let json = iperf3_json(iperf3_client(&env.pa, 5201, 2));
    assert!(received_bps(&json) > 1e6, "TCP to 5201 passes: {json}");

    // Something listens on 80, so a failure is the ACL, not a reset.
    let listener = env.pb.tcp_listen(format!("{B_IP}:80").parse().expect("sa"));
    let dst: SocketAddr = format!("{B_IP}:80").parse().expect("sa");
    let before = get(counters(&env.status(), 0, "acl"), "denied");
    assert!(
        !tcp_connects(&env.pa, dst, Duration::from_secs(2)),
        "TCP to port 80 is dropped"
    );
    let st = env.status();
    let acl = counters(&st, 0, "acl");
    assert!(get(acl, "denied") > before, "drops counted: {acl:?}");
    assert!(get(acl, "default") > 0, "{acl:?}");
    assert!(
        get(acl, "rule[0]") > 0 && get(acl, "rule[1]") > 0,
        "{acl:?}"
    );
    let drops = &st.counters.as_ref().expect("counters").drops;
    assert!(
        drops.values().any(|n| *n > 0),
        "the cross-connect counts the drops too: {drops:?}"
    );

    // (e) A bad chain is refused, naming the element, and the acl stays.
    let bad = env
        .program("acl", chain(vec![web_guard(), ratelimit(0)]))
        .expect_err("rate 0 refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().starts_with("chain[1] (ratelimit): "),
        "{}",
        bad.message()
    );
    let bad = env
        .program(
            "acl",
            chain(vec![func(pb::function::Kind::Acl(pb::Acl {
                rules: vec![pb::AclRule {
                    action: pb::AclAction::Allow as i32,
                    r#match: Some(pb::FlowMatch {
                        dst: "10.0.0.1/8".into(),
                        ..Default::default()
                    }),
                }],
                ..Default::default()
            }))]),
        )
        .expect_err("host bits refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().starts_with("chain[0] (acl): rule[0]"),
        "{}",
        bad.message()
    );
    let too_long = env
        .program(
            "acl",
            chain(vec![func(pb::function::Kind::Fault(pb::Fault {
                delay_ms: 60_000,
                ..Default::default()
            }))]),
        )
        .expect_err("delay above the maximum");
    assert_eq!(too_long.code(), tonic::Code::InvalidArgument);
    let st = env.status();
    assert_eq!(st.functions.len(), 1, "the acl is still in force");
    assert_eq!(st.functions[0].name, "acl");
    assert!(
        !tcp_connects(&env.pa, dst, Duration::from_secs(1)),
        "port 80 still dropped"
    );
    assert!(env.pa.ping(ip(B_IP), WAIT), "ICMP still allowed");
    drop(listener);
    let _ = srv.kill();
    let _ = srv.wait();
}

#[test]
fn ratelimit_applies_and_changes_while_a_flow_runs() {
    let env = Env::new("rl");
    env.program("rl", chain(vec![ratelimit(50_000_000)]))
        .expect("ratelimit accepted");
    let idx = (ifindex(&env.pa, "nsm-1"), ifindex(&env.pb, "nsm-1"));
    let mut srv = iperf3_server(&env.pb, 5201);

    let json = iperf3_json(iperf3_client(&env.pa, 5201, 5));
    let rate = received_bps(&json);
    eprintln!(
        "through a 50 Mbit/s limit with a 64 KiB burst: {:.1} Mbit/s",
        rate / 1e6
    );
    assert!(
        (45e6..=55e6).contains(&rate),
        "50 Mbit/s within 10%: measured {:.1} Mbit/s",
        rate / 1e6
    );
    let st = env.status();
    let rl = counters(&st, 0, "ratelimit");
    assert!(get(rl, "forward_queued_packets") > 0, "{rl:?}");

    // Change the limit in the middle of a flow: only the chain is swapped.
    let rx_before = env.status().counters.expect("counters").rx_packets;
    let client = iperf3_client(&env.pa, 5201, 9);
    std::thread::sleep(Duration::from_secs(4));
    let swapped_at = Instant::now();
    let st = env
        .program("rl", chain(vec![ratelimit(20_000_000)]))
        .expect("new limit accepted");
    assert!(
        swapped_at.elapsed() < Duration::from_secs(1),
        "a swap is quick"
    );
    assert_eq!(st.functions.len(), 1);
    let json = iperf3_json(client);
    let per_sec = interval_bps(&json);
    eprintln!(
        "per second, limit changed after ~4 s: {:?} Mbit/s",
        per_sec
            .iter()
            .map(|b| (b / 1e5).round() / 10.0)
            .collect::<Vec<_>>()
    );
    // 8 one-second intervals after the omitted first: [0..3] before the
    // change, [3] around it, [4..] after it.
    assert!(per_sec.len() >= 7, "{per_sec:?}");
    let head = &per_sec[..3];
    let tail = &per_sec[4..];
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        (40e6..=60e6).contains(&avg(head)),
        "before the change about 50 Mbit/s: {per_sec:?}"
    );
    assert!(
        // Wider than before the change: with a smaller rate, the bucket
        // makes the per-second figures coarser.
        (15e6..=25e6).contains(&avg(tail)),
        "after the change about 20 Mbit/s: {per_sec:?}"
    );
    assert!(
        per_sec.iter().all(|b| *b > 1e6),
        "the flow never stalled: {per_sec:?}"
    );
    assert_eq!(
        (ifindex(&env.pa, "nsm-1"), ifindex(&env.pb, "nsm-1")),
        idx,
        "no interface was recreated"
    );
    let st = env.status();
    assert!(
        st.counters.expect("counters").rx_packets > rx_before,
        "cross-connect counters kept across the swap"
    );
    assert_eq!(st.state, pb::cross_connect_status::State::Up as i32);
    let _ = srv.kill();
    let _ = srv.wait();
}

#[test]
fn fault_drops_about_ten_percent_and_delays() {
    let env = Env::new("fault");
    env.program(
        "fault",
        chain(vec![func(pb::function::Kind::Fault(pb::Fault {
            drop_percent: 10.0,
            // One way only: both ways would lose 1 - 0.9^2 = 19% of pings.
            direction: pb::ChainDirection::Forward as i32,
            seed: 7,
            ..Default::default()
        }))]),
    )
    .expect("fault accepted");
    let out = env
        .pa
        .command("ping")
        .args(["-c", "200", "-i", "0.01", "-W", "1", "-q", B_IP])
        .output()
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    let loss: f64 = text
        .split(',')
        .find(|p| p.contains("packet loss"))
        .and_then(|p| p.trim().split('%').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("ping output: {text}"));
    eprintln!("ping loss through fault 10%: {loss}%");
    assert!((5.0..=15.0).contains(&loss), "loss {loss}%: {text}");
    let st = env.status();
    let f = counters(&st, 0, "fault");
    assert!(get(f, "dropped") > 0 && get(f, "seen") >= 200, "{f:?}");

    // Added delay, both ways: a ping's round trip pays it twice.
    let rtt = |env: &Env| -> (f64, f64) {
        let out = env
            .pa
            .command("ping")
            .args(["-c", "5", "-i", "0.2", "-W", "2", "-q", B_IP])
            .output()
            .expect("ping");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // rtt min/avg/max/mdev = 50.1/50.3/50.6/0.2 ms
        let nums: Vec<f64> = text
            .split(" = ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .map(|t| t.split('/').filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_else(|| panic!("ping output: {text}"));
        (nums[0], nums[1])
    };
    env.program(
        "fault",
        chain(vec![func(pb::function::Kind::Fault(pb::Fault {
            delay_ms: 25,
            ..Default::default()
        }))]),
    )
    .expect("delay accepted");
    let (min, avg) = rtt(&env);
    eprintln!("ping rtt with 25 ms each way: min {min} avg {avg} ms");
    assert!(min >= 50.0 && avg < 100.0, "min {min} avg {avg}");
    let st = env.status();
    assert_eq!(get(counters(&st, 0, "fault"), "delay_overflow"), 0);
    // And gone again with the next chain.
    env.program("fault", chain(vec![])).expect("empty chain");
    let (_, avg) = rtt(&env);
    assert!(avg < 20.0, "no delay any more: avg {avg} ms");
    assert!(env.status().functions.is_empty());
}

#[test]
fn mirror_writes_a_pcap_tcpdump_reads() {
    let env = Env::new("mirror");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mirror.pcap");
    env.program(
        "mirror",
        chain(vec![func(pb::function::Kind::Mirror(pb::Mirror {
            pcap_path: path.display().to_string(),
            snaplen: 256,
            filter: Some(pb::FlowMatch {
                protocol: pb::MatchProtocol::Icmp as i32,
                ..Default::default()
            }),
            ..Default::default()
        }))]),
    )
    .expect("mirror accepted");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path)
        .expect("pcap created")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the capture is private");

    let out = env
        .pa
        .command("ping")
        .args(["-c", "10", "-i", "0.02", "-W", "1", "-q", B_IP])
        .output()
        .expect("ping");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Requests and replies both cross the chain.
    let expected = 20;
    let deadline = Instant::now() + WAIT;
    let lines = loop {
        let n = tcpdump_count(&path);
        if n >= expected || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        lines, expected,
        "tcpdump -r sees every echo request and reply"
    );
    let st = env.status();
    let m = counters(&st, 0, "mirror");
    assert_eq!(get(m, "written"), expected as u64, "{m:?}");
    assert_eq!(get(m, "ring_full"), 0, "{m:?}");
}

/// Packets `tcpdump -r` reads from `path`.
fn tcpdump_count(path: &Path) -> usize {
    let out = std::process::Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(path)
        .output()
        .expect("tcpdump (is it installed?)");
    assert!(
        out.status.success(),
        "tcpdump -r failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("ICMP echo"))
        .count()
}

#[test]
fn selectors_run_functions_on_the_selected_traffic_only() {
    let env = Env::new("sel");
    // A default-deny ACL that only sees TCP to port 80.
    let deny_web = for_tcp_port(
        func(pb::function::Kind::Acl(pb::Acl {
            default_action: pb::AclAction::Deny as i32,
            ..Default::default()
        })),
        80,
    );
    env.program("sel", chain(vec![deny_web]))
        .expect("selected acl accepted");
    assert!(env.pa.ping(ip(B_IP), WAIT), "ICMP skips the acl");
    let mut srv = iperf3_server(&env.pb, 5201);
    let json = iperf3_json(iperf3_client(&env.pa, 5201, 2));
    assert!(received_bps(&json) > 1e6, "TCP to 5201 skips it: {json}");
    let listener = env.pb.tcp_listen(format!("{B_IP}:80").parse().expect("sa"));
    let dst: SocketAddr = format!("{B_IP}:80").parse().expect("sa");
    assert!(
        !tcp_connects(&env.pa, dst, Duration::from_secs(2)),
        "TCP to port 80 is dropped"
    );
    let st = env.status();
    let acl = counters(&st, 0, "acl");
    assert!(get(acl, "denied") > 0, "{acl:?}");
    assert_eq!(get(acl, "allowed"), 0, "{acl:?}");
    assert_eq!(
        get(acl, "default"),
        get(acl, "denied"),
        "the acl saw only port 80: {acl:?}"
    );
    drop(listener);

    // A 20 Mbit/s limit on TCP to 5202 only: 5201 is not limited.
    env.program(
        "sel",
        chain(vec![for_tcp_port(ratelimit(20_000_000), 5202)]),
    )
    .expect("selected ratelimit accepted");
    let mut srv2 = iperf3_server(&env.pb, 5202);
    let limited = received_bps(&iperf3_json(iperf3_client(&env.pa, 5202, 4)));
    let before = get(
        counters(&env.status(), 0, "ratelimit"),
        "forward_passed_bytes",
    );
    let free = received_bps(&iperf3_json(iperf3_client(&env.pa, 5201, 3)));
    eprintln!(
        "selected 20 Mbit/s limit: port 5202 {:.1} Mbit/s, port 5201 {:.1} Mbit/s",
        limited / 1e6,
        free / 1e6
    );
    assert!(
        (18e6..=22e6).contains(&limited),
        "TCP to 5202 limited to 20 Mbit/s within 10%: {:.1} Mbit/s",
        limited / 1e6
    );
    assert!(
        free > 30e6,
        "TCP to 5201 is not limited: {:.1} Mbit/s",
        free / 1e6
    );
    let st = env.status();
    let rl = counters(&st, 0, "ratelimit");
    assert_eq!(
        get(rl, "forward_passed_bytes"),
        before,
        "5201's packets skipped the limit: {rl:?}"
    );
    assert_eq!(
        get(rl, "reverse_passed_packets"),
        0,
        "ACKs are not selected: {rl:?}"
    );
    for s in [&mut srv, &mut srv2] {
        let _ = s.kill();
        let _ = s.wait();
    }
}
