//! Root integration tests of the testbed: real namespaces, veths, bridges
//! and processes. Each test uses its own lab name and state directory, and
//! every lab is a `Lab` value, so teardown runs even when an assertion fails.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use nsm_testbed::lab::{self, Lab, Options};
use nsm_testbed::testing::{require_root, unique_lab_name};
use nsm_testbed::{Topology, sys};

fn opts(dir: &Path) -> Options {
    // These tests are about the lab itself: namespaces, links, processes.
    // The mesh's own tests start the mesh programs.
    Options {
        state_root: dir.to_path_buf(),
        progress: false,
        mesh: false,
        manager_args: Vec::new(),
    }
}

/// A marker only this test's processes carry in their command line.
fn marker() -> String {
    format!("86400.{}{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

fn processes_with(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            found.push(pid);
        }
    }
    found
}

/// The `sleep MARKER` processes themselves (their `sh -c` parents carry the marker too).
fn sleeps_with(marker: &str) -> Vec<u32> {
    processes_with(marker)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
        })
        .collect()
}

fn lab_namespaces(name: &str) -> Vec<String> {
    let own = lab::netns_name(name, None);
    sys::list_netns()
        .into_iter()
        .filter(|n| n == &own || n.starts_with(&format!("{own}_")))
        .collect()
}

fn root_links() -> BTreeSet<String> {
    sys::ip(["-o", "link", "show"])
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.split(':')
                .nth(1)
                .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
        })
        .collect()
}

fn assert_gone(name: &str, marker: &str, links_before: &BTreeSet<String>, state_root: &Path) {
    assert_eq!(
        lab_namespaces(name),
        Vec::<String>::new(),
        "namespaces of lab {name} left behind"
    );
    assert_eq!(
        processes_with(marker),
        Vec::<u32>::new(),
        "processes of lab {name} left behind"
    );
    let links_after = root_links();
    let new: Vec<_> = links_after.difference(links_before).collect();
    assert!(new.is_empty(), "links left in the root namespace: {new:?}");
    assert!(
        !state_root.join(name).exists(),
        "state directory of lab {name} left behind"
    );
}

fn three_node_topology(name: &str, marker: &str) -> Topology {
    Topology::parse(&format!(
        r#"
name: {name}
nodes: [{{name: node-1}}, {{name: node-2}}, {{name: node-3}}]
services:
  - {{name: secure-net, cidr: [172.31.0.0/24, "fd00:31::/64"]}}
endpoints:
  - {{name: echo, node: node-3, service: secure-net, labels: {{app: echo}}, run: "sleep {marker}"}}
pods:
  - {{name: web, node: node-1, annotations: {{networkservicemesh.io: "kernel://secure-net/nsm-1?app=web"}}}}
  - {{name: db, node: node-2}}
  - {{name: cache, node: node-2, run: "sleep {marker}"}}
  - {{name: batch, node: node-3}}
"#
    ))
    .expect("test topology is valid")
}

fn ping(lab: &Lab, from: &str, to: &str) -> bool {
    lab.exec(from, &["ping", "-c", "1", "-W", "2", to])
        .unwrap()
        .status
        .success()
}

#[test]
fn three_nodes_four_pods_all_reach_each_other_and_down_leaves_nothing() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let name = unique_lab_name("t3n");
    let marker = marker();
    let links_before = root_links();
    let lab =
        Lab::up(three_node_topology(&name, &marker), &opts(dir.path())).expect("lab comes up");

    let status = lab.status();
    assert_eq!(status.nodes.len(), 3);
    assert_eq!(status.pods.len(), 5, "4 pods and 1 endpoint pod");
    for node in &status.nodes {
        assert_eq!(node.netns, lab::netns_name(&name, Some(&node.name)));
        assert!(sys::list_netns().contains(&node.netns));
    }
    // Every node reaches every other over the underlay, IPv4 and IPv6.
    for a in &status.nodes {
        for b in status.nodes.iter().filter(|b| b.name != a.name) {
            assert!(
                ping(&lab, &a.name, &b.underlay_ip),
                "{} -> {} ({}) over IPv4",
                a.name,
                b.name,
                b.underlay_ip
            );
            assert!(
                ping(&lab, &a.name, &b.underlay_ip6),
                "{} -> {} ({}) over IPv6",
                a.name,
                b.name,
                b.underlay_ip6
            );
        }
    }
    // Every pod reaches every other pod over the primary network, across nodes.
    for a in &status.pods {
        for b in status.pods.iter().filter(|b| b.name != a.name) {
            assert!(
                ping(&lab, &a.name, &b.ip),
                "pod {} -> pod {} ({})",
                a.name,
                b.name,
                b.ip
            );
        }
    }
    // The `run` commands run inside their pods.
    let running = sleeps_with(&marker);
    assert_eq!(running.len(), 2, "two `run` commands: {running:?}");
    let echo_ns = lab.netns("echo").unwrap();
    let in_echo = sys::netns_pids(&echo_ns);
    assert!(
        running.iter().any(|p| in_echo.contains(&(*p as i32))),
        "sleep runs in the echo pod"
    );

    let removed = lab.down().expect("down succeeds");
    assert_eq!(removed.namespaces.len(), 1 + 3 + 5);
    assert_gone(&name, &marker, &links_before, dir.path());
}

#[test]
fn a_test_that_panics_midway_leaves_nothing() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let name = unique_lab_name("tpanic");
    let marker = marker();
    let links_before = root_links();
    let state = opts(dir.path());
    let (n, m) = (name.clone(), marker.clone());
    let result = std::thread::spawn(move || {
        let lab = Lab::up(three_node_topology(&n, &m), &state).expect("lab comes up");
        assert_eq!(sleeps_with(&m).len(), 2);
        panic!("test failure midway through {}", lab.name());
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    assert_gone(&name, &marker, &links_before, dir.path());
}

#[test]
fn up_fails_cleanly_when_a_run_command_dies() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let name = unique_lab_name("tdie");
    let marker = marker();
    let links_before = root_links();
    let topo = Topology::parse(&format!(
        "name: {name}\nnodes: [{{name: a}}]\npods:\n  - {{name: ok, node: a, run: 'sleep {marker}'}}\n  - {{name: bad, node: a, run: 'exit 3'}}\n"
    ))
    .unwrap();
    let err = Lab::up(topo, &opts(dir.path())).expect_err("a run command that exits 3 fails up");
    let msg = err.to_string();
    assert!(msg.contains("run on bad exited right after start"), "{msg}");
    assert!(msg.contains("exit status: 3"), "{msg}");
    assert_gone(&name, &marker, &links_before, dir.path());
}

#[test]
fn two_labs_run_at_once_and_down_removes_only_its_own() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (unique_lab_name("ta"), unique_lab_name("tb"));
    let topo = |n: &str| {
        Topology::parse(&format!("name: {n}\nnodes: [{{name: x}}, {{name: y}}]\n")).unwrap()
    };
    let lab_a = Lab::up(topo(&a), &opts(dir.path())).unwrap();
    let lab_b = Lab::up(topo(&b), &opts(dir.path())).unwrap();
    // Same addresses in both labs: they live in separate namespaces.
    assert!(ping(&lab_a, "x", "198.51.100.2"));
    assert!(ping(&lab_b, "x", "198.51.100.2"));
    // The same name twice is refused, and the first lab is untouched.
    let err = Lab::up(topo(&a), &opts(dir.path())).expect_err("duplicate lab");
    assert!(err.to_string().contains("already up"), "{err}");
    assert!(ping(&lab_a, "y", "198.51.100.1"));
    lab_a.down().unwrap();
    assert!(lab_namespaces(&a).is_empty());
    assert_eq!(lab_namespaces(&b).len(), 3);
    assert!(ping(&lab_b, "y", "198.51.100.1"));
}

fn testbed(state: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nsm-testbed"));
    c.env("NSM_TESTBED_DIR", state);
    c
}

#[test]
fn cli_up_status_exec_down_and_cleanup_after_a_crash() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let name = unique_lab_name("tcli");
    let marker = marker();
    let links_before = root_links();
    let file = dir.path().join("lab.yaml");
    std::fs::write(
        &file,
        format!(
            "name: {name}\nnodes: [{{name: node-1}}, {{name: node-2}}]\nservices: [{{name: secure-net, cidr: 172.31.0.0/24}}]\n\
             endpoints: [{{name: echo, node: node-2, service: secure-net, labels: {{app: echo}}, run: 'sleep {marker}'}}]\n\
             pods: [{{name: web, node: node-1, annotations: {{networkservicemesh.io: 'kernel://secure-net/nsm-1?app=web'}}}}]\n"
        ),
    )
    .unwrap();
    // The lab outlives the command that built it; a guard removes it if an assertion fails.
    struct Guard<'a>(&'a str, &'a Path);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            let _ = lab::teardown(self.0, &opts(self.1));
        }
    }
    let _guard = Guard(&name, &state);

    let up = testbed(&state)
        .args(["up", "--no-mesh"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(up.status.success(), "up: {stderr}");
    assert!(
        stderr.contains("mesh programs not started (--no-mesh)"),
        "{stderr}"
    );
    assert!(stderr.contains("up in"), "{stderr}");

    let st = testbed(&state)
        .args(["status", "--json", "--lab", &name])
        .output()
        .unwrap();
    assert!(st.status.success());
    let json: serde_json::Value =
        serde_json::from_slice(&st.stdout).expect("status --json is JSON");
    let nodes = json["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    for key in ["name", "netns", "underlay_ip", "manager_socket"] {
        assert!(nodes[0][key].is_string(), "nodes[].{key}");
    }
    assert_eq!(nodes[1]["underlay_ip"], "198.51.100.2");
    let pods = json["pods"].as_array().unwrap();
    let web = pods.iter().find(|p| p["name"] == "web").expect("web pod");
    assert_eq!(web["node"], "node-1");
    assert_eq!(web["netns"], lab::netns_name(&name, Some("web")));
    assert!(json["connections"].is_array());

    // exec runs inside the pod and passes the command's exit code through.
    let ex = testbed(&state)
        .args([
            "exec",
            "--lab",
            &name,
            "web",
            "--",
            "sh",
            "-c",
            "ip -o addr show eth0; exit 7",
        ])
        .output()
        .unwrap();
    assert_eq!(ex.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&ex.stdout).contains("198.18.0.2/24"));
    let ex = testbed(&state)
        .args(["exec", "--lab", &name, "nope", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(ex.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&ex.stderr).contains("no node or pod named `nope`"));

    // A crash loses the state directory; `down NAME` still finds everything by prefix.
    std::fs::remove_dir_all(state.join(&name)).unwrap();
    let down = testbed(&state).args(["down", &name]).output().unwrap();
    assert!(
        down.status.success(),
        "down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(String::from_utf8_lossy(&down.stdout).contains("removed 5 namespaces"));
    assert_gone(&name, &marker, &links_before, &state);
    // Down again: nothing to do, still success.
    let again = testbed(&state).args(["down", &name]).output().unwrap();
    assert!(again.status.success());
}

#[test]
fn bad_topology_files_exit_2_with_one_line_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let name = unique_lab_name("tbad");
    let cases = [
        (
            "unknown key",
            format!("name: {name}\nnodes: [{{name: a, colour: red}}]\n"),
            "unknown field `colour`",
        ),
        (
            "missing node",
            format!("name: {name}\nnodes: [{{name: a}}]\npods: [{{name: p, node: b}}]\n"),
            "pods[0] (p).node",
        ),
        (
            "duplicate",
            format!("name: {name}\nnodes: [{{name: a}}, {{name: a}}]\n"),
            "nodes[1].name: duplicate name",
        ),
        (
            "bad cidr",
            format!(
                "name: {name}\nnodes: [{{name: a}}]\nservices: [{{name: s, cidr: 300.1.0.0/16}}]\n"
            ),
            "not a CIDR",
        ),
    ];
    for (what, text, expect) in cases {
        let file = dir.path().join("bad.yaml");
        std::fs::write(&file, text).unwrap();
        let out = testbed(&state).arg("up").arg(&file).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{what}: one line: {stderr}"
        );
        assert!(stderr.contains(expect), "{what}: {stderr}");
        assert!(
            stderr.contains("bad.yaml"),
            "{what}: names the file: {stderr}"
        );
        assert!(lab_namespaces(&name).is_empty(), "{what}: nothing created");
        assert!(!state.join(&name).exists(), "{what}: no state");
    }
}

#[test]
fn a_signal_during_up_removes_the_half_built_lab() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let name = unique_lab_name("tsig");
    let marker = marker();
    let links_before = root_links();
    // Enough pods that `up` is still building when the signal arrives.
    let pods: String = (0..60)
        .map(|i| {
            format!(
                "  - {{name: p{i}, node: n{}, run: 'sleep {marker}'}}\n",
                i % 3
            )
        })
        .collect();
    let file = dir.path().join("lab.yaml");
    std::fs::write(
        &file,
        format!("name: {name}\nnodes: [{{name: n0}}, {{name: n1}}, {{name: n2}}]\npods:\n{pods}"),
    )
    .unwrap();
    // Whatever happens below, nothing of this lab outlives the test.
    struct Guard<'a>(&'a str, &'a Path);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            let _ = lab::teardown(self.0, &opts(self.1));
        }
    }
    let _guard = Guard(&name, &state);
    let mut child = testbed(&state)
        .args(["up", "--no-mesh"])
        .arg(&file)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it has started making namespaces, then interrupt it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lab_namespaces(&name).len() < 5 {
        assert!(std::time::Instant::now() < deadline, "up never started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "up still running when signalled"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stopping and removing lab"), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_gone(&name, &marker, &links_before, &state);
}

/// A topology with a passthrough endpoint whose program is missing fails
/// before anything is made, naming the program, and leaves nothing.
#[test]
fn a_missing_passthrough_program_is_named_and_nothing_is_made() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    // nsm-testbed and the mesh, without nsm-passthrough: programs are found
    // beside nsm-testbed, and PATH holds none of ours.
    let mut programs = vec![std::path::PathBuf::from(env!("CARGO_BIN_EXE_nsm-testbed"))];
    for p in lab::MESH_PROGRAMS {
        match sys::find_program(p) {
            Some(path) => programs.push(path),
            None => panic!("{p} not built: run `cargo build --workspace --bins` first"),
        }
    }
    for p in &programs {
        std::fs::copy(p, bin.join(p.file_name().unwrap())).unwrap();
    }
    let name = unique_lab_name("tnopt");
    let file = dir.path().join("t.yaml");
    std::fs::write(
        &file,
        format!(
            "name: {name}\nnodes: [{{name: a}}]\n\
             endpoints: [{{name: f, node: a, service: inspector, passthrough: true}}]\n"
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let out = Command::new(bin.join("nsm-testbed"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("NSM_TESTBED_DIR", &state)
        .arg("up")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("nsm-passthrough is not built"),
        "names the program: {stderr}"
    );
    assert!(
        lab_namespaces(&name).is_empty(),
        "nothing created: {stderr}"
    );
    assert!(!state.join(&name).exists(), "no state: {stderr}");
}
