//! The process's `tracing` subscriber: logs on stderr, and spans exported
//! over OTLP/gRPC when (and only when) an endpoint is configured.
//!
//! Configuration follows the OpenTelemetry conventions:
//!
//! | setting | flag | environment | default |
//! |---|---|---|---|
//! | collector (OTLP/gRPC) | `--otlp-endpoint URL` | `OTEL_EXPORTER_OTLP_ENDPOINT` | none: no exporter |
//! | service name | | `OTEL_SERVICE_NAME` | `PROGRAM@NODE` (e.g. `nsm-manager@node-1`) |
//! | batch delay | | `OTEL_BSP_SCHEDULE_DELAY` (ms) | 5000 |
//!
//! The flag wins over the environment. An empty value means unset.
//!
//! The exporter gets its own one-thread tokio runtime, so that it works
//! before and after the program's own runtime and never competes with it;
//! [`Telemetry`]'s drop flushes what is buffered (bounded by the export
//! timeout) and stops it.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// The OpenTelemetry variable that turns export on.
pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The OpenTelemetry variable naming the service.
pub const SERVICE_NAME_ENV: &str = "OTEL_SERVICE_NAME";
/// Bound on one export call (seconds).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`init`] sets up; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceConfig {
    /// OTLP/gRPC collector URL (`http://HOST:4317`); `None`: no export.
    pub endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// The node (or, for endpoints, the endpoint) this process serves:
    /// the `nsm.node` resource attribute.
    pub node: String,
}

impl TraceConfig {
    /// From the flag (`--otlp-endpoint`) and the process environment.
    pub fn from_env(program: &str, node: &str, flag: Option<&str>) -> TraceConfig {
        TraceConfig::from_vars(program, node, flag, |k| std::env::var(k).ok())
    }

    /// From the flag and a variable lookup (tests pass a map).
    pub fn from_vars(
        program: &str,
        node: &str,
        flag: Option<&str>,
        var: impl Fn(&str) -> Option<String>,
    ) -> TraceConfig {
        let set = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
        TraceConfig {
            endpoint: set(flag.map(str::to_string)).or_else(|| set(var(ENDPOINT_ENV))),
            service_name: set(var(SERVICE_NAME_ENV)).unwrap_or_else(|| format!("{program}@{node}")),
            node: node.to_string(),
        }
    }
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The exporter's runtime could not start.
    #[error("OTLP exporter runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The endpoint is not a usable URL.
    #[error("OTLP endpoint `{endpoint}`: {message}")]
    Endpoint {
        /// The configured endpoint.
        endpoint: String,
        /// What is wrong with it.
        message: String,
    },
    /// A global subscriber is already installed.
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the exporter alive; dropping it flushes and stops export.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered now (waits for the export).
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// The logs layer every program had: stderr, colours only on a terminal,
/// `RUST_LOG` (default `info`).
fn logs_layer<S>() -> impl Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
}

/// Builds the OTLP span pipeline (without installing it): a tracer
/// provider with a batch processor and the exporter's own runtime.
///
/// # Errors
/// [`TraceError::Runtime`], [`TraceError::Endpoint`].
pub fn pipeline(cfg: &TraceConfig) -> Result<Telemetry, TraceError> {
    let Some(endpoint) = &cfg.endpoint else {
        return Ok(Telemetry::default());
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(TraceError::Runtime)?;
    // The channel is made (lazily connected) on the exporter's runtime.
    let exporter = {
        let _rt = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TraceError::Endpoint {
                endpoint: endpoint.clone(),
                message: e.to_string(),
            })?
    };
    let resource = Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .with_attribute(KeyValue::new(crate::ATTR_NODE, cfg.node.clone()))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    Ok(Telemetry {
        provider: Some(provider),
        runtime: Some(runtime),
    })
}

/// Installs the global subscriber: the logs on stderr, plus the
/// OpenTelemetry layer when `cfg.endpoint` is set. Keep the returned
/// value until the program ends.
///
/// The OpenTelemetry layer sees `info` and above whatever `RUST_LOG` says
/// (the mesh's request spans are `info`), and nothing from the exporter's
/// own stack (`h2`, `hyper`, `tonic`, `tower`, `opentelemetry*`), which
/// would otherwise trace its own exports.
///
/// # Errors
/// [`TraceError`]; the logs are not set up then.
pub fn init(cfg: &TraceConfig) -> Result<Telemetry, TraceError> {
    let telemetry = pipeline(cfg)?;
    let otel = telemetry.provider.as_ref().map(|p| {
        let quiet = Targets::new()
            .with_default(LevelFilter::INFO)
            .with_target("h2", LevelFilter::OFF)
            .with_target("hyper", LevelFilter::OFF)
            .with_target("hyper_util", LevelFilter::OFF)
            .with_target("tonic", LevelFilter::OFF)
            .with_target("tower", LevelFilter::OFF)
            .with_target("opentelemetry", LevelFilter::OFF)
            .with_target("opentelemetry_sdk", LevelFilter::OFF)
            .with_target("opentelemetry_otlp", LevelFilter::OFF);
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("nsm-rs"))
            .with_filter(quiet)
    });
    Registry::default()
        .with(logs_layer())
        .with(otel)
        .try_init()
        .map_err(|_| TraceError::AlreadyInstalled)?;
    if let Some(e) = &cfg.endpoint {
        tracing::info!(endpoint = %e, service = %cfg.service_name, "exporting traces over OTLP/gRPC");
    }
    Ok(telemetry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(flag: Option<&str>, env: &[(&str, &str)]) -> TraceConfig {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TraceConfig::from_vars("nsm-manager", "node-1", flag, |k| env.get(k).cloned())
    }

    #[test]
    fn no_endpoint_means_no_exporter() {
        let c = cfg(None, &[]);
        assert_eq!(c.endpoint, None);
        assert_eq!(c.service_name, "nsm-manager@node-1");
        assert!(!pipeline(&c).unwrap().exporting());
        assert_eq!(cfg(None, &[(ENDPOINT_ENV, " ")]).endpoint, None);
    }

    #[test]
    fn flag_wins_over_environment() {
        let c = cfg(
            Some("http://192.0.2.1:4317"),
            &[
                (ENDPOINT_ENV, "http://192.0.2.2:4317"),
                (SERVICE_NAME_ENV, "mgr"),
            ],
        );
        assert_eq!(c.endpoint.as_deref(), Some("http://192.0.2.1:4317"));
        assert_eq!(c.service_name, "mgr");
        let c = cfg(None, &[(ENDPOINT_ENV, "http://192.0.2.2:4317")]);
        assert_eq!(c.endpoint.as_deref(), Some("http://192.0.2.2:4317"));
    }

    #[test]
    fn an_endpoint_builds_a_lazy_exporter() {
        // Nothing listens there: building must not connect.
        let t = pipeline(&cfg(Some("http://192.0.2.1:4317"), &[])).unwrap();
        assert!(t.exporting());
    }
}
