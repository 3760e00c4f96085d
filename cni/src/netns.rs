//! Looking inside a pod's namespace: does an interface have the addresses
//! and routes of its connection?
//!
//! Uses `nsenter` and `ip -j` (util-linux and iproute2 are on every node):
//! CHECK and ADD's final check are rare, and the commands are the same a
//! person would run to see what the plugin sees.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use ipnet::IpNet;
use nsm_proto::connection::Connection;
use serde_json::Value;

/// What an interface in a namespace looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceState {
    /// Whether it is administratively up.
    pub up: bool,
    /// Its addresses.
    pub addrs: Vec<IpNet>,
    /// Destinations routed through it.
    pub routes: Vec<IpNet>,
}

fn ip_json(netns: &Path, args: &[&str]) -> Result<Option<Value>, String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "-j"])
        .args(args)
        .output()
        .map_err(|e| format!("nsenter: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("does not exist") || err.contains("Cannot find device") {
            return Ok(None);
        }
        return Err(format!("ip {}: {}", args.join(" "), err.trim()));
    }
    serde_json::from_slice(&out.stdout)
        .map(Some)
        .map_err(|e| format!("ip -j output: {e}"))
}

/// The state of `ifname` in `netns`, or `None` when it does not exist.
pub fn inspect(netns: &Path, ifname: &str) -> Result<Option<IfaceState>, String> {
    let Some(addr) = ip_json(netns, &["addr", "show", "dev", ifname])? else {
        return Ok(None);
    };
    let link = addr.get(0).cloned().unwrap_or(Value::Null);
    let up = link["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "UP"));
    let addrs = link["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| {
                    let ip: IpAddr = i["local"].as_str()?.parse().ok()?;
                    IpNet::new(ip, u8::try_from(i["prefixlen"].as_u64()?).ok()?).ok()
                })
                .collect()
        })
        .unwrap_or_default();
    let mut routes = Vec::new();
    for family in ["-4", "-6"] {
        let Some(list) = ip_json(netns, &[family, "route", "show", "dev", ifname])? else {
            continue;
        };
        for r in list.as_array().into_iter().flatten() {
            if let Some(net) = r["dst"].as_str().and_then(parse_dst) {
                routes.push(net);
            }
        }
    }
    Ok(Some(IfaceState { up, addrs, routes }))
}

/// `ip -j route` prints host routes without a prefix length.
fn parse_dst(dst: &str) -> Option<IpNet> {
    dst.parse::<IpNet>()
        .ok()
        .or_else(|| dst.parse::<IpAddr>().ok().map(IpNet::from))
}

impl IfaceState {
    /// What differs from the connection's context, if anything.
    pub fn mismatch(&self, conn: &Connection) -> Option<String> {
        if !self.up {
            return Some("interface is down".to_string());
        }
        let ip = conn.context.as_ref().and_then(|c| c.ip_context.as_ref())?;
        for a in &ip.src_ip_addrs {
            let Some(want) = parse_dst(a) else { continue };
            if !self.addrs.iter().any(|have| have.addr() == want.addr()) {
                return Some(format!("address {a} is missing"));
            }
        }
        for r in &ip.src_routes {
            let Some(want) = parse_dst(&r.prefix) else {
                continue;
            };
            if !self.routes.contains(&want) {
                return Some(format!("route to {} is missing", r.prefix));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_routes_parse() {
        assert_eq!(
            parse_dst("172.31.0.0"),
            Some("172.31.0.0/32".parse().unwrap())
        );
        assert_eq!(parse_dst("fd00::1"), Some("fd00::1/128".parse().unwrap()));
        assert_eq!(
            parse_dst("10.0.0.0/24"),
            Some("10.0.0.0/24".parse().unwrap())
        );
        assert_eq!(parse_dst("default"), None);
    }
}
