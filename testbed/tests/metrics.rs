//! `nsm-manager --metrics-listen`: a two-node lab whose managers serve
//! `/metrics`; after a Request (and a refused one) the client's manager
//! shows a setup latency sample, the outcomes by code, the connection, and
//! the registry manager its registry's sizes.
//!
//! Needs root and `curl`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nsm_testbed::lab::{Lab, Options};
use nsm_testbed::mesh::{self, RequestedConnection};
use nsm_testbed::testing::{require_root, unique_lab_name};
use nsm_testbed::{Topology, sys};

const TIMEOUT: Duration = Duration::from_secs(20);
const METRICS: &str = "127.0.0.1:9465";

fn topology(name: &str) -> String {
    format!(
        r#"
name: {name}
nodes: [{{name: node-1}}, {{name: node-2}}]
services:
  - {{name: secure-net, cidr: 172.31.0.0/16}}
endpoints:
  - {{name: echo, node: node-2, service: secure-net, labels: {{app: echo}}}}
pods:
  - {{name: web, node: node-1}}
"#
    )
}

fn request(lab: &Lab, service: &str) -> Result<nsm_proto::connection::Connection, String> {
    let req = RequestedConnection {
        id: format!("{}-web-{service}", lab.name()),
        pod: "web".into(),
        node: "node-1".into(),
        interface: "nsm-1".into(),
        service: service.into(),
        labels: [("app".to_string(), "web".to_string())].into(),
    };
    let netns: PathBuf = Path::new(sys::NETNS_DIR).join(lab.netns("web").unwrap());
    mesh::request(&lab.manager_socket("node-1"), &netns, &req, true, TIMEOUT)
}

/// `/metrics` of a node's manager, checked line by line: metadata, samples
/// `name{labels} value` with a numeric value, and `# EOF` last. Returns
/// each sample line's `name{labels}` with its value.
fn scrape(lab: &Lab, node: &str) -> BTreeMap<String, f64> {
    let url = format!("http://{METRICS}/metrics");
    let out = lab
        .exec(node, &["curl", "-sS", "-D", "-", &url])
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "curl: {text}");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "{body}");
    let mut samples = BTreeMap::new();
    for l in &lines[..lines.len() - 1] {
        if let Some(meta) = l.strip_prefix("# ") {
            assert!(
                ["HELP ", "TYPE ", "UNIT "]
                    .iter()
                    .any(|k| meta.starts_with(k)),
                "{l}"
            );
            continue;
        }
        let (series, value) = l.rsplit_once(' ').expect("name value");
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {l}"));
        assert!(series.starts_with("nsm_manager_"), "{l}");
        samples.insert(series.to_string(), v);
    }
    samples
}

fn get(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("{series} not in {samples:#?}"))
}

#[test]
fn manager_metrics_show_requests_and_connections() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        state_root: dir.path().to_path_buf(),
        progress: false,
        mesh: true,
        manager_args: vec!["--metrics-listen".into(), METRICS.into()],
    };
    let lab = Lab::up(
        Topology::parse(&topology(&unique_lab_name("metrics"))).expect("valid"),
        &opts,
    )
    .expect("lab comes up with its mesh");
    assert!(
        lab.missing_binaries().is_empty(),
        "mesh binaries not built: {:?}",
        lab.missing_binaries()
    );

    request(&lab, "secure-net").expect("request");
    let err = request(&lab, "no-such-service").expect_err("unknown service");
    assert!(err.contains("no-such-service"), "{err}");

    let m = scrape(&lab, "node-1");
    assert!(
        get(
            &m,
            r#"nsm_manager_request_duration_seconds_count{outcome="ok"}"#
        ) >= 1.0,
        "{m:#?}"
    );
    let sum = get(
        &m,
        r#"nsm_manager_request_duration_seconds_sum{outcome="ok"}"#,
    );
    assert!(sum > 0.0 && sum < TIMEOUT.as_secs_f64(), "{sum}");
    assert!(
        get(
            &m,
            r#"nsm_manager_request_duration_seconds_bucket{le="+Inf",outcome="ok"}"#
        ) >= 1.0
    );
    assert!(get(&m, r#"nsm_manager_requests_total{outcome="ok",code="ok"}"#) >= 1.0);
    assert!(
        get(
            &m,
            r#"nsm_manager_requests_total{outcome="error",code="not_found"}"#
        ) >= 1.0,
        "{m:#?}"
    );
    assert!(get(&m, r#"nsm_manager_connections{role="client",state="up"}"#) >= 1.0);
    assert!(m.contains_key("nsm_manager_heal_duration_seconds_count"));

    // The endpoint side's manager holds the other half; the registry sizes
    // are on whichever manager serves the registry.
    let m2 = scrape(&lab, "node-2");
    assert!(
        get(
            &m2,
            r#"nsm_manager_connections{role="endpoint",state="up"}"#
        ) >= 1.0
    );
    let endpoints = [&m, &m2]
        .iter()
        .find_map(|s| s.get("nsm_manager_registry_endpoints").copied())
        .expect("one manager serves the registry");
    assert!(endpoints >= 1.0, "{endpoints}");
}
