//! Pod-side interfaces: a TUN (IP payload) or TAP (Ethernet payload) device
//! created *inside* the pod's network namespace and configured there over
//! netlink.
//!
//! # Why a thread per interface
//! `setns(2)` moves only the calling thread. Each creation runs on a fresh,
//! short-lived thread that enters the pod's namespace, opens the device
//! (the namespace is fixed when `/dev/net/tun` is opened), opens a netlink
//! socket (bound to the same namespace for its whole life), configures the
//! device and exits. The forwarder's own threads never leave the node's
//! namespace, and the fd works from any thread afterwards.
//!
//! # Why netlink and not `ip`
//! Spawning `ip` a handful of times per connection is what makes NSM take
//! seconds per client at scale; a netlink request is a syscall. A whole
//! interface (create, MTU, alias, addresses, up, routes, neighbours) takes
//! about a millisecond.
//!
//! # Lifetime and restart
//! The devices are not persistent (no `TUNSETPERSIST`): the kernel deletes
//! one when the last fd to it is closed. Removing a cross-connect closes its
//! fds, and when the forwarder process dies, for any reason, the kernel
//! closes them and every pod interface it made disappears with it: a
//! restarted forwarder finds nothing of its predecessor to clean up (the
//! integration tests check both). Each device also carries the ifalias
//! `nsm-rs:<cross-connect id>` so an operator can tell ours apart.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::OwnedFd;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::plan::{KernelPlan, Refusal};
use crate::sys;

/// Prefix of the ifalias on every device the forwarder creates.
pub const ALIAS_PREFIX: &str = "nsm-rs:";

/// A created, configured pod interface. Dropping the fd deletes it.
#[derive(Debug)]
pub struct Created {
    /// The device's fd (non-blocking, close-on-exec): its first queue.
    pub fd: OwnedFd,
    /// The fds of its other queues, when it was made with several (one
    /// per lane of the cross-connect).
    pub extra_queues: Vec<OwnedFd>,
    /// Its ifindex inside the pod's namespace.
    pub ifindex: u32,
    /// Opened with `IFF_VNET_HDR` and TSO/checksum offloads (TUNs only).
    pub offload: bool,
}

impl Created {
    /// Every fd of the device (closing them all deletes it; see
    /// `close_devices`).
    pub fn into_fds(self) -> Vec<OwnedFd> {
        let mut fds = self.extra_queues;
        fds.push(self.fd);
        fds
    }
}

/// Creates and configures the interface `plan` describes, with MTU `mtu`
/// and `queues` queues (at least one), labelled as belonging to
/// cross-connect `id`. Runs on its own thread; the returned future only
/// waits for it.
///
/// On any failure nothing is left behind: the fd is dropped, which deletes
/// the device with its addresses and routes.
///
/// # Errors
/// A [`Refusal`]: `AlreadyExists` when the name is taken in that namespace,
/// `FailedPrecondition` when the namespace cannot be entered or the kernel
/// refuses the configuration (the message says which step).
pub async fn create(
    plan: &KernelPlan,
    mtu: u32,
    id: &str,
    queues: usize,
) -> Result<Created, Refusal> {
    let plan = plan.clone();
    let alias = format!("{ALIAS_PREFIX}{id}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("nsm-netns".into())
        .spawn(move || {
            let _ = tx.send(create_in_netns(&plan, mtu, &alias, queues));
        })
        .map_err(|e| Refusal::new(tonic::Code::Internal, format!("spawning netns thread: {e}")))?;
    rx.await
        .map_err(|_| Refusal::new(tonic::Code::Internal, "netns thread died"))?
}

/// Runs on a throw-away thread: it is left in the pod's namespace.
fn create_in_netns(
    plan: &KernelPlan,
    mtu: u32,
    alias: &str,
    queues: usize,
) -> Result<Created, Refusal> {
    let where_ = || format!("interface {} in {}", plan.name, plan.netns.path.display());
    let ns = File::open(&plan.netns.path).map_err(|e| {
        Refusal::new(
            tonic::Code::NotFound,
            format!("{}: opening netns: {e}", where_()),
        )
    })?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        Refusal::new(
            tonic::Code::FailedPrecondition,
            format!("{}: setns: {e}", where_()),
        )
    })?;
    // Offloads for TUNs: TAP frames would need the same work behind an
    // Ethernet header, which is not done yet.
    let offload = !plan.tap;
    let mut fds = sys::open_tun(&plan.name, plan.tap, offload, queues).map_err(|e| {
        let code = match e.raw_os_error() {
            Some(libc::EBUSY) | Some(libc::EEXIST) => tonic::Code::AlreadyExists,
            _ => tonic::Code::FailedPrecondition,
        };
        let what = if code == tonic::Code::AlreadyExists {
            "the name is already in use in that namespace".to_string()
        } else {
            format!("creating the device: {e}")
        };
        Refusal::new(code, format!("{}: {what}", where_()))
    })?;
    if fds.is_empty() {
        return Err(Refusal::new(tonic::Code::Internal, "no queue opened"));
    }
    let fd = fds.remove(0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| Refusal::new(tonic::Code::Internal, format!("netlink runtime: {e}")))?;
    // If configuration fails, the fds are dropped on return: the device and
    // whatever was already set on it are deleted by the kernel.
    let ifindex = rt.block_on(configure(plan, mtu, alias)).map_err(|e| {
        Refusal::new(
            tonic::Code::FailedPrecondition,
            format!("{}: {e}", where_()),
        )
    })?;
    Ok(Created {
        fd,
        extra_queues: fds,
        ifindex,
        offload,
    })
}

async fn configure(plan: &KernelPlan, mtu: u32, alias: &str) -> Result<u32, String> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| format!("netlink socket: {e}"))?;
    let conn_task = tokio::spawn(conn);
    let r = configure_with(&handle, plan, mtu, alias).await;
    conn_task.abort();
    r
}

async fn configure_with(
    handle: &Handle,
    plan: &KernelPlan,
    mtu: u32,
    alias: &str,
) -> Result<u32, String> {
    let link = handle
        .link()
        .get()
        .match_name(plan.name.clone())
        .execute()
        .try_next()
        .await
        .map_err(|e| format!("looking the device up: {e}"))?
        .ok_or("the device vanished after creation")?;
    let idx = link.header.index;

    let mut set = LinkUnspec::new_with_index(idx).mtu(mtu).alias(alias);
    if let Some(mac) = plan.mac {
        set = set.address(mac.0.to_vec());
    }
    handle
        .link()
        .set(set.build())
        .execute()
        .await
        .map_err(|e| format!("setting MTU {mtu}/MAC/alias: {e}"))?;

    for net in &plan.addresses {
        let mut req = handle.address().add(idx, net.addr(), net.prefix_len());
        if net.addr().is_ipv6() {
            // nodad: usable at once, no 1-2 s of "tentative" during which
            // the pod's first packets would be dropped.
            let msg = req.message_mut();
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .map_err(|e| format!("adding address {net}: {e}"))?;
    }

    handle
        .link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .map_err(|e| format!("setting the link up: {e}"))?;

    for r in &plan.routes {
        let msg = match (r.prefix.addr(), r.next_hop) {
            (IpAddr::V4(dst), nh) => {
                let b = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                    .destination_prefix(dst, r.prefix.prefix_len())
                    .output_interface(idx);
                match nh {
                    Some(IpAddr::V4(gw)) => b.gateway(gw).build(),
                    _ => b.scope(RouteScope::Link).build(),
                }
            }
            (IpAddr::V6(dst), nh) => {
                let b = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                    .destination_prefix(dst, r.prefix.prefix_len())
                    .output_interface(idx);
                match nh {
                    Some(IpAddr::V6(gw)) => b.gateway(gw).build(),
                    _ => b.scope(RouteScope::Link).build(),
                }
            }
        };
        handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| format!("adding route {}: {e}", r.prefix))?;
    }

    for (ip, mac) in &plan.neighbors {
        handle
            .neighbours()
            .add(idx, *ip)
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| format!("adding neighbour {ip}: {e}"))?;
    }
    Ok(idx)
}
