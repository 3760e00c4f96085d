//! Per-packet cost of built-in service chains:
//! - `chain/{64,1420}`: a 3-function chain, `acl` (stateful, the issue's
//!   web-guard rules; an established flow) + `ratelimit` (a rate the flow
//!   stays under) + `counter`, run on a classified packet in place;
//! - `acl/{10,1000,10000}`: a stateless `acl` classifying a mix of 1,024
//!   packets against that many rules (prefixes, exact ports, port ranges;
//!   some packets match late rules, some none). With a linear scan the cost
//!   would grow 1,000x from 10 to 10,000 rules; the classifier's cost
//!   depends on the number of rule shapes instead.
//!
//! Throughput is in packets (`Elements`).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nsm_dataplane::stages::{
    AclAction, AclRule, AclSpec, ChainSpec, FlowMatch, FunctionSpec, PortRange, Prefix, Proto,
    RateLimitSpec, build,
};
use nsm_dataplane::{Direction, IpPacket, StageCtx, Verdict};

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, len: usize) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 65535);
    let mut v = Vec::with_capacity(len);
    b.write(&mut v, &vec![0xa5; len.saturating_sub(40)])
        .expect("build packet");
    v
}

/// xorshift64*: deterministic rule sets and traffic.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }
    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

fn rules(n: usize, rng: &mut Rng) -> Vec<AclRule> {
    (0..n)
        .map(|_| {
            let dst = if rng.below(2) == 0 {
                Prefix::new(
                    IpAddr::V4(Ipv4Addr::new(10, rng.byte() % 16, rng.byte(), 0)),
                    24,
                )
            } else {
                Prefix::new(
                    IpAddr::V4(Ipv4Addr::new(10, rng.byte() % 16, rng.byte(), rng.byte())),
                    32,
                )
            };
            let src = match rng.below(4) {
                0 => None,
                1 => Some(Prefix::new(IpAddr::V4(Ipv4Addr::new(172, 16, 0, 0)), 12)),
                2 => Some(Prefix::new(
                    IpAddr::V4(Ipv4Addr::new(192, 168, rng.byte(), 0)),
                    24,
                )),
                _ => Some(Prefix::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8)),
            };
            let port = 1 + (rng.next() % 60000) as u16;
            let dst_ports = match rng.below(3) {
                0 => Some(PortRange::single(port)),
                1 => Some(PortRange::new(port, port.saturating_add(100))),
                _ => None,
            };
            AclRule {
                action: if rng.below(3) == 0 {
                    AclAction::Deny
                } else {
                    AclAction::Allow
                },
                matches: FlowMatch {
                    proto: if rng.below(2) == 0 {
                        Proto::Tcp
                    } else {
                        Proto::Udp
                    },
                    src,
                    dst: Some(dst),
                    src_ports: None,
                    dst_ports,
                    direction: None,
                },
            }
        })
        .collect()
}

fn chain(c: &mut Criterion) {
    let rule = |proto, dst_ports| AclRule {
        action: AclAction::Allow,
        matches: FlowMatch {
            proto,
            dst_ports,
            ..FlowMatch::default()
        },
    };
    let spec = ChainSpec::from(vec![
        FunctionSpec::Acl(AclSpec {
            rules: vec![
                rule(Proto::Icmp, None),
                rule(Proto::Tcp, Some(PortRange::single(5201))),
            ],
            ..AclSpec::default()
        }),
        FunctionSpec::RateLimit(RateLimitSpec {
            rate_bps: 400_000_000_000,
            burst_bytes: None,
            direction: None,
        }),
        FunctionSpec::Counter,
    ]);
    // The same with a selector on every function (all matching): the
    // packet's fields are read once for the selectors and the acl.
    let tcp_5201 = FlowMatch {
        proto: Proto::Tcp,
        dst_ports: Some(PortRange::single(5201)),
        ..FlowMatch::default()
    };
    let selected = ChainSpec {
        functions: spec
            .functions
            .iter()
            .map(|e| e.function.clone().when(tcp_5201.clone()))
            .collect(),
    };
    let mut group = c.benchmark_group("chain");
    group.throughput(Throughput::Elements(1));
    for (name, spec, size) in [
        ("acl+ratelimit+counter", &spec, 64usize),
        ("acl+ratelimit+counter", &spec, 1420),
        ("selected acl+ratelimit+counter", &selected, 64),
    ] {
        let t0 = Instant::now();
        let mut built = build(spec, t0).expect("valid spec");
        let mut buf = tcp([10, 0, 0, 1], [10, 0, 0, 2], 40000, 5201, size);
        let mut p = IpPacket::parse(&mut buf).expect("valid packet");
        let mut tick = 0u64;
        group.bench_function(format!("{name}/{size}"), |b| {
            b.iter(|| {
                tick += 1;
                let ctx = StageCtx {
                    now: t0 + Duration::from_nanos(tick * 100),
                    direction: Direction::AToB,
                };
                let v = built.chain.run(&ctx, black_box(&mut p));
                assert_eq!(v, Verdict::Pass);
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("acl");
    group.throughput(Throughput::Elements(1));
    for n in [10usize, 1_000, 10_000] {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64);
        let rules = rules(n, &mut rng);
        // Traffic aimed at the rules' space: a third at a rule's exact
        // destination, the rest random within it (mostly the default).
        let mut bufs: Vec<Vec<u8>> = (0..1024)
            .map(|_| {
                let dst = match &rules[rng.below(n)].matches.dst {
                    Some(p) if rng.below(3) == 0 => match p.addr {
                        IpAddr::V4(a) => a.octets(),
                        IpAddr::V6(_) => unreachable!(),
                    },
                    _ => [10, rng.byte() % 16, rng.byte(), rng.byte()],
                };
                let src = [
                    [172, 16, 1, 1],
                    [192, 168, 1, 1],
                    [10, 1, 1, 1],
                    [203, 0, 113, 1],
                ][rng.below(4)];
                tcp(src, dst, 40000, 1 + (rng.next() % 60000) as u16, 64)
            })
            .collect();
        let spec = ChainSpec::from(vec![FunctionSpec::Acl(AclSpec {
            rules,
            default: AclAction::Deny,
            stateful: false,
            ..AclSpec::default()
        })]);
        let t0 = Instant::now();
        let mut built = build(&spec, t0).expect("valid spec");
        let mut pkts: Vec<IpPacket<'_>> = bufs
            .iter_mut()
            .map(|b| IpPacket::parse(b).expect("valid packet"))
            .collect();
        let ctx = StageCtx {
            now: t0,
            direction: Direction::AToB,
        };
        let mut i = 0usize;
        group.bench_function(format!("classify/{n}"), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                let _ = black_box(built.chain.run(&ctx, black_box(&mut pkts[i])));
            })
        });
    }
    group.finish();
}

criterion_group!(benches, chain);
criterion_main!(benches);
