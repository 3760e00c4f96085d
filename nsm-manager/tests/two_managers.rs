//! Two managers in one process, on unix sockets and loopback TCP in a
//! tempdir, each with a fake forwarder and in-process endpoints
//! (`nsm_manager::endpoint`, the code of `nsm-endpoint`).
//!
//! The fake forwarder is a unit-level stand-in for `nsm.forwarder.v1` only:
//! it records what it is told and hands out per-cross-connect keys. Tests
//! through real forwarders in network namespaces live in `testbed/`.

use std::collections::HashMap;
mod common;

use common::kernel_request as request;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nsm_manager::config::Config;
use nsm_manager::endpoint::{EndpointHandle, EndpointOptions, start_endpoint};
use nsm_manager::server::{Handle, MD_MANAGED, Options, start};
use nsm_proto::connection::monitor_connection_client::MonitorConnectionClient;
use nsm_proto::connection::{Connection, ConnectionEventType, MonitorScopeSelector};
use nsm_proto::forwarder::v1::cross_connect_event::Type as EvType;
use nsm_proto::forwarder::v1::cross_connect_status::State as XState;
use nsm_proto::forwarder::v1::forwarder_server::{Forwarder, ForwarderServer};
use nsm_proto::forwarder::v1::side::Kind;
use nsm_proto::forwarder::v1::{
    CrossConnect, CrossConnectEvent, CrossConnectStatus, ForwarderInfo, InfoRequest, ListRequest,
    ListResponse, RemoveRequest, WatchRequest,
};
use nsm_proto::mechanisms::{self, wireguard};
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
use nsm_proto::registry::network_service_registry_client::NetworkServiceRegistryClient;
use nsm_proto::registry::{Destination, Match, NetworkService};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};

// ---------------------------------------------------------------- fake forwarder

#[derive(Debug, Default)]
struct FwdState {
    xcs: HashMap<String, CrossConnect>,
    keys: HashMap<String, String>,
    generation: u32,
    programs: Vec<CrossConnect>,
}

#[derive(Debug, Clone)]
struct FakeForwarder {
    ip: String,
    state: Arc<Mutex<FwdState>>,
    epoch: tokio::sync::watch::Sender<u32>,
}

impl FakeForwarder {
    fn has_wg(xc: &CrossConnect) -> bool {
        [&xc.source, &xc.destination].iter().any(|s| {
            matches!(
                s.as_ref().and_then(|s| s.kind.as_ref()),
                Some(Kind::Wireguard(_))
            )
        })
    }

    fn status(&self, st: &mut FwdState, xc: &CrossConnect) -> CrossConnectStatus {
        let wg = Self::has_wg(xc);
        let generation = st.generation;
        let key = st
            .keys
            .entry(xc.id.clone())
            .or_insert_with(|| {
                let raw = format!(
                    "{}-{}-{}",
                    self.ip,
                    generation,
                    &xc.id[..8.min(xc.id.len())]
                );
                format!("{raw:=<44}")
            })
            .clone();
        CrossConnectStatus {
            id: xc.id.clone(),
            state: XState::Pending as i32,
            wireguard_public_key: if wg { key } else { String::new() },
            wireguard_port: if wg { 51820 } else { 0 },
            underlay_ip: if wg { self.ip.clone() } else { String::new() },
            mtu: 1420,
            ..Default::default()
        }
    }

    fn get(&self, id: &str) -> Option<CrossConnect> {
        self.state.lock().unwrap().xcs.get(id).cloned()
    }

    fn count(&self) -> usize {
        self.state.lock().unwrap().xcs.len()
    }

    /// Simulates a forwarder restart: state and keys gone, Watch streams end.
    fn restart(&self) {
        let mut st = self.state.lock().unwrap();
        st.xcs.clear();
        st.keys.clear();
        st.generation += 1;
        self.epoch.send_modify(|e| *e += 1);
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
        let mut st = self.state.lock().unwrap();
        st.programs.push(xc.clone());
        st.xcs.insert(xc.id.clone(), xc.clone());
        Ok(Response::new(self.status(&mut st, &xc)))
    }

    async fn remove(&self, r: Request<RemoveRequest>) -> Result<Response<()>, Status> {
        let id = r.into_inner().id;
        let mut st = self.state.lock().unwrap();
        st.xcs.remove(&id);
        st.keys.remove(&id);
        Ok(Response::new(()))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let mut st = self.state.lock().unwrap();
        let xcs: Vec<CrossConnect> = st.xcs.values().cloned().collect();
        let cross_connects = xcs.iter().map(|x| self.status(&mut st, x)).collect();
        Ok(Response::new(ListResponse { cross_connects }))
    }

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let snapshot = {
            let mut st = self.state.lock().unwrap();
            let xcs: Vec<CrossConnect> = st.xcs.values().cloned().collect();
            CrossConnectEvent {
                r#type: EvType::Snapshot as i32,
                cross_connects: xcs.iter().map(|x| self.status(&mut st, x)).collect(),
            }
        };
        // The stream ends when the fake "restarts", as a real one's would break.
        let tail = tokio_stream::wrappers::WatchStream::from_changes(self.epoch.subscribe())
            .take(1)
            .filter_map(|_| None::<Result<CrossConnectEvent, Status>>);
        Ok(Response::new(Box::pin(
            tokio_stream::once(Ok(snapshot)).chain(tail),
        )))
    }
}

fn serve_forwarder(path: &Path, ip: &str) -> FakeForwarder {
    let f = FakeForwarder {
        ip: ip.to_string(),
        state: Arc::default(),
        epoch: tokio::sync::watch::channel(0).0,
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

const CONFIG: &str = "services:
- name: secure-net
  payload: IP
  cidr: [172.31.0.0/24]
  excluded: [172.31.0.0/30]
- name: local-net
  cidr: 172.30.0.0/24
- name: tiny
  cidr: 10.9.0.0/30
- name: picky
  cidr: 10.8.0.0/24
";

struct Node {
    sock: PathBuf,
    state: PathBuf,
    fwd: FakeForwarder,
    handle: Option<Handle>,
    port: u16,
}

struct Lab {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    nses: Vec<EndpointHandle>,
    lifetime: Duration,
}

fn options(
    name: &str,
    sock: &Path,
    state: &Path,
    port: u16,
    fwd: &Path,
    registry: Option<String>,
    lifetime: Duration,
) -> Options {
    Options {
        name: name.to_string(),
        listen: sock.to_path_buf(),
        peer_listen: format!("127.0.0.1:{port}").parse().unwrap(),
        advertise_url: None,
        forwarder: fwd.to_path_buf(),
        state_dir: Some(state.to_path_buf()),
        config: if registry.is_none() {
            Config::parse(CONFIG, "test").unwrap()
        } else {
            Config::default()
        },
        registry,
        max_token_lifetime: lifetime,
        cluster: None,
        security: Default::default(),
    }
}

impl Lab {
    async fn new(lifetime: Duration) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes: Vec<Node> = Vec::new();
        for i in 1..=2u8 {
            let nd = dir.path().join(format!("node-{i}"));
            std::fs::create_dir_all(&nd).unwrap();
            let fwd = serve_forwarder(&nd.join("fwd.sock"), &format!("192.0.2.{i}"));
            let registry = nodes
                .first()
                .map(|n| n.handle.as_ref().unwrap().advertise_url.clone());
            let h = start(options(
                &format!("node-{i}"),
                &nd.join("nsm.sock"),
                &nd.join("state"),
                0,
                &nd.join("fwd.sock"),
                registry,
                lifetime,
            ))
            .await
            .unwrap();
            nodes.push(Node {
                sock: nd.join("nsm.sock"),
                state: nd.join("state"),
                fwd,
                port: h.peer_addr.port(),
                handle: Some(h),
            });
        }
        let mut lab = Lab {
            dir,
            nodes,
            nses: Vec::new(),
            lifetime,
        };
        lab.add_nse(1, "echo-2", "secure-net", &[("app", "echo")])
            .await;
        lab.add_nse(0, "local-1", "local-net", &[]).await;
        lab.add_nse(0, "tiny-1", "tiny", &[]).await;
        lab.add_nse(1, "picky-2", "picky", &[("app", "echo")]).await;
        lab
    }

    async fn add_nse(&mut self, node: usize, name: &str, service: &str, labels: &[(&str, &str)]) {
        let h = start_endpoint(EndpointOptions {
            name: name.into(),
            service: service.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
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

    fn nse(&self, name: &str) -> &EndpointHandle {
        self.nses.iter().find(|n| nse_name(n) == name).unwrap()
    }

    fn handle(&self, i: usize) -> &Handle {
        self.nodes[i].handle.as_ref().unwrap()
    }

    async fn client(&self, i: usize) -> NetworkServiceClient<Channel> {
        NetworkServiceClient::new(
            nsm_proto::uds::connect_unix(&self.nodes[i].sock)
                .await
                .unwrap(),
        )
    }

    /// Stops manager `i` and starts it again on the same socket, port and state.
    async fn restart(&mut self, i: usize) {
        let h = self.nodes[i].handle.take().unwrap();
        h.shutdown().await;
        let registry = (i > 0).then(|| self.handle(0).advertise_url.clone());
        let n = &self.nodes[i];
        let fwd = n.sock.parent().unwrap().join("fwd.sock");
        let h = start(options(
            &format!("node-{}", i + 1),
            &n.sock,
            &n.state,
            n.port,
            &fwd,
            registry,
            self.lifetime,
        ))
        .await
        .unwrap();
        self.nodes[i].handle = Some(h);
    }

    fn leases(&self) -> usize {
        self.handle(0).ipam.as_ref().unwrap().lease_count()
    }
}

fn nse_name(h: &EndpointHandle) -> String {
    h.service.name().to_string()
}

fn addrs(c: &Connection) -> (Vec<String>, Vec<String>) {
    let ip = c.context.clone().unwrap().ip_context.unwrap();
    (ip.src_ip_addrs, ip.dst_ip_addrs)
}

fn kernel_of(
    side: &Option<nsm_proto::forwarder::v1::Side>,
) -> nsm_proto::forwarder::v1::KernelInterface {
    match side.as_ref().unwrap().kind.clone().unwrap() {
        Kind::Kernel(k) => k,
        other => panic!("expected kernel side, got {other:?}"),
    }
}

fn wg_of(
    side: &Option<nsm_proto::forwarder::v1::Side>,
) -> nsm_proto::forwarder::v1::WireguardTunnel {
    match side.as_ref().unwrap().kind.clone().unwrap() {
        Kind::Wireguard(w) => w,
        other => panic!("expected wireguard side, got {other:?}"),
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

const LONG: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_node_request_and_close() {
    let lab = Lab::new(LONG).await;
    let c = lab
        .client(0)
        .await
        .request(request("local-net", "nsm-1", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.network_service_endpoint_name, "local-1");
    assert_eq!(c.mechanism.as_ref().unwrap().r#type, mechanisms::KERNEL);
    let (src, dst) = addrs(&c);
    assert_eq!(
        (src[0].as_str(), dst[0].as_str()),
        ("172.30.0.1/32", "172.30.0.2/32")
    );
    let ip = c.context.clone().unwrap().ip_context.unwrap();
    assert_eq!(ip.src_routes[0].prefix, "172.30.0.2/32");
    assert_eq!(ip.dst_routes[0].prefix, "172.30.0.1/32");
    // One kernel<->kernel cross-connect; the client's inode URL was resolved to a path.
    let xc = lab.nodes[0].fwd.get(&c.id).expect("programmed");
    let (s, d) = (kernel_of(&xc.source), kernel_of(&xc.destination));
    assert!(
        s.netns_path.starts_with("/proc/") || s.netns_path.starts_with("/run/netns/"),
        "{}",
        s.netns_path
    );
    assert_eq!(s.name, "nsm-1");
    assert_eq!(s.addresses, vec!["172.30.0.1/32"]);
    assert_eq!(d.netns_path, "/run/netns/local-1");
    assert_eq!(d.addresses, vec!["172.30.0.2/32"]);
    assert_eq!(lab.nse("local-1").service.connections().len(), 1);
    assert_eq!(lab.nodes[1].fwd.count(), 0);

    lab.client(0).await.close(c.clone()).await.unwrap();
    assert_eq!(lab.nodes[0].fwd.count(), 0);
    assert!(lab.nse("local-1").service.connections().is_empty());
    assert_eq!(lab.leases(), 0);
    assert!(lab.handle(0).manager.records().is_empty());
    // Close is idempotent.
    lab.client(0).await.close(c).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_request_exchanges_wireguard_and_close_removes_both_ends() {
    let lab = Lab::new(LONG).await;
    // The endpoint registered through node-2 is reachable at node-2's manager URL.
    let eps = lab
        .handle(0)
        .registry
        .as_ref()
        .unwrap()
        .find_nse(&Default::default());
    let echo = eps.iter().find(|e| e.name == "echo-2").unwrap();
    assert_eq!(echo.url, lab.handle(1).advertise_url);

    let c = lab
        .client(0)
        .await
        .request(request("secure-net", "nsm-1", &[("app", "web")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.network_service_endpoint_name, "echo-2");
    // .0/30 is excluded.
    assert_eq!(
        addrs(&c),
        (vec!["172.31.0.4/32".into()], vec!["172.31.0.5/32".into()])
    );
    // The path grew by one segment per hop: node-1, node-2 (then the endpoint may add its own).
    let path = c.path.clone().unwrap();
    assert_eq!(path.index, 0);
    assert_eq!(path.path_segments[0].name, "node-1");
    assert_eq!(path.path_segments[1].name, "node-2");
    assert!(
        path.path_segments[..2]
            .iter()
            .all(|s| s.expires.is_some() && !s.token.is_empty())
    );
    let (id1, id2) = (
        path.path_segments[0].id.clone(),
        path.path_segments[1].id.clone(),
    );
    assert_ne!(id1, id2);

    let a = lab.nodes[0].fwd.get(&id1).expect("node-1 programmed");
    let b = lab.nodes[1].fwd.get(&id2).expect("node-2 programmed");
    let key_a = lab.nodes[0].fwd.state.lock().unwrap().keys[&id1].clone();
    let key_b = lab.nodes[1].fwd.state.lock().unwrap().keys[&id2].clone();
    // A: kernel -> wireguard(B); B: wireguard(A) -> kernel.
    assert_eq!(kernel_of(&a.source).addresses, vec!["172.31.0.4/32"]);
    let wa = wg_of(&a.destination);
    assert_eq!(
        (
            wa.peer_ip.as_str(),
            wa.peer_port,
            wa.peer_public_key.as_str()
        ),
        ("192.0.2.2", 51820, key_b.as_str())
    );
    let wb = wg_of(&b.source);
    assert_eq!(
        (
            wb.peer_ip.as_str(),
            wb.peer_port,
            wb.peer_public_key.as_str()
        ),
        ("192.0.2.1", 51820, key_a.as_str())
    );
    let kb = kernel_of(&b.destination);
    assert_eq!(kb.netns_path, "/run/netns/echo-2");
    assert_eq!(kb.addresses, vec!["172.31.0.5/32"]);
    // A was first programmed without B's key, then updated in place with it.
    let programs_a: Vec<String> = lab.nodes[0]
        .fwd
        .state
        .lock()
        .unwrap()
        .programs
        .iter()
        .map(|x| wg_of(&x.destination).peer_public_key)
        .collect();
    assert_eq!(programs_a, vec![String::new(), key_b.clone()]);
    // NSM's WIREGUARD parameter keys, exactly, in node-2's record.
    let rec_b = lab.handle(1).manager.records().pop().unwrap();
    let m = rec_b.conn.0.mechanism.unwrap();
    assert_eq!(m.r#type, mechanisms::WIREGUARD);
    let mut keys: Vec<&str> = m.parameters.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            wireguard::MTU,
            wireguard::DST_IP,
            wireguard::DST_PORT,
            wireguard::DST_PUBLIC_KEY,
            wireguard::SRC_IP,
            wireguard::SRC_PORT,
            wireguard::SRC_PUBLIC_KEY
        ]
        .iter()
        .copied()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
    );
    assert_eq!(m.parameters[wireguard::SRC_PUBLIC_KEY], key_a);
    assert_eq!(m.parameters[wireguard::DST_PUBLIC_KEY], key_b);
    assert_eq!(m.parameters[wireguard::DST_IP], "192.0.2.2");
    assert_eq!(lab.nse("echo-2").service.connections().len(), 1);

    // Refresh: same ids, same addresses, keys unchanged.
    let c2 = lab
        .client(0)
        .await
        .request(NetworkServiceRequest {
            connection: Some(c.clone()),
            mechanism_preferences: request("secure-net", "nsm-1", &[]).mechanism_preferences,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c2.id, c.id);
    assert_eq!(addrs(&c2), addrs(&c));
    assert_eq!(c2.path.unwrap().path_segments[1].id, id2);
    assert_eq!(lab.handle(1).manager.records().len(), 1);

    lab.client(0).await.close(c).await.unwrap();
    assert_eq!(lab.nodes[0].fwd.count(), 0);
    assert_eq!(lab.nodes[1].fwd.count(), 0);
    assert!(lab.handle(0).manager.records().is_empty());
    assert!(lab.handle(1).manager.records().is_empty());
    assert!(lab.nse("echo-2").service.connections().is_empty());
    assert_eq!(lab.leases(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_get_distinct_addresses_and_pools_run_out_cleanly() {
    let lab = Lab::new(LONG).await;
    let a = lab
        .client(0)
        .await
        .request(request("secure-net", "nsm-1", &[]))
        .await
        .unwrap()
        .into_inner();
    // The second client is on node-2 (its lease still comes from node-1's IPAM).
    let b = lab
        .client(1)
        .await
        .request(request("secure-net", "nsm-1", &[]))
        .await
        .unwrap()
        .into_inner();
    let (sa, da) = addrs(&a);
    let (sb, db) = addrs(&b);
    let mut all = vec![sa[0].clone(), da[0].clone(), sb[0].clone(), db[0].clone()];
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4, "{all:?}");
    assert_eq!(lab.leases(), 2);

    // tiny is a /30: one pair. The second request fails with ResourceExhausted naming it.
    lab.client(0)
        .await
        .request(request("tiny", "nsm-2", &[]))
        .await
        .unwrap();
    let e = lab
        .client(0)
        .await
        .request(request("tiny", "nsm-3", &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("tiny"), "{}", e.message());
    assert_eq!(
        lab.nodes[0].fwd.count(),
        2,
        "nothing programmed for the failed request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_and_no_match_leave_nothing_behind() {
    let lab = Lab::new(LONG).await;
    let e = lab
        .client(0)
        .await
        .request(request("nope", "nsm-1", &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message().contains("`nope`") && e.message().contains("not registered"),
        "{}",
        e.message()
    );

    // picky routes only to app=db endpoints; its only endpoint is app=echo.
    let mut reg = NetworkServiceRegistryClient::new(
        nsm_proto::uds::connect_unix(&lab.nodes[1].sock)
            .await
            .unwrap(),
    );
    reg.register(NetworkService {
        name: "picky".into(),
        payload: "IP".into(),
        matches: vec![Match {
            source_selector: HashMap::new(),
            routes: vec![Destination {
                destination_selector: [("app".to_string(), "db".to_string())].into(),
                weight: 1,
            }],
            fallthrough: false,
            metadata: None,
        }],
        path_ids: vec![],
    })
    .await
    .unwrap();
    let e = lab
        .client(0)
        .await
        .request(request("picky", "nsm-1", &[("app", "web")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("`picky`") && e.message().contains("app=web"),
        "{}",
        e.message()
    );

    // Bad interface name.
    let e = lab
        .client(0)
        .await
        .request(request("local-net", "much-too-long-name", &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    assert_eq!(lab.leases(), 0);
    assert_eq!(lab.nodes[0].fwd.count() + lab.nodes[1].fwd.count(), 0);
    assert!(
        lab.handle(0).manager.records().is_empty() && lab.handle(1).manager.records().is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrefreshed_connection_expires_on_both_nodes_but_managed_one_lives() {
    let lab = Lab::new(Duration::from_millis(1500)).await;
    let c = lab
        .client(0)
        .await
        .request(request("secure-net", "nsm-1", &[]))
        .await
        .unwrap()
        .into_inner();
    let mut managed = tonic::Request::new(request("secure-net", "nsm-2", &[]));
    managed
        .metadata_mut()
        .insert(MD_MANAGED, "true".parse().unwrap());
    let m = lab
        .client(0)
        .await
        .request(managed)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lab.leases(), 2);
    eventually("unmanaged connection expired on both nodes", || {
        lab.nodes[0].fwd.get(&c.id).is_none()
            && lab.handle(1).manager.records().len() == 1
            && lab.leases() == 1
    })
    .await;
    assert_eq!(lab.nse("echo-2").service.connections().len(), 1);
    // Well past several lifetimes, the managed connection is still there on both nodes.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(lab.nodes[0].fwd.get(&m.id).is_some());
    assert_eq!(lab.handle(0).manager.records().len(), 1);
    assert_eq!(lab.handle(1).manager.records().len(), 1);
    lab.client(0).await.close(m).await.unwrap();
    assert_eq!(lab.leases(), 0);
    assert_eq!(lab.nodes[1].fwd.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_restart_keeps_connections_and_addresses() {
    let mut lab = Lab::new(LONG).await;
    let c = lab
        .client(0)
        .await
        .request(request("secure-net", "nsm-1", &[]))
        .await
        .unwrap()
        .into_inner();
    let local = lab
        .client(0)
        .await
        .request(request("local-net", "nsm-2", &[]))
        .await
        .unwrap()
        .into_inner();
    lab.restart(0).await;
    lab.restart(1).await;
    assert_eq!(lab.handle(0).manager.records().len(), 2);
    assert_eq!(lab.handle(1).manager.records().len(), 1);
    // A refresh after the restart keeps ids and addresses; a new client gets new ones.
    let c2 = lab
        .client(0)
        .await
        .request(NetworkServiceRequest {
            connection: Some(c.clone()),
            mechanism_preferences: request("secure-net", "nsm-1", &[]).mechanism_preferences,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((c2.id.clone(), addrs(&c2)), (c.id.clone(), addrs(&c)));
    let d = lab
        .client(1)
        .await
        .request(request("secure-net", "nsm-1", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(addrs(&d).0, addrs(&c).0);
    assert_ne!(addrs(&d).1, addrs(&c).1);
    // Close after restart still removes both ends.
    lab.client(0).await.close(c2).await.unwrap();
    lab.client(0).await.close(local).await.unwrap();
    assert_eq!(lab.nodes[0].fwd.count(), 0);
    assert_eq!(lab.leases(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarder_restart_is_healed_by_reprogramming() {
    let lab = Lab::new(LONG).await;
    let c = lab
        .client(0)
        .await
        .request(request("secure-net", "nsm-1", &[]))
        .await
        .unwrap()
        .into_inner();
    let l = lab
        .client(0)
        .await
        .request(request("local-net", "nsm-2", &[]))
        .await
        .unwrap()
        .into_inner();
    let id2 = c.path.clone().unwrap().path_segments[1].id.clone();
    lab.nodes[0].fwd.restart();
    eventually("node-1 forwarder re-programmed", || {
        lab.nodes[0].fwd.get(&c.id).is_some() && lab.nodes[0].fwd.get(&l.id).is_some()
    })
    .await;
    // node-1's forwarder has a new key; node-2 learnt it through the re-request.
    let new_key = lab.nodes[0].fwd.state.lock().unwrap().keys[&c.id].clone();
    eventually("node-2 has node-1's new key", || {
        lab.nodes[1]
            .fwd
            .get(&id2)
            .is_some_and(|x| wg_of(&x.source).peer_public_key == new_key)
    })
    .await;
    lab.nodes[1].fwd.restart();
    eventually("node-2 forwarder re-programmed", || {
        lab.nodes[1].fwd.get(&id2).is_some()
    })
    .await;
    // node-2's forwarder has a new key; node-1 learns it by monitoring node-2.
    let new_key2 = lab.nodes[1].fwd.state.lock().unwrap().keys[&id2].clone();
    eventually("node-1 has node-2's new key", || {
        lab.nodes[0]
            .fwd
            .get(&c.id)
            .is_some_and(|x| wg_of(&x.destination).peer_public_key == new_key2)
    })
    .await;
    assert_eq!(lab.handle(1).manager.records().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_sends_initial_state_then_updates_and_deletes() {
    let lab = Lab::new(LONG).await;
    let first = lab
        .client(0)
        .await
        .request(request("local-net", "nsm-1", &[]))
        .await
        .unwrap()
        .into_inner();
    let mut mon = MonitorConnectionClient::new(
        nsm_proto::uds::connect_unix(&lab.nodes[0].sock)
            .await
            .unwrap(),
    )
    .monitor_connections(MonitorScopeSelector::default())
    .await
    .unwrap()
    .into_inner();
    let ev = mon.message().await.unwrap().unwrap();
    assert_eq!(ev.r#type, ConnectionEventType::InitialStateTransfer as i32);
    assert_eq!(ev.connections.len(), 1);
    assert!(ev.connections.contains_key(&first.id));
    let second = lab
        .client(0)
        .await
        .request(request("local-net", "nsm-2", &[]))
        .await
        .unwrap()
        .into_inner();
    let ev = mon.message().await.unwrap().unwrap();
    assert_eq!(ev.r#type, ConnectionEventType::Update as i32);
    assert!(ev.connections.contains_key(&second.id));
    lab.client(0).await.close(second.clone()).await.unwrap();
    let ev = mon.message().await.unwrap().unwrap();
    assert_eq!(ev.r#type, ConnectionEventType::Delete as i32);
    assert!(ev.connections.contains_key(&second.id));
    // A scope on another service sees nothing.
    let mut other = MonitorConnectionClient::new(
        nsm_proto::uds::connect_unix(&lab.nodes[0].sock)
            .await
            .unwrap(),
    )
    .monitor_connections(MonitorScopeSelector {
        path_segments: vec![],
        network_services: vec!["secure-net".into()],
    })
    .await
    .unwrap()
    .into_inner();
    assert!(
        other
            .message()
            .await
            .unwrap()
            .unwrap()
            .connections
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_unregisters_on_shutdown() {
    let mut lab = Lab::new(LONG).await;
    let reg = lab.handle(0).registry.clone().unwrap();
    assert!(
        reg.find_nse(&Default::default())
            .iter()
            .any(|e| e.name == "local-1")
    );
    let i = lab
        .nses
        .iter()
        .position(|n| nse_name(n) == "local-1")
        .unwrap();
    lab.nses.remove(i).shutdown().await;
    assert!(
        !reg.find_nse(&Default::default())
            .iter()
            .any(|e| e.name == "local-1")
    );
    let e = lab
        .client(0)
        .await
        .request(request("local-net", "nsm-1", &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_find_watch_through_a_forwarding_manager() {
    use nsm_proto::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
    use nsm_proto::registry::{NetworkServiceEndpoint, NetworkServiceEndpointQuery};
    let mut lab = Lab::new(LONG).await;
    // node-2 does not hold the registry: its Find is forwarded to node-1.
    let mut reg = NetworkServiceEndpointRegistryClient::new(
        nsm_proto::uds::connect_unix(&lab.nodes[1].sock)
            .await
            .unwrap(),
    );
    let mut w = reg
        .find(NetworkServiceEndpointQuery {
            network_service_endpoint: Some(NetworkServiceEndpoint {
                network_service_names: vec!["secure-net".into()],
                ..Default::default()
            }),
            watch: true,
        })
        .await
        .unwrap()
        .into_inner();
    let first = w.message().await.unwrap().unwrap();
    assert_eq!(first.network_service_endpoint.unwrap().name, "echo-2");
    lab.add_nse(0, "echo-1", "secure-net", &[("app", "echo")])
        .await;
    let ev = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let nse = ev.network_service_endpoint.unwrap();
    assert_eq!(nse.name, "echo-1");
    assert!(!ev.deleted);
    // Registered through node-1: its URL is node-1's manager, not the endpoint's socket.
    assert_eq!(nse.url, lab.handle(0).advertise_url);
}
