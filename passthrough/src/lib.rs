//! `nsm-passthrough`: a chain function for the mesh, an endpoint that is
//! also a client of the service it serves.
//!
//! # Why
//! NSM composes services by steering a client's connection through
//! intermediate endpoints: the manager picks a passthrough endpoint for the
//! client's request (it registers for a function service, e.g. `inspector`,
//! that policies steer through), and that endpoint requests the service
//! named in the incoming connection (the client's original one) again, with
//! its own path segment, to get the onward leg towards the final endpoint. Packets then cross the passthrough's namespace: in on the
//! interface the forwarder made for the incoming connection, out on the one
//! it made for the onward connection, and back. This crate is the smallest
//! such function that actually touches every packet, so that the mesh's
//! composition (selection, paths, refresh, close, healing) can be tested
//! end to end and its traffic observed: it counts what it moves, per
//! connection and direction, in a JSON file.
//!
//! # Layers
//! - [`onward`]: pure construction of the onward request, the reply, and the
//!   onward interface name (no I/O, unit-tested);
//! - [`service`]: the `networkservice.NetworkService` implementation: per
//!   incoming connection, the onward connection at the manager and a
//!   forwarding [`engine::Link`];
//! - [`engine`]: the packet mover, AF_PACKET sockets with `PACKET_VNET_HDR`
//!   on both interfaces, one thread per connection (the only module with
//!   `unsafe`);
//! - [`stats`]: lock-free counters turned into the stats file, written
//!   atomically.
//!
//! Serving and registration are shared with `nsm-endpoint`
//! ([`nsm_manager::endpoint::serve_and_register`]).

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod engine;
pub mod onward;
pub mod service;
pub mod stats;
