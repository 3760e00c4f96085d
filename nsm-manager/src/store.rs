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
#[derive(Debug)]
pub struct Table<T> {
    path: Option<PathBuf>,
    rows: Mutex<BTreeMap<String, T>>,
}

impl<T: Serialize + DeserializeOwned + Clone> Table<T> {
    /// Opens (or creates empty) table `name` in `dir`; `None` keeps it in memory only.
    ///
    /// # Errors
    /// The file exists but cannot be read or decoded.
    pub fn open(dir: Option<&Path>, name: &str) -> Result<Arc<Table<T>>, StoreError> {
        let path = dir.map(|d| d.join(format!("{name}.json")));
        let rows = match &path {
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
            rows: Mutex::new(rows),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, T>> {
        // A panic while holding the lock leaves a consistent map (every
        // mutation is a single insert/remove), so poisoning is ignored.
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One row.
    pub fn get(&self, key: &str) -> Option<T> {
        self.lock().get(key).cloned()
    }

    /// All rows, in key order.
    pub fn all(&self) -> Vec<(String, T)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Inserts or replaces a row and writes the table.
    ///
    /// # Errors
    /// The write failed; the in-memory row is then rolled back.
    pub fn put(&self, key: &str, value: T) -> Result<(), StoreError> {
        let mut rows = self.lock();
        let old = rows.insert(key.to_string(), value);
        if let Err(e) = self.flush(&rows) {
            match old {
                Some(o) => rows.insert(key.to_string(), o),
                None => rows.remove(key),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Removes a row (if present) and writes the table; returns the old row.
    ///
    /// # Errors
    /// The write failed; the row is then kept.
    pub fn remove(&self, key: &str) -> Result<Option<T>, StoreError> {
        let mut rows = self.lock();
        let Some(old) = rows.remove(key) else {
            return Ok(None);
        };
        if let Err(e) = self.flush(&rows) {
            rows.insert(key.to_string(), old);
            return Err(e);
        }
        Ok(Some(old))
    }

    /// Applies `f` to the whole map under the lock and writes it once; the
    /// map is restored when the write fails. For read-modify-write steps
    /// that must be atomic (IPAM allocation).
    ///
    /// # Errors
    /// `f`'s error, or the write's.
    pub fn update<R, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, T>) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut rows = self.lock();
        let before = rows.clone();
        let r = f(&mut rows)?;
        if let Err(e) = self.flush(&rows) {
            *rows = before;
            return Err(e.into());
        }
        Ok(r)
    }

    fn flush(&self, rows: &BTreeMap<String, T>) -> Result<(), StoreError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let io = |source| StoreError::Io {
            path: path.display().to_string(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(rows).map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
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
