//! `/metrics` of the manager (`--metrics-listen IP:PORT`), in the
//! OpenMetrics text format (which Prometheus scrapes natively).
//!
//! Two kinds of numbers:
//! - events, recorded where they happen through [`global`] (process-wide,
//!   like the tracing subscriber: one manager per process in production):
//!   Request durations and outcomes ([`ManagerMetrics::request_done`], from
//!   `Manager::request`/`request_from`), and heal durations, from the first
//!   time a loss is noticed ([`ManagerMetrics::loss_detected`]: an endpoint
//!   gone in `Manager::heal`, a cross-connect the forwarder lacks in
//!   `Manager::reconcile`) to the connection working again
//!   ([`ManagerMetrics::healed`]);
//! - state, read at scrape time: connections by role and state, registry
//!   sizes (when this manager serves the registry).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `nsm_manager_request_duration_seconds` | histogram | `outcome` = `ok`, `error` |
//! | `nsm_manager_requests_total` | counter | `outcome`, `code` (gRPC code name, `ok` on success) |
//! | `nsm_manager_heal_duration_seconds` | histogram | |
//! | `nsm_manager_connections` | gauge | `role` = `client`, `endpoint`; `state` = `up`, `down`, `healing` (refresh or reselect requested) |
//! | `nsm_manager_registry_services` | gauge | (local registry only) |
//! | `nsm_manager_registry_endpoints` | gauge | (local registry only) |

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use crate::manager::{Manager, RequestError, Role};
use crate::registry::RegistryStore;
use crate::select::SelectError;

type Labels = Vec<(&'static str, &'static str)>;

/// Losses older than this are forgotten (the connection was closed
/// instead of healed): bounds the table.
const LOSS_MEMORY: Duration = Duration::from_secs(3600);

/// The manager's event metrics.
#[derive(Debug)]
pub struct ManagerMetrics {
    request_duration: Family<Labels, Histogram>,
    requests: Family<Labels, Counter>,
    heal_duration: Histogram,
    /// Connection id -> when its loss was first noticed.
    losses: Mutex<HashMap<String, Instant>>,
}

fn request_histogram() -> Histogram {
    // 1 ms .. 32 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for ManagerMetrics {
    fn default() -> Self {
        ManagerMetrics {
            request_duration: Family::new_with_constructor(request_histogram),
            requests: Family::default(),
            // 10 ms .. 82 s.
            heal_duration: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            losses: Mutex::new(HashMap::new()),
        }
    }
}

static GLOBAL: LazyLock<ManagerMetrics> = LazyLock::new(ManagerMetrics::default);

/// The process's manager metrics.
pub fn global() -> &'static ManagerMetrics {
    &GLOBAL
}

/// The gRPC code a Request error is answered with (as `Status::from`).
pub fn code_of(e: &RequestError) -> tonic::Code {
    use tonic::Code;
    match e {
        RequestError::UnknownService(_) | RequestError::Select(SelectError::NoEndpoints(_)) => {
            Code::NotFound
        }
        RequestError::Select(_) => Code::FailedPrecondition,
        RequestError::BadRequest { .. } | RequestError::Netns(_) => Code::InvalidArgument,
        RequestError::Ipam(crate::ipam::IpamError::Exhausted { .. }) => Code::ResourceExhausted,
        RequestError::Ipam(crate::ipam::IpamError::Remote(s)) | RequestError::Registry(s) => {
            s.code()
        }
        RequestError::Ipam(_) | RequestError::Store(_) => Code::Internal,
        RequestError::Forwarder(crate::forwarder::ForwarderError::Call { status, .. })
            if status.code() == Code::Unavailable =>
        {
            Code::Unavailable
        }
        RequestError::Forwarder(_) => Code::Internal,
        RequestError::Endpoint { status, .. } | RequestError::Peer { status, .. } => status.code(),
        RequestError::Denied { .. } => Code::PermissionDenied,
    }
}

/// `snake_case` name of a gRPC code (a fixed set: bounded label).
fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code;
    match c {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

impl ManagerMetrics {
    /// A Request (from a client, a peer or the pods API) took `elapsed` and
    /// failed with `err`, or succeeded.
    pub fn request_done(&self, elapsed: Duration, err: Option<&RequestError>) {
        let outcome = if err.is_some() { "error" } else { "ok" };
        let code = err.map_or("ok", |e| code_name(code_of(e)));
        self.request_duration
            .get_or_create(&vec![("outcome", outcome)])
            .observe(elapsed.as_secs_f64());
        self.requests
            .get_or_create(&vec![("outcome", outcome), ("code", code)])
            .inc();
    }

    /// Connection `id` was noticed broken; later notices of the same loss
    /// keep the first time.
    pub fn loss_detected(&self, id: &str) {
        let now = Instant::now();
        let mut m = self.losses.lock().unwrap_or_else(PoisonError::into_inner);
        m.retain(|_, t| now.saturating_duration_since(*t) < LOSS_MEMORY);
        m.entry(id.to_string()).or_insert(now);
    }

    /// Connection `id` works again: observes the heal time if a loss was
    /// noticed.
    pub fn healed(&self, id: &str) {
        let lost = self
            .losses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        if let Some(t) = lost {
            self.heal_duration.observe(t.elapsed().as_secs_f64());
        }
    }

    /// Connection `id` was closed instead of healed.
    pub fn forget(&self, id: &str) {
        self.losses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }
}

/// Serves `/metrics` on `listener` until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    manager: Arc<Manager>,
    registry: Option<Arc<RegistryStore>>,
) {
    nsm_proto::metrics_http::serve(listener, nsm_proto::metrics_http::OPENMETRICS, move || {
        let out = render(global(), &manager, registry.as_deref());
        async move { out }
    })
    .await;
}

/// One scrape.
pub fn render(m: &ManagerMetrics, manager: &Manager, registry: Option<&RegistryStore>) -> String {
    use nsm_proto::connection::State;
    let conns = Family::<Labels, Gauge>::default();
    for role in ["client", "endpoint"] {
        for state in ["up", "down", "healing"] {
            // Every combination, so that a count going to 0 shows as 0.
            let _ = conns.get_or_create(&vec![("role", role), ("state", state)]);
        }
    }
    for r in manager.records() {
        let role = match r.role {
            Role::Client => "client",
            Role::Endpoint => "endpoint",
        };
        let state = match State::try_from(r.conn.0.state) {
            Ok(State::Down) => "down",
            Ok(State::RefreshRequested | State::ReselectRequested) => "healing",
            _ => "up",
        };
        conns
            .get_or_create(&vec![("role", role), ("state", state)])
            .inc();
    }
    render_with(m, conns, registry.map(RegistryStore::names))
}

fn render_with(
    m: &ManagerMetrics,
    conns: Family<Labels, Gauge>,
    registry: Option<(Vec<String>, Vec<String>)>,
) -> String {
    let mut reg = Registry::with_prefix("nsm_manager");
    reg.register_with_unit(
        "request_duration",
        "Time to answer a Request (connection setup or refresh), by outcome",
        Unit::Seconds,
        m.request_duration.clone(),
    );
    reg.register(
        "requests",
        "Requests answered, by outcome and gRPC code",
        m.requests.clone(),
    );
    reg.register_with_unit(
        "heal_duration",
        "Time from a connection's loss being noticed (endpoint gone, cross-connect missing in the forwarder) to it working again",
        Unit::Seconds,
        m.heal_duration.clone(),
    );
    reg.register(
        "connections",
        "Connections this manager holds, by role and state",
        conns,
    );
    if let Some((services, endpoints)) = registry {
        let s: Gauge = Gauge::default();
        s.set(i64::try_from(services.len()).unwrap_or(i64::MAX));
        let e: Gauge = Gauge::default();
        e.set(i64::try_from(endpoints.len()).unwrap_or(i64::MAX));
        reg.register(
            "registry_services",
            "Network services in this manager's registry",
            s,
        );
        reg.register(
            "registry_endpoints",
            "Network service endpoints in this manager's registry",
            e,
        );
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_heals_are_recorded() {
        let m = ManagerMetrics::default();
        m.request_done(Duration::from_millis(3), None);
        m.request_done(
            Duration::from_millis(40),
            Some(&RequestError::UnknownService("x".into())),
        );
        m.loss_detected("c1");
        m.loss_detected("c1");
        m.healed("c1");
        m.healed("c1");
        m.loss_detected("c2");
        m.forget("c2");
        m.healed("c2");
        let out = render_with(
            &m,
            Family::default(),
            Some((vec!["s".into()], vec!["a".into(), "b".into()])),
        );
        for line in [
            r#"nsm_manager_request_duration_seconds_count{outcome="ok"} 1"#,
            r#"nsm_manager_request_duration_seconds_count{outcome="error"} 1"#,
            r#"nsm_manager_request_duration_seconds_bucket{le="0.004",outcome="ok"} 1"#,
            r#"nsm_manager_requests_total{outcome="error",code="not_found"} 1"#,
            r#"nsm_manager_requests_total{outcome="ok",code="ok"} 1"#,
            "nsm_manager_heal_duration_seconds_count 1",
            "nsm_manager_registry_services 1",
            "nsm_manager_registry_endpoints 2",
            "# EOF",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing in\n{out}");
        }
    }

    #[test]
    fn codes_match_the_status_mapping() {
        let cases = [
            RequestError::UnknownService("s".into()),
            RequestError::BadRequest {
                service: "s".into(),
                what: "w".into(),
            },
            RequestError::Registry(tonic::Status::unavailable("x")),
            RequestError::Peer {
                name: "n".into(),
                url: "u".into(),
                status: tonic::Status::aborted("x"),
            },
            RequestError::Denied {
                service: "s".into(),
                why: "w".into(),
            },
        ];
        for e in cases {
            let code = code_of(&e);
            assert_eq!(code, tonic::Status::from(e).code());
        }
    }
}
