//! `mirror`: copies matching packets out of the pipeline, without I/O.
//!
//! The stage copies each matching packet (up to `snaplen` bytes) into a ring
//! of slots allocated when it is built; the forwarder drains the ring with
//! [`MirrorReader::pop`] and writes the copies where the spec says (a pcap
//! file, using [`super::pcap`] to format the headers, or another
//! connection). The original packet always passes, untouched; when the ring
//! is full the copy is dropped and counted (`ring_full`), never the packet.
//!
//! # The ring
//! Single producer (the worker running the chain), single consumer (the
//! one [`MirrorReader`], on any thread). `tail` is written only by the
//! producer, `head` only by the consumer; the producer publishes a slot
//! with a `Release` store of `tail` after filling it, the consumer frees it
//! with a `Release` store of `head` after reading it, and each side reads
//! the other's index with `Acquire`. Slot contents are `AtomicU64` words
//! (relaxed), which keeps the crate free of `unsafe` while costing about a
//! `memcpy`: no lock, no allocation, O(snaplen) per copied packet.
//!
//! Records carry the packet's `now` as an [`Instant`] (nanoseconds from the
//! ring's origin, set at build); the forwarder maps it to wall-clock time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::counters::Counter;
use crate::packet::IpPacket;
use crate::stage::{Direction, Stage, StageCtx, Verdict};
use crate::stages::flow::Fields;
use crate::stages::spec::{FlowMatch, MirrorSpec};

#[derive(Debug)]
struct Slot {
    words: Box<[AtomicU64]>,
    captured: AtomicU32,
    orig_len: AtomicU32,
    nanos: AtomicU64,
    dir: AtomicU8,
}

#[derive(Debug)]
struct Ring {
    slots: Box<[Slot]>,
    head: AtomicUsize,
    tail: AtomicUsize,
    snaplen: usize,
    origin: Instant,
}

#[derive(Debug, Default)]
struct Counters {
    matched: Counter,
    copied: Counter,
    ring_full: Counter,
    truncated: Counter,
}

/// The `mirror` service function (producer end of the ring).
#[derive(Debug)]
pub struct MirrorStage {
    filter: FlowMatch,
    match_all: bool,
    ring: Arc<Ring>,
    counters: Arc<Counters>,
}

/// Reads a [`MirrorStage`]'s counters from any thread.
#[derive(Clone, Debug)]
pub struct MirrorHandle(Arc<Counters>);

/// A mirror's counters, as plain numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorSnapshot {
    /// Packets that matched the filter.
    pub matched: u64,
    /// Copies put in the ring.
    pub copied: u64,
    /// Copies lost because the ring was full (the packets passed).
    pub ring_full: u64,
    /// Copies cut to `snaplen`.
    pub truncated: u64,
}

impl MirrorHandle {
    /// Reads the counters.
    pub fn snapshot(&self) -> MirrorSnapshot {
        let c = &self.0;
        MirrorSnapshot {
            matched: c.matched.get(),
            copied: c.copied.get(),
            ring_full: c.ring_full.get(),
            truncated: c.truncated.get(),
        }
    }
}

/// The consumer end of a mirror's ring. There is exactly one (not `Clone`).
#[derive(Debug)]
pub struct MirrorReader(Arc<Ring>);

/// One copied packet, described; its bytes went to the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MirrorRecord {
    /// Bytes written to the buffer (`<= snaplen`, `<= buf.len()`).
    pub len: usize,
    /// The packet's full IP length.
    pub orig_len: usize,
    /// Which way it was going.
    pub direction: Direction,
    /// The `now` it was processed with.
    pub at: Instant,
}

impl MirrorReader {
    /// Takes the oldest copy, writing its bytes to `buf` (cut to
    /// `buf.len()`; give it [`MirrorReader::snaplen`] bytes). `None` when
    /// the ring is empty. Never blocks.
    pub fn pop(&mut self, buf: &mut [u8]) -> Option<MirrorRecord> {
        let ring = &*self.0;
        let head = ring.head.load(Ordering::Relaxed);
        let tail = ring.tail.load(Ordering::Acquire);
        if head == tail {
            return None;
        }
        let slot = ring.slots.get(head % ring.slots.len())?;
        let captured = usize::try_from(slot.captured.load(Ordering::Relaxed)).unwrap_or(0);
        let len = captured.min(buf.len());
        for (chunk, word) in buf[..len].chunks_mut(8).zip(slot.words.iter()) {
            let bytes = word.load(Ordering::Relaxed).to_ne_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        let record = MirrorRecord {
            len,
            orig_len: usize::try_from(slot.orig_len.load(Ordering::Relaxed)).unwrap_or(0),
            direction: if slot.dir.load(Ordering::Relaxed) == 0 {
                Direction::AToB
            } else {
                Direction::BToA
            },
            at: ring.origin + Duration::from_nanos(slot.nanos.load(Ordering::Relaxed)),
        };
        ring.head.store(head.wrapping_add(1), Ordering::Release);
        Some(record)
    }

    /// Copies waiting.
    pub fn len(&self) -> usize {
        let tail = self.0.tail.load(Ordering::Acquire);
        tail.wrapping_sub(self.0.head.load(Ordering::Relaxed))
    }

    /// No copy waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Largest copy, in bytes: the buffer size `pop` needs.
    pub fn snaplen(&self) -> usize {
        self.0.snaplen
    }
}

impl MirrorStage {
    /// Builds the stage and its ring (allocates every slot).
    pub(crate) fn new(spec: &MirrorSpec, origin: Instant) -> (Self, MirrorHandle, MirrorReader) {
        let snaplen = usize::from(spec.snaplen);
        let words = snaplen.div_ceil(8);
        let slots = (0..spec.slots.max(1))
            .map(|_| Slot {
                words: (0..words).map(|_| AtomicU64::new(0)).collect(),
                captured: AtomicU32::new(0),
                orig_len: AtomicU32::new(0),
                nanos: AtomicU64::new(0),
                dir: AtomicU8::new(0),
            })
            .collect();
        let ring = Arc::new(Ring {
            slots,
            head: AtomicUsize::new(0),
            tail: AtomicUsize::new(0),
            snaplen,
            origin,
        });
        let counters = Arc::new(Counters::default());
        let stage = MirrorStage {
            match_all: spec.filter == FlowMatch::default(),
            filter: spec.filter.clone(),
            ring: ring.clone(),
            counters: counters.clone(),
        };
        (stage, MirrorHandle(counters), MirrorReader(ring))
    }

    fn push(&self, ctx: &StageCtx, data: &[u8]) {
        let ring = &*self.ring;
        let tail = ring.tail.load(Ordering::Relaxed);
        let head = ring.head.load(Ordering::Acquire);
        let Some(slot) = ring.slots.get(tail % ring.slots.len()) else {
            return;
        };
        if tail.wrapping_sub(head) >= ring.slots.len() {
            self.counters.ring_full.inc();
            return;
        }
        let captured = data.len().min(ring.snaplen);
        if captured < data.len() {
            self.counters.truncated.inc();
        }
        for (chunk, word) in data[..captured].chunks(8).zip(slot.words.iter()) {
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            word.store(u64::from_ne_bytes(bytes), Ordering::Relaxed);
        }
        let u32_len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        slot.captured.store(u32_len(captured), Ordering::Relaxed);
        slot.orig_len.store(u32_len(data.len()), Ordering::Relaxed);
        let nanos = ctx.now.saturating_duration_since(ring.origin).as_nanos();
        slot.nanos
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
        slot.dir.store(
            u8::from(ctx.direction == Direction::BToA),
            Ordering::Relaxed,
        );
        ring.tail.store(tail.wrapping_add(1), Ordering::Release);
        self.counters.copied.inc();
    }
}

impl MirrorStage {
    /// [`Stage::process`] with a chain's cache of the packet's fields
    /// (read into it only if the filter needs them).
    #[inline]
    pub(crate) fn run(
        &mut self,
        ctx: &StageCtx,
        packet: &IpPacket<'_>,
        fields: &mut Option<Fields>,
    ) -> Verdict {
        if self.match_all
            || self
                .filter
                .matches(Fields::cached(fields, packet), ctx.direction)
        {
            self.counters.matched.inc();
            self.push(ctx, packet.bytes());
        }
        Verdict::Pass
    }
}

impl Stage for MirrorStage {
    #[inline]
    fn process(&mut self, ctx: &StageCtx, packet: &mut IpPacket<'_>) -> Verdict {
        self.run(ctx, packet, &mut None)
    }

    fn name(&self) -> &'static str {
        "mirror"
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::stages::spec::Proto;

    fn packet(dport: u16, len: usize) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(1, dport);
        let mut v = Vec::new();
        let payload: Vec<u8> = (0..len - 28).map(|i| i as u8).collect();
        b.write(&mut v, &payload).expect("write");
        v
    }

    fn run(stage: &mut MirrorStage, t: Instant, dir: Direction, mut pkt: Vec<u8>) -> Verdict {
        let mut p = IpPacket::parse(&mut pkt).expect("valid");
        stage.process(
            &StageCtx {
                now: t,
                direction: dir,
            },
            &mut p,
        )
    }

    #[test]
    fn copies_until_full_then_counts_and_always_passes() {
        let t0 = Instant::now();
        let spec = MirrorSpec {
            filter: FlowMatch {
                proto: Proto::Udp,
                dst_ports: Some(crate::stages::spec::PortRange::single(53)),
                ..FlowMatch::default()
            },
            snaplen: 100,
            slots: 2,
        };
        let (mut m, h, mut r) = MirrorStage::new(&spec, t0);
        let t1 = t0 + Duration::from_millis(5);
        assert_eq!(
            run(&mut m, t1, Direction::AToB, packet(53, 60)),
            Verdict::Pass
        );
        assert_eq!(
            run(&mut m, t1, Direction::BToA, packet(53, 300)),
            Verdict::Pass
        );
        assert_eq!(
            run(&mut m, t1, Direction::AToB, packet(53, 60)),
            Verdict::Pass
        );
        assert_eq!(
            run(&mut m, t1, Direction::AToB, packet(80, 60)),
            Verdict::Pass
        );
        assert_eq!(
            h.snapshot(),
            MirrorSnapshot {
                matched: 3,
                copied: 2,
                ring_full: 1,
                truncated: 1
            }
        );
        assert_eq!(r.len(), 2);
        let mut buf = vec![0u8; r.snaplen()];
        let rec = r.pop(&mut buf).expect("first");
        assert_eq!(
            (rec.len, rec.orig_len, rec.direction),
            (60, 60, Direction::AToB)
        );
        assert_eq!(rec.at, t1);
        assert_eq!(&buf[..60], &packet(53, 60)[..]);
        let rec = r.pop(&mut buf).expect("second");
        assert_eq!(
            (rec.len, rec.orig_len, rec.direction),
            (100, 300, Direction::BToA)
        );
        assert_eq!(&buf[..100], &packet(53, 300)[..100]);
        assert!(r.pop(&mut buf).is_none());
        // Room again; a short caller buffer cuts the copy, no panic.
        assert_eq!(
            run(&mut m, t1, Direction::AToB, packet(53, 60)),
            Verdict::Pass
        );
        let mut small = [0u8; 5];
        assert_eq!(r.pop(&mut small).expect("third").len, 5);
        assert!(r.is_empty());
    }

    #[test]
    fn reader_on_another_thread_sees_whole_copies() {
        let t0 = Instant::now();
        let spec = MirrorSpec {
            slots: 8,
            snaplen: 256,
            ..MirrorSpec::default()
        };
        let (mut m, h, mut r) = MirrorStage::new(&spec, t0);
        let n = 20_000;
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 256];
            let mut got = 0;
            let mut last = Instant::now();
            while got < n && last.elapsed() < Duration::from_secs(5) {
                match r.pop(&mut buf) {
                    Some(rec) => {
                        let p = IpPacket::parse(&mut buf[..rec.len]).expect("whole packet");
                        assert_eq!(p.bytes().len(), rec.orig_len);
                        got += 1;
                        last = Instant::now();
                    }
                    None => std::thread::yield_now(),
                }
            }
            got
        });
        let mut sent = 0;
        for i in 0..200_000u32 {
            if sent == n {
                break;
            }
            let before = h.snapshot().copied;
            let _ = run(
                &mut m,
                t0,
                Direction::AToB,
                packet(53, 40 + (i % 200) as usize),
            );
            sent += usize::from(h.snapshot().copied > before);
        }
        let got = reader.join().expect("reader");
        assert_eq!(got, sent);
    }
}
