//! The mesh end to end: real forwarders, managers and endpoints in lab
//! namespaces, driven only through the public NSM gRPC API and what a user
//! sees in the pods (interfaces, addresses, pings).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nsm_testbed::lab::{Lab, Options};
use nsm_testbed::mesh::{self, RequestedConnection};
use nsm_testbed::testing::{require_root, unique_lab_name};
use nsm_testbed::{Topology, sys};

const TIMEOUT: Duration = Duration::from_secs(20);

fn up(topology: &str, manager_args: &[&str]) -> (tempfile::TempDir, Lab) {
    up_with_env(topology, manager_args, &[])
}

/// [`up`] with extra environment for every process of the lab.
fn up_with_env(
    topology: &str,
    manager_args: &[&str],
    env: &[(String, String)],
) -> (tempfile::TempDir, Lab) {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        state_root: dir.path().to_path_buf(),
        progress: false,
        mesh: true,
        manager_args: manager_args.iter().map(|s| s.to_string()).collect(),
    };
    let lab = Lab::up_with_env(
        Topology::parse(topology).expect("valid topology"),
        &opts,
        env,
    )
    .expect("lab comes up with its mesh");
    assert!(
        lab.missing_binaries().is_empty(),
        "mesh binaries not built: {:?} (the test command builds them first)",
        lab.missing_binaries()
    );
    (dir, lab)
}

/// Two nodes; `echo` serves secure-net on node-2, `local` serves local-net on node-1.
fn two_node_topology(name: &str, pods: &str) -> String {
    format!(
        r#"
name: {name}
nodes: [{{name: node-1}}, {{name: node-2}}]
services:
  - {{name: secure-net, cidr: 172.31.0.0/16}}
  - {{name: local-net, cidr: 172.30.0.0/24}}
endpoints:
  - {{name: echo, node: node-2, service: secure-net, labels: {{app: echo}}}}
  - {{name: local, node: node-1, service: local-net, labels: {{app: local}}}}
pods:
{pods}
"#
    )
}

fn netns_path(lab: &Lab, member: &str) -> PathBuf {
    Path::new(sys::NETNS_DIR).join(lab.netns(member).unwrap())
}

fn ping(lab: &Lab, from: &str, to: &str) -> bool {
    lab.exec(from, &["ping", "-c", "1", "-W", "2", to])
        .unwrap()
        .status
        .success()
}

fn addresses(lab: &Lab, member: &str, ifname: &str) -> Option<String> {
    let out = lab
        .exec(member, &["ip", "-o", "addr", "show", "dev", ifname])
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn interfaces(lab: &Lab, member: &str) -> String {
    String::from_utf8_lossy(&lab.exec(member, &["ip", "-o", "link"]).unwrap().stdout).into_owned()
}

fn first_addr(addrs: &[String]) -> String {
    addrs
        .first()
        .map(|a| a.split('/').next().unwrap().to_string())
        .expect("an address")
}

fn request(
    lab: &Lab,
    pod: &str,
    node: &str,
    ifname: &str,
    service: &str,
    managed: bool,
) -> Result<nsm_proto::connection::Connection, String> {
    let req = RequestedConnection {
        id: format!("{}-{pod}-{ifname}", lab.name()),
        pod: pod.into(),
        node: node.into(),
        interface: ifname.into(),
        service: service.into(),
        labels: [("app".to_string(), pod.to_string())].into(),
    };
    mesh::request(
        &lab.manager_socket(node),
        &netns_path(lab, pod),
        &req,
        managed,
        TIMEOUT,
    )
}

fn register_service(manager: &Path, service: nsm_proto::registry::NetworkService) {
    use nsm_proto::registry::network_service_registry_client::NetworkServiceRegistryClient;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = nsm_proto::uds::connect_unix(manager).await.unwrap();
        NetworkServiceRegistryClient::new(channel)
            .register(service)
            .await
            .expect("register");
    });
}

fn ips(conn: &nsm_proto::connection::Connection) -> (String, String) {
    let ip = conn.context.as_ref().unwrap().ip_context.as_ref().unwrap();
    (first_addr(&ip.src_ip_addrs), first_addr(&ip.dst_ip_addrs))
}

#[test]
fn annotated_pods_reach_endpoints_on_the_same_and_another_node_and_close_removes_both_ends() {
    let name = unique_lab_name("mesh");
    let (_dir, lab) = up(
        &two_node_topology(
            &name,
            r#"  - {name: web, node: node-1, annotations: {networkservicemesh.io: "kernel://secure-net/nsm-1?app=web, kernel://local-net/nsm-2"}}
  - {name: api, node: node-1, annotations: {networkservicemesh.io: "kernel://secure-net/nsm-1?app=api"}}"#,
        ),
        &[],
    );
    let status = lab.status();
    assert_eq!(status.connections.len(), 3, "{:?}", status.connections);
    for c in &status.connections {
        assert_eq!(c.state, "UP", "{c:?}");
        assert!(!c.src_ip.is_empty() && !c.dst_ip.is_empty(), "{c:?}");
        // The pod's interface carries the address the pool gave it.
        let shown = addresses(&lab, &c.pod, &c.interface).unwrap_or_default();
        assert!(
            shown.contains(&format!("{}/", c.src_ip)),
            "{} {}: {shown}",
            c.pod,
            c.interface
        );
        assert!(
            ping(&lab, &c.pod, &c.dst_ip),
            "{} -> {} over {}",
            c.pod,
            c.dst_ip,
            c.interface
        );
    }
    let web1 = status
        .connections
        .iter()
        .find(|c| c.pod == "web" && c.interface == "nsm-1")
        .unwrap();
    let web2 = status
        .connections
        .iter()
        .find(|c| c.pod == "web" && c.interface == "nsm-2")
        .unwrap();
    let api1 = status.connections.iter().find(|c| c.pod == "api").unwrap();
    assert_eq!(web1.endpoint, "echo");
    assert_eq!(web2.endpoint, "local");
    assert!(web1.src_ip.starts_with("172.31.") && web2.src_ip.starts_with("172.30."));
    // Two clients of one service get distinct addresses.
    assert_ne!(web1.src_ip, api1.src_ip);
    assert_ne!(web1.dst_ip, api1.dst_ip);

    // Close (through the public API) removes both ends.
    let conns = mesh::connections(&lab.manager_socket("node-1"), TIMEOUT).unwrap();
    let conn = conns
        .iter()
        .find(|c| c.id == format!("{name}-web-nsm-1"))
        .expect("node-1 knows web's nsm-1");
    let echo_before = interfaces(&lab, "echo");
    mesh::close(&lab.manager_socket("node-1"), conn, TIMEOUT).expect("close");
    assert!(
        addresses(&lab, "web", "nsm-1").is_none(),
        "web's nsm-1 is gone"
    );
    let echo_after = interfaces(&lab, "echo");
    assert_eq!(
        echo_after.lines().count() + 1,
        echo_before.lines().count(),
        "the endpoint lost exactly one interface:\nbefore {echo_before}\nafter {echo_after}"
    );
    // The other connections are untouched.
    assert!(ping(&lab, "web", &web2.dst_ip));
    assert!(ping(&lab, "api", &api1.dst_ip));
}

#[test]
fn bad_requests_fail_with_a_status_naming_the_service_and_leave_nothing() {
    let name = unique_lab_name("mbad");
    let (_dir, lab) = up(
        &two_node_topology(
            &name,
            "  - {name: web, node: node-1}\n  - {name: picky, node: node-1}",
        ),
        &[],
    );
    let before = interfaces(&lab, "web");
    let picky_before = interfaces(&lab, "picky");
    let err = request(&lab, "web", "node-1", "nsm-1", "no-such-service", true)
        .expect_err("unknown service");
    assert!(err.contains("no-such-service"), "{err}");
    assert!(err.starts_with("NotFound"), "{err}");
    // Labels that match no endpoint: NSM's match semantics, registered
    // through the public registry API (requests from app=picky go to
    // endpoints labelled app=nobody, and there are none).
    register_service(
        &lab.manager_socket("node-1"),
        nsm_proto::registry::NetworkService {
            name: "secure-net".into(),
            payload: "IP".into(),
            matches: vec![nsm_proto::registry::Match {
                source_selector: [("app".to_string(), "picky".to_string())].into(),
                routes: vec![nsm_proto::registry::Destination {
                    destination_selector: [("app".to_string(), "nobody".to_string())].into(),
                    weight: 0,
                }],
                fallthrough: false,
                metadata: None,
            }],
            path_ids: vec![],
        },
    );
    let err = request(&lab, "picky", "node-1", "nsm-1", "secure-net", true)
        .expect_err("no endpoint matches");
    assert!(err.contains("secure-net"), "{err}");
    assert!(
        err.starts_with("FailedPrecondition") || err.starts_with("NotFound"),
        "{err}"
    );
    assert_eq!(
        interfaces(&lab, "picky"),
        picky_before,
        "nothing left in the pod"
    );
    // The client's own mistakes keep their codes through the forwarder:
    // an interface name its pod already uses, a namespace that is not there.
    let first = request(&lab, "web", "node-1", "nsm-1", "secure-net", true).expect("first");
    let mut again = RequestedConnection {
        id: format!("{name}-again"),
        pod: "web".into(),
        node: "node-1".into(),
        interface: "nsm-1".into(),
        service: "secure-net".into(),
        labels: [("app".to_string(), "web".to_string())].into(),
    };
    let sock = lab.manager_socket("node-1");
    let err = mesh::request(&sock, &netns_path(&lab, "web"), &again, true, TIMEOUT)
        .expect_err("the name is taken");
    assert!(err.starts_with("AlreadyExists"), "{err}");
    again.interface = "nsm-2".into();
    let gone = Path::new("/run/netns/nsmtb-no-such-namespace");
    let err = mesh::request(&sock, gone, &again, true, TIMEOUT).expect_err("no such netns");
    assert!(err.starts_with("NotFound"), "{err}");
    mesh::close(&sock, &first, TIMEOUT).expect("close");
    assert!(
        mesh::connections(&lab.manager_socket("node-1"), TIMEOUT)
            .unwrap()
            .is_empty()
    );
    assert!(
        mesh::connections(&lab.manager_socket("node-2"), TIMEOUT)
            .unwrap()
            .is_empty()
    );
    assert_eq!(interfaces(&lab, "web"), before, "nothing left in the pod");
}

#[test]
fn an_unrefreshed_connection_expires_on_both_nodes() {
    let name = unique_lab_name("mexp");
    let (_dir, lab) = up(
        &two_node_topology(&name, "  - {name: web, node: node-1}"),
        &["--max-token-lifetime", "4s"],
    );
    let conn = request(&lab, "web", "node-1", "nsm-1", "secure-net", false).expect("request");
    let (_, dst) = ips(&conn);
    assert!(ping(&lab, "web", &dst));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let gone_here = addresses(&lab, "web", "nsm-1").is_none();
        let node2 = mesh::connections(&lab.manager_socket("node-2"), TIMEOUT).unwrap();
        if gone_here && node2.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connection still there after 20 s (node-2 has {})",
            node2.len()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn managers_and_forwarders_restart_without_losing_connections() {
    let name = unique_lab_name("mrst");
    let (_dir, mut lab) = up(
        &two_node_topology(
            &name,
            r#"  - {name: web, node: node-1, annotations: {networkservicemesh.io: "kernel://secure-net/nsm-1"}}"#,
        ),
        &[],
    );
    let before = lab.status().connections;
    assert_eq!(before.len(), 1);
    let (src, dst) = (before[0].src_ip.clone(), before[0].dst_ip.clone());
    assert!(ping(&lab, "web", &dst));

    // SIGKILL both managers and start them again: connections and addresses stay.
    for node in ["node-1", "node-2"] {
        lab.kill(node, "nsm-manager").unwrap();
    }
    for node in ["node-1", "node-2"] {
        lab.restart(node, "nsm-manager").unwrap();
    }
    let after = lab.status().connections;
    assert_eq!(after[0].state, "UP", "{after:?}");
    assert_eq!(
        (after[0].src_ip.as_str(), after[0].dst_ip.as_str()),
        (src.as_str(), dst.as_str())
    );
    assert!(ping(&lab, "web", &dst), "traffic after manager restarts");

    // SIGKILL a forwarder: the pod's interface dies with it; the manager
    // re-programs the new one and traffic comes back.
    lab.kill("node-1", "nsm-forwarder").unwrap();
    let killed = Instant::now();
    lab.restart("node-1", "nsm-forwarder").unwrap();
    let deadline = killed + Duration::from_secs(60);
    while !ping(&lab, "web", &dst) {
        assert!(
            Instant::now() < deadline,
            "no traffic 60 s after the forwarder restart"
        );
    }
    let healed = killed.elapsed();
    eprintln!(
        "heal after forwarder SIGKILL + restart: {:.2} s",
        healed.as_secs_f64()
    );
    let again = lab.status().connections;
    assert_eq!(again[0].src_ip, src, "same address after healing");
}

#[test]
fn two_hundred_parallel_requests_all_succeed() {
    let name = unique_lab_name("m200");
    let pods: String = (0..4)
        .map(|i| format!("  - {{name: p{i}, node: node-1}}\n"))
        .collect();
    let (_dir, lab) = up(&two_node_topology(&name, &pods), &[]);
    let lab = &lab;
    let started = Instant::now();
    let mut latencies: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..200)
            .map(|i| {
                s.spawn(move || {
                    let pod = format!("p{}", i % 4);
                    let t = Instant::now();
                    let r = request(lab, &pod, "node-1", &format!("n{i}"), "secure-net", true);
                    (i, r.map(|_| t.elapsed()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let (i, r) = h.join().unwrap();
                r.unwrap_or_else(|e| panic!("request {i} failed: {e}"))
            })
            .collect()
    });
    let total = started.elapsed();
    latencies.sort();
    // Nearest-rank percentile, in integer arithmetic.
    let p = |pct: usize| latencies[(latencies.len() * pct).div_ceil(100).max(1) - 1];
    eprintln!(
        "200 parallel requests (cross-node): p50 {:?}, p99 {:?}, all done in {:?}",
        p(50),
        p(99),
        total
    );
    // Each reply means the interface exists: spot-check a few in their pods.
    for i in [0, 57, 199] {
        assert!(
            addresses(lab, &format!("p{}", i % 4), &format!("n{i}")).is_some(),
            "n{i} exists"
        );
    }
}

#[test]
fn an_ethernet_service_gives_tap_interfaces_that_reach_across_nodes() {
    let name = unique_lab_name("meth");
    let (_dir, lab) = up(
        &format!(
            r#"
name: {name}
nodes: [{{name: node-1}}, {{name: node-2}}]
services: [{{name: l2-net, payload: ETHERNET, cidr: 172.29.0.0/24}}]
endpoints: [{{name: l2echo, node: node-2, service: l2-net}}]
pods: [{{name: l2web, node: node-1, annotations: {{networkservicemesh.io: "kernel://l2-net/nsm-1"}}}}]
"#
        ),
        &[],
    );
    let c = &lab.status().connections[0];
    assert_eq!(c.state, "UP", "{c:?}");
    // A TAP carries Ethernet frames: the pod's interface has a MAC and the
    // forwarder answers its ARP for the peer, so a ping crosses the nodes.
    let link = String::from_utf8_lossy(
        &lab.exec("l2web", &["ip", "-o", "link", "show", "nsm-1"])
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(link.contains("link/ether"), "nsm-1 is a TAP: {link}");
    assert!(
        ping(&lab, "l2web", &c.dst_ip),
        "ping {} over the TAP",
        c.dst_ip
    );
    let neigh = String::from_utf8_lossy(
        &lab.exec("l2web", &["ip", "neigh", "show", "dev", "nsm-1"])
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        neigh.contains(&c.dst_ip),
        "the peer was resolved by ARP: {neigh}"
    );
}

/// `nsm-testbed restart` from the command line: a forwarder killed with
/// SIGKILL comes back and the pod's connection heals; a program asked of
/// a member it does not run on is refused with a message saying where it
/// runs.
#[test]
fn cli_restart_brings_a_killed_forwarder_back() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let name = unique_lab_name("mcli");
    let file = dir.path().join("lab.yaml");
    std::fs::write(
        &file,
        two_node_topology(
            &name,
            r#"  - {name: web, node: node-1, annotations: {networkservicemesh.io: "kernel://secure-net/nsm-1"}}"#,
        ),
    )
    .unwrap();
    let testbed = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nsm-testbed"))
            .env("NSM_TESTBED_DIR", &state)
            .args(args)
            .output()
            .unwrap()
    };
    // The lab outlives the commands; the guard removes it whatever happens.
    struct Down<'a>(&'a dyn Fn(&[&str]) -> std::process::Output, &'a str);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = (self.0)(&["down", self.1]);
        }
    }
    let _down = Down(&testbed, &name);
    let up = testbed(&["up", file.to_str().unwrap()]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let status = || -> serde_json::Value {
        serde_json::from_slice(&testbed(&["status", "--json", "--lab", &name]).stdout).unwrap()
    };
    let forwarder_pid = |st: &serde_json::Value| {
        st["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| {
                p["member"] == "node-1" && p["program"] == "nsm-forwarder" && p["running"] == true
            })
            .map(|p| p["pid"].as_i64().unwrap())
    };
    let st = status();
    let dst = st["connections"][0]["dst_ip"].as_str().unwrap().to_string();
    let ping = || {
        testbed(&[
            "exec", "--lab", &name, "web", "--", "ping", "-c", "1", "-W", "1", &dst,
        ])
        .status
        .success()
    };
    assert!(ping(), "traffic before");
    let old = forwarder_pid(&st).expect("a running forwarder");
    let killed = Command::new("kill")
        .args(["-9", &old.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let out = testbed(&["restart", "--lab", &name, "node-1", "nsm-forwarder"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nsm-forwarder on node-1 restarted"));
    let new = forwarder_pid(&status()).expect("running again");
    assert_ne!(new, old);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ping() {
        assert!(
            Instant::now() < deadline,
            "no traffic 60 s after the restart"
        );
    }

    let out = testbed(&["restart", "--lab", &name, "web", "nsm-forwarder"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nsm-forwarder does not run on web"),
        "{stderr}"
    );
}

/// Forwarders started with two lanes (`NSM_FORWARDER_LANES=2`): the demo's
/// cross-node connection runs on two lanes at both ends, negotiated by the
/// managers through the WIREGUARD mechanism's lane-port parameters, and
/// parallel TCP streams use both. A policy that gives the connection a
/// chain drops both ends to one lane (the client's manager re-requests
/// through the peer), and traffic still crosses.
#[test]
fn connections_run_on_lanes_until_a_chain_needs_one() {
    let name = unique_lab_name("lanes");
    let demo =
        include_str!("../topologies/demo.yaml").replace("name: demo", &format!("name: {name}"));
    let env = [
        ("NSM_FORWARDER_WORKERS".to_string(), "2".to_string()),
        ("NSM_FORWARDER_LANES".to_string(), "2".to_string()),
    ];
    let (_dir, lab) = up_with_env(&demo, &[], &env);
    let conn = lab
        .status()
        .connections
        .first()
        .expect("the demo's connection")
        .clone();
    assert_eq!(conn.state, "UP", "{conn:?}");
    let lanes = |node: &str| -> Vec<nsm_proto::forwarder::v1::Lane> {
        let all = lab.cross_connects(node).expect("List");
        let wg: Vec<_> = all.into_iter().filter(|x| !x.lanes.is_empty()).collect();
        assert_eq!(wg.len(), 1, "{node}: one cross-node connection");
        wg[0].lanes.clone()
    };
    assert_eq!(lanes("node-1").len(), 2, "client side");
    assert_eq!(lanes("node-2").len(), 2, "endpoint side");
    assert!(ping(&lab, "web", &conn.dst_ip));
    let iperf = lab
        .exec(
            "web",
            &["iperf3", "-c", &conn.dst_ip, "-P", "8", "-t", "1", "-J"],
        )
        .unwrap();
    assert!(
        iperf.status.success(),
        "{}",
        String::from_utf8_lossy(&iperf.stdout)
    );
    for node in ["node-1", "node-2"] {
        for (k, lane) in lanes(node).iter().enumerate() {
            assert!(lane.established, "{node} lane {k}: {lane:?}");
            assert!(
                lane.rx_packets > 100,
                "{node} lane {k} carried streams: {lane:?}"
            );
        }
    }

    lab.set_policies_yaml(
        "policies: [{name: count, match: {service: secure-net}, chain: [{counter: {}}]}]",
    )
    .expect("policy");
    let deadline = Instant::now() + TIMEOUT;
    while lanes("node-1").len() != 1 || lanes("node-2").len() != 1 {
        assert!(Instant::now() < deadline, "both ends down to one lane");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        ping(&lab, "web", &conn.dst_ip),
        "traffic crosses on one lane"
    );
    lab.down().expect("down");
}
