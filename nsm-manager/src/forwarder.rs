//! The manager's side of `nsm.forwarder.v1`: a client for the local
//! forwarder and the watcher that notices when it restarted.
//!
//! The forwarder keeps no durable state, so the manager is the source of
//! truth: whenever a Watch stream (re)starts, its SNAPSHOT is compared with
//! the connections this manager holds and every missing cross-connect is
//! programmed again. That single rule heals a forwarder restart and a
//! manager restart alike.

use std::path::Path;
use std::time::Duration;

use nsm_proto::forwarder::v1::cross_connect_event::Type as EventType;
use nsm_proto::forwarder::v1::cross_connect_status::State;
use nsm_proto::forwarder::v1::forwarder_client::ForwarderClient;
use nsm_proto::forwarder::v1::{CrossConnect, CrossConnectStatus, RemoveRequest, WatchRequest};
use tokio_stream::StreamExt;
use tonic::Status;
use tonic::transport::Channel;

/// Why a forwarder call failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    /// The call itself failed (forwarder down, bad request).
    #[error("forwarder {op} of cross-connect {id}: {} ({:?})", status.message(), status.code())]
    Call {
        /// Program or Remove.
        op: &'static str,
        /// Cross-connect id.
        id: String,
        /// The gRPC status.
        status: Status,
    },
    /// The forwarder answered STATE_FAILED.
    #[error("forwarder could not program cross-connect {id}: {error}")]
    Failed {
        /// Cross-connect id.
        id: String,
        /// The forwarder's reason.
        error: String,
    },
}

impl From<ForwarderError> for Status {
    /// The forwarder's code where it says something about the request the
    /// client can act on (its interface name is taken, its namespace is
    /// gone, ...) or about the forwarder being away; anything else is
    /// ours, Internal.
    fn from(e: ForwarderError) -> Status {
        use tonic::Code;
        match &e {
            ForwarderError::Call { status, .. }
                if matches!(
                    status.code(),
                    Code::Unavailable
                        | Code::AlreadyExists
                        | Code::NotFound
                        | Code::InvalidArgument
                        | Code::FailedPrecondition
                        | Code::ResourceExhausted
                        | Code::DeadlineExceeded
                ) =>
            {
                Status::new(status.code(), e.to_string())
            }
            _ => Status::internal(e.to_string()),
        }
    }
}

/// A client of the node's forwarder.
#[derive(Debug, Clone)]
pub struct Forwarder {
    client: ForwarderClient<Channel>,
}

impl Forwarder {
    /// A lazily connected client of the forwarder serving on `path`.
    pub fn new(path: &Path) -> Forwarder {
        Forwarder {
            client: ForwarderClient::new(nsm_proto::uds::connect_unix_lazy(path)),
        }
    }

    /// A lazily connected client of a forwarder serving mTLS on `path`
    /// (`nsm-forwarder --identity-dir`): we present our manager certificate
    /// and accept only a forwarder of our trust domain
    /// (`spiffe://TD/nsm-forwarder/...`).
    pub fn with_tls(path: &Path, tls: &std::sync::Arc<crate::tls::Tls>) -> Forwarder {
        Forwarder {
            client: ForwarderClient::new(tls.forwarder_channel(path)),
        }
    }

    /// Programs (or updates in place) a cross-connect.
    ///
    /// # Errors
    /// [`ForwarderError`].
    pub async fn program(&self, xc: CrossConnect) -> Result<CrossConnectStatus, ForwarderError> {
        let id = xc.id.clone();
        let mut req = tonic::Request::new(xc);
        req.set_timeout(Duration::from_secs(15));
        nsm_trace::inject(req.metadata_mut());
        let st = self
            .client
            .clone()
            .program(req)
            .await
            .map_err(|status| ForwarderError::Call {
                op: "Program",
                id: id.clone(),
                status,
            })?
            .into_inner();
        if st.state == State::Failed as i32 {
            return Err(ForwarderError::Failed {
                id,
                error: st.error,
            });
        }
        Ok(st)
    }

    /// Removes a cross-connect (unknown ids succeed).
    ///
    /// # Errors
    /// [`ForwarderError::Call`].
    pub async fn remove(&self, id: &str) -> Result<(), ForwarderError> {
        let mut req = tonic::Request::new(RemoveRequest { id: id.to_string() });
        req.set_timeout(Duration::from_secs(15));
        nsm_trace::inject(req.metadata_mut());
        self.client
            .clone()
            .remove(req)
            .await
            .map_err(|status| ForwarderError::Call {
                op: "Remove",
                id: id.to_string(),
                status,
            })?;
        Ok(())
    }

    /// Follows the forwarder's Watch stream forever, calling `on_snapshot`
    /// with the ids present in every SNAPSHOT (first event of each stream,
    /// so once per forwarder (re)start or reconnect).
    pub async fn watch<F, Fut>(&self, mut on_snapshot: F)
    where
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self
                .client
                .clone()
                .watch(WatchRequest {
                    counters_interval_ms: 0,
                })
                .await
            {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    while let Some(ev) = stream.next().await {
                        match ev {
                            Ok(ev) if ev.r#type == EventType::Snapshot as i32 => {
                                backoff = Duration::from_millis(100);
                                on_snapshot(ev.cross_connects.into_iter().map(|c| c.id).collect())
                                    .await;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "forwarder watch stream broke");
                                break;
                            }
                        }
                    }
                    tracing::info!("forwarder watch stream ended; reconnecting");
                }
                Err(e) => tracing::debug!(error = %e, "forwarder not reachable yet"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}
