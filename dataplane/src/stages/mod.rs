//! Built-in service functions. Each is a [`crate::Stage`] with its own
//! lock-free counters; the manager's chain spec names them and
//! [`build`] turns a [`ChainSpec`] into a [`crate::Chain`] plus one
//! [`StageHandle`] per function.
//!
//! - [`acl`]: ordered allow/deny rules (indexed, not a linear scan),
//!   optionally stateful;
//! - [`ratelimit`]: token-bucket shaper per direction (queues the excess,
//!   the forwarder holds it: [`crate::Verdict::Hold`]);
//! - [`nat44`]: source NAT with connection tracking;
//! - [`mirror`]: copies into a ring the forwarder drains ([`pcap`] formats
//!   them for a file);
//! - [`counter`]: packets and bytes at a point of the chain;
//! - [`flowlog`]: not a function: sampled flow records the chain keeps
//!   when the forwarder logs flows ([`build_with_flow_log`]);
//! - [`fault`]: seeded loss and corruption; its delay is applied by the
//!   forwarder with a [`delay::DelayLine`] (no I/O here either).
//!
//! Shared machinery (packet fields, the fixed-capacity flow table, the
//! PRNG) is in the private `flow` module.

pub mod acl;
pub mod counter;
pub mod delay;
pub mod fault;
mod flow;
pub mod flowlog;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz_chain;
pub mod mirror;
pub mod nat44;
pub mod pcap;
pub mod ratelimit;
pub mod spec;

pub use acl::{AclHandle, AclSnapshot, AclStage};
pub use counter::{CounterHandle, CounterSnapshot, CounterStage};
pub use delay::{DelayError, DelayLine};
pub use fault::{FaultHandle, FaultSnapshot, FaultStage};
pub use flowlog::{FlowLogReader, FlowLogSnapshot, FlowLogSpec, FlowRecord};
pub use mirror::{MirrorHandle, MirrorReader, MirrorRecord, MirrorSnapshot, MirrorStage};
pub use nat44::{Nat44Handle, Nat44Snapshot, Nat44Stage};
pub use ratelimit::{RateLimitDirSnapshot, RateLimitHandle, RateLimitSnapshot, RateLimitStage};
pub use spec::{
    AclAction, AclRule, AclSpec, BuiltChain, ChainElement, ChainSpec, FaultSpec, FlowMatch,
    FunctionSpec, MirrorSpec, Nat44Spec, PortRange, Prefix, PrefixParseError, Proto, RateLimitSpec,
    SpecError, SpecErrorKind, StageHandle, build, build_with_flow_log,
};
