//! The neighbour table (IP address to MAC address) of the UDP underlay:
//! ARP for IPv4, NDP for IPv6, with the states of RFC 4861 7.3.2 reduced to
//! what one flat L2 segment needs.
//!
//! Generic over the queued item so the logic is tested without DPDK; the
//! underlay queues mbuf pointers. It never frees items itself: every item
//! it gives up is handed back through a callback.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::stats::TxDrop;

/// Most datagrams one unresolved neighbour can hold back.
pub(crate) const MAX_QUEUE: usize = 16;

/// Timers and limits of the table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    /// How long a MAC learnt from ARP/NDP is trusted without re-checking.
    pub(crate) reachable: Duration,
    /// Time between two requests for the same address.
    pub(crate) retransmit: Duration,
    /// Requests sent before giving up on an address.
    pub(crate) max_probes: u8,
    /// Datagrams queued per unresolved neighbour (at most [`MAX_QUEUE`]).
    pub(crate) queue: usize,
    /// Entries at most.
    pub(crate) max_entries: usize,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Requests sent (`probes`), no answer yet; the next one is due at `next`.
    Incomplete { probes: u8, next: Instant },
    /// Known MAC, confirmed at `confirmed`. Past `reachable` it is still used
    /// while up to `max_probes` unicast requests (`probes`) re-check it.
    Reachable {
        mac: [u8; 6],
        confirmed: Instant,
        probes: u8,
        next: Instant,
    },
    /// Set by the application; never expires.
    Static { mac: [u8; 6] },
    /// Resolution failed; datagrams are dropped until `until`, then a new
    /// resolution may start.
    Failed { until: Instant },
}

#[derive(Debug)]
struct Entry<P> {
    state: State,
    queue: [Option<P>; MAX_QUEUE],
    queued: usize,
}

impl<P: Copy> Entry<P> {
    fn new(state: State) -> Self {
        Entry {
            state,
            queue: [None; MAX_QUEUE],
            queued: 0,
        }
    }

    fn drain(&mut self, mut f: impl FnMut(P)) {
        for slot in &mut self.queue[..self.queued] {
            if let Some(p) = slot.take() {
                f(p);
            }
        }
        self.queued = 0;
    }
}

/// A request to send: an ARP request or neighbour solicitation for `ip`,
/// to `unicast` when re-checking a known MAC, broadcast/multicast otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Probe {
    pub(crate) ip: IpAddr,
    pub(crate) unicast: Option<[u8; 6]>,
}

/// What to do with an item handed to [`Neighbors::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolve {
    /// Send it to this MAC now (the table did not keep it).
    Send([u8; 6]),
    /// The table keeps it until the address resolves or fails.
    Queued,
    /// Not kept: drop it for this reason.
    Drop(TxDrop),
}

/// The table. Bounded: at most `max_entries` entries, each with a fixed
/// queue, and the map's capacity is reserved up front so inserting never
/// allocates (see [`Neighbors::new`]).
#[derive(Debug)]
pub(crate) struct Neighbors<P> {
    map: HashMap<IpAddr, Entry<P>>,
    cfg: Config,
}

impl<P: Copy> Neighbors<P> {
    pub(crate) fn new(mut cfg: Config) -> Self {
        cfg.queue = cfg.queue.min(MAX_QUEUE);
        cfg.max_entries = cfg.max_entries.max(1);
        // Twice the entries: std's HashMap (hashbrown) then never needs to
        // grow, since removals leave tombstones that an in-place rehash
        // clears while at most half the buckets are in use. SipHash, because
        // the addresses learnt from ARP requests are chosen by others.
        Neighbors {
            map: HashMap::with_capacity(cfg.max_entries.saturating_mul(2)),
            cfg,
        }
    }

    /// The MAC to use for `ip` now, if known.
    pub(crate) fn lookup(&self, ip: IpAddr) -> Option<[u8; 6]> {
        match self.map.get(&ip)?.state {
            State::Reachable { mac, .. } | State::Static { mac } => Some(mac),
            State::Incomplete { .. } | State::Failed { .. } => None,
        }
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Finds the MAC for a datagram to `ip`, or queues `item` while asking.
    /// `probe` is called when a request must go out.
    pub(crate) fn resolve(
        &mut self,
        ip: IpAddr,
        item: P,
        now: Instant,
        mut probe: impl FnMut(Probe),
    ) -> Resolve {
        let cfg = self.cfg;
        if !self.map.contains_key(&ip) {
            if self.map.len() >= cfg.max_entries && !self.evict_one(now) {
                return Resolve::Drop(TxDrop::NeighborTableFull);
            }
            let mut e = Entry::new(State::Incomplete {
                probes: 1,
                next: now + cfg.retransmit,
            });
            let res = enqueue(&mut e, item, cfg.queue);
            self.map.insert(ip, e);
            probe(Probe { ip, unicast: None });
            return res;
        }
        let Some(e) = self.map.get_mut(&ip) else {
            return Resolve::Drop(TxDrop::Unresolved);
        };
        match e.state {
            State::Static { mac } => Resolve::Send(mac),
            State::Reachable {
                mac,
                confirmed,
                probes,
                ..
            } => {
                if probes == 0 && now.saturating_duration_since(confirmed) > cfg.reachable {
                    // Stale: keep using it while a unicast request checks it
                    // (the kernel's DELAY/PROBE states, without the delay).
                    e.state = State::Reachable {
                        mac,
                        confirmed,
                        probes: 1,
                        next: now + cfg.retransmit,
                    };
                    probe(Probe {
                        ip,
                        unicast: Some(mac),
                    });
                }
                Resolve::Send(mac)
            }
            State::Incomplete { .. } => enqueue(e, item, cfg.queue),
            State::Failed { until } => {
                if now < until {
                    return Resolve::Drop(TxDrop::Unresolved);
                }
                e.state = State::Incomplete {
                    probes: 1,
                    next: now + cfg.retransmit,
                };
                let res = enqueue(e, item, cfg.queue);
                probe(Probe { ip, unicast: None });
                res
            }
        }
    }

    /// Records that `ip` is at `mac` (an ARP packet or NDP message from or
    /// about it). `create`: add an entry if there is none (a request
    /// addressed to us, or a reply); otherwise only known entries are
    /// updated. Queued items come back through `send` with the MAC.
    pub(crate) fn learn(
        &mut self,
        ip: IpAddr,
        mac: [u8; 6],
        now: Instant,
        create: bool,
        mut send: impl FnMut(P, [u8; 6]),
    ) {
        if !self.map.contains_key(&ip) {
            if !create || (self.map.len() >= self.cfg.max_entries && !self.evict_one(now)) {
                return;
            }
            self.map.insert(ip, Entry::new(reachable(mac, now)));
            return;
        }
        let Some(e) = self.map.get_mut(&ip) else {
            return;
        };
        if matches!(e.state, State::Static { .. }) {
            return;
        }
        e.state = reachable(mac, now);
        e.drain(|p| send(p, mac));
    }

    /// Sets a permanent entry; queued items go out through `send`.
    pub(crate) fn set_static(
        &mut self,
        ip: IpAddr,
        mac: [u8; 6],
        mut send: impl FnMut(P, [u8; 6]),
    ) -> Result<(), TxDrop> {
        if let Some(e) = self.map.get_mut(&ip) {
            e.state = State::Static { mac };
            e.drain(|p| send(p, mac));
            return Ok(());
        }
        if self.map.len() >= self.cfg.max_entries && !self.evict_one(Instant::now()) {
            return Err(TxDrop::NeighborTableFull);
        }
        self.map.insert(ip, Entry::new(State::Static { mac }));
        Ok(())
    }

    /// Removes the entry of `ip`; its queued items go to `drop`.
    pub(crate) fn remove(&mut self, ip: IpAddr, drop: impl FnMut(P)) -> bool {
        match self.map.remove(&ip) {
            Some(mut e) => {
                e.drain(drop);
                true
            }
            None => false,
        }
    }

    /// Removes every entry; queued items go to `drop`.
    pub(crate) fn clear(&mut self, mut drop: impl FnMut(P)) {
        for (_, e) in self.map.iter_mut() {
            e.drain(&mut drop);
        }
        self.map.clear();
    }

    /// Runs the timers: retransmits requests (`probe`), gives up on
    /// addresses that stay silent (their queued items go to `drop`) and
    /// forgets stale or failed entries.
    pub(crate) fn tick(
        &mut self,
        now: Instant,
        mut probe: impl FnMut(Probe),
        mut drop: impl FnMut(P),
    ) {
        let cfg = self.cfg;
        self.map.retain(|&ip, e| match e.state {
            State::Static { .. } => true,
            State::Incomplete { probes, next } => {
                if now < next {
                    return true;
                }
                if probes < cfg.max_probes {
                    e.state = State::Incomplete {
                        probes: probes + 1,
                        next: now + cfg.retransmit,
                    };
                    probe(Probe { ip, unicast: None });
                } else {
                    e.drain(&mut drop);
                    e.state = State::Failed {
                        until: now + cfg.retransmit,
                    };
                }
                true
            }
            State::Reachable {
                mac,
                confirmed,
                probes,
                next,
            } => {
                if probes == 0 || now < next {
                    return true;
                }
                if probes < cfg.max_probes {
                    e.state = State::Reachable {
                        mac,
                        confirmed,
                        probes: probes + 1,
                        next: now + cfg.retransmit,
                    };
                    probe(Probe {
                        ip,
                        unicast: Some(mac),
                    });
                    true
                } else {
                    // No answer to any re-check: forget it; the next
                    // datagram starts a new resolution.
                    false
                }
            }
            // Kept a while so a burst towards a dead address is dropped
            // without a request per datagram; then forgotten.
            State::Failed { until } => now < until + cfg.reachable,
        });
    }

    /// Makes room for one entry: a failed one, else the stalest reachable
    /// one past its reachable time. Fresh, static and pending entries stay,
    /// so a flood of ARP requests cannot push out neighbours in use.
    fn evict_one(&mut self, now: Instant) -> bool {
        let reachable_for = self.cfg.reachable;
        let mut victim: Option<(IpAddr, Option<Instant>)> = None;
        for (&ip, e) in &self.map {
            match e.state {
                State::Failed { .. } => {
                    victim = Some((ip, None));
                    break;
                }
                State::Reachable { confirmed, .. }
                    if now.saturating_duration_since(confirmed) > reachable_for
                        && victim.is_none_or(|(_, t)| t.is_some_and(|t| confirmed < t)) =>
                {
                    victim = Some((ip, Some(confirmed)));
                }
                _ => {}
            }
        }
        match victim {
            Some((ip, _)) => {
                // Failed entries have drained queues, reachable ones never
                // queue: nothing is lost.
                self.map.remove(&ip);
                true
            }
            None => false,
        }
    }
}

fn reachable(mac: [u8; 6], now: Instant) -> State {
    State::Reachable {
        mac,
        confirmed: now,
        probes: 0,
        next: now,
    }
}

fn enqueue<P: Copy>(e: &mut Entry<P>, item: P, limit: usize) -> Resolve {
    if e.queued >= limit {
        return Resolve::Drop(TxDrop::Unresolved);
    }
    e.queue[e.queued] = Some(item);
    e.queued += 1;
    Resolve::Queued
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];

    fn cfg() -> Config {
        Config {
            reachable: Duration::from_secs(30),
            retransmit: Duration::from_secs(1),
            max_probes: 3,
            queue: 2,
            max_entries: 2,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn queues_until_learnt_then_sends() {
        let mut t = Neighbors::<u32>::new(cfg());
        let now = Instant::now();
        let mut probes = Vec::new();
        assert_eq!(
            t.resolve(ip("198.51.100.1"), 1, now, |p| probes.push(p)),
            Resolve::Queued
        );
        assert_eq!(
            t.resolve(ip("198.51.100.1"), 2, now, |p| probes.push(p)),
            Resolve::Queued
        );
        assert_eq!(
            t.resolve(ip("198.51.100.1"), 3, now, |p| probes.push(p)),
            Resolve::Drop(TxDrop::Unresolved)
        );
        assert_eq!(
            probes,
            vec![Probe {
                ip: ip("198.51.100.1"),
                unicast: None
            }]
        );
        let mut sent = Vec::new();
        t.learn(ip("198.51.100.1"), MAC, now, false, |p, m| {
            sent.push((p, m))
        });
        assert_eq!(sent, vec![(1, MAC), (2, MAC)]);
        assert_eq!(
            t.resolve(ip("198.51.100.1"), 4, now, |_| panic!()),
            Resolve::Send(MAC)
        );
    }

    #[test]
    fn retransmits_then_fails_and_drops_the_queue() {
        let mut t = Neighbors::<u32>::new(cfg());
        let t0 = Instant::now();
        let mut probes = 0;
        t.resolve(ip("fd00::1"), 7, t0, |_| probes += 1);
        let mut dropped = Vec::new();
        for s in 1..=3 {
            t.tick(
                t0 + Duration::from_secs(s),
                |_| probes += 1,
                |p| dropped.push(p),
            );
        }
        assert_eq!(probes, 3);
        assert_eq!(dropped, vec![7]);
        // Failed: dropped at once, no new request.
        assert_eq!(
            t.resolve(ip("fd00::1"), 8, t0 + Duration::from_secs(3), |_| panic!()),
            Resolve::Drop(TxDrop::Unresolved)
        );
        // After the hold time a new resolution starts.
        assert_eq!(
            t.resolve(ip("fd00::1"), 9, t0 + Duration::from_secs(5), |_| probes +=
                1),
            Resolve::Queued
        );
        assert_eq!(probes, 4);
    }

    #[test]
    fn stale_entries_are_rechecked_and_forgotten_when_silent() {
        let mut t = Neighbors::<u32>::new(cfg());
        let t0 = Instant::now();
        t.learn(ip("198.51.100.1"), MAC, t0, true, |_, _| {});
        let later = t0 + Duration::from_secs(31);
        let mut probes = Vec::new();
        assert_eq!(
            t.resolve(ip("198.51.100.1"), 1, later, |p| probes.push(p)),
            Resolve::Send(MAC)
        );
        assert_eq!(probes[0].unicast, Some(MAC));
        for s in 1..=3 {
            t.tick(later + Duration::from_secs(s), |p| probes.push(p), |_| {});
        }
        assert_eq!(probes.len(), 3);
        assert_eq!(t.lookup(ip("198.51.100.1")), None);
        // An answer in time keeps it.
        t.learn(ip("198.51.100.1"), MAC, later, true, |_, _| {});
        assert_eq!(t.lookup(ip("198.51.100.1")), Some(MAC));
    }

    #[test]
    fn bounded_and_fresh_entries_are_not_evicted() {
        let mut t = Neighbors::<u32>::new(cfg());
        let t0 = Instant::now();
        t.learn(ip("198.51.100.1"), MAC, t0, true, |_, _| {});
        t.set_static(ip("198.51.100.2"), MAC, |_, _| {}).unwrap();
        // Full of fresh/static entries: a new request is refused, a learnt
        // address is ignored.
        assert_eq!(
            t.resolve(ip("198.51.100.3"), 1, t0, |_| {}),
            Resolve::Drop(TxDrop::NeighborTableFull)
        );
        t.learn(ip("198.51.100.4"), MAC, t0, true, |_, _| {});
        assert_eq!(t.len(), 2);
        // Once the learnt one is stale it can make room.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            t.resolve(ip("198.51.100.3"), 1, later, |_| {}),
            Resolve::Queued
        );
        assert_eq!(t.lookup(ip("198.51.100.1")), None);
        assert_eq!(t.lookup(ip("198.51.100.2")), Some(MAC));
    }

    #[test]
    fn learning_without_create_only_updates() {
        let mut t = Neighbors::<u32>::new(cfg());
        t.learn(ip("198.51.100.1"), MAC, Instant::now(), false, |_, _| {});
        assert_eq!(t.len(), 0);
    }
}
