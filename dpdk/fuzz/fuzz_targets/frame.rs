//! The DPDK underlay's frame parser: any bytes as an Ethernet frame for an
//! IPv4 and an IPv6 endpoint. See `nsm_dpdk::fuzzing::frame` for the
//! invariants checked.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run frame -- -max_total_time=30` from
//! `dpdk/fuzz`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nsm_dpdk::fuzzing::frame(data);
});
