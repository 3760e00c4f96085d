//! `acl`: ordered allow/deny rules, first match wins, optionally stateful.
//!
//! # Classifier: tuple space search
//! A linear scan costs O(rules) per packet; this one does not. Rules are
//! grouped by *shape*: which of direction and protocol they fix, their
//! source and destination prefix lengths, and whether they name a single
//! destination port. Within a shape, a hash table maps the rule's masked
//! key (direction, protocol, source and destination prefixes, and the
//! destination port for single-port rules) to a bucket of the rules with
//! that key, in rule order, each with its remaining port ranges. This is
//! the tuple space search of Srinivasan et al. (SIGCOMM '99), as in Open
//! vSwitch's classifier, with port ranges checked in the bucket.
//!
//! A lookup masks the packet once per shape, probes that shape's table,
//! and takes the first entry of the bucket whose port ranges match; the
//! answer is the lowest rule index over all shapes. Shapes are sorted by
//! the lowest rule index they hold, so the scan stops as soon as no
//! remaining shape can beat the best match (priority pruning), and a
//! bucket scan stops at the first entry past the best so far.
//!
//! A bucket holds only rules identical in every field but the port ranges,
//! usually one. A bucket of more than 16 indexes its destination port
//! ranges: each range is split into aligned power-of-two blocks (at most
//! 30), kept in a hash table per (block length, block), so a lookup probes
//! at most 17 block lengths; what is left to scan is rules identical down
//! to the destination port block, differing only in source ports.
//!
//! Complexity per packet: O(S) hash probes, S the number of distinct
//! shapes (bounded by the distinct prefix-length pairs in the rule set
//! times 2 for single port or not, times 4 for fixed direction/protocol;
//! not by the number of rules), plus the bucket work above. Memory: O(rules)
//! (times 30 for ranges in big buckets). IPv4 and IPv6 have separate shape
//! lists; rules without prefixes are in both.
//!
//! First-match semantics are exact: a rule matches a packet iff its masked
//! key equals the packet's under the rule's shape and its port ranges
//! contain the packet's ports; the minimum index over all shapes is the
//! first matching rule. The tests check this against a linear scan
//! (`FlowMatch::matches`) on random overlapping rule sets.
//!
//! # State
//! With `stateful`, an allowed packet records its flow (5-tuple, direction)
//! in a fixed-capacity table (`flow::FlowTable`, see `stages/flow.rs`); later packets of
//! that flow, in its direction or as replies (reversed tuple, other
//! direction), pass without classification. Rules are a pure function of
//! the tuple and the direction, so skipping them for the forward direction
//! changes nothing; for replies it is the point. ICMP echo replies match
//! their request by id. There is no TCP state machine: a flow lives until
//! it has been idle for `idle_timeout`. A new flow that finds no slot is
//! dropped ([`DropReason::ConntrackFull`]).
//!
//! Not (yet) handled: IPv4/IPv6 later fragments carry no ports, so they
//! match only rules without port ranges and are not recognised as part of
//! a tracked flow (the data plane never fragments and pods run path MTU
//! discovery, so they are rare); ICMP errors about a tracked flow are not
//! "related" traffic and go through the rules. A rebuilt chain (policy
//! edit) starts with an empty table: an established flow is re-learned
//! from its next packet the rules allow.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Duration;

use crate::counters::Counter;
use crate::drop::DropReason;
use crate::packet::{IpPacket, read_array};
use crate::stage::{Direction, Stage, StageCtx, Verdict};
use crate::stages::flow::{Fields, FlowKey, FlowTable};
use crate::stages::spec::{AclAction, AclSpec, FlowMatch, PortRange, mask128};

// --- classifier ----------------------------------------------------------------

/// FxHash (rustc's): the classifier's keys come from the operator's rules,
/// not from packets, so a fast unkeyed hash is fine here.
#[derive(Clone, Copy, Debug, Default)]
struct Fx(u64);

impl Fx {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for Fx {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut b = [0u8; 8];
            if let Some(dst) = b.get_mut(..c.len()) {
                dst.copy_from_slice(c);
            }
            self.add(u64::from_le_bytes(b));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_u128(&mut self, i: u128) {
        let b = i.to_le_bytes();
        self.add(u64::from_le_bytes(read_array::<8>(&b, 0)));
        self.add(u64::from_le_bytes(read_array::<8>(&b, 8)));
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

/// A packet (or a rule, masked) as the classifier keys it. Source ports
/// are never part of the key, destination ports only for exact-port rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: u128,
    dst: u128,
    dport: u16,
    proto: u8,
    dir: u8,
}

/// Which fields a group of rules constrains, and how much of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shape {
    dir: bool,
    proto: bool,
    src_len: u8,
    dst_len: u8,
    /// The rules name one destination port: it is part of the key.
    dport_exact: bool,
}

/// A rule's port constraints, checked after its key matched.
#[derive(Clone, Copy, Debug)]
struct Entry {
    idx: u32,
    sport: PortRange,
    dport: PortRange,
    /// The rule has a port range: packets without ports never match.
    needs_ports: bool,
}

impl Entry {
    #[inline]
    fn matches(&self, ports: Option<(u16, u16)>) -> bool {
        match ports {
            None => !self.needs_ports,
            Some((s, d)) => {
                self.sport.lo <= s && s <= self.sport.hi && self.dport.lo <= d && d <= self.dport.hi
            }
        }
    }
}

/// Entries that share a key, in rule order.
#[derive(Debug)]
enum Bucket {
    /// Up to [`SCAN_MAX`] entries, scanned in order.
    Scan(Vec<Entry>),
    /// More: entries with a destination port range are indexed by the
    /// aligned port blocks their range splits into (one probe per distinct
    /// block length, at most 17); the others are scanned.
    Blocks {
        other: Vec<Entry>,
        lens: Vec<u8>,
        blocks: FxMap<(u8, u16), Vec<Entry>>,
    },
}

/// Buckets larger than this get a port index.
const SCAN_MAX: usize = 16;

/// First entry (lowest index below `best`) of `list` matching `ports`.
#[inline]
fn scan(list: &[Entry], ports: Option<(u16, u16)>, best: u32) -> Option<u32> {
    for e in list {
        if e.idx >= best {
            return None;
        }
        if e.matches(ports) {
            return Some(e.idx);
        }
    }
    None
}

impl Bucket {
    fn new(entries: Vec<Entry>) -> Bucket {
        if entries.len() <= SCAN_MAX {
            return Bucket::Scan(entries);
        }
        let mut other = Vec::new();
        let mut blocks: FxMap<(u8, u16), Vec<Entry>> = FxMap::default();
        for e in entries {
            if e.dport == PortRange::new(0, u16::MAX) {
                other.push(e);
            } else {
                for (port, len) in port_blocks(e.dport) {
                    blocks.entry((len, port)).or_default().push(e);
                }
            }
        }
        let mut lens: Vec<u8> = blocks.keys().map(|(l, _)| *l).collect();
        lens.sort_unstable();
        lens.dedup();
        Bucket::Blocks {
            other,
            lens,
            blocks,
        }
    }

    #[inline]
    fn first(&self, ports: Option<(u16, u16)>, best: u32) -> Option<u32> {
        match self {
            Bucket::Scan(list) => scan(list, ports, best),
            Bucket::Blocks {
                other,
                lens,
                blocks,
            } => {
                let mut found = scan(other, ports, best);
                let Some((_, dport)) = ports else {
                    return found;
                };
                for &len in lens {
                    if let Some(list) = blocks.get(&(len, dport & mask16(len)))
                        && let Some(i) = scan(list, ports, found.unwrap_or(best))
                    {
                        found = Some(i);
                    }
                }
                found
            }
        }
    }
}

#[derive(Debug)]
struct Tuple {
    mask: Key,
    dport_exact: bool,
    /// Lowest rule index in `map`: the pruning bound.
    min_rule: u32,
    map: FxMap<Key, Bucket>,
}

impl Tuple {
    #[inline]
    fn masked(&self, k: &Key) -> Key {
        Key {
            src: k.src & self.mask.src,
            dst: k.dst & self.mask.dst,
            dport: k.dport & self.mask.dport,
            proto: k.proto & self.mask.proto,
            dir: k.dir & self.mask.dir,
        }
    }
}

fn mask16(len: u8) -> u16 {
    match len {
        0 => 0,
        l if l >= 16 => u16::MAX,
        l => u16::MAX << (16 - u32::from(l)),
    }
}

fn dir_code(d: Direction) -> u8 {
    match d {
        Direction::AToB => 1,
        Direction::BToA => 2,
    }
}

/// A port range as aligned blocks `(first port, prefix length)`, at most 30.
pub(crate) fn port_blocks(r: PortRange) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(r.lo), u32::from(r.hi));
    while lo <= hi {
        // Largest k with lo aligned to 2^k and lo + 2^k - 1 <= hi.
        let mut k = 0u8;
        while k < 16 {
            let next = 1u32 << (k + 1);
            if lo & (next - 1) != 0 || lo + next - 1 > hi {
                break;
            }
            k += 1;
        }
        out.push((u16::try_from(lo).unwrap_or(u16::MAX), 16 - k));
        lo += 1 << k;
    }
    out
}

/// The indexed first-match classifier; see the module doc.
#[derive(Debug, Default)]
pub(crate) struct Classifier {
    v4: Vec<Tuple>,
    v6: Vec<Tuple>,
}

impl Classifier {
    /// Indexes `rules` (control plane; allocates).
    pub(crate) fn new<'a>(rules: impl IntoIterator<Item = &'a FlowMatch>) -> Self {
        type Building = HashMap<Shape, (Key, u32, HashMap<Key, Vec<Entry>>)>;
        let mut v4: Building = HashMap::new();
        let mut v6: Building = HashMap::new();
        let all = PortRange::new(0, u16::MAX);
        for (i, r) in rules.into_iter().enumerate() {
            let Ok(idx) = u32::try_from(i) else { break };
            let dport_exact = r.dst_ports.is_some_and(|p| p.lo == p.hi);
            let entry = Entry {
                idx,
                sport: r.src_ports.unwrap_or(all),
                dport: r.dst_ports.unwrap_or(all),
                needs_ports: r.src_ports.is_some() || r.dst_ports.is_some(),
            };
            let (src, src_len) = r.src.map_or((0, 0), |p| (p.bits(), p.len));
            let (dst, dst_len) = r.dst.map_or((0, 0), |p| (p.bits(), p.len));
            let shape = Shape {
                dir: r.direction.is_some(),
                proto: r.proto.number().is_some(),
                src_len,
                dst_len,
                dport_exact,
            };
            let mask = Key {
                src: mask128(src_len),
                dst: mask128(dst_len),
                dport: if dport_exact { u16::MAX } else { 0 },
                proto: if shape.proto { u8::MAX } else { 0 },
                dir: if shape.dir { u8::MAX } else { 0 },
            };
            let key = Key {
                src: src & mask.src,
                dst: dst & mask.dst,
                dport: entry.dport.lo & mask.dport,
                proto: r.proto.number().unwrap_or(0),
                dir: r.direction.map_or(0, dir_code),
            };
            let family = r.family_v6();
            for (v6_family, shapes) in [(false, &mut v4), (true, &mut v6)] {
                if family.is_some_and(|f| f != v6_family) {
                    continue;
                }
                // Rules come in index order: the first one creates the
                // shape (its lowest index) and lists stay sorted.
                let t = shapes
                    .entry(shape)
                    .or_insert_with(|| (mask, idx, HashMap::new()));
                t.2.entry(key).or_default().push(entry);
            }
        }
        let finish = |m: Building| {
            let mut v: Vec<Tuple> = m
                .into_iter()
                .map(|(shape, (mask, min_rule, map))| Tuple {
                    mask,
                    dport_exact: shape.dport_exact,
                    min_rule,
                    map: map.into_iter().map(|(k, e)| (k, Bucket::new(e))).collect(),
                })
                .collect();
            v.sort_by_key(|t| t.min_rule);
            v
        };
        Classifier {
            v4: finish(v4),
            v6: finish(v6),
        }
    }

    /// Index of the first rule matching the packet.
    #[inline]
    pub(crate) fn lookup(&self, f: &Fields, dir: Direction) -> Option<u32> {
        let tuples = if f.v6 { &self.v6 } else { &self.v4 };
        let key = Key {
            src: f.src,
            dst: f.dst,
            dport: f.ports.map_or(0, |p| p.1),
            proto: f.proto,
            dir: dir_code(dir),
        };
        let mut best = u32::MAX;
        for t in tuples {
            if t.min_rule >= best {
                break;
            }
            if t.dport_exact && f.ports.is_none() {
                continue;
            }
            if let Some(bucket) = t.map.get(&t.masked(&key))
                && let Some(i) = bucket.first(f.ports, best)
            {
                best = i;
            }
        }
        (best != u32::MAX).then_some(best)
    }

    /// Number of shapes (IPv4, IPv6): the per-packet work bound.
    pub(crate) fn shapes(&self) -> (usize, usize) {
        (self.v4.len(), self.v6.len())
    }
}

// --- stage ----------------------------------------------------------------------

#[derive(Debug)]
struct Counters {
    rules: Box<[Counter]>,
    default_hits: Counter,
    allowed: Counter,
    denied: Counter,
    tracked: Counter,
    conntrack_full: Counter,
}

/// How a tracked flow was first seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Flow {
    dir: Direction,
    swapped: bool,
}

/// The `acl` service function.
#[derive(Debug)]
pub struct AclStage {
    classifier: Classifier,
    actions: Box<[AclAction]>,
    default: AclAction,
    conntrack: Option<FlowTable<FlowKey, Flow>>,
    idle: Duration,
    counters: Arc<Counters>,
}

/// Reads an [`AclStage`]'s counters from any thread.
#[derive(Clone, Debug)]
pub struct AclHandle(Arc<Counters>);

/// An ACL's counters, as plain numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AclSnapshot {
    /// Packets classified by each rule (`rule_hits[i]` for `rules[i]`).
    pub rule_hits: Vec<u64>,
    /// Packets that matched no rule.
    pub default_hits: u64,
    /// Packets allowed (by a rule or the default; not counting `tracked`).
    pub allowed: u64,
    /// Packets denied.
    pub denied: u64,
    /// Packets passed as part of a tracked flow (replies included),
    /// without classification.
    pub tracked: u64,
    /// New flows dropped because the flow table was full.
    pub conntrack_full: u64,
}

impl AclHandle {
    /// Reads the counters (allocates the per-rule vector: control plane).
    pub fn snapshot(&self) -> AclSnapshot {
        let c = &self.0;
        AclSnapshot {
            rule_hits: c.rules.iter().map(Counter::get).collect(),
            default_hits: c.default_hits.get(),
            allowed: c.allowed.get(),
            denied: c.denied.get(),
            tracked: c.tracked.get(),
            conntrack_full: c.conntrack_full.get(),
        }
    }
}

impl AclStage {
    /// Builds the stage from a validated spec (indexes, flow table).
    pub(crate) fn new(spec: &AclSpec) -> (Self, AclHandle) {
        let counters = Arc::new(Counters {
            rules: spec.rules.iter().map(|_| Counter::default()).collect(),
            default_hits: Counter::default(),
            allowed: Counter::default(),
            denied: Counter::default(),
            tracked: Counter::default(),
            conntrack_full: Counter::default(),
        });
        let stage = AclStage {
            classifier: Classifier::new(spec.rules.iter().map(|r| &r.matches)),
            actions: spec.rules.iter().map(|r| r.action).collect(),
            default: spec.default,
            conntrack: spec
                .stateful
                .then(|| FlowTable::new(spec.conntrack_capacity)),
            idle: spec.idle_timeout,
            counters: counters.clone(),
        };
        (stage, AclHandle(counters))
    }

    /// Shapes in the classifier (IPv4, IPv6), for status and benches.
    pub fn classifier_shapes(&self) -> (usize, usize) {
        self.classifier.shapes()
    }

    #[inline]
    fn classify(&self, f: &Fields, dir: Direction) -> AclAction {
        let c = &self.counters;
        match self.classifier.lookup(f, dir) {
            Some(i) => {
                let i = usize::try_from(i).unwrap_or(usize::MAX);
                if let Some(n) = c.rules.get(i) {
                    n.inc();
                }
                self.actions.get(i).copied().unwrap_or(self.default)
            }
            None => {
                c.default_hits.inc();
                self.default
            }
        }
    }
}

impl Stage for AclStage {
    #[inline]
    fn process(&mut self, ctx: &StageCtx, packet: &mut IpPacket<'_>) -> Verdict {
        let f = Fields::of(packet);
        self.run(ctx, packet, &f)
    }

    fn name(&self) -> &'static str {
        "acl"
    }
}

impl AclStage {
    /// [`Stage::process`] with the packet's fields already read (a chain
    /// reads them once for all its stages).
    #[inline]
    pub(crate) fn run(&mut self, ctx: &StageCtx, _packet: &IpPacket<'_>, f: &Fields) -> Verdict {
        let f = *f;
        let dir = ctx.direction;
        let tracked = match &mut self.conntrack {
            Some(ct) => {
                let (key, swapped) = FlowKey::of(&f).canonical();
                if let Some(flow) = ct.touch(&key, ctx.now, self.idle) {
                    let forward = flow.dir == dir && flow.swapped == swapped;
                    let reply = flow.dir != dir && flow.swapped != swapped;
                    if forward || reply {
                        self.counters.tracked.inc();
                        return Verdict::Pass;
                    }
                }
                Some((key, Flow { dir, swapped }))
            }
            None => None,
        };
        match self.classify(&f, dir) {
            AclAction::Deny => {
                self.counters.denied.inc();
                Verdict::Drop(DropReason::AclDenied)
            }
            AclAction::Allow => {
                if let (Some(ct), Some((key, flow))) = (&mut self.conntrack, tracked)
                    && ct.insert(key, flow, ctx.now, self.idle).is_err()
                {
                    self.counters.conntrack_full.inc();
                    return Verdict::Drop(DropReason::ConntrackFull);
                }
                self.counters.allowed.inc();
                Verdict::Pass
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::stages::flow::SplitMix64;
    use crate::stages::spec::{AclRule, Prefix, Proto};
    use etherparse::PacketBuilder;
    use std::time::Instant;

    fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 1000);
        let mut v = Vec::new();
        b.write(&mut v, b"data").expect("write");
        v
    }

    fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src, dst, 64).udp(sport, dport);
        let mut v = Vec::new();
        b.write(&mut v, b"data").expect("write");
        v
    }

    fn ping4(src: [u8; 4], dst: [u8; 4], id: u16, request: bool) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src, dst, 64);
        let b = if request {
            b.icmpv4_echo_request(id, 1)
        } else {
            b.icmpv4_echo_reply(id, 1)
        };
        let mut v = Vec::new();
        b.write(&mut v, b"ping").expect("write");
        v
    }

    fn run(stage: &mut AclStage, now: Instant, dir: Direction, mut pkt: Vec<u8>) -> Verdict {
        let mut p = IpPacket::parse(&mut pkt).expect("valid");
        stage.process(
            &StageCtx {
                now,
                direction: dir,
            },
            &mut p,
        )
    }

    fn rule(action: AclAction, m: FlowMatch) -> AclRule {
        AclRule { action, matches: m }
    }

    fn pfx(s: &str) -> Option<Prefix> {
        Some(s.parse().expect("prefix"))
    }

    #[test]
    fn port_blocks_cover_exactly() {
        for (lo, hi) in [(0, 65535), (1, 65535), (80, 80), (1000, 2000), (5, 6)] {
            let blocks = port_blocks(PortRange::new(lo, hi));
            assert!(blocks.len() <= 30, "{lo}-{hi}: {}", blocks.len());
            let mut covered = 0u32;
            for (start, len) in &blocks {
                let size = 1u32 << (16 - len);
                assert_eq!(u32::from(*start) % size, 0);
                covered += size;
            }
            assert_eq!(covered, u32::from(hi) - u32::from(lo) + 1);
        }
        assert_eq!(port_blocks(PortRange::new(0, 65535)), vec![(0, 0)]);
    }

    #[test]
    fn first_match_wins_with_overlaps() {
        let spec = AclSpec {
            rules: vec![
                // 0: deny 10.0.0.66 to port 80 specifically.
                rule(
                    AclAction::Deny,
                    FlowMatch {
                        proto: Proto::Tcp,
                        src: pfx("10.0.0.66/32"),
                        dst_ports: Some(PortRange::single(80)),
                        ..FlowMatch::default()
                    },
                ),
                // 1: allow 10.0.0.0/24 to ports 1-1024 (overlaps rule 0).
                rule(
                    AclAction::Allow,
                    FlowMatch {
                        proto: Proto::Tcp,
                        src: pfx("10.0.0.0/24"),
                        dst_ports: Some(PortRange::new(1, 1024)),
                        ..FlowMatch::default()
                    },
                ),
                // 2: deny all of 10/8 (overlaps rule 1).
                rule(
                    AclAction::Deny,
                    FlowMatch {
                        src: pfx("10.0.0.0/8"),
                        ..FlowMatch::default()
                    },
                ),
                // 3: allow icmp.
                rule(
                    AclAction::Allow,
                    FlowMatch {
                        proto: Proto::Icmp,
                        ..FlowMatch::default()
                    },
                ),
            ],
            default: AclAction::Allow,
            stateful: false,
            ..AclSpec::default()
        };
        let (mut acl, h) = AclStage::new(&spec);
        let now = Instant::now();
        let d = Direction::AToB;
        let deny = Verdict::Drop(DropReason::AclDenied);
        assert_eq!(
            run(&mut acl, now, d, tcp4([10, 0, 0, 66], [1; 4], 5, 80)),
            deny
        );
        assert_eq!(
            run(&mut acl, now, d, tcp4([10, 0, 0, 66], [1; 4], 5, 443)),
            Verdict::Pass
        );
        assert_eq!(
            run(&mut acl, now, d, tcp4([10, 0, 0, 1], [1; 4], 5, 80)),
            Verdict::Pass
        );
        assert_eq!(
            run(&mut acl, now, d, tcp4([10, 0, 0, 1], [1; 4], 5, 2000)),
            deny
        );
        assert_eq!(
            run(&mut acl, now, d, udp4([10, 0, 0, 1], [1; 4], 5, 80)),
            deny
        );
        // Rule 2 comes before the icmp allow.
        assert_eq!(
            run(&mut acl, now, d, ping4([10, 1, 0, 1], [1; 4], 1, true)),
            deny
        );
        assert_eq!(
            run(&mut acl, now, d, ping4([11, 1, 0, 1], [1; 4], 1, true)),
            Verdict::Pass
        );
        assert_eq!(
            run(&mut acl, now, d, udp4([11, 1, 0, 1], [1; 4], 5, 80)),
            Verdict::Pass
        );
        let s = h.snapshot();
        assert_eq!(s.rule_hits, vec![1, 2, 3, 1]);
        assert_eq!(s.default_hits, 1);
        assert_eq!((s.allowed, s.denied), (4, 4));
    }

    fn web_guard(stateful: bool, capacity: usize) -> AclSpec {
        AclSpec {
            rules: vec![
                rule(
                    AclAction::Allow,
                    FlowMatch {
                        proto: Proto::Icmp,
                        direction: Some(Direction::AToB),
                        ..FlowMatch::default()
                    },
                ),
                rule(
                    AclAction::Allow,
                    FlowMatch {
                        proto: Proto::Tcp,
                        dst_ports: Some(PortRange::single(5201)),
                        direction: Some(Direction::AToB),
                        ..FlowMatch::default()
                    },
                ),
            ],
            default: AclAction::Deny,
            stateful,
            conntrack_capacity: capacity,
            idle_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn stateful_return_traffic_passes_and_expires() {
        let (mut acl, h) = AclStage::new(&web_guard(true, 1024));
        let t0 = Instant::now();
        let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        let deny = Verdict::Drop(DropReason::AclDenied);
        // Reply before any request: denied.
        assert_eq!(
            run(&mut acl, t0, Direction::BToA, tcp4(b, a, 5201, 40000)),
            deny
        );
        assert_eq!(
            run(&mut acl, t0, Direction::AToB, tcp4(a, b, 40000, 5201)),
            Verdict::Pass
        );
        assert_eq!(
            run(&mut acl, t0, Direction::BToA, tcp4(b, a, 5201, 40000)),
            Verdict::Pass
        );
        // Another port pair is not the same flow.
        assert_eq!(
            run(&mut acl, t0, Direction::BToA, tcp4(b, a, 5201, 40001)),
            deny
        );
        // Same tuple reversed but in the request's direction: not a reply.
        assert_eq!(
            run(&mut acl, t0, Direction::AToB, tcp4(b, a, 5201, 40000)),
            deny
        );
        // B cannot open connections to A.
        assert_eq!(
            run(&mut acl, t0, Direction::BToA, tcp4(b, a, 40000, 5201)),
            deny
        );
        // ICMP echo: reply matched by id.
        assert_eq!(
            run(&mut acl, t0, Direction::AToB, ping4(a, b, 7, true)),
            Verdict::Pass
        );
        assert_eq!(
            run(&mut acl, t0, Direction::BToA, ping4(b, a, 7, false)),
            Verdict::Pass
        );
        assert_eq!(
            run(&mut acl, t0, Direction::BToA, ping4(b, a, 8, false)),
            deny
        );
        // Idle for longer than the timeout: forgotten.
        let later = t0 + Duration::from_secs(31);
        assert_eq!(
            run(&mut acl, later, Direction::BToA, tcp4(b, a, 5201, 40000)),
            deny
        );
        let s = h.snapshot();
        assert_eq!(s.tracked, 2);
        assert_eq!(s.allowed, 2);
        assert_eq!(s.denied, 6);

        // Stateless: no reply passes.
        let (mut acl, _) = AclStage::new(&web_guard(false, 1));
        assert_eq!(
            run(&mut acl, t0, Direction::AToB, tcp4(a, b, 40000, 5201)),
            Verdict::Pass
        );
        assert_eq!(
            run(&mut acl, t0, Direction::BToA, tcp4(b, a, 5201, 40000)),
            deny
        );
    }

    #[test]
    fn conntrack_full_drops_new_flows_only() {
        let (mut acl, h) = AclStage::new(&web_guard(true, 4));
        let t0 = Instant::now();
        let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        for port in 0..4 {
            assert_eq!(
                run(&mut acl, t0, Direction::AToB, tcp4(a, b, 1000 + port, 5201)),
                Verdict::Pass
            );
        }
        assert_eq!(
            run(&mut acl, t0, Direction::AToB, tcp4(a, b, 2000, 5201)),
            Verdict::Drop(DropReason::ConntrackFull)
        );
        // Existing flows still pass both ways.
        assert_eq!(
            run(&mut acl, t0, Direction::BToA, tcp4(b, a, 5201, 1003)),
            Verdict::Pass
        );
        // Once they expire there is room again.
        let later = t0 + Duration::from_secs(31);
        assert_eq!(
            run(&mut acl, later, Direction::AToB, tcp4(a, b, 2000, 5201)),
            Verdict::Pass
        );
        assert_eq!(h.snapshot().conntrack_full, 1);
    }

    /// Random rules drawn from small value pools (so that rules overlap and
    /// packets hit them, see `fuzz_chain::random_match`); the indexed
    /// classifier must agree with a linear first-match scan on every packet.
    #[test]
    fn indexed_classifier_equals_linear_scan() {
        let mut rng = SplitMix64::new(42);
        let ports = [0u16, 1, 52, 53, 54, 80, 1023, 1024, 5201, 65534, 65535];
        let v4 = [
            "10.0.0.1",
            "10.0.0.2",
            "10.0.1.1",
            "10.9.9.9",
            "192.0.2.1",
            "8.8.8.8",
        ];
        let v6 = ["fd00::1", "fd00::2", "fd01::1", "2001:db8::1"];
        let (mut total, mut hits, mut deep) = (0, 0, 0);
        for round in 0..30 {
            let n = [10, 100, 1000][round % 3];
            let rules: Vec<FlowMatch> = (0..n)
                .map(|_| crate::stages::fuzz_chain::random_match(&mut rng))
                .filter(|m| m.check().is_ok())
                .collect();
            let cls = Classifier::new(rules.iter());
            for _ in 0..3000 {
                let mut pick = |n: usize| (rng.next_u64() % n as u64) as usize;
                let is_v6 = pick(3) == 0;
                let mut addr = || -> u128 {
                    if is_v6 {
                        let a: std::net::Ipv6Addr = v6[pick(v6.len())].parse().expect("a");
                        a.into()
                    } else {
                        let a: std::net::Ipv4Addr = v4[pick(v4.len())].parse().expect("a");
                        u128::from(u32::from(a)) << 96
                    }
                };
                let (src, dst) = (addr(), addr());
                let proto = [1u8, 6, 17, 58, 47][pick(5)];
                let has_ports = matches!(proto, 6 | 17) && pick(8) != 0;
                let ports = has_ports.then(|| (ports[pick(ports.len())], ports[pick(ports.len())]));
                let f = Fields {
                    v6: is_v6,
                    proto,
                    src,
                    dst,
                    ports,
                    flow_ports: (0, 0),
                    echo: None,
                };
                let dir = if pick(2) == 0 {
                    Direction::AToB
                } else {
                    Direction::BToA
                };
                let linear = rules.iter().position(|r| r.matches(&f, dir));
                let indexed = cls.lookup(&f, dir).map(|i| i as usize);
                assert_eq!(indexed, linear, "round {round}: {f:?} {dir:?}");
                total += 1;
                hits += usize::from(linear.is_some());
                deep += usize::from(linear.is_some_and(|i| i >= 3));
            }
        }
        // The pools make the test meaningful: most packets match, many not
        // on one of the first rules.
        assert!(
            hits * 2 > total && deep * 5 > total,
            "{hits} {deep} of {total}"
        );
    }
}
