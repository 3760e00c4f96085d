//! The passthrough's `networkservice.NetworkService`: for each incoming
//! connection, an onward connection requested from the local manager and a
//! forwarding [`Link`] between the two interfaces.
//!
//! # Lifecycle of an incoming connection `C`
//! - First Request: build the onward request ([`onward::onward_request`]),
//!   send it to the manager (bounded by a timeout), and only if it succeeds
//!   start the link and reply. If it fails, the incoming Request fails with
//!   a status that names the onward failure, nothing is kept, and a
//!   best-effort Close is sent in case the manager did part of the work
//!   (e.g. it answered after our timeout).
//! - Later Requests for the same `C.id` are refreshes: the onward
//!   connection is re-sent as the manager last returned it (with `C`'s
//!   refreshed lifetimes, see [`onward::refresh_request`]), the link keeps
//!   running (no new thread or socket). A failed refresh fails the incoming
//!   Request but keeps the state: the connection still exists until it
//!   expires or is closed.
//! - Close: close the onward connection, stop the link, keep its counts in
//!   the totals. Closing an unknown connection succeeds (Close is
//!   idempotent in NSM).
//!
//! Requests and Closes for one `C.id` are serialised by a per-connection
//! async lock, so a refresh racing a Close cannot resurrect or leak state;
//! different connections never wait for each other.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
use nsm_proto::networkservice::network_service_server::NetworkService;
use tokio::sync::OwnedMutexGuard;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::engine::Link;
use crate::onward;
use crate::stats::StatsBook;

/// How a passthrough behaves.
#[derive(Debug, Clone)]
pub struct PassthroughConfig {
    /// Its NSE name (also the name of its path segment).
    pub name: String,
    /// The local manager's unix socket, where onward requests go.
    pub manager: PathBuf,
    /// `inodeURL` of this process's namespace, for both interfaces.
    pub inode_url: String,
    /// Bound on each onward Request or Close (default 20 s).
    pub onward_timeout: Duration,
    /// How long to wait for the interfaces before logging that they did not
    /// appear (default 30 s; the link keeps waiting).
    pub appear_timeout: Duration,
    /// Labels set on onward requests over the client's (default none). NSM
    /// composition by registry matches routes a passthrough's onward
    /// request by them (`source_selector: {app: firewall}`); policies plan
    /// with the client's labels whatever these are.
    pub onward_labels: std::collections::BTreeMap<String, String>,
}

impl PassthroughConfig {
    /// The defaults for NSE `name` behind the manager at `manager`, in this
    /// process's namespace.
    pub fn new(name: &str, manager: PathBuf) -> PassthroughConfig {
        PassthroughConfig {
            name: name.to_string(),
            manager,
            inode_url: nsm_manager::netns::own_url(),
            onward_timeout: Duration::from_secs(20),
            appear_timeout: Duration::from_secs(30),
            onward_labels: std::collections::BTreeMap::new(),
        }
    }
}

/// One incoming connection being passed through.
#[derive(Debug)]
struct Active {
    incoming_if: String,
    onward_if: String,
    /// The onward connection as the manager last returned it.
    onward: Connection,
    link: Link,
}

type Slot = Arc<tokio::sync::Mutex<Option<Active>>>;

#[derive(Debug)]
struct Inner {
    cfg: PassthroughConfig,
    client: NetworkServiceClient<Channel>,
    slots: Mutex<HashMap<String, Slot>>,
    /// Onward interface names in use (reserved before the onward request).
    ifnames: Mutex<HashSet<String>>,
    stats: Arc<StatsBook>,
}

/// The passthrough service (cheap to clone: it is shared state).
#[derive(Debug, Clone)]
pub struct Passthrough {
    inner: Arc<Inner>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Passthrough {
    /// A passthrough configured by `cfg`; it connects to the manager lazily.
    ///
    /// # Panics
    /// Outside a tokio runtime (as [`nsm_proto::uds::connect_unix_lazy`]).
    pub fn new(cfg: PassthroughConfig) -> Passthrough {
        let client = NetworkServiceClient::new(nsm_proto::uds::connect_unix_lazy(&cfg.manager));
        let stats = Arc::new(StatsBook::new(&cfg.name));
        Passthrough {
            inner: Arc::new(Inner {
                cfg,
                client,
                slots: Mutex::default(),
                ifnames: Mutex::default(),
                stats,
            }),
        }
    }

    /// The counters of every connection.
    pub fn stats(&self) -> &Arc<StatsBook> {
        &self.inner.stats
    }

    /// The incoming connection ids being passed through.
    pub fn connection_ids(&self) -> Vec<String> {
        locked(&self.inner.slots).keys().cloned().collect()
    }

    /// The onward connection of incoming connection `id`, as the manager
    /// last returned it.
    pub async fn onward_of(&self, id: &str) -> Option<Connection> {
        let slot = locked(&self.inner.slots).get(id).cloned()?;
        let g = slot.lock().await;
        g.as_ref().map(|a| a.onward.clone())
    }

    /// Closes every onward connection and stops every link (at shutdown).
    pub async fn close_all(&self) {
        let slots: Vec<(String, Slot)> = locked(&self.inner.slots).drain().collect();
        for (id, slot) in slots {
            if let Some(active) = slot.lock().await.take() {
                self.teardown(&id, active).await;
            }
        }
    }

    /// Locks the slot of `id`, creating it if needed; the returned slot is
    /// the one in the table (a slot removed while we waited is not used).
    async fn lock_slot(&self, id: &str) -> (Slot, OwnedMutexGuard<Option<Active>>) {
        loop {
            let slot = locked(&self.inner.slots)
                .entry(id.to_string())
                .or_default()
                .clone();
            let guard = slot.clone().lock_owned().await;
            if locked(&self.inner.slots)
                .get(id)
                .is_some_and(|s| Arc::ptr_eq(s, &slot))
            {
                return (slot, guard);
            }
        }
    }

    /// Removes `slot` from the table; call it while holding its lock.
    fn forget_slot(&self, id: &str, slot: &Slot) {
        let mut slots = locked(&self.inner.slots);
        if slots.get(id).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            slots.remove(id);
        }
    }

    fn reserve_ifname(&self, id: &str) -> String {
        let mut names = locked(&self.inner.ifnames);
        (0..)
            .map(|salt| onward::onward_ifname(id, salt))
            .find(|n| names.insert(n.clone()))
            .expect("finitely many names are taken")
    }

    fn release_ifname(&self, name: &str) {
        locked(&self.inner.ifnames).remove(name);
    }

    /// Sets the configured onward labels over the client's.
    fn label_onward(&self, req: &mut NetworkServiceRequest) {
        if let Some(c) = req.connection.as_mut() {
            for (k, v) in &self.inner.cfg.onward_labels {
                c.labels.insert(k.clone(), v.clone());
            }
        }
    }

    async fn send_onward(&self, req: NetworkServiceRequest) -> Result<Connection, Status> {
        let timeout = self.inner.cfg.onward_timeout;
        let mut r = Request::new(req);
        r.set_timeout(timeout);
        // The onward Request is a child of the incoming one: same trace.
        nsm_trace::inject(r.metadata_mut());
        let mut client = self.inner.client.clone();
        match tokio::time::timeout(timeout, client.request(r)).await {
            Ok(res) => res.map(Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {timeout:?}"
            ))),
        }
    }

    async fn close_onward(&self, conn: &Connection) -> Result<(), Status> {
        let timeout = self.inner.cfg.onward_timeout;
        let mut r = Request::new(conn.clone());
        r.set_timeout(timeout);
        nsm_trace::inject(r.metadata_mut());
        let mut client = self.inner.client.clone();
        match tokio::time::timeout(timeout, client.close(r)).await {
            Ok(res) => res.map(drop),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {timeout:?}"
            ))),
        }
    }

    /// The status of an incoming Request whose onward request failed.
    fn onward_failed(&self, incoming: &Connection, st: &Status) -> Status {
        Status::new(
            st.code(),
            format!(
                "passthrough `{}`: onward request for service `{}` through the manager at {} failed: {} ({:?})",
                self.inner.cfg.name,
                incoming.network_service,
                self.inner.cfg.manager.display(),
                st.message(),
                st.code()
            ),
        )
    }

    async fn teardown(&self, id: &str, active: Active) {
        if let Err(st) = self.close_onward(&active.onward).await {
            tracing::warn!(
                id,
                onward = %active.onward.id,
                error = %st.message(),
                code = ?st.code(),
                "closing the onward connection failed"
            );
        }
        let link = active.link;
        if tokio::task::spawn_blocking(move || drop(link.stop()))
            .await
            .is_err()
        {
            tracing::error!(id, "stopping the link failed");
        }
        self.inner.stats.retire(id);
        self.release_ifname(&active.onward_if);
        tracing::info!(id, onward = %active.onward.id, "closed");
    }

    /// Stops the link of `active` and starts one for `incoming_if` (the
    /// client's interface name changed in a refresh).
    async fn relink(&self, id: &str, active: &mut Active, incoming_if: &str) -> Result<(), Status> {
        let link = Link::spawn(
            incoming_if,
            &active.onward_if,
            self.inner.cfg.appear_timeout,
        )
        .map_err(|e| Status::internal(format!("starting the forwarding: {e}")))?;
        let old = std::mem::replace(&mut active.link, link);
        let _ = tokio::task::spawn_blocking(move || drop(old.stop())).await;
        self.inner.stats.retire(id);
        self.inner.stats.add(
            id,
            incoming_if,
            &active.onward_if,
            active.link.counters().clone(),
        );
        active.incoming_if = incoming_if.to_string();
        Ok(())
    }
}

#[tonic::async_trait]
impl NetworkService for Passthrough {
    async fn request(
        &self,
        r: Request<NetworkServiceRequest>,
    ) -> Result<Response<Connection>, Status> {
        let req = r.into_inner();
        let cfg = &self.inner.cfg;
        let conn = req
            .connection
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("request has no connection"))?;
        if conn.id.is_empty() {
            return Err(Status::invalid_argument("request has no connection id"));
        }
        nsm_trace::record_connection(conn);
        let (pref, incoming_if) = onward::incoming_kernel(&req)
            .map_err(|e| Status::invalid_argument(format!("passthrough `{}`: {e}", cfg.name)))?;
        let (slot, mut guard) = self.lock_slot(&conn.id).await;
        if let Some(active) = guard.as_mut() {
            let mut again =
                onward::refresh_request(&active.onward, conn, &active.onward_if, &cfg.inode_url);
            self.label_onward(&mut again);
            let back = self
                .send_onward(again)
                .await
                .map_err(|st| self.onward_failed(conn, &st))?;
            active.onward = back;
            if active.incoming_if != incoming_if {
                tracing::info!(id = %conn.id, from = %active.incoming_if, to = incoming_if, "incoming interface renamed");
                self.relink(&conn.id, active, incoming_if).await?;
            }
            tracing::debug!(id = %conn.id, "refreshed");
        } else {
            let segment_id = nsm_manager::util::uuid();
            let onward_if = self.reserve_ifname(&conn.id);
            let mut first =
                onward::onward_request(conn, &cfg.name, &segment_id, &onward_if, &cfg.inode_url);
            self.label_onward(&mut first);
            let sent = first.connection.clone().unwrap_or_default();
            let fail = |st: Status| {
                self.release_ifname(&onward_if);
                self.forget_slot(&conn.id, &slot);
                // The manager may have done part of the work (e.g. it
                // answered after our timeout): leave nothing behind.
                let this = self.clone();
                tokio::spawn(async move {
                    let _ = this.close_onward(&sent).await;
                });
                st
            };
            let back = match self.send_onward(first).await {
                Ok(back) => back,
                Err(st) => {
                    let st = self.onward_failed(conn, &st);
                    tracing::warn!(id = %conn.id, error = %st.message(), "onward request failed");
                    return Err(fail(st));
                }
            };
            let link = match Link::spawn(incoming_if, &onward_if, cfg.appear_timeout) {
                Ok(link) => link,
                Err(e) => {
                    return Err(fail(Status::internal(format!(
                        "passthrough `{}`: starting the forwarding: {e}",
                        cfg.name
                    ))));
                }
            };
            self.inner
                .stats
                .add(&conn.id, incoming_if, &onward_if, link.counters().clone());
            tracing::info!(
                id = %conn.id,
                onward = %back.id,
                endpoint = %back.network_service_endpoint_name,
                incoming_if,
                onward_if = %onward_if,
                "passing through"
            );
            *guard = Some(Active {
                incoming_if: incoming_if.to_string(),
                onward_if,
                onward: back,
                link,
            });
        }
        drop(guard);
        Ok(Response::new(onward::reply(
            conn.clone(),
            pref,
            &cfg.name,
            &cfg.inode_url,
        )))
    }

    async fn close(&self, r: Request<Connection>) -> Result<Response<()>, Status> {
        let conn = r.into_inner();
        nsm_trace::record_connection(&conn);
        let Some(slot) = locked(&self.inner.slots).get(&conn.id).cloned() else {
            tracing::debug!(id = %conn.id, "close of an unknown connection");
            return Ok(Response::new(()));
        };
        let mut guard = slot.lock().await;
        if let Some(active) = guard.take() {
            self.teardown(&conn.id, active).await;
        }
        // Only now, so that a Request that arrived meanwhile waits for the
        // teardown and then starts afresh.
        self.forget_slot(&conn.id, &slot);
        drop(guard);
        Ok(Response::new(()))
    }
}

#[cfg(test)]
mod tests;
