//! A structured peer request (path segments with raw, validly signed,
//! tampered or misdirected ES256 tokens) through `updatepath` and the
//! signed-path verification the Request handler runs first. See `nsm_manager::fuzzing::path_tokens` for the invariants checked.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run path_tokens -- -max_total_time=30`
//! from `nsm-manager/fuzz`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nsm_manager::fuzzing::path_tokens(data);
});
