//! `nsm-cni`: a chained CNI plugin (CNI spec 1.1.0, also 0.3.x-1.0.0 configs).
//!
//! Owns the CNI contract only: environment and stdin config in, a result or
//! a CNI error (on stdout) out. Each mesh interface it reports is requested
//! from the local `nsm-manager` over gRPC.
//!
//! It must never hold state of its own (the manager owns every connection)
//! and never touch packets or network namespaces itself beyond CHECK's reads.
//!
//! Status: built by the CNI issue; this crate is the place it lands.
