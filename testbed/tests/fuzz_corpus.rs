//! Replays `testbed/fuzz`'s checked-in policy corpus (and any saved crash)
//! with the `policy` fuzz target's checks (`nsm_policy::fuzzing`), so that
//! every input ever found stays a regression test. (The same crate's `topology` corpus is replayed
//! by `nsm-manager/tests/fuzz_corpus.rs`.)

use std::path::Path;

#[test]
fn policy_corpus_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let (mut seeds, mut accepted) = (0, 0);
    for dir in ["corpus/policy", "artifacts/policy"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).expect("corpus file");
                seeds += 1;
                accepted += usize::from(nsm_policy::fuzzing::check_policy_file(
                    &e.path().display().to_string(),
                    &data,
                ));
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
