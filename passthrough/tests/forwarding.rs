//! The forwarding engine between real interfaces, in throw-away network
//! namespaces (needs root; never touches the host's own namespace).
//!
//! Three namespaces per test: a client `A`, the passthrough `P` and an
//! endpoint `B`. `P` has two interfaces and a [`Link`] between them; `A`
//! and `B` have real IP stacks, so ping and TCP go through `P` only if the
//! link forwards both ways.
//!
//! - `tun_with_offloads`: the forwarder's case. Every interface is a TUN
//!   opened as the forwarder opens them (`IFF_TUN | IFF_NO_PI |
//!   IFF_VNET_HDR`, `TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)`),
//!   and a relay thread stands in for the forwarder, copying each packet
//!   (with its virtio-net header, so TCP superpackets stay superpackets and
//!   checksums stay partial) from `A`'s TUN to `P`'s incoming TUN, and from
//!   `P`'s onward TUN to `B`'s, and back. The link is started before the
//!   interfaces exist, as in the mesh.
//! - `veth_ethernet`: the ETHERNET case, over veth pairs (which do GSO too).
//!
//! Both check ping (IPv4, and IPv6 on TUN), a TCP exchange of many MTUs each
//! way with its bytes verified, the counters in both directions, and that
//! superpackets (bigger than the MTU) crossed.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nsm_passthrough::engine::{Counters, Link};

const MTU: u64 = 1500;
const UP: usize = 16 << 20;
const DOWN: usize = 4 << 20;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and TUN devices: run it as root"
    );
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

fn ip(args: &[&str]) {
    let out = run("ip", args);
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop (also when the test fails).
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "nsmpt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    fn exec(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["netns", "exec", self.0.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `f` on a thread inside this namespace (threads it spawns, and
    /// sockets it creates, belong to the namespace).
    fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("open the namespace");
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

/// `struct ifreq` for TUNSETIFF: name and flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TUN device opened as the forwarder opens them, in the calling
/// thread's namespace.
fn open_tun(name: &str) -> File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    let mut ifr = IfReq {
        name: [0; 16],
        flags: libc::c_short::try_from(libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR)
            .expect("flags fit"),
        _pad: [0; 22],
    };
    ifr.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: the fd is an open /dev/net/tun; `ifr` is a valid ifreq (name,
    // flags, padding to its full size) alive across the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut ifr) };
    assert!(
        r == 0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    let offloads = libc::c_ulong::from(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6);
    // SAFETY: TUNSETOFFLOAD takes the flags by value; no pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, offloads) };
    assert!(
        r == 0,
        "TUNSETOFFLOAD {name}: {}",
        std::io::Error::last_os_error()
    );
    file
}

/// Stands in for the forwarder: copies every packet, virtio-net header
/// included, between pairs of TUN fds. Stops on drop.
struct Relay {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    fn new() -> Relay {
        Relay {
            stop: Arc::default(),
            threads: Vec::new(),
        }
    }

    fn pair(&mut self, a: File, b: File) {
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            let files = [a, b];
            let mut buf = vec![0u8; 70_000];
            while !stop.load(Ordering::Relaxed) {
                let mut fds = files.each_ref().map(|f| libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                // SAFETY: two valid pollfds alive across the call.
                unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
                for from in 0..2 {
                    if fds[from].revents == 0 {
                        continue;
                    }
                    while let Ok(n) = (&files[from]).read(&mut buf) {
                        let _ = (&files[1 - from]).write(&buf[..n]);
                    }
                }
            }
        }));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn pattern(i: usize) -> u8 {
    u8::try_from(i % 251).expect("below 251")
}

/// Sends `UP` bytes from `client` to `server` and `DOWN` back over one TCP
/// connection, checking every byte.
fn tcp_exchange(client: &Netns, server: &Netns, addr: SocketAddr) {
    let listener = server.run(move || TcpListener::bind(addr)).expect("listen");
    let srv = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0;
        loop {
            let n = s.read(&mut buf).expect("server read");
            if n == 0 {
                break;
            }
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, pattern(got + k), "byte {} corrupted", got + k);
            }
            got += n;
        }
        assert_eq!(got, UP);
        let data: Vec<u8> = (0..DOWN).map(pattern).collect();
        s.write_all(&data).expect("server write");
    });
    let mut c = client
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
        .expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    c.set_write_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let data: Vec<u8> = (0..UP).map(pattern).collect();
    c.write_all(&data).expect("client write");
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut back = Vec::new();
    c.read_to_end(&mut back).expect("client read");
    assert_eq!(back.len(), DOWN);
    assert!(back.iter().enumerate().all(|(i, b)| *b == pattern(i)));
    srv.join().expect("server thread");
}

/// Pings until the path works (the link binds asynchronously), then
/// requires `count` answers in a row.
fn ping(from: &Netns, to: &str, count: u32) {
    let six = to.contains(':');
    let family = if six { "-6" } else { "-4" };
    let ok = (0..20).any(|_| {
        from.exec(&["ping", family, "-c", "1", "-W", "1", to])
            .status
            .success()
    });
    assert!(ok, "no answer from {to}");
    let c = count.to_string();
    let out = from.exec(&["ping", family, "-c", &c, "-i", "0.2", "-W", "2", to]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{count} received")),
        "ping {to}: {text}"
    );
}

fn snapshot(c: &Counters) -> [u64; 4] {
    [
        c.forward.packets(),
        c.forward.bytes(),
        c.reverse.packets(),
        c.reverse.bytes(),
    ]
}

/// Checks what a phase added to the counters: at least `min` bytes each
/// way, not absurdly more (no loop), and, for bulk TCP, superpackets
/// (an average packet larger than the MTU) in the bulk direction.
fn check_growth(before: [u64; 4], after: [u64; 4], min_fwd: u64, min_rev: u64, superpackets: bool) {
    let d: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    eprintln!(
        "forward {} packets / {} bytes, reverse {} packets / {} bytes",
        d[0], d[1], d[2], d[3]
    );
    assert!(d[0] > 0 && d[2] > 0, "packets in both directions: {d:?}");
    assert!(d[1] >= min_fwd, "forward bytes {} < {min_fwd}", d[1]);
    assert!(d[3] >= min_rev, "reverse bytes {} < {min_rev}", d[3]);
    assert!(d[1] < 4 * min_fwd.max(1 << 20), "forward looped? {d:?}");
    assert!(d[3] < 4 * min_fwd.max(1 << 20), "reverse looped? {d:?}");
    if superpackets {
        assert!(
            d[1] / d[0] > MTU,
            "expected GSO superpackets (average > MTU) forward: {d:?}"
        );
    }
}

#[test]
fn tun_with_offloads() {
    require_root();
    let (a, p, b) = (Netns::new(), Netns::new(), Netns::new());
    // The link first: the interfaces appear later, as in the mesh.
    let link = p
        .run(|| Link::spawn("nsm-in", "pto-test", Duration::from_secs(30)))
        .expect("link");
    let mut relay = Relay::new();
    let ta = a.run(|| open_tun("tun-a"));
    let (tpa, tpb) = p.run(|| (open_tun("nsm-in"), open_tun("pto-test")));
    let tb = b.run(|| open_tun("tun-b"));
    relay.pair(ta, tpa);
    relay.pair(tpb, tb);
    for (ns, dev, v4, v6) in [
        (&a, "tun-a", "192.0.2.1/24", "2001:db8::1/64"),
        (&b, "tun-b", "192.0.2.2/24", "2001:db8::2/64"),
    ] {
        ns.ip(&["addr", "add", v4, "dev", dev]);
        ns.ip(&["addr", "add", v6, "dev", dev, "nodad"]);
        ns.ip(&["link", "set", dev, "up"]);
    }
    p.ip(&["link", "set", "nsm-in", "up"]);
    p.ip(&["link", "set", "pto-test", "up"]);

    let c = link.counters().clone();
    let t0 = snapshot(&c);
    ping(&a, "192.0.2.2", 3);
    ping(&a, "2001:db8::2", 3);
    let t1 = snapshot(&c);
    check_growth(t0, t1, 3 * 84, 3 * 84, false);
    tcp_exchange(&a, &b, "192.0.2.2:5201".parse().expect("addr"));
    let t2 = snapshot(&c);
    check_growth(t1, t2, UP as u64, DOWN as u64, true);
    tcp_exchange(&a, &b, "[2001:db8::2]:5202".parse().expect("addr"));
    check_growth(t2, snapshot(&c), UP as u64, DOWN as u64, true);
    let c = link.stop();
    assert_eq!(c.dropped(), 0, "no drops on an idle host");
}

#[test]
fn veth_ethernet() {
    require_root();
    let (a, p, b) = (Netns::new(), Netns::new(), Netns::new());
    p.ip(&[
        "link", "add", "pa", "type", "veth", "peer", "name", "a0", "netns", &a.0,
    ]);
    p.ip(&[
        "link", "add", "pb", "type", "veth", "peer", "name", "b0", "netns", &b.0,
    ]);
    a.ip(&["addr", "add", "198.51.100.1/24", "dev", "a0"]);
    b.ip(&["addr", "add", "198.51.100.2/24", "dev", "b0"]);
    a.ip(&["link", "set", "a0", "up"]);
    b.ip(&["link", "set", "b0", "up"]);
    p.ip(&["link", "set", "pa", "up"]);
    p.ip(&["link", "set", "pb", "up"]);
    let link = p
        .run(|| Link::spawn("pa", "pb", Duration::from_secs(30)))
        .expect("link");
    let c = link.counters().clone();
    let t0 = snapshot(&c);
    ping(&a, "198.51.100.2", 3);
    let t1 = snapshot(&c);
    check_growth(t0, t1, 3 * 98, 3 * 98, false);
    tcp_exchange(&a, &b, "198.51.100.2:5201".parse().expect("addr"));
    check_growth(t1, snapshot(&c), UP as u64, DOWN as u64, true);
    drop(link);
}
