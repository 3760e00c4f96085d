//! `nsm-benches`: where speed is measured.
//!
//! Owns the criterion micro-benchmarks of the data path (`benches/`) and
//! `nsm-bench` (`src/bin/nsm-bench.rs`), the throughput harness that
//! compares the forwarder with plain veth and with other userspace
//! WireGuard implementations in one run. Its layers:
//!
//! - [`parse`] and [`stats`]: pure functions over tool output and samples;
//! - [`udp`]: the packet-rate sender and receiver (`nsm-bench-udp`);
//! - [`report`] and [`svg`]: the results and how they are shown;
//! - [`peers`]: installing and running the userspace WireGuard peers;
//! - [`harness`]: the lab, the turns and the measurements.
//!
//! It must never be a dependency of a product crate, and never report a
//! figure that was not measured in the same run as what it is compared with.

pub mod harness;
pub mod parse;
pub mod peers;
pub mod report;
pub mod stats;
pub mod svg;
pub mod udp;
