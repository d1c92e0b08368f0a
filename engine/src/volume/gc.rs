//! Garbage collection: win back the space of segments whose records are mostly dead.
//!
//! A record dies when every block that mapped to it is overwritten, deallocated or
//! zeroed; rows are never modified, so the space comes back only by moving the live
//! records of a segment elsewhere and freeing the whole segment. The steps, each
//! crash-safe:
//! 1. Checkpoint. Every record in the log is now older than the image, so the copies
//!    made next (which keep their generation: the AAD binds it) are ignored by replay
//!    if the engine stops before step 3; the originals are still where the image says.
//! 2. Copy each live record, verified (and rebuilt from other pieces if need be), into
//!    new rows; once a row is durable, remap the blocks that still point at the original.
//! 3. Checkpoint again, freeing the victims in the same step: the pool releases their
//!    chunks only after the image that no longer references them is durable.
//!
//! Records are copied whole even when only some of their blocks are live (the AAD binds
//! the record's first LBA, so it cannot be cut without re-encrypting); the cost shows
//! in the write amplification the volume reports (`VolumeStats::gc_bytes_written`).

use std::collections::BTreeMap;

use super::{Effect, Volume, VolumeError};
use crate::map::Location;
use crate::pipeline::RecordHeader;

/// What one garbage collection pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Segments freed.
    pub segments_freed: u64,
    /// Records copied.
    pub records_moved: u64,
    /// Bytes written to the nodes for the copies (rows, including parity).
    pub bytes_written: u64,
}

impl Volume {
    /// Closed segments whose live share (live blocks / blocks ever stored) is below
    /// `threshold`, least live first.
    pub fn gc_candidates(&self, threshold: f64) -> Vec<u64> {
        let mut c: Vec<(u64, u64, u64)> = self
            .segments
            .iter()
            .filter(|(&i, s)| s.closed && Some(i) != self.open_segment)
            .filter(|(_, s)| {
                // Precision loss only matters for segments of more than 2^52 blocks.
                #[allow(clippy::cast_precision_loss)]
                let ratio = if s.stored_blocks == 0 {
                    0.0
                } else {
                    s.live_blocks as f64 / s.stored_blocks as f64
                };
                ratio < threshold
            })
            .map(|(&i, s)| (s.live_blocks, s.stored_blocks, i))
            .collect();
        c.sort_unstable_by(|a, b| (a.0 * b.1.max(1)).cmp(&(b.0 * a.1.max(1))));
        c.into_iter().map(|(_, _, i)| i).collect()
    }

    /// Runs one pass over at most `max_segments` candidates (see [`Volume::gc_candidates`]).
    /// See the module documentation for the steps and why each is safe.
    pub async fn collect_garbage(
        &mut self,
        threshold: f64,
        max_segments: usize,
    ) -> Result<GcReport, VolumeError> {
        let mut victims = self.gc_candidates(threshold);
        victims.truncate(max_segments);
        if victims.is_empty() {
            return Ok(GcReport::default());
        }
        self.checkpoint(Vec::new()).await?;
        let before = self.stats;
        let g = self.geometry;
        // Live records in the victims: (row, strip, offset) -> (location, first LBA).
        let mut live: BTreeMap<(u64, u8, u32), (Location, u64)> = BTreeMap::new();
        self.map.for_each(|lba, loc| {
            if victims.contains(&g.segment_of(loc.row).0) {
                let first = lba - u64::from(loc.index);
                live.entry((loc.row, loc.strip, loc.offset))
                    .or_insert((Location { index: 0, ..loc }, first));
            }
        });
        for (loc, first_lba) in live.into_values() {
            let bytes = self
                .fetch_record(loc, first_lba, true)
                .await?
                .ok_or_else(|| VolumeError::Config("record bytes not kept".into()))?;
            let header = RecordHeader::decode(&bytes)?;
            self.ensure_room(bytes.len() as u64).await?;
            self.scratch.clear();
            self.scratch.extend_from_slice(&bytes);
            self.append_scratch(Effect::Moved {
                from: loc,
                first_lba,
                count: u64::from(header.block_count),
            })?;
        }
        self.seal_open_row().await?;
        // Free only victims nothing points into any more.
        let mut still: Vec<u64> = Vec::new();
        self.map.for_each(|_, loc| {
            let s = g.segment_of(loc.row).0;
            if victims.contains(&s) && !still.contains(&s) {
                still.push(s);
            }
        });
        victims.retain(|v| !still.contains(v));
        // Nothing points into the victims any more: drop them before the image is made,
        // so the image does not name them. If the checkpoint fails they stay queued and
        // the next checkpoint frees them.
        for v in &victims {
            self.segments.remove(v);
            self.pending_free.push(*v);
        }
        self.checkpoint(Vec::new()).await?;
        self.stats.segments_freed += victims.len() as u64;
        Ok(GcReport {
            segments_freed: victims.len() as u64,
            records_moved: self.stats.records_moved - before.records_moved,
            bytes_written: self.stats.gc_bytes_written - before.gc_bytes_written,
        })
    }
}
