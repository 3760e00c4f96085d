//! Where a packet thread's WireGuard datagrams enter and leave the node:
//! the kernel's UDP socket (`recvmmsg`/`sendmmsg` with GRO/GSO), or, with
//! the cargo feature `dpdk` and `--dpdk-eal`, a DPDK port driven from
//! userspace (`nsm-dpdk`: Ethernet, IP, UDP, ARP/NDP built here).
//!
//! The worker sees one interface for both: [`Tx::slot`] hands out the
//! buffer the data plane encrypts into (a send slot, or the payload area
//! of a DPDK mbuf: no copy either way), [`Tx::commit`] queues it,
//! [`Tx::flush`] sends the batch. Receiving is split off into [`Rx`] (the
//! batch of datagrams) so that a batch can be read while replies are
//! queued on the [`Tx`].

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};

use crate::sys::{RecvBatch, SendBatch};

/// The sending side, owning the socket or the DPDK port.
// One per packet thread, made once and never moved on the data path: the
// variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Tx {
    /// The kernel's UDP socket.
    Kernel {
        /// The socket (also read by [`Rx::fill`]).
        udp: UdpSocket,
        /// Queued datagrams, sent with one `sendmmsg`.
        send: SendBatch,
    },
    /// A DPDK port.
    #[cfg(feature = "dpdk")]
    Dpdk(Box<DpdkTx>),
}

/// A DPDK port as a packet thread's underlay.
#[cfg(feature = "dpdk")]
#[derive(Debug)]
pub(crate) struct DpdkTx {
    dev: nsm_dpdk::UdpUnderlay,
    /// Where the data plane writes when no mbuf could be had (an empty
    /// pool): the commit then drops it, counted by the underlay.
    scratch: Vec<u8>,
    /// Whether the last [`Tx::slot`] is an mbuf (not `scratch`).
    staged: bool,
}

/// What a flush could not send.
#[derive(Debug, Default)]
pub(crate) struct Failed {
    /// Datagrams lost.
    pub(crate) count: usize,
    /// The last error, for the log.
    pub(crate) last_error: Option<String>,
}

impl Tx {
    /// A kernel socket sending batches of up to `batch` datagrams of up to
    /// `slot` bytes each.
    pub(crate) fn kernel(udp: UdpSocket, send: SendBatch) -> Self {
        Tx::Kernel { udp, send }
    }

    /// A DPDK underlay; `slot` bytes of scratch for when the pool is empty.
    #[cfg(feature = "dpdk")]
    pub(crate) fn dpdk(dev: Box<nsm_dpdk::UdpUnderlay>, slot: usize) -> Self {
        Tx::Dpdk(Box::new(DpdkTx {
            dev: *dev,
            scratch: vec![0; slot],
            staged: false,
        }))
    }

    /// The fd to wait on for incoming datagrams; `None` for a polled
    /// device (DPDK), which the loop polls instead.
    pub(crate) fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Tx::Kernel { udp, .. } => Some(udp.as_fd()),
            #[cfg(feature = "dpdk")]
            Tx::Dpdk(_) => None,
        }
    }

    /// The buffer the next datagram is written into (at its start, or at
    /// an offset given to [`Tx::commit`]). Sends the queued batch first
    /// when it is full.
    pub(crate) fn slot(&mut self, failed: &mut Failed) -> &mut [u8] {
        match self {
            Tx::Kernel { udp, send } => {
                if send.is_full() {
                    flush_kernel(udp, send, failed);
                }
                send.next_slot()
            }
            #[cfg(feature = "dpdk")]
            Tx::Dpdk(d) => {
                let max = d.scratch.len().min(d.dev.max_payload());
                match d.dev.next_payload_buf(max) {
                    Ok(buf) => {
                        d.staged = true;
                        buf
                    }
                    Err(_) => {
                        d.staged = false;
                        &mut d.scratch[..]
                    }
                }
            }
        }
    }

    /// Queues the `len` bytes written at `off` in the last [`Tx::slot`]
    /// for `dst`.
    #[cfg_attr(not(feature = "dpdk"), allow(unused_variables))]
    pub(crate) fn commit(&mut self, off: usize, len: usize, dst: SocketAddr, failed: &mut Failed) {
        match self {
            Tx::Kernel { send, .. } => send.commit(off, len, dst),
            #[cfg(feature = "dpdk")]
            Tx::Dpdk(d) => {
                if !d.staged {
                    // No mbuf: nothing can be sent.
                    failed.count += 1;
                    failed.last_error = Some("DPDK mbuf pool empty".into());
                    return;
                }
                d.staged = false;
                if off != 0 {
                    // The data plane wrote past the start (rare): move it
                    // to where the headers end. The same mbuf comes back.
                    let max = d.scratch.len().min(d.dev.max_payload());
                    if let Ok(buf) = d.dev.next_payload_buf(max)
                        && off + len <= buf.len()
                    {
                        buf.copy_within(off..off + len, 0);
                    }
                }
                if let Err(e) = d.dev.commit(dst, len) {
                    failed.count += 1;
                    failed.last_error = Some(format!("DPDK send to {dst}: {e}"));
                }
            }
        }
    }

    /// Sends everything queued.
    pub(crate) fn flush(&mut self, failed: &mut Failed) {
        match self {
            Tx::Kernel { udp, send } => flush_kernel(udp, send, failed),
            #[cfg(feature = "dpdk")]
            Tx::Dpdk(d) => {
                // Frames the ring did not take are counted by the underlay
                // (TxDrop::RingFull).
                d.dev.flush();
            }
        }
    }

    /// Sends one datagram now (control path: a first handshake).
    pub(crate) fn send_now(&mut self, dst: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        match self {
            Tx::Kernel { udp, .. } => udp.send_to(datagram, dst).map(drop),
            #[cfg(feature = "dpdk")]
            Tx::Dpdk(d) => {
                d.dev
                    .send(dst, datagram)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                d.dev.flush();
                Ok(())
            }
        }
    }
}

fn flush_kernel(udp: &UdpSocket, send: &mut SendBatch, failed: &mut Failed) {
    if send.len() == 0 {
        return;
    }
    let f = send.flush(udp.as_fd());
    if f.failed > 0 {
        failed.count += f.failed;
        if let Some(e) = f.last_error {
            failed.last_error = Some(e.to_string());
        }
    }
}

/// The receiving side: a batch of datagrams, filled from the [`Tx`]'s
/// socket or port.
#[derive(Debug)]
pub(crate) enum Rx {
    /// `recvmmsg` into fixed buffers; a message may be a GRO run.
    Kernel(RecvBatch),
    /// A burst of DPDK frames, read in place.
    #[cfg(feature = "dpdk")]
    Dpdk(Box<nsm_dpdk::RecvBatch>),
}

impl Rx {
    /// The batch that goes with `tx`: `batch` messages of up to `slot`
    /// bytes for a kernel socket.
    pub(crate) fn for_tx(tx: &Tx, batch: usize, slot: usize) -> Self {
        match tx {
            Tx::Kernel { .. } => Rx::Kernel(RecvBatch::new(batch, slot)),
            #[cfg(feature = "dpdk")]
            Tx::Dpdk(_) => Rx::Dpdk(Box::default()),
        }
    }

    /// Receives what is waiting (never blocks); returns the number of
    /// messages.
    ///
    /// # Errors
    /// The socket's receive error.
    pub(crate) fn fill(&mut self, tx: &mut Tx) -> io::Result<usize> {
        match (self, tx) {
            (Rx::Kernel(r), Tx::Kernel { udp, .. }) => r.recv(udp.as_fd()),
            #[cfg(feature = "dpdk")]
            (Rx::Dpdk(b), Tx::Dpdk(d)) => Ok(d.dev.recv(b)),
            #[cfg(feature = "dpdk")]
            _ => Ok(0),
        }
    }

    /// Message `i`: its source, its bytes and the size of each datagram in
    /// it (a GRO message holds several of that size, the last maybe
    /// shorter).
    pub(crate) fn message(&self, i: usize) -> Option<(SocketAddr, &[u8], usize)> {
        match self {
            Rx::Kernel(r) => r.message(i),
            #[cfg(feature = "dpdk")]
            Rx::Dpdk(b) => b.get(i).map(|(src, p)| (src, p, p.len().max(1))),
        }
    }
}
