//! Flow records: a sampled, fixed-size flow table per chain and a
//! lock-free ring of finished records that the forwarder drains to a file.
//!
//! Not a service function: the chain ([`super::build_with_flow_log`]) runs
//! it after its functions, on every packet, with the packet's tuple as it
//! entered the chain and what each function answered. It never changes a
//! verdict.
//!
//! # Bounded work per packet
//! - Sampling is by flow, not by packet: a flow is logged when a keyed hash
//!   of its (direction-independent) tuple falls in 1 of `sample` buckets, so
//!   an unsampled packet costs one hash and returns.
//! - The table is open addressing over slots allocated when the chain is
//!   built, looked up in a window of 8 slots. A new flow whose
//!   window is full of live flows is not logged (counted `table_full`).
//! - A record leaves the table when its flow has been idle for `idle`
//!   (noticed by the chain's `poll`, run from the data plane's timers,
//!   [`SWEEP`] slots a call, or when its slot is wanted), every `active` for
//!   a long flow (an interim record, the counts restart), and when the
//!   chain is dropped (replaced or removed: every live flow, `closed`).
//! - Records go into a single-producer single-consumer ring of
//!   `AtomicU64` words (the pattern of the `mirror` ring): no lock, no
//!   allocation; a full ring loses the record (counted `ring_full`),
//!   never the packet.
//!
//! # Verdicts
//! Per function (up to [`MAX_FUNCTIONS`]), which answers it gave the flow's
//! packets: any `drop` wins over `hold` over `pass`; a function that never
//! saw a packet of the flow (its selector did not match, or an earlier one
//! dropped them) is `not_run`. The last drop reason is kept.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::counters::Counter;
use crate::drop::DropReason;
use crate::stage::{Direction, StageCtx};
use crate::stages::flow::{Fields, FlowKey, FoldState};

/// Functions whose verdicts a record carries (bit masks of `u32`).
pub const MAX_FUNCTIONS: usize = 32;

/// Slots looked at per lookup.
const WINDOW: usize = 8;

/// Slots the timer sweep looks at per poll ([`crate::Dataplane::poll_chains`],
/// every 100 to 250 ms): a 4,096-flow table is swept every 6 to 16 s, and
/// 16,384 logged connections cost about a million slot reads a round.
pub const SWEEP: usize = 64;

/// Words of a ring slot.
const WORDS: usize = 13;

/// How a chain's flows are logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowLogSpec {
    /// Log 1 flow in `sample` (1: every flow; 0 is taken as 1).
    pub sample: u32,
    /// Flows tracked at once (rounded up to a power of two).
    pub flows: usize,
    /// Finished records the ring holds until the forwarder drains it.
    pub ring: usize,
    /// A flow idle this long is finished.
    pub idle: Duration,
    /// A flow active this long gets an interim record.
    pub active: Duration,
}

impl Default for FlowLogSpec {
    fn default() -> Self {
        FlowLogSpec {
            sample: 1,
            flows: 4096,
            ring: 1024,
            idle: Duration::from_secs(15),
            active: Duration::from_secs(60),
        }
    }
}

/// What one function answered for a flow's packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FunctionVerdict {
    /// It saw none of them.
    NotRun,
    /// It passed them.
    Pass,
    /// It passed some after holding them (a shaper queued them).
    Hold,
    /// It dropped at least one.
    Drop,
}

impl FunctionVerdict {
    /// `not_run`, `pass`, `hold`, `drop`.
    pub const fn as_str(self) -> &'static str {
        match self {
            FunctionVerdict::NotRun => "not_run",
            FunctionVerdict::Pass => "pass",
            FunctionVerdict::Hold => "hold",
            FunctionVerdict::Drop => "drop",
        }
    }
}

/// Why a record was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEnd {
    /// The flow went idle.
    Idle,
    /// An interim record of a long flow; it goes on.
    Active,
    /// The chain was replaced or the cross-connect removed.
    Closed,
}

impl FlowEnd {
    /// `idle`, `active`, `closed`.
    pub const fn as_str(self) -> &'static str {
        match self {
            FlowEnd::Idle => "idle",
            FlowEnd::Active => "active",
            FlowEnd::Closed => "closed",
        }
    }

    const fn code(self) -> u64 {
        match self {
            FlowEnd::Idle => 0,
            FlowEnd::Active => 1,
            FlowEnd::Closed => 2,
        }
    }

    const fn of(code: u64) -> FlowEnd {
        match code {
            0 => FlowEnd::Idle,
            1 => FlowEnd::Active,
            _ => FlowEnd::Closed,
        }
    }
}

/// One finished (or interim) flow. Addresses and ports are as the flow's
/// first packet carried them; `forward` counts that packet's direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    /// IP protocol number.
    pub proto: u8,
    /// Source address of the first packet.
    pub src: IpAddr,
    /// Its destination.
    pub dst: IpAddr,
    /// TCP/UDP source port (ICMP echo: the id on a request), else 0.
    pub src_port: u16,
    /// TCP/UDP destination port, else 0.
    pub dst_port: u16,
    /// Which way the first packet crossed the cross-connect.
    pub direction: Direction,
    /// Packets and IP bytes in the first packet's direction.
    pub forward: (u64, u64),
    /// Packets and IP bytes the other way.
    pub reverse: (u64, u64),
    /// The `now` of the first packet counted.
    pub start: Instant,
    /// The `now` of the last one.
    pub end: Instant,
    passed: u32,
    held: u32,
    dropped: u32,
    /// The last drop reason of the flow's packets.
    pub drop_reason: Option<DropReason>,
    /// Why this record was written.
    pub ended: FlowEnd,
}

impl FlowRecord {
    /// What function `i` of the chain answered.
    pub fn verdict(&self, i: usize) -> FunctionVerdict {
        let Some(bit) = u32::try_from(i).ok().and_then(|s| 1u32.checked_shl(s)) else {
            return FunctionVerdict::NotRun;
        };
        if self.dropped & bit != 0 {
            FunctionVerdict::Drop
        } else if self.held & bit != 0 {
            FunctionVerdict::Hold
        } else if self.passed & bit != 0 {
            FunctionVerdict::Pass
        } else {
            FunctionVerdict::NotRun
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Canonical key (both directions map to it).
    key: FlowKey,
    /// The first packet's tuple was the reverse of `key`.
    swapped: bool,
    direction: Direction,
    start: Instant,
    last: Instant,
    /// Packets and bytes: [first packet's direction, the other].
    packets: [u64; 2],
    bytes: [u64; 2],
    passed: u32,
    held: u32,
    dropped: u32,
    reason: Option<DropReason>,
}

#[derive(Debug, Default)]
struct Counters {
    records: Counter,
    ring_full: Counter,
    table_full: Counter,
}

#[derive(Debug)]
struct Ring {
    slots: Box<[[AtomicU64; WORDS]]>,
    head: AtomicUsize,
    tail: AtomicUsize,
    origin: Instant,
    counters: Counters,
}

/// The flow log of one chain (producer side; runs on the packet thread).
#[derive(Debug)]
pub struct FlowLogStage {
    slots: Box<[Option<Entry>]>,
    mask: usize,
    hasher: FoldState,
    sample: u64,
    idle: Duration,
    active: Duration,
    cursor: usize,
    ring: Arc<Ring>,
}

/// The consumer end of a chain's flow-log ring. There is exactly one.
#[derive(Debug)]
pub struct FlowLogReader {
    ring: Arc<Ring>,
    names: Vec<&'static str>,
}

/// A flow log's counters, as plain numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowLogSnapshot {
    /// Records put in the ring.
    pub records: u64,
    /// Records lost because the ring was full.
    pub ring_full: u64,
    /// Sampled flows not logged because their table window was full.
    pub table_full: u64,
}

impl FlowLogReader {
    /// Takes the oldest record. `None` when the ring is empty. Never blocks.
    pub fn pop(&mut self) -> Option<FlowRecord> {
        let ring = &*self.ring;
        let head = ring.head.load(Ordering::Relaxed);
        let tail = ring.tail.load(Ordering::Acquire);
        if head == tail {
            return None;
        }
        let slot = ring.slots.get(head % ring.slots.len())?;
        let mut w = [0u64; WORDS];
        for (d, s) in w.iter_mut().zip(slot.iter()) {
            *d = s.load(Ordering::Relaxed);
        }
        ring.head.store(head.wrapping_add(1), Ordering::Release);
        Some(decode(&w, ring.origin))
    }

    /// The chain's function names, in order (`verdict(i)` is `names()[i]`'s).
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// The producer (the chain) is gone: once empty, this reader is done.
    pub fn is_orphan(&self) -> bool {
        Arc::strong_count(&self.ring) == 1
    }

    /// The counters.
    pub fn snapshot(&self) -> FlowLogSnapshot {
        let c = &self.ring.counters;
        FlowLogSnapshot {
            records: c.records.get(),
            ring_full: c.ring_full.get(),
            table_full: c.table_full.get(),
        }
    }
}

// Truncations below are the packing of known-width fields into words.
#[allow(clippy::cast_possible_truncation)]
fn decode(w: &[u64; WORDS], origin: Instant) -> FlowRecord {
    let v6 = w[0] & 1 != 0;
    let proto = (w[0] >> 8) as u8;
    let src_port = (w[0] >> 16) as u16;
    let dst_port = (w[0] >> 32) as u16;
    let reason = DropReason::ALL.get(((w[0] >> 48) & 0xff) as usize).copied();
    let ended = FlowEnd::of((w[0] >> 56) & 0x7f);
    let direction = if w[0] >> 63 == 0 {
        Direction::AToB
    } else {
        Direction::BToA
    };
    let addr = |hi: u64, lo: u64| {
        let a = (u128::from(hi) << 64) | u128::from(lo);
        if v6 {
            IpAddr::V6(Ipv6Addr::from(a))
        } else {
            IpAddr::V4(Ipv4Addr::from((a >> 96) as u32))
        }
    };
    FlowRecord {
        proto,
        src: addr(w[1], w[2]),
        dst: addr(w[3], w[4]),
        src_port,
        dst_port,
        direction,
        forward: (w[5], w[6]),
        reverse: (w[7], w[8]),
        start: origin + Duration::from_nanos(w[9]),
        end: origin + Duration::from_nanos(w[10]),
        passed: w[11] as u32,
        held: (w[11] >> 32) as u32,
        dropped: w[12] as u32,
        drop_reason: reason,
        ended,
    }
}

#[allow(clippy::cast_possible_truncation)]
fn encode(e: &Entry, ended: FlowEnd, origin: Instant) -> [u64; WORDS] {
    let k = if e.swapped { e.key.reversed() } else { e.key };
    let nanos = |t: Instant| {
        u64::try_from(t.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
    };
    let reason = e.reason.map_or(0xff, |r| r.index() as u64 & 0xff);
    let dir = u64::from(e.direction == Direction::BToA);
    [
        u64::from(k.v6)
            | u64::from(k.proto) << 8
            | u64::from(k.pa) << 16
            | u64::from(k.pb) << 32
            | reason << 48
            | ended.code() << 56
            | dir << 63,
        (k.a >> 64) as u64,
        k.a as u64,
        (k.b >> 64) as u64,
        k.b as u64,
        e.packets[0],
        e.bytes[0],
        e.packets[1],
        e.bytes[1],
        nanos(e.start),
        nanos(e.last),
        u64::from(e.passed) | u64::from(e.held) << 32,
        u64::from(e.dropped),
    ]
}

impl FlowLogStage {
    /// Allocates the table and the ring (all the memory it will use).
    pub(crate) fn new(
        spec: &FlowLogSpec,
        names: Vec<&'static str>,
        origin: Instant,
    ) -> (Self, FlowLogReader) {
        let n = spec.flows.clamp(WINDOW, 1 << 22).next_power_of_two();
        let ring = Arc::new(Ring {
            slots: (0..spec.ring.max(1))
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            head: AtomicUsize::new(0),
            tail: AtomicUsize::new(0),
            origin,
            counters: Counters::default(),
        });
        let stage = FlowLogStage {
            slots: vec![None; n].into_boxed_slice(),
            mask: n - 1,
            hasher: FoldState::random(),
            sample: u64::from(spec.sample.max(1)),
            idle: spec.idle,
            active: spec.active,
            cursor: 0,
            ring: ring.clone(),
        };
        (stage, FlowLogReader { ring, names })
    }

    fn push(&self, e: &Entry, ended: FlowEnd) {
        let ring = &*self.ring;
        let tail = ring.tail.load(Ordering::Relaxed);
        let head = ring.head.load(Ordering::Acquire);
        if tail.wrapping_sub(head) >= ring.slots.len() {
            ring.counters.ring_full.inc();
            return;
        }
        let Some(slot) = ring.slots.get(tail % ring.slots.len()) else {
            return;
        };
        for (d, s) in slot.iter().zip(encode(e, ended, ring.origin)) {
            d.store(s, Ordering::Relaxed);
        }
        ring.tail.store(tail.wrapping_add(1), Ordering::Release);
        ring.counters.records.inc();
    }

    /// Counts one packet of the flow `f` (its fields as it entered the
    /// chain) with what the functions answered: bit `i` of `passed`,
    /// `held`, `dropped` is function `i`'s answer.
    #[inline]
    pub(crate) fn observe(
        &mut self,
        ctx: &StageCtx,
        f: &Fields,
        len: usize,
        verdicts: (u32, u32, u32),
        reason: Option<DropReason>,
    ) {
        let (key, swapped) = FlowKey::of(f).canonical();
        let h = std::hash::BuildHasher::hash_one(&self.hasher, key);
        if self.sample > 1 && (h >> 32) % self.sample != 0 {
            return;
        }
        let now = ctx.now;
        let start = usize::try_from(h & self.mask as u64).unwrap_or(0);
        let mut found = None;
        let mut free = None;
        for i in (0..WINDOW).map(|i| (start + i) & self.mask) {
            match self.slots.get(i) {
                Some(Some(e)) if e.key == key => {
                    found = Some(i);
                    break;
                }
                Some(Some(e)) if now.saturating_duration_since(e.last) < self.idle => {}
                Some(_) if free.is_none() => free = Some(i),
                _ => {}
            }
        }
        let bytes = len as u64;
        if let Some(i) = found {
            let Some(Some(e)) = self.slots.get(i) else {
                return;
            };
            let mut e = *e;
            if now.saturating_duration_since(e.last) >= self.idle {
                // The same tuple again after a silence: a new flow.
                self.push(&e, FlowEnd::Idle);
                e = self.fresh(key, swapped, ctx);
            } else if now.saturating_duration_since(e.start) >= self.active {
                self.push(&e, FlowEnd::Active);
                // The flow goes on: its orientation and verdicts stay.
                e = Entry {
                    start: now,
                    last: now,
                    packets: [0; 2],
                    bytes: [0; 2],
                    ..e
                };
            }
            let d = usize::from(swapped != e.swapped);
            Self::count(&mut e, d, bytes, now, verdicts, reason);
            if let Some(s) = self.slots.get_mut(i) {
                *s = Some(e);
            }
            return;
        }
        let Some(i) = free else {
            self.ring.counters.table_full.inc();
            return;
        };
        if let Some(Some(old)) = self.slots.get(i) {
            let old = *old;
            self.push(&old, FlowEnd::Idle);
        }
        let mut e = self.fresh(key, swapped, ctx);
        Self::count(&mut e, 0, bytes, now, verdicts, reason);
        if let Some(s) = self.slots.get_mut(i) {
            *s = Some(e);
        }
    }

    #[inline]
    fn fresh(&self, key: FlowKey, swapped: bool, ctx: &StageCtx) -> Entry {
        Entry {
            key,
            swapped,
            direction: ctx.direction,
            start: ctx.now,
            last: ctx.now,
            packets: [0; 2],
            bytes: [0; 2],
            passed: 0,
            held: 0,
            dropped: 0,
            reason: None,
        }
    }

    #[inline]
    fn count(
        e: &mut Entry,
        d: usize,
        bytes: u64,
        now: Instant,
        (passed, held, dropped): (u32, u32, u32),
        reason: Option<DropReason>,
    ) {
        if let Some(p) = e.packets.get_mut(d) {
            *p += 1;
        }
        if let Some(b) = e.bytes.get_mut(d) {
            *b += bytes;
        }
        e.last = now;
        e.passed |= passed;
        e.held |= held;
        e.dropped |= dropped;
        if reason.is_some() {
            e.reason = reason;
        }
    }

    /// Finishes flows idle since `now - idle`, looking at [`SWEEP`] slots
    /// (the whole table every `flows / SWEEP` calls).
    pub(crate) fn poll(&mut self, now: Instant) {
        for _ in 0..SWEEP.min(self.slots.len()) {
            self.cursor = (self.cursor + 1) & self.mask;
            let expired = match self.slots.get(self.cursor) {
                Some(Some(e)) if now.saturating_duration_since(e.last) >= self.idle => Some(*e),
                _ => None,
            };
            if let Some(e) = expired {
                self.push(&e, FlowEnd::Idle);
                if let Some(s) = self.slots.get_mut(self.cursor) {
                    *s = None;
                }
            }
        }
    }
}

impl Drop for FlowLogStage {
    /// The chain is gone (dropped off the packet thread): every live flow
    /// is finished, `closed`.
    fn drop(&mut self) {
        for e in self.slots.iter().flatten() {
            self.push(e, FlowEnd::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::IpPacket;

    fn fields(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16) -> (Fields, usize) {
        let b = etherparse::PacketBuilder::ipv4(src, dst, 64).udp(sp, dp);
        let mut v = Vec::new();
        b.write(&mut v, b"hello").expect("write");
        let len = v.len();
        let p = IpPacket::parse(&mut v).expect("valid");
        (Fields::of(&p), len)
    }

    fn ctx(now: Instant, direction: Direction) -> StageCtx {
        StageCtx { now, direction }
    }

    fn spec() -> FlowLogSpec {
        FlowLogSpec {
            flows: 64,
            ring: 8,
            ..FlowLogSpec::default()
        }
    }

    #[test]
    fn both_directions_make_one_record_with_verdicts() {
        let t0 = Instant::now();
        let (mut s, mut r) = FlowLogStage::new(&spec(), vec!["counter", "acl"], t0);
        let (fwd, len) = fields([10, 0, 0, 1], [10, 0, 0, 2], 1000, 53);
        let (rev, _) = fields([10, 0, 0, 2], [10, 0, 0, 1], 53, 1000);
        s.observe(&ctx(t0, Direction::AToB), &fwd, len, (0b11, 0, 0), None);
        s.observe(
            &ctx(t0 + Duration::from_millis(5), Direction::BToA),
            &rev,
            len,
            (0b01, 0, 0b10),
            Some(DropReason::AclDenied),
        );
        assert!(r.pop().is_none(), "live flows stay in the table");
        s.poll(t0 + Duration::from_secs(16));
        let rec = r.pop().expect("idle record");
        assert_eq!(rec.src, IpAddr::from([10, 0, 0, 1]));
        assert_eq!(rec.dst, IpAddr::from([10, 0, 0, 2]));
        assert_eq!((rec.src_port, rec.dst_port, rec.proto), (1000, 53, 17));
        assert_eq!(rec.forward, (1, len as u64));
        assert_eq!(rec.reverse, (1, len as u64));
        assert_eq!(rec.direction, Direction::AToB);
        assert_eq!(rec.verdict(0), FunctionVerdict::Pass);
        assert_eq!(rec.verdict(1), FunctionVerdict::Drop);
        assert_eq!(rec.verdict(2), FunctionVerdict::NotRun);
        assert_eq!(rec.verdict(99), FunctionVerdict::NotRun);
        assert_eq!(rec.drop_reason, Some(DropReason::AclDenied));
        assert_eq!(rec.ended, FlowEnd::Idle);
        assert_eq!(rec.end - rec.start, Duration::from_millis(5));
        assert_eq!(r.names(), ["counter", "acl"]);
        assert!(r.pop().is_none());
    }

    #[test]
    fn ring_and_table_are_bounded_and_counted() {
        let t0 = Instant::now();
        let (mut s, mut r) = FlowLogStage::new(&spec(), vec![], t0);
        for p in 0..2000u16 {
            let (f, len) = fields([10, 0, 0, 1], [10, 0, 0, 2], p, 80);
            s.observe(&ctx(t0, Direction::AToB), &f, len, (0, 0, 0), None);
        }
        let snap = r.snapshot();
        assert!(snap.table_full > 0, "{snap:?}");
        drop(s);
        let snap = r.snapshot();
        assert_eq!(snap.records, 8, "the ring holds 8");
        assert!(snap.ring_full > 0);
        assert!(r.is_orphan());
        let mut n = 0;
        while let Some(rec) = r.pop() {
            assert_eq!(rec.ended, FlowEnd::Closed);
            n += 1;
        }
        assert_eq!(n, 8);
    }

    #[test]
    fn sampling_is_per_flow() {
        let t0 = Instant::now();
        let sp = FlowLogSpec {
            sample: 4,
            flows: 4096,
            ring: 4096,
            ..FlowLogSpec::default()
        };
        let (mut s, r) = FlowLogStage::new(&sp, vec![], t0);
        for p in 0..1000u16 {
            let (f, len) = fields([10, 0, 0, 1], [10, 0, 0, 2], p, 80);
            for _ in 0..3 {
                s.observe(&ctx(t0, Direction::AToB), &f, len, (0, 0, 0), None);
            }
        }
        drop(s);
        let n = r.snapshot().records;
        assert!((150..350).contains(&n), "about 1 flow in 4 logged: {n}");
    }

    #[test]
    fn long_flows_get_interim_records() {
        let t0 = Instant::now();
        let (mut s, mut r) = FlowLogStage::new(&spec(), vec!["acl"], t0);
        let (f, len) = fields([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
        for i in 0..70u64 {
            let c = ctx(t0 + Duration::from_secs(i), Direction::AToB);
            s.observe(&c, &f, len, (1, 0, 0), None);
        }
        let rec = r.pop().expect("interim");
        assert_eq!(rec.ended, FlowEnd::Active);
        assert_eq!(rec.forward.0, 60);
        assert_eq!(rec.verdict(0), FunctionVerdict::Pass);
    }
}
