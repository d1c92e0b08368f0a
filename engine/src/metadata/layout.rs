//! How one node namespace is cut: superblock, root slots, checkpoint halves, chunks.
//!
//! The metadata areas sit at the front at fixed offsets so that a node can be read
//! without knowing anything but the superblock format; the checkpoint area scales with
//! the node (1/16 of it in two halves, bounded) because the map checkpoints it holds
//! grow with the data the node stores. Everything after is equal chunks that the
//! catalogue hands out as segment pieces.

use super::MetadataError;

/// 1 MiB, the alignment of every metadata area.
pub const MIB: u64 = 1 << 20;
/// Where the primary superblock copy lives.
pub const SUPERBLOCK_OFFSET: u64 = 0;
/// Bytes reserved at the front for the two superblock copies.
pub const SUPERBLOCK_AREA: u64 = MIB;
/// Where root slot A starts (slot B follows it).
pub const ROOT_OFFSET: u64 = MIB;
/// Length of one root slot.
pub const ROOT_SLOT_LEN: u64 = MIB;
/// Where checkpoint half 0 starts (half 1 follows it).
pub const CKPT_OFFSET: u64 = ROOT_OFFSET + 2 * ROOT_SLOT_LEN;
/// Smallest checkpoint half.
pub const CKPT_HALF_MIN: u64 = 4 * MIB;
/// Largest checkpoint half.
pub const CKPT_HALF_MAX: u64 = 1 << 30;
/// Smallest namespace block size accepted.
pub const MIN_BLOCK: u32 = 512;
/// Largest namespace block size accepted (the superblock copies must fit their area).
pub const MAX_BLOCK: u32 = 64 * 1024;

/// The geometry of one node namespace (docs/format.md, "Node layout and metadata area").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLayout {
    /// The namespace's block size, the unit of every transfer.
    pub block_size: u32,
    /// The namespace's usable bytes when it was formatted.
    pub capacity: u64,
    /// Offset of root slot A; slot B is at `root_offset + root_slot_len`.
    pub root_offset: u64,
    /// Length of one root slot.
    pub root_slot_len: u64,
    /// Offset of checkpoint half 0; half 1 is at `ckpt_offset + ckpt_half_len`.
    pub ckpt_offset: u64,
    /// Length of one checkpoint half.
    pub ckpt_half_len: u64,
    /// Offset of chunk 0.
    pub chunk_offset: u64,
    /// Length of every chunk.
    pub chunk_size: u64,
    /// How many chunks the namespace holds.
    pub chunk_count: u32,
}

/// The checkpoint half for a namespace of `capacity` bytes:
/// clamp(capacity / 32, 4 MiB, 1 GiB), rounded down to 1 MiB.
fn ckpt_half_for(capacity: u64) -> u64 {
    let half = (capacity / 32).clamp(CKPT_HALF_MIN, CKPT_HALF_MAX);
    half - half % MIB
}

fn check_block_size(block_size: u32) -> Result<(), MetadataError> {
    if !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(MetadataError::InvalidLayout {
            reason: format!(
                "block size {block_size} is not a power of two between {MIN_BLOCK} and {MAX_BLOCK}"
            ),
        });
    }
    Ok(())
}

impl NodeLayout {
    /// Plans a namespace of `capacity` bytes with `block_size` blocks and chunks of
    /// `chunk_size` bytes (a multiple of 4096 and of the block size). At least one chunk
    /// must fit; the error says the smallest capacity that would do.
    pub fn plan(capacity: u64, block_size: u32, chunk_size: u64) -> Result<Self, MetadataError> {
        check_block_size(block_size)?;
        if chunk_size == 0 || chunk_size % 4096 != 0 || chunk_size % u64::from(block_size) != 0 {
            return Err(MetadataError::InvalidLayout {
                reason: format!(
                    "chunk size {chunk_size} is not a nonzero multiple of 4096 and of the \
                     {block_size}-byte block"
                ),
            });
        }
        let half = ckpt_half_for(capacity);
        let chunk_offset = CKPT_OFFSET + 2 * half;
        let chunks = capacity
            .checked_sub(chunk_offset)
            .map_or(0, |rest| rest / chunk_size);
        if chunks == 0 {
            return Err(MetadataError::CapacityTooSmall {
                capacity,
                chunk_size,
                minimum: minimum_capacity(chunk_size),
            });
        }
        Ok(NodeLayout {
            block_size,
            capacity,
            root_offset: ROOT_OFFSET,
            root_slot_len: ROOT_SLOT_LEN,
            ckpt_offset: CKPT_OFFSET,
            ckpt_half_len: half,
            chunk_offset,
            chunk_size,
            // A namespace with more than 2^32 - 1 chunks leaves the rest unused.
            chunk_count: u32::try_from(chunks).unwrap_or(u32::MAX),
        })
    }

    /// Byte offset of chunk `chunk`, or `None` if there is no such chunk.
    pub fn chunk_base(&self, chunk: u32) -> Option<u64> {
        if chunk >= self.chunk_count {
            return None;
        }
        self.chunk_size
            .checked_mul(u64::from(chunk))?
            .checked_add(self.chunk_offset)
    }

    /// Offset of root slot 0 or 1.
    pub fn root_slot_offset(&self, slot: u8) -> u64 {
        if slot == 0 {
            self.root_offset
        } else {
            self.root_offset + self.root_slot_len
        }
    }

    /// Offset of checkpoint half 0 or 1.
    pub fn ckpt_half_offset(&self, half: u8) -> u64 {
        if half == 0 {
            self.ckpt_offset
        } else {
            self.ckpt_offset + self.ckpt_half_len
        }
    }

    /// Offset of the backup superblock copy: 4096, or the next block when blocks are
    /// larger.
    pub fn backup_superblock_offset(block_size: u32) -> u64 {
        u64::from(block_size).max(4096)
    }

    /// Checks a layout decoded from a node against itself and the namespace it came
    /// from, so that no later offset computation can overflow or leave the namespace.
    pub(crate) fn validate(&self, shard_block: u32, shard_capacity: u64) -> Result<(), String> {
        check_block_size(self.block_size).map_err(|e| e.to_string())?;
        if self.block_size != shard_block {
            return Err(format!(
                "block size {} differs from the namespace's {shard_block}",
                self.block_size
            ));
        }
        if self.capacity > shard_capacity {
            return Err(format!(
                "capacity {} exceeds the namespace's {shard_capacity} bytes",
                self.capacity
            ));
        }
        let block = u64::from(self.block_size);
        let aligned = |v: u64| v % block == 0;
        let fields = [
            self.root_offset,
            self.root_slot_len,
            self.ckpt_offset,
            self.ckpt_half_len,
            self.chunk_offset,
            self.chunk_size,
        ];
        if !fields.iter().all(|&v| aligned(v) && v > 0) {
            return Err("an area offset or length is zero or not block-aligned".into());
        }
        let sb_end = Self::backup_superblock_offset(self.block_size) + block;
        let root_end = self
            .root_slot_len
            .checked_mul(2)
            .and_then(|l| l.checked_add(self.root_offset));
        let ckpt_end = self
            .ckpt_half_len
            .checked_mul(2)
            .and_then(|l| l.checked_add(self.ckpt_offset));
        let chunk_end = self
            .chunk_size
            .checked_mul(u64::from(self.chunk_count))
            .and_then(|l| l.checked_add(self.chunk_offset));
        match (root_end, ckpt_end, chunk_end) {
            (Some(root_end), Some(ckpt_end), Some(chunk_end))
                if self.root_offset >= sb_end
                    && self.ckpt_offset >= root_end
                    && self.chunk_offset >= ckpt_end
                    && chunk_end <= self.capacity
                    && self.root_slot_len > u64::from(super::slots::HEADER_LEN)
                    && self.ckpt_half_len > u64::from(super::slots::HEADER_LEN) =>
            {
                Ok(())
            }
            _ => Err("areas overlap, are too small or leave the namespace".into()),
        }
    }
}

/// The smallest capacity that holds the metadata areas and one chunk of `chunk_size`.
pub fn minimum_capacity(chunk_size: u64) -> u64 {
    // The checkpoint area grows with capacity, so iterate to the fixed point; it grows
    // by 1/16 of each step, so this converges in a handful of rounds.
    let mut cap = CKPT_OFFSET
        .saturating_add(2 * CKPT_HALF_MIN)
        .saturating_add(chunk_size);
    for _ in 0..64 {
        let need = CKPT_OFFSET
            .saturating_add(2 * ckpt_half_for(cap))
            .saturating_add(chunk_size);
        if need <= cap {
            break;
        }
        cap = need;
    }
    cap
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_namespace_gets_the_minimum_checkpoint_half() {
        let l = NodeLayout::plan(64 * MIB, 4096, MIB).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.ckpt_half_len, 4 * MIB);
        assert_eq!(l.chunk_offset, 3 * MIB + 8 * MIB);
        assert_eq!(l.chunk_count, 64 - 11);
        assert_eq!(l.chunk_base(0), Some(11 * MIB));
        assert_eq!(l.chunk_base(52), Some(63 * MIB));
        assert_eq!(l.chunk_base(53), None);
        l.validate(4096, 64 * MIB).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn large_namespace_checkpoint_half_is_a_32nd_capped_at_1_gib() {
        let l = NodeLayout::plan(10 << 30, 512, 64 * MIB).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.ckpt_half_len, 320 * MIB);
        let l = NodeLayout::plan(1 << 40, 4096, 64 * MIB).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.ckpt_half_len, 1 << 30);
    }

    #[test]
    fn too_small_names_the_minimum_and_the_minimum_fits() {
        for chunk in [4096, MIB, 256 * MIB, 4 << 30] {
            let min = minimum_capacity(chunk);
            let err = NodeLayout::plan(min - 4096, 4096, chunk).unwrap_err();
            assert!(err.to_string().contains(&min.to_string()), "{err}");
            let l = NodeLayout::plan(min, 4096, chunk).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(l.chunk_count, 1);
        }
    }

    #[test]
    fn bad_chunk_and_block_sizes_are_refused() {
        assert!(NodeLayout::plan(1 << 30, 4096, 0).is_err());
        assert!(NodeLayout::plan(1 << 30, 4096, 2048).is_err());
        assert!(NodeLayout::plan(1 << 30, 8192, 12288).is_err());
        assert!(NodeLayout::plan(1 << 30, 1000, 4096).is_err());
        assert!(NodeLayout::plan(1 << 30, 256, 4096).is_err());
    }
}
