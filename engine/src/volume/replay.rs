//! Bringing a volume back from the nodes: load the checkpoint, then replay the rows
//! written after it from their self-describing record headers.
//!
//! Which rows: those of the segment that was open at the checkpoint (from where the
//! checkpoint left it) and of every segment allocated after it, in allocation order.
//! Each row starts where the previous one ended; a row is found by parsing the record
//! chain at the start of each data strip. A record counts only if it verifies (crc
//! seeded with the volume id, AEAD when encrypted) and its generation is at least the
//! checkpoint's `next_generation`: every record written after the checkpoint has such a
//! generation, and no stale record can (a chunk is freed only by a checkpoint taken
//! after everything in it was written; another volume's records fail the crc).
//!
//! A row is applied only if it is complete: its parity pieces, where readable, must
//! match the parity recomputed from its data strips. The first incomplete or empty row
//! ends the segment's log: it can only be the row being written when the engine
//! stopped, which was never acknowledged. Replayed segments are closed, so nothing is
//! ever written over a torn row, and the open ends with a checkpoint.

use std::collections::BTreeMap;

use futures::future::join_all;

use super::image::IMAGE_VERSION;
use super::{SegmentGrant, Volume, VolumeError, VolumeImage};
use crate::layout::{seal_strips, SegmentRows};
use crate::map::{BlockMap, Location};
use crate::pipeline::{RecordHeader, HEADER_LEN};

/// A record found in a replayed row.
#[derive(Debug, Clone, Copy)]
struct Found {
    strip: usize,
    offset: usize,
    header: RecordHeader,
}

/// A row's pieces as they should be on the nodes: (piece, bytes).
type RowPieces = Vec<(usize, Vec<u8>)>;

/// A complete row found in the log.
#[derive(Debug)]
struct FoundRow {
    records: Vec<Found>,
    strip_blocks: Vec<u16>,
    row_blocks: u64,
}

impl Volume {
    /// Loads `image` and replays the log after it. See the module documentation.
    pub(super) async fn restore(
        &mut self,
        grants: Vec<SegmentGrant>,
        image: Option<VolumeImage>,
    ) -> Result<(), VolumeError> {
        let mut grants: BTreeMap<u64, SegmentGrant> =
            grants.into_iter().map(|g| (g.index, g)).collect();
        let mut from_generation = 1;
        let mut order: Vec<(u64, u64, u64)> = Vec::new();
        if let Some(image) = image {
            if image.version != IMAGE_VERSION {
                return Err(VolumeError::Damaged(format!(
                    "checkpoint image version {} (this build reads {IMAGE_VERSION})",
                    image.version
                )));
            }
            from_generation = image.next_generation.max(1);
            self.generation = from_generation;
            for s in image.segments {
                let grant = grants.remove(&s.index).ok_or_else(|| {
                    VolumeError::Damaged(format!(
                        "the checkpoint names segment {} which is not allocated to the volume",
                        s.index
                    ))
                })?;
                self.add_segment(grant, true)?;
                let rows = SegmentRows::from_parts(self.geometry.k, s.row_starts, s.row_blocks)
                    .ok_or_else(|| {
                        VolumeError::Damaged(format!(
                            "row table of segment {} is inconsistent",
                            s.index
                        ))
                    })?;
                if let Some(seg) = self.segments.get_mut(&s.index) {
                    if image.tail == Some(s.index) && !s.closed {
                        order.push((s.index, rows.len(), s.used_blocks));
                    }
                    seg.rows = rows;
                    seg.used_blocks = s.used_blocks;
                    seg.stored_blocks = s.stored_blocks;
                }
            }
            let pages: Vec<(u64, Vec<u8>, Vec<u128>)> = image
                .map
                .into_iter()
                .map(|p| (p.page, p.keys, p.values))
                .collect();
            self.map = BlockMap::import(&pages)
                .ok_or_else(|| VolumeError::Damaged("checkpoint map is inconsistent".into()))?;
            let mut live: BTreeMap<u64, u64> = BTreeMap::new();
            let g = self.geometry;
            self.map
                .for_each(|_, loc| *live.entry(g.segment_of(loc.row).0).or_default() += 1);
            for (seg, n) in live {
                match self.segments.get_mut(&seg) {
                    Some(s) => s.live_blocks = n,
                    None => {
                        return Err(VolumeError::Damaged(format!(
                            "the checkpoint map points into segment {seg}, which the volume does not hold"
                        )))
                    }
                }
            }
        }
        let mut later: Vec<SegmentGrant> = grants.into_values().collect();
        later.sort_by_key(|g| g.alloc_seq);
        for grant in later {
            order.push((grant.index, 0, 0));
            self.add_segment(grant, true)?;
        }
        let mut max_seen = from_generation.saturating_sub(1);
        for (seg, first_index, first_block) in order {
            let (mut index, mut start) = (first_index, first_block);
            while let Some(row) = self
                .replay_row(seg, index, start, from_generation, &mut max_seen)
                .await?
            {
                self.apply_row(seg, index, start, &row)?;
                index += 1;
                start += row.row_blocks;
                self.stats.rows_replayed += 1;
            }
            if let Some(s) = self.segments.get_mut(&seg) {
                s.closed = true;
                s.used_blocks = start;
            }
        }
        self.generation = self.generation.max(max_seen.saturating_add(1));
        self.open_segment = None;
        Ok(())
    }

    /// Parses the chain of records at the start of a strip; returns them and where the
    /// chain ends.
    fn parse_chain(
        &mut self,
        strip: usize,
        bytes: &[u8],
        from_generation: u64,
        max_seen: &mut u64,
    ) -> (Vec<Found>, usize) {
        let mut found = Vec::new();
        let mut at = 0;
        while at + HEADER_LEN <= bytes.len() {
            let Ok(header) = RecordHeader::decode(&bytes[at..]) else {
                break;
            };
            let len = header.record_len();
            let Some(end) = at.checked_add(len).filter(|&e| e <= bytes.len()) else {
                break;
            };
            if header.generation < from_generation
                || self
                    .pipeline
                    .open(&bytes[at..end], None, &mut self.decoded)
                    .is_err()
            {
                break;
            }
            *max_seen = (*max_seen).max(header.generation);
            found.push(Found {
                strip,
                offset: at,
                header,
            });
            at = end;
        }
        (found, at)
    }

    /// Reads and checks row `index` of segment `seg`, starting at `start` (blocks).
    /// `None` when there is no complete row there (the end of this segment's log).
    ///
    /// Pieces may be unreadable (node down) or hold damaged bytes; the row is taken
    /// from the smallest set of "suspect" pieces (at most m with the unreadable ones)
    /// whose removal leaves the rest a consistent codeword with at least one record.
    /// Suspect pieces that were readable are queued for repair.
    async fn replay_row(
        &mut self,
        seg: u64,
        index: u64,
        start: u64,
        from_generation: u64,
        max_seen: &mut u64,
    ) -> Result<Option<FoundRow>, VolumeError> {
        let g = self.geometry;
        if index >= g.rows_per_segment || start >= g.chunk_blocks() {
            return Ok(None);
        }
        let span = g.strip_size.min((g.chunk_blocks() - start) * g.shard_block);
        let Some(segment) = self.segments.get(&seg) else {
            return Ok(None);
        };
        let owners: Vec<(String, u64)> = segment
            .pieces
            .iter()
            .map(|p| (p.node.clone(), p.base))
            .collect();
        let targets: Vec<_> = segment
            .pieces
            .iter()
            .map(|p| {
                (
                    std::sync::Arc::clone(&p.shard),
                    p.base + start * g.shard_block,
                )
            })
            .collect();
        let reads = targets.iter().map(|(shard, at)| {
            let shard = std::sync::Arc::clone(shard);
            let at = *at;
            async move { shard.read(at, span).await }
        });
        let raw: Vec<Option<Vec<u8>>> = join_all(reads).await.into_iter().map(Result::ok).collect();
        for p in raw.iter().flatten() {
            self.stats.shard_bytes_read += p.len() as u64;
        }
        let unreadable: Vec<usize> = (0..g.pieces()).filter(|&p| raw[p].is_none()).collect();
        if unreadable.len() > g.m {
            return Err(VolumeError::Unavailable {
                lba: 0,
                reason: format!(
                    "replaying segment {seg} row {index}: {} of {} pieces unreadable, at most {} tolerated",
                    unreadable.len(),
                    g.pieces(),
                    g.m
                ),
            });
        }
        let readable: Vec<usize> = (0..g.pieces()).filter(|&p| raw[p].is_some()).collect();
        for extra in 0..=(g.m - unreadable.len()) {
            let mut choice: Vec<usize> = (0..extra).collect();
            loop {
                let mut missing = unreadable.clone();
                missing.extend(choice.iter().map(|&c| readable[c]));
                if let Some((row, pieces)) =
                    self.try_row(&raw, &missing, span, from_generation, max_seen)
                {
                    for p in choice.iter().map(|&c| readable[c]) {
                        if let Some(bytes) =
                            pieces.iter().find(|(q, _)| *q == p).map(|(_, b)| b.clone())
                        {
                            let (shard, at) = &targets[p];
                            let (node, base) = owners[p].clone();
                            self.repairs.push_back(super::Repair {
                                segment: seg,
                                piece: p,
                                node,
                                base,
                                shard: std::sync::Arc::clone(shard),
                                offset: *at,
                                bytes,
                            });
                        }
                    }
                    return Ok(Some(row));
                }
                if extra == 0 || !super::next_combination(&mut choice, readable.len()) {
                    break;
                }
            }
        }
        Ok(None)
    }

    /// Tries to read a row treating the pieces in `missing` as absent: the data strips
    /// among them are rebuilt from the others. Returns the row and its pieces as they
    /// should be, if the result holds records and agrees with every parity piece used.
    fn try_row(
        &mut self,
        raw: &[Option<Vec<u8>>],
        missing: &[usize],
        span: u64,
        from_generation: u64,
        max_seen: &mut u64,
    ) -> Option<(FoundRow, RowPieces)> {
        let g = self.geometry;
        let span_len = usize::try_from(span).ok()?;
        let mut strips: Vec<Vec<u8>> = vec![Vec::new(); g.k];
        let mut records = Vec::new();
        for j in (0..g.k).filter(|j| !missing.contains(j)) {
            let bytes = raw[j].as_ref()?;
            let (found, end) = self.parse_chain(j, bytes, from_generation, max_seen);
            records.extend(found);
            strips[j] = bytes[..end].to_vec();
        }
        let lost: Vec<usize> = (0..g.k).filter(|j| missing.contains(j)).collect();
        if !lost.is_empty() {
            let coder = self.coder.as_ref()?;
            let padded: Vec<Vec<u8>> = strips
                .iter()
                .map(|s| {
                    let mut v = s.clone();
                    v.resize(span_len, 0);
                    v
                })
                .collect();
            let inputs: Vec<Option<&[u8]>> = padded
                .iter()
                .enumerate()
                .map(|(j, v)| (!missing.contains(&j)).then_some(v.as_slice()))
                .chain(
                    (g.k..g.pieces()).map(|p| raw[p].as_deref().filter(|_| !missing.contains(&p))),
                )
                .collect();
            let mut rebuilt: Vec<Vec<u8>> = vec![vec![0u8; span_len]; lost.len()];
            {
                let mut wanted: Vec<(usize, &mut [u8])> = lost
                    .iter()
                    .copied()
                    .zip(rebuilt.iter_mut().map(Vec::as_mut_slice))
                    .collect();
                coder.reconstruct(&inputs, &mut wanted).ok()?;
            }
            for (j, bytes) in lost.iter().copied().zip(rebuilt) {
                let (found, end) = self.parse_chain(j, &bytes, from_generation, max_seen);
                records.extend(found);
                strips[j] = bytes[..end].to_vec();
            }
        }
        if records.is_empty() {
            return None;
        }
        let sealed = seal_strips(&strips, &g, self.coder.as_deref()).ok()?;
        let row_len = usize::try_from(sealed.row_blocks * g.shard_block).ok()?;
        for p in (g.k..g.pieces()).filter(|p| !missing.contains(p)) {
            let want = sealed
                .pieces
                .iter()
                .find(|(q, _)| *q == p)
                .map(|(_, b)| b.as_slice());
            let got = raw[p].as_ref().and_then(|r| r.get(..row_len));
            if want != got {
                // Parity disagrees with the data: torn or damaged under this choice.
                return None;
            }
        }
        records.sort_by_key(|r| r.header.generation);
        Some((
            FoundRow {
                records,
                strip_blocks: sealed.strip_blocks,
                row_blocks: sealed.row_blocks,
            },
            sealed.pieces,
        ))
    }

    /// Records a replayed row in its segment and applies its records to the map.
    fn apply_row(
        &mut self,
        seg: u64,
        index: u64,
        start: u64,
        row: &FoundRow,
    ) -> Result<(), VolumeError> {
        let number = self.geometry.row_number(seg, index).ok_or_else(|| {
            VolumeError::Damaged(format!(
                "row {index} of segment {seg} is beyond the row space"
            ))
        })?;
        let mut stored = 0;
        for r in &row.records {
            let h = r.header;
            if h.is_zeroes() {
                let count =
                    u64::from(h.zero_blocks).min(self.config.blocks.saturating_sub(h.first_lba));
                self.map_clear(h.first_lba, count);
                continue;
            }
            if h.first_lba.saturating_add(u64::from(h.block_count)) > self.config.blocks {
                return Err(VolumeError::Damaged(format!(
                    "a record in segment {seg} row {index} covers LBA {}+{}, beyond the volume",
                    h.first_lba, h.block_count
                )));
            }
            let loc = Location {
                row: number,
                strip: u8::try_from(r.strip).unwrap_or(u8::MAX),
                offset: u32::try_from(r.offset).unwrap_or(u32::MAX),
                len: u32::try_from(h.record_len()).unwrap_or(u32::MAX),
                index: 0,
                generation: h.generation,
            };
            self.map_record(h.first_lba, u64::from(h.block_count), loc);
            stored += u64::from(h.block_count);
        }
        if let Some(s) = self.segments.get_mut(&seg) {
            s.rows.push(start, &row.strip_blocks)?;
            s.stored_blocks += stored;
        }
        Ok(())
    }
}
