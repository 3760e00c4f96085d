//! gRPC bindings of nsm-rs, and nothing else.
//!
//! This crate owns:
//! - the `.proto` files under `proto/`: NSM's external API, kept wire
//!   compatible with networkservicemesh/api (same packages, names and field
//!   numbers, hence the same gRPC method paths), and our own
//!   manager-to-forwarder API in package `nsm.forwarder.v1`;
//! - the Rust generated from them by tonic-prost-build, checked in under
//!   `src/gen/` so that building needs no `protoc`;
//! - the NSM conventions that give meaning to strings: the mechanism
//!   constants ([`mechanisms`]) of `Mechanism.parameters` and the syntax of
//!   the `networkservicemesh.io` request annotation ([`annotation`]), and
//!   unix-socket transport helpers ([`uds`]) that every binary needs.
//!
//! It must never hold business logic: no selection, IPAM, validation or
//! conversion to data-plane types. Those live in the crates that own the
//! decision (`nsm-manager`, `forwarder`), so that this crate stays a leaf
//! that every other crate can depend on without pulling policy along.
//!
//! # Regenerating `src/gen`
//! After editing a `.proto` file, run
//! `NSM_PROTO_BLESS=1 cargo test -p nsm-proto --test bootstrap` (needs
//! `protoc` and the well-known types, Debian `protobuf-compiler` and
//! `libprotobuf-dev`). Without the variable, that test fails when the
//! checked-in code differs from what the `.proto` files produce.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

// The generated modules are `include!`d rather than declared with `#[path]`
// so that rustfmt leaves them exactly as tonic-prost-build wrote them (the
// bootstrap test compares bytes). They are siblings at the crate root because
// prost refers to other packages as `super::connection::...`.

/// Connection context: addresses, routes, DNS, Ethernet and MTU of a
/// connection (proto package `connectioncontext`).
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    rustdoc::all
)]
pub mod connectioncontext {
    include!("gen/connectioncontext.rs");
}

/// Connection, mechanism, path and the `MonitorConnection` service (proto
/// package `connection`).
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    rustdoc::all
)]
pub mod connection {
    include!("gen/connection.rs");
}

/// The `NetworkService` service: Request and Close (proto package
/// `networkservice`).
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    rustdoc::all
)]
pub mod networkservice {
    include!("gen/networkservice.rs");
}

/// Network service and endpoint registries (proto package `registry`).
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    rustdoc::all
)]
pub mod registry {
    include!("gen/registry.rs");
}

/// Prefix leasing over a bidirectional stream (proto package `ipam`).
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    rustdoc::all
)]
pub mod ipam {
    include!("gen/ipam.rs");
}

/// Our manager-to-forwarder API (proto package `nsm.forwarder.*`).
pub mod forwarder {
    /// Version 1 of the forwarder API (proto package `nsm.forwarder.v1`).
    #[allow(
        missing_docs,
        unreachable_pub,
        missing_debug_implementations,
        clippy::all,
        clippy::pedantic,
        rustdoc::all
    )]
    pub mod v1 {
        include!("gen/nsm.forwarder.v1.rs");
    }
}

/// Our node-local manager API (proto package `nsm.manager.*`), nested as
/// its package (`nsm::manager::v1`) because its messages refer to
/// `connection.Connection` through `super::super::super`; re-exported as
/// [`manager`].
#[doc(hidden)]
pub mod nsm {
    /// The manager API.
    pub mod manager {
        /// Version 1: pod attachments in cluster mode (proto package
        /// `nsm.manager.v1`).
        #[allow(
            missing_docs,
            unreachable_pub,
            missing_debug_implementations,
            clippy::all,
            clippy::pedantic,
            rustdoc::all
        )]
        pub mod v1 {
            include!("gen/nsm.manager.v1.rs");
        }
    }
}
pub use nsm::manager;

pub mod annotation;
pub mod mechanisms;
pub mod metrics_http;
pub mod uds;
