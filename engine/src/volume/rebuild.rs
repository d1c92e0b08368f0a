//! Rebuild: move every piece that lives on a failed, draining or removed node to
//! another node, recreating it from the surviving pieces.
//!
//! The volume's owner runs it in bounded steps between foreground requests
//! ([`Volume::rebuild_step`]), so I/O carries on and the owner decides the pace. The
//! protocol, crash-safe at every point:
//! 1. [`Volume::start_rebuild`] closes the open segment if it has a piece on a node
//!    being left (new rows go to a fresh segment placed elsewhere) and checkpoints.
//!    From then on every record in a segment to rebuild is older than the durable
//!    image, so a copy of it found anywhere later (a chunk written by a rebuild that
//!    never committed, then reused) is ignored by replay.
//! 2. Per piece, the source reserves a chunk on a node placement allows next to the
//!    segment's other pieces ([`super::SegmentSource::reserve_piece`]); the
//!    reservation keeps other allocations off it.
//! 3. Every row of the piece is rebuilt: the other pieces' bytes of the row are read,
//!    k of them decode the row's data strips, every data strip's record chain must
//!    verify (crc seeded with the volume id) before anything is written, and the
//!    piece's bytes (a data strip, or parity re-encoded from verified data) are
//!    written to the new chunk with FUA. k-subsets are tried until one verifies.
//! 4. [`super::SegmentSource::replace_piece`] makes the new location durable (the pool
//!    commits its catalogue); only then does the volume switch to it, and the old
//!    chunk is forgotten.
//!
//! A crash before step 4 leaves the catalogue naming the old piece: the volume opens
//! degraded (reads reconstruct) and the rebuild starts over, since the condition that
//! started it (node failed, draining, removed) is still there. A crash after step 4
//! leaves the new piece in the catalogue, complete. Segments are closed, so no row is
//! written to them while their piece moves; a segment garbage collection frees
//! meanwhile simply drops out of the rebuild (its reservation is released).

use std::collections::VecDeque;

use futures::future::join_all;

use super::{SegmentPiece, Volume, VolumeError, MAX_COMBINATIONS};
use crate::pipeline::{record::record_crc, RecordHeader, HEADER_LEN};

/// Bytes of the header the crc covers.
const CRC_COVERS: usize = 44;

/// Progress of a volume's rebuild, in bytes of pieces written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildProgress {
    /// Bytes of pieces rebuilt so far.
    pub done_bytes: u64,
    /// Bytes of pieces to rebuild in all (grows when more nodes are left).
    pub total_bytes: u64,
    /// Pieces still to move (0: the rebuild is complete).
    pub pieces_left: u64,
}

#[derive(Debug)]
struct Job {
    segment: u64,
    piece: usize,
    from: (String, u64),
    target: SegmentPiece,
    next_row: u64,
}

/// The rebuild state of a volume.
#[derive(Debug, Default)]
pub(super) struct Rebuild {
    /// Nodes whose pieces are moved away.
    nodes: Vec<String>,
    queue: VecDeque<(u64, usize)>,
    job: Option<Job>,
    progress: RebuildProgress,
}

impl Rebuild {
    /// Nodes being left (new segments avoid them too).
    pub(super) fn nodes(&self) -> &[String] {
        &self.nodes
    }
}

/// Whether `bytes` (a data strip of which `written` bytes were stored) holds a chain
/// of records that verify from byte 0 to the strip's last block.
fn strip_verifies(
    volume: &crate::pipeline::VolumeId,
    bytes: &[u8],
    written: usize,
    block: usize,
) -> bool {
    if written == 0 {
        return true;
    }
    let Some(bytes) = bytes.get(..written) else {
        return false;
    };
    let mut at = 0;
    while at + HEADER_LEN <= written {
        let Ok(header) = RecordHeader::decode(&bytes[at..]) else {
            break;
        };
        let Some(end) = at
            .checked_add(header.record_len())
            .filter(|&e| e <= written)
        else {
            return false;
        };
        if record_crc(
            volume,
            &bytes[at..at + CRC_COVERS],
            &bytes[at + HEADER_LEN..end],
        ) != header.crc
        {
            return false;
        }
        at = end;
    }
    // The strip was written as its records rounded up to whole blocks.
    at > 0 && at + block > written
}

impl Volume {
    /// Moves every piece held on `nodes` elsewhere (adding to a rebuild under way).
    /// Closes the open segment if it has a piece there and checkpoints (step 1 of the
    /// module documentation); the pieces are then moved by [`Volume::rebuild_step`].
    pub async fn start_rebuild(&mut self, nodes: &[String]) -> Result<(), VolumeError> {
        let state = self.rebuild.get_or_insert_with(Rebuild::default);
        let mut widened = false;
        for n in nodes {
            if !state.nodes.contains(n) {
                state.nodes.push(n.clone());
                widened = true;
            }
        }
        if !widened {
            return Ok(());
        }
        let leaving = state.nodes.clone();
        if let Some(open) = self.open_segment {
            let affected = self
                .segments
                .get(&open)
                .is_some_and(|s| s.pieces.iter().any(|p| leaving.contains(&p.node)));
            if affected {
                self.seal_open_row().await?;
                if let Some(seg) = self.segments.get_mut(&open) {
                    seg.closed = true;
                }
                self.open_segment = None;
            }
        }
        self.checkpoint(Vec::new()).await?;
        self.queue_rebuilds();
        Ok(())
    }

    /// Queues every piece on a node being left that is not queued or moving yet.
    fn queue_rebuilds(&mut self) {
        let shard_block = self.geometry.shard_block;
        let Some(state) = self.rebuild.as_mut() else {
            return;
        };
        for (&index, seg) in &self.segments {
            if Some(index) == self.open_segment {
                continue;
            }
            for (p, piece) in seg.pieces.iter().enumerate() {
                if !state.nodes.contains(&piece.node)
                    || state.queue.contains(&(index, p))
                    || state
                        .job
                        .as_ref()
                        .is_some_and(|j| j.segment == index && j.piece == p)
                {
                    continue;
                }
                let bytes: u64 = (0..seg.rows.len())
                    .map(|r| seg.rows.piece_blocks(r, p) * shard_block)
                    .sum();
                state.queue.push_back((index, p));
                state.progress.total_bytes += bytes;
                state.progress.pieces_left += 1;
            }
        }
    }

    /// Progress of the rebuild, if one was started.
    pub fn rebuild_progress(&self) -> Option<RebuildProgress> {
        self.rebuild.as_ref().map(|r| r.progress)
    }

    /// Whether pieces are waiting to be moved.
    pub fn rebuild_pending(&self) -> bool {
        self.rebuild
            .as_ref()
            .is_some_and(|r| r.job.is_some() || !r.queue.is_empty())
    }

    /// Rebuilds rows until about `max_bytes` of pieces are written or a piece is
    /// complete (and committed). Returns the bytes written; 0 when nothing is left.
    /// On an error (too few pieces readable, no node to move to, a commit that failed)
    /// the piece stays queued and a later step tries again.
    pub async fn rebuild_step(&mut self, max_bytes: u64) -> Result<u64, VolumeError> {
        if self.rebuild.as_ref().and_then(|r| r.job.as_ref()).is_none() {
            self.next_rebuild_job().await?;
        }
        let Some(job) = self.rebuild.as_mut().and_then(|r| r.job.take()) else {
            return Ok(0);
        };
        let mut job = job;
        let Some(rows) = self.segments.get(&job.segment).map(|s| s.rows.len()) else {
            // Freed by garbage collection meanwhile: nothing to move.
            self.finish_job(&job);
            let _released = self.source.release_piece(self.config.id, job.target).await;
            return Ok(0);
        };
        let mut written = 0;
        while job.next_row < rows && written < max_bytes.max(1) {
            match self.rebuild_row(&job, job.next_row).await {
                Ok(n) => {
                    written += n;
                    job.next_row += 1;
                }
                Err(e) => {
                    self.put_back(job);
                    self.progress_add(written);
                    return Err(e);
                }
            }
        }
        self.progress_add(written);
        if job.next_row < rows {
            if let Some(r) = self.rebuild.as_mut() {
                r.job = Some(job);
            }
            return Ok(written);
        }
        let committed = self
            .source
            .replace_piece(
                self.config.id,
                job.segment,
                job.piece,
                job.from.clone(),
                job.target.clone(),
            )
            .await;
        match committed {
            Ok(()) => {
                if let Some(p) = self
                    .segments
                    .get_mut(&job.segment)
                    .and_then(|s| s.pieces.get_mut(job.piece))
                {
                    *p = job.target.clone();
                }
                self.finish_job(&job);
                Ok(written)
            }
            Err(e) => {
                // The rows are written; keep the job and commit on the next step.
                if let Some(r) = self.rebuild.as_mut() {
                    r.job = Some(job);
                }
                Err(e)
            }
        }
    }

    /// Runs the rebuild until nothing is left (for tests and tools).
    pub async fn rebuild_all(&mut self, nodes: &[String]) -> Result<u64, VolumeError> {
        self.start_rebuild(nodes).await?;
        let mut total = 0;
        while self.rebuild_pending() {
            total += self.rebuild_step(u64::MAX).await?;
        }
        Ok(total)
    }

    /// Gives back the chunk reserved for the piece being moved (the volume is closing;
    /// the rebuild starts over when it is opened again).
    pub async fn abandon_rebuild(&mut self) {
        if let Some(job) = self.rebuild.as_mut().and_then(|r| r.job.take()) {
            let _released = self.source.release_piece(self.config.id, job.target).await;
        }
    }

    fn progress_add(&mut self, bytes: u64) {
        if let Some(r) = self.rebuild.as_mut() {
            r.progress.done_bytes = (r.progress.done_bytes + bytes).min(r.progress.total_bytes);
        }
    }

    fn finish_job(&mut self, job: &Job) {
        let shard_block = self.geometry.shard_block;
        let left: u64 = self
            .segments
            .get(&job.segment)
            .map(|s| {
                (job.next_row..s.rows.len())
                    .map(|r| s.rows.piece_blocks(r, job.piece) * shard_block)
                    .sum()
            })
            .unwrap_or(0);
        if let Some(r) = self.rebuild.as_mut() {
            r.progress.pieces_left = r.progress.pieces_left.saturating_sub(1);
            if self.segments.contains_key(&job.segment) {
                r.progress.done_bytes = (r.progress.done_bytes + left).min(r.progress.total_bytes);
            } else {
                // A freed segment's remaining bytes will never be written.
                r.progress.total_bytes = r.progress.total_bytes.saturating_sub(left);
            }
        }
    }

    /// A job whose row failed stays current (its reservation and rows done kept).
    fn put_back(&mut self, job: Job) {
        if let Some(r) = self.rebuild.as_mut() {
            r.job = Some(job);
        }
    }

    /// Takes the next queued piece that still needs moving and reserves its target.
    async fn next_rebuild_job(&mut self) -> Result<(), VolumeError> {
        loop {
            let Some(state) = self.rebuild.as_mut() else {
                return Ok(());
            };
            let Some((segment, piece)) = state.queue.pop_front() else {
                return Ok(());
            };
            let leaving = state.nodes.clone();
            let Some(seg) = self.segments.get(&segment) else {
                state.progress.pieces_left = state.progress.pieces_left.saturating_sub(1);
                continue;
            };
            let Some(from) = seg.pieces.get(piece).map(|p| (p.node.clone(), p.base)) else {
                state.progress.pieces_left = state.progress.pieces_left.saturating_sub(1);
                continue;
            };
            if !leaving.contains(&from.0) {
                state.progress.pieces_left = state.progress.pieces_left.saturating_sub(1);
                continue;
            }
            let mut avoid = leaving;
            avoid.extend(self.avoided_nodes());
            match self
                .source
                .reserve_piece(self.config.id, segment, piece, avoid)
                .await
            {
                Ok(target) => {
                    if let Some(r) = self.rebuild.as_mut() {
                        r.job = Some(Job {
                            segment,
                            piece,
                            from,
                            target,
                            next_row: 0,
                        });
                    }
                    return Ok(());
                }
                Err(e) => {
                    if let Some(r) = self.rebuild.as_mut() {
                        r.queue.push_back((segment, piece));
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Rebuilds row `row` of the job's piece into its target. Returns bytes written.
    async fn rebuild_row(&mut self, job: &Job, row: u64) -> Result<u64, VolumeError> {
        let g = self.geometry;
        let lba = 0;
        let seg = self.segments.get(&job.segment).ok_or(VolumeError::Media {
            lba,
            reason: "segment gone".into(),
        })?;
        let start = seg.rows.start_block(row).unwrap_or(0) * g.shard_block;
        let want = seg.rows.piece_blocks(row, job.piece) * g.shard_block;
        if want == 0 {
            return Ok(0);
        }
        let strip_len = |p: usize| seg.rows.piece_blocks(row, p) * g.shard_block;
        let row_len = (0..g.k).map(strip_len).max().unwrap_or(0);
        let reads = seg
            .pieces
            .iter()
            .enumerate()
            .filter(|&(p, _)| p != job.piece)
            .map(|(p, piece)| {
                let len = strip_len(p);
                let shard = std::sync::Arc::clone(&piece.shard);
                let at = piece.base + start;
                async move {
                    if len == 0 {
                        return (p, Ok(Vec::new()));
                    }
                    (p, shard.read(at, len).await)
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
        let written: Vec<usize> = (0..g.k)
            .map(|d| usize::try_from(strip_len(d)).unwrap_or(usize::MAX))
            .collect();
        if present.len() < g.k {
            return Err(VolumeError::Unavailable {
                lba,
                reason: format!(
                    "segment {} row {row}: {} of {} other pieces readable, {} needed: {}",
                    job.segment,
                    present.len(),
                    g.pieces() - 1,
                    g.k,
                    errors.join("; ")
                ),
            });
        }
        let coder = self
            .coder
            .as_ref()
            .ok_or_else(|| VolumeError::Unavailable {
                lba,
                reason: "a single-copy volume has no other piece to rebuild from".into(),
            })?;
        let l = usize::try_from(row_len).unwrap_or(0);
        let block = usize::try_from(g.shard_block).unwrap_or(512);
        let volume = self.config.id;
        let mut choice: Vec<usize> = (0..g.k).collect();
        let mut result = None;
        for _ in 0..MAX_COMBINATIONS {
            let mut strips: Vec<Option<&[u8]>> = vec![None; g.pieces()];
            for &c in &choice {
                let (p, bytes) = &present[c];
                strips[*p] = Some(bytes.as_slice());
            }
            // Every data strip, decoded where it is not among the chosen pieces.
            let missing: Vec<usize> = (0..g.k).filter(|d| strips[*d].is_none()).collect();
            let mut bufs: Vec<Vec<u8>> = missing.iter().map(|_| vec![0u8; l]).collect();
            let decoded = if missing.is_empty() {
                true
            } else {
                let mut wanted: Vec<(usize, &mut [u8])> = missing
                    .iter()
                    .zip(bufs.iter_mut())
                    .map(|(&d, b)| (d, b.as_mut_slice()))
                    .collect();
                coder.reconstruct(&strips, &mut wanted).is_ok()
            };
            if decoded {
                let data: Vec<&[u8]> = (0..g.k)
                    .map(|d| match missing.iter().position(|&x| x == d) {
                        Some(i) => bufs[i].as_slice(),
                        None => strips[d].unwrap_or(&[]),
                    })
                    .collect();
                let verified = data
                    .iter()
                    .zip(&written)
                    .all(|(bytes, &w)| strip_verifies(&volume, bytes, w, block));
                if verified {
                    let want_len = usize::try_from(want).unwrap_or(0);
                    let bytes = if job.piece < g.k {
                        data[job.piece].get(..want_len).map(<[u8]>::to_vec)
                    } else {
                        let mut parity: Vec<Vec<u8>> = (0..g.m).map(|_| vec![0u8; l]).collect();
                        let padded: Vec<&[u8]> = data
                            .iter()
                            .zip(&written)
                            .map(|(b, &w)| b.get(..w).unwrap_or(b))
                            .collect();
                        let mut outs: Vec<&mut [u8]> =
                            parity.iter_mut().map(Vec::as_mut_slice).collect();
                        coder
                            .encode(&padded, &mut outs)
                            .ok()
                            .and_then(|()| parity.get(job.piece - g.k).cloned())
                            .map(|mut p| {
                                p.truncate(want_len);
                                p
                            })
                    };
                    if let Some(b) = bytes {
                        result = Some(b);
                        break;
                    }
                }
            }
            if !super::next_combination(&mut choice, present.len()) {
                break;
            }
        }
        let bytes = result.ok_or_else(|| VolumeError::Media {
            lba,
            reason: format!(
                "segment {} row {row}: no combination of {} readable pieces decodes records that verify",
                job.segment,
                present.len()
            ),
        })?;
        let len = bytes.len() as u64;
        job.target
            .shard
            .write(job.target.base + start, bytes, true)
            .await
            .map_err(|e| VolumeError::Unavailable {
                lba,
                reason: format!("writing the rebuilt piece to {}: {e}", job.target.node),
            })?;
        self.stats.rebuild_bytes_written += len;
        Ok(len)
    }
}
