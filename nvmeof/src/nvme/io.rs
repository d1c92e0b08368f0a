//! NVM command set I/O commands.
//!
//! Block counts travel 0's based (NLB = 0 means one block); the typed commands
//! keep the wire value and offer `blocks()` for the real count so that the
//! off-by-one lives in exactly one place.

use super::command::{byte, low16, CommandError, SubmissionEntry};
use super::le;

/// NVM I/O command opcodes.
pub mod io_opcode {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Size of one Dataset Management range.
pub const DSM_RANGE_SIZE: usize = 16;
/// Most ranges one Dataset Management command carries.
pub const DSM_MAX_RANGES: usize = 256;

/// An NVM I/O command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoCommand {
    /// Read `nlb + 1` blocks from `slba`.
    Read {
        /// Namespace.
        nsid: u32,
        /// Starting LBA.
        slba: u64,
        /// Number of logical blocks, 0's based.
        nlb: u16,
        /// Force unit access.
        fua: bool,
    },
    /// Write `nlb + 1` blocks at `slba`.
    Write {
        /// Namespace.
        nsid: u32,
        /// Starting LBA.
        slba: u64,
        /// Number of logical blocks, 0's based.
        nlb: u16,
        /// Force unit access.
        fua: bool,
    },
    /// Flush the volatile write cache.
    Flush {
        /// Namespace (0xFFFF_FFFF for all).
        nsid: u32,
    },
    /// Write zeroes to `nlb + 1` blocks.
    WriteZeroes {
        /// Namespace.
        nsid: u32,
        /// Starting LBA.
        slba: u64,
        /// Number of logical blocks, 0's based.
        nlb: u16,
        /// Deallocate (CDW12 bit 25).
        deallocate: bool,
        /// Force unit access.
        fua: bool,
    },
    /// Dataset Management with `nr + 1` ranges in the data.
    DatasetManagement {
        /// Namespace.
        nsid: u32,
        /// Number of ranges, 0's based.
        nr: u8,
        /// Integral dataset for read.
        idr: bool,
        /// Integral dataset for write.
        idw: bool,
        /// Deallocate.
        deallocate: bool,
    },
}

impl IoCommand {
    /// Number of logical blocks (1-based) of a block command, else 0.
    pub fn blocks(&self) -> u32 {
        match self {
            IoCommand::Read { nlb, .. }
            | IoCommand::Write { nlb, .. }
            | IoCommand::WriteZeroes { nlb, .. } => u32::from(*nlb) + 1,
            _ => 0,
        }
    }

    /// Namespace the command addresses.
    pub fn nsid(&self) -> u32 {
        match self {
            IoCommand::Read { nsid, .. }
            | IoCommand::Write { nsid, .. }
            | IoCommand::Flush { nsid }
            | IoCommand::WriteZeroes { nsid, .. }
            | IoCommand::DatasetManagement { nsid, .. } => *nsid,
        }
    }

    /// Encodes into a submission entry with a null data pointer.
    pub fn to_sqe(&self, cid: u16) -> SubmissionEntry {
        use io_opcode as op;
        let rw = |opcode, nsid, slba: u64, nlb: u16, extra: u32| {
            let mut e = SubmissionEntry::new(opcode, cid);
            e.nsid = nsid;
            e.cdw10 = u32::try_from(slba & 0xFFFF_FFFF).unwrap_or(0);
            e.cdw11 = u32::try_from(slba >> 32).unwrap_or(0);
            e.cdw12 = u32::from(nlb) | extra;
            e
        };
        match *self {
            IoCommand::Read {
                nsid,
                slba,
                nlb,
                fua,
            } => rw(op::READ, nsid, slba, nlb, u32::from(fua) << 30),
            IoCommand::Write {
                nsid,
                slba,
                nlb,
                fua,
            } => rw(op::WRITE, nsid, slba, nlb, u32::from(fua) << 30),
            IoCommand::Flush { nsid } => {
                let mut e = SubmissionEntry::new(op::FLUSH, cid);
                e.nsid = nsid;
                e
            }
            IoCommand::WriteZeroes {
                nsid,
                slba,
                nlb,
                deallocate,
                fua,
            } => rw(
                op::WRITE_ZEROES,
                nsid,
                slba,
                nlb,
                (u32::from(deallocate) << 25) | (u32::from(fua) << 30),
            ),
            IoCommand::DatasetManagement {
                nsid,
                nr,
                idr,
                idw,
                deallocate,
            } => {
                let mut e = SubmissionEntry::new(op::DATASET_MANAGEMENT, cid);
                e.nsid = nsid;
                e.cdw10 = u32::from(nr);
                e.cdw11 = u32::from(idr) | (u32::from(idw) << 1) | (u32::from(deallocate) << 2);
                e
            }
        }
    }

    /// Parses an entry received on an I/O queue.
    pub fn parse(e: &SubmissionEntry) -> Result<Self, CommandError> {
        use io_opcode as op;
        let slba = u64::from(e.cdw10) | (u64::from(e.cdw11) << 32);
        let nlb = low16(e.cdw12);
        let fua = e.cdw12 & (1 << 30) != 0;
        Ok(match e.opcode {
            op::READ => IoCommand::Read {
                nsid: e.nsid,
                slba,
                nlb,
                fua,
            },
            op::WRITE => IoCommand::Write {
                nsid: e.nsid,
                slba,
                nlb,
                fua,
            },
            op::FLUSH => IoCommand::Flush { nsid: e.nsid },
            op::WRITE_ZEROES => IoCommand::WriteZeroes {
                nsid: e.nsid,
                slba,
                nlb,
                deallocate: e.cdw12 & (1 << 25) != 0,
                fua,
            },
            op::DATASET_MANAGEMENT => IoCommand::DatasetManagement {
                nsid: e.nsid,
                nr: byte(e.cdw10, 0),
                idr: e.cdw11 & 1 != 0,
                idw: e.cdw11 & 2 != 0,
                deallocate: e.cdw11 & 4 != 0,
            },
            opcode => return Err(CommandError::InvalidOpcode { opcode }),
        })
    }
}

/// One Dataset Management range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsmRange {
    /// Context attributes.
    pub cattr: u32,
    /// Length in logical blocks (1-based; 0 is an empty range).
    pub nlb: u32,
    /// Starting LBA.
    pub slba: u64,
}

impl DsmRange {
    /// Encodes to 16 bytes.
    pub fn encode(&self) -> [u8; DSM_RANGE_SIZE] {
        let mut b = [0u8; DSM_RANGE_SIZE];
        le::put_u32(&mut b, 0, self.cattr);
        le::put_u32(&mut b, 4, self.nlb);
        le::put_u64(&mut b, 8, self.slba);
        b
    }

    /// Encodes a list of ranges as Dataset Management data.
    pub fn encode_list(ranges: &[DsmRange]) -> Vec<u8> {
        ranges.iter().flat_map(|r| r.encode()).collect()
    }

    /// Decodes `count` ranges (1..=256) from Dataset Management data.
    pub fn decode_list(b: &[u8], count: usize) -> Result<Vec<DsmRange>, CommandError> {
        if count == 0 || count > DSM_MAX_RANGES {
            return Err(CommandError::InvalidField {
                field: "NR",
                value: u64::try_from(count).unwrap_or(u64::MAX),
            });
        }
        let need = count * DSM_RANGE_SIZE;
        if b.len() < need {
            return Err(CommandError::Length {
                what: "dsm ranges",
                got: b.len(),
                expected: need,
            });
        }
        Ok(b[..need]
            .chunks_exact(DSM_RANGE_SIZE)
            .map(|c| DsmRange {
                cattr: le::u32(c, 0),
                nlb: le::u32(c, 4),
                slba: le::u64(c, 8),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_layout() {
        let c = IoCommand::Write {
            nsid: 1,
            slba: 0x1_0000_0002,
            nlb: 7,
            fua: true,
        };
        let e = c.to_sqe(3);
        assert_eq!((e.opcode, e.nsid, e.cdw10, e.cdw11), (0x01, 1, 2, 1));
        assert_eq!(e.cdw12, 7 | (1 << 30));
        assert_eq!(c.blocks(), 8);
        assert_eq!(IoCommand::parse(&e).unwrap(), c);
        let r = IoCommand::Read {
            nsid: 2,
            slba: 5,
            nlb: 0xFFFF,
            fua: false,
        };
        assert_eq!(r.blocks(), 65536);
        assert_eq!(r.to_sqe(1).opcode, 0x02);
    }

    #[test]
    fn write_zeroes_and_dsm_layout() {
        let c = IoCommand::WriteZeroes {
            nsid: 1,
            slba: 9,
            nlb: 1,
            deallocate: true,
            fua: false,
        };
        let e = c.to_sqe(1);
        assert_eq!((e.opcode, e.cdw12), (0x08, 1 | (1 << 25)));
        assert_eq!(IoCommand::parse(&e).unwrap(), c);
        let d = IoCommand::DatasetManagement {
            nsid: 1,
            nr: 2,
            idr: false,
            idw: false,
            deallocate: true,
        };
        let e = d.to_sqe(1);
        assert_eq!((e.opcode, e.cdw10, e.cdw11), (0x09, 2, 4));
        assert_eq!(IoCommand::parse(&e).unwrap(), d);
        assert_eq!(IoCommand::Flush { nsid: 1 }.to_sqe(1).opcode, 0);
        assert!(IoCommand::parse(&SubmissionEntry::new(0x7F, 1)).is_err());
    }

    #[test]
    fn dsm_ranges() {
        let rs = vec![
            DsmRange {
                cattr: 0,
                nlb: 8,
                slba: 0x10,
            },
            DsmRange {
                cattr: 1,
                nlb: 1,
                slba: u64::MAX,
            },
        ];
        let b = DsmRange::encode_list(&rs);
        assert_eq!(b.len(), 32);
        assert_eq!(&b[4..8], &[8, 0, 0, 0]);
        assert_eq!(&b[8..16], &[0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(DsmRange::decode_list(&b, 2).unwrap(), rs);
        assert!(DsmRange::decode_list(&b, 3).is_err());
        assert!(DsmRange::decode_list(&b, 0).is_err());
        assert!(DsmRange::decode_list(&b, 257).is_err());
    }
}
