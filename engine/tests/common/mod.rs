//! Shared set-up for the engine's integration tests. This module: the volume tests'
//! memory nodes behind an in-memory segment source, and deterministic test data; the
//! submodules serve other groups of tests. Each test file compiles its own copy (`mod common;`) and uses a part of
//! it, hence `dead_code` is allowed.
#![allow(dead_code)]

pub mod api;
pub mod nbd;
pub mod pool;

use std::sync::Arc;

use engine::pipeline::{Compression, DataKey, MemoryEpochStore, VolumeId};
use engine::shard::{MemoryShard, ShardStore};
use engine::volume::{InMemorySource, SegmentSource, Volume, VolumeConfig};
use futures::executor::block_on;

/// A cluster of memory nodes and the source that places segments on them.
pub struct Cluster {
    pub nodes: Vec<Arc<MemoryShard>>,
    pub source: Arc<InMemorySource>,
    pub epochs: MemoryEpochStore,
}

impl Cluster {
    pub fn new(nodes: usize, capacity: u64, shard_block: u32, chunk_size: u64) -> Self {
        let nodes: Vec<Arc<MemoryShard>> = (0..nodes)
            .map(|i| Arc::new(MemoryShard::new(format!("n{i}"), capacity, shard_block)))
            .collect();
        let shards: Vec<Arc<dyn ShardStore>> = nodes
            .iter()
            .map(|n| Arc::clone(n) as Arc<dyn ShardStore>)
            .collect();
        Self {
            nodes,
            source: Arc::new(InMemorySource::new(shards, chunk_size)),
            epochs: MemoryEpochStore::new(),
        }
    }

    pub fn node(&self, id: &str) -> &Arc<MemoryShard> {
        self.nodes
            .iter()
            .find(|n| n.info().node == id)
            .expect("known node")
    }

    /// Opens (or, after a crash, reopens) a volume from what the source recorded.
    pub fn open(&mut self, config: VolumeConfig, key: Option<&DataKey>) -> Volume {
        self.try_open(config, key).expect("open volume")
    }

    pub fn try_open(
        &mut self,
        config: VolumeConfig,
        key: Option<&DataKey>,
    ) -> Result<Volume, engine::volume::VolumeError> {
        let (segments, image) = self.source.recorded(config.id);
        let source = Arc::clone(&self.source) as Arc<dyn SegmentSource>;
        block_on(Volume::open(
            config,
            source,
            key,
            &mut self.epochs,
            segments,
            image,
        ))
    }
}

pub fn layout(k: usize, m: usize) -> placement::Layout {
    let (k, m) = (
        u8::try_from(k).expect("small"),
        u8::try_from(m).expect("small"),
    );
    if k == 1 {
        placement::Layout::mirror(m + 1)
    } else {
        placement::Layout::ec(k, m)
    }
}

pub fn config(id: u8, k: usize, m: usize, blocks: u64, shard_block: u32) -> VolumeConfig {
    let mut c = VolumeConfig::new(VolumeId([id; 16]), layout(k, m), blocks);
    c.compression = Compression::Off;
    c.shard_block = u64::from(shard_block);
    c
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}
