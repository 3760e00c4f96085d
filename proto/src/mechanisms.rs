//! Names that give meaning to [`Mechanism`](crate::connection::Mechanism)
//! fields, as NSM spells them (networkservicemesh/api,
//! `pkg/api/networkservice/mechanisms/...` and `payload`).
//!
//! `Mechanism.parameters` is a string map, so a misspelt key is not a
//! compile error but a silent interoperability bug with NSM's Go components.
//! Every crate uses these constants instead of string literals.

/// `Mechanism.cls` values.
pub mod cls {
    /// Between a pod (client or endpoint) and the forwarder of its node.
    pub const LOCAL: &str = "LOCAL";
    /// Between two forwarders, usually on different nodes.
    pub const REMOTE: &str = "REMOTE";
}

/// `Connection.payload` and `NetworkService.payload` values.
pub mod payload {
    /// IP packets (a TUN device on the pod side).
    pub const IP: &str = "IP";
    /// Ethernet frames (a TAP device on the pod side).
    pub const ETHERNET: &str = "ETHERNET";
}

/// `Mechanism.type` of a kernel interface in the pod (`cls` LOCAL).
pub const KERNEL: &str = "KERNEL";
/// `Mechanism.type` of a WireGuard tunnel between forwarders (`cls` REMOTE).
pub const WIREGUARD: &str = "WIREGUARD";
/// `Mechanism.type` of a VXLAN tunnel between forwarders (`cls` REMOTE,
/// ETHERNET payload). Listed so that we recognise it in NSM peers'
/// preferences; nsm-rs does not offer it.
pub const VXLAN: &str = "VXLAN";

/// Parameter keys of the KERNEL mechanism.
pub mod kernel {
    /// Interface name inside the pod's namespace, at most
    /// [`IFNAME_MAX_LEN`] bytes.
    pub const NAME: &str = "name";
    /// The pod's network namespace as a URL: `file:///proc/PID/ns/net`, or
    /// `inode://DEV/INO` when the file descriptor is passed over the socket.
    pub const INODE_URL: &str = "inodeURL";
    /// Inode number of the pod's network namespace, in decimal.
    pub const NETNS_INODE: &str = "netnsInode";
    /// Linux limit on interface names (IFNAMSIZ - 1), in bytes.
    pub const IFNAME_MAX_LEN: usize = 15;

    /// The KERNEL mechanism preference an NSM client sends: a LOCAL
    /// mechanism naming the interface and the namespace (as
    /// `file://PATH`) it should appear in.
    pub fn local(ifname: &str, netns_path: &std::path::Path) -> crate::connection::Mechanism {
        crate::connection::Mechanism {
            cls: super::cls::LOCAL.to_string(),
            r#type: super::KERNEL.to_string(),
            parameters: [
                (NAME.to_string(), ifname.to_string()),
                (
                    INODE_URL.to_string(),
                    format!("file://{}", netns_path.display()),
                ),
            ]
            .into(),
        }
    }
}

/// Parameter keys of the WIREGUARD mechanism. "src" is the client's side
/// of the connection, "dst" the endpoint's; each forwarder fills its own
/// side while the request passes through it.
pub mod wireguard {
    /// Underlay IP of the client-side forwarder.
    pub const SRC_IP: &str = "src_ip";
    /// Underlay IP of the endpoint-side forwarder.
    pub const DST_IP: &str = "dst_ip";
    /// WireGuard UDP port of the client-side forwarder, in decimal.
    pub const SRC_PORT: &str = "src_port";
    /// WireGuard UDP port of the endpoint-side forwarder, in decimal.
    pub const DST_PORT: &str = "dst_port";
    /// Client-side public key, base64.
    pub const SRC_PUBLIC_KEY: &str = "src_public_key";
    /// Endpoint-side public key, base64.
    pub const DST_PUBLIC_KEY: &str = "dst_public_key";
    /// MTU of the tunnelled connection, in bytes, in decimal.
    pub const MTU: &str = "MTU";
    /// WireGuard ports of the client-side forwarder's lanes, lane 0 first,
    /// comma-separated decimal ("51820,51821"); absent means one lane. An
    /// nsm-rs extension: NSM's own forwarders neither set nor read it, and
    /// a connection with one of them keeps one lane.
    pub const SRC_LANE_PORTS: &str = "src_lane_ports";
    /// As [`SRC_LANE_PORTS`], of the endpoint-side forwarder.
    pub const DST_LANE_PORTS: &str = "dst_lane_ports";

    /// UDP port a WireGuard forwarder listens on unless configured otherwise
    /// (the port NSM and wg-quick use).
    pub const DEFAULT_PORT: u16 = 51820;
    /// Bytes WireGuard adds to each packet over an IPv4 underlay: IPv4 (20) +
    /// UDP (8) + WireGuard data header (16) + Poly1305 tag (16).
    pub const OVERHEAD_IPV4: u32 = 60;
    /// Bytes WireGuard adds to each packet over an IPv6 underlay: as
    /// [`OVERHEAD_IPV4`] with a 40-byte IPv6 header.
    pub const OVERHEAD_IPV6: u32 = 80;

    /// Lane ports as [`SRC_LANE_PORTS`] carries them.
    pub fn format_lane_ports(ports: &[u32]) -> String {
        ports
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Lanes a connection may have at most (a forwarder runs at most 64
    /// packet threads).
    pub const MAX_LANES: usize = 64;

    /// Reads a [`SRC_LANE_PORTS`] value of a peer whose lane 0 is `port`
    /// (its `src_port`/`dst_port`). A value that is not a list of distinct
    /// ports (1..=65535) starting with `port`, at most [`MAX_LANES`] long,
    /// reads as no list, that is one lane: a peer that garbles it loses the
    /// extra lanes, not the connection.
    pub fn parse_lane_ports(value: &str, port: u32) -> Vec<u32> {
        let ports: Option<Vec<u32>> = value
            .split(',')
            .map(|p| {
                p.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .map(u32::from)
            })
            .collect();
        let ports = ports.unwrap_or_default();
        let distinct = ports
            .iter()
            .enumerate()
            .all(|(i, p)| !ports[..i].contains(p));
        if ports.first() == Some(&port) && ports.len() <= MAX_LANES && distinct {
            ports
        } else {
            Vec::new()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn lane_ports_round_trip_and_garbage_means_one_lane() {
            let ports = [51820, 51821, 60000];
            assert_eq!(format_lane_ports(&ports), "51820,51821,60000");
            assert_eq!(parse_lane_ports(&format_lane_ports(&ports), 51820), ports);
            assert_eq!(parse_lane_ports("51820", 51820), [51820]);
            let many = format_lane_ports(&(1000..1065).collect::<Vec<_>>());
            for bad in [
                "",
                "51820,",
                "x",
                "51820,70000",
                "0",
                "51820;51821",
                "-1",
                "51821,51820",
                "51820,51821,51821",
            ] {
                assert!(parse_lane_ports(bad, 51820).is_empty(), "{bad:?}");
            }
            assert!(parse_lane_ports(&many, 1000).is_empty(), "65 lanes");
        }
    }
}

/// Parameter keys of the VXLAN mechanism, for reading NSM peers' requests.
pub mod vxlan {
    /// Underlay IP of the client-side forwarder.
    pub const SRC_IP: &str = "src_ip";
    /// Underlay IP of the endpoint-side forwarder.
    pub const DST_IP: &str = "dst_ip";
    /// VXLAN network identifier, in decimal.
    pub const VNI: &str = "vni";
}
