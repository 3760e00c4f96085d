//! A `networkservicemesh.io` annotation value (`kernel://SERVICE[@DOMAIN]/IFNAME?k=v`). See `nsm_manager::fuzzing::annotation` for the invariants checked.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run annotation -- -max_total_time=30`
//! from `nsm-manager/fuzz`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nsm_manager::fuzzing::annotation(data);
});
