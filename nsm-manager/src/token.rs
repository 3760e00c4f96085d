//! Signed paths: the JWT (ES256) each hop puts in its path segment, and the
//! verification a server runs on the segments before its own.
//!
//! A token is `base64url(header).base64url(claims).base64url(r||s)`:
//! - header `{"alg":"ES256","typ":"JWT","x5c":[LEAF]}`: the signer's leaf
//!   certificate (standard base64 DER, RFC 7515 4.1.6), so that a server can
//!   check segments of hops it has no connection to;
//! - claims `{"sub": signer's SPIFFE ID, "aud": next hop, "iat", "exp",
//!   "seg": the segment's id}`; `exp` is never later than the signer's
//!   certificate (NSM's rule) and equals the segment's `expires`.
//!
//! What a server checks ([`verify_path`]) for the segments before its own:
//! - the previous hop's token (the hop that called us over mTLS) is verified
//!   with the certificate the peer presented in the TLS handshake, and its
//!   `sub` must be that peer's SPIFFE ID and its `aud` our own: a token
//!   cannot be forwarded by anyone but its signer, nor to anyone but its
//!   audience (this is NSM's "token signed by the peer" rule). After a
//!   rotation the long-lived HTTP/2 connection still shows the old
//!   certificate; then the token's `x5c` is used instead, if it chains to our
//!   trust bundle and names the same SPIFFE ID as the TLS peer;
//! - each earlier signed token is verified with its `x5c` certificate, which
//!   must chain to our trust bundle and name `sub` in its URI SAN;
//! - chained: `aud` of each signed segment is the `sub` of the next one;
//! - unexpired (`exp > now`, and the certificate valid now);
//! - `seg` equals the id of the segment holding it: a token lifted from
//!   another connection's path (a replay into a different connection) fails.
//!
//! Only segment 0 may be unsigned: it is a local client identified at its
//! own manager by the unix socket's peer credentials. The one exception is
//! a chain function's hop (a passthrough endpoint that requests onward): an
//! unsigned segment between two segments signed by the same manager, the
//! first of them signed for the unsigned segment's name (the manager
//! dispatched to its local endpoint, which came back through it). A request on our own
//! unix socket has no TLS peer: signed segments are checked individually
//! (signature, certificate, expiry, segment binding) without the chain rule.
//!
//! Every function here is pure (time is passed in) so the fuzzers can drive
//! it with arbitrary paths.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use nsm_proto::connection::Path;
use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::identity::{CertInfo, Identity};

/// Longest token we look at: a leaf certificate plus claims fit in 4 KiB;
/// anything larger is refused before decoding.
pub const MAX_TOKEN_LEN: usize = 8192;

/// Why a token or a path is refused (becomes PermissionDenied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts, not JSON, or not ES256.
    #[error("segment {index}: malformed token: {why}")]
    Malformed {
        /// Segment index.
        index: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// The signature does not verify.
    #[error("segment {index}: bad signature")]
    Signature {
        /// Segment index.
        index: usize,
    },
    /// `exp` has passed (or the signer's certificate has).
    #[error("segment {index}: token expired")]
    Expired {
        /// Segment index.
        index: usize,
    },
    /// A claim does not match what this place in the path requires.
    #[error("segment {index}: {claim} is `{got}`, expected `{want}`")]
    Claim {
        /// Segment index.
        index: usize,
        /// `sub`, `aud` or `seg`.
        claim: &'static str,
        /// The token's value.
        got: String,
        /// The required value.
        want: String,
    },
    /// The signer's certificate is not from our trust domain's CA.
    #[error("segment {index}: signer certificate refused: {why}")]
    Certificate {
        /// Segment index.
        index: usize,
        /// Why.
        why: String,
    },
    /// A segment after the first carries no token.
    #[error("segment {index}: unsigned")]
    Unsigned {
        /// Segment index.
        index: usize,
    },
}

/// The claims of a path token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Signer's SPIFFE ID.
    pub sub: String,
    /// Next hop's identity.
    pub aud: String,
    /// Issued at, seconds since the epoch.
    #[serde(default)]
    pub iat: u64,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Id of the path segment the token was made for.
    pub seg: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    x5c: Vec<String>,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Signs a token for segment `seg` with `aud` as audience, expiring at
/// `exp` or at our certificate's end, whichever is first.
///
/// # Errors
/// Only if the system RNG fails.
pub fn sign(
    id: &Identity,
    aud: &str,
    seg: &str,
    now: SystemTime,
    exp: SystemTime,
) -> Result<String, ring::error::Unspecified> {
    let header = Header {
        alg: "ES256".into(),
        typ: Some("JWT".into()),
        x5c: id
            .chain
            .first()
            .map(|c| STANDARD.encode(c))
            .into_iter()
            .collect(),
    };
    let claims = Claims {
        sub: id.id.clone(),
        aud: aud.to_string(),
        iat: secs(now),
        exp: secs(exp.min(id.not_after)),
        seg: seg.to_string(),
    };
    let enc = |v: &[u8]| URL_SAFE_NO_PAD.encode(v);
    let input = format!(
        "{}.{}",
        enc(&serde_json::to_vec(&header).unwrap_or_default()),
        enc(&serde_json::to_vec(&claims).unwrap_or_default())
    );
    let sig = id.sign_es256(input.as_bytes())?;
    Ok(format!("{input}.{}", enc(&sig)))
}

/// The expiry a signed token would get: tokens never outlive the cert.
pub fn token_expiry(id: &Identity, wanted: SystemTime) -> SystemTime {
    wanted.min(id.not_after)
}

/// Whether `token` has the shape of a JWT (three dot-separated parts); our
/// unsigned placeholder and an empty token do not.
pub fn looks_signed(token: &str) -> bool {
    token.split('.').count() == 3
}

/// A decoded but not yet verified token.
#[derive(Debug)]
pub struct Decoded {
    /// Its claims.
    pub claims: Claims,
    /// The `x5c` leaf, if any.
    pub x5c: Option<Vec<u8>>,
    input_len: usize,
    sig: Vec<u8>,
}

/// Splits and decodes `token` without checking the signature.
///
/// # Errors
/// [`TokenError::Malformed`].
pub fn decode(index: usize, token: &str) -> Result<Decoded, TokenError> {
    let bad = |why| TokenError::Malformed { index, why };
    if token.len() > MAX_TOKEN_LEN {
        return Err(bad("too long"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("not three parts"));
    };
    let h = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| bad("header not base64url"))?;
    let c = URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| bad("claims not base64url"))?;
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad("signature not base64url"))?;
    let header: Header = serde_json::from_slice(&h).map_err(|_| bad("header not JSON"))?;
    if header.alg != "ES256" {
        return Err(bad("alg is not ES256"));
    }
    let claims: Claims = serde_json::from_slice(&c).map_err(|_| bad("claims not JSON"))?;
    let x5c = match header.x5c.first() {
        Some(b) => Some(STANDARD.decode(b).map_err(|_| bad("x5c not base64"))?),
        None => None,
    };
    Ok(Decoded {
        claims,
        x5c,
        input_len: token.len() - token.rsplit('.').next().map_or(0, str::len) - 1,
        sig,
    })
}

/// Verifies `token`'s signature with `cert`'s key and that `sub` is `cert`'s
/// SPIFFE ID and neither token nor certificate has expired at `now`.
///
/// # Errors
/// [`TokenError`].
pub fn verify_with_cert(
    index: usize,
    token: &str,
    cert: &[u8],
    now: SystemTime,
) -> Result<Claims, TokenError> {
    let d = decode(index, token)?;
    let info = CertInfo::from_der(cert).map_err(|why| TokenError::Certificate { index, why })?;
    let key = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &info.public_key);
    key.verify(&token.as_bytes()[..d.input_len], &d.sig)
        .map_err(|_| TokenError::Signature { index })?;
    let cert_id = info.spiffe_id.unwrap_or_default();
    if d.claims.sub != cert_id {
        return Err(TokenError::Claim {
            index,
            claim: "sub",
            got: d.claims.sub,
            want: cert_id,
        });
    }
    let t = secs(now);
    if d.claims.exp <= t || info.not_after <= now {
        return Err(TokenError::Expired { index });
    }
    Ok(d.claims)
}

/// What an endpoint with an identity checks on a Request or Close that its
/// manager hands it over the endpoint's unix socket: the caller's segment
/// (`path.index`) carries a token signed by a certificate of our trust
/// bundle, addressed to us (`aud` = `own_id`), for that segment, unexpired.
/// A process that can reach the endpoint's socket but holds no mesh key
/// cannot make it accept (or drop) a connection. Returns the signer's
/// SPIFFE ID.
///
/// # Errors
/// [`TokenError`]: unsigned, forged, expired, replayed from another segment,
/// or addressed to someone else.
pub fn verify_addressed_to(
    path: &Path,
    own_id: &str,
    roots: &rustls::RootCertStore,
    now: SystemTime,
) -> Result<String, TokenError> {
    let index = path.index as usize;
    let seg = path
        .path_segments
        .get(index)
        .ok_or(TokenError::Unsigned { index })?;
    if !looks_signed(&seg.token) {
        return Err(TokenError::Unsigned { index });
    }
    let d = decode(index, &seg.token)?;
    let cert = d.x5c.ok_or(TokenError::Malformed {
        index,
        why: "no x5c certificate",
    })?;
    crate::tls::verify_chain(roots, &[CertificateDer::from(cert.as_slice())], now).map_err(
        |e| TokenError::Certificate {
            index,
            why: e.to_string(),
        },
    )?;
    let claims = verify_with_cert(index, &seg.token, &cert, now)?;
    if claims.seg != seg.id {
        return Err(TokenError::Claim {
            index,
            claim: "seg",
            got: claims.seg,
            want: seg.id.clone(),
        });
    }
    if claims.aud != own_id {
        return Err(TokenError::Claim {
            index,
            claim: "aud",
            got: claims.aud,
            want: own_id.to_string(),
        });
    }
    Ok(claims.sub)
}

/// Who handed us the path.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// A peer over mTLS: its SPIFFE ID and leaf certificate.
    Peer {
        /// SPIFFE ID from the handshake.
        id: &'a str,
        /// Leaf certificate from the handshake.
        cert: &'a [u8],
    },
    /// A local client on our unix socket.
    Local,
}

/// Verifies segments `0..=prev` of `path` for a server whose own SPIFFE ID
/// is `own_id` and whose own segment is at `own_index` (see the module
/// doc). `roots` check the `x5c` certificates of earlier hops.
///
/// # Errors
/// The first [`TokenError`] found.
pub fn verify_path(
    path: &Path,
    prev: usize,
    own_index: usize,
    caller: Caller<'_>,
    own_id: &str,
    roots: &rustls::RootCertStore,
    now: SystemTime,
) -> Result<(), TokenError> {
    if prev >= own_index || prev >= path.path_segments.len() {
        // Our segment is the first: nobody before us to check.
        return Ok(());
    }
    let segs = &path.path_segments[..=prev];
    let mut next_sub: Option<String> = None;
    for (i, seg) in segs.iter().enumerate().rev() {
        let is_prev = i == prev;
        if !looks_signed(&seg.token) {
            if i == 0 && !(is_prev && matches!(caller, Caller::Peer { .. })) {
                // A local client's segment, vouched for by its manager.
                next_sub = None;
                continue;
            }
            if matches!(caller, Caller::Local) {
                next_sub = None;
                continue;
            }
            // A chain function's hop: a local endpoint (no identity of its
            // own) that a manager dispatched to (segment i-1, signed for the
            // endpoint's name) and that requested onward through the same
            // manager (segment i+1). That manager vouches for it on both
            // sides, as it does for a local client's segment 0. Segment i-1
            // is fully verified on the next iteration.
            if i > 0
                && !is_prev
                && let Some(after) = &next_sub
                && let Ok(before) = decode(i - 1, &segs[i - 1].token)
                && before.claims.sub == *after
                && (before.claims.aud == seg.name
                    || crate::identity::trust_domain(&before.claims.sub).is_some_and(|td| {
                        before.claims.aud == crate::identity::endpoint_id(td, &seg.name)
                    }))
            {
                next_sub = None;
                continue;
            }
            return Err(TokenError::Unsigned { index: i });
        }
        let claims = match (is_prev, caller) {
            (true, Caller::Peer { id, cert }) => {
                // After a rotation the HTTP/2 connection (and so the TLS
                // certificate we saw) predates the signing key: a newer
                // certificate in x5c is accepted if it chains to our roots
                // and names the same SPIFFE ID as the TLS peer.
                let d = decode(i, &seg.token)?;
                let signer = match d.x5c {
                    Some(x) if x.as_slice() != cert => {
                        crate::tls::verify_chain(roots, &[CertificateDer::from(x.as_slice())], now)
                            .map_err(|e| TokenError::Certificate {
                                index: i,
                                why: e.to_string(),
                            })?;
                        let xid = CertInfo::from_der(&x)
                            .map_err(|why| TokenError::Certificate { index: i, why })?
                            .spiffe_id
                            .unwrap_or_default();
                        if xid != id {
                            return Err(TokenError::Claim {
                                index: i,
                                claim: "sub",
                                got: xid,
                                want: id.to_string(),
                            });
                        }
                        x
                    }
                    _ => cert.to_vec(),
                };
                let c = verify_with_cert(i, &seg.token, &signer, now)?;
                if c.sub != id {
                    return Err(TokenError::Claim {
                        index: i,
                        claim: "sub",
                        got: c.sub,
                        want: id.to_string(),
                    });
                }
                c
            }
            _ => {
                let d = decode(i, &seg.token)?;
                let cert = d.x5c.ok_or(TokenError::Malformed {
                    index: i,
                    why: "no x5c certificate",
                })?;
                crate::tls::verify_chain(roots, &[CertificateDer::from(cert.as_slice())], now)
                    .map_err(|e| TokenError::Certificate {
                        index: i,
                        why: e.to_string(),
                    })?;
                verify_with_cert(i, &seg.token, &cert, now)?
            }
        };
        if claims.seg != seg.id {
            return Err(TokenError::Claim {
                index: i,
                claim: "seg",
                got: claims.seg,
                want: seg.id.clone(),
            });
        }
        let want_aud = match (&next_sub, is_prev, caller) {
            (_, true, Caller::Peer { .. }) => Some(own_id.to_string()),
            (Some(s), false, Caller::Peer { .. }) => Some(s.clone()),
            _ => None,
        };
        if let Some(want) = want_aud
            && claims.aud != want
        {
            return Err(TokenError::Claim {
                index: i,
                claim: "aud",
                got: claims.aud,
                want,
            });
        }
        next_sub = Some(claims.sub);
    }
    Ok(())
}
