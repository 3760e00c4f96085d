//! The embedded durable store: named tables of string keys to serde values,
//! one JSON file per table under `--state-dir`.
//!
//! Why not a database: the tables are small (connections and leases of one
//! node, the lab's registry), every change is rare compared to packets, and
//! a whole-file rewrite through a temporary file, `fsync` and `rename` is
//! atomic on Linux: after SIGKILL the file is either the old or the new
//! version, never a torn one. That is all the durability the manager needs
//! and it costs no dependency.
//!
//! Protobuf messages are stored as their wire encoding in hex ([`Pb`]) so
//! that the store never needs serde impls on generated types and a field
//! added to a `.proto` later still decodes.
//!
//! The store must never be shared by two managers: the directory belongs to
//! one process.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing a table file failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The table file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A table file does not decode.
    #[error("state file {path} is corrupt: {message}")]
    Corrupt {
        /// The table file.
        path: String,
        /// The decoder's message.
        message: String,
    },
}

/// A protobuf message stored as hex of its wire encoding.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Pb<T>(pub T);

impl<T: prost::Message> Serialize for Pb<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let bytes = self.0.encode_to_vec();
        let mut hex = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            hex.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&hex)
    }
}

impl<'de, T: prost::Message + Default> Deserialize<'de> for Pb<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let hex = String::deserialize(d)?;
        if hex.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd hex length"));
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(serde::de::Error::custom)?;
        T::decode(bytes.as_slice())
            .map(Pb)
            .map_err(serde::de::Error::custom)
    }
}

/// One durable table: a map kept in memory and written through on every change.
///
/// Writes use group commit: a change is applied in memory, then the caller
/// waits until a flush that started after its change is on disk. Only one
/// flush runs at a time and it writes the whole current map, so while one
/// `fsync` is under way every other writer's change queues up and the next
/// flush makes all of them durable at once. Under 200 parallel requests that
/// turns hundreds of serialized `fsync`s into a handful, and the row lock is
/// never held across disk I/O.
#[derive(Debug)]
pub struct Table<T> {
    path: Option<PathBuf>,
    rows: Mutex<Rows<T>>,
    /// The generation last made durable; held while a flush writes.
    durable: Mutex<u64>,
}

#[derive(Debug)]
struct Rows<T> {
    map: BTreeMap<String, T>,
    /// Bumped by every change.
    generation: u64,
}

impl<T: Serialize + DeserializeOwned + Clone> Table<T> {
    /// Opens (or creates empty) table `name` in `dir`; `None` keeps it in memory only.
    ///
    /// # Errors
    /// The file exists but cannot be read or decoded.
    pub fn open(dir: Option<&Path>, name: &str) -> Result<Arc<Table<T>>, StoreError> {
        let path = dir.map(|d| d.join(format!("{name}.json")));
        let map = match &path {
            Some(p) => match std::fs::read(p) {
                Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    path: p.display().to_string(),
                    message: e.to_string(),
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                Err(source) => {
                    return Err(StoreError::Io {
                        path: p.display().to_string(),
                        source,
                    });
                }
            },
            None => BTreeMap::new(),
        };
        Ok(Arc::new(Table {
            path,
            rows: Mutex::new(Rows { map, generation: 0 }),
            durable: Mutex::new(0),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rows<T>> {
        // A panic while holding the lock leaves a consistent map (every
        // mutation is a single insert/remove), so poisoning is ignored.
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One row.
    pub fn get(&self, key: &str) -> Option<T> {
        self.lock().map.get(key).cloned()
    }

    /// All rows, in key order.
    pub fn all(&self) -> Vec<(String, T)> {
        self.lock()
            .map
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Inserts or replaces a row and returns once it is durable.
    ///
    /// # Errors
    /// The write failed. The row stays in memory (other writers' changes
    /// may already be batched with it); the caller undoes its step.
    pub fn put(&self, key: &str, value: T) -> Result<(), StoreError> {
        let generation = {
            let mut rows = self.lock();
            rows.map.insert(key.to_string(), value);
            rows.generation += 1;
            rows.generation
        };
        self.sync(generation)
    }

    /// Removes a row (if present), returns once that is durable, and gives the old row.
    ///
    /// # Errors
    /// The write failed (see [`Table::put`]).
    pub fn remove(&self, key: &str) -> Result<Option<T>, StoreError> {
        let (old, generation) = {
            let mut rows = self.lock();
            let Some(old) = rows.map.remove(key) else {
                return Ok(None);
            };
            rows.generation += 1;
            (old, rows.generation)
        };
        self.sync(generation)?;
        Ok(Some(old))
    }

    /// Applies `f` to the whole map under the lock, then waits until the
    /// result is durable; when `f` fails the map is left as it was. For
    /// read-modify-write steps that must be atomic (IPAM allocation).
    ///
    /// # Errors
    /// `f`'s error, or the write's.
    pub fn update<R, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, T>) -> Result<R, E>,
    ) -> Result<R, E> {
        let (r, generation) = {
            let mut rows = self.lock();
            let before = rows.map.clone();
            match f(&mut rows.map) {
                Ok(r) => {
                    rows.generation += 1;
                    (r, rows.generation)
                }
                Err(e) => {
                    rows.map = before;
                    return Err(e);
                }
            }
        };
        self.sync(generation)?;
        Ok(r)
    }

    /// Returns once generation `generation` (or a later one) is on disk,
    /// flushing it if no flush that started after it has finished.
    fn sync(&self, generation: u64) -> Result<(), StoreError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        // Disk I/O must not stall the async runtime's few worker threads.
        blocking(|| {
            let mut durable = self.durable.lock().unwrap_or_else(|p| p.into_inner());
            if *durable >= generation {
                return Ok(());
            }
            let (bytes, covered) = {
                let rows = self.lock();
                let bytes =
                    serde_json::to_vec_pretty(&rows.map).map_err(|e| StoreError::Corrupt {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })?;
                (bytes, rows.generation)
            };
            write_atomically(path, &bytes)?;
            *durable = covered;
            Ok(())
        })
    }
}

/// Runs `f`, letting a multi-threaded tokio runtime move other tasks off
/// this thread while it blocks.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Writes `bytes` to `path` so that after a crash the file is either the old
/// or the new version: temporary file, `fsync`, rename, `fsync` of the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    // The rename itself is durable only once the directory is synced.
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_proto::connection::Connection;

    #[test]
    fn survives_reopen_and_keeps_protobuf() {
        let dir = tempfile::tempdir().unwrap();
        let t: Arc<Table<Pb<Connection>>> = Table::open(Some(dir.path()), "c").unwrap();
        let c = Connection {
            id: "x".into(),
            network_service: "svc".into(),
            ..Default::default()
        };
        t.put("x", Pb(c.clone())).unwrap();
        drop(t);
        let t: Arc<Table<Pb<Connection>>> = Table::open(Some(dir.path()), "c").unwrap();
        assert_eq!(t.get("x").unwrap().0, c);
        assert_eq!(t.remove("x").unwrap().unwrap().0, c);
        assert!(t.all().is_empty());
    }
}

#[cfg(test)]
mod group_commit {
    use super::*;

    /// Many writers at once: every row they were told is durable is on disk
    /// after a reopen (each flush writes the whole map of its moment).
    #[test]
    fn concurrent_writers_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let t: Arc<Table<u32>> = Table::open(Some(dir.path()), "t").unwrap();
        std::thread::scope(|s| {
            for w in 0..8u32 {
                let t = &t;
                s.spawn(move || {
                    for i in 0..25u32 {
                        t.put(&format!("{w}-{i}"), w * 100 + i).unwrap();
                    }
                });
            }
        });
        t.remove("3-7").unwrap();
        drop(t);
        let t: Arc<Table<u32>> = Table::open(Some(dir.path()), "t").unwrap();
        assert_eq!(t.all().len(), 8 * 25 - 1);
        assert_eq!(t.get("7-24"), Some(724));
        assert_eq!(t.get("3-7"), None);
    }
}
