//! The NSM registries: `registry.NetworkServiceRegistry` and
//! `registry.NetworkServiceEndpointRegistry`.
//!
//! One manager of the lab (the one started without `--registry`) holds the
//! registry in its durable store ([`RegistryStore`]); every other manager
//! forwards registry calls to it ([`RegistryBackend::Remote`]). Endpoints
//! register through their local manager, which - as NSM's nsmgr does -
//! rewrites the endpoint's `url` to the manager's own advertise URL and
//! remembers the endpoint's real (local) URL, so that every other node
//! reaches the endpoint through its manager.
//!
//! Queries are templates (NSM `matchutils`): empty fields match anything,
//! names and `url` are substring matches, service names and labels must be
//! contained. `watch` streams later changes after the current matches.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nsm_proto::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use nsm_proto::registry::network_service_endpoint_registry_server::NetworkServiceEndpointRegistry;
use nsm_proto::registry::network_service_registry_client::NetworkServiceRegistryClient;
use nsm_proto::registry::network_service_registry_server::NetworkServiceRegistry;
use nsm_proto::registry::{
    NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery,
    NetworkServiceEndpointResponse, NetworkServiceQuery, NetworkServiceResponse,
};
use tokio::sync::broadcast;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::authz::{MD_ON_BEHALF, Principal, principal_of};
use crate::select::is_subset;
use crate::store::{Pb, StoreError, Table};
use crate::util::{from_ts, to_ts};

/// A boxed stream of gRPC results.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A Find answer: the current matches, then (when a watch receiver is given)
/// every later event that `keep` accepts. A watcher that fell behind the
/// broadcast gets DataLoss, so it finds again instead of missing changes.
fn snapshot_then_watch<R: Clone + Send + 'static>(
    now: Vec<R>,
    rx: Option<tokio::sync::broadcast::Receiver<R>>,
    keep: impl Fn(&R) -> bool + Send + 'static,
) -> BoxStream<R> {
    let head = tokio_stream::iter(now.into_iter().map(Ok));
    match rx {
        None => Box::pin(head),
        Some(rx) => {
            let tail =
                tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |ev| match ev {
                    Ok(ev) if keep(&ev) => Some(Ok(ev)),
                    Ok(_) => None,
                    Err(_) => Some(Err(Status::data_loss(
                        "registry watch fell behind; find again",
                    ))),
                });
            Box::pin(head.chain(tail))
        }
    }
}

fn store_status(e: StoreError) -> Status {
    Status::internal(format!("registry store: {e}"))
}

/// Does `ns` match the query template `q`?
pub fn ns_matches(q: &NetworkService, ns: &NetworkService) -> bool {
    (q.name.is_empty() || ns.name.contains(&q.name))
        && (q.payload.is_empty() || q.payload == ns.payload)
}

/// Does `nse` match the query template `q`?
pub fn nse_matches(q: &NetworkServiceEndpoint, nse: &NetworkServiceEndpoint) -> bool {
    (q.name.is_empty() || nse.name.contains(&q.name))
        && (q.url.is_empty() || nse.url.contains(&q.url))
        && q.network_service_names
            .iter()
            .all(|n| nse.network_service_names.contains(n))
        && q.network_service_labels.iter().all(|(svc, l)| {
            nse.network_service_labels
                .get(svc)
                .is_some_and(|have| is_subset(&l.labels, &have.labels))
        })
}

/// The registry itself, in the registry manager.
#[derive(Debug)]
pub struct RegistryStore {
    services: Arc<Table<Pb<NetworkService>>>,
    endpoints: Arc<Table<Pb<NetworkServiceEndpoint>>>,
    ns_events: broadcast::Sender<NetworkServiceResponse>,
    nse_events: broadcast::Sender<NetworkServiceEndpointResponse>,
    nse_lifetime: Duration,
    /// Endpoint name -> owner key ([`Principal::owner_key`]) of whoever
    /// registered it first: only they may update or remove it.
    owners: Arc<Table<String>>,
}

impl RegistryStore {
    /// Opens the registry tables in `dir` (memory only when `None`).
    /// Endpoints registered without `expiration_time` expire after `nse_lifetime`.
    ///
    /// # Errors
    /// A table cannot be read.
    pub fn open(dir: Option<&Path>, nse_lifetime: Duration) -> Result<RegistryStore, StoreError> {
        Ok(RegistryStore {
            services: Table::open(dir, "registry-services")?,
            endpoints: Table::open(dir, "registry-endpoints")?,
            ns_events: broadcast::channel(1024).0,
            nse_events: broadcast::channel(1024).0,
            nse_lifetime,
            owners: Table::open(dir, "registry-owners")?,
        })
    }

    /// Registers (or replaces) a network service.
    ///
    /// # Errors
    /// Empty name, or a store error.
    pub fn register_ns(&self, ns: NetworkService) -> Result<NetworkService, Status> {
        if ns.name.is_empty() {
            return Err(Status::invalid_argument("network service name is empty"));
        }
        self.services
            .put(&ns.name, Pb(ns.clone()))
            .map_err(store_status)?;
        let _ = self.ns_events.send(NetworkServiceResponse {
            network_service: Some(ns.clone()),
            deleted: false,
        });
        Ok(ns)
    }

    /// Removes a network service by name (no-op when unknown).
    ///
    /// # Errors
    /// A store error.
    pub fn unregister_ns(&self, name: &str) -> Result<(), Status> {
        if let Some(Pb(old)) = self.services.remove(name).map_err(store_status)? {
            let _ = self.ns_events.send(NetworkServiceResponse {
                network_service: Some(old),
                deleted: true,
            });
        }
        Ok(())
    }

    /// Services matching `q`.
    pub fn find_ns(&self, q: &NetworkService) -> Vec<NetworkService> {
        self.services
            .all()
            .into_iter()
            .map(|(_, Pb(ns))| ns)
            .filter(|ns| ns_matches(q, ns))
            .collect()
    }

    /// Registers (or refreshes) an endpoint. Its services are created when
    /// unknown (IP payload), as NSM endpoints expect.
    ///
    /// # Errors
    /// Empty name, or a store error.
    pub fn register_nse(
        &self,
        mut nse: NetworkServiceEndpoint,
    ) -> Result<NetworkServiceEndpoint, Status> {
        if nse.name.is_empty() {
            return Err(Status::invalid_argument(
                "network service endpoint name is empty",
            ));
        }
        let now = SystemTime::now();
        let old = self.endpoints.get(&nse.name);
        nse.initial_registration_time = old
            .and_then(|Pb(o)| o.initial_registration_time)
            .or(nse.initial_registration_time)
            .or(Some(to_ts(now)));
        if nse.expiration_time.is_none() {
            nse.expiration_time = Some(to_ts(now + self.nse_lifetime));
        }
        for svc in &nse.network_service_names {
            if self.services.get(svc).is_none() {
                self.register_ns(NetworkService {
                    name: svc.clone(),
                    payload: nsm_proto::mechanisms::payload::IP.into(),
                    ..Default::default()
                })?;
            }
        }
        self.endpoints
            .put(&nse.name, Pb(nse.clone()))
            .map_err(store_status)?;
        let _ = self.nse_events.send(NetworkServiceEndpointResponse {
            network_service_endpoint: Some(nse.clone()),
            deleted: false,
        });
        Ok(nse)
    }

    /// Refuses `who` when the endpoint `name` is registered and owned by
    /// someone else (an entry whose owner is unknown, e.g. from before
    /// owners were recorded, is adopted by the next registrant).
    fn check_owner(&self, name: &str, who: &Principal) -> Result<(), Status> {
        if matches!(who, Principal::Internal) || self.endpoints.get(name).is_none() {
            return Ok(());
        }
        match self.owners.get(name) {
            Some(o) if o != who.owner_key() => Err(Status::permission_denied(format!(
                "endpoint `{name}` is registered by another identity"
            ))),
            _ => Ok(()),
        }
    }

    /// [`RegistryStore::register_nse`] on behalf of `who`, who becomes the
    /// owner of a new entry and must be the owner of an existing one.
    ///
    /// # Errors
    /// PermissionDenied for another owner's entry; as `register_nse`.
    pub fn register_nse_as(
        &self,
        nse: NetworkServiceEndpoint,
        who: &Principal,
    ) -> Result<NetworkServiceEndpoint, Status> {
        self.check_owner(&nse.name, who)?;
        let name = nse.name.clone();
        let out = self.register_nse(nse)?;
        if !matches!(who, Principal::Internal) {
            self.owners
                .put(&name, who.owner_key())
                .map_err(store_status)?;
        }
        Ok(out)
    }

    /// [`RegistryStore::unregister_nse`] on behalf of `who` (the owner).
    ///
    /// # Errors
    /// PermissionDenied for another owner's entry; a store error.
    pub fn unregister_nse_as(&self, name: &str, who: &Principal) -> Result<(), Status> {
        self.check_owner(name, who)?;
        self.unregister_nse(name)
    }

    /// Removes an endpoint by name (no-op when unknown).
    ///
    /// # Errors
    /// A store error.
    pub fn unregister_nse(&self, name: &str) -> Result<(), Status> {
        let _ = self.owners.remove(name);
        if let Some(Pb(old)) = self.endpoints.remove(name).map_err(store_status)? {
            let _ = self.nse_events.send(NetworkServiceEndpointResponse {
                network_service_endpoint: Some(old),
                deleted: true,
            });
        }
        Ok(())
    }

    /// Endpoints matching `q`.
    pub fn find_nse(&self, q: &NetworkServiceEndpoint) -> Vec<NetworkServiceEndpoint> {
        self.endpoints
            .all()
            .into_iter()
            .map(|(_, Pb(e))| e)
            .filter(|e| nse_matches(q, e))
            .collect()
    }

    /// Find over this store: the current matches, then (with `watch`) later changes.
    pub fn find_ns_stream(&self, q: NetworkServiceQuery) -> BoxStream<NetworkServiceResponse> {
        let template = q.network_service.clone().unwrap_or_default();
        let rx = q.watch.then(|| self.ns_events.subscribe());
        let now = self
            .find_ns(&template)
            .into_iter()
            .map(|ns| NetworkServiceResponse {
                network_service: Some(ns),
                deleted: false,
            })
            .collect();
        snapshot_then_watch(now, rx, move |ev| {
            ev.network_service
                .as_ref()
                .is_some_and(|n| ns_matches(&template, n))
        })
    }

    /// Find over this store: the current matches, then (with `watch`) later changes.
    pub fn find_nse_stream(
        &self,
        q: NetworkServiceEndpointQuery,
    ) -> BoxStream<NetworkServiceEndpointResponse> {
        let template = q.network_service_endpoint.clone().unwrap_or_default();
        let rx = q.watch.then(|| self.nse_events.subscribe());
        let now = self
            .find_nse(&template)
            .into_iter()
            .map(|e| NetworkServiceEndpointResponse {
                network_service_endpoint: Some(e),
                deleted: false,
            })
            .collect();
        snapshot_then_watch(now, rx, move |ev| {
            ev.network_service_endpoint
                .as_ref()
                .is_some_and(|n| nse_matches(&template, n))
        })
    }

    /// Stores a service as given, quietly when unchanged (the cluster
    /// registry's cache sees every object again after each re-list).
    ///
    /// # Errors
    /// A store error.
    pub fn put_ns(&self, ns: NetworkService) -> Result<(), Status> {
        if self.services.get(&ns.name).is_some_and(|Pb(o)| o == ns) {
            return Ok(());
        }
        self.register_ns(ns).map(|_| ())
    }

    /// Stores an endpoint as given (no defaults, no service creation): the
    /// cluster registry's cache mirrors what the API server holds.
    ///
    /// # Errors
    /// A store error.
    pub fn put_nse(&self, nse: NetworkServiceEndpoint) -> Result<(), Status> {
        if self.endpoints.get(&nse.name).is_some_and(|Pb(o)| o == nse) {
            return Ok(());
        }
        self.endpoints
            .put(&nse.name, Pb(nse.clone()))
            .map_err(store_status)?;
        let _ = self.nse_events.send(NetworkServiceEndpointResponse {
            network_service_endpoint: Some(nse),
            deleted: false,
        });
        Ok(())
    }

    /// Names of every service and every endpoint held.
    pub fn names(&self) -> (Vec<String>, Vec<String>) {
        (
            self.services.all().into_iter().map(|(k, _)| k).collect(),
            self.endpoints.all().into_iter().map(|(k, _)| k).collect(),
        )
    }

    /// Unregisters endpoints whose registration expired (not refreshed).
    pub fn purge_expired(&self, now: SystemTime) {
        for (name, Pb(e)) in self.endpoints.all() {
            if e.expiration_time.as_ref().is_some_and(|t| from_ts(t) < now) {
                tracing::info!(endpoint = %name, "registration expired");
                if let Err(e) = self.unregister_nse(&name) {
                    tracing::warn!(endpoint = %name, error = %e, "cannot remove expired endpoint");
                }
            }
        }
    }
}

/// Where registry calls go: this manager's store, the registry manager, or
/// the Kubernetes API (cluster mode).
#[derive(Debug, Clone)]
pub enum RegistryBackend {
    /// This manager serves the registry.
    Local(Arc<RegistryStore>),
    /// The custom resources of a cluster are the registry.
    Kube(Arc<crate::cluster::KubeRegistry>),
    /// Forward to the registry manager.
    Remote(Channel),
}

/// A request to the registry manager carrying the local principal we
/// forward for (it scopes the claim under our own identity).
fn on_behalf<T>(msg: T, who: &Principal) -> Request<T> {
    let mut r = Request::new(msg);
    if let Principal::Local { .. } = who
        && let Ok(v) = who.owner_key().parse()
    {
        r.metadata_mut().insert(MD_ON_BEHALF, v);
    }
    r
}

fn collect_status(s: Status) -> Status {
    Status::new(s.code(), format!("registry: {}", s.message()))
}

impl RegistryBackend {
    /// Registers a network service.
    ///
    /// # Errors
    /// The registry's error.
    pub async fn register_ns(&self, ns: NetworkService) -> Result<NetworkService, Status> {
        match self {
            RegistryBackend::Local(s) => s.register_ns(ns),
            RegistryBackend::Kube(k) => k.register_ns(ns).await,
            RegistryBackend::Remote(ch) => Ok(NetworkServiceRegistryClient::new(ch.clone())
                .register(ns)
                .await
                .map_err(collect_status)?
                .into_inner()),
        }
    }

    /// Unregisters a network service.
    ///
    /// # Errors
    /// The registry's error.
    pub async fn unregister_ns(&self, ns: NetworkService) -> Result<(), Status> {
        match self {
            RegistryBackend::Local(s) => s.unregister_ns(&ns.name),
            RegistryBackend::Kube(k) => k.unregister_ns(&ns.name).await,
            RegistryBackend::Remote(ch) => {
                NetworkServiceRegistryClient::new(ch.clone())
                    .unregister(ns)
                    .await
                    .map_err(collect_status)?;
                Ok(())
            }
        }
    }

    /// Finds services; with `watch`, the stream goes on with later changes.
    ///
    /// # Errors
    /// The registry's error.
    pub async fn find_ns(
        &self,
        q: NetworkServiceQuery,
    ) -> Result<BoxStream<NetworkServiceResponse>, Status> {
        match self {
            RegistryBackend::Local(s) => Ok(s.find_ns_stream(q)),
            RegistryBackend::Kube(k) => {
                k.wait_synced().await;
                Ok(k.cache().find_ns_stream(q))
            }
            RegistryBackend::Remote(ch) => Ok(Box::pin(
                NetworkServiceRegistryClient::new(ch.clone())
                    .find(q)
                    .await
                    .map_err(collect_status)?
                    .into_inner(),
            )),
        }
    }

    /// Registers an endpoint (its `url` must already be the manager's).
    ///
    /// # Errors
    /// The registry's error.
    pub async fn register_nse(
        &self,
        nse: NetworkServiceEndpoint,
        who: &Principal,
    ) -> Result<NetworkServiceEndpoint, Status> {
        match self {
            RegistryBackend::Local(s) => s.register_nse_as(nse, who),
            RegistryBackend::Kube(k) => k.register_nse(nse, who).await,
            RegistryBackend::Remote(ch) => {
                Ok(NetworkServiceEndpointRegistryClient::new(ch.clone())
                    .register(on_behalf(nse, who))
                    .await
                    .map_err(collect_status)?
                    .into_inner())
            }
        }
    }

    /// Unregisters an endpoint.
    ///
    /// # Errors
    /// The registry's error.
    pub async fn unregister_nse(
        &self,
        nse: NetworkServiceEndpoint,
        who: &Principal,
    ) -> Result<(), Status> {
        match self {
            RegistryBackend::Local(s) => s.unregister_nse_as(&nse.name, who),
            RegistryBackend::Kube(k) => k.unregister_nse(&nse.name, who).await,
            RegistryBackend::Remote(ch) => {
                NetworkServiceEndpointRegistryClient::new(ch.clone())
                    .unregister(on_behalf(nse, who))
                    .await
                    .map_err(collect_status)?;
                Ok(())
            }
        }
    }

    /// Finds endpoints; with `watch`, the stream goes on with later changes.
    ///
    /// # Errors
    /// The registry's error.
    pub async fn find_nse(
        &self,
        q: NetworkServiceEndpointQuery,
    ) -> Result<BoxStream<NetworkServiceEndpointResponse>, Status> {
        match self {
            RegistryBackend::Local(s) => Ok(s.find_nse_stream(q)),
            RegistryBackend::Kube(k) => {
                k.wait_synced().await;
                Ok(k.cache().find_nse_stream(q))
            }
            RegistryBackend::Remote(ch) => Ok(Box::pin(
                NetworkServiceEndpointRegistryClient::new(ch.clone())
                    .find(q)
                    .await
                    .map_err(collect_status)?
                    .into_inner(),
            )),
        }
    }

    /// The service named exactly `name`, if registered.
    ///
    /// # Errors
    /// The registry's error.
    pub async fn get_service(&self, name: &str) -> Result<Option<NetworkService>, Status> {
        let mut s = self
            .find_ns(NetworkServiceQuery {
                network_service: Some(NetworkService {
                    name: name.to_string(),
                    ..Default::default()
                }),
                watch: false,
            })
            .await?;
        while let Some(r) = s.next().await {
            if let Some(ns) = r?.network_service
                && ns.name == name
            {
                return Ok(Some(ns));
            }
        }
        Ok(None)
    }

    /// Every endpoint offering `service`.
    ///
    /// # Errors
    /// The registry's error.
    pub async fn endpoints_of(&self, service: &str) -> Result<Vec<NetworkServiceEndpoint>, Status> {
        let mut s = self
            .find_nse(NetworkServiceEndpointQuery {
                network_service_endpoint: Some(NetworkServiceEndpoint {
                    network_service_names: vec![service.to_string()],
                    ..Default::default()
                }),
                watch: false,
            })
            .await?;
        let mut out = Vec::new();
        while let Some(r) = s.next().await {
            if let Some(e) = r?.network_service_endpoint {
                out.push(e);
            }
        }
        Ok(out)
    }
}

/// The `registry.NetworkServiceRegistry` gRPC service of a manager.
#[derive(Debug, Clone)]
pub struct NsRegistryServer {
    backend: RegistryBackend,
}

impl NsRegistryServer {
    /// Serves `backend`.
    pub fn new(backend: RegistryBackend) -> Self {
        NsRegistryServer { backend }
    }
}

#[tonic::async_trait]
impl NetworkServiceRegistry for NsRegistryServer {
    type FindStream = BoxStream<NetworkServiceResponse>;

    async fn register(
        &self,
        r: Request<NetworkService>,
    ) -> Result<Response<NetworkService>, Status> {
        Ok(Response::new(
            self.backend.register_ns(r.into_inner()).await?,
        ))
    }

    async fn find(
        &self,
        r: Request<NetworkServiceQuery>,
    ) -> Result<Response<Self::FindStream>, Status> {
        Ok(Response::new(self.backend.find_ns(r.into_inner()).await?))
    }

    async fn unregister(&self, r: Request<NetworkService>) -> Result<Response<()>, Status> {
        self.backend.unregister_ns(r.into_inner()).await?;
        Ok(Response::new(()))
    }
}

/// Endpoints registered through this manager: name -> the endpoint's own URL.
pub type LocalEndpoints = Arc<Table<String>>;

/// The `registry.NetworkServiceEndpointRegistry` gRPC service of a manager.
#[derive(Debug, Clone)]
pub struct NseRegistryServer {
    backend: RegistryBackend,
    /// For the local listener: (advertise URL, local endpoint table). Calls
    /// from peers (TCP) already carry a manager URL and are passed through.
    rewrite: Option<(String, LocalEndpoints)>,
}

impl NseRegistryServer {
    /// Serves `backend`; `rewrite` as on the struct.
    pub fn new(backend: RegistryBackend, rewrite: Option<(String, LocalEndpoints)>) -> Self {
        NseRegistryServer { backend, rewrite }
    }
}

#[tonic::async_trait]
impl NetworkServiceEndpointRegistry for NseRegistryServer {
    type FindStream = BoxStream<NetworkServiceEndpointResponse>;

    async fn register(
        &self,
        r: Request<NetworkServiceEndpoint>,
    ) -> Result<Response<NetworkServiceEndpoint>, Status> {
        let who = principal_of(&r);
        let mut nse = r.into_inner();
        let Some((advertise, local)) = &self.rewrite else {
            return Ok(Response::new(self.backend.register_nse(nse, &who).await?));
        };
        let own_url = nse.url.clone();
        if !own_url.is_empty() && own_url != *advertise {
            crate::util::channel(&own_url)
                .map_err(|e| Status::invalid_argument(format!("endpoint `{}`: {e}", nse.name)))?;
            local
                .put(&nse.name, own_url.clone())
                .map_err(|e| Status::internal(format!("local endpoint table: {e}")))?;
            nse.url = advertise.clone();
        }
        let mut out = self.backend.register_nse(nse, &who).await?;
        // The endpoint gets its own URL back, as NSM's nsmgr does.
        if !own_url.is_empty() {
            out.url = own_url;
        }
        Ok(Response::new(out))
    }

    async fn find(
        &self,
        r: Request<NetworkServiceEndpointQuery>,
    ) -> Result<Response<Self::FindStream>, Status> {
        Ok(Response::new(self.backend.find_nse(r.into_inner()).await?))
    }

    async fn unregister(&self, r: Request<NetworkServiceEndpoint>) -> Result<Response<()>, Status> {
        let who = principal_of(&r);
        let mut nse = r.into_inner();
        // Ownership first: a refused Unregister must not forget the local URL.
        self.backend.unregister_nse(nse.clone(), &who).await?;
        if let Some((_, local)) = &self.rewrite {
            let _ = local.remove(&nse.name);
        }
        if let Some((advertise, _)) = &self.rewrite {
            nse.url = advertise.clone();
        }
        Ok(Response::new(()))
    }
}

/// Labels of a map, for building queries.
pub fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_proto::registry::NetworkServiceLabels;

    fn nse(name: &str, url: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: vec!["s".into()],
            network_service_labels: [(
                "s".to_string(),
                NetworkServiceLabels {
                    labels: labels(&[("app", "echo"), ("v", "1")]),
                },
            )]
            .into(),
            url: url.into(),
            ..Default::default()
        }
    }

    #[test]
    fn query_templates() {
        let e = nse("echo-1", "tcp://192.0.2.2:5001");
        assert!(nse_matches(&NetworkServiceEndpoint::default(), &e));
        assert!(nse_matches(
            &NetworkServiceEndpoint {
                name: "echo".into(),
                ..Default::default()
            },
            &e
        ));
        assert!(nse_matches(
            &NetworkServiceEndpoint {
                url: "192.0.2.2".into(),
                ..Default::default()
            },
            &e
        ));
        let mut q = nse("", "");
        assert!(nse_matches(&q, &e));
        q.network_service_labels
            .get_mut("s")
            .unwrap()
            .labels
            .insert("v".into(), "2".into());
        assert!(!nse_matches(&q, &e));
        assert!(!nse_matches(
            &NetworkServiceEndpoint {
                network_service_names: vec!["t".into()],
                ..Default::default()
            },
            &e
        ));
    }

    #[tokio::test]
    async fn watch_sees_later_changes_and_expiry() {
        let store = Arc::new(RegistryStore::open(None, Duration::from_secs(60)).unwrap());
        let b = RegistryBackend::Local(store.clone());
        b.register_nse(nse("a", "tcp://x"), &Principal::Internal)
            .await
            .unwrap();
        assert!(
            b.get_service("s").await.unwrap().is_some(),
            "service auto-created"
        );
        let mut w = b
            .find_nse(NetworkServiceEndpointQuery {
                network_service_endpoint: None,
                watch: true,
            })
            .await
            .unwrap();
        assert_eq!(
            w.next()
                .await
                .unwrap()
                .unwrap()
                .network_service_endpoint
                .unwrap()
                .name,
            "a"
        );
        b.register_nse(nse("b", "tcp://y"), &Principal::Internal)
            .await
            .unwrap();
        assert_eq!(
            w.next()
                .await
                .unwrap()
                .unwrap()
                .network_service_endpoint
                .unwrap()
                .name,
            "b"
        );
        store.purge_expired(SystemTime::now() + Duration::from_secs(120));
        let ev = w.next().await.unwrap().unwrap();
        assert!(ev.deleted);
        assert!(b.endpoints_of("s").await.unwrap().len() <= 1);
    }
}
