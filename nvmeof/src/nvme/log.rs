//! Log pages: error information, SMART / health, and the discovery log.
//!
//! The discovery log is what a host reads from the discovery controller to
//! learn which subsystems exist at which transport addresses; its entries are
//! fixed 1024-byte records after a 1024-byte header.

use super::command::CommandError;
use super::{le, text};

/// Size of an error information log entry.
pub const ERROR_LOG_ENTRY_SIZE: usize = 64;
/// Size of the SMART / health log page.
pub const SMART_LOG_SIZE: usize = 512;
/// Size of the discovery log header and of each entry.
pub const DISCOVERY_RECORD_SIZE: usize = 1024;

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), CommandError> {
    if b.len() < n {
        return Err(CommandError::Length {
            what,
            got: b.len(),
            expected: n,
        });
    }
    Ok(())
}

/// One error information log entry (log page 01h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ErrorLogEntry {
    /// Error count (unique, increasing; 0 = invalid entry).
    pub error_count: u64,
    /// Submission queue id.
    pub sqid: u16,
    /// Command id.
    pub cid: u16,
    /// Status field (as in a CQE word, phase bit included).
    pub status: u16,
    /// Parameter error location.
    pub param_error_location: u16,
    /// LBA.
    pub lba: u64,
    /// Namespace.
    pub nsid: u32,
    /// Vendor specific information available.
    pub vs: u8,
    /// Transport type.
    pub trtype: u8,
    /// Command specific information.
    pub csi: u64,
    /// Transport type specific information.
    pub ttsi: u16,
}

impl ErrorLogEntry {
    /// Encodes to 64 bytes.
    pub fn encode(&self) -> [u8; ERROR_LOG_ENTRY_SIZE] {
        let mut b = [0u8; ERROR_LOG_ENTRY_SIZE];
        le::put_u64(&mut b, 0, self.error_count);
        le::put_u16(&mut b, 8, self.sqid);
        le::put_u16(&mut b, 10, self.cid);
        le::put_u16(&mut b, 12, self.status);
        le::put_u16(&mut b, 14, self.param_error_location);
        le::put_u64(&mut b, 16, self.lba);
        le::put_u32(&mut b, 24, self.nsid);
        b[28] = self.vs;
        b[29] = self.trtype;
        le::put_u64(&mut b, 32, self.csi);
        le::put_u16(&mut b, 40, self.ttsi);
        b
    }
    /// Decodes from at least 64 bytes.
    pub fn decode(b: &[u8]) -> Result<Self, CommandError> {
        need("error log entry", b, ERROR_LOG_ENTRY_SIZE)?;
        Ok(ErrorLogEntry {
            error_count: le::u64(b, 0),
            sqid: le::u16(b, 8),
            cid: le::u16(b, 10),
            status: le::u16(b, 12),
            param_error_location: le::u16(b, 14),
            lba: le::u64(b, 16),
            nsid: le::u32(b, 24),
            vs: b[28],
            trtype: b[29],
            csi: le::u64(b, 32),
            ttsi: le::u16(b, 40),
        })
    }
}

/// SMART / health information (log page 02h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmartLog {
    /// Critical warning bits.
    pub critical_warning: u8,
    /// Composite temperature in kelvin.
    pub temperature: u16,
    /// Available spare, percent.
    pub available_spare: u8,
    /// Available spare threshold, percent.
    pub available_spare_threshold: u8,
    /// Percentage used.
    pub percentage_used: u8,
    /// Endurance group critical warning summary.
    pub endurance_group_warning: u8,
    /// Data units read (1000 x 512 bytes).
    pub data_units_read: u128,
    /// Data units written (1000 x 512 bytes).
    pub data_units_written: u128,
    /// Host read commands.
    pub host_read_commands: u128,
    /// Host write commands.
    pub host_write_commands: u128,
    /// Controller busy time, minutes.
    pub controller_busy_time: u128,
    /// Power cycles.
    pub power_cycles: u128,
    /// Power on hours.
    pub power_on_hours: u128,
    /// Unsafe shutdowns.
    pub unsafe_shutdowns: u128,
    /// Media and data integrity errors.
    pub media_errors: u128,
    /// Number of error information log entries.
    pub num_error_log_entries: u128,
    /// Warning composite temperature time, minutes.
    pub warning_temp_time: u32,
    /// Critical composite temperature time, minutes.
    pub critical_temp_time: u32,
}

impl SmartLog {
    /// Encodes to 512 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SMART_LOG_SIZE];
        b[0] = self.critical_warning;
        le::put_u16(&mut b, 1, self.temperature);
        b[3] = self.available_spare;
        b[4] = self.available_spare_threshold;
        b[5] = self.percentage_used;
        b[6] = self.endurance_group_warning;
        for (i, v) in self.counters().iter().enumerate() {
            le::put_u128(&mut b, 32 + 16 * i, *v);
        }
        le::put_u32(&mut b, 192, self.warning_temp_time);
        le::put_u32(&mut b, 196, self.critical_temp_time);
        b
    }

    fn counters(&self) -> [u128; 10] {
        [
            self.data_units_read,
            self.data_units_written,
            self.host_read_commands,
            self.host_write_commands,
            self.controller_busy_time,
            self.power_cycles,
            self.power_on_hours,
            self.unsafe_shutdowns,
            self.media_errors,
            self.num_error_log_entries,
        ]
    }

    /// Decodes from at least 512 bytes.
    pub fn decode(b: &[u8]) -> Result<Self, CommandError> {
        need("smart log", b, SMART_LOG_SIZE)?;
        let c = |i: usize| le::u128(b, 32 + 16 * i);
        Ok(SmartLog {
            critical_warning: b[0],
            temperature: le::u16(b, 1),
            available_spare: b[3],
            available_spare_threshold: b[4],
            percentage_used: b[5],
            endurance_group_warning: b[6],
            data_units_read: c(0),
            data_units_written: c(1),
            host_read_commands: c(2),
            host_write_commands: c(3),
            controller_busy_time: c(4),
            power_cycles: c(5),
            power_on_hours: c(6),
            unsafe_shutdowns: c(7),
            media_errors: c(8),
            num_error_log_entries: c(9),
            warning_temp_time: le::u32(b, 192),
            critical_temp_time: le::u32(b, 196),
        })
    }
}

/// The discovery log page header (first 1024 bytes of log page 70h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiscoveryLogHeader {
    /// Generation counter: changes whenever the log changes.
    pub genctr: u64,
    /// Number of records that follow.
    pub numrec: u64,
    /// Record format (0).
    pub recfmt: u16,
}

impl DiscoveryLogHeader {
    /// Encodes to 1024 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; DISCOVERY_RECORD_SIZE];
        le::put_u64(&mut b, 0, self.genctr);
        le::put_u64(&mut b, 8, self.numrec);
        le::put_u16(&mut b, 16, self.recfmt);
        b
    }
    /// Decodes from at least the first 18 bytes (a host may read only the
    /// start of the header to learn NUMREC).
    pub fn decode(b: &[u8]) -> Result<Self, CommandError> {
        need("discovery log header", b, 18)?;
        Ok(DiscoveryLogHeader {
            genctr: le::u64(b, 0),
            numrec: le::u64(b, 8),
            recfmt: le::u16(b, 16),
        })
    }
}

/// One discovery log page entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryLogEntry {
    /// Transport type (3 = TCP).
    pub trtype: u8,
    /// Address family (1 = IPv4, 2 = IPv6).
    pub adrfam: u8,
    /// Subsystem type (1 = referral to a discovery subsystem, 2 = NVM
    /// subsystem, 3 = current discovery subsystem).
    pub subtype: u8,
    /// Transport requirements.
    pub treq: u8,
    /// Port id.
    pub portid: u16,
    /// Controller id (0xFFFF: dynamic).
    pub cntlid: u16,
    /// Admin max submission queue size.
    pub asqsz: u16,
    /// Entry flags.
    pub eflags: u16,
    /// Transport service id (the TCP port as text).
    pub trsvcid: String,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Transport address (IP address as text).
    pub traddr: String,
    /// Transport specific address subtype (for TCP: byte 0 SECTYPE).
    pub tsas: [u8; 256],
}

impl Default for DiscoveryLogEntry {
    fn default() -> Self {
        DiscoveryLogEntry {
            trtype: 0,
            adrfam: 0,
            subtype: 0,
            treq: 0,
            portid: 0,
            cntlid: 0,
            asqsz: 0,
            eflags: 0,
            trsvcid: String::new(),
            subnqn: String::new(),
            traddr: String::new(),
            tsas: [0; 256],
        }
    }
}

impl DiscoveryLogEntry {
    /// TRTYPE for TCP.
    pub const TRTYPE_TCP: u8 = 3;
    /// ADRFAM IPv4.
    pub const ADRFAM_IPV4: u8 = 1;
    /// ADRFAM IPv6.
    pub const ADRFAM_IPV6: u8 = 2;
    /// SUBTYPE: referral to a discovery subsystem.
    pub const SUBTYPE_DISCOVERY_REFERRAL: u8 = 1;
    /// SUBTYPE: NVM subsystem.
    pub const SUBTYPE_NVM: u8 = 2;
    /// SUBTYPE: current discovery subsystem.
    pub const SUBTYPE_CURRENT_DISCOVERY: u8 = 3;

    /// Encodes to 1024 bytes (text fields space padded for TRSVCID/TRADDR as
    /// Linux nvmet does, NUL padded for SUBNQN).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; DISCOVERY_RECORD_SIZE];
        b[0] = self.trtype;
        b[1] = self.adrfam;
        b[2] = self.subtype;
        b[3] = self.treq;
        le::put_u16(&mut b, 4, self.portid);
        le::put_u16(&mut b, 6, self.cntlid);
        le::put_u16(&mut b, 8, self.asqsz);
        le::put_u16(&mut b, 10, self.eflags);
        text::put(&mut b[32..64], &self.trsvcid, b' ');
        text::put(&mut b[256..511], &self.subnqn, 0);
        text::put(&mut b[512..768], &self.traddr, b' ');
        b[768..1024].copy_from_slice(&self.tsas);
        b
    }

    /// Decodes from at least 1024 bytes.
    pub fn decode(b: &[u8]) -> Result<Self, CommandError> {
        need("discovery log entry", b, DISCOVERY_RECORD_SIZE)?;
        Ok(DiscoveryLogEntry {
            trtype: b[0],
            adrfam: b[1],
            subtype: b[2],
            treq: b[3],
            portid: le::u16(b, 4),
            cntlid: le::u16(b, 6),
            asqsz: le::u16(b, 8),
            eflags: le::u16(b, 10),
            trsvcid: text::get(&b[32..64]),
            subnqn: text::get(&b[256..512]),
            traddr: text::get(&b[512..768]),
            tsas: le::array(b, 768),
        })
    }

    /// Decodes a whole discovery log page: header and `numrec` entries, as
    /// many as the buffer holds.
    pub fn decode_page(
        b: &[u8],
    ) -> Result<(DiscoveryLogHeader, Vec<DiscoveryLogEntry>), CommandError> {
        let h = DiscoveryLogHeader::decode(b)?;
        let mut entries = Vec::new();
        let mut off = DISCOVERY_RECORD_SIZE;
        let mut left = h.numrec;
        while left > 0 && off + DISCOVERY_RECORD_SIZE <= b.len() {
            entries.push(DiscoveryLogEntry::decode(&b[off..])?);
            off += DISCOVERY_RECORD_SIZE;
            left -= 1;
        }
        Ok((h, entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_entry_offsets() {
        let e = ErrorLogEntry {
            error_count: 1,
            sqid: 2,
            cid: 3,
            status: 0x8005,
            param_error_location: 0x28,
            lba: 5,
            nsid: 6,
            vs: 0,
            trtype: 3,
            csi: 7,
            ttsi: 8,
        };
        let b = e.encode();
        assert_eq!((b[8], b[10], b[12], b[13], b[14]), (2, 3, 5, 0x80, 0x28));
        assert_eq!((b[16], b[24], b[29], b[32], b[40]), (5, 6, 3, 7, 8));
        assert_eq!(ErrorLogEntry::decode(&b).unwrap(), e);
    }

    #[test]
    fn smart_offsets() {
        let s = SmartLog {
            temperature: 300,
            available_spare: 100,
            data_units_read: 1,
            num_error_log_entries: 10,
            critical_temp_time: 9,
            ..Default::default()
        };
        let b = s.encode();
        assert_eq!((b[1], b[2], b[3]), (0x2C, 0x01, 100));
        assert_eq!((b[32], b[176], b[196]), (1, 10, 9));
        assert_eq!(SmartLog::decode(&b).unwrap(), s);
        assert!(SmartLog::decode(&b[..511]).is_err());
    }

    #[test]
    fn discovery_page() {
        let e = DiscoveryLogEntry {
            trtype: 3,
            adrfam: 1,
            subtype: 2,
            treq: 2,
            portid: 1,
            cntlid: 0xFFFF,
            asqsz: 32,
            eflags: 0,
            trsvcid: "4420".into(),
            subnqn: "nqn.2026-11.io.test:a".into(),
            traddr: "127.0.0.1".into(),
            tsas: [0; 256],
        };
        let b = e.encode();
        assert_eq!(&b[0..4], &[3, 1, 2, 2]);
        assert_eq!(&b[32..37], b"4420 ");
        assert_eq!(&b[256..260], b"nqn.");
        assert_eq!(&b[512..522], b"127.0.0.1 ");
        let h = DiscoveryLogHeader {
            genctr: 9,
            numrec: 2,
            recfmt: 0,
        };
        let mut page = h.encode();
        page.extend_from_slice(&b);
        page.extend_from_slice(&b);
        let (hh, es) = DiscoveryLogEntry::decode_page(&page).unwrap();
        assert_eq!(hh, h);
        assert_eq!(es, vec![e.clone(), e]);
        // A short read returns only the entries present.
        let (_, es) = DiscoveryLogEntry::decode_page(&page[..2048]).unwrap();
        assert_eq!(es.len(), 1);
    }
}
