//! A manager `--config` file (services, pools, `authorization:` policy) and
//! the policy decisions made from it. See `nsm_manager::fuzzing::config` for the invariants checked.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run config -- -max_total_time=30`
//! from `nsm-manager/fuzz`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nsm_manager::fuzzing::config(data);
});
