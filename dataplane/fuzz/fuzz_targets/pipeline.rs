//! Arbitrary bytes into the data plane from both sides: pod ports (TUN and
//! TAP, same-node and WireGuard connections, an unattached port), the
//! underlay (with or without the live session's receiver index), plaintext
//! encrypted by a real WireGuard peer, and timers. See
//! `nsm_dataplane::fuzzing` for the input format and the invariants checked.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run pipeline -- -max_total_time=30`
//! from `dataplane/fuzz`.

#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use nsm_dataplane::fuzzing::Fixture;

thread_local! {
    // Built once: programming sessions and a handshake per case would make
    // the fuzzer spend its time in x25519. State carries over between cases,
    // which also exercises long-lived sessions (replay windows, queues).
    static FIXTURE: RefCell<Fixture> = RefCell::new(Fixture::new());
}

fuzz_target!(|data: &[u8]| {
    FIXTURE.with(|f| f.borrow_mut().run(data));
});
