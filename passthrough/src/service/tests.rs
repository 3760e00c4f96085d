//! The service against a fake manager on a unix socket (no root needed:
//! the links wait for interfaces that never appear).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nsm_proto::connection::{Connection, Path, PathSegment, State};
use nsm_proto::connectioncontext::{ConnectionContext, IpContext};
use nsm_proto::mechanisms::kernel;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::networkservice::network_service_server::{NetworkService, NetworkServiceServer};
use tonic::{Code, Request, Response, Status};

use super::{Passthrough, PassthroughConfig};

/// Records what it is sent; accepts (as endpoint `final`) unless told to fail.
#[derive(Debug, Clone, Default)]
struct FakeManager {
    requests: Arc<Mutex<Vec<NetworkServiceRequest>>>,
    closes: Arc<Mutex<Vec<Connection>>>,
    fail: Arc<AtomicBool>,
}

impl FakeManager {
    fn requests(&self) -> Vec<NetworkServiceRequest> {
        self.requests.lock().expect("lock").clone()
    }
    fn closes(&self) -> Vec<Connection> {
        self.closes.lock().expect("lock").clone()
    }
}

#[tonic::async_trait]
impl NetworkService for FakeManager {
    async fn request(
        &self,
        r: Request<NetworkServiceRequest>,
    ) -> Result<Response<Connection>, Status> {
        let req = r.into_inner();
        self.requests.lock().expect("lock").push(req.clone());
        if self.fail.load(Ordering::Relaxed) {
            return Err(Status::unavailable("no endpoint for service `secure`"));
        }
        let mut c = req.connection.unwrap_or_default();
        c.mechanism = req.mechanism_preferences.first().cloned();
        c.network_service_endpoint_name = "final".into();
        c.state = State::Up as i32;
        Ok(Response::new(c))
    }

    async fn close(&self, r: Request<Connection>) -> Result<Response<()>, Status> {
        self.closes.lock().expect("lock").push(r.into_inner());
        Ok(Response::new(()))
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    fake: FakeManager,
    pt: Passthrough,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("manager.sock");
    let fake = FakeManager::default();
    let incoming = nsm_proto::uds::bind_unix(&sock).expect("bind");
    let svc = NetworkServiceServer::new(fake.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming),
    );
    let mut cfg = PassthroughConfig::new("pt-1", sock);
    cfg.inode_url = "file:///proc/4242/ns/net".into();
    cfg.onward_timeout = Duration::from_secs(5);
    cfg.appear_timeout = Duration::from_secs(60);
    Fixture {
        _dir: dir,
        fake,
        pt: Passthrough::new(cfg),
    }
}

fn incoming(id: &str, ifname: &str) -> NetworkServiceRequest {
    let conn = Connection {
        id: id.into(),
        network_service: "secure".into(),
        payload: "IP".into(),
        context: Some(ConnectionContext {
            ip_context: Some(IpContext {
                src_ip_addrs: vec!["172.16.0.0/32".into()],
                dst_ip_addrs: vec!["172.16.0.1/32".into()],
                ..Default::default()
            }),
            ..Default::default()
        }),
        path: Some(Path {
            index: 0,
            path_segments: vec![PathSegment {
                name: "node-1".into(),
                id: id.into(),
                expires: Some(prost_types::Timestamp {
                    seconds: 1_000,
                    nanos: 0,
                }),
                ..Default::default()
            }],
        }),
        ..Default::default()
    };
    NetworkServiceRequest {
        connection: Some(conn),
        mechanism_preferences: vec![nsm_proto::mechanisms::kernel::local(
            ifname,
            std::path::Path::new("/proc/1/ns/net"),
        )],
    }
}

#[tokio::test]
async fn request_refresh_close() {
    let f = fixture().await;
    let req = incoming("conn-1", "nsm-in");
    let reply =
        f.pt.request(Request::new(req.clone()))
            .await
            .expect("request")
            .into_inner();
    let m = reply.mechanism.as_ref().expect("mechanism");
    assert_eq!(m.parameters[kernel::NAME], "nsm-in");
    assert_eq!(m.parameters[kernel::INODE_URL], "file:///proc/4242/ns/net");
    assert_eq!(reply.network_service_endpoint_name, "pt-1");
    assert_eq!(reply.state, State::Up as i32);
    assert_eq!(reply.id, "conn-1");

    let sent = f.fake.requests();
    assert_eq!(sent.len(), 1);
    let first = sent[0].connection.clone().expect("connection");
    let path = first.path.as_ref().expect("path");
    assert_eq!(path.index, 1);
    assert_eq!(path.path_segments[1].name, "pt-1");
    assert_eq!(first.id, path.path_segments[1].id);
    assert_ne!(first.id, "conn-1");
    assert_eq!(first.context, req.connection.as_ref().expect("c").context);
    let onward_if = sent[0].mechanism_preferences[0].parameters[kernel::NAME].clone();
    assert!(onward_if.starts_with("pto-") && onward_if.len() <= kernel::IFNAME_MAX_LEN);
    assert_eq!(
        sent[0].mechanism_preferences[0].parameters[kernel::INODE_URL],
        "file:///proc/4242/ns/net"
    );

    // A refresh re-sends the onward connection as returned: same id, path
    // and interface, and the endpoint the manager picked.
    f.pt.request(Request::new(req.clone()))
        .await
        .expect("refresh");
    let sent = f.fake.requests();
    assert_eq!(sent.len(), 2);
    let again = sent[1].connection.clone().expect("connection");
    assert_eq!(again.id, first.id);
    assert_eq!(again.path, first.path);
    assert_eq!(again.network_service_endpoint_name, "final");
    assert_eq!(
        sent[1].mechanism_preferences[0].parameters[kernel::NAME],
        onward_if
    );
    assert_eq!(f.pt.connection_ids(), ["conn-1"]);
    // A refresh with a later expiry upstream extends our segment too.
    let mut later = req.clone();
    let c = later.connection.as_mut().expect("c");
    c.path.as_mut().expect("path").path_segments[0].expires = Some(prost_types::Timestamp {
        seconds: 5_000,
        nanos: 0,
    });
    f.pt.request(Request::new(later)).await.expect("refresh");
    let sent = f.fake.requests();
    let third = sent[2].connection.clone().expect("connection");
    assert_eq!(third.id, first.id);
    let segs = &third.path.as_ref().expect("path").path_segments;
    assert_eq!(segs[0].expires.map(|t| t.seconds), Some(5_000));
    assert_eq!(segs[1].id, first.id);
    assert_eq!(segs[1].expires.map(|t| t.seconds), Some(5_000));
    let stats = f.pt.stats().snapshot();
    assert_eq!(stats.connections["conn-1"].onward_if, onward_if);
    assert_eq!(stats.connections["conn-1"].incoming_if, "nsm-in");

    // Close closes the onward connection as last returned.
    let conn = req.connection.clone().expect("c");
    f.pt.close(Request::new(conn.clone())).await.expect("close");
    let closes = f.fake.closes();
    assert_eq!(closes.len(), 1);
    assert_eq!(closes[0].id, first.id);
    assert_eq!(closes[0].network_service_endpoint_name, "final");
    assert!(f.pt.connection_ids().is_empty());
    assert!(f.pt.stats().snapshot().connections.is_empty());
    // Closing again is harmless and does not reach the manager.
    f.pt.close(Request::new(conn)).await.expect("close again");
    assert_eq!(f.fake.closes().len(), 1);

    // A new request after the close is a new onward connection.
    f.pt.request(Request::new(req)).await.expect("request");
    let sent = f.fake.requests();
    assert_ne!(sent[3].connection.as_ref().expect("c").id, first.id);
    f.pt.close_all().await;
    assert_eq!(f.fake.closes().len(), 2);
}

#[tokio::test]
async fn onward_failure_fails_the_request_and_keeps_nothing() {
    let f = fixture().await;
    f.fake.fail.store(true, Ordering::Relaxed);
    let err =
        f.pt.request(Request::new(incoming("conn-2", "nsm-in")))
            .await
            .expect_err("must fail");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("onward request"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("no endpoint for service"),
        "{}",
        err.message()
    );
    assert!(f.pt.connection_ids().is_empty());
    assert!(f.pt.stats().snapshot().connections.is_empty());
    // A best-effort close follows, in case the manager did part of the work.
    for _ in 0..50 {
        if !f.fake.closes().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(f.fake.closes().len(), 1);
    // Once the manager works, the same connection goes through.
    f.fake.fail.store(false, Ordering::Relaxed);
    f.pt.request(Request::new(incoming("conn-2", "nsm-in")))
        .await
        .expect("request");
    f.pt.close_all().await;
}

#[tokio::test]
async fn bad_requests_are_refused() {
    let f = fixture().await;
    let mut req = incoming("conn-3", "nsm-in");
    req.mechanism_preferences.clear();
    let err =
        f.pt.request(Request::new(req))
            .await
            .expect_err("no kernel");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err =
        f.pt.request(Request::new(NetworkServiceRequest::default()))
            .await
            .expect_err("no connection");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(f.fake.requests().is_empty());
}
