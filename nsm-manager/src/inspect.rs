//! `nsmctl`'s operator views: what the mesh looks like from one node.
//!
//! Everything comes from public gRPC APIs, as any client would see it: the
//! manager's registries (`Find`) and `MonitorConnections` on its unix
//! socket, and the local forwarder's `Info` and `List`
//! (`nsm.forwarder.v1`) on its socket. Nothing here reads the manager's
//! store or links the data plane.
//!
//! Two layers: the `fetch_*` functions do the I/O, and the rest (tables,
//! JSON, `describe`, the [`graph::Model`]) are pure functions of what was
//! fetched and of the time `now` passed in, so they are tested without a
//! mesh.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nsm_proto::connection::monitor_connection_client::MonitorConnectionClient;
use nsm_proto::connection::{Connection, MonitorScopeSelector, PathSegment};
use nsm_proto::forwarder::v1 as fwd;
use nsm_proto::forwarder::v1::forwarder_client::ForwarderClient;
use nsm_proto::mechanisms::{self, kernel, wireguard};
use nsm_proto::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use nsm_proto::registry::network_service_registry_client::NetworkServiceRegistryClient;
use nsm_proto::registry::{
    NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery, NetworkServiceQuery,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::graph;

/// The forwarder socket `nsmctl` reads when given none: the path the
/// manager dials by default (`nsm-manager --forwarder`).
pub const DEFAULT_FORWARDER_SOCKET: &str = "/var/lib/networkservicemesh/forwarder.sock";

/// How long one fetch (a call and its stream) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A fetch that failed: which call, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {message}")]
pub struct FetchError {
    /// The call, e.g. `find services`, `forwarder /run/x.sock: list`.
    pub what: String,
    /// The status message and code, or `timed out`.
    pub message: String,
}

impl FetchError {
    fn status(what: &str, s: &tonic::Status) -> FetchError {
        FetchError {
            what: what.to_string(),
            message: format!("{} ({:?})", s.message(), s.code()),
        }
    }
}

async fn timed<T>(
    what: &str,
    f: impl Future<Output = Result<T, FetchError>>,
) -> Result<T, FetchError> {
    tokio::time::timeout(FETCH_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| {
            Err(FetchError {
                what: what.to_string(),
                message: format!("timed out after {}s", FETCH_TIMEOUT.as_secs()),
            })
        })
}

/// Every network service in the registry.
///
/// # Errors
/// The call fails or times out.
pub async fn fetch_services(ch: Channel) -> Result<Vec<NetworkService>, FetchError> {
    const WHAT: &str = "find services";
    timed(WHAT, async {
        let mut s = NetworkServiceRegistryClient::new(ch)
            .find(NetworkServiceQuery::default())
            .await
            .map_err(|e| FetchError::status(WHAT, &e))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(r) = s
            .message()
            .await
            .map_err(|e| FetchError::status(WHAT, &e))?
        {
            out.extend(r.network_service);
        }
        Ok(out)
    })
    .await
}

/// Every network service endpoint in the registry.
///
/// # Errors
/// The call fails or times out.
pub async fn fetch_endpoints(ch: Channel) -> Result<Vec<NetworkServiceEndpoint>, FetchError> {
    const WHAT: &str = "find endpoints";
    timed(WHAT, async {
        let mut s = NetworkServiceEndpointRegistryClient::new(ch)
            .find(NetworkServiceEndpointQuery::default())
            .await
            .map_err(|e| FetchError::status(WHAT, &e))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(r) = s
            .message()
            .await
            .map_err(|e| FetchError::status(WHAT, &e))?
        {
            out.extend(r.network_service_endpoint);
        }
        Ok(out)
    })
    .await
}

/// The manager's connections (the first event of `MonitorConnections`:
/// the snapshot), sorted by id.
///
/// # Errors
/// The call fails or times out.
pub async fn fetch_connections(ch: Channel) -> Result<Vec<Connection>, FetchError> {
    const WHAT: &str = "monitor connections";
    timed(WHAT, async {
        let mut s = MonitorConnectionClient::new(ch)
            .monitor_connections(MonitorScopeSelector::default())
            .await
            .map_err(|e| FetchError::status(WHAT, &e))?
            .into_inner();
        let first = s
            .message()
            .await
            .map_err(|e| FetchError::status(WHAT, &e))?
            .unwrap_or_default();
        let mut conns: Vec<Connection> = first.connections.into_values().collect();
        conns.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(conns)
    })
    .await
}

/// One forwarder as its API reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwarderView {
    /// The socket it was read from.
    pub socket: PathBuf,
    /// Its `Info`.
    pub info: fwd::ForwarderInfo,
    /// Its `List`, sorted by id.
    pub cross_connects: Vec<fwd::CrossConnectStatus>,
}

/// `Info` and `List` of the forwarder serving on `socket`, over mTLS with
/// `tls` (a manager identity) when the forwarder has an identity of its own.
///
/// # Errors
/// A call fails (nobody listens there: `Unavailable`) or times out.
pub async fn fetch_forwarder(
    socket: &Path,
    tls: Option<&std::sync::Arc<crate::tls::Tls>>,
) -> Result<ForwarderView, FetchError> {
    let what = format!("forwarder {}", socket.display());
    timed(&what, async {
        let ch = match tls {
            Some(tls) => tls.forwarder_channel(socket),
            None => nsm_proto::uds::connect_unix_lazy(socket),
        };
        let mut c = ForwarderClient::new(ch);
        let info = c
            .info(fwd::InfoRequest {})
            .await
            .map_err(|e| FetchError::status(&format!("{what}: info"), &e))?
            .into_inner();
        let mut cross_connects = c
            .list(fwd::ListRequest {})
            .await
            .map_err(|e| FetchError::status(&format!("{what}: list"), &e))?
            .into_inner()
            .cross_connects;
        cross_connects.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(ForwarderView {
            socket: socket.to_path_buf(),
            info,
            cross_connects,
        })
    })
    .await
}

// ---------------------------------------------------------------- tables

/// A table of text cells, printed with aligned columns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// Column headers (upper case by convention).
    pub headers: Vec<String>,
    /// Rows, each as many cells as headers.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these headers and no rows.
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| (*h).to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// The table as lines: every column as wide as its widest cell (in
    /// characters), two spaces between columns, no trailing spaces. Cells
    /// beyond the headers are dropped, missing ones are empty.
    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut w: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(w.len()) {
                w[i] = w[i].max(width(c));
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[String]| {
            let mut l = String::new();
            for (i, wi) in w.iter().enumerate() {
                let c = cells.get(i).map_or("", String::as_str);
                if i > 0 {
                    l.push_str("  ");
                }
                l.push_str(c);
                l.extend(std::iter::repeat_n(' ', wi.saturating_sub(width(c))));
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(&self.headers);
        for r in &self.rows {
            line(r);
        }
        out
    }
}

/// `d` as `1h2m3s`, `4m0s`, `12s` or `250ms`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m{}s", s / 3600, s / 60 % 60, s % 60),
    }
}

/// When `t` is, seen from `now`: `in 9m58s` or `3s ago`.
pub fn relative(t: SystemTime, now: SystemTime) -> String {
    match t.duration_since(now) {
        Ok(d) => format!("in {}", human_duration(d)),
        Err(e) => format!("{} ago", human_duration(e.duration())),
    }
}

/// `n` bytes as `512B`, `1.5KiB`, `3.2MiB`, `7.0GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut i = 0;
    while v >= 1024 && i < UNITS.len() - 1 {
        v /= 1024;
        i += 1;
    }
    if i == 0 {
        return format!("{n}B");
    }
    // One decimal, computed in integers: n / 1024^i to tenths.
    let unit = 1u128 << (10 * i);
    let tenths = u128::from(n) * 10 / unit;
    format!("{}.{}{}", tenths / 10, tenths % 10, UNITS[i])
}

fn ip_context(c: &Connection) -> nsm_proto::connectioncontext::IpContext {
    c.context
        .as_ref()
        .and_then(|x| x.ip_context.clone())
        .unwrap_or_default()
}

fn segments(c: &Connection) -> &[PathSegment] {
    c.path.as_ref().map_or(&[][..], |p| &p.path_segments[..])
}

/// The node names of the connection's path, client side first.
pub fn hops(c: &Connection) -> Vec<String> {
    segments(c).iter().map(|s| s.name.clone()).collect()
}

/// When the connection lapses unless refreshed: the earliest expiry of
/// its path segments.
pub fn expires(c: &Connection) -> Option<SystemTime> {
    segments(c)
        .iter()
        .filter_map(|s| s.expires.as_ref())
        .map(crate::util::from_ts)
        .min()
}

fn ts_string(t: SystemTime) -> String {
    crate::util::to_ts(t).to_string()
}

fn sorted_labels(l: &HashMap<String, String>) -> Vec<String> {
    let mut kv: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
    kv.sort();
    kv
}

/// `get services`: one row per service.
pub fn services_table(services: &[NetworkService]) -> Table {
    let mut t = Table::new(&["NAME", "PAYLOAD", "MATCHES"]);
    for s in services {
        t.rows.push(vec![
            s.name.clone(),
            s.payload.clone(),
            s.matches.len().to_string(),
        ]);
    }
    t
}

/// `get services --json`: one object per service (printed one per line).
pub fn service_json(s: &NetworkService) -> Value {
    json!({"name": s.name, "payload": s.payload, "matches": s.matches.len()})
}

fn endpoint_labels(e: &NetworkServiceEndpoint) -> Vec<String> {
    let mut v: Vec<String> = e
        .network_service_labels
        .iter()
        .map(|(svc, l)| format!("{svc}:{{{}}}", sorted_labels(&l.labels).join(",")))
        .collect();
    v.sort();
    v
}

/// `get endpoints`: one row per endpoint.
pub fn endpoints_table(endpoints: &[NetworkServiceEndpoint]) -> Table {
    let mut t = Table::new(&["NAME", "SERVICES", "URL", "LABELS"]);
    for e in endpoints {
        t.rows.push(vec![
            e.name.clone(),
            e.network_service_names.join(","),
            e.url.clone(),
            endpoint_labels(e).join(" "),
        ]);
    }
    t
}

/// `get endpoints --json`: one object per endpoint (printed one per line).
pub fn endpoint_json(e: &NetworkServiceEndpoint) -> Value {
    json!({
        "name": e.name,
        "services": e.network_service_names,
        "url": e.url,
        "labels": endpoint_labels(e),
        "expires": e.expiration_time.as_ref().map(ToString::to_string),
    })
}

/// Headers of [`connections_table`].
pub const CONNECTION_HEADERS: [&str; 8] = [
    "ID", "SERVICE", "ENDPOINT", "STATE", "SRC", "DST", "PATH", "EXPIRES",
];

/// One row of [`connections_table`].
pub fn connection_row(c: &Connection, now: SystemTime) -> Vec<String> {
    let ip = ip_context(c);
    vec![
        c.id.clone(),
        c.network_service.clone(),
        c.network_service_endpoint_name.clone(),
        c.state().as_str_name().to_string(),
        ip.src_ip_addrs.join(","),
        ip.dst_ip_addrs.join(","),
        hops(c).join(">"),
        expires(c).map_or_else(|| "-".into(), |t| relative(t, now)),
    ]
}

/// `get connections`: one row per connection.
pub fn connections_table(conns: &[Connection], now: SystemTime) -> Table {
    let mut t = Table::new(&CONNECTION_HEADERS);
    t.rows = conns.iter().map(|c| connection_row(c, now)).collect();
    t
}

/// `get connections --json` (an array of these) and `request --json`.
pub fn connection_json(c: &Connection) -> Value {
    let ip = ip_context(c);
    json!({
        "id": c.id,
        "network_service": c.network_service,
        "endpoint": c.network_service_endpoint_name,
        "labels": c.labels,
        "state": c.state().as_str_name(),
        "payload": c.payload,
        "mechanism": c.mechanism.as_ref().map(|m| json!({"cls": m.cls, "type": m.r#type, "parameters": m.parameters})),
        "src_ip_addrs": ip.src_ip_addrs,
        "dst_ip_addrs": ip.dst_ip_addrs,
        "src_routes": ip.src_routes.iter().map(|r| json!({"prefix": r.prefix, "next_hop": r.next_hop})).collect::<Vec<_>>(),
        "dst_routes": ip.dst_routes.iter().map(|r| json!({"prefix": r.prefix, "next_hop": r.next_hop})).collect::<Vec<_>>(),
        "mtu": c.context.as_ref().map_or(0, |x| x.mtu),
        "hops": hops(c),
        "expires": expires(c).map(ts_string),
        "path": c.path.as_ref().map(|p| p.path_segments.iter().map(|s| json!({
            "name": s.name,
            "id": s.id,
            "expires": s.expires.as_ref().map(ToString::to_string),
        })).collect::<Vec<_>>()),
        "path_index": c.path.as_ref().map(|p| p.index),
    })
}

fn state_name(x: &fwd::CrossConnectStatus) -> &'static str {
    match x.state() {
        fwd::cross_connect_status::State::Pending => "PENDING",
        fwd::cross_connect_status::State::Up => "UP",
        fwd::cross_connect_status::State::Down => "DOWN",
        fwd::cross_connect_status::State::Failed => "FAILED",
    }
}

fn drops_total(c: &fwd::Counters) -> u64 {
    c.drops.values().fold(0u64, |a, b| a.saturating_add(*b))
}

fn drops_list(c: &fwd::Counters) -> String {
    let d: BTreeMap<&String, &u64> = c.drops.iter().filter(|(_, v)| **v > 0).collect();
    if d.is_empty() {
        return "-".into();
    }
    d.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn underlay(info: &fwd::ForwarderInfo) -> String {
    if info.underlay_ip.contains(':') {
        format!("[{}]:{}", info.underlay_ip, info.wireguard_port)
    } else {
        format!("{}:{}", info.underlay_ip, info.wireguard_port)
    }
}

/// `get forwarders`: one row per forwarder.
pub fn forwarders_table(views: &[ForwarderView]) -> Table {
    let mut t = Table::new(&["NAME", "UNDERLAY", "MTU", "VERSION", "XCONNECTS", "SOCKET"]);
    for v in views {
        t.rows.push(vec![
            v.info.name.clone(),
            underlay(&v.info),
            v.info.underlay_mtu.to_string(),
            v.info.version.clone(),
            v.cross_connects.len().to_string(),
            v.socket.display().to_string(),
        ]);
    }
    t
}

/// `get forwarders`, second table: one row per cross-connect, with its
/// counters.
pub fn cross_connects_table(views: &[ForwarderView]) -> Table {
    let mut t = Table::new(&[
        "FORWARDER",
        "CROSS-CONNECT",
        "STATE",
        "RX_PKTS",
        "RX_BYTES",
        "TX_PKTS",
        "TX_BYTES",
        "DROPS",
        "CHAIN",
    ]);
    for v in views {
        for x in &v.cross_connects {
            let c = x.counters.clone().unwrap_or_default();
            let chain: Vec<&str> = x.functions.iter().map(|f| f.name.as_str()).collect();
            t.rows.push(vec![
                v.info.name.clone(),
                x.id.clone(),
                state_name(x).into(),
                c.rx_packets.to_string(),
                c.rx_bytes.to_string(),
                c.tx_packets.to_string(),
                c.tx_bytes.to_string(),
                if drops_total(&c) == 0 {
                    "0".into()
                } else {
                    format!("{} ({})", drops_total(&c), drops_list(&c))
                },
                if chain.is_empty() {
                    "-".into()
                } else {
                    chain.join(">")
                },
            ]);
        }
    }
    t
}

/// A cross-connect's status as JSON.
pub fn cross_connect_json(x: &fwd::CrossConnectStatus) -> Value {
    let c = x.counters.clone().unwrap_or_default();
    let drops: BTreeMap<&String, &u64> = c.drops.iter().collect();
    json!({
        "id": x.id,
        "state": state_name(x),
        "error": x.error,
        "mtu": x.mtu,
        "underlay_ip": x.underlay_ip,
        "wireguard_port": x.wireguard_port,
        "wireguard_public_key": x.wireguard_public_key,
        "counters": {
            "rx_packets": c.rx_packets,
            "rx_bytes": c.rx_bytes,
            "tx_packets": c.tx_packets,
            "tx_bytes": c.tx_bytes,
            "drops": drops,
            "drops_total": drops_total(&c),
            "last_handshake_unix_ms": c.last_handshake_unix_ms,
        },
        "functions": x.functions.iter().map(|f| json!({
            "name": f.name,
            "counters": f.counters.iter().collect::<BTreeMap<_, _>>(),
        })).collect::<Vec<_>>(),
        "lanes": x.lanes.iter().map(|l| json!({
            "wireguard_port": l.wireguard_port,
            "established": l.established,
            "rx_packets": l.rx_packets,
            "rx_bytes": l.rx_bytes,
            "tx_packets": l.tx_packets,
            "tx_bytes": l.tx_bytes,
        })).collect::<Vec<_>>(),
    })
}

/// `get forwarders --json`: one object per forwarder, in an array.
pub fn forwarder_json(v: &ForwarderView) -> Value {
    json!({
        "name": v.info.name,
        "socket": v.socket.display().to_string(),
        "underlay_ip": v.info.underlay_ip,
        "wireguard_port": v.info.wireguard_port,
        "underlay_mtu": v.info.underlay_mtu,
        "version": v.info.version,
        "cross_connect_count": v.cross_connects.len(),
        "cross_connects": v.cross_connects.iter().map(cross_connect_json).collect::<Vec<_>>(),
    })
}

// --------------------------------------------------------------- describe

/// Why `describe` found no single connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No id starts with it.
    #[error("no connection `{0}` (see `nsmctl get connections`)")]
    NotFound(String),
    /// Several ids start with it.
    #[error("`{prefix}` is ambiguous: it matches {}", .ids.join(", "))]
    Ambiguous {
        /// What was asked.
        prefix: String,
        /// The ids it matches.
        ids: Vec<String>,
    },
}

/// The connection whose id is `id`, or the only one whose id starts with
/// it. A path segment id (another node's id of the connection) is looked
/// for the same way when no connection id matches.
///
/// # Errors
/// None or several match.
pub fn find_connection<'a>(
    conns: &'a [Connection],
    id: &str,
) -> Result<&'a Connection, LookupError> {
    if let Some(c) = conns.iter().find(|c| c.id == id) {
        return Ok(c);
    }
    let pick = |m: Vec<&'a Connection>| match m.len() {
        0 => None,
        1 => Some(Ok(m[0])),
        _ => Some(Err(LookupError::Ambiguous {
            prefix: id.to_string(),
            ids: m.iter().map(|c| c.id.clone()).collect(),
        })),
    };
    if id.is_empty() {
        return Err(LookupError::NotFound(id.to_string()));
    }
    if let Some(r) = pick(conns.iter().filter(|c| c.id.starts_with(id)).collect()) {
        return r;
    }
    if let Some(r) = pick(
        conns
            .iter()
            .filter(|c| segments(c).iter().any(|s| s.id.starts_with(id)))
            .collect(),
    ) {
        return r;
    }
    Err(LookupError::NotFound(id.to_string()))
}

/// Whether a forwarder's cross-connect carries this connection: its id is
/// the connection's, or that of one of its path segments (the id each
/// manager on the path knows it by).
pub fn carries(x: &fwd::CrossConnectStatus, c: &Connection) -> bool {
    x.id == c.id || segments(c).iter().any(|s| s.id == x.id)
}

/// The cross-connects carrying `c`, with the forwarder carrying each.
pub fn cross_connects_of<'a>(
    c: &Connection,
    views: &'a [ForwarderView],
) -> Vec<(&'a ForwarderView, &'a fwd::CrossConnectStatus)> {
    views
        .iter()
        .flat_map(|v| v.cross_connects.iter().map(move |x| (v, x)))
        .filter(|(_, x)| carries(x, c))
        .collect()
}

fn mechanism_line(m: &nsm_proto::connection::Mechanism) -> String {
    let mut p: Vec<String> = m
        .parameters
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    p.sort();
    format!("{}/{}  {}", m.r#type, m.cls, p.join(" "))
}

/// The two sides of the cross-connect on node `node` of the connection's
/// path, as far as the connection tells them: (source, destination).
fn sides(c: &Connection, node: &str) -> (String, String) {
    let segs = segments(c);
    let Some(i) = segs.iter().position(|s| s.name == node) else {
        return ("?".into(), "?".into());
    };
    let param = |k: &str| {
        c.mechanism
            .as_ref()
            .and_then(|m| m.parameters.get(k))
            .cloned()
            .unwrap_or_default()
    };
    let mech_type = c.mechanism.as_ref().map_or("", |m| m.r#type.as_str());
    let source = if i == 0 {
        if mech_type == mechanisms::KERNEL {
            format!(
                "kernel {} in {} (the client)",
                param(kernel::NAME),
                param(kernel::INODE_URL)
            )
        } else {
            "kernel (the client)".into()
        }
    } else if mech_type == mechanisms::WIREGUARD {
        format!(
            "wireguard from {} ({}:{})",
            segs[i - 1].name,
            param(wireguard::SRC_IP),
            param(wireguard::SRC_PORT)
        )
    } else {
        format!("wireguard from {}", segs[i - 1].name)
    };
    let destination = if i + 1 >= segs.len() {
        format!(
            "kernel in endpoint {} (the endpoint)",
            c.network_service_endpoint_name
        )
    } else if mech_type == mechanisms::WIREGUARD && i == 0 {
        format!(
            "wireguard to {} ({}:{})",
            segs[i + 1].name,
            param(wireguard::DST_IP),
            param(wireguard::DST_PORT)
        )
    } else {
        format!("wireguard to {}", segs[i + 1].name)
    };
    (source, destination)
}

fn kv_line(m: &HashMap<String, u64>) -> String {
    let mut v: Vec<(&String, &u64)> = m.iter().collect();
    v.sort();
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `describe connection`: the connection hop by hop, its mechanism, IP
/// context and labels, and what each forwarder in `views` that carries it
/// reports (sides, chain functions with their counters, counters and drops
/// by reason).
pub fn describe(c: &Connection, views: &[ForwarderView], now: SystemTime) -> String {
    let mut o = String::new();
    let ip = ip_context(c);
    let _ = writeln!(o, "Connection:  {}", c.id);
    let _ = writeln!(o, "Service:     {}", c.network_service);
    let _ = writeln!(o, "Endpoint:    {}", c.network_service_endpoint_name);
    let _ = writeln!(o, "State:       {}", c.state().as_str_name());
    if !c.payload.is_empty() {
        let _ = writeln!(o, "Payload:     {}", c.payload);
    }
    let labels = sorted_labels(&c.labels);
    let _ = writeln!(
        o,
        "Labels:      {}",
        if labels.is_empty() {
            "-".into()
        } else {
            labels.join(",")
        }
    );
    let _ = writeln!(
        o,
        "Expires:     {}",
        expires(c).map_or_else(
            || "-".into(),
            |t| format!("{} ({})", ts_string(t), relative(t, now))
        )
    );
    let segs = segments(c);
    let _ = writeln!(o, "Path:        {} hop(s)", segs.len());
    let mut t = Table::new(&["  HOP", "NAME", "ID", "EXPIRES"]);
    for (i, s) in segs.iter().enumerate() {
        t.rows.push(vec![
            format!("  {i}"),
            s.name.clone(),
            s.id.clone(),
            s.expires.as_ref().map_or_else(
                || "-".into(),
                |e| format!("{e} ({})", relative(crate::util::from_ts(e), now)),
            ),
        ]);
    }
    o.push_str(&t.render());
    let _ = writeln!(
        o,
        "Mechanism:   {}",
        c.mechanism
            .as_ref()
            .map_or_else(|| "-".into(), mechanism_line)
    );
    let _ = writeln!(o, "IP context:");
    let routes = |r: &[nsm_proto::connectioncontext::Route]| {
        if r.is_empty() {
            return "-".to_string();
        }
        r.iter()
            .map(|r| {
                if r.next_hop.is_empty() {
                    r.prefix.clone()
                } else {
                    format!("{} via {}", r.prefix, r.next_hop)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    let _ = writeln!(o, "  src addresses:  {}", list(&ip.src_ip_addrs));
    let _ = writeln!(o, "  dst addresses:  {}", list(&ip.dst_ip_addrs));
    let _ = writeln!(o, "  src routes:     {}", routes(&ip.src_routes));
    let _ = writeln!(o, "  dst routes:     {}", routes(&ip.dst_routes));
    if !ip.excluded_prefixes.is_empty() {
        let _ = writeln!(o, "  excluded:       {}", ip.excluded_prefixes.join(", "));
    }
    if let Some(mtu) = c.context.as_ref().map(|x| x.mtu).filter(|m| *m > 0) {
        let _ = writeln!(o, "  mtu:            {mtu}");
    }
    let xcs = cross_connects_of(c, views);
    if xcs.is_empty() {
        let _ = writeln!(
            o,
            "Cross-connect: none on {}",
            if views.is_empty() {
                "the forwarders read (none reachable)".to_string()
            } else {
                views
                    .iter()
                    .map(|v| format!("forwarder {}", v.info.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    for (v, x) in xcs {
        let (src, dst) = sides(c, &v.info.name);
        let _ = writeln!(
            o,
            "Cross-connect {} on forwarder {} ({}):",
            x.id,
            v.info.name,
            underlay(&v.info)
        );
        let _ = writeln!(o, "  state:        {}", state_name(x));
        if !x.error.is_empty() {
            let _ = writeln!(o, "  error:        {}", x.error);
        }
        let _ = writeln!(o, "  source:       {src}");
        let _ = writeln!(o, "  destination:  {dst}");
        if !x.wireguard_public_key.is_empty() {
            let _ = writeln!(
                o,
                "  wireguard:    {}:{} key {}",
                x.underlay_ip, x.wireguard_port, x.wireguard_public_key
            );
        }
        if x.lanes.len() > 1 {
            let _ = writeln!(o, "  lanes:");
            for (k, l) in x.lanes.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "    {k}. port {:<5} {} rx {} tx {} packets",
                    l.wireguard_port,
                    if l.established { "up     " } else { "pending" },
                    l.rx_packets,
                    l.tx_packets
                );
            }
        }
        if x.mtu > 0 {
            let _ = writeln!(o, "  mtu:          {}", x.mtu);
        }
        if x.functions.is_empty() {
            let _ = writeln!(o, "  chain:        -");
        } else {
            let _ = writeln!(o, "  chain:");
            for (i, f) in x.functions.iter().enumerate() {
                let _ = writeln!(o, "    {}. {:<10} {}", i + 1, f.name, kv_line(&f.counters));
            }
        }
        let cn = x.counters.clone().unwrap_or_default();
        let _ = writeln!(
            o,
            "  rx:           {} packets, {} bytes ({})",
            cn.rx_packets,
            cn.rx_bytes,
            human_bytes(cn.rx_bytes)
        );
        let _ = writeln!(
            o,
            "  tx:           {} packets, {} bytes ({})",
            cn.tx_packets,
            cn.tx_bytes,
            human_bytes(cn.tx_bytes)
        );
        let _ = writeln!(o, "  drops:        {}", drops_list(&cn).replace(',', " "));
        if cn.last_handshake_unix_ms > 0 {
            let t = SystemTime::UNIX_EPOCH + Duration::from_millis(cn.last_handshake_unix_ms);
            let _ = writeln!(o, "  handshake:    {} ({})", ts_string(t), relative(t, now));
        }
    }
    o
}

/// `describe connection --json`: the connection (as in `get connections
/// --json`) and the cross-connects carrying it, each naming its forwarder.
pub fn describe_json(c: &Connection, views: &[ForwarderView]) -> Value {
    let xcs: Vec<Value> = cross_connects_of(c, views)
        .into_iter()
        .map(|(v, x)| {
            let (src, dst) = sides(c, &v.info.name);
            let mut j = cross_connect_json(x);
            j["forwarder"] = json!(v.info.name);
            j["source"] = json!(src);
            j["destination"] = json!(dst);
            j
        })
        .collect();
    json!({"connection": connection_json(c), "cross_connects": xcs})
}

// ------------------------------------------------------------------ graph

/// The client pod of a connection, named after its network namespace when
/// the connection shows it (a KERNEL mechanism: `file:///run/netns/NAME`
/// gives `NAME`, `file:///proc/PID/ns/net` gives `pid-PID`), otherwise
/// `client-<id>`.
pub fn client_name(c: &Connection) -> String {
    let url = c
        .mechanism
        .as_ref()
        .filter(|m| m.r#type == mechanisms::KERNEL)
        .and_then(|m| m.parameters.get(kernel::INODE_URL));
    if let Some(u) = url {
        let path = u.strip_prefix("file://").unwrap_or(u);
        if let Some(pid) = path
            .strip_prefix("/proc/")
            .and_then(|r| r.strip_suffix("/ns/net"))
        {
            return format!("pid-{pid}");
        }
        if let Some(name) = path.rsplit('/').next().filter(|n| !n.is_empty()) {
            return name.to_string();
        }
        return u.clone();
    }
    format!("client-{}", c.id)
}

fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let hostport = rest.split('/').next()?;
    let host = match hostport.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => hostport,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

/// The mesh as seen from one manager (and the forwarders read), as a
/// picture model: nodes from the connections' paths and the forwarders;
/// a pod per connection client (see [`client_name`]) on the first node of
/// its path; endpoints on the last node of their connections' paths, or on
/// the node whose address their URL names (learned from the forwarders and
/// from WIREGUARD mechanisms), or on a node named by that address; the
/// chains the forwarders report.
pub fn model(
    title: &str,
    services: &[NetworkService],
    endpoints: &[NetworkServiceEndpoint],
    conns: &[Connection],
    views: &[ForwarderView],
) -> graph::Model {
    // Node name -> detail line; underlay address -> node name.
    let mut nodes: BTreeMap<String, String> = BTreeMap::new();
    let mut by_ip: BTreeMap<String, String> = BTreeMap::new();
    for v in views {
        nodes.insert(
            v.info.name.clone(),
            format!("forwarder {}", underlay(&v.info)),
        );
        by_ip.insert(v.info.underlay_ip.clone(), v.info.name.clone());
    }
    let mut endpoint_node: BTreeMap<String, String> = BTreeMap::new();
    for c in conns {
        let segs = segments(c);
        for s in segs {
            nodes.entry(s.name.clone()).or_default();
        }
        if let (Some(first), Some(last)) = (segs.first(), segs.last()) {
            if !c.network_service_endpoint_name.is_empty() {
                endpoint_node.insert(c.network_service_endpoint_name.clone(), last.name.clone());
            }
            if let Some(m) = c
                .mechanism
                .as_ref()
                .filter(|m| m.r#type == mechanisms::WIREGUARD)
            {
                if let Some(ip) = m.parameters.get(wireguard::SRC_IP) {
                    by_ip
                        .entry(ip.clone())
                        .or_insert_with(|| first.name.clone());
                }
                if let Some(ip) = m.parameters.get(wireguard::DST_IP) {
                    by_ip.entry(ip.clone()).or_insert_with(|| last.name.clone());
                }
            }
        }
    }
    // An endpoint's URL names its manager; endpoints with connections
    // teach which node that address is.
    for e in endpoints {
        if let (Some(host), Some(node)) = (url_host(&e.url), endpoint_node.get(&e.name)) {
            by_ip.entry(host).or_insert_with(|| node.clone());
        }
    }
    let mut m = graph::Model {
        title: title.to_string(),
        ..Default::default()
    };
    let mut seen_eps = BTreeSet::new();
    for e in endpoints {
        let node = endpoint_node
            .get(&e.name)
            .cloned()
            .or_else(|| url_host(&e.url).map(|h| by_ip.get(&h).cloned().unwrap_or(h)))
            .unwrap_or_else(|| "unknown".into());
        nodes.entry(node.clone()).or_default();
        seen_eps.insert(e.name.clone());
        m.endpoints.push(graph::Endpoint {
            name: e.name.clone(),
            node,
            services: e.network_service_names.clone(),
        });
    }
    let mut pods: BTreeMap<String, String> = BTreeMap::new();
    for c in conns {
        let segs = segments(c);
        let client_node = segs
            .first()
            .map_or_else(|| "unknown".into(), |s| s.name.clone());
        let pod = client_name(c);
        pods.entry(pod.clone()).or_insert(client_node);
        let ep = &c.network_service_endpoint_name;
        if !ep.is_empty() && seen_eps.insert(ep.clone()) {
            // An endpoint the registry no longer lists.
            let node = segs
                .last()
                .map_or_else(|| "unknown".into(), |s| s.name.clone());
            m.endpoints.push(graph::Endpoint {
                name: ep.clone(),
                node,
                services: vec![c.network_service.clone()],
            });
        }
        let ip = ip_context(c);
        m.connections.push(graph::Connection {
            id: c.id.clone(),
            service: c.network_service.clone(),
            pod,
            endpoint: ep.clone(),
            src: ip.src_ip_addrs.clone(),
            dst: ip.dst_ip_addrs.clone(),
            state: c.state().as_str_name().to_string(),
        });
        for (v, x) in cross_connects_of(c, views) {
            if !x.functions.is_empty() {
                m.chains.push(graph::Chain {
                    connection: c.id.clone(),
                    functions: x
                        .functions
                        .iter()
                        .map(|f| {
                            if views.len() > 1 {
                                format!("{}@{}", f.name, v.info.name)
                            } else {
                                f.name.clone()
                            }
                        })
                        .collect(),
                });
            }
        }
    }
    for n in pods.values() {
        nodes.entry(n.clone()).or_default();
    }
    m.pods = pods
        .into_iter()
        .map(|(name, node)| graph::Pod { name, node })
        .collect();
    for (name, detail) in nodes {
        let detail = if detail.is_empty() {
            by_ip
                .iter()
                .find(|(_, n)| **n == name)
                .map(|(ip, _)| format!("underlay {ip}"))
                .unwrap_or_default()
        } else {
            detail
        };
        m.nodes.push(graph::Node { name, detail });
    }
    m.services = services
        .iter()
        .map(|s| graph::Service {
            name: s.name.clone(),
            payload: s.payload.clone(),
        })
        .collect();
    m
}

// ------------------------------------------------------------ merge, top

/// The connections several managers report, merged into one list: a
/// connection that crosses nodes is reported by every manager on its path,
/// each under its own id; they are one connection, keyed by the id of its
/// first path segment (the client's node), and the client node's view (the
/// one whose id is that key) is kept when present, else the first seen.
/// Sorted by id.
pub fn merge_connections(sets: &[Vec<Connection>]) -> Vec<Connection> {
    let key = |c: &Connection| {
        segments(c)
            .first()
            .map_or_else(|| c.id.clone(), |s| s.id.clone())
    };
    let mut by_key: BTreeMap<String, Connection> = BTreeMap::new();
    for c in sets.iter().flatten() {
        let k = key(c);
        match by_key.get(&k) {
            Some(have) if have.id == k || c.id != k => {}
            _ => {
                by_key.insert(k, c.clone());
            }
        }
    }
    let mut out: Vec<Connection> = by_key.into_values().collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Registry entries from several managers, deduplicated by name (the first
/// seen wins), in first-seen order.
pub fn merge_by_name<T: Clone>(sets: &[Vec<T>], name: impl Fn(&T) -> &str) -> Vec<T> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for x in sets.iter().flatten() {
        if seen.insert(name(x).to_string()) {
            out.push(x.clone());
        }
    }
    out
}

/// One cross-connect's rates between two samples of its forwarder's `List`
/// (`nsmctl top`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rate {
    /// The forwarder's name.
    pub forwarder: String,
    /// The cross-connect's id.
    pub id: String,
    /// Its state in the later sample.
    pub state: String,
    /// Received packets per second.
    pub rx_pps: f64,
    /// Transmitted packets per second.
    pub tx_pps: f64,
    /// Received bits per second.
    pub rx_bps: f64,
    /// Transmitted bits per second.
    pub tx_bps: f64,
    /// Drops per second (all reasons).
    pub drops_ps: f64,
    /// Drops per second by reason (only reasons that grew).
    pub drops_by_reason: BTreeMap<String, f64>,
    /// Not in the earlier sample (its rates are 0 until the next one).
    pub new: bool,
}

impl Rate {
    /// rx + tx bits per second (the sort key of `top`).
    pub fn total_bps(&self) -> f64 {
        self.rx_bps + self.tx_bps
    }
}

/// How much a counter grew; a counter that went back (the cross-connect
/// was re-programmed and its counters restarted) grew by its new value.
fn grew(before: u64, after: u64) -> u64 {
    if after >= before {
        after - before
    } else {
        after
    }
}

#[allow(clippy::cast_precision_loss)]
fn per_sec(n: u64, secs: f64) -> f64 {
    n as f64 / secs
}

/// The rates of every cross-connect in `cur`, from the counter deltas since
/// `prev` over `elapsed` (the time between the two samples, passed in).
/// Cross-connects are matched by forwarder socket and id; one absent from
/// `prev` is `new`, with rates 0. Sorted by total bits/s, highest first,
/// then by forwarder and id. A zero `elapsed` gives rates 0.
pub fn rates(prev: &[ForwarderView], cur: &[ForwarderView], elapsed: Duration) -> Vec<Rate> {
    let secs = elapsed.as_secs_f64();
    let before: HashMap<(&Path, &str), fwd::Counters> = prev
        .iter()
        .flat_map(|v| {
            v.cross_connects.iter().map(move |x| {
                (
                    (v.socket.as_path(), x.id.as_str()),
                    x.counters.clone().unwrap_or_default(),
                )
            })
        })
        .collect();
    let mut out = Vec::new();
    for v in cur {
        for x in &v.cross_connects {
            let c = x.counters.clone().unwrap_or_default();
            let mut r = Rate {
                forwarder: v.info.name.clone(),
                id: x.id.clone(),
                state: state_name(x).into(),
                ..Default::default()
            };
            match before.get(&(v.socket.as_path(), x.id.as_str())) {
                None => r.new = true,
                Some(_) if secs <= 0.0 => {}
                Some(b) => {
                    r.rx_pps = per_sec(grew(b.rx_packets, c.rx_packets), secs);
                    r.tx_pps = per_sec(grew(b.tx_packets, c.tx_packets), secs);
                    r.rx_bps = per_sec(grew(b.rx_bytes, c.rx_bytes).saturating_mul(8), secs);
                    r.tx_bps = per_sec(grew(b.tx_bytes, c.tx_bytes).saturating_mul(8), secs);
                    r.drops_ps = per_sec(grew(drops_total(b), drops_total(&c)), secs);
                    for (reason, n) in &c.drops {
                        let d = grew(b.drops.get(reason).copied().unwrap_or(0), *n);
                        if d > 0 {
                            r.drops_by_reason.insert(reason.clone(), per_sec(d, secs));
                        }
                    }
                }
            }
            out.push(r);
        }
    }
    out.sort_by(|a, b| {
        b.total_bps()
            .total_cmp(&a.total_bps())
            .then_with(|| a.forwarder.cmp(&b.forwarder))
            .then_with(|| a.id.cmp(&b.id))
    });
    out
}

/// `r` per second with an SI prefix: `0`, `950`, `12.3k`, `4.56M`, `1.20G`.
pub fn human_rate(r: f64) -> String {
    const UNITS: [(f64, &str); 4] = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    for (scale, unit) in UNITS {
        if r >= scale {
            let v = r / scale;
            return if v >= 100.0 {
                format!("{v:.0}{unit}")
            } else if v >= 10.0 {
                format!("{v:.1}{unit}")
            } else {
                format!("{v:.2}{unit}")
            };
        }
    }
    if r == 0.0 {
        "0".into()
    } else if r >= 10.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

/// `nsmctl top`: one row per cross-connect, as [`rates`] sorted them.
pub fn rates_table(rates: &[Rate]) -> Table {
    let mut t = Table::new(&[
        "FORWARDER",
        "CROSS-CONNECT",
        "STATE",
        "RX_PKT/S",
        "RX_BIT/S",
        "TX_PKT/S",
        "TX_BIT/S",
        "DROPS/S",
    ]);
    for r in rates {
        let drops = if r.drops_by_reason.is_empty() {
            human_rate(r.drops_ps)
        } else {
            let by: Vec<String> = r
                .drops_by_reason
                .iter()
                .map(|(k, v)| format!("{k}={}", human_rate(*v)))
                .collect();
            format!("{} ({})", human_rate(r.drops_ps), by.join(","))
        };
        let cell = |v: f64| {
            if r.new {
                "-".to_string()
            } else {
                human_rate(v)
            }
        };
        t.rows.push(vec![
            r.forwarder.clone(),
            r.id.clone(),
            r.state.clone(),
            cell(r.rx_pps),
            cell(r.rx_bps),
            cell(r.tx_pps),
            cell(r.tx_bps),
            if r.new { "-".into() } else { drops },
        ]);
    }
    t
}

/// `nsmctl top --json`: one frame as one JSON object.
pub fn rates_json(rates: &[Rate], elapsed: Duration, now: SystemTime) -> Value {
    json!({
        "time": ts_string(now),
        "interval_s": elapsed.as_secs_f64(),
        "cross_connects": rates.iter().map(|r| json!({
            "forwarder": r.forwarder,
            "id": r.id,
            "state": r.state,
            "new": r.new,
            "rx_pps": r.rx_pps,
            "tx_pps": r.tx_pps,
            "rx_bps": r.rx_bps,
            "tx_bps": r.tx_bps,
            "total_bps": r.total_bps(),
            "drops_ps": r.drops_ps,
            "drops_by_reason": r.drops_by_reason,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_proto::connection::{Mechanism, Path as ConnPath, State};
    use nsm_proto::connectioncontext::{ConnectionContext, IpContext, Route};

    fn at(secs: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        })
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
    }

    fn conn(id: &str, seg2: Option<&str>) -> Connection {
        let mut segs = vec![PathSegment {
            name: "node-1".into(),
            id: id.into(),
            expires: at(1_000_600),
            ..Default::default()
        }];
        if let Some(s) = seg2 {
            segs.push(PathSegment {
                name: "node-2".into(),
                id: s.into(),
                expires: at(1_000_300),
                ..Default::default()
            });
        }
        Connection {
            id: id.into(),
            network_service: "secure-net".into(),
            network_service_endpoint_name: if seg2.is_some() { "echo" } else { "local" }.into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            state: State::Up as i32,
            mechanism: Some(Mechanism {
                cls: "LOCAL".into(),
                r#type: "KERNEL".into(),
                parameters: [
                    ("name".to_string(), "nsm-1".to_string()),
                    (
                        "inodeURL".to_string(),
                        "file:///run/netns/nsmtb_lab_web".to_string(),
                    ),
                ]
                .into(),
            }),
            context: Some(ConnectionContext {
                ip_context: Some(IpContext {
                    src_ip_addrs: vec!["172.31.0.1/32".into()],
                    dst_ip_addrs: vec!["172.31.0.2/32".into()],
                    dst_routes: vec![Route {
                        prefix: "172.31.0.1/32".into(),
                        next_hop: String::new(),
                    }],
                    src_routes: vec![Route {
                        prefix: "10.60.0.0/16".into(),
                        next_hop: "172.31.0.2".into(),
                    }],
                    ..Default::default()
                }),
                mtu: 1440,
                ..Default::default()
            }),
            path: Some(ConnPath {
                index: 0,
                path_segments: segs,
            }),
            ..Default::default()
        }
    }

    fn forwarder() -> ForwarderView {
        ForwarderView {
            socket: "/run/x/forwarder.sock".into(),
            info: fwd::ForwarderInfo {
                name: "node-1".into(),
                underlay_ip: "198.51.100.1".into(),
                wireguard_port: 51820,
                underlay_mtu: 1500,
                version: "0.1.0".into(),
            },
            cross_connects: vec![fwd::CrossConnectStatus {
                id: "web-1".into(),
                state: fwd::cross_connect_status::State::Up as i32,
                wireguard_public_key: "KEY=".into(),
                wireguard_port: 51820,
                underlay_ip: "198.51.100.1".into(),
                mtu: 1440,
                counters: Some(fwd::Counters {
                    rx_packets: 10,
                    rx_bytes: 840,
                    tx_packets: 9,
                    tx_bytes: 756,
                    drops: [("no_session".to_string(), 2), ("bad_packet".to_string(), 0)].into(),
                    last_handshake_unix_ms: 999_990_000,
                }),
                functions: vec![
                    fwd::FunctionCounters {
                        name: "acl".into(),
                        counters: [("allowed".to_string(), 8), ("denied".to_string(), 2)].into(),
                    },
                    fwd::FunctionCounters {
                        name: "counter".into(),
                        counters: [("forward_packets".to_string(), 8)].into(),
                    },
                ],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn table_aligns_columns_and_trims() {
        let mut t = Table::new(&["ID", "SERVICE", "X"]);
        t.rows
            .push(vec!["a".into(), "secure-net".into(), String::new()]);
        t.rows.push(vec!["long-id".into(), "s".into(), "é".into()]);
        t.rows.push(vec!["short".into()]);
        assert_eq!(
            t.render(),
            "ID       SERVICE     X\n\
             a        secure-net\n\
             long-id  s           é\n\
             short\n"
        );
        assert_eq!(Table::new(&["A", "B"]).render(), "A  B\n");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(human_duration(Duration::from_secs(59)), "59s");
        assert_eq!(human_duration(Duration::from_secs(600)), "10m0s");
        assert_eq!(human_duration(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(relative(now() + Duration::from_secs(90), now()), "in 1m30s");
        assert_eq!(relative(now() - Duration::from_secs(3), now()), "3s ago");
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(3 << 30), "3.0GiB");
    }

    #[test]
    fn connections_table_shows_path_and_expiry() {
        let t = connections_table(&[conn("web-1", Some("uuid-2"))], now());
        assert_eq!(t.headers, CONNECTION_HEADERS);
        assert_eq!(
            t.rows[0],
            [
                "web-1",
                "secure-net",
                "echo",
                "UP",
                "172.31.0.1/32",
                "172.31.0.2/32",
                "node-1>node-2",
                "in 5m0s"
            ]
        );
        let out = t.render();
        assert!(out.starts_with("ID     SERVICE"), "{out}");
    }

    #[test]
    fn connection_json_keeps_the_old_keys_and_adds_hops() {
        let j = connection_json(&conn("web-1", Some("uuid-2")));
        for k in [
            "id",
            "network_service",
            "endpoint",
            "labels",
            "state",
            "mechanism",
            "src_ip_addrs",
            "dst_ip_addrs",
            "path",
            "hops",
            "expires",
        ] {
            assert!(j.get(k).is_some(), "{k} in {j}");
        }
        assert_eq!(j["hops"], json!(["node-1", "node-2"]));
        assert_eq!(j["path"][1]["id"], "uuid-2");
        assert_eq!(j["path"][1]["expires"], "1970-01-12T13:51:40Z");
        assert_eq!(j["expires"], "1970-01-12T13:51:40Z");
        assert_eq!(j["state"], "UP");
    }

    #[test]
    fn forwarder_tables_and_json() {
        let v = [forwarder()];
        let t = forwarders_table(&v);
        assert_eq!(
            t.rows[0],
            [
                "node-1",
                "198.51.100.1:51820",
                "1500",
                "0.1.0",
                "1",
                "/run/x/forwarder.sock"
            ]
        );
        let x = cross_connects_table(&v);
        assert_eq!(
            x.rows[0],
            [
                "node-1",
                "web-1",
                "UP",
                "10",
                "840",
                "9",
                "756",
                "2 (no_session=2)",
                "acl>counter"
            ]
        );
        let j = forwarder_json(&v[0]);
        assert_eq!(j["cross_connect_count"], 1);
        assert_eq!(j["cross_connects"][0]["counters"]["drops"]["no_session"], 2);
        assert_eq!(j["cross_connects"][0]["functions"][0]["name"], "acl");
        assert_eq!(
            j["cross_connects"][0]["functions"][0]["counters"]["denied"],
            2
        );
    }

    #[test]
    fn find_by_id_prefix_and_segment() {
        let cs = [
            conn("web-1", Some("uuid-2")),
            conn("web-2", None),
            conn("api", None),
        ];
        assert_eq!(find_connection(&cs, "web-1").unwrap().id, "web-1");
        assert_eq!(find_connection(&cs, "a").unwrap().id, "api");
        assert_eq!(find_connection(&cs, "uuid").unwrap().id, "web-1");
        assert!(matches!(
            find_connection(&cs, "web"),
            Err(LookupError::Ambiguous { ref ids, .. }) if ids.len() == 2
        ));
        assert_eq!(
            find_connection(&cs, "nope"),
            Err(LookupError::NotFound("nope".into()))
        );
        assert!(find_connection(&cs, "").is_err());
    }

    #[test]
    fn describe_shows_path_context_and_cross_connect() {
        let c = conn("web-1", Some("uuid-2"));
        let d = describe(&c, &[forwarder()], now());
        for s in [
            "Connection:  web-1",
            "Service:     secure-net",
            "Endpoint:    echo",
            "Labels:      app=web",
            "Path:        2 hop(s)",
            "  0    node-1  web-1",
            "node-2  uuid-2",
            "(in 5m0s)",
            "KERNEL/LOCAL  inodeURL=file:///run/netns/nsmtb_lab_web name=nsm-1",
            "src addresses:  172.31.0.1/32",
            "src routes:     10.60.0.0/16 via 172.31.0.2",
            "dst routes:     172.31.0.1/32",
            "Cross-connect web-1 on forwarder node-1 (198.51.100.1:51820):",
            "source:       kernel nsm-1 in file:///run/netns/nsmtb_lab_web (the client)",
            "destination:  wireguard to node-2",
            "1. acl        allowed=8 denied=2",
            "2. counter    forward_packets=8",
            "rx:           10 packets, 840 bytes",
            "drops:        no_session=2",
            "handshake:",
        ] {
            assert!(d.contains(s), "{s:?} in\n{d}");
        }
        let j = describe_json(&c, &[forwarder()]);
        assert_eq!(j["connection"]["id"], "web-1");
        assert_eq!(j["cross_connects"][0]["forwarder"], "node-1");
        assert_eq!(j["cross_connects"][0]["destination"], "wireguard to node-2");
        // Without a forwarder carrying it, describe says so.
        let d = describe(&conn("other", None), &[forwarder()], now());
        assert!(d.contains("Cross-connect: none on forwarder node-1"), "{d}");
        assert!(d.contains("destination") || d.contains("none"));
    }

    #[test]
    fn describe_lists_the_lanes_of_a_spread_connection() {
        let mut f = forwarder();
        let lane = |port: u32, rx: u64, established: bool| fwd::Lane {
            wireguard_port: port,
            rx_packets: rx,
            tx_packets: rx + 1,
            established,
            ..Default::default()
        };
        f.cross_connects[0].lanes = vec![lane(51820, 6, true), lane(51821, 4, false)];
        let d = describe(&conn("web-1", None), std::slice::from_ref(&f), now());
        for s in [
            "lanes:",
            "0. port 51820 up      rx 6 tx 7 packets",
            "1. port 51821 pending rx 4 tx 5 packets",
        ] {
            assert!(d.contains(s), "{s:?} in\n{d}");
        }
        let j = describe_json(&conn("web-1", None), &[f]);
        assert_eq!(j["cross_connects"][0]["lanes"][1]["wireguard_port"], 51821);
        assert_eq!(j["cross_connects"][0]["lanes"][1]["established"], false);
        // One lane is not worth a list.
        assert!(!describe(&conn("web-1", None), &[forwarder()], now()).contains("lanes:"));
    }

    #[test]
    fn model_places_pods_endpoints_and_chains() {
        let services = [NetworkService {
            name: "secure-net".into(),
            payload: "IP".into(),
            ..Default::default()
        }];
        let endpoints = [
            NetworkServiceEndpoint {
                name: "echo".into(),
                network_service_names: vec!["secure-net".into()],
                url: "tcp://198.51.100.2:5001".into(),
                ..Default::default()
            },
            NetworkServiceEndpoint {
                name: "idle".into(),
                network_service_names: vec!["secure-net".into()],
                url: "tcp://198.51.100.1:5001".into(),
                ..Default::default()
            },
            NetworkServiceEndpoint {
                name: "far".into(),
                network_service_names: vec!["secure-net".into()],
                url: "tcp://198.51.100.9:5001".into(),
                ..Default::default()
            },
        ];
        let m = model(
            "t",
            &services,
            &endpoints,
            &[conn("web-1", Some("uuid-2"))],
            &[forwarder()],
        );
        let node_of = |n: &str| {
            m.endpoints
                .iter()
                .find(|e| e.name == n)
                .unwrap()
                .node
                .clone()
        };
        assert_eq!(node_of("echo"), "node-2");
        assert_eq!(node_of("idle"), "node-1");
        assert_eq!(node_of("far"), "198.51.100.9");
        assert_eq!(
            m.pods,
            [graph::Pod {
                name: "nsmtb_lab_web".into(),
                node: "node-1".into()
            }]
        );
        let names: Vec<&str> = m.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["198.51.100.9", "node-1", "node-2"]);
        assert_eq!(m.nodes[1].detail, "forwarder 198.51.100.1:51820");
        assert_eq!(m.nodes[2].detail, "underlay 198.51.100.2");
        assert_eq!(m.chains[0].functions, ["acl", "counter"]);
        assert_eq!(m.connections[0].endpoint, "echo");
        let svg = graph::render_svg(&m);
        for s in [
            "node-1",
            "node-2",
            "nsmtb_lab_web",
            "echo",
            "acl",
            "172.31.0.1/32",
        ] {
            assert!(svg.contains(s), "{s}");
        }
    }

    #[test]
    fn client_names() {
        let mut c = conn("x", None);
        assert_eq!(client_name(&c), "nsmtb_lab_web");
        c.mechanism
            .as_mut()
            .unwrap()
            .parameters
            .insert("inodeURL".into(), "file:///proc/42/ns/net".into());
        assert_eq!(client_name(&c), "pid-42");
        c.mechanism = None;
        assert_eq!(client_name(&c), "client-x");
        assert_eq!(
            url_host("tcp://[2001:db8::1]:5001").as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(url_host("unix:///run/x.sock"), None);
    }

    fn sample(socket: &str, xs: &[(&str, u64, u64, u64)]) -> ForwarderView {
        // (id, packets, bytes, drops): rx and tx alike, drops as no_session.
        ForwarderView {
            socket: PathBuf::from(socket),
            info: fwd::ForwarderInfo {
                name: socket.trim_end_matches(".sock").into(),
                ..Default::default()
            },
            cross_connects: xs
                .iter()
                .map(|(id, p, b, d)| fwd::CrossConnectStatus {
                    id: (*id).into(),
                    state: fwd::cross_connect_status::State::Up as i32,
                    counters: Some(fwd::Counters {
                        rx_packets: *p,
                        rx_bytes: *b,
                        tx_packets: *p / 2,
                        tx_bytes: *b / 2,
                        drops: [("no_session".to_string(), *d)].into_iter().collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn rates_from_counter_deltas() {
        let prev = [
            sample("f1.sock", &[("a", 100, 10_000, 1), ("b", 0, 0, 0)]),
            sample("f2.sock", &[("a", 0, 0, 0)]),
        ];
        let cur = [
            sample(
                "f1.sock",
                &[
                    ("a", 300, 30_000, 5),
                    ("b", 2000, 1_000_000, 0),
                    ("c", 9, 9, 9),
                ],
            ),
            // Same id on another forwarder: its own counters.
            sample("f2.sock", &[("a", 0, 0, 0)]),
        ];
        let r = rates(&prev, &cur, Duration::from_secs(2));
        let ids: Vec<(&str, &str)> = r
            .iter()
            .map(|r| (r.forwarder.as_str(), r.id.as_str()))
            .collect();
        // Sorted by total bits/s, then forwarder and id.
        assert_eq!(ids, [("f1", "b"), ("f1", "a"), ("f1", "c"), ("f2", "a")]);
        let b = &r[0];
        assert!((b.rx_pps - 1000.0).abs() < 1e-9);
        assert!((b.tx_pps - 500.0).abs() < 1e-9);
        assert!((b.rx_bps - 4_000_000.0).abs() < 1e-9);
        assert!((b.tx_bps - 2_000_000.0).abs() < 1e-9);
        assert!((b.total_bps() - 6_000_000.0).abs() < 1e-9);
        assert!(!b.new);
        let a = &r[1];
        assert!((a.rx_pps - 100.0).abs() < 1e-9);
        assert!((a.rx_bps - 80_000.0).abs() < 1e-9);
        assert!((a.drops_ps - 2.0).abs() < 1e-9);
        assert_eq!(a.drops_by_reason.get("no_session"), Some(&2.0));
        assert!(r[2].new);
        assert_eq!(r[2].total_bps(), 0.0);
        assert_eq!(r[3].total_bps(), 0.0);
        assert!(r[3].drops_by_reason.is_empty());

        // A restarted counter grows by its new value.
        let restarted = rates(
            &[sample("f.sock", &[("x", 500, 5000, 0)])],
            &[sample("f.sock", &[("x", 10, 100, 0)])],
            Duration::from_secs(1),
        );
        assert!((restarted[0].rx_pps - 10.0).abs() < 1e-9);
        // No time passed: no rates, no division by zero.
        let z = rates(&prev, &cur, Duration::ZERO);
        assert!(z.iter().all(|r| r.total_bps() == 0.0 && r.drops_ps == 0.0));

        let t = rates_table(&r).render();
        assert!(t.contains("RX_BIT/S"), "{t}");
        assert!(t.contains("4.00M"), "{t}");
        let j = rates_json(&r, Duration::from_secs(2), now());
        assert_eq!(j["cross_connects"][0]["id"], "b");
        assert_eq!(j["cross_connects"][0]["rx_bps"], 4_000_000.0);
        assert_eq!(j["interval_s"], 2.0);
    }

    #[test]
    fn human_rates() {
        assert_eq!(human_rate(0.0), "0");
        assert_eq!(human_rate(0.5), "0.5");
        assert_eq!(human_rate(950.0), "950");
        assert_eq!(human_rate(12_345.0), "12.3k");
        assert_eq!(human_rate(4_560_000.0), "4.56M");
        assert_eq!(human_rate(120e9), "120G");
    }

    #[test]
    fn merges_managers_views() {
        // node-1 knows the cross-node connection as "w1", node-2 as "w2".
        let on1 = conn("w1", Some("w2"));
        let mut on2 = on1.clone();
        on2.id = "w2".into();
        on2.mechanism = None;
        let local2 = conn("l2", None);
        let m = merge_connections(&[vec![on2.clone(), local2.clone()], vec![on1.clone()]]);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].id, "l2");
        // The client node's view wins, whatever the order.
        assert_eq!(m[1], on1);
        let m = merge_connections(&[vec![on1.clone()], vec![on2]]);
        assert_eq!(m, vec![on1]);
        let names = merge_by_name(&[vec!["a", "b"], vec!["b", "c"]], |s: &&str| s);
        assert_eq!(names, ["a", "b", "c"]);
    }
}
