//! `ratelimit`: a token-bucket policer per direction of the connection.
//!
//! A chain belongs to one cross-connect, so a stage instance is that
//! connection's limit; each direction has its own bucket (unless the spec
//! limits only one). A packet passes if the bucket holds at least its IP
//! length, and takes that much out; otherwise it is dropped
//! ([`DropReason::RateLimited`]) and the bucket is left alone. Over a long
//! run the bytes passed are `rate * time + burst`, exactly.
//!
//! Arithmetic is integer and exact: the bucket is kept in bit-nanoseconds
//! (`u128`), so refilling `elapsed_ns * rate_bps` and charging
//! `len * 8 * 10^9` never round, whatever the rate. Time is the caller's
//! `now`; a `now` earlier than the last one refills nothing. The bucket
//! starts full. O(1) per packet.
//!
//! Burst sizing is what makes TCP behave: see
//! [`RateLimitSpec::default_burst`].

use std::sync::Arc;
use std::time::Instant;

use crate::counters::Counter;
use crate::drop::DropReason;
use crate::packet::IpPacket;
use crate::stage::{Direction, Stage, StageCtx, Verdict};
use crate::stages::spec::RateLimitSpec;

const NANOS: u128 = 1_000_000_000;

#[derive(Debug)]
struct Bucket {
    /// Bit-nanoseconds available.
    tokens: u128,
    last: Option<Instant>,
}

#[derive(Debug, Default)]
struct DirCounters {
    passed_packets: Counter,
    passed_bytes: Counter,
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
    rate_bps: u128,
    depth: u128,
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
    /// Packets within the rate.
    pub passed_packets: u64,
    /// Their IP bytes.
    pub passed_bytes: u64,
    /// Packets over the rate (dropped).
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
            dropped_packets: c.dropped_packets.get(),
            dropped_bytes: c.dropped_bytes.get(),
        };
        RateLimitSnapshot {
            a_to_b: d(&self.0.a_to_b),
            b_to_a: d(&self.0.b_to_a),
        }
    }
}

impl RateLimitStage {
    /// Builds the stage from a validated spec.
    pub(crate) fn new(spec: &RateLimitSpec) -> (Self, RateLimitHandle) {
        let depth = u128::from(spec.burst()) * 8 * NANOS;
        let bucket = || Bucket {
            tokens: depth,
            last: None,
        };
        let counters = Arc::new(Counters::default());
        let stage = RateLimitStage {
            rate_bps: u128::from(spec.rate_bps),
            depth,
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
            let elapsed = ctx.now.saturating_duration_since(last).as_nanos();
            bucket.tokens = bucket
                .tokens
                .saturating_add(elapsed.saturating_mul(self.rate_bps))
                .min(self.depth);
        }
        if bucket.last.is_none_or(|last| ctx.now > last) {
            bucket.last = Some(ctx.now);
        }
        let len = packet.bytes().len() as u64;
        let cost = u128::from(len) * 8 * NANOS;
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            counters.passed_packets.inc();
            counters.passed_bytes.add(len);
            Verdict::Pass
        } else {
            counters.dropped_packets.inc();
            counters.dropped_bytes.add(len);
            Verdict::Drop(DropReason::RateLimited)
        }
    }

    fn name(&self) -> &'static str {
        "ratelimit"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn packet(len: usize) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(1, 2);
        let mut v = Vec::new();
        b.write(&mut v, &vec![0u8; len - 28]).expect("write");
        v
    }

    /// Offers `offered_bps` of `size`-byte packets for `secs` of simulated
    /// time; returns the bytes passed.
    fn simulate(stage: &mut RateLimitStage, offered_bps: u64, size: usize, secs: u64) -> u64 {
        let mut buf = packet(size);
        let t0 = Instant::now();
        let gap_ns = (size as u64 * 8 * 1_000_000_000) / offered_bps;
        let n = secs * 1_000_000_000 / gap_ns;
        let mut passed = 0;
        for i in 0..n {
            let mut p = IpPacket::parse(&mut buf).expect("valid");
            let ctx = StageCtx {
                now: t0 + Duration::from_nanos(i * gap_ns),
                direction: Direction::AToB,
            };
            if stage.process(&ctx, &mut p) == Verdict::Pass {
                passed += size as u64;
            }
        }
        passed
    }

    #[test]
    fn long_run_average_is_the_rate() {
        for (rate, offered, size) in [
            (50_000_000u64, 80_000_000u64, 1420usize),
            (10_000_000, 200_000_000, 64),
            (1_000_000_000, 1_500_000_000, 9000),
        ] {
            let spec = RateLimitSpec {
                rate_bps: rate,
                burst_bytes: None,
                direction: None,
            };
            let (mut stage, h) = RateLimitStage::new(&spec);
            let secs = 20;
            let passed = simulate(&mut stage, offered, size, secs);
            let measured = passed as f64 * 8.0 / secs as f64;
            let err = (measured - rate as f64).abs() / rate as f64;
            assert!(err < 0.01, "rate {rate}: measured {measured} ({err})");
            let s = h.snapshot();
            assert_eq!(s.a_to_b.passed_bytes, passed);
            assert!(s.a_to_b.dropped_packets > 0);
            assert_eq!(s.b_to_a, RateLimitDirSnapshot::default());
        }
    }

    #[test]
    fn under_the_rate_nothing_is_dropped_and_directions_are_separate() {
        let spec = RateLimitSpec {
            rate_bps: 10_000_000,
            burst_bytes: Some(3000),
            direction: Some(Direction::AToB),
        };
        let (mut stage, h) = RateLimitStage::new(&spec);
        let passed = simulate(&mut stage, 9_000_000, 1000, 2);
        assert_eq!(passed, 9_000_000 * 2 / 8);
        assert_eq!(h.snapshot().a_to_b.dropped_packets, 0);

        // Only A to B is limited: B to A passes whatever the rate.
        let mut buf = packet(1500);
        let now = Instant::now();
        for _ in 0..100 {
            let mut p = IpPacket::parse(&mut buf).expect("valid");
            let ctx = StageCtx {
                now,
                direction: Direction::BToA,
            };
            assert_eq!(stage.process(&ctx, &mut p), Verdict::Pass);
        }
    }

    #[test]
    fn burst_then_drop_then_refill() {
        let spec = RateLimitSpec {
            rate_bps: 8_000, // 1000 bytes/s
            burst_bytes: Some(2000),
            direction: None,
        };
        let (mut stage, _) = RateLimitStage::new(&spec);
        let mut buf = packet(1000);
        let t0 = Instant::now();
        let mut go = |t: Duration| {
            let mut p = IpPacket::parse(&mut buf).expect("valid");
            stage.process(
                &StageCtx {
                    now: t0 + t,
                    direction: Direction::AToB,
                },
                &mut p,
            )
        };
        assert_eq!(go(Duration::ZERO), Verdict::Pass);
        assert_eq!(go(Duration::ZERO), Verdict::Pass);
        assert_eq!(go(Duration::ZERO), Verdict::Drop(DropReason::RateLimited));
        assert_eq!(
            go(Duration::from_millis(999)),
            Verdict::Drop(DropReason::RateLimited)
        );
        assert_eq!(go(Duration::from_millis(1000)), Verdict::Pass);
        // Time going backwards refills nothing and does not panic.
        assert_eq!(go(Duration::ZERO), Verdict::Drop(DropReason::RateLimited));
    }
}
