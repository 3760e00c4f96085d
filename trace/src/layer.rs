//! The server side: a tower layer for `tonic::transport::Server` that makes
//! each traced call a span, child of the caller's span.
//!
//! Only the calls of a connection's life are traced: `Request`, `Close`
//! (NetworkService) and `Program`, `Remove` (the forwarder API). Registry
//! calls, monitors and watches pass through untouched: they are not part
//! of a Request's path and long-lived streams make poor spans.
//!
//! The span is `COMPONENT/METHOD` (`otel.name`), kind server, with the
//! fields `nsm.node` (set here), `nsm.connection.id`,
//! `nsm.network_service`, `nsm.endpoint` (recorded by the handler, which
//! has the decoded message) and `nsm.outcome` (set here from the answer's
//! `grpc-status`: `ok` or the code's name).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::propagation::{INCOMING, Incoming, extract};

/// The traced methods (the last segment of the gRPC path).
const TRACED: [&str; 4] = ["Request", "Close", "Program", "Remove"];

/// Traces a server's connection calls as `COMPONENT/METHOD` spans.
#[derive(Debug, Clone)]
pub struct ServerLayer {
    component: &'static str,
    node: Arc<str>,
}

impl ServerLayer {
    /// `component` names the spans (`nsm.manager`, `nsm.forwarder`,
    /// `nsm.endpoint`, ...); `node` is recorded as `nsm.node`.
    pub fn new(component: &'static str, node: &str) -> ServerLayer {
        ServerLayer {
            component,
            node: node.into(),
        }
    }
}

impl<S> tower::Layer<S> for ServerLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> ServerTrace<S> {
        ServerTrace {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`ServerLayer`] makes.
#[derive(Debug, Clone)]
pub struct ServerTrace<S> {
    inner: S,
    layer: ServerLayer,
}

/// The traced method of a gRPC path, if it is one.
fn traced_method(path: &str) -> Option<&str> {
    let m = path.rsplit('/').next()?;
    TRACED.contains(&m).then_some(m)
}

/// `ok`, or the name of the status code a response header announces.
fn outcome<B>(resp: &http::Response<B>) -> String {
    let code = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0);
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "ok".to_string(),
        c => format!("{c:?}"),
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for ServerTrace<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: 'static,
    B: Send + 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Some(method) = traced_method(req.uri().path()) else {
            return Box::pin(self.inner.call(req));
        };
        let span = tracing::info_span!(
            target: "nsm_trace",
            "nsm.rpc",
            otel.name = %format_args!("{}/{method}", self.layer.component),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %req.uri().path(),
            nsm.node = %self.layer.node,
            nsm.connection.id = tracing::field::Empty,
            nsm.network_service = tracing::field::Empty,
            nsm.endpoint = tracing::field::Empty,
            nsm.outcome = tracing::field::Empty,
        );
        // Fails only when the span is disabled or already started.
        let _ = span.set_parent(extract(req.headers()));
        let incoming = Incoming::from_headers(req.headers());
        let fut = self.inner.call(req);
        Box::pin(INCOMING.scope(incoming, async move {
            let res = fut.instrument(span.clone()).await;
            match &res {
                Ok(resp) => span.record(crate::ATTR_OUTCOME, outcome(resp).as_str()),
                Err(_) => span.record(crate::ATTR_OUTCOME, "transport error"),
            };
            res
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connection_calls_are_traced() {
        assert_eq!(
            traced_method("/networkservice.NetworkService/Request"),
            Some("Request")
        );
        assert_eq!(
            traced_method("/nsm.forwarder.v1.Forwarder/Program"),
            Some("Program")
        );
        assert_eq!(traced_method("/nsm.forwarder.v1.Forwarder/Watch"), None);
        assert_eq!(
            traced_method("/registry.NetworkServiceEndpointRegistry/Register"),
            None
        );
    }

    #[test]
    fn outcome_names_the_status_code() {
        let ok = http::Response::new(());
        assert_eq!(outcome(&ok), "ok");
        let mut bad = http::Response::new(());
        bad.headers_mut()
            .insert("grpc-status", "5".parse().expect("ascii"));
        assert_eq!(outcome(&bad), "NotFound");
    }
}
