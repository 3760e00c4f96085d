//! NSM's connection-request annotation: `networkservicemesh.io`.
//!
//! The value is a comma-separated list of URLs,
//! `kernel://SERVICE[@DOMAIN]/IFNAME?label=value&...`: the scheme upper-cased
//! is the mechanism, the last path segment is the interface name in the pod,
//! and the query parameters are the request's labels.

use std::collections::BTreeMap;

/// The annotation key NSM uses for connection requests.
pub const KEY: &str = "networkservicemesh.io";

use crate::mechanisms::kernel::IFNAME_MAX_LEN;

/// One connection request from the annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionRequest {
    /// The mechanism, upper-cased (`KERNEL`).
    pub mechanism: String,
    /// The network service name.
    pub service: String,
    /// The interdomain suffix after `@`, if any.
    pub domain: Option<String>,
    /// The interface name in the pod, if given.
    pub interface: Option<String>,
    /// Labels sent with the request.
    pub labels: BTreeMap<String, String>,
}

/// Why an annotation value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    /// A URL has no `scheme://`.
    #[error("`{0}` has no mechanism scheme (expected e.g. kernel://SERVICE/IFNAME)")]
    NoScheme(String),
    /// A URL names no service.
    #[error("`{0}` names no network service")]
    NoService(String),
    /// The interface name does not fit the kernel's limit or alphabet.
    #[error("interface name `{0}` is longer than 15 characters or has '/', ' ' or ':'")]
    BadInterface(String),
    /// A query parameter is not `key=value`.
    #[error("label `{0}` is not key=value")]
    BadLabel(String),
    /// More path segments than SERVICE/IFNAME.
    #[error("`{0}` has extra path segments (expected SERVICE/IFNAME)")]
    ExtraPath(String),
}

/// Parses an annotation value. Empty items (`a,,b`, trailing commas) are skipped.
pub fn parse(value: &str) -> Result<Vec<ConnectionRequest>, AnnotationError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_one)
        .collect()
}

fn parse_one(url: &str) -> Result<ConnectionRequest, AnnotationError> {
    let (scheme, rest) = url
        .split_once("://")
        .filter(|(s, _)| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric()))
        .ok_or_else(|| AnnotationError::NoScheme(url.to_string()))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut segments = path.split('/');
    let authority = segments.next().unwrap_or_default();
    let interface = segments
        .next()
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    if segments.any(|s| !s.is_empty()) {
        return Err(AnnotationError::ExtraPath(url.to_string()));
    }
    let (service, domain) = match authority.split_once('@') {
        Some((s, d)) => (s, Some(d.to_string())),
        None => (authority, None),
    };
    if service.is_empty() {
        return Err(AnnotationError::NoService(url.to_string()));
    }
    if let Some(name) = &interface
        && !valid_ifname(name)
    {
        return Err(AnnotationError::BadInterface(name.clone()));
    }
    let mut labels = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| AnnotationError::BadLabel(pair.to_string()))?;
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(ConnectionRequest {
        mechanism: scheme.to_ascii_uppercase(),
        service: service.to_string(),
        domain,
        interface,
        labels,
    })
}

/// The kernel accepts any bytes but '/', whitespace and ':' (alias syntax) up to 15.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsm_example() {
        let r = parse("kernel://secure-net/nsm-1?app=web").unwrap();
        assert_eq!(
            r,
            vec![ConnectionRequest {
                mechanism: "KERNEL".into(),
                service: "secure-net".into(),
                domain: None,
                interface: Some("nsm-1".into()),
                labels: [("app".to_string(), "web".to_string())].into(),
            }]
        );
    }

    #[test]
    fn several_with_domain_and_no_ifname() {
        let r = parse("kernel://a@cluster-2/nsm-1, kernel://b?x=1&y=2,").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].domain.as_deref(), Some("cluster-2"));
        assert_eq!(r[1].interface, None);
        assert_eq!(r[1].labels.len(), 2);
    }

    #[test]
    fn rejects() {
        assert!(matches!(
            parse("secure-net/nsm-1"),
            Err(AnnotationError::NoScheme(_))
        ));
        assert!(matches!(
            parse("kernel:///nsm-1"),
            Err(AnnotationError::NoService(_))
        ));
        assert!(matches!(
            parse("kernel://s/0123456789abcdef"),
            Err(AnnotationError::BadInterface(_))
        ));
        assert!(matches!(
            parse("kernel://s/i?app"),
            Err(AnnotationError::BadLabel(_))
        ));
        assert!(matches!(
            parse("kernel://s/i/j"),
            Err(AnnotationError::ExtraPath(_))
        ));
    }
}
