//! Cluster mode: the pods of this node and their `networkservicemesh.io`
//! annotations.
//!
//! The CNI plugin runs when the runtime sets up a pod's network namespace;
//! it knows the namespace (CNI_NETNS) and the pod's name (CNI_ARGS) but, with
//! most runtimes, not its annotations. It calls [`PodsServer`] (`Attach`),
//! which binds that attachment to the pod durably (table `pod-bindings`,
//! so a manager restart forgets nothing), reads the annotation from the API
//! server and makes the connections it asks for: managed (this manager
//! refreshes them until Close) and named `cni/NETWORK/CONTAINER/CNI_IFNAME/IFNAME`
//! exactly as the plugin names its own, so CNI DEL, CHECK and GC keep
//! working on them.
//!
//! From then on the pod's annotation is the desired state: a watch of the
//! pods with `spec.nodeName` = this node keeps a cache of their
//! annotations, and every change (and a periodic pass) converges each
//! binding: connections no longer asked for are closed, new ones are made.
//! A pod that is gone (confirmed with a GET, so a pod the watch has not
//! shown yet is never mistaken for a deleted one) loses its connections and
//! its binding.
//!
//! When the API server is away the cache keeps its last state, nothing is
//! torn down, and the watch re-lists and the pass converges when it returns.
//! An annotation that no longer parses is reported and leaves the pod's
//! interfaces as they are: a typo must not cut a running pod off.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use nsm_proto::annotation::{self, ConnectionRequest};
use nsm_proto::connection::Connection;
use nsm_proto::manager::v1::pods_server::Pods;
use nsm_proto::manager::v1::{AttachRequest, AttachResponse, Attachment, DetachRequest};
use nsm_proto::mechanisms::kernel;
use nsm_proto::networkservice::NetworkServiceRequest;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::authz::Principal;
use crate::cluster::api_status;
use crate::manager::{Manager, Role};
use crate::store::{StoreError, Table};

/// How often every binding is converged even without a pod event (retries
/// of failed requests, catch-up after an outage).
const RESYNC: Duration = Duration::from_secs(5);

/// One attachment of a pod, as the CNI plugin described it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID when attached: a pod re-created under the same name is
    /// another pod.
    pub uid: String,
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS.
    pub netns: PathBuf,
    /// CNI network name.
    pub network: String,
    /// CNI_IFNAME.
    pub cni_ifname: String,
    /// The plugin config's requests, made before the annotation's.
    pub extra_requests: Vec<String>,
}

impl Binding {
    /// The prefix of every connection id of this attachment (the table key).
    pub fn prefix(&self) -> String {
        attachment_prefix(&self.network, &self.container_id, &self.cni_ifname)
    }

    fn pod_key(&self) -> String {
        format!("{}/{}", self.namespace, self.pod)
    }
}

/// `cni/NETWORK/CONTAINER/CNI_IFNAME/`, as the CNI plugin names connections.
pub fn attachment_prefix(network: &str, container: &str, cni_ifname: &str) -> String {
    format!("cni/{network}/{container}/{cni_ifname}/")
}

/// One connection an attachment should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Connection id.
    pub id: String,
    /// Interface name in the pod.
    pub ifname: String,
    /// What to ask for.
    pub request: ConnectionRequest,
    /// From the pod's annotation (the pod's own request, authorized as its
    /// service account), not from the plugin config (the operator's).
    pub from_pod: bool,
}

/// Why the requests of an attachment cannot be worked out.
#[derive(Debug, thiserror::Error)]
pub enum WantedError {
    /// A request does not parse.
    #[error("{0}")]
    Parse(String),
    /// An interface name is used twice (or is CNI_IFNAME).
    #[error("interface name {ifname} is requested twice (CNI_IFNAME is {cni_ifname})")]
    Conflict {
        /// The name.
        ifname: String,
        /// The primary interface.
        cni_ifname: String,
    },
}

impl From<WantedError> for Status {
    fn from(e: WantedError) -> Status {
        match e {
            WantedError::Parse(_) => Status::invalid_argument(e.to_string()),
            WantedError::Conflict { .. } => Status::already_exists(e.to_string()),
        }
    }
}

/// The connections of `b` given the pod's annotation value: the extra
/// requests then the annotation's, unnamed interfaces numbered `nsm-N` by
/// position (the CNI plugin's rule).
///
/// # Errors
/// [`WantedError`].
pub fn wanted(b: &Binding, annotation_value: Option<&str>) -> Result<Vec<Wanted>, WantedError> {
    let mut requests = Vec::new();
    for (i, url) in b.extra_requests.iter().enumerate() {
        let parsed = annotation::parse(url)
            .map_err(|e| WantedError::Parse(format!("connections[{i}]: {e}")))?;
        requests.extend(parsed.into_iter().map(|r| (r, false)));
    }
    if let Some(v) = annotation_value {
        let parsed = annotation::parse(v)
            .map_err(|e| WantedError::Parse(format!("pod annotation {}: {e}", annotation::KEY)))?;
        requests.extend(parsed.into_iter().map(|r| (r, true)));
    }
    let prefix = b.prefix();
    let mut out: Vec<Wanted> = Vec::new();
    for (i, (request, from_pod)) in requests.into_iter().enumerate() {
        let ifname = request
            .interface
            .clone()
            .unwrap_or_else(|| format!("nsm-{}", i + 1));
        if ifname == b.cni_ifname || out.iter().any(|w| w.ifname == ifname) {
            return Err(WantedError::Conflict {
                ifname,
                cni_ifname: b.cni_ifname.clone(),
            });
        }
        out.push(Wanted {
            id: format!("{prefix}{ifname}"),
            ifname,
            request,
            from_pod,
        });
    }
    Ok(out)
}

/// What the watch knows of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodView {
    uid: String,
    annotation: Option<String>,
    /// `spec.serviceAccountName`: who its annotation's requests are
    /// authorized as (`default` when unset, as Kubernetes fills it in).
    service_account: String,
}

fn view(p: &Pod) -> PodView {
    PodView {
        uid: p.metadata.uid.clone().unwrap_or_default(),
        service_account: p
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        annotation: p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotation::KEY).cloned()),
    }
}

fn key_of(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The pods of one node.
pub struct NodePods {
    manager: Arc<Manager>,
    client: kube::Client,
    node: String,
    bindings: Arc<Table<Binding>>,
    /// namespace/name -> what the watch last said; `None` until listed once.
    cache: Mutex<Option<HashMap<String, PodView>>>,
    /// One lock per pod: Attach, Detach and convergence of a pod never interleave.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for NodePods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePods")
            .field("node", &self.node)
            .field("bindings", &self.bindings)
            .finish_non_exhaustive()
    }
}

impl NodePods {
    /// Opens the bindings table in `dir` (memory only when `None`).
    ///
    /// # Errors
    /// The table cannot be read.
    pub fn open(
        manager: Arc<Manager>,
        client: kube::Client,
        node: &str,
        dir: Option<&std::path::Path>,
    ) -> Result<Arc<NodePods>, StoreError> {
        Ok(Arc::new(NodePods {
            manager,
            client,
            node: node.to_string(),
            bindings: Table::open(dir, "pod-bindings")?,
            cache: Mutex::new(None),
            locks: Mutex::default(),
        }))
    }

    /// Every binding, for inspection.
    pub fn bindings(&self) -> Vec<Binding> {
        self.bindings.all().into_iter().map(|(_, b)| b).collect()
    }

    fn lock_for(&self, pod_key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(pod_key.to_string())
            .or_default()
            .clone()
    }

    fn cached(&self, pod_key: &str) -> Option<Option<PodView>> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.get(pod_key).cloned())
    }

    async fn get_pod(&self, namespace: &str, name: &str) -> Result<Option<PodView>, Status> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name)
            .await
            .map(|p| p.as_ref().map(view))
            .map_err(|e| api_status(&format!("pod {namespace}/{name}"), &e))
    }

    /// The connections of an attachment (client side), by connection id.
    fn current(&self, prefix: &str) -> HashMap<String, Connection> {
        self.manager
            .records()
            .into_iter()
            .filter(|r| r.role == Role::Client && r.conn.0.id.starts_with(prefix))
            .map(|r| (r.conn.0.id.clone(), r.conn.0))
            .collect()
    }

    /// Makes the attachment's connections match `wanted`: closes the others
    /// (and those whose service or labels changed, and the pod's own that
    /// the authorization policy no longer allows), requests the missing.
    /// Returns the connections of `wanted`, in order.
    ///
    /// The pod's annotation requests are authorized as `sa` (its service
    /// account, [`Principal::Pod`]) before anything is requested: a pod
    /// gets no more through its annotation than the policy gives it. The
    /// plugin config's requests are the operator's and are not checked.
    async fn converge(
        &self,
        b: &Binding,
        wanted: &[Wanted],
        sa: &str,
    ) -> Result<Vec<Connection>, Status> {
        let who = Principal::Pod {
            namespace: b.namespace.clone(),
            service_account: sa.to_string(),
        };
        let authorized = |w: &Wanted| {
            if !w.from_pod {
                return Ok(());
            }
            let labels = w.request.labels.clone().into_iter().collect();
            self.manager.authorize(&who, &w.request.service, &labels)
        };
        let mut have = self.current(&b.prefix());
        let same = |c: &Connection, w: &Wanted| {
            c.network_service == w.request.service
                && c.labels.len() == w.request.labels.len()
                && w.request
                    .labels
                    .iter()
                    .all(|(k, v)| c.labels.get(k) == Some(v))
        };
        for (id, c) in &have {
            let keep = wanted.iter().find(|w| w.id == *id && same(c, w));
            if let Some(w) = keep
                && let Err(e) = authorized(w)
            {
                tracing::warn!(id = %id, pod = %b.pod_key(), error = %e, "no longer authorized; closing");
                self.manager
                    .close(c)
                    .await
                    .map_err(|e| Status::internal(format!("close {id}: {e}")))?;
            } else if keep.is_none() {
                tracing::info!(id = %id, pod = %b.pod_key(), "no longer asked for; closing");
                self.manager
                    .close(c)
                    .await
                    .map_err(|e| Status::internal(format!("close {id}: {e}")))?;
            }
        }
        have.retain(|id, c| {
            wanted
                .iter()
                .any(|w| w.id == *id && same(c, w) && authorized(w).is_ok())
        });
        let mut out = Vec::with_capacity(wanted.len());
        for w in wanted {
            if let Some(c) = have.remove(&w.id) {
                out.push(c);
                continue;
            }
            authorized(w)?;
            let req = NetworkServiceRequest {
                connection: Some(Connection {
                    id: w.id.clone(),
                    network_service: w.request.service.clone(),
                    labels: w.request.labels.clone().into_iter().collect(),
                    ..Default::default()
                }),
                mechanism_preferences: vec![kernel::local(&w.ifname, &b.netns)],
            };
            tracing::info!(id = %w.id, pod = %b.pod_key(), service = %w.request.service, "attaching");
            out.push(self.manager.request(req, true).await?);
        }
        Ok(out)
    }

    async fn close_all(&self, prefix: &str) -> Result<(), Status> {
        for (id, c) in self.current(prefix) {
            self.manager
                .close(&c)
                .await
                .map_err(|e| Status::internal(format!("close {id}: {e}")))?;
        }
        Ok(())
    }

    /// Attach (see the proto): binds, then converges.
    ///
    /// # Errors
    /// As the proto says.
    pub async fn attach(&self, r: AttachRequest) -> Result<Vec<Attachment>, Status> {
        for (field, v) in [
            ("namespace", &r.namespace),
            ("pod", &r.pod),
            ("container_id", &r.container_id),
            ("netns", &r.netns),
            ("network", &r.network),
            ("cni_ifname", &r.cni_ifname),
        ] {
            if v.is_empty() {
                return Err(Status::invalid_argument(format!("{field} is empty")));
            }
        }
        let pod = self
            .get_pod(&r.namespace, &r.pod)
            .await?
            .ok_or_else(|| Status::not_found(format!("pod {}/{} not found", r.namespace, r.pod)))?;
        let b = Binding {
            namespace: r.namespace,
            pod: r.pod,
            uid: pod.uid.clone(),
            container_id: r.container_id,
            netns: PathBuf::from(r.netns),
            network: r.network,
            cni_ifname: r.cni_ifname,
            extra_requests: r.extra_requests,
        };
        let wanted = wanted(&b, pod.annotation.as_deref())?;
        let lock = self.lock_for(&b.pod_key());
        let _g = lock.lock().await;
        self.bindings
            .put(&b.prefix(), b.clone())
            .map_err(|e| Status::internal(format!("pod bindings: {e}")))?;
        match self.converge(&b, &wanted, &pod.service_account).await {
            Ok(conns) => Ok(wanted
                .iter()
                .zip(conns)
                .map(|(w, c)| Attachment {
                    ifname: w.ifname.clone(),
                    connection: Some(c),
                })
                .collect()),
            Err(e) => {
                // Nothing of a failed attachment stays behind (CNI ADD failed).
                let _ = self.close_all(&b.prefix()).await;
                let _ = self.bindings.remove(&b.prefix());
                Err(e)
            }
        }
    }

    /// Detach (see the proto).
    ///
    /// # Errors
    /// A connection or the table cannot be updated.
    pub async fn detach(&self, r: DetachRequest) -> Result<(), Status> {
        let prefix = attachment_prefix(&r.network, &r.container_id, &r.cni_ifname);
        let pod_key = self.bindings.get(&prefix).map(|b| b.pod_key());
        let lock = pod_key.as_deref().map(|k| self.lock_for(k));
        let _g = match &lock {
            Some(l) => Some(l.lock().await),
            None => None,
        };
        // The binding goes first so a concurrent pass cannot re-make what we close.
        self.bindings
            .remove(&prefix)
            .map_err(|e| Status::internal(format!("pod bindings: {e}")))?;
        self.close_all(&prefix).await
    }

    /// Converges every binding of one pod with what the cache says of it.
    pub async fn reconcile_pod(&self, pod_key: &str) {
        let lock = self.lock_for(pod_key);
        let _g = lock.lock().await;
        let bindings: Vec<Binding> = self
            .bindings()
            .into_iter()
            .filter(|b| b.pod_key() == pod_key)
            .collect();
        if bindings.is_empty() {
            return;
        }
        let Some(cached) = self.cached(pod_key) else {
            return; // Not listed yet: nothing to compare with.
        };
        let b0 = &bindings[0];
        let current = match cached {
            Some(v) => Some(v),
            // Not in the cache: gone, or too new for the watch. Ask.
            None => match self.get_pod(&b0.namespace, &b0.pod).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::debug!(pod = %pod_key, error = %e, "cannot confirm the pod; keeping it");
                    return;
                }
            },
        };
        for b in bindings {
            match &current {
                Some(v) if v.uid == b.uid => match wanted(&b, v.annotation.as_deref()) {
                    Ok(w) => {
                        if let Err(e) = self.converge(&b, &w, &v.service_account).await {
                            tracing::warn!(pod = %pod_key, error = %e, "cannot converge; retrying later");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(pod = %pod_key, error = %e, "bad annotation; interfaces left as they are");
                    }
                },
                _ => {
                    tracing::info!(pod = %pod_key, attachment = %b.prefix(), "pod gone; detaching");
                    if self.bindings.remove(&b.prefix()).is_ok()
                        && let Err(e) = self.close_all(&b.prefix()).await
                    {
                        tracing::warn!(pod = %pod_key, error = %e, "cannot close connections of a gone pod");
                    }
                }
            }
        }
    }

    async fn reconcile_all(self: &Arc<Self>) {
        let mut pods: Vec<String> = self.bindings().iter().map(Binding::pod_key).collect();
        pods.sort();
        pods.dedup();
        for p in pods {
            self.reconcile_pod(&p).await;
        }
    }

    /// Watches this node's pods and converges bindings on every change and
    /// every [`RESYNC`]; runs until aborted.
    pub async fn run(self: Arc<Self>) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let stream = watcher(api, cfg).backoff(crate::cluster::Retry::default());
        let mut stream = std::pin::pin!(stream);
        let mut listing: Option<HashMap<String, PodView>> = None;
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let ev = tokio::select! {
                ev = stream.next() => match ev {
                    Some(ev) => ev,
                    None => return,
                },
                _ = resync.tick() => {
                    self.reconcile_all().await;
                    continue;
                }
            };
            let changed: Option<String> = match ev {
                Ok(watcher::Event::Init) => {
                    listing = Some(HashMap::new());
                    None
                }
                Ok(watcher::Event::InitApply(p)) => {
                    if let Some(l) = listing.as_mut() {
                        l.insert(key_of(&p), view(&p));
                    }
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    let fresh = listing.take().unwrap_or_default();
                    *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Some(fresh);
                    tracing::info!(node = %self.node, "pods listed; converging");
                    let me = self.clone();
                    tokio::spawn(async move { me.reconcile_all().await });
                    None
                }
                Ok(watcher::Event::Apply(p)) => {
                    let (k, v) = (key_of(&p), view(&p));
                    let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                    let old = c.get_or_insert_default().insert(k.clone(), v.clone());
                    (old != Some(v)).then_some(k)
                }
                Ok(watcher::Event::Delete(p)) => {
                    let k = key_of(&p);
                    if let Some(c) = self
                        .cache
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_mut()
                    {
                        c.remove(&k);
                    }
                    Some(k)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pod watch failed; keeping pods as they are, retrying");
                    None
                }
            };
            if let Some(k) = changed {
                let me = self.clone();
                tokio::spawn(async move { me.reconcile_pod(&k).await });
            }
        }
    }
}

/// The `nsm.manager.v1.Pods` gRPC service (unix socket only).
#[derive(Debug, Clone)]
pub struct PodsServer {
    pods: Option<Arc<NodePods>>,
}

impl PodsServer {
    /// Serves `pods`; `None` (not in cluster mode) answers UNIMPLEMENTED.
    pub fn new(pods: Option<Arc<NodePods>>) -> Self {
        PodsServer { pods }
    }

    fn pods(&self) -> Result<&Arc<NodePods>, Status> {
        self.pods.as_ref().ok_or_else(|| {
            Status::unimplemented(
                "this nsm-manager is not in cluster mode (no --kubeconfig/--kubernetes): it cannot read pod annotations",
            )
        })
    }
}

#[tonic::async_trait]
impl Pods for PodsServer {
    async fn attach(&self, r: Request<AttachRequest>) -> Result<Response<AttachResponse>, Status> {
        let attachments = self.pods()?.attach(r.into_inner()).await?;
        Ok(Response::new(AttachResponse { attachments }))
    }

    async fn detach(&self, r: Request<DetachRequest>) -> Result<Response<()>, Status> {
        self.pods()?.detach(r.into_inner()).await?;
        Ok(Response::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(extra: &[&str]) -> Binding {
        Binding {
            namespace: "default".into(),
            pod: "web".into(),
            uid: "u1".into(),
            container_id: "c1".into(),
            netns: "/run/netns/web".into(),
            network: "mesh".into(),
            cni_ifname: "eth0".into(),
            extra_requests: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn wanted_numbers_and_names_like_the_plugin() {
        let w = wanted(
            &binding(&["kernel://a/nsm-1"]),
            Some("kernel://b?app=web,kernel://c/blue"),
        )
        .unwrap();
        let ids: Vec<&str> = w.iter().map(|w| w.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "cni/mesh/c1/eth0/nsm-1",
                "cni/mesh/c1/eth0/nsm-2",
                "cni/mesh/c1/eth0/blue"
            ]
        );
        assert_eq!(w[1].request.labels["app"], "web");
        assert!(wanted(&binding(&[]), None).unwrap().is_empty());
    }

    #[test]
    fn wanted_errors() {
        assert!(matches!(
            wanted(&binding(&[]), Some("kernel://a/eth0")),
            Err(WantedError::Conflict { .. })
        ));
        assert!(matches!(
            wanted(&binding(&[]), Some("kernel:///x")),
            Err(WantedError::Parse(_))
        ));
        assert_eq!(
            Status::from(wanted(&binding(&[]), Some("kernel://a/x,kernel://b/x")).unwrap_err())
                .code(),
            tonic::Code::AlreadyExists
        );
    }
}
