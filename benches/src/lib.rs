//! `nsm-benches`: where speed is measured.
//!
//! Owns the criterion micro-benchmarks of the data path (`benches/`) and, from
//! the benchmark issue on, `nsm-bench`, the throughput harness that compares
//! the forwarder with plain veth and with other userspace WireGuard
//! implementations in one run.
//!
//! It must never be a dependency of a product crate, and never report a
//! figure that was not measured in the same run as what it is compared with.
