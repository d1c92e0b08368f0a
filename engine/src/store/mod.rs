//! The DPU's local store: storage profiles, registered nodes and exports.
//!
//! Volumes are deliberately not here: their truth lives on the storage nodes (DESIGN:
//! the DPU is replaceable), and the engine recovers them from there. What is here is
//! the operator's configuration, which a replacement DPU gets back by restoring this
//! file or by registering the nodes and profiles again.
//!
//! The store is one redb file (`<data_dir>/store.redb`; docs/dependencies.md says why
//! redb). Every change is one write transaction, durable when the call returns. Values
//! are JSON documents (profiles in their documented schema), so a file can be inspected
//! and a later schema can read an older one; the file carries a schema version and a
//! file written by a later version is refused rather than half-read. redb locks the
//! file, so a second dpud on the same data directory fails at start instead of
//! corrupting it.
//!
//! All calls block on the disk; async callers run them with `spawn_blocking`.

use std::fmt;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::api::service::NodeSpec;

mod net;

/// The schema version this build reads and writes.
pub const STORE_SCHEMA_VERSION: u32 = 1;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const PROFILES: TableDefinition<&str, &[u8]> = TableDefinition::new("profiles");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
const EXPORTS: TableDefinition<&str, &[u8]> = TableDefinition::new("exports");

const SCHEMA_KEY: &str = "schema_version";

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened or created.
    #[error("cannot open the store {path}: {source}")]
    Open {
        /// The store file.
        path: PathBuf,
        /// redb's reason.
        source: Box<redb::DatabaseError>,
    },
    /// Another process (another dpud) has the file open.
    #[error("the store {path} is in use by another process (is another dpud running with the same data_dir?)")]
    InUse {
        /// The store file.
        path: PathBuf,
    },
    /// The file was written by a later schema.
    #[error("the store {path} has schema version {found}; this dpud reads version {supported}. Run the dpud version that wrote it, or move the file away to start empty.")]
    Schema {
        /// The store file.
        path: PathBuf,
        /// The version in the file.
        found: String,
        /// The version this build reads.
        supported: u32,
    },
    /// A record could not be decoded.
    #[error("the store holds an unreadable {what} record {name:?}: {detail}")]
    Corrupt {
        /// "profile", "node" or "export".
        what: &'static str,
        /// The record's key.
        name: String,
        /// Why.
        detail: String,
    },
    /// A redb operation failed (I/O error, full disk).
    #[error("store operation failed: {0}")]
    Db(Box<redb::Error>),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                Self::Db(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The front-end an export is served by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportKind {
    /// NBD (newstyle), on dpud's NBD socket and TCP listener.
    Nbd,
    /// vhost-user-blk: one Unix socket per export under dpud's `[vhost_user_blk] socket_dir`.
    VhostUserBlk,
    /// NVMe/TCP, on dpud's NVMe/TCP listener: one subsystem per export.
    NvmeTcp,
}

impl fmt::Display for ExportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Nbd => "nbd",
            Self::VhostUserBlk => "vhost-user-blk",
            Self::NvmeTcp => "nvme-tcp",
        })
    }
}

/// One export as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRecord {
    /// Unique export name (what an NBD client asks for).
    pub name: String,
    /// The volume it serves.
    pub volume: String,
    /// The front-end.
    pub kind: ExportKind,
    /// Whether writes are refused.
    pub read_only: bool,
    /// NVMe/TCP: host NQNs allowed to connect (deny-by-default: at least one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
}

/// The store. See the module documentation.
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens the store at `path`, creating it if absent. A new store gets the built-in
    /// profiles (`placement::builtin_profiles`).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
                path: path.to_owned(),
            },
            source => StoreError::Open {
                path: path.to_owned(),
                source: Box::new(source),
            },
        })?;
        let store = Self {
            db,
            path: path.to_owned(),
        };
        store.init()?;
        Ok(store)
    }

    /// The file's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn init(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get(SCHEMA_KEY)?.map(|v| v.value().to_vec());
            match found {
                None => {
                    meta.insert(SCHEMA_KEY, STORE_SCHEMA_VERSION.to_string().as_bytes())?;
                    let mut profiles = txn.open_table(PROFILES)?;
                    for p in placement::builtin_profiles() {
                        profiles.insert(p.name.as_str(), p.to_json().as_bytes())?;
                    }
                }
                Some(v) => {
                    let text = String::from_utf8_lossy(&v).into_owned();
                    if text.parse::<u32>().ok() != Some(STORE_SCHEMA_VERSION) {
                        return Err(StoreError::Schema {
                            path: self.path.clone(),
                            found: text,
                            supported: STORE_SCHEMA_VERSION,
                        });
                    }
                }
            }
            txn.open_table(PROFILES)?;
            txn.open_table(NODES)?;
            txn.open_table(EXPORTS)?;
        }
        txn.commit()?;
        Ok(())
    }

    fn get_raw(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    fn list_raw(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn put_raw(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &[u8],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(table)?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }

    fn delete_raw(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(table)?.remove(key)?.is_some();
        txn.commit()?;
        Ok(existed)
    }

    fn decode_profile(name: &str, bytes: &[u8]) -> Result<placement::Profile, StoreError> {
        let text = std::str::from_utf8(bytes).map_err(|e| StoreError::Corrupt {
            what: "profile",
            name: name.to_owned(),
            detail: e.to_string(),
        })?;
        placement::Profile::from_json(text).map_err(|e| StoreError::Corrupt {
            what: "profile",
            name: name.to_owned(),
            detail: e.to_string(),
        })
    }

    fn decode<T: for<'de> Deserialize<'de>>(
        what: &'static str,
        name: &str,
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            what,
            name: name.to_owned(),
            detail: e.to_string(),
        })
    }

    fn encode<T: Serialize>(value: &T) -> Vec<u8> {
        serde_json::to_vec(value).unwrap_or_default()
    }

    /// Every profile, sorted by name.
    pub fn profiles(&self) -> Result<Vec<placement::Profile>, StoreError> {
        self.list_raw(PROFILES)?
            .iter()
            .map(|(k, v)| Self::decode_profile(k, v))
            .collect()
    }

    /// One profile.
    pub fn profile(&self, name: &str) -> Result<Option<placement::Profile>, StoreError> {
        self.get_raw(PROFILES, name)?
            .map(|v| Self::decode_profile(name, &v))
            .transpose()
    }

    /// Creates or replaces a profile.
    pub fn put_profile(&self, profile: &placement::Profile) -> Result<(), StoreError> {
        self.put_raw(PROFILES, &profile.name, profile.to_json().as_bytes())
    }

    /// Deletes a profile; false if there was none.
    pub fn delete_profile(&self, name: &str) -> Result<bool, StoreError> {
        self.delete_raw(PROFILES, name)
    }

    /// Every node, sorted by name.
    pub fn nodes(&self) -> Result<Vec<NodeSpec>, StoreError> {
        self.list_raw(NODES)?
            .iter()
            .map(|(k, v)| Self::decode("node", k, v))
            .collect()
    }

    /// One node.
    pub fn node(&self, name: &str) -> Result<Option<NodeSpec>, StoreError> {
        self.get_raw(NODES, name)?
            .map(|v| Self::decode("node", name, &v))
            .transpose()
    }

    /// Creates or replaces a node.
    pub fn put_node(&self, node: &NodeSpec) -> Result<(), StoreError> {
        self.put_raw(NODES, &node.name, &Self::encode(node))
    }

    /// Deletes a node; false if there was none.
    pub fn delete_node(&self, name: &str) -> Result<bool, StoreError> {
        self.delete_raw(NODES, name)
    }

    /// Every export, sorted by name.
    pub fn exports(&self) -> Result<Vec<ExportRecord>, StoreError> {
        self.list_raw(EXPORTS)?
            .iter()
            .map(|(k, v)| Self::decode("export", k, v))
            .collect()
    }

    /// One export.
    pub fn export(&self, name: &str) -> Result<Option<ExportRecord>, StoreError> {
        self.get_raw(EXPORTS, name)?
            .map(|v| Self::decode("export", name, &v))
            .transpose()
    }

    /// Creates or replaces an export.
    pub fn put_export(&self, export: &ExportRecord) -> Result<(), StoreError> {
        self.put_raw(EXPORTS, &export.name, &Self::encode(export))
    }

    /// Deletes an export; false if there was none.
    pub fn delete_export(&self, name: &str) -> Result<bool, StoreError> {
        self.delete_raw(EXPORTS, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::service::NodeAdminState;

    #[test]
    fn new_store_has_builtin_profiles_and_refuses_newer_schema(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store.redb");
        {
            let s = Store::open(&path)?;
            let names: Vec<String> = s.profiles()?.into_iter().map(|p| p.name).collect();
            let mut want: Vec<String> = placement::builtin_profiles()
                .into_iter()
                .map(|p| p.name)
                .collect();
            want.sort();
            assert_eq!(names, want);
            s.put_node(&NodeSpec {
                name: "n1".into(),
                address: "127.0.0.1:4420".into(),
                nqn: "nqn.2026-11.io.example:n1".into(),
                domain: "n1/n1".into(),
                weight: 1,
                state: NodeAdminState::Up,
            })?;
            // A second open of the same file while this one is open is refused.
            assert!(matches!(Store::open(&path), Err(StoreError::InUse { .. })));
        }
        {
            let db = Database::create(&path)?;
            let txn = db.begin_write()?;
            txn.open_table(META)?.insert(SCHEMA_KEY, b"2".as_slice())?;
            txn.commit()?;
        }
        let err = Store::open(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("schema version 2"), "{err}");
        Ok(())
    }
}
