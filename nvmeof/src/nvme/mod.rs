//! The NVMe command set as it travels inside NVMe/TCP capsules.
//!
//! Both ends of this crate (host and target) and the fuzz targets share these
//! types so that an encoding bug shows up as a failed round trip in one place
//! rather than as two programs that happen to agree with each other. Every
//! structure is encoded and decoded field by field into plain byte arrays:
//! no `repr(C)` casts, so no alignment or endianness assumptions and no
//! `unsafe`.

pub mod command;
pub mod fabrics;
pub mod identify;
pub mod io;
pub mod log;
pub mod status;

pub use command::{
    admin_opcode, AdminCommand, CommandError, Completion, Feature, FeatureId, IdentifyCns,
    LogPageId, Sgl, SglType, SubmissionEntry, CQE_SIZE, SQE_SIZE,
};
pub use fabrics::{
    fctype, property, CapRegister, CcRegister, ConnectData, CstsRegister, FabricsCommand,
    PropertySize, VsRegister, CONNECT_DATA_SIZE, DISCOVERY_NQN,
};
pub use identify::{IdentifyController, IdentifyNamespace, LbaFormat, NsIdDescriptor};
pub use io::{io_opcode, DsmRange, IoCommand};
pub use log::{DiscoveryLogEntry, DiscoveryLogHeader, ErrorLogEntry, SmartLog};
pub use status::{Status, StatusCode, StatusCodeType};

/// Size of an Identify data structure and of a memory page in this crate.
pub const IDENTIFY_SIZE: usize = 4096;

/// Little-endian field access on byte slices whose length the caller has
/// already checked. Kept private so that every public decoder validates the
/// buffer length first and reports a proper error.
pub(crate) mod le {
    pub fn u16(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }
    pub fn u32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }
    pub fn u64(b: &[u8], off: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[off..off + 8]);
        u64::from_le_bytes(a)
    }
    pub fn u128(b: &[u8], off: usize) -> u128 {
        let mut a = [0u8; 16];
        a.copy_from_slice(&b[off..off + 16]);
        u128::from_le_bytes(a)
    }
    pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
        b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u128(b: &mut [u8], off: usize, v: u128) {
        b[off..off + 16].copy_from_slice(&v.to_le_bytes());
    }
    pub fn array<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&b[off..off + N]);
        a
    }
}

/// Fixed-width text fields (serial number, model, NQNs).
///
/// NVMe pads ASCII identity strings (SN, MN, FR) with spaces and NQN fields
/// with NUL bytes. Decoding strips the padding of either kind and keeps the
/// text as lossy UTF-8, so that a peer's garbage is visible, not fatal.
pub(crate) mod text {
    /// Writes `s` into `dst`, truncated to its width at a character
    /// boundary, padded with `pad`.
    pub fn put(dst: &mut [u8], s: &str, pad: u8) {
        dst.fill(pad);
        let mut n = s.len().min(dst.len());
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        dst[..n].copy_from_slice(&s.as_bytes()[..n]);
    }
    /// Reads a padded field back: up to the first NUL, without trailing spaces.
    pub fn get(src: &[u8]) -> String {
        let end = src.iter().position(|&c| c == 0).unwrap_or(src.len());
        let end = src[..end]
            .iter()
            .rposition(|&c| c != b' ')
            .map_or(0, |p| p + 1);
        String::from_utf8_lossy(&src[..end]).into_owned()
    }
}
