//! Harness for the DPDK tests: a private network namespace per scenario,
//! the scenario itself in a child process (EAL runs once per process and
//! must start inside the namespace), and raw frame injection.
//!
//! Only 198.51.100.0/24 (TEST-NET-2) and fd00::/64 are used, and only
//! inside the namespaces made here: the host's networks are never touched.

#![allow(dead_code, reason = "each test binary uses a part of the harness")]

use std::ffi::CString;
use std::io::Read;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Environment variable naming the scenario a child process runs.
pub(crate) const SCENARIO_ENV: &str = "NSM_DPDK_TEST_SCENARIO";
/// Environment variable naming the namespace the child enters.
pub(crate) const NETNS_ENV: &str = "NSM_DPDK_TEST_NETNS";

/// Runs `cmd` (a program and its arguments), panicking with its output if
/// it fails.
pub(crate) fn run(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", cmd.join(" ")));
    assert!(
        out.status.success(),
        "{} failed ({}): {}{}",
        cmd.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace named `nsmdpdk-<pid>-<n>`, deleted on drop (with
/// every interface in it).
#[derive(Debug)]
pub(crate) struct Netns {
    pub(crate) name: String,
}

impl Netns {
    pub(crate) fn new() -> Netns {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the DPDK tests need root (network namespaces, AF_PACKET, tap)"
        );
        let name = format!(
            "nsmdpdk-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> args...`
    pub(crate) fn ip(&self, args: &[&str]) -> String {
        ip_in(&self.name, args)
    }

    /// A sysctl inside the namespace.
    pub(crate) fn sysctl(&self, key: &str, value: &str) {
        let kv = format!("{key}={value}");
        run(&["ip", "netns", "exec", &self.name, "sysctl", "-qw", &kv]);
    }

    /// A veth pair `kernel_side`/`dpdk_side`, both up; IPv6 is off on the
    /// DPDK side so its kernel stack stays quiet (it has no address and
    /// shares the MAC DPDK uses).
    pub(crate) fn veth(&self, kernel_side: &str, dpdk_side: &str) {
        self.ip(&[
            "link",
            "add",
            kernel_side,
            "type",
            "veth",
            "peer",
            "name",
            dpdk_side,
        ]);
        self.sysctl(&format!("net.ipv6.conf.{dpdk_side}.disable_ipv6"), "1");
        self.ip(&["link", "set", kernel_side, "up"]);
        self.ip(&["link", "set", dpdk_side, "up"]);
    }
}

/// `ip -n <ns> args...` for a namespace known by name (in the child).
pub(crate) fn ip_in(ns: &str, args: &[&str]) -> String {
    let mut cmd = vec!["ip", "-n", ns];
    cmd.extend_from_slice(args);
    run(&cmd)
}

/// The MAC address of `dev` in namespace `ns`.
pub(crate) fn mac_in(ns: &str, dev: &str) -> [u8; 6] {
    let out = ip_in(ns, &["link", "show", dev]);
    let text = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC for {dev}: {out}"));
    parse_mac(text)
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Best effort, also while unwinding from a failed assertion.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub(crate) fn parse_mac(text: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    let parts: Vec<_> = text.split(':').collect();
    assert_eq!(parts.len(), 6, "MAC {text}");
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).unwrap();
    }
    mac
}

/// Moves the calling thread into namespace `name`. Everything it creates
/// afterwards (sockets, DPDK's vdevs and threads) lives there.
pub(crate) fn enter_netns(name: &str) {
    let path = format!("/run/netns/{name}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: a valid namespace fd; CLONE_NEWNET only changes the calling
    // thread's network namespace.
    let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// Runs `scenario` in a child process (this test binary again, running
/// only `child_entry`) inside `ns`, and fails with its output if it fails
/// or outlives `timeout` (then it is killed).
pub(crate) fn run_child(scenario: &str, ns: &Netns, timeout: Duration) {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(SCENARIO_ENV, scenario)
        .env(NETNS_ENV, &ns.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the scenario child");
    // Drain both pipes in the background so a chatty child cannot block.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The child's EAL runtime directory, in case it died before removing it
    // (its --file-prefix is nsmdpdk-<its pid>).
    let _ = std::fs::remove_dir(format!("/var/run/dpdk/nsmdpdk-{}", child.id()));
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    // Shown by the test harness when the test fails (captured otherwise).
    println!(
        "--- child {scenario} stdout ---\n{stdout}\n--- child {scenario} stderr ---\n{stderr}"
    );
    match status {
        None => panic!("scenario {scenario} did not finish within {timeout:?} (killed)"),
        Some(s) => assert!(s.success(), "scenario {scenario} failed: {s}"),
    }
    assert!(
        stdout.contains("1 passed"),
        "scenario {scenario}: the child ran no test (filter mismatch?)"
    );
}

/// Sends one raw Ethernet frame out of `dev` (an AF_PACKET socket in the
/// calling thread's namespace): for frames the kernel would never build.
pub(crate) fn send_raw(dev: &str, frame: &[u8]) {
    let cname = CString::new(dev).unwrap();
    // SAFETY: plain socket creation; protocol 0 means send-only.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: cname is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert!(ifindex > 0, "no interface {dev}");
    // SAFETY: sockaddr_ll is plain data; zero is a valid start.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
    addr.sll_ifindex = i32::try_from(ifindex).unwrap();
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: frame and addr are valid for the lengths given.
    let ret = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    assert_eq!(
        usize::try_from(ret).ok(),
        Some(frame.len()),
        "send raw frame on {dev}: {err}"
    );
}

/// Turns off TX checksum offload on `dev` (in the calling thread's
/// namespace), as `ethtool -K dev tx off` would. A veth otherwise hands its
/// peer the kernel's UDP packets with only a partial checksum
/// (CHECKSUM_PARTIAL: the peer is trusted to finish it), and DPDK 22.11's
/// `net_af_packet` does not pass on the kernel's "checksum not ready" flag,
/// so they would rightly be dropped as bad checksums.
pub(crate) fn disable_tx_checksum(dev: &str) {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    const ETHTOOL_STXCSUM: u32 = 0x17;
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    // SAFETY: ifreq is plain data; zero is a valid start.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    assert!(dev.len() < ifr.ifr_name.len());
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0);
    // SAFETY: ifr names the device and points at a live ethtool_value.
    let ret = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &raw mut ifr) };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    assert_eq!(ret, 0, "ETHTOOL_STXCSUM off on {dev}: {err}");
}

/// Receives on a non-blocking kernel socket until `n` datagrams arrived or
/// `timeout` passed; `pump` runs between attempts (it polls DPDK).
pub(crate) fn kernel_recv(
    sock: &UdpSocket,
    n: usize,
    timeout: Duration,
    mut pump: impl FnMut(),
) -> Vec<(std::net::SocketAddr, Vec<u8>)> {
    let mut got = Vec::with_capacity(n);
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + timeout;
    while got.len() < n && Instant::now() < deadline {
        match sock.recv_from(&mut buf) {
            Ok((len, src)) => got.push((src, buf[..len].to_vec())),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                pump();
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) => panic!("kernel recv: {e}"),
        }
    }
    got
}
