//! Built-in chains installed on a real (in-memory) data plane: the issue's
//! `web-guard` policy, a rate limit edited while a flow runs, and `fault`
//! loss, with virtual time. Packets enter with `from_pod`, verdicts come
//! back as `Action`s, drops show in the connection's counters.

use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use nsm_dataplane::stages::{
    AclAction, AclRule, AclSpec, BuiltChain, ChainSpec, FaultSpec, FlowMatch, FunctionSpec,
    PortRange, Proto, RateLimitSpec, StageHandle, build,
};
use nsm_dataplane::{
    Action, Dataplane, DataplaneConfig, Direction, DropReason, FarEnd, Payload, PodEnd, PortId,
    PortKind, XconnSpec, out_len,
};

const A: [u8; 4] = [10, 0, 0, 1];
const B: [u8; 4] = [10, 0, 0, 2];

fn same_node() -> Dataplane {
    let mut dp = Dataplane::new(DataplaneConfig::default());
    dp.add_port(PortId(1), PortKind::Tun).expect("port");
    dp.add_port(PortId(2), PortKind::Tun).expect("port");
    dp.upsert_xconnect(
        "c",
        XconnSpec {
            payload: Payload::Ip,
            mtu: 1500,
            a: PodEnd::new(PortId(1)),
            b: FarEnd::Pod(PodEnd::new(PortId(2))),
        },
    )
    .expect("xconn");
    dp
}

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, len: usize) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 65535);
    let mut v = Vec::new();
    b.write(&mut v, &vec![0u8; len - 40]).expect("write");
    v
}

fn ping(src: [u8; 4], dst: [u8; 4], seq: u16, request: bool) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64);
    let b = if request {
        b.icmpv4_echo_request(9, seq)
    } else {
        b.icmpv4_echo_reply(9, seq)
    };
    let mut v = Vec::new();
    b.write(&mut v, &[0u8; 56]).expect("write");
    v
}

/// Sends `pkt` from side A (`PortId(1)`) or B; true if forwarded.
fn send(
    dp: &mut Dataplane,
    now: Instant,
    from_a: bool,
    mut pkt: Vec<u8>,
) -> Result<(), DropReason> {
    let mut out = vec![0u8; out_len(1500)];
    let port = if from_a { PortId(1) } else { PortId(2) };
    match dp.from_pod(now, port, &mut pkt, &mut out) {
        Action::ToPod { .. } => Ok(()),
        Action::Drop(r) => Err(r),
        other => panic!("{other:?}"),
    }
}

fn web_guard(rate_bps: u64) -> ChainSpec {
    let allow = |proto, dst_ports| AclRule {
        action: AclAction::Allow,
        matches: FlowMatch {
            proto,
            dst_ports,
            direction: Some(Direction::AToB),
            ..FlowMatch::default()
        },
    };
    ChainSpec::from(vec![
        FunctionSpec::Acl(AclSpec {
            rules: vec![
                allow(Proto::Icmp, None),
                allow(Proto::Tcp, Some(PortRange::single(5201))),
            ],
            default: AclAction::Deny,
            ..AclSpec::default()
        }),
        FunctionSpec::RateLimit(RateLimitSpec {
            rate_bps,
            burst_bytes: Some(64 * 1024),
            direction: None,
        }),
        FunctionSpec::Counter,
    ])
}

fn install(dp: &mut Dataplane, spec: &ChainSpec, now: Instant) -> Vec<StageHandle> {
    let BuiltChain { chain, handles } = build(spec, now).expect("valid spec");
    let _old = dp.set_chain("c", chain).expect("set_chain");
    handles
}

#[test]
fn web_guard_policy_allows_ping_and_5201_and_denies_80() {
    let mut dp = same_node();
    let t0 = Instant::now();
    let handles = install(&mut dp, &web_guard(50_000_000), t0);
    assert_eq!(
        dp.status("c", t0).expect("status").chain,
        vec!["acl", "ratelimit", "counter"]
    );

    assert_eq!(send(&mut dp, t0, true, ping(A, B, 1, true)), Ok(()));
    assert_eq!(send(&mut dp, t0, false, ping(B, A, 1, false)), Ok(()));
    assert_eq!(send(&mut dp, t0, true, tcp(A, B, 40000, 5201, 100)), Ok(()));
    assert_eq!(
        send(&mut dp, t0, false, tcp(B, A, 5201, 40000, 100)),
        Ok(())
    );
    assert_eq!(
        send(&mut dp, t0, true, tcp(A, B, 40001, 80, 100)),
        Err(DropReason::AclDenied)
    );
    // B cannot open a connection to A's 5201 (the rule is A to B only).
    assert_eq!(
        send(&mut dp, t0, false, tcp(B, A, 40002, 5201, 100)),
        Err(DropReason::AclDenied)
    );

    let drops = dp.counters("c").expect("counters").snapshot().drops;
    assert_eq!(drops.get(DropReason::AclDenied), 2);
    let StageHandle::Acl(acl) = &handles[0] else {
        panic!("acl first")
    };
    let s = acl.snapshot();
    assert_eq!(s.rule_hits, vec![1, 1]);
    assert_eq!((s.default_hits, s.tracked), (2, 2));
    let StageHandle::Counter(counter) = &handles[2] else {
        panic!("counter last")
    };
    let c = counter.snapshot();
    assert_eq!((c.a_to_b_packets, c.b_to_a_packets), (2, 2));
}

/// A flow offered at 80 Mbit/s for 4 s through a 50 Mbit/s limit, then the
/// policy is edited to 20 Mbit/s while it runs: the chain is rebuilt and
/// swapped, the flow keeps passing (the established flow's state is
/// rebuilt by its next forward packet), and the rate follows. What counts
/// is when packets leave: at once, or at the time the shaper holds them
/// until ([`Dataplane::hold_until`]).
#[test]
fn rate_limit_holds_and_follows_a_policy_edit_mid_flow() {
    let mut dp = same_node();
    let t0 = Instant::now();
    install(&mut dp, &web_guard(50_000_000), t0);
    let size = 1400usize;
    let gap = Duration::from_nanos((size as u64 * 8 * 1_000_000_000) / 80_000_000);
    let secs = 4;
    let per_phase = u32::try_from(secs * 1_000_000_000 / gap.as_nanos()).expect("fits");
    let mut now = t0;
    let measure = |dp: &mut Dataplane, now: &mut Instant| {
        let mut bytes = 0u64;
        let end = *now + gap * per_phase;
        for i in 0..per_phase {
            *now += gap;
            if send(dp, *now, true, tcp(A, B, 40000, 5201, size)).is_ok()
                && dp.hold_until().is_none_or(|t| t <= end)
            {
                bytes += size as u64;
            }
            // An ACK now and then, which must never be dropped by the ACL.
            if i % 16 == 0 {
                let r = send(dp, *now, false, tcp(B, A, 5201, 40000, 40));
                assert_ne!(r, Err(DropReason::AclDenied));
            }
        }
        bytes as f64 * 8.0 / secs as f64
    };
    let first = measure(&mut dp, &mut now);
    assert!((first - 50e6).abs() / 50e6 < 0.02, "{first}");
    install(&mut dp, &web_guard(20_000_000), now);
    let second = measure(&mut dp, &mut now);
    assert!((second - 20e6).abs() / 20e6 < 0.02, "{second}");
    let drops = dp.counters("c").expect("counters").snapshot().drops;
    assert!(drops.get(DropReason::RateLimited) > 0);
    assert_eq!(drops.get(DropReason::AclDenied), 0);
}

#[test]
fn fault_ten_percent_loss_shows_to_ping() {
    let mut dp = same_node();
    let t0 = Instant::now();
    let spec = ChainSpec::from(vec![FunctionSpec::Fault(FaultSpec {
        drop_percent: 10.0,
        direction: Some(Direction::AToB),
        ..FaultSpec::default()
    })]);
    install(&mut dp, &spec, t0);
    let n = 10_000u16;
    let mut answered = 0;
    for seq in 0..n {
        let now = t0 + Duration::from_millis(u64::from(seq));
        if send(&mut dp, now, true, ping(A, B, seq, true)).is_ok() {
            assert_eq!(send(&mut dp, now, false, ping(B, A, seq, false)), Ok(()));
            answered += 1;
        }
    }
    let loss = 1.0 - f64::from(answered) / f64::from(n);
    assert!((0.09..0.11).contains(&loss), "{loss}");
    let drops = dp.counters("c").expect("counters").snapshot().drops;
    assert_eq!(
        drops.get(DropReason::FaultInjected),
        u64::from(n) - answered as u64
    );
}
