//! The volume map: which record holds each logical block.
//!
//! The map is the one structure whose size grows with the data written, so it is built
//! for a memory bound (32 bytes per written 4 KiB block, checked by
//! `engine/tests/volume_map_memory.rs`) rather than for generality:
//! - a location is packed into 16 bytes ([`Location::pack`]); the row number is global
//!   (segment x rows-per-segment + row), so the segment costs no bits of its own;
//! - LBAs are grouped in pages of 256 blocks. A page starts sparse (sorted one-byte keys
//!   plus 16-byte entries, 17 bytes a block) and turns dense (256 entries, 4 KiB) once
//!   that is smaller, so both scattered and sequential writes stay under the bound.
//!
//! Unmapped blocks (never written, deallocated or zeroed) read as zeroes, which is what
//! the front-ends advertise for deallocated blocks. The map lives in memory; it is made
//! durable by checkpoints ([`BlockMap::export`], written by the pool to the nodes) plus
//! replay of the record headers written after the checkpoint.

use std::collections::BTreeMap;
use std::mem::size_of;

/// Blocks per map page.
pub const PAGE_BLOCKS: u64 = 256;
/// A page turns dense when its sparse form would hold this many entries.
const DENSE_AT: usize = 240;

/// Largest global row number a location can hold.
pub const MAX_ROW: u64 = (1 << ROW_BITS) - 1;
/// Largest generation a location can hold; the volume refuses writes past it.
pub const MAX_GENERATION: u64 = (1 << GEN_BITS) - 1;
/// Largest byte offset of a record within its strip.
pub const MAX_OFFSET: u64 = (1 << OFFSET_BITS) - 1;
/// Largest record length.
pub const MAX_LEN: u64 = (1 << LEN_BITS) - 1;

const ROW_BITS: u32 = 32;
const STRIP_BITS: u32 = 5;
const OFFSET_BITS: u32 = 22;
const LEN_BITS: u32 = 21;
const INDEX_BITS: u32 = 8;
const GEN_BITS: u32 = 40;
const _: () =
    assert!(ROW_BITS + STRIP_BITS + OFFSET_BITS + LEN_BITS + INDEX_BITS + GEN_BITS == 128);

/// Where one logical block lives: inside which record, and which block of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Global row number (segment x rows per segment + row in segment).
    pub row: u64,
    /// Data strip (piece) within the row.
    pub strip: u8,
    /// Byte offset of the record within the strip.
    pub offset: u32,
    /// Record length in bytes (header plus payload); never 0.
    pub len: u32,
    /// Which block of the record this LBA is (record first LBA = LBA - index).
    pub index: u8,
    /// Generation of the write that stored the record.
    pub generation: u64,
}

fn field(value: u128, shift: u32, bits: u32) -> u128 {
    (value >> shift) & ((1u128 << bits) - 1)
}

impl Location {
    /// Packs into 16 bytes, or `None` if a field does not fit its bits (the volume
    /// checks limits up front, so this only guards against bugs).
    pub fn pack(&self) -> Option<u128> {
        let fits = |v: u64, bits: u32| v < (1u64 << bits);
        if self.len == 0
            || !fits(self.row, ROW_BITS)
            || !fits(u64::from(self.strip), STRIP_BITS)
            || !fits(u64::from(self.offset), OFFSET_BITS)
            || !fits(u64::from(self.len), LEN_BITS)
            || !fits(self.generation, GEN_BITS)
        {
            return None;
        }
        let mut v = u128::from(self.row);
        let mut shift = ROW_BITS;
        v |= u128::from(self.strip) << shift;
        shift += STRIP_BITS;
        v |= u128::from(self.offset) << shift;
        shift += OFFSET_BITS;
        v |= u128::from(self.len) << shift;
        shift += LEN_BITS;
        v |= u128::from(self.index) << shift;
        shift += INDEX_BITS;
        v |= u128::from(self.generation) << shift;
        Some(v)
    }

    /// Inverse of [`Location::pack`]; `None` for the empty value 0.
    pub fn unpack(v: u128) -> Option<Self> {
        let mut shift = 0;
        let mut take = |bits: u32| {
            let f = field(v, shift, bits);
            shift += bits;
            f
        };
        let row = take(ROW_BITS);
        let strip = take(STRIP_BITS);
        let offset = take(OFFSET_BITS);
        let len = take(LEN_BITS);
        let index = take(INDEX_BITS);
        let generation = take(GEN_BITS);
        if len == 0 {
            return None;
        }
        Some(Self {
            row: u64::try_from(row).ok()?,
            strip: u8::try_from(strip).ok()?,
            offset: u32::try_from(offset).ok()?,
            len: u32::try_from(len).ok()?,
            index: u8::try_from(index).ok()?,
            generation: u64::try_from(generation).ok()?,
        })
    }

    /// Whether two blocks' locations name the same stored record.
    pub fn same_record(&self, other: &Location) -> bool {
        self.row == other.row
            && self.strip == other.strip
            && self.offset == other.offset
            && self.generation == other.generation
    }
}

#[derive(Debug)]
enum Page {
    /// Sorted in-page indices and their packed locations.
    Sparse { keys: Vec<u8>, values: Vec<u128> },
    /// One packed location (0 = unmapped) per block, and how many are mapped.
    Dense { values: Box<[u128]>, mapped: usize },
}

impl Page {
    fn get(&self, idx: u8) -> u128 {
        match self {
            Page::Sparse { keys, values } => keys
                .binary_search(&idx)
                .map_or(0, |at| values.get(at).copied().unwrap_or(0)),
            Page::Dense { values, .. } => values.get(usize::from(idx)).copied().unwrap_or(0),
        }
    }

    /// Sets (value != 0) or clears (value == 0) one block.
    fn set(&mut self, idx: u8, value: u128) {
        match self {
            Page::Sparse { keys, values } => match keys.binary_search(&idx) {
                Ok(at) if value == 0 => {
                    keys.remove(at);
                    values.remove(at);
                }
                Ok(at) => values[at] = value,
                Err(_) if value == 0 => {}
                Err(at) => {
                    if keys.len() + 1 >= DENSE_AT {
                        let mut dense = vec![0u128; 256].into_boxed_slice();
                        for (k, v) in keys.iter().zip(values.iter()) {
                            dense[usize::from(*k)] = *v;
                        }
                        dense[usize::from(idx)] = value;
                        *self = Page::Dense {
                            values: dense,
                            mapped: keys.len() + 1,
                        };
                        return;
                    }
                    // Grow by a quarter, not double: the slack counts against the bound.
                    if keys.len() == keys.capacity() {
                        let extra = (keys.len() / 4).max(2);
                        keys.reserve_exact(extra);
                        values.reserve_exact(extra);
                    }
                    keys.insert(at, idx);
                    values.insert(at, value);
                }
            },
            Page::Dense { values, mapped } => {
                let slot = &mut values[usize::from(idx)];
                match (*slot != 0, value != 0) {
                    (false, true) => *mapped += 1,
                    (true, false) => *mapped -= 1,
                    _ => {}
                }
                *slot = value;
            }
        }
    }

    fn mapped(&self) -> usize {
        match self {
            Page::Sparse { keys, .. } => keys.len(),
            Page::Dense { mapped, .. } => *mapped,
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Page::Sparse { keys, values } => {
                keys.capacity() + values.capacity() * size_of::<u128>()
            }
            Page::Dense { values, .. } => values.len() * size_of::<u128>(),
        }
    }
}

/// LBA -> [`Location`] for one volume.
#[derive(Debug, Default)]
pub struct BlockMap {
    pages: BTreeMap<u64, Page>,
    mapped: u64,
}

fn split(lba: u64) -> (u64, u8) {
    let idx = u8::try_from(lba % PAGE_BLOCKS).unwrap_or(0);
    (lba / PAGE_BLOCKS, idx)
}

impl BlockMap {
    /// An empty map: every block unmapped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where `lba` lives, or `None` if it reads as zeroes.
    pub fn get(&self, lba: u64) -> Option<Location> {
        let (page, idx) = split(lba);
        self.pages
            .get(&page)
            .and_then(|p| Location::unpack(p.get(idx)))
    }

    fn put(&mut self, lba: u64, value: u128) {
        let (page_no, idx) = split(lba);
        let before;
        let after;
        if let Some(page) = self.pages.get_mut(&page_no) {
            before = page.mapped();
            page.set(idx, value);
            after = page.mapped();
            if after == 0 {
                self.pages.remove(&page_no);
            }
        } else {
            if value == 0 {
                return;
            }
            let mut page = Page::Sparse {
                keys: Vec::with_capacity(2),
                values: Vec::with_capacity(2),
            };
            page.set(idx, value);
            self.pages.insert(page_no, page);
            before = 0;
            after = 1;
        }
        // `after` and `before` differ by at most one.
        self.mapped = (self.mapped + after as u64).saturating_sub(before as u64);
    }

    /// Maps `lba` to `loc`. Returns false (and changes nothing) if `loc` does not fit
    /// the packed form.
    pub fn set(&mut self, lba: u64, loc: Location) -> bool {
        match loc.pack() {
            Some(v) => {
                self.put(lba, v);
                true
            }
            None => false,
        }
    }

    /// Unmaps `count` blocks from `lba` (deallocate, write zeroes).
    pub fn clear(&mut self, lba: u64, count: u64) {
        for i in 0..count {
            match lba.checked_add(i) {
                Some(l) => self.put(l, 0),
                None => break,
            }
        }
    }

    /// Calls `f(lba, location)` for every mapped block, in LBA order.
    pub fn for_each(&self, mut f: impl FnMut(u64, Location)) {
        for (&page_no, page) in &self.pages {
            let base = page_no * PAGE_BLOCKS;
            match page {
                Page::Sparse { keys, values } => {
                    for (k, v) in keys.iter().zip(values.iter()) {
                        if let Some(loc) = Location::unpack(*v) {
                            f(base + u64::from(*k), loc);
                        }
                    }
                }
                Page::Dense { values, .. } => {
                    for (i, v) in values.iter().enumerate() {
                        if let Some(loc) = Location::unpack(*v) {
                            f(base + i as u64, loc);
                        }
                    }
                }
            }
        }
    }

    /// The map as (page number, in-page indices, packed locations) triples, for a
    /// checkpoint.
    pub fn export(&self) -> Vec<(u64, Vec<u8>, Vec<u128>)> {
        self.pages
            .iter()
            .map(|(&no, page)| match page {
                Page::Sparse { keys, values } => (no, keys.clone(), values.clone()),
                Page::Dense { values, .. } => {
                    let mut keys = Vec::new();
                    let mut vals = Vec::new();
                    for (i, v) in values.iter().enumerate() {
                        if *v != 0 {
                            keys.push(u8::try_from(i).unwrap_or(u8::MAX));
                            vals.push(*v);
                        }
                    }
                    (no, keys, vals)
                }
            })
            .collect()
    }

    /// Rebuilds a map from [`BlockMap::export`]'s output; `None` if it is inconsistent
    /// (lengths differ, an index repeats or a location does not unpack).
    pub fn import(pages: &[(u64, Vec<u8>, Vec<u128>)]) -> Option<Self> {
        let mut map = Self::new();
        for (no, keys, values) in pages {
            if keys.len() != values.len() {
                return None;
            }
            let base = no.checked_mul(PAGE_BLOCKS)?;
            let mut last: Option<u8> = None;
            for (k, v) in keys.iter().zip(values.iter()) {
                if last.is_some_and(|l| l >= *k) || Location::unpack(*v).is_none() {
                    return None;
                }
                last = Some(*k);
                map.put(base.checked_add(u64::from(*k))?, *v);
            }
        }
        Some(map)
    }

    /// Number of mapped blocks.
    pub fn mapped_blocks(&self) -> u64 {
        self.mapped
    }

    /// Heap bytes the map uses: page contents plus an estimate of the page index (the
    /// B-tree's nodes hold at most 11 entries and are at least half full, so each page
    /// costs at most twice its key and value).
    pub fn memory_bytes(&self) -> usize {
        let index = self.pages.len() * 2 * (size_of::<u64>() + size_of::<Page>());
        index + self.pages.values().map(Page::heap_bytes).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(row: u64, gen: u64) -> Location {
        Location {
            row,
            strip: 3,
            offset: 4096 * 7 + 48,
            len: 4160,
            index: 2,
            generation: gen,
        }
    }

    #[test]
    fn pack_round_trips_extremes() {
        let max = Location {
            row: MAX_ROW,
            strip: 31,
            offset: u32::try_from(MAX_OFFSET).expect("fits"),
            len: u32::try_from(MAX_LEN).expect("fits"),
            index: 255,
            generation: MAX_GENERATION,
        };
        assert_eq!(Location::unpack(max.pack().expect("fits")), Some(max));
        let l = loc(5, 9);
        assert_eq!(Location::unpack(l.pack().expect("fits")), Some(l));
        assert!(Location { len: 0, ..l }.pack().is_none());
        assert!(Location {
            generation: MAX_GENERATION + 1,
            ..l
        }
        .pack()
        .is_none());
        assert!(Location { strip: 32, ..l }.pack().is_none());
    }

    #[test]
    fn sparse_dense_and_clear() {
        let mut m = BlockMap::new();
        for lba in (0..300).rev() {
            assert!(m.set(lba, loc(lba, lba + 1)));
        }
        assert_eq!(m.mapped_blocks(), 300);
        for lba in 0..300 {
            assert_eq!(m.get(lba), Some(loc(lba, lba + 1)));
        }
        assert_eq!(m.get(300), None);
        m.clear(10, 250);
        assert_eq!(m.mapped_blocks(), 50);
        assert_eq!(m.get(9), Some(loc(9, 10)));
        assert_eq!(m.get(10), None);
        assert_eq!(m.get(259), None);
        assert_eq!(m.get(260), Some(loc(260, 261)));
        let copy = BlockMap::import(&m.export()).expect("import");
        let mut seen = Vec::new();
        copy.for_each(|lba, l| seen.push((lba, l)));
        let mut want = Vec::new();
        m.for_each(|lba, l| want.push((lba, l)));
        assert_eq!(seen, want);
        assert_eq!(seen.len(), 50);
        assert!(
            BlockMap::import(&[(0, vec![1, 1], vec![loc(1, 1).pack().expect("fits"); 2])])
                .is_none()
        );
        m.clear(0, 1000);
        assert_eq!(m.mapped_blocks(), 0);
        assert_eq!(m.memory_bytes(), 0);
        // Clearing at the top of the LBA space does not overflow.
        m.clear(u64::MAX - 1, 5);
    }
}
