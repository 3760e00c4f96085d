//! Service-chaining policies: which traffic passes through which functions,
//! in which order.
//!
//! This crate owns the policy *language* (the YAML an operator writes in a
//! testbed topology, in a `--policies` file or in a `ChainPolicy` custom
//! resource), its checks, and its compilation into what the forwarder runs.
//! It has no I/O and no state: the manager loads files and pushes chains,
//! the testbed and the Kubernetes code only parse and check.
//!
//! ```yaml
//! policies:
//!   - name: web-guard
//!     priority: 100            # optional; lower applies first (default 100)
//!     match: {service: secure-net, source: {app: web}}
//!     chain:
//!       - acl: {rules: [{allow: {proto: icmp}}, {allow: {proto: tcp, dst_port: 5201}}], default: deny}
//!       - ratelimit: {rate: 50Mbit, burst: 64KiB}
//!       - endpoint: {service: inspector}
//! ```
//!
//! # Precedence
//! Every policy whose `match` selects a connection applies to it. Their
//! chains are concatenated in order of `priority` (lower first, default
//! 100), then of `name`: the first function of the lowest priority is the
//! one nearest the client. Forward is the client-to-endpoint direction.
//! A policy whose match also names protocol, ports or prefixes applies its
//! built-in functions only to that traffic (the rest skips them); it may not
//! contain `endpoint` functions, which steer a whole connection.
//!
//! # Endpoint functions
//! `endpoint: {service: S}` sends the connection through an endpoint of
//! network service `S` (a passthrough: it forwards between its incoming
//! interface and an onward connection it requests for the *original*
//! service, as NSM's composition does). A chain with k endpoint functions
//! is k+1 *segments*: the built-in functions before the first endpoint
//! function run on the client's connection, those after function i on the
//! connection that function i requests onward. See [`Plan`].
//!
//! # What is rejected
//! A bad policy set is rejected as a whole with a [`PolicyError`] naming the
//! policy and the place (`policy web-guard: chain[1] (ratelimit): rate must
//! be > 0`); whoever loaded it keeps the set it had. Besides malformed
//! values, a chain that loops is rejected: a policy steering its own
//! service through itself, the same endpoint service twice in one chain,
//! or policies whose endpoint services lead back to where they started
//! (`secure-net -> inspector -> secure-net`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use nsm_proto::forwarder::v1 as pb;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod fuzzing;
mod units;

pub use units::{Bitrate, Bytes, Millis, Percent};

/// Default [`Policy::priority`].
pub const DEFAULT_PRIORITY: u32 = 100;
/// Most rules one `acl` may have (as the data plane allows).
pub const MAX_ACL_RULES: usize = 100_000;
/// Largest flow table or NAT table, in entries (as the data plane allows).
pub const MAX_TABLE: u32 = 1 << 22;
/// Longest added delay of `fault`, in milliseconds.
pub const MAX_DELAY_MS: u64 = 10_000;
/// Longest policy name.
pub const MAX_NAME: usize = 63;

// --- the language -------------------------------------------------------------

/// A policy file: `policies: [...]` (the same key as in a testbed topology).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The policies, in any order (precedence is by priority and name).
    #[serde(default)]
    pub policies: Vec<Policy>,
}

/// One policy.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Unique name: `[a-z0-9][a-z0-9-]*`, at most 63 characters.
    pub name: String,
    /// Lower applies first, nearer the client (default 100).
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// Which connections and traffic it applies to.
    #[serde(rename = "match")]
    pub matches: PolicyMatch,
    /// The ordered functions, each a one-key map (`{acl: {...}}`).
    #[serde(default)]
    pub chain: Vec<Function>,
}

fn default_priority() -> u32 {
    DEFAULT_PRIORITY
}

/// The connections (and optionally the packets) a policy selects.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyMatch {
    /// Network service name (required).
    pub service: String,
    /// Client labels that must all be present with these values (default:
    /// any client).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source: BTreeMap<String, String>,
    /// Only this protocol (default any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<Proto>,
    /// Only packets from this prefix (default any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    /// Only packets to this prefix (default any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    /// Only these source ports (TCP/UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_port: Option<Ports>,
    /// Only these destination ports (TCP/UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_port: Option<Ports>,
}

impl PolicyMatch {
    /// The packet selection part, if any field of it is set.
    pub fn traffic(&self) -> Option<Traffic> {
        let t = Traffic {
            proto: self.proto,
            src: self.src.clone(),
            dst: self.dst.clone(),
            src_port: self.src_port,
            dst_port: self.dst_port,
            direction: None,
        };
        (t != Traffic::default()).then_some(t)
    }

    /// Whether a connection of `service` requested with `labels` is selected.
    pub fn selects(&self, service: &str, labels: &BTreeMap<String, String>) -> bool {
        self.service == service && self.source.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Upper-layer protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// Any protocol (the default when absent).
    Any,
    /// ICMP for IPv4 (not ICMPv6).
    Icmp,
    /// ICMPv6.
    Icmpv6,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// Which way across a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Both ways (the default).
    Both,
    /// Client to endpoint.
    Forward,
    /// Endpoint to client.
    Reverse,
}

/// A port or an inclusive range: `80`, `"8000-8080"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// First port.
    pub lo: u16,
    /// Last port.
    pub hi: u16,
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl FromStr for Ports {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("`{s}` is not a port (0-65535) or a range LO-HI"))
        };
        match s.split_once('-') {
            Some((a, b)) => Ok(Ports {
                lo: port(a)?,
                hi: port(b)?,
            }),
            None => {
                let p = port(s)?;
                Ok(Ports { lo: p, hi: p })
            }
        }
    }
}

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => u16::try_from(n)
                .map(|p| Ports { lo: p, hi: p })
                .map_err(|_| serde::de::Error::custom(format!("port {n} is above 65535"))),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Ports {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.lo == self.hi {
            s.serialize_u16(self.lo)
        } else {
            s.serialize_str(&self.to_string())
        }
    }
}

/// Which packets a rule or a mirror filter applies to; absent fields match
/// everything. Port ranges match only TCP and UDP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    /// Protocol (default any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<Proto>,
    /// Source prefix, `10.0.0.0/8` or an address (default any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    /// Destination prefix (default any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    /// Source port or range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_port: Option<Ports>,
    /// Destination port or range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_port: Option<Ports>,
    /// Direction (default both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
}

/// One function of a chain: a one-key map naming it.
#[derive(Debug, Clone, PartialEq)]
pub enum Function {
    /// Firewall: ordered rules, first match wins.
    Acl(Acl),
    /// Token bucket per direction; the excess waits in a queue (a shaper).
    Ratelimit(RateLimit),
    /// Source NAT of IPv4.
    Nat44(Nat44),
    /// Copies of packets into a pcap file on the forwarder's host.
    Mirror(Mirror),
    /// Packet and byte counts at this point.
    Counter(Counter),
    /// Loss, corruption and delay injection.
    Fault(Fault),
    /// Through an endpoint of another network service.
    Endpoint(EndpointFn),
}

impl Function {
    /// The function's name, as written.
    pub fn kind(&self) -> &'static str {
        match self {
            Function::Acl(_) => "acl",
            Function::Ratelimit(_) => "ratelimit",
            Function::Nat44(_) => "nat44",
            Function::Mirror(_) => "mirror",
            Function::Counter(_) => "counter",
            Function::Fault(_) => "fault",
            Function::Endpoint(_) => "endpoint",
        }
    }
}

/// `acl`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Acl {
    /// In priority order: `{allow: TRAFFIC}` or `{deny: TRAFFIC}`.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// When no rule matches (default deny).
    #[serde(default)]
    pub default: Action,
    /// Replies of an allowed flow pass too (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stateful: Option<bool>,
    /// Flow-table size when stateful (default 65536).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack_capacity: Option<u32>,
    /// Idle time after which a flow is forgotten (default 120s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Millis>,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Pass.
    Allow,
    /// Drop (counted).
    #[default]
    Deny,
}

/// One ACL rule: `{allow: {...}}` or `{deny: {...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// Pass matching packets.
    Allow(Traffic),
    /// Drop matching packets.
    Deny(Traffic),
}

/// `ratelimit`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate: `50Mbit`, `1.5Gbit`, `800kbit` or bits per second.
    pub rate: Bitrate,
    /// Bucket depth: `64KiB`, `1MB`, or bytes (default: the forwarder's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<Bytes>,
    /// Only this direction (default both, each its own bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
}

/// `nat44`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Nat44 {
    /// Translated source address.
    pub address: Ipv4Addr,
    /// Ports to map to (default 1024-65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Ports>,
    /// Mappings kept at most (default 65536).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    /// Idle time after which a mapping is forgotten (default 120s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Millis>,
}

/// `mirror`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// Absolute path of the pcap file on the forwarder's host.
    pub pcap: String,
    /// Bytes kept per packet (default 9216, at most 65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snaplen: Option<u32>,
    /// Ring size in packets (default 512, at most 65536).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// Which packets (default all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Traffic>,
}

/// `counter` (no settings: `counter: {}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Counter {}

/// `fault`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Share of packets dropped: `10%` or `10` (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop: Option<Percent>,
    /// Share of the rest with one byte flipped (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<Percent>,
    /// Added delay, `20ms` (default none, at most 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Millis>,
    /// Only this direction (default both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// PRNG seed (default fixed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// `endpoint`: through an endpoint of `service`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFn {
    /// The function's network service.
    pub service: String,
}

// One-key maps. Written by hand rather than derived: serde's externally
// tagged enums become YAML *tags* (`!acl {...}`) in serde_norway, and
// operators write maps (`{acl: {...}}`); this reads and writes maps in YAML
// and JSON alike.

fn one_key<'de, D: Deserializer<'de>>(
    d: D,
    what: &str,
) -> Result<(String, serde_json::Value), D::Error> {
    let map = BTreeMap::<String, serde_json::Value>::deserialize(d).map_err(|e| {
        serde::de::Error::custom(format!("expected a one-key map naming the {what}: {e}"))
    })?;
    let mut it = map.into_iter();
    match (it.next(), it.next()) {
        (Some(kv), None) => Ok(kv),
        (None, _) => Err(serde::de::Error::custom(format!(
            "empty map: name the {what}"
        ))),
        (Some((a, _)), Some((b, _))) => Err(serde::de::Error::custom(format!(
            "one {what} per list item, found `{a}` and `{b}`"
        ))),
    }
}

fn inner<T: serde::de::DeserializeOwned, E: serde::de::Error>(
    key: &str,
    v: serde_json::Value,
) -> Result<T, E> {
    // `counter:` with nothing after it is YAML null: the same as `{}`.
    let v = if v.is_null() {
        serde_json::Value::Object(serde_json::Map::new())
    } else {
        v
    };
    serde_json::from_value(v).map_err(|e| E::custom(format!("{key}: {e}")))
}

fn single<S: Serializer, T: Serialize>(s: S, key: &str, v: &T) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(1))?;
    m.serialize_entry(key, v)?;
    m.end()
}

impl<'de> Deserialize<'de> for Function {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (k, v) = one_key(d, "function")?;
        Ok(match k.as_str() {
            "acl" => Function::Acl(inner(&k, v)?),
            "ratelimit" => Function::Ratelimit(inner(&k, v)?),
            "nat44" => Function::Nat44(inner(&k, v)?),
            "mirror" => Function::Mirror(inner(&k, v)?),
            "counter" => Function::Counter(inner(&k, v)?),
            "fault" => Function::Fault(inner(&k, v)?),
            "endpoint" => Function::Endpoint(inner(&k, v)?),
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "unknown function `{k}` (expected acl, ratelimit, nat44, mirror, counter, fault or endpoint)"
                )));
            }
        })
    }
}

impl Serialize for Function {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Function::Acl(x) => single(s, "acl", x),
            Function::Ratelimit(x) => single(s, "ratelimit", x),
            Function::Nat44(x) => single(s, "nat44", x),
            Function::Mirror(x) => single(s, "mirror", x),
            Function::Counter(x) => single(s, "counter", x),
            Function::Fault(x) => single(s, "fault", x),
            Function::Endpoint(x) => single(s, "endpoint", x),
        }
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (k, v) = one_key(d, "action (allow or deny)")?;
        match k.as_str() {
            "allow" => Ok(Rule::Allow(inner(&k, v)?)),
            "deny" => Ok(Rule::Deny(inner(&k, v)?)),
            _ => Err(serde::de::Error::custom(format!(
                "unknown rule action `{k}` (expected allow or deny)"
            ))),
        }
    }
}

impl Serialize for Rule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Rule::Allow(t) => single(s, "allow", t),
            Rule::Deny(t) => single(s, "deny", t),
        }
    }
}

// --- errors ---------------------------------------------------------------------

/// A policy that cannot be used, naming it and the place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {policy}: {place}{sep}{message}", sep = if place.is_empty() { "" } else { ": " })]
pub struct PolicyError {
    /// The policy's name (or `policies[i]` when it has none).
    pub policy: String,
    /// Where in it (`chain[1] (ratelimit)`), or empty.
    pub place: String,
    /// What is wrong, on one line.
    pub message: String,
}

impl PolicyError {
    fn new(policy: &str, place: impl fmt::Display, message: impl fmt::Display) -> Self {
        PolicyError {
            policy: policy.to_string(),
            place: place.to_string(),
            message: message.to_string().replace('\n', " "),
        }
    }
}

// --- parsing ----------------------------------------------------------------------

/// Parses a policy file (YAML or JSON) and checks it as a whole.
///
/// # Errors
/// The first problem, naming the policy (by name when it has one).
pub fn parse_file(text: &str) -> Result<PolicySet, PolicyError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        #[serde(default)]
        policies: Vec<serde_json::Value>,
    }
    let raw: Raw = serde_norway::from_str(text)
        .map_err(|e| PolicyError::new("file", "", format!("not a policy file: {e}")))?;
    PolicySet::new(parse_values(raw.policies)?)
}

/// Parses each policy of a list of JSON values (YAML read as JSON values,
/// or a custom resource's spec), naming the policy (from its `name` key
/// when present) in errors.
///
/// # Errors
/// The first policy that does not parse.
pub fn parse_values(values: Vec<serde_json::Value>) -> Result<Vec<Policy>, PolicyError> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let label = v
                .get("name")
                .and_then(|n| n.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| format!("policies[{i}]"));
            serde_json::from_value::<Policy>(v).map_err(|e| PolicyError::new(&label, "", e))
        })
        .collect()
}

// --- checks ---------------------------------------------------------------------

/// A checked set of policies, ready to [`PolicySet::plan`] connections.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicySet {
    /// Sorted by precedence (priority, then name).
    policies: Vec<Policy>,
}

impl PolicySet {
    /// Checks every policy and the set as a whole (unique names, no loops).
    ///
    /// # Errors
    /// The first problem found.
    pub fn new(mut policies: Vec<Policy>) -> Result<PolicySet, PolicyError> {
        let mut names = HashSet::new();
        for p in &policies {
            check_policy(p)?;
            if !names.insert(p.name.as_str()) {
                return Err(PolicyError::new(&p.name, "", "duplicate policy name"));
            }
        }
        check_loops(&policies)?;
        policies.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        Ok(PolicySet { policies })
    }

    /// The policies in precedence order.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// What a connection to `service` requested with `labels` runs through.
    pub fn plan(&self, service: &str, labels: &BTreeMap<String, String>) -> Plan {
        let mut plan = Plan {
            policies: Vec::new(),
            segments: vec![Segment::default()],
        };
        for p in self
            .policies
            .iter()
            .filter(|p| p.matches.selects(service, labels))
        {
            plan.policies.push(p.name.clone());
            let selector = p.matches.traffic().map(|t| flow_match(&t));
            for f in &p.chain {
                let seg = plan.segments.last_mut().expect("a plan has a segment");
                match f {
                    Function::Endpoint(e) => {
                        seg.function = Some(e.service.clone());
                        plan.segments.push(Segment::default());
                    }
                    f => seg.chain.functions.push(pb::Function {
                        kind: Some(to_pb(f)),
                        selector: selector.clone(),
                    }),
                }
            }
        }
        plan
    }
}

/// What one connection runs through, as compiled from the policies that
/// select it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Names of the policies applied, in precedence order.
    pub policies: Vec<String>,
    /// One or more segments: segment 0 is the client's connection; segment
    /// i > 0 the onward connection of the i-th endpoint function.
    pub segments: Vec<Segment>,
}

impl Plan {
    /// Segment `i`; `None` past the end (the policies changed and there are
    /// fewer segments now): such a connection runs no functions and goes to
    /// the requested service, so a shrunk plan can never loop.
    pub fn segment(&self, i: usize) -> Option<&Segment> {
        self.segments.get(i)
    }
}

/// One connection's share of a plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Segment {
    /// Built-in functions run by the forwarder on this connection.
    pub chain: pb::Chain,
    /// The endpoint function this connection goes to, `None` for the
    /// requested service's own endpoints.
    pub function: Option<String>,
}

fn check_name(policy: &str, name: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(PolicyError::new(
            policy,
            "name",
            format!("`{name}` must be [a-z0-9][a-z0-9-]*, at most {MAX_NAME} characters"),
        ))
    }
}

/// A network service name: not empty, at most 253 bytes, no whitespace and
/// no control characters (NSM names are DNS-like; a line break in one could
/// not survive being written back as YAML, found by the `policy` fuzzer).
fn check_service(service: &str) -> Result<(), String> {
    if service.is_empty() {
        return Err("is empty".into());
    }
    if service.len() > 253 {
        return Err("is longer than 253 bytes".into());
    }
    if let Some(c) = service
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "`{}` holds {c:?}: a service name has no whitespace or control characters",
            service.escape_debug()
        ));
    }
    Ok(())
}

/// A label key or value: no control characters and no line breaks (spaces
/// are fine in values, not in keys).
fn check_label(key: &str, value: &str) -> Result<(), String> {
    let bad_key = key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control());
    let bad_value = value
        .chars()
        .any(|c| c.is_control() || (c.is_whitespace() && c != ' '));
    if bad_key || bad_value {
        return Err(format!(
            "label `{}: {}`: keys are non-empty without whitespace, and neither holds control characters or line breaks",
            key.escape_debug(),
            value.escape_debug()
        ));
    }
    Ok(())
}

fn check_policy(p: &Policy) -> Result<(), PolicyError> {
    let name = p.name.as_str();
    check_name(name, name)?;
    check_service(&p.matches.service).map_err(|m| PolicyError::new(name, "match.service", m))?;
    for (k, v) in &p.matches.source {
        check_label(k, v).map_err(|m| PolicyError::new(name, "match.source", m))?;
    }
    let traffic = p.matches.traffic();
    if let Some(t) = &traffic {
        check_traffic(t).map_err(|m| PolicyError::new(name, "match", m))?;
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, f) in p.chain.iter().enumerate() {
        let place = format!("chain[{i}] ({})", f.kind());
        let err = |m: String| PolicyError::new(name, &place, m);
        match f {
            Function::Endpoint(e) => {
                if traffic.is_some() {
                    return Err(err(
                        "an endpoint function steers the whole connection; it cannot be in a policy that selects by protocol, port or prefix".into(),
                    ));
                }
                check_service(&e.service).map_err(|m| err(format!("service {m}")))?;
                if e.service == p.matches.service {
                    return Err(err(format!(
                        "loop: the chain of service `{}` goes through `{}` itself",
                        e.service, e.service
                    )));
                }
                if let Some(j) = seen.insert(&e.service, i) {
                    return Err(err(format!(
                        "loop: service `{}` is already at chain[{j}]; a chain passes a function once",
                        e.service
                    )));
                }
            }
            Function::Fault(x) if traffic.is_some() && x.delay.is_some_and(|d| d.0 > 0) => {
                return Err(err(
                    "a delay applies to a whole direction; it cannot be in a policy that selects by protocol, port or prefix".into(),
                ));
            }
            f => check_function(f).map_err(err)?,
        }
    }
    Ok(())
}

/// Rejects policy sets whose endpoint functions lead back to a service they
/// started from: `a` steered through `b` while `b` is steered through `a`
/// (labels are ignored: any client may match both).
fn check_loops(policies: &[Policy]) -> Result<(), PolicyError> {
    // Edges service -> function service, with the policy that adds them.
    let mut edges: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for p in policies {
        for f in &p.chain {
            if let Function::Endpoint(e) = f {
                edges
                    .entry(p.matches.service.as_str())
                    .or_default()
                    .push((e.service.as_str(), p.name.as_str()));
            }
        }
    }
    // Depth-first search from each service, reporting the first cycle.
    fn dfs<'a>(
        at: &'a str,
        edges: &BTreeMap<&'a str, Vec<(&'a str, &'a str)>>,
        stack: &mut Vec<(&'a str, &'a str)>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<(Vec<&'a str>, &'a str)> {
        for &(next, policy) in edges.get(at).map(Vec::as_slice).unwrap_or_default() {
            if let Some(pos) = stack.iter().position(|(s, _)| *s == next) {
                let mut path: Vec<&str> = stack[pos..].iter().map(|(s, _)| *s).collect();
                path.push(at);
                path.push(next);
                return Some((path, policy));
            }
            if done.contains(next) {
                continue;
            }
            stack.push((at, policy));
            let r = dfs(next, edges, stack, done);
            stack.pop();
            if r.is_some() {
                return r;
            }
        }
        done.insert(at);
        None
    }
    let mut done = BTreeSet::new();
    for &start in edges.keys() {
        let mut stack = Vec::new();
        if let Some((mut path, policy)) = dfs(start, &edges, &mut stack, &mut done) {
            path.dedup();
            return Err(PolicyError::new(
                policy,
                "chain",
                format!(
                    "loop between policies: {} (an endpoint function's service is steered back)",
                    path.join(" -> ")
                ),
            ));
        }
    }
    Ok(())
}

fn check_prefix(s: &str) -> Result<(IpAddr, u8), String> {
    let bad = || format!("`{s}` is not a prefix (ADDR/LEN or an address)");
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => {
            let a: IpAddr = a.parse().map_err(|_| bad())?;
            let l: u8 = l.parse().map_err(|_| bad())?;
            (a, l)
        }
        None => {
            let a: IpAddr = s.parse().map_err(|_| bad())?;
            (a, if a.is_ipv6() { 128 } else { 32 })
        }
    };
    let (bits, max) = match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32u8),
        IpAddr::V6(a) => (u128::from(a), 128u8),
    };
    if len > max {
        return Err(format!("prefix `{s}` is longer than {max} bits"));
    }
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    };
    if bits & !mask != 0 {
        return Err(format!("prefix `{s}` has host bits set"));
    }
    Ok((addr, len))
}

/// Checks a traffic selector: prefixes, ranges, protocol consistency.
///
/// # Errors
/// What is wrong, on one line.
pub fn check_traffic(t: &Traffic) -> Result<(), String> {
    let mut v6 = None;
    for (what, p) in [("src", &t.src), ("dst", &t.dst)] {
        if let Some(p) = p {
            let (a, _) = check_prefix(p).map_err(|m| format!("{what}: {m}"))?;
            if v6.is_some_and(|v| v != a.is_ipv6()) {
                return Err("src and dst are of different address families".into());
            }
            v6 = Some(a.is_ipv6());
        }
    }
    for (what, r) in [("src_port", t.src_port), ("dst_port", t.dst_port)] {
        if let Some(r) = r
            && r.lo > r.hi
        {
            return Err(format!("{what}: port range {}-{} has lo > hi", r.lo, r.hi));
        }
    }
    let ports = t.src_port.is_some() || t.dst_port.is_some();
    if ports && matches!(t.proto, Some(Proto::Icmp | Proto::Icmpv6)) {
        return Err("ports need tcp, udp or any protocol, not ICMP".into());
    }
    match (t.proto, v6) {
        (Some(Proto::Icmp), Some(true)) => Err("icmp with IPv6 prefixes (use icmpv6)".into()),
        (Some(Proto::Icmpv6), Some(false)) => Err("icmpv6 with IPv4 prefixes (use icmp)".into()),
        _ => Ok(()),
    }
}

fn check_function(f: &Function) -> Result<(), String> {
    let table = |what: &str, n: Option<u32>| match n {
        Some(n) if n == 0 || n > MAX_TABLE => {
            Err(format!("{what} must be 1..={MAX_TABLE}, not {n}"))
        }
        _ => Ok(()),
    };
    match f {
        Function::Acl(a) => {
            if a.rules.len() > MAX_ACL_RULES {
                return Err(format!("{} rules, at most {MAX_ACL_RULES}", a.rules.len()));
            }
            for (i, r) in a.rules.iter().enumerate() {
                let (Rule::Allow(t) | Rule::Deny(t)) = r;
                check_traffic(t).map_err(|m| format!("rules[{i}]: {m}"))?;
            }
            table("conntrack_capacity", a.conntrack_capacity)
        }
        Function::Ratelimit(r) => {
            if r.rate.0 == 0 {
                return Err("rate must be > 0".into());
            }
            match r.burst {
                Some(b) if b.0 < 1500 => Err(format!(
                    "burst {} is below 1500 bytes: full-size packets could never pass",
                    b.0
                )),
                _ => Ok(()),
            }
        }
        Function::Nat44(n) => {
            let a = n.address;
            if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
                return Err(format!("address {a} cannot be a source"));
            }
            if let Some(p) = n.ports {
                if p.lo > p.hi {
                    return Err(format!("ports: range {}-{} has lo > hi", p.lo, p.hi));
                }
                if p.lo == 0 {
                    return Err("ports: 0 cannot be mapped to".into());
                }
            }
            table("capacity", n.capacity)
        }
        Function::Mirror(m) => {
            if !m.pcap.starts_with('/') {
                return Err(format!("pcap `{}` must be an absolute path", m.pcap));
            }
            let snap = m.snaplen.unwrap_or(9216);
            let slots = m.slots.unwrap_or(512);
            if !(1..=65_535).contains(&snap) {
                return Err(format!("snaplen must be 1..=65535, not {snap}"));
            }
            if !(1..=65_536).contains(&slots) {
                return Err(format!("slots must be 1..=65536, not {slots}"));
            }
            if u64::from(snap) * u64::from(slots) > 256 << 20 {
                return Err("slots * snaplen is above 256 MiB".into());
            }
            match &m.filter {
                Some(t) => check_traffic(t).map_err(|e| format!("filter: {e}")),
                None => Ok(()),
            }
        }
        Function::Counter(_) => Ok(()),
        Function::Fault(x) => {
            for (what, p) in [("drop", x.drop), ("corrupt", x.corrupt)] {
                if let Some(p) = p
                    && !(0.0..=100.0).contains(&p.0)
                {
                    return Err(format!("{what} must be 0..=100%, not {}", p.0));
                }
            }
            match x.delay {
                Some(d) if d.0 > MAX_DELAY_MS => {
                    Err(format!("delay {} ms is above {MAX_DELAY_MS} ms", d.0))
                }
                _ => Ok(()),
            }
        }
        Function::Endpoint(_) => Ok(()),
    }
}

// --- compilation -----------------------------------------------------------------

fn dir(d: Option<Direction>) -> i32 {
    match d.unwrap_or(Direction::Both) {
        Direction::Both => pb::ChainDirection::Both as i32,
        Direction::Forward => pb::ChainDirection::Forward as i32,
        Direction::Reverse => pb::ChainDirection::Reverse as i32,
    }
}

fn ports(p: Option<Ports>) -> Option<pb::PortRange> {
    p.map(|p| pb::PortRange {
        lo: u32::from(p.lo),
        hi: u32::from(p.hi),
    })
}

fn secs(m: Option<Millis>) -> u32 {
    m.map(|m| u32::try_from(m.0.div_ceil(1000)).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

/// The forwarder's form of a traffic selector.
pub fn flow_match(t: &Traffic) -> pb::FlowMatch {
    pb::FlowMatch {
        protocol: match t.proto.unwrap_or(Proto::Any) {
            Proto::Any => pb::MatchProtocol::Any,
            Proto::Icmp => pb::MatchProtocol::Icmp,
            Proto::Icmpv6 => pb::MatchProtocol::Icmpv6,
            Proto::Tcp => pb::MatchProtocol::Tcp,
            Proto::Udp => pb::MatchProtocol::Udp,
        } as i32,
        src: t.src.clone().unwrap_or_default(),
        dst: t.dst.clone().unwrap_or_default(),
        src_ports: ports(t.src_port),
        dst_ports: ports(t.dst_port),
        direction: dir(t.direction),
    }
}

/// The forwarder's form of a built-in function (an `endpoint` function has
/// none: it is a hop, not a stage, and becomes a counter here).
fn to_pb(f: &Function) -> pb::function::Kind {
    use pb::function::Kind;
    match f {
        Function::Acl(a) => Kind::Acl(pb::Acl {
            rules: a
                .rules
                .iter()
                .map(|r| {
                    let (action, t) = match r {
                        Rule::Allow(t) => (pb::AclAction::Allow, t),
                        Rule::Deny(t) => (pb::AclAction::Deny, t),
                    };
                    pb::AclRule {
                        action: action as i32,
                        r#match: Some(flow_match(t)),
                    }
                })
                .collect(),
            default_action: match a.default {
                Action::Allow => pb::AclAction::Allow,
                Action::Deny => pb::AclAction::Deny,
            } as i32,
            stateful: a.stateful,
            conntrack_capacity: a.conntrack_capacity.unwrap_or(0),
            idle_timeout_secs: secs(a.idle_timeout),
        }),
        Function::Ratelimit(r) => Kind::Ratelimit(pb::RateLimit {
            rate_bps: r.rate.0,
            burst_bytes: r.burst.map(|b| b.0).unwrap_or(0),
            direction: dir(r.direction),
        }),
        Function::Nat44(n) => Kind::Nat44(pb::Nat44 {
            address: n.address.to_string(),
            ports: ports(n.ports),
            capacity: n.capacity.unwrap_or(0),
            idle_timeout_secs: secs(n.idle_timeout),
        }),
        Function::Mirror(m) => Kind::Mirror(pb::Mirror {
            pcap_path: m.pcap.clone(),
            snaplen: m.snaplen.unwrap_or(0),
            slots: m.slots.unwrap_or(0),
            filter: m.filter.as_ref().map(flow_match),
        }),
        Function::Fault(x) => Kind::Fault(pb::Fault {
            drop_percent: x.drop.map(|p| p.0).unwrap_or(0.0),
            corrupt_percent: x.corrupt.map(|p| p.0).unwrap_or(0.0),
            delay_ms: x
                .delay
                .map(|d| u32::try_from(d.0).unwrap_or(u32::MAX))
                .unwrap_or(0),
            direction: dir(x.direction),
            seed: x.seed.unwrap_or(0),
        }),
        Function::Counter(_) | Function::Endpoint(_) => Kind::Counter(pb::CounterFunction {}),
    }
}

#[cfg(test)]
mod tests;
