//! Identify data structures: controller, namespace, active namespace list and
//! namespace identification descriptors.
//!
//! The fields are the ones hosts actually check (the Linux host refuses a
//! fabrics controller whose CNTLID differs from the Connect result, whose
//! ICDOFF is non-zero or whose SGLS lacks SGL support, and sizes its queues
//! and transfers from MAXCMD, MDTS, IOCCSZ and SQES/CQES). Unlisted bytes are
//! encoded as zero and ignored on decode.

use super::command::CommandError;
use super::{le, text, IDENTIFY_SIZE};

fn check_len(what: &'static str, b: &[u8]) -> Result<(), CommandError> {
    if b.len() < IDENTIFY_SIZE {
        return Err(CommandError::Length {
            what,
            got: b.len(),
            expected: IDENTIFY_SIZE,
        });
    }
    Ok(())
}

/// Identify Controller data (CNS 01h).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentifyController {
    /// PCI vendor id.
    pub vid: u16,
    /// PCI subsystem vendor id.
    pub ssvid: u16,
    /// Serial number (20 ASCII, space padded).
    pub sn: String,
    /// Model number (40 ASCII).
    pub mn: String,
    /// Firmware revision (8 ASCII).
    pub fr: String,
    /// Recommended arbitration burst.
    pub rab: u8,
    /// IEEE OUI.
    pub ieee: [u8; 3],
    /// Multi-path I/O and namespace sharing capabilities.
    pub cmic: u8,
    /// Maximum data transfer size, 2^n minimum pages (0 = no limit).
    pub mdts: u8,
    /// Controller id.
    pub cntlid: u16,
    /// Version (same layout as the VS property).
    pub ver: u32,
    /// RTD3 resume latency.
    pub rtd3r: u32,
    /// RTD3 entry latency.
    pub rtd3e: u32,
    /// Optional asynchronous events supported.
    pub oaes: u32,
    /// Controller attributes.
    pub ctratt: u32,
    /// Controller type: 1 I/O, 2 discovery, 3 administrative.
    pub cntrltype: u8,
    /// FRU globally unique identifier.
    pub fguid: [u8; 16],
    /// Command retry delay times 1-3 (100 ms units).
    pub crdt: [u16; 3],
    /// Optional admin command support.
    pub oacs: u16,
    /// Abort command limit, 0's based.
    pub acl: u8,
    /// Asynchronous event request limit, 0's based.
    pub aerl: u8,
    /// Firmware updates.
    pub frmw: u8,
    /// Log page attributes.
    pub lpa: u8,
    /// Error log page entries, 0's based.
    pub elpe: u8,
    /// Number of power states support, 0's based.
    pub npss: u8,
    /// Admin vendor specific command configuration.
    pub avscc: u8,
    /// Autonomous power state transition attributes.
    pub apsta: u8,
    /// Warning composite temperature threshold (K).
    pub wctemp: u16,
    /// Critical composite temperature threshold (K).
    pub cctemp: u16,
    /// Total NVM capacity in bytes.
    pub tnvmcap: u128,
    /// Unallocated NVM capacity in bytes.
    pub unvmcap: u128,
    /// Keep alive support: granularity in 100 ms units (0 = unsupported).
    pub kas: u16,
    /// Submission queue entry size: bits 3:0 required, 7:4 maximum (2^n).
    pub sqes: u8,
    /// Completion queue entry size: bits 3:0 required, 7:4 maximum (2^n).
    pub cqes: u8,
    /// Maximum outstanding commands (fabrics).
    pub maxcmd: u16,
    /// Number of namespaces (highest valid NSID).
    pub nn: u32,
    /// Optional NVM command support (bit 2 DSM, bit 3 Write Zeroes, ...).
    pub oncs: u16,
    /// Fused operation support.
    pub fuses: u16,
    /// Format NVM attributes.
    pub fna: u8,
    /// Volatile write cache: bit 0 present.
    pub vwc: u8,
    /// Atomic write unit normal.
    pub awun: u16,
    /// Atomic write unit power fail.
    pub awupf: u16,
    /// NVM vendor specific command configuration.
    pub nvscc: u8,
    /// Atomic compare and write unit.
    pub acwu: u16,
    /// SGL support.
    pub sgls: u32,
    /// Maximum number of allowed namespaces.
    pub mnan: u32,
    /// NVM subsystem NQN (256 bytes, NUL padded).
    pub subnqn: String,
    /// I/O queue command capsule supported size, in 16-byte units.
    pub ioccsz: u32,
    /// I/O queue response capsule supported size, in 16-byte units.
    pub iorcsz: u32,
    /// In-capsule data offset, in 16-byte units.
    pub icdoff: u16,
    /// Fabrics controller attributes: bit 0 static controller model.
    pub fcatt: u8,
    /// Maximum SGL data block descriptors.
    pub msdbd: u8,
    /// Optional fabric commands support.
    pub ofcs: u16,
    /// Power state 0 maximum power (centiwatts).
    pub ps0_mp: u16,
}

impl IdentifyController {
    /// CNTRLTYPE of an I/O controller.
    pub const CNTRLTYPE_IO: u8 = 1;
    /// CNTRLTYPE of a discovery controller.
    pub const CNTRLTYPE_DISCOVERY: u8 = 2;
    /// CTRATT bit: 128-bit host identifiers supported.
    pub const CTRATT_HID_128_BIT: u32 = 1 << 0;
    /// CTRATT bit: traffic-based keep alive (any command restarts the keep-alive timer).
    pub const CTRATT_TBKAS: u32 = 1 << 6;
    /// ONCS bit: Dataset Management supported.
    pub const ONCS_DSM: u16 = 1 << 2;
    /// ONCS bit: Write Zeroes supported.
    pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;
    /// SGLS: SGLs supported, no alignment requirement.
    pub const SGLS_SUPPORTED: u32 = 1;
    /// SGLS: keyed SGL data block supported.
    pub const SGLS_KEYED: u32 = 1 << 2;
    /// SGLS: address field may be an offset (needed for in-capsule data).
    pub const SGLS_OFFSET: u32 = 1 << 20;
    /// SGLS: transport SGL data block supported.
    pub const SGLS_TRANSPORT: u32 = 1 << 21;

    /// In-capsule data bytes an I/O command capsule may carry (IOCCSZ*16 - 64).
    pub fn in_capsule_data_size(&self) -> u32 {
        self.ioccsz.saturating_mul(16).saturating_sub(64)
    }

    /// Maximum data transfer size in bytes given the controller's minimum page
    /// size (CAP.MPSMIN; 4096 over fabrics), or `None` for no limit.
    pub fn max_transfer_bytes(&self, page_size: u32) -> Option<u64> {
        if self.mdts == 0 {
            return None;
        }
        u64::from(page_size).checked_shl(u32::from(self.mdts))
    }

    /// Encodes to 4096 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_SIZE];
        le::put_u16(&mut b, 0, self.vid);
        le::put_u16(&mut b, 2, self.ssvid);
        text::put(&mut b[4..24], &self.sn, b' ');
        text::put(&mut b[24..64], &self.mn, b' ');
        text::put(&mut b[64..72], &self.fr, b' ');
        b[72] = self.rab;
        b[73..76].copy_from_slice(&self.ieee);
        b[76] = self.cmic;
        b[77] = self.mdts;
        le::put_u16(&mut b, 78, self.cntlid);
        le::put_u32(&mut b, 80, self.ver);
        le::put_u32(&mut b, 84, self.rtd3r);
        le::put_u32(&mut b, 88, self.rtd3e);
        le::put_u32(&mut b, 92, self.oaes);
        le::put_u32(&mut b, 96, self.ctratt);
        b[111] = self.cntrltype;
        b[112..128].copy_from_slice(&self.fguid);
        le::put_u16(&mut b, 128, self.crdt[0]);
        le::put_u16(&mut b, 130, self.crdt[1]);
        le::put_u16(&mut b, 132, self.crdt[2]);
        le::put_u16(&mut b, 256, self.oacs);
        b[258] = self.acl;
        b[259] = self.aerl;
        b[260] = self.frmw;
        b[261] = self.lpa;
        b[262] = self.elpe;
        b[263] = self.npss;
        b[264] = self.avscc;
        b[265] = self.apsta;
        le::put_u16(&mut b, 266, self.wctemp);
        le::put_u16(&mut b, 268, self.cctemp);
        le::put_u128(&mut b, 280, self.tnvmcap);
        le::put_u128(&mut b, 296, self.unvmcap);
        le::put_u16(&mut b, 320, self.kas);
        b[512] = self.sqes;
        b[513] = self.cqes;
        le::put_u16(&mut b, 514, self.maxcmd);
        le::put_u32(&mut b, 516, self.nn);
        le::put_u16(&mut b, 520, self.oncs);
        le::put_u16(&mut b, 522, self.fuses);
        b[524] = self.fna;
        b[525] = self.vwc;
        le::put_u16(&mut b, 526, self.awun);
        le::put_u16(&mut b, 528, self.awupf);
        b[530] = self.nvscc;
        le::put_u16(&mut b, 532, self.acwu);
        le::put_u32(&mut b, 536, self.sgls);
        le::put_u32(&mut b, 540, self.mnan);
        text::put(&mut b[768..1023], &self.subnqn, 0);
        le::put_u32(&mut b, 1792, self.ioccsz);
        le::put_u32(&mut b, 1796, self.iorcsz);
        le::put_u16(&mut b, 1800, self.icdoff);
        b[1802] = self.fcatt;
        b[1803] = self.msdbd;
        le::put_u16(&mut b, 1804, self.ofcs);
        le::put_u16(&mut b, 2048, self.ps0_mp);
        b
    }

    /// Decodes from at least 4096 bytes.
    pub fn decode(b: &[u8]) -> Result<Self, CommandError> {
        check_len("identify controller", b)?;
        Ok(IdentifyController {
            vid: le::u16(b, 0),
            ssvid: le::u16(b, 2),
            sn: text::get(&b[4..24]),
            mn: text::get(&b[24..64]),
            fr: text::get(&b[64..72]),
            rab: b[72],
            ieee: le::array(b, 73),
            cmic: b[76],
            mdts: b[77],
            cntlid: le::u16(b, 78),
            ver: le::u32(b, 80),
            rtd3r: le::u32(b, 84),
            rtd3e: le::u32(b, 88),
            oaes: le::u32(b, 92),
            ctratt: le::u32(b, 96),
            cntrltype: b[111],
            fguid: le::array(b, 112),
            crdt: [le::u16(b, 128), le::u16(b, 130), le::u16(b, 132)],
            oacs: le::u16(b, 256),
            acl: b[258],
            aerl: b[259],
            frmw: b[260],
            lpa: b[261],
            elpe: b[262],
            npss: b[263],
            avscc: b[264],
            apsta: b[265],
            wctemp: le::u16(b, 266),
            cctemp: le::u16(b, 268),
            tnvmcap: le::u128(b, 280),
            unvmcap: le::u128(b, 296),
            kas: le::u16(b, 320),
            sqes: b[512],
            cqes: b[513],
            maxcmd: le::u16(b, 514),
            nn: le::u32(b, 516),
            oncs: le::u16(b, 520),
            fuses: le::u16(b, 522),
            fna: b[524],
            vwc: b[525],
            awun: le::u16(b, 526),
            awupf: le::u16(b, 528),
            nvscc: b[530],
            acwu: le::u16(b, 532),
            sgls: le::u32(b, 536),
            mnan: le::u32(b, 540),
            subnqn: text::get(&b[768..1024]),
            ioccsz: le::u32(b, 1792),
            iorcsz: le::u32(b, 1796),
            icdoff: le::u16(b, 1800),
            fcatt: b[1802],
            msdbd: b[1803],
            ofcs: le::u16(b, 1804),
            ps0_mp: le::u16(b, 2048),
        })
    }
}

/// An LBA format descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LbaFormat {
    /// Metadata size per block.
    pub ms: u16,
    /// LBA data size, 2^n bytes (9 = 512, 12 = 4096).
    pub lbads: u8,
    /// Relative performance (2 bits).
    pub rp: u8,
}

impl LbaFormat {
    fn to_u32(self) -> u32 {
        u32::from(self.ms) | (u32::from(self.lbads) << 16) | (u32::from(self.rp & 3) << 24)
    }
    fn from_u32(v: u32) -> Self {
        let b = v.to_le_bytes();
        LbaFormat {
            ms: u16::from_le_bytes([b[0], b[1]]),
            lbads: b[2],
            rp: b[3] & 3,
        }
    }
}

/// Identify Namespace data (CNS 00h).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentifyNamespace {
    /// Namespace size in logical blocks.
    pub nsze: u64,
    /// Namespace capacity in logical blocks.
    pub ncap: u64,
    /// Namespace utilization in logical blocks.
    pub nuse: u64,
    /// Namespace features (bit 4: NPWG/NPWA/NPDG/NPDA/NOWS valid).
    pub nsfeat: u8,
    /// Number of LBA formats, 0's based.
    pub nlbaf: u8,
    /// Formatted LBA size: bits 3:0 and 6:5 the format index, bit 4 extended metadata.
    pub flbas: u8,
    /// Metadata capabilities.
    pub mc: u8,
    /// End-to-end data protection capabilities.
    pub dpc: u8,
    /// End-to-end data protection type settings.
    pub dps: u8,
    /// Namespace multi-path I/O and sharing capabilities.
    pub nmic: u8,
    /// Reservation capabilities.
    pub rescap: u8,
    /// Format progress indicator.
    pub fpi: u8,
    /// Deallocate logical block features (bits 2:0 read value after deallocate: 1 = zeroes).
    pub dlfeat: u8,
    /// Namespace atomic write unit normal.
    pub nawun: u16,
    /// Namespace atomic write unit power fail.
    pub nawupf: u16,
    /// Namespace atomic compare and write unit.
    pub nacwu: u16,
    /// Namespace atomic boundary size normal.
    pub nabsn: u16,
    /// Namespace atomic boundary offset.
    pub nabo: u16,
    /// Namespace atomic boundary size power fail.
    pub nabspf: u16,
    /// Namespace optimal I/O boundary, in blocks.
    pub noiob: u16,
    /// NVM capacity in bytes.
    pub nvmcap: u128,
    /// Preferred write granularity, 0's based blocks.
    pub npwg: u16,
    /// Preferred write alignment, 0's based blocks.
    pub npwa: u16,
    /// Preferred deallocate granularity, 0's based blocks.
    pub npdg: u16,
    /// Preferred deallocate alignment, 0's based blocks.
    pub npda: u16,
    /// Optimal write size, 0's based blocks.
    pub nows: u16,
    /// ANA group identifier.
    pub anagrpid: u32,
    /// Namespace attributes (bit 0 write protected).
    pub nsattr: u8,
    /// NVM set identifier.
    pub nvmsetid: u16,
    /// Endurance group identifier.
    pub endgid: u16,
    /// Namespace globally unique identifier.
    pub nguid: [u8; 16],
    /// IEEE extended unique identifier.
    pub eui64: [u8; 8],
    /// LBA formats 0-15.
    pub lbaf: [LbaFormat; 16],
}

impl IdentifyNamespace {
    /// Index of the formatted LBA format.
    pub fn lba_format_index(&self) -> usize {
        usize::from(self.flbas & 0xF) | (usize::from((self.flbas >> 5) & 3) << 4)
    }

    /// Logical block size in bytes, if the selected format is one of the 16
    /// carried and its LBADS is sane (512 B to 2 GiB).
    pub fn block_size(&self) -> Option<u32> {
        let f = self.lbaf.get(self.lba_format_index())?;
        if !(9..=31).contains(&f.lbads) {
            return None;
        }
        1u32.checked_shl(u32::from(f.lbads))
    }

    /// Encodes to 4096 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_SIZE];
        le::put_u64(&mut b, 0, self.nsze);
        le::put_u64(&mut b, 8, self.ncap);
        le::put_u64(&mut b, 16, self.nuse);
        b[24] = self.nsfeat;
        b[25] = self.nlbaf;
        b[26] = self.flbas;
        b[27] = self.mc;
        b[28] = self.dpc;
        b[29] = self.dps;
        b[30] = self.nmic;
        b[31] = self.rescap;
        b[32] = self.fpi;
        b[33] = self.dlfeat;
        le::put_u16(&mut b, 34, self.nawun);
        le::put_u16(&mut b, 36, self.nawupf);
        le::put_u16(&mut b, 38, self.nacwu);
        le::put_u16(&mut b, 40, self.nabsn);
        le::put_u16(&mut b, 42, self.nabo);
        le::put_u16(&mut b, 44, self.nabspf);
        le::put_u16(&mut b, 46, self.noiob);
        le::put_u128(&mut b, 48, self.nvmcap);
        le::put_u16(&mut b, 64, self.npwg);
        le::put_u16(&mut b, 66, self.npwa);
        le::put_u16(&mut b, 68, self.npdg);
        le::put_u16(&mut b, 70, self.npda);
        le::put_u16(&mut b, 72, self.nows);
        le::put_u32(&mut b, 92, self.anagrpid);
        b[99] = self.nsattr;
        le::put_u16(&mut b, 100, self.nvmsetid);
        le::put_u16(&mut b, 102, self.endgid);
        b[104..120].copy_from_slice(&self.nguid);
        b[120..128].copy_from_slice(&self.eui64);
        for (i, f) in self.lbaf.iter().enumerate() {
            le::put_u32(&mut b, 128 + 4 * i, f.to_u32());
        }
        b
    }

    /// Decodes from at least 4096 bytes.
    pub fn decode(b: &[u8]) -> Result<Self, CommandError> {
        check_len("identify namespace", b)?;
        let mut lbaf = [LbaFormat::default(); 16];
        for (i, f) in lbaf.iter_mut().enumerate() {
            *f = LbaFormat::from_u32(le::u32(b, 128 + 4 * i));
        }
        Ok(IdentifyNamespace {
            nsze: le::u64(b, 0),
            ncap: le::u64(b, 8),
            nuse: le::u64(b, 16),
            nsfeat: b[24],
            nlbaf: b[25],
            flbas: b[26],
            mc: b[27],
            dpc: b[28],
            dps: b[29],
            nmic: b[30],
            rescap: b[31],
            fpi: b[32],
            dlfeat: b[33],
            nawun: le::u16(b, 34),
            nawupf: le::u16(b, 36),
            nacwu: le::u16(b, 38),
            nabsn: le::u16(b, 40),
            nabo: le::u16(b, 42),
            nabspf: le::u16(b, 44),
            noiob: le::u16(b, 46),
            nvmcap: le::u128(b, 48),
            npwg: le::u16(b, 64),
            npwa: le::u16(b, 66),
            npdg: le::u16(b, 68),
            npda: le::u16(b, 70),
            nows: le::u16(b, 72),
            anagrpid: le::u32(b, 92),
            nsattr: b[99],
            nvmsetid: le::u16(b, 100),
            endgid: le::u16(b, 102),
            nguid: le::array(b, 104),
            eui64: le::array(b, 120),
            lbaf,
        })
    }
}

/// Encodes an active namespace id list (CNS 02h): ascending NSIDs, zero filled.
/// At most 1024 ids fit; extra ids are dropped.
pub fn encode_active_ns_list(ids: &[u32]) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_SIZE];
    for (i, id) in ids.iter().take(IDENTIFY_SIZE / 4).enumerate() {
        le::put_u32(&mut b, 4 * i, *id);
    }
    b
}

/// Decodes an active namespace id list up to the first zero entry.
pub fn decode_active_ns_list(b: &[u8]) -> Result<Vec<u32>, CommandError> {
    check_len("active namespace list", b)?;
    Ok(b[..IDENTIFY_SIZE]
        .chunks_exact(4)
        .map(|c| le::u32(c, 0))
        .take_while(|&id| id != 0)
        .collect())
}

/// A namespace identification descriptor (CNS 03h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NsIdDescriptor {
    /// NIDT 1: IEEE EUI-64.
    Eui64([u8; 8]),
    /// NIDT 2: namespace GUID.
    Nguid([u8; 16]),
    /// NIDT 3: namespace UUID.
    Uuid([u8; 16]),
    /// NIDT 4: command set identifier.
    Csi(u8),
}

impl NsIdDescriptor {
    fn parts(&self) -> (u8, &[u8]) {
        match self {
            NsIdDescriptor::Eui64(v) => (1, v),
            NsIdDescriptor::Nguid(v) => (2, v),
            NsIdDescriptor::Uuid(v) => (3, v),
            NsIdDescriptor::Csi(v) => (4, std::slice::from_ref(v)),
        }
    }

    /// Encodes a descriptor list into 4096 bytes (terminated by zeroes).
    pub fn encode_list(list: &[NsIdDescriptor]) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_SIZE];
        let mut off = 0;
        for d in list {
            let (nidt, nid) = d.parts();
            // nid is at most 16 bytes, so 4 + 16 per descriptor.
            if off + 4 + nid.len() > IDENTIFY_SIZE {
                break;
            }
            b[off] = nidt;
            b[off + 1] = u8::try_from(nid.len()).unwrap_or(0);
            b[off + 4..off + 4 + nid.len()].copy_from_slice(nid);
            off += 4 + nid.len();
        }
        b
    }

    /// Decodes a descriptor list up to the terminating zero NIDT. Unknown
    /// types are skipped; a length that disagrees with a known type or runs
    /// past the buffer is an error.
    pub fn decode_list(b: &[u8]) -> Result<Vec<NsIdDescriptor>, CommandError> {
        check_len("namespace id descriptor list", b)?;
        let b = &b[..IDENTIFY_SIZE];
        let mut out = Vec::new();
        let mut off = 0usize;
        while off + 4 <= b.len() {
            let nidt = b[off];
            let nidl = usize::from(b[off + 1]);
            if nidt == 0 {
                break;
            }
            let end = off + 4 + nidl;
            if end > b.len() {
                return Err(CommandError::InvalidField {
                    field: "NIDL",
                    value: u64::from(b[off + 1]),
                });
            }
            let nid = &b[off + 4..end];
            let expect = match nidt {
                1 => Some(8),
                2 | 3 => Some(16),
                4 => Some(1),
                _ => None,
            };
            if let Some(n) = expect {
                if n != nidl {
                    return Err(CommandError::InvalidField {
                        field: "NIDL",
                        value: u64::from(b[off + 1]),
                    });
                }
                out.push(match nidt {
                    1 => NsIdDescriptor::Eui64(le::array(nid, 0)),
                    2 => NsIdDescriptor::Nguid(le::array(nid, 0)),
                    3 => NsIdDescriptor::Uuid(le::array(nid, 0)),
                    _ => NsIdDescriptor::Csi(nid[0]),
                });
            }
            off = end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_offsets() {
        let c = IdentifyController {
            vid: 0x1B36,
            sn: "SN1".into(),
            mn: "model".into(),
            fr: "0.1".into(),
            mdts: 5,
            cntlid: 0x0102,
            ver: 0x0001_0300,
            cntrltype: 1,
            kas: 50,
            sqes: 0x66,
            cqes: 0x44,
            maxcmd: 128,
            nn: 1,
            oncs: 0x0C,
            vwc: 1,
            sgls: 0x0010_0005,
            subnqn: "nqn.x".into(),
            ioccsz: 260,
            iorcsz: 1,
            msdbd: 1,
            ..Default::default()
        };
        let b = c.encode();
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[0..2], &[0x36, 0x1B]);
        assert_eq!(&b[4..8], b"SN1 ");
        assert_eq!(b[23], b' ');
        assert_eq!(b[77], 5);
        assert_eq!(&b[78..80], &[2, 1]);
        assert_eq!(b[111], 1);
        assert_eq!(&b[320..322], &[50, 0]);
        assert_eq!((b[512], b[513]), (0x66, 0x44));
        assert_eq!(&b[514..516], &[128, 0]);
        assert_eq!(&b[536..540], &[5, 0, 0x10, 0]);
        assert_eq!(&b[768..773], b"nqn.x");
        assert_eq!(b[773], 0);
        assert_eq!(&b[1792..1796], &[4, 1, 0, 0]);
        assert_eq!(b[1803], 1);
        assert_eq!(IdentifyController::decode(&b).unwrap(), c);
        // SGLS bits as SPDK and Linux spell them: bits 1:0 support, 2 keyed,
        // 20 address as offset (SAOS), 21 transport SGL data block.
        assert_eq!(IdentifyController::SGLS_OFFSET, 0x0010_0000);
        assert_eq!(IdentifyController::SGLS_TRANSPORT, 0x0020_0000);
        assert_eq!(c.in_capsule_data_size(), 4096);
        assert_eq!(c.max_transfer_bytes(4096), Some(128 * 1024));
        assert!(IdentifyController::decode(&b[..4095]).is_err());
    }

    #[test]
    fn namespace_offsets() {
        let mut lbaf = [LbaFormat::default(); 16];
        lbaf[0] = LbaFormat {
            ms: 0,
            lbads: 9,
            rp: 0,
        };
        lbaf[1] = LbaFormat {
            ms: 8,
            lbads: 12,
            rp: 2,
        };
        let n = IdentifyNamespace {
            nsze: 262_144,
            ncap: 262_144,
            nuse: 10,
            nsfeat: 0x10,
            nlbaf: 1,
            flbas: 1,
            dlfeat: 1,
            noiob: 32,
            npwg: 7,
            nows: 31,
            nguid: [0xAA; 16],
            eui64: [0xBB; 8],
            lbaf,
            ..Default::default()
        };
        let b = n.encode();
        assert_eq!(&b[0..8], &262_144u64.to_le_bytes());
        assert_eq!((b[25], b[26], b[33]), (1, 1, 1));
        assert_eq!(&b[46..48], &[32, 0]);
        assert_eq!(&b[64..66], &[7, 0]);
        assert_eq!(&b[72..74], &[31, 0]);
        assert_eq!(&b[104..120], &[0xAA; 16]);
        assert_eq!(&b[120..128], &[0xBB; 8]);
        assert_eq!(&b[132..136], &[8, 0, 12, 2]);
        assert_eq!(IdentifyNamespace::decode(&b).unwrap(), n);
        assert_eq!(n.block_size(), Some(4096));
        let mut bad = n.clone();
        bad.flbas = 5; // format 5 has LBADS 0
        assert_eq!(bad.block_size(), None);
    }

    #[test]
    fn ns_lists() {
        let b = encode_active_ns_list(&[1, 2, 7]);
        assert_eq!(decode_active_ns_list(&b).unwrap(), vec![1, 2, 7]);
        let list = [NsIdDescriptor::Nguid([1; 16]), NsIdDescriptor::Csi(0)];
        let b = NsIdDescriptor::encode_list(&list);
        assert_eq!(&b[0..4], &[2, 16, 0, 0]);
        assert_eq!(&b[20..24], &[4, 1, 0, 0]);
        assert_eq!(NsIdDescriptor::decode_list(&b).unwrap(), list);
        let mut bad = b.clone();
        bad[1] = 15;
        assert!(NsIdDescriptor::decode_list(&bad).is_err());
        // Fifteen unknown 256-byte descriptors, then one running past the end.
        let mut runaway = vec![0u8; 4096];
        for i in 0..15 {
            runaway[i * 256] = 9;
            runaway[i * 256 + 1] = 252;
        }
        assert_eq!(NsIdDescriptor::decode_list(&runaway).unwrap(), vec![]);
        runaway[15 * 256] = 9;
        runaway[15 * 256 + 1] = 255;
        assert!(NsIdDescriptor::decode_list(&runaway).is_err());
    }
}
