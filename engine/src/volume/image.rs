//! A volume's checkpoint: everything replay needs besides the log itself.
//!
//! The image is what the pool serializes (rkyv, then zstd) into the mirrored metadata
//! area. It holds the map, the row tables of the segments it describes, and the
//! generation from which records found in the log are newer than the image: replay
//! applies a record only if its generation is at least `next_generation`, which is also
//! what makes stale records (from freed and reused chunks) harmless.
//! Byte layout: docs/format.md, section "Volume checkpoint".

use rkyv::{Archive, Deserialize, Serialize};

/// Version of the image layout; checked when an image is decoded.
pub const IMAGE_VERSION: u32 = 1;

/// One segment as of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct SegmentImage {
    /// Segment number within the volume.
    pub index: u64,
    /// First block of each sealed row within the chunk.
    pub row_starts: Vec<u32>,
    /// Shard blocks of each data strip of each row (k per row).
    pub row_blocks: Vec<u16>,
    /// Blocks of the chunk used by sealed rows.
    pub used_blocks: u64,
    /// No more rows will be written to it (full, failed, or replayed).
    pub closed: bool,
    /// Logical blocks ever stored in it (for the garbage collector's live ratio).
    pub stored_blocks: u64,
}

/// One page of the map (see `engine::map`).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct MapPageImage {
    /// Page number (LBA / 256).
    pub page: u64,
    /// In-page indices, ascending.
    pub keys: Vec<u8>,
    /// Packed locations, one per key.
    pub values: Vec<u128>,
}

/// A volume's checkpoint. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct VolumeImage {
    /// [`IMAGE_VERSION`] when written.
    pub version: u32,
    /// Records with a generation at least this are newer than the image.
    pub next_generation: u64,
    /// The segment that was open: rows after its `used_blocks` are replayed.
    pub tail: Option<u64>,
    /// Every segment the volume holds.
    pub segments: Vec<SegmentImage>,
    /// The map.
    pub map: Vec<MapPageImage>,
}
