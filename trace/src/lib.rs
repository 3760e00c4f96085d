//! Distributed tracing of the mesh: one NSM Request (or Close) is one trace
//! across every hop (client, managers, forwarders, endpoints).
//!
//! Three parts, each usable alone:
//!
//! - [`propagation`]: W3C `traceparent`/`tracestate` in gRPC metadata.
//!   Clients call [`inject`] on every outgoing `tonic::Request`; it writes
//!   the context of the current `tracing` span.
//! - [`layer`]: a tower layer for `tonic::transport::Server` that extracts
//!   the caller's context and runs the traced methods (`Request`, `Close`,
//!   `Program`, `Remove`) inside a server span that is its child, named
//!   `COMPONENT/METHOD` (e.g. `nsm.manager/Request`). Handlers add the
//!   connection's attributes with [`record_request`]/[`record_connection`].
//! - [`export`]: the process's subscriber: logs to stderr as before, plus,
//!   only when an OTLP endpoint is configured (`--otlp-endpoint` or
//!   `OTEL_EXPORTER_OTLP_ENDPOINT`), an OpenTelemetry layer exporting spans
//!   over OTLP/gRPC. Without an endpoint no OpenTelemetry layer exists and
//!   spans cost what any `tracing` span costs; the raw incoming
//!   `traceparent` is still passed on unchanged, so a process without an
//!   exporter does not break a trace across it.

pub mod export;
pub mod layer;
pub mod propagation;

pub use export::{ENDPOINT_ENV, SERVICE_NAME_ENV, Telemetry, TraceConfig, TraceError, init};
pub use layer::ServerLayer;
pub use propagation::{TRACEPARENT, extract, extract_metadata, inject, inject_context};

use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;

/// Span field: the connection id.
pub const ATTR_CONNECTION_ID: &str = "nsm.connection.id";
/// Span field: the network service.
pub const ATTR_SERVICE: &str = "nsm.network_service";
/// Span field: the endpoint (NSE) name.
pub const ATTR_ENDPOINT: &str = "nsm.endpoint";
/// Span field: the node (or endpoint) the process serves.
pub const ATTR_NODE: &str = "nsm.node";
/// Span field: `ok` or the gRPC status code name of the answer.
pub const ATTR_OUTCOME: &str = "nsm.outcome";

/// A client-side root (or child) span for an NSM call made by a client
/// (`nsmctl`, the testbed): `nsm.client/METHOD`. Enter it (or instrument
/// the call with it) and [`inject`] into the request.
pub fn client_span(method: &str) -> tracing::Span {
    tracing::info_span!(
        target: "nsm_trace",
        "nsm.client",
        otel.name = %format_args!("nsm.client/{method}"),
        otel.kind = "client",
        rpc.system = "grpc",
        nsm.connection.id = tracing::field::Empty,
        nsm.network_service = tracing::field::Empty,
        nsm.endpoint = tracing::field::Empty,
        nsm.outcome = tracing::field::Empty,
    )
}

/// Records a request's connection id and network service on the current
/// span (a no-op on spans that do not declare the fields).
pub fn record_request(req: &NetworkServiceRequest) {
    if let Some(c) = &req.connection {
        record_connection(c);
    }
}

/// Records a connection's id, network service and (when set) endpoint
/// name on the current span.
pub fn record_connection(c: &Connection) {
    let span = tracing::Span::current();
    if !c.id.is_empty() {
        span.record(ATTR_CONNECTION_ID, c.id.as_str());
    }
    if !c.network_service.is_empty() {
        span.record(ATTR_SERVICE, c.network_service.as_str());
    }
    if !c.network_service_endpoint_name.is_empty() {
        span.record(ATTR_ENDPOINT, c.network_service_endpoint_name.as_str());
    }
}

/// Records a connection (or cross-connect) id on the current span.
pub fn record_id(id: &str) {
    tracing::Span::current().record(ATTR_CONNECTION_ID, id);
}

/// Records the outcome on the current span: `ok`, or the status code.
pub fn record_outcome<T>(r: &Result<T, tonic::Status>) {
    let span = tracing::Span::current();
    match r {
        Ok(_) => span.record(ATTR_OUTCOME, "ok"),
        Err(s) => span.record(ATTR_OUTCOME, format_args!("{:?}", s.code())),
    };
}
