//! The registry manager's `--config` file: network services and their
//! address pools.
//!
//! Parsing is strict (`deny_unknown_fields`) because a misspelt key in a pool
//! definition would otherwise silently give a service no addresses. Every
//! error is one line that names the place (file, key path or service), so
//! that the binary can print it and exit 2.

use std::collections::BTreeSet;
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML does not match the schema (the message names the key and line).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// serde's message, with the location.
        message: String,
    },
    /// The YAML parses but a value is unusable.
    #[error("{path}: services[{index}] ({service}): {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Index of the offending service.
        index: usize,
        /// Its name.
        service: String,
        /// What is wrong.
        reason: String,
    },
    /// An authorization rule is unusable.
    #[error("{path}: authorization.rules[{index}]: {reason}")]
    Rule {
        /// The file.
        path: String,
        /// Index of the offending rule.
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Payload of a network service, as NSM spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
pub enum Payload {
    /// IP packets (TUN).
    #[default]
    #[serde(rename = "IP")]
    Ip,
    /// Ethernet frames (TAP).
    #[serde(rename = "ETHERNET")]
    Ethernet,
}

impl Payload {
    /// The NSM string (`IP`, `ETHERNET`).
    pub fn as_str(self) -> &'static str {
        match self {
            Payload::Ip => nsm_proto::mechanisms::payload::IP,
            Payload::Ethernet => nsm_proto::mechanisms::payload::ETHERNET,
        }
    }
}

/// One or many CIDRs (`cidr: 10.0.0.0/24` or `cidr: [..]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(IpNet),
    Many(Vec<IpNet>),
}

impl Default for OneOrMany {
    fn default() -> Self {
        OneOrMany::Many(Vec::new())
    }
}

impl From<OneOrMany> for Vec<IpNet> {
    fn from(v: OneOrMany) -> Self {
        match v {
            OneOrMany::One(n) => vec![n],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    #[serde(default)]
    payload: Payload,
    #[serde(default)]
    cidr: OneOrMany,
    #[serde(default)]
    excluded: OneOrMany,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    services: Vec<RawService>,
    /// Who may request what (see [`crate::authz`]); absent = allow all.
    #[serde(default)]
    authorization: Option<crate::authz::Policy>,
}

/// A validated network service definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Service name.
    pub name: String,
    /// Payload.
    pub payload: Payload,
    /// Address pools (IPv4 and/or IPv6), host bits cleared.
    pub cidr: Vec<IpNet>,
    /// Prefixes never handed out.
    pub excluded: Vec<IpNet>,
}

/// The whole config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// Services in file order.
    pub services: Vec<ServiceConfig>,
    /// The `authorization:` section; `None` = every caller may request
    /// every service.
    pub authorization: Option<crate::authz::Policy>,
}

impl Config {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and the place.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    ///
    /// # Errors
    /// [`ConfigError`] naming the place.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_norway::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            // One line: serde_norway's message already carries "at line L column C".
            message: e.to_string().replace('\n', " "),
        })?;
        let mut names = BTreeSet::new();
        let mut services = Vec::new();
        for (index, s) in raw.services.iter().cloned().enumerate() {
            let invalid = |reason: String| ConfigError::Invalid {
                path: origin.to_string(),
                index,
                service: s.name.clone(),
                reason,
            };
            if s.name.is_empty() {
                return Err(invalid("name is empty".into()));
            }
            if !names.insert(s.name.clone()) {
                return Err(invalid("duplicate service name".into()));
            }
            let cidr: Vec<IpNet> = s.cidr.clone().into();
            let excluded: Vec<IpNet> = s.excluded.clone().into();
            for (i, a) in cidr.iter().enumerate() {
                if a.trunc() != *a {
                    return Err(invalid(format!(
                        "cidr {a} has host bits set (did you mean {})",
                        a.trunc()
                    )));
                }
                // Point-to-point pairs need two addresses at least.
                if a.max_prefix_len() - a.prefix_len() < 1 {
                    return Err(invalid(format!(
                        "cidr {a} is too small for a point-to-point pair"
                    )));
                }
                for b in &cidr[..i] {
                    if a.contains(b) || b.contains(a) {
                        return Err(invalid(format!("cidr {a} overlaps {b}")));
                    }
                }
            }
            services.push(ServiceConfig {
                name: s.name,
                payload: s.payload,
                cidr: cidr.into_iter().map(|n| n.trunc()).collect(),
                excluded: excluded.into_iter().map(|n| n.trunc()).collect(),
            });
        }
        for (index, r) in raw
            .authorization
            .iter()
            .flat_map(|p| p.rules.iter())
            .enumerate()
        {
            r.check().map_err(|reason| ConfigError::Rule {
                path: origin.to_string(),
                index,
                reason,
            })?;
        }
        Ok(Config {
            services,
            authorization: raw.authorization,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_cidr_forms() {
        let c = Config::parse(
            "services:\n- name: a\n  payload: IP\n  cidr: 172.31.0.0/24\n- name: b\n  payload: ETHERNET\n  cidr: [10.0.0.0/30, 'fd00::/120']\n  excluded: [10.0.0.0/32]\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.services.len(), 2);
        assert_eq!(
            c.services[0].cidr,
            vec!["172.31.0.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(c.services[1].payload, Payload::Ethernet);
        assert_eq!(c.services[1].cidr.len(), 2);
        assert_eq!(c.services[1].excluded.len(), 1);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let e =
            Config::parse("services:\n- name: a\n  cidrs: 10.0.0.0/24\n", "f.yaml").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("f.yaml: "), "{msg}");
        assert!(msg.contains("cidrs"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn a_bad_service_account_names_its_rule() {
        let e = Config::parse(
            "authorization:\n  rules:\n  - {services: [a], uids: [0]}\n  - {services: [a], service_accounts: [web]}\n",
            "f.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("f.yaml: authorization.rules[1]: service_accounts: `web`"),
            "{e}"
        );
        let ok = Config::parse(
            "authorization:\n  rules:\n  - {services: [a], service_accounts: [shop/web, 'team-*']}\n",
            "f.yaml",
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn bad_values_are_errors() {
        for (yaml, needle) in [
            ("services:\n- name: a\n  cidr: 10.0.0.1/24\n", "host bits"),
            (
                "services:\n- name: a\n  cidr: [10.0.0.0/24, 10.0.0.0/25]\n",
                "overlaps",
            ),
            ("services:\n- name: a\n- name: a\n", "duplicate"),
            ("services:\n- name: a\n  cidr: 10.0.0.1/32\n", "too small"),
            ("services:\n- name: a\n  payload: VXLAN\n", "VXLAN"),
            ("services:\n- name: a\n  cidr: nope\n", "services"),
        ] {
            let msg = Config::parse(yaml, "f").unwrap_err().to_string();
            assert!(msg.contains(needle), "{yaml:?}: {msg}");
        }
    }
}
