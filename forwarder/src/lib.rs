//! `nsm-forwarder`: the data plane of one node.
//!
//! Owns every piece of packet I/O on its node: the pod-side TUN/TAP devices
//! (created inside the pods' network namespaces, [`pod`]), the one UDP
//! socket that carries every WireGuard session to other nodes, and the
//! packet thread ([`worker`]) that runs the `nsm-dataplane` core over
//! batches of packets. The manager programs it over its own gRPC API
//! ([`service`], `nsm_proto::forwarder::v1`); requests become typed values
//! at one boundary ([`plan`]).
//!
//! It must never keep durable state (after a restart it comes up empty and
//! the manager re-programs it; its pod devices die with its fds, see
//! [`pod`]), never take a lock, allocate or log per packet, never leave the
//! node's network namespace on a long-lived thread, and never put a private
//! key in a log line, a `Debug` output or an API reply ([`keys`]).
//!
//! Module map:
//! - [`config`]: the command line.
//! - [`plan`]: protobuf -> validated plan; refusals with gRPC codes.
//! - [`keys`]: per-connection x25519 keys, base64.
//! - [`pod`]: TUN/TAP creation in a pod's netns + netlink configuration.
//! - [`worker`]: the packet thread (epoll, batches, the `Dataplane`).
//! - [`service`]: the gRPC service and the cross-connect registry.
//! - [`metrics`]: `/metrics` (`--metrics-listen`), read at scrape time.
//! - [`flowlog`]: the `--flow-log` writer of the chains' flow records.
//! - `offload`: TUN virtio-net headers, TCP segmentation, checksums.
//! - `sys`: the only `unsafe` code (TUNSETIFF/TUNSETOFFLOAD, recvmmsg with
//!   UDP_GRO, sendmmsg with UDP GSO).

// `deny`, not `forbid`: `sys` must be able to opt out, and nothing else may.
#![deny(unsafe_code)]

pub mod chain;
pub mod config;
pub mod flowlog;
pub mod keys;
pub mod metrics;
mod offload;
pub mod plan;
pub mod pod;
pub mod service;
#[allow(unsafe_code)]
mod sys;
mod wire;
pub mod worker;

use std::net::{IpAddr, SocketAddr, UdpSocket};

use futures_util::TryStreamExt;
use nsm_dataplane::{Dataplane, DataplaneConfig};
use nsm_proto::forwarder::v1::forwarder_server::ForwarderServer;

pub use config::Config;

/// Why the forwarder could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The WireGuard socket could not be bound or configured.
    #[error("WireGuard socket {addr}: {source}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// --wireguard-port + --workers - 1 is past 65535.
    #[error(
        "WireGuard ports {base}..{base}+{workers} do not fit below 65536 (lower --wireguard-port or --workers)"
    )]
    PortRange {
        /// --wireguard-port.
        base: u16,
        /// Packet threads asked for.
        workers: usize,
    },
    /// --lanes is more than the packet threads.
    #[error(
        "--lanes {lanes} needs as many packet threads, but there are {workers} (raise --workers or lower --lanes)"
    )]
    Lanes {
        /// Lanes asked for.
        lanes: usize,
        /// Packet threads.
        workers: usize,
    },
    /// --dpdk-eal was given, but this build has no DPDK.
    #[error("--dpdk-eal: this nsm-forwarder was built without the cargo feature `dpdk`")]
    NoDpdk,
    /// The DPDK underlay could not be set up.
    #[error("DPDK underlay: {0}")]
    Dpdk(String),
    /// The underlay MTU could not be found.
    #[error("underlay MTU of {ip}: {reason} (pass --underlay-mtu)")]
    UnderlayMtu {
        /// The underlay address.
        ip: IpAddr,
        /// Why.
        reason: String,
    },
    /// The API socket could not be bound.
    #[error("API socket {path}: {source}")]
    Listen {
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The identity files are unusable.
    #[error("identity: {0}")]
    Identity(#[from] nsm_identity::identity::IdentityError),
    /// The metrics listener could not be bound.
    #[error("metrics listener {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The flow log could not be opened.
    #[error("flow log {path}: {source}")]
    FlowLog {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The packet thread could not start.
    #[error("packet thread: {0}")]
    Worker(#[source] std::io::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Finds the MTU of the interface holding `ip`, over netlink.
///
/// # Errors
/// When no interface has the address or netlink fails.
pub async fn detect_underlay_mtu(ip: IpAddr) -> Result<u32, String> {
    use rtnetlink::packet_route::address::AddressAttribute;
    use rtnetlink::packet_route::link::LinkAttribute;
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
    let task = tokio::spawn(conn);
    let result = async {
        let mut addrs = handle.address().get().execute();
        let mut index = None;
        while let Some(msg) = addrs.try_next().await.map_err(|e| e.to_string())? {
            let has = msg.attributes.iter().any(|a| match a {
                AddressAttribute::Address(a) | AddressAttribute::Local(a) => *a == ip,
                _ => false,
            });
            if has {
                index = Some(msg.header.index);
                break;
            }
        }
        let index = index.ok_or("no interface has this address")?;
        let link = handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("interface vanished")?;
        link.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .ok_or_else(|| "interface has no MTU attribute".to_string())
    }
    .await;
    task.abort();
    result
}

fn bind_wireguard(addr: SocketAddr, buffer: usize) -> std::io::Result<UdpSocket> {
    use nix::sys::socket::{setsockopt, sockopt};
    let sock = UdpSocket::bind(addr)?;
    // Force past net.core.{r,w}mem_max (we run with CAP_NET_ADMIN): small
    // buffers are where slow userspace WireGuard implementations lose
    // packets. Best effort: a smaller buffer still works.
    if setsockopt(&sock, sockopt::RcvBufForce, &buffer).is_err() {
        let _ = setsockopt(&sock, sockopt::RcvBuf, &buffer);
    }
    if setsockopt(&sock, sockopt::SndBufForce, &buffer).is_err() {
        let _ = setsockopt(&sock, sockopt::SndBuf, &buffer);
    }
    // UDP_GRO: a run of datagrams from one peer (typically one UDP GSO
    // send of the peer forwarder) arrives as one message. Best effort.
    if let Err(e) = setsockopt(&sock, sockopt::UdpGroSegment, &true) {
        tracing::info!(error = %e, "UDP GRO not available");
    }
    // Blocking for sends (a full buffer pushes back instead of losing
    // packets); receives use MSG_DONTWAIT.
    sock.set_nonblocking(false)?;
    Ok(sock)
}

#[cfg(feature = "dpdk")]
type DpdkUnderlay = nsm_dpdk::UdpUnderlay;
/// Without the feature there is no DPDK underlay: a type with no value.
#[cfg(not(feature = "dpdk"))]
type DpdkUnderlay = std::convert::Infallible;

/// The DPDK underlay of --dpdk-eal / --dpdk-port, if asked for: the EAL
/// (once per process), the port, and a UDP endpoint on
/// --underlay-ip:--wireguard-port.
#[cfg(feature = "dpdk")]
fn open_dpdk(config: &Config) -> Result<Option<DpdkUnderlay>, RunError> {
    let (Some(eal_args), Some(port_name)) = (&config.dpdk_eal, &config.dpdk_port) else {
        return Ok(None);
    };
    if config.workers.is_some_and(|w| w > 1) {
        return Err(RunError::Dpdk(
            "a DPDK port runs one packet thread: leave out --workers or pass 1".into(),
        ));
    }
    let args: Vec<&str> = eal_args.split_whitespace().collect();
    // The port keeps the EAL alive; it is cleaned up (its run directory
    // removed) when the packet thread drops the port at shutdown.
    let eal = nsm_dpdk::Eal::init(&args).map_err(|e| RunError::Dpdk(format!("EAL: {e}")))?;
    let id = eal
        .port_by_name(port_name)
        .map_err(|e| RunError::Dpdk(format!("port {port_name}: {e}")))?;
    let port = nsm_dpdk::Port::open(&eal, id, &nsm_dpdk::PortConfig::default())
        .map_err(|e| RunError::Dpdk(format!("port {port_name}: {e}")))?;
    let local = SocketAddr::new(config.underlay_ip, config.wireguard_port);
    let dev = nsm_dpdk::UdpUnderlay::new(port, nsm_dpdk::UdpUnderlayConfig::new(local))
        .map_err(|e| RunError::Dpdk(format!("UDP endpoint {local}: {e}")))?;
    tracing::info!(port = %port_name, %local, "WireGuard over DPDK");
    Ok(Some(dev))
}

#[cfg(not(feature = "dpdk"))]
fn open_dpdk(config: &Config) -> Result<Option<DpdkUnderlay>, RunError> {
    if config.dpdk_eal.is_some() {
        return Err(RunError::NoDpdk);
    }
    Ok(None)
}

/// Binds packet thread `k`'s WireGuard socket (port base + k) and starts
/// the thread with a data plane of its own.
fn start_worker(
    config: &Config,
    k: usize,
    workers: usize,
    max_udp_payload: usize,
    dpdk: Option<DpdkUnderlay>,
) -> Result<(worker::WorkerHandle, std::thread::JoinHandle<()>), RunError> {
    let port =
        u16::try_from(usize::from(config.wireguard_port) + k).map_err(|_| RunError::PortRange {
            base: config.wireguard_port,
            workers,
        })?;
    let addr = SocketAddr::new(config.underlay_ip, port);
    let underlay = match dpdk {
        #[cfg(feature = "dpdk")]
        Some(dev) => worker::Underlay::Dpdk(Box::new(dev)),
        #[cfg(not(feature = "dpdk"))]
        Some(never) => match never {},
        None => worker::Underlay::Kernel(
            bind_wireguard(addr, config.socket_buffer)
                .map_err(|source| RunError::Socket { addr, source })?,
        ),
    };
    let dp = Dataplane::new(DataplaneConfig {
        max_ports: config.max_ports,
        ..DataplaneConfig::default()
    });
    worker::spawn(
        k,
        dp,
        underlay,
        worker::WorkerConfig {
            batch: usize::from(config.batch),
            udp_gso: !config.no_udp_gso,
            tun_gro: !config.no_tun_gro,
            max_udp_payload,
            ..worker::WorkerConfig::default()
        },
    )
    .map_err(RunError::Worker)
}

/// Runs the forwarder until `shutdown` resolves, then removes every
/// cross-connect (deleting their interfaces) and stops the packet thread.
///
/// # Errors
/// [`RunError`] when a resource cannot be set up or the server fails.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let dpdk = open_dpdk(&config)?;
    let underlay_mtu = match (config.underlay_mtu, &dpdk) {
        (Some(m), _) => m,
        #[cfg(feature = "dpdk")]
        (None, Some(d)) => u32::from(d.port().mtu()),
        #[cfg(not(feature = "dpdk"))]
        (None, Some(never)) => match *never {},
        (None, None) => detect_underlay_mtu(config.underlay_ip)
            .await
            .map_err(|reason| RunError::UnderlayMtu {
                ip: config.underlay_ip,
                reason,
            })?,
    };
    // Before any chain is built: chains register with the flow log.
    if let Some(path) = &config.flow_log {
        flowlog::install(flowlog::FlowLogConfig {
            path: path.clone(),
            sample: config.flow_log_sample,
            rate: config.flow_log_rate,
            spec: nsm_dataplane::stages::FlowLogSpec::default(),
        })
        .map_err(|source| RunError::FlowLog {
            path: path.clone(),
            source,
        })?;
    }
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            nsm_proto::metrics_http::bind(addr)
                .await
                .map_err(|source| RunError::Metrics { addr, source })?,
        ),
        None => None,
    };
    // A DPDK port is one queue: one packet thread.
    let workers = if dpdk.is_some() {
        1
    } else {
        config.worker_count()
    };
    let lanes = usize::from(config.lanes);
    if lanes > workers {
        return Err(RunError::Lanes { lanes, workers });
    }
    let mut dpdk = dpdk;
    let max_udp_payload = usize::try_from(underlay_mtu)
        .unwrap_or(1500)
        // IPv4 20 + UDP 8, or IPv6 40 + UDP 8.
        .saturating_sub(if config.underlay_ip.is_ipv4() { 28 } else { 48 });
    // Worker k owns WireGuard port base + k: a peer reaches a connection's
    // session directly on the thread that holds it.
    let mut handles = Vec::with_capacity(workers);
    let mut joins = Vec::with_capacity(workers);
    for k in 0..workers {
        let started = start_worker(&config, k, workers, max_udp_payload, dpdk.take());
        match started {
            Ok((handle, join)) => {
                handles.push(handle);
                joins.push(join);
            }
            Err(e) => {
                // Threads already running would keep their sockets.
                for h in &handles {
                    h.stop();
                }
                return Err(e);
            }
        }
    }
    let addr = SocketAddr::new(config.underlay_ip, config.wireguard_port);

    let identity = service::Identity {
        name: config.name.clone(),
        underlay_ip: config.underlay_ip,
        wireguard_port: config.wireguard_port,
        underlay_mtu,
        lanes,
    };
    let svc = service::ForwarderService::new(identity, handles.clone());
    svc.spawn_state_monitor(std::time::Duration::from_secs(1));
    let metrics_task = metrics_listener.map(|l| tokio::spawn(metrics::serve(l, svc.clone())));
    // With an identity the API socket speaks mTLS to managers only.
    let tls = match &config.identity_dir {
        Some(dir) => {
            let source = nsm_identity::identity::IdentitySource::load(
                nsm_identity::identity::IdentityPaths::in_dir(dir),
            )?;
            tracing::info!(spiffe_id = %source.current().id, "forwarder identity loaded; API socket is mTLS");
            let reloader = source
                .clone()
                .spawn_reloader(std::time::Duration::from_secs(1));
            Some((nsm_identity::tls::Tls::new(source), reloader))
        }
        None => None,
    };
    let listener =
        nsm_proto::uds::bind_unix(&config.listen).map_err(|source| RunError::Listen {
            path: config.listen.clone(),
            source,
        })?;
    tracing::info!(
        name = %config.name,
        listen = %config.listen.display(),
        wireguard = %addr,
        workers,
        lanes,
        underlay_mtu,
        "forwarder ready"
    );
    let svc2 = svc.clone();
    let shutdown = async move {
        shutdown.await;
        svc2.begin_shutdown();
    };
    // Program and Remove are spans `nsm.forwarder/METHOD`, children of
    // the manager's call (W3C traceparent in the metadata).
    let router = tonic::transport::Server::builder()
        .layer(nsm_trace::ServerLayer::new("nsm.forwarder", &config.name))
        .add_service(ForwarderServer::new(svc.clone()));
    let served = match &tls {
        Some((tls, _)) => {
            let own = tls.identity().id.clone();
            let incoming = tls.incoming_unix(listener.into_inner(), move |id| {
                nsm_identity::tls::is_role_in_domain(&own, id, "nsm-manager")
            });
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(listener, shutdown)
                .await
        }
    };
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Some((_, reloader)) = &tls {
        reloader.abort();
    }
    tracing::info!("shutting down: removing every cross-connect");
    svc.remove_all().await;
    for h in &handles {
        h.stop();
    }
    let _ = tokio::task::spawn_blocking(move || {
        for j in joins {
            let _ = j.join();
        }
    })
    .await;
    let _ = std::fs::remove_file(&config.listen);
    served.map_err(RunError::Serve)
}
