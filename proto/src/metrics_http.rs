//! The smallest HTTP server that a Prometheus scraper needs: `GET /metrics`
//! answered with a body rendered at request time, anything else 404/405.
//!
//! Shared by `nsm-forwarder` and `nsm-manager` (`--metrics-listen`), which
//! link nothing else in common but this crate. HTTP/1.0 and 1.1 requests
//! are read up to [`MAX_REQUEST`] bytes and [`READ_TIMEOUT`], answered, and
//! the connection closed: no keep-alive, no chunking, no TLS (put the
//! listener on a node-local or pod address). A slow or hostile client costs
//! one task and at most `MAX_REQUEST` bytes until the timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The path served.
pub const PATH: &str = "/metrics";

/// Content type of `prometheus-client`'s text encoding (OpenMetrics 1.0,
/// which Prometheus scrapes natively).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Largest request head read, bytes.
pub const MAX_REQUEST: usize = 8 * 1024;

/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` (port 0: any free port; see `local_addr`).
///
/// # Errors
/// The address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` on `listener` forever, answering each scrape with
/// `render()` as `content_type`. Run it as a task; abort it to stop.
pub async fn serve<F, Fut>(listener: TcpListener, content_type: &'static str, render: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = String> + Send,
{
    let render = Arc::new(render);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _ = answer(stream, content_type, &*render).await;
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
    Bad,
}

/// Routes a request head (the bytes up to the blank line).
fn route(head: &[u8]) -> Route {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).unwrap_or_default().trim_end();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::Bad;
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return Route::Bad;
    }
    if method != "GET" {
        return Route::BadMethod;
    }
    let path = target.split('?').next().unwrap_or_default();
    if path == PATH {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

async fn answer<F, Fut>(
    mut stream: TcpStream,
    content_type: &'static str,
    render: &F,
) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.ends_with(b"\n\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
            if head.len() > MAX_REQUEST {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(READ_TIMEOUT, read).await.is_err() {
        return Ok(());
    }
    let (status, ctype, body) = match route(&head) {
        Route::Metrics => ("200 OK", content_type, render().await),
        Route::NotFound => (
            "404 Not Found",
            "text/plain",
            format!("only {PATH} is served\n"),
        ),
        Route::BadMethod => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
        Route::Bad => ("400 Bad Request", "text/plain", "bad request\n".into()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::Bad);
        assert_eq!(route(b"\xff\xfe"), Route::Bad);
    }

    #[tokio::test]
    async fn serves_and_refuses() {
        let l = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let task = tokio::spawn(serve(l, "text/plain", || async { "x 1\n".to_string() }));
        let get = |req: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(req.as_bytes()).await.expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).await.expect("read");
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nx 1\n"), "{ok}");
        assert!(ok.contains("Content-Length: 4\r\n"), "{ok}");
        let nf = get("GET /other HTTP/1.1\r\n\r\n").await;
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        task.abort();
    }
}
