//! Where records live on the nodes: segments of stripe rows, each row written once.
//!
//! A segment is one chunk on each of k + m nodes (chosen per segment by `placement`,
//! recorded by the pool before the first row is written). Inside a segment, rows are
//! packed one after another at the same offset on every piece: row r starts where row
//! r - 1 ended, and is as long as its longest data strip (parity strips have exactly
//! that length). Packing instead of fixed row slots means a row sealed early (on flush,
//! FUA or the end of a batching window) wastes no space, so sync writes do not fill the
//! nodes with padding that only garbage collection could win back.
//!
//! Records are appended to the shortest data strip of the open row that has room, never
//! straddling two strips (a small read touches one node). Spreading records over the
//! strips keeps the strips of a row the same length, so a row of n records costs about
//! n * (k + m) / k records of writes whatever n is: a lone record costs one strip plus
//! the parity (like a mirror), a batch of k records or more costs the ideal (k + m)/k.
//!
//! When the row is sealed, parity is computed over the strips as filled (shorter strips
//! count as zero-padded) and every non-empty piece is written once, in whole shard
//! blocks, and never touched again except to put back the same bytes after a repair.
//! Nothing is ever read-modified-written, so a torn row cannot damage data acknowledged
//! before it: there is no write hole.
//!
//! What a sealed row needs for reconstruction (where it starts and how many blocks each
//! data strip holds) is kept per segment in [`SegmentRows`]; it is part of the volume's
//! checkpoint and is rebuilt from the record headers when the tail of the log is
//! replayed. Byte layout: docs/format.md, section "Layout".

use crate::pipeline::{ErasureCoder, PipelineError};

/// The layout format version this build writes.
pub const LAYOUT_VERSION: u8 = 2;

/// Largest strip (the map packs offsets in 22 bits).
pub const MAX_STRIP_SIZE: u64 = 4 << 20;

/// Errors of the layout layer: geometry that cannot work.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The parameters do not make a usable layout.
    #[error("bad layout geometry: {0}")]
    Geometry(String),
    /// The coder refused the row (a bug: shapes are computed here).
    #[error("erasure coding the row: {0}")]
    Coding(#[from] PipelineError),
}

/// The fixed shape of a volume's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Data strips per row (1 for mirrors).
    pub k: usize,
    /// Parity strips (extra copies, for mirrors) per row; 0 for a single copy.
    pub m: usize,
    /// Most bytes of one data strip in one row; a multiple of `shard_block`.
    pub strip_size: u64,
    /// The shards' block size: the unit every piece is written and read in.
    pub shard_block: u64,
    /// Bytes of one piece of a segment (one chunk on its node).
    pub chunk_size: u64,
    /// Row numbers reserved per segment (a row takes at least one block, so this is
    /// `chunk_size / shard_block`); global row = segment x this + row in segment.
    pub rows_per_segment: u64,
}

impl Geometry {
    /// Checks and computes a geometry.
    pub fn new(
        k: usize,
        m: usize,
        strip_size: u64,
        shard_block: u64,
        chunk_size: u64,
    ) -> Result<Self, LayoutError> {
        let bad = |s: String| Err(LayoutError::Geometry(s));
        if k == 0 || k + m > 32 || (k > 1 && m == 0) {
            return bad(format!(
                "need 1 <= k, k + m <= 32, and parity for k > 1; got k={k} m={m}"
            ));
        }
        if shard_block == 0 || !shard_block.is_power_of_two() || shard_block > 65536 {
            return bad(format!(
                "shard block {shard_block} is not a power of two up to 64 KiB"
            ));
        }
        if strip_size == 0 || strip_size % shard_block != 0 || strip_size > MAX_STRIP_SIZE {
            return bad(format!(
                "strip size {strip_size} must be whole {shard_block}-byte blocks, at most {MAX_STRIP_SIZE}"
            ));
        }
        if chunk_size < strip_size || chunk_size % shard_block != 0 {
            return bad(format!(
                "chunk size {chunk_size} must be whole {shard_block}-byte blocks and hold one {strip_size}-byte strip"
            ));
        }
        let rows_per_segment = chunk_size / shard_block;
        if u32::try_from(rows_per_segment).is_err() {
            return bad(format!("chunk size {chunk_size} holds too many blocks"));
        }
        Ok(Self {
            k,
            m,
            strip_size,
            shard_block,
            chunk_size,
            rows_per_segment,
        })
    }

    /// Pieces per row.
    pub fn pieces(&self) -> usize {
        self.k + self.m
    }

    /// (segment, row within segment) of a global row.
    pub fn segment_of(&self, row: u64) -> (u64, u64) {
        (row / self.rows_per_segment, row % self.rows_per_segment)
    }

    /// Global row number of row `index` of `segment`, if it fits the map's row field.
    pub fn row_number(&self, segment: u64, index: u64) -> Option<u64> {
        let row = segment
            .checked_mul(self.rows_per_segment)?
            .checked_add(index)?;
        (row <= crate::map::MAX_ROW).then_some(row)
    }

    /// Most segments a volume can have (row numbers are 32 bits in the map).
    pub fn max_segments(&self) -> u64 {
        (crate::map::MAX_ROW + 1) / self.rows_per_segment
    }

    /// Blocks of a chunk.
    pub fn chunk_blocks(&self) -> u64 {
        self.chunk_size / self.shard_block
    }

    /// `len` rounded up to whole shard blocks.
    pub fn round_up(&self, len: u64) -> u64 {
        len.div_ceil(self.shard_block) * self.shard_block
    }

    /// `len` rounded down to whole shard blocks.
    pub fn round_down(&self, len: u64) -> u64 {
        len - len % self.shard_block
    }
}

/// A record appended to the open row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// Data strip it went to.
    pub strip: usize,
    /// Byte offset within the strip.
    pub offset: usize,
    /// Record length.
    pub len: usize,
}

/// The row being filled, in memory.
#[derive(Debug)]
pub struct OpenRow {
    /// Segment the row will be written to.
    pub segment: u64,
    /// Row index within the segment.
    pub index: u64,
    /// First shard block of the row within the chunk.
    pub start_block: u64,
    strips: Vec<Vec<u8>>,
    capacity: usize,
    records: Vec<Placed>,
}

impl OpenRow {
    /// An empty row at `start_block` of `segment`, as row `index`; each strip may hold
    /// `capacity` bytes (the strip size, or less at the end of a chunk).
    pub fn new(segment: u64, index: u64, start_block: u64, capacity: u64, k: usize) -> Self {
        Self {
            segment,
            index,
            start_block,
            strips: vec![Vec::new(); k],
            capacity: usize::try_from(capacity).unwrap_or(0),
            records: Vec::new(),
        }
    }

    /// Whether no record has been appended.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Whether some strip can still take a record of `len` bytes.
    pub fn has_room(&self, len: u64) -> bool {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.strips
            .iter()
            .any(|s| s.len().saturating_add(len) <= self.capacity)
    }

    /// Records appended, in order.
    pub fn records(&self) -> &[Placed] {
        &self.records
    }

    /// Appends a sealed record to the shortest strip with room for all of it. Returns
    /// where it went, or `None` when no strip has room: the caller seals the row and
    /// appends to a fresh one.
    pub fn append(&mut self, record: &[u8]) -> Option<Placed> {
        let strip = self
            .strips
            .iter()
            .enumerate()
            .filter(|(_, s)| s.len() + record.len() <= self.capacity)
            .min_by_key(|(_, s)| s.len())
            .map(|(j, _)| j)?;
        let bytes = &mut self.strips[strip];
        let offset = bytes.len();
        if bytes.capacity() == 0 {
            bytes.reserve(self.capacity.min(256 * 1024));
        }
        bytes.extend_from_slice(record);
        let placed = Placed {
            strip,
            offset,
            len: record.len(),
        };
        self.records.push(placed);
        Some(placed)
    }

    /// The bytes of a record appended earlier.
    pub fn bytes(&self, strip: usize, offset: usize, len: usize) -> Option<&[u8]> {
        self.strips
            .get(strip)?
            .get(offset..offset.checked_add(len)?)
    }

    /// Computes parity over the strips as filled and returns what to write: one
    /// (piece, bytes) per non-empty piece, each padded to whole shard blocks, and the
    /// row's entry for [`SegmentRows`].
    pub fn seal(
        &self,
        geometry: &Geometry,
        coder: Option<&dyn ErasureCoder>,
    ) -> Result<SealedRow, LayoutError> {
        seal_strips(&self.strips, geometry, coder)
    }
}

/// Computes parity over `strips` (data strips as filled) and pads every piece to whole
/// shard blocks. Also used by log replay to check that a row found on the nodes is
/// complete (its parity matches its data).
pub fn seal_strips(
    strips: &[Vec<u8>],
    geometry: &Geometry,
    coder: Option<&dyn ErasureCoder>,
) -> Result<SealedRow, LayoutError> {
    let block = usize::try_from(geometry.shard_block).unwrap_or(usize::MAX);
    let padded = |len: usize| len.div_ceil(block) * block;
    let parity_len = strips.iter().map(|s| padded(s.len())).max().unwrap_or(0);
    let mut parity = vec![vec![0u8; parity_len]; geometry.m];
    if geometry.m > 0 {
        let coder = coder.ok_or_else(|| LayoutError::Geometry("parity without a coder".into()))?;
        let data: Vec<&[u8]> = strips.iter().map(Vec::as_slice).collect();
        let mut refs: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
        coder.encode(&data, &mut refs)?;
    }
    let mut pieces = Vec::with_capacity(geometry.pieces());
    let mut blocks = Vec::with_capacity(geometry.k);
    for (j, strip) in strips.iter().enumerate() {
        let len = padded(strip.len());
        blocks.push(
            u16::try_from(len / block)
                .map_err(|_| LayoutError::Geometry("strip has more than 65535 blocks".into()))?,
        );
        if len > 0 {
            let mut bytes = strip.clone();
            bytes.resize(len, 0);
            pieces.push((j, bytes));
        }
    }
    if parity_len > 0 {
        for (p, bytes) in parity.into_iter().enumerate() {
            pieces.push((geometry.k + p, bytes));
        }
    }
    Ok(SealedRow {
        pieces,
        strip_blocks: blocks,
        row_blocks: u64::try_from(parity_len / block).unwrap_or(0),
    })
}

/// What sealing a row produced.
#[derive(Debug)]
pub struct SealedRow {
    /// (piece, bytes) for every piece to write, padded to whole shard blocks.
    pub pieces: Vec<(usize, Vec<u8>)>,
    /// Shard blocks per data strip, for [`SegmentRows`].
    pub strip_blocks: Vec<u16>,
    /// Shard blocks the row occupies on every piece (its longest strip).
    pub row_blocks: u64,
}

/// The sealed rows of one segment: where each starts and how many shard blocks each of
/// its data strips holds (0 = not written, reads as zeroes). Parity pieces hold as many
/// as the longest data strip. Six bytes plus two per data strip per row.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SegmentRows {
    k: usize,
    starts: Vec<u32>,
    blocks: Vec<u16>,
}

impl SegmentRows {
    /// An empty table for rows of `k` data strips.
    pub fn new(k: usize) -> Self {
        Self {
            k,
            starts: Vec::new(),
            blocks: Vec::new(),
        }
    }

    /// Rebuilds a table from its parts (a checkpoint); `None` if they do not agree.
    pub fn from_parts(k: usize, starts: Vec<u32>, blocks: Vec<u16>) -> Option<Self> {
        (k > 0 && blocks.len() == starts.len().checked_mul(k)?).then_some(Self {
            k,
            starts,
            blocks,
        })
    }

    /// The parts, for a checkpoint.
    pub fn parts(&self) -> (&[u32], &[u16]) {
        (&self.starts, &self.blocks)
    }

    /// Rows recorded.
    pub fn len(&self) -> u64 {
        self.starts.len() as u64
    }

    /// Whether no row is recorded.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Records the next row (index = `len()`): its first block and strip lengths.
    pub fn push(&mut self, start_block: u64, strip_blocks: &[u16]) -> Result<(), LayoutError> {
        let start = u32::try_from(start_block)
            .map_err(|_| LayoutError::Geometry("row start beyond 2^32 blocks".into()))?;
        if strip_blocks.len() != self.k {
            return Err(LayoutError::Geometry(
                "row with the wrong strip count".into(),
            ));
        }
        self.starts.push(start);
        self.blocks.extend_from_slice(strip_blocks);
        Ok(())
    }

    /// First shard block of row `index` within the chunk.
    pub fn start_block(&self, index: u64) -> Option<u64> {
        let at = usize::try_from(index).ok()?;
        self.starts.get(at).map(|&s| u64::from(s))
    }

    /// Blocks written to piece `piece` of row `index` (parity pieces: the longest strip).
    pub fn piece_blocks(&self, index: u64, piece: usize) -> u64 {
        let Ok(at) = usize::try_from(index) else {
            return 0;
        };
        let Some(strips) = self.blocks.get(at * self.k..at * self.k + self.k) else {
            return 0;
        };
        let n = if piece < self.k {
            strips[piece]
        } else {
            strips.iter().copied().max().unwrap_or(0)
        };
        u64::from(n)
    }

    /// Heap bytes used.
    pub fn memory_bytes(&self) -> usize {
        self.starts.capacity() * 4 + self.blocks.capacity() * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::coder_for;

    fn geo(k: usize, m: usize) -> Geometry {
        Geometry::new(k, m, 8192, 512, 1 << 20).expect("geometry")
    }

    #[test]
    fn geometry_checks() {
        assert!(Geometry::new(0, 1, 8192, 512, 1 << 20).is_err());
        assert!(Geometry::new(2, 0, 8192, 512, 1 << 20).is_err());
        assert!(Geometry::new(1, 0, 8192, 512, 1 << 20).is_ok());
        assert!(Geometry::new(2, 1, 8000, 512, 1 << 20).is_err());
        assert!(Geometry::new(2, 1, 8192, 500, 1 << 20).is_err());
        assert!(Geometry::new(2, 1, 8192, 512, 4096).is_err());
        let g = geo(2, 1);
        assert_eq!(g.rows_per_segment, 2048);
        assert_eq!(g.segment_of(2049), (1, 1));
        assert_eq!(g.row_number(1, 1), Some(2049));
        assert_eq!(g.row_number(u64::MAX, 1), None);
        assert_eq!(g.round_up(513), 1024);
    }

    #[test]
    fn records_go_to_the_shortest_strip_and_never_straddle() {
        let g = geo(2, 1);
        let mut row = OpenRow::new(0, 0, 0, g.strip_size, g.k);
        let p = |strip, offset, len| Placed { strip, offset, len };
        assert_eq!(row.append(&[1u8; 5000]), Some(p(0, 0, 5000)));
        assert_eq!(row.append(&[2u8; 4000]), Some(p(1, 0, 4000)));
        // Strip 1 is the shorter one.
        assert_eq!(row.append(&[3u8; 100]), Some(p(1, 4000, 100)));
        // 4100 bytes fit neither 5000 + 4100 nor 4100 + 4100 in 8192.
        assert!(!row.has_room(4100));
        assert_eq!(row.append(&[4u8; 4100]), None);
        assert!(row.has_room(4092));
        // Strip 1 is still the shorter one and has room for 3000.
        assert_eq!(row.append(&[5u8; 3000]), Some(p(1, 4100, 3000)));
        assert_eq!(row.bytes(1, 4000, 100), Some(&[3u8; 100][..]));
        let coder = coder_for(2, 1).expect("coder");
        let sealed = row.seal(&g, Some(coder.as_ref())).expect("seal");
        assert_eq!(sealed.strip_blocks, vec![10, 14]);
        assert_eq!(sealed.row_blocks, 14);
        let lens: Vec<(usize, usize)> = sealed.pieces.iter().map(|(p, b)| (*p, b.len())).collect();
        assert_eq!(lens, vec![(0, 5120), (1, 7168), (2, 7168)]);
        // Any one missing strip comes back from the other two (padded to the row).
        let pieces = &sealed.pieces;
        let strips: Vec<Option<&[u8]>> = vec![None, Some(&pieces[1].1), Some(&pieces[2].1)];
        let mut out = vec![0u8; 7168];
        coder
            .reconstruct(&strips, &mut [(0, &mut out[..])])
            .expect("rebuild");
        assert_eq!(out[..5120], pieces[0].1[..]);
        assert!(out[5120..].iter().all(|b| *b == 0));
    }

    #[test]
    fn k_records_fill_k_strips_evenly() {
        let g = geo(4, 2);
        let mut row = OpenRow::new(0, 0, 0, g.strip_size, g.k);
        for _ in 0..8 {
            row.append(&[7u8; 1000]).expect("fits");
        }
        let coder = coder_for(4, 2).expect("coder");
        let sealed = row.seal(&g, Some(coder.as_ref())).expect("seal");
        assert_eq!(sealed.strip_blocks, vec![4, 4, 4, 4]);
        let written: usize = sealed.pieces.iter().map(|(_, b)| b.len()).sum();
        assert_eq!(written, 6 * 2048);
    }

    #[test]
    fn lone_record_writes_one_data_strip_and_parity() {
        let g = geo(4, 2);
        let mut row = OpenRow::new(3, 7, 100, g.strip_size, g.k);
        row.append(&[9u8; 4160]).expect("fits");
        let coder = coder_for(4, 2).expect("coder");
        let sealed = row.seal(&g, Some(coder.as_ref())).expect("seal");
        assert_eq!(sealed.strip_blocks, vec![9, 0, 0, 0]);
        let ids: Vec<usize> = sealed.pieces.iter().map(|(p, _)| *p).collect();
        assert_eq!(ids, vec![0, 4, 5]);
        let mut t = SegmentRows::new(4);
        t.push(0, &[1, 1, 1, 1]).expect("push");
        t.push(1, &sealed.strip_blocks).expect("push");
        assert_eq!(t.len(), 2);
        assert_eq!(t.start_block(1), Some(1));
        assert_eq!(t.piece_blocks(1, 0), 9);
        assert_eq!(t.piece_blocks(1, 1), 0);
        assert_eq!(t.piece_blocks(1, 5), 9);
        assert_eq!(t.piece_blocks(99, 0), 0);
        let (s, b) = t.parts();
        assert_eq!(
            SegmentRows::from_parts(4, s.to_vec(), b.to_vec()),
            Some(t.clone())
        );
        assert_eq!(
            SegmentRows::from_parts(4, s.to_vec(), b[1..].to_vec()),
            None
        );
    }

    #[test]
    fn single_copy_rows_have_no_parity() {
        let g = Geometry::new(1, 0, 8192, 512, 1 << 20).expect("geometry");
        let mut row = OpenRow::new(0, 0, 0, g.strip_size, g.k);
        row.append(&[1u8; 600]).expect("fits");
        let sealed = row.seal(&g, None).expect("seal");
        assert_eq!(sealed.pieces.len(), 1);
        assert_eq!(sealed.row_blocks, 2);
    }
}
