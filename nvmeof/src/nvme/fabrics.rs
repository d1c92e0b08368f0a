//! NVMe over Fabrics commands (Connect, Property Get/Set, Disconnect) and the
//! controller properties they read and write.
//!
//! Over fabrics there are no memory-mapped registers: the host reads CAP, VS
//! and CSTS and writes CC with Property Get/Set commands on the admin queue,
//! and the register bit layouts below are what those commands carry.

use super::command::{byte, high16, low16, CommandError, SubmissionEntry};
use super::{le, text};

/// The well-known discovery subsystem NQN.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Size of the Connect command's data.
pub const CONNECT_DATA_SIZE: usize = 1024;
/// Width of an NQN field in Connect data and log pages.
pub const NQN_FIELD_SIZE: usize = 256;
/// Longest NQN the specification allows (bytes, without the NUL).
pub const NQN_MAX_LEN: usize = 223;

/// Fabrics command types (FCTYPE, byte 4).
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
    /// Authentication Send.
    pub const AUTH_SEND: u8 = 0x05;
    /// Authentication Receive.
    pub const AUTH_RECEIVE: u8 = 0x06;
    /// Disconnect.
    pub const DISCONNECT: u8 = 0x08;
}

/// Property offsets.
pub mod property {
    /// Controller capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version (4 bytes).
    pub const VS: u32 = 0x08;
    /// Controller configuration (4 bytes).
    pub const CC: u32 = 0x14;
    /// Controller status (4 bytes).
    pub const CSTS: u32 = 0x1C;
    /// NVM subsystem reset (4 bytes).
    pub const NSSR: u32 = 0x20;
}

/// Width of a property access (ATTRIB bits 2:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertySize {
    /// 4-byte property.
    Four,
    /// 8-byte property.
    Eight,
}

impl PropertySize {
    fn bits(self) -> u32 {
        match self {
            PropertySize::Four => 0,
            PropertySize::Eight => 1,
        }
    }
    fn from_attrib(v: u8) -> Result<Self, CommandError> {
        match v & 7 {
            0 => Ok(PropertySize::Four),
            1 => Ok(PropertySize::Eight),
            o => Err(CommandError::InvalidField {
                field: "ATTRIB",
                value: u64::from(o),
            }),
        }
    }
}

/// A Fabrics command (opcode 7Fh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FabricsCommand {
    /// Connect a queue to a controller. The 1024-byte [`ConnectData`] travels
    /// as in-capsule data.
    Connect {
        /// Record format (0).
        recfmt: u16,
        /// Queue id: 0 for the admin queue.
        qid: u16,
        /// Submission queue size, 0's based.
        sqsize: u16,
        /// Connect attributes (priority, SQ flow control disable, ...).
        cattr: u8,
        /// Keep alive timeout in ms (admin queue only).
        kato_ms: u32,
    },
    /// Read a property.
    PropertyGet {
        /// Width.
        size: PropertySize,
        /// Offset (see [`property`]).
        offset: u32,
    },
    /// Write a property.
    PropertySet {
        /// Width.
        size: PropertySize,
        /// Offset (see [`property`]).
        offset: u32,
        /// Value.
        value: u64,
    },
    /// Disconnect this queue.
    Disconnect {
        /// Record format (0).
        recfmt: u16,
    },
}

impl FabricsCommand {
    /// Encodes into a submission entry with the given command id.
    pub fn to_sqe(&self, cid: u16) -> SubmissionEntry {
        let mut e = SubmissionEntry::new(super::command::admin_opcode::FABRICS, cid);
        match *self {
            FabricsCommand::Connect {
                recfmt,
                qid,
                sqsize,
                cattr,
                kato_ms,
            } => {
                e.nsid = u32::from(fctype::CONNECT);
                e.cdw10 = u32::from(recfmt) | (u32::from(qid) << 16);
                e.cdw11 = u32::from(sqsize) | (u32::from(cattr) << 16);
                e.cdw12 = kato_ms;
            }
            FabricsCommand::PropertyGet { size, offset } => {
                e.nsid = u32::from(fctype::PROPERTY_GET);
                e.cdw10 = size.bits();
                e.cdw11 = offset;
            }
            FabricsCommand::PropertySet {
                size,
                offset,
                value,
            } => {
                e.nsid = u32::from(fctype::PROPERTY_SET);
                e.cdw10 = size.bits();
                e.cdw11 = offset;
                e.cdw12 = u32::try_from(value & 0xFFFF_FFFF).unwrap_or(0);
                e.cdw13 = u32::try_from(value >> 32).unwrap_or(0);
            }
            FabricsCommand::Disconnect { recfmt } => {
                e.nsid = u32::from(fctype::DISCONNECT);
                e.cdw10 = u32::from(recfmt);
            }
        }
        e
    }

    /// Parses an entry whose opcode is 7Fh.
    pub fn parse(e: &SubmissionEntry) -> Result<Self, CommandError> {
        if e.opcode != super::command::admin_opcode::FABRICS {
            return Err(CommandError::InvalidOpcode { opcode: e.opcode });
        }
        Ok(match e.fctype() {
            fctype::CONNECT => FabricsCommand::Connect {
                recfmt: low16(e.cdw10),
                qid: high16(e.cdw10),
                sqsize: low16(e.cdw11),
                cattr: byte(e.cdw11, 2),
                kato_ms: e.cdw12,
            },
            fctype::PROPERTY_GET => FabricsCommand::PropertyGet {
                size: PropertySize::from_attrib(byte(e.cdw10, 0))?,
                offset: e.cdw11,
            },
            fctype::PROPERTY_SET => FabricsCommand::PropertySet {
                size: PropertySize::from_attrib(byte(e.cdw10, 0))?,
                offset: e.cdw11,
                value: u64::from(e.cdw12) | (u64::from(e.cdw13) << 32),
            },
            fctype::DISCONNECT => FabricsCommand::Disconnect {
                recfmt: low16(e.cdw10),
            },
            fctype => return Err(CommandError::UnsupportedFabricsType { fctype }),
        })
    }
}

/// The data of a Connect command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectData {
    /// Host identifier (16 bytes, a UUID on Linux).
    pub hostid: [u8; 16],
    /// Controller id: 0xFFFF asks the dynamic controller model for a new one;
    /// I/O queues name the id the admin Connect returned.
    pub cntlid: u16,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
}

impl ConnectData {
    /// Byte offset of SUBNQN in the data (for Connect Invalid Parameters).
    pub const SUBNQN_OFFSET: u16 = 256;
    /// Byte offset of HOSTNQN in the data.
    pub const HOSTNQN_OFFSET: u16 = 512;
    /// Byte offset of CNTLID in the data.
    pub const CNTLID_OFFSET: u16 = 16;

    /// Encodes to 1024 bytes. NQNs longer than the field are truncated so that
    /// a NUL always follows (callers validate lengths beforehand).
    pub fn encode(&self) -> [u8; CONNECT_DATA_SIZE] {
        let mut b = [0u8; CONNECT_DATA_SIZE];
        b[..16].copy_from_slice(&self.hostid);
        le::put_u16(&mut b, 16, self.cntlid);
        text::put(&mut b[256..511], &self.subnqn, 0);
        text::put(&mut b[512..767], &self.hostnqn, 0);
        b
    }

    /// Decodes Connect data; bytes beyond the 1024 are ignored.
    pub fn decode(b: &[u8]) -> Result<Self, CommandError> {
        if b.len() < CONNECT_DATA_SIZE {
            return Err(CommandError::Length {
                what: "connect data",
                got: b.len(),
                expected: CONNECT_DATA_SIZE,
            });
        }
        Ok(ConnectData {
            hostid: le::array(b, 0),
            cntlid: le::u16(b, 16),
            subnqn: text::get(&b[256..512]),
            hostnqn: text::get(&b[512..768]),
        })
    }
}

/// CAP: controller capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapRegister {
    /// Maximum queue entries supported, 0's based.
    pub mqes: u16,
    /// Contiguous queues required.
    pub cqr: bool,
    /// Arbitration mechanisms supported (2 bits).
    pub ams: u8,
    /// Worst-case time to ready, in 500 ms units.
    pub to: u8,
    /// Doorbell stride (4 bits).
    pub dstrd: u8,
    /// NVM subsystem reset supported.
    pub nssrs: bool,
    /// Command sets supported (8 bits; bit 0 = NVM command set).
    pub css: u8,
    /// Boot partition support.
    pub bps: bool,
    /// Memory page size minimum, 2^(12+n) (4 bits).
    pub mpsmin: u8,
    /// Memory page size maximum, 2^(12+n) (4 bits).
    pub mpsmax: u8,
}

impl CapRegister {
    /// Decodes the 64-bit value.
    pub fn from_u64(v: u64) -> Self {
        let f = |shift: u32, mask: u64| u8::try_from((v >> shift) & mask).unwrap_or(0);
        CapRegister {
            mqes: u16::try_from(v & 0xFFFF).unwrap_or(0),
            cqr: v & (1 << 16) != 0,
            ams: f(17, 3),
            to: f(24, 0xFF),
            dstrd: f(32, 0xF),
            nssrs: v & (1 << 36) != 0,
            css: f(37, 0xFF),
            bps: v & (1 << 45) != 0,
            mpsmin: f(48, 0xF),
            mpsmax: f(52, 0xF),
        }
    }
    /// Encodes to the 64-bit value.
    pub fn to_u64(&self) -> u64 {
        u64::from(self.mqes)
            | (u64::from(self.cqr) << 16)
            | (u64::from(self.ams & 3) << 17)
            | (u64::from(self.to) << 24)
            | (u64::from(self.dstrd & 0xF) << 32)
            | (u64::from(self.nssrs) << 36)
            | (u64::from(self.css) << 37)
            | (u64::from(self.bps) << 45)
            | (u64::from(self.mpsmin & 0xF) << 48)
            | (u64::from(self.mpsmax & 0xF) << 52)
    }
}

/// CC: controller configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CcRegister {
    /// Enable.
    pub en: bool,
    /// I/O command set selected (3 bits).
    pub css: u8,
    /// Memory page size, 2^(12+n) (4 bits).
    pub mps: u8,
    /// Arbitration mechanism selected (3 bits).
    pub ams: u8,
    /// Shutdown notification (2 bits: 01b normal, 10b abrupt).
    pub shn: u8,
    /// I/O submission queue entry size, 2^n (4 bits; 6 for 64 bytes).
    pub iosqes: u8,
    /// I/O completion queue entry size, 2^n (4 bits; 4 for 16 bytes).
    pub iocqes: u8,
}

impl CcRegister {
    /// Decodes the 32-bit value.
    pub fn from_u32(v: u32) -> Self {
        let f = |shift: u32, mask: u32| u8::try_from((v >> shift) & mask).unwrap_or(0);
        CcRegister {
            en: v & 1 != 0,
            css: f(4, 7),
            mps: f(7, 0xF),
            ams: f(11, 7),
            shn: f(14, 3),
            iosqes: f(16, 0xF),
            iocqes: f(20, 0xF),
        }
    }
    /// Encodes to the 32-bit value.
    pub fn to_u32(&self) -> u32 {
        u32::from(self.en)
            | (u32::from(self.css & 7) << 4)
            | (u32::from(self.mps & 0xF) << 7)
            | (u32::from(self.ams & 7) << 11)
            | (u32::from(self.shn & 3) << 14)
            | (u32::from(self.iosqes & 0xF) << 16)
            | (u32::from(self.iocqes & 0xF) << 20)
    }
}

/// CSTS: controller status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CstsRegister {
    /// Ready.
    pub rdy: bool,
    /// Controller fatal status.
    pub cfs: bool,
    /// Shutdown status (2 bits: 10b complete).
    pub shst: u8,
    /// NVM subsystem reset occurred.
    pub nssro: bool,
    /// Processing paused.
    pub pp: bool,
}

impl CstsRegister {
    /// Decodes the 32-bit value.
    pub fn from_u32(v: u32) -> Self {
        CstsRegister {
            rdy: v & 1 != 0,
            cfs: v & 2 != 0,
            shst: u8::try_from((v >> 2) & 3).unwrap_or(0),
            nssro: v & (1 << 4) != 0,
            pp: v & (1 << 5) != 0,
        }
    }
    /// Encodes to the 32-bit value.
    pub fn to_u32(&self) -> u32 {
        u32::from(self.rdy)
            | (u32::from(self.cfs) << 1)
            | (u32::from(self.shst & 3) << 2)
            | (u32::from(self.nssro) << 4)
            | (u32::from(self.pp) << 5)
    }
}

/// VS: version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VsRegister {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u8,
    /// Tertiary version.
    pub tertiary: u8,
}

impl VsRegister {
    /// NVMe 1.3.0, the version Linux nvmet reports and this crate implements against.
    pub const V1_3: VsRegister = VsRegister {
        major: 1,
        minor: 3,
        tertiary: 0,
    };
    /// NVMe 1.4.0.
    pub const V1_4: VsRegister = VsRegister {
        major: 1,
        minor: 4,
        tertiary: 0,
    };

    /// Decodes the 32-bit value.
    pub fn from_u32(v: u32) -> Self {
        VsRegister {
            major: high16(v),
            minor: byte(v, 1),
            tertiary: byte(v, 0),
        }
    }
    /// Encodes to the 32-bit value.
    pub fn to_u32(&self) -> u32 {
        (u32::from(self.major) << 16) | (u32::from(self.minor) << 8) | u32::from(self.tertiary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_sqe_layout() {
        let c = FabricsCommand::Connect {
            recfmt: 0,
            qid: 3,
            sqsize: 127,
            cattr: 4,
            kato_ms: 5000,
        };
        let b = c.to_sqe(9).encode();
        assert_eq!((b[0], b[4]), (0x7F, 0x01));
        assert_eq!(&b[40..44], &[0, 0, 3, 0]);
        assert_eq!(&b[44..48], &[127, 0, 4, 0]);
        assert_eq!(u32::from_le_bytes([b[48], b[49], b[50], b[51]]), 5000);
        assert_eq!(
            FabricsCommand::parse(&SubmissionEntry::decode(&b)).unwrap(),
            c
        );
    }

    #[test]
    fn property_layout_and_attrib_check() {
        let c = FabricsCommand::PropertySet {
            size: PropertySize::Four,
            offset: property::CC,
            value: 0x0046_0001,
        };
        let b = c.to_sqe(1).encode();
        assert_eq!((b[4], b[40]), (0x00, 0));
        assert_eq!(&b[44..48], &[0x14, 0, 0, 0]);
        assert_eq!(&b[48..52], &[1, 0, 0x46, 0]);
        let mut e = FabricsCommand::PropertyGet {
            size: PropertySize::Eight,
            offset: 0,
        }
        .to_sqe(2);
        assert_eq!(e.cdw10, 1);
        e.cdw10 = 2;
        assert_eq!(
            FabricsCommand::parse(&e),
            Err(CommandError::InvalidField {
                field: "ATTRIB",
                value: 2
            })
        );
        e.nsid = 0x05;
        assert_eq!(
            FabricsCommand::parse(&e),
            Err(CommandError::UnsupportedFabricsType { fctype: 5 })
        );
    }

    #[test]
    fn connect_data_layout() {
        let d = ConnectData {
            hostid: [7; 16],
            cntlid: 0xFFFF,
            subnqn: "nqn.2026-11.io.test:sub".into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1".into(),
        };
        let b = d.encode();
        assert_eq!(&b[..16], &[7; 16]);
        assert_eq!(&b[16..18], &[0xFF, 0xFF]);
        assert_eq!(&b[256..260], b"nqn.");
        assert_eq!(b[256 + d.subnqn.len()], 0);
        assert_eq!(&b[512..516], b"nqn.");
        assert_eq!(ConnectData::decode(&b).unwrap(), d);
        assert!(ConnectData::decode(&b[..1023]).is_err());
    }

    #[test]
    fn registers() {
        // A CAP as Linux nvmet reports it: MQES 127, CQR, TO 15, CSS NVM, MPSMIN/MAX 0.
        let cap = CapRegister {
            mqes: 127,
            cqr: true,
            to: 15,
            css: 1,
            ..Default::default()
        };
        assert_eq!(cap.to_u64(), 0x0000_0020_0F01_007F);
        assert_eq!(CapRegister::from_u64(cap.to_u64()), cap);
        let cc = CcRegister {
            en: true,
            iosqes: 6,
            iocqes: 4,
            ..Default::default()
        };
        assert_eq!(cc.to_u32(), 0x0046_0001);
        assert_eq!(CcRegister::from_u32(0x0046_0001), cc);
        let cc = CcRegister::from_u32(0xFFFF_FFFF);
        assert_eq!((cc.css, cc.mps, cc.ams, cc.shn), (7, 15, 7, 3));
        let csts = CstsRegister {
            rdy: true,
            shst: 2,
            ..Default::default()
        };
        assert_eq!(csts.to_u32(), 0b1001);
        assert_eq!(CstsRegister::from_u32(0b1001), csts);
        assert_eq!(VsRegister::V1_3.to_u32(), 0x0001_0300);
        assert_eq!(
            VsRegister::from_u32(0x0001_0401),
            VsRegister {
                major: 1,
                minor: 4,
                tertiary: 1
            }
        );
    }
}
