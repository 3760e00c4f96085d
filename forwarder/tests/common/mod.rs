//! Harness for the forwarder's root integration tests: network namespaces
//! as nodes and pods, real `nsm-forwarder` processes in the node
//! namespaces, and a gRPC client that programs them like the manager.
//!
//! Every namespace is named `nsmfw-<pid>-<counter>` and removed on drop
//! (also when a test panics); addresses come from documentation ranges
//! only, and only inside namespaces made here.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nsm_proto::forwarder::v1 as pb;
use pb::forwarder_client::ForwarderClient;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_nsm-forwarder");

/// Fails with a message that says why unless running as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test builds network namespaces and needs root: run `cargo test -p nsm-forwarder` as root"
    );
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "nsmfw-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        run(&v)
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Interface names in the namespace.
    pub fn links(&self) -> Vec<String> {
        self.ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    pub fn has_link(&self, name: &str) -> bool {
        self.links().iter().any(|l| l == name)
    }

    /// Runs `f` on a thread inside this namespace; sockets it creates stay
    /// in the namespace and may be used from any thread afterwards.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    }

    pub fn udp(&self, addr: SocketAddr) -> UdpSocket {
        self.enter(move || {
            let s = UdpSocket::bind(addr).expect("bind udp");
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            s
        })
    }

    pub fn tcp_listen(&self, addr: SocketAddr) -> TcpListener {
        self.enter(move || TcpListener::bind(addr).expect("bind tcp"))
    }

    pub fn tcp_connect(&self, addr: SocketAddr) -> TcpStream {
        self.enter(move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("tcp connect")
        })
    }

    /// One ping, retried for up to `within` (the first may wait for the
    /// handshake). True when a reply came.
    pub fn ping(&self, dst: IpAddr, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let ok = self
                .command("ping")
                .args(["-c", "1", "-W", "1", &dst.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill anything still running inside (our own children only ever
        // run there), then remove the namespace.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two node namespaces joined by a veth: `eth0` in each, 192.0.2.1/24 and
/// 192.0.2.2/24.
pub fn two_nodes() -> (Netns, Netns) {
    let a = Netns::new();
    let b = Netns::new();
    // Created inside node A, then one end moved: nothing touches the
    // host's namespace.
    a.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0b",
    ]);
    a.ip(&["link", "set", "eth0b", "netns", &b.name]);
    b.ip(&["link", "set", "eth0b", "name", "eth0"]);
    a.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"]);
    b.ip(&["addr", "add", "192.0.2.2/24", "dev", "eth0"]);
    a.ip(&["link", "set", "eth0", "up"]);
    b.ip(&["link", "set", "eth0", "up"]);
    (a, b)
}

/// Like [`two_nodes`], with IPv6 underlay addresses 2001:db8:ffff::1/64 and
/// ::2/64 (no DAD, usable at once).
pub fn two_nodes_v6() -> (Netns, Netns) {
    let (a, b) = two_nodes();
    a.ip(&["addr", "add", "2001:db8:ffff::1/64", "dev", "eth0", "nodad"]);
    b.ip(&["addr", "add", "2001:db8:ffff::2/64", "dev", "eth0", "nodad"]);
    (a, b)
}

/// One node namespace whose `eth0` (one end of a veth pair, both ends
/// inside it) holds 192.0.2.1/24.
pub fn one_node() -> Netns {
    let n = Netns::new();
    n.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    n.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"]);
    n.ip(&["link", "set", "eth0", "up"]);
    n.ip(&["link", "set", "eth0p", "up"]);
    n
}

/// A running `nsm-forwarder` in a node namespace; SIGTERM on drop.
#[derive(Debug)]
pub struct Forwarder {
    child: Child,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl Forwarder {
    pub fn start(node: &Netns, name: &str, underlay_ip: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("fw.sock");
        let log = dir.path().join("fw.log");
        let logf = std::fs::File::create(&log).expect("log file");
        let child = node
            .command(BIN)
            .args(["--name", name, "--underlay-ip", underlay_ip, "--listen"])
            .arg(&socket)
            .args(extra)
            .env("RUST_LOG", "info,nsm_dataplane=debug")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn nsm-forwarder");
        let mut fw = Forwarder {
            child,
            socket,
            _dir: dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fw.socket.exists() {
            if let Ok(Some(st)) = fw.child.try_wait() {
                panic!("nsm-forwarder exited with {st}: {}", fw.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "nsm-forwarder did not listen: {}",
                fw.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        fw
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn client(&self) -> ForwarderClient<Channel> {
        let ch = nsm_proto::uds::connect_unix(&self.socket)
            .await
            .unwrap_or_else(|e| panic!("connect to forwarder: {e:?}: {}", self.log_text()));
        ForwarderClient::new(ch)
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // `ip netns exec` execs the forwarder: the child pid is the
        // forwarder itself.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid")),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

pub fn current_thread_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A kernel side.
pub fn kernel(pod: &Netns, name: &str, addrs: &[&str], routes: &[&str]) -> pb::Side {
    pb::Side {
        kind: Some(pb::side::Kind::Kernel(pb::KernelInterface {
            netns_path: pod.path(),
            name: name.into(),
            payload: pb::Payload::Ip as i32,
            addresses: addrs.iter().map(|s| s.to_string()).collect(),
            routes: routes
                .iter()
                .map(|r| pb::Route {
                    prefix: r.to_string(),
                    next_hop: String::new(),
                })
                .collect(),
            mtu: 0,
            mac: String::new(),
            neighbors: vec![],
        })),
    }
}

/// Same-node cross-connect number `i` between `p1` and `p2`: interface
/// `name` on both sides, 198.51.100.(i+1)/32 in `p1` and 203.0.113.(i+1)/32
/// in `p2`, each with a host route to the other (so `i` below 254).
pub fn same_node(p1: &Netns, p2: &Netns, id: &str, name: &str, i: usize) -> pb::CrossConnect {
    let a = format!("198.51.100.{}/32", i + 1);
    let b = format!("203.0.113.{}/32", i + 1);
    pb::CrossConnect {
        id: id.into(),
        source: Some(kernel(p1, name, &[&a], &[&b])),
        destination: Some(kernel(p2, name, &[&b], &[&a])),
        chain: None,
    }
}

/// A WireGuard side to the peer's default port (51820: its first packet
/// thread's).
pub fn wireguard(peer_ip: &str, peer_key: &str) -> pb::Side {
    wireguard_at(peer_ip, 0, peer_key)
}

/// A WireGuard side to `peer_port`, the port the peer's status gave for
/// this cross-connect (0: 51820).
pub fn wireguard_at(peer_ip: &str, peer_port: u32, peer_key: &str) -> pb::Side {
    wireguard_lanes(peer_ip, &[peer_port], peer_key)
}

/// A WireGuard side to the peer's lanes at `ports` (lane 0 first, as the
/// peer's status listed them; `[0]`: one lane at 51820).
pub fn wireguard_lanes(peer_ip: &str, ports: &[u32], peer_key: &str) -> pb::Side {
    let peer_port = ports.first().copied().unwrap_or(0);
    pb::Side {
        kind: Some(pb::side::Kind::Wireguard(pb::WireguardTunnel {
            peer_ip: peer_ip.into(),
            peer_port,
            peer_public_key: peer_key.into(),
            persistent_keepalive_secs: 0,
            // A manager passes the lanes the peer's status lists.
            peer_lane_ports: if peer_port == 0 {
                vec![]
            } else {
                ports.to_vec()
            },
        })),
    }
}

/// The WireGuard ports of a status's lanes, lane 0 first.
pub fn lane_ports(st: &pb::CrossConnectStatus) -> Vec<u32> {
    st.lanes.iter().map(|l| l.wireguard_port).collect()
}

/// The manager's three-step dance for one cross-node connection: A
/// without the peer's key, B with A's key, A again with B's key. Returns
/// the final statuses (A, B).
pub async fn connect_pair(
    a: &mut ForwarderClient<Channel>,
    b: &mut ForwarderClient<Channel>,
    id: &str,
    a_side: pb::Side,
    b_side: pb::Side,
) -> (pb::CrossConnectStatus, pb::CrossConnectStatus) {
    connect_pair_via(a, b, ("192.0.2.1", "192.0.2.2"), id, a_side, b_side).await
}

/// [`connect_pair`] with the nodes' underlay addresses given.
pub async fn connect_pair_via(
    a: &mut ForwarderClient<Channel>,
    b: &mut ForwarderClient<Channel>,
    (a_ip, b_ip): (&str, &str),
    id: &str,
    a_side: pb::Side,
    b_side: pb::Side,
) -> (pb::CrossConnectStatus, pb::CrossConnectStatus) {
    // Each side sends to the port the other's status names: the packet
    // thread that owns the connection there.
    let a_req = |ports: &[u32], key: &str| pb::CrossConnect {
        id: id.into(),
        source: Some(a_side.clone()),
        destination: Some(wireguard_lanes(b_ip, ports, key)),
        chain: None,
    };
    let a1 = a
        .program(a_req(&[0], ""))
        .await
        .expect("program A")
        .into_inner();
    assert_eq!(
        a1.wireguard_public_key.len(),
        44,
        "A returns its public key"
    );
    let b1 = b
        .program(pb::CrossConnect {
            id: id.into(),
            source: Some(wireguard_lanes(
                a_ip,
                &lane_ports(&a1),
                &a1.wireguard_public_key,
            )),
            destination: Some(b_side),
            chain: None,
        })
        .await
        .expect("program B")
        .into_inner();
    assert_eq!(b1.wireguard_public_key.len(), 44);
    let a2 = a
        .program(a_req(&lane_ports(&b1), &b1.wireguard_public_key))
        .await
        .expect("re-program A")
        .into_inner();
    assert_eq!(
        a2.wireguard_public_key, a1.wireguard_public_key,
        "A keeps its key"
    );
    (a2, b1)
}

/// Reads a pcap file (as tcpdump writes it) into Ethernet frames.
pub fn read_pcap(path: &Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).expect("read pcap");
    assert!(data.len() >= 24, "pcap too short");
    let le = data[0..4] == [0xd4, 0xc3, 0xb2, 0xa1];
    let u32_at = |b: &[u8]| {
        let a = [b[0], b[1], b[2], b[3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let mut frames = Vec::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let incl = u32_at(&data[off + 8..off + 12]) as usize;
        let start = off + 16;
        if start + incl > data.len() {
            break;
        }
        frames.push(data[start..start + incl].to_vec());
        off = start + incl;
    }
    frames
}

/// tcpdump on `dev` in `node`, writing to a file; stopped on drop.
pub struct Capture {
    child: Child,
    pub file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    pub fn start(node: &Netns, dev: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("cap.pcap");
        let mut child = node
            .command("tcpdump")
            .args(["-i", dev, "-n", "-U", "-s", "0", "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tcpdump");
        // tcpdump says "listening on ..." once the capture is armed.
        let stderr = child.stderr.take().expect("stderr");
        let mut line = String::new();
        let _ = BufReader::new(stderr).read_line(&mut line);
        assert!(line.contains("listening"), "tcpdump: {line}");
        Capture {
            child,
            file,
            _dir: dir,
        }
    }

    /// Stops the capture and returns the frames.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(200));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid")),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        read_pcap(&self.file)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two nodes with a forwarder each, a pod on each, and one cross-node
/// connection between the pods: 198.51.100.1 (A) <-> 198.51.100.2 (B),
/// plus 2001:db8:1::1 <-> ::2 when asked. Fields drop in order: the
/// forwarders stop before the namespaces go.
#[derive(Debug)]
pub struct ConnectedPair {
    pub fa: Forwarder,
    pub fb: Forwarder,
    pub pa: Netns,
    pub pb: Netns,
    pub na: Netns,
    pub nb: Netns,
}

impl ConnectedPair {
    /// Builds it; `extra_a` are more flags for A's forwarder. Returns once
    /// a ping crosses.
    pub fn new(id: &str, extra_a: &[&str], ipv6: bool) -> Self {
        let (na, nb) = two_nodes();
        let (pa, pb) = (Netns::new(), Netns::new());
        let fa = Forwarder::start(&na, "node-a", "192.0.2.1", extra_a);
        let fb = Forwarder::start(&nb, "node-b", "192.0.2.2", &[]);
        let (mut a, mut b) = (vec!["198.51.100.1/32"], vec!["198.51.100.2/32"]);
        if ipv6 {
            a.push("2001:db8:1::1/128");
            b.push("2001:db8:1::2/128");
        }
        current_thread_rt().block_on(async {
            let (mut ca, mut cb) = (fa.client().await, fb.client().await);
            connect_pair(
                &mut ca,
                &mut cb,
                id,
                kernel(&pa, "nsm-1", &a, &b),
                kernel(&pb, "nsm-1", &b, &a),
            )
            .await;
        });
        let dst: IpAddr = "198.51.100.2".parse().expect("ip");
        assert!(pa.ping(dst, Duration::from_secs(10)), "{}", fa.log_text());
        ConnectedPair {
            fa,
            fb,
            pa,
            pb,
            na,
            nb,
        }
    }
}

/// Runs `nsm-forwarder` in `node` with its required flags and `args`,
/// which must make it refuse to start; returns what it said on stderr.
pub fn refused(node: &Netns, underlay_ip: &str, args: &[&str]) -> String {
    let out = node
        .command(BIN)
        .args(["--name", "n", "--underlay-ip", underlay_ip])
        .args(["--listen", "/nonexistent-nsm-test/fw.sock"])
        .args(args)
        .output()
        .expect("run nsm-forwarder");
    assert!(!out.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}
