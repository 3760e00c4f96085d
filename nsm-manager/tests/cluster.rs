//! Cluster mode against a real API server (etcd + kube-apiserver on
//! loopback, `nsm_k8s::testing::ApiServer`): the registry on the custom
//! resources, endpoint expiry, the manifests of `deploy/` (server-side dry
//! run with kubectl), and pod annotation reconciliation through the
//! `nsm.manager.v1.Pods` API, across a manager restart and an API outage;
//! two managers sharing pools through IPAMBlock objects and respecting each
//! other's registry entries; and the DaemonSet's manager container run with
//! the in-cluster config of its service account.
//!
//! No kubelet runs: the tests create Pod objects with `spec.nodeName` set and
//! call Attach themselves, as the CNI plugin would. The data path is a fake
//! forwarder (the pattern of `two_managers.rs`); the end-to-end run with real
//! forwarders and the CNI binary belongs to the testbed.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use nsm_k8s::crd;
use nsm_k8s::testing::ApiServer;
use nsm_manager::cluster::ClusterOptions;
use nsm_manager::config::Config;
use nsm_manager::endpoint::{EndpointHandle, EndpointOptions, start_endpoint};
use nsm_manager::manager::Role;
use nsm_manager::server::{Handle, Options, start};
use nsm_proto::forwarder::v1::cross_connect_event::Type as EvType;
use nsm_proto::forwarder::v1::cross_connect_status::State as XState;
use nsm_proto::forwarder::v1::forwarder_server::{Forwarder, ForwarderServer};
use nsm_proto::forwarder::v1::side::Kind;
use nsm_proto::forwarder::v1::{
    CrossConnect, CrossConnectEvent, CrossConnectStatus, ForwarderInfo, InfoRequest, ListRequest,
    ListResponse, RemoveRequest, WatchRequest,
};
use nsm_proto::manager::v1::pods_client::PodsClient;
use nsm_proto::manager::v1::{AttachRequest, DetachRequest};
use nsm_proto::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use nsm_proto::registry::network_service_registry_client::NetworkServiceRegistryClient;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceQuery};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Server;
use tonic::{Request, Response, Status};

const NAMESPACE: &str = "nsm-system";
const NODE: &str = "node-1";
const SERVICE_ACCOUNT: &str = "system:serviceaccount:nsm-system:nsm-manager";
const CRDS_YAML: &str = include_str!("../../deploy/crds.yaml");

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

// ---------------------------------------------------------------- fake forwarder

/// Records cross-connects; answers as a forwarder whose WireGuard side (a
/// made-up key per cross-connect) is never used for packets.
#[derive(Debug, Clone, Default)]
struct FakeForwarder {
    xcs: Arc<Mutex<HashMap<String, CrossConnect>>>,
}

impl FakeForwarder {
    fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.xcs.lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    }

    fn status(xc: &CrossConnect) -> CrossConnectStatus {
        let wg = [&xc.source, &xc.destination].iter().any(|s| {
            matches!(
                s.as_ref().and_then(|s| s.kind.as_ref()),
                Some(Kind::Wireguard(_))
            )
        });
        CrossConnectStatus {
            id: xc.id.clone(),
            state: XState::Up as i32,
            mtu: 1420,
            wireguard_public_key: if wg {
                format!("{:=<44}", &xc.id[..8.min(xc.id.len())])
            } else {
                String::new()
            },
            wireguard_port: if wg { 51820 } else { 0 },
            underlay_ip: if wg {
                "192.0.2.1".into()
            } else {
                String::new()
            },
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
            name: NODE.into(),
            underlay_ip: "192.0.2.1".into(),
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
        Ok(Response::new(Self::status(&xc)))
    }

    async fn remove(&self, r: Request<RemoveRequest>) -> Result<Response<()>, Status> {
        self.xcs.lock().unwrap().remove(&r.into_inner().id);
        Ok(Response::new(()))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let cross_connects = self
            .xcs
            .lock()
            .unwrap()
            .values()
            .map(Self::status)
            .collect();
        Ok(Response::new(ListResponse { cross_connects }))
    }

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let snapshot = CrossConnectEvent {
            r#type: EvType::Snapshot as i32,
            cross_connects: self
                .xcs
                .lock()
                .unwrap()
                .values()
                .map(Self::status)
                .collect(),
        };
        Ok(Response::new(Box::pin(
            tokio_stream::once(Ok(snapshot)).chain(tokio_stream::pending()),
        )))
    }
}

fn serve_forwarder(path: &Path) -> FakeForwarder {
    let f = FakeForwarder::default();
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

// ---------------------------------------------------------------- cluster helpers

/// Starts the API server on a blocking thread (it polls with sleeps).
async fn api_server() -> ApiServer {
    // The manager's log, shown for a failing test (RUST_LOG to change).
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn")),
        )
        .try_init();
    tokio::task::spawn_blocking(|| ApiServer::start().expect("API server starts"))
        .await
        .unwrap()
}

/// A client as `user` (impersonated through the admin token), or as admin.
async fn client_as(server: &ApiServer, user: Option<&str>) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(server.kubeconfig()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    if let Some(u) = user {
        config.auth_info.impersonate = Some(u.to_string());
    }
    kube::Client::try_from(config).unwrap()
}

/// Runs kubectl against the test server; panics with its output on failure.
fn kubectl(server: &ApiServer, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(server.kubeconfig())
        .args(args)
        .output()
        .expect("kubectl runs (Debian package kubernetes-client)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubectl {args:?}: {text}");
    text
}

/// [`install`], and the RBAC of deploy/ (the manager's service account).
async fn install_with_rbac(server: &ApiServer, client: &kube::Client) {
    install(server, client).await;
    kubectl(
        server,
        &["apply", "-f", deploy("rbac.yaml").to_str().unwrap()],
    );
}

/// Applies the checked-in CRDs and the namespace, as an operator would.
async fn install(server: &ApiServer, client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for doc in CRDS_YAML
        .split("\n---\n")
        .filter(|d| d.contains("kind: CustomResourceDefinition"))
    {
        let crd: CustomResourceDefinition = serde_norway::from_str(doc).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(
            &name,
            &PatchParams::apply("nsm-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
        let established = await_condition(crds.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .expect("CRD established in time")
            .unwrap();
    }
    kubectl(
        server,
        &["apply", "-f", deploy("namespace.yaml").to_str().unwrap()],
    );
    let ns: Api<Namespace> = Api::all(client.clone());
    ns.get(NAMESPACE).await.expect("namespace from deploy/");
}

const CONFIG: &str = "services:
- name: alpha
  cidr: [172.31.1.0/24]
- name: beta
  cidr: [172.31.2.0/24]
- name: tiny
  cidr: [172.31.3.0/29]
";

struct Node {
    dir: tempfile::TempDir,
    fwd: FakeForwarder,
    handle: Option<Handle>,
}

impl Node {
    fn sock(&self) -> PathBuf {
        self.dir.path().join("nsm.sock")
    }

    fn handle(&self) -> &Handle {
        self.handle.as_ref().unwrap()
    }

    /// Starts a manager; `port` 0 picks one (a restart keeps the old one,
    /// which registered endpoints carry in their URL).
    async fn start(
        dir: tempfile::TempDir,
        fwd: FakeForwarder,
        client: kube::Client,
        port: u16,
    ) -> Node {
        Node::start_named(NODE, dir, fwd, client, port).await
    }

    async fn start_named(
        name: &str,
        dir: tempfile::TempDir,
        fwd: FakeForwarder,
        client: kube::Client,
        port: u16,
    ) -> Node {
        let opts = Options {
            name: name.into(),
            listen: dir.path().join("nsm.sock"),
            peer_listen: format!("127.0.0.1:{port}").parse().unwrap(),
            advertise_url: None,
            forwarder: dir.path().join("fwd.sock"),
            state_dir: Some(dir.path().join("state")),
            registry: None,
            config: Config::parse(CONFIG, "test").unwrap(),
            max_token_lifetime: Duration::from_secs(6),
            cluster: Some(ClusterOptions {
                client,
                namespace: NAMESPACE.into(),
            }),
            security: Default::default(),
        };
        let handle = start(opts).await.expect("manager starts in cluster mode");
        Node {
            dir,
            fwd,
            handle: Some(handle),
        }
    }

    async fn new(client: kube::Client) -> Node {
        Node::new_named(NODE, client).await
    }

    async fn new_named(name: &str, client: kube::Client) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let fwd = serve_forwarder(&dir.path().join("fwd.sock"));
        Node::start_named(name, dir, fwd, client, 0).await
    }

    /// Client-side connection ids of the pod attachments.
    fn pod_conns(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .handle()
            .manager
            .records()
            .into_iter()
            .filter(|r| r.role == Role::Client && r.conn.0.id.starts_with("cni/"))
            .map(|r| r.conn.0.id)
            .collect();
        v.sort();
        v
    }

    async fn endpoint(&self, name: &str, service: &str) -> EndpointHandle {
        start_endpoint(EndpointOptions {
            name: name.into(),
            service: service.into(),
            labels: HashMap::new(),
            manager: self.sock(),
            listen: self.dir.path().join(format!("{name}.sock")),
            registration_lifetime: Duration::from_secs(60),
            inode_url: Some(format!("file:///run/netns/{name}")),
            identity: None,
        })
        .await
        .unwrap()
    }
}

/// Polls `f` until it holds or `within` passes.
async fn eventually(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------- tests

/// An NSM manifest, as NSM's examples write one.
const NSM_SERVICE: &str = "apiVersion: networkservicemesh.io/v1
kind: NetworkService
metadata:
  name: nse-composition
  namespace: nsm-system
spec:
  payload: ETHERNET
  matches:
    - source_selector:
        app: firewall
      routes:
        - destination_selector:
            app: vpn-gateway
    - routes:
        - destination_selector:
            app: firewall
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_is_the_custom_resources_and_manifests_pass_dry_run() {
    let server = api_server().await;
    let admin = server.client().await.unwrap();
    install(&server, &admin).await;

    // Every manifest of deploy/ (DaemonSet and RBAC included) passes the
    // server's validation.
    let out = kubectl(
        &server,
        &[
            "apply",
            "--dry-run=server",
            "-f",
            deploy("").to_str().unwrap(),
        ],
    );
    assert!(out.contains("daemonset.apps/nsm"), "{out}");
    assert!(
        out.contains("clusterrole.rbac.authorization.k8s.io/nsm-manager-pods"),
        "{out}"
    );

    // An NSM-style manifest applied with kubectl ...
    let manifest = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(manifest.path(), NSM_SERVICE).unwrap();
    kubectl(&server, &["apply", "-f", manifest.path().to_str().unwrap()]);

    let node = Node::new(admin.clone()).await;
    let ch = nsm_proto::uds::connect_unix(&node.sock()).await.unwrap();
    let mut ns_reg = NetworkServiceRegistryClient::new(ch.clone());
    // ... is visible through the manager's registry Find.
    let found: Vec<NetworkService> = ns_reg
        .find(NetworkServiceQuery {
            network_service: Some(NetworkService {
                name: "nse-composition".into(),
                ..Default::default()
            }),
            watch: false,
        })
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap().network_service.unwrap())
        .collect()
        .await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].payload, "ETHERNET");
    assert_eq!(found[0].matches.len(), 2);
    assert_eq!(
        found[0].matches[1].routes[0].destination_selector["app"],
        "firewall"
    );
    // The configured services were written as objects.
    let services: Api<crd::NetworkService> = Api::namespaced(admin.clone(), NAMESPACE);
    assert!(services.get_opt("alpha").await.unwrap().is_some());

    // Find with watch follows the API's watch: a later manifest and its deletion.
    let mut watch = ns_reg
        .find(NetworkServiceQuery {
            network_service: Some(NetworkService {
                name: "later".into(),
                ..Default::default()
            }),
            watch: true,
        })
        .await
        .unwrap()
        .into_inner();
    let later = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        later.path(),
        NSM_SERVICE.replace("nse-composition", "later-net"),
    )
    .unwrap();
    kubectl(&server, &["apply", "-f", later.path().to_str().unwrap()]);
    let ev = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("watch event in time")
        .unwrap()
        .unwrap();
    assert_eq!(ev.network_service.unwrap().name, "later-net");
    assert!(!ev.deleted);
    kubectl(
        &server,
        &["delete", "-n", NAMESPACE, "networkservice", "later-net"],
    );
    let ev = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("delete event in time")
        .unwrap()
        .unwrap();
    assert!(ev.deleted, "{ev:?}");

    // An endpoint registered through gRPC becomes an object ...
    let mut nse_reg = NetworkServiceEndpointRegistryClient::new(ch);
    let expires = SystemTime::now() + Duration::from_secs(4);
    let secs = expires
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    nse_reg
        .register(NetworkServiceEndpoint {
            name: "short-lived".into(),
            network_service_names: vec!["alpha".into()],
            url: "tcp://192.0.2.9:5001".into(),
            expiration_time: Some(prost_types::Timestamp {
                seconds: i64::try_from(secs).unwrap(),
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let endpoints: Api<crd::NetworkServiceEndpoint> = Api::namespaced(admin.clone(), NAMESPACE);
    let obj = endpoints.get("short-lived").await.expect("object created");
    assert_eq!(
        obj.spec.url,
        node.handle().advertise_url,
        "the object carries the manager's URL, as NSM's nsmgr registers"
    );
    assert_eq!(obj.spec.network_service_names, ["alpha"]);
    // ... and disappears when it expires unrefreshed.
    eventually(
        "expired endpoint deleted",
        Duration::from_secs(20),
        async || endpoints.get_opt("short-lived").await.unwrap().is_none(),
    )
    .await;

    // Two managers reaping while an endpoint refreshes (every second, 3 s
    // lifetime): the conditional delete never removes a live registration,
    // and the other manager sees it through the API.
    let other = Node::new(admin.clone()).await;
    let ep = start_endpoint(EndpointOptions {
        name: "refreshed".into(),
        service: "alpha".into(),
        labels: HashMap::new(),
        manager: node.sock(),
        listen: node.dir.path().join("refreshed.sock"),
        registration_lifetime: Duration::from_secs(3),
        inode_url: Some("file:///run/netns/refreshed".into()),
        identity: None,
    })
    .await
    .unwrap();
    let mut other_reg = NetworkServiceEndpointRegistryClient::new(
        nsm_proto::uds::connect_unix(&other.sock()).await.unwrap(),
    );
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            endpoints.get_opt("refreshed").await.unwrap().is_some(),
            "a refreshed registration survives the reapers"
        );
    }
    let seen: Vec<_> = other_reg
        .find(nsm_proto::registry::NetworkServiceEndpointQuery {
            network_service_endpoint: Some(NetworkServiceEndpoint {
                name: "refreshed".into(),
                ..Default::default()
            }),
            watch: false,
        })
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(seen.len(), 1, "the other manager finds it");
    ep.shutdown().await;
    assert!(
        endpoints.get_opt("refreshed").await.unwrap().is_none(),
        "unregistered"
    );
    drop(other);
    drop(node);
}

fn pod(name: &str, annotation: &str) -> Pod {
    pod_on(NODE, name, annotation)
}

fn pod_on(node: &str, name: &str, annotation: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "default",
                     "annotations": {"networkservicemesh.io": annotation}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "example.invalid/app"}]}
    }))
    .unwrap()
}

async fn annotate(pods: &Api<Pod>, name: &str, value: &str) {
    let patch = serde_json::json!({"metadata": {"annotations": {"networkservicemesh.io": value}}});
    pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_annotations_are_reconciled_across_restart_and_outage() {
    let mut server = api_server().await;
    let admin = server.client().await.unwrap();
    // The manager runs with exactly the RBAC of deploy/ (impersonating its
    // service account), so every call it makes is proven to be granted.
    install_with_rbac(&server, &admin).await;
    for (verb, what, allowed) in [
        ("watch", "pods", true),
        (
            "update",
            "networkserviceendpoints.networkservicemesh.io",
            true,
        ),
        ("create", "ipamblocks.nsm-rs.io", true),
        ("delete", "ipamblocks.nsm-rs.io", false),
        ("create", "pods", false),
        ("get", "secrets", false),
    ] {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(server.kubeconfig())
            .args([
                "auth",
                "can-i",
                verb,
                what,
                "-n",
                NAMESPACE,
                "--as",
                SERVICE_ACCOUNT,
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            if allowed { "yes" } else { "no" },
            "{verb} {what}"
        );
    }
    let sa = client_as(&server, Some(SERVICE_ACCOUNT)).await;
    let mut node = Node::new(sa).await;
    let _alpha = node.endpoint("alpha-1", "alpha").await;
    let _beta = node.endpoint("beta-1", "beta").await;

    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    pods.create(
        &PostParams::default(),
        &pod("web", "kernel://alpha/nsm-a,kernel://beta/nsm-b"),
    )
    .await
    .unwrap();

    // The CNI plugin's call: two services, two connections.
    let attach = AttachRequest {
        namespace: "default".into(),
        pod: "web".into(),
        container_id: "c1".into(),
        netns: "/proc/self/ns/net".into(),
        network: "mesh".into(),
        cni_ifname: "eth0".into(),
        extra_requests: vec![],
    };
    let mut pods_api = PodsClient::new(nsm_proto::uds::connect_unix(&node.sock()).await.unwrap());
    let got = pods_api
        .attach(attach.clone())
        .await
        .unwrap()
        .into_inner()
        .attachments;
    let names: Vec<&str> = got.iter().map(|a| a.ifname.as_str()).collect();
    assert_eq!(names, ["nsm-a", "nsm-b"]);
    assert_eq!(
        got[1].connection.as_ref().unwrap().id,
        "cni/mesh/c1/eth0/nsm-b"
    );
    let a_addr = got[0].connection.as_ref().unwrap().context.clone();
    assert_eq!(
        node.pod_conns(),
        ["cni/mesh/c1/eth0/nsm-a", "cni/mesh/c1/eth0/nsm-b"]
    );
    assert!(node.fwd.ids().len() >= 2, "{:?}", node.fwd.ids());
    // Attach is idempotent (a repeated CNI ADD).
    let again = pods_api.attach(attach.clone()).await.unwrap().into_inner();
    assert_eq!(
        again.attachments[0].connection.as_ref().unwrap().context,
        a_addr
    );

    // Unknown pods and unknown attachments.
    let err = pods_api
        .attach(AttachRequest {
            pod: "ghost".into(),
            ..attach.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    pods_api
        .detach(DetachRequest {
            network: "mesh".into(),
            container_id: "nobody".into(),
            cni_ifname: "eth0".into(),
        })
        .await
        .expect("detaching an unknown attachment succeeds");

    // Removing a service from the annotation closes its connection only.
    annotate(&pods, "web", "kernel://alpha/nsm-a").await;
    eventually("nsm-b closed", Duration::from_secs(5), async || {
        node.pod_conns() == ["cni/mesh/c1/eth0/nsm-a"]
    })
    .await;

    // A manager restart loses nothing: bindings and connections reload, and
    // the restarted watch reconciles a later change.
    let h = node.handle.take().unwrap();
    let port = h.peer_addr.port();
    h.shutdown().await;
    let sa = client_as(&server, Some(SERVICE_ACCOUNT)).await;
    let Node { dir, fwd, .. } = node;
    let mut node = Node::start(dir, fwd, sa, port).await;
    assert_eq!(node.pod_conns(), ["cni/mesh/c1/eth0/nsm-a"]);
    assert_eq!(node.handle().pods.as_ref().unwrap().bindings().len(), 1);
    annotate(&pods, "web", "kernel://alpha/nsm-a,kernel://beta/nsm-c").await;
    eventually(
        "nsm-c made after restart",
        Duration::from_secs(10),
        async || node.pod_conns() == ["cni/mesh/c1/eth0/nsm-a", "cni/mesh/c1/eth0/nsm-c"],
    )
    .await;

    // The API server away for 30 s: connections stay, refreshes (every 2 s
    // with a 6 s lifetime) keep working from the registry cache.
    let programmed = node.fwd.ids();
    tokio::task::block_in_place(|| server.pause());
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        node.pod_conns(),
        ["cni/mesh/c1/eth0/nsm-a", "cni/mesh/c1/eth0/nsm-c"]
    );
    assert_eq!(node.fwd.ids(), programmed, "cross-connects untouched");
    let records = node.handle().manager.records();
    let fresh = records
        .iter()
        .filter(|r| r.conn.0.id.starts_with("cni/"))
        .all(|r| {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis();
            now - u128::from(r.refreshed_ms) < 5_000
        });
    assert!(fresh, "managed connections refreshed during the outage");
    tokio::task::block_in_place(|| server.resume()).unwrap();

    // Back: the manager re-watches and catches up with a change.
    annotate(&pods, "web", "kernel://beta/nsm-c").await;
    eventually(
        "caught up after the outage",
        Duration::from_secs(15),
        async || node.pod_conns() == ["cni/mesh/c1/eth0/nsm-c"],
    )
    .await;

    // A deleted pod loses its connections and its binding.
    pods.delete("web", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    eventually(
        "deleted pod detached",
        Duration::from_secs(10),
        async || {
            node.pod_conns().is_empty()
                && node.handle().pods.as_ref().unwrap().bindings().is_empty()
        },
    )
    .await;
    node.handle.take().unwrap().shutdown().await;
}

/// Chain policies as an operator writes them: ChainPolicy objects.
const CHAIN_POLICY: &str = "apiVersion: nsm-rs.io/v1alpha1
kind: ChainPolicy
metadata:
  name: web-guard
  namespace: nsm-system
spec:
  match: {service: secure-net, source: {app: web}}
  chain:
    - acl: {rules: [{allow: {proto: icmp}}], default: deny}
    - ratelimit: {rate: RATE, burst: 64KiB}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_policies_come_from_custom_resources() {
    let server = api_server().await;
    let admin = server.client().await.unwrap();
    install(&server, &admin).await;
    let node = Node::new(admin.clone()).await;
    let apply = |yaml: String| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), yaml).unwrap();
        kubectl(&server, &["apply", "-f", f.path().to_str().unwrap()])
    };
    let rate_in_force = || {
        let set = node.handle().manager.policies();
        let labels = [("app".to_string(), "web".to_string())].into();
        let plan = set.plan("secure-net", &labels);
        plan.segments[0]
            .chain
            .functions
            .iter()
            .find_map(|f| match &f.kind {
                Some(nsm_proto::forwarder::v1::function::Kind::Ratelimit(r)) => Some(r.rate_bps),
                _ => None,
            })
    };
    apply(CHAIN_POLICY.replace("RATE", "50Mbit"));
    eventually(
        "the ChainPolicy is in force",
        Duration::from_secs(10),
        async || rate_in_force() == Some(50_000_000),
    )
    .await;
    apply(CHAIN_POLICY.replace("RATE", "20Mbit"));
    eventually(
        "the edit is in force",
        Duration::from_secs(10),
        async || rate_in_force() == Some(20_000_000),
    )
    .await;
    // A bad edit (the API server accepts it: the schema keeps `chain` free)
    // is refused by the manager; the last good version stays.
    apply(CHAIN_POLICY.replace("RATE", "0"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rate_in_force(), Some(20_000_000));
    kubectl(
        &server,
        &["delete", "chainpolicy", "-n", NAMESPACE, "web-guard"],
    );
    eventually(
        "a deleted ChainPolicy is gone",
        Duration::from_secs(10),
        async || node.handle().manager.policies().is_empty(),
    )
    .await;
}

/// Attaches pod `pod` (already created on `node`'s node) as the CNI plugin would.
async fn attach(node: &Node, pod: &str) -> Result<Vec<nsm_proto::manager::v1::Attachment>, Status> {
    let mut api = PodsClient::new(nsm_proto::uds::connect_unix(&node.sock()).await.unwrap());
    Ok(api
        .attach(AttachRequest {
            namespace: "default".into(),
            pod: pod.into(),
            container_id: format!("c-{pod}"),
            netns: "/proc/self/ns/net".into(),
            network: "mesh".into(),
            cni_ifname: "eth0".into(),
            extra_requests: vec![],
        })
        .await?
        .into_inner()
        .attachments)
}

/// The client and endpoint addresses a connection was given.
fn addresses(a: &nsm_proto::manager::v1::Attachment) -> Vec<String> {
    let ipc = a
        .connection
        .as_ref()
        .and_then(|c| c.context.as_ref())
        .and_then(|c| c.ip_context.as_ref())
        .expect("an IP context");
    ipc.src_ip_addrs
        .iter()
        .chain(&ipc.dst_ip_addrs)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_of_a_cluster_share_pools_and_respect_each_others_entries() {
    let server = api_server().await;
    let admin = server.client().await.unwrap();
    install_with_rbac(&server, &admin).await;
    // Both managers run with the service account's RBAC only.
    let sa = client_as(&server, Some(SERVICE_ACCOUNT)).await;
    let a = Node::new_named("node-a", sa.clone()).await;
    let b = Node::new_named("node-b", sa.clone()).await;
    let _alpha_a = a.endpoint("alpha-a", "alpha").await;
    let _alpha_b = b.endpoint("alpha-b", "alpha").await;
    let _tiny = a.endpoint("tiny-a", "tiny").await;

    // Ten pods per node, one alpha connection each: more than one /28 block
    // per node, allocated concurrently on both nodes.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    for (node, n) in [("node-a", 10), ("node-b", 10)] {
        for i in 0..n {
            let name = format!("{node}-p{i}");
            pods.create(
                &PostParams::default(),
                &pod_on(node, &name, "kernel://alpha/nsm-1"),
            )
            .await
            .unwrap();
        }
    }
    async fn attach_all(node: &Node, prefix: &str) -> Vec<String> {
        let mut all = Vec::new();
        for i in 0..10 {
            let got = attach(node, &format!("{prefix}-p{i}")).await.unwrap();
            all.extend(addresses(&got[0]));
        }
        all
    }
    let (from_a, from_b) = tokio::join!(attach_all(&a, "node-a"), attach_all(&b, "node-b"));
    assert_eq!(from_a.len(), 20);
    assert_eq!(from_b.len(), 20);
    let mut all: Vec<&String> = from_a.iter().chain(&from_b).collect();
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        40,
        "an address was handed out twice: {from_a:?} {from_b:?}"
    );

    // The blocks are objects a person can list, each with one owner, and
    // each node's addresses lie in its own blocks.
    let blocks: Api<crd::IPAMBlock> = Api::namespaced(admin.clone(), NAMESPACE);
    let listed = blocks.list(&Default::default()).await.unwrap();
    let owned_by = |node: &str| -> Vec<ipnet::IpNet> {
        listed
            .items
            .iter()
            .filter(|o| o.spec.node == node)
            .map(|o| o.spec.cidr.parse().unwrap())
            .collect()
    };
    let (blocks_a, blocks_b) = (owned_by("node-a"), owned_by("node-b"));
    assert!(blocks_a.len() >= 2 && blocks_b.len() >= 2, "{listed:?}");
    for (addrs, own) in [(&from_a, &blocks_a), (&from_b, &blocks_b)] {
        for addr in addrs {
            let ip: ipnet::IpNet = addr.parse().unwrap();
            assert!(
                own.iter().any(|b| b.contains(&ip.addr())),
                "{addr} outside its node's blocks {own:?}"
            );
        }
    }
    let out = kubectl(
        &server,
        &[
            "get",
            "ipamblocks",
            "-n",
            NAMESPACE,
            "-l",
            "nsm-rs.io/node=node-b",
        ],
    );
    assert!(out.contains("node-b") && !out.contains("node-a"), "{out}");

    // A pool smaller than a block is one block: node-a's first tiny
    // connection claims it, so node-b's gets ResourceExhausted naming the
    // service.
    for (node, name) in [("node-a", "tiny-1"), ("node-b", "tiny-2")] {
        pods.create(
            &PostParams::default(),
            &pod_on(node, name, "kernel://tiny/nsm-t"),
        )
        .await
        .unwrap();
    }
    attach(&a, "tiny-1")
        .await
        .expect("node-a gets the tiny block");
    let err = attach(&b, "tiny-2").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("`tiny`"), "{err}");

    // Registry entries belong to whoever registered them, across managers:
    // an endpoint on node-b can neither take over nor unregister node-a's.
    let mut reg_b = NetworkServiceEndpointRegistryClient::new(
        nsm_proto::uds::connect_unix(&b.sock()).await.unwrap(),
    );
    let hijack = NetworkServiceEndpoint {
        name: "alpha-a".into(),
        network_service_names: vec!["alpha".into()],
        url: "tcp://192.0.2.66:5001".into(),
        ..Default::default()
    };
    let err = reg_b.register(hijack.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = reg_b.unregister(hijack).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let endpoints: Api<crd::NetworkServiceEndpoint> = Api::namespaced(admin.clone(), NAMESPACE);
    let obj = endpoints
        .get("alpha-a")
        .await
        .expect("node-a's entry stays");
    assert_eq!(obj.spec.url, a.handle().advertise_url);
    assert_eq!(
        obj.metadata.annotations.unwrap()["nsm-rs.io/registered-by"],
        "nsm-manager/node-a#uid:0"
    );
}

/// Kills a child process on drop (the test's "pod").
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The DaemonSet's manager container, run as a kubelet would run it: its
/// command and args with `$(VAR)` from its env, its volumes as directories
/// (ConfigMaps written out), and the service account's token, CA and
/// namespace at /var/run/secrets/kubernetes.io/serviceaccount inside a mount
/// namespace of its own, with KUBERNETES_SERVICE_HOST/PORT set. It has no
/// kubeconfig: everything it does, it does with the in-cluster config and
/// the RBAC of deploy/rbac.yaml. Only the ports differ (free loopback ports
/// instead of the node's 5001 and 9090).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemonset_manager_runs_with_the_in_cluster_config() {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;

    let server = api_server().await;
    let admin = server.client().await.unwrap();
    install_with_rbac(&server, &admin).await;

    // deploy/daemonset.yaml: its ConfigMaps and the DaemonSet.
    let (config_maps, pod_spec) = nsm_k8s::testing::daemonset_manifest();
    assert_eq!(
        pod_spec.service_account_name.as_deref(),
        Some("nsm-manager")
    );
    let c = pod_spec
        .containers
        .iter()
        .find(|c| c.name == "nsm-manager")
        .unwrap();

    // Volumes: a directory each; ConfigMaps written out.
    let root = tempfile::tempdir().unwrap();
    let mut mounts = Vec::new();
    for m in c.volume_mounts.as_ref().unwrap() {
        let dir = root.path().join(&m.name);
        std::fs::create_dir_all(&dir).unwrap();
        let vol = pod_spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == m.name)
            .unwrap();
        if let Some(cm) = &vol.config_map {
            for (k, v) in config_maps[&cm.name].data.as_ref().unwrap() {
                std::fs::write(dir.join(k), v).unwrap();
            }
        }
        mounts.push((m.mount_path.clone(), dir));
    }
    // $(VAR) substitution from the container's env, as the kubelet does.
    let env: HashMap<&str, &str> = [
        ("NODE_NAME", "node-ic"),
        ("NODE_IP", "127.0.0.1"),
        ("NSM_NAMESPACE", NAMESPACE),
    ]
    .into();
    for e in c.env.as_ref().unwrap() {
        assert!(env.contains_key(e.name.as_str()), "unknown env {}", e.name);
    }
    let (peer, metrics) = (free_port(), free_port());
    let args: Vec<String> = c
        .args
        .as_ref()
        .unwrap()
        .iter()
        .map(|a| {
            let mut a = a.clone();
            for (k, v) in &env {
                a = a.replace(&format!("$({k})"), v);
            }
            for (path, dir) in &mounts {
                a = a.replace(path.as_str(), dir.to_str().unwrap());
            }
            match a.split_once('=') {
                Some(("--peer-listen", _)) => format!("--peer-listen=127.0.0.1:{peer}"),
                Some(("--advertise-url", _)) => format!("--advertise-url=tcp://127.0.0.1:{peer}"),
                Some(("--metrics-listen", _)) => format!("--metrics-listen=127.0.0.1:{metrics}"),
                _ => a,
            }
        })
        .collect();
    assert_eq!(c.command.as_ref().unwrap(), &["/usr/local/bin/nsm-manager"]);

    // The service account's projected token, as the kubelet mounts it.
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), NAMESPACE);
    let token = sas
        .create_token_request(
            "nsm-manager",
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec!["https://kubernetes.default.svc".into()],
                    expiration_seconds: Some(3600),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("a token for the service account")
        .status
        .unwrap()
        .token;
    let sa_dir = root.path().join("serviceaccount");
    std::fs::create_dir_all(&sa_dir).unwrap();
    std::fs::write(sa_dir.join("token"), token).unwrap();
    std::fs::copy(server.ca_bundle(), sa_dir.join("ca.crt")).unwrap();
    std::fs::write(sa_dir.join("namespace"), NAMESPACE).unwrap();

    let log = root.path().join("manager.log");
    let script = "mount -t tmpfs tmpfs /run \
        && mkdir -p /run/secrets/kubernetes.io/serviceaccount \
        && mount --bind \"$0\" /run/secrets/kubernetes.io/serviceaccount \
        && exec \"$@\"";
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(&sa_dir)
        .arg(env!("CARGO_BIN_EXE_nsm-manager"))
        .args(&args)
        .env_remove("NSM_KUBECONFIG")
        .env_remove("KUBECONFIG")
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", server.port().to_string())
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(root.path().join("manager.err")).unwrap())
        .spawn()
        .expect("unshare runs");
    let mut pod = KillOnDrop(child);
    let logs = || {
        format!(
            "{}{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(root.path().join("manager.err")).unwrap_or_default()
        )
    };

    // The services of its ConfigMap become objects ...
    let services: Api<crd::NetworkService> = Api::namespaced(admin.clone(), NAMESPACE);
    eventually(
        "secure-net registered",
        Duration::from_secs(30),
        async || {
            assert!(
                pod.0.try_wait().unwrap().is_none(),
                "the manager exited: {}",
                logs()
            );
            services.get_opt("secure-net").await.unwrap().is_some()
        },
    )
    .await;
    // ... an endpoint on its socket becomes an object it owns ...
    let socket = mounts
        .iter()
        .find(|(p, _)| p == "/var/lib/networkservicemesh")
        .unwrap()
        .1
        .join("nsm.io.sock");
    let mut reg = NetworkServiceEndpointRegistryClient::new(
        nsm_proto::uds::connect_unix(&socket).await.unwrap(),
    );
    reg.register(NetworkServiceEndpoint {
        name: "gw-1".into(),
        network_service_names: vec!["secure-net".into()],
        url: "tcp://192.0.2.7:5005".into(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("register through the manager: {e}\n{}", logs()));
    let endpoints: Api<crd::NetworkServiceEndpoint> = Api::namespaced(admin.clone(), NAMESPACE);
    let obj = endpoints.get("gw-1").await.unwrap();
    assert_eq!(
        obj.metadata.annotations.unwrap()["nsm-rs.io/registered-by"],
        "nsm-manager/node-ic#uid:0"
    );
    assert_eq!(obj.spec.url, format!("tcp://127.0.0.1:{peer}"));
    // ... and its metrics port answers a scrape.
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(
        body.starts_with("HTTP/1.1 200") || body.starts_with("HTTP/1.0 200"),
        "{body}"
    );
    assert!(body.contains("nsm_manager_"), "{body}");

    // Nothing but the token: a manager whose token is gone cannot start.
    drop(pod);
    let status = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs tmpfs /run && exec \"$@\"",
            "sh",
        ])
        .arg(env!("CARGO_BIN_EXE_nsm-manager"))
        .args(&args)
        .env_remove("NSM_KUBECONFIG")
        .env_remove("KUBECONFIG")
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", server.port().to_string())
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(2), "{status:?}");
    assert!(
        String::from_utf8_lossy(&status.stderr).contains("Kubernetes client"),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_authorization_objects_decide_who_may_request() {
    use nsm_proto::networkservice::network_service_client::NetworkServiceClient;

    let server = api_server().await;
    let admin = server.client().await.unwrap();
    install_with_rbac(&server, &admin).await;
    let node = Node::new(client_as(&server, Some(SERVICE_ACCOUNT)).await).await;
    let _alpha = node.endpoint("alpha-1", "alpha").await;
    let mut nsc =
        NetworkServiceClient::new(nsm_proto::uds::connect_unix(&node.sock()).await.unwrap());
    let apply = |name: &str, spec: &str| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            f.path(),
            format!(
                "apiVersion: nsm-rs.io/v1alpha1\nkind: ServiceAuthorization\n\
                 metadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec: {spec}\n"
            ),
        )
        .unwrap();
        kubectl(&server, &["apply", "-f", f.path().to_str().unwrap()]);
    };

    // No rules anywhere: open, as documented.
    let conn = nsc
        .request(common::kernel_request("alpha", "nsm-1", &[]))
        .await
        .expect("no authorization configured: allowed")
        .into_inner();
    nsc.close(conn).await.unwrap();

    // A rule for someone else (uid 1000): we are now refused, and nothing
    // is programmed.
    apply("alpha-for-1000", "{services: [alpha], uids: [1000]}");
    let before = node.fwd.ids();
    let mut nsc2 = nsc.clone();
    eventually(
        "refused once the object is seen",
        Duration::from_secs(10),
        async || match nsc2
            .request(common::kernel_request("alpha", "nsm-1", &[]))
            .await
        {
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
                assert!(e.message().contains("authorization policy"), "{e}");
                true
            }
            Ok(c) => {
                nsc2.close(c.into_inner()).await.unwrap();
                false
            }
        },
    )
    .await;
    assert_eq!(node.fwd.ids(), before);

    // A rule for uid 0 with app=web: only the labelled request passes.
    apply(
        "alpha-web",
        "{services: [alpha], uids: [0], labels: {app: web}}",
    );
    let mut nsc3 = nsc.clone();
    eventually(
        "allowed with the label",
        Duration::from_secs(10),
        async || match nsc3
            .request(common::kernel_request("alpha", "nsm-1", &[("app", "web")]))
            .await
        {
            Ok(c) => {
                nsc3.close(c.into_inner()).await.unwrap();
                true
            }
            Err(_) => false,
        },
    )
    .await;
    let err = nsc
        .request(common::kernel_request("alpha", "nsm-1", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // A pod's annotation asks as the pod (its service account), not as the
    // CNI plugin's uid 0: the uid-0 rule above does not let it in, even
    // with the label, and nothing is programmed.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    for (name, account) in [("web", "web"), ("db", "db")] {
        let mut p = pod(name, "kernel://alpha/nsm-1?app=web");
        p.spec.as_mut().unwrap().service_account_name = Some(account.into());
        pods.create(&PostParams::default(), &p).await.unwrap();
    }
    let before = node.fwd.ids();
    let err = attach(&node, "web").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(
        err.message().contains("serviceaccount:default/web"),
        "{err}"
    );
    assert_eq!(node.fwd.ids(), before);
    assert!(node.pod_conns().is_empty(), "{:?}", node.pod_conns());

    // A rule for its service account: web gets its interface, db does not.
    apply(
        "alpha-web-pods",
        "{services: [alpha], service_accounts: [default/web]}",
    );
    eventually(
        "the pod rule is seen",
        Duration::from_secs(10),
        async || attach(&node, "web").await.is_ok(),
    )
    .await;
    assert_eq!(node.pod_conns(), ["cni/mesh/c-web/eth0/nsm-1"]);
    let err = attach(&node, "db").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert_eq!(node.pod_conns(), ["cni/mesh/c-web/eth0/nsm-1"]);

    // Taking the rule away closes the pod's connection on the next pass.
    kubectl(
        &server,
        &[
            "delete",
            "-n",
            NAMESPACE,
            "serviceauthorization",
            "alpha-web-pods",
        ],
    );
    eventually(
        "the pod's connection closed once its rule is gone",
        Duration::from_secs(20),
        async || node.pod_conns().is_empty(),
    )
    .await;

    // A bad object alone still keeps the service closed: it allows nothing,
    // though it names us (uid 0) beside its typo.
    apply(
        "typo",
        "{services: [alpha], uids: [0], spiffe_ids: [\"spife://td/x\"]}",
    );
    kubectl(
        &server,
        &[
            "delete",
            "-n",
            NAMESPACE,
            "serviceauthorization",
            "alpha-web",
            "alpha-for-1000",
        ],
    );
    eventually("only the typo left", Duration::from_secs(10), async || {
        node.handle().manager.cluster_authorization().len() == 1
    })
    .await;
    let err = nsc
        .request(common::kernel_request("alpha", "nsm-1", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // No objects at all: open again.
    kubectl(
        &server,
        &["delete", "-n", NAMESPACE, "serviceauthorization", "typo"],
    );
    let mut nsc4 = nsc.clone();
    eventually("open again", Duration::from_secs(10), async || {
        match nsc4
            .request(common::kernel_request("alpha", "nsm-1", &[]))
            .await
        {
            Ok(c) => {
                nsc4.close(c.into_inner()).await.unwrap();
                true
            }
            Err(_) => false,
        }
    })
    .await;
}
