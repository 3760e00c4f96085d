//! The invariants the `policy` fuzz target checks (`testbed/fuzz`), in one
//! place so that the corpus replay (`testbed/tests/fuzz_corpus.rs`) checks
//! every input ever found exactly as the fuzzer did.

use crate::{PolicyFile, parse_file};

/// Runs `data` through [`parse_file`] and returns whether it was accepted.
/// A set it accepts must plan every connection its policies select (a plan
/// has at least the client's segment, and names the policy), and must come
/// back the same when written as JSON (what the testbed hands the managers)
/// or YAML and read again.
///
/// # Panics
/// When an accepted set breaks one of those; `what` names the input.
pub fn check_policy_file(what: &str, data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(set) = parse_file(text) else {
        return false;
    };
    for p in set.policies() {
        let plan = set.plan(&p.matches.service, &p.matches.source);
        assert!(!plan.segments.is_empty(), "{what}: a plan without segments");
        assert!(
            plan.policies.contains(&p.name),
            "{what}: {} does not select its own match",
            p.name
        );
    }
    let file = PolicyFile {
        policies: set.policies().to_vec(),
    };
    let json = serde_json::to_string(&file).expect("policies serialize as JSON");
    let yaml = serde_norway::to_string(&file).expect("policies serialize as YAML");
    for again in [json, yaml] {
        match parse_file(&again) {
            Ok(s) => assert_eq!(s, set, "{what}: changed by a round trip:\n{again}"),
            Err(e) => panic!("{what}: accepted policies rejected after a round trip: {e}\n{again}"),
        }
    }
    true
}
