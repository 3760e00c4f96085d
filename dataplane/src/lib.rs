//! `nsm-dataplane`: the packet core of an nsm-rs forwarder, as a library.
//!
//! It owns everything that happens to a packet between the moment the
//! forwarder reads it and the moment the forwarder writes it: classification
//! (IPv4/IPv6 from a TUN, Ethernet from a TAP, with proxy ARP/ND for the
//! pod's peer), the cross-connect table that joins a pod port to another pod
//! port or to a WireGuard session, path-MTU enforcement with ICMP "too big"
//! replies, the service-function chain ([`Stage`], [`Chain`]), WireGuard
//! encapsulation per connection (one boringtun `Tunn` each, all behind one
//! UDP socket, sessions found by receiver index or mac1), and counters.
//!
//! It must never do I/O: no sockets, no file descriptors, no threads, no
//! async runtime, no clock reads of its own (the caller passes `now`; the
//! one exception is boringtun's internal handshake timers, see
//! [`Dataplane::poll_timers`]). The `forwarder` crate owns all of that and
//! calls this library per packet.
//!
//! On the data path ([`Dataplane::from_pod`], [`Dataplane::from_underlay`],
//! [`Dataplane::poll_flush`], [`Dataplane::poll_timers`]) it must never
//! allocate, take a lock, log, or panic, whatever the bytes. Every packet it
//! does not forward is counted under a [`DropReason`]. `tests/no_alloc.rs`
//! proves the steady state allocates nothing (encrypt, decrypt, same-node,
//! ICMP replies, drops). The exceptions live inside boringtun and are
//! bounded: while a session has no keys it copies up to 256 waiting packets
//! into its own queue, handshake messages allocate a little, and a received
//! data message takes an uncontended per-session mutex for its replay
//! window.
//!
//! The built-in service functions (`acl`, `ratelimit`, `nat44`, `mirror`,
//! `counter`, `fault`) are in [`stages`], with their typed specs: the
//! forwarder converts the manager's chain spec into a
//! [`stages::ChainSpec`], and [`stages::build`] validates it and returns the
//! [`Chain`] to install plus a handle per function for counters (and the
//! mirror ring).
//!
//! # Using it
//! ```text
//! forwarder worker                        Dataplane
//! ----------------                        ---------
//! control msg  -------------------------> add_port / upsert_xconnect / set_chain
//! TUN/TAP read  (packet, out) ----------> from_pod      -> Action::{ToUnderlay, ToPod, Drop, Done}
//! UDP recv      (datagram, out) --------> from_underlay -> Action::{ToPod, ToUnderlay, Drop, Done}
//! end of batch  (out) ------------------> poll_flush    until Action::Done
//! every ~250 ms (out) ------------------> poll_timers   until Action::Done
//! metrics thread <---- XconnCounters / GlobalCounters (Arc, lock-free reads)
//! ```
//! Actions borrow the caller's buffers; the forwarder writes them out and
//! reuses the buffers. `out` should be [`out_len`] of the largest MTU in use.
//!
//! # No-panic contract
//! No function of this crate panics on any packet, datagram or buffer
//! content or size. The rules that make it so:
//! - packet bytes are read through `get`/`get_mut` or at offsets vouched for
//!   by [`parse_ip`] (see [`packet`]'s contract), never by unchecked
//!   indexing;
//! - buffers are size-checked before boringtun is called, because boringtun
//!   panics on a short output buffer; a short buffer becomes
//!   [`DropReason::BufferTooSmall`];
//! - WireGuard messages are framed ([`DropReason::WgBadMessage`]) before any
//!   session sees them.
//!
//! The property is fuzzed from both sides (`fuzz/`).
//!
//! # Threading
//! A [`Dataplane`] is `Send` and is owned by one thread at a time, which
//! makes every call, control-plane ones included: the forwarder passes
//! control messages to the worker and applies them between batches. That
//! gives atomic chain swaps and a consistent table without a lock on the
//! packet path. Counters are single-writer atomics readable from any thread.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod counters;
mod dataplane;
mod drop;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod icmp;
mod neigh;
pub mod packet;
pub mod stage;
pub mod stages;
pub mod wg;
mod xconn;

pub use counters::{
    DropSnapshot, GlobalCounters, SideSnapshot, WgSnapshot, XconnCounters, XconnSnapshot,
};
pub use dataplane::{Action, Dataplane, DataplaneConfig, WgStatus, XconnStatus, out_len};
pub use drop::DropReason;
pub use packet::{IpMeta, IpPacket, IpVersion, MacAddr, parse_ip};
pub use stage::{Chain, Direction, Stage, StageCtx, StageExt, Verdict};
pub use wg::{PresharedKey, PublicKey, StaticSecret, WgPeer};
pub use xconn::{
    ConfigError, FarEnd, MIN_MTU, Payload, PodEnd, PortId, PortKind, TapConfig, XconnError,
    XconnSpec,
};
