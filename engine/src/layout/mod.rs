//! Where records live on the shards: segments of stripe rows, each row written once.
//!
//! Every shard of a volume is cut the same way: a reserved area at the front (for the
//! superblock and the mirrored metadata area of the next layer), then row slots of
//! `strip_size` bytes. Row r occupies slot r on every piece: data strip j on piece j,
//! parity (or copy) p on piece k + p. A segment is `rows_per_segment` consecutive rows,
//! the unit placement and garbage collection will work in.
//!
//! Records are appended to the open row's data strips in order, never straddling two
//! strips, so a small read touches one node. When the row is sealed (full, on flush or
//! FUA, or when the batching window ends) parity is computed over the strips as filled
//! (shorter strips count as zero-padded) and every non-empty piece is written once, in
//! whole shard blocks, and never touched again except to put back the same bytes after
//! a repair. Nothing is ever read-modified-written, so a torn row cannot corrupt data
//! that was acknowledged before it: there is no write hole.
//!
//! What a sealed row needs for reconstruction (how many blocks of each data strip were
//! written) is kept in [`RowTable`], two bytes per data strip per row. Byte layout:
//! docs/format.md, section "Layout".

use crate::pipeline::{ErasureCoder, PipelineError};

/// The layout format version this build writes.
pub const LAYOUT_VERSION: u8 = 1;

/// Largest strip slot (the map packs offsets in 22 bits).
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

/// The fixed shape of a volume's layout on its shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Data strips per row (1 for mirrors).
    pub k: usize,
    /// Parity strips (extra copies, for mirrors) per row.
    pub m: usize,
    /// Bytes of one strip slot; a multiple of `shard_block`.
    pub strip_size: u64,
    /// The shards' block size: the unit every piece is written and read in.
    pub shard_block: u64,
    /// Bytes reserved at the front of every shard (superblock and metadata area).
    pub data_offset: u64,
    /// Row slots that fit on the smallest shard.
    pub rows: u64,
    /// Rows per segment.
    pub rows_per_segment: u64,
}

impl Geometry {
    /// Checks and computes a geometry for shards of at least `capacity` bytes.
    pub fn new(
        k: usize,
        m: usize,
        strip_size: u64,
        shard_block: u64,
        data_offset: u64,
        capacity: u64,
        rows_per_segment: u64,
    ) -> Result<Self, LayoutError> {
        let bad = |s: String| Err(LayoutError::Geometry(s));
        if k == 0 || m == 0 || k + m > 32 {
            return bad(format!("need 1 <= k, 1 <= m, k + m <= 32; got k={k} m={m}"));
        }
        if shard_block == 0 || !shard_block.is_power_of_two() {
            return bad(format!("shard block {shard_block} is not a power of two"));
        }
        if strip_size == 0 || strip_size % shard_block != 0 || strip_size > MAX_STRIP_SIZE {
            return bad(format!(
                "strip size {strip_size} must be whole {shard_block}-byte blocks, at most {MAX_STRIP_SIZE}"
            ));
        }
        if data_offset % shard_block != 0 {
            return bad(format!("data offset {data_offset} is not block aligned"));
        }
        if rows_per_segment == 0 {
            return bad("rows per segment must be at least 1".into());
        }
        let rows = capacity.saturating_sub(data_offset) / strip_size;
        if rows == 0 {
            return bad(format!(
                "shards of {capacity} bytes hold no {strip_size}-byte row after {data_offset} reserved bytes"
            ));
        }
        Ok(Self {
            k,
            m,
            strip_size,
            shard_block,
            data_offset,
            rows: rows.min(crate::map::MAX_ROW + 1),
            rows_per_segment,
        })
    }

    /// Pieces per row.
    pub fn pieces(&self) -> usize {
        self.k + self.m
    }

    /// Byte offset of row `row`'s slot on every piece.
    pub fn row_offset(&self, row: u64) -> Option<u64> {
        row.checked_mul(self.strip_size)?
            .checked_add(self.data_offset)
    }

    /// (segment, row within segment) of a global row.
    pub fn segment_of(&self, row: u64) -> (u64, u64) {
        (row / self.rows_per_segment, row % self.rows_per_segment)
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

/// The row being filled, in memory.
#[derive(Debug)]
pub struct OpenRow {
    /// Global row number of the slot this row will be written to.
    pub row: u64,
    strips: Vec<Vec<u8>>,
    current: usize,
    strip_size: usize,
}

impl OpenRow {
    /// An empty row for slot `row`.
    pub fn new(row: u64, geometry: &Geometry) -> Self {
        let strip_size = usize::try_from(geometry.strip_size).unwrap_or(usize::MAX);
        Self {
            row,
            strips: vec![Vec::new(); geometry.k],
            current: 0,
            strip_size,
        }
    }

    /// Whether no record has been appended.
    pub fn is_empty(&self) -> bool {
        self.strips.iter().all(Vec::is_empty)
    }

    /// Appends a sealed record to the first strip (from the current one on) with room
    /// for all of it. Returns (strip, offset), or `None` when the row has no room left:
    /// the caller seals it and appends to a fresh row.
    pub fn append(&mut self, record: &[u8]) -> Option<(usize, usize)> {
        while self.current < self.strips.len() {
            let strip = &mut self.strips[self.current];
            if strip.len() + record.len() <= self.strip_size {
                let offset = strip.len();
                if strip.capacity() == 0 {
                    strip.reserve_exact(self.strip_size);
                }
                strip.extend_from_slice(record);
                return Some((self.current, offset));
            }
            self.current += 1;
        }
        None
    }

    /// The bytes of a record appended earlier.
    pub fn bytes(&self, strip: usize, offset: usize, len: usize) -> Option<&[u8]> {
        self.strips
            .get(strip)?
            .get(offset..offset.checked_add(len)?)
    }

    /// Computes parity over the strips as filled and returns what to write: one
    /// (piece, bytes) per non-empty piece, each padded to whole shard blocks, and the
    /// row's entry for the [`RowTable`].
    pub fn seal(
        &self,
        geometry: &Geometry,
        coder: &dyn ErasureCoder,
    ) -> Result<SealedRow, LayoutError> {
        let block = usize::try_from(geometry.shard_block).unwrap_or(usize::MAX);
        let padded = |len: usize| len.div_ceil(block) * block;
        let parity_len = self
            .strips
            .iter()
            .map(|s| padded(s.len()))
            .max()
            .unwrap_or(0);
        let mut parity = vec![vec![0u8; parity_len]; geometry.m];
        {
            let data: Vec<&[u8]> = self.strips.iter().map(Vec::as_slice).collect();
            let mut refs: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
            coder.encode(&data, &mut refs)?;
        }
        let mut pieces = Vec::with_capacity(geometry.pieces());
        let mut blocks = Vec::with_capacity(geometry.k);
        for (j, strip) in self.strips.iter().enumerate() {
            let len = padded(strip.len());
            blocks.push(
                u16::try_from(len / block).map_err(|_| {
                    LayoutError::Geometry("strip has more than 65535 blocks".into())
                })?,
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
        })
    }
}

/// What sealing a row produced.
#[derive(Debug)]
pub struct SealedRow {
    /// (piece, bytes) for every piece to write, padded to whole shard blocks.
    pub pieces: Vec<(usize, Vec<u8>)>,
    /// Shard blocks per data strip, for the [`RowTable`].
    pub strip_blocks: Vec<u16>,
}

/// Per sealed row: how many shard blocks each data strip holds (0 = not written, reads
/// as zeroes). Parity strips hold as many as the longest data strip.
#[derive(Debug, Default)]
pub struct RowTable {
    k: usize,
    blocks: Vec<u16>,
}

impl RowTable {
    /// An empty table for rows of `k` data strips.
    pub fn new(k: usize) -> Self {
        Self {
            k,
            blocks: Vec::new(),
        }
    }

    /// Records row `row`'s strip lengths (rows are sealed in order; a skipped slot, such
    /// as one whose write failed, reads as empty).
    pub fn set(&mut self, row: u64, strip_blocks: &[u16]) {
        let Ok(at) = usize::try_from(row) else {
            return;
        };
        let start = at * self.k;
        if self.blocks.len() < start + self.k {
            self.blocks.resize(start + self.k, 0);
        }
        self.blocks[start..start + self.k].copy_from_slice(&strip_blocks[..self.k]);
    }

    /// Blocks written to piece `piece` of row `row` (parity pieces: the longest strip).
    pub fn piece_blocks(&self, row: u64, piece: usize) -> u64 {
        let Ok(at) = usize::try_from(row) else {
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
        self.blocks.capacity() * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::coder_for;

    fn geo(k: usize, m: usize) -> Geometry {
        Geometry::new(k, m, 8192, 512, 4096, 1 << 20, 4).expect("geometry")
    }

    #[test]
    fn geometry_checks() {
        assert!(Geometry::new(0, 1, 8192, 512, 0, 1 << 20, 1).is_err());
        assert!(Geometry::new(2, 1, 8000, 512, 0, 1 << 20, 1).is_err());
        assert!(Geometry::new(2, 1, 8192, 500, 0, 1 << 20, 1).is_err());
        assert!(Geometry::new(2, 1, 8192, 512, 100, 1 << 20, 1).is_err());
        assert!(Geometry::new(2, 1, 8192, 512, 0, 4096, 1).is_err());
        let g = geo(2, 1);
        assert_eq!(g.rows, (1_048_576 - 4096) / 8192);
        assert_eq!(g.row_offset(3), Some(4096 + 3 * 8192));
        assert_eq!(g.segment_of(9), (2, 1));
        assert_eq!(g.round_up(513), 1024);
    }

    #[test]
    fn records_fill_strips_in_order_and_never_straddle() {
        let g = geo(2, 1);
        let mut row = OpenRow::new(0, &g);
        assert_eq!(row.append(&[1u8; 5000]), Some((0, 0)));
        // Does not fit the rest of strip 0: goes whole to strip 1.
        assert_eq!(row.append(&[2u8; 4000]), Some((1, 0)));
        // Strip 0 is closed once passed, even though 3192 bytes are left there.
        assert_eq!(row.append(&[3u8; 100]), Some((1, 4000)));
        assert_eq!(row.append(&[4u8; 8192]), None);
        assert_eq!(row.bytes(1, 4000, 100), Some(&[3u8; 100][..]));
        let coder = coder_for(2, 1).expect("coder");
        let SealedRow {
            pieces,
            strip_blocks: blocks,
        } = row.seal(&g, coder.as_ref()).expect("seal");
        assert_eq!(blocks, vec![10, 9]);
        let lens: Vec<(usize, usize)> = pieces.iter().map(|(p, b)| (*p, b.len())).collect();
        assert_eq!(lens, vec![(0, 5120), (1, 4608), (2, 5120)]);
        // XOR parity for k=2, m=1 in the Cauchy code is not plain XOR, but any one
        // missing strip must come back from the other two.
        let strips: Vec<Option<&[u8]>> = vec![None, Some(&pieces[1].1), Some(&pieces[2].1)];
        let mut out = vec![0u8; 5120];
        coder
            .reconstruct(&strips, &mut [(0, &mut out[..])])
            .expect("rebuild");
        assert_eq!(out, pieces[0].1);
    }

    #[test]
    fn lone_record_writes_one_data_strip_and_parity() {
        let g = geo(4, 2);
        let mut row = OpenRow::new(7, &g);
        row.append(&[9u8; 4160]).expect("fits");
        let coder = coder_for(4, 2).expect("coder");
        let SealedRow {
            pieces,
            strip_blocks: blocks,
        } = row.seal(&g, coder.as_ref()).expect("seal");
        assert_eq!(blocks, vec![9, 0, 0, 0]);
        let ids: Vec<usize> = pieces.iter().map(|(p, _)| *p).collect();
        assert_eq!(ids, vec![0, 4, 5]);
        let mut t = RowTable::new(4);
        t.set(7, &blocks);
        assert_eq!(t.piece_blocks(7, 0), 9);
        assert_eq!(t.piece_blocks(7, 1), 0);
        assert_eq!(t.piece_blocks(7, 5), 9);
        assert_eq!(t.piece_blocks(3, 0), 0);
        assert_eq!(t.piece_blocks(99, 0), 0);
    }
}
