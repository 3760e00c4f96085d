//! Talking to a lab's mesh: waiting for sockets, asking for the pods'
//! connections, and reading the managers' view of them.
//!
//! The testbed is a client of the mesh like any other: it uses the public
//! NSM gRPC API on each node's manager socket, nothing private.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use nsm_proto::connection::monitor_connection_client::MonitorConnectionClient;
use nsm_proto::connection::{Connection, MonitorScopeSelector, State};
use nsm_proto::mechanisms::kernel;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
use serde::{Deserialize, Serialize};

/// gRPC metadata that asks the manager to own a connection: it refreshes it
/// itself until Close (used for requests whose client does not stay around,
/// as the testbed's and the CNI plugin's).
pub const MANAGED_METADATA: (&str, &str) = ("nsm-managed", "true");

/// A connection the testbed asked for on behalf of a pod.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestedConnection {
    /// Connection id.
    pub id: String,
    /// The client pod.
    pub pod: String,
    /// Its node.
    pub node: String,
    /// Interface name in the pod.
    pub interface: String,
    /// Network service.
    pub service: String,
    /// Labels sent.
    pub labels: BTreeMap<String, String>,
}

/// Waits until something accepts on a unix socket, or `deadline` passes, or
/// `alive` says the process that should listen is gone.
pub fn wait_for_socket(
    path: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if !alive() {
            return Err(format!("exited before listening on {}", path.display()));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not listening on {} after {:?}",
                path.display(),
                timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime always builds")
}

/// Asks the pod's node manager for one connection, as an NSM client would
/// (KERNEL mechanism with the interface name and the pod's netns as
/// inodeURL); `managed` asks the manager to refresh it until Close.
/// Returns the manager's reply.
pub fn request(
    manager_socket: &Path,
    netns_path: &Path,
    req: &RequestedConnection,
    managed: bool,
    timeout: Duration,
) -> Result<Connection, String> {
    let request = NetworkServiceRequest {
        connection: Some(Connection {
            id: req.id.clone(),
            network_service: req.service.clone(),
            labels: req.labels.clone().into_iter().collect(),
            ..Default::default()
        }),
        mechanism_preferences: vec![kernel::local(&req.interface, netns_path)],
    };
    // The client's span `nsm.client/Request`: a child of the caller's
    // current span if it has one, else the root of the Request's trace;
    // its context goes to the manager as W3C `traceparent` metadata.
    let span = nsm_trace::client_span("Request");
    runtime().block_on(tracing::Instrument::instrument(
        async {
            let mut client = NetworkServiceClient::new(channel(manager_socket).await?);
            let mut grpc = tonic::Request::new(request);
            grpc.set_timeout(timeout);
            if managed {
                grpc.metadata_mut().insert(
                    MANAGED_METADATA.0,
                    MANAGED_METADATA.1.parse().expect("ascii"),
                );
            }
            nsm_trace::inject(grpc.metadata_mut());
            let r = client.request(grpc).await.map(tonic::Response::into_inner);
            nsm_trace::record_outcome(&r);
            if let Ok(c) = &r {
                nsm_trace::record_connection(c);
            }
            r.map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        },
        span,
    ))
}

/// Closes a connection through a manager (the one the client asked).
pub fn close(manager_socket: &Path, conn: &Connection, timeout: Duration) -> Result<(), String> {
    let span = nsm_trace::client_span("Close");
    runtime().block_on(tracing::Instrument::instrument(
        async {
            let mut client = NetworkServiceClient::new(channel(manager_socket).await?);
            let mut grpc = tonic::Request::new(conn.clone());
            grpc.set_timeout(timeout);
            nsm_trace::record_connection(conn);
            nsm_trace::inject(grpc.metadata_mut());
            let r = client.close(grpc).await.map(drop);
            nsm_trace::record_outcome(&r);
            r.map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        },
        span,
    ))
}

async fn channel(socket: &Path) -> Result<tonic::transport::Channel, String> {
    nsm_proto::uds::connect_unix(socket)
        .await
        .map_err(|e| format!("{}: {e}", socket.display()))
}

/// Every connection a manager knows, from the initial state transfer of
/// `MonitorConnections`. An unreachable manager gives an error.
pub fn connections(manager_socket: &Path, timeout: Duration) -> Result<Vec<Connection>, String> {
    runtime().block_on(async {
        let work = async {
            let mut client = MonitorConnectionClient::new(channel(manager_socket).await?);
            let mut stream = client
                .monitor_connections(MonitorScopeSelector::default())
                .await
                .map_err(|s| s.message().to_string())?
                .into_inner();
            let first = stream
                .message()
                .await
                .map_err(|s| s.message().to_string())?;
            Ok::<_, String>(
                first
                    .map(|e| e.connections.into_values().collect())
                    .unwrap_or_default(),
            )
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| format!("no answer from {} in {timeout:?}", manager_socket.display()))?
    })
}

/// The first address of a list of CIDRs, without its prefix length.
fn first_addr(addrs: &[String]) -> String {
    addrs
        .first()
        .map(|a| a.split('/').next().unwrap_or(a).to_string())
        .unwrap_or_default()
}

/// A connection as `status` shows it, from the testbed's record and the
/// manager's view (`None` when the manager does not know it).
pub fn describe(
    req: &RequestedConnection,
    seen: Option<&Connection>,
) -> crate::lab::ConnectionStatus {
    let ip = seen
        .and_then(|c| c.context.as_ref())
        .and_then(|c| c.ip_context.as_ref());
    crate::lab::ConnectionStatus {
        id: req.id.clone(),
        path: seen
            .and_then(|c| c.path.as_ref())
            .map(|p| p.path_segments.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default(),
        pod: req.pod.clone(),
        interface: req.interface.clone(),
        service: req.service.clone(),
        endpoint: seen
            .map(|c| c.network_service_endpoint_name.clone())
            .unwrap_or_default(),
        src_ip: ip.map(|i| first_addr(&i.src_ip_addrs)).unwrap_or_default(),
        dst_ip: ip.map(|i| first_addr(&i.dst_ip_addrs)).unwrap_or_default(),
        state: match seen {
            None => "MISSING".to_string(),
            Some(c) => State::try_from(c.state)
                .map(|s| s.as_str_name().to_string())
                .unwrap_or_else(|_| c.state.to_string()),
        },
    }
}

/// Whether a manager's connection is the one the testbed asked for: the
/// client-facing id is the connection id or the first path segment's id.
pub fn is_same(req: &RequestedConnection, c: &Connection) -> bool {
    c.id == req.id
        || c.path
            .as_ref()
            .and_then(|p| p.path_segments.first())
            .is_some_and(|s| s.id == req.id)
}
