//! Records: the unit the write path seals and the read path opens.
//!
//! Two kinds share one header: data records (the blocks of one write) and zero records
//! (a durable "these blocks read as zeroes", written by deallocate and write zeroes so
//! that log replay after a crash cannot resurrect data the host removed). A zero record
//! has no payload but an AES-256-GCM tag when the volume is encrypted, so a node cannot
//! forge one.
//!
//! A record is the blocks of one write (up to the profile's compression unit), stored as
//! a 48-byte self-describing header followed by the payload. The header lets the tail of
//! a segment be replayed with no other metadata; the crc lets a reader reject bytes a
//! node or the wire damaged before spending an AEAD open on them; the AAD binds the
//! ciphertext to its volume, LBA and generation so that moving or replaying a record
//! fails authentication. Byte layout: docs/format.md, section "Record".
//!
//! Opening treats the input as hostile: every length is checked before use, nothing
//! panics, and no byte of a record that failed a check reaches the caller.

use super::compress::{worthwhile_limit, Algorithm, Codec, Compression};
use super::crc::{crc32c, crc32c_append};
use super::keys::{AeadKey, DataKey, TAG_LEN};
use super::nonce::{Nonce, NonceAllocator};
use super::{PipelineError, VolumeId};

/// Logical block size.
pub const BLOCK_SIZE: usize = 4096;
/// Record header size.
pub const HEADER_LEN: usize = 48;
/// Record magic, "DPUR".
pub const MAGIC: [u8; 4] = *b"DPUR";
/// The record format version this build writes and reads.
pub const FORMAT_VERSION: u8 = 2;
/// Largest record: 256 blocks (1 MiB). Bounds what a header can make a reader allocate.
pub const MAX_RECORD_BLOCKS: u16 = 256;

const FLAG_ALG_MASK: u8 = 0b0000_0011;
const FLAG_ENCRYPTED: u8 = 0b0000_0100;
const FLAG_ZEROES: u8 = 0b0000_1000;
const FLAG_KNOWN: u8 = FLAG_ALG_MASK | FLAG_ENCRYPTED | FLAG_ZEROES;
/// Bytes of the header covered by AAD and crc (everything before the crc field).
const CRC_OFFSET: usize = 44;
/// AAD: volume id then header bytes 0..44.
const AAD_LEN: usize = 16 + CRC_OFFSET;

/// The AAD of a record: the volume id, then header bytes 0..44 (everything but the crc).
fn aad(volume: &VolumeId, header: &[u8]) -> [u8; AAD_LEN] {
    let mut aad = [0u8; AAD_LEN];
    aad[..16].copy_from_slice(&volume.0);
    aad[16..].copy_from_slice(&header[..CRC_OFFSET]);
    aad
}

/// The crc32c of a record: over the volume id, header bytes 0..44 and the payload.
pub fn record_crc(volume: &VolumeId, header: &[u8], payload: &[u8]) -> u32 {
    crc32c_append(crc32c_append(crc32c(&volume.0), header), payload)
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// How the payload was compressed.
    pub algorithm: Algorithm,
    /// Whether the payload is AES-256-GCM ciphertext plus tag.
    pub encrypted: bool,
    /// Number of 4 KiB blocks of data in the record (1..=MAX_RECORD_BLOCKS; 0 for a
    /// zero record).
    pub block_count: u16,
    /// For a zero record, how many blocks from `first_lba` read as zeroes (else 0).
    pub zero_blocks: u32,
    /// LBA of the first block.
    pub first_lba: u64,
    /// Generation of the write (the map's version of these LBAs).
    pub generation: u64,
    /// Bytes after the header.
    pub payload_len: u32,
    /// GCM nonce (zero when not encrypted).
    pub nonce: Nonce,
    /// crc32c over the volume id, header bytes 0..44 and the payload (seeding with the
    /// volume id makes another volume's stale record fail the crc during replay).
    pub crc: u32,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl RecordHeader {
    /// Whether this is a zero record (a range that reads as zeroes, no data).
    pub fn is_zeroes(&self) -> bool {
        self.zero_blocks != 0
    }

    /// Uncompressed size of the record's data.
    pub fn raw_len(&self) -> usize {
        usize::from(self.block_count) * BLOCK_SIZE
    }

    /// Header plus payload.
    pub fn record_len(&self) -> usize {
        // payload_len is bounded by decode (at most ~1 MiB), so this cannot overflow.
        HEADER_LEN.saturating_add(usize::try_from(self.payload_len).unwrap_or(usize::MAX))
    }

    /// The 48 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4] = FORMAT_VERSION;
        h[5] = self.algorithm.code()
            | if self.encrypted { FLAG_ENCRYPTED } else { 0 }
            | if self.is_zeroes() { FLAG_ZEROES } else { 0 };
        h[6..8].copy_from_slice(&self.block_count.to_le_bytes());
        h[8..16].copy_from_slice(&self.first_lba.to_le_bytes());
        h[16..24].copy_from_slice(&self.generation.to_le_bytes());
        h[24..28].copy_from_slice(&self.payload_len.to_le_bytes());
        h[28..40].copy_from_slice(&self.nonce.to_bytes());
        h[40..44].copy_from_slice(&self.zero_blocks.to_le_bytes());
        h[44..48].copy_from_slice(&self.crc.to_le_bytes());
        h
    }

    /// Parses and checks a header from the start of `bytes` (which may be longer). Checks
    /// everything the header alone can tell; the crc needs the payload (see
    /// [`RecordPipeline::open`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, PipelineError> {
        if bytes.len() < HEADER_LEN {
            return Err(PipelineError::Truncated {
                needed: HEADER_LEN,
                have: bytes.len(),
            });
        }
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&bytes[..4]);
        if magic != MAGIC {
            return Err(PipelineError::BadMagic { found: magic });
        }
        if bytes[4] != FORMAT_VERSION {
            return Err(PipelineError::UnsupportedVersion {
                found: bytes[4],
                supported: FORMAT_VERSION,
            });
        }
        let flags = bytes[5];
        if flags & !FLAG_KNOWN != 0 {
            return Err(PipelineError::BadHeader("unknown flag bits set"));
        }
        let algorithm = Algorithm::from_code(flags & FLAG_ALG_MASK)
            .ok_or(PipelineError::BadHeader("unknown compression algorithm"))?;
        let encrypted = flags & FLAG_ENCRYPTED != 0;
        let zeroes = flags & FLAG_ZEROES != 0;
        let block_count = le_u16(bytes, 6);
        let zero_blocks = le_u32(bytes, 40);
        let first_lba = le_u64(bytes, 8);
        if zeroes {
            if block_count != 0 || zero_blocks == 0 || algorithm != Algorithm::None {
                return Err(PipelineError::BadHeader("inconsistent zero record"));
            }
            if first_lba.checked_add(u64::from(zero_blocks)).is_none() {
                return Err(PipelineError::BadHeader("LBA range overflows"));
            }
        } else {
            if block_count == 0 || block_count > MAX_RECORD_BLOCKS {
                return Err(PipelineError::BadHeader("block count out of range"));
            }
            if zero_blocks != 0 {
                return Err(PipelineError::BadHeader("zero count set on a data record"));
            }
            if first_lba.checked_add(u64::from(block_count)).is_none() {
                return Err(PipelineError::BadHeader("LBA range overflows"));
            }
        }
        let generation = le_u64(bytes, 16);
        let payload_len = le_u32(bytes, 24);
        let mut nonce_bytes = [0u8; 12];
        nonce_bytes.copy_from_slice(&bytes[28..40]);
        let nonce = Nonce::from_bytes(nonce_bytes);
        if !encrypted && nonce_bytes != [0u8; 12] {
            return Err(PipelineError::BadHeader(
                "nonce set on an unencrypted record",
            ));
        }
        let crc = le_u32(bytes, 44);
        let header = Self {
            algorithm,
            encrypted,
            block_count,
            zero_blocks,
            first_lba,
            generation,
            payload_len,
            nonce,
            crc,
        };
        let body = usize::try_from(payload_len)
            .ok()
            .and_then(|p| p.checked_sub(if encrypted { TAG_LEN } else { 0 }))
            .ok_or(PipelineError::BadHeader("payload shorter than the GCM tag"))?;
        let raw = header.raw_len();
        let body_ok = match algorithm {
            Algorithm::None if zeroes => body == 0,
            Algorithm::None => body == raw,
            // A compressed body is stored only if it saved 1/8; an empty one is impossible.
            Algorithm::Zstd | Algorithm::Lz4 => body > 0 && body <= worthwhile_limit(raw),
        };
        if !body_ok {
            return Err(PipelineError::BadHeader(
                "payload length inconsistent with block count and compression",
            ));
        }
        Ok(header)
    }
}

/// The nonce of the next record: a fresh one from the writer session when the volume
/// is encrypted (none without a session: only a writer may seal), a zero placeholder
/// otherwise (unencrypted records carry no nonce).
fn draw_nonce(
    encrypted: bool,
    nonces: Option<&mut NonceAllocator>,
) -> Result<Nonce, PipelineError> {
    if encrypted {
        Ok(nonces.ok_or(PipelineError::NotWriter)?.next_nonce()?)
    } else {
        Ok(Nonce {
            epoch: 0,
            counter: 0,
        })
    }
}

/// Appends one record to `out`: `header`, then `body` (sealed under `key` with the
/// header as AAD when there is one, straight from `body` into `out`: one pass over the
/// data instead of a copy followed by in-place encryption), then the crc over both in
/// the header. On an error `out` is left as it was.
fn append_record(
    volume: &VolumeId,
    key: Option<&AeadKey>,
    header: RecordHeader,
    body: &[u8],
    out: &mut Vec<u8>,
) -> Result<Sealed, PipelineError> {
    let payload_len = usize::try_from(header.payload_len)
        .map_err(|_| PipelineError::BadHeader("payload length"))?;
    let offset = out.len();
    out.reserve(HEADER_LEN + payload_len);
    out.extend_from_slice(&header.encode());
    if let Some(key) = key {
        let aad = aad(volume, &out[offset..offset + HEADER_LEN]);
        out.resize(offset + HEADER_LEN + payload_len, 0);
        if let Err(e) = key.seal_into(
            header.nonce.to_bytes(),
            &aad,
            body,
            &mut out[offset + HEADER_LEN..],
        ) {
            out.truncate(offset);
            return Err(e);
        }
    } else {
        out.extend_from_slice(body);
    }
    let crc = record_crc(
        volume,
        &out[offset..offset + CRC_OFFSET],
        &out[offset + HEADER_LEN..],
    );
    out[offset + CRC_OFFSET..offset + HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(Sealed {
        offset,
        len: out.len() - offset,
        header: RecordHeader { crc, ..header },
    })
}

/// Where the map says a record belongs; opening checks the header against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// First LBA the record must cover.
    pub first_lba: u64,
    /// Generation the record must carry.
    pub generation: u64,
}

/// Where a sealed record landed in the output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// Offset of the record's first byte in the output buffer.
    pub offset: usize,
    /// Record length (header plus payload).
    pub len: usize,
    /// The header as written.
    pub header: RecordHeader,
}

/// One volume's record transforms, with reusable contexts and scratch buffers. Owned by
/// the volume's reactor; `&mut self` because the contexts are stateful.
#[derive(Debug)]
pub struct RecordPipeline {
    volume: VolumeId,
    codec: Codec,
    key: Option<AeadKey>,
    nonces: Option<NonceAllocator>,
    scratch: Vec<u8>,
}

impl RecordPipeline {
    /// A pipeline for `volume`. With a key, records are encrypted; sealing also needs a
    /// writer session's `nonces` (without one the pipeline can only open records).
    pub fn new(
        volume: VolumeId,
        compression: Compression,
        key: Option<&DataKey>,
        nonces: Option<NonceAllocator>,
    ) -> Result<Self, PipelineError> {
        let key = key.map(|k| AeadKey::new(k.expose())).transpose()?;
        Ok(Self {
            volume,
            codec: Codec::new(compression)?,
            key,
            nonces,
            scratch: Vec::new(),
        })
    }

    /// The volume this pipeline serves.
    pub fn volume(&self) -> VolumeId {
        self.volume
    }

    /// Seals `data` (whole blocks starting at `first_lba`) and appends the record to
    /// `out`, which may already hold earlier records of the same strip.
    pub fn seal(
        &mut self,
        first_lba: u64,
        generation: u64,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Sealed, PipelineError> {
        let bad_len = || PipelineError::BadRecordLength {
            len: data.len(),
            max_blocks: MAX_RECORD_BLOCKS,
            block: BLOCK_SIZE,
        };
        if data.is_empty() || data.len() % BLOCK_SIZE != 0 {
            return Err(bad_len());
        }
        let block_count = u16::try_from(data.len() / BLOCK_SIZE)
            .ok()
            .filter(|&b| b <= MAX_RECORD_BLOCKS)
            .ok_or_else(bad_len)?;
        if first_lba.checked_add(u64::from(block_count)).is_none() {
            return Err(PipelineError::BadHeader("LBA range overflows"));
        }

        let (algorithm, body) = match self.codec.compress(data)? {
            Some((alg, packed)) => (alg, packed),
            None => (Algorithm::None, data),
        };
        let body_len = body.len();

        let encrypted = self.key.is_some();
        let nonce = draw_nonce(encrypted, self.nonces.as_mut())?;
        let payload_len = body_len + if encrypted { TAG_LEN } else { 0 };
        let header = RecordHeader {
            algorithm,
            encrypted,
            block_count,
            zero_blocks: 0,
            first_lba,
            generation,
            payload_len: u32::try_from(payload_len).map_err(|_| bad_len())?,
            nonce,
            crc: 0,
        };
        append_record(&self.volume, self.key.as_ref(), header, body, out)
    }

    /// Seals a zero record: blocks `first_lba..first_lba + blocks` read as zeroes from
    /// `generation` on. Appends it to `out` like [`RecordPipeline::seal`].
    pub fn seal_zeroes(
        &mut self,
        first_lba: u64,
        generation: u64,
        blocks: u32,
        out: &mut Vec<u8>,
    ) -> Result<Sealed, PipelineError> {
        if blocks == 0 || first_lba.checked_add(u64::from(blocks)).is_none() {
            return Err(PipelineError::BadHeader("bad zero range"));
        }
        let encrypted = self.key.is_some();
        let nonce = draw_nonce(encrypted, self.nonces.as_mut())?;
        let payload_len = if encrypted { TAG_LEN } else { 0 };
        let header = RecordHeader {
            algorithm: Algorithm::None,
            encrypted,
            block_count: 0,
            zero_blocks: blocks,
            first_lba,
            generation,
            payload_len: u32::try_from(payload_len).unwrap_or(0),
            nonce,
            crc: 0,
        };
        append_record(&self.volume, self.key.as_ref(), header, &[], out)
    }

    /// Verifies and opens one stored record (exactly its bytes), writing its blocks to
    /// `out` (replacing its contents). With `expected`, a record for another LBA or
    /// generation is rejected; without it (log replay), the header's claims are
    /// authenticated but not compared with anything.
    pub fn open(
        &mut self,
        stored: &[u8],
        expected: Option<Expected>,
        out: &mut Vec<u8>,
    ) -> Result<RecordHeader, PipelineError> {
        let header = RecordHeader::decode(stored)?;
        let total = header.record_len();
        if stored.len() < total {
            return Err(PipelineError::Truncated {
                needed: total,
                have: stored.len(),
            });
        }
        if stored.len() > total {
            return Err(PipelineError::BadHeader(
                "bytes after the record's declared end",
            ));
        }
        let payload = &stored[HEADER_LEN..];
        let computed = record_crc(&self.volume, &stored[..CRC_OFFSET], payload);
        if computed != header.crc {
            return Err(PipelineError::CrcMismatch {
                stored: header.crc,
                computed,
            });
        }
        if let Some(e) = expected {
            if e.first_lba != header.first_lba || e.generation != header.generation {
                return Err(PipelineError::Misplaced {
                    found_lba: header.first_lba,
                    found_generation: header.generation,
                    expected_lba: e.first_lba,
                    expected_generation: e.generation,
                });
            }
        }
        let label = |enc: bool| if enc { "encrypted" } else { "plain" };
        if header.encrypted != self.key.is_some() {
            return Err(PipelineError::EncryptionMismatch {
                record: label(header.encrypted),
                volume: label(self.key.is_some()),
            });
        }
        out.clear();
        if let Err(e) = self.open_payload(&header, stored, out) {
            // Nothing from a record that failed verification reaches the caller.
            out.clear();
            return Err(e);
        }
        Ok(header)
    }

    /// Decrypts and decompresses a verified record's payload into `out` (empty on entry).
    fn open_payload(
        &mut self,
        header: &RecordHeader,
        stored: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), PipelineError> {
        let raw_len = header.raw_len();
        let payload = &stored[HEADER_LEN..];
        match (&self.key, header.algorithm) {
            (None, alg) => {
                out.resize(raw_len, 0);
                self.codec.decompress(alg, payload, out)
            }
            (Some(key), Algorithm::None) => {
                out.extend_from_slice(payload);
                let aad = aad(&self.volume, stored);
                let n = key.open_in_place(header.nonce.to_bytes(), &aad, out.as_mut_slice())?;
                if n != raw_len {
                    return Err(PipelineError::BadHeader("decrypted length mismatch"));
                }
                out.truncate(raw_len);
                Ok(())
            }
            (Some(key), alg) => {
                let aad = aad(&self.volume, stored);
                if self.scratch.len() < payload.len() {
                    self.scratch.resize(payload.len(), 0);
                }
                let buf = &mut self.scratch[..payload.len()];
                buf.copy_from_slice(payload);
                let n = key.open_in_place(header.nonce.to_bytes(), &aad, buf)?;
                out.resize(raw_len, 0);
                self.codec.decompress(alg, &self.scratch[..n], out)
            }
        }
    }
}
