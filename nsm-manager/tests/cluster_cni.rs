//! Cluster mode end to end: a real API server, a testbed node running the
//! real `nsm-forwarder` and `nsm-manager --kubeconfig`, real `nsm-endpoint`s,
//! and a pod attached by `cnitool` with Debian's `bridge` + `host-local` as
//! the primary network and `nsm-cni` chained after it. The pod's annotation
//! lives only in the API server (cnitool passes no annotations), so the
//! plugin goes through the manager's `Pods/Attach`.
//!
//! Needs root (namespaces), the mesh binaries built (`cargo build
//! --workspace --bins`: the test command does), `scripts/ensure-cnitool`,
//! `/usr/lib/cni`, etcd and the cached kube-apiserver.
//!
//! The API server listens on loopback of the root namespace; the node's
//! manager runs in the node's namespace, whose loopback is another one. A
//! relay (a listener made inside the node's namespace, connecting out from
//! ours) gives the manager the same `https://127.0.0.1:PORT` there.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use nsm_k8s::testing::ApiServer;
use nsm_testbed::lab::{Lab, Options};
use nsm_testbed::testing::{require_root, unique_lab_name};
use nsm_testbed::{Topology, sys};
use serde_json::Value;

const NODE: &str = "node-1";

/// Processes this test started; killed when dropped (also on panic).
struct Kids(Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn program(name: &str) -> PathBuf {
    sys::find_program(name).unwrap_or_else(|| {
        panic!(
            "{name} not built: run `cargo build --workspace --bins` first (the test command does)"
        )
    })
}

/// A listener on 127.0.0.1:`port` inside `netns` that relays every
/// connection to 127.0.0.1:`port` of this (the root) namespace. The socket
/// is made on a thread that entered the namespace; sockets stay in the
/// namespace they were made in, the relay itself runs here.
fn relay(netns: &Path, port: u16) {
    let path = netns.to_path_buf();
    let listener = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap()
    })
    .join()
    .unwrap();
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { continue };
            std::thread::spawn(move || {
                let Ok(outbound) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                    return;
                };
                let (mut ri, mut wi) = (inbound.try_clone().unwrap(), inbound);
                let (mut ro, mut wo) = (outbound.try_clone().unwrap(), outbound);
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut ri, &mut wo);
                    let _ = wo.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut ro, &mut wi);
                let _ = wi.shutdown(std::net::Shutdown::Write);
                let _ = up.join();
            });
        }
    });
}

fn netns_path(lab: &Lab, member: &str) -> PathBuf {
    Path::new(sys::NETNS_DIR).join(lab.netns(member).unwrap())
}

fn links(lab: &Lab, member: &str) -> String {
    String::from_utf8_lossy(&lab.exec(member, &["ip", "-o", "link"]).unwrap().stdout).into_owned()
}

fn has_link(lab: &Lab, member: &str, ifname: &str) -> bool {
    let l = links(lab, member);
    // veths show as `NAME@ifN:`.
    l.contains(&format!(": {ifname}:")) || l.contains(&format!(": {ifname}@"))
}

fn ping(lab: &Lab, from: &str, to: &str) -> bool {
    lab.exec(from, &["ping", "-c", "1", "-W", "2", to])
        .unwrap()
        .status
        .success()
}

fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn annotate(rt: &tokio::runtime::Runtime, pods: &Api<Pod>, value: &str) {
    let patch = serde_json::json!({"metadata": {"annotations": {"networkservicemesh.io": value}}});
    rt.block_on(pods.patch("web", &PatchParams::default(), &Patch::Merge(&patch)))
        .unwrap();
}

/// The endpoint address of `ifname` in a CNI result: our interfaces'
/// routes point at it (a /32).
fn endpoint_of(result: &Value, ifname: &str) -> String {
    let ifaces = result["interfaces"].as_array().unwrap();
    let idx = ifaces
        .iter()
        .position(|i| i["name"] == ifname)
        .unwrap_or_else(|| panic!("{ifname} in {result}"));
    let mine: Vec<&str> = result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|ip| ip["interface"] == idx)
        .map(|ip| ip["address"].as_str().unwrap())
        .collect();
    assert!(!mine.is_empty(), "{ifname} has an address: {result}");
    // Routes carry no interface index; ours are the /32s that are not our own address.
    result["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["dst"].as_str().unwrap())
        .filter(|d| d.ends_with("/32") && !mine.contains(d))
        .map(|d| d.trim_end_matches("/32").to_string())
        .next()
        .unwrap_or_else(|| panic!("a route to the endpoint of {ifname}: {result}"))
}

#[test]
fn pod_annotation_from_the_api_server_gives_interfaces_through_cni_add() {
    require_root();
    let cnitool = Command::new("scripts/ensure-cnitool")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("scripts/ensure-cnitool runs");
    assert!(cnitool.status.success(), "ensure-cnitool failed");
    let cnitool = String::from_utf8(cnitool.stdout)
        .unwrap()
        .trim()
        .to_string();
    let (cni, endpoint) = (program("nsm-cni"), program("nsm-endpoint"));
    program("nsm-forwarder");
    program("nsm-manager");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut server = ApiServer::start().expect("API server starts");
    let admin = rt.block_on(server.client()).unwrap();
    let port: u16 = server.url().rsplit(':').next().unwrap().parse().unwrap();
    // CRDs and namespace, as an operator installs them.
    for f in ["namespace.yaml", "crds.yaml"] {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(server.kubeconfig())
            .args(["apply", "-f"])
            .arg(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../deploy")
                    .join(f),
            )
            .output()
            .expect("kubectl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::thread::sleep(Duration::from_secs(2)); // CRDs established

    // One node; the endpoints are pods this test starts `nsm-endpoint` in
    // once the manager can reach the API server.
    let name = unique_lab_name("k8s");
    let topology = format!(
        r#"
name: {name}
nodes: [{{name: {NODE}}}]
services:
  - {{name: alpha, cidr: 172.31.1.0/24}}
  - {{name: beta, cidr: 172.31.2.0/24}}
pods:
  - {{name: alpha-1, node: {NODE}}}
  - {{name: beta-1, node: {NODE}}}
  - {{name: web, node: {NODE}}}
"#
    );
    let state = tempfile::tempdir().unwrap();
    let kubeconfig = server.kubeconfig().display().to_string();
    let opts = Options {
        state_root: state.path().to_path_buf(),
        progress: false,
        mesh: true,
        manager_args: vec![
            "--kubeconfig".into(),
            kubeconfig,
            "--max-token-lifetime".into(),
            "15s".into(),
        ],
    };
    let mut lab = Lab::up(Topology::parse(&topology).unwrap(), &opts).expect("lab up");
    relay(&netns_path(&lab, NODE), port);
    let mut kids = Kids(Vec::new());
    for (pod, service) in [("alpha-1", "alpha"), ("beta-1", "beta")] {
        let sock = lab.dir().join(format!("{pod}.sock"));
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.netns(pod).unwrap()])
            .arg(&endpoint)
            .args(["--name", pod, "--service", service, "--manager"])
            .arg(lab.manager_socket(NODE))
            .arg("--listen")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        kids.0.push(child);
        eventually("endpoint listening", Duration::from_secs(20), || {
            sock.exists()
        });
    }

    // The pod object: scheduled to our node, asking for two services.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "default",
                     "annotations": {"networkservicemesh.io": "kernel://alpha/nsm-a,kernel://beta/nsm-b"}},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "example.invalid/app"}]}
    }))
    .unwrap();
    rt.block_on(pods.create(&PostParams::default(), &pod))
        .unwrap();

    // CNI ADD as a runtime would run it: bridge + host-local, then nsm-cni.
    let netconf = tempfile::tempdir().unwrap();
    std::fs::write(
        netconf.path().join("10-mesh.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "mesh",
            "plugins": [
                {"type": "bridge", "bridge": "cni0",
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.18.200.0/24"}]],
                          "dataDir": netconf.path().join("ipam")}},
                {"type": "nsm-cni", "socket": lab.manager_socket(NODE), "timeoutSeconds": 20}
            ]
        })
        .to_string(),
    )
    .unwrap();
    let bins = cni.parent().unwrap().display().to_string();
    let web = netns_path(&lab, "web");
    let node_netns = lab.netns(NODE).unwrap();
    let cnitool_run = |cmd: &str| {
        Command::new("ip")
            .args(["netns", "exec", &node_netns, &cnitool, cmd, "mesh"])
            .arg(&web)
            .env("NETCONFPATH", netconf.path())
            .env("CNI_PATH", format!("/usr/lib/cni:{bins}"))
            .env("CNI_IFNAME", "net1")
            // As kubelet passes them: IgnoreUnknown keeps the reference plugins quiet.
            .env(
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
            )
            .output()
            .unwrap()
    };
    // If an assertion fails before the test's own DEL, DEL still runs
    // (idempotent) while the lab is up, so nothing of the ADD outlives it.
    struct DelOnDrop<F: Fn(&str) -> std::process::Output>(F);
    impl<F: Fn(&str) -> std::process::Output> Drop for DelOnDrop<F> {
        fn drop(&mut self) {
            let _ = (self.0)("del");
        }
    }
    let del_guard = DelOnDrop(&cnitool_run);
    let out = cnitool_run("add");
    assert!(
        out.status.success(),
        "cnitool add: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(has_link(&lab, "web", "net1"), "{}", links(&lab, "web"));
    assert!(
        has_link(&lab, "web", "nsm-a") && has_link(&lab, "web", "nsm-b"),
        "{result}\n{}\nmanager log: {}",
        links(&lab, "web"),
        std::fs::read_to_string(
            lab.dir()
                .join("logs")
                .join(format!("{NODE}-nsm-manager.log"))
        )
        .unwrap_or_default()
    );
    let (to_a, to_b) = (endpoint_of(&result, "nsm-a"), endpoint_of(&result, "nsm-b"));
    assert!(ping(&lab, "web", &to_a), "ping alpha endpoint {to_a}");
    assert!(ping(&lab, "web", &to_b), "ping beta endpoint {to_b}");
    // Removing one request from the annotation removes that interface only.
    annotate(&rt, &pods, "kernel://alpha/nsm-a");
    eventually("nsm-b removed", Duration::from_secs(5), || {
        !has_link(&lab, "web", "nsm-b")
    });
    assert!(ping(&lab, "web", &to_a));

    // A manager restart loses nothing.
    lab.restart(NODE, "nsm-manager").expect("manager restarts");
    assert!(
        ping(&lab, "web", &to_a),
        "traffic across the manager restart"
    );
    annotate(&rt, &pods, "kernel://alpha/nsm-a,kernel://beta/nsm-c");
    eventually(
        "nsm-c added after the restart",
        Duration::from_secs(10),
        || has_link(&lab, "web", "nsm-c"),
    );

    // The API server away for 30 s: traffic keeps flowing, refreshes (every
    // 5 s) keep working from the manager's cache.
    server.pause();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        assert!(ping(&lab, "web", &to_a), "traffic during the API outage");
        std::thread::sleep(Duration::from_secs(3));
    }
    server.resume().expect("API server back");
    annotate(&rt, &pods, "kernel://beta/nsm-c");
    eventually(
        "caught up after the outage",
        Duration::from_secs(20),
        || !has_link(&lab, "web", "nsm-a") && has_link(&lab, "web", "nsm-c"),
    );

    // CNI DEL removes the rest, and is repeatable.
    assert!(cnitool_run("del").status.success());
    assert!(!has_link(&lab, "web", "nsm-c"), "{}", links(&lab, "web"));
    assert!(cnitool_run("del").status.success());
    drop(del_guard);
    rt.block_on(pods.delete("web", &DeleteParams::default().grace_period(0)))
        .unwrap();
    drop(kids);
    drop(lab);
}
