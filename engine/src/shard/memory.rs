//! A shard store in memory, with the faults the engine must survive.
//!
//! It models a namespace with a volatile write cache: completed writes land in a
//! cache and reach the "media" only on flush or FUA, so a simulated power loss
//! ([`MemoryShard::power_loss`]) drops exactly what an unflushed real device may drop.
//! That is what lets the model-based tests prove that every acknowledged write
//! survives a crash. The lock is a plain mutex held only inside one synchronous
//! operation, never across an await.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::{check_range, ShardError, ShardFuture, ShardInfo, ShardStore};

#[derive(Debug, Default)]
struct State {
    /// What survives a power loss.
    media: Vec<u8>,
    /// Completed but unflushed writes, in completion order: (offset, bytes).
    cache: Vec<(u64, Vec<u8>)>,
    /// When false every request fails as if the node were unreachable.
    online: bool,
    /// Byte offsets whose reads fail with a media error (a bad sector).
    bad_blocks: BTreeMap<u64, ()>,
}

/// A fault-injectable in-memory namespace.
#[derive(Debug)]
pub struct MemoryShard {
    info: ShardInfo,
    state: Mutex<State>,
}

impl MemoryShard {
    /// A zero-filled namespace of `capacity_bytes` (rounded down to whole blocks).
    pub fn new(node: impl Into<String>, capacity_bytes: u64, block_size: u32) -> Self {
        let block = u64::from(block_size.max(1));
        let capacity_bytes = capacity_bytes - capacity_bytes % block;
        let len = usize::try_from(capacity_bytes).unwrap_or(usize::MAX);
        MemoryShard {
            info: ShardInfo {
                node: node.into(),
                capacity_bytes,
                block_size: block_size.max(1),
                volatile_write_cache: true,
            },
            state: Mutex::new(State {
                media: vec![0; len],
                online: true,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock can only come from a bug in this file; the
        // state is still a valid byte image, so keep serving it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn unavailable(&self) -> ShardError {
        ShardError::Unavailable {
            node: self.info.node.clone(),
            reason: "node is offline".into(),
        }
    }

    /// Takes the node off the network (true) or brings it back (false). Offline
    /// nodes fail every request with [`ShardError::Unavailable`] and keep their data.
    pub fn set_offline(&self, offline: bool) {
        self.lock().online = !offline;
    }

    /// Drops every unflushed write, as a power loss of the node would.
    pub fn power_loss(&self) {
        self.lock().cache.clear();
    }

    /// Flips bits of one stored byte (in the cache if it is cached, and on media),
    /// as silent corruption on the node would. Returns false if out of range.
    pub fn corrupt(&self, offset: u64, xor: u8) -> bool {
        let mut state = self.lock();
        let Ok(at) = usize::try_from(offset) else {
            return false;
        };
        let Some(byte) = state.media.get_mut(at) else {
            return false;
        };
        *byte ^= xor;
        for (start, bytes) in &mut state.cache {
            if let Some(rel) = offset
                .checked_sub(*start)
                .and_then(|r| usize::try_from(r).ok())
            {
                if let Some(b) = bytes.get_mut(rel) {
                    *b ^= xor;
                }
            }
        }
        true
    }

    /// Every byte a reader of the namespace would see now (durable media with cached
    /// writes on top): what an attacker with the node's disk could scan.
    pub fn media_snapshot(&self) -> Vec<u8> {
        let state = self.lock();
        let mut out = state.media.clone();
        for (start, bytes) in &state.cache {
            if let Some(at) = usize::try_from(*start).ok().filter(|a| *a < out.len()) {
                let end = (at + bytes.len()).min(out.len());
                out[at..end].copy_from_slice(&bytes[..end - at]);
            }
        }
        out
    }

    /// Makes reads of the block holding `offset` fail with a media error.
    pub fn add_bad_block(&self, offset: u64) {
        let block = u64::from(self.info.block_size);
        self.lock().bad_blocks.insert(offset - offset % block, ());
    }

    fn do_read(&self, offset: u64, len: u64) -> Result<Vec<u8>, ShardError> {
        check_range(&self.info, offset, len)?;
        let state = self.lock();
        if !state.online {
            return Err(self.unavailable());
        }
        if let Some((&bad, ())) = state.bad_blocks.range(offset..offset + len).next() {
            return Err(ShardError::Media {
                node: self.info.node.clone(),
                offset: bad,
                len: u64::from(self.info.block_size),
                reason: "unrecovered read error".into(),
            });
        }
        let (start, end) = byte_range(offset, len);
        let mut out = state.media[start..end].to_vec();
        // Later cached writes overlay the media, in completion order.
        for (at, bytes) in &state.cache {
            overlay(&mut out, offset, *at, bytes);
        }
        Ok(out)
    }

    fn do_write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), ShardError> {
        check_range(&self.info, offset, data.len() as u64)?;
        let mut state = self.lock();
        if !state.online {
            return Err(self.unavailable());
        }
        if fua {
            let len = data.len() as u64;
            let (start, end) = byte_range(offset, len);
            state.media[start..end].copy_from_slice(&data);
            // An older cached write to the same bytes must not resurface on flush.
            for (at, bytes) in &mut state.cache {
                let cached_end = *at + bytes.len() as u64;
                let (lo, hi) = (offset.max(*at), (offset + len).min(cached_end));
                if lo < hi {
                    let n = usize::try_from(hi - lo).unwrap_or(0);
                    let dst = usize::try_from(lo - *at).unwrap_or(0);
                    let src = usize::try_from(lo - offset).unwrap_or(0);
                    bytes[dst..dst + n].copy_from_slice(&data[src..src + n]);
                }
            }
        } else {
            state.cache.push((offset, data));
        }
        Ok(())
    }

    fn do_flush(&self) -> Result<(), ShardError> {
        let mut state = self.lock();
        if !state.online {
            return Err(self.unavailable());
        }
        let cache = std::mem::take(&mut state.cache);
        for (at, bytes) in cache {
            let (start, end) = byte_range(at, bytes.len() as u64);
            state.media[start..end].copy_from_slice(&bytes);
        }
        Ok(())
    }

    fn do_deallocate(&self, offset: u64, len: u64) -> Result<(), ShardError> {
        check_range(&self.info, offset, len)?;
        let state = self.lock();
        if !state.online {
            return Err(self.unavailable());
        }
        // Contents become unspecified; keeping them is a valid (and simple) choice.
        Ok(())
    }
}

/// Byte indices of a range that `check_range` already accepted (so it fits memory).
fn byte_range(offset: u64, len: u64) -> (usize, usize) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    let len = usize::try_from(len).unwrap_or(0);
    (start, start.saturating_add(len))
}

/// Copies the part of `bytes` (written at `at`) that overlaps `out` (read at `offset`).
fn overlay(out: &mut [u8], offset: u64, at: u64, bytes: &[u8]) {
    let out_end = offset + out.len() as u64;
    let in_end = at + bytes.len() as u64;
    let (lo, hi) = (offset.max(at), out_end.min(in_end));
    if lo >= hi {
        return;
    }
    let n = usize::try_from(hi - lo).unwrap_or(0);
    let dst = usize::try_from(lo - offset).unwrap_or(0);
    let src = usize::try_from(lo - at).unwrap_or(0);
    out[dst..dst + n].copy_from_slice(&bytes[src..src + n]);
}

impl ShardStore for MemoryShard {
    fn info(&self) -> &ShardInfo {
        &self.info
    }

    fn read(&self, offset: u64, len: u64) -> ShardFuture<'_, Vec<u8>> {
        Box::pin(async move { self.do_read(offset, len) })
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> ShardFuture<'_, ()> {
        Box::pin(async move { self.do_write(offset, data, fua) })
    }

    fn flush(&self) -> ShardFuture<'_, ()> {
        Box::pin(async move { self.do_flush() })
    }

    fn deallocate(&self, offset: u64, len: u64) -> ShardFuture<'_, ()> {
        Box::pin(async move { self.do_deallocate(offset, len) })
    }
}
