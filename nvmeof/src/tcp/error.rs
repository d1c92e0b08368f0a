//! Why a PDU was rejected, and what the termination PDU must say about it.

use super::pdu::PduType;

/// Fatal Error Status of an H2CTermReq / C2HTermReq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FatalErrorStatus {
    /// 01h: invalid PDU header field (FEI = byte offset of the field).
    InvalidHeaderField,
    /// 02h: PDU sequence error.
    SequenceError,
    /// 03h: header digest error.
    HeaderDigest,
    /// 04h: data transfer out of range.
    DataOutOfRange,
    /// 05h: data transfer limit exceeded (also "R2T limit exceeded").
    DataLimitExceeded,
    /// 06h: unsupported parameter (FEI = byte offset of the field).
    UnsupportedParameter,
    /// Any other value, as received.
    Other(u16),
}

impl FatalErrorStatus {
    /// Wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            Self::InvalidHeaderField => 1,
            Self::SequenceError => 2,
            Self::HeaderDigest => 3,
            Self::DataOutOfRange => 4,
            Self::DataLimitExceeded => 5,
            Self::UnsupportedParameter => 6,
            Self::Other(v) => v,
        }
    }
    /// From the wire value.
    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::InvalidHeaderField,
            2 => Self::SequenceError,
            3 => Self::HeaderDigest,
            4 => Self::DataOutOfRange,
            5 => Self::DataLimitExceeded,
            6 => Self::UnsupportedParameter,
            v => Self::Other(v),
        }
    }
}

/// The FES and FEI a termination request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FatalError {
    /// Fatal error status.
    pub fes: FatalErrorStatus,
    /// Fatal error information: the byte offset of the offending field for
    /// FES 01h/06h, otherwise 0.
    pub fei: u32,
}

/// A PDU that could not be decoded (or encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// The buffer ends before the PDU does; not an error on a stream.
    #[error("incomplete PDU: {needed} bytes needed, {have} present")]
    Incomplete {
        /// Bytes the PDU needs in total (8 until the common header is known).
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// PDU-TYPE is not one NVMe/TCP 1.0 defines.
    #[error("unknown PDU type {0:#04x}")]
    UnknownType(u8),
    /// A known PDU type sent in the wrong direction.
    #[error("{0:?} PDU received in the wrong direction")]
    WrongDirection(PduType),
    /// A header field holds a value the specification forbids.
    #[error("{pdu_type:?}: invalid {field} (byte {offset}) = {value:#x}: {reason}")]
    InvalidField {
        /// PDU type.
        pdu_type: PduType,
        /// Field name as the specification spells it.
        field: &'static str,
        /// Byte offset of the field in the PDU header.
        offset: u32,
        /// Value received.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A value this implementation does not support (e.g. a newer PFV).
    #[error("{pdu_type:?}: unsupported {field} (byte {offset}) = {value:#x}")]
    Unsupported {
        /// PDU type.
        pdu_type: PduType,
        /// Field name.
        field: &'static str,
        /// Byte offset of the field.
        offset: u32,
        /// Value received.
        value: u64,
    },
    /// More data in one PDU than this end accepts.
    #[error("{pdu_type:?}: {len} data bytes exceed the limit of {max}")]
    DataTooLong {
        /// PDU type.
        pdu_type: PduType,
        /// Data bytes announced by PLEN.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Header digest mismatch: the header cannot be trusted.
    #[error("{pdu_type:?}: header digest {received:#010x}, computed {computed:#010x}")]
    HeaderDigest {
        /// PDU type (from the untrusted header).
        pdu_type: PduType,
        /// Digest on the wire.
        received: u32,
        /// Digest computed over the header.
        computed: u32,
    },
    /// Data digest mismatch. The header was sound and the whole PDU was
    /// consumed, so the stream is still in sync: the command (`cccid`) fails,
    /// the connection need not.
    #[error(
        "{pdu_type:?} for command {cccid}: data digest {received:#010x}, computed {computed:#010x}"
    )]
    DataDigest {
        /// PDU type.
        pdu_type: PduType,
        /// Command the data belongs to.
        cccid: u16,
        /// Digest on the wire.
        received: u32,
        /// Digest computed over the data.
        computed: u32,
    },
    /// A PDU arrived that the connection state does not allow (raised by the
    /// host and target state machines, not by the codec).
    #[error("PDU sequence error: {0}")]
    Sequence(&'static str),
}

impl PduError {
    /// The termination status for this error, or `None` when the connection
    /// can carry on (incomplete input, data digest error).
    pub fn fatal(&self) -> Option<FatalError> {
        let (fes, fei) = match self {
            PduError::Incomplete { .. } | PduError::DataDigest { .. } => return None,
            PduError::UnknownType(_) | PduError::WrongDirection(_) => {
                (FatalErrorStatus::InvalidHeaderField, 0)
            }
            PduError::InvalidField { offset, .. } => {
                (FatalErrorStatus::InvalidHeaderField, *offset)
            }
            PduError::Unsupported { offset, .. } => {
                (FatalErrorStatus::UnsupportedParameter, *offset)
            }
            PduError::DataTooLong { .. } => (FatalErrorStatus::DataLimitExceeded, 0),
            PduError::HeaderDigest { .. } => (FatalErrorStatus::HeaderDigest, 0),
            PduError::Sequence(_) => (FatalErrorStatus::SequenceError, 0),
        };
        Some(FatalError { fes, fei })
    }
}
