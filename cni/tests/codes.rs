//! The plugin as runtimes run it: a process with env and stdin, its answer
//! on stdout. These cases need no manager; the mesh tests attach real pods.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

struct Out {
    code: Option<i32>,
    json: Value,
}

fn plugin(env: &[(&str, &str)], stdin: &str) -> Out {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nsm-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let json = if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
    };
    Out {
        code: out.status.code(),
        json,
    }
}

fn add_env(netns: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", "ADD".into()),
        ("CNI_CONTAINERID", "ctr-1".into()),
        ("CNI_NETNS", netns.into()),
        ("CNI_IFNAME", "eth0".into()),
        ("CNI_PATH", "/usr/lib/cni".into()),
    ]
}

fn as_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, s)| (*k, s.as_str())).collect()
}

fn conf(socket: &str, extra: &str) -> String {
    format!(r#"{{"cniVersion":"1.0.0","name":"mesh","type":"nsm-cni","socket":"{socket}"{extra}}}"#)
}

fn assert_error(out: &Out, code: u64) {
    assert_ne!(out.code, Some(0), "an error exits non-zero: {}", out.json);
    assert_eq!(out.json["code"], code, "{}", out.json);
    assert!(out.json["msg"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(out.json["cniVersion"].is_string());
}

#[test]
fn version_lists_every_supported_version() {
    let out = plugin(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.1.0"}"#);
    assert_eq!(out.code, Some(0));
    assert_eq!(out.json["cniVersion"], "1.1.0");
    let v: Vec<&str> = out.json["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(v, ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
}

#[test]
fn invalid_environment_is_code_4() {
    let out = plugin(
        &[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")],
        &conf("/nonexistent", ""),
    );
    assert_error(&out, 4);
    assert!(
        out.json["msg"]
            .as_str()
            .unwrap()
            .contains("CNI_CONTAINERID")
    );
    assert_error(&plugin(&[("CNI_COMMAND", "JUMP")], "{}"), 4);
}

#[test]
fn undecodable_config_is_code_6_and_invalid_config_code_7() {
    let env = add_env("/run/netns/none");
    assert_error(&plugin(&as_refs(&env), "{ nope"), 6);
    assert_error(&plugin(&as_refs(&env), &conf("/x", r#","sockt":"/y""#)), 7);
    assert_error(
        &plugin(
            &as_refs(&env),
            &conf("/x", r#","connections":["no-scheme/nsm-1"]"#),
        ),
        7,
    );
    assert_error(
        &plugin(&as_refs(&env), &conf("/x", r#","timeoutSeconds":0"#)),
        7,
    );
}

#[test]
fn incompatible_version_is_code_1() {
    let env = add_env("/run/netns/none");
    let out = plugin(
        &as_refs(&env),
        r#"{"cniVersion":"0.2.0","name":"mesh","type":"nsm-cni"}"#,
    );
    assert_error(&out, 1);
    // GC is a 1.1.0 command.
    let out = plugin(&[("CNI_COMMAND", "GC")], &conf("/x", ""));
    assert_error(&out, 1);
}

#[test]
fn unreachable_manager_is_code_11_and_status_50() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nsm.io.sock");
    let socket = socket.to_str().unwrap();
    let env = add_env("/run/netns/none");
    let out = plugin(
        &as_refs(&env),
        &conf(socket, r#","connections":["kernel://secure-net/nsm-1"]"#),
    );
    assert_error(&out, 11);
    assert!(out.json["msg"].as_str().unwrap().contains("unreachable"));
    let del: Vec<(&str, &str)> = vec![
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "ctr-1"),
        ("CNI_IFNAME", "eth0"),
    ];
    assert_error(&plugin(&del, &conf(socket, "")), 11);
    let status = plugin(
        &[("CNI_COMMAND", "STATUS")],
        &format!(r#"{{"cniVersion":"1.1.0","name":"mesh","type":"nsm-cni","socket":"{socket}"}}"#),
    );
    assert_error(&status, 50);
}

#[test]
fn add_without_requests_passes_prev_result_through() {
    let prev = r#","prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"198.18.0.2/24","interface":0}]}"#;
    let env = add_env("/run/netns/none");
    let out = plugin(&as_refs(&env), &conf("/nonexistent", prev));
    assert_eq!(out.code, Some(0), "{}", out.json);
    assert_eq!(out.json["interfaces"][0]["name"], "eth0");
    assert_eq!(out.json["ips"][0]["address"], "198.18.0.2/24");
}

#[test]
fn kubernetes_pod_without_annotations_is_code_101() {
    let mut env = add_env("/run/netns/none");
    env.push((
        "CNI_ARGS",
        "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web".into(),
    ));
    let out = plugin(&as_refs(&env), &conf("/nonexistent", ""));
    assert_error(&out, 101);
    assert!(
        out.json["details"]
            .as_str()
            .unwrap()
            .contains("io.kubernetes.cri.pod-annotations")
    );
}

/// The shipped example conflist (also in the README) is what the plugin accepts.
#[test]
fn example_conflist_entry_is_a_valid_config() {
    let list: Value = serde_json::from_str(include_str!("../examples/10-mesh.conflist")).unwrap();
    let mut ours = list["plugins"][1].clone();
    ours["cniVersion"] = list["cniVersion"].clone();
    ours["name"] = list["name"].clone();
    nsm_cni::spec::NetConf::parse(ours.to_string().as_bytes()).expect("example config parses");
    let readme = include_str!("../../README.md");
    assert!(
        readme.contains(r#""type": "nsm-cni""#),
        "README shows the example"
    );
}
