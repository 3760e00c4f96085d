//! nsm-cni driven the way a runtime drives it: `cnitool` (built from
//! Debian's source package) runs a conflist in the node's namespace, with
//! Debian's reference `bridge` + `host-local` as the primary network and
//! nsm-cni chained after it, against a real mesh (forwarders, managers, an
//! endpoint on another node) in a testbed lab.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nsm_testbed::lab::{Lab, Options};
use nsm_testbed::testing::{require_root, unique_lab_name};
use nsm_testbed::{Topology, mesh, sys};
use serde_json::Value;

fn cnitool() -> PathBuf {
    if let Some(p) = std::env::var_os("NSM_CNITOOL") {
        return PathBuf::from(p);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/ensure-cnitool");
    let out = Command::new(script)
        .output()
        .expect("scripts/ensure-cnitool runs");
    assert!(
        out.status.success(),
        "ensure-cnitool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The directory holding the `nsm-cni` binary built for this test run.
fn plugin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_nsm-cni"))
        .parent()
        .unwrap()
        .to_path_buf()
}

struct Cni {
    lab: Lab,
    confdir: tempfile::TempDir,
    pod_netns: PathBuf,
    _state: tempfile::TempDir,
}

impl Cni {
    fn up(nsm_extra: &str) -> Cni {
        require_root();
        assert!(
            Path::new("/usr/lib/cni/bridge").exists(),
            "Debian's containernetworking-plugins are needed"
        );
        let state = tempfile::tempdir().unwrap();
        let name = unique_lab_name("cni");
        let topology = Topology::parse(&format!(
            "name: {name}\nnodes: [{{name: node-1}}, {{name: node-2}}]\n\
             services: [{{name: secure-net, cidr: 172.31.0.0/24}}]\n\
             endpoints: [{{name: echo, node: node-2, service: secure-net, labels: {{app: echo}}}}]\n\
             pods: [{{name: pod, node: node-1, cni: true}}]\n"
        ))
        .unwrap();
        let opts = Options {
            state_root: state.path().to_path_buf(),
            progress: false,
            mesh: true,
            manager_args: Vec::new(),
        };
        let lab = Lab::up(topology, &opts).expect("lab with mesh");
        assert!(
            lab.missing_binaries().is_empty(),
            "{:?}",
            lab.missing_binaries()
        );
        let confdir = tempfile::tempdir().unwrap();
        let socket = lab.manager_socket("node-1");
        // host-local keeps its leases in a directory of ours, not the host's.
        let conflist = format!(
            r#"{{"cniVersion":"1.0.0","name":"{name}","plugins":[
                {{"type":"bridge","bridge":"cni0","isGateway":true,
                  "ipam":{{"type":"host-local","ranges":[[{{"subnet":"198.18.200.0/24"}}]],"dataDir":"{ipam}"}}}},
                {{"type":"nsm-cni","socket":"{socket}","connections":["kernel://secure-net/nsm-1?app=cni"]{nsm_extra}}}]}}"#,
            ipam = confdir.path().join("ipam").display(),
            socket = socket.display(),
        );
        std::fs::write(confdir.path().join("10-mesh.conflist"), conflist).unwrap();
        let pod_netns = Path::new(sys::NETNS_DIR).join(lab.netns("pod").unwrap());
        Cni {
            lab,
            confdir,
            pod_netns,
            _state: state,
        }
    }

    /// `cnitool VERB NETWORK NETNS`, run inside node-1 as its runtime would.
    fn cnitool(&self, verb: &str) -> Output {
        let cni_path = format!("/usr/lib/cni:{}", plugin_dir().display());
        self.lab
            .command(
                "node-1",
                &[
                    "env".as_ref(),
                    format!("NETCONFPATH={}", self.confdir.path().display()).as_ref(),
                    format!("CNI_PATH={cni_path}").as_ref(),
                    cnitool().as_os_str(),
                    verb.as_ref(),
                    self.lab.name().as_ref(),
                    self.pod_netns.as_os_str(),
                ],
            )
            .unwrap()
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn in_pod(&self, argv: &[&str]) -> Output {
        self.lab.exec("pod", argv).unwrap()
    }

    fn has_link(&self, ifname: &str) -> bool {
        self.in_pod(&["ip", "link", "show", "dev", ifname])
            .status
            .success()
    }

    fn manager_connections(&self) -> usize {
        mesh::connections(&self.lab.manager_socket("node-1"), Duration::from_secs(5))
            .unwrap()
            .len()
    }
}

/// A test that fails before its own DEL still removes what ADD made (and
/// libcni's cached result): DEL is idempotent, so it always runs once more.
impl Drop for Cni {
    fn drop(&mut self) {
        let _ = self.cnitool("del");
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn add_check_del_through_cnitool_with_the_reference_bridge_plugin() {
    // Debian's bridge checks every address of the chained result against
    // eth0 on CHECK, so this chain reports interfaces and routes only.
    let cni = Cni::up(r#","reportAddresses":false"#);

    let add = cni.cnitool("add");
    assert!(add.status.success(), "add: {}", text(&add));
    let result: Value = serde_json::from_slice(&add.stdout).expect("cnitool prints the result");
    let names: Vec<&str> = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"eth0") && names.contains(&"nsm-1"),
        "{names:?}"
    );
    // The primary network is there, and nsm-1 reaches the endpoint on node-2.
    assert!(text(&cni.in_pod(&["ip", "-o", "addr", "show", "eth0"])).contains("198.18.200."));
    let route = result["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|r| r["dst"].as_str().filter(|d| d.starts_with("172.31.")))
        .expect("a route to the endpoint")
        .to_string();
    let endpoint = route.split('/').next().unwrap();
    assert!(
        cni.in_pod(&["ping", "-c", "1", "-W", "2", endpoint])
            .status
            .success(),
        "ping {endpoint} over nsm-1"
    );

    let check = cni.cnitool("check");
    assert!(check.status.success(), "check: {}", text(&check));
    // Take nsm-1's address away: CHECK now fails and says why.
    assert!(
        cni.in_pod(&["ip", "addr", "flush", "dev", "nsm-1"])
            .status
            .success()
    );
    // Removing the address also removed the route through nsm-1, which the
    // bridge plugin's own CHECK would report first; put the route back so
    // that the missing address is what nsm-cni's CHECK finds.
    let _ = cni.in_pod(&["ip", "route", "replace", &route, "dev", "nsm-1"]);
    let check = cni.cnitool("check");
    assert!(
        !check.status.success(),
        "check must fail once the address is gone"
    );
    assert!(text(&check).contains("is missing"), "{}", text(&check));

    for round in 0..2 {
        let del = cni.cnitool("del");
        assert!(del.status.success(), "del #{round}: {}", text(&del));
    }
    assert!(!cni.has_link("nsm-1"), "nsm-1 removed");
    assert_eq!(
        cni.manager_connections(),
        0,
        "the manager closed the connection"
    );
}

#[test]
fn the_result_reports_mesh_addresses_and_gc_closes_orphans() {
    let cni = Cni::up("");
    let add = cni.cnitool("add");
    assert!(add.status.success(), "add: {}", text(&add));
    let result: Value = serde_json::from_slice(&add.stdout).unwrap();
    let nsm = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .position(|i| i["name"] == "nsm-1")
        .unwrap();
    let ip = result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["interface"] == nsm)
        .expect("nsm-1's address in ips");
    assert!(
        ip["address"].as_str().unwrap().starts_with("172.31."),
        "{ip}"
    );
    assert_eq!(cni.manager_connections(), 1);

    // GC with no valid attachment left: the plugin closes the orphan.
    let gc_conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": cni.lab.name(), "type": "nsm-cni",
        "socket": cni.lab.manager_socket("node-1"),
        "cni.dev/valid-attachments": []
    });
    let mut gc = Command::new(env!("CARGO_BIN_EXE_nsm-cni"))
        .env("CNI_COMMAND", "GC")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    gc.stdin
        .take()
        .unwrap()
        .write_all(gc_conf.to_string().as_bytes())
        .unwrap();
    let gc = gc.wait_with_output().unwrap();
    assert!(gc.status.success(), "gc: {}", text(&gc));
    assert_eq!(cni.manager_connections(), 0, "GC closed the orphan");
    assert!(!cni.has_link("nsm-1"), "its interface is gone");
    let del = cni.cnitool("del");
    assert!(del.status.success(), "del after gc: {}", text(&del));
}

#[test]
fn a_failed_add_is_rolled_back_and_reports_the_managers_refusal() {
    let cni = Cni::up("");
    // The second request names a service that does not exist.
    let conf = cni.confdir.path().join("10-mesh.conflist");
    let text_conf = std::fs::read_to_string(&conf).unwrap().replace(
        r#""connections":["kernel://secure-net/nsm-1?app=cni"]"#,
        r#""connections":["kernel://secure-net/nsm-1?app=cni","kernel://no-such-net/nsm-2"]"#,
    );
    std::fs::write(&conf, text_conf).unwrap();
    let add = cni.cnitool("add");
    assert!(!add.status.success(), "add must fail");
    let out = text(&add);
    assert!(out.contains("no-such-net"), "{out}");
    assert!(!cni.has_link("nsm-1"), "nsm-1 was rolled back");
    assert_eq!(
        cni.manager_connections(),
        0,
        "no connection left in the manager"
    );
    // The same ADD as a runtime sees it: CNI error code 100 on stdout.
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
    let mut nsm = conf["plugins"][1].clone();
    nsm["cniVersion"] = conf["cniVersion"].clone();
    nsm["name"] = conf["name"].clone();
    let mut add = Command::new(env!("CARGO_BIN_EXE_nsm-cni"))
        .envs([
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "direct-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ])
        .env("CNI_NETNS", &cni.pod_netns)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    add.stdin
        .take()
        .unwrap()
        .write_all(nsm.to_string().as_bytes())
        .unwrap();
    let add = add.wait_with_output().unwrap();
    let err: Value = serde_json::from_slice(&add.stdout).expect("an error object on stdout");
    assert_eq!(err["code"], 100, "{err}");
    assert!(!cni.has_link("nsm-1"), "rolled back again");
    assert_eq!(cni.manager_connections(), 0);
    let del = cni.cnitool("del");
    assert!(
        del.status.success(),
        "del after a failed add: {}",
        text(&del)
    );
}
