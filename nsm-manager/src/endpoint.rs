//! A minimal network service endpoint (NSE), the logic of `nsm-endpoint`.
//!
//! It serves `networkservice.NetworkService` on its own unix socket, accepts
//! every request (keeping a table of connections), and registers itself
//! through the local manager (`url = unix://SOCKET`, refreshed at a third of
//! its expiry, unregistered on shutdown). It moves no packets: the forwarder
//! puts the interface into the endpoint's namespace, which the endpoint
//! reports in its reply as the KERNEL mechanism's `inodeURL`
//! (`file:///proc/<pid>/ns/net`), as NSM endpoints do.
//!
//! Serving and registration are [`serve_and_register`], generic over the
//! `NetworkService` implementation, so that other endpoints (the
//! `nsm-passthrough` chain function) share them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nsm_proto::connection::{Connection, Mechanism, State};
use nsm_proto::mechanisms::{self, cls, kernel};
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::networkservice::network_service_server::{NetworkService, NetworkServiceServer};
use nsm_proto::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use nsm_proto::registry::{NetworkServiceEndpoint, NetworkServiceLabels};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

use crate::util::to_ts;

/// How to run an endpoint.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    /// NSE name (unique in the lab).
    pub name: String,
    /// The service it offers.
    pub service: String,
    /// Its labels for that service (matched by destination selectors).
    pub labels: HashMap<String, String>,
    /// The local manager's unix socket.
    pub manager: PathBuf,
    /// Where to serve.
    pub listen: PathBuf,
    /// Registration lifetime; refreshed at a third of it.
    pub registration_lifetime: Duration,
    /// `inodeURL` to report; `None` = this process's namespace.
    pub inode_url: Option<String>,
    /// The endpoint's own identity (certificate for
    /// `spiffe://TD/nsm-endpoint/NAME`, key, trust bundle; reloaded when the
    /// files change): with it, a Request is accepted only when the caller's
    /// path segment is signed by a mesh certificate for this endpoint
    /// ([`crate::token::verify_addressed_to`]). `None`: any caller that can
    /// reach the socket is trusted (its permissions are the guard).
    pub identity: Option<crate::identity::IdentityPaths>,
}

/// Why the endpoint cannot run.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The socket cannot be bound.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The identity files are unusable.
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::IdentityError),
    /// Registration through the manager failed.
    #[error("registering `{name}` through the manager at {manager}: {} ({:?})", status.message(), status.code())]
    Register {
        /// NSE name.
        name: String,
        /// Manager socket.
        manager: String,
        /// The manager's answer.
        status: Status,
    },
}

/// The endpoint's connection table and request handling.
#[derive(Debug, Clone)]
pub struct EndpointService {
    name: String,
    inode_url: String,
    table: Arc<Mutex<HashMap<String, Connection>>>,
    identity: Option<Arc<crate::identity::IdentitySource>>,
}

impl EndpointService {
    /// A service answering as endpoint `name`, reporting `inode_url`.
    pub fn new(name: &str, inode_url: &str) -> EndpointService {
        EndpointService {
            name: name.to_string(),
            inode_url: inode_url.to_string(),
            table: Arc::default(),
            identity: None,
        }
    }

    /// The same service, accepting only requests signed for `identity`'s
    /// SPIFFE ID by a certificate of its trust bundle.
    pub fn with_identity(mut self, identity: Arc<crate::identity::IdentitySource>) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Refuses a request whose caller's segment is not signed for us (only
    /// with an identity).
    fn check_path(&self, conn: &Connection) -> Result<(), Status> {
        let Some(source) = &self.identity else {
            return Ok(());
        };
        let id = source.current();
        let path = conn.path.clone().unwrap_or_default();
        match crate::token::verify_addressed_to(&path, &id.id, &id.roots, SystemTime::now()) {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(endpoint = %self.name, error = %e, "request refused");
                Err(Status::permission_denied(format!(
                    "endpoint `{}` ({}): {e}",
                    self.name, id.id
                )))
            }
        }
    }

    /// The endpoint's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The connections accepted and not closed.
    pub fn connections(&self) -> Vec<Connection> {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

#[tonic::async_trait]
impl NetworkService for EndpointService {
    async fn request(
        &self,
        r: Request<NetworkServiceRequest>,
    ) -> Result<Response<Connection>, Status> {
        let req = r.into_inner();
        let mut conn = req
            .connection
            .ok_or_else(|| Status::invalid_argument("request has no connection"))?;
        self.check_path(&conn)?;
        let pref = req
            .mechanism_preferences
            .iter()
            .find(|m| m.r#type == mechanisms::KERNEL)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "endpoint `{}` offers only the KERNEL mechanism",
                    self.name
                ))
            })?;
        let mut params = pref.parameters.clone();
        params.insert(kernel::INODE_URL.into(), self.inode_url.clone());
        conn.mechanism = Some(Mechanism {
            cls: cls::LOCAL.into(),
            r#type: mechanisms::KERNEL.into(),
            parameters: params,
        });
        conn.network_service_endpoint_name = self.name.clone();
        conn.state = State::Up as i32;
        nsm_trace::record_connection(&conn);
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn.id.clone(), conn.clone());
        tracing::info!(id = %conn.id, service = %conn.network_service, "accepted");
        Ok(Response::new(conn))
    }

    async fn close(&self, r: Request<Connection>) -> Result<Response<()>, Status> {
        let conn = r.into_inner();
        nsm_trace::record_connection(&conn);
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn.id);
        tracing::info!(id = %conn.id, "closed");
        Ok(Response::new(()))
    }
}

/// A running endpoint.
#[derive(Debug)]
pub struct EndpointHandle {
    /// The service (for inspecting its table).
    pub service: EndpointService,
    registration: Registration,
    reloader: Option<JoinHandle<()>>,
}

impl EndpointHandle {
    /// Unregisters and stops serving.
    pub async fn shutdown(self) {
        if let Some(r) = &self.reloader {
            r.abort();
        }
        self.registration.shutdown().await;
    }
}

/// Serves the endpoint and registers it (once, synchronously, so that a
/// caller knows it is findable when this returns), then keeps refreshing.
///
/// # Errors
/// [`EndpointError`].
pub async fn start_endpoint(opts: EndpointOptions) -> Result<EndpointHandle, EndpointError> {
    let inode_url = opts.inode_url.clone().unwrap_or_else(crate::netns::own_url);
    let mut service = EndpointService::new(&opts.name, &inode_url);
    let mut reloader = None;
    if let Some(paths) = &opts.identity {
        let source = crate::identity::IdentitySource::load(paths.clone())?;
        tracing::info!(name = %opts.name, spiffe_id = %source.current().id, "endpoint identity loaded");
        // A rotated certificate is picked up without a restart.
        reloader = Some(source.clone().spawn_reloader(Duration::from_secs(1)));
        service = service.with_identity(source);
    }
    let registration = match serve_and_register(&opts, service.clone()).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(r) = reloader {
                r.abort();
            }
            return Err(e);
        }
    };
    Ok(EndpointHandle {
        service,
        registration,
        reloader,
    })
}

/// A `NetworkService` being served on its unix socket and registered
/// through the local manager, with its refresher; see [`serve_and_register`].
#[derive(Debug)]
pub struct Registration {
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    refresher: JoinHandle<()>,
    registry: NetworkServiceEndpointRegistryClient<Channel>,
    nse: NetworkServiceEndpoint,
}

impl Registration {
    /// Stops refreshing, unregisters, and stops serving (waiting up to 5 s
    /// for requests in flight).
    pub async fn shutdown(self) {
        self.refresher.abort();
        if let Err(e) = self.registry.clone().unregister(self.nse.clone()).await {
            tracing::warn!(error = %e, "unregister failed");
        }
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
    }
}

/// Serves `service` on `opts.listen` and registers it as endpoint
/// `opts.name` of `opts.service` (with `opts.labels`, `url =
/// unix://LISTEN`) through the manager at `opts.manager`: once,
/// synchronously, so that the caller knows it is findable when this
/// returns; then refreshes at a third of `opts.registration_lifetime`.
///
/// This is the part every endpoint shares, whatever it does with requests:
/// [`start_endpoint`] passes the accepting [`EndpointService`], a chain
/// function (e.g. `nsm-passthrough`) its own. `opts.inode_url` is not used
/// here (it is the service's business).
///
/// On failure nothing keeps running and the socket can be bound again, so
/// that the caller may retry (e.g. while the manager is starting).
///
/// # Errors
/// [`EndpointError`].
pub async fn serve_and_register<S: NetworkService>(
    opts: &EndpointOptions,
    service: S,
) -> Result<Registration, EndpointError> {
    let incoming =
        nsm_proto::uds::bind_unix(&opts.listen).map_err(|source| EndpointError::Listen {
            path: opts.listen.display().to_string(),
            source,
        })?;
    let (stop, mut stop_rx) = watch::channel(false);
    let srv = Server::builder()
        // Requests and Closes are spans `nsm.endpoint/METHOD`, children of
        // the manager's call (traceparent in the metadata).
        .layer(nsm_trace::ServerLayer::new("nsm.endpoint", &opts.name))
        .add_service(NetworkServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        });
    let server = tokio::spawn(async move {
        if let Err(e) = srv.await {
            tracing::error!(error = %e, "endpoint server failed");
        }
    });
    let registry =
        NetworkServiceEndpointRegistryClient::new(nsm_proto::uds::connect_unix_lazy(&opts.manager));
    let lifetime = opts.registration_lifetime;
    let make = move |o: &EndpointOptions| NetworkServiceEndpoint {
        name: o.name.clone(),
        network_service_names: vec![o.service.clone()],
        network_service_labels: [(
            o.service.clone(),
            NetworkServiceLabels {
                labels: o.labels.clone(),
            },
        )]
        .into(),
        url: format!("unix://{}", o.listen.display()),
        expiration_time: Some(to_ts(SystemTime::now() + lifetime)),
        ..Default::default()
    };
    let nse = make(opts);
    if let Err(status) = registry.clone().register(nse.clone()).await {
        // Stop serving before returning so that a retry can bind the socket again.
        let _ = stop.send(true);
        let _ = server.await;
        return Err(EndpointError::Register {
            name: opts.name.clone(),
            manager: opts.manager.display().to_string(),
            status,
        });
    }
    tracing::info!(name = %opts.name, service = %opts.service, "registered");
    let refresher = {
        let mut reg = registry.clone();
        let opts = opts.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lifetime / 3).await;
                if let Err(e) = reg.register(make(&opts)).await {
                    tracing::warn!(error = %e, "registration refresh failed; retrying");
                }
            }
        })
    };
    Ok(Registration {
        stop,
        server,
        refresher,
        registry,
        nse,
    })
}
