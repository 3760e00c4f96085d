//! `nsmctl`: an operator's client of the local nsm-manager (unix socket).
//!
//! Requests and closes connections as an NSM client would and lists the
//! registry and connections. It holds no state and no logic beyond
//! formatting: everything goes through the manager's public gRPC API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use nsm_proto::connection::monitor_connection_client::MonitorConnectionClient;
use nsm_proto::connection::{Connection, MonitorScopeSelector};
use nsm_proto::mechanisms::kernel;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
use nsm_proto::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use nsm_proto::registry::network_service_registry_client::NetworkServiceRegistryClient;
use nsm_proto::registry::{NetworkServiceEndpointQuery, NetworkServiceQuery};
use serde_json::json;
use tonic::transport::Channel;

/// Talk to the local nsm-manager: request/close connections, list the registry.
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
    /// List services, endpoints or connections.
    Get {
        /// What to list.
        what: What,
        /// Print JSON instead of a table.
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
}

fn conn_json(c: &Connection) -> serde_json::Value {
    let ip = c
        .context
        .as_ref()
        .and_then(|x| x.ip_context.clone())
        .unwrap_or_default();
    json!({
        "id": c.id,
        "network_service": c.network_service,
        "endpoint": c.network_service_endpoint_name,
        "labels": c.labels,
        "state": c.state().as_str_name(),
        "mechanism": c.mechanism.as_ref().map(|m| json!({"cls": m.cls, "type": m.r#type, "parameters": m.parameters})),
        "src_ip_addrs": ip.src_ip_addrs,
        "dst_ip_addrs": ip.dst_ip_addrs,
        "path": c.path.as_ref().map(|p| p.path_segments.iter().map(|s| json!({"name": s.name, "id": s.id})).collect::<Vec<_>>()),
    })
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn conn_row(c: &Connection) -> Vec<String> {
    let ip = c
        .context
        .as_ref()
        .and_then(|x| x.ip_context.clone())
        .unwrap_or_default();
    vec![
        c.id.clone(),
        c.network_service.clone(),
        c.network_service_endpoint_name.clone(),
        c.state().as_str_name().to_string(),
        ip.src_ip_addrs.join(","),
        ip.dst_ip_addrs.join(","),
    ]
}

const CONN_HEADERS: [&str; 6] = ["ID", "SERVICE", "ENDPOINT", "STATE", "SRC", "DST"];

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

async fn run(args: Args) -> Result<(), String> {
    let ch: Channel = nsm_proto::uds::connect_unix(&args.manager)
        .await
        .map_err(|e| {
            format!(
                "cannot reach nsm-manager at {}: {e}",
                args.manager.display()
            )
        })?;
    let st = |what: &str| {
        let what = what.to_string();
        move |s: tonic::Status| format!("{what}: {} ({:?})", s.message(), s.code())
    };
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
            let labels =
                nsm_manager::parse_labels(&labels).map_err(|e| format!("--labels: {e}"))?;
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
            let c = NetworkServiceClient::new(ch)
                .request(req)
                .await
                .map_err(st(&format!("request {service}")))?
                .into_inner();
            if json {
                println!("{}", conn_json(&c));
            } else {
                table(&CONN_HEADERS, vec![conn_row(&c)]);
            }
        }
        Cmd::Close { id } => {
            NetworkServiceClient::new(ch)
                .close(Connection {
                    id: id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(st(&format!("close {id}")))?;
        }
        Cmd::Get { what, json } => match what {
            What::Services => {
                let mut s = NetworkServiceRegistryClient::new(ch)
                    .find(NetworkServiceQuery::default())
                    .await
                    .map_err(st("find services"))?
                    .into_inner();
                let mut rows = Vec::new();
                while let Some(r) = s.message().await.map_err(st("find services"))? {
                    let ns = r.network_service.unwrap_or_default();
                    if json {
                        println!(
                            "{}",
                            json!({"name": ns.name, "payload": ns.payload, "matches": ns.matches.len()})
                        );
                    } else {
                        rows.push(vec![ns.name, ns.payload, ns.matches.len().to_string()]);
                    }
                }
                if !json {
                    table(&["NAME", "PAYLOAD", "MATCHES"], rows);
                }
            }
            What::Endpoints => {
                let mut s = NetworkServiceEndpointRegistryClient::new(ch)
                    .find(NetworkServiceEndpointQuery::default())
                    .await
                    .map_err(st("find endpoints"))?
                    .into_inner();
                let mut rows = Vec::new();
                while let Some(r) = s.message().await.map_err(st("find endpoints"))? {
                    let e = r.network_service_endpoint.unwrap_or_default();
                    let labels: Vec<String> = e
                        .network_service_labels
                        .iter()
                        .map(|(svc, l)| {
                            let mut kv: Vec<String> =
                                l.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                            kv.sort();
                            format!("{svc}:{{{}}}", kv.join(","))
                        })
                        .collect();
                    if json {
                        println!(
                            "{}",
                            json!({"name": e.name, "services": e.network_service_names, "url": e.url, "labels": labels})
                        );
                    } else {
                        rows.push(vec![
                            e.name,
                            e.network_service_names.join(","),
                            e.url,
                            labels.join(" "),
                        ]);
                    }
                }
                if !json {
                    table(&["NAME", "SERVICES", "URL", "LABELS"], rows);
                }
            }
            What::Connections => {
                let mut s = MonitorConnectionClient::new(ch)
                    .monitor_connections(MonitorScopeSelector::default())
                    .await
                    .map_err(st("monitor"))?
                    .into_inner();
                let first = s
                    .message()
                    .await
                    .map_err(st("monitor"))?
                    .unwrap_or_default();
                let mut conns: Vec<Connection> = first.connections.into_values().collect();
                conns.sort_by(|a, b| a.id.cmp(&b.id));
                if json {
                    println!(
                        "{}",
                        serde_json::Value::Array(conns.iter().map(conn_json).collect())
                    );
                } else {
                    table(&CONN_HEADERS, conns.iter().map(conn_row).collect());
                }
            }
        },
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    // CA commands work on files only: no runtime, no manager.
    let args = match args.cmd {
        Cmd::Ca { cmd } => {
            return match ca(cmd) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("nsmctl: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        cmd => Args { cmd, ..args },
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        eprintln!("nsmctl: cannot start the runtime");
        return ExitCode::FAILURE;
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nsmctl: {e}");
            ExitCode::FAILURE
        }
    }
}
