//! A testbed topology file through `nsm_testbed::Topology::parse`: any text
//! gives a topology or an error, never a panic; a topology it accepts,
//! written back as YAML, is accepted again (validation does not depend on
//! how the file was spelt). `nsm-manager/tests/fuzz_corpus.rs` replays the
//! corpus.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run topology -- -max_total_time=30`
//! from `testbed/fuzz`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = nsm_testbed::Topology::parse(text) {
        let again = serde_norway::to_string(&t).expect("a topology serializes");
        if let Err(e) = nsm_testbed::Topology::parse(&again) {
            panic!("accepted topology rejected after a round trip: {e}\n{again}");
        }
    }
});
