//! Completion status: the status code type and code, plus the DNR and More bits.
//!
//! Status codes are plain (type, code) pairs with named constants rather than
//! one closed enum: command-specific codes overlap between command sets
//! (0x82 is "Connect Invalid Parameters" for a Fabrics command and "Attempted
//! Write to Read Only Range" for an NVM command), and a host must carry any
//! status a real target sends, known to us or not.

use std::fmt;

/// Status Code Type (SCT), 3 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusCodeType {
    /// 0h: generic command status.
    Generic,
    /// 1h: command specific status.
    CommandSpecific,
    /// 2h: media and data integrity errors.
    MediaError,
    /// 3h: path related status.
    Path,
    /// 7h: vendor specific.
    VendorSpecific,
    /// Reserved values 4h-6h, kept as received.
    Reserved(u8),
}

impl StatusCodeType {
    /// Decodes the 3-bit field; higher bits are ignored.
    pub fn from_bits(v: u8) -> Self {
        match v & 7 {
            0 => Self::Generic,
            1 => Self::CommandSpecific,
            2 => Self::MediaError,
            3 => Self::Path,
            7 => Self::VendorSpecific,
            r => Self::Reserved(r),
        }
    }
    /// The 3-bit wire value.
    pub fn bits(self) -> u8 {
        match self {
            Self::Generic => 0,
            Self::CommandSpecific => 1,
            Self::MediaError => 2,
            Self::Path => 3,
            Self::VendorSpecific => 7,
            Self::Reserved(r) => r & 7,
        }
    }
}

/// Status Code Type and Status Code together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusCode {
    /// Status code type.
    pub sct: StatusCodeType,
    /// Status code within the type.
    pub sc: u8,
}

macro_rules! codes {
    ($($(#[$m:meta])* $name:ident = ($sct:ident, $sc:expr, $text:expr);)*) => {
        impl StatusCode {
            $($(#[$m])* pub const $name: StatusCode = StatusCode { sct: StatusCodeType::$sct, sc: $sc };)*
            /// Human-readable name for the codes this crate knows (generic and
            /// path codes are unambiguous; command-specific ones are named for
            /// their Fabrics/admin meaning).
            pub fn name(&self) -> Option<&'static str> {
                $(if *self == Self::$name { return Some($text); })*
                None
            }
        }
    };
}

codes! {
    /// Successful completion.
    SUCCESS = (Generic, 0x00, "success");
    /// Invalid command opcode.
    INVALID_OPCODE = (Generic, 0x01, "invalid command opcode");
    /// Invalid field in command.
    INVALID_FIELD = (Generic, 0x02, "invalid field in command");
    /// Command identifier conflict.
    COMMAND_ID_CONFLICT = (Generic, 0x03, "command id conflict");
    /// Data transfer error.
    DATA_TRANSFER_ERROR = (Generic, 0x04, "data transfer error");
    /// Commands aborted due to power loss notification.
    ABORTED_POWER_LOSS = (Generic, 0x05, "aborted due to power loss");
    /// Internal error.
    INTERNAL_ERROR = (Generic, 0x06, "internal error");
    /// Command abort requested.
    ABORT_REQUESTED = (Generic, 0x07, "command abort requested");
    /// Command aborted due to SQ deletion.
    ABORTED_SQ_DELETION = (Generic, 0x08, "aborted due to sq deletion");
    /// Invalid namespace or format.
    INVALID_NAMESPACE = (Generic, 0x0B, "invalid namespace or format");
    /// Command sequence error.
    COMMAND_SEQUENCE_ERROR = (Generic, 0x0C, "command sequence error");
    /// Invalid SGL segment descriptor.
    INVALID_SGL_SEGMENT = (Generic, 0x0D, "invalid sgl segment descriptor");
    /// Invalid number of SGL descriptors.
    INVALID_SGL_COUNT = (Generic, 0x0E, "invalid number of sgl descriptors");
    /// Data SGL length invalid.
    DATA_SGL_LENGTH_INVALID = (Generic, 0x0F, "data sgl length invalid");
    /// SGL descriptor type invalid.
    SGL_TYPE_INVALID = (Generic, 0x11, "sgl descriptor type invalid");
    /// SGL offset invalid.
    SGL_OFFSET_INVALID = (Generic, 0x16, "sgl offset invalid");
    /// Host identifier inconsistent format.
    HOST_ID_INCONSISTENT = (Generic, 0x18, "host identifier inconsistent format");
    /// Keep alive timer expired.
    KEEP_ALIVE_EXPIRED = (Generic, 0x19, "keep alive timer expired");
    /// Keep alive timeout invalid.
    KEEP_ALIVE_INVALID = (Generic, 0x1A, "keep alive timeout invalid");
    /// Namespace is write protected.
    NAMESPACE_WRITE_PROTECTED = (Generic, 0x20, "namespace is write protected");
    /// Command interrupted (retry).
    COMMAND_INTERRUPTED = (Generic, 0x21, "command interrupted");
    /// Transient transport error.
    TRANSIENT_TRANSPORT_ERROR = (Generic, 0x22, "transient transport error");
    /// LBA out of range.
    LBA_OUT_OF_RANGE = (Generic, 0x80, "lba out of range");
    /// Capacity exceeded.
    CAPACITY_EXCEEDED = (Generic, 0x81, "capacity exceeded");
    /// Namespace not ready.
    NAMESPACE_NOT_READY = (Generic, 0x82, "namespace not ready");
    /// Reservation conflict.
    RESERVATION_CONFLICT = (Generic, 0x83, "reservation conflict");
    /// Invalid queue identifier (Create/Delete queue, Connect QID).
    INVALID_QUEUE_ID = (CommandSpecific, 0x01, "invalid queue identifier");
    /// Invalid queue size.
    INVALID_QUEUE_SIZE = (CommandSpecific, 0x02, "invalid queue size");
    /// Asynchronous event request limit exceeded.
    AER_LIMIT_EXCEEDED = (CommandSpecific, 0x05, "async event request limit exceeded");
    /// Invalid log page.
    INVALID_LOG_PAGE = (CommandSpecific, 0x09, "invalid log page");
    /// Feature identifier not saveable.
    FEATURE_NOT_SAVEABLE = (CommandSpecific, 0x0D, "feature not saveable");
    /// Feature not changeable.
    FEATURE_NOT_CHANGEABLE = (CommandSpecific, 0x0E, "feature not changeable");
    /// Connect: incompatible format.
    CONNECT_INCOMPATIBLE_FORMAT = (CommandSpecific, 0x80, "connect incompatible format");
    /// Connect: controller busy.
    CONNECT_CONTROLLER_BUSY = (CommandSpecific, 0x81, "connect controller busy");
    /// Connect: invalid parameters (DW0 carries the offending offset).
    CONNECT_INVALID_PARAMETERS = (CommandSpecific, 0x82, "connect invalid parameters");
    /// Connect: restart discovery.
    CONNECT_RESTART_DISCOVERY = (CommandSpecific, 0x83, "connect restart discovery");
    /// Connect: invalid host.
    CONNECT_INVALID_HOST = (CommandSpecific, 0x84, "connect invalid host");
    /// Invalid queue type (e.g. an I/O command on a discovery controller).
    INVALID_QUEUE_TYPE = (CommandSpecific, 0x85, "invalid queue type");
    /// Discovery log page changed while reading it.
    DISCOVERY_RESTART = (CommandSpecific, 0x90, "discovery restart");
    /// Authentication required.
    AUTHENTICATION_REQUIRED = (CommandSpecific, 0x91, "authentication required");
    /// Media: write fault.
    WRITE_FAULT = (MediaError, 0x80, "write fault");
    /// Media: unrecovered read error.
    UNRECOVERED_READ_ERROR = (MediaError, 0x81, "unrecovered read error");
    /// Media: end-to-end guard check error.
    GUARD_CHECK_ERROR = (MediaError, 0x82, "end-to-end guard check error");
    /// Media: compare failure.
    COMPARE_FAILURE = (MediaError, 0x85, "compare failure");
    /// Media: access denied.
    ACCESS_DENIED = (MediaError, 0x86, "access denied");
    /// Media: deallocated or unwritten logical block.
    DEALLOCATED_OR_UNWRITTEN = (MediaError, 0x87, "deallocated or unwritten logical block");
    /// Path: internal path error.
    INTERNAL_PATH_ERROR = (Path, 0x00, "internal path error");
    /// Path: ANA inaccessible.
    ANA_INACCESSIBLE = (Path, 0x02, "ana inaccessible");
    /// Path: ANA transition.
    ANA_TRANSITION = (Path, 0x03, "ana transition");
    /// Path: controller pathing error.
    CONTROLLER_PATH_ERROR = (Path, 0x60, "controller pathing error");
    /// Path: host pathing error (the host lost the path before a completion).
    HOST_PATH_ERROR = (Path, 0x70, "host pathing error");
    /// Path: command aborted by host.
    ABORTED_BY_HOST = (Path, 0x71, "command aborted by host");
}

/// A decoded completion status field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status {
    /// Status code type and code.
    pub code: StatusCode,
    /// Command Retry Delay index (0-3).
    pub crd: u8,
    /// More: additional information in the error log page.
    pub more: bool,
    /// Do Not Retry: the same command would fail again.
    pub dnr: bool,
}

impl Status {
    /// Success with no flags.
    pub const SUCCESS: Status = Status::new(StatusCode::SUCCESS);

    /// A status with the given code and no CRD/More/DNR bits.
    pub const fn new(code: StatusCode) -> Self {
        Status {
            code,
            crd: 0,
            more: false,
            dnr: false,
        }
    }

    /// The same status with DNR set.
    pub const fn dnr(mut self) -> Self {
        self.dnr = true;
        self
    }

    /// True for a successful completion.
    pub fn is_success(&self) -> bool {
        self.code == StatusCode::SUCCESS
    }

    /// Decodes the 15-bit status field as it sits in CQE bytes 14..16, i.e.
    /// the upper 15 bits of that little-endian word (bit 0 is the phase tag).
    pub fn from_word(w: u16) -> Self {
        let sf = w >> 1;
        let sc = (sf & 0xFF).to_le_bytes()[0];
        let sct = ((sf >> 8) & 7).to_le_bytes()[0];
        let crd = ((sf >> 11) & 3).to_le_bytes()[0];
        Status {
            code: StatusCode {
                sct: StatusCodeType::from_bits(sct),
                sc,
            },
            crd,
            more: sf & (1 << 13) != 0,
            dnr: sf & (1 << 14) != 0,
        }
    }

    /// Encodes into the CQE status word with the phase tag bit clear.
    pub fn to_word(&self) -> u16 {
        let mut sf = u16::from(self.code.sc);
        sf |= u16::from(self.code.sct.bits()) << 8;
        sf |= u16::from(self.crd & 3) << 11;
        if self.more {
            sf |= 1 << 13;
        }
        if self.dnr {
            sf |= 1 << 14;
        }
        sf << 1
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code.name() {
            Some(n) => write!(f, "{n}")?,
            None => write!(
                f,
                "status sct={:#x} sc={:#04x}",
                self.code.sct.bits(),
                self.code.sc
            )?,
        }
        if self.dnr {
            write!(f, " (dnr)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_layout_matches_spec_bits() {
        // LBA out of range (SCT 0, SC 0x80), DNR set: status field = 0x4080, word = 0x8100.
        let s = Status::new(StatusCode::LBA_OUT_OF_RANGE).dnr();
        assert_eq!(s.to_word(), 0x8100);
        // Host path error: SCT 3 SC 0x70 -> field 0x370 -> word 0x06E0.
        assert_eq!(Status::new(StatusCode::HOST_PATH_ERROR).to_word(), 0x06E0);
        // More bit is field bit 13, CRD bits 12:11.
        let s = Status {
            code: StatusCode::SUCCESS,
            crd: 2,
            more: true,
            dnr: false,
        };
        assert_eq!(s.to_word(), ((1 << 13) | (2 << 11)) << 1);
    }

    #[test]
    fn every_word_round_trips_ignoring_phase() {
        for w in 0..=u16::MAX {
            let s = Status::from_word(w);
            assert_eq!(s.to_word(), w & !1, "word {w:#x}");
        }
    }

    #[test]
    fn names_and_display() {
        assert_eq!(
            StatusCode::CONNECT_INVALID_HOST.name(),
            Some("connect invalid host")
        );
        assert_eq!(
            Status::new(StatusCode::INVALID_OPCODE).to_string(),
            "invalid command opcode"
        );
        let odd = Status::new(StatusCode {
            sct: StatusCodeType::Reserved(5),
            sc: 0x42,
        });
        assert_eq!(odd.to_string(), "status sct=0x5 sc=0x42");
        assert_eq!(StatusCodeType::from_bits(7), StatusCodeType::VendorSpecific);
    }
}
