//! `nsmctl`: an operator's client of the local nsm-manager (unix socket).
//!
//! Requests and closes connections as an NSM client would, lists the
//! registry, the connections and the local forwarder's cross-connects,
//! describes one connection hop by hop, and draws the mesh. It holds no
//! state and no logic beyond gathering and formatting (in
//! `nsm_manager::inspect` and `nsm_manager::graph`): everything goes through
//! the manager's public gRPC API and the forwarder's `nsm.forwarder.v1` API.
//!
//! Exit codes: 0 success, 1 failure (the mesh refused, something is
//! unreachable, an unknown connection id), 2 bad usage (including an
//! ambiguous id prefix).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use nsm_manager::inspect::{self, ForwarderView, LookupError};
use nsm_proto::connection::Connection;
use nsm_proto::mechanisms::kernel;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
use tonic::transport::Channel;

/// Talk to the local nsm-manager and forwarder: request/close connections,
/// list and describe what the mesh holds, draw it.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The manager's unix socket.
    #[arg(
        long,
        default_value = "/var/lib/networkservicemesh/nsm.io.sock",
        global = true
    )]
    manager: PathBuf,
    /// A forwarder's unix socket (repeat for several) for `get forwarders`,
    /// `describe`, `graph` and `top`. Default: /var/lib/networkservicemesh/forwarder.sock
    /// (the manager's default --forwarder).
    #[arg(long, global = true, value_name = "PATH")]
    forwarder: Vec<PathBuf>,
    /// A manager identity directory (cert.pem, key.pem, ca.pem; e.g. the
    /// node manager's --identity-dir) to read forwarders that run with an
    /// identity of their own: their API socket speaks mTLS to managers only.
    #[arg(long, global = true, value_name = "DIR")]
    identity_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Request a connection to SERVICE for the namespace at --netns; prints it.
    Request {
        /// Network service name.
        service: String,
        /// The client's network namespace (a path, e.g. /run/netns/pod-a).
        #[arg(long)]
        netns: PathBuf,
        /// Interface name in the namespace (at most 15 bytes).
        #[arg(long, default_value = "nsm-1")]
        ifname: String,
        /// Request labels, k=v,k2=v2.
        #[arg(long, default_value = "")]
        labels: String,
        /// Let the manager refresh the connection until `close` (metadata nsm-managed: true).
        #[arg(long)]
        managed: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Close the connection with this id.
    Close {
        /// Connection id, as printed by `request` or `get connections`.
        id: String,
    },
    /// The mesh CA and identities (works on files; no manager needed).
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// List services, endpoints, connections or forwarders.
    Get {
        /// What to list.
        what: What,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one object in detail.
    Describe {
        #[command(subcommand)]
        what: DescribeCmd,
    },
    /// Draw the mesh seen from this manager (and the forwarders read):
    /// nodes, pods, endpoints, services, connections and their chains.
    #[command(group(ArgGroup::new("out").required(true).multiple(true).args(["svg", "dot"])))]
    Graph {
        /// Write an SVG picture here (`-` for standard output).
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
        /// Write a Graphviz DOT graph here (`-` for standard output).
        #[arg(long, value_name = "FILE")]
        dot: Option<PathBuf>,
        /// Another manager's unix socket (repeat for several): its
        /// connections, endpoints and services join the picture (deduplicated
        /// by connection and name), so one picture shows a whole lab.
        #[arg(long, value_name = "PATH")]
        also_manager: Vec<PathBuf>,
    },
    /// Live per-cross-connect rates from the forwarders (--forwarder):
    /// packets/s, bits/s and drops/s from the counter deltas between two
    /// reads of their List, sorted by total bits/s.
    Top {
        /// Time between frames (ms, s, m, h).
        #[arg(long, default_value = "1s", value_parser = nsm_manager::parse_duration)]
        interval: std::time::Duration,
        /// Stop after N frames (the first frame needs two reads, one
        /// interval apart). Default: until interrupted.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Print one JSON object per frame, one per line, instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CaCmd {
    /// Create a mesh CA in DIR: ca.pem and ca.key (0600).
    Create {
        /// Where the CA files go.
        #[arg(long)]
        dir: PathBuf,
        /// The trust domain (the CA's spiffe://TRUST_DOMAIN).
        #[arg(long, default_value = "nsm.local")]
        trust_domain: String,
        /// Validity of the CA (ms, s, m, h).
        #[arg(long, default_value = "8760h", value_parser = nsm_manager::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Issue (or rotate) a certificate for a SPIFFE ID into OUT:
    /// cert.pem, key.pem (0600), ca.pem.
    Issue {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// spiffe://TRUST_DOMAIN/PATH (e.g. spiffe://nsm.local/nsm-manager/node1).
        #[arg(long)]
        id: String,
        /// Validity (ms, s, m, h); short-lived by design: rotate before it ends.
        #[arg(long, default_value = "1h", value_parser = nsm_manager::parse_duration)]
        ttl: std::time::Duration,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum What {
    Services,
    Endpoints,
    Connections,
    /// The forwarders read from --forwarder, with their cross-connects.
    Forwarders,
}

#[derive(Debug, Subcommand)]
enum DescribeCmd {
    /// A connection hop by hop, with what the forwarders report about it.
    Connection {
        /// Connection id, or an unambiguous prefix of it (a path segment
        /// id, as another node knows the connection, works too).
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// A failure, and the exit code it gets.
#[derive(Debug)]
enum Failure {
    /// Exit 1: the mesh said no, or something is unreachable or unknown.
    Failed(String),
    /// Exit 2: the command line cannot be carried out as given.
    Usage(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Failed(s)
    }
}

impl From<&str> for Failure {
    fn from(s: &str) -> Self {
        Failure::Failed(s.to_string())
    }
}

impl From<inspect::FetchError> for Failure {
    fn from(e: inspect::FetchError) -> Self {
        Failure::Failed(e.to_string())
    }
}

fn ca(cmd: CaCmd) -> Result<(), String> {
    match cmd {
        CaCmd::Create {
            dir,
            trust_domain,
            ttl,
        } => {
            nsm_manager::identity::create_ca(&dir, &trust_domain, ttl)
                .map_err(|e| e.to_string())?;
            println!("CA for spiffe://{trust_domain} in {}", dir.display());
        }
        CaCmd::Issue { dir, id, ttl, out } => {
            nsm_manager::identity::issue(&dir, &id, ttl, &out).map_err(|e| e.to_string())?;
            println!("{id} in {} (valid {}s)", out.display(), ttl.as_secs());
        }
    }
    Ok(())
}

fn print_table(t: &inspect::Table) {
    print!("{}", t.render());
}

async fn manager(path: &Path) -> Result<Channel, Failure> {
    nsm_proto::uds::connect_unix(path).await.map_err(|e| {
        Failure::Failed(format!(
            "cannot reach nsm-manager at {}: {e}",
            path.display()
        ))
    })
}

/// mTLS for reading forwarders (`--identity-dir`), set once at start.
static FORWARDER_TLS: std::sync::OnceLock<Option<std::sync::Arc<nsm_manager::tls::Tls>>> =
    std::sync::OnceLock::new();

/// The forwarders given with --forwarder, or the default one.
fn forwarder_paths(args: &[PathBuf]) -> (Vec<PathBuf>, bool) {
    if args.is_empty() {
        (
            vec![PathBuf::from(inspect::DEFAULT_FORWARDER_SOCKET)],
            false,
        )
    } else {
        (args.to_vec(), true)
    }
}

/// Reads every forwarder; `required` makes an unreachable one an error,
/// otherwise it is a note on stderr (or nothing, for the default socket
/// when it does not exist).
async fn forwarders(paths: &[PathBuf], required: bool) -> Result<Vec<ForwarderView>, Failure> {
    let (paths, explicit) = forwarder_paths(paths);
    let tls = FORWARDER_TLS.get().and_then(Option::as_ref);
    let mut out = Vec::new();
    for p in &paths {
        match inspect::fetch_forwarder(p, tls).await {
            Ok(v) => out.push(v),
            Err(e) if required => {
                return Err(Failure::Failed(format!(
                    "{e}; is nsm-forwarder serving there? (--forwarder PATH; one with an identity answers managers only: --identity-dir)"
                )));
            }
            Err(_) if !explicit && !p.exists() => {}
            Err(e) => eprintln!("nsmctl: note: {e}; going on without it"),
        }
    }
    Ok(out)
}

fn write_out(path: &Path, what: &str, body: &str) -> Result<(), Failure> {
    if path == Path::new("-") {
        print!("{body}");
        return Ok(());
    }
    std::fs::write(path, body)
        .map_err(|e| Failure::Failed(format!("write {what} to {}: {e}", path.display())))?;
    eprintln!("nsmctl: {what} written to {}", path.display());
    Ok(())
}

async fn run(args: Args) -> Result<(), Failure> {
    let st = |what: &str| {
        let what = what.to_string();
        move |s: tonic::Status| Failure::Failed(format!("{what}: {} ({:?})", s.message(), s.code()))
    };
    let now = SystemTime::now();
    match args.cmd {
        Cmd::Ca { cmd } => ca(cmd)?,
        Cmd::Request {
            service,
            netns,
            ifname,
            labels,
            managed,
            json,
        } => {
            let labels = nsm_manager::parse_labels(&labels)
                .map_err(|e| Failure::Usage(format!("--labels: {e}")))?;
            let mut req = tonic::Request::new(NetworkServiceRequest {
                connection: Some(Connection {
                    network_service: service.clone(),
                    labels,
                    ..Default::default()
                }),
                mechanism_preferences: vec![kernel::local(&ifname, &netns)],
            });
            if managed {
                req.metadata_mut().insert(
                    nsm_manager::server::MD_MANAGED,
                    "true".parse().map_err(|_| "metadata")?,
                );
            }
            // The root of the Request's trace (exported when configured).
            let span = nsm_trace::client_span("Request");
            span.in_scope(|| nsm_trace::inject(req.metadata_mut()));
            let c = tracing::Instrument::instrument(
                NetworkServiceClient::new(manager(&args.manager).await?).request(req),
                span.clone(),
            )
            .await
            .map_err(st(&format!("request {service}")))?
            .into_inner();
            span.in_scope(|| nsm_trace::record_connection(&c));
            if json {
                println!("{}", inspect::connection_json(&c));
            } else {
                print_table(&inspect::connections_table(&[c], now));
            }
        }
        Cmd::Close { id } => {
            let span = nsm_trace::client_span("Close");
            let mut req = tonic::Request::new(Connection {
                id: id.clone(),
                ..Default::default()
            });
            span.in_scope(|| {
                nsm_trace::record_id(&id);
                nsm_trace::inject(req.metadata_mut());
            });
            tracing::Instrument::instrument(
                NetworkServiceClient::new(manager(&args.manager).await?).close(req),
                span,
            )
            .await
            .map_err(st(&format!("close {id}")))?;
        }
        Cmd::Get { what, json } => match what {
            What::Services => {
                let v = inspect::fetch_services(manager(&args.manager).await?).await?;
                if json {
                    for s in &v {
                        println!("{}", inspect::service_json(s));
                    }
                } else {
                    print_table(&inspect::services_table(&v));
                }
            }
            What::Endpoints => {
                let v = inspect::fetch_endpoints(manager(&args.manager).await?).await?;
                if json {
                    for e in &v {
                        println!("{}", inspect::endpoint_json(e));
                    }
                } else {
                    print_table(&inspect::endpoints_table(&v));
                }
            }
            What::Connections => {
                let v = inspect::fetch_connections(manager(&args.manager).await?).await?;
                if json {
                    println!(
                        "{}",
                        serde_json::Value::Array(v.iter().map(inspect::connection_json).collect())
                    );
                } else {
                    print_table(&inspect::connections_table(&v, now));
                }
            }
            What::Forwarders => {
                let v = forwarders(&args.forwarder, true).await?;
                if json {
                    println!(
                        "{}",
                        serde_json::Value::Array(v.iter().map(inspect::forwarder_json).collect())
                    );
                } else {
                    print_table(&inspect::forwarders_table(&v));
                    println!();
                    print_table(&inspect::cross_connects_table(&v));
                }
            }
        },
        Cmd::Describe {
            what: DescribeCmd::Connection { id, json },
        } => {
            let conns = inspect::fetch_connections(manager(&args.manager).await?).await?;
            let c = inspect::find_connection(&conns, &id).map_err(|e| match e {
                LookupError::NotFound(_) => Failure::Failed(e.to_string()),
                LookupError::Ambiguous { .. } => Failure::Usage(e.to_string()),
            })?;
            let views = forwarders(&args.forwarder, false).await?;
            if json {
                println!("{}", inspect::describe_json(c, &views));
            } else {
                print!("{}", inspect::describe(c, &views, now));
            }
        }
        Cmd::Graph {
            svg,
            dot,
            also_manager,
        } => {
            let mut services = Vec::new();
            let mut endpoints = Vec::new();
            let mut conns = Vec::new();
            let sockets: Vec<&PathBuf> = std::iter::once(&args.manager)
                .chain(also_manager.iter())
                .collect();
            for m in &sockets {
                let ch = manager(m).await?;
                services.push(inspect::fetch_services(ch.clone()).await?);
                endpoints.push(inspect::fetch_endpoints(ch.clone()).await?);
                conns.push(inspect::fetch_connections(ch).await?);
            }
            let services = inspect::merge_by_name(&services, |s| s.name.as_str());
            let endpoints = inspect::merge_by_name(&endpoints, |e| e.name.as_str());
            let conns = inspect::merge_connections(&conns);
            let views = forwarders(&args.forwarder, false).await?;
            let title = format!(
                "nsm-rs mesh seen from {} at {}",
                sockets
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                nsm_manager::util::to_ts(now)
            );
            let m = inspect::model(&title, &services, &endpoints, &conns, &views);
            if let Some(p) = svg {
                write_out(&p, "SVG", &nsm_manager::graph::render_svg(&m))?;
            }
            if let Some(p) = dot {
                write_out(&p, "DOT", &nsm_manager::graph::render_dot(&m))?;
            }
        }
        Cmd::Top {
            interval,
            count,
            json,
        } => top(&args.forwarder, interval, count, json).await?,
    }
    Ok(())
}

/// `nsmctl top`: reads the forwarders every `interval` and prints the rates
/// between the last two reads, `count` times (or until interrupted).
async fn top(
    paths: &[PathBuf],
    interval: std::time::Duration,
    count: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    use std::io::{IsTerminal, Write};
    if interval.is_zero() {
        return Err(Failure::Usage("--interval must be more than 0".into()));
    }
    if count == Some(0) {
        return Err(Failure::Usage("--count must be at least 1".into()));
    }
    let (shown, _) = forwarder_paths(paths);
    let clear = !json && std::io::stdout().is_terminal();
    let mut prev = forwarders(paths, true).await?;
    let mut prev_at = std::time::Instant::now();
    let mut frames = 0u64;
    while count.is_none_or(|n| frames < n) {
        tokio::time::sleep(interval.saturating_sub(prev_at.elapsed())).await;
        let cur = forwarders(paths, true).await?;
        let cur_at = std::time::Instant::now();
        let elapsed = cur_at.duration_since(prev_at);
        let rates = inspect::rates(&prev, &cur, elapsed);
        let now = SystemTime::now();
        let mut out = std::io::stdout().lock();
        let frame = if json {
            format!("{}\n", inspect::rates_json(&rates, elapsed, now))
        } else {
            format!(
                "{}nsmctl top: {} cross-connects on {} forwarders, over {:.2}s, at {}\n\n{}{}",
                if clear { "\x1b[2J\x1b[H" } else { "" },
                rates.len(),
                shown.len(),
                elapsed.as_secs_f64(),
                nsm_manager::util::to_ts(now),
                inspect::rates_table(&rates).render(),
                if clear { "" } else { "\n" },
            )
        };
        out.write_all(frame.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| Failure::Failed(format!("stdout: {e}")))?;
        frames += 1;
        prev = cur;
        prev_at = cur_at;
    }
    Ok(())
}

fn exit(r: Result<(), Failure>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Failed(e)) => {
            eprintln!("nsmctl: {e}");
            ExitCode::FAILURE
        }
        Err(Failure::Usage(e)) => {
            eprintln!("nsmctl: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // CA commands work on files only: no runtime, no manager.
    let args = match args.cmd {
        Cmd::Ca { cmd } => return exit(ca(cmd).map_err(Failure::Failed)),
        cmd => Args { cmd, ..args },
    };
    let tls = match &args.identity_dir {
        Some(dir) => match nsm_manager::identity::IdentitySource::load(
            nsm_manager::identity::IdentityPaths::in_dir(dir),
        ) {
            Ok(source) => Some(nsm_manager::tls::Tls::new(source)),
            Err(e) => {
                eprintln!("nsmctl: --identity-dir {}: {e}", dir.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let _ = FORWARDER_TLS.set(tls);
    // With $OTEL_EXPORTER_OTLP_ENDPOINT set, `request` and `close` are the
    // root spans of their traces (`nsm.client/Request`, `nsm.client/Close`),
    // exported as service $OTEL_SERVICE_NAME or nsmctl@local. Unset: no
    // subscriber at all, as before.
    let trace = nsm_trace::TraceConfig::from_env("nsmctl", "local", None);
    let _telemetry = match trace.endpoint.is_some().then(|| nsm_trace::init(&trace)) {
        Some(Err(e)) => {
            eprintln!("nsmctl: {e}");
            return ExitCode::from(2);
        }
        Some(Ok(t)) => Some(t),
        None => None,
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        eprintln!("nsmctl: cannot start the runtime");
        return ExitCode::FAILURE;
    };
    exit(rt.block_on(run(args)))
}
