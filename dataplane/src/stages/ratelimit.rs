//! `ratelimit`: a token-bucket shaper per direction of the connection.
//!
//! A chain belongs to one cross-connect, so a stage instance is that
//! connection's limit; each direction has its own bucket (unless the spec
//! limits only one). The bucket holds up to `burst` bytes and refills at
//! `rate`. A packet that finds its IP length in the bucket passes at once
//! and takes it. One that does not is queued: it takes its length anyway,
//! the bucket going into debt, and leaves ([`Verdict::Hold`]) when the
//! refill has paid the debt back, i.e. after every packet queued before it,
//! at the rate. The queue is bounded ([`RateLimitSpec::queue_bytes`] and
//! [`RateLimitSpec::QUEUE_PACKETS`]); a packet that does not fit is dropped
//! ([`DropReason::RateLimited`]) and leaves the bucket alone. Over a long
//! run the bytes sent are `rate * time + burst`, exactly.
//!
//! Why a shaper and not a policer: a TCP sender behind a TSO device hands
//! over 64 KB bursts at once; a policer drops the tail of every burst that
//! does not fit the bucket, and TCP through a 50 Mbit/s policer with a
//! 64 KiB bucket was measured at 3 to 4 Mbit/s (retransmission timeouts).
//! Queued instead, those tails leave at the rate, and TCP gets the rate.
//!
//! The queue itself is not here: the packet's buffer belongs to the caller.
//! The stage only computes each packet's departure time; the forwarder
//! keeps held outputs in a FIFO per direction ([`super::DelayLine`]) until
//! then. Departure times of one direction never decrease, so the FIFO
//! keeps them in order. The stage counts the packets still waiting (their
//! departure times, in a ring allocated at build) to bound the queue in
//! packets as well as bytes.
//!
//! Arithmetic is integer and exact: the bucket is kept in bit-nanoseconds
//! (`i128`, negative when in debt), so refilling `elapsed_ns * rate_bps`
//! and charging `len * 8 * 10^9` never round, whatever the rate; a
//! departure time is rounded up to the nanosecond. Time is the caller's
//! `now`; a `now` earlier than the last one refills nothing. The bucket
//! starts full. O(1) per packet (amortized: each departure time is pushed
//! and popped once), no allocation.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::counters::Counter;
use crate::drop::DropReason;
use crate::packet::IpPacket;
use crate::stage::{Direction, Stage, StageCtx, Verdict};
use crate::stages::spec::RateLimitSpec;

const NANOS: i128 = 1_000_000_000;

#[derive(Debug)]
struct Bucket {
    /// Bit-nanoseconds available; negative: owed by queued packets.
    level: i128,
    last: Option<Instant>,
    /// Departure times of the queued packets, oldest first; capacity
    /// [`RateLimitSpec::QUEUE_PACKETS`], reserved at build, never exceeded.
    queued: VecDeque<Instant>,
}

#[derive(Debug, Default)]
struct DirCounters {
    passed_packets: Counter,
    passed_bytes: Counter,
    queued_packets: Counter,
    dropped_packets: Counter,
    dropped_bytes: Counter,
}

#[derive(Debug, Default)]
struct Counters {
    a_to_b: DirCounters,
    b_to_a: DirCounters,
}

/// The `ratelimit` service function.
#[derive(Debug)]
pub struct RateLimitStage {
    rate_bps: i128,
    /// Bucket size, bit-nanoseconds.
    depth: i128,
    /// Most debt (queued bytes), bit-nanoseconds.
    queue: i128,
    only: Option<Direction>,
    a_to_b: Bucket,
    b_to_a: Bucket,
    counters: Arc<Counters>,
}

/// Reads a [`RateLimitStage`]'s counters from any thread.
#[derive(Clone, Debug)]
pub struct RateLimitHandle(Arc<Counters>);

/// One direction's numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitDirSnapshot {
    /// Packets sent on (at once or after waiting in the queue).
    pub passed_packets: u64,
    /// Their IP bytes.
    pub passed_bytes: u64,
    /// Of the packets passed, those that waited in the queue.
    pub queued_packets: u64,
    /// Packets over the rate with the queue full (dropped).
    pub dropped_packets: u64,
    /// Their IP bytes.
    pub dropped_bytes: u64,
}

/// A rate limiter's counters, as plain numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitSnapshot {
    /// Side A to side B.
    pub a_to_b: RateLimitDirSnapshot,
    /// Side B to side A.
    pub b_to_a: RateLimitDirSnapshot,
}

impl RateLimitHandle {
    /// Reads the counters.
    pub fn snapshot(&self) -> RateLimitSnapshot {
        let d = |c: &DirCounters| RateLimitDirSnapshot {
            passed_packets: c.passed_packets.get(),
            passed_bytes: c.passed_bytes.get(),
            queued_packets: c.queued_packets.get(),
            dropped_packets: c.dropped_packets.get(),
            dropped_bytes: c.dropped_bytes.get(),
        };
        RateLimitSnapshot {
            a_to_b: d(&self.0.a_to_b),
            b_to_a: d(&self.0.b_to_a),
        }
    }
}

/// Bytes to bit-nanoseconds (saturating: specs are validated, but the
/// arithmetic must not overflow on any input).
fn bit_nanos(bytes: u64) -> i128 {
    i128::from(bytes).saturating_mul(8 * NANOS)
}

impl RateLimitStage {
    /// Builds the stage from a validated spec (reserves the queue rings).
    pub(crate) fn new(spec: &RateLimitSpec) -> (Self, RateLimitHandle) {
        let depth = bit_nanos(spec.burst());
        let bucket = || Bucket {
            level: depth,
            last: None,
            queued: VecDeque::with_capacity(RateLimitSpec::QUEUE_PACKETS),
        };
        let counters = Arc::new(Counters::default());
        let stage = RateLimitStage {
            rate_bps: i128::from(spec.rate_bps.max(1)),
            depth,
            queue: bit_nanos(spec.queue_bytes()),
            only: spec.direction,
            a_to_b: bucket(),
            b_to_a: bucket(),
            counters: counters.clone(),
        };
        (stage, RateLimitHandle(counters))
    }
}

impl Stage for RateLimitStage {
    #[inline]
    fn process(&mut self, ctx: &StageCtx, packet: &mut IpPacket<'_>) -> Verdict {
        if self.only.is_some_and(|d| d != ctx.direction) {
            return Verdict::Pass;
        }
        let (bucket, counters) = match ctx.direction {
            Direction::AToB => (&mut self.a_to_b, &self.counters.a_to_b),
            Direction::BToA => (&mut self.b_to_a, &self.counters.b_to_a),
        };
        if let Some(last) = bucket.last {
            let elapsed = i128::try_from(ctx.now.saturating_duration_since(last).as_nanos())
                .unwrap_or(i128::MAX);
            bucket.level = bucket
                .level
                .saturating_add(elapsed.saturating_mul(self.rate_bps))
                .min(self.depth);
        }
        if bucket.last.is_none_or(|last| ctx.now > last) {
            bucket.last = Some(ctx.now);
        }
        while bucket.queued.front().is_some_and(|t| *t <= ctx.now) {
            bucket.queued.pop_front();
        }
        let len = packet.bytes().len() as u64;
        let after = bucket.level.saturating_sub(bit_nanos(len));
        if after >= 0 {
            bucket.level = after;
            counters.passed_packets.inc();
            counters.passed_bytes.add(len);
            return Verdict::Pass;
        }
        if -after > self.queue || bucket.queued.len() >= RateLimitSpec::QUEUE_PACKETS {
            counters.dropped_packets.inc();
            counters.dropped_bytes.add(len);
            return Verdict::Drop(DropReason::RateLimited);
        }
        bucket.level = after;
        // Leaves when the refill has paid the debt: after -after / rate
        // nanoseconds, rounded up.
        let wait = (-after + self.rate_bps - 1) / self.rate_bps;
        let wait = Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX));
        let due = ctx.now.checked_add(wait).unwrap_or(ctx.now);
        // Never before a packet queued earlier (`now` may go backwards).
        let due = bucket.queued.back().map_or(due, |t| due.max(*t));
        bucket.queued.push_back(due);
        counters.passed_packets.inc();
        counters.passed_bytes.add(len);
        counters.queued_packets.inc();
        Verdict::Hold(due)
    }

    fn name(&self) -> &'static str {
        "ratelimit"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(len: usize) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(1, 2);
        let mut v = Vec::new();
        b.write(&mut v, &vec![0u8; len - 28]).expect("write");
        v
    }

    fn go(
        stage: &mut RateLimitStage,
        buf: &mut [u8],
        now: Instant,
        direction: Direction,
    ) -> Verdict {
        let mut p = IpPacket::parse(buf).expect("valid");
        stage.process(&StageCtx { now, direction }, &mut p)
    }

    /// Offers `offered_bps` of `size`-byte packets for `secs` of simulated
    /// time; returns the bytes that left within those `secs` (at once, or
    /// held until a time inside them), checking that departures never go
    /// back in time.
    fn simulate(stage: &mut RateLimitStage, offered_bps: u64, size: usize, secs: u64) -> u64 {
        let mut buf = packet(size);
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(secs);
        let gap_ns = (size as u64 * 8 * 1_000_000_000) / offered_bps;
        let n = secs * 1_000_000_000 / gap_ns;
        let mut left = 0;
        let mut last_departure = t0;
        for i in 0..n {
            let now = t0 + Duration::from_nanos(i * gap_ns);
            let departure = match go(stage, &mut buf, now, Direction::AToB) {
                Verdict::Pass => now,
                Verdict::Hold(t) => {
                    assert!(t > now);
                    t
                }
                Verdict::Drop(_) => continue,
            };
            assert!(departure >= last_departure, "departures stay in order");
            last_departure = departure;
            if departure <= end {
                left += size as u64;
            }
        }
        left
    }

    #[test]
    fn long_run_average_is_the_rate() {
        for (rate, offered, size, burst) in [
            (50_000_000u64, 80_000_000u64, 1420usize, None),
            (50_000_000, 80_000_000, 1420, Some(65_536)),
            (10_000_000, 200_000_000, 64, None),
            (1_000_000_000, 1_500_000_000, 9000, None),
        ] {
            let spec = RateLimitSpec {
                rate_bps: rate,
                burst_bytes: burst,
                direction: None,
            };
            let (mut stage, h) = RateLimitStage::new(&spec);
            let secs = 20;
            let left = simulate(&mut stage, offered, size, secs);
            let measured = left as f64 * 8.0 / secs as f64;
            let err = (measured - rate as f64).abs() / rate as f64;
            assert!(err < 0.01, "rate {rate}: measured {measured} ({err})");
            let s = h.snapshot();
            assert!(s.a_to_b.passed_bytes >= left);
            assert!(s.a_to_b.queued_packets > 0);
            assert!(s.a_to_b.dropped_packets > 0, "the queue filled up");
            assert_eq!(s.b_to_a, RateLimitDirSnapshot::default());
        }
    }

    #[test]
    fn under_the_rate_nothing_waits_and_directions_are_separate() {
        let spec = RateLimitSpec {
            rate_bps: 10_000_000,
            burst_bytes: Some(3000),
            direction: Some(Direction::AToB),
        };
        let (mut stage, h) = RateLimitStage::new(&spec);
        let passed = simulate(&mut stage, 9_000_000, 1000, 2);
        assert_eq!(passed, 9_000_000 * 2 / 8);
        let s = h.snapshot().a_to_b;
        assert_eq!((s.queued_packets, s.dropped_packets), (0, 0));

        // Only A to B is limited: B to A passes whatever the rate.
        let mut buf = packet(1500);
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(
                go(&mut stage, &mut buf, now, Direction::BToA),
                Verdict::Pass
            );
        }
    }

    #[test]
    fn burst_then_queue_then_drop_then_refill() {
        let spec = RateLimitSpec {
            rate_bps: 8_000, // 1000 bytes/s
            burst_bytes: Some(2000),
            direction: None,
        };
        // The queue holds the burst (50 ms at this rate is less).
        assert_eq!(spec.queue_bytes(), 2000);
        let (mut stage, h) = RateLimitStage::new(&spec);
        let mut buf = packet(1000);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut go = |t: Duration| go(&mut stage, &mut buf, t0 + t, Direction::AToB);
        assert_eq!(go(Duration::ZERO), Verdict::Pass);
        assert_eq!(go(Duration::ZERO), Verdict::Pass);
        // Queued, leaving one per second.
        assert_eq!(go(Duration::ZERO), Verdict::Hold(t0 + s(1)));
        assert_eq!(go(Duration::ZERO), Verdict::Hold(t0 + s(2)));
        // The queue is full (2000 bytes): dropped, the bucket left alone.
        assert_eq!(go(Duration::ZERO), Verdict::Drop(DropReason::RateLimited));
        assert_eq!(
            go(Duration::from_millis(999)),
            Verdict::Drop(DropReason::RateLimited)
        );
        // A second later one has left: room for one more, behind the other.
        assert_eq!(go(s(1)), Verdict::Hold(t0 + s(3)));
        // Time going backwards refills nothing, does not panic, and never
        // puts a packet before those queued.
        assert_eq!(go(Duration::ZERO), Verdict::Drop(DropReason::RateLimited));
        // Idle long enough, the bucket is full again.
        assert_eq!(go(s(10)), Verdict::Pass);
        assert_eq!(go(s(10)), Verdict::Pass);
        let snap = h.snapshot().a_to_b;
        assert_eq!(
            (
                snap.passed_packets,
                snap.queued_packets,
                snap.dropped_packets
            ),
            (7, 3, 3)
        );
    }

    #[test]
    fn queue_is_bounded_in_packets_too() {
        let spec = RateLimitSpec {
            rate_bps: 1_000_000_000,
            burst_bytes: Some(1500),
            direction: None,
        };
        let (mut stage, _) = RateLimitStage::new(&spec);
        let mut buf = packet(40);
        let now = Instant::now();
        let verdicts: Vec<Verdict> = (0..RateLimitSpec::QUEUE_PACKETS + 100)
            .map(|_| go(&mut stage, &mut buf, now, Direction::AToB))
            .collect();
        let held = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Hold(_)))
            .count();
        assert_eq!(held, RateLimitSpec::QUEUE_PACKETS);
        assert_eq!(
            verdicts.last(),
            Some(&Verdict::Drop(DropReason::RateLimited))
        );
    }
}
