//! IPAM: point-to-point address pairs per connection, out of per-service
//! pools, owned by ONE place in the lab.
//!
//! # Design
//! Only the registry manager (the one started without `--registry`, which
//! has the `--config` pools) allocates. Every other manager asks it over
//! NSM's `/ipam.IPAM/ManagePrefixes` method, with this convention (an
//! "equivalent call" on NSM's wire API):
//! - request metadata `nsm-service: NAME` and `nsm-connection-id: ID`;
//! - the client sends ONE `PrefixRequest`: `ALLOCATE` (with
//!   `exclude_prefixes` from the connection's IPContext) or `DELETE`;
//! - for `ALLOCATE` the server answers with the lease's prefixes, a pair per
//!   pool family in pool order — client address then endpoint address, each
//!   a /32 or /128 — and ends the stream; for `DELETE` it ends the stream.
//!
//! Leases are keyed by connection id and allocation is idempotent: a refresh,
//! a retry or a manager restart asks again and gets the same addresses. One
//! owner with one durable table means no address is ever handed out twice in
//! the lab; a lease is released only by an explicit DELETE (close or expiry
//! of the connection that owns it).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use ipnet::IpNet;
use nsm_proto::ipam::ipam_client::IpamClient;
use nsm_proto::ipam::ipam_server::Ipam as IpamService;
use nsm_proto::ipam::{PrefixRequest, PrefixResponse, Type};
use serde::{Deserialize, Serialize};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::config::ServiceConfig;
use crate::store::{StoreError, Table};

/// gRPC metadata key naming the service of an IPAM stream.
pub const MD_SERVICE: &str = "nsm-service";
/// gRPC metadata key naming the connection (lease key) of an IPAM stream.
pub const MD_CONNECTION_ID: &str = "nsm-connection-id";

/// Why an allocation failed.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Every address of a pool is leased or excluded.
    #[error("network service `{service}`: address pool {pool} is exhausted")]
    Exhausted {
        /// The service.
        service: String,
        /// The pool that ran out.
        pool: IpNet,
    },
    /// The lease table could not be written.
    #[error("IPAM lease table: {0}")]
    Store(#[from] StoreError),
    /// The remote IPAM owner failed or answered nonsense.
    #[error("IPAM at the registry manager: {0}")]
    Remote(Status),
}

impl From<IpamError> for Status {
    fn from(e: IpamError) -> Status {
        match e {
            IpamError::Exhausted { .. } => Status::resource_exhausted(e.to_string()),
            IpamError::Store(_) => Status::internal(e.to_string()),
            IpamError::Remote(s) => Status::new(
                s.code(),
                format!("IPAM at the registry manager: {}", s.message()),
            ),
        }
    }
}

/// One address pair: the client's and the endpoint's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    /// Client side, full-length prefix.
    pub client: IpNet,
    /// Endpoint side, full-length prefix.
    pub endpoint: IpNet,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseRow {
    service: String,
    /// (client, endpoint) prefixes.
    pairs: Vec<(IpNet, IpNet)>,
}

/// The allocator of the registry manager.
#[derive(Debug)]
pub struct Ipam {
    pools: BTreeMap<String, ServiceConfig>,
    leases: Arc<Table<LeaseRow>>,
}

fn host(a: IpAddr) -> IpNet {
    IpNet::from(a)
}

impl Ipam {
    /// Opens the allocator with the lease table in `dir` (memory only when `None`).
    ///
    /// # Errors
    /// The lease table cannot be read.
    pub fn open(dir: Option<&Path>, services: &[ServiceConfig]) -> Result<Ipam, StoreError> {
        Ok(Ipam {
            pools: services
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
            leases: Table::open(dir, "ipam-leases")?,
        })
    }

    /// The lease of `conn_id`, allocating it if new. A service without a pool
    /// gets an empty lease (a connection without addresses, as NSM allows).
    ///
    /// # Errors
    /// [`IpamError::Exhausted`] naming the service, or a store error.
    pub fn allocate(
        &self,
        service: &str,
        conn_id: &str,
        exclude: &[IpNet],
    ) -> Result<Vec<Pair>, IpamError> {
        self.allocate_within(service, conn_id, exclude, None)
    }

    /// As [`Ipam::allocate`], handing out only addresses inside `blocks`
    /// (`None`: anywhere in the pools). Cluster mode passes the blocks this
    /// node owns; [`IpamError::Exhausted`] then names the pool that needs
    /// another block.
    ///
    /// # Errors
    /// As [`Ipam::allocate`].
    pub fn allocate_within(
        &self,
        service: &str,
        conn_id: &str,
        exclude: &[IpNet],
        blocks: Option<&[IpNet]>,
    ) -> Result<Vec<Pair>, IpamError> {
        let Some(cfg) = self.pools.get(service) else {
            return Ok(Vec::new());
        };
        self.leases.update(|rows| {
            if let Some(row) = rows.get(conn_id)
                && row.service == service
            {
                return Ok(to_pairs(&row.pairs));
            }
            let mut used: HashSet<IpAddr> = HashSet::new();
            for (k, r) in rows.iter() {
                if k != conn_id {
                    for (c, e) in &r.pairs {
                        used.insert(c.addr());
                        used.insert(e.addr());
                    }
                }
            }
            let mut pairs = Vec::new();
            for pool in &cfg.cidr {
                let free = |a: &IpAddr| {
                    !used.contains(a)
                        && !cfg.excluded.iter().any(|x| x.contains(a))
                        && !exclude.iter().any(|x| x.contains(a))
                };
                let mut it = candidates(pool, blocks).filter(free);
                match (it.next(), it.next()) {
                    (Some(c), Some(e)) => pairs.push((host(c), host(e))),
                    _ => {
                        return Err(IpamError::Exhausted {
                            service: service.to_string(),
                            pool: *pool,
                        });
                    }
                }
            }
            rows.insert(
                conn_id.to_string(),
                LeaseRow {
                    service: service.to_string(),
                    pairs: pairs.clone(),
                },
            );
            Ok(to_pairs(&pairs))
        })
    }

    /// The pools of `service` (empty when it has none).
    pub fn pools_of(&self, service: &str) -> &[IpNet] {
        self.pools.get(service).map_or(&[], |c| &c.cidr)
    }

    /// Whether `block` (inside `pool`) has an address `service` could use,
    /// ignoring leases: a block that lies wholly in the excluded prefixes is
    /// not worth claiming.
    pub fn block_usable(&self, service: &str, pool: &IpNet, block: &IpNet) -> bool {
        let Some(cfg) = self.pools.get(service) else {
            return false;
        };
        candidates(pool, Some(std::slice::from_ref(block)))
            .any(|a| !cfg.excluded.iter().any(|x| x.contains(&a)))
    }

    /// Releases the lease of `conn_id` (no-op when unknown).
    ///
    /// # Errors
    /// A store error.
    pub fn release(&self, conn_id: &str) -> Result<(), IpamError> {
        self.leases.remove(conn_id)?;
        Ok(())
    }

    /// Number of leases held, for diagnostics and tests.
    pub fn lease_count(&self) -> usize {
        self.leases.all().len()
    }
}

/// Whether `pool` may hand out `a`: never its network address (IPv6's
/// subnet-router anycast address) nor an IPv4 pool's broadcast address,
/// except in the /31 and /32 (/127, /128) pools where every address is a host.
fn is_host(pool: &IpNet, a: &IpAddr) -> bool {
    let (len, max) = (pool.prefix_len(), pool.max_prefix_len());
    if len + 1 >= max {
        return true;
    }
    *a != pool.network() && (a.is_ipv6() || *a != pool.broadcast())
}

/// Every address of `net`, network and broadcast included.
fn all_addresses(net: &IpNet) -> ipnet::IpAddrRange {
    match net {
        IpNet::V4(n) => ipnet::Ipv4AddrRange::new(n.network(), n.broadcast()).into(),
        IpNet::V6(n) => ipnet::Ipv6AddrRange::new(n.network(), n.broadcast()).into(),
    }
}

/// The host addresses of `pool`, in order, inside `blocks` when given (the
/// parts of blocks outside the pool are ignored).
fn candidates<'a>(
    pool: &'a IpNet,
    blocks: Option<&'a [IpNet]>,
) -> Box<dyn Iterator<Item = IpAddr> + 'a> {
    let ranges: Vec<IpNet> = match blocks {
        None => vec![*pool],
        Some(bs) => {
            let mut v: Vec<IpNet> = bs
                .iter()
                .filter(|b| pool.contains(*b) || b.contains(pool))
                .map(|b| if b.contains(pool) { *pool } else { *b })
                .collect();
            v.sort();
            v.dedup();
            v
        }
    };
    Box::new(
        ranges
            .into_iter()
            .flat_map(|r| all_addresses(&r))
            .filter(move |a| is_host(pool, a)),
    )
}

fn to_pairs(v: &[(IpNet, IpNet)]) -> Vec<Pair> {
    v.iter()
        .map(|(c, e)| Pair {
            client: *c,
            endpoint: *e,
        })
        .collect()
}

/// Where a manager gets addresses: its own allocator or the registry manager's.
#[derive(Debug, Clone)]
pub enum IpamBackend {
    /// This manager owns the pools.
    Local(Arc<Ipam>),
    /// Ask the registry manager over `ManagePrefixes`.
    Remote(Channel),
    /// Cluster mode: this manager's blocks of the shared pools.
    Cluster(Arc<crate::cluster_ipam::ClusterIpam>),
}

fn md_request(
    req: PrefixRequest,
    service: &str,
    conn_id: &str,
) -> Result<Request<tokio_stream::Once<PrefixRequest>>, Status> {
    let mut r = Request::new(tokio_stream::once(req));
    let md = r.metadata_mut();
    md.insert(
        MD_SERVICE,
        service
            .parse()
            .map_err(|_| Status::invalid_argument("bad service name"))?,
    );
    md.insert(
        MD_CONNECTION_ID,
        conn_id
            .parse()
            .map_err(|_| Status::invalid_argument("bad connection id"))?,
    );
    Ok(r)
}

impl IpamBackend {
    /// See [`Ipam::allocate`].
    ///
    /// # Errors
    /// As [`Ipam::allocate`], or [`IpamError::Remote`].
    pub async fn allocate(
        &self,
        service: &str,
        conn_id: &str,
        exclude: &[IpNet],
    ) -> Result<Vec<Pair>, IpamError> {
        match self {
            IpamBackend::Local(ipam) => ipam.allocate(service, conn_id, exclude),
            IpamBackend::Cluster(c) => c.allocate(service, conn_id, exclude).await,
            IpamBackend::Remote(ch) => {
                let req = PrefixRequest {
                    r#type: Type::Allocate as i32,
                    prefix: String::new(),
                    exclude_prefixes: exclude.iter().map(ToString::to_string).collect(),
                };
                let r = md_request(req, service, conn_id).map_err(IpamError::Remote)?;
                let mut stream = IpamClient::new(ch.clone())
                    .manage_prefixes(r)
                    .await
                    .map_err(IpamError::Remote)?
                    .into_inner();
                let mut prefixes = Vec::new();
                while let Some(item) = stream.next().await {
                    let p = item.map_err(IpamError::Remote)?;
                    prefixes.push(p.prefix.parse::<IpNet>().map_err(|_| {
                        IpamError::Remote(Status::internal(format!(
                            "bad prefix `{}` in IPAM answer",
                            p.prefix
                        )))
                    })?);
                }
                if prefixes.len() % 2 != 0 {
                    return Err(IpamError::Remote(Status::internal(
                        "odd number of prefixes in IPAM answer",
                    )));
                }
                Ok(prefixes
                    .chunks(2)
                    .map(|c| Pair {
                        client: c[0],
                        endpoint: c[1],
                    })
                    .collect())
            }
        }
    }

    /// See [`Ipam::release`].
    ///
    /// # Errors
    /// As [`Ipam::release`], or [`IpamError::Remote`].
    pub async fn release(&self, service: &str, conn_id: &str) -> Result<(), IpamError> {
        match self {
            IpamBackend::Local(ipam) => ipam.release(conn_id),
            IpamBackend::Cluster(c) => c.release(conn_id),
            IpamBackend::Remote(ch) => {
                let req = PrefixRequest {
                    r#type: Type::Delete as i32,
                    ..Default::default()
                };
                let r = md_request(req, service, conn_id).map_err(IpamError::Remote)?;
                let mut stream = IpamClient::new(ch.clone())
                    .manage_prefixes(r)
                    .await
                    .map_err(IpamError::Remote)?
                    .into_inner();
                while let Some(item) = stream.next().await {
                    item.map_err(IpamError::Remote)?;
                }
                Ok(())
            }
        }
    }
}

/// The `ipam.IPAM` gRPC service of the registry manager.
#[derive(Debug, Clone)]
pub struct IpamServer {
    ipam: Arc<Ipam>,
}

impl IpamServer {
    /// Serves `ipam`.
    pub fn new(ipam: Arc<Ipam>) -> IpamServer {
        IpamServer { ipam }
    }
}

type PrefixStream = Pin<Box<dyn Stream<Item = Result<PrefixResponse, Status>> + Send>>;

#[tonic::async_trait]
impl IpamService for IpamServer {
    type ManagePrefixesStream = PrefixStream;

    async fn manage_prefixes(
        &self,
        request: Request<tonic::Streaming<PrefixRequest>>,
    ) -> Result<Response<Self::ManagePrefixesStream>, Status> {
        let md = |k: &str| {
            request
                .metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .ok_or_else(|| {
                    Status::invalid_argument(format!("IPAM stream needs metadata `{k}`"))
                })
        };
        let service = md(MD_SERVICE)?;
        let conn_id = md(MD_CONNECTION_ID)?;
        let mut input = request.into_inner();
        let first = input
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("IPAM stream sent no request"))??;
        let out: Vec<Result<PrefixResponse, Status>> = match Type::try_from(first.r#type) {
            Ok(Type::Allocate) => {
                let exclude = first
                    .exclude_prefixes
                    .iter()
                    .map(|p| {
                        p.parse::<IpNet>().map_err(|_| {
                            Status::invalid_argument(format!("bad exclude prefix `{p}`"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let pairs = self.ipam.allocate(&service, &conn_id, &exclude)?;
                pairs
                    .iter()
                    .flat_map(|p| [p.client, p.endpoint])
                    .map(|n| {
                        Ok(PrefixResponse {
                            prefix: n.to_string(),
                            exclude_prefixes: Vec::new(),
                        })
                    })
                    .collect()
            }
            Ok(Type::Delete) => {
                self.ipam.release(&conn_id)?;
                Vec::new()
            }
            _ => {
                return Err(Status::invalid_argument(
                    "PrefixRequest.type must be ALLOCATE or DELETE",
                ));
            }
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(out))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(cidr: &[&str], excluded: &[&str]) -> ServiceConfig {
        ServiceConfig {
            name: "s".into(),
            payload: crate::config::Payload::Ip,
            cidr: cidr.iter().map(|c| c.parse().unwrap()).collect(),
            excluded: excluded.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn pairs_are_unique_and_idempotent() {
        let ipam = Ipam::open(None, &[svc(&["10.0.0.0/24", "fd00::/120"], &[])]).unwrap();
        let a = ipam.allocate("s", "c1", &[]).unwrap();
        let b = ipam.allocate("s", "c2", &[]).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].client.to_string(), "10.0.0.1/32");
        assert_eq!(a[0].endpoint.to_string(), "10.0.0.2/32");
        assert_eq!(a[1].client.to_string(), "fd00::1/128");
        assert_eq!(a[1].endpoint.to_string(), "fd00::2/128");
        let mut all: Vec<IpAddr> = a
            .iter()
            .chain(&b)
            .flat_map(|p| [p.client.addr(), p.endpoint.addr()])
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "duplicate address");
        assert_eq!(
            ipam.allocate("s", "c1", &[]).unwrap(),
            a,
            "refresh keeps addresses"
        );
        assert!(ipam.allocate("none", "c3", &[]).unwrap().is_empty());
    }

    #[test]
    fn exhaustion_names_the_service_and_release_frees() {
        // A /30 has two usable hosts: one pair.
        let ipam = Ipam::open(None, &[svc(&["10.0.0.0/30"], &[])]).unwrap();
        ipam.allocate("s", "c1", &[]).unwrap();
        let e = ipam.allocate("s", "c2", &[]).unwrap_err();
        let st: Status = e.into();
        assert_eq!(st.code(), tonic::Code::ResourceExhausted);
        assert!(st.message().contains("`s`"), "{}", st.message());
        ipam.release("c1").unwrap();
        ipam.allocate("s", "c2", &[]).unwrap();
    }

    #[test]
    fn excluded_prefixes_are_honoured() {
        let ipam = Ipam::open(None, &[svc(&["10.0.0.0/28"], &["10.0.0.0/30"])]).unwrap();
        let a = ipam
            .allocate("s", "c1", &["10.0.0.4/31".parse().unwrap()])
            .unwrap();
        assert_eq!(a[0].client.to_string(), "10.0.0.6/32");
        assert_eq!(a[0].endpoint.to_string(), "10.0.0.7/32");
    }

    #[test]
    fn blocks_confine_allocation() {
        let ipam = Ipam::open(None, &[svc(&["10.0.0.0/24"], &[])]).unwrap();
        let none: [IpNet; 0] = [];
        let e = ipam
            .allocate_within("s", "c0", &[], Some(&none))
            .unwrap_err();
        assert!(
            matches!(e, IpamError::Exhausted { pool, .. } if pool.to_string() == "10.0.0.0/24")
        );
        // The pool's network address is never a host, even at a block's start.
        let first: [IpNet; 1] = ["10.0.0.0/30".parse().unwrap()];
        let a = ipam.allocate_within("s", "c1", &[], Some(&first)).unwrap();
        assert_eq!(a[0].client.to_string(), "10.0.0.1/32");
        assert_eq!(a[0].endpoint.to_string(), "10.0.0.2/32");
        // A block's own network and broadcast addresses are hosts of the pool.
        let mid: [IpNet; 1] = ["10.0.0.16/31".parse().unwrap()];
        let b = ipam.allocate_within("s", "c2", &[], Some(&mid)).unwrap();
        assert_eq!(b[0].client.to_string(), "10.0.0.16/32");
        assert_eq!(b[0].endpoint.to_string(), "10.0.0.17/32");
        // The pool's broadcast address is not.
        let last: [IpNet; 1] = ["10.0.0.254/31".parse().unwrap()];
        assert!(ipam.allocate_within("s", "c3", &[], Some(&last)).is_err());
        assert!(ipam.block_usable("s", &"10.0.0.0/24".parse().unwrap(), &last[0]));
    }

    #[test]
    fn leases_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let pools = [svc(&["10.0.0.0/24"], &[])];
        let a = Ipam::open(Some(dir.path()), &pools)
            .unwrap()
            .allocate("s", "c1", &[])
            .unwrap();
        let ipam = Ipam::open(Some(dir.path()), &pools).unwrap();
        assert_eq!(ipam.allocate("s", "c1", &[]).unwrap(), a);
        let b = ipam.allocate("s", "c2", &[]).unwrap();
        assert_ne!(a[0].client, b[0].client);
        assert_ne!(a[0].endpoint, b[0].client);
    }
}
