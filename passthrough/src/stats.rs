//! The stats file: what every connection's link counted, and the totals
//! since start (closed connections included).
//!
//! ```json
//! {"name": "pt-1",
//!  "connections": {"<incoming connection id>": {
//!      "incoming_if": "nsm-1", "onward_if": "pto-1a2b3c4d",
//!      "forward": {"packets": 10, "bytes": 840},
//!      "reverse": {"packets": 10, "bytes": 840}}},
//!  "total": {"forward": {"packets": 10, "bytes": 840},
//!            "reverse": {"packets": 10, "bytes": 840}}}
//! ```
//!
//! `forward` is incoming to onward interface (client to endpoint),
//! `reverse` the other way. Bytes are IP packets (TUN) or Ethernet frames
//! (TAP); a GSO superpacket counts as one packet. The file is written to a
//! temporary file next to it and renamed over it, so a reader never sees a
//! partial file.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::engine::{Counters, DirCounters};

/// Packets and bytes of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirStats {
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
}

impl DirStats {
    fn of(c: &DirCounters) -> DirStats {
        DirStats {
            packets: c.packets(),
            bytes: c.bytes(),
        }
    }

    fn add(&mut self, o: DirStats) {
        self.packets += o.packets;
        self.bytes += o.bytes;
    }
}

/// One live connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnStats {
    /// The interface the forwarder made for the incoming connection.
    pub incoming_if: String,
    /// The interface of our onward connection.
    pub onward_if: String,
    /// Incoming to onward (client to endpoint).
    pub forward: DirStats,
    /// Onward to incoming (endpoint to client).
    pub reverse: DirStats,
}

/// Both directions, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Totals {
    /// Incoming to onward.
    pub forward: DirStats,
    /// Onward to incoming.
    pub reverse: DirStats,
}

/// The stats file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsFile {
    /// The NSE name.
    pub name: String,
    /// Live connections by incoming connection id.
    pub connections: BTreeMap<String, ConnStats>,
    /// Since start, closed connections included.
    pub total: Totals,
}

#[derive(Debug)]
struct Live {
    incoming_if: String,
    onward_if: String,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Book {
    live: BTreeMap<String, Live>,
    closed: Totals,
}

/// The counters of every connection, live and closed.
#[derive(Debug)]
pub struct StatsBook {
    name: String,
    book: Mutex<Book>,
}

impl StatsBook {
    /// An empty book for NSE `name`.
    pub fn new(name: &str) -> StatsBook {
        StatsBook {
            name: name.to_string(),
            book: Mutex::default(),
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts reporting incoming connection `id`.
    pub fn add(&self, id: &str, incoming_if: &str, onward_if: &str, counters: Arc<Counters>) {
        self.book().live.insert(
            id.to_string(),
            Live {
                incoming_if: incoming_if.to_string(),
                onward_if: onward_if.to_string(),
                counters,
            },
        );
    }

    /// Stops reporting `id`, keeping its counts in the totals (call it once
    /// its link has stopped, so that they are final).
    pub fn retire(&self, id: &str) {
        let mut book = self.book();
        if let Some(l) = book.live.remove(id) {
            book.closed.forward.add(DirStats::of(&l.counters.forward));
            book.closed.reverse.add(DirStats::of(&l.counters.reverse));
        }
    }

    /// The current content of the stats file.
    pub fn snapshot(&self) -> StatsFile {
        let book = self.book();
        let mut total = book.closed;
        let connections = book
            .live
            .iter()
            .map(|(id, l)| {
                let (forward, reverse) = (
                    DirStats::of(&l.counters.forward),
                    DirStats::of(&l.counters.reverse),
                );
                total.forward.add(forward);
                total.reverse.add(reverse);
                let c = ConnStats {
                    incoming_if: l.incoming_if.clone(),
                    onward_if: l.onward_if.clone(),
                    forward,
                    reverse,
                };
                (id.clone(), c)
            })
            .collect();
        StatsFile {
            name: self.name.clone(),
            connections,
            total,
        }
    }
}

/// Writes `stats` to `path` atomically: to `path.tmp` first, then renamed
/// over `path`.
///
/// # Errors
/// Any I/O error; the temporary file is removed on failure.
pub fn write_atomic(path: &Path, stats: &StatsFile) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        serde_json::to_writer_pretty(&mut f, stats)?;
        f.write_all(b"\n")?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_keep_closed_connections() {
        let book = StatsBook::new("pt");
        book.add("a", "nsm-a", "pto-a", Arc::default());
        book.add("b", "nsm-b", "pto-b", Arc::default());
        let s = book.snapshot();
        assert_eq!(s.connections.len(), 2);
        assert_eq!(s.total, Totals::default());
        book.retire("a");
        let s = book.snapshot();
        assert_eq!(s.connections.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(s.connections["b"].onward_if, "pto-b");
    }

    #[test]
    fn file_format_and_atomic_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stats.json");
        let book = StatsBook::new("pt-1");
        book.add("conn-1", "nsm-1", "pto-1", Arc::default());
        write_atomic(&path, &book.snapshot()).expect("write");
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        assert_eq!(v["name"], "pt-1");
        assert_eq!(v["connections"]["conn-1"]["incoming_if"], "nsm-1");
        assert_eq!(v["connections"]["conn-1"]["forward"]["packets"], 0);
        assert_eq!(v["total"]["reverse"]["bytes"], 0);
        let back: StatsFile = serde_json::from_value(v).expect("typed");
        assert_eq!(back, book.snapshot());
        assert!(!dir.path().join("stats.json.tmp").exists());
    }
}
