//! A running lab: namespaces, links, addresses and processes.
//!
//! Naming is the contract that makes teardown reliable: every namespace of
//! lab `L` is called `nsmtb_L` (the underlay) or `nsmtb_L_MEMBER`. Lab names
//! never contain `_`, so the prefix `nsmtb_L_` belongs to exactly one lab,
//! and [`teardown`] can find everything a lab made from its name alone, even
//! after the process that built it crashed and its state directory is gone.
//! Links are only ever created inside the lab's namespaces (never in the
//! root namespace), so deleting the namespaces deletes every link.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::mesh::{self, RequestedConnection};
use crate::sys::{self, CmdError, ip, ip_in, sysctl_in};
use crate::topology::{Plan, Topology, TopologyError};

/// Set when the user interrupts `up` (see [`interrupt`]).
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks a running [`Lab::up`] to stop at its next step; the lab then fails
/// with [`LabError::Interrupted`] and removes what it made, like any failure.
/// For signal handlers: it only sets a flag.
pub fn interrupt() {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn check_interrupt(lab: &str) -> Result<(), LabError> {
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        Err(LabError::Interrupted(lab.to_string()))
    } else {
        Ok(())
    }
}

/// The prefix of every namespace the testbed makes.
pub const NETNS_PREFIX: &str = "nsmtb_";
/// The underlay bridge inside the underlay namespace.
const UNDERLAY_BRIDGE: &str = "br0";
/// The pods' bridge inside each node.
const POD_BRIDGE: &str = "pods";
/// The default root of lab state directories (sockets, logs, topology copy).
pub const DEFAULT_STATE_ROOT: &str = "/run/nsm-testbed";
/// How long `down` waits for processes to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// Something went wrong building, using or removing a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The topology is not usable.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// Not root.
    #[error(
        "nsm-testbed needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to make namespaces; run it as root"
    )]
    NotRoot,
    /// A lab of that name exists already.
    #[error(
        "lab `{0}` is already up (or left over from a crash): run `nsm-testbed down {0}` first"
    )]
    Exists(String),
    /// No lab of that name.
    #[error("no lab named `{0}` is up")]
    NotFound(String),
    /// Several labs are up and none was named.
    #[error("several labs are up ({0}): name one with --lab")]
    Ambiguous(String),
    /// Policies that do not check out (nothing was changed).
    #[error("lab `{lab}`: {detail}")]
    Policies {
        /// Lab name.
        lab: String,
        /// Which policy and what is wrong.
        detail: String,
    },
    /// No such node or pod in the lab.
    #[error("lab `{lab}` has no node or pod named `{name}`")]
    NoMember {
        /// Lab name.
        lab: String,
        /// What was asked for.
        name: String,
    },
    /// A program the lab needs was not found (`$NSM_BIN_DIR`, beside
    /// nsm-testbed, `$PATH`).
    #[error(
        "lab `{lab}`: {program} is not built: build it (`cargo build --release --workspace --bins`) or point NSM_BIN_DIR at it"
    )]
    NotBuilt {
        /// Lab name.
        lab: String,
        /// The program.
        program: String,
    },
    /// `restart` of a program that does not run there.
    #[error(
        "lab `{lab}`: {program} does not run on {member} (nsm-forwarder and nsm-manager run on nodes, nsm-endpoint or nsm-passthrough on endpoint pods)"
    )]
    NotRestartable {
        /// Lab name.
        lab: String,
        /// The node or pod asked for.
        member: String,
        /// The program asked for.
        program: String,
    },
    /// A step of building or removing the lab failed.
    #[error("lab `{lab}`: {step}: {source}")]
    Step {
        /// Lab name.
        lab: String,
        /// The step, e.g. `node node-1: underlay link`.
        step: String,
        /// The failing command.
        #[source]
        source: CmdError,
    },
    /// A file of the lab's state directory.
    #[error("lab `{lab}`: {path}: {source}")]
    Io {
        /// Lab name.
        lab: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `up` failed; the lab was removed but its logs were kept.
    #[error("{source} (logs kept in {})", logs.display())]
    Failed {
        /// What failed.
        source: Box<LabError>,
        /// Where the logs are.
        logs: PathBuf,
    },
    /// `up` was interrupted by the user; what it made was removed.
    #[error("lab `{0}`: interrupted; everything made so far was removed")]
    Interrupted(String),
    /// A pod's connection request failed.
    #[error("lab `{lab}`: pod {pod}: request for {service} failed: {detail}")]
    Request {
        /// Lab name.
        lab: String,
        /// The client pod.
        pod: String,
        /// The service asked for.
        service: String,
        /// The manager's answer.
        detail: String,
    },
    /// A mesh process or `run` command died right after start.
    #[error("lab `{lab}`: {what} exited right after start ({status}); see {log}")]
    Died {
        /// Lab name.
        lab: String,
        /// Which process.
        what: String,
        /// Its exit status.
        status: String,
        /// Its log file.
        log: String,
    },
}

/// Where labs keep their state and how `up` reports progress.
#[derive(Debug, Clone)]
pub struct Options {
    /// Root of the per-lab state directories (default `/run/nsm-testbed`,
    /// or `$NSM_TESTBED_DIR`).
    pub state_root: PathBuf,
    /// Print a line per step on stderr.
    pub progress: bool,
    /// Start the mesh programs (forwarder, manager, endpoints) that are
    /// built; `false` builds the namespaces and the networks only.
    pub mesh: bool,
    /// Extra flags for every `nsm-manager` (e.g. `--max-token-lifetime 5s`).
    pub manager_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            state_root: std::env::var_os("NSM_TESTBED_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT)),
            progress: false,
            mesh: true,
            manager_args: Vec::new(),
        }
    }
}

/// The namespace of a lab's underlay (`member = None`) or of one of its members.
pub fn netns_name(lab: &str, member: Option<&str>) -> String {
    match member {
        None => format!("{NETNS_PREFIX}{lab}"),
        Some(m) => format!("{NETNS_PREFIX}{lab}_{m}"),
    }
}

/// Whether a namespace belongs to lab `lab`.
fn belongs_to(netns: &str, lab: &str) -> bool {
    let own = netns_name(lab, None);
    netns == own
        || netns
            .strip_prefix(&own)
            .is_some_and(|rest| rest.starts_with('_'))
}

/// The lab a testbed namespace belongs to.
fn lab_of(netns: &str) -> Option<&str> {
    let rest = netns.strip_prefix(NETNS_PREFIX)?;
    Some(rest.split('_').next().unwrap_or(rest))
}

/// A process the lab started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// The node or pod it runs in.
    pub member: String,
    /// What it is: `nsm-manager`, `nsm-forwarder`, `run`.
    pub program: String,
    /// Its pid.
    pub pid: i32,
    /// Its log file.
    pub log: PathBuf,
}

/// What `state.json` holds besides the topology copy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    processes: Vec<ProcessRecord>,
    missing_binaries: Vec<String>,
    #[serde(default)]
    connections: Vec<RequestedConnection>,
}

/// A lab that is up. Dropping it tears it down unless [`Lab::detach`] was
/// called, so a test that panics midway still leaves nothing behind.
#[derive(Debug)]
pub struct Lab {
    topology: Topology,
    plan: Plan,
    dir: PathBuf,
    opts: Options,
    state: State,
    children: Vec<Child>,
    detached: bool,
    /// Extra environment of every process the lab starts ([`Lab::up_with_env`]).
    env: Vec<(String, String)>,
    /// Forwarders on a DPDK underlay ([`Lab::up_dpdk`]).
    forwarder_dpdk: bool,
}

/// The mesh programs: per node (in start order), and per endpoint pod.
pub const MESH_PROGRAMS: [&str; 3] = ["nsm-forwarder", "nsm-manager", "nsm-endpoint"];
/// The program of `passthrough: true` endpoints (a chain function).
pub const PASSTHROUGH: &str = "nsm-passthrough";
/// The SPIFFE trust domain of lab identities.
pub const TRUST_DOMAIN: &str = "nsm.local";
/// The TCP port managers listen on for their peers, on the underlay address.
pub const MANAGER_PEER_PORT: u16 = 5001;
/// A file in the state directory of a lab whose forwarders run on DPDK
/// ([`Lab::up_dpdk`]), so that attaching to it knows.
const DPDK_MARKER: &str = "forwarder-dpdk";
/// How long a mesh process may take to listen on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

impl Lab {
    /// Builds the lab described by `topology` and starts its processes.
    /// On failure, everything already made is removed before returning.
    pub fn up(topology: Topology, opts: &Options) -> Result<Lab, LabError> {
        Lab::up_with_env(topology, opts, &[])
    }

    /// [`Lab::up`], with `env` added to the environment of every process
    /// the lab starts (forwarders, managers, endpoints, `run` commands),
    /// now and on [`Lab::restart`]; everything else is inherited from this
    /// process as with `up`. E.g. `OTEL_EXPORTER_OTLP_ENDPOINT` makes the
    /// whole mesh export its traces. (A method rather than an [`Options`]
    /// field, so that code building `Options` literally keeps compiling.)
    pub fn up_with_env(
        topology: Topology,
        opts: &Options,
        env: &[(String, String)],
    ) -> Result<Lab, LabError> {
        Lab::up_inner(topology, opts, env, false)
    }

    /// [`Lab::up_with_env`], with every `nsm-forwarder` on a DPDK underlay
    /// (`--dpdk-eal`): a `net_af_packet` port on the node's `eth0`, with an
    /// underlay address of its own that the node's kernel does not hold
    /// ([`Lab::forwarder_underlay_ip`]). Needs an `nsm-forwarder` built
    /// with the cargo feature `dpdk`.
    pub fn up_dpdk(
        topology: Topology,
        opts: &Options,
        env: &[(String, String)],
    ) -> Result<Lab, LabError> {
        Lab::up_inner(topology, opts, env, true)
    }

    fn up_inner(
        topology: Topology,
        opts: &Options,
        env: &[(String, String)],
        forwarder_dpdk: bool,
    ) -> Result<Lab, LabError> {
        topology.validate()?;
        if !sys::is_root() {
            return Err(LabError::NotRoot);
        }
        let name = topology.name.clone();
        let dir = opts.state_root.join(&name);
        if dir.exists() || sys::list_netns().iter().any(|n| belongs_to(n, &name)) {
            return Err(LabError::Exists(name));
        }
        // Checked before anything is made: a passthrough endpoint cannot run
        // without its program (a mesh not built at all is allowed: the lab
        // comes up without it and says so).
        if opts.mesh
            && topology.endpoints.iter().any(|e| e.passthrough)
            && sys::find_program(PASSTHROUGH).is_none()
            && MESH_PROGRAMS.iter().all(|p| sys::find_program(p).is_some())
        {
            return Err(LabError::NotBuilt {
                lab: name,
                program: PASSTHROUGH.into(),
            });
        }
        let plan = topology.plan();
        let mut lab = Lab {
            topology,
            plan,
            dir,
            opts: opts.clone(),
            state: State::default(),
            children: Vec::new(),
            detached: false,
            env: env.to_vec(),
            forwarder_dpdk,
        };
        // From here on, a failure drops `lab`, which tears down what exists;
        // the logs that explain the failure are kept first.
        if let Err(e) = lab.build() {
            return Err(match lab.keep_logs() {
                Some(kept) => LabError::Failed {
                    source: Box::new(e),
                    logs: kept,
                },
                None => e,
            });
        }
        Ok(lab)
    }

    /// Moves the lab's logs to `STATE_ROOT/failed-LAB` (replacing an older
    /// copy), so that a failed `up` can be understood after its teardown.
    fn keep_logs(&self) -> Option<PathBuf> {
        let logs = self.dir.join("logs");
        let has_logs = fs::read_dir(&logs).is_ok_and(|mut d| d.next().is_some());
        if !has_logs {
            return None;
        }
        let kept = self
            .opts
            .state_root
            .join(format!("failed-{}", self.topology.name));
        let _ = fs::remove_dir_all(&kept);
        fs::rename(&logs, &kept).ok().map(|()| kept)
    }

    /// Attaches to a lab that is up, from its state directory.
    pub fn attach(name: &str, opts: &Options) -> Result<Lab, LabError> {
        let dir = opts.state_root.join(name);
        let topo_path = dir.join("topology.yaml");
        if !topo_path.exists() {
            return Err(LabError::NotFound(name.to_string()));
        }
        let topology = Topology::from_file(&topo_path)?;
        let state_path = dir.join("state.json");
        let state = fs::read(&state_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(Lab {
            plan: topology.plan(),
            topology,
            opts: opts.clone(),
            state,
            children: Vec::new(),
            // Attaching never implies ownership: only `down` removes it.
            detached: true,
            env: Vec::new(),
            forwarder_dpdk: dir.join(DPDK_MARKER).exists(),
            dir,
        })
    }

    /// Attaches to the lab named, or to the only lab up when `name` is `None`.
    pub fn find(name: Option<&str>, opts: &Options) -> Result<Lab, LabError> {
        match name {
            Some(n) => Lab::attach(n, opts),
            None => {
                let labs = list_labs(opts);
                match labs.as_slice() {
                    [] => Err(LabError::NotFound("(any)".to_string())),
                    [one] => Lab::attach(one, opts),
                    many => Err(LabError::Ambiguous(many.join(", "))),
                }
            }
        }
    }

    /// Keeps the lab running after this value is dropped (for `nsm-testbed up`).
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// Removes the lab: kills its processes, deletes its namespaces and state.
    pub fn down(mut self) -> Result<Teardown, LabError> {
        self.detached = true;
        let report = teardown(&self.topology.name, &self.opts);
        reap(&mut self.children);
        report
    }

    /// The lab's name.
    pub fn name(&self) -> &str {
        &self.topology.name
    }

    /// The topology it was built from.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Its address plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Its state directory (sockets, logs, topology copy).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Programs that were not found at `up` and so are not running.
    pub fn missing_binaries(&self) -> &[String] {
        &self.state.missing_binaries
    }

    /// Processes started at `up`.
    pub fn processes(&self) -> &[ProcessRecord] {
        &self.state.processes
    }

    /// The namespace of a node or pod of this lab.
    pub fn netns(&self, member: &str) -> Result<String, LabError> {
        let known = self.plan.nodes.iter().any(|n| n.name == member)
            || self.plan.pods.iter().any(|p| p.name == member);
        if known {
            Ok(netns_name(self.name(), Some(member)))
        } else {
            Err(LabError::NoMember {
                lab: self.name().to_string(),
                name: member.to_string(),
            })
        }
    }

    /// The manager's unix socket on a node.
    pub fn manager_socket(&self, node: &str) -> PathBuf {
        self.dir.join(node).join("nsm.io.sock")
    }

    /// The forwarder's unix socket on a node.
    pub fn forwarder_socket(&self, node: &str) -> PathBuf {
        self.dir.join(node).join("forwarder.sock")
    }

    /// A `Command` that runs `argv` inside a node or pod.
    pub fn command<S: AsRef<std::ffi::OsStr>>(
        &self,
        member: &str,
        argv: &[S],
    ) -> Result<Command, LabError> {
        let netns = self.netns(member)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &netns]).args(argv);
        Ok(cmd)
    }

    /// Runs `argv` inside a node or pod and collects its output.
    pub fn exec<S: AsRef<std::ffi::OsStr>>(
        &self,
        member: &str,
        argv: &[S],
    ) -> Result<Output, LabError> {
        let mut cmd = self.command(member, argv)?;
        cmd.stdin(Stdio::null())
            .output()
            .map_err(|source| LabError::Io {
                lab: self.name().to_string(),
                path: PathBuf::from("ip"),
                source,
            })
    }

    fn progress(&self, msg: &str) {
        if self.opts.progress {
            eprintln!("[{}] {msg}", self.topology.name);
        }
    }

    fn step(&self, step: impl Into<String>) -> impl FnOnce(CmdError) -> LabError + '_ {
        let step = step.into();
        move |source| LabError::Step {
            lab: self.topology.name.clone(),
            step,
            source,
        }
    }

    fn io_err(&self, path: &Path) -> impl FnOnce(std::io::Error) -> LabError + '_ {
        let path = path.to_path_buf();
        move |source| LabError::Io {
            lab: self.topology.name.clone(),
            path,
            source,
        }
    }

    fn build(&mut self) -> Result<(), LabError> {
        let started = Instant::now();
        fs::create_dir_all(self.dir.join("logs")).map_err(self.io_err(&self.dir))?;
        let topo_path = self.dir.join("topology.yaml");
        let text = serde_norway::to_string(&self.topology).expect("a topology always serializes");
        fs::write(&topo_path, text).map_err(self.io_err(&topo_path))?;
        if self.forwarder_dpdk {
            let marker = self.dir.join(DPDK_MARKER);
            fs::write(&marker, b"").map_err(self.io_err(&marker))?;
        }

        self.progress("creating namespaces");
        let lab = self.topology.name.clone();
        let underlay = netns_name(&lab, None);
        ip(["netns", "add", &underlay]).map_err(self.step("underlay namespace"))?;
        let members: Vec<String> = self
            .plan
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .chain(self.plan.pods.iter().map(|p| p.name.clone()))
            .collect();
        for m in &members {
            check_interrupt(&self.topology.name)?;
            let ns = netns_name(&lab, Some(m));
            ip(["netns", "add", &ns]).map_err(self.step(format!("{m}: namespace")))?;
            ip_in(&ns, &["link", "set", "lo", "up"])
                .map_err(self.step(format!("{m}: loopback")))?;
        }

        self.progress("building the underlay");
        let mtu = self.topology.underlay.mtu.to_string();
        ip_in(&underlay, &["link", "set", "lo", "up"]).map_err(self.step("underlay: loopback"))?;
        ip_in(
            &underlay,
            &[
                "link",
                "add",
                UNDERLAY_BRIDGE,
                "mtu",
                &mtu,
                "type",
                "bridge",
            ],
        )
        .map_err(self.step("underlay: bridge"))?;
        ip_in(&underlay, &["link", "set", UNDERLAY_BRIDGE, "up"])
            .map_err(self.step("underlay: bridge up"))?;
        let v4_len = self.topology.underlay.cidr.prefix_len();
        let v6_len = self.topology.underlay.cidr6.prefix_len();
        for (i, node) in self.plan.nodes.clone().iter().enumerate() {
            check_interrupt(&self.topology.name)?;
            let ns = netns_name(&lab, Some(&node.name));
            let port = format!("n{i}");
            let s = |what: &str| format!("node {}: {what}", node.name);
            self.plug(
                &underlay,
                UNDERLAY_BRIDGE,
                &port,
                &ns,
                &mtu,
                &s("underlay link"),
            )?;
            ip_in(
                &ns,
                &[
                    "addr",
                    "add",
                    &format!("{}/{v4_len}", node.underlay_ip),
                    "dev",
                    "eth0",
                ],
            )
            .map_err(self.step(s("underlay IPv4")))?;
            ip_in(
                &ns,
                &[
                    "addr",
                    "add",
                    &format!("{}/{v6_len}", node.underlay_ip6),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )
            .map_err(self.step(s("underlay IPv6")))?;
            ip_in(&ns, &["link", "set", "eth0", "up"]).map_err(self.step(s("underlay up")))?;
            sysctl_in(&ns, "net.ipv4.ip_forward", "1").map_err(self.step(s("forwarding")))?;
            sysctl_in(&ns, "net.ipv6.conf.all.forwarding", "1")
                .map_err(self.step(s("forwarding")))?;
            // The pods' primary network, as a bridge CNI would make it.
            ip_in(&ns, &["link", "add", POD_BRIDGE, "type", "bridge"])
                .map_err(self.step(s("pod bridge")))?;
            ip_in(
                &ns,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", node.pod_gateway),
                    "dev",
                    POD_BRIDGE,
                ],
            )
            .map_err(self.step(s("pod gateway")))?;
            ip_in(&ns, &["link", "set", POD_BRIDGE, "up"])
                .map_err(self.step(s("pod bridge up")))?;
        }
        // Every node routes every other node's pods over the underlay.
        for node in &self.plan.nodes {
            check_interrupt(&self.topology.name)?;
            let ns = netns_name(&lab, Some(&node.name));
            for other in self.plan.nodes.iter().filter(|o| o.name != node.name) {
                ip_in(
                    &ns,
                    &[
                        "route",
                        "add",
                        &other.pod_net.to_string(),
                        "via",
                        &other.underlay_ip.to_string(),
                    ],
                )
                .map_err(self.step(format!("node {}: route to {}", node.name, other.name)))?;
            }
        }

        self.progress("attaching pods");
        for (j, pod) in self.plan.pods.clone().iter().enumerate() {
            check_interrupt(&self.topology.name)?;
            if !pod.primary {
                continue;
            }
            let ns = netns_name(&lab, Some(&pod.name));
            let node_ns = netns_name(&lab, Some(&pod.node));
            let gateway = self
                .plan
                .nodes
                .iter()
                .find(|n| n.name == pod.node)
                .expect("planned")
                .pod_gateway;
            let port = format!("p{j}");
            let s = |what: &str| format!("pod {}: {what}", pod.name);
            self.plug(&node_ns, POD_BRIDGE, &port, &ns, "1500", &s("link"))?;
            ip_in(
                &ns,
                &["addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"],
            )
            .map_err(self.step(s("address")))?;
            ip_in(&ns, &["link", "set", "eth0", "up"]).map_err(self.step(s("link up")))?;
            ip_in(
                &ns,
                &["route", "add", "default", "via", &gateway.to_string()],
            )
            .map_err(self.step(s("default route")))?;
        }

        self.start_processes()?;
        self.save_state()?;
        self.progress(&format!(
            "up in {:.1}s; state in {}",
            started.elapsed().as_secs_f64(),
            self.dir.display()
        ));
        Ok(())
    }

    /// Plugs namespace `ns` into `bridge` (in `bridge_ns`): a veth whose
    /// bridge end is `port` and whose other end is `eth0` in `ns`. Links are
    /// only ever made inside lab namespaces, so removing those removes them.
    fn plug(
        &self,
        bridge_ns: &str,
        bridge: &str,
        port: &str,
        ns: &str,
        mtu: &str,
        what: &str,
    ) -> Result<(), LabError> {
        ip_in(
            bridge_ns,
            &[
                "link", "add", port, "mtu", mtu, "type", "veth", "peer", "name", "eth0", "mtu",
                mtu, "netns", ns,
            ],
        )
        .map_err(self.step(what))?;
        ip_in(bridge_ns, &["link", "set", port, "master", bridge, "up"])
            .map_err(self.step(format!("{what}: bridge port")))?;
        Ok(())
    }

    fn start_processes(&mut self) -> Result<(), LabError> {
        let found: BTreeMap<&str, PathBuf> = MESH_PROGRAMS
            .iter()
            .filter(|_| self.opts.mesh)
            .filter_map(|p| sys::find_program(p).map(|path| (*p, path)))
            .collect();
        self.state.missing_binaries = MESH_PROGRAMS
            .iter()
            .filter(|p| !found.contains_key(*p))
            .map(|p| p.to_string())
            .collect();
        if !self.opts.mesh {
            self.progress("mesh programs not started (--no-mesh)");
        } else if !self.state.missing_binaries.is_empty() {
            self.progress(&format!(
                "not started (binaries not built yet): {}",
                self.state.missing_binaries.join(", ")
            ));
        }
        for node in self.plan.nodes.clone() {
            fs::create_dir_all(self.dir.join(&node.name)).map_err(self.io_err(&self.dir))?;
        }
        // Identities before anything starts: forwarders need theirs too.
        if found.contains_key("nsm-manager") {
            self.issue_identities()?;
        }
        // Forwarders first: a manager programs its forwarder as soon as it starts.
        if let Some(path) = found.get("nsm-forwarder") {
            for node in self.plan.nodes.clone() {
                check_interrupt(&self.topology.name)?;
                self.progress(&format!("{}: starting nsm-forwarder", node.name));
                let args = self.forwarder_args(&node.name);
                self.spawn(&node.name, "nsm-forwarder", path.as_os_str(), &args)?;
                self.wait_listening(&self.forwarder_socket(&node.name))?;
            }
        }
        // The first node's manager serves the lab's registry and IPAM, so it
        // starts first and the others point at it.
        if let Some(path) = found.get("nsm-manager") {
            self.write_manager_config()?;
            self.set_policies(&self.topology.policies.clone())?;
            for node in self.plan.nodes.clone() {
                check_interrupt(&self.topology.name)?;
                self.progress(&format!("{}: starting nsm-manager", node.name));
                let args = self.manager_args(&node.name);
                self.spawn(&node.name, "nsm-manager", path.as_os_str(), &args)?;
                self.wait_listening(&self.manager_socket(&node.name))?;
            }
        }
        if let (Some(path), true) = (found.get("nsm-endpoint"), found.contains_key("nsm-manager")) {
            // Chain functions need their own program, looked up only when used.
            let passthrough = if self.topology.endpoints.iter().any(|e| e.passthrough) {
                Some(
                    sys::find_program(PASSTHROUGH).ok_or_else(|| LabError::NotBuilt {
                        lab: self.topology.name.clone(),
                        program: PASSTHROUGH.into(),
                    })?,
                )
            } else {
                None
            };
            for e in self.topology.endpoints.clone() {
                check_interrupt(&self.topology.name)?;
                let (program, path) = match (&passthrough, e.passthrough) {
                    (Some(p), true) => (PASSTHROUGH, p),
                    _ => ("nsm-endpoint", path),
                };
                self.progress(&format!("{}: starting {program} for {}", e.name, e.service));
                fs::create_dir_all(self.dir.join(&e.name)).map_err(self.io_err(&self.dir))?;
                let args = self.endpoint_args(&e.name);
                self.spawn(&e.name, program, path.as_os_str(), &args)?;
                self.wait_listening(&self.endpoint_socket(&e.name))?;
            }
        }
        let runs: Vec<(String, String)> = self
            .topology
            .endpoints
            .iter()
            .filter_map(|e| e.run.clone().map(|r| (e.name.clone(), r)))
            .chain(
                self.topology
                    .pods
                    .iter()
                    .filter_map(|p| p.run.clone().map(|r| (p.name.clone(), r))),
            )
            .collect();
        for (member, run) in runs {
            check_interrupt(&self.topology.name)?;
            self.progress(&format!("{member}: starting `{run}`"));
            self.spawn(&member, "run", "sh".as_ref(), &["-c".to_string(), run])?;
        }
        // A process that dies at once (bad flags, missing library) fails `up`
        // instead of leaving a half-working lab behind.
        std::thread::sleep(Duration::from_millis(200));
        self.check_alive()?;
        if self.opts.mesh && self.state.missing_binaries.is_empty() {
            self.request_connections()?;
        }
        Ok(())
    }

    fn check_alive(&mut self) -> Result<(), LabError> {
        for (record, child) in self.state.processes.iter().zip(self.children.iter_mut()) {
            if let Ok(Some(status)) = child.try_wait() {
                // `sh -c "daemon -D"` exits 0 by design once the daemon forked.
                if record.program == "run" && status.success() {
                    continue;
                }
                return Err(LabError::Died {
                    lab: self.topology.name.clone(),
                    what: format!("{} on {}", record.program, record.member),
                    status: status.to_string(),
                    log: record.log.display().to_string(),
                });
            }
        }
        Ok(())
    }

    /// Waits for the process started last to listen on `socket`.
    fn wait_listening(&mut self, socket: &Path) -> Result<(), LabError> {
        let record = self
            .state
            .processes
            .last()
            .expect("called after spawn")
            .clone();
        let child = self.children.last_mut().expect("called after spawn");
        mesh::wait_for_socket(socket, START_TIMEOUT, || {
            matches!(child.try_wait(), Ok(None))
        })
        .map_err(|detail| LabError::Died {
            lab: self.topology.name.clone(),
            what: format!("{} on {}", record.program, record.member),
            status: detail,
            log: record.log.display().to_string(),
        })
    }

    /// Asks each pod's node manager for the connections of its annotation.
    fn request_connections(&mut self) -> Result<(), LabError> {
        let lab = self.topology.name.clone();
        for pod in self.topology.pods.clone() {
            let Some(value) = pod.annotations.get(nsm_proto::annotation::KEY) else {
                continue;
            };
            let requests =
                nsm_proto::annotation::parse(value).expect("validated with the topology");
            for (i, r) in requests.into_iter().enumerate() {
                check_interrupt(&self.topology.name)?;
                let interface = r.interface.unwrap_or_else(|| format!("nsm-{}", i + 1));
                let req = RequestedConnection {
                    id: format!("{lab}-{}-{interface}", pod.name),
                    pod: pod.name.clone(),
                    node: pod.node.clone(),
                    interface,
                    service: r.service,
                    labels: r.labels,
                };
                self.progress(&format!(
                    "{}: requesting {} as {}",
                    pod.name, req.service, req.interface
                ));
                let netns = Path::new(sys::NETNS_DIR).join(netns_name(&lab, Some(&pod.name)));
                let conn = mesh::request(
                    &self.manager_socket(&pod.node),
                    &netns,
                    &req,
                    true,
                    REQUEST_TIMEOUT,
                )
                .map_err(|detail| LabError::Request {
                    lab: lab.clone(),
                    pod: pod.name.clone(),
                    service: req.service.clone(),
                    detail,
                })?;
                let shown = mesh::describe(&req, Some(&conn));
                self.progress(&format!(
                    "{}: {} up, {} -> {} ({})",
                    pod.name, req.interface, shown.src_ip, shown.dst_ip, shown.endpoint
                ));
                self.state.connections.push(req);
                self.save_state()?;
            }
        }
        Ok(())
    }

    /// Makes the lab's CA and a SPIFFE certificate per node manager (with
    /// `nsmctl`, built with the manager), so that managers talk mTLS and sign
    /// their path segments, and one per `nsm-endpoint`
    /// (`spiffe://TD/nsm-endpoint/NAME`), so that an endpoint accepts only
    /// requests its manager signed for it. Certificates last a day: labs are
    /// short-lived.
    fn issue_identities(&self) -> Result<(), LabError> {
        let Some(nsmctl) = sys::find_program("nsmctl") else {
            self.progress("nsmctl not built: managers run without identities (insecure mode)");
            return Ok(());
        };
        let nsmctl = nsmctl.display().to_string();
        let ca = self.dir.join("ca").display().to_string();
        sys::run(
            &nsmctl,
            [
                "ca",
                "create",
                "--dir",
                &ca,
                "--trust-domain",
                TRUST_DOMAIN,
                "--ttl",
                "48h",
            ],
        )
        .map_err(self.step("identities: lab CA"))?;
        // Every manager, forwarder and nsm-endpoint of the lab: (ID, directory).
        let mut wanted: Vec<(String, PathBuf)> = Vec::new();
        for node in &self.plan.nodes {
            wanted.push((
                format!("spiffe://{TRUST_DOMAIN}/nsm-manager/{}", node.name),
                self.identity_dir(&node.name),
            ));
            wanted.push((
                format!("spiffe://{TRUST_DOMAIN}/nsm-forwarder/{}", node.name),
                self.forwarder_identity_dir(&node.name),
            ));
        }
        for e in self.topology.endpoints.iter().filter(|e| !e.passthrough) {
            wanted.push((
                endpoint_spiffe_id(&e.name),
                self.endpoint_identity_dir(&e.name),
            ));
        }
        for (id, out) in wanted {
            let out = out.display().to_string();
            sys::run(
                &nsmctl,
                [
                    "ca", "issue", "--dir", &ca, "--id", &id, "--ttl", "24h", "--out", &out,
                ],
            )
            .map_err(self.step(format!("identities: {id}")))?;
        }
        Ok(())
    }

    /// A node forwarder's certificate (`spiffe://TD/nsm-forwarder/NODE`), key
    /// and trust bundle: with it the forwarder's API socket speaks mTLS to
    /// managers only.
    pub fn forwarder_identity_dir(&self, node: &str) -> PathBuf {
        self.dir.join(node).join("forwarder-identity")
    }

    /// A channel to a node's forwarder API, as its manager opens it: mTLS
    /// with the node manager's identity when the forwarder has one, plain
    /// otherwise. Call it inside a tokio runtime.
    ///
    /// # Errors
    /// The manager's identity files are unusable.
    pub fn forwarder_channel(&self, node: &str) -> Result<tonic::transport::Channel, String> {
        let socket = self.forwarder_socket(node);
        if !self.forwarder_identity_dir(node).join("cert.pem").exists() {
            return Ok(nsm_proto::uds::connect_unix_lazy(&socket));
        }
        let source = nsm_identity::identity::IdentitySource::load(
            nsm_identity::identity::IdentityPaths::in_dir(&self.identity_dir(node)),
        )
        .map_err(|e| format!("{node} manager identity: {e}"))?;
        Ok(nsm_identity::tls::Tls::new(source).forwarder_channel(&socket))
    }

    /// The cross-connects a node's forwarder reports (its `List`), read as
    /// its manager reads them ([`Lab::forwarder_channel`]).
    ///
    /// # Errors
    /// The forwarder cannot be reached or refuses the call.
    pub fn cross_connects(
        &self,
        node: &str,
    ) -> Result<Vec<nsm_proto::forwarder::v1::CrossConnectStatus>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let ch = self.forwarder_channel(node)?;
            Ok(
                nsm_proto::forwarder::v1::forwarder_client::ForwarderClient::new(ch)
                    .list(nsm_proto::forwarder::v1::ListRequest {})
                    .await
                    .map_err(|e| format!("{node} forwarder List: {e}"))?
                    .into_inner()
                    .cross_connects,
            )
        })
    }

    /// An endpoint's certificate, key and trust bundle (`nsm-endpoint` only;
    /// chain functions run without one).
    pub fn endpoint_identity_dir(&self, endpoint: &str) -> PathBuf {
        self.dir.join(endpoint).join("identity")
    }

    /// A node manager's certificate, key and trust bundle.
    ///
    /// (See also [`Lab::endpoint_identity_dir`].)
    pub fn identity_dir(&self, node: &str) -> PathBuf {
        self.dir.join(node).join("identity")
    }

    fn write_manager_config(&self) -> Result<(), LabError> {
        #[derive(Serialize)]
        struct Config<'a> {
            services: Vec<ServiceConfig<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            authorization: Option<&'a crate::topology::Authorization>,
        }
        #[derive(Serialize)]
        struct ServiceConfig<'a> {
            name: &'a str,
            payload: crate::topology::Payload,
            cidr: Vec<String>,
        }
        let config = Config {
            services: self
                .topology
                .services
                .iter()
                .map(|s| ServiceConfig {
                    name: &s.name,
                    payload: s.payload,
                    cidr: s.cidr.iter().map(|c| c.to_string()).collect(),
                })
                .collect(),
            authorization: self.topology.authorization.as_ref(),
        };
        let path = self.manager_config();
        let text = serde_norway::to_string(&config).expect("config serializes");
        fs::write(&path, text).map_err(self.io_err(&path))?;
        // Every manager enforces the authorization policy for its own
        // clients; only the registry manager owns the pools.
        let node_config = Config {
            services: Vec::new(),
            authorization: config.authorization,
        };
        let path = self.node_config();
        let text = serde_norway::to_string(&node_config).expect("config serializes");
        fs::write(&path, text).map_err(self.io_err(&path))
    }

    /// The other managers' config: the authorization policy only.
    fn node_config(&self) -> PathBuf {
        self.dir.join("node-manager.yaml")
    }

    /// The managers' config (services and their pools).
    pub fn manager_config(&self) -> PathBuf {
        self.dir.join("manager.yaml")
    }

    /// An endpoint's own unix socket (its NetworkService server).
    pub fn endpoint_socket(&self, endpoint: &str) -> PathBuf {
        self.dir.join(endpoint).join("endpoint.sock")
    }

    /// The TCP URL peers use to reach a node's manager.
    pub fn manager_url(&self, node: &str) -> String {
        let plan = self
            .plan
            .nodes
            .iter()
            .find(|n| n.name == node)
            .expect("planned node");
        format!("tcp://{}:{MANAGER_PEER_PORT}", plan.underlay_ip)
    }

    /// The address a node's forwarder carries WireGuard on: the node's
    /// underlay address, or on a DPDK underlay ([`Lab::up_dpdk`]) one from the
    /// top of the underlay network (node i: the (i+1)-th host from the
    /// end), which only the forwarder's DPDK port answers for.
    pub fn forwarder_underlay_ip(&self, node: &str) -> std::net::Ipv4Addr {
        let (i, plan) = self
            .plan
            .nodes
            .iter()
            .enumerate()
            .find(|(_, n)| n.name == node)
            .expect("planned node");
        if !self.forwarder_dpdk {
            return plan.underlay_ip;
        }
        let top = u32::from(self.topology.underlay.cidr.broadcast());
        let offset = u32::try_from(i).unwrap_or(0) + 1;
        std::net::Ipv4Addr::from(top.saturating_sub(offset))
    }

    /// `nsm-forwarder` flags on a node (its documented interface).
    fn forwarder_args(&self, node: &str) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--name".into(),
            node.into(),
            "--listen".into(),
            self.forwarder_socket(node).display().to_string(),
            "--underlay-ip".into(),
            self.forwarder_underlay_ip(node).to_string(),
        ];
        if self.forwarder_dpdk {
            // No hugepages here; a run directory per lab and node, removed
            // by the forwarder when it stops.
            args.extend([
                "--dpdk-eal".into(),
                format!(
                    "--no-huge -m 256 --no-shconf --file-prefix=nsmtb-{}-{node} --no-pci \
                     --no-telemetry -l 0 --log-level=*:warning --vdev=net_af_packet0,iface=eth0,framecnt=4096",
                    self.topology.name
                ),
                "--dpdk-port".into(),
                "net_af_packet0".into(),
            ]);
        }
        if self.forwarder_identity_dir(node).join("cert.pem").exists() {
            args.extend([
                "--identity-dir".into(),
                self.forwarder_identity_dir(node).display().to_string(),
            ]);
        }
        args
    }

    /// `nsm-manager` flags on a node: the first node serves the registry.
    fn manager_args(&self, node: &str) -> Vec<String> {
        let plan = self
            .plan
            .nodes
            .iter()
            .find(|n| n.name == node)
            .expect("planned node");
        let mut args: Vec<String> = vec![
            "--name".into(),
            node.into(),
            "--listen".into(),
            self.manager_socket(node).display().to_string(),
            "--peer-listen".into(),
            format!("{}:{MANAGER_PEER_PORT}", plan.underlay_ip),
            "--advertise-url".into(),
            self.manager_url(node),
            "--forwarder".into(),
            self.forwarder_socket(node).display().to_string(),
            "--state-dir".into(),
            self.dir.join(node).display().to_string(),
        ];
        if self.identity_dir(node).join("cert.pem").exists() {
            args.extend([
                "--identity-dir".into(),
                self.identity_dir(node).display().to_string(),
            ]);
            if self.forwarder_identity_dir(node).join("cert.pem").exists() {
                args.push("--forwarder-mtls".into());
            }
        }
        args.extend([
            "--policies".into(),
            self.policies_file().display().to_string(),
        ]);
        args.extend(self.opts.manager_args.iter().cloned());
        let registry = &self.plan.nodes[0].name;
        if node == registry {
            args.extend([
                "--config".into(),
                self.manager_config().display().to_string(),
            ]);
        } else {
            args.extend(["--registry".into(), self.manager_url(registry)]);
            if self.topology.authorization.is_some() {
                args.extend(["--config".into(), self.node_config().display().to_string()]);
            }
        }
        args
    }

    /// `nsm-endpoint` flags in an endpoint pod.
    fn endpoint_args(&self, name: &str) -> Vec<String> {
        let e = self
            .topology
            .endpoints
            .iter()
            .find(|e| e.name == name)
            .expect("endpoint");
        let labels: Vec<String> = e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args: Vec<String> = vec![
            "--name".into(),
            e.name.clone(),
            "--service".into(),
            e.service.clone(),
            "--manager".into(),
            self.manager_socket(&e.node).display().to_string(),
            "--listen".into(),
            self.endpoint_socket(&e.name).display().to_string(),
        ];
        if !labels.is_empty() {
            args.extend(["--labels".into(), labels.join(",")]);
        }
        if !e.onward_labels.is_empty() {
            let l: Vec<String> = e
                .onward_labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            args.extend(["--onward-labels".into(), l.join(",")]);
        }
        if e.passthrough {
            args.extend([
                "--stats".into(),
                self.passthrough_stats_file(&e.name).display().to_string(),
            ]);
        } else if self
            .endpoint_identity_dir(&e.name)
            .join("cert.pem")
            .exists()
        {
            args.extend([
                "--identity-dir".into(),
                self.endpoint_identity_dir(&e.name).display().to_string(),
            ]);
        }
        args
    }

    /// The policy file every manager of the lab follows.
    pub fn policies_file(&self) -> PathBuf {
        self.dir.join("policies.json")
    }

    /// Checks `policies` and puts them in force: the file the managers
    /// follow is replaced atomically, and they apply it within about a
    /// second (running connections are re-chained in place).
    ///
    /// # Errors
    /// A policy is bad (nothing is written), or the file cannot be written.
    pub fn set_policies(&self, policies: &[nsm_policy::Policy]) -> Result<(), LabError> {
        nsm_policy::PolicySet::new(policies.to_vec()).map_err(|e| LabError::Policies {
            lab: self.topology.name.clone(),
            detail: e.to_string(),
        })?;
        let path = self.policies_file();
        let tmp = path.with_extension("json.tmp");
        // JSON is YAML: the managers read either.
        let json = serde_json::to_vec_pretty(&nsm_policy::PolicyFile {
            policies: policies.to_vec(),
        })
        .expect("policies always serialize");
        fs::write(&tmp, json).map_err(self.io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(self.io_err(&path))
    }

    /// [`Lab::set_policies`] from policy YAML (`policies: [...]`).
    ///
    /// # Errors
    /// As [`Lab::set_policies`], and YAML that is not a policy file.
    pub fn set_policies_yaml(&self, yaml: &str) -> Result<(), LabError> {
        let set = nsm_policy::parse_file(yaml).map_err(|e| LabError::Policies {
            lab: self.topology.name.clone(),
            detail: e.to_string(),
        })?;
        self.set_policies(set.policies())
    }

    /// Where a passthrough endpoint writes its counters (JSON, every second).
    pub fn passthrough_stats_file(&self, endpoint: &str) -> PathBuf {
        self.dir.join(endpoint).join("stats.json")
    }

    fn spawn(
        &mut self,
        member: &str,
        program: &str,
        path: &std::ffi::OsStr,
        args: &[String],
    ) -> Result<(), LabError> {
        let ns = netns_name(&self.topology.name, Some(member));
        let log = self
            .dir
            .join("logs")
            .join(format!("{member}-{program}.log"));
        // Appending keeps the log of a process that was restarted.
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(self.io_err(&log))?;
        let err_file = file.try_clone().map_err(self.io_err(&log))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .arg(path)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err_file)
            // Its own process group: a Ctrl-C at the terminal that ran `up`
            // must not take the lab's processes with it.
            .process_group(0);
        let child = cmd.spawn().map_err(self.io_err(Path::new("ip")))?;
        let pid = i32::try_from(child.id()).expect("pids fit in i32");
        self.state.processes.push(ProcessRecord {
            member: member.to_string(),
            program: program.to_string(),
            pid,
            log,
        });
        self.children.push(child);
        Ok(())
    }

    /// Kills a process the lab started (`program` is `nsm-forwarder`,
    /// `nsm-manager`, `nsm-endpoint` or `run`) with SIGKILL, as a crash
    /// would, and waits until it is gone.
    pub fn kill(&mut self, member: &str, program: &str) -> Result<(), LabError> {
        self.signal_and_wait(member, program, Signal::SIGKILL)
    }

    /// Stops a process the lab started with SIGTERM, as an orderly shutdown
    /// would (an endpoint unregisters first), and waits until it is gone.
    pub fn stop(&mut self, member: &str, program: &str) -> Result<(), LabError> {
        self.signal_and_wait(member, program, Signal::SIGTERM)
    }

    fn signal_and_wait(
        &mut self,
        member: &str,
        program: &str,
        signal: Signal,
    ) -> Result<(), LabError> {
        let idx = self
            .state
            .processes
            .iter()
            .rposition(|p| p.member == member && p.program == program)
            .ok_or_else(|| LabError::NoMember {
                lab: self.topology.name.clone(),
                name: format!("{program} on {member}"),
            })?;
        let record = self.state.processes.remove(idx);
        let _ = kill(Pid::from_raw(record.pid), signal);
        if self.children.len() > idx {
            let mut child = self.children.remove(idx);
            let _ = child.wait();
        } else {
            // Attached to a lab built by another process: poll until it is gone.
            while kill(Pid::from_raw(record.pid), None).is_ok() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.save_state()
    }

    /// Starts a mesh program again on a node (or endpoint pod) with the
    /// flags `up` gave it, and returns once it listens on its socket.
    ///
    /// # Errors
    /// [`LabError::NotRestartable`] when `program` does not run on `member`
    /// (forwarders and managers run on nodes; `nsm-endpoint` or
    /// `nsm-passthrough`, as the topology says, on endpoint pods),
    /// [`LabError::NotBuilt`], or the program failing to start.
    pub fn restart(&mut self, member: &str, program: &str) -> Result<(), LabError> {
        let is_node = self.plan.nodes.iter().any(|n| n.name == member);
        let endpoint = self.topology.endpoints.iter().find(|e| e.name == member);
        let (args, socket) = match program {
            "nsm-forwarder" if is_node => {
                (self.forwarder_args(member), self.forwarder_socket(member))
            }
            "nsm-manager" if is_node => (self.manager_args(member), self.manager_socket(member)),
            "nsm-endpoint" if endpoint.is_some_and(|e| !e.passthrough) => {
                (self.endpoint_args(member), self.endpoint_socket(member))
            }
            PASSTHROUGH if endpoint.is_some_and(|e| e.passthrough) => {
                (self.endpoint_args(member), self.endpoint_socket(member))
            }
            _ => {
                return Err(LabError::NotRestartable {
                    lab: self.topology.name.clone(),
                    member: member.to_string(),
                    program: program.to_string(),
                });
            }
        };
        let path = sys::find_program(program).ok_or_else(|| LabError::NotBuilt {
            lab: self.topology.name.clone(),
            program: program.to_string(),
        })?;
        self.spawn(member, program, path.as_os_str(), &args)?;
        self.wait_listening(&socket)?;
        self.save_state()
    }

    fn save_state(&self) -> Result<(), LabError> {
        let path = self.dir.join("state.json");
        let json = serde_json::to_vec_pretty(&self.state).expect("state always serializes");
        fs::write(&path, json).map_err(self.io_err(&path))
    }

    /// What `status` shows.
    pub fn status(&self) -> Status {
        let lab = self.name();
        let alive = |pid: i32| kill(Pid::from_raw(pid), None).is_ok();
        let nodes = self
            .plan
            .nodes
            .iter()
            .map(|n| NodeStatus {
                name: n.name.clone(),
                netns: netns_name(lab, Some(&n.name)),
                underlay_ip: n.underlay_ip.to_string(),
                underlay_ip6: n.underlay_ip6.to_string(),
                pod_cidr: n.pod_net.to_string(),
                manager_socket: self.manager_socket(&n.name).display().to_string(),
                forwarder_socket: self.forwarder_socket(&n.name).display().to_string(),
            })
            .collect();
        let pods = self
            .plan
            .pods
            .iter()
            .map(|p| PodStatus {
                name: p.name.clone(),
                node: p.node.clone(),
                netns: netns_name(lab, Some(&p.name)),
                // A `cni: true` pod's addresses are the CNI plugin's.
                ip: if p.primary {
                    p.ip.to_string()
                } else {
                    String::new()
                },
                endpoint: p.endpoint,
            })
            .collect();
        let endpoints = self
            .topology
            .endpoints
            .iter()
            .map(|e| EndpointStatus {
                name: e.name.clone(),
                node: e.node.clone(),
                service: e.service.clone(),
                labels: e.labels.clone(),
            })
            .collect();
        let processes = self
            .state
            .processes
            .iter()
            .map(|p| ProcessStatus {
                member: p.member.clone(),
                program: p.program.clone(),
                pid: p.pid,
                running: alive(p.pid),
                log: p.log.display().to_string(),
            })
            .collect();
        Status {
            name: lab.to_string(),
            state_dir: self.dir.display().to_string(),
            nodes,
            pods,
            endpoints,
            processes,
            missing_binaries: self.state.missing_binaries.clone(),
            connections: self.connection_status(),
        }
    }
}

impl Lab {
    /// The connections the lab asked for, as their node managers see them now.
    fn connection_status(&self) -> Vec<ConnectionStatus> {
        let mut seen: BTreeMap<&str, Vec<nsm_proto::connection::Connection>> = BTreeMap::new();
        for req in &self.state.connections {
            if !seen.contains_key(req.node.as_str()) {
                let known =
                    mesh::connections(&self.manager_socket(&req.node), Duration::from_secs(3))
                        .unwrap_or_default();
                seen.insert(&req.node, known);
            }
        }
        self.state
            .connections
            .iter()
            .map(|req| {
                let conn = seen
                    .get(req.node.as_str())
                    .and_then(|cs| cs.iter().find(|c| mesh::is_same(req, c)));
                mesh::describe(req, conn)
            })
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Err(e) = teardown(&self.topology.name, &self.opts) {
            eprintln!(
                "nsm-testbed: teardown of lab `{}` failed: {e}",
                self.topology.name
            );
        }
        reap(&mut self.children);
    }
}

/// Collects the exit status of processes this value started, so none stays a zombie.
fn reap(children: &mut [Child]) {
    for child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// What `down` removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Teardown {
    /// Namespaces deleted.
    pub namespaces: Vec<String>,
    /// Processes signalled.
    pub processes: usize,
}

/// Removes everything of lab `lab` found by name: processes in its
/// namespaces (SIGTERM, then SIGKILL after a grace period), the namespaces
/// (and with them every link), and its state directory. Works without the
/// state directory, so it also cleans up after a crash. Removing a lab that
/// does not exist succeeds and removes nothing.
pub fn teardown(lab: &str, opts: &Options) -> Result<Teardown, LabError> {
    let namespaces: Vec<String> = sys::list_netns()
        .into_iter()
        .filter(|n| belongs_to(n, lab))
        .collect();
    let mut pids: Vec<i32> = namespaces
        .iter()
        .flat_map(|ns| sys::netns_pids(ns))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    for &pid in &pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + TERM_GRACE;
    loop {
        let left: Vec<i32> = namespaces
            .iter()
            .flat_map(|ns| sys::netns_pids(ns))
            .collect();
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            for pid in left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut first_err = None;
    for ns in &namespaces {
        if let Err(source) = ip(["netns", "del", ns]) {
            first_err.get_or_insert(LabError::Step {
                lab: lab.to_string(),
                step: format!("delete namespace {ns}"),
                source,
            });
        }
    }
    // DPDK forwarders that were killed leave their (empty) EAL run
    // directories, named after the lab (see `Lab::up_dpdk`).
    if let Ok(entries) = fs::read_dir("/var/run/dpdk") {
        let prefix = format!("nsmtb-{lab}-");
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = opts.state_root.join(lab);
    if dir.exists()
        && let Err(source) = fs::remove_dir_all(&dir)
    {
        first_err.get_or_insert(LabError::Io {
            lab: lab.to_string(),
            path: dir,
            source,
        });
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(Teardown {
            namespaces,
            processes: pids.len(),
        }),
    }
}

/// Every lab that is up or left over: by state directory and by namespace prefix.
pub fn list_labs(opts: &Options) -> Vec<String> {
    let mut labs: Vec<String> = sys::list_netns()
        .iter()
        .filter_map(|n| lab_of(n).map(str::to_string))
        .collect();
    if let Ok(dir) = fs::read_dir(&opts.state_root) {
        labs.extend(
            dir.filter_map(|e| e.ok())
                .filter(|e| e.path().join("topology.yaml").exists())
                .filter_map(|e| e.file_name().into_string().ok()),
        );
    }
    labs.sort();
    labs.dedup();
    labs
}

/// A lab as `status --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Lab name.
    pub name: String,
    /// State directory.
    pub state_dir: String,
    /// Nodes.
    pub nodes: Vec<NodeStatus>,
    /// Pods, endpoints included.
    pub pods: Vec<PodStatus>,
    /// Endpoints.
    pub endpoints: Vec<EndpointStatus>,
    /// Processes started by `up`.
    pub processes: Vec<ProcessStatus>,
    /// Mesh programs not found at `up`.
    pub missing_binaries: Vec<String>,
    /// Mesh connections.
    pub connections: Vec<ConnectionStatus>,
}

/// A node in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// Its namespace.
    pub netns: String,
    /// Underlay IPv4.
    pub underlay_ip: String,
    /// Underlay IPv6.
    pub underlay_ip6: String,
    /// Its pods' primary network.
    pub pod_cidr: String,
    /// Its manager's unix socket.
    pub manager_socket: String,
    /// Its forwarder's unix socket.
    pub forwarder_socket: String,
}

/// A pod in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct PodStatus {
    /// Pod name.
    pub name: String,
    /// Its node.
    pub node: String,
    /// Its namespace.
    pub netns: String,
    /// Primary-network IPv4.
    pub ip: String,
    /// Whether it is an endpoint.
    pub endpoint: bool,
}

/// An endpoint in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointStatus {
    /// Endpoint name.
    pub name: String,
    /// Its node.
    pub node: String,
    /// The service it serves.
    pub service: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// A process in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessStatus {
    /// The node or pod.
    pub member: String,
    /// The program.
    pub program: String,
    /// Its pid.
    pub pid: i32,
    /// Whether it still runs.
    pub running: bool,
    /// Its log.
    pub log: String,
}

/// A mesh connection in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionStatus {
    /// Connection id (as the client asked for it).
    pub id: String,
    /// The path hop by hop: each segment's name (nodes, endpoints), as the
    /// client's manager reports it.
    pub path: Vec<String>,
    /// Client pod.
    pub pod: String,
    /// Interface in the pod.
    pub interface: String,
    /// Network service.
    pub service: String,
    /// Endpoint name.
    pub endpoint: String,
    /// Client address.
    pub src_ip: String,
    /// Endpoint address.
    pub dst_ip: String,
    /// UP, DOWN, ...
    pub state: String,
}

/// The SPIFFE ID of endpoint `name` in a lab (what its manager signs for).
fn endpoint_spiffe_id(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/nsm-endpoint/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_belong_to_one_lab() {
        assert!(belongs_to("nsmtb_a", "a"));
        assert!(belongs_to("nsmtb_a_node-1", "a"));
        assert!(!belongs_to("nsmtb_a-b_node-1", "a"));
        assert!(!belongs_to("nsmtb_ab", "a"));
        assert_eq!(lab_of("nsmtb_a-b_node-1"), Some("a-b"));
        assert_eq!(lab_of("nsmtb_a-b"), Some("a-b"));
        assert_eq!(lab_of("other"), None);
    }
}
