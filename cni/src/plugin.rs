//! The plugin's commands: what ADD, DEL, CHECK, STATUS, GC and VERSION do.
//!
//! All state lives in the manager. A connection made for a pod is named
//! `cni/NETWORK/CONTAINER/CNI_IFNAME/IFNAME`, so that DEL, CHECK and GC find
//! every connection of an attachment by asking the manager, without a file
//! of our own that could drift from the truth.
//!
//! A Kubernetes pod (`K8S_POD_NAME` in `CNI_ARGS`) is attached through the
//! manager's cluster mode (`nsm.manager.v1.Pods/Attach`): the manager reads
//! the pod's annotation from the API server, makes the connections with the
//! same ids, and keeps them in step when the annotation changes; DEL and GC
//! `Detach` first so that it does not make them again. A manager outside
//! cluster mode answers UNIMPLEMENTED and the plugin serves what the runtime
//! passed, as before.

use std::path::Path;
use std::time::{Duration, Instant};

use nsm_proto::annotation::{self, ConnectionRequest};
use nsm_proto::connection::{Connection, State};
use nsm_proto::manager::v1::{AttachRequest, DetachRequest};
use serde_json::{Value, json};

use crate::manager::Manager;
use crate::netns;
use crate::spec::{
    CniError, Command, Invocation, NetConf, POD_ANNOTATIONS_CAPABILITY, SPEC_VERSION,
    SUPPORTED_VERSIONS, code,
};

/// Default time one connection request may take.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long ADD waits for an interface the manager reported to appear.
const USABLE_TIMEOUT: Duration = Duration::from_secs(5);

/// One mesh interface the pod should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Connection id (`cni/NETWORK/CONTAINER/CNI_IFNAME/IFNAME`).
    pub id: String,
    /// The request.
    pub request: ConnectionRequest,
    /// Interface name in the pod.
    pub ifname: String,
}

/// Runs one invocation; `Ok(Some(json))` is printed on stdout.
pub fn run(inv: &Invocation, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if inv.command == Command::Version {
        return Ok(Some(
            json!({"cniVersion": SPEC_VERSION, "supportedVersions": SUPPORTED_VERSIONS}),
        ));
    }
    let conf = NetConf::parse(stdin)?;
    if !conf.knows(inv.command) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {} has no {:?} command",
                conf.cni_version, inv.command
            ),
        ));
    }
    let timeout = conf
        .timeout_seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    match inv.command {
        Command::Version => unreachable!("handled above"),
        Command::Status => Manager::connect(&conf.socket(), timeout)
            .map(|_| None)
            .map_err(|e| {
                CniError::new(code::NOT_AVAILABLE, "nsm-manager is not reachable")
                    .details(e.details)
            }),
        Command::Add => add(inv, &conf, timeout).map(Some),
        Command::Del => del(inv, &conf, timeout).map(|()| None),
        Command::Check => check(inv, &conf, timeout).map(|()| None),
        Command::Gc => gc(&conf, timeout).map(|()| None),
    }
}

/// The prefix of every connection id of one attachment.
pub fn attachment_prefix(network: &str, container: &str, cni_ifname: &str) -> String {
    format!("cni/{network}/{container}/{cni_ifname}/")
}

/// The Kubernetes pod (namespace, name) of `CNI_ARGS`, if any. Its
/// attachment goes through the manager's cluster mode when the manager has
/// one, even when the runtime passed the annotations: only the manager sees
/// later changes of the annotation, so it must own the attachment.
pub fn cluster_pod(inv: &Invocation) -> Option<(String, String)> {
    let name = inv.args.get("K8S_POD_NAME")?;
    Some((
        inv.args
            .get("K8S_POD_NAMESPACE")
            .cloned()
            .unwrap_or_else(|| "default".into()),
        name.clone(),
    ))
}

fn runtime_passed_annotations(conf: &NetConf) -> bool {
    conf.runtime_config
        .as_ref()
        .is_some_and(|r| r.pod_annotations.is_some())
}

fn no_annotations() -> CniError {
    CniError::new(
        code::NO_ANNOTATIONS,
        "the runtime passed no pod annotations",
    )
    .details(format!(
        "declare the capability \"{POD_ANNOTATIONS_CAPABILITY}\": true in the plugin config (containerd and CRI-O then pass them), list requests in \"connections\", or run nsm-manager in cluster mode (--kubeconfig/--kubernetes) so that it reads them from the Kubernetes API"
    ))
}

/// What the pod asks for: the plugin config's `connections`, then the pod's
/// annotation (from the runtime), each with an interface name.
pub fn wanted(inv: &Invocation, conf: &NetConf) -> Result<Vec<Wanted>, CniError> {
    let mut requests: Vec<ConnectionRequest> = Vec::new();
    for (i, url) in conf.connections.iter().enumerate() {
        let mut parsed = annotation::parse(url)
            .map_err(|e| CniError::new(code::INVALID_CONFIG, format!("connections[{i}]: {e}")))?;
        requests.append(&mut parsed);
    }
    let annotations = conf
        .runtime_config
        .as_ref()
        .and_then(|r| r.pod_annotations.as_ref());
    match annotations {
        Some(a) => {
            if let Some(value) = a.get(annotation::KEY) {
                let mut parsed = annotation::parse(value).map_err(|e| {
                    CniError::new(
                        code::BAD_ANNOTATION,
                        format!("pod annotation {}: {e}", annotation::KEY),
                    )
                })?;
                requests.append(&mut parsed);
            }
        }
        // A Kubernetes pod whose runtime does not pass annotations: they would
        // have to be read from the API server, which is the manager's job in
        // cluster mode. Failing here beats silently attaching nothing.
        None if inv.args.contains_key("K8S_POD_NAME") && conf.connections.is_empty() => {
            return Err(no_annotations());
        }
        None => {}
    }
    let prefix = attachment_prefix(&conf.name, &inv.container_id, &inv.ifname);
    let mut out: Vec<Wanted> = Vec::new();
    for (i, request) in requests.into_iter().enumerate() {
        let ifname = request
            .interface
            .clone()
            .unwrap_or_else(|| format!("nsm-{}", i + 1));
        if ifname == inv.ifname || out.iter().any(|w| w.ifname == ifname) {
            return Err(CniError::new(
                code::IFNAME_CONFLICT,
                format!(
                    "interface name {ifname} is requested twice (CNI_IFNAME is {})",
                    inv.ifname
                ),
            ));
        }
        out.push(Wanted {
            id: format!("{prefix}{ifname}"),
            request,
            ifname,
        });
    }
    Ok(out)
}

fn netns_of(inv: &Invocation) -> &Path {
    inv.netns
        .as_deref()
        .expect("checked by Invocation::from_env for ADD and CHECK")
}

fn add(inv: &Invocation, conf: &NetConf, timeout: Duration) -> Result<Value, CniError> {
    if let Some(pod) = cluster_pod(inv) {
        match Manager::connect(&conf.socket(), timeout) {
            Ok(manager) => {
                if let Some(result) = add_cluster(inv, conf, &manager, pod)? {
                    return Ok(result);
                }
                // Not in cluster mode: what the runtime and the config say, below.
            }
            // Without the manager, the annotations can only come from the
            // runtime; a pod that asks for nothing there still starts.
            Err(e) if !runtime_passed_annotations(conf) && conf.connections.is_empty() => {
                let mut err = no_annotations();
                err.details = format!("{}; {}: {}", err.details, e.msg, e.details);
                return Err(err);
            }
            Err(_) => {}
        }
    }
    let wanted = wanted(inv, conf)?;
    let mut result = start_result(conf);
    if wanted.is_empty() {
        return Ok(result);
    }
    let netns = netns_of(inv);
    let manager = Manager::connect(&conf.socket(), timeout)?;
    let mut made: Vec<(Wanted, Connection)> = Vec::new();
    for w in &wanted {
        match manager.request(w, netns) {
            Ok(conn) => made.push((w.clone(), conn)),
            Err(e) => {
                rollback(&manager, &made);
                return Err(e);
            }
        }
    }
    // The manager answers when the forwarder has made the interface; make
    // sure the pod can use it before the runtime starts the container.
    for (w, conn) in &made {
        if let Err(detail) = wait_usable(netns, &w.ifname, conn) {
            rollback(&manager, &made);
            return Err(CniError::new(
                code::NOT_USABLE,
                format!("{} did not become usable", w.ifname),
            )
            .details(detail));
        }
    }
    for (w, conn) in &made {
        append_interface(&mut result, conf, netns, &w.ifname, conn);
    }
    Ok(result)
}

/// ADD through the manager's cluster mode: it reads the annotation and
/// makes the connections; `Ok(None)` when the manager is not in cluster mode.
fn add_cluster(
    inv: &Invocation,
    conf: &NetConf,
    manager: &Manager,
    (namespace, pod): (String, String),
) -> Result<Option<Value>, CniError> {
    let netns = netns_of(inv);
    let Some(attachments) = manager.attach(AttachRequest {
        namespace,
        pod,
        container_id: inv.container_id.clone(),
        netns: netns.display().to_string(),
        network: conf.name.clone(),
        cni_ifname: inv.ifname.clone(),
        extra_requests: conf.connections.clone(),
    })?
    else {
        return Ok(None);
    };
    let detach = || {
        if let Err(e) = manager.detach(detach_request(inv, conf)) {
            eprintln!("nsm-cni: rollback: detach: {e}");
        }
    };
    let mut result = start_result(conf);
    for a in &attachments {
        let conn = a.connection.clone().unwrap_or_default();
        if let Err(detail) = wait_usable(netns, &a.ifname, &conn) {
            detach();
            return Err(CniError::new(
                code::NOT_USABLE,
                format!("{} did not become usable", a.ifname),
            )
            .details(detail));
        }
        append_interface(&mut result, conf, netns, &a.ifname, &conn);
    }
    Ok(Some(result))
}

fn detach_request(inv: &Invocation, conf: &NetConf) -> DetachRequest {
    DetachRequest {
        network: conf.name.clone(),
        container_id: inv.container_id.clone(),
        cni_ifname: inv.ifname.clone(),
    }
}

/// Closes what ADD made before it failed, so no pod is left half-attached.
fn rollback(manager: &Manager, made: &[(Wanted, Connection)]) {
    for (_, conn) in made.iter().rev() {
        if let Err(e) = manager.close(conn) {
            eprintln!("nsm-cni: rollback: close {}: {e}", conn.id);
        }
    }
}

fn wait_usable(netns: &Path, ifname: &str, conn: &Connection) -> Result<(), String> {
    let deadline = Instant::now() + USABLE_TIMEOUT;
    loop {
        let problem = match netns::inspect(netns, ifname) {
            Ok(Some(state)) => state.mismatch(conn),
            Ok(None) => Some(format!("no interface {ifname} in {}", netns.display())),
            Err(e) => Some(e),
        };
        match problem {
            None => return Ok(()),
            Some(p) if Instant::now() >= deadline => return Err(p),
            Some(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The result we return: prevResult (in the config's version) with our
/// interfaces appended, or a fresh result when we are not chained.
fn start_result(conf: &NetConf) -> Value {
    let mut result = match &conf.prev_result {
        Some(Value::Object(o)) => Value::Object(o.clone()),
        _ => json!({}),
    };
    result["cniVersion"] = Value::String(conf.cni_version.clone());
    result
}

fn append_interface(
    result: &mut Value,
    conf: &NetConf,
    netns: &Path,
    ifname: &str,
    conn: &Connection,
) {
    for key in ["interfaces", "ips", "routes"] {
        if !result[key].is_array() {
            result[key] = json!([]);
        }
    }
    let interfaces = result["interfaces"]
        .as_array_mut()
        .expect("made an array above");
    interfaces.push(json!({"name": ifname, "sandbox": netns.display().to_string()}));
    let index = interfaces.len() - 1;
    let ip = conn.context.as_ref().and_then(|c| c.ip_context.as_ref());
    let addrs = match conf.report_addresses {
        Some(false) => &[][..],
        _ => ip.map(|i| i.src_ip_addrs.as_slice()).unwrap_or_default(),
    };
    for addr in addrs {
        let mut entry = json!({"address": addr, "interface": index});
        if conf.pre_1_0() {
            entry["version"] =
                Value::String(if addr.contains(':') { "6" } else { "4" }.to_string());
        }
        result["ips"].as_array_mut().expect("array").push(entry);
    }
    for route in ip.map(|i| i.src_routes.as_slice()).unwrap_or_default() {
        let mut entry = json!({"dst": route.prefix});
        if !route.next_hop.is_empty() {
            entry["gw"] = Value::String(route.next_hop.clone());
        }
        result["routes"].as_array_mut().expect("array").push(entry);
    }
}

fn del(inv: &Invocation, conf: &NetConf, timeout: Duration) -> Result<(), CniError> {
    let manager = Manager::connect(&conf.socket(), timeout)?;
    // Cluster mode first: the binding must go before its connections, or the
    // manager's reconciliation would make them again.
    manager.detach(detach_request(inv, conf))?;
    let prefix = attachment_prefix(&conf.name, &inv.container_id, &inv.ifname);
    for conn in manager.list()?.iter().filter(|c| c.id.starts_with(&prefix)) {
        manager.close(conn)?;
    }
    Ok(())
}

fn check(inv: &Invocation, conf: &NetConf, timeout: Duration) -> Result<(), CniError> {
    if conf.prev_result.is_none() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult",
        ));
    }
    let netns = netns_of(inv);
    let wanted = match cluster_pod(inv) {
        // A Kubernetes pod: the manager's connections of this attachment are
        // what the pod's annotation asks for now (in cluster mode the manager
        // converges them as it changes). With none, fall back to what the
        // runtime passed, which reports a missing connection.
        Some(_) => {
            let manager = Manager::connect(&conf.socket(), timeout)?;
            let prefix = attachment_prefix(&conf.name, &inv.container_id, &inv.ifname);
            let listed: Vec<Wanted> = manager
                .list()?
                .iter()
                .filter_map(|c| {
                    c.id.strip_prefix(&prefix).map(|ifname| Wanted {
                        id: c.id.clone(),
                        request: ConnectionRequest {
                            mechanism: "KERNEL".into(),
                            service: c.network_service.clone(),
                            domain: None,
                            interface: Some(ifname.to_string()),
                            labels: c.labels.clone().into_iter().collect(),
                        },
                        ifname: ifname.to_string(),
                    })
                })
                .collect();
            if listed.is_empty() {
                wanted(inv, conf)?
            } else {
                listed
            }
        }
        None => wanted(inv, conf)?,
    };
    if wanted.is_empty() {
        return Ok(());
    }
    let manager = Manager::connect(&conf.socket(), timeout)?;
    let known = manager.list()?;
    for w in &wanted {
        let conn = known.iter().find(|c| c.id == w.id).ok_or_else(|| {
            CniError::new(
                code::CHECK_FAILED,
                format!("{}: the manager has no connection {}", w.ifname, w.id),
            )
        })?;
        if conn.state != State::Up as i32 {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!("{}: connection {} is not UP", w.ifname, w.id),
            ));
        }
        let problem = match netns::inspect(netns, &w.ifname) {
            Ok(Some(state)) => state.mismatch(conn),
            Ok(None) => Some(format!("no interface {} in {}", w.ifname, netns.display())),
            Err(e) => Some(e),
        };
        if let Some(p) = problem {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!("{} does not match its connection", w.ifname),
            )
            .details(p));
        }
    }
    Ok(())
}

fn gc(conf: &NetConf, timeout: Duration) -> Result<(), CniError> {
    let valid = conf.valid_attachments.clone().unwrap_or_default();
    let manager = Manager::connect(&conf.socket(), timeout)?;
    let network = format!("cni/{}/", conf.name);
    for conn in manager.list()? {
        let Some(rest) = conn.id.strip_prefix(&network) else {
            continue;
        };
        let mut parts = rest.splitn(3, '/');
        let (Some(container), Some(ifname)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !valid
            .iter()
            .any(|a| a.container_id == container && a.ifname == ifname)
        {
            manager.detach(DetachRequest {
                network: conf.name.clone(),
                container_id: container.to_string(),
                cni_ifname: ifname.to_string(),
            })?;
            manager.close(&conn)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn inv(args: &[(&str, &str)]) -> Invocation {
        Invocation {
            command: Command::Add,
            container_id: "c1".into(),
            netns: Some("/run/netns/p".into()),
            ifname: "eth0".into(),
            args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn conf(json: &str) -> NetConf {
        NetConf::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn wanted_from_config_and_annotation() {
        let c = conf(
            r#"{"cniVersion":"1.0.0","name":"mesh","type":"nsm-cni","connections":["kernel://a/nsm-1"],
               "runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"networkservicemesh.io":"kernel://b?app=web"}}}"#,
        );
        let w = wanted(&inv(&[]), &c).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].id, "cni/mesh/c1/eth0/nsm-1");
        // The second request names no interface: it gets the next free default.
        assert_eq!(w[1].ifname, "nsm-2");
        assert_eq!(
            w[1].request.labels,
            BTreeMap::from([("app".to_string(), "web".to_string())])
        );
    }

    #[test]
    fn wanted_errors() {
        let c = conf(
            r#"{"cniVersion":"1.0.0","name":"m","type":"nsm-cni","connections":["kernel://a/eth0"]}"#,
        );
        assert_eq!(
            wanted(&inv(&[]), &c).unwrap_err().code,
            code::IFNAME_CONFLICT
        );
        let c =
            conf(r#"{"cniVersion":"1.0.0","name":"m","type":"nsm-cni","connections":["a/nsm-1"]}"#);
        assert_eq!(
            wanted(&inv(&[]), &c).unwrap_err().code,
            code::INVALID_CONFIG
        );
        let c = conf(
            r#"{"cniVersion":"1.0.0","name":"m","type":"nsm-cni","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"networkservicemesh.io":"kernel:///x"}}}"#,
        );
        assert_eq!(
            wanted(&inv(&[]), &c).unwrap_err().code,
            code::BAD_ANNOTATION
        );
        let c = conf(r#"{"cniVersion":"1.0.0","name":"m","type":"nsm-cni"}"#);
        assert_eq!(
            wanted(&inv(&[("K8S_POD_NAME", "web")]), &c)
                .unwrap_err()
                .code,
            code::NO_ANNOTATIONS
        );
        assert!(
            wanted(&inv(&[]), &c).unwrap().is_empty(),
            "no source, no request, no error"
        );
    }

    #[test]
    fn kubernetes_pods_go_through_cluster_mode() {
        assert_eq!(
            cluster_pod(&inv(&[
                ("K8S_POD_NAMESPACE", "shop"),
                ("K8S_POD_NAME", "web")
            ])),
            Some(("shop".to_string(), "web".to_string()))
        );
        assert_eq!(
            cluster_pod(&inv(&[("K8S_POD_NAME", "web")])),
            Some(("default".to_string(), "web".to_string()))
        );
        assert_eq!(cluster_pod(&inv(&[])), None);
    }

    #[test]
    fn result_appends_to_prev_result() {
        use nsm_proto::connectioncontext::{ConnectionContext, IpContext, Route};
        let c = conf(
            r#"{"cniVersion":"0.4.0","name":"m","type":"nsm-cni","prevResult":{"cniVersion":"0.4.0",
               "interfaces":[{"name":"eth0","sandbox":"/run/netns/p"}],"ips":[{"version":"4","address":"198.18.0.2/24","interface":0}]}}"#,
        );
        let conn = Connection {
            context: Some(ConnectionContext {
                ip_context: Some(IpContext {
                    src_ip_addrs: vec!["172.31.0.1/32".into()],
                    src_routes: vec![Route {
                        prefix: "172.31.0.0/32".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut r = start_result(&c);
        append_interface(&mut r, &c, Path::new("/run/netns/p"), "nsm-1", &conn);
        assert_eq!(r["interfaces"][1]["name"], "nsm-1");
        assert_eq!(
            r["ips"][1],
            json!({"address": "172.31.0.1/32", "interface": 1, "version": "4"})
        );
        assert_eq!(r["routes"][0]["dst"], "172.31.0.0/32");
        assert_eq!(r["ips"][0]["address"], "198.18.0.2/24", "prevResult kept");
    }
}
