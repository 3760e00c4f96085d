//! Security of the control plane, in process with real mTLS: two managers
//! with identities from a mesh CA made per test, a fake forwarder each (as
//! in `two_managers.rs`) and real endpoints.
//!
//! Covers: a rogue manager (certificate from another CA, or no TLS) cannot
//! register or request; a connection keeps working across a certificate
//! rotation; tampered, expired, replayed, unsigned or misattributed path
//! tokens are PermissionDenied and leave nothing behind; the authorization
//! policy denies one client and allows another on the same node; one
//! endpoint cannot unregister or take over another's entry, nor a peer
//! close another's connection; no private key
//! appears in the logs (every test's tracing output is captured).

use std::collections::HashMap;
use std::io::Write as _;
mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use nsm_manager::config::Config;
use nsm_manager::endpoint::{EndpointHandle, EndpointOptions, start_endpoint};
use nsm_manager::identity::{self, IdentityPaths, IdentitySource};
use nsm_manager::server::{Handle, MD_MANAGED, Options, Security, start};
use nsm_manager::tls::Tls;
use nsm_manager::token;
use nsm_proto::connection::{Connection, Mechanism, Path as NsmPath, PathSegment};
use nsm_proto::forwarder::v1::cross_connect_event::Type as EvType;
use nsm_proto::forwarder::v1::cross_connect_status::State as XState;
use nsm_proto::forwarder::v1::forwarder_server::{Forwarder, ForwarderServer};
use nsm_proto::forwarder::v1::{
    CrossConnect, CrossConnectEvent, CrossConnectStatus, ForwarderInfo, InfoRequest, ListRequest,
    ListResponse, RemoveRequest, WatchRequest,
};
use nsm_proto::mechanisms::{self, cls, wireguard};
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
use nsm_proto::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use nsm_proto::registry::{NetworkServiceEndpoint, NetworkServiceEndpointQuery};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};

// ---------------------------------------------------------------- log capture

/// Everything every test logs (one global subscriber per test binary).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let w = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_ansi(false)
            .with_writer(move || LogWriter(w.clone()))
            .try_init();
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------- fake forwarder

#[derive(Debug, Clone, Default)]
struct FakeForwarder {
    ip: String,
    xcs: Arc<Mutex<HashMap<String, CrossConnect>>>,
}

impl FakeForwarder {
    fn count(&self) -> usize {
        self.xcs.lock().unwrap().len()
    }

    fn status(&self, xc: &CrossConnect) -> CrossConnectStatus {
        CrossConnectStatus {
            id: xc.id.clone(),
            state: XState::Pending as i32,
            wireguard_public_key: format!("{:=<44}", format!("{}-{}", self.ip, &xc.id[..8])),
            wireguard_port: 51820,
            underlay_ip: self.ip.clone(),
            mtu: 1420,
            ..Default::default()
        }
    }
}

type EvStream = Pin<Box<dyn Stream<Item = Result<CrossConnectEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Forwarder for FakeForwarder {
    type WatchStream = EvStream;

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<ForwarderInfo>, Status> {
        Ok(Response::new(ForwarderInfo {
            name: self.ip.clone(),
            underlay_ip: self.ip.clone(),
            wireguard_port: 51820,
            underlay_mtu: 1500,
            version: "fake".into(),
        }))
    }

    async fn program(
        &self,
        r: Request<CrossConnect>,
    ) -> Result<Response<CrossConnectStatus>, Status> {
        let xc = r.into_inner();
        self.xcs.lock().unwrap().insert(xc.id.clone(), xc.clone());
        Ok(Response::new(self.status(&xc)))
    }

    async fn remove(&self, r: Request<RemoveRequest>) -> Result<Response<()>, Status> {
        self.xcs.lock().unwrap().remove(&r.into_inner().id);
        Ok(Response::new(()))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let xcs: Vec<CrossConnect> = self.xcs.lock().unwrap().values().cloned().collect();
        Ok(Response::new(ListResponse {
            cross_connects: xcs.iter().map(|x| self.status(x)).collect(),
        }))
    }

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let xcs: Vec<CrossConnect> = self.xcs.lock().unwrap().values().cloned().collect();
        let snap = CrossConnectEvent {
            r#type: EvType::Snapshot as i32,
            cross_connects: xcs.iter().map(|x| self.status(x)).collect(),
        };
        Ok(Response::new(Box::pin(
            tokio_stream::once(Ok(snap)).chain(tokio_stream::pending()),
        )))
    }
}

fn serve_forwarder(path: &Path, ip: &str) -> FakeForwarder {
    let f = FakeForwarder {
        ip: ip.to_string(),
        ..Default::default()
    };
    let incoming = nsm_proto::uds::bind_unix(path).unwrap();
    let svc = ForwarderServer::new(f.clone());
    tokio::spawn(async move {
        Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    f
}

// ---------------------------------------------------------------- the lab

const TD: &str = "nsm.test";

/// The registry manager's config: pools, and a policy that lets every
/// manager of the mesh in, anyone use `secure-net`, and only `app=web`
/// clients use `local-net`.
const CONFIG: &str = "services:
- name: secure-net
  cidr: [172.31.0.0/24]
- name: local-net
  cidr: 172.30.0.0/24
authorization:
  rules:
  - services: ['*']
    spiffe_ids: ['spiffe://nsm.test/nsm-manager/*']
  - services: [secure-net]
  - services: [local-net]
    labels: {app: web}
";

fn manager_id(i: usize) -> String {
    format!("spiffe://{TD}/nsm-manager/node-{i}")
}

struct Node {
    sock: PathBuf,
    ident: PathBuf,
    fwd: FakeForwarder,
    handle: Handle,
}

struct Lab {
    dir: tempfile::TempDir,
    ca: PathBuf,
    nodes: Vec<Node>,
    nses: Vec<EndpointHandle>,
}

impl Lab {
    async fn new() -> Lab {
        logs();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        identity::create_ca(&ca, TD, Duration::from_secs(24 * 3600)).unwrap();
        let mut nodes: Vec<Node> = Vec::new();
        for i in 1..=2usize {
            let nd = dir.path().join(format!("node-{i}"));
            let ident = nd.join("identity");
            identity::issue(&ca, &manager_id(i), Duration::from_secs(3600), &ident).unwrap();
            let fwd = serve_forwarder(&nd.join("fwd.sock"), &format!("192.0.2.{i}"));
            let registry = nodes.first().map(|n| n.handle.advertise_url.clone());
            let handle = start(Options {
                name: format!("node-{i}"),
                listen: nd.join("nsm.sock"),
                peer_listen: "127.0.0.1:0".parse().unwrap(),
                advertise_url: None,
                forwarder: nd.join("fwd.sock"),
                state_dir: Some(nd.join("state")),
                config: if registry.is_none() {
                    Config::parse(CONFIG, "test").unwrap()
                } else {
                    Config::default()
                },
                registry,
                max_token_lifetime: Duration::from_secs(600),
                cluster: None,
                security: Security {
                    identity: Some(IdentityPaths::in_dir(&ident)),
                    reload_period: Duration::from_millis(100),
                    forwarder_mtls: false,
                },
            })
            .await
            .unwrap();
            nodes.push(Node {
                sock: nd.join("nsm.sock"),
                ident,
                fwd,
                handle,
            });
        }
        let mut lab = Lab {
            dir,
            ca,
            nodes,
            nses: Vec::new(),
        };
        lab.add_nse(1, "echo-2", "secure-net").await;
        lab.add_nse(0, "local-1", "local-net").await;
        lab
    }

    async fn add_nse(&mut self, node: usize, name: &str, service: &str) {
        let h = start_endpoint(EndpointOptions {
            name: name.into(),
            service: service.into(),
            labels: HashMap::new(),
            manager: self.nodes[node].sock.clone(),
            listen: self.dir.path().join(format!("{name}.sock")),
            registration_lifetime: Duration::from_secs(60),
            inode_url: Some(format!("file:///run/netns/{name}")),
            identity: None,
        })
        .await
        .unwrap();
        self.nses.push(h);
    }

    async fn client(&self, i: usize) -> NetworkServiceClient<Channel> {
        NetworkServiceClient::new(
            nsm_proto::uds::connect_unix(&self.nodes[i].sock)
                .await
                .unwrap(),
        )
    }

    fn peer_addr(&self, i: usize) -> String {
        self.nodes[i].handle.peer_addr.to_string()
    }

    /// An mTLS client of the mesh with a fresh identity `id` (from our CA,
    /// or from `ca` when given: a rogue).
    fn tls_as(&self, id: &str, ca: Option<&Path>) -> Arc<Tls> {
        let out = self.dir.path().join(id.replace(['/', ':'], "_"));
        identity::issue(ca.unwrap_or(&self.ca), id, Duration::from_secs(600), &out).unwrap();
        if ca.is_some() {
            // The rogue trusts the real CA too, so only the server's check
            // can stop it.
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(out.join(identity::CA_FILE))
                .unwrap();
            f.write_all(&std::fs::read(self.ca.join(identity::CA_FILE)).unwrap())
                .unwrap();
        }
        Tls::new(IdentitySource::load(IdentityPaths::in_dir(&out)).unwrap())
    }

    fn nse_names(&self) -> Vec<String> {
        self.nodes[0].handle.registry.as_ref().unwrap().names().1
    }
}

/// A call refused at the TLS handshake: the client sees the connection
/// fail or close, never an answer. A plain HTTP/2 client that reads the TLS
/// server's alert before the close sees it as a bad frame (Internal, from
/// its own transport); which of the two comes first is a race.
fn assert_refused(err: &Status) {
    let transport = std::error::Error::source(err)
        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
    assert!(
        matches!(
            err.code(),
            Code::Unavailable | Code::Cancelled | Code::Unknown
        ) || (err.code() == Code::Internal && transport),
        "{err:?}"
    );
}

fn request(service: &str, labels: &[(&str, &str)]) -> NetworkServiceRequest {
    common::kernel_request(service, "nsm-1", labels)
}

/// What a peer manager sends: a path of [client (unsigned), peer segment]
/// and a WIREGUARD preference.
fn peer_request(seg_id: &str, token: String, peer_name: &str) -> NetworkServiceRequest {
    let params: HashMap<String, String> = [
        (wireguard::SRC_IP.to_string(), "192.0.2.9".to_string()),
        (wireguard::SRC_PORT.to_string(), "51820".to_string()),
        (
            wireguard::SRC_PUBLIC_KEY.to_string(),
            format!("{:=<44}", "peer"),
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

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_manager_cannot_register_or_request() {
    let lab = Lab::new().await;
    let rogue_ca = lab.dir.path().join("rogue-ca");
    // Same trust domain name, different CA key: only the chain tells.
    identity::create_ca(&rogue_ca, TD, Duration::from_secs(3600)).unwrap();
    let rogue = lab.tls_as(&manager_id(9), Some(&rogue_ca));
    let ch = rogue.channel(&lab.peer_addr(0)).unwrap();
    let nse = NetworkServiceEndpoint {
        name: "rogue".into(),
        network_service_names: vec!["secure-net".into()],
        url: "tcp://192.0.2.66:5001".into(),
        ..Default::default()
    };
    let err = NetworkServiceEndpointRegistryClient::new(ch.clone())
        .register(nse.clone())
        .await
        .unwrap_err();
    assert_refused(&err);
    let err = NetworkServiceClient::new(ch)
        .request(peer_request(
            &nsm_manager::util::uuid(),
            String::new(),
            "node-9",
        ))
        .await
        .unwrap_err();
    assert_refused(&err);
    // Without TLS at all.
    let plain = nsm_manager::util::channel(&format!("tcp://{}", lab.peer_addr(0))).unwrap();
    let err = NetworkServiceEndpointRegistryClient::new(plain)
        .register(nse)
        .await
        .unwrap_err();
    assert_refused(&err);
    assert!(!lab.nse_names().contains(&"rogue".to_string()));
    assert_eq!(lab.nodes[0].fwd.count(), 0);
    // A member of the mesh gets through the same door.
    let member = lab.tls_as(&manager_id(3), None);
    let found =
        NetworkServiceEndpointRegistryClient::new(member.channel(&lab.peer_addr(0)).unwrap())
            .find(NetworkServiceEndpointQuery {
                network_service_endpoint: Some(NetworkServiceEndpoint::default()),
                watch: false,
            })
            .await
            .unwrap()
            .into_inner()
            .collect::<Vec<_>>()
            .await;
    assert!(found.len() >= 2, "{found:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_survives_certificate_rotation() {
    let lab = Lab::new().await;
    let mut req = request("secure-net", &[]);
    let mut r = Request::new(req.clone());
    r.metadata_mut().insert(MD_MANAGED, "true".parse().unwrap());
    let conn = lab.client(0).await.request(r).await.unwrap().into_inner();
    assert_eq!(lab.nodes[1].fwd.count(), 1);
    // Our segment to node-2 carries a token for node-2 from node-1.
    let seg0 = &conn.path.as_ref().unwrap().path_segments[0];
    let claims = token::decode(0, &seg0.token).unwrap().claims;
    assert_eq!(
        (claims.sub.as_str(), claims.aud.as_str()),
        (manager_id(1).as_str(), manager_id(2).as_str())
    );
    let before: Vec<_> = (0..2)
        .map(|i| {
            lab.nodes[i]
                .handle
                .manager
                .settings()
                .tls
                .as_ref()
                .unwrap()
                .identity()
                .chain[0]
                .clone()
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for i in 0..2 {
        identity::issue(
            &lab.ca,
            &manager_id(i + 1),
            Duration::from_secs(1800),
            &lab.nodes[i].ident,
        )
        .unwrap();
    }
    eventually("both managers reload their certificates", || {
        (0..2).all(|i| {
            lab.nodes[i]
                .handle
                .manager
                .settings()
                .tls
                .as_ref()
                .unwrap()
                .identity()
                .chain[0]
                != before[i]
        })
    })
    .await;
    // The client refreshes over the same connections; tokens now come from
    // the new keys and are accepted.
    req.connection = Some(conn.clone());
    let again = lab.client(0).await.request(req).await.unwrap().into_inner();
    assert_eq!(again.id, conn.id);
    let seg0 = &again.path.as_ref().unwrap().path_segments[0];
    let d = token::decode(0, &seg0.token).unwrap();
    let now_leaf = lab.nodes[0]
        .handle
        .manager
        .settings()
        .tls
        .as_ref()
        .unwrap()
        .identity()
        .chain[0]
        .clone();
    assert_eq!(d.x5c.as_deref(), Some(now_leaf.as_ref()));
    assert_eq!(lab.nodes[0].fwd.count(), 1);
    assert_eq!(lab.nodes[1].fwd.count(), 1);
    // A brand-new peer handshake works with the rotated certificates too.
    let member = lab.tls_as(&manager_id(3), None);
    assert!(member.peer_id(&lab.peer_addr(1)).await.unwrap() == manager_id(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_denied_and_leave_nothing() {
    let lab = Lab::new().await;
    let node3 = lab.tls_as(&manager_id(3), None);
    let id3 = node3.identity();
    let node2 = lab.peer_addr(1);
    let client = || NetworkServiceClient::new(node3.channel(&node2).unwrap());
    let now = SystemTime::now();
    let later = now + Duration::from_secs(300);
    let seg = nsm_manager::util::uuid();
    let good = token::sign(&id3, &manager_id(2), &seg, now, later).unwrap();

    // Tampered: the audience rewritten, the signature kept.
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims = String::from_utf8(b64.decode(&parts[1]).unwrap()).unwrap();
    parts[1] = b64.encode(claims.replace("node-2", "node-1"));
    let tampered = parts.join(".");
    let expired = token::sign(
        &id3,
        &manager_id(2),
        &seg,
        now - Duration::from_secs(60),
        now - Duration::from_secs(30),
    )
    .unwrap();
    let wrong_aud = token::sign(&id3, &manager_id(1), &seg, now, later).unwrap();
    // Replay: a valid token of another segment (another connection).
    let other = token::sign(&id3, &manager_id(2), "another-segment", now, later).unwrap();
    let cases = [
        ("tampered", tampered),
        ("expired", expired),
        ("wrong audience", wrong_aud),
        ("replayed", other),
        ("unsigned", String::new()),
        ("garbage", "a.b.c".to_string()),
    ];
    for (what, tok) in cases {
        let err = client()
            .request(peer_request(&seg, tok, "node-3"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
        assert_eq!(lab.nodes[1].fwd.count(), 0, "{what}");
        assert!(lab.nodes[1].handle.manager.records().is_empty(), "{what}");
    }
    // Signed by node-3 but presented by another member (node-1's cert).
    let n1 = Tls::new(IdentitySource::load(IdentityPaths::in_dir(&lab.nodes[0].ident)).unwrap());
    let err = NetworkServiceClient::new(n1.channel(&node2).unwrap())
        .request(peer_request(&seg, good.clone(), "node-3"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(lab.nodes[1].fwd.count(), 0);
    // The genuine token goes through: the refusals above were the tokens.
    let ok = client()
        .request(peer_request(&seg, good, "node-3"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lab.nodes[1].fwd.count(), 1);
    assert_eq!(ok.network_service, "secure-net");
    // Knowing the connection is not enough to close it: node-1 is refused,
    // its requester (node-3) is not.
    let err = NetworkServiceClient::new(n1.channel(&node2).unwrap())
        .close(ok.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(lab.nodes[1].fwd.count(), 1);
    client().close(ok).await.unwrap();
    assert_eq!(lab.nodes[1].fwd.count(), 0);
    let log = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    assert!(log.contains("request refused"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_denies_one_client_and_allows_another() {
    let lab = Lab::new().await;
    let leases = || lab.nodes[0].handle.ipam.as_ref().unwrap().lease_count();
    let err = lab
        .client(0)
        .await
        .request(request("local-net", &[("app", "db")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("authorization policy"), "{err:?}");
    assert_eq!(lab.nodes[0].fwd.count(), 0);
    assert_eq!(leases(), 0);
    let ok = lab
        .client(0)
        .await
        .request(request("local-net", &[("app", "web")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.network_service, "local-net");
    assert_eq!(lab.nodes[0].fwd.count(), 1);
    assert_eq!(leases(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_cannot_unregister_or_take_over_anothers_entry() {
    let lab = Lab::new().await;
    // echo-2 registered through node-2; node-1's local clients are someone else.
    let mut reg = NetworkServiceEndpointRegistryClient::new(
        nsm_proto::uds::connect_unix(&lab.nodes[0].sock)
            .await
            .unwrap(),
    );
    let echo = NetworkServiceEndpoint {
        name: "echo-2".into(),
        network_service_names: vec!["secure-net".into()],
        ..Default::default()
    };
    let err = reg.unregister(echo.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut hijack = echo.clone();
    hijack.url = format!("unix://{}", lab.dir.path().join("evil.sock").display());
    let err = reg.register(hijack).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(lab.nse_names().contains(&"echo-2".to_string()));
    // Its owner (through node-2) can.
    let mut owner = NetworkServiceEndpointRegistryClient::new(
        nsm_proto::uds::connect_unix(&lab.nodes[1].sock)
            .await
            .unwrap(),
    );
    owner.unregister(echo).await.unwrap();
    assert!(!lab.nse_names().contains(&"echo-2".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_shows_a_peer_only_the_connections_it_requested() {
    use nsm_proto::connection::monitor_connection_client::MonitorConnectionClient;
    use nsm_proto::connection::{ConnectionEventType, MonitorScopeSelector};

    let lab = Lab::new().await;
    // node-1 asks node-2 for secure-net (echo-2); node-1 also has a local one.
    let remote = lab
        .client(0)
        .await
        .request(request("secure-net", &[]))
        .await
        .unwrap()
        .into_inner();
    let local = lab
        .client(0)
        .await
        .request(request("local-net", &[("app", "web")]))
        .await
        .unwrap()
        .into_inner();
    let monitor = |ch: Channel| async move {
        MonitorConnectionClient::new(ch)
            .monitor_connections(MonitorScopeSelector::default())
            .await
            .unwrap()
            .into_inner()
    };
    // Another member of the mesh sees none of node-2's connections ...
    let stranger = lab.tls_as(&manager_id(3), None);
    let mut s = monitor(stranger.channel(&lab.peer_addr(1)).unwrap()).await;
    let first = s.message().await.unwrap().unwrap();
    assert_eq!(
        first.r#type,
        ConnectionEventType::InitialStateTransfer as i32
    );
    assert!(first.connections.is_empty(), "{first:?}");
    // ... while node-1's identity sees the one it requested.
    let node1 = lab.tls_as(&manager_id(1), None);
    let mut own = monitor(node1.channel(&lab.peer_addr(1)).unwrap()).await;
    let first = own.message().await.unwrap().unwrap();
    assert_eq!(first.connections.len(), 1, "{first:?}");
    let seen = first.connections.values().next().unwrap();
    assert_eq!(seen.network_service, "secure-net");
    // Root on node-1's socket sees all of node-1's.
    let mut root = monitor(
        nsm_proto::uds::connect_unix(&lab.nodes[0].sock)
            .await
            .unwrap(),
    )
    .await;
    let first = root.message().await.unwrap().unwrap();
    let ids: std::collections::HashSet<&String> = first.connections.keys().collect();
    assert!(
        ids.contains(&remote.id) && ids.contains(&local.id),
        "{first:?}"
    );
    // Later events follow the same rule: the close reaches node-1's stream,
    // never the stranger's.
    lab.client(0).await.close(remote).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), own.message())
        .await
        .expect("the requester sees the delete")
        .unwrap()
        .unwrap();
    assert_eq!(ev.r#type, ConnectionEventType::Delete as i32);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), s.message())
            .await
            .is_err(),
        "the stranger saw an event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_private_key_in_logs() {
    let lab = Lab::new().await;
    // Exercise the paths that touch keys: handshakes, signing, a rotation.
    lab.client(0)
        .await
        .request(request("secure-net", &[]))
        .await
        .unwrap();
    identity::issue(
        &lab.ca,
        &manager_id(1),
        Duration::from_secs(900),
        &lab.nodes[0].ident,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let log = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    assert!(log.contains(&manager_id(1)), "the SPIFFE ID is logged");
    assert!(!log.contains("PRIVATE KEY"));
    let mut keys = vec![lab.ca.join(identity::CA_KEY_FILE)];
    keys.extend(lab.nodes.iter().map(|n| n.ident.join(identity::KEY_FILE)));
    for k in keys {
        let pem = std::fs::read_to_string(&k).unwrap();
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            // Any 24-character run of the key's base64 would be a leak.
            for chunk in line.as_bytes().chunks(24).filter(|c| c.len() == 24) {
                let chunk = std::str::from_utf8(chunk).unwrap();
                assert!(!log.contains(chunk), "{} leaked into the logs", k.display());
            }
        }
        let mode = std::fs::metadata(&k).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", k.display());
    }
}
