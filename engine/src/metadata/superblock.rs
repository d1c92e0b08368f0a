//! The superblock: what a node namespace is (cluster, node id, geometry), in two copies.
//!
//! Two copies at fixed offsets, each written with FUA and checked by crc32c, so that a
//! torn write or a bad sector in one still leaves the node readable. Format writes
//! the copies one after the other, so at most one can be torn.

use std::fmt;

use super::codec::{Reader, Writer};
use super::layout::{NodeLayout, SUPERBLOCK_OFFSET};
use super::{ClusterId, MetadataError};
use crate::pipeline::crc::crc32c;
use crate::shard::{ShardError, ShardStore};

/// Identifies a superblock copy.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"dpu-sb\0\x01";
/// The superblock format this code writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes one superblock copy occupies (a whole block when blocks are larger).
pub const SUPERBLOCK_LEN: u64 = 4096;
/// Longest node id, in bytes of UTF-8.
pub const MAX_NODE_ID: usize = 255;

/// One node namespace's identity and geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Format version of the node's metadata ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// The cluster the node belongs to.
    pub cluster: ClusterId,
    /// The node's id in the cluster map.
    pub node_id: String,
    /// Where everything lives on the namespace.
    pub layout: NodeLayout,
}

fn copy_len(block_size: u32) -> u64 {
    SUPERBLOCK_LEN.max(u64::from(block_size))
}

pub(crate) fn check_node_id(node_id: &str) -> Result<(), MetadataError> {
    if node_id.is_empty() || node_id.len() > MAX_NODE_ID {
        return Err(MetadataError::InvalidNodeId {
            node_id: node_id.into(),
            reason: format!("must be 1 to {MAX_NODE_ID} bytes"),
        });
    }
    Ok(())
}

impl Superblock {
    /// The bytes of one copy, padded to its slot.
    pub fn encode(&self) -> Vec<u8> {
        let l = &self.layout;
        let mut w = Writer::with_capacity(4096);
        w.bytes(&SUPERBLOCK_MAGIC);
        w.u32(self.format_version);
        // Length of everything before the crc, patched below.
        w.u32(0);
        w.bytes(&self.cluster.0);
        w.u32(l.block_size);
        w.u64(l.capacity);
        w.u64(l.root_offset);
        w.u64(l.root_slot_len);
        w.u64(l.ckpt_offset);
        w.u64(l.ckpt_half_len);
        w.u64(l.chunk_offset);
        w.u64(l.chunk_size);
        w.u32(l.chunk_count);
        let id = self.node_id.as_bytes();
        // Callers checked the id length (check_node_id); clamp anyway, never panic.
        let id = &id[..id.len().min(MAX_NODE_ID)];
        w.u16(u16::try_from(id.len()).unwrap_or(0));
        w.bytes(id);
        let body_len = u32::try_from(w.len()).unwrap_or(0);
        let mut v = w.into_vec();
        v[12..16].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        let len = usize::try_from(copy_len(l.block_size)).unwrap_or(4096);
        v.resize(len, 0);
        v
    }

    /// Decodes one copy. `Ok(None)`: no magic (blank). Errors: unsupported version or
    /// corruption, described for `node` at `offset`.
    pub fn decode(
        buf: &[u8],
        node: &str,
        offset: u64,
    ) -> Result<Option<Superblock>, MetadataError> {
        let corrupt = |reason: String| MetadataError::Corrupt {
            node: node.into(),
            what: "superblock",
            offset,
            reason,
        };
        let mut r = Reader::new(buf);
        if r.take(8) != Some(&SUPERBLOCK_MAGIC[..]) {
            return Ok(None);
        }
        let version = r.u32().ok_or_else(|| corrupt("truncated".into()))?;
        if version != FORMAT_VERSION {
            return Err(MetadataError::UnsupportedVersion {
                node: node.into(),
                what: "superblock",
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let body_len = r.u32().ok_or_else(|| corrupt("truncated".into()))?;
        let body_len = usize::try_from(body_len).map_err(|_| corrupt("bad length".into()))?;
        let body = buf
            .get(..body_len)
            .ok_or_else(|| corrupt(format!("length {body_len} exceeds the copy")))?;
        let stored = buf
            .get(body_len..body_len.saturating_add(4))
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| corrupt(format!("length {body_len} exceeds the copy")))?;
        let computed = crc32c(body);
        if stored != computed {
            return Err(corrupt(format!(
                "crc32c mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let mut r = Reader::new(body);
        r.take(16);
        let parsed = (|| {
            let cluster = ClusterId(r.bytes16()?);
            let layout = NodeLayout {
                block_size: r.u32()?,
                capacity: r.u64()?,
                root_offset: r.u64()?,
                root_slot_len: r.u64()?,
                ckpt_offset: r.u64()?,
                ckpt_half_len: r.u64()?,
                chunk_offset: r.u64()?,
                chunk_size: r.u64()?,
                chunk_count: r.u32()?,
            };
            let id_len = usize::from(r.u16()?);
            let id = r.take(id_len)?;
            Some((cluster, layout, id, r.position()))
        })();
        let (cluster, layout, id, used) =
            parsed.ok_or_else(|| corrupt("fields run past the recorded length".into()))?;
        if used != body_len {
            return Err(corrupt("trailing bytes inside the recorded length".into()));
        }
        let node_id = std::str::from_utf8(id)
            .map_err(|_| corrupt("node id is not UTF-8".into()))?
            .to_owned();
        check_node_id(&node_id).map_err(|e| corrupt(e.to_string()))?;
        Ok(Some(Superblock {
            format_version: version,
            cluster,
            node_id,
            layout,
        }))
    }
}

impl fmt::Display for Superblock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node {} of cluster {} (format {}, {} chunks of {} bytes)",
            self.node_id,
            self.cluster,
            self.format_version,
            self.layout.chunk_count,
            self.layout.chunk_size
        )
    }
}

fn shard_err(op: &'static str, offset: u64, source: ShardError) -> MetadataError {
    MetadataError::Shard { op, offset, source }
}

/// Reads one copy: `Ok(Err(e))` is a copy that could not be used (media error or
/// corruption); a path failure is returned as the outer error.
async fn read_copy(
    shard: &dyn ShardStore,
    offset: u64,
) -> Result<Result<Option<Superblock>, MetadataError>, MetadataError> {
    let info = shard.info();
    let len = copy_len(info.block_size);
    match shard.read(offset, len).await {
        Ok(buf) => Ok(Superblock::decode(&buf, &info.node, offset)),
        Err(e) if e.is_transient() => Err(shard_err("read superblock", offset, e)),
        Err(e) => Ok(Err(shard_err("read superblock", offset, e))),
    }
}

/// Reads a node's superblock. `Ok(None)`: blank (no magic in either copy). A copy that
/// is unreadable or corrupt is ignored when the other one is good; both bad, an
/// unsupported version in either, or two good copies that disagree are errors.
pub async fn read_superblock(shard: &dyn ShardStore) -> Result<Option<Superblock>, MetadataError> {
    let info = shard.info();
    let backup_at = NodeLayout::backup_superblock_offset(info.block_size);
    let end = backup_at.checked_add(copy_len(info.block_size));
    if end.is_none_or(|end| end > info.capacity_bytes) {
        return Err(MetadataError::InvalidLayout {
            reason: format!(
                "node {} has {} bytes, too small for the superblock copies",
                info.node, info.capacity_bytes
            ),
        });
    }
    let (primary, backup) = futures::join!(
        read_copy(shard, SUPERBLOCK_OFFSET),
        read_copy(shard, backup_at)
    );
    let (primary, backup) = (primary?, backup?);
    let unsupported = |r: &Result<Option<Superblock>, MetadataError>| {
        matches!(r, Err(MetadataError::UnsupportedVersion { .. }))
    };
    if unsupported(&primary) {
        return primary;
    }
    if unsupported(&backup) {
        return backup;
    }
    let chosen = match (primary, backup) {
        (Ok(Some(a)), Ok(Some(b))) => {
            if a != b {
                return Err(MetadataError::Corrupt {
                    node: info.node.clone(),
                    what: "superblock",
                    offset: backup_at,
                    reason: format!("the two copies disagree: {a} / {b}"),
                });
            }
            a
        }
        (Ok(Some(a)), _) | (_, Ok(Some(a))) => a,
        (Ok(None), Ok(None)) => return Ok(None),
        // One copy blank and the other bad, or both bad: report the primary's reason
        // (or the backup's if the primary is merely blank).
        (Err(e), _) | (Ok(None), Err(e)) => return Err(e),
    };
    chosen
        .layout
        .validate(info.block_size, info.capacity_bytes)
        .map_err(|reason| MetadataError::Corrupt {
            node: info.node.clone(),
            what: "superblock layout",
            offset: SUPERBLOCK_OFFSET,
            reason,
        })?;
    Ok(Some(chosen))
}

/// Formats a node for `cluster` as `node_id` with chunks of `chunk_size` bytes.
///
/// Idempotent: a node already formatted for the same cluster and node id is left as
/// it is and its superblock returned. A node formatted for another cluster or under
/// another id is refused. On a blank node, both root slots are invalidated first (so
/// no root from an earlier life of the namespace can come back), then the primary and
/// the backup superblock are written, each with FUA.
pub async fn format_node(
    shard: &dyn ShardStore,
    cluster: ClusterId,
    node_id: &str,
    chunk_size: u64,
) -> Result<Superblock, MetadataError> {
    check_node_id(node_id)?;
    let info = shard.info();
    if let Some(existing) = read_superblock(shard).await? {
        if existing.cluster == cluster && existing.node_id == node_id {
            return Ok(existing);
        }
        return Err(MetadataError::AlreadyFormatted {
            shard: info.node.clone(),
            found_cluster: existing.cluster,
            found_node: existing.node_id,
            cluster,
            node_id: node_id.into(),
        });
    }
    let layout = NodeLayout::plan(info.capacity_bytes, info.block_size, chunk_size)?;
    let sb = Superblock {
        format_version: FORMAT_VERSION,
        cluster,
        node_id: node_id.into(),
        layout,
    };
    let block = u64::from(info.block_size);
    let zero = usize::try_from(block).unwrap_or(4096);
    let invalidate = [0u8, 1].map(|slot| {
        let at = layout.root_slot_offset(slot);
        async move {
            shard
                .write(at, vec![0; zero], true)
                .await
                .map_err(|e| shard_err("invalidate root slot", at, e))
        }
    });
    for r in futures::future::join_all(invalidate).await {
        r?;
    }
    let bytes = sb.encode();
    shard
        .write(SUPERBLOCK_OFFSET, bytes.clone(), true)
        .await
        .map_err(|e| shard_err("write superblock", SUPERBLOCK_OFFSET, e))?;
    let backup_at = NodeLayout::backup_superblock_offset(info.block_size);
    shard
        .write(backup_at, bytes, true)
        .await
        .map_err(|e| shard_err("write backup superblock", backup_at, e))?;
    Ok(sb)
}
