//! Replays `testbed/fuzz`'s checked-in policy corpus (and any saved crash)
//! with the `policy` fuzz target's checks, so that every input ever found
//! stays a regression test. (The same crate's `topology` corpus is replayed
//! by `nsm-manager/tests/fuzz_corpus.rs`.)

use std::path::Path;

/// The `policy` target's invariants on one input (see
/// `testbed/fuzz/fuzz_targets/policy.rs`); returns whether it was accepted.
fn policy(name: &str, data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(set) = nsm_policy::parse_file(text) else {
        return false;
    };
    for p in set.policies() {
        let plan = set.plan(&p.matches.service, &p.matches.source);
        assert!(!plan.segments.is_empty(), "{name}: a plan without segments");
        assert!(
            plan.policies.contains(&p.name),
            "{name}: {} does not select its own match",
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
            Ok(s) => assert_eq!(s, set, "{name}: changed by a round trip:\n{again}"),
            Err(e) => panic!("{name}: rejected after a round trip: {e}\n{again}"),
        }
    }
    true
}

#[test]
fn policy_corpus_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let (mut seeds, mut accepted) = (0, 0);
    for dir in ["corpus/policy", "artifacts/policy"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).expect("corpus file");
                seeds += 1;
                accepted += usize::from(policy(&e.path().display().to_string(), &data));
            }
        }
    }
    assert!(seeds > 0, "no seeds in testbed/fuzz/corpus/policy");
    // The seeds hold valid and invalid files: both sides stay exercised.
    assert!(
        accepted > 0 && accepted < seeds,
        "{accepted} of {seeds} accepted"
    );
}
