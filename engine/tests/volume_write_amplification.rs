//! Write amplification of sustained 4 KiB random writes on ec:4+2: bytes written to
//! the shards per byte written by the host (the ideal for full rows is 6/4 = 1.5).
//! Printed with `cargo test -p engine --test volume_write_amplification -- --nocapture`.
//!
//! Random data (incompressible), AES-256-GCM on, default geometry (128 KiB strips). A
//! 4 KiB record is 4096 + 48 (header) + 16 (tag) bytes; 31 fit a 128 KiB strip.

// Ratios printed for the report; the exact checks use integers.
#![allow(clippy::cast_precision_loss)]

use std::sync::Arc;

use engine::pipeline::{DataKey, MemoryEpochStore, VolumeId};
use engine::shard::{MemoryShard, ShardStore};
use engine::volume::{Volume, VolumeConfig};
use futures::executor::block_on;

fn volume(write_cache: bool, shard_block: u32, capacity: u64) -> Volume {
    let shards: Vec<Arc<dyn ShardStore>> = (0..6)
        .map(|i| {
            Arc::new(MemoryShard::new(format!("n{i}"), capacity, shard_block))
                as Arc<dyn ShardStore>
        })
        .collect();
    let mut config = VolumeConfig::new(VolumeId([1; 16]), placement::Layout::ec(4, 2), 262_144);
    config.write_cache = write_cache;
    let key = DataKey::from_bytes([3; 32]);
    Volume::create(config, shards, Some(&key), &mut MemoryEpochStore::new()).expect("create")
}

fn random_writes(v: &mut Volume, writes: u64) -> f64 {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut block = vec![0u8; 4096];
    for _ in 0..writes {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        block_on(v.write(x % 262_144, &block, false)).expect("write");
    }
    block_on(v.flush()).expect("flush");
    let s = v.stats();
    s.shard_bytes_written as f64 / s.host_bytes_written as f64
}

#[test]
fn ec_4_2_random_4k_write_amplification() {
    for shard_block in [512u32, 4096] {
        // Batched: rows fill before they are sealed (write cache, flush at the end).
        let mut v = volume(true, shard_block, 16 << 20);
        let wa = random_writes(&mut v, 12_000);
        println!(
            "ec:4+2, 4 KiB random writes, rows sealed full, {shard_block}-byte shard blocks: \
             write amplification {wa:.3} ({} rows)",
            v.stats().rows_sealed
        );
        assert!((1.5..1.6).contains(&wa), "{wa}");
        println!(
            "  map {} bytes for {} mapped blocks, sealed-row table {} bytes",
            v.map_memory_bytes(),
            v.mapped_blocks(),
            v.row_table_memory_bytes()
        );

        // Synchronous, one write at a time: every write seals its own row.
        let mut v = volume(false, shard_block, 12 << 20);
        let wa = random_writes(&mut v, 60);
        println!(
            "ec:4+2, 4 KiB random writes, each write durable alone, {shard_block}-byte shard \
             blocks: write amplification {wa:.3}"
        );
        let record = 4096u64 + 64;
        let strip = record.div_ceil(u64::from(shard_block)) * u64::from(shard_block);
        let expected = (3 * strip) as f64 / 4096.0;
        assert!((wa - expected).abs() < 1e-9, "{wa} vs {expected}");
    }
}
