//! gRPC over unix domain sockets.
//!
//! Local traffic (CNI plugin to manager, manager to forwarder, testbed to
//! both) goes over unix sockets: file permissions are the access control, and
//! no port has to be allocated. tonic speaks HTTP/2 over any byte stream, but
//! its `Endpoint` wants a URI; these helpers hide the dummy URI and the
//! connector, and on the serving side the stale-socket dance.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Placeholder URI for unix-socket channels. The connector ignores it; it
/// only becomes the HTTP/2 `:authority`, which our servers do not check.
const PLACEHOLDER_URI: &str = "http://localhost";

fn endpoint() -> Endpoint {
    Endpoint::from_static(PLACEHOLDER_URI)
}

/// Connector handing tonic a fresh connection to `path` each time it (re)connects.
fn connector(
    path: PathBuf,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<UnixStream>,
    Error = io::Error,
    Future = impl Future<Output = io::Result<TokioIo<UnixStream>>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { UnixStream::connect(path).await.map(TokioIo::new) }
    })
}

/// Connects a gRPC channel to the server listening on the unix socket at
/// `path`, and fails at once if nobody listens there.
///
/// The channel reconnects by itself (to the same path) if the connection
/// later breaks, e.g. when the server restarts.
///
/// # Errors
/// A transport error when the socket cannot be connected to or the HTTP/2
/// handshake fails.
pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Channel, tonic::transport::Error> {
    endpoint()
        .connect_with_connector(connector(path.as_ref().to_path_buf()))
        .await
}

/// Like [`connect_unix`], but connects on the first request instead of now,
/// so a client can be built before its server is up (e.g. the manager
/// starting before the forwarder). Calls fail with `Unavailable` while
/// nobody listens at `path`.
pub fn connect_unix_lazy(path: impl AsRef<Path>) -> Channel {
    endpoint().connect_with_connector_lazy(connector(path.as_ref().to_path_buf()))
}

/// Binds a unix socket at `path` for a tonic server, to be passed to
/// `Server::serve_with_incoming`.
///
/// A socket file left at `path` by a process that died is removed first. A
/// socket that still accepts connections is left alone and reported as
/// [`io::ErrorKind::AddrInUse`], so that a second instance cannot silently
/// steal the first one's clients. Anything at `path` that is not a socket is
/// reported as [`io::ErrorKind::AlreadyExists`] and never deleted. Missing
/// parent directories are created.
///
/// The file appears at `path` only once the socket listens: it is bound
/// under a temporary name beside it and then linked into place (`link(2)`
/// fails rather than replace a file another server put there meanwhile).
/// So a client that waits for the file to exist never finds it refusing
/// connections (a bind followed by a listen would leave that window).
///
/// The socket file is not removed when the listener is dropped; the next
/// bind cleans it up.
///
/// # Errors
/// The conditions above, or any I/O error from creating the directory,
/// removing the stale file, binding or linking.
///
/// # Panics
/// Outside a tokio runtime with I/O enabled (as `tokio::net::UnixListener`).
pub fn bind_unix(path: impl AsRef<Path>) -> io::Result<UnixListenerStream> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let path = path.as_ref();
    remove_stale_socket(path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    // Short, so that it fits the 108 bytes of a socket address wherever
    // `path` does.
    let tmp = dir.unwrap_or(Path::new(".")).join(format!(
        ".b{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(UnixListenerStream::new(listener)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another process is serving on {}", path.display()),
        )),
        Err(e) => Err(e),
    }
}

/// Removes `path` if it is a socket nobody listens on; see [`bind_unix`].
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    // A blocking connect on a local socket completes or fails at once; it
    // tells a live server from a file left behind by a dead one.
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another process is serving on {}", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}
