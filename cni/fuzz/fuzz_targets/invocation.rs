//! The CNI plugin's inputs: environment (`KEY=VALUE` lines), a NUL byte,
//! then stdin (the network configuration). See `nsm_cni::fuzzing` for the
//! invariants checked.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run invocation -- -max_total_time=30`
//! from `cni/fuzz`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nsm_cni::fuzzing::invocation(data);
});
