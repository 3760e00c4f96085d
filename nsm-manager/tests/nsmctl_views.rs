//! `nsmctl get|describe|top|graph` and `nsm-testbed graph` against a real
//! lab: two nodes each running the real `nsm-forwarder` and `nsm-manager`,
//! real `nsm-endpoint`s, and a pod whose annotation asks for a cross-node
//! and a same-node connection.
//!
//! Needs root (namespaces) and the mesh binaries built (`cargo build
//! --workspace --bins`: the test command does). The lab has a unique name
//! and is torn down when dropped, also when an assertion fails.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use nsm_testbed::Topology;
use nsm_testbed::lab::{Lab, Options};
use nsm_testbed::testing::{require_root, unique_lab_name};
use serde_json::Value;

const NSMCTL: &str = env!("CARGO_BIN_EXE_nsmctl");

fn up() -> (tempfile::TempDir, Lab) {
    require_root();
    let name = unique_lab_name("ctl");
    let topology = format!(
        r#"
name: {name}
nodes: [{{name: node-1}}, {{name: node-2}}]
services:
  - {{name: secure-net, cidr: 172.31.0.0/24}}
  - {{name: local-net, cidr: 172.30.0.0/24}}
endpoints:
  - {{name: echo, node: node-2, service: secure-net, labels: {{app: echo}}}}
  - {{name: local, node: node-1, service: local-net, labels: {{app: local}}}}
pods:
  - {{name: web, node: node-1, annotations: {{networkservicemesh.io: "kernel://secure-net/nsm-1?app=web, kernel://local-net/nsm-2"}}}}
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        state_root: dir.path().to_path_buf(),
        progress: false,
        mesh: true,
        manager_args: Vec::new(),
    };
    let lab = Lab::up(Topology::parse(&topology).expect("valid topology"), &opts)
        .expect("lab comes up with its mesh");
    assert!(
        lab.missing_binaries().is_empty(),
        "mesh binaries not built: {:?} (the test command builds them first)",
        lab.missing_binaries()
    );
    (dir, lab)
}

fn nsmctl(lab: &Lab, args: &[&str]) -> Output {
    Command::new(NSMCTL)
        .arg("--manager")
        .arg(lab.manager_socket("node-1"))
        .arg("--forwarder")
        .arg(lab.forwarder_socket("node-1"))
        .arg("--forwarder")
        .arg(lab.forwarder_socket("node-2"))
        // The lab's forwarders answer managers only (mTLS).
        .arg("--identity-dir")
        .arg(lab.identity_dir("node-1"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn nsmctl_shows_connections_forwarders_and_draws_the_mesh() {
    let (dir, lab) = up();
    let cross_id = format!("{}-web-nsm-1", lab.name());
    let local_id = format!("{}-web-nsm-2", lab.name());

    // get connections --json: both, with service, endpoint and path.
    let v: Value =
        serde_json::from_str(&ok(nsmctl(&lab, &["get", "connections", "--json"]))).unwrap();
    let conns = v.as_array().unwrap();
    assert_eq!(conns.len(), 2, "{v:#}");
    let cross = conns
        .iter()
        .find(|c| c["id"] == cross_id.as_str())
        .expect("cross-node connection");
    assert_eq!(cross["network_service"], "secure-net");
    assert_eq!(cross["endpoint"], "echo");
    assert_eq!(cross["state"], "UP");
    assert_eq!(cross["hops"], serde_json::json!(["node-1", "node-2"]));
    assert_eq!(cross["path"][0]["name"], "node-1");
    assert!(cross["expires"].is_string(), "{cross:#}");
    assert!(
        cross["src_ip_addrs"][0]
            .as_str()
            .unwrap()
            .starts_with("172.31.0.")
    );
    let local = conns
        .iter()
        .find(|c| c["id"] == local_id.as_str())
        .expect("same-node connection");
    assert_eq!(local["network_service"], "local-net");
    assert_eq!(local["hops"], serde_json::json!(["node-1"]));
    let remote_segment = cross["path"][1]["id"].as_str().unwrap().to_string();

    // get endpoints --json: one object per line, as before.
    let eps = ok(nsmctl(&lab, &["get", "endpoints", "--json"]));
    let mut names: Vec<String> = eps
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["echo", "local"]);

    // The table.
    let table = ok(nsmctl(&lab, &["get", "connections"]));
    assert!(table.starts_with("ID "), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with(&cross_id))
        .expect("a row");
    for s in ["secure-net", "echo", "UP", "node-1>node-2", "in "] {
        assert!(row.contains(s), "{s} in {row}");
    }

    // get forwarders: both forwarders, each carrying its cross-connect.
    let v: Value =
        serde_json::from_str(&ok(nsmctl(&lab, &["get", "forwarders", "--json"]))).unwrap();
    let fwds = v.as_array().unwrap();
    assert_eq!(fwds.len(), 2, "{v:#}");
    assert_eq!(fwds[0]["name"], "node-1");
    assert_eq!(fwds[0]["cross_connect_count"], 2);
    assert_eq!(fwds[1]["name"], "node-2");
    let ids: Vec<&str> = fwds[1]["cross_connects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [remote_segment.as_str()]);
    assert!(fwds[0]["cross_connects"][0]["counters"]["rx_packets"].is_u64());
    // Where a forwarder runs a chain for the connection (the lab has no
    // policy: this holds once a default chain is pushed), describe and
    // graph show its functions.
    let chained = fwds.iter().any(|f| {
        f["cross_connects"].as_array().unwrap().iter().any(|x| {
            (x["id"] == cross_id.as_str() || x["id"] == remote_segment.as_str())
                && !x["functions"].as_array().unwrap().is_empty()
        })
    });
    let table = ok(nsmctl(&lab, &["get", "forwarders"]));
    assert!(
        table.starts_with("NAME ") && table.contains("CROSS-CONNECT"),
        "{table}"
    );

    // describe: by full id, with both forwarders' cross-connects.
    let d = ok(nsmctl(&lab, &["describe", "connection", &cross_id]));
    for s in [
        format!("Connection:  {cross_id}"),
        "Service:     secure-net".into(),
        "Endpoint:    echo".into(),
        "Path:        2 hop(s)".into(),
        format!("node-2  {remote_segment}"),
        "Mechanism:   KERNEL/LOCAL".into(),
        "src addresses:  172.31.0.".into(),
        format!("Cross-connect {cross_id} on forwarder node-1"),
        format!("Cross-connect {remote_segment} on forwarder node-2"),
        "destination:  wireguard to node-2".into(),
        "source:       wireguard from node-1".into(),
        "destination:  kernel in endpoint echo".into(),
    ] {
        assert!(d.contains(&s), "{s:?} in\n{d}");
    }
    if chained {
        assert!(d.contains("1. counter"), "the chain in\n{d}");
    }
    // By a prefix of node-2's id for it, and as JSON.
    let v: Value = serde_json::from_str(&ok(nsmctl(
        &lab,
        &["describe", "connection", &remote_segment[..8], "--json"],
    )))
    .unwrap();
    assert_eq!(v["connection"]["id"], cross_id.as_str());
    assert_eq!(v["cross_connects"].as_array().unwrap().len(), 2, "{v:#}");
    // Ambiguous prefix: usage (2); unknown id: 1; missing id: 2.
    let out = nsmctl(
        &lab,
        &["describe", "connection", &format!("{}-web", lab.name())],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ambiguous"));
    let out = nsmctl(&lab, &["describe", "connection", "no-such-connection"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no connection `no-such-connection`"));
    assert_eq!(
        nsmctl(&lab, &["describe", "connection"]).status.code(),
        Some(2)
    );

    // graph: an SVG naming every node, pod and endpoint, and each connection.
    let svg_path = dir.path().join("mesh.svg");
    let dot_path = dir.path().join("mesh.dot");
    ok(nsmctl(
        &lab,
        &[
            "graph",
            "--svg",
            svg_path.to_str().unwrap(),
            "--dot",
            dot_path.to_str().unwrap(),
        ],
    ));
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .collect();
    let has = |s: &str| texts.iter().any(|t| t.contains(s));
    for s in [
        "node node-1",
        "node node-2",
        lab.netns("web").unwrap().as_str(),
        "echo",
        "local",
        "secure-net",
        "local-net",
        cross_id.as_str(),
        local_id.as_str(),
    ] {
        assert!(has(s), "{s:?} in the SVG texts {texts:?}");
    }
    assert_eq!(
        doc.descendants()
            .filter(|n| n.attribute("class") == Some("connection"))
            .count(),
        2
    );
    if chained {
        assert!(texts.iter().any(|t| t.starts_with("counter")), "{texts:?}");
    }
    let dot = std::fs::read_to_string(&dot_path).unwrap();
    assert!(
        dot.starts_with("digraph mesh {") && dot.contains("\"nse/echo\""),
        "{dot}"
    );
    // The picture must render: rasterized by librsvg (`./dev test` installs it).
    {
        let rsvg = nsm_testbed::sys::find_program("rsvg-convert")
            .expect("rsvg-convert (Debian librsvg2-bin) is installed by ./dev test");
        let png = dir.path().join("mesh.png");
        let st = Command::new(rsvg)
            .arg("-o")
            .arg(&png)
            .arg(&svg_path)
            .status()
            .unwrap();
        assert!(st.success() && Path::new(&png).metadata().unwrap().len() > 0);
    }
    lab.down().unwrap();
}

#[test]
fn nsmctl_top_rates_and_testbed_graph_of_the_whole_lab() {
    let (dir, lab) = up();
    let cross_id = format!("{}-web-nsm-1", lab.name());
    let local_id = format!("{}-web-nsm-2", lab.name());
    let forwarders = ["node-1", "node-2"].map(|n| lab.forwarder_socket(n));

    // The endpoint's address on the cross-node connection, to ping.
    let conns: Value = serde_json::from_str(&ok(Command::new(NSMCTL)
        .arg("--manager")
        .arg(lab.manager_socket("node-1"))
        .args(["get", "connections", "--json"])
        .output()
        .unwrap()))
    .unwrap();
    let cross = conns
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == cross_id.as_str())
        .expect("cross-node connection");
    let dst = cross["dst_ip_addrs"][0]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut ping = lab
        .command("web", &["ping", "-q", "-i", "0.05", "-c", "100", &dst])
        .unwrap()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // top --count 2 --json: two frames, one JSON object per line.
    let mut top = Command::new(NSMCTL);
    top.arg("--identity-dir").arg(lab.identity_dir("node-1"));
    for f in &forwarders {
        top.arg("--forwarder").arg(f);
    }
    let out = ok(top
        .args(["top", "--count", "2", "--interval", "1s", "--json"])
        .output()
        .unwrap());
    let _ = ping.wait();
    let frames: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(frames.len(), 2, "{out}");
    for f in &frames {
        let i = f["interval_s"].as_f64().unwrap();
        assert!(i > 0.5 && i < 5.0, "{f:#}");
        let xs = f["cross_connects"].as_array().unwrap();
        for id in [&cross_id, &local_id] {
            assert!(xs.iter().any(|x| x["id"] == id.as_str()), "{id}: {f:#}");
        }
        // Sorted by total bits/s, highest first.
        let totals: Vec<f64> = xs
            .iter()
            .map(|x| x["total_bps"].as_f64().unwrap())
            .collect();
        assert!(totals.windows(2).all(|w| w[0] >= w[1]), "{totals:?}");
    }
    // The ping runs over the cross-node connection: some frame sees it
    // moving on node-1's forwarder.
    let moving = frames.iter().any(|f| {
        f["cross_connects"].as_array().unwrap().iter().any(|x| {
            x["id"] == cross_id.as_str()
                && x["rx_pps"].as_f64().unwrap() + x["tx_pps"].as_f64().unwrap() > 0.0
                && x["rx_bps"].as_f64().unwrap() + x["tx_bps"].as_f64().unwrap() > 0.0
        })
    });
    assert!(moving, "{out}");

    // nsm-testbed graph: one picture of the lab, from both managers.
    let testbed = nsm_testbed::sys::find_program("nsm-testbed")
        .expect("nsm-testbed built (cargo build -p nsm-testbed)");
    let svg_path = dir.path().join("lab.svg");
    let dot_path = dir.path().join("lab.dot");
    ok(Command::new(&testbed)
        .arg("--state-dir")
        .arg(dir.path())
        .args(["graph", "--lab", lab.name(), "--svg"])
        .arg(&svg_path)
        .arg("--dot")
        .arg(&dot_path)
        .output()
        .unwrap());
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    roxmltree::Document::parse(&svg).expect("well-formed SVG");
    let dot = std::fs::read_to_string(&dot_path).unwrap();
    for name in [
        "node-1",
        "node-2",
        "web",
        "echo",
        "local",
        "secure-net",
        "local-net",
    ] {
        assert!(svg.contains(name), "SVG lacks {name}:\n{svg}");
        assert!(dot.contains(name), "DOT lacks {name}:\n{dot}");
    }
    // Both managers' views of the cross-node connection are one connection,
    // drawn from the client's side: no pod made up from node-2's view.
    for bogus in ["client-".to_string(), format!("nsmtb_{}_echo", lab.name())] {
        assert!(!svg.contains(&bogus), "SVG has {bogus}:\n{svg}");
    }

    // Bad usage: no output given.
    let st = Command::new(&testbed)
        .arg("--state-dir")
        .arg(dir.path())
        .args(["graph", "--lab", lab.name()])
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(2));
}
