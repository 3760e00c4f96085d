//! Fuzzing entry point: what `cni/fuzz`'s `invocation` target calls and what
//! `tests/fuzz_corpus.rs` replays from the checked-in corpus.
//!
//! Input: the environment as `KEY=VALUE` lines, a NUL byte, then stdin (the
//! network configuration). Everything the plugin does with them before it
//! talks to the manager runs: the environment checks, the config parse,
//! the requests wanted from `connections` and the runtime's pod
//! annotations, and the error object printed on failure. No I/O happens:
//! the manager call is where the fuzzed input stops.
//!
//! Invariants: no panic; every wanted interface has a name the kernel
//! accepts and an id under the attachment's prefix; every error serializes
//! with its code.

use std::collections::BTreeMap;

use crate::plugin::{attachment_prefix, cluster_pod, wanted};
use crate::spec::{CniError, Invocation, NetConf, SPEC_VERSION};

/// Runs one fuzz input (see the module doc for its format).
pub fn invocation(data: &[u8]) {
    let (env_part, stdin) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let env: BTreeMap<String, String> = String::from_utf8_lossy(env_part)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let inv = match Invocation::from_env(&env) {
        Ok(inv) => inv,
        Err(e) => return check_error(&e),
    };
    let _ = cluster_pod(&inv);
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return check_error(&e),
    };
    let _ = conf.knows(inv.command);
    let _ = conf.socket();
    match wanted(&inv, &conf) {
        Ok(ws) => {
            let prefix = attachment_prefix(&conf.name, &inv.container_id, &inv.ifname);
            for w in ws {
                assert!(
                    nsm_proto::annotation::valid_ifname(&w.ifname),
                    "unusable interface name {:?}",
                    w.ifname
                );
                assert!(
                    w.id.starts_with(&prefix),
                    "id {:?} outside {prefix:?}",
                    w.id
                );
            }
        }
        Err(e) => check_error(&e),
    }
}

fn check_error(e: &CniError) {
    let v = e.to_json(SPEC_VERSION);
    assert!(
        v.get("code").and_then(serde_json::Value::as_u64).is_some(),
        "{v}"
    );
    assert!(serde_json::to_string(&v).is_ok());
}
