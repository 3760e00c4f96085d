//! Built-in service functions. Each is a [`crate::Stage`]; the manager's
//! chain spec names them and the forwarder builds them into a
//! [`crate::Chain`].
//!
//! Shipped: [`counter`]. Planned here, with their drop reasons already in
//! [`crate::DropReason`]: `acl`, `ratelimit`, `nat44`, `mirror`, `fault`.

pub mod counter;

pub use counter::{CounterHandle, CounterSnapshot, CounterStage};
