//! `fault`: loss and corruption injection, for testing how clients cope.
//!
//! Each packet (in the configured direction) draws one 64-bit number from a
//! seeded SplitMix64: its top 32 bits decide the drop, against a threshold
//! computed once from the percentage, and, for packets that pass, its low
//! 32 bits decide the corruption; a second draw picks the byte and the
//! bit pattern. Equal seeds and equal traffic give equal decisions, so a
//! test can predict them. O(1) per packet, no allocation.
//!
//! Corruption flips bits (a non-zero XOR) of one byte after the IP header
//! (transport header or payload), so the packet still routes and the
//! receiver's checksum catches it; a packet with nothing after its IP
//! header is left alone (counted as `corrupt_skipped`).
//!
//! Delay is not applied here: a [`Verdict`] cannot postpone a packet, and
//! holding packets would need buffers and a timer the data plane does not
//! own. The stage publishes the configured delay ([`FaultHandle::delay`])
//! for the forwarder, which owns time and queues, to apply with a
//! [`super::delay::DelayLine`].

use std::sync::Arc;
use std::time::Duration;

use crate::counters::Counter;
use crate::drop::DropReason;
use crate::packet::IpPacket;
use crate::stage::{Direction, Stage, StageCtx, Verdict};
use crate::stages::flow::SplitMix64;
use crate::stages::spec::FaultSpec;

#[derive(Debug, Default)]
struct Counters {
    seen: Counter,
    dropped: Counter,
    corrupted: Counter,
    corrupt_skipped: Counter,
}

#[derive(Debug)]
struct Shared {
    counters: Counters,
    delay: Duration,
}

/// The `fault` service function.
#[derive(Debug)]
pub struct FaultStage {
    /// Drop when the draw's top 32 bits are below this (2^32 = always).
    drop_below: u64,
    corrupt_below: u64,
    only: Option<Direction>,
    rng: SplitMix64,
    shared: Arc<Shared>,
}

/// Reads a [`FaultStage`]'s counters (and its delay) from any thread.
#[derive(Clone, Debug)]
pub struct FaultHandle(Arc<Shared>);

/// A fault stage's counters, as plain numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultSnapshot {
    /// Packets the stage applied to (its direction).
    pub seen: u64,
    /// Dropped on purpose.
    pub dropped: u64,
    /// Corrupted (and passed).
    pub corrupted: u64,
    /// Chosen for corruption but with no byte after the IP header.
    pub corrupt_skipped: u64,
}

impl FaultHandle {
    /// Reads the counters.
    pub fn snapshot(&self) -> FaultSnapshot {
        let c = &self.0.counters;
        FaultSnapshot {
            seen: c.seen.get(),
            dropped: c.dropped.get(),
            corrupted: c.corrupted.get(),
            corrupt_skipped: c.corrupt_skipped.get(),
        }
    }

    /// The delay the forwarder should add to the stage's traffic.
    pub fn delay(&self) -> Duration {
        self.0.delay
    }
}

/// `percent` (validated 0..=100) of 2^32.
fn threshold(percent: f64) -> u64 {
    let t = (percent.clamp(0.0, 100.0) / 100.0 * 4_294_967_296.0).round();
    // In 0..=2^32 by the clamp: exact in f64, fits in u64.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let t = t as u64;
    t
}

impl FaultStage {
    /// Builds the stage from a validated spec.
    pub(crate) fn new(spec: &FaultSpec) -> (Self, FaultHandle) {
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            delay: spec.delay,
        });
        let stage = FaultStage {
            drop_below: threshold(spec.drop_percent),
            corrupt_below: threshold(spec.corrupt_percent),
            only: spec.direction,
            rng: SplitMix64::new(spec.seed),
            shared: shared.clone(),
        };
        (stage, FaultHandle(shared))
    }
}

impl Stage for FaultStage {
    #[inline]
    fn process(&mut self, ctx: &StageCtx, packet: &mut IpPacket<'_>) -> Verdict {
        if self.only.is_some_and(|d| d != ctx.direction) {
            return Verdict::Pass;
        }
        let c = &self.shared.counters;
        c.seen.inc();
        let draw = self.rng.next_u64();
        if draw >> 32 < self.drop_below {
            c.dropped.inc();
            return Verdict::Drop(DropReason::FaultInjected);
        }
        if draw & 0xffff_ffff < self.corrupt_below {
            let pick = self.rng.next_u64();
            let l4 = packet.l4_mut();
            let n = l4.len() as u64;
            if n == 0 {
                c.corrupt_skipped.inc();
            } else {
                let at = usize::try_from((pick >> 8) % n).unwrap_or(0);
                let flip = (pick.to_le_bytes()[0]).max(1);
                if let Some(b) = l4.get_mut(at) {
                    *b ^= flip;
                }
                c.corrupted.inc();
            }
        }
        Verdict::Pass
    }

    fn name(&self) -> &'static str {
        "fault"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn packet() -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(1, 2);
        let mut v = Vec::new();
        b.write(&mut v, &[7u8; 32]).expect("write");
        v
    }

    fn run_many(spec: &FaultSpec, n: u32) -> (Vec<bool>, FaultSnapshot, usize) {
        let (mut stage, h) = FaultStage::new(spec);
        let orig = packet();
        let mut buf = orig.clone();
        let now = Instant::now();
        let mut passed = Vec::new();
        let mut changed = 0;
        for _ in 0..n {
            buf.copy_from_slice(&orig);
            let mut p = IpPacket::parse(&mut buf).expect("valid");
            let ctx = StageCtx {
                now,
                direction: Direction::AToB,
            };
            passed.push(stage.process(&ctx, &mut p) == Verdict::Pass);
            if buf[..20] != orig[..20] {
                panic!("IP header corrupted");
            }
            changed += usize::from(buf != orig);
        }
        (passed, h.snapshot(), changed)
    }

    #[test]
    fn drop_rate_matches_and_is_deterministic() {
        let spec = FaultSpec {
            drop_percent: 10.0,
            seed: 7,
            ..FaultSpec::default()
        };
        let (a, s, _) = run_many(&spec, 100_000);
        let dropped = a.iter().filter(|p| !**p).count();
        assert!((9_500..=10_500).contains(&dropped), "{dropped}");
        assert_eq!(s.dropped, dropped as u64);
        assert_eq!(s.seen, 100_000);
        let (b, _, _) = run_many(&spec, 100_000);
        assert_eq!(a, b, "same seed, same decisions");
        let (c, _, _) = run_many(
            &FaultSpec {
                seed: 8,
                ..spec.clone()
            },
            1000,
        );
        assert_ne!(a[..1000], c[..], "another seed, other decisions");
    }

    #[test]
    fn extremes_and_corruption() {
        let all = FaultSpec {
            drop_percent: 100.0,
            ..FaultSpec::default()
        };
        assert!(run_many(&all, 1000).0.iter().all(|p| !p));
        let none = FaultSpec::default();
        assert!(run_many(&none, 1000).0.iter().all(|p| *p));
        let corrupt = FaultSpec {
            corrupt_percent: 50.0,
            delay: Duration::from_millis(20),
            ..FaultSpec::default()
        };
        let (passed, s, changed) = run_many(&corrupt, 10_000);
        assert!(passed.iter().all(|p| *p));
        assert!((4_700..=5_300).contains(&s.corrupted), "{}", s.corrupted);
        assert_eq!(
            changed as u64, s.corrupted,
            "every corruption changes a byte"
        );
        let (stage, h) = FaultStage::new(&corrupt);
        drop(stage);
        assert_eq!(h.delay(), Duration::from_millis(20));
    }

    #[test]
    fn corrupting_a_bare_ip_header_is_skipped() {
        let (mut stage, h) = FaultStage::new(&FaultSpec {
            corrupt_percent: 100.0,
            ..FaultSpec::default()
        });
        // An IPv4 packet with no payload at all (protocol 253, experimental).
        let mut buf = vec![
            0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 253, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let mut p = IpPacket::parse(&mut buf).expect("valid");
        let ctx = StageCtx {
            now: Instant::now(),
            direction: Direction::BToA,
        };
        assert_eq!(stage.process(&ctx, &mut p), Verdict::Pass);
        assert_eq!(h.snapshot().corrupt_skipped, 1);
    }
}
