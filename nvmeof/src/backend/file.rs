//! A namespace on a regular file or a block device.
//!
//! The fast path is O_DIRECT through io_uring (see `uring.rs`): no page-cache copy and
//! no thread per request. Either piece may be missing (io_uring disabled by seccomp or
//! sysctl, a filesystem without O_DIRECT such as older tmpfs), so both are probed at
//! open and the backend falls back to pread/pwrite on tokio's blocking pool and/or
//! buffered I/O. Which path is in use is reported by [`Backend::io_path`], because a
//! silent fallback would make benchmark numbers meaningless.

use super::{check_range, ready_err, AlignedBuf, Backend, BackendError, BackendFuture, IoPath};
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest single read or write.
pub const MAX_REQUEST: u64 = 64 << 20;

// Block-device ioctls (linux/fs.h), for the generic ioctl encoding (x86_64, aarch64).
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;
const BLKDISCARD: libc::Ioctl = 0x1277;
const BLKZEROOUT: libc::Ioctl = 0x127f;

/// Which I/O engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// io_uring if it works here, else blocking pread/pwrite.
    #[default]
    Auto,
    /// io_uring or fail to open.
    IoUring,
    /// Always blocking pread/pwrite on the blocking pool.
    Blocking,
}

/// Options for [`FileBackend::open`].
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// Logical block size; default: the device's logical sector size for block
    /// devices, 4096 for regular files.
    pub block_size: Option<u32>,
    /// I/O engine.
    pub io: IoMode,
    /// Try O_DIRECT (falls back to buffered I/O if the filesystem refuses it).
    pub direct: bool,
    /// If the path does not exist, create a regular file of this size.
    pub create_size: Option<u64>,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            block_size: None,
            io: IoMode::Auto,
            direct: true,
            create_size: None,
        }
    }
}

/// A namespace backed by a file or a block device.
#[derive(Debug)]
pub struct FileBackend {
    path: PathBuf,
    file: Arc<File>,
    size: u64,
    block_size: u32,
    is_block_device: bool,
    direct: bool,
    volatile_cache: bool,
    #[cfg(target_os = "linux")]
    ring: Option<super::uring::Ring>,
    fallback_reason: String,
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> BackendError {
    BackendError::Io {
        op,
        what: path.display().to_string(),
        source,
    }
}

impl FileBackend {
    /// Open `path` (a regular file or a block device) read-write.
    pub fn open(path: impl AsRef<Path>, opts: &FileOptions) -> Result<Self, BackendError> {
        let path = path.as_ref().to_path_buf();
        if let Some(sz) = opts.create_size {
            if !path.exists() {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| io_err("create", &path, e))?;
                f.set_len(sz).map_err(|e| io_err("set_len", &path, e))?;
            }
        }
        let meta = std::fs::metadata(&path).map_err(|e| io_err("stat", &path, e))?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            return Err(BackendError::Config(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        }
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&path)
        };
        let (mut file, mut direct) = if opts.direct {
            match open(true) {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    (open(false).map_err(|e| io_err("open", &path, e))?, false)
                }
                Err(e) => return Err(io_err("open", &path, e)),
            }
        } else {
            (open(false).map_err(|e| io_err("open", &path, e))?, false)
        };

        let (raw_size, dev_block) = if is_block_device {
            let mut bytes: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a
            // live local.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut bytes) };
            if rc != 0 {
                return Err(io_err(
                    "BLKGETSIZE64",
                    &path,
                    std::io::Error::last_os_error(),
                ));
            }
            let mut ss: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int through the pointer, a live local.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut ss) };
            if rc != 0 {
                return Err(io_err("BLKSSZGET", &path, std::io::Error::last_os_error()));
            }
            (bytes, u32::try_from(ss).unwrap_or(512))
        } else {
            (meta.len(), 4096)
        };
        let block_size = opts.block_size.unwrap_or(dev_block);
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(BackendError::Config(format!(
                "block size {block_size} is not a power of two between 512 and 65536"
            )));
        }
        if is_block_device && block_size < dev_block {
            return Err(BackendError::Config(format!(
                "block size {block_size} is below the device's logical block size {dev_block}"
            )));
        }
        let size = raw_size - raw_size % u64::from(block_size);
        if size == 0 {
            return Err(BackendError::Config(format!(
                "{} holds less than one {block_size}-byte block",
                path.display()
            )));
        }

        // Probe O_DIRECT with a block-sized read at a block-aligned (not page-aligned,
        // when the block is small) offset: some filesystems accept the open flag but
        // refuse I/O at that granularity.
        if direct {
            let probe_at = if size >= 2 * u64::from(block_size) {
                u64::from(block_size)
            } else {
                0
            };
            let mut buf = AlignedBuf::zeroed(usize::try_from(block_size).unwrap_or(4096));
            if let Err(e) = file.read_exact_at(buf.as_mut_slice(), probe_at) {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    file = open(false).map_err(|e| io_err("open", &path, e))?;
                    direct = false;
                } else {
                    return Err(io_err("read", &path, e));
                }
            }
        }

        let volatile_cache = !direct || !is_block_device || block_device_write_back(&meta);
        let file = Arc::new(file);
        let mut fallback_reason = String::from("blocking mode requested");
        #[cfg(target_os = "linux")]
        let ring = match opts.io {
            IoMode::Blocking => None,
            IoMode::Auto | IoMode::IoUring => {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                match super::uring::Ring::start(Arc::clone(&file), &name) {
                    Ok(r) => Some(r),
                    Err(e) if opts.io == IoMode::Auto => {
                        fallback_reason = format!("io_uring unavailable: {e}");
                        None
                    }
                    Err(e) => return Err(io_err("io_uring setup", &path, e)),
                }
            }
        };
        #[cfg(not(target_os = "linux"))]
        {
            if opts.io == IoMode::IoUring {
                return Err(BackendError::Config("io_uring needs Linux".into()));
            }
            fallback_reason = "io_uring needs Linux".into();
        }
        Ok(Self {
            path,
            file,
            size,
            block_size,
            is_block_device,
            direct,
            volatile_cache,
            #[cfg(target_os = "linux")]
            ring,
            fallback_reason,
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        check_range(offset, len, self.block_size, self.size)?;
        if len > MAX_REQUEST {
            return Err(BackendError::TooLarge {
                len,
                max: MAX_REQUEST,
            });
        }
        Ok(())
    }

    fn err(&self, op: &'static str, e: std::io::Error) -> BackendError {
        io_err(op, &self.path, e)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, BackendError> {
        let file = Arc::clone(&self.file);
        match tokio::task::spawn_blocking(move || f(&file)).await {
            Ok(r) => r.map_err(|e| self.err(op, e)),
            Err(_) => Err(BackendError::WorkerGone),
        }
    }

    async fn zero_by_writing(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        const STEP: u64 = 1 << 20;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = STEP.min(end - pos);
            let buf = Bytes::from(vec![0u8; usize::try_from(n).unwrap_or(0)]);
            self.write_at(pos, buf).await?;
            pos += n;
        }
        Ok(())
    }

    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes, BackendError> {
        let ulen = usize::try_from(len).map_err(|_| BackendError::TooLarge {
            len,
            max: MAX_REQUEST,
        })?;
        let buf = AlignedBuf::zeroed(ulen);
        #[cfg(target_os = "linux")]
        if let Some(ring) = &self.ring {
            let (tx, rx) = tokio::sync::oneshot::channel();
            ring.submit(super::uring::Op::Read {
                offset,
                buf,
                done: tx,
            })
            .map_err(|_| BackendError::WorkerGone)?;
            let buf = rx
                .await
                .map_err(|_| BackendError::WorkerGone)?
                .map_err(|e| self.err("read", e))?;
            return Ok(Bytes::from_owner(buf));
        }
        let buf = self
            .blocking("read", move |f| {
                let mut buf = buf;
                f.read_exact_at(buf.as_mut_slice(), offset).map(|()| buf)
            })
            .await?;
        Ok(Bytes::from_owner(buf))
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> Result<(), BackendError> {
        let buf = AlignedBuf::copy_from(&data);
        drop(data);
        #[cfg(target_os = "linux")]
        if let Some(ring) = &self.ring {
            let (tx, rx) = tokio::sync::oneshot::channel();
            ring.submit(super::uring::Op::Write {
                offset,
                buf,
                done: tx,
            })
            .map_err(|_| BackendError::WorkerGone)?;
            return rx
                .await
                .map_err(|_| BackendError::WorkerGone)?
                .map_err(|e| self.err("write", e));
        }
        self.blocking("write", move |f| f.write_all_at(buf.as_slice(), offset))
            .await
    }

    async fn flush_all(&self) -> Result<(), BackendError> {
        #[cfg(target_os = "linux")]
        if let Some(ring) = &self.ring {
            let (tx, rx) = tokio::sync::oneshot::channel();
            ring.submit(super::uring::Op::Fsync { done: tx })
                .map_err(|_| BackendError::WorkerGone)?;
            return rx
                .await
                .map_err(|_| BackendError::WorkerGone)?
                .map_err(|e| self.err("fdatasync", e));
        }
        self.blocking("fdatasync", |f| f.sync_data()).await
    }

    async fn zeroes(&self, offset: u64, len: u64, punch: bool) -> Result<(), BackendError> {
        if len == 0 {
            return Ok(());
        }
        let ilen = i64::try_from(len).map_err(|_| BackendError::TooLarge {
            len,
            max: i64::MAX.unsigned_abs(),
        })?;
        let ioff = i64::try_from(offset).map_err(|_| BackendError::OutOfRange {
            offset,
            len,
            size: self.size,
        })?;
        let is_bdev = self.is_block_device;
        let res = self
            .blocking(
                if punch { "deallocate" } else { "write zeroes" },
                move |f| {
                    let fd = f.as_raw_fd();
                    let rc = if is_bdev {
                        let range: [u64; 2] = [offset, len];
                        let req = if punch { BLKDISCARD } else { BLKZEROOUT };
                        // SAFETY: BLKDISCARD/BLKZEROOUT read a [u64; 2] from the pointer,
                        // which points to a live local array.
                        unsafe { libc::ioctl(fd, req, range.as_ptr()) }
                    } else {
                        let mode = libc::FALLOC_FL_KEEP_SIZE
                            | if punch {
                                libc::FALLOC_FL_PUNCH_HOLE
                            } else {
                                libc::FALLOC_FL_ZERO_RANGE
                            };
                        // SAFETY: fallocate on a descriptor we own, with checked offsets.
                        unsafe { libc::fallocate(fd, mode, ioff, ilen) }
                    };
                    if rc == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                },
            )
            .await;
        match res {
            Ok(()) => Ok(()),
            Err(BackendError::Io { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL)
                ) =>
            {
                // No hole punching / zeroing support: a block-device discard is
                // advisory (we do not promise zeroes after it); anything else writes.
                if punch && is_bdev {
                    Ok(())
                } else {
                    self.zero_by_writing(offset, len).await
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// Whether a block device reports a write-back (volatile) cache in sysfs; unknown
/// counts as volatile.
fn block_device_write_back(meta: &std::fs::Metadata) -> bool {
    let rdev = meta.rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    match std::fs::read_to_string(format!("/sys/dev/block/{maj}:{min}/queue/write_cache")) {
        Ok(s) => s.trim() != "write through",
        Err(_) => true,
    }
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn volatile_write_cache(&self) -> bool {
        self.volatile_cache
    }
    fn deallocate_reads_zeroes(&self) -> bool {
        !self.is_block_device
    }
    fn io_path(&self) -> IoPath {
        #[cfg(target_os = "linux")]
        if self.ring.is_some() {
            return IoPath::IoUring {
                direct: self.direct,
            };
        }
        IoPath::Blocking {
            direct: self.direct,
            reason: self.fallback_reason.clone(),
        }
    }
    fn describe(&self) -> String {
        format!(
            "{} {} ({} bytes, {})",
            if self.is_block_device {
                "block device"
            } else {
                "file"
            },
            self.path.display(),
            self.size,
            self.io_path()
        )
    }
    fn read(&self, offset: u64, len: u64) -> BackendFuture<'_, Bytes> {
        if let Err(e) = self.check(offset, len) {
            return ready_err(e);
        }
        Box::pin(self.read_at(offset, len))
    }
    fn write(&self, offset: u64, data: Bytes) -> BackendFuture<'_, ()> {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        if let Err(e) = self.check(offset, len) {
            return ready_err(e);
        }
        Box::pin(self.write_at(offset, data))
    }
    fn flush(&self) -> BackendFuture<'_, ()> {
        Box::pin(self.flush_all())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> BackendFuture<'_, ()> {
        if let Err(e) = check_range(offset, len, self.block_size, self.size) {
            return ready_err(e);
        }
        Box::pin(self.zeroes(offset, len, false))
    }
    fn deallocate(&self, offset: u64, len: u64) -> BackendFuture<'_, ()> {
        if let Err(e) = check_range(offset, len, self.block_size, self.size) {
            return ready_err(e);
        }
        Box::pin(self.zeroes(offset, len, true))
    }
}
