//! `nsm-manager`: the control plane of one node, as a process.
//!
//! Thin shell over [`nsm_manager::server::start`]: parses flags, loads the
//! config, logs to stderr, and turns SIGTERM/SIGINT into a graceful shutdown
//! (listeners closed, state kept, cross-connects left programmed). It holds
//! no logic of its own so that tests exercise the same code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nsm_manager::config::Config;
use nsm_manager::identity::IdentityPaths;
use nsm_manager::server::{Options, Security, start};

/// The nsm-rs control plane of one node: NSM-compatible gRPC API (NetworkService,
/// MonitorConnection, registries), endpoint selection, IPAM, connection lifecycle.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Node name; used as the name of this manager's path segments.
    #[arg(long, env = "NSM_NAME")]
    name: String,
    /// Unix socket for local clients (NSCs, endpoints, CNI plugin, nsmctl).
    #[arg(long, default_value = "/var/lib/networkservicemesh/nsm.io.sock")]
    listen: PathBuf,
    /// TCP address (IP:PORT) peer managers connect to.
    #[arg(long, default_value = "0.0.0.0:5001")]
    peer_listen: SocketAddr,
    /// URL peers use to reach this manager, e.g. tcp://192.0.2.1:5001. Default: the
    /// --peer-listen address, with 0.0.0.0 replaced by this host's source address
    /// towards 192.0.2.1 (pass it explicitly on multi-homed hosts).
    #[arg(long)]
    advertise_url: Option<String>,
    /// Serve Prometheus metrics (OpenMetrics text) at http://IP:PORT/metrics:
    /// Request and heal latency, requests by outcome, connections, registry
    /// sizes. Absent: no metrics server.
    #[arg(long, env = "NSM_METRICS_LISTEN", value_name = "IP:PORT")]
    metrics_listen: Option<SocketAddr>,
    /// Unix socket of this node's nsm-forwarder.
    #[arg(long, default_value = "/var/lib/networkservicemesh/forwarder.sock")]
    forwarder: PathBuf,
    /// Directory of the durable state (connections, registry, IPAM leases), one
    /// JSON file per table, written atomically.
    #[arg(long, default_value = "/var/lib/nsm-manager")]
    state_dir: PathBuf,
    /// URL (tcp://IP:PORT) of the manager that serves the lab's registry and IPAM.
    /// Absent: this manager serves them (and needs --config for address pools).
    #[arg(long)]
    registry: Option<String>,
    /// YAML file with the network services and their address pools:
    /// `services: [{name, payload: IP|ETHERNET, cidr: [CIDR...], excluded: [CIDR...]}]`.
    /// In cluster mode give every manager the same file (one ConfigMap): each
    /// allocates inside address blocks (/28, /124) it claims as IPAMBlock
    /// objects, so no address is handed out twice in the cluster.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Service-chaining policies (YAML or JSON, `policies: [...]`; the language
    /// is in the README). Re-read every second: a change applies to running
    /// connections in place; a bad change is logged naming the policy and the
    /// policies in force stay. Give every manager of a mesh the same file.
    #[arg(long)]
    policies: Option<PathBuf>,
    /// Check the --policies file, print what it contains, and exit (0 when it is
    /// valid, 2 when not) without starting.
    #[arg(long, requires = "policies")]
    check_policies: bool,
    /// Lifetime of a path segment (token): a connection not refreshed within it is
    /// closed. Units: ms, s, m or h (e.g. 600s, 10m).
    #[arg(long, default_value = "10m", value_parser = nsm_manager::parse_duration)]
    max_token_lifetime: std::time::Duration,
    /// Cluster mode with this kubeconfig: the registry is the cluster's
    /// NetworkService/NetworkServiceEndpoint objects, and the pods scheduled to
    /// --name are watched for their networkservicemesh.io annotation.
    #[arg(long, env = "NSM_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Cluster mode with the in-cluster config (the pod's service account);
    /// implied by --kubeconfig.
    #[arg(long)]
    kubernetes: bool,
    /// Namespace of the NSM objects in cluster mode.
    #[arg(long, env = "NSM_NAMESPACE", default_value = "nsm-system")]
    namespace: String,
    /// Directory holding this manager's identity: cert.pem (SPIFFE X.509),
    /// key.pem (0600) and ca.pem (trust bundle), as `nsmctl ca issue --out`
    /// writes them. Turns on mTLS to peers and signed path segments.
    /// Without it (or the --tls-* trio) the manager runs in INSECURE mode.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    identity_dir: Option<PathBuf>,
    /// The identity's certificate (PEM), instead of --identity-dir.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The identity's private key (PEM PKCS#8, should be mode 0600).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The trust bundle (PEM CA certificates of the trust domain).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Talk mTLS to the forwarder: it runs with its own identity
    /// (`nsm-forwarder --identity-dir`, spiffe://TD/nsm-forwarder/NODE) and
    /// accepts only managers; we accept only a forwarder of our trust
    /// domain. Needs --identity-dir (or the --tls-* trio).
    #[arg(long)]
    forwarder_mtls: bool,
    /// How often the identity files are checked for rotation (ms, s, m, h).
    #[arg(long, default_value = "5s", value_parser = nsm_manager::parse_duration)]
    identity_reload: std::time::Duration,
    /// OTLP/gRPC collector (e.g. http://192.0.2.9:4317) to export the spans
    /// of Requests and Closes to. Default: $OTEL_EXPORTER_OTLP_ENDPOINT;
    /// neither set = no export. The service name is $OTEL_SERVICE_NAME or
    /// nsm-manager@NAME.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.forwarder_mtls && args.identity_dir.is_none() && args.tls_cert.is_none() {
        eprintln!(
            "nsm-manager: --forwarder-mtls needs an identity (--identity-dir or --tls-cert/--tls-key/--tls-ca)"
        );
        return ExitCode::from(2);
    }
    // Logs on stderr (RUST_LOG, default info; colours only on a terminal),
    // and spans over OTLP when an endpoint is configured.
    let trace =
        nsm_trace::TraceConfig::from_env("nsm-manager", &args.name, args.otlp_endpoint.as_deref());
    let _telemetry = match nsm_trace::init(&trace) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("nsm-manager: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match &args.config {
        Some(p) => match Config::load(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("nsm-manager: config {e}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    let policies = match args.policies.as_deref().map(nsm_manager::policies::load) {
        None => None,
        Some(Ok((set, text))) => {
            if args.check_policies {
                for p in set.policies() {
                    println!(
                        "policy {} (priority {}): service {}, {} function(s)",
                        p.name,
                        p.priority,
                        p.matches.service,
                        p.chain.len()
                    );
                }
                println!("{} policies, valid", set.policies().len());
                return ExitCode::SUCCESS;
            }
            Some((set, text))
        }
        Some(Err(e)) => {
            eprintln!("nsm-manager: {e}");
            return ExitCode::from(2);
        }
    };
    if args.registry.is_some() && !config.services.is_empty() {
        tracing::warn!("--config pools are ignored: --registry names the manager that owns IPAM");
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nsm-manager: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let cluster = if args.kubernetes || args.kubeconfig.is_some() {
            match nsm_manager::cluster::client(args.kubeconfig.as_deref()).await {
                Ok(client) => Some(nsm_manager::cluster::ClusterOptions {
                    client,
                    namespace: args.namespace,
                }),
                Err(e) => {
                    eprintln!("nsm-manager: {e}");
                    return ExitCode::from(2);
                }
            }
        } else {
            None
        };
        let opts = Options {
            name: args.name,
            listen: args.listen,
            peer_listen: args.peer_listen,
            advertise_url: args.advertise_url,
            forwarder: args.forwarder,
            state_dir: Some(args.state_dir),
            registry: args.registry,
            config,
            max_token_lifetime: args.max_token_lifetime,
            cluster,
            security: Security {
                identity: match (args.identity_dir, args.tls_cert, args.tls_key, args.tls_ca) {
                    (Some(d), ..) => Some(IdentityPaths::in_dir(&d)),
                    (None, Some(cert), Some(key), Some(ca)) => {
                        Some(IdentityPaths { cert, key, ca })
                    }
                    _ => None,
                },
                reload_period: args.identity_reload,
                forwarder_mtls: args.forwarder_mtls,
            },
        };
        let metrics = match args.metrics_listen {
            Some(addr) => match nsm_proto::metrics_http::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!("nsm-manager: metrics listener {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        let mut handle = match start(opts).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("nsm-manager: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(l) = metrics {
            let task =
                nsm_manager::metrics::serve(l, handle.manager.clone(), handle.registry.clone());
            handle.spawn(task);
        }
        if let (Some(path), Some((set, text))) = (args.policies, policies) {
            if let Err(e) = handle
                .manager
                .set_policy_source(nsm_manager::policies::FILE, set.policies().to_vec())
                .await
            {
                // Only a clash with the cluster's policies can get here.
                tracing::error!(error = %e, "policies rejected");
            }
            handle.spawn(nsm_manager::policies::watch(
                handle.manager.clone(),
                path,
                text,
            ));
        }
        wait_for_signal().await;
        tracing::info!("shutting down (state kept)");
        handle.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_manager::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").unwrap().as_secs(), 600);
        assert_eq!(parse_duration("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse_duration("3").unwrap().as_secs(), 3);
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1d").is_err());
        Args::parse_from(["nsm-manager", "--name", "n"]);
    }
}
