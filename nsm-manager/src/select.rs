//! Endpoint selection with NSM's match semantics (sdk `discover` +
//! `roundrobin`): the first `Match` whose `source_selector` is contained in
//! the request labels applies; its routes' `destination_selector`s pick
//! endpoints by their per-service labels; `fallthrough` moves on when that
//! picked none; with no applicable match every endpoint of the service is a
//! candidate. Pure functions so that they are tested without any server.

use std::collections::HashMap;

use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};

/// `small ⊆ big` for label maps.
pub fn is_subset(small: &HashMap<String, String>, big: &HashMap<String, String>) -> bool {
    small.iter().all(|(k, v)| big.get(k) == Some(v))
}

/// The labels an endpoint declares for `service`.
pub fn endpoint_labels<'a>(
    nse: &'a NetworkServiceEndpoint,
    service: &str,
) -> Option<&'a HashMap<String, String>> {
    nse.network_service_labels.get(service).map(|l| &l.labels)
}

fn offers(nse: &NetworkServiceEndpoint, service: &str) -> bool {
    nse.network_service_names.iter().any(|n| n == service)
}

/// Why nothing can be selected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// The service has no registered endpoint at all.
    #[error("network service `{0}` has no registered endpoint")]
    NoEndpoints(String),
    /// Endpoints exist but the applicable match picks none.
    #[error("network service `{service}`: no endpoint matches request labels {labels}")]
    NoMatch {
        /// The service.
        service: String,
        /// The request labels, rendered `{k=v,...}`.
        labels: String,
    },
}

/// Candidate endpoints for a request, in registry order.
///
/// # Errors
/// [`SelectError`] when there is none.
pub fn candidates<'a>(
    ns: &NetworkService,
    endpoints: &'a [NetworkServiceEndpoint],
    labels: &HashMap<String, String>,
) -> Result<Vec<&'a NetworkServiceEndpoint>, SelectError> {
    let all: Vec<&NetworkServiceEndpoint> =
        endpoints.iter().filter(|e| offers(e, &ns.name)).collect();
    if all.is_empty() {
        return Err(SelectError::NoEndpoints(ns.name.clone()));
    }
    let empty = HashMap::new();
    for m in &ns.matches {
        if !is_subset(&m.source_selector, labels) {
            continue;
        }
        let picked: Vec<&NetworkServiceEndpoint> = all
            .iter()
            .copied()
            .filter(|e| {
                let el = endpoint_labels(e, &ns.name).unwrap_or(&empty);
                // A match without routes constrains nothing about the destination.
                m.routes.is_empty()
                    || m.routes
                        .iter()
                        .any(|r| is_subset(&r.destination_selector, el))
            })
            .collect();
        if picked.is_empty() && m.fallthrough {
            continue;
        }
        if picked.is_empty() {
            let mut kv: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            kv.sort();
            return Err(SelectError::NoMatch {
                service: ns.name.clone(),
                labels: format!("{{{}}}", kv.join(",")),
            });
        }
        return Ok(picked);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_proto::registry::{Destination, Match, NetworkServiceLabels};

    fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn nse(name: &str, svc: &str, l: &[(&str, &str)]) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: vec![svc.into()],
            network_service_labels: [(svc.to_string(), NetworkServiceLabels { labels: labels(l) })]
                .into(),
            ..Default::default()
        }
    }

    fn m(src: &[(&str, &str)], dst: &[&[(&str, &str)]], fallthrough: bool) -> Match {
        Match {
            source_selector: labels(src),
            routes: dst
                .iter()
                .map(|d| Destination {
                    destination_selector: labels(d),
                    weight: 0,
                })
                .collect(),
            fallthrough,
            metadata: None,
        }
    }

    fn names(v: &[&NetworkServiceEndpoint]) -> Vec<String> {
        v.iter().map(|e| e.name.clone()).collect()
    }

    #[test]
    fn no_matches_means_any_endpoint_of_the_service() {
        let ns = NetworkService {
            name: "s".into(),
            ..Default::default()
        };
        let eps = vec![
            nse("a", "s", &[]),
            nse("b", "other", &[]),
            nse("c", "s", &[("x", "1")]),
        ];
        assert_eq!(
            names(&candidates(&ns, &eps, &labels(&[])).unwrap()),
            ["a", "c"]
        );
        assert_eq!(
            candidates(&ns, &eps[1..2], &labels(&[])).unwrap_err(),
            SelectError::NoEndpoints("s".into())
        );
    }

    #[test]
    fn first_applicable_match_and_fallthrough() {
        let ns = NetworkService {
            name: "s".into(),
            matches: vec![
                m(&[("app", "web")], &[&[("tier", "gold")]], true),
                m(&[("app", "web")], &[&[("tier", "silver")]], false),
                m(&[], &[&[("tier", "bronze")]], false),
            ],
            ..Default::default()
        };
        let gold = nse("g", "s", &[("tier", "gold")]);
        let silver = nse("s1", "s", &[("tier", "silver")]);
        let bronze = nse("b", "s", &[("tier", "bronze")]);
        let eps = vec![gold.clone(), silver.clone(), bronze.clone()];
        let web = labels(&[("app", "web"), ("extra", "y")]);
        assert_eq!(names(&candidates(&ns, &eps, &web).unwrap()), ["g"]);
        // gold gone: fallthrough to the silver match.
        let eps2 = vec![silver.clone(), bronze.clone()];
        assert_eq!(names(&candidates(&ns, &eps2, &web).unwrap()), ["s1"]);
        // silver gone too: the silver match does not fall through.
        let eps3 = vec![bronze.clone()];
        assert!(matches!(
            candidates(&ns, &eps3, &web),
            Err(SelectError::NoMatch { .. })
        ));
        // Other clients reach the catch-all match.
        assert_eq!(
            names(&candidates(&ns, &eps, &labels(&[("app", "db")])).unwrap()),
            ["b"]
        );
    }

    #[test]
    fn no_match_message_names_service_and_labels() {
        let ns = NetworkService {
            name: "secure".into(),
            matches: vec![m(&[], &[&[("app", "nope")]], false)],
            ..Default::default()
        };
        let e = candidates(
            &ns,
            &[nse("a", "secure", &[("app", "echo")])],
            &labels(&[("k", "v")]),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "network service `secure`: no endpoint matches request labels {k=v}"
        );
    }
}
