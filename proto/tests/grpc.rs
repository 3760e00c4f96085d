//! End to end over a real unix socket: generated servers and clients,
//! `uds::bind_unix`/`uds::connect_unix`, and the gRPC method paths that NSM
//! peers dial (they contain the proto packages, so a renamed package breaks
//! interoperability without breaking any Rust code).

use std::pin::Pin;

use nsm_proto::connection::monitor_connection_client::MonitorConnectionClient;
use nsm_proto::connection::{Connection, Mechanism, MonitorScopeSelector};
use nsm_proto::connectioncontext::ConnectionContext;
use nsm_proto::forwarder::v1::CrossConnect;
use nsm_proto::forwarder::v1::forwarder_client::ForwarderClient;
use nsm_proto::ipam::PrefixRequest;
use nsm_proto::ipam::ipam_client::IpamClient;
use nsm_proto::mechanisms;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
use nsm_proto::networkservice::network_service_server::{NetworkService, NetworkServiceServer};
use nsm_proto::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use nsm_proto::registry::network_service_endpoint_registry_server::{
    NetworkServiceEndpointRegistry, NetworkServiceEndpointRegistryServer,
};
use nsm_proto::registry::{
    NetworkServiceEndpoint, NetworkServiceEndpointQuery, NetworkServiceEndpointResponse,
};
use nsm_proto::uds;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::Server;
use tonic::{Code, Request, Response, Status};

/// Accepts every request: picks the first preferred mechanism, names the
/// endpoint and sets an MTU, so the test can see the server touched it.
#[derive(Debug)]
struct AcceptAll;

#[tonic::async_trait]
impl NetworkService for AcceptAll {
    async fn request(
        &self,
        request: Request<NetworkServiceRequest>,
    ) -> Result<Response<Connection>, Status> {
        let request = request.into_inner();
        let mut conn = request
            .connection
            .ok_or_else(|| Status::invalid_argument("connection is required"))?;
        conn.mechanism = request.mechanism_preferences.into_iter().next();
        conn.network_service_endpoint_name = "nse-1".into();
        conn.context = Some(ConnectionContext {
            mtu: 1420,
            ..Default::default()
        });
        Ok(Response::new(conn))
    }

    async fn close(&self, _: Request<Connection>) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }
}

/// Holds two endpoints; Find returns those whose name contains the query's.
#[derive(Debug)]
struct TwoEndpoints;

type FindStream =
    Pin<Box<dyn Stream<Item = Result<NetworkServiceEndpointResponse, Status>> + Send>>;

#[tonic::async_trait]
impl NetworkServiceEndpointRegistry for TwoEndpoints {
    async fn register(
        &self,
        request: Request<NetworkServiceEndpoint>,
    ) -> Result<Response<NetworkServiceEndpoint>, Status> {
        Ok(Response::new(request.into_inner()))
    }

    type FindStream = FindStream;

    async fn find(
        &self,
        request: Request<NetworkServiceEndpointQuery>,
    ) -> Result<Response<FindStream>, Status> {
        let wanted = request
            .into_inner()
            .network_service_endpoint
            .unwrap_or_default()
            .name;
        let found: Vec<_> = ["nse-a", "nse-b"]
            .into_iter()
            .filter(|name| name.contains(wanted.as_str()))
            .map(|name| {
                Ok(NetworkServiceEndpointResponse {
                    network_service_endpoint: Some(NetworkServiceEndpoint {
                        name: name.into(),
                        network_service_names: vec!["web".into()],
                        ..Default::default()
                    }),
                    deleted: false,
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(found))))
    }

    async fn unregister(&self, _: Request<NetworkServiceEndpoint>) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }
}

/// A server on a unix socket that reports the path of every request it sees.
struct TestServer {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    paths: mpsc::UnboundedReceiver<String>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl TestServer {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        // A subdirectory checks that bind_unix creates parents.
        let socket = dir.path().join("run").join("nsm.sock");
        let incoming = uds::bind_unix(&socket).expect("bind unix socket");
        let (path_tx, paths) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        // Sees requests for every path, including services not added below,
        // which the router then answers with UNIMPLEMENTED.
        let record = tower::util::MapRequestLayer::new(move |req: http::Request<Body>| {
            let _ = path_tx.send(req.uri().path().to_owned());
            req
        });
        let router = Server::builder()
            .layer(record)
            .add_service(NetworkServiceServer::new(AcceptAll))
            .add_service(NetworkServiceEndpointRegistryServer::new(TwoEndpoints));
        let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        }));
        Self {
            _dir: dir,
            socket,
            paths,
            stop,
            task,
        }
    }

    async fn stop(self) -> Vec<String> {
        let Self {
            _dir,
            mut paths,
            stop,
            task,
            ..
        } = self;
        let _ = stop.send(());
        task.await
            .expect("server task panicked")
            .expect("server failed");
        let mut seen = Vec::new();
        while let Ok(path) = paths.try_recv() {
            seen.push(path);
        }
        seen
    }
}

#[tokio::test]
async fn request_and_find_over_a_unix_socket() {
    let server = TestServer::start();
    let channel = uds::connect_unix(&server.socket)
        .await
        .expect("connect to the test server");

    let mut ns = NetworkServiceClient::new(channel.clone());
    let kernel = Mechanism {
        cls: mechanisms::cls::LOCAL.into(),
        r#type: mechanisms::KERNEL.into(),
        parameters: [(mechanisms::kernel::NAME.to_owned(), "nsm-1".to_owned())].into(),
    };
    let conn = ns
        .request(NetworkServiceRequest {
            connection: Some(Connection {
                id: "c1".into(),
                network_service: "web".into(),
                ..Default::default()
            }),
            mechanism_preferences: vec![kernel.clone()],
        })
        .await
        .expect("Request succeeds")
        .into_inner();
    assert_eq!(conn.id, "c1");
    assert_eq!(conn.network_service_endpoint_name, "nse-1");
    assert_eq!(conn.mechanism, Some(kernel));
    assert_eq!(conn.context.as_ref().map(|c| c.mtu), Some(1420));
    ns.close(conn).await.expect("Close succeeds");

    let mut registry = NetworkServiceEndpointRegistryClient::new(channel.clone());
    let mut found = registry
        .find(NetworkServiceEndpointQuery {
            network_service_endpoint: Some(NetworkServiceEndpoint {
                name: "nse-".into(),
                ..Default::default()
            }),
            watch: false,
        })
        .await
        .expect("Find succeeds")
        .into_inner();
    let mut names = Vec::new();
    while let Some(resp) = found.message().await.expect("Find stream item") {
        names.push(resp.network_service_endpoint.unwrap_or_default().name);
    }
    assert_eq!(names, ["nse-a", "nse-b"]);

    let paths = server.stop().await;
    assert_eq!(
        paths,
        [
            "/networkservice.NetworkService/Request",
            "/networkservice.NetworkService/Close",
            "/registry.NetworkServiceEndpointRegistry/Find",
        ]
    );
}

#[tokio::test]
async fn clients_dial_nsm_method_paths() {
    let server = TestServer::start();
    let channel = uds::connect_unix(&server.socket)
        .await
        .expect("connect to the test server");

    // These services are not served here: each call fails with
    // UNIMPLEMENTED, but only after the recording layer saw its path.
    let monitor = MonitorConnectionClient::new(channel.clone())
        .monitor_connections(MonitorScopeSelector::default())
        .await;
    assert_eq!(monitor.expect_err("not served").code(), Code::Unimplemented);

    let ipam = IpamClient::new(channel.clone())
        .manage_prefixes(tokio_stream::iter([PrefixRequest::default()]))
        .await;
    assert_eq!(ipam.expect_err("not served").code(), Code::Unimplemented);

    let program = ForwarderClient::new(channel.clone())
        .program(CrossConnect::default())
        .await;
    assert_eq!(program.expect_err("not served").code(), Code::Unimplemented);

    let paths = server.stop().await;
    assert_eq!(
        paths,
        [
            "/connection.MonitorConnection/MonitorConnections",
            "/ipam.IPAM/ManagePrefixes",
            "/nsm.forwarder.v1.Forwarder/Program",
        ]
    );
}

#[test]
fn servers_route_by_nsm_service_names() {
    use nsm_proto::connection::monitor_connection_server;
    use nsm_proto::forwarder::v1::forwarder_server;
    use nsm_proto::ipam::ipam_server;
    use nsm_proto::networkservice::network_service_server;
    use nsm_proto::registry::{
        network_service_endpoint_registry_server, network_service_registry_server,
    };

    assert_eq!(
        network_service_server::SERVICE_NAME,
        "networkservice.NetworkService"
    );
    assert_eq!(
        monitor_connection_server::SERVICE_NAME,
        "connection.MonitorConnection"
    );
    assert_eq!(
        network_service_registry_server::SERVICE_NAME,
        "registry.NetworkServiceRegistry"
    );
    assert_eq!(
        network_service_endpoint_registry_server::SERVICE_NAME,
        "registry.NetworkServiceEndpointRegistry"
    );
    assert_eq!(ipam_server::SERVICE_NAME, "ipam.IPAM");
    assert_eq!(forwarder_server::SERVICE_NAME, "nsm.forwarder.v1.Forwarder");
}
