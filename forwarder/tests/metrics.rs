//! `--metrics-listen` and `--flow-log` on a real cross-node connection: two
//! node namespaces, two pods, two `nsm-forwarder` processes, an `acl` chain
//! on node A's forwarder that passes ICMP and denies the rest, real
//! traffic; then `/metrics` is scraped over HTTP and the flow log read.
//!
//! Needs root and `ping`.

#![forbid(unsafe_code)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use nsm_proto::forwarder::v1 as pb;

const WAIT: Duration = Duration::from_secs(10);
const METRICS: &str = "192.0.2.1:9464";

/// GET /metrics from inside `node`; returns the body after checking the
/// status and content type.
fn scrape(node: &Netns) -> String {
    let mut s = node.tcp_connect(METRICS.parse().expect("addr"));
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text"),
        "{head}"
    );
    body.to_string()
}

/// Every line must be metadata (`# HELP`, `# TYPE`, `# UNIT`), a sample the
/// `prometheus-parse` line parser reads as one with a numeric value, or the
/// final `# EOF`; then the whole text must parse as a scrape.
fn check_exposition(text: &str) -> prometheus_parse::Scrape {
    use prometheus_parse::LineInfo;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(meta) = line.strip_prefix("# ") {
            let mut w = meta.splitn(3, ' ');
            let (kind, name) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
            assert!(
                matches!(kind, "HELP" | "TYPE" | "UNIT"),
                "bad metadata: {line}"
            );
            assert!(
                name.starts_with("nsm_")
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad name: {line}"
            );
            continue;
        }
        match LineInfo::parse(line) {
            LineInfo::Sample {
                metric_name, value, ..
            } => {
                assert!(metric_name.starts_with("nsm_"), "{line}");
                assert!(value.parse::<f64>().is_ok(), "bad value: {line}");
            }
            _ => panic!("not a sample: {line:?}"),
        }
    }
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses")
}

/// The value of the sample `name` whose labels include all of `labels`.
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| {
            x.metric == name
                && labels
                    .iter()
                    .all(|(k, v)| x.labels.get(k).is_some_and(|l| l == *v))
        })
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

fn acl_icmp_only() -> pb::Chain {
    pb::Chain {
        functions: vec![pb::Function {
            kind: Some(pb::function::Kind::Acl(pb::Acl {
                rules: vec![pb::AclRule {
                    action: pb::AclAction::Allow as i32,
                    r#match: Some(pb::FlowMatch {
                        protocol: pb::MatchProtocol::Icmp as i32,
                        ..Default::default()
                    }),
                }],
                default_action: pb::AclAction::Deny as i32,
                ..Default::default()
            })),
            selector: None,
        }],
    }
}

fn wait_for_line(path: &Path, within: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| pred(l)) {
            return Some(l.to_string());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_and_flow_log_show_acl_drops() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let flows = dir.path().join("flows.jsonl");
    let (na, nb) = two_nodes();
    let (pa, pb_) = (Netns::new(), Netns::new());
    let flows_arg = flows.display().to_string();
    let fa = Forwarder::start(
        &na,
        "node-a",
        "192.0.2.1",
        &[
            "--metrics-listen",
            METRICS,
            "--flow-log",
            &flows_arg,
            "--flow-log-rate",
            "0",
        ],
    );
    let fb = Forwarder::start(&nb, "node-b", "192.0.2.2", &[]);
    let a_side = kernel(&pa, "nsm-1", &["198.51.100.1/32"], &["198.51.100.2/32"]);
    let b_side = kernel(&pb_, "nsm-1", &["198.51.100.2/32"], &["198.51.100.1/32"]);
    let b_key = current_thread_rt().block_on(async {
        let (mut ca, mut cb) = (fa.client().await, fb.client().await);
        let (_, b) = connect_pair(&mut ca, &mut cb, "m1", a_side.clone(), b_side).await;
        ca.program(pb::CrossConnect {
            id: "m1".into(),
            source: Some(a_side.clone()),
            destination: Some(wireguard("192.0.2.2", &b.wireguard_public_key)),
            chain: Some(acl_icmp_only()),
        })
        .await
        .expect("program the chain");
        b.wireguard_public_key
    });
    let dst: IpAddr = "198.51.100.2".parse().expect("ip");
    assert!(pa.ping(dst, WAIT), "ICMP passes\n{}", fa.log_text());
    // 20 UDP datagrams of 100 bytes to a port the acl denies.
    let udp = pa.udp("198.51.100.1:40000".parse().expect("addr"));
    let to = SocketAddr::new(dst, 9999);
    for _ in 0..20 {
        udp.send_to(&[7u8; 100], to).expect("send");
    }
    std::thread::sleep(Duration::from_millis(300));

    let text = scrape(&na);
    let s = check_exposition(&text);
    let conn = ("connection", "m1");
    let fwd_bytes = value(
        &s,
        "nsm_forwarder_connection_bytes_total",
        &[conn, ("direction", "forward")],
    )
    .expect("forward bytes");
    assert!(fwd_bytes >= 20.0 * 128.0, "{fwd_bytes}\n{text}");
    let rev_packets = value(
        &s,
        "nsm_forwarder_connection_packets_total",
        &[conn, ("direction", "reverse")],
    )
    .expect("reverse packets");
    assert!(rev_packets >= 1.0, "echo replies came back\n{text}");
    let drops = value(
        &s,
        "nsm_forwarder_connection_drops_total",
        &[conn, ("reason", "acl_denied")],
    )
    .expect("acl drops");
    assert!(drops >= 20.0, "{drops}\n{text}");
    let denied = value(
        &s,
        "nsm_forwarder_chain_function_total",
        &[
            conn,
            ("index", "0"),
            ("function", "acl"),
            ("counter", "denied"),
        ],
    )
    .expect("acl denied counter");
    assert!(denied >= 20.0, "{denied}\n{text}");
    assert_eq!(
        value(
            &s,
            "nsm_forwarder_connection_state",
            &[conn, ("state", "up")]
        ),
        Some(1.0),
        "{text}"
    );
    let age =
        value(&s, "nsm_forwarder_wireguard_handshake_age_seconds", &[conn]).expect("handshake age");
    assert!((0.0..120.0).contains(&age), "{age}");
    assert_eq!(
        value(&s, "nsm_forwarder_connections", &[]),
        Some(1.0),
        "{text}"
    );

    // The chain keeps flows until they go idle or the chain goes: remove
    // the cross-connect, and every flow is written, `closed`.
    current_thread_rt().block_on(async {
        let mut ca = fa.client().await;
        ca.remove(pb::RemoveRequest { id: "m1".into() })
            .await
            .expect("remove");
    });
    let udp_line = wait_for_line(&flows, WAIT, |l| {
        l.contains(r#""connection":"m1""#) && l.contains(r#""dst_port":9999"#)
    })
    .unwrap_or_else(|| {
        panic!(
            "no flow record for the UDP flow in\n{}",
            std::fs::read_to_string(&flows).unwrap_or_default()
        )
    });
    let rec: serde_json::Value = serde_json::from_str(&udp_line).expect("JSON line");
    assert_eq!(rec["proto"], 17);
    assert_eq!(rec["src"], "198.51.100.1");
    assert_eq!(rec["dst"], "198.51.100.2");
    assert_eq!(rec["src_port"], 40000);
    assert_eq!(rec["direction"], "forward");
    assert_eq!(rec["orig_packets"], 20);
    assert_eq!(rec["orig_bytes"], 20 * 128);
    assert_eq!(rec["reply_packets"], 0);
    assert_eq!(rec["functions"][0]["name"], "acl");
    assert_eq!(rec["functions"][0]["verdict"], "drop");
    assert_eq!(rec["drop_reason"], "acl_denied");
    assert_eq!(rec["end"], "closed");
    assert!(rec["end_unix_ms"].as_u64() >= rec["start_unix_ms"].as_u64());
    let icmp_line = wait_for_line(&flows, WAIT, |l| l.contains(r#""proto":1,"#))
        .expect("a record for the ping flow");
    let icmp: serde_json::Value = serde_json::from_str(&icmp_line).expect("JSON line");
    assert_eq!(icmp["functions"][0]["verdict"], "pass");
    assert!(icmp["reply_packets"].as_u64() >= Some(1), "{icmp_line}");

    // A removed cross-connect's series are gone; the flow log's are there.
    let text = scrape(&na);
    let s = check_exposition(&text);
    assert!(!text.contains(r#"connection="m1""#), "{text}");
    assert_eq!(value(&s, "nsm_forwarder_connections", &[]), Some(0.0));
    let written = value(&s, "nsm_forwarder_flow_log_records_total", &[]).expect("records");
    assert!(written >= 2.0, "{text}");
    drop(b_key);
}

/// Every metric the Grafana dashboard queries is one the forwarder or the
/// manager exports (as listed in their `metrics` module docs).
#[test]
fn dashboard_queries_exported_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dash =
        std::fs::read_to_string(root.join("deploy/grafana/dashboard.json")).expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&dash).expect("dashboard is JSON");
    assert!(json["panels"].as_array().is_some_and(|p| p.len() > 5));
    let docs = std::fs::read_to_string(root.join("forwarder/src/metrics.rs")).expect("src")
        + &std::fs::read_to_string(root.join("nsm-manager/src/metrics.rs")).expect("src");
    let mut seen = 0;
    for (i, _) in dash.match_indices("nsm_") {
        let name: String = dash[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name == "nsm_" || name.starts_with("nsm_rs") {
            continue;
        }
        // Histograms are documented by their base name.
        let base = name.strip_suffix("_bucket").unwrap_or(&name);
        assert!(
            docs.contains(&format!("`{base}`")),
            "{name} is not exported"
        );
        seen += 1;
    }
    assert!(seen >= 10, "{seen} metric references");
}

/// The packet threads' I/O errors are exported: a connection whose peer
/// has no route makes every underlay send fail, and
/// `nsm_forwarder_io_errors_total{kind="udp_send"}` counts them (the
/// WireGuard handshake is retried every 5 s).
#[test]
fn underlay_send_errors_are_exported() {
    require_root();
    let node = one_node();
    let pod = Netns::new();
    let fw = Forwarder::start(
        &node,
        "node-a",
        "192.0.2.1",
        &["--metrics-listen", METRICS, "--workers", "2"],
    );
    // Any 32 bytes are a usable X25519 public key for this purpose.
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    current_thread_rt().block_on(async {
        let mut c = fw.client().await;
        c.program(pb::CrossConnect {
            id: "nowhere".into(),
            source: Some(kernel(
                &pod,
                "nsm-1",
                &["198.51.100.1/32"],
                &["198.51.100.2/32"],
            )),
            // 203.0.113.99: no route from the node.
            destination: Some(wireguard("203.0.113.99", &key)),
            chain: None,
        })
        .await
        .expect("program");
    });
    let first = check_exposition(&scrape(&node));
    assert_eq!(
        value(&first, "nsm_forwarder_packet_threads", &[]),
        Some(2.0)
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let _ = pod.ping(
            "198.51.100.2".parse().expect("ip"),
            Duration::from_millis(200),
        );
        let s = check_exposition(&scrape(&node));
        let n = value(&s, "nsm_forwarder_io_errors_total", &[("kind", "udp_send")]);
        if n.is_some_and(|n| n > 0.0) {
            assert_eq!(
                value(
                    &s,
                    "nsm_forwarder_io_errors_total",
                    &[("kind", "pod_write")]
                ),
                Some(0.0)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no udp_send error counted: {n:?}\n{}",
            fw.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
