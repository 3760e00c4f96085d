//! The benchmark itself: one two-node lab, the same traffic through every
//! data plane, implementations alternated run by run.
//!
//! The lab (built with `nsm-testbed`): node-1 and node-2 on the underlay
//! 198.51.100.0/24; a client pod `web` on node-1 and an endpoint pod `echo`
//! on node-2, each on its node's pod bridge (198.18.N.0/24, routed across
//! the underlay). All traffic goes from `web` to `echo`:
//!
//! - `veth`: to echo's primary address (pod bridge, node routing, underlay:
//!   the kernel path with no tunnel, the ceiling);
//! - `nsm-rs`: to the endpoint address of a connection `web` asked its
//!   node's manager for (service `bench-net`, KERNEL mechanism, interface
//!   `nsm-1`), carried by the two nsm-forwarders over WireGuard;
//! - each userspace WireGuard peer: to 203.0.113.2 over a tunnel whose two
//!   ends run in the pods themselves (see [`crate::peers`]).
//!
//! Every run measures every implementation once, and each run starts the
//! round at a different implementation, so slow drifts of a shared machine
//! (other builds, thermal state) spread over all of them instead of
//! favouring whoever goes first. Peers are started before and stopped after
//! their turn, so an idle peer never competes for the CPU with a measured one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use nsm_testbed::mesh::{self, RequestedConnection};
use nsm_testbed::{Lab, Options, Topology};

use crate::parse;
use crate::peers::{self, Peer};
use crate::report::{ControlPlane, ImplResult, Metric, Report};
use crate::stats::percentile;

/// The implementations nsm-bench knows, in run order.
pub const IMPLEMENTATIONS: [&str; 6] = [
    "veth",
    "nsm-rs",
    "wireguard-go-debian",
    "wireguard-go-backports",
    "boringtun",
    "gotatun",
];

/// The service the benchmark's connections ask for.
const SERVICE: &str = "bench-net";
/// The main connection's id.
const MAIN_ID: &str = "bench-main";
/// UDP tests send IP packets of these sizes (payload = size - 28 bytes of
/// IPv4 and UDP headers), so the large one fits every tunnel's MTU (1420)
/// and nothing is fragmented.
pub const UDP_SIZES: [usize; 2] = [64, 1400];

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How many rounds over all implementations.
    pub runs: usize,
    /// Seconds of each throughput test.
    pub duration: u64,
    /// Implementations to measure, in run order.
    pub implementations: Vec<String>,
    /// Leave out TCP with 4 streams and UDP at 1400 bytes.
    pub reduced_metrics: bool,
    /// Pings per latency sample (10 ms apart).
    pub pings: usize,
    /// Requests made one at a time for setup latency (0: skip).
    pub setup_samples: usize,
    /// Requests made at once (0: skip).
    pub parallel: usize,
    /// Forwarder kills to time healing (0: skip).
    pub heal_attempts: usize,
    /// Print a progress line on stderr.
    pub progress: bool,
    /// The command line, for the record.
    pub command_line: String,
    /// Which mesh build is used, for the record.
    pub mesh_build: String,
    /// nsm-rs's forwarders carry WireGuard over a DPDK port (`net_af_packet`
    /// on each node's underlay veth) instead of the kernel's UDP socket.
    pub forwarder_dpdk: bool,
    /// nsm-rs's forwarders run with `--lanes N` (and at least N packet
    /// threads); 1 is the forwarder's default.
    pub forwarder_lanes: u16,
}

/// A failure that stops the whole benchmark (anything smaller is recorded
/// in the report and the benchmark goes on).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Not root: namespaces need it.
    #[error("nsm-bench builds network namespaces and needs root")]
    NotRoot,
    /// The lab could not be built.
    #[error("building the lab: {0}")]
    Lab(#[from] nsm_testbed::LabError),
    /// Something the benchmark needs could not be started.
    #[error("{0}")]
    Setup(String),
    /// [`interrupt`] was called (a signal): the run stopped early and its
    /// lab was removed; nothing is reported.
    #[error("interrupted: the lab was removed, nothing was reported")]
    Interrupted,
}

/// Set by [`interrupt`].
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks a running [`run`] to stop: the test under way ends early (its tools
/// are not started again), no further test starts, and `run` returns
/// [`BenchError::Interrupted`] after removing its lab. A lab still being
/// built stops at its next step ([`nsm_testbed::lab::interrupt`]). Only
/// sets flags, so a signal watcher may call it.
pub fn interrupt() {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    nsm_testbed::lab::interrupt();
}

fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// What a measurement says when [`interrupt`] stopped it.
const STOPPED: &str = "interrupted";

/// The progress line: rewritten in place on a terminal, one line per step
/// otherwise (CI logs).
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    tty: bool,
    start: Instant,
}

impl Progress {
    /// A progress reporter on stderr.
    pub fn new(enabled: bool) -> Self {
        use std::io::IsTerminal;
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
        }
    }

    /// Shows what is happening now.
    pub fn show(&self, msg: &str) {
        if !self.enabled {
            return;
        }
        let t = self.start.elapsed().as_secs();
        if self.tty {
            eprint!("\r\x1b[2K[{:02}:{:02}] {msg}", t / 60, t % 60);
        } else {
            eprintln!("[{:02}:{:02}] {msg}", t / 60, t % 60);
        }
    }

    /// Clears the line before the results are printed.
    pub fn finish(&self) {
        if self.enabled && self.tty {
            eprint!("\r\x1b[2K");
        }
    }
}

fn topology(name: &str) -> String {
    format!(
        "name: {name}\n\
         nodes: [{{name: node-1}}, {{name: node-2}}]\n\
         services:\n  - {{name: {SERVICE}, payload: IP, cidr: 172.31.0.0/22}}\n\
         endpoints:\n  - {{name: echo, node: node-2, service: {SERVICE}, labels: {{app: echo}}}}\n\
         pods:\n  - {{name: web, node: node-1, labels: {{app: web}}}}\n"
    )
}

/// A data plane ready to carry the traffic of one turn.
struct DataPath {
    target: String,
    pids: Option<Vec<i32>>,
    _peers: Option<peers::PeerPair>,
}

fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
    .trim()
    .chars()
    .take(400)
    .collect()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn cpu_ticks(pids: &[i32]) -> Option<u64> {
    pids.iter()
        .map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|t| parse::proc_stat_ticks(&t))
        })
        .sum()
}

/// The benchmark's state between steps.
struct Bench<'a> {
    lab: Lab,
    s: &'a Settings,
    progress: &'a Progress,
    clk_tck: f64,
    work: PathBuf,
    /// The main connection's endpoint address (nsm-rs), once requested.
    mesh_target: Option<String>,
    main_conn: Option<nsm_proto::connection::Connection>,
    peer_bins: BTreeMap<&'static str, PathBuf>,
    /// The iperf3 server in echo; replaced when it stops answering.
    server: std::cell::RefCell<Option<Child>>,
}

/// Runs the benchmark and returns what it measured.
pub fn run(s: &Settings, progress: &Progress) -> Result<Report, BenchError> {
    if !nsm_testbed::sys::is_root() {
        return Err(BenchError::NotRoot);
    }
    let mut results: Vec<ImplResult> = s
        .implementations
        .iter()
        .map(|n| ImplResult::new(n, String::new()))
        .collect();

    let wanted: Vec<Peer> = s
        .implementations
        .iter()
        .filter_map(|n| Peer::from_name(n))
        .collect();
    let mut peer_bins = BTreeMap::new();
    if !wanted.is_empty() {
        progress.show("checking the userspace WireGuard peers (installing what is missing)");
        for (name, r) in peers::ensure(&wanted) {
            let res = results
                .iter_mut()
                .find(|i| i.name == name)
                .expect("asked for");
            match r {
                Ok(bin) => {
                    let peer = Peer::from_name(name).expect("known");
                    res.detail = peers::version(peer, &bin);
                    peer_bins.insert(name, bin);
                }
                Err(why) => res.status = format!("unavailable: {why}"),
            }
        }
        if Command::new("wg").arg("--version").output().is_err() {
            for r in results
                .iter_mut()
                .filter(|r| Peer::from_name(&r.name).is_some())
            {
                r.status = "unavailable: no `wg` (apt-get install wireguard-tools)".into();
            }
        }
    }

    let want_mesh = s.implementations.iter().any(|n| n == "nsm-rs");
    let name = nsm_testbed::testing::unique_lab_name("bench");
    progress.show(&format!("building lab {name}"));
    let topo = Topology::parse(&topology(&name)).map_err(nsm_testbed::LabError::from)?;
    let opts = Options {
        mesh: want_mesh,
        ..Options::default()
    };
    let mut env = Vec::new();
    if s.forwarder_lanes > 1 {
        let n = s.forwarder_lanes.to_string();
        env.push(("NSM_FORWARDER_LANES".to_string(), n.clone()));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        if usize::from(s.forwarder_lanes) > cpus {
            env.push(("NSM_FORWARDER_WORKERS".to_string(), n));
        }
    }
    let lab = if s.forwarder_dpdk {
        Lab::up_dpdk(topo, &opts, &env)?
    } else {
        Lab::up_with_env(topo, &opts, &env)?
    };
    let work = lab.dir().join("bench");
    std::fs::create_dir_all(&work)
        .map_err(|e| BenchError::Setup(format!("{}: {e}", work.display())))?;
    let mut b = Bench {
        lab,
        s,
        progress,
        clk_tck: clock_ticks(),
        work,
        mesh_target: None,
        main_conn: None,
        peer_bins,
        server: std::cell::RefCell::new(None),
    };

    // The server side of every test: one iperf3 server in the endpoint pod,
    // listening on all its addresses (primary, mesh and tunnel).
    b.restart_server()?;

    if let Some(r) = results.iter_mut().find(|r| r.name == "nsm-rs") {
        if !b.lab.missing_binaries().is_empty() {
            r.status = format!(
                "unavailable: not built ({}); cargo build --release -p nsm-forwarder -p nsm-manager",
                b.lab.missing_binaries().join(", ")
            );
        } else {
            r.detail = s.mesh_build.clone();
            if s.forwarder_lanes > 1 {
                r.notes.push(format!(
                    "forwarders with {} lanes per connection (nsm-forwarder --lanes)",
                    s.forwarder_lanes
                ));
            }
            if s.forwarder_dpdk {
                r.notes.push(
                    "forwarders on a DPDK underlay: net_af_packet on each node's eth0 (nsm-forwarder --dpdk-eal)".into(),
                );
            }
            match b.connect_main() {
                Ok(ms) => r.notes.push(format!(
                    "connection web/nsm-1 -> {} set up in {ms:.1} ms; CPU is both nodes' nsm-forwarder (utime+stime)",
                    b.mesh_target.as_deref().unwrap_or("?")
                )),
                Err(e) => r.status = format!("unavailable: connection request failed: {e}"),
            }
        }
    }
    for r in &mut results {
        if r.name == "veth" {
            r.detail = "kernel: pod bridge, node routing, underlay veth".into();
            r.notes.push(
                "CPU n/a: the kernel does this work in softirq context, not attributable to a process".into(),
            );
        } else if Peer::from_name(&r.name).is_some() && r.available() {
            r.notes.push(
                "tunnel in the pods (203.0.113.1 -> .2, MTU 1420); CPU is both peer processes (utime+stime)".into(),
            );
        }
    }

    let order: Vec<usize> = (0..results.len())
        .filter(|i| results[*i].available())
        .collect();
    for run in 0..s.runs {
        for k in 0..order.len() {
            if interrupted() {
                // Dropping the bench removes the lab and what runs in it.
                return Err(BenchError::Interrupted);
            }
            // Each round starts one implementation later than the last.
            let idx = order[(k + run) % order.len()];
            let label = format!("run {}/{} {}", run + 1, s.runs, results[idx].name);
            let (figures, errors) = b.turn(&results[idx].name, &label);
            results[idx].runs.push(figures);
            results[idx]
                .errors
                .extend(errors.into_iter().map(|e| format!("run {}: {e}", run + 1)));
        }
    }

    if interrupted() {
        return Err(BenchError::Interrupted);
    }
    let control_plane = (want_mesh && b.main_conn.is_some()).then(|| b.control_plane());
    if interrupted() {
        return Err(BenchError::Interrupted);
    }

    if let Some(mut server) = b.server.borrow_mut().take() {
        let _ = server.kill();
        let _ = server.wait();
    }
    if let Some(conn) = &b.main_conn {
        let _ = mesh::close(
            &b.lab.manager_socket("node-1"),
            conn,
            Duration::from_secs(10),
        );
    }
    let addresses = format!(
        "web {}, echo {}, nsm-rs connection {} -> {}, peer tunnel {} -> {}",
        b.lab
            .plan()
            .ip_of("web")
            .map(|a| a.to_string())
            .unwrap_or_default(),
        b.lab
            .plan()
            .ip_of("echo")
            .map(|a| a.to_string())
            .unwrap_or_default(),
        b.main_conn.as_ref().and_then(src_ip).unwrap_or_default(),
        b.mesh_target.clone().unwrap_or_default(),
        peers::TUNNEL_IPS[0],
        peers::TUNNEL_IPS[1],
    );
    progress.show("removing the lab");
    let _ = b.lab.down();

    let mut settings = BTreeMap::new();
    settings.insert("command".into(), s.command_line.clone());
    settings.insert("runs".into(), s.runs.to_string());
    settings.insert("duration_s".into(), s.duration.to_string());
    settings.insert("pings_per_sample".into(), s.pings.to_string());
    settings.insert("mesh_build".into(), s.mesh_build.clone());
    settings.insert("forwarder_dpdk".into(), s.forwarder_dpdk.to_string());
    settings.insert("forwarder_lanes".into(), s.forwarder_lanes.to_string());
    settings.insert(
        "topology".into(),
        "2 nodes (198.51.100.0/24 underlay), client pod web on node-1, endpoint pod echo on node-2; traffic web -> echo".into(),
    );
    settings.insert(
        "udp_sizes".into(),
        format!(
            "IP packet sizes 64 and 1400 bytes, one sender thread as fast as it can; {}",
            udp_tool_description()
        ),
    );
    settings.insert("host".into(), host_description());
    settings.insert("addresses".into(), addresses);
    Ok(Report {
        settings,
        implementations: results,
        control_plane,
    })
}

fn host_description() -> String {
    let uname = Command::new("uname")
        .arg("-srm")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{uname}, {cpus} CPUs, {date}")
}

impl Bench<'_> {
    /// (Re)starts the iperf3 server. A client killed mid-test can leave
    /// iperf3's one-test-at-a-time server busy for good; a fresh one fixes it.
    fn restart_server(&self) -> Result<(), BenchError> {
        if let Some(mut old) = self.server.borrow_mut().take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let child = self.spawn_quiet("echo", &["iperf3", "-s"])?;
        *self.server.borrow_mut() = Some(child);
        // Give it time to listen before the first client connects.
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    fn spawn_quiet(&self, member: &str, argv: &[&str]) -> Result<Child, BenchError> {
        self.lab
            .command(member, argv)
            .map_err(|e| BenchError::Setup(e.to_string()))?
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| BenchError::Setup(format!("starting {}: {e}", argv.join(" "))))
    }

    fn exec(&self, member: &str, argv: &[&str]) -> Result<std::process::Output, String> {
        self.lab.exec(member, argv).map_err(|e| e.to_string())
    }

    fn netns_path(&self, member: &str) -> PathBuf {
        let ns = self.lab.netns(member).unwrap_or_default();
        Path::new("/run/netns").join(ns)
    }

    fn request(&self, id: &str, ifname: &str) -> Result<nsm_proto::connection::Connection, String> {
        let req = RequestedConnection {
            id: id.to_string(),
            pod: "web".into(),
            node: "node-1".into(),
            interface: ifname.to_string(),
            service: SERVICE.into(),
            labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
        };
        mesh::request(
            &self.lab.manager_socket("node-1"),
            &self.netns_path("web"),
            &req,
            true,
            Duration::from_secs(60),
        )
    }

    /// Asks for the connection the nsm-rs turns use and waits until a ping
    /// crosses it. Returns the request's latency in milliseconds.
    fn connect_main(&mut self) -> Result<f64, String> {
        self.progress
            .show("requesting the nsm-rs connection web -> echo");
        let t = Instant::now();
        let conn = self.request(MAIN_ID, "nsm-1")?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let target = dst_ip(&conn).ok_or("the reply has no destination address")?;
        self.main_conn = Some(conn);
        self.wait_ping(&target, Duration::from_secs(10))?;
        self.mesh_target = Some(target);
        Ok(ms)
    }

    fn wait_ping(&self, target: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let o = self.exec("web", &["ping", "-c", "1", "-W", "1", target])?;
            if o.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no ping to {target} in {timeout:?}: {}",
                    output_text(&o)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Prepares one implementation's path for a turn.
    fn path(&self, name: &str) -> Result<DataPath, String> {
        match name {
            "veth" => Ok(DataPath {
                target: self
                    .lab
                    .plan()
                    .ip_of("echo")
                    .ok_or("no address for echo")?
                    .to_string(),
                pids: None,
                _peers: None,
            }),
            "nsm-rs" => {
                let pids: Vec<i32> = self
                    .lab
                    .status()
                    .processes
                    .iter()
                    .filter(|p| p.program == "nsm-forwarder" && p.running)
                    .map(|p| p.pid)
                    .collect();
                Ok(DataPath {
                    target: self.mesh_target.clone().ok_or("no connection")?,
                    pids: Some(pids),
                    _peers: None,
                })
            }
            other => {
                let peer = Peer::from_name(other).ok_or("unknown implementation")?;
                let bin = self.peer_bins.get(peer.name()).ok_or("not installed")?;
                let ip = |m: &str| {
                    self.lab
                        .plan()
                        .ip_of(m)
                        .map(|a| a.to_string())
                        .ok_or(format!("no address for {m}"))
                };
                let tag = (std::process::id() % 100_000).to_string();
                let pair = peers::start_pair(
                    &self.lab,
                    peer,
                    bin,
                    ["web", "echo"],
                    [ip("web")?, ip("echo")?],
                    &tag,
                    &self.work,
                )?;
                Ok(DataPath {
                    target: peers::TUNNEL_IPS[1].to_string(),
                    pids: Some(pair.pids()),
                    _peers: Some(pair),
                })
            }
        }
    }

    /// One implementation's turn in a run: every metric once.
    fn turn(&self, name: &str, label: &str) -> (BTreeMap<String, f64>, Vec<String>) {
        let mut fig = BTreeMap::new();
        let mut errors = Vec::new();
        self.progress.show(&format!("{label}: starting"));
        let path = match self.path(name) {
            Ok(p) => p,
            Err(e) => {
                errors.push(format!("setup: {e}"));
                return (fig, errors);
            }
        };
        let d = self.s.duration.to_string();
        let t = path.target.as_str();
        let mut put = |m: Metric, v: f64| {
            fig.insert(m.key().to_string(), v);
        };

        // TCP, 1 stream, with the CPU the data plane's processes used.
        self.progress
            .show(&format!("{label}: TCP 1 stream ({d} s)"));
        let before = path.pids.as_deref().and_then(cpu_ticks);
        match self
            .iperf3(&["-t", &d], t)
            .and_then(|j| parse::iperf3_tcp(&j).ok_or(bad_json(&j)))
        {
            Ok(r) => {
                put(Metric::Tcp1, r.bits_per_second / 1e9);
                let after = path.pids.as_deref().and_then(cpu_ticks);
                if let (Some(a), Some(b)) = (before, after)
                    && r.bytes > 0.0
                {
                    put(
                        Metric::CpuPerGb,
                        b.saturating_sub(a) as f64 / self.clk_tck / (r.bytes / 1e9),
                    );
                }
            }
            Err(e) => errors.push(format!("tcp 1 stream: {e}")),
        }
        if !self.s.reduced_metrics {
            self.progress
                .show(&format!("{label}: TCP 4 streams ({d} s)"));
            match self
                .iperf3(&["-t", &d, "-P", "4"], t)
                .and_then(|j| parse::iperf3_tcp(&j).ok_or(bad_json(&j)))
            {
                Ok(r) => put(Metric::Tcp4, r.bits_per_second / 1e9),
                Err(e) => errors.push(format!("tcp 4 streams: {e}")),
            }
        }
        for size in UDP_SIZES {
            if self.s.reduced_metrics && size != 64 {
                continue;
            }
            self.progress
                .show(&format!("{label}: UDP {size} B ({d} s)"));
            let (pps, loss) = if size == 64 {
                (Metric::Udp64Pps, Metric::Udp64Loss)
            } else {
                (Metric::Udp1400Pps, Metric::Udp1400Loss)
            };
            match self.udp(t, size) {
                Ok(r) => {
                    put(pps, r.delivered_pps);
                    put(loss, r.loss_percent);
                }
                Err(e) => errors.push(format!("udp {size}: {e}")),
            }
        }

        self.progress
            .show(&format!("{label}: latency, idle ({} pings)", self.s.pings));
        match self.ping(t) {
            Ok((p50, p99)) => {
                put(Metric::LatIdleP50, p50);
                put(Metric::LatIdleP99, p99);
            }
            Err(e) => errors.push(format!("latency idle: {e}")),
        }
        self.progress
            .show(&format!("{label}: latency under a TCP stream"));
        match self.ping_loaded(t) {
            Ok((p50, p99)) => {
                put(Metric::LatLoadP50, p50);
                put(Metric::LatLoadP99, p99);
            }
            Err(e) => errors.push(format!("latency loaded: {e}")),
        }
        (fig, errors)
    }

    /// One iperf3 client test from web; its JSON. Retried once with a fresh
    /// server, because a server still closing (or stuck in) the last test
    /// refuses the next.
    fn iperf3(&self, args: &[&str], target: &str) -> Result<String, String> {
        if interrupted() {
            return Err(STOPPED.into());
        }
        let limit = (self.s.duration + 20).to_string();
        let mut argv = vec![
            "timeout",
            "-k",
            "3",
            &limit,
            "iperf3",
            "-c",
            target,
            "-J",
            "--connect-timeout",
            "3000",
        ];
        argv.extend_from_slice(args);
        let mut last = String::new();
        for _ in 0..2 {
            let o = self.exec("web", &argv)?;
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            if o.status.success() {
                return Ok(text);
            }
            last = parse_error(&text).unwrap_or_else(|| output_text(&o));
            if interrupted() || self.restart_server().is_err() {
                break;
            }
        }
        Err(last)
    }

    /// UDP packet rate with IP packets of `size` bytes: nsm-bench-udp when
    /// it is beside this binary, iperf3 otherwise.
    fn udp(&self, target: &str, size: usize) -> Result<parse::UdpResult, String> {
        if interrupted() {
            return Err(STOPPED.into());
        }
        let d = self.s.duration.to_string();
        let Some(tool) = udp_tool() else {
            let len = (size - crate::udp::HEADERS).to_string();
            return self
                .iperf3(&["-t", &d, "-u", "-b", "0", "-l", &len], target)
                .and_then(|j| parse::iperf3_udp(&j).ok_or(bad_json(&j)));
        };
        let tool = tool.display().to_string();
        let max = (self.s.duration + 15).to_string();
        let recv = self
            .lab
            .command("echo", &[tool.as_str(), "recv", "5300", &max])
            .map_err(|e| e.to_string())?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the receiver: {e}"))?;
        // The receiver must be bound before the first datagram.
        std::thread::sleep(Duration::from_millis(300));
        let to = format!("{target}:5300");
        let limit = (self.s.duration + 10).to_string();
        let size_arg = size.to_string();
        let sent = self.exec(
            "web",
            &[
                "timeout", "-k", "2", &limit, &tool, "send", &to, &size_arg, &d,
            ],
        );
        let got = recv.wait_with_output().map_err(|e| e.to_string())?;
        let sent = sent?;
        let s = crate::udp::Counts::parse(&String::from_utf8_lossy(&sent.stdout))
            .ok_or_else(|| format!("sender: {}", output_text(&sent)))?;
        let r = crate::udp::Counts::parse(&String::from_utf8_lossy(&got.stdout))
            .ok_or_else(|| format!("receiver: {}", output_text(&got)))?;
        if r.packets == 0 || s.seconds <= 0.0 {
            return Err(format!("nothing arrived ({} sent)", s.packets));
        }
        Ok(parse::UdpResult {
            delivered_pps: r.packets as f64 / s.seconds,
            loss_percent: (100.0 * (1.0 - r.packets as f64 / s.packets.max(1) as f64)).max(0.0),
            bytes: r.bytes as f64,
        })
    }

    /// `pings` pings 10 ms apart; p50 and p99 of their round trips (us).
    fn ping(&self, target: &str) -> Result<(f64, f64), String> {
        if interrupted() {
            return Err(STOPPED.into());
        }
        let count = self.s.pings.to_string();
        let o = self.exec(
            "web",
            &["ping", "-i", "0.01", "-c", &count, "-W", "1", target],
        )?;
        let rtts = parse::ping_rtts_us(&String::from_utf8_lossy(&o.stdout));
        if rtts.is_empty() {
            return Err(format!("no replies: {}", output_text(&o)));
        }
        Ok((
            percentile(&rtts, 50.0).unwrap_or(f64::NAN),
            percentile(&rtts, 99.0).unwrap_or(f64::NAN),
        ))
    }

    /// The same pings while one TCP stream fills the path.
    fn ping_loaded(&self, target: &str) -> Result<(f64, f64), String> {
        if interrupted() {
            return Err(STOPPED.into());
        }
        // Long enough to cover the pings (10 ms apart) with margin.
        let secs = (self.s.pings / 100 + 3).to_string();
        let mut load = self
            .spawn_quiet("web", &["iperf3", "-c", target, "-t", &secs])
            .map_err(|e| e.to_string())?;
        // Let the stream ramp up so the pings see a full queue.
        std::thread::sleep(Duration::from_millis(700));
        let r = self.ping(target);
        let status = load.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("the loading TCP stream failed ({status})"));
        }
        r
    }

    /// Setup latency and healing of the mesh's control plane.
    fn control_plane(&mut self) -> ControlPlane {
        let mut cp = ControlPlane::default();
        let sock = self.lab.manager_socket("node-1");
        for k in 0..self.s.setup_samples {
            self.progress.show(&format!(
                "nsm-rs control plane: setup {}/{}",
                k + 1,
                self.s.setup_samples
            ));
            let t = Instant::now();
            match self.request(&format!("bench-s{k}"), &format!("nsm-s{k}")) {
                Ok(c) => {
                    cp.setup_1_ms.push(t.elapsed().as_secs_f64() * 1e3);
                    if let Err(e) = mesh::close(&sock, &c, Duration::from_secs(30)) {
                        cp.errors.push(format!("close bench-s{k}: {e}"));
                    }
                }
                Err(e) => cp.errors.push(format!("setup bench-s{k}: {e}")),
            }
        }
        if self.s.parallel > 0 {
            self.progress.show(&format!(
                "nsm-rs control plane: {} requests at once",
                self.s.parallel
            ));
            self.parallel(&mut cp);
        }
        for k in 0..self.s.heal_attempts {
            self.progress.show(&format!(
                "nsm-rs control plane: SIGKILL node-1's forwarder, heal {}/{}",
                k + 1,
                self.s.heal_attempts
            ));
            match self.heal() {
                Ok(s) => cp.heal_s.push(s),
                Err(e) => {
                    cp.errors.push(format!("heal {}: {e}", k + 1));
                    break;
                }
            }
        }
        cp
    }

    fn parallel(&self, cp: &mut ControlPlane) {
        let n = self.s.parallel;
        cp.parallel = n;
        let sock = self.lab.manager_socket("node-1");
        let netns = self.netns_path("web");
        let barrier = Arc::new(Barrier::new(n));
        let handles: Vec<_> = (0..n)
            .map(|k| {
                let (sock, netns, barrier) = (sock.clone(), netns.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let req = RequestedConnection {
                        id: format!("bench-p{k}"),
                        pod: "web".into(),
                        node: "node-1".into(),
                        interface: format!("nsm-p{k}"),
                        service: SERVICE.into(),
                        labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
                    };
                    barrier.wait();
                    let t = Instant::now();
                    let r = mesh::request(&sock, &netns, &req, true, Duration::from_secs(120));
                    (t.elapsed().as_secs_f64() * 1e3, r)
                })
            })
            .collect();
        let mut conns = Vec::new();
        for h in handles {
            match h.join() {
                Ok((ms, Ok(c))) => {
                    cp.setup_parallel_ms.push(ms);
                    conns.push(c);
                }
                Ok((_, Err(e))) => {
                    cp.parallel_failures += 1;
                    if cp.errors.len() < 5 {
                        cp.errors.push(format!("parallel request: {e}"));
                    }
                }
                Err(_) => cp.parallel_failures += 1,
            }
        }
        self.progress.show(&format!(
            "nsm-rs control plane: closing {} connections at once",
            conns.len()
        ));
        // Pings cross the main connection meanwhile: the removals must not
        // stall the packet threads that carry it.
        let ping = self.mesh_target.as_deref().and_then(|target| {
            let o = self
                .lab
                .command("web", &["ping", "-i", "0.005", "-W", "1", target]);
            o.ok()?
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .ok()
        });
        // Let the first pings go before the closes start.
        std::thread::sleep(Duration::from_millis(200));
        let barrier = Arc::new(Barrier::new(conns.len().max(1)));
        let closers: Vec<_> = conns
            .into_iter()
            .map(|c| {
                let (sock, barrier) = (sock.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let t = Instant::now();
                    let r = mesh::close(&sock, &c, Duration::from_secs(60));
                    (t.elapsed().as_secs_f64() * 1e3, r)
                })
            })
            .collect();
        for h in closers {
            match h.join() {
                Ok((ms, Ok(()))) => cp.close_parallel_ms.push(ms),
                Ok((_, Err(e))) => {
                    if cp.errors.len() < 5 {
                        cp.errors.push(format!("parallel close: {e}"));
                    }
                }
                Err(_) => cp.errors.push("a closing thread panicked".into()),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        if let Some(child) = ping {
            // SIGINT makes ping print what it has; then read it all.
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            match child.wait_with_output() {
                Ok(o) => {
                    cp.churn_ping_us = parse::ping_rtts_us(&String::from_utf8_lossy(&o.stdout))
                }
                Err(e) => cp.errors.push(format!("ping during the closes: {e}")),
            }
        }
    }

    /// SIGKILL of node-1's forwarder, restart, time until a ping crosses
    /// the main connection again (seconds from the kill).
    fn heal(&mut self) -> Result<f64, String> {
        let mut target = self.mesh_target.clone().ok_or("no connection")?;
        let sock = self.lab.manager_socket("node-1");
        let t = Instant::now();
        self.lab
            .kill("node-1", "nsm-forwarder")
            .map_err(|e| e.to_string())?;
        self.lab
            .restart("node-1", "nsm-forwarder")
            .map_err(|e| e.to_string())?;
        let deadline = t + Duration::from_secs(60);
        let mut last_lookup = Instant::now();
        loop {
            let o = self.exec("web", &["ping", "-c", "1", "-W", "0.2", &target])?;
            if o.status.success() {
                let s = t.elapsed().as_secs_f64();
                self.mesh_target = Some(target);
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err("no ping across the connection 60 s after the kill".into());
            }
            // Healing may re-request with new addresses: follow the manager.
            if last_lookup.elapsed() > Duration::from_millis(250) {
                last_lookup = Instant::now();
                if let Ok(conns) = mesh::connections(&sock, Duration::from_secs(2))
                    && let Some(ip) = conns
                        .iter()
                        .find(|c| {
                            c.id == MAIN_ID
                                || c.path
                                    .as_ref()
                                    .and_then(|p| p.path_segments.first())
                                    .is_some_and(|s| s.id == MAIN_ID)
                        })
                        .and_then(dst_ip)
                {
                    target = ip;
                }
            }
        }
    }
}

/// `nsm-bench-udp` beside the running binary (cargo builds both).
fn udp_tool() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Integration tests run from target/debug/deps/...; the tool is one up.
    [dir.join("nsm-bench-udp"), dir.join("../nsm-bench-udp")]
        .into_iter()
        .find(|p| p.is_file())
}

/// Which UDP tool the packet-rate figures come from, for the record.
pub fn udp_tool_description() -> String {
    match udp_tool() {
        Some(p) => format!(
            "nsm-bench-udp ({}): sendmmsg/recvmmsg of 64 datagrams",
            p.display()
        ),
        None => "iperf3 -u -b 0 (nsm-bench-udp not found beside nsm-bench)".to_string(),
    }
}

fn src_ip(c: &nsm_proto::connection::Connection) -> Option<String> {
    let a = c
        .context
        .as_ref()?
        .ip_context
        .as_ref()?
        .src_ip_addrs
        .first()?;
    Some(a.split('/').next().unwrap_or(a).to_string())
}

fn dst_ip(c: &nsm_proto::connection::Connection) -> Option<String> {
    let a = c
        .context
        .as_ref()?
        .ip_context
        .as_ref()?
        .dst_ip_addrs
        .first()?;
    Some(a.split('/').next().unwrap_or(a).to_string())
}

fn bad_json(text: &str) -> String {
    parse_error(text).unwrap_or_else(|| {
        format!(
            "unreadable iperf3 JSON: {}",
            text.chars().take(200).collect::<String>()
        )
    })
}

/// iperf3's own error message from its JSON, if any.
fn parse_error(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v["error"].as_str().map(|e| format!("iperf3: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_is_valid() {
        Topology::parse(&topology("bench-1-0")).expect("the bench topology parses");
    }

    #[test]
    fn every_peer_is_an_implementation() {
        for p in Peer::ALL {
            assert!(IMPLEMENTATIONS.contains(&p.name()));
        }
    }
}
