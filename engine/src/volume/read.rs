//! Reads that run outside the volume's owner.
//!
//! A read needs the owner only to resolve the map: which records hold the blocks and
//! where their rows are. Fetching, verifying, decrypting, decompressing and, on a
//! failure, rebuilding from the other pieces need nothing of the volume's mutable
//! state, so [`super::Volume::plan_read`] turns a request into a [`ReadPlan`] that owns
//! everything it needs (shard handles, row positions, a share of the pipeline and coder
//! pools) and can run as its own task while the owner goes on with other requests.
//!
//! Why a plan stays correct while the owner moves on:
//! - Rows are never rewritten in place (only repairs, which put back the same bytes),
//!   so the bytes a plan points at stay what they were unless their chunk is freed and
//!   reused. The plan *pins* the segments it reads; garbage collection may stop
//!   referencing a pinned segment but the owner releases it to the pool only after the
//!   pin is gone ([`super::Volume::finish_read`]), so its chunks cannot be reused
//!   under a read.
//! - Independently of pinning, every record is checked against the identity the map
//!   gave (volume in the crc seed and AAD, first LBA, generation), so bytes of another
//!   record never pass as this one.
//! - A read sees every write acknowledged before it was submitted: the owner plans a
//!   read only after the writes queued before it are durable and mapped (records of a
//!   write-cache volume's open row are copied into the plan).
//!
//! Repairs found by a plan (a piece that returned bad bytes) go back to the owner with
//! the plan's [`ReadDone`]; the owner queues them only if the piece is still the one the
//! plan read (a rebuild or a freed segment makes them moot).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;

use super::{Repair, VolumeError, MAX_COMBINATIONS};
use crate::layout::Geometry;
use crate::map::Location;
use crate::pipeline::{
    coder_for, Compression, DataKey, ErasureCoder, Expected, RecordPipeline, VolumeId, BLOCK_SIZE,
};
use crate::shard::ShardStore;

/// Most idle pipelines or coders a volume keeps for its reads.
const POOL_MAX: usize = 64;

/// What reads of one volume share: the means to open records and rebuild strips.
/// Pipelines and coders are stateful (`&mut`, `RefCell` caches), so each read borrows
/// one from a small free list; the lock is held only to take or return one, never
/// across an `.await`.
pub(super) struct ReadContext {
    volume: VolumeId,
    compression: Compression,
    key: Option<DataKey>,
    geometry: Geometry,
    pipelines: Mutex<Vec<RecordPipeline>>,
    coders: Mutex<Vec<Box<dyn ErasureCoder>>>,
}

impl std::fmt::Debug for ReadContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadContext")
            .field("volume", &self.volume)
            .field("compression", &self.compression)
            .field("encrypted", &self.key.is_some())
            .finish_non_exhaustive()
    }
}

/// Where piece `p` of a record's row is: its shard, the row's first byte on the node,
/// and how many bytes of the row were written to it.
#[derive(Debug, Clone)]
pub(super) struct PieceAt {
    pub node: String,
    pub shard: Arc<dyn ShardStore>,
    /// Byte offset of the chunk on the node.
    pub base: u64,
    /// Byte offset of the row on the node.
    pub row_base: u64,
    /// Bytes of this row written to the piece.
    pub written: u64,
}

/// One stored record to fetch.
#[derive(Debug, Clone)]
pub(super) struct RecordFetch {
    pub loc: Location,
    pub expected: Expected,
    pub segment: u64,
    pub pieces: Vec<PieceAt>,
}

/// Where a part of a read comes from.
#[derive(Debug)]
pub(super) enum Source {
    /// A record of the open row (write cache), copied at planning time.
    Open(Vec<u8>),
    /// A record on the nodes.
    Stored(RecordFetch),
}

/// Blocks `src..src + n` of one record go to `dst..dst + n` of the read's buffer
/// (byte offsets).
#[derive(Debug)]
struct Part {
    lba: u64,
    dst: usize,
    src: usize,
    n: usize,
    expected: Expected,
    source: Source,
}

/// What a finished read hands back to the owner.
#[derive(Debug, Default)]
pub struct ReadDone {
    pub(super) pinned: Vec<u64>,
    pub(super) repairs: Vec<Repair>,
    pub(super) shard_bytes_read: u64,
    pub(super) direct_reads: u64,
    pub(super) reconstructions: u64,
}

impl ReadDone {
    fn absorb(&mut self, other: ReadDone) {
        self.pinned.extend(other.pinned);
        self.repairs.extend(other.repairs);
        self.shard_bytes_read += other.shard_bytes_read;
        self.direct_reads += other.direct_reads;
        self.reconstructions += other.reconstructions;
    }
}

/// A read resolved against the map, runnable without the volume. See the module
/// documentation; hand its [`ReadDone`] to [`super::Volume::finish_read`].
#[derive(Debug)]
pub struct ReadPlan {
    ctx: Arc<ReadContext>,
    len: usize,
    parts: Vec<Part>,
    done: ReadDone,
    /// How long a record none of whose pieces can be reached is tried again.
    outage_wait: Duration,
}

impl ReadPlan {
    pub(super) fn new(ctx: Arc<ReadContext>, len: usize, outage_wait: Duration) -> Self {
        Self {
            ctx,
            len,
            parts: Vec::new(),
            done: ReadDone::default(),
            outage_wait,
        }
    }

    /// Adds blocks of one record; pins its segment when it is read from the nodes.
    pub(super) fn push(
        &mut self,
        lba: u64,
        dst: usize,
        src: usize,
        n: usize,
        expected: Expected,
        source: Source,
    ) {
        if let Source::Stored(f) = &source {
            self.done.pinned.push(f.segment);
        }
        self.parts.push(Part {
            lba,
            dst,
            src,
            n,
            expected,
            source,
        });
    }

    /// The segments this plan pins.
    pub(super) fn pinned(&self) -> &[u64] {
        &self.done.pinned
    }

    /// Fetches every record of the plan (all at once), verifies and opens them and
    /// assembles the blocks. The [`ReadDone`] comes back whatever the result.
    pub async fn execute(self) -> (Result<Vec<u8>, VolumeError>, ReadDone) {
        let Self {
            ctx,
            len,
            parts,
            mut done,
            outage_wait,
        } = self;
        let fetches = parts.iter().map(|p| {
            let ctx = &ctx;
            async move {
                let mut d = ReadDone::default();
                let mut decoded = Vec::new();
                let started = std::time::Instant::now();
                let mut pause = Duration::from_millis(100);
                loop {
                    let r = match &p.source {
                        Source::Open(bytes) => ctx.open(bytes, p.expected, &mut decoded),
                        Source::Stored(f) => {
                            ctx.fetch(f, false, &mut d, &mut decoded).await.map(|_| ())
                        }
                    };
                    // No piece reachable: every path may be reconnecting at once (see
                    // `Volume::set_outage_wait`). The segment stays pinned meanwhile.
                    if matches!(r, Err(VolumeError::Unavailable { .. }))
                        && started.elapsed() + pause <= outage_wait
                    {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                        decoded.clear();
                        continue;
                    }
                    break (r, decoded, d);
                }
            }
        });
        let results = join_all(fetches).await;
        let mut out = vec![0u8; len];
        let mut failure = None;
        for (p, (r, decoded, d)) in parts.iter().zip(results) {
            done.absorb(d);
            if failure.is_some() {
                continue;
            }
            if let Err(e) = r {
                failure = Some(e);
                continue;
            }
            match (
                decoded.get(p.src..p.src + p.n),
                out.get_mut(p.dst..p.dst + p.n),
            ) {
                (Some(from), Some(to)) => to.copy_from_slice(from),
                _ => {
                    failure = Some(VolumeError::Media {
                        lba: p.lba,
                        reason: "record holds fewer blocks than the map says".into(),
                    })
                }
            }
        }
        match failure {
            Some(e) => (Err(e), done),
            None => (Ok(out), done),
        }
    }
}

impl ReadContext {
    pub(super) fn new(
        volume: VolumeId,
        compression: Compression,
        key: Option<&DataKey>,
        geometry: Geometry,
    ) -> Self {
        Self {
            volume,
            compression,
            key: key.cloned(),
            geometry,
            pipelines: Mutex::new(Vec::new()),
            coders: Mutex::new(Vec::new()),
        }
    }

    fn take_pipeline(&self) -> Result<RecordPipeline, VolumeError> {
        let idle = self.pipelines.lock().ok().and_then(|mut p| p.pop());
        match idle {
            Some(p) => Ok(p),
            None => Ok(RecordPipeline::new(
                self.volume,
                self.compression,
                self.key.as_ref(),
                None,
            )?),
        }
    }

    fn give_pipeline(&self, p: RecordPipeline) {
        if let Ok(mut idle) = self.pipelines.lock() {
            if idle.len() < POOL_MAX {
                idle.push(p);
            }
        }
    }

    fn take_coder(&self) -> Result<Box<dyn ErasureCoder>, VolumeError> {
        let idle = self.coders.lock().ok().and_then(|mut c| c.pop());
        match idle {
            Some(c) => Ok(c),
            None => Ok(coder_for(self.geometry.k, self.geometry.m)?),
        }
    }

    fn give_coder(&self, c: Box<dyn ErasureCoder>) {
        if let Ok(mut idle) = self.coders.lock() {
            if idle.len() < POOL_MAX {
                idle.push(c);
            }
        }
    }

    /// Verifies and opens one record's stored bytes into `out`.
    pub(super) fn open(
        &self,
        stored: &[u8],
        expected: Expected,
        out: &mut Vec<u8>,
    ) -> Result<(), VolumeError> {
        let mut p = self.take_pipeline()?;
        let r = p.open(stored, Some(expected), out);
        self.give_pipeline(p);
        r.map(|_| ()).map_err(|e| VolumeError::Media {
            lba: expected.first_lba,
            reason: format!("record in the open row: {e}"),
        })
    }

    fn verifies(&self, stored: &[u8], expected: Expected, out: &mut Vec<u8>) -> bool {
        match self.take_pipeline() {
            Ok(mut p) => {
                let ok = p.open(stored, Some(expected), out).is_ok();
                self.give_pipeline(p);
                ok
            }
            Err(_) => false,
        }
    }

    /// Reads, verifies and opens one record into `decoded`; with `keep`, also returns
    /// the verified stored bytes (for garbage collection). On a node failure or bytes
    /// that do not verify, rebuilds the record from the other pieces; bytes that came
    /// back wrong from a reachable node are queued in `done` for repair.
    pub(super) async fn fetch(
        &self,
        f: &RecordFetch,
        keep: bool,
        done: &mut ReadDone,
        decoded: &mut Vec<u8>,
    ) -> Result<Option<Vec<u8>>, VolumeError> {
        let g = self.geometry;
        let loc = f.loc;
        let offset = usize::try_from(loc.offset).unwrap_or(usize::MAX);
        let len = usize::try_from(loc.len).unwrap_or(usize::MAX);
        let piece = usize::from(loc.strip);
        let at = f.pieces.get(piece).ok_or(VolumeError::Media {
            lba: f.expected.first_lba,
            reason: format!("row {} has no piece {piece}", loc.row),
        })?;
        let start = g.round_down(u64::from(loc.offset));
        let end = g.round_up(u64::from(loc.offset) + u64::from(loc.len));
        let skip = offset - usize::try_from(start).unwrap_or(0);
        let direct = at.shard.read(at.row_base + start, end - start).await;
        let mut readable = None;
        let mut node_down = false;
        match direct {
            Ok(bytes) => {
                done.shard_bytes_read += bytes.len() as u64;
                let rec = bytes.get(skip..skip + len).unwrap_or(&[]);
                if self.verifies(rec, f.expected, decoded) {
                    done.direct_reads += 1;
                    return Ok(keep.then(|| rec.to_vec()));
                }
                readable = Some(bytes);
            }
            Err(e) => node_down = e.is_transient(),
        }
        let rebuilt = self.reconstruct(f, start, end, done, decoded).await?;
        done.reconstructions += 1;
        let kept = keep.then(|| rebuilt[skip..skip + len].to_vec());
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
            done.repairs.push(Repair {
                segment: f.segment,
                piece,
                node: at.node.clone(),
                base: at.base,
                shard: Arc::clone(&at.shard),
                offset: at.row_base + start,
                bytes,
            });
        }
        Ok(kept)
    }

    /// Rebuilds bytes `start..end` of the record's strip from k other pieces, trying
    /// k-subsets until the record verifies. Leaves the opened record in `decoded` and
    /// returns the rebuilt range.
    async fn reconstruct(
        &self,
        f: &RecordFetch,
        start: u64,
        end: u64,
        done: &mut ReadDone,
        decoded: &mut Vec<u8>,
    ) -> Result<Vec<u8>, VolumeError> {
        let g = self.geometry;
        let loc = f.loc;
        let lba = f.expected.first_lba;
        let wanted = usize::from(loc.strip);
        if g.m == 0 {
            return Err(VolumeError::Unavailable {
                lba,
                reason: "a single-copy volume has no other piece to rebuild from".into(),
            });
        }
        let reads = f
            .pieces
            .iter()
            .enumerate()
            .filter(|&(p, _)| p != wanted)
            .map(|(p, at)| async move {
                if at.written <= start {
                    // Never written in this range: zeroes, known without any I/O.
                    return (p, Ok(Vec::new()));
                }
                let stop = end.min(at.written);
                (p, at.shard.read(at.row_base + start, stop - start).await)
            });
        let mut present: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut errors = Vec::new();
        for (p, r) in join_all(reads).await {
            match r {
                Ok(bytes) => {
                    done.shard_bytes_read += bytes.len() as u64;
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
        let coder = self.take_coder()?;
        let mut pipeline = match self.take_pipeline() {
            Ok(p) => p,
            Err(e) => {
                self.give_coder(coder);
                return Err(e);
            }
        };
        let mut choice: Vec<usize> = (0..g.k).collect();
        let mut found = false;
        for _ in 0..MAX_COMBINATIONS {
            let mut strips: Vec<Option<&[u8]>> = vec![None; g.pieces()];
            for &c in &choice {
                let (p, bytes) = &present[c];
                strips[*p] = Some(bytes.as_slice());
            }
            if coder
                .reconstruct(&strips, &mut [(wanted, rebuilt.as_mut_slice())])
                .is_ok()
                && pipeline
                    .open(&rebuilt[skip..skip + len], Some(f.expected), decoded)
                    .is_ok()
            {
                found = true;
                break;
            }
            if !super::next_combination(&mut choice, present.len()) {
                break;
            }
        }
        self.give_coder(coder);
        self.give_pipeline(pipeline);
        if found {
            return Ok(rebuilt);
        }
        Err(VolumeError::Media {
            lba,
            reason: format!(
                "no combination of {} readable pieces rebuilds a record that verifies",
                present.len()
            ),
        })
    }
}

/// Bytes of `blocks` 4 KiB blocks, if addressable.
pub(super) fn read_len(blocks: u64) -> Option<usize> {
    usize::try_from(blocks).ok()?.checked_mul(BLOCK_SIZE)
}
