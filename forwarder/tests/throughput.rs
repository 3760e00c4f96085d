//! A measurement, not a test: iperf3 TCP throughput from pod A to pod B
//! through two forwarders, against plain veth between the two node
//! namespaces, in one run (the machine is shared: compare within a run).
//!
//! ```sh
//! cargo test --release -p nsm-forwarder --test throughput -- --ignored --nocapture
//! ```

#![forbid(unsafe_code)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

fn iperf3(client: &Netns, server: &Netns, dst: &str, secs: u32) -> f64 {
    let mut srv = server
        .command("iperf3")
        .args(["-s", "-1", "-p", "5299"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    let out = client
        .command("iperf3")
        .args(["-c", dst, "-p", "5299", "-t", &secs.to_string(), "-J"])
        .output()
        .expect("iperf3 client");
    let _ = srv.wait();
    let json = String::from_utf8_lossy(&out.stdout);
    // "sum_received": { ... "bits_per_second": N
    let at = json
        .find("\"sum_received\"")
        .expect("iperf3 JSON has sum_received");
    let rest = &json[at..];
    let b = rest.find("\"bits_per_second\":").expect("bits_per_second") + 18;
    let num: String = rest[b..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == 'e' || *c == '+')
        .collect();
    num.parse::<f64>().expect("number") / 1e9
}

#[test]
#[ignore = "a measurement: run explicitly, in release mode"]
fn throughput_pod_to_pod_vs_veth() {
    require_root();
    let ConnectedPair {
        fa,
        fb,
        pa,
        pb: pb_,
        na,
        nb,
    } = ConnectedPair::new("perf", &[], false);
    let secs = std::env::var("NSM_PERF_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let veth = iperf3(&na, &nb, "192.0.2.2", secs);
    let mesh = iperf3(&pa, &pb_, "198.51.100.2", secs);
    let veth2 = iperf3(&na, &nb, "192.0.2.2", secs);
    let mesh2 = iperf3(&pa, &pb_, "198.51.100.2", secs);
    eprintln!("iperf3 TCP, 1 stream, {secs} s each, interleaved:");
    eprintln!("  plain veth (node A -> node B):         {veth:.2} / {veth2:.2} Gbit/s");
    eprintln!("  pod A -> pod B through nsm-forwarder:  {mesh:.2} / {mesh2:.2} Gbit/s");
    current_thread_rt().block_on(async {
        let mut ca = fa.client().await;
        let l = ca
            .list(nsm_proto::forwarder::v1::ListRequest {})
            .await
            .expect("list")
            .into_inner();
        eprintln!("  forwarder A counters: {:?}", l.cross_connects[0].counters);
    });
    for (name, mut f) in [("A", fa), ("B", fb)] {
        f.terminate();
        let log = f.log_text();
        if let Some(line) = log.lines().find(|l| l.contains("packet thread stopped")) {
            eprintln!("  forwarder {name}: {line}");
        }
    }
}
