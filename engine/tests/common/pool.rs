//! A pool over memory nodes, for the pool tests (pool_rebuild.rs, pool_recovery.rs):
//! the nodes, how the pool reaches them again after a restart, and self-checking
//! block contents.

use std::collections::HashMap;
use std::sync::Arc;

use engine::pipeline::Kek;
use engine::pool::{ConnectFuture, NodeConnector, NodeSpec, Pool};
use engine::shard::{MemoryShard, ShardStore};

/// The pool's chunk size in these tests.
pub const CHUNK: u64 = 1 << 20;

/// Reaches memory nodes by id, as a recovered pool reaches the nodes in its catalogue.
#[derive(Debug)]
pub struct Memory(pub HashMap<String, Arc<MemoryShard>>);

impl Memory {
    /// Every node in `shards`, by its id.
    pub fn of(shards: &[Arc<MemoryShard>]) -> Self {
        Self(
            shards
                .iter()
                .map(|s| (s.info().node.clone(), Arc::clone(s)))
                .collect(),
        )
    }
}

impl NodeConnector for Memory {
    fn connect(&self, node: &NodeSpec) -> ConnectFuture<'_> {
        let found = self
            .0
            .get(&node.id)
            .map(|s| Arc::clone(s) as Arc<dyn ShardStore>);
        let id = node.id.clone();
        Box::pin(async move { found.ok_or(format!("no node {id}")) })
    }
}

/// Memory nodes node0..node{n-1} of `bytes` each (512-byte blocks).
pub fn memory_nodes(n: usize, bytes: u64) -> Vec<Arc<MemoryShard>> {
    (0..n)
        .map(|i| Arc::new(MemoryShard::new(format!("node{i}"), bytes, 512)))
        .collect()
}

/// The same nodes as shard stores (the seeds a pool recovers from).
pub fn stores(shards: &[Arc<MemoryShard>]) -> Vec<Arc<dyn ShardStore>> {
    shards
        .iter()
        .map(|s| Arc::clone(s) as Arc<dyn ShardStore>)
        .collect()
}

/// Node `i`: four racks, the nodes spread over them in turn.
pub fn spec(i: usize) -> NodeSpec {
    NodeSpec {
        id: format!("node{i}"),
        address: format!("127.0.0.1:{}", 4420 + i),
        nqn: format!("nqn.2026-11.io.dpu-offload:node{i}"),
        domain: format!("rack{}/node{i}", i % 4),
        weight: None,
    }
}

/// A 4 KiB block that depends on `tag` and `lba`: half pseudo-random (does not
/// compress), half a fill byte (compresses).
pub fn block(tag: u64, lba: u64) -> Vec<u8> {
    let mut x =
        tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
    let mut out = vec![0u8; 4096];
    for c in out[..2048].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    out[2048..].fill(u8::try_from(tag % 251).expect("small"));
    out
}

/// A pool created over `n` memory nodes of `bytes` each ([`spec`]), failure domains
/// rack then node.
pub async fn create_cluster_of(n: usize, bytes: u64, kek: &Kek) -> (Pool, Vec<Arc<MemoryShard>>) {
    let shards = memory_nodes(n, bytes);
    let list = shards
        .iter()
        .enumerate()
        .map(|(i, s)| (spec(i), Arc::clone(s) as Arc<dyn ShardStore>))
        .collect();
    let pool = Pool::create(list, kek.clone(), CHUNK, vec!["rack".into(), "node".into()])
        .await
        .expect("create cluster");
    (pool, shards)
}
