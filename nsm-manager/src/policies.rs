//! The `--policies` file: loading it, and following its changes.
//!
//! The file holds `policies: [...]` in the language of [`nsm_policy`]
//! (YAML or JSON). It is read at start (a bad file stops the manager with
//! the policy named) and then re-read every [`POLL`]: a changed file that
//! checks out is put in force at once, re-chaining running connections in
//! place ([`Manager::set_policies`]); one that does not is logged, naming
//! the policy, and the set in force stays. A file that disappears counts
//! as empty: no policies.
//!
//! In cluster mode the manager also follows the `ChainPolicy` objects of
//! its namespace ([`follow_cluster`]); what is in force is the union of
//! both sources. A bad object is logged, naming it, and its last good
//! version stays in force.
//!
//! Polling the content rather than watching inotify events keeps this
//! right for every way of editing a file (in place, rename over it, a
//! ConfigMap's symlink swap), at the cost of one small read a second.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nsm_policy::{PolicyError, PolicySet};

use crate::manager::Manager;

/// How often the file is re-read.
pub const POLL: Duration = Duration::from_secs(1);
/// [`Manager::set_policy_source`] name of the `--policies` file.
pub const FILE: &str = "file";
/// [`Manager::set_policy_source`] name of the cluster's ChainPolicy objects.
pub const CLUSTER: &str = "cluster";

/// Why the policy file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PoliciesError {
    /// It cannot be read.
    #[error("policies {path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A policy is bad.
    #[error("policies {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which policy and what.
        source: PolicyError,
    },
}

/// Reads and checks the file; a missing file is an empty set.
///
/// # Errors
/// [`PoliciesError`].
pub fn load(path: &Path) -> Result<(PolicySet, String), PoliciesError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(PoliciesError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let set = nsm_policy::parse_file(&text).map_err(|source| PoliciesError::Invalid {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((set, text))
}

/// Follows `path` forever (until aborted), starting from the content
/// `seen` that is already in force.
pub async fn watch(manager: Arc<Manager>, path: PathBuf, mut seen: String) {
    let mut iv = tokio::time::interval(POLL);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        iv.tick().await;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the policies; the ones in force stay");
                continue;
            }
        };
        if text == seen {
            continue;
        }
        seen.clone_from(&text);
        let applied = match nsm_policy::parse_file(&text) {
            Ok(set) => {
                let names: Vec<&str> = set.policies().iter().map(|p| p.name.as_str()).collect();
                tracing::info!(path = %path.display(), policies = ?names, "policies changed; applying");
                manager
                    .set_policy_source(FILE, set.policies().to_vec())
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = applied {
            tracing::error!(path = %path.display(), error = %e, "policies rejected; the ones in force stay");
        }
    }
}

/// Follows the ChainPolicy objects of `api` forever (until aborted).
pub async fn follow_cluster(manager: Arc<Manager>, api: kube::Api<nsm_k8s::crd::ChainPolicy>) {
    use kube::runtime::{WatchStreamExt, watcher};
    use std::collections::BTreeMap;
    use tokio_stream::StreamExt;

    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    // The last good version of each object, by name.
    let mut good: BTreeMap<String, nsm_policy::Policy> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, nsm_policy::Policy>> = None;
    let mut synced = false;
    while let Some(ev) = stream.next().await {
        // What changed, to undo if the union is refused.
        let mut changed: Option<(String, Option<nsm_policy::Policy>)> = None;
        match ev {
            Ok(watcher::Event::Init) => listing = Some(BTreeMap::new()),
            Ok(watcher::Event::InitApply(o)) => {
                let name = kube::ResourceExt::name_any(&o);
                match o.to_policy() {
                    Ok(p) => {
                        if let Some(l) = listing.as_mut() {
                            l.insert(name, p);
                        }
                    }
                    Err(e) => {
                        tracing::error!(chainpolicy = %name, error = %e, "ChainPolicy rejected");
                        // Keep its last good version through a relist.
                        if let (Some(l), Some(p)) = (listing.as_mut(), good.get(&name)) {
                            l.insert(name, p.clone());
                        }
                    }
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(l) = listing.take() {
                    good = l;
                }
                synced = true;
            }
            Ok(watcher::Event::Apply(o)) => {
                let name = kube::ResourceExt::name_any(&o);
                match o.to_policy() {
                    Ok(p) => changed = Some((name.clone(), good.insert(name, p))),
                    Err(e) => {
                        tracing::error!(chainpolicy = %name, error = %e, "ChainPolicy rejected; its last good version stays");
                        continue;
                    }
                }
            }
            Ok(watcher::Event::Delete(o)) => {
                let name = kube::ResourceExt::name_any(&o);
                changed = Some((name.clone(), good.remove(&name)));
            }
            Err(e) => {
                tracing::warn!(error = %e, "ChainPolicy watch failed; retrying");
                continue;
            }
        }
        if !synced {
            continue;
        }
        let all: Vec<nsm_policy::Policy> = good.values().cloned().collect();
        if let Err(e) = manager.set_policy_source(CLUSTER, all).await {
            tracing::error!(error = %e, "ChainPolicy objects rejected; the policies in force stay");
            if let Some((name, before)) = changed {
                match before {
                    Some(p) => good.insert(name, p),
                    None => good.remove(&name),
                };
            }
        } else {
            tracing::info!(policies = good.len(), "ChainPolicy objects applied");
        }
    }
}
