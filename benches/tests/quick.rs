//! End to end: `nsm-bench --quick` over veth and nsm-rs builds its lab,
//! measures both and writes a JSON document with sane figures. Needs root
//! and the mesh binaries (built by the workspace build), like the testbed's
//! own root tests; about 40 s.

use std::process::Command;

#[test]
fn quick_run_measures_veth_and_nsm_rs() {
    nsm_testbed::testing::require_root();
    let dir = tempfile::tempdir().expect("temp dir");
    let json_path = dir.path().join("bench.json");
    let svg_path = dir.path().join("bench.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_nsm-bench"))
        .args(["--quick", "--only", "veth,nsm-rs", "--json"])
        .arg(&json_path)
        .arg("--svg")
        .arg(&svg_path)
        .output()
        .expect("nsm-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "nsm-bench failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("TCP 1 stream"), "no table:\n{stdout}");
    // `./dev test` builds target/debug, which nsm-bench then measures: it
    // must say so loudly, not only in the table's header.
    if stdout.contains("mesh build: debug build") {
        assert!(
            stderr.contains("warning: measuring the DEBUG build"),
            "no warning for a debug build:\n{stderr}"
        );
    }

    let text = std::fs::read_to_string(&json_path).expect("JSON written");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let impls = v["implementations"].as_array().expect("implementations");
    for name in ["veth", "nsm-rs"] {
        let i = impls
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {text}"));
        assert_eq!(i["status"], "ok", "{name}: {}", i["status"]);
        assert_eq!(
            i["runs"].as_array().map(Vec::len),
            Some(1),
            "{name}: one run"
        );
        for key in [
            "tcp_1_stream_gbps",
            "udp_64_pps",
            "latency_idle_p50_us",
            "latency_idle_p99_us",
            "latency_load_p99_us",
        ] {
            let m = i["medians"][key].as_f64();
            assert!(m.is_some_and(|m| m > 0.0), "{name} {key} = {m:?}: {text}");
        }
        // Throughput within physics: more than 1 Mbit/s, less than 1 Tbit/s.
        let tcp = i["medians"]["tcp_1_stream_gbps"]
            .as_f64()
            .unwrap_or_default();
        assert!((0.001..1000.0).contains(&tcp), "{name} tcp {tcp}");
    }
    let ours = impls
        .iter()
        .find(|i| i["name"] == "nsm-rs")
        .expect("checked above");
    assert!(
        ours["medians"]["cpu_seconds_per_gb"]
            .as_f64()
            .is_some_and(|c| c > 0.0),
        "nsm-rs has a CPU figure: {text}"
    );
    assert!(
        ours["ratios"]["to_veth"]["tcp_1_stream_gbps"]
            .as_f64()
            .is_some()
    );
    let veth = impls
        .iter()
        .find(|i| i["name"] == "veth")
        .expect("checked above");
    assert!(
        veth["medians"].get("cpu_seconds_per_gb").is_none(),
        "veth CPU is n/a"
    );
    assert!(
        v["control_plane"]["setup_1"]["p50_ms"]
            .as_f64()
            .is_some_and(|ms| ms > 0.0),
        "setup latency: {}",
        v["control_plane"]
    );
    let svg = std::fs::read_to_string(&svg_path).expect("SVG written");
    assert!(svg.starts_with("<svg") && svg.contains("nsm-rs") && svg.contains("veth"));
}

/// SIGTERM in the middle of a measurement: nsm-bench stops, removes every
/// namespace of its lab, reports nothing and exits with 130.
#[test]
fn a_signal_stops_the_run_and_removes_the_lab() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    nsm_testbed::testing::require_root();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nsm-bench"))
        .args(["--only", "veth", "--runs", "20", "--duration", "3"])
        .args(["--no-control-plane", "--pings", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nsm-bench starts");
    // Whatever happens below, no process or lab outlives the test.
    struct Cleanup(std::process::Child, Option<String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            if let Some(lab) = &self.1 {
                let _ = nsm_testbed::teardown(lab, &nsm_testbed::Options::default());
            }
        }
    }
    let stderr = child.stderr.take().expect("piped");
    let mut guard = Cleanup(child, None);
    let mut lines = BufReader::new(stderr).lines();
    let mut log = String::new();
    // The progress (one line per step off a terminal) names the lab, then
    // the first test.
    for line in lines.by_ref() {
        let line = line.expect("stderr is text");
        log.push_str(&line);
        log.push('\n');
        if let Some(name) = line.split("building lab ").nth(1) {
            guard.1 = Some(name.trim().to_string());
        }
        if line.contains("TCP 1 stream") {
            break;
        }
    }
    let lab = guard
        .1
        .clone()
        .unwrap_or_else(|| panic!("no lab named:\n{log}"));
    let netns = |lab: &str| {
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(lab))
            .count()
    };
    assert!(netns(&lab) > 0, "lab {lab} is up while it measures");

    let pid = i32::try_from(guard.0.id()).expect("pid fits");
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM sent");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = guard.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(90),
            "nsm-bench still running 90 s after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    for line in lines.map_while(Result::ok) {
        log.push_str(&line);
        log.push('\n');
    }
    assert_eq!(status.code(), Some(130), "exit status {status:?}:\n{log}");
    assert!(log.contains("interrupted"), "says why it stopped:\n{log}");
    assert_eq!(netns(&lab), 0, "every namespace of {lab} removed:\n{log}");
    let mut stdout = String::new();
    if let Some(mut out) = guard.0.stdout.take() {
        std::io::Read::read_to_string(&mut out, &mut stdout).expect("stdout");
    }
    assert!(
        !stdout.contains("TCP 1 stream"),
        "no table after an interrupt:\n{stdout}"
    );
}
