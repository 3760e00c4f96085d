//! Helpers for integration tests that build labs.

use std::sync::atomic::{AtomicU32, Ordering};

/// Fails the calling test with a message that says why, unless running as root.
/// Root tests are part of the one test command; they must not pass silently
/// where they could not run.
pub fn require_root() {
    assert!(
        crate::sys::is_root(),
        "this test builds network namespaces and needs root: run the test suite as root (see README)"
    );
}

/// A lab name no other test (in this process or another) is using now:
/// `PREFIX` + pid + a counter, within the lab-name limit.
pub fn unique_lab_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}-{}-{n}", std::process::id());
    assert!(
        name.len() <= crate::topology::MAX_LAB_NAME,
        "lab name {name} too long: use a shorter prefix"
    );
    name
}
