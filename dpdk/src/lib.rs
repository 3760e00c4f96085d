//! DPDK underlay I/O for the forwarder: WireGuard's UDP datagrams sent and
//! received through a DPDK poll-mode driver instead of a kernel socket.
//!
//! Everything is behind the `dpdk` feature; without it this crate is empty
//! and needs no system library. With it, it links Debian's shared DPDK
//! 22.11 (`libdpdk-dev`) through bindgen and a small C shim for DPDK's
//! static-inline fast path (see `README.md` for packages and EAL arguments).
//!
//! Layers, bottom up:
//! - [`Eal`]: `rte_eal_init`, once per process.
//! - [`Port`]: one ethdev port, one RX and one TX queue, its mbuf pool;
//!   raw frames in [`RxBatch`]/[`TxBatch`].
//! - [`UdpUnderlay`]: a UDP endpoint (one IPv4 or IPv6 address and port)
//!   on a port, answering and asking ARP/NDP, counting every drop by reason
//!   ([`RxDrop`], [`TxDrop`], [`Counters`]).
//!
//! ```no_run
//! # #[cfg(feature = "dpdk")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use nsm_dpdk::{Eal, Port, PortConfig, RecvBatch, UdpUnderlay, UdpUnderlayConfig};
//! let eal = Eal::init(&["--no-huge", "-m", "256", "--no-shconf", "--file-prefix=nsm-fwd",
//!                       "--no-pci", "--no-telemetry", "-l", "0", "--vdev=net_af_packet0,iface=eth1"])?;
//! let port = Port::open(&eal, eal.port_by_name("net_af_packet0")?, &PortConfig::default())?;
//! let mut udp = UdpUnderlay::new(port, UdpUnderlayConfig::new("198.51.100.2:51820".parse()?))?;
//! let mut batch = RecvBatch::new();
//! loop {
//!     // The batch is the caller's: replies can be sent while reading it.
//!     udp.recv(&mut batch);
//!     for (src, payload) in batch.iter() {
//!         let _ = udp.send(src, payload); // echo; a drop is counted
//!     }
//!     // Or write the payload straight into the mbuf.
//!     let buf = udp.next_payload_buf(5)?;
//!     buf.copy_from_slice(b"hello");
//!     udp.commit("198.51.100.1:51820".parse()?, 5)?;
//!     udp.flush();
//! }
//! # }
//! # #[cfg(not(feature = "dpdk"))]
//! # fn main() {}
//! ```

#[cfg(feature = "dpdk")]
mod eal;
#[cfg(feature = "dpdk")]
mod error;
#[cfg(feature = "dpdk")]
mod neighbor;
#[cfg(feature = "dpdk")]
mod port;
// Pure code (no DPDK): built without the feature too, so that the frame
// parser is fuzzed (`fuzzing`, `dpdk/fuzz`) on any machine.
#[cfg_attr(not(feature = "dpdk"), allow(dead_code))]
mod stats;
#[cfg(feature = "dpdk")]
mod sys;
#[cfg(feature = "dpdk")]
mod udp;
#[cfg_attr(not(feature = "dpdk"), allow(dead_code))]
mod wire;

pub mod fuzzing;

#[cfg(feature = "dpdk")]
pub use eal::Eal;
#[cfg(feature = "dpdk")]
pub use error::Error;
#[cfg(feature = "dpdk")]
pub use port::{
    BURST, MBUF_HEADROOM, Port, PortConfig, PortStats, RxBatch, RxFrame, StageError, TxBatch,
    format_mac,
};
// Drop reasons and counters are pure code: there with or without DPDK.
pub use stats::{Counters, CountersSnapshot, RxDrop, TxDrop};
#[cfg(feature = "dpdk")]
pub use udp::{RecvBatch, UdpUnderlay, UdpUnderlayConfig};
