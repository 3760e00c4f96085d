//! `nsm-cni`: a chained CNI plugin (CNI spec 1.1.0; 0.3.0-1.0.0 configs too).
//!
//! Owns the CNI contract only: environment and stdin config in, a result or
//! a CNI error object (on stdout, with the spec's codes) out. Each mesh
//! interface it adds is requested from the local `nsm-manager` over gRPC,
//! marked as managed, so the manager refreshes and heals it until DEL.
//!
//! It must never hold state of its own (the manager owns every connection,
//! and DEL/CHECK/GC find them by id), never leave a pod half-attached (a
//! failed ADD closes what it made), never panic on input, and never touch
//! a namespace beyond CHECK's reads.

pub mod fuzzing;
pub mod manager;
pub mod netns;
pub mod plugin;
pub mod spec;
