//! The messages of a passthrough, built without I/O: the onward request it
//! sends to its manager for an incoming connection, and the reply to the
//! incoming request.
//!
//! # The onward request
//! A passthrough is a client of the network service named in the incoming
//! connection `C` (the client's original service; the passthrough itself
//! registers for a function service). Its request carries `C` on, so that
//! the manager selects the next endpoint with the same service, labels and
//! payload (and can tell from the path that this leg continues `C`), and so
//! that the addresses the mesh gave `C` (`context.ip_context`) reach the
//! final endpoint unchanged: the client and the final endpoint talk to each
//! other through us with their own addresses. What changes:
//! - our path segment follows the caller's in `C`'s path (anything after
//!   the caller's is dropped; name = our NSE name, id =
//!   a uuid we keep per incoming connection, `expires` of the segment
//!   before ours, no token) and `path.index` points at it; as in NSM, the
//!   connection id of a request is the id of the requester's segment;
//! - the mechanism and endpoint name are cleared (they described the
//!   incoming leg, the manager picks the onward ones);
//! - the only mechanism preference is a KERNEL interface in our namespace,
//!   named `pto-` + 8 hex digits of a hash of `C.id`, so that it fits
//!   `IFNAMSIZ` and differs per incoming connection.
//!
//! A refresh re-sends the onward connection as the manager last returned it
//! ([`refresh_request`]): same id, same path, same segments, only with the
//! refreshed tokens and expiries of the incoming connection carried on.

use nsm_proto::connection::{Connection, Mechanism, Path, PathSegment, State};
use nsm_proto::mechanisms::{self, cls, kernel};
use nsm_proto::networkservice::NetworkServiceRequest;

/// Prefix of the onward interface names.
pub const ONWARD_IF_PREFIX: &str = "pto-";

/// The onward interface name for incoming connection `incoming_id`:
/// `pto-` and 8 hex digits of a 32-bit FNV-1a hash of the id (and of
/// `salt`, to pick another name on a collision). Always 12 bytes.
pub fn onward_ifname(incoming_id: &str, salt: u32) -> String {
    let mut h: u32 = 0x811c_9dc5;
    let salt = salt.to_le_bytes();
    let salt = if salt == [0; 4] { &[][..] } else { &salt[..] };
    for b in incoming_id.as_bytes().iter().chain(salt) {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{ONWARD_IF_PREFIX}{h:08x}")
}

/// The KERNEL preference of an incoming request and the interface name it
/// asks for.
///
/// # Errors
/// A message for the client: no KERNEL preference, or no valid `name`.
pub fn incoming_kernel(req: &NetworkServiceRequest) -> Result<(&Mechanism, &str), String> {
    let pref = req
        .mechanism_preferences
        .iter()
        .find(|m| m.r#type == mechanisms::KERNEL)
        .ok_or("a passthrough offers only the KERNEL mechanism")?;
    let name = pref
        .parameters
        .get(kernel::NAME)
        .map(String::as_str)
        .unwrap_or_default();
    if name.is_empty() || name.len() > kernel::IFNAME_MAX_LEN || name.contains(['/', '\0']) {
        return Err(format!(
            "the KERNEL preference needs a `{}` parameter of 1 to {} bytes (got `{name}`)",
            kernel::NAME,
            kernel::IFNAME_MAX_LEN
        ));
    }
    Ok((pref, name))
}

/// The only mechanism preference of onward requests.
pub fn onward_preference(onward_if: &str, inode_url: &str) -> Mechanism {
    Mechanism {
        cls: cls::LOCAL.to_string(),
        r#type: mechanisms::KERNEL.to_string(),
        parameters: [
            (kernel::NAME.to_string(), onward_if.to_string()),
            (kernel::INODE_URL.to_string(), inode_url.to_string()),
        ]
        .into(),
    }
}

/// The first onward request for `incoming` (see the module doc).
/// `segment_id` becomes the onward connection's id.
pub fn onward_request(
    incoming: &Connection,
    nse_name: &str,
    segment_id: &str,
    onward_if: &str,
    inode_url: &str,
) -> NetworkServiceRequest {
    let mut conn = incoming.clone();
    let mut path = conn.path.take().unwrap_or_default();
    // Ours goes right after the caller's segment (`path.index`), as NSM's
    // updatepath puts a new hop: segments past it are a former route's (a
    // manager re-routing a connection to us keeps the path it had), and
    // would sit between the caller and us, unsigned and unvouched for.
    let keep = usize::try_from(path.index)
        .map_or(usize::MAX, |i| i.saturating_add(1))
        .min(path.path_segments.len());
    path.path_segments.truncate(keep);
    let expires = path.path_segments.last().and_then(|s| s.expires);
    path.path_segments.push(PathSegment {
        name: nse_name.to_string(),
        id: segment_id.to_string(),
        token: String::new(),
        expires,
        ..Default::default()
    });
    path.index = u32::try_from(path.path_segments.len() - 1).unwrap_or(u32::MAX);
    conn.path = Some(path);
    conn.id = segment_id.to_string();
    conn.mechanism = None;
    conn.network_service_endpoint_name.clear();
    NetworkServiceRequest {
        connection: Some(conn),
        mechanism_preferences: vec![onward_preference(onward_if, inode_url)],
    }
}

/// The onward request of a refresh: the onward connection as the manager
/// last returned it (same id, same path, same segments), with the same
/// preference as the first time, and with the lifetimes of the refreshed
/// incoming connection `incoming` carried on:
/// - the segments before ours are replaced by `incoming`'s when they are
///   the same hops (same names and ids), so that their refreshed tokens and
///   expiries travel on;
/// - our segment's `expires` becomes that of `incoming`'s last segment, as
///   in the first request. Managers cap a connection's lifetime at the
///   previous hop's expiry, so without this the onward connection would
///   expire at the first request's time however often it is refreshed.
pub fn refresh_request(
    last: &Connection,
    incoming: &Connection,
    onward_if: &str,
    inode_url: &str,
) -> NetworkServiceRequest {
    let mut conn = last.clone();
    if let (Some(path), Some(fresh)) = (conn.path.as_mut(), incoming.path.as_ref()) {
        let ours = fresh.path_segments.len();
        let same_hops = path.path_segments.len() > ours
            && path.path_segments[..ours]
                .iter()
                .zip(&fresh.path_segments)
                .all(|(a, b)| a.name == b.name && a.id == b.id);
        if same_hops {
            path.path_segments[..ours].clone_from_slice(&fresh.path_segments);
        }
        let expires = fresh.path_segments.last().and_then(|s| s.expires);
        let index = usize::try_from(path.index).unwrap_or(usize::MAX);
        if let Some(seg) = path.path_segments.get_mut(index)
            && expires.is_some()
        {
            seg.expires = expires;
        }
    }
    NetworkServiceRequest {
        connection: Some(conn),
        mechanism_preferences: vec![onward_preference(onward_if, inode_url)],
    }
}

/// The reply to an incoming request, as `nsm-endpoint` answers: the KERNEL
/// preference's parameters (keeping `name`) with our `inodeURL`, our NSE
/// name, state UP.
pub fn reply(
    mut incoming: Connection,
    pref: &Mechanism,
    nse_name: &str,
    inode_url: &str,
) -> Connection {
    let mut parameters = pref.parameters.clone();
    parameters.insert(kernel::INODE_URL.to_string(), inode_url.to_string());
    incoming.mechanism = Some(Mechanism {
        cls: cls::LOCAL.to_string(),
        r#type: mechanisms::KERNEL.to_string(),
        parameters,
    });
    incoming.network_service_endpoint_name = nse_name.to_string();
    incoming.state = State::Up as i32;
    incoming
}

/// The id of our segment in an onward connection `conn` (its `path.index`
/// segment), if any.
pub fn own_segment(conn: &Connection) -> Option<&PathSegment> {
    let path: &Path = conn.path.as_ref()?;
    path.path_segments.get(usize::try_from(path.index).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_proto::connectioncontext::{ConnectionContext, IpContext};

    fn incoming() -> Connection {
        Connection {
            id: "seg-mgr".into(),
            network_service: "secure".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            context: Some(ConnectionContext {
                ip_context: Some(IpContext {
                    src_ip_addrs: vec!["172.16.0.0/32".into()],
                    dst_ip_addrs: vec!["172.16.0.1/32".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            payload: "IP".into(),
            path: Some(Path {
                index: 1,
                path_segments: vec![
                    PathSegment {
                        name: "client".into(),
                        id: "seg-client".into(),
                        token: "t0".into(),
                        expires: Some(prost_types::Timestamp {
                            seconds: 100,
                            nanos: 0,
                        }),
                        ..Default::default()
                    },
                    PathSegment {
                        name: "node-1".into(),
                        id: "seg-mgr".into(),
                        token: "t1".into(),
                        expires: Some(prost_types::Timestamp {
                            seconds: 200,
                            nanos: 0,
                        }),
                        ..Default::default()
                    },
                ],
            }),
            mechanism: Some(onward_preference("nsm-1", "file:///proc/1/ns/net")),
            network_service_endpoint_name: "pt-1".into(),
            state: State::Up as i32,
        }
    }

    #[test]
    fn onward_request_appends_our_segment_and_keeps_the_context() {
        let c = incoming();
        let r = onward_request(
            &c,
            "pt-1",
            "seg-pt",
            "pto-12345678",
            "file:///proc/7/ns/net",
        );
        let o = r.connection.expect("connection");
        assert_eq!(o.id, "seg-pt");
        assert_eq!(o.network_service, c.network_service);
        assert_eq!(o.labels, c.labels);
        assert_eq!(
            o.context, c.context,
            "addresses must reach the endpoint unchanged"
        );
        assert_eq!(o.payload, c.payload);
        assert!(o.mechanism.is_none());
        assert!(o.network_service_endpoint_name.is_empty());
        let path = o.path.as_ref().expect("path");
        assert_eq!(path.path_segments.len(), 3);
        assert_eq!(
            path.path_segments[..2],
            c.path.as_ref().expect("path").path_segments[..]
        );
        assert_eq!(path.index, 2);
        let seg = own_segment(&o).expect("own segment");
        assert_eq!(seg.name, "pt-1");
        assert_eq!(seg.id, "seg-pt");
        assert!(seg.token.is_empty());
        assert_eq!(seg.expires, path.path_segments[1].expires);
        assert_eq!(r.mechanism_preferences.len(), 1);
        let m = &r.mechanism_preferences[0];
        assert_eq!(
            (m.cls.as_str(), m.r#type.as_str()),
            (cls::LOCAL, mechanisms::KERNEL)
        );
        assert_eq!(m.parameters[kernel::NAME], "pto-12345678");
        assert_eq!(m.parameters[kernel::INODE_URL], "file:///proc/7/ns/net");
    }

    /// A connection the manager re-routed to us still carries the former
    /// route's segments after the manager's own: ours replaces them.
    #[test]
    fn onward_request_drops_a_former_route_after_the_caller() {
        let mut c = incoming();
        let path = c.path.as_mut().expect("path");
        for (name, id) in [("node-2", "seg-old"), ("pt-2", "seg-old-pt")] {
            path.path_segments.push(PathSegment {
                name: name.into(),
                id: id.into(),
                ..Default::default()
            });
        }
        let o = onward_request(&c, "pt-1", "seg-pt", "pto-1", "file:///x")
            .connection
            .expect("connection");
        let path = o.path.expect("path");
        let names: Vec<&str> = path.path_segments.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["client", "node-1", "pt-1"]);
        assert_eq!(path.index, 2);
        assert_eq!(path.path_segments[2].expires, path.path_segments[1].expires);
    }

    #[test]
    fn onward_request_without_a_path_starts_one() {
        let mut c = incoming();
        c.path = None;
        let o = onward_request(&c, "pt-1", "seg-pt", "pto-1", "file:///x")
            .connection
            .expect("connection");
        let path = o.path.expect("path");
        assert_eq!(path.index, 0);
        assert_eq!(path.path_segments.len(), 1);
        assert_eq!(path.path_segments[0].id, "seg-pt");
    }

    #[test]
    fn refresh_resends_the_returned_connection_with_fresh_lifetimes() {
        let c = incoming();
        let mut returned = onward_request(&c, "pt-1", "seg-pt", "pto-1", "file:///x")
            .connection
            .expect("connection");
        returned.network_service_endpoint_name = "final".into();
        returned.state = State::Up as i32;
        // The manager added its own segment after ours.
        let p = returned.path.as_mut().expect("path");
        p.path_segments.push(PathSegment {
            name: "node-1".into(),
            id: "seg-onward".into(),
            ..Default::default()
        });
        // Unchanged incoming connection: the request is the returned one.
        let r = refresh_request(&returned, &c, "pto-1", "file:///x");
        assert_eq!(r.connection.as_ref(), Some(&returned));
        assert_eq!(r.mechanism_preferences[0].parameters[kernel::NAME], "pto-1");
        // A refreshed incoming connection: new token and expiry upstream.
        let mut c2 = c.clone();
        let last = c2
            .path
            .as_mut()
            .expect("path")
            .path_segments
            .last_mut()
            .expect("seg");
        last.token = "t1-new".into();
        last.expires = Some(prost_types::Timestamp {
            seconds: 900,
            nanos: 0,
        });
        let o = refresh_request(&returned, &c2, "pto-1", "file:///x")
            .connection
            .expect("connection");
        assert_eq!(o.id, "seg-pt");
        let segs = &o.path.as_ref().expect("path").path_segments;
        assert_eq!(segs.len(), 4);
        assert_eq!(segs[1].token, "t1-new");
        assert_eq!(segs[2].id, "seg-pt");
        assert_eq!(segs[2].expires.map(|t| t.seconds), Some(900));
        assert_eq!(segs[3].id, "seg-onward");
        assert_eq!(o.path.as_ref().expect("path").index, 2);
        assert_eq!(o.network_service_endpoint_name, "final");
    }

    #[test]
    fn ifnames_fit_and_differ() {
        let a = onward_ifname("0b3f6a2e-1c1e-4a57-9d6f-3f2b1e0c9a11", 0);
        let b = onward_ifname("0b3f6a2e-1c1e-4a57-9d6f-3f2b1e0c9a12", 0);
        assert!(a.len() <= kernel::IFNAME_MAX_LEN && a.starts_with(ONWARD_IF_PREFIX));
        assert_eq!(a.len(), 12);
        assert_ne!(a, b);
        assert_eq!(a, onward_ifname("0b3f6a2e-1c1e-4a57-9d6f-3f2b1e0c9a11", 0));
        assert_ne!(a, onward_ifname("0b3f6a2e-1c1e-4a57-9d6f-3f2b1e0c9a11", 1));
        let long = "x".repeat(10_000);
        assert_eq!(onward_ifname(&long, 7).len(), 12);
    }

    #[test]
    fn reply_is_the_kernel_mechanism_in_our_namespace() {
        let c = incoming();
        let req = NetworkServiceRequest {
            connection: Some(c.clone()),
            mechanism_preferences: vec![onward_preference("nsm-in", "file:///proc/1/ns/net")],
        };
        let (pref, name) = incoming_kernel(&req).expect("kernel preference");
        assert_eq!(name, "nsm-in");
        let r = reply(c, pref, "pt-1", "file:///proc/9/ns/net");
        let m = r.mechanism.expect("mechanism");
        assert_eq!(m.parameters[kernel::NAME], "nsm-in");
        assert_eq!(m.parameters[kernel::INODE_URL], "file:///proc/9/ns/net");
        assert_eq!(r.network_service_endpoint_name, "pt-1");
        assert_eq!(r.state, State::Up as i32);
    }

    #[test]
    fn incoming_needs_a_kernel_name() {
        let mut req = NetworkServiceRequest::default();
        assert!(incoming_kernel(&req).is_err());
        req.mechanism_preferences = vec![onward_preference("", "file:///x")];
        assert!(incoming_kernel(&req).is_err());
        req.mechanism_preferences = vec![onward_preference("sixteen-bytes-xx", "file:///x")];
        assert!(incoming_kernel(&req).is_err());
    }
}
