//! Replays `cni/fuzz`'s checked-in corpus and any saved crash through the
//! fuzz entry point, so that every input ever found stays a regression test.

#[test]
fn checked_in_corpus_runs_clean() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus/invocation", "artifacts/invocation"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
            for e in entries.flatten() {
                nsm_cni::fuzzing::invocation(&std::fs::read(e.path()).expect("corpus file"));
                n += 1;
            }
        }
    }
    assert!(n > 0, "no seeds in cni/fuzz/corpus/invocation");
}
