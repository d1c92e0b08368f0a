//! A volume: logical 4 KiB blocks stored as records in stripe rows of segments placed
//! on the storage nodes.
//!
//! One task owns a volume (DESIGN: a volume is owned by one reactor), so every
//! operation takes `&mut self` and no lock exists to be held across an `.await`. Inside
//! an operation the nodes are driven concurrently (all pieces of a row are written at
//! once; a reconstruction reads its k strips at once).
//!
//! Write: the blocks of one write become records of up to the compression unit, each
//! sealed by the pipeline with a fresh generation and appended to the open row (see
//! `engine::layout`). Deallocate and write zeroes append zero records, so replay after
//! a crash cannot bring back what the host removed.
//! - Without a write cache (the default) a write returns only when every piece of every
//!   row holding it is durable (written with FUA); the map points at a record only once
//!   its row is durable. Callers that batch ([`Volume::write_batch`]) get group commit:
//!   all writes of the batch share rows and one seal.
//! - With a write cache (`write_cache`, which a front-end then advertises as a volatile
//!   write cache) a write returns once its records are in the open row; the row is
//!   sealed when full, on flush, on a FUA write, or when the owner calls
//!   [`Volume::seal_open_row`] at the end of its batching window.
//!
//! A row whose pieces cannot all be made durable is never retried in place: its records
//! (position-independent: the AAD binds volume, LBA and generation, not location) are
//! moved to a row of a fresh segment placed away from the failed nodes, and the failed
//! segment is closed. So writes carry on while a node is down, and every acknowledged
//! row is complete on k + m nodes.
//!
//! Read: the map gives the record; only its bytes (rounded to shard blocks) are read,
//! from its one data strip. On an unreachable node, a media error, or a record that
//! fails its crc, AEAD or identity check, the same byte range is read from the other
//! pieces and the strip rebuilt from k of them; every combination of k available pieces
//! is tried until one yields a record that verifies, so a corrupt parity strip cannot
//! smuggle wrong bytes in. A rebuilt piece goes to the repair queue
//! ([`Volume::run_repairs`]). If nothing verifies, the read fails; unverified bytes are
//! never returned.
//!
//! Durability of the volume's own state: segments are recorded by the
//! [`SegmentSource`] before use; [`Volume::checkpoint`] stores an image of the map and
//! row tables; [`Volume::open`] loads the image and replays the rows written after it
//! from the record headers on the nodes (`replay.rs`). Garbage collection
//! ([`Volume::collect_garbage`]) copies the live records of mostly-dead segments into
//! new rows and frees the old segments in the same checkpoint that stops referencing
//! them, so old space is reused only once the map that no longer needs it is durable.

pub mod device;
mod gc;
pub mod image;
mod read;
mod rebuild;
mod replay;
pub mod source;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;

use crate::layout::{Geometry, LayoutError, OpenRow, SegmentRows};
use crate::map::{BlockMap, Location, MAX_GENERATION};
use crate::pipeline::{
    coder_for, Compression, DataKey, EpochStore, ErasureCoder, Expected, NonceAllocator,
    PipelineError, RecordPipeline, VolumeId, BLOCK_SIZE,
};
use crate::shard::{ShardError, ShardStore};

pub use gc::GcReport;
pub use image::VolumeImage;
pub use read::{ReadDone, ReadPlan};
pub use rebuild::RebuildProgress;
pub use source::{InMemorySource, SegmentGrant, SegmentPiece, SegmentSource};

/// Logical block size in bytes, as u64.
const BLOCK: u64 = 4096;
/// Bytes a record adds to its payload at most: header and GCM tag.
const RECORD_OVERHEAD: u64 = 64;
/// Most k-subsets a reconstruction tries before giving up.
const MAX_COMBINATIONS: usize = 512;
/// Most times one row is moved to a fresh segment after failed writes.
const MAX_RELOCATIONS: usize = 3;
/// How long new segments avoid a node after it failed a write.
const DEFAULT_RETRY_NODE_AFTER: Duration = Duration::from_secs(30);
/// Largest zero record (blocks).
const MAX_ZERO_RECORD: u64 = u32::MAX as u64;
/// Segments opened since the last checkpoint that trigger a new one (bounds replay).
const CHECKPOINT_EVERY_SEGMENTS: u64 = 4;

/// Errors of the volume layer, per request.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The request reaches past the end of the volume.
    #[error("blocks {lba}+{blocks} are beyond the volume's {capacity} blocks")]
    OutOfRange {
        /// First LBA asked for.
        lba: u64,
        /// Blocks asked for.
        blocks: u64,
        /// Volume size in blocks.
        capacity: u64,
    },
    /// Data is not a whole, non-zero number of 4 KiB blocks.
    #[error("write of {len} bytes is not a whole, non-zero number of 4096-byte blocks")]
    BadLength {
        /// Bytes supplied.
        len: usize,
    },
    /// No segment could be allocated.
    #[error("no space for a new segment: {reason}")]
    NoSpace {
        /// Why.
        reason: String,
    },
    /// A row could not be made durable on every piece, even after moving it to fresh
    /// segments; the write is not acknowledged.
    #[error("row not durable after {attempts} placements: piece {piece} on node {node}: {source}")]
    NotDurable {
        /// Placements tried.
        attempts: usize,
        /// Piece index that failed last.
        piece: usize,
        /// Its node.
        node: String,
        /// The shard's error.
        source: ShardError,
    },
    /// Too few pieces reachable to read or rebuild the data.
    #[error("LBA {lba} unavailable: {reason}")]
    Unavailable {
        /// LBA whose record could not be read.
        lba: u64,
        /// What was missing.
        reason: String,
    },
    /// The data could not be verified or rebuilt into something that verifies.
    #[error("media error at LBA {lba}: {reason}")]
    Media {
        /// LBA whose record could not be verified.
        lba: u64,
        /// Why.
        reason: String,
    },
    /// Every generation number the map can hold has been used.
    #[error("generation numbers exhausted")]
    GenerationExhausted,
    /// Bad configuration.
    #[error("bad volume configuration: {0}")]
    Config(String),
    /// The stored state of the volume is inconsistent (checkpoint or segment records).
    #[error("volume state damaged: {0}")]
    Damaged(String),
    /// The segment source (pool) failed.
    #[error("metadata: {0}")]
    Metadata(String),
    /// The layout refused the geometry or a row.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Sealing a record failed (compression or crypto library, nonce exhaustion).
    #[error("sealing a record: {0}")]
    Pipeline(#[from] PipelineError),
}

/// What a volume is made of; derived from a storage profile and the pool.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// The volume's identity (bound into every record's AAD and crc).
    pub id: VolumeId,
    /// Data strips per row (1 for mirrors).
    pub k: usize,
    /// Parity strips per row (copies - 1 for mirrors, 0 for a single copy).
    pub m: usize,
    /// Record compression.
    pub compression: Compression,
    /// Most bytes per record (whole 4 KiB blocks, at most 1 MiB).
    pub compression_unit: u32,
    /// Volume size in 4 KiB blocks.
    pub blocks: u64,
    /// Most bytes of one data strip in one row.
    pub strip_size: u64,
    /// The unit every piece is written in (the largest node block size).
    pub shard_block: u64,
    /// Bytes of one piece of a segment (the pool's chunk size).
    pub chunk_size: u64,
    /// Acknowledge writes before their row is durable (flush makes them durable).
    pub write_cache: bool,
}

impl VolumeConfig {
    /// Defaults for `layout` (as `placement` resolves a profile): 32 KiB compression
    /// unit, 128 KiB strips, 512-byte shard blocks, 8 MiB chunks, no write cache.
    pub fn new(id: VolumeId, layout: placement::Layout, blocks: u64) -> Self {
        Self {
            id,
            k: usize::from(layout.data),
            m: usize::from(layout.parity),
            compression: Compression::Off,
            compression_unit: 32 * 1024,
            blocks,
            strip_size: 128 * 1024,
            shard_block: 512,
            chunk_size: 8 << 20,
            write_cache: false,
        }
    }

    /// The settings a profile asks for (compression and unit; encryption is decided
    /// by whether the volume gets a key).
    pub fn with_profile(mut self, profile: &placement::Profile) -> Self {
        self.compression = match profile.compression {
            placement::Compression::Off => Compression::Off,
            placement::Compression::Lz4 => Compression::Lz4,
            placement::Compression::Zstd { level } => Compression::Zstd {
                level: i32::from(level),
            },
        };
        self.compression_unit = profile.compression_unit;
        self
    }
}

/// Counters of what the volume did; bytes are what crossed the shard interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeStats {
    /// Bytes the host wrote (whole blocks).
    pub host_bytes_written: u64,
    /// Bytes written to shards for rows (including rows written by GC).
    pub shard_bytes_written: u64,
    /// Of those, bytes of rows holding records moved by garbage collection.
    pub gc_bytes_written: u64,
    /// Bytes written to shards by repairs.
    pub repair_bytes_written: u64,
    /// Bytes read from shards.
    pub shard_bytes_read: u64,
    /// Rows sealed and durable.
    pub rows_sealed: u64,
    /// Rows moved to a fresh segment after a piece failed.
    pub rows_relocated: u64,
    /// Times a row was written again after every placement failed to reach its nodes
    /// (see [`Volume::set_outage_wait`]).
    pub outage_retries: u64,
    /// Records served by one read of their own strip.
    pub direct_reads: u64,
    /// Records rebuilt from other pieces.
    pub reconstructions: u64,
    /// Pieces rewritten by the repair queue.
    pub repairs_done: u64,
    /// Checkpoints stored.
    pub checkpoints: u64,
    /// Segments freed by garbage collection.
    pub segments_freed: u64,
    /// Records moved by garbage collection.
    pub records_moved: u64,
    /// Rows found and applied by log replay when the volume was opened.
    pub rows_replayed: u64,
    /// Bytes of pieces written by rebuilds (moving pieces off nodes being left).
    pub rebuild_bytes_written: u64,
}

/// A rebuilt piece range waiting to be written back.
#[derive(Debug, Clone)]
struct Repair {
    /// The segment and piece it belongs to, and the piece's node and chunk when the
    /// damage was found: the repair is dropped if the piece has moved since (rebuilt
    /// elsewhere) or the segment was freed.
    segment: u64,
    piece: usize,
    node: String,
    base: u64,
    shard: Arc<dyn ShardStore>,
    /// Absolute byte offset on the node.
    offset: u64,
    bytes: Vec<u8>,
}

/// A segment the volume holds.
#[derive(Debug)]
struct Segment {
    pieces: Vec<SegmentPiece>,
    rows: SegmentRows,
    used_blocks: u64,
    closed: bool,
    /// Logical blocks mapped to records in this segment now.
    live_blocks: u64,
    /// Logical blocks ever stored in it.
    stored_blocks: u64,
}

/// What a record in the open row does to the map once its row is durable.
#[derive(Debug, Clone, Copy)]
enum Effect {
    /// Map `count` blocks from `first_lba` to it (unless already mapped: write cache).
    Data {
        first_lba: u64,
        count: u64,
        generation: u64,
        mapped: bool,
    },
    /// Unmap `count` blocks from `first_lba` (unless already done: write cache).
    Zeroes {
        first_lba: u64,
        count: u64,
        applied: bool,
    },
    /// A record moved by GC: remap the blocks that still point at `from`.
    Moved {
        from: Location,
        first_lba: u64,
        count: u64,
    },
}

/// A volume. See the module documentation.
#[derive(Debug)]
pub struct Volume {
    config: VolumeConfig,
    geometry: Geometry,
    coder: Option<Box<dyn ErasureCoder>>,
    pipeline: RecordPipeline,
    source: Arc<dyn SegmentSource>,
    map: BlockMap,
    segments: BTreeMap<u64, Segment>,
    open_segment: Option<u64>,
    open: Option<OpenRow>,
    effects: Vec<Effect>,
    /// With a write cache: the open row's seal failed; seal it before appending more.
    open_failed: bool,
    generation: u64,
    /// Nodes that failed a write, and when; new segments avoid each for
    /// `retry_node_after`, then try it again (a node that is still down fails one row
    /// write and is avoided again; one that came back takes its share again).
    avoid: Vec<(String, std::time::Instant)>,
    retry_node_after: Duration,
    /// How long a row whose every placement failed to reach its nodes is retried
    /// before the write fails (see [`Volume::set_outage_wait`]).
    outage_wait: Duration,
    segments_since_checkpoint: u64,
    /// Segments no longer referenced, to be freed by the next checkpoint.
    pending_free: Vec<u64>,
    repairs: VecDeque<Repair>,
    stats: VolumeStats,
    scratch: Vec<u8>,
    decoded: Vec<u8>,
    /// What reads running outside the owner share (see `read.rs`).
    reader: Arc<read::ReadContext>,
    /// Reads in flight per segment: a pinned segment is not released to the pool.
    pins: BTreeMap<u64, u32>,
    /// Pieces being moved off nodes (see `rebuild.rs`).
    rebuild: Option<rebuild::Rebuild>,
}

impl Volume {
    /// Opens a volume: an empty one when `segments` is empty and `image` is `None`,
    /// otherwise the state the nodes hold (the checkpoint `image`, then the rows written
    /// after it, replayed from their record headers). With `key` records are encrypted
    /// and a new writer epoch is taken from `epochs` (durable before any write). Ends
    /// with a checkpoint, so the replayed tail is not replayed again.
    pub async fn open(
        config: VolumeConfig,
        source: Arc<dyn SegmentSource>,
        key: Option<&DataKey>,
        epochs: &mut (dyn EpochStore + Send),
        segments: Vec<SegmentGrant>,
        image: Option<VolumeImage>,
    ) -> Result<Self, VolumeError> {
        let mut volume = Self::new(config, source, key, epochs)?;
        volume.restore(segments, image).await?;
        volume.checkpoint(Vec::new()).await?;
        Ok(volume)
    }

    fn new(
        config: VolumeConfig,
        source: Arc<dyn SegmentSource>,
        key: Option<&DataKey>,
        epochs: &mut dyn EpochStore,
    ) -> Result<Self, VolumeError> {
        let unit = u64::from(config.compression_unit);
        if unit == 0 || unit % BLOCK != 0 || unit > 256 * BLOCK {
            return Err(VolumeError::Config(format!(
                "compression unit {unit} must be 1 to 256 whole 4 KiB blocks"
            )));
        }
        if config.blocks == 0 {
            return Err(VolumeError::Config("volume of zero blocks".into()));
        }
        let geometry = Geometry::new(
            config.k,
            config.m,
            config.strip_size,
            config.shard_block,
            config.chunk_size,
        )?;
        if geometry.round_up(unit + RECORD_OVERHEAD) > geometry.strip_size {
            return Err(VolumeError::Config(format!(
                "a strip of {} bytes cannot hold a record of {unit} bytes plus its header",
                geometry.strip_size
            )));
        }
        let coder = if config.m == 0 {
            None
        } else {
            Some(coder_for(config.k, config.m)?)
        };
        let nonces = match key {
            Some(_) => Some(NonceAllocator::open(epochs)?),
            None => None,
        };
        let pipeline = RecordPipeline::new(config.id, config.compression, key, nonces)?;
        let reader = Arc::new(read::ReadContext::new(
            config.id,
            config.compression,
            key,
            geometry,
        ));
        Ok(Self {
            config,
            geometry,
            coder,
            pipeline,
            source,
            map: BlockMap::new(),
            segments: BTreeMap::new(),
            open_segment: None,
            open: None,
            effects: Vec::new(),
            open_failed: false,
            generation: 1,
            avoid: Vec::new(),
            retry_node_after: DEFAULT_RETRY_NODE_AFTER,
            outage_wait: Duration::ZERO,
            segments_since_checkpoint: 0,
            pending_free: Vec::new(),
            repairs: VecDeque::new(),
            stats: VolumeStats::default(),
            scratch: Vec::new(),
            decoded: Vec::new(),
            reader,
            pins: BTreeMap::new(),
            rebuild: None,
        })
    }

    /// The volume's configuration.
    pub fn config(&self) -> &VolumeConfig {
        &self.config
    }

    /// The layout geometry in use.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// What the volume has done so far.
    pub fn stats(&self) -> VolumeStats {
        self.stats
    }

    /// Heap bytes of the LBA map.
    pub fn map_memory_bytes(&self) -> usize {
        self.map.memory_bytes()
    }

    /// Heap bytes of the row tables (strip lengths for reconstruction).
    pub fn row_table_memory_bytes(&self) -> usize {
        self.segments.values().map(|s| s.rows.memory_bytes()).sum()
    }

    /// Blocks currently mapped (written and not deallocated or zeroed).
    pub fn mapped_blocks(&self) -> u64 {
        self.map.mapped_blocks()
    }

    /// Where `lba` lives, if it is mapped (for tests and tools).
    pub fn locate(&self, lba: u64) -> Option<Location> {
        self.map.get(lba)
    }

    /// The nodes holding the pieces of the segment `lba`'s record is in.
    pub fn nodes_of(&self, lba: u64) -> Option<Vec<String>> {
        let loc = self.map.get(lba)?;
        let (seg, _) = self.geometry.segment_of(loc.row);
        self.segments
            .get(&seg)
            .map(|s| s.pieces.iter().map(|p| p.node.clone()).collect())
    }

    /// Where the record holding `lba` starts: its data piece's node and byte offset on
    /// that node (for tests and tools; `None` if unmapped or still in the open row).
    pub fn record_position(&self, lba: u64) -> Option<(String, u64)> {
        let loc = self.map.get(lba)?;
        let (seg_no, index) = self.geometry.segment_of(loc.row);
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.segment == seg_no && o.index == index)
        {
            return None;
        }
        let seg = self.segments.get(&seg_no)?;
        let piece = seg.pieces.get(usize::from(loc.strip))?;
        let start = seg.rows.start_block(index)? * self.geometry.shard_block;
        Some((
            piece.node.clone(),
            piece.base + start + u64::from(loc.offset),
        ))
    }

    /// The nodes of the segment holding `lba`'s record, by piece index.
    pub fn pieces_of(&self, lba: u64) -> Option<Vec<(String, u64)>> {
        let loc = self.map.get(lba)?;
        let (seg_no, index) = self.geometry.segment_of(loc.row);
        let seg = self.segments.get(&seg_no)?;
        let start = seg.rows.start_block(index)? * self.geometry.shard_block;
        Some(
            seg.pieces
                .iter()
                .map(|p| (p.node.clone(), p.base + start + u64::from(loc.offset)))
                .collect(),
        )
    }

    /// Segments held (open, closed, not yet freed).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Whether acknowledged writes are waiting in the open row (with a write cache):
    /// the owner arms its batching-window timer while this is true and calls
    /// [`Volume::seal_open_row`] when it fires.
    pub fn has_unsealed_writes(&self) -> bool {
        self.open.as_ref().is_some_and(|o| !o.is_empty())
    }

    /// Pieces waiting in the repair queue.
    pub fn pending_repairs(&self) -> usize {
        self.repairs.len()
    }

    /// Nodes new segments currently avoid (they failed a write).
    pub fn avoided_nodes(&self) -> Vec<String> {
        self.avoid
            .iter()
            .filter(|(_, since)| since.elapsed() < self.retry_node_after)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Grows the volume to `blocks` (the pool has recorded the new size). New blocks
    /// read as zeroes; nothing on the nodes changes.
    pub fn grow(&mut self, blocks: u64) -> Result<(), VolumeError> {
        if blocks < self.config.blocks {
            return Err(VolumeError::Config(format!(
                "volumes grow but do not shrink: {} blocks asked, {} now",
                blocks, self.config.blocks
            )));
        }
        self.config.blocks = blocks;
        Ok(())
    }

    /// Sets how long new segments avoid a node after it failed a write (default 30 s).
    pub fn set_retry_node_after(&mut self, after: Duration) {
        self.retry_node_after = after;
    }

    fn avoid_node(&mut self, node: &str) {
        let now = std::time::Instant::now();
        match self.avoid.iter_mut().find(|(n, _)| n == node) {
            Some(entry) => entry.1 = now,
            None => self.avoid.push((node.to_owned(), now)),
        }
    }

    /// Lets new segments use every node again (call when a node is back).
    pub fn clear_avoided_nodes(&mut self) {
        self.avoid.clear();
    }

    /// Sets how long a write keeps trying when no placement can reach its nodes, and a
    /// read when no piece of a record can be read (zero, the default, fails at once). A short outage of every path at once (this
    /// process stalled past the nodes' keep-alive timeout, a network blip) tears down
    /// every association together; relocating cannot help then, but the host library
    /// reconnects within a second or two, and failing the write would turn that blip
    /// into an I/O error in the guest. Writing the same row again is safe: rows are
    /// written once, whole, at a place nothing else uses.
    pub fn set_outage_wait(&mut self, wait: Duration) {
        self.outage_wait = wait;
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), VolumeError> {
        match lba.checked_add(blocks) {
            Some(end) if blocks > 0 && end <= self.config.blocks => Ok(()),
            _ => Err(VolumeError::OutOfRange {
                lba,
                blocks,
                capacity: self.config.blocks,
            }),
        }
    }

    fn next_generation(&mut self) -> Result<u64, VolumeError> {
        let generation = self.generation;
        if generation > MAX_GENERATION {
            return Err(VolumeError::GenerationExhausted);
        }
        self.generation += 1;
        Ok(generation)
    }

    /// Writes whole blocks at `lba`. With `fua`, or without a write cache, it returns
    /// only once the data is durable on every piece.
    pub async fn write(&mut self, lba: u64, data: &[u8], fua: bool) -> Result<(), VolumeError> {
        let mut results = self.write_batch(&[(lba, data, fua)]).await;
        results.pop().unwrap_or(Ok(()))
    }

    /// Writes several requests with one seal at the end (group commit). Each gets its
    /// own result; requests are applied in order. Without a write cache, every write
    /// that returns `Ok` is durable.
    pub async fn write_batch(
        &mut self,
        writes: &[(u64, &[u8], bool)],
    ) -> Vec<Result<(), VolumeError>> {
        let mut results = Vec::with_capacity(writes.len());
        let mut any_ok = false;
        let mut any_fua = false;
        for &(lba, data, fua) in writes {
            let r = self.append_write(lba, data).await;
            any_ok |= r.is_ok();
            any_fua |= fua && r.is_ok();
            results.push(r);
        }
        if any_ok && (!self.config.write_cache || any_fua) {
            if let Err(e) = self.seal_open_row().await {
                let text = e.to_string();
                let mut first = Some(e);
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(first
                        .take()
                        .unwrap_or_else(|| VolumeError::Metadata(format!("batch failed: {text}"))));
                }
            }
        }
        results
    }

    /// Seals and appends the records of one write; maps them now with a write cache,
    /// at seal time otherwise.
    async fn append_write(&mut self, lba: u64, data: &[u8]) -> Result<(), VolumeError> {
        if data.is_empty() || data.len() % BLOCK_SIZE != 0 {
            return Err(VolumeError::BadLength { len: data.len() });
        }
        let blocks = (data.len() / BLOCK_SIZE) as u64;
        self.check_range(lba, blocks)?;
        if self.open_failed {
            self.seal_open_row().await?;
        }
        let unit = usize::try_from(self.config.compression_unit).unwrap_or(BLOCK_SIZE);
        let room = u64::from(self.config.compression_unit) + RECORD_OVERHEAD;
        let mut first = lba;
        for chunk in data.chunks(unit) {
            let count = (chunk.len() / BLOCK_SIZE) as u64;
            self.ensure_room(room).await?;
            let generation = self.next_generation()?;
            self.scratch.clear();
            self.pipeline
                .seal(first, generation, chunk, &mut self.scratch)?;
            let mapped = self.config.write_cache;
            let loc = self.append_scratch(Effect::Data {
                first_lba: first,
                count,
                generation,
                mapped,
            })?;
            if mapped {
                self.map_record(first, count, loc);
            }
            first += count;
        }
        self.stats.host_bytes_written += data.len() as u64;
        Ok(())
    }

    /// Makes sure the open row can take a record of `len` bytes, sealing it and opening
    /// a new row (and segment, and checkpoint) as needed. Called before a generation is
    /// taken, so a checkpoint never gets ahead of a record not yet in the log.
    async fn ensure_room(&mut self, len: u64) -> Result<(), VolumeError> {
        for _ in 0..6 {
            if let Some(open) = &self.open {
                if open.has_room(len) {
                    return Ok(());
                }
                self.seal_open_row().await?;
                continue;
            }
            let (segment, index, start) = match self.open_segment_position(len) {
                Some(at) => at,
                None => {
                    let quiet = self.effects.is_empty();
                    self.open_new_segment(quiet).await?;
                    continue;
                }
            };
            let capacity = self
                .geometry
                .strip_size
                .min((self.geometry.chunk_blocks() - start) * self.geometry.shard_block);
            self.open = Some(OpenRow::new(
                segment,
                index,
                start,
                capacity,
                self.geometry.k,
            ));
        }
        Err(VolumeError::Config(format!(
            "a record of {len} bytes does not fit an empty row"
        )))
    }

    /// Where the next row of the open segment would go, if it can hold `len` bytes.
    fn open_segment_position(&mut self, len: u64) -> Option<(u64, u64, u64)> {
        let seg_no = self.open_segment?;
        let seg = self.segments.get_mut(&seg_no)?;
        let left = (self.geometry.chunk_blocks().saturating_sub(seg.used_blocks))
            * self.geometry.shard_block;
        if seg.closed
            || left < self.geometry.round_up(len)
            || seg.rows.len() >= self.geometry.rows_per_segment
        {
            seg.closed = true;
            self.open_segment = None;
            return None;
        }
        Some((seg_no, seg.rows.len(), seg.used_blocks))
    }

    /// Allocates a new segment. With `may_checkpoint` (no record is waiting for a row),
    /// checkpoints first when enough segments were opened since the last checkpoint,
    /// which bounds how much log replay has to read.
    async fn open_new_segment(&mut self, may_checkpoint: bool) -> Result<(), VolumeError> {
        if let Some(s) = self.open_segment.take() {
            if let Some(seg) = self.segments.get_mut(&s) {
                seg.closed = true;
            }
        }
        if may_checkpoint
            && self.segments_since_checkpoint >= CHECKPOINT_EVERY_SEGMENTS
            && self.open.is_none()
            && self.effects.is_empty()
        {
            self.store_image(Vec::new()).await?;
        }
        let after = self.retry_node_after;
        self.avoid.retain(|(_, since)| since.elapsed() < after);
        let mut avoid = self.avoided_nodes();
        if let Some(r) = &self.rebuild {
            avoid.extend(r.nodes().iter().cloned());
        }
        let grant = self
            .source
            .allocate(self.config.id, self.geometry.pieces(), avoid)
            .await?;
        self.add_segment(grant, false)?;
        Ok(())
    }

    fn add_segment(&mut self, grant: SegmentGrant, closed: bool) -> Result<(), VolumeError> {
        if grant.pieces.len() != self.geometry.pieces() {
            return Err(VolumeError::Damaged(format!(
                "segment {} has {} pieces, the layout needs {}",
                grant.index,
                grant.pieces.len(),
                self.geometry.pieces()
            )));
        }
        if grant.index >= self.geometry.max_segments() {
            return Err(VolumeError::NoSpace {
                reason: format!("segment number {} beyond the map's row space", grant.index),
            });
        }
        for p in &grant.pieces {
            let block = u64::from(p.shard.info().block_size);
            if block == 0
                || self.geometry.shard_block % block != 0
                || p.base % self.geometry.shard_block != 0
            {
                return Err(VolumeError::Damaged(format!(
                    "segment {} piece on node {} is not aligned to {}-byte blocks",
                    grant.index, p.node, self.geometry.shard_block
                )));
            }
        }
        self.segments.insert(
            grant.index,
            Segment {
                pieces: grant.pieces,
                rows: SegmentRows::new(self.geometry.k),
                used_blocks: 0,
                closed,
                live_blocks: 0,
                stored_blocks: 0,
            },
        );
        if !closed {
            self.open_segment = Some(grant.index);
            self.segments_since_checkpoint += 1;
        }
        Ok(())
    }

    /// Appends the record in `scratch` to the open row (which `ensure_room` prepared).
    fn append_scratch(&mut self, effect: Effect) -> Result<Location, VolumeError> {
        let open = self
            .open
            .as_mut()
            .ok_or_else(|| VolumeError::Config("no open row to append to".into()))?;
        let placed = open
            .append(&self.scratch)
            .ok_or_else(|| VolumeError::Config("record larger than the room made for it".into()))?;
        let row = self
            .geometry
            .row_number(open.segment, open.index)
            .ok_or_else(|| VolumeError::NoSpace {
                reason: "row numbers exhausted".into(),
            })?;
        self.effects.push(effect);
        let generation = match effect {
            Effect::Data { generation, .. } => generation,
            Effect::Moved { from, .. } => from.generation,
            Effect::Zeroes { .. } => 0,
        };
        Ok(Location {
            row,
            strip: u8::try_from(placed.strip).unwrap_or(u8::MAX),
            offset: u32::try_from(placed.offset).unwrap_or(u32::MAX),
            len: u32::try_from(placed.len).unwrap_or(u32::MAX),
            index: 0,
            generation,
        })
    }

    fn segment_mut_of(&mut self, row: u64) -> Option<&mut Segment> {
        let (seg, _) = self.geometry.segment_of(row);
        self.segments.get_mut(&seg)
    }

    /// Maps one block, keeping the segments' live counts.
    fn map_set(&mut self, lba: u64, loc: Location) {
        if let Some(old) = self.map.get(lba) {
            if let Some(seg) = self.segment_mut_of(old.row) {
                seg.live_blocks = seg.live_blocks.saturating_sub(1);
            }
        }
        if self.map.set(lba, loc) {
            if let Some(seg) = self.segment_mut_of(loc.row) {
                seg.live_blocks += 1;
            }
        }
    }

    fn map_clear(&mut self, lba: u64, count: u64) {
        for i in 0..count {
            let Some(l) = lba.checked_add(i) else { break };
            if let Some(old) = self.map.get(l) {
                if let Some(seg) = self.segment_mut_of(old.row) {
                    seg.live_blocks = seg.live_blocks.saturating_sub(1);
                }
                self.map.clear(l, 1);
            }
        }
    }

    fn map_record(&mut self, first: u64, count: u64, loc: Location) {
        for i in 0..count {
            let index = u8::try_from(i).unwrap_or(u8::MAX);
            self.map_set(first + i, Location { index, ..loc });
        }
    }

    /// Seals the open row: parity, then every piece written with FUA, all at once.
    /// Returns when all are durable. If a piece fails, the row moves to a fresh segment
    /// away from the failed node (up to [`MAX_RELOCATIONS`] times).
    pub async fn seal_open_row(&mut self) -> Result<(), VolumeError> {
        let mut attempts = 0;
        let mut outage: Option<(tokio::time::Instant, Duration)> = None;
        loop {
            let Some(open) = self.open.as_ref() else {
                return Ok(());
            };
            if open.is_empty() {
                self.open = None;
                return Ok(());
            }
            attempts += 1;
            match self.write_open_row().await {
                Ok(()) => return Ok(()),
                Err((piece, node, source)) => {
                    tracing::warn!(
                        piece,
                        node = %node,
                        attempt = attempts,
                        error = %source,
                        "piece write failed; moving the row away from the node"
                    );
                    self.avoid_node(&node);
                    let moved = if attempts <= MAX_RELOCATIONS {
                        self.relocate_open_row().await
                    } else {
                        Err(VolumeError::NotDurable {
                            attempts,
                            piece,
                            node: node.clone(),
                            source: source.clone(),
                        })
                    };
                    if let Err(e) = moved {
                        // Every placement failed. If the nodes were unreachable (not a
                        // media or range error), they may all be reconnecting: wait and
                        // try again from the first place, within the outage budget.
                        if matches!(source, ShardError::Unavailable { .. })
                            && !self.outage_wait.is_zero()
                        {
                            let now = tokio::time::Instant::now();
                            let (since, pause) = outage
                                .get_or_insert((now, Duration::from_millis(100)))
                                .to_owned();
                            if now + pause <= since + self.outage_wait {
                                tracing::warn!(
                                    error = %e,
                                    retry_in_ms = pause.as_millis(),
                                    "no placement reaches its nodes; waiting for them"
                                );
                                tokio::time::sleep(pause).await;
                                outage = Some((since, (pause * 2).min(Duration::from_secs(1))));
                                self.avoid.clear();
                                attempts = 0;
                                self.stats.outage_retries += 1;
                                continue;
                            }
                        }
                        self.fail_open_row();
                        return Err(match e {
                            VolumeError::NotDurable { .. } => e,
                            other => VolumeError::NotDurable {
                                attempts,
                                piece,
                                node,
                                source: ShardError::Unavailable {
                                    node: String::new(),
                                    reason: format!("{source}; moving the row failed: {other}"),
                                },
                            },
                        });
                    }
                    self.stats.rows_relocated += 1;
                }
            }
        }
    }

    /// Writes the open row's pieces; on success records the row and applies its
    /// effects to the map.
    async fn write_open_row(&mut self) -> Result<(), (usize, String, ShardError)> {
        let g = self.geometry;
        let Some(open) = self.open.as_ref() else {
            return Ok(());
        };
        let sealed = open.seal(&g, self.coder.as_deref()).map_err(|e| {
            (
                0,
                String::new(),
                ShardError::Unavailable {
                    node: String::new(),
                    reason: e.to_string(),
                },
            )
        })?;
        let (seg_no, start) = (open.segment, open.start_block);
        let Some(seg) = self.segments.get(&seg_no) else {
            return Err((
                0,
                String::new(),
                ShardError::Unavailable {
                    node: String::new(),
                    reason: "segment gone".into(),
                },
            ));
        };
        let offset = start * g.shard_block;
        let writes = sealed.pieces.into_iter().map(|(piece, bytes)| {
            let p = &seg.pieces[piece];
            let shard = Arc::clone(&p.shard);
            let at = p.base + offset;
            let node = p.node.clone();
            async move {
                let len = bytes.len() as u64;
                (piece, node, len, shard.write(at, bytes, true).await)
            }
        });
        let mut failure = None;
        let mut written = 0;
        for (piece, node, len, result) in join_all(writes).await {
            match result {
                Ok(()) => written += len,
                Err(e) => {
                    failure.get_or_insert((piece, node, e));
                }
            }
        }
        self.stats.shard_bytes_written += written;
        let moved = self
            .effects
            .iter()
            .any(|e| matches!(e, Effect::Moved { .. }));
        if moved {
            self.stats.gc_bytes_written += written;
        }
        if let Some(f) = failure {
            return Err(f);
        }
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let records: Vec<_> = open.records().to_vec();
        if let Some(seg) = self.segments.get_mut(&seg_no) {
            // Both were checked when the row was opened.
            let _recorded = seg.rows.push(start, &sealed.strip_blocks);
            seg.used_blocks = start + sealed.row_blocks;
        }
        let row = g.row_number(seg_no, open.index).unwrap_or(0);
        let effects = std::mem::take(&mut self.effects);
        let mut stored = 0;
        for (placed, effect) in records.iter().zip(effects) {
            let loc = Location {
                row,
                strip: u8::try_from(placed.strip).unwrap_or(u8::MAX),
                offset: u32::try_from(placed.offset).unwrap_or(u32::MAX),
                len: u32::try_from(placed.len).unwrap_or(u32::MAX),
                index: 0,
                generation: 0,
            };
            match effect {
                Effect::Data {
                    first_lba,
                    count,
                    generation,
                    mapped,
                } => {
                    stored += count;
                    if !mapped {
                        self.map_record(first_lba, count, Location { generation, ..loc });
                    }
                }
                Effect::Zeroes {
                    first_lba,
                    count,
                    applied,
                } => {
                    if !applied {
                        self.map_clear(first_lba, count);
                    }
                }
                Effect::Moved {
                    from,
                    first_lba,
                    count,
                } => {
                    stored += count;
                    let to = Location {
                        generation: from.generation,
                        ..loc
                    };
                    for i in 0..count {
                        let lba = first_lba + i;
                        if let Some(cur) = self.map.get(lba) {
                            if cur.same_record(&from) {
                                let index = cur.index;
                                self.map_set(lba, Location { index, ..to });
                            }
                        }
                    }
                    self.stats.records_moved += 1;
                }
            }
        }
        if let Some(seg) = self.segments.get_mut(&seg_no) {
            seg.stored_blocks += stored;
        }
        self.open_failed = false;
        self.stats.rows_sealed += 1;
        Ok(())
    }

    /// Moves the open row's records to a row of a fresh segment (the current one is
    /// closed: its failed row slot is never reused). On failure the open row is left as
    /// it was.
    async fn relocate_open_row(&mut self) -> Result<(), VolumeError> {
        let Some(old_segment) = self.open.as_ref().map(|o| o.segment) else {
            return Ok(());
        };
        if let Some(seg) = self.segments.get_mut(&old_segment) {
            seg.closed = true;
        }
        if self.open_segment == Some(old_segment) {
            self.open_segment = None;
        }
        self.open_new_segment(false).await?;
        let Some(old) = self.open.take() else {
            return Ok(());
        };
        let old_row = self
            .geometry
            .row_number(old.segment, old.index)
            .unwrap_or(0);
        let effects = std::mem::take(&mut self.effects);
        let seg_no = self.open_segment.unwrap_or(0);
        let (segment, index, start) = match self.open_segment_position(0) {
            Some(at) => at,
            None => (seg_no, 0, 0),
        };
        let capacity = self
            .geometry
            .strip_size
            .min((self.geometry.chunk_blocks() - start) * self.geometry.shard_block);
        let mut fresh = OpenRow::new(segment, index, start, capacity, self.geometry.k);
        let new_row = self.geometry.row_number(segment, index).unwrap_or(0);
        let mut remaps = Vec::new();
        for (placed, effect) in old.records().iter().zip(effects.iter()) {
            let bytes = old
                .bytes(placed.strip, placed.offset, placed.len)
                .ok_or_else(|| VolumeError::Config("record outside its row".into()))?;
            let to = fresh.append(bytes).ok_or_else(|| {
                VolumeError::Config("relocated row does not fit a fresh row".into())
            })?;
            if let Effect::Data {
                first_lba,
                count,
                generation,
                mapped: true,
            } = *effect
            {
                let from = Location {
                    row: old_row,
                    strip: u8::try_from(placed.strip).unwrap_or(u8::MAX),
                    offset: u32::try_from(placed.offset).unwrap_or(u32::MAX),
                    len: u32::try_from(placed.len).unwrap_or(u32::MAX),
                    index: 0,
                    generation,
                };
                let to = Location {
                    row: new_row,
                    strip: u8::try_from(to.strip).unwrap_or(u8::MAX),
                    offset: u32::try_from(to.offset).unwrap_or(u32::MAX),
                    ..from
                };
                remaps.push((first_lba, count, from, to));
            }
        }
        for (first, count, from, to) in remaps {
            for i in 0..count {
                if let Some(cur) = self.map.get(first + i) {
                    if cur.same_record(&from) {
                        let index = cur.index;
                        self.map_set(first + i, Location { index, ..to });
                    }
                }
            }
        }
        self.open = Some(fresh);
        self.effects = effects;
        Ok(())
    }

    /// The open row could not be made durable anywhere. Without a write cache its
    /// records were never mapped: drop it. With one, keep it (still readable) and retry
    /// before anything else is appended.
    fn fail_open_row(&mut self) {
        if self.config.write_cache {
            self.open_failed = true;
        } else {
            self.open = None;
            self.effects.clear();
        }
    }

    /// Makes every acknowledged write durable.
    pub async fn flush(&mut self) -> Result<(), VolumeError> {
        self.seal_open_row().await
    }

    /// Unmaps blocks; they read as zeroes. Durable like a write (a zero record).
    pub async fn deallocate(&mut self, lba: u64, blocks: u64) -> Result<(), VolumeError> {
        self.write_zeroes(lba, blocks, false).await
    }

    /// Makes blocks read as zeroes without storing any: appends zero records (durable
    /// before return unless there is a write cache and no `fua`).
    pub async fn write_zeroes(
        &mut self,
        lba: u64,
        blocks: u64,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.check_range(lba, blocks)?;
        if self.open_failed {
            self.seal_open_row().await?;
        }
        let mut first = lba;
        let end = lba + blocks;
        while first < end {
            let count = (end - first).min(MAX_ZERO_RECORD);
            self.ensure_room(RECORD_OVERHEAD).await?;
            let generation = self.next_generation()?;
            self.scratch.clear();
            let n = u32::try_from(count).unwrap_or(u32::MAX);
            self.pipeline
                .seal_zeroes(first, generation, n, &mut self.scratch)?;
            let applied = self.config.write_cache;
            self.append_scratch(Effect::Zeroes {
                first_lba: first,
                count,
                applied,
            })?;
            if applied {
                self.map_clear(first, count);
            }
            first += count;
        }
        if !self.config.write_cache || fua {
            self.seal_open_row().await?;
        }
        Ok(())
    }

    /// Reads `blocks` blocks at `lba` (plans, runs and finishes the read in place).
    pub async fn read(&mut self, lba: u64, blocks: u64) -> Result<Vec<u8>, VolumeError> {
        let plan = self.plan_read(lba, blocks)?;
        let (result, done) = plan.execute().await;
        self.finish_read(done);
        result
    }

    /// Resolves a read of `blocks` blocks at `lba` against the map into a plan that
    /// runs without the volume ([`ReadPlan::execute`], e.g. as its own task), so many
    /// reads can be in flight at once. The plan pins the segments it reads until its
    /// [`ReadDone`] is handed to [`Volume::finish_read`]; see `read.rs` for why the
    /// result is the data as of the moment of planning.
    pub fn plan_read(&mut self, lba: u64, blocks: u64) -> Result<ReadPlan, VolumeError> {
        self.check_range(lba, blocks)?;
        let total = read::read_len(blocks).ok_or(VolumeError::OutOfRange {
            lba,
            blocks,
            capacity: self.config.blocks,
        })?;
        let mut plan = ReadPlan::new(Arc::clone(&self.reader), total, self.outage_wait);
        let mut i = 0u64;
        while i < blocks {
            let Some(loc) = self.map.get(lba + i) else {
                i += 1;
                continue;
            };
            // Consecutive blocks of the same record are served by one record read.
            let mut run = 1u64;
            while i + run < blocks {
                match self.map.get(lba + i + run) {
                    Some(next)
                        if next.same_record(&loc)
                            && u64::from(next.index) == u64::from(loc.index) + run =>
                    {
                        run += 1
                    }
                    _ => break,
                }
            }
            let first_lba = lba + i - u64::from(loc.index);
            let source = self.record_source(loc, first_lba)?;
            let expected = Expected {
                first_lba,
                generation: loc.generation,
            };
            plan.push(
                lba + i,
                usize::try_from(i).unwrap_or(0) * BLOCK_SIZE,
                usize::from(loc.index) * BLOCK_SIZE,
                usize::try_from(run).unwrap_or(0) * BLOCK_SIZE,
                expected,
                source,
            );
            i += run;
        }
        for s in plan.pinned() {
            *self.pins.entry(*s).or_insert(0) += 1;
        }
        Ok(plan)
    }

    /// Takes back what a read planned by [`Volume::plan_read`] found: unpins its
    /// segments, counts its I/O and queues its repairs (those whose piece is still
    /// where the read found it).
    pub fn finish_read(&mut self, done: ReadDone) {
        for s in &done.pinned {
            if let Some(n) = self.pins.get_mut(s) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.pins.remove(s);
                }
            }
        }
        self.stats.shard_bytes_read += done.shard_bytes_read;
        self.stats.direct_reads += done.direct_reads;
        self.stats.reconstructions += done.reconstructions;
        for r in done.repairs {
            if self.repair_target_current(&r) {
                self.repairs.push_back(r);
            }
        }
    }

    /// Whether segments garbage collection dropped are waiting to be released to the
    /// source (held by reads in flight, or a checkpoint that failed).
    pub fn has_deferred_frees(&self) -> bool {
        !self.pending_free.is_empty()
    }

    /// Reads in flight (planned and not finished).
    pub fn reads_in_flight(&self) -> usize {
        self.pins.values().map(|&n| n as usize).sum()
    }

    /// Whether `r` still targets a live piece: its segment is held and not waiting to
    /// be freed, and the piece is still on the node and chunk the damage was found on.
    fn repair_target_current(&self, r: &Repair) -> bool {
        !self.pending_free.contains(&r.segment)
            && self
                .segments
                .get(&r.segment)
                .and_then(|s| s.pieces.get(r.piece))
                .is_some_and(|p| p.node == r.node && p.base == r.base)
    }

    /// Where a record's bytes are: copied from the open row, or its row's pieces on
    /// the nodes.
    fn record_source(&self, loc: Location, first_lba: u64) -> Result<read::Source, VolumeError> {
        let offset = usize::try_from(loc.offset).unwrap_or(usize::MAX);
        let len = usize::try_from(loc.len).unwrap_or(usize::MAX);
        let (seg_no, index) = self.geometry.segment_of(loc.row);
        if let Some(open) = self
            .open
            .as_ref()
            .filter(|o| o.segment == seg_no && o.index == index)
        {
            let bytes =
                open.bytes(usize::from(loc.strip), offset, len)
                    .ok_or(VolumeError::Media {
                        lba: first_lba,
                        reason: "record outside the open row".into(),
                    })?;
            return Ok(read::Source::Open(bytes.to_vec()));
        }
        let seg = self.segments.get(&seg_no).ok_or(VolumeError::Media {
            lba: first_lba,
            reason: format!("row {} is not in any segment of the volume", loc.row),
        })?;
        let start = seg.rows.start_block(index).ok_or(VolumeError::Media {
            lba: first_lba,
            reason: format!("row {} is not in its segment's row table", loc.row),
        })? * self.geometry.shard_block;
        let pieces = seg
            .pieces
            .iter()
            .enumerate()
            .map(|(p, piece)| read::PieceAt {
                node: piece.node.clone(),
                shard: Arc::clone(&piece.shard),
                base: piece.base,
                row_base: piece.base + start,
                written: seg.rows.piece_blocks(index, p) * self.geometry.shard_block,
            })
            .collect();
        Ok(read::Source::Stored(read::RecordFetch {
            loc,
            expected: Expected {
                first_lba,
                generation: loc.generation,
            },
            segment: seg_no,
            pieces,
        }))
    }

    /// Reads, verifies and opens one record into `self.decoded`. With `keep`, also
    /// returns the verified stored bytes (for garbage collection).
    async fn fetch_record(
        &mut self,
        loc: Location,
        first_lba: u64,
        keep: bool,
    ) -> Result<Option<Vec<u8>>, VolumeError> {
        let expected = Expected {
            first_lba,
            generation: loc.generation,
        };
        let reader = Arc::clone(&self.reader);
        match self.record_source(loc, first_lba)? {
            read::Source::Open(bytes) => {
                reader.open(&bytes, expected, &mut self.decoded)?;
                Ok(keep.then_some(bytes))
            }
            read::Source::Stored(f) => {
                let mut done = ReadDone::default();
                let mut decoded = std::mem::take(&mut self.decoded);
                let r = reader.fetch(&f, keep, &mut done, &mut decoded).await;
                self.decoded = decoded;
                self.finish_read(done);
                r
            }
        }
    }

    /// Writes queued rebuilt pieces back. Returns how many were written; the ones whose
    /// node failed stay queued.
    pub async fn run_repairs(&mut self) -> usize {
        let mut done = 0;
        for _ in 0..self.repairs.len() {
            let Some(r) = self.repairs.pop_front() else {
                break;
            };
            if !self.repair_target_current(&r) {
                continue;
            }
            let len = r.bytes.len() as u64;
            match r.shard.write(r.offset, r.bytes.clone(), true).await {
                Ok(()) => {
                    done += 1;
                    self.stats.repairs_done += 1;
                    self.stats.repair_bytes_written += len;
                }
                Err(_) => self.repairs.push_back(r),
            }
        }
        done
    }

    /// Seals the open row, then stores an image of the map and row tables with the
    /// source, releasing the segments in `free` in the same step.
    pub async fn checkpoint(&mut self, free: Vec<u64>) -> Result<(), VolumeError> {
        self.seal_open_row().await?;
        self.store_image(free).await
    }

    /// Stores the image; the open row must be empty (everything in the log mapped).
    async fn store_image(&mut self, mut free: Vec<u64>) -> Result<(), VolumeError> {
        let image = self.image();
        // A segment a read in flight still reads stays queued until the read is done
        // (its chunks must not be reused under the read).
        let (now, later): (Vec<u64>, Vec<u64>) =
            free.into_iter().partition(|s| !self.pins.contains_key(s));
        free = now;
        for s in later {
            if !self.pending_free.contains(&s) {
                self.pending_free.push(s);
            }
        }
        let ready: Vec<u64> = self
            .pending_free
            .iter()
            .copied()
            .filter(|s| !self.pins.contains_key(s))
            .collect();
        free.extend(ready.iter().copied());
        self.source.checkpoint(self.config.id, image, free).await?;
        self.pending_free.retain(|s| !ready.contains(s));
        self.segments_since_checkpoint = 0;
        self.stats.checkpoints += 1;
        Ok(())
    }

    fn image(&self) -> VolumeImage {
        VolumeImage {
            version: image::IMAGE_VERSION,
            next_generation: self.generation,
            tail: self.open_segment,
            segments: self
                .segments
                .iter()
                .map(|(&index, s)| {
                    let (starts, blocks) = s.rows.parts();
                    image::SegmentImage {
                        index,
                        row_starts: starts.to_vec(),
                        row_blocks: blocks.to_vec(),
                        used_blocks: s.used_blocks,
                        closed: s.closed,
                        stored_blocks: s.stored_blocks,
                    }
                })
                .collect(),
            map: self
                .map
                .export()
                .into_iter()
                .map(|(page, keys, values)| image::MapPageImage { page, keys, values })
                .collect(),
        }
    }
}

/// Advances `choice` (ascending indices below `n`) to the next k-subset in
/// lexicographic order; false when it was the last.
fn next_combination(choice: &mut [usize], n: usize) -> bool {
    let k = choice.len();
    for i in (0..k).rev() {
        if choice[i] < n - k + i {
            choice[i] += 1;
            for j in i + 1..k {
                choice[j] = choice[j - 1] + 1;
            }
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::next_combination;

    #[test]
    fn combinations_cover_all_subsets() {
        let mut c = vec![0, 1];
        let mut seen = vec![c.clone()];
        while next_combination(&mut c, 4) {
            seen.push(c.clone());
        }
        assert_eq!(
            seen,
            vec![
                vec![0, 1],
                vec![0, 2],
                vec![0, 3],
                vec![1, 2],
                vec![1, 3],
                vec![2, 3]
            ]
        );
    }
}
