//! What a benchmark run produced, and how it is shown: the terminal table
//! and the `--json` document.
//!
//! Every run's raw figures are kept (not only medians) so a reader can see
//! the spread; medians and ratios are derived here, in one place, from those
//! raw figures, so the table, the JSON and the chart can never disagree.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::{median, ratio};

/// One figure measured per run per implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// TCP, one stream.
    Tcp1,
    /// TCP, four streams.
    Tcp4,
    /// UDP, 64-byte payloads: delivered packets per second.
    Udp64Pps,
    /// UDP, 64-byte payloads: loss.
    Udp64Loss,
    /// UDP, 1400-byte payloads: delivered packets per second.
    Udp1400Pps,
    /// UDP, 1400-byte payloads: loss.
    Udp1400Loss,
    /// Round trip with no other traffic, median.
    LatIdleP50,
    /// Round trip with no other traffic, 99th percentile.
    LatIdleP99,
    /// Round trip while one TCP stream runs, median.
    LatLoadP50,
    /// Round trip while one TCP stream runs, 99th percentile.
    LatLoadP99,
    /// CPU time of the data plane's processes per gigabyte moved.
    CpuPerGb,
}

impl Metric {
    /// Every metric, in table order.
    pub const ALL: [Metric; 11] = [
        Metric::Tcp1,
        Metric::Tcp4,
        Metric::Udp64Pps,
        Metric::Udp64Loss,
        Metric::Udp1400Pps,
        Metric::Udp1400Loss,
        Metric::LatIdleP50,
        Metric::LatIdleP99,
        Metric::LatLoadP50,
        Metric::LatLoadP99,
        Metric::CpuPerGb,
    ];

    /// The key in the JSON document.
    pub fn key(self) -> &'static str {
        match self {
            Metric::Tcp1 => "tcp_1_stream_gbps",
            Metric::Tcp4 => "tcp_4_streams_gbps",
            Metric::Udp64Pps => "udp_64_pps",
            Metric::Udp64Loss => "udp_64_loss_percent",
            Metric::Udp1400Pps => "udp_1400_pps",
            Metric::Udp1400Loss => "udp_1400_loss_percent",
            Metric::LatIdleP50 => "latency_idle_p50_us",
            Metric::LatIdleP99 => "latency_idle_p99_us",
            Metric::LatLoadP50 => "latency_load_p50_us",
            Metric::LatLoadP99 => "latency_load_p99_us",
            Metric::CpuPerGb => "cpu_seconds_per_gb",
        }
    }

    /// What is measured, without the unit.
    pub fn title(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP 1 stream",
            Metric::Tcp4 => "TCP 4 streams",
            Metric::Udp64Pps => "UDP 64 B delivered",
            Metric::Udp64Loss => "UDP 64 B loss",
            Metric::Udp1400Pps => "UDP 1400 B delivered",
            Metric::Udp1400Loss => "UDP 1400 B loss",
            Metric::LatIdleP50 => "latency idle p50",
            Metric::LatIdleP99 => "latency idle p99",
            Metric::LatLoadP50 => "latency loaded p50",
            Metric::LatLoadP99 => "latency loaded p99",
            Metric::CpuPerGb => "CPU per GB moved (TCP 1)",
        }
    }

    /// The unit values are shown in (table and chart).
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Tcp1 | Metric::Tcp4 => "Gbit/s",
            Metric::Udp64Pps | Metric::Udp1400Pps => "kpps",
            Metric::Udp64Loss | Metric::Udp1400Loss => "%",
            Metric::LatIdleP50 | Metric::LatIdleP99 | Metric::LatLoadP50 | Metric::LatLoadP99 => {
                "us"
            }
            Metric::CpuPerGb => "s/GB",
        }
    }

    /// The row label: title and unit.
    pub fn label(self) -> String {
        format!("{} ({})", self.title(), self.unit())
    }

    /// Whether a larger value is the better one (for reading ratios).
    pub fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::Tcp1 | Metric::Tcp4 | Metric::Udp64Pps | Metric::Udp1400Pps
        )
    }

    /// The stored value as shown in the table (pps are shown in kpps).
    pub fn display(self, v: f64) -> String {
        match self {
            Metric::Udp64Pps | Metric::Udp1400Pps => format!("{:.0}", v / 1e3),
            Metric::Tcp1 | Metric::Tcp4 => format!("{v:.2}"),
            Metric::Udp64Loss | Metric::Udp1400Loss => format!("{v:.1}"),
            Metric::CpuPerGb => format!("{v:.2}"),
            _ => format!("{v:.0}"),
        }
    }
}

/// One implementation's results.
#[derive(Debug, Clone, Serialize)]
pub struct ImplResult {
    /// Name (`veth`, `nsm-rs`, `wireguard-go-debian`, ...).
    pub name: String,
    /// `ok`, or `unavailable: REASON`.
    pub status: String,
    /// What exactly ran (binary, version, build).
    pub detail: String,
    /// Per run: metric key -> value. A metric missing from a run was not
    /// measured or could not be read (see `errors`).
    pub runs: Vec<BTreeMap<String, f64>>,
    /// Failures of single measurements, with the run they belong to.
    pub errors: Vec<String>,
    /// Caveats that apply to every run (e.g. CPU not attributable).
    pub notes: Vec<String>,
}

impl ImplResult {
    /// A fresh result for an implementation that will be measured.
    pub fn new(name: &str, detail: String) -> Self {
        ImplResult {
            name: name.to_string(),
            status: "ok".to_string(),
            detail,
            runs: Vec::new(),
            errors: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Whether it was measured at all.
    pub fn available(&self) -> bool {
        self.status == "ok"
    }

    /// The median over runs of one metric.
    pub fn median(&self, m: Metric) -> Option<f64> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|r| r.get(m.key()).copied())
            .collect();
        median(&v)
    }
}

/// Figures of the mesh's control plane.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControlPlane {
    /// Setup latency of requests made one at a time, milliseconds each.
    pub setup_1_ms: Vec<f64>,
    /// Setup latency of each of N requests made at once, milliseconds.
    pub setup_parallel_ms: Vec<f64>,
    /// How many requests were made at once.
    pub parallel: usize,
    /// Requests of the parallel batch that failed.
    pub parallel_failures: usize,
    /// Close latency of each connection of the parallel batch, all closed
    /// at once, milliseconds.
    pub close_parallel_ms: Vec<f64>,
    /// Round trips of pings 5 ms apart over the main connection while the
    /// parallel batch closes, microseconds: what a removal costs the
    /// connections that stay.
    pub churn_ping_us: Vec<f64>,
    /// Time from SIGKILL of a forwarder to the first ping that crosses
    /// again, seconds, per attempt.
    pub heal_s: Vec<f64>,
    /// What went wrong, if anything.
    pub errors: Vec<String>,
}

/// A whole benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// How it was run (command line, durations, builds, topology).
    pub settings: BTreeMap<String, String>,
    /// Every implementation, in the order they were run.
    pub implementations: Vec<ImplResult>,
    /// The mesh's control plane, when nsm-rs ran.
    pub control_plane: Option<ControlPlane>,
}

impl Report {
    /// The implementations that were measured.
    pub fn available(&self) -> impl Iterator<Item = &ImplResult> {
        self.implementations.iter().filter(|i| i.available())
    }

    /// The metrics that at least one implementation has.
    pub fn metrics_present(&self) -> Vec<Metric> {
        Metric::ALL
            .into_iter()
            .filter(|m| self.available().any(|i| i.median(*m).is_some()))
            .collect()
    }

    /// The `--json` document: settings, every run's raw figures, medians,
    /// ratios of every implementation to veth and to each other one, and
    /// the control plane's samples with their percentiles.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{Map, Value, json};
        let metrics = self.metrics_present();
        let mut impls = Vec::new();
        for i in &self.implementations {
            let mut medians = Map::new();
            for m in &metrics {
                if let Some(v) = i.median(*m) {
                    medians.insert(m.key().to_string(), json!(v));
                }
            }
            let mut ratios = Map::new();
            for other in self.available().filter(|o| o.name != i.name) {
                let mut r = Map::new();
                for m in &metrics {
                    if let Some(v) = ratio(i.median(*m), other.median(*m)) {
                        r.insert(m.key().to_string(), json!(v));
                    }
                }
                ratios.insert(format!("to_{}", other.name), Value::Object(r));
            }
            impls.push(json!({
                "name": i.name,
                "status": i.status,
                "detail": i.detail,
                "notes": i.notes,
                "errors": i.errors,
                "runs": i.runs,
                "medians": medians,
                "ratios": ratios,
            }));
        }
        let cp = self.control_plane.as_ref().map(|c| {
            let pct = |v: &[f64], p| crate::stats::percentile(v, p);
            json!({
                "setup_1": {"samples_ms": c.setup_1_ms, "p50_ms": pct(&c.setup_1_ms, 50.0), "p99_ms": pct(&c.setup_1_ms, 99.0)},
                "setup_parallel": {"parallel": c.parallel, "failures": c.parallel_failures, "samples_ms": c.setup_parallel_ms,
                    "p50_ms": pct(&c.setup_parallel_ms, 50.0), "p99_ms": pct(&c.setup_parallel_ms, 99.0)},
                "close_parallel": {"samples_ms": c.close_parallel_ms,
                    "p50_ms": pct(&c.close_parallel_ms, 50.0), "p99_ms": pct(&c.close_parallel_ms, 99.0)},
                "ping_during_close_parallel": {"samples_us": c.churn_ping_us,
                    "p50_us": pct(&c.churn_ping_us, 50.0), "p99_us": pct(&c.churn_ping_us, 99.0),
                    "max_us": c.churn_ping_us.iter().copied().reduce(f64::max)},
                "heal_after_forwarder_sigkill": {"samples_s": c.heal_s, "median_s": median(&c.heal_s)},
                "errors": c.errors,
            })
        });
        json!({
            "settings": self.settings,
            "metrics": metrics.iter().map(|m| json!({"key": m.key(), "label": m.label(), "higher_is_better": m.higher_is_better()})).collect::<Vec<_>>(),
            "implementations": impls,
            "control_plane": cp,
        })
    }

    /// The terminal table: medians per metric and implementation, then the
    /// ratios of nsm-rs to every other implementation, then the control
    /// plane, then what was unavailable.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let impls: Vec<&ImplResult> = self.available().collect();
        let metrics = self.metrics_present();
        let w0 = 34;
        let width = |name: &str| name.len().max(9) + 2;
        let runs = impls.iter().map(|i| i.runs.len()).max().unwrap_or(0);
        let _ = writeln!(out, "medians of {runs} run(s)");
        let _ = write!(out, "{:<w0$}", "metric");
        for i in &impls {
            let _ = write!(out, "{:>w$}", i.name, w = width(&i.name));
        }
        out.push('\n');
        for m in &metrics {
            let _ = write!(out, "{:<w0$}", m.label());
            for i in &impls {
                let cell = i
                    .median(*m)
                    .map_or_else(|| "n/a".to_string(), |v| m.display(v));
                let _ = write!(out, "{:>w$}", cell, w = width(&i.name));
            }
            out.push('\n');
        }
        if let Some(ours) = impls.iter().find(|i| i.name == "nsm-rs") {
            let others: Vec<&&ImplResult> = impls.iter().filter(|i| i.name != "nsm-rs").collect();
            if !others.is_empty() {
                let _ = writeln!(out, "\nnsm-rs / other (x; >1 = nsm-rs higher)");
                let _ = write!(out, "{:<w0$}", "metric");
                for o in &others {
                    let _ = write!(out, "{:>w$}", o.name, w = width(&o.name));
                }
                out.push('\n');
                for m in &metrics {
                    let _ = write!(out, "{:<w0$}", m.label());
                    for o in &others {
                        let cell = ratio(ours.median(*m), o.median(*m))
                            .map_or_else(|| "n/a".to_string(), |r| format!("{r:.2}"));
                        let _ = write!(out, "{:>w$}", cell, w = width(&o.name));
                    }
                    out.push('\n');
                }
            }
        }
        if let Some(c) = &self.control_plane {
            let pct = |v: &[f64], p| {
                crate::stats::percentile(v, p)
                    .map_or_else(|| "n/a".to_string(), |x| format!("{x:.1}"))
            };
            let _ = writeln!(out, "\nnsm-rs control plane");
            // "p50 X ms, p99 Y ms" of samples `v` in `unit`.
            let spread = |v: &[f64], unit: &str| {
                format!("p50 {} {unit}, p99 {} {unit}", pct(v, 50.0), pct(v, 99.0))
            };
            if !c.setup_1_ms.is_empty() {
                let _ = writeln!(
                    out,
                    "  setup, 1 at a time ({} requests): {}",
                    c.setup_1_ms.len(),
                    spread(&c.setup_1_ms, "ms")
                );
            }
            if c.parallel > 0 {
                let _ = writeln!(
                    out,
                    "  setup, {} at once: {} ({} failed)",
                    c.parallel,
                    spread(&c.setup_parallel_ms, "ms"),
                    c.parallel_failures
                );
            }
            if !c.close_parallel_ms.is_empty() {
                let _ = writeln!(
                    out,
                    "  close, {} at once: {}",
                    c.close_parallel_ms.len(),
                    spread(&c.close_parallel_ms, "ms")
                );
            }
            if !c.churn_ping_us.is_empty() {
                let max = c.churn_ping_us.iter().copied().fold(f64::NAN, f64::max);
                let _ = writeln!(
                    out,
                    "  ping over the main connection meanwhile ({} pings): {}, max {max:.0} us",
                    c.churn_ping_us.len(),
                    spread(&c.churn_ping_us, "us")
                );
            }
            if !c.heal_s.is_empty() {
                let list: Vec<String> = c.heal_s.iter().map(|s| format!("{s:.2}")).collect();
                let _ = writeln!(
                    out,
                    "  heal after SIGKILL of the client's forwarder: median {:.2} s ({} s)",
                    median(&c.heal_s).unwrap_or(f64::NAN),
                    list.join(", ")
                );
            }
            for e in &c.errors {
                let _ = writeln!(out, "  error: {e}");
            }
        }
        let mut notes = String::new();
        for i in &self.implementations {
            if !i.available() {
                let _ = writeln!(notes, "  {}: {}", i.name, i.status);
                continue;
            }
            let _ = writeln!(notes, "  {}: {}", i.name, i.detail);
            for n in &i.notes {
                let _ = writeln!(notes, "    note: {n}");
            }
            for e in &i.errors {
                let _ = writeln!(notes, "    error: {e}");
            }
        }
        let _ = write!(out, "\nimplementations\n{notes}");
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A report with two implementations and two runs each.
    pub(crate) fn sample() -> Report {
        let mut veth = ImplResult::new("veth", "kernel".into());
        let mut ours = ImplResult::new("nsm-rs", "release".into());
        for (a, b) in [(16.0, 4.0), (18.0, 6.0)] {
            veth.runs.push(BTreeMap::from([
                (Metric::Tcp1.key().to_string(), a),
                (Metric::LatIdleP99.key().to_string(), 50.0),
            ]));
            ours.runs.push(BTreeMap::from([
                (Metric::Tcp1.key().to_string(), b),
                (Metric::LatIdleP99.key().to_string(), 100.0),
                (Metric::CpuPerGb.key().to_string(), 1.5),
            ]));
        }
        let mut gone = ImplResult::new("gotatun", String::new());
        gone.status = "unavailable: cargo install failed".into();
        Report {
            settings: BTreeMap::from([("runs".to_string(), "2".to_string())]),
            implementations: vec![veth, ours, gone],
            control_plane: Some(ControlPlane {
                setup_1_ms: vec![10.0, 20.0, 30.0],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn json_has_runs_medians_and_ratios() {
        let j = sample().to_json();
        let ours = &j["implementations"][1];
        assert_eq!(ours["name"], "nsm-rs");
        assert_eq!(ours["runs"].as_array().map(Vec::len), Some(2));
        assert_eq!(ours["medians"]["tcp_1_stream_gbps"], 5.0);
        assert_eq!(ours["ratios"]["to_veth"]["tcp_1_stream_gbps"], 5.0 / 17.0);
        assert_eq!(ours["ratios"]["to_veth"]["latency_idle_p99_us"], 2.0);
        // No ratio to something that was not measured.
        assert!(ours["ratios"].get("to_gotatun").is_none());
        assert_eq!(j["control_plane"]["setup_1"]["p50_ms"], 20.0);
        assert_eq!(
            j["implementations"][2]["status"],
            "unavailable: cargo install failed"
        );
    }

    #[test]
    fn table_shows_medians_ratios_and_unavailable() {
        let t = sample().table();
        assert!(t.contains("TCP 1 stream (Gbit/s)"), "{t}");
        assert!(t.contains("17.00") && t.contains("5.00"), "{t}");
        assert!(t.contains("0.29"), "ratio 5/17 in {t}");
        assert!(t.contains("gotatun: unavailable"), "{t}");
        assert!(t.contains("p50 20.0 ms"), "{t}");
        // veth has no CPU figure: shown as n/a, not 0.
        assert!(
            t.lines()
                .any(|l| l.starts_with("CPU per GB") && l.contains("n/a")),
            "{t}"
        );
    }
}
