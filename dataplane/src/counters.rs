//! Lock-free counters: written by the one worker thread that owns the
//! [`crate::Dataplane`], read at any time by a control thread.
//!
//! # Why not `fetch_add`
//! Every counter here has exactly one writer: the `Dataplane` that created it
//! (it is `&mut self` on the data path, so it runs on one thread at a time and
//! never hands out a writable handle). With a single writer, an increment can
//! be a plain `load` + `store` with `Relaxed` ordering: no `lock`-prefixed
//! read-modify-write on the hot path, and readers still see every value
//! whole (64-bit atomics never tear). Readers get no ordering between two
//! counters, which metrics do not need. This is firecracker's
//! `SharedIncMetric` idea with the RMW taken out.
//!
//! Handles ([`XconnCounters`], [`GlobalCounters`]) are `Arc`s: cloning one
//! and sending it to a metrics thread is the intended use. They outlive the
//! cross-connect they count, so a final scrape after removal still works.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::drop::DropReason;

/// One single-writer counter.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning `Dataplane` calls this (single writer, see
    /// the module doc), which is what makes load + store correct.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    #[inline]
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Per-reason drop counters.
#[derive(Debug)]
pub(crate) struct DropCounters([Counter; DropReason::COUNT]);

impl Default for DropCounters {
    fn default() -> Self {
        DropCounters(std::array::from_fn(|_| Counter::default()))
    }
}

impl DropCounters {
    #[inline]
    pub(crate) fn inc(&self, reason: DropReason) {
        // `index()` is < COUNT by construction of `DropReason::ALL`; `get`
        // keeps this panic-free even if that invariant were ever broken.
        if let Some(c) = self.0.get(reason.index()) {
            c.inc();
        }
    }

    fn snapshot(&self) -> DropSnapshot {
        DropSnapshot(std::array::from_fn(|i| self.0[i].get()))
    }
}

/// Drops by reason, as plain numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropSnapshot([u64; DropReason::COUNT]);

impl DropSnapshot {
    /// Drops counted for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0.get(reason.index()).copied().unwrap_or(0)
    }

    /// Sum over all reasons.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// `(reason, count)` for every reason with a non-zero count.
    pub fn nonzero(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .zip(self.0.iter())
            .filter(|(_, n)| **n != 0)
            .map(|(r, n)| (*r, *n))
    }
}

/// Traffic through one side of a cross-connect.
#[derive(Debug, Default)]
pub(crate) struct SideCounters {
    pub(crate) rx_packets: Counter,
    pub(crate) rx_bytes: Counter,
    pub(crate) tx_packets: Counter,
    pub(crate) tx_bytes: Counter,
}

impl SideCounters {
    #[inline]
    pub(crate) fn rx(&self, bytes: usize) {
        self.rx_packets.inc();
        self.rx_bytes.add(bytes as u64);
    }

    #[inline]
    pub(crate) fn tx(&self, bytes: usize) {
        self.tx_packets.inc();
        self.tx_bytes.add(bytes as u64);
    }

    fn snapshot(&self) -> SideSnapshot {
        SideSnapshot {
            rx_packets: self.rx_packets.get(),
            rx_bytes: self.rx_bytes.get(),
            tx_packets: self.tx_packets.get(),
            tx_bytes: self.tx_bytes.get(),
        }
    }
}

/// One side's traffic, as plain numbers. `rx` is what the data plane received
/// from that side, `tx` what it sent to it. Bytes are what crossed that side:
/// IP packets for a TUN, Ethernet frames for a TAP, WireGuard messages (UDP
/// payload) for a WireGuard session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SideSnapshot {
    /// Packets received from this side (including ones later dropped).
    pub rx_packets: u64,
    /// Bytes received from this side.
    pub rx_bytes: u64,
    /// Packets sent to this side.
    pub tx_packets: u64,
    /// Bytes sent to this side.
    pub tx_bytes: u64,
}

/// WireGuard handshake activity of a cross-node connection.
#[derive(Debug, Default)]
pub(crate) struct WgCounters {
    pub(crate) handshake_initiations_tx: Counter,
    pub(crate) handshake_responses_tx: Counter,
    pub(crate) cookie_replies_tx: Counter,
    pub(crate) keepalives_tx: Counter,
    pub(crate) packets_queued: Counter,
}

/// WireGuard handshake activity, as plain numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WgSnapshot {
    /// Handshake initiations sent (first attempts, retries and rekeys).
    pub handshake_initiations_tx: u64,
    /// Handshake responses sent.
    pub handshake_responses_tx: u64,
    /// Cookie replies sent because the session was under handshake load.
    pub cookie_replies_tx: u64,
    /// Keepalives sent (after a handshake, on timers).
    pub keepalives_tx: u64,
    /// Pod packets held while waiting for a handshake (sent later, once the
    /// session is up).
    pub packets_queued: u64,
}

#[derive(Debug, Default)]
struct XconnInner {
    a: SideCounters,
    b: SideCounters,
    wg: WgCounters,
    drops: DropCounters,
}

/// Counters of one cross-connect. Cheap to clone (an `Arc`); readable from
/// any thread while the owning worker updates them.
#[derive(Clone, Debug, Default)]
pub struct XconnCounters(Arc<XconnInner>);

impl XconnCounters {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    #[inline]
    pub(crate) fn side(&self, side: crate::xconn::Side) -> &SideCounters {
        match side {
            crate::xconn::Side::A => &self.0.a,
            crate::xconn::Side::B => &self.0.b,
        }
    }

    #[inline]
    pub(crate) fn wg(&self) -> &WgCounters {
        &self.0.wg
    }

    #[inline]
    pub(crate) fn drop(&self, reason: DropReason) {
        self.0.drops.inc(reason);
    }

    /// Reads every counter. Each number is exact; the set is not one atomic
    /// cut (a packet may show in `a.rx` but not yet in `b.tx`).
    pub fn snapshot(&self) -> XconnSnapshot {
        let wg = &self.0.wg;
        XconnSnapshot {
            a: self.0.a.snapshot(),
            b: self.0.b.snapshot(),
            wg: WgSnapshot {
                handshake_initiations_tx: wg.handshake_initiations_tx.get(),
                handshake_responses_tx: wg.handshake_responses_tx.get(),
                cookie_replies_tx: wg.cookie_replies_tx.get(),
                keepalives_tx: wg.keepalives_tx.get(),
                packets_queued: wg.packets_queued.get(),
            },
            drops: self.0.drops.snapshot(),
        }
    }
}

/// A cross-connect's counters, as plain numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XconnSnapshot {
    /// Side A: the local pod port.
    pub a: SideSnapshot,
    /// Side B: the other pod port, or the WireGuard session.
    pub b: SideSnapshot,
    /// WireGuard handshake activity (all zero for a same-node connection).
    pub wg: WgSnapshot,
    /// Drops attributed to this connection.
    pub drops: DropSnapshot,
}

/// Sums counters field by field: the counters of one connection that is
/// carried in several lanes (one `XconnCounters` per lane) add up to the
/// connection's.
impl core::ops::Add for XconnSnapshot {
    type Output = Self;

    fn add(self, o: Self) -> Self {
        let side = |x: SideSnapshot, y: SideSnapshot| SideSnapshot {
            rx_packets: x.rx_packets + y.rx_packets,
            rx_bytes: x.rx_bytes + y.rx_bytes,
            tx_packets: x.tx_packets + y.tx_packets,
            tx_bytes: x.tx_bytes + y.tx_bytes,
        };
        let (w, v) = (self.wg, o.wg);
        let mut drops = self.drops;
        for (d, n) in drops.0.iter_mut().zip(o.drops.0) {
            *d += n;
        }
        XconnSnapshot {
            a: side(self.a, o.a),
            b: side(self.b, o.b),
            wg: WgSnapshot {
                handshake_initiations_tx: w.handshake_initiations_tx + v.handshake_initiations_tx,
                handshake_responses_tx: w.handshake_responses_tx + v.handshake_responses_tx,
                cookie_replies_tx: w.cookie_replies_tx + v.cookie_replies_tx,
                keepalives_tx: w.keepalives_tx + v.keepalives_tx,
                packets_queued: w.packets_queued + v.packets_queued,
            },
            drops,
        }
    }
}

/// Drops that match no cross-connect (unknown port, unattached port, WireGuard
/// messages for no session, ...). Cheap to clone; readable from any thread.
#[derive(Clone, Debug, Default)]
pub struct GlobalCounters(Arc<DropCounters>);

impl GlobalCounters {
    #[inline]
    pub(crate) fn drop(&self, reason: DropReason) {
        self.0.inc(reason);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> DropSnapshot {
        self.0.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xconn::Side;

    #[test]
    fn snapshot_reads_what_was_counted() {
        let c = XconnCounters::new();
        let reader = c.clone();
        c.side(Side::A).rx(100);
        c.side(Side::A).rx(50);
        c.side(Side::B).tx(182);
        c.wg().packets_queued.inc();
        c.drop(DropReason::PacketTooBig);
        c.drop(DropReason::PacketTooBig);
        c.drop(DropReason::WgReplay);

        let s = reader.snapshot();
        assert_eq!(s.a.rx_packets, 2);
        assert_eq!(s.a.rx_bytes, 150);
        assert_eq!(s.b.tx_packets, 1);
        assert_eq!(s.b.tx_bytes, 182);
        assert_eq!(s.wg.packets_queued, 1);
        assert_eq!(s.drops.get(DropReason::PacketTooBig), 2);
        assert_eq!(s.drops.total(), 3);
        let nz: Vec<_> = s.drops.nonzero().collect();
        assert_eq!(
            nz,
            vec![(DropReason::PacketTooBig, 2), (DropReason::WgReplay, 1)]
        );
    }

    #[test]
    fn snapshots_of_two_lanes_add_up() {
        let (x, y) = (XconnCounters::new(), XconnCounters::new());
        x.side(Side::A).rx(100);
        y.side(Side::A).rx(40);
        y.side(Side::B).tx(60);
        x.wg().handshake_initiations_tx.inc();
        y.wg().handshake_initiations_tx.inc();
        x.drop(DropReason::WgReplay);
        y.drop(DropReason::WgReplay);
        y.drop(DropReason::PacketTooBig);
        let s = x.snapshot() + y.snapshot();
        assert_eq!((s.a.rx_packets, s.a.rx_bytes), (2, 140));
        assert_eq!((s.b.tx_packets, s.b.tx_bytes), (1, 60));
        assert_eq!(s.wg.handshake_initiations_tx, 2);
        assert_eq!(s.drops.get(DropReason::WgReplay), 2);
        assert_eq!(s.drops.total(), 3);
    }

    #[test]
    fn readable_from_another_thread() {
        let g = GlobalCounters::default();
        let reader = g.clone();
        for _ in 0..1000 {
            g.drop(DropReason::UnknownPort);
        }
        let n = std::thread::spawn(move || reader.snapshot().get(DropReason::UnknownPort))
            .join()
            .expect("reader thread");
        assert_eq!(n, 1000);
    }
}
