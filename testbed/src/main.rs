//! `nsm-testbed`: build, inspect and remove labs of network namespaces.
//!
//! A thin shell over the `nsm_testbed` library: it parses the command line,
//! prints, and maps errors to exit codes. It must never hold logic a test
//! could not reach through the library.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgGroup, Parser, Subcommand};
use nsm_testbed::lab::{self, Lab, LabError, Options};
use nsm_testbed::{Topology, demo};

/// Exit code for a bad topology file or bad arguments.
const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "nsm-testbed",
    version,
    about = "Network namespaces as nodes and pods: the one-host nsm-rs mesh and its test harness",
    long_about = "Network namespaces as nodes and pods: the one-host nsm-rs mesh and its test harness.\n\n\
        A topology file (YAML) names the nodes, pods, network services and endpoints of a lab. \
        `up` builds it: one namespace per node joined by an underlay bridge (198.51.100.0/24 by \
        default), one namespace per pod on a bridge of its node (198.18.N.0/24), and on every node \
        the mesh processes (nsm-forwarder, nsm-manager) when they are built. Everything lives in \
        namespaces named nsmtb_LAB[_MEMBER]; nothing touches the host's own network.",
    after_help = "Examples:\n  \
        nsm-testbed up testbed/topologies/demo.yaml\n  \
        nsm-testbed status --json\n  \
        nsm-testbed exec web -- ping -c1 198.18.1.2\n  \
        nsm-testbed policies --lab demo guard.yaml\n  \
        nsm-testbed graph --lab demo --svg demo.svg --dot demo.dot\n  \
        nsm-testbed down demo\n  \
        nsm-testbed demo\n\n\
        Exit codes: 0 success; 1 failure (see the message); 2 bad topology file or arguments; \
        `exec` exits with the command's own code."
)]
struct Cli {
    /// Root of the labs' state directories (sockets, logs, topology copies).
    #[arg(long, global = true, env = "NSM_TESTBED_DIR", default_value = lab::DEFAULT_STATE_ROOT)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build the lab of a topology file and start its processes; returns when it is ready.
    Up {
        /// The topology file (YAML).
        file: PathBuf,
        /// Build the namespaces and networks only; start no mesh program.
        #[arg(long)]
        no_mesh: bool,
        /// Run every forwarder on a DPDK underlay: a net_af_packet port on
        /// the node's eth0, with an address of its own from the top of the
        /// underlay network (node 1: .254, node 2: .253, ...). Needs
        /// nsm-forwarder built with `--features dpdk`.
        #[arg(long, conflicts_with = "no_mesh")]
        forwarder_dpdk: bool,
    },
    /// Show a lab's nodes, pods, endpoints, processes and connections.
    Status {
        /// The lab (default: the only lab up).
        #[arg(long)]
        lab: Option<String>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a node or pod of a lab.
    Exec {
        /// The lab (default: the only lab up).
        #[arg(long)]
        lab: Option<String>,
        /// Node or pod name.
        target: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Remove a lab (a topology file or a lab name; default: every lab up),
    /// killing its processes. Also cleans up after a crash.
    Down {
        /// A topology file or a lab name.
        lab: Option<String>,
    },
    /// Put a policy file (`policies: [...]`, YAML or JSON) in force in a running
    /// lab: it is checked first (a bad policy is named and nothing changes), then
    /// every manager applies it within about a second, re-chaining running
    /// connections in place.
    Policies {
        /// The lab (default: the only lab up).
        #[arg(long)]
        lab: Option<String>,
        /// The policy file.
        file: PathBuf,
    },
    /// Draw a running lab: every node's manager and forwarder read by the
    /// `nsmctl` binary (`nsmctl graph`, built beside nsm-testbed, in
    /// $NSM_BIN_DIR or on $PATH) into one picture of its nodes, pods,
    /// endpoints and connections.
    #[command(group(ArgGroup::new("out").required(true).multiple(true).args(["svg", "dot"])))]
    Graph {
        /// The lab (default: the only lab up).
        #[arg(long)]
        lab: Option<String>,
        /// Write an SVG picture here (`-` for standard output).
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
        /// Write a Graphviz DOT graph here (`-` for standard output).
        #[arg(long, value_name = "FILE")]
        dot: Option<PathBuf>,
    },
    /// Start a mesh program of a running lab again, with the flags `up` gave
    /// it, stopping it first (SIGTERM) if it runs: `nsm-forwarder` or
    /// `nsm-manager` on a node, `nsm-endpoint` or `nsm-passthrough` on an
    /// endpoint pod. Returns once it listens. For trying healing by hand:
    /// `kill -9` one (its PID is in `status`), watch the connections, then
    /// restart it.
    Restart {
        /// The lab (default: the only lab up).
        #[arg(long)]
        lab: Option<String>,
        /// Node or endpoint pod name.
        member: String,
        /// nsm-forwarder, nsm-manager, nsm-endpoint or nsm-passthrough.
        program: String,
    },
    /// Check a topology file without building anything.
    Validate {
        /// The topology file (YAML).
        file: PathBuf,
    },
    /// Run the main job: a two-node lab, a client pod and an endpoint pod, a
    /// ping and a short TCP throughput figure, then a clean teardown.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = Options {
        state_root: cli.state_dir.clone(),
        progress: true,
        mesh: true,
        manager_args: Vec::new(),
    };
    match run(cli.command, &opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nsm-testbed: {e}");
            ExitCode::from(match e {
                CliError::Lab(LabError::Interrupted(_))
                | CliError::Demo(demo::DemoError::Lab(LabError::Interrupted(_))) => 130,
                CliError::Lab(LabError::Topology(_) | LabError::Policies { .. })
                | CliError::Demo(demo::DemoError::Lab(LabError::Topology(_))) => EXIT_USAGE,
                _ => 1,
            })
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error(transparent)]
    Demo(#[from] demo::DemoError),
    #[error("{0}")]
    Graph(String),
}

impl From<nsm_testbed::TopologyError> for CliError {
    fn from(e: nsm_testbed::TopologyError) -> Self {
        CliError::Lab(e.into())
    }
}

fn run(cmd: Cmd, opts: &Options) -> Result<ExitCode, CliError> {
    match cmd {
        Cmd::Validate { file } => {
            let t = Topology::from_file(&file)?;
            println!(
                "{}: ok (lab {}, {} nodes, {} pods, {} endpoints)",
                file.display(),
                t.name,
                t.nodes.len(),
                t.pods.len(),
                t.endpoints.len()
            );
        }
        Cmd::Up {
            file,
            no_mesh,
            forwarder_dpdk,
        } => {
            let topology = Topology::from_file(&file)?;
            let opts = Options {
                mesh: !no_mesh,
                ..opts.clone()
            };
            remove_on_signal(&topology.name)?;
            let lab = if forwarder_dpdk {
                Lab::up_dpdk(topology, &opts, &[])?
            } else {
                Lab::up(topology, &opts)?
            };
            print_status(&lab.status());
            lab.detach();
        }
        Cmd::Status { lab, json } => {
            let lab = Lab::find(lab.as_deref(), opts)?;
            let status = lab.status();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("status serializes")
                );
            } else {
                print_status(&status);
            }
        }
        Cmd::Exec {
            lab,
            target,
            command,
        } => {
            let lab = Lab::find(lab.as_deref(), opts)?;
            let status =
                lab.command(&target, &command)?
                    .status()
                    .map_err(|source| LabError::Io {
                        lab: lab.name().to_string(),
                        path: PathBuf::from(&command[0]),
                        source,
                    })?;
            // The command's own exit code is what the caller wants to see.
            let code = status.code().unwrap_or(1);
            return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
        }
        Cmd::Policies { lab, file } => {
            let lab = Lab::find(lab.as_deref(), opts)?;
            let text = std::fs::read_to_string(&file).map_err(|source| LabError::Io {
                lab: lab.name().to_string(),
                path: file.clone(),
                source,
            })?;
            lab.set_policies_yaml(&text)?;
            println!(
                "lab {}: policies from {} in force (managers apply them within a second)",
                lab.name(),
                file.display()
            );
            lab.detach();
        }
        Cmd::Restart {
            lab,
            member,
            program,
        } => {
            let mut lab = Lab::find(lab.as_deref(), opts)?;
            let running = |lab: &Lab| {
                lab.status()
                    .processes
                    .into_iter()
                    .find(|p| p.member == member && p.program == program && p.running)
            };
            // One instance per socket: a running one goes first.
            if running(&lab).is_some() {
                lab.stop(&member, &program)?;
            }
            lab.restart(&member, &program)?;
            let pid = running(&lab).map_or(0, |p| p.pid);
            println!(
                "lab {}: {program} on {member} restarted (pid {pid})",
                lab.name()
            );
            lab.detach();
        }
        Cmd::Down { lab: target } => {
            let names = match target {
                Some(t) => vec![lab_name_of(&t)?],
                None => lab::list_labs(opts),
            };
            if names.is_empty() {
                println!("no lab is up");
            }
            for name in names {
                let removed = lab::teardown(&name, opts)?;
                println!(
                    "lab {name}: removed {} namespaces, stopped {} processes",
                    removed.namespaces.len(),
                    removed.processes
                );
            }
        }
        Cmd::Graph { lab, svg, dot } => {
            let lab = Lab::find(lab.as_deref(), opts)?;
            graph(&lab, svg.as_deref(), dot.as_deref())?;
        }
        Cmd::Demo => {
            remove_on_signal(demo::LAB_NAME)?;
            let mut out = std::io::stdout();
            let r = demo::run(opts, &mut out)?;
            let _ = writeln!(
                out,
                "demo ok: web -> echo over the {}: rtt {:.3} ms, tcp {:.2} Gbit/s",
                r.path,
                r.rtt_ms,
                r.tcp_bps / 1e9
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// While a lab is being built (or the demo runs), SIGINT, SIGTERM and SIGHUP
/// stop it cleanly instead of leaving half of it behind: a watcher thread
/// ([`nsm_testbed::sys::on_termination_signal`]) asks the build to stop
/// ([`lab::interrupt`]); the build fails at its next step and removes what
/// it made, as on any failure, and the process exits with 130.
fn remove_on_signal(lab: &str) -> Result<(), CliError> {
    let name = lab.to_string();
    nsm_testbed::sys::on_termination_signal(move || {
        eprintln!("nsm-testbed: signal: stopping and removing lab {name}");
        lab::interrupt();
    })
    .map_err(|source| {
        LabError::Io {
            lab: lab.to_string(),
            path: PathBuf::from("sigaction"),
            source,
        }
        .into()
    })
}

/// `graph`: runs `nsmctl graph` with the first node's manager as
/// `--manager`, every other node's as `--also-manager`, and every node's
/// forwarder as `--forwarder` (so nsm-testbed does not link nsm-manager).
fn graph(lab: &Lab, svg: Option<&Path>, dot: Option<&Path>) -> Result<(), CliError> {
    let Some(nsmctl) = nsm_testbed::sys::find_program("nsmctl") else {
        return Err(CliError::Graph(
            "graph: nsmctl not found (beside nsm-testbed, in $NSM_BIN_DIR or on $PATH); \
             build it with `cargo build -p nsm-manager --bin nsmctl`"
                .into(),
        ));
    };
    let nodes = &lab.plan().nodes;
    let Some(first) = nodes.first() else {
        return Err(CliError::Graph(format!(
            "graph: lab {} has no nodes",
            lab.name()
        )));
    };
    let mut cmd = std::process::Command::new(&nsmctl);
    cmd.arg("--manager").arg(lab.manager_socket(&first.name));
    for n in nodes {
        cmd.arg("--forwarder").arg(lab.forwarder_socket(&n.name));
    }
    // Forwarders with identities speak mTLS to managers only: read them as
    // a node manager (every manager of the lab shares the CA).
    if lab
        .forwarder_identity_dir(&first.name)
        .join("cert.pem")
        .exists()
    {
        cmd.arg("--identity-dir").arg(lab.identity_dir(&first.name));
    }
    cmd.arg("graph");
    for n in &nodes[1..] {
        cmd.arg("--also-manager").arg(lab.manager_socket(&n.name));
    }
    if let Some(p) = svg {
        cmd.arg("--svg").arg(p);
    }
    if let Some(p) = dot {
        cmd.arg("--dot").arg(p);
    }
    let status = cmd
        .status()
        .map_err(|e| CliError::Graph(format!("graph: run {}: {e}", nsmctl.display())))?;
    if !status.success() {
        return Err(CliError::Graph(format!(
            "graph: {} failed ({status}; its message is above)",
            nsmctl.display()
        )));
    }
    Ok(())
}

/// `down` takes a lab name or a topology file (whose `name` it reads).
fn lab_name_of(arg: &str) -> Result<String, CliError> {
    let path = Path::new(arg);
    if path.is_file() {
        return Ok(Topology::from_file(path)?.name);
    }
    Ok(arg.to_string())
}

fn print_status(s: &lab::Status) {
    println!("lab {}  (state {})", s.name, s.state_dir);
    print_table(
        &["NODE", "NETNS", "UNDERLAY", "MANAGER SOCKET"],
        s.nodes.iter().map(|n| {
            vec![
                n.name.clone(),
                n.netns.clone(),
                n.underlay_ip.clone(),
                n.manager_socket.clone(),
            ]
        }),
    );
    print_table(
        &["POD", "NODE", "NETNS", "IP", "ROLE"],
        s.pods.iter().map(|p| {
            let role = if p.endpoint { "endpoint" } else { "client" };
            vec![
                p.name.clone(),
                p.node.clone(),
                p.netns.clone(),
                p.ip.clone(),
                role.into(),
            ]
        }),
    );
    if !s.processes.is_empty() {
        print_table(
            &["WHERE", "PROCESS", "PID", "STATE"],
            s.processes.iter().map(|p| {
                let state = if p.running { "running" } else { "exited" };
                vec![
                    p.member.clone(),
                    p.program.clone(),
                    p.pid.to_string(),
                    state.into(),
                ]
            }),
        );
    }
    if !s.missing_binaries.is_empty() {
        println!(
            "not started (not built yet): {}",
            s.missing_binaries.join(", ")
        );
    }
    if s.connections.is_empty() {
        println!("connections: none");
    } else {
        print_table(
            &["POD", "IFACE", "SERVICE", "ENDPOINT", "SRC", "DST", "STATE"],
            s.connections.iter().map(|c| {
                vec![
                    c.pod.clone(),
                    c.interface.clone(),
                    c.service.clone(),
                    c.endpoint.clone(),
                    c.src_ip.clone(),
                    c.dst_ip.clone(),
                    c.state.to_string(),
                ]
            }),
        );
    }
}

/// Prints `header` and `rows` as columns as wide as their widest cell (at
/// least 8), one space apart, so that long names never shift a column.
/// (`nsm_manager::inspect::Table` renders nsmctl's tables the same way; the
/// testbed does not link nsm-manager outside its tests.)
fn print_table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| h.to_string()).collect())
        .chain(rows)
        .collect();
    let mut widths = vec![8usize; header.len()];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for r in &rows {
        let last = r.len().saturating_sub(1);
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i == last {
                    cell.clone()
                } else {
                    format!("{cell:<w$}", w = widths[i])
                }
            })
            .collect();
        println!("{}", line.join(" "));
    }
}
