//! A measurement, not a test: what `--metrics-listen` (scraped every
//! second) and `--flow-log` cost in iperf3 TCP throughput, pod A to pod B
//! through two forwarders. Two identical set-ups in one run, one with both
//! on (node A's forwarder) and one with both off, measured alternately
//! (the machine is shared and noisy: compare within a run).
//!
//! ```sh
//! cargo test --release -p nsm-forwarder --test throughput_observability -- --ignored --nocapture
//! ```
//! `NSM_PERF_SECS` (default 5) per run, `NSM_PERF_ROUNDS` (default 4).

#![forbid(unsafe_code)]

mod common;

use std::io::{Read, Write};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;

const METRICS: &str = "192.0.2.1:9464";

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

/// Two nodes, two pods, two forwarders, one connection.
fn setup(extra_a: &[&str]) -> ConnectedPair {
    ConnectedPair::new("perf", extra_a, false)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[test]
#[ignore = "a measurement: run explicitly, in release mode"]
fn throughput_with_and_without_observability() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let flows = dir.path().join("flows.jsonl").display().to_string();
    let on = setup(&[
        "--metrics-listen",
        METRICS,
        "--flow-log",
        &flows,
        "--flow-log-rate",
        "0",
    ]);
    let off = setup(&[]);

    // Scrape the "on" forwarder every second, from inside its node.
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicU64::new(0));
    let (stop_t, scrapes_t, ns) = (stop.clone(), scrapes.clone(), on.na.path());
    let scraper = std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).expect("netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        while !stop_t.load(Ordering::Relaxed) {
            if let Ok(mut s) = std::net::TcpStream::connect(METRICS) {
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
                let mut out = String::new();
                if s.read_to_string(&mut out).is_ok() && out.starts_with("HTTP/1.1 200") {
                    scrapes_t.fetch_add(1, Ordering::Relaxed);
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });

    let secs = std::env::var("NSM_PERF_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rounds: usize = std::env::var("NSM_PERF_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        // Alternate which goes first, so drift hits both alike.
        if i % 2 == 0 {
            without.push(iperf3(&off.pa, &off.pb, "198.51.100.2", secs));
            with.push(iperf3(&on.pa, &on.pb, "198.51.100.2", secs));
        } else {
            with.push(iperf3(&on.pa, &on.pb, "198.51.100.2", secs));
            without.push(iperf3(&off.pa, &off.pb, "198.51.100.2", secs));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = scraper.join();
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let (w, wo) = (mean(&with), mean(&without));
    eprintln!("iperf3 TCP, 1 stream, {secs} s each, {rounds} rounds alternating:");
    eprintln!(
        "  metrics (scraped 1/s) + flow log on:  {} Gbit/s, mean {w:.2}",
        fmt(&with)
    );
    eprintln!(
        "  both off:                             {} Gbit/s, mean {wo:.2}",
        fmt(&without)
    );
    eprintln!(
        "  difference: {:+.1} % ({} scrapes served)",
        (w / wo - 1.0) * 100.0,
        scrapes.load(Ordering::Relaxed)
    );
    let lines = std::fs::read_to_string(&flows)
        .unwrap_or_default()
        .lines()
        .count();
    eprintln!("  flow records written so far: {lines}");
    assert!(
        scrapes.load(Ordering::Relaxed) > 0,
        "the scraper got answers"
    );
}
