//! Fuzzing harness for built-in chains: an arbitrary small [`ChainSpec`]
//! decoded from the input, then arbitrary (or synthesized) packets through
//! it with arbitrary directions and time steps. Used by
//! `fuzz/fuzz_targets/chain.rs` and by a seeded run in this crate's tests.
//!
//! Input format:
//! - byte 0: number of functions (`% 6`), then per function 5 bytes: a kind
//!   (`% 6`: acl, ratelimit, nat44, mirror, counter, fault; bit 7 adds a
//!   selector, valid unless bit 6 is set too) and a 32-bit seed from which
//!   its parameters are drawn (small tables and rings, so "full" paths are
//!   reached);
//! - then packet records `ctl len body[len]`: `ctl` bit 0 is the direction,
//!   bits 1-3 a time step (0, or 10^(k-1) ms), bit 4 synthesizes a
//!   well-formed packet from `body` (family, protocol, addresses from a
//!   small pool, ports, payload) instead of taking `body` as the packet.
//!
//! Checked: no panic; a stage never changes the packet's length; a valid
//! IPv4 header checksum stays valid; a hold is never in the past; the
//! mirror ring never yields more than it was given.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::packet::IpPacket;
use crate::stage::{Direction, StageCtx, Verdict};
use crate::stages::flow::SplitMix64;
use crate::stages::spec::{
    AclAction, AclRule, AclSpec, ChainElement, ChainSpec, FaultSpec, FlowMatch, FunctionSpec,
    MirrorSpec, Nat44Spec, PortRange, Prefix, Proto, RateLimitSpec, StageHandle, build,
};

const V4_POOL: [[u8; 4]; 4] = [[10, 0, 0, 1], [10, 0, 0, 2], [192, 0, 2, 1], [10, 1, 2, 3]];
const PORTS: [u16; 6] = [0, 53, 80, 1024, 5201, 65535];

/// A random rule match from small value pools (so that rules overlap and
/// packets hit them); may be invalid (callers check).
pub(crate) fn random_match(rng: &mut SplitMix64) -> FlowMatch {
    let mut pick = |n: usize| usize::try_from(rng.next_u64() % n as u64).unwrap_or(0);
    let v6 = pick(4) == 0;
    let prefixes: &[&str] = if v6 {
        &["fd00::/8", "fd00::1/128", "::/0"]
    } else {
        &[
            "10.0.0.0/8",
            "10.0.0.0/24",
            "10.0.0.1/32",
            "192.0.2.0/24",
            "0.0.0.0/0",
        ]
    };
    let prefix = |x: usize| prefixes.get(x).and_then(|s| s.parse::<Prefix>().ok());
    let range = |a: usize, b: usize| {
        let (a, b) = (PORTS[a % PORTS.len()], PORTS[b % PORTS.len()]);
        PortRange::new(a.min(b), a.max(b))
    };
    let proto = [
        Proto::Any,
        Proto::Tcp,
        Proto::Udp,
        Proto::Icmp,
        Proto::Icmpv6,
    ][pick(5)];
    FlowMatch {
        proto,
        src: prefix(pick(prefixes.len() * 2)),
        dst: prefix(pick(prefixes.len() * 2)),
        src_ports: (pick(3) == 0).then(|| range(pick(6), pick(6))),
        dst_ports: (pick(2) == 0).then(|| range(pick(6), pick(6))),
        direction: [None, Some(Direction::AToB), Some(Direction::BToA)][pick(3)],
    }
}

fn function(kind: u8, seed: u32) -> FunctionSpec {
    let mut rng = SplitMix64::new(u64::from(seed));
    let mut r = |n: u64| rng.next_u64() % n;
    match kind % 6 {
        0 => {
            let mut rng = SplitMix64::new(u64::from(seed) ^ 0xac1_u64);
            let rules = (0..rng.next_u64() % 8)
                .map(|_| AclRule {
                    action: if rng.next_u64().is_multiple_of(2) {
                        AclAction::Allow
                    } else {
                        AclAction::Deny
                    },
                    matches: random_match(&mut rng),
                })
                .filter(|r| r.matches.check().is_ok())
                .collect();
            FunctionSpec::Acl(AclSpec {
                rules,
                default: if r(2) == 0 {
                    AclAction::Allow
                } else {
                    AclAction::Deny
                },
                stateful: r(4) != 0,
                conntrack_capacity: usize::try_from(1 + r(16)).unwrap_or(1),
                idle_timeout: Duration::from_millis(1 + r(5000)),
            })
        }
        1 => FunctionSpec::RateLimit(RateLimitSpec {
            rate_bps: 1 + r(1_000_000_000),
            burst_bytes: Some(1500 + r(100_000)),
            direction: [None, Some(Direction::AToB), Some(Direction::BToA)]
                [usize::try_from(r(3)).unwrap_or(0)],
        }),
        2 => {
            let lo = PORTS[usize::try_from(r(6)).unwrap_or(0)].max(1);
            let span = u16::try_from(r(8)).unwrap_or(0);
            let mut n = Nat44Spec::new(Ipv4Addr::new(
                192,
                0,
                2,
                1 + u8::try_from(r(2)).unwrap_or(0),
            ));
            n.ports = PortRange::new(lo, lo.saturating_add(span));
            n.outbound = if r(2) == 0 {
                Direction::AToB
            } else {
                Direction::BToA
            };
            n.capacity = usize::try_from(1 + r(16)).unwrap_or(1);
            n.idle_timeout = Duration::from_millis(1 + r(5000));
            FunctionSpec::Nat44(n)
        }
        3 => {
            let mut rng = SplitMix64::new(u64::from(seed) ^ 0x3333);
            let filter = random_match(&mut rng);
            FunctionSpec::Mirror(MirrorSpec {
                filter: if filter.check().is_ok() {
                    filter
                } else {
                    FlowMatch::default()
                },
                snaplen: 1 + u16::try_from(r(200)).unwrap_or(0),
                slots: 1 + usize::try_from(r(4)).unwrap_or(0),
            })
        }
        4 => FunctionSpec::Counter,
        _ => FunctionSpec::Fault(FaultSpec {
            drop_percent: f64::from(u8::try_from(r(101)).unwrap_or(0)),
            corrupt_percent: f64::from(u8::try_from(r(101)).unwrap_or(0)),
            delay: Duration::ZERO,
            direction: None,
            seed: u64::from(seed),
        }),
    }
}

/// Decodes the spec part of an input; returns it and the rest.
pub fn decode_spec(data: &[u8]) -> (ChainSpec, &[u8]) {
    let Some((&n, mut rest)) = data.split_first() else {
        return (ChainSpec::default(), &[]);
    };
    let mut functions = Vec::new();
    for _ in 0..n % 6 {
        let Some((head, tail)) = rest.split_first_chunk::<5>() else {
            break;
        };
        let seed = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        let mut e = ChainElement::from(function(head[0], seed));
        if head[0] & 0x80 != 0 {
            let m = random_match(&mut SplitMix64::new(u64::from(seed) ^ 0x5e1));
            e.selector = (head[0] & 0x40 != 0 || m.check().is_ok()).then_some(m);
        }
        functions.push(e);
        rest = tail;
    }
    (ChainSpec { functions }, rest)
}

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

/// Builds a well-formed packet into `out` from a few control bytes.
fn synthesize(body: &[u8], out: &mut Vec<u8>) {
    let b = |i: usize| body.get(i).copied().unwrap_or(0);
    let v6 = b(0) & 0x80 != 0;
    let (proto, l4): (u8, Vec<u8>) = match b(0) % 5 {
        0 | 1 => {
            let mut l4 = vec![b(3), b(4), b(5), b(6)];
            if b(0) % 5 == 0 {
                l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
                (6, l4)
            } else {
                l4.extend_from_slice(&[
                    0,
                    8 + u8::try_from(body.len().min(200)).unwrap_or(0),
                    0,
                    0,
                ]);
                (17, l4)
            }
        }
        2 | 3 => {
            let ty = match (v6, b(0) % 5 == 2) {
                (false, true) => 8,
                (false, false) => 0,
                (true, true) => 128,
                (true, false) => 129,
            };
            (if v6 { 58 } else { 1 }, vec![ty, 0, 0, 0, b(3), b(4), 0, 1])
        }
        _ => (47, Vec::new()),
    };
    let payload = body.get(7..).unwrap_or(&[]);
    let payload = &payload[..payload.len().min(200)];
    let ulen = l4.len() + payload.len();
    out.clear();
    if v6 {
        let len = u16::try_from(ulen).unwrap_or(0).to_be_bytes();
        out.extend_from_slice(&[0x60, 0, 0, 0, len[0], len[1], proto, 64]);
        for i in [b(1), b(2)] {
            let mut a = [0u8; 16];
            a[0] = 0xfd;
            a[15] = i % 4;
            out.extend_from_slice(&a);
        }
    } else {
        let len = u16::try_from(20 + ulen).unwrap_or(0).to_be_bytes();
        out.extend_from_slice(&[0x45, 0, len[0], len[1], 0, 0, 0x40, 0, 64, proto, 0, 0]);
        out.extend_from_slice(&V4_POOL[usize::from(b(1)) % 4]);
        out.extend_from_slice(&V4_POOL[usize::from(b(2)) % 4]);
        let c = ipv4_checksum(&out[..20]).to_be_bytes();
        out[10..12].copy_from_slice(&c);
    }
    out.extend_from_slice(&l4);
    out.extend_from_slice(payload);
}

/// Runs one fuzz case.
pub fn run(data: &[u8]) {
    let (spec, mut rest) = decode_spec(data);
    let t0 = Instant::now();
    let Ok(mut built) = build(&spec, t0) else {
        return;
    };
    let mut now = t0;
    let mut buf = Vec::with_capacity(512);
    while let [ctl, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (body, next) = tail.split_at(n);
        rest = next;
        let step = (ctl >> 1) & 7;
        if step > 0 {
            now += Duration::from_millis(10u64.pow(u32::from(step - 1)));
        }
        if ctl & 0x10 != 0 {
            synthesize(body, &mut buf);
        } else {
            buf.clear();
            buf.extend_from_slice(body);
        }
        let before_len = buf.len();
        let Ok(mut p) = IpPacket::parse(&mut buf) else {
            continue;
        };
        let ip_len = p.bytes().len();
        let v4_ok = p.meta().header_len >= 20
            && p.bytes().first().is_some_and(|b| b >> 4 == 4)
            && p.bytes()
                .get(..p.meta().header_len)
                .is_some_and(|h| ipv4_checksum(h) == 0);
        let ctx = StageCtx {
            now,
            direction: if ctl & 1 == 0 {
                Direction::AToB
            } else {
                Direction::BToA
            },
        };
        if let Verdict::Hold(t) = built.chain.run(&ctx, &mut p) {
            assert!(t >= now, "a hold in the past");
        }
        assert_eq!(p.bytes().len(), ip_len, "a stage changed the length");
        let header_len = p.meta().header_len;
        assert_eq!(buf.len(), before_len);
        if v4_ok {
            assert_eq!(
                ipv4_checksum(&buf[..header_len]),
                0,
                "a stage broke the IPv4 header checksum"
            );
        }
    }
    let mut out = [0u8; 256];
    for h in &mut built.handles {
        if let StageHandle::Mirror(counters, reader) = h {
            let mut n = 0;
            while let Some(rec) = reader.pop(&mut out) {
                assert!(rec.len <= rec.orig_len && rec.len <= reader.snaplen());
                n += 1;
            }
            assert!(n <= counters.snapshot().copied);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded random run of the harness on every `cargo test`, plus the
    /// checked-in seeds and any saved crash reproducers.
    #[test]
    fn seeded_random_cases_run_clean() {
        let mut rng = SplitMix64::new(1);
        for _ in 0..3000 {
            let len = usize::try_from(rng.next_u64() % 400).unwrap_or(0);
            let mut data: Vec<u8> = (0..len).map(|_| rng.next_u64().to_le_bytes()[0]).collect();
            // Mostly synthesized packets, so that stages see real traffic.
            let mut i = 1 + 5 * usize::from(data.first().copied().unwrap_or(0) % 6);
            while i + 1 < data.len() {
                data[i] |= 0x10 * u8::from(!rng.next_u64().is_multiple_of(8));
                data[i + 1] %= 40;
                i += 2 + usize::from(data[i + 1]);
            }
            run(&data);
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        for dir in ["corpus/chain", "artifacts/chain"] {
            if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
                for e in entries.flatten() {
                    run(&std::fs::read(e.path()).expect("corpus file"));
                }
            }
        }
    }
}
