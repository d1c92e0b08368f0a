//! Shard stores: one storage node's namespace, as the volume engine sees it.
//!
//! The volume engine never talks NVMe directly. It reads and writes byte ranges of a
//! node's namespace through [`ShardStore`], so that the same layout, recovery and crash
//! logic runs over memory (fast, fault-injectable, used by the model-based tests) and
//! over NVMe/TCP (real nodes, any standard target). One conformance suite
//! ([`conformance`]) runs against every implementation, so the two cannot drift.
//!
//! Contract, chosen to match what an NVMe namespace can promise:
//! - Offsets and lengths are multiples of [`ShardInfo::block_size`]; anything else is
//!   refused with [`ShardError::Misaligned`] before any I/O, because a namespace can
//!   only transfer whole logical blocks and silent read-modify-write here would break
//!   the engine's "rows are written once" rule.
//! - A completed write is durable only after a completed [`ShardStore::flush`], or
//!   when it was issued with `fua`. The engine acknowledges a host write only after
//!   that. Implementations without a volatile cache may treat flush as a no-op.
//! - Contents of a deallocated range are unspecified until rewritten (NVMe only
//!   promises zeroes when DLFEAT says so); the engine never reads ranges it freed.
//! - Errors are classified ([`ShardError`]) so the engine can act: a path failure
//!   means "reconstruct from other pieces and retry the node later", a media error
//!   means "reconstruct and repair", an invalid request is an engine bug.
//!
//! Futures are boxed so that a volume can hold `Arc<dyn ShardStore>` for nodes of
//! different kinds; one allocation per shard I/O is noise next to a network round trip.

pub mod conformance;
mod memory;
mod nvme;

use std::future::Future;
use std::pin::Pin;

pub use memory::MemoryShard;
pub use nvme::{NvmeShard, NvmeShardConfig};

/// The future every shard operation returns.
pub type ShardFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ShardError>> + Send + 'a>>;

/// What a shard store is: fixed for its lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// The node this store reaches (the cluster map's node id).
    pub node: String,
    /// Usable bytes; a multiple of `block_size`.
    pub capacity_bytes: u64,
    /// The unit of transfer and of atomicity (the namespace's LBA size).
    pub block_size: u32,
    /// Whether completed writes may sit in a volatile cache until flushed.
    pub volatile_write_cache: bool,
}

/// Why a shard operation failed, classified for the engine's recovery decisions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// The node cannot be reached (connection lost, node down, partitioned, or timed
    /// out). Reconstruct from other pieces; the node may come back.
    #[error("node {node} unavailable: {reason}")]
    Unavailable { node: String, reason: String },
    /// The node reached but reported that the data could not be read or written
    /// (NVMe media or data-integrity status). Reconstruct and repair.
    #[error("node {node} media error at byte {offset} (+{len}): {reason}")]
    Media {
        node: String,
        offset: u64,
        len: u64,
        reason: String,
    },
    /// The range does not fit the namespace. An engine bug, never retried.
    #[error("range {offset}+{len} is beyond the {capacity}-byte namespace of node {node}")]
    OutOfRange {
        node: String,
        offset: u64,
        len: u64,
        capacity: u64,
    },
    /// The range is not whole blocks. An engine bug, never retried.
    #[error("range {offset}+{len} is not aligned to the {block_size}-byte blocks of node {node}")]
    Misaligned {
        node: String,
        offset: u64,
        len: u64,
        block_size: u32,
    },
}

impl ShardError {
    /// Whether the same request may succeed later or on reconnection.
    pub fn is_transient(&self) -> bool {
        matches!(self, ShardError::Unavailable { .. })
    }
}

/// One node's namespace, addressed in bytes. See the module documentation for the
/// contract every implementation keeps (and [`conformance`] checks).
pub trait ShardStore: Send + Sync + std::fmt::Debug {
    /// The store's fixed properties.
    fn info(&self) -> &ShardInfo;

    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u64) -> ShardFuture<'_, Vec<u8>>;

    /// Writes `data` at `offset`; with `fua` it is durable when this completes.
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> ShardFuture<'_, ()>;

    /// Makes every completed write durable.
    fn flush(&self) -> ShardFuture<'_, ()>;

    /// Tells the node that `len` bytes at `offset` hold nothing the engine needs.
    fn deallocate(&self, offset: u64, len: u64) -> ShardFuture<'_, ()>;
}

/// Checks a request against the store's geometry; every implementation calls this
/// first so that misuse fails the same way everywhere.
pub fn check_range(info: &ShardInfo, offset: u64, len: u64) -> Result<(), ShardError> {
    let block = u64::from(info.block_size);
    if block == 0 || len == 0 || offset % block != 0 || len % block != 0 {
        return Err(ShardError::Misaligned {
            node: info.node.clone(),
            offset,
            len,
            block_size: info.block_size,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= info.capacity_bytes => Ok(()),
        _ => Err(ShardError::OutOfRange {
            node: info.node.clone(),
            offset,
            len,
            capacity: info.capacity_bytes,
        }),
    }
}
