//! `nsm-bench`: the throughput harness. Parses the command line, picks the
//! mesh build, runs [`nsm_benches::harness`] and writes the table, the JSON
//! and the chart. Everything it measures is explained by `--help`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::Parser;
use nsm_benches::harness::{self, IMPLEMENTATIONS, Progress, Settings};

const ABOUT: &str = "Throughput, packet rate, latency and CPU cost of nsm-rs's data plane, \
side by side with plain veth and the userspace WireGuard implementations users would pick instead.";

const LONG_ABOUT: &str = "\
Builds a two-node lab of network namespaces (nsm-testbed): node-1 and node-2 on an underlay \
bridge (198.51.100.0/24), a client pod `web` on node-1 and an endpoint pod `echo` on node-2. \
Then, for every implementation, it sends the same traffic from web to echo:

  veth                     the pods' primary network, no tunnel (the ceiling)
  nsm-rs                   a real connection requested from node-1's nsm-manager, carried
                           by the nsm-forwarders over WireGuard
  wireguard-go-debian      wireguard-go 0.0.20220316 (Debian 12)
  wireguard-go-backports   wireguard-go 2023 (bookworm-backports: vectorized, TUN/UDP offloads)
  boringtun                boringtun-cli (crates.io)
  gotatun                  gotatun (gotatun-cli, crates.io)

The four peers run inside the two pods with a tunnel 203.0.113.1 -> 203.0.113.2 (MTU 1420), \
configured with `wg` (wireguard-tools, installed with apt when missing); missing ones are installed into /var/cache/nsm-rs/peers (apt-get download \
+ dpkg-deb -x, or cargo install) by scripts/ensure-bench-peers, and one that cannot be had is \
reported as unavailable. Peers run with their default settings (what a user gets out of the box).

Every run measures each implementation once, starting the round one implementation later each \
time, so machine noise spreads over all of them. Per run: TCP with 1 and 4 streams (iperf3), UDP \
packet rate at 64- and 1400-byte IP packets (nsm-bench-udp, one sender thread as fast as it can: \
delivered packets/s and loss; iperf3 -u -b 0 if the tool is missing), ping \
round trips 10 ms apart idle and while one TCP stream runs (p50, p99), and CPU seconds per GB of \
the data plane's processes during the 1-stream test (n/a for veth: that is kernel softirq time). \
For nsm-rs also: connection setup latency one at a time and N at once, the close latency of those \
N closed at once with pings 5 ms apart crossing the main connection meanwhile, and the time to heal \
after SIGKILL of node-1's forwarder.

Output: a table of medians and of nsm-rs's ratios to every other implementation on stdout, a \
progress line on stderr, --json with every run's raw figures, medians and ratios of each \
implementation to each other one, and --svg with one bar panel per metric.

The mesh binaries are taken from $NSM_BIN_DIR, else target/release when built and not older \
than target/debug (cargo build --release -p nsm-testbed -p nsm-forwarder -p nsm-manager), else \
target/debug, else beside nsm-bench; the output says which, with a warning for a debug build. \
Needs root. Ctrl-C (SIGINT), SIGTERM or SIGHUP stop the \
run after the step under way and remove the lab; nothing is reported then. Exit codes: 0 done, \
1 failure, 2 bad arguments, 130 stopped by a signal.

Examples:
  nsm-bench --quick                                  # 1-minute smoke run
  nsm-bench --runs 3 --duration 5 --json b.json --svg b.svg
  nsm-bench --only veth,nsm-rs,wireguard-go-backports";

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "nsm-bench", about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    /// Rounds over all implementations; medians are taken over these.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    runs: u16,
    /// Seconds of each throughput test (TCP, UDP) [default: 10, quick: 2].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=600))]
    duration: Option<u64>,
    /// Only these implementations, comma-separated, in this order.
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    only: Vec<String>,
    /// Leave out these implementations, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    skip: Vec<String>,
    /// A smoke run of about a minute: 1 run, 2 s tests, no TCP 4 streams or
    /// UDP 1400, 100 pings, 3 setups, no parallel setup or healing.
    #[arg(long)]
    quick: bool,
    /// Write every run's figures, medians and ratios as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write a bar chart (SVG) here.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Pings per latency sample (10 ms apart) [default: 300, quick: 100].
    #[arg(long, value_name = "N")]
    pings: Option<usize>,
    /// nsm-rs: connection requests timed one at a time [default: 20, quick: 3].
    #[arg(long, value_name = "N")]
    setup_samples: Option<usize>,
    /// nsm-rs: connection requests made at once, then closed at once [default: 200, quick: 0].
    #[arg(long, value_name = "N")]
    parallel: Option<usize>,
    /// nsm-rs: forwarder kills to time healing [default: 3, quick: 0].
    #[arg(long, value_name = "N")]
    heal: Option<usize>,
    /// No control-plane figures (setup latency, healing).
    #[arg(long)]
    no_control_plane: bool,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
    /// Run nsm-rs's forwarders on a DPDK underlay (a net_af_packet port on
    /// each node's underlay veth, `nsm-forwarder --dpdk-eal`); needs
    /// nsm-forwarder built with `--features dpdk`.
    #[arg(long)]
    forwarder_dpdk: bool,
    /// Run nsm-rs's forwarders with N lanes per connection (`nsm-forwarder
    /// --lanes N`: a multi-queue pod interface and a WireGuard session per
    /// lane, each on its own packet thread); the default is the
    /// forwarder's, one. Gains show with several streams (TCP 4 streams)
    /// and spare cores.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    forwarder_lanes: u16,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut impls: Vec<String> = if cli.only.is_empty() {
        IMPLEMENTATIONS.iter().map(ToString::to_string).collect()
    } else {
        cli.only.clone()
    };
    for n in cli.only.iter().chain(&cli.skip) {
        if !IMPLEMENTATIONS.contains(&n.as_str()) {
            eprintln!(
                "nsm-bench: unknown implementation {n:?} (known: {})",
                IMPLEMENTATIONS.join(", ")
            );
            return ExitCode::from(2);
        }
    }
    impls.retain(|n| !cli.skip.contains(n));
    impls.dedup();
    if impls.is_empty() {
        eprintln!("nsm-bench: nothing to measure after --only/--skip");
        return ExitCode::from(2);
    }
    if cli.forwarder_dpdk && cli.forwarder_lanes > 1 {
        eprintln!(
            "nsm-bench: --forwarder-lanes needs packet threads, and a DPDK port runs one: leave one of them out"
        );
        return ExitCode::from(2);
    }
    let mesh_build = choose_mesh_build();
    let q = cli.quick;
    let cp = !cli.no_control_plane;
    let settings = Settings {
        runs: if q { 1 } else { usize::from(cli.runs) },
        duration: cli.duration.unwrap_or(if q { 2 } else { 10 }),
        implementations: impls,
        reduced_metrics: q,
        pings: cli.pings.unwrap_or(if q { 100 } else { 300 }).max(1),
        setup_samples: if cp {
            cli.setup_samples.unwrap_or(if q { 3 } else { 20 })
        } else {
            0
        },
        parallel: if cp {
            cli.parallel.unwrap_or(if q { 0 } else { 200 })
        } else {
            0
        },
        heal_attempts: if cp {
            cli.heal.unwrap_or(if q { 0 } else { 3 })
        } else {
            0
        },
        progress: !cli.quiet,
        command_line: std::env::args().collect::<Vec<_>>().join(" "),
        mesh_build,
        forwarder_dpdk: cli.forwarder_dpdk,
        forwarder_lanes: cli.forwarder_lanes,
    };
    let progress = Progress::new(settings.progress);
    if let Err(e) = stop_on_signal() {
        eprintln!("nsm-bench: installing signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    progress.show(&format!("mesh: {}", settings.mesh_build));
    let report = match harness::run(&settings, &progress) {
        Ok(r) => r,
        Err(e) => {
            progress.finish();
            eprintln!("nsm-bench: {e}");
            return if matches!(e, harness::BenchError::Interrupted) {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            };
        }
    };
    progress.finish();
    println!("nsm-bench: {}", settings.command_line);
    println!("mesh build: {}", settings.mesh_build);
    println!("{}", report.table());
    let mut ok = true;
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report.to_json()).expect("JSON values serialize");
        ok &= write(path, &text);
    }
    if let Some(path) = &cli.svg {
        let title = format!(
            "nsm-bench: {} run(s) x {} s, {}",
            settings.runs,
            settings.duration,
            report.settings.get("host").map_or("", String::as_str)
        );
        ok &= write(path, &nsm_benches::svg::render(&report, &title));
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn write(path: &Path, text: &str) -> bool {
    match std::fs::write(path, text) {
        Ok(()) => {
            eprintln!("wrote {}", path.display());
            true
        }
        Err(e) => {
            eprintln!("nsm-bench: writing {}: {e}", path.display());
            false
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP stop the run cleanly instead of killing it
/// with its lab left behind: they ask the harness to stop
/// ([`harness::interrupt`]), which removes the lab and makes the process
/// exit with 130.
fn stop_on_signal() -> std::io::Result<()> {
    nsm_testbed::sys::on_termination_signal(|| {
        eprintln!("\nnsm-bench: signal: stopping after the current step and removing the lab");
        harness::interrupt();
    })
}

/// When `dir` is a `debug` build directory, says loudly that the forwarder
/// measured is unoptimized: its figures are several times lower than a
/// release build's, and easy to mistake for them (e.g. after `./dev test`
/// rebuilt target/debug).
fn warn_if_debug_build(dir: &Path) {
    if dir.file_name().is_none_or(|n| n != "debug") {
        return;
    }
    eprintln!(
        "nsm-bench: warning: measuring the DEBUG build in {} (unoptimized: several times slower \
         than release). For figures worth comparing: cargo build --release -p nsm-testbed \
         -p nsm-forwarder -p nsm-manager, or set NSM_BIN_DIR",
        dir.display()
    );
}

/// Picks the mesh binaries (release first, unless older than the debug
/// ones) and points the testbed at them with `NSM_BIN_DIR`; returns a
/// description for the output, and warns on stderr when that is a debug
/// build.
fn choose_mesh_build() -> String {
    const PROGRAMS: [&str; 3] = ["nsm-forwarder", "nsm-manager", "nsm-endpoint"];
    if let Some(dir) = std::env::var_os("NSM_BIN_DIR") {
        let dir = Path::new(&dir);
        warn_if_debug_build(dir);
        return format!("$NSM_BIN_DIR={}", dir.display());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    // Release first, unless its binaries are older than the debug ones (a
    // stale release build would not understand today's flags).
    let oldest = |dir: &Path| {
        PROGRAMS
            .iter()
            .map(|p| dir.join(p).metadata().and_then(|m| m.modified()).ok())
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().min())
    };
    let mut profiles = ["release", "debug"];
    if let (Some(r), Some(d)) = (
        oldest(&target.join("release")),
        oldest(&target.join("debug")),
    ) && r < d
    {
        profiles.reverse();
    }
    let built = |dir: &Path| {
        Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ", "-r"])
            .arg(dir.join("nsm-forwarder"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    for profile in profiles {
        let dir = target.join(profile);
        if PROGRAMS.iter().all(|p| dir.join(p).is_file()) {
            let dir = dir.canonicalize().unwrap_or(dir);
            // SAFETY: called from main before any other thread exists, so
            // nothing reads the environment concurrently.
            unsafe { std::env::set_var("NSM_BIN_DIR", &dir) };
            warn_if_debug_build(&dir);
            return format!(
                "{profile} build in {} (nsm-forwarder built {})",
                dir.display(),
                built(&dir)
            );
        }
    }
    // The testbed's own search finds them beside this binary: say which.
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        && PROGRAMS.iter().all(|p| dir.join(p).is_file())
    {
        warn_if_debug_build(&dir);
        return format!(
            "build beside nsm-bench in {} (nsm-forwarder built {})",
            dir.display(),
            built(&dir)
        );
    }
    "no build in target/ or beside nsm-bench: the testbed searches $PATH".to_string()
}
