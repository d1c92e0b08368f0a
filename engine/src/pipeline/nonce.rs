//! GCM nonces: (writer epoch, counter), never repeated under one key.
//!
//! A repeated nonce under AES-GCM leaks the XOR of two plaintexts and the GHASH key, so
//! uniqueness cannot rest on "the counter was probably saved". Each time a volume is
//! opened for writing, the allocator takes the next writer epoch and makes it durable
//! *before* it hands out the first nonce; within the epoch a 64-bit counter counts up in
//! memory and is never saved. A crash loses at most the rest of an epoch's counter
//! space, never uniqueness. Epoch allocation happens at volume open, on the control
//! path, which is why [`EpochStore`] may block.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::crc::crc32c;
use super::PipelineError;

/// A 96-bit GCM nonce: 32-bit writer epoch, 64-bit counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce {
    /// The writer epoch (durable before use).
    pub epoch: u32,
    /// The record counter within the epoch.
    pub counter: u64,
}

impl Nonce {
    /// The 12 nonce bytes: epoch little-endian then counter little-endian (also the
    /// bytes stored in the record header).
    pub fn to_bytes(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&self.epoch.to_le_bytes());
        b[4..].copy_from_slice(&self.counter.to_le_bytes());
        b
    }

    /// Inverse of [`Nonce::to_bytes`].
    pub fn from_bytes(b: [u8; 12]) -> Self {
        let mut e = [0u8; 4];
        e.copy_from_slice(&b[..4]);
        let mut c = [0u8; 8];
        c.copy_from_slice(&b[4..]);
        Self {
            epoch: u32::from_le_bytes(e),
            counter: u64::from_le_bytes(c),
        }
    }
}

/// Durable storage of the last writer epoch of one volume key.
pub trait EpochStore {
    /// The last epoch persisted, or `None` if the key has never been written with.
    fn load(&mut self) -> Result<Option<u32>, PipelineError>;
    /// Makes `epoch` the last epoch. Must not return `Ok` before the value survives a
    /// crash or power loss.
    fn persist(&mut self, epoch: u32) -> Result<(), PipelineError>;
}

/// Hands out nonces for one writer session of one volume key.
#[derive(Debug)]
pub struct NonceAllocator {
    epoch: u32,
    next: Option<u64>,
}

impl NonceAllocator {
    /// Starts a writer session: takes the epoch after the last persisted one and makes
    /// it durable before returning.
    pub fn open(store: &mut dyn EpochStore) -> Result<Self, PipelineError> {
        let epoch = match store.load()? {
            None => 0,
            Some(last) => last.checked_add(1).ok_or(PipelineError::EpochExhausted)?,
        };
        store.persist(epoch)?;
        Ok(Self {
            epoch,
            next: Some(0),
        })
    }

    /// This session's epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The next unused nonce.
    pub fn next_nonce(&mut self) -> Result<Nonce, PipelineError> {
        let counter = self
            .next
            .ok_or(PipelineError::NonceExhausted { epoch: self.epoch })?;
        self.next = counter.checked_add(1);
        Ok(Nonce {
            epoch: self.epoch,
            counter,
        })
    }

    #[cfg(test)]
    pub(crate) fn with_counter(epoch: u32, next: u64) -> Self {
        Self {
            epoch,
            next: Some(next),
        }
    }
}

/// An in-memory epoch store: for tests, and for volumes whose key itself lives only in
/// memory (a key that dies with the process cannot outlive its epochs).
#[derive(Debug, Default, Clone)]
pub struct MemoryEpochStore {
    last: Option<u32>,
    /// When set, the next `persist` fails (to test that no nonce escapes a failed persist).
    pub fail_next_persist: bool,
}

impl MemoryEpochStore {
    /// A store that has never persisted an epoch.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose last epoch is `last` (e.g. to test exhaustion).
    pub fn with_last(last: u32) -> Self {
        Self {
            last: Some(last),
            fail_next_persist: false,
        }
    }
}

impl EpochStore for MemoryEpochStore {
    fn load(&mut self) -> Result<Option<u32>, PipelineError> {
        Ok(self.last)
    }

    fn persist(&mut self, epoch: u32) -> Result<(), PipelineError> {
        if std::mem::take(&mut self.fail_next_persist) {
            return Err(PipelineError::EpochStore("injected persist failure".into()));
        }
        self.last = Some(epoch);
        Ok(())
    }
}

/// An epoch store in a local file, replaced atomically (write, fsync, rename, fsync
/// directory). File content: 4-byte LE epoch then 4-byte LE crc32c of those 4 bytes.
#[derive(Debug, Clone)]
pub struct FileEpochStore {
    path: PathBuf,
}

impl FileEpochStore {
    /// A store kept at `path`.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
        }
    }
}

fn io_err(what: &str, path: &Path, e: &std::io::Error) -> PipelineError {
    PipelineError::EpochStore(format!("{what} {}: {e}", path.display()))
}

impl EpochStore for FileEpochStore {
    fn load(&mut self) -> Result<Option<u32>, PipelineError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &self.path, &e)),
        };
        let arr: [u8; 8] = bytes.as_slice().try_into().map_err(|_| {
            PipelineError::EpochStore(format!("{}: not 8 bytes", self.path.display()))
        })?;
        let mut e = [0u8; 4];
        e.copy_from_slice(&arr[..4]);
        let mut c = [0u8; 4];
        c.copy_from_slice(&arr[4..]);
        if crc32c(&e) != u32::from_le_bytes(c) {
            return Err(PipelineError::EpochStore(format!(
                "{}: crc mismatch",
                self.path.display()
            )));
        }
        Ok(Some(u32::from_le_bytes(e)))
    }

    fn persist(&mut self, epoch: u32) -> Result<(), PipelineError> {
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let e = epoch.to_le_bytes();
        let mut content = [0u8; 8];
        content[..4].copy_from_slice(&e);
        content[4..].copy_from_slice(&crc32c(&e).to_le_bytes());
        let mut f = fs::File::create(&tmp).map_err(|err| io_err("create", &tmp, &err))?;
        f.write_all(&content)
            .and_then(|()| f.sync_all())
            .map_err(|err| io_err("write", &tmp, &err))?;
        fs::rename(&tmp, &self.path).map_err(|err| io_err("rename", &self.path, &err))?;
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|err| io_err("fsync directory", dir, &err))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_exhaustion_is_an_error_not_a_wrap() {
        let mut a = NonceAllocator::with_counter(7, u64::MAX);
        assert_eq!(
            a.next_nonce(),
            Ok(Nonce {
                epoch: 7,
                counter: u64::MAX
            })
        );
        assert_eq!(
            a.next_nonce(),
            Err(PipelineError::NonceExhausted { epoch: 7 })
        );
        assert_eq!(
            a.next_nonce(),
            Err(PipelineError::NonceExhausted { epoch: 7 })
        );
    }

    #[test]
    fn nonce_bytes_round_trip() {
        let n = Nonce {
            epoch: 0x0102_0304,
            counter: 0x0506_0708_090a_0b0c,
        };
        assert_eq!(n.to_bytes(), [4, 3, 2, 1, 0x0c, 0x0b, 0x0a, 9, 8, 7, 6, 5]);
        assert_eq!(Nonce::from_bytes(n.to_bytes()), n);
    }
}
