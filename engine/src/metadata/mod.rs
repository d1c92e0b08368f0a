//! Metadata on the storage nodes: the superblock of every node namespace and a
//! mirrored, generation-numbered commit of two opaque payloads (a small root and a
//! large checkpoint), so that a DPU started from nothing but the node addresses can
//! find the newest catalogue again.
//!
//! Why it is built this way (the byte formats are in docs/format.md, section "Node
//! layout and metadata area"):
//!
//! - The nodes are plain NVMe namespaces: no server-side logic, no compare-and-swap.
//!   So every record is self-checking (magic, version, cluster id, crc32c) and every
//!   area is double-buffered: a root goes to the slot that does not hold the node's
//!   newest root, a checkpoint to the half its sequence number selects, so a write torn
//!   by a crash or power loss only destroys something that was never acknowledged.
//! - A checkpoint is written (FUA) to every reachable node before the root that
//!   references it, and the root only to nodes where that succeeded, so on any node a
//!   verified root's checkpoint was durable first. A node that missed a checkpoint
//!   (down, or newly added) is brought up to date from the in-memory copy before it
//!   gets the next root: the root is never written where its checkpoint is missing.
//! - A commit succeeds when `min_acks` nodes hold its root. The catalogue sets
//!   `min_acks` = f + 1, f the largest failures-to-tolerate of any volume. Then any
//!   set of nodes missing at most f of them contains at least one node that
//!   acknowledged the newest successful commit (f + 1 acknowledgers cannot all be
//!   among f missing nodes), so loading from such a set finds it; loading takes the
//!   highest generation that verifies and never falls back to an older one when the
//!   newest's checkpoint cannot be read (that is [`MetadataError::MetadataLost`]).
//! - Generations are never reused with different contents: a failed commit still
//!   consumes its generation, because its root may have reached some nodes. A failed
//!   commit can also have reached only nodes that a later load does not see, and a
//!   fresh engine could then reuse its numbers. So a generation carries a session
//!   number in its top 24 bits: every [`MetaStore::load`] starts a session one above
//!   the highest seen, and before its first commit restates the recovered root as
//!   counter 0 of the new session on `min_acks` nodes (the "opening"). A session whose
//!   opening is acknowledged is therefore seen by every later load (same quorum
//!   argument), which picks a higher session, and so the sessions' order is the
//!   order in time; leftovers of an older session, however high their counter,
//!   rank below everything the new session commits. Two sessions can only share a
//!   number if the first never got its opening acknowledged (so it committed
//!   nothing); then both openings restate states that were acceptable when loaded.
//! - Writes of one step go to all nodes at once (`join_all`), so a commit costs one
//!   round trip per step whatever the node count; nothing holds a lock across an
//!   await, and [`MetaStore`] takes `&mut self`: it is driven by one task.

mod codec;
mod layout;
mod slots;
mod store;
mod superblock;

use std::fmt;
use std::str::FromStr;

pub use layout::{
    minimum_capacity, NodeLayout, CKPT_OFFSET, MIB, ROOT_OFFSET, ROOT_SLOT_LEN, SUPERBLOCK_AREA,
};
pub use slots::{
    max_checkpoint_payload, max_root_payload, CheckpointRef, RootHeader, SlotState, HEADER_LEN,
};
pub use store::{
    generation_counter, generation_session, inspect_node, make_generation, CommitReport, MetaNode,
    MetaStore, NodeInspection, Recovered, MAX_COUNTER, MAX_SESSION, SESSION_SHIFT,
};
pub use superblock::{
    format_node, read_superblock, Superblock, FORMAT_VERSION, MAX_NODE_ID, SUPERBLOCK_LEN,
};

use crate::shard::ShardError;

/// Checkpoint images are padded to the largest block size any node may have, so one
/// image serves every node (and a node added later).
const MAX_BLOCK_PAD: u32 = layout::MAX_BLOCK;

/// A cluster's identity: 16 random bytes chosen when the cluster is created, recorded
/// in every node's superblock and every metadata record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterId(pub [u8; 16]);

impl ClusterId {
    /// A fresh random id from the system's CSPRNG.
    pub fn generate() -> Result<Self, MetadataError> {
        let mut id = [0u8; 16];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| MetadataError::Random)?;
        Ok(ClusterId(id))
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for ClusterId {
    type Err = MetadataError;

    /// Parses the 32 hex digits that `Display` prints.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MetadataError::InvalidClusterId { text: s.into() };
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut id = [0u8; 16];
        for (i, byte) in id.iter_mut().enumerate() {
            let digits = s.get(2 * i..2 * i + 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(digits, 16).map_err(|_| bad())?;
        }
        Ok(ClusterId(id))
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

fn pairs(items: &[(String, String)]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items
            .iter()
            .map(|(n, why)| format!("{n}: {why}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn clusters(items: &[(String, ClusterId)]) -> String {
    items
        .iter()
        .map(|(n, c)| format!("{n} in {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything that can go wrong in the metadata layer, with the node, offset and step.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// A shard operation failed (the shard error names the node).
    #[error("{op} at byte {offset}: {source}")]
    Shard {
        op: &'static str,
        offset: u64,
        #[source]
        source: ShardError,
    },
    /// A layout that cannot be planned or used.
    #[error("invalid node layout: {reason}")]
    InvalidLayout { reason: String },
    /// The namespace cannot hold the metadata areas and one chunk.
    #[error(
        "a {capacity}-byte namespace cannot hold the metadata areas and one {chunk_size}-byte \
         chunk; the minimum capacity is {minimum} bytes"
    )]
    CapacityTooSmall {
        capacity: u64,
        chunk_size: u64,
        minimum: u64,
    },
    /// A node id that cannot be recorded.
    #[error("invalid node id {node_id:?}: {reason}")]
    InvalidNodeId { node_id: String, reason: String },
    /// Not the hex form of a cluster id.
    #[error("invalid cluster id {text:?}: want 32 hex digits")]
    InvalidClusterId { text: String },
    /// Bytes on a node that carry our magic but do not verify.
    #[error("node {node}: {what} at byte {offset} is corrupt: {reason}")]
    Corrupt {
        node: String,
        what: &'static str,
        offset: u64,
        reason: String,
    },
    /// A record written by a format this code does not know.
    #[error("node {node}: {what} has format version {found}, this engine reads {supported}")]
    UnsupportedVersion {
        node: String,
        what: &'static str,
        found: u32,
        supported: u32,
    },
    /// Formatting a node that already belongs elsewhere.
    #[error(
        "node {shard} is formatted for cluster {found_cluster} as node {found_node:?}; refusing \
         to format it for cluster {cluster} as node {node_id:?}"
    )]
    AlreadyFormatted {
        shard: String,
        found_cluster: ClusterId,
        found_node: String,
        cluster: ClusterId,
        node_id: String,
    },
    /// Loading from a mix of formatted and blank nodes.
    #[error(
        "nodes {} are blank while {} are formatted; format or leave out the blank ones",
        list(.blank),
        list(.formatted)
    )]
    NotFormatted {
        blank: Vec<String>,
        formatted: Vec<String>,
    },
    /// Loading from nodes of different clusters (or not the expected one).
    #[error("nodes disagree on the cluster (expected {}): {}", .expected.map_or("any".into(), |c| c.to_string()), clusters(.nodes))]
    ClusterMismatch {
        expected: Option<ClusterId>,
        nodes: Vec<(String, ClusterId)>,
    },
    /// Two namespaces carry the same node id.
    #[error("node id {node} appears on more than one namespace")]
    DuplicateNode { node: String },
    /// No namespace could be read at all.
    #[error("no node is reachable: {}", pairs(.unreachable))]
    NoneReachable { unreachable: Vec<(String, String)> },
    /// A commit on a store without nodes.
    #[error("the metadata store has no nodes")]
    NoNodes,
    /// A payload larger than its area.
    #[error("{what} payload of {len} bytes exceeds the {max} bytes its area holds")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// Fewer than `min_acks` nodes acknowledged a commit's root.
    #[error(
        "commit of generation {generation} reached {} of the {needed} nodes needed (acked: {}); \
         failed: {}",
        .acked.len(),
        list(.acked),
        pairs(.failed)
    )]
    CommitFailed {
        generation: u64,
        needed: usize,
        acked: Vec<String>,
        failed: Vec<(String, String)>,
    },
    /// The newest root verifies, but its checkpoint verifies on no node that has it.
    #[error(
        "metadata lost: the checkpoint of generation {generation} verifies on no node ({})",
        pairs(.tried)
    )]
    MetadataLost {
        generation: u64,
        tried: Vec<(String, String)>,
    },
    /// A session or commit counter ran out.
    #[error("{what} exhausted")]
    Exhausted { what: &'static str },
    /// The CSPRNG failed.
    #[error("the system random number generator failed")]
    Random,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_id_hex_round_trip() {
        let id = ClusterId([0xab; 16]);
        let s = id.to_string();
        assert_eq!(s, "ab".repeat(16));
        assert_eq!(s.parse::<ClusterId>().ok(), Some(id));
        assert!("xyz".parse::<ClusterId>().is_err());
        assert!("é".repeat(16).parse::<ClusterId>().is_err());
        let a = ClusterId::generate().unwrap_or_else(|e| panic!("{e}"));
        let b = ClusterId::generate().unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(a, b);
    }
}
