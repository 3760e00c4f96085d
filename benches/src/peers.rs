//! The userspace WireGuard implementations nsm-bench compares with: making
//! them available, and running a pair of them between the two pods.
//!
//! Installation is `scripts/ensure-bench-peers` (embedded here, so the
//! binary works from any directory): it caches each peer outside the
//! repository and is idempotent, and a peer it cannot get is reported as
//! unavailable rather than failing the benchmark.
//!
//! Topology: each peer runs *inside the pod namespaces* (`web` on node-1,
//! `echo` on node-2), creates its TUN there and sends its UDP over the pods'
//! primary network (pod bridge -> node -> underlay -> node -> pod bridge),
//! which is the path `veth` measures. The tunnel has 203.0.113.1 (client)
//! and 203.0.113.2 (server) /24, MTU 1420 (WireGuard's default for a 1500
//! underlay), keys and the peer set with `wg`. This is how a user would put a
//! userspace WireGuard between two workloads without a mesh.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nsm_testbed::Lab;

/// The installer, embedded so the harness needs no checkout at run time.
const ENSURE_SCRIPT: &str = include_str!("../../scripts/ensure-bench-peers");

/// Tunnel addresses of the client and the server end.
pub const TUNNEL_IPS: [&str; 2] = ["203.0.113.1", "203.0.113.2"];
/// Tunnel MTU for every peer.
pub const TUNNEL_MTU: u32 = 1420;
/// The UDP port each peer listens on (in its own pod).
const PORT: u16 = 51820;

/// A userspace WireGuard implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// wireguard-go 0.0.20220316 from Debian 12.
    WireguardGoDebian,
    /// wireguard-go 0.0.20231211 from bookworm-backports.
    WireguardGoBackports,
    /// boringtun-cli from crates.io.
    Boringtun,
    /// gotatun (gotatun-cli) from crates.io.
    Gotatun,
}

impl Peer {
    /// Every peer, in the order they are run.
    pub const ALL: [Peer; 4] = [
        Peer::WireguardGoDebian,
        Peer::WireguardGoBackports,
        Peer::Boringtun,
        Peer::Gotatun,
    ];

    /// The name on the command line, in the output and for the installer.
    pub fn name(self) -> &'static str {
        match self {
            Peer::WireguardGoDebian => "wireguard-go-debian",
            Peer::WireguardGoBackports => "wireguard-go-backports",
            Peer::Boringtun => "boringtun",
            Peer::Gotatun => "gotatun",
        }
    }

    /// The peer with this name.
    pub fn from_name(name: &str) -> Option<Peer> {
        Peer::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The command line that runs it in the foreground on `ifname`, with
    /// its defaults otherwise (the figures are what a user gets out of the
    /// box).
    fn argv(self, bin: &Path, ifname: &str) -> Vec<String> {
        let bin = bin.display().to_string();
        let s = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        match self {
            Peer::WireguardGoDebian | Peer::WireguardGoBackports => {
                vec![bin, "-f".into(), ifname.into()]
            }
            Peer::Boringtun => {
                let mut v = vec![bin];
                v.extend(s(&[
                    "-f",
                    "--disable-drop-privileges",
                    "-v",
                    "error",
                    ifname,
                ]));
                v
            }
            Peer::Gotatun => {
                let mut v = vec![bin];
                v.extend(s(&[
                    "-f",
                    "--disable-drop-privileges",
                    "-v",
                    "error",
                    ifname,
                ]));
                v
            }
        }
    }
}

/// Makes the named peers available (installing what is missing) and says,
/// per name, the binary or why it is unavailable.
pub fn ensure(peers: &[Peer]) -> BTreeMap<&'static str, Result<PathBuf, String>> {
    let mut out = BTreeMap::new();
    if peers.is_empty() {
        return out;
    }
    let names: Vec<&str> = peers.iter().map(|p| p.name()).collect();
    let child = Command::new("bash")
        .args(["-s", "--"])
        .args(&names)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    let result = child.and_then(|mut c| {
        if let Some(mut stdin) = c.stdin.take() {
            stdin.write_all(ENSURE_SCRIPT.as_bytes())?;
        }
        c.wait_with_output()
    });
    let text = match result {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => {
            for p in peers {
                out.insert(p.name(), Err(format!("running the installer: {e}")));
            }
            return out;
        }
    };
    for p in peers {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(p.name()));
        let r = match line.map(|l| l[p.name().len()..].trim()) {
            None => Err("the installer said nothing about it".to_string()),
            Some(rest) if rest.starts_with("unavailable:") => {
                Err(rest["unavailable:".len()..].trim().to_string())
            }
            Some(path) => Ok(PathBuf::from(path)),
        };
        out.insert(p.name(), r);
    }
    out
}

/// What a peer binary says its version is (first line of `--version`), or
/// the package file it came from for wireguard-go.
pub fn version(peer: Peer, bin: &Path) -> String {
    let from_cli = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            let t = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            t.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default();
    // The .deb file beside the unpacked tree names the exact Debian version.
    let deb = bin
        .ancestors()
        .nth(4)
        .and_then(|dir| fs::read_dir(dir).ok())
        .and_then(|mut it| {
            it.find_map(|e| {
                let n = e.ok()?.file_name().to_string_lossy().into_owned();
                n.ends_with(".deb").then_some(n)
            })
        });
    let v = match (peer, deb) {
        (Peer::WireguardGoDebian | Peer::WireguardGoBackports, Some(deb)) => deb,
        _ => from_cli,
    };
    format!("{} ({v})", bin.display())
}

/// A running pair of peers; stopping (or dropping) it kills both.
#[derive(Debug)]
pub struct PeerPair {
    children: Vec<Child>,
    ifnames: [String; 2],
}

impl PeerPair {
    /// The processes doing the work (for CPU accounting).
    pub fn pids(&self) -> Vec<i32> {
        self.children
            .iter()
            .filter_map(|c| i32::try_from(c.id()).ok())
            .collect()
    }

    /// Stops both ends and waits for them.
    pub fn stop(mut self) {
        self.kill_all();
    }

    fn kill_all(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        // A killed wireguard-go leaves its UAPI socket; the next start on the
        // same name would find it stale.
        for n in &self.ifnames {
            let _ = fs::remove_file(uapi_socket(n));
        }
    }
}

impl Drop for PeerPair {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The UAPI socket of an interface. It lives in the host's file system,
/// shared by every namespace, which is why the two ends (and concurrent
/// benchmarks) need distinct interface names.
fn uapi_socket(ifname: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"))
}

fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{what}: {}{}",
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn keypair() -> Result<(String, String), String> {
    let private = run(Command::new("wg").arg("genkey"), "wg genkey")?;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("wg pubkey: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(private.as_bytes())
            .map_err(|e| format!("wg pubkey: {e}"))?;
    }
    let o = child
        .wait_with_output()
        .map_err(|e| format!("wg pubkey: {e}"))?;
    Ok((
        private,
        String::from_utf8_lossy(&o.stdout).trim().to_string(),
    ))
}

/// Starts `peer` in `members[0]` (client) and `members[1]` (server), whose
/// primary addresses are `primary`, configures both with `wg`, and returns
/// once a ping crosses the tunnel (so the handshake is not measured).
/// `tag` keeps interface names unique on the host; `work` holds keys and logs.
pub fn start_pair(
    lab: &Lab,
    peer: Peer,
    bin: &Path,
    members: [&str; 2],
    primary: [String; 2],
    tag: &str,
    work: &Path,
) -> Result<PeerPair, String> {
    let ifnames = [format!("nb{tag}a"), format!("nb{tag}b")];
    let mut pair = PeerPair {
        children: Vec::new(),
        ifnames: ifnames.clone(),
    };
    let keys = [keypair()?, keypair()?];
    for end in 0..2 {
        let ifname = &ifnames[end];
        let _ = fs::remove_file(uapi_socket(ifname));
        let log_path = work.join(format!("{}-{}.log", peer.name(), members[end]));
        let log =
            fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = lab
            .command(members[end], &peer.argv(bin, ifname))
            .map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", peer.name()))?;
        pair.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !uapi_socket(ifname).exists() {
            let exited = pair.children[end].try_wait().ok().flatten();
            if let Some(status) = exited {
                let text = fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!(
                    "{} exited ({status}) before creating {ifname}: {}",
                    peer.name(),
                    text.trim()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} made no UAPI socket for {ifname} in 10 s",
                    peer.name()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let key_path = work.join(format!("{ifname}.key"));
        fs::write(&key_path, &keys[end].0).map_err(|e| format!("{}: {e}", key_path.display()))?;
        let other = 1 - end;
        let port = PORT.to_string();
        let allowed = format!("{}/32", TUNNEL_IPS[other]);
        let endpoint = format!("{}:{PORT}", primary[other]);
        let key_arg = key_path.display().to_string();
        let wg_set = [
            "wg",
            "set",
            ifname,
            "private-key",
            &key_arg,
            "listen-port",
            &port,
            "peer",
            &keys[other].1,
            "allowed-ips",
            &allowed,
            "endpoint",
            &endpoint,
        ];
        let addr = format!("{}/24", TUNNEL_IPS[end]);
        let mtu = TUNNEL_MTU.to_string();
        for argv in [
            &wg_set[..],
            &["ip", "addr", "add", &addr, "dev", ifname],
            &["ip", "link", "set", ifname, "mtu", &mtu, "up"],
        ] {
            let mut cmd = lab.command(members[end], argv).map_err(|e| e.to_string())?;
            run(&mut cmd, &argv.join(" "))?;
        }
    }
    // The first packet triggers the handshake; wait until one crosses.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut cmd = lab
            .command(members[0], &["ping", "-c", "1", "-W", "1", TUNNEL_IPS[1]])
            .map_err(|e| e.to_string())?;
        if run(&mut cmd, "ping").is_ok() {
            return Ok(pair);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{}: no ping across the tunnel in 10 s",
                peer.name()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Peer::ALL {
            assert_eq!(Peer::from_name(p.name()), Some(p));
        }
        assert_eq!(Peer::from_name("veth"), None);
    }

    #[test]
    fn interface_names_fit() {
        // nb + a 5-digit tag + a/b must fit IFNAMSIZ - 1.
        assert!(format!("nb{}a", 99_999).len() <= 15);
    }
}
