//! `NetworkService` and `NetworkServiceEndpoint` custom resources, group
//! `networkservicemesh.io`, version `v1`, shaped as NSM's: the `spec` of
//! each is the registry message with its proto field names (snake_case), so
//! that NSM manifests apply unchanged and a registry entry converts to an
//! object and back without loss.

use std::collections::BTreeMap;

use kube::CustomResource;
use kube::CustomResourceExt;
use nsm_proto::registry;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of NSM's resources.
pub const GROUP: &str = "networkservicemesh.io";

/// A network service: a name clients ask for, its payload and its matches.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "networkservicemesh.io",
    version = "v1",
    kind = "NetworkService",
    plural = "networkservices",
    shortname = "netsvc",
    namespaced
)]
pub struct NetworkServiceSpec {
    /// The service's name; empty means the object's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// `IP` or `ETHERNET`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub payload: String,
    /// Selection rules, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<Match>,
    /// Path ids (NSM's interdomain bookkeeping).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_ids: Vec<String>,
}

/// One selection rule: clients whose labels contain `source_selector` go to
/// endpoints that `routes` select.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct Match {
    /// Labels the request must carry (empty matches every request).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_selector: BTreeMap<String, String>,
    /// Where matching requests go.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Destination>,
    /// Move on to the next match when no endpoint is selected.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fallthrough: bool,
    /// Extra labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

/// Labels of a match.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct Metadata {
    /// The labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Endpoints selected by their labels for this service.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct Destination {
    /// Labels the endpoint must carry for the service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub destination_selector: BTreeMap<String, String>,
    /// Relative weight among the routes of a match.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub weight: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// A registered endpoint: which services it serves, with which labels, where.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "networkservicemesh.io",
    version = "v1",
    kind = "NetworkServiceEndpoint",
    plural = "networkserviceendpoints",
    shortname = "nse",
    namespaced
)]
pub struct NetworkServiceEndpointSpec {
    /// The endpoint's name; empty means the object's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Services it serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_service_names: Vec<String>,
    /// Its labels per service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub network_service_labels: BTreeMap<String, NetworkServiceLabels>,
    /// Where its manager reaches it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// When the registration lapses unless refreshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration_time: Option<Timestamp>,
    /// When it first registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_registration_time: Option<Timestamp>,
    /// Path ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_ids: Vec<String>,
}

/// Labels of an endpoint for one service.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct NetworkServiceLabels {
    /// The labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A protobuf timestamp as NSM's Go types write it in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    #[serde(default)]
    pub seconds: i64,
    /// Nanoseconds within the second.
    #[serde(default)]
    pub nanos: i32,
}

impl From<prost_types::Timestamp> for Timestamp {
    fn from(t: prost_types::Timestamp) -> Self {
        Timestamp {
            seconds: t.seconds,
            nanos: t.nanos,
        }
    }
}

impl From<Timestamp> for prost_types::Timestamp {
    fn from(t: Timestamp) -> Self {
        prost_types::Timestamp {
            seconds: t.seconds,
            nanos: t.nanos,
        }
    }
}

impl NetworkService {
    /// The registry message; the object's name stands in for an empty `spec.name`.
    pub fn to_registry(&self) -> registry::NetworkService {
        let s = &self.spec;
        registry::NetworkService {
            name: if s.name.is_empty() {
                self.metadata.name.clone().unwrap_or_default()
            } else {
                s.name.clone()
            },
            payload: s.payload.clone(),
            matches: s
                .matches
                .iter()
                .map(|m| registry::Match {
                    source_selector: m.source_selector.clone().into_iter().collect(),
                    routes: m
                        .routes
                        .iter()
                        .map(|d| registry::Destination {
                            destination_selector: d
                                .destination_selector
                                .clone()
                                .into_iter()
                                .collect(),
                            weight: d.weight,
                        })
                        .collect(),
                    fallthrough: m.fallthrough,
                    metadata: m.metadata.as_ref().map(|md| registry::Metadata {
                        labels: md.labels.clone().into_iter().collect(),
                    }),
                })
                .collect(),
            path_ids: s.path_ids.clone(),
        }
    }

    /// The object for a registry message (named after the service).
    pub fn from_registry(ns: &registry::NetworkService) -> Self {
        NetworkService::new(
            &ns.name,
            NetworkServiceSpec {
                name: ns.name.clone(),
                payload: ns.payload.clone(),
                matches: ns
                    .matches
                    .iter()
                    .map(|m| Match {
                        source_selector: m.source_selector.clone().into_iter().collect(),
                        routes: m
                            .routes
                            .iter()
                            .map(|d| Destination {
                                destination_selector: d
                                    .destination_selector
                                    .clone()
                                    .into_iter()
                                    .collect(),
                                weight: d.weight,
                            })
                            .collect(),
                        fallthrough: m.fallthrough,
                        metadata: m.metadata.as_ref().map(|md| Metadata {
                            labels: md.labels.clone().into_iter().collect(),
                        }),
                    })
                    .collect(),
                path_ids: ns.path_ids.clone(),
            },
        )
    }
}

impl NetworkServiceEndpoint {
    /// The registry message; the object's name stands in for an empty `spec.name`.
    pub fn to_registry(&self) -> registry::NetworkServiceEndpoint {
        let s = &self.spec;
        registry::NetworkServiceEndpoint {
            name: if s.name.is_empty() {
                self.metadata.name.clone().unwrap_or_default()
            } else {
                s.name.clone()
            },
            network_service_names: s.network_service_names.clone(),
            network_service_labels: s
                .network_service_labels
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        registry::NetworkServiceLabels {
                            labels: v.labels.clone().into_iter().collect(),
                        },
                    )
                })
                .collect(),
            url: s.url.clone(),
            expiration_time: s.expiration_time.map(Into::into),
            initial_registration_time: s.initial_registration_time.map(Into::into),
            path_ids: s.path_ids.clone(),
        }
    }

    /// The object for a registry message (named after the endpoint).
    pub fn from_registry(nse: &registry::NetworkServiceEndpoint) -> Self {
        NetworkServiceEndpoint::new(
            &nse.name,
            NetworkServiceEndpointSpec {
                name: nse.name.clone(),
                network_service_names: nse.network_service_names.clone(),
                network_service_labels: nse
                    .network_service_labels
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            NetworkServiceLabels {
                                labels: v.labels.clone().into_iter().collect(),
                            },
                        )
                    })
                    .collect(),
                url: nse.url.clone(),
                expiration_time: nse.expiration_time.map(Into::into),
                initial_registration_time: nse.initial_registration_time.map(Into::into),
                path_ids: nse.path_ids.clone(),
            },
        )
    }
}

/// The API group of nsm-rs's own resources (not NSM's).
pub const NSM_RS_GROUP: &str = "nsm-rs.io";

/// A service-chaining policy of nsm-rs (see `nsm_policy` and the README's
/// "Service chains"): the object's name is the policy's name, the spec is
/// the policy without it. `match` and `chain` are checked by the managers,
/// which log a bad object naming it and keep its last good version in force;
/// the schema only keeps them objects.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "nsm-rs.io",
    version = "v1alpha1",
    kind = "ChainPolicy",
    plural = "chainpolicies",
    shortname = "chainpol",
    namespaced
)]
pub struct ChainPolicySpec {
    /// Lower applies first, nearer the client (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Which connections (and optionally packets) it applies to:
    /// `{service, source: {labels}, proto, src, dst, src_port, dst_port}`.
    #[serde(rename = "match")]
    #[schemars(schema_with = "free_object")]
    pub matches: serde_json::Value,
    /// The ordered functions, each a one-key map (`{acl: {...}}`).
    #[serde(default)]
    #[schemars(schema_with = "free_objects")]
    pub chain: Vec<serde_json::Value>,
}

fn free_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn free_objects(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
    })
}

impl ChainPolicy {
    /// The policy this object holds, checked on its own.
    ///
    /// # Errors
    /// The object does not hold a valid policy (the error names it).
    pub fn to_policy(&self) -> Result<nsm_policy::Policy, nsm_policy::PolicyError> {
        let name = self.metadata.name.clone().unwrap_or_default();
        let mut v = serde_json::json!({
            "name": name,
            "match": self.spec.matches,
            "chain": self.spec.chain,
        });
        if let Some(p) = self.spec.priority {
            v["priority"] = p.into();
        }
        let policy = nsm_policy::parse_values(vec![v])?
            .pop()
            .expect("one value in, one policy out");
        nsm_policy::PolicySet::new(vec![policy.clone()])?;
        Ok(policy)
    }
}

/// An address block of a service pool, claimed by one node's manager
/// (cluster-wide IPAM, see `nsm_manager::ipam`). The object's name is the
/// block (`v4-172-31-1-16-28` for 172.31.1.16/28): creating it is the claim,
/// so two managers can never own the same addresses, whatever service or
/// pool they allocate for. A manager hands out point-to-point addresses only
/// inside its own blocks and keeps them (with their leases) across restarts.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "nsm-rs.io",
    version = "v1alpha1",
    kind = "IPAMBlock",
    plural = "ipamblocks",
    shortname = "ipblk",
    namespaced,
    printcolumn = r#"{"name":"CIDR","type":"string","jsonPath":".spec.cidr"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#
)]
pub struct IPAMBlockSpec {
    /// The block, e.g. `172.31.1.16/28`.
    pub cidr: String,
    /// The manager (node name) that owns it.
    pub node: String,
    /// The network service whose pool it was cut from.
    pub service: String,
}

impl IPAMBlock {
    /// The object name of block `cidr`: the family, its address and length
    /// with every `.` and `:` as `-` (`v6-fd00--10-124`): a valid object name
    /// for any IPv4 or IPv6 block, and one name per block.
    pub fn name_of(cidr: &ipnet::IpNet) -> String {
        let family = if cidr.addr().is_ipv4() { "v4" } else { "v6" };
        format!("{family}-{}-{}", cidr.network(), cidr.prefix_len()).replace(['.', ':'], "-")
    }
}

/// One authorization rule of nsm-rs (the rules of the manager's
/// `authorization:` config section, as objects): which callers may request
/// which network services. Every manager follows these objects; a request is
/// allowed when any rule (objects or config) allows it. The keys are the
/// config's: `services` (names, or `*`), `spiffe_ids` (a trailing `*`
/// matches a prefix), `uids` (local clients), `service_accounts` (pods'
/// annotation requests), `labels` (the request must carry them all).
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "nsm-rs.io",
    version = "v1alpha1",
    kind = "ServiceAuthorization",
    plural = "serviceauthorizations",
    shortname = "svcauthz",
    namespaced
)]
pub struct ServiceAuthorizationSpec {
    /// Network service names, or `*` for every service.
    #[schemars(length(min = 1))]
    pub services: Vec<String>,
    /// Callers by SPIFFE ID (peers over mTLS); a trailing `*` is a prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spiffe_ids: Vec<String>,
    /// Local callers by uid (the manager's unix socket, SO_PEERCRED).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uids: Vec<u32>,
    /// Pods asking through their `networkservicemesh.io` annotation, by
    /// service account: `NAMESPACE/NAME`, or a prefix ending in `*`
    /// (`NAMESPACE/*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// Labels the request must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Every CRD of nsm-rs, in the order they are applied.
pub fn all()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![
        NetworkService::crd(),
        NetworkServiceEndpoint::crd(),
        ChainPolicy::crd(),
        IPAMBlock::crd(),
        ServiceAuthorization::crd(),
    ]
}

/// The CRDs as one multi-document YAML file (what `deploy/crds.yaml` holds).
pub fn yaml() -> String {
    let mut out = String::from(
        "# Generated by `cargo run -p nsm-k8s --bin nsm-crdgen` from k8s/src/crd.rs: do not edit.\n",
    );
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&crd).expect("a CRD serializes"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An NSM manifest, as NSM's documentation writes it.
    const NSM_MANIFEST: &str = r#"
apiVersion: networkservicemesh.io/v1
kind: NetworkService
metadata:
  name: secure-net
  namespace: nsm-system
spec:
  payload: IP
  matches:
    - source_selector:
        app: firewall
      routes:
        - destination_selector:
            app: vpn-gateway
    - routes:
        - destination_selector:
            app: firewall
      fallthrough: true
"#;

    #[test]
    fn nsm_manifest_converts_to_the_registry_message() {
        let ns: NetworkService = serde_norway::from_str(NSM_MANIFEST).unwrap();
        let r = ns.to_registry();
        assert_eq!(r.name, "secure-net");
        assert_eq!(r.payload, "IP");
        assert_eq!(r.matches[0].source_selector["app"], "firewall");
        assert_eq!(
            r.matches[0].routes[0].destination_selector["app"],
            "vpn-gateway"
        );
        assert!(r.matches[1].fallthrough);
        let back = NetworkService::from_registry(&r);
        assert_eq!(back.to_registry(), r);
    }

    #[test]
    fn endpoint_round_trips() {
        let nse = registry::NetworkServiceEndpoint {
            name: "echo".into(),
            network_service_names: vec!["secure-net".into()],
            network_service_labels: [(
                "secure-net".to_string(),
                registry::NetworkServiceLabels {
                    labels: [("app".to_string(), "echo".to_string())].into(),
                },
            )]
            .into(),
            url: "tcp://198.51.100.2:5001".into(),
            expiration_time: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 5,
            }),
            ..Default::default()
        };
        let obj = NetworkServiceEndpoint::from_registry(&nse);
        let json = serde_json::to_value(&obj).unwrap();
        assert_eq!(json["spec"]["network_service_names"][0], "secure-net");
        assert_eq!(json["spec"]["expiration_time"]["seconds"], 1_800_000_000i64);
        assert_eq!(obj.to_registry(), nse);
    }
}
