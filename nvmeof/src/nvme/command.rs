//! Submission and completion queue entries, the SGL data pointer, and the
//! admin commands a fabrics controller needs.
//!
//! A [`SubmissionEntry`] is the raw 64-byte form with every field named; the
//! typed commands ([`AdminCommand`], [`crate::nvme::IoCommand`],
//! [`crate::nvme::FabricsCommand`]) are parsed from it because the opcode alone
//! does not say which command it is: admin and I/O opcodes overlap, so the
//! queue an entry arrived on picks the parser.

use super::le;
use super::status::{Status, StatusCode};

/// Size of a submission queue entry.
pub const SQE_SIZE: usize = 64;
/// Size of a completion queue entry.
pub const CQE_SIZE: usize = 16;

/// Admin command opcodes used over fabrics.
pub mod admin_opcode {
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0A;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0C;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Fabrics command (the FCTYPE byte says which).
    pub const FABRICS: u8 = 0x7F;
}

/// Why an entry could not be turned into a typed command. Each variant maps to
/// the completion status a controller should return ([`CommandError::status`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The opcode is not one this command set defines or supports.
    #[error("invalid opcode {opcode:#04x}")]
    InvalidOpcode {
        /// The opcode received.
        opcode: u8,
    },
    /// A field holds a value the command does not allow.
    #[error("invalid field {field} = {value:#x}")]
    InvalidField {
        /// Field name as the specification spells it.
        field: &'static str,
        /// The value received.
        value: u64,
    },
    /// A Fabrics command type this crate does not implement.
    #[error("unsupported fabrics command type {fctype:#04x}")]
    UnsupportedFabricsType {
        /// The FCTYPE received.
        fctype: u8,
    },
    /// A buffer had the wrong length for the structure decoded from it.
    #[error("{what}: length {got}, expected {expected}")]
    Length {
        /// The structure being decoded.
        what: &'static str,
        /// Bytes given.
        got: usize,
        /// Bytes required.
        expected: usize,
    },
}

impl CommandError {
    /// The completion status a controller returns for this error.
    pub fn status(&self) -> Status {
        match self {
            CommandError::InvalidOpcode { .. } | CommandError::UnsupportedFabricsType { .. } => {
                Status::new(StatusCode::INVALID_OPCODE).dnr()
            }
            CommandError::InvalidField { .. } | CommandError::Length { .. } => {
                Status::new(StatusCode::INVALID_FIELD).dnr()
            }
        }
    }
}

/// SGL descriptor types (upper nibble of byte 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SglType {
    /// 0h: data block.
    DataBlock,
    /// 1h: bit bucket.
    BitBucket,
    /// 2h: segment.
    Segment,
    /// 3h: last segment.
    LastSegment,
    /// 4h: keyed data block (RDMA).
    KeyedDataBlock,
    /// 5h: transport data block (NVMe/TCP: data moves in data PDUs).
    TransportDataBlock,
    /// Any other value.
    Reserved(u8),
}

impl SglType {
    fn from_nibble(v: u8) -> Self {
        match v {
            0 => Self::DataBlock,
            1 => Self::BitBucket,
            2 => Self::Segment,
            3 => Self::LastSegment,
            4 => Self::KeyedDataBlock,
            5 => Self::TransportDataBlock,
            o => Self::Reserved(o),
        }
    }
    fn nibble(self) -> u8 {
        match self {
            Self::DataBlock => 0,
            Self::BitBucket => 1,
            Self::Segment => 2,
            Self::LastSegment => 3,
            Self::KeyedDataBlock => 4,
            Self::TransportDataBlock => 5,
            Self::Reserved(o) => o & 0xF,
        }
    }
}

/// An SGL descriptor (SGL1 of a command, 16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sgl {
    /// Address or offset (bytes 0..8).
    pub address: u64,
    /// Length in bytes. For a keyed descriptor only 24 bits travel.
    pub length: u32,
    /// Key of a keyed data block descriptor (bytes 11..15), else zero.
    pub key: u32,
    /// Descriptor type.
    pub sgl_type: SglType,
    /// Descriptor subtype (lower nibble of byte 15).
    pub subtype: u8,
}

impl Sgl {
    /// Subtype "offset" of a data block descriptor: the address is an offset
    /// into the capsule's in-capsule data.
    pub const SUBTYPE_OFFSET: u8 = 0x1;
    /// Subtype used by NVMe/TCP transport data block descriptors.
    pub const SUBTYPE_TRANSPORT: u8 = 0xA;

    /// Data carried in the command capsule (data block, offset 0).
    pub fn in_capsule(length: u32) -> Self {
        Sgl {
            address: 0,
            length,
            key: 0,
            sgl_type: SglType::DataBlock,
            subtype: Self::SUBTYPE_OFFSET,
        }
    }

    /// Data transferred with R2T/H2CData or C2HData PDUs.
    pub fn transport(length: u32) -> Self {
        Sgl {
            address: 0,
            length,
            key: 0,
            sgl_type: SglType::TransportDataBlock,
            subtype: Self::SUBTYPE_TRANSPORT,
        }
    }

    /// No data (a zero-length transport descriptor, as Linux sends).
    pub fn null() -> Self {
        Self::transport(0)
    }

    /// True if this describes in-capsule data (data block with offset subtype).
    pub fn is_in_capsule(&self) -> bool {
        self.sgl_type == SglType::DataBlock && self.subtype == Self::SUBTYPE_OFFSET
    }

    /// Decodes 16 bytes; every byte pattern is some descriptor.
    pub fn decode(b: &[u8; 16]) -> Self {
        let sgl_type = SglType::from_nibble(b[15] >> 4);
        let subtype = b[15] & 0xF;
        let address = le::u64(b, 0);
        if sgl_type == SglType::KeyedDataBlock {
            Sgl {
                address,
                length: u32::from_le_bytes([b[8], b[9], b[10], 0]),
                key: le::u32(b, 11),
                sgl_type,
                subtype,
            }
        } else {
            Sgl {
                address,
                length: le::u32(b, 8),
                key: 0,
                sgl_type,
                subtype,
            }
        }
    }

    /// Encodes to 16 bytes.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        le::put_u64(&mut b, 0, self.address);
        if self.sgl_type == SglType::KeyedDataBlock {
            b[8..11].copy_from_slice(&self.length.to_le_bytes()[..3]);
            le::put_u32(&mut b, 11, self.key);
        } else {
            le::put_u32(&mut b, 8, self.length);
        }
        b[15] = (self.sgl_type.nibble() << 4) | (self.subtype & 0xF);
        b
    }
}

/// A 64-byte submission queue entry with every field named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmissionEntry {
    /// Opcode (byte 0).
    pub opcode: u8,
    /// Fused operation (byte 1 bits 1:0).
    pub fuse: u8,
    /// PRP or SGL for data transfer (byte 1 bits 7:6); fabrics requires 01b.
    pub psdt: u8,
    /// Command identifier.
    pub cid: u16,
    /// Namespace identifier. For a Fabrics command byte 4 is FCTYPE.
    pub nsid: u32,
    /// Command dword 2.
    pub cdw2: u32,
    /// Command dword 3.
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// Data pointer (SGL1).
    pub dptr: Sgl,
    /// Command dword 10.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// Command dword 12.
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
}

impl SubmissionEntry {
    /// PSDT value "SGLs, metadata pointer is a contiguous buffer", the only
    /// value NVMe over Fabrics uses.
    pub const PSDT_SGL: u8 = 1;

    /// An entry with the given opcode and command id, everything else zero,
    /// PSDT = SGL and a null data pointer.
    pub fn new(opcode: u8, cid: u16) -> Self {
        SubmissionEntry {
            opcode,
            fuse: 0,
            psdt: Self::PSDT_SGL,
            cid,
            nsid: 0,
            cdw2: 0,
            cdw3: 0,
            mptr: 0,
            dptr: Sgl::null(),
            cdw10: 0,
            cdw11: 0,
            cdw12: 0,
            cdw13: 0,
            cdw14: 0,
            cdw15: 0,
        }
    }

    /// FCTYPE of a Fabrics command (byte 4).
    pub fn fctype(&self) -> u8 {
        self.nsid.to_le_bytes()[0]
    }

    /// Decodes 64 bytes. Reserved bits are dropped.
    pub fn decode(b: &[u8; SQE_SIZE]) -> Self {
        SubmissionEntry {
            opcode: b[0],
            fuse: b[1] & 3,
            psdt: b[1] >> 6,
            cid: le::u16(b, 2),
            nsid: le::u32(b, 4),
            cdw2: le::u32(b, 8),
            cdw3: le::u32(b, 12),
            mptr: le::u64(b, 16),
            dptr: Sgl::decode(&le::array(b, 24)),
            cdw10: le::u32(b, 40),
            cdw11: le::u32(b, 44),
            cdw12: le::u32(b, 48),
            cdw13: le::u32(b, 52),
            cdw14: le::u32(b, 56),
            cdw15: le::u32(b, 60),
        }
    }

    /// Decodes from a slice that must be exactly 64 bytes.
    pub fn from_slice(b: &[u8]) -> Result<Self, CommandError> {
        let arr: &[u8; SQE_SIZE] = b.try_into().map_err(|_| CommandError::Length {
            what: "submission entry",
            got: b.len(),
            expected: SQE_SIZE,
        })?;
        Ok(Self::decode(arr))
    }

    /// Encodes to 64 bytes.
    pub fn encode(&self) -> [u8; SQE_SIZE] {
        let mut b = [0u8; SQE_SIZE];
        b[0] = self.opcode;
        b[1] = (self.fuse & 3) | ((self.psdt & 3) << 6);
        le::put_u16(&mut b, 2, self.cid);
        le::put_u32(&mut b, 4, self.nsid);
        le::put_u32(&mut b, 8, self.cdw2);
        le::put_u32(&mut b, 12, self.cdw3);
        le::put_u64(&mut b, 16, self.mptr);
        b[24..40].copy_from_slice(&self.dptr.encode());
        le::put_u32(&mut b, 40, self.cdw10);
        le::put_u32(&mut b, 44, self.cdw11);
        le::put_u32(&mut b, 48, self.cdw12);
        le::put_u32(&mut b, 52, self.cdw13);
        le::put_u32(&mut b, 56, self.cdw14);
        le::put_u32(&mut b, 60, self.cdw15);
        b
    }
}

/// A 16-byte completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Command specific dword 0 (Connect: controller id; Property Get: low half).
    pub dw0: u32,
    /// Dword 1 (Property Get: high half of an 8-byte property).
    pub dw1: u32,
    /// Submission queue head pointer.
    pub sqhd: u16,
    /// Submission queue identifier.
    pub sqid: u16,
    /// Command identifier this completes.
    pub cid: u16,
    /// Phase tag (unused over fabrics, carried as received).
    pub phase: bool,
    /// Status.
    pub status: Status,
}

impl Completion {
    /// A completion for `cid` with the given status and zero dwords.
    pub fn new(cid: u16, status: Status) -> Self {
        Completion {
            dw0: 0,
            dw1: 0,
            sqhd: 0,
            sqid: 0,
            cid,
            phase: false,
            status,
        }
    }

    /// DW0 and DW1 as one 64-bit value (an 8-byte Property Get result).
    pub fn result64(&self) -> u64 {
        u64::from(self.dw0) | (u64::from(self.dw1) << 32)
    }

    /// Decodes 16 bytes.
    pub fn decode(b: &[u8; CQE_SIZE]) -> Self {
        let w = le::u16(b, 14);
        Completion {
            dw0: le::u32(b, 0),
            dw1: le::u32(b, 4),
            sqhd: le::u16(b, 8),
            sqid: le::u16(b, 10),
            cid: le::u16(b, 12),
            phase: w & 1 != 0,
            status: Status::from_word(w),
        }
    }

    /// Encodes to 16 bytes.
    pub fn encode(&self) -> [u8; CQE_SIZE] {
        let mut b = [0u8; CQE_SIZE];
        le::put_u32(&mut b, 0, self.dw0);
        le::put_u32(&mut b, 4, self.dw1);
        le::put_u16(&mut b, 8, self.sqhd);
        le::put_u16(&mut b, 10, self.sqid);
        le::put_u16(&mut b, 12, self.cid);
        le::put_u16(&mut b, 14, self.status.to_word() | u16::from(self.phase));
        b
    }
}

/// Identify CNS values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentifyCns(pub u8);

impl IdentifyCns {
    /// 00h: Identify Namespace.
    pub const NAMESPACE: Self = Self(0x00);
    /// 01h: Identify Controller.
    pub const CONTROLLER: Self = Self(0x01);
    /// 02h: active namespace ID list.
    pub const ACTIVE_NAMESPACES: Self = Self(0x02);
    /// 03h: namespace identification descriptor list.
    pub const NS_ID_DESCRIPTORS: Self = Self(0x03);
}

/// Log page identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LogPageId(pub u8);

impl LogPageId {
    /// 01h: error information.
    pub const ERROR: Self = Self(0x01);
    /// 02h: SMART / health information.
    pub const SMART: Self = Self(0x02);
    /// 03h: firmware slot information.
    pub const FIRMWARE_SLOT: Self = Self(0x03);
    /// 04h: changed namespace list.
    pub const CHANGED_NAMESPACES: Self = Self(0x04);
    /// 70h: discovery log.
    pub const DISCOVERY: Self = Self(0x70);
}

/// Feature identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FeatureId(pub u8);

impl FeatureId {
    /// 06h: volatile write cache.
    pub const VOLATILE_WRITE_CACHE: Self = Self(0x06);
    /// 07h: number of queues.
    pub const NUMBER_OF_QUEUES: Self = Self(0x07);
    /// 0Bh: asynchronous event configuration.
    pub const ASYNC_EVENT_CONFIG: Self = Self(0x0B);
    /// 0Fh: keep alive timer.
    pub const KEEP_ALIVE_TIMER: Self = Self(0x0F);
}

/// The value of a Set Features command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Number of queues: requested I/O submission and completion queues,
    /// both 0's based (0 means one queue). The completion's DW0 carries the
    /// allocated counts in the same layout.
    NumberOfQueues {
        /// NSQR, 0's based.
        nsqr: u16,
        /// NCQR, 0's based.
        ncqr: u16,
    },
    /// Keep alive timeout in milliseconds.
    KeepAliveTimer {
        /// KATO in ms.
        kato_ms: u32,
    },
    /// Asynchronous event configuration bit mask (CDW11).
    AsyncEventConfig {
        /// Enabled event bits.
        mask: u32,
    },
    /// Any other feature, CDW11 carried as is.
    Other {
        /// Feature identifier.
        fid: FeatureId,
        /// CDW11.
        cdw11: u32,
    },
}

impl Feature {
    /// Feature identifier.
    pub fn fid(&self) -> FeatureId {
        match self {
            Feature::NumberOfQueues { .. } => FeatureId::NUMBER_OF_QUEUES,
            Feature::KeepAliveTimer { .. } => FeatureId::KEEP_ALIVE_TIMER,
            Feature::AsyncEventConfig { .. } => FeatureId::ASYNC_EVENT_CONFIG,
            Feature::Other { fid, .. } => *fid,
        }
    }

    /// CDW11 value.
    pub fn cdw11(&self) -> u32 {
        match *self {
            Feature::NumberOfQueues { nsqr, ncqr } => u32::from(nsqr) | (u32::from(ncqr) << 16),
            Feature::KeepAliveTimer { kato_ms } => kato_ms,
            Feature::AsyncEventConfig { mask } => mask,
            Feature::Other { cdw11, .. } => cdw11,
        }
    }

    /// Builds a feature from its identifier and CDW11.
    pub fn from_parts(fid: FeatureId, cdw11: u32) -> Self {
        match fid {
            FeatureId::NUMBER_OF_QUEUES => Feature::NumberOfQueues {
                nsqr: low16(cdw11),
                ncqr: high16(cdw11),
            },
            FeatureId::KEEP_ALIVE_TIMER => Feature::KeepAliveTimer { kato_ms: cdw11 },
            FeatureId::ASYNC_EVENT_CONFIG => Feature::AsyncEventConfig { mask: cdw11 },
            fid => Feature::Other { fid, cdw11 },
        }
    }
}

pub(crate) fn low16(v: u32) -> u16 {
    u16::try_from(v & 0xFFFF).unwrap_or(0)
}

pub(crate) fn high16(v: u32) -> u16 {
    u16::try_from(v >> 16).unwrap_or(0)
}

pub(crate) fn byte(v: u32, n: usize) -> u8 {
    v.to_le_bytes()[n]
}

/// The admin commands a fabrics host sends and a fabrics controller serves.
/// Fabrics commands (Connect, Property Get/Set) are [`crate::nvme::FabricsCommand`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminCommand {
    /// Identify.
    Identify {
        /// Controller or namespace structure.
        cns: IdentifyCns,
        /// Namespace (CNS 00h, 03h) or starting namespace (CNS 02h).
        nsid: u32,
        /// Controller identifier (CDW10 bits 31:16).
        cntid: u16,
    },
    /// Get Log Page.
    GetLogPage {
        /// Namespace (0xFFFF_FFFF for controller-wide).
        nsid: u32,
        /// Log page identifier.
        lid: LogPageId,
        /// Log specific field (CDW10 bits 14:8).
        lsp: u8,
        /// Retain asynchronous event.
        rae: bool,
        /// Number of dwords, 0's based (NUMDU:NUMDL).
        numd: u32,
        /// Byte offset into the log page (LPOU:LPOL).
        offset: u64,
    },
    /// Set Features.
    SetFeatures {
        /// Namespace or 0.
        nsid: u32,
        /// Save across resets.
        save: bool,
        /// The feature and its value.
        feature: Feature,
    },
    /// Get Features.
    GetFeatures {
        /// Namespace or 0.
        nsid: u32,
        /// Select (current, default, saved, supported capabilities).
        sel: u8,
        /// Feature identifier.
        fid: FeatureId,
        /// CDW11 (feature specific).
        cdw11: u32,
    },
    /// Keep Alive.
    KeepAlive,
    /// Asynchronous Event Request.
    AsyncEventRequest,
    /// Abort.
    Abort {
        /// Submission queue of the command to abort.
        sqid: u16,
        /// Its command identifier.
        cid: u16,
    },
}

impl AdminCommand {
    /// Bytes of data this command moves (controller to host for all of these).
    pub fn data_len(&self) -> u64 {
        match self {
            AdminCommand::Identify { .. } => 4096,
            AdminCommand::GetLogPage { numd, .. } => (u64::from(*numd) + 1) * 4,
            _ => 0,
        }
    }

    /// Encodes into a submission entry with the given command id and a null
    /// data pointer (the transport fills in the SGL).
    pub fn to_sqe(&self, cid: u16) -> SubmissionEntry {
        use admin_opcode as op;
        match *self {
            AdminCommand::Identify { cns, nsid, cntid } => {
                let mut e = SubmissionEntry::new(op::IDENTIFY, cid);
                e.nsid = nsid;
                e.cdw10 = u32::from(cns.0) | (u32::from(cntid) << 16);
                e
            }
            AdminCommand::GetLogPage {
                nsid,
                lid,
                lsp,
                rae,
                numd,
                offset,
            } => {
                let mut e = SubmissionEntry::new(op::GET_LOG_PAGE, cid);
                e.nsid = nsid;
                e.cdw10 = u32::from(lid.0)
                    | (u32::from(lsp & 0x7F) << 8)
                    | (u32::from(rae) << 15)
                    | (u32::from(low16(numd)) << 16);
                e.cdw11 = u32::from(high16(numd));
                e.cdw12 = u32::try_from(offset & 0xFFFF_FFFF).unwrap_or(0);
                e.cdw13 = u32::try_from(offset >> 32).unwrap_or(0);
                e
            }
            AdminCommand::SetFeatures {
                nsid,
                save,
                feature,
            } => {
                let mut e = SubmissionEntry::new(op::SET_FEATURES, cid);
                e.nsid = nsid;
                e.cdw10 = u32::from(feature.fid().0) | (u32::from(save) << 31);
                e.cdw11 = feature.cdw11();
                e
            }
            AdminCommand::GetFeatures {
                nsid,
                sel,
                fid,
                cdw11,
            } => {
                let mut e = SubmissionEntry::new(op::GET_FEATURES, cid);
                e.nsid = nsid;
                e.cdw10 = u32::from(fid.0) | (u32::from(sel & 7) << 8);
                e.cdw11 = cdw11;
                e
            }
            AdminCommand::KeepAlive => SubmissionEntry::new(op::KEEP_ALIVE, cid),
            AdminCommand::AsyncEventRequest => SubmissionEntry::new(op::ASYNC_EVENT_REQUEST, cid),
            AdminCommand::Abort { sqid, cid: acid } => {
                let mut e = SubmissionEntry::new(op::ABORT, cid);
                e.cdw10 = u32::from(sqid) | (u32::from(acid) << 16);
                e
            }
        }
    }

    /// Parses an entry received on an admin queue. Fabrics commands (opcode
    /// 7Fh) are not admin commands here: use [`crate::nvme::FabricsCommand::parse`].
    pub fn parse(e: &SubmissionEntry) -> Result<Self, CommandError> {
        use admin_opcode as op;
        Ok(match e.opcode {
            op::IDENTIFY => AdminCommand::Identify {
                cns: IdentifyCns(byte(e.cdw10, 0)),
                nsid: e.nsid,
                cntid: high16(e.cdw10),
            },
            op::GET_LOG_PAGE => AdminCommand::GetLogPage {
                nsid: e.nsid,
                lid: LogPageId(byte(e.cdw10, 0)),
                lsp: byte(e.cdw10, 1) & 0x7F,
                rae: e.cdw10 & (1 << 15) != 0,
                numd: u32::from(high16(e.cdw10)) | (u32::from(low16(e.cdw11)) << 16),
                offset: u64::from(e.cdw12) | (u64::from(e.cdw13) << 32),
            },
            op::SET_FEATURES => AdminCommand::SetFeatures {
                nsid: e.nsid,
                save: e.cdw10 & (1 << 31) != 0,
                feature: Feature::from_parts(FeatureId(byte(e.cdw10, 0)), e.cdw11),
            },
            op::GET_FEATURES => AdminCommand::GetFeatures {
                nsid: e.nsid,
                sel: byte(e.cdw10, 1) & 7,
                fid: FeatureId(byte(e.cdw10, 0)),
                cdw11: e.cdw11,
            },
            op::KEEP_ALIVE => AdminCommand::KeepAlive,
            op::ASYNC_EVENT_REQUEST => AdminCommand::AsyncEventRequest,
            op::ABORT => AdminCommand::Abort {
                sqid: low16(e.cdw10),
                cid: high16(e.cdw10),
            },
            opcode => return Err(CommandError::InvalidOpcode { opcode }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqe_field_offsets() {
        let mut e = SubmissionEntry::new(0x02, 0xBEEF);
        e.fuse = 1;
        e.nsid = 0x0102_0304;
        e.cdw2 = 0x1111_1111;
        e.cdw3 = 0x2222_2222;
        e.mptr = 0x0807_0605_0403_0201;
        e.dptr = Sgl::transport(0x1000);
        e.cdw10 = 0xA;
        e.cdw11 = 0xB;
        e.cdw12 = 0xC;
        e.cdw13 = 0xD;
        e.cdw14 = 0xE;
        e.cdw15 = 0xF;
        let b = e.encode();
        assert_eq!(b[0], 0x02);
        assert_eq!(b[1], 0x41, "PSDT=01b in bits 7:6, FUSE=1");
        assert_eq!(&b[2..4], &[0xEF, 0xBE]);
        assert_eq!(&b[4..8], &[4, 3, 2, 1]);
        assert_eq!(&b[8..12], &[0x11; 4]);
        assert_eq!(&b[12..16], &[0x22; 4]);
        assert_eq!(&b[16..24], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[32..36], &[0, 0x10, 0, 0], "SGL length");
        assert_eq!(b[39], 0x5A, "transport SGL type/subtype");
        for (i, v) in [0xAu8, 0xB, 0xC, 0xD, 0xE, 0xF].iter().enumerate() {
            assert_eq!(b[40 + i * 4], *v);
        }
        assert_eq!(SubmissionEntry::decode(&b), e);
        assert!(SubmissionEntry::from_slice(&b[..63]).is_err());
    }

    #[test]
    fn sgl_kinds() {
        let b = Sgl::in_capsule(512).encode();
        assert_eq!(b[15], 0x01);
        assert!(Sgl::decode(&b).is_in_capsule());
        let keyed = Sgl {
            address: 0x1234,
            length: 0x00AB_CDEF,
            key: 0xDEAD_BEEF,
            sgl_type: SglType::KeyedDataBlock,
            subtype: 0,
        };
        let b = keyed.encode();
        assert_eq!(&b[8..11], &[0xEF, 0xCD, 0xAB]);
        assert_eq!(&b[11..15], &[0xEF, 0xBE, 0xAD, 0xDE]);
        assert_eq!(b[15], 0x40);
        assert_eq!(Sgl::decode(&b), keyed);
        assert_eq!(Sgl::decode(&[0xFF; 16]).sgl_type, SglType::Reserved(0xF));
    }

    #[test]
    fn cqe_layout() {
        let c = Completion {
            dw0: 0x0403_0201,
            dw1: 0x0807_0605,
            sqhd: 0x0A09,
            sqid: 0x0C0B,
            cid: 0x0E0D,
            phase: true,
            status: Status::new(StatusCode::INVALID_FIELD).dnr(),
        };
        let b = c.encode();
        assert_eq!(&b[..14], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
        assert_eq!(u16::from_le_bytes([b[14], b[15]]), 0x8005);
        assert_eq!(Completion::decode(&b), c);
        assert_eq!(c.result64(), 0x0807_0605_0403_0201);
    }

    #[test]
    fn admin_fields() {
        let e = AdminCommand::GetLogPage {
            nsid: 0xFFFF_FFFF,
            lid: LogPageId::DISCOVERY,
            lsp: 0,
            rae: true,
            numd: 0x0001_03FF,
            offset: 0x1_0000_0400,
        }
        .to_sqe(7);
        assert_eq!(e.opcode, 0x02);
        assert_eq!(e.cdw10, 0x03FF_8070);
        assert_eq!(e.cdw11, 1);
        assert_eq!((e.cdw12, e.cdw13), (0x400, 1));
        let e = AdminCommand::SetFeatures {
            nsid: 0,
            save: false,
            feature: Feature::NumberOfQueues { nsqr: 3, ncqr: 5 },
        }
        .to_sqe(1);
        assert_eq!((e.opcode, e.cdw10, e.cdw11), (0x09, 0x07, 0x0005_0003));
        let e = AdminCommand::Identify {
            cns: IdentifyCns::CONTROLLER,
            nsid: 0,
            cntid: 9,
        }
        .to_sqe(1);
        assert_eq!((e.opcode, e.cdw10), (0x06, 0x0009_0001));
        assert_eq!(AdminCommand::KeepAlive.to_sqe(1).opcode, 0x18);
        assert_eq!(AdminCommand::AsyncEventRequest.to_sqe(1).opcode, 0x0C);
        let bad = SubmissionEntry::new(0x55, 1);
        let err = AdminCommand::parse(&bad).unwrap_err();
        assert_eq!(err, CommandError::InvalidOpcode { opcode: 0x55 });
        assert_eq!(err.status(), Status::new(StatusCode::INVALID_OPCODE).dnr());
    }
}
