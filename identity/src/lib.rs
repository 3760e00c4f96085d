//! `nsm-identity`: who is who in an nsm-rs mesh.
//!
//! - [`identity`]: the mesh's own CA and SPIFFE X.509 certificates
//!   (`spiffe://TD/nsm-manager/NODE`, `.../nsm-forwarder/NODE`,
//!   `.../nsm-endpoint/NAME`), loaded from a directory and reloaded when
//!   the files change, with zeroized keys;
//! - [`tls`]: mTLS with those certificates (rustls, TLS 1.3), between
//!   managers over TCP and between a manager and its forwarder over the
//!   forwarder's unix socket.
//!
//! A crate of its own so that the forwarder, which must not link the
//! control plane, can hold an identity too.

pub mod identity;
pub mod tls;
