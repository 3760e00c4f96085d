//! Security of the mesh in labs: real forwarders, managers and endpoints in
//! network namespaces, managers with SPIFFE identities from the lab's CA
//! (`nsmctl ca issue` at `up`), talking mTLS over the underlay.
//!
//! What a rogue can do is tried from inside a lab node's namespace with a
//! manager-like client (nsm-manager's own mTLS client, with an identity from
//! another CA, from the lab's CA, or none) against a manager's peer port.
//! Each test also checks that no private key (PEM bodies of the CA and
//! node keys, WireGuard private keys) appears in any log of its lab.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nsm_manager::identity::{self, Identity, IdentityPaths, IdentitySource};
use nsm_manager::tls::Tls;
use nsm_manager::token;
use nsm_proto::connection::{Connection, Mechanism, Path as NsmPath, PathSegment};
use nsm_proto::forwarder::v1 as pb;
use nsm_proto::mechanisms::{self, cls, wireguard};
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
use nsm_proto::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use nsm_proto::registry::{NetworkServiceEndpoint, NetworkServiceEndpointQuery};
use nsm_testbed::lab::{Lab, Options, TRUST_DOMAIN};
use nsm_testbed::mesh::{self, RequestedConnection};
use nsm_testbed::testing::{require_root, unique_lab_name};
use nsm_testbed::{Topology, netns_name, sys};
use tonic::Code;
use tonic::transport::Channel;

const TIMEOUT: Duration = Duration::from_secs(20);

/// A WireGuard public key for crafted peer requests (32 bytes of 7).
const FORGED_PEER_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

// ---------------------------------------------------------------- labs

fn up(topology: &str, manager_args: &[&str]) -> (tempfile::TempDir, Lab) {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        state_root: dir.path().to_path_buf(),
        progress: false,
        mesh: true,
        manager_args: manager_args.iter().map(|s| s.to_string()).collect(),
    };
    let lab = Lab::up(Topology::parse(topology).expect("valid topology"), &opts)
        .expect("lab comes up with its mesh");
    assert!(
        lab.missing_binaries().is_empty(),
        "mesh binaries not built: {:?} (the test command builds them first)",
        lab.missing_binaries()
    );
    assert!(
        lab.identity_dir("node-1")
            .join(identity::CERT_FILE)
            .exists(),
        "nsmctl not built: the lab's managers have no identities"
    );
    (dir, lab)
}

/// Two nodes; `echo` serves secure-net on node-2, `local` local-net on node-1.
fn topology(name: &str, endpoint_run: &str, extra: &str) -> String {
    format!(
        r#"
name: {name}
nodes: [{{name: node-1}}, {{name: node-2}}]
services:
  - {{name: secure-net, cidr: 172.31.0.0/24}}
  - {{name: local-net, cidr: 172.30.0.0/24}}
endpoints:
  - {{name: echo, node: node-2, service: secure-net, labels: {{app: echo}}{endpoint_run}}}
  - {{name: local, node: node-1, service: local-net}}
{extra}
"#
    )
}

fn manager_id(node: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/nsm-manager/{node}")
}

fn netns_path(lab: &Lab, member: &str) -> PathBuf {
    Path::new(sys::NETNS_DIR).join(lab.netns(member).unwrap())
}

/// `HOST:PORT` of a node manager's peer (mTLS) port.
fn peer_addr(lab: &Lab, node: &str) -> String {
    lab.manager_url(node)
        .strip_prefix("tcp://")
        .unwrap()
        .to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `f` on a thread inside `member`'s network namespace (only that
/// thread moves; the test's own threads stay where they are).
fn in_netns<T: Send>(lab: &Lab, member: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = netns_path(lab, member);
    std::thread::scope(|s| {
        s.spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

fn request(
    lab: &Lab,
    pod: &str,
    node: &str,
    ifname: &str,
    service: &str,
    labels: &[(&str, &str)],
) -> Result<Connection, String> {
    let req = RequestedConnection {
        id: format!("{}-{pod}-{ifname}", lab.name()),
        pod: pod.into(),
        node: node.into(),
        interface: ifname.into(),
        service: service.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    mesh::request(
        &lab.manager_socket(node),
        &netns_path(lab, pod),
        &req,
        true,
        TIMEOUT,
    )
}

fn addrs(conn: &Connection) -> (String, String) {
    let ip = conn.context.as_ref().unwrap().ip_context.as_ref().unwrap();
    let first = |v: &[String]| v[0].split('/').next().unwrap().to_string();
    (first(&ip.src_ip_addrs), first(&ip.dst_ip_addrs))
}

fn ping(lab: &Lab, from: &str, to: &str) -> bool {
    lab.exec(from, &["ping", "-c", "1", "-W", "2", to])
        .unwrap()
        .status
        .success()
}

fn interfaces(lab: &Lab, member: &str) -> BTreeSet<String> {
    let out = lab.exec(member, &["ip", "-o", "link"]).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap().to_string())
        .collect()
}

/// A forwarder's cross-connects (its List, over its unix socket).
fn cross_connects(lab: &Lab, node: &str) -> Vec<pb::CrossConnectStatus> {
    lab.cross_connects(node).expect("forwarder List")
}

/// Endpoint names in the lab's registry, asked through `node`'s manager.
fn registered(lab: &Lab, node: &str) -> BTreeSet<String> {
    let socket = lab.manager_socket(node);
    runtime().block_on(async {
        let ch = nsm_proto::uds::connect_unix(&socket).await.unwrap();
        let mut stream = NetworkServiceEndpointRegistryClient::new(ch)
            .find(NetworkServiceEndpointQuery {
                network_service_endpoint: Some(NetworkServiceEndpoint::default()),
                watch: false,
            })
            .await
            .expect("registry Find")
            .into_inner();
        let mut names = BTreeSet::new();
        while let Some(r) = stream.message().await.expect("registry Find stream") {
            if let Some(nse) = r.network_service_endpoint {
                names.insert(nse.name);
            }
        }
        names
    })
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn log_of(lab: &Lab, member: &str, program: &str) -> String {
    let p = lab
        .processes()
        .iter()
        .find(|p| p.member == member && p.program == program)
        .unwrap();
    std::fs::read_to_string(&p.log).unwrap_or_default()
}

// ---------------------------------------------------------------- identities

/// An identity for `id` issued into a fresh directory under the lab's state
/// directory: from the lab's CA, or from `rogue_ca` (which also trusts the
/// lab's CA, so that only the manager's check can stop it).
fn issue(lab: &Lab, id: &str, rogue_ca: Option<&Path>) -> Arc<Tls> {
    let out = lab.dir().join(id.replace(['/', ':'], "_"));
    let lab_ca = lab.dir().join("ca");
    identity::issue(
        rogue_ca.unwrap_or(&lab_ca),
        id,
        Duration::from_secs(600),
        &out,
    )
    .unwrap();
    if rogue_ca.is_some() {
        let mut bundle = std::fs::read(out.join(identity::CA_FILE)).unwrap();
        bundle.extend(std::fs::read(lab_ca.join(identity::CA_FILE)).unwrap());
        identity::write_file_atomic(&out.join(identity::CA_FILE), &bundle, 0o644).unwrap();
    }
    Tls::new(IdentitySource::load(IdentityPaths::in_dir(&out)).unwrap())
}

fn current_leaf(lab: &Lab, node: &str) -> Vec<u8> {
    Identity::load(&IdentityPaths::in_dir(&lab.identity_dir(node)))
        .unwrap()
        .chain[0]
        .to_vec()
}

/// Re-issues a node manager's certificate from the lab's CA, as an operator
/// (or cert-manager) would: with `nsmctl ca issue` into its identity dir.
fn rotate(lab: &Lab, node: &str) {
    reissue(lab, &manager_id(node), &lab.identity_dir(node));
}

/// Issues `id` from the lab's CA into `dir` (over what is there).
fn reissue(lab: &Lab, id: &str, dir: &Path) {
    let nsmctl = sys::find_program("nsmctl").expect("nsmctl built");
    sys::run(
        nsmctl.to_str().unwrap(),
        [
            "ca",
            "issue",
            "--dir",
            lab.dir().join("ca").to_str().unwrap(),
            "--id",
            id,
            "--ttl",
            "2h",
            "--out",
            dir.to_str().unwrap(),
        ],
    )
    .expect("nsmctl ca issue");
}

// ---------------------------------------------------------------- secrets in logs

/// The base64 bodies of every PEM private key of the lab (CA and nodes).
fn pem_key_bodies(lab: &Lab) -> Vec<(String, String)> {
    let mut files = vec![lab.dir().join("ca").join(identity::CA_KEY_FILE)];
    for n in &lab.plan().nodes {
        files.push(lab.identity_dir(&n.name).join(identity::KEY_FILE));
        files.push(lab.forwarder_identity_dir(&n.name).join(identity::KEY_FILE));
    }
    for e in lab.topology().endpoints.iter().filter(|e| !e.passthrough) {
        files.push(lab.endpoint_identity_dir(&e.name).join(identity::KEY_FILE));
    }
    files
        .into_iter()
        .map(|f| {
            let pem = std::fs::read_to_string(&f).unwrap();
            let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            (f.display().to_string(), body)
        })
        .collect()
}

/// Every log of the lab, concatenated.
fn all_logs(lab: &Lab) -> String {
    let mut text = String::new();
    for e in std::fs::read_dir(lab.dir().join("logs")).unwrap() {
        text.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap_or_default());
    }
    text
}

/// Strings in `text` shaped like a WireGuard key: 43 base64 characters and
/// one `=`, not part of a longer base64 run.
fn wg_shaped(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '='))
        .filter(|w| w.len() == 44 && w.ends_with('=') && !w[..43].contains('='))
        .map(str::to_string)
        .collect()
}

/// No private key in any log: not the PEM keys (`keys`: every generation
/// seen, a 24-character run of the base64 is a leak), not "PRIVATE KEY",
/// and every WireGuard-key-shaped string is a public key the forwarders
/// report (their private keys exist only in their memory).
fn assert_no_keys_in_logs(lab: &Lab, keys: &[(String, String)]) {
    let logs = all_logs(lab);
    assert!(!logs.is_empty(), "the lab wrote logs");
    assert!(
        !logs.contains("PRIVATE KEY"),
        "a PEM private key in the logs"
    );
    for (file, body) in keys {
        for chunk in body.as_bytes().chunks(24).filter(|c| c.len() == 24) {
            let chunk = std::str::from_utf8(chunk).unwrap();
            assert!(!logs.contains(chunk), "{file} leaked into the logs");
        }
    }
    let mut public: BTreeSet<String> = lab
        .plan()
        .nodes
        .iter()
        .flat_map(|n| cross_connects(lab, &n.name))
        .map(|x| x.wireguard_public_key)
        .collect();
    public.insert(FORGED_PEER_KEY.to_string());
    for k in wg_shaped(&logs) {
        assert!(
            public.contains(&k),
            "a WireGuard-key-shaped string in the logs is no known public key: {k}"
        );
    }
}

// ---------------------------------------------------------------- crafted peer requests

/// What a peer manager sends: a path of [client (unsigned), peer segment]
/// and a WIREGUARD preference, for secure-net.
fn peer_request(seg_id: &str, token: String, peer_name: &str) -> NetworkServiceRequest {
    let params: HashMap<String, String> = [
        (wireguard::SRC_IP.to_string(), "198.51.100.200".to_string()),
        (wireguard::SRC_PORT.to_string(), "51820".to_string()),
        (
            wireguard::SRC_PUBLIC_KEY.to_string(),
            FORGED_PEER_KEY.to_string(),
        ),
    ]
    .into();
    let exp = SystemTime::now() + Duration::from_secs(300);
    NetworkServiceRequest {
        connection: Some(Connection {
            id: seg_id.to_string(),
            network_service: "secure-net".into(),
            path: Some(NsmPath {
                index: 1,
                path_segments: vec![
                    PathSegment {
                        name: "client".into(),
                        id: nsm_manager::util::uuid(),
                        ..Default::default()
                    },
                    PathSegment {
                        name: peer_name.into(),
                        id: seg_id.to_string(),
                        token,
                        expires: Some(nsm_manager::util::to_ts(exp)),
                        ..Default::default()
                    },
                ],
            }),
            ..Default::default()
        }),
        mechanism_preferences: vec![Mechanism {
            cls: cls::REMOTE.into(),
            r#type: mechanisms::WIREGUARD.into(),
            parameters: params,
        }],
    }
}

/// A call refused at the TLS handshake: the client sees the connection
/// fail or close, never an answer (not even PermissionDenied, which would
/// mean a handler ran).
fn assert_refused(what: &str, r: Result<(), Code>) {
    match r {
        Err(code) => assert!(
            matches!(
                code,
                Code::Unavailable | Code::Cancelled | Code::Unknown | Code::Internal
            ),
            "{what}: {code:?}"
        ),
        Ok(()) => panic!("{what}: accepted"),
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn a_rogue_manager_cannot_register_or_request() {
    let name = unique_lab_name("srog");
    let (_dir, lab) = up(&topology(&name, "", ""), &[]);
    let keys = pem_key_bodies(&lab);
    let before = registered(&lab, "node-1");
    assert!(
        before.contains("echo") && before.contains("local"),
        "{before:?}"
    );
    let rogue_ca = lab.dir().join("rogue-ca");
    // Same trust domain name, another CA key: only the chain tells.
    identity::create_ca(&rogue_ca, TRUST_DOMAIN, Duration::from_secs(3600)).unwrap();
    let rogue = issue(&lab, &manager_id("node-2"), Some(&rogue_ca));
    let member = issue(&lab, &manager_id("node-9"), None);
    let registry = peer_addr(&lab, "node-1");
    let node1 = registry.clone();
    let nse = NetworkServiceEndpoint {
        name: "rogue".into(),
        network_service_names: vec!["secure-net".into()],
        url: "tcp://198.51.100.200:5001".into(),
        ..Default::default()
    };
    let register = |ch: Channel| {
        let nse = nse.clone();
        async move {
            NetworkServiceEndpointRegistryClient::new(ch)
                .register(nse)
                .await
                .map(drop)
                .map_err(|s| s.code())
        }
    };
    let request = |ch: Channel| async move {
        NetworkServiceClient::new(ch)
            .request(peer_request(
                &nsm_manager::util::uuid(),
                String::new(),
                "node-2",
            ))
            .await
            .map(drop)
            .map_err(|s| s.code())
    };
    // From node-2's namespace, where a real peer manager lives.
    let (rogue_reg, rogue_req, plain_reg, plain_req, member_find) =
        in_netns(&lab, "node-2", || {
            runtime().block_on(async {
                let ch = rogue.channel(&registry).unwrap();
                let rogue_reg = register(ch.clone()).await;
                let rogue_req = request(ch).await;
                let plain = nsm_manager::util::channel(&format!("tcp://{node1}")).unwrap();
                let plain_reg = register(plain.clone()).await;
                let plain_req = request(plain).await;
                // A member of the mesh gets through the same door.
                let member_find =
                    NetworkServiceEndpointRegistryClient::new(member.channel(&registry).unwrap())
                        .find(NetworkServiceEndpointQuery {
                            network_service_endpoint: Some(NetworkServiceEndpoint::default()),
                            watch: false,
                        })
                        .await
                        .map(drop)
                        .map_err(|s| s.code());
                (rogue_reg, rogue_req, plain_reg, plain_req, member_find)
            })
        });
    assert_refused("register with a rogue CA's certificate", rogue_reg);
    assert_refused("request with a rogue CA's certificate", rogue_req);
    assert_refused("register without TLS", plain_reg);
    assert_refused("request without TLS", plain_req);
    assert_eq!(member_find, Ok(()), "a member's handshake succeeds");
    // The manager refused the handshakes (and says so), and nothing changed.
    let log = log_of(&lab, "node-1", "nsm-manager");
    assert!(log.contains("mTLS handshake refused"), "{log}");
    assert_eq!(
        registered(&lab, "node-1"),
        before,
        "the registry is unchanged"
    );
    assert!(cross_connects(&lab, "node-1").is_empty());
    assert!(
        mesh::connections(&lab.manager_socket("node-1"), TIMEOUT)
            .unwrap()
            .is_empty()
    );
    assert_no_keys_in_logs(&lab, &keys);
}

#[test]
fn a_connection_keeps_working_across_a_certificate_rotation() {
    let name = unique_lab_name("srot");
    // Short token lifetime: the connection is refreshed (new tokens, node-1
    // to node-2) a few times while the certificates change under it.
    let (_dir, lab) = up(
        &topology(
            &name,
            "",
            r#"pods:
  - {name: web, node: node-1, annotations: {networkservicemesh.io: "kernel://secure-net/nsm-1"}}"#,
        ),
        &["--identity-reload", "200ms", "--max-token-lifetime", "6s"],
    );
    let mut keys = pem_key_bodies(&lab);
    let c = &lab.status().connections[0];
    assert_eq!(c.state, "UP", "{c:?}");
    let dst = c.dst_ip.clone();
    assert!(ping(&lab, "web", &dst));
    let old = [current_leaf(&lab, "node-1"), current_leaf(&lab, "node-2")];

    // A ping runs across the rotation and past at least one token lifetime.
    let pinger: Child = lab
        .command("web", &["ping", "-q", "-i", "0.1", "-w", "10", &dst])
        .unwrap()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    rotate(&lab, "node-1");
    rotate(&lab, "node-2");
    keys.extend(pem_key_bodies(&lab));
    let new = [current_leaf(&lab, "node-1"), current_leaf(&lab, "node-2")];
    assert!(new[0] != old[0] && new[1] != old[1]);
    wait_until("both managers load their new certificates", TIMEOUT, || {
        ["node-1", "node-2"]
            .iter()
            .all(|n| log_of(&lab, n, "nsm-manager").contains("identity rotated"))
    });
    // node-1 refreshes its connection with tokens from its new key, and
    // node-2 (over the HTTP/2 connection of before) accepts them.
    let signed_by_new_key = || {
        mesh::connections(&lab.manager_socket("node-1"), TIMEOUT)
            .unwrap()
            .iter()
            .flat_map(|c| c.path.iter().flat_map(|p| p.path_segments.iter()))
            .filter_map(|s| token::decode(0, &s.token).ok())
            .any(|d| d.claims.sub == manager_id("node-1") && d.x5c.as_ref() == Some(&new[0]))
    };
    wait_until(
        "node-1's path token is signed with its new key",
        TIMEOUT,
        signed_by_new_key,
    );
    let out = pinger.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains(" 0% packet loss"),
        "the ping broke during the rotation: {summary}"
    );
    let after = lab.status().connections;
    assert_eq!(after[0].state, "UP", "{after:?}");
    assert_eq!(
        mesh::connections(&lab.manager_socket("node-2"), TIMEOUT)
            .unwrap()
            .len(),
        1,
        "node-2 kept the connection"
    );
    assert!(ping(&lab, "web", &dst));

    // New requests work after, and a new handshake sees the new certificate.
    let conn = request(&lab, "web", "node-1", "nsm-2", "secure-net", &[]).expect("new request");
    let (_, dst2) = addrs(&conn);
    assert!(ping(&lab, "web", &dst2));
    let member = issue(&lab, &manager_id("node-9"), None);
    let node2 = peer_addr(&lab, "node-2");
    let seen = in_netns(&lab, "node-1", || {
        runtime().block_on(member.peer_id(&node2)).unwrap()
    });
    assert_eq!(seen, manager_id("node-2"));
    assert_no_keys_in_logs(&lab, &keys);
}

#[test]
fn tampered_or_expired_tokens_are_denied_and_leave_nothing() {
    let name = unique_lab_name("stok");
    let (_dir, lab) = up(&topology(&name, "", ""), &[]);
    let keys = pem_key_bodies(&lab);
    // A member of the mesh with a valid certificate, crafting its tokens.
    let node9 = issue(&lab, &manager_id("node-9"), None);
    let id9 = node9.identity();
    let node2 = peer_addr(&lab, "node-2");
    let aud = manager_id("node-2");
    let now = SystemTime::now();
    let later = now + Duration::from_secs(300);
    let seg = nsm_manager::util::uuid();
    let good = token::sign(&id9, &aud, &seg, now, later).unwrap();
    // Tampered: the claims of another token (another segment) under this
    // token's signature.
    let other = token::sign(&id9, &aud, "another-segment", now, later).unwrap();
    let g: Vec<&str> = good.split('.').collect();
    let o: Vec<&str> = other.split('.').collect();
    let tampered = format!("{}.{}.{}", g[0], o[1], g[2]);
    let expired = token::sign(
        &id9,
        &aud,
        &seg,
        now - Duration::from_secs(60),
        now - Duration::from_secs(30),
    )
    .unwrap();
    let echo_before = interfaces(&lab, "echo");
    let cases = [
        ("tampered", tampered),
        ("expired", expired),
        ("replayed from another segment", other.clone()),
        ("unsigned", String::new()),
    ];
    for (what, tok) in cases {
        let r = in_netns(&lab, "node-1", || {
            runtime().block_on(async {
                NetworkServiceClient::new(node9.channel(&node2).unwrap())
                    .request(peer_request(&seg, tok, "node-9"))
                    .await
            })
        });
        let err = r.expect_err(what);
        assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
        assert!(cross_connects(&lab, "node-2").is_empty(), "{what}");
        assert!(
            mesh::connections(&lab.manager_socket("node-2"), TIMEOUT)
                .unwrap()
                .is_empty(),
            "{what}"
        );
        assert_eq!(interfaces(&lab, "echo"), echo_before, "{what}");
    }
    // The genuine token goes through: the refusals above were the tokens'.
    // (Leases belong to the manager that starts a connection, node-9 here:
    // node-2 leases nothing for a peer's request, refused or not.)
    let ok = in_netns(&lab, "node-1", || {
        runtime().block_on(async {
            NetworkServiceClient::new(node9.channel(&node2).unwrap())
                .request(peer_request(&seg, good, "node-9"))
                .await
        })
    })
    .expect("the genuine token is accepted")
    .into_inner();
    assert_eq!(cross_connects(&lab, "node-2").len(), 1);
    assert_eq!(interfaces(&lab, "echo").len(), echo_before.len() + 1);
    assert_no_keys_in_logs(&lab, &keys);
    in_netns(&lab, "node-1", || {
        runtime().block_on(async {
            NetworkServiceClient::new(node9.channel(&node2).unwrap())
                .close(ok)
                .await
        })
    })
    .expect("its requester closes it");
    assert!(cross_connects(&lab, "node-2").is_empty());
    assert_eq!(interfaces(&lab, "echo"), echo_before);
    let log = log_of(&lab, "node-2", "nsm-manager");
    assert!(log.contains("request refused"), "{log}");
}

/// The security topology plus a pod `web` on node-1 with a secure-net
/// connection (`nsm-1`) that pings; the lab and the endpoint's address.
fn up_with_web_connection(prefix: &str) -> (tempfile::TempDir, Lab, String) {
    let name = unique_lab_name(prefix);
    let (dir, lab) = up(
        &topology(&name, "", "pods: [{name: web, node: node-1}]\n"),
        &[],
    );
    let conn = request(&lab, "web", "node-1", "nsm-1", "secure-net", &[])
        .expect("a request through managers, forwarders and the endpoint");
    let (_, dst) = addrs(&conn);
    wait_until("ping over the mesh", Duration::from_secs(10), || {
        ping(&lab, "web", &dst)
    });
    (dir, lab, dst)
}

/// A request straight to an endpoint's socket, bypassing the managers, with
/// `token` in the caller's segment.
fn endpoint_request(seg_id: &str, token: String) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            id: seg_id.into(),
            network_service: "secure-net".into(),
            path: Some(NsmPath {
                index: 0,
                path_segments: vec![PathSegment {
                    name: "rogue".into(),
                    id: seg_id.into(),
                    token,
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        mechanism_preferences: vec![Mechanism {
            cls: cls::LOCAL.into(),
            r#type: mechanisms::KERNEL.into(),
            parameters: [("name".to_string(), "nsm-x".to_string())].into(),
        }],
    }
}

#[test]
fn an_endpoint_accepts_only_requests_its_manager_signed_for_it() {
    // Through the mesh: node-2's manager signs for echo, which accepts.
    let (_dir, lab, dst) = up_with_web_connection("sep");
    let keys = pem_key_bodies(&lab);

    // Straight to echo's socket, from a process that is not its manager.
    let echo_id = format!("spiffe://{TRUST_DOMAIN}/nsm-endpoint/echo");
    let member = issue(&lab, &manager_id("node-9"), None).identity();
    let rogue_ca = lab.dir().join("rogue-ca");
    identity::create_ca(&rogue_ca, TRUST_DOMAIN, Duration::from_secs(600)).unwrap();
    let rogue = issue(&lab, &manager_id("node-8"), Some(&rogue_ca)).identity();
    let now = SystemTime::now();
    let later = now + Duration::from_secs(300);
    let seg = nsm_manager::util::uuid();
    let cases = [
        ("unsigned", String::new()),
        (
            "signed for another audience",
            token::sign(&member, &manager_id("node-2"), &seg, now, later).unwrap(),
        ),
        (
            "signed by a foreign CA",
            token::sign(&rogue, &echo_id, &seg, now, later).unwrap(),
        ),
        (
            "expired",
            token::sign(
                &member,
                &echo_id,
                &seg,
                now - Duration::from_secs(60),
                now - Duration::from_secs(30),
            )
            .unwrap(),
        ),
        (
            "for another segment",
            token::sign(&member, &echo_id, "another-segment", now, later).unwrap(),
        ),
    ];
    let call = |tok: String| {
        runtime().block_on(async {
            let ch = nsm_proto::uds::connect_unix(lab.endpoint_socket("echo"))
                .await
                .unwrap();
            NetworkServiceClient::new(ch)
                .request(endpoint_request(&seg, tok))
                .await
        })
    };
    for (what, tok) in cases {
        let err = call(tok).expect_err(what);
        assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
    }
    // A token of the mesh for echo is what it takes: the check is the
    // token's, not a blanket refusal.
    let ok = call(token::sign(&member, &echo_id, &seg, now, later).unwrap())
        .expect("a mesh token for echo is accepted")
        .into_inner();
    assert_eq!(ok.network_service_endpoint_name, "echo");
    let log = log_of(&lab, "echo", "nsm-endpoint");
    assert!(log.contains("request refused"), "{log}");
    assert!(ping(&lab, "web", &dst), "the mesh connection is untouched");
    assert_no_keys_in_logs(&lab, &keys);
}

/// `List` on a node's forwarder socket over `ch`.
fn list_on(ch: Channel) -> Result<usize, tonic::Status> {
    runtime().block_on(async {
        pb::forwarder_client::ForwarderClient::new(ch)
            .list(pb::ListRequest {})
            .await
            .map(|r| r.into_inner().cross_connects.len())
    })
}

#[test]
fn a_forwarder_answers_only_its_managers_and_rotates_without_a_drop() {
    // The managers program their forwarders over mTLS: traffic flows.
    let (_dir, lab, dst) = up_with_web_connection("sfw");
    let keys = pem_key_bodies(&lab);
    let socket = lab.forwarder_socket("node-1");
    // Plain gRPC on the socket: no answer.
    let plain = runtime().block_on(async { nsm_proto::uds::connect_unix_lazy(&socket) });
    assert!(list_on(plain).is_err(), "a plain client was answered");
    // A certificate of the mesh that is not a manager's: refused.
    let endpoint = issue(
        &lab,
        &format!("spiffe://{TRUST_DOMAIN}/nsm-endpoint/intruder"),
        None,
    );
    let ch = runtime().block_on(async { endpoint.channel_unix(&socket, |_| true) });
    assert!(list_on(ch).is_err(), "an endpoint identity was answered");
    // A manager of another CA: refused.
    let rogue_ca = lab.dir().join("rogue-ca");
    identity::create_ca(&rogue_ca, TRUST_DOMAIN, Duration::from_secs(600)).unwrap();
    let rogue = issue(&lab, &manager_id("node-1"), Some(&rogue_ca));
    let ch = runtime().block_on(async { rogue.channel_unix(&socket, |_| true) });
    assert!(list_on(ch).is_err(), "a foreign CA's manager was answered");
    // The node's manager identity is answered.
    assert_eq!(
        lab.cross_connects("node-1")
            .expect("manager reads it")
            .len(),
        1
    );

    // Rotation: a new forwarder certificate, as an operator issues it.
    let before = std::fs::read(
        lab.forwarder_identity_dir("node-1")
            .join(identity::CERT_FILE),
    )
    .unwrap();
    reissue(
        &lab,
        &format!("spiffe://{TRUST_DOMAIN}/nsm-forwarder/node-1"),
        &lab.forwarder_identity_dir("node-1"),
    );
    assert_ne!(
        std::fs::read(
            lab.forwarder_identity_dir("node-1")
                .join(identity::CERT_FILE)
        )
        .unwrap(),
        before
    );
    let (mut sent, mut lost) = (0, 0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        sent += 1;
        if !ping(&lab, "web", &dst) {
            lost += 1;
        }
    }
    assert_eq!(lost, 0, "{lost} of {sent} pings lost across the rotation");
    // A new handshake, with the new certificate: the manager still programs it.
    let second = request(&lab, "web", "node-1", "nsm-2", "secure-net", &[])
        .expect("a connection after the forwarder's rotation");
    let (_, dst2) = addrs(&second);
    wait_until(
        "ping on the new connection",
        Duration::from_secs(10),
        || ping(&lab, "web", &dst2),
    );
    assert_eq!(lab.cross_connects("node-1").unwrap().len(), 2);
    let log = log_of(&lab, "node-1", "nsm-forwarder");
    assert!(
        log.contains("not allowed") || log.contains("handshake refused"),
        "{log}"
    );
    assert_no_keys_in_logs(&lab, &keys);
}

#[test]
fn the_authorization_policy_denies_one_client_and_allows_another_on_the_same_node() {
    let name = unique_lab_name("saut");
    let (_dir, lab) = up(
        &topology(
            &name,
            "",
            r#"pods:
  - {name: web, node: node-1}
  - {name: db, node: node-1}
authorization:
  rules:
    - {services: ["*"], spiffe_ids: ["spiffe://nsm.local/nsm-manager/*"]}
    - {services: [secure-net], labels: {app: web}}
"#,
        ),
        &[],
    );
    let keys = pem_key_bodies(&lab);
    let db_before = interfaces(&lab, "db");
    let err = request(
        &lab,
        "db",
        "node-1",
        "nsm-1",
        "secure-net",
        &[("app", "db")],
    )
    .expect_err("db may not use secure-net");
    assert!(err.starts_with("PermissionDenied"), "{err}");
    assert!(err.contains("authorization policy"), "{err}");
    let err = request(
        &lab,
        "db",
        "node-1",
        "nsm-2",
        "local-net",
        &[("app", "web")],
    )
    .expect_err("no rule names local-net for local clients");
    assert!(err.starts_with("PermissionDenied"), "{err}");
    assert_eq!(interfaces(&lab, "db"), db_before, "no interface in db");
    for node in ["node-1", "node-2"] {
        assert!(cross_connects(&lab, node).is_empty(), "{node}");
        assert!(
            mesh::connections(&lab.manager_socket(node), TIMEOUT)
                .unwrap()
                .is_empty(),
            "{node}"
        );
    }
    // web, on the same node, is allowed; it gets the pool's first pair, so
    // the refusals left no lease.
    let conn = request(
        &lab,
        "web",
        "node-1",
        "nsm-1",
        "secure-net",
        &[("app", "web")],
    )
    .expect("web may use secure-net");
    let (src, dst) = addrs(&conn);
    assert_eq!(src, "172.31.0.1");
    assert!(ping(&lab, "web", &dst));
    assert!(interfaces(&lab, "web").contains("nsm-1"));
    assert_no_keys_in_logs(&lab, &keys);
}

#[test]
fn an_endpoint_cannot_unregister_or_take_over_anothers_entry() {
    let name = unique_lab_name("sreg");
    let (_dir, mut lab) = up(&topology(&name, "", ""), &[]);
    let keys = pem_key_bodies(&lab);
    let call = |node: &str, nse: NetworkServiceEndpoint, unregister: bool| {
        let socket = lab.manager_socket(node);
        runtime().block_on(async {
            let ch = nsm_proto::uds::connect_unix(&socket).await.unwrap();
            let mut c = NetworkServiceEndpointRegistryClient::new(ch);
            if unregister {
                c.unregister(nse).await.map(drop)
            } else {
                c.register(nse).await.map(drop)
            }
        })
    };
    let entry = |name: &str, service: &str| NetworkServiceEndpoint {
        name: name.into(),
        network_service_names: vec![service.into()],
        ..Default::default()
    };
    // echo registered through node-2; a client of node-1 is someone else.
    let err = call("node-1", entry("echo", "secure-net"), true).unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut hijack = entry("echo", "secure-net");
    hijack.url = format!("unix://{}", lab.dir().join("evil.sock").display());
    let err = call("node-1", hijack, false).unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // And the other way round: node-2's clients cannot touch node-1's `local`.
    let err = call("node-2", entry("local", "local-net"), true).unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let names = registered(&lab, "node-1");
    assert!(
        names.contains("echo") && names.contains("local"),
        "{names:?}"
    );
    // Its owner can: the endpoint unregisters itself when it stops.
    lab.stop("echo", "nsm-endpoint").unwrap();
    wait_until("echo's own unregister takes effect", TIMEOUT, || {
        !registered(&lab, "node-1").contains("echo")
    });
    assert!(registered(&lab, "node-1").contains("local"));
    assert_no_keys_in_logs(&lab, &keys);
}

#[test]
fn the_underlay_carries_no_plaintext_of_pod_traffic_and_logs_no_keys() {
    let name = unique_lab_name("scap");
    let state = tempfile::tempdir().unwrap();
    let received = state.path().join("received");
    let control = state.path().join("control");
    // echo listens on 7777 (reached over the mesh) and 7778 (over the
    // primary network, unencrypted: the capture's control).
    let run = format!(
        r#", run: "busybox nc -l -p 7778 > {} & exec busybox nc -l -p 7777 > {}""#,
        control.display(),
        received.display()
    );
    let (_dir, lab) = up(
        &topology(
            &name,
            &run,
            r#"pods:
  - {name: web, node: node-1, annotations: {networkservicemesh.io: "kernel://secure-net/nsm-1"}}"#,
        ),
        &[],
    );
    let keys = pem_key_bodies(&lab);
    let c = lab.status().connections[0].clone();
    assert_eq!(c.state, "UP", "{c:?}");
    let echo_primary = lab
        .status()
        .pods
        .iter()
        .find(|p| p.name == "echo")
        .unwrap()
        .ip
        .clone();
    let pcap = state.path().join("underlay.pcap");
    let underlay = netns_name(lab.name(), None);
    let mut tcpdump = std::process::Command::new("ip")
        .args([
            "netns", "exec", &underlay, "tcpdump", "-i", "any", "-s", "0",
        ])
        // -Z root: do not drop to the tcpdump user (it could not write
        // into the test's private directory); --immediate-mode: hand every
        // packet over at once (else a SIGTERM loses the buffered block);
        // -B 65536 KiB: with -s 0 every packet takes a 256 KiB slot of the
        // kernel's ring, and the default 2 MiB held only 8: a burst while
        // tcpdump waited for a busy CPU was dropped, the control message
        // with it (seen in CI: "8 packets dropped by kernel").
        .args([
            "-Z",
            "root",
            "--immediate-mode",
            "-B",
            "65536",
            "-U",
            "-n",
            "-w",
        ])
        .arg(&pcap)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(state.path().join("tcpdump.err")).unwrap())
        .spawn()
        .unwrap();
    wait_until("tcpdump writes its capture", TIMEOUT, || pcap.exists());
    std::thread::sleep(Duration::from_millis(500));

    let tag = format!("{}-{}", std::process::id(), name);
    let secret = format!("MESH-SECRET-{tag}");
    let plain = format!("PLAIN-CONTROL-{tag}");
    let send = |to: &str, port: u16, text: &str| {
        let cmd = format!("printf '%s' '{text}' > /dev/tcp/{to}/{port}");
        lab.exec("web", &["bash", "-c", &cmd])
            .unwrap()
            .status
            .success()
    };
    let mut sent = false;
    let deadline = Instant::now() + TIMEOUT;
    while !sent && Instant::now() < deadline {
        sent = send(&c.dst_ip, 7777, &secret);
        if !sent {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(sent, "web reaches echo's listener through the mesh");
    assert!(
        send(&echo_primary, 7778, &plain),
        "web reaches echo directly"
    );
    wait_until("echo receives both messages", TIMEOUT, || {
        std::fs::read_to_string(&received).is_ok_and(|t| t.contains(&secret))
            && std::fs::read_to_string(&control).is_ok_and(|t| t.contains(&plain))
    });
    // And a ping through the mesh for good measure (more encrypted traffic).
    assert!(ping(&lab, "web", &c.dst_ip));
    std::thread::sleep(Duration::from_millis(300));
    // SIGTERM lets tcpdump flush; a failing test leaves it to the lab's
    // teardown, which ends every process in the lab's namespaces.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(tcpdump.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    tcpdump.wait().unwrap();

    // A capture that lost packets proves nothing either way.
    let tcpdump_err = std::fs::read_to_string(state.path().join("tcpdump.err")).unwrap_or_default();
    let dropped: u64 = tcpdump_err
        .lines()
        .find_map(|l| l.strip_suffix(" packets dropped by kernel"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert_eq!(dropped, 0, "the capture lost packets: {tcpdump_err}");
    let captured = std::fs::read(&pcap).unwrap();
    let contains = |needle: &str| {
        captured
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    };
    assert!(
        contains(&plain),
        "the capture sees pod traffic that bypasses the mesh ({} bytes captured; tcpdump: {})",
        captured.len(),
        std::fs::read_to_string(state.path().join("tcpdump.err")).unwrap_or_default()
    );
    assert!(
        !contains(&secret),
        "the mesh's pod traffic crossed the underlay in plaintext"
    );
    let wg = std::process::Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(&pcap)
        .arg("udp port 51820")
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&wg.stdout).lines().count() >= 4,
        "the mesh traffic crossed as WireGuard (UDP 51820)"
    );
    assert_no_keys_in_logs(&lab, &keys);
}
