//! Fuzzing entry points: what `nsm-manager/fuzz` targets call, and what
//! this crate's tests replay from the checked-in corpus (so a crash found
//! once stays a regression test).
//!
//! - [`config`]: a `--config` file (services, pools, `authorization:`) and
//!   the policy decisions made from it;
//! - [`annotation`]: the `networkservicemesh.io` annotation value;
//! - [`path_tokens`]: a structured peer request (path segments with raw,
//!   validly signed, tampered or misdirected tokens) through NSM's
//!   `updatepath` and the signed-path verification the Request handler runs
//!   before anything is set up.
//!
//! Each function panics only when an invariant is broken; bad input must
//! come back as an error.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use arbitrary::{Arbitrary, Unstructured};
use nsm_proto::connection::{Path, PathSegment};

use crate::authz::{Policy, Principal};
use crate::config::Config;
use crate::identity::{self, Identity, IdentityPaths};
use crate::token::{self, Caller};

/// A config file: parsing never panics; a parsed policy answers for any
/// caller, and a config with no rule allows nobody but the manager itself.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::parse_duration(&text);
    if let Ok(c) = Config::parse(&text, "fuzz") {
        for s in &c.services {
            assert!(!s.name.is_empty());
            assert!(s.cidr.iter().all(|n| n.trunc() == *n));
        }
        if let Some(p) = &c.authorization {
            check_policy(p, &text);
        }
    }
    if let Ok(p) = Policy::parse(&text) {
        check_policy(&p, &text);
    }
}

fn check_policy(p: &Policy, text: &str) {
    let labels: HashMap<String, String> =
        [("app".to_string(), text.chars().take(8).collect())].into();
    let who = [
        Principal::Local { uid: 0, gid: 0 },
        Principal::Peer {
            id: "spiffe://nsm.test/nsm-manager/n1".into(),
            on_behalf: None,
        },
        Principal::Pod {
            namespace: "default".into(),
            service_account: text.chars().take(8).collect(),
        },
        Principal::Anonymous,
    ];
    for r in &p.rules {
        // What `check` accepts matches like the pattern it is.
        if r.check().is_ok() {
            for a in &r.service_accounts {
                assert!(a.contains('/') || a.ends_with('*'), "accepted {a:?}");
            }
        }
    }
    for w in &who {
        let allowed = p.allows(w, "secure-net", &labels);
        assert!(
            !(p.rules.is_empty() && allowed),
            "empty policy allowed {w:?}"
        );
    }
    assert!(p.allows(&Principal::Internal, "x", &labels));
}

/// An annotation value: parsing never panics, and what it returns is usable
/// (non-empty service, interface names the kernel accepts).
pub fn annotation(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(reqs) = nsm_proto::annotation::parse(text) {
        for r in reqs {
            assert!(!r.service.is_empty(), "empty service from {text:?}");
            if let Some(i) = &r.interface {
                assert!(
                    nsm_proto::annotation::valid_ifname(i),
                    "bad ifname {i:?} from {text:?}"
                );
            }
        }
    }
}

/// The fixed identities the structured target signs with: a mesh member
/// `node-1` (the caller) and the server `node-2`, plus a member of another
/// CA with the same trust domain (a rogue).
struct Ids {
    member: Identity,
    server: Identity,
    rogue: Identity,
}

fn ids() -> &'static Ids {
    static IDS: OnceLock<Ids> = OnceLock::new();
    IDS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("nsm-fuzz-ids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = dir.join("ca");
        let rogue_ca = dir.join("rogue-ca");
        let day = Duration::from_secs(86_400);
        identity::create_ca(&ca, "nsm.test", day).expect("fuzz CA");
        identity::create_ca(&rogue_ca, "nsm.test", day).expect("rogue CA");
        let mk = |ca: &std::path::Path, name: &str| {
            let out = dir.join(name);
            identity::issue(
                ca,
                &format!("spiffe://nsm.test/nsm-manager/{name}"),
                day,
                &out,
            )
            .expect("fuzz identity");
            Identity::load(&IdentityPaths::in_dir(&out)).expect("fuzz identity loads")
        };
        let ids = Ids {
            member: mk(&ca, "node-1"),
            server: mk(&ca, "node-2"),
            rogue: mk(&rogue_ca, "node-9"),
        };
        let _ = std::fs::remove_dir_all(&dir);
        ids
    })
}

/// How the fuzzer builds one segment's token.
#[derive(Debug, Arbitrary)]
enum TokenSpec {
    /// Arbitrary text.
    Raw(String),
    /// Signed by one of the identities with chosen claims.
    Signed {
        signer: u8,
        aud: u8,
        own_segment: bool,
        exp_offset_s: i16,
    },
    /// A signed token with one byte flipped.
    Flipped { at: u16, signer: u8 },
}

#[derive(Debug, Arbitrary)]
struct SegSpec {
    name: u8,
    id: u8,
    token: TokenSpec,
}

/// A peer request as the Request handler sees it.
#[derive(Debug, Arbitrary)]
struct RequestSpec {
    segs: Vec<SegSpec>,
    index: u32,
    conn_id: String,
    caller_is_peer: bool,
    now_offset_s: i16,
}

fn signer(i: u8) -> &'static Identity {
    let ids = ids();
    match i % 3 {
        0 => &ids.member,
        1 => &ids.server,
        _ => &ids.rogue,
    }
}

/// A structured request through `updatepath` and the signed-path check.
///
/// Invariants: the updated path's index points at our own segment; a path
/// accepted from a peer has, just before our segment, a token whose `sub`
/// is the peer and whose `aud` is us; nothing from the rogue CA is ever
/// accepted as the previous hop.
pub fn path_tokens(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(spec) = RequestSpec::arbitrary(&mut u) else {
        return;
    };
    let ids = ids();
    let base = SystemTime::now();
    let names = ["client", "node-1", "node-2", "node-9"];
    let mut path = Path {
        index: spec.index,
        path_segments: Vec::new(),
    };
    for s in spec.segs.iter().take(8) {
        let id = format!("seg-{}", s.id % 4);
        let token = match &s.token {
            TokenSpec::Raw(t) => t.chars().take(token::MAX_TOKEN_LEN + 16).collect(),
            TokenSpec::Signed {
                signer: who,
                aud,
                own_segment,
                exp_offset_s,
            } => {
                let aud = format!(
                    "spiffe://nsm.test/nsm-manager/{}",
                    names[usize::from(*aud % 4)]
                );
                let seg = if *own_segment {
                    id.clone()
                } else {
                    "other".into()
                };
                let exp = offset(base, *exp_offset_s);
                token::sign(signer(*who), &aud, &seg, base, exp).unwrap_or_default()
            }
            TokenSpec::Flipped { at, signer: who } => {
                let aud = ids.server.id.clone();
                let mut t = token::sign(
                    signer(*who),
                    &aud,
                    &id,
                    base,
                    base + Duration::from_secs(60),
                )
                .unwrap_or_default()
                .into_bytes();
                if !t.is_empty() {
                    let i = usize::from(*at) % t.len();
                    t[i] = t[i].wrapping_add(1) & 0x7f;
                }
                String::from_utf8_lossy(&t).into_owned()
            }
        };
        path.path_segments.push(PathSegment {
            name: names[usize::from(s.name % 4)].to_string(),
            id,
            token,
            ..Default::default()
        });
    }
    let (updated, prev) = crate::manager::update_path(Some(path), "node-2", &spec.conn_id);
    let idx = updated.index as usize;
    assert!(idx < updated.path_segments.len());
    assert_eq!(updated.path_segments[idx].name, "node-2");
    assert!(prev as usize <= idx);
    let now = offset(base, spec.now_offset_s);
    let member_cert = ids.member.chain[0].clone();
    let caller = if spec.caller_is_peer {
        Caller::Peer {
            id: &ids.member.id,
            cert: &member_cert,
        }
    } else {
        Caller::Local
    };
    let roots: Arc<rustls::RootCertStore> = ids.server.roots.clone();
    let res = token::verify_path(
        &updated,
        prev as usize,
        idx,
        caller,
        &ids.server.id,
        &roots,
        now,
    );
    if res.is_ok() && spec.caller_is_peer && (prev as usize) < idx {
        let t = &updated.path_segments[prev as usize].token;
        let d = token::decode(prev as usize, t).expect("accepted token decodes");
        assert_eq!(
            d.claims.sub, ids.member.id,
            "accepted a token not from the peer"
        );
        assert_eq!(
            d.claims.aud, ids.server.id,
            "accepted a token for someone else"
        );
        assert_eq!(d.claims.seg, updated.path_segments[prev as usize].id);
        assert_ne!(d.x5c.as_deref(), Some(ids.rogue.chain[0].as_ref()));
    }
}

fn offset(base: SystemTime, s: i16) -> SystemTime {
    let d = Duration::from_secs(u64::from(s.unsigned_abs()));
    if s < 0 { base - d } else { base + d }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays the checked-in corpus and any saved crash of each target.
    #[test]
    fn checked_in_corpus_runs_clean() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        type Target = (&'static str, fn(&[u8]));
        let targets: [Target; 3] = [
            ("config", config),
            ("annotation", annotation),
            ("path_tokens", path_tokens),
        ];
        for (name, run) in targets {
            let mut n = 0;
            for dir in ["corpus", "artifacts"] {
                if let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) {
                    for e in entries.flatten() {
                        run(&std::fs::read(e.path()).expect("corpus file"));
                        n += 1;
                    }
                }
            }
            assert!(n > 0, "no seeds for {name}");
        }
    }

    /// A chain function's hop (an unsigned passthrough segment between two
    /// segments of its manager) passes a peer's check; any variation that
    /// would let a hop be forged does not.
    #[test]
    fn function_hop_is_vouched_for_by_its_manager_only() {
        use crate::token::TokenError;
        let ids = ids();
        let now = SystemTime::now();
        let exp = now + Duration::from_secs(60);
        let seg = |name: &str, id: &str, token: String| PathSegment {
            name: name.into(),
            id: id.into(),
            token,
            ..Default::default()
        };
        let path = |x_signer: &Identity, x_aud: &str, f_name: &str| Path {
            index: 3,
            path_segments: vec![
                seg(
                    "node-1",
                    "x",
                    token::sign(x_signer, x_aud, "x", now, exp).unwrap(),
                ),
                seg(f_name, "f", String::new()),
                seg(
                    "node-1",
                    "z",
                    token::sign(&ids.member, &ids.server.id, "z", now, exp).unwrap(),
                ),
                seg("node-2", "own", String::new()),
            ],
        };
        let cert = ids.member.chain[0].clone();
        let check = |p: &Path| {
            token::verify_path(
                p,
                2,
                3,
                Caller::Peer {
                    id: &ids.member.id,
                    cert: &cert,
                },
                &ids.server.id,
                &ids.server.roots,
                now,
            )
        };
        assert_eq!(check(&path(&ids.member, "fn-1", "fn-1")), Ok(()));
        // Not the endpoint the manager dispatched to.
        assert_eq!(
            check(&path(&ids.member, "fn-1", "fn-2")),
            Err(TokenError::Unsigned { index: 1 })
        );
        // Dispatched by another manager than the one it came back through.
        assert_eq!(
            check(&path(&ids.server, "fn-1", "fn-1")),
            Err(TokenError::Unsigned { index: 1 })
        );
        // A forged dispatch token (untrusted CA) is caught when verified.
        assert!(check(&path(&ids.rogue, "fn-1", "fn-1")).is_err());
    }

    /// A seeded random run of the structured target, so the interesting
    /// branches (valid signatures) are reached without libFuzzer.
    #[test]
    fn random_structured_requests() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..300 {
            let data: Vec<u8> = (0..200)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                })
                .collect();
            path_tokens(&data);
        }
    }
}
