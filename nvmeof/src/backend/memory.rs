//! A RAM namespace for tests, benchmarks and the main job.
//!
//! Storage is split into chunks allocated on first write, so a "1 GiB" namespace costs
//! only what is written, and deallocating or zeroing a whole chunk gives the memory back.
//! Each chunk has its own lock, held only for a memcpy (never across an await), so
//! queues on different cores rarely contend.

use super::{check_range, ready_err, Backend, BackendError, BackendFuture, IoPath};
use bytes::{Bytes, BytesMut};
use std::sync::RwLock;

const CHUNK: usize = 1 << 20;
const CHUNK_U64: u64 = 1 << 20;
/// Largest single read or write (keeps one bad request from allocating unbounded memory).
pub const MAX_REQUEST: u64 = 64 << 20;

/// A namespace stored in memory. Contents start as zeroes and are lost on drop.
#[derive(Debug)]
pub struct MemoryBackend {
    size: u64,
    block_size: u32,
    chunks: Vec<RwLock<Option<Box<[u8]>>>>,
}

impl MemoryBackend {
    /// A zero-filled memory namespace of `size` bytes with `block_size`-byte blocks
    /// (512 or 4096; any power of two from 512 to 65536 is accepted).
    pub fn new(size: u64, block_size: u32) -> Result<Self, BackendError> {
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(BackendError::Config(format!(
                "block size {block_size} is not a power of two between 512 and 65536"
            )));
        }
        if size == 0 || size % u64::from(block_size) != 0 {
            return Err(BackendError::Config(format!(
                "size {size} is not a non-zero multiple of the block size {block_size}"
            )));
        }
        let n = usize::try_from(size.div_ceil(CHUNK_U64))
            .map_err(|_| BackendError::Config(format!("size {size} too large")))?;
        let mut chunks = Vec::new();
        chunks
            .try_reserve_exact(n)
            .map_err(|_| BackendError::Config(format!("size {size} too large")))?;
        chunks.resize_with(n, || RwLock::new(None));
        Ok(Self {
            size,
            block_size,
            chunks,
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        check_range(offset, len, self.block_size, self.size)
    }

    /// Visit the chunk pieces of a checked range: (chunk index, offset in chunk, length).
    fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (usize, usize, usize)> {
        let end = offset.saturating_add(len);
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let idx = usize::try_from(pos / CHUNK_U64).ok()?;
            let within = usize::try_from(pos % CHUNK_U64).ok()?;
            let n = usize::try_from((CHUNK_U64 - pos % CHUNK_U64).min(end - pos)).ok()?;
            pos += u64::try_from(n).ok()?;
            Some((idx, within, n))
        })
    }

    fn read_sync(&self, offset: u64, len: u64) -> Result<Bytes, BackendError> {
        self.check(offset, len)?;
        if len > MAX_REQUEST {
            return Err(BackendError::TooLarge {
                len,
                max: MAX_REQUEST,
            });
        }
        let ulen = usize::try_from(len).map_err(|_| BackendError::TooLarge {
            len,
            max: MAX_REQUEST,
        })?;
        // Filled piece by piece (no zeroing pass first): copies for written chunks,
        // zeroes only for never-written ones.
        let mut out = BytesMut::with_capacity(ulen);
        for (idx, within, n) in Self::pieces(offset, len) {
            let guard = self.chunks[idx].read().unwrap_or_else(|p| p.into_inner());
            match guard.as_ref() {
                Some(chunk) => out.extend_from_slice(&chunk[within..within + n]),
                None => out.resize(out.len() + n, 0),
            }
        }
        Ok(out.freeze())
    }

    fn write_sync(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let len = u64::try_from(data.len()).map_err(|_| BackendError::TooLarge {
            len: u64::MAX,
            max: MAX_REQUEST,
        })?;
        self.check(offset, len)?;
        let mut at = 0usize;
        for (idx, within, n) in Self::pieces(offset, len) {
            let mut guard = self.chunks[idx].write().unwrap_or_else(|p| p.into_inner());
            let chunk = guard.get_or_insert_with(|| vec![0u8; CHUNK].into_boxed_slice());
            chunk[within..within + n].copy_from_slice(&data[at..at + n]);
            at += n;
        }
        Ok(())
    }

    fn zero_sync(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.check(offset, len)?;
        for (idx, within, n) in Self::pieces(offset, len) {
            let mut guard = self.chunks[idx].write().unwrap_or_else(|p| p.into_inner());
            if within == 0 && n == CHUNK {
                *guard = None;
            } else if let Some(chunk) = guard.as_mut() {
                chunk[within..within + n].fill(0);
            }
        }
        Ok(())
    }

    /// Bytes of memory currently allocated for contents.
    pub fn allocated_bytes(&self) -> u64 {
        let n = self
            .chunks
            .iter()
            .filter(|c| c.read().unwrap_or_else(|p| p.into_inner()).is_some())
            .count();
        u64::try_from(n)
            .unwrap_or(u64::MAX)
            .saturating_mul(CHUNK_U64)
    }
}

impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn volatile_write_cache(&self) -> bool {
        false
    }
    fn deallocate_reads_zeroes(&self) -> bool {
        true
    }
    fn io_path(&self) -> IoPath {
        IoPath::Memory
    }
    fn describe(&self) -> String {
        format!("memory ({} bytes)", self.size)
    }
    fn read(&self, offset: u64, len: u64) -> BackendFuture<'_, Bytes> {
        Box::pin(std::future::ready(self.read_sync(offset, len)))
    }
    fn write(&self, offset: u64, data: Bytes) -> BackendFuture<'_, ()> {
        if u64::try_from(data.len()).map_or(true, |l| l > MAX_REQUEST) {
            let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
            return ready_err(BackendError::TooLarge {
                len,
                max: MAX_REQUEST,
            });
        }
        Box::pin(std::future::ready(self.write_sync(offset, &data)))
    }
    fn flush(&self) -> BackendFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> BackendFuture<'_, ()> {
        Box::pin(std::future::ready(self.zero_sync(offset, len)))
    }
    fn deallocate(&self, offset: u64, len: u64) -> BackendFuture<'_, ()> {
        Box::pin(std::future::ready(self.zero_sync(offset, len)))
    }
}
