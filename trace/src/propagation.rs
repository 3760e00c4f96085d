//! W3C Trace Context (`traceparent`, `tracestate`) in gRPC metadata.
//!
//! gRPC metadata are HTTP/2 headers, so the keys are the W3C header names
//! in lower case. [`inject`] writes the context of the current `tracing`
//! span; when that span carries no OpenTelemetry context (the process
//! exports nothing), it passes on the `traceparent`/`tracestate` its server
//! layer received for the request being handled, so that the trace goes on
//! through a process that does not export.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http::HeaderMap;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header carrying trace id, parent span id and flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header carrying vendor state.
pub const TRACESTATE: &str = "tracestate";

tokio::task_local! {
    /// The raw `traceparent`/`tracestate` of the request being served, set
    /// by [`crate::layer::ServerLayer`] for the handler's future.
    pub(crate) static INCOMING: Incoming;
}

/// The raw W3C headers of an incoming request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Incoming {
    pub(crate) traceparent: Option<String>,
    pub(crate) tracestate: Option<String>,
}

impl Incoming {
    pub(crate) fn from_headers(h: &HeaderMap) -> Incoming {
        let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        Incoming {
            traceparent: get(TRACEPARENT),
            tracestate: get(TRACESTATE),
        }
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes the current span's trace context into `md` (see the module doc
/// for the fallback when the process exports nothing). Call it on every
/// outgoing request of a Request or Close.
pub fn inject(md: &mut MetadataMap) {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        inject_context(&cx, md);
        return;
    }
    let _ = INCOMING.try_with(|inc| {
        let mut inj = MetadataInjector(md);
        if let Some(tp) = &inc.traceparent {
            inj.set(TRACEPARENT, tp.clone());
            if let Some(ts) = &inc.tracestate {
                inj.set(TRACESTATE, ts.clone());
            }
        }
    });
}

/// Writes `cx`'s span context into `md` (nothing when it is invalid).
pub fn inject_context(cx: &Context, md: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(md));
}

/// The remote context carried by HTTP/2 request headers (empty when there
/// is none or it is malformed).
pub fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The remote context carried by gRPC metadata.
pub fn extract_metadata(md: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(md))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn remote() -> Context {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("nsm", "x")]).unwrap(),
        );
        Context::new().with_remote_span_context(sc)
    }

    #[test]
    fn inject_writes_w3c_traceparent() {
        let mut md = MetadataMap::new();
        inject_context(&remote(), &mut md);
        assert_eq!(md.get(TRACEPARENT).unwrap(), TP);
        assert_eq!(md.get(TRACESTATE).unwrap(), "nsm=x");
    }

    #[test]
    fn extract_round_trips_through_metadata_and_headers() {
        let mut md = MetadataMap::new();
        inject_context(&remote(), &mut md);
        for cx in [extract_metadata(&md), extract(&md.clone().into_headers())] {
            let sc = cx.span().span_context().clone();
            assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
            assert_eq!(
                sc.trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
            assert_eq!(sc.trace_state().get("nsm"), Some("x"));
        }
    }

    #[test]
    fn malformed_or_absent_traceparent_gives_no_parent() {
        let mut h = HeaderMap::new();
        assert!(!extract(&h).span().span_context().is_valid());
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            h.insert(TRACEPARENT, bad.parse().unwrap());
            assert!(!extract(&h).span().span_context().is_valid(), "{bad}");
        }
    }

    #[test]
    fn inject_without_a_span_or_incoming_writes_nothing() {
        let mut md = MetadataMap::new();
        inject(&mut md);
        assert!(md.get(TRACEPARENT).is_none());
        inject_context(&Context::new(), &mut md);
        assert!(md.get(TRACEPARENT).is_none());
    }

    #[tokio::test]
    async fn inject_passes_the_incoming_headers_on_when_not_exporting() {
        let inc = Incoming {
            traceparent: Some(TP.into()),
            tracestate: Some("nsm=x".into()),
        };
        let md = INCOMING
            .scope(inc, async {
                let mut md = MetadataMap::new();
                inject(&mut md);
                md
            })
            .await;
        assert_eq!(md.get(TRACEPARENT).unwrap(), TP);
        assert_eq!(md.get(TRACESTATE).unwrap(), "nsm=x");
    }
}
