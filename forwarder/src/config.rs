//! Command line of `nsm-forwarder`. Every flag can also come from the
//! environment variable named in its help.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;

/// The nsm-rs data plane of one node: creates the pods' TUN/TAP interfaces,
/// carries their packets to other nodes over WireGuard (one UDP socket per
/// packet thread), and
/// is programmed by nsm-manager over a gRPC API on a unix socket.
///
/// Run it in the node's network namespace. SIGTERM or SIGINT removes every
/// interface it made and exits.
#[derive(Debug, Clone, Parser)]
#[command(name = "nsm-forwarder", version)]
pub struct Config {
    /// Forwarder name, unique in the cluster (usually the node name);
    /// reported by the Info call.
    #[arg(long, env = "NSM_FORWARDER_NAME", value_name = "NODE")]
    pub name: String,

    /// Path of the unix socket the gRPC API (nsm.forwarder.v1.Forwarder) is
    /// served on. Missing directories are created; a stale socket file is
    /// replaced.
    #[arg(long, env = "NSM_FORWARDER_LISTEN", value_name = "PATH")]
    pub listen: PathBuf,

    /// This node's address on the underlay (IPv4 or IPv6, no prefix length).
    /// The WireGuard UDP socket binds it, and peers send to it.
    #[arg(long, env = "NSM_FORWARDER_UNDERLAY_IP", value_name = "IP")]
    pub underlay_ip: IpAddr,

    /// UDP port of the first packet thread's WireGuard socket; thread k
    /// (see --workers) uses PORT + k, so PORT .. PORT + workers - 1 must be
    /// free and reachable from the other nodes.
    #[arg(
        long,
        env = "NSM_FORWARDER_WIREGUARD_PORT",
        value_name = "PORT",
        default_value_t = 51820
    )]
    pub wireguard_port: u16,

    /// Packet threads (1-64). Each owns a share of the cross-connects, with
    /// their pod interfaces, WireGuard sessions and its own UDP socket, so
    /// connections scale over cores without a lock on the packet path; one
    /// connection always stays on one thread (its packets stay in order).
    /// A new connection goes to the thread with the fewest. Default: the
    /// number of CPUs this process may run on, at most 8.
    #[arg(long, env = "NSM_FORWARDER_WORKERS", value_name = "COUNT",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: Option<u16>,

    /// Lanes per cross-node connection (1-64, at most the packet threads).
    /// With more than one, a connection's pod interface gets that many
    /// queues (a multi-queue TUN or TAP), each served by its own packet
    /// thread with its own WireGuard session to the peer forwarder's lane
    /// of the same index, so that one connection's flows spread over
    /// cores: the kernel hashes each flow to one queue, and keeps a flow's
    /// replies on the queue it came in by, so no flow is reordered. A
    /// connection uses the lanes both forwarders offer (the smaller count;
    /// an NSM forwarder that knows nothing of lanes means one), and one
    /// lane when it has a chain (a chain's state is per connection). Costs
    /// a handshake per lane and a thread's worth of wake-ups per lane.
    #[arg(long, env = "NSM_FORWARDER_LANES", value_name = "COUNT", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub lanes: u16,

    /// MTU of the underlay, in bytes. Default: the MTU of the interface
    /// holding --underlay-ip. Pod MTUs default to it minus 60 (IPv4
    /// underlay) or 80 (IPv6 underlay).
    #[arg(long, env = "NSM_FORWARDER_UNDERLAY_MTU", value_name = "BYTES",
          value_parser = clap::value_parser!(u32).range(1280..=65535))]
    pub underlay_mtu: Option<u32>,

    /// Datagrams per recvmmsg/sendmmsg call, and packets read from one pod
    /// interface per wake-up (1-1024).
    #[arg(long, env = "NSM_FORWARDER_BATCH", value_name = "PACKETS", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub batch: u16,

    /// Receive and send buffer of each WireGuard UDP socket, in bytes (set
    /// with SO_RCVBUFFORCE/SO_SNDBUFFORCE, so above net.core.rmem_max).
    /// Small buffers lose packets under load.
    #[arg(long, env = "NSM_FORWARDER_SOCKET_BUFFER", value_name = "BYTES", default_value_t = 8 << 20)]
    pub socket_buffer: usize,

    /// Do not group datagrams to the same peer into one UDP GSO send
    /// (UDP_SEGMENT). GSO is on by default and switches itself off if the
    /// kernel refuses it.
    #[arg(long, env = "NSM_FORWARDER_NO_UDP_GSO")]
    pub no_udp_gso: bool,

    /// Do not coalesce TCP segments or UDP datagrams of a flow into
    /// superpackets when writing to pod TUNs (receive-side GRO in
    /// userspace). On by default.
    #[arg(long, env = "NSM_FORWARDER_NO_TUN_GRO")]
    pub no_tun_gro: bool,

    /// Carry WireGuard over a DPDK port instead of the kernel's UDP stack:
    /// the DPDK EAL arguments, one string (split at whitespace), e.g.
    /// "--no-huge -m 256 --no-shconf --file-prefix=nsm-fw --no-pci
    /// --no-telemetry -l 0 --vdev=net_af_packet0,iface=eth1". The forwarder then speaks
    /// Ethernet, IP, UDP and ARP/NDP itself on --dpdk-port, with
    /// --underlay-ip and --wireguard-port as its address (an address the
    /// kernel does not also own on that link), and runs one packet thread,
    /// which polls the port (again at once while datagrams come, every
    /// millisecond when idle). Needs a build with the cargo feature `dpdk`.
    #[arg(
        long,
        env = "NSM_FORWARDER_DPDK_EAL",
        value_name = "ARGS",
        allow_hyphen_values = true,
        requires = "dpdk_port"
    )]
    pub dpdk_eal: Option<String>,

    /// The DPDK port to use with --dpdk-eal, by name (e.g. net_af_packet0,
    /// net_tap0, or a PCI address).
    #[arg(
        long,
        env = "NSM_FORWARDER_DPDK_PORT",
        value_name = "NAME",
        requires = "dpdk_eal"
    )]
    pub dpdk_port: Option<String>,

    /// Most pod interface queues at once (a cross-connect uses one or two,
    /// or one per lane with --lanes).
    #[arg(
        long,
        env = "NSM_FORWARDER_MAX_PORTS",
        value_name = "COUNT",
        default_value_t = 16384
    )]
    pub max_ports: u32,

    /// Serve Prometheus metrics (OpenMetrics text) at http://IP:PORT/metrics:
    /// per cross-connect traffic, drops by reason, chain function counters,
    /// WireGuard handshake age. Absent: no metrics server.
    #[arg(long, env = "NSM_FORWARDER_METRICS_LISTEN", value_name = "IP:PORT")]
    pub metrics_listen: Option<SocketAddr>,

    /// Directory with this forwarder's identity: cert.pem (SPIFFE X.509 for
    /// spiffe://TD/nsm-forwarder/NODE, from `nsmctl ca issue`), key.pem and the
    /// trust bundle ca.pem; re-read when they change (rotation without a
    /// restart). With it, the API socket speaks mTLS and accepts only clients
    /// whose certificate is a manager's of the same trust domain
    /// (spiffe://TD/nsm-manager/...): whoever can open the socket but holds
    /// no such key cannot program or read the forwarder. The manager then
    /// needs --forwarder-mtls. Absent: plain gRPC, guarded by the socket's
    /// permissions.
    #[arg(long, env = "NSM_FORWARDER_IDENTITY_DIR", value_name = "DIR")]
    pub identity_dir: Option<PathBuf>,

    /// Append one JSON line per finished flow (5-tuple, packets, bytes,
    /// each chain function's verdict, start and end) to this file, created
    /// with mode 0600. Absent: no flow records are kept.
    #[arg(long, env = "NSM_FORWARDER_FLOW_LOG", value_name = "FILE")]
    pub flow_log: Option<PathBuf>,

    /// Log 1 flow in N (chosen by a keyed hash of the flow's tuple, so a
    /// flow is logged whole or not at all).
    #[arg(long, env = "NSM_FORWARDER_FLOW_LOG_SAMPLE", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..), requires = "flow_log")]
    pub flow_log_sample: u32,

    /// Write at most R flow records a second (0: no limit); the excess is
    /// counted in nsm_forwarder_flow_log_lost_total{reason="rate_limited"}.
    #[arg(
        long,
        env = "NSM_FORWARDER_FLOW_LOG_RATE",
        value_name = "R",
        default_value_t = 1000,
        requires = "flow_log"
    )]
    pub flow_log_rate: u32,

    /// OTLP/gRPC collector (e.g. http://192.0.2.9:4317) to export the spans
    /// of Program and Remove calls to. Absent: no export. The service name
    /// is $OTEL_SERVICE_NAME or nsm-forwarder@NAME.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

impl Config {
    /// Packet threads to run: --workers, or the CPUs this process may run
    /// on (at most 8).
    pub fn worker_count(&self) -> usize {
        self.workers.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
            usize::from,
        )
    }
}
