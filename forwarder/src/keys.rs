//! Per-connection WireGuard keys.
//!
//! Each cross-connect with a WireGuard side gets its own x25519 static key
//! pair on its first Program, kept across updates of that id and forgotten
//! on Remove. Only the public key leaves the forwarder (base64, in
//! `CrossConnectStatus.wireguard_public_key`); the private key is wrapped
//! in [`PrivateKey`], whose `Debug` prints nothing secret, so it cannot end
//! up in a log line or a reply by accident.

use std::io::Read;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use nsm_dataplane::{PublicKey, StaticSecret};

/// A static private key. `Debug` is redacted on purpose.
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl PrivateKey {
    /// A fresh key from the OS random source (`/dev/urandom`, the same
    /// entropy `getrandom(2)` gives once the pool is initialised).
    ///
    /// # Errors
    /// When the random source cannot be read.
    pub fn generate() -> std::io::Result<Self> {
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(PrivateKey(StaticSecret::from(bytes)))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey::from(&self.0)
    }

    /// The secret itself, for the WireGuard session only.
    pub fn secret(&self) -> &StaticSecret {
        &self.0
    }
}

/// A key that is not 32 bytes of base64.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Not valid base64.
    #[error("not valid base64")]
    Base64,
    /// Decoded to the wrong length.
    #[error("decodes to {0} bytes, a WireGuard key has 32")]
    Length(usize),
}

/// Parses a base64 public key (44 characters, standard alphabet, padded).
///
/// # Errors
/// [`KeyError`] when it is not base64 or not 32 bytes.
pub fn parse_public(s: &str) -> Result<PublicKey, KeyError> {
    let bytes = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
    let arr: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::Length(bytes.len()))?;
    Ok(PublicKey::from(arr))
}

/// Formats a public key as base64.
pub fn format_public(key: &PublicKey) -> String {
    STANDARD.encode(key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_redaction() {
        let k = PrivateKey::generate().expect("urandom");
        let s = format_public(&k.public());
        assert_eq!(s.len(), 44);
        assert_eq!(parse_public(&s).expect("parses"), k.public());
        assert_eq!(format!("{k:?}"), "PrivateKey(<redacted>)");
    }

    #[test]
    fn bad_keys() {
        assert_eq!(parse_public("not base64!"), Err(KeyError::Base64));
        assert_eq!(parse_public("AAAA"), Err(KeyError::Length(3)));
    }
}
