//! Identities: the mesh's own CA and short-lived X.509 certificates that
//! carry a SPIFFE ID (`spiffe://TRUST_DOMAIN/PATH`) in their URI SAN.
//!
//! Layout of an identity directory (what `nsmctl ca issue --out DIR` writes
//! and `nsm-manager --identity-dir DIR` reads):
//! - `cert.pem`: the leaf certificate (ECDSA P-256, serverAuth + clientAuth,
//!   one URI SAN: the SPIFFE ID);
//! - `key.pem`: its PKCS#8 private key, mode 0600;
//! - `ca.pem`: the trust bundle (the mesh CA certificate).
//!
//! A CA directory (`nsmctl ca create --dir DIR`) holds `ca.pem` and
//! `ca.key` (0600). The CA's own URI SAN is `spiffe://TRUST_DOMAIN`, which is
//! where the trust domain is read back from.
//!
//! Why files and a reload loop instead of an API: rotation is "write new
//! files" for any issuer (nsmctl, the testbed, cert-manager, a SPIRE helper),
//! and [`IdentitySource`] re-reads them when their mtime changes. New TLS
//! handshakes and new tokens use the new key; established HTTP/2 connections
//! keep running (TLS does not re-authenticate an established session).
//! Files are replaced by rename, so a reader sees either the old or the new
//! file; a cert and key from different generations are detected (public
//! keys differ) and the previous identity is kept until both match.
//!
//! Secrets: private keys live in [`SecretDer`] (zeroized on drop, redacted
//! in `Debug`) and are never logged; only SPIFFE IDs and expiries are.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// File names inside identity and CA directories.
pub const CERT_FILE: &str = "cert.pem";
/// The leaf's private key (0600).
pub const KEY_FILE: &str = "key.pem";
/// The trust bundle / the CA certificate.
pub const CA_FILE: &str = "ca.pem";
/// The CA's private key (0600), in a CA directory only.
pub const CA_KEY_FILE: &str = "ca.key";

/// Why an identity cannot be made or used. Messages name the file and never
/// contain key material.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file's content is unusable.
    #[error("{path}: {reason}")]
    Bad {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A SPIFFE ID or trust domain is malformed.
    #[error("bad SPIFFE ID `{0}` (expected spiffe://TRUST_DOMAIN/PATH)")]
    BadId(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Gen(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> IdentityError {
    IdentityError::Bad {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// The trust domain of `spiffe://TD/...`, if `id` is a well-formed SPIFFE ID
/// (lower-case trust domain of `[a-z0-9.-_]`, no query or fragment).
pub fn trust_domain(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    let td = rest.split('/').next()?;
    let ok = !td.is_empty()
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
        && !id.contains(['?', '#']);
    ok.then_some(td)
}

/// The SPIFFE ID of endpoint `name` in trust domain `td`:
/// `spiffe://TD/nsm-endpoint/NAME`. A manager signs its segment for this
/// audience when it dispatches to a local endpoint, and an endpoint with an
/// identity (`nsm-endpoint --identity-dir`) holds a certificate for it.
pub fn endpoint_id(td: &str, name: &str) -> String {
    format!("spiffe://{td}/nsm-endpoint/{name}")
}

/// Checks `id` is `spiffe://TD/PATH` with a non-empty path (workload IDs).
///
/// # Errors
/// [`IdentityError::BadId`].
pub fn check_workload_id(id: &str) -> Result<(), IdentityError> {
    let td = trust_domain(id).ok_or_else(|| IdentityError::BadId(id.to_string()))?;
    let path = &id["spiffe://".len() + td.len()..];
    if path.len() < 2 || !path.starts_with('/') || path.contains("//") || path.ends_with('/') {
        return Err(IdentityError::BadId(id.to_string()));
    }
    Ok(())
}

/// DER bytes of a private key: zeroized on drop, redacted in `Debug`.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretDer(Vec<u8>);

impl SecretDer {
    /// The bytes (PKCS#8 DER). Callers must not log or copy them around.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SecretDer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretDer(<redacted>)")
    }
}

/// Writes `data` to `path` atomically (temp file + rename) with `mode`, so
/// that a reloading reader never sees a half-written file and a key file is
/// never readable by others, not even briefly.
///
/// # Errors
/// I/O errors, naming the path.
pub fn write_file_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f"),
        std::process::id()
    ));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    // `mode` only applies to a new file; an old temp file keeps its mode.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// How long a CA lives by default (the leaves are the short-lived part).
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Creates a mesh CA for `trust_domain` in `dir` (`ca.pem`, `ca.key` 0600).
/// Refuses to overwrite an existing CA key.
///
/// # Errors
/// [`IdentityError`].
pub fn create_ca(dir: &Path, trust_domain_name: &str, ttl: Duration) -> Result<(), IdentityError> {
    let id = format!("spiffe://{trust_domain_name}");
    if trust_domain(&id) != Some(trust_domain_name) {
        return Err(IdentityError::BadId(id));
    }
    let key_path = dir.join(CA_KEY_FILE);
    if key_path.exists() {
        return Err(bad(
            &key_path,
            "a CA key exists already; not overwriting it",
        ));
    }
    let mut p = CertificateParams::default();
    p.distinguished_name.push(
        DnType::CommonName,
        format!("nsm-rs mesh CA {trust_domain_name}"),
    );
    p.subject_alt_names = vec![SanType::URI(
        id.clone()
            .try_into()
            .map_err(|_| IdentityError::BadId(id))?,
    )];
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(60)).into();
    p.not_after = (now + ttl).into();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = p.self_signed(&key)?;
    let mut key_pem = key.serialize_pem();
    write_file_atomic(&key_path, key_pem.as_bytes(), 0o600)?;
    key_pem.zeroize();
    write_file_atomic(&dir.join(CA_FILE), cert.pem().as_bytes(), 0o644)
}

/// Issues a certificate for `id` from the CA in `ca_dir`, valid for `ttl`
/// (not after the CA), into `out` (`cert.pem`, `key.pem` 0600, `ca.pem`).
/// Re-issuing into the same directory is a rotation.
///
/// # Errors
/// [`IdentityError`], e.g. an `id` outside the CA's trust domain.
pub fn issue(ca_dir: &Path, id: &str, ttl: Duration, out: &Path) -> Result<(), IdentityError> {
    check_workload_id(id)?;
    let ca_path = ca_dir.join(CA_FILE);
    let ca_pem = fs::read_to_string(&ca_path).map_err(io_err(&ca_path))?;
    let ca_der = first_pem_cert(&ca_path, &ca_pem)?;
    let ca_info = CertInfo::parse(&ca_path, &ca_der)?;
    let ca_td = ca_info
        .spiffe_id
        .as_deref()
        .and_then(trust_domain)
        .ok_or_else(|| bad(&ca_path, "CA certificate has no spiffe:// URI SAN"))?;
    if trust_domain(id) != Some(ca_td) {
        return Err(bad(
            &ca_path,
            format!("`{id}` is outside the CA's trust domain `{ca_td}`"),
        ));
    }
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let mut ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|_| bad(&ca_key_path, "not a PEM key"));
    ca_key_pem.zeroize();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key?)?;

    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, id);
    p.subject_alt_names = vec![SanType::URI(
        id.to_string()
            .try_into()
            .map_err(|_| IdentityError::BadId(id.to_string()))?,
    )];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(60)).into();
    p.not_after = (now + ttl).min(ca_info.not_after).into();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = p.signed_by(&key, &issuer)?;
    // Key first: a reader that sees the new cert with the old key rejects
    // the pair (public keys differ) and retries; never the reverse order's
    // window of a new key that nobody has a cert for.
    let mut key_pem = key.serialize_pem();
    write_file_atomic(&out.join(KEY_FILE), key_pem.as_bytes(), 0o600)?;
    key_pem.zeroize();
    write_file_atomic(&out.join(CA_FILE), ca_pem.as_bytes(), 0o644)?;
    write_file_atomic(&out.join(CERT_FILE), cert.pem().as_bytes(), 0o644)
}

fn pem_blocks(path: &Path, text: &str, tag: &str) -> Result<Vec<Vec<u8>>, IdentityError> {
    let blocks = pem::parse_many(text).map_err(|_| bad(path, "not PEM"))?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == tag)
        .map(pem::Pem::into_contents)
        .collect())
}

fn first_pem_cert(path: &Path, text: &str) -> Result<Vec<u8>, IdentityError> {
    pem_blocks(path, text, "CERTIFICATE")?
        .into_iter()
        .next()
        .ok_or_else(|| bad(path, "no CERTIFICATE block"))
}

/// What we need from a certificate: its SPIFFE ID, validity and public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The first `spiffe://` URI SAN.
    pub spiffe_id: Option<String>,
    /// End of validity.
    pub not_after: SystemTime,
    /// The subject public key (for P-256: the uncompressed point).
    pub public_key: Vec<u8>,
}

impl CertInfo {
    /// Parses a DER certificate (`path` only names it in errors).
    ///
    /// # Errors
    /// [`IdentityError::Bad`].
    pub fn parse(path: &Path, der: &[u8]) -> Result<CertInfo, IdentityError> {
        Self::from_der(der).map_err(|r| bad(path, r))
    }

    /// Parses a DER certificate.
    ///
    /// # Errors
    /// Why it does not parse.
    pub fn from_der(der: &[u8]) -> Result<CertInfo, String> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, c) = X509Certificate::from_der(der).map_err(|e| format!("bad certificate: {e}"))?;
        let spiffe_id = c.subject_alternative_name().ok().flatten().and_then(|san| {
            san.value.general_names.iter().find_map(|g| match g {
                GeneralName::URI(u) if u.starts_with("spiffe://") => Some((*u).to_string()),
                _ => None,
            })
        });
        let secs = u64::try_from(c.validity().not_after.timestamp()).unwrap_or(0);
        Ok(CertInfo {
            spiffe_id,
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            public_key: c.public_key().subject_public_key.data.to_vec(),
        })
    }
}

/// Where an identity's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPaths {
    /// Leaf certificate (PEM; may be followed by intermediates).
    pub cert: PathBuf,
    /// Private key (PEM PKCS#8).
    pub key: PathBuf,
    /// Trust bundle (PEM, one or more CA certificates).
    pub ca: PathBuf,
}

impl IdentityPaths {
    /// The standard file names inside `dir`.
    pub fn in_dir(dir: &Path) -> IdentityPaths {
        IdentityPaths {
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
            ca: dir.join(CA_FILE),
        }
    }

    fn mtimes(&self) -> [Option<SystemTime>; 3] {
        [&self.cert, &self.key, &self.ca].map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
    }
}

/// One generation of an identity: certificate chain, key, trust bundle.
pub struct Identity {
    /// Our SPIFFE ID.
    pub id: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// End of the leaf's validity: tokens never outlive it.
    pub not_after: SystemTime,
    /// The CA certificates we trust.
    pub roots: Arc<rustls::RootCertStore>,
    key: SecretDer,
    signer: EcdsaKeyPair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads and checks one generation: the key matches the leaf, the leaf
    /// has a SPIFFE ID in the bundle's trust domain and chains to the bundle.
    ///
    /// # Errors
    /// [`IdentityError`], naming the file.
    pub fn load(paths: &IdentityPaths) -> Result<Identity, IdentityError> {
        let cert_pem = fs::read_to_string(&paths.cert).map_err(io_err(&paths.cert))?;
        let chain: Vec<CertificateDer<'static>> =
            pem_blocks(&paths.cert, &cert_pem, "CERTIFICATE")?
                .into_iter()
                .map(CertificateDer::from)
                .collect();
        let leaf = chain
            .first()
            .ok_or_else(|| bad(&paths.cert, "no CERTIFICATE block"))?;
        let info = CertInfo::parse(&paths.cert, leaf)?;
        let id = info
            .spiffe_id
            .clone()
            .ok_or_else(|| bad(&paths.cert, "no spiffe:// URI SAN"))?;
        check_workload_id(&id)?;
        let mut key_pem = fs::read_to_string(&paths.key).map_err(io_err(&paths.key))?;
        let blocks = pem_blocks(&paths.key, &key_pem, "PRIVATE KEY");
        key_pem.zeroize();
        let key = SecretDer(
            blocks?
                .into_iter()
                .next()
                .ok_or_else(|| bad(&paths.key, "no PKCS#8 PRIVATE KEY block"))?,
        );
        let signer = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            key.expose(),
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|_| bad(&paths.key, "not an ECDSA P-256 PKCS#8 key"))?;
        if signer.public_key().as_ref() != info.public_key.as_slice() {
            return Err(bad(
                &paths.key,
                format!("key does not match {}", paths.cert.display()),
            ));
        }
        let ca_pem = fs::read_to_string(&paths.ca).map_err(io_err(&paths.ca))?;
        let mut roots = rustls::RootCertStore::empty();
        let mut td_ok = false;
        let td = trust_domain(&id).unwrap_or_default().to_string();
        for der in pem_blocks(&paths.ca, &ca_pem, "CERTIFICATE")? {
            let ca = CertInfo::parse(&paths.ca, &der)?;
            td_ok |= ca.spiffe_id.as_deref().and_then(trust_domain) == Some(td.as_str());
            roots
                .add(CertificateDer::from(der))
                .map_err(|e| bad(&paths.ca, format!("unusable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad(&paths.ca, "no CERTIFICATE block"));
        }
        if !td_ok {
            return Err(bad(
                &paths.ca,
                format!("no CA of trust domain `{td}` in the bundle"),
            ));
        }
        let roots = Arc::new(roots);
        crate::tls::verify_chain(&roots, &chain, SystemTime::now()).map_err(|e| {
            bad(
                &paths.cert,
                format!("does not chain to {}: {e}", paths.ca.display()),
            )
        })?;
        Ok(Identity {
            id,
            trust_domain: td,
            chain,
            not_after: info.not_after,
            roots,
            key,
            signer,
        })
    }

    /// The private key for rustls (a copy, in rustls' own zeroizing type).
    pub fn tls_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.expose().to_vec()))
    }

    /// Signs `msg` with ES256 (fixed-size r||s, as JWS wants).
    ///
    /// # Errors
    /// Only if the system RNG fails.
    pub fn sign_es256(&self, msg: &[u8]) -> Result<Vec<u8>, ring::error::Unspecified> {
        self.signer
            .sign(&ring::rand::SystemRandom::new(), msg)
            .map(|s| s.as_ref().to_vec())
    }
}

/// The current identity of a process, reloaded when its files change.
#[derive(Debug)]
pub struct IdentitySource {
    paths: IdentityPaths,
    current: RwLock<(Arc<Identity>, [Option<SystemTime>; 3])>,
}

impl IdentitySource {
    /// Loads the identity at `paths`; logs its SPIFFE ID and expiry.
    ///
    /// # Errors
    /// [`IdentityError`].
    pub fn load(paths: IdentityPaths) -> Result<Arc<IdentitySource>, IdentityError> {
        let mtimes = paths.mtimes();
        let id = Identity::load(&paths)?;
        tracing::info!(spiffe_id = %id.id, not_after = ?id.not_after, cert = %paths.cert.display(), "identity loaded");
        Ok(Arc::new(IdentitySource {
            paths,
            current: RwLock::new((Arc::new(id), mtimes)),
        }))
    }

    /// The identity to use now.
    pub fn current(&self) -> Arc<Identity> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Reloads when a file's mtime changed; returns whether a new identity
    /// is in use. A half-rotated or broken set keeps the previous identity
    /// (logged) and is retried next time.
    pub fn reload_if_changed(&self) -> bool {
        let mtimes = self.paths.mtimes();
        if self.current.read().unwrap_or_else(|p| p.into_inner()).1 == mtimes {
            return false;
        }
        match Identity::load(&self.paths) {
            Ok(id) => {
                tracing::info!(spiffe_id = %id.id, not_after = ?id.not_after, "identity rotated");
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = (Arc::new(id), mtimes);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "identity files changed but are not usable yet; keeping the previous identity");
                false
            }
        }
    }

    /// Polls the files every `period` until the task is aborted.
    pub fn spawn_reloader(self: Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(period);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                iv.tick().await;
                self.reload_if_changed();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids() {
        assert_eq!(trust_domain("spiffe://nsm.test/a"), Some("nsm.test"));
        assert_eq!(trust_domain("spiffe://Nsm/a"), None);
        assert_eq!(trust_domain("http://x/a"), None);
        assert!(check_workload_id("spiffe://td/nsm-manager/n1").is_ok());
        for bad in [
            "spiffe://td",
            "spiffe://td/",
            "spiffe://td//a",
            "spiffe://td/a?x",
        ] {
            assert!(check_workload_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ca_issue_load_and_modes() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        create_ca(&ca, "nsm.test", DEFAULT_CA_TTL).unwrap();
        assert!(create_ca(&ca, "nsm.test", DEFAULT_CA_TTL).is_err());
        let out = d.path().join("m1");
        issue(
            &ca,
            "spiffe://nsm.test/nsm-manager/m1",
            Duration::from_secs(600),
            &out,
        )
        .unwrap();
        for f in [ca.join(CA_KEY_FILE), out.join(KEY_FILE)] {
            assert_eq!(
                fs::metadata(&f).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let id = Identity::load(&IdentityPaths::in_dir(&out)).unwrap();
        assert_eq!(id.id, "spiffe://nsm.test/nsm-manager/m1");
        assert!(!format!("{id:?}").contains("PRIVATE"));
        assert!(issue(&ca, "spiffe://other/x", Duration::from_secs(60), &out).is_err());
    }
}
