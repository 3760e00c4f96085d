//! `nsmctl top` and `nsm-testbed graph` against a real two-node lab: the
//! real `nsm-forwarder`, `nsm-manager` and `nsm-endpoint`s, a pod with a
//! cross-node and a same-node connection, and a ping over the cross-node
//! one while `top` samples the forwarders.
//!
//! Needs root (namespaces) and the binaries built (`cargo build --workspace
//! --bins`: nsm-testbed too). The lab has a unique name and is torn down
//! when dropped, also when an assertion fails.

use std::process::{Command, Output, Stdio};

use nsm_testbed::Topology;
use nsm_testbed::lab::{Lab, Options};
use nsm_testbed::testing::{require_root, unique_lab_name};
use serde_json::Value;

const NSMCTL: &str = env!("CARGO_BIN_EXE_nsmctl");

fn up() -> (tempfile::TempDir, Lab) {
    require_root();
    let name = unique_lab_name("top");
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

fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn nsmctl_top_rates_and_testbed_graph_of_the_whole_lab() {
    let (dir, lab) = up();
    let cross_id = format!("{}-web-nsm-1", lab.name());
    let local_id = format!("{}-web-nsm-2", lab.name());
    let forwarders = ["node-1", "node-2"].map(|n| lab.forwarder_socket(n));

    // The endpoint's address on the cross-node connection, to ping.
    let conns: Value = serde_json::from_str(&ok(
        "nsmctl get connections",
        Command::new(NSMCTL)
            .arg("--manager")
            .arg(lab.manager_socket("node-1"))
            .args(["get", "connections", "--json"])
            .output()
            .unwrap(),
    ))
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
    for f in &forwarders {
        top.arg("--forwarder").arg(f);
    }
    let out = ok(
        "nsmctl top",
        top.args(["top", "--count", "2", "--interval", "1s", "--json"])
            .output()
            .unwrap(),
    );
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
    ok(
        "nsm-testbed graph",
        Command::new(&testbed)
            .arg("--state-dir")
            .arg(dir.path())
            .args(["graph", "--lab", lab.name(), "--svg"])
            .arg(&svg_path)
            .arg("--dot")
            .arg(&dot_path)
            .output()
            .unwrap(),
    );
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
