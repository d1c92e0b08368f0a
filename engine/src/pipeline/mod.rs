//! The per-record pipeline: the transforms every write goes through on its way to the
//! nodes, and every read on its way back.
//!
//! Write: compress (kept raw unless it saves 1/8) -> AES-256-GCM seal under a
//! (writer epoch, counter) nonce with the record's identity in the AAD -> crc32c over
//! what is stored -> erasure code or mirror the stripe row the record lands in.
//! Read: crc -> AEAD open -> decompress, or rebuild the strip from k others first.
//!
//! The pieces are separate so the layout layer can fold records into parity as it
//! appends them, and so each library can be measured on its own (benches/benches/
//! pipeline.rs; the choices and their numbers are in docs/dependencies.md). Everything
//! here is synchronous, allocation-light and lock-free: it runs on reactor threads.

pub mod compress;
pub mod crc;
pub mod erasure;
mod error;
mod isal;
pub mod keys;
pub mod nonce;
pub mod record;

pub use compress::{Algorithm, Compression};
pub use erasure::{coder_for, ErasureCoder, IsalCoder, Mirror, ReferenceCoder};
pub use error::PipelineError;
pub use keys::{unwrap_data_key, wrap_data_key, DataKey, Kek, WrappedKey};
pub use nonce::{EpochStore, FileEpochStore, MemoryEpochStore, Nonce, NonceAllocator};
pub use record::{Expected, RecordHeader, RecordPipeline, Sealed, BLOCK_SIZE, HEADER_LEN};

/// A volume's identity as bound into AADs (a UUID's 16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeId(pub [u8; 16]);
