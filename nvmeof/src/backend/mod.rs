//! Storage behind a namespace.
//!
//! The target only speaks NVMe; what sits under a namespace is a backend: RAM for tests
//! and benchmarks, a file or a block device on a storage node. The trait is object safe
//! (boxed futures) so a subsystem can mix backends chosen at run time from a
//! configuration file, and every method validates its range itself, so a backend can
//! never be driven outside its bounds by a bad LBA from the wire.
//!
//! Ranges are in bytes and must be multiples of the backend's block size: the target
//! converts LBAs with [`lba_to_bytes`], and an unaligned range is a programming error
//! upstream that we report rather than silently widen.

mod aligned;
mod file;
mod memory;
#[cfg(target_os = "linux")]
mod uring;

pub use aligned::AlignedBuf;
pub use file::{FileBackend, FileOptions, IoMode};
pub use memory::MemoryBackend;

use bytes::Bytes;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

/// A boxed future returned by [`Backend`] methods.
pub type BackendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// Errors of a namespace backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The range does not start or end on a block boundary.
    #[error(
        "range at byte {offset} length {len} is not aligned to the {block_size}-byte block size"
    )]
    Unaligned {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// The backend's block size.
        block_size: u32,
    },
    /// The range reaches past the end of the backend (or overflows).
    #[error("range at byte {offset} length {len} is beyond the end of the {size}-byte backend")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Size of the backend in bytes.
        size: u64,
    },
    /// A single request larger than this backend accepts in one call.
    #[error("request of {len} bytes exceeds the per-request limit of {max} bytes")]
    TooLarge {
        /// Requested length.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// Invalid configuration or open-time parameter.
    #[error("invalid backend configuration: {0}")]
    Config(String),
    /// An operating-system I/O error.
    #[error("{op} failed on {what}: {source}")]
    Io {
        /// The operation (read, write, flush, ...).
        op: &'static str,
        /// The backend (a path, usually).
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The backend's worker (io_uring thread or blocking pool) has gone away.
    #[error("backend worker stopped")]
    WorkerGone,
    /// The data could not be read, or failed verification and could not be
    /// reconstructed (never returned unverified), or could not be written.
    #[error("media error: {0}")]
    Media(String),
    /// No space is left to store the data.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The namespace refuses writes.
    #[error("the namespace is read-only")]
    ReadOnly,
    /// The storage cannot serve the request now (it may later: too many storage
    /// nodes unreachable, shutting down).
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// Performance hints a backend may give for Identify Namespace (NOIOB, NPWG, NPWA,
/// NPDG, NPDA, NOWS), in logical blocks and not 0's based; 0 means "no hint". The
/// target converts them to the specification's encodings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoHints {
    /// I/O crossing a multiple of this many blocks is slower (NOIOB).
    pub optimal_io_boundary: u32,
    /// Writes in multiples of this many blocks perform best (NPWG).
    pub preferred_write_granularity: u32,
    /// Writes starting at multiples of this many blocks perform best (NPWA).
    pub preferred_write_alignment: u32,
    /// Deallocation in multiples of this many blocks performs best (NPDG).
    pub preferred_deallocate_granularity: u32,
    /// Deallocation starting at multiples of this many blocks performs best (NPDA).
    pub preferred_deallocate_alignment: u32,
    /// Writes of this many blocks perform best (NOWS).
    pub optimal_write_size: u32,
}

/// How a backend performs its I/O; reported at open so an operator can see whether the
/// fast path is in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoPath {
    /// In-process memory.
    Memory,
    /// io_uring on a dedicated thread; `direct` says whether the file is open O_DIRECT.
    IoUring {
        /// Opened with O_DIRECT (no page cache).
        direct: bool,
    },
    /// pread/pwrite on tokio's blocking pool, with the reason io_uring was not used.
    Blocking {
        /// Opened with O_DIRECT (no page cache).
        direct: bool,
        /// Why the io_uring path is not in use.
        reason: String,
    },
    /// Another component does the I/O (such as a volume engine); the text says which.
    Other(String),
}

impl fmt::Display for IoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoPath::Memory => write!(f, "memory"),
            IoPath::IoUring { direct } => {
                write!(
                    f,
                    "io_uring{}",
                    if *direct {
                        " + O_DIRECT"
                    } else {
                        " (buffered)"
                    }
                )
            }
            IoPath::Other(what) => f.write_str(what),
            IoPath::Blocking { direct, reason } => write!(
                f,
                "blocking pread/pwrite{} ({reason})",
                if *direct {
                    " + O_DIRECT"
                } else {
                    " (buffered)"
                }
            ),
        }
    }
}

/// The storage of one namespace.
///
/// All ranges are byte ranges that must be aligned to [`Backend::block_size`] and lie
/// within [`Backend::size`]; otherwise the call fails with [`BackendError::Unaligned`]
/// or [`BackendError::OutOfRange`] and touches nothing.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Size in bytes (a multiple of the block size).
    fn size(&self) -> u64;
    /// Logical block size in bytes (a power of two, 512..=4096 in practice).
    fn block_size(&self) -> u32;
    /// Whether completed writes may sit in a volatile cache until [`Backend::flush`].
    fn volatile_write_cache(&self) -> bool;
    /// Whether a deallocated range is guaranteed to read back as zeroes.
    fn deallocate_reads_zeroes(&self) -> bool;
    /// How the I/O is performed.
    fn io_path(&self) -> IoPath;
    /// A short human description (path or "memory").
    fn describe(&self) -> String;
    /// Read `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u64) -> BackendFuture<'_, Bytes>;
    /// Write `data` at `offset`.
    fn write(&self, offset: u64, data: Bytes) -> BackendFuture<'_, ()>;
    /// Make every completed write durable.
    fn flush(&self) -> BackendFuture<'_, ()>;
    /// Set a range to zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> BackendFuture<'_, ()>;
    /// Tell the backend a range is no longer in use (may free space; advisory).
    fn deallocate(&self, offset: u64, len: u64) -> BackendFuture<'_, ()>;
    /// Write `data` at `offset`, durable when this completes (Force Unit Access). The
    /// default writes and then flushes when there is a volatile cache; a backend that
    /// can make one write durable more cheaply overrides it.
    fn write_fua(&self, offset: u64, data: Bytes) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            self.write(offset, data).await?;
            if self.volatile_write_cache() {
                self.flush().await?;
            }
            Ok(())
        })
    }
    /// Whether writes are refused (reported as write protected in Identify Namespace).
    fn read_only(&self) -> bool {
        false
    }
    /// Performance hints for Identify Namespace (none by default).
    fn io_hints(&self) -> IoHints {
        IoHints::default()
    }
}

/// Check that `offset..offset+len` is block-aligned and inside `size`.
pub fn check_range(offset: u64, len: u64, block_size: u32, size: u64) -> Result<(), BackendError> {
    let bs = u64::from(block_size);
    if bs == 0 || offset % bs != 0 || len % bs != 0 {
        return Err(BackendError::Unaligned {
            offset,
            len,
            block_size,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BackendError::OutOfRange { offset, len, size }),
    }
}

/// Convert an LBA range (`nlb` blocks, not zero-based) to a byte range, with overflow
/// checks. Returns `None` if the arithmetic overflows.
pub fn lba_to_bytes(lba: u64, nlb: u64, block_size: u32) -> Option<(u64, u64)> {
    let bs = u64::from(block_size);
    Some((lba.checked_mul(bs)?, nlb.checked_mul(bs)?))
}

/// A ready future carrying an error, for argument checks that fail before any I/O.
pub(crate) fn ready_err<'a, T: Send + 'a>(e: BackendError) -> BackendFuture<'a, T> {
    Box::pin(std::future::ready(Err(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks() {
        assert!(check_range(0, 4096, 512, 4096).is_ok());
        assert!(matches!(
            check_range(1, 512, 512, 4096),
            Err(BackendError::Unaligned { .. })
        ));
        assert!(matches!(
            check_range(0, 100, 512, 4096),
            Err(BackendError::Unaligned { .. })
        ));
        assert!(matches!(
            check_range(4096, 512, 512, 4096),
            Err(BackendError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(u64::MAX - 511, 512 * 4, 512, u64::MAX),
            Err(BackendError::Unaligned { .. } | BackendError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(u64::MAX / 512 * 512, 1024, 512, u64::MAX),
            Err(BackendError::OutOfRange { .. })
        ));
        assert_eq!(lba_to_bytes(2, 3, 512), Some((1024, 1536)));
        assert_eq!(lba_to_bytes(u64::MAX, 1, 512), None);
    }
}
