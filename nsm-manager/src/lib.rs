//! `nsm-manager`: the control plane of one node.
//!
//! Owns the NSM-compatible gRPC API (NetworkService Request/Close,
//! MonitorConnection, the two registries), endpoint selection, IPAM, the
//! connection table and its lifecycle (expiry, refresh, healing), and the
//! programming of the local forwarder over `nsm_proto::forwarder::v1`.
//!
//! It must never link `nsm-dataplane` or `nsm-forwarder`, nor enter a
//! network namespace or touch packets: the control plane and the hot path
//! meet only at the forwarder's gRPC API on a unix socket.
//!
//! Module map:
//! - [`server`]: assembly of one manager (listeners, services, tasks);
//! - [`manager`]: the connection engine (Request/Close, expiry, refresh,
//!   forwarder reconciliation, monitor events);
//! - [`metrics`]: `/metrics` (`--metrics-listen`): setup and heal latency,
//!   requests, connections, registry sizes;
//! - [`registry`]: the registries, local store or forwarding to the
//!   registry manager, with the endpoint URL rewrite;
//! - [`cluster`]: cluster mode's registry on the Kubernetes API (custom
//!   resources, watched into a cache, expired endpoints reaped);
//! - [`pods`]: cluster mode's pods of this node: the `nsm.manager.v1.Pods`
//!   API the CNI plugin calls, and annotation reconciliation;
//! - [`policies`]: the `--policies` file (chain policies), followed for changes;
//! - [`ipam`]: point-to-point address pairs, one owner per lab;
//! - [`select`]: NSM's match semantics for endpoint selection;
//! - [`forwarder`]: client and watcher of the local forwarder;
//! - [`netns`]: `inodeURL` parsing and resolution to a path;
//! - [`config`]: the registry manager's `--config` file;
//! - [`store`]: the durable tables under `--state-dir`;
//! - [`endpoint`]: the minimal NSE behind `nsm-endpoint`;
//! - [`util`]: ids, timestamps, dialing URLs;
//! - [`identity`]: the mesh CA, SPIFFE certificates, reloading them;
//! - [`tls`]: mTLS between managers (rustls);
//! - [`token`]: signed path segments (ES256 JWT) and their verification;
//! - [`authz`]: the authorization policy and registry ownership;
//! - [`fuzzing`]: entry points of the fuzz targets (and their corpus replay);
//! - [`inspect`]: `nsmctl`'s operator views (tables, JSON, `describe`) built
//!   from the manager's and the forwarder's public gRPC APIs;
//! - [`graph`]: the mesh as a picture: a plain model and a pure SVG/DOT renderer.

#![forbid(unsafe_code)]

pub mod authz;
pub mod cluster;
pub mod cluster_ipam;
pub mod config;
pub mod endpoint;
pub mod forwarder;
pub mod fuzzing;
pub mod graph;
pub use nsm_identity::identity;
pub mod inspect;
pub mod ipam;
pub mod manager;
pub mod metrics;
pub mod netns;
pub mod pods;
pub mod policies;
pub mod registry;
pub mod select;
pub mod server;
pub mod store;
pub use nsm_identity::tls;
pub mod token;
pub mod util;

/// Parses `k=v,k2=v2` (empty string = no labels).
///
/// # Errors
/// An item without `=` or with an empty key.
pub fn parse_labels(s: &str) -> Result<std::collections::HashMap<String, String>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .map(|i| match i.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("label `{i}` is not key=value")),
        })
        .collect()
}

/// Parses a duration like `600s`, `10m`, `1h` or `250ms` (a bare number is
/// seconds); zero is refused.
///
/// # Errors
/// A message naming the input.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 600s or 10m"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("`{s}`: unit must be ms, s, m or h")),
    }
    .ok_or_else(|| format!("`{s}` is too long"))?;
    if ms == 0 {
        return Err("the duration must be positive".into());
    }
    Ok(std::time::Duration::from_millis(ms))
}
