//! A chain policy file through `nsm_policy::parse_file`: any text gives a
//! policy set or an error, never a panic. A set it accepts
//! - plans every connection its policies select without panicking (a
//!   plan has at least the client's segment), and
//! - written back as the JSON file the testbed hands the managers
//!   (`Lab::set_policies`) and as YAML, is accepted again as the same set
//!   (validation does not depend on how the file was spelt).
//!
//! The checks live in `nsm_policy::fuzzing`; `testbed/tests/fuzz_corpus.rs`
//! replays the corpus with them.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run policy -- -max_total_time=30`
//! from `testbed/fuzz`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nsm_policy::fuzzing::check_policy_file("input", data);
});
