//! The network module's configuration in the store: one JSON document
//! ([`crate::net::config::NetDoc`]) under one key, replaced whole in one write
//! transaction per change, so a crash leaves either the old or the new configuration.
//! Kept in its own table, which a store written before the network module lacks (and
//! reads as "no configuration").

use redb::TableDefinition;

use super::{Store, StoreError};
use crate::net::config::{NetDoc, NET_DOC_SCHEMA};

const NET: TableDefinition<&str, &[u8]> = TableDefinition::new("net");
const KEY: &str = "config";

impl Store {
    /// The stored network configuration, if one was ever written.
    pub fn net_config(&self) -> Result<Option<NetDoc>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(NET) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Some(v) = table.get(KEY)? else {
            return Ok(None);
        };
        let corrupt = |detail: String| StoreError::Corrupt {
            what: "network configuration",
            name: KEY.to_owned(),
            detail,
        };
        let doc: NetDoc = serde_json::from_slice(v.value()).map_err(|e| corrupt(e.to_string()))?;
        if doc.schema_version != NET_DOC_SCHEMA {
            return Err(corrupt(format!(
                "schema version {} (this dpud reads {NET_DOC_SCHEMA})",
                doc.schema_version
            )));
        }
        Ok(Some(doc))
    }

    /// Replaces the stored network configuration (durable when this returns).
    pub fn put_net_config(&self, doc: &NetDoc) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(doc).map_err(|e| StoreError::Corrupt {
            what: "network configuration",
            name: KEY.to_owned(),
            detail: e.to_string(),
        })?;
        let txn = self.db.begin_write()?;
        txn.open_table(NET)?.insert(KEY, bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }
}
