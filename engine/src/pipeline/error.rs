//! The pipeline layer's one error type. Every variant that can come from bytes read
//! off a node says what was wrong with them, so the read path can tell "reconstruct
//! from other strips" (corruption) apart from "caller bug" (bad arguments).

use thiserror::Error;

/// Errors of the per-record pipeline: sealing, opening, keys, nonces, erasure coding.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PipelineError {
    /// Fewer bytes than a record header, or than the header says the record holds.
    #[error("record truncated: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes the header (or the fixed header size) requires.
        needed: usize,
        /// Bytes supplied.
        have: usize,
    },
    /// The first four bytes are not the record magic.
    #[error("bad record magic {found:02x?}")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// A record format version this build cannot read.
    #[error("unsupported record format version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
        /// The version this build reads and writes.
        supported: u8,
    },
    /// A header field is out of range or inconsistent with another.
    #[error("bad record header: {0}")]
    BadHeader(&'static str),
    /// The stored crc32c does not match the bytes: corruption on the node or the wire.
    #[error("record crc32c mismatch: header says {stored:#010x}, bytes give {computed:#010x}")]
    CrcMismatch {
        /// The crc in the header.
        stored: u32,
        /// The crc computed over the bytes.
        computed: u32,
    },
    /// The record is intact but belongs elsewhere: not the LBA/generation the map expects.
    #[error(
        "record is for LBA {found_lba} generation {found_generation}, expected LBA {expected_lba} generation {expected_generation}"
    )]
    Misplaced {
        /// First LBA in the header.
        found_lba: u64,
        /// Generation in the header.
        found_generation: u64,
        /// First LBA the caller expected.
        expected_lba: u64,
        /// Generation the caller expected.
        expected_generation: u64,
    },
    /// The record's encryption flag does not match the volume's encryption setting.
    #[error("record encryption flag is {record}, but the volume is {volume}")]
    EncryptionMismatch {
        /// "encrypted" or "plain".
        record: &'static str,
        /// "encrypted" or "plain".
        volume: &'static str,
    },
    /// AES-GCM authentication failed: wrong key, wrong AAD (moved/replayed) or tampering.
    #[error("record authentication failed (AES-256-GCM tag mismatch)")]
    AeadFailure,
    /// The (authenticated) payload does not decompress to the block count in the header.
    #[error("record decompression failed: {0}")]
    Decompress(String),
    /// Compression library failure while sealing (not "did not shrink", which stores raw).
    #[error("compression failed: {0}")]
    Compress(String),
    /// Data to seal is not a whole number of blocks within the record size limit.
    #[error("bad record length {len} bytes (must be 1..={max_blocks} whole {block}-byte blocks)")]
    BadRecordLength {
        /// Bytes supplied.
        len: usize,
        /// Largest block count a record may hold.
        max_blocks: u16,
        /// Block size.
        block: usize,
    },
    /// An unrecognised compression setting string.
    #[error("bad compression setting {0:?} (expected off, lz4 or zstd:LEVEL with LEVEL 1..=19)")]
    BadCompressionSetting(String),
    /// Crypto library refused an operation that should not fail (key setup, sealing).
    #[error("crypto failure: {0}")]
    Crypto(&'static str),
    /// Sealing on an encrypted volume without a writer session (no nonce allocator).
    #[error("this pipeline has no writer session (nonce allocator); it can only open records")]
    NotWriter,
    /// A wrapped key blob is malformed or fails to authenticate under the KEK.
    #[error("cannot unwrap data key: {0}")]
    KeyUnwrap(&'static str),
    /// The writer epoch space (u32) is used up: the volume needs a new data key.
    #[error("writer epoch space exhausted; rotate the volume data key")]
    EpochExhausted,
    /// The nonce counter within one epoch is used up (2^64 records).
    #[error("nonce counter exhausted in epoch {epoch}")]
    NonceExhausted {
        /// The epoch whose counter ran out.
        epoch: u32,
    },
    /// The durable epoch store failed; no nonce is handed out without a durable epoch.
    #[error("epoch store: {0}")]
    EpochStore(String),
    /// Bad erasure-code geometry (k, m) or buffer shapes passed by the caller.
    #[error("erasure coding: {0}")]
    ErasureArgs(String),
    /// More strips missing than the code can rebuild.
    #[error("cannot reconstruct: {present} strips present, {needed} needed")]
    TooManyErasures {
        /// Strips supplied.
        present: usize,
        /// Strips the code needs (k).
        needed: usize,
    },
}
