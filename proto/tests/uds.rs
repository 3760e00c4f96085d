//! `uds::bind_unix` cleans up after dead servers but never takes a live
//! server's socket or deletes a file that is not a socket; `connect_unix`
//! fails fast and `connect_unix_lazy` waits for the first call.

use std::io::ErrorKind;

use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
use nsm_proto::uds;
use tonic::Code;

#[tokio::test]
async fn bind_replaces_a_stale_socket() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("stale.sock");
    // A listener that is dropped leaves its socket file behind, as a crashed
    // server does.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    assert!(path.exists());
    uds::bind_unix(&path).expect("stale socket is replaced");
}

#[tokio::test]
async fn bind_refuses_a_live_socket() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("live.sock");
    let _live = uds::bind_unix(&path).expect("first bind");
    let err = uds::bind_unix(&path).expect_err("second bind must fail");
    assert_eq!(err.kind(), ErrorKind::AddrInUse);
}

#[tokio::test]
async fn bind_leaves_other_files_alone() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("not-a-socket");
    std::fs::write(&path, b"keep me").expect("write");
    let err = uds::bind_unix(&path).expect_err("must not replace a regular file");
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&path).expect("still there"), b"keep me");
}

#[tokio::test]
async fn connect_fails_when_nobody_listens() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let result = uds::connect_unix(dir.path().join("absent.sock")).await;
    assert!(result.is_err());
}

#[tokio::test]
async fn lazy_channel_fails_per_call_until_a_server_listens() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let channel = uds::connect_unix_lazy(dir.path().join("later.sock"));
    let mut client = NetworkServiceClient::new(channel);
    let err = client
        .close(nsm_proto::connection::Connection::default())
        .await
        .expect_err("nobody listens yet");
    assert_eq!(err.code(), Code::Unavailable);
}
