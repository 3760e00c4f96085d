//! Cluster mode against a real API server (etcd + kube-apiserver on
//! loopback, `nsm_k8s::testing::ApiServer`): the registry on the custom
//! resources, endpoint expiry, the manifests of `deploy/` (server-side dry
//! run with kubectl), and pod annotation reconciliation through the
//! `nsm.manager.v1.Pods` API, across a manager restart and an API outage.
//!
//! No kubelet runs: the tests create Pod objects with `spec.nodeName` set and
//! call Attach themselves, as the CNI plugin would. The data path is a fake
//! forwarder (the pattern of `two_managers.rs`); the end-to-end run with real
//! forwarders and the CNI binary belongs to the testbed.

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

/// Records cross-connects; answers as a forwarder with no WireGuard side.
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
        CrossConnectStatus {
            id: xc.id.clone(),
            state: XState::Up as i32,
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
        let opts = Options {
            name: NODE.into(),
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
        let dir = tempfile::tempdir().unwrap();
        let fwd = serve_forwarder(&dir.path().join("fwd.sock"));
        Node::start(dir, fwd, client, 0).await
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
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "default",
                     "annotations": {"networkservicemesh.io": annotation}},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "example.invalid/app"}]}
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
    install(&server, &admin).await;
    // The manager runs with exactly the RBAC of deploy/ (impersonating its
    // service account), so every call it makes is proven to be granted.
    kubectl(
        &server,
        &["apply", "-f", deploy("rbac.yaml").to_str().unwrap()],
    );
    for (verb, what, allowed) in [
        ("watch", "pods", true),
        (
            "patch",
            "networkserviceendpoints.networkservicemesh.io",
            true,
        ),
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
