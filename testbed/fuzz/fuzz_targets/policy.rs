//! A chain policy file through `nsm_policy::parse_file`: any text gives a
//! policy set or an error, never a panic. A set it accepts
//! - plans every connection its policies select without panicking (a
//!   plan has at least the client's segment), and
//! - written back as the JSON file the testbed hands the managers
//!   (`Lab::set_policies`) and as YAML, is accepted again as the same set
//!   (validation does not depend on how the file was spelt).
//!
//! `testbed/tests/fuzz_corpus.rs` replays the corpus with the same checks.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run policy -- -max_total_time=30`
//! from `testbed/fuzz`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = nsm_policy::parse_file(text) else {
        return;
    };
    for p in set.policies() {
        let plan = set.plan(&p.matches.service, &p.matches.source);
        assert!(!plan.segments.is_empty(), "a plan without segments");
        assert!(
            plan.policies.contains(&p.name),
            "{} does not select its own match",
            p.name
        );
    }
    let file = nsm_policy::PolicyFile {
        policies: set.policies().to_vec(),
    };
    let json = serde_json::to_string(&file).expect("policies serialize as JSON");
    let yaml = serde_norway::to_string(&file).expect("policies serialize as YAML");
    for again in [json, yaml] {
        match nsm_policy::parse_file(&again) {
            Ok(s) => assert_eq!(s, set, "changed by a round trip:\n{again}"),
            Err(e) => panic!("accepted policies rejected after a round trip: {e}\n{again}"),
        }
    }
});
