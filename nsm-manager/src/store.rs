//! The embedded durable store: named tables of string keys to serde values,
//! kept in memory and written through to one redb database per manager
//! (`--state-dir/state.redb`).
//!
//! redb gives crash-safe commits (copy-on-write B-trees with checksums: after
//! SIGKILL or power loss a table is the last committed version, never a torn
//! one) and writes only the pages of the keys that changed. On top of it the
//! table does group commit (see [`Table`]), so parallel requests share their
//! `fsync`s instead of queueing one each.
//!
//! Values are stored as JSON; protobuf messages as hex of their wire
//! encoding ([`Pb`]), so that the store never needs serde impls on generated
//! types and a field added to a `.proto` later still decodes.
//!
//! The store must never be shared by two managers: the directory belongs to
//! one process (redb refuses a second opener).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use redb::{ReadableDatabase, ReadableTable};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused an operation.
    #[error("state database {path}: {message}")]
    Db {
        /// The database file.
        path: String,
        /// redb's message.
        message: String,
    },
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
/// Writes use group commit: a change is applied in memory and its key marked
/// dirty, then the caller waits until a flush that started after its change
/// has committed. One flush runs at a time and commits every dirty key in one
/// redb transaction, so while one commit is under way every other writer's
/// change queues up and the next commit makes all of them durable at once.
/// Under 200 parallel requests that turns hundreds of serialized `fsync`s
/// into a handful, and the row lock is never held across disk I/O.
#[derive(Debug)]
pub struct Table<T> {
    db: Option<Arc<Db>>,
    name: String,
    rows: Mutex<Rows<T>>,
    /// The generation last made durable; held while a flush commits.
    durable: Mutex<u64>,
}

#[derive(Debug)]
struct Rows<T> {
    map: BTreeMap<String, T>,
    /// Keys changed since the last flush took its batch.
    dirty: BTreeSet<String>,
    /// Bumped by every change.
    generation: u64,
}

/// One manager's database, shared by its tables and closed with the last of them.
#[derive(Debug)]
struct Db {
    path: PathBuf,
    db: redb::Database,
}

impl Db {
    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Db {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// The database of `dir`: opened once per process and shared, because
    /// redb allows one opener per file.
    fn open(dir: &Path) -> Result<Arc<Db>, StoreError> {
        static OPEN: Mutex<BTreeMap<PathBuf, Weak<Db>>> = Mutex::new(BTreeMap::new());
        let path = dir.join("state.redb");
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = open.get(&path).and_then(Weak::upgrade) {
            return Ok(db);
        }
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let db = redb::Database::create(&path).map_err(|e| StoreError::Db {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let db = Arc::new(Db {
            path: path.clone(),
            db,
        });
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(path, Arc::downgrade(&db));
        Ok(db)
    }
}

fn definition(name: &str) -> redb::TableDefinition<'_, &'static str, &'static [u8]> {
    redb::TableDefinition::new(name)
}

impl<T: Serialize + DeserializeOwned + Clone> Table<T> {
    /// Opens (or creates empty) table `name` in `dir`'s database; `None`
    /// keeps it in memory only.
    ///
    /// # Errors
    /// The database cannot be opened, or a row does not decode.
    pub fn open(dir: Option<&Path>, name: &str) -> Result<Arc<Table<T>>, StoreError> {
        let db = dir.map(Db::open).transpose()?;
        let mut map = BTreeMap::new();
        if let Some(db) = &db {
            let read = db.db.begin_read().map_err(|e| db.err(e))?;
            match read.open_table(definition(name)) {
                Ok(table) => {
                    for row in table.iter().map_err(|e| db.err(e))? {
                        let (k, v) = row.map_err(|e| db.err(e))?;
                        let value =
                            serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                                path: format!(
                                    "{} table {name} key {}",
                                    db.path.display(),
                                    k.value()
                                ),
                                message: e.to_string(),
                            })?;
                        map.insert(k.value().to_string(), value);
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(db.err(e)),
            }
        }
        Ok(Arc::new(Table {
            db,
            name: name.to_string(),
            rows: Mutex::new(Rows {
                map,
                dirty: BTreeSet::new(),
                generation: 0,
            }),
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
    /// The commit failed. The row stays in memory and dirty (the next
    /// commit retries it); the caller undoes its step.
    pub fn put(&self, key: &str, value: T) -> Result<(), StoreError> {
        let generation = {
            let mut rows = self.lock();
            rows.map.insert(key.to_string(), value);
            rows.dirty.insert(key.to_string());
            rows.generation += 1;
            rows.generation
        };
        self.sync(generation)
    }

    /// Removes a row (if present), returns once that is durable, and gives the old row.
    ///
    /// # Errors
    /// The commit failed (see [`Table::put`]).
    pub fn remove(&self, key: &str) -> Result<Option<T>, StoreError> {
        let (old, generation) = {
            let mut rows = self.lock();
            let Some(old) = rows.map.remove(key) else {
                return Ok(None);
            };
            rows.dirty.insert(key.to_string());
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
    /// `f`'s error, or the commit's.
    pub fn update<R, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, T>) -> Result<R, E>,
    ) -> Result<R, E> {
        let (r, generation) = {
            let mut rows = self.lock();
            let before = rows.map.clone();
            match f(&mut rows.map) {
                Ok(r) => {
                    // Only keys whose presence or value changed need writing.
                    let after = &rows.map;
                    let changed: Vec<String> = before
                        .keys()
                        .filter(|k| !after.contains_key(*k))
                        .chain(after.iter().filter_map(|(k, v)| {
                            let same = before.get(k).is_some_and(|old| {
                                serde_json::to_vec(old).ok() == serde_json::to_vec(v).ok()
                            });
                            (!same).then_some(k)
                        }))
                        .cloned()
                        .collect();
                    rows.dirty.extend(changed);
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

    /// Returns once generation `generation` (or a later one) is committed,
    /// committing it if no commit that started after it has finished.
    fn sync(&self, generation: u64) -> Result<(), StoreError> {
        let Some(db) = &self.db else {
            return Ok(());
        };
        // Disk I/O must not stall the async runtime's few worker threads.
        blocking(|| {
            let mut durable = self.durable.lock().unwrap_or_else(|p| p.into_inner());
            if *durable >= generation {
                return Ok(());
            }
            let (batch, covered) = {
                let mut rows = self.lock();
                let keys = std::mem::take(&mut rows.dirty);
                let batch: Vec<(String, Option<Vec<u8>>)> = keys
                    .into_iter()
                    .map(|k| {
                        let v = rows
                            .map
                            .get(&k)
                            .map(|v| serde_json::to_vec(v).expect("table values serialize"));
                        (k, v)
                    })
                    .collect();
                (batch, rows.generation)
            };
            if let Err(e) = self.commit(db, &batch) {
                // Keep the keys dirty so the next commit writes them.
                self.lock().dirty.extend(batch.into_iter().map(|(k, _)| k));
                return Err(e);
            }
            *durable = covered;
            Ok(())
        })
    }

    fn commit(&self, db: &Db, batch: &[(String, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let txn = db.db.begin_write().map_err(|e| db.err(e))?;
        {
            let mut table = txn
                .open_table(definition(&self.name))
                .map_err(|e| db.err(e))?;
            for (k, v) in batch {
                match v {
                    Some(bytes) => {
                        table
                            .insert(k.as_str(), bytes.as_slice())
                            .map_err(|e| db.err(e))?;
                    }
                    None => {
                        table.remove(k.as_str()).map_err(|e| db.err(e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| db.err(e))
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
