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

/// The socket file appears only once it accepts: a client that connects as
/// soon as it sees the file is never refused, and nothing else is left in
/// the directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_file_appears_only_once_it_accepts() {
    let dir = tempfile::tempdir().expect("temporary directory");
    for i in 0..200 {
        let path = dir.path().join(format!("s{i}.sock"));
        let watched = path.clone();
        let watcher = std::thread::spawn(move || {
            while !watched.exists() {
                std::hint::spin_loop();
            }
            std::os::unix::net::UnixStream::connect(&watched).map(drop)
        });
        let listener = uds::bind_unix(&path).expect("bind");
        watcher.join().expect("watcher").unwrap_or_else(|e| {
            panic!("bind {i}: the file was there before the socket listened: {e}")
        });
        drop(listener);
    }
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".sock"))
        .collect();
    left.sort();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}
