use super::*;

const ISSUE: &str = r#"
policies:
  - name: web-guard
    match: {service: secure-net, source: {app: web}}
    chain:
      - acl: {rules: [{allow: {proto: icmp}}, {allow: {proto: tcp, dst_port: 5201}}], default: deny}
      - ratelimit: {rate: 50Mbit, burst: 64KiB}
      - endpoint: {service: inspector}
"#;

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn err(text: &str) -> String {
    parse_file(text).expect_err("rejected").to_string()
}

#[test]
fn the_issue_example_compiles_into_two_segments() {
    let set = parse_file(ISSUE).expect("valid");
    let plan = set.plan("secure-net", &labels(&[("app", "web"), ("tier", "1")]));
    assert_eq!(plan.policies, ["web-guard"]);
    assert_eq!(plan.segments.len(), 2);
    let s0 = &plan.segments[0];
    assert_eq!(s0.function.as_deref(), Some("inspector"));
    assert_eq!(s0.chain.functions.len(), 2);
    let Some(pb::function::Kind::Acl(acl)) = &s0.chain.functions[0].kind else {
        panic!("acl first: {s0:?}");
    };
    assert_eq!(acl.rules.len(), 2);
    assert_eq!(acl.default_action, pb::AclAction::Deny as i32);
    let m = acl.rules[1].r#match.as_ref().expect("match");
    assert_eq!(m.protocol, pb::MatchProtocol::Tcp as i32);
    assert_eq!(m.dst_ports, Some(pb::PortRange { lo: 5201, hi: 5201 }));
    let Some(pb::function::Kind::Ratelimit(rl)) = &s0.chain.functions[1].kind else {
        panic!("ratelimit second");
    };
    assert_eq!((rl.rate_bps, rl.burst_bytes), (50_000_000, 65_536));
    assert!(s0.chain.functions.iter().all(|f| f.selector.is_none()));
    // After the inspector: nothing more, to the service's own endpoints.
    assert_eq!(plan.segments[1], Segment::default());
    // Other clients, other services: untouched.
    assert_eq!(
        set.plan("secure-net", &labels(&[("app", "db")]))
            .segments
            .len(),
        1
    );
    assert!(
        set.plan("other", &labels(&[("app", "web")]))
            .policies
            .is_empty()
    );
    // Past the end (the policies shrank): no segment, so nothing loops.
    assert_eq!(plan.segment(1), Some(&plan.segments[1]));
    assert_eq!(plan.segment(7), None);
}

#[test]
fn precedence_is_priority_then_name_and_traffic_selectors_apply() {
    let set = parse_file(
        r#"
policies:
  - name: b-count
    match: {service: s}
    chain: [{counter: {}}]
  - name: a-limit-tcp
    match: {service: s, proto: tcp, dst_port: "8000-8080"}
    chain: [{ratelimit: {rate: 1Mbit}}]
  - name: z-first
    priority: 10
    match: {service: s}
    chain: [{fault: {drop: 10%}}]
"#,
    )
    .expect("valid");
    let plan = set.plan("s", &BTreeMap::new());
    assert_eq!(plan.policies, ["z-first", "a-limit-tcp", "b-count"]);
    let f = &plan.segments[0].chain.functions;
    assert!(matches!(f[0].kind, Some(pb::function::Kind::Fault(ref x)) if x.drop_percent == 10.0));
    let sel = f[1].selector.as_ref().expect("tcp policy has a selector");
    assert_eq!(sel.protocol, pb::MatchProtocol::Tcp as i32);
    assert_eq!(sel.dst_ports, Some(pb::PortRange { lo: 8000, hi: 8080 }));
    assert!(f[2].selector.is_none());
}

#[test]
fn bad_policies_are_named() {
    let e = err("policies: [{name: p1, match: {service: s}, chain: [{firewall: {}}]}]");
    assert!(e.starts_with("policy p1: "), "{e}");
    assert!(e.contains("firewall"), "{e}");
    let e = err(
        "policies: [{name: p2, match: {service: s}, chain: [{acl: {rules: [{allow: {proto: tcp, dst_port: 90-80}}]}}]}]",
    );
    assert_eq!(
        e,
        "policy p2: chain[0] (acl): rules[0]: dst_port: port range 90-80 has lo > hi"
    );
    let e = err("policies: [{name: p3, match: {service: s}, chain: [{ratelimit: {rate: 0}}]}]");
    assert_eq!(e, "policy p3: chain[0] (ratelimit): rate must be > 0");
    let e = err(
        "policies: [{name: p4, match: {service: s}, chain: [{acl: {rules: [{allow: {dst_port: 70000}}]}}]}]",
    );
    assert!(e.starts_with("policy p4: ") && e.contains("65535"), "{e}");
    let e = err(
        "policies: [{name: p5, match: {service: s, proto: tcp}, chain: [{endpoint: {service: fw}}]}]",
    );
    assert!(e.starts_with("policy p5: chain[0] (endpoint): "), "{e}");
    let e = err("policies: [{name: Bad_Name, match: {service: s}}]");
    assert!(e.starts_with("policy Bad_Name: name: "), "{e}");
    let e = err("policies: [{name: d, match: {service: s}}, {name: d, match: {service: t}}]");
    assert_eq!(e, "policy d: duplicate policy name");
    let e = err("policies: [{match: {service: s}}]");
    assert!(e.starts_with("policy policies[0]: "), "{e}");
    let e = err("policies: [{name: x, match: {service: s, sorce: {a: b}}}]");
    assert!(e.contains("sorce"), "{e}");
    let e = err(
        "policies: [{name: x, match: {service: s}, chain: [{acl: {rules: [{allow: {src: 10.0.0.1/8}}]}}]}]",
    );
    assert!(e.contains("host bits"), "{e}");
    let e = err("policies: [{name: x, match: {service: s}, chain: [{fault: {drop: 120%}}]}]");
    assert!(e.contains("0..=100"), "{e}");
    // Names and labels that YAML could not write back as they were (found
    // by the `policy` fuzzer: a NEL, U+0085, in a service name).
    let e = err("{\"policies\": [{\"name\": \"n\", \"match\": {\"service\": \"a\\u0085b\"}}]}");
    assert!(e.starts_with("policy n: match.service: "), "{e}");
    let e = err("policies: [{name: n, match: {service: \"secure net\"}}]");
    assert!(e.contains("no whitespace"), "{e}");
    let e = err(
        "policies: [{name: n, match: {service: s}, chain: [{endpoint: {service: \"fw\\tx\"}}]}]",
    );
    assert!(
        e.starts_with("policy n: chain[0] (endpoint): service "),
        "{e}"
    );
    let e = err("policies: [{name: n, match: {service: s, source: {app: \"we\\nb\"}}}]");
    assert!(e.starts_with("policy n: match.source: "), "{e}");
    parse_file("policies: [{name: n, match: {service: s, source: {team: \"red team\"}}}]")
        .expect("a space in a label value is fine");
}

#[test]
fn chains_that_loop_are_rejected() {
    let e = err("policies: [{name: self, match: {service: s}, chain: [{endpoint: {service: s}}]}]");
    assert!(
        e.starts_with("policy self: chain[0] (endpoint): loop"),
        "{e}"
    );
    let e = err(
        "policies: [{name: twice, match: {service: s}, chain: [{endpoint: {service: f}}, {counter: {}}, {endpoint: {service: f}}]}]",
    );
    assert!(
        e.starts_with("policy twice: chain[2] (endpoint): loop"),
        "{e}"
    );
    let e = err(r#"
policies:
  - {name: a-to-b, match: {service: a}, chain: [{endpoint: {service: b}}]}
  - {name: b-to-c, match: {service: b}, chain: [{endpoint: {service: c}}]}
  - {name: c-to-a, match: {service: c, source: {x: y}}, chain: [{endpoint: {service: a}}]}
"#);
    assert!(e.contains("loop between policies: a -> b -> c -> a"), "{e}");
    // A chain through two different functions, and a function service with
    // its own (non-looping) policy, are fine.
    parse_file(
        r#"
policies:
  - {name: a, match: {service: a}, chain: [{endpoint: {service: f1}}, {endpoint: {service: f2}}]}
  - {name: f, match: {service: f1}, chain: [{counter: {}}]}
"#,
    )
    .expect("no loop");
}

#[test]
fn round_trips_through_serde() {
    let set = parse_file(ISSUE).expect("valid");
    // JSON is YAML: what tools write (serde_norway would use YAML tags).
    let text = serde_json::to_string(&PolicyFile {
        policies: set.policies().to_vec(),
    })
    .expect("serialize");
    assert_eq!(parse_file(&text).expect("reparse"), set);
    let json = serde_json::to_string(set.policies()).expect("json");
    let back: Vec<Policy> = serde_json::from_str(&json).expect("json back");
    assert_eq!(back, set.policies());
    assert!(parse_file("").expect("empty file").is_empty());
}

#[test]
fn yaml_written_by_serde_norway_reads_back() {
    // A testbed lab stores its topology, policies included, with serde_norway
    // and attaches from that copy; operators write one-key maps.
    let set = parse_file(ISSUE).expect("valid");
    let text = serde_norway::to_string(&PolicyFile {
        policies: set.policies().to_vec(),
    })
    .expect("serialize");
    assert!(!text.contains('!'), "maps, not YAML tags: {text}");
    let back: PolicyFile = serde_norway::from_str(&text).expect("reads back");
    assert_eq!(back.policies, set.policies());
}

#[test]
fn a_delay_cannot_follow_a_traffic_selector() {
    let e = err(
        "policies: [{name: slow-web, match: {service: s, proto: tcp}, chain: [{fault: {delay: 20ms}}]}]",
    );
    assert!(
        e.starts_with("policy slow-web: chain[0] (fault): a delay"),
        "{e}"
    );
    parse_file("policies: [{name: lossy-web, match: {service: s, proto: tcp}, chain: [{fault: {drop: 1%}}]}]")
        .expect("drops may follow a selector");
}
