//! NVMe/TCP PDUs and their encoding.
//!
//! Layout of every PDU: an 8-byte common header (type, flags, HLEN, PDO,
//! PLEN), the type-specific rest of the header up to HLEN, the header digest
//! if negotiated, padding up to PDO, the data, and the data digest if
//! negotiated and data is present.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::{FatalErrorStatus, PduError};
use super::params::{ConnectionParams, Direction};
use crate::nvme::{Completion, SubmissionEntry, CQE_SIZE, SQE_SIZE};

/// Length of the common header.
pub const COMMON_HEADER_LEN: usize = 8;
/// Length of a digest.
pub const DIGEST_LEN: usize = 4;
/// Length of ICReq and ICResp.
pub const ICREQ_LEN: usize = 128;
/// Smallest MAXH2CDATA a controller may advertise.
pub const MIN_MAXH2CDATA: u32 = 4096;
/// Largest termination request PDU (24-byte header + up to 128 bytes of the
/// offending header).
pub const MAX_TERM_PLEN: usize = 152;
const TERM_HLEN: usize = 24;

/// Common header flag bits.
pub mod flags {
    /// Header digest present.
    pub const HDGSTF: u8 = 1 << 0;
    /// Data digest present.
    pub const DDGSTF: u8 = 1 << 1;
    /// Last data PDU of a transfer (H2CData, C2HData).
    pub const LAST_PDU: u8 = 1 << 2;
    /// C2HData: the command completed successfully, no response capsule follows.
    pub const SUCCESS: u8 = 1 << 3;
}

/// PDU types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PduType {
    /// 00h: initialize connection request.
    IcReq,
    /// 01h: initialize connection response.
    IcResp,
    /// 02h: host to controller terminate connection request.
    H2CTermReq,
    /// 03h: controller to host terminate connection request.
    C2HTermReq,
    /// 04h: command capsule.
    CapsuleCmd,
    /// 05h: response capsule.
    CapsuleResp,
    /// 06h: host to controller data.
    H2CData,
    /// 07h: controller to host data.
    C2HData,
    /// 09h: ready to transfer.
    R2T,
}

impl PduType {
    /// From the wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x00 => Self::IcReq,
            0x01 => Self::IcResp,
            0x02 => Self::H2CTermReq,
            0x03 => Self::C2HTermReq,
            0x04 => Self::CapsuleCmd,
            0x05 => Self::CapsuleResp,
            0x06 => Self::H2CData,
            0x07 => Self::C2HData,
            0x09 => Self::R2T,
            _ => return None,
        })
    }
    /// Wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            Self::IcReq => 0x00,
            Self::IcResp => 0x01,
            Self::H2CTermReq => 0x02,
            Self::C2HTermReq => 0x03,
            Self::CapsuleCmd => 0x04,
            Self::CapsuleResp => 0x05,
            Self::H2CData => 0x06,
            Self::C2HData => 0x07,
            Self::R2T => 0x09,
        }
    }
    /// The fixed header length (HLEN) of this type.
    pub fn hlen(self) -> usize {
        match self {
            Self::IcReq | Self::IcResp => ICREQ_LEN,
            Self::CapsuleCmd => COMMON_HEADER_LEN + SQE_SIZE,
            Self::CapsuleResp => COMMON_HEADER_LEN + CQE_SIZE,
            Self::H2CTermReq | Self::C2HTermReq | Self::H2CData | Self::C2HData | Self::R2T => 24,
        }
    }
    /// Direction this type travels.
    pub fn direction(self) -> Direction {
        match self {
            Self::IcReq | Self::H2CTermReq | Self::CapsuleCmd | Self::H2CData => {
                Direction::HostToController
            }
            _ => Direction::ControllerToHost,
        }
    }
    /// Whether digests apply (all but the initialization and termination PDUs).
    pub fn digests_apply(self) -> bool {
        !matches!(
            self,
            Self::IcReq | Self::IcResp | Self::H2CTermReq | Self::C2HTermReq
        )
    }
    /// Whether this type may carry PDU data (digest-protected data).
    pub fn may_carry_data(self) -> bool {
        matches!(self, Self::CapsuleCmd | Self::H2CData | Self::C2HData)
    }
}

/// The 8-byte common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonHeader {
    /// PDU type.
    pub pdu_type: PduType,
    /// Flags.
    pub flags: u8,
    /// Header length.
    pub hlen: u8,
    /// PDU data offset.
    pub pdo: u8,
    /// Total PDU length.
    pub plen: u32,
}

/// Initialize Connection Request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcReq {
    /// PDU format version (0).
    pub pfv: u16,
    /// Host PDU data alignment, 0's based dwords (0..=31).
    pub hpda: u8,
    /// Request header digest.
    pub hdgst: bool,
    /// Request data digest.
    pub ddgst: bool,
    /// Maximum outstanding R2Ts per command, 0's based.
    pub maxr2t: u32,
}

/// Initialize Connection Response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcResp {
    /// PDU format version (0).
    pub pfv: u16,
    /// Controller PDU data alignment, 0's based dwords (0..=31).
    pub cpda: u8,
    /// Header digest enabled.
    pub hdgst: bool,
    /// Data digest enabled.
    pub ddgst: bool,
    /// Maximum H2CData payload in bytes (>= 4096, a multiple of 4).
    pub maxh2cdata: u32,
}

/// H2CTermReq / C2HTermReq body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TermReq {
    /// Fatal error status.
    pub fes: FatalErrorStatus,
    /// Fatal error information.
    pub fei: u32,
    /// The header of the PDU in error (at most 128 bytes are sent).
    pub data: Bytes,
}

/// A command capsule: the SQE and optional in-capsule data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsuleCmd {
    /// The submission entry.
    pub sqe: SubmissionEntry,
    /// In-capsule data.
    pub data: Bytes,
}

/// A response capsule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapsuleResp {
    /// The completion entry.
    pub cqe: Completion,
}

/// Host to controller data, answering an R2T.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H2CData {
    /// Command capsule command id.
    pub cccid: u16,
    /// Transfer tag from the R2T.
    pub ttag: u16,
    /// Offset of this data in the command's buffer.
    pub datao: u32,
    /// Last PDU of this R2T's transfer.
    pub last: bool,
    /// The data.
    pub data: Bytes,
}

/// Controller to host data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct C2HData {
    /// Command capsule command id.
    pub cccid: u16,
    /// Offset of this data in the command's buffer.
    pub datao: u32,
    /// Last PDU of the command's data.
    pub last: bool,
    /// The command succeeded; no response capsule follows (requires `last`).
    pub success: bool,
    /// The data.
    pub data: Bytes,
}

/// Ready to transfer: the controller asks for a range of a command's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2T {
    /// Command capsule command id.
    pub cccid: u16,
    /// Transfer tag the H2CData PDUs must echo.
    pub ttag: u16,
    /// Offset of the requested range.
    pub r2to: u32,
    /// Length of the requested range.
    pub r2tl: u32,
}

/// Any NVMe/TCP PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pdu {
    /// ICReq.
    IcReq(IcReq),
    /// ICResp.
    IcResp(IcResp),
    /// H2CTermReq.
    H2CTermReq(TermReq),
    /// C2HTermReq.
    C2HTermReq(TermReq),
    /// CapsuleCmd.
    CapsuleCmd(CapsuleCmd),
    /// CapsuleResp.
    CapsuleResp(CapsuleResp),
    /// H2CData.
    H2CData(H2CData),
    /// C2HData.
    C2HData(C2HData),
    /// R2T.
    R2T(R2T),
}

/// A PDU ready for a vectored write: header (with header digest and padding),
/// the data as given (not copied), and the data digest.
#[derive(Debug, Clone)]
pub struct EncodedPdu {
    /// Header, header digest and padding up to PDO.
    pub head: Bytes,
    /// PDU data (shares the caller's buffer).
    pub data: Bytes,
    /// Data digest, if it applies.
    pub ddgst: Option<[u8; 4]>,
}

impl EncodedPdu {
    /// Total length (PLEN).
    pub fn len(&self) -> usize {
        self.head.len() + self.data.len() + self.ddgst.map_or(0, |d| d.len())
    }
    /// Never true: every PDU has a header.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The PDU as one contiguous buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.data);
        if let Some(d) = self.ddgst {
            v.extend_from_slice(&d);
        }
        v
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn align_up(v: usize, a: usize) -> usize {
    v.div_ceil(a) * a
}

impl Pdu {
    /// This PDU's type.
    pub fn pdu_type(&self) -> PduType {
        match self {
            Pdu::IcReq(_) => PduType::IcReq,
            Pdu::IcResp(_) => PduType::IcResp,
            Pdu::H2CTermReq(_) => PduType::H2CTermReq,
            Pdu::C2HTermReq(_) => PduType::C2HTermReq,
            Pdu::CapsuleCmd(_) => PduType::CapsuleCmd,
            Pdu::CapsuleResp(_) => PduType::CapsuleResp,
            Pdu::H2CData(_) => PduType::H2CData,
            Pdu::C2HData(_) => PduType::C2HData,
            Pdu::R2T(_) => PduType::R2T,
        }
    }

    fn data(&self) -> Bytes {
        match self {
            Pdu::CapsuleCmd(c) => c.data.clone(),
            Pdu::H2CData(d) => d.data.clone(),
            Pdu::C2HData(d) => d.data.clone(),
            Pdu::H2CTermReq(t) | Pdu::C2HTermReq(t) => {
                t.data.slice(..t.data.len().min(MAX_TERM_PLEN - TERM_HLEN))
            }
            _ => Bytes::new(),
        }
    }

    /// Encodes with the digests and the peer's data alignment from `p`.
    /// Termination data beyond 128 bytes is cut off; data too long for a
    /// 32-bit PLEN is refused.
    pub fn encode(&self, p: &ConnectionParams) -> Result<EncodedPdu, PduError> {
        let t = self.pdu_type();
        let hlen = t.hlen();
        let data = self.data();
        let hd = if p.hdgst_for(t) { DIGEST_LEN } else { 0 };
        let with_data = !data.is_empty();
        let dd = if with_data && p.ddgst_for(t) {
            DIGEST_LEN
        } else {
            0
        };
        let pdo = if with_data {
            if t.may_carry_data() {
                align_up(hlen + hd, p.tx_align())
            } else {
                hlen
            }
        } else {
            0
        };
        let head_len = if with_data { pdo } else { hlen + hd };
        let plen = head_len
            .checked_add(data.len())
            .and_then(|v| v.checked_add(dd))
            .and_then(|v| u32::try_from(v).ok())
            .ok_or(PduError::DataTooLong {
                pdu_type: t,
                len: u64::try_from(data.len()).unwrap_or(u64::MAX),
                max: u64::from(u32::MAX),
            })?;
        let mut fl = 0u8;
        if hd != 0 {
            fl |= flags::HDGSTF;
        }
        if dd != 0 {
            fl |= flags::DDGSTF;
        }
        let mut h = BytesMut::with_capacity(head_len);
        h.put_u8(t.to_u8());
        let flags_pos = h.len();
        h.put_u8(fl);
        h.put_u8(u8::try_from(hlen).unwrap_or(0));
        h.put_u8(u8::try_from(pdo).unwrap_or(0));
        h.put_u32_le(plen);
        match self {
            Pdu::IcReq(r) => {
                h.put_u16_le(r.pfv);
                h.put_u8(r.hpda);
                h.put_u8(u8::from(r.hdgst) | (u8::from(r.ddgst) << 1));
                h.put_u32_le(r.maxr2t);
            }
            Pdu::IcResp(r) => {
                h.put_u16_le(r.pfv);
                h.put_u8(r.cpda);
                h.put_u8(u8::from(r.hdgst) | (u8::from(r.ddgst) << 1));
                h.put_u32_le(r.maxh2cdata);
            }
            Pdu::H2CTermReq(r) | Pdu::C2HTermReq(r) => {
                h.put_u16_le(r.fes.to_u16());
                h.put_u32_le(r.fei);
            }
            Pdu::CapsuleCmd(c) => h.put_slice(&c.sqe.encode()),
            Pdu::CapsuleResp(c) => h.put_slice(&c.cqe.encode()),
            Pdu::H2CData(d) => {
                if d.last {
                    h[flags_pos] |= flags::LAST_PDU;
                }
                h.put_u16_le(d.cccid);
                h.put_u16_le(d.ttag);
                h.put_u32_le(d.datao);
                h.put_u32_le(u32::try_from(d.data.len()).unwrap_or(u32::MAX));
            }
            Pdu::C2HData(d) => {
                if d.last {
                    h[flags_pos] |= flags::LAST_PDU;
                }
                if d.success {
                    h[flags_pos] |= flags::SUCCESS;
                }
                h.put_u16_le(d.cccid);
                h.put_u16_le(0);
                h.put_u32_le(d.datao);
                h.put_u32_le(u32::try_from(d.data.len()).unwrap_or(u32::MAX));
            }
            Pdu::R2T(r) => {
                h.put_u16_le(r.cccid);
                h.put_u16_le(r.ttag);
                h.put_u32_le(r.r2to);
                h.put_u32_le(r.r2tl);
            }
        }
        h.resize(hlen, 0);
        if hd != 0 {
            let d = super::digest(&h[..hlen]);
            h.put_u32_le(d);
        }
        h.resize(head_len, 0);
        let ddgst = (dd != 0).then(|| super::digest(&data).to_le_bytes());
        Ok(EncodedPdu {
            head: h.freeze(),
            data,
            ddgst,
        })
    }
}

fn invalid(
    t: PduType,
    field: &'static str,
    offset: u32,
    value: u64,
    reason: &'static str,
) -> PduError {
    PduError::InvalidField {
        pdu_type: t,
        field,
        offset,
        value,
        reason,
    }
}

/// Validates the common header against the connection parameters: type and
/// direction, HLEN, digest flags, PLEN against this end's limits, and PDO.
/// The framing layer calls this on the first 8 bytes, before it allocates
/// room for the rest of the PDU.
pub fn decode_common_header(b: &[u8], p: &ConnectionParams) -> Result<CommonHeader, PduError> {
    if b.len() < COMMON_HEADER_LEN {
        return Err(PduError::Incomplete {
            needed: COMMON_HEADER_LEN,
            have: b.len(),
        });
    }
    let t = PduType::from_u8(b[0]).ok_or(PduError::UnknownType(b[0]))?;
    if t.direction() != p.rx_direction() {
        return Err(PduError::WrongDirection(t));
    }
    let ch = CommonHeader {
        pdu_type: t,
        flags: b[1],
        hlen: b[2],
        pdo: b[3],
        plen: u32_at(b, 4),
    };
    let hlen = t.hlen();
    if usize::from(ch.hlen) != hlen {
        return Err(invalid(
            t,
            "HLEN",
            2,
            ch.hlen.into(),
            "wrong header length for PDU type",
        ));
    }
    let hd = if p.hdgst_for(t) { DIGEST_LEN } else { 0 };
    if (ch.flags & flags::HDGSTF != 0) != (hd != 0) {
        return Err(invalid(
            t,
            "FLAGS",
            1,
            ch.flags.into(),
            "HDGSTF disagrees with negotiated header digest",
        ));
    }
    let plen = usize::try_from(ch.plen).unwrap_or(usize::MAX);
    let min = hlen + hd;
    let ddgstf = ch.flags & flags::DDGSTF != 0;
    if !t.may_carry_data() {
        if ddgstf {
            return Err(invalid(
                t,
                "FLAGS",
                1,
                ch.flags.into(),
                "DDGSTF on a PDU without data",
            ));
        }
        let ok = match t {
            PduType::H2CTermReq | PduType::C2HTermReq => (min..=MAX_TERM_PLEN).contains(&plen),
            _ => plen == min,
        };
        if !ok {
            return Err(invalid(
                t,
                "PLEN",
                4,
                ch.plen.into(),
                "wrong length for PDU type",
            ));
        }
        return Ok(ch);
    }
    if plen < min {
        return Err(invalid(
            t,
            "PLEN",
            4,
            ch.plen.into(),
            "shorter than header and digest",
        ));
    }
    if t == PduType::C2HData && ch.flags & flags::SUCCESS != 0 && ch.flags & flags::LAST_PDU == 0 {
        return Err(invalid(
            t,
            "FLAGS",
            1,
            ch.flags.into(),
            "SUCCESS without LAST_PDU",
        ));
    }
    if plen == min {
        if ddgstf {
            return Err(invalid(
                t,
                "FLAGS",
                1,
                ch.flags.into(),
                "DDGSTF on a PDU without data",
            ));
        }
        if t != PduType::CapsuleCmd {
            return Err(invalid(
                t,
                "PLEN",
                4,
                ch.plen.into(),
                "data PDU without data",
            ));
        }
        return Ok(ch);
    }
    // The PDU carries data.
    let dd = if p.ddgst_for(t) { DIGEST_LEN } else { 0 };
    if ddgstf != (dd != 0) {
        return Err(invalid(
            t,
            "FLAGS",
            1,
            ch.flags.into(),
            "DDGSTF disagrees with negotiated data digest",
        ));
    }
    let pdo = usize::from(ch.pdo);
    if pdo < min || pdo % p.rx_align() != 0 {
        return Err(invalid(
            t,
            "PDO",
            3,
            ch.pdo.into(),
            "data offset overlaps header or is misaligned",
        ));
    }
    if plen < pdo + dd + 1 {
        return Err(invalid(
            t,
            "PLEN",
            4,
            ch.plen.into(),
            "data offset beyond end of PDU",
        ));
    }
    let data_len = plen - pdo - dd;
    if data_len > usize::try_from(p.max_rx_data).unwrap_or(usize::MAX) {
        return Err(PduError::DataTooLong {
            pdu_type: t,
            len: u64::try_from(data_len).unwrap_or(u64::MAX),
            max: p.max_rx_data.into(),
        });
    }
    Ok(ch)
}

/// Decodes one PDU from the start of `buf`, returning it and the bytes it
/// used. Data fields share `buf`'s memory. Never panics.
pub fn decode_pdu(buf: &Bytes, p: &ConnectionParams) -> Result<(Pdu, usize), PduError> {
    let ch = decode_common_header(buf, p)?;
    let plen = usize::try_from(ch.plen).unwrap_or(usize::MAX);
    if buf.len() < plen {
        return Err(PduError::Incomplete {
            needed: plen,
            have: buf.len(),
        });
    }
    let b = &buf[..plen];
    let t = ch.pdu_type;
    let hlen = t.hlen();
    let hd = if p.hdgst_for(t) { DIGEST_LEN } else { 0 };
    if hd != 0 {
        let received = u32_at(b, hlen);
        let computed = super::digest(&b[..hlen]);
        if received != computed {
            return Err(PduError::HeaderDigest {
                pdu_type: t,
                received,
                computed,
            });
        }
    }
    let has_data = t.may_carry_data() && plen > hlen + hd;
    let dd = if has_data && p.ddgst_for(t) {
        DIGEST_LEN
    } else {
        0
    };
    let data = if has_data {
        buf.slice(usize::from(ch.pdo)..plen - dd)
    } else if matches!(t, PduType::H2CTermReq | PduType::C2HTermReq) {
        buf.slice(hlen..plen)
    } else {
        Bytes::new()
    };
    let pdu = match t {
        PduType::IcReq | PduType::IcResp => {
            let pfv = u16_at(b, 8);
            if pfv != 0 {
                return Err(PduError::Unsupported {
                    pdu_type: t,
                    field: "PFV",
                    offset: 8,
                    value: pfv.into(),
                });
            }
            let pda = b[10];
            if pda > 31 {
                let field = if t == PduType::IcReq { "HPDA" } else { "CPDA" };
                return Err(invalid(t, field, 10, pda.into(), "greater than 31"));
            }
            let dgst = b[11];
            if dgst & !3 != 0 {
                return Err(invalid(t, "DGST", 11, dgst.into(), "reserved bits set"));
            }
            let (hdgst, ddgst) = (dgst & 1 != 0, dgst & 2 != 0);
            let v = u32_at(b, 12);
            if t == PduType::IcReq {
                Pdu::IcReq(IcReq {
                    pfv,
                    hpda: pda,
                    hdgst,
                    ddgst,
                    maxr2t: v,
                })
            } else {
                if v < MIN_MAXH2CDATA || v % 4 != 0 {
                    return Err(invalid(
                        t,
                        "MAXH2CDATA",
                        12,
                        v.into(),
                        "below 4096 or not a dword multiple",
                    ));
                }
                Pdu::IcResp(IcResp {
                    pfv,
                    cpda: pda,
                    hdgst,
                    ddgst,
                    maxh2cdata: v,
                })
            }
        }
        PduType::H2CTermReq | PduType::C2HTermReq => {
            let r = TermReq {
                fes: FatalErrorStatus::from_u16(u16_at(b, 8)),
                fei: u32_at(b, 10),
                data,
            };
            if t == PduType::H2CTermReq {
                Pdu::H2CTermReq(r)
            } else {
                Pdu::C2HTermReq(r)
            }
        }
        PduType::CapsuleCmd => {
            let mut sqe = [0u8; SQE_SIZE];
            sqe.copy_from_slice(&b[8..8 + SQE_SIZE]);
            Pdu::CapsuleCmd(CapsuleCmd {
                sqe: SubmissionEntry::decode(&sqe),
                data,
            })
        }
        PduType::CapsuleResp => {
            let mut cqe = [0u8; CQE_SIZE];
            cqe.copy_from_slice(&b[8..8 + CQE_SIZE]);
            Pdu::CapsuleResp(CapsuleResp {
                cqe: Completion::decode(&cqe),
            })
        }
        PduType::H2CData | PduType::C2HData => {
            let datao = u32_at(b, 12);
            let datal = u32_at(b, 16);
            if usize::try_from(datal).ok() != Some(data.len()) {
                return Err(invalid(
                    t,
                    "DATAL",
                    16,
                    datal.into(),
                    "disagrees with PLEN and PDO",
                ));
            }
            if datao.checked_add(datal).is_none() {
                return Err(invalid(
                    t,
                    "DATAO",
                    12,
                    datao.into(),
                    "offset plus length overflows",
                ));
            }
            let last = ch.flags & flags::LAST_PDU != 0;
            if t == PduType::H2CData {
                Pdu::H2CData(H2CData {
                    cccid: u16_at(b, 8),
                    ttag: u16_at(b, 10),
                    datao,
                    last,
                    data,
                })
            } else {
                let success = ch.flags & flags::SUCCESS != 0;
                Pdu::C2HData(C2HData {
                    cccid: u16_at(b, 8),
                    datao,
                    last,
                    success,
                    data,
                })
            }
        }
        PduType::R2T => {
            let r2to = u32_at(b, 12);
            let r2tl = u32_at(b, 16);
            if r2tl == 0 {
                return Err(invalid(t, "R2TL", 16, 0, "zero-length transfer"));
            }
            if r2to.checked_add(r2tl).is_none() {
                return Err(invalid(
                    t,
                    "R2TO",
                    12,
                    r2to.into(),
                    "offset plus length overflows",
                ));
            }
            Pdu::R2T(R2T {
                cccid: u16_at(b, 8),
                ttag: u16_at(b, 10),
                r2to,
                r2tl,
            })
        }
    };
    if dd != 0 {
        let received = u32_at(b, plen - DIGEST_LEN);
        let computed = match &pdu {
            Pdu::CapsuleCmd(c) => super::digest(&c.data),
            Pdu::H2CData(d) => super::digest(&d.data),
            Pdu::C2HData(d) => super::digest(&d.data),
            _ => received,
        };
        if received != computed {
            // CCCID: the SQE's CID (byte 10) in a capsule, byte 8 in data PDUs.
            let cccid = if t == PduType::CapsuleCmd {
                u16_at(b, 10)
            } else {
                u16_at(b, 8)
            };
            return Err(PduError::DataDigest {
                pdu_type: t,
                cccid,
                received,
                computed,
            });
        }
    }
    Ok((pdu, plen))
}

/// [`decode_pdu`] over a borrowed slice (copies it once); for tests and fuzzing.
pub fn decode_pdu_slice(buf: &[u8], p: &ConnectionParams) -> Result<(Pdu, usize), PduError> {
    decode_pdu(&Bytes::copy_from_slice(buf), p)
}
