//! Authorization: which callers may request which network services, and
//! who may change a registry entry.
//!
//! The policy is the `authorization:` section of the manager's `--config`:
//!
//! ```yaml
//! authorization:
//!   rules:
//!     - services: [secure-net]          # "*" = every service
//!       spiffe_ids: ["spiffe://nsm.test/nsm-manager/*"]   # trailing * = prefix
//!       uids: [0, 1000]                 # local clients (SO_PEERCRED)
//!       labels: {app: web}              # the request's labels must contain these
//! ```
//!
//! Without the section everything is allowed (the documented default, so
//! that a lab without identities keeps working). With it, a request is
//! allowed when at least one rule matches: its service list names the
//! service (or `*`), the caller matches one of its `spiffe_ids` or `uids`
//! (a rule listing neither matches any caller), and its `labels` are all
//! in the request's connection labels. Everything else is PermissionDenied,
//! checked before anything is allocated or programmed.
//!
//! In cluster mode, `ServiceAuthorization` objects (`nsm-rs.io/v1alpha1`,
//! one rule each, same keys) add rules: [`follow_cluster`] keeps the
//! manager's copy in step. Authorization is enforced when the config has the
//! section or at least one object exists; a request is then allowed when a
//! rule of either allows it. Deleting the last object opens the services
//! again unless the config has the section (`authorization: {rules: []}`
//! makes the objects the only way in).
//!
//! Registry ownership: the first registration of an endpoint name records
//! its [`Principal`]; updates and Unregister from another principal are
//! PermissionDenied. A peer manager forwards registrations for its local
//! endpoints with the local principal in metadata ([`MD_ON_BEHALF`]); the
//! registry manager scopes that claim under the peer's verified SPIFFE ID,
//! so a manager can only speak for its own node's clients.

use std::collections::HashMap;

use serde::Deserialize;

/// gRPC metadata a manager sets when forwarding a local client's registry
/// call: the local principal (e.g. `uid:1000`).
pub const MD_ON_BEHALF: &str = "nsm-on-behalf-of";

/// Who is calling, as established by the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The manager itself (refreshes, pod reconciliation).
    Internal,
    /// A local client on the unix socket (SO_PEERCRED).
    Local {
        /// Its uid.
        uid: u32,
        /// Its gid.
        gid: u32,
    },
    /// A peer over mTLS, by SPIFFE ID; `on_behalf` is the local principal
    /// the peer says it forwards for.
    Peer {
        /// The verified SPIFFE ID.
        id: String,
        /// The forwarded local principal, if any.
        on_behalf: Option<String>,
    },
    /// A pod asking through its `networkservicemesh.io` annotation (cluster
    /// mode): whoever may create or annotate pods running as this service
    /// account.
    Pod {
        /// The pod's namespace.
        namespace: String,
        /// Its `spec.serviceAccountName` (`default` when unset).
        service_account: String,
    },
    /// A TCP peer without TLS (insecure mode: no identity configured).
    Anonymous,
}

impl Principal {
    /// The owner string stored with a registry entry.
    pub fn owner_key(&self) -> String {
        match self {
            Principal::Internal => "internal".into(),
            Principal::Local { uid, .. } => format!("uid:{uid}"),
            Principal::Peer { id, on_behalf } => match on_behalf {
                Some(b) => format!("{id}#{b}"),
                None => id.clone(),
            },
            Principal::Pod {
                namespace,
                service_account,
            } => format!("serviceaccount:{namespace}/{service_account}"),
            Principal::Anonymous => "anonymous".into(),
        }
    }
}

/// The principal of a request, from what the transport established: the
/// mTLS peer (with the local principal it forwards for, if any), the unix
/// socket's peer credentials, or nothing (TCP without TLS).
pub fn principal_of<T>(r: &tonic::Request<T>) -> Principal {
    if let Some(p) = crate::tls::peer_of(r) {
        let on_behalf = r
            .metadata()
            .get(MD_ON_BEHALF)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 64)
            .map(str::to_string);
        return Principal::Peer {
            id: p.spiffe_id.clone(),
            on_behalf,
        };
    }
    if let Some(u) = r
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
    {
        return match u.peer_cred {
            Some(c) => Principal::Local {
                uid: c.uid(),
                gid: c.gid(),
            },
            None => Principal::Anonymous,
        };
    }
    Principal::Anonymous
}

/// One rule of the policy (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Service names, or `*`.
    pub services: Vec<String>,
    /// SPIFFE IDs (a trailing `*` matches a prefix).
    #[serde(default)]
    pub spiffe_ids: Vec<String>,
    /// Local uids.
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Pods (annotation requests) by service account, `NAMESPACE/NAME`; a
    /// trailing `*` matches a prefix (`team-a/*`: every account of team-a).
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Labels the request must carry.
    #[serde(default)]
    pub labels: HashMap<String, String>,
}

/// The policy: absent = allow all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Allowing rules; no rule = deny all.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// `NAMESPACE/NAME`, or a prefix of one ending in `*` (`ns/*`, `ns/web-*`,
/// `team-*`); no other `*`, no whitespace, no empty namespace.
fn valid_service_account(a: &str) -> bool {
    let (body, prefix) = match a.strip_suffix('*') {
        Some(b) => (b, true),
        None => (a, false),
    };
    if body.is_empty() || body.contains('*') || body.chars().any(char::is_whitespace) {
        return false;
    }
    match body.split_once('/') {
        Some((ns, name)) => !ns.is_empty() && !name.contains('/') && (prefix || !name.is_empty()),
        None => prefix,
    }
}

fn id_matches(pattern: &str, id: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix),
        None => pattern == id,
    }
}

impl Rule {
    /// Checks what serde cannot: each service account is `NAMESPACE/NAME`,
    /// or a prefix ending in `*` that names a namespace (`NAMESPACE/*`,
    /// `team-*`), so that a typo cannot quietly match nobody or everybody.
    ///
    /// # Errors
    /// What is wrong, naming the value.
    pub fn check(&self) -> Result<(), String> {
        if let Some(a) = self
            .service_accounts
            .iter()
            .find(|a| !valid_service_account(a))
        {
            return Err(format!(
                "service_accounts: `{a}` is not NAMESPACE/NAME (or a prefix ending in *, such as NAMESPACE/*)"
            ));
        }
        Ok(())
    }

    fn allows(&self, who: &Principal, service: &str, labels: &HashMap<String, String>) -> bool {
        let svc = self.services.iter().any(|s| s == "*" || s == service);
        let any_caller =
            self.spiffe_ids.is_empty() && self.uids.is_empty() && self.service_accounts.is_empty();
        let caller = any_caller
            || match who {
                Principal::Internal => true,
                Principal::Local { uid, .. } => self.uids.contains(uid),
                Principal::Peer { id, .. } => self.spiffe_ids.iter().any(|p| id_matches(p, id)),
                Principal::Pod {
                    namespace,
                    service_account,
                } => {
                    let sa = format!("{namespace}/{service_account}");
                    self.service_accounts.iter().any(|p| id_matches(p, &sa))
                }
                Principal::Anonymous => false,
            };
        let lbl = self
            .labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|x| x == v));
        svc && caller && lbl
    }
}

impl Policy {
    /// Whether `who` may request `service` with `labels`.
    pub fn allows(&self, who: &Principal, service: &str, labels: &HashMap<String, String>) -> bool {
        Self::rules_allow(&self.rules, who, service, labels)
    }

    /// Whether any of `rules` lets `who` request `service` with `labels`
    /// (the manager itself always may).
    pub fn rules_allow(
        rules: &[Rule],
        who: &Principal,
        service: &str,
        labels: &HashMap<String, String>,
    ) -> bool {
        matches!(who, Principal::Internal) || rules.iter().any(|r| r.allows(who, service, labels))
    }

    /// Parses a policy alone (YAML), for tests and fuzzing.
    ///
    /// # Errors
    /// serde's message.
    pub fn parse(text: &str) -> Result<Policy, String> {
        serde_norway::from_str(text).map_err(|e| e.to_string())
    }
}

/// The rule a `ServiceAuthorization` object holds.
///
/// # Errors
/// The object names no service.
pub fn rule_of(obj: &nsm_k8s::crd::ServiceAuthorization) -> Result<Rule, String> {
    let s = &obj.spec;
    if s.services.is_empty() || s.services.iter().any(String::is_empty) {
        return Err("services must name at least one service (or \"*\")".into());
    }
    if let Some(bad) = s.spiffe_ids.iter().find(|i| !i.starts_with("spiffe://")) {
        return Err(format!("spiffe_ids: `{bad}` is not a spiffe:// ID"));
    }
    let rule = Rule {
        services: s.services.clone(),
        spiffe_ids: s.spiffe_ids.clone(),
        uids: s.uids.clone(),
        service_accounts: s.service_accounts.clone(),
        labels: s.labels.clone().into_iter().collect(),
    };
    rule.check()?;
    Ok(rule)
}

/// Follows the ServiceAuthorization objects of `api` forever (until
/// aborted), handing their rules to `manager` after the first complete list
/// and on every change. A bad object is logged naming it and allows nothing;
/// while the API server is away the last rules stay in force.
pub async fn follow_cluster(
    manager: std::sync::Arc<crate::manager::Manager>,
    api: kube::Api<nsm_k8s::crd::ServiceAuthorization>,
) {
    use kube::runtime::{WatchStreamExt, watcher};
    use std::collections::BTreeMap;
    use tokio_stream::StreamExt;

    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut rules: BTreeMap<String, Rule> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, Rule>> = None;
    let mut synced = false;
    // A bad object still counts (as a rule that allows nothing): that it
    // exists turns enforcement on, so a typo never opens the services.
    let accept = |o: &nsm_k8s::crd::ServiceAuthorization| -> Option<(String, Rule)> {
        let name = kube::ResourceExt::name_any(o);
        match rule_of(o) {
            Ok(r) => Some((name, r)),
            Err(e) => {
                tracing::error!(serviceauthorization = %name, error = %e, "ServiceAuthorization allows nothing");
                Some((name, Rule::default()))
            }
        }
    };
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => listing = Some(BTreeMap::new()),
            Ok(watcher::Event::InitApply(o)) => {
                if let (Some(l), Some((name, r))) = (listing.as_mut(), accept(&o)) {
                    l.insert(name, r);
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(l) = listing.take() {
                    rules = l;
                }
                synced = true;
            }
            Ok(watcher::Event::Apply(o)) => {
                let name = kube::ResourceExt::name_any(&o);
                match accept(&o) {
                    Some((_, r)) => rules.insert(name, r),
                    None => rules.remove(&name),
                };
            }
            Ok(watcher::Event::Delete(o)) => {
                rules.remove(&kube::ResourceExt::name_any(&o));
            }
            Err(e) => {
                tracing::warn!(error = %e, "ServiceAuthorization watch failed; the rules in force stay, retrying");
                continue;
            }
        }
        if synced {
            tracing::info!(rules = rules.len(), "ServiceAuthorization objects applied");
            manager.set_cluster_authorization(rules.values().cloned().collect());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        let p = Policy::parse(
            "rules:\n- services: [a]\n  uids: [1000]\n- services: ['*']\n  spiffe_ids: ['spiffe://td/nsm-manager/*']\n- services: [b]\n  labels: {app: web}\n",
        )
        .unwrap();
        let none = HashMap::new();
        let web = HashMap::from([("app".to_string(), "web".to_string())]);
        let u = |uid| Principal::Local { uid, gid: 0 };
        assert!(p.allows(&u(1000), "a", &none));
        assert!(!p.allows(&u(1001), "a", &none));
        assert!(p.allows(&u(1001), "b", &web));
        assert!(!p.allows(&u(1001), "b", &none));
        let peer = |id: &str| Principal::Peer {
            id: id.into(),
            on_behalf: None,
        };
        assert!(p.allows(&peer("spiffe://td/nsm-manager/n2"), "z", &none));
        assert!(!p.allows(&peer("spiffe://td/other"), "z", &none));
        assert!(!p.allows(&Principal::Anonymous, "a", &none));
        assert!(Policy::parse("rules:\n- servics: [a]\n").is_err());
    }

    #[test]
    fn pods_match_by_service_account_only() {
        let p = Policy::parse(
            "rules:\n- services: [a]\n  service_accounts: [shop/web, 'team-*']\n- services: [b]\n  uids: [0]\n- services: [c]\n  labels: {app: web}\n",
        )
        .unwrap();
        let none = HashMap::new();
        let web = HashMap::from([("app".to_string(), "web".to_string())]);
        let pod = |ns: &str, sa: &str| Principal::Pod {
            namespace: ns.into(),
            service_account: sa.into(),
        };
        assert!(p.allows(&pod("shop", "web"), "a", &none));
        assert!(p.allows(&pod("team-x", "default"), "a", &none));
        assert!(!p.allows(&pod("shop", "db"), "a", &none));
        assert!(!p.allows(&pod("shopping", "web"), "a", &none));
        // A uid rule is not a pod rule: root on the node is not every pod.
        assert!(!p.allows(&pod("shop", "web"), "b", &none));
        assert!(!p.allows(&Principal::Local { uid: 0, gid: 0 }, "a", &none));
        // A rule naming no caller matches pods as it matches everyone.
        assert!(p.allows(&pod("any", "default"), "c", &web));
        assert!(!p.allows(&pod("any", "default"), "c", &none));
        assert_eq!(pod("shop", "web").owner_key(), "serviceaccount:shop/web");
    }

    #[test]
    fn service_account_patterns_are_checked() {
        let rule = |a: &str| Rule {
            services: vec!["a".into()],
            service_accounts: vec![a.into()],
            ..Rule::default()
        };
        for good in ["shop/web", "shop/*", "shop/web-*", "team-*", "x*"] {
            assert!(rule(good).check().is_ok(), "{good}");
        }
        for bad in [
            "",
            "*",
            "web",
            "/web",
            "shop/",
            "shop/a/b",
            "sh*p/web",
            "shop/ web",
            "a/b/*",
        ] {
            let e = rule(bad).check().unwrap_err();
            assert!(e.contains("service_accounts"), "{bad}: {e}");
        }
    }
}
