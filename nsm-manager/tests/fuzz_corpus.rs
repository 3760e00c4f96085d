//! Replays `testbed/fuzz`'s checked-in topology corpus (and any saved
//! crash) with the fuzz target's invariant: a topology the parser accepts
//! is accepted again after being written back. The testbed is a
//! dev-dependency here; `nsm-manager/fuzz`'s own targets are replayed by
//! `nsm_manager::fuzzing`'s unit tests.

#[test]
fn topology_corpus_runs_clean() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testbed/fuzz");
    let mut n = 0;
    for dir in ["corpus/topology", "artifacts/topology"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).expect("corpus file");
                n += 1;
                let Ok(text) = std::str::from_utf8(&data) else {
                    continue;
                };
                if let Ok(t) = nsm_testbed::Topology::parse(text) {
                    let again = serde_norway::to_string(&t).expect("a topology serializes");
                    if let Err(err) = nsm_testbed::Topology::parse(&again) {
                        panic!("{}: rejected after a round trip: {err}", e.path().display());
                    }
                }
            }
        }
    }
    assert!(n > 0, "no seeds in testbed/fuzz/corpus/topology");
}
