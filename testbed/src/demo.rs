//! `nsm-testbed demo`: the main job, end to end, with a clean teardown.
//!
//! Builds the demo lab (two nodes, a client pod `web` on node-1, an
//! endpoint pod `echo` on node-2), sends a ping and a few seconds of TCP
//! from the client to the endpoint, prints what it measured and removes the
//! lab. Until the mesh's binaries exist, the traffic crosses the lab's
//! primary network and the demo says so.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::lab::{Lab, LabError, Options};
use crate::topology::Topology;

/// The demo lab's name (the `name` of [`TOPOLOGY`]).
pub const LAB_NAME: &str = "demo";

/// The demo topology (also in `testbed/topologies/demo.yaml`).
pub const TOPOLOGY: &str = include_str!("../topologies/demo.yaml");

/// What went wrong in the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Building or removing the lab.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// A measurement step.
    #[error("demo: {step}: {detail}")]
    Step {
        /// Which step.
        step: &'static str,
        /// What happened.
        detail: String,
    },
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Which path the traffic took.
    pub path: String,
    /// Ping round trip, average, in milliseconds.
    pub rtt_ms: f64,
    /// TCP throughput in bits per second.
    pub tcp_bps: f64,
}

/// Runs the demo, writing progress and results to `out`.
pub fn run(opts: &Options, out: &mut dyn Write) -> Result<Report, DemoError> {
    let topology = Topology::parse(TOPOLOGY).map_err(LabError::from)?;
    let lab = Lab::up(topology, opts)?;
    let report = measure(&lab, out);
    let removed = lab.down()?;
    let _ = writeln!(
        out,
        "torn down: {} namespaces, {} processes",
        removed.namespaces.len(),
        removed.processes
    );
    report
}

fn measure(lab: &Lab, out: &mut dyn Write) -> Result<Report, DemoError> {
    let (path, target) = if lab.missing_binaries().is_empty() {
        // The mesh gave `web` an interface nsm-1; the endpoint's side of the
        // connection has its own address from the service's pool.
        let status = lab.status();
        let conn = status
            .connections
            .iter()
            .find(|c| c.pod == "web")
            .ok_or_else(|| DemoError::Step {
                step: "connection",
                detail: "web has no connection".to_string(),
            })?;
        if conn.state != "UP" || conn.dst_ip.is_empty() {
            return Err(DemoError::Step {
                step: "connection",
                detail: format!(
                    "web's {} is {} (dst {:?})",
                    conn.interface, conn.state, conn.dst_ip
                ),
            });
        }
        let _ = writeln!(
            out,
            "web has {} {} -> {} ({}) via the mesh",
            conn.interface, conn.src_ip, conn.dst_ip, conn.endpoint
        );
        (
            format!("mesh ({} on {})", conn.service, conn.interface),
            conn.dst_ip.clone(),
        )
    } else {
        let _ = writeln!(
            out,
            "the mesh is not built yet ({} missing): the demo uses the lab's primary network",
            lab.missing_binaries().join(", ")
        );
        let echo = lab.plan().ip_of("echo").expect("demo topology has echo");
        ("primary network".to_string(), echo.to_string())
    };

    let _ = writeln!(out, "ping web -> echo ({target}) over the {path}");
    let ping = lab.exec("web", &["ping", "-c", "3", "-i", "0.2", "-W", "2", &target])?;
    let text = String::from_utf8_lossy(&ping.stdout);
    if !ping.status.success() {
        return Err(DemoError::Step {
            step: "ping",
            detail: format!("{text}{}", String::from_utf8_lossy(&ping.stderr))
                .trim()
                .to_string(),
        });
    }
    let rtt_ms = parse_ping_avg(&text).ok_or_else(|| DemoError::Step {
        step: "ping",
        detail: format!("no rtt summary in: {text}"),
    })?;
    let _ = writeln!(out, "  3 packets, rtt avg {rtt_ms:.3} ms");

    let _ = writeln!(out, "tcp web -> echo for 3 s (iperf3)");
    let json = iperf3(lab, &target)?;
    let tcp_bps = parse_iperf3_bps(&json).ok_or_else(|| DemoError::Step {
        step: "iperf3",
        detail: "no end.sum_received.bits_per_second in its JSON".to_string(),
    })?;
    let _ = writeln!(out, "  {:.2} Gbit/s", tcp_bps / 1e9);
    Ok(Report {
        path,
        rtt_ms,
        tcp_bps,
    })
}

/// The endpoint's server daemonizes at `up`; give it a moment to listen.
fn iperf3(lab: &Lab, target: &str) -> Result<String, DemoError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let o = lab.exec("web", &["iperf3", "-c", target, "-t", "3", "-J"])?;
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if o.status.success() {
            return Ok(text);
        }
        if Instant::now() >= deadline {
            return Err(DemoError::Step {
                step: "iperf3",
                detail: format!("{text}{}", String::from_utf8_lossy(&o.stderr))
                    .trim()
                    .to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The average of ping's `rtt min/avg/max/mdev = a/b/c/d ms` line.
pub fn parse_ping_avg(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains("min/avg/max"))?;
    let values = line.split('=').nth(1)?.trim();
    values.split('/').nth(1)?.trim().parse().ok()
}

/// iperf3 `-J`: the receiver's mean rate.
pub fn parse_iperf3_bps(json: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["end"]["sum_received"]["bits_per_second"].as_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summary() {
        let text = "3 packets transmitted, 3 received, 0% packet loss, time 401ms\nrtt min/avg/max/mdev = 0.041/0.057/0.079/0.016 ms\n";
        assert_eq!(parse_ping_avg(text), Some(0.057));
        assert_eq!(parse_ping_avg("100% packet loss"), None);
    }

    #[test]
    fn iperf3_json() {
        let j = r#"{"end":{"sum_received":{"bits_per_second":1.5e10}}}"#;
        assert_eq!(parse_iperf3_bps(j), Some(1.5e10));
        assert_eq!(parse_iperf3_bps("{}"), None);
    }

    #[test]
    fn demo_topology_is_valid() {
        let t = Topology::parse(TOPOLOGY).expect("the shipped demo topology parses");
        assert_eq!(t.name, LAB_NAME);
    }
}
