//! The service-function chain: where `acl`, `ratelimit`, `nat44`, `mirror`,
//! `counter` and `fault` plug in.
//!
//! A [`Stage`] sees one IP packet at a time, in place, with the time and the
//! direction, and answers [`Verdict::Pass`], [`Verdict::Drop`] or
//! [`Verdict::Hold`] (pass, but not before a given time: a shaper queued
//! it). Stages are plain synchronous values: no `async`, no allocation, no
//! lock per packet.
//!
//! A [`Chain`] is built once per cross-connect from its spec (control plane,
//! may allocate) and is the only place with type erasure: one `Box<dyn Stage>`
//! for the whole chain. Inside it, stages composed with [`StageExt::then`]
//! are statically typed and inlined into each other, like linkerd layers or
//! smoltcp's device wrappers; a chain assembled at run time from a list of
//! boxed stages ([`Chain::from_stages`]) pays one indirect call per stage.
//!
//! Replacing a connection's chain is a control-plane operation,
//! [`crate::Dataplane::set_chain`]: the owning worker applies it between two
//! packets, so every packet runs entirely through either the old chain or the
//! new one. The old chain is handed back so that the caller can drop it off
//! the packet thread.

use std::time::Instant;

use crate::drop::DropReason;
use crate::packet::IpPacket;

/// Which way a packet crosses its cross-connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From side A (the local pod named first in the spec) to side B.
    AToB,
    /// From side B (the other pod, or the WireGuard session) to side A.
    BToA,
}

/// What a stage knows besides the packet.
#[derive(Clone, Copy, Debug)]
pub struct StageCtx {
    /// The caller's clock, as passed to the data-path call.
    pub now: Instant,
    /// Which way the packet goes.
    pub direction: Direction,
}

/// A stage's decision about one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Hand the packet to the next stage (or forward it after the last).
    Pass,
    /// Discard it; the reason is counted on the cross-connect.
    Drop(DropReason),
    /// Hand it on like [`Verdict::Pass`], but it must not leave before this
    /// time: a shaping stage (`ratelimit`) queued it behind the traffic
    /// ahead of it. The data plane cannot hold the caller's buffer, so it
    /// processes the packet at once and reports the time
    /// ([`crate::Dataplane::hold_until`]); the caller (the forwarder)
    /// keeps the output until then.
    Hold(Instant),
}

impl Verdict {
    /// This verdict followed by a later stage's: a drop wins, holds add up
    /// to the latest time.
    #[inline]
    pub fn and(self, later: Verdict) -> Verdict {
        match (self, later) {
            (Verdict::Drop(r), _) | (_, Verdict::Drop(r)) => Verdict::Drop(r),
            (Verdict::Hold(a), Verdict::Hold(b)) => Verdict::Hold(a.max(b)),
            (Verdict::Hold(t), Verdict::Pass) | (Verdict::Pass, Verdict::Hold(t)) => {
                Verdict::Hold(t)
            }
            (Verdict::Pass, Verdict::Pass) => Verdict::Pass,
        }
    }
}

/// One service function, run per packet on the worker thread.
pub trait Stage: Send {
    /// Processes `packet` in place. May rewrite bytes, not the length.
    fn process(&mut self, ctx: &StageCtx, packet: &mut IpPacket<'_>) -> Verdict;

    /// Time passes without packets: bounded housekeeping (the flow log
    /// finishes idle flows). Run from the data plane's timers
    /// ([`crate::Dataplane::poll_chains`]); the default does nothing.
    fn poll(&mut self, _now: Instant) {}

    /// Short name for status and debugging (`"counter"`, `"acl"`, ...).
    fn name(&self) -> &'static str;
}

impl<S: Stage + ?Sized> Stage for Box<S> {
    #[inline]
    fn process(&mut self, ctx: &StageCtx, packet: &mut IpPacket<'_>) -> Verdict {
        (**self).process(ctx, packet)
    }

    fn poll(&mut self, now: Instant) {
        (**self).poll(now);
    }

    fn name(&self) -> &'static str {
        (**self).name()
    }
}

/// Runs boxed stages in order; what [`Chain::from_stages`] builds.
impl Stage for Vec<Box<dyn Stage>> {
    #[inline]
    fn process(&mut self, ctx: &StageCtx, packet: &mut IpPacket<'_>) -> Verdict {
        let mut verdict = Verdict::Pass;
        for stage in self.iter_mut() {
            verdict = verdict.and(stage.process(ctx, packet));
            if let Verdict::Drop(r) = verdict {
                return Verdict::Drop(r);
            }
        }
        verdict
    }

    fn name(&self) -> &'static str {
        "list"
    }
}

/// Two stages in sequence, statically composed (see [`StageExt::then`]).
#[derive(Debug, Clone)]
pub struct Then<A, B> {
    first: A,
    second: B,
}

impl<A: Stage, B: Stage> Stage for Then<A, B> {
    #[inline]
    fn process(&mut self, ctx: &StageCtx, packet: &mut IpPacket<'_>) -> Verdict {
        match self.first.process(ctx, packet) {
            Verdict::Drop(r) => Verdict::Drop(r),
            v => v.and(self.second.process(ctx, packet)),
        }
    }

    fn name(&self) -> &'static str {
        "then"
    }
}

/// Composition of stages without boxing.
pub trait StageExt: Stage + Sized {
    /// `self`, then `next` if `self` passed the packet.
    fn then<B: Stage>(self, next: B) -> Then<Self, B> {
        Then {
            first: self,
            second: next,
        }
    }
}

impl<S: Stage> StageExt for S {}

/// The service chain of one cross-connect, type-erased once.
///
/// The empty chain (the default) costs one branch per packet.
#[derive(Default)]
pub struct Chain {
    stage: Option<Box<dyn Stage>>,
    names: Vec<&'static str>,
}

impl Chain {
    /// No service functions: every packet passes.
    pub fn empty() -> Self {
        Self::default()
    }

    /// A chain made of one (possibly composed) stage.
    pub fn new<S: Stage + 'static>(stage: S) -> Self {
        let names = vec![stage.name()];
        Chain {
            stage: Some(Box::new(stage)),
            names,
        }
    }

    /// A chain of stages chosen at run time (e.g. from a chain spec pushed by
    /// the manager), run in order.
    pub fn from_stages(stages: Vec<Box<dyn Stage>>) -> Self {
        if stages.is_empty() {
            return Self::empty();
        }
        let names = stages.iter().map(|s| s.name()).collect();
        Chain {
            stage: Some(Box::new(stages)),
            names,
        }
    }

    /// A chain made of one stage that runs several functions itself (as
    /// [`crate::stages::build`] does), with their names for status.
    pub fn with_names<S: Stage + 'static>(stage: S, names: Vec<&'static str>) -> Self {
        Chain {
            stage: Some(Box::new(stage)),
            names,
        }
    }

    /// True when no stage is installed.
    pub fn is_empty(&self) -> bool {
        self.stage.is_none()
    }

    /// Names of the stages, as given when the chain was built.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// Housekeeping between packets ([`Stage::poll`]).
    pub fn poll(&mut self, now: Instant) {
        if let Some(stage) = &mut self.stage {
            stage.poll(now);
        }
    }

    /// Runs the chain over one packet.
    #[inline]
    pub fn run(&mut self, ctx: &StageCtx, packet: &mut IpPacket<'_>) -> Verdict {
        match &mut self.stage {
            None => Verdict::Pass,
            Some(stage) => stage.process(ctx, packet),
        }
    }
}

impl core::fmt::Debug for Chain {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Chain")
            .field("stages", &self.names)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends its tag to a shared log, then passes or drops.
    struct Probe {
        tag: u8,
        drop: Option<DropReason>,
        log: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl Stage for Probe {
        fn process(&mut self, _: &StageCtx, packet: &mut IpPacket<'_>) -> Verdict {
            self.log.lock().expect("log").push(self.tag);
            // Rewrite the TTL in place: stages may modify bytes.
            if let Some(ttl) = packet.bytes_mut().get_mut(8) {
                *ttl = ttl.saturating_sub(1);
            }
            match self.drop {
                Some(r) => Verdict::Drop(r),
                None => Verdict::Pass,
            }
        }
        fn name(&self) -> &'static str {
            "probe"
        }
    }

    fn packet() -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(1, 2);
        let mut v = Vec::new();
        b.write(&mut v, b"x").expect("write");
        v
    }

    fn ctx() -> StageCtx {
        StageCtx {
            now: Instant::now(),
            direction: Direction::AToB,
        }
    }

    #[test]
    fn empty_chain_passes() {
        let mut buf = packet();
        let mut p = IpPacket::parse(&mut buf).expect("valid");
        let mut chain = Chain::empty();
        assert!(chain.is_empty());
        assert_eq!(chain.run(&ctx(), &mut p), Verdict::Pass);
    }

    #[test]
    fn static_composition_runs_in_order_and_stops_at_drop() {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let probe = |tag, drop| Probe {
            tag,
            drop,
            log: log.clone(),
        };
        let mut chain = Chain::new(
            probe(1, None)
                .then(probe(2, Some(DropReason::AclDenied)))
                .then(probe(3, None)),
        );
        let mut buf = packet();
        let mut p = IpPacket::parse(&mut buf).expect("valid");
        assert_eq!(
            chain.run(&ctx(), &mut p),
            Verdict::Drop(DropReason::AclDenied)
        );
        assert_eq!(*log.lock().expect("log"), vec![1, 2]);
        assert_eq!(buf[8], 62, "both stages rewrote the TTL in place");
    }

    #[test]
    fn dynamic_list_runs_in_order() {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stages: Vec<Box<dyn Stage>> = (1..=3)
            .map(|tag| {
                Box::new(Probe {
                    tag,
                    drop: None,
                    log: log.clone(),
                }) as Box<dyn Stage>
            })
            .collect();
        let mut chain = Chain::from_stages(stages);
        assert_eq!(chain.names(), &["probe", "probe", "probe"]);
        let mut buf = packet();
        let mut p = IpPacket::parse(&mut buf).expect("valid");
        assert_eq!(chain.run(&ctx(), &mut p), Verdict::Pass);
        assert_eq!(*log.lock().expect("log"), vec![1, 2, 3]);
        assert!(Chain::from_stages(Vec::new()).is_empty());
    }
}
