//! A UDP endpoint (one local address and port) on a DPDK port: what the
//! forwarder's WireGuard traffic needs from the kernel's UDP socket,
//! including answering and asking ARP (IPv4) or NDP (IPv6).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::neighbor::{self, MAX_QUEUE, Neighbors, Probe, Resolve};
use crate::port::{BURST, MBUF_HEADROOM, Port, RxBatch, format_mac, mbuf_count, mbuf_len};
use crate::stats::{Counters, RxDrop, TxDrop};
use crate::sys;
use crate::wire::{self, ArpOp, Local, Ndp, Rx};

/// Frames the outgoing queue holds; it is sent when it reaches [`BURST`]
/// on the data path, so the rest is headroom for ARP/NDP frames and
/// datagrams released by a resolution.
const OUT_CAP: usize = 2 * BURST;

/// How often the neighbour timers run (checked on every `recv`/`flush`).
const TICK: Duration = Duration::from_millis(50);

/// Settings of [`UdpUnderlay::new`].
#[derive(Debug, Clone)]
pub struct UdpUnderlayConfig {
    /// The local address and UDP port; IPv4 or IPv6 (one family per
    /// underlay, like the forwarder's `--underlay-ip`). Every destination
    /// is taken to be on the port's L2 segment: there is no routing.
    pub local: SocketAddr,
    /// IPv4 TTL / IPv6 hop limit of sent datagrams.
    pub ttl: u8,
    /// How long a learnt MAC is used before it is re-checked (the
    /// kernel's `base_reachable_time`, 30 s).
    pub neighbor_reachable: Duration,
    /// Time between two ARP requests / solicitations for one address.
    pub neighbor_retransmit: Duration,
    /// Requests sent before an address counts as unreachable.
    pub neighbor_probes: u8,
    /// Datagrams held per address while it is being resolved (at most 16);
    /// more are dropped as [`TxDrop::Unresolved`].
    pub neighbor_queue: usize,
    /// Entries in the neighbour table at most.
    pub max_neighbors: usize,
}

impl UdpUnderlayConfig {
    /// Defaults for `local`: TTL 64, the kernel's neighbour timers (30 s
    /// reachable, 1 s between 3 requests), 4 queued datagrams per
    /// unresolved neighbour, 1024 neighbours.
    #[must_use]
    pub fn new(local: SocketAddr) -> Self {
        UdpUnderlayConfig {
            local,
            ttl: 64,
            neighbor_reachable: Duration::from_secs(30),
            neighbor_retransmit: Duration::from_secs(1),
            neighbor_probes: 3,
            neighbor_queue: 4,
            max_neighbors: 1024,
        }
    }
}

/// A datagram queued behind a neighbour resolution: the whole frame is
/// built, only the destination MAC is missing.
#[derive(Debug, Clone, Copy)]
struct Pending {
    m: NonNull<sys::rte_mbuf>,
    payload_len: u16,
}

/// What an outgoing frame is, for the counters.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Datagram(u16),
    Neighbor,
}

/// The port, the outgoing queue and the spare mbufs: everything that
/// sends, kept apart from the neighbour table so the table's callbacks can
/// send while it is borrowed.
struct Io {
    port: Port,
    out: [*mut sys::rte_mbuf; OUT_CAP],
    kinds: [Kind; OUT_CAP],
    len: usize,
    /// Mbufs taken from the pool in bulk (one `rte_mempool` operation per
    /// [`BURST`] instead of one per datagram).
    spare: [*mut sys::rte_mbuf; BURST],
    spare_len: usize,
    counters: Arc<Counters>,
}

impl Io {
    /// A fresh mbuf (data at the headroom, length 0), or `None` when the
    /// pool is empty.
    fn alloc(&mut self) -> Option<NonNull<sys::rte_mbuf>> {
        if self.spare_len == 0 {
            // SAFETY: spare has room for BURST pointers; the pool is alive
            // (the port holds it). All-or-nothing: 0 means all were filled.
            let ret = unsafe {
                sys::nsm_pktmbuf_alloc_bulk(
                    self.port.pool().as_ptr(),
                    self.spare.as_mut_ptr(),
                    mbuf_count(BURST),
                )
            };
            if ret == 0 {
                self.spare_len = BURST;
            } else {
                // Fewer than a burst left: take them one by one.
                return self.port.pool().alloc();
            }
        }
        self.spare_len -= 1;
        NonNull::new(self.spare[self.spare_len])
    }

    /// Queues a finished frame, sending the queue first if it is full.
    fn push(&mut self, m: NonNull<sys::rte_mbuf>, kind: Kind) {
        if self.len == OUT_CAP {
            self.flush();
        }
        self.out[self.len] = m.as_ptr();
        self.kinds[self.len] = kind;
        self.len += 1;
    }

    /// Hands the queue to the driver; what it does not take after a few
    /// tries is freed and counted as [`TxDrop::RingFull`].
    fn flush(&mut self) -> usize {
        let mut sent = 0;
        let mut idle = 0;
        while sent < self.len && idle < 4 {
            let n = self.port.tx_raw(&mut self.out[sent..self.len]);
            if n == 0 {
                idle += 1;
            }
            sent += n;
        }
        let (mut datagrams, mut bytes, mut neighbor) = (0u64, 0u64, 0u64);
        for kind in &self.kinds[..sent] {
            match *kind {
                Kind::Datagram(len) => {
                    datagrams += 1;
                    bytes += u64::from(len);
                }
                Kind::Neighbor => neighbor += 1,
            }
        }
        self.counters.tx_burst(datagrams, bytes, neighbor);
        let unsent = self.len - sent;
        if unsent > 0 {
            // SAFETY: the driver did not take these; they are ours.
            unsafe {
                sys::rte_pktmbuf_free_bulk(self.out[sent..].as_mut_ptr(), mbuf_count(unsent))
            };
            self.counters.tx_drop(TxDrop::RingFull, unsent as u64);
        }
        self.len = 0;
        sent
    }

    /// Builds a `len`-byte ARP/NDP frame with `write` and queues it.
    fn control(&mut self, len: usize, write: impl FnOnce(&mut [u8])) {
        let Some(m) = self.alloc() else {
            self.counters.tx_drop(TxDrop::NoMbuf, 1);
            return;
        };
        // SAFETY: m is a fresh mbuf owned here; len (at most NDP_FRAME) fits
        // any data room Port::open accepts.
        let data = unsafe { sys::nsm_pktmbuf_append(m.as_ptr(), mbuf_len(len)) };
        if data.is_null() {
            free(m);
            self.counters.tx_drop(TxDrop::NoMbuf, 1);
            return;
        }
        // SAFETY: append returned len writable bytes inside m.
        write(unsafe { std::slice::from_raw_parts_mut(data.cast::<u8>(), len) });
        self.push(m, Kind::Neighbor);
    }

    /// Sends a datagram that waited for its neighbour.
    fn release(&mut self, p: Pending, mac: [u8; 6]) {
        // SAFETY: p.m is a built frame owned by the caller (it came out of
        // the neighbour queue), at least a full Ethernet header long.
        let frame = unsafe { mbuf_data_mut(p.m) };
        if frame.len() >= 6 {
            wire::set_eth_dst(frame, mac);
        }
        self.push(p.m, Kind::Datagram(p.payload_len));
    }
}

/// Returns one mbuf to its pool.
fn free(m: NonNull<sys::rte_mbuf>) {
    // SAFETY: callers pass mbufs they own and no longer use.
    unsafe { sys::nsm_pktmbuf_free(m.as_ptr()) }
}

/// The data of mbuf `m` (first segment) as a mutable slice.
///
/// # Safety
/// `m` is a valid mbuf owned by the caller, not otherwise borrowed for `'a`.
unsafe fn mbuf_data_mut<'a>(m: NonNull<sys::rte_mbuf>) -> &'a mut [u8] {
    let mut v = sys::nsm_mbuf_view::default();
    // SAFETY: m is valid (caller); v is a valid out-pointer.
    unsafe { sys::nsm_pktmbuf_view(m.as_ptr(), &raw mut v) };
    if v.data.is_null() {
        return &mut [];
    }
    // SAFETY: data points at data_len bytes of m's buffer, exclusively ours.
    unsafe { std::slice::from_raw_parts_mut(v.data, usize::from(v.data_len)) }
}

/// Datagrams received by [`UdpUnderlay::recv`]. Their payloads are read in
/// place in the mbufs, valid until the next `recv` into this batch,
/// [`RecvBatch::clear`] or drop.
pub struct RecvBatch {
    rx: RxBatch,
    items: [(SocketAddr, u8, u16, u16); BURST],
    len: usize,
}

impl fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvBatch")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    /// An empty batch.
    #[must_use]
    pub fn new() -> Self {
        RecvBatch {
            rx: RxBatch::new(),
            items: [(
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
                0,
                0,
                0,
            ); BURST],
            len: 0,
        }
    }

    /// Number of datagrams.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Datagram `i`: its source and payload.
    #[must_use]
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        let &(src, idx, offset, len) = self.items[..self.len].get(i)?;
        let frame = self.rx.get(usize::from(idx))?;
        let payload = frame
            .data
            .get(usize::from(offset)..usize::from(offset) + usize::from(len))?;
        Some((src, payload))
    }

    /// The datagrams in arrival order.
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        (0..self.len).filter_map(|i| self.get(i))
    }

    /// Releases the mbufs.
    pub fn clear(&mut self) {
        self.len = 0;
        self.rx.clear();
    }
}

/// A UDP endpoint on a [`Port`]: receives datagrams for its address and
/// port, sends datagrams to on-link destinations, and speaks ARP (IPv4) or
/// NDP (IPv6) for both. Single-threaded (`&mut self`); its
/// [`Counters`] can be read from anywhere.
///
/// Call [`recv`](Self::recv) (or [`recv_with`](Self::recv_with)) regularly
/// even when only sending: it answers ARP/NDP, learns replies and runs the
/// neighbour timers. Sending is batched: datagrams go out when
/// [`flush`](Self::flush) is called or [`BURST`] are waiting.
///
/// Nothing on the data path allocates: mbufs come from the port's pool
/// (in bulk), queues and the neighbour table are sized at creation.
pub struct UdpUnderlay {
    io: Io,
    local: Local,
    ttl: u8,
    neighbors: Neighbors<Pending>,
    /// Probes collected by a timer run, sent right after it (preallocated
    /// to the table size: one probe per entry at most).
    probes: Vec<Probe>,
    staged: Option<(NonNull<sys::rte_mbuf>, usize)>,
    scratch: RecvBatch,
    max_payload: usize,
    ip_id: u16,
    now: Instant,
    next_tick: Instant,
}

// SAFETY: all mbuf pointers it holds are exclusively its own, their pool is
// kept alive by the port and is thread-safe; the queue is used only through
// &mut self.
unsafe impl Send for UdpUnderlay {}

impl fmt::Debug for UdpUnderlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpUnderlay")
            .field("port", &self.io.port)
            .field("local", &self.local.addr)
            .field("mac", &format_mac(&self.local.mac))
            .field("neighbors", &self.neighbors.len())
            .finish_non_exhaustive()
    }
}

impl Drop for UdpUnderlay {
    fn drop(&mut self) {
        // Every mbuf goes back before the port (and with it the pool) goes.
        if let Some((m, _)) = self.staged.take() {
            free(m);
        }
        self.neighbors.clear(|p| free(p.m));
        self.scratch.clear();
        self.io.flush();
        if self.io.spare_len > 0 {
            // SAFETY: the spare mbufs are ours and unused.
            unsafe {
                sys::rte_pktmbuf_free_bulk(
                    self.io.spare.as_mut_ptr(),
                    mbuf_count(self.io.spare_len),
                )
            };
            self.io.spare_len = 0;
        }
    }
}

impl UdpUnderlay {
    /// An endpoint for `config.local` on `port`.
    pub fn new(port: Port, config: UdpUnderlayConfig) -> Result<Self, Error> {
        let local = config.local;
        if local.ip().is_unspecified() || local.ip().is_multicast() || local.port() == 0 {
            return Err(Error::Config(format!(
                "local address {local} must be a unicast address and a non-zero port"
            )));
        }
        if config.neighbor_queue > MAX_QUEUE {
            return Err(Error::Config(format!(
                "neighbor_queue {} is above {MAX_QUEUE}",
                config.neighbor_queue
            )));
        }
        if config.max_neighbors == 0 || config.neighbor_probes == 0 {
            return Err(Error::Config(
                "max_neighbors and neighbor_probes must be at least 1".to_owned(),
            ));
        }
        let ip_and_udp = wire::udp_headers_len(&local) - wire::ETH_LEN;
        let by_mtu = usize::from(port.mtu()).saturating_sub(ip_and_udp);
        let by_mbuf =
            usize::from(port.max_frame_len()).saturating_sub(wire::udp_headers_len(&local));
        let max_payload = by_mtu.min(by_mbuf);
        if max_payload == 0 {
            return Err(Error::Config(format!(
                "MTU {} leaves no room for a UDP payload",
                port.mtu()
            )));
        }
        // Headers are prepended in the headroom in front of the payload.
        debug_assert!(usize::from(MBUF_HEADROOM) >= wire::UDP6_HEADERS);
        let now = Instant::now();
        Ok(UdpUnderlay {
            local: Local {
                mac: port.mac(),
                addr: local,
            },
            io: Io {
                port,
                out: [ptr::null_mut(); OUT_CAP],
                kinds: [Kind::Neighbor; OUT_CAP],
                len: 0,
                spare: [ptr::null_mut(); BURST],
                spare_len: 0,
                counters: Arc::new(Counters::default()),
            },
            ttl: config.ttl,
            neighbors: Neighbors::new(neighbor::Config {
                reachable: config.neighbor_reachable,
                retransmit: config.neighbor_retransmit,
                max_probes: config.neighbor_probes,
                queue: config.neighbor_queue,
                max_entries: config.max_neighbors,
            }),
            probes: Vec::with_capacity(config.max_neighbors),
            staged: None,
            scratch: RecvBatch::new(),
            max_payload,
            ip_id: 0,
            now,
            next_tick: now,
        })
    }

    /// The local address and port.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local.addr
    }

    /// The port's MAC address.
    #[must_use]
    pub fn mac(&self) -> [u8; 6] {
        self.local.mac
    }

    /// The largest payload [`send`](Self::send) accepts: the port's MTU
    /// minus the IP and UDP headers (and what an mbuf holds).
    #[must_use]
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// The underlying port (MTU, driver statistics).
    #[must_use]
    pub fn port(&self) -> &Port {
        &self.io.port
    }

    /// The live counters, shareable with other threads.
    #[must_use]
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.io.counters)
    }

    /// The MAC address in use for `ip`, if resolved.
    #[must_use]
    pub fn neighbor(&self, ip: IpAddr) -> Option<[u8; 6]> {
        self.neighbors.lookup(ip)
    }

    /// Sets a permanent neighbour entry (no ARP/NDP for `ip` any more);
    /// datagrams waiting for `ip` go out with the next flush.
    pub fn add_neighbor(&mut self, ip: IpAddr, mac: [u8; 6]) -> Result<(), TxDrop> {
        let io = &mut self.io;
        self.neighbors
            .set_static(ip, mac, |p, mac| io.release(p, mac))
    }

    /// Forgets `ip` (static or learnt); datagrams waiting for it are dropped
    /// as [`TxDrop::Unresolved`]. Returns whether there was an entry.
    pub fn remove_neighbor(&mut self, ip: IpAddr) -> bool {
        let counters = &self.io.counters;
        self.neighbors.remove(ip, |p| {
            free(p.m);
            counters.tx_drop(TxDrop::Unresolved, 1);
        })
    }

    /// Receives one burst: datagrams for us land in `batch` (replacing what
    /// it held); ARP/NDP is answered and learnt; everything else is counted
    /// as dropped. Also runs the neighbour timers and sends what they or
    /// the answers queued. Returns the number of datagrams.
    pub fn recv(&mut self, batch: &mut RecvBatch) -> usize {
        batch.len = 0;
        let frames = self.io.port.rx_burst(&mut batch.rx);
        self.now = Instant::now();
        let (mut datagrams, mut bytes, mut neighbor) = (0u64, 0u64, 0u64);
        let queued_before = self.io.len;
        for i in 0..frames {
            let Some(frame) = batch.rx.get(i) else { break };
            if frame.segments != 1 {
                self.io.counters.rx_drop(RxDrop::MultiSegment);
                continue;
            }
            if frame.vlan_stripped {
                // Tagged for some VLAN: not the untagged segment we serve,
                // though the driver made it look untagged.
                self.io.counters.rx_drop(RxDrop::UnknownEtherType);
                continue;
            }
            match wire::classify(frame.data, &self.local) {
                Rx::Datagram { src, offset, len } => {
                    // i < BURST, so it fits a u8 (and get() would refuse a
                    // saturated one).
                    batch.items[batch.len] = (src, u8::try_from(i).unwrap_or(u8::MAX), offset, len);
                    batch.len += 1;
                    datagrams += 1;
                    bytes += u64::from(len);
                }
                Rx::Arp {
                    op,
                    sender_mac,
                    sender_ip,
                    for_us,
                } => {
                    if self.on_arp(op, sender_mac, sender_ip, for_us) {
                        neighbor += 1;
                    }
                }
                Rx::Solicitation {
                    src,
                    src_mac,
                    has_source_ll,
                } => {
                    self.on_solicitation(src, src_mac, has_source_ll);
                    neighbor += 1;
                }
                Rx::Advertisement { target, mac, .. } => {
                    let io = &mut self.io;
                    self.neighbors
                        .learn(target.into(), mac, self.now, false, |p, mac| {
                            io.release(p, mac)
                        });
                    neighbor += 1;
                }
                Rx::Drop(reason) => self.io.counters.rx_drop(reason),
            }
        }
        self.io
            .counters
            .rx_burst(frames as u64, datagrams, bytes, neighbor);
        self.run_timers();
        // Answers and released datagrams go out now, not with the caller's
        // next flush, which may be a while away on a receive-only path.
        if self.io.len > queued_before {
            self.io.flush();
        }
        batch.len
    }

    /// [`recv`](Self::recv) into an internal batch, calling `f` for each
    /// datagram. Returns the number of datagrams.
    pub fn recv_with(&mut self, mut f: impl FnMut(SocketAddr, &[u8])) -> usize {
        let mut batch = std::mem::take(&mut self.scratch);
        let n = self.recv(&mut batch);
        for (src, payload) in batch.iter() {
            f(src, payload);
        }
        batch.clear();
        self.scratch = batch;
        n
    }

    /// A buffer for the payload of the next datagram, `max_len` bytes long,
    /// inside an mbuf: write the payload there, then [`commit`](Self::commit)
    /// it with its real length. Calling this again without a commit reuses
    /// the same buffer. Sends the queued datagrams first when [`BURST`] are
    /// waiting.
    pub fn next_payload_buf(&mut self, max_len: usize) -> Result<&mut [u8], TxDrop> {
        if max_len > self.max_payload {
            self.io.counters.tx_drop(TxDrop::TooBig, 1);
            return Err(TxDrop::TooBig);
        }
        if self.io.len >= BURST {
            self.flush();
        }
        let m = match self.staged.take() {
            Some((m, _)) => m,
            None => {
                let Some(m) = self.io.alloc() else {
                    self.io.counters.tx_drop(TxDrop::NoMbuf, 1);
                    return Err(TxDrop::NoMbuf);
                };
                m
            }
        };
        // SAFETY: m is ours; resetting puts the data at the headroom (room
        // for the headers in front) with length 0. max_len <= max_payload,
        // which fits after the headroom and headers (checked in new).
        let data = unsafe {
            sys::nsm_pktmbuf_reset_len(m.as_ptr());
            sys::nsm_pktmbuf_append(m.as_ptr(), mbuf_len(max_len))
        };
        if data.is_null() {
            free(m);
            self.io.counters.tx_drop(TxDrop::TooBig, 1);
            return Err(TxDrop::TooBig);
        }
        self.staged = Some((m, max_len));
        // SAFETY: append returned max_len writable bytes of m, which stays
        // staged (owned by self) while the returned borrow of self lives.
        Ok(unsafe { std::slice::from_raw_parts_mut(data.cast::<u8>(), max_len) })
    }

    /// Sends the first `len` bytes of the buffer from
    /// [`next_payload_buf`](Self::next_payload_buf) to `dst`: builds the
    /// headers in front of it and queues it, or holds it while `dst`'s MAC
    /// is resolved. An error means the datagram was dropped (and counted);
    /// a staged buffer stays staged on `TooBig`, `WrongFamily` and
    /// `BadDestination`.
    pub fn commit(&mut self, dst: SocketAddr, len: usize) -> Result<(), TxDrop> {
        let Some((m, staged_len)) = self.staged else {
            self.io.counters.tx_drop(TxDrop::NothingStaged, 1);
            return Err(TxDrop::NothingStaged);
        };
        let check = if len > staged_len {
            Err(TxDrop::TooBig)
        } else if dst.is_ipv4() != self.local.addr.is_ipv4() {
            Err(TxDrop::WrongFamily)
        } else if !is_unicast(dst) {
            Err(TxDrop::BadDestination)
        } else {
            Ok(())
        };
        if let Err(reason) = check {
            self.io.counters.tx_drop(reason, 1);
            return Err(reason);
        }
        self.staged = None;
        let headers = wire::udp_headers_len(&dst);
        // SAFETY: m holds staged_len >= len payload bytes at the headroom;
        // trimming keeps len of them, and the headroom (128) is larger than
        // any header (62). Both calls only move offsets inside m.
        let frame = unsafe {
            sys::nsm_pktmbuf_trim(m.as_ptr(), mbuf_len(staged_len - len));
            sys::nsm_pktmbuf_prepend(m.as_ptr(), mbuf_len(headers))
        };
        if frame.is_null() {
            free(m);
            self.io.counters.tx_drop(TxDrop::TooBig, 1);
            return Err(TxDrop::TooBig);
        }
        // SAFETY: prepend returned the start of headers + len valid bytes.
        let frame = unsafe { std::slice::from_raw_parts_mut(frame.cast::<u8>(), headers + len) };
        self.ip_id = self.ip_id.wrapping_add(1);
        wire::write_udp_headers(
            frame,
            self.local.mac,
            self.local.addr,
            dst,
            self.ip_id,
            self.ttl,
        );
        if headers + len < wire::MIN_FRAME {
            let pad = wire::MIN_FRAME - headers - len;
            // SAFETY: a minimum frame fits any mbuf Port::open accepts.
            let tail = unsafe { sys::nsm_pktmbuf_append(m.as_ptr(), mbuf_len(pad)) };
            if !tail.is_null() {
                // SAFETY: append returned pad writable bytes.
                unsafe { ptr::write_bytes(tail.cast::<u8>(), 0, pad) };
            }
        }
        let pending = Pending {
            m,
            payload_len: mbuf_len(len),
        };
        let mut probe = None;
        let res = self
            .neighbors
            .resolve(dst.ip(), pending, self.now, |p| probe = Some(p));
        if let Some(p) = probe {
            self.send_probe(p);
        }
        match res {
            Resolve::Send(mac) => {
                self.io.release(pending, mac);
                Ok(())
            }
            Resolve::Queued => Ok(()),
            Resolve::Drop(reason) => {
                free(m);
                self.io.counters.tx_drop(reason, 1);
                Err(reason)
            }
        }
    }

    /// Copies `payload` into an mbuf and commits it to `dst`
    /// ([`next_payload_buf`](Self::next_payload_buf) + [`commit`](Self::commit)).
    pub fn send(&mut self, dst: SocketAddr, payload: &[u8]) -> Result<(), TxDrop> {
        self.next_payload_buf(payload.len())?
            .copy_from_slice(payload);
        self.commit(dst, payload.len())
    }

    /// Sends everything queued with one `rte_eth_tx_burst` (a few if the
    /// ring takes them in parts) and runs the neighbour timers. Returns the
    /// number of frames the driver took; the rest are counted as
    /// [`TxDrop::RingFull`].
    pub fn flush(&mut self) -> usize {
        self.now = Instant::now();
        self.run_timers();
        self.io.flush()
    }

    /// Neighbour retransmissions and expiry, at most every [`TICK`].
    fn run_timers(&mut self) {
        if self.now < self.next_tick {
            return;
        }
        self.next_tick = self.now + TICK;
        let probes = &mut self.probes;
        let counters = &self.io.counters;
        self.neighbors.tick(
            self.now,
            |p| probes.push(p),
            |p| {
                free(p.m);
                counters.tx_drop(TxDrop::Unresolved, 1);
            },
        );
        for i in 0..self.probes.len() {
            let p = self.probes[i];
            self.send_probe(p);
        }
        self.probes.clear();
    }

    /// Sends an ARP request or neighbour solicitation for `p.ip`.
    fn send_probe(&mut self, p: Probe) {
        let mac = self.local.mac;
        match (self.local.addr.ip(), p.ip) {
            (IpAddr::V4(ours), IpAddr::V4(target)) => {
                let eth_dst = p.unicast.unwrap_or(wire::BROADCAST_MAC);
                self.io.control(wire::ARP_FRAME, |b| {
                    wire::write_arp(b, ArpOp::Request, eth_dst, (mac, ours), ([0; 6], target));
                });
            }
            (IpAddr::V6(ours), IpAddr::V6(target)) => {
                // Re-checks go unicast to the known MAC, first requests to
                // the target's solicited-node group.
                let (eth_dst, ip_dst) = match p.unicast {
                    Some(m) => (m, target),
                    None => {
                        let group = wire::solicited_node(target);
                        (wire::multicast_mac(group), group)
                    }
                };
                self.io.control(wire::NDP_FRAME, |b| {
                    wire::write_ndp(b, eth_dst, mac, ours, ip_dst, Ndp::Solicit { target });
                });
            }
            _ => {}
        }
    }

    /// Handles an ARP packet; returns whether it concerned us.
    fn on_arp(
        &mut self,
        op: ArpOp,
        sender_mac: [u8; 6],
        sender_ip: Ipv4Addr,
        for_us: bool,
    ) -> bool {
        let IpAddr::V4(ours) = self.local.addr.ip() else {
            return false;
        };
        if sender_ip == ours {
            // Someone else claims our address (or a reflection of our own
            // frame): never learn it.
            self.io.counters.rx_drop(RxDrop::BadSource);
            return false;
        }
        let io = &mut self.io;
        if !sender_ip.is_unspecified() {
            // Requests and replies addressed to us create entries (the
            // sender is about to talk to us, or answers our request); other
            // ARP traffic (gratuitous ARP) only refreshes known ones.
            self.neighbors
                .learn(sender_ip.into(), sender_mac, self.now, for_us, |p, mac| {
                    io.release(p, mac)
                });
        }
        if !for_us {
            io.counters.rx_drop(RxDrop::NotForUs);
            return false;
        }
        if op == ArpOp::Request {
            let mac = self.local.mac;
            io.control(wire::ARP_FRAME, |b| {
                wire::write_arp(
                    b,
                    ArpOp::Reply,
                    sender_mac,
                    (mac, ours),
                    (sender_mac, sender_ip),
                );
            });
        }
        true
    }

    /// Answers a neighbour solicitation for our address.
    fn on_solicitation(&mut self, src: Ipv6Addr, src_mac: [u8; 6], has_source_ll: bool) {
        let IpAddr::V6(ours) = self.local.addr.ip() else {
            return;
        };
        let mac = self.local.mac;
        let io = &mut self.io;
        if src.is_unspecified() {
            // Duplicate address detection by another node for our address:
            // defend it with an advertisement to all nodes (RFC 4861 7.2.4).
            let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
            io.control(wire::NDP_FRAME, |b| {
                wire::write_ndp(
                    b,
                    wire::multicast_mac(all_nodes),
                    mac,
                    ours,
                    all_nodes,
                    Ndp::Advertise { solicited: false },
                );
            });
            return;
        }
        if has_source_ll {
            self.neighbors
                .learn(src.into(), src_mac, self.now, true, |p, mac| {
                    io.release(p, mac)
                });
        }
        io.control(wire::NDP_FRAME, |b| {
            wire::write_ndp(
                b,
                src_mac,
                mac,
                ours,
                src,
                Ndp::Advertise { solicited: true },
            );
        });
    }
}

/// Whether `dst` can be sent to: a unicast address and a non-zero port.
fn is_unicast(dst: SocketAddr) -> bool {
    let ip_ok = match dst.ip() {
        IpAddr::V4(ip) => !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast()),
        IpAddr::V6(ip) => !(ip.is_unspecified() || ip.is_multicast()),
    };
    ip_ok && dst.port() != 0
}
