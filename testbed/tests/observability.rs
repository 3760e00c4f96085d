//! Observability of a lab as an operator sees it: the forwarder's metrics
//! after traffic through an acl that drops, `nsmctl describe` against
//! `nsm-testbed status`, and the picture of the demo lab, rasterized.

use std::process::Command;
use std::time::{Duration, Instant};

use nsm_testbed::lab::{Lab, Options};
use nsm_testbed::testing::{require_root, unique_lab_name};
use nsm_testbed::{Topology, sys};

/// Where every forwarder serves metrics, inside its own node namespace.
const METRICS: &str = "127.0.0.1:9464";

/// The demo lab (testbed/topologies/demo.yaml) under a unique name, with an
/// acl that lets ICMP and iperf3 through and drops the rest.
fn demo_with_acl(name: &str) -> Topology {
    let demo =
        include_str!("../topologies/demo.yaml").replace("name: demo", &format!("name: {name}"));
    let policies = r#"
policies:
  - name: guard
    match: {service: secure-net}
    chain:
      - acl: {rules: [{allow: {proto: icmp}}, {allow: {proto: tcp, dst_port: 5201}}], default: deny}
"#;
    Topology::parse(&format!("{demo}{policies}")).expect("demo topology with a policy")
}

fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn stdout(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn metrics_describe_and_picture_of_the_demo_lab() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        state_root: dir.path().to_path_buf(),
        progress: false,
        mesh: true,
        manager_args: Vec::new(),
    };
    let name = unique_lab_name("obs");
    let env = [(
        "NSM_FORWARDER_METRICS_LISTEN".to_string(),
        METRICS.to_string(),
    )];
    let lab = Lab::up_with_env(demo_with_acl(&name), &opts, &env).expect("lab up");
    let status = lab.status();
    let conn = status
        .connections
        .first()
        .expect("the demo's connection")
        .clone();
    assert_eq!(conn.state, "UP", "{conn:?}");

    // Traffic: ICMP passes; UDP is dropped by the acl.
    until("ping crosses the acl", Duration::from_secs(20), || {
        lab.exec("web", &["ping", "-c", "1", "-W", "1", &conn.dst_ip])
            .unwrap()
            .status
            .success()
    });
    let udp = format!(
        "for i in $(seq 20); do echo x >/dev/udp/{}/9; done",
        conn.dst_ip
    );
    stdout(lab.exec("web", &["bash", "-c", &udp]).unwrap());

    // The forwarder's metrics: bytes and acl drops under this connection.
    let url = format!("http://{METRICS}/metrics");
    let mut text = String::new();
    until(
        "the metrics show the drops",
        Duration::from_secs(10),
        || {
            text = stdout(lab.exec("node-1", &["curl", "-sf", &url]).unwrap());
            text.contains("reason=\"acl_denied\"")
        },
    );
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text parses");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let id = conn.id.as_str();
    let drops = value(
        "nsm_forwarder_connection_drops_total",
        &[("connection", id), ("reason", "acl_denied")],
    );
    assert!(drops >= 20.0, "acl drops of {id}: {drops}\n{text}");
    let bytes = value(
        "nsm_forwarder_connection_bytes_total",
        &[("connection", id), ("direction", "forward")],
    );
    assert!(bytes > 0.0, "bytes of {id}: {bytes}\n{text}");

    // nsmctl describe shows the path status shows.
    let nsmctl = sys::find_program("nsmctl").expect("nsmctl is built");
    let described = stdout(
        Command::new(&nsmctl)
            .arg("--manager")
            .arg(lab.manager_socket("node-1"))
            .arg("--forwarder")
            .arg(lab.forwarder_socket("node-1"))
            .arg("--identity-dir")
            .arg(lab.identity_dir("node-1"))
            .args(["describe", "connection", id, "--json"])
            .output()
            .unwrap(),
    );
    let d: serde_json::Value = serde_json::from_str(&described).expect("describe JSON");
    let path: Vec<String> = d["connection"]["path"]
        .as_array()
        .expect("path")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(!conn.path.is_empty());
    assert_eq!(path, conn.path, "describe and status agree on the path");

    // The picture of the lab renders, with every node, pod and connection.
    let svg = dir.path().join("demo.svg");
    stdout(
        Command::new(env!("CARGO_BIN_EXE_nsm-testbed"))
            .arg("--state-dir")
            .arg(dir.path())
            .args(["graph", "--lab", &name, "--svg"])
            .arg(&svg)
            .output()
            .unwrap(),
    );
    let picture = std::fs::read_to_string(&svg).unwrap();
    for label in [
        "node-1",
        "node-2",
        "web",
        "echo",
        "secure-net",
        conn.src_ip.as_str(),
    ] {
        assert!(picture.contains(label), "the picture names {label}");
    }
    let rsvg = sys::find_program("rsvg-convert")
        .expect("rsvg-convert (Debian librsvg2-bin) is installed by ./dev test");
    let png = dir.path().join("demo.png");
    let st = Command::new(rsvg)
        .arg("-o")
        .arg(&png)
        .arg(&svg)
        .status()
        .unwrap();
    assert!(st.success(), "the SVG rasterizes");
    assert!(
        std::fs::metadata(&png).unwrap().len() > 1000,
        "a real picture"
    );
}
