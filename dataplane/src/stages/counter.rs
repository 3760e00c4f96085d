//! `counter`: counts the packets and bytes that reach its position in the
//! chain, per direction.
//!
//! The connection's own counters say what entered and left it; a counter
//! stage says what got past a given point (e.g. after an `acl`), and the
//! chain spec can place several. It never drops.
//!
//! Counts are single-writer atomics (see [`crate::counters`]): the stage
//! runs on the one worker that owns the chain, and a [`CounterHandle`] reads
//! them from any thread.

use std::sync::Arc;

use crate::counters::Counter;
use crate::packet::IpPacket;
use crate::stage::{Direction, Stage, StageCtx, Verdict};

#[derive(Debug, Default)]
struct Inner {
    a_to_b_packets: Counter,
    a_to_b_bytes: Counter,
    b_to_a_packets: Counter,
    b_to_a_bytes: Counter,
}

/// The `counter` service function.
#[derive(Debug)]
pub struct CounterStage(Arc<Inner>);

/// Reads a [`CounterStage`]'s counts from any thread.
#[derive(Clone, Debug)]
pub struct CounterHandle(Arc<Inner>);

/// A counter stage's counts, as plain numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Packets from side A to side B that reached this stage.
    pub a_to_b_packets: u64,
    /// Their IP bytes.
    pub a_to_b_bytes: u64,
    /// Packets from side B to side A that reached this stage.
    pub b_to_a_packets: u64,
    /// Their IP bytes.
    pub b_to_a_bytes: u64,
}

impl CounterStage {
    /// A new stage and the handle to read it.
    pub fn new() -> (Self, CounterHandle) {
        let inner = Arc::new(Inner::default());
        (CounterStage(inner.clone()), CounterHandle(inner))
    }
}

impl CounterHandle {
    /// Reads the counts.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            a_to_b_packets: self.0.a_to_b_packets.get(),
            a_to_b_bytes: self.0.a_to_b_bytes.get(),
            b_to_a_packets: self.0.b_to_a_packets.get(),
            b_to_a_bytes: self.0.b_to_a_bytes.get(),
        }
    }
}

impl Stage for CounterStage {
    #[inline]
    fn process(&mut self, ctx: &StageCtx, packet: &mut IpPacket<'_>) -> Verdict {
        let bytes = packet.bytes().len() as u64;
        match ctx.direction {
            Direction::AToB => {
                self.0.a_to_b_packets.inc();
                self.0.a_to_b_bytes.add(bytes);
            }
            Direction::BToA => {
                self.0.b_to_a_packets.inc();
                self.0.b_to_a_bytes.add(bytes);
            }
        }
        Verdict::Pass
    }

    fn name(&self) -> &'static str {
        "counter"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::{Chain, StageExt};
    use std::time::Instant;

    #[test]
    fn counts_per_direction() {
        let (first, h1) = CounterStage::new();
        let (second, h2) = CounterStage::new();
        let mut chain = Chain::new(first.then(second));
        let b = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(1, 2);
        let mut buf = Vec::new();
        b.write(&mut buf, &[0u8; 72]).expect("write");
        let now = Instant::now();
        for (dir, n) in [(Direction::AToB, 3), (Direction::BToA, 2)] {
            for _ in 0..n {
                let mut p = IpPacket::parse(&mut buf).expect("valid");
                let ctx = StageCtx {
                    now,
                    direction: dir,
                };
                assert_eq!(chain.run(&ctx, &mut p), Verdict::Pass);
            }
        }
        let expect = CounterSnapshot {
            a_to_b_packets: 3,
            a_to_b_bytes: 300,
            b_to_a_packets: 2,
            b_to_a_bytes: 200,
        };
        assert_eq!(h1.snapshot(), expect);
        assert_eq!(h2.snapshot(), expect);
    }
}
