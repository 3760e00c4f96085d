//! Cluster-wide IPAM: every manager of a cluster allocates from the same
//! service pools without ever handing out an address twice.
//!
//! # Design
//! The pools (the `--config` file, one ConfigMap for every node) are cut
//! into blocks (/28 for IPv4, /124 for IPv6, or the whole pool when it is
//! smaller). A manager claims a block by *creating* an `IPAMBlock` object
//! named after it ([`nsm_k8s::crd::IPAMBlock::name_of`]): the API server
//! lets exactly one create of a name succeed, so a block has one owner in the
//! cluster whatever the races. Inside its blocks a manager allocates alone,
//! with the same durable lease table as the embedded mode ([`Ipam`]), so
//! per-connection addresses cost no API call, and the API server being away
//! only matters when a node needs a new block.
//!
//! The blocks a manager owns are kept in its store too: after a restart it
//! allocates in them at once, API server or not, and its connections keep
//! their leases. A manager that lost its store adopts the blocks the API
//! says are its own (same node name) before it claims new ones.
//!
//! Blocks are never given back by a running manager (a node that had
//! connections will likely have them again); deleting a node's blocks is an
//! operator's act once the node is gone for good (`kubectl delete ipamblocks
//! -l nsm-rs.io/node=NAME`).

use std::collections::BTreeMap;
use std::sync::Arc;

use ipnet::IpNet;
use kube::api::{Api, ListParams, PostParams};
use nsm_k8s::crd::{IPAMBlock, IPAMBlockSpec};
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::ipam::{Ipam, IpamError, Pair};
use crate::store::{StoreError, Table};

/// Prefix length of an IPv4 block: 16 addresses, 8 connections.
pub const BLOCK_LEN_V4: u8 = 28;
/// Prefix length of an IPv6 block.
pub const BLOCK_LEN_V6: u8 = 124;
/// Label naming the owner node of a block object (for `kubectl -l`).
pub const NODE_LABEL: &str = "nsm-rs.io/node";

/// A block this manager owns, as kept in its store.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OwnedBlock {
    cidr: IpNet,
    service: String,
}

/// The allocator of a manager in cluster mode.
pub struct ClusterIpam {
    ipam: Arc<Ipam>,
    /// Block object name -> block.
    owned: Arc<Table<OwnedBlock>>,
    api: Api<IPAMBlock>,
    node: String,
    /// One claim at a time: two connections needing a block must not claim two.
    claiming: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ClusterIpam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterIpam")
            .field("node", &self.node)
            .field("blocks", &self.blocks())
            .finish_non_exhaustive()
    }
}

/// The block length for `pool`: the family's block, or the pool itself.
fn block_len(pool: &IpNet) -> u8 {
    let want = if pool.addr().is_ipv4() {
        BLOCK_LEN_V4
    } else {
        BLOCK_LEN_V6
    };
    want.max(pool.prefix_len())
}

fn api_error(what: &str, e: &kube::Error) -> IpamError {
    let s = crate::cluster::api_status(what, e);
    IpamError::Remote(Status::new(s.code(), s.message().to_string()))
}

impl ClusterIpam {
    /// The allocator of node `node`: leases and owned blocks in `dir` (memory
    /// only when `None`), block objects in `namespace`.
    ///
    /// # Errors
    /// The store cannot be opened.
    pub fn open(
        ipam: Arc<Ipam>,
        dir: Option<&std::path::Path>,
        client: kube::Client,
        namespace: &str,
        node: &str,
    ) -> Result<ClusterIpam, StoreError> {
        Ok(ClusterIpam {
            ipam,
            owned: Table::open(dir, "ipam-blocks")?,
            api: Api::namespaced(client, namespace),
            node: node.to_string(),
            claiming: tokio::sync::Mutex::new(()),
        })
    }

    /// The blocks this manager owns, in order.
    pub fn blocks(&self) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = self.owned.all().into_iter().map(|(_, b)| b.cidr).collect();
        v.sort();
        v
    }

    /// The lease of `conn_id` (see [`Ipam::allocate`]), from this node's
    /// blocks, claiming a new block of a pool when those are full.
    ///
    /// # Errors
    /// [`IpamError::Exhausted`] when every block of a pool is owned and
    /// full; [`IpamError::Remote`] when a block is needed and the API server
    /// cannot give one; a store error.
    pub async fn allocate(
        &self,
        service: &str,
        conn_id: &str,
        exclude: &[IpNet],
    ) -> Result<Vec<Pair>, IpamError> {
        // Each round either allocates or claims one more block of a pool, so
        // a bound only guards against a pool whose blocks all turn out unusable.
        for _ in 0..64 {
            let blocks = self.blocks();
            match self
                .ipam
                .allocate_within(service, conn_id, exclude, Some(&blocks))
            {
                Err(IpamError::Exhausted { pool, .. }) => {
                    let _one = self.claiming.lock().await;
                    if self.blocks() != blocks {
                        continue; // someone claimed meanwhile: try again first
                    }
                    self.claim(service, &pool).await?;
                }
                r => return r,
            }
        }
        Err(IpamError::Remote(Status::resource_exhausted(format!(
            "network service `{service}`: no block with a usable address could be claimed"
        ))))
    }

    /// Releases the lease of `conn_id`; the block stays this node's.
    ///
    /// # Errors
    /// A store error.
    pub fn release(&self, conn_id: &str) -> Result<(), IpamError> {
        self.ipam.release(conn_id)
    }

    /// Claims the first free block of `pool`, or adopts one the API says is
    /// already ours. Exhausted when every block is someone's.
    async fn claim(&self, service: &str, pool: &IpNet) -> Result<(), IpamError> {
        let existing: BTreeMap<String, IPAMBlockSpec> = self
            .api
            .list(&ListParams::default())
            .await
            .map_err(|e| api_error("list IPAM blocks", &e))?
            .into_iter()
            .filter_map(|b| Some((b.metadata.name?, b.spec)))
            .collect();
        let len = block_len(pool);
        let subnets = pool.subnets(len).map_err(|_| IpamError::Exhausted {
            service: service.to_string(),
            pool: *pool,
        })?;
        for block in subnets {
            let name = IPAMBlock::name_of(&block);
            if self.owned.get(&name).is_some() {
                continue;
            }
            if !self.ipam.block_usable(service, pool, &block) {
                continue;
            }
            match existing.get(&name) {
                Some(spec) if spec.node == self.node => {
                    // Ours from before a lost store: take it back.
                    tracing::info!(block = %block, "adopting IPAM block owned by this node");
                    return self.remember(name, block, service);
                }
                Some(_) => continue,
                None => {}
            }
            let mut obj = IPAMBlock::new(
                &name,
                IPAMBlockSpec {
                    cidr: block.to_string(),
                    node: self.node.clone(),
                    service: service.to_string(),
                },
            );
            obj.metadata.labels = Some([(NODE_LABEL.to_string(), self.node.clone())].into());
            match self.api.create(&PostParams::default(), &obj).await {
                Ok(_) => {
                    tracing::info!(block = %block, service, "claimed IPAM block");
                    return self.remember(name, block, service);
                }
                // Another node won this one: on to the next.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(api_error(&format!("claim IPAM block {block}"), &e)),
            }
        }
        Err(IpamError::Exhausted {
            service: service.to_string(),
            pool: *pool,
        })
    }

    fn remember(&self, name: String, cidr: IpNet, service: &str) -> Result<(), IpamError> {
        self.owned.put(
            &name,
            OwnedBlock {
                cidr,
                service: service.to_string(),
            },
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_length_is_the_family_block_or_the_pool() {
        assert_eq!(block_len(&"172.31.0.0/16".parse().unwrap()), 28);
        assert_eq!(block_len(&"172.31.0.0/30".parse().unwrap()), 30);
        assert_eq!(block_len(&"fd00::/64".parse().unwrap()), 124);
        assert_eq!(block_len(&"fd00::/126".parse().unwrap()), 126);
    }
}
