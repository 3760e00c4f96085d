//! Network namespace references in KERNEL mechanism parameters.
//!
//! NSM clients name their namespace as `file:///proc/PID/ns/net`,
//! `file:///run/netns/NAME` or `inode://DEV/INO` (and sometimes only a
//! `netnsInode`). The forwarder API takes a *path*, so inode references are
//! resolved here by scanning the places where namespaces have paths. The
//! manager only stats these files; it never enters a namespace.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why a namespace reference cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetnsError {
    /// Not one of the URL forms above.
    #[error(
        "unsupported netns URL `{0}` (expected file:///proc/PID/ns/net, file:///run/netns/NAME or inode://DEV/INO)"
    )]
    BadUrl(String),
    /// No namespace with that device and inode has a path on this host.
    #[error("no network namespace with inode {dev}/{ino} found under /run/netns or /proc/*/ns/net")]
    NotFound {
        /// st_dev (0 = any).
        dev: u64,
        /// st_ino.
        ino: u64,
    },
}

/// A parsed namespace reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsRef {
    /// A path to the namespace file.
    Path(PathBuf),
    /// Device and inode of the namespace file (`dev` 0 = any device).
    Inode {
        /// st_dev.
        dev: u64,
        /// st_ino.
        ino: u64,
    },
}

/// Parses an `inodeURL` value.
///
/// # Errors
/// [`NetnsError::BadUrl`].
pub fn parse_url(url: &str) -> Result<NetnsRef, NetnsError> {
    let bad = || NetnsError::BadUrl(url.to_string());
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') || path.contains("/../") || path.ends_with("/..") {
            return Err(bad());
        }
        return Ok(NetnsRef::Path(PathBuf::from(path)));
    }
    if let Some(rest) = url.strip_prefix("inode://") {
        let (dev, ino) = rest.split_once('/').ok_or_else(bad)?;
        return Ok(NetnsRef::Inode {
            dev: dev.parse().map_err(|_| bad())?,
            ino: ino.parse().map_err(|_| bad())?,
        });
    }
    Err(bad())
}

/// Resolves a reference to a path the forwarder can open.
///
/// # Errors
/// [`NetnsError::NotFound`] when an inode matches nothing.
pub fn resolve(r: &NetnsRef) -> Result<PathBuf, NetnsError> {
    match r {
        NetnsRef::Path(p) => Ok(p.clone()),
        NetnsRef::Inode { dev, ino } => {
            find_by_inode(Path::new("/run/netns"), Path::new("/proc"), *dev, *ino).ok_or(
                NetnsError::NotFound {
                    dev: *dev,
                    ino: *ino,
                },
            )
        }
    }
}

/// Scans `netns_dir/*` then `proc/*/ns/net` for a file with this inode.
/// Named namespaces come first because their paths outlive any process.
pub fn find_by_inode(netns_dir: &Path, proc: &Path, dev: u64, ino: u64) -> Option<PathBuf> {
    let matches = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.ino() == ino && (dev == 0 || m.dev() == dev))
            .unwrap_or(false)
    };
    if let Ok(rd) = std::fs::read_dir(netns_dir) {
        for e in rd.flatten() {
            let p = e.path();
            if matches(&p) {
                return Some(p);
            }
        }
    }
    let rd = std::fs::read_dir(proc).ok()?;
    for e in rd.flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let p = e.path().join("ns/net");
        if matches(&p) {
            return Some(p);
        }
    }
    None
}

/// The `inodeURL` of this process's own namespace, as an endpoint reports it.
pub fn own_url() -> String {
    format!("file:///proc/{}/ns/net", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(
            parse_url("file:///proc/42/ns/net").unwrap(),
            NetnsRef::Path("/proc/42/ns/net".into())
        );
        assert_eq!(
            parse_url("file:///run/netns/pod-a").unwrap(),
            NetnsRef::Path("/run/netns/pod-a".into())
        );
        assert_eq!(
            parse_url("inode://4/4026531840").unwrap(),
            NetnsRef::Inode {
                dev: 4,
                ino: 4026531840
            }
        );
        for bad in [
            "",
            "/proc/1/ns/net",
            "file://relative",
            "inode://4",
            "inode://x/1",
            "http://a/b",
            "file:///a/../b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolves_inode_by_scanning() {
        // Any file stands in for a namespace: only st_dev/st_ino are compared.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pod-a");
        std::fs::write(&f, b"").unwrap();
        let m = std::fs::metadata(&f).unwrap();
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            find_by_inode(dir.path(), empty.path(), m.dev(), m.ino()),
            Some(f.clone())
        );
        assert_eq!(find_by_inode(dir.path(), empty.path(), 0, m.ino()), Some(f));
        assert_eq!(
            find_by_inode(dir.path(), empty.path(), m.dev(), m.ino() + 1),
            None
        );
        // Our own namespace is found through /proc.
        let own = std::fs::metadata("/proc/self/ns/net").unwrap();
        let p = find_by_inode(empty.path(), Path::new("/proc"), own.dev(), own.ino()).unwrap();
        assert!(p.starts_with("/proc"));
    }
}
