//! The pool's catalogue and checkpoint documents, as stored in the metadata area.
//!
//! Both are rkyv archives compressed with zstd (level 1): rkyv because decoding with
//! validation is a bounded walk over the bytes (no parser to fuzz beyond bytecheck),
//! zstd because segment tables and maps are repetitive. Every document starts with a
//! version the decoder checks. Byte layout: docs/format.md, section "Pool catalogue".

use rkyv::rancor::Error as RkyvError;
use rkyv::{Archive, Deserialize, Serialize};

use crate::volume::VolumeImage;

/// Version of the catalogue and checkpoint documents this build writes and reads.
pub const CATALOG_VERSION: u32 = 1;

/// A node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct CatalogNode {
    /// Node id (also in its superblock).
    pub id: String,
    /// NVMe/TCP address, `host:port`.
    pub address: String,
    /// Subsystem NQN.
    pub nqn: String,
    /// Failure-domain path, one component per level of the catalogue, the last one the
    /// node itself (`rack1/node5`).
    pub domain: String,
    /// Placement weight (0: no new pieces).
    pub weight: u32,
    /// 0 up, 1 draining, 2 out (removed: keeps its index).
    pub state: u8,
    /// Chunks on the node.
    pub chunk_count: u32,
    /// Byte offset of chunk 0 on the node (from its superblock's layout).
    pub chunk_offset: u64,
}

/// A segment of a volume: piece i is chunk `pieces[i].1` of node `pieces[i].0` (an
/// index into the catalogue's node list).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct CatalogSegment {
    /// Segment number within the volume.
    pub index: u64,
    /// Allocation order within the volume.
    pub alloc_seq: u64,
    /// (node index, chunk) per piece.
    pub pieces: Vec<(u16, u32)>,
}

/// A volume.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct CatalogVolume {
    /// Identity bound into every record.
    pub id: [u8; 16],
    /// Name (unique).
    pub name: String,
    /// The profile it was created with, as TOML.
    pub profile: String,
    /// Data strips.
    pub k: u8,
    /// Parity strips (copies - 1 for mirrors).
    pub m: u8,
    /// Whether the extra pieces are copies.
    pub mirror: bool,
    /// Compression setting, as `engine::pipeline::Compression` prints it.
    pub compression: String,
    /// Compression unit in bytes.
    pub compression_unit: u32,
    /// Size in 4 KiB blocks.
    pub blocks: u64,
    /// Strip size in bytes.
    pub strip_size: u64,
    /// Shard block in bytes.
    pub shard_block: u64,
    /// The data key wrapped under the KEK (absent: not encrypted).
    pub wrapped_key: Option<Vec<u8>>,
    /// The last writer epoch handed out (absent: never opened for writing).
    pub writer_epoch: Option<u32>,
    /// Next allocation sequence number.
    pub next_alloc_seq: u64,
    /// Segments allocated and not freed.
    pub segments: Vec<CatalogSegment>,
}

/// The root payload: the whole catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Catalog {
    /// [`CATALOG_VERSION`].
    pub version: u32,
    /// Bytes of every chunk (fixed when the cluster is created).
    pub chunk_size: u64,
    /// Failure-domain levels, outermost first, the last one the node itself.
    pub levels: Vec<String>,
    /// Nodes, by index (never reordered: segments refer to them by index).
    pub nodes: Vec<CatalogNode>,
    /// Volumes.
    pub volumes: Vec<CatalogVolume>,
}

/// The checkpoint payload: the latest image of every volume.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct CheckpointDoc {
    /// [`CATALOG_VERSION`].
    pub version: u32,
    /// (volume id, image).
    pub images: Vec<([u8; 16], VolumeImage)>,
}

/// Why a stored document could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Serialization failed (a bug) or the bytes are not a valid archive.
    #[error("{what}: {reason}")]
    Codec {
        /// Which document.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The document was written by another version.
    #[error("{what} version {found}, this build reads {CATALOG_VERSION}")]
    Version {
        /// Which document.
        what: &'static str,
        /// Version found.
        found: u32,
    },
}

/// Largest decompressed document accepted (bounds what damaged bytes can make us
/// allocate).
const MAX_DOCUMENT: usize = 1 << 30;

fn encode<T>(what: &'static str, value: &T) -> Result<Vec<u8>, CatalogError>
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            RkyvError,
        >,
    >,
{
    let bytes = rkyv::to_bytes::<RkyvError>(value).map_err(|e| CatalogError::Codec {
        what,
        reason: e.to_string(),
    })?;
    zstd::bulk::compress(&bytes, 1).map_err(|e| CatalogError::Codec {
        what,
        reason: e.to_string(),
    })
}

fn inflate(what: &'static str, bytes: &[u8]) -> Result<rkyv::util::AlignedVec, CatalogError> {
    let raw = zstd::bulk::decompress(bytes, MAX_DOCUMENT).map_err(|e| CatalogError::Codec {
        what,
        reason: format!("decompressing: {e}"),
    })?;
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(raw.len());
    aligned.extend_from_slice(&raw);
    Ok(aligned)
}

impl Catalog {
    /// The root payload.
    pub fn encode(&self) -> Result<Vec<u8>, CatalogError> {
        encode("catalogue", self)
    }

    /// Parses a root payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, CatalogError> {
        let aligned = inflate("catalogue", bytes)?;
        let c: Catalog =
            rkyv::from_bytes::<Catalog, RkyvError>(&aligned).map_err(|e| CatalogError::Codec {
                what: "catalogue",
                reason: e.to_string(),
            })?;
        if c.version != CATALOG_VERSION {
            return Err(CatalogError::Version {
                what: "catalogue",
                found: c.version,
            });
        }
        Ok(c)
    }
}

impl CheckpointDoc {
    /// The checkpoint payload.
    pub fn encode(&self) -> Result<Vec<u8>, CatalogError> {
        encode("checkpoint", self)
    }

    /// Parses a checkpoint payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, CatalogError> {
        let aligned = inflate("checkpoint", bytes)?;
        let c: CheckpointDoc =
            rkyv::from_bytes::<CheckpointDoc, RkyvError>(&aligned).map_err(|e| {
                CatalogError::Codec {
                    what: "checkpoint",
                    reason: e.to_string(),
                }
            })?;
        if c.version != CATALOG_VERSION {
            return Err(CatalogError::Version {
                what: "checkpoint",
                found: c.version,
            });
        }
        Ok(c)
    }
}
