//! The connection engine of one node: Request/Close/expiry/refresh, the
//! connection table, and the forwarder programming flow.
//!
//! Roles of a connection at this manager:
//! - **client side** (a KERNEL request from a local client): path segment,
//!   service lookup, endpoint selection, IPAM (this manager owns the lease),
//!   then either one kernel<->kernel cross-connect with a local endpoint, or
//!   a kernel->wireguard cross-connect and the Request forwarded to the
//!   endpoint's manager with a WIREGUARD preference carrying `src_*`;
//! - **endpoint side** (a WIREGUARD request from a peer manager): the
//!   addresses come with the request; a wireguard->kernel cross-connect
//!   towards the local endpoint, `dst_*` filled in the reply.
//!
//! The endpoint is asked (its own `Request`) before its side is programmed
//! because it reports its network namespace in the reply (`inodeURL`), as
//! NSM endpoints do. A new connection that fails midway is undone step by
//! step; a failed refresh leaves the established connection alone until it
//! expires, as NSM does.
//!
//! # Service chains
//! The policies ([`nsm_policy`]) compile a connection into segments. The
//! manager of a client-side connection puts its segment's built-in
//! functions into the cross-connect's chain, and steers the connection to
//! the segment's endpoint function (an endpoint of another service) when
//! there is one, else to the requested service. A function endpoint
//! requests the same service onward through its own manager (NSM's
//! composition); that manager knows which segment the onward request is
//! because the path carries the segment of the hop it dispatched to the
//! function (a record, or a pending dispatch, with `function` set); it
//! plans with that hop's labels (the original client's), whatever labels
//! the function requests with. Peers tell each other where a forwarded hop
//! stands in `extra_context[nsm-rs.io/chain]` ([`ChainHop`], trusted only
//! from peer managers). Only the first segment allocates
//! addresses; later ones carry the client's, and function endpoints'
//! interfaces get none: they forward, they do not answer.
//!
//! This module never touches a network namespace: it only tells the
//! forwarder what to do.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use nsm_policy::PolicySet;
use nsm_proto::connection::{
    Connection, ConnectionEvent, ConnectionEventType, Mechanism, MonitorScopeSelector, Path,
    PathSegment, State,
};
use nsm_proto::connectioncontext::{ConnectionContext, IpContext, Route as CtxRoute};
use nsm_proto::forwarder::v1::side::Kind;
use nsm_proto::forwarder::v1::{
    Chain, CrossConnect, CrossConnectStatus, KernelInterface, Payload as FwdPayload,
    Route as FwdRoute, Side, WireguardTunnel,
};
use nsm_proto::mechanisms::{self, cls, kernel, wireguard};
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
use nsm_proto::registry::NetworkServiceEndpoint;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tonic::Status;

use crate::authz::Principal;
use crate::forwarder::{Forwarder, ForwarderError};
use crate::ipam::{IpamBackend, IpamError};
use crate::netns::{self, NetnsError, NetnsRef};
use crate::registry::{LocalEndpoints, RegistryBackend};
use crate::select::{self, SelectError};
use crate::store::{Pb, StoreError, Table};
use crate::tls::PeerInfo;
use crate::token;
use crate::util::{Channels, to_ts};

/// Token placeholder in our path segments in insecure mode (no identity
/// configured); with an identity each segment carries an ES256 JWT
/// (see [`crate::token`]).
pub const TOKEN_PLACEHOLDER: &str = "nsm-rs-unsigned";

/// The chain segment of a connection that continues after an endpoint
/// that registry matches (not a policy) chose and that requested onward:
/// beyond any plan, so no policy's functions apply to it twice.
pub const AFTER_PASSTHROUGH: u32 = u32::MAX;

/// Longest path a Request may carry, in segments (hops).
pub const MAX_PATH_SEGMENTS: usize = 32;

/// `extra_context` key with which a manager tells a peer where a forwarded
/// request stands in its chain: a [`ChainHop`] as JSON (see the module
/// docs). Trusted only from peer managers; dropped and rewritten on
/// requests from local clients.
pub const CHAIN_KEY: &str = "nsm-rs.io/chain";

/// Where a connection stands in its chain plan, as decided by the manager
/// that planned it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChainHop {
    /// The segment (0: the client's connection).
    pub segment: u32,
    /// The endpoint function's service it goes to; `None`: the requested
    /// service's endpoints.
    pub target: Option<String>,
    /// The labels the plan was made with: the original client's, which
    /// later segments keep even when a function requests onward with its
    /// own labels (as NSM passthroughs may).
    pub labels: BTreeMap<String, String>,
}

/// Why a Request failed; every variant names what and why.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The service is not in the registry.
    #[error("network service `{0}` is not registered")]
    UnknownService(String),
    /// Selection found no endpoint.
    #[error(transparent)]
    Select(#[from] SelectError),
    /// The request itself is unusable.
    #[error("bad request for network service `{service}`: {what}")]
    BadRequest {
        /// The service asked for.
        service: String,
        /// What is wrong.
        what: String,
    },
    /// Addresses could not be had.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// The client's or endpoint's namespace reference is unusable.
    #[error("network namespace: {0}")]
    Netns(#[from] NetnsError),
    /// The local forwarder failed.
    #[error(transparent)]
    Forwarder(#[from] ForwarderError),
    /// The endpoint (local NSE) refused or failed.
    #[error("endpoint `{name}` at {url}: {}", status.message())]
    Endpoint {
        /// Endpoint name.
        name: String,
        /// Its local URL.
        url: String,
        /// Its answer.
        status: Status,
    },
    /// The endpoint's manager refused or failed.
    #[error("peer manager {url} (endpoint `{name}`): {}", status.message())]
    Peer {
        /// Endpoint name.
        name: String,
        /// Peer manager URL.
        url: String,
        /// Its answer.
        status: Status,
    },
    /// The registry could not be asked.
    #[error("registry: {}", .0.message())]
    Registry(Status),
    /// The connection table could not be written.
    #[error("connection table: {0}")]
    Store(#[from] StoreError),
    /// A path token failed verification, or the policy does not allow the
    /// caller this service: nothing was set up.
    #[error("permission denied for network service `{service}`: {why}")]
    Denied {
        /// The service asked for.
        service: String,
        /// Why (never secret: token contents are not echoed).
        why: String,
    },
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Status {
        let msg = e.to_string();
        match e {
            RequestError::UnknownService(_) => Status::not_found(msg),
            RequestError::Select(SelectError::NoEndpoints(_)) => Status::not_found(msg),
            RequestError::Select(SelectError::NoMatch { .. }) => Status::failed_precondition(msg),
            RequestError::BadRequest { .. } | RequestError::Netns(_) => {
                Status::invalid_argument(msg)
            }
            RequestError::Ipam(i) => {
                let s: Status = i.into();
                Status::new(s.code(), msg)
            }
            RequestError::Forwarder(f) => {
                let s: Status = f.into();
                Status::new(s.code(), msg)
            }
            RequestError::Endpoint { status, .. } | RequestError::Peer { status, .. } => {
                Status::new(status.code(), msg)
            }
            RequestError::Registry(s) => Status::new(s.code(), msg),
            RequestError::Store(_) => Status::internal(msg),
            RequestError::Denied { .. } => Status::permission_denied(msg),
        }
    }
}

/// Static settings of a manager.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Node name: our path segments' name.
    pub name: String,
    /// How peers reach us (`tcp://IP:PORT`); registered as our endpoints' url.
    pub advertise_url: String,
    /// The forwarder's unix socket.
    pub forwarder: PathBuf,
    /// Lifetime of our path segments (and so of unrefreshed connections).
    pub max_token_lifetime: Duration,
    /// mTLS and token signing; `None` = insecure mode (no identity: plain
    /// TCP to peers, unsigned path segments).
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// Reach the forwarder over mTLS with `tls` (see
    /// [`crate::forwarder::Forwarder::with_tls`]).
    pub forwarder_mtls: bool,
    /// Who may request what; `None` = everyone may request everything.
    pub policy: Option<crate::authz::Policy>,
}

/// Where this connection's client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A local client asked (KERNEL); this manager owns the lease.
    Client,
    /// A peer manager asked (WIREGUARD); the endpoint is local.
    Endpoint,
}

/// One connection as this manager keeps it (durably).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Our connection id (our path segment's id): the key of the table, the
    /// cross-connect id and the lease key.
    pub id: String,
    /// The connection as returned to the previous hop.
    pub conn: Pb<Connection>,
    /// The mechanism preferences it was requested with (for self-refresh).
    pub preferences: Vec<Pb<Mechanism>>,
    /// Which side we are.
    pub role: Role,
    /// Selected endpoint.
    pub endpoint_name: String,
    /// The next hop: the endpoint's local URL, or the peer manager's URL.
    pub next_url: String,
    /// Whether the next hop is a peer manager.
    pub remote: bool,
    /// The connection as the next hop returned it (what Close sends there).
    pub downstream: Pb<Connection>,
    /// What the forwarder was last told.
    pub xconnect: Pb<CrossConnect>,
    /// Service of the lease this manager owns (keyed by the connection id).
    pub lease: Option<String>,
    /// Refreshed by the manager itself (`nsm-managed: true`).
    pub managed: bool,
    /// Expiry of our segment, ms since the epoch.
    pub expires_ms: u64,
    /// Last (re)request, ms since the epoch (drives self-refresh).
    pub refreshed_ms: u64,
    /// Who asked for it ([`Principal::owner_key`]): only they may refresh
    /// or close it. `None` for the manager's own connections (pods) and
    /// records from before this field.
    #[serde(default)]
    pub requester: Option<String>,
    /// Which segment of its chain plan this connection is (0: the client's).
    #[serde(default)]
    pub segment: u32,
    /// The endpoint function's service this connection goes to, `None`
    /// when it goes to the requested service's endpoints.
    #[serde(default)]
    pub function: Option<String>,
    /// The labels its chain was planned with (the original client's).
    #[serde(default)]
    pub plan_labels: BTreeMap<String, String>,
    /// Its local endpoint requested onward (a passthrough): the endpoint's
    /// interface carries no addresses.
    #[serde(default)]
    pub passthrough: bool,
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

fn dur_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The engine.
#[derive(Debug)]
pub struct Manager {
    settings: Settings,
    conns: Arc<Table<Record>>,
    local_nses: LocalEndpoints,
    registry: RegistryBackend,
    ipam: IpamBackend,
    forwarder: Forwarder,
    channels: Channels,
    events: broadcast::Sender<Event>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Round-robin position per service (one counter per service, so that
    /// the several selections of a chained request spread each service's
    /// endpoints evenly).
    rr: Mutex<HashMap<String, usize>>,
    /// The chain policies in force.
    policies: RwLock<Arc<PolicySet>>,
    /// The policies of each source (the `--policies` file, the cluster's
    /// ChainPolicy objects); their union is what is in force.
    policy_sources: Mutex<BTreeMap<&'static str, Vec<nsm_policy::Policy>>>,
    /// Authorization rules from the cluster's ServiceAuthorization objects
    /// (empty: none), in addition to the config's policy.
    cluster_rules: RwLock<Arc<Vec<crate::authz::Rule>>>,
    /// Dispatches to a function endpoint in flight: our segment id ->
    /// chain segment (the record is stored only once the endpoint replied,
    /// and its onward request arrives before that).
    pending_hops: Mutex<HashMap<String, Dispatch>>,
    /// Last heal attempt per connection id (ms), to pace retries.
    heal_attempts: Mutex<HashMap<String, u64>>,
}

/// A connection event as the manager broadcasts it: NSM's event, and who
/// requested the connection (so that monitors see only what they may).
#[derive(Debug, Clone)]
pub struct Event {
    /// The event, one connection.
    pub event: ConnectionEvent,
    /// [`Record::requester`] of the connection.
    pub requester: Option<String>,
}

/// Applies NSM's `updatepath` to `path` for hop `name`: returns the path
/// with `index` at our segment (reused on refresh, appended when new) and
/// the index of the previous hop's segment (to restore in the reply).
pub fn update_path(path: Option<Path>, name: &str, conn_id: &str) -> (Path, u32) {
    let mut path = path.unwrap_or_default();
    if path.path_segments.is_empty() {
        let id = if conn_id.is_empty() {
            crate::util::uuid()
        } else {
            conn_id.to_string()
        };
        path.path_segments.push(PathSegment {
            name: name.to_string(),
            id,
            ..Default::default()
        });
        path.index = 0;
        return (path, 0);
    }
    let prev = path
        .index
        .min(u32::try_from(path.path_segments.len() - 1).unwrap_or(0));
    let i = prev as usize;
    if path.path_segments[i].name == name {
        path.index = prev;
        return (path, prev);
    }
    let next = i + 1;
    if next < path.path_segments.len() && path.path_segments[next].name == name {
        path.index = prev + 1;
        return (path, prev);
    }
    path.path_segments.truncate(next);
    path.path_segments.push(PathSegment {
        name: name.to_string(),
        id: crate::util::uuid(),
        ..Default::default()
    });
    path.index = prev + 1;
    (path, prev)
}

fn mech(typ: &str, class: &str, params: HashMap<String, String>) -> Mechanism {
    Mechanism {
        cls: class.to_string(),
        r#type: typ.to_string(),
        parameters: params,
    }
}

fn kernel_side(
    netns: &str,
    name: &str,
    payload: &str,
    addrs: &[String],
    routes: &[CtxRoute],
    mtu: u32,
) -> Side {
    Side {
        kind: Some(Kind::Kernel(KernelInterface {
            netns_path: netns.to_string(),
            name: name.to_string(),
            payload: if payload == mechanisms::payload::ETHERNET {
                FwdPayload::Ethernet as i32
            } else {
                FwdPayload::Ip as i32
            },
            addresses: addrs.to_vec(),
            routes: routes
                .iter()
                .map(|r| FwdRoute {
                    prefix: r.prefix.clone(),
                    next_hop: r.next_hop.clone(),
                })
                .collect(),
            mtu,
            ..Default::default()
        })),
    }
}

fn wg_side(ip: &str, port: u32, key: &str, lane_ports: &[u32]) -> Side {
    Side {
        kind: Some(Kind::Wireguard(WireguardTunnel {
            peer_ip: ip.to_string(),
            peer_port: port,
            peer_public_key: key.to_string(),
            persistent_keepalive_secs: 0,
            peer_lane_ports: lane_ports.to_vec(),
        })),
    }
}

/// Sets (or, for one lane, removes) the lane-ports parameter `key` from a
/// forwarder status: absent means one lane, so a single-lane connection
/// looks to NSM peers exactly as before lanes existed.
fn set_lane_param(params: &mut HashMap<String, String>, key: &str, st: &CrossConnectStatus) {
    if st.lanes.len() > 1 {
        let ports: Vec<u32> = st.lanes.iter().map(|l| l.wireguard_port).collect();
        params.insert(key.into(), wireguard::format_lane_ports(&ports));
    } else {
        params.remove(key);
    }
}

/// The peer's lane ports a mechanism's parameters name under `key`, for a
/// peer whose lane 0 is `port` (empty: one lane; see
/// [`wireguard::parse_lane_ports`]).
fn lane_param(params: &HashMap<String, String>, key: &str, port: u32) -> Vec<u32> {
    params
        .get(key)
        .map(|v| wireguard::parse_lane_ports(v, port))
        .unwrap_or_default()
}

/// The lanes of a WireGuard side's peer (at least one).
fn peer_lanes(side: Option<&Side>) -> usize {
    match side.and_then(|s| s.kind.as_ref()) {
        Some(Kind::Wireguard(w)) => w.peer_lane_ports.len().max(1),
        _ => 1,
    }
}

/// Interface name for the endpoint side: unique per connection at this node,
/// within the kernel's 15 bytes.
fn nse_ifname(id: &str) -> String {
    let s: String = id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(10)
        .collect();
    format!("nsm-{s}")
}

fn netns_of(m: &Mechanism) -> Result<String, NetnsError> {
    let r = if let Some(url) = m
        .parameters
        .get(kernel::INODE_URL)
        .filter(|u| !u.is_empty())
    {
        netns::parse_url(url)?
    } else if let Some(ino) = m
        .parameters
        .get(kernel::NETNS_INODE)
        .and_then(|i| i.parse().ok())
    {
        NetnsRef::Inode { dev: 0, ino }
    } else {
        return Err(NetnsError::BadUrl(String::new()));
    };
    Ok(netns::resolve(&r)?.display().to_string())
}

/// A connection's labels, ordered (the policies' view of them).
fn labels_of(conn: &Connection) -> BTreeMap<String, String> {
    conn.labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The cross-connect's chain: absent when it has no functions.
/// A dispatch of ours to a local endpoint, as an onward request from that
/// endpoint finds it on its path.
#[derive(Debug, Clone, Default)]
struct Dispatch {
    /// The chain segment of the dispatched connection.
    segment: u32,
    /// The labels its chain was planned with.
    labels: BTreeMap<String, String>,
    /// Whether it went to a policy's endpoint function.
    function: bool,
    /// Set when the endpoint requested onward (it is a passthrough) while
    /// the dispatch was in flight.
    continued: bool,
}

fn chain_of(chain: &Chain) -> Option<Chain> {
    (!chain.functions.is_empty()).then(|| chain.clone())
}

fn ip_context(conn: &Connection) -> IpContext {
    conn.context
        .as_ref()
        .and_then(|c| c.ip_context.clone())
        .unwrap_or_default()
}

impl Manager {
    /// Opens the connection table and builds the engine.
    ///
    /// # Errors
    /// The table cannot be read.
    pub fn open(
        settings: Settings,
        state_dir: Option<&std::path::Path>,
        local_nses: LocalEndpoints,
        registry: RegistryBackend,
        ipam: IpamBackend,
    ) -> Result<Manager, StoreError> {
        Ok(Manager {
            forwarder: match (&settings.tls, settings.forwarder_mtls) {
                (Some(tls), true) => Forwarder::with_tls(&settings.forwarder, tls),
                _ => Forwarder::new(&settings.forwarder),
            },
            channels: Channels::new(settings.tls.clone()),
            settings,
            conns: Table::open(state_dir, "connections")?,
            local_nses,
            registry,
            ipam,
            events: broadcast::channel(1024).0,
            locks: Mutex::new(HashMap::new()),
            rr: Mutex::new(HashMap::new()),
            policies: RwLock::new(Arc::default()),
            policy_sources: Mutex::new(BTreeMap::new()),
            cluster_rules: RwLock::new(Arc::default()),
            pending_hops: Mutex::new(HashMap::new()),
            heal_attempts: Mutex::new(HashMap::new()),
        })
    }

    /// Settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// All connections held, as their records.
    pub fn records(&self) -> Vec<Record> {
        self.conns.all().into_iter().map(|(_, r)| r).collect()
    }

    /// Replaces the rules of the cluster's ServiceAuthorization objects.
    /// Authorization is enforced when the config has a policy or this list
    /// is not empty; a request then needs a rule of either to allow it.
    pub fn set_cluster_authorization(&self, rules: Vec<crate::authz::Rule>) {
        *self
            .cluster_rules
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
    }

    /// The rules of the cluster's ServiceAuthorization objects in force.
    pub fn cluster_authorization(&self) -> Arc<Vec<crate::authz::Rule>> {
        self.cluster_rules
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The chain policies in force.
    pub fn policies(&self) -> Arc<PolicySet> {
        self.policies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `set` in force and brings every connection of ours in line
    /// with it: a changed built-in chain is pushed to the forwarder in
    /// place (the flow keeps running); a connection whose endpoint function
    /// changed is re-requested, which re-routes it.
    pub async fn set_policies(&self, set: PolicySet) {
        *self.policies.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        let set = self.policies();
        for (id, rec) in self.conns.all() {
            if rec.role != Role::Client {
                continue;
            }
            let labels = if rec.plan_labels.is_empty() {
                labels_of(&rec.conn.0)
            } else {
                rec.plan_labels.clone()
            };
            let plan = set.plan(&rec.conn.0.network_service, &labels);
            let seg = plan
                .segment(rec.segment as usize)
                .cloned()
                .unwrap_or_default();
            if seg.function != rec.function {
                tracing::info!(id = %id, from = ?rec.function, to = ?seg.function, "policies changed the connection's route; re-requesting");
                if let Err(e) = self.refresh(&rec).await {
                    tracing::warn!(id = %id, error = %e, "re-routing after a policy change failed");
                }
            } else if let Err(e) = self.push_chain(&id, chain_of(&seg.chain)).await {
                tracing::warn!(id = %id, error = %e, "pushing the new chain failed; the old one stays");
            }
        }
    }

    /// Replaces the policies of one `source` and puts the union of all
    /// sources in force ([`Manager::set_policies`]).
    ///
    /// # Errors
    /// The union does not check out (a bad policy, a name used by two
    /// sources, a loop across them): nothing changes.
    pub async fn set_policy_source(
        &self,
        source: &'static str,
        policies: Vec<nsm_policy::Policy>,
    ) -> Result<(), nsm_policy::PolicyError> {
        let set = {
            let mut sources = self
                .policy_sources
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let mut next = sources.clone();
            next.insert(source, policies);
            let set = PolicySet::new(next.values().flatten().cloned().collect())?;
            *sources = next;
            set
        };
        self.set_policies(set).await;
        Ok(())
    }

    /// Replaces a connection's built-in chain (nothing else) if it differs.
    async fn push_chain(&self, id: &str, chain: Option<Chain>) -> Result<(), RequestError> {
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let Some(mut rec) = self.conns.get(id) else {
            return Ok(());
        };
        if rec.xconnect.0.chain == chain {
            return Ok(());
        }
        let mut xc = rec.xconnect.0.clone();
        xc.chain = chain;
        let st = self.forwarder.program(xc.clone()).await?;
        tracing::info!(id = %id, functions = xc.chain.as_ref().map_or(0, |c| c.functions.len()), "chain updated");
        let peer = peer_lanes(xc.destination.as_ref());
        rec.xconnect = Pb(xc);
        self.conns.put(id, rec.clone())?;
        if st.lanes.len().max(1) < peer {
            // A chain keeps one lane: the peer must stop using the others,
            // which only a new request through it tells it. The chain is
            // in either way; a managed connection that cannot be
            // re-requested is DOWN and retried, another one is brought in
            // line by its client's next refresh.
            tracing::info!(id = %id, lanes = st.lanes.len(), "fewer lanes with a chain; re-requesting");
            drop(_g);
            if let Err(e) = self.refresh(&rec).await {
                if rec.managed {
                    self.mark_down(id, &rec, &e).await;
                } else {
                    tracing::warn!(id = %id, error = %e, "re-requesting with fewer lanes failed; the peer keeps its lanes until the client's next refresh");
                }
            }
        }
        Ok(())
    }

    /// Our dispatch to a local endpoint that is now requesting onward (its
    /// hop is on the path before ours): that endpoint is a passthrough
    /// (a policy's endpoint function, or an endpoint that registry matches
    /// chose, as in NSM's composition). A dispatch in flight is marked
    /// `continued`, so that its endpoint's interface gets no addresses.
    fn dispatched_hop(&self, conn: &Connection) -> Option<Dispatch> {
        let path = conn.path.as_ref()?;
        let idx = (path.index as usize).min(path.path_segments.len());
        path.path_segments[..idx]
            .iter()
            .rev()
            .filter(|seg| !seg.id.is_empty())
            .find_map(|seg| {
                let pending = self
                    .pending_hops
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&seg.id)
                    .map(|d| {
                        d.continued = true;
                        d.clone()
                    });
                pending.or_else(|| {
                    self.conns
                        .get(&seg.id)
                        .filter(|r| !r.remote)
                        .map(|r| Dispatch {
                            segment: r.segment,
                            labels: r.plan_labels,
                            function: r.function.is_some(),
                            continued: true,
                        })
                })
            })
    }

    /// Asks the local endpoint, with the dispatch visible to its onward
    /// request meanwhile; returns whether it requested onward.
    async fn dispatch(
        &self,
        nse_name: &str,
        url: &str,
        out: &Connection,
        d: Dispatch,
    ) -> (Result<(Connection, String), RequestError>, bool) {
        self.pending_hops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(out.id.clone(), d);
        let asked = self.ask_endpoint(nse_name, url, out).await;
        let continued = self
            .pending_hops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&out.id)
            .is_some_and(|d| d.continued);
        (asked, continued)
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(id.to_string()).or_default().clone()
    }

    fn emit(&self, t: ConnectionEventType, conn: &Connection, requester: Option<&String>) {
        let _ = self.events.send(Event {
            event: ConnectionEvent {
                r#type: t as i32,
                connections: [(conn.id.clone(), conn.clone())].into(),
            },
            requester: requester.cloned(),
        });
    }

    /// A Request from a client or a peer (told apart by the mechanism:
    /// peers ask for WIREGUARD). `managed` = `nsm-managed: true`.
    ///
    /// # Errors
    /// [`RequestError`], with nothing left behind for a new connection.
    pub async fn request(
        &self,
        req: NetworkServiceRequest,
        managed: bool,
    ) -> Result<Connection, RequestError> {
        let started = std::time::Instant::now();
        let r = self
            .request_inner(req, managed, false, None)
            .await
            .map(Option::unwrap_or_default);
        crate::metrics::global().request_done(started.elapsed(), r.as_ref().err());
        r
    }

    /// [`Manager::request`] from a caller the transport identified (`peer`:
    /// its mTLS identity, when it came over TCP with TLS). The path tokens
    /// before our segment are verified and the policy consulted before
    /// anything is allocated or programmed.
    ///
    /// # Errors
    /// [`RequestError::Denied`], or as [`Manager::request`].
    pub async fn request_from(
        &self,
        req: NetworkServiceRequest,
        managed: bool,
        who: &Principal,
        peer: Option<&PeerInfo>,
    ) -> Result<Connection, RequestError> {
        let started = std::time::Instant::now();
        let r = self
            .request_inner(req, managed, false, Some((who, peer)))
            .await
            .map(Option::unwrap_or_default);
        crate::metrics::global().request_done(started.elapsed(), r.as_ref().err());
        r
    }

    /// Checks the caller's right to this request: the signed path (with an
    /// identity configured) and the authorization policy.
    fn admit(
        &self,
        conn: &Connection,
        path: &Path,
        prev: u32,
        who: &Principal,
        peer: Option<&PeerInfo>,
    ) -> Result<(), RequestError> {
        let denied = |why: String| RequestError::Denied {
            service: conn.network_service.clone(),
            why,
        };
        if let Some(tls) = &self.settings.tls {
            let id = tls.identity();
            let caller = match peer {
                Some(p) => token::Caller::Peer {
                    id: &p.spiffe_id,
                    cert: &p.cert,
                },
                None => token::Caller::Local,
            };
            token::verify_path(
                path,
                prev as usize,
                path.index as usize,
                caller,
                &id.id,
                &id.roots,
                SystemTime::now(),
            )
            .map_err(|e| denied(e.to_string()))?;
        }
        self.authorize(who, &conn.network_service, &conn.labels)
    }

    /// Whether the authorization policy in force (the config's and the
    /// cluster's rules) lets `who` request `service` with `labels`.
    ///
    /// # Errors
    /// [`RequestError::Denied`] naming the caller.
    pub fn authorize(
        &self,
        who: &Principal,
        service: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), RequestError> {
        let cluster = self
            .cluster_rules
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let enforced = self.settings.policy.is_some() || !cluster.is_empty();
        if enforced
            && !self
                .settings
                .policy
                .as_ref()
                .is_some_and(|p| p.allows(who, service, labels))
            && !crate::authz::Policy::rules_allow(&cluster, who, service, labels)
        {
            return Err(RequestError::Denied {
                service: service.to_string(),
                why: format!(
                    "the authorization policy does not allow {}",
                    who.owner_key()
                ),
            });
        }
        Ok(())
    }

    /// Puts a token for `aud` into our segment of `conn` (the one at
    /// `path.index`), expiring with the segment; a no-op without identity.
    fn sign_segment(&self, conn: &mut Connection, aud: &str) -> Result<(), RequestError> {
        let Some(tls) = &self.settings.tls else {
            return Ok(());
        };
        let id = tls.identity();
        let Some(p) = conn.path.as_mut() else {
            return Ok(());
        };
        let i = p.index as usize;
        if let Some(seg) = p.path_segments.get_mut(i) {
            let exp = seg
                .expires
                .as_ref()
                .map_or(id.not_after, crate::util::from_ts);
            seg.token = token::sign(&id, aud, &seg.id, SystemTime::now(), exp).map_err(|_| {
                RequestError::Denied {
                    service: conn.network_service.clone(),
                    why: "cannot sign our path segment (RNG failure)".into(),
                }
            })?;
        }
        Ok(())
    }

    /// The SPIFFE ID of the peer manager at `url` (our token's audience).
    async fn peer_audience(&self, url: &str, nse: &str) -> Result<String, RequestError> {
        let Some(tls) = &self.settings.tls else {
            return Ok(String::new());
        };
        let addr = url.strip_prefix("tcp://").unwrap_or(url);
        tls.peer_id(addr).await.map_err(|e| RequestError::Peer {
            name: nse.to_string(),
            url: url.to_string(),
            status: Status::unavailable(format!("mTLS: {e}")),
        })
    }

    /// [`Manager::request`]; with `only_refresh`, a connection closed in the
    /// meantime is left closed (returns `None`) instead of being re-created.
    async fn request_inner(
        &self,
        req: NetworkServiceRequest,
        managed: bool,
        only_refresh: bool,
        caller: Option<(&Principal, Option<&PeerInfo>)>,
    ) -> Result<Option<Connection>, RequestError> {
        let mut conn = req.connection.clone().unwrap_or_default();
        let service = conn.network_service.clone();
        let bad = |what: &str| RequestError::BadRequest {
            service: service.clone(),
            what: what.to_string(),
        };
        if service.is_empty() {
            return Err(bad("network_service is empty"));
        }
        let (path, prev_index) = update_path(conn.path.take(), &self.settings.name, &conn.id);
        if path.path_segments.len() > MAX_PATH_SEGMENTS {
            // Composition (policies' endpoint functions or registry
            // matches) that routes a connection back into itself would
            // otherwise grow a path hop by hop without end.
            return Err(bad(&format!(
                "the path has more than {MAX_PATH_SEGMENTS} segments: a composition loop?"
            )));
        }
        if let Some((who, peer)) = caller
            && let Err(e) = self.admit(&conn, &path, prev_index, who, peer)
        {
            tracing::warn!(service = %service, error = %e, "request refused");
            return Err(e);
        }
        let idx = path.index as usize;
        let id = path.path_segments[idx].id.clone();
        let lock = self.lock_for(&id);
        let _guard = lock.lock().await;
        let existing = self.conns.get(&id);
        if only_refresh && existing.is_none() {
            return Ok(None);
        }
        // A connection id is not a capability: refreshing someone else's
        // connection (to re-point it) is refused like any other denial.
        let requester = caller
            .map(|(who, _)| who)
            .filter(|w| !matches!(w, Principal::Internal))
            .map(Principal::owner_key);
        if let (Some(r), Some(Some(owner))) = (&requester, existing.as_ref().map(|e| &e.requester))
            && r != owner
        {
            tracing::warn!(id = %id, service = %service, caller = %r, "refresh of another identity's connection refused");
            return Err(RequestError::Denied {
                service,
                why: "the connection belongs to another identity".into(),
            });
        }
        conn.id = id.clone();
        conn.path = Some(path);
        let mut expires = SystemTime::now() + self.settings.max_token_lifetime;
        // Our token, and so our segment, never outlives our certificate.
        if let Some(tls) = &self.settings.tls {
            expires = expires.min(tls.identity().not_after);
        }
        // As NSM servers do, the connection lives no longer than the previous
        // hop's token: that hop refreshes before its own expiry.
        if prev_index as usize != idx
            && let Some(prev) = conn
                .path
                .as_ref()
                .and_then(|p| p.path_segments.get(prev_index as usize))
                .and_then(|s| s.expires.as_ref())
                .map(crate::util::from_ts)
            && prev > SystemTime::now()
        {
            expires = expires.min(prev);
        }
        if let Some(seg) = conn
            .path
            .as_mut()
            .and_then(|p| p.path_segments.get_mut(idx))
        {
            seg.expires = Some(to_ts(expires));
            seg.token = TOKEN_PLACEHOLDER.to_string();
        }
        let wg = req
            .mechanism_preferences
            .iter()
            .find(|m| m.r#type == mechanisms::WIREGUARD);
        let result = match wg {
            Some(wg) => {
                self.request_endpoint_side(&conn, wg.clone(), existing.as_ref())
                    .await
            }
            None => {
                let k = req
                    .mechanism_preferences
                    .iter()
                    .find(|m| m.r#type == mechanisms::KERNEL)
                    .ok_or_else(|| bad("no KERNEL (or WIREGUARD) mechanism preference"))?;
                self.request_client_side(&conn, k.clone(), existing.as_ref())
                    .await
            }
        };
        let mut rec = match result {
            Ok(rec) => rec,
            Err(e) => {
                // A connection already down fails each retry the same way:
                // `mark_down` has said so once.
                if existing
                    .as_ref()
                    .is_some_and(|r| r.conn.0.state == State::Down as i32)
                {
                    tracing::debug!(id = %id, service = %service, error = %e, "request failed");
                } else {
                    tracing::warn!(id = %id, service = %service, error = %e, "request failed");
                }
                return Err(e);
            }
        };
        if rec.conn.0.path.is_none() {
            // A next hop that dropped the path must not make us lose our segment.
            rec.conn.0.path = conn.path.clone();
        }
        rec.managed = managed || existing.as_ref().is_some_and(|e| e.managed);
        rec.requester = existing
            .as_ref()
            .and_then(|e| e.requester.clone())
            .or(requester);
        rec.preferences = req.mechanism_preferences.iter().cloned().map(Pb).collect();
        rec.expires_ms = dur_ms(expires.duration_since(UNIX_EPOCH).unwrap_or_default());
        rec.refreshed_ms = now_ms();
        // The reply points back at the caller's segment (index and id), as
        // NSM's updatepath restores them on the way back.
        if let Some(p) = rec.conn.0.path.as_mut() {
            p.index = prev_index;
            if let Some(seg) = p.path_segments.get(prev_index as usize) {
                rec.conn.0.id = seg.id.clone();
            }
        }
        if let Err(e) = self.conns.put(&id, rec.clone()) {
            if existing.is_none() {
                self.teardown(&rec).await;
            }
            return Err(e.into());
        }
        tracing::info!(id = %id, service = %service, endpoint = %rec.endpoint_name, remote = rec.remote, "connection up");
        self.emit(
            ConnectionEventType::Update,
            &rec.conn.0,
            rec.requester.as_ref(),
        );
        Ok(Some(rec.conn.0))
    }

    /// The payload a connection carries: the request's, else its service's
    /// (NSM clients usually leave it to the registry), else IP.
    async fn payload_of(&self, conn: &Connection) -> String {
        if !conn.payload.is_empty() {
            return conn.payload.clone();
        }
        match self.registry.get_service(&conn.network_service).await {
            Ok(Some(ns)) if !ns.payload.is_empty() => ns.payload,
            _ => mechanisms::payload::IP.to_string(),
        }
    }

    /// Selects an endpoint for `conn` (of the chain's endpoint function
    /// `function`, else of the requested service) and, on a refresh that
    /// changed it, closes the old one.
    async fn select_endpoint(
        &self,
        function: Option<&str>,
        conn: &Connection,
        existing: Option<&Record>,
        only_local: bool,
    ) -> Result<NetworkServiceEndpoint, RequestError> {
        let service = function.unwrap_or(&conn.network_service);
        let nse = self
            .pick_endpoint(service, function.is_some(), conn, existing, only_local)
            .await?;
        self.close_old_endpoint(existing, &nse.name).await;
        Ok(nse)
    }

    /// Selects an endpoint of `service` (the requested one, or the chain's
    /// endpoint function) for `conn`.
    async fn pick_endpoint(
        &self,
        service: &str,
        function: bool,
        conn: &Connection,
        existing: Option<&Record>,
        only_local: bool,
    ) -> Result<NetworkServiceEndpoint, RequestError> {
        let ns = match self
            .registry
            .get_service(service)
            .await
            .map_err(RequestError::Registry)?
        {
            Some(ns) => ns,
            // A function's service needs no registration of its own: its
            // endpoints are enough (they are selected without matches).
            None if function => nsm_proto::registry::NetworkService {
                name: service.to_string(),
                ..Default::default()
            },
            None => return Err(RequestError::UnknownService(service.to_string())),
        };
        let mut eps = self
            .registry
            .endpoints_of(service)
            .await
            .map_err(RequestError::Registry)?;
        if only_local {
            eps.retain(|e| e.url == self.settings.advertise_url);
        }
        let cands = select::candidates(&ns, &eps, &conn.labels)?;
        let prefer = existing
            .map(|r| r.endpoint_name.as_str())
            .filter(|n| !n.is_empty())
            .or(Some(conn.network_service_endpoint_name.as_str()).filter(|n| !n.is_empty()));
        // RESELECT_REQUESTED (NSM healing after data-plane death) asks for
        // a fresh choice; anything else sticks to the endpoint it had.
        let reselect = conn.state == State::ReselectRequested as i32;
        if let Some(name) = prefer.filter(|_| !reselect)
            && let Some(e) = cands.iter().find(|e| e.name == name)
        {
            return Ok((*e).clone());
        }
        let mut cands = cands;
        if reselect && cands.len() > 1 {
            // The old endpoint (or its data path) just failed: prefer another.
            cands.retain(|e| Some(e.name.as_str()) != prefer);
        }
        let i = {
            let mut rr = self.rr.lock().unwrap_or_else(|p| p.into_inner());
            let n = rr.entry(service.to_string()).or_default();
            let i = *n % cands.len();
            *n = n.wrapping_add(1);
            i
        };
        Ok(cands[i].clone())
    }

    fn local_url(&self, nse: &NetworkServiceEndpoint) -> Option<String> {
        if nse.url == self.settings.advertise_url {
            self.local_nses.get(&nse.name)
        } else {
            None
        }
    }

    /// Asks the local endpoint to accept `conn`; returns its answer and netns path.
    async fn ask_endpoint(
        &self,
        nse_name: &str,
        url: &str,
        conn: &Connection,
    ) -> Result<(Connection, String), RequestError> {
        let fail = |status: Status| RequestError::Endpoint {
            name: nse_name.to_string(),
            url: url.to_string(),
            status,
        };
        let ch = self
            .channels
            .get(url)
            .map_err(|e| fail(Status::invalid_argument(e.to_string())))?;
        let mut c = conn.clone();
        c.network_service_endpoint_name = nse_name.to_string();
        c.mechanism = None;
        // The audience is the endpoint's SPIFFE ID by convention
        // (spiffe://TD/nsm-endpoint/NAME): an endpoint with an identity
        // checks it; one without is reached over our unix socket's trust.
        let aud = self.settings.tls.as_ref().map_or_else(
            || nse_name.to_string(),
            |t| {
                let id = t.identity();
                crate::identity::trust_domain(&id.id).map_or_else(
                    || nse_name.to_string(),
                    |td| crate::identity::endpoint_id(td, nse_name),
                )
            },
        );
        self.sign_segment(&mut c, &aud)?;
        let params = [(kernel::NAME.to_string(), nse_ifname(&conn.id))].into();
        let mut req = tonic::Request::new(NetworkServiceRequest {
            connection: Some(c),
            mechanism_preferences: vec![mech(mechanisms::KERNEL, cls::LOCAL, params)],
        });
        req.set_timeout(Duration::from_secs(15));
        nsm_trace::inject(req.metadata_mut());
        let reply = NetworkServiceClient::new(ch)
            .request(req)
            .await
            .map_err(fail)?
            .into_inner();
        let m = reply.mechanism.clone().unwrap_or_default();
        let netns = netns_of(&m).map_err(|e| {
            fail(Status::failed_precondition(format!(
                "reply names no usable netns: {e}"
            )))
        })?;
        Ok((reply, netns))
    }

    /// On a refresh that selected another endpoint (the old one is gone or
    /// no longer matches), the old next hop is closed; the cross-connect id
    /// stays and is updated in place.
    async fn close_old_endpoint(&self, existing: Option<&Record>, new_name: &str) {
        if let Some(old) = existing
            && old.endpoint_name != new_name
        {
            tracing::info!(id = %old.id, from = %old.endpoint_name, to = new_name, "endpoint changed");
            self.close_endpoint(&old.next_url, &old.downstream.0).await;
        }
    }

    async fn close_endpoint(&self, url: &str, conn: &Connection) {
        let Ok(ch) = self.channels.get(url) else {
            return;
        };
        let mut req = tonic::Request::new(conn.clone());
        req.set_timeout(Duration::from_secs(10));
        nsm_trace::inject(req.metadata_mut());
        if let Err(e) = NetworkServiceClient::new(ch).close(req).await {
            tracing::warn!(id = %conn.id, url, error = %e, "closing at the next hop failed");
        }
    }

    async fn request_client_side(
        &self,
        conn: &Connection,
        k: Mechanism,
        existing: Option<&Record>,
    ) -> Result<Record, RequestError> {
        let service = conn.network_service.clone();
        let bad = |what: String| RequestError::BadRequest {
            service: service.clone(),
            what,
        };
        let ifname = k
            .parameters
            .get(kernel::NAME)
            .cloned()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| nse_ifname(&conn.id));
        if !nsm_proto::annotation::valid_ifname(&ifname) {
            return Err(bad(format!(
                "interface name `{ifname}` is longer than 15 bytes or invalid"
            )));
        }
        let client_netns = netns_of(&k).map_err(|e| match e {
            NetnsError::BadUrl(u) if u.is_empty() => {
                bad("KERNEL mechanism has no inodeURL or netnsInode".into())
            }
            e => e.into(),
        })?;
        // The chain: which segment this is, its built-in functions, and
        // where it goes (an endpoint function, or the service itself).
        // An onward request of a passthrough we dispatched to continues that
        // connection: after a policy's function, the next segment; after an
        // endpoint that registry matches chose, no chain of its own.
        let hop = self.dispatched_hop(conn);
        let continuation = hop.is_some();
        let (segment, plan_labels, seg) = match hop {
            Some(h) if h.function => {
                let s = h.segment.saturating_add(1);
                let plan = self.policies().plan(&service, &h.labels);
                let seg = plan.segment(s as usize).cloned().unwrap_or_default();
                (s, h.labels, seg)
            }
            // Past every plan: no functions now or after a policy change.
            Some(h) => (AFTER_PASSTHROUGH, h.labels, nsm_policy::Segment::default()),
            None => {
                let labels = labels_of(conn);
                let plan = self.policies().plan(&service, &labels);
                let seg = plan.segment(0).cloned().unwrap_or_default();
                (0, labels, seg)
            }
        };
        let target = seg.function.clone();
        let chain = chain_of(&seg.chain);
        let nse = self
            .select_endpoint(target.as_deref(), conn, existing, false)
            .await?;
        let payload = self.payload_of(conn).await;
        let mut ipc = ip_context(conn);
        let new = existing.is_none();
        // Addresses: this manager owns the lease of a connection it started;
        // continuations carry the client's addresses.
        let leased = !continuation;
        if leased {
            let exclude: Vec<IpNet> = ipc
                .excluded_prefixes
                .iter()
                .filter_map(|p| p.parse().ok())
                .collect();
            let pairs = self.ipam.allocate(&service, &conn.id, &exclude).await?;
            ipc.src_ip_addrs = pairs.iter().map(|p| p.client.to_string()).collect();
            ipc.dst_ip_addrs = pairs.iter().map(|p| p.endpoint.to_string()).collect();
            ipc.src_routes = pairs
                .iter()
                .map(|p| CtxRoute {
                    prefix: p.endpoint.to_string(),
                    next_hop: String::new(),
                })
                .collect();
            ipc.dst_routes = pairs
                .iter()
                .map(|p| CtxRoute {
                    prefix: p.client.to_string(),
                    next_hop: String::new(),
                })
                .collect();
        }
        let undo_lease = async || {
            if new
                && leased
                && let Err(e) = self.ipam.release(&service, &conn.id).await
            {
                tracing::warn!(id = %conn.id, error = %e, "releasing lease after failure");
            }
        };
        let mut out = conn.clone();
        out.payload = payload.clone();
        out.network_service_endpoint_name = nse.name.clone();
        let mut ctx = out.context.clone().unwrap_or_default();
        ctx.ip_context = Some(ipc.clone());
        // Only we say where a hop stands (a client cannot skip a function).
        ctx.extra_context.remove(CHAIN_KEY);
        if segment > 0 || target.is_some() {
            let hop = ChainHop {
                segment,
                target: target.clone(),
                labels: plan_labels.clone(),
            };
            ctx.extra_context.insert(
                CHAIN_KEY.into(),
                serde_json::to_string(&hop).unwrap_or_default(),
            );
        }
        out.context = Some(ctx.clone());
        out.state = State::Up as i32;
        let mtu = ctx.mtu;
        // A function endpoint's onward interface and its incoming one carry
        // no addresses: the function forwards the client's packets.
        let (src_addrs, src_routes) = if leased {
            (ipc.src_ip_addrs.clone(), ipc.src_routes.clone())
        } else {
            (Vec::new(), Vec::new())
        };
        let dst_addrs_of = |passthrough: bool| {
            if passthrough {
                (Vec::new(), Vec::new())
            } else {
                (ipc.dst_ip_addrs.clone(), ipc.dst_routes.clone())
            }
        };
        let client_side = kernel_side(
            &client_netns,
            &ifname,
            &payload,
            &src_addrs,
            &src_routes,
            mtu,
        );
        let client_mech = mech(mechanisms::KERNEL, cls::LOCAL, k.parameters.clone());

        if let Some(url) = self.local_url(&nse) {
            // Same node: the endpoint first (it tells us its netns), then one kernel<->kernel cross-connect.
            let d = Dispatch {
                segment,
                labels: plan_labels.clone(),
                function: target.is_some(),
                continued: false,
            };
            let (asked, continued) = self.dispatch(&nse.name, &url, &out, d).await;
            let (reply, nse_netns) = match asked {
                Ok(r) => r,
                Err(e) => {
                    undo_lease().await;
                    return Err(e);
                }
            };
            let passthrough =
                continued || existing.is_some_and(|r| r.passthrough && r.endpoint_name == nse.name);
            let (dst_addrs, dst_routes) = dst_addrs_of(target.is_some() || passthrough);
            let xc = CrossConnect {
                id: conn.id.clone(),
                source: Some(client_side),
                destination: Some(kernel_side(
                    &nse_netns,
                    &nse_ifname(&conn.id),
                    &payload,
                    &dst_addrs,
                    &dst_routes,
                    mtu,
                )),
                chain: chain.clone(),
            };
            if let Err(e) = self.forwarder.program(xc.clone()).await {
                if new {
                    self.close_endpoint(&url, &reply).await;
                    undo_lease().await;
                }
                return Err(e.into());
            }
            let mut answer = reply.clone();
            answer.id = conn.id.clone();
            answer.mechanism = Some(client_mech);
            answer.network_service_endpoint_name = nse.name.clone();
            answer.state = State::Up as i32;
            return Ok(Record {
                id: conn.id.clone(),
                conn: Pb(answer),
                preferences: Vec::new(),
                role: Role::Client,
                endpoint_name: nse.name.clone(),
                next_url: url,
                remote: false,
                downstream: Pb(reply),
                xconnect: Pb(xc),
                lease: leased.then_some(service),
                managed: false,
                expires_ms: 0,
                refreshed_ms: 0,
                requester: None,
                segment,
                function: target.clone(),
                plan_labels: plan_labels.clone(),
                passthrough,
            });
        }

        // Another node: our tunnel end first (the forwarder makes our key), then the peer.
        let peer_url = nse.url.clone();
        let (pip, pport, pkey, planes) = existing
            .filter(|r| r.endpoint_name == nse.name)
            .and_then(|r| {
                match r
                    .xconnect
                    .0
                    .destination
                    .as_ref()
                    .and_then(|s| s.kind.clone())
                {
                    Some(Kind::Wireguard(w)) => {
                        Some((w.peer_ip, w.peer_port, w.peer_public_key, w.peer_lane_ports))
                    }
                    _ => None,
                }
            })
            .unwrap_or_default();
        let mut xc = CrossConnect {
            id: conn.id.clone(),
            source: Some(client_side),
            destination: Some(wg_side(&pip, pport, &pkey, &planes)),
            chain,
        };
        let st: CrossConnectStatus = match self.forwarder.program(xc.clone()).await {
            Ok(st) => st,
            Err(e) => {
                undo_lease().await;
                return Err(e.into());
            }
        };
        let undo_fwd = async || {
            if new && let Err(e) = self.forwarder.remove(&conn.id).await {
                tracing::warn!(id = %conn.id, error = %e, "removing cross-connect after failure");
            }
        };
        let mut params: HashMap<String, String> = HashMap::new();
        params.insert(wireguard::SRC_IP.into(), st.underlay_ip.clone());
        params.insert(wireguard::SRC_PORT.into(), st.wireguard_port.to_string());
        params.insert(
            wireguard::SRC_PUBLIC_KEY.into(),
            st.wireguard_public_key.clone(),
        );
        set_lane_param(&mut params, wireguard::SRC_LANE_PORTS, &st);
        if st.mtu != 0 {
            params.insert(wireguard::MTU.into(), st.mtu.to_string());
        }
        let mut fwd = out.clone();
        fwd.mechanism = None;
        let peer_fail = |status: Status| RequestError::Peer {
            name: nse.name.clone(),
            url: peer_url.clone(),
            status,
        };
        let reply = async {
            let ch = self
                .channels
                .get(&peer_url)
                .map_err(|e| peer_fail(Status::invalid_argument(e.to_string())))?;
            // Signed for the peer we are about to call, as the identity its
            // mTLS handshake shows: it checks both against each other.
            let mut fwd = fwd;
            let aud = self.peer_audience(&peer_url, &nse.name).await?;
            self.sign_segment(&mut fwd, &aud)?;
            let message = NetworkServiceRequest {
                connection: Some(fwd),
                mechanism_preferences: vec![mech(mechanisms::WIREGUARD, cls::REMOTE, params)],
            };
            // Request is idempotent by connection id, so a call that failed
            // at the transport (a cached HTTP/2 connection to a peer that
            // has since restarted) is sent once more; the channel reconnects.
            let mut retried = false;
            loop {
                let mut req = tonic::Request::new(message.clone());
                req.set_timeout(Duration::from_secs(20));
                nsm_trace::inject(req.metadata_mut());
                match NetworkServiceClient::new(ch.clone()).request(req).await {
                    Ok(r) => break Ok(r.into_inner()),
                    Err(s)
                        if !retried
                            && matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled) =>
                    {
                        tracing::debug!(peer = %peer_url, code = ?s.code(), "peer request failed at the transport; retrying once");
                        retried = true;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(s) => break Err(peer_fail(s)),
                }
            }
        }
        .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                undo_fwd().await;
                undo_lease().await;
                return Err(e);
            }
        };
        let rp = reply
            .mechanism
            .as_ref()
            .map(|m| m.parameters.clone())
            .unwrap_or_default();
        let dst_ip = rp.get(wireguard::DST_IP).cloned().unwrap_or_default();
        let dst_port: u32 = rp
            .get(wireguard::DST_PORT)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let dst_key = rp
            .get(wireguard::DST_PUBLIC_KEY)
            .cloned()
            .unwrap_or_default();
        let dst_lanes = lane_param(&rp, wireguard::DST_LANE_PORTS, dst_port);
        if dst_ip.is_empty() || dst_key.is_empty() {
            if new {
                self.close_endpoint(&peer_url, &reply).await;
                undo_fwd().await;
                undo_lease().await;
            }
            return Err(peer_fail(Status::internal(
                "reply lacks dst_ip/dst_public_key",
            )));
        }
        if (dst_ip.as_str(), dst_port, dst_key.as_str(), &dst_lanes)
            != (pip.as_str(), pport, pkey.as_str(), &planes)
        {
            xc.destination = Some(wg_side(&dst_ip, dst_port, &dst_key, &dst_lanes));
            if let Err(e) = self.forwarder.program(xc.clone()).await {
                if new {
                    self.close_endpoint(&peer_url, &reply).await;
                    undo_fwd().await;
                    undo_lease().await;
                }
                return Err(e.into());
            }
        }
        let mut answer = reply.clone();
        answer.id = conn.id.clone();
        answer.mechanism = Some(client_mech);
        answer.network_service_endpoint_name = nse.name.clone();
        answer.state = State::Up as i32;
        Ok(Record {
            id: conn.id.clone(),
            conn: Pb(answer),
            preferences: Vec::new(),
            role: Role::Client,
            endpoint_name: nse.name.clone(),
            next_url: peer_url,
            remote: true,
            downstream: Pb(reply),
            xconnect: Pb(xc),
            lease: leased.then_some(service),
            managed: false,
            expires_ms: 0,
            refreshed_ms: 0,
            requester: None,
            segment,
            function: target.clone(),
            plan_labels: plan_labels.clone(),
            passthrough: false,
        })
    }

    async fn request_endpoint_side(
        &self,
        conn: &Connection,
        wg: Mechanism,
        existing: Option<&Record>,
    ) -> Result<Record, RequestError> {
        let service = conn.network_service.clone();
        let p = &wg.parameters;
        let get = |k: &str| p.get(k).cloned().unwrap_or_default();
        let (src_ip, src_key) = (get(wireguard::SRC_IP), get(wireguard::SRC_PUBLIC_KEY));
        let src_port: u32 = get(wireguard::SRC_PORT).parse().unwrap_or(0);
        if src_ip.parse::<IpAddr>().is_err() || src_key.is_empty() {
            return Err(RequestError::BadRequest {
                service,
                what: "WIREGUARD preference needs src_ip, src_port and src_public_key".into(),
            });
        }
        // The peer that planned the chain says where this hop stands (see
        // the module docs); without it, no chain.
        let hop: ChainHop = conn
            .context
            .as_ref()
            .and_then(|c| c.extra_context.get(CHAIN_KEY))
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_else(|| ChainHop {
                labels: labels_of(conn),
                ..Default::default()
            });
        let (segment, target, plan_labels) = (hop.segment, hop.target, hop.labels);
        let nse = self
            .select_endpoint(target.as_deref(), conn, existing, true)
            .await?;
        let url = self.local_url(&nse).ok_or_else(|| RequestError::Endpoint {
            name: nse.name.clone(),
            url: nse.url.clone(),
            status: Status::unavailable("endpoint is registered here but its local URL is unknown"),
        })?;
        let payload = self.payload_of(conn).await;
        let mut out = conn.clone();
        out.payload = payload.clone();
        out.network_service_endpoint_name = nse.name.clone();
        let d = Dispatch {
            segment,
            labels: plan_labels.clone(),
            function: target.is_some(),
            continued: false,
        };
        let (asked, continued) = self.dispatch(&nse.name, &url, &out, d).await;
        let (reply, nse_netns) = asked?;
        let passthrough =
            continued || existing.is_some_and(|r| r.passthrough && r.endpoint_name == nse.name);
        let ipc = ip_context(&out);
        let mtu = out.context.as_ref().map(|c| c.mtu).unwrap_or(0);
        // A function or passthrough endpoint's interface gets no addresses
        // (it forwards; the final endpoint answers).
        let (dst_addrs, dst_routes) = if target.is_some() || passthrough {
            (Vec::new(), Vec::new())
        } else {
            (ipc.dst_ip_addrs.clone(), ipc.dst_routes.clone())
        };
        let xc = CrossConnect {
            id: conn.id.clone(),
            source: Some(wg_side(
                &src_ip,
                src_port,
                &src_key,
                &lane_param(p, wireguard::SRC_LANE_PORTS, src_port),
            )),
            destination: Some(kernel_side(
                &nse_netns,
                &nse_ifname(&conn.id),
                &payload,
                &dst_addrs,
                &dst_routes,
                mtu,
            )),
            ..Default::default()
        };
        let st = match self.forwarder.program(xc.clone()).await {
            Ok(st) => st,
            Err(e) => {
                if existing.is_none() {
                    self.close_endpoint(&url, &reply).await;
                }
                return Err(e.into());
            }
        };
        let mut params = wg.parameters.clone();
        params.insert(wireguard::DST_IP.into(), st.underlay_ip.clone());
        params.insert(wireguard::DST_PORT.into(), st.wireguard_port.to_string());
        params.insert(
            wireguard::DST_PUBLIC_KEY.into(),
            st.wireguard_public_key.clone(),
        );
        set_lane_param(&mut params, wireguard::DST_LANE_PORTS, &st);
        if st.mtu != 0 {
            params
                .entry(wireguard::MTU.into())
                .or_insert_with(|| st.mtu.to_string());
        }
        let mut answer = reply.clone();
        answer.id = conn.id.clone();
        answer.mechanism = Some(mech(mechanisms::WIREGUARD, cls::REMOTE, params));
        answer.network_service_endpoint_name = nse.name.clone();
        answer.state = State::Up as i32;
        if answer.context.is_none() {
            answer.context = Some(ConnectionContext {
                ip_context: Some(ipc),
                ..Default::default()
            });
        }
        Ok(Record {
            id: conn.id.clone(),
            conn: Pb(answer),
            preferences: Vec::new(),
            role: Role::Endpoint,
            endpoint_name: nse.name.clone(),
            next_url: url,
            remote: false,
            downstream: Pb(reply),
            xconnect: Pb(xc),
            lease: None,
            managed: false,
            expires_ms: 0,
            refreshed_ms: 0,
            requester: None,
            segment,
            function: target.clone(),
            plan_labels: plan_labels.clone(),
            passthrough,
        })
    }

    /// Undoes everything a record stands for, ignoring (but logging) failures.
    ///
    /// The local cross-connect and the next hop are closed at once: each
    /// side's Remove waits out the kernel's deletion of a device (15 to
    /// 20 ms), so one after the other doubled the time of a Close. The
    /// lease goes last, once no interface here holds its addresses.
    async fn teardown(&self, rec: &Record) {
        let id = &rec.id;
        let local = async {
            if let Err(e) = self.forwarder.remove(id).await {
                tracing::warn!(id = %id, error = %e, "forwarder Remove failed");
            }
        };
        tokio::join!(local, self.close_endpoint(&rec.next_url, &rec.downstream.0));
        if let Some(service) = &rec.lease
            && let Err(e) = self.ipam.release(service, id).await
        {
            tracing::warn!(id = %id, error = %e, "releasing lease failed");
        }
    }

    /// Our connection id in a connection sent to Close: the segment with our
    /// name, else the connection id.
    /// Our segment's id in `conn`'s path. A path may hold several segments
    /// of ours (a chain passes a node twice: to a function endpoint, then
    /// onward from it), so the position decides: the segment after the
    /// caller's (`index`, on a Close from the previous hop), else the one
    /// at `index`, else the nearest of ours before it (a peer's view).
    fn our_id(&self, conn: &Connection) -> String {
        let me = self.settings.name.as_str();
        conn.path
            .as_ref()
            .filter(|p| !p.path_segments.is_empty())
            .and_then(|p| {
                let segs = &p.path_segments;
                let i = (p.index as usize).min(segs.len() - 1);
                segs.get(i + 1)
                    .filter(|s| s.name == me)
                    .or_else(|| segs[..=i].iter().rev().find(|s| s.name == me))
                    .or_else(|| segs.iter().find(|s| s.name == me))
            })
            .map(|s| s.id.clone())
            .unwrap_or_else(|| conn.id.clone())
    }

    /// Close: removes everything on this node and asks the next hop to do
    /// the same. Unknown connections succeed (Close is idempotent).
    ///
    /// # Errors
    /// Only a failure to update the connection table.
    pub async fn close(&self, conn: &Connection) -> Result<(), StoreError> {
        let mut id = self.our_id(conn);
        if self.conns.get(&id).is_none() {
            // A bare id (e.g. `nsmctl close ID`) may be the caller's id, as
            // returned in the reply, rather than ours.
            if let Some((ours, _)) = self
                .conns
                .all()
                .into_iter()
                .find(|(_, r)| r.conn.0.id == conn.id)
            {
                id = ours;
            }
        }
        self.close_id(&id, "closed").await
    }

    /// [`Manager::close`] from a caller the transport identified: refused
    /// when the connection was requested by another identity (a peer
    /// manager, or a local uid), so that knowing an id is not enough to
    /// tear a connection down.
    ///
    /// # Errors
    /// PermissionDenied, or Internal when the table cannot be updated.
    pub async fn close_from(&self, conn: &Connection, who: &Principal) -> Result<(), Status> {
        let id = self.resolve_id(conn);
        if !matches!(who, Principal::Internal)
            && let Some(Some(owner)) = self.conns.get(&id).map(|r| r.requester)
            && owner != who.owner_key()
        {
            tracing::warn!(id = %id, caller = %who.owner_key(), "close of another identity's connection refused");
            return Err(Status::permission_denied(
                "the connection belongs to another identity",
            ));
        }
        self.close_id(&id, "closed")
            .await
            .map_err(|e| Status::internal(format!("close: {e}")))
    }

    fn resolve_id(&self, conn: &Connection) -> String {
        let id = self.our_id(conn);
        if self.conns.get(&id).is_some() {
            return id;
        }
        // A bare id (e.g. `nsmctl close ID`) may be the caller's id, as
        // returned in the reply, rather than ours.
        self.conns
            .all()
            .into_iter()
            .find(|(_, r)| r.conn.0.id == conn.id)
            .map_or(id, |(ours, _)| ours)
    }

    async fn close_id(&self, id: &str, why: &str) -> Result<(), StoreError> {
        let lock = self.lock_for(id);
        let guard = lock.lock().await;
        let Some(rec) = self.conns.get(id) else {
            return Ok(());
        };
        // The row goes first: the next hop's DELETE event must find nothing
        // to heal.
        self.conns.remove(id)?;
        self.teardown(&rec).await;
        drop(guard);
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        tracing::info!(id = %id, why, "connection removed");
        let mut c = rec.conn.0;
        c.state = State::Down as i32;
        self.emit(ConnectionEventType::Delete, &c, rec.requester.as_ref());
        Ok(())
    }

    /// One pass of the lifecycle: closes expired connections and refreshes
    /// managed ones at a third of their lifetime, as NSM clients do.
    pub async fn tick(&self) {
        let now = now_ms();
        let third = dur_ms(self.settings.max_token_lifetime) / 3;
        for (id, rec) in self.conns.all() {
            // A managed connection is ours to keep: it is refreshed, never
            // expired, even after a manager outage longer than its lifetime.
            let managed = rec.managed && rec.role == Role::Client;
            if !managed && rec.expires_ms <= now {
                tracing::info!(id = %id, "connection expired (not refreshed)");
                if let Err(e) = self.close_id(&id, "expired").await {
                    tracing::warn!(id = %id, error = %e, "cannot remove expired connection");
                }
            } else if self.endpoint_gone(&rec) {
                self.heal(&id, &rec, now).await;
            } else if managed
                && (now.saturating_sub(rec.refreshed_ms) >= third
                    || (rec.conn.0.state == State::Down as i32 && self.attempt_due(&id, now)))
                && let Err(e) = self.refresh(&rec).await
            {
                self.mark_down(&id, &rec, &e).await;
            }
        }
    }

    /// Paces attempts to bring a connection back (healing, or retrying one
    /// that is down): true, and noted, when none was made for `id` in the
    /// last two seconds.
    fn attempt_due(&self, id: &str, now: u64) -> bool {
        const PACE_MS: u64 = 2_000;
        let mut m = self.heal_attempts.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, t| now.saturating_sub(*t) < 60_000);
        if m.get(id).is_some_and(|t| now.saturating_sub(*t) < PACE_MS) {
            return false;
        }
        m.insert(id.to_string(), now);
        true
    }

    /// A managed connection that could not be refreshed or healed (its
    /// endpoint is gone and no other serves the service, a peer is away,
    /// ...) is DOWN: watchers get an UPDATE saying so, once, and the
    /// failure is logged once. It is tried again every 2 s; the first
    /// success makes it UP again (with its own UPDATE). `tried` is the
    /// record the failed attempt started from: if another attempt has
    /// succeeded since (the record was refreshed), nothing changes.
    async fn mark_down(&self, id: &str, tried: &Record, err: &RequestError) {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let Some(mut rec) = self.conns.get(id) else {
            return;
        };
        if rec.refreshed_ms != tried.refreshed_ms {
            return;
        }
        if rec.conn.0.state == State::Down as i32 {
            tracing::debug!(id = %id, error = %err, "still down");
            return;
        }
        tracing::warn!(id = %id, error = %err, "connection down: cannot refresh it; retrying");
        rec.conn.0.state = State::Down as i32;
        if let Err(e) = self.conns.put(id, rec.clone()) {
            tracing::warn!(id = %id, error = %e, "recording the connection down");
        }
        self.emit(
            ConnectionEventType::Update,
            &rec.conn.0,
            rec.requester.as_ref(),
        );
    }

    /// A local endpoint that unregistered (it stopped) no longer serves the
    /// connections that went to it.
    fn endpoint_gone(&self, rec: &Record) -> bool {
        !rec.remote
            && !rec.endpoint_name.is_empty()
            && self.local_nses.get(&rec.endpoint_name).is_none()
    }

    /// Moves a connection off a vanished local endpoint: a client-side one
    /// is re-requested (selection skips the vanished endpoint: another
    /// instance, or for a chain, another instance of the function); an
    /// endpoint-side one is closed, and the DELETE event makes the client's
    /// manager, which monitors us, re-request it. Attempts are paced.
    async fn heal(&self, id: &str, rec: &Record, now: u64) {
        crate::metrics::global().loss_detected(id);
        if !self.attempt_due(id, now) {
            return;
        }
        if rec.conn.0.state == State::Down as i32 {
            tracing::debug!(id = %id, endpoint = %rec.endpoint_name, "endpoint gone; healing again");
        } else {
            tracing::info!(id = %id, endpoint = %rec.endpoint_name, role = ?rec.role, "endpoint gone; healing");
        }
        let res = match rec.role {
            Role::Client => self.refresh(rec).await,
            Role::Endpoint => self
                .close_id(id, "endpoint gone")
                .await
                .map_err(RequestError::from),
        };
        match res {
            Ok(()) if rec.role == Role::Client => crate::metrics::global().healed(id),
            Ok(()) => crate::metrics::global().forget(id),
            Err(e) if rec.role == Role::Client => self.mark_down(id, rec, &e).await,
            Err(e) => tracing::warn!(id = %id, error = %e, "healing failed; will retry"),
        }
    }

    async fn refresh(&self, rec: &Record) -> Result<(), RequestError> {
        let req = NetworkServiceRequest {
            connection: Some(rec.conn.0.clone()),
            mechanism_preferences: rec.preferences.iter().map(|p| p.0.clone()).collect(),
        };
        self.request_inner(req, rec.managed, true, None)
            .await
            .map(|_| ())
    }

    /// Re-programs every connection the forwarder lacks (after its restart,
    /// or ours). Client-side connections to another node are re-requested
    /// in full, because the restarted forwarder has a new key the peer must
    /// learn.
    pub async fn reconcile(&self, present: &[String]) {
        for (id, rec) in self.conns.all() {
            if present.contains(&id) {
                continue;
            }
            tracing::info!(id = %id, "forwarder lacks cross-connect; programming it again");
            crate::metrics::global().loss_detected(&id);
            let res = if rec.role == Role::Client && rec.remote {
                self.refresh(&rec).await
            } else {
                self.reprogram(&id).await
            };
            match res {
                Ok(()) => crate::metrics::global().healed(&id),
                Err(e) => {
                    tracing::warn!(id = %id, error = %e, "re-programming failed; will retry on the next snapshot or refresh");
                }
            }
        }
    }

    /// Programs a stored cross-connect again. On the endpoint side the
    /// restarted forwarder has a new key: the connection is updated and an
    /// UPDATE event tells the client side's manager (which monitors us) to
    /// refresh with it.
    async fn reprogram(&self, id: &str) -> Result<(), RequestError> {
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let Some(mut rec) = self.conns.get(id) else {
            return Ok(());
        };
        let st = self.forwarder.program(rec.xconnect.0.clone()).await?;
        if rec.role == Role::Endpoint
            && let Some(m) = rec.conn.0.mechanism.as_mut()
            && m.parameters.get(wireguard::DST_PUBLIC_KEY) != Some(&st.wireguard_public_key)
        {
            set_lane_param(&mut m.parameters, wireguard::DST_LANE_PORTS, &st);
            m.parameters
                .insert(wireguard::DST_IP.into(), st.underlay_ip.clone());
            m.parameters
                .insert(wireguard::DST_PORT.into(), st.wireguard_port.to_string());
            m.parameters.insert(
                wireguard::DST_PUBLIC_KEY.into(),
                st.wireguard_public_key.clone(),
            );
            self.conns.put(id, rec.clone())?;
            self.emit(
                ConnectionEventType::Update,
                &rec.conn.0,
                rec.requester.as_ref(),
            );
        }
        Ok(())
    }

    /// Peer manager URLs that hold the far side of our client-side connections.
    pub fn peers(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .conns
            .all()
            .into_iter()
            .filter(|(_, r)| r.role == Role::Client && r.remote)
            .map(|(_, r)| r.next_url)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Monitors a peer manager's connections that pass through us (NSM's
    /// heal client does the same): when the peer's side changed under us
    /// (its forwarder restarted with a new key) or vanished (it expired or
    /// restarted after a long outage), our side is refreshed, which
    /// re-programs both ends. Runs until aborted, reconnecting as needed.
    pub async fn monitor_peer(self: Arc<Self>, url: String) {
        use nsm_proto::connection::monitor_connection_client::MonitorConnectionClient;
        use tokio_stream::StreamExt;
        loop {
            if let Ok(ch) = self.channels.get(&url) {
                let sel = MonitorScopeSelector {
                    path_segments: vec![PathSegment {
                        name: self.settings.name.clone(),
                        ..Default::default()
                    }],
                    network_services: Vec::new(),
                };
                match MonitorConnectionClient::new(ch)
                    .monitor_connections(sel)
                    .await
                {
                    Ok(s) => {
                        let mut s = s.into_inner();
                        while let Some(Ok(ev)) = s.next().await {
                            self.on_peer_event(&url, ev).await;
                        }
                    }
                    Err(e) => tracing::debug!(peer = %url, error = %e, "cannot monitor peer yet"),
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn on_peer_event(&self, url: &str, ev: ConnectionEvent) {
        let deleted = ev.r#type == ConnectionEventType::Delete as i32;
        if ev.r#type == ConnectionEventType::InitialStateTransfer as i32 {
            // Connections the peer no longer has at all (it lost them while
            // we were not watching) are re-requested.
            let theirs: std::collections::HashSet<String> =
                ev.connections.values().map(|c| self.our_id(c)).collect();
            for (id, rec) in self.conns.all() {
                if rec.role == Role::Client
                    && rec.remote
                    && rec.next_url == url
                    && !theirs.contains(&id)
                {
                    tracing::info!(id = %id, peer = url, "peer lost the connection; refreshing");
                    if let Err(e) = self.refresh(&rec).await {
                        self.mark_down(&id, &rec, &e).await;
                    }
                }
            }
        }
        for c in ev.connections.values() {
            let id = self.our_id(c);
            let Some(rec) = self.conns.get(&id) else {
                continue;
            };
            if rec.role != Role::Client || !rec.remote {
                continue;
            }
            let theirs = c.mechanism.as_ref().map(|m| &m.parameters);
            let key = theirs
                .and_then(|p| p.get(wireguard::DST_PUBLIC_KEY))
                .cloned()
                .unwrap_or_default();
            let ours = match rec
                .xconnect
                .0
                .destination
                .as_ref()
                .and_then(|s| s.kind.as_ref())
            {
                Some(Kind::Wireguard(w)) => w.peer_public_key.clone(),
                _ => String::new(),
            };
            if deleted || (!key.is_empty() && key != ours) {
                tracing::info!(id = %id, deleted, "peer side changed; refreshing");
                if let Err(e) = self.refresh(&rec).await {
                    self.mark_down(&id, &rec, &e).await;
                }
            }
        }
    }

    /// Follows the forwarder forever, reconciling on every snapshot.
    pub async fn watch_forwarder(self: Arc<Self>) {
        let me = self.clone();
        self.forwarder
            .watch(move |ids| {
                let me = me.clone();
                async move { me.reconcile(&ids).await }
            })
            .await;
    }

    /// Connections in `sel`'s scope (NSM MonitorScopeSelector).
    pub fn in_scope(sel: &MonitorScopeSelector, c: &Connection) -> bool {
        let svc_ok =
            sel.network_services.is_empty() || sel.network_services.contains(&c.network_service);
        let seg_ok = sel.path_segments.is_empty()
            || c.path.as_ref().is_some_and(|p| {
                p.path_segments.iter().any(|s| {
                    sel.path_segments.iter().any(|q| {
                        (q.id.is_empty() || q.id == s.id) && (q.name.is_empty() || q.name == s.name)
                    })
                })
            });
        svc_ok && seg_ok
    }

    /// Whether `who` may see a connection requested by `requester`: the
    /// manager itself and the node's root see every connection; anyone else
    /// (a peer manager by its SPIFFE ID, a local client by its uid) only
    /// those it requested. NSM's previous hop monitoring its next hop is
    /// therefore always in scope; other workloads' connections never are.
    pub fn may_monitor(who: &Principal, requester: Option<&String>) -> bool {
        match who {
            Principal::Internal | Principal::Local { uid: 0, .. } => true,
            _ => requester.is_some_and(|r| *r == who.owner_key()),
        }
    }

    /// A snapshot of the connections in scope that `who` may see, and a
    /// receiver of later events (filter them with [`Manager::may_monitor`]
    /// and [`Manager::in_scope`]).
    pub fn monitor(
        &self,
        sel: &MonitorScopeSelector,
        who: &Principal,
    ) -> (ConnectionEvent, broadcast::Receiver<Event>) {
        let rx = self.events.subscribe();
        let connections = self
            .conns
            .all()
            .into_iter()
            .filter(|(_, r)| Self::may_monitor(who, r.requester.as_ref()))
            .map(|(_, r)| r.conn.0)
            .filter(|c| Self::in_scope(sel, c))
            .map(|c| (c.id.clone(), c))
            .collect();
        (
            ConnectionEvent {
                r#type: ConnectionEventType::InitialStateTransfer as i32,
                connections,
            },
            rx,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitors_see_what_they_requested() {
        let peer = Principal::Peer {
            id: "spiffe://td/nsm-manager/a".into(),
            on_behalf: None,
        };
        let mine = Some("spiffe://td/nsm-manager/a".to_string());
        let other = Some("uid:1000".to_string());
        assert!(Manager::may_monitor(&peer, mine.as_ref()));
        assert!(!Manager::may_monitor(&peer, other.as_ref()));
        assert!(!Manager::may_monitor(&peer, None));
        let user = Principal::Local { uid: 1000, gid: 0 };
        assert!(Manager::may_monitor(&user, other.as_ref()));
        assert!(!Manager::may_monitor(&user, mine.as_ref()));
        let root = Principal::Local { uid: 0, gid: 0 };
        assert!(Manager::may_monitor(&root, None));
        assert!(Manager::may_monitor(&Principal::Internal, other.as_ref()));
        assert!(!Manager::may_monitor(&Principal::Anonymous, other.as_ref()));
    }

    #[test]
    fn update_path_new_refresh_and_next_hop() {
        let (p, prev) = update_path(None, "node-1", "");
        assert_eq!((p.index, prev, p.path_segments.len()), (0, 0, 1));
        let id = p.path_segments[0].id.clone();
        // Refresh with the returned path: same segment, same id.
        let (p2, _) = update_path(Some(p.clone()), "node-1", &id);
        assert_eq!(p2.path_segments[0].id, id);
        // The next hop appends its segment...
        let (p3, prev3) = update_path(Some(p.clone()), "node-2", &id);
        assert_eq!((p3.index, prev3, p3.path_segments.len()), (1, 0, 2));
        let id2 = p3.path_segments[1].id.clone();
        assert_ne!(id2, id);
        // ...and finds it again on refresh (index still at the caller's).
        let mut back = p3.clone();
        back.index = 0;
        let (p4, _) = update_path(Some(back), "node-2", &id);
        assert_eq!(p4.path_segments[1].id, id2);
        assert_eq!(p4.path_segments.len(), 2);
    }

    #[test]
    fn nse_ifname_fits() {
        assert!(nse_ifname(&crate::util::uuid()).len() <= kernel::IFNAME_MAX_LEN);
    }
}
