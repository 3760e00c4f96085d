//! `nsm-passthrough`: a passthrough network service endpoint, the chain
//! function of NSM composition.
//!
//! Thin shell over the `nsm_passthrough` library: parses the command line,
//! serves and registers the endpoint through the local manager (retrying
//! while the manager starts), writes the stats file every second, and on
//! SIGTERM/SIGINT closes every onward connection, unregisters, writes the
//! stats a last time and exits 0. Bad arguments exit 2.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nsm_manager::endpoint::{EndpointOptions, Registration, serve_and_register};
use nsm_passthrough::service::{Passthrough, PassthroughConfig};
use nsm_passthrough::stats;
use tokio::signal::unix::{Signal, SignalKind, signal};

const LONG_ABOUT: &str = "\
A passthrough network service endpoint: a chain function of the mesh.

It registers through the local manager as an endpoint of --service (with
--labels), typically a function service such as `inspector` that policies
steer connections through. When the manager steers a client's connection
through it, it requests the connection's own network service (the client's
original service, as named in the incoming connection) onward from the
manager, with its own path segment appended and the connection's addresses
unchanged, to get an onward connection towards the next endpoint. It then forwards every packet between the interface of the
incoming connection (named by the request's KERNEL mechanism) and the one of
its onward connection (pto-XXXXXXXX), both in its own network namespace, in
both directions, counting packets and bytes per connection and direction.

Refreshes of the incoming connection refresh the onward one; closing it
closes the onward one. On SIGTERM or SIGINT it closes every onward
connection, unregisters and exits 0. Needs CAP_NET_RAW (packet sockets).

--stats FILE is rewritten atomically every second and at exit:
{\"name\": NSE, \"connections\": {\"<incoming id>\": {\"incoming_if\": ..,
\"onward_if\": .., \"forward\": {\"packets\": N, \"bytes\": N}, \"reverse\": {..}}},
\"total\": {\"forward\": {..}, \"reverse\": {..}}}
forward = incoming to onward (client to endpoint), reverse = back; total
includes closed connections.";

/// A passthrough NSM endpoint (a chain function): forwards a client's
/// connection onward to its network service, counting the packets.
#[derive(Debug, Parser)]
#[command(version, about, long_about = LONG_ABOUT)]
struct Args {
    /// Endpoint name, unique in the lab (also the name of its path segment).
    #[arg(long)]
    name: String,
    /// The network service this endpoint registers for (e.g. a function
    /// service that policies steer through). Onward requests name the
    /// incoming connection's service instead.
    #[arg(long)]
    service: String,
    /// Labels for the service, k=v,k2=v2 (matched by destination selectors).
    #[arg(long, default_value = "")]
    labels: String,
    /// Labels set on onward requests over the client's, k=v,... (as NSM's
    /// passthroughs do for composition by registry matches, e.g.
    /// app=firewall with a `source_selector: {app: firewall}` route onward).
    #[arg(long, default_value = "")]
    onward_labels: String,
    /// The local manager's unix socket (registration and onward requests).
    #[arg(long, default_value = "/var/lib/networkservicemesh/nsm.io.sock")]
    manager: PathBuf,
    /// Unix socket this endpoint serves on (registered as unix://PATH).
    #[arg(long)]
    listen: PathBuf,
    /// Registration lifetime in seconds (at least 3); refreshed every third
    /// of it.
    #[arg(long, default_value_t = 60)]
    registration_lifetime_secs: u64,
    /// JSON counters file, rewritten atomically every second and at exit.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// OTLP/gRPC collector to export spans to (default:
    /// $OTEL_EXPORTER_OTLP_ENDPOINT; neither = no export). Service name:
    /// $OTEL_SERVICE_NAME or nsm-passthrough@NAME.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
}

/// `EX_USAGE`-like exit for bad arguments, as clap does.
const BAD_ARGS: u8 = 2;

fn bad(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("nsm-passthrough: {msg}");
    ExitCode::from(BAD_ARGS)
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Logs on stderr (RUST_LOG, e.g. `nsm_passthrough=debug` shows
    // refreshes; info by default; colours only on a terminal), and spans
    // over OTLP when an endpoint is configured.
    let trace = nsm_trace::TraceConfig::from_env(
        "nsm-passthrough",
        &args.name,
        args.otlp_endpoint.as_deref(),
    );
    let _telemetry = match nsm_trace::init(&trace) {
        Ok(t) => t,
        Err(e) => return bad(e),
    };
    if args.name.trim().is_empty() {
        return bad("--name must not be empty");
    }
    if args.service.trim().is_empty() {
        return bad("--service must not be empty");
    }
    if args.listen.as_os_str().is_empty() {
        return bad("--listen must not be empty");
    }
    if args.registration_lifetime_secs < 3 {
        return bad("--registration-lifetime-secs must be at least 3");
    }
    let labels = match nsm_manager::parse_labels(&args.labels) {
        Ok(l) => l,
        Err(e) => return bad(format_args!("--labels: {e}")),
    };
    let onward_labels = match nsm_manager::parse_labels(&args.onward_labels) {
        Ok(l) => l.into_iter().collect(),
        Err(e) => return bad(format_args!("--onward-labels: {e}")),
    };
    // A parent may have left SIGTERM/SIGINT blocked in the mask we
    // inherited (a blocked mask survives exec); then we could never be told
    // to stop cleanly. Unblock them before any thread exists.
    if let Err(e) = unblock_stop_signals() {
        eprintln!("nsm-passthrough: cannot unblock SIGTERM/SIGINT: {e}");
        return ExitCode::FAILURE;
    }
    let Ok(rt) = tokio::runtime::Runtime::new() else {
        eprintln!("nsm-passthrough: cannot start the runtime");
        return ExitCode::FAILURE;
    };
    // The manager client is made (lazily connected) on the runtime.
    let _rt = rt.enter();
    let pt = Passthrough::new(PassthroughConfig {
        onward_labels,
        ..PassthroughConfig::new(&args.name, args.manager.clone())
    });
    if let Some(path) = &args.stats {
        // Fail now, not silently every second.
        if let Err(e) = stats::write_atomic(path, &pt.stats().snapshot()) {
            return bad(format_args!("--stats {}: {e}", path.display()));
        }
    }
    if let Err(e) = nsm_passthrough::engine::check_packet_sockets() {
        eprintln!("nsm-passthrough: cannot open packet sockets (needs CAP_NET_RAW): {e}");
        return ExitCode::FAILURE;
    }
    let opts = EndpointOptions {
        name: args.name,
        service: args.service,
        labels,
        manager: args.manager,
        listen: args.listen,
        registration_lifetime: Duration::from_secs(args.registration_lifetime_secs),
        inode_url: None,
        identity: None,
    };
    rt.block_on(run(opts, pt, args.stats))
}

async fn run(opts: EndpointOptions, pt: Passthrough, stats_path: Option<PathBuf>) -> ExitCode {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("nsm-passthrough: cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let writer = stats_path.clone().map(|path| {
        let pt = pt.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut failing = false;
            loop {
                tick.tick().await;
                match stats::write_atomic(&path, &pt.stats().snapshot()) {
                    Ok(()) if failing => {
                        tracing::info!(path = %path.display(), "stats written again");
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot write stats");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        })
    });
    let start = tokio::select! {
        r = register(&opts, &pt) => r.map_or(Start::Failed, |r| Start::Registered(Box::new(r))),
        () = signalled(&mut term, &mut int) => Start::Signalled,
    };
    let code = match start {
        Start::Registered(reg) => {
            signalled(&mut term, &mut int).await;
            tracing::info!("shutting down");
            pt.close_all().await;
            reg.shutdown().await;
            // Anything requested while we were unregistering.
            pt.close_all().await;
            ExitCode::SUCCESS
        }
        // Nothing was served yet, so there is nothing to close.
        Start::Signalled => ExitCode::SUCCESS,
        Start::Failed => ExitCode::FAILURE,
    };
    if let Some(w) = writer {
        w.abort();
    }
    if let Some(path) = &stats_path
        && let Err(e) = stats::write_atomic(path, &pt.stats().snapshot())
    {
        tracing::error!(path = %path.display(), error = %e, "cannot write the final stats");
    }
    code
}

fn unblock_stop_signals() -> nix::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_unblock()
}

/// How the start ended.
enum Start {
    Registered(Box<Registration>),
    /// Registration kept failing.
    Failed,
    /// SIGTERM/SIGINT before registration succeeded.
    Signalled,
}

async fn signalled(term: &mut Signal, int: &mut Signal) {
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// Serves and registers, retrying for 30 s while the manager is not up.
async fn register(opts: &EndpointOptions, pt: &Passthrough) -> Option<Registration> {
    let mut tries = 0;
    loop {
        match serve_and_register(opts, pt.clone()).await {
            Ok(r) => return Some(r),
            Err(e) if tries < 30 => {
                tracing::warn!(error = %e, "not registered yet; retrying");
                tries += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                eprintln!("nsm-passthrough: {e}");
                return None;
            }
        }
    }
}
