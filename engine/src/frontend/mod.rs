//! Front-ends: how a host or a VM reaches a volume (NBD, NVMe/TCP, vhost-user-blk).
//!
//! Every front-end speaks to a volume through [`BlockDevice`] and nothing else, so the
//! protocol code never sees segments, shards or keys, and one front-end can be tested
//! against [`MemoryDevice`] without the engine. The engine's implementation forwards
//! each call to the reactor that owns the volume (DESIGN: one owner per volume), so the
//! futures are `Send` and may be polled on any thread.
//!
//! Addressing is in bytes; offsets and lengths must be whole multiples of
//! [`BlockDevice::block_size`] (the front-end advertises that as its minimum block
//! size and refuses anything else with [`DeviceError::Misaligned`] before calling).

pub mod nbd;
pub mod nvme_tcp;
pub mod vhost_user_blk;

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

/// The future every device operation returns.
pub type DeviceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DeviceError>> + Send + 'a>>;

/// Why a device request failed; each front-end maps these to its protocol's codes
/// (NBD errno values, NVMe status codes, virtio-blk status).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The range reaches past the end of the device.
    #[error("range {offset}+{len} is beyond the {size}-byte device")]
    OutOfRange {
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// Device size in bytes.
        size: u64,
    },
    /// The range is not whole blocks.
    #[error("range {offset}+{len} is not aligned to {block_size}-byte blocks")]
    Misaligned {
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The device's block size.
        block_size: u32,
    },
    /// The device is read-only.
    #[error("the device is read-only")]
    ReadOnly,
    /// No space left to store the data.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// Data could not be read or verified (never returned unverified).
    #[error("media error: {0}")]
    Media(String),
    /// The volume cannot serve the request now (too many nodes unreachable, or the
    /// volume is shutting down); the request may succeed later.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// How to drive a device fast, for the front-ends to advertise (NVMe Identify
/// Namespace NOIOB/NPWG/NPWA/NOWS, a virtio-blk topology, ...). Bytes, whole blocks;
/// 0 means no hint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoHints {
    /// Writes in multiples of this size, aligned to it, perform best (an engine
    /// volume: the compression unit, so that each becomes whole records).
    pub write_granularity: u64,
    /// I/O crossing a multiple of this is slower (an engine volume: the compression
    /// unit, where a read of aligned data reaches a second record).
    pub io_boundary: u64,
    /// Writes of this size perform best (an engine volume: the data of one stripe
    /// row, which such a write fills on its own).
    pub optimal_write_size: u64,
}

/// A volume as a front-end sees it. See the module documentation.
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Size in bytes (a multiple of the block size).
    fn size_bytes(&self) -> u64;
    /// The logical block size (4096 for engine volumes).
    fn block_size(&self) -> u32;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Whether completed writes may sit in a volatile cache until flushed (the
    /// front-end then advertises a write cache and honours FUA and flush).
    fn volatile_write_cache(&self) -> bool;
    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u64) -> DeviceFuture<'_, Vec<u8>>;
    /// Writes `data` at `offset`; with `fua` it is durable when this completes.
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> DeviceFuture<'_, ()>;
    /// Makes every completed write durable.
    fn flush(&self) -> DeviceFuture<'_, ()>;
    /// Deallocates the range: it reads as zeroes afterwards.
    fn discard(&self, offset: u64, len: u64) -> DeviceFuture<'_, ()>;
    /// Makes the range read as zeroes (durable like a write; with `fua` on completion).
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> DeviceFuture<'_, ()>;
    /// Performance hints (none by default).
    fn io_hints(&self) -> IoHints {
        IoHints::default()
    }
}

/// Checks a request against a device's size and block size; front-ends call this
/// before forwarding so that every protocol refuses bad ranges the same way.
pub fn check_range(device: &dyn BlockDevice, offset: u64, len: u64) -> Result<(), DeviceError> {
    let block = u64::from(device.block_size());
    if block == 0 || len == 0 || offset % block != 0 || len % block != 0 {
        return Err(DeviceError::Misaligned {
            offset,
            len,
            block_size: device.block_size(),
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= device.size_bytes() => Ok(()),
        _ => Err(DeviceError::OutOfRange {
            offset,
            len,
            size: device.size_bytes(),
        }),
    }
}

/// A device in memory, for front-end tests without the engine.
#[derive(Debug)]
pub struct MemoryDevice {
    data: Mutex<Vec<u8>>,
    block_size: u32,
    read_only: bool,
}

impl MemoryDevice {
    /// A zeroed device of `size` bytes (rounded down to whole blocks).
    pub fn new(size: u64, block_size: u32) -> Self {
        let block = u64::from(block_size.max(1));
        let size = usize::try_from(size - size % block).unwrap_or(0);
        Self {
            data: Mutex::new(vec![0; size]),
            block_size,
            read_only: false,
        }
    }

    /// The same device, refusing writes.
    pub fn into_read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, DeviceError> {
        check_range(self, offset, len)?;
        let start = usize::try_from(offset).map_err(|_| DeviceError::OutOfRange {
            offset,
            len,
            size: self.size_bytes(),
        })?;
        let n = usize::try_from(len).map_err(|_| DeviceError::OutOfRange {
            offset,
            len,
            size: self.size_bytes(),
        })?;
        Ok(start..start + n)
    }

    fn fill(&self, offset: u64, len: u64, bytes: Option<&[u8]>) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        let r = self.range(offset, len)?;
        let mut data = self
            .data
            .lock()
            .map_err(|_| DeviceError::Media("poisoned".into()))?;
        match bytes {
            Some(b) => data[r].copy_from_slice(b),
            None => data[r].fill(0),
        }
        Ok(())
    }
}

impl BlockDevice for MemoryDevice {
    fn size_bytes(&self) -> u64 {
        self.data.lock().map(|d| d.len() as u64).unwrap_or(0)
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn volatile_write_cache(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, len: u64) -> DeviceFuture<'_, Vec<u8>> {
        let result = self.range(offset, len).and_then(|r| {
            let data = self
                .data
                .lock()
                .map_err(|_| DeviceError::Media("poisoned".into()))?;
            Ok(data[r].to_vec())
        });
        Box::pin(async move { result })
    }
    fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> DeviceFuture<'_, ()> {
        let result = self.fill(offset, data.len() as u64, Some(&data));
        Box::pin(async move { result })
    }
    fn flush(&self) -> DeviceFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn discard(&self, offset: u64, len: u64) -> DeviceFuture<'_, ()> {
        let result = self.fill(offset, len, None);
        Box::pin(async move { result })
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> DeviceFuture<'_, ()> {
        let result = self.fill(offset, len, None);
        Box::pin(async move { result })
    }
}
