//! `nsm-testbed`: network namespaces as nodes and pods.
//!
//! This crate is the embedded default of nsm-rs (one host, no Kubernetes)
//! and the harness of every integration test. It owns the topology file
//! format ([`topology`]), building and removing labs ([`lab`]): namespaces,
//! the underlay bridge, the pods' primary network, the mesh processes it
//! starts per node, and the `nsm-testbed` command.
//!
//! It must never touch the host's own networks: every link and address it
//! makes lives inside a namespace it created, named `nsmtb_LAB[_MEMBER]` so
//! that `down` finds all of it by prefix, even after a crash. It never links
//! the mesh's crates: it starts their binaries as a node would.

pub mod demo;
pub mod lab;
pub mod mesh;
pub mod sys;
pub mod testing;
pub mod topology;

pub use lab::{Lab, LabError, Options, Status, Teardown, netns_name, teardown};
pub use topology::{Topology, TopologyError};
