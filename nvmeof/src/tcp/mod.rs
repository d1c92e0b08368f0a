//! The NVMe/TCP transport: PDU codec, digests, and the async framing both the
//! host and the target run on.
//!
//! Decoding is one pure function ([`decode_pdu`]) over a complete byte buffer,
//! used unchanged by the network reader and by the fuzz targets, so what is
//! fuzzed is exactly what faces the network. Every rejection says which field
//! held which value and, through [`PduError::fatal`], which fatal error status
//! and offset the terminating H2CTermReq/C2HTermReq must carry.

mod error;
mod framing;
mod params;
mod pdu;

pub use error::{FatalError, FatalErrorStatus, PduError};
pub use framing::{split, FrameError, PduReader, PduWriter};
pub use params::{ConnectionParams, Direction, Role};
pub use pdu::{
    decode_common_header, decode_pdu, decode_pdu_slice, flags, C2HData, CapsuleCmd, CapsuleResp,
    CommonHeader, EncodedPdu, H2CData, IcReq, IcResp, Pdu, PduType, TermReq, COMMON_HEADER_LEN,
    DIGEST_LEN, ICREQ_LEN, MAX_TERM_PLEN, MIN_MAXH2CDATA, R2T,
};

/// The IANA port for NVMe/TCP I/O controllers.
pub const NVME_TCP_PORT: u16 = 4420;
/// The IANA port for NVMe/TCP discovery controllers.
pub const NVME_TCP_DISCOVERY_PORT: u16 = 8009;

/// CRC32C as NVMe/TCP digests use it (initial value and final XOR all ones,
/// transmitted little endian).
pub fn digest(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[cfg(test)]
mod tests;
