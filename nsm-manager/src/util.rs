//! Small shared helpers: ids, timestamps, and dialing `unix://` / `tcp://` URLs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;
use tonic::transport::{Channel, Endpoint};

use crate::tls::Tls;

/// A random UUID v4 string, as NSM uses for connection and segment ids.
pub fn uuid() -> String {
    let b: [u8; 16] = rand::random();
    let mut b = b;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `t` as a protobuf timestamp.
pub fn to_ts(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf timestamp as a system time (negative values clamp to the epoch).
pub fn from_ts(t: &Timestamp) -> SystemTime {
    let secs = u64::try_from(t.seconds).unwrap_or(0);
    let nanos = u32::try_from(t.nanos).unwrap_or(0);
    UNIX_EPOCH + Duration::new(secs, nanos)
}

/// Why a URL cannot be dialed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported URL `{0}` (expected unix:///PATH or tcp://HOST:PORT)")]
pub struct BadUrl(pub String);

/// A lazily connected channel to `unix:///path` or `tcp://host:port`.
///
/// # Errors
/// [`BadUrl`] for other schemes.
pub fn channel(url: &str) -> Result<Channel, BadUrl> {
    if let Some(path) = url.strip_prefix("unix://") {
        return Ok(nsm_proto::uds::connect_unix_lazy(path));
    }
    if let Some(addr) = url.strip_prefix("tcp://") {
        let ep =
            Endpoint::from_shared(format!("http://{addr}")).map_err(|_| BadUrl(url.to_string()))?;
        return Ok(ep.connect_timeout(Duration::from_secs(5)).connect_lazy());
    }
    Err(BadUrl(url.to_string()))
}

/// Like [`channel`], but `tcp://` URLs go over mTLS when `tls` is given
/// (every link between managers once identities are configured).
///
/// # Errors
/// [`BadUrl`].
pub fn channel_tls(url: &str, tls: Option<&Arc<Tls>>) -> Result<Channel, BadUrl> {
    match (url.strip_prefix("tcp://"), tls) {
        (Some(addr), Some(tls)) => tls.channel(addr).map_err(|_| BadUrl(url.to_string())),
        _ => channel(url),
    }
}

/// Channels by URL, so that every call to a peer reuses one HTTP/2 connection.
#[derive(Debug, Default)]
pub struct Channels {
    map: Mutex<HashMap<String, Channel>>,
    tls: Option<Arc<Tls>>,
}

impl Channels {
    /// Channels whose `tcp://` URLs use `tls` (plain TCP when `None`).
    pub fn new(tls: Option<Arc<Tls>>) -> Channels {
        Channels {
            map: Mutex::default(),
            tls,
        }
    }

    /// The channel for `url`, made on first use.
    ///
    /// # Errors
    /// [`BadUrl`].
    pub fn get(&self, url: &str) -> Result<Channel, BadUrl> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get(url) {
            return Ok(c.clone());
        }
        let c = channel_tls(url, self.tls.as_ref())?;
        m.insert(url.to_string(), c.clone());
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_shape() {
        let u = uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(uuid(), u);
    }

    #[test]
    fn timestamps_round_trip() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(from_ts(&to_ts(t)), t);
    }

    #[tokio::test]
    async fn urls() {
        assert!(channel("unix:///tmp/x.sock").is_ok());
        assert!(channel("tcp://127.0.0.1:5001").is_ok());
        assert!(channel("http://x").is_err());
    }
}
