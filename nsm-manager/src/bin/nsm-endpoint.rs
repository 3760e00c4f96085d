//! `nsm-endpoint`: a minimal network service endpoint for a pod.
//!
//! Thin shell over [`nsm_manager::endpoint`]: serves NetworkService on its
//! own socket, registers through the local manager, refreshes, and
//! unregisters on SIGTERM. It never moves packets.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nsm_manager::endpoint::{EndpointOptions, start_endpoint};

/// A minimal NSM endpoint: accepts every connection of one network service; the
/// forwarder puts the interface into this process's network namespace.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Endpoint name, unique in the lab.
    #[arg(long)]
    name: String,
    /// The network service this endpoint offers.
    #[arg(long)]
    service: String,
    /// Labels for the service, k=v,k2=v2 (matched by destination selectors).
    #[arg(long, default_value = "")]
    labels: String,
    /// The local manager's unix socket.
    #[arg(long, default_value = "/var/lib/networkservicemesh/nsm.io.sock")]
    manager: PathBuf,
    /// Unix socket this endpoint serves on (registered as unix://PATH).
    #[arg(long)]
    listen: PathBuf,
    /// Registration lifetime in seconds; refreshed every third of it.
    #[arg(long, default_value_t = 60)]
    registration_lifetime_secs: u64,
    /// OTLP/gRPC collector to export spans to (default:
    /// $OTEL_EXPORTER_OTLP_ENDPOINT; neither = no export). Service name:
    /// $OTEL_SERVICE_NAME or nsm-endpoint@NAME.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Directory with this endpoint's identity: cert.pem (SPIFFE X.509 for
    /// spiffe://TD/nsm-endpoint/NAME, from `nsmctl ca issue`), key.pem and the
    /// trust bundle ca.pem; re-read when they change. With it, a Request is
    /// accepted only when its caller's path segment is signed for this
    /// endpoint by a certificate of the bundle (a mesh manager); anything
    /// else is PermissionDenied. Without it, whoever reaches --listen is trusted.
    #[arg(long, value_name = "DIR")]
    identity_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Logs on stderr; spans over OTLP when an endpoint is configured.
    let trace =
        nsm_trace::TraceConfig::from_env("nsm-endpoint", &args.name, args.otlp_endpoint.as_deref());
    let _telemetry = match nsm_trace::init(&trace) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("nsm-endpoint: {e}");
            return ExitCode::from(2);
        }
    };
    let labels = match nsm_manager::parse_labels(&args.labels) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("nsm-endpoint: --labels: {e}");
            return ExitCode::from(2);
        }
    };
    let Ok(rt) = tokio::runtime::Runtime::new() else {
        eprintln!("nsm-endpoint: cannot start the runtime");
        return ExitCode::FAILURE;
    };
    rt.block_on(async move {
        let opts = EndpointOptions {
            name: args.name,
            service: args.service,
            labels,
            manager: args.manager,
            listen: args.listen,
            registration_lifetime: Duration::from_secs(args.registration_lifetime_secs.max(3)),
            inode_url: None,
            identity: args
                .identity_dir
                .as_deref()
                .map(nsm_manager::identity::IdentityPaths::in_dir),
        };
        // The manager may come up after us: retry registration for a while.
        let mut tries = 0;
        let handle = loop {
            match start_endpoint(opts.clone()).await {
                Ok(h) => break h,
                Err(e @ nsm_manager::endpoint::EndpointError::Identity(_)) => {
                    eprintln!("nsm-endpoint: {e}");
                    return ExitCode::from(2);
                }
                Err(e) if tries < 30 => {
                    tracing::warn!(error = %e, "not registered yet; retrying");
                    tries += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    eprintln!("nsm-endpoint: {e}");
                    return ExitCode::FAILURE;
                }
            }
        };
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut t), Ok(mut i)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        handle.shutdown().await;
        ExitCode::SUCCESS
    })
}
