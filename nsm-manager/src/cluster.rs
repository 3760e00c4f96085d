//! Cluster mode: the Kubernetes API as the registry.
//!
//! `NetworkService` and `NetworkServiceEndpoint` objects (NSM's custom
//! resources, `nsm_k8s::crd`) in one namespace are the registry of every
//! manager of the cluster. Writes go to the API server (Register =
//! server-side apply, Unregister = delete); reads are served from a cache
//! that a watch of each kind keeps in step ([`KubeRegistry::cache`], the
//! same [`RegistryStore`] the embedded mode uses, kept in memory only), so
//! that Find, Find with `watch`, and the endpoint selection of every
//! Request and refresh keep working from the last known state while the API
//! server is away. Established connections therefore never depend on the
//! API server being up.
//!
//! Endpoint registrations carry `expiration_time`. Every manager reaps the
//! expired ones ([`KubeRegistry::reap`]); the delete is conditional on the
//! resourceVersion the reaper saw, so a refresh that lands first (a new
//! resourceVersion) makes the delete fail with a conflict instead of
//! removing a live registration. A refresh that lands after a delete simply
//! creates the object again.
//!
//! Endpoint objects are owned by whoever registered them, as in the
//! embedded registry: the object carries its registrant in the annotation
//! [`OWNER_ANNOTATION`] (a peer's SPIFFE ID, or a local client's uid scoped
//! by the manager it registered through), and a Register or Unregister by
//! anyone else is PermissionDenied. A new object is created (POST, which
//! fails if the name is taken) and an existing one replaced (PUT) on the
//! condition of the resourceVersion whose owner was checked, so two
//! registrants racing for one name cannot both win.
//!
//! Durable connection state is not here: it stays in the manager's own store.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use nsm_k8s::crd;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::Status;

use crate::authz::Principal;
use crate::registry::RegistryStore;
use crate::util::{from_ts, to_ts};

/// The field manager of our server-side applies.
pub const FIELD_MANAGER: &str = "nsm-manager";
/// Annotation of an endpoint object naming its registrant.
pub const OWNER_ANNOTATION: &str = "nsm-rs.io/registered-by";
/// How long a Find waits for the first list of the API before it answers
/// from whatever the cache holds.
const SYNC_WAIT: Duration = Duration::from_secs(10);

/// How a manager reaches its cluster.
#[derive(Clone)]
pub struct ClusterOptions {
    /// An API client (from `--kubeconfig` or the in-cluster config).
    pub client: kube::Client,
    /// The namespace of the NSM objects (`--namespace`).
    pub namespace: String,
}

impl fmt::Debug for ClusterOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterOptions")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// Why the cluster cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The kubeconfig cannot be read or used.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// No in-cluster config (not in a pod?) or no client could be made.
    #[error("Kubernetes client: {0}")]
    Client(String),
}

/// A client from a kubeconfig file, or from the in-cluster config (service
/// account) when `kubeconfig` is `None`.
///
/// # Errors
/// [`ClusterError`].
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, ClusterError> {
    let config = match kubeconfig {
        Some(path) => {
            let bad = |message: String| ClusterError::Kubeconfig {
                path: path.display().to_string(),
                message,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| bad(e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| ClusterError::Client(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| ClusterError::Client(e.to_string()))
}

/// Retry delays of our watches: 0.5 s doubling up to 5 s, reset by the
/// first event after a success. kube's default goes up to 30 s, which
/// after an outage would leave the manager behind for that long.
#[derive(Debug, Default, Clone, Copy)]
pub struct Retry {
    attempt: u32,
}

impl Iterator for Retry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let ms = 500u64.saturating_mul(1 << self.attempt.min(4)).min(5_000);
        self.attempt = self.attempt.saturating_add(1);
        Some(Duration::from_millis(ms))
    }
}

impl kube::runtime::utils::Backoff for Retry {
    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Maps an API error to a gRPC status: the caller learns whether to retry.
pub fn api_status(what: &str, e: &kube::Error) -> Status {
    match e {
        kube::Error::Api(s) if s.is_not_found() => Status::not_found(format!("{what}: {s}")),
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => {
            Status::invalid_argument(format!("{what}: {s}"))
        }
        kube::Error::Api(s) if s.is_forbidden() => {
            Status::permission_denied(format!("{what}: {s}"))
        }
        kube::Error::Api(s) if s.is_conflict() => Status::aborted(format!("{what}: {s}")),
        e => Status::unavailable(format!("{what}: Kubernetes API: {e}")),
    }
}

/// The registry of a cluster.
pub struct KubeRegistry {
    services: Api<crd::NetworkService>,
    endpoints: Api<crd::NetworkServiceEndpoint>,
    cache: RegistryStore,
    /// Each endpoint object as last seen, for conditional writes.
    seen: Mutex<HashMap<String, Seen>>,
    /// What scopes a local client's identity cluster-wide: this manager.
    owner_scope: String,
    /// (services listed, endpoints listed) at least once.
    synced: watch::Sender<(bool, bool)>,
    nse_lifetime: Duration,
    /// When this manager last wrote each object (by kind and name), so
    /// that a re-list that began before the write does not drop it from
    /// the cache (see `follow`).
    local_writes: Mutex<HashMap<(&'static str, String), Instant>>,
}

impl fmt::Debug for KubeRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeRegistry")
            .field("cache", &self.cache)
            .field("nse_lifetime", &self.nse_lifetime)
            .finish_non_exhaustive()
    }
}

/// An endpoint object's resourceVersion and registrant, as last seen.
#[derive(Debug, Clone)]
struct Seen {
    version: String,
    owner: Option<String>,
}

/// The kinds as the watches and the write log name them.
const SERVICES: &str = "networkservices";
const ENDPOINTS: &str = "networkserviceendpoints";

fn registry_name<K: kube::ResourceExt>(obj: &K, spec_name: &str) -> String {
    if spec_name.is_empty() {
        obj.name_any()
    } else {
        spec_name.to_string()
    }
}

impl KubeRegistry {
    /// A registry over the objects in `opts.namespace`; call
    /// [`KubeRegistry::spawn_watches`] to fill its cache. Endpoints
    /// registered without `expiration_time` expire after `nse_lifetime`.
    /// `owner_scope` names this manager (its SPIFFE ID, or its node name):
    /// local clients' registrations are owned by `SCOPE#uid:N`.
    pub fn new(opts: &ClusterOptions, nse_lifetime: Duration, owner_scope: &str) -> Arc<Self> {
        Arc::new(KubeRegistry {
            services: Api::namespaced(opts.client.clone(), &opts.namespace),
            endpoints: Api::namespaced(opts.client.clone(), &opts.namespace),
            cache: RegistryStore::open(None, nse_lifetime)
                .expect("a memory-only store cannot fail to open"),
            seen: Mutex::default(),
            owner_scope: owner_scope.to_string(),
            synced: watch::channel((false, false)).0,
            nse_lifetime,
            local_writes: Mutex::default(),
        })
    }

    /// The cache of what the API server holds.
    pub fn cache(&self) -> &RegistryStore {
        &self.cache
    }

    /// Waits (a bounded time) until both kinds were listed once, so that a
    /// Find right after start does not answer "nothing".
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = tokio::time::timeout(SYNC_WAIT, rx.wait_for(|(a, b)| *a && *b)).await;
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The owner string of `who` in the cluster: a peer's SPIFFE ID is
    /// already cluster-wide; anything local is scoped by this manager.
    pub fn owner_key(&self, who: &Principal) -> String {
        match who {
            Principal::Peer { .. } => who.owner_key(),
            _ => format!("{}#{}", self.owner_scope, who.owner_key()),
        }
    }

    /// Refuses `owner` on an object registered by someone else (an object
    /// without the annotation, e.g. applied by kubectl, is adopted).
    fn check_owner(name: &str, seen: Option<&Seen>, owner: &str) -> Result<(), Status> {
        match seen.and_then(|s| s.owner.as_deref()) {
            Some(o) if o != owner => Err(Status::permission_denied(format!(
                "endpoint `{name}` is registered by another identity"
            ))),
            _ => Ok(()),
        }
    }

    /// The object `name` as the API server has it now (cached on the way).
    async fn fetch(&self, name: &str) -> Result<Option<Seen>, Status> {
        match self.endpoints.get_opt(name).await {
            Ok(Some(o)) => {
                self.cache_endpoint(&o);
                Ok(self.seen().get(name).cloned())
            }
            Ok(None) => {
                self.uncache_endpoint(name);
                Ok(None)
            }
            Err(e) => Err(api_status(&format!("endpoint {name}"), &e)),
        }
    }

    fn cache_service(&self, obj: &crd::NetworkService) -> String {
        let ns = obj.to_registry();
        let name = ns.name.clone();
        if let Err(e) = self.cache.put_ns(ns) {
            tracing::warn!(service = %name, error = %e, "registry cache");
        }
        name
    }

    fn cache_endpoint(&self, obj: &crd::NetworkServiceEndpoint) -> String {
        let nse = obj.to_registry();
        let name = registry_name(obj, &obj.spec.name);
        if let Some(version) = obj.metadata.resource_version.clone() {
            let owner = obj.annotations().get(OWNER_ANNOTATION).cloned();
            self.seen().insert(name.clone(), Seen { version, owner });
        }
        if let Err(e) = self.cache.put_nse(nse) {
            tracing::warn!(endpoint = %name, error = %e, "registry cache");
        }
        name
    }

    /// Notes that this manager just wrote `name` of `kind`.
    fn note_write(&self, kind: &'static str, name: &str) {
        self.local_writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((kind, name.to_string()), Instant::now());
    }

    /// The cached names of `kind` that this manager has not written at or
    /// after `t`.
    fn cached_unwritten_since(&self, kind: &'static str, t: Instant) -> Vec<String> {
        let (services, endpoints) = self.cache.names();
        let names = if kind == SERVICES {
            services
        } else {
            endpoints
        };
        let writes = self
            .local_writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        names
            .into_iter()
            .filter(|n| writes.get(&(kind, n.clone())).is_none_or(|w| *w < t))
            .collect()
    }

    fn uncache_service(&self, name: &str) {
        let _ = self.cache.unregister_ns(name);
    }

    fn uncache_endpoint(&self, name: &str) {
        self.seen().remove(name);
        let _ = self.cache.unregister_nse(name);
    }

    /// Starts one watch per kind; they run until the returned tasks are
    /// aborted, re-listing (with backoff) after every error or outage.
    pub fn spawn_watches(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let me = self.clone();
        let services = tokio::spawn(follow(
            me.services.clone(),
            SERVICES,
            |o: &crd::NetworkService| o.to_registry().name,
            {
                let me = me.clone();
                move |o: &crd::NetworkService| me.cache_service(o)
            },
            {
                let me = me.clone();
                move |name: &str| me.uncache_service(name)
            },
            {
                let me = me.clone();
                move |t: Instant| me.cached_unwritten_since(SERVICES, t)
            },
            {
                let me = me.clone();
                move || me.synced.send_modify(|s| s.0 = true)
            },
        ));
        let me = self.clone();
        let endpoints = tokio::spawn(follow(
            me.endpoints.clone(),
            ENDPOINTS,
            |o: &crd::NetworkServiceEndpoint| registry_name(o, &o.spec.name),
            {
                let me = me.clone();
                move |o: &crd::NetworkServiceEndpoint| me.cache_endpoint(o)
            },
            {
                let me = me.clone();
                move |name: &str| me.uncache_endpoint(name)
            },
            {
                let me = me.clone();
                move |t: Instant| me.cached_unwritten_since(ENDPOINTS, t)
            },
            {
                let me = me.clone();
                move || me.synced.send_modify(|s| s.1 = true)
            },
        ));
        vec![services, endpoints]
    }

    /// Register of a service: server-side apply of the whole spec.
    ///
    /// # Errors
    /// Empty name, or the API's refusal.
    pub async fn register_ns(&self, ns: NetworkService) -> Result<NetworkService, Status> {
        if ns.name.is_empty() {
            return Err(Status::invalid_argument("network service name is empty"));
        }
        let obj = crd::NetworkService::from_registry(&ns);
        let applied = self
            .services
            .patch(
                &ns.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&obj),
            )
            .await
            .map_err(|e| api_status(&format!("register service {}", ns.name), &e))?;
        // Read-your-writes: the watch will say the same a moment later.
        self.note_write(SERVICES, &ns.name);
        self.cache_service(&applied);
        Ok(ns)
    }

    /// Unregister of a service (unknown is fine).
    ///
    /// # Errors
    /// The API's refusal.
    pub async fn unregister_ns(&self, name: &str) -> Result<(), Status> {
        match self.services.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(api_status(&format!("unregister service {name}"), &e)),
        }
        self.uncache_service(name);
        Ok(())
    }

    /// Register (or refresh) of an endpoint, with the defaults of the
    /// embedded registry: first registration time kept, expiry filled in,
    /// unknown services created (IP payload).
    ///
    /// # Errors
    /// Empty name, or the API's refusal.
    /// PermissionDenied when someone else registered the name; Aborted when
    /// the object changed twice under us.
    pub async fn register_nse(
        &self,
        mut nse: NetworkServiceEndpoint,
        who: &Principal,
    ) -> Result<NetworkServiceEndpoint, Status> {
        if nse.name.is_empty() {
            return Err(Status::invalid_argument(
                "network service endpoint name is empty",
            ));
        }
        let now = SystemTime::now();
        let old = self
            .cache
            .find_nse(&NetworkServiceEndpoint {
                name: nse.name.clone(),
                ..Default::default()
            })
            .into_iter()
            .find(|e| e.name == nse.name);
        nse.initial_registration_time = old
            .and_then(|o| o.initial_registration_time)
            .or(nse.initial_registration_time)
            .or(Some(to_ts(now)));
        if nse.expiration_time.is_none() {
            nse.expiration_time = Some(to_ts(now + self.nse_lifetime));
        }
        for svc in &nse.network_service_names {
            let known = self
                .cache
                .find_ns(&NetworkService {
                    name: svc.clone(),
                    ..Default::default()
                })
                .iter()
                .any(|s| s.name == *svc);
            if !known
                && self
                    .services
                    .get_opt(svc)
                    .await
                    .map_err(|e| api_status(&format!("service {svc}"), &e))?
                    .is_none()
            {
                self.register_ns(NetworkService {
                    name: svc.clone(),
                    payload: nsm_proto::mechanisms::payload::IP.into(),
                    ..Default::default()
                })
                .await?;
            }
        }
        let owner = self.owner_key(who);
        let what = format!("register endpoint {}", nse.name);
        let mut seen = self.seen().get(&nse.name).cloned();
        // The cache may be stale: on a conflict, look again once.
        for retry in [true, false] {
            Self::check_owner(&nse.name, seen.as_ref(), &owner)?;
            let mut obj = crd::NetworkServiceEndpoint::from_registry(&nse);
            obj.annotations_mut()
                .insert(OWNER_ANNOTATION.to_string(), owner.clone());
            let written = match &seen {
                None => self.endpoints.create(&PostParams::default(), &obj).await,
                Some(s) => {
                    obj.metadata.resource_version = Some(s.version.clone());
                    self.endpoints
                        .replace(&nse.name, &PostParams::default(), &obj)
                        .await
                }
            };
            match written {
                Ok(o) => {
                    self.note_write(ENDPOINTS, &nse.name);
                    self.cache_endpoint(&o);
                    return Ok(nse);
                }
                Err(kube::Error::Api(s)) if retry && (s.is_conflict() || s.is_not_found()) => {
                    seen = self.fetch(&nse.name).await?;
                }
                Err(e) => return Err(api_status(&what, &e)),
            }
        }
        Err(Status::aborted(format!(
            "{what}: the object keeps changing; retry"
        )))
    }

    /// Unregister of an endpoint (unknown is fine), by its registrant only.
    ///
    /// # Errors
    /// PermissionDenied for someone else's registration; the API's refusal.
    pub async fn unregister_nse(&self, name: &str, who: &Principal) -> Result<(), Status> {
        let owner = self.owner_key(who);
        let what = format!("unregister endpoint {name}");
        let cached = self.seen().get(name).cloned();
        let mut seen = match cached {
            Some(s) => Some(s),
            None => self.fetch(name).await?,
        };
        for retry in [true, false] {
            let Some(s) = &seen else {
                self.uncache_endpoint(name);
                return Ok(());
            };
            Self::check_owner(name, Some(s), &owner)?;
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: Some(s.version.clone()),
                    uid: None,
                }),
                ..Default::default()
            };
            match self.endpoints.delete(name, &dp).await {
                Ok(_) => {
                    self.uncache_endpoint(name);
                    return Ok(());
                }
                Err(kube::Error::Api(e)) if e.is_not_found() => {
                    self.uncache_endpoint(name);
                    return Ok(());
                }
                Err(kube::Error::Api(e)) if retry && e.is_conflict() => {
                    seen = self.fetch(name).await?;
                }
                Err(e) => return Err(api_status(&what, &e)),
            }
        }
        Err(Status::aborted(format!(
            "{what}: the object keeps changing; retry"
        )))
    }

    /// Deletes endpoint objects whose registration expired unrefreshed. Safe
    /// with many reapers and concurrent refreshes: each delete is conditional
    /// on the resourceVersion whose expiry was seen.
    pub async fn reap(&self, now: SystemTime) {
        let expired: Vec<String> = self
            .cache
            .find_nse(&NetworkServiceEndpoint::default())
            .into_iter()
            .filter(|e| e.expiration_time.as_ref().is_some_and(|t| from_ts(t) < now))
            .map(|e| e.name)
            .collect();
        for name in expired {
            let Some(rv) = self.seen().get(&name).map(|s| s.version.clone()) else {
                continue;
            };
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: Some(rv),
                    uid: None,
                }),
                ..Default::default()
            };
            match self.endpoints.delete(&name, &dp).await {
                Ok(_) => {
                    tracing::info!(endpoint = %name, "registration expired; object deleted");
                    self.uncache_endpoint(&name);
                }
                // Someone else reaped it, or it was refreshed meanwhile: the
                // watch brings the truth either way.
                Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => {}
                Err(e) => {
                    tracing::debug!(endpoint = %name, error = %e, "cannot reap expired endpoint now");
                }
            }
        }
    }
}

/// Follows one kind: `name_of` is an object's registry name (which may
/// differ from the object's), `apply` caches an object and returns its registry
/// name, `remove` drops a name, `names` lists what is cached, `synced` is
/// called after each complete list. Objects gone while the watch was
/// broken are removed when the re-list completes.
async fn follow<K>(
    api: Api<K>,
    kind: &'static str,
    name_of: impl Fn(&K) -> String,
    apply: impl Fn(&K) -> String,
    remove: impl Fn(&str),
    // The cached names, less what this manager wrote since the instant.
    cached: impl Fn(Instant) -> Vec<String>,
    synced: impl Fn(),
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + 'static,
    K: kube::ResourceExt,
{
    let stream = watcher(api, watcher::Config::default()).backoff(Retry::default());
    let mut stream = std::pin::pin!(stream);
    let mut listed: Option<HashSet<String>> = None;
    let mut list_began = Instant::now();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => {
                listed = Some(HashSet::new());
                list_began = Instant::now();
            }
            Ok(watcher::Event::InitApply(o)) => {
                let name = apply(&o);
                if let Some(l) = listed.as_mut() {
                    l.insert(name);
                }
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(l) = listed.take() {
                    // What this manager wrote after the list began may be
                    // missing from it, not gone: the watch that follows
                    // brings it (or its deletion).
                    for gone in cached(list_began).into_iter().filter(|n| !l.contains(n)) {
                        remove(&gone);
                    }
                }
                tracing::debug!(kind, "listed");
                synced();
            }
            Ok(watcher::Event::Apply(o)) => {
                apply(&o);
            }
            Ok(watcher::Event::Delete(o)) => remove(&name_of(&o)),
            Err(e) => {
                tracing::warn!(kind, error = %e, "watch failed; serving the cached registry, retrying")
            }
        }
    }
}
