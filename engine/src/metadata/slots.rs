//! Root slots and checkpoint halves: the two self-checking records of the metadata
//! area.
//!
//! A root is small and written whole at every commit; a checkpoint is large and
//! written only when the catalogue asks for one, so the root refers to it by
//! (sequence, length, crc32c) instead of carrying it; the reader finds the half whose
//! header matches, so each node can keep the half its newest root needs untouched. Each record carries the
//! cluster id, so bytes from another cluster's namespace are never taken for ours, and
//! a crc32c over everything, so a torn or rotten write is an invalid slot rather than
//! wrong metadata.

use super::codec::{round_up, Reader, Writer};
use super::layout::NodeLayout;
use super::{ClusterId, MetadataError};
use crate::pipeline::crc::{crc32c, crc32c_append};
use crate::shard::ShardStore;

/// Identifies a root slot.
pub const ROOT_MAGIC: [u8; 8] = *b"dpu-rt\0\x01";
/// Identifies a checkpoint half.
pub const CKPT_MAGIC: [u8; 8] = *b"dpu-ck\0\x01";
/// Format version of roots and checkpoints.
pub const SLOT_VERSION: u32 = 1;
/// Bytes of the root and checkpoint headers; the payload follows.
pub const HEADER_LEN: u32 = 128;
const HEADER: usize = 128;
/// Offset of the crc in both headers (the last 4 header bytes).
const CRC_AT: usize = HEADER - 4;
/// Root flag: the root restates "nothing committed yet" (see the store's sessions).
pub(crate) const FLAG_EMPTY: u32 = 1;

/// A root's reference to the checkpoint it goes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CheckpointRef {
    /// The checkpoint's sequence number (1, 2, ...).
    pub sequence: u64,
    /// Payload length in bytes.
    pub len: u64,
    /// crc32c of the payload.
    pub crc: u32,
}

/// A decoded root header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootHeader {
    /// The commit's generation (session in the top 24 bits, counter below).
    pub generation: u64,
    /// The root restates an empty store.
    pub empty: bool,
    /// The checkpoint this root goes with, if any.
    pub checkpoint: Option<CheckpointRef>,
    /// Payload length.
    pub payload_len: u64,
    /// crc32c over header and payload: two roots with the same generation and crc are
    /// the same root.
    pub crc: u32,
}

/// A root that verified: header and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootRecord {
    /// The header.
    pub header: RootHeader,
    /// The payload (the catalogue's opaque root bytes).
    pub payload: Vec<u8>,
}

/// What one root slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// No root magic: never written or invalidated.
    Blank,
    /// Something that is not a usable root of this cluster, and why.
    Invalid(String),
    /// A verified root.
    Valid(RootRecord),
}

/// The largest root payload a slot of `layout` holds.
pub fn max_root_payload(layout: &NodeLayout) -> u64 {
    layout.root_slot_len.saturating_sub(u64::from(HEADER_LEN))
}

/// The largest checkpoint payload a half of `layout` holds.
pub fn max_checkpoint_payload(layout: &NodeLayout) -> u64 {
    layout.ckpt_half_len.saturating_sub(u64::from(HEADER_LEN))
}

fn pad_to_block(mut v: Vec<u8>, block: u32) -> Vec<u8> {
    let len = round_up(v.len() as u64, u64::from(block)).unwrap_or(v.len() as u64);
    v.resize(usize::try_from(len).unwrap_or(v.len()), 0);
    v
}

/// Encodes a root (header, payload, zero padding to whole blocks).
pub(crate) fn encode_root(
    cluster: ClusterId,
    generation: u64,
    empty: bool,
    checkpoint: Option<CheckpointRef>,
    payload: &[u8],
    block: u32,
) -> Vec<u8> {
    let mut w = Writer::with_capacity(HEADER + payload.len());
    w.bytes(&ROOT_MAGIC);
    w.u32(SLOT_VERSION);
    w.u32(if empty { FLAG_EMPTY } else { 0 });
    w.bytes(&cluster.0);
    w.u64(generation);
    let c = checkpoint.unwrap_or(CheckpointRef {
        sequence: 0,
        len: 0,
        crc: 0,
    });
    w.u64(c.sequence);
    w.u64(c.len);
    w.u32(c.crc);
    // Reserved (the half is found by its header, so each node may use its own).
    w.u32(0);
    w.u64(payload.len() as u64);
    w.pad_to(CRC_AT);
    let mut v = w.into_vec();
    let crc = crc32c_append(crc32c(&v), payload);
    v.extend_from_slice(&crc.to_le_bytes());
    v.extend_from_slice(payload);
    pad_to_block(v, block)
}

/// Decodes the fixed header of a root from the slot's first bytes. `Ok(None)`: no
/// magic. `Err(reason)`: not a usable root header. An unsupported version is a hard
/// error (a newer writer's root must not be silently passed over).
fn decode_root_header(
    buf: &[u8],
    cluster: ClusterId,
    max_payload: u64,
) -> Result<Option<Result<RootHeader, String>>, u32> {
    let mut r = Reader::new(buf);
    if r.take(8) != Some(&ROOT_MAGIC[..]) {
        return Ok(None);
    }
    let Some(version) = r.u32() else {
        return Ok(Some(Err("truncated header".into())));
    };
    if version != SLOT_VERSION {
        return Err(version);
    }
    let parsed = (|| {
        let flags = r.u32()?;
        let found = ClusterId(r.bytes16()?);
        let generation = r.u64()?;
        let sequence = r.u64()?;
        let len = r.u64()?;
        let ckpt_crc = r.u32()?;
        let reserved = r.u32()?;
        let payload_len = r.u64()?;
        r.take(CRC_AT - r.position())?;
        let crc = r.u32()?;
        Some((
            flags,
            found,
            generation,
            sequence,
            len,
            ckpt_crc,
            reserved,
            payload_len,
            crc,
        ))
    })();
    let Some((flags, found, generation, sequence, len, ckpt_crc, reserved, payload_len, crc)) =
        parsed
    else {
        return Ok(Some(Err("truncated header".into())));
    };
    let header = (|| {
        if found != cluster {
            return Err(format!("root of cluster {found}, not {cluster}"));
        }
        if flags & !FLAG_EMPTY != 0 || reserved != 0 {
            return Err(format!(
                "unknown flags {flags:#x} or reserved bits {reserved:#x}"
            ));
        }
        if payload_len > max_payload {
            return Err(format!(
                "payload length {payload_len} exceeds the slot's {max_payload}"
            ));
        }
        let checkpoint = (sequence != 0).then_some(CheckpointRef {
            sequence,
            len,
            crc: ckpt_crc,
        });
        Ok(RootHeader {
            generation,
            empty: flags & FLAG_EMPTY != 0,
            checkpoint,
            payload_len,
            crc,
        })
    })();
    Ok(Some(header))
}

/// Reads and verifies root slot `slot` of a node. Shard errors are returned as errors
/// (the caller decides whether the node is unreachable or the slot unreadable).
pub(crate) async fn read_root_slot(
    shard: &dyn ShardStore,
    node: &str,
    layout: &NodeLayout,
    cluster: ClusterId,
    slot: u8,
) -> Result<SlotState, MetadataError> {
    let at = layout.root_slot_offset(slot);
    let block = u64::from(layout.block_size);
    let first = shard
        .read(at, block)
        .await
        .map_err(|source| MetadataError::Shard {
            op: "read root slot",
            offset: at,
            source,
        })?;
    let header = match decode_root_header(&first, cluster, max_root_payload(layout)) {
        Ok(None) => return Ok(SlotState::Blank),
        Ok(Some(Err(reason))) => return Ok(SlotState::Invalid(reason)),
        Ok(Some(Ok(h))) => h,
        Err(found) => {
            return Err(MetadataError::UnsupportedVersion {
                node: node.into(),
                what: "root",
                found,
                supported: SLOT_VERSION,
            })
        }
    };
    // payload_len was bounded by the slot length above, so this cannot overflow.
    let total = round_up(u64::from(HEADER_LEN) + header.payload_len, block).unwrap_or(block);
    let mut buf = first;
    if total > block {
        let rest = shard
            .read(at + block, total - block)
            .await
            .map_err(|source| MetadataError::Shard {
                op: "read root payload",
                offset: at + block,
                source,
            })?;
        buf.extend_from_slice(&rest);
    }
    let end = usize::try_from(u64::from(HEADER_LEN) + header.payload_len).unwrap_or(usize::MAX);
    let (Some(head), Some(payload)) = (buf.get(..CRC_AT), buf.get(HEADER..end)) else {
        return Ok(SlotState::Invalid("short read".into()));
    };
    let computed = crc32c_append(crc32c(head), payload);
    if computed != header.crc {
        return Ok(SlotState::Invalid(format!(
            "crc32c mismatch (stored {:#010x}, computed {computed:#010x})",
            header.crc
        )));
    }
    Ok(SlotState::Valid(RootRecord {
        payload: payload.to_vec(),
        header,
    }))
}

/// Encodes a checkpoint half (header, payload, zero padding to whole blocks).
pub(crate) fn encode_checkpoint(
    cluster: ClusterId,
    sequence: u64,
    payload: &[u8],
    block: u32,
) -> Vec<u8> {
    let mut w = Writer::with_capacity(HEADER + payload.len());
    w.bytes(&CKPT_MAGIC);
    w.u32(SLOT_VERSION);
    w.u32(0);
    w.bytes(&cluster.0);
    w.u64(sequence);
    w.u64(payload.len() as u64);
    w.u32(crc32c(payload));
    w.pad_to(CRC_AT);
    let mut v = w.into_vec();
    let crc = crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v.extend_from_slice(payload);
    pad_to_block(v, block)
}

/// The reference a root records for `payload` as checkpoint `sequence`.
pub(crate) fn checkpoint_ref(sequence: u64, payload: &[u8]) -> CheckpointRef {
    CheckpointRef {
        sequence,
        len: payload.len() as u64,
        crc: crc32c(payload),
    }
}

/// Decodes a checkpoint header: what the half claims to hold, or why it holds nothing
/// usable.
fn decode_checkpoint_header(buf: &[u8], cluster: ClusterId) -> Result<CheckpointRef, String> {
    let mut r = Reader::new(buf);
    if r.take(8) != Some(&CKPT_MAGIC[..]) {
        return Err("no checkpoint magic".into());
    }
    let fields = (|| {
        let version = r.u32()?;
        r.u32()?;
        let found = ClusterId(r.bytes16()?);
        let sequence = r.u64()?;
        let len = r.u64()?;
        let payload_crc = r.u32()?;
        Some((version, found, sequence, len, payload_crc))
    })();
    let Some((version, found, sequence, len, crc)) = fields else {
        return Err("truncated header".into());
    };
    let (Some(head), Some(stored)) = (buf.get(..CRC_AT), buf.get(CRC_AT..HEADER)) else {
        return Err("truncated header".into());
    };
    let stored = u32::from_le_bytes(stored.try_into().map_err(|_| "truncated header")?);
    if crc32c(head) != stored {
        return Err("header crc32c mismatch".into());
    }
    if version != SLOT_VERSION {
        return Err(format!("unsupported checkpoint version {version}"));
    }
    if found != cluster {
        return Err(format!("checkpoint of cluster {found}, not {cluster}"));
    }
    if sequence == 0 {
        return Err("checkpoint sequence 0".into());
    }
    Ok(CheckpointRef { sequence, len, crc })
}

/// Reads the header of checkpoint half `half`: `Ok(Ok(r))` when it claims to hold
/// checkpoint `r` (the payload is not read), `Ok(Err(reason))` when it holds nothing
/// usable.
pub(crate) async fn read_checkpoint_header(
    shard: &dyn ShardStore,
    layout: &NodeLayout,
    cluster: ClusterId,
    half: u8,
) -> Result<Result<CheckpointRef, String>, MetadataError> {
    let at = layout.ckpt_half_offset(half);
    let buf = shard
        .read(at, u64::from(layout.block_size))
        .await
        .map_err(|source| MetadataError::Shard {
            op: "read checkpoint header",
            offset: at,
            source,
        })?;
    Ok(decode_checkpoint_header(&buf, cluster))
}

/// Reads checkpoint half `half` of a node whole and verifies it against the root's
/// reference. `Ok(Err(reason))`: the half does not hold that checkpoint.
pub(crate) async fn read_checkpoint(
    shard: &dyn ShardStore,
    layout: &NodeLayout,
    cluster: ClusterId,
    half: u8,
    want: CheckpointRef,
) -> Result<Result<Vec<u8>, String>, MetadataError> {
    if want.len > max_checkpoint_payload(layout) {
        return Ok(Err(format!(
            "checkpoint length {} exceeds the half's {}",
            want.len,
            max_checkpoint_payload(layout)
        )));
    }
    let at = layout.ckpt_half_offset(half);
    let block = u64::from(layout.block_size);
    let total = round_up(u64::from(HEADER_LEN) + want.len, block).unwrap_or(block);
    let buf = shard
        .read(at, total)
        .await
        .map_err(|source| MetadataError::Shard {
            op: "read checkpoint",
            offset: at,
            source,
        })?;
    Ok(verify_checkpoint(&buf, cluster, want))
}

fn verify_checkpoint(
    buf: &[u8],
    cluster: ClusterId,
    want: CheckpointRef,
) -> Result<Vec<u8>, String> {
    let found = decode_checkpoint_header(buf, cluster)?;
    if found != want {
        return Err(format!(
            "holds checkpoint {} ({} bytes, crc {:#010x}), the root wants {} ({} bytes, crc \
             {:#010x})",
            found.sequence, found.len, found.crc, want.sequence, want.len, want.crc
        ));
    }
    let end = usize::try_from(u64::from(HEADER_LEN) + want.len).map_err(|_| "length overflows")?;
    let payload = buf.get(HEADER..end).ok_or("short read")?;
    let computed = crc32c(payload);
    if computed != want.crc {
        return Err(format!(
            "payload crc32c mismatch (want {:#010x}, computed {computed:#010x})",
            want.crc
        ));
    }
    Ok(payload.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trip_and_mismatch() {
        let c = ClusterId([7; 16]);
        let payload = b"catalogue".to_vec();
        let r = checkpoint_ref(3, &payload);
        assert_eq!(
            decode_checkpoint_header(&encode_checkpoint(c, 3, &payload, 512), c),
            Ok(r)
        );
        let bytes = encode_checkpoint(c, 3, &payload, 512);
        assert_eq!(bytes.len(), 512);
        assert_eq!(verify_checkpoint(&bytes, c, r), Ok(payload.clone()));
        assert!(verify_checkpoint(&bytes, ClusterId([8; 16]), r).is_err());
        let other = checkpoint_ref(5, &payload);
        assert!(verify_checkpoint(&bytes, c, other).is_err());
        let mut bad = bytes.clone();
        bad[HEADER] ^= 1;
        assert!(verify_checkpoint(&bad, c, r).is_err());
        for cut in [0, 8, 60, 127, 128, 130] {
            assert!(verify_checkpoint(&bytes[..cut], c, r).is_err());
        }
    }

    #[test]
    fn root_header_decodes_what_was_encoded() {
        let c = ClusterId([1; 16]);
        let ck = checkpoint_ref(2, b"x");
        let bytes = encode_root(c, 42, false, Some(ck), b"hello", 4096);
        let h = decode_root_header(&bytes, c, 1000)
            .ok()
            .flatten()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("root header did not decode"));
        assert_eq!(h.generation, 42);
        assert_eq!(h.checkpoint, Some(ck));
        assert_eq!(h.payload_len, 5);
        assert!(!h.empty);
        assert!(matches!(
            decode_root_header(&bytes, ClusterId([2; 16]), 1000),
            Ok(Some(Err(_)))
        ));
        assert!(matches!(decode_root_header(&bytes, c, 4), Ok(Some(Err(_)))));
        assert!(matches!(decode_root_header(&[0; 512], c, 4), Ok(None)));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert_eq!(decode_root_header(&v2, c, 1000), Err(2));
    }
}
