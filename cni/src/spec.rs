//! The CNI contract (containernetworking/cni SPEC.md, 1.1.0): versions,
//! environment, network configuration and the error object.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The spec version this plugin implements.
pub const SPEC_VERSION: &str = "1.1.0";
/// Every config version accepted (results are emitted in the config's version).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The manager's default socket (NSM's default path).
pub const DEFAULT_SOCKET: &str = "/var/lib/networkservicemesh/nsm.io.sock";
/// The runtimeConfig key under which containerd and CRI-O pass pod annotations.
pub const POD_ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// A CNI error: printed as JSON on stdout, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    /// The spec's code (1-99) or ours (100+).
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// More detail.
    pub details: String,
}

/// Error codes: the spec's, then ours.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later (the manager is unreachable).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// The manager refused a connection request (msg carries its gRPC status).
    pub const REQUEST_REFUSED: u32 = 100;
    /// Pod annotations were not passed and cannot be looked up.
    pub const NO_ANNOTATIONS: u32 = 101;
    /// CHECK found an interface, address or route missing or different.
    pub const CHECK_FAILED: u32 = 102;
    /// The pod's `networkservicemesh.io` annotation does not parse.
    pub const BAD_ANNOTATION: u32 = 103;
    /// Two requests (or a request and CNI_IFNAME) want the same interface name.
    pub const IFNAME_CONFLICT: u32 = 104;
    /// ADD asked for a connection but the interface did not become usable.
    pub const NOT_USABLE: u32 = 105;
}

impl CniError {
    /// An error with a code and message.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds details.
    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The error object the spec prints on stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v =
            serde_json::json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

/// The operation, from `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach.
    Add,
    /// Detach (idempotent).
    Del,
    /// Verify.
    Check,
    /// Report readiness.
    Status,
    /// Remove stale attachments.
    Gc,
    /// Report versions.
    Version,
}

impl Command {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }
}

/// Where environment variables come from (the process, or a map in tests).
pub trait Env {
    /// The value of a variable, if set.
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

/// The runtime's parameters for one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS` (a path such as /run/netns/NAME or /proc/PID/ns/net).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`: the primary interface the chain attaches.
    pub ifname: String,
    /// `CNI_ARGS`, split into `K=V` pairs.
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    /// Reads and checks the variables the command needs (code 4 when not).
    pub fn from_env(env: &dyn Env) -> Result<Self, CniError> {
        let command_s = env.var("CNI_COMMAND").unwrap_or_default();
        let command = Command::parse(&command_s).ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                "CNI_COMMAND is not one of ADD, DEL, CHECK, STATUS, GC, VERSION",
            )
            .details(format!("got {command_s:?}"))
        })?;
        let get = |k: &str| env.var(k).filter(|v| !v.is_empty());
        let required: &[&str] = match command {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Status | Command::Gc | Command::Version => &[],
        };
        if let Some(missing) = required.iter().find(|k| get(k).is_none()) {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("{missing} is required for {command_s}"),
            ));
        }
        let ifname = get("CNI_IFNAME").unwrap_or_default();
        let mut args = BTreeMap::new();
        for pair in get("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_ARGS item {pair:?} is not K=V"),
                )
            })?;
            args.insert(k.to_string(), v.to_string());
        }
        Ok(Invocation {
            command,
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").map(PathBuf::from),
            ifname,
            args,
        })
    }
}

/// This plugin's network configuration, as the runtime passes it on stdin.
/// Unknown keys are rejected (code 7) so a typo is an error, not a no-op;
/// the keys runtimes add on their own are all declared.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetConf {
    /// Version of the config, and of the result we print.
    pub cni_version: String,
    /// The network's name (from the conflist).
    pub name: String,
    /// The plugin type: `nsm-cni`.
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The local manager's unix socket (default /var/lib/networkservicemesh/nsm.io.sock).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Connection requests for every pod of this network, in the annotation's
    /// syntax (`kernel://SERVICE/IFNAME?label=value`): for hosts without Kubernetes.
    #[serde(default)]
    pub connections: Vec<String>,
    /// How long one connection request may take, in seconds (default 30).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// Whether the result lists the mesh interfaces' addresses in `ips`
    /// (default true, as the spec intends). Debian's reference plugins
    /// (bridge, ptp 1.1.1) check every address of a chained result against
    /// their own interface on CHECK, so a runtime that runs CHECK through them
    /// needs `false`; interfaces and routes are reported either way.
    #[serde(default)]
    pub report_addresses: Option<bool>,
    /// Declared capabilities (`io.kubernetes.cri.pod-annotations: true`).
    #[serde(default)]
    pub capabilities: BTreeMap<String, bool>,
    /// What the runtime fills in for the declared capabilities.
    #[serde(default)]
    pub runtime_config: Option<RuntimeConfig>,
    /// The result of the previous plugins in the chain.
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// Conventional runtime arguments (accepted, unused).
    #[serde(default)]
    pub args: Option<Value>,
    /// GC: the attachments that are still valid.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// `runtimeConfig`: the pod annotations, and any other capability's data.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RuntimeConfig {
    /// Pod annotations (containerd, CRI-O).
    #[serde(default, rename = "io.kubernetes.cri.pod-annotations")]
    pub pod_annotations: Option<BTreeMap<String, String>>,
    /// Other capabilities' data (port mappings, bandwidth, ...): not ours.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Attachment {
    /// Container id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Its CNI_IFNAME.
    pub ifname: String,
}

impl NetConf {
    /// Parses stdin: code 6 when it is not JSON of this shape, 7 when a value is wrong, 1 for a version we do not speak.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            let c = if e.is_data() {
                code::INVALID_CONFIG
            } else {
                code::DECODE
            };
            CniError::new(c, "cannot decode the network configuration").details(e.to_string())
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {} is not supported", conf.cni_version),
            )
            .details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))));
        }
        if conf.name.is_empty() {
            return Err(CniError::new(code::INVALID_CONFIG, "name is empty"));
        }
        if conf.timeout_seconds == Some(0) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "timeoutSeconds must be at least 1",
            ));
        }
        Ok(conf)
    }

    /// The manager's socket.
    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    /// Whether results use the pre-1.0 shape (`ips[].version`).
    pub fn pre_1_0(&self) -> bool {
        self.cni_version.starts_with("0.")
    }

    /// Whether the config's version knows a command (CHECK from 0.4.0, GC and STATUS from 1.1.0).
    pub fn knows(&self, command: Command) -> bool {
        let v: Vec<u32> = self
            .cni_version
            .split('.')
            .filter_map(|p| p.parse().ok())
            .collect();
        let at_least = |maj: u32, min: u32| {
            (
                v.first().copied().unwrap_or(0),
                v.get(1).copied().unwrap_or(0),
            ) >= (maj, min)
        };
        match command {
            Command::Check => at_least(0, 4),
            Command::Gc | Command::Status => at_least(1, 1),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn add_needs_netns() {
        let e = Invocation::from_env(&env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_NETNS"));
    }

    #[test]
    fn del_does_not_need_netns_and_args_split() {
        let i = Invocation::from_env(&env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"),
        ]))
        .unwrap();
        assert_eq!(i.netns, None);
        assert_eq!(i.args["K8S_POD_NAME"], "web");
    }

    #[test]
    fn bad_command() {
        assert_eq!(
            Invocation::from_env(&env(&[("CNI_COMMAND", "FROB")]))
                .unwrap_err()
                .code,
            code::INVALID_ENV
        );
    }

    #[test]
    fn config_codes() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, code::DECODE);
        let unknown = br#"{"cniVersion":"1.0.0","name":"n","type":"nsm-cni","sockett":"/x"}"#;
        assert_eq!(
            NetConf::parse(unknown).unwrap_err().code,
            code::INVALID_CONFIG
        );
        let old = br#"{"cniVersion":"0.2.0","name":"n","type":"nsm-cni"}"#;
        assert_eq!(
            NetConf::parse(old).unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        let ok = br#"{"cniVersion":"1.1.0","name":"n","type":"nsm-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true},
            "runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"networkservicemesh.io":"kernel://s/nsm-1"},"portMappings":[]},
            "cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#;
        let c = NetConf::parse(ok).unwrap();
        assert_eq!(c.runtime_config.unwrap().pod_annotations.unwrap().len(), 1);
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "a");
    }

    #[test]
    fn command_versions() {
        let c = NetConf::parse(br#"{"cniVersion":"0.3.1","name":"n","type":"nsm-cni"}"#).unwrap();
        assert!(!c.knows(Command::Check));
        assert!(c.pre_1_0());
        let c = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"nsm-cni"}"#).unwrap();
        assert!(c.knows(Command::Gc) && c.knows(Command::Check));
    }

    #[test]
    fn error_object() {
        let e = CniError::new(11, "manager unreachable").details("connect: no such file");
        let v = e.to_json("1.0.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["details"], "connect: no such file");
    }
}
