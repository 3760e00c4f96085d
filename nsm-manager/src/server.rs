//! Wiring: the gRPC services of a manager, its listeners (unix socket for
//! local clients, TCP for peer managers), background tasks, and shutdown.
//!
//! [`start`] is what the `nsm-manager` binary and the integration tests run,
//! so that tests drive exactly the production assembly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nsm_proto::connection::monitor_connection_server::{
    MonitorConnection, MonitorConnectionServer,
};
use nsm_proto::connection::{Connection, ConnectionEvent, MonitorScopeSelector};
use nsm_proto::ipam::ipam_server::IpamServer as IpamGrpc;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::networkservice::network_service_server::{NetworkService, NetworkServiceServer};
use nsm_proto::registry::NetworkService as NsMsg;
use nsm_proto::registry::network_service_endpoint_registry_server::NetworkServiceEndpointRegistryServer;
use nsm_proto::registry::network_service_registry_server::NetworkServiceRegistryServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::authz::principal_of;
use crate::cluster::{ClusterOptions, KubeRegistry};
use crate::config::Config;
use crate::identity::{IdentityError, IdentityPaths, IdentitySource};
use crate::ipam::{Ipam, IpamBackend, IpamServer};
use crate::manager::{Manager, Settings};
use crate::pods::{NodePods, PodsServer};
use crate::registry::{NsRegistryServer, NseRegistryServer, RegistryBackend, RegistryStore};
use crate::store::{StoreError, Table};
use crate::tls::{Tls, peer_of};

/// gRPC metadata a client sets to have the manager refresh the connection
/// itself until Close (value `true`).
pub const MD_MANAGED: &str = "nsm-managed";

/// Everything [`start`] needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Node name.
    pub name: String,
    /// Unix socket for local clients.
    pub listen: PathBuf,
    /// TCP address for peer managers (port 0 = any free port).
    pub peer_listen: SocketAddr,
    /// How peers reach us; derived from the bound TCP address when `None`.
    pub advertise_url: Option<String>,
    /// The forwarder's unix socket.
    pub forwarder: PathBuf,
    /// Durable state directory (`None`: memory only, for tests).
    pub state_dir: Option<PathBuf>,
    /// The registry manager's URL; `None` = this manager serves registry and IPAM.
    pub registry: Option<String>,
    /// Services and pools (registry manager only).
    pub config: Config,
    /// Path segment lifetime.
    pub max_token_lifetime: Duration,
    /// Cluster mode: the Kubernetes API holds the registry and tells us
    /// about this node's pods (`None`: the embedded registry). IPAM stays
    /// with `registry` (or this manager's `config` when that is `None`).
    pub cluster: Option<ClusterOptions>,
    /// Identity, mTLS and token settings.
    pub security: Security,
}

/// Identity settings of a manager.
#[derive(Debug, Clone)]
pub struct Security {
    /// Certificate, key and trust bundle files. `None` = insecure mode:
    /// plain TCP between managers, unsigned path segments. Only for the
    /// embedded default until identities are provisioned; never across an
    /// untrusted network.
    pub identity: Option<IdentityPaths>,
    /// How often the identity files are checked for a rotation.
    pub reload_period: Duration,
    /// Talk mTLS to the forwarder (it runs with `--identity-dir` and must
    /// present `spiffe://TD/nsm-forwarder/...`); needs `identity`.
    pub forwarder_mtls: bool,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            identity: None,
            reload_period: Duration::from_secs(5),
            forwarder_mtls: false,
        }
    }
}

/// Why a manager cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener cannot be bound.
    #[error("cannot listen on {what}: {source}")]
    Listen {
        /// The address or path.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The state directory or a table is unusable.
    #[error("state: {0}")]
    Store(#[from] StoreError),
    /// `--registry` is not a usable URL.
    #[error("--registry: {0}")]
    Registry(#[from] crate::util::BadUrl),
    /// The identity files are unusable.
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    /// The state directory cannot be created.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A running manager.
#[derive(Debug)]
pub struct Handle {
    /// The URL peers use to reach this manager.
    pub advertise_url: String,
    /// The bound TCP address.
    pub peer_addr: SocketAddr,
    /// The engine, for inspection.
    pub manager: Arc<Manager>,
    /// The local registry, when this manager serves it.
    pub registry: Option<Arc<RegistryStore>>,
    /// The local allocator (its lease table), when this manager allocates:
    /// the registry manager, or every manager in cluster mode.
    pub ipam: Option<Arc<Ipam>>,
    /// The pods of this node, in cluster mode.
    pub pods: Option<Arc<NodePods>>,
    /// The cluster registry, in cluster mode.
    pub kube_registry: Option<Arc<KubeRegistry>>,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

impl Handle {
    /// Runs `task` in the background until shutdown (which aborts it).
    pub fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.background.push(tokio::spawn(task));
    }

    /// Graceful shutdown: stops accepting, finishes in-flight calls, stops
    /// timers. State stays on disk; connections stay programmed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in &self.background {
            t.abort();
        }
        // Wait until every aborted task is dropped: they hold the manager,
        // and with it the store's lock, which a restart in the same process
        // takes again at once.
        for t in self.background {
            let _ = t.await;
        }
        for s in self.servers {
            // Open watch/monitor streams never end by themselves: give
            // in-flight calls a moment, then cut.
            let abort = s.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), s)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

/// The peer listener's connections, with `TCP_NODELAY`: a reply is a few
/// small frames written one by one (headers, data, trailers), and with
/// Nagle the last waits for the caller's delayed ACK, 40 ms on every
/// Request and Close between managers. (The mTLS listener sets it in
/// `Tls::incoming`.)
fn peer_incoming(tcp: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(tcp).with_nodelay(Some(true))
}

/// Address to advertise when listening on `addr`: an unspecified address is
/// replaced by the address this host would use to reach the documentation
/// network (no packet is sent), which is the underlay in the testbed.
pub fn default_advertise(addr: SocketAddr) -> String {
    let mut ip = addr.ip();
    if ip.is_unspecified() {
        let probe = if ip.is_ipv4() {
            "192.0.2.1:9"
        } else {
            "[2001:db8::1]:9"
        };
        ip = std::net::UdpSocket::bind(if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
            .and_then(|s| s.connect(probe).and_then(|()| s.local_addr()))
            .map(|a| a.ip())
            .unwrap_or(if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
    }
    format!("tcp://{}", SocketAddr::new(ip, addr.port()))
}

/// Starts a manager: binds both listeners, opens the state, and spawns
/// the servers, the lifecycle ticker and the forwarder watcher.
///
/// # Errors
/// [`StartError`].
pub async fn start(opts: Options) -> Result<Handle, StartError> {
    let dir = opts.state_dir.as_deref();
    if let Some(d) = dir {
        std::fs::create_dir_all(d).map_err(|source| StartError::StateDir {
            path: d.display().to_string(),
            source,
        })?;
    }
    let tcp = tokio::net::TcpListener::bind(opts.peer_listen)
        .await
        .map_err(|source| StartError::Listen {
            what: opts.peer_listen.to_string(),
            source,
        })?;
    let peer_addr = tcp.local_addr().map_err(|source| StartError::Listen {
        what: opts.peer_listen.to_string(),
        source,
    })?;
    let unix = nsm_proto::uds::bind_unix(&opts.listen).map_err(|source| StartError::Listen {
        what: opts.listen.display().to_string(),
        source,
    })?;
    let advertise_url = opts
        .advertise_url
        .clone()
        .unwrap_or_else(|| default_advertise(peer_addr));

    // IPAM: the manager named by --registry owns it, or this one (--config pools).
    let tls = match &opts.security.identity {
        Some(paths) => Some(Tls::new(IdentitySource::load(paths.clone())?)),
        None => {
            tracing::warn!(
                "no identity configured: peer links are plain TCP and path segments unsigned (insecure mode)"
            );
            None
        }
    };
    // In cluster mode every manager has the pools and allocates in blocks it
    // claims through the API (crate::cluster_ipam); nobody serves ManagePrefixes.
    let (ipam_backend, ipam_local, serve_ipam) = match (&opts.registry, &opts.cluster) {
        (Some(url), _) => (
            IpamBackend::Remote(crate::util::channel_tls(url, tls.as_ref())?),
            None,
            false,
        ),
        (None, Some(c)) => {
            let ipam = Arc::new(Ipam::open(dir, &opts.config.services)?);
            let blocks = crate::cluster_ipam::ClusterIpam::open(
                ipam.clone(),
                dir,
                c.client.clone(),
                &c.namespace,
                &opts.name,
            )?;
            (IpamBackend::Cluster(Arc::new(blocks)), Some(ipam), false)
        }
        (None, None) => {
            let ipam = Arc::new(Ipam::open(dir, &opts.config.services)?);
            (IpamBackend::Local(ipam.clone()), Some(ipam), true)
        }
    };
    // Registry: the cluster's custom resources, the registry manager, or our store.
    let mut kube_registry = None;
    let (registry, registry_store) = if let Some(cluster) = &opts.cluster {
        let scope = tls.as_ref().map_or_else(
            || format!("nsm-manager/{}", opts.name),
            |t| t.identity().id.clone(),
        );
        let k = KubeRegistry::new(cluster, opts.max_token_lifetime, &scope);
        for s in &opts.config.services {
            let ns = NsMsg {
                name: s.name.clone(),
                payload: s.payload.as_str().to_string(),
                ..Default::default()
            };
            // Not fatal: the API server may be away while we (re)start; the
            // services exist from an earlier start or an operator's manifest.
            if let Err(e) = k.register_ns(ns).await {
                tracing::warn!(service = %s.name, error = %e, "cannot register a configured service");
            }
        }
        kube_registry = Some(k.clone());
        (RegistryBackend::Kube(k), None)
    } else if let Some(url) = &opts.registry {
        (
            RegistryBackend::Remote(crate::util::channel_tls(url, tls.as_ref())?),
            None,
        )
    } else {
        let store = Arc::new(RegistryStore::open(dir, opts.max_token_lifetime)?);
        for s in &opts.config.services {
            // Config is the source of truth for services it names.
            store
                .register_ns(NsMsg {
                    name: s.name.clone(),
                    payload: s.payload.as_str().to_string(),
                    ..Default::default()
                })
                .map_err(|st| StoreError::Corrupt {
                    path: "registry-services".into(),
                    message: st.message().to_string(),
                })?;
        }
        (RegistryBackend::Local(store.clone()), Some(store))
    };
    let local_nses = Table::open(dir, "local-endpoints")?;
    let settings = Settings {
        name: opts.name.clone(),
        advertise_url: advertise_url.clone(),
        forwarder: opts.forwarder.clone(),
        max_token_lifetime: opts.max_token_lifetime,
        tls: tls.clone(),
        forwarder_mtls: opts.security.forwarder_mtls,
        policy: opts.config.authorization.clone(),
    };
    let manager = Arc::new(Manager::open(
        settings,
        dir,
        local_nses.clone(),
        registry.clone(),
        ipam_backend,
    )?);

    let pods = match &opts.cluster {
        Some(c) => Some(NodePods::open(
            manager.clone(),
            c.client.clone(),
            &opts.name,
            dir,
        )?),
        None => None,
    };

    let (stop, stop_rx) = watch::channel(false);
    // Requests and Closes are spans `nsm.manager/METHOD`, children of the
    // caller's (W3C traceparent in the metadata).
    let trace_layer = nsm_trace::ServerLayer::new("nsm.manager", &opts.name);
    let router = |local: bool| {
        let rewrite = local.then(|| (advertise_url.clone(), local_nses.clone()));
        let mut r = Server::builder()
            .layer(trace_layer.clone())
            .add_service(NetworkServiceServer::new(NsServer {
                manager: manager.clone(),
            }))
            .add_service(MonitorConnectionServer::new(MonitorServer {
                manager: manager.clone(),
            }))
            .add_service(NetworkServiceRegistryServer::new(NsRegistryServer::new(
                registry.clone(),
            )))
            .add_service(NetworkServiceEndpointRegistryServer::new(
                NseRegistryServer::new(registry.clone(), rewrite),
            ));
        if let Some(ipam) = ipam_local.as_ref().filter(|_| serve_ipam) {
            r = r.add_service(IpamGrpc::new(IpamServer::new(ipam.clone())));
        }
        if local {
            // Pod attachments come from the CNI plugin on this node only.
            r = r.add_service(nsm_proto::manager::v1::pods_server::PodsServer::new(
                PodsServer::new(pods.clone()),
            ));
        }
        r
    };
    let signal = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let unix_srv = router(true).serve_with_incoming_shutdown(unix, signal(stop_rx.clone()));
    let tcp_task = match &tls {
        // Only peers with a certificate of our trust domain get through the
        // handshake; their identity rides along into every request.
        Some(tls) => {
            let srv = router(false)
                .serve_with_incoming_shutdown(tls.incoming(tcp), signal(stop_rx.clone()));
            tokio::spawn(async move {
                if let Err(e) = srv.await {
                    tracing::error!(error = %e, "TCP (mTLS) listener failed");
                }
            })
        }
        None => {
            let srv = router(false)
                .serve_with_incoming_shutdown(peer_incoming(tcp), signal(stop_rx.clone()));
            tokio::spawn(async move {
                if let Err(e) = srv.await {
                    tracing::error!(error = %e, "TCP listener failed");
                }
            })
        }
    };
    let servers = vec![
        tokio::spawn(async move {
            if let Err(e) = unix_srv.await {
                tracing::error!(error = %e, "unix listener failed");
            }
        }),
        tcp_task,
    ];
    // Tick often enough to expire a connection within ~1/20 of its lifetime.
    let period =
        (opts.max_token_lifetime / 20).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let ticker = {
        let m = manager.clone();
        let reg = registry_store.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(period);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                iv.tick().await;
                m.tick().await;
                if let Some(r) = &reg {
                    r.purge_expired(SystemTime::now());
                }
            }
        })
    };
    let watcher = tokio::spawn(manager.clone().watch_forwarder());
    // One monitor per peer manager holding the far side of our connections;
    // the JoinSet aborts them all when this task is aborted at shutdown.
    let peers = {
        let m = manager.clone();
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            let mut watched = std::collections::HashSet::new();
            loop {
                for url in m.peers() {
                    if watched.insert(url.clone()) {
                        tasks.spawn(m.clone().monitor_peer(url));
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let mut background = vec![ticker, watcher, peers];
    if let Some(t) = &tls {
        background.push(t.source().spawn_reloader(opts.security.reload_period));
    }
    if let Some(k) = &kube_registry {
        background.extend(k.spawn_watches());
        let k = k.clone();
        background.push(tokio::spawn(async move {
            let mut iv = tokio::time::interval(period.max(Duration::from_millis(500)));
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                iv.tick().await;
                k.reap(SystemTime::now()).await;
            }
        }));
    }
    if let Some(p) = &pods {
        background.push(tokio::spawn(p.clone().run()));
    }
    if let Some(c) = &opts.cluster {
        // Chain policies as custom resources (nsm-rs.io ChainPolicy).
        let api = kube::Api::namespaced(c.client.clone(), &c.namespace);
        background.push(tokio::spawn(crate::policies::follow_cluster(
            manager.clone(),
            api,
        )));
        // Authorization rules as custom resources (ServiceAuthorization).
        let api = kube::Api::namespaced(c.client.clone(), &c.namespace);
        background.push(tokio::spawn(crate::authz::follow_cluster(
            manager.clone(),
            api,
        )));
    }
    let spiffe_id = tls.as_ref().map(|t| t.identity().id.clone());
    tracing::info!(name = %opts.name, spiffe_id = spiffe_id.as_deref().unwrap_or("(none: insecure)"), cluster = opts.cluster.as_ref().map(|c| c.namespace.as_str()), listen = %opts.listen.display(), peer = %peer_addr, advertise = %advertise_url,
        registry = opts.registry.as_deref().unwrap_or("(this manager)"), "nsm-manager serving");
    Ok(Handle {
        advertise_url,
        peer_addr,
        manager,
        registry: registry_store,
        ipam: ipam_local,
        pods,
        kube_registry,
        stop,
        servers,
        background,
    })
}

/// `networkservice.NetworkService` of a manager.
#[derive(Debug, Clone)]
struct NsServer {
    manager: Arc<Manager>,
}

#[tonic::async_trait]
impl NetworkService for NsServer {
    async fn request(
        &self,
        r: Request<NetworkServiceRequest>,
    ) -> Result<Response<Connection>, Status> {
        let managed = r
            .metadata()
            .get(MD_MANAGED)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let who = principal_of(&r);
        let peer = peer_of(&r).cloned();
        let req = r.into_inner();
        nsm_trace::record_request(&req);
        let conn = self
            .manager
            .request_from(req, managed, &who, peer.as_ref())
            .await?;
        nsm_trace::record_connection(&conn);
        Ok(Response::new(conn))
    }

    async fn close(&self, r: Request<Connection>) -> Result<Response<()>, Status> {
        let who = principal_of(&r);
        let conn = r.into_inner();
        nsm_trace::record_connection(&conn);
        self.manager.close_from(&conn, &who).await?;
        Ok(Response::new(()))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ConnectionEvent, Status>> + Send>>;

/// `connection.MonitorConnection` of a manager.
#[derive(Debug, Clone)]
struct MonitorServer {
    manager: Arc<Manager>,
}

#[tonic::async_trait]
impl MonitorConnection for MonitorServer {
    type MonitorConnectionsStream = EventStream;

    async fn monitor_connections(
        &self,
        r: Request<MonitorScopeSelector>,
    ) -> Result<Response<Self::MonitorConnectionsStream>, Status> {
        // Scoped to the caller: a peer or a local workload sees only the
        // connections it requested (see Manager::may_monitor).
        let who = crate::authz::principal_of(&r);
        let sel = r.into_inner();
        let (first, rx) = self.manager.monitor(&sel, &who);
        let tail =
            tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |ev| match ev {
                Ok(ev) if !Manager::may_monitor(&who, ev.requester.as_ref()) => None,
                Ok(ev) => {
                    let mut ev = ev.event;
                    ev.connections.retain(|_, c| Manager::in_scope(&sel, c));
                    (!ev.connections.is_empty()).then_some(Ok(ev))
                }
                Err(_) => Some(Err(Status::data_loss("monitor fell behind; monitor again"))),
            });
        Ok(Response::new(Box::pin(
            tokio_stream::once(Ok(first)).chain(tail),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn peer_connections_send_without_delay() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut incoming = peer_incoming(tcp);
        let (accepted, _client) =
            tokio::join!(incoming.next(), tokio::net::TcpStream::connect(addr));
        assert!(accepted.unwrap().unwrap().nodelay().unwrap());
    }
}
