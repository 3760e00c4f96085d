//! Proves that the flow log allocates nothing per packet: a counting global
//! allocator watches packets of many new flows (the table filling, records
//! pushed as slots are reused, the ring filling up and being drained, the
//! timer sweep finishing idle flows) go through an `acl` chain built with
//! a flow log, installed on a same-node cross-connect.

use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use nsm_dataplane::stages::{
    AclAction, AclRule, AclSpec, ChainSpec, FlowLogSpec, FlowMatch, FunctionSpec, PortRange, Proto,
    build_with_flow_log,
};
use nsm_dataplane::{
    Action, Dataplane, DataplaneConfig, FarEnd, Payload, PodEnd, PortId, PortKind, XconnSpec,
    out_len,
};

mod common;
use common::count;

fn packets(n: u16) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let b = PacketBuilder::ipv4([10, 0, 0, 1], [198, 51, 100, 2], 64)
                .udp(1000 + i, 5200 + (i % 3));
            let mut v = Vec::new();
            b.write(&mut v, &[0x5a; 100]).expect("write");
            v
        })
        .collect()
}

#[test]
fn flow_log_never_allocates_per_packet() {
    let spec = ChainSpec::from(vec![FunctionSpec::Acl(AclSpec {
        rules: vec![AclRule {
            action: AclAction::Allow,
            matches: FlowMatch {
                proto: Proto::Udp,
                dst_ports: Some(PortRange::single(5201)),
                ..FlowMatch::default()
            },
        }],
        ..AclSpec::default()
    })]);
    let log = FlowLogSpec {
        sample: 2,
        flows: 256,
        ring: 64,
        idle: Duration::from_millis(50),
        ..FlowLogSpec::default()
    };
    for chainless in [false, true] {
        let spec = if chainless {
            ChainSpec::from(vec![])
        } else {
            spec.clone()
        };
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
        let (built, reader) = build_with_flow_log(&spec, t0, Some(&log)).expect("valid spec");
        let mut reader = reader.expect("a flow log reader");
        let _ = dp.set_chain("local", built.chain).expect("set_chain");
        let pkts = packets(2000);
        let mut buf = vec![0u8; 2048];
        let mut out = vec![0u8; out_len(1420)];
        let (mut records, mut dropped) = (0u64, 0u64);
        for round in 0..2u64 {
            let ((), n) = count(|| {
                for (i, p) in pkts.iter().enumerate() {
                    let now = t0 + Duration::from_micros(i as u64 * 100 + round * 1_000_000);
                    let b = &mut buf[..p.len()];
                    b.copy_from_slice(p);
                    if let Action::Drop(_) = dp.from_pod(now, PortId(1), b, &mut out) {
                        dropped += 1;
                    }
                    if i % 64 == 0 {
                        dp.poll_chains(now);
                        while reader.pop().is_some() {
                            records += 1;
                        }
                    }
                }
            });
            if round == 1 {
                assert_eq!(
                    n, 0,
                    "allocations with the flow log on (chainless: {chainless})"
                );
            }
        }
        assert!(records > 100, "records were written: {records}");
        assert!(chainless || dropped > 0, "the acl dropped packets");
        let s = reader.snapshot();
        assert!(s.ring_full > 0 || s.table_full > 0 || records > 0, "{s:?}");
    }
}
