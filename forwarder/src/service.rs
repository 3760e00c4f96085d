//! The gRPC API (`nsm.forwarder.v1.Forwarder`) and the registry of
//! cross-connects behind it.
//!
//! The registry is control-plane state only: what the manager asked for,
//! which pod devices (ports) and keys belong to each cross-connect. Program
//! and Remove of one id run one at a time and in order (a lock per id);
//! the packet threads never wait for either, because every change reaches
//! the data plane as a closure run between two batches
//! ([`WorkerHandle::call`]).
//!
//! The registry's own lock is held for the bookkeeping, not for the slow
//! kernel work, so that many connections set up or torn down at once
//! overlap it:
//! - A new cross-connect's devices are made with the registry let go (about
//!   2 ms each: a thread in the pod's namespace, the device, netlink), both
//!   sides at once; their names are reserved meanwhile, so another id asking
//!   for one is refused AlreadyExists as if it existed. An update makes its
//!   devices in order, under the lock.
//! - A removed cross-connect's devices are deleted after the registry is let
//!   go (closing their fds takes 15 to 20 ms each, in RCU grace periods, and
//!   overlaps freely). Remove still returns only once its devices are gone,
//!   and a Program reusing one of their names waits for that.
//!
//! Workers: each packet thread owns a shard of the cross-connects (its own
//! `Dataplane`, its own WireGuard socket on port `--wireguard-port + k`).
//! A new cross-connect goes to the worker with the fewest; it stays there
//! across updates, and its status tells the peer which port to send to.
//!
//! Program either completes or leaves nothing behind: each step that made
//! something (a device, a port, a cross-connect) is undone, in reverse,
//! when a later one fails. An update that only fills in or changes the
//! WireGuard side keeps the devices, key, counters and session; one that
//! changes a pod side (addresses, routes, MTU, ...) recreates the devices,
//! and if that fails the cross-connect is removed (and a DELETE published)
//! rather than left half-updated. The key of an id survives every update.
//!
//! A Program that changes only the chain (same sides, a cross-connect
//! already in the data plane) touches nothing else: the new chain is built
//! here, swapped in with one control closure, and the old one comes back to
//! be dropped here. A refused chain changes nothing (it is refused while
//! parsing, or while building, before the swap). A `fault` delay travels
//! with its chain: delay lines built here, installed on side A's port in
//! the same closure (see `worker`).
//!
//! Events: Program and Remove publish UPDATE/DELETE; a state monitor
//! publishes state changes (handshake done, session expired, pod gone);
//! each Watch adds its own periodic counter UPDATEs. All are published
//! under the registry lock, so they reach watchers in order.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nsm_dataplane::{
    FarEnd, MacAddr, Payload, PodEnd, PortId, PortKind, TapConfig, WgPeer, XconnCounters,
    XconnSnapshot, XconnSpec, XconnStatus,
};
use nsm_proto::forwarder::v1 as pb;
use nsm_proto::forwarder::v1::forwarder_server::Forwarder;
use tokio::sync::{Mutex, broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::chain;
use crate::keys::{self, PrivateKey};
use crate::plan::{self, KernelPlan, Plan, Refusal, SidePlan};
use crate::pod;
use crate::worker::{PortDelay, WorkerHandle, close_devices};

/// Smallest Watch counters interval honoured.
pub const MIN_COUNTERS_INTERVAL: Duration = Duration::from_millis(100);

/// Static facts about this forwarder.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Forwarder name.
    pub name: String,
    /// Underlay address.
    pub underlay_ip: IpAddr,
    /// WireGuard UDP port of worker 0; worker k listens on this + k.
    pub wireguard_port: u16,
    /// Underlay MTU, bytes.
    pub underlay_mtu: u32,
    /// Lanes offered to a cross-node connection without a chain
    /// (`--lanes`, at most the packet threads).
    pub lanes: usize,
}

impl Identity {
    /// Pod MTU when a request leaves it at 0: the underlay's minus the
    /// WireGuard overhead for the underlay's family.
    pub fn derived_mtu(&self) -> u32 {
        use nsm_proto::mechanisms::wireguard::{OVERHEAD_IPV4, OVERHEAD_IPV6};
        let overhead = if self.underlay_ip.is_ipv4() {
            OVERHEAD_IPV4
        } else {
            OVERHEAD_IPV6
        };
        self.underlay_mtu.saturating_sub(overhead)
    }
}

/// A pod device we made for one side.
#[derive(Debug, Clone, Copy)]
struct PodState {
    port: PortId,
}

/// Lane k >= 1 of a cross-node connection (lane 0 is the entry's own
/// `worker` and pod port): a queue of the pod interface, served by
/// `worker`, whose data plane holds the lane's WireGuard session under the
/// cross-connect's id (each packet thread has its own data plane, so one id
/// names one lane on each). Lane k is on worker (lane 0's + k) mod workers.
#[derive(Debug, Clone)]
struct Lane {
    worker: usize,
    /// The pod interface's queue for this lane.
    port: PortId,
    /// Set while the lane is programmed in `worker`'s data plane.
    counters: Option<XconnCounters>,
}

#[derive(Debug)]
struct Entry {
    /// The last request accepted, to answer a repeat without work.
    request: pb::CrossConnect,
    plan: Plan,
    /// Per side (source, destination): the device, for kernel sides.
    pods: [Option<PodState>; 2],
    /// This cross-connect's WireGuard key, when a side is WireGuard.
    key: Option<PrivateKey>,
    /// Set while the cross-connect is programmed in the data plane (a
    /// WireGuard side waits for the peer's key before it is).
    counters: Option<XconnCounters>,
    mtu: u32,
    /// Which side is the data plane's side A (always a kernel side).
    a_is_source: bool,
    /// The chain in force in the data plane (`None` while not programmed
    /// there); its mirror drains run as long as it is kept.
    chain: Option<chain::Installed>,
    /// The packet thread that owns this cross-connect (index into
    /// `Shared::workers`): lane 0's.
    worker: usize,
    /// Lanes 1 and up, for a cross-node connection with several.
    lanes: Vec<Lane>,
    /// What lanes dropped since carried, so that the totals never go back.
    retired: XconnSnapshot,
}

/// A pod interface by (namespace `(st_dev, st_ino)`, name).
type IfaceKey = ((u64, u64), String);

fn iface_key(k: &KernelPlan) -> IfaceKey {
    (k.netns.id, k.name.clone())
}

/// A removed cross-connect whose devices' fds are still being closed.
#[derive(Debug)]
struct Closing {
    id: String,
    /// Its pod interfaces.
    ifaces: Vec<IfaceKey>,
    /// Locked until the close is done.
    done: Arc<Mutex<()>>,
}

#[derive(Debug, Default)]
struct Registry {
    entries: BTreeMap<String, Entry>,
    free_ports: Vec<u32>,
    next_port: u32,
    /// Removed cross-connects whose devices are still being closed. Remove
    /// closes them after letting go of the registry, so that removals
    /// overlap the kernel's deletions; a Program that makes one of their
    /// names again, or a second Remove of the id, waits for the close
    /// ([`Registry::wait_closed`]).
    closing: Vec<Closing>,
    /// Interface names a Program of a new cross-connect is creating with
    /// the registry let go, by id: no other id may take them meanwhile.
    creating: Vec<(String, Vec<IfaceKey>)>,
}

impl Registry {
    fn alloc_port(&mut self) -> PortId {
        PortId(self.free_ports.pop().unwrap_or_else(|| {
            self.next_port += 1;
            self.next_port - 1
        }))
    }

    fn free_port(&mut self, p: PortId) {
        self.free_ports.push(p.0);
    }

    /// Forgets the closes that are done.
    fn prune_closed(&mut self) {
        self.closing.retain(|c| c.done.try_lock().is_err());
    }

    /// The closes still under way among those `which` selects.
    fn closes(&mut self, which: impl Fn(&Closing) -> bool) -> Vec<Arc<Mutex<()>>> {
        self.prune_closed();
        self.closing
            .iter()
            .filter(|c| which(c))
            .map(|c| Arc::clone(&c.done))
            .collect()
    }

    /// Waits until the close of every removed cross-connect `which`
    /// selects is done. The closer does not need the registry, so waiting
    /// while holding it is safe.
    async fn wait_closed(&mut self, which: impl Fn(&Closing) -> bool) {
        wait_all(self.closes(which)).await;
    }
}

/// Every fd of the devices a Program made (for [`close_devices`]).
fn device_fds(made: [Option<pod::Created>; 2]) -> Vec<OwnedFd> {
    made.into_iter()
        .flatten()
        .flat_map(pod::Created::into_fds)
        .collect()
}

/// Waits until each of `closes` is done.
async fn wait_all(closes: Vec<Arc<Mutex<()>>>) {
    for done in closes {
        drop(done.lock().await);
    }
}

#[derive(Debug)]
struct Shared {
    identity: Identity,
    /// One lock per cross-connect id with a Program or Remove under way:
    /// they run one at a time and in order per id, while the registry lock
    /// is let go for the slow steps (making and deleting devices), so that
    /// different ids proceed at once.
    id_locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// One per packet thread; worker k owns WireGuard port base + k.
    workers: Vec<WorkerHandle>,
    registry: Mutex<Registry>,
    events: broadcast::Sender<pb::CrossConnectEvent>,
    /// Set on shutdown: ends Watch streams, which would otherwise keep
    /// the server's graceful shutdown waiting forever.
    shutdown: tokio::sync::watch::Sender<bool>,
    /// The state last published for each id (by Program or the state
    /// monitor), so that the monitor reports exactly the changes.
    reported: Mutex<HashMap<String, i32>>,
}

/// The gRPC service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ForwarderService {
    shared: Arc<Shared>,
}

impl ForwarderService {
    /// A service programming the packet threads behind `workers` (at least
    /// one; worker k serves WireGuard on `identity.wireguard_port + k`).
    ///
    /// # Panics
    /// When `workers` is empty.
    pub fn new(identity: Identity, workers: Vec<WorkerHandle>) -> Self {
        assert!(!workers.is_empty(), "a forwarder needs a packet thread");
        let (events, _) = broadcast::channel(1024);
        ForwarderService {
            shared: Arc::new(Shared {
                identity,
                workers,
                id_locks: std::sync::Mutex::new(HashMap::new()),
                registry: Mutex::new(Registry::default()),
                events,
                shutdown: tokio::sync::watch::Sender::new(false),
                reported: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Watches state changes (a handshake completing, a session expiring, a
    /// pod going away) and publishes them as UPDATE events, every `period`.
    /// It keeps its baseline even while nobody watches, so a change that
    /// happens right after a Watch's snapshot is still reported. Runs until
    /// shutdown.
    pub fn spawn_state_monitor(&self, period: Duration) {
        let svc = self.clone();
        let mut shutdown = self.shared.shutdown.subscribe();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = ticker.tick() => {}
                }
                // The registry lock is held until the event is out:
                // Program and Remove publish under it too, so events never
                // go out of order.
                let reg = svc.shared.registry.lock().await;
                let all = svc.statuses(&reg, &[]).await;
                let mut changed = Vec::new();
                let mut reported = svc.shared.reported.lock().await;
                for st in all {
                    // An id not yet reported is being programmed right
                    // now: its Program publishes it.
                    if let Some(prev) = reported.get_mut(&st.id)
                        && *prev != st.state
                    {
                        *prev = st.state;
                        changed.push(st);
                    }
                }
                drop(reported);
                if !changed.is_empty() {
                    let _ = svc.shared.events.send(pb::CrossConnectEvent {
                        r#type: pb::cross_connect_event::Type::Update as i32,
                        cross_connects: changed,
                    });
                }
                drop(reg);
            }
        });
    }

    /// Packet threads, and the sum of their own I/O error counts.
    pub fn io_totals(&self) -> (usize, crate::worker::IoTotals) {
        let w = &self.shared.workers;
        let sum = w
            .iter()
            .map(|h| h.io.snapshot())
            .fold(crate::worker::IoTotals::default(), |a, b| a + b);
        (w.len(), sum)
    }

    /// Ends every Watch stream; call when the server starts shutting down.
    pub fn begin_shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }

    /// The lock of cross-connect `id` (see `Shared::id_locks`).
    fn lock_for(&self, id: &str) -> Arc<Mutex<()>> {
        let mut locks = self
            .shared
            .id_locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Only ids with an operation under way (or queued) are kept.
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        Arc::clone(locks.entry(id.to_string()).or_default())
    }

    /// The packet thread of worker `i`.
    fn worker(&self, i: usize) -> &WorkerHandle {
        // Entries only hold indices below the count, fixed at start.
        &self.shared.workers[i.min(self.shared.workers.len() - 1)]
    }

    /// The worker owning the fewest cross-connects (the lowest index on a
    /// tie, so a lone connection always gets the first port).
    fn least_loaded(&self, reg: &Registry) -> usize {
        let mut load = vec![0usize; self.shared.workers.len()];
        for e in reg.entries.values() {
            for w in std::iter::once(e.worker).chain(e.lanes.iter().map(|l| l.worker)) {
                if let Some(n) = load.get_mut(w) {
                    *n += 1;
                }
            }
        }
        (0..load.len()).min_by_key(|&i| (load[i], i)).unwrap_or(0)
    }

    /// The lanes a cross-connect of `plan` may have (see
    /// `CrossConnectStatus.lanes`): our `--lanes` for a kernel side facing
    /// a WireGuard side without a chain, cut to the peer's count once the
    /// peer is known (a peer that names no lane ports has one).
    fn lane_offer(&self, plan: &Plan) -> usize {
        let Some(wg) = plan.wireguard() else {
            return 1;
        };
        if !plan.chain.spec.functions.is_empty() {
            return 1;
        }
        let ours = self
            .shared
            .identity
            .lanes
            .clamp(1, self.shared.workers.len());
        if wg.peer_public.is_some() {
            ours.min(wg.lane_ports.len().max(1))
        } else {
            ours
        }
    }

    /// Takes lanes `lanes` of cross-connect `id` out of their packet
    /// threads and returns their queues' fds, for the caller to close.
    async fn detach_lanes(&self, reg: &mut Registry, id: &str, lanes: &[Lane]) -> Vec<OwnedFd> {
        let mut fds = Vec::new();
        for lane in lanes {
            let (id_owned, port) = (id.to_string(), lane.port);
            let r = self
                .worker(lane.worker)
                .call(move |core| {
                    let _ = core.dp.remove_xconnect(&id_owned);
                    core.remove_port(port)
                })
                .await;
            reg.free_port(lane.port);
            match r {
                Ok(fd) => fds.extend(fd),
                Err(_) => tracing::error!(xconn = id, "packet thread gone while removing a lane"),
            }
        }
        fds
    }

    /// Removes every cross-connect (used on shutdown).
    pub async fn remove_all(&self) {
        let ids: Vec<String> = self
            .shared
            .registry
            .lock()
            .await
            .entries
            .keys()
            .cloned()
            .collect();
        // At once: their device deletions overlap (see `Registry::closing`).
        futures_util::future::join_all(ids.iter().map(|id| self.remove_id(id))).await;
    }

    async fn remove_id(&self, id: &str) -> Result<(), Status> {
        let id_lock = self.lock_for(id);
        let _one_at_a_time = id_lock.lock().await;
        let mut reg = self.shared.registry.lock().await;
        let Some(entry) = reg.entries.remove(id) else {
            // Removed already; maybe its devices are still being deleted.
            reg.wait_closed(|c| c.id == id).await;
            return Ok(());
        };
        let fds = self.detach(&mut reg, id, &entry).await;
        // The devices are deleted after the registry is let go (see
        // `Registry::closing`); Remove still returns only once they are.
        let done = Arc::new(Mutex::new(()));
        let closed = Arc::clone(&done).lock_owned().await;
        reg.prune_closed();
        reg.closing.push(Closing {
            id: id.to_string(),
            ifaces: kernel_sides(&entry.plan)
                .map(|k| (k.netns.id, k.name.clone()))
                .collect(),
            done,
        });
        tracing::info!(xconn = id, "cross-connect removed");
        self.shared.reported.lock().await.remove(id);
        // Published under the registry lock: see `spawn_state_monitor`.
        let _ = self.shared.events.send(pb::CrossConnectEvent {
            r#type: pb::cross_connect_event::Type::Delete as i32,
            cross_connects: vec![pb::CrossConnectStatus {
                id: id.to_string(),
                ..Default::default()
            }],
        });
        drop(reg);
        close_devices(fds).await;
        drop(closed);
        Ok(())
    }

    /// Takes `entry` out of the data plane and returns its devices' fds, for
    /// the caller to close ([`close_devices`]).
    async fn detach(&self, reg: &mut Registry, id: &str, entry: &Entry) -> Vec<OwnedFd> {
        let ports: Vec<PortId> = entry.pods.iter().flatten().map(|p| p.port).collect();
        let id_owned = id.to_string();
        let ports_c = ports.clone();
        // The chain comes back to be dropped here, off the packet thread.
        let r = self
            .worker(entry.worker)
            .call(move |core| {
                let chain = core.dp.remove_xconnect(&id_owned).ok();
                let mut delays = Vec::new();
                let mut fds = Vec::new();
                for p in ports_c {
                    delays.push(core.set_delay(p, PortDelay::none()));
                    fds.extend(core.remove_port(p));
                }
                (chain, delays, fds)
            })
            .await;
        for p in ports {
            reg.free_port(p);
        }
        let mut fds = match r {
            Ok((_chain, _delays, fds)) => fds,
            Err(_) => {
                tracing::error!(xconn = id, "packet thread gone while removing");
                Vec::new()
            }
        };
        fds.extend(self.detach_lanes(reg, id, &entry.lanes).await);
        fds
    }

    async fn program_inner(
        &self,
        req: pb::CrossConnect,
    ) -> Result<pb::CrossConnectStatus, Refusal> {
        let plan = plan::parse(&req)?;
        let id = plan.id.clone();
        let id_lock = self.lock_for(&id);
        let _one_at_a_time = id_lock.lock().await;
        let mut reg = self.shared.registry.lock().await;

        if let Some(e) = reg.entries.get(&id)
            && e.request == req
        {
            // The same request again: same result, nothing to do.
            let st = self.statuses(&reg, std::slice::from_ref(&id)).await;
            return Ok(st.into_iter().next().unwrap_or_default());
        }

        // An interface name may be used once per namespace, counting the
        // names of cross-connects whose devices are being made.
        let taken = reg
            .creating
            .iter()
            .map(|(other, names)| (other, names.clone(), "is being created for"))
            .chain(
                reg.entries
                    .iter()
                    .filter(|(other, _)| **other != id)
                    .map(|(other, e)| {
                        let names = kernel_sides(&e.plan).map(iface_key).collect();
                        (other, names, "is already used by")
                    }),
            );
        for (other_id, names, how) in taken {
            if let Some(k) = kernel_sides(&plan).find(|k| names.contains(&iface_key(k))) {
                return Err(Refusal::new(
                    tonic::Code::AlreadyExists,
                    format!(
                        "interface {} in {} {how} cross-connect {other_id}",
                        k.name,
                        k.netns.path.display()
                    ),
                ));
            }
        }

        // A connection with several lanes takes a chain the long way
        // below, which drops it to one lane (a chain's state is per
        // connection).
        if let Some(old) = reg.entries.get(&id)
            && old.counters.is_some()
            && old.lanes.is_empty()
            && old.plan.source == plan.source
            && old.plan.destination == plan.destination
        {
            return self.swap_chain(reg, req, plan).await;
        }

        let mtu = plan.effective_mtu(self.shared.identity.derived_mtu());
        let lanes_wanted = self.lane_offer(&plan);
        // A new cross-connect's devices are made with the registry let go
        // (a couple of milliseconds each, most of a Program's time), their
        // names reserved meanwhile; an update makes them below, in order.
        let mut made_early: [Option<pod::Created>; 2] = [None, None];
        if !reg.entries.contains_key(&id) {
            let names: Vec<IfaceKey> = kernel_sides(&plan).map(iface_key).collect();
            let closes = reg.closes(|c| c.ifaces.iter().any(|n| names.contains(n)));
            reg.creating.push((id.clone(), names));
            drop(reg);
            wait_all(closes).await;
            let made = self.create_devices(&plan, mtu, &id, lanes_wanted).await;
            reg = self.shared.registry.lock().await;
            reg.creating.retain(|(i, _)| *i != id);
            made_early = match made {
                Ok(m) => m,
                Err(e) => return Err(e),
            };
        }

        // Built before anything is touched, so that a chain that cannot be
        // built (a mirror file that cannot be created) changes nothing.
        let built = build_chain(&plan.chain, &id, mtu).await;
        let (new_chain, installed, delay) = match built {
            Ok(b) => b,
            Err(e) => {
                close_devices(device_fds(made_early)).await;
                return Err(e);
            }
        };

        // A cross-connect keeps its worker for life: its session and
        // devices live there.
        let w = match reg.entries.get(&id) {
            Some(e) => e.worker,
            None => self.least_loaded(&reg),
        };
        let worker = self.worker(w).clone();

        // An update that changes a pod side is carried out as remove +
        // create; one that only changes a WireGuard side (typically: the
        // peer's key arrives) keeps the devices and the session state.
        let mut key = None;
        let mut reused: [Option<PodState>; 2] = [None, None];
        let mut lanes: Vec<Lane> = Vec::new();
        let mut retired = XconnSnapshot::default();
        let mut prev_counters = None;
        // An update takes the old entry out of the registry: if the rest
        // fails, the cross-connect is gone and watchers must hear so.
        let existed = reg.entries.contains_key(&id);
        // The old chain's mirrors keep draining until the new chain is in.
        let mut old_installed = None;
        if let Some(mut old) = reg.entries.remove(&id) {
            old_installed = old.chain.take();
            let same_pods = plan
                .sides()
                .iter()
                .zip(old.plan.sides())
                .all(|(n, o)| match (n, o) {
                    (SidePlan::Kernel(a), SidePlan::Kernel(b)) => a == b,
                    (SidePlan::Wireguard(_), SidePlan::Wireguard(_)) => true,
                    _ => false,
                })
                && plan.effective_mtu(self.shared.identity.derived_mtu()) == old.mtu;
            key = old.key.clone();
            if same_pods {
                reused = old.pods;
                prev_counters = old.counters.clone();
                // Lanes never grow (the device keeps its queues); they
                // shrink to what the peer or a chain now allows.
                let keep = old.lanes.len().min(lanes_wanted.saturating_sub(1));
                let gone = old.lanes.split_off(keep);
                retired = gone
                    .iter()
                    .filter_map(|l| l.counters.as_ref())
                    .fold(old.retired, |sum, c| sum + c.snapshot());
                if !gone.is_empty() {
                    let fds = self.detach_lanes(&mut reg, &id, &gone).await;
                    close_devices(fds).await;
                    tracing::info!(xconn = %id, lanes = keep + 1, "cross-connect has fewer lanes");
                }
                lanes = std::mem::take(&mut old.lanes);
            } else {
                let fds = self.detach(&mut reg, &id, &old).await;
                close_devices(fds).await;
            }
        }
        let has_wg = plan.wireguard().is_some();
        if has_wg && key.is_none() {
            key = Some(PrivateKey::generate().map_err(|e| {
                Refusal::new(tonic::Code::Internal, format!("generating a key: {e}"))
            })?);
        }
        if !has_wg {
            key = None;
        }
        let a_is_source = matches!(plan.source, SidePlan::Kernel(_));

        // Create missing devices, each registered with the packet thread.
        let mut pods = reused;
        let mut made: Vec<PortId> = Vec::new();
        for (i, side) in plan.sides().into_iter().enumerate() {
            let SidePlan::Kernel(k) = side else { continue };
            if pods[i].is_some() {
                continue;
            }
            let created = match made_early[i].take() {
                Some(c) => c,
                None => {
                    reg.wait_closed(|c| c.ifaces.contains(&iface_key(k))).await;
                    match pod::create(k, mtu, &id, lanes_wanted).await {
                        Ok(c) => c,
                        Err(e) => {
                            self.undo_ports(&mut reg, w, &made).await;
                            close_devices(device_fds(made_early)).await;
                            return Err(self.failed_update(existed, &id, e).await);
                        }
                    }
                }
            };
            let port = reg.alloc_port();
            let kind = port_kind(k, port);
            let (fd, offload) = (created.fd, created.offload);
            let mut queues = created.extra_queues.into_iter();
            if let Err(e) = self.add_port(w, port, kind, fd, offload).await {
                reg.free_port(port);
                self.undo_ports(&mut reg, w, &made).await;
                let mut fds: Vec<OwnedFd> = queues.collect();
                fds.extend(device_fds(made_early));
                close_devices(fds).await;
                let e = Refusal::new(
                    tonic::Code::Internal,
                    format!("registering interface {}: {e}", k.name),
                );
                return Err(self.failed_update(existed, &id, e).await);
            }
            made.push(port);
            pods[i] = Some(PodState { port });
            // The device's other queues, one lane each, on the next
            // threads (the kind is lane 0's: a TAP answers with one MAC).
            let workers = self.shared.workers.len();
            while let Some(fd) = queues.next() {
                let lane_worker = (w + lanes.len() + 1) % workers;
                let lane_port = reg.alloc_port();
                let added = self
                    .add_port(lane_worker, lane_port, kind, fd, offload)
                    .await;
                if let Err(e) = added {
                    reg.free_port(lane_port);
                    self.undo_program(&mut reg, w, &id, &made, &lanes).await;
                    let mut fds: Vec<OwnedFd> = queues.collect();
                    fds.extend(device_fds(made_early));
                    close_devices(fds).await;
                    let e = Refusal::new(
                        tonic::Code::Internal,
                        format!("registering lane {} of {}: {e}", lanes.len() + 1, k.name),
                    );
                    return Err(self.failed_update(existed, &id, e).await);
                }
                lanes.push(Lane {
                    worker: lane_worker,
                    port: lane_port,
                    counters: None,
                });
            }
        }

        // Program the data plane once every side is known.
        // From here on a failure must also undo reused devices: the old
        // entry is already out of the registry.
        let all_ports: Vec<PortId> = pods.iter().flatten().map(|p| p.port).collect();
        let specs = build_spec(&plan, &pods, key.as_ref(), mtu, a_is_source).and_then(|spec| {
            let lane_specs = lanes
                .iter()
                .enumerate()
                .map(|(k, lane)| match &spec {
                    Some(spec) => lane_spec(spec, &plan, k + 1, lane.port).map(Some),
                    None => Ok(None),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((spec, lane_specs))
        });
        let (spec, lane_specs) = match specs {
            Ok(s) => s,
            Err(e) => {
                self.undo_program(&mut reg, w, &id, &all_ports, &lanes)
                    .await;
                return Err(self.failed_update(existed, &id, e).await);
            }
        };
        let id_c = id.clone();
        let programmed = spec.is_some();
        // The chain (and its delay, on side A's port: always a kernel side)
        // goes in with the cross-connect, in the same closure, so no packet
        // passes the new cross-connect without it. Whatever comes back (the
        // old ones, or the new ones unused) is dropped here, off the packet
        // thread.
        let a_port = pods[if a_is_source { 0 } else { 1 }].map(|p| p.port);
        let programmed_a = worker
            .call(move |core| match spec {
                Some(spec) => {
                    let is_wg = matches!(spec.b, FarEnd::Wireguard(_));
                    let r = core.dp.upsert_xconnect(&id_c, spec).map(Some);
                    let (back, old_delay) = match (&r, a_port) {
                        (Ok(_), Some(port)) => (
                            core.dp.set_chain(&id_c, new_chain).ok(),
                            core.set_delay(port, delay),
                        ),
                        _ => (Some(new_chain), Some(delay)),
                    };
                    let old_delay = [old_delay, None];
                    if r.is_ok() && is_wg {
                        core.initiate_handshake(&id_c);
                    }
                    (r, back, old_delay)
                }
                None => {
                    // Not complete (any more): keep the devices, drop
                    // traffic until the peer's key arrives.
                    let old = core.dp.remove_xconnect(&id_c).ok();
                    let old_delay = a_port.and_then(|p| core.set_delay(p, PortDelay::none()));
                    (Ok(None), old.or(Some(new_chain)), [old_delay, Some(delay)])
                }
            })
            .await;
        drop(old_installed);
        let mut result = match programmed_a {
            Ok((r, _unused_chain, _unused_delay)) => {
                r.map_err(|e| (tonic::Code::FailedPrecondition, e.to_string()))
            }
            Err(gone) => Err((tonic::Code::Internal, gone.to_string())),
        };
        // Then lanes 1 and up, each in its own packet thread, with the same
        // id (there is one lane per thread) and an empty chain (a lane never
        // has a chain).
        if result.is_ok() {
            for (lane, spec) in lanes.iter_mut().zip(lane_specs) {
                let id_c = id.clone();
                let r = self
                    .worker(lane.worker)
                    .call(move |core| match spec {
                        Some(spec) => {
                            let r = core.dp.upsert_xconnect(&id_c, spec);
                            if r.is_ok() {
                                core.initiate_handshake(&id_c);
                            }
                            r.map(Some)
                        }
                        None => {
                            let _ = core.dp.remove_xconnect(&id_c);
                            Ok(None)
                        }
                    })
                    .await;
                match r {
                    Ok(Ok(c)) => lane.counters = c.or(lane.counters.take()),
                    Ok(Err(e)) => result = Err((tonic::Code::FailedPrecondition, e.to_string())),
                    Err(gone) => result = Err((tonic::Code::Internal, gone.to_string())),
                }
                if result.is_err() {
                    break;
                }
            }
        }
        let counters = match result {
            Ok(c) => c.or(prev_counters),
            Err((code, e)) => {
                self.undo_program(&mut reg, w, &id, &all_ports, &lanes)
                    .await;
                let e = Refusal::new(code, e);
                return Err(self.failed_update(existed, &id, e).await);
            }
        };

        reg.entries.insert(
            id.clone(),
            Entry {
                request: req,
                plan,
                pods,
                key,
                counters,
                mtu,
                a_is_source,
                chain: programmed.then_some(installed),
                worker: w,
                lanes,
                retired,
            },
        );
        let st = self.statuses(&reg, std::slice::from_ref(&id)).await;
        let status = st.into_iter().next().unwrap_or_default();
        tracing::info!(xconn = %id, state = status.state, mtu, "cross-connect programmed");
        self.shared
            .reported
            .lock()
            .await
            .insert(id.clone(), status.state);
        // Published under the registry lock: see `spawn_state_monitor`.
        let _ = self.shared.events.send(pb::CrossConnectEvent {
            r#type: pb::cross_connect_event::Type::Update as i32,
            cross_connects: vec![status.clone()],
        });
        drop(reg);
        Ok(status)
    }

    /// Makes the devices of `plan`'s kernel sides, both at once, indexed by
    /// side (source, destination). On a failure none is left.
    async fn create_devices(
        &self,
        plan: &Plan,
        mtu: u32,
        id: &str,
        queues: usize,
    ) -> Result<[Option<pod::Created>; 2], Refusal> {
        let make = async |side: &SidePlan| match side {
            SidePlan::Kernel(k) => pod::create(k, mtu, id, queues).await.map(Some),
            SidePlan::Wireguard(_) => Ok(None),
        };
        let [source, destination] = plan.sides();
        match tokio::join!(make(source), make(destination)) {
            (Ok(a), Ok(b)) => Ok([a, b]),
            (a, b) => {
                let (made, err): (Vec<_>, Vec<_>) = [a, b].into_iter().partition(Result::is_ok);
                let fds = made
                    .into_iter()
                    .flatten()
                    .flatten()
                    .flat_map(pod::Created::into_fds)
                    .collect();
                close_devices(fds).await;
                Err(err
                    .into_iter()
                    .find_map(Result::err)
                    .unwrap_or_else(|| Refusal::new(tonic::Code::Internal, "creating devices")))
            }
        }
    }

    /// The chain-only update: builds `plan`'s chain here, swaps it in
    /// between two batches and drops the old one here. The devices, the
    /// WireGuard session and the cross-connect counters stay as they are.
    async fn swap_chain(
        &self,
        mut reg: tokio::sync::MutexGuard<'_, Registry>,
        req: pb::CrossConnect,
        plan: Plan,
    ) -> Result<pb::CrossConnectStatus, Refusal> {
        let id = plan.id.clone();
        if reg
            .entries
            .get(&id)
            .is_some_and(|e| e.plan.chain == plan.chain)
        {
            // Nothing to rebuild (e.g. the same namespace by another path):
            // keep the chain and its state.
            if let Some(e) = reg.entries.get_mut(&id) {
                e.request = req;
                e.plan = plan;
            }
            let st = self.statuses(&reg, std::slice::from_ref(&id)).await;
            return Ok(st.into_iter().next().unwrap_or_default());
        }
        let Some(entry) = reg.entries.get(&id) else {
            return Err(Refusal::new(tonic::Code::Internal, "entry vanished"));
        };
        let a_port = entry.pods[if entry.a_is_source { 0 } else { 1 }].map(|p| p.port);
        let (new_chain, installed, delay) = build_chain(&plan.chain, &id, entry.mtu).await?;
        let id_c = id.clone();
        // Chain and delay change together, between two batches; what they
        // replace comes back to be dropped here.
        let (old_chain, old_delay) = self
            .worker(entry.worker)
            .call(move |core| {
                let old = core.dp.set_chain(&id_c, new_chain);
                let old_delay = match (&old, a_port) {
                    (Ok(_), Some(p)) => core.set_delay(p, delay),
                    _ => Some(delay),
                };
                (old, old_delay)
            })
            .await
            .map_err(|e| Refusal::new(tonic::Code::Internal, e.to_string()))?;
        drop(old_delay);
        drop(old_chain.map_err(|e| Refusal::new(tonic::Code::Internal, e.to_string()))?);
        let Some(entry) = reg.entries.get_mut(&id) else {
            return Err(Refusal::new(tonic::Code::Internal, "entry vanished"));
        };
        // The old mirrors stop after a last pass over their rings: the
        // packet thread no longer writes to them.
        drop(entry.chain.replace(installed));
        entry.request = req;
        entry.plan = plan;
        let st = self.statuses(&reg, std::slice::from_ref(&id)).await;
        let status = st.into_iter().next().unwrap_or_default();
        tracing::info!(xconn = %id, functions = status.functions.len(), "chain swapped");
        self.shared
            .reported
            .lock()
            .await
            .insert(id.clone(), status.state);
        // Published under the registry lock: see `spawn_state_monitor`.
        let _ = self.shared.events.send(pb::CrossConnectEvent {
            r#type: pb::cross_connect_event::Type::Update as i32,
            cross_connects: vec![status.clone()],
        });
        drop(reg);
        Ok(status)
    }

    /// A Program failed after an earlier version of `id` was taken out (an
    /// update replaces the whole cross-connect when it fails half-way, so
    /// that nothing is left half-made): tell watchers it is gone. Returns `err` for the caller.
    async fn failed_update(&self, gone: bool, id: &str, err: Refusal) -> Refusal {
        if gone {
            tracing::warn!(xconn = id, "update failed; the cross-connect is removed");
            self.shared.reported.lock().await.remove(id);
            let _ = self.shared.events.send(pb::CrossConnectEvent {
                r#type: pb::cross_connect_event::Type::Delete as i32,
                cross_connects: vec![pb::CrossConnectStatus {
                    id: id.to_string(),
                    ..Default::default()
                }],
            });
        }
        err
    }

    /// Undoes a Program of `id` that failed once its devices were
    /// registered: takes lane 0's cross-connect out of worker `w`'s data
    /// plane (a reused device's may still be there), forgets `ports` on
    /// `w` and every lane of `lanes`, and closes their devices.
    async fn undo_program(
        &self,
        reg: &mut Registry,
        w: usize,
        id: &str,
        ports: &[PortId],
        lanes: &[Lane],
    ) {
        let id_c = id.to_string();
        let _ = self
            .worker(w)
            .call(move |core| core.dp.remove_xconnect(&id_c).map(drop))
            .await;
        self.undo_ports(reg, w, ports).await;
        let fds = self.detach_lanes(reg, id, lanes).await;
        close_devices(fds).await;
    }

    /// Registers pod device queue `fd` as `port` with packet thread `w`.
    async fn add_port(
        &self,
        w: usize,
        port: PortId,
        kind: PortKind,
        fd: OwnedFd,
        offload: bool,
    ) -> Result<(), String> {
        self.worker(w)
            .call(move |core| core.add_port(port, kind, fd, offload))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
    }

    /// Forgets ports made on worker `w` by a Program that then failed
    /// (closing them deletes their devices).
    async fn undo_ports(&self, reg: &mut Registry, w: usize, ports: &[PortId]) {
        let ps = ports.to_vec();
        let fds = self
            .worker(w)
            .call(move |core| {
                let fds: Vec<_> = ps
                    .into_iter()
                    .rev()
                    .filter_map(|p| core.remove_port(p))
                    .collect();
                fds
            })
            .await;
        close_devices(fds.unwrap_or_default()).await;
        for p in ports {
            reg.free_port(*p);
        }
    }

    /// Statuses of `ids` (every entry when empty), in id order.
    async fn statuses(&self, reg: &Registry, ids: &[String]) -> Vec<pb::CrossConnectStatus> {
        let entries: Vec<(&String, &Entry)> = if ids.is_empty() {
            reg.entries.iter().collect()
        } else {
            ids.iter()
                .filter_map(|id| reg.entries.get_key_value(id))
                .collect()
        };
        if entries.is_empty() {
            return Vec::new();
        }
        // One trip to each packet thread for all of its entries: WireGuard
        // state (kept on the packet thread, not readable from here) and
        // whether a device died under us.
        let now = Instant::now();
        // Per entry: each lane's data-plane status, and whether a device died.
        let mut live: Vec<(Vec<Option<XconnStatus>>, bool)> = entries
            .iter()
            .map(|(_, e)| (vec![None; 1 + e.lanes.len()], false))
            .collect();
        for (w, handle) in self.shared.workers.iter().enumerate() {
            // (entry, lane, id, programmed with WireGuard, its ports)
            let query: Vec<(usize, usize, String, bool, Vec<PortId>)> = entries
                .iter()
                .enumerate()
                .flat_map(|(i, (id, e))| {
                    let lane0 = (e.worker == w).then(|| {
                        let wg = e.counters.is_some() && e.key.is_some();
                        let ports = e.pods.iter().flatten().map(|p| p.port).collect();
                        (i, 0, (*id).clone(), wg, ports)
                    });
                    let others = e
                        .lanes
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| l.worker == w)
                        .map(move |(k, l)| {
                            let wg = l.counters.is_some() && e.key.is_some();
                            (i, k + 1, (*id).clone(), wg, vec![l.port])
                        });
                    lane0.into_iter().chain(others)
                })
                .collect();
            if query.is_empty() {
                continue;
            }
            let answers = handle
                .call(move |core| {
                    query
                        .iter()
                        .map(|(i, lane, id, wg, ports)| {
                            let st = if *wg { core.dp.status(id, now) } else { None };
                            (*i, *lane, st, ports.iter().any(|p| core.is_dead(*p)))
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
            for (i, lane, st, dead) in answers {
                if let Some((lanes, d)) = live.get_mut(i) {
                    if let Some(slot) = lanes.get_mut(lane) {
                        *slot = st;
                    }
                    *d |= dead;
                }
            }
        }
        let wall = SystemTime::now();
        let ident = &self.shared.identity;
        entries
            .iter()
            .enumerate()
            .map(|(i, (id, e))| {
                let (dps, dead) = live.get(i).map_or((&[][..], false), |(l, d)| (&l[..], *d));
                let dead = dead || kernel_sides(&e.plan).any(|k| !netns_alive(k));
                status_of(id, e, dps, dead, ident, now, wall)
            })
            .collect()
    }
}

/// [`chain::build`] on a blocking thread: a large ACL takes a while to
/// index, and the runtime's threads also serve the other RPCs.
/// The delay lines (for pods of `mtu`) are allocated there too. The empty
/// chain (most connections) is built here: the hand-off would cost more.
async fn build_chain(
    plan: &plan::ChainPlan,
    id: &str,
    mtu: u32,
) -> Result<(nsm_dataplane::Chain, chain::Installed, PortDelay), Refusal> {
    let build = move |plan: &plan::ChainPlan, id: &str| {
        chain::build(plan, id).map(|(c, i)| {
            let d = i.port_delay(mtu);
            (c, i, d)
        })
    };
    if plan.spec.functions.is_empty() {
        return build(plan, id);
    }
    let (plan, id) = (plan.clone(), id.to_string());
    tokio::task::spawn_blocking(move || build(&plan, &id))
        .await
        .map_err(|e| Refusal::new(tonic::Code::Internal, format!("building the chain: {e}")))?
}

/// Whether the pod's namespace is still the one we created the device in.
/// Our device fd keeps a deleted namespace alive, so the device never
/// fails by itself: the sign that the pod is gone is its path vanishing
/// (`/run/netns/NAME` deleted, `/proc/PID/ns/net` of a dead process) or
/// naming another namespace (a reused PID).
fn netns_alive(k: &KernelPlan) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(&k.netns.path).is_ok_and(|m| (m.dev(), m.ino()) == k.netns.id)
}

fn kernel_sides(p: &Plan) -> impl Iterator<Item = &KernelPlan> {
    p.sides().into_iter().filter_map(|s| match s {
        SidePlan::Kernel(k) => Some(k),
        SidePlan::Wireguard(_) => None,
    })
}

/// A locally administered MAC for the data plane's side of a TAP when the
/// manager gave no neighbour: unique per port on this node.
fn synthetic_mac(port: PortId) -> MacAddr {
    let b = port.0.to_be_bytes();
    MacAddr([0x02, 0xfe, b[0], b[1], b[2], b[3]])
}

fn port_kind(k: &KernelPlan, port: PortId) -> PortKind {
    if !k.tap {
        return PortKind::Tun;
    }
    // The pod has a static neighbour entry for its peer: answer and send
    // with that MAC, or the pod would see two.
    let peer_mac = k
        .neighbors
        .first()
        .map(|(_, m)| *m)
        .unwrap_or_else(|| synthetic_mac(port));
    PortKind::Tap(TapConfig {
        peer_mac,
        pod_mac: k.mac,
    })
}

/// The pod's view of its peer: neighbour entries first, then next hops,
/// then link-scope host routes, then (same node) the other pod's own
/// addresses.
fn pod_end(k: &KernelPlan, port: PortId, other: Option<&KernelPlan>) -> PodEnd {
    let mut ips: Vec<IpAddr> = k.neighbors.iter().map(|(ip, _)| *ip).collect();
    ips.extend(k.routes.iter().filter_map(|r| r.next_hop));
    // A link-scope route to a single address is the point-to-point peer
    // itself: NSM's point-to-point IPAM gives each side a /32 (or /128)
    // route to the other, and that is all a cross-node TAP pod knows of it.
    ips.extend(
        k.routes
            .iter()
            .filter(|r| r.next_hop.is_none() && r.prefix.prefix_len() == r.prefix.max_prefix_len())
            .map(|r| r.prefix.addr()),
    );
    if let Some(o) = other {
        ips.extend(o.addresses.iter().map(|n| n.addr()));
    }
    let (peer_ipv4, peer_ipv6) = plan::first_addrs(ips.into_iter());
    PodEnd {
        port,
        peer_ipv4,
        peer_ipv6,
    }
}

/// Lane `k`'s copy of lane 0's `spec`: its own queue `port`, and the
/// peer's lane `k` as the WireGuard endpoint.
fn lane_spec(spec: &XconnSpec, plan: &Plan, k: usize, port: PortId) -> Result<XconnSpec, Refusal> {
    let mut spec = spec.clone();
    spec.a.port = port;
    if let FarEnd::Wireguard(peer) = &mut spec.b {
        let lane_port = plan
            .wireguard()
            .and_then(|w| w.lane_ports.get(k).copied())
            .ok_or_else(|| {
                Refusal::new(tonic::Code::Internal, format!("lane {k} has no peer port"))
            })?;
        peer.endpoint.set_port(lane_port);
    }
    Ok(spec)
}

/// The data plane's view of `plan`, or `None` while a WireGuard side lacks
/// the peer's key.
fn build_spec(
    plan: &Plan,
    pods: &[Option<PodState>; 2],
    key: Option<&PrivateKey>,
    mtu: u32,
    a_is_source: bool,
) -> Result<Option<XconnSpec>, Refusal> {
    let mtu16 = u16::try_from(mtu)
        .map_err(|_| Refusal::invalid(format!("MTU {mtu} does not fit the data plane")))?;
    let (ai, bi) = if a_is_source { (0, 1) } else { (1, 0) };
    let sides = plan.sides();
    let SidePlan::Kernel(ak) = sides[ai] else {
        return Err(Refusal::invalid("no kernel side"));
    };
    let a_port = pods[ai]
        .ok_or_else(|| Refusal::new(tonic::Code::Internal, "kernel side without a device"))?
        .port;
    let payload = if ak.tap {
        Payload::Ethernet
    } else {
        Payload::Ip
    };
    let (a, b) = match sides[bi] {
        SidePlan::Kernel(bk) => {
            let b_port = pods[bi]
                .ok_or_else(|| Refusal::new(tonic::Code::Internal, "kernel side without a device"))?
                .port;
            (
                pod_end(ak, a_port, Some(bk)),
                FarEnd::Pod(pod_end(bk, b_port, Some(ak))),
            )
        }
        SidePlan::Wireguard(w) => {
            let (Some(peer_public), Some(endpoint), Some(key)) = (w.peer_public, w.peer, key)
            else {
                return Ok(None);
            };
            (
                pod_end(ak, a_port, None),
                FarEnd::Wireguard(WgPeer {
                    local_private: key.secret().clone(),
                    peer_public,
                    preshared_key: None,
                    endpoint,
                    persistent_keepalive: w.keepalive,
                }),
            )
        }
    };
    Ok(Some(XconnSpec {
        payload,
        mtu: mtu16,
        a,
        b,
    }))
}

/// Whether a connection's lanes, by their WireGuard sessions (`None`: not
/// programmed), make it up (the first) or down (the second); neither is
/// pending.
///
/// Up while a lane has a session and every lane has had one (a lane that
/// never made a handshake black-holes the flows the kernel hashes to it);
/// down once every lane's session expired. A lane that carries no flow lets
/// its session expire, as an idle connection does, and makes a new one with
/// its next packet: that is not down. With one lane: up with a session,
/// down once it expired.
fn sessions_state(lanes: &[Option<&nsm_dataplane::WgStatus>]) -> (bool, bool) {
    let established = lanes.iter().any(|w| w.is_some_and(|w| w.established))
        && lanes
            .iter()
            .all(|w| w.is_some_and(|w| w.established || w.last_handshake.is_some()));
    let expired = !lanes.is_empty() && lanes.iter().all(|w| w.is_some_and(|w| w.expired));
    (established, expired)
}

/// The status of entry `e` from each lane's data-plane status `dps` (lane
/// 0 first; a lane that is not programmed has `None`).
fn status_of(
    id: &str,
    e: &Entry,
    dps: &[Option<XconnStatus>],
    dead: bool,
    ident: &Identity,
    now: Instant,
    wall: SystemTime,
) -> pb::CrossConnectStatus {
    use pb::cross_connect_status::State;
    let wg = e.key.is_some();
    let lane_wg = |k: usize| {
        dps.get(k)
            .and_then(Option::as_ref)
            .and_then(|s| s.wireguard.as_ref())
    };
    let lane_count = 1 + e.lanes.len();
    let (established, expired) = sessions_state(&(0..lane_count).map(lane_wg).collect::<Vec<_>>());
    let (state, error) = if dead {
        (
            State::Down,
            "a pod interface went away (its namespace was deleted?)".to_string(),
        )
    } else if !wg {
        (State::Up, String::new())
    } else if e.counters.is_none() {
        (State::Pending, String::new())
    } else if expired {
        (
            State::Down,
            "WireGuard session expired without a new handshake".to_string(),
        )
    } else if established {
        (State::Up, String::new())
    } else {
        (State::Pending, String::new())
    };
    let last_handshake_unix_ms = (0..lane_count)
        .filter_map(|k| lane_wg(k).and_then(|w| w.last_handshake))
        .max()
        .and_then(|t| wall.checked_sub(now.saturating_duration_since(t)))
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    // Each lane's counters read once, so that the lanes add up to the
    // total; the proto counts at the source side.
    let source_side = |snap: &XconnSnapshot| if e.a_is_source { snap.a } else { snap.b };
    let lane_snaps: Vec<Option<XconnSnapshot>> = std::iter::once(&e.counters)
        .chain(e.lanes.iter().map(|l| &l.counters))
        .map(|c| c.as_ref().map(XconnCounters::snapshot))
        .collect();
    let total = lane_snaps
        .iter()
        .flatten()
        .copied()
        .reduce(|a, b| a + b)
        .map(|t| t + e.retired);
    let counters = total.map(|snap| {
        let side = source_side(&snap);
        pb::Counters {
            rx_packets: side.rx_packets,
            rx_bytes: side.rx_bytes,
            tx_packets: side.tx_packets,
            tx_bytes: side.tx_bytes,
            drops: snap
                .drops
                .nonzero()
                .map(|(r, n)| (r.as_str().to_string(), n))
                .collect(),
            last_handshake_unix_ms,
        }
    });
    let port_of =
        |worker: usize| u32::from(ident.wireguard_port) + u32::try_from(worker).unwrap_or(0);
    let lanes = if wg {
        std::iter::once(e.worker)
            .chain(e.lanes.iter().map(|l| l.worker))
            .zip(&lane_snaps)
            .enumerate()
            .map(|(k, (worker, snap))| {
                let side = snap.as_ref().map(source_side).unwrap_or_default();
                pb::Lane {
                    wireguard_port: port_of(worker),
                    rx_packets: side.rx_packets,
                    rx_bytes: side.rx_bytes,
                    tx_packets: side.tx_packets,
                    tx_bytes: side.tx_bytes,
                    established: lane_wg(k).is_some_and(|w| w.established),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    pb::CrossConnectStatus {
        id: id.to_string(),
        state: state as i32,
        wireguard_public_key: e
            .key
            .as_ref()
            .map(|k| keys::format_public(&k.public()))
            .unwrap_or_default(),
        wireguard_port: if wg { port_of(e.worker) } else { 0 },
        underlay_ip: if wg {
            ident.underlay_ip.to_string()
        } else {
            String::new()
        },
        mtu: e.mtu,
        counters: Some(counters.unwrap_or_default()),
        error,
        functions: e
            .chain
            .as_ref()
            .map(chain::Installed::counters)
            .unwrap_or_default(),
        lanes,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::CrossConnectEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Forwarder for ForwarderService {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::ForwarderInfo>, Status> {
        let i = &self.shared.identity;
        Ok(Response::new(pb::ForwarderInfo {
            name: i.name.clone(),
            underlay_ip: i.underlay_ip.to_string(),
            wireguard_port: u32::from(i.wireguard_port),
            underlay_mtu: i.underlay_mtu,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn program(
        &self,
        request: Request<pb::CrossConnect>,
    ) -> Result<Response<pb::CrossConnectStatus>, Status> {
        let req = request.into_inner();
        let id = req.id.clone();
        nsm_trace::record_id(&id);
        // Carried out in a task of its own: a caller that goes away (and
        // with it this future) must not stop a Program halfway, with names
        // reserved or devices made and not yet registered.
        let this = self.clone();
        let task = tokio::spawn(
            async move { this.program_inner(req).await }.instrument(tracing::Span::current()),
        );
        let done = task.await.unwrap_or_else(|e| {
            Err(Refusal::new(
                tonic::Code::Internal,
                format!("program task: {e}"),
            ))
        });
        match done {
            Ok(st) => Ok(Response::new(st)),
            Err(e) => {
                tracing::warn!(xconn = %id, code = ?e.code, error = %e.message, "program refused");
                Err(e.into())
            }
        }
    }

    async fn remove(&self, request: Request<pb::RemoveRequest>) -> Result<Response<()>, Status> {
        let id = request.into_inner().id;
        nsm_trace::record_id(&id);
        // In a task of its own, as Program (a Remove must not stop halfway).
        let this = self.clone();
        let task = tokio::spawn(
            async move { this.remove_id(&id).await }.instrument(tracing::Span::current()),
        );
        task.await
            .map_err(|e| Status::internal(format!("remove task: {e}")))??;
        Ok(Response::new(()))
    }

    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let reg = self.shared.registry.lock().await;
        let cross_connects = self.statuses(&reg, &[]).await;
        Ok(Response::new(pb::ListResponse { cross_connects }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let interval_ms = request.into_inner().counters_interval_ms;
        let (tx, rx) = mpsc::channel(64);
        // Subscribe before the snapshot is taken (under the registry lock),
        // so no change falls between the two.
        let (mut events, snapshot) = {
            let reg = self.shared.registry.lock().await;
            let events = self.shared.events.subscribe();
            (events, self.statuses(&reg, &[]).await)
        };
        let svc = self.clone();
        let mut shutdown = self.shared.shutdown.subscribe();
        tokio::spawn(async move {
            let first = pb::CrossConnectEvent {
                r#type: pb::cross_connect_event::Type::Snapshot as i32,
                cross_connects: snapshot,
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let period = (interval_ms > 0)
                .then(|| Duration::from_millis(u64::from(interval_ms)).max(MIN_COUNTERS_INTERVAL));
            let mut ticker = tokio::time::interval(period.unwrap_or(Duration::from_secs(3600)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                let ev = tokio::select! {
                    _ = tx.closed() => return,
                    _ = shutdown.changed() => return,
                    ev = events.recv() => match ev {
                        Ok(ev) => ev,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            // Too slow a reader: resynchronise with a snapshot.
                            let reg = svc.shared.registry.lock().await;
                            pb::CrossConnectEvent {
                                r#type: pb::cross_connect_event::Type::Snapshot as i32,
                                cross_connects: svc.statuses(&reg, &[]).await,
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = ticker.tick(), if period.is_some() => {
                        let reg = svc.shared.registry.lock().await;
                        let all = svc.statuses(&reg, &[]).await;
                        drop(reg);
                        if all.is_empty() {
                            continue;
                        }
                        pb::CrossConnectEvent {
                            r#type: pb::cross_connect_event::Type::Update as i32,
                            cross_connects: all,
                        }
                    }
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_dataplane::{PublicKey, StaticSecret, WgStatus};

    fn session(established: bool, handshake: bool, expired: bool) -> WgStatus {
        let key = PublicKey::from(&StaticSecret::from([7u8; 32]));
        WgStatus {
            local_public_key: key,
            peer_public_key: key,
            endpoint: "192.0.2.1:51820".parse().expect("addr"),
            established,
            last_handshake: handshake.then(Instant::now),
            expired,
            tx_bytes: 0,
            rx_bytes: 0,
            estimated_loss: 0.0,
            rtt_ms: None,
            queued: 0,
        }
    }

    #[test]
    fn lanes_are_up_with_a_session_and_down_when_all_expired() {
        let up = session(true, true, false);
        let idle = session(false, true, true);
        let never = session(false, false, false);
        let state = sessions_state;
        // One lane: as before lanes.
        assert_eq!(state(&[Some(&up)]), (true, false));
        assert_eq!(state(&[Some(&idle)]), (false, true));
        assert_eq!(state(&[Some(&never)]), (false, false));
        assert_eq!(state(&[None]), (false, false));
        // A lane without flows expires; the connection stays up.
        assert_eq!(state(&[Some(&up), Some(&idle)]), (true, false));
        assert_eq!(state(&[Some(&idle), Some(&up)]), (true, false));
        // A lane that never made a handshake keeps it pending.
        assert_eq!(state(&[Some(&up), Some(&never)]), (false, false));
        assert_eq!(state(&[Some(&up), None]), (false, false));
        // Every lane expired: down.
        assert_eq!(state(&[Some(&idle), Some(&idle)]), (false, true));
    }
}
