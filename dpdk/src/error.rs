//! The crate's error type: one variant per failing step, each carrying what
//! was being done and DPDK's own explanation.

use std::ffi::CStr;

use crate::sys;

/// A failed control-path operation (EAL start, port setup, pool creation).
///
/// The data path does not return this: it counts drops by reason instead
/// (see [`RxDrop`](crate::RxDrop) and [`TxDrop`](crate::TxDrop)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `rte_eal_init` was already called in this process (it may run once
    /// per process, whether it succeeded or not).
    #[error(
        "the DPDK EAL was already initialised in this process (rte_eal_init runs once per process)"
    )]
    EalAlreadyInitialized,
    /// An EAL argument cannot be passed to C.
    #[error("EAL argument {index} ({arg:?}) contains a NUL byte")]
    EalArgument {
        /// Position in the argument list given to [`Eal::init`](crate::Eal::init).
        index: usize,
        /// The argument.
        arg: String,
    },
    /// `rte_eal_init` failed.
    #[error("rte_eal_init [{args}]: {reason} (rte_errno {errno})")]
    EalInit {
        /// The arguments, joined with spaces.
        args: String,
        /// `rte_errno` after the call.
        errno: i32,
        /// `rte_strerror(errno)`; EAL logs the details to stderr.
        reason: String,
    },
    /// No ethdev port has that name.
    #[error(
        "no DPDK port named {name:?} (ports: [{available}]; a --vdev or PCI device must create it)"
    )]
    PortNotFound {
        /// The name asked for.
        name: String,
        /// Names of the ports that do exist, comma-separated.
        available: String,
    },
    /// An ethdev call on a port failed.
    #[error("port {port}: {op}: {reason} ({code})")]
    Port {
        /// The port id.
        port: u16,
        /// The DPDK function or step that failed.
        op: &'static str,
        /// Its (negative errno) return value.
        code: i32,
        /// `rte_strerror(-code)`.
        reason: String,
    },
    /// `rte_pktmbuf_pool_create` failed.
    #[error(
        "mbuf pool {name:?} ({mbufs} mbufs of {data_room} bytes, socket {socket}): {reason} (rte_errno {errno})"
    )]
    Mempool {
        /// The pool's name.
        name: String,
        /// Number of mbufs asked for.
        mbufs: u32,
        /// Data room of each mbuf (headroom included).
        data_room: u16,
        /// NUMA socket.
        socket: i32,
        /// `rte_errno` after the call.
        errno: i32,
        /// `rte_strerror(errno)`; ENOMEM usually means `-m` is too small.
        reason: String,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// `rte_strerror(errno)` as an owned string. DPDK's own codes (above
/// `RTE_MAX_ERRNO`'s base) get their text from DPDK, the rest from libc.
pub(crate) fn strerror(errno: i32) -> String {
    // SAFETY: rte_strerror accepts any value and returns a pointer to a
    // static or thread-local NUL-terminated string, read at once here.
    unsafe { CStr::from_ptr(sys::rte_strerror(errno)) }
        .to_string_lossy()
        .into_owned()
}

/// The calling thread's `rte_errno`.
pub(crate) fn rte_errno() -> i32 {
    // SAFETY: reads a thread-local int; no preconditions.
    unsafe { sys::nsm_rte_errno() }
}

/// An [`Error::Port`] from an ethdev return code (`-errno`).
pub(crate) fn port_error(port: u16, op: &'static str, code: i32) -> Error {
    Error::Port {
        port,
        op,
        code,
        reason: strerror(code.saturating_neg()),
    }
}
