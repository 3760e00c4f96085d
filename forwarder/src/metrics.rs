//! `/metrics` of the forwarder (`--metrics-listen IP:PORT`), in the
//! OpenMetrics text format (which Prometheus scrapes natively).
//!
//! Nothing is counted for metrics: every number is read at scrape time
//! from what the forwarder keeps anyway, through the same path as the List
//! call (the data plane's lock-free counters, the chain functions' handles,
//! the WireGuard state the packet thread reports between two batches). A
//! scrape therefore costs what a `List` costs, and the packet thread does
//! no extra work per packet.
//!
//! Cardinality is bounded by the live cross-connects: each scrape builds a
//! fresh registry from the current list, so a removed cross-connect's
//! series disappear. Labels are ids, directions, fixed reason and function
//! names, never addresses or flows.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `nsm_forwarder_connections` | gauge | |
//! | `nsm_forwarder_connection_state` | gauge (1 for the current state) | `connection`, `state` = `up`, `pending`, `down` |
//! | `nsm_forwarder_connection_packets_total` | counter | `connection`, `direction` = `forward` (source to destination, read from the source side), `reverse` |
//! | `nsm_forwarder_connection_bytes_total` | counter | `connection`, `direction` |
//! | `nsm_forwarder_connection_drops_total` | counter | `connection`, `reason` (the data plane's drop reasons; reasons seen at least once) |
//! | `nsm_forwarder_chain_function_total` | counter | `connection`, `index`, `function`, `counter` (the function counters of `CrossConnectStatus.functions`) |
//! | `nsm_forwarder_wireguard_handshake_age_seconds` | gauge | `connection` (WireGuard connections after their first handshake) |
//! | `nsm_forwarder_packet_threads` | gauge | (`--workers`) |
//! | `nsm_forwarder_io_errors_total` | counter | `kind` = `pod_write`, `udp_send` (datagrams the socket or DPDK port refused, e.g. no route to a peer), `read`, `offload` (TUN superpackets that could not be cut) |
//! | `nsm_forwarder_flow_log_records_total` | counter | (with `--flow-log`) |
//! | `nsm_forwarder_flow_log_lost_total` | counter | `reason` = `ring_full`, `table_full`, `rate_limited`, `write_error` |

use std::time::{SystemTime, UNIX_EPOCH};

use nsm_proto::forwarder::v1 as pb;
use nsm_proto::forwarder::v1::forwarder_server::Forwarder as _;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use crate::flowlog::FlowLogStats;
use crate::service::ForwarderService;

type Labels = Vec<(&'static str, String)>;

/// Serves `/metrics` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, svc: ForwarderService) {
    nsm_proto::metrics_http::serve(listener, nsm_proto::metrics_http::OPENMETRICS, move || {
        let svc = svc.clone();
        async move { render(&svc).await }
    })
    .await;
}

/// One scrape: the live cross-connects' statuses, encoded.
pub async fn render(svc: &ForwarderService) -> String {
    let list = svc
        .list(tonic::Request::new(pb::ListRequest {}))
        .await
        .map(|r| r.into_inner().cross_connects)
        .unwrap_or_default();
    let mut out = encode_statuses(
        &list,
        SystemTime::now(),
        crate::flowlog::global().map(crate::flowlog::FlowLog::stats),
    );
    let (threads, io) = svc.io_totals();
    // Before the final `# EOF` of the statuses' exposition.
    if let Some(eof) = out.rfind("# EOF") {
        out.truncate(eof);
    }
    out.push_str(&encode_io(threads, io));
    out
}

/// The packet threads and their I/O errors (the packet threads count them
/// anyway; read here at scrape time), ending with `# EOF`.
pub fn encode_io(threads: usize, io: crate::worker::IoTotals) -> String {
    let mut reg = Registry::with_prefix("nsm_forwarder");
    let g: Gauge = Gauge::default();
    g.set(i64::try_from(threads).unwrap_or(i64::MAX));
    reg.register("packet_threads", "Packet threads (--workers)", g);
    let errors = Family::<Labels, Counter>::default();
    for (kind, n) in [
        ("pod_write", io.pod_write_errors),
        ("udp_send", io.udp_send_errors),
        ("read", io.read_errors),
        ("offload", io.offload_errors),
    ] {
        errors
            .get_or_create(&vec![("kind", kind.to_string())])
            .inc_by(n);
    }
    reg.register(
        "io_errors",
        "Packet I/O that failed, by kind: pod interface writes, underlay sends, reads, TUN superpackets that could not be cut",
        errors,
    );
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

fn state_name(state: i32) -> &'static str {
    use pb::cross_connect_status::State;
    match State::try_from(state) {
        Ok(State::Up) => "up",
        Ok(State::Down) => "down",
        _ => "pending",
    }
}

/// Encodes `statuses` (and the flow log's totals) as of `now`.
pub fn encode_statuses(
    statuses: &[pb::CrossConnectStatus],
    now: SystemTime,
    flow: Option<FlowLogStats>,
) -> String {
    let mut reg = Registry::with_prefix("nsm_forwarder");
    let conns: Gauge = Gauge::default();
    let state = Family::<Labels, Gauge>::default();
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let drops = Family::<Labels, Counter>::default();
    let functions = Family::<Labels, Counter>::default();
    let hs_age = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));

    conns.set(i64::try_from(statuses.len()).unwrap_or(i64::MAX));
    for st in statuses {
        let id = || ("connection", st.id.clone());
        let current = state_name(st.state);
        for s in ["up", "pending", "down"] {
            state
                .get_or_create(&vec![id(), ("state", s.to_string())])
                .set(i64::from(s == current));
        }
        let c = st.counters.clone().unwrap_or_default();
        for (dir, p, b) in [
            ("forward", c.rx_packets, c.rx_bytes),
            ("reverse", c.tx_packets, c.tx_bytes),
        ] {
            let l = vec![id(), ("direction", dir.to_string())];
            packets.get_or_create(&l).inc_by(p);
            bytes.get_or_create(&l).inc_by(b);
        }
        for (reason, n) in &c.drops {
            drops
                .get_or_create(&vec![id(), ("reason", reason.clone())])
                .inc_by(*n);
        }
        for (i, f) in st.functions.iter().enumerate() {
            for (name, n) in &f.counters {
                functions
                    .get_or_create(&vec![
                        id(),
                        ("index", i.to_string()),
                        ("function", f.name.clone()),
                        ("counter", name.clone()),
                    ])
                    .inc_by(*n);
            }
        }
        if st.wireguard_port != 0 && c.last_handshake_unix_ms > 0 {
            let age_ms = now_ms.saturating_sub(c.last_handshake_unix_ms);
            // Milliseconds to seconds; precision far beyond a handshake's.
            #[allow(clippy::cast_precision_loss)]
            hs_age
                .get_or_create(&vec![id()])
                .set(age_ms as f64 / 1000.0);
        }
    }
    reg.register(
        "connections",
        "Cross-connects programmed in this forwarder",
        conns,
    );
    reg.register(
        "connection_state",
        "State of each cross-connect: 1 for the current one of up, pending (waiting for a WireGuard handshake or the peer's key), down",
        state,
    );
    reg.register(
        "connection_packets",
        "Packets of each cross-connect, counted at its source side: forward = read from the source (dropped ones included), reverse = written to it",
        packets,
    );
    reg.register_with_unit(
        "connection",
        "IP bytes of each cross-connect by direction, as connection_packets",
        Unit::Bytes,
        bytes,
    );
    reg.register(
        "connection_drops",
        "Packets of each cross-connect dropped, by the data plane's drop reason",
        drops,
    );
    reg.register(
        "chain_function",
        "Counters of each chain function (acl rule hits, rate-limited packets, faults injected, ...)",
        functions,
    );
    reg.register_with_unit(
        "wireguard_handshake_age",
        "Time since the last completed WireGuard handshake of each cross-node connection",
        Unit::Seconds,
        hs_age,
    );
    if let Some(fs) = flow {
        let written: Counter = Counter::default();
        written.inc_by(fs.written);
        let lost = Family::<Labels, Counter>::default();
        for (reason, n) in [
            ("ring_full", fs.ring_full),
            ("table_full", fs.table_full),
            ("rate_limited", fs.rate_limited),
            ("write_error", fs.write_errors),
        ] {
            lost.get_or_create(&vec![("reason", reason.to_string())])
                .inc_by(n);
        }
        reg.register(
            "flow_log_records",
            "Flow records written to the --flow-log file",
            written,
        );
        reg.register("flow_log_lost", "Flow records not written, by reason", lost);
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn status(id: &str) -> pb::CrossConnectStatus {
        pb::CrossConnectStatus {
            id: id.into(),
            state: pb::cross_connect_status::State::Up as i32,
            wireguard_port: 51820,
            counters: Some(pb::Counters {
                rx_packets: 10,
                rx_bytes: 1000,
                tx_packets: 4,
                tx_bytes: 400,
                drops: [("acl_denied".to_string(), 3)].into(),
                last_handshake_unix_ms: 1_000_000,
            }),
            functions: vec![pb::FunctionCounters {
                name: "acl".into(),
                counters: [("denied".to_string(), 3)].into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn names_labels_and_values() {
        let now = UNIX_EPOCH + Duration::from_millis(1_002_500);
        let out = encode_statuses(&[status("xc-1")], now, Some(FlowLogStats::default()));
        for line in [
            "nsm_forwarder_connections 1",
            r#"nsm_forwarder_connection_state{connection="xc-1",state="up"} 1"#,
            r#"nsm_forwarder_connection_state{connection="xc-1",state="down"} 0"#,
            r#"nsm_forwarder_connection_packets_total{connection="xc-1",direction="forward"} 10"#,
            r#"nsm_forwarder_connection_bytes_total{connection="xc-1",direction="reverse"} 400"#,
            r#"nsm_forwarder_connection_drops_total{connection="xc-1",reason="acl_denied"} 3"#,
            r#"nsm_forwarder_chain_function_total{connection="xc-1",index="0",function="acl",counter="denied"} 3"#,
            r#"nsm_forwarder_wireguard_handshake_age_seconds{connection="xc-1"} 2.5"#,
            r#"nsm_forwarder_flow_log_lost_total{reason="ring_full"} 0"#,
            "# EOF",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing in\n{out}");
        }
    }

    #[test]
    fn removed_connections_disappear_and_ids_are_escaped() {
        let now = SystemTime::now();
        let out = encode_statuses(&[status("a\"b\\c")], now, None);
        assert!(out.contains(r#"connection="a\"b\\c""#), "{out}");
        let out = encode_statuses(&[], now, None);
        assert!(!out.contains("connection="), "{out}");
        assert!(!out.contains("flow_log"), "{out}");
        assert!(out.contains("nsm_forwarder_connections 0"));
    }

    #[test]
    fn io_errors_follow_the_statuses_with_one_eof() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut out = encode_statuses(&[status("xc-1")], now, None);
        let eof = out.rfind("# EOF").expect("eof");
        out.truncate(eof);
        out.push_str(&encode_io(
            2,
            crate::worker::IoTotals {
                udp_send_errors: 7,
                ..Default::default()
            },
        ));
        assert_eq!(out.matches("# EOF").count(), 1, "{out}");
        assert!(out.ends_with("# EOF\n"), "{out}");
        assert!(out.contains("nsm_forwarder_packet_threads 2\n"), "{out}");
        assert!(
            out.contains("nsm_forwarder_io_errors_total{kind=\"udp_send\"} 7\n"),
            "{out}"
        );
        assert!(out.contains("nsm_forwarder_connections 1\n"), "{out}");
    }
}
