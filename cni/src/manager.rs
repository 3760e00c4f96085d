//! The plugin's one dependency: the local nsm-manager, over its unix socket.
//!
//! The plugin is a short-lived synchronous process; each call runs on a
//! current-thread runtime and is bounded by the config's timeout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nsm_proto::connection::monitor_connection_client::MonitorConnectionClient;
use nsm_proto::connection::{Connection, MonitorScopeSelector};
use nsm_proto::manager::v1::pods_client::PodsClient;
use nsm_proto::manager::v1::{AttachRequest, Attachment, DetachRequest};
use nsm_proto::mechanisms::kernel;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
use tonic::transport::Channel;

use crate::plugin::Wanted;
use crate::spec::{CniError, code};

/// gRPC metadata asking the manager to own (refresh and heal) the connection until Close.
const MANAGED: (&str, &str) = ("nsm-managed", "true");

/// A connection to the local manager.
#[derive(Debug)]
pub struct Manager {
    rt: tokio::runtime::Runtime,
    channel: Channel,
    socket: PathBuf,
    timeout: Duration,
}

impl Manager {
    /// Connects, or fails with code 11 (try again later).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, CniError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                CniError::new(code::IO, "cannot start a runtime").details(e.to_string())
            })?;
        let channel = rt
            .block_on(async {
                tokio::time::timeout(timeout, nsm_proto::uds::connect_unix(socket)).await
            })
            .map_err(|_| unreachable_err(socket, "timed out"))?
            .map_err(|e| unreachable_err(socket, &e.to_string()))?;
        Ok(Manager {
            rt,
            channel,
            socket: socket.to_path_buf(),
            timeout,
        })
    }

    /// Asks for one connection, as an NSM client would, managed.
    pub fn request(&self, w: &Wanted, netns: &Path) -> Result<Connection, CniError> {
        let request = NetworkServiceRequest {
            connection: Some(Connection {
                id: w.id.clone(),
                network_service: w.request.service.clone(),
                labels: w.request.labels.clone().into_iter().collect(),
                ..Default::default()
            }),
            mechanism_preferences: vec![kernel::local(&w.ifname, netns)],
        };
        let mut req = tonic::Request::new(request);
        req.set_timeout(self.timeout);
        req.metadata_mut()
            .insert(MANAGED.0, MANAGED.1.parse().expect("ascii"));
        let mut client = NetworkServiceClient::new(self.channel.clone());
        self.rt
            .block_on(client.request(req))
            .map(tonic::Response::into_inner)
            .map_err(|s| {
                self.status_err(
                    &format!("request {} for {}", w.request.service, w.ifname),
                    s,
                )
            })
    }

    /// Cluster mode: asks the manager to attach what the pod's annotation
    /// (read from the API server) asks for. `Ok(None)`: the manager is not
    /// in cluster mode.
    pub fn attach(&self, req: AttachRequest) -> Result<Option<Vec<Attachment>>, CniError> {
        let what = format!("attach pod {}/{}", req.namespace, req.pod);
        let mut req = tonic::Request::new(req);
        // Several connections, each bounded by the timeout on the manager's side.
        req.set_timeout(self.timeout * 4);
        let mut client = PodsClient::new(self.channel.clone());
        match self.rt.block_on(client.attach(req)) {
            Ok(r) => Ok(Some(r.into_inner().attachments)),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
            Err(s) if s.code() == tonic::Code::InvalidArgument => Err(CniError::new(
                code::BAD_ANNOTATION,
                format!("nsm-manager refused: {what}"),
            )
            .details(s.message().to_string())),
            Err(s) if s.code() == tonic::Code::AlreadyExists => Err(CniError::new(
                code::IFNAME_CONFLICT,
                format!("nsm-manager refused: {what}"),
            )
            .details(s.message().to_string())),
            Err(s) => Err(self.status_err(&what, s)),
        }
    }

    /// Cluster mode: forgets an attachment and closes its connections.
    /// A manager not in cluster mode has nothing to forget.
    pub fn detach(&self, req: DetachRequest) -> Result<(), CniError> {
        let mut req = tonic::Request::new(req);
        req.set_timeout(self.timeout);
        let mut client = PodsClient::new(self.channel.clone());
        match self.rt.block_on(client.detach(req)) {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(()),
            Err(s) => Err(self.status_err("detach", s)),
        }
    }

    /// Closes a connection; one the manager does not know is already closed.
    pub fn close(&self, conn: &Connection) -> Result<(), CniError> {
        let mut req = tonic::Request::new(conn.clone());
        req.set_timeout(self.timeout);
        let mut client = NetworkServiceClient::new(self.channel.clone());
        match self.rt.block_on(client.close(req)) {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(self.status_err(&format!("close {}", conn.id), s)),
        }
    }

    /// Every connection the manager has (the initial state of MonitorConnections).
    pub fn list(&self) -> Result<Vec<Connection>, CniError> {
        let mut client = MonitorConnectionClient::new(self.channel.clone());
        let work = async {
            let mut stream = client
                .monitor_connections(MonitorScopeSelector::default())
                .await?
                .into_inner();
            Ok::<_, tonic::Status>(
                stream
                    .message()
                    .await?
                    .map(|e| e.connections.into_values().collect())
                    .unwrap_or_default(),
            )
        };
        self.rt
            .block_on(async { tokio::time::timeout(self.timeout, work).await })
            .map_err(|_| unreachable_err(&self.socket, "listing connections timed out"))?
            .map_err(|s| self.status_err("list connections", s))
    }

    fn status_err(&self, what: &str, s: tonic::Status) -> CniError {
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                unreachable_err(&self.socket, &format!("{what}: {}", s.message()))
            }
            c => CniError::new(
                code::REQUEST_REFUSED,
                format!("nsm-manager refused: {what}"),
            )
            .details(format!("{c:?}: {}", s.message())),
        }
    }
}

fn unreachable_err(socket: &Path, detail: &str) -> CniError {
    CniError::new(
        code::TRY_AGAIN_LATER,
        format!("nsm-manager at {} is unreachable", socket.display()),
    )
    .details(detail.to_string())
}
