//! Proves that built-in chains allocate nothing per packet: a counting
//! global allocator watches packets go through `acl` (stateful, with new
//! flows being tracked) + `ratelimit` + `counter`, and `nat44` (new
//! mappings) + `mirror` (ring filling up, drained) + `fault`, installed on a
//! same-node cross-connect with `set_chain`.
//!
//! The counting allocator is `tests/common`; it counts per thread, inside
//! `count` only.

use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use nsm_dataplane::stages::{
    AclAction, AclRule, AclSpec, ChainSpec, FaultSpec, FlowMatch, FunctionSpec, MirrorSpec,
    Nat44Spec, PortRange, Proto, RateLimitSpec, StageHandle, build,
};
use nsm_dataplane::{
    Action, Dataplane, DataplaneConfig, FarEnd, Payload, PodEnd, PortId, PortKind, XconnSpec,
    out_len,
};

mod common;
use common::count;

/// UDP packets from many source ports (new flows and mappings all along).
fn packets(n: u16) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let b = PacketBuilder::ipv4([10, 0, 0, 1], [198, 51, 100, 2], 64).udp(1000 + i, 5201);
            let mut v = Vec::new();
            b.write(&mut v, &[0x5a; 100]).expect("write");
            v
        })
        .collect()
}

fn allow_5201_again() -> AclRule {
    AclRule {
        action: AclAction::Allow,
        matches: FlowMatch {
            proto: Proto::Udp,
            dst_ports: Some(PortRange::single(5201)),
            ..FlowMatch::default()
        },
    }
}

#[test]
fn built_in_chains_never_allocate_per_packet() {
    let allow_5201 = AclRule {
        action: AclAction::Allow,
        matches: FlowMatch {
            proto: Proto::Udp,
            dst_ports: Some(PortRange::single(5201)),
            ..FlowMatch::default()
        },
    };
    // Source ports 1000-1999: the first half of the packets is selected.
    let first_half = |f: FunctionSpec| {
        f.when(FlowMatch {
            proto: Proto::Udp,
            src_ports: Some(PortRange::new(1000, 1999)),
            ..FlowMatch::default()
        })
    };
    let chains = [
        ChainSpec::from(vec![
            FunctionSpec::Acl(AclSpec {
                rules: vec![allow_5201],
                ..AclSpec::default()
            }),
            FunctionSpec::RateLimit(RateLimitSpec {
                rate_bps: 1_000_000,
                burst_bytes: None,
                direction: None,
            }),
            FunctionSpec::Counter,
        ]),
        ChainSpec::from(vec![
            FunctionSpec::Nat44(Nat44Spec::new([192, 0, 2, 9].into())),
            FunctionSpec::Mirror(MirrorSpec {
                slots: 16,
                snaplen: 256,
                ..MirrorSpec::default()
            }),
            FunctionSpec::Fault(FaultSpec {
                drop_percent: 10.0,
                corrupt_percent: 10.0,
                ..FaultSpec::default()
            }),
        ]),
        // Selectors in front of stateful stages, a shaper queueing
        // (holds) and dropping, and a mirror with a filter after NAT.
        ChainSpec {
            functions: vec![
                first_half(FunctionSpec::Acl(AclSpec {
                    rules: vec![allow_5201_again()],
                    ..AclSpec::default()
                })),
                first_half(FunctionSpec::RateLimit(RateLimitSpec {
                    rate_bps: 5_000_000,
                    burst_bytes: Some(1500),
                    direction: None,
                })),
                FunctionSpec::Nat44(Nat44Spec::new([192, 0, 2, 9].into())).into(),
                FunctionSpec::Mirror(MirrorSpec {
                    filter: FlowMatch {
                        proto: Proto::Udp,
                        ..FlowMatch::default()
                    },
                    slots: 16,
                    snaplen: 256,
                })
                .when(FlowMatch {
                    src: Some("192.0.2.9/32".parse().expect("prefix")),
                    ..FlowMatch::default()
                }),
                first_half(FunctionSpec::Counter),
            ],
        },
    ];
    for spec in chains {
        let mut dp = Dataplane::new(DataplaneConfig::default());
        dp.add_port(PortId(1), PortKind::Tun).expect("port");
        dp.add_port(PortId(2), PortKind::Tun).expect("port");
        dp.upsert_xconnect(
            "local",
            XconnSpec {
                payload: Payload::Ip,
                mtu: 1420,
                a: PodEnd::new(PortId(1)),
                b: FarEnd::Pod(PodEnd::new(PortId(2))),
            },
        )
        .expect("xconn");
        let t0 = Instant::now();
        let mut built = build(&spec, t0).expect("valid spec");
        let _ = dp.set_chain("local", built.chain).expect("set_chain");
        let mut reader = built.handles.iter_mut().find_map(|h| match h {
            StageHandle::Mirror(_, r) => Some(r),
            _ => None,
        });
        let pkts = packets(2000);
        let mut buf = vec![0u8; 2048];
        let mut out = vec![0u8; out_len(1420)];
        let mut copy = vec![0u8; 256];
        let (mut passed, mut dropped, mut held) = (0, 0, 0);
        for round in 0..2 {
            let ((), n) = count(|| {
                for (i, p) in pkts.iter().enumerate() {
                    let now = t0 + Duration::from_micros(i as u64 * 100 + round * 1_000_000);
                    let b = &mut buf[..p.len()];
                    b.copy_from_slice(p);
                    match dp.from_pod(now, PortId(1), b, &mut out) {
                        Action::ToPod { .. } => {
                            passed += 1;
                            held += usize::from(dp.hold_until().is_some());
                        }
                        Action::Drop(_) => dropped += 1,
                        other => panic!("{other:?}"),
                    }
                    if i % 8 == 0
                        && let Some(r) = reader.as_deref_mut()
                    {
                        while r.pop(&mut copy).is_some() {}
                    }
                }
            });
            if round == 1 {
                assert_eq!(n, 0, "allocations on the chain's data path ({:?})", spec);
            }
        }
        assert!(
            passed > 0 && dropped > 0,
            "{passed} passed, {dropped} dropped"
        );
        let shaped = spec
            .functions
            .iter()
            .any(|e| matches!(e.function, FunctionSpec::RateLimit(_)) && e.selector.is_some());
        assert!(!shaped || held > 0, "the shaper held packets: {held}");
    }
}
