//! The topology file: what a lab is made of.
//!
//! A topology is parsed strictly (`deny_unknown_fields`: a misspelt key is an
//! error, not a silently ignored line) and then validated as a whole, so that
//! a lab is only ever built from a file that makes sense. Every error names
//! its place (`pods[1] (web): ...`) on one line.
//!
//! The address plan is derived here too, deterministically from the order of
//! the nodes and pods in the file, so that `up`, `status` and the tests agree
//! on every address without asking the kernel.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer, Serialize};

use nsm_proto::annotation;

/// The longest lab name: namespace and state-directory names are built
/// from it, and short names keep `ip netns list` readable.
pub const MAX_LAB_NAME: usize = 24;
/// The longest node, pod or endpoint name.
pub const MAX_MEMBER_NAME: usize = 40;

/// A topology file as written by the user.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Lab name: `[a-z0-9][a-z0-9-]*`, at most 24 characters, unique on the host.
    pub name: String,
    /// The network joining the nodes.
    #[serde(default)]
    pub underlay: Underlay,
    /// The pods' primary network; each node gets the next /24 out of it
    /// (default 198.18.0.0/16, the benchmarking range of RFC 2544).
    #[serde(default = "default_pod_cidr")]
    pub pod_cidr: Ipv4Net,
    /// The nodes: one network namespace each, joined by the underlay.
    pub nodes: Vec<Node>,
    /// Network services that pods may request.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Pods that register as endpoints of a service.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Client pods.
    #[serde(default)]
    pub pods: Vec<Pod>,
    /// Service-chaining policies, in the language of [`nsm_policy`]; every
    /// manager of the lab follows them (see [`crate::Lab::set_policies`]).
    #[serde(default)]
    pub policies: Vec<nsm_policy::Policy>,
    /// Who may request which service: the registry manager's
    /// `authorization:` (nsm-manager's authz module). Absent: everyone may
    /// request everything. Only the first node's manager enforces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
}

/// An authorization policy: a request is allowed when one rule matches.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    /// The allowing rules; none = deny everything but the managers' own calls.
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
}

/// One allowing rule; a rule with neither `spiffe_ids` nor `uids` matches any caller.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRule {
    /// Service names, or `*`.
    pub services: Vec<String>,
    /// Callers' SPIFFE IDs (peer managers); a trailing `*` matches a prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spiffe_ids: Vec<String>,
    /// Local callers' uids (on the manager's unix socket).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uids: Vec<u32>,
    /// Labels the request must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The underlay between nodes: one bridge in its own namespace, one veth per node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Underlay {
    /// IPv4 block for node addresses; node *i* (from 0) gets host *i + 1*.
    /// Default 198.51.100.0/24 (TEST-NET-2; TEST-NET-1 is often a host's own network in test environments).
    #[serde(default = "default_underlay_cidr")]
    pub cidr: Ipv4Net,
    /// IPv6 block for node addresses, numbered as for IPv4.
    /// Default 2001:db8:0:1::/64 (documentation range).
    #[serde(default = "default_underlay_cidr6")]
    pub cidr6: Ipv6Net,
    /// MTU of the underlay links, in bytes (default 1500).
    #[serde(default = "default_mtu")]
    pub mtu: u32,
}

impl Default for Underlay {
    fn default() -> Self {
        Underlay {
            cidr: default_underlay_cidr(),
            cidr6: default_underlay_cidr6(),
            mtu: default_mtu(),
        }
    }
}

fn default_underlay_cidr() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(198, 51, 100, 0), 24).expect("valid prefix length")
}
fn default_underlay_cidr6() -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 0), 64).expect("valid prefix length")
}
fn default_pod_cidr() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(198, 18, 0, 0), 16).expect("valid prefix length")
}
fn default_mtu() -> u32 {
    1500
}

/// A node: a network namespace that runs the mesh's processes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Node name: `[a-z0-9][a-z0-9-]*`, unique among nodes, pods and endpoints.
    pub name: String,
}

/// The kind of packets a service carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum Payload {
    /// IP packets (a TUN device in the pod).
    #[default]
    #[serde(rename = "IP")]
    Ip,
    /// Ethernet frames (a TAP device in the pod).
    #[serde(rename = "ETHERNET")]
    Ethernet,
}

/// A network service: a name pods ask for, with an address pool.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Service name, as requested in annotations.
    pub name: String,
    /// `IP` (default) or `ETHERNET`.
    #[serde(default)]
    pub payload: Payload,
    /// Address pool(s) for connections: one CIDR or a list (IPv4 and/or IPv6).
    #[serde(deserialize_with = "one_or_many_nets")]
    pub cidr: Vec<IpNet>,
}

/// A pod that runs an endpoint of a service.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Endpoint (and pod) name.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// The service it serves.
    pub service: String,
    /// Labels matched by `destination_selector`s.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A shell command started in the endpoint's pod at `up` (e.g. `iperf3 -s -D`).
    #[serde(default)]
    pub run: Option<String>,
    /// `true`: run `nsm-passthrough` instead of `nsm-endpoint`: a chain
    /// function that forwards between its incoming interface and an onward
    /// connection to the original service, counting what it saw. Its
    /// service needs no entry in `services` (it allocates no addresses).
    #[serde(default)]
    pub passthrough: bool,
    /// Passthrough only: labels its onward requests carry over the
    /// client's (for composition by registry matches, as NSM's passthroughs).
    #[serde(default)]
    pub onward_labels: BTreeMap<String, String>,
}

/// A client pod.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// Pod annotations; `networkservicemesh.io` asks for connections.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Pod labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A shell command started in the pod at `up`.
    #[serde(default)]
    pub run: Option<String>,
    /// `true`: the testbed makes the pod's namespace but no network in it; a
    /// CNI plugin (run in the node's namespace, e.g. with cnitool) attaches it.
    #[serde(default)]
    pub cni: bool,
}

fn one_or_many_nets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let raw = match OneOrMany::deserialize(d)
        .map_err(|_| serde::de::Error::custom("expected a CIDR or a list of CIDRs"))?
    {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    raw.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .map_err(|_| serde::de::Error::custom(format!("`{s}` is not a CIDR")))
        })
        .collect()
}

/// A topology that is not usable, with the place that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{place}: {message}")]
pub struct TopologyError {
    /// Where: a file position or a key path such as `pods[1] (web).node`.
    pub place: String,
    /// What is wrong, on one line.
    pub message: String,
}

impl TopologyError {
    fn at(place: impl fmt::Display, message: impl fmt::Display) -> Self {
        TopologyError {
            place: place.to_string(),
            message: message.to_string().replace('\n', " "),
        }
    }
}

impl Topology {
    /// Reads and validates a topology file.
    pub fn from_file(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TopologyError::at(path.display(), format!("cannot read: {e}")))?;
        Self::parse(&text).map_err(|e| TopologyError {
            place: format!("{}: {}", path.display(), e.place),
            message: e.message,
        })
    }

    /// Parses and validates topology YAML.
    pub fn parse(text: &str) -> Result<Self, TopologyError> {
        let de = serde_norway::Deserializer::from_str(text);
        let topo: Topology = serde_path_to_error_free(de)?;
        topo.validate()?;
        Ok(topo)
    }

    /// Checks the whole topology; the first problem found is returned.
    pub fn validate(&self) -> Result<(), TopologyError> {
        check_name("name", &self.name, MAX_LAB_NAME)?;
        if self.nodes.is_empty() {
            return Err(TopologyError::at("nodes", "at least one node is needed"));
        }
        self.check_underlay()?;

        // Nodes, pods and endpoints are all namespaces: one name space for all.
        let names = (self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("nodes[{i}].name"), &n.name)))
        .chain(
            self.endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| (format!("endpoints[{i}].name"), &e.name)),
        )
        .chain(
            self.pods
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("pods[{i}].name"), &p.name)),
        );
        let mut members: HashSet<&str> = HashSet::new();
        for (place, name) in names {
            check_name(&place, name, MAX_MEMBER_NAME)?;
            if !members.insert(name) {
                return Err(TopologyError::at(
                    place,
                    format!(
                        "duplicate name `{name}` (node, pod and endpoint names share one namespace)"
                    ),
                ));
            }
        }

        let mut services = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let place = format!("services[{i}] ({})", s.name);
            check_name(&place, &s.name, MAX_MEMBER_NAME)?;
            if !services.insert(s.name.as_str()) {
                return Err(TopologyError::at(
                    place,
                    format!("duplicate service `{}`", s.name),
                ));
            }
            if s.cidr.is_empty() {
                return Err(TopologyError::at(
                    format!("{place}.cidr"),
                    "at least one CIDR is needed",
                ));
            }
            for net in &s.cidr {
                check_pool(&format!("{place}.cidr"), net)?;
            }
        }

        let node_names: HashSet<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        let node_ref = |place: &str, node: &str| -> Result<(), TopologyError> {
            if node_names.contains(node) {
                Ok(())
            } else {
                Err(TopologyError::at(
                    format!("{place}.node"),
                    format!("node `{node}` is not defined in nodes"),
                ))
            }
        };
        let service_ref = |place: &str, service: &str| -> Result<(), TopologyError> {
            if services.contains(service) {
                Ok(())
            } else {
                Err(TopologyError::at(
                    place,
                    format!("service `{service}` is not defined in services"),
                ))
            }
        };
        for (i, e) in self.endpoints.iter().enumerate() {
            let place = format!("endpoints[{i}] ({})", e.name);
            node_ref(&place, &e.node)?;
            if !e.passthrough && !e.onward_labels.is_empty() {
                return Err(TopologyError::at(
                    format!("{place}.onward_labels"),
                    "only a passthrough endpoint requests onward",
                ));
            }
            if !e.passthrough {
                service_ref(&format!("{place}.service"), &e.service)?;
            } else if e.service.is_empty() {
                return Err(TopologyError::at(format!("{place}.service"), "is empty"));
            }
        }
        for (i, p) in self.pods.iter().enumerate() {
            let place = format!("pods[{i}] ({})", p.name);
            node_ref(&place, &p.node)?;
            if let Some(value) = p.annotations.get(annotation::KEY) {
                let place = format!("{place}.annotations.{}", annotation::KEY);
                let requests =
                    annotation::parse(value).map_err(|e| TopologyError::at(&place, e))?;
                for r in &requests {
                    service_ref(&place, &r.service)?;
                }
            }
        }
        // The policies' own checks (names, functions, loops) first, then
        // what only the topology knows: the services they name exist.
        nsm_policy::PolicySet::new(self.policies.clone())
            .map_err(|e| TopologyError::at("policies", e))?;
        let served: HashSet<&str> = self.endpoints.iter().map(|e| e.service.as_str()).collect();
        for (i, p) in self.policies.iter().enumerate() {
            let place = format!("policies[{i}] ({})", p.name);
            service_ref(&format!("{place}.match.service"), &p.matches.service)?;
            for (j, f) in p.chain.iter().enumerate() {
                if let nsm_policy::Function::Endpoint(e) = f
                    && !served.contains(e.service.as_str())
                {
                    return Err(TopologyError::at(
                        format!("{place}.chain[{j}] (endpoint)"),
                        format!("no endpoint in endpoints serves `{}`", e.service),
                    ));
                }
            }
        }

        for (i, r) in self
            .authorization
            .iter()
            .flat_map(|a| a.rules.iter())
            .enumerate()
        {
            if r.services.is_empty() {
                return Err(TopologyError::at(
                    format!("authorization.rules[{i}].services"),
                    "name at least one service (or `*`)",
                ));
            }
        }

        // Each node needs its own /24 of pods, with room for its pods.
        let per_node = self.pods_per_node();
        if let Some((node, count)) = per_node.iter().find(|(_, c)| **c > 250) {
            return Err(TopologyError::at(
                "pods",
                format!("node `{node}` has {count} pods; at most 250 pods fit a node's /24"),
            ));
        }
        if self.pod_cidr.prefix_len() > 24
            || (1u64 << (24 - self.pod_cidr.prefix_len())) < self.nodes.len() as u64
        {
            return Err(TopologyError::at(
                "pod_cidr",
                format!(
                    "{} cannot give each of {} nodes a /24",
                    self.pod_cidr,
                    self.nodes.len()
                ),
            ));
        }
        check_network("pod_cidr", &IpNet::V4(self.pod_cidr))?;
        Ok(())
    }

    fn check_underlay(&self) -> Result<(), TopologyError> {
        let u = &self.underlay;
        check_network("underlay.cidr", &IpNet::V4(u.cidr))?;
        check_network("underlay.cidr6", &IpNet::V6(u.cidr6))?;
        let room4 = u.cidr.hosts().count();
        if room4 < self.nodes.len() {
            return Err(TopologyError::at(
                "underlay.cidr",
                format!(
                    "{} has room for {room4} nodes, the topology has {}",
                    u.cidr,
                    self.nodes.len()
                ),
            ));
        }
        if u.cidr6.prefix_len() > 120 {
            return Err(TopologyError::at(
                "underlay.cidr6",
                "prefix must be /120 or shorter",
            ));
        }
        // IPv6 needs 1280; WireGuard over IPv6 adds 80 on top of the pods' packets.
        if !(1280..=65535).contains(&u.mtu) {
            return Err(TopologyError::at(
                "underlay.mtu",
                format!("{} is outside 1280..=65535", u.mtu),
            ));
        }
        Ok(())
    }

    fn pods_per_node(&self) -> BTreeMap<&str, usize> {
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for node in self
            .endpoints
            .iter()
            .map(|e| &e.node)
            .chain(self.pods.iter().map(|p| &p.node))
        {
            *per_node.entry(node.as_str()).or_default() += 1;
        }
        per_node
    }
}

/// serde_norway's own error already carries the key path and the line and
/// column (`nodes[0]: unknown field ...`); keep it on one line.
fn serde_path_to_error_free(de: serde_norway::Deserializer<'_>) -> Result<Topology, TopologyError> {
    Topology::deserialize(de).map_err(|e| {
        let position = e
            .location()
            .map(|l| format!("line {} column {}", l.line(), l.column()))
            .unwrap_or_else(|| "file".to_string());
        let mut message = e.to_string().replace('\n', " ");
        // The position is reported in `place`; drop the duplicate tail.
        if let Some(idx) = message.rfind(" at line ") {
            message.truncate(idx);
        }
        TopologyError {
            place: position,
            message,
        }
    })
}

/// Names become parts of namespace and file names: keep them to a safe alphabet.
fn check_name(place: &str, name: &str, max: usize) -> Result<(), TopologyError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.as_bytes()[0] != b'-';
    if ok {
        Ok(())
    } else {
        Err(TopologyError::at(
            place,
            format!(
                "`{name}` is not a valid name (1-{max} of a-z, 0-9 and '-', not starting with '-')"
            ),
        ))
    }
}

fn check_network(place: &str, net: &IpNet) -> Result<(), TopologyError> {
    if net.addr() != net.network() {
        return Err(TopologyError::at(
            place,
            format!(
                "{net} has host bits set; did you mean {}/{}?",
                net.network(),
                net.prefix_len()
            ),
        ));
    }
    Ok(())
}

/// A pool must hold at least one point-to-point pair besides its network address.
fn check_pool(place: &str, net: &IpNet) -> Result<(), TopologyError> {
    check_network(place, net)?;
    let max = match net {
        IpNet::V4(_) => 30,
        IpNet::V6(_) => 126,
    };
    if net.prefix_len() > max {
        return Err(TopologyError::at(
            place,
            format!("{net} is too small for a pool (at most /{max})"),
        ));
    }
    Ok(())
}

/// The address plan of a validated topology.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Node addresses, in the order of `Topology::nodes`.
    pub nodes: Vec<NodePlan>,
    /// Pod and endpoint addresses, endpoints first then pods, in file order.
    pub pods: Vec<PodPlan>,
}

/// Where a node sits.
#[derive(Debug, Clone, Serialize)]
pub struct NodePlan {
    /// Node name.
    pub name: String,
    /// Underlay IPv4 address.
    pub underlay_ip: Ipv4Addr,
    /// Underlay IPv6 address.
    pub underlay_ip6: Ipv6Addr,
    /// The node's pod /24.
    pub pod_net: Ipv4Net,
    /// The pods' gateway on the node.
    pub pod_gateway: Ipv4Addr,
}

/// Where a pod sits.
#[derive(Debug, Clone, Serialize)]
pub struct PodPlan {
    /// Pod name.
    pub name: String,
    /// Node name.
    pub node: String,
    /// Primary-network address.
    pub ip: Ipv4Addr,
    /// Whether the pod is an endpoint (from `endpoints:`).
    pub endpoint: bool,
    /// Whether the testbed gives it its primary network (`false` for `cni: true` pods).
    pub primary: bool,
}

impl Topology {
    /// Derives every address from the file order. Call on a validated topology.
    pub fn plan(&self) -> Plan {
        let mut hosts4 = self.underlay.cidr.hosts();
        let base6 = u128::from(self.underlay.cidr6.network());
        let mut pod_nets = self.pod_cidr.subnets(24).expect("validated: prefix <= 24");
        let nodes: Vec<NodePlan> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let pod_net = pod_nets.next().expect("validated: enough /24s");
                NodePlan {
                    name: n.name.clone(),
                    underlay_ip: hosts4.next().expect("validated: enough hosts"),
                    underlay_ip6: Ipv6Addr::from(base6 + i as u128 + 1),
                    pod_gateway: nth_host(pod_net, 1),
                    pod_net,
                }
            })
            .collect();
        let mut next_host: BTreeMap<&str, u32> = BTreeMap::new();
        let members = self
            .endpoints
            .iter()
            .map(|e| (&e.name, &e.node, true, true))
            .chain(self.pods.iter().map(|p| (&p.name, &p.node, false, !p.cni)));
        let pods = members
            .map(|(name, node, endpoint, primary)| {
                let n = nodes
                    .iter()
                    .find(|n| &n.name == node)
                    .expect("validated: node exists");
                let host = next_host.entry(node.as_str()).or_insert(2);
                let ip = nth_host(n.pod_net, *host);
                *host += 1;
                PodPlan {
                    name: name.clone(),
                    node: node.clone(),
                    ip,
                    endpoint,
                    primary,
                }
            })
            .collect();
        Plan { nodes, pods }
    }
}

fn nth_host(net: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// The address of a node or pod, for callers that only have a name.
impl Plan {
    /// The planned primary address of a node (underlay) or pod.
    pub fn ip_of(&self, name: &str) -> Option<IpAddr> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .map(|n| IpAddr::V4(n.underlay_ip))
            .or_else(|| {
                self.pods
                    .iter()
                    .find(|p| p.name == name && p.primary)
                    .map(|p| IpAddr::V4(p.ip))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
name: demo
nodes: [{name: node-1}, {name: node-2}]
services:
  - {name: secure-net, payload: IP, cidr: 172.31.0.0/24}
endpoints:
  - {name: echo, node: node-2, service: secure-net, labels: {app: echo}, run: "iperf3 -s -D"}
pods:
  - name: web
    node: node-1
    annotations: {networkservicemesh.io: "kernel://secure-net/nsm-1?app=web"}
"#;

    fn err(text: &str) -> String {
        Topology::parse(text)
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn example_parses_and_plans() {
        let t = Topology::parse(EXAMPLE).expect("example is valid");
        let plan = t.plan();
        assert_eq!(plan.nodes[0].underlay_ip, Ipv4Addr::new(198, 51, 100, 1));
        assert_eq!(plan.nodes[1].underlay_ip, Ipv4Addr::new(198, 51, 100, 2));
        assert_eq!(
            plan.nodes[1].underlay_ip6,
            "2001:db8:0:1::2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            plan.nodes[1].pod_net,
            "198.18.1.0/24".parse::<Ipv4Net>().unwrap()
        );
        // The endpoint is on node-2, the pod on node-1: both are the first on their node.
        assert_eq!(plan.ip_of("echo"), Some("198.18.1.2".parse().unwrap()));
        assert_eq!(plan.ip_of("web"), Some("198.18.0.2".parse().unwrap()));
    }

    #[test]
    fn unknown_key_names_its_place() {
        let e = err("name: x\nnodes: [{name: a, colour: red}]\n");
        assert!(e.contains("unknown field `colour`"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn pod_on_missing_node() {
        let e = err("name: x\nnodes: [{name: a}]\npods: [{name: p, node: b}]\n");
        assert_eq!(e, "pods[0] (p).node: node `b` is not defined in nodes");
    }

    #[test]
    fn duplicate_names_across_kinds() {
        let e = err("name: x\nnodes: [{name: a}]\npods: [{name: a, node: a}]\n");
        assert!(e.starts_with("pods[0].name: duplicate name `a`"), "{e}");
    }

    #[test]
    fn bad_cidrs() {
        let e = err("name: x\nnodes: [{name: a}]\nservices: [{name: s, cidr: 10.0.0.0/33}]\n");
        assert!(e.contains("`10.0.0.0/33` is not a CIDR"), "{e}");
        let e = err("name: x\nnodes: [{name: a}]\nservices: [{name: s, cidr: 10.0.0.5/24}]\n");
        assert!(
            e.contains("services[0] (s).cidr: 10.0.0.5/24 has host bits set"),
            "{e}"
        );
        let e = err(
            "name: x\nunderlay: {cidr: 198.51.100.0/31}\nnodes: [{name: a}, {name: b}, {name: c}]\n",
        );
        assert!(
            e.starts_with("underlay.cidr: 198.51.100.0/31 has room for 2 nodes"),
            "{e}"
        );
    }

    #[test]
    fn annotation_must_name_a_known_service() {
        let e = err(
            "name: x\nnodes: [{name: a}]\npods: [{name: p, node: a, annotations: {networkservicemesh.io: 'kernel://nope/nsm-1'}}]\n",
        );
        assert!(e.contains("service `nope` is not defined"), "{e}");
        let e = err(
            "name: x\nnodes: [{name: a}]\nservices: [{name: s, cidr: 10.0.0.0/24}]\npods: [{name: p, node: a, annotations: {networkservicemesh.io: 'kernel://s/this-name-is-too-long'}}]\n",
        );
        assert!(e.contains("longer than 15"), "{e}");
    }

    #[test]
    fn bad_lab_name() {
        let e = err("name: Demo_1\nnodes: [{name: a}]\n");
        assert!(e.starts_with("name: `Demo_1` is not a valid name"), "{e}");
    }

    #[test]
    fn authorization_is_strict() {
        let base = "name: a\nnodes: [{name: n}]\nauthorization:\n  rules:\n";
        let t = Topology::parse(&format!(
            "{base}    - {{services: [s], labels: {{app: web}}, uids: [0]}}\n"
        ))
        .unwrap();
        let again = serde_norway::to_string(&t).unwrap();
        assert!(Topology::parse(&again).unwrap().authorization.is_some());
        let e = err(&format!("{base}    - {{services: [s], spife_ids: [x]}}\n"));
        assert!(e.contains("spife_ids"), "{e}");
        let e = err(&format!("{base}    - {{services: []}}\n"));
        assert!(e.starts_with("authorization.rules[0].services"), "{e}");
    }
}

#[cfg(test)]
mod readme {
    /// The README documents every key with a full example: keep it valid.
    #[test]
    fn readme_topology_example_is_valid() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("### Topology file")
            .nth(1)
            .expect("README has the section");
        let yaml = section
            .split("```yaml")
            .nth(1)
            .and_then(|s| s.split("```").next())
            .expect("README has a yaml block there");
        let t = super::Topology::parse(yaml).expect("README example parses");
        assert_eq!(t.policies.len(), 1);
        assert_eq!(t.underlay.mtu, 1500);
    }
}
