//! An arbitrary small built-in chain spec (acl, ratelimit, nat44, mirror,
//! counter, fault, with small tables and rings) and arbitrary or
//! synthesized packets through it, both directions, with time moving. See
//! `nsm_dataplane::stages::fuzz_chain` for the input format and the
//! invariants checked.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run chain -- -max_total_time=30`
//! from `dataplane/fuzz`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nsm_dataplane::stages::fuzz_chain::run(data);
});
