//! A volume: logical 4 KiB blocks over records in stripe rows on k + m shards.
//!
//! One task owns a volume (DESIGN: a volume is owned by one reactor), so every
//! operation takes `&mut self` and no lock exists to be held across an `.await`. The
//! shards are driven concurrently inside an operation (all pieces of a row are written
//! at once; a reconstruction reads its k strips at once).
//!
//! Write: the blocks of one write become records of up to the compression unit, each
//! sealed by the pipeline with a fresh generation and appended to the open row.
//! - Without a write cache (the default) a write returns only when every piece of every
//!   row holding it is durable (written with FUA). A write that fails has no effect:
//!   the map is updated only after all its rows are durable, and the half-written row
//!   slot is abandoned, never reused.
//! - With a write cache (`write_cache`, which a front-end then advertises as a volatile
//!   write cache) a write returns once its records are in the open row; the row is
//!   sealed when full, on flush, on a FUA write, or when the owner calls
//!   [`Volume::seal_open_row`] at the end of its batching window. A row whose sealing
//!   failed stays in memory (still readable) and is retried, byte for byte, into the
//!   same slot before anything else is written.
//!
//! Read: the map gives the record; only its bytes (rounded to shard blocks) are read,
//! from its one data strip. On an unreachable node, a media error, or a record that
//! fails its crc, AEAD or identity check, the same byte range is read from the other
//! pieces and the strip rebuilt from k of them; every combination of k available pieces
//! is tried until one yields a record that verifies, so a corrupt parity strip cannot
//! smuggle wrong bytes in. A rebuilt piece goes to the repair queue
//! ([`Volume::run_repairs`]). If nothing verifies, the read fails; unverified bytes are
//! never returned.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::future::join_all;

use crate::layout::{Geometry, LayoutError, OpenRow, RowTable};
use crate::map::{BlockMap, Location, MAX_GENERATION};
use crate::pipeline::{
    coder_for, Compression, DataKey, EpochStore, ErasureCoder, Expected, NonceAllocator,
    PipelineError, RecordPipeline, VolumeId, BLOCK_SIZE,
};
use crate::shard::{ShardError, ShardStore};

/// Logical block size in bytes, as u64.
const BLOCK: u64 = 4096;
/// Bytes a record adds to its payload at most: header and GCM tag.
const RECORD_OVERHEAD: u64 = 64;
/// Most k-subsets a reconstruction tries before giving up.
const MAX_COMBINATIONS: usize = 512;

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
    /// Every row slot has been used (space reuse needs garbage collection).
    #[error("no free row left ({rows} row slots used)")]
    NoSpace {
        /// Row slots on the shards.
        rows: u64,
    },
    /// A piece of a row could not be made durable; the write is not acknowledged.
    #[error("row {row} is not durable: piece {piece}: {source}")]
    NotDurable {
        /// Global row number.
        row: u64,
        /// Piece index that failed.
        piece: usize,
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
    /// The layout refused the geometry or a row.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Sealing a record failed (compression or crypto library, nonce exhaustion).
    #[error("sealing a record: {0}")]
    Pipeline(#[from] PipelineError),
}

/// What a volume is made of; derived from a storage profile.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// The volume's identity (bound into every record's AAD).
    pub id: VolumeId,
    /// Data strips per row (1 for mirrors).
    pub k: usize,
    /// Parity strips per row (copies - 1 for mirrors).
    pub m: usize,
    /// Record compression.
    pub compression: Compression,
    /// Most bytes per record (whole 4 KiB blocks, at most 1 MiB).
    pub compression_unit: u32,
    /// Volume size in 4 KiB blocks.
    pub blocks: u64,
    /// Bytes of one strip slot on a shard.
    pub strip_size: u64,
    /// Rows per segment.
    pub rows_per_segment: u64,
    /// Bytes reserved at the front of every shard for the superblock and metadata.
    pub data_offset: u64,
    /// Acknowledge writes before their row is durable (flush makes them durable).
    pub write_cache: bool,
}

impl VolumeConfig {
    /// Defaults for `layout` (as `placement` resolves a profile): 32 KiB compression
    /// unit, 128 KiB strips, 256 rows per segment, 1 MiB reserved, no write cache.
    pub fn new(id: VolumeId, layout: placement::Layout, blocks: u64) -> Self {
        Self {
            id,
            k: usize::from(layout.data),
            m: usize::from(layout.parity),
            compression: Compression::Off,
            compression_unit: 32 * 1024,
            blocks,
            strip_size: 128 * 1024,
            rows_per_segment: 256,
            data_offset: 1 << 20,
            write_cache: false,
        }
    }

    /// The settings a profile asks for (compression and unit; encryption is decided
    /// by whether [`Volume::create`] gets a key).
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
    /// Bytes written to shards for rows (not repairs).
    pub shard_bytes_written: u64,
    /// Bytes written to shards by repairs.
    pub repair_bytes_written: u64,
    /// Bytes read from shards.
    pub shard_bytes_read: u64,
    /// Rows sealed and durable.
    pub rows_sealed: u64,
    /// Records served by one read of their own strip.
    pub direct_reads: u64,
    /// Records rebuilt from other pieces.
    pub reconstructions: u64,
    /// Pieces rewritten by the repair queue.
    pub repairs_done: u64,
}

/// A rebuilt piece range waiting to be written back.
#[derive(Debug, Clone)]
struct Repair {
    row: u64,
    piece: usize,
    /// Byte offset within the strip (block aligned).
    offset: u64,
    bytes: Vec<u8>,
}

/// A volume over k + m shards. See the module documentation.
#[derive(Debug)]
pub struct Volume {
    config: VolumeConfig,
    geometry: Geometry,
    shards: Vec<Arc<dyn ShardStore>>,
    coder: Box<dyn ErasureCoder>,
    pipeline: RecordPipeline,
    map: BlockMap,
    rows: RowTable,
    open: Option<OpenRow>,
    /// The open row's seal failed; retry it before anything else is appended.
    open_failed: bool,
    next_row: u64,
    generation: u64,
    repairs: VecDeque<Repair>,
    stats: VolumeStats,
    scratch: Vec<u8>,
    decoded: Vec<u8>,
}

impl Volume {
    /// Creates an empty volume on `shards` (piece i of every row on `shards[i]`; the
    /// caller picks them with `placement`). With `key` records are encrypted, and a
    /// writer epoch is taken from `epochs` and made durable first.
    pub fn create(
        config: VolumeConfig,
        shards: Vec<Arc<dyn ShardStore>>,
        key: Option<&DataKey>,
        epochs: &mut dyn EpochStore,
    ) -> Result<Self, VolumeError> {
        let k = config.k;
        let m = config.m;
        if shards.len() != k + m {
            return Err(VolumeError::Config(format!(
                "{} shards given for {k} data and {m} parity pieces",
                shards.len()
            )));
        }
        let unit = u64::from(config.compression_unit);
        if unit == 0 || unit % BLOCK != 0 || unit > 256 * BLOCK {
            return Err(VolumeError::Config(format!(
                "compression unit {unit} must be 1 to 256 whole 4 KiB blocks"
            )));
        }
        if config.blocks == 0 {
            return Err(VolumeError::Config("volume of zero blocks".into()));
        }
        let block = shards
            .iter()
            .map(|s| u64::from(s.info().block_size))
            .max()
            .unwrap_or(512);
        let capacity = shards
            .iter()
            .map(|s| s.info().capacity_bytes)
            .min()
            .unwrap_or(0);
        let geometry = Geometry::new(
            k,
            m,
            config.strip_size,
            block,
            config.data_offset,
            capacity,
            config.rows_per_segment,
        )?;
        if geometry.round_up(unit + RECORD_OVERHEAD) > geometry.strip_size {
            return Err(VolumeError::Config(format!(
                "a strip of {} bytes cannot hold a record of {unit} bytes plus its header",
                geometry.strip_size
            )));
        }
        let coder = coder_for(k, m)?;
        let nonces = match key {
            Some(_) => Some(NonceAllocator::open(epochs)?),
            None => None,
        };
        let pipeline = RecordPipeline::new(config.id, config.compression, key, nonces)?;
        Ok(Self {
            rows: RowTable::new(k),
            config,
            geometry,
            shards,
            coder,
            pipeline,
            map: BlockMap::new(),
            open: None,
            open_failed: false,
            next_row: 0,
            generation: 1,
            repairs: VecDeque::new(),
            stats: VolumeStats::default(),
            scratch: Vec::new(),
            decoded: Vec::new(),
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

    /// Heap bytes of the sealed-row table (strip lengths for reconstruction).
    pub fn row_table_memory_bytes(&self) -> usize {
        self.rows.memory_bytes()
    }

    /// Blocks currently mapped (written and not deallocated or zeroed).
    pub fn mapped_blocks(&self) -> u64 {
        self.map.mapped_blocks()
    }

    /// Where `lba` lives, if it is mapped (for tests and tools).
    pub fn locate(&self, lba: u64) -> Option<Location> {
        self.map.get(lba)
    }

    /// Row slots used so far (sealed, open or abandoned); the rest of every shard past
    /// `data_offset + rows_used * strip_size` has not been written by this volume.
    pub fn rows_used(&self) -> u64 {
        self.next_row
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

    /// Writes whole blocks at `lba`. With `fua`, or without a write cache, it returns
    /// only once the data is durable on every piece.
    pub async fn write(&mut self, lba: u64, data: &[u8], fua: bool) -> Result<(), VolumeError> {
        let result = self.write_inner(lba, data, fua).await;
        if result.is_err() && !self.config.write_cache {
            // Nothing maps to the open row yet: drop it, so a failed write has no effect.
            self.abandon_open_row();
        }
        result
    }

    async fn write_inner(&mut self, lba: u64, data: &[u8], fua: bool) -> Result<(), VolumeError> {
        if data.is_empty() || data.len() % BLOCK_SIZE != 0 {
            return Err(VolumeError::BadLength { len: data.len() });
        }
        let blocks = (data.len() / BLOCK_SIZE) as u64;
        self.check_range(lba, blocks)?;
        if self.open_failed {
            self.seal_open_row().await?;
        }
        let unit = usize::try_from(self.config.compression_unit).unwrap_or(BLOCK_SIZE);
        let deferred = !self.config.write_cache;
        let mut updates: Vec<(u64, u64, Location)> = Vec::new();
        let mut first = lba;
        for chunk in data.chunks(unit) {
            let count = (chunk.len() / BLOCK_SIZE) as u64;
            let generation = self.generation;
            if generation > MAX_GENERATION {
                return Err(VolumeError::GenerationExhausted);
            }
            self.generation += 1;
            self.scratch.clear();
            let sealed = self
                .pipeline
                .seal(first, generation, chunk, &mut self.scratch)?;
            let (row, strip, offset) = match self.append_scratch()? {
                Some(at) => at,
                None => {
                    self.seal_open_row().await?;
                    self.append_scratch()?.ok_or_else(|| {
                        VolumeError::Config("a record does not fit an empty row".into())
                    })?
                }
            };
            let loc = Location {
                row,
                strip: u8::try_from(strip).unwrap_or(u8::MAX),
                offset: u32::try_from(offset).unwrap_or(u32::MAX),
                len: u32::try_from(sealed.len).unwrap_or(u32::MAX),
                index: 0,
                generation,
            };
            if deferred {
                updates.push((first, count, loc));
            } else {
                self.map_record(first, count, loc);
            }
            first += count;
        }
        if deferred || fua {
            self.seal_open_row().await?;
        }
        for (first, count, loc) in updates {
            self.map_record(first, count, loc);
        }
        self.stats.host_bytes_written += data.len() as u64;
        Ok(())
    }

    fn map_record(&mut self, first: u64, count: u64, loc: Location) {
        for i in 0..count {
            let index = u8::try_from(i).unwrap_or(u8::MAX);
            // Fields were range-checked by the geometry and the generation limit.
            let _fits = self.map.set(first + i, Location { index, ..loc });
        }
    }

    /// Appends the record in `scratch` to the open row (opening one if needed).
    /// Returns (row, strip, offset), or `None` if the open row is full.
    fn append_scratch(&mut self) -> Result<Option<(u64, usize, usize)>, VolumeError> {
        if self.open.is_none() {
            if self.next_row >= self.geometry.rows {
                return Err(VolumeError::NoSpace {
                    rows: self.geometry.rows,
                });
            }
            self.open = Some(OpenRow::new(self.next_row, &self.geometry));
            self.next_row += 1;
        }
        let Some(open) = self.open.as_mut() else {
            return Ok(None);
        };
        Ok(open
            .append(&self.scratch)
            .map(|(strip, offset)| (open.row, strip, offset)))
    }

    /// Drops the open row after a failed seal without a write cache: nothing maps to
    /// it, and its slot is never reused.
    fn abandon_open_row(&mut self) {
        self.open = None;
        self.open_failed = false;
    }

    /// Seals the open row: parity, then every piece written with FUA, all at once.
    /// Returns when all are durable. Call it when the batching window ends.
    pub async fn seal_open_row(&mut self) -> Result<(), VolumeError> {
        let Some(open) = self.open.as_ref() else {
            return Ok(());
        };
        if open.is_empty() {
            return Ok(());
        }
        let row = open.row;
        let sealed = open.seal(&self.geometry, self.coder.as_ref())?;
        let (pieces, blocks) = (sealed.pieces, sealed.strip_blocks);
        let base = self.geometry.row_offset(row).ok_or(VolumeError::NoSpace {
            rows: self.geometry.rows,
        })?;
        let writes = pieces.into_iter().map(|(piece, bytes)| {
            let shard = Arc::clone(&self.shards[piece]);
            async move {
                let len = bytes.len() as u64;
                (piece, len, shard.write(base, bytes, true).await)
            }
        });
        let mut failure = None;
        for (piece, len, result) in join_all(writes).await {
            match result {
                Ok(()) => self.stats.shard_bytes_written += len,
                Err(source) => {
                    failure.get_or_insert(VolumeError::NotDurable { row, piece, source });
                }
            }
        }
        if let Some(e) = failure {
            self.open_failed = true;
            return Err(e);
        }
        self.rows.set(row, &blocks);
        self.open = None;
        self.open_failed = false;
        self.stats.rows_sealed += 1;
        Ok(())
    }

    /// Makes every acknowledged write durable.
    pub async fn flush(&mut self) -> Result<(), VolumeError> {
        self.seal_open_row().await
    }

    /// Unmaps blocks; they read as zeroes.
    pub fn deallocate(&mut self, lba: u64, blocks: u64) -> Result<(), VolumeError> {
        self.check_range(lba, blocks)?;
        self.map.clear(lba, blocks);
        Ok(())
    }

    /// Makes blocks read as zeroes without storing any.
    pub fn write_zeroes(&mut self, lba: u64, blocks: u64) -> Result<(), VolumeError> {
        self.deallocate(lba, blocks)
    }

    /// Reads `blocks` blocks at `lba`.
    pub async fn read(&mut self, lba: u64, blocks: u64) -> Result<Vec<u8>, VolumeError> {
        self.check_range(lba, blocks)?;
        let total = usize::try_from(blocks)
            .ok()
            .and_then(|b| b.checked_mul(BLOCK_SIZE))
            .ok_or(VolumeError::OutOfRange {
                lba,
                blocks,
                capacity: self.config.blocks,
            })?;
        let mut out = vec![0u8; total];
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
            self.fetch_record(loc, first_lba).await?;
            let src = usize::from(loc.index) * BLOCK_SIZE;
            let n = usize::try_from(run).unwrap_or(0) * BLOCK_SIZE;
            let dst = usize::try_from(i).unwrap_or(0) * BLOCK_SIZE;
            let decoded = self.decoded.get(src..src + n).ok_or(VolumeError::Media {
                lba: lba + i,
                reason: "record holds fewer blocks than the map says".into(),
            })?;
            out[dst..dst + n].copy_from_slice(decoded);
            i += run;
        }
        Ok(out)
    }

    /// Reads, verifies and opens one record into `self.decoded`.
    async fn fetch_record(&mut self, loc: Location, first_lba: u64) -> Result<(), VolumeError> {
        let expected = Expected {
            first_lba,
            generation: loc.generation,
        };
        let offset = usize::try_from(loc.offset).unwrap_or(usize::MAX);
        let len = usize::try_from(loc.len).unwrap_or(usize::MAX);
        if let Some(open) = self.open.as_ref().filter(|o| o.row == loc.row) {
            let bytes =
                open.bytes(usize::from(loc.strip), offset, len)
                    .ok_or(VolumeError::Media {
                        lba: first_lba,
                        reason: "record outside the open row".into(),
                    })?;
            return match self.pipeline.open(bytes, Some(expected), &mut self.decoded) {
                Ok(_) => Ok(()),
                Err(e) => Err(VolumeError::Media {
                    lba: first_lba,
                    reason: format!("record in the open row: {e}"),
                }),
            };
        }
        let g = self.geometry;
        let base = g.row_offset(loc.row).ok_or(VolumeError::Media {
            lba: first_lba,
            reason: "row beyond the shard".into(),
        })?;
        let start = g.round_down(u64::from(loc.offset));
        let end = g.round_up(u64::from(loc.offset) + u64::from(loc.len));
        let piece = usize::from(loc.strip);
        let skip = offset - usize::try_from(start).unwrap_or(0);
        let direct = self.shards[piece].read(base + start, end - start).await;
        let mut readable = None;
        let mut node_down = false;
        match direct {
            Ok(bytes) => {
                self.stats.shard_bytes_read += bytes.len() as u64;
                let rec = bytes.get(skip..skip + len).unwrap_or(&[]);
                if self
                    .pipeline
                    .open(rec, Some(expected), &mut self.decoded)
                    .is_ok()
                {
                    self.stats.direct_reads += 1;
                    return Ok(());
                }
                readable = Some(bytes);
            }
            Err(e) => node_down = e.is_transient(),
        }
        let rebuilt = self.reconstruct(loc, expected, start, end).await?;
        self.stats.reconstructions += 1;
        if !node_down {
            // Put back only what was verified: the record's own bytes over what the
            // node returned, so bytes of neighbouring records are never changed.
            let bytes = match readable {
                Some(mut b) => {
                    b[skip..skip + len].copy_from_slice(&rebuilt[skip..skip + len]);
                    b
                }
                None => rebuilt,
            };
            self.repairs.push_back(Repair {
                row: loc.row,
                piece,
                offset: start,
                bytes,
            });
        }
        Ok(())
    }

    /// Rebuilds bytes `start..end` of the record's strip from k other pieces, trying
    /// k-subsets until the record verifies. Leaves the opened record in `self.decoded`
    /// and returns the rebuilt range.
    async fn reconstruct(
        &mut self,
        loc: Location,
        expected: Expected,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, VolumeError> {
        let g = self.geometry;
        let lba = expected.first_lba;
        let base = g.row_offset(loc.row).unwrap_or(0);
        let wanted = usize::from(loc.strip);
        let reads = (0..g.pieces()).filter(|&p| p != wanted).map(|p| {
            let written = self.rows.piece_blocks(loc.row, p) * g.shard_block;
            let shard = Arc::clone(&self.shards[p]);
            async move {
                if written <= start {
                    // Never written in this range: zeroes, known without any I/O.
                    return (p, Ok(Vec::new()));
                }
                let stop = end.min(written);
                (p, shard.read(base + start, stop - start).await)
            }
        });
        let mut present: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut errors = Vec::new();
        for (p, r) in join_all(reads).await {
            match r {
                Ok(bytes) => {
                    self.stats.shard_bytes_read += bytes.len() as u64;
                    present.push((p, bytes));
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        if present.len() < g.k {
            return Err(VolumeError::Unavailable {
                lba,
                reason: format!(
                    "{} of {} other pieces readable, {} needed: {}",
                    present.len(),
                    g.pieces() - 1,
                    g.k,
                    errors.join("; ")
                ),
            });
        }
        let span = usize::try_from(end - start).unwrap_or(0);
        let skip = usize::try_from(u64::from(loc.offset) - start).unwrap_or(0);
        let len = usize::try_from(loc.len).unwrap_or(0);
        let mut rebuilt = vec![0u8; span];
        let mut choice: Vec<usize> = (0..g.k).collect();
        for _ in 0..MAX_COMBINATIONS {
            let mut strips: Vec<Option<&[u8]>> = vec![None; g.pieces()];
            for &c in &choice {
                let (p, bytes) = &present[c];
                strips[*p] = Some(bytes.as_slice());
            }
            let ok = self
                .coder
                .reconstruct(&strips, &mut [(wanted, rebuilt.as_mut_slice())])
                .is_ok()
                && self
                    .pipeline
                    .open(
                        &rebuilt[skip..skip + len],
                        Some(expected),
                        &mut self.decoded,
                    )
                    .is_ok();
            if ok {
                return Ok(rebuilt);
            }
            if !next_combination(&mut choice, present.len()) {
                break;
            }
        }
        Err(VolumeError::Media {
            lba,
            reason: format!(
                "no combination of {} readable pieces rebuilds a record that verifies",
                present.len()
            ),
        })
    }

    /// Writes queued rebuilt pieces back. Returns how many were written; the ones whose
    /// node failed stay queued.
    pub async fn run_repairs(&mut self) -> usize {
        let mut done = 0;
        for _ in 0..self.repairs.len() {
            let Some(r) = self.repairs.pop_front() else {
                break;
            };
            let Some(base) = self.geometry.row_offset(r.row) else {
                continue;
            };
            let len = r.bytes.len() as u64;
            match self.shards[r.piece]
                .write(base + r.offset, r.bytes.clone(), true)
                .await
            {
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
